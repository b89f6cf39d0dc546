//! The power-loss scenario of the VM tier (issue 11, item 8): the agent runs in a guest with its
//! spool and state on a virtio-blk disk (`cache=none`: no host page cache between the guest and
//! the image), `spool.mode = "always"`, `spool.fsync = "always"`, under a steady load; the host
//! SIGKILLs qemu at a seeded random moment, so the guest's page cache is lost as in a power cut,
//! and boots again on the same disk. Two cuts, then a final boot that drains the spool.
//!
//! - Everything runs in the guest: the reference listener (its output on the folder shared with
//!   the host, written with `--fsync`, so what it acked is on the host when qemu dies), the agent
//!   (spool and state on the disk, runtime dir on the guest's tmpfs), and one blocking
//!   PHP-like sender per boot with its own id prefix (`b<boot>-<n>`). One blocking sender on one
//!   datagram socket is received in send order, so "the first D profiles this process received"
//!   are the ids `b<boot>-0 .. b<boot>-(D-1)`.
//! - Every ~100 ms the guest appends `status --json` to `status-<boot>.jsonl` on the shared
//!   folder: the last line the host finds there after the kill is the last report made before
//!   the cut, and its `durable_profiles` is the claim checked.
//! - Boot 0 runs without the listener (the central listener is down: everything the agent
//!   claims durable must come back from the spool alone); boot 1 with a listener that acks
//!   each batch 300 ms late (batches in flight and an ack log being written at the cut).
//! - The final boot sends a last run, waits until the spool is empty and nothing is at risk,
//!   stops the agent with SIGTERM and records its exit status.
//!
//! `APM_POWERLOSS_SEED` replays a run (the seed picks the two cut moments); every run prints it.
//! `APM_POWERLOSS_FSYNC` (default `always`) sets `spool.fsync` of the guest's agent: `never` is
//! the negative control, to see the scenario fail when the spool's claims are not fsynced.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::vm::{Accel, KernelImage, Outcome, say, vng};

/// The name of the scenario in the tier's table and for `--only`.
pub const NAME: &str = "powerloss_cut_twice_then_drain";

/// Boots: two cut at random, the last drains.
const CUTS: usize = 2;
/// Profiles per second of the guest's sender (TCG is slow; each group is fsynced).
const RATE: u64 = 200;
/// Payload size of each profile.
const SIZE: usize = 300;
/// The final boot's sender: a run that must arrive whole after two cuts.
const FINAL_COUNT: u64 = 600;
/// `ingest.queue_len` and `ingest.recv_batch` of the guest's agent: a write-ahead group (what a
/// cut may lose, since only the group being committed is not yet on disk) holds fewer than
/// their sum.
const QUEUE_LEN: u64 = 128;
const RECV_BATCH: u64 = 32;
/// The cut lands this long after the sender started, uniformly (seeded).
const CUT_AFTER_MS: (u64, u64) = (2_500, 9_000);
/// Longest a boot may take to get its agent up (TCG: ~30-70 s of boot).
const READY_TIMEOUT: Duration = Duration::from_mins(4);
/// Longest the final boot may take in all.
const FINAL_TIMEOUT: Duration = Duration::from_mins(5);
const LISTEN: &str = "127.0.0.1:50551";

/// xorshift64: the cut moments only need to be replayable, not good.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn fsync_policy() -> Result<String> {
    let p = std::env::var("APM_POWERLOSS_FSYNC").unwrap_or_else(|_| "always".into());
    if !["always", "interval", "never"].contains(&p.as_str()) {
        bail!("APM_POWERLOSS_FSYNC={p}: expected always, interval or never");
    }
    Ok(p)
}

fn seed() -> Result<u64> {
    if let Ok(s) = std::env::var("APM_POWERLOSS_SEED") {
        return s
            .trim()
            .parse()
            .with_context(|| format!("APM_POWERLOSS_SEED={s}: expected an integer"));
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(u64::try_from(t.as_nanos() % u128::from(u64::MAX)).unwrap_or(1) | 1)
}

/// Runs the scenario on `k`; the outcome is the tier's table row, the string a one-line account.
pub fn run(
    root: &Path,
    dir: &Path,
    vng_bin: &Path,
    k: &KernelImage,
    accel: Accel,
) -> Result<(Outcome, String)> {
    let seed = seed()?;
    let fsync = fsync_policy()?;
    say(format!(
        "{NAME}: seed {seed} (replay with APM_POWERLOSS_SEED={seed}), spool.fsync = {fsync}"
    ));
    let out = dir.join("run").join("powerloss");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let img = out.join("spool.img");
    make_disk(&img)?;
    let bin = crate::target_dir(root).join("release");
    for b in ["apm-agent", "apm-listener", "apm-test-sender"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} is missing: build the release binaries first",
                bin.join(b).display()
            );
        }
    }
    let mut rng = Rng(seed);
    let mut cut_ms = Vec::new();
    for boot in 0..=CUTS {
        let last = boot == CUTS;
        let script = out.join(format!("guest-{boot}.sh"));
        std::fs::write(&script, guest_script(root, &out, &bin, boot, &fsync))?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut c = vng(vng_bin, k, accel, &out, "2G");
        // `=`: vng's argparse refuses a separate value that starts with a dash.
        c.arg(&script).arg(format!(
            "--qemu-opts=-drive file={},if=virtio,cache=none,format=raw",
            img.display()
        ));
        let console = out.join(format!("console-{boot}.log"));
        let f = std::fs::File::create(&console)?;
        c.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        say(format!(
            "{NAME}: boot {boot} of {} under {}",
            CUTS + 1,
            accel.describe()
        ));
        let t = Instant::now();
        let mut child = c.spawn().context("cannot start vng")?;
        let pgid = i32::try_from(child.id()).context("pid")?;
        let kill = || {
            // SAFETY: signalling the process group spawned above (vng, qemu and helpers).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        };
        let ready = out.join(format!("ready-{boot}"));
        let limit = if last { FINAL_TIMEOUT } else { READY_TIMEOUT };
        let mut exited = None;
        while !ready.is_file() && t.elapsed() < limit {
            if let Some(st) = child.try_wait()? {
                exited = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ready.is_file() {
            kill();
            let _ = child.wait();
            return Ok((
                Outcome::NoResult(format!(
                    "boot {boot}: the agent was not up after {:.0} s ({}; see {} and {})",
                    t.elapsed().as_secs_f64(),
                    exited.map_or_else(|| "killed".to_string(), |s| s.to_string()),
                    out.join(format!("guest-{boot}.log")).display(),
                    console.display()
                )),
                format!("seed {seed}"),
            ));
        }
        if last {
            while child.try_wait()?.is_none() && t.elapsed() < FINAL_TIMEOUT {
                std::thread::sleep(Duration::from_millis(200));
            }
            if child.try_wait()?.is_none() {
                kill();
            }
            let _ = child.wait();
        } else {
            let ms = CUT_AFTER_MS.0 + rng.below(CUT_AFTER_MS.1 - CUT_AFTER_MS.0);
            cut_ms.push(ms);
            std::thread::sleep(Duration::from_millis(ms));
            if let Some(st) = child.try_wait()? {
                bail!(
                    "boot {boot}: the guest ended ({st}) before the cut; see {}",
                    console.display()
                );
            }
            kill();
            let _ = child.wait();
            say(format!(
                "{NAME}: boot {boot}: qemu SIGKILLed {ms} ms after the sender started ({:.0} s after the boot began)",
                t.elapsed().as_secs_f64()
            ));
        }
    }
    let verdict = check(&out);
    let account = format!("seed {seed}, fsync {fsync}, cuts at {cut_ms:?} ms after load");
    match verdict {
        Ok(facts) => {
            let report = format!("{account}; {facts}");
            say(format!("{NAME}: pass: {report}"));
            let _ = std::fs::write(out.join("verdict.txt"), format!("pass: {report}\n"));
            Ok((Outcome::Pass, report))
        }
        Err(e) => {
            let report = format!("{account}; {e:#}");
            eprintln!("---- {NAME} ({}): FAILED: {report}", out.display());
            let _ = std::fs::write(out.join("verdict.txt"), format!("FAIL: {report}\n"));
            Ok((Outcome::Fail, report))
        }
    }
}

/// A fresh ext4 image: 64 MiB, of which the spool may use 32.
fn make_disk(img: &Path) -> Result<()> {
    let f =
        std::fs::File::create(img).with_context(|| format!("cannot create {}", img.display()))?;
    f.set_len(64 << 20)?;
    drop(f);
    crate::run_cmd(
        std::process::Command::new("mkfs.ext4")
            .args(["-F", "-q"])
            .arg(img),
    )
    .context("mkfs.ext4 (e2fsprogs) makes the guest's spool disk")
}

/// The guest's script for `boot`; a cut boot keeps reporting status until qemu is killed.
fn guest_script(root: &Path, out: &Path, bin: &Path, boot: usize, fsync: &str) -> String {
    let last = boot == CUTS;
    let mut s = String::from(
        "#!/bin/sh\n# Written by `cargo xtask test` (VM tier, power loss); runs inside the guest.\n",
    );
    let _ = writeln!(
        s,
        "out='{}'; b={boot}; bin='{}'",
        out.display(),
        bin.display()
    );
    s.push_str("exec >\"$out/guest-$b.log\" 2>&1\necho \"kernel $(uname -r) $(date +%T)\"\n");
    // The listener per boot: none (the central listener is down), slow acks, plain.
    let listen = match boot {
        0 => "none",
        1 => "--ack-delay 300",
        _ => "",
    };
    let _ = writeln!(s, "listen='{listen}'");
    // As in vm.rs's guest script: a checkout under the host's /tmp stays reachable under the tmpfs.
    s.push_str("keep=/dev/apm-host-tmp; mkdir -p \"$keep\" && mount --rbind /tmp \"$keep\"\n");
    s.push_str("mount -t tmpfs -o mode=1777,size=256M tmpfs /tmp || echo 'cannot mount /tmp'\n");
    let _ = writeln!(
        s,
        "for p in '{}' \"$out\"; do case \"$p\" in /tmp/*) mkdir -p \"$p\" && mount --rbind \"$keep/${{p#/tmp/}}\" \"$p\";; esac; done",
        root.display()
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let _ = writeln!(s, "export PATH='{path}' HOME=/tmp RUST_BACKTRACE=1");
    let _ = writeln!(
        s,
        r#"fail() {{ echo "$*"; echo "$*" >"$out/failed-$b"; exit 1; }}
ip link set lo up 2>/dev/null
modprobe virtio_blk 2>/dev/null; modprobe ext4 2>/dev/null
i=0; while [ ! -b /dev/vda ]; do i=$((i+1)); [ $i -gt 100 ] && fail "no /dev/vda"; sleep 0.1; done
mkdir -p /tmp/disk /tmp/apm/bin
# Exec from the tmpfs: the 9p root makes every `status` run slow under TCG.
cp "$bin/apm-agent" "$bin/apm-listener" "$bin/apm-test-sender" /tmp/apm/bin/ || fail "cannot copy the binaries"
bin=/tmp/apm/bin
# ext4 replays its journal here after a cut.
mount -t ext4 /dev/vda /tmp/disk || fail "cannot mount /dev/vda"
mkdir -p /tmp/disk/spool /tmp/disk/state
ls -ln /tmp/disk/spool >"$out/spool-before-$b.txt"
cat >/tmp/apm/agent.toml <<EOF
[ingest]
socket = "/tmp/apm/listener.sock"
stream_socket = "/tmp/apm/listener-stream.sock"
queue_len = {QUEUE_LEN}
recv_batch = {RECV_BATCH}
[batch]
max_age = "20ms"
max_items = 50
[central]
endpoint = "http://{LISTEN}"
backoff_max = "1s"
[breaker]
max_retry_timeout = "2s"
[spool]
dir = "/tmp/disk/spool"
mode = "always"
fsync = "{fsync}"
max_bytes = 33554432
segment_bytes = 65536
[ebpf]
enabled = "off"
[control]
runtime_dir = "/tmp/apm/run"
state_dir = "/tmp/disk/state"
pid_file = "/tmp/apm/run/agent.pid"
metrics_listen = ""
EOF
# nice: under TCG the status client otherwise waits behind the load for 1-3 s a report.
st() {{ nice -n -10 "$bin/apm-agent" --config /tmp/apm/agent.toml status --json >/tmp/apm/s.json 2>/dev/null; }}
if [ "$listen" != none ]; then
  "$bin/apm-listener" --listen {LISTEN} --out "$out/stored.jsonl" --fsync $listen >>"$out/listener.log" 2>&1 &
  listener=$!
fi
"$bin/apm-agent" --config /tmp/apm/agent.toml run >"$out/agent-$b.log" 2>&1 &
agent=$!
i=0; until st; do i=$((i+1)); [ $i -gt 600 ] && fail "agent not up"; kill -0 $agent || fail "agent exited at start"; sleep 0.1; done
tr -d '\n' </tmp/apm/s.json >"$out/status-start-$b.json"
ls -ln /tmp/disk/spool >"$out/spool-after-open-$b.txt""#
    );
    let count = if last { FINAL_COUNT } else { 10_000_000 };
    let _ = writeln!(
        s,
        "\"$bin/apm-test-sender\" --socket /tmp/apm/listener.sock --count {count} --prefix b$b --size {SIZE} --rate {RATE} >\"$out/sender-$b.json\" 2>&1 &\nsender=$!\necho \"ready $(date +%T)\" >\"$out/ready-$b\""
    );
    if last {
        s.push_str(
            r#"wait $sender; echo "sender: $?"
i=0
until st && jq -e '.spooled_batches == 0 and .at_risk_profiles == 0' /tmp/apm/s.json >/dev/null; do
  i=$((i+1)); [ $i -gt 1200 ] && fail "spool not drained after 120 s"
  kill -0 $agent || fail "agent died"
  sleep 0.1
done
tr -d '\n' </tmp/apm/s.json >"$out/status-final.json"
kill -TERM $agent; wait $agent; echo $? >"$out/agent-exit-$b"
kill -TERM $listener; wait $listener
umount /tmp/disk
echo "done $(date +%T)" >"$out/done"
"#,
        );
    } else {
        // Until the power goes: each line is a report made before the cut.
        s.push_str(
            r#"while :; do
  kill -0 $agent || { wait $agent; echo "agent died: $?" >"$out/agent-died-$b"; break; }
  if st; then { tr -d '\n' </tmp/apm/s.json; echo; } >>"$out/status-$b.jsonl"; fi
  sleep 0.1
done
sleep 3600
"#,
        );
    }
    s
}

fn read_json(p: &Path) -> Result<Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("missing {}", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("{} is not JSON", p.display()))
}

fn u(v: &Value, ptr: &str) -> Result<u64> {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .with_context(|| format!("status has no {ptr}"))
}

/// `seg-*.spool` sizes in an `ls -ln` listing, by name.
fn segments(p: &Path) -> BTreeMap<String, u64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.last()?;
            let size = f.get(4)?.parse().ok()?;
            (name.starts_with("seg-") && Path::new(name).extension().is_some_and(|e| e == "spool"))
                .then(|| ((*name).to_string(), size))
        })
        .collect()
}

/// The sender's payload for id `prefix-i` (apm-test-sender's `profile`).
fn profile_body(prefix: &str, i: u64) -> Value {
    let mut v = format!(r#"{{"id":"{prefix}-{i}","uri":"/t/{i}","status":200,"pad":""#);
    let pad = SIZE.saturating_sub(v.len() + 2);
    v.push_str(&"x".repeat(pad));
    v.push_str("\"}");
    serde_json::from_str(&v).unwrap_or(Value::Null)
}

/// The assertions, on what the listener stored (ground truth on the host) against the reports
/// the guest made before each cut. Returns the facts worth printing.
fn check(out: &Path) -> Result<String> {
    let mut problems = Vec::new();
    let mut facts = Vec::new();
    for b in 0..=CUTS {
        if let Ok(t) = std::fs::read_to_string(out.join(format!("failed-{b}"))) {
            problems.push(format!("boot {b}: {}", t.trim()));
        }
        if let Ok(t) = std::fs::read_to_string(out.join(format!("agent-died-{b}"))) {
            problems.push(format!("boot {b}: {}", t.trim()));
        }
    }
    if !out.join("done").is_file() {
        problems.push(format!(
            "the final boot did not finish (see {})",
            out.join(format!("guest-{CUTS}.log")).display()
        ));
    }
    // What the listener stored, per id.
    let stored = std::fs::read_to_string(out.join("stored.jsonl")).unwrap_or_default();
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    for l in stored.lines() {
        let v: Value = serde_json::from_str(l).context("a stored line is not JSON")?;
        let p = &v["profile"];
        let id = p["id"].as_str().context("a stored profile has no id")?;
        let (prefix, i) = id.rsplit_once('-').context("id")?;
        let i: u64 = i.parse().context("id")?;
        if !(prefix.starts_with('b') && *p == profile_body(prefix, i)) {
            problems.push(format!("stored {id} is not what was sent: {p}"));
        }
        *count.entry(id.to_string()).or_default() += 1;
    }
    let twice: Vec<&String> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| i)
        .collect();
    if !twice.is_empty() {
        problems.push(format!(
            "{} ids stored more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        ));
    }
    let stored_of = |b: usize| -> Vec<u64> {
        let mut v: Vec<u64> = count
            .keys()
            .filter_map(|id| id.strip_prefix(&format!("b{b}-")))
            .filter_map(|i| i.parse().ok())
            .collect();
        v.sort_unstable();
        v
    };
    for b in 0..CUTS {
        // The last report that reached the host before the cut.
        let lines =
            std::fs::read_to_string(out.join(format!("status-{b}.jsonl"))).unwrap_or_default();
        let reports: Vec<Value> = lines
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let Some(last) = reports.last() else {
            problems.push(format!("boot {b}: no status report before the cut"));
            continue;
        };
        let durable = u(last, "/durable_profiles")?;
        let received = u(last, "/received")?;
        let max_at_risk = reports
            .iter()
            .filter_map(|r| r.pointer("/at_risk_profiles").and_then(Value::as_u64))
            .max()
            .unwrap_or(0);
        if durable == 0 {
            problems.push(format!(
                "boot {b}: nothing reported durable before the cut (the check would be empty)"
            ));
        }
        let got = stored_of(b);
        let missing: Vec<u64> = (0..durable)
            .filter(|i| !count.contains_key(&format!("b{b}-{i}")))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "boot {b}: {} of the {durable} profiles reported durable before the cut were never stored, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        // Groups are committed one at a time, in order: the stored ids of a boot are 0..M, M
        // at least the durable count, and past it at most what was received since the report
        // plus the group being committed.
        let m = got.len() as u64;
        if got.iter().enumerate().any(|(n, i)| *i != n as u64) {
            problems.push(format!(
                "boot {b}: stored ids have gaps: {} stored, highest {:?}",
                got.len(),
                got.last()
            ));
        }
        // The recovering boot's view of the cut: what it found corrupt or torn.
        let start = read_json(&out.join(format!("status-start-{}.json", b + 1)))?;
        let corrupt = u(&start, "/dropped/spool_corrupt")?;
        let new_epoch = start
            .pointer("/epoch_started_now")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Only a record being written at the cut may be torn, and it held one group at most,
        // none of which had been reported durable (those were fsynced and must pass their
        // checksum: a failing one would be missing above).
        if corrupt >= QUEUE_LEN + RECV_BATCH {
            problems.push(format!(
                "boot {}: {corrupt} profiles dropped as spool_corrupt after the cut: more than one write-ahead group",
                b + 1
            ));
        }
        if new_epoch {
            problems.push(format!(
                "boot {}: the seq state did not survive the cut (a new epoch began)",
                b + 1
            ));
        }
        // On disk: recovery may cut the tail of the last segment (the record being appended at
        // the cut), never a byte of an earlier one.
        let before = segments(&out.join(format!("spool-before-{}.txt", b + 1)));
        let after = segments(&out.join(format!("spool-after-open-{}.txt", b + 1)));
        let last_seg = before.keys().next_back().cloned();
        let mut cut_bytes = 0;
        for (name, size) in &after {
            let Some(was) = before.get(name) else {
                continue;
            };
            if size > was {
                problems.push(format!(
                    "boot {}: {name} grew at open ({was} -> {size})",
                    b + 1
                ));
            } else if size < was {
                if Some(name) == last_seg.as_ref() {
                    cut_bytes = was - size;
                } else {
                    problems.push(format!(
                        "boot {}: recovery cut {name}, which is not the last segment ({was} -> {size} bytes)",
                        b + 1
                    ));
                }
            }
        }
        facts.push(format!(
            "cut {b}: {} reports, last: received {received}, durable {durable}; stored {m}; max at_risk {max_at_risk}; \
             after it: {} segments, tail cut {cut_bytes} bytes, spool_corrupt {corrupt}",
            reports.len(),
            before.len()
        ));
    }
    // The final boot's run arrives whole, and the agent stopped cleanly.
    match read_json(&out.join(format!("sender-{CUTS}.json"))) {
        Ok(s) => {
            let sent = u(&s, "/sent")?;
            let got = stored_of(CUTS);
            if sent != FINAL_COUNT || got.len() as u64 != sent {
                problems.push(format!(
                    "final boot: sent {sent} of {FINAL_COUNT} (eagain {}, errors {}), stored {}",
                    s["eagain"],
                    s["errors"],
                    got.len()
                ));
            }
        }
        Err(e) => problems.push(format!("final boot: {e:#}")),
    }
    match std::fs::read_to_string(out.join(format!("agent-exit-{CUTS}"))) {
        Ok(rc) if rc.trim() == "0" => {}
        Ok(rc) => problems.push(format!(
            "final boot: the agent exited {} on SIGTERM",
            rc.trim()
        )),
        Err(_) => problems.push("final boot: the agent's exit status is missing".into()),
    }
    if let Ok(f) = read_json(&out.join("status-final.json")) {
        facts.push(format!(
            "final: delivered {}, dropped {}",
            f["delivered"], f["dropped"]
        ));
    }
    if problems.is_empty() {
        Ok(facts.join("; "))
    } else {
        bail!("{} (facts: {})", problems.join("; "), facts.join("; "))
    }
}

/// Whether `--only` (empty: everything) selects the scenario.
pub fn selected(only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|o| NAME.contains(o.as_str()))
}

/// Whether `--only` selects nothing but the scenario: the tier then boots no other guest.
pub fn alone(only: &[String]) -> bool {
    !only.is_empty() && only.iter().all(|o| NAME.contains(o.as_str()))
}

/// The kernel series the scenario boots (one: three boots under TCG fit the tier's budget).
pub const SERIES: &str = "6.1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_the_scenario_by_substring() {
        assert!(selected(&[]) && !alone(&[]));
        let p = ["powerloss".to_string()];
        assert!(selected(&p) && alone(&p));
        let e = ["ebpf_sends".to_string()];
        assert!(!selected(&e) && !alone(&e));
        let both = ["powerloss".to_string(), "ebpf".to_string()];
        assert!(selected(&both) && !alone(&both));
    }

    #[test]
    fn segment_sizes_are_read_from_ls() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ls.txt");
        std::fs::write(
            &p,
            "total 44\n-rw-r--r-- 1 0 0  4980 Nov 30 14:09 acks.log\n\
             -rw-r--r-- 1 0 0 37963 Nov 30 14:09 seg-00000000000000000010.spool\n",
        )
        .unwrap();
        let s = segments(&p);
        assert_eq!(
            s.into_iter().collect::<Vec<_>>(),
            vec![("seg-00000000000000000010.spool".to_string(), 37963)]
        );
    }

    #[test]
    fn profile_body_matches_the_sender() {
        let v = profile_body("b1", 7);
        assert_eq!(v["id"], "b1-7");
        assert_eq!(serde_json::to_string(&v).unwrap().len(), SIZE);
    }
}
