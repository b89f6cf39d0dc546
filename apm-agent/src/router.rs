//! The router sits between the batcher and the transport and owns every batch that is not yet
//! acknowledged: it decides whether a batch goes to the wire now, waits in memory, or goes to
//! the spool; it settles acks, resends returned batches, and holds the memory budget
//! (`limits.memory_budget_mb`): past it, it stops taking batches from the batcher, which pushes
//! back to ingest and then to the kernel queue, where the eBPF side counts what PHP drops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::Batch;
use crate::telemetry::{DropReason, Telemetry};
use crate::transport::Outcome;

pub struct Router {
    pub telemetry: Arc<Telemetry>,
    pub memory_budget: usize,
}

/// Handles a router needs.
pub struct RouterIo {
    pub input: mpsc::Receiver<Batch>,
    pub to_transport: mpsc::Sender<Batch>,
    pub outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// Cancelled when the shutdown timeout has run out: stop waiting for acks.
    pub deadline: CancellationToken,
}

impl Router {
    /// Runs until the batcher is done and every batch is settled, or until the deadline. Returns
    /// the batches that were never acknowledged (for the spool at shutdown).
    pub async fn run(self, io: RouterIo) -> Vec<Batch> {
        let RouterIo {
            mut input,
            to_transport,
            mut outcomes,
            deadline,
        } = io;
        // Returned batches are resent before new ones, oldest first.
        let mut retry: VecDeque<Batch> = VecDeque::new();
        let mut pending: VecDeque<Batch> = VecDeque::new();
        let mut held_bytes: usize = 0; // payload bytes of every unsettled batch we own
        let mut unsettled: usize = 0; // batches handed to the transport, not yet settled
        let mut input_open = true;
        let mut last_report = Instant::now();
        loop {
            self.telemetry.memory_payload_bytes.set(held_bytes as i64);
            if !input_open && retry.is_empty() && pending.is_empty() && unsettled == 0 {
                return Vec::new();
            }
            let has_work = !retry.is_empty() || !pending.is_empty();
            tokio::select! {
                biased;
                () = deadline.cancelled() => break,
                o = outcomes.recv() => match o {
                    Some(Outcome::Acked { profiles, bytes, .. }) => {
                        unsettled -= 1;
                        held_bytes -= bytes;
                        self.telemetry.delivered.inc_by(profiles as u64);
                        self.telemetry.delivered_batches.inc();
                    }
                    Some(Outcome::Returned { batch, reason }) => {
                        unsettled -= 1;
                        tracing::debug!(seq = batch.seq, reason = %reason, "batch returned for resend");
                        // Keep seq order among returned batches.
                        let pos = retry.iter().position(|b| b.seq > batch.seq).unwrap_or(retry.len());
                        retry.insert(pos, batch);
                    }
                    Some(Outcome::Rejected { batch, .. }) => {
                        unsettled -= 1;
                        held_bytes -= batch.payload_bytes();
                        self.telemetry.drop_profiles(DropReason::RejectedByCentral, batch.len() as u64);
                    }
                    Some(Outcome::ConnectFailed { .. } | Outcome::Connected) => {}
                    None => break,
                },
                permit = to_transport.reserve(), if has_work => match permit {
                    Ok(p) => {
                        let b = retry.pop_front().or_else(|| pending.pop_front()).expect("has work");
                        unsettled += 1;
                        p.send(b);
                    }
                    Err(_) => break,
                },
                b = input.recv(), if input_open && held_bytes < self.memory_budget => match b {
                    Some(b) => {
                        held_bytes += b.payload_bytes();
                        pending.push_back(b);
                    }
                    None => input_open = false,
                },
            }
            if last_report.elapsed() > Duration::from_secs(30) && (retry.len() + pending.len()) > 0
            {
                last_report = Instant::now();
                tracing::info!(
                    waiting = retry.len() + pending.len(),
                    in_flight = unsettled,
                    held_bytes,
                    "batches waiting for the central listener"
                );
            }
        }
        // Deadline: collect everything we still own. Batches inside the transport come back as
        // Returned once it is stopped; the caller drains `outcomes` through `collect_returned`.
        drop(to_transport);
        while unsettled > 0 {
            match outcomes.recv().await {
                Some(Outcome::Acked { profiles, .. }) => {
                    unsettled -= 1;
                    self.telemetry.delivered.inc_by(profiles as u64);
                    self.telemetry.delivered_batches.inc();
                }
                Some(Outcome::Returned { batch, .. }) => {
                    unsettled -= 1;
                    retry.push_back(batch);
                }
                Some(Outcome::Rejected { batch, .. }) => {
                    unsettled -= 1;
                    self.telemetry
                        .drop_profiles(DropReason::RejectedByCentral, batch.len() as u64);
                }
                Some(_) => {}
                None => break,
            }
        }
        // Whatever the batcher still sends is ours too (it ends once ingest has drained).
        while let Some(b) = input.recv().await {
            pending.push_back(b);
        }
        let mut left: Vec<Batch> = retry.into_iter().chain(pending).collect();
        left.sort_by_key(|b| b.seq);
        self.telemetry.memory_payload_bytes.set(0);
        left
    }
}
