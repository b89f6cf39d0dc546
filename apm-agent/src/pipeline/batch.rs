//! The batcher: profiles in, sealed batches out. A batch is sealed when it holds
//! `batch.max_items` profiles, or `batch.max_bytes` payload bytes, or when its first profile is
//! `batch.max_age` old less a lead: the recent seal -> ack time of batches, smoothed, plus four
//! of its deviations (`Telemetry::seal_lead`; the timer starts with the first item, so an idle
//! agent does not tick). Sealing early brings `batch.max_age` close to what an operator reads it
//! as, the longest a profile waits for its ack from a healthy listener, rather than the longest
//! before it is sent (the performance issue, item 5). The lead covers the whole way from seal to
//! ack, the batch channel, the router and the window included, not only send -> ack (test:
//! `transport::tests::the_batchers_lead_covers_seal_to_send_not_only_send_to_ack`). At most half
//! of `max_age` is taken off, so a slow listener cannot shrink batches to nothing.
//! Sealing assigns the batch its persistent sequence number.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::config::BatchConfig;
use crate::events::ProfilesDropped;
use crate::pipeline::liveness::{Liveness, Stage};
use crate::pipeline::model::{Batch, Profile};
use crate::state::SeqAllocator;
use crate::telemetry::{DropReason, Telemetry};

/// Accumulates profiles under the three limits. Pure logic; the task below drives it.
#[derive(Debug)]
pub struct Batcher {
    cfg: BatchConfig,
    items: Vec<Profile>,
    bytes: usize,
    deadline: Option<Instant>,
    /// How much earlier than `max_age` a batch is sealed (the seal -> ack lead, capped).
    lead: Duration,
}

impl Batcher {
    pub fn new(cfg: BatchConfig) -> Self {
        Self {
            items: Vec::with_capacity(cfg.max_items.min(4096)),
            cfg,
            bytes: 0,
            deadline: None,
            lead: Duration::ZERO,
        }
    }

    /// The recent seal -> ack lead: the next batch is sealed that much before `max_age`, but
    /// never before half of it.
    pub fn set_lead(&mut self, lead: Duration) {
        self.lead = lead.min(self.cfg.max_age / 2);
    }

    /// Adds one profile; returns the profiles of a batch that became full, if any.
    pub fn push(&mut self, p: Profile, now: Instant) -> Option<Vec<Profile>> {
        // A profile that would overflow the byte limit seals the current batch first.
        let sealed = if !self.items.is_empty() && self.bytes + p.payload.len() > self.cfg.max_bytes
        {
            self.take()
        } else {
            None
        };
        if self.items.is_empty() {
            self.deadline = Some(now + self.cfg.max_age.saturating_sub(self.lead));
        }
        self.bytes += p.payload.len();
        self.items.push(p);
        if sealed.is_some() {
            return sealed;
        }
        if self.items.len() >= self.cfg.max_items || self.bytes >= self.cfg.max_bytes {
            return self.take();
        }
        None
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Takes whatever is pending (age limit reached, or shutdown).
    pub fn take(&mut self) -> Option<Vec<Profile>> {
        self.deadline = None;
        self.bytes = 0;
        if self.items.is_empty() {
            None
        } else {
            Some(std::mem::replace(
                &mut self.items,
                Vec::with_capacity(self.cfg.max_items.min(4096)),
            ))
        }
    }
}

/// What the batch stage works with beside its input and output.
pub struct BatchStage {
    pub cfg: BatchConfig,
    pub seqs: SeqAllocator,
    pub live: Arc<Liveness>,
    pub telemetry: Arc<Telemetry>,
    /// Cancelled when the shutdown timeout has run out: stop waiting for the state volume.
    pub deadline: CancellationToken,
}

/// The batch stage: runs until its input closes (ingest finished draining), then seals what is
/// left and returns.
pub async fn run(
    mut st: BatchStage,
    mut input: mpsc::Receiver<crate::pipeline::ingest::Chunk>,
    out: mpsc::Sender<Batch>,
) {
    let mut b = Batcher::new(st.cfg.clone());
    let mut beat = tokio::time::interval(crate::pipeline::liveness::BEAT);
    loop {
        let deadline = b.deadline();
        let chunk = tokio::select! {
            _ = beat.tick() => {
                st.live.beat(Stage::Batch);
                continue;
            }
            c = input.recv() => c,
            () = async { sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                if let Some(items) = b.take() {
                    st.seal(items, &out).await;
                }
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        let now = Instant::now();
        b.set_lead(st.telemetry.seal_lead());
        // The chunk's share of the ingest queue budget is released once it is consumed.
        for p in chunk.profiles {
            if let Some(items) = b.push(p, now) {
                st.seal(items, &out).await;
            }
        }
        // The end of a group (`spool.mode = "always"`): ingest waits for its write-ahead, so
        // it is sealed now rather than at `batch.max_age` (pipeline/durable.rs).
        if chunk.flush
            && let Some(items) = b.take()
        {
            st.seal(items, &out).await;
        }
    }
    if let Some(items) = b.take() {
        st.seal(items, &out).await;
    }
}

impl BatchStage {
    async fn seal(&mut self, profiles: Vec<Profile>, out: &mpsc::Sender<Batch>) {
        let Some(seq) = self.allocate().await else {
            self.telemetry.gate.settle(profiles.len() as u64);
            ProfilesDropped {
                reason: DropReason::Shutdown,
                profiles: profiles.len() as u64,
                what: "the seq state could still not be written at the shutdown deadline: batch dropped",
                seq: None,
            }
            .emit(&self.telemetry);
            return;
        };
        let batch = Batch {
            seq,
            epoch: self.seqs.epoch(),
            profiles,
            sealed_at: Some(Instant::now()),
        };
        if let Err(e) = out.send(batch).await {
            // Only after the router ended (its own failure is reported by the daemon).
            self.telemetry.gate.settle(e.0.len() as u64);
            tracing::error!("router gone: batch not forwarded");
        }
    }

    /// The next seq. When its reservation cannot be written (the state volume is full or
    /// read-only), waits and retries rather than end the stage: the profiles in hand stay here,
    /// ingest's queue and then the kernel queue push back on PHP (EAGAIN, counted by the eBPF
    /// monitor), status shows the failure and the watchdog is withheld, until the volume works.
    /// `None` once the shutdown deadline has passed.
    async fn allocate(&mut self) -> Option<u64> {
        let mut wait = Duration::from_millis(100);
        let mut failing = false;
        loop {
            match self.seqs.allocate() {
                Ok(seq) => {
                    if failing {
                        tracing::info!("seq state written again: batching resumes");
                        self.live.recover(Stage::Batch);
                    }
                    return Some(seq);
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "cannot reserve batch seqs: batching waits until the state volume works (PHP sees backpressure meanwhile)");
                    }
                    failing = true;
                    self.live.fail(Stage::Batch, e.to_string());
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.deadline.cancelled() => return None,
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::durable::Gate;
    use bytes::Bytes;
    use std::time::Duration;

    fn prof(n: usize) -> Profile {
        Profile {
            payload: Bytes::from(vec![b' '; n]),
            received_ns: 0,
            pid: 1,
            uid: 0,
            rss_bytes: 0,
        }
    }

    fn cfg(items: usize, bytes: usize, age_ms: u64) -> BatchConfig {
        BatchConfig {
            max_items: items,
            max_bytes: bytes,
            max_age: Duration::from_millis(age_ms),
        }
    }

    #[test]
    fn seals_on_items() {
        let mut b = Batcher::new(cfg(3, 1 << 20, 1000));
        let now = Instant::now();
        assert!(b.push(prof(1), now).is_none());
        assert!(b.push(prof(1), now).is_none());
        assert_eq!(b.push(prof(1), now).unwrap().len(), 3);
        assert!(b.deadline().is_none());
    }

    #[test]
    fn seals_on_bytes_before_overflowing() {
        let mut b = Batcher::new(cfg(100, 100, 1000));
        let now = Instant::now();
        assert!(b.push(prof(60), now).is_none());
        // 60 + 60 > 100: the first is sealed alone, the second starts a new batch.
        assert_eq!(b.push(prof(60), now).unwrap().len(), 1);
        assert_eq!(b.take().unwrap().len(), 1);
        // One profile at the limit is a batch by itself.
        assert_eq!(b.push(prof(100), now).unwrap().len(), 1);
    }

    /// Item 5 of the performance issue: a batch sealed by age is sealed the seal -> ack lead
    /// before `max_age`, so its first profile is acked within `max_age`; never
    /// earlier than half of it.
    #[test]
    fn seals_early_by_the_lead_but_never_before_half_the_age() {
        let t = Instant::now();
        let mut b = Batcher::new(cfg(100, 1 << 20, 500));
        assert!(b.push(prof(10), t).is_none());
        assert_eq!(
            b.deadline(),
            Some(t + Duration::from_millis(500)),
            "no ack yet"
        );
        b.take();
        b.set_lead(Duration::from_millis(20));
        b.push(prof(10), t);
        assert_eq!(b.deadline(), Some(t + Duration::from_millis(480)));
        // A later item does not move the deadline of the open batch.
        b.set_lead(Duration::from_millis(40));
        b.push(prof(10), t + Duration::from_millis(100));
        assert_eq!(b.deadline(), Some(t + Duration::from_millis(480)));
        b.take();
        b.set_lead(Duration::from_secs(3));
        b.push(prof(10), t);
        assert_eq!(b.deadline(), Some(t + Duration::from_millis(250)));
    }

    #[tokio::test(start_paused = true)]
    async fn seals_on_age_with_timer_from_first_item() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = SeqAllocator::open(dir.path()).unwrap();
        let (tx, rx) = crate::pipeline::ingest::profile_queue(1 << 20);
        let (otx, mut orx) = mpsc::channel(4);
        let stage = BatchStage {
            cfg: cfg(100, 1 << 20, 500),
            seqs,
            live: Arc::default(),
            telemetry: Telemetry::new(),
            deadline: CancellationToken::new(),
        };
        let task = tokio::spawn(run(stage, rx, otx));
        // Idle: nothing ticks.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(orx.try_recv().is_err());
        tx.send(vec![prof(10)], &Gate::default()).await.unwrap();
        tokio::time::advance(Duration::from_millis(300)).await;
        tx.send(vec![prof(10)], &Gate::default()).await.unwrap();
        tokio::time::advance(Duration::from_millis(199)).await;
        tokio::task::yield_now().await;
        assert!(
            orx.try_recv().is_err(),
            "not yet 500 ms since the first item"
        );
        tokio::time::advance(Duration::from_millis(2)).await;
        let b = orx.recv().await.unwrap();
        assert_eq!(b.len(), 2);
        // Closing the input flushes the remainder with the next seq.
        tx.send(vec![prof(1)], &Gate::default()).await.unwrap();
        drop(tx);
        let last = orx.recv().await.unwrap();
        assert_eq!(last.seq, b.seq + 1);
        task.await.unwrap();
    }
}
