//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists.
//!
//! Found: sets `cfg(apm_ebpf)` and `APM_EBPF_OBJECT_PATH` (for `aya::include_bytes_aligned!`),
//! and reruns when the object changes. Missing: a cargo warning, and the agent builds and runs
//! without eBPF (it says so at runtime). The object is looked for at `$APM_EBPF_OBJECT`, else
//! `<target dir>/ebpf/bpfel-unknown-none/release/apm-ebpf`, where the target dir is
//! `$CARGO_TARGET_DIR`, the one this build runs in, or `<workspace>/target`.

use std::path::{Path, PathBuf};

const REL: &str = "ebpf/bpfel-unknown-none/release/apm-ebpf";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(apm_ebpf)");
    println!("cargo::rerun-if-env-changed=APM_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo::rerun-if-changed=build.rs");

    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();

    let explicit = std::env::var_os("APM_EBPF_OBJECT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let candidates: Vec<PathBuf> = if let Some(p) = &explicit {
        vec![p.clone()]
    } else {
        let mut c = Vec::new();
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
            let t = PathBuf::from(t);
            c.push(if t.is_absolute() { t } else { root.join(t) }.join(REL));
        }
        // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out: one of its
        // ancestors is the target dir, whatever --target-dir said.
        if let Some(out) = std::env::var_os("OUT_DIR") {
            c.extend(
                Path::new(&out)
                    .ancestors()
                    .skip(3)
                    .take(3)
                    .map(|a| a.join(REL)),
            );
        }
        c.push(root.join("target").join(REL));
        c
    };

    if let Some(obj) = candidates.iter().find(|p| p.is_file()) {
        println!("cargo::rustc-cfg=apm_ebpf");
        println!("cargo::rustc-env=APM_EBPF_OBJECT_PATH={}", obj.display());
        println!("cargo::rerun-if-changed={}", obj.display());
    } else {
        // The place `cargo xtask build-ebpf` writes to: $CARGO_TARGET_DIR or <root>/target.
        let want = match (&explicit, std::env::var_os("CARGO_TARGET_DIR")) {
            (None, None) => candidates.last().cloned().unwrap_or_default(),
            _ => candidates.first().cloned().unwrap_or_default(),
        };
        println!(
            "cargo::warning=eBPF object not found at {}: apm-agent builds without eBPF \
             (kernel-seen drops and worker memory disabled). Run `cargo xtask build-ebpf` \
             and build again.",
            want.display()
        );
        // A missing path counts as changed, so the next build picks the object up as soon
        // as it exists.
        println!("cargo::rerun-if-changed={}", want.display());
    }
}
