//! What an operator's tools read: `/metrics` against docs/metrics.md and the Prometheus
//! conventions, the alert rules through promtool (syntax and unit tests), and every query of the
//! Grafana dashboard and of the alert rules against a live scrape of the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use apm_tests::common::{Agent, Listener, in_ci, sender, sender_report, u};

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One scrape, parsed: family name → type (from `# TYPE`), and every sample line.
struct Scrape {
    text: String,
    families: BTreeMap<String, String>,
    samples: Vec<(String, String, f64)>,
    ebpf_running: bool,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut families = BTreeMap::new();
        let mut samples = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line");
                families.insert(name.to_string(), ty.to_string());
            } else if !l.starts_with('#') && !l.is_empty() {
                let end = l.find(['{', ' ']).expect("sample line");
                let name = &l[..end];
                let (labels, value) = match l[end..].strip_prefix('{') {
                    Some(r) => r.split_once("} ").expect("labels"),
                    None => ("", l[end..].trim()),
                };
                let v = value.split(' ').next().unwrap().parse().unwrap_or(f64::NAN);
                samples.push((name.to_string(), labels.to_string(), v));
            }
        }
        let ebpf_running = samples
            .iter()
            .any(|(n, _, v)| n == "apm_ebpf_up" && *v == 1.0);
        Self {
            text,
            families,
            samples,
            ebpf_running,
        }
    }

    /// The name a query uses for each family (`_total` for counters), with its type.
    fn query_names(&self) -> BTreeMap<String, String> {
        self.families
            .iter()
            .map(|(f, ty)| {
                let q = match ty.as_str() {
                    "counter" => format!("{f}_total"),
                    "info" => format!("{f}_info"),
                    _ => f.clone(),
                };
                (q, ty.clone())
            })
            .collect()
    }

    /// Every series name a query may use: the query names plus histogram `_bucket/_sum/_count`,
    /// whether or not the family has samples right now (a pool metric with no PHP running).
    fn series_names(&self) -> BTreeSet<String> {
        let mut s = BTreeSet::new();
        for (q, ty) in self.query_names() {
            if ty == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    s.insert(format!("{q}{suffix}"));
                }
            }
            s.insert(q);
        }
        s.extend(self.samples.iter().map(|(n, _, _)| n.clone()));
        s
    }

    fn value(&self, name: &str, labels: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_string()
}

/// Starts a listener and an agent (eBPF `on` as root, so a monitor that cannot load fails the
/// test; `auto` otherwise, outside CI only), sends profiles, and scrapes `/metrics` once they
/// are delivered. Returns the agent too, so its status can be compared.
fn live_scrape(dir: &Path) -> (Scrape, serde_json::Value, Listener, Agent) {
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root || !in_ci(),
        "CI runs the tests as root: eBPF must be tested for real"
    );
    let ebpf = if root { "on" } else { "auto" };
    let listener = Listener::start(dir, &[]);
    let port = free_port();
    let agent = Agent::start(
        dir,
        &listener.endpoint(),
        ebpf,
        &format!("[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let r = sender_report(sender(&[
        "--socket".into(),
        agent.socket().display().to_string(),
        "--count".into(),
        "40".into(),
        "--prefix".into(),
        "obs".into(),
    ]));
    assert_eq!(r["sent"].as_u64(), Some(40));
    let status = agent.wait_for(Duration::from_secs(20), "delivered", |s| {
        u(s, "/delivered") == 40
    });
    let scrape = Scrape::parse(http_get(port, "/metrics"));
    if !scrape.ebpf_running {
        println!(
            "SKIP (not root, not CI): eBPF is not running, so apm_ebpf_* metrics beyond \
             apm_ebpf_up/apm_ebpf_state are not checked"
        );
    }
    (scrape, status, listener, agent)
}

/// docs/metrics.md's tables: metric → (type, opt-in).
fn documented() -> BTreeMap<String, (String, bool)> {
    let text = std::fs::read_to_string(root_dir().join("docs/metrics.md")).unwrap();
    let mut m = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let prev = m.insert(name.clone(), (cells[2].to_string(), l.contains("*opt-in*")));
        assert!(prev.is_none(), "{name} documented twice");
    }
    m
}

/// Names an absent-from-this-scrape check may forgive: eBPF series when eBPF could not run
/// (outside CI only; `live_scrape` requires it in CI).
fn forgiven(scrape: &Scrape, name: &str) -> bool {
    !scrape.ebpf_running
        && name.starts_with("apm_ebpf_")
        && !["apm_ebpf_up", "apm_ebpf_state"].contains(&name)
}

#[test]
fn metrics_match_docs_and_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let (scrape, status, _listener, _agent) = live_scrape(dir.path());
    let scraped = scrape.query_names();
    let docs = documented();

    let undocumented: Vec<&String> = scraped.keys().filter(|n| !docs.contains_key(*n)).collect();
    assert!(
        undocumented.is_empty(),
        "scraped but not in docs/metrics.md: {undocumented:?}\n{}",
        scrape.text
    );
    let absent: Vec<&String> = docs
        .iter()
        .filter(|(n, (_, opt_in))| !opt_in && !scraped.contains_key(*n) && !forgiven(&scrape, n))
        .map(|(n, _)| n)
        .collect();
    assert!(
        absent.is_empty(),
        "in docs/metrics.md but not scraped: {absent:?}\n{}",
        scrape.text
    );
    for (name, ty) in &scraped {
        assert_eq!(&docs[name].0, ty, "type of {name} in docs/metrics.md");
    }

    // Base units, counters named `_total`, no per-process series by default.
    for f in scrape.families.keys() {
        for bad in [
            "_ns",
            "_us",
            "_ms",
            "_milliseconds",
            "_microseconds",
            "_kb",
            "_mb",
        ] {
            assert!(!f.ends_with(bad), "{f} is not in base units");
        }
    }
    for (name, labels, _) in &scrape.samples {
        assert!(
            !labels.split(',').any(|l| l.starts_with("pid=")),
            "{name}{{{labels}}}: a pid label by default churns series"
        );
    }
    // One series per breaker state, 1 for the current one; it agrees with status.
    let states = ["closed", "open", "half_open"];
    let sum: f64 = states
        .iter()
        .map(|s| {
            scrape
                .value("apm_breaker_state", &format!("state=\"{s}\""))
                .unwrap_or_else(|| panic!("apm_breaker_state{{state=\"{s}\"}} missing"))
        })
        .sum();
    assert_eq!(sum, 1.0);
    let current = status["breaker"].as_str().unwrap();
    assert_eq!(
        scrape.value("apm_breaker_state", &format!("state=\"{current}\"")),
        Some(1.0)
    );
    let version = status["version"].as_str().unwrap();
    assert_eq!(
        scrape.value("apm_build_info", &format!("version=\"{version}\"")),
        Some(1.0)
    );
    // The sample rate is there with or without eBPF; the counters agree with status.
    assert_eq!(
        scrape.value("apm_sample_rate", ""),
        status["sample_rate"].as_f64()
    );
    assert_eq!(
        scrape.value("apm_unprofiled_requests_estimate_total", ""),
        status["unprofiled_requests_estimate"].as_f64()
    );
    assert_eq!(scrape.value("apm_delivered_total", ""), Some(40.0));
    assert_eq!(
        scrape.value("apm_ack_latency_seconds_count", ""),
        Some(u(&status, "/delivered_batches") as f64)
    );
    assert_eq!(scrape.value("apm_batch_profiles_sum", ""), Some(40.0));
    // The one RSS metric of the agent is within 10% of what /proc says about it.
    let rss = scrape.value("process_resident_memory_bytes", "").unwrap();
    let pid = u(&status, "/pid");
    let proc_rss = apm_agent::monitor::procfs::vm_rss(pid as u32).unwrap() as f64;
    assert!(
        (rss - proc_rss).abs() < proc_rss / 10.0,
        "process_resident_memory_bytes {rss} vs VmRSS {proc_rss}"
    );
    assert!(scrape.value("process_open_fds", "").unwrap() > 5.0);
}

/// `promtool` or, outside CI, `None` after saying why.
fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if found {
        return Some(PathBuf::from("promtool"));
    }
    assert!(
        !in_ci(),
        "promtool not found: `cargo xtask setup` installs Debian's prometheus package"
    );
    println!("SKIP (not CI): promtool not found; `cargo xtask setup` installs it");
    None
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let dir = root_dir().join("deploy/prometheus");
    let out =
        run_ok(
            Command::new(&promtool)
                .current_dir(&dir)
                .args(["check", "rules", "alerts.yml"]),
        );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(Command::new(&promtool).current_dir(&dir).args([
        "test",
        "rules",
        "alerts_test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has test cases (promtool itself does not require any).
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "alert {a} has no case in alerts_test.yml"
        );
    }
}

/// Every `apm_*`/`process_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            cur.push(c);
        } else {
            if cur.starts_with("apm_") || cur.starts_with("process_") {
                names.push(cur.clone());
            }
            cur.clear();
        }
    }
    names
}

/// Every `expr` of the dashboard's panels, and the queries of its template variables.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) if s.contains("apm_") => {
                            out.push(s.clone());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text =
        std::fs::read_to_string(root_dir().join("deploy/grafana/bitville-apm.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dash, &mut out);
    out
}

/// The expressions of alerts.yml (single-line and `|` blocks).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(root_dir().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(e) = l.trim().strip_prefix("expr:") else {
            continue;
        };
        let e = e.trim();
        if e == "|" {
            let mut block = String::new();
            while let Some(n) = lines.next_if(|n| n.starts_with("          ")) {
                block.push_str(n.trim());
                block.push('\n');
            }
            out.push(block);
        } else {
            out.push(e.to_string());
        }
    }
    out
}

#[test]
fn dashboard_and_alert_queries_resolve() {
    let dashboard = dashboard_queries();
    assert!(dashboard.len() >= 20, "{dashboard:?}");
    let alerts = alert_exprs();
    assert!(alerts.len() >= 7, "{alerts:?}");

    // Each query parses as PromQL (Grafana's variables replaced by what they expand to).
    if let Some(promtool) = promtool() {
        let dir = tempfile::tempdir().unwrap();
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, q) in dashboard.iter().enumerate() {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            if q.starts_with("label_values(") {
                continue;
            }
            rules.push_str(&format!(
                "      - record: dashboard_query_{i}\n        expr: {}\n",
                serde_json::to_string(&q).unwrap()
            ));
        }
        std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
        run_ok(Command::new(&promtool).current_dir(dir.path()).args([
            "check",
            "rules",
            "dashboard.yml",
        ]));
    }

    let tmp = tempfile::tempdir().unwrap();
    let (scrape, _, _listener, _agent) = live_scrape(tmp.path());
    let have = scrape.series_names();
    let mut missing = Vec::new();
    for (origin, q) in dashboard
        .iter()
        .map(|q| ("dashboard", q))
        .chain(alerts.iter().map(|q| ("alerts.yml", q)))
    {
        let names = metric_names(q);
        assert!(
            !names.is_empty() || q.contains("up{job="),
            "{origin}: `{q}` names no agent metric"
        );
        for n in names {
            if !have.contains(&n) && !forgiven(&scrape, &n) {
                missing.push(format!("{origin}: {n} in `{q}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics not in a live scrape:\n{}\n\n{}",
        missing.join("\n"),
        scrape.text
    );
}

/// An agent that may not load eBPF (here: run as `nobody`) runs without it and says why, in
/// status and in `/metrics` (what the ApmEbpfDown alert and docs/troubleshooting.md rely on).
#[test]
fn ebpf_degraded_is_reported_in_status_and_metrics() {
    if !nix::unistd::geteuid().is_root() {
        assert!(!in_ci(), "CI runs the tests as root");
        println!("SKIP (not root, not CI): needs root to start the agent as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `nobody` must reach the binary (the checkout may be private) and own the directories it
    // writes (the agent refuses directories every user may write).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("apm-agent");
    std::fs::copy(apm_tests::common::bin("apm-agent"), &exe).unwrap();
    let listener = Listener::start(dir.path(), &[]);
    let port = free_port();
    let config = Agent::write_config(
        dir.path(),
        &listener.endpoint(),
        "auto",
        &format!("[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    for d in ["run", "state", "spool"] {
        let p = dir.path().join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux)");
    let _agent = apm_tests::common::Proc {
        child,
        name: "apm-agent (nobody)".into(),
    };
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let control = dir.path().join("run/control.sock");
    let mut status = None;
    for _ in 0..300 {
        status = apm_tests::common::status_at(&control);
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.unwrap_or_else(|| panic!("the agent is not ready:\n{}", log()));
    assert_eq!(status["ebpf"]["state"], "degraded", "{status}");
    let reason = status["ebpf"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("root"),
        "the reason says what is missing: {reason}"
    );
    let scrape = Scrape::parse(http_get(port, "/metrics"));
    assert_eq!(scrape.value("apm_ebpf_up", ""), Some(0.0));
    assert_eq!(
        scrape.value("apm_ebpf_state", "state=\"degraded\""),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("apm_ebpf_state", "state=\"running\""),
        Some(0.0)
    );
    // Without eBPF the sample rate is still exported.
    assert_eq!(scrape.value("apm_sample_rate", ""), Some(1.0));
}
