//! Control: the status document (`status --json`), the control socket in
//! `control.runtime_dir` (status, reload, pause, resume), and Prometheus `/metrics`.
//!
//! Control socket protocol: the client writes one command line (`status`, `reload`, `pause`,
//! `resume`) and reads one JSON line back.

use apm_control::{Reply, Status};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::events::{AcceptFailed, ConnectionRefused};
use crate::phpctl::{KillReason, PhpControl};
use crate::telemetry::{
    ConnRefusal, DropReason, RejectReason, Server, Socket, SocketLabels, Telemetry,
};

/// A status section another part supplies (the eBPF monitor's).
pub type Section = Arc<dyn Fn() -> Value + Send + Sync>;

#[derive(Clone)]
pub struct StatusSource {
    pub telemetry: Arc<Telemetry>,
    pub php: Arc<PhpControl>,
    pub agent_id: String,
    /// The seq series' epoch (hex) and whether this start began it (seq state was missing).
    pub epoch: String,
    pub new_epoch: bool,
    pub endpoint: String,
    pub config_path: Option<PathBuf>,
    pub ebpf: Section,
    /// Restarts by re-exec since the process started (`apm-agent restart`).
    pub restarts: u64,
    /// The stages' heartbeats and reported failures.
    pub live: Arc<crate::pipeline::liveness::Liveness>,
    /// Secret files every local user can read, found at start
    /// (`config::secrets_readable_by_others`).
    pub secrets_readable_by_others: Vec<String>,
}

impl StatusSource {
    /// The breaker's state as status and the watchdog's line name it.
    pub fn breaker(&self) -> &'static str {
        match self.telemetry.breaker_state.get() {
            1 => "open",
            2 => "half_open",
            _ => "closed",
        }
    }

    pub fn status(&self) -> Status {
        let t = &self.telemetry;
        let rejected_by_reason = RejectReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), t.rejected_of(*r)))
            .collect();
        let mut dropped: std::collections::BTreeMap<String, u64> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), t.dropped_of(*r)))
            .collect();
        dropped.insert("total".into(), t.dropped_total());
        let by_socket = |socket| t.received.get_or_create(&SocketLabels { socket }).get();
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: t.uptime_s(),
            restarts: self.restarts,
            agent_id: self.agent_id.clone(),
            epoch: self.epoch.clone(),
            epoch_started_now: self.new_epoch,
            endpoint: self.endpoint.clone(),
            config_path: self.config_path.as_ref().map(|p| p.display().to_string()),
            received: t.received_total(),
            received_dgram: by_socket(Socket::Dgram),
            received_stream: by_socket(Socket::Stream),
            received_bytes: t.received_bytes.get(),
            rejected: t.rejected_total(),
            rejected_by_reason,
            delivered: t.delivered.get(),
            delivered_batches: t.delivered_batches.get(),
            last_acked_seq: t.last_acked_seq.get(),
            in_flight_batches: t.in_flight_batches.get(),
            memory_payload_bytes: t.memory_payload_bytes.get(),
            at_risk_profiles: t.at_risk_profiles(),
            durable_profiles: t.durable_profiles.get(),
            spooled_profiles: u64::try_from(t.spooled_profiles.get()).unwrap_or(0),
            backpressure: t.backpressure.get() != 0,
            backpressure_episodes: t.backpressure_episodes.get(),
            send_failures: t.send_failures.get(),
            reconnects: t.reconnects.get(),
            spooled_batches: t.spooled_batches.get(),
            spool_bytes: t.spool_bytes.get(),
            spool_capacity_bytes: t.spool_capacity_bytes.get(),
            dropped,
            breaker: self.breaker().to_string(),
            stage_failures: self.live.failures(),
            secrets_readable_by_others: self.secrets_readable_by_others.clone(),
            stream_connections: t.stream_connections.get(),
            connections_refused: {
                let mut m: std::collections::BTreeMap<String, u64> = ConnRefusal::ALL
                    .iter()
                    .map(|r| (r.as_str().to_string(), t.connections_refused_of(*r)))
                    .collect();
                m.insert("total".into(), m.values().sum());
                m
            },
            accept_errors: Server::ALL
                .iter()
                .map(|s| (s.as_str().to_string(), t.accept_errors_of(*s)))
                .collect(),
            queue_len: t.dgram_queue_len.get(),
            rss_bytes: crate::telemetry::self_rss_bytes(),
            sample_rate: self.php.sample_rate(),
            sample_rate_below_one_seconds: self.php.below_one_seconds(),
            unprofiled_requests_estimate: self.php.unprofiled_estimate(),
            kill_switch: self
                .php
                .kill_reasons()
                .into_iter()
                .map(String::from)
                .collect(),
            ebpf: (self.ebpf)(),
        }
    }
}

/// Requests the control socket forwards to the daemon's main loop.
#[derive(Debug)]
pub enum ControlRequest {
    Reload(tokio::sync::oneshot::Sender<Result<String, String>>),
    /// Restart in place: flush, hand the sockets to a fresh image of the binary.
    Restart(tokio::sync::oneshot::Sender<Result<String, String>>),
}

/// Serves the control socket until `shutdown`.
/// Binds the control socket (before readiness is announced, so `start` can rely on it).
pub fn bind_control(path: &std::path::Path) -> std::io::Result<UnixListener> {
    let _ = crate::pipeline::ingest::socket::remove_stale(path, false);
    // Only root (and the agent's user) may steer the agent: created 0600, never chmodded by
    // path afterwards.
    crate::pipeline::ingest::socket::bind_with_mode(0o600, || UnixListener::bind(path))
}

pub async fn serve_control(
    listener: UnixListener,
    path: PathBuf,
    source: StatusSource,
    requests: mpsc::Sender<ControlRequest>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(error) => {
                    AcceptFailed { server: Server::Control, error: &error }.back_off(&source.telemetry).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (source, requests) = (source.clone(), requests.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd);
            if tokio::time::timeout(std::time::Duration::from_secs(5), rd.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let reply = handle(line.trim(), &source, &requests).await;
            let mut out = reply.to_string();
            out.push('\n');
            let _ = wr.write_all(out.as_bytes()).await;
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(
    cmd: &str,
    source: &StatusSource,
    requests: &mpsc::Sender<ControlRequest>,
) -> Value {
    let ok = |msg: &str| serde_json::to_value(Reply::ok(msg)).unwrap_or_default();
    let err = |msg: String| serde_json::to_value(Reply::err(msg)).unwrap_or_default();
    match cmd {
        "status" => serde_json::to_value(source.status()).unwrap_or_default(),
        "pause" => match source.php.raise(KillReason::Paused) {
            Ok(()) => ok("PHP kill switch raised: listener.php sends nothing until `resume`"),
            Err(e) => err(format!(
                "cannot write {}: {e}",
                source.php.disabled_path().display()
            )),
        },
        "resume" => match source.php.lower(KillReason::Paused) {
            Ok(()) => ok("pause lifted"),
            Err(e) => err(format!(
                "cannot update {}: {e}",
                source.php.disabled_path().display()
            )),
        },
        "reload" | "restart" => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let req = if cmd == "reload" {
                ControlRequest::Reload(tx)
            } else {
                ControlRequest::Restart(tx)
            };
            if requests.send(req).await.is_err() {
                return err("agent is shutting down".into());
            }
            match rx.await {
                Ok(Ok(m)) => ok(&m),
                Ok(Err(e)) => err(e),
                Err(_) => err("agent is shutting down".into()),
            }
        }
        other => err(format!(
            "unknown command `{other}` (status, reload, restart, pause, resume)"
        )),
    }
}

/// At most this many `/metrics` connections are served at once; more are accepted and closed
/// at once (counted as `metrics_limit`), so idle clients cannot take the agent's descriptors.
/// A scraper and a curl or two need a handful.
pub const METRICS_MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time of connecting.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No `/metrics` connection lives longer than this (one request each: no keep-alive).
pub const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(15);

/// Serves `/metrics` (Prometheus text) and `/status` (JSON) on `addr` until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    source: StatusSource,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(METRICS_MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(error) => {
                    AcceptFailed { server: Server::Metrics, error: &error }.back_off(&source.telemetry).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ConnectionRefused {
                reason: ConnRefusal::MetricsLimit,
                pid: None,
                uid: None,
            }
            .emit(&source.telemetry);
            drop(stream);
            continue;
        };
        let (registry, source) = (registry.clone(), source.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (registry, source) = (registry.clone(), source.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(respond(
                            req.uri().path(),
                            &registry,
                            &source,
                        ))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            // Without a timer hyper enforces no header timeout: an idle client would hold its
            // descriptor for ever.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(io, svc);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, conn).await;
        });
    }
}

/// The answer to one request on the metrics port.
fn respond(path: &str, registry: &Registry, source: &StatusSource) -> hyper::Response<Full<Bytes>> {
    let (code, ctype, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => (500, "text/plain", e.to_string()),
            }
        }
        "/status" => (
            200,
            "application/json",
            serde_json::to_string(&source.status()).unwrap_or_default(),
        ),
        _ => (404, "text/plain", "try /metrics or /status\n".to_string()),
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

#[cfg(test)]
mod socket_mode_tests {
    use std::os::unix::fs::PermissionsExt;

    /// docs/security.md: only root may steer the agent (status, reload, pause, restart).
    #[tokio::test]
    async fn the_control_socket_is_for_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let _l = super::bind_control(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// docs/security.md: `/metrics` (and `/status`) are not served to the network by default.
    #[test]
    fn metrics_listen_defaults_to_loopback() {
        let addr: std::net::SocketAddr = crate::config::Config::default()
            .control
            .metrics_listen
            .parse()
            .unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
    }
}
