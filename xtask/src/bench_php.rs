//! `cargo xtask bench`, PHP section: the latency `listener.php` adds to a request under php-fpm,
//! median and p99, for ~2 KiB and ~32 KiB profiles, against the same app without it, in one run.
//!
//! One php-fpm master (Debian's php8.2-fpm, the system php.ini with opcache, as root: `-R`) with
//! one single-worker pool per variant, all serving `php/bench/app.php`, which builds the same
//! xhprof-shaped call data in every variant and attaches it to the profile when the listener is
//! loaded (that sets the profile size the way real call data would):
//!
//! - `plain`: no listener;
//! - `apm`: the listener with its defaults (`fastcgi_finish_request()` before the send), sending
//!   to a receiving socket bound here;
//! - `apm-inline`: the same with `APM_FINISH_REQUEST=0` (the client waits for the send);
//! - `apm-down`: the listener, no agent (socket files missing);
//! - `apm-killed`: the listener, kill switch up.
//!
//! A single client times full FastCGI round trips (connect to end of response) over the pools'
//! Unix sockets, the variants and sizes interleaved in random order so that drift and noise hit
//! them all alike. Between requests it takes the profile from the receiving socket (waiting for
//! it, outside the timed part, so every profile is accounted for). A benchmark, not a test: it
//! fails only when the setup is broken, never on slow numbers.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const FPM: &str = "/usr/sbin/php-fpm8.2";
/// Timed requests per variant and size (`APM_BENCH_PHP_REQUESTS` overrides).
const REQUESTS: usize = 4000;
const WARMUP: usize = 300;
/// Call-graph entries for each profile size (~110 bytes of JSON each; sizes sent are measured).
const SIZES: [(&str, u32); 2] = [("2 KiB", 16), ("32 KiB", 310)];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    Apm,
    Inline,
    Down,
    Killed,
}

const VARIANTS: [Variant; 5] = [
    Variant::Plain,
    Variant::Apm,
    Variant::Inline,
    Variant::Down,
    Variant::Killed,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Apm => "apm",
            Variant::Inline => "apm-inline",
            Variant::Down => "apm-down",
            Variant::Killed => "apm-killed",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Variant::Plain => "the app without listener.php",
            Variant::Apm => "listener.php, defaults (agent up, `fastcgi_finish_request()` first)",
            Variant::Inline => {
                "listener.php, agent up, `APM_FINISH_REQUEST=0` (client waits for the send)"
            }
            Variant::Down => "listener.php, no agent (socket missing)",
            Variant::Killed => "listener.php, kill switch up",
        }
    }

    /// Whether a profile reaches the receiving socket.
    fn sends(self) -> bool {
        matches!(self, Variant::Apm | Variant::Inline)
    }
}

/// Removes the scratch directory and stops php-fpm when dropped.
struct Scratch {
    dir: PathBuf,
    fpm: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut c) = self.fpm.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the benchmark and returns its markdown section (a table and the command).
pub fn run(root: &Path) -> Result<String> {
    if !Path::new(FPM).exists() {
        bail!("{FPM} not found: `cargo xtask setup` installs php8.2-fpm");
    }
    let requests = std::env::var("APM_BENCH_PHP_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REQUESTS);
    let listener = root.join("php/listener.php");
    let app = root.join("php/bench/app.php");
    for f in [&listener, &app] {
        if !f.is_file() {
            bail!("{} is missing", f.display());
        }
    }
    let dir = PathBuf::from(format!("/tmp/apm-bench-php-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut scratch = Scratch {
        dir: dir.clone(),
        fpm: None,
    };
    for d in ["up", "down", "killed"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("killed/disabled"), "bench\n")?;
    let rx = UnixDatagram::bind(dir.join("up/listener.sock"))?;
    // Profiles up to 64 KiB are datagrams; the stream socket is there in case one is larger.
    let rx_stream = UnixListener::bind(dir.join("up/listener-stream.sock"))?;
    rx_stream.set_nonblocking(true)?;

    let mut conf = format!(
        "[global]\npid = {d}/fpm.pid\nerror_log = {d}/fpm.log\ndaemonize = no\n",
        d = dir.display()
    );
    for v in VARIANTS {
        conf += &format!(
            "[{name}]\nlisten = {d}/{name}.sock\npm = static\npm.max_children = 1\n\
             clear_env = yes\nphp_admin_value[error_log] = {d}/php-error.log\n\
             php_admin_flag[log_errors] = on\n",
            name = v.name(),
            d = dir.display()
        );
        let rt = match v {
            Variant::Plain => continue,
            Variant::Apm | Variant::Inline => "up",
            Variant::Down => "down",
            Variant::Killed => "killed",
        };
        let rt = dir.join(rt);
        conf += &format!(
            "php_admin_value[auto_prepend_file] = {}\nenv[APM_SOCKET] = {rt}/listener.sock\n\
             env[APM_STREAM_SOCKET] = {rt}/listener-stream.sock\nenv[APM_RUNTIME_DIR] = {rt}\n",
            listener.display(),
            rt = rt.display()
        );
        if v == Variant::Inline {
            conf += "env[APM_FINISH_REQUEST] = 0\n";
        }
    }
    std::fs::write(dir.join("fpm.conf"), conf)?;
    scratch.fpm = Some(
        Command::new(FPM)
            .args(["-F", "-R", "-y"])
            .arg(dir.join("fpm.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {FPM}"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !VARIANTS
        .iter()
        .all(|v| dir.join(format!("{}.sock", v.name())).exists())
    {
        if Instant::now() > deadline {
            bail!(
                "php-fpm did not start its pools; log:\n{}",
                std::fs::read_to_string(dir.join("fpm.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    eprintln!(
        "bench php: {} variants x {} sizes x ({WARMUP} warm-up + {requests}) requests ...",
        VARIANTS.len(),
        SIZES.len()
    );
    let load_before = loadavg();
    let mut rng = XorShift::seeded();
    // lat[variant][size]: µs; bytes[size]: profile sizes received.
    let mut lat = vec![vec![Vec::with_capacity(requests); SIZES.len()]; VARIANTS.len()];
    let mut bytes: Vec<Vec<usize>> = vec![Vec::new(); SIZES.len()];
    // done[variant][size]: µs from the request's start until its profile was received (the
    // worker's own cost, which fastcgi_finish_request() moves out of the client's wait).
    let mut done = vec![vec![Vec::with_capacity(requests); SIZES.len()]; VARIANTS.len()];
    let mut unexpected = 0u64;
    let mut jobs: Vec<(usize, usize)> = (0..VARIANTS.len())
        .flat_map(|v| (0..SIZES.len()).map(move |s| (v, s)))
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    for round in 0..WARMUP + requests {
        rng.shuffle(&mut jobs);
        for &(vi, si) in &jobs {
            let v = VARIANTS[vi];
            let sock = dir.join(format!("{}.sock", v.name()));
            let uri = format!("/app.php?entries={}", SIZES[si].1);
            let (body, us, t0) = fcgi(&sock, &uri, &app)
                .with_context(|| format!("request to the {} pool", v.name()))?;
            if !body.ends_with(b"ok\n") {
                bail!(
                    "the {} pool answered {:?}",
                    v.name(),
                    String::from_utf8_lossy(&body)
                );
            }
            // Outside the timed part: wait for this request's profile (it may leave after
            // the response), so that none is attributed to the next request.
            if v.sends() {
                rx.set_read_timeout(Some(Duration::from_secs(2)))?;
                let n = rx
                    .recv(&mut buf)
                    .with_context(|| format!("no profile from the {} pool", v.name()))?;
                if round >= WARMUP {
                    bytes[si].push(n);
                    done[vi][si].push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            rx.set_nonblocking(true)?;
            while rx.recv(&mut buf).is_ok() {
                unexpected += 1;
            }
            rx.set_nonblocking(false)?;
            while let Ok((mut c, _)) = rx_stream.accept() {
                c.set_nonblocking(false)?;
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink);
                if v.sends() && round >= WARMUP {
                    bytes[si].push(sink.len().saturating_sub(4));
                }
            }
            if round >= WARMUP {
                lat[vi][si].push(us);
            }
        }
    }
    let load_after = loadavg();
    let errors = std::fs::read_to_string(dir.join("php-error.log")).unwrap_or_default();
    drop(scratch);
    if unexpected > 0 {
        bail!("{unexpected} profiles arrived from variants that must not send");
    }

    let mut md = String::new();
    md += "### PHP: latency added by `listener.php`\n\n";
    md += &format!(
        "Command: `cargo xtask bench` (the PHP part: `xtask/src/bench_php.rs`; \
         `APM_BENCH_PHP_REQUESTS={requests}`). One php-fpm {} master with one single-worker pool \
         per variant serving `php/bench/app.php`; {requests} timed requests per variant and \
         size after {WARMUP} warm-up, variants and sizes interleaved in random order; full \
         FastCGI round trip (connect to end of response) over a Unix socket from one client, \
         in µs. Added = variant minus `plain` at the same size. Load average before/after: \
         {load_before} / {load_after} ({} CPUs).\n\n",
        php_version(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    md += "| variant | profile (bytes sent, median) | median | p99 | added median | added p99 | profile received, median |\n";
    md += "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n";
    for (si, (label, _)) in SIZES.iter().enumerate() {
        let sent = median_usize(&mut bytes[si]);
        let base = {
            let v = &mut lat[0][si];
            v.sort_by(f64::total_cmp);
            (pct(v, 50.0), pct(v, 99.0))
        };
        for (vi, v) in VARIANTS.iter().enumerate() {
            let l = &mut lat[vi][si];
            l.sort_by(f64::total_cmp);
            let (m, p) = (pct(l, 50.0), pct(l, 99.0));
            let (am, ap) = if *v == Variant::Plain {
                ("-".to_string(), "-".to_string())
            } else {
                (format!("{:+.1}", m - base.0), format!("{:+.1}", p - base.1))
            };
            let size = if v.sends() {
                format!("{label} ({sent} B)")
            } else {
                label.to_string()
            };
            let received = {
                let d = &mut done[vi][si];
                d.sort_by(f64::total_cmp);
                if d.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1}", pct(d, 50.0))
                }
            };
            md += &format!(
                "| `{}`: {} | {size} | {m:.1} | {p:.1} | {am} | {ap} | {received} |\n",
                v.name(),
                v.describe()
            );
        }
    }
    md += "\nThe aim (issue 6) is under 50 µs of median added latency. \"Profile received\" is \
           the time from the request's start until the test's receiving socket had the profile: \
           with `fastcgi_finish_request()` (the default) the encoding and the send happen after \
           the client has its response, so they leave the client's latency but still occupy the \
           worker for that long. p99 on a shared 2-vCPU machine is dominated by scheduling \
           noise; compare it only within one run.\n";
    if !errors.trim().is_empty() {
        md += &format!(
            "\nphp-error.log of the run:\n\n```\n{}\n```\n",
            errors.trim()
        );
    }
    Ok(md)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn median_usize(v: &mut [usize]) -> usize {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn php_version() -> String {
    Command::new(FPM)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "8.2".into())
}

/// One FastCGI request on a fresh connection; returns the response's stdout and the round-trip
/// time in µs (connect to the end-of-request record), and when it started.
fn fcgi(sock: &Path, uri: &str, script: &Path) -> Result<(Vec<u8>, f64, Instant)> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let script = script.display().to_string();
    let params = [
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", uri),
        ("QUERY_STRING", query),
        ("SCRIPT_FILENAME", &script),
        ("SCRIPT_NAME", "/app.php"),
        ("DOCUMENT_URI", path),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("HTTP_HOST", "bench.test"),
        ("SERVER_NAME", "bench.test"),
        ("SERVER_PORT", "80"),
        ("REMOTE_ADDR", "127.0.0.1"),
    ];
    let mut p = Vec::new();
    for (k, v) in params {
        for n in [k.len(), v.len()] {
            if n < 128 {
                p.push(n as u8);
            } else {
                p.extend_from_slice(&(n as u32 | 0x8000_0000).to_be_bytes());
            }
        }
        p.extend_from_slice(k.as_bytes());
        p.extend_from_slice(v.as_bytes());
    }
    let mut msg = Vec::with_capacity(p.len() + 64);
    let mut record = |kind: u8, content: &[u8]| {
        msg.extend_from_slice(&[1, kind, 0, 1]);
        msg.extend_from_slice(&(content.len() as u16).to_be_bytes());
        msg.extend_from_slice(&[0, 0]);
        msg.extend_from_slice(content);
    };
    record(1, &[0, 1, 0, 0, 0, 0, 0, 0]); // BEGIN_REQUEST, RESPONDER, close when done
    record(4, &p); // PARAMS
    record(4, &[]);
    record(5, &[]); // STDIN
    let t = Instant::now();
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&msg)?;
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 8];
        s.read_exact(&mut h)?;
        let len = u16::from_be_bytes([h[4], h[5]]) as usize;
        let mut content = vec![0u8; len + h[6] as usize];
        s.read_exact(&mut content)?;
        match h[1] {
            6 => out.extend_from_slice(&content[..len]),
            3 => break,
            _ => {}
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6;
    Ok((out, us, t))
}

/// A small PRNG for the interleaving order (no dependency for a shuffle).
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}
