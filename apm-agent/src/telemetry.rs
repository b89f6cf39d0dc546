//! The agent's counters: one set of atomics that `/metrics` (Prometheus text) and
//! `status --json` both read, so the two never disagree. Every stage gets an `Arc<Telemetry>`
//! and counts through it; a drop or a rejection is counted with its reason in one place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::memguard::Action;
use crate::phpctl::{KillReason, PhpControl};

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
    /// In a spool record found corrupt or cut off (torn tail) when the spool was opened.
    SpoolCorrupt,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        Self::SpoolFull,
        Self::SpoolError,
        Self::RejectedByCentral,
        Self::MemoryLimit,
        Self::Shutdown,
        Self::SpoolCorrupt,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpoolFull => "spool_full",
            Self::SpoolError => "spool_error",
            Self::RejectedByCentral => "rejected_by_central",
            Self::MemoryLimit => "memory_limit",
            Self::Shutdown => "shutdown",
            Self::SpoolCorrupt => "spool_corrupt",
        }
    }
}

/// Why the agent closed or refused a client's connection (not the client's own EOF).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Stream socket: the peer's uid already held `ingest.max_stream_connections_per_uid`.
    PerUidLimit,
    /// Stream socket: a frame did not complete within `ingest.stream_frame_timeout` of its
    /// first byte.
    FrameTimeout,
    /// Stream socket: a frame waited `ingest.stream_frame_timeout` for room in the shared
    /// `ingest.stream_buffer_bytes` and got none.
    BufferBudget,
    /// `/metrics`: already serving its cap of connections.
    MetricsLimit,
}

impl ConnRefusal {
    pub const ALL: [ConnRefusal; 4] = [
        Self::PerUidLimit,
        Self::FrameTimeout,
        Self::BufferBudget,
        Self::MetricsLimit,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerUidLimit => "per_uid_limit",
            Self::FrameTimeout => "frame_timeout",
            Self::BufferBudget => "buffer_budget",
            Self::MetricsLimit => "metrics_limit",
        }
    }
}

/// The agent's servers, as the `server` label of accept errors.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Server {
    /// The control socket (status, reload ...).
    Control,
    /// `/metrics` and `/status` over TCP.
    Metrics,
    /// The ingest stream socket.
    Stream,
}

impl Server {
    pub const ALL: [Server; 3] = [Self::Control, Self::Metrics, Self::Stream];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::Metrics => "metrics",
            Self::Stream => "stream",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnRefusalLabels {
    pub reason: ConnRefusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: Server,
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
/// What the memory guard did (see memguard.rs), as the `action` label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum GuardAction {
    Spill,
    LowerSampleRate,
    Restart,
}

impl GuardAction {
    pub const ALL: [GuardAction; 3] = [Self::Spill, Self::LowerSampleRate, Self::Restart];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spill => "spill",
            Self::LowerSampleRate => "lower_sample_rate",
            Self::Restart => "restart",
        }
    }
}

label_value!(
    RejectReason,
    DropReason,
    Socket,
    GuardAction,
    ConnRefusal,
    Server
);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    pub action: GuardAction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub socket: Socket,
}

/// Counters and gauges of the whole agent. Cheap to clone handles (each metric is an `Arc`).
#[derive(Debug)]
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
    /// Client connections the agent closed or refused, by reason.
    pub connections_refused: Family<ConnRefusalLabels, Counter>,
    /// `accept(2)` failures (EMFILE, ENFILE, ENOMEM ...) by server; each is retried after a pause.
    pub accept_errors: Family<ServerLabels, Counter>,
    pub spooled_batches: Gauge,
    pub spool_bytes: Gauge,
    /// What the spool may hold now: `spool.max_bytes`, less while its volume is short of space.
    pub spool_capacity_bytes: Gauge,
    /// 0 closed, 1 open, 2 half-open; exported as `apm_breaker_state{state}` (one series each).
    pub breaker_state: Gauge,
    /// Last RSS the memory guard read (for `host_stats`); `/metrics` exports
    /// `process_resident_memory_bytes` instead, read at each scrape.
    pub agent_rss_bytes: Gauge,
    /// Effective kernel queue length of the datagram socket.
    pub dgram_queue_len: Gauge,
    /// Last acknowledged batch seq (monotonic per agent).
    pub last_acked_seq: Gauge,
    /// Seconds from sending a batch to its OK ack.
    pub ack_latency: Histogram,
    /// Seconds from receiving a profile to the OK ack of its batch (replayed ones included).
    pub delivery_latency: Histogram,
    /// Smoothed seal -> OK-ack time of batches sent once, µs (0 before the first):
    /// [`Telemetry::seal_lead`].
    pub seal_ack_srtt_us: std::sync::atomic::AtomicU64,
    /// Its smoothed mean deviation, µs.
    pub seal_ack_rttvar_us: std::sync::atomic::AtomicU64,
    /// Profiles per acknowledged batch.
    pub batch_profiles: Histogram,
    /// Payload bytes per acknowledged batch.
    pub batch_bytes: Histogram,
    /// Memory guard steps taken, by action.
    pub memory_guard: Family<GuardLabels, Counter>,
    /// Profiles between ingest and the router: what a SIGKILL would lose (pipeline/durable.rs).
    pub gate: crate::pipeline::durable::Gate,
    /// Profiles the router holds only in memory (no spool record): waiting or in flight.
    pub memory_profiles: Gauge,
    /// Profiles in the spool, not yet acknowledged.
    pub spooled_profiles: Gauge,
    /// [`Telemetry::at_risk_profiles`] as the router last published it (for `/metrics`).
    pub at_risk_profiles: Gauge,
    /// Profiles written ahead to the spool (`spool.mode = "always"`), in the order received.
    pub durable_profiles: Counter,
    started: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        let t = Self {
            received: Family::default(),
            received_bytes: Counter::default(),
            rejected: Family::default(),
            delivered: Counter::default(),
            delivered_batches: Counter::default(),
            dropped: Family::default(),
            send_failures: Counter::default(),
            reconnects: Counter::default(),
            in_flight_batches: Gauge::default(),
            memory_payload_bytes: Gauge::default(),
            backpressure: Gauge::default(),
            backpressure_episodes: Counter::default(),
            stream_connections: Gauge::default(),
            connections_refused: Family::default(),
            accept_errors: Family::default(),
            spooled_batches: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_capacity_bytes: Gauge::default(),
            breaker_state: Gauge::default(),
            agent_rss_bytes: Gauge::default(),
            dgram_queue_len: Gauge::default(),
            last_acked_seq: Gauge::default(),
            // 1 ms .. 16 s: a local listener acks in milliseconds, `central.ack_timeout` is 15 s.
            ack_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 1 ms .. ~18 s in steps of 25 %: fine enough to tell a p99 from `batch.max_age`.
            delivery_latency: Histogram::new(exponential_buckets(0.001, 1.25, 45)),
            seal_ack_srtt_us: std::sync::atomic::AtomicU64::new(0),
            seal_ack_rttvar_us: std::sync::atomic::AtomicU64::new(0),
            // 1 .. 4096 profiles (`batch.max_items` defaults to 1000).
            batch_profiles: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 1 KiB .. 256 MiB.
            batch_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 10)),
            memory_guard: Family::default(),
            gate: crate::pipeline::durable::Gate::default(),
            memory_profiles: Gauge::default(),
            spooled_profiles: Gauge::default(),
            at_risk_profiles: Gauge::default(),
            durable_profiles: Counter::default(),
            started: AtomicU64::new(0),
        };
        // Every labelled series exists from the start at 0, so `rate()` and alerts see the
        // first increment instead of a series appearing out of nowhere.
        for socket in [Socket::Dgram, Socket::Stream] {
            let _ = t.received.get_or_create(&SocketLabels { socket });
        }
        for reason in RejectReason::ALL {
            let _ = t.rejected.get_or_create(&RejectLabels { reason });
        }
        for reason in DropReason::ALL {
            let _ = t.dropped.get_or_create(&DropLabels { reason });
        }
        for action in GuardAction::ALL {
            let _ = t.memory_guard.get_or_create(&GuardLabels { action });
        }
        for reason in ConnRefusal::ALL {
            let _ = t
                .connections_refused
                .get_or_create(&ConnRefusalLabels { reason });
        }
        for server in Server::ALL {
            let _ = t.accept_errors.get_or_create(&ServerLabels { server });
        }
        t
    }
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        let t = Self::default();
        t.started.store(now_ns(), Ordering::Relaxed);
        Arc::new(t)
    }

    /// Profiles only memory holds: between ingest and the router, and in the router's window
    /// without a spool record.
    pub fn at_risk_profiles(&self) -> u64 {
        self.gate.unsettled() + u64::try_from(self.memory_profiles.get()).unwrap_or(0)
    }

    /// Counts a memory guard step and hands the action back (`match t.memory_guard(...)`).
    pub fn memory_guard(&self, action: Action) -> Action {
        let counted = match action {
            Action::None => None,
            Action::Spill => Some(GuardAction::Spill),
            Action::LowerSampleRate => Some(GuardAction::LowerSampleRate),
            Action::Restart => Some(GuardAction::Restart),
        };
        if let Some(action) = counted {
            self.memory_guard
                .get_or_create(&GuardLabels { action })
                .inc();
        }
        action
    }

    /// An OK ack: how long the batch waited for it, and its size.
    pub fn acked(&self, latency: std::time::Duration, profiles: usize, bytes: usize) {
        self.ack_latency.observe(latency.as_secs_f64());
        self.batch_profiles.observe(profiles as f64);
        self.batch_bytes.observe(bytes as f64);
    }

    /// An OK ack of a batch sent once, `latency` after the batcher sealed it. Smoothed as TCP
    /// smooths its round trip (RFC 6298: SRTT gains 1/8 of each sample, RTTVAR 1/4 of its
    /// distance from SRTT); only the transport writes, only the batcher reads.
    pub fn sealed_to_acked(&self, latency: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let r = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX / 8);
        let (srtt, var) = (
            self.seal_ack_srtt_us.load(Relaxed),
            self.seal_ack_rttvar_us.load(Relaxed),
        );
        let (srtt, var) = if srtt == 0 {
            (r, r / 2)
        } else {
            (
                srtt - srtt / 8 + r / 8,
                var - var / 4 + srtt.abs_diff(r) / 4,
            )
        };
        self.seal_ack_srtt_us.store(srtt.max(1), Relaxed);
        self.seal_ack_rttvar_us.store(var, Relaxed);
    }

    /// How long before `batch.max_age` the batcher seals (zero before the first ack): the
    /// smoothed seal -> ack time plus four deviations, as TCP sets its retransmission timeout,
    /// so that the slow acks, not only the typical one, come within `max_age`
    /// (pipeline/batch.rs caps it at half of `max_age`).
    pub fn seal_lead(&self) -> std::time::Duration {
        use std::sync::atomic::Ordering::Relaxed;
        let us = (self.seal_ack_srtt_us.load(Relaxed))
            .saturating_add(self.seal_ack_rttvar_us.load(Relaxed).saturating_mul(4));
        std::time::Duration::from_micros(us)
    }

    /// An OK ack at wall-clock `now_ns` for profiles received at `received_ns` (0: unknown).
    pub fn delivered_after(&self, now_ns: u64, received_ns: impl Iterator<Item = u64>) {
        for r in received_ns.filter(|&r| r != 0) {
            self.delivery_latency
                .observe(now_ns.saturating_sub(r) as f64 / 1e9);
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    pub fn drop_profiles(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
        }
    }

    /// The counters an in-place restart hands down to the next image (`APM_CARRY_COUNTERS`), so
    /// that what the old image counted while it flushed (drops included) is still in
    /// `status --json` and `/metrics` afterwards, and Prometheus sees no counter reset.
    pub fn carry(&self) -> String {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for socket in [Socket::Dgram, Socket::Stream] {
            let n = self.received.get_or_create(&SocketLabels { socket }).get();
            m.insert(format!("received.{}", socket.as_str()), n);
        }
        for (k, c) in [
            ("received_bytes", &self.received_bytes),
            ("delivered", &self.delivered),
            ("delivered_batches", &self.delivered_batches),
            ("send_failures", &self.send_failures),
            ("reconnects", &self.reconnects),
            ("backpressure_episodes", &self.backpressure_episodes),
        ] {
            m.insert(k.to_string(), c.get());
        }
        for r in RejectReason::ALL {
            m.insert(format!("rejected.{}", r.as_str()), self.rejected_of(r));
        }
        for r in DropReason::ALL {
            m.insert(format!("dropped.{}", r.as_str()), self.dropped_of(r));
        }
        for r in ConnRefusal::ALL {
            m.insert(
                format!("connections_refused.{}", r.as_str()),
                self.connections_refused_of(r),
            );
        }
        m.retain(|_, v| *v > 0);
        serde_json::to_string(&m).unwrap_or_default()
    }

    /// Adds what the previous image handed down ([`Self::carry`]). Keys this version does not
    /// know (an upgrade across a restart) are skipped; a malformed value restores nothing.
    pub fn restore(&self, carried: &str) {
        let Ok(m) = serde_json::from_str::<BTreeMap<String, u64>>(carried) else {
            tracing::warn!(
                "counters handed down by the previous image are unreadable: starting from zero"
            );
            return;
        };
        for (k, n) in m {
            let (family, name) = k.split_once('.').unwrap_or((k.as_str(), ""));
            let counter = match family {
                "received" => [Socket::Dgram, Socket::Stream]
                    .into_iter()
                    .find(|s| s.as_str() == name)
                    .map(|socket| {
                        self.received
                            .get_or_create(&SocketLabels { socket })
                            .clone()
                    }),
                "rejected" => RejectReason::ALL
                    .into_iter()
                    .find(|r| r.as_str() == name)
                    .map(|reason| {
                        self.rejected
                            .get_or_create(&RejectLabels { reason })
                            .clone()
                    }),
                "dropped" => DropReason::ALL
                    .into_iter()
                    .find(|r| r.as_str() == name)
                    .map(|reason| self.dropped.get_or_create(&DropLabels { reason }).clone()),
                "connections_refused" => ConnRefusal::ALL
                    .into_iter()
                    .find(|r| r.as_str() == name)
                    .map(|reason| {
                        self.connections_refused
                            .get_or_create(&ConnRefusalLabels { reason })
                            .clone()
                    }),
                "received_bytes" => Some(self.received_bytes.clone()),
                "delivered" => Some(self.delivered.clone()),
                "delivered_batches" => Some(self.delivered_batches.clone()),
                "send_failures" => Some(self.send_failures.clone()),
                "reconnects" => Some(self.reconnects.clone()),
                "backpressure_episodes" => Some(self.backpressure_episodes.clone()),
                _ => None,
            };
            if let Some(c) = counter {
                c.inc_by(n);
            }
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

    pub fn connections_refused_of(&self, reason: ConnRefusal) -> u64 {
        self.connections_refused
            .get_or_create(&ConnRefusalLabels { reason })
            .get()
    }

    pub fn accept_errors_of(&self, server: Server) -> u64 {
        self.accept_errors
            .get_or_create(&ServerLabels { server })
            .get()
    }

    pub fn uptime_s(&self) -> u64 {
        now_ns().saturating_sub(self.started.load(Ordering::Relaxed)) / 1_000_000_000
    }

    /// Registers every metric: the agent's under the `apm_` prefix (counters get `_total` from
    /// the client), plus `apm_build_info`, the PHP-facing controls, and the standard `process_*`
    /// metrics. Every name is listed in docs/metrics.md (checked by tests/tests/observability.rs).
    pub fn register(&self, reg: &mut Registry, ctx: ScrapeContext) {
        reg.register_collector(Box::new(ProcessCollector));
        let r = reg.sub_registry_with_prefix("apm");
        r.register_collector(Box::new(AgentCollector {
            breaker_state: self.breaker_state.clone(),
            ctx,
        }));
        r.register_with_unit(
            "ack_latency",
            "Time from sending a batch to the central listener's OK ack",
            Unit::Seconds,
            self.ack_latency.clone(),
        );
        r.register_with_unit(
            "delivery_latency",
            "Time from receiving a profile to the central listener's OK ack of its batch",
            Unit::Seconds,
            self.delivery_latency.clone(),
        );
        r.register(
            "batch_profiles",
            "Profiles per batch acknowledged by the central listener",
            self.batch_profiles.clone(),
        );
        r.register_with_unit(
            "batch",
            "Payload bytes per batch acknowledged by the central listener",
            Unit::Bytes,
            self.batch_bytes.clone(),
        );
        r.register(
            "memory_guard_actions",
            "Steps taken by the memory guard (RSS over limits.max_memory_mb), by action",
            self.memory_guard.clone(),
        );
        self.register_counters(r);
        self.register_gauges(r);
    }

    /// The pipeline's counters (`_total`).
    fn register_counters(&self, r: &mut Registry) {
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
            "connections_refused",
            "Client connections the agent closed or refused, by reason",
            self.connections_refused.clone(),
        );
        r.register(
            "accept_errors",
            "accept(2) failures (descriptors or memory exhausted), by server; retried after a pause",
            self.accept_errors.clone(),
        );
        r.register(
            "send_failures",
            "Batch sends that failed and were retried",
            self.send_failures.clone(),
        );
        r.register(
            "durable_profiles",
            "Profiles written ahead to the spool before being sent (spool.mode always), in the order received",
            self.durable_profiles.clone(),
        );
        r.register(
            "reconnects",
            "Connections made to the central listener",
            self.reconnects.clone(),
        );
    }

    /// The pipeline's gauges: what is held, where, and how the agent pushes back.
    fn register_gauges(&self, r: &mut Registry) {
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
            "at_risk_profiles",
            "Profiles received that only memory holds (a SIGKILL would lose them); in spool.mode always at most one receive call per source",
            self.at_risk_profiles.clone(),
        );
        r.register(
            "spooled_profiles",
            "Profiles in the disk spool awaiting acknowledgement",
            self.spooled_profiles.clone(),
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
            "spool_capacity_bytes",
            "What the disk spool may hold now: spool.max_bytes, less while its volume is short of free space",
            self.spool_capacity_bytes.clone(),
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

/// What `/metrics` reads besides the counters: the PHP control files and two configured limits.
#[derive(Debug, Clone)]
pub struct ScrapeContext {
    pub php: Arc<PhpControl>,
    /// `spool.max_bytes`.
    pub spool_max_bytes: u64,
    /// `limits.max_memory_mb` in bytes.
    pub memory_limit_bytes: u64,
}

impl ScrapeContext {
    pub fn new(cfg: &crate::config::Config, php: Arc<PhpControl>) -> Self {
        Self {
            php,
            spool_max_bytes: cfg.spool.max_bytes,
            memory_limit_bytes: cfg.limits.max_memory_mb * 1024 * 1024,
        }
    }
}

/// Values computed at scrape time: the breaker as a state set, the build, the PHP controls.
#[derive(Debug)]
struct AgentCollector {
    breaker_state: Gauge,
    ctx: ScrapeContext,
}

fn const_gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: V,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

/// A gauge family with one series per `(label, value)`, e.g. a state set (1 for the current).
fn gauge_set(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (v, g) in values {
        ConstGauge::new(*g).encode(m.encode_family(&[(label, *v)])?)?;
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let state = self.breaker_state.get();
        gauge_set(
            &mut enc,
            "breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others",
            "state",
            &[
                ("closed", i64::from(state == 0)),
                ("open", i64::from(state == 1)),
                ("half_open", i64::from(state == 2)),
            ],
        )?;
        {
            let mut m = enc.encode_descriptor(
                "build_info",
                "Always 1; the agent's version as a label",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64)
                .encode(m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
        }
        let php = &self.ctx.php;
        const_gauge(
            &mut enc,
            "sample_rate",
            "Sample rate handed to PHP (listener.php sends this share of requests)",
            None,
            php.sample_rate(),
        )?;
        ConstCounter::new(php.below_one_seconds()).encode(enc.encode_descriptor(
            "sample_rate_below_one",
            "Time the sample rate PHP reads was below 1.0 since the agent started",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        ConstCounter::new(php.unprofiled_estimate()).encode(enc.encode_descriptor(
            "unprofiled_requests_estimate",
            "Estimated PHP requests not profiled because of sampling: the sum over eBPF poll \
             intervals of sends * (1 / rate - 1)",
            None,
            MetricType::Counter,
        )?)?;
        let raised = php.kill_reasons();
        let reasons: Vec<(&str, i64)> = KillReason::ALL
            .iter()
            .map(|r| (r.as_str(), i64::from(raised.contains(&r.as_str()))))
            .collect();
        gauge_set(
            &mut enc,
            "kill_switch",
            "1 while PHP's kill switch is raised for this reason (listener.php sends nothing)",
            "reason",
            &reasons,
        )?;
        const_gauge(
            &mut enc,
            "spool_max",
            "Configured spool capacity (spool.max_bytes)",
            Some(&Unit::Bytes),
            self.ctx.spool_max_bytes,
        )?;
        const_gauge(
            &mut enc,
            "memory_limit",
            "RSS over which the memory guard acts (limits.max_memory_mb)",
            Some(&Unit::Bytes),
            self.ctx.memory_limit_bytes,
        )?;
        Ok(())
    }
}

/// The standard `process_*` metrics (as the Go and Python clients export them), read from
/// `/proc/self` at each scrape: prometheus-client has no process collector of its own.
#[derive(Debug)]
struct ProcessCollector;

/// The figures of `/proc/self/stat` that `process_*` needs.
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`; the fields are counted after the `)` closing the command name,
/// which may itself contain spaces and parentheses.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state); field N is at index N - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        cpu_ticks: num(14)? + num(15)?,
        threads: num(20)?,
        start_ticks: num(22)?,
        vsize: num(23)?,
        rss_pages: num(24)?,
    })
}

fn boot_time_s() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(st) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            return Ok(());
        };
        // SAFETY: sysconf only reads a system constant.
        let (tck, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            )
        };
        let cpu = ConstCounter::new(st.cpu_ticks as f64 / tck);
        cpu.encode(enc.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        const_gauge(
            &mut enc,
            "process_resident_memory",
            "Resident memory size (the agent's one RSS metric)",
            Some(&Unit::Bytes),
            st.rss_pages * page,
        )?;
        const_gauge(
            &mut enc,
            "process_virtual_memory",
            "Virtual memory size",
            Some(&Unit::Bytes),
            st.vsize,
        )?;
        if let Some(btime) = boot_time_s() {
            const_gauge(
                &mut enc,
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                btime as f64 + st.start_ticks as f64 / tck,
            )?;
        }
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        const_gauge(
            &mut enc,
            "process_open_fds",
            "Open file descriptors",
            None,
            fds,
        )?;
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            const_gauge(
                &mut enc,
                "process_max_fds",
                "Maximum number of open file descriptors (RLIMIT_NOFILE soft limit)",
                None,
                soft,
            )?;
        }
        const_gauge(
            &mut enc,
            "process_threads",
            "OS threads in the process",
            None,
            st.threads,
        )?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seal_lead_is_the_smoothed_seal_to_ack_time_plus_four_deviations() {
        let t = Telemetry::new();
        assert_eq!(t.seal_lead(), Duration::ZERO);
        // First sample: SRTT 16 ms, RTTVAR 8 ms.
        t.sealed_to_acked(Duration::from_millis(16));
        assert_eq!(t.seal_lead(), Duration::from_millis(16 + 4 * 8));
        // SRTT 7/8 of 16 + 1/8 of 80 = 24 ms; RTTVAR 3/4 of 8 + 1/4 of |16 - 80| = 22 ms.
        t.sealed_to_acked(Duration::from_millis(80));
        assert_eq!(t.seal_lead(), Duration::from_millis(24 + 4 * 22));
        // The send -> ack histogram alone does not move it.
        t.acked(Duration::from_secs(3), 10, 100);
        assert_eq!(t.seal_lead(), Duration::from_millis(24 + 4 * 22));
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a ')' must not shift the fields.
        let line = "42 (php-fpm: pool (www)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 \
                    5 0 12345 1000000 250 18446744073709551615";
        let st = parse_stat(line).unwrap();
        assert_eq!(
            st,
            ProcStat {
                cpu_ticks: 10,
                threads: 5,
                start_ticks: 12345,
                vsize: 1_000_000,
                rss_pages: 250,
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    fn scrape(t: &Telemetry, ctx: ScrapeContext) -> String {
        let mut reg = Registry::default();
        t.register(&mut reg, ctx);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn scrape_follows_prometheus_conventions() {
        let dir = tempfile::tempdir().unwrap();
        let php = Arc::new(PhpControl::new(dir.path()).unwrap());
        let ctx = ScrapeContext {
            php: php.clone(),
            spool_max_bytes: 1 << 30,
            memory_limit_bytes: 256 << 20,
        };
        let t = Telemetry::new();
        t.breaker_state.set(2);
        php.raise(KillReason::Paused).unwrap();
        php.set_ceiling(0.5).unwrap();
        t.acked(std::time::Duration::from_millis(3), 10, 5000);
        // Received 0.3 s and 2 s before the ack; 0 (unknown) is left out.
        t.delivered_after(
            10_000_000_000,
            [9_700_000_000, 8_000_000_000, 0].into_iter(),
        );
        t.memory_guard(Action::Spill);
        let out = scrape(&t, ctx);
        for want in [
            r#"apm_breaker_state{state="closed"} 0"#,
            r#"apm_breaker_state{state="open"} 0"#,
            r#"apm_breaker_state{state="half_open"} 1"#,
            concat!(
                r#"apm_build_info{version=""#,
                env!("CARGO_PKG_VERSION"),
                r#""} 1"#
            ),
            "apm_sample_rate 0.5",
            "# TYPE apm_sample_rate_below_one_seconds counter",
            "# TYPE apm_unprofiled_requests_estimate counter",
            "apm_unprofiled_requests_estimate_total 0.0",
            r#"apm_kill_switch{reason="paused"} 1"#,
            r#"apm_kill_switch{reason="spool_high_water"} 0"#,
            "apm_spool_max_bytes 1073741824",
            "apm_memory_limit_bytes 268435456",
            "apm_ack_latency_seconds_count 1",
            r#"apm_ack_latency_seconds_bucket{le="0.004"} 1"#,
            "apm_delivery_latency_seconds_count 2",
            "apm_delivery_latency_seconds_sum 2.3",
            "apm_batch_profiles_sum 10.0",
            "apm_batch_bytes_sum 5000.0",
            r#"apm_memory_guard_actions_total{action="spill"} 1"#,
            r#"apm_memory_guard_actions_total{action="restart"} 0"#,
            r#"apm_dropped_total{reason="spool_full"} 0"#,
            "# TYPE process_cpu_seconds counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_start_time_seconds gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
        ] {
            assert!(out.contains(want), "missing `{want}` in:\n{out}");
        }
        assert!(!out.contains("_ns"), "a metric not in base units:\n{out}");
        assert!(!out.contains("apm_agent_rss_bytes"), "{out}");
    }
}
