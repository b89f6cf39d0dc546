//! Overhead of the eBPF monitor on PHP's sends: a benchmark, not a test (nothing here asserts
//! on time). `cargo xtask bench` runs it and turns its JSON into docs/BENCHMARKS.md.
//!
//! What is timed: 1 KiB non-blocking `sendto(2)` (`MSG_DONTWAIT`, a `sockaddr_un` with
//! `addrlen = 2 + strlen(path)`, as PHP's `socket_sendto`) on a Unix datagram socket, N calls
//! in a sender process: its CPU time (what the syscall and the programs running inside it
//! cost; other processes on a shared machine do not inflate it) and its wall time, each
//! divided by N. Two sender processes live for the whole
//! run: one named like a PHP-FPM worker (`php-fpm-bench`), one not (`bench-other`), both
//! re-executions of this binary (`apm-bench-ebpf sender ...`) so each has its own comm.
//!
//! Configurations, interleaved over rounds (each round starts at a different one):
//! - `none`: nothing attached;
//! - `noop`: the object's empty programs on `sys_enter_sendto`/`sys_exit_sendto`;
//! - `agent`: every program, attached and configured by `apm_agent::monitor::start` with the
//!   default `[ebpf]` settings, its poller running, as in the agent;
//! - `bpftrace`: Debian's bpftrace doing the same counting as the agent on that path (the comm
//!   filter, the `addr_len` bound, the path compare, `@start[tid]`, and per process: ok count,
//!   bytes sum, count per errno, latency sum; a log2 latency histogram with `hist()`);
//! - `bpftrace_min`: the minimal script of `notes/ebpf-feasibility.md` (no comm filter; host
//!   totals of ok/EAGAIN/other and the latency sum only), kept for transparency;
//!
//! each bpftrace configuration is measured only once it counted a canary send of the PHP
//! sender.
//!
//! Modes: `full` (nobody reads the socket: after the first few sends every call is EAGAIN, the
//! path of a PHP drop) and `drain` (a receiver thread reads as fast as it can).
//!
//! After each attached configuration the kernel-side counts are checked against what the
//! senders saw (reported, not asserted). Output: JSON on stdout, progress on stderr.
//!
//! apm-bench-ebpf [--count N (1000000)] [--rounds R (9)] [--warmup N (20000)] [--bpftrace PATH|none]
//!
//! `--write` measures instead what the `write` programs cost writes that are not to the agent
//! (every `write(2)` on the host fires `sys_enter_write`/`sys_exit_write`): two long-lived
//! writer processes (`bench-other`, not PHP; `php-fpm-bench`, a PHP name) each make N 64-byte
//! `write(2)`s to a pipe that a second thread of the same process drains, under `none`, `noop`
//! (the object's empty programs attached to the write tracepoints) and `agent`, interleaved
//! over rounds as above, plus `noop_sendto` (the empty programs on the sendto tracepoints only,
//! none on write), then the kernel's run-time statistics of the programs on the write
//! path. Output: the same JSON shape (`samples`, `kernel_stats`), mode `pipe`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apm_agent::config::{EbpfConfig, EbpfEnabled};
use apm_agent::monitor::{self, CancellationToken, Monitor, MonitorParams};
use apm_agent::phpctl::PhpControl;
use apm_agent::telemetry::Telemetry;
use serde_json::{Value, json};

const PAYLOAD: usize = 1024;
const PHP_COMM: &str = "php-fpm-bench";
const OTHER_COMM: &str = "bench-other";

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("writer") {
        let comm = arg(&args, "--comm").context("--comm")?;
        return writer_main(&comm);
    }
    if args.get(1).map(String::as_str) == Some("sender") {
        let comm = arg(&args, "--comm").context("--comm")?;
        let socket = arg(&args, "--socket").context("--socket")?;
        return sender_main(&comm, &socket);
    }
    let count: u64 = arg(&args, "--count").map_or(Ok(1_000_000), |v| v.parse())?;
    let rounds: usize = arg(&args, "--rounds").map_or(Ok(9), |v| v.parse())?;
    let warmup: u64 = arg(&args, "--warmup").map_or(Ok(20_000), |v| v.parse())?;
    let bpftrace = match arg(&args, "--bpftrace").as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from("bpftrace")),
    };
    let stats = !args.iter().any(|a| a == "--no-kernel-stats");
    if args.iter().any(|a| a == "--write") {
        let out = bench_write(count, rounds, warmup, stats)?;
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let out = bench(count, rounds, warmup, bpftrace.as_deref(), stats)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sender child: obeys `send N` lines on stdin, answers `elapsed_ns ok eagain other_errors`.

fn sender_main(comm: &str, socket: &str) -> Result<()> {
    let c = std::ffi::CString::new(comm)?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path.iter_mut().zip(socket.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let alen = (2 + socket.len()) as libc::socklen_t;
    let payload = [b'x'; PAYLOAD];
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let Some(n) = line.strip_prefix("send ") else {
            break;
        };
        let n: u64 = n.trim().parse()?;
        let (mut ok, mut eagain, mut other) = (0u64, 0u64, 0u64);
        let c = thread_cpu_ns();
        let t = Instant::now();
        for _ in 0..n {
            // SAFETY: valid buffer and address for the lengths given.
            let r = unsafe {
                libc::sendto(
                    fd,
                    payload.as_ptr().cast(),
                    PAYLOAD,
                    libc::MSG_DONTWAIT,
                    (&raw const addr).cast(),
                    alen,
                )
            };
            if r >= 0 {
                ok += 1;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                eagain += 1;
            } else {
                other += 1;
            }
        }
        let ns = t.elapsed().as_nanos();
        let cpu = thread_cpu_ns() - c;
        writeln!(stdout, "{ns} {cpu} {ok} {eagain} {other}")?;
        stdout.flush()?;
    }
    Ok(())
}

/// Bytes per `write(2)` of the `--write` bench: a log line, a small FastCGI record.
const WRITE_BYTES: usize = 64;

/// Writer child of `--write`: obeys `send N` lines on stdin with N `write(2)`s of
/// `WRITE_BYTES` to a blocking pipe that a second thread drains, and answers like a sender.
fn writer_main(comm: &str) -> Result<()> {
    let c = std::ffi::CString::new(comm)?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    let (r, w) = nix::unistd::pipe()?;
    // The drain thread inherits the comm set above, as a PHP worker's threads would.
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while nix::unistd::read(&r, &mut buf).is_ok_and(|n| n > 0) {}
    });
    let wfd = std::os::fd::AsRawFd::as_raw_fd(&w);
    let payload = [b'x'; WRITE_BYTES];
    let mut stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let Some(n) = line.strip_prefix("send ") else {
            break;
        };
        let n: u64 = n.trim().parse()?;
        let (mut ok, mut other) = (0u64, 0u64);
        let c = thread_cpu_ns();
        let t = Instant::now();
        for _ in 0..n {
            // SAFETY: valid buffer of the length given; raw write(2), as a C program's.
            let r = unsafe { libc::write(wfd, payload.as_ptr().cast(), WRITE_BYTES) };
            if r >= 0 {
                ok += 1;
            } else {
                other += 1;
            }
        }
        let ns = t.elapsed().as_nanos();
        let cpu = thread_cpu_ns() - c;
        writeln!(stdout, "{ns} {cpu} {ok} 0 {other}")?;
        stdout.flush()?;
    }
    Ok(())
}

/// CPU time of the calling thread (user + system, eBPF programs included: they run in the
/// sender's syscalls), which other processes on the machine do not inflate.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

struct Sender {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Calls made since the last `take_sent`.
    sent: u64,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    ns: u128,
    cpu_ns: u128,
    ok: u64,
    eagain: u64,
    other: u64,
}

impl Sender {
    fn spawn(name: &'static str, comm: &str, socket: &Path) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["sender", "--comm", comm, "--socket"]).arg(socket);
        Self::spawn_cmd(name, cmd)
    }

    fn spawn_writer(name: &'static str, comm: &str) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["writer", "--comm", comm]);
        Self::spawn_cmd(name, cmd)
    }

    fn spawn_cmd(name: &'static str, mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning a sender")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            name,
            child,
            stdin,
            stdout,
            sent: 0,
        })
    }

    fn send(&mut self, n: u64) -> Result<Run> {
        writeln!(self.stdin, "send {n}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: Vec<u128> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("sender {} answered {line:?}", self.name))?;
        let [ns, cpu_ns, ok, eagain, other] = v[..] else {
            bail!("sender {} answered {line:?}", self.name);
        };
        self.sent += n;
        Ok(Run {
            ns,
            cpu_ns,
            ok: ok as u64,
            eagain: eagain as u64,
            other: other as u64,
        })
    }

    fn take_sent(&mut self) -> u64 {
        std::mem::take(&mut self.sent)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    Noop,
    /// `--write` only: the empty programs on the sendto tracepoints, none on write.
    NoopSendto,
    Agent,
    Bpftrace,
    BpftraceMin,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Noop => "noop",
            Config::NoopSendto => "noop_sendto",
            Config::Agent => "agent",
            Config::Bpftrace => "bpftrace",
            Config::BpftraceMin => "bpftrace_min",
        }
    }
}

enum Attached {
    None,
    Noop(aya::Ebpf),
    Agent(AgentMonitor),
    Bpftrace(Bpftrace, Config),
}

struct AgentMonitor {
    monitor: Monitor,
    shutdown: CancellationToken,
}

fn attach_noop() -> Result<aya::Ebpf> {
    attach_noop_on(monitor::NOOP_PROGRAMS)
}

/// The object's empty programs on the write tracepoints: the same two empty programs (their
/// bytecode does not depend on the tracepoint), attached to `sys_{enter,exit}_write`.
const NOOP_WRITE: &[(&str, &str, &str)] = &[
    ("noop_enter_sendto", "syscalls", "sys_enter_write"),
    ("noop_exit_sendto", "syscalls", "sys_exit_write"),
];

fn attach_noop_on(programs: &[(&str, &str, &str)]) -> Result<aya::Ebpf> {
    let obj = monitor::embedded_object().context("built without the eBPF object")?;
    monitor::ensure_tracefs()?;
    let mut bpf = aya::EbpfLoader::new().load(obj)?;
    for &(name, category, tp) in programs {
        let p: &mut aya::programs::TracePoint = bpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        p.load()?;
        p.attach(category, tp)?;
    }
    Ok(bpf)
}

fn attach_agent(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    dgram: &Path,
    stream: &Path,
) -> Result<AgentMonitor> {
    let shutdown = CancellationToken::new();
    let params = MonitorParams {
        cfg: EbpfConfig {
            enabled: EbpfEnabled::On,
            ..EbpfConfig::default()
        },
        dgram_socket: dgram.to_path_buf(),
        stream_socket: stream.to_path_buf(),
        telemetry: Telemetry::new(),
        php: Arc::new(PhpControl::new(dir)?),
    };
    let monitor = rt.block_on(monitor::start(params, shutdown.clone()))?;
    Ok(AgentMonitor { monitor, shutdown })
}

/// Kernel-seen datagram sends (all outcomes) of the running monitor, once a poll has seen at
/// least `want` (or after 5 s).
fn agent_counted(m: &Monitor, want: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = m.status();
        let n = s.dgram.ok + s.dgram.failed.total();
        if n >= want || Instant::now() > end {
            // One more poll, so a count above `want` would show too.
            std::thread::sleep(Duration::from_millis(1100));
            let s = m.status();
            return s.dgram.ok + s.dgram.failed.total();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Bpftrace {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
    /// Canary sends made by the PHP sender before measuring (bpftrace counts them too).
    canaries: u64,
}

/// The comm prefixes the agent's programs check (its default `ebpf.php_comms`, less the ones
/// another covers, as the loader does).
fn php_prefixes() -> Vec<String> {
    let mut comms = EbpfConfig::default().php_comms;
    comms.sort_by_key(String::len);
    let mut kept: Vec<String> = Vec::new();
    for c in comms {
        if !kept.iter().any(|k| c.starts_with(k.as_str())) {
            kept.push(c);
        }
    }
    kept
}

/// What the agent's `enter_sendto`/`exit_sendto` count for a datagram send, as a bpftrace
/// script: the same filters in the same order (address length, comm prefix, path compare), the
/// start time by thread, and per process the ok count, the bytes sum, a count per errno and the
/// latency sum, plus the host's log2 latency histogram. (The agent also keeps the socket kind,
/// host totals and per-connection stream waits; the script leaves those out.) bpftrace 0.17
/// cannot `str()` a `char[108]`; comparing the member works (with an "Addrspace mismatch"
/// warning).
fn bpftrace_script(path: &str) -> String {
    let min_len = 2 + path.len();
    let comm = php_prefixes()
        .iter()
        .map(|c| format!("strncmp(comm, \"{c}\", {}) == 0", c.len()))
        .collect::<Vec<_>>()
        .join(" || ");
    format!(
        r#"tracepoint:syscalls:sys_enter_sendto
/args->addr != 0 && args->addr_len >= {min_len} && args->addr_len <= 110 && ({comm})/
{{
  $sa = (struct sockaddr_un *)args->addr;
  if ($sa->sun_family == 1 && $sa->sun_path == "{path}") {{
    @start[tid] = nsecs;
  }}
}}

tracepoint:syscalls:sys_exit_sendto
/@start[tid]/
{{
  $lat = nsecs - @start[tid];
  delete(@start[tid]);
  @lat_hist = hist($lat);
  @lat_ns[pid] = sum($lat);
  if (args->ret >= 0) {{
    @ok[pid] = count();
    @bytes[pid] = sum(args->ret);
  }} else {{
    @err[pid, -args->ret] = count();
  }}
}}
"#
    )
}

/// The minimal script of `notes/ebpf-feasibility.md`: path compare with the `addr_len` bound,
/// `@start[tid]`, host-wide ok/EAGAIN/other counts and latency sum; no comm filter.
fn bpftrace_min_script(path: &str) -> String {
    let min_len = 2 + path.len();
    format!(
        r#"tracepoint:syscalls:sys_enter_sendto
/args->addr != 0 && args->addr_len >= {min_len}/
{{
  $sa = (struct sockaddr_un *)args->addr;
  if ($sa->sun_family == 1 && $sa->sun_path == "{path}") {{
    @start[tid] = nsecs;
  }}
}}

tracepoint:syscalls:sys_exit_sendto
/@start[tid]/
{{
  $lat = nsecs - @start[tid];
  delete(@start[tid]);
  @lat_ns = sum($lat);
  if (args->ret >= 0) {{ @ok = count(); }}
  else if (args->ret == -11) {{ @eagain = count(); }}
  else {{ @err = count(); }}
}}
"#
    )
}

/// `@name: N` or `@name[keys]: N` lines of a bpftrace map print.
fn bt_value(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?;
    let rest = match rest.strip_prefix('[') {
        Some(r) => &r[r.find(']')? + 1..],
        None => rest,
    };
    rest.strip_prefix(": ")?.trim().parse().ok()
}

/// Sends counted (ok + every error) in one print of the maps: the sum over every key.
fn bt_counts(lines: &[String]) -> u64 {
    ["@ok", "@eagain", "@err"]
        .iter()
        .map(|name| lines.iter().filter_map(|l| bt_value(l, name)).sum::<u64>())
        .sum()
}

fn attach_bpftrace(
    bin: &Path,
    script_text: &str,
    dir: &Path,
    php: &mut Sender,
) -> Result<Bpftrace> {
    let script = dir.join("count_sends.bt");
    std::fs::write(&script, script_text)?;
    let mut child = Command::new(bin)
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let out = child.stdout.take().context("stdout")?;
    let err = child.stderr.take().context("stderr")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
        s
    });
    let mut bt = Bpftrace {
        child,
        lines,
        stderr,
        canaries: 0,
    };
    // "Attaching N probes..." comes before the attach, and BEGIN runs before the probes are
    // attached: only a counted send proves both programs are in place.
    // SIGUSR1 (print the maps) kills bpftrace before it installs its handler, which it has
    // done once it says it is attaching.
    let end = Instant::now() + Duration::from_mins(1);
    loop {
        match bt.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("Attaching") => break,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = bt.child.wait();
                let e = bt.stderr.join().unwrap_or_default();
                bail!("bpftrace failed: {e}");
            }
        }
        if Instant::now() > end {
            bail!("bpftrace did not start attaching within 60 s");
        }
    }
    loop {
        if let Some(st) = bt.child.try_wait()? {
            let e = bt.stderr.join().unwrap_or_default();
            bail!("bpftrace exited ({st}): {e}");
        }
        if Instant::now() > end {
            bail!("bpftrace did not count a canary send within 60 s");
        }
        // From the PHP sender: the full script counts PHP processes only.
        php.send(1)?;
        bt.canaries += 1;
        let pid = nix::unistd::Pid::from_raw(bt.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1);
        let mut got = Vec::new();
        let t = Instant::now() + Duration::from_millis(300);
        while let Ok(l) = bt
            .lines
            .recv_timeout(t.saturating_duration_since(Instant::now()))
        {
            got.push(l);
        }
        if bt_counts(&got) > 0 {
            break;
        }
    }
    Ok(bt)
}

/// Stops bpftrace and returns the sends it counted.
fn detach_bpftrace(mut bt: Bpftrace) -> Result<u64> {
    let pid = nix::unistd::Pid::from_raw(bt.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    bt.child.wait()?;
    let lines: Vec<String> = bt.lines.try_iter().collect();
    Ok(bt_counts(&lines))
}

// ---------------------------------------------------------------------------------------------
// The run

/// Creates the datagram socket; nobody reads it unless a `Drain` runs.
fn bind(path: &Path) -> Result<Arc<UnixDatagram>> {
    let s = UnixDatagram::bind(path).with_context(|| format!("bind {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(Arc::new(s))
}

/// A receiver thread reading as fast as it can while it lives.
struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drain {
    fn start(sock: &Arc<UnixDatagram>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (sock.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let _ = s.recv(&mut buf);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bench(
    count: u64,
    rounds: usize,
    warmup: u64,
    bpftrace: Option<&Path>,
    stats: bool,
) -> Result<Value> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (loads eBPF programs)");
    }
    if monitor::embedded_object().is_none() {
        bail!(
            "this build has no eBPF object: run `cargo xtask build-ebpf`, then build with \
             APM_EBPF_OBJECT set"
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("apm-bench-ebpf-")
        .tempdir_in("/tmp")?;
    let dgram = dir.path().join("listener.sock");
    let stream = dir.path().join("listener-stream.sock");
    let sock = bind(&dgram)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let bpftrace_version = bpftrace.and_then(|b| {
        let o = Command::new(b).arg("--version").output().ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    let mut configs = vec![Config::None, Config::Noop, Config::Agent];
    if bpftrace_version.is_some() {
        configs.push(Config::Bpftrace);
        configs.push(Config::BpftraceMin);
    }
    let mut php = Sender::spawn("php", PHP_COMM, &dgram)?;
    let mut other = Sender::spawn("other", OTHER_COMM, &dgram)?;

    let mut samples = Vec::new();
    let mut checks = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let mut order = configs.clone();
        order.rotate_left(round % configs.len());
        for &cfg in &order {
            eprintln!(
                "[{:>4.0}s] round {}/{rounds}: {}",
                started.elapsed().as_secs_f64(),
                round + 1,
                cfg.name()
            );
            let attached = attach(cfg, &rt, dir.path(), &dgram, &stream, bpftrace, &mut php)?;
            // Let attach-time work (verifier, bpftrace's compiler) settle.
            std::thread::sleep(Duration::from_millis(500));
            php.take_sent();
            other.take_sent();
            // The minimal bpftrace script has no comm filter (the notes' shape): only the PHP
            // sender is measured under it.
            let senders: &[&str] = if cfg == Config::BpftraceMin {
                &["php"]
            } else {
                &["php", "other"]
            };
            for &who in senders {
                for mode in ["full", "drain"] {
                    let s = if who == "php" { &mut php } else { &mut other };
                    let drain = (mode == "drain").then(|| Drain::start(&sock));
                    s.send(warmup)?;
                    let r = s.send(count)?;
                    drop(drain);
                    let wall = r.ns as f64 / count as f64;
                    let cpu = r.cpu_ns as f64 / count as f64;
                    eprintln!(
                        "    {who:<5} {mode:<5} cpu {cpu:>6.0} wall {wall:>6.0} ns/call  \
                         (ok {}, eagain {}, other {})",
                        r.ok, r.eagain, r.other
                    );
                    samples.push(json!({
                        "round": round, "config": cfg.name(), "sender": who, "mode": mode,
                        "cpu_ns_per_call": cpu, "wall_ns_per_call": wall,
                        "ok": r.ok, "eagain": r.eagain, "other": r.other,
                    }));
                }
            }
            let php_sent = php.take_sent();
            let other_sent = other.take_sent();
            if let Some(mut c) = detach(attached, &rt, php_sent)? {
                c["round"] = json!(round);
                c["other_sends"] = json!(other_sent);
                checks.push(c);
            }
        }
    }

    // In-kernel time of the attached programs per send, from the kernel's own BPF run-time
    // statistics (BPF_ENABLE_STATS, on only for this phase: its accounting adds to every
    // program run, so the timed rounds above run without it).
    let mut kernel = Vec::new();
    if stats {
        match enable_bpf_stats() {
            Err(e) => eprintln!("kernel statistics unavailable: {e}"),
            Ok(_guard) => {
                for &cfg in configs.iter().filter(|&&c| c != Config::None) {
                    eprintln!(
                        "[{:>4.0}s] kernel statistics: {}",
                        started.elapsed().as_secs_f64(),
                        cfg.name()
                    );
                    let before = tracepoint_programs();
                    let attached =
                        attach(cfg, &rt, dir.path(), &dgram, &stream, bpftrace, &mut php)?;
                    let ours: Vec<(u32, String)> = tracepoint_programs()
                        .into_iter()
                        .filter(|p| !before.contains(p))
                        .collect();
                    std::thread::sleep(Duration::from_millis(500));
                    let senders: &[&str] = if cfg == Config::BpftraceMin {
                        &["php"]
                    } else {
                        &["php", "other"]
                    };
                    for &who in senders {
                        let s = if who == "php" { &mut php } else { &mut other };
                        s.send(warmup)?;
                        let t0 = run_stats(&ours);
                        s.send(count)?;
                        let t1 = run_stats(&ours);
                        let mut progs = serde_json::Map::new();
                        let mut total = 0u64;
                        for (id, name) in &ours {
                            let (Some(a), Some(b)) = (t0.get(id), t1.get(id)) else {
                                continue;
                            };
                            let (dt, dn) = (b.0 - a.0, b.1 - a.1);
                            if dn == 0 {
                                continue;
                            }
                            // Only the programs on the sendto path make up the cost of a send
                            // (the others run for other processes' events meanwhile).
                            if name.contains("send") {
                                total += dt;
                            }
                            progs.insert(
                                name.clone(),
                                json!({"runs": dn, "ns_per_run": dt as f64 / dn as f64}),
                            );
                        }
                        let per_send = total as f64 / count as f64;
                        eprintln!(
                            "    {who:<5} full  in-kernel {per_send:>5.0} ns/send {}",
                            Value::Object(progs.clone())
                        );
                        kernel.push(json!({
                            "config": cfg.name(), "sender": who, "mode": "full",
                            "ns_per_send": per_send, "programs": progs,
                        }));
                    }
                    php.take_sent();
                    other.take_sent();
                    detach(attached, &rt, 0)?;
                }
            }
        }
    }
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(json!({
        "count": count,
        "warmup": warmup,
        "rounds": rounds,
        "payload_bytes": PAYLOAD,
        "php_comm": PHP_COMM,
        "other_comm": OTHER_COMM,
        "kernel": osrelease.trim(),
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "bpftrace": bpftrace_version,
        "bpftrace_script": bpftrace_script(&dgram.to_string_lossy()),
        "bpftrace_min_script": bpftrace_min_script(&dgram.to_string_lossy()),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "samples": samples,
        "checks": checks,
        "kernel_stats": kernel,
    }))
}

/// The `--write` bench (see the module comment).
fn bench_write(count: u64, rounds: usize, warmup: u64, stats: bool) -> Result<Value> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (loads eBPF programs)");
    }
    if monitor::embedded_object().is_none() {
        bail!(
            "this build has no eBPF object: run `cargo xtask build-ebpf`, then build with \
             APM_EBPF_OBJECT set"
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("apm-bench-ebpf-")
        .tempdir_in("/tmp")?;
    // The agent's sockets exist but nobody writes to them: no write here is the agent's.
    let dgram = dir.path().join("listener.sock");
    let stream = dir.path().join("listener-stream.sock");
    let _sock = bind(&dgram)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let attach_w = |cfg: Config| -> Result<Attached> {
        Ok(match cfg {
            Config::Noop => Attached::Noop(attach_noop_on(NOOP_WRITE)?),
            Config::NoopSendto => Attached::Noop(attach_noop()?),
            Config::Agent => Attached::Agent(attach_agent(&rt, dir.path(), &dgram, &stream)?),
            _ => Attached::None,
        })
    };
    // `noop_sendto`: any enabled syscall tracepoint sends every task's syscalls through the
    // kernel's slower tracing entry, so the agent's writes pay that even without write programs;
    // this configuration separates that from what programs on write add.
    let configs = [
        Config::None,
        Config::NoopSendto,
        Config::Noop,
        Config::Agent,
    ];
    let mut other = Sender::spawn_writer("other", OTHER_COMM)?;
    let mut php = Sender::spawn_writer("php", PHP_COMM)?;
    let mut samples = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let mut order = configs.to_vec();
        order.rotate_left(round % configs.len());
        for &cfg in &order {
            eprintln!(
                "[{:>4.0}s] write round {}/{rounds}: {}",
                started.elapsed().as_secs_f64(),
                round + 1,
                cfg.name()
            );
            let attached = attach_w(cfg)?;
            std::thread::sleep(Duration::from_millis(300));
            for who in ["other", "php"] {
                let s = if who == "php" { &mut php } else { &mut other };
                s.send(warmup)?;
                let r = s.send(count)?;
                let wall = r.ns as f64 / count as f64;
                let cpu = r.cpu_ns as f64 / count as f64;
                eprintln!(
                    "    {who:<5} pipe  cpu {cpu:>6.0} wall {wall:>6.0} ns/write  (ok {}, failed {})",
                    r.ok, r.other
                );
                samples.push(json!({
                    "round": round, "config": cfg.name(), "sender": who, "mode": "pipe",
                    "cpu_ns_per_call": cpu, "wall_ns_per_call": wall,
                    "ok": r.ok, "eagain": r.eagain, "other": r.other,
                }));
            }
            detach(attached, &rt, 0)?;
        }
    }
    let mut kernel = Vec::new();
    if stats {
        match enable_bpf_stats() {
            Err(e) => eprintln!("kernel statistics unavailable: {e}"),
            Ok(_guard) => {
                for cfg in [Config::Noop, Config::Agent] {
                    let before = tracepoint_programs();
                    let attached = attach_w(cfg)?;
                    let ours: Vec<(u32, String)> = tracepoint_programs()
                        .into_iter()
                        .filter(|p| !before.contains(p))
                        .collect();
                    std::thread::sleep(Duration::from_millis(300));
                    for who in ["other", "php"] {
                        let s = if who == "php" { &mut php } else { &mut other };
                        s.send(warmup)?;
                        let t0 = run_stats(&ours);
                        s.send(count)?;
                        let t1 = run_stats(&ours);
                        let mut progs = serde_json::Map::new();
                        let mut total = 0u64;
                        for (id, name) in &ours {
                            let (Some(a), Some(b)) = (t0.get(id), t1.get(id)) else {
                                continue;
                            };
                            let (dt, dn) = (b.0 - a.0, b.1 - a.1);
                            if dn == 0 {
                                continue;
                            }
                            // The programs on the write path (the empty ones only sit there).
                            if name.contains("write") || cfg == Config::Noop {
                                total += dt;
                            }
                            progs.insert(
                                name.clone(),
                                json!({"runs": dn, "ns_per_run": dt as f64 / dn as f64}),
                            );
                        }
                        let per = total as f64 / count as f64;
                        eprintln!(
                            "    {who:<5} pipe  in-kernel {per:>5.0} ns/write {}",
                            Value::Object(progs.clone())
                        );
                        kernel.push(json!({
                            "config": cfg.name(), "sender": who, "mode": "pipe",
                            "ns_per_send": per, "programs": progs,
                        }));
                    }
                    detach(attached, &rt, 0)?;
                }
            }
        }
    }
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(json!({
        "bench": "write",
        "count": count,
        "warmup": warmup,
        "rounds": rounds,
        "write_bytes": WRITE_BYTES,
        "php_comm": PHP_COMM,
        "other_comm": OTHER_COMM,
        "kernel": osrelease.trim(),
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "samples": samples,
        "kernel_stats": kernel,
    }))
}

fn attach(
    cfg: Config,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    dgram: &Path,
    stream: &Path,
    bpftrace: Option<&Path>,
    php: &mut Sender,
) -> Result<Attached> {
    let script = |p: &Path| -> Result<String> {
        let p = p.to_str().context("socket path")?;
        Ok(match cfg {
            Config::BpftraceMin => bpftrace_min_script(p),
            _ => bpftrace_script(p),
        })
    };
    Ok(match cfg {
        Config::None => Attached::None,
        Config::Noop | Config::NoopSendto => Attached::Noop(attach_noop()?),
        Config::Agent => Attached::Agent(attach_agent(rt, dir, dgram, stream)?),
        Config::Bpftrace | Config::BpftraceMin => Attached::Bpftrace(
            attach_bpftrace(bpftrace.context("bpftrace")?, &script(dgram)?, dir, php)?,
            cfg,
        ),
    })
}

/// Detaches; for the counting configurations, what they counted against `php_sent` (the PHP
/// sender's calls while attached; 0: no check).
fn detach(a: Attached, rt: &tokio::runtime::Runtime, php_sent: u64) -> Result<Option<Value>> {
    Ok(match a {
        Attached::None => None,
        Attached::Noop(bpf) => {
            drop(bpf);
            None
        }
        Attached::Agent(a) => {
            let counted = if php_sent > 0 {
                agent_counted(&a.monitor, php_sent)
            } else {
                0
            };
            a.shutdown.cancel();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), a.monitor.join()).await
            })
            .ok();
            Some(json!({"config": "agent", "php_sends": php_sent, "counted": counted}))
        }
        Attached::Bpftrace(bt, cfg) => {
            let canaries = bt.canaries;
            let counted = detach_bpftrace(bt)?;
            Some(json!({
                "config": cfg.name(), "php_sends": php_sent,
                "canary_sends": canaries, "counted": counted,
            }))
        }
    })
}

/// Turns on the kernel's BPF run-time statistics for as long as the returned fd lives.
fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }, BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 4];
    // SAFETY: a zeroed bpf_attr of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned from here on.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Loaded tracepoint programs: (id, name).
fn tracepoint_programs() -> Vec<(u32, String)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| format!("{:?}", p.program_type()) == "BPF_PROG_TYPE_TRACEPOINT")
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_string()))
        .collect()
}

/// (run_time_ns, run_cnt) of programs by id, from their fdinfo.
fn run_stats(progs: &[(u32, String)]) -> std::collections::HashMap<u32, (u64, u64)> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut m = std::collections::HashMap::new();
    for (id, _) in progs {
        let Some(p) = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == *id)
        else {
            continue;
        };
        let Ok(fd) = p.fd() else { continue };
        let raw = fd.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).unwrap_or_default();
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        m.insert(*id, (get("run_time_ns:"), get("run_cnt:")));
    }
    m
}
