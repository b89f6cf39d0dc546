//! The agent's eBPF programs (tracepoints only: kprobes and fentry are not available on the
//! target kernels).
//!
//! - `syscalls/sys_{enter,exit}_{sendto,sendmsg,write}` + `sys_{enter,exit}_connect` +
//!   `sys_enter_close`: sends by PHP processes to the agent's two sockets, counted per thread
//!   (`SENDS`: the send in flight and the thread's counters in one value, one lookup per
//!   syscall side, written only by that thread), per exited thread of a live process
//!   (`PROC_SENDS`, atomic adds) and per host (`HOST_SENDS`, per-CPU, with the latency
//!   histogram).
//! - `sys_enter_{dup2,dup3,close_range}`: connected fds taken away without `close(2)`.
//! - `kmem/rss_stat` + `sched/sched_process_{exit,exec}`: RSS of PHP processes and of the agent
//!   (`RSS`), events when one crosses the threshold, exits, or execs a program that is not PHP
//!   (`EVENTS`).
//! - `HEALTH`: what could not be recorded (full maps, full ring buffer); no map evicts.
//!
//! Every handler first checks the process name against the configured PHP prefixes (two loads
//! from the current task's BTF-typed `comm`, or the `bpf_get_current_comm` helper where the
//! kernel has no BTF for it, and a few word compares), so a process that is not PHP costs
//! almost nothing and never has its memory read. `sendto`/`sendmsg`/`connect` check the address
//! length against the configured paths before that, with no helper call at all.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `fetch_add` (no CAS), but BPF does have atomic add.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add on bpfel"
)]

use core::ffi::c_void;
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::mem::MaybeUninit;

use apm_common::{
    ConnInfo, ConnKey, DropEvent, EAGAIN_RET, EXIT_HAD_RSS, EXIT_HAD_SENDS, EventHeader, EventKind,
    ExitEvent, ExitMode, HEALTH_COUNTERS, Health, HostSends, MonitorConfig, OP_CONNECT, OP_SEND,
    ProcSends, RSS_MEMBERS, RssEntry, RssEvent, SA_UN_LEN, SA_WORDS, SendCounters, SockKind,
    ThreadSends, err_index, lat_bucket,
};
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
    bpf_probe_read_user,
};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use aya_ebpf::{EbpfContext, Global};

// Map sizes here are defaults; the agent sets them at load (`EbpfLoader::set_max_entries`).

/// The one `MonitorConfig`, written by the agent before attaching.
#[map]
static CONFIG: Array<MonitorConfig> = Array::with_max_entries(1, 0);

/// Offset of `comm` in the kernel's `struct task_struct`, from its BTF, set by the agent at load
/// (`.rodata`, frozen: the verifier sees a constant, so the loads it guards are checked against
/// the BTF type). 0: unknown, use the `bpf_get_current_comm` helper.
#[unsafe(no_mangle)]
static TASK_COMM_OFFSET: Global<u32> = Global::new(0);

/// Offset of `self_exec_id` in `struct task_struct`, from its BTF, set by the agent at load
/// like `TASK_COMM_OFFSET`; 0: unknown (connected fds are then not checked against execs).
#[unsafe(no_mangle)]
static TASK_EXEC_ID_OFFSET: Global<u32> = Global::new(0);

/// `close_range(2)` forgets at most this many connected fds from the start of its range: the
/// agent sockets PHP connects sit at low fd numbers, and a larger walk costs every such call.
const CLOSE_RANGE_SCAN: u32 = 256;
/// `CLOSE_RANGE_CLOEXEC`: the range is only marked close-on-exec (the exec check covers it).
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

/// PHP threads that sent to the agent, by pid_tgid: the send/connect in flight between enter
/// and exit (`inflight.ts_ns == 0`: none) and the thread's counters, so a send costs one lookup
/// on each side and no insert, delete or atomic. Only the thread itself writes its entry; its
/// `sched_process_exit` folds the counters into `PROC_SENDS` (or, for the last thread, into the
/// exit event) and removes it. Not LRU: a full map refuses a new thread (counted in `HEALTH`)
/// instead of silently evicting another thread's send in flight and counters.
#[map]
static SENDS: HashMap<u64, ThreadSends> = HashMap::with_max_entries(4096, 0);

/// fds connected to the agent's sockets, by (tgid, fd); removed on close, swept by the agent
/// when the process is gone. Never evicts: a refused insert is counted in `HEALTH`.
#[map]
static CONNS: HashMap<ConnKey, ConnInfo> = HashMap::with_max_entries(16384, 0);

/// Send counters of the exited threads of live processes, by tgid (atomic adds: threads of one
/// process may exit on several CPUs at once); removed (and reported) at process exit.
#[map]
static PROC_SENDS: HashMap<u32, ProcSends> = HashMap::with_max_entries(4096, 0);

/// Host-wide counters per socket kind; per-CPU, summed by the agent.
#[map]
static HOST_SENDS: PerCpuArray<HostSends> = PerCpuArray::with_max_entries(2, 0);

/// Memory of watched processes by tgid, removed at exit.
#[map]
static RSS: HashMap<u32, RssEntry> = HashMap::with_max_entries(4096, 0);

/// mm_id -> tgid of watched processes, for `rss_stat` events raised from another context
/// (curr = 0: reclaim, fork copying, exit teardown).
#[map]
static MM_OWNER: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);

/// What the programs could not record (`apm_common::Health`: refused map inserts, lost
/// events), per CPU so counting never contends; summed by the agent.
#[map]
static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_COUNTERS as u32, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Inserted for a new process or thread, so no zeroed stack buffer (a memset per event) is
/// needed.
static ZERO_PROC: ProcSends = ProcSends::ZERO;
static ZERO_THREAD: ThreadSends = ThreadSends::ZERO;
static ZERO_RSS: RssEntry = RssEntry {
    member: [0; RSS_MEMBERS],
    peak: 0,
    mm_id: 0,
    seen: 0,
    over: 0,
    _pad: 0,
    comm: [0; 16],
};
/// `match_addr`'s buffer: 128 bytes, all that a 7-bit length can ask for.
const SA_BUF_WORDS: usize = 16;
const _: () = assert!(SA_BUF_WORDS >= SA_WORDS);
const SENDS_WORDS: usize = size_of::<[SendCounters; apm_common::SOCK_KINDS]>() / 8;

// Tracepoint field offsets: `apm_common::tp`, checked against the running kernel's tracefs by the
// agent before it loads anything.
use apm_common::tp::{
    ARG0, ARG1, ARG2, EXIT_COMM, EXIT_GROUP_DEAD, EXIT_RET, RSS_CURR, RSS_MEMBER, RSS_MM_ID,
    RSS_SIZE, SENDTO_ADDR, SENDTO_ADDRLEN,
};

/// How `process_exit` recognises the last thread of a process (`apm_common::ExitMode`), set by
/// the agent at load from the tracepoint's format and the kernel's BTF (`.rodata`: the verifier
/// sees a constant and only checks the path taken).
#[unsafe(no_mangle)]
static EXIT_MODE: Global<u32> = Global::new(0);

/// `ExitMode::SignalLive`: offsets of `task_struct.signal` and `signal_struct.live` from BTF.
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFFSET: Global<u32> = Global::new(0);

/// Re-arm the RSS threshold event only after falling 1/8 below it, so a worker hovering at the
/// threshold does not emit one event per page fault.
const RSS_REARM_SHIFT: u32 = 3;

#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: tracepoint context is readable for the event's size; the offsets above are
    // within every event they are used on, and direct loads are what the verifier expects.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}

#[inline(always)]
fn config() -> Option<&'static MonitorConfig> {
    CONFIG.get(0)
}

#[inline(always)]
fn comm_words() -> [u64; 2] {
    let off = TASK_COMM_OFFSET.load();
    if off != 0 {
        // SAFETY: the helper returns the current task (never null); `off` is the BTF offset of
        // its 16-byte `comm` (8-aligned, checked by the agent), a constant to the verifier,
        // which checks these loads against the BTF type and makes them fault-safe.
        unsafe {
            let c = bpf_get_current_task_btf()
                .cast::<u8>()
                .add(off as usize)
                .cast::<u64>();
            return [c.read_volatile(), c.add(1).read_volatile()];
        }
    }
    let mut c = MaybeUninit::<[u64; 2]>::uninit();
    // SAFETY: the helper writes 16 bytes (NUL padded) into the buffer, or zeroes it on error.
    unsafe {
        bpf_get_current_comm(c.as_mut_ptr().cast::<c_void>(), 16);
        c.assume_init()
    }
}

/// The cheap filter every handler starts with.
#[inline(always)]
fn is_php(cfg: &MonitorConfig) -> bool {
    cfg.comm_matches(&comm_words())
}

#[inline(always)]
fn pid_tgid() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_pid_tgid() }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts something the programs could not record (only on failure paths).
#[inline(always)]
fn count(h: Health) {
    if let Some(p) = HEALTH.get_ptr_mut(h as u32) {
        // SAFETY: this CPU's slot of a per-CPU array: nothing else writes it meanwhile.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn xadd(p: *mut u64, v: u64) {
    // SAFETY: p points into a map value the caller just looked up; BPF atomic add.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v);
    }
}

/// Word-by-word copy. Volatile so LLVM cannot turn it back into a `memcpy`/`memmove` call,
/// which BPF only has as a slow out-of-line byte loop.
#[inline(always)]
unsafe fn copy_words(dst: *mut u64, src: *const u64, n: usize) {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller passes n words valid at both pointers.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// Word-by-word zeroing; volatile for the same reason as `copy_words`.
#[inline(always)]
unsafe fn zero_words(dst: *mut u64, n: usize) {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller passes n writable words.
        unsafe { dst.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Stores the current comm into a 16-byte field (8-aligned in every shared type).
#[inline(always)]
unsafe fn put_comm(dst: *mut [u8; 16]) {
    let c = comm_words();
    // SAFETY: dst is a writable, 8-aligned 16-byte field.
    unsafe { copy_words(dst.cast::<u64>(), c.as_ptr(), 2) };
}

/// Whether an address of this length can name one of the agent's sockets (checked before the
/// comm, and before any user-memory read).
#[inline(always)]
fn addr_len_possible(cfg: &MonitorConfig, addr_len: u64) -> bool {
    cfg.min_addr_len != 0 && addr_len >= cfg.min_addr_len as u64 && addr_len <= SA_UN_LEN
}

/// Which of the agent's sockets a user `sockaddr` names, reading it from user memory only
/// when its length can be one of them.
#[inline(always)]
fn match_addr(cfg: &MonitorConfig, addr: u64, addr_len: u64) -> Option<u32> {
    if addr == 0 || !addr_len_possible(cfg, addr_len) {
        return None;
    }
    // <= 110 after the check above, but LLVM drops a mask it can prove redundant, and the
    // verifiers of 6.1 and older lose the bound when the value is spilled to the stack and
    // reloaded ("R2 min value is negative"): the volatile read makes the mask, applied right
    // before the call, one LLVM must keep. The buffer has room for everything the mask allows.
    // SAFETY: reading a local.
    let n = (unsafe { core::ptr::read_volatile(&addr_len) } as u32) & 0x7f;
    let mut buf = MaybeUninit::<[u64; SA_BUF_WORDS]>::uninit();
    // SAFETY: reads n <= 127 bytes of user memory into a 128-byte buffer; bytes past n stay
    // uninitialised and `matches` masks them out.
    let r =
        unsafe { bpf_probe_read_user(buf.as_mut_ptr().cast::<c_void>(), n, addr as *const c_void) };
    if r != 0 {
        return None;
    }
    // SAFETY: see above; every byte `matches` looks at unmasked was written. The first
    // SA_WORDS words of the buffer are the sockaddr_un.
    let sa = unsafe { &*buf.as_ptr().cast::<[u64; SA_WORDS]>() };
    if cfg.sock[SockKind::Dgram as usize].matches(sa, addr_len) {
        Some(SockKind::Dgram as u32)
    } else if cfg.sock[SockKind::Stream as usize].matches(sa, addr_len) {
        Some(SockKind::Stream as u32)
    } else {
        None
    }
}

/// Low 32 bits of the current task's `self_exec_id` (the kernel adds one at each exec), read
/// through BTF; 0 where the agent found no offset (no BTF task reads).
#[inline(always)]
fn exec_id() -> u32 {
    let off = TASK_EXEC_ID_OFFSET.load();
    if off == 0 {
        return 0;
    }
    // SAFETY: as `comm_words`: the current task, a BTF offset the verifier sees as a constant
    // and checks the load against (the low half of the field on little-endian BPF).
    unsafe {
        bpf_get_current_task_btf()
            .cast::<u8>()
            .add(off as usize)
            .cast::<u32>()
            .read_volatile()
    }
}

/// Which agent socket the process's fd is connected to. An entry from before the process's
/// last exec is stale (close-on-exec closed the fd without a `close(2)`): removed, not used.
#[inline(always)]
fn conn_kind(tgid: u32, fd: u32) -> Option<u32> {
    let key = ConnKey { tgid, fd };
    // SAFETY: values copied out immediately.
    let (kind, at) = unsafe { CONNS.get(key) }.map(|c| (c.kind, c.exec_id))?;
    if at != exec_id() {
        let _ = CONNS.remove(key);
        return None;
    }
    Some(kind)
}

/// The thread's `SENDS` entry, created on its first send to the agent.
#[inline(always)]
fn thread_sends(pid_tgid: u64) -> Option<*mut ThreadSends> {
    get_or_insert_zero(&SENDS, pid_tgid, &ZERO_THREAD, Health::SendsFull)
}

/// The entry of `key`, created from `zero` if absent (`BPF_NOEXIST`: a racing creator wins and
/// both use its entry). Still absent after that: the map is full, counted as `full`.
#[inline(always)]
fn get_or_insert_zero<K, V>(
    map: &HashMap<K, V>,
    key: K,
    zero: &'static V,
    full: Health,
) -> Option<*mut V> {
    if let Some(p) = map.get_ptr_mut(&key) {
        return Some(p);
    }
    // By reference: the helper gets a pointer into .rodata instead of a zeroed stack copy.
    let _ = map.insert(&key, zero, BPF_NOEXIST as u64);
    let p = map.get_ptr_mut(&key);
    if p.is_none() {
        count(full);
    }
    p
}

#[inline(always)]
fn begin(pid_tgid: u64, fd: u32, kind: u32, op: u32, connected: u32, len: u64) -> Option<()> {
    let t = thread_sends(pid_tgid)?;
    // Last thing before the syscall body runs: the latency is the syscall's.
    let ts_ns = now_ns();
    // SAFETY: map value pointer; only this thread writes its own entry.
    unsafe {
        let p = &raw mut (*t).inflight;
        (*p).fd = fd;
        (*p).kind = kind;
        (*p).op = op;
        (*p).connected = connected;
        (*p).len = len;
        (*p).ts_ns = ts_ns;
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Enter handlers

#[tracepoint]
pub fn enter_sendto(ctx: TracePointContext) -> u32 {
    let _ = try_enter_sendto(&ctx);
    0
}

fn try_enter_sendto(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    let addr = field::<u64>(ctx, SENDTO_ADDR);
    let addr_len = field::<u64>(ctx, SENDTO_ADDRLEN);
    let connected = addr == 0 || addr_len == 0;
    if !connected && !addr_len_possible(cfg, addr_len) {
        return None;
    }
    if !is_php(cfg) {
        return None;
    }
    let fd = field::<u64>(ctx, ARG0) as u32;
    let len = field::<u64>(ctx, ARG2);
    let id = pid_tgid();
    if connected {
        // send(2) on a connected socket (PHP's udg:// and unix:// streams).
        let kind = conn_kind((id >> 32) as u32, fd)?;
        begin(id, fd, kind, OP_SEND, 1, len)
    } else {
        let kind = match_addr(cfg, addr, addr_len)?;
        begin(id, fd, kind, OP_SEND, 0, len)
    }
}

#[tracepoint]
pub fn enter_sendmsg(ctx: TracePointContext) -> u32 {
    let _ = try_enter_sendmsg(&ctx);
    0
}

fn try_enter_sendmsg(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    let fd = field::<u64>(ctx, ARG0) as u32;
    let msg = field::<u64>(ctx, ARG1);
    let id = pid_tgid();
    // user_msghdr: msg_name (ptr) at 0, msg_namelen (int) at 8.
    let mut hdr = MaybeUninit::<[u64; 2]>::uninit();
    // SAFETY: 16 bytes into a 16-byte buffer.
    let r =
        unsafe { bpf_probe_read_user(hdr.as_mut_ptr().cast::<c_void>(), 16, msg as *const c_void) };
    if r != 0 {
        return None;
    }
    // SAFETY: written by the successful read above.
    let [name, namelen] = unsafe { hdr.assume_init() };
    let namelen = namelen & 0xffff_ffff;
    // The length is spread over the iovec array: unknown (0), so a short sendmsg is not seen
    // as a half-written frame. PHP never sends with sendmsg.
    if name == 0 || namelen == 0 {
        let kind = conn_kind((id >> 32) as u32, fd)?;
        begin(id, fd, kind, OP_SEND, 1, 0)
    } else {
        if !addr_len_possible(cfg, namelen) {
            return None;
        }
        let kind = match_addr(cfg, name, namelen)?;
        begin(id, fd, kind, OP_SEND, 0, 0)
    }
}

#[tracepoint]
pub fn enter_write(ctx: TracePointContext) -> u32 {
    let _ = try_enter_write(&ctx);
    0
}

fn try_enter_write(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    let fd = field::<u64>(ctx, ARG0) as u32;
    let id = pid_tgid();
    let kind = conn_kind((id >> 32) as u32, fd)?;
    begin(id, fd, kind, OP_SEND, 1, field::<u64>(ctx, ARG2))
}

#[tracepoint]
pub fn enter_connect(ctx: TracePointContext) -> u32 {
    let _ = try_enter_connect(&ctx);
    0
}

fn try_enter_connect(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    let addr_len = field::<u64>(ctx, ARG2);
    if !addr_len_possible(cfg, addr_len) || !is_php(cfg) {
        return None;
    }
    let fd = field::<u64>(ctx, ARG0) as u32;
    let addr = field::<u64>(ctx, ARG1);
    let kind = match_addr(cfg, addr, addr_len)?;
    begin(pid_tgid(), fd, kind, OP_CONNECT, 0, 0)
}

/// close(2) releases the fd whatever it returns, so only the enter side is needed.
#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let _ = try_enter_close(&ctx);
    0
}

fn try_enter_close(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    forget_conn(pid_tgid(), field::<u64>(ctx, ARG0) as u32);
    Some(())
}

/// The fd no longer names its socket (closed, or `dup2`'d over). A stream connection whose
/// last send was short or EAGAIN goes with a frame half written: the sender gave up on it
/// (PHP after `stream_wait_ms`), a profile lost. One lookup, as the plain removal was, for the
/// fds that are not agent sockets (nearly all).
#[inline(always)]
fn forget_conn(id: u64, fd: u32) {
    let key = ConnKey {
        tgid: (id >> 32) as u32,
        fd,
    };
    // SAFETY: values copied out immediately.
    let Some((kind, at, open)) =
        unsafe { CONNS.get(key) }.map(|c| (c.kind, c.exec_id, c.frame_open))
    else {
        return;
    };
    let _ = CONNS.remove(key);
    // An entry from before an exec names an fd close-on-exec already closed: not this one.
    if open == 0 || kind != SockKind::Stream as u32 || at != exec_id() {
        return;
    }
    if let Some(h) = HOST_SENDS.get_ptr_mut(SockKind::Stream as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*h).c.abandoned += 1 };
    }
    if let Some(t) = thread_sends(id) {
        // SAFETY: map value pointer of the current thread's entry; only it writes there.
        unsafe { (*t).sends.sock[SockKind::Stream as usize].abandoned += 1 };
    }
}

/// `dup2`/`dup3` close `newfd` first when it is open (and differs from `oldfd`): it no longer
/// names the socket it was connected to. Forgotten at the enter: a `dup2` that then fails
/// (bad `oldfd`) leaves `newfd` open and its later sends uncounted, which only a broken
/// program does.
#[tracepoint]
pub fn enter_dup2(ctx: TracePointContext) -> u32 {
    let _ = try_enter_dup(&ctx);
    0
}

#[tracepoint]
pub fn enter_dup3(ctx: TracePointContext) -> u32 {
    let _ = try_enter_dup(&ctx);
    0
}

fn try_enter_dup(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    let old = field::<u64>(ctx, ARG0) as u32;
    let new = field::<u64>(ctx, ARG1) as u32;
    if old == new {
        return None;
    }
    forget_conn(pid_tgid(), new);
    Some(())
}

#[tracepoint]
pub fn enter_close_range(ctx: TracePointContext) -> u32 {
    let _ = try_enter_close_range(&ctx);
    0
}

fn try_enter_close_range(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    if field::<u64>(ctx, ARG2) & CLOSE_RANGE_CLOEXEC != 0 {
        return None;
    }
    let first = field::<u64>(ctx, ARG0) as u32;
    let last = field::<u64>(ctx, ARG1) as u32;
    let tgid = (pid_tgid() >> 32) as u32;
    let mut i = 0;
    while i < CLOSE_RANGE_SCAN {
        let fd = first.wrapping_add(i);
        if fd < first || fd > last {
            break;
        }
        let _ = CONNS.remove(ConnKey { tgid, fd });
        i += 1;
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Exit handlers

#[tracepoint]
pub fn exit_sendto(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, OP_SEND);
    0
}

#[tracepoint]
pub fn exit_sendmsg(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, OP_SEND);
    0
}

#[tracepoint]
pub fn exit_write(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, OP_SEND);
    0
}

#[tracepoint]
pub fn exit_connect(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx, OP_CONNECT);
    0
}

#[inline(always)]
fn proc_sends(tgid: u32) -> Option<*mut ProcSends> {
    get_or_insert_zero(&PROC_SENDS, tgid, &ZERO_PROC, Health::ProcSendsFull)
}

#[inline(always)]
fn try_exit(ctx: &TracePointContext, op: u32) -> Option<()> {
    let cfg = config()?;
    if !is_php(cfg) {
        return None;
    }
    let id = pid_tgid();
    let t = SENDS.get_ptr_mut(id)?;
    // SAFETY: map value pointer; only this thread writes its own entry. Copied out, then
    // marked free (ts_ns 0) whatever happens next.
    let inf = unsafe {
        let p = &raw mut (*t).inflight;
        let inf = *p;
        (*p).ts_ns = 0;
        inf
    };
    if inf.ts_ns == 0 || inf.op != op {
        return None;
    }
    let now = now_ns();
    let ret = field::<i64>(ctx, EXIT_RET);
    let tgid = (id >> 32) as u32;
    let kind = (inf.kind & 1) as usize;

    if op == OP_CONNECT {
        if ret == 0 {
            let key = ConnKey { tgid, fd: inf.fd };
            let v = ConnInfo {
                kind: inf.kind,
                exec_id: exec_id(),
                eagain_since_ns: 0,
                frame_open: 0,
                _pad: 0,
            };
            if CONNS.insert(key, v, 0).is_err() {
                count(Health::ConnsFull);
            }
            aya_log_ebpf::debug!(
                ctx,
                "tgid {} connected fd {} to agent socket kind {}",
                tgid,
                inf.fd,
                inf.kind
            );
            return Some(());
        }
        // A failed connect to the agent's socket is a profile PHP could not send.
        count_failure(t, kind, ret);
        return Some(());
    }

    let lat = now.wrapping_sub(inf.ts_ns);
    // Stream backpressure: time from a connection's first EAGAIN to its next success.
    let mut blocked = 0u64;
    if inf.connected != 0
        && kind == SockKind::Stream as usize
        && let Some(c) = CONNS.get_ptr_mut(ConnKey { tgid, fd: inf.fd })
    {
        // SAFETY: map value pointer; one thread of one process uses an fd at a time, and a
        // lost race here only misplaces a waiting interval, never a count.
        unsafe {
            if ret == EAGAIN_RET {
                if (*c).eagain_since_ns == 0 {
                    (*c).eagain_since_ns = inf.ts_ns;
                }
                (*c).frame_open = 1;
            } else if ret >= 0 {
                if (*c).eagain_since_ns != 0 {
                    blocked = now.wrapping_sub((*c).eagain_since_ns);
                    (*c).eagain_since_ns = 0;
                }
                // Short: the rest of the frame is still to come (PHP waits for room and sends
                // it, or gives up and closes).
                (*c).frame_open = u32::from(inf.len != 0 && (ret as u64) < inf.len);
            } else {
                // Any other error: PHP gives the frame up, and the errno counts it as a drop.
                (*c).frame_open = 0;
            }
        }
    }

    if let Some(h) = HOST_SENDS.get_ptr_mut(kind as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            let c: &mut SendCounters = &mut (*h).c;
            if ret >= 0 {
                c.ok += 1;
                c.bytes += ret as u64;
            } else {
                let e = err_index(ret);
                if let Some(x) = c.err.get_mut(e) {
                    *x += 1;
                }
            }
            c.lat_ns_sum += lat;
            c.blocked_ns += blocked;
            if let Some(b) = (*h).hist.get_mut(lat_bucket(lat)) {
                *b += 1;
            }
        }
    }

    // SAFETY: map value pointer; only this thread writes its own counters, so plain adds lose
    // nothing (the agent only reads them; aligned 8-byte stores are never torn).
    unsafe {
        let p = &raw mut (*t).sends;
        let c: &mut SendCounters = &mut (*p).sock[kind];
        if ret >= 0 {
            c.ok += 1;
            c.bytes += ret as u64;
        } else {
            let e = err_index(ret);
            if let Some(x) = c.err.get_mut(e) {
                *x += 1;
            }
        }
        c.lat_ns_sum += lat;
        c.blocked_ns += blocked;
        if ret < 0 && kind == SockKind::Dgram as usize {
            maybe_drop_event(cfg, p, tgid, now);
        }
    }
    Some(())
}

/// Counts a failed connect (no latency: it is not a send). EAGAIN (a full listen backlog, for a
/// non-blocking connect) is also counted on its own: on the stream socket it is a drop, where a
/// send's EAGAIN is waited out.
#[inline(always)]
fn count_failure(t: *mut ThreadSends, kind: usize, ret: i64) {
    let e = err_index(ret);
    let again = u64::from(ret == EAGAIN_RET);
    if let Some(h) = HOST_SENDS.get_ptr_mut(kind as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            if let Some(x) = (*h).c.err.get_mut(e) {
                *x += 1;
            }
            (*h).c.connect_eagain += again;
        }
    }
    // SAFETY: map value pointer of the current thread's entry (see `try_exit`).
    unsafe {
        if let Some(x) = (*t).sends.sock[kind].err.get_mut(e) {
            *x += 1;
        }
        (*t).sends.sock[kind].connect_eagain += again;
    }
}

/// One event when a thread (a PHP process has one) starts dropping datagrams after a quiet
/// gap: the agent logs it at once instead of at its next poll.
#[inline(always)]
unsafe fn maybe_drop_event(cfg: &MonitorConfig, p: *mut ProcSends, tgid: u32, now: u64) {
    // SAFETY (whole body): p points into the current thread's live map value.
    unsafe {
        let last = (*p).last_drop_ns;
        (*p).last_drop_ns = now;
        if last != 0 && now.wrapping_sub(last) < cfg.drop_event_gap_ns {
            return;
        }
        let drops = (*p).sock[SockKind::Dgram as usize].err;
        let mut total = 0u64;
        let mut i = 0;
        while i < apm_common::ERR_KINDS {
            total += drops[i];
            i += 1;
        }
        if let Some(mut e) = EVENTS.reserve::<DropEvent>(0) {
            let ev = e.as_mut_ptr();
            (*ev).hdr = EventHeader {
                kind: EventKind::DropBurst as u32,
                tgid,
                ts_ns: now,
            };
            (*ev).drops_total = total;
            put_comm(&raw mut (*ev).comm);
            e.submit(0);
        } else {
            count(Health::DropEventLost);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let _ = try_rss_stat(&ctx);
    0
}

fn try_rss_stat(ctx: &TracePointContext) -> Option<()> {
    let member = field::<i32>(ctx, RSS_MEMBER);
    if member < 0 || member as usize >= RSS_MEMBERS {
        return None;
    }
    let member = member as usize;
    let cfg = config()?;
    let mm_id = field::<u32>(ctx, RSS_MM_ID);
    let curr = field::<u32>(ctx, RSS_CURR);
    let size = field::<i64>(ctx, RSS_SIZE);
    let size = if size < 0 { 0 } else { size as u64 };

    let tgid = if curr != 0 {
        let tgid = (pid_tgid() >> 32) as u32;
        if tgid != cfg.agent_tgid && !is_php(cfg) {
            return None;
        }
        tgid
    } else {
        // SAFETY: value copied out.
        unsafe { *MM_OWNER.get(mm_id)? }
    };

    let e = match RSS.get_ptr_mut(tgid) {
        Some(e) => e,
        None => {
            if curr == 0 {
                return None;
            }
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "avoids a stack memset"
            )]
            let _ = RSS.insert(tgid, &ZERO_RSS, BPF_NOEXIST as u64);
            let Some(e) = RSS.get_ptr_mut(tgid) else {
                count(Health::RssFull);
                return None;
            };
            if MM_OWNER.insert(mm_id, tgid, 0).is_err() {
                count(Health::MmOwnerFull);
            }
            // SAFETY: map value pointer of the entry just created.
            unsafe {
                (*e).mm_id = mm_id;
                put_comm(&raw mut (*e).comm);
            }
            e
        }
    };
    // SAFETY: map value pointer; rss_stat for one mm is serialised by the mm's owner in the
    // common case, and a lost race only leaves a member one event stale.
    unsafe {
        if curr != 0 && (*e).mm_id != mm_id {
            // exec gave the process a new mm: the old members mean nothing for it, and the
            // agent re-reads /proc for the members the new mm has no event for yet.
            let _ = MM_OWNER.remove((*e).mm_id);
            if MM_OWNER.insert(mm_id, tgid, 0).is_err() {
                count(Health::MmOwnerFull);
            }
            (*e).mm_id = mm_id;
            zero_words((&raw mut (*e).member).cast::<u64>(), RSS_MEMBERS);
            (&raw mut (*e).seen).write_volatile(0);
        }
        // Constant offsets: an index the verifier has to re-derive bounds for is rejected
        // ("unbounded memory access") once LLVM drops the earlier range check.
        let m = &raw mut (*e).member;
        match member {
            0 => (*m)[0] = size,
            1 => (*m)[1] = size,
            2 => (*m)[2] = size,
            _ => (*m)[3] = size,
        }
        (*e).seen |= 1 << member;
        let rss = (*e).rss();
        if rss > (*e).peak {
            (*e).peak = rss;
        }
        let th = cfg.rss_threshold_bytes;
        if th != 0 {
            if rss >= th && (*e).over == 0 {
                (*e).over = 1;
                if let Some(mut ev) = EVENTS.reserve::<RssEvent>(0) {
                    let p = ev.as_mut_ptr();
                    (*p).hdr = EventHeader {
                        kind: EventKind::RssOverThreshold as u32,
                        tgid,
                        ts_ns: now_ns(),
                    };
                    (*p).rss_bytes = rss;
                    (*p).threshold_bytes = th;
                    copy_words(
                        (&raw mut (*p).comm).cast::<u64>(),
                        (&raw const (*e).comm).cast::<u64>(),
                        2,
                    );
                    ev.submit(0);
                } else {
                    count(Health::RssEventLost);
                }
            } else if rss < th - (th >> RSS_REARM_SHIFT) && (*e).over != 0 {
                (*e).over = 0;
            }
        }
    }
    Some(())
}

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_process_exit(&ctx);
    0
}

/// Whether the exiting thread is its process's last one.
#[inline(always)]
fn group_dead(ctx: &TracePointContext, id: u64) -> bool {
    let mode = EXIT_MODE.load();
    if mode == ExitMode::GroupDead as u32 {
        return field::<u8>(ctx, EXIT_GROUP_DEAD) != 0;
    }
    if mode == ExitMode::SignalLive as u32 {
        let (so, lo) = (TASK_SIGNAL_OFFSET.load(), SIGNAL_LIVE_OFFSET.load());
        // SAFETY: BTF-typed loads the verifier checks against the kernel's types (and makes
        // fault-safe): current->signal, then signal->live.counter. do_exit() decrements `live`
        // before this tracepoint, so 0 means no thread of the process is left.
        let live = unsafe {
            let task = bpf_get_current_task_btf().cast::<u8>();
            let sig = task.add(so as usize).cast::<*const u8>().read_volatile();
            sig.add(lo as usize).cast::<i32>().read_volatile()
        };
        return live == 0;
    }
    // No BTF: the thread-group leader's exit stands for the process's.
    (id as u32) == (id >> 32) as u32
}

fn try_process_exit(ctx: &TracePointContext) -> Option<()> {
    let id = pid_tgid();
    let tgid = (id >> 32) as u32;
    // A thread of a process that lives on: its counters move to the process's.
    if !group_dead(ctx, id) {
        return fold_thread(id, tgid);
    }
    // The last thread retires the process.
    retire_process(ctx, id, tgid, true)
}

/// exec: a process that is no longer PHP (a worker's child running `sh`) stops being a worker:
/// retired as at an exit, with what it sent as PHP. One that stays PHP keeps its entries (its
/// connected fds are checked against the exec in `conn_kind`; `rss_stat` sees the new mm).
#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_process_exec(&ctx);
    0
}

fn try_process_exec(ctx: &TracePointContext) -> Option<()> {
    let cfg = config()?;
    if is_php(cfg) {
        return None;
    }
    // exec made the calling thread the leader (de_thread): the process's only thread.
    let id = pid_tgid();
    retire_process(ctx, id, (id >> 32) as u32, false)
}

/// Removes a process's entries and reports them in one exit event. `from_exit`: the comm
/// comes from `sched_process_exit`'s record, else from the current task (after an exec: the
/// new program's).
#[inline(always)]
fn retire_process(ctx: &TracePointContext, id: u64, tgid: u32, from_exit: bool) -> Option<()> {
    // Reserve first and check each lookup right where it is used: LLVM otherwise merges the
    // two null checks into an OR of pointers, which the verifier rejects. Without room in the
    // ring buffer the entries stay, and the agent's sweep retires processes that are gone.
    let Some(mut ev) = EVENTS.reserve::<ExitEvent>(0) else {
        exit_event_lost(tgid, id);
        return None;
    };
    let p = ev.as_mut_ptr();
    let mut had = 0;
    // SAFETY: p is the reserved ring-buffer record; r and s are live map value pointers.
    unsafe {
        (*p).hdr = EventHeader {
            kind: EventKind::WorkerExit as u32,
            tgid,
            ts_ns: now_ns(),
        };
        if from_exit {
            copy_words(
                (&raw mut (*p).comm).cast::<u64>(),
                ctx.as_ptr().cast::<u8>().add(EXIT_COMM).cast::<u64>(),
                2,
            );
        } else {
            put_comm(&raw mut (*p).comm);
        }
        // Without `group_dead`, threads exiting together (exit_group) may each find `live` at 0
        // and get here: whoever removes a shared entry reports it, so nothing counts twice (the
        // agent merges such exit events of one pid).
        // Copied, then removed: when the removal fails another thread took the entry first.
        if let Some(r) = RSS.get_ptr(tgid) {
            (*p).peak_rss = (*r).peak;
            (*p).last_rss = (*r).rss();
            (*p).rss_seen = (*r).seen;
            let mm_id = (*r).mm_id;
            if RSS.remove(tgid).is_ok() {
                had |= EXIT_HAD_RSS;
                let _ = MM_OWNER.remove(mm_id);
            } else {
                zero_rss(p);
            }
        } else {
            zero_rss(p);
        }
        if let Some(s) = PROC_SENDS.get_ptr(tgid) {
            copy_words(
                (&raw mut (*p).sends).cast::<u64>(),
                (&raw const (*s).sock).cast::<u64>(),
                SENDS_WORDS,
            );
            if PROC_SENDS.remove(tgid).is_ok() {
                had |= EXIT_HAD_SENDS;
            } else {
                zero_words((&raw mut (*p).sends).cast::<u64>(), SENDS_WORDS);
            }
        } else {
            zero_words((&raw mut (*p).sends).cast::<u64>(), SENDS_WORDS);
        }
        if let Some(t) = SENDS.get_ptr(id) {
            had |= EXIT_HAD_SENDS;
            let dst = (&raw mut (*p).sends).cast::<u64>();
            let src = (&raw const (*t).sends.sock).cast::<u64>();
            let mut i = 0;
            while i < SENDS_WORDS {
                let d = dst.add(i);
                d.write_volatile(d.read_volatile().wrapping_add(src.add(i).read_volatile()));
                i += 1;
            }
        }
        (*p).had = had;
    }
    if had == 0 {
        ev.discard(0);
        return None;
    }
    // Removed before the event is visible: the agent never sees an entry after its event.
    let _ = SENDS.remove(id);
    ev.submit(0);
    Some(())
}

/// No room for an exit event: counted when the process is one the agent watches (it has
/// entries; most exits on the host are not). One check per map, each on its own: LLVM would
/// otherwise OR the pointers, which the verifier refuses.
#[inline(always)]
fn exit_event_lost(tgid: u32, id: u64) {
    if RSS.get_ptr(tgid).is_some() {
        count(Health::ExitEventLost);
        return;
    }
    if PROC_SENDS.get_ptr(tgid).is_some() {
        count(Health::ExitEventLost);
        return;
    }
    if SENDS.get_ptr(id).is_some() {
        count(Health::ExitEventLost);
    }
}

/// Clears the RSS part of an exit event.
#[inline(always)]
unsafe fn zero_rss(p: *mut ExitEvent) {
    // SAFETY: p is a reserved ring-buffer record. Volatile: plain stores here get merged into a
    // memset call.
    unsafe {
        (&raw mut (*p).peak_rss).write_volatile(0);
        (&raw mut (*p).last_rss).write_volatile(0);
        (&raw mut (*p).rss_seen).write_volatile(0);
    }
}

/// A thread exits while its process lives on: its counters are added to the process's
/// `PROC_SENDS` entry (atomically: sibling threads may exit on other CPUs at the same time) and
/// its `SENDS` entry is removed. A sibling that exits at the same moment as the last thread
/// may fold after the exit event was built; the agent's sweep retires what it left.
#[inline(always)]
fn fold_thread(id: u64, tgid: u32) -> Option<()> {
    let t = SENDS.get_ptr(id)?;
    let p = proc_sends(tgid)?;
    // SAFETY: t and p are live map value pointers; the thread is exiting, so nothing writes
    // its entry any more.
    unsafe {
        let src = (&raw const (*t).sends.sock).cast::<u64>();
        let dst = (&raw mut (*p).sock).cast::<u64>();
        let mut i = 0;
        while i < SENDS_WORDS {
            let v = src.add(i).read_volatile();
            if v != 0 {
                xadd(dst.add(i), v);
            }
            i += 1;
        }
    }
    let _ = SENDS.remove(id);
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Empty programs on the send tracepoints, for overhead baselines (`xtask bench`).

#[tracepoint]
pub fn noop_enter_sendto(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint]
pub fn noop_exit_sendto(_ctx: TracePointContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction (no indexing or arithmetic that can panic is left); the
    // verifier rejects the loop if it ever becomes reachable.
    loop {}
}
