//! The eBPF monitor: loads `apm-ebpf` (tracepoints on PHP's sends to the agent's sockets and on
//! worker memory), polls its maps every `ebpf.poll_interval`, consumes its ring buffer, and
//! turns what the kernel saw into status, metrics, `host_stats`, the sender RSS stamped on each
//! profile, and the adaptive sample rate PHP reads.
//!
//! With `ebpf.enabled = "auto"` a kernel or privilege that does not allow it leaves the monitor
//! degraded (the agent runs on, and says why); `"on"` makes it a startup error. See
//! `docs/ebpf.md` for what is measured and the control rule.

mod accounting;
mod btf;
mod loader;
mod metrics;
mod poll;
pub mod procfs;
pub mod sampling;
mod tracefs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use apm_common::{ERR_KINDS, SendCounters, SockKind};
use arc_swap::ArcSwap;
use serde::Serialize;
pub use tokio_util::sync::CancellationToken;

pub use loader::{NOOP_PROGRAMS, PROGRAMS, embedded_object, ensure_tracefs};

use crate::config::{EbpfConfig, EbpfEnabled};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "this apm-agent was built without the eBPF object: run `cargo xtask build-ebpf`, \
         rebuild, or set ebpf.enabled = \"off\""
    )]
    NotBuilt,
    #[error("config key `{key}`: {reason}")]
    Config { key: &'static str, reason: String },
    #[error("config key `{key}`: socket path {path:?} cannot be watched (1 to 107 bytes, no NUL)")]
    Socket { key: &'static str, path: PathBuf },
    #[error(
        "cannot mount tracefs at {path} (the agent needs root or CAP_SYS_ADMIN for that): {source}"
    )]
    Tracefs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot load the eBPF object (needs root, or CAP_BPF + CAP_PERFMON, and a kernel \
         with BPF ring buffers, 5.8+): {0}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object: rebuild with `cargo xtask build-ebpf`")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object: rebuild with `cargo xtask build-ebpf`")]
    MissingMap(&'static str),
    #[error("cannot load eBPF program {name} (rejected by the kernel verifier?): {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach eBPF program {name} to tracepoint {tracepoint}: {source}")]
    Attach {
        name: &'static str,
        tracepoint: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot watch the eBPF event ring buffer: {0}")]
    Io(std::io::Error),
    #[error("{0}: the eBPF programs were not built for this kernel's tracepoints")]
    Layout(String),
}

impl MonitorError {
    /// The program that failed to load or attach, if that is what failed.
    pub fn program(&self) -> Option<&'static str> {
        match self {
            Self::Program { name, .. } | Self::Attach { name, .. } | Self::MissingProgram(name) => {
                Some(name)
            }
            _ => None,
        }
    }
}

/// Everything the monitor needs from the agent.
pub struct MonitorParams {
    pub cfg: EbpfConfig,
    pub dgram_socket: PathBuf,
    pub stream_socket: PathBuf,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub php: Arc<crate::phpctl::PhpControl>,
}

/// Sender RSS by pid, refreshed every poll. Reading is lock-free (one atomic load), so the
/// ingest hot path can stamp every profile.
#[derive(Clone, Default)]
pub struct RssTable(Arc<ArcSwap<HashMap<u32, u64>>>);

impl RssTable {
    /// RSS in bytes of a watched process (PHP or the agent); 0 when unknown or eBPF is off.
    pub fn get(&self, pid: u32) -> u64 {
        self.0.load().get(&pid).copied().unwrap_or(0)
    }

    fn store(&self, m: HashMap<u32, u64>) {
        self.0.store(Arc::new(m));
    }
}

impl std::fmt::Debug for RssTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RssTable")
            .field("pids", &self.0.load().len())
            .finish()
    }
}

/// The kernel-seen figures of a batch's `host_stats` (zero when eBPF is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HostStatsPart {
    pub kernel_sends_ok: u64,
    pub kernel_sends_failed: u64,
    pub php_workers: u32,
    pub php_workers_rss_bytes: u64,
    pub ebpf_enabled: bool,
}

impl HostStatsPart {
    /// Fills the eBPF fields of a batch's `HostStats`.
    pub fn apply(&self, hs: &mut apm_proto::HostStats) {
        hs.kernel_sends_ok = self.kernel_sends_ok;
        hs.kernel_sends_failed = self.kernel_sends_failed;
        hs.php_workers = self.php_workers;
        hs.php_workers_rss_bytes = self.php_workers_rss_bytes;
        hs.ebpf_enabled = self.ebpf_enabled;
    }
}

/// Failed sends by errno.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrnoCounts {
    pub eagain: u64,
    pub enobufs: u64,
    pub emsgsize: u64,
    pub epipe: u64,
    pub econnrefused: u64,
    pub enoent: u64,
    pub other: u64,
}

impl ErrnoCounts {
    pub fn from_err(e: &[u64; ERR_KINDS]) -> Self {
        Self {
            eagain: e[0],
            enobufs: e[1],
            emsgsize: e[2],
            epipe: e[3],
            econnrefused: e[4],
            enoent: e[5],
            other: e[6],
        }
    }

    pub fn add(&mut self, o: &Self) {
        self.eagain += o.eagain;
        self.enobufs += o.enobufs;
        self.emsgsize += o.emsgsize;
        self.epipe += o.epipe;
        self.econnrefused += o.econnrefused;
        self.enoent += o.enoent;
        self.other += o.other;
    }

    pub fn total(&self) -> u64 {
        self.eagain
            + self.enobufs
            + self.emsgsize
            + self.epipe
            + self.econnrefused
            + self.enoent
            + self.other
    }
}

/// Latency of the send syscalls (log2 histogram: percentiles are bucket upper bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Upper bound of the highest non-empty bucket.
    pub max_ns: u64,
}

/// Kernel-seen sends to one of the agent's sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SocketStatus {
    pub path: String,
    pub ok: u64,
    pub failed: ErrnoCounts,
    pub bytes: u64,
    pub latency: LatencySummary,
    /// Stream only: time senders waited between an EAGAIN and the retry that succeeded.
    pub wait_ns: u64,
    /// Connects that failed with EAGAIN (also in `failed.eagain`). On the stream socket: the
    /// listen backlog was full; PHP connects non-blocking and drops the profile.
    pub connect_eagain: u64,
    /// Stream only: connections closed mid-frame (the last send was short or EAGAIN): frames
    /// the sender gave up on (PHP after `stream_wait_ms`). Drops.
    pub abandoned_frames: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkerStatus {
    pub pid: u32,
    pub comm: String,
    /// PHP-FPM pool (`master` for the master process), else the comm.
    pub pool: String,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub over_threshold: bool,
    pub sends_ok: u64,
    /// Both sockets, and failed connects to them.
    pub sends_failed: ErrnoCounts,
    pub bytes: u64,
    /// Profiles lost, as the host's `drops`: failed datagram sends, failed stream sends other
    /// than EAGAIN, stream connects that failed with EAGAIN, abandoned stream frames.
    pub drops: u64,
    pub stream_wait_ns: u64,
    /// Stream connects that failed with EAGAIN (full backlog): drops.
    pub stream_connect_eagain: u64,
    /// Stream frames abandoned mid-way (closed after a short or EAGAIN send): drops.
    pub stream_abandoned_frames: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    pub pid: u32,
    pub comm: String,
    pub pool: String,
    pub peak_rss_bytes: u64,
    pub last_rss_bytes: u64,
    pub sends_ok: u64,
    pub sends_failed: ErrnoCounts,
    pub bytes: u64,
    /// Profiles the process lost, as `WorkerStatus::drops`.
    pub drops: u64,
    /// True when the exit event was lost (ring buffer full) and the agent's sweep retired it.
    pub swept: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    pub worker_exits: u64,
    pub rss_over_threshold: u64,
    pub drop_bursts: u64,
    /// Exited processes retired by the sweep because their event was lost.
    pub swept_exits: u64,
}

/// Entries the maps refused because they were full, by map (`status --json` →
/// `ebpf.map_health.insert_failed`). The kernel-side maps never evict: a full map refuses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MapCounts {
    /// Sends by PHP threads the kernel could not track (a send or connect not counted at all).
    pub sends: u64,
    /// Connected fds not remembered (their later sends are not counted).
    pub conns: u64,
    /// Exiting threads whose counters could not move to their process's entry.
    pub proc_sends: u64,
    /// RSS events of processes whose memory is not tracked.
    pub rss: u64,
    /// mm ids not mapped to their process.
    pub mm_owner: u64,
}

/// Events lost because the ring buffer was full, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventsLost {
    /// Exits of watched processes (the sweep retires them instead: `events.swept_exits`).
    pub exit: u64,
    pub rss: u64,
    pub drop: u64,
}

/// Entries of processes that are gone, removed by the agent's sweep (their exit event was lost,
/// or a sibling thread folded after it), by map. The only evictions there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Evicted {
    pub sends: u64,
    pub proc_sends: u64,
    pub rss: u64,
    pub conns: u64,
    pub mm_owner: u64,
}

/// `status --json` → `ebpf.map_health`: what the eBPF programs could not record and what the
/// agent removed itself. Every field is a counter since the monitor started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MapHealth {
    pub insert_failed: MapCounts,
    pub events_lost: EventsLost,
    pub evicted: Evicted,
}

impl MapHealth {
    /// From the summed per-CPU `HEALTH` array and the sweep's own counts.
    fn new(k: &[u64; apm_common::HEALTH_COUNTERS], evicted: Evicted) -> Self {
        use apm_common::Health as H;
        let g = |h: H| k[h as usize];
        Self {
            insert_failed: MapCounts {
                sends: g(H::SendsFull),
                conns: g(H::ConnsFull),
                proc_sends: g(H::ProcSendsFull),
                rss: g(H::RssFull),
                mm_owner: g(H::MmOwnerFull),
            },
            events_lost: EventsLost {
                exit: g(H::ExitEventLost),
                rss: g(H::RssEventLost),
                drop: g(H::DropEventLost),
            },
            evicted,
        }
    }
}

/// A PHP process in another mount namespace that has its own socket at one of the agent's
/// paths: the programs recognise a socket by its path only, so its sends there are counted as
/// sends to the agent (`status --json` → `ebpf.foreign_sockets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForeignSocket {
    pub pid: u32,
    pub path: String,
}

/// What happened during the last poll interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct IntervalStatus {
    pub interval_ms: u64,
    pub sends: u64,
    /// Profiles lost: failed datagram sends, failed stream sends other than EAGAIN, stream
    /// connects that failed with EAGAIN, abandoned stream frames.
    pub drops: u64,
    /// Stream sends that hit EAGAIN (PHP waits and retries).
    pub stream_eagain: u64,
    pub stream_wait_ns: u64,
    pub p99_ns: u64,
    /// The stream socket's part of `drops`: connects that failed with EAGAIN plus abandoned
    /// frames (what the sample-rate rule counts with the datagram queue-full drops).
    pub stream_queue_drops: u64,
}

/// The `ebpf` object of `apm-agent status --json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EbpfStatus {
    /// The programs are attached and counting.
    pub enabled: bool,
    /// `running`, `degraded` (wanted but could not load) or `disabled` (`ebpf.enabled = off`).
    pub state: &'static str,
    /// Why it is not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The program that failed to load or attach, when that is why it is not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_program: Option<&'static str>,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    /// How a process's last thread is recognised at exit: `group_dead` (the tracepoint's
    /// field, 6.16+), `signal_live` (BTF) or `leader` (the leader thread's exit); empty when
    /// not running.
    pub exit_mode: &'static str,
    /// How the programs read the process name: `btf` (two loads from the task) or `helper`
    /// (`bpf_get_current_comm`, kernels that refuse BTF task reads in tracepoints); empty when
    /// not running.
    pub comm_source: &'static str,
    /// Successful sends to both sockets.
    pub sends_ok: u64,
    /// Failed sends (and failed connects) to both sockets, by errno.
    pub sends_failed: ErrnoCounts,
    pub bytes: u64,
    /// Profiles lost before the agent: every failed datagram send, failed stream sends other
    /// than EAGAIN, stream connects that failed with EAGAIN (full backlog), stream frames
    /// abandoned mid-way (`stream.connect_eagain`, `stream.abandoned_frames`).
    pub drops: u64,
    pub dgram: SocketStatus,
    pub stream: SocketStatus,
    /// PHP processes watched (the PHP-FPM master excluded).
    pub php_workers: u32,
    pub php_workers_rss_bytes: u64,
    /// Highest RSS first, at most `ebpf.max_listed_workers`.
    pub workers: Vec<WorkerStatus>,
    pub workers_truncated: bool,
    pub agent_rss_bytes: u64,
    /// Datagrams the kernel accepted minus what the agent received or rejected since the
    /// monitor started; positive only while datagrams wait in the queue, or if the agent lost
    /// some. Negative when processes that are not PHP send too (they are not counted).
    pub unaccounted: i64,
    /// `unaccounted` above its lowest value over the last 300 polls (never above 0): what the
    /// alarm compares, so datagrams the kernel never counted (queued before attach, adopted at
    /// a handover, non-PHP senders) cannot hide a later loss.
    pub unaccounted_window: i64,
    pub unaccounted_alarm: bool,
    pub unaccounted_alarms: u64,
    pub sample_rate: f64,
    pub adaptive_sampling: bool,
    pub last_interval: IntervalStatus,
    pub events: EventCounts,
    /// Refused map inserts, lost events, entries the agent's sweep removed.
    pub map_health: MapHealth,
    /// PHP processes in another mount namespace with their own socket at one of the agent's
    /// paths: their sends there are counted as the agent's (checked every 10 polls).
    pub foreign_sockets: Vec<ForeignSocket>,
    /// Latest exits, newest last (at most 64).
    pub recent_exits: Vec<ExitStatus>,
    pub polls: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Running,
    Degraded(String),
    Disabled(String),
}

/// Everything a poll produces; published whole, read lock-free.
#[derive(Debug, Clone)]
struct Snapshot {
    host: [apm_common::HostSends; 2],
    workers: Vec<WorkerStatus>,
    php_workers: u32,
    php_rss: u64,
    agent_rss: u64,
    pools: Vec<metrics::PoolStats>,
    unaccounted: i64,
    unaccounted_window: i64,
    alarm: bool,
    alarms_total: u64,
    last: IntervalStatus,
    events: EventCounts,
    health: MapHealth,
    foreign: Vec<ForeignSocket>,
    recent_exits: Vec<ExitStatus>,
    polls: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            host: [apm_common::HostSends::ZERO; 2],
            workers: Vec::new(),
            php_workers: 0,
            php_rss: 0,
            agent_rss: 0,
            pools: Vec::new(),
            unaccounted: 0,
            unaccounted_window: 0,
            alarm: false,
            alarms_total: 0,
            last: IntervalStatus::default(),
            events: EventCounts::default(),
            health: MapHealth::default(),
            foreign: Vec::new(),
            recent_exits: Vec::new(),
            polls: 0,
        }
    }
}

struct Shared {
    state: State,
    kernel: String,
    failed_program: Option<&'static str>,
    exit_mode: &'static str,
    comm_source: &'static str,
    cfg: EbpfConfig,
    dgram: PathBuf,
    stream: PathBuf,
    snap: ArcSwap<Snapshot>,
    php: Arc<crate::phpctl::PhpControl>,
}

/// The running (or degraded, or disabled) monitor. Cheap to query from any task.
pub struct Monitor {
    shared: Arc<Shared>,
    rss: RssTable,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Loads and attaches (mounting tracefs if needed). With `enabled = "auto"` a failure returns a
/// degraded monitor with the reason (logged); with `"on"` it is an error; with `"off"` a
/// disabled monitor. Invalid `ebpf.*` values are errors in every mode.
pub async fn start(p: MonitorParams, shutdown: CancellationToken) -> Result<Monitor, MonitorError> {
    validate(&p.cfg)?;
    let agent_tgid = std::process::id();
    let kcfg = loader::kernel_config(&p.cfg, &p.dgram_socket, &p.stream_socket, agent_tgid)?;
    if p.cfg.enabled == EbpfEnabled::Off {
        tracing::info!("eBPF monitor off (ebpf.enabled = \"off\")");
        return Ok(Monitor::inactive(
            p,
            State::Disabled("ebpf.enabled = \"off\"".into()),
        ));
    }
    let loaded = match embedded_object() {
        None => Err(MonitorError::NotBuilt),
        Some(obj) => loader::load(obj, &kcfg, p.cfg.max_processes, &shutdown),
    };
    let kernel = loader::kernel_release();
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) if p.cfg.enabled == EbpfEnabled::Auto => {
            tracing::warn!(
                kernel = %kernel,
                program = e.program().unwrap_or("-"),
                error = %e,
                "eBPF monitor unavailable on this kernel; running without kernel-seen drops and \
                 worker memory"
            );
            let program = e.program();
            let reason = short_reason(&format!("kernel {kernel}: {e}"));
            let mut m = Monitor::inactive(p, State::Degraded(reason));
            if let Some(sh) = Arc::get_mut(&mut m.shared) {
                sh.failed_program = program;
            }
            return Ok(m);
        }
        Err(e) => {
            tracing::error!(
                kernel = %kernel,
                program = e.program().unwrap_or("-"),
                error = %e,
                "eBPF monitor cannot start (ebpf.enabled = \"on\")"
            );
            return Err(e);
        }
    };
    Ok(running(p, loaded, kernel, agent_tgid, shutdown))
}

/// The monitor once its programs are attached: shared state for status and metrics, and the
/// poller's task.
fn running(
    p: MonitorParams,
    loaded: loader::Loaded,
    kernel: String,
    agent_tgid: u32,
    shutdown: CancellationToken,
) -> Monitor {
    let exit_mode = exit_mode_str(loaded.exit_mode);
    tracing::info!(
        kernel = %kernel,
        exit_mode,
        comm = if loaded.comm_btf { "btf" } else { "helper" },
        programs = PROGRAMS.len(),
        dgram = %p.dgram_socket.display(),
        stream = %p.stream_socket.display(),
        php_comms = ?p.cfg.php_comms,
        "eBPF monitor attached"
    );
    let rss = RssTable::default();
    let shared = Arc::new(Shared {
        state: State::Running,
        kernel,
        failed_program: None,
        exit_mode,
        comm_source: if loaded.comm_btf { "btf" } else { "helper" },
        cfg: p.cfg.clone(),
        dgram: p.dgram_socket.clone(),
        stream: p.stream_socket.clone(),
        snap: ArcSwap::from_pointee(Snapshot::default()),
        php: p.php.clone(),
    });
    let poller = poll::Poller::new(
        (loaded.bpf, loaded.maps),
        shared.clone(),
        rss.clone(),
        p.telemetry,
        p.php,
        agent_tgid,
    );
    let task = tokio::spawn(poll::run(
        poller,
        loaded.events,
        shutdown,
        p.cfg.poll_interval,
    ));
    Monitor {
        shared,
        rss,
        task: Mutex::new(Some(task)),
    }
}

/// A reason short enough for `status --json`: a verifier log runs to thousands of lines, and
/// its end says what was refused (the whole error is in the start-up log).
fn short_reason(r: &str) -> String {
    const MAX: usize = 2000;
    if r.len() <= MAX {
        return r.to_string();
    }
    let head = r.lines().next().unwrap_or("");
    let head = &head[..head.floor_char_boundary(400)];
    let tail = &r[r.ceil_char_boundary(r.len() - 1500)..];
    format!("{head} [...] {tail}")
}

fn exit_mode_str(m: apm_common::ExitMode) -> &'static str {
    match m {
        apm_common::ExitMode::GroupDead => "group_dead",
        apm_common::ExitMode::SignalLive => "signal_live",
        apm_common::ExitMode::Leader => "leader",
    }
}

fn validate(c: &EbpfConfig) -> Result<(), MonitorError> {
    fn bad(key: &'static str, reason: &str) -> MonitorError {
        MonitorError::Config {
            key,
            reason: reason.into(),
        }
    }
    if !(0.0..=1.0).contains(&c.min_sample_rate) {
        return Err(bad("ebpf.min_sample_rate", "must be between 0.0 and 1.0"));
    }
    if !(c.drop_ratio_high > 0.0 && c.drop_ratio_high <= 1.0) {
        return Err(bad(
            "ebpf.drop_ratio_high",
            "must be above 0.0 and at most 1.0",
        ));
    }
    if c.latency_high.is_zero() {
        return Err(bad("ebpf.latency_high", "must be greater than zero"));
    }
    if !(64..=1_048_576).contains(&c.max_processes) {
        return Err(bad("ebpf.max_processes", "must be between 64 and 1048576"));
    }
    if c.max_listed_workers > 10_000 {
        return Err(bad("ebpf.max_listed_workers", "must be at most 10000"));
    }
    if c.php_comms.is_empty() {
        return Err(bad("ebpf.php_comms", "must list at least one process name"));
    }
    Ok(())
}

impl Monitor {
    fn inactive(p: MonitorParams, state: State) -> Self {
        Self {
            shared: Arc::new(Shared {
                state,
                kernel: loader::kernel_release(),
                failed_program: None,
                exit_mode: "",
                comm_source: "",
                cfg: p.cfg,
                dgram: p.dgram_socket,
                stream: p.stream_socket,
                snap: ArcSwap::from_pointee(Snapshot::default()),
                php: p.php,
            }),
            rss: RssTable::default(),
            task: Mutex::new(None),
        }
    }

    /// True while the programs are attached.
    pub fn is_enabled(&self) -> bool {
        self.shared.state == State::Running
    }

    /// Why eBPF is not running, if it is not.
    pub fn reason(&self) -> Option<String> {
        match &self.shared.state {
            State::Running => None,
            State::Degraded(r) | State::Disabled(r) => Some(r.clone()),
        }
    }

    /// The `ebpf` object of `status --json`.
    pub fn status(&self) -> EbpfStatus {
        let sh = &self.shared;
        let s = sh.snap.load();
        let (state, reason) = match &sh.state {
            State::Running => ("running", None),
            State::Degraded(r) => ("degraded", Some(r.clone())),
            State::Disabled(r) => ("disabled", Some(r.clone())),
        };
        let [d, st] = &s.host;
        let mut all = d.c;
        all.add(&st.c);
        let max = sh.cfg.max_listed_workers;
        EbpfStatus {
            enabled: sh.state == State::Running,
            state,
            reason,
            failed_program: sh.failed_program,
            kernel: sh.kernel.clone(),
            exit_mode: sh.exit_mode,
            comm_source: sh.comm_source,
            sends_ok: all.ok,
            sends_failed: ErrnoCounts::from_err(&all.err),
            bytes: all.bytes,
            drops: drops_of(&d.c, &st.c),
            dgram: socket_status(&sh.dgram, d),
            stream: socket_status(&sh.stream, st),
            php_workers: s.php_workers,
            php_workers_rss_bytes: s.php_rss,
            workers: s.workers.iter().take(max).cloned().collect(),
            workers_truncated: s.workers.len() > max,
            agent_rss_bytes: s.agent_rss,
            unaccounted: s.unaccounted,
            unaccounted_window: s.unaccounted_window,
            unaccounted_alarm: s.alarm,
            unaccounted_alarms: s.alarms_total,
            // What the file says, whoever lowered it (the rule or the memory guard).
            sample_rate: sh.php.sample_rate(),
            adaptive_sampling: sh.cfg.adaptive_sampling && sh.state == State::Running,
            last_interval: s.last,
            events: s.events,
            map_health: s.health,
            foreign_sockets: s.foreign.clone(),
            recent_exits: s.recent_exits.clone(),
            polls: s.polls,
        }
    }

    /// Sender RSS by pid (cheap clone; lock-free reads).
    pub fn rss_table(&self) -> RssTable {
        self.rss.clone()
    }

    /// Registers the `apm_ebpf_*` metrics (read from the latest poll at each scrape). Pass the
    /// root registry: the prefix is added here.
    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.sub_registry_with_prefix("apm_ebpf")
            .register_collector(Box::new(metrics::Collector::new(self.shared.clone())));
    }

    /// The kernel-seen part of a batch's `host_stats`.
    pub fn host_stats(&self) -> HostStatsPart {
        if self.shared.state != State::Running {
            return HostStatsPart::default();
        }
        let s = self.shared.snap.load();
        let mut all = s.host[0].c;
        all.add(&s.host[1].c);
        HostStatsPart {
            kernel_sends_ok: all.ok,
            kernel_sends_failed: all.failed(),
            php_workers: s.php_workers,
            php_workers_rss_bytes: s.php_rss,
            ebpf_enabled: true,
        }
    }

    /// Waits for the monitor task to end after the shutdown token fired (programs detached).
    pub async fn join(&self) {
        let t = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.await;
        }
    }
}

fn drops_of(d: &SendCounters, st: &SendCounters) -> u64 {
    d.drops(SockKind::Dgram) + st.drops(SockKind::Stream)
}

fn socket_status(path: &std::path::Path, h: &apm_common::HostSends) -> SocketStatus {
    SocketStatus {
        path: path.display().to_string(),
        ok: h.c.ok,
        failed: ErrnoCounts::from_err(&h.c.err),
        bytes: h.c.bytes,
        latency: latency_summary(&h.hist, h.c.lat_ns_sum),
        wait_ns: h.c.blocked_ns,
        connect_eagain: h.c.connect_eagain,
        abandoned_frames: h.c.abandoned,
    }
}

/// The bucket upper bound at or below which `q` of the samples fall.
pub(crate) fn percentile_ns(hist: &[u64; apm_common::LAT_BUCKETS], q: f64) -> u64 {
    percentile_bucket(hist, q).map_or(0, bucket_ns)
}

/// Lower bound of the histogram bucket holding the `q` quantile (0 when empty): every latency
/// in that bucket is at least this. The sample-rate rule compares this with its threshold (see
/// `sampling::Interval::p99_floor_ns`).
pub(crate) fn percentile_floor_ns(hist: &[u64; apm_common::LAT_BUCKETS], q: f64) -> u64 {
    match percentile_bucket(hist, q) {
        None | Some(0) => 0,
        Some(b) => 1 << (b - 1),
    }
}

/// The bucket holding the `q` quantile; `None` for an empty histogram.
fn percentile_bucket(hist: &[u64; apm_common::LAT_BUCKETS], q: f64) -> Option<usize> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut cum = 0;
    for (b, n) in hist.iter().enumerate() {
        cum += n;
        if cum >= want {
            return Some(b);
        }
    }
    Some(apm_common::LAT_BUCKETS - 1)
}

/// Upper bound of a bucket, with the open-ended last one reported as its lower bound * 2.
fn bucket_ns(b: usize) -> u64 {
    if b >= apm_common::LAT_BUCKETS - 1 {
        1 << apm_common::LAT_BUCKETS
    } else {
        apm_common::lat_bucket_upper_ns(b)
    }
}

fn latency_summary(hist: &[u64; apm_common::LAT_BUCKETS], sum: u64) -> LatencySummary {
    let count: u64 = hist.iter().sum();
    LatencySummary {
        count,
        mean_ns: sum.checked_div(count).unwrap_or(0),
        p50_ns: percentile_ns(hist, 0.5),
        p99_ns: percentile_ns(hist, 0.99),
        max_ns: hist.iter().rposition(|&n| n > 0).map_or(0, bucket_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(enabled: EbpfEnabled) -> (MonitorParams, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let php = Arc::new(crate::phpctl::PhpControl::new(dir.path()).unwrap());
        let cfg = EbpfConfig {
            enabled,
            ..EbpfConfig::default()
        };
        (
            MonitorParams {
                cfg,
                dgram_socket: dir.path().join("d.sock"),
                stream_socket: dir.path().join("s.sock"),
                telemetry: crate::telemetry::Telemetry::new(),
                php,
            },
            dir,
        )
    }

    #[test]
    fn long_reasons_keep_their_start_and_end() {
        let log = format!(
            "kernel 6.1: verifier said\n{}R2 min value is negative",
            "x\n".repeat(5000)
        );
        let r = short_reason(&log);
        assert!(r.len() < 2100, "{}", r.len());
        assert!(r.starts_with("kernel 6.1: verifier said"));
        assert!(r.ends_with("R2 min value is negative"));
        assert_eq!(short_reason("short"), "short");
    }

    #[tokio::test]
    async fn monitor_off_is_disabled_with_a_reason() {
        let (p, _d) = params(EbpfEnabled::Off);
        let m = start(p, CancellationToken::new()).await.unwrap();
        let s = m.status();
        assert!(!s.enabled);
        assert_eq!(s.state, "disabled");
        assert!(s.reason.unwrap().contains("off"));
        assert_eq!(m.host_stats(), HostStatsPart::default());
        assert_eq!(m.rss_table().get(1), 0);
        let j = serde_json::to_value(m.status()).unwrap();
        for k in [
            "enabled",
            "reason",
            "sends_ok",
            "sends_failed",
            "php_workers",
        ] {
            assert!(j.get(k).is_some(), "{k} missing in {j}");
        }
        for k in [
            "eagain",
            "enobufs",
            "emsgsize",
            "epipe",
            "econnrefused",
            "enoent",
            "other",
        ] {
            assert!(j["sends_failed"].get(k).is_some(), "{k} missing");
        }
    }

    #[tokio::test]
    async fn monitor_rejects_bad_values_in_every_mode() {
        let (mut p, _d) = params(EbpfEnabled::Auto);
        p.cfg.min_sample_rate = 2.0;
        let e = start(p, CancellationToken::new()).await.err().unwrap();
        assert!(e.to_string().contains("ebpf.min_sample_rate"), "{e}");
        let (mut p, _d) = params(EbpfEnabled::Off);
        p.cfg.php_comms = (0..9).map(|i| format!("name{i}")).collect();
        let e = start(p, CancellationToken::new()).await.err().unwrap();
        assert!(e.to_string().contains("ebpf.php_comms"), "{e}");
        let (mut p, _d) = params(EbpfEnabled::Off);
        p.dgram_socket = PathBuf::from("x".repeat(120));
        let e = start(p, CancellationToken::new()).await.err().unwrap();
        assert!(e.to_string().contains("ingest.socket"), "{e}");
    }

    #[test]
    fn covered_comm_prefixes_are_dropped() {
        let cfg = EbpfConfig {
            php_comms: vec![
                "php-fpm".into(),
                "php".into(),
                "php8.2".into(),
                "hhvm".into(),
            ],
            ..EbpfConfig::default()
        };
        let k = loader::kernel_config(
            &cfg,
            std::path::Path::new("/a.sock"),
            std::path::Path::new("/b.sock"),
            1,
        )
        .unwrap();
        assert_eq!(k.ncomms, 2, "php covers php-fpm and php8.2");
    }

    #[test]
    fn percentiles_are_bucket_upper_bounds() {
        let mut h = [0u64; apm_common::LAT_BUCKETS];
        h[12] = 98; // [2048, 4096) ns
        h[20] = 2; // [512 Ki, 1 Mi) ns
        assert_eq!(percentile_ns(&h, 0.5), 4096);
        assert_eq!(percentile_ns(&h, 0.98), 4096);
        assert_eq!(percentile_ns(&h, 0.99), 1 << 20);
        let s = latency_summary(&h, 100 * 3000);
        assert_eq!((s.count, s.mean_ns, s.max_ns), (100, 3000, 1 << 20));
        assert_eq!(percentile_ns(&[0; apm_common::LAT_BUCKETS], 0.99), 0);
    }

    #[test]
    fn rss_table_reads_what_was_stored() {
        let t = RssTable::default();
        let c = t.clone();
        t.store(HashMap::from([(42, 4096)]));
        assert_eq!(c.get(42), 4096);
        assert_eq!(c.get(43), 0);
    }
}
