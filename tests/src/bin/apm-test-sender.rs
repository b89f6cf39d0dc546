//! A PHP-like test sender: sends JSON profiles with unique ids to a Unix datagram socket with
//! `sendto(2)` (what PHP's socket_sendto does; std's `send` would be write(2)), and prints what
//! it observed itself as JSON: `{"sent": n, "eagain": n, "errors": {"<errno>": n}}`.
//!
//! apm-test-sender --socket PATH --count N --prefix ID [--size BYTES] [--nonblocking]
//!                 [--comm NAME] [--stream] [--invalid-every K] [--rate PER_SECOND]
//! apm-test-sender --socket PATH --stall N [--stall-declare LEN]
//!
//! `--stall` is a slow client: it opens N stream connections and writes one byte on each (with
//! `--stall-declare`, every second one gets a whole header declaring LEN bytes and one byte of
//! body instead), prints `{"ready": N}`, waits for a line on stdin, then prints
//! `{"opened": N, "closed_by_peer": k, "uid": u}`: how many of them the agent had closed.

use std::collections::BTreeMap;
use std::io::Write;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = arg(&args, "--socket").expect("--socket PATH");
    if let Some(n) = arg(&args, "--stall") {
        let declare: u32 = arg(&args, "--stall-declare").map_or(0, |v| v.parse().expect("len"));
        stall(&socket, n.parse().expect("--stall N"), declare);
        return;
    }
    let count: u64 = arg(&args, "--count").map_or(1000, |v| v.parse().expect("--count"));
    let prefix = arg(&args, "--prefix").unwrap_or_else(|| format!("p{}", std::process::id()));
    let size: usize = arg(&args, "--size").map_or(200, |v| v.parse().expect("--size"));
    let invalid_every: u64 =
        arg(&args, "--invalid-every").map_or(0, |v| v.parse().expect("--invalid-every"));
    let nonblocking = args.iter().any(|a| a == "--nonblocking");
    // Sends per second (0: as fast as possible).
    let rate: u64 = arg(&args, "--rate").map_or(0, |v| v.parse().expect("--rate"));
    let started = std::time::Instant::now();
    let pace = |i: u64| {
        if rate > 0 {
            let due = std::time::Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(d);
            }
        }
    };
    let stream = args.iter().any(|a| a == "--stream");
    if let Some(comm) = arg(&args, "--comm") {
        let c = std::ffi::CString::new(comm).expect("comm");
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    }
    let mut sent = 0u64;
    let mut eagain = 0u64;
    let mut invalid_sent = 0u64;
    let mut errors: BTreeMap<i32, u64> = BTreeMap::new();
    if stream {
        let mut s =
            std::os::unix::net::UnixStream::connect(&socket).expect("connect stream socket");
        for i in 0..count {
            pace(i);
            let body = profile(&prefix, i, size);
            s.write_all(&(body.len() as u32).to_be_bytes())
                .expect("write");
            s.write_all(&body).expect("write");
            sent += 1;
        }
    } else {
        // SAFETY: socket(2) takes integers only.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket");
        // The address length below must not pass the struct the kernel copies it from.
        assert!(socket.len() < 108, "socket path too long for sockaddr_un");
        // SAFETY: sockaddr_un is a plain C struct for which all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as u16;
        for (d, s) in addr.sun_path.iter_mut().zip(socket.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // PHP passes addrlen = 2 + strlen(path), no NUL.
        let alen = (2 + socket.len()) as libc::socklen_t;
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        for i in 0..count {
            pace(i);
            let invalid = invalid_every > 0 && i % invalid_every == invalid_every - 1;
            let body = if invalid {
                b"{\"torn\":".to_vec()
            } else {
                profile(&prefix, i, size)
            };
            // SAFETY: `body` and `addr` outlive the call and the lengths given are theirs
            // (`alen` <= size_of::<sockaddr_un>(): the path fits sun_path, asserted above).
            let r = unsafe {
                libc::sendto(
                    fd,
                    body.as_ptr().cast(),
                    body.len(),
                    flags,
                    (&raw const addr).cast(),
                    alen,
                )
            };
            if r >= 0 {
                if invalid {
                    invalid_sent += 1;
                } else {
                    sent += 1;
                }
            } else {
                let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if e == libc::EAGAIN {
                    eagain += 1;
                } else {
                    *errors.entry(e).or_default() += 1;
                }
            }
        }
        // SAFETY: `fd` is the socket created above, closed once.
        unsafe { libc::close(fd) };
    }
    let errors: serde_json::Map<String, serde_json::Value> = errors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    println!(
        "{}",
        serde_json::json!({"sent": sent, "eagain": eagain, "invalid_sent": invalid_sent, "errors": errors, "pid": std::process::id()})
    );
}

fn profile(prefix: &str, i: u64, size: usize) -> Vec<u8> {
    let mut v =
        format!(r#"{{"id":"{prefix}-{i}","uri":"/t/{i}","status":200,"pad":""#).into_bytes();
    let pad = size.saturating_sub(v.len() + 2);
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(b"\"}");
    v
}

/// Holds `n` connections each stuck in the middle of a frame (see the module doc).
fn stall(socket: &str, n: usize, declare: u32) {
    use std::io::{BufRead, Read};
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect stream socket");
        // The agent may already have closed it (a refused connection): EPIPE is expected then.
        let _ = if declare > 0 && i % 2 == 1 {
            let mut b = declare.to_be_bytes().to_vec();
            b.push(b'{');
            s.write_all(&b)
        } else {
            s.write_all(&[0])
        };
        conns.push(s);
    }
    println!("{}", serde_json::json!({"ready": n}));
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let closed = conns
        .iter_mut()
        .filter(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            let mut b = [0u8; 1];
            match (&**s).read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count();
    // The test may be gone already (it failed): no panic over a closed stdout.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::json!({"opened": n, "closed_by_peer": closed, "uid": nix::unistd::getuid().as_raw()})
    );
}
