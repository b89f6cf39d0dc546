//! Creating the receiving sockets the way a daemon should: remove a stale socket file (never one a
//! live agent is bound to), bind, then set mode and group; give the datagram socket the
//! configured kernel queue length by raising `net.unix.max_dgram_qlen` just around its creation.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::IngestError;

const QLEN_SYSCTL: &str = "/proc/sys/net/unix/max_dgram_qlen";

/// Serialises sysctl raise/restore within this process (tests bind several sockets at once).
static QLEN_LOCK: Mutex<()> = Mutex::new(());

/// Removes `path` if it is a socket nobody listens on. A live socket means another agent owns it.
pub fn remove_stale(path: &Path, dgram: bool) -> Result<(), IngestError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IngestError::io("inspect", path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(IngestError::NotASocket(path.to_path_buf()));
    }
    let alive = if dgram {
        UnixDatagram::unbound()
            .and_then(|s| s.connect(path))
            .is_ok()
    } else {
        UnixStream::connect(path).is_ok()
    };
    if alive {
        return Err(IngestError::InUse(path.to_path_buf()));
    }
    tracing::info!(path = %path.display(), "removing stale socket file");
    std::fs::remove_file(path).map_err(|e| IngestError::io("remove stale", path, e))
}

fn prepare_parent(path: &Path) -> Result<(), IngestError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| IngestError::io("create directory", dir, e))?;
    }
    Ok(())
}

fn set_mode_group(path: &Path, mode: u32, group: Option<&str>) -> Result<(), IngestError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| IngestError::io("chmod", path, e))?;
    if let Some(g) = group {
        let grp = nix::unistd::Group::from_name(g)
            .map_err(|e| IngestError::io("look up group", path, e.into()))?
            .ok_or_else(|| IngestError::UnknownGroup(g.to_string()))?;
        nix::unistd::chown(path, None, Some(grp.gid))
            .map_err(|e| IngestError::io("chown", path, e.into()))?;
    }
    Ok(())
}

fn read_qlen() -> io::Result<u32> {
    std::fs::read_to_string(QLEN_SYSCTL)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_qlen(v: u32) -> io::Result<()> {
    std::fs::write(QLEN_SYSCTL, format!("{v}\n"))
}

/// A bound datagram socket and the kernel queue length it was created with.
pub struct BoundDgram {
    pub socket: UnixDatagram,
    pub queue_len: u32,
}

/// Creates the datagram socket with queue length `want` (when privileged) and binds it.
///
/// The kernel copies `max_dgram_qlen` into the socket when the socket is created, so the sysctl
/// is raised only for the duration of `socket(2)` and restored at once; other sockets created in
/// that instant get the larger queue too, which is harmless.
pub fn bind_dgram(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    want: u32,
) -> Result<BoundDgram, IngestError> {
    prepare_parent(path)?;
    remove_stale(path, true)?;
    let (fd, queue_len) = {
        let _g = QLEN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let old = read_qlen().ok();
        let raised = match old {
            Some(o) if o != want => match write_qlen(want) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        error = %e, current = o, wanted = want,
                        "cannot set net.unix.max_dgram_qlen (not privileged?): the datagram queue keeps the system default"
                    );
                    false
                }
            },
            _ => false,
        };
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            None,
        );
        let effective = if raised { want } else { old.unwrap_or(0) };
        if let (true, Some(o)) = (raised, old)
            && let Err(e) = write_qlen(o)
        {
            tracing::error!(error = %e, value = o, "cannot restore net.unix.max_dgram_qlen");
        }
        (
            fd.map_err(|e| IngestError::io("create socket", path, e.into()))?,
            effective,
        )
    };
    let socket = UnixDatagram::from(fd);
    // SCM_CREDENTIALS on every datagram (the sender's pid and uid), on before the socket can
    // be reached: a datagram queued earlier would carry none.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)
        .map_err(|e| IngestError::io("SO_PASSCRED", path, e.into()))?;
    let addr = nix::sys::socket::UnixAddr::new(path)
        .map_err(|e| IngestError::io("socket address", path, e.into()))?;
    nix::sys::socket::bind(socket.as_raw_fd(), &addr)
        .map_err(|e| IngestError::io("bind", path, e.into()))?;
    set_mode_group(path, mode, group)?;
    Ok(BoundDgram { socket, queue_len })
}

/// Binds the stream socket (listen backlog 1024, nonblocking).
pub fn bind_stream(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<UnixListener, IngestError> {
    prepare_parent(path)?;
    remove_stale(path, false)?;
    let l = UnixListener::bind(path).map_err(|e| IngestError::io("bind", path, e))?;
    l.set_nonblocking(true)
        .map_err(|e| IngestError::io("set nonblocking", path, e))?;
    set_mode_group(path, mode, group)?;
    Ok(l)
}

/// Wraps an inherited descriptor (socket activation, re-exec hand-over) after checking its type.
pub fn adopt_fd(fd: i32, path: &Path) -> Result<OwnedFd, IngestError> {
    // SAFETY: the caller passes a descriptor it inherited and owns from now on.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| IngestError::io("adopt inherited socket", path, e.into()))?;
    Ok(owned)
}

/// Unlinks the socket files at a final stop.
pub fn unlink(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.sock");
        {
            let _dead = UnixDatagram::bind(&p).unwrap();
        } // closed: the file stays, nobody is bound
        let live = bind_dgram(&p, 0o660, None, 64).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let err = bind_dgram(&p, 0o660, None, 64).err().unwrap();
        assert!(matches!(err, IngestError::InUse(_)), "{err}");
        drop(live);
    }

    #[test]
    fn regular_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.sock");
        std::fs::write(&p, "data").unwrap();
        let err = bind_stream(&p, 0o660, None).err().unwrap();
        assert!(matches!(err, IngestError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "data");
    }

    #[test]
    fn queue_len_is_applied_and_sysctl_restored() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to write net.unix.max_dgram_qlen");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.sock");
        let before = read_qlen().unwrap();
        let want = before + 37;
        let b = bind_dgram(&p, 0o666, None, want).unwrap();
        assert_eq!(b.queue_len, want);
        assert_eq!(read_qlen().unwrap(), before, "sysctl restored");
        // The socket really holds `want` datagrams: fill it without reading.
        let s = UnixDatagram::unbound().unwrap();
        s.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while s.send_to(b"{}", &p).is_ok() {
            sent += 1;
            assert!(sent < 100_000);
        }
        // The kernel admits one datagram beyond the limit (queue len > max is "full").
        assert!(
            sent >= want as usize && sent <= want as usize + 1,
            "sent {sent}, want {want}"
        );
    }
}
