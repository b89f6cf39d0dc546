//! Creating the receiving sockets the way a daemon should: remove a stale socket file (never one a
//! live agent is bound to), bind with the mode already set through the umask, then change the
//! group without following symlinks; give the datagram socket the
//! configured kernel queue length by raising `net.unix.max_dgram_qlen` just around its creation.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::IngestError;

const QLEN_SYSCTL: &str = "/proc/sys/net/unix/max_dgram_qlen";

/// Serialises sysctl raise/restore within this process (tests bind several sockets at once).
static QLEN_LOCK: Mutex<()> = Mutex::new(());

/// Serialises sysctl raise/restore between processes: an exclusive `flock(2)` on the sysctl's
/// own file, which every agent can open read-only. Without it, one agent's restore could land
/// between another's raise and its `socket(2)`, which then got the system's queue length (10):
/// `tests/tests/datapath.rs::agents_starting_together_each_get_their_queue_length`. `None` where
/// the file cannot be opened or locked: the raise then goes on unserialised, as before.
fn lock_qlen_sysctl() -> Option<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::File::open(QLEN_SYSCTL).ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok()
}

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

/// Binds with the file created at `mode` already: the umask is narrowed around `bind` (a
/// chmod by path afterwards could be redirected through a symlink swapped in meanwhile).
/// Serialised, since the umask is the process's.
pub(crate) fn bind_with_mode<T>(mode: u32, bind: impl FnOnce() -> T) -> T {
    use nix::sys::stat::{Mode, umask};
    static UMASK_LOCK: Mutex<()> = Mutex::new(());
    let _g = UMASK_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let out = bind();
    umask(old);
    out
}

/// Gives the socket file to `group` without following a symlink: if the path was swapped for
/// one, only the link changes group, never its target.
fn set_group(path: &Path, group: Option<&str>) -> Result<(), IngestError> {
    let Some(g) = group else {
        return Ok(());
    };
    let grp = nix::unistd::Group::from_name(g)
        .map_err(|e| IngestError::io("look up group", path, e.into()))?
        .ok_or_else(|| IngestError::UnknownGroup(g.to_string()))?;
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        None,
        Some(grp.gid),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| IngestError::io("chown", path, e.into()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| IngestError::io("inspect", path, e))?;
    if !meta.file_type().is_socket() {
        return Err(IngestError::NotASocket(path.to_path_buf()));
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
        let _g = QLEN_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _between_processes = lock_qlen_sysctl();
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
    bind_with_mode(mode, || nix::sys::socket::bind(socket.as_raw_fd(), &addr))
        .map_err(|e| IngestError::io("bind", path, e.into()))?;
    set_group(path, group)?;
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
    let l = bind_with_mode(mode, || UnixListener::bind(path))
        .map_err(|e| IngestError::io("bind", path, e))?;
    l.set_nonblocking(true)
        .map_err(|e| IngestError::io("set nonblocking", path, e))?;
    set_group(path, group)?;
    Ok(l)
}

/// What an inherited descriptor must be to be taken for one of our receiving sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A bound `AF_UNIX` `SOCK_DGRAM` socket.
    Datagram,
    /// A bound, listening `AF_UNIX` `SOCK_STREAM` socket.
    StreamListener,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Self::Datagram => "a bound unix datagram socket",
            Self::StreamListener => "a listening unix stream socket",
        }
    }
}

/// Checks that an inherited descriptor (re-exec hand-over, systemd's fd store) is what `expect`
/// says, without taking it: a wrong number must neither be read from nor closed by us.
pub fn check_inherited(fd: i32, path: &Path, expect: Expect) -> Result<(), IngestError> {
    use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};
    let wrong = |found: String| IngestError::Inherited {
        fd,
        path: path.to_path_buf(),
        expected: expect.describe(),
        found,
    };
    // SAFETY: inherited descriptors are checked at start, before any other thread could close
    // them, and the borrow ends with this function.
    let Some(b) = (unsafe { crate::fsutil::borrow_inherited(fd) }) else {
        return Err(wrong("not an open descriptor".into()));
    };
    let ty = match nix::sys::socket::getsockopt(&b, sockopt::SockType) {
        Ok(t) => t,
        Err(nix::errno::Errno::ENOTSOCK) => {
            let kind = nix::sys::stat::fstat(b).map_or("unreadable", |st| {
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => "a regular file",
                    libc::S_IFDIR => "a directory",
                    libc::S_IFIFO => "a pipe",
                    libc::S_IFCHR => "a character device",
                    _ => "not a socket",
                }
            });
            return Err(wrong(kind.into()));
        }
        Err(e) => return Err(wrong(format!("unreadable (SO_TYPE: {e})"))),
    };
    let addr = nix::sys::socket::getsockname::<SockaddrStorage>(b.as_raw_fd())
        .map_err(|e| wrong(format!("unreadable (getsockname: {e})")))?;
    match addr.family() {
        Some(AddressFamily::Unix) => {}
        Some(f) => return Err(wrong(format!("a {f:?} socket"))),
        None => return Err(wrong("a socket of an unknown family".into())),
    }
    let want = match expect {
        Expect::Datagram => SockType::Datagram,
        Expect::StreamListener => SockType::Stream,
    };
    if ty != want {
        return Err(wrong(format!("a unix {ty:?} socket")));
    }
    // Bound to a path: an unbound or abstract socket is not one PHP can reach at `path`.
    if addr.as_unix_addr().and_then(|u| u.path()).is_none() {
        return Err(wrong("a unix socket not bound to a path".into()));
    }
    if expect == Expect::StreamListener
        && !nix::sys::socket::getsockopt(&b, sockopt::AcceptConn).unwrap_or(false)
    {
        return Err(wrong("a unix stream socket that is not listening".into()));
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor once [`check_inherited`] accepts it,
/// close-on-exec from now on (a re-exec hands it on explicitly).
pub fn adopt_fd(fd: i32, path: &Path, expect: Expect) -> Result<OwnedFd, IngestError> {
    check_inherited(fd, path, expect)?;
    // SAFETY: `fd` is open and of the expected kind (just checked); it was handed down to this
    // process, nothing else in it owns it, and the variable naming it is gone, so this is its
    // one owner.
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
    use std::os::unix::fs::PermissionsExt;

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

    /// Issue 15.5: the mode and group were set by path after `bind`, as root: a user who can
    /// write the socket's directory could swap in a symlink and have root chmod any file.
    #[test]
    fn a_planted_symlink_at_the_socket_path_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = dir.path().join("a.sock");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let _ = set_group(&p, Some("root"));
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the symlink's target was chmodded");
    }

    #[test]
    fn the_socket_is_created_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let _s = bind_dgram(&p, 0o620, None, 64).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o620);
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
