//! Privileged: kernel-seen send counts against what the senders observed themselves.
//! Runs as root (CI); fails in CI when eBPF cannot load, skips with a reason elsewhere.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use apm_agent::monitor::{EbpfStatus, ErrnoCounts, WorkerStatus};
use apm_tests::ebpf::{AddrStyle, Outcome, Sender, TestMonitor, drain};

const WAIT: Duration = Duration::from_secs(10);

fn errnos(o: &Outcome) -> ErrnoCounts {
    ErrnoCounts::from_err(&o.err)
}

fn worker(s: &EbpfStatus, pid: u32) -> Option<&WorkerStatus> {
    s.workers.iter().find(|w| w.pid == pid)
}

#[test]
fn ebpf_kernel_counts_equal_sender_counts_per_errno() {
    let Some(m) = TestMonitor::start("ebpf_kernel_counts_equal_sender_counts_per_errno", |_| {})
    else {
        return;
    };
    // Forked before any socket exists, so the child holds no copy of the receiver.
    let child = Sender::spawn("php-fpm8.2");
    let other_path = m.dir.path().join("not-the-agent.sock");
    let other = UnixDatagram::bind(&other_path).unwrap();
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let mut expected = Outcome::default();
    let mut received = 0;

    // Nobody reads: the queue fills and the rest fail with EAGAIN.
    let o = child.send(&m.dgram, 40, 100, AddrStyle::Php, 1);
    assert!(o.ok > 0 && o.err[0] > 0, "queue never filled: {o:?}");
    expected.add(&o);
    let (n, _) = drain(&rx);
    assert_eq!(n, o.ok, "receiver saw what the sender sent");
    received += n;

    // C-style address (whole sockaddr_un, NUL after the path), after draining: all succeed.
    let o = child.send(&m.dgram, 5, 200, AddrStyle::Full, 1);
    assert_eq!(o.ok, 5, "{o:?}");
    expected.add(&o);
    received += drain(&rx).0;

    // Larger than the socket buffer: EMSGSIZE.
    let o = child.send(&m.dgram, 1, 250_000, AddrStyle::Php, 1);
    assert_eq!(o.err[2], 1, "{o:?}");
    expected.add(&o);

    // Sends to another socket are not the agent's business.
    let o = child.send(&other_path, 7, 100, AddrStyle::Php, 1);
    assert_eq!(o.ok, 7);
    drain(&other);

    // The socket file stays but nobody is bound: ECONNREFUSED.
    drop(rx);
    let o = child.send(&m.dgram, 3, 100, AddrStyle::Php, 1);
    assert_eq!(o.err[4], 3, "{o:?}");
    expected.add(&o);

    // No socket file: ENOENT.
    std::fs::remove_file(&m.dgram).unwrap();
    let o = child.send(&m.dgram, 2, 100, AddrStyle::Php, 1);
    assert_eq!(o.err[5], 2, "{o:?}");
    expected.add(&o);
    m.agent_received(received);

    let pid = child.pid();
    let s = m.wait_for(WAIT, "the child's counts and the agent's", |s| {
        s.unaccounted == 0
            && worker(s, pid).is_some_and(|w| {
                w.sends_ok == expected.ok && w.sends_failed.total() == expected.failed()
            })
    });
    let w = worker(&s, pid).unwrap();
    assert_eq!(w.sends_ok, expected.ok);
    assert_eq!(w.bytes, expected.bytes);
    assert_eq!(w.sends_failed, errnos(&expected), "per errno");
    assert_eq!(
        w.drops,
        expected.failed(),
        "every failed datagram send is a drop"
    );
    assert_eq!(w.comm, "php-fpm8.2");
    // Host totals: only this child sent to this monitor's sockets.
    assert_eq!(s.sends_ok, expected.ok);
    assert_eq!(s.sends_failed, errnos(&expected));
    assert_eq!(s.bytes, expected.bytes);
    assert_eq!(s.dgram.ok, expected.ok);
    assert_eq!(s.stream.ok + s.stream.failed.total(), 0);
    assert_eq!(s.dgram.latency.count, expected.ok + expected.failed());
    assert!(s.dgram.latency.p99_ns > 0);
    assert_eq!(s.drops, expected.failed());
    // Everything the kernel accepted was drained and counted by "the agent".
    assert!(!s.unaccounted_alarm);
    let hs = m.monitor.host_stats();
    assert!(hs.ebpf_enabled);
    assert_eq!(
        (hs.kernel_sends_ok, hs.kernel_sends_failed),
        (expected.ok, expected.failed())
    );

    // Exit: exactly one event for this pid, with the final totals.
    child.quit();
    let s = m.wait_for(WAIT, "the child's exit event", |s| {
        s.recent_exits.iter().any(|e| e.pid == pid)
    });
    std::thread::sleep(Duration::from_millis(300));
    let s2 = m.status();
    let exits: Vec<_> = s2.recent_exits.iter().filter(|e| e.pid == pid).collect();
    assert_eq!(exits.len(), 1, "one exit event: {:?}", s.recent_exits);
    let e = exits[0];
    assert!(!e.swept, "delivered by the kernel's exit event");
    assert_eq!(e.sends_ok, expected.ok);
    assert_eq!(e.sends_failed, errnos(&expected));
    assert_eq!(e.bytes, expected.bytes);
    assert!(worker(&s2, pid).is_none(), "retired from the live list");
    // Retiring a process does not change host totals.
    assert_eq!(s2.sends_ok, expected.ok);
}

#[test]
fn ebpf_processes_that_are_not_php_are_not_counted() {
    let Some(m) = TestMonitor::start("ebpf_processes_that_are_not_php_are_not_counted", |_| {})
    else {
        return;
    };
    let outsider = Sender::spawn("python3");
    let php = Sender::spawn("php-fpm8.2");
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let o = outsider.send(&m.dgram, 5, 64, AddrStyle::Php, 1);
    assert_eq!(o.ok, 5);
    drain(&rx);
    let p = php.send(&m.dgram, 3, 64, AddrStyle::Php, 1);
    assert_eq!(p.ok, 3);
    drain(&rx);
    let pid = php.pid();
    let s = m.wait_for(WAIT, "the PHP sender's counts", |s| {
        worker(s, pid).is_some_and(|w| w.sends_ok == 3)
    });
    assert!(worker(&s, outsider.pid()).is_none(), "not PHP: not watched");
    assert_eq!(s.sends_ok, 3, "only the PHP sender is counted");
}

#[test]
fn ebpf_concurrent_senders_lose_no_increment() {
    let Some(m) = TestMonitor::start("ebpf_concurrent_senders_lose_no_increment", |_| {}) else {
        return;
    };
    let senders: Vec<Sender> = (0..3).map(|_| Sender::spawn("php-fpm8.2")).collect();
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    // A reader that keeps the queue moving, so sends both succeed and fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let rx = rx.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            rx.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = [0u8; 512];
            let mut n = 0u64;
            loop {
                match rx.recv(&mut buf) {
                    Ok(_) => n += 1,
                    Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => return n,
                    Err(_) => {}
                }
            }
        })
    };
    let dgram = m.dgram.clone();
    let per = apm_tests::scaled(5000) as u32;
    let outcomes: Vec<Outcome> = std::thread::scope(|sc| {
        let hs: Vec<_> = senders
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let d = dgram.clone();
                // The last sender uses 4 threads of one process.
                let threads = if i == 2 { 4 } else { 1 };
                sc.spawn(move || s.send(&d, per, 128, AddrStyle::Php, threads))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let got = reader.join().unwrap() + drain(&rx).0;
    let mut total = Outcome::default();
    for o in &outcomes {
        total.add(o);
    }
    assert_eq!(got, total.ok, "receiver ground truth");
    assert_eq!(total.ok + total.failed(), u64::from(per) * 6);
    m.agent_received(got);
    let s = m.wait_for(
        WAIT,
        "all sends counted, by the kernel and the agent",
        |s| s.sends_ok + s.sends_failed.total() == u64::from(per) * 6 && s.unaccounted == 0,
    );
    assert_eq!(s.sends_ok, total.ok);
    assert_eq!(s.sends_failed, errnos(&total));
    for (snd, o) in senders.iter().zip(&outcomes) {
        let w = worker(&s, snd.pid()).expect("every sender listed");
        assert_eq!(
            (w.sends_ok, w.sends_failed),
            (o.ok, errnos(o)),
            "pid {}",
            snd.pid()
        );
    }
}

#[test]
fn ebpf_unaccounted_datagrams_raise_the_alarm() {
    let Some(m) = TestMonitor::start("ebpf_unaccounted_datagrams_raise_the_alarm", |_| {}) else {
        return;
    };
    let child = Sender::spawn("php-fpm8.2");
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let o = child.send(&m.dgram, 5, 64, AddrStyle::Php, 1);
    assert_eq!(o.ok, 5);
    // The "agent" reads all five but counts only four: one lost inside the agent.
    assert_eq!(drain(&rx).0, 5);
    m.agent_received(4);
    let s = m.wait_for(WAIT, "the alarm", |s| s.unaccounted_alarm);
    assert_eq!(s.unaccounted, 1);
    assert_eq!(s.unaccounted_alarms, 1);
    m.agent_received(1);
    let s = m.wait_for(WAIT, "the alarm to clear", |s| !s.unaccounted_alarm);
    assert_eq!(s.unaccounted, 0);
}

#[test]
fn ebpf_drops_lower_the_sample_rate() {
    let Some(m) = TestMonitor::start("ebpf_drops_lower_the_sample_rate", |_| {}) else {
        return;
    };
    assert_eq!(m.php.sample_rate(), 1.0);
    let child = Sender::spawn("php-fpm8.2");
    let _rx = UnixDatagram::bind(&m.dgram).unwrap();
    let o = child.send(&m.dgram, 100, 64, AddrStyle::Php, 1);
    assert!(o.err[0] > 50, "{o:?}");
    // Record every rate the controller sets until it has started climbing back.
    let mut rates = vec![1.0];
    let end = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < end {
        let r = m.status().sample_rate;
        if r != *rates.last().unwrap() {
            rates.push(r);
        }
        if rates.windows(2).any(|w| w[1] > w[0]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(rates.len() >= 3, "lowered, then raised again: {rates:?}");
    for w in rates.windows(2) {
        let (a, b) = (w[0], w[1]);
        let halved = (b - (a * 0.5).max(0.05)).abs() < 1e-9;
        let stepped = (b - (a + 0.1).min(1.0)).abs() < 1e-9;
        assert!(
            halved || stepped,
            "{a} -> {b} is neither a halving nor a +0.1 step: {rates:?}"
        );
    }
    assert!(
        rates[1] < 1.0,
        "the first change lowers the rate: {rates:?}"
    );
    let text = std::fs::read_to_string(m.php.sample_rate_path()).unwrap();
    let written: f64 = text.trim().parse().unwrap();
    assert!(
        (written - m.php.sample_rate()).abs() < 1e-4,
        "written where listener.php reads it"
    );
    assert!(m.status().events.drop_bursts >= 1, "a drop burst event");
}

/// Counters live per thread in the kernel: a thread that exits while its process lives on
/// hands them to the process, and the last thread's exit reports them all, exactly once.
#[test]
fn ebpf_exit_reports_the_sends_of_every_thread() {
    let Some(m) = TestMonitor::start("ebpf_exit_reports_the_sends_of_every_thread", |_| {}) else {
        return;
    };
    let child = Sender::spawn("php-fpm8.2");
    let pid = child.pid();
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let mut total = Outcome::default();
    // Four threads that exit after sending, then the main thread itself.
    let per = apm_tests::scaled(300) as u32;
    let o = child.send(&m.dgram, per, 64, AddrStyle::Php, 4);
    total.add(&o);
    let (n, _) = drain(&rx);
    let o = child.send(&m.dgram, per, 64, AddrStyle::Php, 1);
    total.add(&o);
    let (n2, _) = drain(&rx);
    assert_eq!(n + n2, total.ok, "receiver ground truth");
    assert_eq!(total.ok + total.failed(), u64::from(per) * 5);
    let s = m.wait_for(WAIT, "the live process's sends", |s| {
        worker(s, pid).is_some_and(|w| w.sends_ok + w.sends_failed.total() == u64::from(per) * 5)
    });
    let w = worker(&s, pid).unwrap();
    assert_eq!((w.sends_ok, w.sends_failed), (total.ok, errnos(&total)));

    child.quit();
    m.wait_for(WAIT, "the exit event", |s| {
        s.recent_exits.iter().any(|e| e.pid == pid)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let s = m.status();
    let exits: Vec<_> = s.recent_exits.iter().filter(|e| e.pid == pid).collect();
    assert_eq!(exits.len(), 1, "exactly one exit: {exits:?}");
    assert!(!exits[0].swept, "{:?}", exits[0]);
    assert_eq!(
        (exits[0].sends_ok, exits[0].sends_failed),
        (total.ok, errnos(&total))
    );
    assert!(
        worker(&s, pid).is_none(),
        "forgotten after exit: {:?}",
        s.workers
    );
}

/// A process that exits with live threads (exit_group: its threads die together, as when a
/// PHP-FPM worker is killed): every send of every thread is reported once, across the exit
/// event(s) and anything the agent's sweep retires. On kernels without the tracepoint's
/// `group_dead` several dying threads may each take themselves for the last one.
#[test]
fn ebpf_exit_with_live_threads_counts_every_send_once() {
    let Some(m) = TestMonitor::start("ebpf_exit_with_live_threads_counts_every_send_once", |_| {})
    else {
        return;
    };
    let child = Sender::spawn("php-fpm8.2");
    let pid = child.pid();
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let per = apm_tests::scaled(300) as u32;
    let mut total = Outcome::default();
    // Four threads that send and stay alive, then the main thread.
    total.add(&child.send_and_stay(&m.dgram, per, 64, 4));
    let (n, _) = drain(&rx);
    total.add(&child.send(&m.dgram, per, 64, AddrStyle::Php, 1));
    let (n2, _) = drain(&rx);
    assert_eq!(n + n2, total.ok, "receiver ground truth");
    assert_eq!(total.ok + total.failed(), u64::from(per) * 5);
    m.agent_received(n + n2);

    child.quit();
    let sum = |s: &EbpfStatus| {
        let mut ok = 0;
        let mut failed = ErrnoCounts::default();
        for e in s.recent_exits.iter().filter(|e| e.pid == pid) {
            ok += e.sends_ok;
            failed.add(&e.sends_failed);
        }
        (ok, failed)
    };
    let want = (total.ok, errnos(&total));
    let s = m.wait_for(WAIT, "every send of the process reported at exit", |s| {
        sum(s) == want && worker(s, pid).is_none()
    });
    // Nothing arrives late and counts twice.
    std::thread::sleep(Duration::from_millis(1500));
    let s2 = m.status();
    assert_eq!(sum(&s2), want, "{:?}", s2.recent_exits);
    assert!(
        s2.recent_exits
            .iter()
            .filter(|e| e.pid == pid && !e.swept)
            .count()
            <= 1,
        "one exit from the kernel (parts merged): {:?}",
        s.recent_exits
    );
    assert_eq!(
        (s2.sends_ok, s2.sends_failed),
        want,
        "host totals: only this child sent"
    );
}

/// Items 3a and 3c of the kernel-matrix/eBPF issue, with the whole agent: drops lower the rate;
/// `status --json` (top level and `ebpf`) reports what `<runtime_dir>/sample-rate` says; a
/// SIGTERM then puts 1.0 back in the file (it used to stay lowered until the agent ran again).
#[test]
fn ebpf_agent_reports_the_rate_in_the_file_and_resets_it_at_stop() {
    use apm_tests::common::{Agent, Listener};
    use nix::sys::signal::Signal;
    // Probe: the agent below needs eBPF (`enabled = "on"`); skips or fails like the others.
    if TestMonitor::start(
        "ebpf_agent_reports_the_rate_in_the_file_and_resets_it_at_stop",
        |_| {},
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let mut agent = Agent::start(dir.path(), &listener.endpoint(), "on", "");
    let file = dir.path().join("run/sample-rate");
    let read = || -> f64 {
        std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(read(), 1.0);
    // The agent stops reading; a PHP-named sender fills its queue and sees EAGAIN.
    let child = Sender::spawn("php-fpm8.2");
    agent.proc.signal(Signal::SIGSTOP);
    let o = child.send(&agent.socket(), 5000, 64, AddrStyle::Php, 1);
    agent.proc.signal(Signal::SIGCONT);
    assert!(o.err[0] > 100, "the queue filled: {o:?}");
    agent.wait_for(WAIT, "a lowered sample rate", |s| {
        s["sample_rate"].as_f64().is_some_and(|r| r < 1.0)
    });
    // Status and the file agree (read the file on both sides of the status: a raise may land
    // in between, at most every 3 polls).
    let ok = apm_testkit::wait_until(WAIT, || {
        let before = read();
        let s = agent.status().unwrap();
        let after = read();
        before == after
            && s["sample_rate"].as_f64() == Some(before)
            && s["ebpf"]["sample_rate"].as_f64() == Some(before)
    });
    assert!(ok, "status reports the file's rate: {:?}", agent.status());
    assert!(read() < 1.0, "still lowered when the agent stops");
    assert_eq!(
        agent.proc.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0)
    );
    assert_eq!(read(), 1.0, "a final stop puts PHP back at 1.0");
    agent.assert_no_panic();
}

/// Item 3a: the memory guard used to write `sample-rate` itself, beside the controller, and
/// `ebpf.sample_rate` kept showing the controller's own rate (1.0 while the file said 0.25).
/// The guard now sets a ceiling through the controller; status shows what the file says.
#[test]
fn ebpf_status_reports_the_rate_the_memory_guard_capped() {
    let Some(m) = TestMonitor::start(
        "ebpf_status_reports_the_rate_the_memory_guard_capped",
        |_| {},
    ) else {
        return;
    };
    // What the guard's `LowerSampleRate` step does.
    m.php.set_ceiling(0.25).unwrap();
    // A few polls: a calm interval must not raise it past the ceiling either.
    std::thread::sleep(Duration::from_millis(500));
    let file: f64 = std::fs::read_to_string(m.php.sample_rate_path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(file, 0.25);
    assert_eq!(m.status().sample_rate, file, "ebpf.sample_rate vs the file");
}
