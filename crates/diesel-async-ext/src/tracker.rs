//! Per-connection state, carried inside the connection itself.
//!
//! bb8 hands the manager a bare `&mut AsyncPgConnection`, with no room for the pool's
//! bookkeeping. Diesel gives every connection an instrumentation slot that can be downcast
//! (diesel-async's connections and the sync wrapper's inner connection included), so each
//! pooled connection carries a [`Tracker`] there: the engine's [`ConnState`] and a view of
//! every query's outcome. A query that fails with a connection-class error marks its
//! connection broken (bb8 then drops it at checkin instead of pooling it) and invalidates the
//! pool's older connections — with no change at call sites.
//!
//! The application's own default instrumentation (`diesel::connection::set_default_instrumentation`)
//! keeps working: the tracker forwards every event to it.

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::classify::ErrorClass;
use pool_core::engine::ConnState;

/// The pool's view of one connection; lives in the connection's instrumentation slot.
pub(crate) struct Tracker {
    pub(crate) state: ConnState,
    /// A round trip of the pool's own (a keepalive ping, a standby check) is under way. If
    /// the connection comes back like this, its future was dropped half-way: it is closed.
    pub(crate) busy: bool,
    classify: fn(&diesel::result::Error) -> ErrorClass,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Tracker {
    pub(crate) fn new(
        state: ConnState,
        classify: fn(&diesel::result::Error) -> ErrorClass,
    ) -> Tracker {
        Tracker {
            state,
            busy: false,
            classify,
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
            self.state.observe_error((self.classify)(err));
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
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

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel_async::AsyncConnection>(conn: &mut C) -> Option<&mut Tracker> {
    conn.instrumentation().downcast_mut::<Tracker>()
}
