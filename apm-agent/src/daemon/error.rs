//! What can stop the agent from starting, each with its exit code: configuration errors are
//! `EX_CONFIG` (78, supervisors do not restart on it), everything else is 1.

use std::path::PathBuf;

use crate::config::{ConfigError, EX_CONFIG};
use crate::daemon::pidfile::PidFileError;
use crate::monitor::MonitorError;
use crate::pipeline::ingest::IngestError;
use crate::pipeline::spool::SpoolError;
use crate::pipeline::transport::TransportError;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write PHP control files in {dir}: {source}")]
    PhpControl {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sockets(#[from] IngestError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot open the spool in {dir}: {source}")]
    Spool { dir: PathBuf, source: SpoolError },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot bind the control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control.metrics_listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("re-exec of {exe} failed: {source}")]
    Reexec { exe: PathBuf, source: nix::Error },
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => EX_CONFIG,
            Self::Spool { source, .. } if crate::pipeline::router::is_config_error(source) => {
                EX_CONFIG
            }
            _ => 1,
        }
    }

    /// eBPF required (`ebpf.enabled = "on"`) but not available, or a bad `[ebpf]` key: a
    /// configuration error that names the key at fault.
    pub fn from_monitor(e: MonitorError) -> Self {
        let (key, reason) = match e {
            MonitorError::Config { key, reason } => (key, reason),
            MonitorError::Socket { key, .. } => (key, e.to_string()),
            other => (
                "ebpf.enabled",
                format!("eBPF is required (\"on\") but cannot run: {other}"),
            ),
        };
        Self::Config(ConfigError::Invalid { key, reason })
    }
}
