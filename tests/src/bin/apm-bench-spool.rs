//! Spool throughput against the disk's own sequential speed, measured by the same program in
//! one run (used by `cargo xtask bench`). Prints one JSON object.
//!
//! apm-bench-spool DIR [TOTAL_MIB]
//!
//! - disk: 1 MiB `write`s of TOTAL_MIB then one `fdatasync` (what the device sustains), and a
//!   sequential read back after dropping the page cache;
//! - spool: the same volume as batch records of 1 MiB (a full batch at the default
//!   `batch.max_bytes`) and of 64 KiB, with the default fsync policy (`interval`) plus a final
//!   sync; then reopen (recovery reads and checks every record) and replay (take + ack every
//!   record) right after, as after a short outage: those two read from the page cache, so they
//!   are compared with nothing on the disk side;
//! - disk write again, after the spool runs.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use apm_agent::config::FsyncPolicy;
use apm_tests::spool_bench::bench_write_replay;

fn drop_caches() {
    // Needs root; without it the read figures are page-cache figures (reported as such).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn disk(dir: &Path, total: u64) -> (f64, f64) {
    let p = dir.join("disk-baseline.bin");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&p).expect("create baseline file");
    for _ in 0..(total >> 20) {
        f.write_all(&chunk).expect("write");
    }
    f.sync_data().expect("fdatasync");
    let w = t.elapsed().as_secs_f64();
    drop(f);
    drop_caches();
    let t = Instant::now();
    let mut f = std::fs::File::open(&p).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).expect("read") > 0 {}
    let r = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&p);
    let mb = (total >> 20) as f64;
    (mb / w, mb / r)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).expect("usage: apm-bench-spool DIR [TOTAL_MIB]"));
    let total: u64 = args.get(2).map_or(256, |v| v.parse().expect("TOTAL_MIB")) << 20;
    std::fs::create_dir_all(dir).expect("bench dir");
    let (disk_w, disk_r) = disk(dir, total);
    let mut rows = Vec::new();
    for record in [1usize << 20, 64 << 10] {
        let d = dir.join(format!("spool-{record}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("spool dir");
        let r = bench_write_replay(&d, total, record, FsyncPolicy::Interval).expect("spool bench");
        rows.push(serde_json::json!({
            "record_bytes": record, "records": r.records, "bytes": r.bytes,
            "write_mb_s": r.write_mb_s, "open_mb_s": r.open_mb_s, "replay_mb_s": r.replay_mb_s,
        }));
        let _ = std::fs::remove_dir_all(&d);
        drop_caches();
    }
    // Again after the spool runs: a VM disk's speed drifts, and one figure on each side of the
    // spool runs shows by how much.
    let (disk_w2, _) = disk(dir, total);
    println!(
        "{}",
        serde_json::json!({"disk_write_mb_s": disk_w, "disk_write_after_mb_s": disk_w2, "disk_read_mb_s": disk_r, "total_bytes": total, "spool": rows})
    );
}
