//! The real chain: php-fpm workers running `listener.php` → `apm-agent` → `apm-listener`, driven
//! at a few hundred requests per second for more than 10 s. Every request's profile must be in
//! the listener's file exactly once, with the right URI and status, and with the sender pid the
//! agent learned equal to the worker pid the profile reports.
//!
//! Ignored until the agent and the listener binaries are complete; then run with
//! `cargo build --release --bins && cargo test --release -p apm-tests --test php_fpm_e2e -- --ignored`.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use apm_tests::php::{self, FcgiRequest, FpmConfig, FpmPool, ProcGuard};
use serde_json::Value;

const RATE: f64 = 300.0;
const SECONDS: u64 = 11;

#[test]
#[ignore = "needs the finished apm-agent and apm-listener binaries; the lead enables it"]
fn php_fpm_profiles_reach_the_listener_exactly_once() {
    let Some(fpm) = php::require("php-fpm (php8.2-fpm)", php::php_fpm()) else {
        return;
    };
    let agent_bin = php::release_bin("apm-agent");
    let listener_bin = php::release_bin("apm-listener");
    let dir = tempfile::Builder::new()
        .prefix("apm-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let port = php::free_port().unwrap();
    let out = d.join("listener.jsonl");
    let log = |name: &str| Stdio::from(File::create(d.join(name)).unwrap());
    let logs = || {
        ["listener.log", "agent.log"]
            .map(|n| {
                format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(d.join(n)).unwrap_or_default()
                )
            })
            .join("\n")
    };

    let mut listener = ProcGuard::spawn(
        "apm-listener",
        Command::new(&listener_bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--out")
            .arg(&out)
            .stdout(log("listener.out"))
            .stderr(log("listener.log")),
    )
    .unwrap();
    assert!(
        php::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "apm-listener did not listen on {port}\n{}",
        logs()
    );

    let (sock, stream_sock, run_dir) = (
        d.join("listener.sock"),
        d.join("listener-stream.sock"),
        d.join("run"),
    );
    let config = format!(
        "[ingest]\n\
         socket = \"{sock}\"\n\
         stream_socket = \"{stream}\"\n\
         [central]\n\
         endpoint = \"http://127.0.0.1:{port}\"\n\
         [control]\n\
         runtime_dir = \"{run}\"\n\
         state_dir = \"{d}/state\"\n\
         pid_file = \"{run}/agent.pid\"\n\
         metrics_listen = \"\"\n\
         [spool]\n\
         dir = \"{d}/spool\"\n\
         [ebpf]\n\
         # A lowered sample rate would skip profiles this test expects.\n\
         adaptive_sampling = false\n",
        sock = sock.display(),
        stream = stream_sock.display(),
        run = run_dir.display(),
        d = d.display(),
    );
    let cfg = d.join("agent.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut agent = ProcGuard::spawn(
        "apm-agent",
        Command::new(&agent_bin)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stdout(log("agent.out"))
            .stderr(log("agent.log")),
    )
    .unwrap();
    assert!(
        php::wait_for(Duration::from_secs(15), || {
            sock.exists() && stream_sock.exists() || agent.check_running().is_err()
        }) && agent.check_running().is_ok(),
        "apm-agent did not bind its sockets\n{}",
        logs()
    );

    let pool = FpmPool::start(
        &fpm,
        &FpmConfig {
            workers: 4,
            env: vec![
                ("APM_SOCKET".into(), sock.display().to_string()),
                (
                    "APM_STREAM_SOCKET".into(),
                    stream_sock.display().to_string(),
                ),
                ("APM_RUNTIME_DIR".into(), run_dir.display().to_string()),
            ],
            ..FpmConfig::default()
        },
    )
    .unwrap();

    let total = (RATE * SECONDS as f64) as u64;
    let t = std::time::Instant::now();
    let outcomes = php::drive(pool.socket(), RATE, total, 8, |i| {
        FcgiRequest::get(&php::demo_mix(i).0)
    });
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(10), "drove for {took:?}");
    let mut expected: BTreeMap<String, u16> = BTreeMap::new();
    for o in &outcomes {
        let (uri, status) = php::demo_mix(o.index);
        let r = o
            .response
            .as_ref()
            .unwrap_or_else(|e| panic!("{uri}: {e}\n{}", pool.logs()));
        assert_eq!(r.status, status, "{uri}: response status");
        expected.insert(uri, status);
    }
    let mut lat: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    lat.sort_unstable();
    println!(
        "{total} requests in {took:?}: latency p50 {:?} p99 {:?}",
        php::percentile(&lat, 50.0),
        php::percentile(&lat, 99.0)
    );

    // Batches leave the agent within batch.max_age (500 ms by default); allow for slowness.
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("each listener line is JSON"))
            .collect()
    };
    php::wait_for(Duration::from_secs(30), || read().len() >= total as usize);
    // A little longer: a duplicate would arrive after the expected count was reached.
    std::thread::sleep(Duration::from_secs(1));
    let lines = read();

    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in &lines {
        let profile = match &line["profile"] {
            Value::String(s) => serde_json::from_str(s).expect("profile payload is JSON"),
            v => v.clone(),
        };
        assert_eq!(
            line["pid"].as_u64(),
            profile["pid"].as_u64(),
            "the sender pid the agent learned is the worker's: {line}"
        );
        let uri = profile["uri"].as_str().unwrap_or_default().to_string();
        seen.entry(uri).or_default().push(profile);
    }
    let mut missing = Vec::new();
    for (uri, status) in &expected {
        match seen.get(uri).map(Vec::as_slice) {
            None | Some([]) => missing.push(uri.clone()),
            Some([p]) => assert_eq!(p["status"], *status, "{uri}: profile status"),
            Some(many) => panic!("{uri}: {} profiles, expected exactly one", many.len()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {total} profiles missing (first: {:?})\n{}",
        missing.len(),
        missing.first(),
        logs()
    );
    let unexpected: Vec<&String> = seen.keys().filter(|u| !expected.contains_key(*u)).collect();
    assert!(
        unexpected.is_empty(),
        "profiles of requests never made: {unexpected:?}"
    );
    assert_eq!(lines.len(), total as usize, "lines in the listener's file");

    let status = agent.stop(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "apm-agent exit: {status}\n{}", logs());
    listener.stop(Duration::from_secs(5)).unwrap();
}
