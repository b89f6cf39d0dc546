//! `cargo xtask dist`: the Debian package `target/dist/<name>_<version>_<arch>.deb`, built by
//! cargo-deb from `[package.metadata.deb]` in apm-agent/Cargo.toml.
//!
//! Steps: install cargo-deb when missing (saying so), build the eBPF object and the release
//! binaries with it embedded, refuse an agent that does not carry that object, render the man
//! pages and completions from the clap definitions (`apm-dist-gen`), check the Debian changelog
//! names this version, run `cargo deb --no-build`, and check the agent inside the package once
//! more. `tests/tests/package.rs` installs the result.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Pinned: cargo-deb 3.8.0 builds with rustc 1.85 and later (its `rust-version`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The Debian package's name (`[package.metadata.deb] name`).
pub const PACKAGE: &str = "bitville-apm-agent";

pub fn run(root: &Path) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let obj = crate::build_ebpf(root)?;
    crate::run_cmd(
        crate::cargo()
            .current_dir(root)
            .env("APM_EBPF_OBJECT", &obj)
            .args(["build", "--release", "--workspace", "--bins"]),
    )?;
    package(root, &obj)
}

/// Packages binaries already built with `obj` embedded (`cargo xtask test` builds them first).
pub fn package(root: &Path, obj: &Path) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let target = crate::target_dir(root);
    let release = target.join("release");
    let object = std::fs::read(obj).with_context(|| format!("cannot read {}", obj.display()))?;
    refuse_without_ebpf(&release.join("apm-agent"), &object)?;

    let generated = release.join("dist-gen");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)?;
    }
    crate::run_cmd(Command::new(release.join("apm-dist-gen")).arg(&generated))?;

    let version = env!("CARGO_PKG_VERSION");
    let changelog = root.join("deploy/debian/changelog");
    check_changelog(&changelog, version)?;
    // No Debian revision, so Debian calls it changelog.gz (cargo-deb's option would name it
    // changelog.Debian.gz); -n: no timestamp in the gzip header.
    let gz = Command::new("gzip")
        .args(["-9nc"])
        .arg(&changelog)
        .output()
        .context("cannot run gzip")?;
    if !gz.status.success() {
        bail!("gzip {} failed", changelog.display());
    }
    std::fs::write(generated.join("changelog.gz"), gz.stdout)?;
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let dist = target.join("dist");
    std::fs::create_dir_all(&dist)?;
    let deb = dist.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let _ = std::fs::remove_file(&deb);
    crate::run_cmd(
        crate::cargo()
            .current_dir(root)
            .args([
                "deb",
                "--package",
                "apm-agent",
                "--no-build",
                // debug = "line-tables-only" in the release profile: strip what ships.
                "--strip",
                "--output",
            ])
            .arg(&deb),
    )?;
    if !deb.is_file() {
        bail!("cargo deb did not write {}", deb.display());
    }

    // The agent that ships, not only the one that was built, carries the eBPF programs.
    let unpacked = dist.join("unpacked");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    crate::run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let shipped = refuse_without_ebpf(&unpacked.join("usr/bin/apm-agent"), &object);
    std::fs::remove_dir_all(&unpacked)?;
    shipped?;
    eprintln!("dist: {}", deb.display());
    Ok(deb)
}

fn ensure_cargo_deb() -> Result<()> {
    let have = crate::cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} (for `cargo xtask dist`)");
        crate::run_cmd(crate::cargo().args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    Ok(())
}

/// The agent embeds the object byte for byte (`include_bytes_aligned!`), so an agent built
/// without it (a plain `cargo build`, or an object that changed since) does not contain it.
fn refuse_without_ebpf(agent: &Path, object: &[u8]) -> Result<()> {
    let bin = std::fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    if !embeds(&bin, object) {
        bail!(
            "{} does not embed the eBPF object: refusing to package an agent that cannot \
             watch PHP from the kernel (build it with `cargo xtask build`)",
            agent.display()
        );
    }
    Ok(())
}

fn embeds(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The top entry of the Debian changelog must be this version: dpkg shows it as the
/// package's history.
fn check_changelog(path: &Path, version: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let top = text.lines().next().unwrap_or_default();
    let want = format!("{PACKAGE} ({version})");
    if !top.starts_with(&want) {
        bail!(
            "{}: the top entry is `{top}`, not `{want} ...`: add an entry for {version}",
            path.display()
        );
    }
    Ok(())
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_without_the_object_is_refused() {
        let object = b"\x7fELF eBPF programs";
        let mut agent = b"\x7fELF agent code ".to_vec();
        assert!(!embeds(&agent, object));
        agent.extend_from_slice(object);
        agent.extend_from_slice(b" more code");
        assert!(embeds(&agent, object));
        assert!(!embeds(&agent, b""));

        let dir = std::env::temp_dir().join(format!("xtask-dist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("apm-agent");
        std::fs::write(&path, b"\x7fELF agent code").unwrap();
        let e = refuse_without_ebpf(&path, object).unwrap_err().to_string();
        assert!(e.contains("refusing to package"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_changelog_must_name_this_version() {
        let dir = std::env::temp_dir().join(format!("xtask-changelog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("changelog");
        std::fs::write(
            &path,
            format!("{PACKAGE} (0.1.0) unstable; urgency=medium\n"),
        )
        .unwrap();
        check_changelog(&path, "0.1.0").unwrap();
        let e = check_changelog(&path, "0.2.0").unwrap_err().to_string();
        assert!(e.contains("add an entry for 0.2.0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // The real one names the workspace's version.
        check_changelog(
            &crate::project_root().join("deploy/debian/changelog"),
            env!("CARGO_PKG_VERSION"),
        )
        .unwrap();
    }
}
