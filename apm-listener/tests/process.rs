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

/// `--tokens-file` binds each token to one agent id: a holder of agent-a's token cannot store
/// (or poison the dedup state of) agent-b's seqs, and a token that is not in the file is refused.
#[tokio::test]
async fn tokens_file_binds_each_token_to_its_agent_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# agent_id token\nagent-a tok-a\n\nagent-b   tok-b\n",
    )
    .expect("tokens file");
    let (p, addr) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().expect("utf8"),
        "--tokens-file",
        tokens.to_str().expect("utf8"),
    ]);

    let mut a = client_with_auth(addr, "Bearer tok-a").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = a
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("agent-a's token is accepted")
        .into_inner();
    tx.send(batch("agent-a", 1, 1)).await.expect("send");
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Ok), "{ack:?}");
    // agent-a's token sending for agent-b: refused, nothing stored, agent-b's seq 1 stays free.
    tx.send(batch("agent-b", 1, 1)).await.expect("send");
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Rejected), "{ack:?}");
    assert!(ack.message.contains("agent-b"), "{ack:?}");
    drop((tx, acks));

    let mut b = client_with_auth(addr, "Bearer tok-b").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = b
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("agent-b's token is accepted")
        .into_inner();
    tx.send(batch("agent-b", 1, 2)).await.expect("send");
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Ok), "{ack:?}");
    drop((tx, acks));

    for wrong in ["Bearer tok-c", "Bearer agent-a", "Bearer tok-a tok-b"] {
        let mut c = client_with_auth(addr, wrong).await;
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let err = c
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .err()
            .unwrap_or_else(|| panic!("{wrong:?} accepted"));
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong}");
    }
    let mut plain = client(addr).await;
    let err = AgentStream::open(&mut plain).await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let status = tokio::task::spawn_blocking(move || sigterm_and_wait(p))
        .await
        .expect("join");
    assert_eq!(status.code(), Some(0));
    let mut stored = ids(&read_lines(&out));
    stored.sort();
    let mut expected = expected_ids("agent-a", &[1], 1);
    expected.extend(expected_ids("agent-b", &[1], 2));
    assert_eq!(stored, expected);
}

/// A bad tokens file stops the listener at start with the file and line named.
#[test]
fn bad_tokens_file_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "agent-a tok-a\nagent-b\n").expect("tokens file");
    let out = dir.path().join("o.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_apm-listener"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--out",
            out.to_str().expect("utf8"),
            "--tokens-file",
            tokens.to_str().expect("utf8"),
        ])
        .env("RUST_LOG", "off")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("{}:2", tokens.display())),
        "names file and line: {err}"
    );
}

/// `--max-connections N`: a connection beyond N is closed at once (the agent backs off and
/// retries); once one ends, a new one is served.
#[tokio::test]
async fn max_connections_closes_connections_beyond_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let (p, addr) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().expect("utf8"),
        "--max-connections",
        "2",
    ]);
    let mut c1 = client(addr).await;
    let mut s1 = AgentStream::open(&mut c1).await.expect("1st connection");
    s1.send_ok(batch("m", 1, 1)).await;
    let mut c2 = client(addr).await;
    let mut s2 = AgentStream::open(&mut c2).await.expect("2nd connection");
    s2.send_ok(batch("m", 2, 1)).await;
    let third = tokio::time::timeout(TIMEOUT, async {
        let mut c3 = CollectorClientAny::connect(addr).await?;
        c3.open().await
    })
    .await
    .expect("the 3rd connection is answered at once, not left hanging");
    assert!(third.is_err(), "a 3rd connection was served");
    drop((s1, c1));
    let mut served = false;
    for _ in 0..100 {
        if let Ok(mut c) = CollectorClientAny::connect(addr).await
            && c.open().await.is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a connection was not served after one ended");
    drop((s2, c2));
    let status = tokio::task::spawn_blocking(move || sigterm_and_wait(p))
        .await
        .expect("join");
    assert_eq!(status.code(), Some(0));
}

/// A connection attempt whose failure is a value (connect or stream open), not a panic.
struct CollectorClientAny(apm_proto::collector_client::CollectorClient<tonic::transport::Channel>);

impl CollectorClientAny {
    async fn connect(addr: SocketAddr) -> Result<Self, String> {
        apm_proto::collector_client::CollectorClient::connect(format!("http://{addr}"))
            .await
            .map(Self)
            .map_err(|e| e.to_string())
    }

    async fn open(&mut self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut acks = self
            .0
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        // Proven served only by an ack: a stored (or duplicate) batch.
        tx.send(batch("probe", 1, 1))
            .await
            .map_err(|e| e.to_string())?;
        match acks.message().await {
            Ok(Some(ack)) if ack.status() == AckStatus::Ok => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }
}

/// `--max-message-bytes N`: a batch larger than N (decoded) ends the stream with
/// RESOURCE_EXHAUSTED or OUT_OF_RANGE and is not stored; smaller ones are.
#[tokio::test]
async fn max_message_bytes_refuses_a_larger_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let (p, addr) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().expect("utf8"),
        "--max-message-bytes",
        "4096",
    ]);
    let mut c = client(addr).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("mm", 1, 2)).await;
    s.send(batch("mm", 2, 100)).await;
    let err = s.next().await.expect_err("too large");
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    let status = tokio::task::spawn_blocking(move || sigterm_and_wait(p))
        .await
        .expect("join");
    assert_eq!(status.code(), Some(0));
    assert_eq!(ids(&read_lines(&out)), expected_ids("mm", &[1], 2));
}

/// The fault-injection flags work but are not in `--help`: an operator reading the help of a
/// production listener is not offered a way to drop acks.
#[test]
fn fault_injection_flags_are_hidden_from_help_but_work() {
    let o = Command::new(env!("CARGO_BIN_EXE_apm-listener"))
        .arg("--help")
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && help.contains("--out"), "{help}");
    for hidden in [
        "--fail-first",
        "--drop-before-ack",
        "--ack-delay",
        "Fault injection",
    ] {
        assert!(!help.contains(hidden), "{hidden} shown in --help:\n{help}");
    }
    for shown in [
        "--tokens-file",
        "--max-connections",
        "--max-concurrent-streams",
        "--max-message-bytes",
        "--max-agents",
        "--max-seq-ranges",
    ] {
        assert!(help.contains(shown), "{shown} missing from --help:\n{help}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let (p, _addr) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().expect("utf8"),
        "--fail-first",
        "1",
        "--ack-delay",
        "1",
        "--drop-before-ack",
        "2",
    ]);
    drop(p);
}
