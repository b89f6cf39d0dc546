//! Project tasks. `cargo xtask run` and `cargo xtask test` are the two commands a newcomer needs:
//! both install what is missing first (idempotently, saying what they install).

mod bench;
mod bench_catchup;
mod bench_compare;
mod bench_ebpf;
mod bench_nats;
mod bench_php;
mod bench_soak;
mod demo;
mod dist;
mod ebpf;
mod live;
mod setup;
mod vm;
mod vm_powerloss;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Bitville APM project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent).
    Setup {
        /// Only the eBPF toolchain (rust-src, bpf-linker) and tracefs.
        #[arg(long)]
        ebpf_only: bool,
    },
    /// Build the eBPF object that the agent embeds.
    BuildEbpf,
    /// Build everything (eBPF object + release binaries).
    Build,
    /// The demo: listener + agent (+ PHP-FPM when available) with live figures until Ctrl-C.
    Run(live::RunArgs),
    /// Every test: formatting, lints, unit, integration and privileged tests.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Also fuzz each `cargo fuzz` target for this many seconds (installs cargo-fuzz; the
        /// first fuzz build takes several minutes, so it is not part of the default run).
        #[arg(long, value_name = "SECONDS")]
        fuzz: Option<u64>,
        /// Skip the VM tier (the eBPF ground-truth tests inside Debian's 6.1, 6.12 and 5.10
        /// kernels under qemu, and the power-loss scenario on 6.1: about 7 min under TCG here,
        /// plus the first download); CI runs it.
        #[arg(long)]
        no_vm: bool,
        #[command(flatten)]
        vm: vm::VmArgs,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Only the VM tier of `cargo xtask test`: boots each kernel under qemu and runs the eBPF
    /// ground-truth tests inside it against the binaries built here.
    TestVm(vm::VmArgs),
    /// Benchmarks (not tests): prints tables and writes docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// The Debian package target/dist/<name>_<version>_<arch>.deb (installs cargo-deb if missing).
    Dist,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.cmd {
        Cmd::Setup { ebpf_only } => {
            setup::ebpf()?;
            if !ebpf_only {
                setup::packages(setup::ALL_PACKAGES)?;
                setup::nats_server(&root)?;
            }
            Ok(())
        }
        Cmd::BuildEbpf => {
            setup::ebpf()?;
            build_ebpf(&root).map(|_| ())
        }
        Cmd::Build => {
            setup::ebpf()?;
            build_all(&root)
        }
        Cmd::Run(args) => {
            setup::ebpf()?;
            setup::packages(setup::DEMO_PACKAGES)?;
            build_all(&root)?;
            live::run(&root, args)
        }
        Cmd::Test {
            no_lint,
            fuzz,
            no_vm,
            vm,
            rest,
        } => {
            let host = test(&root, no_lint, &rest);
            // The VM tier runs even when a host test failed: both verdicts are worth having.
            let vm = if no_vm {
                eprintln!("xtask: VM tier skipped (--no-vm)");
                Ok(())
            } else {
                // The guests run the release binaries: built here too, so a host run that
                // stopped early (a lint) does not fail the VM tier for want of them.
                setup::ebpf()
                    .and_then(|()| build_ebpf(&root))
                    .and_then(|obj| build_release(&root, &obj).map(|()| obj))
                    .and_then(|obj| vm::run(&root, &obj, &vm))
            };
            match (host, vm) {
                (Ok(()), Ok(())) => {}
                (Err(e), Ok(())) | (Ok(()), Err(e)) => return Err(e),
                (Err(h), Err(v)) => bail!("{h:#}\n{v:#}"),
            }
            match fuzz {
                Some(secs) => fuzz_all(&root, secs),
                None => Ok(()),
            }
        }
        Cmd::Dist => {
            setup::ebpf()?;
            dist::run(&root).map(|_| ())
        }
        Cmd::TestVm(args) => {
            setup::ebpf()?;
            let obj = build_ebpf(&root)?;
            build_release(&root, &obj)?;
            vm::run(&root, &obj, &args)
        }
        Cmd::Bench(args) => {
            if !args.no_build {
                setup::ebpf()?;
                setup::packages(setup::ALL_PACKAGES)?;
                build_all(&root)?;
            }
            bench::run(&root, args)
        }
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// Runs a command, echoing it, failing with its exit status.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !st.success() {
        bail!("`{}` failed ({st})", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build_ebpf(root: &Path) -> Result<PathBuf> {
    let obj = ebpf::build(root)?;
    eprintln!("eBPF object: {}", obj.display());
    Ok(obj)
}

fn build_all(root: &Path) -> Result<()> {
    let obj = build_ebpf(root)?;
    build_release(root, &obj)
}

/// The release binaries (the agent embeds `obj`), which the integration tests start.
fn build_release(root: &Path, obj: &Path) -> Result<()> {
    run_cmd(cargo().current_dir(root).env("APM_EBPF_OBJECT", obj).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]))
}

/// Runs every fuzz target of `apm-agent/fuzz` for `secs` seconds each.
fn fuzz_all(root: &Path, secs: u64) -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("setup: installing cargo-fuzz (for `cargo xtask test --fuzz`)");
        run_cmd(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root.join("apm-agent/fuzz");
    for target in ["validate_profile", "stream_frames", "spool_recovery"] {
        // New inputs go to the first corpus directory (scratch, under the fuzz crate's
        // target/); the committed seeds (corpus/<target>/) are read only, so a fuzz run leaves
        // the checkout clean. A crash lands in artifacts/<target>/: commit it into
        // corpus/<target>/ and apm-agent/tests/fuzz_corpus.rs replays it from then on.
        let scratch = dir.join("target/corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        let seeds = dir.join("corpus").join(target);
        run_cmd(
            setup::nightly_cargo(&dir)
                .args(["fuzz", "run", "-O", target])
                .arg(&scratch)
                .arg(&seeds)
                .args(["--", &format!("-max_total_time={secs}"), "-max_len=4096"]),
        )?;
    }
    Ok(())
}

fn test(root: &Path, no_lint: bool, rest: &[String]) -> Result<()> {
    setup::ebpf()?;
    setup::packages(setup::ALL_PACKAGES)?;
    setup::nats_server(root)?;
    let obj = build_ebpf(root)?;
    if !no_lint {
        run_cmd(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
        run_cmd(
            cargo()
                .current_dir(root)
                .env("APM_EBPF_OBJECT", &obj)
                .args([
                    "clippy",
                    "--release",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
        )?;
        // The eBPF crate is its own workspace: format-check and lint it on its own target.
        run_cmd(setup::nightly_cargo(&root.join("apm-ebpf")).args(["fmt", "--check"]))?;
        setup::ebpf_clippy(root)?;
    }
    // Integration tests start the release binaries; build them first.
    run_cmd(
        cargo()
            .current_dir(root)
            .env("APM_EBPF_OBJECT", &obj)
            .args(["build", "--release", "--workspace", "--bins"]),
    )?;
    // tests/tests/package.rs installs the package.
    dist::package(root, &obj)?;
    let mut t = cargo();
    t.current_dir(root).env("APM_EBPF_OBJECT", &obj).args([
        "test",
        "--release",
        "--workspace",
        "--no-fail-fast",
    ]);
    if !rest.is_empty() {
        t.arg("--").args(rest);
    }
    run_cmd(&mut t)
}
