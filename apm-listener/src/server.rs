//! Starting and stopping the listener: recovery, the writer thread, the gRPC server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apm_proto::collector_server::CollectorServer;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, info, warn};

use crate::auth::{Auth, AuthError};

use crate::jetstream::{JetStreamConfig, JetStreamError, Publisher, PublisherFaults};
use crate::service::{CollectorService, Shared};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{self, StoreError, Writer, WriterMsg, WriterOptions};

/// Batches queued for the writer, over all streams.
const WRITER_QUEUE: usize = 256;
/// How long shutdown waits for streams to ack what was stored and for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TLS configuration (check --tls-cert and --tls-key): {0}")]
    Tls(tonic::transport::Error),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("gRPC server stopped unexpectedly")]
    Stopped,
    #[error("recovering the output file panicked or was cancelled: {0}")]
    Join(tokio::task::JoinError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    JetStream(#[from] JetStreamError),
}

/// The store's writer: the file store's thread or the JetStream publisher's task.
enum WriterHandle {
    Thread(std::thread::JoinHandle<()>),
    Task(JoinHandle<()>),
}

/// PEM files of the server certificate (chain) and its private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Fault injection for tests: never set these in production.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// After storing the N-th batch (1-based, across connections), drop its stream without the
    /// ack, once.
    pub drop_before_ack: Option<u64>,
    /// Every ack waits this long after its write completed.
    pub ack_delay: Duration,
    /// Answer the first N batches RETRY without storing them.
    pub fail_first: u64,
    /// Answer the N batches after those REJECTED without storing them.
    pub reject_first: u64,
}

/// Bounds on what agents can make the listener hold (see `docs/listener.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; one more is closed at accept.
    pub max_connections: usize,
    /// HTTP/2 streams open at once per connection.
    pub max_concurrent_streams: u32,
    /// Largest accepted (decompressed) batch.
    pub max_message_bytes: usize,
    /// Dedup series (agent id + epoch) tracked at most.
    pub max_series: usize,
    /// Seq ranges per series at most.
    pub max_ranges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,      // a fleet's agents, one connection each, plus slack
            max_concurrent_streams: 16, // an agent opens one stream per connection
            max_message_bytes: 64 << 20, // the agent's own encoding limit
            max_series: store::DEFAULT_MAX_SERIES,
            max_ranges: store::DEFAULT_MAX_RANGES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// The file store's output file (unused when `jetstream` is set).
    pub out: PathBuf,
    /// Store into this JetStream stream instead of `out` (`--store jetstream:...`).
    pub jetstream: Option<JetStreamConfig>,
    /// Require `authorization: Bearer <token>` (any agent id).
    pub token: Option<String>,
    /// `AGENT_ID TOKEN` lines: each token may only send for its agent id.
    pub tokens_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// fdatasync each group before acking (else: acked once write(2) returned).
    pub fsync: bool,
    pub limits: Limits,
    pub faults: Faults,
    /// Period of the stats log line; zero disables it (the exit line stays).
    pub stats_interval: Duration,
}

impl ListenerConfig {
    pub fn new(listen: SocketAddr, out: PathBuf) -> Self {
        Self {
            listen,
            out,
            jetstream: None,
            token: None,
            tokens_file: None,
            tls: None,
            fsync: false,
            limits: Limits::default(),
            faults: Faults::default(),
            stats_interval: Duration::from_secs(10),
        }
    }
}

/// A running listener.
pub struct Listener {
    local_addr: SocketAddr,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    writer_tx: mpsc::Sender<WriterMsg>,
    writer: WriterHandle,
    ticker: JoinHandle<()>,
    health: HealthReporter,
    started: Instant,
}

impl Listener {
    /// Recovers the output file, starts the writer, binds and serves.
    pub async fn start(cfg: ListenerConfig) -> Result<Self, ServerError> {
        let auth = match (&cfg.tokens_file, &cfg.token) {
            (Some(path), _) => Auth::from_tokens_file(path)?,
            (None, Some(token)) => Auth::shared(token),
            (None, None) => Auth::Open,
        };
        let tls = match &cfg.tls {
            Some(files) => {
                let read = |what, path: &PathBuf| {
                    std::fs::read(path).map_err(|source| ServerError::TlsFile {
                        what,
                        path: path.clone(),
                        source,
                    })
                };
                let identity =
                    Identity::from_pem(read("certificate", &files.cert)?, read("key", &files.key)?);
                Some(ServerTlsConfig::new().identity(identity))
            }
            None => None,
        };

        let stats = Arc::new(Stats::default());
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
        let writer = match &cfg.jetstream {
            Some(js) => start_publisher(js, &cfg.faults, stats.clone(), writer_rx).await?,
            None => start_file_writer(&cfg, stats.clone(), writer_rx).await?,
        };

        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let incoming = limit_connections(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cfg.limits.max_connections,
            stats.clone(),
        );

        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            writer: writer_tx.clone(),
            stats: stats.clone(),
            auth,
            ack_delay: cfg.faults.ack_delay,
            shutdown: shutdown.clone(),
        });
        let svc = CollectorServer::new(CollectorService::new(shared))
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(cfg.limits.max_message_bytes);
        // `grpc.health.v1`: "" and the Collector answer SERVING until shutdown starts.
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_serving::<CollectorServer<CollectorService>>()
            .await;
        let mut builder = Server::builder()
            .max_concurrent_streams(Some(cfg.limits.max_concurrent_streams))
            // Agents send one small header; a client that sends huge ones is not an agent.
            .http2_max_header_list_size(Some(64 << 10))
            // Large windows: a batch of 1 KiB profiles is ~1 MiB, and 64 KiB windows would
            // cost a round trip every 64 KiB.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(ServerError::Tls)?;
        }
        let signal = shutdown.clone();
        let serve = tokio::spawn(
            builder
                .add_service(health_svc)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move { signal.cancelled().await }),
        );

        let ticker = tokio::spawn(stats_ticker(stats.clone(), cfg.stats_interval));
        info!(
            addr = %local_addr,
            out = %cfg.out.display(),
            jetstream = cfg.jetstream.as_ref().map(|j| format!("{} stream {} subject {}", j.servers.join(","), j.stream, j.subject)),
            tls = cfg.tls.is_some(),
            token = cfg.token.is_some(),
            tokens_file = cfg.tokens_file.as_ref().map(|p| p.display().to_string()),
            fsync = cfg.fsync,
            limits = ?cfg.limits,
            "apm-listener serving"
        );
        if cfg.jetstream.is_some() && cfg.fsync {
            // Durability is the stream's (a quorum of NATS nodes), not a local file's.
            warn!(
                "--fsync has no effect with --store jetstream: (the stream's replicas make a batch durable)"
            );
        }
        if cfg.faults.drop_before_ack.is_some()
            || cfg.faults.fail_first > 0
            || cfg.faults.reject_first > 0
            || !cfg.faults.ack_delay.is_zero()
        {
            warn!(faults = ?cfg.faults, "fault injection is on: for tests only");
        }
        Ok(Self {
            local_addr,
            stats,
            shutdown,
            serve,
            writer_tx,
            writer,
            ticker,
            health,
            started: Instant::now(),
        })
    }

    /// The bound address (the real port with `--listen 127.0.0.1:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Resolves if the gRPC server stops by itself (it should not before `shutdown`).
    pub async fn failed(&mut self) -> ServerError {
        match (&mut self.serve).await {
            Ok(Err(e)) => ServerError::Serve(e),
            Ok(Ok(())) => ServerError::Stopped,
            Err(e) => ServerError::Join(e),
        }
    }

    /// Stops accepting, lets every stream ack what was stored, finishes the writes, and logs the
    /// final stats.
    pub async fn shutdown(self) -> Result<StatsSnapshot, ServerError> {
        // Probes see NOT_SERVING while the streams drain.
        self.health
            .set_not_serving::<CollectorServer<CollectorService>>()
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.shutdown.cancel();
        let mut serve = self.serve;
        let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await {
            Ok(Ok(r)) => r.map_err(ServerError::Serve),
            Ok(Err(e)) => Err(ServerError::Join(e)),
            Err(_) => {
                warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
                serve.abort();
                Ok(())
            }
        };
        self.ticker.abort();
        // Everything queued before Stop is written and answered; later batches are not acked.
        let _ = self.writer_tx.send(WriterMsg::Stop).await;
        drop(self.writer_tx);
        match self.writer {
            WriterHandle::Thread(writer) => {
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            }
            WriterHandle::Task(task) => {
                let _ = task.await;
            }
        }
        let snap = self.stats.snapshot();
        snap.log(
            "apm-listener stopped",
            &StatsSnapshot::default(),
            self.started.elapsed().as_secs_f64(),
        );
        served.map(|()| snap)
    }
}

/// Recovers the output file and starts the file store's writer thread.
async fn start_file_writer(
    cfg: &ListenerConfig,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<WriterMsg>,
) -> Result<WriterHandle, ServerError> {
    let out = cfg.out.clone();
    let (file, seen, rec) = tokio::task::spawn_blocking(move || store::open(&out))
        .await
        .map_err(ServerError::Join)??;
    info!(
        path = %cfg.out.display(),
        batches = rec.batches,
        lines = rec.lines,
        agents = seen.len(),
        ranges = seen.values().map(super::intervals::IntervalSet::range_count).sum::<usize>(),
        foreign_lines = rec.foreign_lines,
        broken_batches = rec.broken_batches,
        truncated_bytes = rec.truncated_bytes,
        "output file recovered"
    );
    let opts = WriterOptions {
        fsync: cfg.fsync,
        max_series: cfg.limits.max_series,
        max_ranges: cfg.limits.max_ranges,
        fail_first: cfg.faults.fail_first,
        reject_first: cfg.faults.reject_first,
        drop_before_ack: cfg.faults.drop_before_ack,
    };
    let writer = Writer::new(file, cfg.out.clone(), rec.len, seen, opts, stats).spawn(rx)?;
    Ok(WriterHandle::Thread(writer))
}

/// Connects to NATS, makes sure the stream exists, and starts the JetStream publisher.
async fn start_publisher(
    js: &JetStreamConfig,
    faults: &Faults,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<WriterMsg>,
) -> Result<WriterHandle, ServerError> {
    let client = crate::jetstream::connect(js, "apm-listener").await?;
    let ctx = async_nats::jetstream::ContextBuilder::new()
        .timeout(js.publish_timeout)
        .build(client);
    crate::jetstream::ensure_stream(&ctx, js).await?;
    info!(servers = %js.servers.join(","), stream = %js.stream, subject = %js.subject,
          replicas = js.replicas, duplicate_window = ?js.duplicate_window, "JetStream store ready");
    let publisher = Publisher::new(
        ctx,
        js.subject.clone(),
        stats,
        PublisherFaults {
            fail_first: faults.fail_first,
            reject_first: faults.reject_first,
            drop_before_ack: faults.drop_before_ack,
        },
    );
    Ok(WriterHandle::Task(tokio::spawn(publisher.run(rx))))
}

/// A connection that holds one of the `--max-connections` permits until it is dropped.
pub struct LimitedConn {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Admits at most `max` open connections; one more is closed at once (counted), so its agent
/// sees an error and backs off instead of waiting in the accept queue.
fn limit_connections(
    incoming: TcpIncoming,
    max: usize,
    stats: Arc<Stats>,
) -> impl Stream<Item = std::io::Result<LimitedConn>> {
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |conn| match conn {
        Ok(inner) => {
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                Some(Ok(LimitedConn {
                    inner,
                    _permit: permit,
                }))
            } else {
                stats.refused_connections.fetch_add(1, Relaxed);
                debug!(peer = ?inner.peer_addr().ok(), max, "connection closed: --max-connections reached");
                None
            }
        }
        Err(e) => Some(Err(e)),
    })
}

async fn stats_ticker(stats: Arc<Stats>, every: Duration) {
    if every.is_zero() {
        return;
    }
    let mut prev = stats.snapshot();
    let mut last = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let now = stats.snapshot();
        now.log("apm-listener stats", &prev, last.elapsed().as_secs_f64());
        prev = now;
        last = Instant::now();
    }
}
