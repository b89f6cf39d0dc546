//! One set of helpers for everything that drives the project's real processes: the
//! integration tests (`tests/`) and `xtask` (`run`, `bench`). Light on purpose: it does not
//! pull in the agent, so `cargo xtask` stays quick to build.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

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

    /// SIGTERM, then wait up to `timeout`: the exit code (`None` when it had to be killed or
    /// died of a signal).
    pub fn stop(&mut self, timeout: Duration) -> Option<i32> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return st.code();
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the exit code; kills it after that (`None`).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
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

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it before the
/// caller binds it: where the program can, let it bind port 0 and report its address instead
/// (`apm-listener --listen 127.0.0.1:0` prints it).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
