//! The JetStream deployment as real processes on loopback: a NATS cluster (`nats-server -js`),
//! `apm-listener` replicas storing into it, and `apm-listener export` writing the stream to a
//! JSONL file. Every process is a [`Proc`], stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use serde_json::Value;

pub use apm_testkit::nats::{NatsCluster, NatsNode, nats_server_for_test};
use apm_testkit::{Proc, bin};

/// An `apm-listener` (or `apm-listener export`) started with `args`, logging to `dir/NAME.log`.
pub struct Replica {
    pub proc: Proc,
    /// The address from the ready line (listeners only).
    pub addr: String,
    pub log: PathBuf,
    /// The exporter's stdout lines so far (its running totals).
    lines: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    /// A listener on a free port: waits for its ready line (the stream exists then).
    pub fn listener(dir: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(bin("apm-listener"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start apm-listener");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("apm-listener listening on ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        std::thread::spawn(move || for _ in lines {});
        Self {
            proc: Proc {
                child,
                name: name.into(),
            },
            addr,
            log,
            lines: Arc::default(),
        }
    }

    /// `apm-listener export ARGS`; its stdout (running totals, one JSON line per round) is read
    /// by [`Replica::totals`] and [`Replica::summary`].
    pub fn exporter(dir: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(bin("apm-listener"))
            .arg("export")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start apm-listener export");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stdout = child.stdout.take().expect("piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(l);
            }
        });
        Self {
            proc: Proc {
                child,
                name: name.into(),
            },
            addr: String::new(),
            log,
            lines,
        }
    }

    /// The exporter's latest running totals (`null` before its first round).
    pub fn totals(&self) -> Value {
        let lines = self.lines.lock().expect("lines");
        lines
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops an exporter with SIGTERM and returns the JSON summary it printed last.
    pub fn summary(mut self) -> Value {
        let exit = self.proc.stop(Duration::from_secs(15));
        assert_eq!(
            exit,
            apm_testkit::Exit::Code(0),
            "{} did not exit cleanly: {}",
            self.proc.name,
            self.log_text()
        );
        // The reader thread sees EOF right after the exit; give it a moment to store the line.
        std::thread::sleep(Duration::from_millis(200));
        let summary = self.totals();
        assert!(
            summary.is_object(),
            "no exporter summary; log:\n{}",
            self.log_text()
        );
        summary
    }
}
