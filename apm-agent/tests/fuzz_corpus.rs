//! Replays every committed input of each `cargo fuzz` target's corpus
//! (`apm-agent/fuzz/corpus/<target>/`: seeds and past crash inputs) through the same checks
//! the fuzzer runs (`apm_agent::fuzzing`), on stable, in the normal test suite. A crash input
//! found by fuzzing is committed there and stays a regression test from then on.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // An empty or missing corpus would make this test pass without checking anything.
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
}

/// Runs `check` on every input, reporting every input that panicked (by file name), not only
/// the first.
fn replay(target: &str, check: impl Fn(&[u8], &Path)) {
    let mut failed = Vec::new();
    for f in corpus(target) {
        let data = std::fs::read(&f).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&data, scratch.path());
        }))
        .is_err()
        {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}

#[test]
fn validate_profile_corpus_replays() {
    replay("validate_profile", |d, _| {
        apm_agent::fuzzing::validate_profile(d);
    });
}

#[test]
fn stream_frames_corpus_replays() {
    replay("stream_frames", |d, _| apm_agent::fuzzing::stream_frames(d));
}

#[test]
fn spool_recovery_corpus_replays() {
    replay("spool_recovery", apm_agent::fuzzing::spool_recovery);
}
