//! Real processes on temporary directories, cleaned up by guards that implement `Drop`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use apm_testkit::{Exit, Proc, bin, bin_dir, in_ci, thread_nices};

/// `apm-listener` on a free loopback port, storing to `out`.
pub struct Listener {
    pub proc: Proc,
    pub addr: String,
    pub out: PathBuf,
}

impl Listener {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let out = dir.join("profiles.jsonl");
        Self::start_on(dir, &out, "127.0.0.1:0", extra)
    }

    pub fn start_on(dir: &Path, out: &Path, listen: &str, extra: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("listener.log"))
            .expect("listener log");
        let mut child = Command::new(bin("apm-listener"))
            .args(["--listen", listen, "--out"])
            .arg(out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start apm-listener");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = String::new();
        for l in lines.by_ref() {
            let l = l.expect("listener stdout");
            if let Some(i) = l.find("listening on ") {
                addr = l[i + 13..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                break;
            }
        }
        assert!(
            !addr.is_empty(),
            "apm-listener did not start; see {}/listener.log",
            dir.display()
        );
        std::thread::spawn(move || for _ in lines {});
        Self {
            proc: Proc {
                child,
                name: "apm-listener".into(),
            },
            addr,
            out: out.to_path_buf(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stored lines, parsed.
    pub fn stored(&self) -> Vec<Value> {
        read_jsonl(&self.out)
    }
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// An agent with every path under one temporary directory.
pub struct Agent {
    pub proc: Proc,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Agent {
    /// Writes `agent.toml` (paths under `dir`, central endpoint, eBPF mode, plus `extra` TOML
    /// appended) and returns its path.
    pub fn write_config(dir: &Path, endpoint: &str, ebpf: &str, extra: &str) -> PathBuf {
        let d = dir.display();
        let text = format!(
            "[ingest]\nsocket = \"{d}/run/listener.sock\"\nstream_socket = \"{d}/run/listener-stream.sock\"\n\
             [central]\nendpoint = \"{endpoint}\"\n\
             [spool]\ndir = \"{d}/spool\"\nmax_bytes = 67108864\nsegment_bytes = 1048576\n\
             [ebpf]\nenabled = \"{ebpf}\"\n\
             [control]\nruntime_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\npid_file = \"{d}/run/agent.pid\"\nmetrics_listen = \"\"\n\
             {extra}\n"
        );
        // `extra` may repeat a section; merge by re-parsing as TOML tables.
        let merged = merge_toml(&text);
        let path = dir.join("agent.toml");
        std::fs::write(&path, merged).expect("write config");
        path
    }

    pub fn start(dir: &Path, endpoint: &str, ebpf: &str, extra: &str) -> Self {
        let config = Self::write_config(dir, endpoint, ebpf, extra);
        Self::start_with(dir, &config)
    }

    pub fn start_with(dir: &Path, config: &Path) -> Self {
        Self::start_customised(dir, config, |_| {})
    }

    /// Like [`Agent::start_with`], with `customise` applied to the command first (resource
    /// limits in `pre_exec`, environment).
    pub fn start_customised(
        dir: &Path,
        config: &Path,
        customise: impl FnOnce(&mut Command),
    ) -> Self {
        std::fs::create_dir_all(dir.join("run")).expect("run dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .expect("agent log");
        let mut cmd = Command::new(bin("apm-agent"));
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        customise(&mut cmd);
        let child = cmd.spawn().expect("start apm-agent");
        let mut a = Self {
            proc: Proc {
                child,
                name: "apm-agent".into(),
            },
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
        };
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/listener.sock")
    }

    pub fn stream_socket(&self) -> PathBuf {
        self.dir.join("run/listener-stream.sock")
    }

    /// Fails the test if the agent's log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.status().is_some() {
                return;
            }
            if let Ok(Some(st)) = self.proc.child.try_wait() {
                panic!("agent exited ({st}) before it was ready:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready within {timeout:?}:\n{}", self.log());
    }

    /// The status document from the control socket (what `apm-agent status --json` prints).
    pub fn status(&self) -> Option<Value> {
        status_at(&self.dir.join("run/control.sock"))
    }

    /// Waits until `pred(status)` holds; panics with the last status after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let last = std::cell::RefCell::new(Value::Null);
        apm_testkit::poll(
            timeout,
            || {
                let s = self.status()?;
                let ok = pred(&s);
                *last.borrow_mut() = s.clone();
                ok.then_some(s)
            },
            || {
                format!(
                    "waiting for {what}; last status: {:#}\nlog:\n{}",
                    last.borrow(),
                    self.log()
                )
            },
        )
    }

    /// Runs `apm-agent --config <config> ARGS` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("apm-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run apm-agent CLI")
    }
}

/// The raw status document of the agent behind control socket `sock`.
pub fn status_at(sock: &Path) -> Option<Value> {
    apm_testkit::status_json(sock)
}

pub fn u(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
}

/// Merges repeated `[section]` headers of a small TOML text (later keys win).
fn merge_toml(text: &str) -> String {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('[') {
            cur = t.to_string();
            if !sections.iter().any(|(s, _)| *s == cur) {
                sections.push((cur.clone(), Vec::new()));
            }
            continue;
        }
        let (k, _) = t.split_once('=').expect("key = value");
        let k = k.trim().to_string();
        let sec = &mut sections
            .iter_mut()
            .find(|(s, _)| *s == cur)
            .expect("key before any section")
            .1;
        sec.retain(|(x, _)| *x != k);
        sec.push((k, t.to_string()));
    }
    let mut out = String::new();
    for (s, kv) in sections {
        out.push_str(&s);
        out.push('\n');
        for (_, l) in kv {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Runs the test sender binary: `apm-test-sender` (see its source for flags); returns its JSON
/// report `{sent, eagain, errors: {errno: count}}`.
pub fn sender(args: &[String]) -> std::process::Child {
    Command::new(bin("apm-test-sender"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start apm-test-sender")
}

pub fn sender_report(child: std::process::Child) -> Value {
    let out = child.wait_with_output().expect("sender");
    assert!(
        out.status.success(),
        "sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("sender report JSON")
}
