//! Operating the agent: the CLI's commands and exit codes, the PID file's single-instance lock,
//! signals, the systemd notify protocol against a real NOTIFY_SOCKET, and supervisord.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apm_tests::common::{Agent, Listener, bin, in_ci, status_at, thread_nices};

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("apm-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `apm-agent start` with its log in the test's directory (the default is /var/log).
fn start(config: &Path) -> std::process::Output {
    let log = config.parent().expect("config dir").join("run/agent.log");
    cli(
        config,
        &["start", "--log-file", log.to_str().expect("utf-8 path")],
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pid_of(dir: &Path) -> u32 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/agent.pid")).unwrap()).unwrap();
    v["pid"].as_u64().unwrap() as u32
}

/// Running and not a zombie (a reparented agent may wait a while for its reaper).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

#[test]
fn start_status_stop_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let cfg = Agent::write_config(dir.path(), &listener.endpoint(), "off", "");
    // Not running yet.
    let o = cli(&cfg, &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("NOT_RUNNING"));
    let o = cli(&cfg, &["stop"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // start returns once ready.
    let o = start(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        status_at(&dir.path().join("run/control.sock")).is_some(),
        "ready when start returns"
    );
    let pid = pid_of(dir.path());
    // A second start is refused, naming the running PID.
    let o = start(&cfg);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("ALREADY_RUNNING") && text(&o).contains(&pid.to_string()),
        "{}",
        text(&o)
    );
    let o = cli(&cfg, &["status"]);
    assert!(
        o.status.success() && text(&o).contains("running"),
        "{}",
        text(&o)
    );
    // PID file is JSON with the contract's fields.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/agent.pid")).unwrap())
            .unwrap();
    for k in ["pid", "startedAt", "version", "configPath"] {
        assert!(v.get(k).is_some(), "PID file has {k}: {v}");
    }
    // pause / resume drive the PHP kill switch.
    assert!(cli(&cfg, &["pause"]).status.success());
    assert!(dir.path().join("run/disabled").exists());
    assert!(cli(&cfg, &["resume"]).status.success());
    assert!(!dir.path().join("run/disabled").exists());
    // Graceful stop.
    let o = cli(&cfg, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!alive(pid));
    assert!(
        !dir.path().join("run/agent.pid").exists(),
        "PID file removed on a clean stop"
    );
    assert!(
        !dir.path().join("run/listener.sock").exists(),
        "socket removed on a final stop"
    );
}

/// Operators issue 5: `start` logs to a file that logrotate rotates with `copytruncate`
/// (deploy/logrotate/bitville-apm-agent). The log file is the ground truth here: it is created
/// with its directory, not world-readable, and appended to, so after a truncation the next line
/// lands at the start of the file, not after a hole of NUL bytes as long as the old file.
#[test]
fn start_logs_to_its_file_and_survives_copytruncate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let cfg = Agent::write_config(dir.path(), &listener.endpoint(), "off", "");
    let log = dir.path().join("logs/apm/agent.log");
    let o = cli(&cfg, &["start", "--log-file", log.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let pid = pid_of(dir.path());
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    assert!(
        size() > 0,
        "start's agent wrote nothing to {}",
        log.display()
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&log), 0o640);
    assert_eq!(mode(log.parent().unwrap()), 0o750);
    // What logrotate's copytruncate does after copying the file away.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(cli(&cfg, &["reload"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while size() == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing logged after the truncation"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = std::fs::read(&log).unwrap();
    assert_ne!(after[0], 0, "a hole before the first line after truncation");
    let o = cli(&cfg, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!alive(pid));
}

/// Issue 15.1: `start` then `restart` used to leave a broken agent: the re-executed image found
/// `APM_READY_FD` still set and wrote "ready" into, then closed, whatever descriptor it held
/// under that number (tokio's I/O driver), so its workers panicked, ingest died and the spool
/// lock was released, while `restart` said "restarted in place".
#[test]
fn start_then_restart_leaves_a_working_agent_that_holds_its_locks() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let cfg = Agent::write_config(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[batch]\nmax_age = \"50ms\"\n",
    );
    let o = start(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    let pid = pid_of(dir.path());
    let o = cli(&cfg, &["restart"]);
    assert!(o.status.success(), "{}", text(&o));
    // The new image is ready when its control socket answers with the same PID.
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_at(&dir.path().join("run/control.sock"))
        .is_none_or(|s| s["restarts"].as_u64() != Some(1))
    {
        assert!(Instant::now() < deadline, "no restarted agent answers");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pid_of(dir.path()), pid, "restarted in place");
    // The spool lock is still held: another taker is refused.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("spool/spool.lock"))
        .unwrap();
    assert!(
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        "the restarted agent must still hold the spool lock"
    );
    // Profiles still flow, each once.
    let sock = UnixDatagram::unbound().unwrap();
    for i in 0..500 {
        sock.send_to(
            format!("{{\"id\":\"r-{i}\"}}").as_bytes(),
            dir.path().join("run/listener.sock"),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while listener.stored().len() < 500 {
        assert!(
            Instant::now() < deadline,
            "only {} of 500 stored after the restart",
            listener.stored().len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.path().join("run/agent.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    let o = cli(&cfg, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!alive(pid), "stop stops the agent it reports stopped");
}

/// `flock -n -x PATH sleep 30` as user `nobody`: a local user trying to squat one of the
/// agent's lock files. Returns the holder when it got the lock.
fn squat_as_nobody(path: &Path) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("flock")
        .args(["-n", "-x"])
        .arg(path)
        .args(["sleep", "30"])
        .uid(65534)
        .gid(65534)
        .stderr(Stdio::null())
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(Duration::from_millis(300));
    match c.try_wait().unwrap() {
        Some(_) => None, // could not open or lock: exited at once
        None => Some(c),
    }
}

/// Issue 15.2: the PID file and the spool lock were created 0644, so any local user could open
/// and `flock` them after an unclean stop: the next agent then could not start (spool locked:
/// exit 78, never restarted by systemd). They are 0600 now, so `nobody` cannot even open them.
#[test]
fn a_local_user_cannot_squat_the_pid_file_or_the_spool_lock() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The test dir is 0700; let `nobody` reach the files so only their own mode protects them.
    for d in [
        dir.path().to_path_buf(),
        dir.path().join("run"),
        dir.path().join("spool"),
    ] {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut agent = Agent::start(dir.path(), "http://127.0.0.1:9", "off", "");
    agent.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = agent.proc.wait(Duration::from_secs(5));
    let pid_file = dir.path().join("run/agent.pid");
    let spool_lock = dir.path().join("spool/spool.lock");
    assert!(
        pid_file.exists() && spool_lock.exists(),
        "left behind by SIGKILL"
    );
    let mut squatters = Vec::new();
    for f in [&pid_file, &spool_lock] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        if let Some(c) = squat_as_nobody(f) {
            squatters.push(c);
        }
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
    }
    let held = squatters.len();
    for mut c in squatters {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(
        held, 0,
        "user nobody locked {held} of the agent's lock files"
    );
}

/// Issue 15.2: `stop` signals the PID its PID file names, as root. It must make sure that PID
/// is an apm-agent first: a stale file whose lock someone else holds names whatever process
/// now has that number.
#[test]
fn stop_never_signals_a_process_that_is_not_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
    let pid_file = dir.path().join("run/agent.pid");
    std::fs::write(
        &pid_file,
        format!(
            "{{\"pid\":{},\"startedAt\":\"2026-01-01T00:00:00Z\",\"version\":\"0.1.0\",\"configPath\":null}}\n",
            victim.id()
        ),
    )
    .unwrap();
    // Someone (not an agent) holds the PID file's lock.
    let mut holder = Command::new("flock")
        .args(["-x"])
        .arg(&pid_file)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let o = cli(&cfg, &["stop", "--timeout", "2"]);
    let alive_after = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        alive_after,
        "stop signalled PID {} (not an agent): {}",
        victim.id(),
        text(&o)
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
}

/// Issue 15.5: root writes state, flag files and spool records in these directories; one that
/// other users can write lets them plant what root then trusts or overwrites.
#[test]
fn a_directory_other_users_can_write_is_refused_with_78() {
    use std::os::unix::fs::PermissionsExt;
    for (key, sub) in [
        ("control.runtime_dir", "run"),
        ("control.state_dir", "state"),
        ("spool.dir", "spool"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
        let d = dir.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut child = Command::new(bin("apm-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{key}: the agent started with a directory every user can write");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn start_of_a_broken_config_fails_with_78_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "off",
        "[batch]\nmax_items = 0\n",
    );
    let o = start(&cfg);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("batch.max_items"), "{}", text(&o));
    // A start failure after the config check names the cause from the child's log: here the
    // socket path is a regular file.
    let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::write(dir.path().join("run/listener.sock"), "not a socket").unwrap();
    let o = start(&cfg);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("START_FAILED") && text(&o).contains("not a socket"),
        "{}",
        text(&o)
    );
}

/// A bad `[ebpf]` value is a configuration error that names its own key, whatever
/// `ebpf.enabled` says: it used to be reported as "`ebpf.enabled`: eBPF is required (\"on\")".
#[test]
fn a_bad_ebpf_key_is_named_as_itself_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "auto",
        "[ebpf]\nmin_sample_rate = 2.0\n",
    );
    let o = cli(&cfg, &["run"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(78), "{out}");
    assert!(
        out.contains("config key `ebpf.min_sample_rate`: must be between 0.0 and 1.0"),
        "{out}"
    );
    assert!(!out.contains("ebpf.enabled"), "{out}");
}

#[test]
fn two_runs_racing_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let spawn = || {
        Command::new(bin("apm-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for _ in 0..5 {
        let mut a = spawn();
        let mut b = spawn();
        std::thread::sleep(Duration::from_millis(700));
        let (ea, eb) = (a.try_wait().unwrap(), b.try_wait().unwrap());
        let exited: Vec<_> = [ea, eb].into_iter().flatten().collect();
        assert_eq!(
            exited.len(),
            1,
            "exactly one of two racing agents runs: {ea:?} {eb:?}"
        );
        let (mut winner, loser) = if ea.is_some() { (b, a) } else { (a, b) };
        let out = loser.wait_with_output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ALREADY_RUNNING"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(winner.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(winner.wait().unwrap().success());
    }
}

#[test]
fn stale_pid_file_after_kill_9_is_handled() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
    assert!(start(&cfg).status.success());
    let pid = pid_of(dir.path());
    let o = cli(&cfg, &["kill"]);
    assert!(o.status.success(), "{}", text(&o));
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dir.path().join("run/agent.pid").exists(),
        "SIGKILL leaves the PID file behind"
    );
    let o = cli(&cfg, &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("stale PID file"), "{}", text(&o));
    // The stale socket file is also left; start replaces both.
    let o = start(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(pid_of(dir.path()), pid);
    assert!(cli(&cfg, &["stop"]).status.success());
}

#[test]
fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
    // A stand-in agent (tests/src/bin/apm-agent-standin.rs) that holds the PID-file lock and
    // ignores SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(dir.path(), "http://127.0.0.1:9", "off", "");
    let pidfile = dir.path().join("run/agent.pid");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let mut child = Command::new(bin("apm-agent-standin"))
        .arg(&pidfile)
        .stdout(Stdio::piped())
        .spawn()
        .expect("apm-agent-standin");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let t = Instant::now();
    let o = cli(&cfg, &["stop", "--timeout", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("SIGKILL"), "{}", text(&o));
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "waited for the timeout before escalating"
    );
    let st = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
}

/// Reads notify messages until one contains `want` (or the deadline).
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = m.lines().any(|l| l == want);
            seen.push(m);
            if hit {
                return seen;
            }
        }
    }
    panic!("no `{want}` within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_notify_protocol_ready_status_watchdog_fdstore_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let cfg = Agent::write_config(dir.path(), &listener.endpoint(), "off", "");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(bin("apm-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let msgs = recv_until(&sock, "READY=1", Duration::from_secs(20)).join("\n");
    assert!(
        msgs.contains("FDSTORE=1")
            && msgs.contains("FDNAME=dgram")
            && msgs.contains("FDNAME=stream"),
        "{msgs}"
    );
    assert!(msgs.contains("STATUS="), "{msgs}");
    // Watchdog pings come while the pipeline is alive (every WATCHDOG_USEC/2).
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3));
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(child.wait().unwrap().success());
}

#[test]
fn supervisord_start_stop_crash_restart_and_no_loop_on_config_error() {
    let Some(supervisord) = ["/usr/bin/supervisord", "/usr/local/bin/supervisord"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(
            !in_ci(),
            "supervisor is not installed (cargo xtask setup installs it)"
        );
        eprintln!("skipped: supervisor not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let listener = Listener::start(d, &[]);
    let cfg = Agent::write_config(d, &listener.endpoint(), "off", "");
    // The program section is deploy/supervisord.conf with this machine's paths.
    let section = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/supervisord.conf"
    ))
    .unwrap()
    .replace(
        "/usr/bin/apm-agent",
        &bin("apm-agent").display().to_string(),
    )
    .replace("/etc/bitville-apm/agent.toml", &cfg.display().to_string())
    .replace(
        "/var/log/bitville-apm/agent.log",
        &d.join("supervised.log").display().to_string(),
    );
    let conf = d.join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={d}/supervisor.sock\n[supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nnodaemon=true\n[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n[supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n{section}",
            d = d.display()
        ),
    )
    .unwrap();
    let mut sd = Command::new(supervisord)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        let o = Command::new("supervisorctl")
            .arg("-c")
            .arg(&conf)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let wait_state = |state: &str, timeout: Duration| -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = ctl(&["status", "bitville-apm-agent"]);
            if s.contains(state) || Instant::now() > end {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let control = d.join("run/control.sock");
    let ready = |timeout: Duration| {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = status_at(&control) {
                return s["pid"].as_u64().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent not ready under supervisord: {}",
            std::fs::read_to_string(d.join("supervised.log")).unwrap_or_default()
        );
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // autostart
        let pid1 = ready(Duration::from_secs(30));
        assert!(wait_state("RUNNING", Duration::from_secs(10)).contains("RUNNING"));
        // stop: graceful (exit 0 is expected), then start again
        let s = ctl(&["stop", "bitville-apm-agent"]);
        assert!(s.contains("stopped"), "{s}");
        assert!(!alive(pid1 as u32));
        ctl(&["start", "bitville-apm-agent"]);
        let pid2 = ready(Duration::from_secs(30));
        assert_ne!(pid1, pid2);
        // crash: SIGKILL -> supervisord restarts it
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid2 as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        let pid3 = loop {
            if let Some(s) = status_at(&control) {
                let p = s["pid"].as_u64().unwrap();
                if p != pid2 {
                    break p;
                }
            }
            assert!(Instant::now() < end, "not restarted after a crash");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(alive(pid3 as u32));
        // config error: exit 78 is expected: EXITED, not restarted, no loop
        ctl(&["stop", "bitville-apm-agent"]);
        let good = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("{good}\n[limits]\nmax_memory_mb = 1\n")).unwrap();
        ctl(&["start", "bitville-apm-agent"]);
        let s = wait_state("EXITED", Duration::from_secs(10));
        assert!(s.contains("EXITED"), "{s}");
        std::thread::sleep(Duration::from_secs(3));
        let s = ctl(&["status", "bitville-apm-agent"]);
        assert!(s.contains("EXITED"), "still EXITED, not restarting: {s}");
        let log = std::fs::read_to_string(d.join("supervisord.log")).unwrap();
        let spawns = log.matches("spawned: 'bitville-apm-agent'").count();
        assert_eq!(
            spawns, 4,
            "autostart, start, crash restart, config-error start: {log}"
        );
        assert!(log.contains("exit status 78"), "{log}");
        std::fs::write(&cfg, good).unwrap();
    }));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sd.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = sd.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn usr1_dumps_status_and_json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[control]\nlog_format = \"json\"\n",
    );
    agent.proc.signal(nix::sys::signal::Signal::SIGUSR1);
    let end = Instant::now() + Duration::from_secs(10);
    let dump = loop {
        let log = agent.log();
        if let Some(l) = log.lines().find(|l| l.contains("status dump")) {
            break l.to_string();
        }
        assert!(Instant::now() < end, "no status dump after SIGUSR1:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&dump).expect("a JSON log line");
    assert_eq!(v["fields"]["message"], "status dump", "{v}");
    assert!(
        v["fields"]["status"]
            .as_str()
            .unwrap_or("")
            .contains("\"received\""),
        "{v}"
    );
    for line in agent.log().lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

/// Item 3c of the kernel-matrix/eBPF issue: a final stop used to leave `disabled` (and a lowered
/// `sample-rate`) behind, so PHP kept sending nothing until the agent ran again. A final stop
/// (SIGTERM) now hands PHP back the defaults: no kill switch, rate 1.0.
#[test]
fn a_final_stop_resets_the_php_control_files() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let run = dir.path().join("run");
    assert!(agent.cli(&["pause"]).status.success());
    assert!(
        run.join("disabled").exists(),
        "pause raises the kill switch"
    );
    // What status reports is what PHP reads.
    let s = agent.status().unwrap();
    let file: f64 = std::fs::read_to_string(run.join("sample-rate"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(s["sample_rate"].as_f64(), Some(file));
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0)
    );
    assert!(
        !run.join("disabled").exists(),
        "the kill switch is lowered on a final stop: {:?}",
        std::fs::read_to_string(run.join("disabled"))
    );
    assert_eq!(
        std::fs::read_to_string(run.join("sample-rate")).unwrap(),
        "1.0000\n"
    );
}

/// Sends `n` profiles and waits until the listener stored them: by then the pipeline has run and
/// its runtime has started whatever threads it starts.
fn flow(agent: &Agent, listener: &Listener, n: usize) {
    let sock = UnixDatagram::unbound().unwrap();
    for i in 0..n {
        sock.send_to(format!("{{\"id\":\"n-{i}\"}}").as_bytes(), agent.socket())
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while listener.stored().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} stored",
            listener.stored().len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ingest.nice`: every thread of the agent runs at the configured niceness, read from
/// `/proc/PID/task/*/stat`: -4 by default (below PHP-FPM's 0), and a configured 3 (above the
/// test's, so the setting goes both ways). Threads the runtime starts after the pipeline ran
/// inherit it too.
#[test]
fn every_thread_of_the_agent_runs_at_ingest_nice() {
    if !nix::unistd::geteuid().is_root() {
        assert!(!in_ci(), "needs root (CAP_SYS_NICE)");
        println!("SKIP (not root, not CI): going below niceness 0 needs CAP_SYS_NICE");
        return;
    }
    for (extra, want) in [("", -4), ("[ingest]\nnice = 3\n", 3)] {
        let dir = tempfile::tempdir().unwrap();
        let listener = Listener::start(dir.path(), &[]);
        let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", extra);
        flow(&agent, &listener, 200);
        // The spool's fsync tick hands the worker role to another thread every 200 ms.
        std::thread::sleep(Duration::from_millis(600));
        let nices = thread_nices(agent.proc.pid());
        assert!(nices.len() >= 2, "{nices:?}");
        assert!(
            nices.iter().all(|&(_, n)| n == want),
            "config {extra:?}: threads (tid, nice) {nices:?}, want {want}"
        );
        assert_eq!(
            agent.proc.stop(Duration::from_secs(30)),
            apm_testkit::Exit::Code(0)
        );
    }
}

/// Without CAP_SYS_NICE (dropped from the bounding set before exec, so root lacks it) the agent
/// cannot go below the niceness it inherited (2 here): it starts all the same, every thread runs
/// at 2, profiles flow, and a warning names the key and what it needs.
#[test]
fn without_cap_sys_nice_the_agent_runs_at_its_inherited_niceness_and_warns() {
    /// linux/capability.h (not in the libc crate).
    const CAP_SYS_NICE: libc::c_ulong = 23;
    if !nix::unistd::geteuid().is_root() {
        assert!(!in_ci(), "needs root (to drop a capability it has)");
        println!("SKIP (not root, not CI): needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let cfg = Agent::write_config(dir.path(), &listener.endpoint(), "off", "");
    let mut agent = Agent::start_customised(dir.path(), &cfg, |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpriority(libc::PRIO_PROCESS, 0, 2) != 0
                    || libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    flow(&agent, &listener, 200);
    let nices = thread_nices(agent.proc.pid());
    assert!(
        nices.iter().all(|&(_, n)| n == 2),
        "threads (tid, nice) {nices:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("ingest.nice") && log.contains("CAP_SYS_NICE") && log.contains("WARN"),
        "no warning naming ingest.nice:\n{log}"
    );
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0)
    );
}
