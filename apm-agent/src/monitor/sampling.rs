//! The adaptive sample-rate rule: a pure function of what the kernel saw in one poll interval,
//! and the [`Controller`] that combines it with the memory guard's ceiling into the one rate
//! written to `<runtime_dir>/sample-rate`.
//!
//! Multiplicative decrease, slow additive increase (AIMD), as TCP does for the same reason: back
//! off fast when the receiver is overwhelmed, probe upwards slowly so the system does not
//! oscillate.
//!
//! - **Pressure** in an interval: datagram sends that failed with EAGAIN or ENOBUFS (the queue
//!   was full: real drops), plus stream connects that failed with EAGAIN (the listen backlog
//!   was full) and stream frames abandoned mid-way, reach `drop_ratio_high` of the datagram and
//!   stream sends; or, with at least
//!   [`MIN_LATENCY_SENDS`] sends, the p99 send latency is wholly at or over `latency_high` (the
//!   *lower* bound of the histogram bucket holding the p99 reaches it, see
//!   [`Interval::p99_floor_ns`]); or the mean time a stream send waited (EAGAIN until its retry
//!   succeeded, plus time blocked in the call) reaches `latency_high`. Then
//!   `rate = max(min_rate, rate * DECREASE)`.
//! - **Calm** (no pressure: drops below `drop_ratio_high` are calm too, an idle interval is
//!   calm): after `RAISE_AFTER` calm intervals in a row, `rate = min(1, rate + RAISE_STEP)` and
//!   the count restarts. From the floor back to 1.0 takes about `RAISE_AFTER / RAISE_STEP`
//!   intervals (30 s at 1 s polls). The hysteresis is the gap between one halving and ten slow
//!   steps back, not a second drop threshold: a steady trickle of drops under the ratio must not
//!   pin the rate low for ever.

use std::time::{Duration, Instant};

/// Rate multiplier under pressure.
pub const DECREASE: f64 = 0.5;
/// Calm intervals in a row before one raise step.
pub const RAISE_AFTER: u32 = 3;
/// Added per raise step.
pub const RAISE_STEP: f64 = 0.1;
/// Sends in an interval below which its p99 latency is ignored. The p99 of n sends is the
/// `ceil(0.99 n)`-th: under 100 sends it is the slowest one, and one slow send among 77 (a
/// page cache miss, a preempted worker) halved the rate. With 200 it takes three slow sends.
pub const MIN_LATENCY_SENDS: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlParams {
    pub min_rate: f64,
    pub drop_ratio_high: f64,
    pub latency_high_ns: u64,
}

/// What the kernel saw during one poll interval (deltas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interval {
    /// Datagram sends completed (ok + failed).
    pub dgram_sends: u64,
    /// Datagram sends failed with EAGAIN or ENOBUFS.
    pub dgram_drops: u64,
    /// Sends (both sockets).
    pub sends: u64,
    /// Lower bound of the log2 histogram bucket that holds the p99 send latency
    /// ([`super::percentile_floor_ns`]). Every latency in that bucket is at least this, so
    /// comparing it with the threshold never calls a p99 under the threshold "over" (the
    /// bucket's upper bound would: 600 µs is in `[524 µs, 1.05 ms)`). The price: the effective
    /// threshold is `latency_high` rounded up to a power of two of nanoseconds (1 ms trips from
    /// 1.05 ms, 5 ms from 8.4 ms).
    pub p99_floor_ns: u64,
    /// Stream sends that succeeded, and the time stream senders spent waiting.
    pub stream_ok: u64,
    pub stream_wait_ns: u64,
    /// Stream sends and connects completed (ok + failed).
    pub stream_sends: u64,
    /// Stream connects that failed with EAGAIN plus frames abandoned mid-way.
    pub stream_drops: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlState {
    pub rate: f64,
    /// Calm intervals in a row.
    pub calm: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Drops,
    Latency,
    StreamWait,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drops => "drops",
            Self::Latency => "latency",
            Self::StreamWait => "stream_wait",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Lower(Why),
    Raise,
    Steady,
}

/// The next state after one interval. Pure: the caller writes the rate out.
pub fn next(p: &ControlParams, s: ControlState, iv: &Interval) -> (ControlState, Decision) {
    let min_rate = p.min_rate.clamp(0.0, 1.0);
    let rate = s.rate.clamp(min_rate, 1.0);
    let drops = iv.dgram_drops + iv.stream_drops;
    let offered = iv.dgram_sends + iv.stream_sends;
    let why = if drops > 0 && drops as f64 >= p.drop_ratio_high * offered.max(1) as f64 {
        Some(Why::Drops)
    } else if iv.sends >= MIN_LATENCY_SENDS && iv.p99_floor_ns >= p.latency_high_ns {
        Some(Why::Latency)
    } else if iv.stream_ok > 0 && iv.stream_wait_ns / iv.stream_ok >= p.latency_high_ns {
        Some(Why::StreamWait)
    } else {
        None
    };
    if let Some(why) = why {
        let r = (rate * DECREASE).max(min_rate);
        return (ControlState { rate: r, calm: 0 }, Decision::Lower(why));
    }
    let calm = s.calm.saturating_add(1);
    if rate < 1.0 && calm >= RAISE_AFTER {
        let r = (rate + RAISE_STEP).min(1.0);
        return (ControlState { rate: r, calm: 0 }, Decision::Raise);
    }
    (ControlState { rate, calm }, Decision::Steady)
}

/// The one owner of the rate PHP reads. Two parties want a say: the eBPF rule above (through
/// [`Controller::interval`]) and the memory guard (through [`Controller::set_ceiling`]). The
/// rate written is `min(rule, ceiling)`; neither overwrites the other's wish, so a calm interval
/// cannot undo the guard's halving and the guard cannot undo a halving for drops.
///
/// Pure bookkeeping: [`crate::phpctl::PhpControl`] holds it under the same lock as the file it
/// writes, and reports a rate as written only once the file says so.
#[derive(Debug, Clone)]
pub struct Controller {
    rule: ControlState,
    ceiling: f64,
    /// What the file says (the last successful write).
    written: f64,
    below_since: Option<Instant>,
    below_total: Duration,
    unprofiled: f64,
}

impl Default for Controller {
    fn default() -> Self {
        Self {
            rule: ControlState { rate: 1.0, calm: 0 },
            ceiling: 1.0,
            written: 1.0,
            below_since: None,
            below_total: Duration::ZERO,
            unprofiled: 0.0,
        }
    }
}

impl Controller {
    /// The rate that should be in the file.
    pub fn wanted(&self) -> f64 {
        self.rule.rate.min(self.ceiling).clamp(0.0, 1.0)
    }

    /// The rate in the file.
    pub fn written(&self) -> f64 {
        self.written
    }

    pub fn ceiling(&self) -> f64 {
        self.ceiling
    }

    /// One poll interval: counts what it did not profile (at the rate that was in the file
    /// during it), then, when `adaptive`, applies the rule.
    pub fn interval(
        &mut self,
        p: &ControlParams,
        iv: &Interval,
        adaptive: bool,
    ) -> Option<Decision> {
        self.unprofiled += unprofiled(iv.sends, self.written);
        if !adaptive {
            return None;
        }
        let (s, d) = next(p, self.rule, iv);
        self.rule = s;
        Some(d)
    }

    /// Back to the defaults (rule at 1.0, no ceiling); the counters keep counting.
    pub fn reset(&mut self) {
        self.rule = ControlState { rate: 1.0, calm: 0 };
        self.ceiling = 1.0;
    }

    /// The memory guard's ceiling (1.0: none). Clamped to 0.0..=1.0; NaN means none.
    pub fn set_ceiling(&mut self, ceiling: f64) {
        self.ceiling = if ceiling.is_nan() {
            1.0
        } else {
            ceiling.clamp(0.0, 1.0)
        };
    }

    /// Records that the file now says `rate`.
    pub fn wrote(&mut self, rate: f64, now: Instant) {
        self.written = rate;
        match (rate < 1.0, self.below_since) {
            (true, None) => self.below_since = Some(now),
            (false, Some(t)) => {
                self.below_total += now.saturating_duration_since(t);
                self.below_since = None;
            }
            _ => {}
        }
    }

    /// How long the file has said less than 1.0, in all (a counter).
    pub fn below_one(&self, now: Instant) -> Duration {
        self.below_total
            + self
                .below_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Estimated requests PHP did not profile because of sampling (a counter, see
    /// [`unprofiled`]).
    pub fn unprofiled(&self) -> f64 {
        self.unprofiled
    }
}

/// Requests not profiled in an interval with `sends` sends at `rate`: each send stands for
/// `1 / rate` requests, of which one was profiled, so `sends * (1 / rate - 1)`. An estimate: it
/// assumes one send per profiled request (a stream frame taking several sends counts several),
/// and that the rate in the file during the interval is the one every request read. At rate 0
/// nothing is sent and nothing can be estimated (0 is added).
pub fn unprofiled(sends: u64, rate: f64) -> f64 {
    if rate <= 0.0 || rate >= 1.0 || !rate.is_finite() {
        return 0.0;
    }
    sends as f64 * (1.0 / rate - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ControlParams = ControlParams {
        min_rate: 0.05,
        drop_ratio_high: 0.01,
        latency_high_ns: 1_000_000,
    };

    fn st(rate: f64) -> ControlState {
        ControlState { rate, calm: 0 }
    }

    #[test]
    fn drops_over_the_ratio_halve_the_rate_down_to_the_floor() {
        let iv = Interval {
            dgram_sends: 1000,
            dgram_drops: 10,
            sends: 1000,
            ..Default::default()
        };
        let (s, d) = next(&P, st(1.0), &iv);
        assert_eq!(d, Decision::Lower(Why::Drops));
        assert_eq!(s.rate, 0.5);
        let mut s = s;
        for _ in 0..10 {
            s = next(&P, s, &iv).0;
        }
        assert_eq!(s.rate, 0.05, "never below min_rate");
    }

    #[test]
    fn few_drops_below_the_ratio_count_as_calm() {
        let iv = Interval {
            dgram_sends: 1000,
            dgram_drops: 1,
            sends: 1000,
            ..Default::default()
        };
        let (s, d) = next(&P, ControlState { rate: 0.5, calm: 2 }, &iv);
        assert_eq!(d, Decision::Raise);
        assert!((s.rate - 0.6).abs() < 1e-9);
    }

    #[test]
    fn stream_connect_eagain_and_abandoned_frames_are_drops_for_the_rule() {
        // Only stream traffic: 40 connects and sends, 2 of them lost (a full backlog, a frame
        // given up): 5% >= 1%, the rate halves.
        let iv = Interval {
            stream_sends: 40,
            stream_ok: 38,
            stream_drops: 2,
            sends: 40,
            ..Default::default()
        };
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Lower(Why::Drops));
        // Below the ratio of everything offered (datagrams too): calm.
        let iv = Interval {
            dgram_sends: 960,
            ..iv
        };
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Steady);
    }

    #[test]
    fn a_single_drop_with_no_other_sends_is_pressure() {
        let iv = Interval {
            dgram_sends: 1,
            dgram_drops: 1,
            sends: 1,
            ..Default::default()
        };
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Lower(Why::Drops));
    }

    #[test]
    fn calm_raises_gradually_and_stops_at_one() {
        let calm = Interval {
            dgram_sends: 500,
            sends: 500,
            p99_floor_ns: 4096,
            ..Default::default()
        };
        let mut s = st(0.05);
        let mut raises = 0;
        let mut intervals = 0;
        while s.rate < 1.0 {
            let (n, d) = next(&P, s, &calm);
            if d == Decision::Raise {
                raises += 1;
                assert!(n.rate - s.rate <= RAISE_STEP + 1e-9, "one step at a time");
            } else {
                assert_eq!(d, Decision::Steady);
                assert_eq!(n.rate, s.rate);
            }
            s = n;
            intervals += 1;
            assert!(intervals < 100);
        }
        assert_eq!(s.rate, 1.0);
        assert_eq!(raises, 10);
        assert_eq!(intervals, 30);
        let (n, d) = next(&P, s, &calm);
        assert_eq!((n.rate, d), (1.0, Decision::Steady));
    }

    #[test]
    fn idle_intervals_count_as_calm() {
        let mut s = st(0.5);
        for _ in 0..RAISE_AFTER {
            s = next(&P, s, &Interval::default()).0;
        }
        assert!((s.rate - 0.6).abs() < 1e-9);
    }

    #[test]
    fn latency_needs_enough_samples() {
        let slow = Interval {
            sends: MIN_LATENCY_SENDS,
            dgram_sends: MIN_LATENCY_SENDS,
            p99_floor_ns: 2_000_000,
            ..Default::default()
        };
        assert_eq!(next(&P, st(1.0), &slow).1, Decision::Lower(Why::Latency));
        let few = Interval {
            sends: MIN_LATENCY_SENDS - 1,
            ..slow
        };
        assert_eq!(next(&P, st(1.0), &few).1, Decision::Steady);
    }

    #[test]
    fn stream_waiting_is_pressure() {
        let iv = Interval {
            sends: 10,
            stream_ok: 10,
            stream_wait_ns: 10 * 1_500_000,
            ..Default::default()
        };
        assert_eq!(
            next(&P, st(0.8), &iv),
            (st(0.4), Decision::Lower(Why::StreamWait))
        );
    }

    /// An interval whose sends took these latencies (ns, count), no drops, as the poller
    /// builds it from the eBPF histogram.
    fn iv_lat(lat: &[(u64, u64)]) -> Interval {
        let mut hist = [0u64; apm_common::LAT_BUCKETS];
        for &(ns, n) in lat {
            hist[apm_common::lat_bucket(ns)] += n;
        }
        let sends = hist.iter().sum();
        Interval {
            dgram_sends: sends,
            sends,
            p99_floor_ns: super::super::percentile_floor_ns(&hist, 0.99),
            ..Default::default()
        }
    }

    #[test]
    fn a_p99_in_a_bucket_that_starts_below_the_threshold_is_not_pressure() {
        // 600 µs lies in [2^19, 2^20) ns = [524 µs, 1.05 ms): its upper bound is over 1 ms,
        // the latencies in it need not be.
        let iv = iv_lat(&[(600_000, 1000)]);
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Steady);
        // 1 ms itself is in the same bucket.
        let iv = iv_lat(&[(1_000_000, 1000)]);
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Steady);
    }

    #[test]
    fn a_p99_in_a_bucket_wholly_over_the_threshold_is_pressure() {
        let iv = iv_lat(&[(30_000, 980), (2_000_000, 20)]);
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Lower(Why::Latency));
    }

    #[test]
    fn one_slow_send_among_few_is_not_pressure() {
        // WordPress on PHP-FPM under `ab -c 4`: one 2 ms send among 77, no drop, halved the rate.
        let iv = iv_lat(&[(30_000, 76), (2_000_000, 1)]);
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Steady);
        // Still not with 150 sends and two slow ones.
        let iv = iv_lat(&[(30_000, 148), (2_000_000, 2)]);
        assert_eq!(next(&P, st(1.0), &iv).1, Decision::Steady);
    }

    #[test]
    fn a_trickle_of_drops_below_the_ratio_lets_the_rate_recover() {
        // 0.1% drops, under drop_ratio_high (1%), every interval: not pressure, so the rate
        // must climb back to 1.0 as from any calm interval.
        let iv = Interval {
            dgram_sends: 1000,
            dgram_drops: 1,
            sends: 1000,
            ..Default::default()
        };
        let mut s = st(0.05);
        for _ in 0..30 {
            s = next(&P, s, &iv).0;
        }
        assert!((s.rate - 1.0).abs() < 1e-9, "stuck at {}", s.rate);
    }

    /// A host that can take 600 sends per interval; PHP offers 1000 at rate 1.0, and one send
    /// per interval fails whatever the load (a trickle). Drops = the trickle + the overflow.
    fn overloaded(rate: f64) -> Interval {
        let offered = (1000.0 * rate).round() as u64;
        let drops = u64::from(offered > 0) + offered.saturating_sub(600);
        Interval {
            dgram_sends: offered,
            dgram_drops: drops,
            sends: offered,
            ..Default::default()
        }
    }

    #[test]
    fn under_sustained_overload_the_rate_saws_below_capacity_without_flapping() {
        let mut s = st(1.0);
        let (mut lowers, mut sum) = (0, 0.0);
        let mut last_lower: Option<usize> = None;
        for i in 0..300 {
            let (n, d) = next(&P, s, &overloaded(s.rate));
            if let Decision::Lower(_) = d {
                lowers += 1;
                if let Some(l) = last_lower {
                    assert!(
                        i - l > RAISE_AFTER as usize,
                        "lowered at {l} and again at {i}"
                    );
                }
                last_lower = Some(i);
            }
            sum += n.rate;
            s = n;
        }
        let mean = sum / 300.0;
        // The sawtooth between ~0.35 and 0.7 (capacity 0.6): neither pinned low nor flapping.
        assert!(mean > 0.4 && mean < 0.7, "mean rate {mean}");
        assert!(
            lowers > 5 && lowers < 40,
            "{lowers} lowerings in 300 intervals"
        );
    }

    #[test]
    fn out_of_range_state_is_clamped() {
        let (s, _) = next(&P, st(7.0), &Interval::default());
        assert!(s.rate <= 1.0);
        let (s, _) = next(&P, st(0.0), &Interval::default());
        assert!(s.rate >= P.min_rate);
    }

    #[test]
    fn the_memory_guard_ceiling_bounds_what_the_rule_wants_and_neither_undoes_the_other() {
        let mut c = Controller::default();
        let now = Instant::now();
        c.set_ceiling(0.25);
        assert_eq!(c.wanted(), 0.25);
        // Calm intervals raise nothing past the ceiling...
        for _ in 0..10 {
            c.interval(&P, &Interval::default(), true);
        }
        assert_eq!(c.wanted(), 0.25);
        // ...and pressure halves the rule's own rate (1.0 -> 0.5), still under the ceiling.
        let drops = Interval {
            dgram_sends: 100,
            dgram_drops: 50,
            sends: 100,
            ..Default::default()
        };
        c.interval(&P, &drops, true);
        assert_eq!(c.wanted(), 0.25);
        c.interval(&P, &drops, true);
        c.interval(&P, &drops, true);
        assert_eq!(c.wanted(), 0.125, "the rule went under the ceiling");
        // The guard lifting its ceiling does not undo the rule's halving.
        c.set_ceiling(1.0);
        assert_eq!(c.wanted(), 0.125);
        c.set_ceiling(f64::NAN);
        assert_eq!(c.ceiling(), 1.0);
        let _ = now;
    }

    #[test]
    fn time_below_one_and_the_unprofiled_estimate_accumulate() {
        let mut c = Controller::default();
        let t0 = Instant::now();
        // At 1.0 nothing is missed.
        c.interval(&P, &iv_lat(&[(30_000, 300)]), false);
        assert_eq!(c.unprofiled(), 0.0);
        c.wrote(0.25, t0);
        // 300 sends at 0.25 stand for 1200 requests: 900 not profiled.
        c.interval(&P, &iv_lat(&[(30_000, 300)]), false);
        assert!((c.unprofiled() - 900.0).abs() < 1e-9);
        assert_eq!(
            c.below_one(t0 + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        c.wrote(1.0, t0 + Duration::from_secs(5));
        c.interval(&P, &iv_lat(&[(30_000, 300)]), false);
        assert!((c.unprofiled() - 900.0).abs() < 1e-9);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(c.below_one(later), Duration::from_secs(5));
        c.wrote(0.5, later);
        assert_eq!(
            c.below_one(later + Duration::from_secs(2)),
            Duration::from_secs(7)
        );
        assert_eq!(unprofiled(10, 0.0), 0.0);
    }
}
