//! Internal events: each loss or reject is one value whose `emit` does everything an operator
//! needs in one place: it counts (status `dropped`/`rejected`, `/metrics`) and logs, at most one
//! line per reason every [`LOG_EVERY`], saying how many were not logged in between. A call
//! site never counts without logging or logs without counting (Vector's `internal_events`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::telemetry::{
    ConnRefusal, ConnRefusalLabels, DropReason, RejectReason, Server, ServerLabels, Telemetry,
};

/// One log line per reason at most this often; the counters see every event.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Profiles that will not reach the central listener.
#[derive(Debug, Clone, Copy)]
pub struct ProfilesDropped<'a> {
    pub reason: DropReason,
    pub profiles: u64,
    /// What happened, for the log line ("disk full: oldest spool segment dropped").
    pub what: &'a str,
    /// The batch concerned, when there is one.
    pub seq: Option<u64>,
}

impl ProfilesDropped<'_> {
    pub fn emit(self, t: &Telemetry) {
        if self.profiles == 0 {
            return;
        }
        t.drop_profiles(self.reason, self.profiles);
        let slot = &DROP_LOG[DropReason::ALL
            .iter()
            .position(|r| *r == self.reason)
            .unwrap_or(0)];
        if let Some(unlogged) = slot.admit() {
            tracing::error!(
                reason = self.reason.as_str(),
                profiles = self.profiles,
                seq = self.seq,
                not_logged_since = unlogged,
                total = t.dropped_of(self.reason),
                "{}",
                self.what
            );
        }
    }
}

/// A payload refused at ingest (not JSON, too large, torn ...).
#[derive(Debug, Clone, Copy)]
pub struct ProfileRejected {
    pub reason: RejectReason,
    /// The sender, when the socket told us.
    pub pid: Option<u32>,
}

impl ProfileRejected {
    pub fn emit(self, t: &Telemetry) {
        t.reject(self.reason);
        let slot = &REJECT_LOG[RejectReason::ALL
            .iter()
            .position(|r| *r == self.reason)
            .unwrap_or(0)];
        if let Some(unlogged) = slot.admit() {
            tracing::warn!(
                reason = self.reason.as_str(),
                pid = self.pid,
                not_logged_since = unlogged,
                total = t.rejected_of(self.reason),
                "profile rejected at ingest"
            );
        }
    }
}

/// A client connection the agent closed or refused (see [`ConnRefusal`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRefused {
    pub reason: ConnRefusal,
    /// The peer, when the socket told us (Unix sockets).
    pub pid: Option<u32>,
    pub uid: Option<u32>,
}

impl ConnectionRefused {
    pub fn emit(self, t: &Telemetry) {
        t.connections_refused
            .get_or_create(&ConnRefusalLabels {
                reason: self.reason,
            })
            .inc();
        let slot = &REFUSAL_LOG[ConnRefusal::ALL
            .iter()
            .position(|r| *r == self.reason)
            .unwrap_or(0)];
        if let Some(unlogged) = slot.admit() {
            tracing::warn!(
                reason = self.reason.as_str(),
                pid = self.pid,
                uid = self.uid,
                not_logged_since = unlogged,
                total = t.connections_refused_of(self.reason),
                "client connection closed by the agent"
            );
        }
    }
}

/// An `accept(2)` that failed. The caller pauses [`ACCEPT_BACKOFF`] and tries again: no
/// error ends an accept loop, since EMFILE and friends pass once descriptors are freed.
#[derive(Debug)]
pub struct AcceptFailed<'a> {
    pub server: Server,
    pub error: &'a std::io::Error,
}

/// The pause after a failed accept: long enough not to spin on EMFILE, short enough that a
/// freed descriptor is used quickly.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl AcceptFailed<'_> {
    pub fn emit(self, t: &Telemetry) {
        t.accept_errors
            .get_or_create(&ServerLabels {
                server: self.server,
            })
            .inc();
        let slot = &ACCEPT_LOG[Server::ALL
            .iter()
            .position(|s| *s == self.server)
            .unwrap_or(0)];
        if let Some(unlogged) = slot.admit() {
            tracing::error!(
                server = self.server.as_str(),
                error = %self.error,
                not_logged_since = unlogged,
                total = t.accept_errors_of(self.server),
                "accept failed (out of descriptors or memory?): retrying every {ACCEPT_BACKOFF:?}"
            );
        }
    }

    /// Counts, logs (rate-limited) and pauses before the next accept.
    pub async fn back_off(self, t: &Telemetry) {
        self.emit(t);
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// The rate limit of one reason's log line: the time of its last line and how many events
/// went unlogged since.
struct LogSlot {
    last_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl LogSlot {
    const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(events not logged since the last line)` when this event may log.
    fn admit(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let every = LOG_EVERY.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < every {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One thread wins the slot; the others count as unlogged.
        if self
            .last_ms
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

fn now_ms() -> u64 {
    // A monotonic clock: wall-clock steps must not silence or flood the log.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

static DROP_LOG: [LogSlot; DropReason::ALL.len()] =
    [const { LogSlot::new() }; DropReason::ALL.len()];
static REJECT_LOG: [LogSlot; RejectReason::ALL.len()] =
    [const { LogSlot::new() }; RejectReason::ALL.len()];
static REFUSAL_LOG: [LogSlot; ConnRefusal::ALL.len()] =
    [const { LogSlot::new() }; ConnRefusal::ALL.len()];
static ACCEPT_LOG: [LogSlot; Server::ALL.len()] = [const { LogSlot::new() }; Server::ALL.len()];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_event_and_logs_the_first_of_a_burst() {
        let slot = LogSlot::new();
        assert_eq!(slot.admit(), Some(0), "the first event logs");
        for _ in 0..5 {
            assert_eq!(slot.admit(), None, "a burst within LOG_EVERY does not");
        }
        // As if LOG_EVERY had passed: the next line says how many went unlogged.
        slot.last_ms.store(
            now_ms() - LOG_EVERY.as_millis() as u64 - 1,
            Ordering::Relaxed,
        );
        assert_eq!(slot.admit(), Some(5));
    }

    #[test]
    fn a_drop_is_counted_under_its_reason() {
        let t = Telemetry::new();
        for n in [3, 4] {
            ProfilesDropped {
                reason: DropReason::SpoolFull,
                profiles: n,
                what: "test",
                seq: None,
            }
            .emit(&t);
        }
        assert_eq!(t.dropped_of(DropReason::SpoolFull), 7);
        assert_eq!(t.dropped_total(), 7);
        ProfileRejected {
            reason: RejectReason::Empty,
            pid: None,
        }
        .emit(&t);
        assert_eq!(t.rejected_of(RejectReason::Empty), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_connections_and_accept_errors_are_counted() {
        let t = Telemetry::new();
        for _ in 0..2 {
            ConnectionRefused {
                reason: ConnRefusal::FrameTimeout,
                pid: Some(1),
                uid: Some(65534),
            }
            .emit(&t);
        }
        assert_eq!(t.connections_refused_of(ConnRefusal::FrameTimeout), 2);
        assert_eq!(t.connections_refused_of(ConnRefusal::PerUidLimit), 0);
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        let before = tokio::time::Instant::now();
        AcceptFailed {
            server: Server::Control,
            error: &error,
        }
        .back_off(&t)
        .await;
        assert_eq!(before.elapsed(), ACCEPT_BACKOFF, "a pause, not a spin");
        assert_eq!(t.accept_errors_of(Server::Control), 1);
        assert_eq!(t.accept_errors_of(Server::Metrics), 0);
    }
}
