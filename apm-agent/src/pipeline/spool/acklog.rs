//! The ack log (`acks.log`): which spooled records the listener acknowledged, so a restarted
//! agent does not replay them. Fixed 20-byte entries: segment id u64, record offset u64,
//! crc32c of those 16 bytes u32 (little-endian). A torn tail is truncated at open; an entry with
//! a bad crc is skipped and counted (fixed-size entries keep the others aligned). Compacted by an
//! atomic rewrite once most entries refer to deleted segments.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::RecordId;

pub const ACK_LOG: &str = "acks.log";
const ENTRY: usize = 20;

fn encode(id: RecordId) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0..8].copy_from_slice(&id.segment.to_le_bytes());
    e[8..16].copy_from_slice(&id.offset.to_le_bytes());
    let crc = crc32c::crc32c(&e[0..16]);
    e[16..20].copy_from_slice(&crc.to_le_bytes());
    e
}

#[derive(Debug)]
pub struct AckLog {
    path: PathBuf,
    file: File,
    /// Entries in the file (live or not).
    entries: u64,
}

/// What [`AckLog::open`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub acked: Vec<RecordId>,
    pub bad_entries: u64,
    pub torn_bytes: u64,
}

impl AckLog {
    pub fn open(dir: &Path) -> io::Result<(Self, Loaded)> {
        let path = dir.join(ACK_LOG);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut loaded = Loaded::default();
        let whole = bytes.len() - bytes.len() % ENTRY;
        for e in bytes[..whole].chunks_exact(ENTRY) {
            let crc = u32::from_le_bytes(e[16..20].try_into().expect("4 bytes"));
            if crc32c::crc32c(&e[0..16]) != crc {
                loaded.bad_entries += 1;
                continue;
            }
            loaded.acked.push(RecordId {
                segment: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
                offset: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
            });
        }
        if whole < bytes.len() {
            loaded.torn_bytes = (bytes.len() - whole) as u64;
            file.set_len(whole as u64)?;
        }
        Ok((
            Self {
                path,
                file,
                entries: (whole / ENTRY) as u64,
            },
            loaded,
        ))
    }

    pub fn append(&mut self, id: RecordId) -> io::Result<()> {
        let e = encode(id);
        if let Err(err) = self.file.write_all(&e) {
            // Drop a partial entry so later ones stay aligned.
            let _ = self.file.set_len(self.entries * ENTRY as u64);
            return Err(err);
        }
        self.entries += 1;
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Rewrites the log with only `live` entries (temp file, fsync, rename, fsync dir).
    pub fn compact(&mut self, live: impl Iterator<Item = RecordId>) -> io::Result<()> {
        let mut bytes = Vec::new();
        let mut n = 0;
        for id in live {
            bytes.extend_from_slice(&encode(id));
            n += 1;
        }
        super::write_atomic_durable(&self.path, &bytes)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.entries = n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(segment: u64, offset: u64) -> RecordId {
        RecordId { segment, offset }
    }

    #[test]
    fn entries_survive_reopen_torn_tail_and_bad_entry_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, l) = AckLog::open(dir.path()).unwrap();
        assert!(l.acked.is_empty());
        for i in 0..4 {
            log.append(id(1, 32 + i * 100)).unwrap();
        }
        drop(log);
        let path = dir.path().join(ACK_LOG);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[ENTRY + 3] ^= 0x10; // second entry corrupt
        bytes.extend_from_slice(&[1, 2, 3]); // torn tail
        std::fs::write(&path, &bytes).unwrap();
        let (mut log, l) = AckLog::open(dir.path()).unwrap();
        assert_eq!(l.acked, vec![id(1, 32), id(1, 232), id(1, 332)]);
        assert_eq!((l.bad_entries, l.torn_bytes), (1, 3));
        log.append(id(2, 32)).unwrap();
        drop(log);
        let (_, l) = AckLog::open(dir.path()).unwrap();
        assert_eq!(l.acked.last(), Some(&id(2, 32)));
        assert_eq!(l.acked.len(), 4);
    }

    #[test]
    fn compaction_keeps_only_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = AckLog::open(dir.path()).unwrap();
        for i in 0..10 {
            log.append(id(i, 32)).unwrap();
        }
        log.compact([id(8, 32), id(9, 32)].into_iter()).unwrap();
        assert_eq!(log.entries(), 2);
        log.append(id(10, 32)).unwrap();
        drop(log);
        let (_, l) = AckLog::open(dir.path()).unwrap();
        assert_eq!(l.acked, vec![id(8, 32), id(9, 32), id(10, 32)]);
    }
}
