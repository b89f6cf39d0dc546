//! Helpers for the privileged eBPF tests: an in-process `apm_agent::monitor` on its own
//! runtime, and forked sender children that name themselves like PHP-FPM workers and report
//! what they observed themselves (the ground truth the kernel counts are compared with).
//!
//! The children are `fork()`ed from the test process and only make raw syscalls (no
//! allocation, no locks), so forking a multi-threaded test binary is safe.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apm_agent::config::{EbpfConfig, EbpfEnabled};
use apm_agent::monitor::{CancellationToken, EbpfStatus, Monitor, MonitorParams};
use apm_agent::phpctl::PhpControl;
use apm_agent::telemetry::Telemetry;
use apm_common::{ERR_KINDS, err_index};

/// A monitor started in-process on a temporary directory, stopped on drop.
pub struct TestMonitor {
    pub monitor: Monitor,
    pub dir: tempfile::TempDir,
    pub dgram: PathBuf,
    pub stream: PathBuf,
    pub telemetry: Arc<Telemetry>,
    pub php: Arc<PhpControl>,
    shutdown: CancellationToken,
    rt: tokio::runtime::Runtime,
}

use apm_testkit::in_ci;

impl TestMonitor {
    /// Starts with `ebpf.enabled = "on"` and a 100 ms poll. `None` (after printing why) when
    /// eBPF cannot load outside CI; in CI that is a test failure.
    pub fn start(test: &str, tweak: impl FnOnce(&mut EbpfConfig)) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("apm-ebpf-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dgram = dir.path().join("listener.sock");
        let stream = dir.path().join("listener-stream.sock");
        let telemetry = Telemetry::new();
        let php = Arc::new(PhpControl::new(dir.path()).expect("php control files"));
        let mut cfg = EbpfConfig {
            enabled: EbpfEnabled::On,
            poll_interval: Duration::from_millis(100),
            ..EbpfConfig::default()
        };
        tweak(&mut cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let shutdown = CancellationToken::new();
        let params = MonitorParams {
            cfg,
            dgram_socket: dgram.clone(),
            stream_socket: stream.clone(),
            telemetry: telemetry.clone(),
            php: php.clone(),
        };
        match rt.block_on(apm_agent::monitor::start(params, shutdown.clone())) {
            Ok(monitor) => {
                record_facts(&monitor.status());
                Some(Self {
                    monitor,
                    dir,
                    dgram,
                    stream,
                    telemetry,
                    php,
                    shutdown,
                    rt,
                })
            }
            Err(e) if in_ci() => panic!("{test}: eBPF must load in CI (root): {e}"),
            Err(e) => {
                eprintln!("SKIPPED {test}: eBPF unavailable here: {e}");
                None
            }
        }
    }

    pub fn status(&self) -> EbpfStatus {
        self.monitor.status()
    }

    /// Polls the status until `pred` holds; panics with the last status after `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&EbpfStatus) -> bool,
    ) -> EbpfStatus {
        let last = std::cell::RefCell::new(None);
        apm_testkit::poll(
            timeout,
            || {
                let s = self.status();
                let ok = pred(&s);
                *last.borrow_mut() = Some(s.clone());
                ok.then_some(s)
            },
            || {
                format!(
                    "waiting for {what}; last status: {}",
                    serde_json::to_string_pretty(&*last.borrow()).unwrap_or_default()
                )
            },
        )
    }

    /// Counts `n` datagrams as received by the agent (the test plays the ingest stage).
    pub fn agent_received(&self, n: u64) {
        use apm_agent::telemetry::{Socket, SocketLabels};
        self.telemetry
            .received
            .get_or_create(&SocketLabels {
                socket: Socket::Dgram,
            })
            .inc_by(n);
    }
}

/// The VM tier's record of how the monitor runs on the guest's kernel (`APM_VM_FACTS`: a file
/// the tier reads back for its summary).
fn record_facts(s: &EbpfStatus) {
    use std::io::Write;
    let Some(path) = std::env::var_os("APM_VM_FACTS") else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "exit_mode={} comm_source={}", s.exit_mode, s.comm_source);
    }
}

impl Drop for TestMonitor {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let m = &self.monitor;
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), m.join()).await })
            .ok();
    }
}

/// What a sender saw itself: successes, their bytes, failures by `apm_common::ErrKind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ok: u64,
    pub bytes: u64,
    pub err: [u64; ERR_KINDS],
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
        self.ok += o.ok;
        self.bytes += o.bytes;
        for (a, b) in self.err.iter_mut().zip(o.err.iter()) {
            *a += b;
        }
    }

    pub fn failed(&self) -> u64 {
        self.err.iter().sum()
    }
}

const OP_SEND: u32 = 1;
const OP_ALLOC: u32 = 2;
const OP_FREE: u32 = 3;
const OP_QUIT: u32 = 4;
const OP_RENAME: u32 = 5;
const OP_SEND_STAY: u32 = 6;

/// How the sender spells the address: PHP passes `2 + strlen(path)`; C code often passes the
/// whole `sockaddr_un` with a NUL after the path.
#[derive(Debug, Clone, Copy)]
pub enum AddrStyle {
    Php,
    Full,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Cmd {
    op: u32,
    count: u32,
    len: u32,
    style: u32,
    threads: u32,
    path_len: u32,
    path: [u8; 108],
}

impl Cmd {
    /// All zero, built without the allocator (the child of a multi-threaded process must not malloc).
    const ZERO: Self = Cmd {
        op: 0,
        count: 0,
        len: 0,
        style: 0,
        threads: 0,
        path_len: 0,
        path: [0; 108],
    };
}

const PAYLOAD_MAX: usize = 1 << 18;
static PAYLOAD: [u8; PAYLOAD_MAX] = [b'x'; PAYLOAD_MAX];

/// A forked child that renamed itself (`prctl(PR_SET_NAME)`) and obeys commands over a pipe.
pub struct Sender {
    pub pid: i32,
    cmd: OwnedFd,
    res: OwnedFd,
    reaped: bool,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned from here on.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn write_all(fd: i32, buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: valid buffer slice.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

fn read_exact(fd: i32, buf: &mut [u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: valid buffer slice.
        let n = unsafe { libc::read(fd, buf[off..].as_mut_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            return false;
        }
        off += n as usize;
    }
    true
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain repr(C) struct of integers.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref::<T>(v).cast::<u8>(), size_of::<T>()) }
}

impl Sender {
    /// Forks a child named `comm` (at most 15 bytes).
    pub fn spawn(comm: &str) -> Self {
        let (cmd_r, cmd_w) = pipe();
        let (res_r, res_w) = pipe();
        let mut name = [0u8; 16];
        name[..comm.len().min(15)].copy_from_slice(&comm.as_bytes()[..comm.len().min(15)]);
        // SAFETY: the child only makes raw syscalls and _exits (see the module docs).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: NUL-terminated name.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            child_loop(cmd_r.as_raw_fd(), res_w.as_raw_fd());
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(0) };
        }
        drop(cmd_r);
        drop(res_w);
        Self {
            pid,
            cmd: cmd_w,
            res: res_r,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn request(&self, c: Cmd) -> Outcome {
        write_all(self.cmd.as_raw_fd(), as_bytes(&c));
        let mut o = Outcome::default();
        // SAFETY: Outcome is plain integers.
        let buf = unsafe {
            std::slice::from_raw_parts_mut((&raw mut o).cast::<u8>(), size_of::<Outcome>())
        };
        assert!(
            read_exact(self.res.as_raw_fd(), buf),
            "sender {} died",
            self.pid
        );
        o
    }

    /// Sends `count` datagrams of `len` bytes with `sendto(MSG_DONTWAIT)` to `path` from one
    /// socket per thread; returns what the child observed.
    pub fn send(
        &self,
        path: &Path,
        count: u32,
        len: usize,
        style: AddrStyle,
        threads: u32,
    ) -> Outcome {
        use std::os::unix::ffi::OsStrExt;
        let p = path.as_os_str().as_bytes();
        assert!(p.len() < 108 && len <= PAYLOAD_MAX);
        let mut c = Cmd {
            op: OP_SEND,
            count,
            len: len as u32,
            style: match style {
                AddrStyle::Php => 0,
                AddrStyle::Full => 1,
            },
            threads: threads.max(1),
            path_len: p.len() as u32,
            path: [0; 108],
        };
        c.path[..p.len()].copy_from_slice(p);
        self.request(c)
    }

    /// Like `send` with `threads` threads, which stay alive (blocked) after sending, so that
    /// `quit` ends them all at once (exit_group), as a process killed with live threads.
    pub fn send_and_stay(&self, path: &Path, count: u32, len: usize, threads: u32) -> Outcome {
        use std::os::unix::ffi::OsStrExt;
        let p = path.as_os_str().as_bytes();
        assert!(p.len() < 108 && len <= PAYLOAD_MAX);
        let mut c = Cmd {
            op: OP_SEND_STAY,
            count,
            len: len as u32,
            style: 0,
            threads: threads.clamp(1, STAY_MAX as u32),
            path_len: p.len() as u32,
            path: [0; 108],
        };
        c.path[..p.len()].copy_from_slice(p);
        self.request(c)
    }

    /// Maps and touches `mb` MiB of anonymous memory.
    pub fn alloc(&self, mb: u32) {
        self.request(Cmd {
            op: OP_ALLOC,
            count: mb,
            len: 0,
            style: 0,
            threads: 0,
            path_len: 0,
            path: [0; 108],
        });
    }

    /// Unmaps what `alloc` mapped.
    pub fn free(&self) {
        self.request(Cmd {
            op: OP_FREE,
            count: 0,
            len: 0,
            style: 0,
            threads: 0,
            path_len: 0,
            path: [0; 108],
        });
    }

    /// Renames the child (`prctl(PR_SET_NAME)`), e.g. to start being watched late.
    pub fn rename(&self, comm: &str) {
        let mut c = Cmd {
            op: OP_RENAME,
            count: 0,
            len: 0,
            style: 0,
            threads: 0,
            path_len: 0,
            path: [0; 108],
        };
        let n = comm.len().min(15);
        c.path[..n].copy_from_slice(&comm.as_bytes()[..n]);
        self.request(c);
    }

    /// Asks the child to exit and reaps it.
    pub fn quit(mut self) {
        let c = Cmd {
            op: OP_QUIT,
            count: 0,
            len: 0,
            style: 0,
            threads: 0,
            path_len: 0,
            path: [0; 108],
        };
        write_all(self.cmd.as_raw_fd(), as_bytes(&c));
        let mut st = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(self.pid, &raw mut st, 0) };
        self.reaped = true;
    }
}

impl Drop for Sender {
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

struct SendJob {
    cmd: Cmd,
    out: Outcome,
}

extern "C" fn send_thread(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: arg is a &mut SendJob that outlives the thread (joined before use).
    let job = unsafe { &mut *arg.cast::<SendJob>() };
    job.out = send_batch(&job.cmd);
    std::ptr::null_mut()
}

/// Threads of `OP_SEND_STAY`: they send, say so, and block until the process exits.
const STAY_MAX: usize = 8;

struct StayJob {
    cmd: Cmd,
    out: Outcome,
    done: std::sync::atomic::AtomicBool,
}

extern "C" fn stay_thread(arg: *mut libc::c_void) -> *mut libc::c_void {
    let job = arg.cast::<StayJob>();
    // SAFETY: job points into child_loop's `stay`, which outlives the thread's use of it; the
    // command loop reads `out` only after `done` (release/acquire).
    unsafe {
        (*job).out = send_batch(&(*job).cmd);
        (*job)
            .done
            .store(true, std::sync::atomic::Ordering::Release);
    }
    loop {
        // SAFETY: blocks until a signal; the process's exit ends the thread.
        unsafe { libc::pause() };
    }
}

fn send_batch(c: &Cmd) -> Outcome {
    let mut o = Outcome::default();
    // SAFETY: raw socket calls on a descriptor this function creates and closes, with a
    // sockaddr_un built on the stack and buffers that live across each call.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            o.err[6] = u64::from(c.count);
            return o;
        }
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for i in 0..c.path_len as usize {
            sa.sun_path[i] = c.path[i] as libc::c_char;
        }
        let alen = if c.style == 0 {
            2 + c.path_len
        } else {
            size_of::<libc::sockaddr_un>() as u32
        };
        for _ in 0..c.count {
            let r = libc::sendto(
                fd,
                PAYLOAD.as_ptr().cast(),
                c.len as usize,
                libc::MSG_DONTWAIT,
                (&raw const sa).cast(),
                alen,
            );
            if r >= 0 {
                o.ok += 1;
                o.bytes += r as u64;
            } else {
                let errno = *libc::__errno_location();
                o.err[err_index(-i64::from(errno))] += 1;
            }
        }
        libc::close(fd);
    }
    o
}

fn child_loop(cmd_fd: i32, res_fd: i32) {
    let mut mapped: (*mut libc::c_void, usize) = (std::ptr::null_mut(), 0);
    // On the stack, not allocated: the child of a multi-threaded process must not malloc.
    let mut stay: [StayJob; STAY_MAX] = std::array::from_fn(|_| StayJob {
        cmd: Cmd::ZERO,
        out: Outcome::default(),
        done: std::sync::atomic::AtomicBool::new(false),
    });
    let mut stay_used = false;
    loop {
        let mut c = Cmd::ZERO;
        // SAFETY: Cmd is plain integers.
        let buf =
            unsafe { std::slice::from_raw_parts_mut((&raw mut c).cast::<u8>(), size_of::<Cmd>()) };
        if !read_exact(cmd_fd, buf) {
            return;
        }
        let mut out = Outcome::default();
        match c.op {
            OP_SEND if c.threads <= 1 => out = send_batch(&c),
            OP_SEND => {
                // Threads of one process: exercises the per-process atomic counters. pthread
                // directly, sized on the stack: nothing here allocates.
                let mut jobs: [SendJob; 8] = std::array::from_fn(|_| SendJob {
                    cmd: c,
                    out: Outcome::default(),
                });
                let n = (c.threads as usize).min(8);
                let mut tids: [libc::pthread_t; 8] = [0; 8];
                for i in 0..n {
                    // SAFETY: jobs[i] outlives the thread, joined below.
                    unsafe {
                        libc::pthread_create(
                            &raw mut tids[i],
                            std::ptr::null(),
                            send_thread,
                            (&raw mut jobs[i]).cast(),
                        );
                    }
                }
                for (i, job) in jobs.iter().enumerate().take(n) {
                    // SAFETY: joining the threads created above.
                    unsafe { libc::pthread_join(tids[i], std::ptr::null_mut()) };
                    out.add(&job.out);
                }
            }
            OP_SEND_STAY if !stay_used => {
                stay_used = true;
                let n = (c.threads as usize).min(STAY_MAX);
                for job in stay.iter_mut().take(n) {
                    job.cmd = c;
                    let mut tid: libc::pthread_t = 0;
                    // SAFETY: `stay` lives until child_loop returns, right before the process
                    // exits; the thread never touches its job after setting `done`.
                    unsafe {
                        libc::pthread_create(
                            &raw mut tid,
                            std::ptr::null(),
                            stay_thread,
                            std::ptr::from_mut::<StayJob>(job).cast(),
                        );
                    }
                }
                for job in stay.iter().take(n) {
                    while !job.done.load(std::sync::atomic::Ordering::Acquire) {
                        // SAFETY: plain sleep.
                        unsafe { libc::usleep(1000) };
                    }
                    out.add(&job.out);
                }
            }
            OP_ALLOC => {
                let len = c.count as usize * 1024 * 1024;
                // SAFETY: anonymous private mapping, touched page by page.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p != libc::MAP_FAILED {
                        let mut off = 0;
                        while off < len {
                            p.cast::<u8>().add(off).write_volatile(1);
                            off += 4096;
                        }
                        mapped = (p, len);
                    }
                }
            }
            OP_FREE => {
                if !mapped.0.is_null() {
                    // SAFETY: the mapping made by OP_ALLOC.
                    unsafe { libc::munmap(mapped.0, mapped.1) };
                    mapped = (std::ptr::null_mut(), 0);
                }
            }
            OP_RENAME => {
                // SAFETY: c.path is NUL-terminated (at most 15 name bytes were copied).
                unsafe { libc::prctl(libc::PR_SET_NAME, c.path.as_ptr()) };
            }
            _ => return,
        }
        write_all(res_fd, as_bytes(&out));
    }
}

/// Reads every datagram waiting on `sock`; returns (count, bytes).
pub fn drain(sock: &std::os::unix::net::UnixDatagram) -> (u64, u64) {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; PAYLOAD_MAX];
    let (mut n, mut b) = (0, 0);
    while let Ok(len) = sock.recv(&mut buf) {
        n += 1;
        b += len as u64;
    }
    (n, b)
}

/// VmRSS of a process in bytes.
pub fn vm_rss(pid: u32) -> u64 {
    apm_agent::monitor::procfs::vm_rss(pid).unwrap_or(0)
}
