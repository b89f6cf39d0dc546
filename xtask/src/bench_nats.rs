//! `cargo xtask bench --only jetstream`: profiles/s through one `apm-listener` into its file store
//! and into JetStream (one node R1, three nodes R3), and the total of 1, 2 and 3 listener replicas
//! on one R3 cluster, all on this machine. The load is `apm-listener`'s `flood` example: agent-like
//! gRPC streams of 100-profile batches of 1 KiB profiles, each waiting for its acks (window 8), so
//! a rate is what was stored and acknowledged.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apm_testkit::Proc;
use apm_testkit::nats::NatsCluster;

/// Profiles each flood stream sends.
const PER_STREAM: u64 = 50_000;
/// Agent-like streams per listener: more than one, so the listener's own limit shows, not one
/// stream's round trips.
const STREAMS_PER_LISTENER: usize = 4;
const BATCH: u64 = 100;
const SIZE: usize = 1024;

/// The store a row measures.
#[derive(Clone, Copy)]
enum Store {
    File,
    JetStream { nodes: usize },
}

impl Store {
    fn label(self) -> String {
        match self {
            Self::File => "file (`--store file:`, no fsync, tmpfs when there is one)".into(),
            Self::JetStream { nodes: 1 } => "JetStream R1 (one node)".into(),
            Self::JetStream { nodes } => format!("JetStream R{nodes} ({nodes}-node cluster)"),
        }
    }
}

pub fn run(root: &Path) -> Result<String> {
    let target = crate::target_dir(root);
    let server = crate::setup::nats_server(root)?;
    crate::run_cmd(crate::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "apm-listener",
        "--example",
        "flood",
    ]))?;
    let bin = target.join("release");
    let mut table = String::from(
        "| store | listeners | streams | profiles/s (1 KiB, acked) | MB/s | vs file store |\n|---|---|---|---|---|---|\n",
    );
    let mut file_rate = 0.0;
    for store in [
        Store::File,
        Store::JetStream { nodes: 1 },
        Store::JetStream { nodes: 3 },
    ] {
        eprintln!("bench: {} ...", store.label());
        let rate = measure(&bin, &server, store, 1)?;
        if matches!(store, Store::File) {
            file_rate = rate;
        }
        let row = format!(
            "| {} | 1 | {STREAMS_PER_LISTENER} | {rate:.0} | {:.0} | {:.2} |\n",
            store.label(),
            rate * SIZE as f64 / 1e6,
            rate / file_rate
        );
        eprint!("{row}");
        table.push_str(&row);
    }
    let mut replicas = String::from(
        "| listener replicas (JetStream R3) | streams | total profiles/s | per replica |\n|---|---|---|---|\n",
    );
    let mut best = (0, 0.0);
    for n in 1..=3 {
        eprintln!("bench: {n} listener replica(s) on JetStream R3 ...");
        let rate = measure(&bin, &server, Store::JetStream { nodes: 3 }, n)?;
        if rate > best.1 {
            best = (n, rate);
        }
        let row = format!(
            "| {n} | {} | {rate:.0} | {:.0} |\n",
            n * STREAMS_PER_LISTENER,
            rate / n as f64
        );
        eprint!("{row}");
        replicas.push_str(&row);
    }
    let host = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    Ok(format!(
        "Measured by `cargo xtask bench --only jetstream` ({host}; nats-server, listeners and load \
         generators all on this machine, so every process competes for the same cores). Each \
         stream sends {PER_STREAM} profiles of {SIZE} B in batches of {BATCH} and waits for its \
         acks (at most 8 batches in flight).\n\n{table}\n{replicas}\nThis machine sustains {} \
         listener replica(s): the total peaks there at {:.0} profiles/s; more replicas only share \
         the same cores with the NATS nodes and the load.\n",
        best.0, best.1
    ))
}

/// Starts the store and `listeners` listener replicas, floods each with
/// [`STREAMS_PER_LISTENER`] streams, and returns the total acked profiles/s.
fn measure(bin: &Path, server: &Path, store: Store, listeners: usize) -> Result<f64> {
    let dir = ScratchDir::new()?;
    let d = dir.0.as_path();
    let cluster = match store {
        Store::File => None,
        Store::JetStream { nodes } => Some(NatsCluster::start(server, d, nodes)),
    };
    let mut procs: Vec<(Proc, String)> = Vec::new();
    for k in 0..listeners {
        let mut cmd = Command::new(bin.join("apm-listener"));
        cmd.args(["--listen", "127.0.0.1:0", "--stats-interval", "0"]);
        match (&cluster, store) {
            (Some(c), Store::JetStream { nodes }) => {
                cmd.args(["--store", &c.store(), "--js-replicas", &nodes.to_string()]);
            }
            _ => {
                cmd.arg("--out").arg(d.join(format!("out-{k}.jsonl")));
            }
        }
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join(format!("listener-{k}.log")))?);
        let mut p = Proc::spawn("apm-listener", &mut cmd)?;
        let addr = ready_addr(&mut p).with_context(|| {
            format!(
                "listener {k} did not start: {}",
                std::fs::read_to_string(d.join(format!("listener-{k}.log"))).unwrap_or_default()
            )
        })?;
        procs.push((p, addr));
    }
    let started = Instant::now();
    let mut floods = Vec::new();
    for (_, addr) in &procs {
        for _ in 0..STREAMS_PER_LISTENER {
            floods.push(
                Command::new(bin.join("examples/flood"))
                    .args([
                        addr.as_str(),
                        &PER_STREAM.to_string(),
                        &BATCH.to_string(),
                        &SIZE.to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("start the flood example")?,
            );
        }
    }
    let n = floods.len() as u64;
    for f in floods {
        let out = f.wait_with_output()?;
        if !out.status.success() {
            bail!("flood failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    for (mut p, _) in procs {
        let _ = p.terminate(Duration::from_secs(10));
    }
    drop(cluster);
    Ok((n * PER_STREAM) as f64 / secs)
}

fn ready_addr(p: &mut Proc) -> Result<String> {
    let stdout = p.child.stdout.take().context("piped")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    line.trim()
        .strip_prefix("apm-listener listening on ")
        .map(str::to_string)
        .with_context(|| format!("unexpected ready line {line:?}"))
}

/// A scratch directory on tmpfs when there is one (the disk is not what is measured), removed
/// when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("apm-bench-nats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
