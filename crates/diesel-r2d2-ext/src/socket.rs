//! The connection's socket, seen from the side: liveness probe and forced shutdown.
//!
//! Diesel's `PgConnection` does not expose libpq's socket, yet two things need it:
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
//!
//! **Finding the socket.** Right after a connection is established we compare the process's
//! open sockets (file descriptor + inode, from `/proc/self/fd`) before and after, keep the new
//! stream sockets whose peer is the server's port (or a Unix socket), and `dup()` the one that
//! remains. The duplicate is ours: its number can never be reused by another socket while we
//! hold it, and `shutdown()` on it acts on the very same socket libpq uses. Connects to one
//! peer (port, or Unix socket) are serialized within the process, across all pools (see
//! [`connect_lock`]), so that two of our own connects cannot confuse each other; if code
//! outside the pools opens a socket to the same port at the same moment, the candidates stay
//! ambiguous and the connection simply gets no probe (it is then pinged on every checkout, as
//! a plain pool with `test_on_check_out` would).
//!
//! Everything here is Linux-specific (`/proc/self/fd`, `POLLRDHUP`); elsewhere
//! [`identify`] returns `None` and the pool falls back to pings.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

/// What the peer of a connection should look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHint {
    /// A TCP connection to this port (any address: the host may resolve to several).
    Tcp(u16),
    /// A Unix-domain socket.
    Unix,
}

/// The (fd, inode) pairs of the process's open sockets at one instant.
#[derive(Debug, Default)]
pub(crate) struct SocketSnapshot(HashSet<(RawFd, u64)>);

/// Lists the process's open sockets. `None` where `/proc/self/fd` is not available.
pub(crate) fn snapshot() -> Option<SocketSnapshot> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    let mut set = HashSet::new();
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if let Some(ino) = socket_inode(fd) {
            set.insert((fd, ino));
        }
    }
    Some(SocketSnapshot(set))
}

/// The inode of `fd` if it is a socket.
fn socket_inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat only writes into the zeroed struct we own; a stale fd yields EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(fd, &mut st) };
    if rc != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFSOCK {
        return None;
    }
    Some(st.st_ino)
}

/// Whether `fd` is a connected stream socket whose peer matches `hint`.
fn peer_matches(fd: RawFd, hint: PeerHint) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`.
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
        return false;
    }
    // SAFETY: sockaddr_storage is large enough for any address; getpeername writes at most
    // `len` bytes.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe {
        libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return false;
    }
    match (i32::from(addr.ss_family), hint) {
        (libc::AF_INET, PeerHint::Tcp(port)) => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            u16::from_be(sin.sin_port) == port
        }
        (libc::AF_INET6, PeerHint::Tcp(port)) => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            u16::from_be(sin6.sin6_port) == port
        }
        (libc::AF_UNIX, PeerHint::Unix) => true,
        _ => false,
    }
}

/// Finds the one socket opened between `before` and `after` that talks to the server, and
/// returns our own duplicate of it. `None` when there is not exactly one candidate.
pub(crate) fn identify(
    before: &SocketSnapshot,
    after: &SocketSnapshot,
    hint: PeerHint,
) -> Option<ConnSocket> {
    let mut candidates = after
        .0
        .difference(&before.0)
        .filter(|(fd, _)| peer_matches(*fd, hint));
    let (fd, ino) = *candidates.next()?;
    if candidates.next().is_some() {
        return None;
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    // The fd number may have been closed and reused between the snapshot and the dup: make
    // sure we duplicated the very socket we identified.
    if socket_inode(owned.as_raw_fd()) != Some(ino) {
        return None;
    }
    Some(ConnSocket(Arc::new(owned)))
}

/// What a zero-timeout look at the socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Nothing pending, peer still there.
    Alive,
    /// The peer closed or reset the connection.
    Dead,
    /// Bytes are waiting (a notification, a notice, or a FATAL not yet followed by the close):
    /// only a round trip can tell.
    Unknown,
}

/// Our duplicate of a connection's socket.
#[derive(Debug, Clone)]
pub(crate) struct ConnSocket(Arc<OwnedFd>);

impl ConnSocket {
    /// Looks at the socket without reading from it and without blocking.
    pub(crate) fn probe(&self) -> Probe {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 {
            return Probe::Unknown;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP | libc::POLLNVAL) != 0 {
            Probe::Dead
        } else if pfd.revents & libc::POLLIN != 0 {
            Probe::Unknown
        } else {
            Probe::Alive
        }
    }

    /// Shuts the socket down in both directions: a libpq call blocked on it returns at once
    /// with a closed-connection error.
    pub(crate) fn shutdown(&self) {
        // SAFETY: shutdown on a descriptor we own; errors (already closed) are irrelevant.
        unsafe {
            libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

/// The lock that serializes connects to one peer within the process, so that the socket each
/// connect opened can be told apart (see the module docs). The key is the peer as the socket
/// is matched (`Tcp(port)` / `Unix`), not the URL: two pools with different settings for the
/// same server must not connect at the same moment. Connects to other peers never wait.
pub(crate) fn connect_lock(target: &str) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(|| Mutex::new(HashMap::new()));
    locks
        .lock()
        .entry(target.to_owned())
        .or_insert_with(|| Arc::new(Mutex::new(())))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn identifies_the_new_socket_and_probes_it_alive_then_dead() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = snapshot().unwrap();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let after = snapshot().unwrap();
        let sock = identify(&before, &after, PeerHint::Tcp(port)).expect("one candidate");
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(sock.probe(), Probe::Alive);
        server.write_all(b"E").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(sock.probe(), Probe::Unknown);
        drop(server);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(sock.probe(), Probe::Dead);
        drop(client);
    }

    #[test]
    fn two_new_sockets_to_the_same_port_are_ambiguous() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = snapshot().unwrap();
        let _a = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let after = snapshot().unwrap();
        assert!(identify(&before, &after, PeerHint::Tcp(port)).is_none());
    }

    #[test]
    fn shutdown_wakes_a_blocked_reader() {
        use std::io::Read;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = snapshot().unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let after = snapshot().unwrap();
        let sock = identify(&before, &after, PeerHint::Tcp(port)).unwrap();
        let _server = listener.accept().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            client.read(&mut buf)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        sock.shutdown();
        assert_eq!(t.join().unwrap().unwrap(), 0, "reader sees end-of-file");
    }
}
