//! The monitor task: polls the maps, consumes the ring buffer, publishes snapshots, runs the
//! sample-rate controller.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apm_common::{
    ConnKey, EXIT_HAD_RSS, ErrKind, EventHeader, EventKind, ExitEvent, HostSends, ProcSends,
    RSS_ANON, RSS_FILE, RSS_MEMBERS, RSS_SHMEM, RssEntry, RssEvent, SockKind,
};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::accounting::Accounting;
use super::loader::Maps;
use super::metrics::PoolStats;
use super::sampling::{self, ControlParams, Decision};
use super::{
    ErrnoCounts, EventCounts, Evicted, ExitStatus, ForeignSocket, IntervalStatus, MapHealth,
    RssTable, Shared, Snapshot, WorkerStatus, percentile_ns, procfs,
};
use crate::phpctl::PhpControl;
use crate::telemetry::{Socket, SocketLabels, Telemetry};

const RECENT_EXITS: usize = 64;
/// Distinct pool labels kept; more share the label `other` (bounded metric cardinality).
const MAX_POOLS: usize = 32;
/// A second exit event of one pid within this time is part of the first (see `merge_target`).
const EXIT_MERGE_NS: u64 = 1_000_000_000;

/// Stale `CONNS` entries of dead processes are swept every this many polls.
const CONN_SWEEP_EVERY: u64 = 10;

/// What /proc said about a process, once per (tgid, mm).
struct Baseline {
    mm_id: u32,
    members: Option<[u64; RSS_MEMBERS]>,
    pool: String,
    comm: String,
}

/// Send counters as the kernel keeps them: per live thread (`SENDS`) and, for threads that
/// exited while their process lives on, per process (`PROC_SENDS`).
#[derive(Default)]
struct KernelSends {
    /// Both summed by process.
    by_tgid: HashMap<u32, ProcSends>,
    /// By pid_tgid.
    threads: Vec<(u64, ProcSends)>,
    procs: HashMap<u32, ProcSends>,
}

impl KernelSends {
    /// From the entries as a map iteration yields them. The kernel restarts an iteration from
    /// the first bucket when the key it continues from was deleted meanwhile (a thread
    /// exiting during the poll), so a key can come twice: each is kept once (the later value,
    /// as fresh as any).
    fn from_entries(
        procs: impl Iterator<Item = (u32, ProcSends)>,
        threads: impl Iterator<Item = (u64, ProcSends)>,
    ) -> Self {
        let threads: HashMap<u64, ProcSends> = threads.collect();
        let mut ks = KernelSends {
            procs: procs.collect(),
            threads: threads.into_iter().collect(),
            ..KernelSends::default()
        };
        for (tgid, s) in &ks.procs {
            ks.by_tgid.entry(*tgid).or_insert(ProcSends::ZERO).add(s);
        }
        for (id, s) in &ks.threads {
            let tgid = (id >> 32) as u32;
            ks.by_tgid.entry(tgid).or_insert(ProcSends::ZERO).add(s);
        }
        ks
    }
}

/// What one poll found in the maps, process by process.
struct Census {
    /// Live PHP processes, highest RSS first.
    workers: Vec<WorkerStatus>,
    /// RSS by pid, for the ingest stamp.
    table: HashMap<u32, u64>,
    agent_rss: u64,
    seen_tgids: HashSet<u32>,
    dead: Vec<u32>,
}

pub(super) struct Poller {
    /// Keeps the programs attached for as long as the poller runs.
    _bpf: Ebpf,
    maps: Maps,
    shared: Arc<Shared>,
    rss_table: RssTable,
    telemetry: Arc<Telemetry>,
    php: Arc<PhpControl>,
    agent_tgid: u32,
    baselines: HashMap<u32, Baseline>,
    prev_host: [HostSends; 2],
    last_poll: Instant,
    polls: u64,
    // Kernel vs agent accounting.
    agent_base: u64,
    accounting: Accounting,
    // Sample-rate control.
    ctl_params: ControlParams,
    events: EventCounts,
    recent_exits: VecDeque<ExitStatus>,
    /// Sends of exited processes by pool, so per-pool counters never go down.
    retired: BTreeMap<String, [u64; 2]>,
    /// Kernel time of the latest exit event per pid, for a second event of the same exit.
    exit_ts: HashMap<u32, u64>,
    /// Send counters last reported per pool (`pool_stats`).
    pool_floor: BTreeMap<String, [u64; 2]>,
    /// PHP processes with their own socket at one of the agent's paths (`check_foreign`).
    foreign: Vec<ForeignSocket>,
    /// Entries of dead processes the sweeps removed, by map.
    evicted: Evicted,
    last: IntervalStatus,
    last_inputs: sampling::Interval,
}

pub(super) async fn run(
    mut p: Poller,
    mut events: AsyncFd<RingBuf<MapData>>,
    shutdown: CancellationToken,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                // Exit events first: a process whose entries the kernel removed is then in
                // the retired totals before the maps are read without it.
                drain_events(&mut p, events.get_mut());
                p.poll();
            }
            r = events.readable_mut() => match r {
                Ok(mut g) => {
                    let rb = g.get_inner_mut();
                    let mut n = 0;
                    while let Some(item) = rb.next() {
                        p.on_event(&item);
                        n += 1;
                    }
                    g.clear_ready();
                    if n > 0 {
                        p.publish_events();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "eBPF event ring buffer failed; events stop");
                    // Keep polling the maps: counts and RSS do not depend on events.
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            _ = tick.tick() => p.poll(),
                        }
                    }
                    break;
                }
            },
        }
    }
    // Final figures for status after shutdown; dropping the Ebpf detaches every program.
    drain_events(&mut p, events.get_mut());
    p.poll();
    tracing::info!("eBPF monitor detached");
}

/// Reads every event waiting in the ring buffer.
fn drain_events(p: &mut Poller, rb: &mut RingBuf<MapData>) {
    while let Some(item) = rb.next() {
        p.on_event(&item);
    }
}

impl Poller {
    pub(super) fn new(
        (bpf, maps): (Ebpf, Maps),
        shared: Arc<Shared>,
        rss_table: RssTable,
        telemetry: Arc<Telemetry>,
        php: Arc<PhpControl>,
        agent_tgid: u32,
    ) -> Self {
        let cfg = &shared.cfg;
        let ctl_params = ControlParams {
            min_rate: cfg.min_sample_rate,
            drop_ratio_high: cfg.drop_ratio_high,
            latency_high_ns: u64::try_from(cfg.latency_high.as_nanos()).unwrap_or(u64::MAX),
        };
        let agent_base = agent_count(&telemetry);
        Self {
            _bpf: bpf,
            maps,
            shared,
            rss_table,
            telemetry,
            php,
            agent_tgid,
            baselines: HashMap::new(),
            prev_host: [HostSends::ZERO; 2],
            last_poll: Instant::now(),
            polls: 0,
            agent_base,
            accounting: Accounting::default(),
            ctl_params,
            events: EventCounts::default(),
            recent_exits: VecDeque::new(),
            retired: BTreeMap::new(),
            exit_ts: HashMap::new(),
            pool_floor: BTreeMap::new(),
            foreign: Vec::new(),
            evicted: Evicted::default(),
            last: IntervalStatus::default(),
            last_inputs: sampling::Interval::default(),
        }
    }

    fn read_host(&self) -> [HostSends; 2] {
        let mut out = [HostSends::ZERO; 2];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(vals) = self.maps.host_sends.get(&(i as u32), 0) {
                for v in vals.iter() {
                    slot.add(v);
                }
            }
        }
        out
    }

    /// The per-CPU `HEALTH` counters, summed.
    fn read_health(&self) -> [u64; apm_common::HEALTH_COUNTERS] {
        let mut out = [0u64; apm_common::HEALTH_COUNTERS];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(vals) = self.maps.health.get(&(i as u32), 0) {
                *slot = vals.iter().sum();
            }
        }
        out
    }

    fn read_rss(&self) -> Vec<(u32, RssEntry)> {
        // Entries can vanish mid-iteration (exit): skip those errors. A restarted iteration
        // yields keys twice (see `KernelSends::from_entries`): one process, one worker.
        let unique: HashMap<u32, RssEntry> = self.maps.rss.iter().filter_map(Result::ok).collect();
        unique.into_iter().collect()
    }

    fn read_sends(&self) -> KernelSends {
        KernelSends::from_entries(
            self.maps.proc_sends.iter().filter_map(Result::ok),
            self.maps
                .sends
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.sends)),
        )
    }

    /// RSS as /proc counts it: kernel-reported members, and /proc's value for members without
    /// an event since tracking started (unchanged since, so /proc is exact for them).
    fn completed_rss(&mut self, tgid: u32, e: &RssEntry) -> u64 {
        let resident = [RSS_FILE, RSS_ANON, RSS_SHMEM];
        let b = self.baseline(tgid, e.mm_id, Some(&e.comm));
        if resident.iter().all(|&m| e.seen & (1 << m) != 0) {
            return e.rss();
        }
        if b.members.is_none() {
            b.members = procfs::rss_members(tgid);
        }
        let base = b.members.unwrap_or([0; RSS_MEMBERS]);
        resident
            .iter()
            .map(|&m| {
                if e.seen & (1 << m) != 0 {
                    e.member[m]
                } else {
                    base[m]
                }
            })
            .sum()
    }

    fn baseline(&mut self, tgid: u32, mm_id: u32, comm: Option<&[u8; 16]>) -> &mut Baseline {
        let stale = self.baselines.get(&tgid).is_none_or(|b| b.mm_id != mm_id);
        if stale {
            let comm = match comm {
                Some(c) if c[0] != 0 => procfs::comm_str(c),
                _ => procfs::comm_of(tgid),
            };
            let pool = procfs::pool_of(tgid, &comm);
            self.baselines.insert(
                tgid,
                Baseline {
                    mm_id,
                    members: None,
                    pool,
                    comm,
                },
            );
        }
        self.baselines.get_mut(&tgid).expect("inserted above")
    }

    pub(super) fn poll(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_poll);
        self.last_poll = now;
        self.polls += 1;

        // The agent's count first, then the kernel's: a datagram is counted by the kernel
        // before the agent can receive it, so read in this order the difference is never
        // negative because of the reading itself.
        let agent = agent_count(&self.telemetry).saturating_sub(self.agent_base);
        let host = self.read_host();
        // Beside the host counts: a status that shows a refusal shows the sends before it.
        let health = self.read_health();
        let rss = self.read_rss();
        let ks = self.read_sends();
        let sends = &ks.by_tgid;

        let Census {
            workers,
            table,
            agent_rss,
            seen_tgids,
            dead,
        } = self.census(&rss, sends);
        self.rss_table.store(table);
        self.sweep(&dead, &rss, &ks);
        if self.polls.is_multiple_of(CONN_SWEEP_EVERY) {
            self.sweep_conns();
        }
        if self.polls == 1 || self.polls.is_multiple_of(CONN_SWEEP_EVERY) {
            self.check_foreign();
        }
        self.baselines
            .retain(|t, _| seen_tgids.contains(t) || sends.contains_key(t));

        let (php_workers, php_rss) = workers
            .iter()
            .filter(|w| w.pool != "master")
            .fold((0u32, 0u64), |(n, r), w| (n + 1, r + w.rss_bytes));
        let pools = pool_stats(&workers, &self.retired, &mut self.pool_floor);

        let qcap = self.telemetry.dgram_queue_len.get();
        self.accounting
            .update(host[SockKind::Dgram as usize].c.ok, agent, qcap);
        (self.last, self.last_inputs) = self.interval(&host, dt);
        self.control();
        self.prev_host = host;

        let snap = Snapshot {
            host,
            workers,
            php_workers,
            php_rss,
            agent_rss,
            pools,
            unaccounted: self.accounting.unaccounted(),
            unaccounted_window: self.accounting.excess(),
            alarm: self.accounting.alarm(),
            alarms_total: self.accounting.alarms_total(),
            last: self.last,
            events: self.events,
            health: MapHealth::new(&health, self.evicted),
            foreign: self.foreign.clone(),
            recent_exits: self.recent_exits.iter().cloned().collect(),
            polls: self.polls,
        };
        self.shared.snap.store(Arc::new(snap));
    }

    /// Every process the maps know: its RSS (completed from /proc where the kernel has not
    /// reported a member yet) and its sends; the dead ones apart, for the sweep.
    fn census(&mut self, rss: &[(u32, RssEntry)], sends: &HashMap<u32, ProcSends>) -> Census {
        let mut table = HashMap::with_capacity(rss.len());
        let mut workers: Vec<WorkerStatus> = Vec::with_capacity(rss.len().max(sends.len()));
        let mut agent_rss = 0;
        let mut seen_tgids: HashSet<u32> = HashSet::with_capacity(rss.len());
        let mut dead: Vec<u32> = Vec::new();
        for (tgid, e) in rss {
            seen_tgids.insert(*tgid);
            let r = self.completed_rss(*tgid, e);
            table.insert(*tgid, r);
            if *tgid == self.agent_tgid {
                agent_rss = r;
                continue;
            }
            if !procfs::alive(*tgid) {
                dead.push(*tgid);
                continue;
            }
            let b = self.baseline(*tgid, e.mm_id, Some(&e.comm));
            let mut w = WorkerStatus {
                pid: *tgid,
                comm: b.comm.clone(),
                pool: b.pool.clone(),
                rss_bytes: r,
                peak_rss_bytes: e.peak.max(r),
                over_threshold: e.over != 0,
                ..WorkerStatus::default()
            };
            if let Some(s) = sends.get(tgid) {
                fill_sends(&mut w, s);
            }
            workers.push(w);
        }
        for (tgid, s) in sends {
            if seen_tgids.contains(tgid) || *tgid == self.agent_tgid {
                continue;
            }
            if !procfs::alive(*tgid) {
                dead.push(*tgid);
                continue;
            }
            let b = self.baseline(*tgid, 0, None);
            let mut w = WorkerStatus {
                pid: *tgid,
                comm: b.comm.clone(),
                pool: b.pool.clone(),
                ..WorkerStatus::default()
            };
            fill_sends(&mut w, s);
            workers.push(w);
        }
        workers.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.pid.cmp(&b.pid)));
        Census {
            workers,
            table,
            agent_rss,
            seen_tgids,
            dead,
        }
    }

    fn interval(
        &self,
        host: &[HostSends; 2],
        dt: Duration,
    ) -> (IntervalStatus, sampling::Interval) {
        let d = |k: SockKind| host[k as usize].c.delta(&self.prev_host[k as usize].c);
        let (dg, st) = (d(SockKind::Dgram), d(SockKind::Stream));
        let mut hist = [0u64; apm_common::LAT_BUCKETS];
        for (now, prev) in host.iter().zip(self.prev_host.iter()) {
            for (b, h) in hist.iter_mut().enumerate() {
                *h += now.hist[b].wrapping_sub(prev.hist[b]);
            }
        }
        let status = IntervalStatus {
            interval_ms: dt.as_millis() as u64,
            sends: dg.attempts() + st.attempts(),
            drops: super::drops_of(&dg, &st),
            stream_eagain: st.err[ErrKind::Eagain as usize],
            stream_wait_ns: st.blocked_ns + st.lat_ns_sum,
            p99_ns: percentile_ns(&hist, 0.99),
            stream_queue_drops: st.connect_eagain + st.abandoned,
        };
        let inputs = sampling::Interval {
            dgram_sends: dg.attempts(),
            // Queue full: the drops sampling less can cure (not EMSGSIZE, not a missing agent).
            dgram_drops: dg.err[ErrKind::Eagain as usize] + dg.err[ErrKind::Enobufs as usize],
            sends: status.sends,
            p99_floor_ns: super::percentile_floor_ns(&hist, 0.99),
            stream_ok: st.ok,
            stream_wait_ns: status.stream_wait_ns,
            // Connects and sends (a frame may take several), as the drops' denominator.
            stream_sends: st.attempts(),
            // A full backlog, a frame given up after `stream_wait_ms`: the agent is not keeping
            // up, which sampling less cures (as a full datagram queue).
            stream_drops: status.stream_queue_drops,
        };
        (status, inputs)
    }

    /// Hands the interval to the rate controller (which owns the file; the memory guard's
    /// ceiling is applied there too). Accounted even with adaptive sampling off: the rate may
    /// still be lowered by the memory guard.
    fn control(&mut self) {
        let iv = self.last_inputs;
        let adaptive = self.shared.cfg.adaptive_sampling;
        match self.php.sample_interval(&self.ctl_params, &iv, adaptive) {
            Ok(Some(ch)) if ch.to < ch.from => {
                let why = match ch.decision {
                    Decision::Lower(why) => why.as_str(),
                    Decision::Raise | Decision::Steady => "ceiling",
                };
                tracing::warn!(
                    from = ch.from,
                    to = ch.to,
                    why,
                    drops = iv.dgram_drops,
                    sends = iv.dgram_sends,
                    stream_drops = iv.stream_drops,
                    stream_sends = iv.stream_sends,
                    p99_floor_ns = iv.p99_floor_ns,
                    "lowering the PHP sample rate"
                );
            }
            Ok(Some(ch)) if ch.to > ch.from => {
                tracing::info!(from = ch.from, to = ch.to, "raising the PHP sample rate");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, path = %self.php.sample_rate_path().display(),
                    "cannot write the sample rate");
            }
        }
    }

    /// Retires processes that are gone but still in the maps (their exit event was lost: ring
    /// buffer full, or a sibling thread that folded after it) so their counts move to the
    /// retired totals once.
    ///
    /// Only entries removed here are counted (a dead process's counters no longer change):
    /// whatever the kernel's exit handler removed first is in its event.
    fn sweep(&mut self, dead: &[u32], rss: &[(u32, RssEntry)], ks: &KernelSends) {
        for &tgid in dead {
            let mut removed = false;
            let mut sends: Option<ProcSends> = None;
            if self.maps.rss.remove(&tgid).is_ok() {
                // Its MM_OWNER entry goes with the periodic sweep (`sweep_conns`).
                removed = true;
                self.evicted.rss += 1;
            }
            if self.maps.proc_sends.remove(&tgid).is_ok() {
                removed = true;
                self.evicted.proc_sends += 1;
                if let Some(s) = ks.procs.get(&tgid) {
                    sends.get_or_insert(ProcSends::ZERO).add(s);
                }
            }
            for (id, s) in ks
                .threads
                .iter()
                .filter(|(id, _)| (id >> 32) as u32 == tgid)
            {
                if self.maps.sends.remove(id).is_ok() {
                    removed = true;
                    self.evicted.sends += 1;
                    sends.get_or_insert(ProcSends::ZERO).add(s);
                }
            }
            // Not removed by us: the kernel's exit handler got there first and its event is
            // on its way.
            if !removed {
                continue;
            }
            let e = rss.iter().find(|(t, _)| *t == tgid).map(|(_, e)| *e);
            let b = self.baselines.remove(&tgid);
            let comm = e
                .map(|e| procfs::comm_str(&e.comm))
                .or_else(|| b.as_ref().map(|b| b.comm.clone()))
                .unwrap_or_default();
            let pool = b.map_or_else(|| comm.clone(), |b| b.pool);
            let st = exit_status(tgid, comm, pool, e.as_ref(), sends.as_ref(), true);
            self.events.swept_exits += 1;
            tracing::debug!(
                pid = tgid,
                "retired an exited process whose exit event was lost"
            );
            self.retire(st, None);
        }
    }

    /// Connected fds and mm owners of processes that are gone. The maps do not evict, and the
    /// kernel removes these only on close and at an exit it saw with room for its event.
    fn sweep_conns(&mut self) {
        let m = &mut self.maps.conns;
        let stale: Vec<ConnKey> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !procfs::alive(k.tgid))
            .collect();
        for k in stale {
            if m.remove(&k).is_ok() {
                self.evicted.conns += 1;
            }
        }
        let m = &mut self.maps.mm_owner;
        let stale: Vec<u32> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, tgid)| !procfs::alive(*tgid))
            .map(|(mm_id, _)| mm_id)
            .collect();
        for k in stale {
            if m.remove(&k).is_ok() {
                self.evicted.mm_owner += 1;
            }
        }
    }

    /// PHP processes that see their own socket at one of the agent's paths (another mount
    /// namespace): the programs cannot tell their sends there from sends to the agent, so
    /// they are listed in status and each is warned about once.
    fn check_foreign(&mut self) {
        let paths = [self.shared.dgram.clone(), self.shared.stream.clone()];
        let mut found = Vec::new();
        for pid in procfs::pids_with_comm(&self.shared.cfg.php_comms) {
            for p in &paths {
                if procfs::sees_other_file_at(pid, p) {
                    found.push(ForeignSocket {
                        pid,
                        path: p.display().to_string(),
                    });
                }
            }
        }
        for f in &found {
            if !self.foreign.contains(f) {
                tracing::warn!(
                    pid = f.pid,
                    path = %f.path,
                    "a PHP process in another mount namespace has its own socket at the agent's \
                     path: its sends there are counted as sends to the agent (the eBPF programs \
                     recognise the socket by its path only)"
                );
            }
        }
        self.foreign = found;
    }

    /// Records an exit; `ts_ns`: the kernel's exit event time (`None`: retired by the sweep).
    fn retire(&mut self, st: ExitStatus, ts_ns: Option<u64>) {
        let key = bounded_retired(&self.retired, &st.pool);
        let r = self.retired.entry(key).or_default();
        r[0] += st.sends_ok;
        r[1] += st.sends_failed.total();
        if let Some(prev) = self.merge_target(&st, ts_ns) {
            prev.sends_ok += st.sends_ok;
            prev.sends_failed.add(&st.sends_failed);
            prev.bytes += st.bytes;
            prev.drops += st.drops;
            prev.peak_rss_bytes = prev.peak_rss_bytes.max(st.peak_rss_bytes);
            prev.last_rss_bytes = prev.last_rss_bytes.max(st.last_rss_bytes);
            return;
        }
        if self.recent_exits.len() == RECENT_EXITS {
            self.recent_exits.pop_front();
        }
        self.recent_exits.push_back(st);
    }

    /// The exit already reported for pid `st.pid` that `st` is part of, if the kernel reported
    /// it less than a second before (`ts_ns`). Kernels without the tracepoint's `group_dead`
    /// recognise the last thread by `signal->live == 0`, which threads exiting together
    /// (exit_group) may all see: each then reports what it removed (nothing twice), and the
    /// parts make one exit here.
    fn merge_target(&mut self, st: &ExitStatus, ts_ns: Option<u64>) -> Option<&mut ExitStatus> {
        let ts = ts_ns?;
        self.exit_ts
            .retain(|_, t| ts.saturating_sub(*t) < EXIT_MERGE_NS);
        // An earlier exit event of this pid within the window, or none to merge with.
        self.exit_ts.insert(st.pid, ts)?;
        self.recent_exits
            .iter_mut()
            .rev()
            .find(|e| e.pid == st.pid && !e.swept)
    }

    pub(super) fn on_event(&mut self, data: &[u8]) {
        if data.len() < size_of::<EventHeader>() {
            return;
        }
        // SAFETY: length checked; EventHeader is plain integers (any bytes are valid).
        let hdr: EventHeader = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        match EventKind::from_u32(hdr.kind) {
            Some(EventKind::WorkerExit) if data.len() >= size_of::<ExitEvent>() => {
                // SAFETY: as above.
                let ev: ExitEvent = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                self.on_exit(&ev);
            }
            Some(EventKind::RssOverThreshold) if data.len() >= size_of::<RssEvent>() => {
                // SAFETY: as above.
                let ev: RssEvent = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                self.events.rss_over_threshold += 1;
                tracing::warn!(
                    pid = ev.hdr.tgid,
                    comm = %procfs::comm_str(&ev.comm),
                    rss_mb = ev.rss_bytes / (1024 * 1024),
                    threshold_mb = ev.threshold_bytes / (1024 * 1024),
                    "PHP process over the RSS threshold"
                );
            }
            Some(EventKind::DropBurst) if data.len() >= size_of::<apm_common::DropEvent>() => {
                // SAFETY: as above.
                let ev: apm_common::DropEvent =
                    unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                self.events.drop_bursts += 1;
                tracing::warn!(
                    pid = ev.hdr.tgid,
                    comm = %procfs::comm_str(&ev.comm),
                    drops_total = ev.drops_total,
                    "PHP process started dropping profiles (the agent's datagram queue is full)"
                );
            }
            _ => tracing::debug!(kind = hdr.kind, len = data.len(), "unknown eBPF event"),
        }
    }

    fn on_exit(&mut self, ev: &ExitEvent) {
        let tgid = ev.hdr.tgid;
        self.events.worker_exits += 1;
        let comm = procfs::comm_str(&ev.comm);
        let pool = self
            .baselines
            .remove(&tgid)
            .map_or_else(|| comm.clone(), |b| b.pool);
        let mut sends = ProcSends::ZERO;
        sends.sock = ev.sends;
        let rss = (ev.had & EXIT_HAD_RSS != 0).then_some(RssEntry {
            member: [0; RSS_MEMBERS],
            peak: ev.peak_rss,
            mm_id: 0,
            seen: ev.rss_seen,
            over: 0,
            _pad: 0,
            comm: ev.comm,
        });
        let mut st = exit_status(tgid, comm, pool, rss.as_ref(), Some(&sends), false);
        st.last_rss_bytes = ev.last_rss;
        tracing::info!(
            pid = tgid,
            comm = %st.comm,
            pool = %st.pool,
            peak_rss_bytes = st.peak_rss_bytes,
            sends_ok = st.sends_ok,
            sends_failed = st.sends_failed.total(),
            "PHP process exited"
        );
        self.retire(st, Some(ev.hdr.ts_ns));
    }

    /// After a burst of events: republish so status shows them without waiting for a poll,
    /// with host counts as fresh as the exit totals (the interval figures wait for the poll).
    pub(super) fn publish_events(&self) {
        let cur = self.shared.snap.load();
        let mut s = Snapshot::clone(&cur);
        s.host = self.read_host();
        s.events = self.events;
        s.health = MapHealth::new(&self.read_health(), self.evicted);
        s.recent_exits = self.recent_exits.iter().cloned().collect();
        self.shared.snap.store(Arc::new(s));
    }
}

fn agent_count(t: &Telemetry) -> u64 {
    // Every datagram the agent took from the queue is either received or rejected (stream
    // rejections are included: a small overcount on the agent side, never a false alarm).
    t.received
        .get_or_create(&SocketLabels {
            socket: Socket::Dgram,
        })
        .get()
        + t.rejected_total()
}

fn fill_sends(w: &mut WorkerStatus, s: &ProcSends) {
    let mut all = s.sock[0];
    all.add(&s.sock[1]);
    w.sends_ok = all.ok;
    w.sends_failed = ErrnoCounts::from_err(&all.err);
    w.bytes = all.bytes;
    let st = &s.sock[SockKind::Stream as usize];
    w.drops = super::drops_of(&s.sock[SockKind::Dgram as usize], st);
    w.stream_wait_ns = st.blocked_ns;
    w.stream_connect_eagain = st.connect_eagain;
    w.stream_abandoned_frames = st.abandoned;
}

fn exit_status(
    pid: u32,
    comm: String,
    pool: String,
    rss: Option<&RssEntry>,
    sends: Option<&ProcSends>,
    swept: bool,
) -> ExitStatus {
    let mut w = WorkerStatus::default();
    if let Some(s) = sends {
        fill_sends(&mut w, s);
    }
    ExitStatus {
        pid,
        comm,
        pool,
        peak_rss_bytes: rss.map_or(0, |e| e.peak),
        last_rss_bytes: rss.map_or(0, RssEntry::rss),
        sends_ok: w.sends_ok,
        sends_failed: w.sends_failed,
        bytes: w.bytes,
        drops: w.drops,
        swept,
    }
}

/// Per-pool figures: live processes plus the retired totals of exited ones. `floor`: the send
/// counters last reported per pool, which they never go below: the kernel removes an exiting
/// process's entries just before its exit event becomes readable, so a poll in between sees
/// neither (the true count only grows, and what a poll sees never exceeds it, so holding the
/// last value is exact again once the event is read).
fn pool_stats(
    workers: &[WorkerStatus],
    retired: &BTreeMap<String, [u64; 2]>,
    floor: &mut BTreeMap<String, [u64; 2]>,
) -> Vec<PoolStats> {
    let mut m: BTreeMap<String, PoolStats> = BTreeMap::new();
    // Pools reported before keep their label first (bounded: they were bounded then).
    for key in floor.keys() {
        m.insert(key.clone(), PoolStats::new(key.clone()));
    }
    for w in workers {
        let key = bounded_pool(&m, &w.pool);
        let p = m.entry(key.clone()).or_insert_with(|| PoolStats::new(key));
        p.processes += 1;
        p.rss_bytes += w.rss_bytes;
        p.max_rss_bytes = p.max_rss_bytes.max(w.rss_bytes);
        p.sends_ok += w.sends_ok;
        p.sends_failed += w.sends_failed.total();
        p.drops += w.drops;
    }
    for (pool, [ok, failed]) in retired {
        let key = bounded_pool(&m, pool);
        let p = m.entry(key.clone()).or_insert_with(|| PoolStats::new(key));
        p.sends_ok += ok;
        p.sends_failed += failed;
    }
    for p in m.values_mut() {
        let f = floor.entry(p.pool.clone()).or_default();
        p.sends_ok = p.sends_ok.max(f[0]);
        p.sends_failed = p.sends_failed.max(f[1]);
        *f = [p.sends_ok, p.sends_failed];
    }
    m.into_values().collect()
}

fn bounded_pool<V>(m: &BTreeMap<String, V>, pool: &str) -> String {
    if m.contains_key(pool) || m.len() < MAX_POOLS {
        pool.to_string()
    } else {
        "other".into()
    }
}

fn bounded_retired(m: &BTreeMap<String, [u64; 2]>, pool: &str) -> String {
    bounded_pool(m, pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(ok: u64) -> ProcSends {
        let mut s = ProcSends::ZERO;
        s.sock[SockKind::Dgram as usize].ok = ok;
        s
    }

    #[test]
    fn a_key_the_map_iteration_yields_twice_counts_once() {
        // get_next_key restarts from the first bucket when the key it was given was deleted
        // meanwhile (a thread exiting during the poll): the same thread comes back.
        let id = (7u64 << 32) | 7;
        let other = (8u64 << 32) | 9;
        let ks = KernelSends::from_entries(
            [(7, sends(5))].into_iter(),
            [(id, sends(3)), (other, sends(1)), (id, sends(3))].into_iter(),
        );
        assert_eq!(
            ks.by_tgid[&7].sock[0].ok, 8,
            "process entry + its thread once"
        );
        assert_eq!(ks.by_tgid[&8].sock[0].ok, 1);
        assert_eq!(ks.threads.len(), 2);
    }

    fn worker(pool: &str, ok: u64) -> WorkerStatus {
        WorkerStatus {
            pid: 1,
            pool: pool.into(),
            sends_ok: ok,
            ..WorkerStatus::default()
        }
    }

    fn ok_of(pools: &[PoolStats], pool: &str) -> Option<u64> {
        pools.iter().find(|p| p.pool == pool).map(|p| p.sends_ok)
    }

    #[test]
    fn pool_send_counters_never_go_down_while_an_exit_is_in_flight() {
        let mut retired = BTreeMap::new();
        let mut floor = BTreeMap::new();
        let p = pool_stats(&[worker("www", 10)], &retired, &mut floor);
        assert_eq!(ok_of(&p, "www"), Some(10));
        // The kernel removed the exiting worker's entries; its exit event is not read yet.
        let p = pool_stats(&[], &retired, &mut floor);
        assert_eq!(ok_of(&p, "www"), Some(10), "held, not gone or lower");
        // The event arrives: the retired total carries the pool on, and it grows from there.
        retired.insert("www".to_string(), [10, 0]);
        let p = pool_stats(&[worker("www", 2)], &retired, &mut floor);
        assert_eq!(ok_of(&p, "www"), Some(12));
    }
}
