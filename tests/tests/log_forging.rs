//! Privileged: a process can name itself anything (prctl PR_SET_NAME). A PHP process whose name
//! holds a newline must not forge a line in the agent's log, nor a raw control character in its
//! status. Runs as root (CI); fails in CI when eBPF cannot load, skips with a reason elsewhere.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apm_tests::ebpf::{Sender, TestMonitor};

/// The formatted log lines of this test binary (its only test installs the global subscriber).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn process_named_with_a_newline_is_logged_and_reported_escaped() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let name = "php\nFORGED x";
    let Some(m) = TestMonitor::start(
        "process_named_with_a_newline_is_logged_and_reported_escaped",
        |c| c.php_comms = vec![name.into()],
    ) else {
        return;
    };
    let child = Sender::spawn(name);
    let pid = child.pid();
    child.alloc(8);
    m.wait_for(Duration::from_secs(10), "the worker to be tracked", |s| {
        s.workers.iter().any(|w| w.pid == pid)
    });
    child.quit();
    let s = m.wait_for(Duration::from_secs(10), "the exit event", |s| {
        s.recent_exits.iter().any(|e| e.pid == pid)
    });
    let exit = s
        .recent_exits
        .iter()
        .find(|e| e.pid == pid)
        .expect("found above");
    assert_eq!(exit.comm, "php\\nFORGED x", "{exit:?}");
    assert_eq!(exit.pool, "php\\nFORGED x", "{exit:?}");

    let log = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf8");
    let exited: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PHP process exited") && l.contains(&format!("pid={pid}")))
        .collect();
    assert_eq!(exited.len(), 1, "one exit line for {pid}:\n{log}");
    assert!(
        exited[0].contains("comm=php\\nFORGED x"),
        "comm not escaped: {}",
        exited[0]
    );
    assert!(
        log.lines().all(|l| !l.starts_with("FORGED")),
        "a forged line:\n{log}"
    );
}
