//! The output file: recovery at start (dedup state, torn tail) and the single writer thread that
//! group-commits batches from every stream.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::format::EncodedBatch;
use crate::intervals::IntervalSet;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open output file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "output file {path} is in use by another apm-listener (exclusive lock held); stop it or use another --out"
    )]
    Locked { path: PathBuf },
    #[error("cannot read output file {path} to rebuild the dedup state: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot truncate the torn tail of {path} to {len} bytes: {source}")]
    Truncate {
        path: PathBuf,
        len: u64,
        source: io::Error,
    },
    #[error("cannot start the writer thread: {0}")]
    Thread(io::Error),
}

/// Seqs already stored, per series (see [`series`]).
pub type Seen = HashMap<String, IntervalSet>;

/// The dedup series of a batch: its agent and the epoch of its seq. An agent that lost its seq
/// state starts a new epoch, so its seq 1 is new data, not a duplicate of the old seq 1.
/// Epoch 0 (agents from before epochs) is the agent id alone, as before.
pub fn series(agent_id: &str, epoch: u64) -> String {
    if epoch == 0 {
        agent_id.to_string()
    } else {
        // The unit separator cannot occur in an agent id that reached us as a JSON string key
        // we wrote ourselves, so two series never collide.
        format!("{agent_id}\u{1f}{epoch:016x}")
    }
}

/// What recovery found in an existing output file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Complete batches found (each marks its `(agent_id, seq)` as seen).
    pub batches: u64,
    pub lines: u64,
    /// Lines that are not a listener line (not JSON, or no `agent_id`/`seq`); left in place.
    pub foreign_lines: u64,
    /// Batches whose lines stop short before another batch starts (never acked); left in place,
    /// not marked as seen.
    pub broken_batches: u64,
    /// Bytes cut from the end: a torn last line or an incomplete last batch.
    pub truncated_bytes: u64,
    /// File length after recovery.
    pub len: u64,
}

/// The fields recovery needs from a line; the rest (the payload above all) is not parsed.
#[derive(Deserialize)]
pub(crate) struct LineKey<'a> {
    #[serde(borrow)]
    pub(crate) agent_id: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) epoch: Option<Cow<'a, str>>,
    pub(crate) seq: u64,
    pub(crate) batch_len: Option<u64>,
    pub(crate) batch_index: Option<u64>,
}

impl LineKey<'_> {
    /// The line's dedup series ([`series`]): a missing or unreadable epoch is epoch 0.
    pub(crate) fn series(&self) -> String {
        let epoch = self
            .epoch
            .as_deref()
            .and_then(|e| u64::from_str_radix(e, 16).ok())
            .unwrap_or(0);
        series(&self.agent_id, epoch)
    }
}

/// Parses the key of a line. Fast path: every envelope field precedes `,"profile` (the first
/// raw occurrence of that text is structural, since a quote inside a JSON string is escaped),
/// so only that prefix is parsed.
pub(crate) fn parse_key<'a>(line: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<LineKey<'a>> {
    const MARK: &[u8] = b",\"profile";
    const INVALID: &[u8] = b",\"invalid\":true";
    let head_end = line.windows(MARK.len()).position(|w| w == MARK);
    if let Some(mut end) = head_end {
        if line[..end].ends_with(INVALID) {
            end -= INVALID.len();
        }
        scratch.clear();
        scratch.extend_from_slice(&line[..end]);
        scratch.push(b'}');
        return serde_json::from_slice(scratch).ok();
    }
    serde_json::from_slice(line).ok()
}

/// The batch whose lines are being read.
struct OpenBatch {
    /// Agent id and epoch ([`series`]).
    series: String,
    seq: u64,
    len: u64,
    next_index: u64,
    start: u64,
}

/// Reads `file` from the start, fills `seen` with every complete batch, and truncates a torn tail
/// (a last line without `\n`, or a last batch with fewer lines than its `batch_len`): such a batch
/// was never acked, so the agent resends it.
pub fn recover(file: &mut File, path: &Path, seen: &mut Seen) -> Result<Recovery, StoreError> {
    let read_err = |source| StoreError::Read {
        path: path.to_owned(),
        source,
    };
    let mut rec = Recovery::default();
    let mut reader = BufReader::with_capacity(1 << 20, &*file);
    let mut line = Vec::with_capacity(4096);
    let mut scratch = Vec::with_capacity(512);
    let mut offset = 0u64;
    // End of the last line that is not inside an incomplete batch: the truncation point.
    let mut good_end = 0u64;
    let mut open: Option<OpenBatch> = None;
    let mut torn_line = false;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(read_err)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            torn_line = true;
            break;
        }
        let start = offset;
        offset += n as u64;
        rec.lines += 1;
        let key = parse_key(&line[..n - 1], &mut scratch);
        let Some(key) = key else {
            rec.foreign_lines += 1;
            if let Some(b) = open.take() {
                rec.broken_batches += 1;
                warn!(path = %path.display(), series = %b.series.escape_debug(), seq = b.seq, offset = b.start,
                      "incomplete batch inside the output file; not counted as stored");
            }
            warn!(path = %path.display(), offset = start, "output file line is not a listener line; left as is");
            good_end = offset;
            continue;
        };
        let key_series = key.series();
        let (Some(len), Some(index)) = (key.batch_len, key.batch_index) else {
            // A line without batch framing stands alone.
            seen.entry(key_series).or_default().insert(key.seq);
            rec.batches += 1;
            good_end = offset;
            continue;
        };
        let continues = open.as_ref().is_some_and(|b| {
            b.series == key_series && b.seq == key.seq && b.len == len && b.next_index == index
        });
        if !continues {
            if let Some(b) = open.take() {
                rec.broken_batches += 1;
                warn!(path = %path.display(), series = %b.series.escape_debug(), seq = b.seq, offset = b.start,
                      "incomplete batch inside the output file; not counted as stored");
            }
            if index != 0 {
                rec.foreign_lines += 1;
                warn!(path = %path.display(), offset = start, agent_id = %key.agent_id.escape_debug(), seq = key.seq,
                      batch_index = index, "line out of its batch; left as is");
                good_end = offset;
                continue;
            }
            open = Some(OpenBatch {
                series: key_series,
                seq: key.seq,
                len,
                next_index: 0,
                start,
            });
        }
        if let Some(b) = open.as_mut() {
            b.next_index += 1;
            if b.next_index == b.len {
                let b = open.take().expect("checked above");
                seen.entry(b.series).or_default().insert(b.seq);
                rec.batches += 1;
                good_end = offset;
            }
        }
    }
    drop(reader);
    let file_len = file.metadata().map_err(read_err)?.len();
    if torn_line || open.is_some() {
        rec.truncated_bytes = file_len - good_end;
        warn!(
            path = %path.display(),
            from = file_len,
            to = good_end,
            torn_line,
            series = open.as_ref().map_or("", |b| b.series.as_str()),
            seq = open.as_ref().map_or(0, |b| b.seq),
            "truncating the torn tail of the output file: that batch was never acked and will be resent"
        );
        file.set_len(good_end)
            .map_err(|source| StoreError::Truncate {
                path: path.to_owned(),
                len: good_end,
                source,
            })?;
        file.sync_all().map_err(|source| StoreError::Truncate {
            path: path.to_owned(),
            len: good_end,
            source,
        })?;
    }
    rec.len = good_end;
    Ok(rec)
}

/// Opens (creating if needed) the output file for appending, takes its exclusive lock, and
/// recovers it.
pub fn open(path: &Path) -> Result<(File, Seen, Recovery), StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Locked {
                path: path.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(StoreError::Open {
                path: path.to_owned(),
                source,
            });
        }
    }
    let mut seen = Seen::new();
    let rec = recover(&mut file, path, &mut seen)?;
    Ok((file, seen, rec))
}

/// How the writer answered a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (and flushed, or fdatasync'd with `--fsync`).
    Stored,
    /// Stored earlier: acked OK, not stored again.
    Duplicate,
    /// Not stored this time; the agent resends.
    Retry(String),
    /// Never storable (malformed batch); decided by the stream, not the writer.
    Rejected(String),
    /// Stored, but the stream must be dropped without acking (`--drop-before-ack`).
    DropBeforeAck,
}

/// The writer's answer, with the batch's buffer handed back for reuse.
#[derive(Debug)]
pub struct Reply {
    pub outcome: Outcome,
    pub buf: Vec<u8>,
    pub done_at: Instant,
}

/// One batch for the writer.
#[derive(Debug)]
pub struct Submission {
    /// The batch's dedup series ([`series`]).
    pub series: String,
    /// The agent id and epoch of the series, apart (the JetStream store's message id).
    pub agent_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub batch: EncodedBatch,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug)]
pub enum WriterMsg {
    Batch(Submission),
    /// Finish what came before and exit.
    Stop,
}

/// Writer behaviour: durability, the bounds of the dedup state and the fault-injection knobs.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub fsync: bool,
    /// Series (agent id + epoch) tracked at most; a batch of one more is answered RETRY.
    pub max_series: usize,
    /// Seq ranges per series at most; a seq that would open one more is answered RETRY.
    pub max_ranges: usize,
    /// Answer the first N batches RETRY without storing them.
    pub fail_first: u64,
    /// Answer the N batches after those REJECTED without storing them.
    pub reject_first: u64,
    /// After storing the N-th batch (1-based), answer `DropBeforeAck`, once.
    pub drop_before_ack: Option<u64>,
}

/// Default of `--max-agents`: far above a fleet per listener, low enough to bound memory.
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// Default of `--max-seq-ranges`: an honest agent has a handful of gaps (spool replays
/// pending), so 1024 is generous; 10 000 series x 1024 ranges stays in the hundreds of MiB.
pub const DEFAULT_MAX_RANGES: usize = 1024;

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            fsync: false,
            max_series: DEFAULT_MAX_SERIES,
            max_ranges: DEFAULT_MAX_RANGES,
            fail_first: 0,
            reject_first: 0,
            drop_before_ack: None,
        }
    }
}

/// At most this many batches per group: one `writev` takes up to IOV_MAX (1024) buffers.
const MAX_GROUP_BATCHES: usize = 1024;
/// At most this many bytes per group, so one huge backlog does not delay every ack.
const MAX_GROUP_BYTES: usize = 32 << 20;

/// The single writer: owns the file and the dedup state.
pub struct Writer {
    file: File,
    path: PathBuf,
    len: u64,
    seen: Seen,
    opts: WriterOptions,
    stats: Arc<Stats>,
    arrivals: u64,
    stored_batches: u64,
    drop_fired: bool,
}

enum Pending {
    Decided(Outcome),
    /// New; written in this group.
    Write,
}

impl Writer {
    pub fn new(
        file: File,
        path: PathBuf,
        len: u64,
        seen: Seen,
        opts: WriterOptions,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            file,
            path,
            len,
            seen,
            opts,
            stats,
            arrivals: 0,
            stored_batches: 0,
            drop_fired: false,
        }
    }

    /// Runs the writer on its own thread (writes and fdatasync block) until `Stop` or until every
    /// sender is gone.
    pub fn spawn(
        self,
        rx: mpsc::Receiver<WriterMsg>,
    ) -> Result<std::thread::JoinHandle<()>, StoreError> {
        std::thread::Builder::new()
            .name("apm-writer".into())
            .spawn(move || self.run(rx))
            .map_err(StoreError::Thread)
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut group: Vec<Submission> = Vec::with_capacity(MAX_GROUP_BATCHES);
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Batch(s) => {
                        bytes += s.batch.lines.len();
                        group.push(s);
                    }
                    WriterMsg::Stop => {
                        stop = true;
                        break;
                    }
                }
                if group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(&mut group);
            }
        }
        // Submissions that raced with Stop are dropped: their streams answer UNAVAILABLE and the
        // agents resend.
        rx.close();
        let _ = self.file.sync_data();
        info!(path = %self.path.display(), len = self.len, "writer stopped");
    }

    /// Decides, writes and answers one group: one `writev` and at most one fdatasync for all.
    fn commit(&mut self, group: &mut Vec<Submission>) {
        let mut decisions = Vec::with_capacity(group.len());
        for s in group.iter() {
            self.arrivals += 1;
            let d = if self.arrivals <= self.opts.fail_first {
                Pending::Decided(Outcome::Retry(format!(
                    "fault injection: --fail-first {}",
                    self.opts.fail_first
                )))
            } else if self.arrivals <= self.opts.fail_first + self.opts.reject_first {
                Pending::Decided(Outcome::Rejected(format!(
                    "fault injection: --reject-first {}",
                    self.opts.reject_first
                )))
            } else {
                self.dedup(s)
            };
            decisions.push(d);
        }

        let written = self.write_group(group, &decisions);
        let done_at = Instant::now();
        let stats = &self.stats;
        for (s, d) in group.drain(..).zip(decisions) {
            let outcome = match (d, &written) {
                (Pending::Write, Err(e)) => {
                    // Nothing of this group is stored: forget the seqs it added.
                    if let Some(set) = self.seen.get_mut(s.series.as_str()) {
                        set.remove(s.seq);
                        // An emptied series must not count against --max-agents.
                        if set.is_empty() {
                            self.seen.remove(s.series.as_str());
                        }
                    }
                    Outcome::Retry(e.clone())
                }
                // Even a duplicate of a seq first seen in this group must be resent now.
                (Pending::Decided(_), Err(e)) => Outcome::Retry(e.clone()),
                (Pending::Decided(o), Ok(_)) => o,
                (Pending::Write, Ok(_)) => {
                    self.stored_batches += 1;
                    if !self.drop_fired && self.opts.drop_before_ack == Some(self.stored_batches) {
                        self.drop_fired = true;
                        Outcome::DropBeforeAck
                    } else {
                        Outcome::Stored
                    }
                }
            };
            record(stats, &outcome, &s.batch);
            // A stream that went away no longer waits for its answer; nothing to do then.
            let _ = s.reply.send(Reply {
                outcome,
                buf: s.batch.lines,
                done_at,
            });
        }
    }

    /// Marks `s` as seen, or says why not. At a bound the answer is RETRY, never DUPLICATE: a
    /// full dedup state must not make the listener claim it stored what it did not. Recovery
    /// may load more than the bounds (the file is the truth); they only stop further growth.
    fn dedup(&mut self, s: &Submission) -> Pending {
        let full = |stats: &Stats, what: String| {
            stats.dedup_full_batches.fetch_add(1, Relaxed);
            warn!(series = %s.series.escape_debug(), seq = s.seq, bound = %what,
                  "dedup state full: batch answered RETRY");
            Pending::Decided(Outcome::Retry(format!(
                "listener dedup state full ({what}); retry later"
            )))
        };
        if let Some(set) = self.seen.get_mut(s.series.as_str()) {
            if set.contains(s.seq) {
                return Pending::Decided(Outcome::Duplicate);
            }
            if set.range_count() >= self.opts.max_ranges && set.would_add_range(s.seq) {
                let what = format!("{} seq ranges for this agent", self.opts.max_ranges);
                return full(&self.stats, what);
            }
            set.insert(s.seq);
            return Pending::Write;
        }
        if self.seen.len() >= self.opts.max_series {
            let what = format!("{} agents tracked", self.opts.max_series);
            return full(&self.stats, what);
        }
        self.seen.entry(s.series.clone()).or_default().insert(s.seq);
        Pending::Write
    }

    /// Writes the lines of the batches marked `Write`, then flushes or fdatasyncs. On failure the
    /// file is cut back to where the group started.
    fn write_group(&mut self, group: &[Submission], decisions: &[Pending]) -> Result<u64, String> {
        let mut slices: Vec<IoSlice<'_>> = group
            .iter()
            .zip(decisions)
            .filter(|(s, d)| matches!(d, Pending::Write) && !s.batch.lines.is_empty())
            .map(|(s, _)| IoSlice::new(&s.batch.lines))
            .collect();
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if total == 0 {
            return Ok(0);
        }
        let result = write_all_vectored(&mut self.file, &mut slices).and_then(|()| {
            if self.opts.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.len += total;
                self.stats.writes.fetch_add(1, Relaxed);
                self.stats.bytes_written.fetch_add(total, Relaxed);
                Ok(total)
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Relaxed);
                error!(path = %self.path.display(), error = %e, bytes = total,
                       "writing to the output file failed; the group is answered RETRY");
                if let Err(te) = self.file.set_len(self.len) {
                    error!(path = %self.path.display(), error = %te, len = self.len,
                           "cannot cut the failed write back; a restart truncates the torn tail");
                }
                Err(format!("listener cannot store the batch: {e}"))
            }
        }
    }
}

/// Counts one answered batch in `stats` (both stores).
pub fn record(stats: &Stats, outcome: &Outcome, batch: &EncodedBatch) {
    match outcome {
        Outcome::Stored | Outcome::DropBeforeAck => {
            stats.batches_stored.fetch_add(1, Relaxed);
            stats.profiles_stored.fetch_add(batch.profiles, Relaxed);
            stats.invalid_profiles.fetch_add(batch.invalid, Relaxed);
        }
        Outcome::Duplicate => {
            stats.duplicate_batches.fetch_add(1, Relaxed);
            stats.duplicate_profiles.fetch_add(batch.profiles, Relaxed);
        }
        Outcome::Retry(_) => {
            stats.retried_batches.fetch_add(1, Relaxed);
        }
        Outcome::Rejected(_) => {
            stats.rejected_batches.fetch_add(1, Relaxed);
        }
    }
}

pub(crate) fn write_all_vectored(
    file: &mut File,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_batch;
    use apm_proto::{Batch, Profile};
    use bytes::Bytes;

    fn batch(agent: &str, seq: u64, n: usize) -> Batch {
        Batch {
            agent_id: agent.into(),
            hostname: "h".into(),
            seq,
            epoch: 0,
            profiles: (0..n)
                .map(|i| Profile {
                    payload: Bytes::from(format!("{{\"id\":\"{agent}-{seq}-{i}\"}}")),
                    received_ns: 1,
                    pid: 2,
                    uid: 3,
                    rss_bytes: 4,
                })
                .collect(),
            host_stats: None,
        }
    }

    fn lines_of(b: &Batch) -> Vec<u8> {
        encode_batch(b, Vec::new()).lines
    }

    fn recover_bytes(content: &[u8]) -> (Recovery, Seen, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, content).expect("write");
        let (file, seen, rec) = open(&path).expect("open");
        drop(file);
        let after = std::fs::read(&path).expect("read");
        assert_eq!(rec.len, after.len() as u64);
        (rec, seen, after)
    }

    fn seqs(seen: &Seen, agent: &str) -> Vec<(u64, u64)> {
        seen.get(agent)
            .map(|s| s.ranges().collect())
            .unwrap_or_default()
    }

    #[test]
    fn rebuilds_dedup_from_complete_batches() {
        let mut content = Vec::new();
        for seq in [1, 2, 3, 7, 5] {
            content.extend(lines_of(&batch("a", seq, 3)));
        }
        content.extend(lines_of(&batch("b", 10, 1)));
        let (rec, seen, after) = recover_bytes(&content);
        assert_eq!(after, content, "nothing truncated");
        assert_eq!(rec.batches, 6);
        assert_eq!(rec.lines, 16);
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(seqs(&seen, "a"), vec![(1, 3), (5, 5), (7, 7)]);
        assert_eq!(seqs(&seen, "b"), vec![(10, 10)]);
    }

    #[test]
    fn torn_last_line_is_truncated_to_last_complete_batch() {
        let mut content = lines_of(&batch("a", 1, 2));
        let good = content.len();
        let second = lines_of(&batch("a", 2, 3));
        // Whole first line of batch 2 plus half of its second line.
        let first_nl = second.iter().position(|&b| b == b'\n').expect("nl") + 1;
        content.extend_from_slice(&second[..first_nl + 10]);
        let (rec, seen, after) = recover_bytes(&content);
        assert_eq!(after, content[..good]);
        assert_eq!(rec.truncated_bytes, (first_nl + 10) as u64);
        assert_eq!(seqs(&seen, "a"), vec![(1, 1)]);
    }

    #[test]
    fn incomplete_last_batch_is_truncated() {
        let mut content = lines_of(&batch("a", 1, 2));
        let good = content.len();
        let second = lines_of(&batch("a", 2, 3));
        let two_lines = second
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(1)
            .expect("2 lines")
            .0
            + 1;
        content.extend_from_slice(&second[..two_lines]);
        let (rec, seen, after) = recover_bytes(&content);
        assert_eq!(after, content[..good]);
        assert_eq!(rec.truncated_bytes, two_lines as u64);
        assert!(!seen["a"].contains(2));
    }

    #[test]
    fn invalid_payload_lines_and_foreign_lines_are_understood() {
        let mut b = batch("a", 1, 2);
        b.profiles[1].payload = Bytes::from_static(b"not json, \"profile\": {");
        let mut content = lines_of(&b);
        content.extend_from_slice(b"garbage that is not json\n");
        // A line written by something else, without batch framing.
        content.extend_from_slice(b"{\"agent_id\":\"z\",\"seq\":9,\"profile\":{}}\n");
        content.extend(lines_of(&batch("a", 2, 1)));
        let (rec, seen, after) = recover_bytes(&content);
        assert_eq!(after, content);
        assert_eq!(rec.foreign_lines, 1);
        assert_eq!(seqs(&seen, "a"), vec![(1, 2)]);
        assert_eq!(seqs(&seen, "z"), vec![(9, 9)]);
    }

    #[test]
    fn incomplete_batch_in_the_middle_is_kept_but_not_seen() {
        let first = lines_of(&batch("a", 1, 3));
        let nl = first.iter().position(|&b| b == b'\n').expect("nl") + 1;
        let mut content = first[..nl].to_vec();
        content.extend(lines_of(&batch("a", 2, 1)));
        let (rec, seen, after) = recover_bytes(&content);
        assert_eq!(after, content);
        assert_eq!(rec.broken_batches, 1);
        assert_eq!(seqs(&seen, "a"), vec![(2, 2)]);
    }

    #[test]
    fn empty_and_missing_files_recover_to_nothing() {
        let (rec, seen, after) = recover_bytes(b"");
        assert_eq!(rec, Recovery::default());
        assert!(seen.is_empty());
        assert!(after.is_empty());
        let torn = b"{\"agent_id\":\"a\",\"seq\":1,\"batch_len\":1,\"batch_in";
        let (rec, seen, after) = recover_bytes(torn);
        assert!(after.is_empty());
        assert!(seen.is_empty());
        assert_eq!(rec.truncated_bytes, torn.len() as u64);
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let _first = open(&path).expect("first open");
        match open(&path) {
            Err(StoreError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    /// The fast path and a full parse agree on every line the encoder writes.
    #[test]
    fn fast_key_parse_matches_full_parse() {
        let mut b = batch("ag\"ent,\"profile", 77, 3);
        b.profiles[2].payload = Bytes::from_static(b"{broken");
        let lines = lines_of(&b);
        let mut scratch = Vec::new();
        for line in lines.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let full: serde_json::Value = serde_json::from_slice(line).expect("json");
            let key = parse_key(line, &mut scratch).expect("key");
            assert_eq!(key.agent_id, full["agent_id"].as_str().expect("str"));
            assert_eq!(Some(key.seq), full["seq"].as_u64());
            assert_eq!(key.batch_len, full["batch_len"].as_u64());
            assert_eq!(key.batch_index, full["batch_index"].as_u64());
        }
    }

    fn submit(w: &mut Writer, batches: Vec<Batch>) -> Vec<(u64, Outcome)> {
        let mut rxs = Vec::new();
        let mut group: Vec<Submission> = batches
            .into_iter()
            .map(|b| {
                let (tx, rx) = oneshot::channel();
                rxs.push((b.seq, rx));
                Submission {
                    series: series(&b.agent_id, b.epoch),
                    agent_id: b.agent_id.clone(),
                    epoch: b.epoch,
                    seq: b.seq,
                    batch: encode_batch(&b, Vec::new()),
                    reply: tx,
                }
            })
            .collect();
        w.commit(&mut group);
        rxs.into_iter()
            .map(|(seq, mut rx)| (seq, rx.try_recv().expect("answered").outcome))
            .collect()
    }

    #[test]
    fn group_dedups_within_itself_and_against_the_past() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let (file, seen, rec) = open(&path).expect("open");
        let stats = Arc::new(Stats::default());
        let opts = WriterOptions {
            fail_first: 1,
            drop_before_ack: Some(3),
            ..WriterOptions::default()
        };
        let mut w = Writer::new(file, path.clone(), rec.len, seen, opts, stats.clone());
        let out = submit(
            &mut w,
            vec![batch("a", 1, 2), batch("a", 1, 2), batch("a", 2, 1)],
        );
        let retry = Outcome::Retry("fault injection: --fail-first 1".into());
        assert_eq!(
            out,
            vec![(1, retry), (1, Outcome::Stored), (2, Outcome::Stored)]
        );
        let out = submit(
            &mut w,
            vec![batch("a", 2, 1), batch("b", 1, 1), batch("b", 2, 1)],
        );
        assert_eq!(
            out,
            vec![
                (2, Outcome::Duplicate),
                (1, Outcome::DropBeforeAck),
                (2, Outcome::Stored)
            ]
        );
        let snap = stats.snapshot();
        assert_eq!((snap.batches_stored, snap.profiles_stored), (4, 5));
        assert_eq!((snap.duplicate_batches, snap.retried_batches), (1, 1));
        assert_eq!(snap.writes, 2, "one write per group");
        let content = std::fs::read(&path).expect("read");
        assert_eq!(content.iter().filter(|&&b| b == b'\n').count(), 5);
        assert_eq!(w.len, content.len() as u64);
    }

    /// `--reject-first` answers REJECTED after the `--fail-first` batches, stores nothing for
    /// them, and counts them in `rejected_batches_total` like every other rejection.
    #[test]
    fn reject_first_rejects_after_fail_first_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let (file, seen, rec) = open(&path).expect("open");
        let stats = Arc::new(Stats::default());
        let opts = WriterOptions {
            fail_first: 1,
            reject_first: 1,
            ..WriterOptions::default()
        };
        let mut w = Writer::new(file, path.clone(), rec.len, seen, opts, stats.clone());
        let out = submit(
            &mut w,
            vec![batch("a", 1, 2), batch("a", 2, 2), batch("a", 3, 2)],
        );
        assert_eq!(
            out,
            vec![
                (1, Outcome::Retry("fault injection: --fail-first 1".into())),
                (
                    2,
                    Outcome::Rejected("fault injection: --reject-first 1".into())
                ),
                (3, Outcome::Stored)
            ]
        );
        let snap = stats.snapshot();
        assert_eq!(
            (
                snap.retried_batches,
                snap.rejected_batches,
                snap.batches_stored
            ),
            (1, 1, 1)
        );
    }

    /// A writer on `path` with default options, after recovery (what recovery found too).
    fn writer(path: &Path) -> (Writer, Recovery) {
        let (file, seen, rec) = open(path).expect("open");
        let w = Writer::new(
            file,
            path.to_path_buf(),
            rec.len,
            seen,
            WriterOptions::default(),
            Arc::new(Stats::default()),
        );
        (w, rec)
    }

    /// The same agent id and seq under another epoch is new data (an agent that lost its seq
    /// state), and the series survive a restart of the listener.
    #[test]
    fn epochs_are_separate_series_also_after_recovery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let in_epoch = |epoch, seq| Batch {
            epoch,
            ..batch("a", seq, 1)
        };
        {
            let (mut w, _) = writer(&path);
            let out = submit(&mut w, vec![in_epoch(0, 1), in_epoch(7, 1), in_epoch(8, 1)]);
            assert_eq!(out, vec![(1, Outcome::Stored); 3]);
        }
        let (mut w, rec) = writer(&path);
        assert_eq!(rec.batches, 3);
        let out = submit(&mut w, vec![in_epoch(7, 1), in_epoch(9, 1), in_epoch(0, 1)]);
        assert_eq!(
            out,
            vec![
                (1, Outcome::Duplicate),
                (1, Outcome::Stored),
                (1, Outcome::Duplicate)
            ]
        );
    }

    /// An agent that leaves a gap after every seq cannot grow its dedup state past the bound
    /// (1024 ranges per series by default): a seq that would open one more range is answered
    /// RETRY, never DUPLICATE, and is stored once a gap fills. Seqs that extend or merge
    /// ranges, and true duplicates, are answered as usual.
    #[test]
    fn seq_gaps_beyond_the_bound_answer_retry_never_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = writer(&dir.path().join("out.jsonl"));
        let odd: Vec<Batch> = (0..1024).map(|k| batch("g", 2 * k + 1, 1)).collect();
        let out = submit(&mut w, odd);
        assert!(out.iter().all(|(_, o)| *o == Outcome::Stored));
        assert_eq!(w.seen["g"].range_count(), 1024);
        let out = submit(&mut w, vec![batch("g", 5000, 1)]);
        assert!(
            matches!(&out[0].1, Outcome::Retry(m) if m.contains("seq ranges")),
            "{out:?}"
        );
        assert!(!w.seen["g"].contains(5000));
        // Extends the last range (2047 -> 2048), merges two (2), a duplicate (1): all as usual.
        let out = submit(
            &mut w,
            vec![batch("g", 2048, 1), batch("g", 2, 1), batch("g", 1, 1)],
        );
        assert_eq!(
            out,
            vec![
                (2048, Outcome::Stored),
                (2, Outcome::Stored),
                (1, Outcome::Duplicate)
            ]
        );
        // Merging freed a range: the resend of 5000 is stored now.
        assert_eq!(
            submit(&mut w, vec![batch("g", 5000, 1)]),
            vec![(5000, Outcome::Stored)]
        );
        assert_eq!(w.stats.snapshot().dedup_full_batches, 1);
        let stored: u64 = 1024 + 3;
        assert_eq!(w.stats.snapshot().batches_stored, stored);
    }

    /// Agents beyond the bound (10 000 series by default) are answered RETRY, not DUPLICATE,
    /// and nothing of theirs is tracked; agents already known go on.
    #[test]
    fn agents_beyond_the_bound_answer_retry_never_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = writer(&dir.path().join("out.jsonl"));
        for chunk in (0..10_000).collect::<Vec<u32>>().chunks(1000) {
            let out = submit(
                &mut w,
                chunk
                    .iter()
                    .map(|i| batch(&format!("a{i}"), 1, 1))
                    .collect(),
            );
            assert!(out.iter().all(|(_, o)| *o == Outcome::Stored));
        }
        let out = submit(
            &mut w,
            vec![batch("new", 1, 1), batch("a7", 2, 1), batch("a7", 1, 1)],
        );
        assert!(
            matches!(&out[0].1, Outcome::Retry(m) if m.contains("agents")),
            "{out:?}"
        );
        assert_eq!(out[1..], [(2, Outcome::Stored), (1, Outcome::Duplicate)]);
        assert!(!w.seen.contains_key("new"));
        assert_eq!(w.seen.len(), 10_000);
    }

    /// A failed write answers RETRY and forgets the group's seqs, so the resend is stored.
    #[test]
    fn failed_write_rolls_back_the_group() {
        let dev_full = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        let stats = Arc::new(Stats::default());
        let mut seen = Seen::new();
        seen.entry("a".into()).or_default().insert(1);
        let mut w = Writer::new(
            dev_full,
            "/dev/full".into(),
            0,
            seen,
            WriterOptions::default(),
            stats.clone(),
        );
        let out = submit(
            &mut w,
            vec![batch("a", 1, 1), batch("a", 2, 1), batch("a", 2, 1)],
        );
        assert!(
            out.iter()
                .all(|(_, o)| matches!(o, Outcome::Retry(m) if m.contains("cannot store"))),
            "{out:?}"
        );
        assert!(
            w.seen["a"].contains(1),
            "stored before the failure: still seen"
        );
        assert!(!w.seen["a"].contains(2), "failed: forgotten");
        assert_eq!(stats.snapshot().write_errors, 1);
        assert_eq!(stats.snapshot().batches_stored, 0);
    }
}
