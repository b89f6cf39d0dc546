//! Stops and restarts with a sender that keeps sending: a restart drops nothing (the sockets
//! are handed to the new process image, so datagrams sent meanwhile wait in the kernel queue),
//! SIGHUP drops nothing, and SIGTERM delivers what was received before exiting 0.

use std::collections::HashSet;
use std::time::Duration;

use apm_tests::common::{Agent, Listener, sender, sender_report, u};

fn ids(l: &Listener) -> Vec<String> {
    l.stored()
        .iter()
        .map(|v| v["profile"]["id"].as_str().unwrap().to_string())
        .collect()
}

fn steady_sender(agent: &Agent, prefix: &str, count: u64, rate: u64) -> std::process::Child {
    sender(&[
        "--socket".into(),
        agent.socket().display().to_string(),
        "--count".into(),
        count.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--prefix".into(),
        prefix.into(),
        "--nonblocking".into(),
    ])
}

fn assert_exactly_once(l: &Listener, prefix: &str, count: u64) {
    let got = ids(l);
    let set: HashSet<&String> = got.iter().collect();
    assert_eq!(set.len(), got.len(), "no profile stored twice");
    for i in 0..count {
        assert!(
            set.contains(&format!("{prefix}-{i}")),
            "{prefix}-{i} delivered"
        );
    }
}

#[test]
fn restart_under_load_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let pid = agent.proc.pid();
    // 3000 profiles/s for 4 s; restarts happen in the middle.
    let child = steady_sender(&agent, "r", 12_000, 3000);
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..2 {
        let out = agent.cli(&["restart"]);
        assert!(
            out.status.success(),
            "restart: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(600));
    }
    let r = sender_report(child);
    assert_eq!(r["eagain"], 0, "no send failed during the restarts: {r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert_eq!(r["sent"], 12_000);
    let st = agent.wait_for(Duration::from_secs(30), "everything delivered", |s| {
        u(s, "/delivered") >= 1
    });
    assert_eq!(st["restarts"], 2, "restarted twice in place");
    assert_eq!(
        st["pid"].as_u64(),
        Some(pid as u64),
        "same PID after re-exec"
    );
    // Counters restart with the image; the listener's file is the ground truth.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while (ids(&listener).len() as u64) < 12_000 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_exactly_once(&listener, "r", 12_000);
    assert_eq!(ids(&listener).len(), 12_000);
}

#[test]
fn sighup_reload_drops_nothing_and_a_bad_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let child = steady_sender(&agent, "h", 6000, 3000);
    std::thread::sleep(Duration::from_millis(500));
    agent.proc.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    // A broken file: the reload is refused, the agent keeps running on the old config.
    let good = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!("{good}\n[limits]\nmax_memory_mb = \"lots\"\n"),
    )
    .unwrap();
    let out = agent.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload refused") && err.contains("max_memory_mb"),
        "{err}"
    );
    std::fs::write(&agent.config, good).unwrap();
    let r = sender_report(child);
    assert_eq!(
        (r["sent"].as_u64(), r["eagain"].as_u64()),
        (Some(6000), Some(0)),
        "{r}"
    );
    agent.wait_for(Duration::from_secs(30), "all delivered", |s| {
        u(s, "/delivered") >= 6000
    });
    assert_exactly_once(&listener, "h", 6000);
    assert!(agent.log().contains("reload refused"));
}

#[test]
fn sigterm_under_load_delivers_what_was_received_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let child = steady_sender(&agent, "t", 100_000, 20_000);
    std::thread::sleep(Duration::from_millis(700));
    let before = agent.status().unwrap();
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        Some(0),
        "graceful exit 0"
    );
    let r = sender_report(child);
    // After SHUT_RD the senders get EPIPE (or ECONNREFUSED once the socket file is gone): those
    // profiles were never accepted by the kernel, and PHP drops them without waiting.
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= u(&before, "/received"));
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped"))
        .expect("final log line");
    let field = |k: &str| -> u64 {
        let i = line.find(&format!("{k}=")).unwrap() + k.len() + 1;
        line[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        field("received"),
        sent,
        "every datagram the kernel accepted was read: {line}"
    );
    assert_eq!(field("delivered"), sent, "and delivered: {line}");
    let got = ids(&listener);
    assert_eq!(got.len() as u64, sent);
    // The sender reports how many sends the kernel accepted, not which (EPIPE can hit any of
    // them once reading is shut): every stored id must be one it made, each stored once.
    let set: HashSet<&String> = got.iter().collect();
    assert_eq!(set.len() as u64, sent, "no profile stored twice");
    for id in &got {
        let i: u64 = id
            .strip_prefix("t-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected id {id}"));
        assert!(i < 100_000, "unexpected id {id}");
    }
}
