//! The memory guard: the agent watches its own RSS against `limits.max_memory_mb` and, while it
//! is over, sheds in this order (one step per check, each check a second apart):
//!
//! 1. **spill**: the router moves every batch waiting in memory to the disk spool, and freed heap
//!    is handed back to the kernel (`malloc_trim`);
//! 2. **sample**: the sample rate PHP reads is halved (at most down to 0.05), so less arrives;
//!    the eBPF controller raises it again gradually once pressure is gone;
//! 3. **restart**: still over after that: a graceful self-restart. Without systemd the agent
//!    re-executes itself with its sockets handed over (nothing is dropped, memory starts fresh);
//!    under systemd (sockets in its fd store) it exits with [`EXIT_MEMORY`] so `Restart=always`
//!    starts it again, and the fd store keeps the socket and its queue meanwhile.
//!
//! Back under the limit, the ladder starts again from the first step.

/// Exit code of a memory self-restart (EX_TEMPFAIL): distinct from a crash and from 78.
pub const EXIT_MEMORY: i32 = 75;

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

/// Caps glibc's malloc arenas at two. By default glibc gives each thread that allocates under
/// contention an arena of its own (up to 8 per core); payload buffers freed by another thread
/// than the one that allocated them can then sit in arenas that are rarely reused, and RSS grow
/// past what is live. Call before any thread starts.
pub fn tune_allocator() {
    // SAFETY: mallopt only sets a glibc tunable; no allocation is live in another thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
}
