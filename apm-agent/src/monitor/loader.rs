//! Loading `apm-ebpf` into the kernel: tracefs, map sizes, the config map, program attach.

use std::path::Path;

use apm_common::{
    ConnInfo, ConnKey, ExitMode, HostSends, MonitorConfig, ProcSends, RssEntry, SockKind,
    ThreadSends,
};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::MonitorError;
use crate::config::EbpfConfig;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Programs the monitor attaches: (program, category, tracepoint). Exit programs first, so a
/// send already inside the kernel at attach time is not seen half (an exit without its enter
/// finds nothing and does nothing).
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("exit_sendto", "syscalls", "sys_exit_sendto"),
    ("exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("exit_write", "syscalls", "sys_exit_write"),
    ("exit_connect", "syscalls", "sys_exit_connect"),
    ("enter_close", "syscalls", "sys_enter_close"),
    ("enter_dup2", "syscalls", "sys_enter_dup2"),
    ("enter_dup3", "syscalls", "sys_enter_dup3"),
    ("enter_close_range", "syscalls", "sys_enter_close_range"),
    ("process_exec", "sched", "sched_process_exec"),
    ("enter_sendto", "syscalls", "sys_enter_sendto"),
    ("enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("enter_write", "syscalls", "sys_enter_write"),
    ("enter_connect", "syscalls", "sys_enter_connect"),
    ("rss_stat", "kmem", "rss_stat"),
    ("process_exit", "sched", "sched_process_exit"),
];

/// Empty programs on the sendto tracepoints, for overhead baselines; not attached by the agent.
pub const NOOP_PROGRAMS: &[(&str, &str, &str)] = &[
    ("noop_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("noop_exit_sendto", "syscalls", "sys_exit_sendto"),
];

#[cfg(apm_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("APM_EBPF_OBJECT_PATH"));

/// The eBPF object embedded at build time, if the build found one.
pub fn embedded_object() -> Option<&'static [u8]> {
    #[cfg(apm_ebpf)]
    {
        Some(OBJECT)
    }
    #[cfg(not(apm_ebpf))]
    {
        None
    }
}

/// Mounts tracefs at /sys/kernel/tracing when it is missing (tracepoint attach needs it).
pub fn ensure_tracefs() -> Result<(), MonitorError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    nix::mount::mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| MonitorError::Tracefs {
        path: TRACEFS.into(),
        source: std::io::Error::from(e),
    })?;
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}

pub struct Loaded {
    /// Keeps the programs attached.
    pub bpf: Ebpf,
    pub maps: Maps,
    pub events: AsyncFd<RingBuf<MapData>>,
    /// How the exit program recognises a process's last thread on this kernel.
    pub exit_mode: ExitMode,
    /// The process name is read through BTF (else with `bpf_get_current_comm`).
    pub comm_btf: bool,
}

/// The maps the poller reads, taken out of the object once at load with their types checked:
/// a missing or mistyped map is a load error, never a poll that silently reads nothing.
pub struct Maps {
    pub host_sends: PerCpuArray<MapData, HostSends>,
    pub rss: BpfHashMap<MapData, u32, RssEntry>,
    pub proc_sends: BpfHashMap<MapData, u32, ProcSends>,
    pub sends: BpfHashMap<MapData, u64, ThreadSends>,
    pub conns: BpfHashMap<MapData, ConnKey, ConnInfo>,
    /// mm_id -> tgid (swept for dead processes).
    pub mm_owner: BpfHashMap<MapData, u32, u32>,
    /// `apm_common::Health` counters, per CPU.
    pub health: PerCpuArray<MapData, u64>,
}

impl Maps {
    fn take(bpf: &mut Ebpf) -> Result<Self, MonitorError> {
        fn typed<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            bpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, MonitorError> {
            let map = bpf.take_map(name).ok_or(MonitorError::MissingMap(name))?;
            T::try_from(map).map_err(|source| MonitorError::Map { name, source })
        }
        Ok(Self {
            host_sends: typed(bpf, "HOST_SENDS")?,
            rss: typed(bpf, "RSS")?,
            proc_sends: typed(bpf, "PROC_SENDS")?,
            sends: typed(bpf, "SENDS")?,
            conns: typed(bpf, "CONNS")?,
            mm_owner: typed(bpf, "MM_OWNER")?,
            health: typed(bpf, "HEALTH")?,
        })
    }
}

/// What the programs are told about the running kernel through `.rodata` globals.
#[derive(Debug, Clone, Copy)]
struct KernelFacts {
    /// `task_struct.comm`; 0: use `bpf_get_current_comm`.
    comm_offset: u32,
    /// `task_struct.self_exec_id`; 0: connected fds are not checked against execs.
    exec_id_offset: u32,
    exit_mode: ExitMode,
    /// `task_struct.signal`, `signal_struct.live` (for `ExitMode::SignalLive`).
    signal: (u32, u32),
}

impl KernelFacts {
    /// The same without BTF-typed task reads (kernels that refuse them for tracepoints).
    fn without_btf(self) -> Self {
        Self {
            comm_offset: 0,
            exec_id_offset: 0,
            exit_mode: match self.exit_mode {
                ExitMode::SignalLive => ExitMode::Leader,
                m => m,
            },
            signal: (0, 0),
        }
    }
}

/// The running kernel's release (`uname -r`), for messages.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "unknown".into(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}

/// What the programs need to know, as the `CONFIG` map value.
pub fn kernel_config(
    cfg: &EbpfConfig,
    dgram: &Path,
    stream: &Path,
    agent_tgid: u32,
) -> Result<MonitorConfig, MonitorError> {
    use std::os::unix::ffi::OsStrExt;
    let mut k = MonitorConfig::ZERO;
    k.agent_tgid = agent_tgid;
    // A prefix that another prefix already covers costs a compare per event for nothing.
    let mut comms: Vec<&str> = cfg.php_comms.iter().map(String::as_str).collect();
    comms.sort_by_key(|c| c.len());
    let mut kept: Vec<&str> = Vec::new();
    for c in comms {
        if !kept.iter().any(|k| c.starts_with(k)) {
            kept.push(c);
        }
    }
    for c in &kept {
        if !k.add_comm_prefix(c.as_bytes()) {
            return Err(MonitorError::Config {
                key: "ebpf.php_comms",
                reason: format!(
                    "at most {} distinct prefixes of 1 to 15 bytes (`{c}` refused)",
                    apm_common::MAX_COMMS
                ),
            });
        }
    }
    k.rss_threshold_bytes = cfg.rss_threshold_mb.saturating_mul(1024 * 1024);
    k.drop_event_gap_ns = 1_000_000_000;
    for (kind, path, key) in [
        (SockKind::Dgram, dgram, "ingest.socket"),
        (SockKind::Stream, stream, "ingest.stream_socket"),
    ] {
        if !k.set_socket(kind, path.as_os_str().as_bytes()) {
            return Err(MonitorError::Socket {
                key,
                path: path.to_path_buf(),
            });
        }
    }
    Ok(k)
}

/// Loads the object, sizes its maps, writes the config, starts the aya-log forwarder and
/// attaches every program.
pub fn load(
    object: &[u8],
    kcfg: &MonitorConfig,
    max_processes: u32,
    shutdown: &CancellationToken,
) -> Result<Loaded, MonitorError> {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
    ensure_tracefs()?;
    // Every field the programs read, where they read it, before anything loads.
    let layout = super::tracefs::check_layouts().map_err(MonitorError::Layout)?;
    let offsets = super::btf::task_offsets();
    // 0 (no BTF for it): the programs call `bpf_get_current_comm` instead.
    let comm_offset = offsets.comm.unwrap_or(0);
    let signal = offsets.signal_live;
    let facts = KernelFacts {
        comm_offset,
        exec_id_offset: if comm_offset == 0 {
            0
        } else {
            offsets.exec_id.unwrap_or(0)
        },
        exit_mode: match (layout.has_group_dead, signal) {
            (true, _) => ExitMode::GroupDead,
            (false, Some(_)) if comm_offset != 0 => ExitMode::SignalLive,
            (false, _) => ExitMode::Leader,
        },
        signal: signal.unwrap_or((0, 0)),
    };
    match load_with(object, kcfg, max_processes, shutdown, facts) {
        // A kernel with BTF but without `bpf_get_current_task_btf` for tracepoints (before
        // 5.11): the helper it has instead.
        Err(MonitorError::Program { name, source }) if comm_offset != 0 => {
            tracing::warn!(
                program = name,
                error = %source,
                "reading the task through BTF refused; using bpf_get_current_comm (and the \
                 thread-group leader's exit for the process's, if the kernel lacks group_dead)"
            );
            load_with(object, kcfg, max_processes, shutdown, facts.without_btf())
        }
        r => r,
    }
}

fn load_with(
    object: &[u8],
    kcfg: &MonitorConfig,
    max_processes: u32,
    shutdown: &CancellationToken,
    facts: KernelFacts,
) -> Result<Loaded, MonitorError> {
    let p = max_processes.max(64);
    // Only pay for aya-log records somebody will see (target `apm_ebpf` at debug).
    let log_level: u8 = if tracing::enabled!(target: "apm_ebpf", tracing::Level::DEBUG) {
        4
    } else {
        2
    };
    tracing::debug!(
        comm_offset = facts.comm_offset,
        exit_mode = ?facts.exit_mode,
        signal = ?facts.signal,
        "kernel facts for the programs (comm offset 0: bpf_get_current_comm)"
    );
    let exit_mode = facts.exit_mode as u32;
    let mut bpf = EbpfLoader::new()
        .map_max_entries("PROC_SENDS", p)
        .map_max_entries("RSS", p)
        .map_max_entries("MM_OWNER", p.saturating_mul(2))
        .map_max_entries("CONNS", p.saturating_mul(4))
        .map_max_entries("SENDS", p)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
        .override_global("TASK_COMM_OFFSET", &facts.comm_offset, true)
        .override_global("TASK_EXEC_ID_OFFSET", &facts.exec_id_offset, true)
        .override_global("EXIT_MODE", &exit_mode, true)
        .override_global("TASK_SIGNAL_OFFSET", &facts.signal.0, true)
        .override_global("SIGNAL_LIVE_OFFSET", &facts.signal.1, true)
        .load(object)
        .map_err(MonitorError::Load)?;

    let log_stop = shutdown.child_token();
    // The logger must exist before the programs load (it owns the log ring buffer) and live as
    // long as they do: it moves into a task that forwards records to `log`, which the agent's
    // tracing subscriber receives (tracing-log).
    match aya_log::EbpfLogger::init(&mut bpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd lives.
            match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
                Ok(mut fd) => {
                    let stop = log_stop.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => break,
                                r = fd.readable_mut() => match r {
                                    Ok(mut g) => {
                                        g.get_inner_mut().flush();
                                        g.clear_ready();
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "eBPF log forwarding stopped");
                                        break;
                                    }
                                },
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the eBPF log buffer; eBPF logs off");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "no eBPF log buffer"),
    }

    let r = configure_and_attach(bpf, kcfg).map(|(bpf, maps, events)| Loaded {
        bpf,
        maps,
        events,
        exit_mode: facts.exit_mode,
        comm_btf: facts.comm_offset != 0,
    });
    if r.is_err() {
        log_stop.cancel();
    }
    r
}

type Attached = (Ebpf, Maps, AsyncFd<RingBuf<MapData>>);

fn configure_and_attach(mut bpf: Ebpf, kcfg: &MonitorConfig) -> Result<Attached, MonitorError> {
    {
        let map = bpf
            .map_mut("CONFIG")
            .ok_or(MonitorError::MissingMap("CONFIG"))?;
        let mut arr: Array<&mut MapData, MonitorConfig> =
            Array::try_from(map).map_err(|source| MonitorError::Map {
                name: "CONFIG",
                source,
            })?;
        arr.set(0, kcfg, 0).map_err(|source| MonitorError::Map {
            name: "CONFIG",
            source,
        })?;
    }

    for &(name, category, tp) in PROGRAMS {
        let prog: &mut TracePoint = bpf
            .program_mut(name)
            .ok_or(MonitorError::MissingProgram(name))?
            .try_into()
            .map_err(|source| MonitorError::Program { name, source })?;
        prog.load()
            .map_err(|source| MonitorError::Program { name, source })?;
        prog.attach(category, tp)
            .map_err(|source| MonitorError::Attach {
                name,
                tracepoint: format!("{category}/{tp}"),
                source,
            })?;
    }

    let events = bpf
        .take_map("EVENTS")
        .ok_or(MonitorError::MissingMap("EVENTS"))?;
    let events = RingBuf::try_from(events).map_err(|source| MonitorError::Map {
        name: "EVENTS",
        source,
    })?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
    let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| MonitorError::Io(e.into_parts().1))?;
    let maps = Maps::take(&mut bpf)?;
    Ok((bpf, maps, events))
}
