//! Privileged: fds and processes that change under the programs. A PHP worker's child that
//! execs something else stops being a worker; an fd that `dup2` or an exec (close-on-exec)
//! took away from an agent socket is not counted as one. Runs as root (CI); fails in CI when
//! eBPF cannot load, skips with a reason elsewhere.
//!
//! The children are forked from the (multi-threaded) test process and make only raw syscalls
//! before they exec or `_exit`; everything they need is prepared before the fork.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use apm_agent::monitor::EbpfStatus;
use apm_tests::ebpf::{TestMonitor, drain};

const WAIT: Duration = Duration::from_secs(10);
/// The fd number the children put their agent socket on.
const FD: i32 = 7;

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    assert!(p.len() < sa.sun_path.len());
    for (d, s) in sa.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    (sa, (2 + p.len()) as libc::socklen_t)
}

/// Forks a child named `php-fpm8.2` that connects a datagram socket (close-on-exec, on fd
/// `FD`) to `path`, writes one byte through it, then runs `then`. Returns the child's pid.
fn php_child(path: &Path, then: impl FnOnce() -> i32) -> i32 {
    let (sa, len) = sockaddr(path);
    let name = c"php-fpm8.2";
    // SAFETY: the child makes raw syscalls only, then execs or _exits (see the module docs).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid != 0 {
        return pid;
    }
    // SAFETY: raw syscalls on values prepared before the fork (the whole child).
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 || libc::dup3(s, FD, libc::O_CLOEXEC) != FD {
            libc::_exit(10);
        }
        libc::close(s);
        if libc::connect(FD, (&raw const sa).cast(), len) != 0 {
            libc::_exit(11);
        }
        if libc::write(FD, b"a".as_ptr().cast(), 1) != 1 {
            libc::_exit(12);
        }
        libc::_exit(then());
    }
}

fn wait_exit(pid: i32) -> i32 {
    let mut st = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &raw mut st, 0) }, pid);
    assert!(libc::WIFEXITED(st), "child {pid} did not exit: {st:#x}");
    libc::WEXITSTATUS(st)
}

/// The status two polls after `m`'s current one: everything the kernel counted so far is in.
fn settled(m: &TestMonitor) -> EbpfStatus {
    let p = m.status().polls;
    m.wait_for(WAIT, "two more polls", |s| s.polls >= p + 2)
}

fn execv(path: &CString, args: &[CString]) -> i32 {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and argv, prepared before the fork.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    20
}

#[test]
fn ebpf_a_worker_child_that_execs_something_else_stops_being_a_worker() {
    let Some(m) = TestMonitor::start(
        "ebpf_a_worker_child_that_execs_something_else_stops_being_a_worker",
        |_| {},
    ) else {
        return;
    };
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let sh = c"/bin/sh".to_owned();
    // Not close-on-exec this time: the shell's write reaches the agent socket for real.
    let args = [
        c"sh".to_owned(),
        c"-c".to_owned(),
        CString::new(format!("echo x >&{FD}; sleep 2")).unwrap(),
    ];
    let pid = php_child(&m.dgram, || {
        // SAFETY: clears FD_CLOEXEC on our own fd.
        unsafe { libc::fcntl(FD, libc::F_SETFD, 0) };
        execv(&sh, &args)
    });
    let pid_u = pid as u32;
    // The worker's send, counted, and the process retired at its exec with it.
    m.wait_for(WAIT, "the exec'd child retired", |s| {
        s.recent_exits.iter().any(|e| e.pid == pid_u)
    });
    let s = settled(&m);
    let mut st = 0;
    // SAFETY: our own child; WNOHANG only looks.
    let running = unsafe { libc::waitpid(pid, &raw mut st, libc::WNOHANG) } == 0;
    assert!(running, "retired at the exec, while the shell still runs");
    assert!(
        s.workers.iter().all(|w| w.pid != pid_u),
        "still listed as a worker after exec: {:?}",
        s.workers
    );
    let e = s.recent_exits.iter().find(|e| e.pid == pid_u).unwrap();
    assert_eq!(e.sends_ok, 1, "{e:?}");
    assert_eq!(wait_exit(pid), 0);
    assert_eq!(
        drain(&rx).0,
        2,
        "the worker's byte and the shell's line arrived"
    );
    let s = settled(&m);
    assert_eq!(
        s.dgram.ok, 1,
        "the shell is not PHP: its write is not counted"
    );
    assert!(s.workers.iter().all(|w| w.pid != pid_u));
}

#[test]
fn ebpf_dup2_over_a_connected_socket_forgets_it() {
    let Some(m) = TestMonitor::start("ebpf_dup2_over_a_connected_socket_forgets_it", |_| {}) else {
        return;
    };
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let pid = php_child(&m.dgram, || {
        let mut p = [0; 2];
        // SAFETY: raw syscalls on our own fds.
        unsafe {
            if libc::pipe(p.as_mut_ptr()) != 0 || libc::dup2(p[1], FD) != FD {
                return 30;
            }
            // Into the pipe now, not to the agent.
            if libc::write(FD, b"x".as_ptr().cast(), 1) != 1 {
                return 31;
            }
        }
        0
    });
    assert_eq!(wait_exit(pid), 0);
    assert_eq!(drain(&rx).0, 1);
    let s = settled(&m);
    assert_eq!(
        s.dgram.ok, 1,
        "the write into the pipe is not an agent send"
    );
    assert_eq!(s.dgram.failed.total(), 0);
}

#[test]
fn ebpf_exec_forgets_close_on_exec_agent_sockets() {
    let Some(m) = TestMonitor::start("ebpf_exec_forgets_close_on_exec_agent_sockets", |_| {})
    else {
        return;
    };
    // A program with a PHP name (comm is the basename exec was given): still watched after the
    // exec, and its fd FD is a new file, /dev/null, opened without dup2.
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    let Some(py) = py else {
        assert!(!apm_testkit::in_ci(), "python3 is needed in CI");
        eprintln!("SKIPPED: no python3");
        return;
    };
    let link = m.dir.path().join("php-fpm-py");
    std::os::unix::fs::symlink(py, &link).unwrap();
    let prog = CString::new(link.as_os_str().as_bytes()).unwrap();
    let script = format!(
        "import os\n\
         while True:\n\
         \x20   fd = os.open('/dev/null', os.O_WRONLY)\n\
         \x20   if fd >= {FD}: break\n\
         assert fd == {FD}, fd\n\
         assert os.write({FD}, b'x') == 1\n"
    );
    let args = [
        c"php-fpm-py".to_owned(),
        c"-c".to_owned(),
        CString::new(script).unwrap(),
    ];
    let rx = UnixDatagram::bind(&m.dgram).unwrap();
    let pid = php_child(&m.dgram, || execv(&prog, &args));
    assert_eq!(wait_exit(pid), 0, "the exec'd program failed");
    assert_eq!(drain(&rx).0, 1);
    let s = settled(&m);
    if before_btf_task_reads(&s.kernel) {
        // Expected limit (docs/ebpf.md, "Fds that change under the programs"): before 5.11 a
        // tracepoint program may not call `bpf_get_current_task_btf`, so there is no exec id
        // to tell the entry is stale, and the exec'd PHP program's write on the reused fd
        // number counts as a send.
        assert_eq!(s.comm_source, "helper", "kernel {}", s.kernel);
        assert_eq!(
            s.dgram.ok, 2,
            "kernel {}: without the exec check the write to /dev/null counts",
            s.kernel
        );
        return;
    }
    assert_eq!(
        s.dgram.ok, 1,
        "the write to /dev/null on the reused fd is not an agent send"
    );
}

/// Whether a kernel release (`uname -r`, e.g. `5.10.0-32-amd64`) is older than 5.11, the first
/// to let tracepoint programs call `bpf_get_current_task_btf` (the BTF task reads the comm
/// and the exec id come from).
fn before_btf_task_reads(release: &str) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) < (5, 11)
}

/// A PHP-named process in its own mount namespace, with a private tmpfs over the agent's
/// socket folder and its own socket at the agent's path. Sends it makes there cannot be told
/// from sends to the agent on tracepoints (the path is all the programs see), so the agent
/// lists such processes in `ebpf.foreign_sockets` (and warns); processes whose namespace
/// shows the agent's own socket (systemd's PrivateTmp and the like) are not listed.
#[test]
fn ebpf_a_socket_at_the_same_path_in_another_mount_namespace_is_reported() {
    let Some(m) = TestMonitor::start(
        "ebpf_a_socket_at_the_same_path_in_another_mount_namespace_is_reported",
        |_| {},
    ) else {
        return;
    };
    let _rx = UnixDatagram::bind(&m.dgram).unwrap();
    let (sa, len) = sockaddr(&m.dgram);
    let dir = CString::new(m.dir.path().as_os_str().as_bytes()).unwrap();
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    let (hold_r, hold_w) = nix::unistd::pipe().unwrap();
    let (rr, rw, hr, hw) = (
        ready_r.as_raw_fd(),
        ready_w.as_raw_fd(),
        hold_r.as_raw_fd(),
        hold_w.as_raw_fd(),
    );
    // A PHP-named process in a mount namespace of its own that still shows the agent's socket
    // (as systemd's PrivateTmp does): not foreign.
    let same = php_child(&m.dgram, move || {
        let mut b = [0u8; 1];
        // SAFETY: raw syscalls; our own copies of the pipes: blocks until the test drops its
        // write end.
        unsafe {
            libc::close(hw);
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return 50;
            }
            libc::write(rw, b"r".as_ptr().cast(), 1);
            libc::read(hr, b.as_mut_ptr().cast(), 1);
        }
        0
    });
    // SAFETY: the child makes raw syscalls only (see the module docs).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw syscalls on values prepared before the fork (the whole child).
        unsafe {
            libc::close(rr);
            libc::close(hw);
            libc::prctl(libc::PR_SET_NAME, c"php-fpm8.2".as_ptr());
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
            {
                libc::_exit(40);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0);
            if s < 0 || libc::bind(s, (&raw const sa).cast(), len) != 0 {
                libc::_exit(41);
            }
            libc::write(rw, b"r".as_ptr().cast(), 1);
            let mut b = [0u8; 1];
            libc::read(hr, b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(hold_r);
    for _ in 0..2 {
        let mut b = [0u8; 1];
        // SAFETY: our own pipe.
        let n = unsafe { libc::read(ready_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 1, "a namespaced child failed to set up");
    }
    let v = m.wait_for(WAIT, "the foreign socket in status", |s| {
        serde_json::to_value(s).unwrap()["foreign_sockets"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    let v = serde_json::to_value(&v).unwrap();
    let listed: Vec<(u64, String)> = v["foreign_sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["pid"].as_u64().unwrap(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(pid as u64, m.dgram.display().to_string())],
        "only the namespaced process, not {same}"
    );
    drop(hold_w);
    assert_eq!(wait_exit(pid), 0);
    assert_eq!(wait_exit(same), 0);
}
