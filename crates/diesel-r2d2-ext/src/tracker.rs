//! Per-connection state, carried inside the connection itself.
//!
//! r2d2 hands the manager a bare `&mut PgConnection`, with no room for the pool's
//! bookkeeping. Diesel gives every connection an [`Instrumentation`] slot that can be
//! downcast, so each pooled connection carries a [`Tracker`] there: the engine's
//! [`ConnState`], our duplicate of its socket, and a view of every query's outcome. That last
//! part is what makes disconnect detection need no change at call sites: a query that fails
//! with a connection-class error marks the connection broken (r2d2 then drops it at checkin
//! instead of pooling it) and invalidates the pool's older connections.
//!
//! The application's own default instrumentation (`diesel::connection::set_default_instrumentation`)
//! keeps working: the tracker forwards every event to it.

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::engine::ConnState;

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
    /// The socket, resolving a pending identification first (no scan: only the candidates
    /// are looked at).
    pub(crate) fn get(&mut self) -> Option<&ConnSocket> {
        if let SocketSlot::Pending(candidates) = self {
            if let Some(sock) = candidates.resolve() {
                *self = SocketSlot::Known(sock);
            }
        }
        match self {
            SocketSlot::Known(sock) => Some(sock),
            _ => None,
        }
    }
}

/// The pool's view of one connection; lives in the connection's instrumentation slot.
///
/// Field order matters: the socket duplicate is closed before the state, whose drop releases
/// the budget permit (and the connection's own socket is closed before its instrumentation).
pub(crate) struct Tracker {
    pub(crate) socket: SocketSlot,
    pub(crate) state: ConnState,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Tracker {
    pub(crate) fn new(state: ConnState, socket: SocketSlot) -> Tracker {
        Tracker {
            socket,
            state,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }
}

impl Instrumentation for Tracker {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery {
            error: Some(err), ..
        } = &event
        {
            self.state
                .observe_error(crate::classify::classify_diesel(err));
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel::Connection>(conn: &mut C) -> Option<&mut Tracker> {
    conn.instrumentation().downcast_mut::<Tracker>()
}
