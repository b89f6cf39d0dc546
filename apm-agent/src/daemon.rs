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
use crate::ingest::{Ingest, Sockets, StopKind};
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
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Some(fd) = std::env::var("APM_READY_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: `apm-agent start` passed us the write end of a pipe under this number.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = std::io::Write::write_all(&mut &f, b"ready\n");
    }
}

/// Descriptors handed down by a previous image of this process (`apm-agent restart`).
#[derive(Debug, Default)]
struct Inherited {
    dgram: Option<i32>,
    stream: Option<i32>,
    pidfile: Option<i32>,
    queue_len: u32,
    restarts: u64,
}

const INHERIT_ENV: &str = "APM_INHERIT_FDS";

fn take_inherited() -> Inherited {
    let mut i = Inherited::default();
    let Ok(v) = std::env::var(INHERIT_ENV) else {
        return i;
    };
    // SAFETY: called at start, before the runtime spawns threads that read the environment.
    unsafe { std::env::remove_var(INHERIT_ENV) };
    for kv in v.split(',') {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let n = v.parse::<u64>().ok();
        match k {
            "dgram" => i.dgram = n.map(|n| n as i32),
            "stream" => i.stream = n.map(|n| n as i32),
            "pidfile" => i.pidfile = n.map(|n| n as i32),
            "qlen" => i.queue_len = n.unwrap_or(0) as u32,
            "restarts" => i.restarts = n.unwrap_or(0),
            _ => {}
        }
    }
    i
}

/// Sockets systemd kept for us in its fd store across a restart (`FDSTORE=1`).
fn systemd_stored(cfg: &Config) -> Option<Sockets> {
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names().ok()?.collect();
    let d = fds.iter().find(|(_, n)| n == "dgram")?.0;
    let s = fds.iter().find(|(_, n)| n == "stream")?.0;
    let qlen = std::fs::read_to_string(cfg.control.state_dir.join("queue_len"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Sockets::adopt(d, s, qlen, &cfg.ingest).ok()
}

/// Replaces this process image with a fresh one of the same binary, handing down the sockets
/// and the PID-file lock: the PID stays, the kernel queue keeps every datagram sent meanwhile.
fn reexec(sockets: Sockets, pid: PidFile, restarts: u64) -> anyhow::Error {
    use std::os::fd::IntoRawFd;
    let pidfd = pid.raw_fd();
    let qlen = sockets.queue_len;
    let d = sockets.dgram.into_raw_fd();
    let s = sockets.stream.into_raw_fd();
    for fd in [Some(d), Some(s), pidfd].into_iter().flatten() {
        // SAFETY: plain fcntl on descriptors we own.
        unsafe {
            let f = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, f & !libc::FD_CLOEXEC);
        }
    }
    pid.keep_for_exec();
    let v = format!(
        "dgram={d},stream={s},qlen={qlen},restarts={},{}",
        restarts + 1,
        pidfd.map(|p| format!("pidfile={p}")).unwrap_or_default()
    );
    // SAFETY: the runtime is about to be replaced; no other thread reads the environment now.
    unsafe { std::env::set_var(INHERIT_ENV, v) };
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| {
            PathBuf::from(
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string(),
            )
        })
        .unwrap_or_else(|_| PathBuf::from("apm-agent"));
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .map(|a| std::ffi::CString::new(a.into_encoded_bytes()).unwrap_or_default())
        .collect();
    let exe_c = std::ffi::CString::new(exe.as_os_str().as_encoded_bytes()).unwrap_or_default();
    tracing::info!(exe = %exe.display(), "re-executing with the sockets handed over");
    match nix::unistd::execv(&exe_c, &args) {
        Err(e) => anyhow::anyhow!("re-exec of {} failed: {e}", exe.display()),
    }
}

pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<i32> {
    let inherited = take_inherited();
    let pid = match inherited.pidfile {
        Some(fd) => PidFile::adopt(fd, &cfg.control.pid_file)?,
        None => PidFile::acquire(&cfg.control.pid_file, config_path.as_deref())?,
    };
    for dir in [&cfg.control.runtime_dir, &cfg.control.state_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let telemetry = Telemetry::new();
    let php = Arc::new(PhpControl::new(&cfg.control.runtime_dir).with_context(|| {
        format!(
            "cannot write PHP control files in {}",
            cfg.control.runtime_dir.display()
        )
    })?);
    let under_systemd = std::env::var_os("NOTIFY_SOCKET").is_some();
    let sockets = match (inherited.dgram, inherited.stream) {
        (Some(d), Some(s)) => Sockets::adopt(d, s, inherited.queue_len, &cfg.ingest)?,
        _ => match systemd_stored(&cfg) {
            Some(s) => s,
            None => Sockets::bind(&cfg.ingest, cfg.socket_mode())?,
        },
    };
    let _ = crate::phpctl::write_atomic(
        &cfg.control.state_dir.join("queue_len"),
        format!("{}\n", sockets.queue_len).as_bytes(),
    );
    // Under systemd the sockets go to its fd store, so they outlive `systemctl restart`.
    let fd_store = under_systemd && {
        use std::os::fd::AsFd;
        let a = sd_notify::notify_with_fds(
            &[
                sd_notify::NotifyState::FdStore,
                sd_notify::NotifyState::FdName("dgram"),
            ],
            &[sockets.dgram.as_fd()],
        );
        let b = sd_notify::notify_with_fds(
            &[
                sd_notify::NotifyState::FdStore,
                sd_notify::NotifyState::FdName("stream"),
            ],
            &[sockets.stream.as_fd()],
        );
        a.is_ok() && b.is_ok()
    };
    let agent_id = load_or_create_agent_id(&cfg.control.state_dir, &cfg.central.agent_id)?;
    let seqs = SeqAllocator::open(&cfg.control.state_dir)?;
    let hostname = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();

    let stop = crate::ingest::StopSignal::default(); // ingest: stop reading (drain or hand over)
    let deadline = CancellationToken::new(); // router/transport: stop waiting for acks
    let monitor_stop = CancellationToken::new(); // eBPF: detach last, after the final counts

    let mut registry = Registry::default();
    telemetry.register(
        &mut registry,
        crate::telemetry::ScrapeContext::new(&cfg, php.clone()),
    );

    // eBPF before ingest: profiles are stamped with their sender's RSS from the first one, and
    // readiness means "attached, or consciously skipped".
    let monitor = Arc::new(
        crate::monitor::start(
            crate::monitor::MonitorParams {
                cfg: cfg.ebpf.clone(),
                dgram_socket: cfg.ingest.socket.clone(),
                stream_socket: cfg.ingest.stream_socket.clone(),
                telemetry: telemetry.clone(),
                php: php.clone(),
            },
            monitor_stop.clone(),
        )
        .await
        .map_err(|e| crate::config::ConfigError::Invalid {
            key: "ebpf.enabled",
            reason: format!("eBPF is required (\"on\") but cannot run: {e}"),
        })?,
    );
    monitor.register_metrics(&mut registry);
    let ebpf_section: crate::control::Section = {
        let m = monitor.clone();
        Arc::new(move || serde_json::to_value(m.status()).unwrap_or_default())
    };
    let rss_lookup: crate::ingest::RssLookup = {
        let table = monitor.rss_table();
        Arc::new(move |pid| table.get(pid))
    };
    let breaker_section: crate::control::Section = {
        let t = telemetry.clone();
        Arc::new(move || {
            json!(match t.breaker_state.get() {
                1 => "open",
                2 => "half_open",
                _ => "closed",
            })
        })
    };
    let spool = match crate::spool::Spool::open(&cfg.spool) {
        Ok(s) => s,
        Err(e) if crate::router::is_config_error(&e) => {
            return Err(crate::config::ConfigError::Invalid {
                key: "spool.dir",
                reason: e.to_string(),
            }
            .into());
        }
        Err(e) => {
            return Err(anyhow::anyhow!(e).context(format!(
                "cannot open the spool in {}",
                cfg.spool.dir.display()
            )));
        }
    };
    let breaker = crate::breaker::CircuitBreaker::load(
        cfg.breaker.clone(),
        &cfg.control.state_dir.join(crate::breaker::STATE_FILE),
        tokio::time::Instant::now(),
    );
    let spill = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let host_stats = {
        let t = telemetry.clone();
        let php = php.clone();
        let m = monitor.clone();
        Arc::new(move || {
            let mut hs = apm_proto::HostStats {
                received_total: t.received_total(),
                rejected_total: t.rejected_total(),
                dropped_total: t.dropped_total(),
                spool_bytes: t.spool_bytes.get() as u64,
                agent_rss_bytes: t.agent_rss_bytes.get() as u64,
                sample_rate: php.sample_rate(),
                ..Default::default()
            };
            m.host_stats().apply(&mut hs);
            hs
        })
    };
    let transport = Transport::new(
        cfg.central.clone(),
        agent_id.clone(),
        hostname,
        telemetry.clone(),
        host_stats,
    )?;

    // Bounded by bytes: this queue is outside the router's memory budget (see ingest/queue.rs).
    let (profile_tx, profile_rx) =
        crate::ingest::profile_queue(crate::ingest::queue::INGEST_QUEUE_BYTES);
    let (batch_tx, batch_rx) = mpsc::channel(4);
    let (wire_tx, wire_rx) = mpsc::channel(1);
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();

    let live = Arc::new(crate::liveness::Liveness::default());
    let ingest = Ingest {
        cfg: cfg.ingest.clone(),
        sockets,
        telemetry: telemetry.clone(),
        rss: Some(rss_lookup),
        live: live.clone(),
    };
    let ingest_task = tokio::spawn(ingest.run(profile_tx, stop.clone()));
    let batch_task = tokio::spawn(crate::batch::run(
        cfg.batch.clone(),
        seqs,
        profile_rx,
        batch_tx,
        live.clone(),
    ));
    let router = Router {
        telemetry: telemetry.clone(),
        memory_budget: (cfg.limits.memory_budget_mb * 1024 * 1024) as usize,
        live: live.clone(),
        breaker,
        spool: Some(spool),
        spool_cfg: cfg.spool.clone(),
        php: Some(php.clone()),
        spill: spill.clone(),
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
        restarts: inherited.restarts,
    };
    let control_stop = CancellationToken::new();
    let (req_tx, mut req_rx) = mpsc::channel(4);
    let control_listener = crate::control::bind_control(&cfg.control.control_socket())
        .with_context(|| {
            format!(
                "cannot bind the control socket {}",
                cfg.control.control_socket().display()
            )
        })?;
    let control_task = tokio::spawn(crate::control::serve_control(
        control_listener,
        cfg.control.control_socket(),
        source.clone(),
        req_tx,
        control_stop.clone(),
    ));
    if !cfg.control.metrics_listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.control.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "control.metrics_listen: cannot listen on {}",
                    cfg.control.metrics_listen
                )
            })?;
        tokio::spawn(crate::control::serve_metrics(
            l,
            Arc::new(registry),
            source.clone(),
            control_stop.clone(),
        ));
    }
    // The memory guard (see memguard.rs for the order in which it sheds).
    let (mem_tx, mut mem_rx) = mpsc::channel::<()>(1);
    {
        let t = telemetry.clone();
        let stop = control_stop.clone();
        let spill = spill.clone();
        let php = php.clone();
        let limit = cfg.limits.max_memory_mb * 1024 * 1024;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut ladder = crate::memguard::Ladder::default();
            loop {
                tokio::select! { _ = tick.tick() => {}, () = stop.cancelled() => break }
                let rss = crate::telemetry::self_rss_bytes();
                t.agent_rss_bytes.set(rss as i64);
                match t.memory_guard(ladder.check(rss, limit)) {
                    crate::memguard::Action::None => {}
                    crate::memguard::Action::Spill => {
                        tracing::warn!(
                            rss_mb = rss >> 20,
                            limit_mb = limit >> 20,
                            "memory over limits.max_memory_mb: spilling to the spool"
                        );
                        spill.store(true, std::sync::atomic::Ordering::Relaxed);
                        crate::memguard::trim();
                    }
                    crate::memguard::Action::LowerSampleRate => {
                        let r = (php.sample_rate() / 2.0).max(0.05);
                        tracing::warn!(
                            rss_mb = rss >> 20,
                            sample_rate = r,
                            "memory still over the limit: lowering the PHP sample rate"
                        );
                        let _ = php.set_sample_rate(r);
                        crate::memguard::trim();
                    }
                    crate::memguard::Action::Restart => {
                        tracing::error!(
                            rss_mb = rss >> 20,
                            limit_mb = limit >> 20,
                            "memory still over the limit: graceful self-restart"
                        );
                        let _ = mem_tx.try_send(());
                        break;
                    }
                }
            }
        });
    }

    tracing::info!(agent_id = %agent_id, endpoint = %cfg.central.endpoint, socket = %cfg.ingest.socket.display(), "agent ready");
    notify_ready("receiving profiles");
    if under_systemd {
        tokio::spawn(watchdog(live.clone(), source.clone(), control_stop.clone()));
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let current = cfg.clone();
    let mut memory_restart = false;
    let final_kind = if fd_store {
        StopKind::KeepSocket
    } else {
        StopKind::Final
    };
    let kind = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "TERM", "stopping"); break final_kind }
            _ = int.recv() => { tracing::info!(signal = "INT", "stopping"); break final_kind }
            _ = hup.recv() => { let _ = reload(&current, config_path.as_deref()); }
            _ = usr1.recv() => tracing::info!(status = %source.status(), "status dump"),
            Some(()) = mem_rx.recv() => {
                memory_restart = true;
                break if fd_store { final_kind } else { StopKind::Handover };
            }
            Some(req) = req_rx.recv() => match req {
                ControlRequest::Reload(reply) => { let _ = reply.send(reload(&current, config_path.as_deref())); }
                ControlRequest::Restart(reply) => {
                    tracing::info!("restart requested: handing the sockets to a new process image");
                    let _ = reply.send(Ok("restarting: the sockets are handed over, nothing is dropped".into()));
                    break StopKind::Handover;
                }
            },
        }
    };
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);

    // Stop: drain the kernel queue (or hand it over), then give delivery until the deadline.
    stop.stop(kind);
    let timeout = cfg.limits.shutdown_timeout;
    let dl = deadline.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        tracing::warn!(
            ?timeout,
            "shutdown timeout reached: no longer waiting for acknowledgements"
        );
        dl.cancel();
    });
    let handed = match ingest_task.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "ingest failed");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "ingest task failed");
            None
        }
    };
    if kind == StopKind::Handover {
        // Nobody reads the socket until the new image runs: do not wait for acks, put what is
        // in memory into the spool now (the new image replays it; the listener deduplicates
        // anything that was in flight).
        deadline.cancel();
    }
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
        tracing::error!(
            batches = left.len(),
            profiles = n,
            "undelivered at shutdown and no spool: counted as dropped"
        );
        telemetry.drop_profiles(DropReason::Shutdown, n as u64);
    }
    control_stop.cancel();
    let _ = control_task.await;
    monitor_stop.cancel();
    monitor.join().await;
    if let (StopKind::Handover, Some(sockets)) = (kind, handed) {
        tracing::info!(
            received = telemetry.received_total(),
            delivered = telemetry.delivered.get(),
            "memory flushed; re-executing"
        );
        return Err(reexec(sockets, pid, inherited.restarts));
    }
    if kind == StopKind::Final {
        crate::ingest::socket::unlink(&[
            cfg.ingest.socket.clone(),
            cfg.ingest.stream_socket.clone(),
        ]);
    }
    drop(pid);
    if memory_restart {
        tracing::warn!(
            code = crate::memguard::EXIT_MEMORY,
            "exiting for a memory self-restart (systemd restarts the agent; its fd store keeps the sockets)"
        );
        return Ok(crate::memguard::EXIT_MEMORY);
    }
    tracing::info!(
        received = telemetry.received_total(),
        delivered = telemetry.delivered.get(),
        rejected = telemetry.rejected_total(),
        dropped = telemetry.dropped_total(),
        "stopped"
    );
    Ok(exit::OK)
}

/// Pings systemd's watchdog while every stage beats, and keeps `STATUS=` current. Without
/// `WatchdogSec` it only updates the status line.
async fn watchdog(
    live: Arc<crate::liveness::Liveness>,
    source: StatusSource,
    stop: CancellationToken,
) {
    let period = sd_notify::watchdog_enabled();
    let every = period.map_or(std::time::Duration::from_secs(5), |p| {
        (p / 2).max(std::time::Duration::from_millis(100))
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
            (source.breaker)()
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
            check!(
                ingest, batch, central, breaker, spool, limits, ebpf, control
            );
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
