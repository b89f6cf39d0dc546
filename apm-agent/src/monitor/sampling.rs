//! The adaptive sample-rate rule: a pure function of what the kernel saw in one poll interval.
//!
//! Multiplicative decrease, slow additive increase (AIMD), as TCP does for the same reason: back
//! off fast when the receiver is overwhelmed, probe upwards slowly so the system does not
//! oscillate.
//!
//! - **Pressure** in an interval: datagram sends that failed with EAGAIN or ENOBUFS (the queue
//!   was full: real drops) reach `drop_ratio_high` of the datagram sends; or, with at least
//!   `MIN_SAMPLES` sends, the p99 send latency reaches `latency_high`; or the mean time a stream
//!   send waited (EAGAIN until its retry succeeded, plus time blocked in the call) reaches
//!   `latency_high`. Then `rate = max(min_rate, rate * DECREASE)`.
//! - **Some drops below the ratio**: hold the rate, restart the calm count.
//! - **Calm** (no pressure, no drop; an idle interval is calm): after `RAISE_AFTER` calm
//!   intervals in a row, `rate = min(1, rate + RAISE_STEP)` and the count restarts. From the
//!   floor back to 1.0 takes about `RAISE_AFTER / RAISE_STEP` intervals (30 s at 1 s polls).

/// Rate multiplier under pressure.
pub const DECREASE: f64 = 0.5;
/// Calm intervals in a row before one raise step.
pub const RAISE_AFTER: u32 = 3;
/// Added per raise step.
pub const RAISE_STEP: f64 = 0.1;
/// Sends in an interval below which its latency percentile is noise and ignored.
pub const MIN_SAMPLES: u64 = 20;

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
    /// Sends (both sockets) and their p99 latency, from the histogram.
    pub sends: u64,
    pub p99_ns: u64,
    /// Stream sends that succeeded, and the time stream senders spent waiting.
    pub stream_ok: u64,
    pub stream_wait_ns: u64,
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
    Hold,
    Raise,
    Steady,
}

/// The next state after one interval. Pure: the caller writes the rate out.
pub fn next(p: &ControlParams, s: ControlState, iv: &Interval) -> (ControlState, Decision) {
    let min_rate = p.min_rate.clamp(0.0, 1.0);
    let rate = s.rate.clamp(min_rate, 1.0);
    let why = if iv.dgram_drops > 0
        && iv.dgram_drops as f64 >= p.drop_ratio_high * iv.dgram_sends.max(1) as f64
    {
        Some(Why::Drops)
    } else if iv.sends >= MIN_SAMPLES && iv.p99_ns >= p.latency_high_ns {
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
    if iv.dgram_drops > 0 {
        return (ControlState { rate, calm: 0 }, Decision::Hold);
    }
    let calm = s.calm.saturating_add(1);
    if rate < 1.0 && calm >= RAISE_AFTER {
        let r = (rate + RAISE_STEP).min(1.0);
        return (ControlState { rate: r, calm: 0 }, Decision::Raise);
    }
    (ControlState { rate, calm }, Decision::Steady)
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
    fn few_drops_hold_and_reset_the_calm_count() {
        let iv = Interval {
            dgram_sends: 1000,
            dgram_drops: 1,
            sends: 1000,
            ..Default::default()
        };
        let (s, d) = next(&P, ControlState { rate: 0.5, calm: 2 }, &iv);
        assert_eq!(d, Decision::Hold);
        assert_eq!(s, ControlState { rate: 0.5, calm: 0 });
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
            p99_ns: 4096,
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
            sends: MIN_SAMPLES,
            dgram_sends: MIN_SAMPLES,
            p99_ns: 2_000_000,
            ..Default::default()
        };
        assert_eq!(next(&P, st(1.0), &slow).1, Decision::Lower(Why::Latency));
        let few = Interval {
            sends: MIN_SAMPLES - 1,
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

    #[test]
    fn out_of_range_state_is_clamped() {
        let (s, _) = next(&P, st(7.0), &Interval::default());
        assert!(s.rate <= 1.0);
        let (s, _) = next(&P, st(0.0), &Interval::default());
        assert!(s.rate >= P.min_rate);
    }
}
