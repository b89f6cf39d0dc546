//! Pipeline liveness for systemd's watchdog. Each stage beats from inside its own loop (a tick
//! arm next to its real work), so a stage that is stuck — blocked in a call, dead-locked,
//! panicked — stops beating, the agent stops pinging `WATCHDOG=1`, and systemd restarts it. An
//! idle pipeline still beats: idle is healthy, stuck is not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingest = 0,
    Batch = 1,
    Router = 2,
}

const STAGES: [(Stage, &str); 3] = [
    (Stage::Ingest, "ingest"),
    (Stage::Batch, "batch"),
    (Stage::Router, "router"),
];

/// How often stages beat.
pub const BEAT: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    beats: [AtomicU64; 3],
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            beats: Default::default(),
        }
    }
}

impl Liveness {
    pub fn beat(&self, s: Stage) {
        self.beats[s as usize].store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Stages whose last beat is older than `max_age`.
    pub fn stale(&self, max_age: Duration) -> Vec<&'static str> {
        let now = self.origin.elapsed().as_millis() as u64;
        STAGES
            .iter()
            .filter(|(s, _)| {
                now.saturating_sub(self.beats[*s as usize].load(Ordering::Relaxed))
                    > max_age.as_millis() as u64
            })
            .map(|(_, n)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_stops_beating_is_stale() {
        let l = Liveness::default();
        for s in [Stage::Ingest, Stage::Batch, Stage::Router] {
            l.beat(s);
        }
        assert!(l.stale(Duration::from_millis(200)).is_empty());
        std::thread::sleep(Duration::from_millis(60));
        l.beat(Stage::Ingest);
        l.beat(Stage::Router);
        assert_eq!(l.stale(Duration::from_millis(30)), vec!["batch"]);
    }
}
