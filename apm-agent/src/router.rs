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
//! Replay is rate-limited (`spool.replay_batches_per_s`) and alternates with live batches, so
//! fresh profiles are not starved behind a long backlog; while the router pushes back, replay is
//! the only traffic to a listener that is up, and runs unthrottled. While the breaker is open
//! and the spool is past `spool.high_water_pct`, PHP's kill switch is raised; it is lowered once
//! the breaker is closed and the spool is back under half that mark.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::breaker::{BreakerState, CircuitBreaker, Permit};
use crate::config::{SpoolConfig, SpoolFull, SpoolMode};
use crate::model::Batch;
use crate::phpctl::{KillReason, PhpControl};
use crate::spool::{RecordId, Spool, SpoolError};
use crate::telemetry::{DropReason, Telemetry};
use crate::transport::Outcome;

/// No ack for this long while batches are out: the listener is stalled, not just slow, and a
/// full memory window overflows to the spool again.
pub const ACK_STALL: Duration = Duration::from_secs(2);

pub struct Router {
    pub telemetry: Arc<Telemetry>,
    pub memory_budget: usize,
    pub live: Arc<crate::liveness::Liveness>,
    pub breaker: CircuitBreaker,
    pub spool: Option<Spool>,
    pub spool_cfg: SpoolConfig,
    pub php: Option<Arc<PhpControl>>,
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
}

struct State {
    t: Arc<Telemetry>,
    breaker: CircuitBreaker,
    spool: Option<Spool>,
    cfg: SpoolConfig,
    php: Option<Arc<PhpControl>>,
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
    /// Not taking new batches (see the module doc); replay then runs unthrottled, since it is
    /// the only traffic and the listener is up.
    pushing_back: bool,
    /// Last ack, or the moment the first batch went out after none was in flight.
    last_ack: Instant,
}

impl State {
    fn spool_pending(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.pending())
    }

    fn publish(&mut self) {
        self.t.breaker_state.set(self.breaker.state().gauge());
        self.t.memory_payload_bytes.set(self.held as i64);
        if let Some(s) = &self.spool {
            let st = s.stats();
            self.t.spooled_batches.set(st.batches as i64);
            self.t.spool_bytes.set(st.bytes as i64);
            let open = self.breaker.state() != BreakerState::Closed;
            let fill = s.fill_pct();
            let high = f64::from(self.cfg.high_water_pct);
            if let Some(php) = &self.php {
                if open && fill >= high && !self.kill_raised {
                    self.kill_raised = true;
                    let _ = php.raise(KillReason::SpoolHighWater);
                } else if self.kill_raised && !open && fill < high / 2.0 {
                    self.kill_raised = false;
                    let _ = php.lower(KillReason::SpoolHighWater);
                }
            }
        }
    }

    /// Appends to the spool (overflow), counting what the spool drops. Returns the batch back
    /// when there is no spool or it cannot write.
    fn spool_append(&mut self, batch: Batch) -> Result<(), Batch> {
        let Some(spool) = self.spool.as_mut() else {
            return Err(batch);
        };
        let mut tried_drop = false;
        loop {
            match tokio::task::block_in_place(|| spool.append(&batch)) {
                Ok(a) => {
                    self.t
                        .drop_profiles(DropReason::SpoolFull, a.dropped.profiles);
                    return Ok(());
                }
                Err(e)
                    if e.is_disk_full()
                        && self.cfg.on_full == SpoolFull::DropOldest
                        && !tried_drop =>
                {
                    tried_drop = true;
                    match spool.drop_oldest_segment() {
                        Ok(d) if d.batches > 0 => {
                            tracing::warn!(
                                dropped_profiles = d.profiles,
                                "disk full: oldest spool segment dropped"
                            );
                            self.t.drop_profiles(DropReason::SpoolFull, d.profiles);
                        }
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
        if self.spool.is_none() {
            return;
        }
        let waiting: Vec<Waiting> = self.retry.drain(..).chain(self.pending.drain(..)).collect();
        let n = waiting.len();
        for (batch, id) in waiting {
            let bytes = batch.payload_bytes();
            match id {
                Some(id) => {
                    let d = self.spool.as_mut().expect("checked").requeue(id);
                    self.t.drop_profiles(DropReason::SpoolFull, d.profiles);
                    self.held -= bytes;
                }
                None => match self.spool_append(batch) {
                    Ok(()) => self.held -= bytes,
                    Err(b) => self.pending.push_back((b, None)),
                },
            }
        }
        if n > 0 {
            tracing::info!(batches = n, "in-memory batches spilled to the spool");
        }
    }

    /// A new batch from the batcher; `to_disk` when the in-memory window is full.
    fn accept(&mut self, batch: Batch, to_disk: bool) {
        let bytes = batch.payload_bytes();
        let open = self.breaker.state() == BreakerState::Open;
        if self.cfg.mode == SpoolMode::Always
            && let Some(spool) = self.spool.as_mut()
        {
            match tokio::task::block_in_place(|| spool.append_taken(&batch)) {
                Ok(a) => {
                    self.t
                        .drop_profiles(DropReason::SpoolFull, a.dropped.profiles);
                    match a.id {
                        // The spool owns it; keep a memory copy only to send it now.
                        Some(id) if open || to_disk => {
                            let d = spool.requeue(id);
                            self.t.drop_profiles(DropReason::SpoolFull, d.profiles);
                        }
                        Some(id) => {
                            self.held += bytes;
                            self.pending.push_back((batch, Some(id)));
                        }
                        None => {} // drop_newest refused it; counted above
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, seq = batch.seq, "write-ahead append failed: keeping the batch in memory")
                }
            }
        } else if open || to_disk {
            match self.spool_append(batch) {
                Ok(()) => return,
                Err(b) => {
                    if self.spool.is_some() && to_disk {
                        tracing::error!(
                            seq = b.seq,
                            profiles = b.len(),
                            "spool unavailable and memory full: batch dropped"
                        );
                        self.t.drop_profiles(DropReason::SpoolError, b.len() as u64);
                        return;
                    }
                    self.held += bytes;
                    self.pending.push_back((b, None));
                    return;
                }
            }
        }
        self.held += bytes;
        self.pending.push_back((batch, None));
    }

    fn refill(&mut self, now: Instant) {
        let rate = f64::from(self.cfg.replay_batches_per_s);
        let dt = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        self.replay_tokens = (self.replay_tokens + dt * rate).min(rate.max(1.0));
    }

    /// Whether to take the next batch from the batcher now (see the module doc).
    fn may_take_input(&self, over_budget: bool, now: Instant) -> bool {
        let Some(spool) = &self.spool else {
            return !over_budget;
        };
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

    fn may_replay(&self) -> bool {
        (self.replay_tokens >= 1.0 || self.pushing_back) && self.spool_pending() > 0
    }

    fn has_work(&self) -> bool {
        !self.retry.is_empty() || !self.pending.is_empty() || self.may_replay()
    }

    /// Picks the next batch: returned ones first, then live and replay in turn.
    fn next_batch(&mut self) -> Option<(Batch, InFlight)> {
        if let Some((b, id)) = self.retry.pop_front() {
            let bytes = b.payload_bytes();
            return Some((b, InFlight { id, bytes }));
        }
        let can_replay = self.may_replay();
        let take_replay = can_replay && (self.pending.is_empty() || self.replay_turn);
        self.replay_turn = !self.replay_turn;
        if take_replay {
            let spool = self.spool.as_mut().expect("pending implies a spool");
            match tokio::task::block_in_place(|| spool.take_next()) {
                Ok(Some(sb)) => {
                    self.replay_tokens = (self.replay_tokens - 1.0).max(0.0);
                    let bytes = sb.batch.payload_bytes();
                    self.held += bytes;
                    return Some((
                        sb.batch,
                        InFlight {
                            id: Some(sb.id),
                            bytes,
                        },
                    ));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "spool read failed"),
            }
        }
        self.pending.pop_front().map(|(b, id)| {
            let bytes = b.payload_bytes();
            (b, InFlight { id, bytes })
        })
    }

    fn settle_ok(&mut self, seq: u64, profiles: usize) {
        if let Some(f) = self.inflight.remove(&seq) {
            self.held -= f.bytes;
            if let (Some(id), Some(spool)) = (f.id, self.spool.as_mut())
                && let Err(e) = tokio::task::block_in_place(|| spool.ack(id))
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
        match (f.and_then(|f| f.id), self.spool.as_mut()) {
            (Some(id), Some(spool)) => {
                let d = spool.requeue(id);
                self.t.drop_profiles(DropReason::SpoolFull, d.profiles);
            }
            _ => {
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
    }

    fn settle_rejected(&mut self, batch: Batch) {
        if let Some(f) = self.inflight.remove(&batch.seq) {
            self.held -= f.bytes;
            if let (Some(id), Some(spool)) = (f.id, self.spool.as_mut()) {
                let _ = spool.ack(id);
            }
        }
        self.t
            .drop_profiles(DropReason::RejectedByCentral, batch.len() as u64);
    }
}

impl Router {
    /// Runs until the batcher is done and every batch is settled (or spooled), or until the
    /// deadline. Returns the batches that could be neither delivered nor spooled.
    pub async fn run(self, io: RouterIo) -> Vec<Batch> {
        let RouterIo {
            mut input,
            to_transport,
            mut outcomes,
            deadline,
        } = io;
        let budget = self.memory_budget;
        let now = Instant::now();
        let mut st = State {
            t: self.telemetry,
            breaker: self.breaker,
            spool: self.spool,
            cfg: self.spool_cfg,
            php: self.php,
            retry: VecDeque::new(),
            pending: VecDeque::new(),
            inflight: HashMap::new(),
            held: 0,
            replay_tokens: 1.0,
            last_refill: now,
            replay_turn: false,
            blocked_until: None,
            kill_raised: false,
            pushing_back: false,
            last_ack: now,
        };
        let spill_flag = self.spill;
        let live = self.live;
        let mut input_open = true;
        let mut was_open = false;
        let mut beat = tokio::time::interval(crate::liveness::BEAT);
        let mut fsync = tokio::time::interval(st.cfg.fsync_interval.max(Duration::from_millis(10)));
        let mut last_report = Instant::now();
        let mut last_bp_log: Option<Instant> = None;
        st.publish();
        loop {
            let now = Instant::now();
            st.refill(now);
            if spill_flag.swap(false, Ordering::Relaxed) {
                st.spill();
            }
            st.publish();
            if !input_open && st.retry.is_empty() && st.pending.is_empty() && st.inflight.is_empty()
            {
                // Everything accepted is delivered or on disk (spooled records replay next start).
                break;
            }
            // A probe past its deadline reopens the breaker here rather than at the next wake.
            st.breaker.tick(now);
            // Whenever the breaker (re)opens, from closed or from a failed or timed-out probe,
            // what waits in memory goes to disk: batches accepted while half-open included.
            let is_open = st.breaker.state() == BreakerState::Open;
            if is_open && !was_open {
                st.spill();
            }
            was_open = is_open;
            if let Some(u) = st.blocked_until
                && now >= u
            {
                st.blocked_until = None;
            }
            let over = st.held >= budget;
            let take_input = input_open && st.may_take_input(over, now);
            let pushing_back = input_open && !take_input;
            if pushing_back != st.pushing_back {
                st.pushing_back = pushing_back;
                st.t.backpressure.set(i64::from(pushing_back));
                if pushing_back {
                    st.t.backpressure_episodes.inc();
                    // Episodes come and go many times a second under sustained overload: one
                    // line per 30 s says it without flooding the log.
                    if last_bp_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(30)) {
                        last_bp_log = Some(now);
                        tracing::warn!(
                            memory_bytes = st.held,
                            spool_pct = st.spool.as_ref().map_or(0.0, |s| s.fill_pct()),
                            episodes = st.t.backpressure_episodes.get(),
                            "central listener slower than the traffic: pushing back on ingest (PHP's sends will see EAGAIN)"
                        );
                    }
                }
            }
            let may_send = st.blocked_until.is_none() && st.has_work();
            // Wake for the breaker's next step, a blocked dispatch, or the next replay token.
            // Only instants still ahead: an open period that has ended is acted on by the next
            // dispatch (`allow` turns it half-open), and a past instant would win the biased
            // select on every turn and starve that dispatch, leaving the breaker open for good.
            let wake = [
                st.breaker.next_attempt_at(),
                st.blocked_until,
                // Pushing back: look again when the acks would count as stalled.
                (st.pushing_back && !st.inflight.is_empty()).then(|| st.last_ack + ACK_STALL),
                (st.spool_pending() > 0 && st.replay_tokens < 1.0).then(|| {
                    now + Duration::from_secs_f64(
                        (1.0 - st.replay_tokens) / f64::from(st.cfg.replay_batches_per_s),
                    )
                }),
            ]
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .min();
            tokio::select! {
                biased;
                () = deadline.cancelled() => break,
                _ = beat.tick() => live.beat(crate::liveness::Stage::Router),
                _ = fsync.tick() => if let Some(s) = st.spool.as_mut() { tokio::task::block_in_place(|| s.tick()) },
                o = outcomes.recv() => {
                    let now = Instant::now();
                    // Any settlement may change what the breaker allows: look again.
                    st.blocked_until = None;
                    match o {
                        Some(Outcome::Acked { seq, profiles, .. }) => {
                            st.last_ack = now;
                            st.breaker.on_success(now);
                            st.settle_ok(seq, profiles);
                        }
                        Some(Outcome::Returned { batch, reason }) => {
                            tracing::debug!(seq = batch.seq, reason = %reason, "batch returned");
                            st.breaker.on_failure(now);
                            st.settle_returned(batch);
                        }
                        Some(Outcome::Rejected { batch, .. }) => {
                            st.breaker.on_success(now);
                            st.settle_rejected(batch);
                        }
                        Some(Outcome::ConnectFailed { .. } | Outcome::Connected) => {}
                        None => break,
                    }
                }
                () = async { tokio::time::sleep_until(wake.unwrap()).await }, if wake.is_some() => {
                    st.breaker.tick(Instant::now());
                }
                permit = to_transport.reserve(), if may_send => match permit {
                    Ok(p) => match st.breaker.allow(Instant::now()) {
                        Permit::Send | Permit::Probe => {
                            if let Some((b, f)) = st.next_batch() {
                                if st.inflight.is_empty() {
                                    // The stall clock runs only while something is out.
                                    st.last_ack = Instant::now();
                                }
                                st.inflight.insert(b.seq, f);
                                p.send(b);
                            }
                        }
                        Permit::Reject { until } => st.blocked_until = Some(until),
                    },
                    Err(_) => break,
                },
                b = input.recv(), if take_input => match b {
                    // Past the in-memory window the batch goes to disk.
                    Some(b) => st.accept(b, over),
                    None => input_open = false,
                },
            }
            if last_report.elapsed() > Duration::from_secs(30)
                && (st.retry.len() + st.pending.len()) as u64 + st.spool_pending() > 0
            {
                last_report = Instant::now();
                tracing::info!(
                    waiting = st.retry.len() + st.pending.len(),
                    in_flight = st.inflight.len(),
                    spooled = st.spool_pending(),
                    breaker = st.breaker.state().as_str(),
                    "batches waiting for the central listener"
                );
            }
        }
        // Stop: take back what the transport still holds (it returns everything once stopped).
        drop(to_transport);
        while !st.inflight.is_empty() {
            match outcomes.recv().await {
                Some(Outcome::Acked { seq, profiles, .. }) => st.settle_ok(seq, profiles),
                Some(Outcome::Returned { batch, .. }) => {
                    let f = st.inflight.remove(&batch.seq);
                    st.held -= f.map_or(0, |f| f.bytes);
                    match (f.and_then(|f| f.id), st.spool.as_mut()) {
                        (Some(id), Some(s)) => {
                            s.requeue(id);
                        }
                        _ => {
                            st.held += batch.payload_bytes();
                            st.retry.push_back((batch, None));
                        }
                    }
                }
                Some(Outcome::Rejected { batch, .. }) => st.settle_rejected(batch),
                Some(_) => {}
                None => break,
            }
        }
        // Whatever the batcher still sends is ours too (it ends once ingest has drained).
        while let Some(b) = input.recv().await {
            st.held += b.payload_bytes();
            st.pending.push_back((b, None));
        }
        let mut left: Vec<Waiting> = st.retry.drain(..).chain(st.pending.drain(..)).collect();
        left.sort_by_key(|(b, _)| b.seq);
        let mut lost = Vec::new();
        let mut spooled = 0usize;
        for (b, id) in left {
            match (id, st.spool.as_mut()) {
                (Some(id), Some(s)) => {
                    s.requeue(id);
                    spooled += 1;
                }
                _ => match st.spool_append(b) {
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
        st.held = 0;
        st.publish();
        if let Some(s) = st.spool.take() {
            tokio::task::block_in_place(|| s.close());
        }
        lost
    }
}

/// Maps spool open errors that an operator must fix to configuration errors.
pub fn is_config_error(e: &SpoolError) -> bool {
    matches!(
        e,
        SpoolError::InsufficientSpace { .. } | SpoolError::Locked { .. }
    )
}
