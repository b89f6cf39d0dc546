//! One set of helpers for everything that drives the project's real processes: the
//! integration tests (`tests/`) and `xtask` (`run`, `bench`). Light on purpose: it does not
//! pull in the agent, so `cargo xtask` stays quick to build.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub mod nats;

/// The id every profile of `cargo xtask bench --only compare` starts with, shared by its sender
/// and its sinks (`xtask/src/bench_compare.rs`, `apm-bench-sink`): [`bench_id::HEAD`], then the id
/// in [`bench_id::DIGITS`] decimal digits.
pub mod bench_id {
    pub const HEAD: &[u8] = br#"{"id":"b-"#;
    pub const DIGITS: usize = 20;

    /// The id in the first [`DIGITS`] bytes of `b` (what follows [`HEAD`]); `None` when they are
    /// not all digits or the id does not fit in a `u64`.
    pub fn parse(b: &[u8]) -> Option<u64> {
        b.get(..DIGITS)?.iter().try_fold(0u64, |acc, d| {
            d.is_ascii_digit()
                .then(|| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
                .flatten()
        })
    }
}

pub use apm_control::{Client, Status};

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`). In CI a test
/// that cannot get what it needs (root, eBPF, a tmpfs, PHP) fails; elsewhere it may skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Where the workspace binaries are: `APM_TEST_BIN_DIR` when set (an installed package, or an
/// older build to show that a test fails there), else the directory of the running test
/// executable's parent (`target/release` for `target/release/deps/TEST`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("APM_TEST_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the command to run when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo xtask build` or `cargo xtask test`",
        p.display()
    );
    p
}

/// A child process that is stopped when dropped: SIGTERM, then SIGKILL after 15 s.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Self> {
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name} ({cmd:?}): {e}")))?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    /// Spawns in a process group of its own, so a terminal's Ctrl-C reaches only the caller,
    /// which then stops its children in order.
    pub fn spawn_group(name: &str, cmd: &mut Command) -> io::Result<Self> {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        Self::spawn(name, cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// An error when the process has already exited (it should be serving).
    pub fn check_running(&mut self) -> io::Result<()> {
        match self.child.try_wait()? {
            Some(status) => Err(io::Error::other(format!(
                "{} exited early: {status}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// SIGTERM, then up to `timeout` to exit, then SIGKILL. The exit status.
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait()
    }

    /// SIGTERM, then waits up to `timeout` (see [`Proc::wait`]).
    pub fn stop(&mut self, timeout: Duration) -> Exit {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Exit::from(st);
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to end: how it ended, or [`Exit::TimedOut`]
    /// (it is then killed and reaped, so no zombie is left).
    pub fn wait(&mut self, timeout: Duration) -> Exit {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Exit::from(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Exit::TimedOut
    }
}

/// How a waited-for process ended: three cases a test must not confuse (a kill is not a
/// clean exit, and a hang is not a kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it (this number).
    Signaled(i32),
    /// It was still running when the wait ran out (it was then killed by the waiter).
    TimedOut,
}

impl From<ExitStatus> for Exit {
    fn from(st: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (st.code(), st.signal()) {
            (Some(c), _) => Self::Code(c),
            (None, Some(s)) => Self::Signaled(s),
            // Neither: stopped by a signal, which `try_wait` (no WUNTRACED) does not report.
            (None, None) => Self::Signaled(st.stopped_signal().unwrap_or(0)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.terminate(Duration::from_secs(15));
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 50 ms until it returns `Some`; after `timeout` panics with the message
/// `on_timeout` builds (the last state seen, a log).
pub fn poll<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    on_timeout: impl FnOnce() -> String,
) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?}: {}",
            on_timeout()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port on 127.0.0.1 kept for the caller until this process exits.
///
/// Picking a free port by binding port 0 and closing the socket races: another test's
/// listener can be handed the same port before ours binds it, and our agent then delivers to
/// the wrong listener. So the socket that picked the port is kept open, bound with
/// `SO_REUSEADDR` but never listening:
/// - the kernel never hands a bound port out to a port-0 bind, and a bind without
///   `SO_REUSEADDR` gets `EADDRINUSE`: nobody else takes it;
/// - a server that sets `SO_REUSEADDR` (tokio, std, apm-listener, the agent's `/metrics`,
///   php-fpm) still binds and listens on it, as often as the test restarts it;
/// - while no server listens, a connection is refused: the address of a listener that is
///   down, for as long as the test wants it down.
///
/// The descriptor is leaked on purpose (one per call, for the life of the test process).
/// Where a program can report its address, binding port 0 is simpler still
/// (`apm-listener --listen 127.0.0.1:0` prints it on its ready line).
pub fn free_port() -> io::Result<u16> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&sock, sockopt::ReuseAddr, &true)?;
    bind(sock.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
    let port = getsockname::<SockaddrIn>(sock.as_raw_fd())?.port();
    // Kept open until exit: closing it would give the port back to whoever binds next.
    std::mem::forget(sock);
    Ok(port)
}

/// The status document of the agent whose control socket is `sock`, raw (`None` when it does
/// not answer).
pub fn status_json(sock: &Path) -> Option<serde_json::Value> {
    Client::new(sock).request("status").ok()
}

/// The status of the agent whose runtime directory is `runtime_dir`, typed.
pub fn status(runtime_dir: &Path) -> Option<Status> {
    Client::in_runtime_dir(runtime_dir).status().ok()
}

/// The scheduling niceness of every thread of process `pid`, by thread id, from
/// `/proc/PID/task/TID/stat` (field 19); what the kernel schedules with, not what the agent says.
pub fn thread_nices(pid: u32) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let path = e.expect("task entry").path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let tid = path
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .expect("tid");
        // After the comm's closing parenthesis the fields start at 3 (state); nice is 19.
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19 - 3)?.parse().ok())
            .expect("nice field");
        out.push((tid, nice));
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc_sigkill() -> i32 {
        nix::sys::signal::Signal::SIGKILL as i32
    }

    /// A process killed by a signal and one that did not exit in time must not look the same:
    /// a test asserting a clean exit, or a kill, could otherwise pass on the other.
    /// The old `free_port` closed its socket: any other bind could take the port before the
    /// caller's listener did, and route one test's agent to another test's listener.
    #[test]
    fn a_free_port_stays_reserved_for_the_caller() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
        use std::os::fd::AsRawFd;
        let port = free_port().unwrap();
        // Someone else (no SO_REUSEADDR, or a port-0 bind handing it out) cannot have it.
        let other = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let taken = bind(other.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port));
        assert!(taken.is_err(), "port {port} was taken by another socket");
        for _ in 0..200 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            assert_ne!(l.local_addr().unwrap().port(), port, "handed out again");
        }
        // Nobody answers there, yet the caller's own server (SO_REUSEADDR) binds it.
        let refused = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let server = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        drop(server);
        let again = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        drop(again);
    }

    #[test]
    fn a_kill_and_a_timeout_are_told_apart() {
        let mut killed = Proc::spawn("sleep", Command::new("sleep").arg("30")).unwrap();
        killed.signal(nix::sys::signal::Signal::SIGKILL);
        let killed = killed.wait(Duration::from_secs(5));
        let mut hung = Proc::spawn("sleep", Command::new("sleep").arg("30")).unwrap();
        let hung = hung.wait(Duration::from_millis(200));
        assert_ne!(killed, hung, "killed: {killed:?}, timed out: {hung:?}");
        assert_eq!(killed, Exit::Signaled(libc_sigkill()));
        assert_eq!(hung, Exit::TimedOut);
        let mut ok = Proc::spawn("true", &mut Command::new("true")).unwrap();
        assert_eq!(ok.wait(Duration::from_secs(5)), Exit::Code(0));
    }
}
