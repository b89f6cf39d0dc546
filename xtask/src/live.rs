//! `cargo xtask run`: the reference listener and the agent with a config under `.run/`, a load
//! (the real PHP-FPM demo when PHP-FPM is installed, a synthetic PHP-like sender otherwise),
//! and a live line of figures every second until Ctrl-C, then a summary that checks the
//! listener stored every profile the agent received.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use apm_testkit::{Proc, Status};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Synthetic profiles per second (when not running the PHP-FPM demo).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Use the synthetic sender even when PHP-FPM is installed.
    #[arg(long)]
    synthetic: bool,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Run the agent without eBPF.
    #[arg(long)]
    no_ebpf: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Spawns in its own process group, so the terminal's Ctrl-C reaches only xtask, which then
/// stops the children in order.
pub fn spawn(cmd: &mut Command, name: &'static str) -> Result<Proc> {
    Ok(Proc::spawn_group(name, cmd)?)
}

/// Starts `apm-listener` on a free loopback port and returns it with its address.
pub fn start_listener(bin: &Path, out: &Path, log: &Path) -> Result<(Proc, String)> {
    start_listener_at(bin, out, log, "127.0.0.1:0")
}

/// Starts `apm-listener` on `listen` (`127.0.0.1:0`: a free port) and returns it with its
/// address.
pub fn start_listener_at(
    bin: &Path,
    out: &Path,
    log: &Path,
    listen: &str,
) -> Result<(Proc, String)> {
    let mut g = spawn(
        Command::new(bin)
            .args(["--listen", listen, "--out"])
            .arg(out)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?),
        "apm-listener",
    )?;
    let stdout = g.child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(i) = l.find("listening on ") {
                    let addr = l[i + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    // Keep draining its stdout so it never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines.by_ref() {});
                    return Ok((g, addr));
                }
            }
            _ => break,
        }
    }
    bail!(
        "apm-listener did not report its address; see {}",
        log.display()
    )
}

/// A loopback port that was free a moment ago (see `apm_testkit::free_port`).
pub fn free_port() -> u16 {
    apm_testkit::free_port().unwrap_or(9464)
}

/// Writes an agent config whose every path is under `dir`.
pub fn write_agent_config(
    dir: &Path,
    endpoint: &str,
    metrics_port: u16,
    ebpf: &str,
) -> Result<PathBuf> {
    let d = dir.display();
    let cfg = format!(
        r#"# Written by `cargo xtask run`: every path under {d}.
[ingest]
socket = "{d}/run/listener.sock"
stream_socket = "{d}/run/listener-stream.sock"

[central]
endpoint = "{endpoint}"

[spool]
dir = "{d}/spool"
max_bytes = 268435456

[ebpf]
enabled = "{ebpf}"

[control]
runtime_dir = "{d}/run"
state_dir = "{d}/state"
pid_file = "{d}/run/agent.pid"
metrics_listen = "127.0.0.1:{metrics_port}"
"#
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Starts `bin/apm-agent` with `cfg`, its stderr in `dir/agent.log`, and waits until it answers
/// on `dir/run` (every benchmark and `cargo xtask run` start it this way).
pub fn start_agent(bin: &Path, dir: &Path, cfg: &Path) -> Result<Proc> {
    let log = dir.join("agent.log");
    let mut agent = spawn(
        Command::new(bin.join("apm-agent"))
            .arg("--config")
            .arg(cfg)
            .arg("run")
            .stderr(std::fs::File::create(&log)?),
        "apm-agent",
    )?;
    wait_ready(&dir.join("run"), &mut agent, &log)?;
    Ok(agent)
}

/// The agent's status, typed (`None` while it does not answer).
pub fn control_status(runtime_dir: &Path) -> Option<Status> {
    apm_testkit::status(runtime_dir)
}

pub fn wait_ready(runtime_dir: &Path, agent: &mut Proc, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let me = agent.pid();
    while Instant::now() < deadline {
        if let Some(s) = control_status(runtime_dir) {
            let pid = s.pid;
            if pid == me {
                return Ok(());
            }
            if let Ok(Some(_)) = agent.child.try_wait() {
                bail!(
                    "another agent (PID {pid}) already runs on {}: stop it first (another `cargo xtask run`?)",
                    runtime_dir.display()
                );
            }
        }
        if let Ok(Some(st)) = agent.child.try_wait() {
            bail!(
                "the agent exited ({st}) before it was ready; its log {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent was not ready within 30 s; see {}", log.display())
}

/// A PHP-like sender: one JSON profile per "request", nonblocking sendto (what listener.php
/// does), its own comm set to look like a PHP-FPM worker so the eBPF side watches it.
pub struct Synthetic {
    pub sent: Arc<AtomicU64>,
    pub eagain: Arc<AtomicU64>,
    pub other_err: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Synthetic {
    pub fn start(socket: PathBuf, rate: u64, stop: Arc<AtomicBool>) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let eagain = Arc::new(AtomicU64::new(0));
        let other_err = Arc::new(AtomicU64::new(0));
        let (s, e, o) = (sent.clone(), eagain.clone(), other_err.clone());
        let handle = std::thread::spawn(move || {
            let name = std::ffi::CString::new("php-fpm-synth").expect("no NUL");
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            let sock = UnixDatagram::unbound().expect("socket");
            sock.set_nonblocking(true).expect("nonblocking");
            let start = Instant::now();
            let mut n: u64 = 0;
            let uris = [
                "/",
                "/cart",
                "/product/42",
                "/search?q=shoes",
                "/api/orders",
            ];
            while !stop.load(Ordering::Relaxed) {
                let due = start.elapsed().as_secs_f64() * rate as f64;
                if (n as f64) >= due {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let uri = uris[(n % uris.len() as u64) as usize];
                let body = format!(
                    r#"{{"v":1,"id":"synth-{}-{n}","ts":{},"method":"GET","uri":"{uri}","status":200,"wall_us":{},"cpu_user_us":{},"mem_peak_bytes":{},"script":"/srv/app/index.php","sapi":"synthetic"}}"#,
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros()),
                    800 + (n * 37) % 5000,
                    500 + (n * 13) % 3000,
                    2_000_000 + (n * 4099) % 8_000_000,
                );
                match sock.send_to(body.as_bytes(), &socket) {
                    Ok(_) => s.fetch_add(1, Ordering::Relaxed),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        e.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => o.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
        });
        Self {
            sent,
            eagain,
            other_err,
            handle: Some(handle),
        }
    }

    pub fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn count_lines(path: &Path) -> u64 {
    std::fs::File::open(path).map_or(0, |f| BufReader::new(f).split(b'\n').count() as u64)
}

pub fn run(root: &Path, args: RunArgs) -> Result<()> {
    let bin = crate::target_dir(root).join("release");
    let dir = root.join(".run");
    std::fs::create_dir_all(dir.join("run"))?;
    let out = dir.join("profiles.jsonl");
    let _ = std::fs::remove_file(&out);
    let (mut listener, addr) =
        start_listener(&bin.join("apm-listener"), &out, &dir.join("listener.log"))?;
    let metrics_port = free_port();
    let ebpf = if args.no_ebpf { "off" } else { "auto" };
    let cfg = write_agent_config(&dir, &format!("http://{addr}"), metrics_port, ebpf)?;
    let agent_log = dir.join("agent.log");
    let mut agent = start_agent(&bin, &dir, &cfg)?;

    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let php_demo = !args.synthetic && crate::demo::available();
    let mut demo = None;
    let mut synth = None;
    if php_demo {
        demo = Some(crate::demo::Demo::start(root, &dir, stop_load.clone())?);
    } else {
        if !args.synthetic {
            eprintln!(
                "PHP-FPM demo skipped: {}; running the synthetic PHP-like sender instead",
                crate::demo::why_not()
            );
        }
        synth = Some(Synthetic::start(
            dir.join("run/listener.sock"),
            args.rate,
            stop_load.clone(),
        ));
    }
    println!("listener  {addr} -> {}", out.display());
    println!(
        "agent     config {} | log {} | metrics http://127.0.0.1:{metrics_port}/metrics",
        cfg.display(),
        agent_log.display()
    );
    println!(
        "load      {}",
        if php_demo {
            "PHP-FPM demo app behind nginx, driven by a load generator".to_string()
        } else {
            format!("synthetic sender, {} profiles/s", args.rate)
        }
    );
    println!("Ctrl-C to stop.\n");
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut first = true;
    let mut status = Status::default();
    while !STOP.load(Ordering::SeqCst)
        && args
            .duration
            .is_none_or(|d| started.elapsed() < Duration::from_secs(d))
    {
        std::thread::sleep(Duration::from_secs(1));
        let Some(s) = control_status(&dir.join("run")) else {
            eprintln!("agent not answering");
            continue;
        };
        let recv = s.received;
        let rate = (recv - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), recv);
        if first {
            println!(
                "{:>5} {:>8} {:>10} {:>10} {:>7} {:>7} | {:>10} {:>8} {:>7} {:>9} | {:>7} {:>6} {:>9}",
                "t(s)",
                "prof/s",
                "received",
                "delivered",
                "reject",
                "dropped",
                "kernel ok",
                "k.EAGAIN",
                "workers",
                "wrk RSS",
                "breaker",
                "spool",
                "agent RSS"
            );
            first = false;
        }
        let ebpf_on = s.ebpf_enabled();
        println!(
            "{:>5} {:>8.0} {:>10} {:>10} {:>7} {:>7} | {:>10} {:>8} {:>7} {:>8}M | {:>7} {:>6} {:>8}M",
            started.elapsed().as_secs(),
            rate,
            recv,
            s.delivered,
            s.rejected,
            s.dropped_total(),
            if ebpf_on {
                s.ebpf_u64("/sends_ok").to_string()
            } else {
                "off".into()
            },
            if ebpf_on {
                s.ebpf_u64("/sends_failed/eagain").to_string()
            } else {
                "-".into()
            },
            if ebpf_on {
                s.ebpf_u64("/php_workers").to_string()
            } else {
                "-".into()
            },
            s.ebpf_u64("/php_workers_rss_bytes") / (1024 * 1024),
            s.breaker,
            s.spooled_batches,
            // The agent's own resident memory; "wrk RSS" is the PHP workers' (their sum, as the
            // eBPF monitor sees it), not the agent's.
            s.rss_bytes / (1024 * 1024),
        );
        status = s;
    }
    stop_load.store(true, Ordering::SeqCst);
    let (sent, failed) = match (&mut synth, &mut demo) {
        (Some(s), _) => {
            s.join();
            let other = s.other_err.load(Ordering::Relaxed);
            if other > 0 {
                println!("synthetic sender: {other} sends failed with errors other than EAGAIN");
            }
            (
                s.sent.load(Ordering::Relaxed),
                s.eagain.load(Ordering::Relaxed),
            )
        }
        (_, Some(d)) => d.stop(),
        _ => (0, 0),
    };
    std::thread::sleep(Duration::from_millis(300));
    if let Some(s) = control_status(&dir.join("run")) {
        status = s;
    }
    println!("\nstopping the agent (graceful drain) ...");
    let code = agent
        .terminate(Duration::from_secs(30))
        .ok()
        .and_then(|st| st.code());
    std::thread::sleep(Duration::from_millis(500));
    let _ = listener.terminate(Duration::from_secs(10));
    let stored = count_lines(&out);
    println!("agent exit code {code:?}");
    let load = if synth.is_some() {
        format!("sent {sent} (sender saw EAGAIN {failed})")
    } else {
        format!("PHP requests answered {sent} (failed {failed})")
    };
    println!(
        "{load} | agent received {} rejected {} dropped {} | listener stored {stored}",
        status.received,
        status.rejected,
        status.dropped_total()
    );
    println!("profiles: {}", out.display());
    Ok(())
}
