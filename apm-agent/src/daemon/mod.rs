//! `apm-agent run`, top-down: acquire what the pipeline needs (PID file, directories, sockets,
//! identity), spawn the pipeline, serve signals and control requests, then shut down in
//! pipeline order: ingest drains the kernel queue, the batcher seals what it holds, the router
//! delivers within `limits.shutdown_timeout`, and whatever is left is spooled or counted.

pub mod assemble;
mod error;
pub mod handover;
pub mod memguard;
pub mod nice;
pub mod pidfile;
pub mod signals;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::StartError;

use crate::config::Config;
use crate::daemon::assemble::{Deps, Pipeline};
use crate::daemon::handover::Inherited;
use crate::daemon::pidfile::PidFile;
use crate::phpctl::PhpControl;
use crate::pipeline::ingest::StopKind;
use crate::state::{SeqAllocator, load_or_create_agent_id};
use crate::telemetry::Telemetry;

/// Exit codes of `run`.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const CONFIG: i32 = crate::config::EX_CONFIG;
}

/// Runs the agent until a stop; returns the process exit code. `inherited` is what
/// [`handover::take_inherited`] found before the runtime started.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    mut inherited: Inherited,
) -> Result<i32, StartError> {
    let (pid, deps, fd_store) = acquire(&cfg, config_path, &inherited)?;
    let mut pipeline = Pipeline::spawn(&cfg, deps).await?;
    let signals = signals::install()?;
    tracing::info!(agent_id = %pipeline.status.agent_id, endpoint = %cfg.central.targets().join(","), socket = %cfg.ingest.socket.display(), "agent ready");
    handover::notify_ready("receiving profiles", inherited.ready.take());
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let (live, status) = (pipeline.live.clone(), pipeline.status.clone());
        tokio::spawn(signals::watchdog(live, status, pipeline.control_stop()));
    }
    let path = pipeline.status.config_path.clone();
    let ending = signals::serve(&mut pipeline, signals, &cfg, path.as_deref(), fd_store).await;
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    let telemetry = pipeline.telemetry.clone();
    let php = pipeline.status.php.clone();
    let handed = pipeline
        .shutdown(ending.kind, cfg.limits.shutdown_timeout)
        .await;
    release_php(&php, &ending);
    finish(&cfg, ending, handed, pid, &inherited, &telemetry)
}

/// On a stop that may be the last (SIGTERM/SIGINT, with or without systemd's fd store, or a
/// stage that died), hand PHP back the defaults: no kill switch, rate 1.0. Otherwise PHP keeps
/// reading a pause or a lowered rate until the agent runs again, which may be never. Not on a
/// handover or a memory self-restart: the agent is back within a second, and the new process
/// resets both files at start anyway ([`PhpControl::new`]). After `shutdown`: the monitor and
/// the memory guard have stopped, so nothing writes the files after this.
///
/// A SIGKILL skips this; the files then stay until the next start (documented in docs/agent.md).
fn release_php(php: &PhpControl, ending: &signals::Ending) {
    if ending.kind == StopKind::Handover || ending.memory_restart {
        return;
    }
    match php.release() {
        Ok(()) => tracing::info!("PHP control files reset: kill switch down, sample rate 1.0"),
        Err(e) => tracing::warn!(error = %e, "cannot reset PHP's control files at stop"),
    }
}

/// The PID file (single instance), the directories, PHP's control files, the sockets (handed
/// over, kept by systemd, or bound), the agent's identity and its seq allocator.
fn acquire(
    cfg: &Config,
    config_path: Option<PathBuf>,
    inherited: &Inherited,
) -> Result<(PidFile, Deps, bool), StartError> {
    let pid = match inherited.pidfile {
        Some(fd) => PidFile::adopt(fd, &cfg.control.pid_file)?,
        None => PidFile::acquire(&cfg.control.pid_file, config_path.as_deref())?,
    };
    for (key, dir) in [
        ("control.runtime_dir", &cfg.control.runtime_dir),
        ("control.state_dir", &cfg.control.state_dir),
        ("spool.dir", &cfg.spool.dir),
    ] {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Dir {
            path: dir.clone(),
            source,
        })?;
        refuse_shared_dir(key, dir)?;
    }
    let php =
        PhpControl::new(&cfg.control.runtime_dir).map_err(|source| StartError::PhpControl {
            dir: cfg.control.runtime_dir.clone(),
            source,
        })?;
    let sockets = handover::sockets(cfg, inherited)?;
    let _ = crate::phpctl::write_atomic(
        &cfg.control.state_dir.join("queue_len"),
        format!("{}\n", sockets.queue_len).as_bytes(),
    );
    let fd_store = handover::to_fd_store(&sockets);
    let telemetry = Telemetry::new();
    if inherited.dgram.is_some()
        && let Some(carried) = &inherited.carried
    {
        telemetry.restore(carried);
    }
    let deps = Deps {
        telemetry,
        php: Arc::new(php),
        sockets,
        agent_id: load_or_create_agent_id(&cfg.control.state_dir, &cfg.central.agent_id)?,
        seqs: SeqAllocator::open(&cfg.control.state_dir)?,
        config_path,
        restarts: inherited.restarts,
    };
    Ok((pid, deps, fd_store))
}

/// Root writes state, PHP's flag files and spool records in these directories: one that other
/// users can write would let them plant files (or links) that root then trusts or overwrites.
fn refuse_shared_dir(key: &'static str, dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .map_err(|source| StartError::Dir {
            path: dir.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(StartError::Config(crate::config::ConfigError::Invalid {
            key,
            reason: format!(
                "{} is writable by every user (mode {:o}); give the agent a directory only root \
                 can write (`chmod o-w`, or another path)",
                dir.display(),
                mode & 0o7777
            ),
        }));
    }
    Ok(())
}

/// After the pipeline has stopped: re-execute on a handover, remove the sockets on a final
/// stop, and pick the exit code.
fn finish(
    cfg: &Config,
    ending: signals::Ending,
    handed: Option<crate::pipeline::ingest::Sockets>,
    pid: PidFile,
    inherited: &Inherited,
    t: &Telemetry,
) -> Result<i32, StartError> {
    if let (StopKind::Handover, Some(sockets)) = (ending.kind, handed) {
        tracing::info!(
            received = t.received_total(),
            delivered = t.delivered.get(),
            "memory flushed; re-executing"
        );
        return Err(handover::reexec(
            sockets,
            pid,
            inherited.restarts,
            &t.carry(),
        ));
    }
    if ending.kind == StopKind::Final {
        crate::pipeline::ingest::socket::unlink(&[
            cfg.ingest.socket.clone(),
            cfg.ingest.stream_socket.clone(),
        ]);
    }
    drop(pid);
    if let Some(stage) = ending.stage_died {
        tracing::error!(
            stage,
            code = exit::FAILURE,
            "stopped because a pipeline stage ended on its own"
        );
        return Ok(exit::FAILURE);
    }
    if ending.memory_restart {
        tracing::warn!(
            code = memguard::EXIT_MEMORY,
            "exiting for a memory self-restart (systemd restarts the agent; its fd store keeps the sockets)"
        );
        return Ok(memguard::EXIT_MEMORY);
    }
    tracing::info!(
        received = t.received_total(),
        delivered = t.delivered.get(),
        rejected = t.rejected_total(),
        dropped = t.dropped_total(),
        "stopped"
    );
    Ok(exit::OK)
}
