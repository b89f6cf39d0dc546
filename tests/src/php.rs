//! The PHP side of the integration tests: finding `php` and `php-fpm`, a php-fpm pool in a
//! temporary directory (a guard that stops it on drop), a minimal FastCGI client, a paced request
//! driver, a fake agent that collects what `listener.php` sends, and the release binaries of the
//! agent and the reference listener.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn listener_php() -> PathBuf {
    repo_root().join("php/listener.php")
}

/// The demo app's front controller (every URL is routed to it).
pub fn demo_index() -> PathBuf {
    repo_root().join("php/demo/index.php")
}

pub use apm_testkit::in_ci;

/// Finds the first of `names` in `PATH`, then in the sbin directories (php-fpm lives in
/// `/usr/sbin`, which a non-login `PATH` may lack).
pub fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// `Some(v)`, or for a missing prerequisite: a panic in CI (where the project's setup installs
/// it, so its absence is a failure), a printed reason and `None` elsewhere (the caller skips).
pub fn require<T>(what: &str, v: Option<T>) -> Option<T> {
    if v.is_none() {
        assert!(
            !in_ci(),
            "{what} is missing in CI: the project's setup (`cargo xtask setup`) installs it"
        );
        eprintln!("SKIPPED: {what} is not installed (install php8.2-cli php8.2-fpm libfcgi-bin)");
    }
    v
}

pub fn php_cli() -> Option<PathBuf> {
    find_program(&["php", "php8.2"])
}

pub fn php_fpm() -> Option<PathBuf> {
    find_program(&["php-fpm8.2", "php-fpm"])
}

/// A release binary of this workspace (`apm-agent`, `apm-listener`), next to the test executable
/// (`target/release/deps/<test>` → `target/release/<name>`).
pub fn release_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build --release --bins` or `cargo xtask test`",
        bin.display()
    );
    bin
}

/// A child process stopped when dropped (the kit's one guard).
pub type ProcGuard = apm_testkit::Proc;

pub use apm_testkit::wait_until as wait_for;

/// How long php-fpm may take to listen and fork its workers.
const FPM_START: Duration = Duration::from_secs(30);

/// How to configure a php-fpm pool.
#[derive(Debug, Clone)]
pub struct FpmConfig {
    /// `pm = static` with this many workers.
    pub workers: usize,
    /// The pool's `env[NAME] = value` (with `clear_env = yes`, the workers see only these).
    pub env: Vec<(String, String)>,
    /// Load `php/listener.php` through `auto_prepend_file`.
    pub prepend_listener: bool,
    /// More `php_admin_value[...]` settings.
    pub ini: Vec<(String, String)>,
    /// Start php-fpm with `-n` (no php.ini, so no shared extensions: no sockets, no opcache).
    pub no_php_ini: bool,
}

impl Default for FpmConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            env: Vec::new(),
            prepend_listener: true,
            ini: Vec::new(),
            no_php_ini: false,
        }
    }
}

/// A php-fpm master with one pool (`app`) listening on a Unix socket in its own temporary
/// directory; stopped on drop. As root, the workers run as root too (`-R`, no `user`).
pub struct FpmPool {
    // Declared first: dropped (stopped) before the directory goes.
    proc: ProcGuard,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl FpmPool {
    pub fn start(fpm: &Path, cfg: &FpmConfig) -> anyhow::Result<Self> {
        // Short path: the socket paths inside must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("apm-fpm-")
            .tempdir_in("/tmp")?;
        let d = dir.path();
        let socket = d.join("fpm.sock");
        let mut conf = format!(
            "[global]\n\
             pid = {d}/fpm.pid\n\
             error_log = {d}/fpm.log\n\
             daemonize = no\n\
             log_level = notice\n\
             [app]\n\
             listen = {sock}\n\
             listen.backlog = 1024\n\
             pm = static\n\
             pm.max_children = {workers}\n\
             clear_env = yes\n\
             catch_workers_output = yes\n\
             decorate_workers_output = no\n\
             php_admin_flag[log_errors] = on\n\
             php_admin_flag[display_errors] = off\n\
             php_admin_value[error_reporting] = 32767\n\
             php_admin_value[error_log] = {d}/php-error.log\n",
            d = d.display(),
            sock = socket.display(),
            workers = cfg.workers,
        );
        if cfg.prepend_listener {
            conf += &format!(
                "php_admin_value[auto_prepend_file] = {}\n",
                listener_php().display()
            );
        }
        for (k, v) in &cfg.ini {
            conf += &format!("php_admin_value[{k}] = {v}\n");
        }
        for (k, v) in &cfg.env {
            conf += &format!("env[{k}] = {v}\n");
        }
        let conf_path = d.join("fpm.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(fpm);
        cmd.arg("--nodaemonize")
            .arg("--allow-to-run-as-root")
            .arg("--fpm-config")
            .arg(&conf_path);
        if cfg.no_php_ini {
            cmd.arg("-n");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut proc = ProcGuard::spawn("php-fpm", &mut cmd)?;
        // 30 s: php-fpm loading its extensions over the VM tier's 9p root took over 10 s once.
        let up = wait_for(FPM_START, || {
            socket.exists() || proc.check_running().is_err()
        });
        proc.check_running()
            .with_context(|| format!("php-fpm log:\n{}", read_lossy(&d.join("fpm.log"))))?;
        if !up {
            bail!(
                "php-fpm did not listen on {} within {FPM_START:?}; log:\n{}",
                socket.display(),
                read_lossy(&d.join("fpm.log"))
            );
        }
        let pool = Self { proc, socket, dir };
        // `pm = static` forks its workers after the socket is up: a loaded machine may not have
        // them all yet, and a test that counts per worker must see every one.
        if !wait_for(FPM_START, || pool.worker_pids().len() >= cfg.workers) {
            bail!(
                "php-fpm started {} of {} workers within {FPM_START:?}; log:\n{}",
                pool.worker_pids().len(),
                cfg.workers,
                pool.logs()
            );
        }
        Ok(pool)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn master_pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The master's log and PHP's error log, for assertions and failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- fpm.log\n{}--- php-error.log\n{}",
            read_lossy(&self.dir().join("fpm.log")),
            read_lossy(&self.dir().join("php-error.log"))
        )
    }

    /// PHP's error log only (empty when nothing was logged).
    pub fn php_errors(&self) -> String {
        read_lossy(&self.dir().join("php-error.log"))
    }

    /// The pids of the pool's workers (the master's children).
    pub fn worker_pids(&self) -> Vec<u32> {
        let master = self.master_pid();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the comm may hold spaces, so split after the ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// One FastCGI request (the RESPONDER role), as nginx would pass it.
#[derive(Debug, Clone)]
pub struct FcgiRequest {
    pub method: String,
    /// Path and query, as in `REQUEST_URI`.
    pub uri: String,
    pub script: PathBuf,
    pub host: String,
    pub body: Vec<u8>,
}

impl FcgiRequest {
    /// A GET of `uri` on the demo app.
    pub fn get(uri: &str) -> Self {
        Self {
            method: "GET".into(),
            uri: uri.into(),
            script: demo_index(),
            host: "demo.test".into(),
            body: Vec::new(),
        }
    }

    fn params(&self) -> Vec<(String, String)> {
        let (path, query) = self.uri.split_once('?').unwrap_or((&self.uri, ""));
        let root = self
            .script
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let name = self
            .script
            .file_name()
            .map(|n| format!("/{}", n.to_string_lossy()))
            .unwrap_or_default();
        [
            ("GATEWAY_INTERFACE", "CGI/1.1".to_string()),
            ("SERVER_SOFTWARE", "apm-tests".into()),
            ("SERVER_PROTOCOL", "HTTP/1.1".into()),
            ("REQUEST_METHOD", self.method.clone()),
            ("REQUEST_URI", self.uri.clone()),
            ("DOCUMENT_URI", path.to_string()),
            ("QUERY_STRING", query.to_string()),
            ("SCRIPT_FILENAME", self.script.display().to_string()),
            ("SCRIPT_NAME", name),
            ("DOCUMENT_ROOT", root),
            ("HTTP_HOST", self.host.clone()),
            ("SERVER_NAME", self.host.clone()),
            ("SERVER_ADDR", "127.0.0.1".into()),
            ("SERVER_PORT", "80".into()),
            ("REMOTE_ADDR", "127.0.0.1".into()),
            ("REMOTE_PORT", "40000".into()),
            ("CONTENT_LENGTH", self.body.len().to_string()),
            ("CONTENT_TYPE", "application/octet-stream".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[derive(Debug, Clone)]
pub struct FcgiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What the script wrote to FastCGI's stderr stream (PHP errors when `display_errors=stderr`).
    pub stderr: Vec<u8>,
}

impl FcgiResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

const FCGI_BEGIN_REQUEST: u8 = 1;
const FCGI_END_REQUEST: u8 = 3;
const FCGI_PARAMS: u8 = 4;
const FCGI_STDIN: u8 = 5;
const FCGI_STDOUT: u8 = 6;
const FCGI_STDERR: u8 = 7;

fn fcgi_record(out: &mut Vec<u8>, kind: u8, content: &[u8]) {
    for chunk in content
        .chunks(65535)
        .chain(content.is_empty().then_some(&[][..]))
    {
        out.extend_from_slice(&[1, kind, 0, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(chunk);
    }
}

fn fcgi_len(out: &mut Vec<u8>, n: usize) {
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&(n as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// Sends one request on a fresh connection (php-fpm closes it after the response) and reads the
/// whole response.
pub fn fcgi_request(
    socket: &Path,
    req: &FcgiRequest,
    timeout: Duration,
) -> io::Result<FcgiResponse> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut out = Vec::with_capacity(1024 + req.body.len());
    // Role RESPONDER (1), flags 0: the server closes the connection when done.
    fcgi_record(&mut out, FCGI_BEGIN_REQUEST, &[0, 1, 0, 0, 0, 0, 0, 0]);
    let mut params = Vec::new();
    for (k, v) in req.params() {
        fcgi_len(&mut params, k.len());
        fcgi_len(&mut params, v.len());
        params.extend_from_slice(k.as_bytes());
        params.extend_from_slice(v.as_bytes());
    }
    fcgi_record(&mut out, FCGI_PARAMS, &params);
    fcgi_record(&mut out, FCGI_PARAMS, &[]);
    if !req.body.is_empty() {
        fcgi_record(&mut out, FCGI_STDIN, &req.body);
    }
    fcgi_record(&mut out, FCGI_STDIN, &[]);
    s.write_all(&out)?;

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    loop {
        let mut h = [0u8; 8];
        s.read_exact(&mut h)?;
        let len = u16::from_be_bytes([h[4], h[5]]) as usize;
        let mut content = vec![0u8; len + h[6] as usize];
        s.read_exact(&mut content)?;
        content.truncate(len);
        match h[1] {
            FCGI_STDOUT => stdout.extend_from_slice(&content),
            FCGI_STDERR => stderr.extend_from_slice(&content),
            FCGI_END_REQUEST => break,
            _ => {}
        }
    }
    let split = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("FastCGI response without a header block"))?;
    let head = String::from_utf8_lossy(&stdout[..split]).into_owned();
    let body = stdout[split + 4..].to_vec();
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other(format!("bad Status header: {v}")))?;
        }
        headers.push((k.to_string(), v));
    }
    Ok(FcgiResponse {
        status,
        headers,
        body,
        stderr,
    })
}

/// A mix of the demo app's endpoints for request `i`: the URI (unique per `i`) and the status the
/// app answers with. Covers 200/302/404/500, CPU work, waiting, a Content-Length body and a
/// profile large enough (100 KB) to go over the stream socket.
pub fn demo_mix(i: u64) -> (String, u16) {
    match i % 10 {
        0 => (format!("/status/404?i={i}"), 404),
        1 => (format!("/big?kb=20&i={i}"), 200),
        2 => (format!("/work?ms=2&i={i}"), 200),
        3 => (format!("/error?i={i}"), 500),
        4 => (format!("/status/302?i={i}"), 302),
        5 if i % 20 == 5 => (format!("/pad?bytes=100000&i={i}"), 200),
        6 => (format!("/sleep?ms=20&i={i}"), 200),
        _ => (format!("/echo?id={i}&i={i}"), 200),
    }
}

/// The result of one driven request.
#[derive(Debug)]
pub struct Outcome {
    pub index: u64,
    pub uri: String,
    pub response: Result<FcgiResponse, String>,
    /// From the request's scheduled time to the end of its response (includes queueing when the
    /// pool is saturated, as a client would see it).
    pub latency: Duration,
}

/// Drives `total` requests at `rate` per second (each scheduled at `start + i / rate`, so a
/// slow response does not slow the schedule) with up to `concurrency` in flight. Returns the
/// outcomes in index order.
pub fn drive(
    socket: &Path,
    rate: f64,
    total: u64,
    concurrency: usize,
    make: impl Fn(u64) -> FcgiRequest + Sync,
) -> Vec<Outcome> {
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let results = Mutex::new(Vec::with_capacity(total as usize));
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let req = make(i);
                    let response = fcgi_request(socket, &req, Duration::from_secs(30))
                        .map_err(|e| e.to_string());
                    let outcome = Outcome {
                        index: i,
                        uri: req.uri,
                        response,
                        latency: due.elapsed(),
                    };
                    results.lock().unwrap().push(outcome);
                }
            });
        }
    });
    let mut v = results.into_inner().unwrap();
    v.sort_by_key(|o| o.index);
    v
}

/// A stand-in for the agent: binds the datagram and stream sockets in a directory and collects
/// every profile sent to them (raw JSON bytes) on two threads until dropped.
pub struct FakeAgent {
    pub socket: PathBuf,
    pub stream_socket: PathBuf,
    pub runtime_dir: PathBuf,
    datagrams: Arc<Mutex<Vec<Vec<u8>>>>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Stream connections whose bytes were not whole frames.
    torn: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start(dir: &Path) -> io::Result<Self> {
        let socket = dir.join("listener.sock");
        let stream_socket = dir.join("listener-stream.sock");
        let dgram = UnixDatagram::bind(&socket)?;
        dgram.set_read_timeout(Some(Duration::from_millis(20)))?;
        let listener = UnixListener::bind(&stream_socket)?;
        listener.set_nonblocking(true)?;
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let torn = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (datagrams, stop) = (datagrams.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 4 << 20];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = dgram.recv(&mut buf) {
                        datagrams.lock().unwrap().push(buf[..n].to_vec());
                    }
                }
            }));
        }
        {
            let (frames, torn, stop) = (frames.clone(), torn.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut c, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut bytes = Vec::new();
                    let _ = c.read_to_end(&mut bytes);
                    match split_frames(&bytes) {
                        Some(fs) => frames.lock().unwrap().extend(fs),
                        None => {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(Self {
            socket,
            stream_socket,
            runtime_dir: dir.to_path_buf(),
            datagrams,
            frames,
            torn,
            stop,
            threads,
        })
    }

    /// The pool environment that points `listener.php` here.
    pub fn php_env(&self) -> Vec<(String, String)> {
        vec![
            ("APM_SOCKET".into(), self.socket.display().to_string()),
            (
                "APM_STREAM_SOCKET".into(),
                self.stream_socket.display().to_string(),
            ),
            (
                "APM_RUNTIME_DIR".into(),
                self.runtime_dir.display().to_string(),
            ),
        ]
    }

    /// Takes the datagrams received so far.
    pub fn take_datagrams(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.datagrams.lock().unwrap())
    }

    /// Takes the stream frames received so far.
    pub fn take_frames(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }

    pub fn torn_connections(&self) -> u64 {
        self.torn.load(Ordering::Relaxed)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Splits a stream connection's bytes into frames (4-byte big-endian length + payload); `None`
/// when the bytes end inside a frame.
pub fn split_frames(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        out.push(bytes.get(4..4 + len)?.to_vec());
        bytes = &bytes[4 + len..];
    }
    Some(out)
}

pub use apm_testkit::free_port;

/// Percentile (0..=100) of already sorted values.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_torn_frames_are_detected() {
        let mut b = Vec::new();
        for p in [&b"{}"[..], b"{\"a\":1}"] {
            b.extend_from_slice(&(p.len() as u32).to_be_bytes());
            b.extend_from_slice(p);
        }
        assert_eq!(
            split_frames(&b).unwrap(),
            vec![b"{}".to_vec(), b"{\"a\":1}".to_vec()]
        );
        assert!(split_frames(&b[..b.len() - 1]).is_none());
        assert!(split_frames(&b[..3]).is_none());
    }

    #[test]
    fn fcgi_lengths_use_one_or_four_bytes() {
        let mut v = Vec::new();
        fcgi_len(&mut v, 127);
        fcgi_len(&mut v, 128);
        assert_eq!(v, vec![127, 0x80, 0, 0, 128]);
    }
}
