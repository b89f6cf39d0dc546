//! The bodies of the `cargo fuzz` targets (`apm-agent/fuzz`), here so that the same checks run
//! on stable: `tests/fuzz_corpus.rs` replays every committed input of
//! `apm-agent/fuzz/corpus/<target>/` through them in the normal test suite, and each libFuzzer
//! target is a one-line call. Each function panics when the property it checks fails; that is
//! its whole job (a fuzzer and a test both report panics).

use std::collections::HashSet;
use std::path::Path;

use bytes::BytesMut;

use crate::config::SpoolConfig;
use crate::pipeline::ingest::stream::{Frame, next_frame};
use crate::pipeline::ingest::validate;
use crate::pipeline::model::{Batch, Profile};
use crate::pipeline::spool::Spool;

/// Datagram validation on arbitrary bytes: never panics, and accepts exactly what the JSON
/// grammar (serde_json) reads as one object (surrounding whitespace allowed) within the size
/// limit.
pub fn validate_profile(data: &[u8]) {
    // The first byte picks a size limit, so the oversize branch is reached too.
    let (limit, buf) = match data.split_first() {
        Some((&l, rest)) if l < 8 => (usize::from(l) * 16, rest),
        _ => (1024 * 1024, data),
    };
    let verdict = validate::validate_profile(buf, limit);
    // The reference: serde_json's grammar check (`IgnoredAny`, as the listener checks
    // payloads), and an object is valid JSON whose first non-blank byte is `{`. Not
    // `serde_json::Value`: it also refuses unpaired `\ud800` escapes, which the JSON grammar
    // allows and the agent forwards untouched (see corpus/validate_profile/lone-surrogate).
    let is_object = buf.len() <= limit
        && std::str::from_utf8(buf).is_ok_and(|s| {
            serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
                && s.trim_start_matches([' ', '\t', '\n', '\r'])
                    .starts_with('{')
        });
    assert_eq!(
        verdict.is_ok(),
        is_object,
        "validate_profile disagrees with serde_json on {buf:?}"
    );
}

fn reference(data: &[u8], max: usize) -> (Vec<Option<Vec<u8>>>, bool) {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > max {
            return (out, true);
        }
        if rest.len() < 4 + len {
            break;
        }
        out.push((len > 0).then(|| rest[4..4 + len].to_vec()));
        rest = &rest[4 + len..];
    }
    (out, false)
}

/// The stream frame parser on arbitrary bytes delivered in arbitrary chunks: never panics, and
/// yields exactly the frames a straightforward reference parser finds in the whole input.
pub fn stream_frames(input: &[u8]) {
    // Byte 0: size limit; byte 1: chunk size of the simulated reads.
    if input.len() < 2 {
        return;
    }
    let max = usize::from(input[0]) * 4;
    let chunk = usize::from(input[1]).max(1);
    let data = &input[2..];
    let (want, want_oversize) = reference(data, max);
    let mut got = Vec::new();
    let mut oversize = false;
    let mut buf = BytesMut::new();
    'read: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match next_frame(&mut buf, max) {
                Frame::Payload(p) => got.push(Some(p.to_vec())),
                Frame::Empty => got.push(None),
                Frame::Oversize(n) => {
                    assert!(n > max);
                    oversize = true;
                    break 'read;
                }
                Frame::Incomplete => break,
            }
        }
    }
    assert_eq!(got, want);
    assert_eq!(oversize, want_oversize);
}

fn segment_header(id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(b"APMSPOOL");
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// A record as `docs/spool.md` describes it.
fn record(seq: u64, batch: &Batch) -> Vec<u8> {
    let body = batch.encode_record();
    let mut r = Vec::with_capacity(24 + body.len());
    r.extend_from_slice(&0xA9F1_5E0Du32.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    let mut covered = r[4..20].to_vec();
    covered.extend_from_slice(&body);
    r.extend_from_slice(&crc32c::crc32c(&covered).to_le_bytes());
    r.extend_from_slice(&body);
    r
}

/// Spool recovery on arbitrary file contents, in `dir` (empty; tmpfs is faster: the spool
/// fsyncs). The input is a little program that writes one segment file (valid header) out of
/// valid records (real batches, correct checksums), records with a flipped byte, raw garbage
/// and a cut-off tail, plus an ack log of fuzz bytes. Opening must never panic or fail; every
/// record handed out must be one of the valid records written, each at most once; with no
/// damage at all, every valid record is handed out.
pub fn spool_recovery(data: &[u8], dir: &Path) {
    let spool_dir = dir.join("spool");
    std::fs::create_dir_all(&spool_dir).unwrap();
    let mut seg = segment_header(1);
    let mut valid: HashSet<u64> = HashSet::new();
    let mut damaged = false;
    let mut acks = Vec::new();
    let mut seq = 0u64;
    let mut ops = data;
    while let [op, n, rest @ ..] = ops {
        let n = usize::from(*n).min(rest.len());
        let (arg, next) = rest.split_at(n);
        ops = next;
        match op % 5 {
            // A valid record: its profiles are slices of the argument.
            0 | 1 => {
                seq += 1;
                let profiles = arg
                    .chunks(7)
                    .map(|c| Profile {
                        payload: bytes::Bytes::copy_from_slice(c),
                        received_ns: seq,
                        pid: 1,
                        uid: 2,
                        rss_bytes: 0,
                    })
                    .collect();
                seg.extend_from_slice(&record(
                    seq,
                    &Batch {
                        seq,
                        epoch: 1,
                        profiles,
                        sealed_at: None,
                    },
                ));
                valid.insert(seq);
            }
            // Flip a byte somewhere in what is written so far (never in the header).
            2 if seg.len() > 32 && !arg.is_empty() => {
                let at = 32 + usize::from(arg[0]) * 131 % (seg.len() - 32);
                seg[at] ^= arg.get(1).copied().unwrap_or(1).max(1);
                damaged = true;
            }
            // Raw garbage.
            3 => {
                seg.extend_from_slice(arg);
                damaged |= !arg.is_empty();
            }
            // Ack log bytes.
            _ => acks.extend_from_slice(arg),
        }
    }
    // A torn tail: the last byte of the input cuts that many bytes off.
    if let Some(&cut) = data.last()
        && cut % 4 == 0
        && seg.len() > 32
    {
        let cut = usize::from(cut / 4).min(seg.len() - 32);
        seg.truncate(seg.len() - cut);
        damaged |= cut > 0;
    }
    std::fs::write(spool_dir.join("seg-00000000000000000001.spool"), &seg).unwrap();
    if !acks.is_empty() {
        std::fs::write(spool_dir.join("acks.log"), &acks).unwrap();
    }
    let cfg = SpoolConfig {
        dir: spool_dir,
        max_bytes: 64 * 1024 * 1024,
        ..Default::default()
    };
    let mut spool = Spool::open(&cfg).expect("recovery never refuses a damaged spool");
    let mut seen = HashSet::new();
    while let Some(sb) = spool.take_next().expect("read back") {
        assert!(
            valid.contains(&sb.batch.seq),
            "handed out a record never written: {}",
            sb.batch.seq
        );
        assert!(
            seen.insert(sb.batch.seq),
            "handed out twice: {}",
            sb.batch.seq
        );
        spool.ack(sb.id).expect("ack");
    }
    if !damaged && acks.is_empty() {
        assert_eq!(seen, valid, "an undamaged spool hands out every record");
    }
    spool.close();
}
