//! Per-connection state, carried inside the connection itself: `diesel-ext-common`'s
//! [`Tracker`](diesel_ext_common::Tracker). Its statement watch also covers the pool's own
//! round trips (a keepalive ping, a health check's ping, a standby check: each is a statement
//! the tracker sees start): a connection that comes back with one still in flight, its future
//! dropped half-way, is closed at checkin by [`left_in_transaction`].

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::classify::ErrorClass;
use pool_core::engine::ConnState;

/// The pool's view of one connection; lives in the connection's instrumentation slot.
pub(crate) type Tracker = diesel_ext_common::Tracker<ServerSocket>;

/// The tracker of a connection in `state`, with `socket`, classifying its errors with
/// `classify`.
pub(crate) fn tracker(
    state: ConnState,
    socket: ServerSocket,
    classify: fn(&diesel::result::Error) -> ErrorClass,
) -> Tracker {
    Tracker::new(
        state,
        socket,
        classify,
        diesel_ext_common::tracker::SqlAt::Finish,
    )
}

/// What the async tracker keeps besides the engine's state: our duplicate of a PostgreSQL
/// connection's socket, when one was claimed at connect (a pool with a budget; see
/// `PgConnector::connect_claiming`), waited on at close so that the connection's budget
/// permit comes back only once the server let the session go.
#[derive(Debug, Default)]
pub struct ServerSocket {
    #[cfg(feature = "postgres-core")]
    socket: Option<diesel_ext_common::socket::ConnSocket>,
}

#[cfg(feature = "postgres-core")]
impl ServerSocket {
    /// Keeps `socket` (none: the connection closes without waiting for the server).
    pub(crate) fn new(socket: Option<diesel_ext_common::socket::ConnSocket>) -> ServerSocket {
        ServerSocket { socket }
    }
}

impl diesel_ext_common::tracker::Extra for ServerSocket {
    /// diesel-async has dropped its connection: its task drops the driver's descriptor
    /// without a Terminate message, and ours keeps the socket open. So we end our side of
    /// the stream, and a task of the runtime waits for the server's end-of-file (a backend
    /// keeps its socket open until its process exited, after its slot was freed), within
    /// the wait's bound, before it releases the permit. A socket whose peer is gone already
    /// releases it here, without a task. No socket, or no runtime here (a connection dropped
    /// outside one): the permit is released at once.
    fn confirm_close(&mut self, wait: pool_core::engine::CloseWait) {
        #[cfg(feature = "postgres-core")]
        if let (Some(socket), Ok(runtime)) =
            (self.socket.take(), tokio::runtime::Handle::try_current())
        {
            socket.shutdown_write();
            if socket.probe() == diesel_ext_common::socket::Probe::Dead {
                // Gone already (a stopped server, a reset): the permit is back before the
                // next connect asks for it, as in the sync pool.
                wait.finish(true);
                return;
            }
            runtime.spawn(async move {
                match server_let_go(socket, wait.bound()).await {
                    Some(confirmed) => wait.finish(confirmed),
                    None => drop(wait),
                }
            });
            return;
        }
        drop(wait);
    }
}

/// Waits up to `bound` for the server's end-of-file (or a reset) on our duplicate of a
/// closed connection's socket, without reading from it: `Some(true)` once it came,
/// `Some(false)` when `bound` ran out, `None` when the runtime cannot watch the descriptor.
#[cfg(feature = "postgres-core")]
pub(crate) async fn server_let_go(
    socket: diesel_ext_common::socket::ConnSocket,
    bound: std::time::Duration,
) -> Option<bool> {
    /// Registers our duplicate with the runtime, and keeps it open while it is registered.
    struct Watched(diesel_ext_common::socket::ConnSocket);
    impl std::os::fd::AsRawFd for Watched {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.raw_fd()
        }
    }
    let register = move || {
        // SAFETY: `Watched` holds a clone of the `ConnSocket`, whose duplicate stays open
        // and keeps its number until the last clone is dropped, after the registration.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                Watched(socket),
                tokio::io::Interest::READABLE,
            )
        }
    };
    // A runtime without I/O enabled panics here (a connection dropped on another runtime
    // than the one it was opened on): then nobody can watch it.
    let watched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(register))
        .ok()?
        .ok()?;
    let end_of_file = async {
        loop {
            let mut ready = watched.readable().await.ok()?;
            // A FIN (`EPOLLRDHUP`) or a reset (`EPOLLHUP`); bytes before it are left unread.
            if ready.ready().is_read_closed() {
                return Some(true);
            }
            ready.clear_ready();
        }
    };
    tokio::time::timeout(bound, end_of_file)
        .await
        .unwrap_or(Some(false))
}

/// The instrumentation of a dedicated connection (outside the pool) of a budget class: it
/// holds the connection's budget permit, released when the connection is dropped.
pub(crate) struct Dedicated {
    _permit: pool_core::budget::Permit,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Dedicated {
    pub(crate) fn new(permit: pool_core::budget::Permit) -> Dedicated {
        Dedicated {
            _permit: permit,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }
}

impl Instrumentation for Dedicated {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

/// At checkin: whether `conn` may be inside a transaction block and must be closed (bb8's
/// checkin cannot wait for a `ROLLBACK`): a transaction Diesel's manager opened and still
/// holds (`begin_test_transaction`, which diesel-async's own `is_broken` lets through), a
/// session the tracker marked suspect (a raw `BEGIN` not followed by a successful plain
/// `COMMIT`/`ROLLBACK`, or a statement whose future was dropped; see
/// `diesel_ext_common::tracker`), or a connection whose tracker the application replaced. A
/// session of Diesel-built queries and Diesel-managed transactions costs nothing here.
pub(crate) fn left_in_transaction<C: crate::backend::ExtConnection>(conn: &mut C) -> bool {
    use diesel_async::TransactionManager;
    let depth = C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth();
    !matches!(depth, Ok(None)) || tracker_of(conn).is_none_or(|t| t.take_transaction_suspect())
}

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel_async::AsyncConnection>(conn: &mut C) -> Option<&mut Tracker> {
    diesel_ext_common::tracker::tracker_of(conn.instrumentation())
}
