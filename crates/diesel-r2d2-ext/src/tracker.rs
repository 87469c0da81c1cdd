//! Per-connection state, carried inside the connection itself: `diesel-ext-common`'s
//! [`Tracker`](diesel_ext_common::Tracker), holding besides the engine's state our duplicate of
//! the connection's socket ([`SocketSlot`]), probed on every checkout and shut down by the
//! watchdog when a ping stalls.

use std::time::{Duration, Instant};

use diesel::connection::TransactionManager;
use pool_core::engine::Watchdog;

use crate::socket::{Candidates, ConnSocket};

/// What the pool knows of a connection's socket.
pub(crate) enum SocketSlot {
    /// Ours: probed on every checkout, shut down by the watchdog when a ping stalls.
    Known(ConnSocket),
    /// Several sockets could be this connection's; resolved by elimination at a checkout.
    Pending(Candidates),
    /// None (embedded database, or the platform does not let us find it).
    None,
}

impl SocketSlot {
    /// The socket, if known. A pending identification is never resolved here: only right
    /// after a successful round trip (see [`SocketSlot::after_success`]), so a connection
    /// whose socket is uncertain is pinged, never probed or bounded with another one's.
    pub(crate) fn get(&self) -> Option<&ConnSocket> {
        match self {
            SocketSlot::Known(sock) => Some(sock),
            _ => None,
        }
    }
}

impl diesel_ext_common::tracker::Extra for SocketSlot {
    /// A statement just succeeded, so the connection's own socket is open and among the
    /// candidates: elimination is sound now (see `socket`'s invariant), and only now.
    fn after_success(&mut self) {
        if let SocketSlot::Pending(candidates) = self {
            if let Some(sock) = candidates.resolve() {
                *self = SocketSlot::Known(sock);
            }
        }
    }

    /// libpq has closed its descriptor; ours keeps the socket open: wait on it for the
    /// server's end-of-file (see [`ConnSocket::confirm_closed`]).
    fn confirm_close(&mut self, wait: pool_core::engine::CloseWait) {
        if let Some(sock) = self.get() {
            let confirmed = sock.confirm_closed(wait.bound());
            wait.finish(confirmed);
        }
    }
}

/// The pool's view of one connection, with its socket; lives in the connection's
/// instrumentation slot.
pub(crate) type Tracker = diesel_ext_common::Tracker<SocketSlot>;

/// The tracker of a connection in `state` with `socket`.
pub(crate) fn tracker(state: pool_core::engine::ConnState, socket: SocketSlot) -> Tracker {
    Tracker::new(
        state,
        socket,
        crate::classify::classify_diesel,
        diesel_ext_common::tracker::SqlAt::Start,
    )
}

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel::Connection>(conn: &mut C) -> Option<&mut Tracker> {
    diesel_ext_common::tracker::tracker_of(conn.instrumentation())
}

/// What SQLite answers a `ROLLBACK` outside a transaction
/// ("cannot rollback - no transaction is active").
const SQLITE_NO_TRANSACTION: &str = "no transaction is active";

/// At checkin: whether `conn` must be closed because it may be inside a transaction block.
///
/// A transaction Diesel's manager opened and still holds (`begin_test_transaction`, which
/// Diesel's own `is_broken` lets through) closes the connection. A session the tracker marked
/// suspect (a raw `BEGIN` not followed by a successful plain `COMMIT`/`ROLLBACK`; see
/// `diesel_ext_common::tracker`), or a connection whose tracker the application replaced, is
/// sent a `ROLLBACK` (a no-op with a warning outside a transaction; SQLite's refusal there
/// counts as done), bounded by `timeout` with
/// the watchdog shutting the socket down at the deadline; if that fails, times out, or cannot
/// be bounded (socket unknown, except for an `embedded` database), the connection is closed.
/// A session of Diesel-built queries and Diesel-managed transactions costs nothing here.
pub(crate) fn left_in_transaction<C: crate::ExtConnection>(
    conn: &mut C,
    embedded: bool,
    timeout: Duration,
) -> bool {
    let depth = C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth();
    if !matches!(depth, Ok(None)) {
        return true;
    }
    let Some(tracker) = tracker_of(conn) else {
        return true;
    };
    if !tracker.take_transaction_suspect() {
        return false;
    }
    let socket = tracker.extra.get().cloned();
    if socket.is_none() && !embedded {
        return true;
    }
    let deadline = socket
        .map(|s| Watchdog::global().arm_critical(Instant::now() + timeout, move || s.shutdown()));
    let rolled_back = match conn.batch_execute("ROLLBACK") {
        Ok(()) => true,
        // SQLite refuses a `ROLLBACK` outside a transaction (PostgreSQL only warns): that
        // answers the question too, and a statement that merely mentioned a keyword (a
        // trigger's `BEGIN ... END`) does not cost an embedded database its connection.
        Err(diesel::result::Error::DatabaseError(_, info))
            if embedded && info.message().contains(SQLITE_NO_TRANSACTION) =>
        {
            true
        }
        Err(_) => false,
    };
    let fired = deadline.is_some_and(|d| d.disarm());
    !rolled_back || fired
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use diesel_ext_common::tracker::{statement_effect, TxEffect};

    #[test]
    fn the_first_chunk_diesel_writes_for_a_query_is_its_whole_statement() {
        // `statement_effect` reads only the first `write_str` of a query's `Display`: it must
        // hold the whole statement, or a keyword past it would go unseen.
        let q = diesel::sql_query("SELECT 1; BEGIN").bind::<diesel::sql_types::Integer, _>(7);
        let query = diesel::debug_query::<diesel::pg::Pg, _>(&q);
        assert_eq!(statement_effect(&query), TxEffect::MayOpen);
        let q = diesel::sql_query("SELECT 2 -- START");
        let query = diesel::debug_query::<diesel::pg::Pg, _>(&q);
        assert_eq!(statement_effect(&query), TxEffect::MayOpen);
        let q = diesel::sql_query("SELECT 2");
        let query = diesel::debug_query::<diesel::pg::Pg, _>(&q);
        assert_eq!(statement_effect(&query), TxEffect::Neutral);
    }
}

/// The pending socket of an ambiguous identification (the socket module's own tests are in
/// `diesel-ext-common`).
#[cfg(all(test, target_os = "linux"))]
mod socket_slot_tests {
    use super::SocketSlot;
    use crate::socket::{begin_connect, ConnSocket, PeerFilter, SocketClaim};
    use diesel_ext_common::tracker::Extra;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    fn inode<T: AsRawFd>(sock: &T) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", sock.as_raw_fd()))
            .expect("a descriptor")
            .ino()
    }

    fn tcp_filter(port: u16) -> PeerFilter {
        PeerFilter::ports(&[port], &[])
    }

    /// Echoes every byte back on each of the next `n` connections.
    fn echo_server(listener: TcpListener, n: usize) {
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1];
                    while let Ok(1) = conn.read(&mut buf) {
                        if conn.write_all(&buf).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// One round trip: a byte out, its echo back.
    fn echo_once(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        stream.write_all(b"?").is_ok() && stream.read_exact(&mut buf).is_ok()
    }

    #[test]
    fn a_pending_socket_is_resolved_only_right_after_a_successful_statement() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        echo_server(listener, 2);
        let filter = tcp_filter(port);
        let window = begin_connect();
        let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let SocketClaim::Ambiguous(candidates) =
            window.finish(&filter, &mut || echo_once(&mut a) && echo_once(&mut b))
        else {
            panic!("two sockets that both answer: ambiguous");
        };
        let mut slot = SocketSlot::Pending(candidates);
        // b's connection is lost and its socket closed: elimination would now say "a", but
        // nothing proves a is still open and ours until a statement on the connection succeeds
        // (a lost connection's socket is closed by libpq too).
        drop(b);
        assert!(
            slot.get().is_none(),
            "a checkout must not resolve a pending socket: it pings"
        );
        assert!(echo_once(&mut a));
        slot.after_success();
        assert_eq!(slot.get().map(ConnSocket::inode), Some(inode(&a)));
    }
}
