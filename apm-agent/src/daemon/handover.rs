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
/// The counters of the previous image (`Telemetry::carry`), handed down with the sockets.
const CARRY_ENV: &str = "APM_CARRY_COUNTERS";

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
    /// The previous image's counters (`Telemetry::carry`), to be added to this one's.
    pub carried: Option<String>,
    /// The readiness pipe of `apm-agent start`, written once and closed at readiness.
    pub ready: Option<OwnedFd>,
}

/// A malformed `APM_INHERIT_FDS`. Only a previous image of this binary writes it, so anything
/// else is refused outright: a wrong number taken for a descriptor would make the agent read
/// from (and later close) whatever that number is.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{INHERIT_ENV}: `{0}` is not key=value")]
    Malformed(String),
    #[error("{INHERIT_ENV}: unknown key `{0}`")]
    UnknownKey(String),
    #[error("{INHERIT_ENV}: {key}={value:?} is not a descriptor number (3 to {max})", max = i32::MAX)]
    BadFd { key: String, value: String },
    #[error("{INHERIT_ENV}: {key}={value:?} is not a number")]
    BadNumber { key: String, value: String },
    #[error("{INHERIT_ENV}: `{0}` given twice")]
    Duplicate(String),
}

/// Reads and clears what was handed down (`APM_INHERIT_FDS`, `APM_READY_FD`). Call it first
/// thing, before any thread runs: clearing the variables is what keeps a re-executed image from
/// taking a descriptor number it no longer owns for one it was given.
pub fn take_inherited() -> Result<Inherited, HandoverError> {
    let ready = take_ready_fd();
    let carried = std::env::var(CARRY_ENV).ok();
    if carried.is_some() {
        // SAFETY: as below: at start, before any other thread exists.
        unsafe { std::env::remove_var(CARRY_ENV) };
    }
    let Ok(v) = std::env::var(INHERIT_ENV) else {
        return Ok(Inherited {
            ready,
            ..Inherited::default()
        });
    };
    // SAFETY: called at start, before any other thread exists (`std::env::remove_var`'s
    // requirement: no concurrent access to the environment).
    unsafe { std::env::remove_var(INHERIT_ENV) };
    Ok(Inherited {
        carried,
        ready,
        ..parse_inherit(&v)?
    })
}

/// Parses `APM_INHERIT_FDS` as [`reexec`] writes it (`dgram=N,stream=N,qlen=N,restarts=N,`
/// then `pidfile=N` or nothing). Strict: every entry is a known key given once; a descriptor
/// is a decimal in 3..=i32::MAX (never stdio, never -1 or a value that wraps to it).
fn parse_inherit(v: &str) -> Result<Inherited, HandoverError> {
    let mut i = Inherited::default();
    let mut seen: Vec<&str> = Vec::new();
    for kv in v.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| HandoverError::Malformed(kv.to_string()))?;
        if seen.contains(&k) {
            return Err(HandoverError::Duplicate(k.to_string()));
        }
        seen.push(k);
        let fd = || {
            strict_decimal::<i32>(v)
                .filter(|&n| n > 2)
                .ok_or_else(|| HandoverError::BadFd {
                    key: k.to_string(),
                    value: v.to_string(),
                })
        };
        let number = || HandoverError::BadNumber {
            key: k.to_string(),
            value: v.to_string(),
        };
        match k {
            "dgram" => i.dgram = Some(fd()?),
            "stream" => i.stream = Some(fd()?),
            "pidfile" => i.pidfile = Some(fd()?),
            "qlen" => i.queue_len = strict_decimal(v).ok_or_else(number)?,
            "restarts" => i.restarts = strict_decimal(v).ok_or_else(number)?,
            _ => return Err(HandoverError::UnknownKey(k.to_string())),
        }
    }
    Ok(i)
}

/// Digits only (no sign, no spaces), within the type's range.
fn strict_decimal<T: std::str::FromStr>(v: &str) -> Option<T> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// The receiving sockets: inherited from a previous image, kept by systemd across a restart,
/// or bound afresh.
pub fn sockets(cfg: &Config, inherited: &Inherited) -> Result<Sockets, StartError> {
    Ok(match (inherited.dgram, inherited.stream) {
        (Some(d), Some(s)) => Sockets::adopt(d, s, inherited.queue_len, &cfg.ingest)?,
        _ => match systemd_stored(cfg)? {
            Some(s) => s,
            None => Sockets::bind(&cfg.ingest, cfg.socket_mode())?,
        },
    })
}

/// Sockets systemd kept for us in its fd store across a restart (`FDSTORE=1`). `None` when it
/// kept none; an error when what it hands us is not our sockets (checked by
/// [`Sockets::adopt`]): binding afresh would fail on the live path anyway, and a clear error
/// says why.
fn systemd_stored(cfg: &Config) -> Result<Option<Sockets>, StartError> {
    let Ok(fds) = sd_notify::listen_fds_with_names() else {
        return Ok(None);
    };
    let fds: Vec<(i32, String)> = fds.collect();
    let (Some(d), Some(s)) = (
        fds.iter().find(|(_, n)| n == "dgram"),
        fds.iter().find(|(_, n)| n == "stream"),
    ) else {
        return Ok(None);
    };
    let qlen = std::fs::read_to_string(cfg.control.state_dir.join("queue_len"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Some(Sockets::adopt(d.0, s.0, qlen, &cfg.ingest)?))
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
    let fd = strict_decimal::<i32>(&v).filter(|&fd| fd > 2)?;
    // Only a pipe: a stale or forged number must not make us write into (and close) an
    // unrelated descriptor.
    // SAFETY: called at start on the only thread; the borrow ends before anything could close it.
    let b = unsafe { crate::fsutil::borrow_inherited(fd) }?;
    let st = nix::sys::stat::fstat(b).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // SAFETY: the number is an open pipe (checked above) that `apm-agent start` handed us;
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
pub fn reexec(sockets: Sockets, pid: PidFile, restarts: u64, carry: &str) -> StartError {
    let pidfd = pid.raw_fd();
    let qlen = sockets.queue_len;
    let d = sockets.dgram.into_raw_fd();
    let s = sockets.stream.into_raw_fd();
    for fd in [Some(d), Some(s), pidfd].into_iter().flatten() {
        // SAFETY: fcntl on integers touches no memory of ours; these descriptors are ours
        // (just released from their owners above, and the PID file's lock), so changing their
        // flags cannot affect anyone else's.
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
    // SAFETY: the runtime is about to be replaced by exec; `set_var` needs no concurrent access
    // to the environment, and the runtime's threads are idle (the pipeline was stopped).
    unsafe {
        std::env::set_var(INHERIT_ENV, v);
        std::env::set_var(CARRY_ENV, carry);
    };
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
                Ok(i) => accepted.push(format!(
                    "{bad:?} -> {:?}/{:?}/{:?}",
                    i.dgram, i.stream, i.pidfile
                )),
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
