//! `cargo xtask bench`, eBPF section: what the monitor adds to a PHP send, against no programs,
//! empty programs, bpftrace doing the same counting and the notes' minimal bpftrace script, all
//! measured in one run of
//! `target/release/apm-bench-ebpf` (which attaches each configuration in turn, interleaved
//! over rounds, and runs bpftrace itself). This module builds nothing: it runs that binary
//! (built with the eBPF object embedded) and turns its JSON into the markdown section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const CONFIGS: [(&str, &str); 5] = [
    ("none", "no programs"),
    (
        "noop",
        "empty programs on `sys_enter_sendto`/`sys_exit_sendto`",
    ),
    (
        "agent",
        "**the agent's programs** (all 11, by `monitor::start`)",
    ),
    ("bpftrace", "bpftrace, same counting (first script below)"),
    (
        "bpftrace_min",
        "bpftrace, minimal counting (second script below)",
    ),
];
const COLUMNS: [(&str, &str, &str); 4] = [
    ("php", "full", "PHP sender, queue full"),
    ("php", "drain", "PHP sender, draining receiver"),
    ("other", "full", "non-PHP sender, queue full"),
    ("other", "drain", "non-PHP sender, draining receiver"),
];

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Median, min and max of one (config, sender, mode) cell.
#[derive(Clone, Copy)]
struct Cell {
    med: f64,
    min: f64,
    max: f64,
}

fn cells(samples: &[Value], key: &str) -> BTreeMap<(String, String, String), Cell> {
    let mut g: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for s in samples {
        let k = |f: &str| s.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        if let Some(v) = s.get(key).and_then(Value::as_f64) {
            g.entry((k("config"), k("sender"), k("mode")))
                .or_default()
                .push(v);
        }
    }
    g.into_iter()
        .map(|(k, mut v)| {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (
                k,
                Cell {
                    med: median(&mut v),
                    min,
                    max,
                },
            )
        })
        .collect()
}

type Cells = BTreeMap<(String, String, String), Cell>;

fn get(c: &Cells, config: &str, sender: &str, mode: &str) -> Option<Cell> {
    c.get(&(config.into(), sender.into(), mode.into())).copied()
}

fn table(c: &Cells) -> String {
    table_of(c, &CONFIGS, &COLUMNS)
}

fn table_of(c: &Cells, configs: &[(&str, &str)], columns: &[(&str, &str, &str)]) -> String {
    let mut t = String::from("| configuration |");
    for (_, _, title) in columns {
        t.push_str(&format!(" {title} |"));
    }
    t.push_str(&format!("\n|---|{}\n", "---|".repeat(columns.len())));
    for &(cfg, label) in configs {
        if !c.keys().any(|k| k.0 == cfg) {
            continue;
        }
        t.push_str(&format!("| {label} |"));
        for &(sender, mode, _) in columns {
            match (get(c, cfg, sender, mode), get(c, "none", sender, mode)) {
                (Some(x), Some(base)) if cfg != "none" => t.push_str(&format!(
                    " {:.0} ({:+.0}) [{:.0}–{:.0}] |",
                    x.med,
                    x.med - base.med,
                    x.min,
                    x.max
                )),
                (Some(x), _) => t.push_str(&format!(" {:.0} [{:.0}–{:.0}] |", x.med, x.min, x.max)),
                (None, _) => t.push_str(" – |"),
            }
        }
        t.push('\n');
    }
    t
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**MET**" } else { "**NOT MET**" }
}

/// The aims on one mode and metric (medians): a monitored send adds at most half of what
/// bpftrace doing the same counting adds; an unmonitored send costs at most 10% more than with
/// empty programs. The ratio against the minimal bpftrace script follows, for transparency
/// (it counts less than the agent, so it is not what the aim is judged on).
fn aims(c: &Cells, mode: &str, metric: &str) -> Vec<String> {
    let mut out = Vec::new();
    let m = |cfg| get(c, cfg, "php", mode).map(|x| x.med);
    for (cfg, what, judged) in [
        ("bpftrace", "bpftrace (same counting)", true),
        ("bpftrace_min", "the minimal bpftrace script", false),
    ] {
        match (m("none"), m("agent"), m(cfg)) {
            (Some(none), Some(agent), Some(bt)) => {
                let (da, db) = (agent - none, bt - none);
                if db <= 0.0 {
                    out.push(format!(
                        "- Monitored send ({mode}, {metric}): {what} added {db:+.0} ns, within \
                         the noise: **not measurable** in this run."
                    ));
                } else if judged {
                    out.push(format!(
                        "- Monitored send ({mode}, {metric}): the agent's programs add {da:+.0} \
                         ns, {what} {db:+.0} ns: ratio {:.2} (aim ≤ 0.50): {}",
                        da / db,
                        verdict(da <= 0.5 * db)
                    ));
                } else {
                    out.push(format!(
                        "- Monitored send ({mode}, {metric}), for transparency: against {what} \
                         ({db:+.0} ns) the ratio is {:.2}.",
                        da / db
                    ));
                }
            }
            _ => out.push(format!(
                "- Monitored send ({mode}, {metric}): **not measured** against {what} \
                 (bpftrace missing)."
            )),
        }
    }
    let o = |cfg| get(c, cfg, "other", mode).map(|x| x.med);
    if let (Some(noop), Some(agent)) = (o("noop"), o("agent")) {
        let r = agent / noop - 1.0;
        out.push(format!(
            "- Unmonitored send ({mode}, {metric}): {agent:.0} ns with the agent's programs, \
             {noop:.0} ns with empty programs: {:+.1}% (aim ≤ +10%): {}",
            r * 100.0,
            verdict(r <= 0.10)
        ));
    }
    out
}

/// Median share of successful calls of the PHP sender in draining mode, per configuration.
fn ok_shares(samples: &[Value]) -> String {
    let mut parts = Vec::new();
    for (cfg, _) in CONFIGS {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| {
                s.get("config").and_then(Value::as_str) == Some(cfg)
                    && s.get("sender").and_then(Value::as_str) == Some("php")
                    && s.get("mode").and_then(Value::as_str) == Some("drain")
            })
            .filter_map(|s| {
                let g = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                let n = g("ok") + g("eagain") + g("other");
                (n > 0.0).then(|| g("ok") / n)
            })
            .collect();
        if !v.is_empty() {
            parts.push(format!("{cfg} {:.0}%", median(&mut v) * 100.0));
        }
    }
    parts.join(", ")
}

const WRITE_CONFIGS: [(&str, &str); 4] = [
    ("none", "no programs"),
    (
        "noop_sendto",
        "empty programs on `sys_enter_sendto`/`sys_exit_sendto` only (none on write)",
    ),
    (
        "noop",
        "empty programs on `sys_enter_write`/`sys_exit_write`",
    ),
    (
        "agent",
        "**the agent's programs** (every one in `monitor::PROGRAMS`, by `monitor::start`)",
    ),
];
const WRITE_COLUMNS: [(&str, &str, &str); 2] = [
    ("other", "pipe", "non-PHP writer"),
    ("php", "pipe", "PHP-named writer (not to the agent)"),
];
/// Writes per measurement: enough for a steady figure, few enough that the section runs in
/// about a minute on this machine.
const WRITE_COUNT: u64 = 200_000;

/// `cargo xtask bench --only ebpf-write`: what the agent's `write` programs cost the writes
/// of every other process on the host (`apm-bench-ebpf --write`).
pub fn run_write(root: &Path) -> Result<String> {
    let bin = crate::target_dir(root).join("release/apm-bench-ebpf");
    if !bin.is_file() {
        bail!(
            "{} is missing: build with `cargo xtask build` first",
            bin.display()
        );
    }
    eprintln!("bench: eBPF overhead per write(2) ({}) ...", bin.display());
    let out = Command::new(&bin)
        .args(["--write", "--count", &WRITE_COUNT.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} --write failed ({})", bin.display(), out.status);
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("apm-bench-ebpf --write output")?;
    Ok(write_section(&v))
}

fn write_section(v: &Value) -> String {
    let empty = Vec::new();
    let samples = v.get("samples").and_then(Value::as_array).unwrap_or(&empty);
    let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let cpu = cells(samples, "cpu_ns_per_call");
    let wall = cells(samples, "wall_ns_per_call");
    let mut md = format!(
        "Measured by `cargo xtask bench --only ebpf-write` (one run of \
         `target/release/apm-bench-ebpf --write --count {}`, as root; {} cores, kernel {}; \
         {:.0} s).\n\n\
         Every `write(2)` on the host fires `sys_enter_write`/`sys_exit_write`, where the agent \
         has programs for PHP's writes to a connected agent socket. Each figure is a {}-byte \
         blocking `write(2)` to a pipe that a second thread of the same process drains, {} calls \
         per measurement after {} warm-up calls, by one of two long-lived writer processes: \
         `{}` (not PHP: the programs stop at the comm check) and `{}` (a PHP name, writing to a \
         pipe, not to the agent: the programs look the fd up in `CONNS` on enter and the thread \
         in `SENDS` on exit, and find nothing). The configurations are attached in turn, {} \
         rounds, each round starting at a different one. The empty programs are the object's \
         `noop_enter_sendto`/`noop_exit_sendto` attached to the write tracepoints (empty \
         bytecode does not depend on the tracepoint). Cells: median over the rounds (Δ against \
         no programs) [min–max], nanoseconds per call.\n\n",
        u("count"),
        u("cpus"),
        s("kernel"),
        v.get("elapsed_s").and_then(Value::as_f64).unwrap_or(0.0),
        u("write_bytes"),
        u("count"),
        u("warmup"),
        s("other_comm"),
        s("php_comm"),
        u("rounds"),
    );
    md.push_str(
        "**CPU time of the writer per call** (user + system; what the aim is judged on):\n\n",
    );
    md.push_str(&table_of(&cpu, &WRITE_CONFIGS, &WRITE_COLUMNS));
    md.push_str("\n**Wall time per call** (same run; includes waiting for the drain thread):\n\n");
    md.push_str(&table_of(&wall, &WRITE_CONFIGS, &WRITE_COLUMNS));
    if let Some(k) = v.get("kernel_stats").and_then(Value::as_array)
        && !k.is_empty()
    {
        md.push_str(
            "\n**In-kernel time of the programs on the write path per write** (the kernel's BPF \
             run-time statistics, enabled only for this separate phase; they include ~15 ns of \
             accounting per program run):\n\n\
             | configuration | non-PHP writer | PHP-named writer |\n|---|---|---|\n",
        );
        for (cfg, label) in WRITE_CONFIGS.iter().skip(2) {
            let f = |sender: &str| {
                k.iter()
                    .find(|e| {
                        e.get("config").and_then(Value::as_str) == Some(*cfg)
                            && e.get("sender").and_then(Value::as_str) == Some(sender)
                    })
                    .map_or_else(
                        || "–".into(),
                        |e| {
                            let progs = e
                                .get("programs")
                                .and_then(Value::as_object)
                                .map(|p| {
                                    p.iter()
                                        .filter(|(n, _)| *cfg == "noop" || n.contains("write"))
                                        .map(|(n, x)| {
                                            format!(
                                                "{n} {:.0}",
                                                x.get("ns_per_run")
                                                    .and_then(Value::as_f64)
                                                    .unwrap_or(0.0)
                                            )
                                        })
                                        .collect::<Vec<_>>()
                                        .join(" + ")
                                })
                                .unwrap_or_default();
                            format!(
                                "{:.0} ({progs})",
                                e.get("ns_per_send").and_then(Value::as_f64).unwrap_or(0.0)
                            )
                        },
                    )
            };
            md.push_str(&format!("| {label} | {} | {} |\n", f("other"), f("php")));
        }
    }
    md.push_str("\n**Aim** (this run's medians, CPU time): a write by a process that is not PHP costs at most 10% more with the agent's programs than with empty programs on the same tracepoints.\n\n");
    for (sender, what) in [
        ("other", "non-PHP writer"),
        ("php", "PHP-named writer, for reference"),
    ] {
        let m = |cfg| get(&cpu, cfg, sender, "pipe").map(|x| x.med);
        if let (Some(none), Some(noop), Some(agent)) = (m("none"), m("noop"), m("agent")) {
            let r = agent / noop - 1.0;
            md.push_str(&format!(
                "- {what}: {agent:.0} ns with the agent's programs, {noop:.0} ns with empty \
                 programs, {none:.0} ns with none: agent / empty {:.3} ({:+.1}%){}; added over \
                 no programs: agent {:+.0} ns, empty {:+.0} ns.\n",
                agent / noop,
                r * 100.0,
                if sender == "other" {
                    format!(" (aim ≤ +10%): {}", verdict(r <= 0.10))
                } else {
                    String::new()
                },
                agent - none,
                noop - none,
            ));
        }
    }
    md.push_str(
        "\nWhat programs on the write tracepoints cost by being there (any enabled syscall \
         tracepoint already sends every syscall of every task through the kernel's slower \
         tracing entry, which the agent's programs on sendto cause anyway): empty programs on \
         write against empty programs on sendto only, CPU time:\n\n",
    );
    for (sender, what) in [("other", "non-PHP writer"), ("php", "PHP-named writer")] {
        let m = |cfg| get(&cpu, cfg, sender, "pipe").map(|x| x.med);
        if let (Some(none), Some(ns), Some(noop)) = (m("none"), m("noop_sendto"), m("noop")) {
            md.push_str(&format!(
                "- {what}: {noop:.0} ns with empty programs on write, {ns:.0} ns with empty \
                 programs on sendto only, {none:.0} ns with none: the programs on write add \
                 {:+.0} ns, the tracing entry {:+.0} ns.\n",
                noop - ns,
                ns - none,
            ));
        }
    }
    md.push_str(
        "\nReproduce: `cargo xtask bench --only ebpf-write` (as root; it builds first unless \
         `--no-build`).\n",
    );
    md
}

pub fn run(root: &Path) -> Result<String> {
    let bin = crate::target_dir(root).join("release/apm-bench-ebpf");
    if !bin.is_file() {
        bail!(
            "{} is missing: build with `cargo xtask build` first",
            bin.display()
        );
    }
    let bpftrace = find_on_path("bpftrace");
    let mut cmd = Command::new(&bin);
    match &bpftrace {
        Some(b) => cmd.arg("--bpftrace").arg(b),
        None => cmd.args(["--bpftrace", "none"]),
    };
    eprintln!("bench: eBPF overhead per send ({}) ...", bin.display());
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", bin.display(), out.status);
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("apm-bench-ebpf output")?;
    Ok(section(&v))
}

fn section(v: &Value) -> String {
    let empty = Vec::new();
    let samples = v.get("samples").and_then(Value::as_array).unwrap_or(&empty);
    let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let cpu = cells(samples, "cpu_ns_per_call");
    let wall = cells(samples, "wall_ns_per_call");
    let bt = v
        .get("bpftrace")
        .and_then(Value::as_str)
        .unwrap_or("not installed: its row is missing");

    let mut md = format!(
        "Measured by `cargo xtask bench` (one run of `target/release/apm-bench-ebpf`, as root; \
         {} cores, kernel {}, {bt}; {:.0} s).\n\n\
         Each figure is a 1 KiB non-blocking `sendto` (`MSG_DONTWAIT`, `sockaddr_un` with \
         `addrlen = 2 + strlen(path)`, as PHP's `socket_sendto`) to the agent's datagram socket, \
         {} calls per measurement after {} warm-up calls, by one of two long-lived sender \
         processes: `{}` (a PHP name: its sends are counted) and `{}` (not PHP: filtered out by \
         comm before any user-memory read). The configurations are attached in turn, {} rounds, \
         each round starting at a different one. *Queue full*: nobody reads the socket, so every \
         call fails with EAGAIN (PHP's drop path); *draining*: a receiver thread reads as fast \
         as it can. Cells: median over the rounds (Δ against no programs) [min–max], \
         nanoseconds per call.\n\n",
        u("cpus"),
        s("kernel"),
        v.get("elapsed_s").and_then(Value::as_f64).unwrap_or(0.0),
        u("count"),
        u("warmup"),
        s("php_comm"),
        s("other_comm"),
        u("rounds"),
    );
    md.push_str(
        "**CPU time of the sender per call** (user + system: the syscall and the programs \
         that run inside it; what the aims are judged on, because other processes on a shared \
         machine do not inflate it):\n\n",
    );
    md.push_str(&table(&cpu));
    md.push_str(
        "\n**Wall time per call** (same run; includes time the sender was not running):\n\n",
    );
    md.push_str(&table(&wall));

    if let Some(k) = v.get("kernel_stats").and_then(Value::as_array)
        && !k.is_empty()
    {
        md.push_str(
            "\n**In-kernel time of the programs on the sendto path per send** (the kernel's \
             BPF run-time statistics, enabled only for this separate phase; they include \
             ~15 ns of accounting per program run; queue full):\n\n\
             | configuration | PHP sender | non-PHP sender |\n|---|---|---|\n",
        );
        for (cfg, label) in CONFIGS {
            let f = |sender: &str| {
                k.iter()
                    .find(|e| {
                        e.get("config").and_then(Value::as_str) == Some(cfg)
                            && e.get("sender").and_then(Value::as_str) == Some(sender)
                    })
                    .map_or_else(
                        || "–".into(),
                        |e| {
                            let progs = e
                                .get("programs")
                                .and_then(Value::as_object)
                                .map(|p| {
                                    p.iter()
                                        .filter(|(n, _)| n.contains("send"))
                                        .map(|(n, x)| {
                                            format!(
                                                "{n} {:.0}",
                                                x.get("ns_per_run")
                                                    .and_then(Value::as_f64)
                                                    .unwrap_or(0.0)
                                            )
                                        })
                                        .collect::<Vec<_>>()
                                        .join(" + ")
                                })
                                .unwrap_or_default();
                            format!(
                                "{:.0} ({progs})",
                                e.get("ns_per_send").and_then(Value::as_f64).unwrap_or(0.0)
                            )
                        },
                    )
            };
            if cfg != "none" {
                md.push_str(&format!("| {label} | {} | {} |\n", f("php"), f("other")));
            }
        }
    }

    md.push_str(&format!(
        "\nDraining receiver: the share of calls that succeed (and copy 1 KiB to the receiver) \
         depends on how fast the sender goes, so those columns mix the programs' cost with a \
         different outcome mix (PHP sender, median share of successful calls: {}). The \
         queue-full columns do the same work per call in every configuration: the aims are \
         judged on them.\n",
        ok_shares(samples)
    ));
    md.push_str("\n**Aims** (this run's medians, queue full, CPU time):\n\n");
    for l in aims(&cpu, "full", "CPU time") {
        md.push_str(&l);
        md.push('\n');
    }
    md.push_str(
        "\nThese verdicts rest on one run's medians. On a shared machine like this one the \
         CPU-time medians move by tens of nanoseconds from one run to the next (see the [min–max] \
         ranges), so a ratio near 0.50 can land on either side of it; the in-kernel table is the \
         steadier comparison.\n",
    );
    md.push_str("\nThe same computations on the other columns, for reference:\n\n");
    for l in aims(&cpu, "drain", "CPU time")
        .into_iter()
        .chain(aims(&wall, "full", "wall time"))
        .chain(aims(&wall, "drain", "wall time"))
    {
        md.push_str(&l);
        md.push('\n');
    }

    md.push_str(
        "\n**Counts** (the measurement is only worth something if the programs counted):\n\n",
    );
    if let Some(checks) = v.get("checks").and_then(Value::as_array) {
        for c in checks {
            let g = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
            let round = g("round") + 1;
            match c.get("config").and_then(Value::as_str) {
                Some("agent") => md.push_str(&format!(
                    "- round {round}, agent: counted {} datagram sends; the PHP sender made {} \
                     ({}), the non-PHP sender {} (not counted, as designed).\n",
                    g("counted"),
                    g("php_sends"),
                    if g("counted") == g("php_sends") {
                        "exact"
                    } else {
                        "MISMATCH"
                    },
                    g("other_sends"),
                )),
                Some(cfg @ ("bpftrace" | "bpftrace_min")) => {
                    let (n, canary) = (g("php_sends"), g("canary_sends"));
                    md.push_str(&format!(
                        "- round {round}, {cfg}: counted {}; the PHP sender made {n}, plus \
                         {canary} canary sends made until it counted one ({}).\n",
                        g("counted"),
                        // The canaries sent before bpftrace's programs were in place are not
                        // counted; the last one is.
                        if g("counted") > n && g("counted") <= n + canary {
                            "all counted"
                        } else {
                            "MISMATCH"
                        },
                    ));
                }
                _ => {}
            }
        }
    }
    md.push_str(&format!(
        "\nThe first bpftrace script counts what the agent's `enter_sendto`/`exit_sendto` count \
         for these sends, with the same filters in the same order: the `addr_len` bound, the \
         comm prefix (the agent's default `ebpf.php_comms`, `php-fpm` being covered by `php`), \
         the path compare; `@start[tid]`; per process the ok count, the bytes sum, a count per \
         errno and the latency sum; the host's log2 latency histogram. (The agent also keeps \
         the socket kind, per-CPU host totals and stream waits; the script leaves those \
         out.)\n\n```\n{}```\n\nThe second, minimal script (as in `notes/ebpf-feasibility.md`: \
         path compare with the `addr_len` bound, `@start[tid]`, host-wide ok/EAGAIN/other counts \
         and latency sum; no comm filter, so it is measured with the PHP sender only), reported \
         for transparency:\n\n```\n{}```\n",
        s("bpftrace_script"),
        s("bpftrace_min_script")
    ));
    md.push_str(
        "\nReproduce: `cargo xtask bench` (as root; it builds, then runs \
         `target/release/apm-bench-ebpf`, which needs the eBPF object embedded and bpftrace on \
         `PATH`).\n",
    );
    md
}
