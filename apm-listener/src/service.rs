//! The gRPC `Collector` service: one task per stream reads batches, hands them to the writer and
//! sends the acks in order, once their writes are done.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use apm_proto::collector_server::Collector;
use apm_proto::{Ack, AckStatus, Batch};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Admitted, Auth};
use crate::format::encode_batch;
use crate::stats::Stats;
use crate::store::{Outcome, Reply, Submission, WriterMsg};

/// Batches of one stream handed to the writer and not yet acked, at most. Beyond it the stream
/// stops reading, which pushes back on the agent through HTTP/2 flow control.
const STREAM_WINDOW: usize = 64;

/// State shared by every stream.
pub struct Shared {
    pub writer: mpsc::Sender<WriterMsg>,
    pub stats: Arc<Stats>,
    /// Who may open a stream, and for which agent ids it may send.
    pub auth: Auth,
    /// Each ack waits this long after its write completed (fault injection).
    pub ack_delay: Duration,
    /// Cancelled at shutdown: streams stop reading, ack what was stored, and end.
    pub shutdown: CancellationToken,
}

#[derive(Clone)]
pub struct CollectorService {
    shared: Arc<Shared>,
}

impl CollectorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Collector for CollectorService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<Batch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".into(), |a| a.to_string());
        let given = request
            .metadata()
            .get("authorization")
            .map(tonic::metadata::MetadataValue::as_bytes)
            .unwrap_or_default();
        let Some(admitted) = self.shared.auth.admit(given) else {
            self.shared.stats.unauthenticated.fetch_add(1, Relaxed);
            warn!(peer = %peer, "stream refused: missing or wrong bearer token");
            return Err(Status::unauthenticated(
                "missing or wrong bearer token (authorization: Bearer <token>)",
            ));
        };
        self.shared.stats.streams.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        let shared = self.shared.clone();
        let inbound = request.into_inner();
        tokio::spawn(async move {
            debug!(peer = %peer, "stream opened");
            let end = run_stream(inbound, tx, &shared, &admitted).await;
            debug!(peer = %peer, end = ?end, "stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Why a stream ended (for the debug log).
#[derive(Debug)]
enum StreamEnd {
    /// The agent closed its side and every ack was sent.
    Done,
    /// Shutdown: stopped reading, acked what was stored.
    Shutdown,
    /// The agent went away or stopped reading acks.
    ClientGone,
    /// Receiving failed (decode error, reset); carries the status.
    RecvError(Status),
    WriterGone,
    DroppedBeforeAck,
}

async fn run_stream(
    mut inbound: Streaming<Batch>,
    tx: mpsc::Sender<Result<Ack, Status>>,
    shared: &Shared,
    admitted: &Admitted,
) -> StreamEnd {
    let mut pending: VecDeque<(u64, oneshot::Receiver<Reply>)> = VecDeque::new();
    let mut spare_bufs: Vec<Vec<u8>> = Vec::new();
    let mut reading = true;
    let mut end = StreamEnd::Done;
    loop {
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            reply = async { (&mut pending.front_mut().expect("guarded by precondition").1).await },
                if !pending.is_empty() =>
            {
                let (seq, _) = pending.pop_front().expect("front was polled");
                let Ok(reply) = reply else {
                    let _ = tx.send(Err(Status::unavailable("listener shutting down"))).await;
                    return StreamEnd::WriterGone;
                };
                let status = match reply.outcome {
                    Outcome::Stored | Outcome::Duplicate => Ok((AckStatus::Ok, String::new())),
                    Outcome::Retry(msg) => Ok((AckStatus::Retry, msg)),
                    Outcome::Rejected(msg) => Ok((AckStatus::Rejected, msg)),
                    Outcome::DropBeforeAck => Err(()),
                };
                if reply.buf.capacity() > 0 && spare_bufs.len() < 4 {
                    spare_bufs.push(reply.buf);
                }
                let Ok((status, message)) = status else {
                    info!(seq, "fault injection: batch stored, dropping the stream before its ack");
                    let _ = tx.send(Err(Status::unavailable(
                        "fault injection: stream dropped before ack (--drop-before-ack)",
                    ))).await;
                    return StreamEnd::DroppedBeforeAck;
                };
                if !shared.ack_delay.is_zero() {
                    tokio::time::sleep_until((reply.done_at + shared.ack_delay).into()).await;
                }
                let ack = Ack { seq, status: status as i32, message };
                if tx.send(Ok(ack)).await.is_err() {
                    return StreamEnd::ClientGone;
                }
            }
            () = shared.shutdown.cancelled(), if reading => {
                reading = false;
                end = StreamEnd::Shutdown;
            }
            msg = inbound.message(), if reading && pending.len() < STREAM_WINDOW => {
                match msg {
                    Ok(Some(batch)) => {
                        let seq = batch.seq;
                        let (reply_tx, reply_rx) = oneshot::channel();
                        if let Some(why) = refusal(&batch, admitted, &shared.stats) {
                            // Never storable; answered in order with the others, without the writer.
                            shared.stats.rejected_batches.fetch_add(1, Relaxed);
                            warn!(agent_id = %batch.agent_id.escape_debug(), seq, reason = %why,
                                  "batch rejected");
                            let _ = reply_tx.send(Reply {
                                outcome: Outcome::Rejected(why),
                                buf: Vec::new(),
                                done_at: Instant::now(),
                            });
                            pending.push_back((seq, reply_rx));
                            continue;
                        }
                        let buf = spare_bufs.pop().unwrap_or_default();
                        let encoded = encode_batch(&batch, buf);
                        let series = crate::store::series(&batch.agent_id, batch.epoch);
                        let sub = Submission {
                            series,
                            agent_id: batch.agent_id.clone(),
                            epoch: batch.epoch,
                            seq,
                            batch: encoded,
                            reply: reply_tx,
                        };
                        if shared.writer.send(WriterMsg::Batch(sub)).await.is_err() {
                            let _ = tx.send(Err(Status::unavailable("listener shutting down"))).await;
                            return StreamEnd::WriterGone;
                        }
                        pending.push_back((seq, reply_rx));
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        reading = false;
                        end = StreamEnd::RecvError(status);
                    }
                }
            }
        }
    }
    if let StreamEnd::RecvError(status) = &end {
        // Tell the agent why, if it still listens (a decode error; a reset goes nowhere).
        let _ = tx.send(Err(status.clone())).await;
    }
    end
}

/// Why `batch` can never be stored, if so: no agent id, no profiles (acking an empty batch as
/// stored would mark its seq as seen with nothing in the file), or an agent id that the stream's
/// token may not send for (it would fill another agent's dedup state).
fn refusal(batch: &Batch, admitted: &Admitted, stats: &Stats) -> Option<String> {
    if batch.agent_id.is_empty() {
        return Some("batch without agent_id".into());
    }
    if batch.profiles.is_empty() {
        return Some("batch with no profiles".into());
    }
    if !admitted.may_send_for(&batch.agent_id) {
        stats.wrong_agent_batches.fetch_add(1, Relaxed);
        return Some(format!(
            "agent_id {:?} is not the agent id this token is bound to",
            batch.agent_id
        ));
    }
    None
}
