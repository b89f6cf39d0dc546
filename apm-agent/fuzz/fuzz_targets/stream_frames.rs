//! The stream frame parser on arbitrary chunked input; the checks are
//! `apm_agent::fuzzing::stream_frames` (shared with the corpus replay in
//! `apm-agent/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| apm_agent::fuzzing::stream_frames(data));
