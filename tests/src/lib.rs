//! Helpers for the integration tests: locating the release binaries, child-process guards,
//! a reference listener and an agent on a temporary directory, and the status document.

pub mod common;
pub mod ebpf;
pub mod faults;
pub mod nats;
pub mod php;
pub mod spool_bench;

/// `APM_TEST_SCALE` (default 1): the factor the VM tier of `cargo xtask test` sets to scale send
/// counts and request rates down under emulation. Only the load shrinks; assertions stay.
pub fn scale() -> f64 {
    std::env::var("APM_TEST_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0 && *v <= 1.0)
        .unwrap_or(1.0)
}

/// `n` scaled by [`scale`], at least 1.
pub fn scaled(n: u64) -> u64 {
    ((n as f64 * scale()).round() as u64).max(1)
}
