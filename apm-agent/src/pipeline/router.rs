//! The router sits between the batcher and the transport and owns every batch that is not yet
//! acknowledged. It decides whether a batch goes to the wire now, waits in memory, or goes to
//! the disk spool; it settles acks, resends what comes back, replays the spool oldest first, and
//! drives the circuit breaker.
//!
//! - `spool.mode = "overflow"`: memory first; a batch goes to disk while the breaker is open,
//!   when the in-memory window (`limits.memory_budget_mb`) is full and acks have stalled, when
//!   the memory guard asks for a spill, and at shutdown. When the breaker opens, what waits in
//!   memory is spilled too.
//! - `spool.mode = "always"`: every batch is appended (write-ahead) before it is sent; the spool
//!   owns it until the listener acknowledges it.
//!
//! The spool is for a listener that cannot take the traffic (breaker open, or no ack for
//! [`ACK_STALL`] while batches are out), for durability (`always`, shutdown) and for the memory
//! guard; not for a listener that is up and acknowledging but slower than the traffic. In that
//! case the router stops taking new batches once memory is full (overflow mode), or once the
//! spool is past `spool.high_water_pct` (always mode). Ingest then waits, the kernel queue
//! fills and PHP's non-blocking sends fail with EAGAIN, which the eBPF monitor counts and
//! answers by lowering the sample rate. Profiles are then refused at the door, counted, rather
//! than accepted and later dropped from a full spool (`drop_oldest`) after a detour through the
//! disk that only postpones the loss.
//!
//! Replay goes at the listener's pace: the next spooled batch leaves as an ack frees room in the
//! transport's window (`central.max_in_flight`), with no fixed rate unless
//! `spool.replay_batches_per_s` sets one. It alternates with live batches, so fresh profiles are
//! not starved behind a long backlog, and while live batches flow it holds at most half of the
//! memory budget, so a listener slower than the disk is not handed a window full of old
//! profiles while the router pushes back on PHP to make room. While the router pushes back,
//! replay is the only traffic to a listener that is up, and takes the whole budget and any rate.
//!
//! While the breaker is open and the spool is past `spool.high_water_pct`, PHP's kill switch is
//! raised; it is lowered once the breaker is closed and the spool is back under half that mark.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{SpoolConfig, SpoolFull, SpoolMode};
use crate::events::ProfilesDropped;
use crate::phpctl::{KillReason, PhpControl};
use crate::pipeline::breaker::{BreakerState, CircuitBreaker, Permit};
use crate::pipeline::model::Batch;
use crate::pipeline::spool::{RecordId, Spool, SpoolError};
use crate::pipeline::transport::Outcome;
use crate::telemetry::{DropReason, Telemetry};

/// No ack for this long while batches are out: the listener is stalled, not just slow, and a
/// full memory window overflows to the spool again.
pub const ACK_STALL: Duration = Duration::from_secs(2);

/// What a router is built from.
pub struct RouterDeps {
    pub telemetry: Arc<Telemetry>,
    /// `limits.memory_budget_mb` in bytes: payload held in memory, waiting or in flight.
    pub memory_budget: usize,
    pub live: Arc<crate::pipeline::liveness::Liveness>,
    pub breaker: CircuitBreaker,
    pub spool: Spool,
    pub spool_cfg: SpoolConfig,
    pub php: Arc<PhpControl>,
    /// Set by the memory guard: move what waits in memory to the spool now.
    pub spill: Arc<AtomicBool>,
}

/// Handles a router needs.
pub struct RouterIo {
    pub input: mpsc::Receiver<Batch>,
    pub to_transport: mpsc::Sender<Batch>,
    pub outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// Cancelled when the shutdown timeout has run out: stop waiting for acks.
    pub deadline: CancellationToken,
}

/// A batch waiting in memory, with its spool record when the spool also holds it.
type Waiting = (Batch, Option<RecordId>);

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: Option<RecordId>,
    bytes: usize,
    profiles: usize,
}

/// What one turn of the loop may do, decided before it waits.
#[derive(Debug, Clone, Copy)]
struct Turn {
    /// Take the next batch from the batcher.
    take_input: bool,
    /// The in-memory window is full: a batch taken now goes to disk.
    over_budget: bool,
    /// Dispatch a batch to the transport when it has room.
    may_send: bool,
    /// Wake then even if nothing else happens.
    wake: Option<Instant>,
}

pub struct Router {
    t: Arc<Telemetry>,
    budget: usize,
    live: Arc<crate::pipeline::liveness::Liveness>,
    breaker: CircuitBreaker,
    spool: Spool,
    cfg: SpoolConfig,
    php: Arc<PhpControl>,
    spill_flag: Arc<AtomicBool>,
    retry: VecDeque<Waiting>,
    pending: VecDeque<Waiting>,
    inflight: HashMap<u64, InFlight>,
    /// Payload bytes in memory: waiting plus in flight.
    held: usize,
    replay_tokens: f64,
    last_refill: Instant,
    replay_turn: bool,
    blocked_until: Option<Instant>,
    kill_raised: bool,
    /// The kill switch is up because the write-ahead fails (`spool.mode = "always"`).
    wal_failing: bool,
    /// Not taking new batches (see the module doc); replay then runs unthrottled, since it is
    /// the only traffic and the listener is up.
    pushing_back: bool,
    /// Last ack, or the moment the first batch went out after none was in flight.
    last_ack: Instant,
    input_open: bool,
    was_open: bool,
    last_report: Instant,
    last_bp_log: Option<Instant>,
    /// Releases ingest's group-commit wait when the router ends, however it ends.
    _gate: crate::pipeline::durable::CloseOnDrop,
}

impl Router {
    pub fn new(d: RouterDeps) -> Self {
        let now = Instant::now();
        ProfilesDropped {
            reason: DropReason::SpoolCorrupt,
            profiles: d.spool.stats().corrupt_profiles,
            what: "spool records found corrupt or cut off at open: their profiles are lost",
            seq: None,
        }
        .emit(&d.telemetry);
        Self {
            _gate: crate::pipeline::durable::CloseOnDrop(d.telemetry.clone()),
            t: d.telemetry,
            budget: d.memory_budget,
            live: d.live,
            breaker: d.breaker,
            spool: d.spool,
            cfg: d.spool_cfg,
            php: d.php,
            spill_flag: d.spill,
            retry: VecDeque::new(),
            pending: VecDeque::new(),
            inflight: HashMap::new(),
            held: 0,
            replay_tokens: 1.0,
            last_refill: now,
            replay_turn: false,
            blocked_until: None,
            kill_raised: false,
            wal_failing: false,
            pushing_back: false,
            last_ack: now,
            input_open: true,
            was_open: false,
            last_report: now,
            last_bp_log: None,
        }
    }

    /// Runs until the batcher is done and every batch is settled (or spooled), or until the
    /// deadline. Returns the batches that could be neither delivered nor spooled.
    pub async fn run(mut self, io: RouterIo) -> Vec<Batch> {
        let RouterIo {
            mut input,
            to_transport,
            mut outcomes,
            deadline,
        } = io;
        let mut beat = tokio::time::interval(crate::pipeline::liveness::BEAT);
        let mut fsync =
            tokio::time::interval(self.cfg.fsync_interval.max(Duration::from_millis(10)));
        self.publish();
        loop {
            let now = Instant::now();
            self.housekeeping(now);
            if self.finished() {
                // Everything accepted is delivered or on disk (spooled records replay next start).
                break;
            }
            let turn = self.plan(now);
            tokio::select! {
                biased;
                () = deadline.cancelled() => break,
                _ = beat.tick() => self.live.beat(crate::pipeline::liveness::Stage::Router),
                _ = fsync.tick() => blocking(|| self.spool.tick()),
                o = outcomes.recv() => match o {
                    Some(o) => self.on_outcome(o),
                    None => break,
                },
                () = async { tokio::time::sleep_until(turn.wake.unwrap()).await }, if turn.wake.is_some() => {
                    self.breaker.tick(Instant::now());
                }
                permit = to_transport.reserve(), if turn.may_send => match permit {
                    Ok(p) => self.dispatch(p),
                    Err(_) => break,
                },
                b = input.recv(), if turn.take_input => match b {
                    // Past the in-memory window the batch goes to disk.
                    Some(b) => self.accept(b, turn.over_budget),
                    None => self.input_open = false,
                },
            }
            self.report_waiting();
        }
        drop(to_transport);
        self.take_back(&mut outcomes).await;
        self.stop(&mut input).await
    }

    /// Per turn: replay tokens, the memory guard's spill request, published figures, the
    /// breaker's clock, and a spill whenever the breaker (re)opens.
    fn housekeeping(&mut self, now: Instant) {
        self.refill(now);
        if self.spill_flag.swap(false, Ordering::Relaxed) {
            self.spill();
        }
        self.publish();
        // A probe past its deadline reopens the breaker here rather than at the next wake.
        self.breaker.tick(now);
        // Whenever the breaker (re)opens, from closed or from a failed or timed-out probe,
        // what waits in memory goes to disk: batches accepted while half-open included.
        let is_open = self.breaker.state() == BreakerState::Open;
        if is_open && !self.was_open {
            self.spill();
        }
        self.was_open = is_open;
        if self.blocked_until.is_some_and(|u| now >= u) {
            self.blocked_until = None;
        }
    }

    fn finished(&self) -> bool {
        !self.input_open
            && self.retry.is_empty()
            && self.pending.is_empty()
            && self.inflight.is_empty()
    }

    /// Decides what this turn may do, and notes when backpressure starts or ends.
    fn plan(&mut self, now: Instant) -> Turn {
        let over_budget = self.held >= self.budget;
        let take_input = self.input_open && self.may_take_input(over_budget, now);
        self.set_pushing_back(self.input_open && !take_input, now);
        let may_send = self.blocked_until.is_none() && self.has_work();
        // Wake for the breaker's next step, a blocked dispatch, or the next replay token.
        // Only instants still ahead: an open period that has ended is acted on by the next
        // dispatch (`allow` turns it half-open), and a past instant would win the biased
        // select on every turn and starve that dispatch, leaving the breaker open for good.
        let wake = [
            self.breaker.next_attempt_at(),
            self.blocked_until,
            // Pushing back: look again when the acks would count as stalled.
            (self.pushing_back && !self.inflight.is_empty()).then(|| self.last_ack + ACK_STALL),
            (self.spool.pending() > 0 && self.replay_tokens < 1.0).then(|| {
                // Only with a fixed rate: without one, tokens never run out (`refill`).
                now + Duration::from_secs_f64(
                    (1.0 - self.replay_tokens) / f64::from(self.cfg.replay_batches_per_s),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .filter(|&t| t > now)
        .min();
        Turn {
            take_input,
            over_budget,
            may_send,
            wake,
        }
    }

    fn set_pushing_back(&mut self, pushing_back: bool, now: Instant) {
        if pushing_back == self.pushing_back {
            return;
        }
        self.pushing_back = pushing_back;
        self.t.backpressure.set(i64::from(pushing_back));
        if !pushing_back {
            return;
        }
        self.t.backpressure_episodes.inc();
        // Episodes come and go many times a second under sustained overload: one line per
        // 30 s says it without flooding the log.
        if self
            .last_bp_log
            .is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(30))
        {
            self.last_bp_log = Some(now);
            tracing::warn!(
                memory_bytes = self.held,
                spool_pct = self.spool.fill_pct(),
                episodes = self.t.backpressure_episodes.get(),
                "central listener slower than the traffic: pushing back on ingest (PHP's sends will see EAGAIN)"
            );
        }
    }

    /// An outcome from the transport: settle the batch and tell the breaker.
    fn on_outcome(&mut self, o: Outcome) {
        let now = Instant::now();
        // Any settlement may change what the breaker allows: look again.
        self.blocked_until = None;
        match o {
            Outcome::Acked { seq, profiles, .. } => {
                self.last_ack = now;
                self.breaker.on_success(now);
                self.settle_ok(seq, profiles);
            }
            Outcome::Returned { batch, reason } => {
                tracing::debug!(seq = batch.seq, reason = %reason, "batch returned");
                self.breaker.on_failure(now);
                self.settle_returned(batch);
            }
            Outcome::Rejected { batch, message } => {
                self.breaker.on_success(now);
                self.settle_rejected_because(batch, &message);
            }
            Outcome::Reachability { reachable } => self.breaker.on_reachability(reachable, now),
            Outcome::ConnectFailed { .. } | Outcome::Connected => {}
        }
    }

    /// The transport has room: send the next batch if the breaker allows.
    fn dispatch(&mut self, permit: mpsc::Permit<'_, Batch>) {
        match self.breaker.allow(Instant::now()) {
            Permit::Send | Permit::Probe => {
                if let Some((b, f)) = self.next_batch() {
                    if self.inflight.is_empty() {
                        // The stall clock runs only while something is out.
                        self.last_ack = Instant::now();
                    }
                    self.inflight.insert(b.seq, f);
                    permit.send(b);
                }
            }
            Permit::Reject { until } => self.blocked_until = Some(until),
        }
    }

    /// Every 30 s, what waits, while the listener is away: the breaker is not closed, or
    /// nothing was acknowledged in that time. A batch waiting its turn behind one on the wire
    /// to a listener that acks is not news (`router::tests::the_waiting_report_...`).
    fn report_waiting(&mut self) {
        const EVERY: Duration = Duration::from_secs(30);
        let waiting = self.retry.len() + self.pending.len();
        let listener_away =
            self.breaker.state() != BreakerState::Closed || self.last_ack.elapsed() >= EVERY;
        if self.last_report.elapsed() > EVERY
            && listener_away
            && waiting as u64 + self.spool.pending() > 0
        {
            self.last_report = Instant::now();
            tracing::info!(
                waiting,
                in_flight = self.inflight.len(),
                spooled = self.spool.pending(),
                breaker = self.breaker.state().as_str(),
                "batches waiting for the central listener"
            );
        }
    }

    /// Stop: take back what the transport still holds (it returns everything once stopped).
    async fn take_back(&mut self, outcomes: &mut mpsc::UnboundedReceiver<Outcome>) {
        while !self.inflight.is_empty() {
            match outcomes.recv().await {
                Some(Outcome::Acked { seq, profiles, .. }) => self.settle_ok(seq, profiles),
                Some(Outcome::Returned { batch, .. }) => {
                    let f = self.inflight.remove(&batch.seq);
                    self.held -= f.map_or(0, |f| f.bytes);
                    let mine = match f.and_then(|f| f.id) {
                        Some(id) => self.requeue(id, batch),
                        None => Some(batch),
                    };
                    if let Some(batch) = mine {
                        self.held += batch.payload_bytes();
                        self.retry.push_back((batch, None));
                    }
                }
                Some(Outcome::Rejected { batch, .. }) => self.settle_rejected(batch),
                Some(_) => {}
                None => break,
            }
        }
    }

    /// Stop: everything still in memory goes to the spool for the next start; returns what the
    /// spool could not take.
    async fn stop(mut self, input: &mut mpsc::Receiver<Batch>) -> Vec<Batch> {
        // Whatever the batcher still sends is ours too (it ends once ingest has drained).
        while let Some(b) = input.recv().await {
            self.t.gate.settle(b.len() as u64);
            self.held += b.payload_bytes();
            self.pending.push_back((b, None));
        }
        // What the transport never handed back (it ended without returning it: a panic). The
        // spool still holds its own records for the next start; a batch only memory held is
        // gone, and counted.
        let gone: usize = self
            .inflight
            .drain()
            .filter(|(_, f)| f.id.is_none())
            .map(|(_, f)| f.profiles)
            .sum();
        ProfilesDropped {
            reason: DropReason::Shutdown,
            profiles: gone as u64,
            what: "in flight when the transport ended without handing it back: dropped",
            seq: None,
        }
        .emit(&self.t);
        let mut left: Vec<Waiting> = self.retry.drain(..).chain(self.pending.drain(..)).collect();
        left.sort_by_key(|(b, _)| b.seq);
        let mut lost = Vec::new();
        let mut spooled = 0usize;
        for (b, id) in left {
            let mine = match id {
                Some(id) => self.requeue(id, b),
                None => Some(b),
            };
            match mine {
                None => spooled += 1,
                Some(b) => match self.spool_append(b) {
                    Ok(()) => spooled += 1,
                    Err(b) => lost.push(b),
                },
            }
        }
        if spooled > 0 {
            tracing::info!(
                batches = spooled,
                "undelivered batches kept in the spool for the next start"
            );
        }
        self.held = 0;
        self.publish();
        let spool = self.spool;
        blocking(move || spool.close());
        lost
    }

    fn publish(&mut self) {
        self.t.breaker_state.set(self.breaker.state().gauge());
        self.t.memory_payload_bytes.set(self.held as i64);
        let memory_only = self
            .retry
            .iter()
            .chain(self.pending.iter())
            .filter(|(_, id)| id.is_none())
            .map(|(b, _)| b.len())
            .chain(
                self.inflight
                    .values()
                    .filter(|f| f.id.is_none())
                    .map(|f| f.profiles),
            )
            .sum::<usize>();
        self.t.memory_profiles.set(memory_only as i64);
        self.t
            .at_risk_profiles
            .set(i64::try_from(self.t.at_risk_profiles()).unwrap_or(i64::MAX));
        let st = self.spool.stats();
        self.t.spooled_profiles.set(st.profiles as i64);
        self.t.spooled_batches.set(st.batches as i64);
        self.t.spool_bytes.set(st.bytes as i64);
        self.t
            .spool_capacity_bytes
            .set(i64::try_from(self.spool.capacity()).unwrap_or(i64::MAX));
        let open = self.breaker.state() != BreakerState::Closed;
        let fill = self.spool.fill_pct();
        let high = f64::from(self.cfg.high_water_pct);
        if open && fill >= high && !self.kill_raised {
            self.kill_raised = true;
            let _ = self.php.raise(KillReason::SpoolHighWater);
        } else if self.kill_raised && !open && fill < high / 2.0 {
            self.kill_raised = false;
            let _ = self.php.lower(KillReason::SpoolHighWater);
        }
    }

    /// Appends to the spool (overflow), counting what the spool drops. Returns the batch back
    /// when the spool cannot write.
    fn spool_append(&mut self, batch: Batch) -> Result<(), Batch> {
        let spool = &mut self.spool;
        let mut tried_drop = false;
        loop {
            match blocking(|| spool.append(&batch)) {
                Ok(a) => {
                    spool_full(&self.t, a.dropped.profiles, batch.seq);
                    return Ok(());
                }
                Err(e)
                    if e.is_disk_full()
                        && self.cfg.on_full == SpoolFull::DropOldest
                        && !tried_drop =>
                {
                    tried_drop = true;
                    match spool.drop_oldest_segment() {
                        Ok(d) if d.batches > 0 => ProfilesDropped {
                            reason: DropReason::SpoolFull,
                            profiles: d.profiles,
                            what: "disk full: oldest spool segment dropped",
                            seq: None,
                        }
                        .emit(&self.t),
                        _ => return Err(batch),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, seq = batch.seq, "spool append failed");
                    return Err(batch);
                }
            }
        }
    }

    /// Moves batches waiting in memory to the spool (breaker opened, memory guard). Batches the
    /// spool already holds (write-ahead) are handed back to it.
    fn spill(&mut self) {
        let waiting: Vec<Waiting> = self.retry.drain(..).chain(self.pending.drain(..)).collect();
        let n = waiting.len();
        for (batch, id) in waiting {
            let bytes = batch.payload_bytes();
            let mine = match id {
                Some(id) => self.requeue(id, batch),
                None => Some(batch),
            };
            match mine {
                None => self.held -= bytes,
                Some(batch) => match self.spool_append(batch) {
                    Ok(()) => self.held -= bytes,
                    Err(b) => self.pending.push_back((b, None)),
                },
            }
        }
        if n > 0 {
            tracing::info!(batches = n, "in-memory batches spilled to the spool");
        }
    }

    /// A new batch from the batcher; `to_disk` when the in-memory window is full. Its profiles
    /// are settled for ingest's group commit (pipeline/durable.rs): durable when written ahead.
    fn accept(&mut self, batch: Batch, to_disk: bool) {
        let n = batch.len() as u64;
        if self.take_in(batch, to_disk) {
            self.t.durable_profiles.inc_by(n);
        }
        self.t.gate.settle(n);
    }

    /// [`Router::accept`]'s work; true when the write-ahead holds the batch.
    fn take_in(&mut self, batch: Batch, to_disk: bool) -> bool {
        let bytes = batch.payload_bytes();
        let open = self.breaker.state() == BreakerState::Open;
        if self.cfg.mode == SpoolMode::Always {
            let spool = &mut self.spool;
            match blocking(|| spool.append_taken(&batch)) {
                Ok(a) => {
                    self.wal_failed(false);
                    spool_full(&self.t, a.dropped.profiles, batch.seq);
                    match a.id {
                        // The spool owns it; keep a memory copy only to send it now.
                        Some(id) if open || to_disk => {
                            // Just written: the spool holds it (nothing dropped it since).
                            if let Some(batch) = self.requeue(id, batch) {
                                self.held += bytes;
                                self.pending.push_back((batch, None));
                            }
                        }
                        Some(id) => {
                            self.held += bytes;
                            self.pending.push_back((batch, Some(id)));
                        }
                        None => return false, // drop_newest refused it; counted above
                    }
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, seq = batch.seq, "write-ahead append failed: the batch waits in memory, within limits.memory_budget_mb");
                    self.wal_failed(true);
                    if to_disk {
                        self.hold_over_budget(batch);
                        return false;
                    }
                }
            }
        } else if open || to_disk {
            match self.spool_append(batch) {
                Ok(()) => return false,
                Err(b) => {
                    if to_disk {
                        ProfilesDropped {
                            reason: DropReason::SpoolError,
                            profiles: b.len() as u64,
                            what: "spool unavailable and memory full: batch dropped",
                            seq: Some(b.seq),
                        }
                        .emit(&self.t);
                        return false;
                    }
                    self.held += bytes;
                    self.pending.push_back((b, None));
                    return false;
                }
            }
        }
        self.held += bytes;
        self.pending.push_back((batch, None));
        false
    }

    /// The write-ahead failed (`true`) or worked (`false`): the kill switch follows, so PHP
    /// stops sending while nothing it sends could be made durable.
    fn wal_failed(&mut self, failing: bool) {
        if failing == self.wal_failing {
            return;
        }
        self.wal_failing = failing;
        let r = if failing {
            self.php.raise(KillReason::SpoolError)
        } else {
            self.php.lower(KillReason::SpoolError)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot write the PHP kill switch");
        }
    }

    /// A batch that neither the spool nor the memory budget can take, as `spool.on_full` says:
    /// `drop_newest` drops it; `drop_oldest` drops the oldest batches held only in memory, as
    /// many as it takes to make room for it without memory growing (a small old batch does not
    /// make room for a full new one: the faults test saw memory climb past the budget by such
    /// swaps), or this one when those are not enough. Either way counted (`spool_error`).
    fn hold_over_budget(&mut self, batch: Batch) {
        let bytes = batch.payload_bytes();
        let mut victims = Vec::new();
        if self.cfg.on_full == SpoolFull::DropOldest {
            let mut room = 0;
            for (i, (b, id)) in self.pending.iter().enumerate() {
                if room >= bytes {
                    break;
                }
                if id.is_none() {
                    room += b.payload_bytes();
                    victims.push(i);
                }
            }
            if room < bytes {
                victims.clear();
            }
        }
        let dropped: Vec<Batch> = if victims.is_empty() {
            vec![batch]
        } else {
            let old: Vec<Batch> = victims
                .iter()
                .rev()
                .filter_map(|&i| self.pending.remove(i))
                .map(|(b, _)| b)
                .collect();
            for b in &old {
                self.held -= b.payload_bytes();
            }
            self.held += bytes;
            self.pending.push_back((batch, None));
            old
        };
        for d in dropped {
            ProfilesDropped {
                reason: DropReason::SpoolError,
                profiles: d.len() as u64,
                what: "write-ahead failing and memory budget full: batch dropped as spool.on_full says",
                seq: Some(d.seq),
            }
            .emit(&self.t);
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.cfg.replay_batches_per_s == 0 {
            // No fixed rate: the transport's window and the acks pace the replay.
            self.replay_tokens = 1.0;
            return;
        }
        let rate = f64::from(self.cfg.replay_batches_per_s);
        let dt = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        self.replay_tokens = (self.replay_tokens + dt * rate).min(rate.max(1.0));
    }

    /// Whether to take the next batch from the batcher now (see the module doc).
    fn may_take_input(&self, over_budget: bool, now: Instant) -> bool {
        let spool = &self.spool;
        if self.breaker.state() == BreakerState::Open {
            // An outage: the spool takes everything, dropping per `spool.on_full` when full.
            return true;
        }
        match self.cfg.mode {
            SpoolMode::Overflow => {
                let stalled = !self.inflight.is_empty()
                    && now.saturating_duration_since(self.last_ack) >= ACK_STALL;
                !over_budget || stalled
            }
            SpoolMode::Always => {
                // Push back only while something is on its way out, so that input resumes.
                let draining = spool.pending() > 0 || !self.inflight.is_empty();
                !draining || spool.fill_pct() < f64::from(self.cfg.high_water_pct)
            }
        }
    }

    /// A replayed batch is read into memory until its ack: only while memory is under
    /// `limits.memory_budget_mb`, like a new batch (`router/tests.rs` `interleavings` found
    /// replays piling on top of a full window). While the router takes live batches, only under
    /// half of it: a listener slower than the disk would otherwise see its whole window filled
    /// by the backlog, and the router would push back on PHP to make room for old profiles.
    fn may_replay(&self) -> bool {
        let room = if self.input_open && !self.pushing_back {
            self.budget / 2
        } else {
            self.budget
        };
        (self.replay_tokens >= 1.0 || self.pushing_back)
            && self.spool.pending() > 0
            && self.held < room
    }

    fn has_work(&self) -> bool {
        !self.retry.is_empty() || !self.pending.is_empty() || self.may_replay()
    }

    /// Picks the next batch: returned ones first, then live and replay in turn.
    fn next_batch(&mut self) -> Option<(Batch, InFlight)> {
        if let Some((b, id)) = self.retry.pop_front() {
            let bytes = b.payload_bytes();
            let profiles = b.len();
            return Some((
                b,
                InFlight {
                    id,
                    bytes,
                    profiles,
                },
            ));
        }
        let can_replay = self.may_replay();
        let take_replay = can_replay && (self.pending.is_empty() || self.replay_turn);
        self.replay_turn = !self.replay_turn;
        if take_replay {
            let spool = &mut self.spool;
            match blocking(|| spool.take_next()) {
                Ok(Some(sb)) => {
                    if self.cfg.replay_batches_per_s > 0 {
                        self.replay_tokens = (self.replay_tokens - 1.0).max(0.0);
                    }
                    let bytes = sb.batch.payload_bytes();
                    let profiles = sb.batch.len();
                    self.held += bytes;
                    return Some((
                        sb.batch,
                        InFlight {
                            id: Some(sb.id),
                            bytes,
                            profiles,
                        },
                    ));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "spool read failed"),
            }
        }
        self.pending.pop_front().map(|(b, id)| {
            let bytes = b.payload_bytes();
            let profiles = b.len();
            (
                b,
                InFlight {
                    id,
                    bytes,
                    profiles,
                },
            )
        })
    }

    fn settle_ok(&mut self, seq: u64, profiles: usize) {
        if let Some(f) = self.inflight.remove(&seq) {
            self.held -= f.bytes;
            if let Some(id) = f.id
                && let Err(e) = blocking(|| self.spool.ack(id))
            {
                tracing::warn!(error = %e, seq, "spool ack failed: the batch may be replayed once (the listener deduplicates)");
            }
        }
        self.t.delivered.inc_by(profiles as u64);
        self.t.delivered_batches.inc();
    }

    /// A batch came back unacknowledged: the spool takes back its own, memory batches are
    /// resent (or spooled while the breaker is open).
    fn settle_returned(&mut self, batch: Batch) {
        let f = self.inflight.remove(&batch.seq);
        let bytes = f.map_or(batch.payload_bytes(), |f| f.bytes);
        self.held -= bytes;
        let mine = match f.and_then(|f| f.id) {
            Some(id) => self.requeue(id, batch),
            None => Some(batch),
        };
        if let Some(batch) = mine {
            let bytes = batch.payload_bytes();
            if self.breaker.state() != BreakerState::Closed
                && self.spool_append(batch.clone()).is_ok()
            {
                return;
            }
            self.held += bytes;
            let pos = self
                .retry
                .iter()
                .position(|(b, _)| b.seq > batch.seq)
                .unwrap_or(self.retry.len());
            self.retry.insert(pos, (batch, None));
        }
    }

    fn settle_rejected(&mut self, batch: Batch) {
        self.settle_rejected_because(batch, "rejected by the central listener");
    }

    /// A batch the listener will never take: kept on disk under `<spool.dir>/rejected/`
    /// (never silently discarded) and counted as dropped, `rejected_by_central`.
    fn settle_rejected_because(&mut self, batch: Batch, reason: &str) {
        match crate::pipeline::spool::keep_rejected(
            self.spool.dir(),
            self.cfg.max_bytes,
            &batch,
            reason,
        ) {
            Ok(path) => {
                tracing::warn!(seq = batch.seq, profiles = batch.len(), path = %path.display(),
                    "rejected batch kept on disk");
            }
            Err(e) => {
                tracing::error!(seq = batch.seq, profiles = batch.len(), error = %e,
                    "rejected batch could not be kept on disk");
            }
        }
        if let Some(f) = self.inflight.remove(&batch.seq) {
            self.held -= f.bytes;
            if let Some(id) = f.id {
                let _ = self.spool.ack(id);
            }
        }
        ProfilesDropped {
            reason: DropReason::RejectedByCentral,
            profiles: batch.len() as u64,
            what: "the central listener rejected a batch",
            seq: Some(batch.seq),
        }
        .emit(&self.t);
    }

    /// Hands a spool record back for replay. When its segment was dropped (`drop_oldest`, disk
    /// full) while the batch was out, the spool no longer has it: the copy in hand is the only
    /// one, and is returned to be kept like any batch in memory (not counted as dropped: it was
    /// not, and the listener may even have stored it already, deduplicating a resend).
    fn requeue(&mut self, id: RecordId, batch: Batch) -> Option<Batch> {
        let d = self.spool.requeue(id);
        (d.batches > 0).then_some(batch)
    }
}

/// Runs spool I/O off the async worker role (`block_in_place`) on the daemon's multi-threaded
/// runtime. On a current-thread runtime `block_in_place` panics, and there is no other worker to
/// hand the role to anyway: the I/O runs in place. That is what lets the router's unit tests
/// (`router/tests.rs`) drive it on tokio's paused clock, which only a current-thread runtime has.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Counts what `spool.on_full` dropped to make room for batch `seq`.
fn spool_full(t: &Telemetry, profiles: u64, seq: u64) {
    ProfilesDropped {
        reason: DropReason::SpoolFull,
        profiles,
        what: "spool full: profiles dropped as spool.on_full says",
        seq: Some(seq),
    }
    .emit(t);
}

/// Maps spool open errors that an operator must fix to configuration errors. A lock held by
/// another process and a volume that is full right now are runtime conditions: a supervisor
/// tries again (exit 1), and a full volume does not even stop the start.
pub fn is_config_error(e: &SpoolError) -> bool {
    matches!(e, SpoolError::InsufficientSpace { .. })
}

#[cfg(test)]
mod tests;
