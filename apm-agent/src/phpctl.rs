//! The two files `listener.php` reads on every request: the kill switch
//! (`<runtime_dir>/disabled`: present means "send nothing") and the sample rate
//! (`<runtime_dir>/sample-rate`: a decimal in 0.0..=1.0). Both are written atomically (write a
//! temporary file, rename over) so PHP never reads half a file.
//!
//! Several parties may want the kill switch up at once (an operator's `pause`, a full spool
//! while the breaker is open): it is up while any reason holds, and lowered when the last goes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    sample_rate: Mutex<f64>,
}

impl PhpControl {
    /// Starts with the kill switch down and the sample rate at 1.0, and writes both files so a
    /// stale `disabled` left by a crashed agent does not silence PHP forever.
    pub fn new(runtime_dir: &Path) -> std::io::Result<Self> {
        let me = Self {
            dir: runtime_dir.to_path_buf(),
            reasons: Mutex::new(BTreeSet::new()),
            sample_rate: Mutex::new(1.0),
        };
        me.write_kill_switch(&BTreeSet::new())?;
        me.set_sample_rate(1.0)?;
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

    pub fn sample_rate(&self) -> f64 {
        *self
            .sample_rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the sample rate PHP reads (clamped to 0.0..=1.0).
    pub fn set_sample_rate(&self, rate: f64) -> std::io::Result<()> {
        let rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let mut cur = self
            .sample_rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cur = rate;
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

    #[test]
    fn sample_rate_is_clamped_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = PhpControl::new(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.sample_rate_path()).unwrap(),
            "1.0000\n"
        );
        c.set_sample_rate(0.25).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.sample_rate_path()).unwrap(),
            "0.2500\n"
        );
        c.set_sample_rate(7.0).unwrap();
        assert_eq!(c.sample_rate(), 1.0);
        c.set_sample_rate(f64::NAN).unwrap();
        assert_eq!(c.sample_rate(), 1.0);
    }
}
