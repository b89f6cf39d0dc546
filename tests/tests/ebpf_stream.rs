//! Privileged: drops on the stream socket (`ingest.stream_socket`). PHP (`listener.php`'s
//! `sendFrame`) connects non-blocking, so a full listen backlog fails the `connect` with EAGAIN
//! and the profile is lost; a frame it cannot finish within `stream_wait_ms` is abandoned (the
//! socket closed mid-frame) and lost too. Both are drops, per worker and host, and they feed
//! the sample-rate rule; an EAGAIN that PHP waits out and then finishes the frame is not.
//! Runs as root (CI); fails in CI when eBPF cannot load, skips with a reason elsewhere.
//!
//! The children are forked from the (multi-threaded) test process and make only raw syscalls
//! before they `_exit`; everything they need is prepared before the fork.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use apm_tests::ebpf::TestMonitor;

const WAIT: Duration = Duration::from_secs(10);
/// Larger than a Unix stream socket's send buffer (`net.core.wmem_default`, 208 KiB): such a
/// frame cannot be written until the agent reads.
const BIG: usize = 512 * 1024;
static FRAME: [u8; BIG] = [b'x'; BIG];

/// The tests of this file run one at a time. Each monitor watches PHP-named processes host-wide,
/// so tests run in parallel saw each other's processes: one test's forked `php-fpm8.2` child was
/// among another's PHP exits (with no drop of its own), and an abandoned-frame count came out 2
/// for 3 (3 failures in 35 runs of `cargo test -p apm-tests --test ebpf_stream` before this lock,
/// and one in CI).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it must not fail the others too.
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a child saw itself (written to the result pipe as raw integers).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    connect_ok: u64,
    connect_eagain: u64,
    connect_other: u64,
    frames_done: u64,
    frames_abandoned: u64,
    sends_eagain: u64,
    /// Sends that failed otherwise (EPIPE: the peer closed before the frame was written). The
    /// kernel counts these as failed sends, not abandoned frames.
    sends_other: u64,
}

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    assert!(p.len() < sa.sun_path.len());
    for (d, s) in sa.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    // As PHP passes it: family + path, no NUL.
    (sa, (2 + p.len()) as libc::socklen_t)
}

/// A stream socket bound at `path` with the given listen backlog, never accepting by itself.
fn listen(path: &Path, backlog: i32) -> OwnedFd {
    let (sa, len) = sockaddr(path);
    // SAFETY: raw socket calls on a descriptor owned right after creation.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let fd = OwnedFd::from_raw_fd(fd);
        assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len), 0);
        assert_eq!(libc::listen(fd.as_raw_fd(), backlog), 0);
        fd
    }
}

/// One frame as `listener.php`'s `sendFrame` writes it: a fresh non-blocking socket, a
/// `connect` (EAGAIN when the backlog is full: the profile is lost), then `send(MSG_DONTWAIT |
/// MSG_NOSIGNAL)` of the rest of the frame until it is all written, polling for room for at
/// most `wait_ms` in all, else the socket is closed mid-frame.
///
/// # Safety
/// Raw syscalls only (callable in a forked child of a multi-threaded process).
unsafe fn php_frame(
    sa: &libc::sockaddr_un,
    alen: libc::socklen_t,
    len: usize,
    wait_ms: i64,
    seen: &mut Seen,
) {
    // SAFETY: (whole body) raw syscalls on a descriptor created and closed here, buffers that
    // outlive each call.
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            seen.connect_other += 1;
            return;
        }
        if libc::connect(fd, std::ptr::from_ref(sa).cast(), alen) != 0 {
            if *libc::__errno_location() == libc::EAGAIN {
                seen.connect_eagain += 1;
            } else {
                seen.connect_other += 1;
            }
            libc::close(fd);
            return;
        }
        seen.connect_ok += 1;
        let mut now = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
        let deadline = now.tv_sec * 1000 + now.tv_nsec / 1_000_000 + wait_ms;
        let mut off = 0;
        loop {
            let n = libc::send(
                fd,
                FRAME.as_ptr().add(off).cast(),
                len - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            if n < 0 {
                if *libc::__errno_location() != libc::EAGAIN {
                    seen.sends_other += 1;
                    libc::close(fd);
                    return;
                }
                seen.sends_eagain += 1;
            } else {
                off += n as usize;
            }
            if off >= len {
                seen.frames_done += 1;
                libc::close(fd);
                return;
            }
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
            let left = deadline - (now.tv_sec * 1000 + now.tv_nsec / 1_000_000);
            if left <= 0 {
                break;
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            if libc::poll(&raw mut p, 1, left as i32) < 1 {
                break;
            }
        }
        seen.frames_abandoned += 1;
        libc::close(fd);
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned from here on.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A forked child named `php-fpm8.2` that ran its body, reported what it saw, and now waits
/// (a worker between requests: still listed) until `release`.
struct Child {
    pid: i32,
    seen: Seen,
    go: OwnedFd,
    reaped: bool,
}

impl Child {
    fn spawn(body: impl FnOnce(&mut Seen)) -> Self {
        let (r, w) = pipe();
        let (go_r, go_w) = pipe();
        // SAFETY: the child makes raw syscalls only, then _exits (see the module docs).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut seen = Seen::default();
            // SAFETY: raw syscalls on values prepared before the fork.
            unsafe {
                libc::prctl(libc::PR_SET_NAME, c"php-fpm8.2".as_ptr());
                // A test that fails before `release` must not leave the child behind.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                body(&mut seen);
                libc::write(w.as_raw_fd(), (&raw const seen).cast(), size_of::<Seen>());
                let mut b = 0u8;
                libc::read(go_r.as_raw_fd(), (&raw mut b).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(w);
        drop(go_r);
        let mut seen = Seen::default();
        let mut f = std::fs::File::from(r);
        // SAFETY: Seen is plain integers.
        let buf = unsafe {
            std::slice::from_raw_parts_mut((&raw mut seen).cast::<u8>(), size_of::<Seen>())
        };
        f.read_exact(buf).expect("the child's report");
        Self {
            pid,
            seen,
            go: go_w,
            reaped: false,
        }
    }

    fn release(mut self) {
        // SAFETY: one byte from a live buffer.
        unsafe { libc::write(self.go.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        let mut st = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(self.pid, &raw mut st, 0) }, self.pid);
        self.reaped = true;
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn field(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_u64()
}

fn metrics(m: &TestMonitor) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    m.monitor.register_metrics(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    text
}

fn worker(v: &serde_json::Value, pid: i32) -> Option<&serde_json::Value> {
    v.get("workers")?
        .as_array()?
        .iter()
        .find(|w| w.get("pid").and_then(serde_json::Value::as_i64) == Some(i64::from(pid)))
}

/// A full listen backlog: PHP's non-blocking `connect` fails with EAGAIN and the profile is
/// gone. Counted as a drop (host and worker), shown by reason, and it lowers the sample rate.
#[test]
fn ebpf_stream_connect_eagain_is_a_drop_per_worker_and_host() {
    let _serial = serial();
    let Some(m) = TestMonitor::start(
        "ebpf_stream_connect_eagain_is_a_drop_per_worker_and_host",
        |_| {},
    ) else {
        return;
    };
    assert_eq!(m.php.sample_rate(), 1.0);
    // Backlog 0: one connection waits in the queue, nothing is ever accepted, the rest of the
    // connects find the queue full.
    let _l = listen(&m.stream, 0);
    let (sa, alen) = sockaddr(&m.stream);
    let child = Child::spawn(|seen| {
        for _ in 0..6 {
            // SAFETY: raw syscalls (forked child).
            unsafe { php_frame(&sa, alen, 1024, 10, seen) };
        }
    });
    let (pid, seen) = (child.pid, child.seen);
    assert!(
        seen.connect_eagain >= 1 && seen.connect_other == 0 && seen.sends_other == 0,
        "the backlog never filled: {seen:?}"
    );
    let lost = seen.connect_eagain + seen.frames_abandoned;
    let v = m.wait_for(WAIT, "the child's connect EAGAINs as drops", |s| {
        let v = serde_json::to_value(s).unwrap();
        field(&v, &["stream", "failed", "eagain"]) >= Some(seen.connect_eagain + seen.sends_eagain)
            && field(&v, &["stream", "ok"]) >= Some(seen.frames_done)
            && field(&v, &["drops"]) >= Some(lost)
            // The worker's record can appear a poll before its counters do (a CI run saw it
            // with every counter 0): wait for them, then check them exactly below.
            && worker(&v, pid).and_then(|w| field(w, &["drops"])) >= Some(lost)
    });
    let v = serde_json::to_value(&v).unwrap();
    assert_eq!(
        field(&v, &["stream", "connect_eagain"]),
        Some(seen.connect_eagain),
        "{v:#}"
    );
    assert_eq!(field(&v, &["drops"]), Some(lost), "host drops: {v:#}");
    let w = worker(&v, pid).unwrap();
    assert_eq!(
        field(w, &["stream_connect_eagain"]),
        Some(seen.connect_eagain),
        "{w:#}"
    );
    assert_eq!(field(w, &["drops"]), Some(lost), "worker drops: {w:#}");

    let text = metrics(&m);
    let line = format!(
        "apm_ebpf_stream_drops_total{{reason=\"connect_eagain\"}} {}",
        seen.connect_eagain
    );
    assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    let line = format!("apm_ebpf_drops_total {lost}");
    assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");

    // Drops the rule can cure by sampling less: the rate goes down.
    m.wait_for(WAIT, "the sample rate lowered", |s| s.sample_rate < 1.0);
    child.release();
}

/// Frames larger than the socket buffer to a listener that never reads: PHP gives up after its
/// wait and closes mid-frame, each one a drop. A frame that waits but completes (the agent read
/// in time) is backpressure, not a drop; a small frame neither.
#[test]
fn ebpf_stream_frame_abandoned_after_the_wait_is_a_drop() {
    let _serial = serial();
    let Some(m) = TestMonitor::start(
        "ebpf_stream_frame_abandoned_after_the_wait_is_a_drop",
        |c| c.adaptive_sampling = false,
    ) else {
        return;
    };
    let l = listen(&m.stream, 16);
    // SAFETY: the listener's descriptor, handed over to std.
    let l = unsafe { UnixListener::from_raw_fd(libc::dup(l.as_raw_fd())) };
    // The "agent": accepts in connect order; reads connection 4 to its end (the frame that
    // completes after a wait), holds the others unread, and hands them back so they stay open
    // until the child has written: closed any earlier, the last frame's first send can meet
    // EPIPE, a failed send rather than an abandoned frame (it failed so on 5.10 in CI).
    let reader = std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut read = 0u64;
        for i in 0..6 {
            let (mut c, _) = l.accept().expect("accept");
            if i == 4 {
                std::thread::sleep(Duration::from_millis(50));
                let mut buf = Vec::new();
                read = c.read_to_end(&mut buf).expect("read") as u64;
            } else {
                held.push(c);
            }
        }
        (read, held)
    });
    let (sa, alen) = sockaddr(&m.stream);
    let child = Child::spawn(|seen| {
        // SAFETY: raw syscalls (forked child).
        unsafe {
            php_frame(&sa, alen, 1024, 10, seen);
            php_frame(&sa, alen, BIG, 10, seen);
            php_frame(&sa, alen, BIG, 20, seen);
            php_frame(&sa, alen, 2048, 10, seen);
            php_frame(&sa, alen, BIG, 5000, seen);
            php_frame(&sa, alen, BIG, 0, seen);
        }
    });
    let (pid, seen) = (child.pid, child.seen);
    let (read, _held) = reader.join().unwrap();
    assert_eq!(read, BIG as u64, "the waited-for frame arrived whole");
    assert_eq!(
        (
            seen.connect_ok,
            seen.frames_done,
            seen.frames_abandoned,
            seen.sends_other
        ),
        (6, 3, 3, 0),
        "{seen:?}"
    );
    let v = m.wait_for(WAIT, "the abandoned frames as drops", |s| {
        let v = serde_json::to_value(s).unwrap();
        field(&v, &["stream", "failed", "eagain"]) >= Some(seen.sends_eagain)
            && worker(&v, pid).is_some()
            && field(&v, &["drops"]) >= Some(seen.frames_abandoned)
    });
    let v = serde_json::to_value(&v).unwrap();
    assert_eq!(
        field(&v, &["stream", "abandoned_frames"]),
        Some(seen.frames_abandoned),
        "{v:#}"
    );
    assert_eq!(
        field(&v, &["stream", "failed", "eagain"]),
        Some(seen.sends_eagain),
        "EAGAIN stays counted as backpressure: {v:#}"
    );
    assert_eq!(
        field(&v, &["drops"]),
        Some(seen.frames_abandoned),
        "host drops: {v:#}"
    );
    let w = worker(&v, pid).unwrap();
    assert_eq!(
        field(w, &["stream_abandoned_frames"]),
        Some(seen.frames_abandoned),
        "{w:#}"
    );
    assert_eq!(
        field(w, &["drops"]),
        Some(seen.frames_abandoned),
        "worker drops: {w:#}"
    );
    let text = metrics(&m);
    let line = format!(
        "apm_ebpf_stream_drops_total{{reason=\"abandoned_frame\"}} {}",
        seen.frames_abandoned
    );
    assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    child.release();
}

/// The same two drops made by the real `listener.php` (Debian's php8.2-cli running a request
/// script with it prepended; `APM_MAX_DATAGRAM=1` sends every profile on the stream socket).
/// Ground truth: what reached the stream socket (connections queued, bytes of each frame).
#[test]
fn ebpf_stream_drops_of_the_real_listener_php_are_counted() {
    let _serial = serial();
    let Some(m) = TestMonitor::start(
        "ebpf_stream_drops_of_the_real_listener_php_are_counted",
        // The rate must stay 1.0: every request is profiled and sends.
        |c| c.adaptive_sampling = false,
    ) else {
        return;
    };
    let Some(php) = apm_tests::php::require("php CLI", apm_tests::php::php_cli()) else {
        return;
    };
    let listener = apm_tests::php::listener_php();
    let request = |body: &str, n: usize| {
        let script = m.dir.path().join("request.php");
        std::fs::write(&script, body).unwrap();
        for _ in 0..n {
            let out = std::process::Command::new(&php)
                .arg("-d")
                .arg(format!("auto_prepend_file={}", listener.display()))
                .arg(&script)
                .env("APM_SOCKET", &m.dgram)
                .env("APM_STREAM_SOCKET", &m.stream)
                .env("APM_RUNTIME_DIR", m.dir.path())
                .env("APM_MAX_DATAGRAM", "1")
                .env("APM_STREAM_WAIT_MS", "10")
                .output()
                .expect("run php");
            assert!(out.status.success(), "{out:?}");
        }
    };

    // A full backlog: one connection (the test's own, not PHP: not counted) waits in a queue
    // of 0, so each PHP connect fails with EAGAIN.
    let l = listen(&m.stream, 0);
    let (sa, alen) = sockaddr(&m.stream);
    // SAFETY: raw socket calls on a descriptor owned right after creation.
    let _filler = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let fd = OwnedFd::from_raw_fd(fd);
        assert_eq!(
            libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), alen),
            0
        );
        fd
    };
    request("<?php echo 'done';", 3);
    // Ground truth: nothing but the filler ever got into the queue.
    // SAFETY: the listener's descriptor, handed over to std.
    let l = unsafe { UnixListener::from_raw_fd(libc::dup(l.as_raw_fd())) };
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_ok(), "the filler");
    assert!(l.accept().is_err(), "no PHP connection got in");
    drop(l);
    let s = m.wait_for(WAIT, "three connect EAGAINs", |s| {
        s.recent_exits.len() >= 3 && s.stream.connect_eagain >= 3
    });
    assert_eq!(s.stream.connect_eagain, 3, "{:#?}", s.stream);
    assert_eq!(s.drops, 3);
    for e in s.recent_exits.iter().filter(|e| e.comm.starts_with("php")) {
        assert_eq!(e.drops, 1, "one lost profile per request: {e:?}");
    }

    // A reader that never reads, and profiles larger than the socket buffer: PHP writes what
    // fits, waits stream_wait_ms for room, closes mid-frame.
    std::fs::remove_file(&m.stream).unwrap();
    let l = listen(&m.stream, 16);
    request(
        "<?php \\Bitville\\Apm\\Listener::tag('big', str_repeat('x', 600000)); echo 'done';",
        2,
    );
    // SAFETY: as above.
    let l = unsafe { UnixListener::from_raw_fd(libc::dup(l.as_raw_fd())) };
    l.set_nonblocking(true).unwrap();
    let mut torn = 0;
    while let Ok((mut c, _)) = l.accept() {
        c.set_nonblocking(false).unwrap();
        let mut b = Vec::new();
        c.read_to_end(&mut b).unwrap();
        let want = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
        assert!(
            want > 600_000 && b.len() < 4 + want,
            "a torn frame: {} of {want}",
            b.len()
        );
        torn += 1;
    }
    assert_eq!(torn, 2, "both requests connected and were cut short");
    let s = m.wait_for(WAIT, "two abandoned frames", |s| {
        s.stream.abandoned_frames >= 2
    });
    assert_eq!(s.stream.abandoned_frames, 2, "{:#?}", s.stream);
    assert_eq!(s.drops, 3 + 2);
}
