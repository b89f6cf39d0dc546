//! `apm-agent run`: builds the pipeline, reports readiness, handles signals, and shuts down in
//! pipeline order: ingest drains the kernel queue, the batcher seals what it holds, the router
//! delivers within `limits.shutdown_timeout`, and whatever is left is spooled or counted.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{ControlRequest, StatusSource};
use crate::ingest::{Ingest, Sockets};
use crate::phpctl::PhpControl;
use crate::pidfile::PidFile;
use crate::router::{Router, RouterIo};
use crate::state::{SeqAllocator, load_or_create_agent_id};
use crate::telemetry::{DropReason, Telemetry};
use crate::transport::Transport;

/// Exit codes of `run`.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const CONFIG: i32 = crate::config::EX_CONFIG;
}

/// Tells whoever started us that we are ready (systemd `READY=1`, or `apm-agent start`'s pipe).
fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
    if let Some(fd) = std::env::var("APM_READY_FD").ok().and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: `apm-agent start` passed us the write end of a pipe under this number.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = std::io::Write::write_all(&mut &f, b"ready\n");
    }
}

pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<i32> {
    let _pid = PidFile::acquire(&cfg.control.pid_file, config_path.as_deref())?;
    for dir in [&cfg.control.runtime_dir, &cfg.control.state_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let telemetry = Telemetry::new();
    let php = Arc::new(
        PhpControl::new(&cfg.control.runtime_dir)
            .with_context(|| format!("cannot write PHP control files in {}", cfg.control.runtime_dir.display()))?,
    );
    let sockets = Sockets::bind(&cfg.ingest, cfg.socket_mode())?;
    let agent_id = load_or_create_agent_id(&cfg.control.state_dir, &cfg.central.agent_id)?;
    let seqs = SeqAllocator::open(&cfg.control.state_dir)?;
    let hostname = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();

    let shutdown = CancellationToken::new(); // ingest: stop reading, drain
    let deadline = CancellationToken::new(); // router/transport: stop waiting for acks

    let mut registry = Registry::default();
    telemetry.register(&mut registry);

    let ebpf_section: crate::control::Section =
        Arc::new(|| json!({"enabled": false, "reason": "not built into this agent"}));
    let breaker_section: crate::control::Section = Arc::new(|| json!("closed"));

    let host_stats = {
        let t = telemetry.clone();
        let php = php.clone();
        Arc::new(move || apm_proto::HostStats {
            received_total: t.received_total(),
            rejected_total: t.rejected_total(),
            dropped_total: t.dropped_total(),
            spool_bytes: t.spool_bytes.get() as u64,
            agent_rss_bytes: t.agent_rss_bytes.get() as u64,
            sample_rate: php.sample_rate(),
            ..Default::default()
        })
    };
    let transport = Transport::new(cfg.central.clone(), agent_id.clone(), hostname, telemetry.clone(), host_stats)?;

    let (profile_tx, profile_rx) = mpsc::channel(256);
    let (batch_tx, batch_rx) = mpsc::channel(4);
    let (wire_tx, wire_rx) = mpsc::channel(1);
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();

    let ingest = Ingest {
        cfg: cfg.ingest.clone(),
        sockets,
        telemetry: telemetry.clone(),
        rss: None,
    };
    let ingest_task = tokio::spawn(ingest.run(profile_tx, shutdown.clone()));
    let batch_task = tokio::spawn(crate::batch::run(cfg.batch.clone(), seqs, profile_rx, batch_tx));
    let router = Router {
        telemetry: telemetry.clone(),
        memory_budget: (cfg.limits.memory_budget_mb * 1024 * 1024) as usize,
    };
    let router_task = tokio::spawn(router.run(RouterIo {
        input: batch_rx,
        to_transport: wire_tx,
        outcomes: outcome_rx,
        deadline: deadline.clone(),
    }));
    let transport_task = tokio::spawn(transport.run(wire_rx, outcome_tx, deadline.clone()));

    let source = StatusSource {
        telemetry: telemetry.clone(),
        php: php.clone(),
        agent_id: agent_id.clone(),
        endpoint: cfg.central.endpoint.clone(),
        config_path: config_path.clone(),
        ebpf: ebpf_section,
        breaker: breaker_section,
    };
    let control_stop = CancellationToken::new();
    let (req_tx, mut req_rx) = mpsc::channel(4);
    let control_task = tokio::spawn(crate::control::serve_control(
        cfg.control.control_socket(),
        source.clone(),
        req_tx,
        control_stop.clone(),
    ));
    if !cfg.control.metrics_listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.control.metrics_listen)
            .await
            .with_context(|| format!("control.metrics_listen: cannot listen on {}", cfg.control.metrics_listen))?;
        tokio::spawn(crate::control::serve_metrics(l, Arc::new(registry), source.clone(), control_stop.clone()));
    }
    {
        let t = telemetry.clone();
        let stop = control_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! { _ = tick.tick() => { t.agent_rss_bytes.set(crate::telemetry::self_rss_bytes() as i64); } () = stop.cancelled() => break }
            }
        });
    }

    tracing::info!(agent_id = %agent_id, endpoint = %cfg.central.endpoint, socket = %cfg.ingest.socket.display(), "agent ready");
    notify_ready("receiving profiles");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let current = cfg.clone();
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "TERM", "stopping"); break }
            _ = int.recv() => { tracing::info!(signal = "INT", "stopping"); break }
            _ = hup.recv() => { let _ = reload(&current, config_path.as_deref()); }
            _ = usr1.recv() => tracing::info!(status = %source.status(), "status dump"),
            Some(req) = req_rx.recv() => match req {
                ControlRequest::Reload(reply) => { let _ = reply.send(reload(&current, config_path.as_deref())); }
            },
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("draining")]);

    // Stop: drain the kernel queue, then give delivery until the deadline.
    shutdown.cancel();
    let timeout = cfg.limits.shutdown_timeout;
    let dl = deadline.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        tracing::warn!(?timeout, "shutdown timeout reached: no longer waiting for acknowledgements");
        dl.cancel();
    });
    let _ = ingest_task.await;
    match batch_task.await {
        Ok(Err(e)) => tracing::error!(error = %e, "batcher failed"),
        Err(e) => tracing::error!(error = %e, "batcher task failed"),
        _ => {}
    }
    let left = router_task.await.unwrap_or_default();
    deadline.cancel();
    let _ = transport_task.await;
    if !left.is_empty() {
        let n: usize = left.iter().map(|b| b.len()).sum();
        tracing::error!(batches = left.len(), profiles = n, "undelivered at shutdown and no spool: counted as dropped");
        telemetry.drop_profiles(DropReason::Shutdown, n as u64);
    }
    control_stop.cancel();
    let _ = control_task.await;
    crate::ingest::socket::unlink(&[cfg.ingest.socket.clone(), cfg.ingest.stream_socket.clone()]);
    tracing::info!(
        received = telemetry.received_total(),
        delivered = telemetry.delivered.get(),
        rejected = telemetry.rejected_total(),
        dropped = telemetry.dropped_total(),
        "stopped"
    );
    Ok(exit::OK)
}

/// Re-reads the config file. A bad file is refused and the running config kept. Keys that only
/// take effect on restart are named in the log.
fn reload(current: &Config, path: Option<&std::path::Path>) -> Result<String, String> {
    match Config::load(path) {
        Ok(new) => {
            let mut restart_needed = Vec::new();
            macro_rules! check {
                ($($sec:ident),*) => {$(
                    if new.$sec != current.$sec { restart_needed.push(stringify!($sec)); }
                )*};
            }
            check!(ingest, batch, central, breaker, spool, limits, ebpf, control);
            let msg = if restart_needed.is_empty() {
                "configuration unchanged".to_string()
            } else {
                format!(
                    "configuration valid; changed sections [{}] take effect on `apm-agent restart` (no profile is lost)",
                    restart_needed.join(", ")
                )
            };
            tracing::info!(message = %msg, "reload");
            Ok(msg)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: keeping the running configuration");
            Err(format!("reload refused, running configuration kept: {e}"))
        }
    }
}
