//! Small persistent state in `control.state_dir`: the agent id and the batch sequence number.
//!
//! `seq` must never repeat for an agent id (the listener deduplicates by `(agent_id, seq)`, so a
//! repeated seq would silently discard new profiles). It is allocated in blocks: the file holds
//! a high-water mark written (atomically, fsynced) *before* any seq below it is used, and a
//! restarted agent starts at the stored mark. A crash wastes at most one block of numbers, which
//! is harmless; it can never reuse one.

use std::path::{Path, PathBuf};

use crate::phpctl::write_atomic;

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
    write_atomic(&path, format!("{id}\n").as_bytes()).map_err(io_err(&path))?;
    Ok(id)
}

/// Hands out batch sequence numbers that survive restarts.
#[derive(Debug)]
pub struct SeqAllocator {
    path: PathBuf,
    next: u64,
    reserved_until: u64,
}

impl SeqAllocator {
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let path = state_dir.join("seq");
        let start = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| StateError::Corrupt {
                path: path.clone(),
                content: s.chars().take(40).collect(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut me = Self {
            path,
            next: start,
            reserved_until: start,
        };
        me.reserve()?;
        Ok(me)
    }

    fn reserve(&mut self) -> Result<(), StateError> {
        let until = self.next + SEQ_BLOCK;
        write_atomic(&self.path, format!("{until}\n").as_bytes()).map_err(io_err(&self.path))?;
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
