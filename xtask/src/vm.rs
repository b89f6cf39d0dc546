//! The VM tier of `cargo xtask test`: the privileged eBPF ground-truth tests run inside Debian's
//! own kernels (Debian 12's 6.1 and 6.12, Debian 11's 5.10) booted under qemu, against the test
//! binaries and release binaries built on the host.
//!
//! - qemu, kmod (depmod) and busybox-static come from Debian; virtme-ng (PyPI) from a venv under
//!   `target/vm/venv`: it boots a kernel image with the host's root filesystem shared read-only
//!   over 9p, so the guest runs the host's php-fpm and the host-built binaries as they are.
//! - Kernel packages are fetched with `apt-get download`, unpacked with `dpkg-deb -x` and kept
//!   under `target/vm/kernels/<version>`; their modules (virtio, 9p and overlay are modules in
//!   Debian's kernels) are linked from `/lib/modules/<version>`, where virtme-ng looks.
//! - In the guest a script mounts a fresh tmpfs on /tmp (a Unix socket cannot be bound on the
//!   9p root), runs each test binary and writes its output and exit status into a host folder
//!   shared writable (`--rwdir`); the host reads the results from there, not from the console.
//! - KVM is used where it runs a guest (probed once per host kernel, the answer cached in
//!   `target/vm`); elsewhere TCG. The run says which.
//! - `APM_TEST_SCALE` scales the send counts and request rates of the tests in the guest (TCG
//!   is several times slower than the host); the assertions stay the same.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::vm_powerloss;

/// What the VM tier installs from Debian, and why.
pub const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "boots the kernels of the VM test tier"),
    (
        "kmod",
        "depmod for the kernels' modules (virtme-ng loads virtio/9p from them)",
    ),
    ("busybox-static", "virtme-ng's initramfs"),
];

/// virtme-ng from PyPI, the version verified here (`shared/notes/kernel-matrix.md`).
const VIRTME_NG: &str = "virtme-ng==1.42";

/// A Debian kernel series: the newest package whose name matches `pattern` (an `apt-cache
/// search` regex) is used, from the system's apt sources or, with `suite`, from that suite of
/// the same archive through a private apt state.
pub struct Series {
    pub name: &'static str,
    suite: Option<&'static str>,
    pattern: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        suite: None,
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    Series {
        name: "6.12",
        suite: None,
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    },
    Series {
        name: "5.10",
        suite: Some("bullseye"),
        pattern: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
    },
];

/// The series `cargo xtask test` boots by default.
pub const DEFAULT_SERIES: &[&str] = &["6.1", "6.12", "5.10"];

/// Test binaries (integration test targets of `apm-tests`) run in the guest, with the exact test
/// names to run (empty: all of them).
const GUEST_TESTS: &[(&str, &[&str])] = &[
    ("ebpf_sends", &[]),
    ("ebpf_php", &[]),
    ("ebpf_rss", &[]),
    ("ebpf_maps", &[]),
    ("ebpf_exec", &[]),
    ("ebpf_stream", &[]),
    (
        "php_fpm_e2e",
        &["php_fpm_profiles_arrive_once_and_match_kernel_counts_per_worker"],
    ),
];

/// Longest a guest may take (boot, tests, power-off) before it is killed: about 70 s is usual
/// under TCG here, and three of them must stay within the tier's 15 minutes.
const GUEST_TIMEOUT: Duration = Duration::from_mins(5);

#[derive(clap::Args, Clone)]
pub struct VmArgs {
    /// Kernel series to boot (repeatable): 6.1, 6.12, 5.10. Default: all three.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// `tcg`, `kvm`, or `auto` (KVM where it was seen to run a guest, else TCG).
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Send counts and request rates in the guest are the host's times this.
    #[arg(long, default_value_t = 0.1)]
    pub scale: f64,
    /// Only test names containing this (repeatable); default: every test of the tier.
    /// `--only powerloss` boots the power-loss scenario alone (`vm_powerloss.rs`).
    #[arg(long = "only", value_name = "NAME")]
    pub only: Vec<String>,
}

impl Default for VmArgs {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            accel: "auto".into(),
            scale: 0.1,
            only: Vec::new(),
        }
    }
}

fn vm_dir(root: &Path) -> PathBuf {
    crate::target_dir(root).join("vm")
}

pub(crate) fn say(msg: impl AsRef<str>) {
    eprintln!("vm: {}", msg.as_ref());
}

/// Installs what the tier needs, builds the test binaries, boots each kernel, runs the tests
/// in it, prints the kernel × test table. Fails when any test failed or did not run.
pub fn run(root: &Path, obj: &Path, args: &VmArgs) -> Result<()> {
    let started = Instant::now();
    let dir = vm_dir(root);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::setup::packages(VM_PACKAGES)?;
    let vng_bin = ensure_virtme_ng(&dir)?;
    let names: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_SERIES.iter().map(ToString::to_string).collect()
    } else {
        args.kernels.clone()
    };
    let mut kernels = Vec::new();
    for n in &names {
        let s = SERIES
            .iter()
            .find(|s| s.name == n)
            .with_context(|| format!("unknown kernel series {n} (known: 6.1, 6.12, 5.10)"))?;
        kernels.push(ensure_kernel(&dir, s)?);
    }
    // `--only powerloss` boots the power-loss scenario alone (vm_powerloss.rs).
    let plain = !vm_powerloss::alone(&args.only);
    let bins = if plain {
        build_test_binaries(root, obj)?
    } else {
        Vec::new()
    };
    let accel = choose_accel(&dir, &vng_bin, &kernels[0], &args.accel)?;

    let mut table: BTreeMap<String, BTreeMap<String, Outcome>> = BTreeMap::new();
    let mut timings = Vec::new();
    let mut versions = Vec::new();
    for k in kernels.iter().filter(|_| plain) {
        let t = Instant::now();
        let (results, facts) = run_guest(root, &dir, &vng_bin, k, accel, &bins, args)?;
        timings.push((k.version.clone(), t.elapsed(), format!("monitor: {facts}")));
        versions.push(k.version.clone());
        for (test, o) in results {
            table.entry(test).or_default().insert(k.version.clone(), o);
        }
    }
    if vm_powerloss::selected(&args.only) {
        // One kernel: the series named there if it is booted, else the first.
        let k = names
            .iter()
            .position(|n| n == vm_powerloss::SERIES)
            .map_or(&kernels[0], |i| &kernels[i]);
        let t = Instant::now();
        let (o, facts) = vm_powerloss::run(root, &dir, &vng_bin, k, accel)?;
        timings.push((
            format!("{} ({})", k.version, vm_powerloss::NAME),
            t.elapsed(),
            facts,
        ));
        if !versions.contains(&k.version) {
            versions.push(k.version.clone());
        }
        table
            .entry(vm_powerloss::NAME.to_string())
            .or_default()
            .insert(k.version.clone(), o);
    }
    let summary = render_table(&versions, &table);
    let mut report = format!(
        "VM tier: {} under qemu ({}), scale {}, took {:.0} s\n",
        versions.join(", "),
        accel.describe(),
        args.scale,
        started.elapsed().as_secs_f64()
    );
    for (v, d, facts) in &timings {
        let _ = writeln!(
            report,
            "  {v}: {:.0} s (boot, tests, power-off); {facts}",
            d.as_secs_f64()
        );
    }
    report.push_str(&summary);
    eprintln!("\n{report}");
    let _ = std::fs::write(dir.join("summary.txt"), &report);
    let bad: Vec<String> = table
        .iter()
        .flat_map(|(t, per)| {
            per.iter()
                .filter(|(_, o)| **o != Outcome::Pass)
                .map(move |(k, o)| format!("{t} on {k}: {o}"))
        })
        .collect();
    let missing = versions
        .iter()
        .filter(|v| !table.values().any(|per| per.contains_key(*v)))
        .count();
    if !bad.is_empty() || missing > 0 || table.is_empty() {
        bail!(
            "VM tier failed: {}{}",
            bad.join("; "),
            if missing > 0 {
                format!(" ({missing} kernel(s) produced no result)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// virtme-ng in `target/vm/venv`; returns the venv's bin dir (vng calls `virtme-run` by name,
/// so that dir goes first on the guest launcher's PATH).
fn ensure_virtme_ng(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let bin = venv.join("bin");
    let works = Command::new(bin.join("vng"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Ok(bin);
    }
    say(format!(
        "installing {VIRTME_NG} (PyPI) into {}",
        venv.display()
    ));
    crate::run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    crate::run_cmd(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(VIRTME_NG),
    )?;
    Ok(bin)
}

/// A kernel unpacked under `target/vm/kernels`.
pub struct KernelImage {
    pub version: String,
    pub vmlinuz: PathBuf,
}

fn apt_private_opts(dir: &Path, suite: &str) -> Result<Vec<String>> {
    let state = dir.join(format!("apt-{suite}"));
    let lists = state.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    let list = state.join("sources.list");
    if !list.exists() {
        let uri = system_archive_uri()?;
        std::fs::write(
            &list,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
            ),
        )?;
    }
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::sourcelist={}", list.display()),
        "-o".into(),
        "Dir::Etc::sourceparts=-".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", lists.display()),
        // No binary cache files: they would replace the system's.
        "-o".into(),
        "Dir::Cache::pkgcache=".into(),
        "-o".into(),
        "Dir::Cache::srcpkgcache=".into(),
    ])
}

/// The URI of the system's main Debian archive (not the security one), from its apt sources.
fn system_archive_uri() -> Result<String> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path()) {
                texts.push(t);
            }
        }
    }
    for t in &texts {
        // One-line format: deb [opts] URI suite components
        for l in t.lines().map(str::trim) {
            let Some(rest) = l.strip_prefix("deb ") else {
                continue;
            };
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']').map_or("", |(_, r)| r),
                None => rest,
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() >= 2 && f[0].ends_with("/debian") {
                return Ok(f[0].to_string());
            }
        }
        // deb822 format.
        for stanza in t.split("\n\n") {
            let uri = stanza
                .lines()
                .find_map(|l| l.trim().strip_prefix("URIs:"))
                .map(str::trim);
            if let Some(u) = uri.and_then(|u| u.split_whitespace().find(|u| u.ends_with("/debian")))
            {
                return Ok(u.to_string());
            }
        }
    }
    bail!("no Debian archive (a URI ending in /debian) in the system's apt sources")
}

/// Numeric-aware sort key, so 6.1.0-57 sorts after 6.1.0-9.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut txt = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !txt.is_empty() {
                out.push((0, std::mem::take(&mut txt)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(u64::MAX), String::new()));
                num.clear();
            }
            txt.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !txt.is_empty() {
        out.push((0, txt));
    }
    out
}

fn apt_search(opts: &[String], pattern: &str) -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args(opts)
        .args(["search", "--names-only", pattern])
        .output()
        .context("cannot run apt-cache")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    names.sort_by_key(|n| natural_key(n));
    Ok(names)
}

/// The newest kernel of `s`, downloaded and unpacked once; later runs use the cached copy
/// without touching the network.
fn ensure_kernel(dir: &Path, s: &Series) -> Result<KernelImage> {
    let kdir = dir.join("kernels");
    std::fs::create_dir_all(&kdir)?;
    let marker = kdir.join(format!("{}.version", s.name));
    if let Ok(v) = std::fs::read_to_string(&marker) {
        let v = v.trim().to_string();
        let vmlinuz = kdir.join(&v).join(format!("boot/vmlinuz-{v}"));
        if vmlinuz.is_file() {
            link_modules(&kdir, &v)?;
            return Ok(KernelImage {
                version: v,
                vmlinuz,
            });
        }
    }
    let opts = match s.suite {
        Some(suite) => apt_private_opts(dir, suite)?,
        None => Vec::new(),
    };
    let mut names = apt_search(&opts, s.pattern)?;
    if names.is_empty() {
        say(format!(
            "updating apt lists{} to find {}",
            s.suite
                .map(|x| format!(" (private state for {x})"))
                .unwrap_or_default(),
            s.pattern
        ));
        crate::run_cmd(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
        names = apt_search(&opts, s.pattern)?;
    }
    let pkg = names
        .last()
        .with_context(|| format!("no package matching {} in apt", s.pattern))?
        .clone();
    let version = pkg.trim_start_matches("linux-image-").to_string();
    say(format!(
        "downloading Debian's {pkg} (kernel {} of the VM tier)",
        s.name
    ));
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    crate::run_cmd(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(&opts)
            .args(["download", "-qq", &pkg]),
    )?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{pkg}_"))
                    && Path::new(n).extension().is_some_and(|e| e == "deb")
            })
        })
        .with_context(|| format!("apt-get download left no {pkg}_*.deb in {}", debs.display()))?;
    let dest = kdir.join(&version);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    say(format!(
        "unpacking {} into {}",
        deb.display(),
        dest.display()
    ));
    crate::run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    // Debian's postinst would run depmod; virtme-ng needs modules.dep to find virtio and 9p.
    crate::run_cmd(Command::new("depmod").arg("-b").arg(&dest).arg(&version))?;
    let _ = std::fs::remove_file(&deb);
    let vmlinuz = dest.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        bail!("{} has no {}", pkg, vmlinuz.display());
    }
    link_modules(&kdir, &version)?;
    std::fs::write(&marker, &version)?;
    Ok(KernelImage { version, vmlinuz })
}

/// virtme-ng takes modules from `/lib/modules/<version>` on the host (and the guest sees the
/// host's root): link the unpacked ones there unless that kernel is installed for real.
fn link_modules(kdir: &Path, version: &str) -> Result<()> {
    let src = kdir.join(version).join("lib/modules").join(version);
    let link = Path::new("/lib/modules").join(version);
    if link.join("modules.dep").is_file() {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() {
        // A dangling link of an earlier cache: replace it.
        std::fs::remove_file(&link)
            .with_context(|| format!("cannot replace {}", link.display()))?;
    }
    std::fs::create_dir_all("/lib/modules")?;
    say(format!("linking {} -> {}", link.display(), src.display()));
    std::os::unix::fs::symlink(&src, &link)
        .with_context(|| format!("cannot link {} (needs root)", link.display()))?;
    Ok(())
}

/// Builds the guest's test binaries (the same as the host run's: release, same features) and
/// returns (target name, executable).
fn build_test_binaries(root: &Path, obj: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut c = crate::cargo();
    c.current_dir(root)
        .env("APM_EBPF_OBJECT", obj)
        .args([
            "test",
            "--release",
            "-p",
            "apm-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit());
    for (t, _) in GUEST_TESTS {
        c.args(["--test", t]);
    }
    eprintln!("+ {}", crate::show(&c));
    let out = c.output().context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the VM tier's test binaries failed ({})",
            out.status
        );
    }
    let mut bins = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if GUEST_TESTS.iter().any(|(t, _)| *t == name) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if bins.len() != GUEST_TESTS.len() {
        bail!(
            "cargo built {} of {} VM test binaries",
            bins.len(),
            GUEST_TESTS.len()
        );
    }
    Ok(bins)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Accel::Tcg => "TCG: software emulation",
            Accel::Kvm => "KVM",
        }
    }
}

/// KVM only where a guest was seen to boot with it on this host kernel (probed once, the
/// answer cached): on some hosts /dev/kvm opens but guests hang or die.
fn choose_accel(dir: &Path, vng_bin: &Path, k: &KernelImage, want: &str) -> Result<Accel> {
    match want {
        "tcg" => return Ok(Accel::Tcg),
        "kvm" => return Ok(Accel::Kvm),
        "auto" => {}
        other => bail!("--accel {other}: expected tcg, kvm or auto"),
    }
    if !Path::new("/dev/kvm").exists() {
        say("no /dev/kvm: TCG");
        return Ok(Accel::Tcg);
    }
    let host = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cache = dir.join(format!("kvm-probe-{host}"));
    if let Ok(v) = std::fs::read_to_string(&cache) {
        let ok = v.trim() == "ok";
        say(format!(
            "KVM {} on this host (cached in {}; delete it to probe again): {}",
            if ok {
                "runs guests"
            } else {
                "does not run guests"
            },
            cache.display(),
            if ok { "KVM" } else { "TCG" }
        ));
        return Ok(if ok { Accel::Kvm } else { Accel::Tcg });
    }
    say("probing whether KVM runs a guest here (once per host kernel)");
    let probe = dir.join("kvm-probe");
    let _ = std::fs::remove_dir_all(&probe);
    std::fs::create_dir_all(&probe)?;
    let marker = probe.join("booted");
    let mut c = vng(vng_bin, k, Accel::Kvm, &probe, "512M");
    c.arg(format!("echo ok > {}", marker.display()));
    let _ = run_with_timeout(c, &probe.join("console.log"), Duration::from_mins(1));
    let ok = marker.is_file();
    std::fs::write(&cache, if ok { "ok\n" } else { "fails\n" })?;
    say(if ok {
        "KVM runs a guest: using KVM"
    } else {
        "KVM did not boot a guest within 60 s: using TCG"
    });
    Ok(if ok { Accel::Kvm } else { Accel::Tcg })
}

/// A `vng` command booting `k` with `rwdir` writable; the command to run is appended by the
/// caller.
pub(crate) fn vng(
    vng_bin: &Path,
    k: &KernelImage,
    accel: Accel,
    rwdir: &Path,
    memory: &str,
) -> Command {
    let mut c = Command::new(vng_bin.join("vng"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![vng_bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).unwrap_or(path))
        .arg("-r")
        .arg(&k.vmlinuz);
    if accel == Accel::Tcg {
        c.arg("--disable-kvm");
    }
    c.args(["--memory", memory, "--cpus", "2", "--rwdir"])
        .arg(rwdir)
        .arg("--exec");
    c
}

/// Runs `c` in its own process group with output to `log`; kills the group after `limit`.
fn run_with_timeout(mut c: Command, log: &Path, limit: Duration) -> Result<bool> {
    let f = std::fs::File::create(log)?;
    c.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0);
    let mut child = c.spawn().context("cannot start vng")?;
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if Instant::now() > end {
            // SAFETY: signalling the process group this function created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Pass,
    Fail,
    /// The binary ran but this test never reported (crash, timeout), or the guest never ran it.
    NoResult(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Pass => f.write_str("pass"),
            Outcome::Fail => f.write_str("FAIL"),
            Outcome::NoResult(why) => write!(f, "no result ({why})"),
        }
    }
}

/// The script the guest runs: fresh tmpfs on /tmp, each test binary with its output and exit
/// status written to `out`.
fn guest_script(root: &Path, out: &Path, bins: &[(String, PathBuf)], args: &VmArgs) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# Written by `cargo xtask test` (VM tier); runs inside the guest.\n",
    );
    let _ = writeln!(s, "out='{}'", out.display());
    s.push_str("exec >\"$out/guest.log\" 2>&1\n");
    s.push_str("echo \"kernel $(uname -r)\"\n");
    // The 9p root refuses socket files; the guest's /tmp is the tests' scratch space. A checkout
    // that itself lives under /tmp (a `mktemp -d` clone) would vanish under that tmpfs: keep the
    // host's /tmp reachable (on devtmpfs, the one writable place before the tmpfs exists) and
    // bind the checkout and the results folder back at their own paths.
    s.push_str("keep=/dev/apm-host-tmp; mkdir -p \"$keep\" && mount --rbind /tmp \"$keep\"\n");
    s.push_str("mount -t tmpfs -o mode=1777,size=1G tmpfs /tmp || echo 'cannot mount /tmp'\n");
    let _ = writeln!(
        s,
        "for p in '{}' \"$out\"; do case \"$p\" in /tmp/*) mkdir -p \"$p\" && mount --rbind \"$keep/${{p#/tmp/}}\" \"$p\";; esac; done",
        root.display()
    );
    s.push_str("[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing\n");
    let path = std::env::var("PATH").unwrap_or_default();
    let _ = writeln!(s, "export PATH='{path}' HOME=/tmp RUST_BACKTRACE=1");
    let _ = writeln!(
        s,
        "export APM_TEST_SCALE='{}' APM_VM_FACTS=\"$out/facts.txt\"",
        args.scale
    );
    // The guest exists to run these tests: one that cannot load eBPF must fail, not skip.
    s.push_str("export CI=true\n");
    let _ = writeln!(s, "cd '{}'", root.display());
    for (name, exe) in bins {
        let filters = GUEST_TESTS
            .iter()
            .find(|(t, _)| t == name)
            .map_or(&[][..], |(_, f)| *f);
        let mut cmd = format!("'{}' --test-threads=1", exe.display());
        let picked: Vec<&str> = filters
            .iter()
            .copied()
            .filter(|f| args.only.is_empty() || args.only.iter().any(|o| f.contains(o.as_str())))
            .collect();
        if filters.is_empty() {
            for o in &args.only {
                // Without --exact, libtest's filters are substrings.
                let _ = write!(cmd, " '{o}'");
            }
        } else {
            if picked.is_empty() {
                continue;
            }
            cmd.push_str(" --exact");
            for f in picked {
                let _ = write!(cmd, " '{f}'");
            }
        }
        let _ = writeln!(
            s,
            "echo \"== {name} $(date +%T)\"\n{cmd} >\"$out/{name}.log\" 2>&1\necho $? >\"$out/{name}.rc\""
        );
    }
    s.push_str("echo \"== done $(date +%T)\"\necho done >\"$out/done\"\n");
    s
}

fn run_guest(
    root: &Path,
    dir: &Path,
    vng_bin: &Path,
    k: &KernelImage,
    accel: Accel,
    bins: &[(String, PathBuf)],
    args: &VmArgs,
) -> Result<(Vec<(String, Outcome)>, String)> {
    let out = dir.join("run").join(&k.version);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let script = out.join("guest.sh");
    std::fs::write(&script, guest_script(root, &out, bins, args))?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    say(format!(
        "booting {} under {} (output in {})",
        k.version,
        accel.describe(),
        out.display()
    ));
    let t = Instant::now();
    // A guest that dies before its first test starts has run nothing (CI once saw a 6.12 guest
    // stop after 11 s with an empty console while the host logged a VM fork): no result is lost
    // by booting it once more, and a test that did start is never re-run.
    for attempt in 1..=2 {
        let mut c = vng(vng_bin, k, accel, &out, "3G");
        c.arg(&script);
        run_with_timeout(c, &out.join("console.log"), GUEST_TIMEOUT)?;
        let started = bins
            .iter()
            .any(|(name, _)| out.join(format!("{name}.log")).exists());
        if attempt == 2 || started || out.join("done").is_file() {
            break;
        }
        say(format!(
            "{}: guest stopped after {:.0} s before any test started (console: {} bytes); booting it once more",
            k.version,
            t.elapsed().as_secs_f64(),
            std::fs::metadata(out.join("console.log")).map_or(0, |m| m.len())
        ));
        let _ = std::fs::rename(out.join("console.log"), out.join("console-1.log"));
    }
    let done = out.join("done").is_file();
    say(format!(
        "{}: guest {} after {:.0} s",
        k.version,
        if done {
            "finished"
        } else {
            "did NOT finish (killed or crashed; see console.log)"
        },
        t.elapsed().as_secs_f64()
    ));
    let mut results = Vec::new();
    for (name, _) in bins {
        let log = std::fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
        let parsed = parse_libtest(&log);
        let filtered_out =
            !args.only.is_empty() && (log.is_empty() || log.contains("running 0 tests"));
        if parsed.is_empty() && !filtered_out {
            results.push((
                name.clone(),
                Outcome::NoResult(format!("see {}", out.join(format!("{name}.log")).display())),
            ));
        }
        let mut failed = parsed.iter().any(|(_, o)| *o != Outcome::Pass);
        // A binary that exits non-zero with every test it listed passed died outside a test.
        let rc = std::fs::read_to_string(out.join(format!("{name}.rc"))).unwrap_or_default();
        if !failed && !parsed.is_empty() && rc.trim() != "0" {
            failed = true;
            results.push((
                format!("{name} (the binary)"),
                Outcome::NoResult(format!("exit status {:?}", rc.trim())),
            ));
        }
        results.extend(parsed);
        if failed {
            eprintln!(
                "---- {name} on {} ({}):",
                k.version,
                out.join(format!("{name}.log")).display()
            );
            eprintln!("{}", failures_of(&log));
        }
    }
    // How the monitor ran there (exit mode, comm source), as the tests' monitors reported it.
    let mut facts: Vec<String> = std::fs::read_to_string(out.join("facts.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    facts.sort();
    facts.dedup();
    let facts = if facts.is_empty() {
        "never started".to_string()
    } else {
        facts.join("; ")
    };
    Ok((results, facts))
}

/// `test NAME ... ok|FAILED` lines of libtest's output. A test started but never finished
/// (the guest was killed) is a `NoResult`.
fn parse_libtest(log: &str) -> Vec<(String, Outcome)> {
    let mut r = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix("test ") else {
            continue;
        };
        let Some((name, res)) = rest.split_once(" ... ") else {
            continue;
        };
        let o = match res.trim() {
            "ok" => Outcome::Pass,
            "FAILED" => Outcome::Fail,
            "ignored" => continue,
            other => Outcome::NoResult(other.to_string()),
        };
        r.push((name.to_string(), o));
    }
    r
}

/// The failure sections of a libtest log (or its tail), for the terminal.
fn failures_of(log: &str) -> String {
    if let Some(i) = log.find("\nfailures:\n") {
        log[i..].chars().take(12_000).collect()
    } else {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

fn render_table(
    versions: &[String],
    table: &BTreeMap<String, BTreeMap<String, Outcome>>,
) -> String {
    let w = table.keys().map(String::len).max().unwrap_or(4).max(4);
    let mut s = format!("{:w$}", "test");
    for v in versions {
        let _ = write!(s, " | {v:>22}");
    }
    s.push('\n');
    s.push_str(&"-".repeat(w + versions.len() * 25));
    s.push('\n');
    for (t, per) in table {
        let _ = write!(s, "{t:w$}");
        for v in versions {
            let cell = per.get(v).map_or_else(
                || "not run".to_string(),
                |o| match o {
                    Outcome::NoResult(_) => "no result".to_string(),
                    o => o.to_string(),
                },
            );
            let _ = write!(s, " | {cell:>22}");
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_of_kernel_packages() {
        let mut v = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-10-amd64",
        ];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v.last(), Some(&"linux-image-6.1.0-57-amd64"));
    }

    #[test]
    fn libtest_lines_are_parsed() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ignored\n";
        assert_eq!(
            parse_libtest(log),
            vec![("a".into(), Outcome::Pass), ("b".into(), Outcome::Fail)]
        );
    }
}
