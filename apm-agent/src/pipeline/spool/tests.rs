use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::*;
use crate::config::{FsyncPolicy, SpoolConfig, SpoolFull};
use crate::pipeline::model::{Batch, Profile};

fn cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 20,
        segment_bytes: 4096,
        fsync: FsyncPolicy::Never,
        on_full: SpoolFull::DropOldest,
        ..SpoolConfig::default()
    }
}

fn batch(seq: u64, profiles: usize, payload_len: usize) -> Batch {
    Batch {
        seq,
        epoch: 1,
        sealed_at: None,
        profiles: (0..profiles)
            .map(|i| {
                let head = format!("{{\"seq\":{seq},\"i\":{i},\"x\":\"");
                let fill = payload_len.saturating_sub(head.len() + 2);
                Profile {
                    payload: Bytes::from(format!("{head}{}\"}}", "a".repeat(fill))),
                    received_ns: seq * 1000 + i as u64,
                    pid: 100 + i as u32,
                    uid: 33,
                    rss_bytes: 4096,
                }
            })
            .collect(),
    }
}

fn drain(s: &mut Spool) -> Vec<SpooledBatch> {
    std::iter::from_fn(|| s.take_next().unwrap()).collect()
}

fn seqs(v: &[SpooledBatch]) -> Vec<u64> {
    v.iter().map(|b| b.batch.seq).collect()
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    v.sort();
    v
}

#[test]
fn append_take_ack_roundtrip_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    let batches: Vec<Batch> = (1..=20).map(|i| batch(i, 2, 300)).collect();
    for b in &batches {
        assert!(s.append(b).unwrap().id.is_some());
    }
    assert!(
        seg_files(dir.path()).len() > 1,
        "4 KiB segments must rotate"
    );
    assert_eq!(s.stats().batches, 20);
    assert_eq!(s.stats().profiles, 40);
    let got = drain(&mut s);
    assert_eq!(
        got.iter().map(|b| b.batch.clone()).collect::<Vec<_>>(),
        batches
    );
    assert!(
        s.take_next().unwrap().is_none(),
        "nothing is handed out twice"
    );
    assert_eq!(s.stats().in_flight, 20);
    for b in &got {
        assert!(s.ack(b.id).unwrap());
        assert!(!s.ack(b.id).unwrap(), "a second ack is a no-op");
    }
    // Sealed segments went with their last ack; only the active one stays.
    assert_eq!(seg_files(dir.path()).len(), 1);
    assert_eq!(s.stats().batches, 0);
    drop(s);
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert!(s.take_next().unwrap().is_none());
    assert!(
        seg_files(dir.path()).is_empty(),
        "fully acked segment removed at open"
    );
}

#[test]
fn requeued_records_come_back_first_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    for i in 1..=6 {
        s.append(&batch(i, 1, 100)).unwrap();
    }
    let a: Vec<_> = (0..4).map(|_| s.take_next().unwrap().unwrap()).collect();
    assert_eq!(s.requeue(a[2].id), Dropped::default());
    assert_eq!(s.requeue(a[1].id), Dropped::default());
    s.ack(a[0].id).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![2, 3, 5, 6]);
    assert_eq!(s.requeue_all(), Dropped::default());
    assert_eq!(seqs(&drain(&mut s)), vec![2, 3, 4, 5, 6]);
}

#[test]
fn acked_records_are_not_replayed_after_a_crash_unacked_ones_are() {
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval,
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let c = SpoolConfig {
            fsync,
            ..cfg(dir.path())
        };
        let mut s = Spool::open(&c).unwrap();
        for i in 1..=30 {
            s.append(&batch(i, 1, 250)).unwrap();
        }
        let got = drain(&mut s);
        for b in got.iter().filter(|b| b.batch.seq % 3 != 0) {
            s.ack(b.id).unwrap();
        }
        // Crash: no close, the in-flight multiples of 3 were never acked.
        drop(s);
        let mut s = Spool::open(&c).unwrap();
        let want: Vec<u64> = (1..=30).filter(|i| i % 3 == 0).collect();
        assert_eq!(seqs(&drain(&mut s)), want, "{fsync:?}");
        assert_eq!(s.stats().batches, 10);
    }
}

#[test]
fn write_ahead_records_are_not_handed_out_while_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    let a = s.append_taken(&batch(1, 1, 100)).unwrap().id.unwrap();
    let b = s.append_taken(&batch(2, 1, 100)).unwrap().id.unwrap();
    s.append(&batch(3, 1, 100)).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![3]);
    s.ack(a).unwrap();
    s.requeue(b);
    assert_eq!(seqs(&drain(&mut s)), vec![2]);
    drop(s);
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![2, 3]);
}

/// Appends `n` batches with a fresh spool and returns the last segment's path and the ends of
/// its records.
fn spool_with(dir: &Path, n: u64) -> Vec<(RecordId, u64)> {
    let mut s = Spool::open(&cfg(dir)).unwrap();
    let v = (1..=n)
        .map(|i| {
            let a = s.append(&batch(i, 1, 200)).unwrap();
            (a.id.unwrap(), a.bytes)
        })
        .collect();
    s.close();
    v
}

#[test]
fn torn_tail_is_truncated_to_the_last_good_record() {
    let dir = tempfile::tempdir().unwrap();
    let recs = spool_with(dir.path(), 5);
    let (last, len) = recs[4];
    let path = dir.path().join(segment_name(last.segment));
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last.offset + len / 2).unwrap();
    drop(f);
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2, 3, 4]);
    let st = s.stats();
    assert_eq!((st.torn_bytes, st.corrupt_records), (len / 2, 0));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last.offset);
}

#[test]
fn a_bit_flipped_record_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let recs = spool_with(dir.path(), 5);
    let (victim, _) = recs[2];
    let path = dir.path().join(segment_name(victim.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[victim.offset as usize + 60] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().corrupt_records, 1);
    assert_eq!(s.stats().batches, 4);
    let got = drain(&mut s);
    assert_eq!(seqs(&got), vec![1, 2, 4, 5]);
    for b in &got {
        s.ack(b.id).unwrap();
    }
    drop(s);
    // Reported again on the next open (the bytes are still there), never handed out.
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert!(drain(&mut s).is_empty());
}

#[test]
fn a_corrupt_length_is_resynchronised_past() {
    let dir = tempfile::tempdir().unwrap();
    let recs = spool_with(dir.path(), 5);
    let (victim, _) = recs[1];
    let path = dir.path().join(segment_name(victim.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[victim.offset as usize + 5] ^= 0x01; // length field: +256 bytes
    std::fs::write(&path, &bytes).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![1, 3, 4, 5]);
    assert_eq!(s.stats().corrupt_records, 1);
}

#[test]
fn a_bit_flip_in_the_last_record_truncates_it_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let recs = spool_with(dir.path(), 3);
    let (last, _) = recs[2];
    let path = dir.path().join(segment_name(last.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2]);
    assert_eq!(s.stats().corrupt_records, 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last.offset);
}

#[test]
fn foreign_and_garbage_files_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    spool_with(dir.path(), 3);
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.path().join(segment_name(999)), vec![0xEEu8; 5000]).unwrap();
    // A real segment renamed to another id: its header disagrees with its name.
    let first = seg_files(dir.path())[0].clone();
    std::fs::copy(&first, dir.path().join(segment_name(500))).unwrap();
    std::fs::create_dir(dir.path().join("subdir")).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().quarantined, 4);
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2, 3]);
    let q = dir.path().join(QUARANTINE_DIR);
    for name in [
        "notes.txt",
        &segment_name(999),
        &segment_name(500),
        "subdir",
    ] {
        assert!(q.join(name).exists(), "{name} not in quarantine");
        assert!(!dir.path().join(name).exists());
    }
    // New segments are numbered after every id ever seen, quarantined ones included.
    let id = s.append(&batch(4, 1, 10)).unwrap().id.unwrap();
    assert_eq!(id.segment, 1000);
    drop(s);
    // The same names again: quarantine keeps both copies.
    std::fs::write(dir.path().join("notes.txt"), "again").unwrap();
    let s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().quarantined, 1);
    assert!(q.join("notes.txt.1").exists());
}

#[test]
fn an_unreadable_ack_log_is_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    spool_with(dir.path(), 2);
    std::fs::remove_file(dir.path().join("acks.log")).unwrap();
    std::fs::create_dir(dir.path().join("acks.log")).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().quarantined, 1);
    assert!(dir.path().join(QUARANTINE_DIR).join("acks.log").is_dir());
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2]);
}

#[test]
fn empty_and_torn_header_segments_are_removed_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    spool_with(dir.path(), 2);
    std::fs::write(dir.path().join(segment_name(7)), b"").unwrap();
    std::fs::write(
        dir.path().join(segment_name(8)),
        &format::segment_header(8)[..10],
    )
    .unwrap();
    std::fs::write(dir.path().join(segment_name(9)), format::segment_header(9)).unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().quarantined, 0);
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2]);
    for id in [7, 8, 9] {
        assert!(!dir.path().join(segment_name(id)).exists());
    }
    assert_eq!(s.append(&batch(3, 1, 10)).unwrap().id.unwrap().segment, 10);
}

#[test]
fn an_empty_dir_or_missing_dir_opens_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(&cfg(&dir.path().join("a/b"))).unwrap();
    assert!(s.take_next().unwrap().is_none());
    assert_eq!(s.stats(), SpoolStats::default());
}

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Spool::open(&cfg(dir.path())).unwrap();
    let err = Spool::open(&cfg(dir.path())).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
}

#[test]
fn max_bytes_beyond_the_volume_is_refused_with_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    let c = SpoolConfig {
        max_bytes: u64::MAX / 4,
        ..cfg(dir.path())
    };
    let err = Spool::open(&c).unwrap_err();
    let SpoolError::InsufficientSpace {
        configured, total, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*configured, u64::MAX / 4);
    assert!(*total > 0);
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()) && msg.contains("spool.max_bytes"));
}

/// Appends until `n` batches were offered; returns (profiles offered, dropped).
fn offer(s: &mut Spool, seqs: std::ops::Range<u64>, profiles: usize) -> (u64, Dropped) {
    let mut offered = 0;
    let mut dropped = Dropped::default();
    for i in seqs {
        let a = s.append(&batch(i, profiles, 200)).unwrap();
        offered += profiles as u64;
        dropped += a.dropped;
    }
    (offered, dropped)
}

#[test]
fn drop_oldest_accounting_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let c = SpoolConfig {
        max_bytes: 16 * 1024,
        segment_bytes: 4096,
        ..cfg(dir.path())
    };
    let mut s = Spool::open(&c).unwrap();
    let (mut received, mut dropped) = offer(&mut s, 0..40, 3);
    // Some in flight when the next drops happen: delivered if acked, dropped if requeued.
    let out: Vec<_> = (0..4).map(|_| s.take_next().unwrap().unwrap()).collect();
    let (r, d) = offer(&mut s, 40..140, 2);
    received += r;
    dropped += d;
    assert!(s.stats().bytes <= c.max_bytes);
    assert!(dropped.batches > 0);
    let mut delivered = 0;
    assert!(s.ack(out[0].id).unwrap());
    delivered += out[0].batch.len() as u64;
    dropped += s.requeue(out[1].id);
    dropped += s.requeue_all();
    while let Some(b) = s.take_next().unwrap() {
        delivered += b.batch.len() as u64;
        s.ack(b.id).unwrap();
    }
    assert_eq!(received, delivered + dropped.profiles);
    let st = s.stats();
    assert_eq!(st.dropped_profiles, dropped.profiles);
    assert_eq!(st.dropped_batches, dropped.batches);
    // The newest survive: the last batch offered is delivered.
    assert_eq!((st.batches, st.pending), (0, 0));
}

#[test]
fn drop_newest_accounting_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let c = SpoolConfig {
        max_bytes: 16 * 1024,
        segment_bytes: 4096,
        on_full: SpoolFull::DropNewest,
        ..cfg(dir.path())
    };
    let mut s = Spool::open(&c).unwrap();
    let (received, dropped) = offer(&mut s, 0..100, 2);
    assert!(dropped.batches > 0);
    assert!(s.stats().bytes <= c.max_bytes);
    let got = drain(&mut s);
    // The oldest were kept, in order.
    assert_eq!(seqs(&got), (0..got.len() as u64).collect::<Vec<_>>());
    let delivered: u64 = got.iter().map(|b| b.batch.len() as u64).sum();
    assert_eq!(received, delivered + dropped.profiles);
    assert_eq!(dropped.batches, 100 - got.len() as u64);
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own_and_too_large_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(&cfg(dir.path())).unwrap();
    s.append(&batch(1, 1, 100)).unwrap();
    let big = s.append(&batch(2, 1, 10_000)).unwrap().id.unwrap();
    assert_eq!(big.offset, SEGMENT_HEADER_LEN);
    let err = s.append(&batch(3, 1, 2 << 20)).unwrap_err();
    assert!(matches!(err, SpoolError::RecordTooLarge { .. }), "{err}");
    assert_eq!(seqs(&drain(&mut s)), vec![1, 2]);
}

/// Unmounts on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn disk_full_is_a_typed_error_leaves_no_partial_record_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    ) {
        // Needs CAP_SYS_ADMIN (CI runs as root).
        eprintln!("skipped: cannot mount a tmpfs ({e})");
        return;
    }
    let _guard = Tmpfs(mnt.clone());
    let c = SpoolConfig {
        max_bytes: 512 * 1024,
        segment_bytes: 64 * 1024,
        ..cfg(&mnt.join("spool"))
    };
    let mut s = Spool::open(&c).unwrap();
    let mut seq = 0;
    for _ in 0..200 {
        seq += 1;
        s.append(&batch(seq, 1, 1000)).unwrap();
    }
    // Something else fills the volume.
    let filler = mnt.join("filler");
    let fill = || {
        use std::io::Write;
        let mut f = File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    };
    fill();
    let mut append_until_full = |s: &mut Spool| loop {
        seq += 1;
        if let Err(e) = s.append(&batch(seq, 1, 1000)) {
            break e;
        }
    };
    let err = append_until_full(&mut s);
    assert!(err.is_disk_full(), "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");
    let kept = s.stats().batches;
    // The failed append left nothing behind: a restart finds no torn or corrupt record.
    drop(s);
    std::fs::remove_file(&filler).unwrap();
    let mut s = Spool::open(&c).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.batches, st.torn_bytes, st.corrupt_records),
        (kept, 0, 0)
    );
    // drop_oldest under a full disk: make room, then the append goes through.
    fill();
    let err = append_until_full(&mut s);
    assert!(err.is_disk_full(), "{err}");
    let kept = s.stats().batches;
    let d = s.drop_oldest_segment().unwrap();
    assert!(d.batches > 0);
    s.append(&batch(seq, 1, 1000)).unwrap();
    assert_eq!(s.stats().batches, kept - d.batches + 1);
    // Space comes back: appends go on.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..10 {
        seq += 1;
        s.append(&batch(seq, 1, 1000)).unwrap();
    }
    drop(s);
    let mut s = Spool::open(&c).unwrap();
    assert_eq!(s.stats().corrupt_records, 0);
    assert_eq!(s.stats().torn_bytes, 0);
    let got = drain(&mut s);
    assert_eq!(got.len() as u64, kept - d.batches + 11);
    let mut sorted = seqs(&got);
    sorted.dedup();
    assert_eq!(sorted.len(), got.len());
}

// ---- property test: the spool against an in-memory model ----

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            profiles: u8,
            len: u16,
        },
        AppendTaken {
            profiles: u8,
            len: u16,
        },
        Take,
        Ack(usize),
        Requeue(usize),
        RequeueAll,
        /// Drop without close; optionally cut the newest segment at this fraction of its length.
        Crash(Option<f64>),
        Reopen,
        /// What the router does when the disk is full under `drop_oldest`.
        DropOldestSegment,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u8..5, 20u16..600).prop_map(|(profiles, len)| Op::Append { profiles, len }),
            2 => (1u8..5, 20u16..600).prop_map(|(profiles, len)| Op::AppendTaken { profiles, len }),
            5 => Just(Op::Take),
            4 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::Requeue),
            1 => Just(Op::RequeueAll),
            1 => proptest::option::of(0.0f64..1.0).prop_map(Op::Crash),
            1 => Just(Op::Reopen),
            1 => Just(Op::DropOldestSegment),
        ]
    }

    #[derive(Debug)]
    struct Rec {
        id: RecordId,
        end: u64,
        batch: Batch,
    }

    #[derive(Debug, Default)]
    struct Model {
        /// Unacked records on disk, by seq.
        recs: BTreeMap<u64, Rec>,
        /// Seqs handed out; orphans (handed out, then their segment was dropped) keep their id
        /// and profile count here.
        in_flight: BTreeSet<u64>,
        orphans: BTreeMap<u64, (RecordId, u64)>,
        received: u64,
        delivered: u64,
        dropped: u64,
        /// What the spool's own counter should say (it counts since open).
        dropped_since_open: u64,
        /// Lost to a simulated torn write or to a crash while orphaned in flight.
        lost: u64,
    }

    impl Model {
        fn drop_profiles(&mut self, n: u64) {
            self.dropped += n;
            self.dropped_since_open += n;
        }

        fn orphaned(&self) -> u64 {
            self.orphans.values().map(|(_, n)| n).sum()
        }

        /// A crash or restart: what was in flight is pending again, orphans are lost.
        fn restart(&mut self) {
            self.lost += self.orphaned();
            self.orphans.clear();
            self.in_flight.clear();
            self.dropped_since_open = 0;
        }

        fn pending_in_order(&self) -> Vec<u64> {
            let mut v: Vec<(RecordId, u64)> = self
                .recs
                .iter()
                .filter(|(s, _)| !self.in_flight.contains(s))
                .map(|(s, r)| (r.id, *s))
                .collect();
            v.sort();
            v.into_iter().map(|(_, s)| s).collect()
        }

        /// Records whose segment the spool dropped; returns the profiles dropped now.
        fn apply_segment_drops(&mut self, live: &BTreeSet<u64>) -> u64 {
            let gone: Vec<u64> = self
                .recs
                .iter()
                .filter(|(_, r)| !live.contains(&r.id.segment))
                .map(|(s, _)| *s)
                .collect();
            let mut dropped = 0;
            for seq in gone {
                let r = self.recs.remove(&seq).unwrap();
                let n = r.batch.len() as u64;
                if self.in_flight.contains(&seq) {
                    self.orphans.insert(seq, (r.id, n));
                } else {
                    dropped += n;
                }
            }
            self.drop_profiles(dropped);
            dropped
        }
    }

    fn live(s: &Spool) -> BTreeSet<u64> {
        s.segment_ids().into_iter().collect()
    }

    fn check_reopened(s: &mut Spool, m: &Model) {
        let got = drain(s);
        let want = m.pending_in_order();
        assert_eq!(seqs(&got), want, "after reopen");
        for b in &got {
            assert_eq!(
                b.batch, m.recs[&b.batch.seq].batch,
                "content of seq {}",
                b.batch.seq
            );
        }
        let st = s.stats();
        assert_eq!((st.corrupt_records, st.quarantined), (0, 0));
        assert_eq!(st.batches, m.recs.len() as u64);
        let profiles: u64 = m.recs.values().map(|r| r.batch.len() as u64).sum();
        assert_eq!(st.profiles, profiles);
        s.requeue_all();
    }

    /// Appends `b` (taken: handed out at once, as the write-ahead does) to spool and model.
    fn append(s: &mut Spool, m: &mut Model, c: &SpoolConfig, b: Batch, taken: bool) {
        let seq = b.seq;
        let a = if taken {
            s.append_taken(&b).unwrap()
        } else {
            s.append(&b).unwrap()
        };
        m.received += b.len() as u64;
        match a.id {
            None => {
                assert_eq!(c.on_full, SpoolFull::DropNewest);
                assert_eq!(a.dropped.profiles, b.len() as u64);
                m.drop_profiles(b.len() as u64);
            }
            Some(id) => {
                let dropped = m.apply_segment_drops(&live(s));
                assert_eq!(a.dropped.profiles, dropped);
                if taken {
                    m.in_flight.insert(seq);
                }
                m.recs.insert(
                    seq,
                    Rec {
                        id,
                        end: id.offset + a.bytes,
                        batch: b,
                    },
                );
            }
        }
        assert!(s.stats().bytes <= c.max_bytes);
    }

    /// Acks (or requeues) the `k`-th batch in flight, orphans included.
    fn settle(s: &mut Spool, m: &mut Model, k: usize, ack: bool) {
        let seq = *m.in_flight.iter().nth(k % m.in_flight.len()).unwrap();
        m.in_flight.remove(&seq);
        let (id, n, orphan) = if let Some((id, n)) = m.orphans.remove(&seq) {
            (id, n, true)
        } else {
            let r = &m.recs[&seq];
            (r.id, r.batch.len() as u64, false)
        };
        if ack {
            assert!(s.ack(id).unwrap());
            m.delivered += n;
            m.recs.remove(&seq);
        } else {
            let d = s.requeue(id);
            if orphan {
                assert_eq!(d.profiles, n);
                m.drop_profiles(n);
            } else {
                assert_eq!(d, Dropped::default());
            }
        }
    }

    /// A crash mid-write: the last segment cut at `frac` of its length; the records past the
    /// cut are lost in the model.
    fn tear_last_segment(dir: &Path, m: &mut Model, frac: f64) {
        let Some(last) = seg_files(dir).pop() else {
            return;
        };
        let len = std::fs::metadata(&last).unwrap().len();
        let at = (len as f64 * frac) as u64;
        let f = OpenOptions::new().write(true).open(&last).unwrap();
        f.set_len(at).unwrap();
        let name = last.file_name().unwrap().to_str().unwrap();
        let segment = parse_segment_name(name).unwrap();
        let torn: Vec<u64> = m
            .recs
            .iter()
            .filter(|(_, r)| r.id.segment == segment && r.end > at)
            .map(|(s, _)| *s)
            .collect();
        for seq in torn {
            m.lost += m.recs.remove(&seq).unwrap().batch.len() as u64;
        }
    }

    fn run(ops: Vec<Op>, fsync: FsyncPolicy, on_full: SpoolFull) {
        let dir = tempfile::tempdir().unwrap();
        let c = SpoolConfig {
            max_bytes: 12 * 1024,
            segment_bytes: 2048,
            fsync,
            on_full,
            ..cfg(dir.path())
        };
        let mut s = Spool::open(&c).unwrap();
        let mut m = Model::default();
        let mut seq = 0;
        for op in ops {
            match op {
                Op::Append { profiles, len } | Op::AppendTaken { profiles, len } => {
                    seq += 1;
                    let taken = matches!(op, Op::AppendTaken { .. });
                    append(
                        &mut s,
                        &mut m,
                        &c,
                        batch(seq, profiles as usize, len as usize),
                        taken,
                    );
                }
                Op::Take => {
                    let want = m.pending_in_order().first().copied();
                    let got = s.take_next().unwrap();
                    assert_eq!(got.as_ref().map(|b| b.batch.seq), want);
                    if let Some(b) = got {
                        assert_eq!(b.batch, m.recs[&b.batch.seq].batch);
                        assert_eq!(b.id, m.recs[&b.batch.seq].id);
                        m.in_flight.insert(b.batch.seq);
                    }
                }
                Op::Ack(k) | Op::Requeue(k) if !m.in_flight.is_empty() => {
                    settle(&mut s, &mut m, k, matches!(op, Op::Ack(_)));
                }
                Op::Ack(_) | Op::Requeue(_) => {}
                Op::RequeueAll => {
                    let d = s.requeue_all();
                    let orphaned = m.orphaned();
                    assert_eq!(d.profiles, orphaned);
                    m.drop_profiles(orphaned);
                    m.orphans.clear();
                    m.in_flight.clear();
                }
                Op::Crash(cut) => {
                    drop(s);
                    m.restart();
                    if let Some(frac) = cut {
                        tear_last_segment(dir.path(), &mut m, frac);
                    }
                    s = Spool::open(&c).unwrap();
                    check_reopened(&mut s, &m);
                }
                Op::Reopen => {
                    s.close();
                    m.restart();
                    s = Spool::open(&c).unwrap();
                    check_reopened(&mut s, &m);
                }
                Op::DropOldestSegment => {
                    let d = s.drop_oldest_segment().unwrap();
                    let dropped = m.apply_segment_drops(&live(&s));
                    assert_eq!(d.profiles, dropped);
                }
            }
            s.check_accounting();
            let in_spool: u64 = m.recs.values().map(|r| r.batch.len() as u64).sum();
            assert_eq!(
                m.received,
                m.delivered + m.dropped + m.lost + in_spool + m.orphaned()
            );
            assert_eq!(s.stats().dropped_profiles, m.dropped_since_open);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn spool_matches_model(
            ops in proptest::collection::vec(op(), 1..80),
            fsync in prop_oneof![Just(FsyncPolicy::Never), Just(FsyncPolicy::Interval), Just(FsyncPolicy::Always)],
            on_full in prop_oneof![Just(SpoolFull::DropOldest), Just(SpoolFull::DropNewest)],
        ) {
            run(ops, fsync, on_full);
        }
    }
}

/// A rejected batch is kept as JSON under `rejected/`, which the spool's recovery leaves in
/// place (it is not a foreign file); past a quarter of `max_bytes` nothing more is written.
#[test]
fn rejected_batches_are_kept_as_json_and_survive_a_reopen_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = batch(7, 3, 100);
    let path = keep_rejected(dir.path(), 1 << 20, &b, "no \"way\"").unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).expect("valid JSON");
    assert_eq!(v["seq"], 7);
    assert_eq!(v["reason"], "no \"way\"");
    assert_eq!(v["profiles"].as_array().unwrap().len(), 3);
    assert_eq!(v["profiles"][2]["i"], 2);
    let s = Spool::open(&cfg(dir.path())).unwrap();
    assert_eq!(s.stats().quarantined, 0);
    drop(s);
    assert!(path.exists(), "still in rejected/ after a reopen");
    // Limit 3 KiB: two batches of ~1.1 KiB fit beside the first, a third does not.
    let big = batch(8, 10, 100);
    keep_rejected(dir.path(), 12 << 10, &big, "r").unwrap();
    keep_rejected(dir.path(), 12 << 10, &batch(9, 10, 100), "r").unwrap();
    let e = keep_rejected(dir.path(), 12 << 10, &batch(10, 10, 100), "r").unwrap_err();
    assert!(e.to_string().contains("spool.max_bytes / 4"), "{e}");
}
