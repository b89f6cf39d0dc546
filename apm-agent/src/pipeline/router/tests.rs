//! The router's policy, driven through its channels on tokio's paused clock: the test plays the
//! batcher (feeds batches) and the transport (takes batches off the wire, answers with
//! outcomes), and asserts on ground truth: what reached the wire and in which order, what the
//! spool holds (gauges while running, a reopened spool after the stop), the drop counters and
//! PHP's kill-switch file.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::*;
use crate::config::{BreakerConfig, FsyncPolicy};
use crate::pipeline::liveness::Liveness;
use crate::pipeline::model::Profile;

/// Payload bytes of an ordinary test batch (one profile).
const PAYLOAD: usize = 1000;

fn batch_of(seq: u64, payload_len: usize) -> Batch {
    Batch {
        seq,
        epoch: 1,
        sealed_at: None,
        profiles: vec![Profile {
            payload: Bytes::from(vec![b'a'; payload_len]),
            received_ns: seq,
            pid: 100,
            uid: 33,
            rss_bytes: 0,
        }],
    }
}

fn batch(seq: u64) -> Batch {
    batch_of(seq, PAYLOAD)
}

struct Setup {
    spool: SpoolConfig,
    budget: usize,
    breaker: BreakerConfig,
    /// Room in the router → transport channel: batches there count as in flight.
    wire: usize,
}

impl Setup {
    fn new(dir: &Path, mode: SpoolMode) -> Self {
        Self {
            spool: SpoolConfig {
                dir: dir.join("spool"),
                mode,
                max_bytes: 1 << 20,
                segment_bytes: 4096,
                on_full: SpoolFull::DropOldest,
                fsync: FsyncPolicy::Never,
                fsync_interval: Duration::from_millis(200),
                high_water_pct: 90,
                // The default: at the listener's pace (the tests that need a cap set one).
                replay_batches_per_s: SpoolConfig::default().replay_batches_per_s,
            },
            budget: 1 << 20,
            breaker: BreakerConfig {
                failure_threshold: 1,
                retry_timeout: Duration::from_secs(10),
                max_retry_timeout: Duration::from_mins(1),
                probe_timeout: Duration::from_secs(10),
            },
            wire: 1,
        }
    }
}

struct Harness {
    input: mpsc::Sender<Batch>,
    wire: mpsc::Receiver<Batch>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    deadline: CancellationToken,
    t: Arc<Telemetry>,
    php: Arc<PhpControl>,
    /// The memory guard's spill request.
    spill: Arc<AtomicBool>,
    task: JoinHandle<Vec<Batch>>,
    spool_cfg: SpoolConfig,
}

/// Writes `seqs` to the spool before the router starts (a backlog from an earlier run).
fn prefill(cfg: &SpoolConfig, seqs: impl IntoIterator<Item = u64>) {
    let mut s = Spool::open(cfg).unwrap();
    for seq in seqs {
        s.append(&batch(seq)).unwrap();
    }
    s.close();
}

fn start(dir: &Path, s: Setup) -> Harness {
    let t = Telemetry::new();
    let php = Arc::new(PhpControl::new(dir).unwrap());
    let spool = Spool::open(&s.spool).unwrap();
    let (input, input_rx) = mpsc::channel(64);
    let (wire_tx, wire) = mpsc::channel(s.wire);
    let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
    let deadline = CancellationToken::new();
    let spill = Arc::new(AtomicBool::new(false));
    let router = Router::new(RouterDeps {
        telemetry: t.clone(),
        memory_budget: s.budget,
        live: Arc::new(Liveness::default()),
        breaker: CircuitBreaker::new(s.breaker, Instant::now()),
        spool,
        spool_cfg: s.spool.clone(),
        php: php.clone(),
        spill: spill.clone(),
    });
    let task = tokio::spawn(router.run(RouterIo {
        input: input_rx,
        to_transport: wire_tx,
        outcomes: outcomes_rx,
        deadline: deadline.clone(),
    }));
    Harness {
        input,
        wire,
        outcomes,
        deadline,
        t,
        php,
        spill,
        task,
        spool_cfg: s.spool,
    }
}

/// Lets the router run until it waits, without moving the clock (the test task stays ready, so
/// the paused clock does not auto-advance).
async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

fn seqs(v: &[Batch]) -> Vec<u64> {
    v.iter().map(|b| b.seq).collect()
}

impl Harness {
    async fn feed(&self, b: Batch) {
        self.input.try_send(b).unwrap();
        settle().await;
    }

    /// What the router put on the wire since the last call.
    async fn sent(&mut self) -> Vec<Batch> {
        settle().await;
        std::iter::from_fn(|| self.wire.try_recv().ok()).collect()
    }

    async fn ack(&self, b: &Batch) {
        self.outcomes
            .send(Outcome::Acked {
                seq: b.seq,
                profiles: b.len(),
                bytes: b.payload_bytes(),
            })
            .unwrap();
        settle().await;
    }

    async fn give_back(&self, b: Batch) {
        self.outcomes
            .send(Outcome::Returned {
                batch: b,
                reason: "test: stream lost".into(),
            })
            .unwrap();
        settle().await;
    }

    /// Takes one batch off the wire, acks it, and returns its seq.
    async fn deliver_one(&mut self) -> Option<u64> {
        let b = self.sent().await.into_iter().next();
        debug_assert!(self.wire.is_empty(), "wire capacity is 1 in these tests");
        let b = b?;
        self.ack(&b).await;
        Some(b.seq)
    }

    /// Delivers what the router sends without the clock moving; returns how many.
    async fn deliver_all(&mut self) -> usize {
        let mut n = 0;
        while self.deliver_one().await.is_some() {
            n += 1;
        }
        n
    }

    fn spooled(&self) -> i64 {
        self.t.spooled_batches.get()
    }

    fn fill_pct(&self) -> f64 {
        self.t.spool_bytes.get() as f64 * 100.0 / self.t.spool_capacity_bytes.get() as f64
    }

    /// PHP's kill-switch file, as PHP reads it.
    fn kill_switch(&self) -> Option<String> {
        std::fs::read_to_string(self.php.disabled_path()).ok()
    }

    /// Stops the router (batcher done, transport gone, deadline passed) and returns what it
    /// lost and the seqs the spool holds, read back from a reopened spool.
    async fn stop(self) -> (Vec<u64>, Vec<u64>) {
        drop(self.input);
        drop(self.outcomes);
        drop(self.wire);
        self.deadline.cancel();
        let lost = self.task.await.unwrap();
        let mut s = Spool::open(&self.spool_cfg).unwrap();
        let on_disk = std::iter::from_fn(|| s.take_next().unwrap())
            .map(|sb| sb.batch.seq)
            .collect();
        (seqs(&lost), on_disk)
    }
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[tokio::test(start_paused = true)]
async fn overflow_mode_sends_from_memory_without_touching_the_spool() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.wire = 8;
    let mut h = start(&dir, s);
    for seq in 1..=3 {
        h.feed(batch(seq)).await;
    }
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1, 2, 3], "sent in order, straight from memory");
    assert_eq!(h.spooled(), 0, "a listener that keeps up needs no spool");
    for b in &out {
        h.ack(b).await;
    }
    assert_eq!(h.t.delivered_batches.get(), 3);
    let (lost, on_disk) = h.stop().await;
    assert!(
        lost.is_empty() && on_disk.is_empty(),
        "{lost:?} {on_disk:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn always_mode_writes_each_batch_ahead_and_frees_it_on_ack() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Always);
    s.wire = 8;
    let mut h = start(&dir, s);
    h.feed(batch(1)).await;
    h.feed(batch(2)).await;
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1, 2]);
    assert_eq!(h.spooled(), 2, "both are on disk while out");
    h.ack(&out[0]).await;
    assert_eq!(h.spooled(), 1, "an ack frees its record");
    // The process dies with batch 2 unacknowledged: the spool still has it.
    let (_, on_disk) = h.stop().await;
    assert_eq!(on_disk, [2]);
}

#[tokio::test(start_paused = true)]
async fn ack_stall_sends_new_batches_to_disk_only_when_the_window_is_full() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.budget = 2 * PAYLOAD;
    s.wire = 2; // the two batches stay "out" in the channel, unacknowledged
    let mut h = start(&dir, s);
    h.feed(batch(1)).await;
    h.feed(batch(2)).await;
    h.feed(batch(3)).await;
    // Window full, acks not (yet) stalled: the router pushes back instead of spooling.
    assert_eq!(h.spooled(), 0);
    assert_eq!(h.t.backpressure.get(), 1, "pushing back on ingest");
    tokio::time::advance(ACK_STALL.saturating_sub(Duration::from_millis(10))).await;
    settle().await;
    assert_eq!(h.spooled(), 0, "slow is not stalled");
    tokio::time::advance(Duration::from_millis(20)).await;
    settle().await;
    assert_eq!(h.spooled(), 1, "no ack for ACK_STALL: batch 3 goes to disk");
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1, 2]);
    for b in &out {
        h.ack(b).await;
    }
    // Acks resume: batch 3 comes back from the spool.
    assert_eq!(h.deliver_one().await, Some(3));
    assert_eq!(h.spooled(), 0);
    let (lost, on_disk) = h.stop().await;
    assert!(
        lost.is_empty() && on_disk.is_empty(),
        "{lost:?} {on_disk:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_opening_spills_what_waits_in_memory_and_spools_new_batches() {
    let (_d, dir) = tmp();
    let mut h = start(&dir, Setup::new(&dir, SpoolMode::Overflow));
    for seq in 1..=3 {
        h.feed(batch(seq)).await;
    }
    // Wire capacity 1: batch 1 is out, 2 and 3 wait in memory. The transport takes 1 (so 2
    // goes out), then gives 1 back: one failure opens the breaker (threshold 1).
    let first = h.sent().await;
    assert_eq!(seqs(&first), [1]);
    settle().await;
    h.give_back(first.into_iter().next().unwrap()).await;
    // Figures are published at the top of the router's turn, so the next turn (the liveness
    // beat at the latest) shows the spill.
    tokio::time::advance(crate::pipeline::liveness::BEAT).await;
    settle().await;
    assert_eq!(h.t.breaker_state.get(), BreakerState::Open.gauge());
    assert_eq!(
        h.spooled(),
        2,
        "the returned batch 1 and the waiting batch 3 are on disk"
    );
    h.feed(batch(4)).await;
    assert_eq!(
        h.spooled(),
        3,
        "while open, a new batch goes straight to disk"
    );
    assert_eq!(
        seqs(&h.sent().await),
        [2],
        "nothing new on the wire while open"
    );
    let (_, mut on_disk) = h.stop().await;
    on_disk.sort_unstable();
    assert_eq!(on_disk, [1, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn kill_switch_rises_at_high_water_while_open_and_falls_below_half_once_closed() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.spool.max_bytes = 64 * 1024;
    s.spool.high_water_pct = 50;
    let mut h = start(&dir, s);
    h.feed(batch(1)).await;
    let out = h.sent().await;
    h.give_back(out.into_iter().next().unwrap()).await;
    assert_eq!(h.t.breaker_state.get(), BreakerState::Open.gauge());
    let mut seq = 1;
    while h.fill_pct() < 50.0 {
        assert_eq!(
            h.kill_switch(),
            None,
            "below high water at {:.1}%",
            h.fill_pct()
        );
        seq += 1;
        h.feed(batch(seq)).await;
    }
    assert_eq!(h.kill_switch().as_deref(), Some("spool_high_water\n"));
    // The open period ends (at most retry_timeout): the probe (a replayed batch) is acked and
    // the breaker closes. The spool drains segment by segment.
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut between = 0;
    let mut delivered = 0;
    while h.deliver_one().await.is_some() {
        delivered += 1;
        assert_eq!(h.t.breaker_state.get(), BreakerState::Closed.gauge());
        let fill = h.fill_pct();
        if fill >= 25.0 {
            if fill < 50.0 {
                between += 1;
            }
            assert!(
                h.kill_switch().is_some(),
                "still raised at {fill:.1}% (≥ half)"
            );
        } else {
            assert_eq!(h.kill_switch(), None, "lowered at {fill:.1}% (< half)");
        }
        // Replay is paced at 1000/s.
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    assert_eq!(delivered, seq, "every batch delivered");
    assert!(
        between > 0,
        "the spool passed between half and high water while closed"
    );
    assert_eq!(h.kill_switch(), None);
}

#[tokio::test(start_paused = true)]
async fn kill_switch_stays_down_at_high_water_while_the_breaker_is_closed() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.spool.max_bytes = 64 * 1024;
    s.spool.high_water_pct = 50;
    // A backlog past high water from an earlier run, and a listener that is up.
    let mut spool = Spool::open(&s.spool).unwrap();
    let mut seq = 0;
    while spool.fill_pct() < 60.0 {
        seq += 1;
        spool.append(&batch(seq)).unwrap();
    }
    spool.close();
    let mut h = start(&dir, s);
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1], "replay starts");
    assert!(h.fill_pct() >= 50.0, "{:.1}%", h.fill_pct());
    assert_eq!(
        h.kill_switch(),
        None,
        "a backlog alone does not silence PHP"
    );
    // The listener goes away: now the kill switch rises.
    h.give_back(out.into_iter().next().unwrap()).await;
    assert_eq!(h.t.breaker_state.get(), BreakerState::Open.gauge());
    assert_eq!(h.kill_switch().as_deref(), Some("spool_high_water\n"));
}

#[tokio::test(start_paused = true)]
async fn replay_alternates_with_live_batches() {
    let (_d, dir) = tmp();
    let s = Setup::new(&dir, SpoolMode::Overflow);
    prefill(&s.spool, 101..=106);
    let mut h = start(&dir, s);
    for seq in 1..=4 {
        h.input.try_send(batch(seq)).unwrap();
    }
    let mut order = Vec::new();
    loop {
        // A replay token (1000/s) is back before each dispatch: only the alternation counts.
        tokio::time::advance(Duration::from_millis(10)).await;
        match h.deliver_one().await {
            Some(seq) => order.push(seq),
            None => break,
        }
    }
    // Batch 101 goes out before the router has taken the live ones; from then on, while both
    // wait, replay and live take turns.
    assert_eq!(order, [101, 102, 1, 103, 2, 104, 3, 105, 4, 106]);
}

#[tokio::test(start_paused = true)]
async fn replay_is_rate_limited_to_replay_batches_per_s() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.spool.replay_batches_per_s = 2;
    prefill(&s.spool, 1..=10);
    let mut h = start(&dir, s);
    let mut replayed = h.deliver_all().await;
    assert_eq!(replayed, 1, "one token at start");
    tokio::time::advance(Duration::from_millis(490)).await;
    replayed += h.deliver_all().await;
    assert_eq!(replayed, 1, "the next token takes 500 ms");
    tokio::time::advance(Duration::from_millis(20)).await;
    replayed += h.deliver_all().await;
    assert_eq!(replayed, 2);
    tokio::time::advance(Duration::from_secs(1)).await;
    replayed += h.deliver_all().await;
    assert_eq!(replayed, 4, "2 per second");
}

/// Plays a listener that answers each window of batches `latency` after taking it, behind a
/// transport that takes batches while fewer than `window` await their ack (transport.rs), until
/// `seqs` are delivered or `max_rounds` round trips have passed; returns the round trips and the
/// order the batches reached the wire in.
async fn replay_rounds(
    h: &mut Harness,
    window: usize,
    latency: Duration,
    backlog: usize,
    max_rounds: usize,
) -> (usize, Vec<u64>) {
    let mut order = Vec::new();
    let mut rounds = 0;
    while order.len() < backlog && rounds < max_rounds {
        let mut out = Vec::new();
        while out.len() < window {
            settle().await;
            match h.wire.try_recv() {
                Ok(b) => out.push(b),
                Err(_) => break,
            }
        }
        tokio::time::advance(latency).await;
        for b in &out {
            order.push(b.seq);
            h.ack(b).await;
        }
        rounds += 1;
    }
    (rounds, order)
}

/// Issue 12, item 4: at the defaults the backlog goes at the listener's pace. A listener that
/// answers a window of 16 batches every 5 ms is handed a full window every round trip, so 400
/// spooled batches take exactly 25 round trips (125 ms), oldest first. A fixed replay rate
/// leaves it idle: 20 batches a second would take 20 s.
#[tokio::test(start_paused = true)]
async fn replay_at_the_defaults_fills_every_window_the_listener_opens() {
    const WINDOW: usize = 16;
    const BACKLOG: usize = 400;
    let (_d, dir) = tmp();
    let s = Setup::new(&dir, SpoolMode::Overflow);
    prefill(&s.spool, 1..=BACKLOG as u64);
    let mut h = start(&dir, s);
    let started = Instant::now();
    let expected = BACKLOG.div_ceil(WINDOW);
    let (rounds, order) = replay_rounds(
        &mut h,
        WINDOW,
        Duration::from_millis(5),
        BACKLOG,
        4 * expected,
    )
    .await;
    assert_eq!(
        order.len(),
        BACKLOG,
        "{} of {BACKLOG} replayed in {rounds} round trips ({:?})",
        order.len(),
        started.elapsed()
    );
    assert_eq!(rounds, expected, "a full window every round trip");
    assert!(order.iter().copied().eq(1..=BACKLOG as u64), "oldest first");
    let (lost, on_disk) = h.stop().await;
    assert!(
        lost.is_empty() && on_disk.is_empty(),
        "{lost:?} {on_disk:?}"
    );
}

/// Without a fixed rate, the replay alone would fill the memory window of a listener slower
/// than the disk and push back on PHP: live profiles refused at the door (EAGAIN) to make room
/// for old ones. While live batches flow, replay takes memory only while it is under half the
/// budget, so the other half is there for them.
#[tokio::test(start_paused = true)]
async fn a_catch_up_leaves_half_the_memory_window_to_live_batches() {
    const BUDGET_BATCHES: u64 = 16;
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Overflow);
    s.spool.replay_batches_per_s = 0;
    s.budget = BUDGET_BATCHES as usize * PAYLOAD;
    prefill(&s.spool, 1..=100);
    let mut h = start(&dir, s);
    // A listener that takes everything and has not answered yet.
    let mut out = h.sent().await;
    loop {
        let more = h.sent().await;
        if more.is_empty() {
            break;
        }
        out.extend(more);
    }
    assert_eq!(
        seqs(&out),
        (1..=BUDGET_BATCHES / 2).collect::<Vec<_>>(),
        "the replay holds half the window"
    );
    for seq in 1001..=1000 + BUDGET_BATCHES / 2 {
        // (The last one fills the window: that is a full window, push-back from then on.)
        assert_eq!(
            h.t.backpressure_episodes.get(),
            0,
            "no push-back on PHP before batch {seq}"
        );
        h.feed(batch(seq)).await;
        out.extend(h.sent().await);
    }
    assert_eq!(
        seqs(&out[BUDGET_BATCHES as usize / 2..]),
        (1001..=1000 + BUDGET_BATCHES / 2).collect::<Vec<_>>(),
        "live batches sent from memory beside the replay"
    );
    assert_eq!(
        h.spooled(),
        100,
        "the backlog (out, not acked), nothing new on disk"
    );
}

const WAITING_REPORT: &str = "batches waiting for the central listener";

/// A listener that acks everything, with a batch now and then waiting its turn behind the one
/// on the wire (the soak of 2026-11-30 logged the report 119 times in an hour, listener up):
/// nothing is stuck, so nothing is reported.
#[tokio::test(start_paused = true)]
async fn the_waiting_report_stays_quiet_while_the_listener_acks() {
    let (capture, _guard) = crate::logcapture::LogCapture::start();
    let (_d, dir) = tmp();
    let mut h = start(&dir, Setup::new(&dir, SpoolMode::Overflow));
    for second in 0..100u64 {
        h.feed(batch(2 * second + 1)).await;
        h.feed(batch(2 * second + 2)).await;
        // One on the wire, one waiting, while a second passes.
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(h.deliver_all().await, 2);
    }
    assert_eq!(h.t.delivered_batches.get(), 200);
    let log = capture.text();
    assert!(!log.contains(WAITING_REPORT), "{log}");
}

/// The report is for an operator whose listener is away: while the breaker is open it says
/// every 30 s what waits.
#[tokio::test(start_paused = true)]
async fn the_waiting_report_is_logged_while_the_breaker_is_open() {
    let (capture, _guard) = crate::logcapture::LogCapture::start();
    let (_d, dir) = tmp();
    let mut h = start(&dir, Setup::new(&dir, SpoolMode::Overflow));
    h.feed(batch(1)).await;
    let out = h.sent().await;
    h.give_back(out.into_iter().next().unwrap()).await;
    assert_eq!(h.t.breaker_state.get(), BreakerState::Open.gauge());
    tokio::time::advance(Duration::from_secs(31)).await;
    settle().await;
    let log = capture.text();
    assert!(log.contains(WAITING_REPORT), "{log}");
}

#[tokio::test(start_paused = true)]
async fn write_ahead_failure_raises_the_kill_switch_and_drops_over_budget_as_on_full_says() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Always);
    s.spool.max_bytes = 64 * 1024;
    s.spool.on_full = SpoolFull::DropNewest;
    // A batch larger than the whole spool: the write-ahead fails (RecordTooLarge).
    let big = 70 * 1024;
    s.budget = big;
    let mut h = start(&dir, s);
    h.feed(batch_of(1, big)).await;
    assert_eq!(h.kill_switch().as_deref(), Some("spool_error\n"));
    // Within the memory budget it is sent anyway, from memory.
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1]);
    // Memory full and the spool failing: batch 2 is dropped (drop_newest), and counted.
    h.feed(batch_of(2, big)).await;
    assert_eq!(h.t.dropped_of(DropReason::SpoolError), 1);
    h.ack(&out[0]).await;
    assert!(h.sent().await.is_empty(), "batch 2 is gone, not sent");
    // The write-ahead works again: the kill switch falls.
    h.feed(batch(3)).await;
    assert_eq!(h.kill_switch(), None);
    assert_eq!(h.deliver_one().await, Some(3));
    assert_eq!(h.t.delivered_batches.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn requeue_keeps_a_batch_whose_spool_segment_was_dropped_while_it_was_out() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Always);
    // Three segments of ~3 records: the twelfth batch makes the spool drop its oldest
    // segment, which holds batch 1 while batch 1 is out on the wire.
    s.spool.max_bytes = 3 * 4096;
    s.spool.high_water_pct = 100;
    s.breaker.failure_threshold = 5;
    let mut h = start(&dir, s);
    for seq in 1..=12 {
        h.feed(batch(seq)).await;
    }
    let first_segment = dir
        .join("spool")
        .join(crate::pipeline::spool::segment_name(1));
    assert!(
        !first_segment.exists(),
        "oldest segment dropped to make room"
    );
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1]);
    h.give_back(out.into_iter().next().unwrap()).await;
    // The spool no longer has batch 1: the copy in hand is kept and resent first.
    assert_eq!(h.deliver_one().await, Some(1));
}

#[tokio::test(start_paused = true)]
async fn memory_guard_spill_moves_waiting_batches_to_the_spool() {
    let (_d, dir) = tmp();
    let h = start(&dir, Setup::new(&dir, SpoolMode::Overflow));
    for seq in 1..=3 {
        h.feed(batch(seq)).await;
    }
    assert_eq!(h.spooled(), 0);
    assert_eq!(h.t.memory_payload_bytes.get(), 3 * PAYLOAD as i64);
    h.spill.store(true, Ordering::Relaxed);
    // The router looks at the flag on its next turn (the liveness beat at the latest).
    tokio::time::advance(crate::pipeline::liveness::BEAT).await;
    settle().await;
    assert_eq!(
        h.spooled(),
        2,
        "batches 2 and 3 waited in memory: now on disk"
    );
    assert_eq!(
        h.t.memory_payload_bytes.get(),
        PAYLOAD as i64,
        "only batch 1, out on the wire, is still in memory"
    );
    let (_, mut on_disk) = h.stop().await;
    on_disk.sort_unstable();
    assert_eq!(on_disk, [2, 3]);
}

#[tokio::test(start_paused = true)]
async fn write_ahead_failure_over_budget_drops_the_oldest_memory_batch_under_drop_oldest() {
    let (_d, dir) = tmp();
    let mut s = Setup::new(&dir, SpoolMode::Always);
    s.spool.max_bytes = 64 * 1024;
    s.spool.on_full = SpoolFull::DropOldest;
    let big = 70 * 1024; // larger than the spool: every write-ahead fails
    s.budget = 2 * big - 1;
    let mut h = start(&dir, s);
    h.feed(batch_of(1, big)).await; // out on the wire (capacity 1), unacknowledged
    h.feed(batch_of(2, big)).await; // waits in memory; the window is now full
    h.feed(batch_of(3, big)).await; // over budget: batch 2 makes room for it
    assert_eq!(h.t.dropped_of(DropReason::SpoolError), 1);
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1]);
    h.ack(&out[0]).await;
    assert_eq!(
        seqs(&h.sent().await),
        [3],
        "the newest kept, the oldest dropped"
    );
}

/// Issue 11.4, found under load by the faults test: random interleavings of batches the
/// write-ahead takes or refuses, acks, returns, breaker periods and spill requests. After every
/// step the payload in memory stays within `limits.memory_budget_mb` plus the one batch being
/// taken in; after the stop, every profile fed is delivered, counted as dropped, or on disk.
mod interleavings {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A batch from the batcher; big ones are larger than the spool, of many sizes: their
        /// write-ahead fails.
        Feed(Size),
        /// The transport takes what the router put on the wire (up to its window).
        Take,
        /// The transport acks / returns the n-th batch it holds.
        Ack(usize),
        Return(usize),
        Advance(u16),
        Spill,
    }

    #[derive(Debug, Clone, Copy)]
    enum Size {
        Small,
        Big(u8),
    }

    impl Size {
        fn bytes(self) -> usize {
            match self {
                Size::Small => SMALL,
                Size::Big(n) => BIG + usize::from(n) * 100,
            }
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Feed(Size::Small)),
            2 => any::<u8>().prop_map(|n| Op::Feed(Size::Big(n))),
            3 => Just(Op::Take),
            2 => (0usize..8).prop_map(Op::Ack),
            1 => (0usize..8).prop_map(Op::Return),
            1 => (0u16..12_000).prop_map(Op::Advance),
            1 => Just(Op::Spill),
        ]
    }

    const SMALL: usize = 1000;
    /// Larger than `max_bytes`: never written ahead.
    /// The smallest big batch; `Big(n)` is `n` hundred bytes larger.
    const BIG: usize = 17 * 1024;
    const BUDGET: usize = 20 * 1024;
    /// The transport's window (`central.max_in_flight` in the daemon).
    const WINDOW: usize = 4;

    fn run(ops: Vec<Op>, mode: SpoolMode, on_full: SpoolFull) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let (_d, dir) = tmp();
            let mut s = Setup::new(&dir, mode);
            s.spool.max_bytes = 16 * 1024;
            s.spool.on_full = on_full;
            s.spool.high_water_pct = 100;
            s.budget = BUDGET;
            let mut h = start(&dir, s);
            let mut held: Vec<Batch> = Vec::new();
            let (mut seq, mut fed, mut biggest) = (0u64, 0u64, 0usize);
            for op in ops {
                match op {
                    Op::Feed(size) => {
                        seq += 1;
                        if h.input.try_send(batch_of(seq, size.bytes())).is_ok() {
                            fed += 1;
                            biggest = biggest.max(size.bytes());
                        }
                        settle().await;
                    }
                    Op::Take => {
                        settle().await;
                        while held.len() < WINDOW {
                            match h.wire.try_recv() {
                                Ok(b) => held.push(b),
                                Err(_) => break,
                            }
                            settle().await;
                        }
                    }
                    Op::Ack(i) if !held.is_empty() => {
                        let b = held.remove(i % held.len());
                        h.ack(&b).await;
                    }
                    Op::Return(i) if !held.is_empty() => {
                        let b = held.remove(i % held.len());
                        h.give_back(b).await;
                    }
                    Op::Ack(_) | Op::Return(_) => {}
                    Op::Advance(ms) => {
                        tokio::time::advance(Duration::from_millis(u64::from(ms))).await;
                        settle().await;
                    }
                    Op::Spill => {
                        h.spill.store(true, Ordering::Relaxed);
                        tokio::time::advance(crate::pipeline::liveness::BEAT).await;
                        settle().await;
                    }
                }
                let mem = h.t.memory_payload_bytes.get() as usize;
                prop_assert!(
                    mem < BUDGET + biggest,
                    "{mem} payload bytes in memory, budget {BUDGET} (+ one batch of {biggest})"
                );
            }
            // The transport ends: what it holds, and what still waits on the wire for it, comes
            // back (transport.rs returns both when it stops), then the router stops.
            for b in held {
                h.give_back(b).await;
            }
            loop {
                let left = h.sent().await;
                if left.is_empty() {
                    break;
                }
                for b in left {
                    h.give_back(b).await;
                }
            }
            let delivered = h.t.delivered.get();
            let dropped = h.t.dropped_total();
            let (lost, on_disk) = h.stop().await;

            prop_assert_eq!(
                fed,
                delivered + dropped + lost.len() as u64 + on_disk.len() as u64,
                "fed = delivered {} + dropped {} + lost at stop {} + on disk {}",
                delivered,
                dropped,
                lost.len(),
                on_disk.len()
            );
            Ok(())
        })
    }

    /// The case proptest shrank the first failure to: a window filled by batches the write-ahead
    /// refused, then the spool's one record replayed on top (38816 bytes held, budget 20480).
    #[test]
    fn a_replay_does_not_pile_on_a_full_window() {
        use Op::{Feed, Take};
        use Size::{Big, Small};
        let ops = vec![
            Feed(Small),
            Feed(Small),
            Feed(Big(0)),
            Feed(Small),
            Feed(Big(0)),
            Feed(Small),
            Take,
        ];
        run(ops, SpoolMode::Always, SpoolFull::DropOldest).unwrap();
    }

    /// The second failure, shrunk: under `drop_oldest` a refused batch past the budget took the
    /// place of the oldest memory batch whatever their sizes, so memory climbed by each swap
    /// (63416 bytes held, budget 20480).
    #[test]
    fn a_refused_batch_does_not_swap_a_smaller_old_one_out_for_itself() {
        use Op::{Ack, Feed, Return, Take};
        use Size::{Big, Small};
        let ops = vec![
            Feed(Small),
            Feed(Small),
            Take,
            Return(0),
            Ack(0),
            Feed(Big(0)),
            Feed(Big(113)),
            Feed(Big(173)),
        ];
        run(ops, SpoolMode::Always, SpoolFull::DropOldest).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn memory_stays_within_budget_and_every_profile_is_accounted_for_drop_oldest(
            ops in proptest::collection::vec(op(), 1..120),
            always in any::<bool>(),
        ) {
            run(ops, if always { SpoolMode::Always } else { SpoolMode::Overflow }, SpoolFull::DropOldest)?;
        }

        #[test]
        fn memory_stays_within_budget_and_every_profile_is_accounted_for_drop_newest(
            ops in proptest::collection::vec(op(), 1..120),
            always in any::<bool>(),
        ) {
            run(ops, if always { SpoolMode::Always } else { SpoolMode::Overflow }, SpoolFull::DropNewest)?;
        }
    }
}

/// A transport that ends without handing back what it holds (a panic): the router counts the
/// memory-only batch it never got back as dropped at the stop (`shutdown`) instead of forgetting
/// it; a batch the spool holds stays on disk for the next start.
#[tokio::test(start_paused = true)]
async fn a_batch_the_transport_never_returned_is_counted_at_the_stop() {
    let (_d, dir) = tmp();
    let mut h = start(&dir, Setup::new(&dir, SpoolMode::Overflow));
    h.feed(batch(1)).await;
    let out = h.sent().await;
    assert_eq!(seqs(&out), [1]);
    drop(out); // the transport dies holding it
    let t = h.t.clone();
    let (lost, on_disk) = h.stop().await;
    assert!(lost.is_empty() && on_disk.is_empty());
    assert_eq!(t.dropped_of(DropReason::Shutdown), 1);

    // Written ahead: the spool still has it.
    let (_d, dir) = tmp();
    let mut h = start(&dir, Setup::new(&dir, SpoolMode::Always));
    h.feed(batch(1)).await;
    assert_eq!(seqs(&h.sent().await), [1]);
    let t = h.t.clone();
    let (lost, on_disk) = h.stop().await;
    assert!(lost.is_empty());
    assert_eq!(on_disk, [1]);
    assert_eq!(t.dropped_total(), 0);
}
