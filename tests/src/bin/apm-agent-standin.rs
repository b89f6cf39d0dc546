//! A stand-in for an agent that hangs: it holds the PID file's lock, names itself in it, and
//! ignores SIGTERM, so `apm-agent stop` must escalate to SIGKILL. Its name starts with
//! `apm-agent` because `stop` signals nothing else.
//!
//! apm-agent-standin PID_FILE

use std::io::Write;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: apm-agent-standin PID_FILE");
    // SAFETY: setting a signal disposition to SIG_IGN before any thread exists.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("open the PID file");
    let mut lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the PID file");
    write!(
        lock,
        "{{\"pid\":{},\"startedAt\":\"x\",\"version\":\"0\",\"configPath\":null}}",
        std::process::id()
    )
    .expect("write the PID file");
    lock.flush().expect("flush");
    println!("locked");
    std::thread::sleep(std::time::Duration::from_mins(10));
}
