//! Datagram validation on arbitrary bytes; the checks are `apm_agent::fuzzing::validate_profile`
//! (shared with the corpus replay in `apm-agent/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| apm_agent::fuzzing::validate_profile(data));
