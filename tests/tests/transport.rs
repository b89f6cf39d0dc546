//! The agent's transport options against the real listener: bearer token, TLS with a private CA,
//! gzip, and `/metrics` over HTTP; plus a spool that cannot fit its volume is a config error.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use apm_tests::common::{Agent, Listener, bin, in_ci, sender, sender_report, u};

fn send(agent: &Agent, prefix: &str, n: u64) {
    let r = sender_report(sender(&[
        "--socket".into(),
        agent.socket().display().to_string(),
        "--count".into(),
        n.to_string(),
        "--prefix".into(),
        prefix.into(),
    ]));
    assert_eq!(r["sent"].as_u64(), Some(n));
}

#[test]
fn bearer_token_is_required_and_sent() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--token", "s3cr3t"]);
    // Wrong token: nothing is stored, the agent keeps the profiles (breaker, spool), never drops.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let agent = Agent::start(
        &wrong,
        &listener.endpoint(),
        "off",
        "[central]\ntoken = \"nope\"\n[breaker]\nfailure_threshold = 2\n",
    );
    send(&agent, "w", 50);
    let st = agent.wait_for(Duration::from_secs(20), "breaker open", |s| {
        s["breaker"] == "open"
    });
    assert_eq!(u(&st, "/delivered"), 0);
    assert_eq!(u(&st, "/dropped/total"), 0);
    assert!(listener.stored().is_empty());
    drop(agent);
    // Right token, from a file: delivered.
    let right = dir.path().join("right");
    std::fs::create_dir_all(&right).unwrap();
    std::fs::write(right.join("token"), "s3cr3t\n").unwrap();
    let agent = Agent::start(
        &right,
        &listener.endpoint(),
        "off",
        &format!(
            "[central]\ntoken_file = \"{}\"\ncompression = \"gzip\"\n",
            right.join("token").display()
        ),
    );
    send(&agent, "r", 50);
    agent.wait_for(Duration::from_secs(20), "delivered", |s| {
        u(s, "/delivered") == 50
    });
    assert_eq!(listener.stored().len(), 50);
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn tls_with_a_private_ca() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(!in_ci(), "openssl is needed to make test certificates");
        eprintln!("skipped: no openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=apm-test-ca",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=listener.apm.test",
        ],
    );
    std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:listener.apm.test\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    std::fs::create_dir_all(d.join("agent")).unwrap();
    let listener = Listener::start(
        d,
        &[
            "--tls-cert",
            d.join("srv.pem").to_str().unwrap(),
            "--tls-key",
            d.join("srv.key").to_str().unwrap(),
        ],
    );
    let agent = Agent::start(
        &d.join("agent"),
        &format!("https://{}", listener.addr),
        "off",
        &format!(
            "[central]\ntls_ca_file = \"{}\"\ntls_domain = \"listener.apm.test\"\n",
            d.join("ca.pem").display()
        ),
    );
    send(&agent, "tls", 100);
    agent.wait_for(Duration::from_secs(20), "delivered over TLS", |s| {
        u(s, "/delivered") == 100
    });
    assert_eq!(listener.stored().len(), 100);
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = Agent::start(
        dir.path(),
        &listener.endpoint(),
        "off",
        &format!("[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    send(&agent, "m", 30);
    agent.wait_for(Duration::from_secs(20), "delivered", |s| {
        u(s, "/delivered") == 30
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(
        body.contains("apm_received_total{socket=\"dgram\"} 30"),
        "{body}"
    );
    assert!(body.contains("apm_delivered_total 30"), "{body}");
    assert!(body.contains("apm_rejected_total"), "{body}");
    assert!(body.contains("# EOF"), "{body}");
}

#[test]
fn a_spool_larger_than_its_volume_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Agent::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "off",
        "[spool]\nmax_bytes = 1125899906842624\n",
    );
    let o = Command::new(bin("apm-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("spool"), "{err}");
}
