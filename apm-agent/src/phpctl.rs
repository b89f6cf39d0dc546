//! The two files `listener.php` reads on every request: the kill switch
//! (`<runtime_dir>/disabled`: present means "send nothing") and the sample rate
//! (`<runtime_dir>/sample-rate`: a decimal in 0.0..=1.0). Both are written atomically (write a
//! temporary file, rename over) so PHP never reads half a file.
//!
//! Several parties may want the kill switch up at once (an operator's `pause`, a full spool
//! while the breaker is open): it is up while any reason holds, and lowered when the last goes.
//!
//! The sample rate has one writer, the [`Controller`] held here under the same lock as the
//! file: the eBPF rule feeds it intervals ([`PhpControl::sample_interval`]), the memory guard a
//! ceiling ([`PhpControl::set_ceiling`]); `sample_rate()` (status, `/metrics`, host stats) is
//! the last value the file took, never a value whose write failed.
//!
//! A final stop hands PHP back the defaults ([`PhpControl::release`]): a stopped agent must not
//! leave PHP paused or sampling low until it runs again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::monitor::sampling::{ControlParams, Controller, Decision, Interval};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KillReason {
    /// `apm-agent pause` by an operator.
    Paused,
    /// The breaker is open and the spool passed its high-water mark.
    SpoolHighWater,
    /// `spool.mode = "always"` and the write-ahead fails (volume full, I/O errors): what PHP
    /// sends now could only be held in memory, within its budget.
    SpoolError,
}

impl KillReason {
    pub const ALL: [KillReason; 3] = [Self::Paused, Self::SpoolHighWater, Self::SpoolError];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::SpoolHighWater => "spool_high_water",
            Self::SpoolError => "spool_error",
        }
    }
}

#[derive(Debug)]
pub struct PhpControl {
    dir: PathBuf,
    reasons: Mutex<BTreeSet<KillReason>>,
    rate: Mutex<Controller>,
    /// Set by [`PhpControl::release`]: the memory guard is not joined at shutdown, so a check
    /// running just then must not lower the rate again after the final reset.
    released: std::sync::atomic::AtomicBool,
}

/// What one interval did to the rate (for the caller's log).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateChange {
    pub decision: Decision,
    pub from: f64,
    pub to: f64,
}

impl PhpControl {
    /// Starts with the kill switch down and the sample rate at 1.0, and writes both files so a
    /// stale `disabled` left by a crashed agent does not silence PHP forever.
    pub fn new(runtime_dir: &Path) -> std::io::Result<Self> {
        let me = Self {
            dir: runtime_dir.to_path_buf(),
            reasons: Mutex::new(BTreeSet::new()),
            rate: Mutex::new(Controller::default()),
            released: std::sync::atomic::AtomicBool::new(false),
        };
        me.write_kill_switch(&BTreeSet::new())?;
        me.write_rate(1.0)?;
        Ok(me)
    }

    pub fn disabled_path(&self) -> PathBuf {
        self.dir.join("disabled")
    }

    pub fn sample_rate_path(&self) -> PathBuf {
        self.dir.join("sample-rate")
    }

    pub fn raise(&self, reason: KillReason) -> std::io::Result<()> {
        let mut r = self
            .reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.insert(reason) {
            tracing::warn!(reason = reason.as_str(), "PHP kill switch raised");
            self.write_kill_switch(&r)?;
        }
        Ok(())
    }

    pub fn lower(&self, reason: KillReason) -> std::io::Result<()> {
        let mut r = self
            .reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.remove(&reason) {
            tracing::info!(
                reason = reason.as_str(),
                remaining = r.len(),
                "PHP kill switch reason cleared"
            );
            self.write_kill_switch(&r)?;
        }
        Ok(())
    }

    pub fn kill_reasons(&self) -> Vec<&'static str> {
        let r = self
            .reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.iter().map(|k| k.as_str()).collect()
    }

    fn controller(&self) -> std::sync::MutexGuard<'_, Controller> {
        self.rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rate in `<runtime_dir>/sample-rate`: what PHP reads.
    pub fn sample_rate(&self) -> f64 {
        self.controller().written()
    }

    /// Seconds the file has said less than 1.0 since the agent started (a counter).
    pub fn below_one_seconds(&self) -> f64 {
        self.controller().below_one(Instant::now()).as_secs_f64()
    }

    /// Estimated requests not profiled because of sampling (see `sampling::unprofiled`).
    pub fn unprofiled_estimate(&self) -> f64 {
        self.controller().unprofiled()
    }

    /// One eBPF poll interval: accounted, and when `adaptive` run through the rule; the file
    /// follows. `None` when the rule did not run.
    pub fn sample_interval(
        &self,
        p: &ControlParams,
        iv: &Interval,
        adaptive: bool,
    ) -> std::io::Result<Option<RateChange>> {
        let mut c = self.controller();
        let from = c.written();
        let Some(decision) = c.interval(p, iv, adaptive) else {
            return Ok(None);
        };
        let to = self.apply(&mut c)?;
        Ok(Some(RateChange { decision, from, to }))
    }

    /// The memory guard's ceiling on the rate (1.0 lifts it); returns the rate now in the file.
    pub fn set_ceiling(&self, ceiling: f64) -> std::io::Result<f64> {
        let mut c = self.controller();
        c.set_ceiling(ceiling);
        self.apply(&mut c)
    }

    /// The memory guard's ceiling (1.0: none).
    pub fn ceiling(&self) -> f64 {
        self.controller().ceiling()
    }

    /// A final stop: kill switch down and rate 1.0, whatever held them, so PHP profiles again
    /// as if no agent had ever lowered anything. Not on a restart or handover: the next process
    /// starts from these defaults anyway ([`PhpControl::new`]).
    pub fn release(&self) -> std::io::Result<()> {
        let mut r = self
            .reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.clear();
        let kill = self.write_kill_switch(&r);
        let mut c = self.controller();
        self.released
            .store(true, std::sync::atomic::Ordering::Relaxed);
        c.reset();
        // Written even if the controller thinks the file says 1.0 already: this is the last
        // word, it must be on disk.
        let rate = self.write_rate(1.0);
        if rate.is_ok() {
            c.wrote(1.0, Instant::now());
        }
        kill.and(rate)
    }

    /// Writes what the controller wants if the file says otherwise; the rate now in the file.
    fn apply(&self, c: &mut Controller) -> std::io::Result<f64> {
        // The file holds 4 decimals: report exactly what it says (0.5 + 3 × 0.1 is
        // 0.7999999999999999 in f64, "0.8000" on disk).
        let want = (c.wanted() * 10_000.0).round() / 10_000.0;
        if want != c.written() && !self.released.load(std::sync::atomic::Ordering::Relaxed) {
            self.write_rate(want)?;
            c.wrote(want, Instant::now());
        }
        Ok(c.written())
    }

    fn write_rate(&self, rate: f64) -> std::io::Result<()> {
        write_atomic(&self.sample_rate_path(), format!("{rate:.4}\n").as_bytes())
    }

    fn write_kill_switch(&self, reasons: &BTreeSet<KillReason>) -> std::io::Result<()> {
        let path = self.disabled_path();
        if reasons.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let text: Vec<&str> = reasons.iter().map(|r| r.as_str()).collect();
            write_atomic(&path, format!("{}\n", text.join(",")).as_bytes())
        }
    }
}

/// Replaces a file PHP reads: world-readable, since PHP workers run as another user.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, data, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_switch_stays_up_while_any_reason_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disabled"), "stale").unwrap();
        let c = PhpControl::new(dir.path()).unwrap();
        assert!(
            !c.disabled_path().exists(),
            "a stale kill switch is cleared at start"
        );
        c.raise(KillReason::Paused).unwrap();
        c.raise(KillReason::SpoolHighWater).unwrap();
        c.lower(KillReason::Paused).unwrap();
        assert!(c.disabled_path().exists());
        assert_eq!(
            std::fs::read_to_string(c.disabled_path()).unwrap(),
            "spool_high_water\n"
        );
        c.lower(KillReason::SpoolHighWater).unwrap();
        assert!(!c.disabled_path().exists());
    }

    fn file_rate(c: &PhpControl) -> f64 {
        std::fs::read_to_string(c.sample_rate_path())
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn sample_rate_is_clamped_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = PhpControl::new(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.sample_rate_path()).unwrap(),
            "1.0000\n"
        );
        c.set_ceiling(0.25).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.sample_rate_path()).unwrap(),
            "0.2500\n"
        );
        c.set_ceiling(7.0).unwrap();
        assert_eq!(c.sample_rate(), 1.0);
        c.set_ceiling(0.5).unwrap();
        c.set_ceiling(f64::NAN).unwrap();
        assert_eq!(c.sample_rate(), 1.0);
        assert_eq!(file_rate(&c), 1.0);
    }

    const P: ControlParams = ControlParams {
        min_rate: 0.05,
        drop_ratio_high: 0.01,
        latency_high_ns: 1_000_000,
    };

    #[test]
    fn the_guard_ceiling_and_the_rule_write_one_file_and_status_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = PhpControl::new(dir.path()).unwrap();
        let drops = Interval {
            dgram_sends: 100,
            dgram_drops: 50,
            sends: 100,
            ..Default::default()
        };
        // The rule halves for drops: 0.5.
        let ch = c.sample_interval(&P, &drops, true).unwrap().unwrap();
        assert_eq!((ch.from, ch.to), (1.0, 0.5));
        assert_eq!((c.sample_rate(), file_rate(&c)), (0.5, 0.5));
        // The guard halves what PHP reads: 0.25, and a calm interval keeps it there.
        let r = (c.sample_rate() / 2.0).max(0.05);
        assert_eq!(c.set_ceiling(r).unwrap(), 0.25);
        for _ in 0..9 {
            c.sample_interval(&P, &Interval::default(), true).unwrap();
        }
        assert_eq!((c.sample_rate(), file_rate(&c)), (0.25, 0.25));
        // A write that fails is not reported as the rate: status stays with the file.
        std::fs::remove_file(c.sample_rate_path()).unwrap();
        std::fs::create_dir(c.sample_rate_path()).unwrap();
        std::fs::write(c.sample_rate_path().join("x"), "").unwrap();
        assert!(c.set_ceiling(1.0).is_err());
        assert_eq!(c.sample_rate(), 0.25);
        std::fs::remove_dir_all(c.sample_rate_path()).unwrap();
        // The ceiling was lifted meanwhile; the next interval writes what the rule wants.
        c.sample_interval(&P, &Interval::default(), true).unwrap();
        assert_eq!((c.sample_rate(), file_rate(&c)), (0.8, 0.8));
    }

    #[test]
    fn release_hands_php_back_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = PhpControl::new(dir.path()).unwrap();
        c.raise(KillReason::Paused).unwrap();
        c.raise(KillReason::SpoolHighWater).unwrap();
        c.set_ceiling(0.1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.release().unwrap();
        assert!(!c.disabled_path().exists());
        assert_eq!(file_rate(&c), 1.0);
        assert_eq!(c.sample_rate(), 1.0);
        assert!(c.kill_reasons().is_empty());
        assert!(c.below_one_seconds() >= 0.02, "the counter keeps its time");
        c.set_ceiling(0.1).unwrap();
        assert_eq!(
            file_rate(&c),
            1.0,
            "nothing lowers it after the final reset"
        );
    }
}
