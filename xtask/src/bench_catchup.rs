//! `cargo xtask bench --only catchup`: delay added by the agent, and its catch-up after a
//! listener outage. One agent at its defaults, one `apm-listener` on a fixed loopback port, a
//! paced sender (blocking `sendto`, so nothing is dropped at the door).
//!
//! - Latency: at each fixed rate, p50/p99 of receive → OK ack per profile, from the agent's
//!   `apm_delivery_latency_seconds` histogram (the difference of two scrapes around the window).
//! - Catch-up: at 5000/s the listener is SIGKILLed for 20 s and started again on the same
//!   address. From its file (ground truth): the time from its return to the first profile stored,
//!   and to the last profile of the backlog (every id sent before the return stored).
//!
//! A measurement, not a test: it fails only when the setup is broken.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::live::{spawn, write_agent_config};

const SIZE: usize = 1024;
const LATENCY_RATES: [u64; 3] = [1000, 5000, 10_000];
const WINDOW: Duration = Duration::from_secs(10);
const OUTAGE_RATE: u64 = 5000;
const OUTAGE: Duration = Duration::from_secs(20);

/// Starts `apm-listener` on `listen` (a fixed address, so it can come back on it).
fn listener(bin: &Path, listen: &str, out: &Path, log: &Path) -> Result<apm_testkit::Proc> {
    use std::io::BufRead;
    let mut g = spawn(
        Command::new(bin)
            .args(["--listen", listen, "--out"])
            .arg(out)
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            ),
        "apm-listener",
    )?;
    let stdout = g.child.stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    for l in lines.by_ref() {
        if l?.contains("listening on ") {
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Ok(g);
        }
    }
    bail!("apm-listener did not start; see {}", log.display())
}

/// A sender at `rate` profiles/s (changeable while it runs), ids `b-0`, `b-1`, ... in order.
struct Paced {
    rate: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Paced {
    fn start(path: PathBuf) -> Self {
        let rate = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, n, s) = (rate.clone(), sent.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let sock = UnixDatagram::unbound().expect("socket");
            let mut owed = 0.0_f64;
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                let now = Instant::now();
                owed += r.load(Ordering::Relaxed) as f64 * (now - last).as_secs_f64();
                last = now;
                while owed >= 1.0 {
                    let i = n.load(Ordering::Relaxed);
                    let p = crate::bench::payload(i, SIZE);
                    // Blocking: a full queue waits, nothing is dropped.
                    while sock.send_to(&p, &path).is_err() {
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    n.store(i + 1, Ordering::Relaxed);
                    owed -= 1.0;
                }
            }
        });
        Self {
            rate,
            sent,
            stop,
            handle: Some(handle),
        }
    }

    fn set_rate(&self, r: u64) {
        self.rate.store(r, Ordering::Relaxed);
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `GET /metrics` from the agent.
fn scrape(port: u16) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The cumulative buckets `(le, count)` of `apm_delivery_latency_seconds`.
fn buckets(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("apm_delivery_latency_seconds_bucket{le=\"")?;
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two scrapes, interpolated inside its bucket.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .zip(before.iter().map(|b| b.1).chain(std::iter::repeat(0.0)))
        .map(|(&(le, a), b)| (le, a - b))
        .collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in &diff {
        if cum >= want {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if cum > prev.1 {
                (want - prev.1) / (cum - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + frac * (le - prev.0));
        }
        prev = (le, cum);
    }
    None
}

/// Follows the listener's file: which ids are stored, and when the first line after a mark
/// appeared.
struct Follower {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    stored: Vec<bool>,
    lines: u64,
    /// When set, each new line's age when this poll found it: now − its `received_ns`, ns.
    ages: Option<Vec<u64>>,
    /// Ids below `mark` not stored yet, and the file offset just past the line that stored the
    /// last of them (see [`Follower::mark`]).
    mark: u64,
    missing: u64,
    complete_at: Option<u64>,
}

impl Follower {
    /// Reads what was appended since the last call; returns the number of new lines.
    fn poll(&mut self) -> u64 {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return 0;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else {
            return 0;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return 0;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        // File offset of the first byte of `complete`.
        let mut at = self.offset - (self.partial.len() + complete.len()) as u64;
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut new = 0;
        for line in complete.split(|&b| b == b'\n') {
            at += line.len() as u64 + 1;
            if line.is_empty() {
                continue;
            }
            new += 1;
            if let (Some(ages), Some(r)) = (self.ages.as_mut(), received_ns_of(line)) {
                ages.push(now_ns.saturating_sub(r));
            }
            if let Some(id) = id_of(line) {
                let i = usize::try_from(id).unwrap_or(usize::MAX);
                if i >= self.stored.len() {
                    self.stored.resize(i + 1, false);
                }
                if !self.stored[i] && id < self.mark {
                    self.missing -= 1;
                    if self.missing == 0 {
                        self.complete_at = Some(at);
                    }
                }
                self.stored[i] = true;
            }
        }
        self.lines += new;
        new
    }

    /// From now on, notes the file offset at which every id below `n` is stored
    /// (`complete_at`).
    fn mark(&mut self, n: u64) {
        let stored = self
            .stored
            .iter()
            .take(usize::try_from(n).unwrap_or(usize::MAX))
            .filter(|&&s| s)
            .count();
        self.mark = n;
        self.missing = n - stored as u64;
        self.complete_at = (self.missing == 0).then_some(self.offset);
    }
}

/// Samples, from its own thread so that the bench's parsing of the file does not delay them:
/// the listener file's size every 2 ms, and every 10 ms the agent's in-flight batches and
/// held payload and the CPU seconds of the listener and the agent.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Samples>,
}

#[derive(Default)]
struct Samples {
    /// (since the start, file size) at each change.
    sizes: Vec<(Duration, u64)>,
    /// (since the start, in-flight batches, held MiB).
    gauges: Vec<(Duration, f64, f64)>,
    /// (since the start, listener CPU s, agent CPU s).
    cpu: Vec<(Duration, f64, f64)>,
}

impl Sampler {
    fn start(file: PathBuf, metrics: u16, listener: u32, agent: u32) -> (Self, Instant) {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            let mut out = Samples::default();
            let mut last: Option<Instant> = None;
            while !s.load(Ordering::Relaxed) {
                let len = std::fs::metadata(&file).map_or(0, |m| m.len());
                if out.sizes.last().is_none_or(|&(_, l)| l != len) {
                    out.sizes.push((t0.elapsed(), len));
                }
                if last.is_none_or(|l| l.elapsed() >= Duration::from_millis(10)) {
                    last = Some(Instant::now());
                    out.cpu.push((
                        t0.elapsed(),
                        crate::bench::cpu_seconds(listener),
                        crate::bench::cpu_seconds(agent),
                    ));
                    if let Ok(text) = scrape(metrics) {
                        out.gauges.push((
                            t0.elapsed(),
                            metric(&text, "apm_in_flight_batches").unwrap_or(f64::NAN),
                            metric(&text, "apm_memory_payload_bytes")
                                .map_or(f64::NAN, |b| b / (1024.0 * 1024.0)),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            out
        });
        (Self { stop, handle }, t0)
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

impl Samples {
    /// When the file first reached `len` bytes.
    fn reached(&self, len: u64) -> Option<Duration> {
        self.sizes.iter().find(|&&(_, l)| l >= len).map(|&(t, _)| t)
    }

    /// CPU cores of (listener, agent) between `a` and `b`, from the samples nearest them.
    fn cores(&self, a: Duration, b: Duration) -> (f64, f64) {
        let near = |t: Duration| {
            self.cpu
                .iter()
                .min_by_key(|&&(s, _, _)| s.abs_diff(t))
                .copied()
        };
        match (near(a), near(b)) {
            (Some(x), Some(y)) if y.0 > x.0 => {
                let dt = y.0.saturating_sub(x.0).as_secs_f64();
                ((y.1 - x.1) / dt, (y.2 - x.2) / dt)
            }
            _ => (f64::NAN, f64::NAN),
        }
    }
}

/// The decimal number right after `key` in one stored line.
fn number_after(line: &[u8], key: &[u8]) -> Option<u64> {
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: &[u8] = &line[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// The number in `"id":"b-<n>"` of one stored line.
fn id_of(line: &[u8]) -> Option<u64> {
    number_after(line, b"\"id\":\"b-")
}

/// The `"received_ns":N` of a listener line (the agent's receive time, wall clock).
fn received_ns_of(line: &[u8]) -> Option<u64> {
    number_after(line, b"\"received_ns\":")
}

/// How often the listener's file is read while latency is measured from it.
const AGE_POLL: Duration = Duration::from_millis(1);

struct Latency {
    rate: u64,
    profiles: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    /// From the listener's file: profiles stored in the window, and the exact quantiles of
    /// receive → found stored (s).
    stored: usize,
    stored_p50: Option<f64>,
    stored_p99: Option<f64>,
}

/// The exact `q` quantile of `ages` (ns), in seconds.
fn exact(ages: &[u64], q: f64) -> Option<f64> {
    let last = ages.len().checked_sub(1)?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((last as f64) * q).round() as usize;
    Some(ages[i.min(last)] as f64 / 1e9)
}

struct CatchUp {
    backlog: u64,
    first: Duration,
    end: Duration,
    breaker_during: String,
    /// Sampled from the agent's /metrics between the first stored profile and the end of the
    /// backlog: batches awaiting the listener's ack, and payload MiB held in memory.
    in_flight: Vec<f64>,
    held_mib: Vec<f64>,
    /// CPU (cores) of the listener and of the agent over the same interval.
    listener_cores: f64,
    agent_cores: f64,
}

/// The value of the unlabelled metric `name` in a /metrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// Median of `v` (unsorted).
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub fn run(root: &Path, host: &str) -> Result<String> {
    let bin = crate::target_dir(root).join("release");
    let dir = root.join(".run/bench-catchup");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run"))?;
    let out = dir.join("profiles.jsonl");
    let llog = dir.join("listener.log");
    let listen = format!("127.0.0.1:{}", crate::live::free_port());
    let mut lst = listener(&bin.join("apm-listener"), &listen, &out, &llog)?;
    let metrics = crate::live::free_port();
    let cfg = write_agent_config(&dir, &format!("http://{listen}"), metrics, "off")?;
    let alog = dir.join("agent.log");
    let agent = crate::live::start_agent(&bin, &dir, &cfg)?;
    let sender = Paced::start(dir.join("run/listener.sock"));
    let mut follow = Follower {
        path: out.clone(),
        offset: 0,
        partial: Vec::new(),
        stored: Vec::new(),
        lines: 0,
        ages: None,
        mark: 0,
        missing: 0,
        complete_at: None,
    };

    let mut latency = Vec::new();
    for rate in LATENCY_RATES {
        eprintln!("bench: catchup: receive -> ack latency at {rate}/s ...");
        sender.set_rate(rate);
        std::thread::sleep(Duration::from_secs(2));
        follow.poll();
        follow.ages = Some(Vec::new());
        let before = buckets(&scrape(metrics).context("scrape /metrics")?);
        let end = Instant::now() + WINDOW;
        while Instant::now() < end {
            follow.poll();
            std::thread::sleep(AGE_POLL);
        }
        let after = buckets(&scrape(metrics).context("scrape /metrics")?);
        let mut ages = follow.ages.take().unwrap_or_default();
        ages.sort_unstable();
        let l = Latency {
            rate,
            profiles: after.last().map_or(0.0, |a| a.1) - before.last().map_or(0.0, |b| b.1),
            p50: quantile(&before, &after, 0.5),
            p99: quantile(&before, &after, 0.99),
            stored: ages.len(),
            stored_p50: exact(&ages, 0.5),
            stored_p99: exact(&ages, 0.99),
        };
        eprintln!(
            "bench:   {:.0} profiles acked, p50 {:?} s, p99 {:?} s; {} stored, exact p50 {:?} s, p99 {:?} s",
            l.profiles, l.p50, l.p99, l.stored, l.stored_p50, l.stored_p99
        );
        latency.push(l);
    }

    eprintln!(
        "bench: catchup: {OUTAGE_RATE}/s, listener SIGKILLed for {} s ...",
        OUTAGE.as_secs()
    );
    sender.set_rate(OUTAGE_RATE);
    std::thread::sleep(Duration::from_secs(3));
    lst.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = lst.wait(Duration::from_secs(10));
    let down = Instant::now();
    let mut breaker_during = String::new();
    while down.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(s) = apm_testkit::status_json(&dir.join("run/control.sock")) {
            breaker_during = s["breaker"].as_str().unwrap_or("").to_string();
        }
    }
    follow.poll();
    let stored_at_return = follow.lines;
    let size_at_return = follow.offset;
    let lst = listener(&bin.join("apm-listener"), &listen, &out, &llog)?;
    let (sampler, back) = Sampler::start(out.clone(), metrics, lst.pid(), agent.pid());
    let sent_at_return = sender.sent();
    follow.mark(sent_at_return);
    let deadline = back + Duration::from_mins(5);
    while follow.complete_at.is_none() {
        follow.poll();
        if Instant::now() > deadline {
            bail!(
                "the backlog was not stored within 5 min of the listener's return; see {}",
                alog.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let samples = sampler.finish();
    // Times from the sampler: when the file grew past its size at the return, and when it
    // reached the line that stored the last id of the backlog.
    let first = samples.reached(size_at_return + 1);
    let end = follow.complete_at.and_then(|at| samples.reached(at));
    let (Some(first), Some(end)) = (first, end) else {
        bail!("the file's growth was not sampled; see {}", alog.display());
    };
    let (in_flight, held_mib) = samples
        .gauges
        .iter()
        .filter(|g| g.0 >= first && g.0 <= end)
        .map(|g| (g.1, g.2))
        .unzip();
    let (listener_cores, agent_cores) = samples.cores(first, end);
    let c = CatchUp {
        backlog: sent_at_return.saturating_sub(stored_at_return),
        first,
        end,
        breaker_during,
        in_flight,
        held_mib,
        listener_cores,
        agent_cores,
    };
    eprintln!(
        "bench:   first stored {:?} after the return, backlog of {} stored {:?} after it; \
         in flight {:?}, held {:?} MiB, listener {:.2} cores, agent {:.2} cores",
        c.first,
        c.backlog,
        c.end,
        median(&c.in_flight),
        median(&c.held_mib),
        c.listener_cores,
        c.agent_cores
    );
    drop(sender);
    let mut agent = agent;
    let _ = agent.terminate(Duration::from_secs(30));
    let mut lst = lst;
    let _ = lst.terminate(Duration::from_secs(10));
    Ok(section(&latency, &c, host))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |s| format!("{:.0} ms", s * 1000.0))
}

fn section(latency: &[Latency], c: &CatchUp, host: &str) -> String {
    let mut s = format!(
        "Measured by `cargo xtask bench --only catchup` (one run; agent and listener at their \
         defaults, {SIZE} B profiles from a paced blocking sender; {host}).\n\n\
         **Added latency** per profile, two ways, in the same {}-s window after 2 s at the rate: \
         receive → OK ack from the agent's `apm_delivery_latency_seconds` (quantiles interpolated \
         inside its 25 % buckets), and receive → found stored, exact quantiles over every line \
         the listener wrote in the window (its `received_ns`, the agent's receive time, against \
         the moment this bench read the line from the file, every {} ms: so up to that much late; \
         the listener writes a batch before it acks it). Aim: p99 under `batch.max_age` \
         (500 ms), judged on the exact column.\n\n\
         | rate (profiles/s) | acked in the window | p50 (histogram) | p99 (histogram) | stored in the window | p50 (exact) | p99 (exact) | p99 < 500 ms |\n|---|---|---|---|---|---|---|---|\n",
        WINDOW.as_secs(),
        AGE_POLL.as_millis()
    );
    for l in latency {
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            l.rate,
            l.profiles,
            ms(l.p50),
            ms(l.p99),
            l.stored,
            ms(l.stored_p50),
            ms(l.stored_p99),
            match l.stored_p99 {
                Some(p) if p < 0.5 => "yes",
                Some(_) => "**no**",
                None => "–",
            }
        ));
    }
    // Over the replay itself: from the first stored profile to the last of the backlog.
    let replay = c.backlog as f64 / c.end.saturating_sub(c.first).as_secs_f64().max(0.001);
    s.push_str(&format!(
        "\n**Catch-up** at {OUTAGE_RATE}/s, listener SIGKILLed for {} s and started again on \
         the same address (breaker `{}` at the end of the outage). Times from the listener's \
         return (its \"listening on\" line), read from its file; then, from the first stored \
         profile to the end of the backlog, the agent's `apm_in_flight_batches` and \
         `apm_memory_payload_bytes` every 10 ms, and the CPU of each process (clock ticks of 10 ms: rough over a short replay):\n\n\
         | first profile stored | whole backlog stored | backlog (profiles) | backlog rate, first stored → backlog stored, live traffic going on | samples | batches awaiting ack, median | samples with none awaiting | payload held, median (max) | listener CPU | agent CPU |\n|---|---|---|---|---|---|---|---|---|---|\n\
         | {:.2} s | {:.2} s | {} | {:.0} profiles/s | {} | {} | {} | {} | {:.2} cores | {:.2} cores |\n\n\
         Aim: delivery resumes within 2 s of the return: **{}**. Replay at the listener's pace \
         (no fixed rate at the defaults, `spool.replay_batches_per_s = 0`; judged as: in the \
         median sample at least 2 batches awaited the listener's ack, one being stored and the \
         next already there, so the listener did not wait for the agent): **{}**.\n\n\
         Reading the figures: below ~1000/s (`batch.max_bytes`, 512 KiB, holds 512 profiles of \
         1 KiB, per `batch.max_age`, 500 ms) batches are sealed by age, a lead before `max_age` (the smoothed seal → ack time plus \
         four deviations; docs/agent.md, \"Batching\"), so the first profile of each waits just \
         under 500 ms \
         for its ack; above it they are sealed by size and the wait shrinks with the rate. \
         Near 500 ms the histogram cannot tell: its bucket holding 500 ms spans 414 to 517 ms \
         and the quantile is interpolated inside it, so a p99 just under 500 ms can read as up \
         to 517; hence the exact column. That column is an upper bound: this bench (built \
         unoptimised) reads the file on the same two cores as the agent, the listener and the \
         sender, and a late read adds to every age it takes; at the higher rates it runs late \
         (the histogram's p99 is then the better figure). The backlog goes out as the \
         listener acknowledges it: the next spooled batch leaves as an ack frees room, up to \
         `central.max_in_flight` (16) batches, and, while live traffic flows, up to half of \
         `limits.memory_budget_mb` (4 of 8 MiB) so the other half is there for live batches \
         (docs/agent.md, \"Router, breaker and spool\"). The batches of the outage are sealed by size (512 \
         profiles of 1 KiB at 5000/s), so that half holds about 8 of them.\n",
        OUTAGE.as_secs(),
        c.breaker_during,
        c.first.as_secs_f64(),
        c.end.as_secs_f64(),
        c.backlog,
        replay,
        c.in_flight.len(),
        median(&c.in_flight).map_or_else(|| "–".into(), |m| format!("{m:.0}")),
        c.in_flight.iter().filter(|&&n| n < 1.0).count(),
        c.held_mib.iter().copied().reduce(f64::max).map_or_else(
            || "–".into(),
            |max| format!(
                "{:.1} MiB ({max:.1} MiB)",
                median(&c.held_mib).unwrap_or(0.0)
            )
        ),
        c.listener_cores,
        c.agent_cores,
        if c.first <= Duration::from_secs(2) {
            "MET"
        } else {
            "NOT MET"
        },
        match median(&c.in_flight) {
            Some(m) if m >= 2.0 => "MET",
            Some(_) => "NOT MET",
            None => "not measured (the backlog was stored before the first sample)",
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let before = vec![(0.1, 0.0), (0.2, 0.0), (f64::INFINITY, 0.0)];
        let after = vec![(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&before, &after, 0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(&before, &after, 0.99).unwrap() - 0.198).abs() < 1e-9);
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn ids_are_read_from_stored_lines() {
        let line = br#"{"agent_id":"a","seq":1,"received_ns":2,"pid":3,"profile":{"id":"b-42","uri":"/bench"}}"#;
        assert_eq!(id_of(line), Some(42));
        assert_eq!(id_of(br#"{"agent_id":"b-1"}"#), None);
        assert_eq!(received_ns_of(line), Some(2));
        assert_eq!(received_ns_of(br#"{"received_ns":"x"}"#), None);
    }

    #[test]
    fn exact_quantiles_pick_the_nearest_rank() {
        let ages: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        assert_eq!(exact(&ages, 0.5), Some(0.051));
        assert_eq!(exact(&ages, 0.99), Some(0.099));
        assert_eq!(exact(&[], 0.99), None);
    }
}
