//! The agent's end of `cargo xtask bench --only compare`: a gRPC `Collector` that counts unique
//! profile ids and acks every batch once counted, nothing else. It is to the agent what the TCP
//! sink is to syslog-ng and the counting thread is to the bare socket sink: the same work on
//! every path (read, find the id, count it), so the table compares forwarders, not the cost of
//! what stores their output (the performance issue: "same sink counting unique ids"). The
//! reference listener, which validates and stores every profile, has its own row there.
//!
//! apm-bench-sink COUNT_FILE
//!
//! Prints `listening on ADDR` once serving on a free loopback port. Accepts zstd and gzip (the
//! agent compresses with zstd by default) and answers `grpc.health.v1` as the listener does.
//! Every 20 ms, `COUNT_FILE` is replaced (write, rename) by one line: unique ids, payloads
//! without a bench id, batches. An id is the 20 digits after `{"id":"b-` at the start of a payload
//! (the bench's profiles); ids are counted in a sparse bitset, so windows that use disjoint id
//! ranges are counted apart by difference.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apm_proto::collector_server::{Collector, CollectorServer};
use apm_proto::{Ack, AckStatus, Batch};
use apm_testkit::bench_id;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

/// Ids per bitset chunk (a chunk is 8 KiB).
const CHUNK: u64 = 1 << 16;

/// The bench id at the start of `payload`, if it has one.
fn id_of(payload: &[u8]) -> Option<u64> {
    bench_id::parse(payload.strip_prefix(bench_id::HEAD)?)
}

/// Unique ids, in chunks allocated on first use (bench windows use far-apart id ranges).
#[derive(Default)]
struct Counts {
    chunks: HashMap<u64, Box<[u64]>>,
    unique: u64,
    foreign: u64,
    batches: u64,
}

impl Counts {
    fn add(&mut self, payload: &[u8]) {
        let Some(id) = id_of(payload) else {
            self.foreign += 1;
            return;
        };
        let chunk = self
            .chunks
            .entry(id / CHUNK)
            .or_insert_with(|| vec![0u64; (CHUNK / 64) as usize].into_boxed_slice());
        let bit = id % CHUNK;
        let (w, b) = ((bit / 64) as usize, bit % 64);
        if chunk[w] & (1 << b) == 0 {
            chunk[w] |= 1 << b;
            self.unique += 1;
        }
    }
}

struct Sink(Arc<Mutex<Counts>>);

#[tonic::async_trait]
impl Collector for Sink {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<Batch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let counts = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(b)) = inbound.message().await {
                {
                    let mut c = counts.lock().expect("counts");
                    for p in &b.profiles {
                        c.add(&p.payload);
                    }
                    c.batches += 1;
                }
                let ack = Ack {
                    seq: b.seq,
                    status: AckStatus::Ok as i32,
                    message: String::new(),
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn main() -> anyhow::Result<()> {
    let count_file = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("usage: apm-bench-sink COUNT_FILE"))?,
    );
    // One worker, as the agent has: the sink should take as little of the machine as it can.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let counts = Arc::new(Mutex::new(Counts::default()));
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<CollectorServer<Sink>>().await;
        let svc = CollectorServer::new(Sink(counts.clone()))
            .accept_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(64 << 20);
        println!("listening on {}", listener.local_addr()?);
        let tmp = count_file.with_extension("tmp");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let line = {
                    let c = counts.lock().expect("counts");
                    format!("{} {} {}\n", c.unique, c.foreign, c.batches)
                };
                if std::fs::write(&tmp, line).is_ok() {
                    let _ = std::fs::rename(&tmp, &count_file);
                }
            }
        });
        // The same HTTP/2 windows as apm-listener: a round trip per 64 KiB would cap the rate.
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(health_svc)
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await?;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_unique_bench_ids_and_apart_the_rest() {
        let p = |id: u64| format!("{{\"id\":\"b-{id:020}\",\"pad\":\"\"}}").into_bytes();
        let mut c = Counts::default();
        for id in [0, 5, 5, 1 << 40, (1 << 40) + 1, 0] {
            c.add(&p(id));
        }
        c.add(br#"{"id":"x-1"}"#);
        c.add(b"{\"id\":\"b-123\"}");
        assert_eq!((c.unique, c.foreign), (4, 2));
    }
}
