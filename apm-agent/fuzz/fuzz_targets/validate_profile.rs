//! Datagram validation on arbitrary bytes: never panics, and accepts exactly what serde_json
//! reads as one JSON object (surrounding whitespace allowed) within the size limit.
#![no_main]

use apm_agent::pipeline::ingest::validate::validate_profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a size limit, so the oversize branch is reached too.
    let (limit, buf) = match data.split_first() {
        Some((&l, rest)) if l < 8 => (usize::from(l) * 16, rest),
        _ => (1024 * 1024, data),
    };
    let verdict = validate_profile(buf, limit);
    let is_object = buf.len() <= limit
        && std::str::from_utf8(buf).is_ok_and(|s| {
            serde_json::from_str::<serde_json::Value>(s).is_ok_and(|v| v.is_object())
        });
    assert_eq!(
        verdict.is_ok(),
        is_object,
        "validate_profile disagrees with serde_json on {buf:?}"
    );
});
