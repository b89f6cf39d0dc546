//! The listener under agents that misbehave: empty batches, many streams on one connection,
//! health checks (see `docs/listener.md`, "Limits and hostile agents").

mod common;

use std::time::Duration;

use apm_proto::AckStatus;
use common::*;
use tokio_stream::wrappers::ReceiverStream;

/// An empty batch is answered REJECTED, not OK: acking it as stored would mark its seq as seen
/// with nothing in the file (and nothing for recovery to find after a restart).
#[tokio::test]
async fn empty_batch_is_rejected_and_its_seq_stays_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send(batch("e1", 1, 0)).await;
    let ack = s.next().await.expect("no error").expect("an ack");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Rejected), "{ack:?}");
    assert!(ack.message.contains("no profiles"), "{ack:?}");
    // The same seq with profiles is new data, stored.
    s.send_ok(batch("e1", 1, 2)).await;
    assert_eq!(ids(&read_lines(&out)), expected_ids("e1", &[1], 2));
    let stats = l.stats();
    assert_eq!((stats.rejected_batches, stats.batches_stored), (1, 1));
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

/// `grpc.health.v1.Health/Check` answers SERVING for the server and for the Collector service,
/// so load balancers and orchestrators can probe the listener without sending a batch.
#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let l = start(config(&out_path(&dir))).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", l.local_addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut h = HealthClient::new(channel);
    for service in ["", "bitville.apm.v1.Collector"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    l.shutdown().await.expect("clean shutdown");
}

/// One connection cannot open more than `max_concurrent_streams` (16 by default) streams at
/// once: the 17th waits until one of the others ends.
#[tokio::test]
async fn streams_per_connection_are_limited_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = start(config(&out_path(&dir))).await;
    let mut c = client(l.local_addr()).await;
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(
            AgentStream::open(&mut c)
                .await
                .expect("stream within the limit"),
        );
    }
    let mut c2 = c.clone();
    let (extra_tx, extra_rx) = tokio::sync::mpsc::channel(1);
    let mut extra = tokio::spawn(async move { c2.stream(ReceiverStream::new(extra_rx)).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut extra)
            .await
            .is_err(),
        "a 17th stream on one connection was opened"
    );
    drop(open.pop());
    let acks = tokio::time::timeout(TIMEOUT, extra)
        .await
        .expect("opens once a slot is free")
        .expect("join")
        .expect("stream");
    drop((acks, extra_tx, open));
    l.shutdown().await.expect("clean shutdown");
}
