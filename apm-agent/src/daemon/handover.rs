//! How the receiving sockets outlive this process, so a restart is not a gap for PHP:
//! descriptors inherited from a previous image (`apm-agent restart`, the memory guard's
//! self-restart), systemd's fd store (`systemctl restart`), and the re-exec that hands them on.
//! Also readiness: systemd's `READY=1` or the pipe of `apm-agent start`.

use std::os::fd::{AsFd, IntoRawFd};
use std::path::PathBuf;

use crate::config::Config;
use crate::daemon::StartError;
use crate::daemon::pidfile::PidFile;
use crate::pipeline::ingest::Sockets;

const INHERIT_ENV: &str = "APM_INHERIT_FDS";

/// Descriptors handed down by a previous image of this process.
#[derive(Debug, Default)]
pub struct Inherited {
    pub dgram: Option<i32>,
    pub stream: Option<i32>,
    pub pidfile: Option<i32>,
    pub queue_len: u32,
    pub restarts: u64,
}

/// Reads (and clears) what a previous image handed down in `APM_INHERIT_FDS`.
pub fn take_inherited() -> Inherited {
    let mut i = Inherited::default();
    let Ok(v) = std::env::var(INHERIT_ENV) else {
        return i;
    };
    // SAFETY: called at start, before the runtime spawns threads that read the environment.
    unsafe { std::env::remove_var(INHERIT_ENV) };
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
    i
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

/// Tells whoever started us that we are ready (systemd `READY=1`, or `apm-agent start`'s pipe).
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Some(fd) = std::env::var("APM_READY_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: `apm-agent start` passed us the write end of a pipe under this number.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = std::io::Write::write_all(&mut &f, b"ready\n");
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
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| {
            PathBuf::from(
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string(),
            )
        })
        .unwrap_or_else(|_| PathBuf::from("apm-agent"));
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .map(|a| std::ffi::CString::new(a.into_encoded_bytes()).unwrap_or_default())
        .collect();
    let exe_c = std::ffi::CString::new(exe.as_os_str().as_encoded_bytes()).unwrap_or_default();
    tracing::info!(exe = %exe.display(), "re-executing with the sockets handed over");
    match nix::unistd::execv(&exe_c, &args) {
        Err(source) => StartError::Reexec { exe, source },
    }
}
