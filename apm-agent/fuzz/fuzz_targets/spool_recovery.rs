//! Spool recovery on arbitrary file contents. The fuzz input is a little program that writes
//! one segment file (valid header) out of valid records (real batches, correct checksums),
//! records with a flipped byte, raw garbage and a cut-off tail, plus an ack log of fuzz bytes.
//! Opening must never panic or fail; every record handed out must be one of the valid records
//! written, each at most once; with no damage at all, every valid record is handed out.
#![no_main]

use std::collections::HashSet;

use apm_agent::config::SpoolConfig;
use apm_agent::pipeline::model::{Batch, Profile};
use apm_agent::pipeline::spool::Spool;
use libfuzzer_sys::fuzz_target;

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn segment_header(id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(b"APMSPOOL");
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    let crc = crc32c(&h);
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
    r.extend_from_slice(&crc32c(&covered).to_le_bytes());
    r.extend_from_slice(&body);
    r
}

fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: the spool fsyncs, and a disk would make each run take ms.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let spool_dir = dir.path().join("spool");
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
                seg.extend_from_slice(&record(seq, &Batch { seq, epoch: 1, profiles }));
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
});
