//! The queue from ingest to the batcher, bounded by payload bytes rather than by count.
//!
//! A chunk is what one receive call produced: up to `ingest.recv_batch` profiles, from a few KiB
//! to several MiB depending on the profile size. A queue bounded by chunk count would hold 64 KiB
//! or 256 MiB depending on traffic, outside the memory budget the router enforces; bounded by
//! bytes it holds at most [`INGEST_QUEUE_BYTES`] whatever the profile size. When it is full,
//! ingest waits, the kernel queue fills, and PHP's sends see EAGAIN (which the eBPF side counts):
//! pressure is visible, never silent loss inside the agent.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::pipeline::durable::Gate;
use crate::pipeline::model::Profile;

/// Payload bytes that may wait between ingest and the batcher. Four batches' worth
/// (`batch.max_bytes`, 512 KiB; two when it was 1 MiB): the batcher keeps up with ingest, so
/// more only fills up when the
/// router pushes back, and then it is memory held for nothing before the kernel queue takes
/// over. 8 MiB before 2026-11-30: docs/agent.md, "Where the memory goes", has the measurement.
pub const INGEST_QUEUE_BYTES: usize = 2 << 20;

/// Accounting unit of the byte budget (semaphore permits are counted in these).
const UNIT: usize = 1024;

/// Profiles of one receive call, holding their share of the byte budget until the batcher has
/// taken them.
#[derive(Debug)]
pub struct Chunk {
    pub profiles: Vec<Profile>,
    /// The end of a group in `spool.mode = "always"`: the batcher seals what it holds, so the
    /// router writes the group ahead at once (pipeline/durable.rs).
    pub flush: bool,
    _budget: Option<OwnedSemaphorePermit>,
}

/// The batcher went away: the agent is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the batcher has stopped")]
pub struct Closed;

/// Ingest's end of the queue; cheap to clone (one per stream connection).
#[derive(Clone, Debug)]
pub struct ProfileSink {
    tx: mpsc::Sender<Chunk>,
    budget: Arc<Semaphore>,
    units: u32,
}

/// A queue holding at most `max_bytes` of payload (and at most 1024 chunks).
pub fn profile_queue(max_bytes: usize) -> (ProfileSink, mpsc::Receiver<Chunk>) {
    let units = (max_bytes / UNIT).clamp(1, u32::MAX as usize) as u32;
    let (tx, rx) = mpsc::channel(1024);
    (
        ProfileSink {
            tx,
            budget: Arc::new(Semaphore::new(units as usize)),
            units,
        },
        rx,
    )
}

impl ProfileSink {
    /// Waits for room, then queues the profiles and counts them handed (`gate`). Returns the
    /// mark to pass to [`Gate::wait_commit`] once the caller has counted them received. A chunk
    /// bigger than the whole budget waits for the queue to be empty and then goes alone, so no
    /// size of profile can stall ingest.
    pub async fn send(&self, profiles: Vec<Profile>, gate: &Gate) -> Result<u64, Closed> {
        let bytes: usize = profiles.iter().map(|p| p.payload.len()).sum();
        let want = bytes.div_ceil(UNIT).clamp(1, self.units as usize) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Closed)?;
        let slot = self.tx.reserve().await.map_err(|_| Closed)?;
        let n = profiles.len() as u64;
        let (mark, ()) = gate.handing(n, move || {
            slot.send(Chunk {
                profiles,
                flush: false,
                _budget: Some(permit),
            });
        });
        Ok(mark)
    }

    /// Ends a group: the batcher seals what it holds. Returns the mark of everything handed so
    /// far, to pass to [`Gate::wait_commit`].
    pub async fn flush(&self, gate: &Gate) -> Result<u64, Closed> {
        let slot = self.tx.reserve().await.map_err(|_| Closed)?;
        let (mark, ()) = gate.handing(0, move || {
            slot.send(Chunk {
                profiles: Vec::new(),
                flush: true,
                _budget: None,
            });
        });
        Ok(mark)
    }

    /// Payload bytes queued now (rounded up to the accounting unit).
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        (self.units as usize - self.budget.available_permits()) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn profiles(n: usize, size: usize) -> Vec<Profile> {
        (0..n)
            .map(|_| Profile {
                payload: Bytes::from(vec![b'x'; size]),
                received_ns: 0,
                pid: 1,
                uid: 0,
                rss_bytes: 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn bounded_by_bytes_not_by_count() {
        let (tx, mut rx) = profile_queue(64 * 1024);
        // 4 chunks of 16 KiB fill it; the fifth waits.
        for _ in 0..4 {
            tx.send(profiles(1, 16 * 1024), &Gate::default())
                .await
                .unwrap();
        }
        assert_eq!(tx.queued_bytes(), 64 * 1024);
        let blocked = tokio::time::timeout(
            Duration::from_millis(50),
            tx.send(profiles(1, 1), &Gate::default()),
        )
        .await;
        assert!(blocked.is_err(), "a full queue must make ingest wait");
        // Taking one chunk frees its share only once the batcher drops it.
        let c = rx.recv().await.unwrap();
        assert_eq!(tx.queued_bytes(), 64 * 1024);
        drop(c);
        tx.send(profiles(1, 1), &Gate::default()).await.unwrap();
        assert_eq!(tx.queued_bytes(), 48 * 1024 + 1024);
    }

    #[tokio::test]
    async fn a_chunk_bigger_than_the_budget_still_passes_alone() {
        let (tx, mut rx) = profile_queue(8 * 1024);
        tx.send(profiles(4, 16 * 1024), &Gate::default())
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap().profiles.len(), 4);
        tx.send(profiles(1, 1), &Gate::default()).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await.unwrap().profiles.len(), 1);
        assert!(rx.recv().await.is_none());
    }
}
