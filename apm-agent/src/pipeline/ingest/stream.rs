//! The stream socket: frames of a 4-byte big-endian length followed by that many bytes of JSON.
//! Frames are cut out of the connection's read buffer as `Bytes` (no copy). A frame longer than
//! `ingest.max_payload_bytes` or a connection that ends mid-frame is rejected and closes that
//! connection only; an empty or invalid frame is rejected and the connection goes on.

use crate::events::ProfileRejected;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::validate::validate_profile;
use super::{ProfileSink, RssLookup};
use crate::pipeline::model::Profile;
use crate::telemetry::{RejectReason, Socket, SocketLabels, Telemetry, now_ns};

/// What the frame parser found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A whole frame's payload.
    Payload(bytes::Bytes),
    /// A zero-length frame (skipped, counted).
    Empty,
    /// Declared length over the limit: the connection cannot be resynchronised.
    Oversize(usize),
    /// Need more bytes.
    Incomplete,
}

/// Takes the next frame out of `buf`, if a whole one is there.
pub fn next_frame(buf: &mut BytesMut, max_payload: usize) -> Frame {
    if buf.len() < 4 {
        return Frame::Incomplete;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_payload {
        return Frame::Oversize(len);
    }
    if len == 0 {
        buf.advance(4);
        return Frame::Empty;
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Frame::Incomplete;
    }
    buf.advance(4);
    Frame::Payload(buf.split_to(len).freeze())
}

pub(super) struct Conn {
    pub stream: UnixStream,
    pub max_payload: usize,
    pub idle: Duration,
    pub telemetry: std::sync::Arc<Telemetry>,
    pub rss: Option<RssLookup>,
}

impl Conn {
    /// Serves one connection until EOF, an unrecoverable frame, idle timeout, or shutdown (which
    /// shuts the read side and drains what the kernel already holds).
    pub async fn serve(mut self, out: ProfileSink, shutdown: CancellationToken) {
        let (pid, uid) = self
            .stream
            .peer_cred()
            .ok()
            .and_then(|c| Some((u32::try_from(c.pid()?).ok()?, c.uid())))
            .unwrap_or((super::dgram::UNKNOWN_ID, super::dgram::UNKNOWN_ID));
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut shutting_down = false;
        loop {
            let mut batch: Vec<Profile> = Vec::new();
            let now = now_ns();
            loop {
                match next_frame(&mut buf, self.max_payload) {
                    Frame::Payload(payload) => match validate_profile(&payload, self.max_payload) {
                        Ok(()) => batch.push(Profile {
                            rss_bytes: self.rss.as_ref().map_or(0, |f| f(pid)),
                            payload,
                            received_ns: now,
                            pid,
                            uid,
                        }),
                        Err(reason) => ProfileRejected {
                            reason,
                            pid: Some(pid),
                        }
                        .emit(&self.telemetry),
                    },
                    Frame::Empty => ProfileRejected {
                        reason: RejectReason::Empty,
                        pid: Some(pid),
                    }
                    .emit(&self.telemetry),
                    Frame::Oversize(len) => {
                        ProfileRejected {
                            reason: RejectReason::Oversize,
                            pid: Some(pid),
                        }
                        .emit(&self.telemetry);
                        tracing::warn!(
                            pid,
                            len,
                            max = self.max_payload,
                            "stream frame over max_payload_bytes: closing connection"
                        );
                        let _ = send(&out, batch, &self.telemetry).await;
                        return;
                    }
                    Frame::Incomplete => break,
                }
            }
            if !batch.is_empty() && send(&out, batch, &self.telemetry).await.is_err() {
                return;
            }
            let read = if shutting_down {
                self.stream.read_buf(&mut buf).await
            } else {
                tokio::select! {
                    r = tokio::time::timeout(self.idle, self.stream.read_buf(&mut buf)) => if let Ok(r) = r { r } else {
                        tracing::debug!(pid, "stream connection idle: closing");
                        if !buf.is_empty() { ProfileRejected { reason: RejectReason::TornFrame, pid: Some(pid) }.emit(&self.telemetry); }
                        return;
                    },
                    () = shutdown.cancelled() => {
                        // Refuse new bytes, then read what the kernel already accepted.
                        shutting_down = true;
                        let _ = nix::sys::socket::shutdown(
                            std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                            nix::sys::socket::Shutdown::Read,
                        );
                        continue;
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => {
                    if !buf.is_empty() {
                        ProfileRejected {
                            reason: RejectReason::TornFrame,
                            pid: Some(pid),
                        }
                        .emit(&self.telemetry);
                    }
                    return;
                }
                Ok(_) => {}
            }
        }
    }
}

async fn send(
    out: &ProfileSink,
    batch: Vec<Profile>,
    telemetry: &Telemetry,
) -> Result<(), super::queue::Closed> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len() as u64;
    let bytes: u64 = batch.iter().map(|p| p.payload.len() as u64).sum();
    out.send(batch).await?;
    telemetry
        .received
        .get_or_create(&SocketLabels {
            socket: Socket::Stream,
        })
        .inc_by(n);
    telemetry.received_bytes.inc_by(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(parts: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in parts {
            b.extend_from_slice(&(p.len() as u32).to_be_bytes());
            b.extend_from_slice(p);
        }
        b
    }

    #[test]
    fn parses_frames_and_waits_for_more() {
        let mut b = framed(&[b"{\"a\":1}", b"", b"{}"]);
        assert_eq!(
            next_frame(&mut b, 100),
            Frame::Payload(bytes::Bytes::from_static(b"{\"a\":1}"))
        );
        assert_eq!(next_frame(&mut b, 100), Frame::Empty);
        assert_eq!(
            next_frame(&mut b, 100),
            Frame::Payload(bytes::Bytes::from_static(b"{}"))
        );
        assert_eq!(next_frame(&mut b, 100), Frame::Incomplete);
        let mut half = framed(&[b"{\"abc\":1}"]);
        half.truncate(7);
        assert_eq!(next_frame(&mut half, 100), Frame::Incomplete);
        assert_eq!(half.len(), 7, "an incomplete frame is left in place");
    }

    #[test]
    fn oversize_frame_is_detected_from_the_header() {
        let mut b = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        assert_eq!(next_frame(&mut b, 1000), Frame::Oversize(1_000_000));
    }
}
