//! Per-connection state, carried inside the connection itself: `diesel-ext-common`'s
//! [`Tracker`](diesel_ext_common::Tracker). Its statement watch also covers the pool's own
//! round trips (a keepalive ping, a health check's ping, a standby check: each is a statement
//! the tracker sees start): a connection that comes back with one still in flight, its future
//! dropped half-way, is closed at checkin by [`left_in_transaction`].

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::classify::ErrorClass;
use pool_core::engine::ConnState;

/// The pool's view of one connection; lives in the connection's instrumentation slot. The
/// async adapter keeps nothing beside the engine's state.
pub(crate) type Tracker = diesel_ext_common::Tracker<()>;

/// The tracker of a connection in `state`, classifying its errors with `classify`.
pub(crate) fn tracker(
    state: ConnState,
    classify: fn(&diesel::result::Error) -> ErrorClass,
) -> Tracker {
    Tracker::new(
        state,
        (),
        classify,
        diesel_ext_common::tracker::SqlAt::Finish,
    )
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
