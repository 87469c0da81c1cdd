//! Per-connection state, carried inside the connection itself.
//!
//! r2d2 and bb8 hand their managers a bare connection, with no room for the pool's
//! bookkeeping. Diesel gives every connection an [`Instrumentation`] slot that can be
//! downcast (diesel-async's connections and the sync wrapper's inner connection included), so
//! each pooled connection carries a [`Tracker`] there: the engine's [`ConnState`], what the
//! adapter keeps besides (the sync pool: its duplicate of the socket; the async pool: whether
//! a round trip of its own is under way), and a view of every query's outcome. That last part
//! is what makes disconnect detection pool-wide with no change at call sites: a query that
//! fails with a connection-class error invalidates the pool's older connections (the
//! connection itself is closed at checkin, where the driver reports it broken).
//!
//! The application's own default instrumentation
//! (`diesel::connection::set_default_instrumentation`) keeps working: the tracker forwards
//! every event to it.

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::classify::ErrorClass;
use pool_core::engine::ConnState;

/// The pool's view of one connection; lives in the connection's instrumentation slot.
///
/// Field order matters: what the adapter keeps (`extra`, a socket duplicate say) is dropped
/// before the state, whose drop releases the budget permit (and the connection's own socket
/// is closed before its instrumentation).
pub struct Tracker<X> {
    /// What the adapter keeps besides the state.
    pub extra: X,
    /// The engine's state of this connection.
    pub state: ConnState,
    classify: fn(&diesel::result::Error) -> ErrorClass,
    inner: Option<Box<dyn Instrumentation>>,
}

impl<X> Tracker<X> {
    /// The tracker of a connection in `state`, classifying its queries' errors with
    /// `classify`, forwarding every event to the application's default instrumentation.
    pub fn new(
        state: ConnState,
        extra: X,
        classify: fn(&diesel::result::Error) -> ErrorClass,
    ) -> Tracker<X> {
        Tracker {
            extra,
            state,
            classify,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }
}

impl<X> std::fmt::Debug for Tracker<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("connection", &self.state.id())
            .finish_non_exhaustive()
    }
}

impl<X: Send + 'static> Instrumentation for Tracker<X> {
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

/// The tracker in a connection's instrumentation slot (`conn.instrumentation()`), if it still
/// carries one (an application may have replaced the connection's instrumentation).
pub fn tracker_of<X: Send + 'static>(
    instrumentation: &mut dyn Instrumentation,
) -> Option<&mut Tracker<X>> {
    instrumentation.downcast_mut::<Tracker<X>>()
}
