//! Per-connection state, carried inside the connection itself: `diesel-ext-common`'s
//! [`Tracker`](diesel_ext_common::Tracker), holding besides the engine's state our duplicate of
//! the connection's socket ([`SocketSlot`]), probed on every checkout and shut down by the
//! watchdog when a ping stalls.

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

/// The pool's view of one connection, with its socket; lives in the connection's
/// instrumentation slot.
pub(crate) type Tracker = diesel_ext_common::Tracker<SocketSlot>;

/// The tracker of a connection in `state` with `socket`.
pub(crate) fn tracker(state: pool_core::engine::ConnState, socket: SocketSlot) -> Tracker {
    Tracker::new(state, socket, crate::classify::classify_diesel)
}

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel::Connection>(conn: &mut C) -> Option<&mut Tracker> {
    diesel_ext_common::tracker::tracker_of(conn.instrumentation())
}
