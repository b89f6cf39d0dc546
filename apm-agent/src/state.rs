//! Small persistent state in `control.state_dir`: the agent id and the batch sequence number.
//!
//! The listener deduplicates by `(agent_id, epoch, seq)`, so a repeated key would silently
//! discard new profiles as duplicates. `seq` is allocated in blocks: the `seq` file holds a
//! high-water mark written (atomically, fsynced, its directory fsynced) *before* any seq below it
//! is used, and a restarted agent starts at the stored mark. A crash wastes at most one block of
//! numbers, which is harmless; it can never reuse one.
//!
//! That proof holds only while the file lives. When it is missing (a new disk, a reinstall, a
//! deleted state dir; the agent id may still be the configured one), seq restarts at 1 under a
//! new random **epoch**, so no key of the old series can repeat. Status shows the epoch and
//! whether this start began it. A `seq` file from before epochs (a bare number) continues under
//! epoch 0, the value every older batch carried.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

const SEQ_BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source} (check control.state_dir permissions)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({content:?}); remove it only if you also reset the agent id"
    )]
    Corrupt { path: PathBuf, content: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the agent id from `state_dir/agent_id`, creating a random one on first start.
pub fn load_or_create_agent_id(state_dir: &Path, configured: &str) -> Result<String, StateError> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let path = state_dir.join("agent_id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    let id = format!("{host}-{:016x}", rand::random::<u64>());
    write_atomic(&path, format!("{id}\n").as_bytes(), 0o644).map_err(io_err(&path))?;
    Ok(id)
}

/// The `seq` file.
#[derive(Debug, Serialize, Deserialize)]
struct SeqFile {
    /// The epoch, in hex (a JSON number would lose bits in many readers).
    epoch: String,
    /// No seq below this was handed out by an earlier start.
    until: u64,
}

/// Hands out batch sequence numbers that survive restarts, with the epoch they belong to.
#[derive(Debug)]
pub struct SeqAllocator {
    path: PathBuf,
    epoch: u64,
    /// This start drew a new epoch (no seq state was found).
    new_epoch: bool,
    next: u64,
    reserved_until: u64,
}

impl SeqAllocator {
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let path = state_dir.join("seq");
        let (epoch, start, new_epoch) = match std::fs::read_to_string(&path) {
            Ok(s) => {
                let (epoch, start) = parse_seq_file(&s).ok_or_else(|| StateError::Corrupt {
                    path: path.clone(),
                    content: s.chars().take(80).collect(),
                })?;
                (epoch, start, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Never 0: that is the epoch of batches from before epochs.
                (rand::random::<u64>().max(1), 1, true)
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if new_epoch {
            tracing::warn!(
                path = %path.display(),
                epoch = %format!("{epoch:016x}"),
                "no seq state found: starting a new epoch (seq restarts at 1; nothing of an earlier series can be taken for a duplicate)"
            );
        }
        let mut me = Self {
            path,
            epoch,
            new_epoch,
            next: start,
            reserved_until: start,
        };
        me.reserve()?;
        Ok(me)
    }

    fn reserve(&mut self) -> Result<(), StateError> {
        let until = self.next + SEQ_BLOCK;
        let file = SeqFile {
            epoch: format!("{:016x}", self.epoch),
            until,
        };
        let text = serde_json::to_string(&file).unwrap_or_default() + "\n";
        write_atomic(&self.path, text.as_bytes(), 0o644).map_err(io_err(&self.path))?;
        self.reserved_until = until;
        Ok(())
    }

    pub fn allocate(&mut self) -> Result<u64, StateError> {
        if self.next >= self.reserved_until {
            self.reserve()?;
        }
        let s = self.next;
        self.next += 1;
        Ok(s)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This start began the epoch: the seq state was missing.
    pub fn new_epoch(&self) -> bool {
        self.new_epoch
    }
}

/// `{"epoch":"..","until":N}`, or a bare number from before epochs (epoch 0).
fn parse_seq_file(s: &str) -> Option<(u64, u64)> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Some((0, n));
    }
    let f: SeqFile = serde_json::from_str(s.trim()).ok()?;
    Some((u64::from_str_radix(&f.epoch, 16).ok()?, f.until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_never_repeats_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = SeqAllocator::open(dir.path()).unwrap();
        let first: Vec<u64> = (0..5000).map(|_| a.allocate().unwrap()).collect();
        drop(a); // as after a crash: no clean close
        let mut b = SeqAllocator::open(dir.path()).unwrap();
        let n = b.allocate().unwrap();
        assert!(n > *first.last().unwrap());
        assert!(first.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn epoch_survives_reopen_and_a_lost_file_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = SeqAllocator::open(dir.path()).unwrap();
        assert!(a.new_epoch() && a.epoch() != 0);
        let b = SeqAllocator::open(dir.path()).unwrap();
        assert_eq!(b.epoch(), a.epoch());
        assert!(!b.new_epoch());
        std::fs::remove_file(dir.path().join("seq")).unwrap();
        let c = SeqAllocator::open(dir.path()).unwrap();
        assert!(c.new_epoch());
        assert_ne!(
            c.epoch(),
            a.epoch(),
            "a lost seq file never reuses the epoch"
        );
    }

    #[test]
    fn a_seq_file_from_before_epochs_continues_under_epoch_0() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seq"), "8193\n").unwrap();
        let mut a = SeqAllocator::open(dir.path()).unwrap();
        assert_eq!((a.epoch(), a.new_epoch()), (0, false));
        assert_eq!(a.allocate().unwrap(), 8193);
    }

    #[test]
    fn corrupt_seq_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seq"), "garbage").unwrap();
        assert!(matches!(
            SeqAllocator::open(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn agent_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_agent_id(dir.path(), "").unwrap();
        assert_eq!(load_or_create_agent_id(dir.path(), "").unwrap(), a);
        assert_eq!(
            load_or_create_agent_id(dir.path(), "fixed").unwrap(),
            "fixed"
        );
    }
}
