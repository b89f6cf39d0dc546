//! `apm-listener export`: reads the JetStream stream with a durable pull consumer and appends
//! each message (one batch's JSON lines) to a JSONL file, the same lines the file store writes,
//! so every tool that reads the listener's file reads the export too. A message is acked only
//! after its lines are written (and fdatasync'd with `--fsync`); the durable consumer resumes
//! after the last acked message.
//!
//! The exporter also deduplicates by `(agent_id, epoch, seq)` against its own file (the file
//! store's recovery rebuilds that state at start): a message redelivered because its ack was lost,
//! and a resend that reached the stream after its duplicate window, are written once.

use std::fs::File;
use std::io::IoSlice;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::jetstream::{JetStreamConfig, JetStreamError, connect, ensure_stream};
use crate::store::{self, Seen, StoreError, parse_key, write_all_vectored};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    JetStream(#[from] JetStreamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("export task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Default durable consumer name (`--durable`).
pub const DEFAULT_DURABLE: &str = "apm-export";

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub js: JetStreamConfig,
    pub durable: String,
    pub out: PathBuf,
    pub fsync: bool,
    /// Redelivery of a message not acked by then.
    pub ack_wait: Duration,
    /// Messages fetched (and written, then acked) at most per round.
    pub batch: usize,
}

/// What the exporter did, printed as one JSON line on stdout when it stops.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ExportSummary {
    /// Messages read from the stream (redeliveries included).
    pub messages: u64,
    pub batches_written: u64,
    pub profiles_written: u64,
    /// Messages whose batch key was already in the file: not written again.
    pub duplicate_batches: u64,
    /// Messages that are not listener batches (no readable key): acked, not written.
    pub foreign_messages: u64,
    pub bytes_written: u64,
}

/// Runs until `stop`; the file is recovered first (torn tail cut, dedup state rebuilt).
/// `progress` sees the running totals after every round that read messages.
pub async fn run(
    cfg: ExportConfig,
    stop: CancellationToken,
    progress: impl Fn(&ExportSummary) + Send,
) -> Result<ExportSummary, ExportError> {
    let out = cfg.out.clone();
    let (file, seen, rec) = tokio::task::spawn_blocking(move || store::open(&out)).await??;
    info!(path = %cfg.out.display(), batches = rec.batches, truncated_bytes = rec.truncated_bytes,
          "export file recovered");
    let client = connect(&cfg.js, "apm-listener export").await?;
    let ctx = jetstream::ContextBuilder::new()
        .timeout(cfg.js.publish_timeout)
        .build(client);
    let stream = ensure_stream(&ctx, &cfg.js).await?;
    let consumer_err = |reason: String| JetStreamError::Consumer {
        stream: cfg.js.stream.clone(),
        durable: cfg.durable.clone(),
        reason,
    };
    let consumer: consumer::Consumer<consumer::pull::Config> = stream
        .get_or_create_consumer(
            &cfg.durable,
            consumer::pull::Config {
                durable_name: Some(cfg.durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                // A message not acked by then (exporter stuck or dead, a fetch lost with its
                // connection) is delivered again; the file's dedup makes that harmless.
                ack_wait: cfg.ack_wait,
                max_ack_pending: 10_000,
                ..consumer::pull::Config::default()
            },
        )
        .await
        .map_err(|e| consumer_err(e.to_string()))?;
    info!(stream = %cfg.js.stream, durable = %cfg.durable, out = %cfg.out.display(), "exporting");
    let mut w = ExportWriter {
        file,
        path: cfg.out.clone(),
        seen,
        fsync: cfg.fsync,
        summary: ExportSummary::default(),
        scratch: Vec::new(),
    };
    while !stop.is_cancelled() {
        let fetched = tokio::select! {
            r = consumer.fetch().max_messages(cfg.batch).expires(Duration::from_millis(500)).messages() => r,
            () = stop.cancelled() => break,
        };
        let mut messages = match fetched {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "fetching from JetStream failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut round = Vec::with_capacity(cfg.batch);
        while let Some(m) = messages.next().await {
            match m {
                Ok(m) => round.push(m),
                Err(e) => {
                    // Undelivered ones come again after ack_wait; nothing is lost.
                    warn!(error = %e, "a message of the fetch failed");
                    break;
                }
            }
        }
        if round.is_empty() {
            continue;
        }
        let bodies: Vec<bytes::Bytes> = round.iter().map(|m| m.payload.clone()).collect();
        // A local append: blocking for its few milliseconds is cheaper than a hand-off.
        tokio::task::block_in_place(|| w.write(&bodies))?;
        // Acked only now: a crash before this redelivers them, and the file dedups them.
        for m in &round {
            if let Err(e) = m.ack().await {
                warn!(error = %e, "ack to JetStream failed; the message will be delivered again and deduplicated");
            }
        }
        progress(&w.summary);
    }
    let _ = w.file.sync_data();
    Ok(w.summary)
}

struct ExportWriter {
    file: File,
    path: PathBuf,
    seen: Seen,
    fsync: bool,
    summary: ExportSummary,
    scratch: Vec<u8>,
}

impl ExportWriter {
    /// Writes the messages of one round that are new batches: one `writev`, one fdatasync.
    fn write(&mut self, bodies: &[bytes::Bytes]) -> Result<(), ExportError> {
        let mut slices = Vec::with_capacity(bodies.len());
        let mut added: Vec<(String, u64)> = Vec::new();
        for body in bodies {
            self.summary.messages += 1;
            let first = body.split(|&b| b == b'\n').next().unwrap_or_default();
            let Some(key) = parse_key(first, &mut self.scratch) else {
                self.summary.foreign_messages += 1;
                warn!(
                    bytes = body.len(),
                    "message is not a listener batch; skipped"
                );
                continue;
            };
            let series = key.series();
            let seq = key.seq;
            let set = self.seen.entry(series.clone()).or_default();
            if set.contains(seq) {
                self.summary.duplicate_batches += 1;
                continue;
            }
            set.insert(seq);
            added.push((series, seq));
            self.summary.batches_written += 1;
            self.summary.profiles_written += body.iter().filter(|&&b| b == b'\n').count() as u64;
            self.summary.bytes_written += body.len() as u64;
            slices.push(IoSlice::new(body));
        }
        if slices.is_empty() {
            return Ok(());
        }
        let result = write_all_vectored(&mut self.file, &mut slices).and_then(|()| {
            if self.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(source) = result {
            // Not acked: redelivered after ack_wait. The file's torn tail is cut at restart.
            for (series, seq) in added {
                if let Some(set) = self.seen.get_mut(&series) {
                    set.remove(seq);
                }
            }
            return Err(ExportError::Write {
                path: self.path.clone(),
                source,
            });
        }
        Ok(())
    }
}
