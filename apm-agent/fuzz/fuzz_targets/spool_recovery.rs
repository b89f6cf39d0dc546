//! Spool recovery on arbitrary file contents; the checks are `apm_agent::fuzzing::spool_recovery`
//! (shared with the corpus replay in `apm-agent/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: the spool fsyncs, and a disk would make each run take ms.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    apm_agent::fuzzing::spool_recovery(data, dir.path());
});
