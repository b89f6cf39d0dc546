//! Privileged: worker memory as the kernel reports it, against /proc, and the exit event.
//! Runs as root (CI); fails in CI when eBPF cannot load, skips with a reason elsewhere.

use std::time::{Duration, Instant};

use apm_tests::ebpf::{Sender, TestMonitor, vm_rss};

const PAGE: u64 = 4096;

/// Waits until the monitor's RSS for `pid` is within one page of /proc's VmRSS; panics with
/// both values after 10 s.
fn assert_rss_matches(m: &TestMonitor, pid: u32, what: &str) -> u64 {
    let table = m.monitor.rss_table();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let proc_rss = vm_rss(pid);
        let ours = table.get(pid);
        if proc_rss > 0 && ours.abs_diff(proc_rss) <= PAGE {
            return ours;
        }
        assert!(
            Instant::now() <= end,
            "{what}: monitor RSS {ours} vs /proc VmRSS {proc_rss} (more than a page apart)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ebpf_rss_matches_proc_and_exit_is_reported_once() {
    let Some(m) = TestMonitor::start("ebpf_rss_matches_proc_and_exit_is_reported_once", |c| {
        c.rss_threshold_mb = 48;
    }) else {
        return;
    };
    let child = Sender::spawn("php-fpm8.2");
    let pid = child.pid();

    child.alloc(64);
    let big = assert_rss_matches(&m, pid, "after allocating 64 MiB");
    assert!(big >= 64 * 1024 * 1024, "{big}");
    let s = m.wait_for(Duration::from_secs(10), "the threshold event", |s| {
        s.events.rss_over_threshold >= 1
            && s.workers.iter().any(|w| w.pid == pid && w.over_threshold)
    });
    let w = s.workers.iter().find(|w| w.pid == pid).unwrap();
    assert!(w.peak_rss_bytes >= 64 * 1024 * 1024, "{w:?}");

    child.free();
    let small = assert_rss_matches(&m, pid, "after freeing it");
    assert!(small + 60 * 1024 * 1024 < big, "{small} vs {big}");

    // The agent (this process) is watched too.
    let s = m.wait_for(Duration::from_secs(5), "the agent's RSS", |s| {
        s.agent_rss_bytes > 0
    });
    let me = vm_rss(std::process::id());
    assert!(
        s.agent_rss_bytes.abs_diff(me) < me / 10,
        "agent RSS {} vs /proc {me}",
        s.agent_rss_bytes
    );

    child.quit();
    m.wait_for(Duration::from_secs(10), "the exit event", |s| {
        s.recent_exits.iter().any(|e| e.pid == pid)
    });
    // Give a duplicate the time to show up, then count.
    std::thread::sleep(Duration::from_millis(500));
    let s = m.status();
    let exits: Vec<_> = s.recent_exits.iter().filter(|e| e.pid == pid).collect();
    assert_eq!(
        exits.len(),
        1,
        "exactly one exit event: {:?}",
        s.recent_exits
    );
    assert!(!exits[0].swept);
    assert!(
        exits[0].peak_rss_bytes >= 64 * 1024 * 1024,
        "{:?}",
        exits[0]
    );
    assert_eq!(m.monitor.rss_table().get(pid), 0, "forgotten after exit");
    assert!(s.workers.iter().all(|w| w.pid != pid));
}

#[test]
fn ebpf_rss_matches_proc_when_tracking_starts_late() {
    let Some(m) = TestMonitor::start("ebpf_rss_matches_proc_when_tracking_starts_late", |_| {})
    else {
        return;
    };
    // Not PHP yet: its file-backed and inherited pages are never reported to the monitor,
    // which must take the members it has no event for from /proc.
    let child = Sender::spawn("worker-tbd");
    child.alloc(16);
    child.free();
    child.rename("php-fpm8.2");
    child.alloc(8);
    let pid = child.pid();
    let rss = assert_rss_matches(&m, pid, "tracking started after the process did");
    assert!(rss > 8 * 1024 * 1024, "{rss}");
    child.quit();
}
