//! The real chain for `cargo xtask run`: PHP-FPM (Debian's php8.2-fpm) serving the demo app
//! (`php/demo/index.php`) with `listener.php` prepended, nginx in front, and a load generator
//! issuing a few hundred HTTP requests per second. Everything lives under `.run/php`; nothing
//! touches the system's own nginx or PHP-FPM.
//!
//! The checkout may sit in a directory only its owner can enter (a home directory, a
//! `mktemp -d` folder: mode 0700). PHP-FPM runs as root and reads the app from there, but
//! nginx's workers run as `nobody` and could reach nothing under it: so PHP-FPM listens on a
//! loopback TCP port rather than a socket file, and nginx never writes a temporary file (it
//! streams responses larger than its buffers instead of spooling them under `.run/`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use apm_testkit::{Proc, free_port};

const FPM: &str = "/usr/sbin/php-fpm8.2";
const NGINX: &str = "/usr/sbin/nginx";
/// Requests per second of the load generator.
const RATE: f64 = 300.0;
/// Client threads: enough that a slow endpoint does not hold the schedule back.
const CLIENTS: u64 = 8;

pub fn why_not() -> String {
    let missing: Vec<&str> = [FPM, NGINX]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        "not root (PHP-FPM and nginx need to start as root here)".into()
    } else {
        format!(
            "{} not installed (`cargo xtask setup` installs php8.2-fpm and nginx)",
            missing.join(" and ")
        )
    }
}

pub fn available() -> bool {
    Path::new(FPM).exists() && Path::new(NGINX).exists() && nix::unistd::geteuid().is_root()
}

pub struct Demo {
    // Declared in stop order: nginx first (no new requests), then PHP-FPM.
    _nginx: Proc,
    _fpm: Proc,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Request `n` of the mix: a URL of the demo app and the status it answers with. Mostly fast
/// pages, some CPU work and waiting, errors and redirects, large bodies, and one profile in 40
/// large enough (100 KB) to go over the agent's stream socket.
fn request(n: u64) -> (String, u16) {
    match n % 40 {
        0 => (format!("/pad?bytes=100000&n={n}"), 200),
        1 | 21 => ("/status/404".into(), 404),
        2 => ("/error".into(), 500),
        3 | 23 => ("/status/302".into(), 302),
        4 | 14 | 24 | 34 => ("/work?ms=2".into(), 200),
        5 | 25 => ("/sleep?ms=10".into(), 200),
        6 | 26 => ("/big?kb=20".into(), 200),
        k if k % 2 == 0 => ("/".into(), 200),
        _ => (format!("/echo?id={n}"), 200),
    }
}

impl Demo {
    pub fn start(root: &Path, run_dir: &Path, stop: Arc<AtomicBool>) -> Result<Self> {
        let d = run_dir.join("php");
        std::fs::create_dir_all(d.join("nginx/tmp"))?;
        let app = root.join("php/demo/index.php");
        if !app.is_file() {
            bail!("the demo app {} is missing", app.display());
        }
        let fpm_port = free_port()?;
        let rt = run_dir.join("run");
        let listener_php = root.join("php/listener.php");
        std::fs::write(
            d.join("php-fpm.conf"),
            format!(
                "[global]\n\
                 pid = {d}/fpm.pid\n\
                 error_log = {d}/fpm.log\n\
                 daemonize = no\n\
                 \n\
                 [demo]\n\
                 user = root\n\
                 group = root\n\
                 listen = 127.0.0.1:{fpm_port}\n\
                 listen.backlog = 1024\n\
                 pm = static\n\
                 pm.max_children = 4\n\
                 clear_env = yes\n\
                 env[APM_SOCKET] = {rt}/listener.sock\n\
                 env[APM_STREAM_SOCKET] = {rt}/listener-stream.sock\n\
                 env[APM_RUNTIME_DIR] = {rt}\n\
                 php_admin_value[auto_prepend_file] = {lp}\n\
                 php_admin_flag[display_errors] = off\n\
                 php_admin_flag[log_errors] = on\n\
                 php_admin_value[error_log] = {d}/php-error.log\n\
                 catch_workers_output = yes\n",
                d = d.display(),
                rt = rt.display(),
                lp = listener_php.display()
            ),
        )?;
        let fpm = Proc::spawn_group(
            "php-fpm",
            Command::new(FPM)
                .args(["-F", "-R", "-y"])
                .arg(d.join("php-fpm.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("fpm.stderr"))?),
        )?;
        let port = free_port()?;
        let ng = d.join("nginx");
        std::fs::write(
            ng.join("nginx.conf"),
            format!(
                "worker_processes 1;\n\
                 daemon off;\n\
                 pid {n}/nginx.pid;\n\
                 error_log {n}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n\
                 \x20 access_log off;\n\
                 \x20 fastcgi_max_temp_file_size 0;\n\
                 \x20 client_body_temp_path {n}/tmp/body;\n\
                 \x20 fastcgi_temp_path {n}/tmp/fastcgi;\n\
                 \x20 proxy_temp_path {n}/tmp/proxy;\n\
                 \x20 uwsgi_temp_path {n}/tmp/uwsgi;\n\
                 \x20 scgi_temp_path {n}/tmp/scgi;\n\
                 \x20 server {{\n\
                 \x20   listen 127.0.0.1:{port};\n\
                 \x20   location / {{\n\
                 \x20     include /etc/nginx/fastcgi_params;\n\
                 \x20     fastcgi_param SCRIPT_FILENAME {app};\n\
                 \x20     fastcgi_pass 127.0.0.1:{fpm_port};\n\
                 \x20   }}\n\
                 \x20 }}\n\
                 }}\n",
                n = ng.display(),
                app = app.display(),
            ),
        )?;
        let nginx = Proc::spawn_group(
            "nginx",
            Command::new(NGINX)
                .arg("-p")
                .arg(&ng)
                .arg("-e")
                .arg(ng.join("error.log"))
                .arg("-c")
                .arg(ng.join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(ng.join("stderr"))?),
        )?;
        let mut guards = (fpm, nginx);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(("127.0.0.1", fpm_port)).is_ok()
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                break;
            }
            for g in [&mut guards.0, &mut guards.1] {
                if let Ok(Some(st)) = g.child.try_wait() {
                    bail!("{} exited ({st}); see the logs in {}", g.name, d.display());
                }
            }
            if Instant::now() > deadline {
                bail!("PHP-FPM or nginx did not come up; see {}", d.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // One request through the whole front end before the load, so a broken setup fails
        // here with the reason instead of as a stream of failed requests.
        match get(port, "/echo?id=ready") {
            Ok((200, body)) if body == b"ready\n" => {}
            Ok((status, body)) => bail!(
                "the demo app answered {status} {:?} to /echo?id=ready; see {}",
                String::from_utf8_lossy(&body),
                d.display()
            ),
            Err(e) => bail!(
                "the demo app did not answer through nginx: {e}; see {}",
                d.display()
            ),
        }
        println!(
            "demo      http://127.0.0.1:{port}/ (nginx -> php-fpm, {} with listener.php); logs in {}",
            app.display(),
            d.display()
        );

        // The readiness request above counts: its profile is in the agent's figures too.
        let ok = Arc::new(AtomicU64::new(1));
        let failed = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        // Each request is scheduled at start + n / RATE, so a slow response does not slow the
        // schedule (up to CLIENTS requests in flight).
        let threads = (0..CLIENTS)
            .map(|_| {
                let (ok, failed, next, stop) =
                    (ok.clone(), failed.clone(), next.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_secs_f64(n as f64 / RATE);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let (path, want) = request(n);
                        let good = match get(port, &path) {
                            Ok((status, body)) => {
                                status == want
                                    && (!path.starts_with("/echo")
                                        || body == format!("{n}\n").into_bytes())
                            }
                            Err(_) => false,
                        };
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let (fpm, nginx) = guards;
        Ok(Self {
            _nginx: nginx,
            _fpm: fpm,
            ok,
            failed,
            threads,
        })
    }

    /// Stops the load; returns (requests answered as expected, requests failed or wrong).
    pub fn stop(&mut self) -> (u64, u64) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// One HTTP/1.0 GET on a fresh connection; returns the status code and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: demo.local\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status:?}")))?;
    let body = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or_else(Vec::new, |i| rest[i + 4..].to_vec());
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A clone in a home directory or a `mktemp -d` folder is mode 0700: nginx's workers (not
    /// root) cannot traverse it. The demo must still answer every request through nginx.
    #[test]
    fn demo_serves_every_request_from_a_private_checkout() {
        if !available() {
            let why = why_not();
            assert!(
                std::env::var_os("CI").is_none(),
                "the PHP-FPM demo cannot run in CI: {why}"
            );
            eprintln!("skipped outside CI: {why}");
            return;
        }
        let repo = crate::project_root();
        let tmp = tempfile::Builder::new()
            .prefix("apm-demo-private-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700");
        let checkout = tmp.path().join("checkout");
        std::fs::create_dir_all(checkout.join("php/demo")).expect("mkdir");
        for f in ["php/listener.php", "php/demo/index.php"] {
            std::fs::copy(repo.join(f), checkout.join(f)).expect("copy the PHP side");
        }
        let run_dir = checkout.join(".run");
        std::fs::create_dir_all(run_dir.join("run")).expect("mkdir .run/run");

        let stop = Arc::new(AtomicBool::new(false));
        let mut demo = Demo::start(&checkout, &run_dir, stop.clone())
            .expect("the demo starts and answers through nginx from a 0700 checkout");
        // Two seconds at 300 requests/s covers every kind of request of the mix (40 kinds).
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        let (ok, failed) = demo.stop();
        drop(demo);
        assert_eq!(failed, 0, "requests that failed or answered wrongly");
        assert!(ok >= 100, "only {ok} requests answered in 2 s");
    }
}
