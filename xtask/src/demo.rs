//! The real chain for `cargo xtask run`: PHP-FPM (Debian's php8.2-fpm) running a small app with
//! `listener.php` prepended, nginx in front, and a load generator issuing HTTP requests.
//! Everything lives under `.run/php`; nothing touches the system's own nginx or PHP-FPM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::live::{ChildGuard, free_port, spawn};

const FPM: &str = "/usr/sbin/php-fpm8.2";
const NGINX: &str = "/usr/sbin/nginx";

pub fn why_not() -> String {
    let missing: Vec<&str> = [FPM, NGINX]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        "not root (PHP-FPM and nginx need to start as root here)".into()
    } else {
        format!("{} not installed", missing.join(" and "))
    }
}

pub fn available() -> bool {
    Path::new(FPM).exists() && Path::new(NGINX).exists() && nix::unistd::geteuid().is_root()
}

pub struct Demo {
    _fpm: ChildGuard,
    _nginx: ChildGuard,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const APP: &str = r#"<?php
// The demo app: a few endpoints with different work, status codes and response sizes.
$uri = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH);
switch ($uri) {
    case '/slow':
        usleep(random_int(2000, 8000));
        echo str_repeat("slow ", 200);
        break;
    case '/missing':
        http_response_code(404);
        echo "not found";
        break;
    case '/error':
        http_response_code(500);
        echo "oops";
        break;
    case '/big':
        $rows = [];
        for ($i = 0; $i < 2000; $i++) { $rows[] = ['id' => $i, 'name' => md5((string)$i)]; }
        echo json_encode($rows);
        break;
    default:
        $x = 0;
        for ($i = 0; $i < 20000; $i++) { $x += $i % 7; }
        echo "hello $x";
}
"#;

impl Demo {
    pub fn start(root: &Path, run_dir: &Path, stop: Arc<AtomicBool>) -> Result<Self> {
        let d = run_dir.join("php");
        std::fs::create_dir_all(d.join("app"))?;
        std::fs::write(d.join("app/index.php"), APP)?;
        let fpm_sock = d.join("fpm.sock");
        let rt = run_dir.join("run");
        let listener_php = root.join("php/listener.php");
        std::fs::write(
            d.join("php-fpm.conf"),
            format!(
                "[global]\npid = {d}/fpm.pid\nerror_log = {d}/fpm.log\ndaemonize = no\n\n[demo]\nuser = root\ngroup = root\nlisten = {sock}\nlisten.mode = 0666\npm = static\npm.max_children = 4\nclear_env = yes\nenv[APM_SOCKET] = {rt}/listener.sock\nenv[APM_STREAM_SOCKET] = {rt}/listener-stream.sock\nenv[APM_RUNTIME_DIR] = {rt}\nphp_admin_value[auto_prepend_file] = {lp}\ncatch_workers_output = yes\n",
                d = d.display(),
                sock = fpm_sock.display(),
                rt = rt.display(),
                lp = listener_php.display()
            ),
        )?;
        let fpm = spawn(
            Command::new(FPM)
                .args(["-F", "-R", "-y"])
                .arg(d.join("php-fpm.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("fpm.stderr"))?),
            "php-fpm",
        )?;
        let port = free_port();
        std::fs::create_dir_all(d.join("nginx/logs"))?;
        std::fs::write(
            d.join("nginx/nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx/nginx.pid;\nerror_log {d}/nginx/logs/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/nginx/tmp;\n  fastcgi_temp_path {d}/nginx/tmp;\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      include /etc/nginx/fastcgi_params;\n      fastcgi_param SCRIPT_FILENAME {d}/app/index.php;\n      fastcgi_pass unix:{sock};\n    }}\n  }}\n}}\n",
                d = d.display(),
                sock = fpm_sock.display()
            ),
        )?;
        let nginx = spawn(
            Command::new(NGINX)
                .arg("-p")
                .arg(d.join("nginx"))
                .arg("-c")
                .arg(d.join("nginx/nginx.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("nginx/stderr"))?),
            "nginx",
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if fpm_sock.exists() && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("PHP-FPM or nginx did not come up; see {}", d.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let paths = [
            "/", "/", "/", "/slow", "/big", "/missing", "/error", "/?page=2",
        ];
        // Four clients, ~50 requests/s each: a few hundred profiles per second.
        let threads = (0..4)
            .map(|c| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = c;
                    while !stop.load(Ordering::Relaxed) {
                        let path = paths[n % paths.len()];
                        n += 1;
                        match get(port, path) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Ok(Self {
            _fpm: fpm,
            _nginx: nginx,
            ok,
            failed,
            threads,
        })
    }

    /// Stops the load; returns (requests answered, requests failed).
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

/// One HTTP/1.0 GET; returns the status code.
fn get(port: u16, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: demo.local\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad response"))
}
