//! `listener.php` under a real php-fpm pool (Debian's php8.2-fpm), driven over FastCGI, sending to
//! a fake agent (sockets bound by the test): no agent binary needed. Fails in CI when php-fpm is
//! missing; skips with a printed reason elsewhere.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use apm_tests::php::{self, FakeAgent, FcgiRequest, FpmConfig, FpmPool};
use serde_json::Value;

fn fpm() -> Option<std::path::PathBuf> {
    php::require("php-fpm (php8.2-fpm)", php::php_fpm())
}

fn pool(fpm: &std::path::Path, env: Vec<(String, String)>, workers: usize) -> FpmPool {
    FpmPool::start(
        fpm,
        &FpmConfig {
            workers,
            env,
            ..FpmConfig::default()
        },
    )
    .expect("start php-fpm")
}

/// Waits (up to 5 s) until `n` profiles have arrived at the fake agent; returns them all
/// (datagrams and frames) once nothing more arrives for 200 ms.
fn collect(agent: &FakeAgent, n: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quiet_since = Instant::now();
    loop {
        let got: Vec<Vec<u8>> = agent
            .take_datagrams()
            .into_iter()
            .chain(agent.take_frames())
            .collect();
        if got.is_empty() {
            if (all.len() >= n && quiet_since.elapsed() > Duration::from_millis(200))
                || Instant::now() > deadline
            {
                return all;
            }
        } else {
            quiet_since = Instant::now();
        }
        for g in got {
            all.push(serde_json::from_slice::<Value>(&g).expect("each profile is JSON"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fpm_every_request_sends_one_profile_with_the_right_fields() {
    let Some(fpm) = fpm() else { return };
    let dir = tempfile::Builder::new()
        .prefix("apm-agent-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = FakeAgent::start(dir.path()).unwrap();
    let pool = pool(&fpm, agent.php_env(), 3);
    let total = 300;
    let outcomes = php::drive(pool.socket(), 200.0, total, 6, |i| {
        FcgiRequest::get(&php::demo_mix(i).0)
    });
    let profiles = collect(&agent, total as usize);
    let workers: HashSet<u64> = pool.worker_pids().into_iter().map(u64::from).collect();
    let info = php::fcgi_request(
        pool.socket(),
        &FcgiRequest::get("/info"),
        Duration::from_secs(10),
    )
    .unwrap();
    let info: Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(
        info["sockets"], true,
        "the default pool has the sockets extension: {info}"
    );
    collect(&agent, 1);
    assert_eq!(workers.len(), 3, "worker pids: {workers:?}");

    let mut by_uri: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for p in &profiles {
        by_uri
            .entry(p["uri"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(p);
    }
    let ids: HashSet<&str> = profiles.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(ids.len(), profiles.len(), "ids are unique");
    assert_eq!(profiles.len(), total as usize, "one profile per request");

    for o in &outcomes {
        let (uri, status) = php::demo_mix(o.index);
        let r = o
            .response
            .as_ref()
            .unwrap_or_else(|e| panic!("{uri}: {e}\n{}", pool.logs()));
        assert_eq!(r.status, status, "{uri}: response status");
        let ps = by_uri.get(&uri).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(ps.len(), 1, "{uri}: profiles received");
        let p = ps[0];
        assert_eq!(p["v"], 1, "{uri}");
        assert_eq!(p["status"], status, "{uri}: profile status");
        assert_eq!(p["method"], "GET", "{uri}");
        assert_eq!(p["host"], "demo.test", "{uri}");
        assert_eq!(p["sapi"], "fpm-fcgi", "{uri}");
        assert_eq!(
            p["script"],
            php::demo_index().display().to_string(),
            "{uri}"
        );
        let pid = p["pid"].as_u64().unwrap();
        assert!(workers.contains(&pid), "{uri}: pid {pid} is a pool worker");
        let wall = p["wall_us"].as_u64().unwrap();
        let cpu = p["cpu_user_us"].as_u64().unwrap() + p["cpu_sys_us"].as_u64().unwrap();
        assert!(
            cpu <= wall + 10_000,
            "{uri}: cpu {cpu} µs within wall {wall} µs"
        );
        assert!(p["mem_peak_bytes"].as_u64().unwrap() > 100_000, "{uri}");
        if uri.starts_with("/sleep") {
            assert!(
                wall >= 20_000,
                "{uri}: wall_us {wall} covers the 20 ms sleep"
            );
        }
        if uri.starts_with("/work") {
            assert!(
                wall >= 2_000,
                "{uri}: wall_us {wall} covers the 2 ms of work"
            );
        }
        if uri.starts_with("/error") {
            let msg = p["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains("demo error"), "{uri}: error field: {p}");
        } else {
            assert!(p.get("error").is_none(), "{uri}: no error field: {p}");
        }
        // The body is still in PHP's output buffer (output_buffering=4096 in php.ini) or has a
        // Content-Length: either way the profile knows its size.
        let expected_bytes = r.body.len() as u64;
        assert_eq!(
            p["response_bytes"].as_u64(),
            Some(expected_bytes),
            "{uri}: response_bytes"
        );
        if uri.starts_with("/echo") {
            assert_eq!(r.body, format!("{}\n", o.index).into_bytes(), "{uri}: body");
        }
        if uri.starts_with("/pad") {
            assert_eq!(p["tags"]["pad"].as_str().map(str::len), Some(100_000));
        }
    }
    assert_eq!(agent.torn_connections(), 0);
    let errors = pool.php_errors();
    assert!(
        !errors.contains("listener.php"),
        "the listener logged nothing:\n{errors}"
    );
}

#[test]
fn fpm_agent_down_costs_requests_nothing() {
    let Some(fpm) = fpm() else { return };
    let dir = tempfile::Builder::new()
        .prefix("apm-none-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path().display();
    let env = vec![
        ("APM_SOCKET".into(), format!("{d}/missing.sock")),
        (
            "APM_STREAM_SOCKET".into(),
            format!("{d}/missing-stream.sock"),
        ),
        ("APM_RUNTIME_DIR".into(), d.to_string()),
    ];
    let pool = pool(&fpm, env, 2);
    let outcomes = php::drive(pool.socket(), 300.0, 300, 4, |i| {
        FcgiRequest::get(&php::demo_mix(i).0)
    });
    for o in &outcomes {
        let (uri, status) = php::demo_mix(o.index);
        let r = o.response.as_ref().expect("response");
        assert_eq!(r.status, status, "{uri}");
        if uri.starts_with("/echo") {
            assert_eq!(r.body, format!("{}\n", o.index).into_bytes(), "{uri}: body");
        }
        assert!(r.stderr.is_empty(), "{uri}: FastCGI stderr is empty");
    }
    let errors = pool.php_errors();
    assert!(
        !errors.contains("listener.php"),
        "the listener logged nothing:\n{errors}"
    );
}

#[test]
fn fpm_kill_switch_and_sample_rate_are_honoured() {
    let Some(fpm) = fpm() else { return };
    let dir = tempfile::Builder::new()
        .prefix("apm-ctl-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = FakeAgent::start(dir.path()).unwrap();
    let pool = pool(&fpm, agent.php_env(), 2);
    let run = |n: u64| {
        let out = php::drive(pool.socket(), 500.0, n, 4, |i| {
            FcgiRequest::get(&format!("/echo?id={i}"))
        });
        assert!(
            out.iter()
                .all(|o| o.response.as_ref().is_ok_and(|r| r.status == 200))
        );
        collect(&agent, n as usize).len()
    };

    std::fs::write(dir.path().join("disabled"), "paused\n").unwrap();
    assert_eq!(run(50), 0, "kill switch up: no profile");
    std::fs::remove_file(dir.path().join("disabled")).unwrap();
    assert_eq!(run(50), 50, "kill switch down: every profile");
    std::fs::write(dir.path().join("sample-rate"), "0.0000\n").unwrap();
    assert_eq!(run(50), 0, "sample rate 0");
    std::fs::write(dir.path().join("sample-rate"), "0.5000\n").unwrap();
    let k = run(200);
    // Binomial(200, 0.5): mean 100, sd 7.1; [64, 136] is beyond 5 sd.
    assert!((64..=136).contains(&k), "{k} of 200 profiled at rate 0.5");
    std::fs::write(dir.path().join("sample-rate"), "1.0000\n").unwrap();
    assert_eq!(run(50), 50, "sample rate 1");
}

/// A stalled agent (listening, never reading) and a 1 MiB profile, larger than the socket
/// buffer: the listener waits APM_STREAM_WAIT_MS (700 ms here) before dropping it. With
/// APM_FINISH_REQUEST=1, and by default, the client has its response before that wait; with 0,
/// after it. The documented cost of the default: output from a destructor is lost.
#[test]
fn fpm_finish_request_answers_the_client_before_the_send() {
    let Some(fpm) = fpm() else { return };
    let dir = tempfile::Builder::new()
        .prefix("apm-stall-")
        .tempdir_in("/tmp")
        .unwrap();
    let stream = dir.path().join("listener-stream.sock");
    let _stalled = UnixListener::bind(&stream).unwrap();
    for finish in [Some("0"), Some("1"), None] {
        let mut env = vec![
            ("APM_STREAM_SOCKET".into(), stream.display().to_string()),
            ("APM_RUNTIME_DIR".into(), dir.path().display().to_string()),
            ("APM_MAX_PAYLOAD".into(), (4 << 20).to_string()),
            ("APM_STREAM_WAIT_MS".into(), "700".into()),
        ];
        if let Some(f) = finish {
            env.push(("APM_FINISH_REQUEST".into(), f.into()));
        }
        let pool = pool(&fpm, env, 1);
        let t = Instant::now();
        let r = php::fcgi_request(
            pool.socket(),
            &FcgiRequest::get("/pad?bytes=1000000"),
            Duration::from_secs(10),
        )
        .unwrap();
        let latency = t.elapsed();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"padded 1000000\n");
        let destruct = php::fcgi_request(
            pool.socket(),
            &FcgiRequest::get("/destruct"),
            Duration::from_secs(10),
        )
        .unwrap();
        if finish == Some("0") {
            assert!(
                latency >= Duration::from_millis(650),
                "APM_FINISH_REQUEST=0: the client waits for the send: {latency:?}"
            );
            assert_eq!(
                destruct.body, b"body\ndestructor\n",
                "APM_FINISH_REQUEST=0: a destructor's output reaches the client"
            );
        } else {
            assert!(
                latency < Duration::from_millis(400),
                "APM_FINISH_REQUEST={finish:?}: the client does not wait: {latency:?}"
            );
            assert_eq!(
                destruct.body, b"body\n",
                "APM_FINISH_REQUEST={finish:?}: a destructor's output is discarded (documented)"
            );
        }
    }
}

/// php-fpm started with `-n`: no php.ini, so no sockets extension; the streams fallback sends.
#[test]
fn fpm_streams_fallback_without_the_sockets_extension() {
    let Some(fpm) = fpm() else { return };
    let dir = tempfile::Builder::new()
        .prefix("apm-nosock-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = FakeAgent::start(dir.path()).unwrap();
    let pool = FpmPool::start(
        &fpm,
        &FpmConfig {
            workers: 2,
            env: agent.php_env(),
            no_php_ini: true,
            ..FpmConfig::default()
        },
    )
    .unwrap();
    let probe = php::fcgi_request(
        pool.socket(),
        &FcgiRequest::get("/info"),
        Duration::from_secs(10),
    )
    .unwrap();
    let info: Value = serde_json::from_slice(&probe.body).unwrap();
    assert_eq!(
        info["sockets"], false,
        "no sockets extension under -n: {info}"
    );
    let n = 40;
    let out = php::drive(pool.socket(), 200.0, n, 4, |i| {
        FcgiRequest::get(&format!(
            "/pad?bytes={}&i={i}",
            if i % 2 == 0 { 10 } else { 100_000 }
        ))
    });
    assert!(
        out.iter()
            .all(|o| o.response.as_ref().is_ok_and(|r| r.status == 200))
    );
    let profiles = collect(&agent, n as usize + 1);
    assert_eq!(
        profiles.len(),
        n as usize + 1,
        "every profile, datagram or frame"
    );
    let uris: HashSet<&str> = profiles.iter().filter_map(|p| p["uri"].as_str()).collect();
    assert_eq!(uris.len(), n as usize + 1);
    assert!(!pool.php_errors().contains("listener.php"));
}
