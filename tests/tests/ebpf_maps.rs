//! Privileged: map health. The kernel-side maps never evict silently: a full map refuses the
//! insert and the program counts it (per-CPU `HEALTH`, summed by the agent), visible under
//! `ebpf.map_health` in `status --json` and as `apm_ebpf_map_insert_failed_total` in
//! `/metrics`. Runs as root (CI); fails in CI when eBPF cannot load, skips with a reason
//! elsewhere.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use apm_tests::ebpf::{AddrStyle, Sender, TestMonitor, drain};

const WAIT: Duration = Duration::from_secs(20);
/// The smallest `ebpf.max_processes` the agent accepts: `SENDS` holds this many threads.
const P: u32 = 64;
/// Senders beyond what `SENDS` can hold.
const EXTRA: u32 = 16;

/// `status --json`'s `ebpf` object as JSON (the contract the operator reads).
fn json(m: &TestMonitor) -> serde_json::Value {
    serde_json::to_value(m.status()).expect("status serialises")
}

fn field(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_u64()
}

#[test]
fn ebpf_full_sends_map_counts_every_refused_insert() {
    let Some(m) = TestMonitor::start("ebpf_full_sends_map_counts_every_refused_insert", |c| {
        c.max_processes = P;
    }) else {
        return;
    };
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    // All alive at once: a thread's `SENDS` entry lives until it exits, so the last EXTRA
    // senders find the map full.
    let senders: Vec<Sender> = (0..P + EXTRA)
        .map(|_| Sender::spawn("php-fpm8.2"))
        .collect();
    let mut sent = 0;
    for s in &senders {
        // 1 MiB of page faults: before 6.2 the kernel batches a task's RSS counter updates
        // (synced to the mm, and `rss_stat` raised, every 64 faults), so a sender that faults
        // less never raises `rss_stat` there and never asks for an `RSS` entry (5.10 in the VM
        // tier: `insert_failed.rss` stayed 0).
        s.alloc(1);
        let o = s.send(&m.dgram, 1, 64, AddrStyle::Php, 1);
        assert_eq!(o.ok, 1, "{o:?}");
        sent += o.ok;
        sent -= drain(&rx).0;
    }
    assert_eq!(sent, 0, "the receiver got every datagram");
    m.agent_received(u64::from(P + EXTRA));

    let v = m.wait_for(WAIT, "the refused inserts in status", |s| {
        let v = serde_json::to_value(s).unwrap();
        field(&v, &["map_health", "insert_failed", "sends"]).is_some_and(|n| n >= u64::from(EXTRA))
            && field(&v, &["dgram", "ok"]).is_some_and(|n| n >= u64::from(P))
    });
    let v = serde_json::to_value(&v).unwrap();
    // Exactly one refused insert per sender that found the map full: each send is either
    // counted, or counted as refused; nothing vanishes.
    assert_eq!(
        field(&v, &["map_health", "insert_failed", "sends"]),
        Some(u64::from(EXTRA)),
        "{v:#}"
    );
    assert_eq!(field(&v, &["dgram", "ok"]), Some(u64::from(P)), "{v:#}");
    // RSS is per process too (P entries, the agent's own among them): it refused some.
    assert!(
        field(&v, &["map_health", "insert_failed", "rss"]).is_some_and(|n| n > 0),
        "{v:#}"
    );
    assert_eq!(
        field(&v, &["map_health", "events_lost", "exit"]),
        Some(0),
        "{v:#}"
    );

    // The same in /metrics.
    let mut reg = prometheus_client::registry::Registry::default();
    m.monitor.register_metrics(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let line = format!("apm_ebpf_map_insert_failed_total{{map=\"sends\"}} {EXTRA}");
    assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");

    // The entries free up as the senders exit; the counter never goes down.
    for s in senders {
        s.quit();
    }
    let after = json(&m);
    assert_eq!(
        field(&after, &["map_health", "insert_failed", "sends"]),
        Some(u64::from(EXTRA)),
        "{after:#}"
    );
}
