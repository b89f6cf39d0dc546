//! The agent's configuration: one serde struct per TOML section, every key with a default, so
//! `apm-agent run` works with no file at all. Unknown keys and bad values are errors that name the
//! key; the CLI maps every [`ConfigError`] to exit code 78 (EX_CONFIG) so supervisors do not
//! restart-loop on a broken file.
//!
//! Environment overrides: any key can be set as `APM_<SECTION>_<KEY>` (for example
//! `APM_CENTRAL_ENDPOINT=https://apm.example:4317`); the value is read as a TOML value when it
//! parses as one (`true`, `42`, `["a","b"]`) and as a string otherwise. An override wins over the
//! file. The config path itself comes from `--config` or `APM_AGENT_CONFIG`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exit code for configuration errors (sysexits.h EX_CONFIG): systemd's
/// `RestartPreventExitStatus=78` and supervisord's `exitcodes` keep a broken config from looping.
pub const EX_CONFIG: i32 = 78;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub ingest: IngestConfig,
    pub batch: BatchConfig,
    pub central: CentralConfig,
    pub breaker: BreakerConfig,
    pub spool: SpoolConfig,
    pub limits: LimitsConfig,
    pub ebpf: EbpfConfig,
    pub control: ControlConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Datagram socket PHP sends one profile per datagram to.
    pub socket: PathBuf,
    /// Stream socket for profiles too large for a datagram (4-byte big-endian length frames).
    pub stream_socket: PathBuf,
    /// Octal file mode of both sockets, as a string ("0660").
    pub socket_mode: String,
    /// Group owning both sockets (the PHP-FPM workers' group); unset keeps the agent's group.
    pub socket_group: Option<String>,
    /// Kernel queue length of the datagram socket (net.unix.max_dgram_qlen at creation).
    pub queue_len: u32,
    /// Largest accepted profile, datagram or stream frame, in bytes.
    pub max_payload_bytes: usize,
    /// Datagrams read per recvmmsg call.
    pub recv_batch: usize,
    /// Concurrent stream connections accepted; more wait in the listen backlog.
    pub max_stream_connections: usize,
    /// Concurrent stream connections of one peer uid (SO_PEERCRED); more are closed at once.
    pub max_stream_connections_per_uid: usize,
    /// A stream connection idle this long between frames is closed.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// A stream frame must be complete this long after its first byte, or its connection is
    /// closed (time the agent itself was not reading does not count).
    #[serde(with = "humantime_serde")]
    pub stream_frame_timeout: Duration,
    /// Bytes all incomplete stream frames together may hold; a frame larger than 8 KiB
    /// reserves its declared length here before it is read.
    pub stream_buffer_bytes: usize,
    /// Scheduling niceness the agent's threads run at (-20 to 19), set at start. Below PHP-FPM's
    /// 0 so that ingest, woken by a datagram, gets a core before the kernel queue fills and PHP's
    /// sends fail: the trade auditd makes with its `priority_boost` (docs/agent.md, "Priority").
    pub nice: i32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/bitville-apm/listener.sock"),
            stream_socket: PathBuf::from("/run/bitville-apm/listener-stream.sock"),
            socket_mode: "0666".into(), // any local PHP user may send; tighten with socket_group
            socket_group: None,
            queue_len: 2048, // ~2 s of a busy pool's profiles survive an agent hiccup
            max_payload_bytes: 1024 * 1024, // xhprof call graphs of big requests fit
            recv_batch: 64,  // datagrams per recvmmsg: amortises the syscall, bounds latency
            max_stream_connections: 512, // two per-uid shares: a full pool beside one other uid
            max_stream_connections_per_uid: 256, // one per busy worker of a large pool
            stream_idle_timeout: Duration::from_mins(1), // PHP closes after each profile
            stream_frame_timeout: Duration::from_secs(10), // PHP writes a frame in one go
            stream_buffer_bytes: 32 * 1024 * 1024, // 32 max-size frames in flight at once
            nice: -4,        // auditd's default boost; the systemd unit's Nice= says the same
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is sent when it holds this many profiles...
    pub max_items: usize,
    /// ...or this many payload bytes...
    pub max_bytes: usize,
    /// ...or when its first profile is this old.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_items: 1000, // a batch per ~1000 requests keeps per-batch cost small
            // Half a MiB: every buffer sized by a batch (the open one, the one waiting for the
            // router, the one being encoded) is half as large, for ~1.5 MiB less peak RSS at
            // 16 KiB flat out at the same rate (docs/agent.md, "Where the memory goes").
            max_bytes: 512 * 1024,
            max_age: Duration::from_millis(500), // a quiet host still delivers within a second
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CentralConfig {
    /// gRPC endpoint of the central listener (`http://` or `https://`).
    pub endpoint: String,
    /// Several listener replicas (docs/scaling.md): when non-empty, used instead of `endpoint`.
    /// The agent dials the first and moves to the next on a failed connect or a broken stream.
    pub endpoints: Vec<String>,
    /// Stable id of this agent; empty means generated once and kept in `control.state_dir`.
    pub agent_id: String,
    /// Batch compression on the wire.
    pub compression: Compression,
    /// Bearer token sent as `authorization: Bearer <token>`.
    pub token: Option<Secret>,
    /// File holding the bearer token (read at start and re-read on reload, see
    /// `daemon::signals`); wins over `token`.
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle to verify the listener with (https endpoints); unset uses webpki roots.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the endpoint's host.
    pub tls_domain: Option<String>,
    /// Batches sent but not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Connecting gives up after this long.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A batch not acknowledged within this long counts as a failed send.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Reconnect backoff: first wait...
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// ...growing (with jitter) up to this.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// While the listener is unreachable, dial it at most once per this long: a
    /// `grpc.health.v1` check, or the batch the breaker lets through. The breaker half-opens
    /// as soon as a check answers, instead of waiting out its grown open period.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for CentralConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:7421".into(), // apm-listener's default --listen
            endpoints: Vec::new(),                    // one listener: `endpoint`
            agent_id: String::new(),
            compression: Compression::Zstd, // JSON profiles shrink 5-10x for little CPU
            token: None,
            token_file: None,
            tls_ca_file: None,
            tls_domain: None,
            max_in_flight: 16, // 8 MiB of batches of max_bytes: one round trip at full rate
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(15), // a listener that stalls longer is "down"
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1), // back within ~1 s; a dead listener sees 1 dial/s
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed sends that open the breaker.
    pub failure_threshold: u32,
    /// First open period; doubles (with jitter) while probes keep failing.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// Longest open period.
    #[serde(with = "humantime_serde")]
    pub max_retry_timeout: Duration,
    /// A half-open probe that takes longer than this has failed.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5, // a few transient errors do not divert traffic to disk
            retry_timeout: Duration::from_secs(1),
            max_retry_timeout: Duration::from_mins(1), // a dead listener is probed once a minute
            probe_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolMode {
    /// Memory first; disk when the breaker is open, the memory budget is full, and at shutdown.
    Overflow,
    /// Write-ahead: every batch is on disk before it is sent.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFull {
    DropOldest,
    DropNewest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync after every appended batch.
    Always,
    /// fsync at most once per `spool.fsync_interval`.
    Interval,
    /// Leave it to the kernel.
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub mode: SpoolMode,
    /// The spool never holds more than this many bytes on disk.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started.
    pub segment_bytes: u64,
    /// What goes when the spool is full.
    pub on_full: SpoolFull,
    pub fsync: FsyncPolicy,
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Spool fill (percent of max_bytes) above which PHP's kill switch is raised while the
    /// breaker is open.
    pub high_water_pct: u8,
    /// Spooled batches replayed per second at most once the breaker closes; 0: no fixed rate,
    /// the listener's acks pace the replay (`central.max_in_flight` batches out at a time).
    pub replay_batches_per_s: u32,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/bitville-apm/spool"),
            mode: SpoolMode::Overflow,
            max_bytes: 1024 * 1024 * 1024, // an hour of a busy host's profiles, compressed 1:1
            segment_bytes: 16 * 1024 * 1024, // small enough to delete promptly once acked
            on_full: SpoolFull::DropOldest, // fresh data is worth more than old
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(200),
            high_water_pct: 90,
            replay_batches_per_s: 0, // at the listener's pace: its acks open the window
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// RSS at which the agent spills to disk and sheds load, and past which it restarts itself.
    pub max_memory_mb: u64,
    /// Payload bytes held in memory between ingest and the listener's ack (the in-memory window).
    pub memory_budget_mb: u64,
    /// A final stop drains and flushes within this long, spooling what is left.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_memory_mb: 256,
            memory_budget_mb: 8, // max_in_flight (16) batches of batch.max_bytes (512 KiB): docs/agent.md, "Where the memory goes"
            shutdown_timeout: Duration::from_secs(10), // below systemd's 90 s stop timeout
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EbpfEnabled {
    /// Load when possible, otherwise run without and say why.
    Auto,
    /// Failing to load is a startup error.
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbpfConfig {
    pub enabled: EbpfEnabled,
    /// Process names (comm prefixes) whose sends and memory are watched.
    pub php_comms: Vec<String>,
    /// A worker crossing this RSS produces an event.
    pub rss_threshold_mb: u64,
    /// How often the maps are read.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Adapt the sample rate PHP reads to kernel-seen drops and send latency.
    pub adaptive_sampling: bool,
    /// Adaptive sampling never lowers the rate below this (0.0-1.0).
    pub min_sample_rate: f64,
    /// Share of datagram sends dropped (EAGAIN/ENOBUFS) in one poll interval that lowers the rate.
    pub drop_ratio_high: f64,
    /// p99 send latency (or mean stream wait per send) in one interval that lowers the rate.
    #[serde(with = "humantime_serde")]
    pub latency_high: Duration,
    /// Processes tracked at once (sizes the eBPF maps); beyond it the least recently used go.
    pub max_processes: u32,
    /// Workers listed in status (and in per-worker metrics when enabled), highest RSS first.
    pub max_listed_workers: usize,
    /// Export `apm_ebpf_worker_rss_bytes{pool,pid}`. Off by default: every worker PHP-FPM
    /// recycles would start a new series in Prometheus.
    pub worker_metrics: bool,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            enabled: EbpfEnabled::Auto,
            php_comms: vec!["php-fpm".into(), "php".into()],
            rss_threshold_mb: 256,
            poll_interval: Duration::from_secs(1),
            adaptive_sampling: true,
            min_sample_rate: 0.05, // keep some profiles flowing even under heavy drops
            drop_ratio_high: 0.01, // 1% of profiles lost is worth shedding load for
            latency_high: Duration::from_millis(1), // a non-blocking local send takes ~3 us
            max_processes: 4096,   // a few large pools; ~1.6 MiB of maps
            max_listed_workers: 64, // bounds status size and per-worker metric series
            worker_metrics: false, // per-pool figures by default: no series churn per worker
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Text; timestamps dropped when stderr is the journal.
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Sockets' parent, control socket, and the PHP kill switch / sample-rate files.
    pub runtime_dir: PathBuf,
    /// Persistent state: agent id, next seq, breaker state.
    pub state_dir: PathBuf,
    pub pid_file: PathBuf,
    /// Prometheus `/metrics` address; empty disables it.
    pub metrics_listen: String,
    pub log_format: LogFormat,
    /// tracing filter (`info`, `apm_agent=debug`, ...); `RUST_LOG` wins when set.
    pub log_level: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            runtime_dir: PathBuf::from("/run/bitville-apm"),
            state_dir: PathBuf::from("/var/lib/bitville-apm"),
            pid_file: PathBuf::from("/run/bitville-apm/agent.pid"),
            metrics_listen: "127.0.0.1:9464".into(), // loopback: scraped by a local exporter
            log_format: LogFormat::Auto,
            log_level: "info".into(),
        }
    }
}

impl ControlConfig {
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }
}

impl Config {
    /// Loads `path` (or only defaults when `None`), applies `APM_*` environment overrides, and
    /// validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let name = path.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
        Self::from_toml_with_env(&text, &name, |k| std::env::var(k).ok())
    }

    /// For commands that talk to a running agent (`reload`, `status`, `stop`, ...): they only
    /// need the `[control]` paths, so a file broken elsewhere must not stop them (`reload` is how
    /// the agent itself reports what is wrong with it). Falls back to defaults key by key.
    pub fn load_for_client(path: Option<&Path>) -> (Self, Option<ConfigError>) {
        match Self::load(path) {
            Ok(c) => (c, None),
            Err(e) => {
                let mut cfg = Config::default();
                let text = path
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                let control = toml::from_str::<toml::Table>(&text)
                    .ok()
                    .and_then(|mut t| t.remove("control"))
                    .and_then(|c| c.try_into::<ControlConfig>().ok());
                if let Some(c) = control {
                    cfg.control = c;
                }
                if let Ok(rt) = std::env::var("APM_CONTROL_RUNTIME_DIR") {
                    cfg.control.runtime_dir = PathBuf::from(rt);
                }
                if let Ok(p) = std::env::var("APM_CONTROL_PID_FILE") {
                    cfg.control.pid_file = PathBuf::from(p);
                }
                (cfg, Some(e))
            }
        }
    }

    /// Parses a TOML document (no environment); used by tests and `check-config`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, "<string>", |_| None)
    }

    fn from_toml_with_env(
        text: &str,
        name: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        apply_env_overrides(&mut doc, env)?;
        let cfg: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: name.to_string(),
                message: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ingest.validate()?;
        self.batch.validate(&self.ingest)?;
        self.central.validate()?;
        self.breaker.validate()?;
        self.spool.validate()?;
        self.limits.validate()?;
        self.ebpf.validate()?;
        self.control.validate()
    }

    pub fn socket_mode(&self) -> u32 {
        u32::from_str_radix(self.ingest.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o666)
    }

    /// The effective configuration as TOML, secrets included (see [`Self::to_toml_redacted`]).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The effective configuration as TOML with `central.token` shown as `<redacted>` (for
    /// `check-config`, whose output ends up in terminals, tickets and CI logs).
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.central.token.is_some() {
            shown.central.token = Some(Secret::REDACTED.into());
        }
        shown.to_toml()
    }
}

fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl IngestConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.socket.as_os_str().is_empty() || self.socket.as_os_str().len() > 107 {
            return Err(bad(
                "ingest.socket",
                "must be a path of 1 to 107 bytes (sun_path)",
            ));
        }
        if self.stream_socket.as_os_str().is_empty() || self.stream_socket.as_os_str().len() > 107 {
            return Err(bad(
                "ingest.stream_socket",
                "must be a path of 1 to 107 bytes (sun_path)",
            ));
        }
        if self.socket == self.stream_socket {
            return Err(bad(
                "ingest.stream_socket",
                "must differ from ingest.socket",
            ));
        }
        if u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .is_none_or(|m| m > 0o777)
        {
            return Err(bad(
                "ingest.socket_mode",
                "must be an octal mode like \"0660\"",
            ));
        }
        if !(1..=1_048_576).contains(&self.queue_len) {
            return Err(bad("ingest.queue_len", "must be between 1 and 1048576"));
        }
        if !(64..=64 * 1024 * 1024).contains(&self.max_payload_bytes) {
            return Err(bad(
                "ingest.max_payload_bytes",
                "must be between 64 bytes and 64 MiB",
            ));
        }
        if !(1..=1024).contains(&self.recv_batch) {
            return Err(bad("ingest.recv_batch", "must be between 1 and 1024"));
        }
        if !(-20..=19).contains(&self.nice) {
            return Err(bad("ingest.nice", "must be between -20 and 19"));
        }
        if self.max_stream_connections == 0 {
            return Err(bad("ingest.max_stream_connections", "must be at least 1"));
        }
        if !(1..=self.max_stream_connections).contains(&self.max_stream_connections_per_uid) {
            return Err(bad(
                "ingest.max_stream_connections_per_uid",
                "must be between 1 and ingest.max_stream_connections",
            ));
        }
        if self.stream_frame_timeout < Duration::from_millis(10) {
            return Err(bad("ingest.stream_frame_timeout", "must be at least 10ms"));
        }
        // Semaphore permits are taken as u32; a budget under one largest frame would stall
        // such a frame for ever.
        if self.stream_buffer_bytes < self.max_payload_bytes + 4
            || self.stream_buffer_bytes > 1024 * 1024 * 1024
        {
            return Err(bad(
                "ingest.stream_buffer_bytes",
                "must hold one frame of ingest.max_payload_bytes (plus its 4-byte header) and be at most 1 GiB",
            ));
        }
        Ok(())
    }
}

impl BatchConfig {
    fn validate(&self, i: &IngestConfig) -> Result<(), ConfigError> {
        if self.max_items == 0 {
            return Err(bad("batch.max_items", "must be at least 1"));
        }
        if self.max_bytes < i.max_payload_bytes.min(64 * 1024) {
            return Err(bad(
                "batch.max_bytes",
                "must hold at least one 64 KiB profile",
            ));
        }
        if self.max_bytes > 32 * 1024 * 1024 {
            return Err(bad(
                "batch.max_bytes",
                "must be at most 32 MiB (gRPC message size)",
            ));
        }
        if self.max_age.is_zero() {
            return Err(bad("batch.max_age", "must be greater than zero"));
        }
        Ok(())
    }
}

impl CentralConfig {
    /// The listener endpoints the transport dials, in order: `endpoints`, or else `endpoint`.
    pub fn targets(&self) -> Vec<&str> {
        if self.endpoints.is_empty() {
            vec![self.endpoint.as_str()]
        } else {
            self.endpoints.iter().map(String::as_str).collect()
        }
    }

    /// The key that names the endpoints in use, for error messages.
    fn endpoint_key(&self) -> &'static str {
        if self.endpoints.is_empty() {
            "central.endpoint"
        } else {
            "central.endpoints"
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let key = self.endpoint_key();
        for endpoint in self.targets() {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(bad(
                    key,
                    format!("`{endpoint}` must start with http:// or https://"),
                ));
            }
            if endpoint.starts_with("http://") {
                self.validate_plain_http(endpoint)?;
            }
            if endpoint.parse::<tonic::transport::Uri>().is_err() {
                return Err(bad(key, format!("`{endpoint}` is not a valid URI")));
            }
        }
        if self.max_in_flight == 0 {
            return Err(bad("central.max_in_flight", "must be at least 1"));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(bad(
                "central.backoff_min",
                "must be > 0 and <= central.backoff_max",
            ));
        }
        if self.probe_interval < Duration::from_millis(10) {
            return Err(bad(
                "central.probe_interval",
                "must be at least 10ms (it paces dials to an unreachable listener)",
            ));
        }
        Ok(())
    }
}

impl CentralConfig {
    /// Over plain `http://`, TLS settings would be ignored (always a mistake), and a bearer
    /// token would cross the network in clear text unless the listener is on this host.
    fn validate_plain_http(&self, endpoint: &str) -> Result<(), ConfigError> {
        let key = self.endpoint_key();
        if self.tls_ca_file.is_some() || self.tls_domain.is_some() {
            let tls_key = if self.tls_ca_file.is_some() {
                "central.tls_ca_file"
            } else {
                "central.tls_domain"
            };
            return Err(bad(
                tls_key,
                format!(
                    "is a TLS setting but {key} `{endpoint}` is plain http://; use an https:// endpoint"
                ),
            ));
        }
        if (self.token.is_some() || self.token_file.is_some()) && !endpoint_is_loopback(endpoint) {
            let token_key = if self.token_file.is_some() {
                "central.token_file"
            } else {
                "central.token"
            };
            return Err(bad(
                token_key,
                format!(
                    "a bearer token over plain http:// to `{endpoint}` (not loopback) would cross the network in clear text; use an https:// endpoint"
                ),
            ));
        }
        Ok(())
    }
}

/// The endpoint's host is `localhost` or a loopback address (127.0.0.0/8, ::1).
fn endpoint_is_loopback(endpoint: &str) -> bool {
    let Ok(uri) = endpoint.parse::<tonic::transport::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A secret from the configuration (the bearer token): read and written as a plain string, but
/// never shown by `Debug`, and `check-config` prints it redacted ([`Config::to_toml_redacted`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub const REDACTED: &'static str = "<redacted>";

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

/// Files holding a secret that every local user can read (mode `o+r`), as
/// `"<key> <path>"`: the token file, and the config file when it holds `central.token`. Group
/// read is not reported: the group is the operator's choice (e.g. an admin group), "others" is
/// every account on the host, PHP's included.
pub fn secrets_readable_by_others(cfg: &Config, config_path: Option<&Path>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let others_read =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
    let mut found = Vec::new();
    if cfg.central.token.is_some()
        && let Some(p) = config_path
        && others_read(p)
    {
        found.push(format!("central.token {}", p.display()));
    }
    if let Some(p) = &cfg.central.token_file
        && others_read(p)
    {
        found.push(format!("central.token_file {}", p.display()));
    }
    found
}

impl BreakerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.failure_threshold == 0 {
            return Err(bad("breaker.failure_threshold", "must be at least 1"));
        }
        if self.retry_timeout.is_zero() || self.retry_timeout > self.max_retry_timeout {
            return Err(bad(
                "breaker.retry_timeout",
                "must be > 0 and <= breaker.max_retry_timeout",
            ));
        }
        Ok(())
    }
}

impl SpoolConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.dir.as_os_str().is_empty() {
            return Err(bad("spool.dir", "must not be empty"));
        }
        if self.segment_bytes < 64 * 1024 || self.segment_bytes > self.max_bytes {
            return Err(bad(
                "spool.segment_bytes",
                "must be at least 64 KiB and at most spool.max_bytes",
            ));
        }
        if !(1..=100).contains(&self.high_water_pct) {
            return Err(bad("spool.high_water_pct", "must be between 1 and 100"));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_memory_mb < 32 {
            return Err(bad("limits.max_memory_mb", "must be at least 32"));
        }
        if self.memory_budget_mb == 0 || self.memory_budget_mb >= self.max_memory_mb {
            return Err(bad(
                "limits.memory_budget_mb",
                "must be > 0 and below limits.max_memory_mb",
            ));
        }
        Ok(())
    }
}

impl EbpfConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.php_comms.is_empty() || self.php_comms.iter().any(|c| c.is_empty() || c.len() > 15)
        {
            return Err(bad(
                "ebpf.php_comms",
                "must list 1 or more process names of 1 to 15 bytes",
            ));
        }
        if self.poll_interval < Duration::from_millis(50) {
            return Err(bad("ebpf.poll_interval", "must be at least 50ms"));
        }
        Ok(())
    }
}

impl ControlConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "control.metrics_listen",
                format!("`{}` is not an ADDR:PORT", self.metrics_listen),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(bad("control.log_level", "is not a valid tracing filter"));
        }
        Ok(())
    }
}

/// Applies `APM_<SECTION>_<KEY>` overrides for every key the defaults know about.
fn apply_env_overrides(
    doc: &mut toml::Table,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    // Optional keys are absent from the serialized defaults; list them so they can be set too.
    let optional: &[(&str, &str)] = &[
        ("ingest", "socket_group"),
        ("central", "token"),
        ("central", "token_file"),
        ("central", "tls_ca_file"),
        ("central", "tls_domain"),
    ];
    let mut keys: Vec<(String, String)> = Vec::new();
    for (section, table) in &defaults {
        if let Some(t) = table.as_table() {
            keys.extend(t.keys().map(|k| (section.clone(), k.clone())));
        }
    }
    keys.extend(optional.iter().map(|(s, k)| (s.to_string(), k.to_string())));
    for (section, key) in keys {
        let var = format!("APM_{}_{}", section.to_uppercase(), key.to_uppercase());
        let Some(raw) = env(&var) else { continue };
        // A TOML scalar or array if it parses as one, else the raw string.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let entry = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(t) = entry.as_table_mut() else {
            return Err(ConfigError::Env {
                var,
                reason: format!("[{section}] in the file is not a table"),
            });
        };
        t.insert(key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bearer token (or TLS settings) with a plain `http://` endpoint to another host would
    /// cross the network in clear text (or be ignored): an error naming the key. Loopback is
    /// fine (a local relay or the demo).
    #[test]
    fn secrets_over_plain_http_to_another_host_are_refused() {
        for (line, key) in [
            ("token = \"t\"", "central.token"),
            ("token_file = \"/t\"", "central.token_file"),
            ("tls_ca_file = \"/ca.pem\"", "central.tls_ca_file"),
            ("tls_domain = \"x.example\"", "central.tls_domain"),
        ] {
            for endpoint in ["http://10.1.2.3:7421", "http://listener.example:7421"] {
                let e =
                    Config::from_toml(&format!("[central]\nendpoint = \"{endpoint}\"\n{line}\n"))
                        .expect_err("refused")
                        .to_string();
                assert!(
                    e.contains(key) && e.contains("https://"),
                    "{endpoint} {line}: {e}"
                );
            }
        }
        for endpoint in [
            "http://127.0.0.1:7421",
            "http://127.1.2.3:7421",
            "http://[::1]:7421",
            "http://localhost:7421",
            "https://listener.example:7421",
        ] {
            Config::from_toml(&format!(
                "[central]\nendpoint = \"{endpoint}\"\ntoken = \"t\"\n"
            ))
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        }
        Config::from_toml(
            "[central]\nendpoint = \"https://l.example\"\ntls_ca_file = \"/ca.pem\"\n",
        )
        .expect("TLS settings with https");
    }

    /// The token never shows in `Debug` output (logs, panics); it still round-trips through
    /// TOML, since that is how it is configured.
    #[test]
    fn debug_output_redacts_the_token() {
        let cfg = Config::from_toml("[central]\ntoken = \"s3cr3t-value\"\n").expect("valid");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("token: Some(<redacted>)"), "{shown}");
        assert!(cfg.to_toml().contains("s3cr3t-value"));
        assert!(!cfg.to_toml_redacted().contains("s3cr3t-value"));
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_roundtrip_through_toml() {
        let text = Config::default().to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
    }

    #[test]
    fn valid_file_parses() {
        let cfg = Config::from_toml(
            r#"
            [ingest]
            socket = "/tmp/a.sock"
            queue_len = 4096
            [batch]
            max_age = "250ms"
            [spool]
            mode = "always"
            on_full = "drop_newest"
            [central]
            endpoint = "https://apm.example:443"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.ingest.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(cfg.ingest.queue_len, 4096);
        assert_eq!(cfg.batch.max_age, Duration::from_millis(250));
        assert_eq!(cfg.spool.mode, SpoolMode::Always);
        assert_eq!(cfg.spool.on_full, SpoolFull::DropNewest);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = Config::from_toml("[ingest]\nsokcet = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sokcet"), "{err}");
    }

    #[test]
    fn unknown_section_names_the_section() {
        let err = Config::from_toml("[ingset]\n").unwrap_err().to_string();
        assert!(err.contains("ingset"), "{err}");
    }

    #[test]
    fn bad_enum_value_names_the_value() {
        let err = Config::from_toml("[spool]\nmode = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes") && err.contains("mode"), "{err}");
    }

    /// `central.endpoints` replaces `central.endpoint` when set; each entry is checked like
    /// `endpoint`, and errors name `central.endpoints`.
    #[test]
    fn endpoints_list_is_used_and_checked_entry_by_entry() {
        let cfg = Config::from_toml(
            "[central]\nendpoints = [\"http://127.0.0.1:1\", \"https://10.0.0.2:2\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.central.targets(),
            vec!["http://127.0.0.1:1", "https://10.0.0.2:2"]
        );
        assert_eq!(
            Config::default().central.targets(),
            vec!["http://127.0.0.1:7421"]
        );
        let err = Config::from_toml("[central]\nendpoints = [\"http://a:1\", \"ftp://b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config key `central.endpoints`") && err.contains("ftp://b"),
            "{err}"
        );
        let err = Config::from_toml(
            "[central]\ntoken = \"t\"\nendpoints = [\"http://127.0.0.1:1\", \"http://10.0.0.9:1\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("central.token") && err.contains("10.0.0.9"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let err = Config::from_toml("[central]\nendpoint = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config key `central.endpoint`"), "{err}");
        let err = Config::from_toml("[batch]\nmax_items = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch.max_items"), "{err}");
        let err = Config::from_toml("[ingest]\nsocket_mode = \"rw\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.socket_mode"), "{err}");
        let err = Config::from_toml("[central]\nprobe_interval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("central.probe_interval"), "{err}");
        let c = Config::from_toml("[central]\nprobe_interval = \"250ms\"\n").unwrap();
        assert_eq!(c.central.probe_interval, Duration::from_millis(250));
    }

    #[test]
    fn nice_parses_and_a_bad_one_names_the_key() {
        assert_eq!(Config::default().ingest.nice, -4);
        assert_eq!(
            Config::from_toml("[ingest]\nnice = 0\n")
                .unwrap()
                .ingest
                .nice,
            0
        );
        for bad in ["-21", "20"] {
            let err = Config::from_toml(&format!("[ingest]\nnice = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("ingest.nice"), "{err}");
        }
    }

    #[test]
    fn stream_limits_parse_and_bad_ones_name_the_key() {
        let cfg = Config::from_toml(
            "[ingest]\nmax_stream_connections_per_uid = 8\nstream_frame_timeout = \"2s\"\nstream_buffer_bytes = 2000000\n",
        )
        .unwrap();
        assert_eq!(cfg.ingest.max_stream_connections_per_uid, 8);
        assert_eq!(cfg.ingest.stream_frame_timeout, Duration::from_secs(2));
        assert_eq!(cfg.ingest.stream_buffer_bytes, 2_000_000);
        for (text, key) in [
            (
                "[ingest]\nmax_stream_connections = 4\nmax_stream_connections_per_uid = 5\n",
                "ingest.max_stream_connections_per_uid",
            ),
            (
                "[ingest]\nstream_frame_timeout = \"1ms\"\n",
                "ingest.stream_frame_timeout",
            ),
            (
                "[ingest]\nstream_buffer_bytes = 1048576\n",
                "ingest.stream_buffer_bytes",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn bad_duration_is_an_error() {
        let err = Config::from_toml("[batch]\nmax_age = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_age"), "{err}");
    }

    #[test]
    fn env_overrides_win_and_parse_types() {
        let env = |k: &str| match k {
            "APM_CENTRAL_ENDPOINT" => Some("https://10.0.0.1:9".to_string()),
            "APM_INGEST_QUEUE_LEN" => Some("512".to_string()),
            "APM_CENTRAL_TOKEN" => Some("s3cr3t".to_string()),
            "APM_EBPF_PHP_COMMS" => Some(r#"["php-fpm8.2"]"#.to_string()),
            _ => None,
        };
        let cfg = Config::from_toml_with_env("[central]\nendpoint = \"http://file:1\"\n", "t", env)
            .unwrap();
        assert_eq!(cfg.central.endpoint, "https://10.0.0.1:9");
        assert_eq!(cfg.ingest.queue_len, 512);
        assert_eq!(cfg.central.token.as_deref(), Some("s3cr3t"));
        assert_eq!(cfg.ebpf.php_comms, vec!["php-fpm8.2".to_string()]);
    }

    #[test]
    fn bad_env_value_is_an_error() {
        let env = |k: &str| (k == "APM_INGEST_QUEUE_LEN").then(|| "lots".to_string());
        assert!(Config::from_toml_with_env("", "t", env).is_err());
    }
}

#[cfg(test)]
mod deploy_file {
    use super::*;

    /// deploy/agent.toml documents every key at its default: it must parse to exactly the
    /// defaults, and name every key the defaults have. One deliberate difference: the shipped
    /// file restricts the sockets to the PHP-FPM group (`0660`, `www-data`), while an agent
    /// run without a file keeps `0666` (a group that may not exist must not stop it).
    #[test]
    fn deploy_agent_toml_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut shipped = Config::from_toml(&text).unwrap();
        assert_eq!(
            (
                shipped.ingest.socket_mode.as_str(),
                shipped.ingest.socket_group.as_deref()
            ),
            ("0660", Some("www-data"))
        );
        shipped.ingest.socket_mode = Config::default().ingest.socket_mode;
        shipped.ingest.socket_group = None;
        assert_eq!(shipped, Config::default());
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, table) in &defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "section [{section}] documented"
            );
            for key in table.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "key {section}.{key} documented"
                );
            }
        }
    }
}
