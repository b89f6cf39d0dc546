//! The `apm-listener` binary as a process: ready line with the real port, SIGTERM exits 0 after
//! its writes, TLS with a certificate made by `openssl`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apm_proto::AckStatus;
use common::*;

/// Kills the child if the test ends early.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and waits for its ready line; returns the bound address.
fn spawn(args: &[&str]) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_apm-listener"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn apm-listener");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    let addr = line
        .trim()
        .strip_prefix("apm-listener listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .parse()
        .expect("address");
    (proc, addr)
}

fn sigterm_and_wait(mut p: Proc) -> std::process::ExitStatus {
    let pid = p.0.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    for _ in 0..200 {
        if let Some(status) = p.0.try_wait().expect("wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("apm-listener did not exit within 10 s of SIGTERM");
}

#[tokio::test]
async fn binary_prints_real_port_stores_and_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let out_s = out.to_str().expect("utf8 path");
    let (p, addr) = spawn(&["--listen", "127.0.0.1:0", "--out", out_s, "--fsync"]);
    assert_ne!(addr.port(), 0);
    let mut c = client(addr).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    for seq in 1..=3 {
        s.send_ok(batch("bin", seq, 4)).await;
    }
    // An open stream must not keep the process alive after SIGTERM.
    let status = tokio::task::spawn_blocking(move || sigterm_and_wait(p))
        .await
        .expect("join");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(ids(&read_lines(&out)), expected_ids("bin", &[1, 2, 3], 4));

    // Restarted on the same file with fault injection: the dedup state survives the process.
    let (p, addr) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out_s,
        "--drop-before-ack",
        "1",
    ]);
    let mut c = client(addr).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("bin", 2, 4)).await; // duplicate: not stored, so not the "1st stored"
    s.send(batch("bin", 4, 4)).await;
    let err = s.next().await.expect_err("dropped before ack");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("bin", 4, 4)).await;
    drop(s);
    let status = tokio::task::spawn_blocking(move || sigterm_and_wait(p))
        .await
        .expect("join");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        ids(&read_lines(&out)),
        expected_ids("bin", &[1, 2, 3, 4], 4)
    );
}

#[test]
fn bad_arguments_and_files_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_apm-listener"))
            .args(args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run");
        (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (st, err) = run(&["--listen", "127.0.0.1:0"]);
    assert!(!st.success());
    assert!(err.contains("--out"), "{err}");
    let missing_dir = dir.path().join("no/such/dir/out.jsonl");
    let (st, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        missing_dir.to_str().expect("utf8"),
    ]);
    assert!(!st.success());
    assert!(err.contains("cannot open output file"), "{err}");
    let out = dir.path().join("o.jsonl");
    let (st, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().expect("utf8"),
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.key",
    ]);
    assert!(!st.success());
    assert!(
        err.contains("cannot read TLS certificate /nonexistent.pem"),
        "{err}"
    );
}

/// A CA and a server certificate for `localhost` signed by it (rustls refuses a self-signed CA
/// certificate used as the server's own).
fn make_certs(dir: &Path) {
    let sh = format!(
        "set -e; cd '{}'
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=apm-test-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile ext -out server.pem 2>/dev/null",
        dir.display()
    );
    let st = Command::new("sh")
        .args(["-c", &sh])
        .status()
        .expect("openssl (needed by this test) must be installed");
    assert!(
        st.success(),
        "generating test certificates with openssl failed"
    );
}

#[tokio::test]
async fn tls_listener_accepts_a_verifying_client_and_refuses_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let out = out_path(&dir);
    let mut cfg = config(&out);
    cfg.tls = Some(apm_listener::TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
    });
    cfg.token = Some("t0k".into());
    let l = start(cfg).await;
    let addr = l.local_addr();

    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect()
            .await
            .expect("TLS connect");
    let mut c = apm_proto::collector_client::CollectorClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer t0k".parse().expect("header"));
            Ok(req)
        },
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = c
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream over TLS")
        .into_inner();
    tx.send(batch("tls", 1, 2)).await.expect("send");
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!(ack.status(), AckStatus::Ok);
    assert_eq!(ids(&read_lines(&out)), expected_ids("tls", &[1], 2));

    // A plaintext client gets nowhere.
    let plain = async {
        let mut c = apm_proto::collector_client::CollectorClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| e.to_string())?;
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        c.stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), plain).await;
    assert!(
        !matches!(r, Ok(Ok(()))),
        "plaintext stream accepted by a TLS listener"
    );
    drop((tx, acks));
    l.shutdown().await.expect("clean shutdown");
}
