//! Catch-up after a listener outage, with real processes: the listener is SIGKILLed under
//! load for long enough that the breaker's open period has grown, then started again on the
//! same address. Ground truth is the listener's file: how soon after its return a new profile
//! is stored there, and that every accepted profile is stored exactly once.

use std::time::{Duration, Instant};

use apm_tests::common::{Agent, Listener, u};
use apm_tests::faults::{
    SendPlan, Sender, assert_exactly, free_addr, stored_ids, stored_lines, wait_until,
};
use nix::sys::signal::Signal;

/// `central.probe_interval` at its default: while the listener is unreachable the agent dials
/// it once per interval.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// `batch.max_age` at its default.
const BATCH_AGE: Duration = Duration::from_millis(500);

/// The listener is down for 20 s under 1000 profiles/s with the breaker, the batcher and the
/// transport at their defaults (the scenario: the open period has grown to 8–16 s by
/// then). Once it is back, the next probe (at most one `probe_interval` later) finds it, the
/// breaker half-opens at once, and a batch is stored within probe interval + one batch age +
/// a margin for a loaded machine. Before the fix the agent waited out the grown open period
/// (and its own reconnect backoff) instead.
#[test]
fn delivery_resumes_within_a_probe_interval_of_the_listeners_return() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    let mut listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    // Defaults everywhere except the spool's size (the test's 64 MiB is plenty for 20 s).
    let agent = Agent::start(dir.path(), &format!("http://{addr}"), "off", "");
    let sender = Sender::start(SendPlan {
        socket: agent.socket(),
        prefix: "c".into(),
        size: 500,
        rate: 1000,
        nonblocking: true,
        count: u64::MAX,
    });
    wait_until(Duration::from_secs(20), "first profiles stored", || {
        (stored_lines(&out).len() > 1000).then_some(())
    });

    listener.proc.signal(Signal::SIGKILL);
    listener.proc.wait(Duration::from_secs(10));
    drop(listener);
    let down = Instant::now();
    let mut saw_open = false;
    while down.elapsed() < Duration::from_secs(20) {
        saw_open |= agent.status().is_some_and(|s| s["breaker"] == "open");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        saw_open,
        "precondition: the breaker opened during the outage"
    );
    let before = stored_lines(&out).len();

    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let back = Instant::now();
    let first = wait_until(
        Duration::from_mins(2),
        "a profile stored after the return",
        || (stored_lines(&out).len() > before).then(|| back.elapsed()),
    );
    // Derived, not a speed test: the probe finds the listener within one interval, the
    // half-open batch is already formed (the router holds the backlog) or is at most one batch
    // age old, and 2 s covers a listener start and a scheduler on a shared 2-core machine.
    let bound = PROBE_INTERVAL + BATCH_AGE + Duration::from_secs(2);
    println!("first profile stored {first:?} after the listener's return (bound {bound:?})");
    assert!(
        first <= bound,
        "delivery resumed {first:?} after the listener came back; expected within {bound:?}"
    );

    let r = sender.finish();
    let ok = r.ok_ids("c");
    agent.wait_for(Duration::from_mins(3), "everything received settled", |s| {
        u(s, "/received") == ok.len() as u64
            && u(s, "/delivered") == ok.len() as u64
            && u(s, "/spooled_batches") == 0
    });
    assert_exactly(&stored_ids(&listener.out), &ok, "after a 20 s outage");
    agent.assert_no_panic();
}
