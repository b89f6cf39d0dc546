//! `/metrics` for the monitor: a collector that encodes the latest snapshot at each scrape, so
//! series of exited workers disappear instead of lingering. Cardinality: socket x errno, at
//! most 32 pools (+ `other`); per-worker series (a `pid` label) only with `ebpf.worker_metrics`,
//! at most `ebpf.max_listed_workers` of them.

use std::sync::Arc;

use apm_common::{ErrKind, HostSends, LAT_BUCKETS, SockKind};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::{Shared, Snapshot, State};

/// Per-pool aggregate of live processes (plus exited ones for the send counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub pool: String,
    pub processes: u64,
    pub rss_bytes: u64,
    /// RSS of the pool's largest process.
    pub max_rss_bytes: u64,
    pub sends_ok: u64,
    pub sends_failed: u64,
    pub drops: u64,
}

impl PoolStats {
    pub fn new(pool: String) -> Self {
        Self {
            pool,
            ..Self::default()
        }
    }
}

#[derive(Debug)]
pub struct Collector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state", &self.state)
            .finish()
    }
}

impl Collector {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn sock_label(k: SockKind) -> &'static str {
    match k {
        SockKind::Dgram => "dgram",
        SockKind::Stream => "stream",
    }
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let sh = &self.shared;
        encode_state(sh, &mut enc)?;
        if sh.state != State::Running {
            return Ok(());
        }
        let s = sh.snap.load();
        encode_sends(&s, &mut enc)?;
        encode_health(&s, &mut enc)?;
        encode_map_health(&s, &mut enc)?;
        encode_pools(sh, &s, &mut enc)
    }
}

/// `up`, `state` and `info`: always there, whatever the monitor's state.
fn encode_state(sh: &Shared, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let up = i64::from(sh.state == State::Running);
    gauge(enc, "up", "1 while the eBPF programs are attached", up)?;
    {
        let mut m = enc.encode_descriptor(
            "state",
            "eBPF monitor state: 1 for the current one (degraded: wanted but cannot run)",
            None,
            MetricType::Gauge,
        )?;
        for (name, on) in [
            ("running", sh.state == State::Running),
            ("degraded", matches!(sh.state, State::Degraded(_))),
            ("disabled", matches!(sh.state, State::Disabled(_))),
        ] {
            ConstGauge::new(i64::from(on)).encode(m.encode_family(&[("state", name)])?)?;
        }
    }
    {
        let state = match sh.state {
            State::Running => "running",
            State::Degraded(_) => "degraded",
            State::Disabled(_) => "disabled",
        };
        let labels = [
            ("state", state),
            ("kernel", sh.kernel.as_str()),
            ("failed_program", sh.failed_program.unwrap_or("")),
            ("exit_mode", sh.exit_mode),
        ];
        let g = ConstGauge::new(1i64);
        let mut m = enc.encode_descriptor(
            "info",
            "The monitor's state on this kernel (failed_program: why it is not running)",
            None,
            g.metric_type(),
        )?;
        g.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Kernel-seen sends by socket: counts by result, bytes, latency.
fn encode_sends(s: &Snapshot, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let kinds = [SockKind::Dgram, SockKind::Stream];
    {
        let mut m = enc.encode_descriptor(
            "sends",
            "Kernel-seen sends by PHP to the agent's sockets, by socket and result",
            None,
            MetricType::Counter,
        )?;
        for k in kinds {
            let h = &s.host[k as usize];
            let labels = [("socket", sock_label(k)), ("result", "ok")];
            ConstCounter::new(h.c.ok).encode(m.encode_family(&labels)?)?;
            for e in ErrKind::ALL {
                let labels = [("socket", sock_label(k)), ("result", e.as_str())];
                ConstCounter::new(h.c.err[e as usize]).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "send_bytes",
            "Bytes of successful kernel-seen sends, by socket",
            None,
            MetricType::Counter,
        )?;
        for k in kinds {
            let labels = [("socket", sock_label(k))];
            ConstCounter::new(s.host[k as usize].c.bytes).encode(m.encode_family(&labels)?)?;
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "send_latency_seconds",
            "Time spent in the send syscalls (log2 buckets)",
            None,
            MetricType::Histogram,
        )?;
        for k in kinds {
            let labels = [("socket", sock_label(k))];
            let (sum, count, buckets) = histogram(&s.host[k as usize]);
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    Ok(())
}

/// Stream waits, drops, the kernel-vs-agent accounting and the ring-buffer events.
fn encode_health(s: &Snapshot, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let st = &s.host[SockKind::Stream as usize].c;
    {
        let c = ConstCounter::new(st.blocked_ns as f64 / 1e9);
        c.encode(enc.encode_descriptor(
            "stream_wait",
            "Time PHP waited between an EAGAIN on the stream socket and the retry that succeeded",
            Some(&Unit::Seconds),
            c.metric_type(),
        )?)?;
    }
    counter(
        enc,
        "drops",
        "Profiles lost before the agent: failed datagram sends, failed stream sends but EAGAIN, \
         stream connects that failed with EAGAIN, abandoned stream frames",
        super::drops_of(&s.host[0].c, st),
    )?;
    {
        let mut m = enc.encode_descriptor(
            "stream_drops",
            "Stream-socket drops PHP does not see as a failed send, by reason: connect EAGAIN \
             (full backlog), frame abandoned mid-way (closed after a short or EAGAIN send)",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("connect_eagain", st.connect_eagain),
            ("abandoned_frame", st.abandoned),
        ] {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
        }
    }
    gauge(
        enc,
        "unaccounted_datagrams",
        "Datagrams the kernel accepted that the agent has not received or rejected yet",
        s.unaccounted,
    )?;
    gauge(
        enc,
        "unaccounted_alarm",
        "1 while kernel and agent datagram counts disagree beyond what the queue can hold",
        i64::from(s.alarm),
    )?;
    {
        let mut m = enc.encode_descriptor(
            "events",
            "Ring-buffer events by kind",
            None,
            MetricType::Counter,
        )?;
        for (kind, v) in [
            ("worker_exit", s.events.worker_exits),
            ("rss_over_threshold", s.events.rss_over_threshold),
            ("drop_burst", s.events.drop_bursts),
            ("swept_exit", s.events.swept_exits),
        ] {
            ConstCounter::new(v).encode(m.encode_family(&[("kind", kind)])?)?;
        }
    }
    Ok(())
}

/// Refused map inserts, lost ring-buffer events, entries the agent's sweep removed.
fn encode_map_health(s: &Snapshot, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    // (name, help, label, values by label value)
    type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, u64)]);
    let h = &s.health;
    let families: [Family; 3] = [
        (
            "map_insert_failed",
            "Inserts a full eBPF map refused (the maps never evict), by map",
            "map",
            &[
                ("sends", h.insert_failed.sends),
                ("conns", h.insert_failed.conns),
                ("proc_sends", h.insert_failed.proc_sends),
                ("rss", h.insert_failed.rss),
                ("mm_owner", h.insert_failed.mm_owner),
            ],
        ),
        (
            "events_lost",
            "Ring-buffer events lost because the buffer was full, by kind",
            "kind",
            &[
                ("exit", h.events_lost.exit),
                ("rss", h.events_lost.rss),
                ("drop", h.events_lost.drop),
            ],
        ),
        (
            "map_evicted",
            "Entries of processes that are gone, removed by the agent's sweep, by map",
            "map",
            &[
                ("sends", h.evicted.sends),
                ("proc_sends", h.evicted.proc_sends),
                ("rss", h.evicted.rss),
                ("conns", h.evicted.conns),
                ("mm_owner", h.evicted.mm_owner),
            ],
        ),
    ];
    for (name, help, label, values) in families {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (v, n) in values {
            ConstCounter::new(*n).encode(m.encode_family(&[(label, *v)])?)?;
        }
    }
    Ok(())
}

/// Per pool figures, and per worker ones when `ebpf.worker_metrics` asks for them.
fn encode_pools(sh: &Shared, s: &Snapshot, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    for (name, help, get) in [
        (
            "pool_processes",
            "PHP processes watched, by pool",
            (|p: &PoolStats| p.processes) as fn(&PoolStats) -> u64,
        ),
        ("pool_rss_bytes", "RSS of a pool's processes", |p| {
            p.rss_bytes
        }),
        (
            "pool_max_worker_rss_bytes",
            "RSS of a pool's largest process",
            |p| p.max_rss_bytes,
        ),
    ] {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for p in &s.pools {
            ConstGauge::new(get(p)).encode(m.encode_family(&[("pool", p.pool.as_str())])?)?;
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "pool_sends",
            "Kernel-seen sends by pool and result (ok, failed), exited processes included",
            None,
            MetricType::Counter,
        )?;
        for p in &s.pools {
            for (result, v) in [("ok", p.sends_ok), ("failed", p.sends_failed)] {
                let labels = [("pool", p.pool.as_str()), ("result", result)];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    if sh.cfg.worker_metrics {
        let mut m = enc.encode_descriptor(
            "worker_rss_bytes",
            "RSS of the largest PHP workers (at most ebpf.max_listed_workers series)",
            None,
            MetricType::Gauge,
        )?;
        for w in s.workers.iter().take(sh.cfg.max_listed_workers) {
            let pid = w.pid.to_string();
            let labels = [("pool", w.pool.as_str()), ("pid", pid.as_str())];
            ConstGauge::new(w.rss_bytes).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// (sum in seconds, count, per-bucket (upper bound in seconds, count)); the encoder makes the
/// buckets cumulative. The open-ended last bucket becomes +Inf.
fn histogram(h: &HostSends) -> (f64, u64, Vec<(f64, u64)>) {
    let count: u64 = h.hist.iter().sum();
    let buckets = (0..LAT_BUCKETS)
        .map(|b| {
            let ub = if b == LAT_BUCKETS - 1 {
                f64::INFINITY
            } else {
                apm_common::lat_bucket_upper_ns(b) as f64 / 1e9
            };
            (ub, h.hist[b])
        })
        .collect();
    (h.c.lat_ns_sum as f64 / 1e9, count, buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_the_kernel_refused_shows_with_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let php = Arc::new(crate::phpctl::PhpControl::new(dir.path()).unwrap());
        let shared = Arc::new(Shared {
            state: State::Degraded("kernel 6.1.0-test: cannot load eBPF program".into()),
            kernel: "6.1.0-test".into(),
            failed_program: Some("enter_sendto"),
            exit_mode: "",
            comm_source: "",
            cfg: crate::config::EbpfConfig::default(),
            dgram: "/d".into(),
            stream: "/s".into(),
            snap: arc_swap::ArcSwap::from_pointee(super::super::Snapshot::default()),
            php,
        });
        let mut reg = prometheus_client::registry::Registry::default();
        reg.sub_registry_with_prefix("apm_ebpf")
            .register_collector(Box::new(Collector::new(shared)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("apm_ebpf_up 0"), "{out}");
        assert!(
            out.contains(r#"apm_ebpf_info{state="degraded",kernel="6.1.0-test",failed_program="enter_sendto",exit_mode=""} 1"#),
            "{out}"
        );
    }

    #[test]
    fn scrape_renders_bounded_series() {
        let dir = tempfile::tempdir().unwrap();
        let php = Arc::new(crate::phpctl::PhpControl::new(dir.path()).unwrap());
        let mut snap = super::super::Snapshot::default();
        snap.host[0].c.ok = 7;
        snap.host[0].c.err[ErrKind::Eagain as usize] = 3;
        snap.host[0].hist[12] = 10;
        snap.pools.push(PoolStats {
            pool: "www".into(),
            processes: 2,
            rss_bytes: 100,
            max_rss_bytes: 1000,
            sends_ok: 7,
            sends_failed: 3,
            drops: 3,
        });
        for pid in 0..100 {
            snap.workers.push(super::super::WorkerStatus {
                pid,
                pool: "www".into(),
                rss_bytes: 1000 - u64::from(pid),
                ..Default::default()
            });
        }
        let cfg = crate::config::EbpfConfig {
            max_listed_workers: 5,
            worker_metrics: true,
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            state: State::Running,
            kernel: "6.1.0-test".into(),
            failed_program: None,
            exit_mode: "signal_live",
            comm_source: "btf",
            cfg,
            dgram: "/d".into(),
            stream: "/s".into(),
            snap: arc_swap::ArcSwap::from_pointee(snap),
            php,
        });
        let (shared_snap, shared_php) = (shared.snap.load_full(), shared.php.clone());
        let mut reg = prometheus_client::registry::Registry::default();
        reg.sub_registry_with_prefix("apm_ebpf")
            .register_collector(Box::new(Collector::new(shared)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("apm_ebpf_up 1"), "{out}");
        assert!(
            out.contains(r#"apm_ebpf_info{state="running",kernel="6.1.0-test",failed_program="",exit_mode="signal_live"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"apm_ebpf_sends_total{socket="dgram",result="ok"} 7"#),
            "{out}"
        );
        assert!(out.contains(r#"apm_ebpf_sends_total{socket="dgram",result="eagain"} 3"#));
        assert!(out.contains(r#"apm_ebpf_pool_sends_total{pool="www",result="failed"} 3"#));
        assert!(out.contains("apm_ebpf_send_latency_seconds_count{socket=\"dgram\"} 10"));
        assert_eq!(
            out.matches("apm_ebpf_worker_rss_bytes{").count(),
            5,
            "{out}"
        );
        assert!(out.contains(r#"apm_ebpf_pool_max_worker_rss_bytes{pool="www"} 1000"#));
        assert!(
            out.contains(r#"apm_ebpf_state{state="running"} 1"#),
            "{out}"
        );

        // By default no series carries a pid: PHP-FPM recycling workers must not churn series.
        let mut reg = prometheus_client::registry::Registry::default();
        reg.sub_registry_with_prefix("apm_ebpf")
            .register_collector(Box::new(Collector::new(Arc::new(Shared {
                cfg: crate::config::EbpfConfig::default(),
                dgram: "/d".into(),
                stream: "/s".into(),
                snap: arc_swap::ArcSwap::from_pointee((*shared_snap).clone()),
                php: shared_php,
                state: State::Running,
                kernel: "6.1.0-test".into(),
                failed_program: None,
                exit_mode: "signal_live",
                comm_source: "btf",
            }))));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(!out.contains("pid="), "{out}");
        assert!(out.contains("apm_ebpf_pool_rss_bytes"), "{out}");
    }
}
