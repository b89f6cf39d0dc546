//! Pressure with real processes: a central listener that is up but slower than the traffic, and
//! an agent whose memory grows past `limits.max_memory_mb`. In both, every profile the kernel
//! accepted for the agent arrives exactly once; what does not get in is refused at the door
//! (EAGAIN, counted by the sender) rather than accepted and dropped later.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use apm_tests::common::{Agent, Listener, u};
use apm_tests::faults::{
    SendPlan, Sender, assert_exactly, profile_body, stored_ids, strip_ansi, unique_ids, wait_stored,
};
use nix::sys::signal::Signal;

/// The listener acknowledges every batch, but only 100 ms after storing it: with the agent's
/// window of 8 batches of 50 profiles that is ~4000 profiles/s, far below what one sender
/// offers. The agent must push back (stop reading; PHP's non-blocking sends get EAGAIN) rather
/// than spill a healthy listener's backlog to disk and drop it from there later: the spool stays
/// empty, nothing is dropped, and every accepted profile is stored exactly once.
#[test]
fn slow_listener_gets_backpressure_not_spooling_or_drops() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--ack-delay", "100"]);
    let agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[batch]\nmax_items = 50\nmax_age = \"50ms\"\n[limits]\nmemory_budget_mb = 1\n",
    );
    let sender = Sender::start(SendPlan {
        socket: agent.socket(),
        prefix: "s".into(),
        size: 1024,
        rate: 0,
        nonblocking: true,
        count: u64::MAX,
    });
    let until = Instant::now() + Duration::from_secs(3);
    let mut max_spool_bytes = 0;
    while Instant::now() < until {
        if let Some(s) = agent.status() {
            max_spool_bytes = max_spool_bytes.max(u(&s, "/spool_bytes"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = sender.finish();
    let accepted = report.ok.len() as u64;
    let eagain = report.errors.get(&libc::EAGAIN).copied().unwrap_or(0);
    assert!(
        report.errors.keys().all(|&e| e == libc::EAGAIN),
        "only EAGAIN: {:?}",
        report.errors
    );
    assert!(
        eagain > 0,
        "the sender outran the listener, so some sends were refused"
    );
    let st = agent.wait_for(Duration::from_mins(1), "all accepted delivered", |s| {
        u(s, "/received") == accepted
            && u(s, "/delivered") == accepted
            && u(s, "/memory_payload_bytes") == 0
    });
    assert!(u(&st, "/backpressure_episodes") > 0, "{st}");
    assert_eq!(u(&st, "/dropped/total"), 0, "{st}");
    assert_eq!(
        (max_spool_bytes, u(&st, "/spooled_batches")),
        (0, 0),
        "a healthy listener's backlog is not spooled"
    );
    let stored = wait_stored(&listener.out, accepted as usize, Duration::from_secs(30));
    assert_exactly(&stored, &report.ok_ids("s"), "slow listener");
    agent.assert_no_panic();
}

/// Memory guard: datagrams of 180 KiB land in many of the agent's 256 receive slots at once (the
/// agent is stopped while they queue), so its RSS stays over `limits.max_memory_mb` = 32 after
/// they are delivered. The guard must spill, then lower PHP's sample rate, then restart the
/// agent in place (same PID, sockets handed over), while a steady sender goes on: no send
/// fails, every profile is stored exactly once, and the fresh process is back under the limit.
#[test]
fn memory_guard_sheds_then_restarts_in_place_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[ingest]\nrecv_batch = 256\n[batch]\nmax_age = \"50ms\"\n\
         [limits]\nmax_memory_mb = 32\nmemory_budget_mb = 4\n",
    );
    let pid = agent.proc.pid();
    let before = agent.status().expect("status");
    assert!(
        u(&before, "/rss_bytes") < 32 << 20,
        "starts under the limit: {before}"
    );
    let steady = Sender::start(SendPlan {
        socket: agent.socket(),
        prefix: "m".into(),
        size: 500,
        rate: 1000,
        nonblocking: true,
        count: 9000,
    });
    std::thread::sleep(Duration::from_millis(500));
    // One socket per big datagram: a Unix datagram stays charged to its sender's send buffer
    // until it is read, so one socket could not queue 256 of them.
    let big: Vec<String> = (0..256)
        .map(|i| profile_body("big", i, 180 * 1024))
        .collect();
    agent.proc.signal(Signal::SIGSTOP);
    for body in &big {
        let s = UnixDatagram::unbound().unwrap();
        s.send_to(body.as_bytes(), agent.socket())
            .expect("the queue holds them");
    }
    agent.proc.signal(Signal::SIGCONT);

    let st = agent.wait_for(Duration::from_secs(30), "a memory self-restart", |s| {
        u(s, "/restarts") >= 1
    });
    assert_eq!(
        st["pid"].as_u64(),
        Some(u64::from(pid)),
        "restarted in place"
    );
    let report = steady.join();
    assert!(
        report.errors.is_empty(),
        "no send failed: {:?}",
        report.errors
    );
    let mut expected = report.ok_ids("m");
    expected.extend((0..256).map(|i| format!("big-{i}")));
    let stored = wait_stored(&listener.out, expected.len(), Duration::from_secs(30));
    assert_exactly(&stored, &expected, "through a memory restart");
    assert_eq!(unique_ids(&stored_ids(&listener.out)).len(), expected.len());

    let log = strip_ansi(&agent.log());
    let steps = [
        "memory over limits.max_memory_mb: spilling to the spool",
        "memory still over the limit: lowering the PHP sample rate",
        "memory still over the limit: graceful self-restart",
    ];
    let mut at = 0;
    for step in steps {
        let found = log[at..].find(step);
        assert!(
            found.is_some(),
            "{step:?} after the previous step in:\n{log}"
        );
        at += found.unwrap();
    }
    let after = agent.status().expect("status");
    assert!(
        u(&after, "/rss_bytes") < 32 << 20,
        "the fresh process is under the limit: {after}"
    );
    assert_eq!(
        agent.proc.stop(Duration::from_secs(15)),
        apm_testkit::Exit::Code(0)
    );
    agent.assert_no_panic();
}
