//! The kernel-vs-agent datagram check: datagrams the kernel accepted against datagrams the
//! agent took from the queue, and the alarm when some never arrived.
//!
//! The agent can receive datagrams the kernel never counted: queued before the programs
//! attached, sent by processes that are not PHP, or waiting in sockets adopted at a handover.
//! Those make kernel − agent negative for good, and compared since start that offset would hide
//! as many later losses. So the alarm compares kernel − agent with the lowest value it had over
//! a sliding window of polls (never above 0): an offset is absorbed as soon as it appears, and
//! a loss after it shows, for as long as the window still holds a poll from before the loss.

use std::collections::VecDeque;

/// Polls in a row with nothing moving and datagrams still unaccounted before alarming.
const SETTLE_POLLS: u32 = 3;
/// Polls the window holds (5 minutes at the default 1 s poll): how long a loss keeps showing
/// when nothing moves afterwards, and how long a past negative offset stays the base.
const WINDOW_POLLS: usize = 300;

/// The check's state between polls.
#[derive(Debug, Default)]
pub(super) struct Accounting {
    /// kernel − agent at each of the last `WINDOW_POLLS` polls, newest last.
    window: VecDeque<i64>,
    /// kernel − agent above the window's base at the last poll (what the alarm compares).
    excess: i64,
    prev_kernel_ok: u64,
    prev_agent: u64,
    settled: u32,
    alarm: bool,
    alarms_total: u64,
}

impl Accounting {
    /// Kernel-accepted datagrams vs what the agent took from the queue, both counted since the
    /// monitor started; `qcap`: the datagram queue's length (0: unknown).
    pub(super) fn update(&mut self, kernel_ok: u64, agent: u64, qcap: i64) {
        let diff = kernel_ok as i64 - agent as i64;
        if self.window.len() == WINDOW_POLLS {
            self.window.pop_front();
        }
        self.window.push_back(diff);
        // Datagrams the kernel did not count pull the base down; queued ones never push it up.
        let base = self.window.iter().copied().min().unwrap_or(0).min(0);
        let unaccounted = diff - base;
        self.excess = unaccounted;
        let moved = kernel_ok != self.prev_kernel_ok || agent != self.prev_agent;
        self.settled = if unaccounted > 0 && !moved {
            self.settled + 1
        } else {
            0
        };
        self.prev_kernel_ok = kernel_ok;
        self.prev_agent = agent;
        // The queue holds at most max_dgram_qlen + 1 datagrams: more cannot all be waiting.
        let over_queue = qcap > 0 && unaccounted > qcap + 1;
        let alarm = unaccounted > 0 && (over_queue || self.settled >= SETTLE_POLLS);
        if alarm && !self.alarm {
            self.alarms_total += 1;
            tracing::error!(
                unaccounted,
                since_start = diff,
                kernel_ok,
                agent_received = agent,
                queue_len = qcap,
                "the kernel accepted datagrams the agent never received: lost inside the agent, \
                 or ingest has stopped reading"
            );
        } else if !alarm && self.alarm {
            tracing::info!(unaccounted, "kernel and agent datagram counts agree again");
        }
        self.alarm = alarm;
    }

    /// Kernel minus agent above the lowest value of the window (`ebpf.unaccounted_window`):
    /// what the alarm compares.
    pub(super) fn excess(&self) -> i64 {
        self.excess
    }

    /// Kernel minus agent since the monitor started (`ebpf.unaccounted`).
    pub(super) fn unaccounted(&self) -> i64 {
        self.prev_kernel_ok as i64 - self.prev_agent as i64
    }

    pub(super) fn alarm(&self) -> bool {
        self.alarm
    }

    pub(super) fn alarms_total(&self) -> u64 {
        self.alarms_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QCAP: i64 = 10;

    /// Feeds (kernel_ok, agent) cumulative pairs; returns the alarm after each poll.
    fn run(a: &mut Accounting, series: &[(u64, u64)]) -> Vec<bool> {
        series
            .iter()
            .map(|&(k, g)| {
                a.update(k, g, QCAP);
                a.alarm()
            })
            .collect()
    }

    #[test]
    fn steady_traffic_with_a_queue_never_alarms() {
        let mut a = Accounting::default();
        // The agent trails the kernel by what is queued, up to the queue's length.
        let series: Vec<(u64, u64)> = (1..=20).map(|i| (i * 50, i * 50 - (i % 11))).collect();
        assert!(run(&mut a, &series).iter().all(|x| !x));
        assert_eq!(a.alarms_total(), 0);
    }

    #[test]
    fn a_loss_alarms_once_the_counts_settle() {
        let mut a = Accounting::default();
        let alarms = run(&mut a, &[(50, 50), (80, 75), (80, 75), (80, 75), (80, 75)]);
        assert_eq!(alarms, [false, false, false, false, true]);
        assert_eq!(a.unaccounted(), 5);
    }

    #[test]
    fn an_early_negative_offset_does_not_hide_a_later_loss() {
        let mut a = Accounting::default();
        // 100 datagrams queued before the programs attached (or adopted with the sockets at a
        // handover): the agent receives them, the kernel never counted them.
        let mut series = vec![(0, 100)];
        // Then a minute of traffic that arrives whole.
        series.extend((1..=60).map(|i| (i * 50, 100 + i * 50)));
        // Then 30 datagrams the kernel accepted and the agent never got; nothing else moves.
        series.extend([(3030, 3100); 4]);
        let alarms = run(&mut a, &series);
        assert!(alarms[..61].iter().all(|x| !x), "no alarm before the loss");
        assert!(
            alarms[61 + 3],
            "the loss alarms once the counts settle: {alarms:?}"
        );
        assert_eq!(a.alarms_total(), 1);
        // More than the queue can hold at once: alarms without waiting to settle.
        let mut b = Accounting::default();
        let mut series = vec![(0, 100)];
        series.extend((1..=60).map(|i| (i * 50, 100 + i * 50)));
        series.push((3050, 3120));
        assert_eq!(run(&mut b, &series).last(), Some(&true), "30 > queue + 1");
    }

    #[test]
    fn the_alarm_clears_when_the_agent_catches_up() {
        let mut a = Accounting::default();
        let alarms = run(&mut a, &[(10, 5), (10, 5), (10, 5), (10, 5), (10, 10)]);
        assert_eq!(alarms, [false, false, false, true, false]);
        assert_eq!(a.alarms_total(), 1);
    }
}
