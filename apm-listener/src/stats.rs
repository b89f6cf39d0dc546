//! Counters of what the listener stored, logged periodically and at exit.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use tracing::info;

/// Updated by the writer and the streams; read by the stats line and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches_stored: AtomicU64,
    pub profiles_stored: AtomicU64,
    /// Stored as `profile_raw` because the payload was not valid JSON.
    pub invalid_profiles: AtomicU64,
    /// Acked OK without storing: `(agent_id, seq)` was stored before.
    pub duplicate_batches: AtomicU64,
    pub duplicate_profiles: AtomicU64,
    /// Answered RETRY (write failure, `--fail-first`).
    pub retried_batches: AtomicU64,
    /// Answered REJECTED (malformed batch).
    pub rejected_batches: AtomicU64,
    /// Group writes (one `writev`, and one fdatasync with `--fsync`, each).
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub write_errors: AtomicU64,
    pub streams: AtomicU64,
    pub unauthenticated: AtomicU64,
    /// Answered RETRY because the dedup state is at its bound (`--max-agents`,
    /// `--max-seq-ranges`); also counted in `retried_batches`.
    pub dedup_full_batches: AtomicU64,
    /// Answered REJECTED because the batch's agent id is not the one its token is bound to
    /// (`--tokens-file`); also counted in `rejected_batches`.
    pub wrong_agent_batches: AtomicU64,
    /// Connections closed at accept because `--max-connections` were open.
    pub refused_connections: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub batches_stored: u64,
    pub profiles_stored: u64,
    pub invalid_profiles: u64,
    pub duplicate_batches: u64,
    pub duplicate_profiles: u64,
    pub retried_batches: u64,
    pub rejected_batches: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub write_errors: u64,
    pub streams: u64,
    pub unauthenticated: u64,
    pub dedup_full_batches: u64,
    pub wrong_agent_batches: u64,
    pub refused_connections: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            batches_stored: self.batches_stored.load(Relaxed),
            profiles_stored: self.profiles_stored.load(Relaxed),
            invalid_profiles: self.invalid_profiles.load(Relaxed),
            duplicate_batches: self.duplicate_batches.load(Relaxed),
            duplicate_profiles: self.duplicate_profiles.load(Relaxed),
            retried_batches: self.retried_batches.load(Relaxed),
            rejected_batches: self.rejected_batches.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            streams: self.streams.load(Relaxed),
            unauthenticated: self.unauthenticated.load(Relaxed),
            dedup_full_batches: self.dedup_full_batches.load(Relaxed),
            wrong_agent_batches: self.wrong_agent_batches.load(Relaxed),
            refused_connections: self.refused_connections.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// Logs the totals, with the rate since `prev` over `secs` seconds.
    pub fn log(&self, what: &'static str, prev: &StatsSnapshot, secs: f64) {
        let rate = if secs > 0.0 {
            (self.profiles_stored - prev.profiles_stored) as f64 / secs
        } else {
            0.0
        };
        info!(
            profiles_stored_total = self.profiles_stored,
            batches_stored_total = self.batches_stored,
            duplicate_batches_total = self.duplicate_batches,
            duplicate_profiles_total = self.duplicate_profiles,
            invalid_profiles_total = self.invalid_profiles,
            retried_batches_total = self.retried_batches,
            rejected_batches_total = self.rejected_batches,
            write_errors_total = self.write_errors,
            writes_total = self.writes,
            bytes_written_total = self.bytes_written,
            streams_total = self.streams,
            unauthenticated_total = self.unauthenticated,
            dedup_full_batches_total = self.dedup_full_batches,
            wrong_agent_batches_total = self.wrong_agent_batches,
            refused_connections_total = self.refused_connections,
            profiles_per_s = rate.round() as u64,
            "{what}"
        );
    }
}
