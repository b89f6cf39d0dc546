//! The agent's counters: one set of atomics that `/metrics` (Prometheus text) and
//! `status --json` both read, so the two never disagree. Every stage gets an `Arc<Telemetry>`
//! and counts through it; a drop or a rejection is counted with its reason in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why an input was refused at ingest. Rejected input is never forwarded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// Not valid UTF-8.
    InvalidUtf8,
    /// Not valid JSON.
    InvalidJson,
    /// Valid JSON but not an object.
    NotObject,
    /// Larger than `ingest.max_payload_bytes` (datagram truncated or frame length too big).
    Oversize,
    /// Zero-length datagram or frame.
    Empty,
    /// A stream connection ended in the middle of a frame.
    TornFrame,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        Self::InvalidUtf8,
        Self::InvalidJson,
        Self::NotObject,
        Self::Oversize,
        Self::Empty,
        Self::TornFrame,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::NotObject => "not_object",
            Self::Oversize => "oversize",
            Self::Empty => "empty",
            Self::TornFrame => "torn_frame",
        }
    }
}

/// Why a received, valid profile did not reach the central listener.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// The spool was full; `spool.on_full` chose this profile.
    SpoolFull,
    /// The spool could not write (I/O error, disk full) and memory was full too.
    SpoolError,
    /// The central listener answered REJECTED for its batch.
    RejectedByCentral,
    /// The memory guard shed it (memory over `limits.max_memory_mb`, nowhere to spill).
    MemoryLimit,
    /// Still in memory when the shutdown timeout ran out and the spool could not take it.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        Self::SpoolFull,
        Self::SpoolError,
        Self::RejectedByCentral,
        Self::MemoryLimit,
        Self::Shutdown,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpoolFull => "spool_full",
            Self::SpoolError => "spool_error",
            Self::RejectedByCentral => "rejected_by_central",
            Self::MemoryLimit => "memory_limit",
            Self::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: RejectReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Socket {
    Dgram,
    Stream,
}

impl Socket {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dgram => "dgram",
            Self::Stream => "stream",
        }
    }
}

/// Label values are the same snake_case names as in `status --json`.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )*};
}
label_value!(RejectReason, DropReason, Socket);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub socket: Socket,
}

/// Counters and gauges of the whole agent. Cheap to clone handles (each metric is an `Arc`).
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Valid profiles accepted at ingest (both sockets).
    pub received: Family<SocketLabels, Counter>,
    pub received_bytes: Counter,
    pub rejected: Family<RejectLabels, Counter>,
    /// Profiles the central listener acknowledged as stored.
    pub delivered: Counter,
    pub delivered_batches: Counter,
    pub dropped: Family<DropLabels, Counter>,
    /// Batches sent that failed (connection error, RETRY, ack timeout); each is retried.
    pub send_failures: Counter,
    pub reconnects: Counter,
    pub in_flight_batches: Gauge,
    /// Payload bytes held in memory between ingest and the listener's ack.
    pub memory_payload_bytes: Gauge,
    /// 1 while the router pushes back on ingest (memory window full, breaker closed, spool past
    /// `spool.high_water_pct`): the kernel queue fills and PHP's sends see EAGAIN.
    pub backpressure: Gauge,
    /// Times the router started pushing back.
    pub backpressure_episodes: Counter,
    pub stream_connections: Gauge,
    pub spooled_batches: Gauge,
    pub spool_bytes: Gauge,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Gauge,
    pub agent_rss_bytes: Gauge,
    /// Effective kernel queue length of the datagram socket.
    pub dgram_queue_len: Gauge,
    /// Last acknowledged batch seq (monotonic per agent).
    pub last_acked_seq: Gauge,
    started: AtomicU64,
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        let t = Self::default();
        t.started.store(now_ns(), Ordering::Relaxed);
        Arc::new(t)
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    pub fn drop_profiles(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
        }
    }

    pub fn received_total(&self) -> u64 {
        [Socket::Dgram, Socket::Stream]
            .into_iter()
            .map(|socket| self.received.get_or_create(&SocketLabels { socket }).get())
            .sum()
    }

    pub fn rejected_of(&self, reason: RejectReason) -> u64 {
        self.rejected.get_or_create(&RejectLabels { reason }).get()
    }

    pub fn rejected_total(&self) -> u64 {
        RejectReason::ALL
            .into_iter()
            .map(|r| self.rejected_of(r))
            .sum()
    }

    pub fn dropped_of(&self, reason: DropReason) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL
            .into_iter()
            .map(|r| self.dropped_of(r))
            .sum()
    }

    pub fn uptime_s(&self) -> u64 {
        now_ns().saturating_sub(self.started.load(Ordering::Relaxed)) / 1_000_000_000
    }

    /// Registers every metric under the `apm_` prefix. Counters get `_total` from the client.
    pub fn register(&self, reg: &mut Registry) {
        let r = reg.sub_registry_with_prefix("apm");
        r.register(
            "received",
            "Valid profiles accepted at ingest",
            self.received.clone(),
        );
        r.register(
            "received_bytes",
            "Payload bytes of accepted profiles",
            self.received_bytes.clone(),
        );
        r.register(
            "rejected",
            "Inputs refused at ingest, by reason",
            self.rejected.clone(),
        );
        r.register(
            "delivered",
            "Profiles acknowledged by the central listener",
            self.delivered.clone(),
        );
        r.register(
            "delivered_batches",
            "Batches acknowledged by the central listener",
            self.delivered_batches.clone(),
        );
        r.register(
            "dropped",
            "Profiles lost after receipt, by reason",
            self.dropped.clone(),
        );
        r.register(
            "send_failures",
            "Batch sends that failed and were retried",
            self.send_failures.clone(),
        );
        r.register(
            "reconnects",
            "Connections made to the central listener",
            self.reconnects.clone(),
        );
        r.register(
            "in_flight_batches",
            "Batches sent and not yet acknowledged",
            self.in_flight_batches.clone(),
        );
        r.register(
            "memory_payload_bytes",
            "Payload bytes held in memory awaiting acknowledgement",
            self.memory_payload_bytes.clone(),
        );
        r.register(
            "backpressure",
            "1 while the agent pushes back on ingest (listener slower than traffic, spool past high water)",
            self.backpressure.clone(),
        );
        r.register(
            "backpressure_episodes",
            "Times the agent started pushing back on ingest",
            self.backpressure_episodes.clone(),
        );
        r.register(
            "stream_connections",
            "Open connections on the stream socket",
            self.stream_connections.clone(),
        );
        r.register(
            "spooled_batches",
            "Batches in the disk spool",
            self.spooled_batches.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes in the disk spool",
            self.spool_bytes.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open",
            self.breaker_state.clone(),
        );
        r.register(
            "agent_rss_bytes",
            "The agent's resident memory",
            self.agent_rss_bytes.clone(),
        );
        r.register(
            "dgram_queue_len",
            "Effective kernel queue length of the datagram socket",
            self.dgram_queue_len.clone(),
        );
        r.register(
            "last_acked_seq",
            "Highest batch seq acknowledged",
            self.last_acked_seq.clone(),
        );
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// This process's RSS in bytes, from /proc/self/statm.
pub fn self_rss_bytes() -> u64 {
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}
