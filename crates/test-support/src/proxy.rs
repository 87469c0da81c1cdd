//! A TCP proxy that injects faults: resets, stalls, latency, and "reset after the COMMIT".

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::TestSupportError;

/// Bytes buffered per direction before the proxy stops reading that side.
const MAX_QUEUED: usize = 1 << 20;
/// Bytes of the client stream kept to find a needle that spans two reads.
const TAIL_KEEP: usize = 256;
/// How long the upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A small TCP proxy on `127.0.0.1:<free port>` in front of `target`, on plain threads (one
/// accept thread, one thread per connection). Every accepted client gets its own upstream
/// connection. Faults are switched on and off while connections are live; dropping the proxy
/// resets every connection and joins its threads.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    /// Where new connections go ([`FaultProxy::retarget`] moves it; open flows stay).
    target: Mutex<SocketAddr>,
    shutdown: AtomicBool,
    stalled: AtomicBool,
    /// New connections are reset as soon as they are accepted.
    refusing: AtomicBool,
    latency_us: AtomicU64,
    trigger: Mutex<Option<Trigger>>,
    conns: Mutex<HashMap<u64, Arc<ConnCtl>>>,
    conn_gone: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Client-to-server protocol messages seen, by type byte.
    messages: Mutex<[u64; 256]>,
    accepted: AtomicU64,
}

/// How long [`FaultProxy::silence_existing`] keeps a connection silent before it resets it:
/// longer than any bound a test asserts on silence, short enough that a test whose mechanism
/// is removed fails by an assertion well within a mutation run's timeout.
pub const SILENCE_EXPIRES_AFTER: Duration = Duration::from_secs(30);

/// Client-to-server PostgreSQL protocol messages the proxy saw, by kind (see
/// [`FaultProxy::messages`]). Counted on plaintext connections only (`sslmode=disable`); a
/// connection that asks for TLS is not counted past its request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Startup messages (one per connection opened through the proxy).
    pub startups: u64,
    /// Simple queries (`Q`): a ping (`SELECT 1` through `batch_execute`), `BEGIN`, `COMMIT`.
    pub queries: u64,
    /// Extended-protocol syncs (`S`): one per prepared-statement exchange.
    pub syncs: u64,
    /// Parse messages (`P`): statements prepared.
    pub parses: u64,
    /// Terminate messages (`X`): connections closed politely.
    pub terminates: u64,
}

impl MessageCounts {
    /// Round trips: each simple query and each sync is answered by one `ReadyForQuery`.
    pub fn round_trips(&self) -> u64 {
        self.queries + self.syncs
    }
}

/// Splits a client's byte stream into protocol messages and counts them.
#[derive(Default)]
struct MessageCounter {
    /// Header bytes of the message being read (1 type byte + 4 length bytes, or 4 length
    /// bytes and 4 code bytes for the untyped startup-phase messages).
    header: Vec<u8>,
    /// Payload bytes of the current message still to skip.
    skip: usize,
    started: bool,
    /// Gave up (TLS or an unexpected form).
    off: bool,
}

impl MessageCounter {
    fn feed(&mut self, mut bytes: &[u8], counts: &Mutex<[u64; 256]>) {
        while !self.off && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let want = if self.started { 5 } else { 8 };
            let n = (want - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() < want {
                return;
            }
            let header = std::mem::take(&mut self.header);
            if self.started {
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
                counts.lock()[usize::from(header[0])] += 1;
                self.skip = len.saturating_sub(4);
            } else {
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                match code {
                    // SSLRequest, GSSENCRequest: encrypted from here on (or refused, and the
                    // client retries; either way stop counting this connection).
                    80_877_103 | 80_877_104 => self.off = true,
                    // CancelRequest.
                    80_877_102 => self.off = true,
                    _ => {
                        counts.lock()[0] += 1;
                        self.started = true;
                        self.skip = len.saturating_sub(8);
                    }
                }
            }
        }
    }
}

struct Trigger {
    needle: Vec<u8>,
    cut: Cut,
}

/// What a fired trigger does to its connection.
#[derive(Clone, Copy)]
enum Cut {
    /// The chunk holding the needle reaches the server; both sides are reset this long after.
    AfterForwarding(Duration),
    /// The chunk never reaches the server; both sides are reset at once.
    BeforeForwarding,
    /// The chunk never reaches the server; the client's side is reset at once, the server's
    /// kept open and silent.
    Lose,
}

/// Per connection: the sever flag and an eventfd that wakes its thread out of `poll`.
struct ConnCtl {
    sever: AtomicBool,
    /// Stalled on its own (see [`FaultProxy::silence_existing`]).
    silenced: AtomicBool,
    /// The local port of the upstream connection (the server's `client_port`), 0 until it is
    /// connected.
    upstream_port: AtomicU16,
    wake: OwnedFd,
}

impl ConnCtl {
    fn new() -> Result<ConnCtl, TestSupportError> {
        // SAFETY: eventfd has no memory-safety preconditions; the fd is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(TestSupportError::io(
                "creating an eventfd for a proxied connection",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(ConnCtl {
            sever: AtomicBool::new(false),
            silenced: AtomicBool::new(false),
            upstream_port: AtomicU16::new(0),
            // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an fd we own.
        let _ = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from an fd we own (non-blocking).
        let _ = unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl Shared {
    fn wake_all(&self) {
        for ctl in self.conns.lock().values() {
            ctl.wake();
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("target", &*self.shared.target.lock())
            .field("connections", &self.connections())
            .finish()
    }
}

impl FaultProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target`.
    pub fn start(target: SocketAddr) -> Result<FaultProxy, TestSupportError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| TestSupportError::io("binding the fault proxy on 127.0.0.1", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| TestSupportError::io("reading the fault proxy's address", e))?
            .port();
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            shutdown: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            trigger: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            conn_gone: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            messages: Mutex::new([0; 256]),
            accepted: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|e| TestSupportError::io("spawning the fault proxy's thread", e))?;
        Ok(FaultProxy {
            port,
            shared,
            accept: Some(accept),
        })
    }

    /// Sends new connections to `target` from now on; the flows already open stay with the
    /// server they were opened to (a DNS name or a load balancer moved to a new primary after
    /// a failover, while the pool's sockets still reach the old one).
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock() = target;
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resets every live connection: `SO_LINGER = 0`, then close, so both the client and the
    /// server get an RST. Returns once they are closed (at most ~2 s).
    pub fn sever_all(&self) {
        let ids: Vec<u64> = {
            let conns = self.shared.conns.lock();
            for ctl in conns.values() {
                ctl.sever.store(true, Ordering::SeqCst);
                ctl.wake();
            }
            conns.keys().copied().collect()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut conns = self.shared.conns.lock();
        while ids.iter().any(|id| conns.contains_key(id)) {
            if self
                .shared
                .conn_gone
                .wait_until(&mut conns, deadline)
                .timed_out()
            {
                break;
            }
        }
    }

    /// While on, no byte is forwarded in either direction; connections stay open and new ones
    /// are accepted (and connected upstream) but see no data. Off forwards what was held.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
        self.shared.wake_all();
    }

    /// Every connection the proxy carries now goes silent: nothing more is forwarded on it in
    /// either direction, and its sockets stay open (a NAT or load balancer that forgot its
    /// flows, a failover that left the old sockets hanging). Connections accepted from now on
    /// pass as usual. Returns how many went silent.
    ///
    /// The silence ends with a reset after [`SILENCE_EXPIRES_AFTER`] (as a middlebox finally
    /// expires the flows it forgot): a client that waits on a silent connection with no
    /// deadline of its own (a pool with a mechanism removed, under mutation testing) gets an
    /// error then, and its test fails by an assertion instead of hanging.
    pub fn silence_existing(&self) -> usize {
        let ids: Vec<u64> = {
            let conns = self.shared.conns.lock();
            for ctl in conns.values() {
                ctl.silenced.store(true, Ordering::SeqCst);
                ctl.wake();
            }
            conns.keys().copied().collect()
        };
        let n = ids.len();
        let shared = Arc::clone(&self.shared);
        let expiry = std::thread::Builder::new()
            .name(format!("fault-proxy-{}-expiry", self.port))
            .spawn(move || {
                std::thread::sleep(SILENCE_EXPIRES_AFTER);
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                let conns = shared.conns.lock();
                for id in &ids {
                    if let Some(ctl) = conns.get(id) {
                        if ctl.silenced.load(Ordering::SeqCst) {
                            ctl.sever.store(true, Ordering::SeqCst);
                            ctl.wake();
                        }
                    }
                }
            });
        // Without the thread the silence lasts until the proxy is dropped, as before.
        drop(expiry);
        n
    }

    /// The server-facing local ports (what the server's `pg_stat_activity.client_port` shows)
    /// of the connections silenced by [`FaultProxy::silence_existing`] that are still open and
    /// connected upstream: the sessions behind them can no longer be ended by their clients.
    pub fn silenced_upstream_ports(&self) -> Vec<u16> {
        self.shared
            .conns
            .lock()
            .values()
            .filter(|ctl| ctl.silenced.load(Ordering::SeqCst))
            .map(|ctl| ctl.upstream_port.load(Ordering::SeqCst))
            .filter(|port| *port != 0)
            .collect()
    }

    /// Resets every connection silenced by [`FaultProxy::silence_existing`] (RST to both
    /// sides, as a middlebox that finally expires the flows it forgot), so the server's
    /// backends behind them end. Connections accepted since keep passing. Returns how many
    /// were reset; returns once they are closed (at most ~2 s).
    pub fn sever_silenced(&self) -> usize {
        let ids: Vec<u64> = {
            let conns = self.shared.conns.lock();
            conns
                .iter()
                .filter(|(_, ctl)| ctl.silenced.load(Ordering::SeqCst))
                .map(|(id, ctl)| {
                    ctl.sever.store(true, Ordering::SeqCst);
                    ctl.wake();
                    *id
                })
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut conns = self.shared.conns.lock();
        while ids.iter().any(|id| conns.contains_key(id)) {
            if self
                .shared
                .conn_gone
                .wait_until(&mut conns, deadline)
                .timed_out()
            {
                break;
            }
        }
        ids.len()
    }

    /// While on, every new connection is reset (RST) as soon as it is accepted, and turning it
    /// on resets every live one: a server that is down (clients see the connection reset or
    /// closed). Off accepts again.
    pub fn refuse_connections(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
        if on {
            self.sever_all();
        }
    }

    /// Delays every chunk read from either side by `per_chunk` before it is forwarded
    /// (`Duration::ZERO` turns it off). Applies to chunks read from now on.
    pub fn set_latency(&self, per_chunk: Duration) {
        let us = u64::try_from(per_chunk.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::SeqCst);
    }

    /// Arms a one-shot trigger: the first connection whose client-to-server stream contains
    /// `needle` (e.g. `b"COMMIT"`; found also across two reads, for needles up to 256 bytes)
    /// forwards that chunk to the server, forwards nothing more in either direction, waits
    /// `after` (so the server can process it) and then resets both sides of that connection
    /// with RST, without forwarding the server's reply: "connection lost while COMMIT was in
    /// flight". Arming again replaces an unfired trigger. The needle is matched on the raw
    /// bytes, so connect through the proxy with `sslmode=disable` for this.
    pub fn sever_after_forwarding(&self, needle: &[u8], after: Duration) {
        *self.shared.trigger.lock() = Some(Trigger {
            needle: needle.to_vec(),
            cut: Cut::AfterForwarding(after),
        });
    }

    /// Arms a one-shot trigger like [`FaultProxy::sever_after_forwarding`], but the chunk
    /// holding `needle` never reaches the server: both sides of that connection are reset at
    /// once. "Connection lost just before COMMIT arrived": the server rolls the transaction
    /// back, while the client cannot tell that from a commit whose reply was lost.
    pub fn sever_before_forwarding(&self, needle: &[u8]) {
        *self.shared.trigger.lock() = Some(Trigger {
            needle: needle.to_vec(),
            cut: Cut::BeforeForwarding,
        });
    }

    /// Arms a one-shot trigger: the chunk holding `needle` never reaches the server, the
    /// client's side of that connection is reset at once, and the server's side stays open
    /// and silent. "`COMMIT` lost on the way", as a blackholed network leaves it: the server
    /// never hears of the client again and keeps the transaction open (idle in it, its
    /// outcome "in progress") until it notices, hours with default settings; here, until
    /// [`FaultProxy::sever_silenced`], [`SILENCE_EXPIRES_AFTER`] or the proxy's drop.
    pub fn lose_before_forwarding(&self, needle: &[u8]) {
        *self.shared.trigger.lock() = Some(Trigger {
            needle: needle.to_vec(),
            cut: Cut::Lose,
        });
    }

    /// Whether a trigger armed by [`FaultProxy::sever_after_forwarding`] is still waiting
    /// for its needle.
    pub fn trigger_armed(&self) -> bool {
        self.shared.trigger.lock().is_some()
    }

    /// The number of live proxied connections.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Connections accepted since the proxy started (or since [`FaultProxy::reset_counts`]).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The protocol messages clients sent through the proxy so far: round trips counted, not
    /// inferred.
    pub fn messages(&self) -> MessageCounts {
        let counts = self.shared.messages.lock();
        MessageCounts {
            startups: counts[0],
            queries: counts[usize::from(b'Q')],
            syncs: counts[usize::from(b'S')],
            parses: counts[usize::from(b'P')],
            terminates: counts[usize::from(b'X')],
        }
    }

    /// Zeroes [`FaultProxy::messages`] and [`FaultProxy::connections_accepted`].
    pub fn reset_counts(&self) {
        *self.shared.messages.lock() = [0; 256];
        self.shared.accepted.store(0, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let threads: Vec<_> = self.shared.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id: u64 = 0;
    loop {
        let accepted = listener.accept();
        if shared.shutdown.load(Ordering::SeqCst) {
            if let Ok((stream, _)) = accepted {
                abort(&stream);
            }
            return;
        }
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if shared.refusing.load(Ordering::SeqCst) {
            abort(&client);
            continue;
        }
        let Ok(ctl) = ConnCtl::new() else {
            abort(&client);
            continue;
        };
        let ctl = Arc::new(ctl);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        let id = next_id;
        shared.conns.lock().insert(id, Arc::clone(&ctl));
        let conn_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("fault-proxy-conn-{id}"))
            .spawn(move || {
                run_connection(&conn_shared, &ctl, client);
                conn_shared.conns.lock().remove(&id);
                conn_shared.conn_gone.notify_all();
            });
        match spawned {
            Ok(handle) => {
                let mut threads = shared.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(_) => {
                shared.conns.lock().remove(&id);
            }
        }
    }
}

/// Sets `SO_LINGER` to zero, so that closing the socket sends an RST instead of a FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a valid linger struct and its size for a socket we own.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Resets the connection when the last handle to it is dropped.
fn abort(stream: &TcpStream) {
    set_linger_zero(stream);
}

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    /// (ready at, bytes, bytes of it already written)
    queue: VecDeque<(Instant, Vec<u8>, usize)>,
    queued: usize,
    /// The source sent EOF.
    eof: bool,
    /// We passed the EOF on (shutdown(Write) of the destination).
    shut: bool,
}

impl Pipe {
    fn wants_read(&self) -> bool {
        !self.eof && self.queued < MAX_QUEUED
    }

    fn next_ready(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _, _)| *at)
    }

    fn ready(&self, now: Instant) -> bool {
        self.next_ready().is_some_and(|at| at <= now)
    }

    fn done(&self) -> bool {
        self.eof && self.queue.is_empty()
    }

    /// Non-blocking read; Ok(Some(chunk)) for data, Ok(None) for nothing (or EOF), Err to abort.
    fn read_from(&mut self, src: &TcpStream, latency: Duration) -> Result<Option<Vec<u8>>, ()> {
        let mut buf = vec![0u8; 16 * 1024];
        match (&*src).read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                Ok(None)
            }
            Ok(n) => {
                buf.truncate(n);
                self.queued += n;
                self.queue
                    .push_back((Instant::now() + latency, buf.clone(), 0));
                Ok(Some(buf))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(None)
            }
            Err(_) => Err(()),
        }
    }

    /// Writes what is due; Err to abort.
    fn write_to(&mut self, dst: &TcpStream, now: Instant) -> Result<(), ()> {
        while let Some((at, bytes, written)) = self.queue.front_mut() {
            if *at > now {
                break;
            }
            match (&*dst).write(&bytes[*written..]) {
                Ok(n) => {
                    *written += n;
                    self.queued -= n;
                    if *written == bytes.len() {
                        self.queue.pop_front();
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    break
                }
                Err(_) => return Err(()),
            }
        }
        if self.done() && !self.shut {
            self.shut = true;
            let _ = dst.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

enum TriggerState {
    Idle,
    /// The needle was read: forward up to it, then wait.
    Flushing(Duration),
    /// The chunk is with the server; reset at the deadline.
    Waiting(Instant),
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn poll_fd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn run_connection(shared: &Shared, ctl: &ConnCtl, client: TcpStream) {
    let target = *shared.target.lock();
    let upstream = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => {
            abort(&client);
            return;
        }
    };
    if let Ok(local) = upstream.local_addr() {
        ctl.upstream_port.store(local.port(), Ordering::SeqCst);
    }
    for stream in [&client, &upstream] {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            abort(&client);
            abort(&upstream);
            return;
        }
    }
    let mut c2s = Pipe::default();
    let mut s2c = Pipe::default();
    let mut trigger = TriggerState::Idle;
    let mut tail: Vec<u8> = Vec::new();
    let mut counter = MessageCounter::default();
    let mut lost = false;

    let outcome: Result<(), ()> = (|| loop {
        if shared.shutdown.load(Ordering::SeqCst) || ctl.sever.load(Ordering::SeqCst) {
            return Err(());
        }
        let now = Instant::now();
        if let TriggerState::Waiting(deadline) = trigger {
            if now >= deadline {
                return Err(());
            }
        }
        if c2s.done() && s2c.done() && c2s.shut && s2c.shut {
            return Ok(());
        }
        let stalled = shared.stalled.load(Ordering::SeqCst) || ctl.silenced.load(Ordering::SeqCst);
        let frozen = matches!(trigger, TriggerState::Waiting(_));
        // While stalled nothing is read or written: data, FINs and RSTs wait in the kernel.
        let read_client = !stalled && c2s.wants_read() && matches!(trigger, TriggerState::Idle);
        let read_upstream = !stalled && !frozen && s2c.wants_read();

        let mut client_events: libc::c_short = 0;
        let mut upstream_events: libc::c_short = 0;
        if read_client {
            client_events |= libc::POLLIN;
        }
        if read_upstream {
            upstream_events |= libc::POLLIN;
        }
        if !stalled && c2s.ready(now) {
            upstream_events |= libc::POLLOUT;
        }
        if !stalled && !frozen && s2c.ready(now) {
            client_events |= libc::POLLOUT;
        }
        let mut wake_at: Option<Instant> = None;
        if !stalled {
            for at in [c2s.next_ready(), s2c.next_ready()].into_iter().flatten() {
                if at > now {
                    wake_at = Some(wake_at.map_or(at, |w: Instant| w.min(at)));
                }
            }
        }
        if let TriggerState::Waiting(deadline) = trigger {
            wake_at = Some(wake_at.map_or(deadline, |w| w.min(deadline)));
        }
        let timeout_ms = match wake_at {
            Some(at) => {
                let ms = at.saturating_duration_since(now).as_micros().div_ceil(1000);
                libc::c_int::try_from(ms).unwrap_or(1000).clamp(0, 1000)
            }
            None => 1000,
        };
        let mut fds = [
            poll_fd(client.as_raw_fd(), client_events),
            poll_fd(upstream.as_raw_fd(), upstream_events),
            poll_fd(ctl.wake.as_raw_fd(), libc::POLLIN),
        ];
        // SAFETY: fds is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(());
            }
            continue;
        }
        if fds[2].revents != 0 {
            ctl.drain();
        }
        // poll reports errors and hang-ups even when not asked. While a fault holds the
        // connection they must wait like everything else; otherwise an error ends it, and a
        // hang-up on a side we are not reading must not make this loop spin.
        let mut idle_hangup = false;
        for pfd in &fds[..2] {
            let trouble = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL);
            if trouble == 0 {
                continue;
            }
            if stalled || frozen {
                idle_hangup = true;
            } else if trouble & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(());
            } else if pfd.events == 0 {
                idle_hangup = true;
            }
        }
        if idle_hangup {
            std::thread::sleep(Duration::from_millis(5));
            if stalled || frozen {
                continue;
            }
        }

        let latency = Duration::from_micros(shared.latency_us.load(Ordering::SeqCst));
        if read_client {
            if let Some(chunk) = c2s.read_from(&client, latency)? {
                counter.feed(&chunk, &shared.messages);
                let mut armed = shared.trigger.lock();
                if let Some(t) = armed.as_ref() {
                    let mut hay = std::mem::take(&mut tail);
                    hay.extend_from_slice(&chunk);
                    if contains(&hay, &t.needle) {
                        let cut = t.cut;
                        *armed = None;
                        match cut {
                            Cut::AfterForwarding(after) => {
                                trigger = TriggerState::Flushing(after);
                            }
                            Cut::BeforeForwarding => return Err(()),
                            Cut::Lose => {
                                lost = true;
                                return Err(());
                            }
                        }
                    }
                    tail = hay;
                } else {
                    tail.extend_from_slice(&chunk);
                }
                let excess = tail.len().saturating_sub(TAIL_KEEP);
                tail.drain(..excess);
            }
        }
        if read_upstream {
            s2c.read_from(&upstream, latency)?;
        }
        // Writes re-check the stall flag: it may have been switched on during poll.
        let now = Instant::now();
        if !shared.stalled.load(Ordering::SeqCst) && !ctl.silenced.load(Ordering::SeqCst) {
            c2s.write_to(&upstream, now)?;
            if let TriggerState::Flushing(after) = trigger {
                if c2s.queue.is_empty() {
                    trigger = TriggerState::Waiting(Instant::now() + after);
                }
            }
            if !matches!(trigger, TriggerState::Waiting(_)) {
                s2c.write_to(&client, now)?;
            }
        }
    })();

    if lost {
        // The client sees its connection reset; the server hears nothing more: its session
        // stays open until the silence is severed or expires, or the proxy goes.
        abort(&client);
        drop(client);
        ctl.silenced.store(true, Ordering::SeqCst);
        let expires = Instant::now() + SILENCE_EXPIRES_AFTER;
        while !shared.shutdown.load(Ordering::SeqCst)
            && !ctl.sever.load(Ordering::SeqCst)
            && Instant::now() < expires
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        abort(&upstream);
        return;
    }
    if outcome.is_err() {
        abort(&client);
        abort(&upstream);
    }
    // Dropping the streams closes them (with RST after abort()).
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_messages_split_across_reads() {
        let counts = Mutex::new([0u64; 256]);
        let mut c = MessageCounter::default();
        let mut stream = Vec::new();
        // Startup: length 16, protocol 3.0, 8 bytes of parameters.
        stream.extend_from_slice(&16u32.to_be_bytes());
        stream.extend_from_slice(&196_608u32.to_be_bytes());
        stream.extend_from_slice(b"user\0ab\0\0");
        stream.truncate(16);
        let q = |sql: &str| {
            let mut m = vec![b'Q'];
            m.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
            m.extend_from_slice(sql.as_bytes());
            m.push(0);
            m
        };
        stream.extend(q("SELECT 1"));
        stream.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        stream.extend(q("COMMIT"));
        for chunk in stream.chunks(3) {
            c.feed(chunk, &counts);
        }
        let counts = counts.lock();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[usize::from(b'Q')], 2);
        assert_eq!(counts[usize::from(b'S')], 1);
    }

    #[test]
    fn finds_needles() {
        assert!(contains(b"xxCOMMITyy", b"COMMIT"));
        assert!(!contains(b"COMMI", b"COMMIT"));
        assert!(!contains(b"anything", b""));
    }
}
