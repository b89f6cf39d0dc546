//! Helpers for the integration tests: locating the release binaries, child-process guards,
//! a reference listener and an agent on a temporary directory, and the status document.

pub mod common;
pub mod ebpf;
pub mod faults;
pub mod php;
pub mod spool_bench;
