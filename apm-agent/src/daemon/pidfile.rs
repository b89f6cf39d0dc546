//! The PID file: JSON `{pid, startedAt, version, configPath}`, held under an exclusive `flock`
//! for the agent's whole life. The lock, not the file's presence, says whether an agent runs:
//! a crashed agent's lock is gone with its process, so a stale or corrupted file is detected and
//! replaced, and two agents started at the same instant cannot both win.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PidInfo {
    pub pid: u32,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub version: String,
    pub config_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error(
        "ALREADY_RUNNING: an agent is already running with PID {pid} (PID file {path}); use `apm-agent stop` or `apm-agent restart`"
    )]
    AlreadyRunning { pid: u32, path: PathBuf },
    #[error(
        "ALREADY_RUNNING: another agent holds the lock on {path} (its PID file is unreadable); use `apm-agent stop`"
    )]
    LockedUnknown { path: PathBuf },
    #[error(
        "PERMISSION_DENIED: {path}: {source} (run as root or set control.pid_file to a writable path)"
    )]
    PermissionDenied {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("LOCK_FAILED: {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held PID file. Dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

fn classify(path: &Path, e: std::io::Error) -> PidFileError {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        PidFileError::PermissionDenied {
            path: path.to_path_buf(),
            source: e,
        }
    } else {
        PidFileError::Lock {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Opens (creating) a lock file that only root may open: a local user who could open it could
/// also `flock` it and keep the agent from starting. A file left wider by an older version is
/// narrowed on the descriptor.
pub fn open_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if file.metadata()?.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Whether `pid` runs the apm-agent binary: `stop` and `kill` signal nothing else, whatever a
/// PID file says.
pub fn is_agent(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("apm-agent"))
    })
}

impl PidFile {
    pub fn acquire(path: &Path, config_path: Option<&Path>) -> Result<Self, PidFileError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| classify(path, e))?;
        }
        loop {
            let file = open_private(path).map_err(|e| classify(path, e))?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut s = String::new();
                    let _ = file.read_to_string(&mut s);
                    return Err(match serde_json::from_str::<PidInfo>(&s) {
                        Ok(info) => PidFileError::AlreadyRunning {
                            pid: info.pid,
                            path: path.to_path_buf(),
                        },
                        Err(_) => PidFileError::LockedUnknown {
                            path: path.to_path_buf(),
                        },
                    });
                }
                Err((_, e)) => return Err(classify(path, e.into())),
            };
            // The previous holder may have unlinked the file between our open and our lock:
            // then we hold a lock on a dead inode; start over on the current file.
            let ours = lock.metadata().map_err(|e| classify(path, e))?;
            match std::fs::metadata(path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            let mut old = String::new();
            let _ = lock.read_to_string(&mut old);
            if !old.trim().is_empty() {
                match serde_json::from_str::<PidInfo>(&old) {
                    Ok(info) => {
                        tracing::warn!(path = %path.display(), stale_pid = info.pid, "stale PID file (that agent is not running): replaced");
                    }
                    Err(_) => {
                        tracing::warn!(path = %path.display(), "PID_FILE_CORRUPTED: unreadable PID file replaced");
                    }
                }
            }
            let info = PidInfo {
                pid: std::process::id(),
                started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                config_path: config_path.map(|p| p.display().to_string()),
            };
            lock.set_len(0).map_err(|e| classify(path, e))?;
            lock.rewind().map_err(|e| classify(path, e))?;
            let mut text = serde_json::to_string(&info).expect("serializable");
            text.push('\n');
            lock.write_all(text.as_bytes())
                .map_err(|e| classify(path, e))?;
            lock.sync_all().map_err(|e| classify(path, e))?;
            return Ok(Self {
                path: path.to_path_buf(),
                lock: Some(lock),
            });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked descriptor, to hand over across a re-exec (clear its CLOEXEC first).
    pub fn raw_fd(&self) -> Option<i32> {
        self.lock
            .as_ref()
            .map(|l| std::os::fd::AsRawFd::as_raw_fd(&**l))
    }

    /// Takes over the PID file a previous image of this same process held (re-exec): the lock
    /// belongs to the inherited open file description, so re-locking it succeeds at once.
    pub fn adopt(fd: i32, path: &Path) -> Result<Self, PidFileError> {
        use std::os::fd::FromRawFd;
        // A regular file or nothing: a wrong number must not be locked, then closed, as ours.
        // SAFETY: called at start on the only thread; the borrow ends before anything could
        // close the descriptor.
        let regular = unsafe { crate::fsutil::borrow_inherited(fd) }
            .and_then(|b| nix::sys::stat::fstat(b).ok())
            .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if !regular {
            return Err(classify(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("inherited descriptor {fd} is not an open regular file"),
                ),
            ));
        }
        // SAFETY: an open regular file (checked above) that the previous image handed us;
        // nothing else in this process owns it and the variable naming it is gone.
        let file = unsafe { File::from_raw_fd(fd) };
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| classify(path, e.into()))?;
        nix::fcntl::fcntl(
            &*lock,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| classify(path, e.into()))?;
        Ok(Self {
            path: path.to_path_buf(),
            lock: Some(lock),
        })
    }

    /// Forgets the file without removing it (the next image keeps it).
    pub fn keep_for_exec(mut self) {
        if let Some(l) = self.lock.take() {
            // The descriptor must stay open across exec: leak it on purpose.
            std::mem::forget(l);
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so nobody can lock the file we are removing
        // and believe it current.
        if self.lock.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
        self.lock.take();
    }
}

/// What the PID file says about a running agent, for `status`, `stop`, `kill`.
#[derive(Debug, PartialEq)]
pub enum Probe {
    /// Locked by a live agent.
    Running(PidInfo),
    /// Locked, but the content is unreadable (an agent mid-start, or corruption).
    RunningUnknown,
    /// A file is there but nobody holds its lock.
    Stale(Option<PidInfo>),
    NotRunning,
}

pub fn probe(path: &Path) -> Result<Probe, PidFileError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::NotRunning),
        Err(e) => return Err(classify(path, e)),
    };
    let mut s = String::new();
    let _ = file.read_to_string(&mut s);
    let info = serde_json::from_str::<PidInfo>(&s).ok();
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_unlocked_on_drop) => Ok(Probe::Stale(info)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Ok(info.map_or(Probe::RunningUnknown, Probe::Running))
        }
        Err((_, e)) => Err(classify(path, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.pid");
        let held = PidFile::acquire(&p, None).unwrap();
        match PidFile::acquire(&p, None) {
            Err(PidFileError::AlreadyRunning { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(probe(&p).unwrap(), Probe::Running(i) if i.pid == std::process::id()));
        drop(held);
        assert!(!p.exists());
        assert_eq!(probe(&p).unwrap(), Probe::NotRunning);
    }

    #[test]
    fn stale_and_corrupt_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.pid");
        std::fs::write(
            &p,
            r#"{"pid":999999,"startedAt":"x","version":"0","configPath":null}"#,
        )
        .unwrap();
        assert!(matches!(probe(&p).unwrap(), Probe::Stale(Some(i)) if i.pid == 999_999));
        let held = PidFile::acquire(&p, Some(Path::new("/etc/a.toml"))).unwrap();
        let info: PidInfo = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(info.pid, std::process::id());
        assert_eq!(info.config_path.as_deref(), Some("/etc/a.toml"));
        drop(held);
        std::fs::write(&p, "garbage{").unwrap();
        assert_eq!(probe(&p).unwrap(), Probe::Stale(None));
        let _held = PidFile::acquire(&p, None).unwrap();
    }
}
