//! Local clients that hold the agent's doors open: idle TCP connections to `/metrics` that would
//! exhaust its file descriptors, and stream clients that send a byte and stall. Neither may
//! take down another stage (the control socket, datagram ingest, delivery) nor starve a real
//! PHP sender; every connection the agent refuses or cuts is counted with its reason.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apm_tests::common::{Agent, Listener, bin, sender, sender_report, u};
use serde_json::Value;

/// Sets RLIMIT_NOFILE (soft and hard) of the child about to exec.
fn nofile_limit(cmd: &mut Command, n: u64) {
    // SAFETY: setrlimit is async-signal-safe and touches only the child being exec'd.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `GET path` over HTTP/1.0: the status code and body, or `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

/// `apm-agent status --json` through the CLI, parsed (`None` when it does not answer).
fn cli_status(agent: &Agent) -> Option<Value> {
    let out = agent.cli(&["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Sends `count` datagram profiles with ids `prefix-0..` and waits until the listener stored
/// each of them, once.
fn datagrams_are_delivered(agent: &Agent, listener: &Listener, prefix: &str, count: u64) {
    let r = sender_report(sender(&[
        "--socket".into(),
        agent.socket().display().to_string(),
        "--count".into(),
        count.to_string(),
        "--prefix".into(),
        prefix.into(),
    ]));
    assert_eq!(r["sent"], count, "blocking sends never fail: {r}");
    let want: HashSet<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    apm_testkit::poll(
        Duration::from_secs(30),
        || {
            let mut seen = HashSet::new();
            for l in listener.stored() {
                let id = l["profile"]["id"].as_str().unwrap_or_default().to_string();
                if want.contains(&id) {
                    assert!(seen.insert(id.clone()), "{id} stored twice");
                }
            }
            (seen.len() == want.len()).then_some(())
        },
        || {
            format!(
                "not all {count} `{prefix}` profiles stored\n{}",
                agent.log()
            )
        },
    );
}

/// `n` idle TCP clients of the metrics port. A connect that times out (the listen backlog is
/// full because the agent stopped accepting) is left out: what matters is what the agent does.
fn idle_clients(port: u16, n: usize) -> Vec<TcpStream> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
        .collect()
}

fn metrics_config(dir: &Path, listener: &Listener) -> (std::path::PathBuf, u16) {
    let port = apm_testkit::free_port().unwrap();
    let config = Agent::write_config(
        dir,
        &listener.endpoint(),
        "off",
        &format!("[control]\nmetrics_listen = \"127.0.0.1:{port}\""),
    );
    (config, port)
}

/// 400 idle connections to `/metrics` against an agent limited to 256 descriptors: the metrics
/// server holds at most its cap and refuses the rest (counted), so the control socket, datagram
/// ingest and delivery go on, and `/metrics` answers again once the idle clients leave.
#[test]
fn idle_metrics_connections_are_capped_and_the_other_stages_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let (config, port) = metrics_config(dir.path(), &listener);
    let agent = Agent::start_customised(dir.path(), &config, |c| nofile_limit(c, 256));

    let idle = idle_clients(port, 400);
    let over_cap = (idle.len() - apm_agent::control::METRICS_MAX_CONNECTIONS) as u64;
    // The agent has accepted (or refused) all of them once the counter says so.
    let st = apm_testkit::poll(
        Duration::from_secs(10),
        || cli_status(&agent).filter(|s| u(s, "/connections_refused/metrics_limit") >= over_cap),
        || {
            format!(
                "status --json did not answer or did not count {over_cap} refused connections \
                 of {}: {:?}\n{}",
                idle.len(),
                cli_status(&agent),
                agent.log()
            )
        },
    );
    assert_eq!(u(&st, "/accept_errors/control"), 0, "{st:#}");
    datagrams_are_delivered(&agent, &listener, "fd", 300);
    assert!(
        cli_status(&agent).is_some(),
        "the control socket answers while the idle connections are held"
    );

    drop(idle);
    let (code, body) = apm_testkit::poll(
        Duration::from_secs(10),
        || http_get(port, "/metrics"),
        || format!("/metrics does not answer\n{}", agent.log()),
    );
    assert_eq!(code, 200, "{body}");
    let refused = body
        .lines()
        .find(|l| l.starts_with("apm_connections_refused_total{reason=\"metrics_limit\"}"))
        .unwrap_or_else(|| panic!("no refused-connection counter in /metrics:\n{body}"));
    let n: u64 = refused.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= over_cap, "{refused}");
    agent.assert_no_panic();
}

/// The agent's descriptors run out (its RLIMIT_NOFILE is lowered under it, then idle clients
/// take the rest): accept fails with EMFILE in every server. Each backs off and counts it; none
/// ends, so once the idle clients go, status, `/metrics` and delivery all work again.
#[test]
fn accept_loops_survive_descriptor_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let (config, port) = metrics_config(dir.path(), &listener);
    let agent = Agent::start_with(dir.path(), &config);
    datagrams_are_delivered(&agent, &listener, "before", 100);

    let pid = agent.proc.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let lim = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: prlimit with a valid pid and a limit to set, nothing to read back.
    let rc = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &raw const lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let idle = idle_clients(port, 100);
    // The stream socket and the control socket are tried while no descriptor is left: well
    // within the 5 s after which the metrics server drops the idle clients it holds.
    std::thread::sleep(Duration::from_millis(300));
    let pending = UnixStream::connect(agent.stream_socket());
    std::thread::sleep(Duration::from_millis(300));
    let _ = cli_status(&agent);
    drop((idle, pending));

    let st = apm_testkit::poll(
        Duration::from_secs(20),
        || cli_status(&agent),
        || format!("status --json never answered again\n{}", agent.log()),
    );
    for server in ["control", "metrics", "stream"] {
        assert!(
            u(&st, &format!("/accept_errors/{server}")) > 0,
            "{server}'s accept errors are counted: {st:#}"
        );
    }
    let (code, body) = apm_testkit::poll(
        Duration::from_secs(10),
        || http_get(port, "/metrics"),
        || format!("/metrics does not answer\n{}", agent.log()),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("apm_accept_errors_total{server=\"metrics\"}"));
    datagrams_are_delivered(&agent, &listener, "after", 100);
    agent.assert_no_panic();
}

/// One frame per new connection, as `listener.php` sends a large profile.
fn send_frame(path: &Path, id: &str) {
    let body = format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(2000));
    let mut s = UnixStream::connect(path).expect("connect stream socket");
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body.as_bytes());
    s.write_all(&f).expect("write frame");
}

/// 300 stalled stream connections from another uid (each sent one byte, or a whole header and
/// one byte of a 1 MiB frame) beside a real sender: the real frames are stored within 3 s each
/// all along, and every stalled connection is closed (refused over the per-uid cap, or cut at
/// the frame deadline) and counted by reason.
#[test]
fn stalled_stream_clients_cannot_starve_a_real_sender() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !apm_testkit::in_ci(),
            "needs root (to run a client as uid 65534)"
        );
        eprintln!("skipped: needs root (to run a client as uid 65534)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    // The stalling client runs as nobody: it must reach the socket.
    for d in [dir.path().to_path_buf(), dir.path().join("run")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // ... and its binary too: a checkout in a private (0700) directory is out of its reach.
    let staller_bin = dir.path().join("apm-test-sender");
    std::fs::copy(bin("apm-test-sender"), &staller_bin).unwrap();
    let mut staller = Command::new(&staller_bin)
        .args(["--socket"])
        .arg(agent.stream_socket())
        .args(["--stall", "300", "--stall-declare", "1048576"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stalling client");
    let mut report = BufReader::new(staller.stdout.take().unwrap()).lines();
    let ready = report.next().expect("staller ready line").unwrap();
    assert!(ready.contains("\"ready\":300"), "{ready}");
    let stalled_at = Instant::now();

    // A real sender keeps sending, one frame per connection, for longer than the deadline.
    let mut i = 0;
    while stalled_at.elapsed() < Duration::from_secs(14) {
        let id = format!("real-{i}");
        let sent = Instant::now();
        send_frame(&agent.stream_socket(), &id);
        apm_testkit::poll(
            Duration::from_secs(3),
            || {
                listener
                    .stored()
                    .iter()
                    .any(|l| l["profile"]["id"] == id.as_str())
                    .then_some(())
            },
            || {
                format!(
                    "{id} not stored within 3 s ({:?} after the stall began); status: {:?}",
                    sent - stalled_at,
                    agent.status()
                )
            },
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(300));
    }

    let st = agent.wait_for(
        Duration::from_secs(10),
        "every stalled connection closed and counted",
        |s| {
            u(s, "/connections_refused/per_uid_limit")
                + u(s, "/connections_refused/frame_timeout")
                + u(s, "/connections_refused/buffer_budget")
                == 300
                && u(s, "/stream_connections") == 0
        },
    );
    assert_eq!(
        u(&st, "/connections_refused/per_uid_limit"),
        300 - 256,
        "over the default per-uid cap: refused at once: {st:#}"
    );
    assert!(
        u(&st, "/connections_refused/frame_timeout") > 0,
        "the one-byte clients are cut at the deadline: {st:#}"
    );
    assert!(
        u(&st, "/connections_refused/buffer_budget") > 0,
        "150 declared MiB do not fit the shared budget: {st:#}"
    );
    assert_eq!(u(&st, "/received_stream"), i, "{st:#}");
    staller.stdin.take().unwrap().write_all(b"\n").unwrap();
    let done: Value = serde_json::from_str(&report.next().expect("report").unwrap()).unwrap();
    assert_eq!(done["uid"], 65534);
    assert_eq!(done["closed_by_peer"], 300, "{done}");
    let _ = staller.wait();
    let stored = listener.stored();
    let ids: HashSet<&str> = stored
        .iter()
        .filter_map(|l| l["profile"]["id"].as_str())
        .collect();
    assert_eq!(ids.len(), stored.len(), "each stored once");
    assert_eq!(ids.len() as u64, i);
    agent.assert_no_panic();
}
