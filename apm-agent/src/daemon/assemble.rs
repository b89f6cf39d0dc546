//! Pipeline assembly: [`Pipeline::spawn`] builds every stage from the configuration and what the
//! daemon acquired, wires them with bounded channels, and starts the side parts (eBPF monitor,
//! control socket, metrics, memory guard); [`Pipeline::shutdown`] stops them in pipeline order.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{ControlRequest, StatusSource};
use crate::daemon::StartError;
use crate::daemon::memguard::Guard;
use crate::events::ProfilesDropped;
use crate::monitor::{Monitor, MonitorParams};
use crate::phpctl::PhpControl;
use crate::pipeline::batch::BatchStage;
use crate::pipeline::breaker::CircuitBreaker;
use crate::pipeline::ingest::{self, Ingest, Sockets, StopKind, StopSignal};
use crate::pipeline::liveness::Liveness;
use crate::pipeline::model::Batch;
use crate::pipeline::router::{Router, RouterDeps, RouterIo};
use crate::pipeline::spool::Spool;
use crate::pipeline::transport::{BearerToken, Transport};
use crate::state::SeqAllocator;
use crate::telemetry::{DropReason, Telemetry};

/// What the daemon acquired before the pipeline can run.
pub struct Deps {
    pub telemetry: Arc<Telemetry>,
    pub php: Arc<PhpControl>,
    pub sockets: Sockets,
    pub agent_id: String,
    pub seqs: SeqAllocator,
    pub config_path: Option<PathBuf>,
    /// Re-execs since the process started.
    pub restarts: u64,
}

/// The running stages and the handles that stop them.
pub struct Pipeline {
    pub telemetry: Arc<Telemetry>,
    pub status: StatusSource,
    pub live: Arc<Liveness>,
    /// Requests from the control socket (reload, restart).
    pub requests: mpsc::Receiver<ControlRequest>,
    /// The memory guard asks for a restart here.
    pub memory_restart: mpsc::Receiver<()>,
    /// A stage that ended before the stop names itself here.
    pub died: mpsc::UnboundedReceiver<&'static str>,
    /// The transport's bearer token, re-read from `central.token_file` on reload.
    pub token: Arc<BearerToken>,
    monitor: Arc<Monitor>,
    tasks: Tasks,
    stop: Stops,
}

struct Tasks {
    ingest: JoinHandle<Result<Option<Sockets>, ingest::IngestError>>,
    batch: JoinHandle<()>,
    router: JoinHandle<Vec<Batch>>,
    transport: JoinHandle<()>,
    control: JoinHandle<std::io::Result<()>>,
}

/// One signal per step of the shutdown, observed in pipeline order.
struct Stops {
    /// Ingest: stop reading (drain the kernel queue, or hand the sockets over).
    ingest: StopSignal,
    /// Router and transport: stop waiting for acks.
    deadline: CancellationToken,
    /// Control socket, metrics, memory guard, watchdog.
    control: CancellationToken,
    /// eBPF: detach last, after the final counts.
    monitor: CancellationToken,
}

/// The channels between the stages (bounded: a slow stage pushes back on the one before).
struct Channels {
    profiles: (ingest::ProfileSink, mpsc::Receiver<ingest::Chunk>),
    batches: (mpsc::Sender<Batch>, mpsc::Receiver<Batch>),
    wire: (mpsc::Sender<Batch>, mpsc::Receiver<Batch>),
}

impl Pipeline {
    pub async fn spawn(cfg: &Config, deps: Deps) -> Result<Self, StartError> {
        let stop = Stops {
            ingest: StopSignal::default(),
            deadline: CancellationToken::new(),
            control: CancellationToken::new(),
            monitor: CancellationToken::new(),
        };
        let mut registry = Registry::default();
        deps.telemetry.register(
            &mut registry,
            crate::telemetry::ScrapeContext::new(cfg, deps.php.clone()),
        );
        // eBPF before ingest: profiles are stamped with their sender's RSS from the first one,
        // and readiness means "attached, or consciously skipped".
        let monitor = start_monitor(cfg, &deps, stop.monitor.clone()).await?;
        monitor.register_metrics(&mut registry);
        let spill = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Liveness::default());
        let router = router(cfg, &deps, live.clone(), spill.clone())?;
        let transport = transport(cfg, &deps, &monitor)?;
        let token = transport.token();
        let status = status_source(cfg, &deps, &monitor, live.clone());
        let (died_tx, died) = mpsc::unbounded_channel();
        let (tasks, requests) = spawn_stages(
            cfg,
            deps,
            &monitor,
            StageParts {
                router,
                transport,
                live: live.clone(),
                status: status.clone(),
                registry,
            },
            &stop,
            &died_tx,
        )
        .await?;
        let memory_restart = spawn_memguard(cfg, &status, spill, stop.control.clone());
        Ok(Self {
            telemetry: status.telemetry.clone(),
            status,
            live,
            requests,
            memory_restart,
            died,
            token,
            monitor,
            tasks,
            stop,
        })
    }

    /// A token cancelled once the control side stops (for tasks that live as long as it).
    pub fn control_stop(&self) -> CancellationToken {
        self.stop.control.clone()
    }

    /// Stops in pipeline order: ingest drains the kernel queue (or hands the sockets over), the
    /// batcher seals what it holds, the router delivers until `timeout` and spools the rest.
    /// Returns the sockets on a handover.
    pub async fn shutdown(self, kind: StopKind, timeout: std::time::Duration) -> Option<Sockets> {
        let Self {
            telemetry,
            monitor,
            tasks,
            stop,
            ..
        } = self;
        stop.ingest.stop(kind);
        let dl = stop.deadline.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            tracing::warn!(
                ?timeout,
                "shutdown timeout reached: no longer waiting for acknowledgements"
            );
            dl.cancel();
        });
        let handed = match tasks.ingest.await {
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
            // Nobody reads the socket until the new image runs: do not wait for acks, put what
            // is in memory into the spool now (the new image replays it; the listener
            // deduplicates anything that was in flight).
            stop.deadline.cancel();
        }
        if let Err(e) = tasks.batch.await {
            tracing::error!(error = %e, "batcher task failed");
        }
        let left = tasks.router.await.unwrap_or_default();
        stop.deadline.cancel();
        let _ = tasks.transport.await;
        let n: usize = left.iter().map(Batch::len).sum();
        ProfilesDropped {
            reason: DropReason::Shutdown,
            profiles: n as u64,
            what: "undelivered at shutdown and the spool could not take them: dropped",
            seq: None,
        }
        .emit(&telemetry);
        stop.control.cancel();
        let _ = tasks.control.await;
        stop.monitor.cancel();
        monitor.join().await;
        handed
    }
}

async fn start_monitor(
    cfg: &Config,
    deps: &Deps,
    stop: CancellationToken,
) -> Result<Arc<Monitor>, StartError> {
    let params = MonitorParams {
        cfg: cfg.ebpf.clone(),
        dgram_socket: cfg.ingest.socket.clone(),
        stream_socket: cfg.ingest.stream_socket.clone(),
        telemetry: deps.telemetry.clone(),
        php: deps.php.clone(),
    };
    let m = crate::monitor::start(params, stop)
        .await
        .map(Arc::new)
        .map_err(StartError::from_monitor);
    // Loading parses the kernel's BTF (several MiB, freed once the programs are loaded): glibc
    // keeps that heap unless told, and it was most of the RSS eBPF added (docs/agent.md,
    // "Where the memory goes").
    crate::daemon::memguard::trim();
    m
}

fn router(
    cfg: &Config,
    deps: &Deps,
    live: Arc<Liveness>,
    spill: Arc<AtomicBool>,
) -> Result<Router, StartError> {
    // `always` mode: ingest waits for each group's write-ahead (pipeline/durable.rs).
    deps.telemetry
        .gate
        .set_write_ahead(cfg.spool.mode == crate::config::SpoolMode::Always);
    let spool = Spool::open(&cfg.spool).map_err(|source| StartError::Spool {
        dir: cfg.spool.dir.clone(),
        source,
    })?;
    let breaker = CircuitBreaker::load(
        cfg.breaker.clone(),
        &cfg.control
            .state_dir
            .join(crate::pipeline::breaker::STATE_FILE),
        tokio::time::Instant::now(),
    );
    Ok(Router::new(RouterDeps {
        telemetry: deps.telemetry.clone(),
        memory_budget: (cfg.limits.memory_budget_mb * 1024 * 1024) as usize,
        live,
        breaker,
        spool,
        spool_cfg: cfg.spool.clone(),
        php: deps.php.clone(),
        spill,
    }))
}

/// The transport, with the host figures it sends in every batch.
fn transport(cfg: &Config, deps: &Deps, monitor: &Arc<Monitor>) -> Result<Transport, StartError> {
    let hostname = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let host_stats = {
        let t = deps.telemetry.clone();
        let php = deps.php.clone();
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
    Ok(Transport::new(
        cfg.central.clone(),
        deps.agent_id.clone(),
        hostname,
        deps.telemetry.clone(),
        host_stats,
    )?)
}

fn status_source(
    cfg: &Config,
    deps: &Deps,
    monitor: &Arc<Monitor>,
    live: Arc<Liveness>,
) -> StatusSource {
    let m = monitor.clone();
    let secrets_readable_by_others =
        crate::config::secrets_readable_by_others(cfg, deps.config_path.as_deref());
    for s in &secrets_readable_by_others {
        let (key, path) = s.split_once(' ').unwrap_or((s.as_str(), ""));
        tracing::warn!(
            key,
            path,
            "a file holding a secret is readable by every local user: chmod o-r it"
        );
    }
    StatusSource {
        secrets_readable_by_others,
        telemetry: deps.telemetry.clone(),
        php: deps.php.clone(),
        agent_id: deps.agent_id.clone(),
        epoch: format!("{:016x}", deps.seqs.epoch()),
        new_epoch: deps.seqs.new_epoch(),
        endpoint: cfg.central.targets().join(","),
        config_path: deps.config_path.clone(),
        ebpf: Arc::new(move || serde_json::to_value(m.status()).unwrap_or_default()),
        restarts: deps.restarts,
        live,
    }
}

/// What `spawn_stages` wires together beside the acquired parts.
struct StageParts {
    router: Router,
    transport: Transport,
    live: Arc<Liveness>,
    status: StatusSource,
    registry: Registry,
}

/// Spawns ingest → batch → router → transport, then the control socket and `/metrics`.
async fn spawn_stages(
    cfg: &Config,
    deps: Deps,
    monitor: &Arc<Monitor>,
    parts: StageParts,
    stop: &Stops,
    died: &mpsc::UnboundedSender<&'static str>,
) -> Result<(Tasks, mpsc::Receiver<ControlRequest>), StartError> {
    let ch = Channels {
        // Bounded by bytes: this queue is outside the router's memory budget (ingest/queue.rs).
        profiles: ingest::profile_queue(ingest::queue::INGEST_QUEUE_BYTES),
        // One sealed batch waits for the router while the batcher fills the next: each is up to
        // `batch.max_bytes` outside the memory budget, and four of them cost ~4 MiB of peak RSS
        // at 16 KiB flat out with no gain in rate (docs/agent.md, "Where the memory goes").
        batches: mpsc::channel(1),
        wire: mpsc::channel(1),
    };
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
    let rss_lookup: ingest::RssLookup = {
        let table = monitor.rss_table();
        Arc::new(move |pid| table.get(pid))
    };
    let ingest = Ingest {
        cfg: cfg.ingest.clone(),
        sockets: deps.sockets,
        telemetry: deps.telemetry.clone(),
        rss: Some(rss_lookup),
        live: parts.live.clone(),
    };
    let watch = Watch {
        stopping: stop.ingest.token(),
        died: died.clone(),
    };
    let ingest = watch.spawn("ingest", ingest.run(ch.profiles.0, stop.ingest.clone()));
    let batch = watch.spawn(
        "batch",
        crate::pipeline::batch::run(
            BatchStage {
                cfg: cfg.batch.clone(),
                seqs: deps.seqs,
                live: parts.live.clone(),
                telemetry: deps.telemetry.clone(),
                deadline: stop.deadline.clone(),
            },
            ch.profiles.1,
            ch.batches.0,
        ),
    );
    let router = watch.spawn(
        "router",
        parts.router.run(RouterIo {
            input: ch.batches.1,
            to_transport: ch.wire.0,
            outcomes: outcome_rx,
            deadline: stop.deadline.clone(),
        }),
    );
    let transport = watch.spawn(
        "transport",
        parts
            .transport
            .run(ch.wire.1, outcome_tx, stop.deadline.clone()),
    );
    let (control, requests) =
        spawn_control(cfg, parts.status, parts.registry, &stop.control).await?;
    let tasks = Tasks {
        ingest,
        batch,
        router,
        transport,
        control,
    };
    Ok((tasks, requests))
}

/// Spawns the stages so that one that ends before the stop was asked for is not silent: its
/// name goes to the daemon, which stops the agent with an error (a supervisor restarts it).
struct Watch {
    stopping: CancellationToken,
    died: mpsc::UnboundedSender<&'static str>,
}

impl Watch {
    fn spawn<T: Send + 'static>(
        &self,
        stage: &'static str,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        let (stopping, died) = (self.stopping.clone(), self.died.clone());
        tokio::spawn(async move {
            let out = fut.await;
            if !stopping.is_cancelled() {
                tracing::error!(
                    stage,
                    "pipeline stage ended before the stop: stopping the agent"
                );
                let _ = died.send(stage);
            }
            out
        })
    }
}

/// The control socket (status, reload, restart) and, when configured, `/metrics`.
async fn spawn_control(
    cfg: &Config,
    status: StatusSource,
    registry: Registry,
    stop: &CancellationToken,
) -> Result<
    (
        JoinHandle<std::io::Result<()>>,
        mpsc::Receiver<ControlRequest>,
    ),
    StartError,
> {
    let path = cfg.control.control_socket();
    let listener = crate::control::bind_control(&path).map_err(|source| StartError::Control {
        path: path.clone(),
        source,
    })?;
    let (req_tx, req_rx) = mpsc::channel(4);
    let control = tokio::spawn(crate::control::serve_control(
        listener,
        path,
        status.clone(),
        req_tx,
        stop.clone(),
    ));
    if !cfg.control.metrics_listen.is_empty() {
        let addr = &cfg.control.metrics_listen;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        tokio::spawn(crate::control::serve_metrics(
            l,
            Arc::new(registry),
            status,
            stop.clone(),
        ));
    }
    Ok((control, req_rx))
}

/// The memory guard (see memguard.rs for the order in which it sheds).
fn spawn_memguard(
    cfg: &Config,
    status: &StatusSource,
    spill: Arc<AtomicBool>,
    stop: CancellationToken,
) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let guard = Guard {
        telemetry: status.telemetry.clone(),
        php: status.php.clone(),
        spill,
        limit: cfg.limits.max_memory_mb * 1024 * 1024,
    };
    tokio::spawn(async move {
        if guard.run(stop).await {
            let _ = tx.send(()).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_that_ends_before_the_stop_is_reported_and_one_that_ends_after_is_not() {
        let (died_tx, mut died) = mpsc::unbounded_channel();
        let stopping = CancellationToken::new();
        let watch = Watch {
            stopping: stopping.clone(),
            died: died_tx,
        };
        watch.spawn("batch", async {}).await.unwrap();
        assert_eq!(died.try_recv().ok(), Some("batch"));
        stopping.cancel();
        watch.spawn("router", async {}).await.unwrap();
        assert!(died.try_recv().is_err(), "ended after the stop: expected");
    }
}
