//! Privileged: a real PHP CLI process (Debian's php8.2-cli) sending to the agent's socket is
//! counted exactly as PHP itself saw it. Fails in CI when eBPF or php cannot run.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use apm_agent::monitor::{EbpfStatus, ExitStatus};
use apm_tests::ebpf::{TestMonitor, drain};

fn php() -> Option<std::path::PathBuf> {
    let p = apm_tests::php::php_cli();
    if p.is_none() {
        assert!(std::env::var_os("CI").is_none(), "php CLI missing in CI");
        eprintln!("SKIPPED: no php CLI on PATH");
    }
    p
}

fn exit_of(s: &EbpfStatus, pid: u32) -> Option<&ExitStatus> {
    s.recent_exits.iter().find(|e| e.pid == pid)
}

#[test]
fn ebpf_php_socket_sendto_is_counted_like_php_saw_it() {
    let Some(m) = TestMonitor::start("ebpf_php_socket_sendto_is_counted_like_php_saw_it", |_| {})
    else {
        return;
    };
    let Some(php) = php() else { return };
    // Nobody reads: the first sends fill the queue, the rest fail with EAGAIN.
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let script = r"
        $s = socket_create(AF_UNIX, SOCK_DGRAM, 0);
        $ok = 0; $bytes = 0; $eagain = 0; $other = 0;
        for ($i = 0; $i < 50; $i++) {
            $r = @socket_sendto($s, str_repeat('x', 100 + $i), 100 + $i, MSG_DONTWAIT, $argv[1]);
            if ($r === false) {
                if (socket_last_error($s) === SOCKET_EAGAIN) { $eagain++; } else { $other++; }
            } else { $ok++; $bytes += $r; }
        }
        echo json_encode(['ok' => $ok, 'bytes' => $bytes, 'eagain' => $eagain, 'other' => $other]);
    ";
    let out = Command::new(&php)
        .args(["-r", script])
        .arg(&m.dgram)
        .output()
        .expect("run php")
        .stdout;
    let seen: serde_json::Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("php said {:?}: {e}", String::from_utf8_lossy(&out)));
    let ok = seen["ok"].as_u64().unwrap();
    let eagain = seen["eagain"].as_u64().unwrap();
    assert!(ok > 0 && eagain > 0, "{seen}");
    assert_eq!(seen["other"], 0);
    let (n, b) = drain(&rx);
    assert_eq!(
        (n, b),
        (ok, seen["bytes"].as_u64().unwrap()),
        "receiver ground truth"
    );
    m.agent_received(n);

    // PHP exits right away: its figures arrive with its exit event.
    let s = m.wait_for(Duration::from_secs(10), "php's exit event", |s| {
        s.recent_exits.iter().any(|e| e.sends_ok > 0)
    });
    let e = s.recent_exits.iter().find(|e| e.sends_ok > 0).unwrap();
    assert!(e.comm.starts_with("php"), "{e:?}");
    assert_eq!(e.sends_ok, ok);
    assert_eq!(e.bytes, b);
    assert_eq!(e.sends_failed.eagain, eagain);
    assert_eq!(e.sends_failed.total(), eagain);
    assert_eq!(s.sends_ok, ok);
    assert_eq!(s.sends_failed.eagain, eagain);
}

#[test]
fn ebpf_php_listener_profile_is_counted() {
    let Some(m) = TestMonitor::start("ebpf_php_listener_profile_is_counted", |_| {}) else {
        return;
    };
    let Some(php) = php() else { return };
    let listener = apm_tests::php::listener_php();
    assert!(listener.is_file(), "{} missing", listener.display());
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    // auto_prepend_file applies to script files, not to `php -r`.
    let script = m.dir.path().join("request.php");
    std::fs::write(&script, "<?php usleep(2000); echo 'done';").unwrap();
    let out = Command::new(&php)
        .arg("-d")
        .arg(format!("auto_prepend_file={}", listener.display()))
        .arg(&script)
        .env("APM_SOCKET", &m.dgram)
        .env("APM_STREAM_SOCKET", &m.stream)
        .env("APM_RUNTIME_DIR", m.dir.path())
        .output()
        .expect("run php");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("done"), "{said}");
    let (n, b) = drain(&rx);
    assert!(
        n >= 1,
        "listener.php sent no datagram (sample-rate file at {})",
        m.dir.path().display()
    );
    m.agent_received(n);
    let s = m.wait_for(Duration::from_secs(10), "php's exit event", |s| {
        s.recent_exits.iter().any(|e| e.sends_ok > 0)
    });
    let e = s.recent_exits.iter().find(|e| e.sends_ok > 0).unwrap();
    assert_eq!((e.sends_ok, e.bytes), (n, b), "{e:?}");
    assert_eq!(e.sends_failed.total(), 0);
    assert!(exit_of(&s, e.pid).is_some());
    let s = m.wait_for(Duration::from_secs(5), "the agent to agree", |s| {
        s.unaccounted == 0
    });
    assert!(!s.unaccounted_alarm);
}
