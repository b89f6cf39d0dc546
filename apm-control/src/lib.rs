//! The agent's control protocol, shared by the agent (which serves it), its CLI, `xtask` and
//! the tests (which ask), without pulling in the daemon.
//!
//! On the control socket (`control.runtime_dir/control.sock`, mode 0600) a client writes one
//! command line (`status`, `reload`, `restart`, `pause`, `resume`) and reads one JSON line:
//! the [`Status`] document for `status`, a [`Reply`] for the others.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `apm-agent status --json` prints. The names are a contract (DESIGN.md): operators'
/// scripts and the tests read them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub uptime_s: u64,
    /// Re-execs since the process started (`apm-agent restart`, memory guard).
    pub restarts: u64,
    pub agent_id: String,
    /// The seq series (hex); a new one whenever the agent started without its seq state.
    pub epoch: String,
    /// This start began the epoch.
    pub epoch_started_now: bool,
    pub endpoint: String,
    pub config_path: Option<String>,
    pub received: u64,
    pub received_dgram: u64,
    pub received_stream: u64,
    pub received_bytes: u64,
    pub rejected: u64,
    /// Rejects by reason (`invalid_json`, `oversize`, ...).
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub delivered: u64,
    pub delivered_batches: u64,
    pub last_acked_seq: i64,
    pub in_flight_batches: i64,
    pub memory_payload_bytes: i64,
    /// Profiles received that only memory holds now (ingest queue, open batch, batch channel,
    /// the router's window without a spool record): what a SIGKILL would lose. In
    /// `spool.mode = "always"` at most one receive call per source (docs/agent.md).
    #[serde(default)]
    pub at_risk_profiles: u64,
    /// Profiles this process wrote ahead to the spool (`spool.mode = "always"`), in the order
    /// received; 0 in `overflow` mode, which writes nothing ahead.
    #[serde(default)]
    pub durable_profiles: u64,
    /// Profiles in the spool not yet acknowledged (in flight included).
    #[serde(default)]
    pub spooled_profiles: u64,
    pub backpressure: bool,
    pub backpressure_episodes: u64,
    pub send_failures: u64,
    pub reconnects: u64,
    pub spooled_batches: i64,
    pub spool_bytes: i64,
    /// What the spool may hold now: `spool.max_bytes`, or less while its volume is short of
    /// free space (the agent started anyway and grows back as space returns).
    #[serde(default)]
    pub spool_capacity_bytes: i64,
    /// Drops by reason, and `total`.
    pub dropped: BTreeMap<String, u64>,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    /// Stages that cannot do their work now (and keep trying), with the reason; empty when
    /// every stage works. The watchdog is withheld while one is listed.
    pub stage_failures: BTreeMap<String, String>,
    /// Files holding a secret (`central.token_file`, or the config file when it holds
    /// `central.token`) that every local user can read, as `"<key> <path>"`; found at start.
    #[serde(default)]
    pub secrets_readable_by_others: Vec<String>,
    pub stream_connections: i64,
    /// Client connections the agent closed or refused (`per_uid_limit`, `frame_timeout`,
    /// `buffer_budget`, `metrics_limit`), and `total`.
    #[serde(default)]
    pub connections_refused: BTreeMap<String, u64>,
    /// `accept(2)` failures by server (`control`, `metrics`, `stream`); each is retried.
    #[serde(default)]
    pub accept_errors: BTreeMap<String, u64>,
    pub queue_len: i64,
    pub rss_bytes: u64,
    /// The sample rate PHP reads (what `<runtime_dir>/sample-rate` says).
    pub sample_rate: f64,
    /// Seconds the sample rate was below 1.0 since the agent started (a counter).
    #[serde(default)]
    pub sample_rate_below_one_seconds: f64,
    /// Estimated PHP requests not profiled because of sampling: the sum over eBPF poll
    /// intervals of `sends * (1 / rate - 1)` (0 without eBPF).
    #[serde(default)]
    pub unprofiled_requests_estimate: f64,
    /// Why PHP's kill switch is raised (empty: it is not).
    pub kill_switch: Vec<String>,
    /// The eBPF monitor's section, typed by the agent's `monitor::EbpfStatus`; kept as a
    /// document here so this crate does not depend on the monitor.
    pub ebpf: Value,
}

impl Status {
    /// Profiles dropped, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.get("total").copied().unwrap_or(0)
    }

    /// A number of the eBPF section by JSON pointer (`/sends_ok`), 0 when absent.
    pub fn ebpf_u64(&self, pointer: &str) -> u64 {
        self.ebpf
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    pub fn ebpf_enabled(&self) -> bool {
        self.ebpf
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// The answer to `reload`, `restart`, `pause`, `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            error: None,
        }
    }

    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: None,
            error: Some(error.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: unexpected answer ({reason})")]
    Answer { path: PathBuf, reason: String },
}

impl ControlError {
    /// No agent listens there (the socket is missing or refuses): the agent is not running.
    pub fn not_running(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// The one client of the control socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The client of the agent whose runtime directory is `runtime_dir`.
    pub fn in_runtime_dir(runtime_dir: &Path) -> Self {
        Self::new(runtime_dir.join("control.sock"))
    }

    /// Waits this long for an answer (5 s by default; `restart` may need longer).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One command, its raw JSON answer.
    pub fn request(&self, command: &str) -> Result<Value, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = std::os::unix::net::UnixStream::connect(&self.path).map_err(io)?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.write_all(format!("{command}\n").as_bytes()).map_err(io)?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).map_err(io)?;
        serde_json::from_str(&line).map_err(|e| ControlError::Answer {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// The status document, typed.
    pub fn status(&self) -> Result<Status, ControlError> {
        let v = self.request("status")?;
        serde_json::from_value(v).map_err(|e| ControlError::Answer {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// `reload`, `restart`, `pause` or `resume`.
    pub fn command(&self, command: &str) -> Result<Reply, ControlError> {
        let v = self.request(command)?;
        serde_json::from_value(v).map_err(|e| ControlError::Answer {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_reads_its_sections() {
        let mut s = Status {
            pid: 7,
            breaker: "closed".into(),
            ebpf: serde_json::json!({"enabled": true, "sends_ok": 12}),
            ..Status::default()
        };
        s.dropped.insert("total".into(), 3);
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!((back.dropped_total(), back.ebpf_u64("/sends_ok")), (3, 12));
        assert!(back.ebpf_enabled());
    }

    #[test]
    fn a_missing_socket_means_not_running() {
        let dir = std::env::temp_dir().join("apm-control-test-no-such-dir");
        let e = Client::in_runtime_dir(&dir).status().unwrap_err();
        assert!(e.not_running(), "{e}");
    }
}
