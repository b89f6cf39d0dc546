//! Fault tests with real processes and real signals: a long listener outage, a listener that
//! dies between storing and acking, SIGTERM under load (listener up, and down), SIGKILL in
//! write-ahead mode, a damaged spool, a full disk, and a full spool under `drop_newest`.
//! Every test names each profile with a unique id and checks the listener's file: nothing the
//! kernel accepted for the agent is lost (beyond what the test states), nothing is stored twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use apm_tests::common::{Agent, Listener, Proc, u};
use apm_tests::faults::{
    SendPlan, Sender, Tmpfs, assert_exactly, free_addr, log_field, profile_body, spool_records,
    stored_ids, stored_lines, strip_ansi, unique_ids, wait_stored,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Small batches, and a breaker and reconnect backoff that come back within a couple of
/// seconds once the listener does.
const FAST: &str = "[batch]\nmax_age = \"50ms\"\n\
                    [breaker]\nmax_retry_timeout = \"2s\"\n\
                    [central]\nbackoff_max = \"1s\"\n";

fn plan(agent: &Agent, prefix: &str, size: usize, rate: u64, nonblocking: bool) -> SendPlan {
    SendPlan {
        socket: agent.socket(),
        prefix: prefix.into(),
        size,
        rate,
        nonblocking,
        count: u64::MAX,
    }
}

fn endpoint(addr: &str) -> String {
    format!("http://{addr}")
}

/// Waits until the agent has settled everything it received: delivered or dropped, nothing
/// left in memory or in the spool.
fn wait_settled(agent: &Agent, received: u64, timeout: Duration) -> Value {
    agent.wait_for(timeout, "everything received settled", |s| {
        u(s, "/received") == received
            && u(s, "/delivered") + u(s, "/dropped/total") == received
            && u(s, "/spooled_batches") == 0
            && u(s, "/memory_payload_bytes") == 0
    })
}

/// 1. The listener is down for 30 s under a steady 1000 profiles/s: the breaker opens, the
///    batches go to disk and memory stays flat; once the listener is back every accepted profile
///    arrives exactly once, the breaker closes and the spool drains to empty.
#[test]
fn listener_down_30s_under_load_everything_arrives_once_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    let mut listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let agent = Agent::start(
        dir.path(),
        &endpoint(&addr),
        "off",
        &format!(
            "{FAST}[batch]\nmax_age = \"200ms\"\n\
             [spool]\nmax_bytes = 268435456\n"
        ),
    );
    // 2 KB profiles: the outage carries ~60 MB, far more than any RSS growth we tolerate.
    let sender = Sender::start(plan(&agent, "o", 2000, 1000, true));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        listener.proc.stop(Duration::from_secs(10)),
        apm_testkit::Exit::Code(0)
    );
    drop(listener);
    let down = Instant::now();

    let mut saw_open = false;
    let mut rss_early = 0;
    let mut rss_late = 0;
    let mut max_spooled = 0;
    while down.elapsed() < Duration::from_secs(30) {
        let s = agent.status().expect("agent answers during the outage");
        saw_open |= s["breaker"] == "open";
        max_spooled = max_spooled.max(u(&s, "/spooled_batches"));
        let t = down.elapsed();
        if rss_early == 0 && t >= Duration::from_secs(5) {
            rss_early = u(&s, "/rss_bytes");
        }
        if t >= Duration::from_secs(28) && rss_late == 0 {
            rss_late = u(&s, "/rss_bytes");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = agent.status().unwrap();
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let r = sender.finish();
    let ok = r.ok_ids("o");
    assert!(
        ok.len() > 30_000,
        "about 1000/s for 35 s accepted: {}",
        ok.len()
    );

    wait_settled(&agent, ok.len() as u64, Duration::from_secs(90));
    let st = agent.wait_for(Duration::from_secs(10), "breaker closed", |s| {
        s["breaker"] == "closed"
    });
    assert_exactly(&stored_ids(&listener.out), &ok, "after a 30 s outage");
    assert_eq!(u(&st, "/dropped/total"), 0, "{st}");
    assert_eq!(u(&st, "/delivered"), ok.len() as u64);
    assert!(saw_open, "the breaker opened during the outage: {during}");
    assert!(
        max_spooled > 50,
        "the outage went to disk (max spooled batches {max_spooled})"
    );
    println!("rss at 5 s {rss_early}, at 28 s {rss_late}; max spooled batches {max_spooled}");
    // ~46 MB of profiles arrived between the two samples; the agent's memory must not follow.
    assert!(rss_early > 0 && rss_late > 0);
    assert!(
        rss_late < rss_early + 24 * 1024 * 1024,
        "RSS grew with the outage: {rss_early} -> {rss_late}"
    );
    agent.assert_no_panic();
}

/// 2. The listener stores a batch, then drops the stream instead of acking: the agent resends,
///    and the listener deduplicates the resend.
#[test]
fn listener_drops_the_connection_before_acking_the_resend_is_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut listener = Listener::start(dir.path(), &["--drop-before-ack", "3"]);
    let agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        &format!("{FAST}[batch]\nmax_items = 100\n"),
    );
    let mut p = plan(&agent, "d", 300, 3000, false);
    p.count = 3000;
    let r = Sender::start(p).join();
    assert_eq!(r.ok.len(), 3000, "blocking sends succeed: {:?}", r.errors);
    let ok = r.ok_ids("d");
    wait_settled(&agent, 3000, Duration::from_secs(30));
    let ids = wait_stored(&listener.out, 3000, Duration::from_secs(10));
    assert_exactly(&ids, &ok, "with a stream dropped before its ack");
    let st = agent.status().unwrap();
    assert_eq!(u(&st, "/delivered"), 3000);
    assert!(u(&st, "/reconnects") >= 2, "the agent reconnected: {st}");
    assert_eq!(
        listener.proc.stop(Duration::from_secs(15)),
        apm_testkit::Exit::Code(0)
    );
    let log = strip_ansi(&std::fs::read_to_string(dir.path().join("listener.log")).unwrap());
    assert!(
        log.contains("dropping the stream before its ack"),
        "the fault fired:\n{log}"
    );
    let dups = log_field(&log, "duplicate_batches_total", "duplicate_batches_total");
    assert!(
        dups.is_some_and(|d| d >= 1),
        "the resent batch reached the listener and was deduplicated:\n{log}"
    );
}

/// 3a. SIGTERM while profiles pour in, listener up: exit 0; started again, the agent carries
///     on; every profile the kernel accepted (before, and after the restart) arrives once.
#[test]
fn sigterm_under_load_then_start_again_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", FAST);
    let sender = Sender::start(plan(&agent, "t", 300, 5000, true));
    std::thread::sleep(Duration::from_secs(1));
    let before = sender.accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0),
        "graceful exit"
    );
    std::thread::sleep(Duration::from_millis(300));
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", FAST);
    std::thread::sleep(Duration::from_secs(1));
    let r = sender.finish();
    let ok = r.ok_ids("t");
    assert!(
        before > 1000 && ok.len() as u64 > before + 1000,
        "load on both sides"
    );
    assert!(
        !r.errors.is_empty(),
        "the sender saw the agent gone between the two runs"
    );
    let ids = wait_stored(&listener.out, ok.len(), Duration::from_secs(30));
    assert_exactly(&ids, &ok, "across SIGTERM and start");
    agent.assert_no_panic();
}

/// 3b. SIGTERM while the listener is down: the agent spools what it holds and exits 0 within
///     the shutdown timeout; at that point every accepted profile is in the listener's file or
///     in the spool; with listener and agent back, all of them arrive exactly once.
#[test]
fn sigterm_with_listener_down_spools_then_everything_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    let mut listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    // A breaker that does not open: what the listener did not take waits in memory, so the
    // shutdown itself must move it to disk.
    let cfg = format!(
        "{FAST}[limits]\nshutdown_timeout = \"3s\"\n[breaker]\nfailure_threshold = 1000000\n"
    );
    let mut agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let sender = Sender::start(plan(&agent, "u", 300, 3000, true));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        listener.proc.stop(Duration::from_secs(10)),
        apm_testkit::Exit::Code(0)
    );
    drop(listener);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0),
        "graceful exit"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "stopped within the shutdown timeout"
    );
    let r = sender.finish();
    let ok = r.ok_ids("u");
    assert!(ok.len() > 5000, "{}", ok.len());

    // Nothing lost at the moment of exit: stored, or on disk.
    let stored_before: Vec<String> = stored_ids(&out);
    let spooled = spool_records(&dir.path().join("spool"));
    assert!(
        !spooled.is_empty(),
        "the shutdown left batches in the spool"
    );
    let mut held: Vec<String> = stored_before.clone();
    held.extend(spooled.iter().flat_map(|r| r.ids.iter().cloned()));
    let held: HashSet<String> = held.into_iter().collect();
    let lost: Vec<&String> = ok.difference(&held).take(10).collect();
    assert!(
        lost.is_empty(),
        "accepted but neither stored nor spooled: {lost:?}"
    );
    assert!(
        agent
            .log()
            .contains("undelivered batches kept in the spool")
    );

    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let ids = wait_stored(&listener.out, ok.len(), Duration::from_mins(1));
    assert_exactly(&ids, &ok, "after a shutdown that spooled");
    agent.wait_for(Duration::from_secs(20), "spool drained", |s| {
        u(s, "/spooled_batches") == 0
    });
    agent.assert_no_panic();
}

/// A tiny xorshift for kill timings (the tests crate has no rand); the seed is printed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("FAULTS_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 4. `spool.mode = "always"`, `fsync = "always"`: SIGKILL 100 times at random points under a
///    steady load (acks are delayed so batches are in flight at the kill). Each incarnation of the
///    agent gets its own sender (ids `k<i>-<n>`), so the ids each one received are known: one
///    blocking sender on one datagram socket is received in send order. Just before each kill the
///    test reads `durable_profiles` from `status --json`: the agent's claim that the first D
///    profiles it received are in the spool (or delivered). At the end every one of those claimed
///    profiles has been stored by the listener, exactly once and byte-exact; what was lost of an
///    incarnation is only what it never reported durable; and `at_risk_profiles` (profiles held
///    only in memory) never exceeded one write-ahead group: ingest reads the kernel queue out,
///    at most `ingest.queue_len` datagrams plus the rest of the receive call that reached it
///    (`ingest.recv_batch` - 1), and waits for the group's commit before reading on.
#[test]
fn sigkill_100_times_in_write_ahead_mode_delivers_every_profile_reported_durable() {
    const KILLS: usize = 100;
    const SIZE: usize = 300;
    const RECV_BATCH: u64 = 32;
    const QUEUE_LEN: u64 = 128;
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--ack-delay", "30"]);
    let cfg = format!(
        "{FAST}[batch]\nmax_age = \"20ms\"\nmax_items = 50\n\
         [ingest]\nqueue_len = {QUEUE_LEN}\nrecv_batch = {RECV_BATCH}\n\
         [spool]\nmode = \"always\"\nfsync = \"always\"\nsegment_bytes = 65536\n"
    );
    let mut rng = Rng::new();
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", &cfg);
    // Per incarnation: the ids it was sent that the kernel accepted, and how many it reported
    // durable just before it was killed.
    let mut claimed: HashSet<String> = HashSet::new();
    let mut accepted: HashSet<String> = HashSet::new();
    let mut reports = Vec::new();
    let mut max_at_risk = 0;
    for k in 0..=KILLS {
        let prefix = format!("k{k}");
        let sender = Sender::start(plan(&agent, &prefix, SIZE, 2000, false));
        if k == KILLS {
            // The last agent lives: what it receives must all arrive.
            std::thread::sleep(Duration::from_secs(1));
            let r = sender.finish();
            accepted.extend(r.ok_ids(&prefix));
            claimed.extend(r.ok_ids(&prefix));
            break;
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(200)));
        let s = agent.status().expect("status before the kill");
        let durable = s
            .pointer("/durable_profiles")
            .and_then(Value::as_u64)
            .expect("status --json reports durable_profiles");
        let at_risk = s
            .pointer("/at_risk_profiles")
            .and_then(Value::as_u64)
            .expect("status --json reports at_risk_profiles");
        max_at_risk = max_at_risk.max(at_risk);
        agent.proc.signal(Signal::SIGKILL);
        assert_eq!(
            agent.proc.wait(Duration::from_secs(10)),
            apm_testkit::Exit::Signaled(libc::SIGKILL),
            "killed"
        );
        agent.assert_no_panic();
        let r = sender.finish();
        assert!(
            durable as usize <= r.ok.len(),
            "incarnation {k} claims {durable} durable of {} sent",
            r.ok.len()
        );
        accepted.extend(r.ok_ids(&prefix));
        claimed.extend(
            r.ok[..durable as usize]
                .iter()
                .map(|i| format!("{prefix}-{i}")),
        );
        reports.push((durable, r.ok.len()));
        agent = Agent::start(dir.path(), &listener.endpoint(), "off", &cfg);
    }
    println!("(durable, accepted) per incarnation: {reports:?}");
    assert!(
        reports.iter().filter(|(d, _)| *d > 0).count() > KILLS / 2,
        "most incarnations reported something durable before the kill: {reports:?}"
    );
    agent.wait_for(Duration::from_mins(1), "spool drained", |s| {
        u(s, "/spooled_batches") == 0 && u(s, "/at_risk_profiles") == 0
    });
    let lines = stored_lines(&listener.out);
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l["profile"]["id"].as_str().unwrap().to_string())
        .collect();
    let got = unique_ids(&ids);
    for l in &lines {
        let id = l["profile"]["id"].as_str().unwrap();
        let (prefix, i) = id.rsplit_once('-').unwrap();
        let want: Value =
            serde_json::from_str(&profile_body(prefix, i.parse().unwrap(), SIZE)).unwrap();
        assert_eq!(l["profile"], want, "profile {id} stored exactly as sent");
    }
    let missing: Vec<&String> = claimed.difference(&got).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} profiles reported durable (or received by the last agent) were never delivered, e.g. {missing:?}",
        claimed.difference(&got).count()
    );
    let extra: Vec<&String> = got.difference(&accepted).take(10).collect();
    assert!(extra.is_empty(), "stored but never sent: {extra:?}");
    assert!(
        max_at_risk < QUEUE_LEN + RECV_BATCH,
        "at most one group is only in memory in write-ahead mode: {max_at_risk}"
    );
}

/// Stops a process that must already be stopped; a helper for readability.
fn stopped(p: &mut Proc) {
    assert_eq!(
        p.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0),
        "{} exits 0",
        p.name
    );
}

/// 5. A damaged spool: a segment truncated mid-record, one record with a flipped bit, a garbage
///    file and a segment-named file with a foreign header. The agent starts, truncates, skips
///    and quarantines with counts, never panics, and delivers exactly the rest.
#[test]
fn damaged_spool_is_recovered_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr(); // the listener is down until the end
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 50\n[spool]\nsegment_bytes = 65536\n[limits]\nshutdown_timeout = \"2s\"\n"
    );
    let mut agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let mut p = plan(&agent, "c", 250, 4000, false);
    p.count = 2000;
    let r = Sender::start(p).join();
    assert_eq!(r.ok.len(), 2000);
    agent.wait_for(Duration::from_secs(20), "all received", |s| {
        u(s, "/received") == 2000
    });
    stopped(&mut agent.proc);
    let spool = dir.path().join("spool");
    let recs = spool_records(&spool);
    let all: HashSet<String> = recs.iter().flat_map(|r| r.ids.iter().cloned()).collect();
    assert_eq!(all, r.ok_ids("c"), "everything was spooled at shutdown");
    let segs: Vec<u64> = {
        let mut v: Vec<u64> = recs.iter().map(|r| r.segment).collect();
        v.dedup();
        v
    };
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    let seg_path = |id: u64| spool.join(format!("seg-{id:020}.spool"));

    // A bit flip in the body of a record in the middle of a segment.
    let in_seg = |id: u64| recs.iter().filter(move |r| r.segment == id);
    let mid_seg = *segs
        .iter()
        .find(|&&s| in_seg(s).count() >= 3)
        .expect("a segment with 3 records");
    let flipped = in_seg(mid_seg).nth(1).unwrap().clone();
    let mut bytes = std::fs::read(seg_path(mid_seg)).unwrap();
    bytes[flipped.offset as usize + 24 + 40] ^= 0x10;
    std::fs::write(seg_path(mid_seg), &bytes).unwrap();
    // The last segment cut in the middle of its last record.
    let last_seg = *segs.last().unwrap();
    let torn = in_seg(last_seg).next_back().unwrap().clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg_path(last_seg))
        .unwrap();
    f.set_len(torn.offset + 24 + 30).unwrap();
    drop(f);
    // Foreign files.
    std::fs::write(
        spool.join("garbage.bin"),
        b"\x00\xffnot a spool file at all",
    )
    .unwrap();
    std::fs::write(
        spool.join("seg-00000000000000000999.spool"),
        vec![0x5a; 4096],
    )
    .unwrap();

    let mut expect = all.clone();
    for id in flipped.ids.iter().chain(&torn.ids) {
        expect.remove(id);
    }
    assert_eq!(expect.len(), 2000 - flipped.ids.len() - torn.ids.len());

    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let mut agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    agent.wait_for(Duration::from_secs(30), "spool drained", |s| {
        u(s, "/spooled_batches") == 0 && u(s, "/delivered") >= expect.len() as u64
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly(&stored_ids(&listener.out), &expect, "after spool damage");
    // Issue 11.5: what the damage cost is counted where operators look, not only logged.
    let lost = (flipped.ids.len() + torn.ids.len()) as u64;
    let s = agent.status().expect("status");
    assert_eq!(u(&s, "/dropped/spool_corrupt"), lost, "{s}");
    assert_eq!(u(&s, "/dropped/total"), lost, "{s}");
    let log = agent.log();
    assert_eq!(log_field(&log, "spool opened", "corrupt"), Some(1), "{log}");
    assert_eq!(
        log_field(&log, "spool opened", "quarantined"),
        Some(2),
        "{log}"
    );
    assert!(log.contains("torn spool segment tail truncated"), "{log}");
    let q: Vec<_> = std::fs::read_dir(spool.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(
        agent.proc.child.try_wait().is_ok_and(|s| s.is_none()),
        "still running"
    );
    agent.assert_no_panic();
}

/// 6. The spool's volume fills up (a 4 MiB tmpfs, most of it taken by another file) while the
///    listener is down: the agent keeps running, drops the oldest segments and counts them; when
///    space returns and the listener is back, everything received since is delivered and every
///    profile is accounted for.
#[test]
fn disk_full_drops_oldest_counts_it_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let vol = dir.path().join("vol");
    let _mnt = match Tmpfs::mount(&vol, "4m") {
        Ok(m) => m,
        Err(e) if !apm_tests::common::in_ci() => {
            println!("skipped: cannot mount a tmpfs here: {e}");
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs (CI runs as root): {e}"),
    };
    let addr = free_addr();
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 50\n\
         [spool]\ndir = \"{}\"\nmax_bytes = 3145728\nsegment_bytes = 131072\n",
        vol.join("spool").display()
    );
    let mut agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    // Another tenant of the volume takes most of it: the spool hits ENOSPC below max_bytes.
    let filler = vol.join("filler");
    std::fs::write(&filler, vec![0u8; 2560 * 1024]).unwrap();
    // Phase A: 2 MB/s into ~1.5 MiB of free space.
    let sender = Sender::start(plan(&agent, "f", 1000, 2000, false));
    let st = agent.wait_for(Duration::from_secs(30), "a disk-full drop", |s| {
        u(s, "/dropped/spool_full") > 0
    });
    std::thread::sleep(Duration::from_secs(1));
    let a = sender.finish();
    agent.wait_for(Duration::from_secs(20), "phase A received", |s| {
        u(s, "/received") == a.ok.len() as u64
    });
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "still running"
    );
    assert!(
        agent
            .log()
            .contains("disk full: oldest spool segment dropped"),
        "dropped because of ENOSPC, not max_bytes: {st}\n{}",
        agent.log()
    );
    // Phase B: space returns (the listener is still down); what comes now fits and is kept.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A batch that was out on a probe when its segment was dropped is counted as dropped only
    // when the probe comes back (it could still be acknowledged). Take the reference when
    // nothing is in memory or in flight, so that every drop of phase A has been counted.
    let st_a = agent.wait_for(Duration::from_secs(20), "phase A settled", |s| {
        u(s, "/memory_payload_bytes") == 0
    });
    let mut p = plan(&agent, "g", 1000, 1000, false);
    p.count = 500;
    let b = Sender::start(p).join();
    assert_eq!(b.ok.len(), 500);
    let received = (a.ok.len() + 500) as u64;
    agent.wait_for(Duration::from_secs(20), "phase B spooled", |s| {
        u(s, "/received") == received && u(s, "/memory_payload_bytes") == 0
    });
    // And the listener is back.
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let st = wait_settled(&agent, received, Duration::from_mins(1));
    let ids = stored_ids(&listener.out);
    let got = unique_ids(&ids);
    assert_eq!(u(&st, "/delivered"), ids.len() as u64, "{st}");
    assert_eq!(
        u(&st, "/received"),
        u(&st, "/delivered") + u(&st, "/dropped/total"),
        "{st}"
    );
    assert_eq!(
        u(&st, "/dropped/total"),
        u(&st_a, "/dropped/total"),
        "nothing dropped once space returned: {st}"
    );
    assert!(u(&st, "/dropped/spool_full") > 0, "{st}");
    let mut sent = a.ok_ids("f");
    sent.extend(b.ok_ids("g"));
    assert!(got.is_subset(&sent));
    let fresh = b.ok_ids("g");
    let missing: Vec<&String> = fresh.difference(&got).take(10).collect();
    assert!(
        missing.is_empty(),
        "spooled after space returned, not delivered: {missing:?}"
    );
    agent.assert_no_panic();
}

/// 7. A full spool under `drop_newest`, listener down: the newest batches are refused and
///    counted; once the listener is back, received == delivered + dropped, exactly.
#[test]
fn spool_full_drop_newest_accounts_for_every_profile() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 20\n\
         [spool]\nmax_bytes = 262144\nsegment_bytes = 65536\non_full = \"drop_newest\"\n"
    );
    let agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let mut p = plan(&agent, "n", 500, 2000, false);
    p.count = 4000;
    let r = Sender::start(p).join();
    assert_eq!(r.ok.len(), 4000);
    agent.wait_for(Duration::from_secs(20), "all received, spool full", |s| {
        u(s, "/received") == 4000 && u(s, "/dropped/spool_full") > 0
    });
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let st = wait_settled(&agent, 4000, Duration::from_mins(1));
    std::thread::sleep(Duration::from_millis(500));
    let st2 = agent.status().unwrap();
    for k in ["/received", "/delivered", "/dropped/total"] {
        assert_eq!(u(&st, k), u(&st2, k), "{k} settled for good");
    }
    let ids = stored_ids(&listener.out);
    let got = unique_ids(&ids);
    assert_eq!(u(&st, "/delivered"), ids.len() as u64);
    assert_eq!(
        u(&st, "/received"),
        u(&st, "/delivered") + u(&st, "/dropped/total"),
        "{st}"
    );
    assert_eq!(
        u(&st, "/dropped/total"),
        u(&st, "/dropped/spool_full"),
        "{st}"
    );
    assert!(got.contains("n-0"), "drop_newest keeps the oldest");
    assert!(!got.contains("n-3999"), "and refuses the newest");
    assert!(got.is_subset(&r.ok_ids("n")));
    agent.assert_no_panic();
}

/// Issue 11.1: with `central.agent_id` set in the config, a lost state dir used to restart `seq`
/// at 1: the listener took the new batches for duplicates of the old ones, acked them, and the
/// profiles were gone while the agent counted them delivered. A new state dir starts a new
/// epoch: the dedup key never repeats, every profile of both runs is stored once.
#[test]
fn lost_state_dir_with_a_configured_agent_id_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let extra = format!("{FAST}[central]\nagent_id = \"web-1\"\n");
    let mut expected = HashSet::new();
    let mut epochs = Vec::new();
    for (run, prefix) in ["before", "after"].iter().enumerate() {
        let mut agent = Agent::start(dir.path(), &listener.endpoint(), "off", &extra);
        let report = Sender::start(SendPlan {
            count: 5000,
            ..plan(&agent, prefix, 200, 0, false)
        })
        .join();
        assert_eq!(
            report.ok.len(),
            5000,
            "{prefix}: blocking sends all accepted"
        );
        expected.extend(report.ok_ids(prefix));
        let s = wait_settled(&agent, 5000, Duration::from_mins(1));
        assert_eq!(u(&s, "/delivered"), 5000, "{prefix}: {s}");
        epochs.push(s["epoch"].clone());
        assert_eq!(
            agent.proc.stop(Duration::from_secs(20)),
            apm_testkit::Exit::Code(0)
        );
        if run == 0 {
            // A new disk, a reinstall: the state is gone, the configured agent id is not.
            std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        }
    }
    let stored = stored_ids(&listener.out);
    assert_exactly(&stored, &expected, "both runs, across the lost state dir");
    assert!(
        epochs[0].is_string() && epochs[1].is_string() && epochs[0] != epochs[1],
        "a lost state dir starts a new epoch, shown in status: {epochs:?}"
    );
}

/// Issue 11.2: when the seq reservation could not be written (state volume full), the batcher
/// returned, ingest stopped reading for good, and status still said all was well. Now the
/// batcher waits and retries (the kernel queue and PHP's EAGAIN push back meanwhile), status
/// names the failing stage, and once the volume has room again everything is delivered once.
#[test]
fn a_full_state_volume_is_reported_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _mnt = match Tmpfs::mount(&state, "256k") {
        Ok(m) => m,
        Err(e) if !apm_tests::common::in_ci() => {
            println!("skipped: cannot mount a tmpfs here: {e}");
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs (CI runs as root): {e}"),
    };
    let listener = Listener::start(dir.path(), &[]);
    // One profile per batch: 4096 batches use up the seq block reserved at start.
    let cfg = format!("{FAST}[batch]\nmax_items = 1\n");
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", &cfg);
    let first = Sender::start(SendPlan {
        count: 1000,
        ..plan(&agent, "a", 100, 0, false)
    })
    .join();
    wait_settled(&agent, 1000, Duration::from_mins(1));
    // Fill the state volume.
    let filler = state.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    let second = Sender::start(SendPlan {
        count: 4000,
        ..plan(&agent, "b", 100, 0, false)
    })
    .join();
    let s = agent.wait_for(
        Duration::from_secs(30),
        "the batch stage reported failing",
        |s| s.pointer("/stage_failures/batch").is_some(),
    );
    assert!(
        u(&s, "/delivered") < 5000,
        "the reservation was needed: {s}"
    );
    std::fs::remove_file(&filler).unwrap();
    let s = wait_settled(&agent, 5000, Duration::from_mins(1));
    assert_eq!(u(&s, "/delivered"), 5000, "{s}");
    assert!(
        s["stage_failures"]
            .as_object()
            .is_some_and(serde_json::Map::is_empty),
        "recovered: {s}"
    );
    let mut expected = first.ok_ids("a");
    expected.extend(second.ok_ids("b"));
    assert_eq!(expected.len(), 5000, "blocking sends are all accepted");
    assert_exactly(
        &stored_ids(&listener.out),
        &expected,
        "across the full state volume",
    );
    agent.assert_no_panic();
}

/// Mounts a tmpfs for a test; outside CI a refused mount skips the test (and says so), in CI it
/// fails it.
fn tmpfs_or_skip(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(dir, size) {
        Ok(m) => Some(m),
        Err(e) if !apm_tests::common::in_ci() => {
            println!("skipped: cannot mount a tmpfs here: {e}");
            None
        }
        Err(e) => panic!("cannot mount a tmpfs (CI runs as root): {e}"),
    }
}

/// Issue 11.3: a spool volume that is full *right now* at start used to be taken for a
/// configuration error (exit 78, never restarted): a permanent outage. Now only a `max_bytes`
/// larger than the whole volume is a configuration error; a volume short of free space starts
/// with the capacity that fits, says so in `status --json` (`spool_capacity_bytes` below
/// `spool_max_bytes`), delivers what it had spooled and what comes next.
#[test]
fn a_full_disk_at_restart_starts_with_what_fits_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let vol = dir.path().join("vol");
    let Some(_mnt) = tmpfs_or_skip(&vol, "16m") else {
        return;
    };
    let addr = free_addr();
    let cfg = format!(
        "{FAST}[spool]\ndir = \"{}\"\nmax_bytes = 12582912\nsegment_bytes = 262144\n",
        vol.join("spool").display()
    );
    // Run 1, listener down: 2000 profiles end up in the spool.
    let mut agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let first = Sender::start(SendPlan {
        count: 2000,
        ..plan(&agent, "a", 500, 0, false)
    })
    .join();
    assert_eq!(first.ok.len(), 2000, "blocking sends are all accepted");
    agent.wait_for(Duration::from_secs(20), "all received", |s| {
        u(s, "/received") == 2000
    });
    assert_eq!(
        agent.proc.stop(Duration::from_secs(20)),
        apm_testkit::Exit::Code(0)
    );
    assert!(!spool_records(&vol.join("spool")).is_empty(), "spooled");
    // Another tenant takes 10 MiB of the 16 MiB volume while the agent is down.
    std::fs::write(vol.join("filler"), vec![0u8; 10 << 20]).unwrap();

    // Run 2 starts (no exit 78), and says the spool is short of space.
    let agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let s = agent.status().unwrap();
    let cap = u(&s, "/spool_capacity_bytes");
    assert!(
        cap > 0 && cap < 12_582_912 - (4 << 20),
        "capacity is what fits on the volume, not spool.max_bytes: {s}"
    );
    assert!(
        agent.log().contains("spool.max_bytes does not fit"),
        "said loudly in the log:\n{}",
        agent.log()
    );
    let second = Sender::start(SendPlan {
        count: 2000,
        ..plan(&agent, "b", 500, 0, false)
    })
    .join();
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let mut expected = first.ok_ids("a");
    expected.extend(second.ok_ids("b"));
    let stored = wait_stored(&listener.out, expected.len(), Duration::from_mins(1));
    let s = agent.wait_for(Duration::from_secs(20), "spool drained", |s| {
        u(s, "/spooled_batches") == 0 && u(s, "/memory_payload_bytes") == 0
    });
    assert_eq!(u(&s, "/dropped/total"), 0, "{s}");
    assert_exactly(
        &stored,
        &expected,
        "spooled before the restart and sent after it",
    );
    agent.assert_no_panic();

    // A max_bytes larger than the whole volume stays a configuration error, naming the key.
    let big = format!(
        "{FAST}[spool]\ndir = \"{}\"\nmax_bytes = 67108864\n",
        vol.join("spool2").display()
    );
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("run")).unwrap();
    let config = Agent::write_config(&other, &endpoint(&addr), "off", &big);
    let o = std::process::Command::new(apm_testkit::bin("apm-agent"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(err.contains("spool.max_bytes"), "{err}");
}

/// Issue 11.3: a spool lock held by another process is a runtime condition (a predecessor still
/// stopping, a stray process), not a configuration error: exit 1, which supervisors restart,
/// not 78, which they never do; the message names the process that holds the lock. Once the
/// holder lets go, the agent starts.
#[test]
fn a_spool_lock_held_by_another_process_is_retried_not_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(spool.join("spool.lock"))
        .unwrap();
    let mut holder = Proc::spawn(
        "flock",
        std::process::Command::new("flock")
            // -o: the lock stays with flock itself, not with its `sleep`.
            .args(["-x", "-o"])
            .arg(spool.join("spool.lock"))
            .args(["sleep", "600"]),
    )
    .unwrap();
    drop(lock);
    std::thread::sleep(Duration::from_millis(300));
    let config = Agent::write_config(dir.path(), &endpoint(&free_addr()), "off", FAST);
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let o = std::process::Command::new(apm_testkit::bin("apm-agent"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a runtime condition: {err}");
    // `flock` holds the lock until its child exits: the holder is the flock process itself.
    assert!(
        err.contains(&format!("process {}", holder.pid())),
        "names the holder (pid {}): {err}",
        holder.pid()
    );
    holder.terminate(Duration::from_secs(5)).unwrap();
    let agent = Agent::start_with(dir.path(), &config);
    agent.assert_no_panic();
}

/// Issue 11.4: in `spool.mode = "always"` a failed write-ahead (the spool's volume full) used to
/// keep every batch in memory, past `limits.memory_budget_mb` and whatever `spool.on_full` said.
/// Now memory stays within its budget, what does not fit is dropped as `spool.on_full` says and
/// counted (`spool_error`), and the kill switch rises (`spool_error`) until a write-ahead works
/// again. When space and the listener return, every profile is delivered or counted.
#[test]
fn a_failing_write_ahead_honours_the_memory_budget_and_raises_the_kill_switch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let vol = dir.path().join("vol");
    let Some(_mnt) = tmpfs_or_skip(&vol, "4m") else {
        return;
    };
    let addr = free_addr();
    let budget: u64 = 1 << 20;
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 50\n[limits]\nmemory_budget_mb = 1\n\
         [spool]\nmode = \"always\"\ndir = \"{}\"\nmax_bytes = 3145728\nsegment_bytes = 131072\n",
        vol.join("spool").display()
    );
    let agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    // Another tenant fills the volume: every write-ahead fails.
    let mut f = std::fs::File::create(vol.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    // 4 MB of profiles, listener down: four times the memory budget. Blocking sends: all
    // 4000 reach the agent however loaded the machine is (with PHP's non-blocking sends a
    // loaded CI machine once let only 984 in, under the budget, and nothing was dropped).
    let sent = Sender::start(SendPlan {
        count: 4000,
        ..plan(&agent, "w", 1000, 4000, false)
    });
    let mut max_held = 0;
    let start = Instant::now();
    loop {
        let s = agent.status();
        if let Some(s) = &s {
            max_held = max_held.max(u(s, "/memory_payload_bytes"));
        }
        if s.is_some_and(|s| u(&s, "/received") == 4000) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_mins(1),
            "4000 blocking sends not received in a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = sent.join();
    assert_eq!(sent.ok.len(), 4000, "blocking sends are all accepted");
    let s = agent.wait_for(Duration::from_secs(20), "drops counted", |s| {
        u(s, "/dropped/spool_error") > 0
    });
    // One batch of 50 x ~1 KB may pass the budget while it is being accepted.
    assert!(
        max_held <= budget + 64 * 1024,
        "memory stays within limits.memory_budget_mb: held up to {max_held} bytes: {s}"
    );
    let kill: Vec<&str> = s["kill_switch"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(kill.contains(&"spool_error"), "kill switch raised: {s}");
    // Space and the listener come back.
    std::fs::remove_file(vol.join("filler")).unwrap();
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let received = u(&s, "/received");
    assert_eq!(received, sent.ok.len() as u64, "{s}");
    let s = wait_settled(&agent, received, Duration::from_mins(1));
    let ids = stored_ids(&listener.out);
    let got = unique_ids(&ids);
    assert_eq!(ids.len(), got.len(), "nothing stored twice");
    assert_eq!(u(&s, "/delivered"), got.len() as u64, "{s}");
    assert_eq!(
        u(&s, "/dropped/total"),
        u(&s, "/dropped/spool_error"),
        "{s}"
    );
    assert!(got.is_subset(&sent.ok_ids("w")));
    // A write-ahead works again: the kill switch is down.
    let mut p = plan(&agent, "x", 1000, 0, false);
    p.count = 100;
    let more = Sender::start(p).join();
    let s = wait_settled(
        &agent,
        received + more.ok.len() as u64,
        Duration::from_secs(30),
    );
    assert!(
        s["kill_switch"].as_array().unwrap().is_empty(),
        "lowered once a write-ahead worked: {s}"
    );
    agent.assert_no_panic();
}

/// Issue 11.5: profiles dropped while an in-place restart (`apm-agent restart`) flushes memory
/// into a full spool used to be counted by the old image only, and vanish with it at exec:
/// `status --json` then showed fewer received than sent and no drop. The counters are handed
/// down with the sockets: after the restart, received == delivered + dropped, exactly, and the
/// listener holds exactly the delivered ones.
#[test]
fn drops_at_an_in_place_restart_stay_counted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    // Listener down and a breaker that never opens: the batches wait in memory, and the
    // restart must move them to a spool too small for them.
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 50\n[breaker]\nfailure_threshold = 1000000\n\
         [limits]\nshutdown_timeout = \"2s\"\n\
         [spool]\nmax_bytes = 262144\nsegment_bytes = 65536\non_full = \"drop_newest\"\n"
    );
    let agent = Agent::start(dir.path(), &endpoint(&addr), "off", &cfg);
    let sent = Sender::start(SendPlan {
        count: 3000,
        ..plan(&agent, "h", 500, 0, false)
    })
    .join();
    assert_eq!(sent.ok.len(), 3000, "blocking sends are all accepted");
    let before = agent.wait_for(Duration::from_secs(20), "all received, in memory", |s| {
        u(s, "/received") == 3000 && u(s, "/memory_payload_bytes") > 262_144
    });
    assert_eq!(u(&before, "/dropped/total"), 0, "{before}");
    let o = agent.cli(&["restart"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = agent.wait_for(Duration::from_secs(20), "restarted in place", |s| {
        u(s, "/restarts") == 1
    });
    assert!(
        u(&after, "/dropped/total") > 0,
        "the spool was too small: {after}"
    );
    assert_eq!(u(&after, "/received"), 3000, "handed down: {after}");
    let listener = Listener::start_on(dir.path(), &out, &addr, &[]);
    let s = wait_settled(&agent, 3000, Duration::from_mins(1));
    let ids = stored_ids(&listener.out);
    let got = unique_ids(&ids);
    assert_eq!(ids.len(), got.len(), "nothing stored twice");
    assert!(got.is_subset(&sent.ok_ids("h")));
    assert_eq!(u(&s, "/delivered"), got.len() as u64, "{s}");
    assert_eq!(
        got.len() as u64 + u(&s, "/dropped/total"),
        3000,
        "every profile stored or counted dropped: {s}"
    );
    agent.assert_no_panic();
}

/// Issue 11.5: a batch out on the wire whose spool segment `drop_oldest` deleted meanwhile came
/// back unacknowledged at a stop or an in-place restart: the router handed it back to the spool,
/// which no longer had it, and ignored that: received exceeded delivered plus dropped for good
/// (and elsewhere such a batch was counted dropped even when the listener had stored it). Acks
/// are held back (the listener waits 3 s before acking) so batches are
/// out while a small write-ahead spool drops its oldest segments, then the agent restarts in
/// place. A batch whose segment is gone is still in the router's hands when it comes back: it
/// is kept and resent, not lost and not counted. Every profile is stored or counted dropped,
/// exactly.
#[test]
fn batches_whose_segment_was_dropped_while_out_are_counted_at_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--ack-delay", "3000"]);
    let cfg = format!(
        "{FAST}[batch]\nmax_items = 20\n[central]\nmax_in_flight = 64\n\
         [limits]\nshutdown_timeout = \"1s\"\n\
         [spool]\nmode = \"always\"\nmax_bytes = 262144\nsegment_bytes = 65536\nhigh_water_pct = 100\n"
    );
    let agent = Agent::start(dir.path(), &listener.endpoint(), "off", &cfg);
    let sent = Sender::start(SendPlan {
        count: 3000,
        ..plan(&agent, "o", 500, 3000, false)
    })
    .join();
    // 1.5 MB through a 256 KiB spool while up to 64 batches (640 KB) wait 3 s for their acks:
    // segments are dropped under batches that are out.
    let before = agent.wait_for(Duration::from_secs(20), "all received", |s| {
        u(s, "/received") == 3000
    });
    println!("before the restart: {before}");
    let o = agent.cli(&["restart"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    agent.wait_for(Duration::from_secs(20), "restarted in place", |s| {
        u(s, "/restarts") == 1
    });
    // received == delivered + dropped, with nothing left in memory or the spool.
    let s = wait_settled(&agent, 3000, Duration::from_mins(2));
    let ids = stored_ids(&listener.out);
    let got = unique_ids(&ids);
    assert_eq!(ids.len(), got.len(), "nothing stored twice");
    assert!(got.is_subset(&sent.ok_ids("o")));
    // A batch whose ack timed out may have been stored all the same and then dropped from the
    // spool (counted): the listener can hold more than `delivered`, never less, and nothing
    // is missing from both.
    assert!(u(&s, "/delivered") <= got.len() as u64, "{s}");
    assert!(
        got.len() as u64 + u(&s, "/dropped/total") >= 3000,
        "every profile stored or counted dropped: {s}"
    );
    agent.assert_no_panic();
}

/// Waits until the agent is quiet (received, delivered and dropped unchanged for a second) and
/// returns that status.
fn quiet(agent: &Agent) -> Value {
    let mut last = None;
    apm_testkit::poll(
        Duration::from_mins(1),
        || {
            std::thread::sleep(Duration::from_secs(1));
            let s = agent.status()?;
            let now = (
                u(&s, "/received"),
                u(&s, "/delivered"),
                u(&s, "/dropped/total"),
                u(&s, "/spooled_profiles"),
            );
            let still = last == Some(now);
            last = Some(now);
            still.then_some(s)
        },
        || format!("agent quiet; log:\n{}", agent.log()),
    )
}

/// The books of `status --json`: every profile received is delivered, dropped (by reason), held
/// only in memory (`at_risk_profiles`) or in the spool (`spooled_profiles`).
fn assert_books(s: &Value, what: &str) {
    let received = u(s, "/received");
    let parts = u(s, "/delivered")
        + u(s, "/dropped/total")
        + u(s, "/at_risk_profiles")
        + u(s, "/spooled_profiles");
    assert_eq!(
        received, parts,
        "{what}: received == delivered + dropped + at_risk_profiles + spooled_profiles: {s:#}"
    );
}

/// Issue 11, "done when": `status --json` accounts for every profile. With the listener down
/// the profiles go to a small spool, which drops some as `spool.on_full` says; then the listener
/// comes back acking slowly (batches held in memory while in flight); then everything is
/// delivered. At each quiet moment received == delivered + dropped + at risk + spooled, and the
/// listener's file holds exactly the profiles the agent did not count as dropped.
#[test]
fn status_accounts_for_every_profile_delivered_dropped_in_memory_or_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.jsonl");
    let addr = free_addr();
    let agent = Agent::start(
        dir.path(),
        &endpoint(&addr),
        "off",
        &format!(
            "{FAST}[spool]\nmax_bytes = 1048576\nsegment_bytes = 131072\non_full = \"drop_newest\"\n"
        ),
    );
    // Listener down: 1.5 MB of profiles for a 1 MiB spool.
    let send = |prefix: &str, n: u64| {
        let mut p = plan(&agent, prefix, 1000, 1000, false);
        p.count = n;
        let r = Sender::start(p).join();
        assert_eq!(r.ok.len() as u64, n, "blocking sends all accepted");
        r.ok_ids(prefix)
    };
    let first = send("a", 1500);
    // A dead listener is dialled once per `central.probe_interval`, so the breaker opens after a
    // few seconds of failures; then what waits in memory goes to the spool.
    agent.wait_for(Duration::from_secs(30), "breaker open", |s| {
        s["breaker"] == "open"
    });
    let down = quiet(&agent);
    assert_books(&down, "listener down");
    assert!(
        u(&down, "/spooled_profiles") > 0 && u(&down, "/dropped/spool_full") > 0,
        "the outage went to disk and the small spool dropped some: {down:#}"
    );
    // Back, acking each batch after 1.5 s: batches are out and held in memory meanwhile.
    let listener = Listener::start_on(dir.path(), &out, &addr, &["--ack-delay", "1500"]);
    let second = send("b", 300);
    let slow = agent.status().unwrap();
    println!(
        "while acks are slow: at risk {}, spooled {}, in flight {}",
        u(&slow, "/at_risk_profiles"),
        u(&slow, "/spooled_profiles"),
        u(&slow, "/in_flight_batches")
    );
    let settled = agent.wait_for(Duration::from_mins(2), "everything settled", |s| {
        u(s, "/received") == 1800
            && u(s, "/at_risk_profiles") == 0
            && u(s, "/spooled_profiles") == 0
            && u(s, "/in_flight_batches") == 0
    });
    assert_books(&settled, "settled");
    let stored = stored_ids(&listener.out);
    let got = unique_ids(&stored);
    assert_eq!(
        got.len() as u64,
        u(&settled, "/delivered"),
        "the listener stored what the agent counted delivered"
    );
    let sent: HashSet<String> = first.union(&second).cloned().collect();
    assert!(got.is_subset(&sent), "stored only what was sent");
    assert_eq!(
        got.len() as u64 + u(&settled, "/dropped/total"),
        sent.len() as u64,
        "every profile sent is stored or counted dropped"
    );
    agent.assert_no_panic();
}
