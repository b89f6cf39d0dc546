//! Transport: one gRPC bidirectional stream to the central listener. Batches go out while fewer
//! than `central.max_in_flight` await their ack; each ack settles one batch. When the stream
//! breaks, an ack times out, or the listener answers RETRY, the unacknowledged batches go back
//! to the router (which resends or spools them) and the transport reconnects with jittered
//! exponential backoff. Resends are safe: the listener deduplicates by `(agent_id, seq)`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use apm_proto::collector_client::CollectorClient;
use apm_proto::{AckStatus, HostStats};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{CentralConfig, Compression};
use crate::model::Batch;
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("central.endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What became of a batch handed to the transport.
#[derive(Debug)]
pub enum Outcome {
    /// Stored by the listener.
    Acked {
        seq: u64,
        profiles: usize,
        bytes: usize,
    },
    /// Not acknowledged (connection lost, ack timeout, RETRY): back to the router.
    Returned { batch: Batch, reason: String },
    /// The listener will never store it.
    Rejected { batch: Batch, message: String },
    /// A connection attempt failed (counts as a failed send for the breaker).
    ConnectFailed { error: String },
    /// A stream is up (the breaker may close).
    Connected,
}

/// Sorts gRPC statuses once: retriable ones lead to a reconnect, final ones are still retried
/// (the data is never thrown away) but logged as errors an operator must fix.
pub fn is_retriable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable
            | DeadlineExceeded
            | ResourceExhausted
            | Aborted
            | Internal
            | Unknown
            | Cancelled
    )
}

/// Builds the `HostStats` of each outgoing batch.
pub type HostStatsFn = Arc<dyn Fn() -> HostStats + Send + Sync>;

pub struct Transport {
    pub cfg: CentralConfig,
    pub agent_id: String,
    pub hostname: String,
    pub telemetry: Arc<Telemetry>,
    pub host_stats: HostStatsFn,
    endpoint: Endpoint,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Transport {
    pub fn new(
        cfg: CentralConfig,
        agent_id: String,
        hostname: String,
        telemetry: Arc<Telemetry>,
        host_stats: HostStatsFn,
    ) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        if cfg.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            match &cfg.tls_ca_file {
                Some(p) => {
                    let pem = std::fs::read(p).map_err(|source| TransportError::File {
                        what: "central.tls_ca_file",
                        path: p.clone(),
                        source,
                    })?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                None => tls = tls.with_webpki_roots(),
            }
            if let Some(d) = &cfg.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let token = match (&cfg.token_file, &cfg.token) {
            (Some(p), _) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| TransportError::File {
                        what: "central.token_file",
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        };
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<_>>()
                    .map_err(|_| {
                        bad("the bearer token has characters not allowed in a header".into())
                    })
            })
            .transpose()?;
        Ok(Self {
            cfg,
            agent_id,
            hostname,
            telemetry,
            host_stats,
            endpoint,
            token,
        })
    }

    /// Runs until `input` closes and nothing is in flight, or until `stop` (then whatever is
    /// still unacknowledged is returned to the router).
    pub async fn run(
        self,
        mut input: mpsc::Receiver<Batch>,
        outcomes: mpsc::UnboundedSender<Outcome>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        // Connect lazily, with a batch in hand: while the router's breaker holds batches back,
        // nothing reaches us and we do not dial a dead listener.
        let mut carry: Option<Batch> = None;
        loop {
            if carry.is_none() {
                carry = tokio::select! {
                    b = input.recv() => match b { Some(b) => Some(b), None => break },
                    () = stop.cancelled() => break,
                };
            }
            let channel = tokio::select! {
                c = self.endpoint.connect() => c,
                () = stop.cancelled() => break,
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    let error = error_chain(&e);
                    tracing::warn!(endpoint = %self.cfg.endpoint, error = %error, "cannot connect to the central listener");
                    self.telemetry.send_failures.inc();
                    let _ = outcomes.send(Outcome::ConnectFailed {
                        error: error.clone(),
                    });
                    if let Some(batch) = carry.take() {
                        let _ = outcomes.send(Outcome::Returned {
                            batch,
                            reason: error,
                        });
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
            };
            self.telemetry.reconnects.inc();
            let (ended_cleanly, input_open) = self
                .session(
                    channel,
                    &mut input,
                    carry.take(),
                    &outcomes,
                    &stop,
                    &mut backoff,
                )
                .await;
            if !input_open || stop.is_cancelled() {
                break;
            }
            if !ended_cleanly {
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
        if let Some(batch) = carry.take() {
            let _ = outcomes.send(Outcome::Returned {
                batch,
                reason: "transport stopped".into(),
            });
        }
        // Batches the router handed over but this task never sent go back too.
        input.close();
        while let Ok(batch) = input.try_recv() {
            let _ = outcomes.send(Outcome::Returned {
                batch,
                reason: "transport stopped".into(),
            });
        }
    }

    /// One stream. Returns (ended cleanly, input still open).
    async fn session(
        &self,
        channel: Channel,
        input: &mut mpsc::Receiver<Batch>,
        first: Option<Batch>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> (bool, bool) {
        let token = self.token.clone();
        let mut client =
            CollectorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(t) = &token {
                    req.metadata_mut().insert("authorization", t.clone());
                }
                Ok(req)
            })
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        match self.cfg.compression {
            Compression::Zstd => client = client.send_compressed(CompressionEncoding::Zstd),
            Compression::Gzip => client = client.send_compressed(CompressionEncoding::Gzip),
            Compression::None => {}
        }
        let window = self.cfg.max_in_flight;
        let (tx, rx) = mpsc::channel::<apm_proto::Batch>(window);
        let mut acks = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let error = format!("{}: {}", status.code(), status.message());
                tracing::warn!(error = %error, retriable = is_retriable(status.code()), "central listener refused the stream");
                self.telemetry.send_failures.inc();
                let _ = outcomes.send(Outcome::ConnectFailed {
                    error: error.clone(),
                });
                if let Some(batch) = first {
                    let _ = outcomes.send(Outcome::Returned {
                        batch,
                        reason: error,
                    });
                }
                return (false, true);
            }
        };
        tracing::info!(endpoint = %self.cfg.endpoint, "streaming to the central listener");
        let _ = outcomes.send(Outcome::Connected);
        let mut inflight: VecDeque<(Batch, Instant)> = VecDeque::new();
        let mut input_open = true;
        if let Some(batch) = first {
            let wire = batch.to_proto(&self.agent_id, &self.hostname, Some((self.host_stats)()));
            inflight.push_back((batch, Instant::now()));
            self.telemetry.in_flight_batches.set(1);
            if tx.send(wire).await.is_err() {
                let (batch, _) = inflight.pop_front().expect("just pushed");
                let _ = outcomes.send(Outcome::Returned {
                    batch,
                    reason: "stream closed while sending".into(),
                });
                return (false, true);
            }
        }
        let fail_all = |inflight: &mut VecDeque<(Batch, Instant)>, reason: &str| {
            for (batch, _) in inflight.drain(..) {
                self.telemetry.send_failures.inc();
                let _ = outcomes.send(Outcome::Returned {
                    batch,
                    reason: reason.to_string(),
                });
            }
            self.telemetry.in_flight_batches.set(0);
        };
        loop {
            if !input_open && inflight.is_empty() {
                return (true, false);
            }
            let ack_deadline = inflight.front().map(|(_, t)| *t + self.cfg.ack_timeout);
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    fail_all(&mut inflight, "shutdown");
                    return (true, input_open);
                }
                msg = acks.message() => match msg {
                    Ok(Some(ack)) => {
                        let Some(pos) = inflight.iter().position(|(b, _)| b.seq == ack.seq) else {
                            tracing::debug!(seq = ack.seq, "ack for a batch not in flight (already settled)");
                            continue;
                        };
                        let (batch, sent) = inflight.remove(pos).expect("position is valid");
                        self.telemetry.in_flight_batches.set(inflight.len() as i64);
                        match AckStatus::try_from(ack.status).unwrap_or(AckStatus::Unspecified) {
                            AckStatus::Ok => {
                                backoff.reset();
                                self.telemetry.acked(sent.elapsed(), batch.len(), batch.payload_bytes());
                                self.telemetry.last_acked_seq.set(batch.seq as i64);
                                let _ = outcomes.send(Outcome::Acked {
                                    seq: batch.seq,
                                    profiles: batch.len(),
                                    bytes: batch.payload_bytes(),
                                });
                            }
                            AckStatus::Rejected => {
                                tracing::error!(seq = batch.seq, message = %ack.message, "central listener rejected a batch");
                                let _ = outcomes.send(Outcome::Rejected { batch, message: ack.message });
                            }
                            AckStatus::Retry | AckStatus::Unspecified => {
                                self.telemetry.send_failures.inc();
                                tracing::warn!(seq = batch.seq, message = %ack.message, "central listener asked to retry a batch");
                                let _ = outcomes.send(Outcome::Returned { batch, reason: format!("retry: {}", ack.message) });
                            }
                        }
                    }
                    Ok(None) => {
                        tracing::warn!(in_flight = inflight.len(), "central listener closed the stream");
                        fail_all(&mut inflight, "stream closed");
                        return (false, input_open);
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), message = %status.message(), in_flight = inflight.len(), "stream to the central listener failed");
                        fail_all(&mut inflight, status.message());
                        return (false, input_open);
                    }
                },
                () = async { tokio::time::sleep_until(ack_deadline.unwrap()).await }, if ack_deadline.is_some() => {
                    tracing::warn!(timeout = ?self.cfg.ack_timeout, in_flight = inflight.len(), "no ack in time: reconnecting");
                    fail_all(&mut inflight, "ack timeout");
                    return (false, input_open);
                }
                b = input.recv(), if input_open && inflight.len() < window => match b {
                    Some(batch) => {
                        let wire = batch.to_proto(&self.agent_id, &self.hostname, Some((self.host_stats)()));
                        inflight.push_back((batch, Instant::now()));
                        self.telemetry.in_flight_batches.set(inflight.len() as i64);
                        if tx.send(wire).await.is_err() {
                            fail_all(&mut inflight, "stream closed while sending");
                            return (false, true);
                        }
                    }
                    None => input_open = false,
                },
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Exponential backoff with full jitter ("equal jitter": half fixed, half random), so a fleet of
/// agents does not reconnect in lockstep after a listener restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, cur: min }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn status_codes_are_sorted_once() {
        assert!(is_retriable(tonic::Code::Unavailable));
        assert!(!is_retriable(tonic::Code::Unauthenticated));
        assert!(!is_retriable(tonic::Code::InvalidArgument));
    }
}
