//! `cargo xtask bench --only soak` (eBPF off) and `--only soak-ebpf` (eBPF on): the agent over a
//! long run (an hour by default) at a fixed rate, with the central listener down for a sixth of
//! it in the middle (ten minutes of an hour). Every 10 s it samples the agent's RSS, CPU, spool
//! and counters into `docs/soak.csv` (`docs/soak-ebpf.csv`) and draws them into `docs/soak.png`
//! (`docs/soak-ebpf.png`); the summary compares the first and the last ten minutes (delivery
//! rate and RSS), which should be equal: nothing grows with time or with an outage that has
//! been caught up. With eBPF on it also holds the kernel's count of the sends against the
//! sender's own, which must be equal after an hour of them.
//!
//! The sender is PHP-like: a thread named `php-soak` (a PHP comm to the monitor), non-blocking
//! `sendto`, 1 KiB JSON, and a send that finds the queue full (EAGAIN) is counted and dropped, as
//! PHP drops it.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::live::{control_status, start_listener_at, write_agent_config};

/// One sample of the run.
#[derive(Debug, Clone, Default)]
struct Sample {
    t_s: f64,
    listener_up: bool,
    rss_mib: f64,
    cpu_s: f64,
    spool_mib: f64,
    sent: u64,
    eagain: u64,
    received: u64,
    delivered: u64,
    dropped: u64,
}

const HEADER: &str =
    "t_s,listener_up,rss_mib,cpu_s,spool_mib,sent,eagain,received,delivered,dropped";

impl Sample {
    fn csv(&self) -> String {
        format!(
            "{:.0},{},{:.2},{:.2},{:.2},{},{},{},{},{}",
            self.t_s,
            u8::from(self.listener_up),
            self.rss_mib,
            self.cpu_s,
            self.spool_mib,
            self.sent,
            self.eagain,
            self.received,
            self.delivered,
            self.dropped
        )
    }
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A non-blocking sender at `rate` per second until `stop`: counts sends and EAGAINs.
fn sender(
    path: PathBuf,
    rate: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    eagain: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    // Named so the eBPF monitor takes it for PHP (`ebpf.php_comms` are prefixes: "php").
    let b = std::thread::Builder::new().name("php-soak".into());
    b.spawn(move || {
        let Ok(s) = UnixDatagram::unbound() else {
            return;
        };
        let _ = s.set_nonblocking(true);
        let start = Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(d);
            }
            let body = crate::bench::payload(i, 1024);
            match s.send_to(&body, &path) {
                Ok(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    eagain.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
            i += 1;
        }
    })
    .expect("spawning the soak sender")
}

/// Where a soak writes: its section of BENCHMARKS.md, its CSV and its chart.
pub struct SoakKind {
    pub section: &'static str,
    pub ebpf: bool,
    csv: &'static str,
    png: &'static str,
}

pub const SOAK: SoakKind = SoakKind {
    section: "soak",
    ebpf: false,
    csv: "docs/soak.csv",
    png: "docs/soak.png",
};

pub const SOAK_EBPF: SoakKind = SoakKind {
    section: "soak-ebpf",
    ebpf: true,
    csv: "docs/soak-ebpf.csv",
    png: "docs/soak-ebpf.png",
};

/// Runs the soak and returns the BENCHMARKS.md section; writes the kind's CSV and chart.
pub fn run(root: &Path, kind: &SoakKind, minutes: u64, rate: u64, host: &str) -> Result<String> {
    let bin = crate::target_dir(root).join("release");
    let dir = root.join(".run").join(kind.section);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run"))?;
    let out = dir.join("profiles.jsonl");
    let listen = format!("127.0.0.1:{}", crate::live::free_port());
    let (first, addr) = start_listener_at(
        &bin.join("apm-listener"),
        &out,
        &dir.join("listener-1.log"),
        &listen,
    )?;
    let cfg = write_agent_config(
        &dir,
        &format!("http://{addr}"),
        crate::live::free_port(),
        if kind.ebpf { "on" } else { "off" },
    )?;
    let _log = dir.join("agent.log");
    let mut agent = crate::live::start_agent(&bin, &dir, &cfg)?;
    let pid = agent.pid();
    if kind.ebpf && !control_status(&dir.join("run")).is_some_and(|s| s.ebpf_enabled()) {
        anyhow::bail!(
            "the agent started without its eBPF monitor: see {}",
            dir.join("agent.log").display()
        );
    }
    let total = Duration::from_secs(minutes * 60);
    // The outage: a sixth of the run, centred (25 to 35 min of an hour).
    let outage = (total * 5 / 12, total * 7 / 12);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, eagain) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tx = sender(
        dir.join("run/listener.sock"),
        rate,
        stop.clone(),
        sent.clone(),
        eagain.clone(),
    );
    let start = Instant::now();
    let mut listener = Some(first);
    let mut samples: Vec<Sample> = Vec::new();
    let mut csv = format!("{HEADER}\n");
    let mut next = Duration::ZERO;
    while start.elapsed() < total {
        let el = start.elapsed();
        if listener.is_some() && el >= outage.0 && el < outage.1 {
            eprintln!("soak: {:.0} s: listener stopped", el.as_secs_f64());
            if let Some(mut l) = listener.take() {
                let _ = l.terminate(Duration::from_secs(10));
            }
        }
        if listener.is_none() && el >= outage.1 {
            eprintln!("soak: {:.0} s: listener back", el.as_secs_f64());
            let (l, _) = start_listener_at(
                &bin.join("apm-listener"),
                &out,
                &dir.join("listener-2.log"),
                &addr,
            )?;
            listener = Some(l);
        }
        if el >= next {
            let st = control_status(&dir.join("run")).unwrap_or_default();
            let s = Sample {
                t_s: el.as_secs_f64(),
                listener_up: listener.is_some(),
                rss_mib: rss_mib(pid),
                cpu_s: crate::bench::cpu_seconds(pid),
                spool_mib: st.spool_bytes as f64 / 1_048_576.0,
                sent: sent.load(Ordering::Relaxed),
                eagain: eagain.load(Ordering::Relaxed),
                received: st.received,
                delivered: st.delivered,
                dropped: st.dropped_total(),
            };
            csv.push_str(&s.csv());
            csv.push('\n');
            if samples.len().is_multiple_of(30) {
                eprintln!(
                    "soak: {:.0} s: rss {:.1} MiB, cpu {:.1} s, spool {:.1} MiB, delivered {}",
                    s.t_s, s.rss_mib, s.cpu_s, s.spool_mib, s.delivered
                );
            }
            samples.push(s);
            std::fs::write(root.join(kind.csv), &csv)?;
            next += Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tx.join();
    // The books at the end, once the agent has caught up.
    let settle = Instant::now() + Duration::from_mins(5);
    let mut last = control_status(&dir.join("run")).unwrap_or_default();
    while Instant::now() < settle {
        last = control_status(&dir.join("run")).unwrap_or_default();
        if last.delivered + last.dropped_total() == last.received && last.spooled_batches == 0 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = agent.terminate(Duration::from_secs(30));
    if let Some(mut l) = listener.take() {
        let _ = l.terminate(Duration::from_secs(10));
    }
    let stored = crate::live::count_lines(&out);
    let png = root.join(kind.png);
    if let Err(e) = draw(&samples, outage, &png) {
        eprintln!("soak: no chart drawn: {e:#}");
    }
    let sends = (sent.load(Ordering::Relaxed), eagain.load(Ordering::Relaxed));
    Ok(summary(
        &samples, sends, kind, minutes, rate, outage, &last, stored, host,
    ))
}

/// Median of `f` over the samples in `[from, to)` seconds.
fn median(samples: &[Sample], from: f64, to: f64, f: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.t_s >= from && s.t_s < to)
        .map(f)
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Profiles delivered per second over `[from, to)`.
fn rate(samples: &[Sample], from: f64, to: f64) -> f64 {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t_s >= from && s.t_s < to)
        .collect();
    match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.t_s > a.t_s => (b.delivered - a.delivered) as f64 / (b.t_s - a.t_s),
        _ => 0.0,
    }
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn summary(
    samples: &[Sample],
    (sent_total, eagain_total): (u64, u64),
    kind: &SoakKind,
    minutes: u64,
    rate_per_s: u64,
    outage: (Duration, Duration),
    last: &apm_testkit::Status,
    stored: u64,
    host: &str,
) -> String {
    let total = (minutes * 60) as f64;
    let window = (total / 6.0).min(600.0);
    let (a0, a1) = (0.0, window);
    let (b0, b1) = (total - window, total);
    // The first half minute is start-up (allocator warm-up, first connection).
    let warm = (window / 2.0).min(30.0);
    let rss_a = median(samples, a0 + warm, a1, |s| s.rss_mib);
    let rss_b = median(samples, b0, b1, |s| s.rss_mib);
    let rate_a = rate(samples, a0 + warm, a1);
    let rate_b = rate(samples, b0, b1);
    let cpu = |from: f64, to: f64| {
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.t_s >= from && s.t_s < to)
            .collect();
        match (inside.first(), inside.last()) {
            (Some(a), Some(b)) if b.delivered > a.delivered => {
                (b.cpu_s - a.cpu_s) / ((b.delivered - a.delivered) as f64 / 100_000.0)
            }
            _ => 0.0,
        }
    };
    let peak_spool = samples.iter().map(|s| s.spool_mib).fold(0.0, f64::max);
    let peak_rss = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    // Caught up: the first sample after the outage at which less than a second of traffic is
    // neither delivered nor dropped (the spool's bytes are no guide: its active segment stays on
    // disk, fully acknowledged, until the next rotation).
    let caught_up = samples
        .iter()
        .find(|s| {
            s.t_s >= outage.1.as_secs_f64()
                && s.received.saturating_sub(s.delivered + s.dropped) < rate_per_s
        })
        .map_or("not within the run".to_string(), |s| {
            format!(
                "{:.0} s after the listener's return",
                s.t_s - outage.1.as_secs_f64()
            )
        });
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Measured by `cargo xtask bench --only {}` ({minutes} min at {rate_per_s} profiles/s of \
         1 KiB, non-blocking PHP-like sends, eBPF {}, `spool.max_bytes` 256 MiB (`cargo xtask \
         run`'s config), so a long outage fills the spool and `drop_oldest` counts what it \
         drops; the listener down from {:.1} to {:.1} min; \
         samples every 10 s in `{}`, chart `{}`; {host}).\n",
        kind.section,
        if kind.ebpf { "on" } else { "off" },
        outage.0.as_secs_f64() / 60.0,
        outage.1.as_secs_f64() / 60.0,
        kind.csv,
        kind.png,
    );
    let _ = writeln!(
        t,
        "| figure | first {0:.0} min | last {0:.0} min |\n|---|---|---|",
        window / 60.0
    );
    let _ = writeln!(t, "| delivered/s | {rate_a:.0} | {rate_b:.0} |");
    let _ = writeln!(t, "| agent RSS, median (MiB) | {rss_a:.1} | {rss_b:.1} |");
    let _ = writeln!(
        t,
        "| agent CPU s per 100k delivered | {:.2} | {:.2} |",
        cpu(a0 + warm, a1),
        cpu(b0, b1)
    );
    let _ = writeln!(
        t,
        "\nPeak RSS {peak_rss:.1} MiB; peak spool {peak_spool:.1} MiB; backlog caught up \
         {caught_up}. Sent {} (EAGAIN {}), agent received {}, delivered {}, dropped {}; the \
         listener's file holds {stored} lines.\n",
        sent_total,
        eagain_total,
        last.received,
        last.delivered,
        last.dropped_total()
    );
    if kind.ebpf {
        let (k_ok, k_eagain) = (
            last.ebpf_u64("/sends_ok"),
            last.ebpf_u64("/sends_failed/eagain"),
        );
        let refused: u64 = last
            .ebpf
            .pointer("/map_health/insert_failed")
            .and_then(|v| v.as_object())
            .map_or(0, |m| {
                m.values().filter_map(serde_json::Value::as_u64).sum()
            });
        let _ = writeln!(
            t,
            "eBPF books: the kernel counted {k_ok} sends to the agent's socket that succeeded \
             and {k_eagain} that failed with EAGAIN, against the sender's own {sent_total} and \
             {eagain_total}: **{}**; map inserts refused (`map_health.insert_failed`): \
             {refused}.\n",
            if (k_ok, k_eagain) == (sent_total, eagain_total) {
                "equal"
            } else {
                "NOT equal"
            }
        );
    }
    let same_rss = rss_b <= rss_a * 1.1 + 2.0;
    let same_rate = rate_b >= rate_a * 0.95;
    let _ = writeln!(
        t,
        "End equals start (delivery rate within 5 %, RSS within 10 % + 2 MiB): **{}**.\n",
        if same_rss && same_rate { "YES" } else { "NO" }
    );
    t
}

/// A chart's title, points (minutes, value) and colour.
type Series = (&'static str, Vec<(f64, f64)>, plotters::style::RGBColor);

/// Draws RSS, CPU rate and spool size over time, the outage shaded.
fn draw(samples: &[Sample], outage: (Duration, Duration), png: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("no DejaVuSans.ttf (Debian: fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("cannot load the font"))?;
    let t_max = samples.last().map_or(1.0, |s| s.t_s / 60.0).max(1.0);
    let root = BitMapBackend::new(png, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let parts = root.split_evenly((3, 1));
    let cpu_rate: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].t_s - w[0].t_s).max(1.0);
            (w[1].t_s / 60.0, 100.0 * (w[1].cpu_s - w[0].cpu_s) / dt)
        })
        .collect();
    let series: [Series; 3] = [
        (
            "agent RSS (MiB)",
            samples.iter().map(|s| (s.t_s / 60.0, s.rss_mib)).collect(),
            BLUE,
        ),
        ("agent CPU (% of one core)", cpu_rate, RED),
        (
            "spool (MiB)",
            samples
                .iter()
                .map(|s| (s.t_s / 60.0, s.spool_mib))
                .collect(),
            GREEN,
        ),
    ];
    for (area, (name, pts, color)) in parts.iter().zip(series) {
        let y_max = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .label_style(("sans-serif", 13))
            .draw()?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (outage.0.as_secs_f64() / 60.0, 0.0),
                (outage.1.as_secs_f64() / 60.0, y_max),
            ],
            RGBColor(230, 230, 230).filled(),
        )))?;
        chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}
