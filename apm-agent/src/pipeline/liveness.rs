//! Pipeline liveness for systemd's watchdog. Each stage beats from inside its own loop (a tick
//! arm next to its real work), so a stage that is stuck — blocked in a call, dead-locked,
//! panicked — stops beating, the agent stops pinging `WATCHDOG=1`, and systemd restarts it. An
//! idle pipeline still beats: idle is healthy, stuck is not.
//!
//! A stage that cannot do its work but can wait for it to become possible (its state volume is
//! full) reports a failure here: status shows it under `stage_failures`, the watchdog is
//! withheld while it lasts, and the stage clears it once it works again.

use std::collections::BTreeMap;
use std::sync::Mutex;
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
    failures: Mutex<BTreeMap<&'static str, String>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            beats: Default::default(),
            failures: Mutex::default(),
        }
    }
}

fn name(s: Stage) -> &'static str {
    STAGES[s as usize].1
}

impl Liveness {
    pub fn beat(&self, s: Stage) {
        self.beats[s as usize].store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `s` cannot do its work now, for `why`; it keeps trying.
    pub fn fail(&self, s: Stage, why: String) {
        self.lock().insert(name(s), why);
    }

    /// `s` works again.
    pub fn recover(&self, s: Stage) {
        self.lock().remove(name(s));
    }

    /// The failing stages and why (empty when all work).
    pub fn failures(&self) -> BTreeMap<String, String> {
        self.lock()
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stages whose last beat is older than `max_age`, or that report a failure.
    pub fn stale(&self, max_age: Duration) -> Vec<&'static str> {
        let now = self.origin.elapsed().as_millis() as u64;
        STAGES
            .iter()
            .filter(|(s, _)| {
                now.saturating_sub(self.beats[*s as usize].load(Ordering::Relaxed))
                    > max_age.as_millis() as u64
                    || self.lock().contains_key(name(*s))
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

    #[test]
    fn a_failing_stage_is_reported_until_it_recovers() {
        let l = Liveness::default();
        l.fail(Stage::Batch, "disk full".into());
        assert_eq!(
            l.failures().get("batch").map(String::as_str),
            Some("disk full")
        );
        l.beat(Stage::Batch);
        assert!(l.stale(Duration::from_mins(1)).contains(&"batch"));
        l.recover(Stage::Batch);
        assert!(l.failures().is_empty());
    }
}
