//! Ingest: the datagram and stream sockets PHP sends to. Valid profiles go to the batcher in
//! chunks (one chunk per receive call); a full channel makes ingest wait, so pressure shows up
//! as the kernel queue filling (which the eBPF side counts), never as silent loss in the agent.

pub mod dgram;
pub mod queue;
pub mod socket;
pub mod stream;
pub mod validate;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::events::{AcceptFailed, ConnectionRefused, ProfileRejected};
use crate::telemetry::{ConnRefusal, Server, Socket, SocketLabels, Telemetry, now_ns};

pub use queue::{Chunk, ProfileSink, profile_queue};

/// Sender RSS lookup (from the eBPF monitor), called per profile: must be cheap.
pub type RssLookup = Arc<dyn Fn(u32) -> u64 + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} exists and is not a socket: refusing to remove it (move it away or change ingest.socket)"
    )]
    NotASocket(PathBuf),
    #[error(
        "{0} is in use by a running process (another agent?): stop it first or use another path"
    )]
    InUse(PathBuf),
    #[error("group `{0}` (ingest.socket_group) does not exist")]
    UnknownGroup(String),
    #[error(
        "inherited descriptor {fd} for {path} is {found}, not {expected}: refusing to adopt it \
         (a stale APM_INHERIT_FDS or systemd fd store entry? `systemctl clean --what=fdstore` \
         or restart without it)"
    )]
    Inherited {
        fd: i32,
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
}

impl IngestError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How ingest stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// A final stop: `shutdown(SHUT_RD)` the datagram socket (senders get EPIPE from then on,
    /// which the kernel side counts) and drain every datagram the kernel had accepted.
    Final,
    /// A restart by re-exec: stop reading and hand the sockets back; what is queued stays in
    /// the kernel for the next process.
    Handover,
    /// The socket outlives us elsewhere (systemd's fd store): drain what is queued without
    /// shutting the socket, which the next instance keeps using.
    KeepSocket,
}

/// The stop request every ingest task observes.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    kind: Arc<std::sync::OnceLock<StopKind>>,
}

impl StopSignal {
    pub fn stop(&self, kind: StopKind) {
        let _ = self.kind.set(kind);
        self.token.cancel();
    }

    pub fn kind(&self) -> StopKind {
        *self.kind.get().unwrap_or(&StopKind::Final)
    }

    pub async fn stopped(&self) -> StopKind {
        self.token.cancelled().await;
        self.kind()
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// The bound sockets, created before the pipeline starts so that a bind error is a startup
/// error and so that a restart can hand them over.
pub struct Sockets {
    pub dgram: std::os::unix::net::UnixDatagram,
    pub stream: std::os::unix::net::UnixListener,
    pub queue_len: u32,
}

impl Sockets {
    pub fn bind(cfg: &IngestConfig, mode: u32) -> Result<Self, IngestError> {
        let group = cfg.socket_group.as_deref();
        let d = socket::bind_dgram(&cfg.socket, mode, group, cfg.queue_len)?;
        let stream = socket::bind_stream(&cfg.stream_socket, mode, group)?;
        tracing::info!(
            socket = %cfg.socket.display(), stream_socket = %cfg.stream_socket.display(),
            queue_len = d.queue_len, "ingest sockets bound"
        );
        Ok(Self {
            dgram: d.socket,
            stream,
            queue_len: d.queue_len,
        })
    }

    /// Takes over sockets a previous process handed down (re-exec or systemd's fd store).
    pub fn adopt(
        dgram: i32,
        stream: i32,
        queue_len: u32,
        cfg: &IngestConfig,
    ) -> Result<Self, IngestError> {
        // Both are checked before either is taken: a refused pair leaves both descriptors to
        // whoever handed them down.
        socket::check_inherited(dgram, &cfg.socket, socket::Expect::Datagram)?;
        socket::check_inherited(stream, &cfg.stream_socket, socket::Expect::StreamListener)?;
        let dgram = std::os::unix::net::UnixDatagram::from(socket::adopt_fd(
            dgram,
            &cfg.socket,
            socket::Expect::Datagram,
        )?);
        let stream = std::os::unix::net::UnixListener::from(socket::adopt_fd(
            stream,
            &cfg.stream_socket,
            socket::Expect::StreamListener,
        )?);
        dgram
            .set_nonblocking(true)
            .map_err(|e| IngestError::io("set nonblocking", &cfg.socket, e))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| IngestError::io("set nonblocking", &cfg.stream_socket, e))?;
        tracing::info!(socket = %cfg.socket.display(), queue_len, "ingest sockets inherited: no datagram was dropped across the restart");
        Ok(Self {
            dgram,
            stream,
            queue_len,
        })
    }
}

pub struct Ingest {
    pub cfg: IngestConfig,
    pub sockets: Sockets,
    pub telemetry: Arc<Telemetry>,
    pub rss: Option<RssLookup>,
    pub live: Arc<crate::pipeline::liveness::Liveness>,
}

impl Ingest {
    /// Runs both receivers until `stop`, then stops as it says (see [`StopKind`]). On a handover
    /// the sockets are given back for the next process.
    pub async fn run(
        self,
        out: ProfileSink,
        stop: StopSignal,
    ) -> Result<Option<Sockets>, IngestError> {
        let queue_len = self.sockets.queue_len;
        self.telemetry
            .dgram_queue_len
            .set(i64::from(self.sockets.queue_len));
        let dgram = tokio::net::UnixDatagram::from_std(self.sockets.dgram)
            .map_err(|e| IngestError::io("register", &self.cfg.socket, e))?;
        let listener = tokio::net::UnixListener::from_std(self.sockets.stream)
            .map_err(|e| IngestError::io("register", &self.cfg.stream_socket, e))?;
        let d = tokio::spawn(run_dgram(
            dgram,
            DgramParams {
                queue_len,
                batch: self.cfg.recv_batch,
                max_payload: self.cfg.max_payload_bytes,
                telemetry: self.telemetry.clone(),
                rss: self.rss.clone(),
                live: self.live.clone(),
            },
            out.clone(),
            stop.clone(),
        ));
        let s = tokio::spawn(run_stream(
            listener,
            self.cfg.clone(),
            self.telemetry.clone(),
            self.rss.clone(),
            out,
            stop.clone(),
        ));
        let (a, b) = tokio::join!(d, s);
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                tracing::error!(dgram = ?a.err(), stream = ?b.err(), "ingest task failed");
                return Ok(None);
            }
        };
        if stop.kind() != StopKind::Handover {
            return Ok(None);
        }
        if let (Some(Ok(dgram)), Some(Ok(stream))) = (
            a.map(tokio::net::UnixDatagram::into_std),
            b.map(tokio::net::UnixListener::into_std),
        ) {
            Ok(Some(Sockets {
                dgram,
                stream,
                queue_len,
            }))
        } else {
            tracing::error!("cannot hand the ingest sockets over");
            Ok(None)
        }
    }
}

struct DgramParams {
    live: Arc<crate::pipeline::liveness::Liveness>,
    /// The kernel queue's length: the largest write-ahead group.
    queue_len: u32,
    batch: usize,
    max_payload: usize,
    telemetry: Arc<Telemetry>,
    rss: Option<RssLookup>,
}

/// Receives until stopped; returns the socket on a handover.
async fn run_dgram(
    mut sock: tokio::net::UnixDatagram,
    p: DgramParams,
    out: ProfileSink,
    stop: StopSignal,
) -> Option<tokio::net::UnixDatagram> {
    let mut rx = dgram::DgramReceiver::new(p.batch, p.max_payload);
    let mut group = Group::new(&p, out.clone());
    let fd = sock.as_raw_fd();
    let mut draining = false;
    // Reading was shut down (a final stop): an empty queue then reads as end of input.
    let mut shut = false;
    let mut beat = tokio::time::interval(crate::pipeline::liveness::BEAT);
    let mut pace = Pace::new(p.queue_len);
    loop {
        if !draining {
            tokio::select! {
                biased;
                _ = beat.tick() => {
                    p.live.beat(crate::pipeline::liveness::Stage::Ingest);
                    continue;
                }
                kind = stop.stopped() => {
                    match kind {
                        StopKind::Handover => {
                            tracing::info!("datagram socket handed over; queued datagrams wait in the kernel");
                            return Some(sock);
                        }
                        StopKind::Final => {
                            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
                            shut = true;
                            tracing::info!("datagram socket shut for reading; draining the kernel queue");
                        }
                        StopKind::KeepSocket => tracing::info!("draining the kernel queue; the socket stays open in the fd store"),
                    }
                    draining = true;
                    continue;
                }
                r = sock.readable() => if r.is_err() { return None },
            }
        }
        let res = if draining {
            rx.recv(fd, now_ns(), shut)
        } else {
            sock.try_io(Interest::READABLE, || rx.recv(fd, now_ns(), false))
        };
        match res {
            Ok(o) => {
                pace.read(&o);
                let eof = o.eof;
                let thin = !draining && !group.on && o.datagrams <= THIN_READ;
                let handed = match forward(&p, &out, o).await {
                    Ok(n) => n,
                    Err(queue::Closed) => {
                        tracing::error!("batcher gone: stopping datagram receive");
                        return None;
                    }
                };
                if eof {
                    group.commit().await;
                    tracing::info!("datagram queue drained");
                    return None;
                }
                group.add(handed).await;
                if thin && pace.chasing() {
                    // Blocks the runtime's thread on purpose: a timer of the runtime cannot
                    // wait less than a millisecond, and the senders need the core now.
                    std::thread::sleep(THIN_WAIT);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The queue is read out: the group ends here.
                group.commit().await;
                if draining {
                    tracing::info!("datagram queue drained");
                    return None;
                }
                // Below saturation: let the next datagrams gather rather than wake for each
                // (write-ahead groups gather in `commit` instead).
                if pace.read_out(tokio::time::Instant::now()) && !group.on {
                    match gather(sock).await {
                        Some(s) => sock = s,
                        None => return None,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "datagram receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long datagrams gather in the kernel queue after ingest has read it out, below
/// saturation (`overflow` mode). PHP sends one datagram per request, so at a few thousand
/// requests per second a socket in the runtime's epoll set wakes the agent for nearly every
/// one: a context switch, an `epoll_wait` and two `recvmmsg` per profile, most of the agent's
/// CPU at a steady rate (the performance issue's `strace -c`: 50k `epoll_wait` in 10 s at
/// 5000/s). Gathering for 5 ms reads ~25 per wake at that rate. It adds at most this long in the
/// kernel queue, and nothing near saturation ([`Pace`]).
pub const GATHER: Duration = Duration::from_millis(5);

/// A Unix datagram is charged to its sender's send buffer (`wmem_default`, 208 KiB) until
/// ingest reads it, so a sender whose datagrams wait in the queue gets EAGAIN once it has that
/// much there. No gathering while any one sender has sent this much since the queue was last
/// read out: a quarter of that buffer, so gathering never brings a sender near it (two
/// benchmark senders of 16 KiB profiles flat out have ~190 KiB each in the queue at every wake;
/// gathering for them would cap both at ~4000/s). PHP workers send one profile per request.
pub const GATHER_MAX_SENDER_BYTES: usize = 52 * 1024;

/// After a wake that says "busy", no gathering for this long: at saturation a wake right after
/// one that emptied the queue finds little, and gathering then would stall the senders for
/// `GATHER` again and again; this way at most once a second.
pub const GATHER_BACKOFF: Duration = Duration::from_secs(1);

/// A read of at most this many datagrams is thin: see [`THIN_WAIT`].
pub const THIN_READ: usize = 2;

/// Datagrams read since the queue was last found empty from which a thin read means ingest is
/// chasing a dense stream: see [`THIN_WAIT`].
pub const THIN_STREAK: usize = 16;

/// How long ingest leaves the core to the senders after a thin read while chasing a stream
/// ([`THIN_STREAK`] datagrams and more without finding the queue empty). Two senders flat out
/// with the agent on 2 cores: ingest, caught up, read one or two datagrams per `recvmmsg` and
/// paid the call, the hand-off to the batcher and the wake-ups for each (0.5-0.6 calls per
/// profile with eBPF on). Waiting 50 us lets some 30 gather: 0.04 calls per profile, 1.9-2.1
/// instead of 2.6-2.9 us of agent CPU per profile, and as many or more delivered
/// (docs/BENCHMARKS.md, compare section; `PAIR_SINK=count SYSCALLS=1
/// xtask/scripts/flat-out-cpu.sh 1024 4000000`; at 16 KiB no change beyond the noise). At a
/// steady rate the queue is found empty every read or two (a wake per datagram in the second
/// after a busy read-out, 25 or so per gathered read otherwise), so nothing waits there.
pub const THIN_WAIT: Duration = Duration::from_micros(50);

/// Decides when ingest may gather, from what it read since the queue was last found empty.
struct Pace {
    /// A quarter of the kernel queue: gathering never fills more of it (4x bursts fit).
    max_datagrams: usize,
    datagrams: usize,
    /// Payload bytes per sender pid (the unknown pid counts as one sender).
    senders: std::collections::HashMap<u32, usize>,
    /// Some sender has sent [`GATHER_MAX_SENDER_BYTES`] since the last read-out.
    heavy: bool,
    calm_from: Option<tokio::time::Instant>,
}

impl Pace {
    fn new(queue_len: u32) -> Self {
        Self {
            max_datagrams: (queue_len as usize / 4).max(1),
            datagrams: 0,
            senders: std::collections::HashMap::new(),
            heavy: false,
            calm_from: None,
        }
    }

    fn read(&mut self, o: &dgram::RecvOutcome) {
        self.datagrams += o.datagrams;
        if self.heavy || self.datagrams >= self.max_datagrams {
            return; // busy already
        }
        for p in &o.profiles {
            let b = self.senders.entry(p.pid).or_default();
            *b += p.payload.len();
            self.heavy |= *b >= GATHER_MAX_SENDER_BYTES;
        }
    }

    /// Ingest has read [`THIN_STREAK`] datagrams or more without finding the queue empty: a
    /// thin read then waits [`THIN_WAIT`].
    fn chasing(&self) -> bool {
        self.datagrams >= THIN_STREAK
    }

    /// The queue was read out: whether to gather now. Starts the next count.
    fn read_out(&mut self, now: tokio::time::Instant) -> bool {
        let busy = self.heavy || self.datagrams >= self.max_datagrams;
        self.datagrams = 0;
        self.heavy = false;
        self.senders.clear();
        if busy {
            self.calm_from = Some(now + GATHER_BACKOFF);
            return false;
        }
        self.calm_from.is_none_or(|t| now >= t)
    }
}

/// Sleeps [`GATHER`] with the socket out of the runtime's epoll set, and puts it back. Only a
/// socket out of the set lets datagrams arrive without waking anyone: the runtime's epoll is
/// edge-triggered, so each arrival ends its `epoll_wait`, whether a task waits for the socket or
/// not (measured with `xtask/scripts/cpu-at-rate.sh`: at 5000/s a sleep with the socket left in
/// saved a fifth of the CPU, taken out more than half). `None`: the runtime refused the socket (it is closed; ingest stops and
/// the liveness check reports it).
async fn gather(sock: tokio::net::UnixDatagram) -> Option<tokio::net::UnixDatagram> {
    let std_sock = match sock.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot take the datagram socket out of the event loop: stopping datagram receive");
            return None;
        }
    };
    tokio::time::sleep(GATHER).await;
    match tokio::net::UnixDatagram::from_std(std_sock) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot put the datagram socket back into the event loop: stopping datagram receive");
            None
        }
    }
}

/// `spool.mode = "always"`: the datagrams read since the last commit (pipeline/durable.rs).
/// Ingest reads the kernel queue out (or a queue's worth, `ingest.queue_len`), ends the group,
/// waits until the router has written it ahead, and then lets the next group gather in the
/// kernel queue for [`GROUP_WINDOW`] before reading again: what only memory holds is one group,
/// and batches stay a window's traffic rather than a datagram each. In `overflow` mode this
/// does nothing.
struct Group {
    telemetry: Arc<Telemetry>,
    out: ProfileSink,
    on: bool,
    cap: u64,
    handed: u64,
    started: Option<tokio::time::Instant>,
}

/// How long the next group gathers in the kernel queue after a commit (write-ahead mode). Short
/// against `batch.max_age` and the kernel queue's length at PHP's rates, long against an fsync.
pub const GROUP_WINDOW: Duration = Duration::from_millis(10);

impl Group {
    fn new(p: &DgramParams, out: ProfileSink) -> Self {
        Self {
            on: p.telemetry.gate.write_ahead(),
            telemetry: p.telemetry.clone(),
            out,
            cap: u64::from(p.queue_len.max(1)),
            handed: 0,
            started: None,
        }
    }

    /// `n` profiles were handed; a group of a full queue's worth is committed at once.
    async fn add(&mut self, n: u64) {
        if !self.on || n == 0 {
            return;
        }
        self.started.get_or_insert_with(tokio::time::Instant::now);
        self.handed += n;
        if self.handed >= self.cap {
            self.commit().await;
        }
    }

    /// Ends the group, waits for its write-ahead, then lets the next one gather.
    async fn commit(&mut self) {
        let Some(started) = self.started.take() else {
            return;
        };
        self.handed = 0;
        let gate = &self.telemetry.gate;
        let Ok(mark) = self.out.flush(gate).await else {
            return;
        };
        gate.wait_commit(mark).await;
        tokio::time::sleep_until(started + GROUP_WINDOW).await;
    }
}

/// Counts the rejects of one receive, stamps each profile with its sender's RSS, and hands
/// the profiles to the batcher; returns how many, `Err` when the batcher is gone.
async fn forward(
    p: &DgramParams,
    out: &ProfileSink,
    o: dgram::RecvOutcome,
) -> Result<u64, queue::Closed> {
    for &reason in &o.rejected {
        ProfileRejected { reason, pid: None }.emit(&p.telemetry);
    }
    if o.profiles.is_empty() {
        return Ok(0);
    }
    let mut profiles = o.profiles;
    if let Some(f) = &p.rss {
        for pr in &mut profiles {
            pr.rss_bytes = f(pr.pid);
        }
    }
    let n = profiles.len() as u64;
    let bytes: u64 = profiles.iter().map(|x| x.payload.len() as u64).sum();
    out.send(profiles, &p.telemetry.gate).await?;
    p.telemetry
        .received
        .get_or_create(&SocketLabels {
            socket: Socket::Dgram,
        })
        .inc_by(n);
    p.telemetry.received_bytes.inc_by(bytes);
    Ok(n)
}

/// Stream connections held per peer uid, so that one local user cannot take every slot.
/// Root and the PHP-FPM workers' own uid cannot be told apart from an attacker running as
/// them; `ingest.max_stream_connections_per_uid` is sized for a full PHP pool for that reason.
struct UidSlots {
    held: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
    max: usize,
}

/// One connection's share of its uid's slots, given back on drop.
struct UidSlot {
    slots: Arc<UidSlots>,
    uid: u32,
}

impl UidSlots {
    fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(uid).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// The peer's pid and uid (SO_PEERCRED), or [`dgram::UNKNOWN_ID`] for each.
fn peer(stream: &tokio::net::UnixStream) -> (u32, u32) {
    stream
        .peer_cred()
        .ok()
        .and_then(|c| Some((u32::try_from(c.pid()?).ok()?, c.uid())))
        .unwrap_or((dgram::UNKNOWN_ID, dgram::UNKNOWN_ID))
}

/// What every stream connection is served with.
struct StreamParts {
    cfg: IngestConfig,
    telemetry: Arc<Telemetry>,
    rss: Option<RssLookup>,
    out: ProfileSink,
    shutdown: CancellationToken,
    /// The bytes all incomplete frames larger than [`stream::BASE_BUFFER`] share.
    budget: Arc<Semaphore>,
}

impl StreamParts {
    /// Serves `stream` (from peer `pid`, `uid`) on `conns`; `held` (the connection's slots)
    /// is given back when it ends.
    fn spawn(
        &self,
        conns: &mut tokio::task::JoinSet<()>,
        stream: tokio::net::UnixStream,
        (pid, uid): (u32, u32),
        held: impl Send + 'static,
    ) {
        self.telemetry.stream_connections.inc();
        let conn = stream::Conn {
            stream,
            pid,
            uid,
            max_payload: self.cfg.max_payload_bytes,
            idle: self.cfg.stream_idle_timeout,
            frame_timeout: self.cfg.stream_frame_timeout,
            budget: self.budget.clone(),
            telemetry: self.telemetry.clone(),
            rss: self.rss.clone(),
        };
        let (out, sd, t) = (
            self.out.clone(),
            self.shutdown.clone(),
            self.telemetry.clone(),
        );
        conns.spawn(async move {
            conn.serve(out, sd).await;
            t.stream_connections.dec();
            drop(held);
        });
    }
}

async fn run_stream(
    listener: tokio::net::UnixListener,
    cfg: IngestConfig,
    telemetry: Arc<Telemetry>,
    rss: Option<RssLookup>,
    out: ProfileSink,
    stop: StopSignal,
) -> Option<tokio::net::UnixListener> {
    let shutdown = stop.token();
    let permits = Arc::new(Semaphore::new(cfg.max_stream_connections));
    let uids = Arc::new(UidSlots {
        held: std::sync::Mutex::default(),
        max: cfg.max_stream_connections_per_uid,
    });
    let parts = StreamParts {
        budget: Arc::new(Semaphore::new(cfg.stream_buffer_bytes)),
        cfg,
        telemetry,
        rss,
        out,
        shutdown: shutdown.clone(),
    };
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Wait for a connection slot first: extra clients wait in the listen backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let (pid, uid) = peer(&stream);
                let Some(uid_slot) = uids.take(uid) else {
                    ConnectionRefused {
                        reason: ConnRefusal::PerUidLimit,
                        pid: Some(pid),
                        uid: Some(uid),
                    }
                    .emit(&parts.telemetry);
                    continue;
                };
                parts.spawn(&mut conns, stream, (pid, uid), (uid_slot, permit));
            }
            Err(error) => {
                AcceptFailed {
                    server: Server::Stream,
                    error: &error,
                }
                .back_off(&parts.telemetry)
                .await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    if stop.kind() == StopKind::Final {
        drain_backlog(&listener, &parts, &mut conns);
    }
    // Connections already accepted drain what they hold (Conn::serve sees the cancellation).
    while conns.join_next().await.is_some() {}
    (stop.kind() == StopKind::Handover).then_some(listener)
}

/// A final stop: refuse new connections (`shutdown(SHUT_RD)` on the listener makes `connect`
/// fail with `ECONNREFUSED`), then accept every connection still waiting in the listen backlog
/// and serve it as a draining one. Those clients' writes already succeeded: the kernel holds
/// their frames, and closing the listener would reset them unread. Slot limits do not apply:
/// the backlog is bounded by the kernel, and each connection is shut for reading at once.
fn drain_backlog(
    listener: &tokio::net::UnixListener,
    parts: &StreamParts,
    conns: &mut tokio::task::JoinSet<()>,
) {
    use nix::sys::socket::{SockFlag, accept4};
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd = listener.as_raw_fd();
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
    let mut drained = 0u64;
    // Ends at the first error: EAGAIN (nothing left) or EINVAL (the kernel's answer to accept
    // on a shut, empty listener).
    while let Ok(raw) = accept4(fd, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        match tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(owned)) {
            Ok(stream) => {
                let who = peer(&stream);
                parts.spawn(conns, stream, who, ());
                drained += 1;
            }
            Err(error) => AcceptFailed {
                server: Server::Stream,
                error: &error,
            }
            .emit(&parts.telemetry),
        }
    }
    if drained > 0 {
        tracing::info!(
            connections = drained,
            "stream connections waiting in the listen backlog drained at stop"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;
    use crate::pipeline::model::Profile;

    fn read_of(senders: &[(u32, usize)]) -> dgram::RecvOutcome {
        dgram::RecvOutcome {
            profiles: senders
                .iter()
                .map(|&(pid, len)| Profile {
                    payload: bytes::Bytes::from(vec![b' '; len]),
                    received_ns: 0,
                    pid,
                    uid: 0,
                    rss_bytes: 0,
                })
                .collect(),
            datagrams: senders.len(),
            ..Default::default()
        }
    }

    /// Gathering is for steady traffic below saturation: a few small datagrams per read-out
    /// from many senders. It must stop for a second once a read-out says that a quarter of the
    /// kernel queue arrived, or that one sender has a quarter of its send buffer waiting.
    #[test]
    fn gathering_stops_for_a_second_when_the_queue_or_a_sender_is_busy() {
        let t0 = tokio::time::Instant::now();
        let mut pace = Pace::new(2048);
        // 25 profiles of 1 KiB from 25 workers: gather.
        pace.read(&read_of(&(0..25).map(|w| (w, 1024)).collect::<Vec<_>>()));
        assert!(pace.read_out(t0));
        // 512 datagrams (a quarter of 2048) in one read-out: busy.
        pace.read(&read_of(&(0..512).map(|w| (w, 100)).collect::<Vec<_>>()));
        assert!(!pace.read_out(t0));
        // A quiet read-out right after: still no gathering, until the backoff has passed.
        pace.read(&read_of(&[(1, 1024)]));
        assert!(!pace.read_out(t0 + GATHER_BACKOFF - Duration::from_millis(1)));
        pace.read(&read_of(&[(1, 1024)]));
        assert!(pace.read_out(t0 + GATHER_BACKOFF));
        // One sender with 4 x 16 KiB waiting (64 KiB >= 52 KiB), the others light: busy.
        pace.read(&read_of(&[
            (7, 16384),
            (8, 1024),
            (7, 16384),
            (7, 16384),
            (7, 16384),
        ]));
        let t1 = t0 + GATHER_BACKOFF * 2;
        assert!(!pace.read_out(t1));
        // The same bytes spread over four senders are not.
        pace.read(&read_of(&[(1, 16384), (2, 16384), (3, 16384), (4, 16384)]));
        assert!(
            !pace.read_out(t1 + Duration::from_millis(10)),
            "still backing off"
        );
        pace.read(&read_of(&[(1, 16384), (2, 16384), (3, 16384), (4, 16384)]));
        assert!(pace.read_out(t1 + GATHER_BACKOFF));
    }

    /// Thin reads wait only while ingest chases a stream: 16 datagrams or more since the queue
    /// was last found empty. A wake per datagram (the second after a busy read-out, at a steady
    /// rate) never waits.
    #[test]
    fn a_thin_read_waits_only_while_chasing_a_stream() {
        let t0 = tokio::time::Instant::now();
        let mut pace = Pace::new(2048);
        for _ in 0..100 {
            pace.read(&read_of(&[(1, 1024)]));
            assert!(!pace.chasing(), "one datagram per read-out");
            pace.read_out(t0);
        }
        for i in 1..=20usize {
            pace.read(&read_of(&[(1, 1024)]));
            assert_eq!(
                pace.chasing(),
                i >= THIN_STREAK,
                "after {i} without a read-out"
            );
        }
        pace.read_out(t0);
        assert!(!pace.chasing(), "a read-out ends the streak");
    }

    /// Issue (security) 10: an inherited descriptor (systemd's fd store, `APM_INHERIT_FDS`,
    /// `LISTEN_FDS`) was adopted whatever it was. Each of these must be refused with an error
    /// that names the socket, and never be adopted.
    #[test]
    fn an_inherited_descriptor_of_the_wrong_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IngestConfig {
            socket: dir.path().join("d.sock"),
            stream_socket: dir.path().join("s.sock"),
            ..IngestConfig::default()
        };
        // Each case: (dgram fd, stream fd, what is wrong). The descriptors are leaked on
        // purpose: a refused one stays its owner's, and the old code closed them itself.
        let good_dgram = || {
            let d = std::os::unix::net::UnixDatagram::bind(
                dir.path()
                    .join(format!("good-{}.sock", rand::random::<u32>())),
            )
            .unwrap();
            d.into_raw_fd()
        };
        let good_stream = || {
            std::os::unix::net::UnixListener::bind(
                dir.path()
                    .join(format!("good-{}.sock", rand::random::<u32>())),
            )
            .unwrap()
            .into_raw_fd()
        };
        let file = || {
            std::fs::File::create(dir.path().join("regular"))
                .unwrap()
                .into_raw_fd()
        };
        let tcp = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .into_raw_fd()
        };
        let udp = || {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .into_raw_fd()
        };
        let unbound_unix_dgram = || {
            std::os::unix::net::UnixDatagram::unbound()
                .unwrap()
                .into_raw_fd()
        };
        let not_listening = || {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.into_raw_fd()
        };
        let cases: Vec<(i32, i32, &str)> = vec![
            (good_dgram(), file(), "a regular file as the stream socket"),
            (
                file(),
                good_stream(),
                "a regular file as the datagram socket",
            ),
            (good_dgram(), tcp(), "a TCP listener as the stream socket"),
            (udp(), good_stream(), "a UDP socket as the datagram socket"),
            (
                good_dgram(),
                good_dgram(),
                "a datagram socket as the stream socket",
            ),
            (
                good_stream(),
                good_stream(),
                "a stream listener as the datagram socket",
            ),
            (
                good_dgram(),
                not_listening(),
                "a connected, not listening, unix stream",
            ),
            (
                unbound_unix_dgram(),
                good_stream(),
                "an unbound datagram socket",
            ),
            (
                good_dgram(),
                999_999,
                "a descriptor number that is not open",
            ),
        ];
        let mut adopted = Vec::new();
        for (d, s, what) in cases {
            match Sockets::adopt(d, s, 0, &cfg) {
                Ok(sockets) => {
                    adopted.push(what);
                    // Leak: the test's own descriptors are not the adopter's to close.
                    std::mem::forget(sockets);
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("inherited") && msg.contains(".sock"),
                        "{what}: unclear error: {msg}"
                    );
                }
            }
        }
        assert!(adopted.is_empty(), "adopted: {adopted:#?}");
    }

    #[test]
    fn inherited_sockets_of_the_right_kind_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IngestConfig {
            socket: dir.path().join("d.sock"),
            stream_socket: dir.path().join("s.sock"),
            ..IngestConfig::default()
        };
        let d = socket::bind_dgram(&cfg.socket, 0o600, None, 0).unwrap();
        let s = socket::bind_stream(&cfg.stream_socket, 0o600, None).unwrap();
        let got = Sockets::adopt(d.socket.into_raw_fd(), s.into_raw_fd(), 7, &cfg).unwrap();
        assert_eq!(got.queue_len, 7);
    }
}
