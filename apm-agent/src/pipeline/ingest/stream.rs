//! The stream socket: frames of a 4-byte big-endian length followed by that many bytes of JSON.
//! Frames are cut out of the connection's read buffer as `Bytes` (no copy). A frame longer than
//! `ingest.max_payload_bytes` or a connection that ends mid-frame is rejected and closes that
//! connection only; an empty or invalid frame is rejected and the connection goes on.
//!
//! Slow or greedy clients cannot hold the socket: a frame must complete within
//! `ingest.stream_frame_timeout` of its first byte, a frame larger than [`BASE_BUFFER`] must
//! first reserve its declared length in the budget all connections share
//! (`ingest.stream_buffer_bytes`), and `run_stream` caps connections per peer uid. Each
//! connection closed for one of these is counted by reason ([`ConnRefusal`]).

use crate::events::{ConnectionRefused, ProfileRejected};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::validate::validate_profile;
use super::{ProfileSink, RssLookup};
use crate::pipeline::model::Profile;
use crate::telemetry::{ConnRefusal, RejectReason, Socket, SocketLabels, Telemetry, now_ns};

/// Read buffer every connection has outside the shared budget (bounded by
/// `ingest.max_stream_connections` in all). A frame that fits needs no reservation, so the
/// usual profile never waits for the budget.
pub const BASE_BUFFER: usize = 8 * 1024;

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

/// Takes the next frame out of `buf`, if a whole one is there. It never grows `buf`: the
/// caller decides whether the rest of the frame may be buffered ([`frame_len`]).
pub fn next_frame(buf: &mut BytesMut, max_payload: usize) -> Frame {
    let Some(len) = frame_len(buf) else {
        return Frame::Incomplete;
    };
    if len > max_payload {
        return Frame::Oversize(len);
    }
    if len == 0 {
        buf.advance(4);
        return Frame::Empty;
    }
    if buf.len() < 4 + len {
        return Frame::Incomplete;
    }
    buf.advance(4);
    Frame::Payload(buf.split_to(len).freeze())
}

/// The declared payload length of the frame at the head of `buf`, once its header is in.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let h: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(h) as usize)
}

pub(super) struct Conn {
    pub stream: UnixStream,
    pub pid: u32,
    pub uid: u32,
    pub max_payload: usize,
    pub idle: Duration,
    pub frame_timeout: Duration,
    /// The bytes all incomplete frames larger than [`BASE_BUFFER`] share.
    pub budget: Arc<Semaphore>,
    pub telemetry: Arc<Telemetry>,
    pub rss: Option<RssLookup>,
}

/// Why serving a connection stopped early.
enum Cut {
    /// Closed by the agent, counted as this.
    Refused(ConnRefusal),
    /// Ended for a reason already counted (or none: the batcher is gone).
    Done,
}

impl Conn {
    /// Serves one connection until EOF, an unrecoverable frame, a timeout, or shutdown (which
    /// shuts the read side and drains what the kernel already holds).
    pub async fn serve(mut self, out: ProfileSink, shutdown: CancellationToken) {
        if let Err(Cut::Refused(reason)) = self.frames(&out, &shutdown).await {
            tracing::debug!(
                pid = self.pid,
                uid = self.uid,
                reason = reason.as_str(),
                "closing stream connection"
            );
            ConnectionRefused {
                reason,
                pid: Some(self.pid),
                uid: Some(self.uid),
            }
            .emit(&self.telemetry);
        }
    }

    async fn frames(&mut self, out: &ProfileSink, shutdown: &CancellationToken) -> Result<(), Cut> {
        let mut buf = BytesMut::with_capacity(BASE_BUFFER);
        let mut shutting_down = false;
        // Budget held for the incomplete frame at the head of `buf`, and when that frame must
        // be complete.
        let mut reserved: Option<OwnedSemaphorePermit> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            let (batch, completed) = self.parse(&mut buf, out).await?;
            if completed {
                reserved = None;
                deadline = None;
            }
            if !batch.is_empty() {
                let waited = Instant::now();
                send(out, batch, &self.telemetry)
                    .await
                    .map_err(|_| Cut::Done)?;
                // The agent not reading is not the client's delay.
                if let Some(d) = deadline.as_mut() {
                    *d += waited.elapsed();
                }
            }
            if buf.is_empty() {
                deadline = None;
            } else if deadline.is_none() {
                deadline = Some(Instant::now() + self.frame_timeout);
            }
            if reserved.is_none()
                && let Some(len) = frame_len(&buf)
            {
                let want = 4 + len;
                if want > BASE_BUFFER {
                    let waited = Instant::now();
                    reserved = Some(self.reserve(want).await?);
                    if let Some(d) = deadline.as_mut() {
                        *d += waited.elapsed();
                    }
                }
                buf.reserve(want.saturating_sub(buf.len()));
            }
            let read = if shutting_down {
                self.stream.read_buf(&mut buf).await
            } else {
                let timer = deadline.unwrap_or_else(|| Instant::now() + self.idle);
                tokio::select! {
                    r = self.stream.read_buf(&mut buf) => r,
                    () = tokio::time::sleep_until(timer) => {
                        if deadline.is_some() {
                            return Err(Cut::Refused(ConnRefusal::FrameTimeout));
                        }
                        tracing::debug!(pid = self.pid, "stream connection idle: closing");
                        return Ok(());
                    }
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
                        self.reject(RejectReason::TornFrame);
                    }
                    return Ok(());
                }
                Ok(_) => {}
            }
        }
    }

    /// Takes every whole frame out of `buf`: the valid profiles, and whether any frame ended.
    /// An oversize header forwards what came before it and ends the connection.
    async fn parse(
        &self,
        buf: &mut BytesMut,
        out: &ProfileSink,
    ) -> Result<(Vec<Profile>, bool), Cut> {
        let mut batch: Vec<Profile> = Vec::new();
        let mut completed = false;
        let now = now_ns();
        loop {
            match next_frame(buf, self.max_payload) {
                Frame::Payload(payload) => {
                    completed = true;
                    match validate_profile(&payload, self.max_payload) {
                        Ok(()) => batch.push(Profile {
                            rss_bytes: self.rss.as_ref().map_or(0, |f| f(self.pid)),
                            payload,
                            received_ns: now,
                            pid: self.pid,
                            uid: self.uid,
                        }),
                        Err(reason) => self.reject(reason),
                    }
                }
                Frame::Empty => {
                    completed = true;
                    self.reject(RejectReason::Empty);
                }
                Frame::Oversize(len) => {
                    self.reject(RejectReason::Oversize);
                    tracing::warn!(
                        pid = self.pid,
                        len,
                        max = self.max_payload,
                        "stream frame over max_payload_bytes: closing connection"
                    );
                    let _ = send(out, batch, &self.telemetry).await;
                    return Err(Cut::Done);
                }
                Frame::Incomplete => return Ok((batch, completed)),
            }
        }
    }

    /// Room for a frame of `want` bytes in the shared budget, waiting up to the frame timeout
    /// (in arrival order: tokio's semaphore is fair).
    async fn reserve(&self, want: usize) -> Result<OwnedSemaphorePermit, Cut> {
        // Config validation keeps the budget, hence any admissible frame, under u32::MAX.
        let n = u32::try_from(want).map_err(|_| Cut::Refused(ConnRefusal::BufferBudget))?;
        match tokio::time::timeout(
            self.frame_timeout,
            self.budget.clone().acquire_many_owned(n),
        )
        .await
        {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(Cut::Done),
            Err(_) => Err(Cut::Refused(ConnRefusal::BufferBudget)),
        }
    }

    fn reject(&self, reason: RejectReason) {
        ProfileRejected {
            reason,
            pid: Some(self.pid),
        }
        .emit(&self.telemetry);
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
    out.send(batch, &telemetry.gate).await?;
    telemetry
        .received
        .get_or_create(&SocketLabels {
            socket: Socket::Stream,
        })
        .inc_by(n);
    telemetry.received_bytes.inc_by(bytes);
    // `always` mode: one read of a connection is a group; read nothing more from it until the
    // group is written ahead (pipeline/durable.rs).
    if telemetry.gate.write_ahead() {
        let mark = out.flush(&telemetry.gate).await?;
        telemetry.gate.wait_commit(mark).await;
    }
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
    fn an_incomplete_frame_does_not_grow_the_buffer() {
        let mut b = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        b.extend_from_slice(b"{");
        assert_eq!(next_frame(&mut b, 2_000_000), Frame::Incomplete);
        assert!(b.capacity() < 1_000_000, "reserving is the caller's choice");
        assert_eq!(frame_len(&b), Some(1_000_000));
        assert_eq!(frame_len(&b[..3]), None);
    }

    #[test]
    fn oversize_frame_is_detected_from_the_header() {
        let mut b = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        assert_eq!(next_frame(&mut b, 1000), Frame::Oversize(1_000_000));
    }
}
