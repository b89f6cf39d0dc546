//! The disk spool: segment files of checksummed records, one record per batch.
//!
//! Synchronous `std::fs` code: the owner calls it from one blocking thread (or
//! `spawn_blocking`). The on-disk format, the recovery rules and the guarantees are in
//! `docs/spool.md`; in short:
//!
//! * [`Spool::append`] writes a batch as one record at the end of the active segment (one
//!   `pwrite`), fsynced per `spool.fsync`. A full spool drops whole oldest segments
//!   (`drop_oldest`) or refuses the batch (`drop_newest`); either way [`Appended::dropped`] says
//!   how many batches and profiles went.
//! * [`Spool::take_next`] hands out unacked records oldest first, each at most once until it is
//!   [`Spool::ack`]ed (gone for good, also after a restart) or [`Spool::requeue`]d (handed out
//!   again, oldest first).
//! * [`Spool::open`] recovers: torn tails are truncated, corrupt records skipped and counted,
//!   foreign files moved to `quarantine/`, acked records not replayed.

mod acklog;
mod format;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use tracing::{error, info, warn};

use crate::config::{FsyncPolicy, SpoolConfig, SpoolFull};
use crate::pipeline::model::Batch;
use acklog::AckLog;
use format::{RECORD_HEADER_LEN, ReadAt, SEGMENT_HEADER_LEN};

/// Where foreign files found in the spool dir are moved.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Where batches the central listener rejected are kept, one JSON file each
/// ([`keep_rejected`]).
pub const REJECTED_DIR: &str = "rejected";
const LOCK_FILE: &str = "spool.lock";
/// The ack log is rewritten once it holds this many more entries than live acks (and twice).
const ACK_LOG_COMPACT_SLACK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("spool: disk full while trying to {op} {path}; free space or lower spool.max_bytes")]
    DiskFull { op: &'static str, path: PathBuf },
    #[error(
        "spool dir {dir} is locked by {} (is another apm-agent running with the same spool.dir, or an old one still stopping?); exiting so the supervisor tries again",
        holder.map_or_else(|| "another process".to_string(), |p| format!("process {p}"))
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
    #[error(
        "spool.max_bytes is {configured} bytes but the whole volume of spool.dir {dir} is only {total} bytes; lower spool.max_bytes or give the spool a larger volume"
    )]
    InsufficientSpace {
        dir: PathBuf,
        configured: u64,
        total: u64,
    },
    #[error("spool: a record of {size} bytes cannot fit in spool.max_bytes = {max}")]
    RecordTooLarge { size: u64, max: u64 },
}

impl SpoolError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC)
                || source.raw_os_error() == Some(libc::EDQUOT)
            {
                SpoolError::DiskFull {
                    op,
                    path: path.to_path_buf(),
                }
            } else {
                SpoolError::Io {
                    op,
                    path: path.to_path_buf(),
                    source,
                }
            }
        }
    }

    /// True for errors a later retry may not hit (disk full): the caller should drop per policy.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull { .. })
    }
}

/// A record's address: its segment and byte offset. Ordered like the appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", segment_name(self.segment), self.offset)
    }
}

/// Batches and profiles that left the spool undelivered (count them as `DropReason::SpoolFull`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub batches: u64,
    pub profiles: u64,
}

impl std::ops::AddAssign for Dropped {
    fn add_assign(&mut self, o: Self) {
        self.batches += o.batches;
        self.profiles += o.profiles;
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The new record; `None` when `drop_newest` refused the batch (it is in `dropped`).
    pub id: Option<RecordId>,
    /// Bytes the record takes on disk (header included); 0 when refused.
    pub bytes: u64,
    /// What was dropped to make room (drop_oldest) or refused (drop_newest).
    pub dropped: Dropped,
}

/// A record handed out for sending.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledBatch {
    pub id: RecordId,
    pub batch: Batch,
    /// Bytes on disk, header included.
    pub bytes: u64,
}

/// The spool's figures. Gauges describe the spool now; counters count since [`Spool::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Unacked batches on disk (pending and in flight).
    pub batches: u64,
    /// Profiles in those batches.
    pub profiles: u64,
    /// Bytes of all segment files (acked records in live segments included).
    pub bytes: u64,
    pub segments: u64,
    /// Handed out by `take_next`/`append_taken`, not yet acked or requeued.
    pub in_flight: u64,
    /// Batches `take_next` still has to hand out.
    pub pending: u64,
    pub dropped_batches: u64,
    pub dropped_profiles: u64,
    /// Records skipped because their checksum (or body) was bad.
    pub corrupt_records: u64,
    /// Profiles lost at open in records that were corrupt or cut off (a torn tail), from
    /// their headers; a record whose header is unreadable adds 0 here (see `corrupt_records`).
    pub corrupt_profiles: u64,
    /// Bytes cut off torn tails (segments and ack log).
    pub torn_bytes: u64,
    /// Files moved to `quarantine/`.
    pub quarantined: u64,
    /// Ack log entries with a bad checksum (those records may be replayed once).
    pub bad_ack_entries: u64,
    pub fsync_errors: u64,
}

#[derive(Debug)]
struct Segment {
    size: u64,
    sealed: bool,
    unacked_records: u64,
    unacked_profiles: u64,
    /// Offsets of acked records (cleared when the segment goes).
    acked: BTreeSet<u64>,
    /// Corrupt ranges to step over: start -> end.
    holes: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    profiles: u32,
    /// Its segment was dropped while it was out: an ack still counts it delivered, a requeue
    /// counts it dropped.
    orphan: bool,
}

pub struct Spool {
    dir: PathBuf,
    cfg: SpoolConfig,
    _lock: Flock<File>,
    segments: BTreeMap<u64, Segment>,
    next_segment_id: u64,
    /// The active (unsealed) segment and its file.
    writer: Option<(u64, File)>,
    reader: Option<(u64, File)>,
    acklog: AckLog,
    /// Next position `take_next` reads from disk; everything before it was handed out.
    cursor: RecordId,
    in_flight: BTreeMap<RecordId, InFlight>,
    /// Requeued records behind the cursor, handed out again first.
    requeued: BTreeSet<RecordId>,
    bytes: u64,
    /// What the spool may hold now: `max_bytes`, or less while its volume is short of free
    /// space (see [`Spool::refresh_capacity`]).
    capacity: u64,
    stats: SpoolStats,
    dirty: bool,
    last_sync: Instant,
    body: Vec<u8>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("cursor", &self.cursor)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

pub fn segment_name(id: u64) -> String {
    format!("seg-{id:020}.spool")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".spool")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

use crate::fsutil::sync_dir;

/// Writes `data` to `path` atomically and durably (owner-only: spool and breaker state).
pub fn write_atomic_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    crate::fsutil::write_atomic(path, data, 0o600)
}

/// Keeps a batch the central listener rejected in `<spool.dir>/rejected/` so that an operator
/// can inspect and resend it: `batch-<epoch>-<seq>.json`, holding
/// `{"seq", "epoch", "reason", "profiles": [<each payload as received>]}` (payloads are
/// validated JSON objects, so the file is JSON). The directory holds at most a quarter of
/// `spool.max_bytes`; past that the batch is not written (an error says so), and either way it
/// is counted in `dropped.rejected_by_central`. The path written, or why not.
pub fn keep_rejected(
    spool_dir: &Path,
    max_bytes: u64,
    batch: &Batch,
    reason: &str,
) -> Result<PathBuf, SpoolError> {
    let dir = spool_dir.join(REJECTED_DIR);
    std::fs::create_dir_all(&dir).map_err(SpoolError::io("create", &dir))?;
    let mut doc = format!(
        "{{\"seq\":{},\"epoch\":\"{:016x}\",\"reason\":{},\"profiles\":[",
        batch.seq,
        batch.epoch,
        serde_json::Value::from(reason)
    );
    for (i, p) in batch.profiles.iter().enumerate() {
        if i > 0 {
            doc.push(',');
        }
        doc.push_str(&String::from_utf8_lossy(&p.payload));
    }
    doc.push_str("]}\n");
    let held: u64 = std::fs::read_dir(&dir)
        .map_err(SpoolError::io("read", &dir))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    if held + doc.len() as u64 > max_bytes / 4 {
        return Err(SpoolError::io("keep rejected batch in", &dir)(
            io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{held} bytes of rejected batches already kept (limit: spool.max_bytes / 4): move them away"
                ),
            ),
        ));
    }
    let path = dir.join(format!("batch-{:016x}-{}.json", batch.epoch, batch.seq));
    write_atomic_durable(&path, doc.as_bytes()).map_err(SpoolError::io("write", &path))?;
    Ok(path)
}

/// What [`Spool::make_room`] did.
enum Room {
    /// Room made, dropping these oldest records (none when there was room already).
    Made(Dropped),
    /// Full and `on_full = "drop_newest"`: the new record is refused.
    RefusedNewest,
}

/// The process holding a `flock` on `path`, from `/proc/locks` (for the error message).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    // "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF"
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Bytes in `blocks` blocks of `size` bytes. The statvfs fields are `u64` here but 32 bits wide
/// on some targets, hence the casts clippy finds useless on this one.
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn vfs_bytes(blocks: libc::fsblkcnt_t, size: libc::c_ulong) -> u64 {
    (blocks as u64).saturating_mul(size as u64)
}

/// Takes the spool directory's lock: one agent per spool.
fn lock(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = crate::daemon::pidfile::open_private(&lock_path)
        .map_err(SpoolError::io("create", &lock_path))?;
    Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            SpoolError::Locked {
                dir: dir.to_path_buf(),
                holder: lock_holder(&lock_path),
            }
        } else {
            SpoolError::io("lock", &lock_path)(e.into())
        }
    })
}

/// Opens the ack log; an unreadable one is quarantined (third value: 1) and a new one started.
fn open_acklog(dir: &Path) -> Result<(AckLog, acklog::Loaded, u64), SpoolError> {
    match AckLog::open(dir) {
        Ok((log, loaded)) => Ok((log, loaded, 0)),
        Err(e) => {
            // Unreadable (or not a file): set it aside rather than refuse to start; the acked
            // records it listed are replayed once and deduplicated by the listener.
            let path = dir.join(acklog::ACK_LOG);
            let to = dir.join(QUARANTINE_DIR).join(acklog::ACK_LOG);
            warn!(path = %path.display(), to = %to.display(), error = %e,
                "unreadable spool ack log moved to quarantine; acked batches may be replayed once");
            std::fs::create_dir_all(dir.join(QUARANTINE_DIR))
                .and_then(|()| std::fs::rename(&path, &to))
                .map_err(SpoolError::io("quarantine", &path))?;
            let (log, loaded) = AckLog::open(dir).map_err(SpoolError::io("open", &path))?;
            Ok((log, loaded, 1))
        }
    }
}

impl Spool {
    /// Opens (creating if needed) and recovers the spool in `cfg.dir`. Errors: the dir cannot be
    /// created or read, another process holds it, or `max_bytes` exceeds the size of its whole
    /// volume ([`SpoolError::InsufficientSpace`]: a config error, exit 78).
    pub fn open(cfg: &SpoolConfig) -> Result<Self, SpoolError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(SpoolError::io("create", &dir))?;
        let lock = lock(&dir)?;
        let (acklog, loaded, quarantined) = open_acklog(&dir)?;
        let mut spool = Spool {
            dir: dir.clone(),
            cfg: cfg.clone(),
            _lock: lock,
            segments: BTreeMap::new(),
            next_segment_id: 1,
            writer: None,
            reader: None,
            acklog,
            cursor: RecordId {
                segment: 0,
                offset: SEGMENT_HEADER_LEN,
            },
            in_flight: BTreeMap::new(),
            requeued: BTreeSet::new(),
            bytes: 0,
            capacity: cfg.max_bytes,
            stats: SpoolStats {
                bad_ack_entries: loaded.bad_entries,
                torn_bytes: loaded.torn_bytes,
                quarantined,
                ..SpoolStats::default()
            },
            dirty: false,
            last_sync: Instant::now(),
            body: Vec::new(),
        };
        if loaded.bad_entries > 0 {
            warn!(dir = %dir.display(), entries = loaded.bad_entries,
                "corrupt spool ack log entries skipped; their records may be replayed once");
        }
        let mut acked_by_segment: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut max_id = 0;
        for id in loaded.acked {
            max_id = max_id.max(id.segment);
            acked_by_segment
                .entry(id.segment)
                .or_default()
                .insert(id.offset);
        }
        let found = spool.scan_dir()?;
        max_id = max_id.max(found.last().copied().unwrap_or(0));
        for id in found {
            let acked = acked_by_segment.remove(&id).unwrap_or_default();
            if let Err(e) = spool.recover_segment(id, acked) {
                // One unreadable segment must not keep the agent from starting.
                warn!(segment = id, error = %e, "unreadable spool segment");
                spool.quarantine(&spool.seg_path(id), "unreadable segment");
            }
        }
        spool.next_segment_id = max_id + 1;
        spool.cursor.segment = spool.segments.keys().next().copied().unwrap_or(max_id + 1);
        spool.bytes = spool.segments.values().map(|s| s.size).sum();
        spool.check_space()?;
        spool.refresh_capacity();
        if spool.capacity < spool.cfg.max_bytes {
            // A runtime condition, not a configuration error: start with what fits (and grow
            // back to max_bytes as space returns) rather than stay down until someone looks.
            warn!(dir = %dir.display(), max_bytes = spool.cfg.max_bytes, capacity = spool.capacity,
                "spool.max_bytes does not fit the free space of the spool's volume now: \
                 starting with a smaller spool; free space on the volume");
        }
        spool.maybe_compact_ack_log();
        if let Err(e) = sync_dir(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot fsync spool dir");
        }
        let s = spool.stats();
        info!(dir = %dir.display(), batches = s.batches, profiles = s.profiles, bytes = s.bytes,
            segments = s.segments, corrupt = s.corrupt_records, quarantined = s.quarantined,
            "spool opened");
        Ok(spool)
    }

    /// The segment ids found in the directory, in order; anything else is quarantined and the
    /// temp files of interrupted atomic writes removed.
    fn scan_dir(&mut self) -> Result<Vec<u64>, SpoolError> {
        let dir = self.dir.clone();
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(SpoolError::io("read", &dir))?;
        for entry in entries {
            let entry = entry.map_err(SpoolError::io("read", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().map(str::to_owned) else {
                self.quarantine(&entry.path(), "name is not UTF-8");
                continue;
            };
            if name == LOCK_FILE
                || name == acklog::ACK_LOG
                || name == QUARANTINE_DIR
                || name == REJECTED_DIR
            {
                continue;
            }
            if name.starts_with('.') && name.contains(".tmp.") {
                // A temp file of an atomic write that crashed before its rename.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            match parse_segment_name(&name) {
                Some(id) if entry.file_type().is_ok_and(|t| t.is_file()) => found.push(id),
                _ => self.quarantine(&entry.path(), "not a spool file"),
            }
        }
        found.sort_unstable();
        Ok(found)
    }

    /// `max_bytes` must fit the whole volume: a configuration error otherwise. A volume that is
    /// only full right now is not one ([`Spool::refresh_capacity`]).
    fn check_space(&self) -> Result<(), SpoolError> {
        let vfs = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| SpoolError::Io {
            op: "statvfs",
            path: self.dir.clone(),
            source: e.into(),
        })?;
        let total = vfs_bytes(vfs.blocks(), vfs.fragment_size());
        if self.cfg.max_bytes > total {
            return Err(SpoolError::InsufficientSpace {
                dir: self.dir.clone(),
                configured: self.cfg.max_bytes,
                total,
            });
        }
        Ok(())
    }

    /// Sets the capacity to what fits now: `max_bytes`, or what the spool holds plus the
    /// volume's free space (less a reserve for the ack log) when that is smaller. Called at
    /// open and whenever a record would not fit, so the capacity grows back as space returns.
    fn refresh_capacity(&mut self) {
        /// Left free on the volume for the ack log and the next segment's header.
        const RESERVE: u64 = 256 * 1024;
        let Ok(vfs) = nix::sys::statvfs::statvfs(&self.dir) else {
            // Cannot tell: keep the configured size; a write that finds the disk full is
            // handled where it happens (DiskFull).
            self.capacity = self.cfg.max_bytes;
            return;
        };
        let free = vfs_bytes(vfs.blocks_available(), vfs.fragment_size());
        self.capacity = self
            .cfg
            .max_bytes
            .min(self.bytes.saturating_add(free.saturating_sub(RESERVE)));
    }

    /// What the spool may hold now (`max_bytes` unless its volume is short of space).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn seg_path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn quarantine(&mut self, path: &Path, reason: &str) {
        let qdir = self.dir.join(QUARANTINE_DIR);
        let name = path
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_default();
        let mut target = qdir.join(&name);
        let mut n = 1;
        while target.exists() {
            let mut alt = name.clone();
            alt.push(format!(".{n}"));
            target = qdir.join(alt);
            n += 1;
        }
        match std::fs::create_dir_all(&qdir).and_then(|()| std::fs::rename(path, &target)) {
            Ok(()) => {
                self.stats.quarantined += 1;
                warn!(path = %path.display(), to = %target.display(), reason,
                    "foreign file in the spool dir moved to quarantine");
            }
            Err(e) => warn!(path = %path.display(), error = %e, reason,
                "foreign file in the spool dir could not be quarantined; ignored"),
        }
    }

    /// Validates one segment at open: header, every record's checksum; truncates a torn tail,
    /// records corrupt ranges as holes, deletes it when nothing in it is left to deliver.
    fn recover_segment(&mut self, id: u64, acked: BTreeSet<u64>) -> Result<(), SpoolError> {
        let path = self.seg_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(SpoolError::io("open", &path))?;
        let len = file
            .metadata()
            .map_err(SpoolError::io("stat", &path))?
            .len();
        let expect = format::segment_header(id);
        let head_len = len.min(SEGMENT_HEADER_LEN) as usize;
        let mut head = vec![0u8; head_len];
        file.read_exact_at(&mut head, 0)
            .map_err(SpoolError::io("read", &path))?;
        if head[..] != expect[..head_len] {
            drop(file);
            self.quarantine(&path, "bad segment header");
            return Ok(());
        }
        if len < SEGMENT_HEADER_LEN {
            // Created, then crashed before its header was complete: nothing in it.
            self.stats.torn_bytes += len;
            info!(path = %path.display(), bytes = len, "empty spool segment removed");
            return Self::remove_file(&path);
        }
        let mut seg = Segment {
            size: len,
            sealed: true,
            unacked_records: 0,
            unacked_profiles: 0,
            acked: BTreeSet::new(),
            holes: BTreeMap::new(),
        };
        let mut records = 0u64;
        let mut off = SEGMENT_HEADER_LEN;
        while off < len {
            let read = format::read_record_at(&file, off, len, &mut self.body)
                .map_err(SpoolError::io("read", &path))?;
            match read {
                ReadAt::Record(h) => {
                    records += 1;
                    if acked.contains(&off) {
                        seg.acked.insert(off);
                    } else {
                        seg.unacked_records += 1;
                        seg.unacked_profiles += u64::from(h.profiles);
                    }
                    off += h.total_len();
                }
                bad => {
                    if let Some(next) =
                        self.skip_or_truncate(&file, &path, off, len, bad, acked.contains(&off))?
                    {
                        seg.holes.insert(off, next);
                        off = next;
                    } else {
                        seg.size = off;
                        break;
                    }
                }
            }
        }
        drop(file);
        if seg.unacked_records == 0 {
            if records > 0 || !seg.holes.is_empty() {
                info!(path = %path.display(), records, "spool segment fully acked or empty: removed");
            }
            return Self::remove_file(&path);
        }
        self.segments.insert(id, seg);
        Ok(())
    }

    /// A bad record at `off` in a segment of `len` bytes: skips to the next valid record
    /// (returned: the hole ends there), or truncates the segment at `off` (`None`) when
    /// nothing valid follows.
    fn skip_or_truncate(
        &mut self,
        file: &File,
        path: &Path,
        off: u64,
        len: u64,
        bad: ReadAt,
        acked: bool,
    ) -> Result<Option<u64>, SpoolError> {
        if let (ReadAt::Bad(Some(h)) | ReadAt::Torn(Some(h)), false) = (&bad, acked) {
            self.stats.corrupt_profiles += u64::from(h.profiles);
        }
        let next = format::find_next_valid(file, off, len, &mut self.body)
            .map_err(SpoolError::io("read", path))?;
        if let Some(next) = next {
            self.stats.corrupt_records += 1;
            warn!(path = %path.display(), offset = off, skipped_bytes = next - off,
                "corrupt spool record skipped");
            return Ok(Some(next));
        }
        if matches!(bad, ReadAt::Bad(_)) {
            self.stats.corrupt_records += 1;
            warn!(path = %path.display(), offset = off, bytes = len - off,
                "corrupt record at the end of a spool segment truncated");
        } else {
            self.stats.torn_bytes += len - off;
            warn!(path = %path.display(), offset = off, bytes = len - off,
                "torn spool segment tail truncated");
        }
        file.set_len(off)
            .and_then(|()| file.sync_all())
            .map_err(SpoolError::io("truncate", path))?;
        Ok(None)
    }

    fn remove_file(path: &Path) -> Result<(), SpoolError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SpoolError::io("remove", path)(e)),
            _ => Ok(()),
        }
    }

    fn sync_dir_per_policy(&mut self) {
        if self.cfg.fsync != FsyncPolicy::Never
            && let Err(e) = sync_dir(&self.dir)
        {
            self.stats.fsync_errors += 1;
            warn!(dir = %self.dir.display(), error = %e, "cannot fsync spool dir");
        }
    }

    /// Appends a batch for later replay by [`Self::take_next`].
    pub fn append(&mut self, batch: &Batch) -> Result<Appended, SpoolError> {
        self.append_inner(batch, false)
    }

    /// Appends a batch that the caller sends right away itself (write-ahead, `mode = always`):
    /// the record starts in flight, so `take_next` does not hand it out; the caller must
    /// [`Self::ack`] or [`Self::requeue`] it.
    pub fn append_taken(&mut self, batch: &Batch) -> Result<Appended, SpoolError> {
        self.append_inner(batch, true)
    }

    fn append_inner(&mut self, batch: &Batch, taken: bool) -> Result<Appended, SpoolError> {
        let profiles = batch.len() as u32;
        let body = batch.encode_record();
        let size = RECORD_HEADER_LEN + body.len() as u64;
        if body.len() as u64 > u64::from(format::MAX_RECORD_BODY)
            || size + 2 * SEGMENT_HEADER_LEN > self.cfg.max_bytes
        {
            return Err(SpoolError::RecordTooLarge {
                size,
                max: self.cfg.max_bytes,
            });
        }
        let dropped = match self.make_room(size)? {
            Room::Made(dropped) => dropped,
            Room::RefusedNewest => {
                let d = Dropped {
                    batches: 1,
                    profiles: u64::from(profiles),
                };
                self.count_dropped(d);
                return Ok(Appended {
                    id: None,
                    bytes: 0,
                    dropped: d,
                });
            }
        };
        let rotate = match &self.writer {
            None => true,
            Some((id, _)) => {
                let seg = &self.segments[id];
                seg.size + size > self.cfg.segment_bytes && seg.size > SEGMENT_HEADER_LEN
            }
        };
        if rotate {
            self.seal_active();
            self.create_segment()?;
        }
        let (id, file) = self.writer.as_ref().expect("active segment");
        let id = *id;
        let seg = self
            .segments
            .get_mut(&id)
            .expect("active segment is listed");
        let offset = seg.size;
        let rec = format::encode_record(batch.seq, profiles, &body);
        if let Err(e) = file.write_all_at(&rec, offset) {
            let path = self.seg_path(id);
            // Never leave a partial record behind; if even that fails, start a new segment.
            if let Err(te) = file.set_len(offset) {
                warn!(path = %path.display(), error = %te, "cannot cut a failed spool append");
                self.seal_active();
            }
            return Err(SpoolError::io("append to", &path)(e));
        }
        seg.size += size;
        seg.unacked_records += 1;
        seg.unacked_profiles += u64::from(profiles);
        self.bytes += size;
        let rid = RecordId {
            segment: id,
            offset,
        };
        if taken {
            self.in_flight.insert(
                rid,
                InFlight {
                    profiles,
                    orphan: false,
                },
            );
        }
        self.after_write();
        Ok(Appended {
            id: Some(rid),
            bytes: size,
            dropped,
        })
    }

    /// Makes room for a record of `size` bytes per `spool.on_full`: drops the oldest segments,
    /// or refuses the new record.
    fn make_room(&mut self, size: u64) -> Result<Room, SpoolError> {
        let mut dropped = Dropped::default();
        if self.bytes + size + SEGMENT_HEADER_LEN <= self.capacity {
            return Ok(Room::Made(dropped));
        }
        self.refresh_capacity();
        if self.bytes + size + SEGMENT_HEADER_LEN <= self.capacity {
            return Ok(Room::Made(dropped));
        }
        if self.cfg.on_full == SpoolFull::DropNewest {
            return Ok(Room::RefusedNewest);
        }
        while self.bytes + size + SEGMENT_HEADER_LEN > self.capacity {
            if self.segments.is_empty() {
                // An empty spool on a volume with less free space than one record: the write
                // finds the disk full (DiskFull) and the caller decides.
                if self.bytes != 0 {
                    // Cannot happen while `bytes` is the sum of the segments' sizes (the
                    // property test checks it after every operation); never spin.
                    error!(
                        counted = self.bytes,
                        "spool byte count without segments: reset"
                    );
                    self.bytes = 0;
                }
                break;
            }
            dropped += self.drop_oldest_segment()?;
        }
        Ok(Room::Made(dropped))
    }

    /// The fsync policy after a write.
    fn after_write(&mut self) {
        match self.cfg.fsync {
            FsyncPolicy::Always => self.sync_writer(),
            FsyncPolicy::Interval => {
                self.dirty = true;
                self.tick();
            }
            FsyncPolicy::Never => {}
        }
    }

    fn count_dropped(&mut self, d: Dropped) {
        self.stats.dropped_batches += d.batches;
        self.stats.dropped_profiles += d.profiles;
    }

    fn sync_writer(&mut self) {
        if let Some((id, f)) = &self.writer
            && let Err(e) = f.sync_data()
        {
            self.stats.fsync_errors += 1;
            error!(path = %self.dir.join(segment_name(*id)).display(), error = %e,
                "spool fsync failed; recent batches may not survive a power loss");
        }
    }

    fn create_segment(&mut self) -> Result<(), SpoolError> {
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let path = self.seg_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(SpoolError::io("create", &path))?;
        let written = file
            .write_all_at(&format::segment_header(id), 0)
            .and_then(|()| {
                if self.cfg.fsync == FsyncPolicy::Never {
                    Ok(())
                } else {
                    file.sync_all()
                }
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(SpoolError::io("create", &path)(e));
        }
        self.sync_dir_per_policy();
        self.segments.insert(
            id,
            Segment {
                size: SEGMENT_HEADER_LEN,
                sealed: false,
                unacked_records: 0,
                unacked_profiles: 0,
                acked: BTreeSet::new(),
                holes: BTreeMap::new(),
            },
        );
        self.bytes += SEGMENT_HEADER_LEN;
        self.writer = Some((id, file));
        Ok(())
    }

    /// Closes the active segment for appends (fsynced unless `fsync = never`); deletes it if
    /// nothing in it is left to deliver.
    fn seal_active(&mut self) {
        let Some((id, _)) = &self.writer else { return };
        let id = *id;
        if self.cfg.fsync != FsyncPolicy::Never {
            self.sync_writer();
        }
        self.writer = None;
        let seg = self
            .segments
            .get_mut(&id)
            .expect("active segment is listed");
        seg.sealed = true;
        if seg.unacked_records == 0 {
            self.delete_segment(id);
        }
    }

    /// Deletes a segment none of whose records is left to deliver.
    fn delete_segment(&mut self, id: u64) {
        let Some(seg) = self.segments.remove(&id) else {
            return;
        };
        if self.reader.as_ref().is_some_and(|(r, _)| *r == id) {
            self.reader = None;
        }
        let path = self.seg_path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "cannot delete a delivered spool segment");
        }
        self.bytes -= seg.size;
        self.sync_dir_per_policy();
        self.maybe_compact_ack_log();
    }

    /// Drops the oldest segment whatever is in it (sealing the active one first if it is the
    /// only one). Its unacked batches that are not in flight are returned as dropped; those in
    /// flight are dropped if they are requeued, delivered if they are acked. Use it when an
    /// append fails with [`SpoolError::DiskFull`] under `drop_oldest`. Returns zero when the spool
    /// holds nothing.
    pub fn drop_oldest_segment(&mut self) -> Result<Dropped, SpoolError> {
        let Some(&id) = self.segments.keys().next() else {
            return Ok(Dropped::default());
        };
        if !self.segments[&id].sealed {
            self.seal_active();
            if !self.segments.contains_key(&id) {
                return Ok(Dropped::default()); // it was fully acked: deleted, nothing dropped
            }
        }
        let range = RecordId {
            segment: id,
            offset: 0,
        }..RecordId {
            segment: id + 1,
            offset: 0,
        };
        let mut out = Dropped::default();
        for f in self.in_flight.range_mut(range.clone()).map(|(_, f)| f) {
            if !f.orphan {
                f.orphan = true;
                out.batches += 1;
                out.profiles += u64::from(f.profiles);
            }
        }
        self.requeued.retain(|r| r.segment != id);
        let seg = &self.segments[&id];
        let d = Dropped {
            batches: seg.unacked_records - out.batches,
            profiles: seg.unacked_profiles - out.profiles,
        };
        warn!(path = %self.seg_path(id).display(), batches = d.batches, profiles = d.profiles,
            in_flight = out.batches, "spool full: oldest segment dropped");
        self.delete_segment(id);
        self.count_dropped(d);
        Ok(d)
    }

    fn reader(&mut self, id: u64) -> Result<&File, SpoolError> {
        if self.reader.as_ref().is_none_or(|(r, _)| *r != id) {
            let path = self.seg_path(id);
            let f = File::open(&path).map_err(SpoolError::io("open", &path))?;
            self.reader = Some((id, f));
        }
        Ok(&self.reader.as_ref().expect("just set").1)
    }

    /// The next unacked record not in flight, oldest first (requeued ones before the cursor),
    /// or `None` when there is none right now. The record is in flight until
    /// [`Self::ack`]ed or [`Self::requeue`]d.
    pub fn take_next(&mut self) -> Result<Option<SpooledBatch>, SpoolError> {
        loop {
            let id = match self.requeued.pop_first() {
                Some(id) => id,
                None => match self.advance_cursor()? {
                    Some(id) => id,
                    None => return Ok(None),
                },
            };
            let size = self.segments[&id.segment].size;
            let path = self.seg_path(id.segment);
            let mut body = std::mem::take(&mut self.body);
            let read = format::read_record_at(self.reader(id.segment)?, id.offset, size, &mut body)
                .map_err(SpoolError::io("read", &path))?;
            let header = if let ReadAt::Record(h) = read {
                h
            } else {
                self.body = body;
                self.damaged_at_read(id)?;
                continue;
            };
            let bytes = header.total_len();
            match Batch::decode_record(Bytes::from(body)) {
                Ok(batch)
                    if batch.seq == header.seq
                        && batch.len() as u64 == u64::from(header.profiles) =>
                {
                    self.in_flight.insert(
                        id,
                        InFlight {
                            profiles: header.profiles,
                            orphan: false,
                        },
                    );
                    return Ok(Some(SpooledBatch { id, batch, bytes }));
                }
                _ => {
                    // The checksum matched what was written, but it is no batch: a bug, not rot.
                    error!(record = %id, "spool record does not decode as a batch; skipped");
                    self.stats.corrupt_records += 1;
                    let seg = self.segments.get_mut(&id.segment).expect("listed");
                    seg.unacked_records -= 1;
                    seg.unacked_profiles =
                        seg.unacked_profiles.saturating_sub(header.profiles.into());
                    seg.acked.insert(id.offset);
                    self.retire_if_done(id.segment);
                }
            }
        }
    }

    /// A record that was valid at open no longer reads back: the file changed under us.
    fn damaged_at_read(&mut self, id: RecordId) -> Result<(), SpoolError> {
        let path = self.seg_path(id.segment);
        let size = self.segments[&id.segment].size;
        let mut body = std::mem::take(&mut self.body);
        let file = self.reader(id.segment)?;
        let header =
            format::read_header_at(file, id.offset, size).map_err(SpoolError::io("read", &path))?;
        let next = format::find_next_valid(file, id.offset, size, &mut body)
            .map_err(SpoolError::io("read", &path))?
            .unwrap_or(size);
        self.body = body;
        self.stats.corrupt_records += 1;
        warn!(path = %path.display(), offset = id.offset, "spool record damaged since open; skipped");
        let seg = self.segments.get_mut(&id.segment).expect("listed");
        seg.holes.insert(id.offset, next);
        seg.unacked_records = seg.unacked_records.saturating_sub(1);
        seg.unacked_profiles = seg
            .unacked_profiles
            .saturating_sub(header.map_or(0, |h| h.profiles.into()));
        if id >= self.cursor && id.segment == self.cursor.segment {
            self.cursor.offset = next;
        }
        self.retire_if_done(id.segment);
        Ok(())
    }

    /// Moves the cursor to the next record that is neither acked nor in flight.
    fn advance_cursor(&mut self) -> Result<Option<RecordId>, SpoolError> {
        loop {
            let Some((&sid, seg)) = self.segments.range(self.cursor.segment..).next() else {
                return Ok(None);
            };
            if sid != self.cursor.segment {
                let left = self.cursor.segment;
                self.cursor = RecordId {
                    segment: sid,
                    offset: SEGMENT_HEADER_LEN,
                };
                self.retire_if_done(left);
                continue;
            }
            let off = self.cursor.offset;
            if off >= seg.size {
                if !seg.sealed {
                    return Ok(None); // the active segment: more may come
                }
                self.cursor = RecordId {
                    segment: sid + 1,
                    offset: SEGMENT_HEADER_LEN,
                };
                self.retire_if_done(sid);
                continue;
            }
            if let Some(&end) = seg.holes.get(&off) {
                self.cursor.offset = end;
                continue;
            }
            let id = self.cursor;
            let size = seg.size;
            let handled = seg.acked.contains(&off) || self.in_flight.contains_key(&id);
            let path = self.seg_path(sid);
            let header = format::read_header_at(self.reader(sid)?, off, size)
                .map_err(SpoolError::io("read", &path))?;
            match header {
                Some(h) if handled => self.cursor.offset = off + h.total_len(),
                Some(h) => {
                    self.cursor.offset = off + h.total_len();
                    return Ok(Some(id));
                }
                None if handled => {
                    let next =
                        format::find_next_valid(self.reader(sid)?, off, size, &mut Vec::new())
                            .map_err(SpoolError::io("read", &path))?
                            .unwrap_or(size);
                    self.cursor.offset = next;
                }
                None => self.damaged_at_read(id)?,
            }
        }
    }

    /// Deletes a sealed segment the cursor has passed once nothing in it is in flight or
    /// requeued (normally already done by the last ack; this catches damaged records).
    fn retire_if_done(&mut self, id: u64) {
        let Some(seg) = self.segments.get(&id) else {
            return;
        };
        if !seg.sealed || self.cursor.segment <= id && seg.unacked_records > 0 {
            return;
        }
        let range = RecordId {
            segment: id,
            offset: 0,
        }..RecordId {
            segment: id + 1,
            offset: 0,
        };
        if self.in_flight.range(range.clone()).next().is_some()
            || self.requeued.range(range).next().is_some()
        {
            return;
        }
        if seg.unacked_records > 0 {
            warn!(path = %self.seg_path(id).display(), batches = seg.unacked_records,
                "spool segment retired with records lost to damage");
        }
        self.delete_segment(id);
    }

    /// The listener stored this record: it is never handed out again, also after a restart
    /// (up to the fsync policy of the ack log). Returns false for an id not in flight.
    pub fn ack(&mut self, id: RecordId) -> Result<bool, SpoolError> {
        let Some(f) = self.in_flight.remove(&id) else {
            return Ok(false);
        };
        if f.orphan {
            return Ok(true);
        }
        let seg = self
            .segments
            .get_mut(&id.segment)
            .expect("in-flight record's segment");
        seg.acked.insert(id.offset);
        seg.unacked_records -= 1;
        seg.unacked_profiles -= u64::from(f.profiles);
        if seg.sealed && seg.unacked_records == 0 {
            // Deleting the segment is the durable ack.
            self.delete_segment(id.segment);
            return Ok(true);
        }
        let path = self.dir.join(acklog::ACK_LOG);
        self.acklog
            .append(id)
            .map_err(SpoolError::io("append to", &path))?;
        match self.cfg.fsync {
            FsyncPolicy::Always => {
                if let Err(e) = self.acklog.sync() {
                    self.stats.fsync_errors += 1;
                    warn!(path = %path.display(), error = %e, "cannot fsync the spool ack log");
                }
            }
            FsyncPolicy::Interval => {
                self.dirty = true;
                self.tick();
            }
            FsyncPolicy::Never => {}
        }
        Ok(true)
    }

    /// The send failed or its connection went: the record is handed out again (oldest first).
    /// Returns what was dropped instead: non-zero only when its segment was dropped meanwhile.
    pub fn requeue(&mut self, id: RecordId) -> Dropped {
        let Some(f) = self.in_flight.remove(&id) else {
            return Dropped::default();
        };
        if f.orphan {
            let d = Dropped {
                batches: 1,
                profiles: u64::from(f.profiles),
            };
            self.count_dropped(d);
            return d;
        }
        if id < self.cursor {
            self.requeued.insert(id);
        }
        Dropped::default()
    }

    /// [`Self::requeue`] for everything in flight (a reconnect).
    pub fn requeue_all(&mut self) -> Dropped {
        let ids: Vec<RecordId> = self.in_flight.keys().copied().collect();
        let mut d = Dropped::default();
        for id in ids {
            d += self.requeue(id);
        }
        d
    }

    /// Under `fsync = interval`: fsyncs if something was written and the interval has passed.
    /// Call it every `spool.fsync_interval` so the last appends do not wait for the next one.
    pub fn tick(&mut self) {
        if self.dirty && self.last_sync.elapsed() >= self.cfg.fsync_interval {
            self.sync();
        }
    }

    /// fsyncs the active segment and the ack log now (shutdown, or before reporting durability).
    pub fn sync(&mut self) {
        self.sync_writer();
        if let Err(e) = self.acklog.sync() {
            self.stats.fsync_errors += 1;
            warn!(dir = %self.dir.display(), error = %e, "cannot fsync the spool ack log");
        }
        self.dirty = false;
        self.last_sync = Instant::now();
    }

    /// Clean close: fsync and release the lock.
    pub fn close(mut self) {
        self.sync();
    }

    fn maybe_compact_ack_log(&mut self) {
        let live: u64 = self.segments.values().map(|s| s.acked.len() as u64).sum();
        if self.acklog.entries() <= 2 * live + ACK_LOG_COMPACT_SLACK {
            return;
        }
        let ids: Vec<RecordId> = self
            .segments
            .iter()
            .flat_map(|(&segment, s)| {
                s.acked
                    .iter()
                    .map(move |&offset| RecordId { segment, offset })
            })
            .collect();
        if let Err(e) = self.acklog.compact(ids.into_iter()) {
            warn!(dir = %self.dir.display(), error = %e, "cannot compact the spool ack log");
        }
    }

    pub fn stats(&self) -> SpoolStats {
        let batches: u64 = self.segments.values().map(|s| s.unacked_records).sum();
        let live_in_flight = self.in_flight.values().filter(|f| !f.orphan).count() as u64;
        SpoolStats {
            batches,
            profiles: self.segments.values().map(|s| s.unacked_profiles).sum(),
            bytes: self.bytes,
            segments: self.segments.len() as u64,
            in_flight: self.in_flight.len() as u64,
            pending: batches - live_in_flight,
            ..self.stats.clone()
        }
    }

    /// Batches `take_next` would still hand out.
    pub fn pending(&self) -> u64 {
        self.stats().pending
    }

    /// Spool fill in percent of its capacity (for `spool.high_water_pct`): a spool short of
    /// space raises the kill switch when *that* fills up.
    pub fn fill_pct(&self) -> f64 {
        self.bytes as f64 * 100.0 / self.capacity.max(1) as f64
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Test check: the byte count that bounds the spool is the segments' sizes, and those are
    /// the files' lengths on disk.
    #[cfg(test)]
    pub(crate) fn check_accounting(&self) {
        let listed: u64 = self.segments.values().map(|s| s.size).sum();
        assert_eq!(self.bytes, listed, "byte count vs segment sizes");
        for (id, seg) in &self.segments {
            let on_disk = std::fs::metadata(self.seg_path(*id)).map(|m| m.len());
            assert_eq!(on_disk.ok(), Some(seg.size), "segment {id} size vs file");
        }
    }

    /// Ids of the segments on disk, oldest first.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }
}
