//! `apm-agent [--config PATH] COMMAND`. Exit codes: 0 success, 1 failure, 3 not running
//! (`status`, `stop`, `reload`, `kill` when no agent runs), 78 configuration error.
//! Error messages start with a stable code (ALREADY_RUNNING, NOT_RUNNING, PERMISSION_DENIED,
//! LOCK_FAILED, START_FAILED, STOP_FAILED, PID_FILE_CORRUPTED) and say how to fix the cause.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::daemon::pidfile::{Probe, probe};

pub const EXIT_NOT_RUNNING: i32 = 3;

/// The exit codes, as `--help` and the man page list them.
const EXIT_CODES: &str = "Exit codes:
  0   success
  1   failure (the message says why; a runtime condition: a supervisor may retry)
  3   not running (status, stop, kill, reload, pause, resume)
  75  memory self-restart under systemd (limits.max_memory_mb; Restart=always starts it again)
  78  configuration error, naming the key (supervisors do not restart on it)";

#[derive(Debug, Parser)]
#[command(
    name = "apm-agent",
    version,
    about = "Bitville APM agent: PHP-FPM profiles to the central listener, watched by eBPF",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Configuration file (TOML); every key has a default.
    #[arg(long, short, global = true, env = "APM_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in the foreground (systemd, supervisord, a terminal).
    Run,
    /// Start in the background; returns once the agent is ready.
    Start {
        /// Give up waiting for readiness after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Where the background agent's log goes (default: /var/log/bitville-apm/agent.log).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Stop gracefully (SIGTERM, wait for the drain, SIGKILL after the timeout).
    Stop {
        /// Seconds to wait before SIGKILL (default: limits.shutdown_timeout + 5).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Restart in place without dropping a profile: the running agent flushes what it holds and
    /// re-executes itself, handing its sockets over (datagrams sent meanwhile wait in the kernel
    /// queue). Starts the agent when none runs.
    Restart {
        /// Seconds to wait for the restarted agent (default: limits.shutdown_timeout + 30).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Re-read the configuration (SIGHUP); a bad file is refused and the old one kept.
    Reload,
    /// Show whether the agent runs and what it has done (exit 3 when not running).
    Status {
        /// Print the whole status document as one JSON object (the fields of DESIGN.md).
        #[arg(long)]
        json: bool,
    },
    /// SIGKILL the agent (no drain; the spool and the kernel queue keep what they hold).
    Kill,
    /// Validate the configuration and print the effective configuration.
    CheckConfig,
    /// Raise PHP's kill switch: listener.php sends nothing until `resume`.
    Pause,
    /// Lower the kill switch raised by `pause`.
    Resume,
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let needs_valid = matches!(
        cli.command,
        Command::Run | Command::Start { .. } | Command::CheckConfig
    );
    let (cfg, err) = Config::load_for_client(cli.config.as_deref());
    if let Some(e) = err {
        if needs_valid {
            eprintln!("error: {e}");
            return crate::config::EX_CONFIG;
        }
        // The agent reports the problem itself on `reload`; other commands only need paths.
        if !matches!(cli.command, Command::Reload) {
            eprintln!("warning: {e} (using the [control] paths only)");
        }
    }
    let config_path = cli
        .config
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    match cli.command {
        Command::Run => run_foreground(cfg, config_path),
        Command::CheckConfig => {
            print!("{}", cfg.to_toml_redacted());
            eprintln!("configuration OK");
            0
        }
        Command::Status { json } => status(&cfg, json),
        Command::Reload => control_cmd(&cfg, "reload"),
        Command::Pause => control_cmd(&cfg, "pause"),
        Command::Resume => control_cmd(&cfg, "resume"),
        Command::Start { timeout, log_file } => {
            start(&cfg, config_path.as_deref(), timeout, log_file)
        }
        Command::Stop { timeout } => stop(&cfg, timeout),
        Command::Restart { timeout } => restart(&cfg, config_path.as_deref(), timeout),
        Command::Kill => kill(&cfg),
    }
}

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&cfg.control.log_level));
    let journald = stderr_is_journal(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_dev_ino(),
    );
    // Under systemd (stderr is the journal's stream): native journal entries, with the level
    // as the entry's PRIORITY and each tracing field as a journal field (`journalctl -p warning`,
    // `journalctl SPOOL_DIR=...`). `log_format = "text"`/`"json"` keep stderr as asked.
    if journald && cfg.control.log_format == LogFormat::Auto {
        match tracing_journald::layer() {
            Ok(layer) => {
                use tracing_subscriber::layer::SubscriberExt;
                use tracing_subscriber::util::SubscriberInitExt;
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer.with_syslog_identifier("apm-agent".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("warning: cannot reach the journal ({e}); logging to stderr"),
        }
    }
    // Colours only on a terminal: log files and the journal get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cfg.control.log_format {
        LogFormat::Json => builder.json().init(),
        // The journal stamps each line itself.
        LogFormat::Auto if journald => builder.without_time().with_ansi(false).init(),
        LogFormat::Auto | LogFormat::Text => builder.init(),
    }
}

/// The device and inode of stderr, as `JOURNAL_STREAM` names them.
fn stderr_dev_ino() -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Whether stderr is systemd's journal stream: `JOURNAL_STREAM` ("DEVICE:INODE", decimal)
/// names stderr itself. The variable alone is not enough: every process a service starts
/// inherits it, with its stderr often redirected elsewhere (systemd.exec(5)).
fn stderr_is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let (Some(v), Some((dev, ino))) = (journal_stream, stderr) else {
        return false;
    };
    v.split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// Where `apm-agent start` sends the background agent's output unless `--log-file` says
/// otherwise; the package creates the directory and rotates the file
/// (deploy/logrotate/bitville-apm-agent, `copytruncate`: the file is opened for appending, so
/// the agent's next line after a truncation lands at the new start).
pub const START_LOG: &str = "/var/log/bitville-apm/agent.log";

/// `start`'s log file: `--log-file`, else [`START_LOG`].
fn start_log_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(START_LOG))
}

/// One worker thread unless `TOKIO_WORKER_THREADS` says otherwise. The pipeline is a chain of
/// tasks handing chunks to each other; on one worker those hand-offs are queue pushes instead of
/// cross-thread wakeups, which cost less CPU per profile and gave a higher end-to-end rate
/// (figures and the command to compare in docs/agent.md), and an agent on a PHP server should
/// not compete with PHP-FPM for more than a core anyway. Spool I/O runs under `block_in_place`, which hands the worker role to
/// another thread meanwhile, so the pipeline never stalls on the disk.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        b.worker_threads(1);
    }
    b.enable_all().build()
}

fn run_foreground(cfg: Config, config_path: Option<PathBuf>) -> i32 {
    // Before any thread exists: it clears the variables that name inherited descriptors.
    let inherited = match crate::daemon::handover::take_inherited() {
        Ok(i) => i,
        Err(e) => {
            // Only a previous image of this binary sets it: a bad value is a bug or tampering,
            // and guessing which descriptor was meant is worse than not starting.
            eprintln!("error: {e}");
            return 1;
        }
    };
    crate::daemon::memguard::tune_allocator();
    // Before the runtime's threads exist, so they inherit it; logged once logging is up.
    let nice = crate::daemon::nice::apply(cfg.ingest.nice);
    init_logging(&cfg);
    nice.log();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(crate::daemon::run(cfg, config_path, inherited)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn running_pid(cfg: &Config) -> Result<Option<u32>, String> {
    match probe(&cfg.control.pid_file) {
        Ok(Probe::Running(i)) if crate::daemon::pidfile::is_agent(i.pid) => Ok(Some(i.pid)),
        Ok(Probe::Running(i)) => Err(format!(
            "PID_MISMATCH: {} is locked and names PID {}, which is not an apm-agent: not \
             signalling it (who holds the file? `fuser {}`)",
            cfg.control.pid_file.display(),
            i.pid,
            cfg.control.pid_file.display()
        )),
        Ok(Probe::RunningUnknown) => Err(format!(
            "PID_FILE_CORRUPTED: {} is locked by a running agent but unreadable",
            cfg.control.pid_file.display()
        )),
        Ok(Probe::Stale(info)) => {
            eprintln!(
                "note: stale PID file {} (PID {} is not running an agent)",
                cfg.control.pid_file.display(),
                info.map_or("?".into(), |i| i.pid.to_string())
            );
            Ok(None)
        }
        Ok(Probe::NotRunning) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn status(cfg: &Config, json: bool) -> i32 {
    let client = apm_control::Client::new(cfg.control.control_socket());
    let answer = if json {
        // The document as the agent sent it, every field.
        client.request("status").map(|v| v.to_string())
    } else {
        client.status().map(|s| {
            format!(
                "running: pid {} up {}s; received {} rejected {} delivered {} dropped {}; breaker {}; spool {} batches / {} bytes; ebpf {}",
                s.pid,
                s.uptime_s,
                s.received,
                s.rejected,
                s.delivered,
                s.dropped_total(),
                s.breaker,
                s.spooled_batches,
                s.spool_bytes,
                if s.ebpf_enabled() { "on" } else { "off" }
            )
        })
    };
    match answer {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => match running_pid(cfg) {
            Ok(Some(pid)) => {
                eprintln!(
                    "agent PID {pid} is running but its control socket {} does not answer: {e}",
                    cfg.control.control_socket().display()
                );
                1
            }
            Ok(None) => {
                if json {
                    println!("{}", serde_json::json!({"running": false}));
                }
                eprintln!(
                    "NOT_RUNNING: no agent is running (PID file {})",
                    cfg.control.pid_file.display()
                );
                EXIT_NOT_RUNNING
            }
            Err(m) => {
                eprintln!("error: {m}");
                1
            }
        },
    }
}

fn control_cmd(cfg: &Config, cmd: &str) -> i32 {
    let client =
        apm_control::Client::new(cfg.control.control_socket()).timeout(Duration::from_secs(30));
    match client.command(cmd) {
        Ok(r) if r.ok => {
            println!("{}", r.message.as_deref().unwrap_or("ok"));
            0
        }
        Ok(r) => {
            eprintln!("error: {}", r.error.as_deref().unwrap_or("failed"));
            1
        }
        Err(e) if matches!(running_pid(cfg), Ok(None)) => {
            eprintln!("NOT_RUNNING: no agent is running ({e})");
            EXIT_NOT_RUNNING
        }
        Err(e) => {
            eprintln!(
                "error: control socket {}: {e}",
                cfg.control.control_socket().display()
            );
            1
        }
    }
}

fn start(cfg: &Config, config_path: Option<&Path>, timeout: u64, log_file: Option<PathBuf>) -> i32 {
    match running_pid(cfg) {
        Ok(Some(pid)) => {
            eprintln!(
                "ALREADY_RUNNING: an agent is already running with PID {pid}; use `apm-agent restart`"
            );
            return 1;
        }
        Err(m) => {
            eprintln!("error: {m}");
            return 1;
        }
        Ok(None) => {}
    }
    let log_path = start_log_path(log_file);
    if let Some(d) = log_path.parent() {
        // Logs can name paths and peers: not for every local user.
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(d);
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "START_FAILED: cannot open log file {}: {e}",
                log_path.display()
            );
            return 1;
        }
    };
    // Close-on-exec on both ends: only the agent's own copy of the write end is made
    // inheritable, in the child, just before its exec.
    let (rd, wr) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("START_FAILED: pipe: {e}");
            return 1;
        }
    };
    let child = match spawn_detached(config_path, log, &wr) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("START_FAILED: cannot spawn the agent: {e}");
            return 1;
        }
    };
    drop(wr);
    wait_ready(child, rd, timeout, &log_path)
}

/// `apm-agent run` in a session of its own, its output to `log`, the write end of the readiness
/// pipe kept open across exec.
fn spawn_detached(
    config_path: Option<&Path>,
    log: std::fs::File,
    wr: &std::os::fd::OwnedFd,
) -> std::io::Result<std::process::Child> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("apm-agent"));
    let mut cmd = std::process::Command::new(exe);
    if let Some(p) = config_path {
        cmd.arg("--config").arg(p);
    }
    let wr_fd = std::os::fd::AsRawFd::as_raw_fd(wr);
    cmd.arg("run")
        .env("APM_READY_FD", wr_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_or(std::process::Stdio::null(), std::process::Stdio::from),
        )
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // A session of its own: the agent outlives the shell that started it.
            libc::setsid();
            // Keep the readiness pipe across exec.
            let flags = libc::fcntl(wr_fd, libc::F_GETFD);
            libc::fcntl(wr_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Waits for "ready" on the pipe from a started agent; prints the outcome, returns the exit
/// code of `start`.
fn wait_ready(
    mut child: std::process::Child,
    rd: std::os::fd::OwnedFd,
    timeout: u64,
    log_path: &Path,
) -> i32 {
    // Wait for "ready" on the pipe; EOF without it means the child died or failed.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(100)) {
            if s.starts_with("ready") {
                println!("agent started (PID {})", child.id());
                return 0;
            }
            let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
            eprintln!(
                "START_FAILED: the agent exited with code {code} before it was ready; its log {} says:",
                log_path.display()
            );
            eprint!("{}", tail(log_path, 15));
            return if code == crate::config::EX_CONFIG {
                code
            } else {
                1
            };
        }
        if Instant::now() > deadline {
            eprintln!(
                "START_FAILED: the agent (PID {}) was not ready within {timeout}s; see {}",
                child.id(),
                log_path.display()
            );
            return 1;
        }
    }
}

fn restart(cfg: &Config, config_path: Option<&Path>, timeout: Option<u64>) -> i32 {
    let sock = cfg.control.control_socket();
    let client = apm_control::Client::new(&sock).timeout(Duration::from_secs(30));
    let before = match client.status() {
        Ok(s) => s,
        Err(_) => {
            return match running_pid(cfg) {
                Ok(None) => start(cfg, config_path, 30, None),
                Ok(Some(pid)) => {
                    eprintln!(
                        "agent PID {pid} does not answer on {}: stopping and starting it",
                        sock.display()
                    );
                    match stop(cfg, timeout) {
                        0 | EXIT_NOT_RUNNING => start(cfg, config_path, 30, None),
                        code => code,
                    }
                }
                Err(m) => {
                    eprintln!("error: {m}");
                    1
                }
            };
        }
    };
    match client.command("restart") {
        Ok(r) if r.ok => {}
        Ok(r) => {
            eprintln!("error: {}", r.error.as_deref().unwrap_or("restart refused"));
            return 1;
        }
        Err(e) => {
            eprintln!("error: control socket {}: {e}", sock.display());
            return 1;
        }
    }
    let wait = timeout.map_or(
        cfg.limits.shutdown_timeout + Duration::from_secs(30),
        Duration::from_secs,
    );
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(s) = client.status()
            && s.restarts > before.restarts
        {
            println!("agent restarted in place (PID {})", s.pid);
            return 0;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "START_FAILED: the agent did not come back within {}s; see its log",
        wait.as_secs()
    );
    1
}

fn tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let v: Vec<&str> = s.lines().collect();
    let from = v.len().saturating_sub(lines);
    v[from..].iter().map(|l| format!("  {l}\n")).collect()
}

/// Whether `pid` still runs. A zombie (dead, not yet reaped by its parent) does not count.
fn alive(pid: u32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

fn stop(cfg: &Config, timeout: Option<u64>) -> i32 {
    let pid = match running_pid(cfg) {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!(
                "NOT_RUNNING: no agent is running (PID file {})",
                cfg.control.pid_file.display()
            );
            return EXIT_NOT_RUNNING;
        }
        Err(m) => {
            eprintln!("error: {m}");
            return 1;
        }
    };
    let timeout = timeout.map_or(
        cfg.limits.shutdown_timeout + Duration::from_secs(5),
        Duration::from_secs,
    );
    let target = nix::unistd::Pid::from_raw(pid as i32);
    if let Err(e) = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM) {
        eprintln!(
            "STOP_FAILED: cannot signal PID {pid}: {e}{}",
            if e == nix::errno::Errno::EPERM {
                " (PERMISSION_DENIED: run as root)"
            } else {
                ""
            }
        );
        return 1;
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) || matches!(running_pid(cfg), Ok(None)) {
            println!("agent (PID {pid}) stopped");
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "agent (PID {pid}) did not stop within {}s: sending SIGKILL",
        timeout.as_secs()
    );
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..100 {
        if !alive(pid) {
            println!("agent (PID {pid}) killed");
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("STOP_FAILED: PID {pid} survives SIGKILL");
    1
}

fn kill(cfg: &Config) -> i32 {
    match running_pid(cfg) {
        Ok(Some(pid)) => match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) => {
                println!("agent (PID {pid}) killed");
                0
            }
            Err(e) => {
                eprintln!("STOP_FAILED: cannot kill PID {pid}: {e}");
                1
            }
        },
        Ok(None) => {
            eprintln!("NOT_RUNNING: no agent is running");
            EXIT_NOT_RUNNING
        }
        Err(m) => {
            eprintln!("error: {m}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_command_and_flag_has_help_and_the_exit_codes_are_listed() {
        let mut cmd = Cli::command();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_string());
            }
            for a in sub.get_arguments() {
                if a.get_help().is_none() && a.get_id() != "help" {
                    missing.push(format!("{} --{}", sub.get_name(), a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help text: {missing:?}");
        let help = cmd.render_long_help().to_string();
        for code in ["0 ", "1 ", "3 ", "75 ", "78 "] {
            assert!(
                help.contains(&format!("\n  {code}")),
                "exit code {code}missing:\n{help}"
            );
        }
    }
}

#[cfg(test)]
mod logging_tests {
    use super::*;

    /// Operators issue 5: `JOURNAL_STREAM` is inherited by everything a service starts (a
    /// shell, `apm-agent start` run from a unit, supervisord under systemd): only when stderr is
    /// the very stream it names (systemd.exec(5): "device:inode" of stderr) is it the journal.
    #[test]
    fn the_journal_is_used_only_when_stderr_is_the_stream_it_names() {
        // 8:1234 is the journal's stream; stderr is that socket.
        assert!(stderr_is_journal(Some("8:1234"), Some((8, 1234))));
        // stderr redirected to a file by whoever started us: plain text.
        assert!(!stderr_is_journal(Some("8:1234"), Some((8, 99))));
        assert!(!stderr_is_journal(Some("9:1234"), Some((8, 1234))));
        // No variable, or garbage in it, or no stderr: plain text.
        assert!(!stderr_is_journal(None, Some((8, 1234))));
        assert!(!stderr_is_journal(Some("garbage"), Some((8, 1234))));
        assert!(!stderr_is_journal(Some("8:1234"), None));
    }

    /// Operators issue 5: `start` logged to `<runtime_dir>/agent.log` (a tmpfs, lost at reboot,
    /// never rotated); it logs where the package's logrotate file looks.
    #[test]
    fn start_logs_to_var_log_unless_told_otherwise() {
        assert_eq!(
            start_log_path(None),
            Path::new("/var/log/bitville-apm/agent.log")
        );
        assert_eq!(
            start_log_path(Some("/tmp/x.log".into())),
            Path::new("/tmp/x.log")
        );
    }
}
