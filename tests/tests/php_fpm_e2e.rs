//! The real chain on the real software: Debian's php8.2-fpm workers running `listener.php` →
//! `apm-agent` (eBPF on, adaptive sampling off) → `apm-listener`, driven over FastCGI at 300
//! requests per second for 11-12 s.
//!
//! 1. Every request's profile is stored exactly once with its URI and status, and for every
//!    worker pid the kernel-seen successful sends (`status --json`: `ebpf.workers[].sends_ok`)
//!    equal the profiles stored from that pid, with no failed send.
//! 2. The agent stopped (SIGTERM) mid-run and started again on the same sockets: every request
//!    is still answered correctly and fast, and for each worker the requests it answered (the
//!    demo app's `X-Demo-Pid` header) equal the profiles stored from it plus the failed sends
//!    the kernel counted for it. A stopped agent's counts go with it, so a second eBPF monitor
//!    (the agent's own `monitor` code, in this test process) watches the same socket paths for
//!    the whole run.
//!
//! Privileged (eBPF). In CI a missing php-fpm or eBPF fails the test; elsewhere it skips with
//! the reason. The two tests run one after the other (a 2-core machine, two pools at 300 req/s).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use apm_agent::config::{EbpfConfig, EbpfEnabled};
use apm_agent::monitor::{CancellationToken, EbpfStatus, Monitor, MonitorParams};
use apm_tests::common::{Agent, Listener, u};
use apm_tests::php::{self, FcgiRequest, FpmConfig, FpmPool, Outcome};
use serde_json::Value;

/// Requests per second (scaled down in the VM tier: `APM_TEST_SCALE`).
fn rate() -> f64 {
    300.0 * apm_tests::scale()
}
/// Adaptive sampling would lower the rate PHP reads and skip profiles the tests expect; a short
/// poll makes the kernel figures current soon after the load stops.
const AGENT_EXTRA: &str = "[ebpf]\nadaptive_sampling = false\npoll_interval = \"100ms\"\n";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    // Short: the agent's socket paths must fit in sun_path (108 bytes).
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// php-fpm and root, or `None` after saying why (a failure in CI).
fn prerequisites() -> Option<PathBuf> {
    let fpm = php::require("php-fpm (php8.2-fpm)", php::php_fpm())?;
    if !nix::unistd::Uid::effective().is_root() {
        assert!(!php::in_ci(), "CI runs these tests as root (eBPF)");
        eprintln!("SKIPPED: eBPF needs root");
        return None;
    }
    Some(fpm)
}

/// The agent's eBPF programs loaded in this process, watching the agent's socket paths
/// independently of the agent's lifetime. Detached on drop.
struct KernelWatch {
    monitor: Monitor,
    shutdown: CancellationToken,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl KernelWatch {
    /// `None` outside CI when eBPF cannot load (after printing why); a panic in CI.
    fn start(dgram: &Path, stream: &Path) -> Option<Self> {
        let dir = tempdir("apm-watch-");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let params = MonitorParams {
            cfg: EbpfConfig {
                enabled: EbpfEnabled::On,
                adaptive_sampling: false,
                poll_interval: Duration::from_millis(100),
                ..EbpfConfig::default()
            },
            dgram_socket: dgram.to_path_buf(),
            stream_socket: stream.to_path_buf(),
            telemetry: apm_agent::telemetry::Telemetry::new(),
            // Its own control files: this monitor must not touch the agent's.
            php: Arc::new(apm_agent::phpctl::PhpControl::new(dir.path()).unwrap()),
        };
        match rt.block_on(apm_agent::monitor::start(params, shutdown.clone())) {
            Ok(monitor) => Some(Self {
                monitor,
                shutdown,
                rt,
                _dir: dir,
            }),
            Err(e) if php::in_ci() => panic!("eBPF must load in CI (root): {e}"),
            Err(e) => {
                eprintln!("SKIPPED: eBPF cannot load here: {e}");
                None
            }
        }
    }

    /// The status after two more polls, so that sends already made are in it.
    fn settled(&self) -> EbpfStatus {
        let want = self.monitor.status().polls + 2;
        assert!(
            php::wait_for(Duration::from_secs(10), || self.monitor.status().polls
                >= want),
            "the test's eBPF monitor stopped polling"
        );
        self.monitor.status()
    }
}

impl Drop for KernelWatch {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.rt.block_on(self.monitor.join());
    }
}

fn start_pool(fpm: &Path, agent: &Agent, workers: usize) -> FpmPool {
    FpmPool::start(
        fpm,
        &FpmConfig {
            workers,
            env: vec![
                ("APM_SOCKET".into(), agent.socket().display().to_string()),
                (
                    "APM_STREAM_SOCKET".into(),
                    agent.stream_socket().display().to_string(),
                ),
                (
                    "APM_RUNTIME_DIR".into(),
                    agent.dir.join("run").display().to_string(),
                ),
            ],
            ..FpmConfig::default()
        },
    )
    .expect("start php-fpm")
}

/// Every response has the status the demo app gives its URI; returns the requests answered per
/// worker pid (`X-Demo-Pid`).
fn check_responses(outcomes: &[Outcome], pool: &FpmPool) -> BTreeMap<u32, u64> {
    let mut answered = BTreeMap::new();
    for o in outcomes {
        let (uri, status) = php::demo_mix(o.index);
        let r = o
            .response
            .as_ref()
            .unwrap_or_else(|e| panic!("{uri}: {e}\n{}", pool.logs()));
        assert_eq!(r.status, status, "{uri}: response status");
        if uri.starts_with("/echo") {
            assert_eq!(r.body, format!("{}\n", o.index).into_bytes(), "{uri}: body");
        }
        let pid: u32 = r
            .header("X-Demo-Pid")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{uri}: no X-Demo-Pid header: {:?}", r.headers));
        *answered.entry(pid).or_default() += 1;
    }
    answered
}

/// The listener's lines (a last line still being written is left for the next read).
fn stored(listener: &Listener) -> Vec<Value> {
    let text = std::fs::read_to_string(&listener.out).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("listener line {l}: {e}")))
        .collect()
}

/// Waits until the listener holds at least `n` lines (or 30 s), then one more second for any
/// duplicate to show up.
fn wait_stored(listener: &Listener, n: usize) -> Vec<Value> {
    php::wait_for(Duration::from_secs(30), || stored(listener).len() >= n);
    std::thread::sleep(Duration::from_secs(1));
    stored(listener)
}

/// Checks each stored profile against the requests made (a known URI, its status, at most once,
/// the sender pid the agent learned equal to the worker's own); returns the profiles stored
/// per pid and the indices of the requests whose profile was stored.
fn check_stored(lines: &[Value], outcomes: &[Outcome]) -> (BTreeMap<u32, u64>, BTreeSet<u64>) {
    let made: HashMap<String, u64> = outcomes.iter().map(|o| (o.uri.clone(), o.index)).collect();
    let mut per_pid = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for line in lines {
        let profile = match &line["profile"] {
            Value::String(s) => serde_json::from_str(s).expect("profile payload is JSON"),
            v => v.clone(),
        };
        let pid = profile["pid"].as_u64().expect("profile pid") as u32;
        assert_eq!(
            line["pid"].as_u64(),
            Some(u64::from(pid)),
            "the sender pid the agent learned is the worker's: {line}"
        );
        let uri = profile["uri"].as_str().unwrap_or_default();
        let Some(&i) = made.get(uri) else {
            panic!("a profile of a request never made: {uri}");
        };
        assert_eq!(
            profile["status"],
            php::demo_mix(i).1,
            "{uri}: profile status"
        );
        assert!(seen.insert(i), "{uri}: stored more than once");
        *per_pid.entry(pid).or_default() += 1;
    }
    (per_pid, seen)
}

/// Kernel-seen (successful sends, failed sends) per pid, from the agent's status JSON.
fn kernel_per_pid_json(ebpf: &Value) -> BTreeMap<u32, (u64, u64)> {
    let mut m = BTreeMap::new();
    for w in ebpf["workers"].as_array().expect("ebpf.workers") {
        let failed: u64 = w["sends_failed"]
            .as_object()
            .expect("sends_failed by errno")
            .values()
            .filter_map(Value::as_u64)
            .sum();
        m.insert(
            w["pid"].as_u64().expect("pid") as u32,
            (u(w, "/sends_ok"), failed),
        );
    }
    m
}

fn latency_summary(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort_unstable();
    (
        php::percentile(&v, 50.0),
        php::percentile(&v, 99.0),
        v.last().copied().unwrap_or_default(),
    )
}

#[test]
fn php_fpm_profiles_arrive_once_and_match_kernel_counts_per_worker() {
    let _serial = serial();
    let Some(fpm) = prerequisites() else { return };
    let dir = tempdir("apm-e2e-");
    let d = dir.path();
    // A second reader of the same kernel counts, independent of the agent's status code.
    let Some(watch) = KernelWatch::start(
        &d.join("run/listener.sock"),
        &d.join("run/listener-stream.sock"),
    ) else {
        return;
    };
    let listener = Listener::start(d, &[]);
    let agent = Agent::start(d, &listener.endpoint(), "on", AGENT_EXTRA);
    let pool = start_pool(&fpm, &agent, 4);
    let workers = pool.worker_pids();
    assert_eq!(workers.len(), 4, "worker pids: {workers:?}");

    let total = (rate() * 11.0) as u64;
    let t = Instant::now();
    let outcomes = php::drive(pool.socket(), rate(), total, 8, |i| {
        FcgiRequest::get(&php::demo_mix(i).0)
    });
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(10), "drove for {took:?}");
    let answered = check_responses(&outcomes, &pool);
    let (p50, p99, max) = latency_summary(outcomes.iter().map(|o| o.latency).collect());
    println!("{total} requests in {took:?}: latency p50 {p50:?} p99 {p99:?} max {max:?}");

    let lines = wait_stored(&listener, total as usize);
    let (stored_per_pid, seen) = check_stored(&lines, &outcomes);
    assert_eq!(
        seen.len(),
        total as usize,
        "profiles stored of {total} requests (first missing: {:?})\n{}",
        (0..total).find(|i| !seen.contains(i)).map(php::demo_mix),
        agent.log()
    );
    assert_eq!(stored_per_pid, answered, "profiles stored per worker");

    // Every send has happened (the responses came first: fastcgi_finish_request); two polls
    // later the kernel figures include them all.
    let ks = watch.settled();
    for pid in &workers {
        let w = ks.workers.iter().find(|w| w.pid == *pid);
        assert_eq!(
            w.map_or((0, 0), |w| (w.sends_ok, w.sends_failed.total())),
            (stored_per_pid.get(pid).copied().unwrap_or_default(), 0),
            "worker {pid}: kernel-seen (ok, failed) sends (test's monitor) vs profiles stored"
        );
    }
    assert_eq!(ks.sends_ok, total, "kernel-seen sends (test's monitor)");

    // The same from the agent's own `status --json`.
    let st = agent.status().expect("status");
    assert_eq!(
        st["ebpf"]["enabled"], true,
        "agent eBPF on: {:#}",
        st["ebpf"]
    );
    let polls = u(&agent.status().expect("status"), "/ebpf/polls");
    let st = agent.wait_for(Duration::from_secs(10), "two more eBPF polls", |s| {
        u(s, "/ebpf/polls") >= polls + 2
    });
    let ebpf = &st["ebpf"];
    let kernel = kernel_per_pid_json(ebpf);
    println!("kernel per worker (ok, failed): {kernel:?}; stored per worker: {stored_per_pid:?}");
    for pid in &workers {
        assert_eq!(
            kernel.get(pid).copied().unwrap_or_default(),
            (stored_per_pid.get(pid).copied().unwrap_or_default(), 0),
            "worker {pid}: kernel-seen (ok, failed) sends vs profiles stored from it\n{ebpf:#}"
        );
    }
    let others: Vec<_> = kernel
        .iter()
        .filter(|(pid, c)| !workers.contains(pid) && **c != (0, 0))
        .collect();
    assert!(others.is_empty(), "sends from non-workers: {others:?}");
    assert_eq!(u(ebpf, "/sends_ok"), total, "kernel-seen sends\n{ebpf:#}");
    assert_eq!(u(ebpf, "/drops"), 0, "kernel-seen drops\n{ebpf:#}");
    assert_eq!(
        ebpf["unaccounted"], 0,
        "kernel vs agent datagrams\n{ebpf:#}"
    );
    assert_eq!(u(&st, "/received"), total, "agent received");
    assert_eq!(u(&st, "/rejected"), 0, "agent rejected");
    drop(pool);
    drop(agent);
}

#[test]
fn php_fpm_agent_stop_costs_php_only_the_dropped_profiles_counted_by_the_kernel() {
    let _serial = serial();
    let Some(fpm) = prerequisites() else { return };
    let dir = tempdir("apm-e2e-");
    let d = dir.path();
    let listener = Listener::start(d, &[]);
    let config = Agent::write_config(d, &listener.endpoint(), "on", AGENT_EXTRA);
    let Some(watch) = KernelWatch::start(
        &d.join("run/listener.sock"),
        &d.join("run/listener-stream.sock"),
    ) else {
        return;
    };
    let mut agent = Agent::start_with(d, &config);
    let pool = start_pool(&fpm, &agent, 4);
    let workers = pool.worker_pids();
    assert_eq!(workers.len(), 4, "worker pids: {workers:?}");

    let total = (rate() * 12.0) as u64;
    let begin = Instant::now();
    let (outcomes, agent, down, up) = std::thread::scope(|scope| {
        let drive = scope.spawn(|| {
            php::drive(pool.socket(), rate(), total, 8, |i| {
                FcgiRequest::get(&php::demo_mix(i).0)
            })
        });
        std::thread::sleep(Duration::from_secs(4));
        let down = begin.elapsed();
        let code = agent.proc.stop(Duration::from_secs(15));
        assert_eq!(
            code,
            apm_testkit::Exit::Code(0),
            "agent exit on SIGTERM\n{}",
            agent.log()
        );
        let stopped = begin.elapsed();
        println!(
            "agent stopped at {down:?} (exit took {:?}); sockets left: dgram {} stream {}",
            stopped.checked_sub(down).unwrap(),
            d.join("run/listener.sock").exists(),
            d.join("run/listener-stream.sock").exists()
        );
        std::thread::sleep(Duration::from_secs(7).saturating_sub(begin.elapsed()));
        drop(agent);
        let agent = Agent::start_with(d, &config);
        let up = begin.elapsed();
        println!("agent ready again at {up:?}");
        (drive.join().expect("driver"), agent, down, up)
    });
    let took = begin.elapsed();
    let answered = check_responses(&outcomes, &pool);
    assert_eq!(answered.values().sum::<u64>(), total);
    // Fast: the requests made while the agent was down are not slower than those before.
    let at = |o: &Outcome| Duration::from_secs_f64(o.index as f64 / rate());
    let before = latency_summary(
        outcomes
            .iter()
            .filter(|o| at(o) < down)
            .map(|o| o.latency)
            .collect(),
    );
    let during = latency_summary(
        outcomes
            .iter()
            .filter(|o| at(o) >= down && at(o) < up)
            .map(|o| o.latency)
            .collect(),
    );
    println!(
        "{total} requests in {took:?}; latency (p50, p99, max) before the stop {before:?}, \
         agent down {during:?}"
    );
    assert!(
        during.1 <= before.1 * 2 + Duration::from_millis(50) && during.2 < Duration::from_secs(1),
        "requests while the agent was down are slower: {during:?} vs {before:?} before"
    );

    let ks = watch.settled();
    let lost: u64 = ks
        .workers
        .iter()
        .filter(|w| workers.contains(&w.pid))
        .map(|w| w.sends_failed.total())
        .sum();
    let lines = wait_stored(&listener, (total - lost) as usize);
    let (stored_per_pid, seen) = check_stored(&lines, &outcomes);
    let ks = watch.settled();
    println!(
        "stored {} of {total}; kernel-seen failed sends: datagram {:?}, stream {:?}",
        seen.len(),
        ks.dgram.failed,
        ks.stream.failed
    );
    let refused = ks.sends_failed.econnrefused + ks.sends_failed.enoent;
    assert!(
        refused > 0,
        "the outage produced no ECONNREFUSED/ENOENT: the test did not test anything\n{ks:#?}"
    );
    assert_eq!(
        (ks.sends_failed.eagain, ks.sends_failed.other),
        (0, 0),
        "no failure but the agent's absence: {:#?}",
        ks.sends_failed
    );
    for pid in &workers {
        let w = ks.workers.iter().find(|w| w.pid == *pid);
        let (ok, failed) = w.map_or((0, 0), |w| (w.sends_ok, w.sends_failed.total()));
        let stored = stored_per_pid.get(pid).copied().unwrap_or_default();
        let answered = answered.get(pid).copied().unwrap_or_default();
        assert_eq!(
            (ok, failed),
            (stored, answered - stored),
            "worker {pid}: kernel-seen (ok, failed) sends vs (profiles stored, requests answered \
             whose profile was not stored)"
        );
    }
    assert_eq!(
        seen.len() as u64 + ks.sends_failed.total(),
        total,
        "every request: its profile stored, or a failed send the kernel counted"
    );
    let st = agent.status().expect("status");
    assert_eq!(
        st["ebpf"]["enabled"], true,
        "agent eBPF on after the restart: {:#}",
        st["ebpf"]
    );
    drop(pool);
    drop(agent);
}
