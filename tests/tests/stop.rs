//! A bounded stop: SIGTERM while the central listener hangs (SIGSTOPped: the kernel still
//! accepts its TCP connections, nothing answers) exits within `limits.shutdown_timeout` with
//! everything spooled; stream clients waiting in the listen backlog at a final stop are
//! drained, not reset; and what the listener answers RETRY or REJECTED is redelivered once or
//! kept on disk, never silently discarded. All check ground truth: the listener's file, the
//! agent's spool and its `rejected/` directory.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use apm_testkit::Exit;
use apm_tests::common::{Agent, Listener, u};
use apm_tests::faults::{
    SendPlan, Sender, assert_exactly, profile_body, spool_records, stored_ids, wait_stored,
};
use nix::sys::signal::Signal;

/// Small batches, a breaker that never opens (what the listener does not take waits in memory,
/// so the stop itself must move it to disk), a short shutdown timeout, and a short ack
/// timeout: the transport gives up on the hung stream and opens a new one, which hangs too
/// (TCP connects, the stream's response never comes).
const HANG: &str = "[batch]\nmax_age = \"50ms\"\n\
                    [breaker]\nfailure_threshold = 1000000\nmax_retry_timeout = \"2s\"\n\
                    [central]\nbackoff_min = \"100ms\"\nbackoff_max = \"200ms\"\nack_timeout = \"500ms\"\n\
                    [limits]\nshutdown_timeout = \"3s\"\n";

/// 7a. SIGTERM while the listener is SIGSTOPped: exit 0 within the shutdown timeout plus 2 s,
///     every accepted profile stored or spooled at that moment; with the listener resumed and
///     the agent started again, every one stored exactly once.
#[test]
fn sigterm_with_a_hung_listener_exits_in_time_and_spools_everything() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", HANG);
    let sender = Sender::start(SendPlan {
        socket: agent.socket(),
        prefix: "h".into(),
        size: 300,
        rate: 3000,
        nonblocking: true,
        count: u64::MAX,
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !stored_ids(&listener.out).is_empty(),
        "the listener stored before it hung"
    );
    listener.proc.signal(Signal::SIGSTOP);
    // Batches pile up in flight and in memory; reconnects would also hang (TCP accepts).
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let exit = agent.proc.stop(Duration::from_secs(30));
    let took = t.elapsed();
    let r = sender.finish();
    let ok = r.ok_ids("h");
    assert_eq!(exit, Exit::Code(0), "graceful exit\n{}", agent.log());
    assert!(
        took < Duration::from_secs(5),
        "stopped within shutdown_timeout (3 s) + 2 s: took {took:?}\n{}",
        agent.log()
    );
    assert!(ok.len() > 3000, "{}", ok.len());

    // Nothing lost at the moment of exit: stored, or on disk (the listener is still stopped).
    let spooled = spool_records(&dir.path().join("spool"));
    assert!(!spooled.is_empty(), "the stop left batches in the spool");
    let mut held: HashSet<String> = stored_ids(&listener.out).into_iter().collect();
    held.extend(spooled.iter().flat_map(|r| r.ids.iter().cloned()));
    let lost: Vec<&String> = ok.difference(&held).take(10).collect();
    assert!(
        lost.is_empty(),
        "accepted but neither stored nor spooled: {lost:?}"
    );

    listener.proc.signal(Signal::SIGCONT);
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", HANG);
    let ids = wait_stored(&listener.out, ok.len(), Duration::from_mins(1));
    assert_exactly(&ids, &ok, "after a stop with a hung listener");
    agent.wait_for(Duration::from_secs(20), "spool drained", |s| {
        u(s, "/spooled_batches") == 0
    });
    agent.assert_no_panic();
}

/// A stream client that writes one complete frame (profile `id`).
fn frame(id: &str) -> Vec<u8> {
    let body = profile_body(id, 0, 200);
    let mut f = (u32::try_from(body.len()).unwrap()).to_be_bytes().to_vec();
    f.extend_from_slice(body.as_bytes());
    f
}

/// 7b. At a final stop, a stream client waiting in the listen backlog (every
///     `ingest.max_stream_connections` slot taken) that had written a complete frame has its
///     profile delivered: the kernel accepted its write, so the agent owns it.
#[test]
fn a_stream_client_in_the_listen_backlog_at_sigterm_is_drained() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[batch]\nmax_age = \"50ms\"\n\
         [ingest]\nmax_stream_connections = 2\nmax_stream_connections_per_uid = 2\n\
         stream_idle_timeout = \"5m\"\n",
    );
    // Two clients take both slots, each with a profile sent and the connection kept open.
    let mut holders = Vec::new();
    for i in 0..2 {
        let mut c = UnixStream::connect(agent.stream_socket()).expect("connect holder");
        c.write_all(&frame(&format!("slot{i}"))).expect("write");
        holders.push(c);
    }
    agent.wait_for(Duration::from_secs(10), "both slots taken", |s| {
        u(s, "/stream_connections") == 2 && u(s, "/received") == 2
    });
    // The third waits in the backlog: connect and write succeed in the kernel.
    let mut waiting = UnixStream::connect(agent.stream_socket()).expect("connect (backlog)");
    waiting
        .write_all(&frame("backlog"))
        .expect("the write into the backlog succeeded");
    std::thread::sleep(Duration::from_millis(300));
    let s = agent.status().unwrap();
    assert_eq!(
        u(&s, "/received"),
        2,
        "the third client was not accepted before the stop: {s}"
    );
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        Exit::Code(0),
        "graceful exit\n{}",
        agent.log()
    );
    let want: HashSet<String> = ["slot0-0", "slot1-0", "backlog-0"]
        .iter()
        .map(ToString::to_string)
        .collect();
    let spooled: Vec<String> = spool_records(&dir.path().join("spool"))
        .into_iter()
        .flat_map(|r| r.ids)
        .collect();
    let mut held = stored_ids(&listener.out);
    held.extend(spooled);
    assert_exactly(&held, &want, "profiles of accepted and backlogged clients");
    drop(holders);
    drop(waiting);
}

/// The ids of the profiles kept in `<spool.dir>/rejected/` (one JSON file per batch:
/// `{"seq", "reason", "profiles": [...]}`), and the number of files.
fn rejected_ids(dir: &std::path::Path) -> (Vec<String>, usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (Vec::new(), 0);
    };
    let mut ids = Vec::new();
    let mut files = 0;
    for e in entries {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        files += 1;
        for p in v["profiles"].as_array().expect("profiles") {
            ids.push(p["id"].as_str().expect("id").to_string());
        }
    }
    (ids, files)
}

/// 9. RETRY and REJECTED end to end: the listener answers the first two batches RETRY and
///    the third REJECTED. The rejected batch is kept under `<spool.dir>/rejected/` and counted
///    (`dropped.rejected_by_central`); everything else is stored exactly once.
#[test]
fn a_rejected_batch_is_kept_on_disk_and_counted_and_retried_ones_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--fail-first", "2", "--reject-first", "1"]);
    let agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        "[batch]\nmax_items = 10\nmax_age = \"50ms\"\n\
         [central]\nbackoff_min = \"100ms\"\nbackoff_max = \"200ms\"\n",
    );
    let r = Sender::start(SendPlan {
        socket: agent.socket(),
        prefix: "q".into(),
        size: 300,
        rate: 1000,
        nonblocking: false,
        count: 100,
    })
    .join();
    let ok = r.ok_ids("q");
    assert_eq!(ok.len(), 100, "blocking sends succeed: {:?}", r.errors);
    let st = agent.wait_for(Duration::from_secs(30), "everything settled", |s| {
        u(s, "/received") == 100
            && u(s, "/delivered") + u(s, "/dropped/total") == 100
            && u(s, "/spooled_batches") == 0
    });
    let (kept, files) = rejected_ids(&dir.path().join("spool/rejected"));
    assert_eq!(files, 1, "one rejected batch kept on disk: {st}");
    assert!(
        !kept.is_empty(),
        "the rejected batch's profiles are on disk"
    );
    assert_eq!(
        u(&st, "/dropped/rejected_by_central"),
        kept.len() as u64,
        "counted: {st}"
    );
    assert_eq!(u(&st, "/dropped/total"), kept.len() as u64, "{st}");
    // Every accepted profile: stored once (the RETRY ones after their resend), or kept.
    let mut held = stored_ids(&listener.out);
    held.extend(kept);
    assert_exactly(&held, &ok, "stored or kept as rejected");
    agent.assert_no_panic();
}
