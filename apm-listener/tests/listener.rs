//! In-process integration tests: a real listener on 127.0.0.1:0, a real gRPC client.

mod common;

use std::time::{Duration, Instant};

use apm_proto::AckStatus;
use common::*;
use tonic::Code;
use tonic::codec::CompressionEncoding;

#[tokio::test]
async fn stores_each_profile_with_its_envelope_and_acks_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    // Pipelined: all sent before reading any ack.
    for seq in 1..=5 {
        s.send(batch("a1", seq, 3)).await;
    }
    for seq in 1..=5 {
        let ack = s.next().await.expect("ok").expect("ack");
        assert_eq!((ack.seq, ack.status()), (seq, AckStatus::Ok));
    }
    let lines = read_lines(&out);
    assert_eq!(ids(&lines), expected_ids("a1", &[1, 2, 3, 4, 5], 3));
    let first = &lines[0];
    assert_eq!(first["agent_id"], "a1");
    assert_eq!(first["hostname"], "host-of-a1");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["received_ns"], 1000);
    assert_eq!(first["pid"], 100);
    assert_eq!(first["uid"], 33);
    assert_eq!(first["rss_bytes"], 1 << 20);
    assert_eq!(first["batch_len"], 3);
    assert_eq!(first["batch_index"], 0);
    assert_eq!(lines[2]["batch_index"], 2);
    // The payload's raw newline became a space: still the same JSON value.
    assert_eq!(first["profile"]["pad"], "x".repeat(100));

    drop(s);
    let stats = l.shutdown().await.expect("clean shutdown");
    assert_eq!((stats.batches_stored, stats.profiles_stored), (5, 15));
    assert_eq!(stats.duplicate_batches, 0);
}

#[tokio::test]
async fn duplicate_seq_is_acked_but_stored_once_even_out_of_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    for seq in [5, 6, 1, 5, 2, 6, 1] {
        s.send_ok(batch("a1", seq, 2)).await;
    }
    // Another agent's seq 5 is not a duplicate of a1's.
    s.send_ok(batch("a2", 5, 2)).await;
    // Same seq on a second connection: still a duplicate.
    let mut s2 = AgentStream::open(&mut c).await.expect("stream 2");
    s2.send_ok(batch("a1", 2, 2)).await;

    let mut got = ids(&read_lines(&out));
    got.sort();
    let mut want = expected_ids("a1", &[1, 2, 5, 6], 2);
    want.extend(expected_ids("a2", &[5], 2));
    want.sort();
    assert_eq!(got, want);
    let stats = l.stats();
    assert_eq!(stats.duplicate_batches, 4);
    assert_eq!(stats.duplicate_profiles, 8);
    assert_eq!(stats.batches_stored, 5);
    drop((s, s2));
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn restart_on_the_same_file_keeps_dedup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    for seq in [1, 2, 3, 10] {
        s.send_ok(batch("a1", seq, 2)).await;
    }
    drop((s, c));
    l.shutdown().await.expect("clean shutdown");

    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    for seq in [3, 4, 10, 1] {
        s.send_ok(batch("a1", seq, 2)).await;
    }
    let stats = l.stats();
    assert_eq!((stats.duplicate_batches, stats.batches_stored), (3, 1));
    assert_eq!(
        ids(&read_lines(&out)),
        expected_ids("a1", &[1, 2, 3, 10, 4], 2)
    );
    drop((s, c));
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn torn_tail_is_cut_at_start_and_the_resend_is_stored_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("a1", 1, 3)).await;
    s.send_ok(batch("a1", 2, 3)).await;
    drop((s, c));
    l.shutdown().await.expect("clean shutdown");

    // Simulate a crash in the middle of writing batch 2: one line and a half of it remain.
    let content = std::fs::read(&out).expect("read");
    let line_ends: Vec<usize> = content
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    let batch1_end = line_ends[2];
    std::fs::write(&out, &content[..line_ends[3] + 20]).expect("tear");

    let l = start(config(&out)).await;
    assert_eq!(
        std::fs::metadata(&out).expect("meta").len(),
        batch1_end as u64
    );
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("a1", 1, 3)).await; // stored before: duplicate
    s.send_ok(batch("a1", 2, 3)).await; // torn: stored again, whole
    assert_eq!(ids(&read_lines(&out)), expected_ids("a1", &[1, 2], 3));
    assert_eq!(l.stats().duplicate_batches, 1);
    drop((s, c));
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let mut cfg = config(&out);
    cfg.token = Some("s3cret".into());
    let l = start(cfg).await;
    let addr = l.local_addr();

    let mut plain = client(addr).await;
    let err = AgentStream::open(&mut plain).await.err().expect("refused");
    assert_eq!(err.code(), Code::Unauthenticated);

    for value in ["Bearer wrong", "Bearer s3cret2", "s3cret", "Bearer s3cre"] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connects");
        let header: tonic::metadata::MetadataValue<_> = value.parse().expect("header");
        let mut c = apm_proto::collector_client::CollectorClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let err = c
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .err()
            .unwrap_or_else(|| panic!("{value:?} accepted"));
        assert_eq!(err.code(), Code::Unauthenticated, "{value}");
    }

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut c = apm_proto::collector_client::CollectorClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer s3cret".parse().expect("header"));
            Ok(req)
        },
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = c
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("accepted")
        .into_inner();
    tx.send(batch("a1", 1, 1)).await.expect("send");
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!(ack.status(), AckStatus::Ok);
    assert_eq!(ids(&read_lines(&out)), expected_ids("a1", &[1], 1));
    assert_eq!(l.stats().unauthenticated, 5);
    drop((tx, acks));
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn drop_before_ack_stores_then_drops_once_and_the_resend_is_deduplicated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let mut cfg = config(&out);
    cfg.faults.drop_before_ack = Some(2);
    let l = start(cfg).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send(batch("a1", 1, 2)).await;
    s.send(batch("a1", 2, 2)).await;
    let ack = s.next().await.expect("first ack").expect("ack");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Ok));
    let err = s
        .next()
        .await
        .expect_err("stream dropped instead of acking seq 2");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Batch 2 was stored before the drop.
    assert_eq!(ids(&read_lines(&out)), expected_ids("a1", &[1, 2], 2));

    // The agent reconnects and resends: deduplicated, acked; no second drop.
    let mut s = AgentStream::open(&mut c).await.expect("stream again");
    for seq in [2, 3, 4] {
        s.send_ok(batch("a1", seq, 2)).await;
    }
    assert_eq!(ids(&read_lines(&out)), expected_ids("a1", &[1, 2, 3, 4], 2));
    assert_eq!(l.stats().duplicate_batches, 1);
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn fail_first_answers_retry_without_storing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let mut cfg = config(&out);
    cfg.faults.fail_first = 2;
    let l = start(cfg).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    for _ in 0..2 {
        s.send(batch("a1", 1, 1)).await;
        let ack = s.next().await.expect("ok").expect("ack");
        assert_eq!((ack.seq, ack.status()), (1, AckStatus::Retry));
        assert!(ack.message.contains("fail-first"), "{}", ack.message);
    }
    assert!(read_lines(&out).is_empty());
    s.send_ok(batch("a1", 1, 1)).await;
    assert_eq!(ids(&read_lines(&out)), expected_ids("a1", &[1], 1));
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn ack_delay_delays_each_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let mut cfg = config(&out);
    cfg.faults.ack_delay = Duration::from_millis(300);
    let l = start(cfg).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    let t = Instant::now();
    s.send_ok(batch("a1", 1, 1)).await;
    let elapsed = t.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    // Stored before the (delayed) ack.
    assert_eq!(read_lines(&out).len(), 1);
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn zstd_and_gzip_clients_and_large_batches_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    for (agent, enc) in [
        ("zstd", CompressionEncoding::Zstd),
        ("gzip", CompressionEncoding::Gzip),
    ] {
        let mut c = client(l.local_addr()).await.send_compressed(enc);
        let mut s = AgentStream::open(&mut c).await.expect("stream");
        s.send_ok(batch(agent, 1, 10)).await;
    }
    // 12 MiB uncompressed: over tonic's default 4 MiB limit.
    let mut c = client(l.local_addr())
        .await
        .send_compressed(CompressionEncoding::Zstd);
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("big", 1, 100_000)).await;
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 100_020);
    assert_eq!(lines[100_019]["profile"]["id"], "big/1/99999");
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn invalid_payloads_and_empty_agent_ids_do_not_break_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    let mut b = batch("a1", 1, 2);
    b.profiles[1].payload = bytes::Bytes::from_static(b"{\"id\": \"unterminated\n");
    s.send_ok(b).await;
    s.send(batch("", 2, 1)).await;
    let ack = s.next().await.expect("ok").expect("ack");
    assert_eq!((ack.seq, ack.status()), (2, AckStatus::Rejected));
    s.send_ok(batch("a1", 3, 1)).await;
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["invalid"], true);
    assert_eq!(lines[1]["profile_raw"], "{\"id\": \"unterminated\n");
    let stats = l.stats();
    assert_eq!((stats.invalid_profiles, stats.rejected_batches), (1, 1));
    drop(s);
    l.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_agents_each_profile_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let addr = l.local_addr();
    let mut tasks = Vec::new();
    for a in 0..4 {
        tasks.push(tokio::spawn(async move {
            let agent = format!("agent-{a}");
            let mut c = client(addr).await;
            let mut s = AgentStream::open(&mut c).await.expect("stream");
            // Window of 8 in flight, every 10th batch sent twice.
            let mut sent = 0u64;
            let mut acked = 0u64;
            let mut seqs = Vec::new();
            for seq in 1..=200u64 {
                seqs.push(seq);
                if seq % 10 == 0 {
                    seqs.push(seq);
                }
            }
            for &seq in &seqs {
                s.send(batch(&agent, seq, 5)).await;
                sent += 1;
                while sent - acked >= 8 {
                    let ack = s.next().await.expect("ok").expect("ack");
                    assert_eq!(ack.status(), AckStatus::Ok);
                    acked += 1;
                }
            }
            while acked < sent {
                let ack = s.next().await.expect("ok").expect("ack");
                assert_eq!(ack.status(), AckStatus::Ok);
                acked += 1;
            }
        }));
    }
    for t in tasks {
        t.await.expect("agent task");
    }
    let mut got = ids(&read_lines(&out));
    got.sort();
    let n = got.len();
    got.dedup();
    assert_eq!(got.len(), n, "no profile stored twice");
    assert_eq!(n, 4 * 200 * 5);
    let stats = l.shutdown().await.expect("clean shutdown");
    assert_eq!(stats.duplicate_batches, 4 * 20);
}

#[tokio::test]
async fn shutdown_ends_open_streams_after_acking_what_was_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let mut c = client(l.local_addr()).await;
    let mut s = AgentStream::open(&mut c).await.expect("stream");
    s.send_ok(batch("a1", 1, 1)).await;
    // The agent keeps its stream open; shutdown must not wait for it to close.
    let t = Instant::now();
    l.shutdown().await.expect("clean shutdown");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The agent sees the end of its stream (or an error), not a hang.
    let end = s.next().await;
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[tokio::test]
async fn second_listener_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = out_path(&dir);
    let l = start(config(&out)).await;
    let err = apm_listener::Listener::start(config(&out))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("in use"), "{err}");
    l.shutdown().await.expect("clean shutdown");
}
