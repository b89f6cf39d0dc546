//! Serving: signals (TERM/INT stop, HUP reloads, USR1 dumps the status), requests from the
//! control socket, the memory guard's restart request, and systemd's watchdog.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{ControlRequest, StatusSource};
use crate::daemon::StartError;
use crate::daemon::assemble::Pipeline;
use crate::pipeline::ingest::StopKind;
use crate::pipeline::liveness::Liveness;
use crate::pipeline::transport::BearerToken;

/// Why serving ended, and so how the pipeline stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub kind: StopKind,
    /// The memory guard asked for this stop.
    pub memory_restart: bool,
    /// A stage ended on its own: the agent stops with an error.
    pub stage_died: Option<&'static str>,
}

/// The installed signal handlers.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

/// Installs the handlers before readiness, so no signal sent after `READY` is missed.
pub fn install() -> Result<Signals, StartError> {
    let on = |k| signal(k).map_err(StartError::Signals);
    Ok(Signals {
        term: on(SignalKind::terminate())?,
        int: on(SignalKind::interrupt())?,
        hup: on(SignalKind::hangup())?,
        usr1: on(SignalKind::user_defined1())?,
    })
}

/// Serves until a stop: a final stop keeps the sockets in systemd's fd store when it holds them
/// (`fd_store`), a restart hands them to a new image of this process.
pub async fn serve(
    p: &mut Pipeline,
    mut s: Signals,
    cfg: &Config,
    config_path: Option<&Path>,
    fd_store: bool,
) -> Ending {
    let final_kind = if fd_store {
        StopKind::KeepSocket
    } else {
        StopKind::Final
    };
    let end = |kind| Ending {
        kind,
        memory_restart: false,
        stage_died: None,
    };
    loop {
        tokio::select! {
            _ = s.term.recv() => { tracing::info!(signal = "TERM", "stopping"); return end(final_kind) }
            _ = s.int.recv() => { tracing::info!(signal = "INT", "stopping"); return end(final_kind) }
            _ = s.hup.recv() => { let _ = reload(cfg, config_path, &p.token); }
            _ = s.usr1.recv() => tracing::info!(status = %serde_json::to_string(&p.status.status()).unwrap_or_default(), "status dump"),
            Some(()) = p.memory_restart.recv() => {
                // Under systemd the fd store keeps the sockets and `Restart=always` starts us
                // again; otherwise re-execute with the sockets handed over.
                let kind = if fd_store { final_kind } else { StopKind::Handover };
                return Ending { kind, memory_restart: true, stage_died: None };
            }
            Some(stage) = p.died.recv() => {
                return Ending { kind: final_kind, memory_restart: false, stage_died: Some(stage) };
            }
            Some(req) = p.requests.recv() => match req {
                ControlRequest::Reload(reply) => { let _ = reply.send(reload(cfg, config_path, &p.token)); }
                ControlRequest::Restart(reply) => {
                    tracing::info!("restart requested: handing the sockets to a new process image");
                    let _ = reply.send(Ok("restarting: the sockets are handed over, nothing is dropped".into()));
                    return end(StopKind::Handover);
                }
            },
        }
    }
}

/// Pings systemd's watchdog while every stage beats, and keeps `STATUS=` current. Without
/// `WatchdogSec` it only updates the status line.
pub async fn watchdog(live: Arc<Liveness>, source: StatusSource, stop: CancellationToken) {
    let period = sd_notify::watchdog_enabled();
    let every = period.map_or(Duration::from_secs(5), |p| {
        (p / 2).max(Duration::from_millis(100))
    });
    let mut tick = tokio::time::interval(every);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let t = &source.telemetry;
        let line = format!(
            "received {} delivered {} rejected {} dropped {} breaker {}",
            t.received_total(),
            t.delivered.get(),
            t.rejected_total(),
            t.dropped_total(),
            source.breaker()
        );
        let mut states = vec![sd_notify::NotifyState::Status(&line)];
        if let Some(p) = period {
            let stale = live.stale(p / 2);
            if stale.is_empty() {
                states.push(sd_notify::NotifyState::Watchdog);
                warned = false;
            } else if !warned {
                tracing::error!(stages = ?stale, "pipeline stage stuck: withholding the watchdog ping");
                warned = true;
            }
        }
        let _ = sd_notify::notify(&states);
    }
}

/// Re-reads the config file. A bad file is refused and the running config kept. Keys that only
/// take effect on restart are named in the log. `central.token_file`, when it names the same
/// file as at start, is re-read and its token used from the next stream on (token rotation
/// without a restart); a file that cannot be read refuses the reload and keeps the token.
fn reload(current: &Config, path: Option<&Path>, token: &BearerToken) -> Result<String, String> {
    match Config::load(path) {
        Ok(new) => {
            let mut restart_needed = Vec::new();
            macro_rules! check {
                ($($sec:ident),*) => {$(
                    if new.$sec != current.$sec { restart_needed.push(stringify!($sec)); }
                )*};
            }
            check!(
                ingest, batch, central, breaker, spool, limits, ebpf, control
            );
            let mut msg = if restart_needed.is_empty() {
                "configuration unchanged".to_string()
            } else {
                format!(
                    "configuration valid; changed sections [{}] take effect on `apm-agent restart` (no profile is lost)",
                    restart_needed.join(", ")
                )
            };
            if new.central.token_file.is_some()
                && new.central.token_file == current.central.token_file
            {
                match token.reload(&new.central) {
                    Ok(true) => msg.push_str(
                        "; central.token_file re-read: the new token is used from the next stream",
                    ),
                    Ok(false) => msg.push_str("; central.token_file re-read: token unchanged"),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused: keeping the running token");
                        return Err(format!(
                            "reload refused, running configuration and token kept: {e}"
                        ));
                    }
                }
            }
            tracing::info!(message = %msg, "reload");
            Ok(msg)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: keeping the running configuration");
            Err(format!("reload refused, running configuration kept: {e}"))
        }
    }
}
