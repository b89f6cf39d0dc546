//! `cargo xtask bench`: measurements, not tests. Every figure in docs/BENCHMARKS.md comes from
//! here; the command rewrites the marked sections of that file with the tables of this run.
//!
//! - `raw`: the receive limit of a Unix datagram socket on this machine: one blocking sender,
//!   one minimal `recv` drain loop, no parsing.
//! - `e2e`: the agent's sustained end-to-end rate to `apm-listener` (stored and acknowledged),
//!   same sender, 1 KiB and 16 KiB profiles; agent CPU seconds per 100k profiles and peak RSS.
//!   The sender blocks when the queue is full, so no datagram is dropped: the rate is what the
//!   agent absorbs, and the ratio to `raw` is measured in the same run.
//! - `catchup` (`bench_catchup.rs`): receive → ack latency at fixed rates, and the catch-up after
//!   a 20 s listener outage at 5000/s.
//! - `jetstream`: one listener into the file store vs JetStream R1 and R3, and 1-3 listener
//!   replicas on one R3 cluster (`bench_nats.rs`).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::live::{control_status, count_lines, start_listener, write_agent_config};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Profiles per end-to-end run.
    #[arg(long, default_value_t = 300_000)]
    profiles: u64,
    /// Print only; do not rewrite docs/BENCHMARKS.md.
    #[arg(long)]
    no_write: bool,
    /// Run only these sections (e2e, spool, ebpf, ebpf-write, jetstream, php, catchup, compare,
    /// soak, soak-ebpf); default all but the soaks (an hour long each).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Length of the soak section in minutes (the listener is down for a sixth of it).
    #[arg(long, default_value_t = 60)]
    soak_minutes: u64,
    /// Profiles per second in the soak section.
    #[arg(long, default_value_t = 2000)]
    soak_rate: u64,
    /// Rounds per profile size in the end-to-end section (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Use the binaries already in target/release instead of building first.
    #[arg(long)]
    pub no_build: bool,
    /// Profile sizes in bytes for the end-to-end section.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 16 * 1024])]
    sizes: Vec<usize>,
}

pub fn payload(id: u64, size: usize) -> Vec<u8> {
    let head = format!(r#"{{"id":"b-{id}","uri":"/bench","status":200,"pad":""#);
    let mut v = head.into_bytes();
    let pad = size.saturating_sub(v.len() + 2);
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(b"\"}");
    v
}

/// Creates a datagram socket with the agent's default queue length (2048), as the agent does.
fn bind_with_qlen(path: &Path, qlen: u32) -> Result<UnixDatagram> {
    let sysctl = "/proc/sys/net/unix/max_dgram_qlen";
    let old = std::fs::read_to_string(sysctl)?.trim().to_string();
    let _ = std::fs::write(sysctl, qlen.to_string());
    let s = UnixDatagram::bind(path);
    let _ = std::fs::write(sysctl, &old);
    Ok(s?)
}

fn sender(path: PathBuf, n: u64, size: usize) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let s = UnixDatagram::unbound().expect("socket");
        let msgs: Vec<Vec<u8>> = (0..64).map(|i| payload(i, size)).collect();
        let t = Instant::now();
        for i in 0..n {
            // Blocking send: waits when the queue is full, never drops.
            while s.send_to(&msgs[(i % 64) as usize], &path).is_err() {}
        }
        t.elapsed()
    })
}

/// Raw receive limit: datagrams per second a bare recv loop drains from one sender.
fn raw(n: u64, size: usize) -> Result<f64> {
    let dir = tempfile_dir("raw")?;
    let path = dir.join("raw.sock");
    let r = bind_with_qlen(&path, 2048)?;
    let tx = sender(path.clone(), n, size);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut start = None;
    while got < n {
        r.recv(&mut buf)?;
        start.get_or_insert_with(Instant::now);
        got += 1;
    }
    let el = start.map_or(Duration::ZERO, |s| s.elapsed());
    tx.join().ok();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(n as f64 / el.as_secs_f64())
}

fn tempfile_dir(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("apm-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// (utime + stime) seconds of a process.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the comm: state is [0], utime [11], stime [12].
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Removes a scratch directory however the run ends (several GB of profiles at 16 KiB).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct E2e {
    /// Profiles/s between 10 % and 90 % delivered.
    rate: f64,
    /// From the first send to the last profile delivered.
    to_last: Duration,
    cpu_per_100k: f64,
    peak_rss: f64,
    stored: u64,
    received: u64,
}

fn e2e(root: &Path, n: u64, size: usize) -> Result<E2e> {
    let bin = crate::target_dir(root).join("release");
    let dir = root.join(".run/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run"))?;
    // The listener's output goes to tmpfs when there is one: this measures the agent and the
    // pipeline, not the VM's disk (buffered writes to /work ran at ~270 MB/s with `dd` here,
    // below what the listener writes at 16 KiB once dirty pages are throttled).
    let shm = Path::new("/dev/shm");
    let out_dir = if shm.is_dir() {
        shm.join(format!("apm-bench-e2e-{}", std::process::id()))
    } else {
        dir.clone()
    };
    std::fs::create_dir_all(&out_dir)?;
    let _cleanup = (out_dir != dir).then(|| RemoveOnDrop(out_dir.clone()));
    let out = out_dir.join("profiles.jsonl");
    let (mut listener, addr) =
        start_listener(&bin.join("apm-listener"), &out, &dir.join("listener.log"))?;
    let cfg = write_agent_config(
        &dir,
        &format!("http://{addr}"),
        crate::live::free_port(),
        "off",
    )?;
    let log = dir.join("agent.log");
    let mut agent = crate::live::start_agent(&bin, &dir, &cfg)?;
    let pid = agent.pid();
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    let tx = sender(dir.join("run/listener.sock"), n, size);
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_mins(5);
    // The rate is taken between 10 % and 90 % delivered: the sustained rate. To the last
    // profile, the run also holds the wait of the final, partial batch for `batch.max_age`
    // (~0.5 s, a third of a run of 300k at 1 KiB), and only when `n` is not a whole number of
    // batches: 300k made 300 batches of 1000 when they were sealed at 1000 profiles, and leaves
    // 416 to wait at 496 per batch.
    let (mut t10, mut t90) = (None, None);
    while delivered < n {
        std::thread::sleep(Duration::from_millis(5));
        delivered = control_status(&dir.join("run")).map_or(0, |s| s.delivered);
        if t10.is_none() && delivered * 10 >= n {
            t10 = Some((t.elapsed(), delivered));
        }
        if t90.is_none() && delivered * 10 >= n * 9 {
            t90 = Some((t.elapsed(), delivered));
        }
        if Instant::now() > deadline {
            bail!(
                "only {delivered} of {n} delivered after 300 s; see {}",
                log.display()
            );
        }
    }
    let el = t.elapsed();
    tx.join().ok();
    let cpu = cpu_seconds(pid) - cpu0;
    let peak = peak_rss_mib(pid);
    let received = control_status(&dir.join("run")).map_or(0, |s| s.received);
    let _ = agent.terminate(Duration::from_secs(30));
    let _ = listener.terminate(Duration::from_secs(10));
    let stored = count_lines(&out);
    let rate = match (t10, t90) {
        (Some((a, da)), Some((b, db))) if b > a => {
            (db - da) as f64 / b.saturating_sub(a).as_secs_f64()
        }
        _ => n as f64 / el.as_secs_f64(),
    };
    Ok(E2e {
        rate,
        to_last: el,
        cpu_per_100k: cpu / (n as f64 / 100_000.0),
        peak_rss: peak,
        stored,
        received,
    })
}

fn replace_section(doc: &str, name: &str, body: &str) -> String {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    match (doc.find(&start), doc.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{start}\n{body}{}", &doc[..a], &doc[b..]),
        _ => format!("{doc}\n{start}\n{body}{end}\n"),
    }
}

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    let host = format!(
        "{} cores, kernel {}, {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        chrono_like_now()
    );
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut sections = Vec::new();
    if want("e2e") {
        let mut table = String::from(
            "| profile size | raw drain (dgram/s) | agent end-to-end (profiles/s, 10 % → 90 % delivered) | agent / raw | first send → last delivered (s) | agent CPU s per 100k | agent peak RSS (MiB) | stored / received / sent, every round |\n|---|---|---|---|---|---|---|---|\n",
        );
        let mut aim = String::new();
        for &size in &args.sizes {
            let mut rounds = Vec::new();
            for round in 1..=args.rounds.max(1) {
                eprintln!("bench: round {round}: raw drain, {size} B ...");
                let r = raw(args.profiles, size)?;
                eprintln!("bench: round {round}: agent end to end, {size} B ...");
                let e = e2e(root, args.profiles, size).context("end-to-end run")?;
                eprintln!(
                    "bench:   raw {r:.0}/s, agent {:.0}/s, ratio {:.2}, CPU {:.2} s/100k, peak RSS {:.1} MiB",
                    e.rate,
                    e.rate / r,
                    e.cpu_per_100k,
                    e.peak_rss
                );
                rounds.push((r, e));
            }
            let med = |f: &dyn Fn(&(f64, E2e)) -> f64| {
                let mut v: Vec<f64> = rounds.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let raw_m = med(&|x| x.0);
            let rate_m = med(&|x| x.1.rate);
            let ratio_m = med(&|x| x.1.rate / x.0);
            let cpu_m = med(&|x| x.1.cpu_per_100k);
            let last_m = med(&|x| x.1.to_last.as_secs_f64());
            let rss_m = med(&|x| x.1.peak_rss);
            let complete = rounds
                .iter()
                .all(|(_, e)| e.stored == args.profiles && e.received == args.profiles);
            let row = format!(
                "| {} KiB | {:.0} | {:.0} | **{:.2}** [{:.2}–{:.2}] | {:.2} | {:.2} | {:.1} (max {:.1}) | {} |\n",
                size / 1024,
                raw_m.0,
                rate_m.0,
                ratio_m.0,
                ratio_m.1,
                ratio_m.2,
                last_m.0,
                cpu_m.0,
                rss_m.0,
                rss_m.2,
                if complete {
                    format!("{0} / {0} / {0}", args.profiles)
                } else {
                    rounds
                        .iter()
                        .map(|(_, e)| format!("{} / {} / {}", e.stored, e.received, args.profiles))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            );
            eprint!("{row}");
            table.push_str(&row);
            if size == 1024 {
                let met = ratio_m.0 >= 0.5 && rss_m.2 < 64.0 && complete;
                aim = format!(
                    "Aim at 1 KiB (agent ≥ 0.50 × raw, RSS < 64 MiB, every profile stored): median ratio {:.2}, \
                     peak RSS at most {:.1} MiB: **{}**.\n",
                    ratio_m.0,
                    rss_m.2,
                    if met { "MET" } else { "NOT MET" }
                );
            }
        }
        let body = format!(
            "Measured by `cargo xtask bench` ({} profiles per run, {} rounds per size, each round a raw \
             run then an agent run; cells are medians over the rounds, the ratio with its range; \
             {host}). The agent's rate is the sustained one, between 10 % and 90 % of the profiles \
             delivered (the agent's count, every 5 ms); the time to the last one also holds the \
             final partial batch's wait for `batch.max_age`, which depends on whether the run is a \
             whole number of batches.\n\n{table}\n{aim}\n",
            args.profiles, args.rounds
        );
        println!("{body}");
        sections.push(("e2e", body));
    }
    if want("spool") {
        eprintln!("bench: spool write/replay vs the disk ...");
        sections.push(("spool", spool(root, &host)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("ebpf") {
        eprintln!("bench: eBPF overhead per send ...");
        sections.push(("ebpf", crate::bench_ebpf::run(root)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("ebpf-write") {
        eprintln!("bench: eBPF overhead per write(2) of other processes ...");
        sections.push(("ebpf-write", crate::bench_ebpf::run_write(root)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("catchup") {
        eprintln!("bench: added latency and catch-up after a listener outage ...");
        sections.push(("catchup", crate::bench_catchup::run(root, &host)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("jetstream") {
        eprintln!("bench: listener stores: file vs JetStream R1/R3, listener replicas ...");
        sections.push(("jetstream", crate::bench_nats::run(root)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("compare") {
        eprintln!("bench: the agent beside a bare recvmmsg sink and syslog-ng ...");
        sections.push((
            "compare",
            crate::bench_compare::run(root, args.rounds, &host)?,
        ));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if want("php") {
        eprintln!("bench: PHP overhead of listener.php ...");
        sections.push(("php", crate::bench_php::run(root)?));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    // An hour each: only when asked for by name.
    for kind in [&crate::bench_soak::SOAK, &crate::bench_soak::SOAK_EBPF] {
        if !args.only.iter().any(|o| o == kind.section) {
            continue;
        }
        eprintln!(
            "bench: {}, {} min at {}/s with a listener outage in the middle ...",
            kind.section, args.soak_minutes, args.soak_rate
        );
        sections.push((
            kind.section,
            crate::bench_soak::run(root, kind, args.soak_minutes, args.soak_rate, &host)?,
        ));
        println!("{}", sections.last().map_or("", |s| s.1.as_str()));
    }
    if !args.no_write {
        let path = root.join("docs/BENCHMARKS.md");
        let mut doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        for (name, body) in &sections {
            doc = replace_section(&doc, name, body);
        }
        std::fs::write(&path, doc)?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// Spool write and replay throughput against the disk's sequential write, in one run.
fn spool(root: &Path, host: &str) -> Result<String> {
    let bin = crate::target_dir(root).join("release/apm-bench-spool");
    let dir = root.join(".run/bench-spool");
    let out = Command::new(&bin)
        .arg(&dir)
        .arg("256")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "apm-bench-spool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0)
    };
    let (dw1, dw2) = (f(&v, "disk_write_mb_s"), f(&v, "disk_write_after_mb_s"));
    let dw = f64::midpoint(dw1, dw2);
    let mut t = format!(
        "Measured by `cargo xtask bench` (256 MiB per run, in `.run/bench-spool`; {host}).\n\n\
         Disk, same volume, same run: sequential write (1 MiB writes + one fdatasync) **{dw1:.0} MB/s** \
         before the spool runs and **{dw2:.0} MB/s** after (the ratio below uses their mean, {dw:.0}), \
         sequential read after dropping the page cache {:.0} MB/s.\n\n\
         | spool record (batch) size | spool write MB/s (fsync = interval, final sync) | write / disk write | reopen + verify MB/s | replay (take + ack) MB/s |\n|---|---|---|---|---|\n",
        f(&v, "disk_read_mb_s")
    );
    for r in v
        .get("spool")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let rb = r
            .get("record_bytes")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        t.push_str(&format!(
            "| {} KiB | {:.0} | {:.2} | {:.0} | {:.0} |\n",
            rb / 1024,
            f(r, "write_mb_s"),
            f(r, "write_mb_s") / dw,
            f(r, "open_mb_s"),
            f(r, "replay_mb_s")
        ));
    }
    t.push_str("\nReopen and replay run right after the write, as after a short outage, so they read from the page cache.\n");
    Ok(t)
}

fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
