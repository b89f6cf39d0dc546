//! The agent's scheduling niceness (`ingest.nice`, docs/agent.md "Priority").
//!
//! Linux keeps a niceness per thread and a new thread inherits its creator's, so the agent sets
//! every thread it has at start (before the runtime exists there is only the main one) and the
//! runtime's threads inherit it. A thread already at the wanted value is left alone without a
//! `setpriority(2)`: under systemd the unit's `Nice=` has set it, and the unit's seccomp filter
//! refuses `setpriority` (`SystemCallFilter=~@resources`).

use std::io;

/// What [`apply`] did.
#[derive(Debug)]
pub enum Outcome {
    /// Every thread already ran at the wanted niceness.
    Already(i32),
    /// Threads moved from `from` (the main thread's) to the wanted niceness.
    Set { from: i32, to: i32 },
    /// The kernel refused (no `CAP_SYS_NICE` to go below the inherited value, or a seccomp
    /// filter): the agent runs on at `current`.
    Refused {
        current: i32,
        wanted: i32,
        error: io::Error,
    },
}

impl Outcome {
    /// Logs the outcome: a refusal is a warning that says how to get the niceness, since it
    /// means ingest waits longer for a core under load.
    pub fn log(&self) {
        match self {
            Outcome::Already(n) => tracing::debug!(nice = n, "scheduling niceness as configured"),
            Outcome::Set { from, to } => {
                tracing::info!(from, to, "scheduling niceness set (ingest.nice)");
            }
            Outcome::Refused {
                current,
                wanted,
                error,
            } => tracing::warn!(
                nice = current,
                wanted,
                error = %error,
                "cannot set the scheduling niceness ingest.nice: running at the inherited one \
                 (needs CAP_SYS_NICE; under systemd, set Nice= in the unit to the same value)"
            ),
        }
    }
}

/// The niceness of thread `tid` (0: the calling thread).
fn get(tid: libc::id_t) -> io::Result<i32> {
    // getpriority(2) may return -1 as a value: errno tells it from a failure.
    // SAFETY: errno is thread-local; both calls take plain integers.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

fn set(tid: libc::id_t, nice: i32) -> io::Result<()> {
    // SAFETY: plain integers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The ids of this process's threads (just the caller's when /proc cannot be read).
fn threads() -> Vec<libc::id_t> {
    match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => vec![0],
    }
}

/// Sets every thread of the process to `wanted`. Call before the runtime starts, so that its
/// threads inherit the value.
pub fn apply(wanted: i32) -> Outcome {
    apply_to(&threads(), wanted)
}

/// Sets threads `tids` (0: the caller) to `wanted`, leaving those already there alone.
fn apply_to(tids: &[libc::id_t], wanted: i32) -> Outcome {
    let from = get(0).unwrap_or(0);
    let mut changed = false;
    for &tid in tids {
        match get(tid) {
            Ok(n) if n == wanted => continue,
            // A thread that ended meanwhile has nothing to set.
            Err(_) => continue,
            Ok(_) => {}
        }
        if let Err(error) = set(tid, wanted) {
            return Outcome::Refused {
                current: get(0).unwrap_or(from),
                wanted,
                error,
            };
        }
        changed = true;
    }
    if changed {
        Outcome::Set { from, to: wanted }
    } else {
        Outcome::Already(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a thread of its own, since the niceness is per thread; it only raises the value
    /// (lowering it needs CAP_SYS_NICE), so the harness's other threads are untouched.
    #[test]
    fn a_raise_is_applied_and_a_second_call_finds_it_done() {
        std::thread::spawn(|| {
            let before = get(0).unwrap();
            let wanted = (before + 1).min(19);
            let first = apply_to(&[0], wanted);
            assert!(
                matches!(first, Outcome::Set { from, to } if from == before && to == wanted)
                    || (before == 19 && matches!(first, Outcome::Already(19))),
                "{first:?}"
            );
            assert_eq!(get(0).unwrap(), wanted);
            let second = apply_to(&[0], wanted);
            assert!(
                matches!(second, Outcome::Already(n) if n == wanted),
                "{second:?}"
            );
        })
        .join()
        .unwrap();
    }
}
