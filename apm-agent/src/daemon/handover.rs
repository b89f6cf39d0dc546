//! How the receiving sockets outlive this process, so a restart is not a gap for PHP:
//! descriptors inherited from a previous image (`apm-agent restart`, the memory guard's
//! self-restart), systemd's fd store (`systemctl restart`), and the re-exec that hands them on.
//! Also readiness: systemd's `READY=1` or the pipe of `apm-agent start`.

use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;

use crate::config::Config;
use crate::daemon::StartError;
use crate::daemon::pidfile::PidFile;
use crate::pipeline::ingest::Sockets;

const INHERIT_ENV: &str = "APM_INHERIT_FDS";

/// `apm-agent start` passes the write end of its readiness pipe under this number.
const READY_ENV: &str = "APM_READY_FD";

/// Descriptors handed down by whoever started this process: a previous image of it, or
/// `apm-agent start`.
#[derive(Debug, Default)]
pub struct Inherited {
    pub dgram: Option<i32>,
    pub stream: Option<i32>,
    pub pidfile: Option<i32>,
    pub queue_len: u32,
    pub restarts: u64,
    /// The readiness pipe of `apm-agent start`, written once and closed at readiness.
    pub ready: Option<OwnedFd>,
}

/// Reads and clears what was handed down (`APM_INHERIT_FDS`, `APM_READY_FD`). Call it first
/// thing, before any thread runs: clearing the variables is what keeps a re-executed image from
/// taking a descriptor number it no longer owns for one it was given.
pub fn take_inherited() -> Inherited {
    let mut i = Inherited {
        ready: take_ready_fd(),
        ..Inherited::default()
    };
    let Ok(v) = std::env::var(INHERIT_ENV) else {
        return i;
    };
    // SAFETY: called at start, before any other thread exists.
    unsafe { std::env::remove_var(INHERIT_ENV) };
    let Ok(p) = parse_inherit(&v);
    Inherited { ready: i.ready, ..p }
}

/// Parses `APM_INHERIT_FDS` (`dgram=N,stream=N,pidfile=N,qlen=N,restarts=N`).
fn parse_inherit(v: &str) -> Result<Inherited, std::convert::Infallible> {
    let mut i = Inherited::default();
    for kv in v.split(',') {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let n = v.parse::<u64>().ok();
        match k {
            "dgram" => i.dgram = n.map(|n| n as i32),
            "stream" => i.stream = n.map(|n| n as i32),
            "pidfile" => i.pidfile = n.map(|n| n as i32),
            "qlen" => i.queue_len = n.unwrap_or(0) as u32,
            "restarts" => i.restarts = n.unwrap_or(0),
            _ => {}
        }
    }
    Ok(i)
}

/// The receiving sockets: inherited from a previous image, kept by systemd across a restart,
/// or bound afresh.
pub fn sockets(cfg: &Config, inherited: &Inherited) -> Result<Sockets, StartError> {
    Ok(match (inherited.dgram, inherited.stream) {
        (Some(d), Some(s)) => Sockets::adopt(d, s, inherited.queue_len, &cfg.ingest)?,
        _ => match systemd_stored(cfg) {
            Some(s) => s,
            None => Sockets::bind(&cfg.ingest, cfg.socket_mode())?,
        },
    })
}

/// Sockets systemd kept for us in its fd store across a restart (`FDSTORE=1`).
fn systemd_stored(cfg: &Config) -> Option<Sockets> {
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names().ok()?.collect();
    let d = fds.iter().find(|(_, n)| n == "dgram")?.0;
    let s = fds.iter().find(|(_, n)| n == "stream")?.0;
    let qlen = std::fs::read_to_string(cfg.control.state_dir.join("queue_len"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Sockets::adopt(d, s, qlen, &cfg.ingest).ok()
}

/// Under systemd, gives the sockets to its fd store so they outlive `systemctl restart`.
/// Returns whether systemd took both.
pub fn to_fd_store(sockets: &Sockets) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    let store = |name, fd| {
        sd_notify::notify_with_fds(
            &[
                sd_notify::NotifyState::FdStore,
                sd_notify::NotifyState::FdName(name),
            ],
            &[fd],
        )
        .is_ok()
    };
    let a = store("dgram", sockets.dgram.as_fd());
    let b = store("stream", sockets.stream.as_fd());
    a && b
}

/// The readiness pipe named by `APM_READY_FD`, if that number is an open pipe; the variable is
/// removed either way.
fn take_ready_fd() -> Option<OwnedFd> {
    let v = std::env::var(READY_ENV).ok()?;
    // SAFETY: called at start, before any other thread exists.
    unsafe { std::env::remove_var(READY_ENV) };
    let fd = v.parse::<i32>().ok().filter(|&fd| fd > 2)?;
    // Only a pipe: a stale or forged number must not make us write into (and close) an
    // unrelated descriptor.
    // SAFETY: fstat only reads the descriptor table; an unused number is EBADF.
    let st = nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // SAFETY: the number is open (fstat succeeded) and is the pipe `apm-agent start` handed us;
    // nothing else in this process owns it, and the variable naming it is gone.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Tells whoever started us that we are ready (systemd `READY=1`, and `apm-agent start`'s pipe,
/// which is then closed).
pub fn notify_ready(status: &str, ready: Option<OwnedFd>) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Some(fd) = ready {
        let _ = std::io::Write::write_all(&mut std::fs::File::from(fd), b"ready\n");
    }
}

/// Replaces this process image with a fresh one of the same binary, handing down the sockets
/// and the PID-file lock: the PID stays, the kernel queue keeps every datagram sent meanwhile.
/// Returns only when the exec failed.
pub fn reexec(sockets: Sockets, pid: PidFile, restarts: u64) -> StartError {
    let pidfd = pid.raw_fd();
    let qlen = sockets.queue_len;
    let d = sockets.dgram.into_raw_fd();
    let s = sockets.stream.into_raw_fd();
    for fd in [Some(d), Some(s), pidfd].into_iter().flatten() {
        // SAFETY: plain fcntl on descriptors we own.
        unsafe {
            let f = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, f & !libc::FD_CLOEXEC);
        }
    }
    pid.keep_for_exec();
    let v = format!(
        "dgram={d},stream={s},qlen={qlen},restarts={},{}",
        restarts + 1,
        pidfd.map(|p| format!("pidfile={p}")).unwrap_or_default()
    );
    // SAFETY: the runtime is about to be replaced; no other thread reads the environment now.
    unsafe { std::env::set_var(INHERIT_ENV, v) };
    let exe = std::fs::read_link("/proc/self/exe").map_or_else(
        |_| PathBuf::from("apm-agent"),
        |p| {
            PathBuf::from(
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string(),
            )
        },
    );
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .map(|a| std::ffi::CString::new(a.into_encoded_bytes()).unwrap_or_default())
        .collect();
    let exe_c = std::ffi::CString::new(exe.as_os_str().as_encoded_bytes()).unwrap_or_default();
    tracing::info!(exe = %exe.display(), "re-executing with the sockets handed over");
    match nix::unistd::execv(&exe_c, &args) {
        Err(source) => StartError::Reexec { exe, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue (security) 10: a descriptor number that is not one (negative, not a number, past
    /// `i32::MAX` and wrapping to -1) must be refused, never taken as descriptor -1 or a
    /// wrapped number.
    #[test]
    fn inherit_fds_values_that_are_not_descriptors_are_refused() {
        let mut accepted = Vec::new();
        for bad in [
            "dgram=-1,stream=5",
            "dgram=abc,stream=5",
            "dgram=4294967295,stream=5",
            "dgram=99999999999999999999,stream=5",
            "dgram=4,stream=2147483648",
            "dgram=1,stream=5",
            "dgram=4,stream=5,pidfile=-3",
            "dgram=4,stream=5,qlen=-1",
            "dgram=4,stream=5,restarts=x",
            "dgram=4,stream=5,bogus=1",
            "dgram",
        ] {
            match parse_inherit(bad) {
                Ok(i) => accepted.push(format!("{bad:?} -> {:?}/{:?}/{:?}", i.dgram, i.stream, i.pidfile)),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("APM_INHERIT_FDS"), "{bad:?}: {msg}");
                }
            }
        }
        assert!(accepted.is_empty(), "accepted: {accepted:#?}");
    }

    #[test]
    fn inherit_fds_as_reexec_writes_them_are_read() {
        let i = parse_inherit("dgram=4,stream=5,qlen=512,restarts=2,pidfile=7").unwrap();
        assert_eq!(
            (i.dgram, i.stream, i.pidfile, i.queue_len, i.restarts),
            (Some(4), Some(5), Some(7), 512, 2)
        );
        // Without a PID file descriptor `reexec` leaves a trailing comma.
        let i = parse_inherit("dgram=4,stream=5,qlen=10,restarts=1,").unwrap();
        assert_eq!((i.dgram, i.stream, i.pidfile), (Some(4), Some(5), None));
    }
}
