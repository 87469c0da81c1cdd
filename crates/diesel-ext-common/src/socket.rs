//! The connection's socket, seen from the side: liveness probe, forced shutdown, close
//! confirmation.
//!
//! Neither Diesel's `PgConnection` nor diesel-async's exposes its driver's socket, yet three
//! things need it:
//!
//! * the **liveness probe**: a server that ended a session (`pg_terminate_backend`, an idle
//!   timeout, a restart, a failover) has already sent its FATAL message and closed the TCP
//!   stream, so a zero-timeout `poll()` on the socket tells, without a round trip, that the
//!   connection is dead. Unlike reading from the connection, polling consumes nothing, so
//!   `LISTEN` users keep their notifications;
//! * the **stall watchdog**: libpq blocks in `poll()` with no time limit while it waits for a
//!   reply. A hung server (a stopped backend, a stalled proxy) still ACKs keepalives, so
//!   neither keepalives nor `tcp_user_timeout` fire. The only sound way to bound a blocking
//!   libpq call from outside is `shutdown(2)` on its socket from another thread: the blocked
//!   `poll()` wakes up, `recv()` returns end-of-file and libpq reports a closed connection.
//! * the **close confirmation**, in both adapters: a budgeted connection's permit comes back
//!   only once the server let the session go. A backend keeps its socket open until its
//!   process exited, so after the driver closed its descriptor, our duplicate is shut down
//!   for writing ([`ConnSocket::shutdown_write`]: the server reads its end-of-file) and
//!   waited on for the server's end-of-file, bounded ([`ConnSocket::confirm_closed`] in the
//!   sync adapter; the async adapter waits on the descriptor in a task of its runtime).
//!
//! The async adapter identifies a connection's socket right after tokio-postgres connected,
//! before its connection task is spawned; it drives the tiebreak below step by step
//! ([`ConnectWindow::eliminate`]), with an empty query as the round trip.
//!
//! # Finding the socket, with no lock held across a connect
//!
//! ```text
//! let window = begin_connect();              // snapshot: (fd, inode) of every open socket
//! let mut conn = PgConnection::establish(..)?;
//! match window.finish(&filter, &mut || conn.ping().is_ok()) {
//!     SocketClaim::Found(sock) => ..,        // ours: probe and watchdog from now on
//!     SocketClaim::Ambiguous(candidates) => .., // call candidates.resolve() at checkouts
//!     SocketClaim::Unavailable => ..,        // pings only
//! }
//! ```
//!
//! * **Candidates.** [`ConnectWindow::finish`] lists the process's sockets again
//!   (`/proc/self/fd` + `fstat`) and keeps those that are new since [`begin_connect`] (a
//!   different `(fd, inode)` pair), are connected `SOCK_STREAM` sockets whose peer the
//!   [`PeerFilter`] accepts (derived from the connection string as libpq reads it, see
//!   [`peer`]), and are not claimed. The connection's own socket is always among them: it
//!   was opened inside the window and is still open.
//! * **The registry.** A process-wide set holds the inode of every socket claimed by a live
//!   connection of ours; its mutex is held only for set operations, never across I/O or a
//!   connect. Claiming inserts the inode into the set, so two connections can never claim
//!   the same socket; the inode is removed when the last clone of the [`ConnSocket`] is
//!   dropped (after our duplicate is closed). Our duplicates are themselves sockets other
//!   windows see, and are excluded the same way.
//! * **Elimination.** Exactly one candidate: it is ours. We `dup()` it (`F_DUPFD_CLOEXEC`),
//!   check that the duplicate has the candidate's inode (the fd number may have been closed
//!   and reused meanwhile) and register it. The duplicate is ours: its number can never be
//!   reused by another socket while we hold it, and `shutdown()` on it acts on the very socket
//!   libpq uses.
//! * **Tiebreak.** Several candidates (connects of ours that overlapped, or sockets opened by
//!   other code to the same port): for TCP candidates we read `TCP_INFO`'s byte counters
//!   (`tcpi_bytes_sent`, `tcpi_bytes_received`), let the caller run one tiny round trip on
//!   the new connection, and read them again. Our socket's counters both advanced; a
//!   candidate whose counters did not is not ours and is dropped. When others advanced too
//!   (their own round trip at the same moment), the round is repeated on the survivors after
//!   a random pause of up to two round trips (at most 20 ms) that breaks the lockstep, up to
//!   [`TIEBREAK_ROUNDS`] rounds in all, also dropping whatever was claimed or closed meanwhile.
//!   Unix-domain candidates have no counters and can only be eliminated.
//! * **Failed tiebreak.** The round trip failed: the connection may be lost, and libpq closes
//!   a lost connection's socket, so its own socket may no longer be among the candidates.
//!   Nothing is claimed ([`SocketClaim::Unavailable`]): the connection is pinged, never
//!   probed or bounded through a socket that may be another's.
//! * **Ambiguous.** Still several after successful rounds (other code's sockets to the same
//!   port that keep busy, Unix-domain sockets): [`SocketClaim::Ambiguous`] hands back the
//!   [`Candidates`]; [`Candidates::resolve`] drops those claimed or closed since and claims
//!   the last one. The adapter calls it only right after a statement on the connection
//!   succeeded (its own socket is then open), never at a bare checkout or checkin. It does
//!   not scan `/proc/self/fd`: one registry lookup and one `fstat` per candidate.
//! * **Unknown.** The socket stays unknown (the connection is then pinged on every checkout,
//!   as a plain pool with `test_on_check_out` would) when identification is not supported
//!   here ([`supported`]), when no candidate is left, or while it stays ambiguous. A filter
//!   that rejected the connection's socket costs nothing when that socket is the only new
//!   unclaimed stream socket: it is taken anyway.
//!
//! # Invariant: never another connection's socket
//!
//! **Every claim by elimination happens at a moment when the connection's own socket is
//! open and among the candidates.** Then the last candidate left is ours: each other one was
//! dropped because another connection claimed it (the registry), because it closed (so it is
//! not our open socket), or because a successful round trip of ours did not move its
//! counters. The moments are: right after the connect (libpq's socket is new and open);
//! after a successful tiebreak round (the connection just answered); and, for
//! [`Candidates::resolve`], right after a statement on the connection succeeded (the
//! tracker calls it then, on the thread that ran it, before anything else can touch the
//! connection). Where the socket may have closed (a failed tiebreak; a connection lost
//! outside a statement, since libpq drops the socket of a lost connection) no elimination
//! runs: the failed tiebreak gives up, and a pending connection is never resolved at a
//! checkout, a sweep or a checkin; it is pinged instead, and neither its pings nor its
//! checkin round trips are bounded through a socket it may not own.
//!
//! A wrong claim therefore needs a [`PeerFilter`] that rejects the connection's socket while
//! accepting another new one, or a tiebreak closure that reports success without a round
//! trip (when nothing advanced, the result is [`SocketClaim::Unavailable`]). A claimed socket
//! is released only after its owner's duplicate closed; a candidate list that still holds it
//! then sees it closed or, while libpq still has it open, unclaimed beside the list's own
//! open socket: either way it is never the last one left.
//!
//! **Costs** (`identification_cost_with_many_fds` in the tests prints them): the snapshot and
//! the rescan each read `/proc/self/fd` and `fstat` every entry, about 1 µs per open
//! descriptor (release build, 2 shared cores: 15 µs + 20 µs with 8 descriptors, 1.0 ms +
//! 1.0 ms with 1000, mostly in the kernel); new sockets also cost `getsockopt` +
//! `getpeername`. A tiebreak costs one round trip per round; most connects need none.
//!
//! Everything here is Linux-specific (`/proc/self/fd`, `TCP_INFO`, `POLLRDHUP`); elsewhere
//! [`supported`] is false and [`ConnectWindow::finish`] returns
//! [`SocketClaim::Unavailable`].

#[path = "peer.rs"]
pub mod peer;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use peer::PeerFilter;

/// How many tiebreak round trips [`ConnectWindow::finish`] runs at most (one, then up to
/// three retries while several candidates advanced).
pub const TIEBREAK_ROUNDS: usize = 4;

/// Whether sockets can be identified here at all: Linux with a readable `/proc/self/fd`.
/// Checked once per process.
pub fn supported() -> bool {
    #[cfg(target_os = "linux")]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| sys::scan().is_some())
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Opens a connect window: snapshots the process's sockets. Call right before establishing
/// the connection, then [`ConnectWindow::finish`] right after it succeeded.
pub fn begin_connect() -> ConnectWindow {
    #[cfg(target_os = "linux")]
    let before = if supported() { sys::scan() } else { None };
    #[cfg(not(target_os = "linux"))]
    let before = None;
    ConnectWindow { before }
}

/// Finds and claims the socket of a connection established earlier, outside any connect
/// window (a customizer of a stock pool runs right after the pool's own connect): every
/// connected, unclaimed stream socket of the process is a candidate, told apart by
/// `tiebreak`'s round trips as in [`ConnectWindow::finish`]. The module's invariant holds:
/// the connection is open and its socket among the candidates when this runs. Release the
/// claim (drop the socket) once done with it.
pub fn find_established(tiebreak: &mut dyn FnMut() -> bool) -> SocketClaim {
    ConnectWindow {
        before: supported().then(Vec::new),
    }
    .finish(&PeerFilter::any(), tiebreak)
}

/// The process's sockets before a connect (see [`begin_connect`]).
#[derive(Debug)]
#[must_use = "call finish() once the connection is established"]
pub struct ConnectWindow {
    /// `(fd, inode)` of every socket, sorted; `None` where unsupported.
    before: Option<Vec<(RawFd, u64)>>,
}

/// What [`ConnectWindow::finish`] found.
#[derive(Debug)]
pub enum SocketClaim {
    /// The connection's socket, claimed.
    Found(ConnSocket),
    /// Several sockets may be the connection's; [`Candidates::resolve`] may tell later.
    Ambiguous(Candidates),
    /// No socket can be the connection's, or identification is not supported here.
    Unavailable,
}

impl ConnectWindow {
    /// Finds and claims the socket the connection established since [`begin_connect`] uses.
    ///
    /// `filter` narrows the candidates to the peers the connection string allows.
    /// `tiebreak` is called only when several TCP candidates remain: it must run one round
    /// trip on the new connection (e.g. `SELECT 1`) and return whether it succeeded; it is
    /// called at most [`TIEBREAK_ROUNDS`] times. No lock is held while it runs.
    pub fn finish(self, filter: &PeerFilter, tiebreak: &mut dyn FnMut() -> bool) -> SocketClaim {
        let mut elimination = self.eliminate(filter);
        loop {
            match elimination.step() {
                Next::Done(claim) => return claim,
                Next::Pause(pause) => std::thread::sleep(pause),
                Next::RoundTrip => {
                    let started = Instant::now();
                    let ok = tiebreak();
                    elimination.round_trip_done(ok, started.elapsed());
                }
            }
        }
    }

    /// [`ConnectWindow::finish`] step by step, for a caller whose round trip cannot run in a
    /// blocking closure (an async connector): call [`Elimination::step`] until it is done,
    /// running each round trip it asks for, and pausing as it says.
    pub fn eliminate(self, filter: &PeerFilter) -> Elimination {
        #[cfg(target_os = "linux")]
        let start = match self.before {
            Some(before) => sys::start(&before, filter),
            None => Err(SocketClaim::Unavailable),
        };
        #[cfg(not(target_os = "linux"))]
        let start: Result<Vec<Candidate>, SocketClaim> = {
            let _ = filter;
            Err(SocketClaim::Unavailable)
        };
        let (set, done) = match start {
            Ok(set) => (set, None),
            Err(claim) => (Vec::new(), Some(claim)),
        };
        Elimination {
            set,
            done,
            rounds: 0,
            last_round_trip: None,
            paused: false,
            counters: Vec::new(),
        }
    }
}

/// The candidates of a [`ConnectWindow`] being told apart (see
/// [`ConnectWindow::eliminate`]).
#[derive(Debug)]
pub struct Elimination {
    set: Vec<Candidate>,
    /// Decided before any round: nothing to break a tie between.
    done: Option<SocketClaim>,
    rounds: usize,
    last_round_trip: Option<Duration>,
    /// The pause after the last round was asked for.
    paused: bool,
    #[cfg(target_os = "linux")]
    counters: Vec<Option<sys::Counters>>,
    #[cfg(not(target_os = "linux"))]
    counters: Vec<()>,
}

/// What an [`Elimination`] needs next.
#[derive(Debug)]
pub enum Next {
    /// It is over.
    Done(SocketClaim),
    /// Run one round trip on the new connection (e.g. an empty query), then report it with
    /// [`Elimination::round_trip_done`]. No lock is held meanwhile.
    RoundTrip,
    /// Pause this long before asking again (a random step out of another connect's rhythm).
    Pause(Duration),
}

impl Elimination {
    /// What to do next; at most [`TIEBREAK_ROUNDS`] round trips are asked for.
    pub fn step(&mut self) -> Next {
        if let Some(claim) = self.done.take() {
            return Next::Done(claim);
        }
        #[cfg(target_os = "linux")]
        {
            sys::step(self)
        }
        #[cfg(not(target_os = "linux"))]
        Next::Done(SocketClaim::Unavailable)
    }

    /// Reports the round trip [`Elimination::step`] asked for: whether it succeeded, and how
    /// long it took. A failed one ends the elimination with [`SocketClaim::Unavailable`].
    pub fn round_trip_done(&mut self, ok: bool, took: Duration) {
        #[cfg(target_os = "linux")]
        sys::round_trip_done(self, ok, took);
        #[cfg(not(target_os = "linux"))]
        let _ = (ok, took);
    }
}

/// One socket that may be a connection's: its fd number in the process (not ours) and its
/// inode, which tells whether the fd still holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Candidate {
    fd: RawFd,
    ino: u64,
    /// TCP (has byte counters) rather than Unix-domain.
    tcp: bool,
}

/// Sockets of which one is a connection's, left by an ambiguous [`ConnectWindow::finish`].
#[derive(Debug)]
pub struct Candidates(Vec<Candidate>);

impl Candidates {
    /// Drops the candidates claimed by other connections or closed since, and claims the
    /// one left, if only one is. Cheap: one registry lookup and one `fstat` per candidate, no
    /// scan of the process's descriptors.
    ///
    /// Call it only while the connection's own socket is known to be open: right after a
    /// statement on it succeeded (see the module's invariant).
    pub fn resolve(&mut self) -> Option<ConnSocket> {
        #[cfg(target_os = "linux")]
        {
            sys::prune(&mut self.0);
            if let [only] = self.0[..] {
                return sys::claim(&only);
            }
        }
        None
    }

    /// How many sockets are still candidates.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no socket is a candidate any more.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a zero-timeout look at the socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Nothing pending, peer still there.
    Alive,
    /// The peer closed or reset the connection.
    Dead,
    /// Bytes are waiting (a notification, a notice, or a FATAL not yet followed by the close):
    /// only a round trip can tell.
    Unknown,
}

/// Our duplicate of a connection's socket, registered as claimed. Clones share it; the
/// duplicate is closed and the claim released when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct ConnSocket(Arc<Claimed>);

/// The registered duplicate behind a [`ConnSocket`].
#[derive(Debug)]
struct Claimed {
    /// `Some` until dropped: closed before the claim is released, so that no duplicate of
    /// ours is ever seen unclaimed.
    fd: Option<OwnedFd>,
    ino: u64,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        drop(self.fd.take());
        registry::release(self.ino);
    }
}

impl ConnSocket {
    fn raw(&self) -> RawFd {
        self.0.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Our duplicate's descriptor (socket options set on it act on the connection's socket).
    pub fn raw_fd(&self) -> RawFd {
        self.raw()
    }

    /// The socket's inode (tests compare it with the connection's own descriptor).
    pub fn inode(&self) -> u64 {
        self.0.ino
    }

    /// Looks at the socket without reading from it and without blocking.
    pub fn probe(&self) -> Probe {
        #[cfg(target_os = "linux")]
        const RDHUP: libc::c_short = libc::POLLRDHUP;
        #[cfg(not(target_os = "linux"))]
        const RDHUP: libc::c_short = 0;
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN | RDHUP,
            revents: 0,
        };
        // SAFETY: one valid, initialized pollfd that outlives the call; zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 {
            return Probe::Unknown;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR | RDHUP | libc::POLLNVAL) != 0 {
            Probe::Dead
        } else if pfd.revents & libc::POLLIN != 0 {
            Probe::Unknown
        } else {
            Probe::Alive
        }
    }

    /// After the connection's driver closed its own descriptor (ours keeps the socket open):
    /// ends our side of the stream, then waits up to `bound` for the server's end-of-file,
    /// discarding whatever arrives before it. A PostgreSQL backend keeps its socket open
    /// until its process has exited, after its `pg_stat_activity` entry and its connection
    /// slot are freed ("so that clients can close synchronously", says the server's
    /// `socket_close`); a pooler closes its client side once it let the client go. Returns
    /// true once the end-of-file, a reset or an error came (a socket the watchdog shut down
    /// returns at once), false when `bound` ran out.
    pub fn confirm_closed(&self, bound: std::time::Duration) -> bool {
        let fd = self.raw();
        // The driver sent its Terminate message already; this end-of-file tells a server
        // that never got it (a connection the driver had given up on) to go too.
        self.shutdown_write();
        let deadline = std::time::Instant::now() + bound;
        let mut sink = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Readable covers the end-of-file; a hang-up or an error is reported whatever
            // the events asked.
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up: a wait of 0.5 ms must not become a busy zero-timeout poll.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid, initialized pollfd that outlives the call.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                0 => return false,
                rc if rc < 0 => {
                    if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        return true;
                    }
                }
                _ => {
                    // Readable, hung up or failed: a read tells which. Bytes before the
                    // end-of-file (a notice, the server's goodbye) are read away.
                    // SAFETY: `sink` is a valid buffer of its length for the call.
                    let n = unsafe {
                        libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT)
                    };
                    if n == 0 {
                        return true;
                    }
                    if n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
                    {
                        // Reset, or any other failure: the socket is dead.
                        return true;
                    }
                }
            }
            // Whatever the poll said, the bound holds.
            if left.is_zero() {
                return false;
            }
        }
    }

    /// Ends our side of the stream (`SHUT_WR`): the peer reads its end-of-file although
    /// our duplicate keeps the socket open after the driver closed its own descriptor.
    pub fn shutdown_write(&self) {
        // SAFETY: shutdown takes no pointers; the descriptor is ours and open for as long as
        // `self` lives. Errors (already shut down) are irrelevant.
        unsafe {
            libc::shutdown(self.raw(), libc::SHUT_WR);
        }
    }

    /// Shuts the socket down in both directions: a libpq call blocked on it returns at once
    /// with a closed-connection error.
    pub fn shutdown(&self) {
        // SAFETY: shutdown takes no pointers; the descriptor is ours and open for as long as
        // `self` lives. Errors (already shut down) are irrelevant.
        unsafe {
            libc::shutdown(self.raw(), libc::SHUT_RDWR);
        }
    }
}

/// The process-wide set of claimed sockets (inodes). Its lock is held for one set operation
/// at a time, never across I/O.
mod registry {
    use std::collections::BTreeSet;

    use parking_lot::Mutex;

    static CLAIMED: Mutex<BTreeSet<u64>> = parking_lot::const_mutex(BTreeSet::new());

    /// Claims `ino`; false if it already is claimed.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) fn try_claim(ino: u64) -> bool {
        CLAIMED.lock().insert(ino)
    }

    pub(super) fn release(ino: u64) {
        CLAIMED.lock().remove(&ino);
    }

    /// Removes from `items` those whose inode is claimed.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) fn retain_unclaimed<T>(items: &mut Vec<T>, ino: impl Fn(&T) -> u64) {
        let claimed = CLAIMED.lock();
        if !claimed.is_empty() {
            items.retain(|item| !claimed.contains(&ino(item)));
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::Arc;
    use std::time::Duration;

    use super::peer::Peer;
    use super::TIEBREAK_ROUNDS;
    use super::{registry, Candidate, Candidates, Claimed, ConnSocket, PeerFilter, SocketClaim};

    /// `(fd, inode)` of every socket the process has open, sorted by fd. `None` when
    /// `/proc/self/fd` cannot be read.
    pub(super) fn scan() -> Option<Vec<(RawFd, u64)>> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(fd) = name.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
                continue;
            };
            if let Some(ino) = socket_inode(fd) {
                out.push((fd, ino));
            }
        }
        out.sort_unstable();
        Some(out)
    }

    /// The inode of `fd` if it is an open socket.
    pub(super) fn socket_inode(fd: RawFd) -> Option<u64> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only into `st`, which we own; a closed fd yields EBADF.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        if rc != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFSOCK {
            return None;
        }
        Some(st.st_ino)
    }

    /// A new stream socket: its candidate entry and its peer's address.
    struct NewSocket {
        cand: Candidate,
        addr: PeerAddr,
    }

    /// An owned copy of a peer address.
    enum PeerAddr {
        Tcp(u16),
        Unix(Vec<u8>),
    }

    impl PeerAddr {
        fn as_peer(&self) -> Peer<'_> {
            match self {
                PeerAddr::Tcp(port) => Peer::Tcp(*port),
                PeerAddr::Unix(path) => Peer::Unix(path),
            }
        }
    }

    /// The peer of `fd` if it is a connected stream socket (TCP or Unix-domain).
    fn stream_peer(fd: RawFd) -> Option<PeerAddr> {
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `ty`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 || ty != libc::SOCK_STREAM {
            return None;
        }
        // SAFETY: an all-zero `sockaddr_storage` is a valid value of this plain C struct.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: sockaddr_storage is large enough for any address; getpeername writes at
        // most `len` bytes into it and stores the real length in `len`.
        let rc = unsafe {
            libc::getpeername(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None; // not connected
        }
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        let base = (&addr as *const libc::sockaddr_storage).cast::<u8>();
        match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in, which it is large
                // and aligned enough for.
                let sin = unsafe { &*base.cast::<libc::sockaddr_in>() };
                Some(PeerAddr::Tcp(u16::from_be(sin.sin_port)))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &*base.cast::<libc::sockaddr_in6>() };
                Some(PeerAddr::Tcp(u16::from_be(sin6.sin6_port)))
            }
            libc::AF_UNIX => {
                let offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
                let n = len.saturating_sub(offset);
                // SAFETY: `offset + n <= len <= size_of::<sockaddr_storage>()`: the bytes are
                // inside `addr`, initialized (zeroed, then written by getpeername).
                let path = unsafe { std::slice::from_raw_parts(base.add(offset), n) };
                let path = if path.first() == Some(&0) {
                    path // abstract namespace: the length is exact
                } else {
                    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                    &path[..end]
                };
                Some(PeerAddr::Unix(path.to_vec()))
            }
            _ => None,
        }
    }

    /// The new, unclaimed, connected stream sockets since `before`, one per inode.
    fn new_stream_sockets(before: &[(RawFd, u64)]) -> Option<Vec<NewSocket>> {
        let after = scan()?;
        let mut found: Vec<NewSocket> = Vec::new();
        for (fd, ino) in after {
            if before.binary_search(&(fd, ino)).is_ok() || found.iter().any(|s| s.cand.ino == ino) {
                continue;
            }
            let Some(addr) = stream_peer(fd) else {
                continue;
            };
            // The fd may have been closed and reused while we looked at it.
            if socket_inode(fd) != Some(ino) {
                continue;
            }
            let tcp = matches!(addr, PeerAddr::Tcp(_));
            found.push(NewSocket {
                cand: Candidate { fd, ino, tcp },
                addr,
            });
        }
        registry::retain_unclaimed(&mut found, |s| s.cand.ino);
        Some(found)
    }

    /// The candidates after a connect, and the tiebreak over them (see
    /// [`super::Elimination`]): `Err` when there is nothing to break a tie between.
    pub(super) fn start(
        before: &[(RawFd, u64)],
        filter: &PeerFilter,
    ) -> Result<Vec<Candidate>, SocketClaim> {
        let Some(new) = new_stream_sockets(before) else {
            return Err(SocketClaim::Unavailable);
        };
        let set: Vec<Candidate> = new
            .iter()
            .filter(|s| filter.matches(&s.addr.as_peer()))
            .map(|s| s.cand)
            .collect();
        if set.is_empty() {
            // The filter rejected every new socket; our own is among them. When it is the
            // only one, it is ours whatever the filter said.
            return Err(match new[..] {
                [ref only] => found(claim(&only.cand)),
                _ => SocketClaim::Unavailable,
            });
        }
        Ok(set)
    }

    /// What the tiebreak over `e`'s candidates does next (see [`super::Elimination::step`]).
    pub(super) fn step(e: &mut super::Elimination) -> super::Next {
        if e.rounds == TIEBREAK_ROUNDS {
            return super::Next::Done(conclude(&e.set));
        }
        if let Some(rtt) = e.last_round_trip {
            if !std::mem::replace(&mut e.paused, true) {
                // Several advanced: another connect of ours ran its round trip at the same
                // moment. Step out of its rhythm before trying again (and let it claim its
                // socket meanwhile).
                return super::Next::Pause(jitter(rtt).min(MAX_JITTER));
            }
            prune(&mut e.set);
        }
        if e.set.len() <= 1 {
            return super::Next::Done(conclude(&e.set));
        }
        e.counters = e.set.iter().map(counters).collect();
        if e.counters.iter().all(Option::is_none) {
            // Nothing to compare: elimination only.
            return super::Next::Done(conclude(&e.set));
        }
        // Counted when asked for: the rounds stay bounded whatever the caller reports.
        e.rounds += 1;
        super::Next::RoundTrip
    }

    /// Takes in the round trip `next` asked for: whether it succeeded, and how long it took.
    pub(super) fn round_trip_done(e: &mut super::Elimination, ok: bool, took: Duration) {
        if !ok {
            // The round trip failed: the driver may have closed the connection's socket,
            // which then is no longer among the candidates, so elimination could pick another
            // connection's. Leave the socket unknown (pinged, never trusted).
            e.set.clear();
            e.rounds = TIEBREAK_ROUNDS;
            return;
        }
        e.last_round_trip = Some(took);
        e.paused = false;
        let before = std::mem::take(&mut e.counters);
        let mut i = 0;
        e.set.retain(|c| {
            let was = before[i];
            i += 1;
            match (was, counters(c)) {
                (Some(was), Some(now)) => now.sent > was.sent && now.received > was.received,
                // Counters readable before, not now: closed, not ours.
                (Some(_), None) => false,
                // No counters (Unix-domain): cannot be told apart this way.
                (None, _) => true,
            }
        });
        prune(&mut e.set);
    }

    fn conclude(set: &[Candidate]) -> SocketClaim {
        match set[..] {
            [] => SocketClaim::Unavailable,
            [only] => found(claim(&only)),
            _ => SocketClaim::Ambiguous(Candidates(set.to_vec())),
        }
    }

    /// The longest pause between tiebreak rounds.
    pub(super) const MAX_JITTER: Duration = Duration::from_millis(20);

    /// A random pause between nothing and two round trips (at most [`MAX_JITTER`]).
    pub(super) fn jitter(rtt: Duration) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let max = rtt.saturating_mul(2).min(MAX_JITTER);
        max.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn found(sock: Option<ConnSocket>) -> SocketClaim {
        sock.map_or(SocketClaim::Unavailable, SocketClaim::Found)
    }

    /// Drops the candidates that were claimed, or whose fd no longer holds their socket.
    pub(super) fn prune(set: &mut Vec<Candidate>) {
        registry::retain_unclaimed(set, |c| c.ino);
        set.retain(|c| socket_inode(c.fd) == Some(c.ino));
    }

    /// Claims the candidate: registers its inode, then keeps a close-on-exec duplicate of
    /// the very socket. `None` if it is claimed already or no longer open.
    pub(super) fn claim(c: &Candidate) -> Option<ConnSocket> {
        if !registry::try_claim(c.ino) {
            return None;
        }
        // SAFETY: F_DUPFD_CLOEXEC takes no pointers and returns a new descriptor, or -1.
        let dup = unsafe { libc::fcntl(c.fd, libc::F_DUPFD_CLOEXEC, 0) };
        let owned = (dup >= 0).then(|| {
            // SAFETY: `dup` is a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(dup) }
        });
        match owned {
            Some(fd) if socket_inode(fd.as_raw_fd()) == Some(c.ino) => {
                Some(ConnSocket(Arc::new(Claimed {
                    fd: Some(fd),
                    ino: c.ino,
                })))
            }
            other => {
                drop(other);
                registry::release(c.ino);
                None
            }
        }
    }

    /// A TCP socket's byte counters.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Counters {
        pub(super) sent: u64,
        pub(super) received: u64,
    }

    /// The head of the kernel's `struct tcp_info` (`include/uapi/linux/tcp.h`), up to
    /// `tcpi_bytes_sent` (Linux 4.19). Declared here because not every libc binding has
    /// the later fields; the layout is the kernel's ABI and only ever grows at the end.
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct TcpInfoHead {
        /// `tcpi_state` .. the two bitfield bytes.
        _bytes: [u8; 8],
        /// `tcpi_rto` .. `tcpi_total_retrans`.
        _u32s: [u32; 24],
        /// `tcpi_pacing_rate`, `tcpi_max_pacing_rate`.
        _u64s: [u64; 2],
        pub(super) tcpi_bytes_acked: u64,
        pub(super) tcpi_bytes_received: u64,
        /// `tcpi_segs_out` .. `tcpi_data_segs_out`.
        _u32s_2: [u32; 6],
        /// `tcpi_delivery_rate` .. `tcpi_sndbuf_limited`.
        _u64s_2: [u64; 4],
        /// `tcpi_delivered`, `tcpi_delivered_ce`.
        _u32s_3: [u32; 2],
        pub(super) tcpi_bytes_sent: u64,
    }

    const _: () = {
        use std::mem::{offset_of, size_of};
        assert!(offset_of!(TcpInfoHead, _u64s) == 104);
        assert!(offset_of!(TcpInfoHead, tcpi_bytes_acked) == 120);
        assert!(offset_of!(TcpInfoHead, tcpi_bytes_received) == 128);
        assert!(offset_of!(TcpInfoHead, tcpi_bytes_sent) == 200);
        assert!(size_of::<TcpInfoHead>() == 208);
    };

    /// The candidate's byte counters; `None` if it is not TCP, or its fd no longer holds it.
    /// On kernels older than 4.19 (no `tcpi_bytes_sent`), the bytes acknowledged by the peer
    /// stand for the bytes sent: a completed round trip advances both.
    fn counters(c: &Candidate) -> Option<Counters> {
        if !c.tcp {
            return None;
        }
        let mut info = TcpInfoHead::default();
        let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own, and
        // stores how many it wrote in `len`.
        let rc = unsafe {
            libc::getsockopt(
                c.fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut TcpInfoHead).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        let counted = read_counters(&info, len as usize)?;
        // The fd may have been closed and reused by another socket.
        if socket_inode(c.fd) != Some(c.ino) {
            return None;
        }
        Some(counted)
    }

    /// The counters in the first `len` bytes of `info`, as much as the kernel wrote:
    /// `None` without `tcpi_bytes_received` (before Linux 4.1); the bytes acknowledged
    /// stand for the bytes sent without `tcpi_bytes_sent` (before 4.19).
    pub(super) fn read_counters(info: &TcpInfoHead, len: usize) -> Option<Counters> {
        if len < std::mem::offset_of!(TcpInfoHead, tcpi_bytes_received) + 8 {
            return None;
        }
        let sent = if len >= std::mem::size_of::<TcpInfoHead>() {
            info.tcpi_bytes_sent
        } else {
            info.tcpi_bytes_acked
        };
        Some(Counters {
            sent,
            received: info.tcpi_bytes_received,
        })
    }
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;
