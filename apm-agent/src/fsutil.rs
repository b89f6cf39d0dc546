//! Files the agent (root) replaces: written to a fresh temp name in the same directory
//! (`O_CREAT|O_EXCL`, so a symlink planted at a predictable name is never followed), mode set
//! on the descriptor, fsynced, renamed over the target, and the directory fsynced so the
//! rename survives a power cut.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replaces `path` with `data`, atomically and durably, with permissions `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // The spool's recovery removes leftovers of this pattern (`.NAME.tmp.*`) after a crash.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp."))
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Borrows a descriptor number handed down by another process (`APM_INHERIT_FDS`,
/// `LISTEN_FDS`, `APM_READY_FD`) so it can be inspected before anything takes ownership of it.
/// `None` when the number is negative or not open: `BorrowedFd` must never be -1 or closed.
///
/// # Safety
/// Nothing may close `fd` while the returned borrow lives. Inherited descriptors are examined
/// at start, on the one thread that owns them, so this holds there.
pub unsafe fn borrow_inherited<'a>(fd: std::os::fd::RawFd) -> Option<std::os::fd::BorrowedFd<'a>> {
    if fd < 0 {
        return None;
    }
    // SAFETY: F_GETFD reads the descriptor's flags and touches no memory; a closed number is
    // EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: `fd` is not -1 and is open (just checked); the caller keeps it open meanwhile.
    Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
}

/// fsyncs a directory, so the entries created or renamed in it are on disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
    }

    #[test]
    fn a_planted_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let p = dir.path().join("state");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
    }
}
