//! Spool throughput, for `cargo xtask bench` (a benchmark, not a test: nothing here asserts a
//! speed).

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

use apm_agent::config::{FsyncPolicy, SpoolConfig};
use apm_agent::pipeline::model::{Batch, Profile};
use apm_agent::pipeline::spool::{Spool, SpoolError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchResult {
    pub records: u64,
    /// Bytes on disk written (records with their headers).
    pub bytes: u64,
    /// Appending `records` batches, fsynced per `fsync`, plus a final fsync.
    pub write_mb_s: f64,
    /// Reopening: the recovery scan that checks every record's checksum.
    pub open_mb_s: f64,
    /// `take_next` + `ack` of every record (reads, checks and decodes each batch).
    pub replay_mb_s: f64,
}

/// Writes about `total_bytes` of batches of one `record_size`-byte profile each into a fresh
/// spool in `dir` (which should be empty), then reopens it and replays everything.
pub fn bench_write_replay(
    dir: &Path,
    total_bytes: u64,
    record_size: usize,
    fsync: FsyncPolicy,
) -> Result<BenchResult, SpoolError> {
    let cfg = SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: total_bytes + total_bytes / 8 + (4 << 20),
        fsync,
        ..SpoolConfig::default()
    };
    let mut payload = vec![b'x'; record_size.max(16)];
    payload[0] = b'{';
    let payload = Bytes::from(payload);
    let mut spool = Spool::open(&cfg)?;
    let start = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    while bytes < total_bytes {
        let batch = Batch {
            seq: records,
            epoch: 1,
            sealed_at: None,
            profiles: vec![Profile {
                payload: payload.clone(),
                received_ns: records,
                pid: 1,
                uid: 1,
                rss_bytes: 0,
            }],
        };
        bytes += spool.append(&batch)?.bytes;
        records += 1;
    }
    spool.sync();
    let write_s = start.elapsed().as_secs_f64();
    spool.close();

    let start = Instant::now();
    let mut spool = Spool::open(&cfg)?;
    let open_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    while let Some(b) = spool.take_next()? {
        spool.ack(b.id)?;
    }
    spool.sync();
    let replay_s = start.elapsed().as_secs_f64();
    spool.close();

    let mb = bytes as f64 / (1024.0 * 1024.0);
    Ok(BenchResult {
        records,
        bytes,
        write_mb_s: mb / write_s,
        open_mb_s: mb / open_s,
        replay_mb_s: mb / replay_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_runs() {
        let dir = tempfile::tempdir().unwrap();
        let r = bench_write_replay(dir.path(), 256 * 1024, 1000, FsyncPolicy::Never).unwrap();
        assert!(r.records > 200 && r.bytes >= 256 * 1024, "{r:?}");
        // Everything replayed and acked: the spool is empty afterwards.
        let cfg = SpoolConfig {
            dir: dir.path().to_path_buf(),
            ..SpoolConfig::default()
        };
        let mut s = Spool::open(&cfg).unwrap();
        assert!(s.take_next().unwrap().is_none());
    }
}
