//! Helpers for the listener's integration tests: an in-process listener on 127.0.0.1:0 and an
//! agent-like client built from the generated stubs.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apm_listener::{Listener, ListenerConfig};
use apm_proto::collector_client::CollectorClient;
use apm_proto::{Ack, AckStatus, Batch, Profile};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn config(out: &Path) -> ListenerConfig {
    let mut cfg = ListenerConfig::new("127.0.0.1:0".parse().expect("addr"), out.to_owned());
    cfg.stats_interval = Duration::ZERO;
    cfg
}

pub async fn start(cfg: ListenerConfig) -> Listener {
    Listener::start(cfg).await.expect("listener starts")
}

pub fn out_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("profiles.jsonl")
}

/// A batch whose profile payloads carry a unique id `agent/seq/i`.
pub fn batch(agent: &str, seq: u64, n: usize) -> Batch {
    Batch {
        agent_id: agent.into(),
        hostname: format!("host-of-{agent}"),
        seq,
        epoch: 0,
        profiles: (0..n)
            .map(|i| Profile {
                payload: Bytes::from(format!(
                    "{{\"id\":\"{agent}/{seq}/{i}\",\n\"pad\":\"{}\"}}",
                    "x".repeat(100)
                )),
                received_ns: 1_000 + i as u64,
                pid: 100 + i as u32,
                uid: 33,
                rss_bytes: 1 << 20,
            })
            .collect(),
        host_stats: None,
    }
}

pub async fn client(addr: SocketAddr) -> CollectorClient<Channel> {
    CollectorClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

/// One open `Stream` call: batches go in through `tx`, acks come out of `acks`.
pub struct AgentStream {
    pub tx: mpsc::Sender<Batch>,
    pub acks: Streaming<Ack>,
}

impl AgentStream {
    pub async fn open(client: &mut CollectorClient<Channel>) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(64);
        let acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, acks })
    }

    pub async fn send(&self, b: Batch) {
        self.tx.send(b).await.expect("stream open");
    }

    /// The next ack, or the stream's end/error.
    pub async fn next(&mut self) -> Result<Option<Ack>, Status> {
        tokio::time::timeout(TIMEOUT, self.acks.message())
            .await
            .expect("ack within the timeout")
    }

    /// Sends `b` and expects an OK ack for it.
    pub async fn send_ok(&mut self, b: Batch) {
        let seq = b.seq;
        self.send(b).await;
        let ack = self.next().await.expect("no error").expect("an ack");
        assert_eq!((ack.seq, ack.status()), (seq, AckStatus::Ok), "{ack:?}");
    }
}

/// Every line of the output file, parsed.
pub fn read_lines(path: &Path) -> Vec<Value> {
    let content = std::fs::read(path).expect("read output");
    assert!(
        content.is_empty() || content.ends_with(b"\n"),
        "file ends with a newline"
    );
    content
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("each line is JSON"))
        .collect()
}

/// The profile ids in file order.
pub fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["profile"]["id"].as_str().expect("profile.id").to_owned())
        .collect()
}

pub fn expected_ids(agent: &str, seqs: &[u64], n: usize) -> Vec<String> {
    seqs.iter()
        .flat_map(|s| (0..n).map(move |i| format!("{agent}/{s}/{i}")))
        .collect()
}

/// A client whose every request carries `authorization: <value>`.
pub async fn client_with_auth(
    addr: SocketAddr,
    value: &str,
) -> CollectorClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl tonic::service::Interceptor + Clone + use<>,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let header: tonic::metadata::MetadataValue<_> = value.parse().expect("header");
    CollectorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    })
}
