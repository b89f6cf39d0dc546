//! Transport: one gRPC bidirectional stream to the central listener. Batches go out while fewer
//! than `central.max_in_flight` await their ack; each ack settles one batch. When the stream
//! breaks, an ack times out, or the listener answers RETRY, the unacknowledged batches go back
//! to the router (which resends or spools them) and the transport reconnects with jittered
//! exponential backoff. Resends are safe: the listener deduplicates by `(agent_id, seq)`.
//!
//! A listener that cannot be reached (a dial failed) is dialled at most once per
//! `central.probe_interval`: with a batch when the router hands one over, else with a
//! `grpc.health.v1` check. Each finding goes to the router as [`Outcome::Reachability`], so the
//! breaker half-opens as soon as the listener answers again rather than after its grown open
//! period (see `breaker.rs`).
//!
//! With several listener replicas (`central.endpoints`), a failed connect or a broken stream
//! moves the transport to the next one, so a resend may reach another replica: the replicas
//! share their dedup state through the JetStream store (docs/scaling.md).

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
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{CentralConfig, Compression};
use crate::escape::escape_control;
use crate::pipeline::model::Batch;
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{key} `{endpoint}`: {reason}")]
    Endpoint {
        key: &'static str,
        endpoint: String,
        reason: String,
    },
    #[error("{key}: {reason}")]
    Token { key: &'static str, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// How one stream ended.
#[derive(Debug, Clone, Copy)]
struct SessionEnd {
    /// The stream ended without error (no backoff before the next).
    clean: bool,
    /// The router may still send batches.
    input_open: bool,
    /// The stream never opened because nothing speaking gRPC answered (the connection was
    /// closed or reset): paced like a failed dial, not backed off like a failed stream.
    unreachable: bool,
}

impl SessionEnd {
    const FAILED: Self = Self {
        clean: false,
        input_open: true,
        unreachable: false,
    };
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
    /// What a dial or a `grpc.health.v1` check found: can the listener be reached?
    Reachability { reachable: bool },
}

/// Sorts gRPC statuses once: retriable ones lead to a reconnect, final ones are still retried
/// (the data is never thrown away) but logged as errors an operator must fix.
pub fn is_retriable(code: tonic::Code) -> bool {
    use tonic::Code::{
        Aborted, Cancelled, DeadlineExceeded, Internal, ResourceExhausted, Unavailable, Unknown,
    };
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

/// The codes a call ends with when no gRPC server answered it (tonic's own for a connection
/// refused, closed or reset before a response), or when the server says it is not serving.
/// Anything else is an answer: the listener is there, whatever it thinks of the request.
fn is_unanswered(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
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
    /// The listener endpoints (`central.endpoints`, or `central.endpoint` alone), each with
    /// its URI for the logs; the transport dials them in turn.
    endpoints: Vec<(String, Endpoint)>,
    token: Arc<BearerToken>,
}

/// The `authorization` value in use: read at start, swapped by a reload that re-reads
/// `central.token_file`. Each new stream takes the current value (an open stream was
/// authenticated when it opened and keeps going).
#[derive(Debug, Default)]
pub struct BearerToken(std::sync::RwLock<Option<MetadataValue<Ascii>>>);

impl BearerToken {
    /// Reads the token (`token_file` wins over `token`) into a header value marked sensitive,
    /// so HTTP/2 never puts it in the HPACK dynamic table and `Debug` hides it.
    fn read(cfg: &CentralConfig) -> Result<Option<MetadataValue<Ascii>>, TransportError> {
        let (key, token) = match (&cfg.token_file, &cfg.token) {
            (Some(p), _) => (
                "central.token_file",
                std::fs::read_to_string(p)
                    .map_err(|source| TransportError::File {
                        what: "central.token_file",
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, Some(t)) => ("central.token", t.expose().to_string()),
            (None, None) => return Ok(None),
        };
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| TransportError::Token {
                    key,
                    reason: "the bearer token has characters not allowed in a header".into(),
                })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    pub fn new(cfg: &CentralConfig) -> Result<Self, TransportError> {
        Ok(Self(std::sync::RwLock::new(Self::read(cfg)?)))
    }

    /// Re-reads the token; `Ok(true)` when it changed (used from the next stream on). On an
    /// error the token in use is kept.
    pub fn reload(&self, cfg: &CentralConfig) -> Result<bool, TransportError> {
        let new = Self::read(cfg)?;
        let mut cur = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *cur != new;
        *cur = new;
        Ok(changed)
    }

    fn get(&self) -> Option<MetadataValue<Ascii>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The tonic endpoint of `uri` with the connection, TLS and keep-alive settings of `cfg`.
fn endpoint(cfg: &CentralConfig, uri: &str) -> Result<Endpoint, TransportError> {
    let bad = |reason: String| TransportError::Endpoint {
        key: if cfg.endpoints.is_empty() {
            "central.endpoint"
        } else {
            "central.endpoints"
        },
        endpoint: uri.to_string(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(uri.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if uri.starts_with("https://") {
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
    Ok(endpoint)
}

impl Transport {
    pub fn new(
        cfg: CentralConfig,
        agent_id: String,
        hostname: String,
        telemetry: Arc<Telemetry>,
        host_stats: HostStatsFn,
    ) -> Result<Self, TransportError> {
        let endpoints = cfg
            .targets()
            .into_iter()
            .map(|uri| Ok((uri.to_string(), endpoint(&cfg, uri)?)))
            .collect::<Result<Vec<_>, TransportError>>()?;
        let token = Arc::new(BearerToken::new(&cfg)?);
        Ok(Self {
            cfg,
            agent_id,
            hostname,
            telemetry,
            host_stats,
            endpoints,
            token,
        })
    }

    /// The token in use, for the reload path to swap.
    pub fn token(&self) -> Arc<BearerToken> {
        self.token.clone()
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
        // Unknown at start: a check tells a breaker restored open whether the listener is back.
        let mut dials = Dials {
            interval: self.cfg.probe_interval,
            unreachable: true,
            last: None,
        };
        // Connect with a batch in hand; while the router's breaker holds batches back, only
        // checks (at most one per probe interval) reach an unreachable listener.
        let mut carry: Option<Batch> = None;
        // Which of `endpoints` to dial: the next one after a failed connect or a broken stream.
        let mut at = 0usize;
        loop {
            let (uri, endpoint) = &self.endpoints[at % self.endpoints.len()];
            if carry.is_none() {
                carry = match self
                    .next_batch(&mut input, &outcomes, &stop, &mut dials, (uri, endpoint))
                    .await
                {
                    Some(b) => Some(b),
                    None => break,
                };
            }
            if let Some(at) = dials.next_slot() {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = stop.cancelled() => break,
                }
            }
            dials.last = Some(Instant::now());
            let channel = tokio::select! {
                c = Self::dial(endpoint) => c,
                () = stop.cancelled() => break,
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    let error = error_chain(&e);
                    tracing::warn!(endpoint = %uri, error = %error, "cannot connect to the central listener");
                    at += 1;
                    self.telemetry.send_failures.inc();
                    let _ = outcomes.send(Outcome::ConnectFailed {
                        error: error.clone(),
                    });
                    dials.found(false, &outcomes);
                    if let Some(batch) = carry.take() {
                        let _ = outcomes.send(Outcome::Returned {
                            batch,
                            reason: error,
                        });
                    }
                    // No backoff here: the next dial waits for its slot (one per interval).
                    continue;
                }
            };
            self.telemetry.reconnects.inc();
            let SessionEnd {
                clean,
                input_open,
                unreachable,
            } = self
                .session(
                    (channel, uri),
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
            // The session told the router what it found; the next dial waits for its slot.
            dials.unreachable = unreachable;
            if !clean {
                // The next replica, if there are several (`central.endpoints`).
                at += 1;
            }
            if !clean && !unreachable {
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

    /// One dial: a channel over exactly one TCP connection. tonic's channels reconnect by
    /// themselves when their connection drops; here that would dial again behind the pacing's
    /// back (a listener that accepts and closes would see two connections per dial), and a
    /// broken session is re-dialled by [`Self::run`] anyway.
    async fn dial(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        endpoint
            .connect_with_connector(OneConnection(Some(tcp)))
            .await
    }

    /// Waits for the next batch; while the listener is unreachable, checks it once per probe
    /// interval meanwhile. `None`: the input closed or `stop`.
    async fn next_batch(
        &self,
        input: &mut mpsc::Receiver<Batch>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        stop: &CancellationToken,
        dials: &mut Dials,
        endpoint: (&str, &Endpoint),
    ) -> Option<Batch> {
        loop {
            let check_at = dials.next_slot().or(dials.unreachable.then(Instant::now));
            tokio::select! {
                b = input.recv() => return b,
                () = stop.cancelled() => return None,
                () = async { tokio::time::sleep_until(check_at.unwrap()).await }, if check_at.is_some() => {
                    dials.last = Some(Instant::now());
                    let reachable = tokio::select! {
                        r = self.check(endpoint) => r,
                        () = stop.cancelled() => return None,
                    };
                    dials.found(reachable, outcomes);
                }
            }
        }
    }

    /// One `grpc.health.v1` check on a fresh connection: does the listener answer? Any answer
    /// but NOT_SERVING counts (a listener without the health service answers UNIMPLEMENTED,
    /// one that wants another token UNAUTHENTICATED: both are up); a failed dial, no answer
    /// within `connect_timeout`, or UNAVAILABLE does not.
    async fn check(&self, (uri, endpoint): (&str, &Endpoint)) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let answer = tokio::time::timeout(self.cfg.connect_timeout, async {
            let channel = Self::dial(endpoint).await.ok()?;
            let mut client = HealthClient::with_interceptor(channel, Bearer(self.token.clone()));
            Some(
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await,
            )
        })
        .await;
        let reachable = match answer {
            Ok(Some(Ok(r))) => r.into_inner().status != ServingStatus::NotServing as i32,
            Ok(Some(Err(status))) => !is_unanswered(status.code()),
            Ok(None) | Err(_) => false,
        };
        tracing::debug!(endpoint = %uri, reachable, "central listener checked");
        reachable
    }

    /// One stream on `channel` (to the endpoint `uri`), until it fails, the input closes, or
    /// `stop`.
    async fn session(
        &self,
        (channel, uri): (Channel, &str),
        input: &mut mpsc::Receiver<Batch>,
        first: Option<Batch>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let window = self.cfg.max_in_flight;
        let (tx, rx) = mpsc::channel::<apm_proto::Batch>(window);
        // A listener that accepts TCP but never answers (hung, SIGSTOPped) never sends the
        // stream's response headers: `connect_timeout` does not cover that wait, so the stop
        // must, or a shutdown would hang here past `limits.shutdown_timeout`.
        let mut client = self.client(channel);
        let opened = tokio::select! {
            r = client.stream(ReceiverStream::new(rx)) => r,
            () = stop.cancelled() => {
                if let Some(batch) = first {
                    let _ = outcomes.send(Outcome::Returned {
                        batch,
                        reason: "shutdown while opening the stream".into(),
                    });
                }
                return SessionEnd { clean: true, input_open: true, unreachable: false };
            }
        };
        let mut acks = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let error = format!("{}: {}", status.code(), escape_control(status.message()));
                tracing::warn!(error = %error, retriable = is_retriable(status.code()), "central listener refused the stream");
                self.telemetry.send_failures.inc();
                let _ = outcomes.send(Outcome::ConnectFailed {
                    error: error.clone(),
                });
                let unreachable = is_unanswered(status.code());
                if unreachable {
                    let _ = outcomes.send(Outcome::Reachability { reachable: false });
                }
                if let Some(batch) = first {
                    let _ = outcomes.send(Outcome::Returned {
                        batch,
                        reason: error,
                    });
                }
                return SessionEnd {
                    unreachable,
                    ..SessionEnd::FAILED
                };
            }
        };
        // The listener answered: a breaker still open since it went away may half-open now.
        let _ = outcomes.send(Outcome::Reachability { reachable: true });
        tracing::info!(endpoint = %uri, "streaming to the central listener");
        let _ = outcomes.send(Outcome::Connected);
        let mut w = Window {
            t: self,
            tx,
            outcomes,
            inflight: VecDeque::new(),
        };
        if let Some(batch) = first
            && !w.send(batch).await
        {
            return SessionEnd::FAILED;
        }
        let mut input_open = true;
        loop {
            if !input_open && w.inflight.is_empty() {
                return SessionEnd {
                    clean: true,
                    input_open: false,
                    unreachable: false,
                };
            }
            let ack_deadline = w.inflight.front().map(|s| s.at + self.cfg.ack_timeout);
            let failed = SessionEnd {
                clean: false,
                input_open,
                unreachable: false,
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    w.fail_all("shutdown");
                    return SessionEnd { clean: true, input_open, unreachable: false };
                }
                msg = acks.message() => match msg {
                    Ok(Some(ack)) => w.settle(ack, backoff),
                    Ok(None) => {
                        tracing::warn!(in_flight = w.inflight.len(), "central listener closed the stream");
                        w.fail_all("stream closed");
                        return failed;
                    }
                    Err(status) => {
                        let message = escape_control(status.message());
                        tracing::warn!(code = ?status.code(), message = %message, in_flight = w.inflight.len(), "stream to the central listener failed");
                        w.fail_all(&message);
                        return failed;
                    }
                },
                () = async { tokio::time::sleep_until(ack_deadline.unwrap()).await }, if ack_deadline.is_some() => {
                    tracing::warn!(timeout = ?self.cfg.ack_timeout, in_flight = w.inflight.len(), "no ack in time: reconnecting");
                    w.fail_all("ack timeout");
                    return failed;
                }
                b = input.recv(), if input_open && w.inflight.len() < window => match b {
                    Some(batch) => if !w.send(batch).await {
                        return SessionEnd::FAILED;
                    },
                    None => input_open = false,
                },
            }
        }
    }

    /// A client on `channel` with the bearer token, message limits and compression configured.
    fn client(&self, channel: Channel) -> CollectorClient<InterceptedService<Channel, Bearer>> {
        let client = CollectorClient::with_interceptor(channel, Bearer(self.token.clone()))
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        match self.cfg.compression {
            Compression::Zstd => client.send_compressed(CompressionEncoding::Zstd),
            Compression::Gzip => client.send_compressed(CompressionEncoding::Gzip),
            Compression::None => client,
        }
    }
}

/// Adds `authorization: Bearer ...` to every request when a token is configured.
#[derive(Clone)]
struct Bearer(Arc<BearerToken>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0.get() {
            req.metadata_mut().insert("authorization", t);
        }
        Ok(req)
    }
}

/// A connector that connects once: later calls (tonic's own reconnects) fail.
struct OneConnection(Option<hyper_util::client::legacy::connect::HttpConnector>);

impl tonic::codegen::Service<tonic::transport::Uri> for OneConnection {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // `HttpConnector` is always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        match self.0.take() {
            Some(mut tcp) => Box::pin(async move { Ok(tcp.call(uri).await?) }),
            None => Box::pin(async { Err("connection lost: the transport dials again".into()) }),
        }
    }
}

/// Paces dials to an unreachable listener: one per `central.probe_interval`, batch or check.
#[derive(Debug)]
struct Dials {
    interval: Duration,
    /// The last dial or check failed (or nothing is known yet).
    unreachable: bool,
    last: Option<Instant>,
}

impl Dials {
    /// When the next dial may start, if it must wait (only while unreachable).
    fn next_slot(&self) -> Option<Instant> {
        self.last
            .filter(|_| self.unreachable)
            .map(|l| l + self.interval)
    }

    /// Records what a dial or check found and tells the router (hence the breaker).
    fn found(&mut self, reachable: bool, outcomes: &mpsc::UnboundedSender<Outcome>) {
        self.unreachable = !reachable;
        let _ = outcomes.send(Outcome::Reachability { reachable });
    }
}

/// A batch awaiting its ack: when it was sent, and when it was sealed if this is its first send.
struct Sent {
    batch: Batch,
    at: Instant,
    sealed_at: Option<Instant>,
}

/// The batches of one stream that await their ack, oldest first.
struct Window<'a> {
    t: &'a Transport,
    tx: mpsc::Sender<apm_proto::Batch>,
    outcomes: &'a mpsc::UnboundedSender<Outcome>,
    inflight: VecDeque<Sent>,
}

impl Window<'_> {
    /// Sends one batch; `false` (and the window handed back) when the stream has closed.
    async fn send(&mut self, mut batch: Batch) -> bool {
        let t = self.t;
        let wire = batch.to_proto(&t.agent_id, &t.hostname, Some((t.host_stats)()));
        // Taken: if this send fails, the batch comes back without it and its ack, whenever it
        // comes, says nothing about how long a batch sealed now waits.
        let sealed_at = batch.sealed_at.take();
        self.inflight.push_back(Sent {
            batch,
            at: Instant::now(),
            sealed_at,
        });
        t.telemetry
            .in_flight_batches
            .set(self.inflight.len() as i64);
        if self.tx.send(wire).await.is_err() {
            self.fail_all("stream closed while sending");
            return false;
        }
        true
    }

    /// Settles the batch an ack names: stored, rejected for good, or back to the router.
    fn settle(&mut self, ack: apm_proto::Ack, backoff: &mut Backoff) {
        let Some(pos) = self.inflight.iter().position(|s| s.batch.seq == ack.seq) else {
            tracing::debug!(
                seq = ack.seq,
                "ack for a batch not in flight (already settled)"
            );
            return;
        };
        let Sent {
            batch,
            at: sent,
            sealed_at,
        } = self.inflight.remove(pos).expect("position is valid");
        let t = &self.t.telemetry;
        t.in_flight_batches.set(self.inflight.len() as i64);
        // The listener's text goes to logs, status and the spool's reasons: escaped once here.
        let message = escape_control(&ack.message).into_owned();
        let outcome = match AckStatus::try_from(ack.status).unwrap_or(AckStatus::Unspecified) {
            AckStatus::Ok => {
                backoff.reset();
                t.acked(sent.elapsed(), batch.len(), batch.payload_bytes());
                if let Some(sealed) = sealed_at {
                    t.sealed_to_acked(sealed.elapsed());
                }
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                t.delivered_after(now_ns, batch.profiles.iter().map(|p| p.received_ns));
                t.last_acked_seq.set(batch.seq as i64);
                Outcome::Acked {
                    seq: batch.seq,
                    profiles: batch.len(),
                    bytes: batch.payload_bytes(),
                }
            }
            AckStatus::Rejected => {
                tracing::error!(seq = batch.seq, message = %message, "central listener rejected a batch");
                Outcome::Rejected { batch, message }
            }
            AckStatus::Retry | AckStatus::Unspecified => {
                t.send_failures.inc();
                tracing::warn!(seq = batch.seq, message = %message, "central listener asked to retry a batch");
                Outcome::Returned {
                    batch,
                    reason: format!("retry: {message}"),
                }
            }
        };
        let _ = self.outcomes.send(outcome);
    }

    /// The stream is gone: every batch in flight goes back to the router.
    fn fail_all(&mut self, reason: &str) {
        for Sent { batch, .. } in self.inflight.drain(..) {
            self.t.telemetry.send_failures.inc();
            let _ = self.outcomes.send(Outcome::Returned {
                batch,
                reason: reason.to_string(),
            });
        }
        self.t.telemetry.in_flight_batches.set(0);
    }
}

/// The error and its sources, one line (escaped: the far side's text can be in it).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    escape_control(&s).into_owned()
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

    /// A central listener that answers with text meant to forge agent log lines: RETRY and
    /// REJECTED messages with newlines, then a stream error with one.
    struct Forger;

    #[tonic::async_trait]
    impl apm_proto::collector_server::Collector for Forger {
        type StreamStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<apm_proto::Ack, tonic::Status>> + Send>,
        >;
        async fn stream(
            &self,
            request: tonic::Request<tonic::Streaming<apm_proto::Batch>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(b)) = inbound.message().await {
                    let reply = match b.seq {
                        1 => Ok(apm_proto::Ack {
                            seq: 1,
                            status: AckStatus::Retry as i32,
                            message: "disk full\nFORGED retry line".into(),
                        }),
                        2 => Ok(apm_proto::Ack {
                            seq: 2,
                            status: AckStatus::Rejected as i32,
                            message: "bad\r\nFORGED rejected line\u{1b}[2J".into(),
                        }),
                        _ => Err(tonic::Status::unavailable("gone\nFORGED status line")),
                    };
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    /// A listener replica that acks every batch OK (`ok`), or breaks every stream at its
    /// first batch without an ack (a replica dying mid-stream).
    struct Replica {
        ok: bool,
    }

    #[tonic::async_trait]
    impl apm_proto::collector_server::Collector for Replica {
        type StreamStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<apm_proto::Ack, tonic::Status>> + Send>,
        >;
        async fn stream(
            &self,
            request: tonic::Request<tonic::Streaming<apm_proto::Batch>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let ok = self.ok;
            tokio::spawn(async move {
                while let Ok(Some(b)) = inbound.message().await {
                    let reply = if ok {
                        Ok(apm_proto::Ack {
                            seq: b.seq,
                            status: AckStatus::Ok as i32,
                            message: String::new(),
                        })
                    } else {
                        Err(tonic::Status::unavailable("replica going down"))
                    };
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    /// Serves a [`Replica`] on a free loopback port; its `http://` URI.
    async fn replica(ok: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(apm_proto::collector_server::CollectorServer::new(Replica {
                    ok,
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// With `central.endpoints`, a refused connect and a stream broken before its ack both move
    /// the transport to the next endpoint: the batch handed back (as the router resends it) is
    /// acked by the live replica, not sent to the dead ones again and again.
    #[tokio::test]
    async fn a_failed_connect_or_broken_stream_moves_to_the_next_endpoint() {
        // Bound and closed again: connections there are refused.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            format!("http://{}", l.local_addr().expect("addr"))
        };
        let breaking = replica(false).await;
        let live = replica(true).await;
        let cfg = CentralConfig {
            endpoints: vec![dead, breaking, live],
            compression: Compression::None,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(20),
            ..CentralConfig::default()
        };
        let (in_tx, mut out_rx, stop, run) = spawn_transport(cfg, Telemetry::new());
        in_tx.send(batch(7)).await.expect("send");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let acked = loop {
            let o = tokio::time::timeout_at(deadline, out_rx.recv())
                .await
                .unwrap_or_else(|_| {
                    seen.truncate(6);
                    panic!("no ack within 10 s; first outcomes: {seen:?}")
                })
                .expect("outcome");
            match o {
                Outcome::Returned { batch, reason } => {
                    seen.push(format!("returned: {reason}"));
                    in_tx.send(batch).await.expect("resend");
                }
                Outcome::Acked { seq, .. } => break seq,
                Outcome::ConnectFailed { error } => seen.push(format!("connect failed: {error}")),
                Outcome::Connected => seen.push("connected".into()),
                Outcome::Reachability { reachable } => seen.push(format!("reachable: {reachable}")),
                Outcome::Rejected { message, .. } => panic!("rejected: {message}"),
            }
        };
        assert_eq!(acked, 7);
        // One refused connect, one broken stream, then the live replica: nothing more.
        let returned = seen.iter().filter(|s| s.starts_with("returned")).count();
        assert_eq!(returned, 2, "{seen:?}");
        stop.cancel();
        run.await.expect("transport ends");
    }

    /// The performance issue, item 5: the batcher seals `batch.max_age` less a lead meant to
    /// cover the whole seal -> ack time of a batch, including its wait between sealing and
    /// sending (the batch channel, the router, a full window), not only send -> ack. Here a
    /// batch the batch stage sealed waits 300 ms before the transport takes it, and the listener
    /// acks it at once: the lead the batcher reads afterwards is at least those 300 ms.
    #[tokio::test]
    async fn the_batchers_lead_covers_seal_to_send_not_only_send_to_ack() {
        let live = replica(true).await;
        let telemetry = Telemetry::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let (ptx, prx) = crate::pipeline::ingest::profile_queue(1 << 20);
        let (btx, mut brx) = mpsc::channel(4);
        let stage = crate::pipeline::batch::BatchStage {
            cfg: crate::config::BatchConfig {
                max_items: 1,
                ..Default::default()
            },
            seqs: crate::state::SeqAllocator::open(dir.path()).expect("seqs"),
            live: Arc::default(),
            telemetry: telemetry.clone(),
            deadline: CancellationToken::new(),
        };
        tokio::spawn(crate::pipeline::batch::run(stage, prx, btx));
        let profile = batch(0).profiles.remove(0);
        ptx.send(vec![profile], &crate::pipeline::durable::Gate::default())
            .await
            .expect("queue");
        let sealed = brx.recv().await.expect("sealed batch");
        tokio::time::sleep(Duration::from_millis(300)).await;

        let cfg = CentralConfig {
            endpoint: live,
            compression: Compression::None,
            ..CentralConfig::default()
        };
        let (in_tx, mut out_rx, stop, run) = spawn_transport(cfg, telemetry.clone());
        in_tx.send(sealed).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, out_rx.recv()).await {
                Ok(Some(Outcome::Acked { .. })) => break,
                Ok(Some(_)) => {}
                other => panic!("no ack within 10 s: {other:?}"),
            }
        }
        let lead = telemetry.seal_lead();
        assert!(
            lead >= Duration::from_millis(300),
            "lead {lead:?} does not cover the 300 ms between seal and send"
        );
        stop.cancel();
        run.await.expect("transport ends");
    }

    /// A transport to `cfg` on its own task: its input, its outcomes, its stop and its task.
    fn spawn_transport(
        cfg: CentralConfig,
        telemetry: Arc<Telemetry>,
    ) -> (
        mpsc::Sender<Batch>,
        mpsc::UnboundedReceiver<Outcome>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let t = Transport::new(
            cfg,
            "a1".into(),
            "h".into(),
            telemetry,
            Arc::new(HostStats::default),
        )
        .expect("transport");
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let run = tokio::spawn(t.run(in_rx, out_tx, stop.clone()));
        (in_tx, out_rx, stop, run)
    }

    fn batch(seq: u64) -> Batch {
        Batch {
            seq,
            epoch: 0,
            sealed_at: None,
            profiles: vec![crate::pipeline::model::Profile {
                payload: bytes::Bytes::from_static(b"{}"),
                received_ns: 1,
                pid: 2,
                uid: 3,
                rss_bytes: 0,
            }],
        }
    }

    /// Messages from the central listener reach the agent's outcomes (hence its status and its
    /// logs) escaped: no raw CR, LF or ESC, so a listener cannot forge agent log lines.
    #[tokio::test]
    async fn listener_messages_are_escaped_before_they_reach_logs() {
        let (capture, _guard) = crate::logcapture::LogCapture::start();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(apm_proto::collector_server::CollectorServer::new(Forger))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let cfg = CentralConfig {
            endpoint: format!("http://{addr}"),
            compression: Compression::None,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(20),
            ..CentralConfig::default()
        };
        let (in_tx, mut out_rx, stop, run) = spawn_transport(cfg, Telemetry::new());
        let mut texts = Vec::new();
        for seq in 1..=3 {
            in_tx.send(batch(seq)).await.expect("send");
            loop {
                let o = tokio::time::timeout(Duration::from_secs(10), out_rx.recv())
                    .await
                    .expect("an outcome in time")
                    .expect("outcome");
                match o {
                    Outcome::Returned { reason, .. } => {
                        texts.push(reason);
                        break;
                    }
                    Outcome::Rejected { message, .. } => {
                        texts.push(message);
                        break;
                    }
                    Outcome::ConnectFailed { error } => texts.push(error),
                    Outcome::Connected | Outcome::Acked { .. } | Outcome::Reachability { .. } => {}
                }
            }
        }
        stop.cancel();
        run.await.expect("transport ends");

        for t in &texts {
            assert!(
                !t.contains(['\n', '\r', '\u{1b}']),
                "raw control character in {t:?}"
            );
        }
        assert!(
            texts[0].contains("disk full\\nFORGED retry line"),
            "{texts:?}"
        );
        assert!(
            texts[1].contains("bad\\r\\nFORGED rejected line\\u{1b}[2J"),
            "{texts:?}"
        );
        assert!(texts[2].contains("gone\\nFORGED status line"), "{texts:?}");
        let log = capture.text();
        for line in log.lines() {
            assert!(
                !line.starts_with("FORGED"),
                "forged log line {line:?} in:\n{log}"
            );
        }
        for escaped in ["disk full\\nFORGED", "bad\\r\\nFORGED", "gone\\nFORGED"] {
            assert!(
                log.contains(escaped),
                "{escaped} not logged escaped:\n{log}"
            );
        }
    }

    /// A dead listener (here: a port that accepts and closes at once, so every dial is
    /// counted) sees at most one dial per `probe_interval`, even with a router that hands every
    /// returned batch straight back and a reconnect backoff of 10 ms; and while no batch comes
    /// it is still checked, once per interval, each finding reported to the router.
    #[tokio::test]
    async fn a_dead_listener_is_dialled_at_most_once_per_probe_interval() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = dead.local_addr().expect("addr");
        let dials = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = dials.clone();
        std::thread::spawn(move || {
            for conn in dead.incoming() {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(conn);
            }
        });
        let interval = Duration::from_millis(200);
        let cfg = CentralConfig {
            endpoint: format!("http://{addr}"),
            compression: Compression::None,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(20),
            connect_timeout: Duration::from_secs(1),
            probe_interval: interval,
            ..CentralConfig::default()
        };
        let (in_tx, mut out_rx, stop, run) = spawn_transport(cfg, Telemetry::new());
        let start = std::time::Instant::now();
        let span = Duration::from_secs(2);
        // Phase 1 (a closed breaker's worst case): every returned batch is handed back at once.
        in_tx.send(batch(1)).await.expect("send");
        let mut unreachable = 0;
        while start.elapsed() < span {
            match tokio::time::timeout(Duration::from_millis(50), out_rx.recv()).await {
                Ok(Some(Outcome::Returned { batch, .. })) => {
                    in_tx.send(batch).await.expect("send");
                }
                Ok(Some(Outcome::Reachability { reachable: false })) => unreachable += 1,
                Ok(Some(_) | None) | Err(_) => {}
            }
        }
        let phase1 = dials.load(std::sync::atomic::Ordering::Relaxed);
        // Phase 2 (an open breaker): no batches; the transport checks on its own.
        let mid = std::time::Instant::now();
        while mid.elapsed() < span {
            if let Ok(Some(Outcome::Reachability { reachable: false })) =
                tokio::time::timeout(Duration::from_millis(50), out_rx.recv()).await
            {
                unreachable += 1;
            }
        }
        let total = dials.load(std::sync::atomic::Ordering::Relaxed);
        let elapsed = start.elapsed();
        stop.cancel();
        run.await.expect("transport ends");
        let most = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() as u64 + 1;
        println!("{phase1} dials with batches, {total} in all over {elapsed:?} (at most {most})");
        assert!(
            total <= most,
            "{total} dials in {elapsed:?}: more than one per {interval:?}"
        );
        // It kept dialling in both phases (generous lower bounds: a loaded machine is slow).
        assert!(
            phase1 >= 2 && total - phase1 >= 2,
            "{phase1} then {}",
            total - phase1
        );
        assert!(
            unreachable >= 4,
            "{unreachable} unreachable findings reported"
        );
    }

    /// The check a transport makes while it has no batch: a listener without the health
    /// service (UNIMPLEMENTED) is up; one whose health service says NOT_SERVING (shutting
    /// down) is not.
    #[tokio::test]
    async fn a_check_counts_any_answer_but_not_serving() {
        async fn found(server: tonic::transport::server::Router) -> bool {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let served = tokio::spawn(
                server
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let cfg = CentralConfig {
                endpoint: format!("http://{addr}"),
                probe_interval: Duration::from_millis(100),
                ..CentralConfig::default()
            };
            let t = Transport::new(
                cfg,
                "a1".into(),
                "h".into(),
                Telemetry::new(),
                Arc::new(HostStats::default),
            )
            .expect("transport");
            let (_in_tx, in_rx) = mpsc::channel(4);
            let (out_tx, mut out_rx) = mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            let run = tokio::spawn(t.run(in_rx, out_tx, stop.clone()));
            // Nothing is known at start, so the transport checks at once, with no batch.
            let reachable = loop {
                if let Outcome::Reachability { reachable } =
                    tokio::time::timeout(Duration::from_secs(10), out_rx.recv())
                        .await
                        .expect("a finding in time")
                        .expect("outcome")
                {
                    break reachable;
                }
            };
            stop.cancel();
            run.await.expect("transport ends");
            served.abort();
            reachable
        }
        let no_health = tonic::transport::Server::builder()
            .add_service(apm_proto::collector_server::CollectorServer::new(Forger));
        assert!(found(no_health).await, "UNIMPLEMENTED is an answer");
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let not_serving = tonic::transport::Server::builder().add_service(health_svc);
        assert!(!found(not_serving).await, "NOT_SERVING is not reachable");
    }

    /// The `authorization` value is marked sensitive, so HTTP/2 never puts it in the HPACK
    /// dynamic table (and debug output of the headers hides it).
    #[test]
    fn authorization_header_is_sensitive() {
        let cfg = CentralConfig {
            token: Some("s3cr3t".into()),
            ..CentralConfig::default()
        };
        let t = Transport::new(
            cfg,
            "a".into(),
            "h".into(),
            Telemetry::new(),
            Arc::new(HostStats::default),
        )
        .expect("transport");
        let req = Bearer(t.token.clone())
            .call(tonic::Request::new(()))
            .expect("intercepted");
        let v = req.metadata().get("authorization").expect("set");
        assert_eq!(v.as_bytes(), b"Bearer s3cr3t");
        assert!(v.is_sensitive());
    }

    #[test]
    fn status_codes_are_sorted_once() {
        assert!(is_retriable(tonic::Code::Unavailable));
        assert!(!is_retriable(tonic::Code::Unauthenticated));
        assert!(!is_retriable(tonic::Code::InvalidArgument));
    }
}
