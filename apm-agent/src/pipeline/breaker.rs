//! Circuit breaker (closed / open / half-open) in front of the central listener.
//!
//! * **Closed**: every batch is sent. `failure_threshold` consecutive failures open it.
//! * **Open**: nothing is sent (the pipeline spools) until `open_until`. The first open period is
//!   `retry_timeout`; every failed probe doubles the nominal period up to `max_retry_timeout`.
//!   The actual wait is jittered down by up to [`JITTER`] of the nominal period, so agents that
//!   lost the same listener do not probe it in lockstep, and yet each reopen waits strictly longer
//!   than the one before it (until the cap).
//! * **Half-open**: the first [`CircuitBreaker::allow`] after `open_until` hands out exactly one
//!   [`Permit::Probe`]; everything else is rejected until the probe reports. Success closes the
//!   breaker; failure, or no report within `probe_timeout`, reopens it with a longer wait.
//! * **Back early**: the transport reports whether the listener can be reached (its dials, and a
//!   `grpc.health.v1` check once per `central.probe_interval` while it cannot). A listener seen
//!   unreachable that answers again ends the open period at once
//!   ([`CircuitBreaker::on_reachability`]): it went away and came back, so the grown wait
//!   protects nothing and only delays the catch-up. A listener that stays reachable but fails
//!   batches gets no such shortcut: the doubling open period still paces the probe batches.
//!
//! Time is passed in (`now: tokio::time::Instant`) rather than read, so the owner can sleep with
//! `tokio::time::sleep_until(breaker.next_attempt_at())` and tests drive a fake clock by adding
//! durations to a base instant.
//!
//! The state is persisted to a JSON file (temp file + fsync + rename + fsync of the directory) on
//! every transition into open or closed, with `open_until` as wall-clock milliseconds, so a
//! restarted agent keeps waiting instead of hammering a dead listener. A missing file starts
//! closed; an unreadable or corrupt one is logged and starts closed. Writing is rare (a
//! transition), so doing it on the caller's thread is fine.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::BreakerConfig;

/// Largest fraction of the nominal open period that jitter removes (the wait is in
/// `[nominal * (1 - JITTER), nominal]`). Below 0.5, so a doubled period always waits longer.
pub const JITTER: f64 = 0.2;

/// File name of the persisted state inside `control.state_dir`.
pub const STATE_FILE: &str = "breaker.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The `breaker_state` gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// What the caller may do with the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: send it.
    Send,
    /// Half-open: send this one batch as the probe and report its outcome.
    Probe,
    /// Open, or a probe is outstanding: spool it; ask again at `until`.
    Reject { until: Instant },
}

/// The persisted form of the breaker (`breaker.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    state: BreakerState,
    consecutive_failures: u32,
    /// Nominal (unjittered) open period, ms.
    retry_timeout_ms: u64,
    /// Wall-clock end of the open period, ms since the Unix epoch (0 when closed).
    open_until_unix_ms: u64,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    path: Option<PathBuf>,
    state: BreakerState,
    consecutive_failures: u32,
    /// Nominal open period of the current (or next) open state.
    retry_timeout: Duration,
    /// End of the open period (meaningful when open).
    open_until: Instant,
    /// Deadline of the outstanding probe (half-open with a probe out).
    probe_deadline: Option<Instant>,
    /// The listener could not be reached since the last success or early half-open: its next
    /// answer ends an open period early.
    seen_unreachable: bool,
    rng: StdRng,
}

impl CircuitBreaker {
    /// A breaker that starts closed and persists nothing.
    pub fn new(cfg: BreakerConfig, now: Instant) -> Self {
        Self {
            retry_timeout: cfg.retry_timeout,
            cfg,
            path: None,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            open_until: now,
            probe_deadline: None,
            seen_unreachable: false,
            rng: StdRng::from_os_rng(),
        }
    }

    /// Restores the breaker from `path` (normally `<state_dir>/breaker.json`) and persists every
    /// later transition there. Never fails: a missing, unreadable or corrupt file starts closed
    /// (the last two with a warning).
    pub fn load(cfg: BreakerConfig, path: &Path, now: Instant) -> Self {
        Self::load_at(cfg, path, now, SystemTime::now())
    }

    /// [`Self::load`] with the wall clock passed in (tests).
    pub fn load_at(cfg: BreakerConfig, path: &Path, now: Instant, wall_now: SystemTime) -> Self {
        let mut b = Self::new(cfg, now);
        b.path = Some(path.to_path_buf());
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return b,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read breaker state; starting closed");
                return b;
            }
        };
        let p: Persisted = match serde_json::from_slice(&text) {
            Ok(p) => p,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "corrupt breaker state; starting closed");
                return b;
            }
        };
        b.consecutive_failures = p.consecutive_failures;
        b.retry_timeout = Duration::from_millis(p.retry_timeout_ms)
            .clamp(b.cfg.retry_timeout, b.cfg.max_retry_timeout);
        match p.state {
            BreakerState::Closed => {}
            // A probe that was out when the agent stopped never reported: open, probe again at
            // the stored time (half-open is not written, but accept it if an older version did).
            BreakerState::Open | BreakerState::HalfOpen => {
                let until = UNIX_EPOCH + Duration::from_millis(p.open_until_unix_ms);
                // A clock that jumped backwards must not keep the breaker open for longer
                // than one (current) open period.
                let remaining = until
                    .duration_since(wall_now)
                    .unwrap_or(Duration::ZERO)
                    .min(b.retry_timeout);
                b.state = BreakerState::Open;
                b.open_until = now + remaining;
                // It opened because the listener failed; if it answers a check now, it is back.
                b.seen_unreachable = true;
                info!(
                    path = %path.display(),
                    remaining_ms = remaining.as_millis() as u64,
                    "breaker restored open"
                );
            }
        }
        b
    }

    /// Fixes the jitter RNG (tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Nominal (unjittered) open period of the current or next open state.
    pub fn retry_timeout(&self) -> Duration {
        self.retry_timeout
    }

    /// When something will change without a report: the end of the open period (open), the
    /// probe deadline (half-open with a probe out); `None` when closed or when a probe may be
    /// sent right now.
    pub fn next_attempt_at(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Closed => None,
            BreakerState::Open => Some(self.open_until),
            BreakerState::HalfOpen => self.probe_deadline,
        }
    }

    /// Applies time-based transitions: an outstanding probe past its deadline counts as failed
    /// and reopens the breaker. Called by [`Self::allow`]; call it also when a timer set to
    /// [`Self::next_attempt_at`] fires.
    pub fn tick(&mut self, now: Instant) {
        if self.state == BreakerState::HalfOpen
            && let Some(deadline) = self.probe_deadline
            && now >= deadline
        {
            warn!(
                probe_timeout_ms = self.cfg.probe_timeout.as_millis() as u64,
                "breaker probe timed out"
            );
            self.reopen(now);
        }
    }

    /// May the next batch be sent?
    pub fn allow(&mut self, now: Instant) -> Permit {
        self.tick(now);
        match self.state {
            BreakerState::Closed => Permit::Send,
            BreakerState::Open if now < self.open_until => Permit::Reject {
                until: self.open_until,
            },
            BreakerState::Open => {
                self.state = BreakerState::HalfOpen;
                self.probe_deadline = Some(now + self.cfg.probe_timeout);
                info!("breaker half-open: sending one probe batch");
                Permit::Probe
            }
            BreakerState::HalfOpen => match self.probe_deadline {
                Some(until) => Permit::Reject { until },
                // Only reachable if a caller reports nothing for a probe it did not get.
                None => {
                    self.probe_deadline = Some(now + self.cfg.probe_timeout);
                    Permit::Probe
                }
            },
        }
    }

    /// What a dial or a reachability check found. A listener seen unreachable that answers
    /// again ends the open period now: the next [`Self::allow`] hands out the probe batch.
    /// Answers from a listener that was never seen unreachable change nothing (it is up and
    /// failing batches, and the open period paces it).
    pub fn on_reachability(&mut self, reachable: bool, now: Instant) {
        if !reachable {
            self.seen_unreachable = true;
            return;
        }
        if self.state == BreakerState::Open && self.seen_unreachable && now < self.open_until {
            info!(
                saved_ms = self.open_until.saturating_duration_since(now).as_millis() as u64,
                "central listener answers again: half-open now"
            );
            self.open_until = now;
        }
        self.seen_unreachable = false;
    }

    /// A send (or the probe) was acknowledged. Closes a half-open breaker. Reports that arrive
    /// while open belong to sends made before it opened and are ignored.
    pub fn on_success(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => self.consecutive_failures = 0,
            BreakerState::Open => {}
            BreakerState::HalfOpen => {
                info!("breaker probe succeeded: closed");
                self.state = BreakerState::Closed;
                self.consecutive_failures = 0;
                self.retry_timeout = self.cfg.retry_timeout;
                self.probe_deadline = None;
                self.seen_unreachable = false;
                self.persist(now);
            }
        }
    }

    /// A send (or the probe) failed: connection error, retriable status, ack timeout.
    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.cfg.failure_threshold {
                    self.retry_timeout = self.cfg.retry_timeout;
                    self.open(now);
                    warn!(
                        failures = self.consecutive_failures,
                        "breaker opened after consecutive failures"
                    );
                }
            }
            BreakerState::Open => {}
            BreakerState::HalfOpen => {
                warn!("breaker probe failed");
                self.reopen(now);
            }
        }
    }

    /// Half-open → open with the next, longer, period.
    fn reopen(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.retry_timeout = self
            .retry_timeout
            .saturating_mul(2)
            .min(self.cfg.max_retry_timeout);
        self.open(now);
    }

    fn open(&mut self, now: Instant) {
        let nominal = self.retry_timeout.as_secs_f64();
        let wait = nominal * (1.0 - JITTER * self.rng.random_range(0.0..=1.0));
        self.state = BreakerState::Open;
        self.open_until = now + Duration::from_secs_f64(wait);
        self.probe_deadline = None;
        info!(
            wait_ms = (wait * 1000.0) as u64,
            retry_timeout_ms = self.retry_timeout.as_millis() as u64,
            "breaker open"
        );
        self.persist(now);
    }

    fn persist(&self, now: Instant) {
        let Some(path) = &self.path else { return };
        let open_until_unix_ms = if self.state == BreakerState::Closed {
            0
        } else {
            let remaining = self.open_until.saturating_duration_since(now);
            (SystemTime::now() + remaining)
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let p = Persisted {
            state: self.state,
            consecutive_failures: self.consecutive_failures,
            retry_timeout_ms: self.retry_timeout.as_millis() as u64,
            open_until_unix_ms,
        };
        let mut text = serde_json::to_vec(&p).expect("breaker state serializes");
        text.push(b'\n');
        if let Err(e) = crate::pipeline::spool::write_atomic_durable(path, &text) {
            warn!(path = %path.display(), error = %e, "cannot persist breaker state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            retry_timeout: Duration::from_secs(1),
            max_retry_timeout: Duration::from_secs(8),
            probe_timeout: Duration::from_secs(5),
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Opens a fresh breaker at `t0` with `failure_threshold` failures.
    fn opened(b: &mut CircuitBreaker, t0: Instant) {
        for _ in 0..cfg().failure_threshold {
            assert_eq!(b.allow(t0), Permit::Send);
            b.on_failure(t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    fn open_wait(b: &CircuitBreaker, since: Instant) -> Duration {
        b.next_attempt_at().unwrap() - since
    }

    #[test]
    fn closed_until_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(1);
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success(t0); // resets the streak
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.allow(t0), Permit::Send);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        let wait = open_wait(&b, t0);
        assert!(wait >= secs(0.8) && wait <= secs(1.0), "{wait:?}");
        assert_eq!(b.allow(t0), Permit::Reject { until: t0 + wait });
    }

    #[test]
    fn half_open_allows_exactly_one_probe_and_success_closes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(2);
        opened(&mut b, t0);
        let t1 = b.next_attempt_at().unwrap();
        assert!(matches!(b.allow(t1 - secs(0.001)), Permit::Reject { .. }));
        assert_eq!(b.allow(t1), Permit::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(
            b.allow(t1),
            Permit::Reject {
                until: t1 + secs(5.0)
            }
        );
        assert_eq!(b.next_attempt_at(), Some(t1 + secs(5.0)));
        b.on_success(t1 + secs(0.1));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.next_attempt_at(), None);
        assert_eq!(b.allow(t1 + secs(0.1)), Permit::Send);
    }

    #[test]
    fn failed_probe_reopens_with_a_longer_wait_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(3);
        opened(&mut b, t0);
        let mut prev = open_wait(&b, t0);
        for nominal in [2.0, 4.0, 8.0, 8.0, 8.0] {
            let now = b.next_attempt_at().unwrap();
            assert_eq!(b.allow(now), Permit::Probe);
            b.on_failure(now);
            assert_eq!(b.state(), BreakerState::Open);
            let wait = open_wait(&b, now);
            assert!(
                wait >= secs(nominal * 0.8) && wait <= secs(nominal),
                "nominal {nominal}: {wait:?}"
            );
            if nominal < 8.0 {
                assert!(wait > prev, "{wait:?} not longer than {prev:?}");
            }
            assert_eq!(b.retry_timeout(), secs(nominal));
            prev = wait;
        }
        // After the first success the period starts again from retry_timeout.
        let now = b.next_attempt_at().unwrap();
        assert_eq!(b.allow(now), Permit::Probe);
        b.on_success(now);
        assert_eq!(b.retry_timeout(), secs(1.0));
        opened(&mut b, now);
        assert!(open_wait(&b, now) <= secs(1.0));
    }

    #[test]
    fn hung_probe_times_out_and_reopens_longer() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(4);
        opened(&mut b, t0);
        let t1 = b.next_attempt_at().unwrap();
        assert_eq!(b.allow(t1), Permit::Probe);
        // No report. Just before the deadline the probe is still out.
        assert!(matches!(b.allow(t1 + secs(4.999)), Permit::Reject { .. }));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // At the deadline the probe has failed, and the wait grew.
        let t2 = t1 + secs(5.0);
        b.tick(t2);
        assert_eq!(b.state(), BreakerState::Open);
        let wait = open_wait(&b, t2);
        assert!(wait >= secs(1.6) && wait <= secs(2.0), "{wait:?}");
        // The hung probe reporting late is ignored while open.
        b.on_success(t2 + secs(0.5));
        assert_eq!(b.state(), BreakerState::Open);
        // allow() applies the timeout by itself too.
        let t3 = b.next_attempt_at().unwrap();
        assert_eq!(b.allow(t3), Permit::Probe);
        assert!(matches!(b.allow(t3 + secs(5.0)), Permit::Reject { .. }));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_timeout(), secs(4.0));
    }

    /// The listener went away (the transport's dials and checks found nobody) and answers a
    /// check again: the open period, grown to its cap, ends at once and the next `allow` hands
    /// out the probe batch; before, the agent waited out the rest of it.
    #[test]
    fn a_listener_seen_unreachable_that_answers_again_ends_the_open_period_at_once() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(7);
        b.on_reachability(false, t0);
        opened(&mut b, t0);
        // Probe batches fail at connect until the period has grown to the cap (8 s).
        for _ in 0..4 {
            let now = b.next_attempt_at().unwrap();
            assert_eq!(b.allow(now), Permit::Probe);
            b.on_reachability(false, now);
            b.on_failure(now);
        }
        assert_eq!(b.retry_timeout(), secs(8.0));
        // Checks once a second keep finding nobody: still open.
        let mut now = b.next_attempt_at().unwrap() - secs(6.0);
        for _ in 0..3 {
            b.on_reachability(false, now);
            assert!(matches!(b.allow(now), Permit::Reject { .. }));
            now += secs(1.0);
        }
        // The listener is back: a check answers, and the probe batch goes now, not in ~3 s.
        b.on_reachability(true, now);
        assert_eq!(b.next_attempt_at(), Some(now));
        assert_eq!(b.allow(now), Permit::Probe);
        b.on_success(now + secs(0.01));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.retry_timeout(), secs(1.0));
    }

    /// A listener that answers every check but fails the batches gets no shortcut: the probe
    /// batches are still paced by the doubling open period.
    #[test]
    fn a_reachable_listener_that_fails_batches_still_backs_off() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(8);
        opened(&mut b, t0);
        let mut probes = Vec::new();
        let mut now = t0;
        let end = t0 + secs(30.0);
        while now < end {
            b.on_reachability(true, now);
            if b.allow(now) == Permit::Probe {
                probes.push(now);
                b.on_failure(now);
            }
            now += secs(0.25);
        }
        // Nominal periods 1, 2, 4, 8, 8, ... (less up to 20 % jitter): at most 6 probes in
        // 30 s, each gap longer than the one before until the cap.
        assert!(probes.len() <= 6 && probes.len() >= 3, "{probes:?}");
        let gaps: Vec<Duration> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= secs(1.6) && gaps[1] >= secs(3.2), "{gaps:?}");
        assert_eq!(b.retry_timeout(), secs(8.0));
    }

    /// A listener that flaps between unreachable and reachable gets one early half-open per
    /// return, not one per answered check.
    #[test]
    fn each_return_of_the_listener_ends_one_open_period_only() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(9);
        b.on_reachability(false, t0);
        opened(&mut b, t0);
        let t1 = t0 + secs(0.5);
        b.on_reachability(true, t1);
        assert_eq!(b.allow(t1), Permit::Probe);
        // The probe batch fails although the listener answers checks: the wait grows and
        // further answers do not cut it short.
        b.on_failure(t1);
        let until = b.next_attempt_at().unwrap();
        assert!(until - t1 >= secs(1.6), "{:?}", until - t1);
        b.on_reachability(true, t1 + secs(1.0));
        assert_eq!(b.next_attempt_at(), Some(until));
        assert!(matches!(b.allow(t1 + secs(1.0)), Permit::Reject { .. }));
    }

    #[test]
    fn reports_while_open_are_ignored() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg(), t0).with_seed(5);
        opened(&mut b, t0);
        let until = b.next_attempt_at();
        b.on_failure(t0 + secs(0.1));
        b.on_success(t0 + secs(0.2));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.next_attempt_at(), until);
    }

    #[test]
    fn jitter_spreads_open_periods() {
        let t0 = Instant::now();
        let waits: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut b = CircuitBreaker::new(cfg(), t0).with_seed(seed);
                opened(&mut b, t0);
                open_wait(&b, t0)
            })
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn open_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let t0 = Instant::now();
        let mut b = CircuitBreaker::load(cfg(), &path, t0).with_seed(6);
        opened(&mut b, t0);
        let t1 = b.next_attempt_at().unwrap();
        assert_eq!(b.allow(t1), Permit::Probe);
        b.on_failure(t1); // nominal 2 s
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["state"], "open");
        assert_eq!(json["retry_timeout_ms"], 2000);
        assert_eq!(json["consecutive_failures"], 4);
        drop(b);

        // Restart right away: still open, still waiting about the same time.
        let r0 = Instant::now();
        let r = CircuitBreaker::load(cfg(), &path, r0);
        assert_eq!(r.state(), BreakerState::Open);
        assert_eq!(r.retry_timeout(), secs(2.0));
        let wait = open_wait(&r, r0);
        assert!(wait > secs(1.0) && wait <= secs(2.0), "{wait:?}");

        // Restart after the open period (wall clock moved on): probes at once, just once.
        let later = SystemTime::now() + secs(3.0);
        let mut r = CircuitBreaker::load_at(cfg(), &path, r0, later);
        assert_eq!(r.state(), BreakerState::Open);
        assert_eq!(r.allow(r0), Permit::Probe);
        assert!(matches!(r.allow(r0), Permit::Reject { .. }));
        r.on_success(r0);
        assert_eq!(r.state(), BreakerState::Closed);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["state"], "closed");
        let r = CircuitBreaker::load(cfg(), &path, r0);
        assert_eq!(r.state(), BreakerState::Closed);
    }

    /// A breaker restored open after a restart has seen the listener fail: the transport's
    /// first check finding it up ends the stored wait at once.
    #[test]
    fn a_breaker_restored_open_half_opens_when_the_first_check_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let t0 = Instant::now();
        let mut b = CircuitBreaker::load(cfg(), &path, t0).with_seed(10);
        opened(&mut b, t0);
        drop(b);
        let r0 = Instant::now();
        let mut r = CircuitBreaker::load(cfg(), &path, r0);
        assert!(matches!(r.allow(r0), Permit::Reject { .. }));
        r.on_reachability(true, r0);
        assert_eq!(r.allow(r0), Permit::Probe);
    }

    #[test]
    fn clock_jumping_back_does_not_extend_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let t0 = Instant::now();
        let mut b = CircuitBreaker::load(cfg(), &path, t0);
        opened(&mut b, t0);
        let earlier = SystemTime::now() - secs(3600.0);
        let r = CircuitBreaker::load_at(cfg(), &path, t0, earlier);
        assert!(open_wait(&r, t0) <= secs(1.0));
    }

    #[test]
    fn corrupt_or_missing_state_starts_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let t0 = Instant::now();
        assert_eq!(
            CircuitBreaker::load(cfg(), &path, t0).state(),
            BreakerState::Closed
        );
        for junk in [
            &b"{\"state\":\"open\""[..],
            b"",
            b"\xff\xfe",
            b"{\"state\":\"ajar\"}",
        ] {
            std::fs::write(&path, junk).unwrap();
            let mut b = CircuitBreaker::load(cfg(), &path, t0);
            assert_eq!(b.state(), BreakerState::Closed);
            assert_eq!(b.allow(t0), Permit::Send);
        }
    }

    #[test]
    fn state_names_match_status_json() {
        assert_eq!(
            serde_json::to_string(&BreakerState::HalfOpen).unwrap(),
            "\"half_open\""
        );
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        assert_eq!(BreakerState::Open.gauge(), 1);
    }
}
