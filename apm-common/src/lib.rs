//! Types shared by the kernel side (`apm-ebpf`) and the agent. `no_std`, `#[repr(C)]`, no
//! implicit padding, sizes asserted at compile time: both sides must agree byte for byte.
//!
//! The small matching helpers (`SockMatch::matches`, `MonitorConfig::comm_matches`,
//! `err_index`, `lat_bucket`) live here too, so the exact logic the eBPF programs run is unit
//! tested on the host. They are written for the BPF verifier: bounded loops, no slices indexed
//! by unchecked values, no panics.
#![no_std]

/// Which of the agent's two sockets a send went to. Index into `[SendCounters; SOCK_KINDS]`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockKind {
    /// The datagram socket (`ingest.socket`): an EAGAIN there is a dropped profile.
    Dgram = 0,
    /// The stream socket (`ingest.stream_socket`): PHP retries after EAGAIN, so it is waiting.
    Stream = 1,
}

pub const SOCK_KINDS: usize = 2;

/// Send errors counted separately; everything else lands in `Other`. Index into `err`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrKind {
    Eagain = 0,
    Enobufs = 1,
    Emsgsize = 2,
    Epipe = 3,
    Econnrefused = 4,
    Enoent = 5,
    Other = 6,
}

pub const ERR_KINDS: usize = 7;

impl ErrKind {
    pub const ALL: [ErrKind; ERR_KINDS] = [
        Self::Eagain,
        Self::Enobufs,
        Self::Emsgsize,
        Self::Epipe,
        Self::Econnrefused,
        Self::Enoent,
        Self::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Eagain => "eagain",
            Self::Enobufs => "enobufs",
            Self::Emsgsize => "emsgsize",
            Self::Epipe => "epipe",
            Self::Econnrefused => "econnrefused",
            Self::Enoent => "enoent",
            Self::Other => "other",
        }
    }
}

/// Maps a negative syscall return value to its `ErrKind` index. Linux errno numbers are the same
/// on x86_64 and arm64 (asm-generic).
#[inline(always)]
pub const fn err_index(ret: i64) -> usize {
    match ret {
        -11 => ErrKind::Eagain as usize,
        -105 => ErrKind::Enobufs as usize,
        -90 => ErrKind::Emsgsize as usize,
        -32 => ErrKind::Epipe as usize,
        -111 => ErrKind::Econnrefused as usize,
        -2 => ErrKind::Enoent as usize,
        _ => ErrKind::Other as usize,
    }
}

pub const EAGAIN_RET: i64 = -11;

/// Buckets of the send-latency histogram: bucket 0 holds 0 ns, bucket `b` (1..=30) holds
/// latencies in `[2^(b-1), 2^b)` ns, bucket 31 everything from 2^30 ns (~1.07 s) up.
pub const LAT_BUCKETS: usize = 32;

/// The histogram bucket of a latency (see [`LAT_BUCKETS`]). A branchy binary search rather than
/// `leading_zeros`, which BPF has no instruction for.
#[inline(always)]
pub const fn lat_bucket(ns: u64) -> usize {
    if ns >= 1 << 30 {
        return LAT_BUCKETS - 1;
    }
    let mut v = ns;
    let mut b = 0usize;
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        v >>= 1;
        b += 1;
    }
    // v is now 0 or 1: bit length = b + v.
    b + v as usize
}

/// Upper bound (exclusive) in ns of histogram bucket `b`; `u64::MAX` for the last one.
pub const fn lat_bucket_upper_ns(b: usize) -> u64 {
    if b >= LAT_BUCKETS - 1 {
        u64::MAX
    } else {
        1u64 << b
    }
}

/// Send outcomes of one process (or the whole host) on one of the agent's sockets. Every field
/// only grows.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendCounters {
    /// Sends that returned >= 0.
    pub ok: u64,
    /// Bytes those sends moved (their return values).
    pub bytes: u64,
    /// Failed sends (and failed connects to the socket) by `ErrKind`.
    pub err: [u64; ERR_KINDS],
    /// Sum of the time spent inside the send syscalls, ok or failed.
    pub lat_ns_sum: u64,
    /// Stream sockets only: time from a connection's first EAGAIN to its next successful send
    /// (the time PHP spent waiting to retry: backpressure).
    pub blocked_ns: u64,
    /// Connects to the socket that failed with EAGAIN (also in `err[Eagain]`): on the stream
    /// socket a full listen backlog, and PHP's non-blocking connect gives the profile up.
    pub connect_eagain: u64,
    /// Stream sockets only: connections closed (`close`, `dup2`/`dup3` over the fd) while their
    /// last send was short or failed with EAGAIN: a frame the sender gave up on.
    pub abandoned: u64,
}
const _: () = assert!(size_of::<SendCounters>() == 104);

impl SendCounters {
    pub const ZERO: Self = Self {
        ok: 0,
        bytes: 0,
        err: [0; ERR_KINDS],
        lat_ns_sum: 0,
        blocked_ns: 0,
        connect_eagain: 0,
        abandoned: 0,
    };

    pub fn failed(&self) -> u64 {
        self.err.iter().sum()
    }

    /// Completed send syscalls: ok + failed.
    pub fn attempts(&self) -> u64 {
        self.ok + self.failed()
    }

    /// Adds `o` into `self` (userspace sums of per-CPU and per-process values).
    pub fn add(&mut self, o: &Self) {
        self.ok = self.ok.wrapping_add(o.ok);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        let mut i = 0;
        while i < ERR_KINDS {
            self.err[i] = self.err[i].wrapping_add(o.err[i]);
            i += 1;
        }
        self.lat_ns_sum = self.lat_ns_sum.wrapping_add(o.lat_ns_sum);
        self.blocked_ns = self.blocked_ns.wrapping_add(o.blocked_ns);
        self.connect_eagain = self.connect_eagain.wrapping_add(o.connect_eagain);
        self.abandoned = self.abandoned.wrapping_add(o.abandoned);
    }

    /// Field-wise `self - o` (userspace: an interval's deltas; counters only grow, so it wraps
    /// only when they do).
    #[must_use]
    pub fn delta(&self, o: &Self) -> Self {
        let mut d = *self;
        d.ok = d.ok.wrapping_sub(o.ok);
        d.bytes = d.bytes.wrapping_sub(o.bytes);
        let mut i = 0;
        while i < ERR_KINDS {
            d.err[i] = d.err[i].wrapping_sub(o.err[i]);
            i += 1;
        }
        d.lat_ns_sum = d.lat_ns_sum.wrapping_sub(o.lat_ns_sum);
        d.blocked_ns = d.blocked_ns.wrapping_sub(o.blocked_ns);
        d.connect_eagain = d.connect_eagain.wrapping_sub(o.connect_eagain);
        d.abandoned = d.abandoned.wrapping_sub(o.abandoned);
        d
    }

    /// Profiles lost on this socket before the agent, for a socket of `kind`: on the datagram
    /// socket every failed send or connect; on the stream socket failed sends and connects
    /// other than EAGAIN (a send's EAGAIN is waited out and retried), plus connects that failed
    /// with EAGAIN and frames abandoned mid-way.
    pub fn drops(&self, kind: SockKind) -> u64 {
        match kind {
            SockKind::Dgram => self.failed(),
            SockKind::Stream => {
                self.failed() - self.err[ErrKind::Eagain as usize]
                    + self.connect_eagain
                    + self.abandoned
            }
        }
    }
}

/// Send counters of one thread (inside `ThreadSends`, written only by that thread) or of the
/// exited threads of a process (`PROC_SENDS` map value, keyed by tgid, updated with atomic
/// adds when a thread exits while its process lives on). The agent sums both by tgid.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSends {
    pub sock: [SendCounters; SOCK_KINDS],
    /// ktime of this thread's last datagram drop; a drop after a quiet gap emits a
    /// `DropBurst` event.
    pub last_drop_ns: u64,
}
const _: () = assert!(size_of::<ProcSends>() == 216);

impl ProcSends {
    pub const ZERO: Self = Self {
        sock: [SendCounters::ZERO; SOCK_KINDS],
        last_drop_ns: 0,
    };

    /// Adds `o`'s counters into `self` (userspace sums of a process's threads).
    pub fn add(&mut self, o: &Self) {
        for (a, b) in self.sock.iter_mut().zip(&o.sock) {
            a.add(b);
        }
        self.last_drop_ns = self.last_drop_ns.max(o.last_drop_ns);
    }
}

/// Host-wide counters of one socket kind: `HOST_SENDS` per-CPU array value (index = `SockKind`).
/// Never evicted, so host totals stay exact whatever happens to the per-process map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSends {
    pub c: SendCounters,
    /// Send latency histogram, see [`LAT_BUCKETS`].
    pub hist: [u64; LAT_BUCKETS],
}
const _: () = assert!(size_of::<HostSends>() == 360);

impl HostSends {
    pub const ZERO: Self = Self {
        c: SendCounters::ZERO,
        hist: [0; LAT_BUCKETS],
    };

    pub fn add(&mut self, o: &Self) {
        self.c.add(&o.c);
        let mut i = 0;
        while i < LAT_BUCKETS {
            self.hist[i] = self.hist[i].wrapping_add(o.hist[i]);
            i += 1;
        }
    }
}

/// What a syscall in flight was: `Inflight::op`.
pub const OP_SEND: u32 = 0;
pub const OP_CONNECT: u32 = 1;

/// A send or connect to one of the agent's sockets between its enter and exit tracepoints
/// (`ThreadSends::inflight`; `ts_ns == 0`: nothing in flight).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    pub ts_ns: u64,
    pub fd: u32,
    /// `SockKind`.
    pub kind: u32,
    /// `OP_SEND` or `OP_CONNECT`.
    pub op: u32,
    /// 1 when the send went through a connected fd (a `CONNS` entry exists).
    pub connected: u32,
    /// Bytes the send asked to write (`sendto`'s `len`, `write`'s `count`); 0 when unknown
    /// (`sendmsg`, `connect`).
    pub len: u64,
}
const _: () = assert!(size_of::<Inflight>() == 32);

/// Everything the send programs keep about one thread of a PHP process: `SENDS` map value,
/// keyed by pid_tgid. One lookup per syscall side, and only the thread itself writes it (its
/// enter and exit programs, and its `sched_process_exit`), so its counters need no atomics and
/// never lose an increment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSends {
    pub inflight: Inflight,
    pub sends: ProcSends,
}
const _: () = assert!(size_of::<ThreadSends>() == 248);

impl ThreadSends {
    pub const ZERO: Self = Self {
        inflight: Inflight {
            ts_ns: 0,
            fd: 0,
            kind: 0,
            op: 0,
            connected: 0,
            len: 0,
        },
        sends: ProcSends::ZERO,
    };
}

/// A socket fd of a process connected to one of the agent's sockets: `CONNS` key.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 8);

/// `CONNS` value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// `SockKind`.
    pub kind: u32,
    /// Low 32 bits of the process's `task_struct.self_exec_id` at connect (0 without BTF):
    /// an exec since then closed close-on-exec fds without a `close(2)` the programs see, so
    /// an entry from before it no longer names the socket.
    pub exec_id: u32,
    /// ktime of the first EAGAIN since the last successful send; 0 when not waiting.
    pub eagain_since_ns: u64,
    /// 1 when the last send on the fd was short or failed with EAGAIN: a frame is half
    /// written, and closing the fd now abandons it (`SendCounters::abandoned`).
    pub frame_open: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnInfo>() == 24);

/// Tracepoint record layouts. The programs read fields at constant offsets (the verifier only
/// accepts constant context offsets); the agent checks every one of them against the running
/// kernel's `events/<category>/<event>/format` in tracefs before loading, so a kernel that moved
/// or dropped a field is refused by name instead of read as zeros or garbage.
pub mod tp {
    /// Syscall tracepoints: 8 bytes of common fields, the syscall number, then one 8-byte slot
    /// per argument from offset 16.
    pub const ARG0: usize = 16;
    pub const ARG1: usize = 24;
    pub const ARG2: usize = 32;
    pub const SENDTO_ADDR: usize = 48;
    pub const SENDTO_ADDRLEN: usize = 56;
    pub const EXIT_RET: usize = 16;
    pub const RSS_MM_ID: usize = 8;
    pub const RSS_CURR: usize = 12;
    pub const RSS_MEMBER: usize = 16;
    pub const RSS_SIZE: usize = 24;
    pub const EXIT_COMM: usize = 8;
    /// `sched_process_exit`'s `group_dead`, only in kernels from 6.16 on; older ones need the
    /// task's `signal->live` instead (see `ExitMode`).
    pub const EXIT_GROUP_DEAD: usize = 32;

    /// One field a program reads: where, and how wide.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Field {
        pub category: &'static str,
        pub event: &'static str,
        pub name: &'static str,
        pub offset: usize,
        pub size: usize,
    }

    const fn f(
        category: &'static str,
        event: &'static str,
        name: &'static str,
        offset: usize,
        size: usize,
    ) -> Field {
        Field {
            category,
            event,
            name,
            offset,
            size,
        }
    }

    /// Every field the programs read, except the optional `group_dead`.
    pub const FIELDS: &[Field] = &[
        f("syscalls", "sys_enter_sendto", "fd", ARG0, 8),
        f("syscalls", "sys_enter_sendto", "addr", SENDTO_ADDR, 8),
        f(
            "syscalls",
            "sys_enter_sendto",
            "addr_len",
            SENDTO_ADDRLEN,
            8,
        ),
        f("syscalls", "sys_enter_sendmsg", "fd", ARG0, 8),
        f("syscalls", "sys_enter_sendmsg", "msg", ARG1, 8),
        f("syscalls", "sys_enter_sendto", "len", ARG2, 8),
        f("syscalls", "sys_enter_write", "fd", ARG0, 8),
        f("syscalls", "sys_enter_write", "count", ARG2, 8),
        f("syscalls", "sys_enter_connect", "fd", ARG0, 8),
        f("syscalls", "sys_enter_connect", "uservaddr", ARG1, 8),
        f("syscalls", "sys_enter_connect", "addrlen", ARG2, 8),
        f("syscalls", "sys_enter_close", "fd", ARG0, 8),
        f("syscalls", "sys_enter_dup2", "oldfd", ARG0, 8),
        f("syscalls", "sys_enter_dup2", "newfd", ARG1, 8),
        f("syscalls", "sys_enter_dup3", "oldfd", ARG0, 8),
        f("syscalls", "sys_enter_dup3", "newfd", ARG1, 8),
        f("syscalls", "sys_enter_close_range", "fd", ARG0, 8),
        f("syscalls", "sys_enter_close_range", "max_fd", ARG1, 8),
        f("syscalls", "sys_enter_close_range", "flags", ARG2, 8),
        f("syscalls", "sys_exit_sendto", "ret", EXIT_RET, 8),
        f("syscalls", "sys_exit_sendmsg", "ret", EXIT_RET, 8),
        f("syscalls", "sys_exit_write", "ret", EXIT_RET, 8),
        f("syscalls", "sys_exit_connect", "ret", EXIT_RET, 8),
        f("kmem", "rss_stat", "mm_id", RSS_MM_ID, 4),
        f("kmem", "rss_stat", "curr", RSS_CURR, 4),
        f("kmem", "rss_stat", "member", RSS_MEMBER, 4),
        f("kmem", "rss_stat", "size", RSS_SIZE, 8),
        f("sched", "sched_process_exit", "comm", EXIT_COMM, 16),
    ];

    /// The optional field: used when the kernel has it exactly here.
    pub const GROUP_DEAD: Field = f(
        "sched",
        "sched_process_exit",
        "group_dead",
        EXIT_GROUP_DEAD,
        1,
    );
}

/// How `sched_process_exit` tells the last thread of a process (`EXIT_MODE` global).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// The record's `group_dead` field (kernels 6.16+).
    GroupDead = 0,
    /// `current->signal->live == 0`, read through BTF (the kernel decrements it before the
    /// tracepoint; offsets from `/sys/kernel/btf/vmlinux`).
    SignalLive = 1,
    /// Neither: the thread-group leader's exit stands for the process's.
    Leader = 2,
}

/// Indices of the per-CPU `HEALTH` array (one `u64` each, summed by the agent): what the
/// programs could not record. The maps never evict (plain hash maps, not LRU), so a full map
/// refuses the insert and the refusal is counted here; a full ring buffer drops the event and
/// that is counted too. Numbers are never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `SENDS` full: a PHP thread's send to the agent is not counted (no in-flight state).
    SendsFull = 0,
    /// `CONNS` full: a connected fd is not remembered; its later sends are not counted.
    ConnsFull = 1,
    /// `PROC_SENDS` full: an exiting thread's counters stay in `SENDS` (swept by the agent).
    ProcSendsFull = 2,
    /// `RSS` full: a process's memory is not tracked.
    RssFull = 3,
    /// `MM_OWNER` full: RSS events raised outside the process are missed for it.
    MmOwnerFull = 4,
    /// `EVENTS` full: an exit event of a watched process was lost (the agent's sweep retires
    /// the process instead).
    ExitEventLost = 5,
    /// `EVENTS` full: an RSS threshold event was lost.
    RssEventLost = 6,
    /// `EVENTS` full: a drop-burst event was lost.
    DropEventLost = 7,
}

/// Entries of the `HEALTH` array.
pub const HEALTH_COUNTERS: usize = 8;

impl Health {
    pub const ALL: [Health; HEALTH_COUNTERS] = [
        Health::SendsFull,
        Health::ConnsFull,
        Health::ProcSendsFull,
        Health::RssFull,
        Health::MmOwnerFull,
        Health::ExitEventLost,
        Health::RssEventLost,
        Health::DropEventLost,
    ];
}

/// `kmem/rss_stat` members (the tracepoint's `member` field).
pub const RSS_FILE: usize = 0;
pub const RSS_ANON: usize = 1;
pub const RSS_SWAP: usize = 2;
pub const RSS_SHMEM: usize = 3;
pub const RSS_MEMBERS: usize = 4;

/// Memory of a watched process: `RSS` map value keyed by tgid.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssEntry {
    /// Bytes per `RSS_*` member, as the last `rss_stat` event of that member reported.
    pub member: [u64; RSS_MEMBERS],
    /// Highest `rss()` seen in the kernel.
    pub peak: u64,
    /// The process's mm (hashed pointer from the tracepoint), to retire `MM_OWNER` at exit.
    pub mm_id: u32,
    /// Bit `1 << member` set once that member had an event since tracking started. A member
    /// without one has not changed since, so userspace may take its value from /proc.
    pub seen: u32,
    /// 1 while `rss()` is at or above the threshold (the event fired); re-armed below it.
    pub over: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<RssEntry>() == 72);

impl RssEntry {
    /// Resident set size as /proc's VmRSS counts it: file + anon + shmem (swap is not resident).
    #[inline(always)]
    pub const fn rss(&self) -> u64 {
        self.member[RSS_FILE]
            .wrapping_add(self.member[RSS_ANON])
            .wrapping_add(self.member[RSS_SHMEM])
    }
}

/// Ring-buffer event kinds. Numbers are never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A watched process crossed `rss_threshold_bytes` upwards (`RssEvent`).
    RssOverThreshold = 1,
    /// A watched process exited (`ExitEvent`).
    WorkerExit = 2,
    /// A process dropped a datagram after a quiet gap (`DropEvent`).
    DropBurst = 3,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::RssOverThreshold),
            2 => Some(Self::WorkerExit),
            3 => Some(Self::DropBurst),
            _ => None,
        }
    }
}

/// First bytes of every ring-buffer event.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventHeader {
    /// `EventKind`.
    pub kind: u32,
    pub tgid: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 16);

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssEvent {
    pub hdr: EventHeader,
    /// Kernel-seen RSS at the crossing.
    pub rss_bytes: u64,
    pub threshold_bytes: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<RssEvent>() == 48);

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitEvent {
    pub hdr: EventHeader,
    pub peak_rss: u64,
    pub last_rss: u64,
    /// `RssEntry::seen` at exit: members never seen were not counted by the kernel.
    pub rss_seen: u32,
    /// 1 when the process had an `RSS` entry, 2 when it had send counters, 3 both.
    pub had: u32,
    pub comm: [u8; 16],
    /// The process's final send totals (its `PROC_SENDS` entry plus the exiting thread's
    /// `SENDS` entry, both removed with this event).
    pub sends: [SendCounters; SOCK_KINDS],
}
const _: () = assert!(size_of::<ExitEvent>() == 264);

pub const EXIT_HAD_RSS: u32 = 1;
pub const EXIT_HAD_SENDS: u32 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropEvent {
    pub hdr: EventHeader,
    /// Failed datagram sends of the sending thread so far, this one included (a PHP process
    /// has one thread: the process's).
    pub drops_total: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<DropEvent>() == 40);

/// Words of a `sockaddr_un` compared 8 bytes at a time: 2 (family) + 108 (path) rounded up.
pub const SA_WORDS: usize = 14;
/// `sizeof(struct sockaddr_un)`: the kernel refuses longer addresses.
pub const SA_UN_LEN: u64 = 110;
const AF_UNIX: u16 = 1;

/// One of the agent's socket paths, pre-digested for a word-wise compare against the
/// `sockaddr_un` a process passes to sendto/sendmsg/connect.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockMatch {
    /// The expected `sockaddr_un` prefix (family + path bytes), little-endian words.
    pub want: [u64; SA_WORDS],
    /// Which bytes of each word belong to that prefix.
    pub mask: [u64; SA_WORDS],
    /// Words holding the prefix (`ceil((2 + path_len) / 8)`); 0 disables this socket.
    pub nwords: u32,
    /// Path length in bytes (no NUL).
    pub path_len: u32,
}
const _: () = assert!(size_of::<SockMatch>() == 232);

impl SockMatch {
    pub const NONE: Self = Self {
        want: [0; SA_WORDS],
        mask: [0; SA_WORDS],
        nwords: 0,
        path_len: 0,
    };

    /// Builds the matcher of a filesystem socket path (1..=107 bytes, no NUL inside).
    pub fn from_path(path: &[u8]) -> Option<Self> {
        if path.is_empty() || path.len() > 107 || path.contains(&0) {
            return None;
        }
        let mut bytes = [0u8; SA_WORDS * 8];
        let mut mbytes = [0u8; SA_WORDS * 8];
        bytes[..2].copy_from_slice(&AF_UNIX.to_le_bytes());
        bytes[2..2 + path.len()].copy_from_slice(path);
        for b in &mut mbytes[..2 + path.len()] {
            *b = 0xff;
        }
        let mut m = Self::NONE;
        for i in 0..SA_WORDS {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            m.want[i] = u64::from_le_bytes(w);
            w.copy_from_slice(&mbytes[i * 8..i * 8 + 8]);
            m.mask[i] = u64::from_le_bytes(w);
        }
        m.nwords = (2 + path.len()).div_ceil(8) as u32;
        m.path_len = path.len() as u32;
        Some(m)
    }

    /// Smallest `addr_len` that can name this path (family + path, no NUL).
    #[inline(always)]
    pub const fn min_addr_len(&self) -> u64 {
        2 + self.path_len as u64
    }

    /// Whether the first `addr_len` bytes of `sa` (a `sockaddr_un` read from user memory; bytes
    /// past `addr_len` may be garbage) name this path the way the kernel resolves it: the path
    /// is the bytes after the family up to the first NUL or `addr_len`.
    #[inline(always)]
    #[expect(
        clippy::verbose_bit_mask,
        reason = "the shift-and-mask form is what the eBPF verifier bounds; keep it as written"
    )]
    pub fn matches(&self, sa: &[u64; SA_WORDS], addr_len: u64) -> bool {
        let min = self.min_addr_len();
        if self.nwords == 0 || addr_len < min || addr_len > SA_UN_LEN {
            return false;
        }
        let mut i = 0;
        while i < SA_WORDS {
            if i as u32 >= self.nwords {
                break;
            }
            if sa[i] & self.mask[i] != self.want[i] {
                return false;
            }
            i += 1;
        }
        if addr_len == min {
            return true;
        }
        // Longer address: the byte right after the path must end it. Found with constant
        // indices: the verifier refuses a stack read at an offset it cannot bound.
        let t = min as usize;
        let (w, shift) = (t / 8, (t % 8) * 8);
        let mut i = 0;
        while i < SA_WORDS {
            if i == w {
                return (sa[i] >> shift) & 0xff == 0;
            }
            i += 1;
        }
        false
    }
}

/// Comm prefixes compared per event; more in the config are refused by the agent.
pub const MAX_COMMS: usize = 8;

/// Configuration of the eBPF programs: the one entry of the `CONFIG` array map, written by the
/// agent before it attaches the programs.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonitorConfig {
    /// The agent's own tgid: its RSS is tracked whatever its comm.
    pub agent_tgid: u32,
    /// Used entries of `comm_want`/`comm_mask`.
    pub ncomms: u32,
    /// PHP process-name prefixes as two little-endian words (comm is 16 bytes).
    pub comm_want: [[u64; 2]; MAX_COMMS],
    pub comm_mask: [[u64; 2]; MAX_COMMS],
    /// An `RssOverThreshold` event fires when a process's RSS reaches this; 0 disables it.
    pub rss_threshold_bytes: u64,
    /// A datagram drop after this long without one emits a `DropBurst` event.
    pub drop_event_gap_ns: u64,
    /// Index `SockKind`.
    pub sock: [SockMatch; SOCK_KINDS],
    /// Smallest `min_addr_len()` of the enabled sockets: shorter addresses are skipped without
    /// reading user memory.
    pub min_addr_len: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<MonitorConfig>() == 752);

impl MonitorConfig {
    pub const ZERO: Self = Self {
        agent_tgid: 0,
        ncomms: 0,
        comm_want: [[0; 2]; MAX_COMMS],
        comm_mask: [[0; 2]; MAX_COMMS],
        rss_threshold_bytes: 0,
        drop_event_gap_ns: 0,
        sock: [SockMatch::NONE; SOCK_KINDS],
        min_addr_len: 0,
        _pad: 0,
    };

    /// Adds a comm prefix (1..=15 bytes). Returns false when full or invalid.
    pub fn add_comm_prefix(&mut self, prefix: &[u8]) -> bool {
        let n = self.ncomms as usize;
        if n >= MAX_COMMS || prefix.is_empty() || prefix.len() > 15 {
            return false;
        }
        let mut want = [0u8; 16];
        let mut mask = [0u8; 16];
        want[..prefix.len()].copy_from_slice(prefix);
        for b in &mut mask[..prefix.len()] {
            *b = 0xff;
        }
        for w in 0..2 {
            let mut x = [0u8; 8];
            x.copy_from_slice(&want[w * 8..w * 8 + 8]);
            self.comm_want[n][w] = u64::from_le_bytes(x);
            x.copy_from_slice(&mask[w * 8..w * 8 + 8]);
            self.comm_mask[n][w] = u64::from_le_bytes(x);
        }
        self.ncomms += 1;
        true
    }

    /// Sets one of the agent's socket paths.
    pub fn set_socket(&mut self, kind: SockKind, path: &[u8]) -> bool {
        let Some(m) = SockMatch::from_path(path) else {
            return false;
        };
        self.sock[kind as usize] = m;
        let mins = self
            .sock
            .iter()
            .filter(|s| s.nwords > 0)
            .map(|s| s.min_addr_len() as u32);
        self.min_addr_len = mins.min().unwrap_or(0);
        true
    }

    /// Whether a comm (as `bpf_get_current_comm` fills it, two little-endian words) starts
    /// with one of the configured prefixes.
    #[inline(always)]
    pub fn comm_matches(&self, comm: &[u64; 2]) -> bool {
        let mut i = 0;
        while i < MAX_COMMS {
            if i as u32 >= self.ncomms {
                break;
            }
            if comm[0] & self.comm_mask[i][0] == self.comm_want[i][0]
                && comm[1] & self.comm_mask[i][1] == self.comm_want[i][1]
            {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        ConnInfo, ConnKey, HostSends, Inflight, MonitorConfig, ProcSends, RssEntry, SendCounters,
        ThreadSends,
    };
    // SAFETY: all are #[repr(C)], Copy, made only of integers, with no implicit padding (the
    // size asserts above pin the layouts), so any byte pattern is a valid value.
    unsafe impl aya::Pod for SendCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProcSends {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostSends {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Inflight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ThreadSends {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RssEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MonitorConfig {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn sa(path: &[u8], extra: &[u8]) -> ([u64; SA_WORDS], u64) {
        let mut b = [0xAAu8; SA_WORDS * 8]; // garbage past addr_len must not matter
        b[0] = 1;
        b[1] = 0;
        b[2..2 + path.len()].copy_from_slice(path);
        b[2 + path.len()..2 + path.len() + extra.len()].copy_from_slice(extra);
        let mut w = [0u64; SA_WORDS];
        for (i, x) in w.iter_mut().enumerate() {
            *x = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        }
        (w, (2 + path.len() + extra.len()) as u64)
    }

    #[test]
    fn sockaddr_matching_follows_kernel_rules() {
        let p = b"/run/bitville-apm/listener.sock";
        let m = SockMatch::from_path(p).unwrap();
        // PHP style: addrlen = 2 + strlen, no NUL.
        let (w, l) = sa(p, b"");
        assert!(m.matches(&w, l));
        // C style: NUL-terminated, or the whole struct.
        let (w, l) = sa(p, b"\0");
        assert!(m.matches(&w, l));
        assert!(m.matches(&w, SA_UN_LEN));
        // A longer path with the same prefix is another socket.
        let (w, l) = sa(b"/run/bitville-apm/listener.sock2", b"");
        assert!(!m.matches(&w, l));
        // A shorter addr_len cuts the path: not ours.
        let (w, l) = sa(p, b"");
        assert!(!m.matches(&w, l - 1));
        // Different family.
        let (mut w, l) = sa(p, b"");
        w[0] = (w[0] & !0xffff) | 2;
        assert!(!m.matches(&w, l));
        // One byte differs in the last word.
        let mut q: Vec<u8> = p.to_vec();
        *q.last_mut().unwrap() = b'x';
        let (w, l) = sa(&q, b"");
        assert!(!m.matches(&w, l));
        // Longest path.
        let long = [b'a'; 107];
        let m = SockMatch::from_path(&long).unwrap();
        let (w, l) = sa(&long, b"\0");
        assert!(m.matches(&w, l));
        assert!(m.matches(&w, l - 1));
        assert!(SockMatch::from_path(&[b'a'; 108]).is_none());
        assert!(SockMatch::from_path(b"").is_none());
        assert!(!SockMatch::NONE.matches(&w, l));
    }

    #[test]
    fn every_path_length_matches_itself_only() {
        for len in 1..=107usize {
            let p: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let m = SockMatch::from_path(&p).unwrap();
            let (w, l) = sa(&p, b"");
            assert!(m.matches(&w, l), "len {len}");
            if len > 1 {
                let (w, l) = sa(&p[..len - 1], b"");
                assert!(!m.matches(&w, l), "prefix of len {len}");
            }
        }
    }

    fn comm(s: &[u8]) -> [u64; 2] {
        let mut b = [0u8; 16];
        b[..s.len()].copy_from_slice(s);
        [
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..].try_into().unwrap()),
        ]
    }

    #[test]
    fn comm_prefixes() {
        let mut c = MonitorConfig::ZERO;
        assert!(!c.comm_matches(&comm(b"php-fpm8.2")));
        assert!(c.add_comm_prefix(b"php-fpm"));
        assert!(c.comm_matches(&comm(b"php-fpm8.2")));
        assert!(c.comm_matches(&comm(b"php-fpm")));
        assert!(!c.comm_matches(&comm(b"php8.2")));
        assert!(!c.comm_matches(&comm(b"bash")));
        assert!(c.add_comm_prefix(b"a-fifteen-bytes"));
        assert!(c.comm_matches(&comm(b"a-fifteen-bytes")));
        assert!(!c.add_comm_prefix(b"sixteen-bytes-xx"));
        assert!(!c.add_comm_prefix(b""));
        for _ in 2..MAX_COMMS {
            assert!(c.add_comm_prefix(b"x"));
        }
        assert!(!c.add_comm_prefix(b"y"));
    }

    #[test]
    fn stream_drops_are_connect_eagain_and_abandoned_frames_not_send_eagain() {
        let mut c = SendCounters::ZERO;
        c.ok = 10;
        // Two send EAGAINs (waited out), one connect EAGAIN (also an EAGAIN), one EPIPE.
        c.err[ErrKind::Eagain as usize] = 3;
        c.connect_eagain = 1;
        c.err[ErrKind::Epipe as usize] = 1;
        c.abandoned = 2;
        assert_eq!(c.drops(SockKind::Stream), 1 + 1 + 2);
        assert_eq!(
            c.drops(SockKind::Dgram),
            4,
            "every failed datagram send or connect"
        );
        let d = c.delta(&SendCounters::ZERO);
        assert_eq!(d, c);
        assert_eq!(c.delta(&c), SendCounters::ZERO);
    }

    #[test]
    fn errno_and_latency_buckets() {
        assert_eq!(err_index(-11), ErrKind::Eagain as usize);
        assert_eq!(err_index(-105), ErrKind::Enobufs as usize);
        assert_eq!(err_index(-90), ErrKind::Emsgsize as usize);
        assert_eq!(err_index(-32), ErrKind::Epipe as usize);
        assert_eq!(err_index(-111), ErrKind::Econnrefused as usize);
        assert_eq!(err_index(-2), ErrKind::Enoent as usize);
        assert_eq!(err_index(-4), ErrKind::Other as usize);
        assert_eq!(lat_bucket(0), 0);
        assert_eq!(lat_bucket(1), 1);
        assert_eq!(lat_bucket(2), 2);
        assert_eq!(lat_bucket(3), 2);
        assert_eq!(lat_bucket(4), 3);
        for b in 1..31 {
            let lo = 1u64 << (b - 1);
            assert_eq!(lat_bucket(lo), b, "{lo}");
            assert_eq!(lat_bucket((1u64 << b) - 1), b);
            assert!(lat_bucket_upper_ns(b) == 1 << b);
        }
        assert_eq!(lat_bucket(1 << 30), 31);
        assert_eq!(lat_bucket(u64::MAX), 31);
    }

    #[test]
    fn socket_config_min_addr_len() {
        let mut c = MonitorConfig::ZERO;
        assert!(c.set_socket(SockKind::Stream, b"/tmp/a-longer.sock"));
        assert_eq!(c.min_addr_len, 2 + 18);
        assert!(c.set_socket(SockKind::Dgram, b"/tmp/a.sock"));
        assert_eq!(c.min_addr_len, 2 + 11);
        assert!(!c.set_socket(SockKind::Dgram, b"bad\0path"));
    }
}
