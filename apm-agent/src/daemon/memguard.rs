//! The memory guard: the agent watches its own RSS against `limits.max_memory_mb` and, while it
//! is over, sheds in this order (one step per check, each check a second apart):
//!
//! 1. **spill**: the router moves every batch waiting in memory to the disk spool, and freed heap
//!    is handed back to the kernel (`malloc_trim`);
//! 2. **sample**: the guard asks the sample-rate controller for a ceiling of half the rate PHP
//!    reads (at most down to 0.05), so less arrives. It does not write the file itself: the
//!    controller ([`crate::phpctl::PhpControl::set_ceiling`]) is its one writer and honours
//!    the lower of the ceiling and its own rule. Back under the limit, the guard lifts its
//!    ceiling as the rule raises a rate: `RAISE_STEP` after every `RAISE_AFTER` checks in a row
//!    under the limit (with or without eBPF);
//! 3. **restart**: still over after that: a graceful self-restart. Without systemd the agent
//!    re-executes itself with its sockets handed over (nothing is dropped, memory starts fresh);
//!    under systemd (sockets in its fd store) it exits with [`EXIT_MEMORY`] so `Restart=always`
//!    starts it again, and the fd store keeps the socket and its queue meanwhile.
//!
//! Back under the limit, the ladder starts again from the first step.

/// Checks (seconds) between two returns of free heap to the kernel, over the limit or not.
const TRIM_EVERY: u64 = 30;

/// Exit code of a memory self-restart (EX_TEMPFAIL): distinct from a crash and from 78.
pub const EXIT_MEMORY: i32 = 75;

/// What the guard acts through: the router's spill flag, PHP's sample rate, and the RSS gauge.
pub struct Guard {
    pub telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    pub php: std::sync::Arc<crate::phpctl::PhpControl>,
    pub spill: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// `limits.max_memory_mb` in bytes.
    pub limit: u64,
}

impl Guard {
    /// Checks once a second until `stop`; returns `true` when it asks for a restart.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) -> bool {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut ladder = Ladder::default();
        let mut under = 0u32;
        let mut checks = 0u64;
        loop {
            tokio::select! { _ = tick.tick() => {}, () = stop.cancelled() => return false }
            checks += 1;
            // Heap a burst needed (a replayed outage, a saturated minute) goes back to glibc,
            // which keeps it: the hour-long soak (`cargo xtask bench --only soak`) ended with
            // RSS 10 MiB above its start after the outage had been caught up. Handing free pages
            // back every 30 s costs a walk of the one arena.
            if checks.is_multiple_of(TRIM_EVERY) {
                trim();
            }
            let rss = crate::telemetry::self_rss_bytes();
            self.telemetry.agent_rss_bytes.set(rss as i64);
            under = if rss <= self.limit { under + 1 } else { 0 };
            if let Some(c) = lifted_ceiling(self.php.ceiling(), under) {
                under = 0;
                match self.php.set_ceiling(c) {
                    Ok(rate) => tracing::info!(
                        ceiling = c,
                        sample_rate = rate,
                        "memory back under the limit: lifting the sample-rate ceiling"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot write the sample rate"),
                }
            }
            if self.act(
                self.telemetry.memory_guard(ladder.check(rss, self.limit)),
                rss,
            ) {
                return true;
            }
        }
    }

    /// Takes one step of the ladder; `true` for the last one (restart).
    fn act(&self, action: Action, rss: u64) -> bool {
        let (rss_mb, limit_mb) = (rss >> 20, self.limit >> 20);
        match action {
            Action::None => return false,
            Action::Spill => {
                tracing::warn!(
                    rss_mb,
                    limit_mb,
                    "memory over limits.max_memory_mb: spilling to the spool"
                );
                self.spill.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Action::LowerSampleRate => {
                let r = (self.php.sample_rate() / 2.0).max(0.05);
                tracing::warn!(
                    rss_mb,
                    ceiling = r,
                    "memory still over the limit: lowering the PHP sample rate"
                );
                if let Err(e) = self.php.set_ceiling(r) {
                    tracing::warn!(error = %e, "cannot write the sample rate");
                }
            }
            Action::Restart => {
                tracing::error!(
                    rss_mb,
                    limit_mb,
                    "memory still over the limit: graceful self-restart"
                );
                return true;
            }
        }
        trim();
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Spill,
    LowerSampleRate,
    Restart,
}

/// The shedding ladder as a pure state machine (tested without a process).
#[derive(Debug, Default)]
pub struct Ladder {
    step: u8,
}

impl Ladder {
    pub fn check(&mut self, rss: u64, limit: u64) -> Action {
        if rss <= limit {
            self.step = 0;
            return Action::None;
        }
        self.step = self.step.saturating_add(1);
        match self.step {
            1 => Action::Spill,
            2 => Action::LowerSampleRate,
            // One more check after lowering the rate: spilled memory may take a moment to go.
            3 => Action::None,
            _ => Action::Restart,
        }
    }
}

/// The guard's next ceiling after `under` checks in a row under the limit; `None` to leave it.
pub fn lifted_ceiling(ceiling: f64, under: u32) -> Option<f64> {
    use crate::monitor::sampling::{RAISE_AFTER, RAISE_STEP};
    (ceiling < 1.0 && under >= RAISE_AFTER).then(|| (ceiling + RAISE_STEP).min(1.0))
}

/// Puts every thread on glibc's one main malloc arena. By default glibc gives a thread that
/// allocates under contention an arena of its own (up to 8 per core). The pipeline's worker role
/// moves between OS threads (spool I/O runs under `block_in_place`), so each arena ends up with
/// its own high-water mark of payload buffers and of the 3.5 MiB zstd context tonic creates per
/// compressed message. `malloc_trim` returns free pages inside every arena but shrinks the top
/// of the main arena only: a second arena's top kept megabytes after a replayed outage (the
/// soak's RSS step). On one arena the guard's trim reaches all free memory, and the worker's
/// buffers are reused wherever they were freed. Measured with `xtask/scripts/flat-out-rss.sh
/// 16384` (peak RSS 55 -> 35 MiB, same rate) and `xtask/scripts/outage-rss.sh`
/// (docs/BENCHMARKS.md, "Soak"); contention is low, the pipeline runs on one worker thread.
/// Call before any thread starts.
pub fn tune_allocator() {
    // SAFETY: mallopt only sets a glibc tunable; no allocation is live in another thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives freed heap back to the kernel, so RSS reflects what is really in use.
pub fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_sheds_in_order_and_resets_below_the_limit() {
        let mut l = Ladder::default();
        assert_eq!(l.check(10, 100), Action::None);
        assert_eq!(l.check(200, 100), Action::Spill);
        assert_eq!(l.check(200, 100), Action::LowerSampleRate);
        assert_eq!(l.check(200, 100), Action::None);
        assert_eq!(l.check(200, 100), Action::Restart);
        assert_eq!(l.check(50, 100), Action::None);
        assert_eq!(
            l.check(200, 100),
            Action::Spill,
            "starts over once under the limit"
        );
    }

    #[test]
    fn the_ceiling_is_lifted_stepwise_once_under_the_limit() {
        assert_eq!(
            lifted_ceiling(1.0, 100),
            None,
            "no ceiling, nothing to lift"
        );
        assert_eq!(lifted_ceiling(0.25, 2), None);
        assert_eq!(lifted_ceiling(0.25, 3), Some(0.35));
        assert_eq!(lifted_ceiling(0.95, 3), Some(1.0));
    }
}
