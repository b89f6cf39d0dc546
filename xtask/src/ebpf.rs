//! Building `apm-ebpf`: the nightly toolchain bits it needs, bpf-linker, tracefs, the build.
//!
//! `apm-ebpf` is its own cargo workspace targeting `bpfel-unknown-none`, built with nightly and
//! `-Z build-std=core`; bpf-linker 0.13 links it with the nightly toolchain's own LLVM 22.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const TRACEFS: &str = "/sys/kernel/tracing";

/// A command with the environment the outer `cargo xtask` sets removed, so a child cargo or
/// rustup picks its own toolchain, flags and target dir (an inherited `RUSTC` or
/// `RUSTUP_TOOLCHAIN=stable` would build the eBPF crate with the wrong compiler).
pub(crate) fn clean_cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let strip = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("__CARGO")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
            || k == "RUSTDOC"
            || k == "RUSTDOCFLAGS";
        if strip {
            c.env_remove(k);
        }
    }
    c
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(clean_cmd("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is needed for the eBPF crate (rustup toolchain install nightly)",
    )?;
    Ok(PathBuf::from(s))
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// The bpf-linker binary: on PATH, else in cargo's bin dir.
fn bpf_linker() -> Option<PathBuf> {
    let on_path = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Some(PathBuf::from("bpf-linker"));
    }
    let p = cargo_bin_dir().join("bpf-linker");
    Command::new(&p)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(p)
}

/// Makes sure nightly has `rust-src` and bpf-linker is installed; installs what is missing and
/// says so. Idempotent: a second run only checks.
pub fn ensure_toolchain() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        eprintln!("xtask: installing rust-src for nightly (needed by -Z build-std=core)");
        run(clean_cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    if let Some(linker) = bpf_linker() {
        let v = output(Command::new(&linker).arg("--version")).unwrap_or_default();
        if !v.contains(BPF_LINKER_VERSION) {
            eprintln!("xtask: warning: found {v}, the build is verified with {BPF_LINKER_VERSION}");
        }
        return Ok(());
    }

    // bpf-linker must link the same LLVM as the nightly rustc that emits the bitcode: point
    // llvm-sys at the libLLVM shipped in the nightly sysroot through a prefix of its own.
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.22.1-rust-") && n.ends_with("-nightly"))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.22.1-rust-*-nightly in {}: bpf-linker {BPF_LINKER_VERSION} needs \
                 a nightly built on LLVM 22",
                lib.display()
            )
        })?;
    let prefix = cargo_bin_dir()
        .parent()
        .map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
        .join("bpf-linker-llvm22");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot symlink {} -> {}", link.display(), libllvm.display()))?;
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against {} (prefix {}): a one-time \
         build from source of a few minutes on 2 cores; cargo shows its progress below",
        libllvm.display(),
        prefix.display()
    );
    run(clean_cmd("cargo")
        // Away from any rust-toolchain.toml: the default (stable) toolchain builds it.
        .current_dir(std::env::temp_dir())
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        )
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    if bpf_linker().is_none() {
        bail!(
            "bpf-linker was installed but does not run; is {} on PATH?",
            cargo_bin_dir().display()
        );
    }
    Ok(())
}

/// Mounts tracefs at /sys/kernel/tracing when it is not there (tracepoint attach needs it).
pub fn ensure_tracefs() -> Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    eprintln!("xtask: mounting tracefs at {TRACEFS}");
    nix::mount::mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("cannot mount tracefs at {TRACEFS} (needs root)"))?;
    if !events.is_dir() {
        bail!("tracefs mounted at {TRACEFS} but has no events/ directory");
    }
    Ok(())
}

/// Where the object lands: `$CARGO_TARGET_DIR/ebpf/...` when set (as `apm-agent/build.rs`
/// looks for it), else `<root>/target/ebpf/...`.
fn ebpf_target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }.join("ebpf")
        }
        _ => root.join("target").join("ebpf"),
    }
}

/// Builds `apm-ebpf` (installing the toolchain bits first if needed) and returns the object's
/// path, which `apm-agent`'s build script embeds.
pub fn build(root: &Path) -> Result<PathBuf> {
    ensure_toolchain()?;
    let target_dir = ebpf_target_dir(root);
    let mut cmd = clean_cmd("cargo");
    cmd.current_dir(root.join("apm-ebpf")).args([
        "+nightly",
        "build",
        "--release",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--target-dir",
    ]);
    cmd.arg(&target_dir);
    // bpf-linker may live only in cargo's bin dir, which need not be on PATH.
    if let Some(path) = std::env::var_os("PATH") {
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.push(cargo_bin_dir());
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
    }
    run(&mut cmd)?;
    let obj = target_dir.join("bpfel-unknown-none/release/apm-ebpf");
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    eprintln!("xtask: eBPF object at {}", obj.display());
    Ok(obj)
}
