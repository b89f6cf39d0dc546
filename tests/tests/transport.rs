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

/// `check-config` prints the effective configuration without the bearer token, and a token or
/// TLS settings over plain `http://` to a host that is not loopback are a configuration error
/// (exit 78) naming the key: the token would cross the network in clear text.
#[test]
fn check_config_redacts_the_token_and_refuses_it_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let o = Command::new(bin("apm-agent"))
            .args(["--config", path.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(
        "loopback.toml",
        "[central]\nendpoint = \"http://127.0.0.1:7421\"\ntoken = \"s3cr3t-value\"\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains("s3cr3t-value"), "token printed:\n{out}");
    assert!(out.contains("token = \"<redacted>\""), "{out}");

    for (key, line) in [
        ("central.token", "token = \"s3cr3t-value\""),
        ("central.token_file", "token_file = \"/etc/apm/token\""),
        ("central.tls_ca_file", "tls_ca_file = \"/etc/apm/ca.pem\""),
    ] {
        let (code, out, err) = check(
            "remote.toml",
            &format!("[central]\nendpoint = \"http://10.1.2.3:7421\"\n{line}\n"),
        );
        assert_eq!(code, Some(78), "{key}: {out}{err}");
        assert!(
            err.contains(key) && err.contains("https://"),
            "{key}: {err}"
        );
        assert!(!err.contains("s3cr3t-value"), "{err}");
    }
}

/// A token file or a config file holding a token that every local user can read is warned
/// about at start and listed in `status --json` (`secrets_readable_by_others`); files that
/// only their owner (and group) can read are not.
#[test]
fn secret_files_readable_by_others_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start(dir.path(), &["--token", "s3cr3t"]);
    for (name, mode, listed) in [("open", 0o644, true), ("closed", 0o640, false)] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let token = d.join("token");
        std::fs::write(&token, "s3cr3t\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let config = Agent::write_config(
            &d,
            &listener.endpoint(),
            "off",
            &format!("[central]\ntoken_file = \"{}\"\n", token.display()),
        );
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
        let agent = Agent::start_with(&d, &config);
        let st = agent.status().expect("status");
        let found: Vec<String> = st["secrets_readable_by_others"]
            .as_array()
            .unwrap_or_else(|| panic!("status has secrets_readable_by_others: {st}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let expected = if listed {
            vec![format!("central.token_file {}", token.display())]
        } else {
            Vec::new()
        };
        assert_eq!(found, expected, "{name}");
        // The config file itself holds no token here, so it is not listed even when open.
    }
    // A token written in a config file that everyone can read is listed as the config file.
    let d = dir.path().join("inline");
    std::fs::create_dir_all(&d).unwrap();
    let config = Agent::write_config(
        &d,
        &listener.endpoint(),
        "off",
        "[central]\ntoken = \"s3cr3t\"\n",
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let agent = Agent::start_with(&d, &config);
    let st = agent.status().expect("status");
    assert_eq!(
        st["secrets_readable_by_others"],
        serde_json::json!([format!("central.token {}", config.display())]),
        "{st}"
    );
}

/// `central.token_file` is re-read on reload: a rotated token is used from the next stream on,
/// without a restart. The listener only knows the new token (bound to this agent's id), so
/// nothing is delivered before the reload and everything after it.
#[test]
fn token_file_is_re_read_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("listener-tokens");
    std::fs::write(&tokens, "rotating-agent new-token\n").unwrap();
    let listener = Listener::start(dir.path(), &["--tokens-file", tokens.to_str().unwrap()]);
    let d = dir.path().join("agent");
    std::fs::create_dir_all(&d).unwrap();
    let token = d.join("token");
    std::fs::write(&token, "old-token\n").unwrap();
    let agent = Agent::start(
        &d,
        &listener.endpoint(),
        "off",
        &format!(
            "[central]\nagent_id = \"rotating-agent\"\ntoken_file = \"{}\"\n\
             [breaker]\nfailure_threshold = 2\nretry_timeout = \"200ms\"\nmax_retry_timeout = \"500ms\"\n",
            token.display()
        ),
    );
    send(&agent, "before", 20);
    agent.wait_for(Duration::from_secs(20), "the old token refused", |s| {
        s["breaker"] != "closed" && u(s, "/send_failures") >= 2
    });
    assert!(listener.stored().is_empty());

    std::fs::write(&token, "new-token\n").unwrap();
    let out = agent.cli(&["reload"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("central.token_file"), "{said}");
    send(&agent, "after", 20);
    agent.wait_for(
        Duration::from_secs(30),
        "delivered with the new token",
        |s| u(s, "/delivered") == 40,
    );
    assert_eq!(listener.stored().len(), 40);

    // A token file that cannot be read refuses the reload and keeps the token in use.
    std::fs::remove_file(&token).unwrap();
    let out = agent.cli(&["reload"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("reload refused") && said.contains("central.token_file"),
        "{said}"
    );
    send(&agent, "kept", 10);
    agent.wait_for(
        Duration::from_secs(30),
        "delivered with the kept token",
        |s| u(s, "/delivered") == 50,
    );
    assert_eq!(listener.stored().len(), 50);
    assert_eq!(u(&agent.status().unwrap(), "/dropped/total"), 0);
}
