//! What a SIGKILL can lose, counted, and in `spool.mode = "always"` bounded to one receive call.
//!
//! Every profile ingest hands to the batcher is *handed*; it is *settled* once the router has
//! taken its batch in (written ahead to the spool in `always` mode, into the memory window in
//! `overflow` mode) or once it was dropped on the way (counted with its reason). Between the two
//! it exists only in memory: the ingest queue, the open batch, the batch channel.
//!
//! In `always` mode ingest waits, after each receive call, until everything it handed is
//! settled before it reads again (a group commit: while one group is written and fsynced, the
//! next waits in the kernel queue, which survives an agent restart under systemd's fd store and
//! an in-place restart). The batcher seals as soon as its input is empty, so a group is one batch
//! (or a few, at `batch.max_items`), and the write-ahead commits it at once. So what a SIGKILL
//! can lose is at most one receive call per source (`ingest.recv_batch` datagrams, or the frames
//! of one stream read), reported as `at_risk_profiles`; and `durable_profiles` (counted by the
//! router) is what was written ahead, in the order received
//! (`faults.rs::sigkill_100_times_in_write_ahead_mode_delivers_every_profile_reported_durable`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// The hand/settle ledger shared by ingest, the batcher and the router (it lives in
/// `Telemetry`, which every stage holds).
#[derive(Debug, Default)]
pub struct Gate {
    handed: AtomicU64,
    settled: AtomicU64,
    /// Set at assembly in `spool.mode = "always"`: ingest waits for its group's commit.
    write_ahead: AtomicBool,
    /// The router has ended: nobody will settle anything any more, so nobody waits.
    closed: AtomicBool,
    notify: Notify,
    /// Keeps "handed" in the order chunks enter the queue (see [`Gate::handing`]).
    order: Mutex<()>,
}

impl Gate {
    /// Ingest waits for each group's write-ahead (`spool.mode = "always"`).
    pub fn set_write_ahead(&self, on: bool) {
        self.write_ahead.store(on, Ordering::Relaxed);
    }

    pub fn write_ahead(&self) -> bool {
        self.write_ahead.load(Ordering::Relaxed)
    }

    /// Runs `enqueue` (a non-blocking queue send of `n` profiles) and counts them handed, under
    /// one lock, so that the order of the marks is the order of the queue: a later chunk cannot
    /// settle an earlier chunk's mark. Returns the mark to wait for.
    pub fn handing<T>(&self, n: u64, enqueue: impl FnOnce() -> T) -> (u64, T) {
        let _order = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = enqueue();
        let mark = self.handed.fetch_add(n, Ordering::AcqRel) + n;
        (mark, out)
    }

    /// `n` profiles left the path before the router: taken in by it, or dropped.
    pub fn settle(&self, n: u64) {
        self.settled.fetch_add(n, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Nobody settles from now on (the router ended): wake every waiter for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Waits until everything handed up to `mark` is settled (or the router ended).
    pub async fn committed(&self, mark: u64) {
        loop {
            let woken = self.notify.notified();
            tokio::pin!(woken);
            // Registered before the check, so a settle between the check and the await wakes us.
            woken.as_mut().enable();
            if self.settled.load(Ordering::Acquire) >= mark || self.closed.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// In `always` mode, waits for `mark`'s commit (the group commit); otherwise returns at once.
    pub async fn wait_commit(&self, mark: u64) {
        if self.write_ahead() {
            self.committed(mark).await;
        }
    }

    /// Profiles handed and not yet settled: only in memory before the router.
    pub fn unsettled(&self) -> u64 {
        let settled = self.settled.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(settled)
    }
}

/// Closes the gate when dropped: the router holds one, so its end (or its panic) releases
/// ingest.
#[derive(Debug)]
pub struct CloseOnDrop(pub std::sync::Arc<crate::telemetry::Telemetry>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.gate.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_mark_is_committed_only_once_everything_before_it_settled() {
        let g = Arc::new(Gate::default());
        let (a, ()) = g.handing(3, || ());
        let (b, ()) = g.handing(2, || ());
        assert_eq!((a, b), (3, 5));
        assert_eq!(g.unsettled(), 5);
        g.settle(3);
        tokio::time::timeout(Duration::from_secs(1), g.committed(a))
            .await
            .expect("first mark committed");
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.committed(b).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "second mark not settled yet");
        g.settle(2);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("second mark committed")
            .unwrap();
        assert_eq!(g.unsettled(), 0);
    }

    #[tokio::test]
    async fn closing_releases_waiters() {
        let g = Arc::new(Gate::default());
        let (m, ()) = g.handing(1, || ());
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.committed(m).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.close();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("released")
            .unwrap();
    }
}
