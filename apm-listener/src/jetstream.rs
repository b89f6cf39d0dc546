//! The JetStream store: instead of appending to a local file, each batch is published to a NATS
//! JetStream stream (a replicated Raft log) with a `Nats-Msg-Id` made from its dedup key
//! `(agent_id, epoch, seq)`, and acked to the agent only after JetStream's publish ack. The
//! dedup state lives in the stream, not in the listener, so any number of listener replicas can
//! serve any agent: a resend that reaches another replica within the stream's duplicate window is
//! answered "duplicate" by JetStream and acked OK without a second copy.
//!
//! The message body is the batch's output lines, exactly what the file store would append, so
//! `apm-listener export` (`export.rs`) writes the same JSONL. See `docs/scaling.md`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{ConnectOptions, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::stats::Stats;
use crate::store::{Outcome, Reply, Submission, WriterMsg, record};

#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("--store jetstream:{servers}: cannot connect to NATS within {timeout:?}: {source}")]
    Connect {
        servers: String,
        timeout: Duration,
        source: async_nats::ConnectError,
    },
    #[error(
        "JetStream stream {stream:?} (subject {subject:?}, replicas {replicas}) could not be created or read within {timeout:?}: {reason}; is the server started with JetStream (-js), and do enough cluster nodes run for the replicas?"
    )]
    Stream {
        stream: String,
        subject: String,
        replicas: usize,
        timeout: Duration,
        reason: String,
    },
    #[error("JetStream consumer {durable:?} on stream {stream:?}: {reason}")]
    Consumer {
        stream: String,
        durable: String,
        reason: String,
    },
}

/// Default stream name (`--js-stream`).
pub const DEFAULT_STREAM: &str = "APM_PROFILES";
/// Default subject (`--js-subject`).
pub const DEFAULT_SUBJECT: &str = "apm.profiles";
/// Default duplicate window (`--js-duplicate-window`): longer than any agent's resend of an
/// unacked batch takes in practice (ack timeout 15 s + backoff up to 30 s + a breaker period),
/// short enough that JetStream's per-stream id table stays small (ids of the last 10 minutes).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_mins(10);
/// Default retention (`--js-max-age`): a week for the exporters to catch up after an outage.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_hours(7 * 24);

/// Where and how the JetStream store publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// NATS servers (`nats://host:port`); the client connects to one and fails over to the others.
    pub servers: Vec<String>,
    pub stream: String,
    pub subject: String,
    /// Copies of each message in the cluster (1, 3 or 5; R3 survives one node down).
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    /// How long a publish waits for JetStream's ack before the batch is answered RETRY.
    pub publish_timeout: Duration,
    /// How long the start waits for NATS and the stream (a cluster still electing its leader).
    pub start_timeout: Duration,
}

impl JetStreamConfig {
    pub fn new(servers: Vec<String>) -> Self {
        Self {
            servers,
            stream: DEFAULT_STREAM.into(),
            subject: DEFAULT_SUBJECT.into(),
            replicas: 1,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_age: DEFAULT_MAX_AGE,
            publish_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(30),
        }
    }

    fn servers_text(&self) -> String {
        self.servers.join(",")
    }
}

/// Parses the server list of `--store jetstream:URL,URL`.
pub fn parse_servers(list: &str) -> Result<Vec<String>, String> {
    let servers: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if servers.is_empty() {
        return Err(
            "jetstream: needs at least one server, e.g. jetstream:nats://127.0.0.1:4222".into(),
        );
    }
    for s in &servers {
        s.parse::<ServerAddr>()
            .map_err(|e| format!("jetstream: server `{s}`: {e}"))?;
    }
    Ok(servers)
}

/// The `Nats-Msg-Id` of a batch: its dedup key, one-to-one. An agent id made of
/// `[A-Za-z0-9._-]` (every generated one) is used as is; any other (header-unsafe bytes, `:`)
/// is hex-encoded under another prefix, so two keys never map to one id.
pub fn message_id(agent_id: &str, epoch: u64, seq: u64) -> String {
    let plain = !agent_id.is_empty()
        && agent_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        format!("a:{agent_id}:{epoch:016x}:{seq}")
    } else {
        let hex: String = agent_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x:{hex}:{epoch:016x}:{seq}")
    }
}

/// Connects to NATS, retrying until `cfg.start_timeout` (servers may still be starting).
pub async fn connect(
    cfg: &JetStreamConfig,
    name: &str,
) -> Result<async_nats::Client, JetStreamError> {
    let addrs: Vec<ServerAddr> = cfg.servers.iter().filter_map(|s| s.parse().ok()).collect();
    let deadline = Instant::now() + cfg.start_timeout;
    loop {
        let opts = ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(2))
            // Once connected, reconnect forever (to any server of the list): a NATS node
            // restarting must not end the listener.
            .max_reconnects(None);
        match opts.connect(addrs.clone()).await {
            Ok(c) => return Ok(c),
            Err(source) if Instant::now() >= deadline => {
                return Err(JetStreamError::Connect {
                    servers: cfg.servers_text(),
                    timeout: cfg.start_timeout,
                    source,
                });
            }
            Err(e) => {
                warn!(servers = %cfg.servers_text(), error = %e, "NATS not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The stream, created when missing. A cluster that has just started may not have elected its
/// meta leader yet: retried until `cfg.start_timeout`. An existing stream whose duplicate window
/// or replicas differ from the configuration is used as it is, with a warning.
pub async fn ensure_stream(
    ctx: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> Result<stream::Stream, JetStreamError> {
    let want = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![cfg.subject.clone()],
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        max_age: cfg.max_age,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // A full stream refuses new batches (answered RETRY, the agents spool) instead of
        // deleting old ones that no exporter may have read yet.
        discard: stream::DiscardPolicy::New,
        description: Some("apm-listener: one message per agent batch (JSON lines)".into()),
        ..stream::Config::default()
    };
    let deadline = Instant::now() + cfg.start_timeout;
    loop {
        match ctx.get_or_create_stream(want.clone()).await {
            Ok(mut s) => {
                if let Ok(info) = s.info().await {
                    let have = &info.config;
                    if have.duplicate_window != want.duplicate_window
                        || have.num_replicas != want.num_replicas
                        || !have.subjects.contains(&want.subject_or_name())
                    {
                        warn!(stream = %cfg.stream, have_window = ?have.duplicate_window,
                              want_window = ?want.duplicate_window, have_replicas = have.num_replicas,
                              want_replicas = want.num_replicas, have_subjects = ?have.subjects,
                              "the existing stream's configuration differs from ours; using it as it is (change it with `nats stream edit`)");
                    }
                }
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(JetStreamError::Stream {
                    stream: cfg.stream.clone(),
                    subject: cfg.subject.clone(),
                    replicas: cfg.replicas,
                    timeout: cfg.start_timeout,
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                warn!(stream = %cfg.stream, error = %e, "JetStream not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

trait SubjectOrName {
    fn subject_or_name(&self) -> String;
}

impl SubjectOrName for stream::Config {
    fn subject_or_name(&self) -> String {
        self.subjects
            .first()
            .cloned()
            .unwrap_or_else(|| self.name.clone())
    }
}

/// Fault injection and the publish behaviour of the JetStream writer.
#[derive(Debug, Clone, Default)]
pub struct PublisherFaults {
    pub fail_first: u64,
    pub reject_first: u64,
    pub drop_before_ack: Option<u64>,
}

/// Publishes at most this many batches whose acks are outstanding; beyond it the writer stops
/// taking batches, which pushes back on the streams (and through them on the agents).
const MAX_PENDING_PUBLISHES: usize = 1024;

/// The JetStream writer: takes the same [`WriterMsg`]s as the file writer, publishes each batch
/// and answers once JetStream acked it (or failed to).
pub struct Publisher {
    ctx: jetstream::Context,
    subject: String,
    stats: Arc<Stats>,
    faults: PublisherFaults,
    arrivals: u64,
    stored_batches: u64,
    drop_fired: bool,
}

/// A batch whose publish was sent, its body's length, and what JetStream answered.
type Published = (
    Submission,
    usize,
    Result<jetstream::publish::PublishAck, String>,
);

impl Publisher {
    pub fn new(
        ctx: jetstream::Context,
        subject: String,
        stats: Arc<Stats>,
        faults: PublisherFaults,
    ) -> Self {
        Self {
            ctx,
            subject,
            stats,
            faults,
            arrivals: 0,
            stored_batches: 0,
            drop_fired: false,
        }
    }

    /// Runs until `Stop` or until every sender is gone; batches already published are answered
    /// before it returns.
    pub async fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut pending = FuturesUnordered::new();
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                Some((s, len, result)) = pending.next(), if !pending.is_empty() => self.answer(s, len, result),
                msg = rx.recv(), if open && pending.len() < MAX_PENDING_PUBLISHES => match msg {
                    Some(WriterMsg::Batch(s)) => {
                        if let Some(fut) = self.publish(s).await {
                            pending.push(fut);
                        }
                    }
                    Some(WriterMsg::Stop) | None => open = false,
                },
            }
        }
        rx.close();
        info!(subject = %self.subject, "publisher stopped");
    }

    /// Sends one batch (or answers it at once: fault injection, a publish that cannot be sent);
    /// the returned future resolves with JetStream's ack.
    async fn publish(
        &mut self,
        mut s: Submission,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = Published> + Send>>> {
        self.arrivals += 1;
        if self.arrivals <= self.faults.fail_first {
            let why = format!("fault injection: --fail-first {}", self.faults.fail_first);
            self.finish(s, Outcome::Retry(why));
            return None;
        }
        if self.arrivals <= self.faults.fail_first + self.faults.reject_first {
            let why = format!(
                "fault injection: --reject-first {}",
                self.faults.reject_first
            );
            self.finish(s, Outcome::Rejected(why));
            return None;
        }
        let id = message_id(&s.agent_id, s.epoch, s.seq);
        let body = Bytes::from(std::mem::take(&mut s.batch.lines));
        let len = body.len();
        let msg = jetstream::message::PublishMessage::build()
            .payload(body)
            .message_id(&id);
        match self.ctx.send_publish(self.subject.clone(), msg).await {
            Ok(ack) => Some(Box::pin(async move {
                let r = ack.await.map_err(|e| e.to_string());
                (s, len, r)
            })),
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                // Never storable as it is: the agent counts it (rejected_by_central). The fix is
                // the NATS server's max_payload (docs/scaling.md).
                warn!(message_id = %id, bytes = len, error = %e,
                      "batch larger than the NATS server's max_payload: rejected");
                let why = format!(
                    "batch of {len} bytes is larger than the NATS server's max_payload; raise max_payload in nats-server's config"
                );
                self.finish(s, Outcome::Rejected(why));
                None
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Relaxed);
                error!(message_id = %id, error = %e, "publishing to JetStream failed; answered RETRY");
                self.finish(
                    s,
                    Outcome::Retry(format!(
                        "listener cannot store the batch: JetStream publish: {e}"
                    )),
                );
                None
            }
        }
    }

    fn answer(
        &mut self,
        s: Submission,
        len: usize,
        result: Result<jetstream::publish::PublishAck, String>,
    ) {
        let outcome = match result {
            Ok(ack) if ack.duplicate => Outcome::Duplicate,
            Ok(_) => {
                self.stats.writes.fetch_add(1, Relaxed);
                self.stats.bytes_written.fetch_add(len as u64, Relaxed);
                self.stored_batches += 1;
                if !self.drop_fired && self.faults.drop_before_ack == Some(self.stored_batches) {
                    self.drop_fired = true;
                    Outcome::DropBeforeAck
                } else {
                    Outcome::Stored
                }
            }
            Err(e) => {
                // No ack: stored or not, the agent resends, and the message id makes a stored
                // copy answer "duplicate" then.
                self.stats.write_errors.fetch_add(1, Relaxed);
                warn!(seq = s.seq, error = %e, "no JetStream ack; answered RETRY");
                Outcome::Retry(format!(
                    "listener cannot store the batch: JetStream ack: {e}"
                ))
            }
        };
        self.finish(s, outcome);
    }

    fn finish(&self, s: Submission, outcome: Outcome) {
        record(&self.stats, &outcome, &s.batch);
        let _ = s.reply.send(Reply {
            outcome,
            buf: Vec::new(),
            done_at: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_one_to_one_and_header_safe() {
        assert_eq!(
            message_id("web-1.example", 0, 7),
            "a:web-1.example:0000000000000000:7"
        );
        assert_eq!(message_id("a", 0xab, 1), "a:a:00000000000000ab:1");
        // `:` or bytes a header cannot carry: hex, another prefix.
        assert_eq!(message_id("a:1", 0, 2), "x:613a31:0000000000000000:2");
        assert_eq!(message_id("a\r\n", 0, 2), "x:610d0a:0000000000000000:2");
        assert_eq!(message_id("", 0, 2), "x::0000000000000000:2");
        // Distinct keys, distinct ids (epoch and seq included).
        let ids: std::collections::HashSet<String> = [
            message_id("a", 0, 1),
            message_id("a", 1, 1),
            message_id("a", 0, 11),
            message_id("61", 0, 1),
            message_id("a\u{0}", 0, 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 5);
        for id in &ids {
            assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id}");
        }
    }

    #[test]
    fn server_lists_parse_or_say_why_not() {
        assert_eq!(
            parse_servers("nats://127.0.0.1:4222, nats://127.0.0.1:4223").unwrap(),
            vec!["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
        );
        assert!(
            parse_servers("")
                .unwrap_err()
                .contains("at least one server")
        );
        assert!(
            parse_servers("nats://[bad")
                .unwrap_err()
                .contains("nats://[bad")
        );
    }
}
