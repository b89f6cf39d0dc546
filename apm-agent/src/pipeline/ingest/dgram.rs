//! Batched datagram receive: one `recvmmsg(2)` reads up to `ingest.recv_batch` datagrams with
//! their `SCM_CREDENTIALS`. Valid payloads are copied once, packed, out of the fixed receive
//! slots into one shared arena per call; every profile is then a `Bytes` slice of that arena and
//! is never copied again on its way to the listener. Invalid datagrams are counted and never
//! leave the slots.

use std::io;
use std::os::fd::RawFd;

use bytes::{Bytes, BytesMut};

use super::validate::validate_profile;
use crate::pipeline::model::Profile;
use crate::telemetry::RejectReason;

/// Largest datagram the receive slots hold. Unix datagrams are capped by the sender's socket
/// buffer (about 208 KiB by default), so bigger profiles use the stream socket anyway.
pub const MAX_DGRAM_SLOT: usize = 256 * 1024;

/// What one receive call produced.
#[derive(Debug, Default)]
pub struct RecvOutcome {
    pub profiles: Vec<Profile>,
    pub rejected: Vec<RejectReason>,
    /// Datagrams read (valid + rejected).
    pub datagrams: usize,
    /// The socket was shut down for reading and its queue is empty.
    pub eof: bool,
}

/// Preallocated buffers for `recvmmsg`. The iovec and header pointers are rebuilt on each call,
/// so the struct can move freely.
pub struct DgramReceiver {
    slot: usize,
    batch: usize,
    max_payload: usize,
    slots: Vec<u8>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Control buffers, `cmsg_words` headers' worth per slot. Typed as `cmsghdr` so each slot
    /// starts aligned for one: `CMSG_FIRSTHDR` hands back a pointer into it that is read as a
    /// `cmsghdr`, and a `Vec<u8>` only promises byte alignment.
    cmsgs: Vec<libc::cmsghdr>,
    cmsg_words: usize,
}

// SAFETY: the raw pointers inside `iovs`/`hdrs` only ever point into this struct's own buffers
// and are rewritten before each use.
unsafe impl Send for DgramReceiver {}

impl DgramReceiver {
    pub fn new(batch: usize, max_payload: usize) -> Self {
        // One byte more than the largest accepted payload, so an oversize datagram is detected
        // by MSG_TRUNC rather than silently cut.
        let slot = max_payload.min(MAX_DGRAM_SLOT) + 1;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let cmsg_space = unsafe { libc::CMSG_SPACE(size_of::<libc::ucred>() as u32) } as usize;
        let cmsg_words = cmsg_space.div_ceil(size_of::<libc::cmsghdr>());
        Self {
            slot,
            batch,
            max_payload,
            slots: vec![0; slot * batch],
            // SAFETY: iovec, mmsghdr and cmsghdr are plain C structs (integers and pointers)
            // for which all-zero is a valid value.
            iovs: vec![unsafe { std::mem::zeroed() }; batch],
            // SAFETY: as above.
            hdrs: vec![unsafe { std::mem::zeroed() }; batch],
            // SAFETY: as above.
            cmsgs: vec![unsafe { std::mem::zeroed() }; cmsg_words * batch],
            cmsg_words,
        }
    }

    /// Reads what is queued (up to `batch` datagrams) without blocking. `WouldBlock` when the
    /// queue is empty. `shut`: reading was shut down (`SHUT_RD`), so an empty queue reads as
    /// end of input.
    pub fn recv(&mut self, fd: RawFd, now_ns: u64, shut: bool) -> io::Result<RecvOutcome> {
        for i in 0..self.batch {
            self.iovs[i] = libc::iovec {
                iov_base: self.slots[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
            h.msg_iov = &raw mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i * self.cmsg_words..].as_mut_ptr().cast();
            h.msg_controllen = (self.cmsg_words * size_of::<libc::cmsghdr>()) as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: `hdrs` holds `batch` headers, each pointing at live buffers of this struct
        // (a slot of `self.slot` bytes, one iovec, an aligned control buffer of the length
        // given), which nothing else borrows during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.batch as u32,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut out = RecvOutcome::default();
        let mut valid: Vec<(usize, usize, u32, u32)> = Vec::with_capacity(n);
        let mut total = 0usize;
        for i in 0..n {
            let len = self.hdrs[i].msg_len as usize;
            let flags = self.hdrs[i].msg_hdr.msg_flags;
            let cred = read_cred(&self.hdrs[i].msg_hdr);
            if shut && len == 0 && cred.is_none() {
                // After shutdown(SHUT_RD) an empty queue reads as zero-length "datagrams"
                // without credentials: that is end of input. Before it, a zero-length datagram
                // is a sender's (queued before SO_PASSCRED if it has no credentials): rejected
                // as empty below, never taken for the end.
                out.eof = true;
                break;
            }
            out.datagrams += 1;
            if flags & libc::MSG_TRUNC != 0 || len > self.max_payload {
                out.rejected.push(RejectReason::Oversize);
                continue;
            }
            let start = i * self.slot;
            match validate_profile(&self.slots[start..start + len], self.max_payload) {
                Ok(()) => {
                    let (pid, uid) = cred.unwrap_or((UNKNOWN_ID, UNKNOWN_ID));
                    valid.push((start, len, pid, uid));
                    total += len;
                }
                Err(r) => out.rejected.push(r),
            }
        }
        if !valid.is_empty() {
            let mut arena = BytesMut::with_capacity(total);
            for &(start, len, _, _) in &valid {
                arena.extend_from_slice(&self.slots[start..start + len]);
            }
            let arena: Bytes = arena.freeze();
            let mut off = 0;
            out.profiles.reserve(valid.len());
            for (_, len, pid, uid) in valid {
                out.profiles.push(Profile {
                    payload: arena.slice(off..off + len),
                    received_ns: now_ns,
                    pid,
                    uid,
                    rss_bytes: 0,
                });
                off += len;
            }
        }
        Ok(out)
    }
}

/// The pid and uid of a profile whose sender the kernel did not name (no credentials): not 0,
/// which is root.
pub const UNKNOWN_ID: u32 = u32::MAX;

/// The sender's (pid, uid) from an SCM_CREDENTIALS control message.
fn read_cred(h: &libc::msghdr) -> Option<(u32, u32)> {
    // SAFETY: `h` is a header that recvmmsg just filled: msg_control points at a live control
    // buffer aligned for `cmsghdr` (see `DgramReceiver::cmsgs`) whose first msg_controllen
    // bytes the kernel wrote; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen and return null
    // past it, and the ucred payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                // A datagram queued before SO_PASSCRED was on reads as pid 0 with the overflow
                // uid: the kernel did not record its sender.
                return (cred.pid > 0).then_some((cred.pid as u32, cred.uid));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    fn pair() -> (
        tempfile::TempDir,
        UnixDatagram,
        UnixDatagram,
        std::path::PathBuf,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.sock");
        let r = UnixDatagram::bind(&p).unwrap();
        nix::sys::socket::setsockopt(&r, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        let s = UnixDatagram::unbound().unwrap();
        (dir, r, s, p)
    }

    #[test]
    fn reads_batches_with_credentials_and_rejects() {
        let (_d, r, s, p) = pair();
        s.send_to(br#"{"id":1}"#, &p).unwrap();
        s.send_to(b"[1]", &p).unwrap();
        s.send_to(b"", &p).unwrap();
        s.send_to(br#"{"id":2}"#, &p).unwrap();
        s.send_to(&vec![b' '; 300], &p).unwrap();
        let mut rx = DgramReceiver::new(8, 200);
        let out = rx.recv(r.as_raw_fd(), 5, false).unwrap();
        assert_eq!(out.datagrams, 5);
        assert_eq!(out.profiles.len(), 2);
        assert_eq!(&out.profiles[0].payload[..], br#"{"id":1}"#);
        assert_eq!(&out.profiles[1].payload[..], br#"{"id":2}"#);
        assert_eq!(out.profiles[0].pid, std::process::id());
        assert_eq!(out.profiles[0].uid, nix::unistd::getuid().as_raw());
        assert_eq!(
            out.rejected,
            vec![
                RejectReason::NotObject,
                RejectReason::Empty,
                RejectReason::Oversize
            ]
        );
        let e = rx.recv(r.as_raw_fd(), 5, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    /// Issue (security) 10: the control buffers must be aligned for `cmsghdr`, which
    /// `CMSG_FIRSTHDR` dereferences. (A `Vec<u8>` happened to be aligned by glibc's malloc, so
    /// this could not fail before the fix on this machine; it holds by type now.)
    #[test]
    fn control_buffers_are_aligned_for_cmsghdr() {
        let mut rx = DgramReceiver::new(5, 100);
        let (_d, r, s, p) = pair();
        s.send_to(br#"{"a":1}"#, &p).unwrap();
        rx.recv(r.as_raw_fd(), 0, false).unwrap();
        for h in &rx.hdrs {
            assert_eq!(
                h.msg_hdr.msg_control as usize % align_of::<libc::cmsghdr>(),
                0
            );
            assert!(h.msg_hdr.msg_controllen >= cmsg_space());
        }
    }

    fn cmsg_space() -> usize {
        // SAFETY: CMSG_SPACE is a pure size computation.
        unsafe { libc::CMSG_SPACE(size_of::<libc::ucred>() as u32) as usize }
    }

    /// Issue 15.6: a datagram queued before `SO_PASSCRED` was on carries no credentials. An
    /// empty one used to read as end of input, which stopped datagram ingest for good; and a
    /// profile without credentials was stamped uid 0 (root).
    #[test]
    fn an_empty_datagram_without_credentials_is_not_end_of_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.sock");
        let r = UnixDatagram::bind(&p).unwrap();
        let s = UnixDatagram::unbound().unwrap();
        s.send_to(b"", &p).unwrap();
        s.send_to(br#"{"id":"before"}"#, &p).unwrap();
        nix::sys::socket::setsockopt(&r, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        s.send_to(br#"{"id":"after"}"#, &p).unwrap();
        let mut rx = DgramReceiver::new(8, 1024);
        let out = rx.recv(r.as_raw_fd(), 0, false).unwrap();
        assert!(!out.eof, "an empty datagram is not end of input");
        assert_eq!(out.rejected, vec![RejectReason::Empty]);
        assert_eq!(out.profiles.len(), 2);
        assert_eq!(
            (out.profiles[0].pid, out.profiles[0].uid),
            (UNKNOWN_ID, UNKNOWN_ID),
            "no credentials: unknown, not root"
        );
        assert_eq!(out.profiles[1].uid, nix::unistd::getuid().as_raw());
    }

    #[test]
    fn shutdown_read_drains_then_reports_eof() {
        let (_d, r, s, p) = pair();
        for i in 0..3 {
            s.send_to(format!("{{\"i\":{i}}}").as_bytes(), &p).unwrap();
        }
        nix::sys::socket::shutdown(r.as_raw_fd(), nix::sys::socket::Shutdown::Read).unwrap();
        // Senders are refused once reading is shut down.
        assert!(s.send_to(b"{}", &p).is_err());
        let mut rx = DgramReceiver::new(2, 1024);
        let a = rx.recv(r.as_raw_fd(), 0, true).unwrap();
        assert_eq!((a.profiles.len(), a.eof), (2, false));
        let b = rx.recv(r.as_raw_fd(), 0, true).unwrap();
        assert_eq!(b.profiles.len(), 1);
        // The drained queue then reads as end of input (or would-block), never as more data.
        if !b.eof {
            match rx.recv(r.as_raw_fd(), 0, true) {
                Ok(c) => assert!(c.eof && c.profiles.is_empty() && c.datagrams == 0),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
    }
}
