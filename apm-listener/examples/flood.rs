//! Load generator for the listener: one agent-like stream sending batches of fixed-size JSON
//! profiles with a bounded in-flight window, printing the acked rate.
//!
//! `cargo run --release -p apm-listener --example flood -- ADDR [PROFILES] [BATCH] [SIZE] [zstd|none]`

use std::time::Instant;

use apm_proto::collector_client::CollectorClient;
use apm_proto::{AckStatus, Batch, Profile};
use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;

const WINDOW: u64 = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_owned());
    let addr = arg(0, "127.0.0.1:7421");
    let total: u64 = arg(1, "1000000").parse()?;
    let batch_len: u64 = arg(2, "1000").parse()?;
    let size: usize = arg(3, "1024").parse()?;
    let zstd = arg(4, "none") == "zstd";

    let mut client = CollectorClient::connect(format!("http://{addr}")).await?;
    if zstd {
        client = client.send_compressed(CompressionEncoding::Zstd);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW as usize);
    let mut acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let run = std::process::id();
    let make = move |seq: u64| Batch {
        agent_id: format!("flood-{run}"),
        hostname: "flood".into(),
        seq,
        epoch: 1,
        profiles: (0..batch_len)
            .map(|i| {
                let head = format!("{{\"id\":\"{seq}/{i}\",\"pad\":\"");
                let pad = size.saturating_sub(head.len() + 2);
                Profile {
                    payload: Bytes::from(format!("{head}{}\"}}", "x".repeat(pad))),
                    received_ns: 1,
                    pid: 1,
                    uid: 1,
                    rss_bytes: 0,
                }
            })
            .collect(),
        host_stats: None,
    };
    let batches = total.div_ceil(batch_len);
    // Batches are prepared up front so that the generator's own cost is not measured.
    let prepared: Vec<Batch> = (1..=batches).map(make).collect();
    let t = Instant::now();
    let sender = tokio::spawn(async move {
        for b in prepared {
            if tx.send(b).await.is_err() {
                break;
            }
        }
        tx
    });
    let mut acked = 0;
    while acked < batches {
        let ack = acks
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        anyhow::ensure!(ack.status() == AckStatus::Ok, "ack {ack:?}");
        acked += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    drop(sender.await?);
    println!(
        "{} profiles of {size} B in {secs:.2} s: {:.0} profiles/s, {:.0} MB/s",
        batches * batch_len,
        (batches * batch_len) as f64 / secs,
        (batches * batch_len) as f64 * size as f64 / secs / 1e6
    );
    Ok(())
}
