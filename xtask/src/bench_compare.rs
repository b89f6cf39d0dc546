//! `cargo xtask bench --only compare`: the agent as operators see it, beside the limit and beside
//! what people run today, on the same PHP-like sender, in one run.
//!
//! Sender: non-blocking `sendto(2)` on a Unix datagram socket, a datagram dropped on EAGAIN (what
//! PHP's `socket_sendto` with `MSG_DONTWAIT` does); every attempt carries a unique id, and the
//! threads are named `php-bench` so the agent's eBPF programs (comm prefix `php`) watch them.
//! Two threads flat out for saturation, one paced thread for the fixed rates.
//!
//! Sinks, each on a socket created with a queue length of 2048 (the agent's default):
//! - `bare`: one thread in this process doing `recvmmsg(2)` into 64 slots and counting ids: the
//!   limit of the socket and the sender on this machine.
//! - the agent, eBPF off and on (`[ebpf] enabled = "on"`: a startup error when it cannot load),
//!   to `apm-bench-sink`, a gRPC `Collector` that counts unique ids and acks each batch once
//!   counted: the same work as the other two sinks' counters, so the rows compare forwarders
//!   (the aims are read on the eBPF-on row). Each window sends ids from its own base, so the
//!   sink's one set of ids counts windows apart.
//! - the agent, eBPF on, to `apm-listener` validating and storing every profile to tmpfs:
//!   delivered = unique ids in the listener's file. The product end to end, for transparency:
//!   on 2 cores the listener competes with the agent and the senders for the same CPU.
//! - syslog-ng from Debian's `syslog-ng-core`: a `unix-dgram` source to a `network` TCP
//!   destination with a reliable disk buffer, to a TCP sink in this process counting unique ids
//!   (the configuration is [`SYSLOG_NG_CONF`], printed in the section).
//!
//! Per sink and round: paced 1 KiB at 1000/s then 5000/s (CPU seconds of the sink's process per
//! 100k delivered), then 1 KiB flat out (delivered/s; peak RSS = `VmHWM` after it); then a fresh
//! sink process for 16 KiB flat out (delivered/s, peak RSS). Cells are medians over the rounds.
//!
//! A measurement, not a test: it fails only when the setup is broken.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apm_testkit::bench_id::{DIGITS as ID_DIGITS, HEAD};

use crate::live::{spawn, start_listener, write_agent_config};

/// Seconds flat out per saturation window.
const SAT: Duration = Duration::from_secs(8);
/// Seconds per paced window.
const PACED: Duration = Duration::from_secs(10);
const RATES: [u64; 2] = [1000, 5000];
const SAT_THREADS: u64 = 2;
const QLEN: u32 = 2048;
/// The count at a sink is settled when it has not moved for this long.
const SETTLE: Duration = Duration::from_millis(1500);
/// The syslog-ng configuration (`{sock}`, `{port}`, `{dir}` filled in). `flags(no-parse)`: a
/// profile is the whole datagram, not a syslog line; `log-msg-size(65536)` so 16 KiB profiles
/// are neither cut nor dropped (the default is 64 KiB in 3.38, set anyway); the template adds
/// the newline the TCP sink splits on. The disk buffer is on the same disk as the agent's spool.
pub const SYSLOG_NG_CONF: &str = r#"@version: 3.38
options {
  log-msg-size(65536); stats-freq(0); mark-freq(0); use-dns(no); use-fqdn(no);
  keep-hostname(yes); chain-hostnames(no);
};
source s_php {
  unix-dgram("{sock}" so-rcvbuf(8388608) log-msg-size(65536) flags(no-parse));
};
destination d_tcp {
  network("127.0.0.1" port({port}) transport("tcp") template("${MSG}\n")
    disk-buffer(reliable(yes) disk-buf-size(536870912) dir("{dir}")));
};
log { source(s_php); destination(d_tcp); };
"#;

fn profile(size: usize) -> Vec<u8> {
    let mut v = HEAD.to_vec();
    v.extend(std::iter::repeat_n(b'0', ID_DIGITS));
    v.extend_from_slice(br#"","uri":"/bench","status":200,"pad":""#);
    let pad = size.saturating_sub(v.len() + 2);
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(b"\"}");
    v
}

fn set_id(buf: &mut [u8], mut id: u64) {
    for d in buf[HEAD.len()..HEAD.len() + ID_DIGITS].iter_mut().rev() {
        *d = b'0' + (id % 10) as u8;
        id /= 10;
    }
}

/// The id of the profile in `line` (anywhere in its first 512 bytes: the listener writes its
/// own fields before the profile).
fn id_of(line: &[u8]) -> Option<u64> {
    // The datagram itself starts with the id: no search (xtask runs unoptimised).
    let at = if line.starts_with(HEAD) {
        HEAD.len()
    } else {
        let head = &line[..line.len().min(512)];
        head.windows(HEAD.len()).position(|w| w == HEAD)? + HEAD.len()
    };
    apm_testkit::bench_id::parse(line.get(at..)?)
}

/// A set of ids (dense from 0 in each window): a bitset.
#[derive(Default)]
struct Ids {
    bits: Vec<u64>,
    count: u64,
}

impl Ids {
    fn insert(&mut self, id: u64) {
        let (w, b) = ((id / 64) as usize, id % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1 + w / 2, 0);
        }
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.count += 1;
        }
    }
}

/// What the senders of one window saw.
#[derive(Default, Clone, Copy)]
struct Sent {
    ok: u64,
    eagain: u64,
    other: u64,
}

fn sendto(fd: i32, buf: &[u8], addr: &libc::sockaddr_un, alen: libc::socklen_t) -> i32 {
    // SAFETY: `buf` and `addr` outlive the call and the lengths given are theirs.
    let r = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&raw const *addr).cast(),
            alen,
        )
    };
    if r >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    let p = path.as_os_str().as_encoded_bytes();
    if p.len() >= 108 {
        bail!("socket path too long: {}", path.display());
    }
    // SAFETY: sockaddr_un is a plain C struct for which all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    // PHP passes addrlen = 2 + strlen(path).
    Ok((addr, (2 + p.len()) as libc::socklen_t))
}

/// Sends `size`-byte profiles for `dur`: `threads` threads flat out when `rate` is 0, else one
/// thread at `rate`/s. Ids are `base..` across the threads (thread `t` sends `base + t`,
/// `base + t + threads`, ...).
fn send(
    path: &Path,
    size: usize,
    rate: u64,
    (threads, base): (u64, u64),
    dur: Duration,
) -> Result<Sent> {
    let (addr, alen) = sockaddr(path)?;
    let threads = if rate > 0 { 1 } else { threads };
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::Builder::new()
                .name("php-bench".into())
                .spawn(move || {
                    let s = UnixDatagram::unbound().expect("socket");
                    let fd = s.as_raw_fd();
                    let mut buf = profile(size);
                    let mut sent = Sent::default();
                    let start = Instant::now();
                    let mut i = 0u64;
                    loop {
                        let now = start.elapsed();
                        if now >= dur {
                            break;
                        }
                        if rate > 0 {
                            let due = Duration::from_secs_f64(i as f64 / rate as f64);
                            if let Some(d) = due.checked_sub(now) {
                                std::thread::sleep(d);
                            }
                        }
                        set_id(&mut buf, base + i * threads + t);
                        match sendto(fd, &buf, &addr, alen) {
                            0 => sent.ok += 1,
                            libc::EAGAIN => sent.eagain += 1,
                            _ => sent.other += 1,
                        }
                        i += 1;
                    }
                    sent
                })
                .expect("spawn sender")
        })
        .collect();
    let mut all = Sent::default();
    for h in handles {
        let s = h.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
        all.ok += s.ok;
        all.eagain += s.eagain;
        all.other += s.other;
    }
    Ok(all)
}

/// Creates a datagram socket with queue length `qlen`, as the agent does (sysctl raised for the
/// `bind` only).
fn with_qlen<T>(qlen: u32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let sysctl = "/proc/sys/net/unix/max_dgram_qlen";
    let old = std::fs::read_to_string(sysctl)?.trim().to_string();
    let _ = std::fs::write(sysctl, qlen.to_string());
    let r = f();
    let _ = std::fs::write(sysctl, &old);
    r
}

fn cpu_of(stat: &str) -> f64 {
    let s = std::fs::read_to_string(stat).unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the comm: utime [11], stime [12], in clock ticks (100/s).
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Removes a scratch directory however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One sink under measurement.
trait Sink {
    /// A counter that grows while profiles are delivered, read without asking the sink's
    /// process anything (polling the agent's status socket would add to its CPU).
    fn progress(&mut self) -> u64;
    /// Final unique count of the window (may be costlier), then start a new window.
    fn finish(&mut self) -> Result<u64>;
    fn cpu(&self) -> f64;
    fn peak_rss_mib(&self) -> Option<f64>;
    /// The first id of the next window (ids are `base..` in it).
    fn id_base(&mut self) -> u64 {
        0
    }
    fn socket(&self) -> PathBuf;
    fn stop(&mut self);
}

/// Waits until `delivered` stops moving; returns the time of its last change since `t0`.
fn settle(sink: &mut dyn Sink, t0: Instant) -> Duration {
    let mut last = sink.progress();
    let mut changed = t0.elapsed();
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let n = sink.progress();
        if n != last {
            last = n;
            changed = t0.elapsed();
        } else if t0.elapsed().saturating_sub(changed) >= SETTLE || Instant::now() > deadline {
            return changed;
        }
    }
}

// ---- bare recvmmsg sink ----

struct Bare {
    path: PathBuf,
    ids: Arc<Mutex<Ids>>,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
    _dir: RemoveOnDrop,
}

impl Bare {
    fn start(dir: &Path) -> Result<Self> {
        let path = dir.join("bare.sock");
        let _ = std::fs::remove_file(&path);
        let sock = with_qlen(QLEN, || Ok(UnixDatagram::bind(&path)?))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let ids = Arc::new(Mutex::new(Ids::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicU64::new(0));
        let (i2, s2, t2) = (ids.clone(), stop.clone(), tid.clone());
        let handle = std::thread::Builder::new()
            .name("bare-sink".into())
            .spawn(move || bare_loop(&sock, &i2, &s2, &t2))?;
        while tid.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self {
            path,
            ids,
            stop,
            tid,
            handle: Some(handle),
            _dir: RemoveOnDrop(dir.to_path_buf()),
        })
    }
}

fn bare_loop(sock: &UnixDatagram, ids: &Mutex<Ids>, stop: &AtomicBool, tid: &AtomicU64) {
    const SLOTS: usize = 64;
    const SLOT: usize = 64 * 1024;
    // SAFETY: gettid takes no arguments.
    tid.store(
        u64::from(unsafe { libc::gettid() }.unsigned_abs()),
        Ordering::Relaxed,
    );
    let mut bufs = vec![0u8; SLOTS * SLOT];
    let mut iov: Vec<libc::iovec> = bufs
        .chunks_mut(SLOT)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        })
        .collect();
    // SAFETY: mmsghdr is a plain C struct for which all-zero is valid.
    let mut hdrs: Vec<libc::mmsghdr> = (0..SLOTS).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
        h.msg_hdr.msg_iov = std::ptr::from_mut(v);
        h.msg_hdr.msg_iovlen = 1;
    }
    let fd = sock.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `hdrs` holds SLOTS headers, each pointing at its own live iovec and slot.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                SLOTS as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else { continue };
        let mut set = ids.lock().expect("ids");
        for (h, slot) in hdrs.iter().zip(bufs.chunks(SLOT)).take(n) {
            if let Some(id) = id_of(&slot[..h.msg_len as usize]) {
                set.insert(id);
            }
        }
    }
}

impl Sink for Bare {
    fn progress(&mut self) -> u64 {
        self.ids.lock().expect("ids").count
    }
    fn finish(&mut self) -> Result<u64> {
        Ok(std::mem::take(&mut *self.ids.lock().expect("ids")).count)
    }
    fn cpu(&self) -> f64 {
        cpu_of(&format!(
            "/proc/self/task/{}/stat",
            self.tid.load(Ordering::Relaxed)
        ))
    }
    fn peak_rss_mib(&self) -> Option<f64> {
        None
    }
    fn socket(&self) -> PathBuf {
        self.path.clone()
    }
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---- the agent, to the counting gRPC sink or to apm-listener ----

/// Where the agent under measurement delivers.
enum Out {
    /// `apm-bench-sink`: counts unique ids and acks, as the other sinks count (the aims' row).
    Counter {
        proc: apm_testkit::Proc,
        file: PathBuf,
        /// Unique ids counted when the current window started.
        before: u64,
        /// Windows so far: window `n` sends ids from `n << 32`, so the sink's one set of ids
        /// counts each window apart.
        windows: u64,
    },
    /// `apm-listener` validating and storing every profile to tmpfs (its own row).
    Listener {
        proc: apm_testkit::Proc,
        file: PathBuf,
        offset: u64,
        _dir: RemoveOnDrop,
    },
}

struct Agent {
    dir: PathBuf,
    proc: apm_testkit::Proc,
    out: Out,
}

/// Starts `apm-bench-sink` writing its counts to `dir/count`; the sink and its address.
fn start_counter(bin: &Path, dir: &Path) -> Result<(Out, String)> {
    let stdout = dir.join("sink.out");
    let mut proc = spawn(
        Command::new(bin.join("apm-bench-sink"))
            .arg(dir.join("count"))
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(dir.join("sink.err"))?),
        "apm-bench-sink",
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&stdout).unwrap_or_default();
        // The whole line: its address could be read half written.
        if let Some(addr) = text.strip_prefix("listening on ")
            && addr.ends_with('\n')
        {
            let addr = addr.trim().to_string();
            let out = Out::Counter {
                proc,
                file: dir.join("count"),
                before: 0,
                windows: 0,
            };
            return Ok((out, addr));
        }
        if Instant::now() > deadline || proc.child.try_wait()?.is_some() {
            bail!(
                "apm-bench-sink did not report its address: {}",
                std::fs::read_to_string(dir.join("sink.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The sink's count of unique ids (0 until its first write).
fn counted(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Agent {
    /// `nice`: an `ingest.nice` other than the default.
    fn start(root: &Path, ebpf: &str, to_listener: bool, nice: Option<i32>) -> Result<Self> {
        let bin = crate::target_dir(root).join("release");
        let dir = root.join(".run/bench-compare/agent");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run"))?;
        let (out, addr) = if to_listener {
            // tmpfs for the listener's file, as in `e2e`: the agent is measured, not the disk.
            let shm = Path::new("/dev/shm");
            let out_dir = if shm.is_dir() {
                shm.join(format!("apm-bench-compare-{}", std::process::id()))
            } else {
                dir.join("out")
            };
            std::fs::create_dir_all(&out_dir)?;
            let file = out_dir.join("profiles.jsonl");
            let (proc, addr) =
                start_listener(&bin.join("apm-listener"), &file, &dir.join("listener.log"))?;
            let out = Out::Listener {
                proc,
                file,
                offset: 0,
                _dir: RemoveOnDrop(out_dir),
            };
            (out, addr)
        } else {
            start_counter(&bin, &dir)?
        };
        let cfg = write_agent_config(
            &dir,
            &format!("http://{addr}"),
            crate::live::free_port(),
            ebpf,
        )?;
        if let Some(n) = nice {
            let text = std::fs::read_to_string(&cfg)?;
            anyhow::ensure!(
                text.contains("[ingest]\n"),
                "no [ingest] in {}",
                cfg.display()
            );
            std::fs::write(
                &cfg,
                text.replacen("[ingest]\n", &format!("[ingest]\nnice = {n}\n"), 1),
            )?;
        }
        let agent = crate::live::start_agent(&bin, &dir, &cfg)?;
        if let Some(n) = nice {
            // The row's label says this niceness: check the kernel's view of every thread.
            let nices = apm_testkit::thread_nices(agent.pid());
            anyhow::ensure!(
                nices.iter().all(|&(_, got)| got == n),
                "the agent's threads (tid, nice) {nices:?} are not all at {n}"
            );
        }
        Ok(Self {
            dir,
            proc: agent,
            out,
        })
    }
}

/// The ids the listener stored in `file` past `offset` (which moves past them), then the part
/// read is discarded: at 16 KiB a window is gigabytes of tmpfs.
fn stored_ids(file: &Path, offset: &mut u64) -> Result<u64> {
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(*offset))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut ids = Ids::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        *offset += n as u64;
        if let Some(id) = id_of(&line) {
            ids.insert(id);
        }
    }
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(file) {
        // SAFETY: FALLOC_FL_PUNCH_HOLE on our own open file; failure only keeps the pages.
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                i64::try_from(*offset).unwrap_or(0),
            );
        }
    }
    Ok(ids.count)
}

impl Sink for Agent {
    fn progress(&mut self) -> u64 {
        match &self.out {
            Out::Counter { file, .. } => counted(file),
            Out::Listener { file, .. } => std::fs::metadata(file).map_or(0, |m| m.len()),
        }
    }
    fn id_base(&mut self) -> u64 {
        match &mut self.out {
            Out::Counter { windows, .. } => {
                *windows += 1;
                *windows << 32
            }
            Out::Listener { .. } => 0,
        }
    }
    fn finish(&mut self) -> Result<u64> {
        // Ground truth: the unique ids that reached the end since the last window.
        match &mut self.out {
            Out::Counter { file, before, .. } => {
                let now = counted(file);
                Ok(now - std::mem::replace(before, now))
            }
            Out::Listener { file, offset, .. } => stored_ids(file, offset),
        }
    }
    fn cpu(&self) -> f64 {
        cpu_of(&format!("/proc/{}/stat", self.proc.pid()))
    }
    fn peak_rss_mib(&self) -> Option<f64> {
        Some(status_kib(self.proc.pid(), "VmHWM:") / 1024.0)
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("run/listener.sock")
    }
    fn stop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(30));
        match &mut self.out {
            Out::Counter { proc, .. } | Out::Listener { proc, .. } => {
                let _ = proc.terminate(Duration::from_secs(10));
            }
        }
    }
}

// ---- syslog-ng to a TCP sink ----

struct SyslogNg {
    dir: PathBuf,
    proc: apm_testkit::Proc,
    ids: Arc<Mutex<Ids>>,
    stop: Arc<AtomicBool>,
    tcp: Option<std::thread::JoinHandle<()>>,
}

/// Installs Debian's `syslog-ng-core` when it is missing, saying so.
fn ensure_syslog_ng() -> Result<PathBuf> {
    crate::setup::packages(&[(
        "syslog-ng-core",
        "the syslog-ng baseline of `cargo xtask bench --only compare`",
    )])?;
    let p = PathBuf::from("/usr/sbin/syslog-ng");
    if !p.is_file() {
        bail!(
            "{} is missing: install Debian's syslog-ng-core",
            p.display()
        );
    }
    Ok(p)
}

impl SyslogNg {
    fn start(root: &Path, bin: &Path) -> Result<Self> {
        let dir = root.join(".run/bench-compare/syslog-ng");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("buffer"))?;
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        let sock = dir.join("php.sock");
        let conf = SYSLOG_NG_CONF
            .replace("{sock}", &sock.to_string_lossy())
            .replace("{port}", &port.to_string())
            .replace("{dir}", &dir.join("buffer").to_string_lossy());
        std::fs::write(dir.join("syslog-ng.conf"), conf)?;
        let ids = Arc::new(Mutex::new(Ids::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2) = (ids.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("tcp-sink".into())
            .spawn(move || tcp_sink(&tcp, &i2, &s2))?;
        let log = dir.join("syslog-ng.log");
        let proc = with_qlen(QLEN, || {
            let mut p = spawn(
                Command::new(bin)
                    .arg("--foreground")
                    .arg("--no-caps")
                    .arg(format!(
                        "--cfgfile={}",
                        dir.join("syslog-ng.conf").display()
                    ))
                    .arg(format!("--persist-file={}", dir.join("persist").display()))
                    .arg(format!("--pidfile={}", dir.join("pid").display()))
                    .arg(format!("--control={}", dir.join("ctl").display()))
                    .stdout(std::fs::File::create(&log)?)
                    .stderr(std::fs::File::create(dir.join("syslog-ng.err"))?),
                "syslog-ng",
            )?;
            // The queue length is copied when the socket is created: wait for it.
            let deadline = Instant::now() + Duration::from_secs(20);
            while !sock.exists() {
                if Instant::now() > deadline || p.child.try_wait()?.is_some() {
                    bail!(
                        "syslog-ng did not create {}: {}",
                        sock.display(),
                        std::fs::read_to_string(dir.join("syslog-ng.err")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(p)
        })?;
        Ok(Self {
            dir,
            proc,
            ids,
            stop,
            tcp: Some(handle),
        })
    }
}

fn tcp_sink(l: &TcpListener, ids: &Mutex<Ids>, stop: &AtomicBool) {
    l.set_nonblocking(true).expect("nonblocking");
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                conns.push(BufReader::with_capacity(1 << 20, s));
            }
            Err(_) if conns.is_empty() => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => {}
        }
        // syslog-ng keeps one connection; read whichever is open (a reconnect replaces it).
        let mut line = Vec::new();
        for c in &mut conns {
            loop {
                match c.read_until(b'\n', &mut line) {
                    Ok(0) => break,
                    Ok(_) if line.last() == Some(&b'\n') => {
                        if let Some(id) = id_of(&line) {
                            ids.lock().expect("ids").insert(id);
                        }
                        line.clear();
                    }
                    // A timeout mid-line keeps the part read in `line`.
                    Ok(_) | Err(_) => break,
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
}

impl Sink for SyslogNg {
    fn progress(&mut self) -> u64 {
        self.ids.lock().expect("ids").count
    }
    fn finish(&mut self) -> Result<u64> {
        Ok(std::mem::take(&mut *self.ids.lock().expect("ids")).count)
    }
    fn cpu(&self) -> f64 {
        cpu_of(&format!("/proc/{}/stat", self.proc.pid()))
    }
    fn peak_rss_mib(&self) -> Option<f64> {
        Some(status_kib(self.proc.pid(), "VmHWM:") / 1024.0)
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("php.sock")
    }
    fn stop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(10));
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.tcp.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- the run ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bare,
    AgentOff,
    AgentOn,
    AgentNice0,
    AgentListener,
    SyslogNg,
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::Bare, "bare `recvmmsg` sink (the limit)"),
    (Kind::AgentOff, "agent, eBPF off"),
    (Kind::AgentOn, "**agent, eBPF on**"),
    (
        Kind::AgentNice0,
        "agent, eBPF on, `ingest.nice = 0` (level with the senders)",
    ),
    (
        Kind::AgentListener,
        "agent, eBPF on, to `apm-listener` storing to tmpfs",
    ),
    (Kind::SyslogNg, "syslog-ng 3.38, reliable disk buffer"),
];

/// One round's figures for one sink.
#[derive(Default, Clone, Copy)]
struct Figures {
    sat_1k: f64,
    sat_16k: f64,
    cpu: [f64; 2],
    rss_1k: Option<f64>,
    rss_16k: Option<f64>,
    /// Accepted by the socket but never delivered, over every window.
    lost: u64,
    accepted: u64,
    eagain: u64,
}

fn start_sink(root: &Path, kind: Kind, syslog: Option<&Path>) -> Result<Box<dyn Sink>> {
    Ok(match kind {
        Kind::Bare => {
            let d = std::env::temp_dir().join(format!("apm-bench-bare-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            Box::new(Bare::start(&d)?)
        }
        Kind::AgentOff => Box::new(Agent::start(root, "off", false, None)?),
        Kind::AgentOn => Box::new(Agent::start(root, "on", false, None)?),
        Kind::AgentNice0 => Box::new(Agent::start(root, "on", false, Some(0))?),
        Kind::AgentListener => Box::new(Agent::start(root, "on", true, None)?),
        Kind::SyslogNg => Box::new(SyslogNg::start(root, syslog.context("syslog-ng binary")?)?),
    })
}

/// One window: send, wait for the sink to settle, count. Returns (delivered, seconds from the
/// first send to the last delivery, sent).
fn window(sink: &mut dyn Sink, size: usize, rate: u64) -> Result<(u64, f64, Sent)> {
    let path = sink.socket();
    let base = sink.id_base();
    let t0 = Instant::now();
    let sent = send(
        &path,
        size,
        rate,
        (SAT_THREADS, base),
        if rate > 0 { PACED } else { SAT },
    )?;
    let last = settle(sink, t0);
    let delivered = sink.finish()?;
    Ok((delivered, last.as_secs_f64(), sent))
}

fn round(root: &Path, kind: Kind, syslog: Option<&Path>) -> Result<Figures> {
    let mut f = Figures::default();
    let account = |f: &mut Figures, d: u64, s: Sent| {
        f.accepted += s.ok;
        f.eagain += s.eagain;
        f.lost += s.ok.saturating_sub(d);
    };
    let mut sink = start_sink(root, kind, syslog)?;
    let r = (|| -> Result<()> {
        for (i, &rate) in RATES.iter().enumerate() {
            let cpu0 = sink.cpu();
            let (d, _, s) = window(sink.as_mut(), 1024, rate)?;
            let cpu = sink.cpu() - cpu0;
            f.cpu[i] = cpu / (d.max(1) as f64 / 100_000.0);
            account(&mut f, d, s);
            eprintln!(
                "bench:   {rate}/s: {d} delivered of {} accepted ({} EAGAIN), CPU {cpu:.2} s = {:.2} s/100k",
                s.ok, s.eagain, f.cpu[i]
            );
        }
        let (d, secs, s) = window(sink.as_mut(), 1024, 0)?;
        f.sat_1k = d as f64 / secs;
        f.rss_1k = sink.peak_rss_mib();
        account(&mut f, d, s);
        eprintln!(
            "bench:   1 KiB flat out: {d} delivered in {secs:.1} s = {:.0}/s; {} accepted, {} EAGAIN; peak RSS {:?} MiB",
            f.sat_1k, s.ok, s.eagain, f.rss_1k
        );
        Ok(())
    })();
    sink.stop();
    drop(sink);
    r?;
    let mut sink = start_sink(root, kind, syslog)?;
    let r = window(sink.as_mut(), 16 * 1024, 0);
    f.rss_16k = sink.peak_rss_mib();
    sink.stop();
    let (d, secs, s) = r?;
    f.sat_16k = d as f64 / secs;
    account(&mut f, d, s);
    eprintln!(
        "bench:   16 KiB flat out: {d} delivered in {secs:.1} s = {:.0}/s; {} accepted, {} EAGAIN; peak RSS {:?} MiB",
        f.sat_16k, s.ok, s.eagain, f.rss_16k
    );
    Ok(f)
}

/// One column's figure from a round.
type Get = fn(&Figures) -> Option<f64>;

fn med(v: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn cell(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = med(v);
    if m.is_nan() {
        return "–".into();
    }
    if v.len() > 1 {
        format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
    } else {
        format!("{m:.digits$}")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**MET**" } else { "**NOT MET**" }
}

pub fn run(root: &Path, rounds: usize, host: &str) -> Result<String> {
    let syslog = ensure_syslog_ng()?;
    let version = Command::new(&syslog)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let load_before = load();
    let started = Instant::now();
    // `APM_BENCH_COMPARE_SINKS=bare,agent-off,agent-on,agent-nice0,agent-listener,syslog-ng`
    // runs some only (to check a setup; the table then has dashes).
    let only = std::env::var("APM_BENCH_COMPARE_SINKS").unwrap_or_default();
    let names = [
        "bare",
        "agent-off",
        "agent-on",
        "agent-nice0",
        "agent-listener",
        "syslog-ng",
    ];
    let mut all: Vec<(Kind, Vec<Figures>)> = KINDS
        .iter()
        .zip(names)
        .map(|(k, _)| (k.0, Vec::new()))
        .collect();
    let picked: Vec<Kind> = KINDS
        .iter()
        .zip(names)
        .filter(|(_, n)| only.is_empty() || only.split(',').any(|o| o == *n))
        .map(|(k, _)| k.0)
        .collect();
    for r in 1..=rounds.max(1) {
        // Sinks interleaved within each round, so drift on the machine spreads over all.
        for (kind, figs) in &mut all {
            if !picked.contains(kind) {
                continue;
            }
            let label = KINDS.iter().find(|k| k.0 == *kind).map_or("", |k| k.1);
            eprintln!("bench: compare round {r}: {label} ...");
            figs.push(round(root, *kind, Some(&syslog)).with_context(|| label.to_string())?);
        }
    }
    let pick = |k: Kind| &all.iter().find(|a| a.0 == k).expect("kind").1;
    let col = |k: Kind, f: &dyn Fn(&Figures) -> Option<f64>| -> Vec<f64> {
        pick(k).iter().filter_map(f).collect()
    };
    let cols: [(&str, Get, usize); 6] = [
        ("1 KiB flat out, delivered/s", |f| Some(f.sat_1k), 0),
        ("16 KiB flat out, delivered/s", |f| Some(f.sat_16k), 0),
        ("CPU s per 100k at 1000/s (1 KiB)", |f| Some(f.cpu[0]), 2),
        ("CPU s per 100k at 5000/s (1 KiB)", |f| Some(f.cpu[1]), 2),
        ("peak RSS MiB, 1 KiB", |f| f.rss_1k, 1),
        ("peak RSS MiB, 16 KiB", |f| f.rss_16k, 1),
    ];
    let mut t = String::from("| sink |");
    for (h, _, _) in &cols {
        t.push_str(&format!(" {h} |"));
    }
    t.push_str(
        " accepted by the socket but not delivered / accepted / EAGAIN, all rounds |\n|---|",
    );
    t.push_str(&"---|".repeat(cols.len() + 1));
    t.push('\n');
    for &(kind, label) in &KINDS {
        t.push_str(&format!("| {label} |"));
        for (_, get, d) in &cols {
            t.push_str(&format!(" {} |", cell(&col(kind, get), *d)));
        }
        let sum = |g: fn(&Figures) -> u64| pick(kind).iter().map(g).sum::<u64>();
        t.push_str(&format!(
            " {} / {} / {} |\n",
            sum(|f| f.lost),
            sum(|f| f.accepted),
            sum(|f| f.eagain)
        ));
    }
    let m = |k: Kind, get: Get| med(&col(k, &get)).0;
    for (against, what) in [
        (Kind::Bare, "agent (eBPF on) / bare sink"),
        (Kind::SyslogNg, "agent (eBPF on) / syslog-ng"),
    ] {
        t.push_str(&format!("| *{what}* |"));
        for (_, get, _) in &cols {
            let (a, b) = (m(Kind::AgentOn, *get), m(against, *get));
            if a.is_nan() || b.is_nan() || b == 0.0 {
                t.push_str(" – |");
            } else {
                t.push_str(&format!(" {:.2} |", a / b));
            }
        }
        t.push_str(" |\n");
    }
    let on = |get: Get| m(Kind::AgentOn, get);
    let (s16, s1, c5) = (
        on(|f| Some(f.sat_16k)),
        on(|f| Some(f.sat_1k)),
        on(|f| Some(f.cpu[1])),
    );
    let rss = med(&col(Kind::AgentOn, &|f| f.rss_1k))
        .2
        .max(med(&col(Kind::AgentOn, &|f| f.rss_16k)).2);
    let conf = SYSLOG_NG_CONF
        .replace("{sock}", "<run dir>/php.sock")
        .replace("{dir}", "<run dir>/buffer")
        .replace("{port}", "<TCP sink port>");
    Ok(format!(
        "Measured by `cargo xtask bench --only compare` ({rounds} round(s), sinks interleaved in each \
         round; cells are medians with [min–max] over the rounds; {host}; this section took {:.0} s; \
         load average before / after: {load_before} / {}).\n\n\
         Sender (the same for every sink): non-blocking `sendto(2)` of 1 KiB or 16 KiB JSON profiles \
         with unique ids, a datagram dropped on EAGAIN as PHP does; flat out = {SAT_THREADS} threads \
         for {} s, fixed rates = one paced thread for {} s. Every sink's socket has a queue of \
         {QLEN} datagrams. Delivered = unique ids that reached the end (the bare sink's own count; \
         for the agent, the ids counted by `apm-bench-sink`, a gRPC sink that counts and acks, or \
         the ids in `apm-listener`'s file for the row that says so; the ids on syslog-ng's TCP \
         destination), per second from the first send to the last delivery. CPU = utime + stime of the sink's process (of the \
         bare sink's thread) over the window, per 100k delivered. Peak RSS = `VmHWM` of a fresh \
         process after its flat-out window (the bare sink runs inside xtask: no figure).\n\n\
         {t}\n\
         Aims (agent with eBPF on, medians; peak RSS the highest round):\n\n\
         - 16 KiB flat out ≥ 40k delivered/s: {s16:.0}/s: {}\n\
         - 1 KiB flat out ≥ 230k delivered/s: {s1:.0}/s: {}\n\
         - CPU ≤ 0.5 s per 100k at a steady 5000/s: {c5:.2} s: {}\n\
         - peak RSS ≤ 32 MiB at 1 KiB and 16 KiB: {rss:.1} MiB: {}\n\n\
         syslog-ng ({version}, Debian's `syslog-ng-core`), run as `syslog-ng --foreground --no-caps \
         --cfgfile=... --persist-file=... --pidfile=... --control=...` with:\n\n```\n{conf}```\n",
        started.elapsed().as_secs_f64(),
        load(),
        SAT.as_secs(),
        PACED.as_secs(),
        verdict(s16 >= 40_000.0),
        verdict(s1 >= 230_000.0),
        verdict(c5 <= 0.5),
        verdict(rss <= 32.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_the_profile() {
        let mut p = profile(1024);
        assert_eq!(p.len(), 1024);
        set_id(&mut p, 12_345_678_901);
        assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
        assert_eq!(id_of(&p), Some(12_345_678_901));
        let mut ids = Ids::default();
        for i in [5, 5, 700, 0] {
            ids.insert(i);
        }
        assert_eq!(ids.count, 3);
    }
}
