//! The Debian package that `cargo xtask dist` builds, installed for real on this machine:
//! `lintian`, `dpkg -i`, the installed `apm-agent check-config` and a short `apm-agent run`
//! against the installed paths (profiles delivered to the installed `apm-listener`), then
//! `dpkg --purge`, after which nothing of it is left. Needs root, dpkg and lintian; in CI a
//! missing one fails the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use apm_tests::common::{Proc, bin_dir, in_ci, sender, sender_report, status_at, u};

const PACKAGE: &str = "bitville-apm-agent";
const CONFIG: &str = "/etc/bitville-apm/agent.toml";
const START_LOG: &str = "/var/log/bitville-apm/agent.log";

/// Everything the package or the agent it runs may create; none may exist before or after.
const FOOTPRINT: &[&str] = &[
    "/usr/bin/apm-agent",
    "/usr/bin/apm-listener",
    "/etc/bitville-apm",
    "/usr/share/bitville-apm",
    "/usr/share/doc/bitville-apm-agent",
    "/usr/share/man/man1/apm-agent.1.gz",
    "/usr/share/bash-completion/completions/apm-agent",
    "/usr/lib/systemd/system/bitville-apm-agent.service",
    "/etc/systemd/system/multi-user.target.wants/bitville-apm-agent.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/bitville-apm-agent.service.dsh-also",
    "/var/lib/bitville-apm",
    "/run/bitville-apm",
    "/var/log/bitville-apm",
    "/etc/logrotate.d/bitville-apm-agent",
];

const LOGROTATE: &str = "/etc/logrotate.d/bitville-apm-agent";

fn skip_or_fail(why: &str) {
    assert!(!in_ci(), "{why}");
    println!("SKIP (not CI): {why}");
}

fn out(cmd: &mut Command) -> (bool, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn ok(cmd: &mut Command) -> String {
    let (good, text) = out(cmd);
    assert!(good, "{cmd:?} failed:\n{text}");
    text
}

fn installed() -> bool {
    out(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]))
        .1
        .contains("install ok installed")
}

fn group_exists(name: &str) -> bool {
    out(Command::new("getent").args(["group", name])).0
}

fn deb() -> PathBuf {
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    bin_dir().parent().unwrap().join(format!(
        "dist/{PACKAGE}_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    ))
}

/// Purges the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        }
    }
}

/// The installed `apm-listener`, on a free port.
fn installed_listener(dir: &Path) -> (Proc, String) {
    let mut child = Command::new("/usr/bin/apm-listener")
        .args(["--listen", "127.0.0.1:0", "--out"])
        .arg(dir.join("profiles.jsonl"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the installed apm-listener");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.find("listening on ")
                .map(|i| l[i + 13..].split_whitespace().next().unwrap().to_string())
        })
        .expect("the installed apm-listener did not start");
    std::thread::spawn(move || for _ in lines {});
    let proc = Proc {
        child,
        name: "apm-listener".into(),
    };
    (proc, addr)
}

fn metrics(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn debian_package_installs_runs_and_purges() {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail("installing a package needs root (CI runs the tests as root)");
    }
    for tool in ["dpkg", "lintian", "logrotate"] {
        if !out(Command::new("sh").args(["-c", &format!("command -v {tool}")])).0 {
            return skip_or_fail(&format!(
                "{tool} not found: `cargo xtask setup` installs it"
            ));
        }
    }
    let deb = deb();
    if !deb.is_file() {
        return skip_or_fail(&format!(
            "{} not found: `cargo xtask dist` builds it (`cargo xtask test` does too)",
            deb.display()
        ));
    }
    // Never touch an install that is not ours.
    let taken: Vec<&&str> = FOOTPRINT.iter().filter(|p| Path::new(p).exists()).collect();
    if installed() || !taken.is_empty() || group_exists("bitville-apm") {
        return skip_or_fail(&format!(
            "{PACKAGE} (or its files {taken:?}, or the bitville-apm group) is already on this \
             machine: the test would remove it"
        ));
    }

    // lintian: no errors (warnings are printed, not fatal).
    let (clean, report) = out(Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb));
    println!("lintian:\n{report}");
    assert!(clean, "lintian reports errors:\n{report}");

    let _guard = Installed;
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    // What the package put where.
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(conffiles.contains(CONFIG), "conffiles: {conffiles}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    assert_eq!(
        std::fs::read(CONFIG).unwrap(),
        std::fs::read(root.join("deploy/agent.toml")).unwrap()
    );
    assert_eq!(
        std::fs::read("/usr/share/bitville-apm/listener.php").unwrap(),
        std::fs::read(root.join("php/listener.php")).unwrap()
    );
    for p in [
        "/usr/lib/systemd/system/bitville-apm-agent.service",
        "/usr/share/man/man1/apm-agent.1.gz",
        "/usr/share/man/man1/apm-agent-run.1.gz",
        "/usr/share/man/man1/apm-listener.1.gz",
        "/usr/share/bash-completion/completions/apm-agent",
        "/usr/share/zsh/vendor-completions/_apm-agent",
        "/usr/share/fish/vendor_completions.d/apm-agent.fish",
        "/usr/share/doc/bitville-apm-agent/copyright",
        "/usr/share/doc/bitville-apm-agent/changelog.gz",
    ] {
        assert!(Path::new(p).is_file(), "{p} missing");
    }
    // The maintainer scripts: the socket group, the state directory, the unit enabled.
    assert!(
        group_exists("bitville-apm"),
        "postinst creates the socket group"
    );
    let state = std::fs::metadata("/var/lib/bitville-apm").unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o750);
    assert!(
        std::fs::symlink_metadata(
            "/etc/systemd/system/multi-user.target.wants/bitville-apm-agent.service"
        )
        .is_ok(),
        "postinst enables the unit (deb-systemd-helper)"
    );
    // `apm-agent start`'s log (operators issue 5): its directory, and a logrotate file
    // (a conffile) that logrotate accepts and that rotates the log for real (copytruncate).
    assert!(conffiles.contains(LOGROTATE), "conffiles: {conffiles}");
    let logdir = std::fs::metadata("/var/log/bitville-apm").unwrap();
    assert_eq!(logdir.permissions().mode() & 0o777, 0o750);
    let rotate_state = tempfile::tempdir().unwrap();
    let state_file = rotate_state.path().join("status");
    ok(Command::new("logrotate")
        .arg("-d")
        .arg("-s")
        .arg(&state_file)
        .arg(LOGROTATE));
    std::fs::write(START_LOG, "a line before the rotation\n").unwrap();
    ok(Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(&state_file)
        .arg(LOGROTATE));
    assert_eq!(
        std::fs::read_to_string(format!("{START_LOG}.1")).unwrap(),
        "a line before the rotation\n"
    );
    assert_eq!(
        std::fs::metadata(START_LOG).unwrap().len(),
        0,
        "copytruncate"
    );

    // The installed binaries, against the installed configuration.
    let check = ok(Command::new("/usr/bin/apm-agent").args(["--config", CONFIG, "check-config"]));
    assert!(check.contains("[spool]"), "{check}");
    let work = tempfile::tempdir().unwrap();
    let (_listener, addr) = installed_listener(work.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(work.path().join("agent.log")).unwrap();
    let mut agent = Proc {
        child: Command::new("/usr/bin/apm-agent")
            .args(["--config", CONFIG, "run"])
            .env("APM_CENTRAL_ENDPOINT", format!("http://{addr}"))
            .env("APM_CONTROL_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            // docs/install.md: the sockets restricted to the package's group.
            .env("APM_INGEST_SOCKET_GROUP", "bitville-apm")
            .env("APM_INGEST_SOCKET_MODE", "0660")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        name: "apm-agent".into(),
    };
    let agent_log = || std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default();
    let control = Path::new("/run/bitville-apm/control.sock");
    let mut waited = 0;
    while status_at(control).is_none() {
        assert!(
            waited < 300,
            "the installed agent is not ready:\n{}",
            agent_log()
        );
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the installed agent exited:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let sock = std::fs::metadata("/run/bitville-apm/listener.sock").unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o660);
    let gid = nix::unistd::Group::from_name("bitville-apm")
        .unwrap()
        .unwrap()
        .gid;
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&sock), gid.as_raw());
    let r = sender_report(sender(&[
        "--socket".into(),
        "/run/bitville-apm/listener.sock".into(),
        "--count".into(),
        "25".into(),
        "--prefix".into(),
        "pkg".into(),
    ]));
    assert_eq!(r["sent"].as_u64(), Some(25));
    let mut delivered = 0;
    for _ in 0..200 {
        delivered = status_at(control).map_or(0, |s| u(&s, "/delivered"));
        if delivered == 25 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(delivered, 25, "{}", agent_log());
    let stored = std::fs::read_to_string(work.path().join("profiles.jsonl")).unwrap();
    assert_eq!(stored.lines().count(), 25);
    // docs/install.md's checks, as written there (but the metrics port is a free one).
    let status = ok(Command::new("/usr/bin/apm-agent").args(["--config", CONFIG, "status"]));
    assert!(!status.is_empty());
    let json =
        ok(Command::new("/usr/bin/apm-agent").args(["--config", CONFIG, "status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(u(&json, "/delivered"), 25);
    assert_eq!(json["ebpf"]["state"], "running", "{json}");
    let curl = format!(
        "curl -s http://127.0.0.1:{port}/metrics | grep -E '^apm_(build_info|delivered_total|ebpf_up)'"
    );
    if out(Command::new("sh").args(["-c", "command -v curl"])).0 {
        let lines = ok(Command::new("sh").args(["-c", &curl]));
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(lines.contains("apm_delivered_total 25"), "{lines}");
    } else {
        println!("curl not installed: `{curl}` not run");
    }
    let scrape = metrics(port);
    assert!(
        scrape.contains(&format!(
            "apm_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{scrape}"
    );
    assert!(
        scrape.contains("apm_ebpf_up 1"),
        "the packaged agent carries its eBPF programs:\n{scrape}\n{}",
        agent_log()
    );
    assert_eq!(
        agent.stop(Duration::from_secs(30)),
        apm_testkit::Exit::Code(0),
        "{}",
        agent_log()
    );

    // docs/upgrade.md: installing over an installed package keeps a local edit of the conffile
    // and the agent's state (its id, so the listener's dedup key stays the same).
    let agent_id = std::fs::read_to_string("/var/lib/bitville-apm/agent_id").unwrap();
    let mut edited = std::fs::read_to_string(CONFIG).unwrap();
    edited.push_str("# edited on this host\n");
    std::fs::write(CONFIG, &edited).unwrap();
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string("/var/lib/bitville-apm/agent_id").unwrap(),
        agent_id
    );

    // Purge leaves nothing behind: files, state, runtime directory, enablement, group.
    ok(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert!(!installed());
    let left: Vec<&&str> = FOOTPRINT.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!group_exists("bitville-apm"), "the socket group is left");
}
