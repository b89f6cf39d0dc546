//! Helpers for the fault tests (`tests/tests/faults.rs`): an in-process PHP-like sender that
//! remembers which ids the kernel accepted, the listener's file read as ids, a free loopback
//! address for a listener that is down, a tmpfs mount guard, and a look into a dead agent's spool.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The exact payload of profile `i` of `prefix` (what the listener must store byte for byte).
pub fn profile_body(prefix: &str, i: u64, size: usize) -> String {
    let head = format!(r#"{{"id":"{prefix}-{i}","uri":"/t/{i}","status":200,"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// A loopback address nobody listens on (yet), reserved for this test process: connections
/// are refused until the test starts its listener there, and no other test's listener can
/// be given it (see `apm_testkit::free_port`).
pub fn free_addr() -> String {
    format!(
        "127.0.0.1:{}",
        apm_testkit::free_port().expect("bind 127.0.0.1:0")
    )
}

/// The lines of a listener's output file, parsed; a last line still being written (no `\n`)
/// is left out, so the file can be read while the listener runs.
pub fn stored_lines(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line in {}: {e}: {l}", out.display()))
        })
        .collect()
}

/// Profile ids stored in the listener's file, in file order (duplicates kept).
pub fn stored_ids(out: &Path) -> Vec<String> {
    stored_lines(out)
        .iter()
        .map(|l| {
            l["profile"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("stored line without profile.id: {l}"))
                .to_string()
        })
        .collect()
}

/// The set of stored ids; panics naming the first id stored twice.
pub fn unique_ids(ids: &[String]) -> HashSet<String> {
    let mut set = HashSet::with_capacity(ids.len());
    let mut dups: HashMap<&str, u32> = HashMap::new();
    for id in ids {
        if !set.insert(id.clone()) {
            *dups.entry(id).or_default() += 1;
        }
    }
    assert!(
        dups.is_empty(),
        "{} profiles stored more than once (e.g. {:?})",
        dups.len(),
        dups.iter().take(5).collect::<Vec<_>>()
    );
    set
}

/// Polls `f` until it returns `Some`; panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    apm_testkit::poll(timeout, f, || format!("waiting for {what}"))
}

/// Waits until the listener's file holds at least `n` lines; returns the ids.
pub fn wait_stored(out: &Path, n: usize, timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    loop {
        let ids = stored_ids(out);
        if ids.len() >= n || Instant::now() >= end {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that the stored ids are exactly `expected`, each once; the message lists a few
/// missing and unexpected ids.
pub fn assert_exactly(stored: &[String], expected: &HashSet<String>, what: &str) {
    let got = unique_ids(stored);
    let missing: Vec<&String> = expected.difference(&got).take(10).collect();
    let extra: Vec<&String> = got.difference(expected).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} expected, {} stored; missing (first 10) {missing:?}; unexpected {extra:?}",
        expected.len(),
        got.len()
    );
}

/// How the sender thread sends.
#[derive(Debug, Clone)]
pub struct SendPlan {
    pub socket: PathBuf,
    pub prefix: String,
    pub size: usize,
    /// Sends per second (0: as fast as the socket takes them).
    pub rate: u64,
    /// `MSG_DONTWAIT` (PHP's way): a full queue is EAGAIN, not a wait.
    pub nonblocking: bool,
    /// Stop after this many attempts (`u64::MAX`: until stopped).
    pub count: u64,
}

/// What a sender thread observed: the indices whose `sendto` succeeded, and failures by errno.
#[derive(Debug, Default)]
pub struct SendReport {
    pub ok: Vec<u64>,
    pub attempts: u64,
    pub errors: HashMap<i32, u64>,
}

impl SendReport {
    /// The ids the kernel accepted: the ones the agent must account for.
    pub fn ok_ids(&self, prefix: &str) -> HashSet<String> {
        self.ok.iter().map(|i| format!("{prefix}-{i}")).collect()
    }
}

/// A PHP-like sender on a thread of the test: `sendto` with the socket path per datagram (so a
/// restarted agent's new socket is picked up), recording which ids were accepted.
pub struct Sender {
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<SendReport>>,
}

impl Sender {
    pub fn start(plan: SendPlan) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let handle = std::thread::spawn(move || send_loop(&plan, &s, &a));
        Self {
            stop,
            accepted,
            handle: Some(handle),
        }
    }

    /// Stops sending and returns what was seen.
    pub fn finish(self) -> SendReport {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until `count` sends were attempted and returns what was seen.
    pub fn join(mut self) -> SendReport {
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("sender thread")
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn send_loop(plan: &SendPlan, stop: &AtomicBool, accepted: &AtomicU64) -> SendReport {
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket");
    // A blocking send must not hang the test when the agent stops reading without dying.
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let path = plan.socket.as_os_str().as_encoded_bytes();
    assert!(path.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let alen = (2 + path.len()) as libc::socklen_t;
    let flags = if plan.nonblocking {
        libc::MSG_DONTWAIT
    } else {
        0
    };
    let started = Instant::now();
    let mut r = SendReport::default();
    let mut i = 0u64;
    while i < plan.count && !stop.load(Ordering::Relaxed) {
        if plan.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / plan.rate as f64);
            if let Some(d) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(d);
            }
        }
        let body = profile_body(&plan.prefix, i, plan.size);
        // SAFETY: sendto with a valid buffer and address.
        let n = unsafe {
            libc::sendto(
                fd,
                body.as_ptr().cast(),
                body.len(),
                flags,
                (&raw const addr).cast(),
                alen,
            )
        };
        if n >= 0 {
            r.ok.push(i);
            accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            *r.errors.entry(e).or_default() += 1;
            if !plan.nonblocking && e != libc::EAGAIN {
                // No agent bound right now (killed or restarting): do not spin.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        r.attempts += 1;
        i += 1;
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    r
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts it; `None` (with the reason) when mounting is not permitted here.
    pub fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            // 0755 like a real state or spool volume: the agent refuses a directory that every
            // user may write (a bare tmpfs is 1777).
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: an agent killed by a failed assertion may still hold files open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A batch found in a spool: its record position and the ids of its profiles.
#[derive(Debug, Clone)]
pub struct SpooledRecord {
    pub segment: u64,
    pub offset: u64,
    pub seq: u64,
    pub ids: Vec<String>,
}

/// Reads what a stopped (or killed) agent left in `spool_dir` to deliver: the dir is copied and
/// the copy opened with the agent's own recovery (checksums verified, acked records left out),
/// so the original is untouched.
pub fn spool_records(spool_dir: &Path) -> Vec<SpooledRecord> {
    let copy = tempfile::tempdir().expect("tempdir");
    let dst = copy.path().join("spool");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for e in std::fs::read_dir(spool_dir).expect("read spool dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy spool file");
        }
    }
    let cfg = apm_agent::config::SpoolConfig {
        dir: dst,
        max_bytes: 1024 * 1024,
        ..Default::default()
    };
    let mut spool = apm_agent::pipeline::spool::Spool::open(&cfg).expect("open the spool copy");
    let mut out = Vec::new();
    while let Some(sb) = spool.take_next().expect("read the spool copy") {
        let ids = sb
            .batch
            .profiles
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_slice(&p.payload).expect("spooled payload is JSON");
                v["id"].as_str().expect("id").to_string()
            })
            .collect();
        out.push(SpooledRecord {
            segment: sb.id.segment,
            offset: sb.id.offset,
            seq: sb.batch.seq,
            ids,
        });
    }
    out
}

/// A log without its ANSI colour codes (the listener colours its log even into a file).
pub fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=N` in the last log line of `log` containing `marker`.
pub fn log_field(log: &str, marker: &str, key: &str) -> Option<u64> {
    let log = strip_ansi(log);
    let line = log.lines().rev().find(|l| l.contains(marker))?;
    let pat = format!("{key}=");
    let i = line.find(&pat)? + pat.len();
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
