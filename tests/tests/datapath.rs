//! The core data path with real processes: PHP-like sender processes -> apm-agent ->
//! apm-listener's file. Exactly once by unique id; bad input rejected, counted, never forwarded,
//! and never hurting the valid traffic around it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use apm_tests::common::{Agent, Listener, sender, sender_report, u};

#[test]
fn one_hundred_thousand_from_four_processes_arrive_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let sock = agent.socket().display().to_string();
    let children: Vec<_> = (0..4)
        .map(|i| {
            sender(&[
                "--socket".into(),
                sock.clone(),
                "--count".into(),
                "25000".into(),
                "--prefix".into(),
                format!("s{i}"),
                "--size".into(),
                "300".into(),
            ])
        })
        .collect();
    let reports: Vec<_> = children.into_iter().map(sender_report).collect();
    let pids: HashSet<u64> = reports.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    for r in &reports {
        assert_eq!(r["sent"], 25000, "blocking sends never fail: {r}");
    }
    let st = agent.wait_for(Duration::from_mins(2), "100k delivered", |s| {
        u(s, "/delivered") >= 100_000
    });
    assert_eq!(u(&st, "/received"), 100_000);
    assert_eq!(u(&st, "/delivered"), 100_000);
    assert_eq!(u(&st, "/rejected"), 0);
    assert_eq!(u(&st, "/dropped/total"), 0);

    let lines = listener.stored();
    assert_eq!(
        lines.len(),
        100_000,
        "the listener stored each profile once"
    );
    let mut ids = HashSet::new();
    let mut per_pid: HashMap<u64, u64> = HashMap::new();
    for l in &lines {
        let id = l["profile"]["id"].as_str().expect("profile.id").to_string();
        assert!(ids.insert(id.clone()), "duplicate profile {id}");
        let pid = l["pid"].as_u64().unwrap();
        assert!(pids.contains(&pid), "pid {pid} is one of the senders");
        *per_pid.entry(pid).or_default() += 1;
        assert!(l["agent_id"].is_string() && l["seq"].is_u64() && l["received_ns"].is_u64());
    }
    for i in 0..4 {
        for n in 0..25000 {
            assert!(ids.contains(&format!("s{i}-{n}")), "missing s{i}-{n}");
        }
    }
    assert!(per_pid.values().all(|&n| n == 25000), "{per_pid:?}");
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn bad_input_is_rejected_counted_and_never_hurts_valid_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[ingest]\nmax_payload_bytes = 4096\n[batch]\nmax_age = \"100ms\"\n",
    );
    let sock = agent.socket();
    // A PHP-like sender whose every 10th datagram is torn JSON.
    let r = sender_report(sender(&[
        "--socket".into(),
        sock.display().to_string(),
        "--count".into(),
        "1000".into(),
        "--prefix".into(),
        "mix".into(),
        "--invalid-every".into(),
        "10".into(),
    ]));
    assert_eq!(
        (r["sent"].as_u64(), r["invalid_sent"].as_u64()),
        (Some(900), Some(100))
    );

    let d = UnixDatagram::unbound().unwrap();
    d.send_to(b"[1,2,3]", &sock).unwrap(); // not an object
    d.send_to(b"\"just a string\"", &sock).unwrap(); // not an object
    d.send_to(b"{\"bad\":\"\xff\xfe\"}", &sock).unwrap(); // not UTF-8
    d.send_to(b"", &sock).unwrap(); // empty
    d.send_to(&vec![b' '; 6000], &sock).unwrap(); // over max_payload_bytes
    d.send_to(br#"{"id":"dgram-after-bad"}"#, &sock).unwrap();

    // Stream: valid frames, then an oversize frame header closes only that connection.
    let mut s1 = UnixStream::connect(agent.stream_socket()).unwrap();
    s1.write_all(&frame(br#"{"id":"stream-1"}"#)).unwrap();
    s1.write_all(&frame(b"[]")).unwrap(); // not an object: rejected, connection goes on
    s1.write_all(&frame(br#"{"id":"stream-2"}"#)).unwrap();
    s1.write_all(&100_000u32.to_be_bytes()).unwrap(); // oversize: connection closed
    s1.flush().unwrap();
    // Stream: a torn frame (the client dies mid-frame).
    let mut s2 = UnixStream::connect(agent.stream_socket()).unwrap();
    s2.write_all(&frame(br#"{"id":"stream-3"}"#)).unwrap();
    let torn = frame(br#"{"id":"never-complete"}"#);
    s2.write_all(&torn[..10]).unwrap();
    drop(s2);
    // And a healthy connection afterwards still works.
    let mut s3 = UnixStream::connect(agent.stream_socket()).unwrap();
    s3.write_all(&frame(br#"{"id":"stream-4"}"#)).unwrap();
    drop(s3);

    let expect_valid = 900 + 1 + 4;
    let st = agent.wait_for(
        Duration::from_secs(30),
        "valid profiles delivered and rejects counted",
        |s| u(s, "/delivered") >= expect_valid && u(s, "/rejected") >= 100 + 5 + 3,
    );
    drop(s1);
    assert_eq!(u(&st, "/received"), expect_valid);
    assert_eq!(u(&st, "/delivered"), expect_valid);
    assert_eq!(u(&st, "/rejected_by_reason/invalid_json"), 100);
    assert_eq!(u(&st, "/rejected_by_reason/not_object"), 3);
    assert_eq!(u(&st, "/rejected_by_reason/invalid_utf8"), 1);
    assert_eq!(u(&st, "/rejected_by_reason/empty"), 1);
    assert_eq!(u(&st, "/rejected_by_reason/oversize"), 2);
    assert_eq!(u(&st, "/rejected_by_reason/torn_frame"), 1);
    assert_eq!(u(&st, "/rejected"), 108);
    assert_eq!(u(&st, "/dropped/total"), 0);

    let ids: HashSet<String> = listener
        .stored()
        .iter()
        .map(|l| l["profile"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len() as u64, expect_valid);
    for id in [
        "dgram-after-bad",
        "stream-1",
        "stream-2",
        "stream-3",
        "stream-4",
    ] {
        assert!(ids.contains(id), "{id} delivered");
    }
    assert!(!ids.contains("never-complete"));
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
    assert_eq!(
        agent.proc.stop(Duration::from_secs(20)),
        apm_testkit::Exit::Code(0),
        "graceful exit"
    );
}

#[test]
fn status_json_and_check_config_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", "");
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "pid",
        "version",
        "uptime_s",
        "received",
        "rejected",
        "delivered",
        "spooled_batches",
        "spool_bytes",
        "dropped",
        "breaker",
        "ebpf",
        "queue_len",
    ] {
        assert!(v.get(key).is_some(), "status --json has `{key}`: {v}");
    }
    assert_eq!(v["pid"].as_u64(), Some(u64::from(agent.proc.pid())));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[ingest]\nqueue_len = \"many\"\n").unwrap();
    let out = std::process::Command::new(apm_tests::common::bin("apm-agent"))
        .args(["--config", bad.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_len"));
}

/// Agents starting at the same moment (as two tests of one test binary do) each get the datagram
/// queue length they ask for. Each raises `net.unix.max_dgram_qlen` around its `socket(2)` and
/// then puts the old value back; unless that is serialised between processes, one agent's
/// restore can land between another's raise and its `socket(2)`, which then gets the system's
/// queue (10 here). That hung `pressure::memory_guard_sheds_then_restarts_in_place_without_loss`
/// in a fresh-clone run on 2026-12-01: its 256 blocking sends waited on a 10-datagram queue.
/// Checked from outside: with each agent stopped, datagrams from fresh sockets (so no sender's
/// own buffer limits them) go in until EAGAIN.
#[test]
fn agents_starting_together_each_get_their_queue_length() {
    use nix::sys::signal::Signal;
    const AGENTS: usize = 8;
    const QLEN: usize = 256;
    if !nix::unistd::geteuid().is_root() {
        assert!(!apm_tests::common::in_ci(), "needs root (the sysctl)");
        println!("SKIP (not root, not CI): only root may raise net.unix.max_dgram_qlen");
        return;
    }
    for round in 0..3 {
        let dirs: Vec<tempfile::TempDir> =
            (0..AGENTS).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut agents: Vec<Agent> = std::thread::scope(|s| {
            let started: Vec<_> = dirs
                .iter()
                .map(|d| {
                    s.spawn(move || {
                        Agent::start(
                            d.path(),
                            "http://127.0.0.1:1",
                            "off",
                            &format!("[ingest]\nqueue_len = {QLEN}\n"),
                        )
                    })
                })
                .collect();
            started.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, a) in agents.iter_mut().enumerate() {
            a.proc.signal(Signal::SIGSTOP);
            let mut taken = 0;
            while taken <= QLEN {
                let s = UnixDatagram::unbound().unwrap();
                s.set_nonblocking(true).unwrap();
                match s.send_to(format!("{{\"q\":{taken}}}").as_bytes(), a.socket()) {
                    Ok(_) => taken += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("send: {e}"),
                }
            }
            a.proc.signal(Signal::SIGCONT);
            assert!(
                taken >= QLEN,
                "round {round}, agent {i}: its socket took {taken} datagrams, not {QLEN}:\n{}",
                a.log()
            );
        }
        for mut a in agents {
            a.proc.stop(Duration::from_secs(30));
        }
    }
}
