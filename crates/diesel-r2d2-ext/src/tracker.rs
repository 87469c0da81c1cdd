//! Per-connection state, carried inside the connection itself.
//!
//! r2d2 hands the manager a bare `&mut PgConnection`, with no room for the pool's
//! bookkeeping. Diesel gives every connection an [`Instrumentation`] slot that can be
//! downcast, so each pooled connection carries a [`Tracker`] there: its lifecycle state, our
//! duplicate of its socket, its leak timer, and a view of every query's outcome. That last part
//! is what makes disconnect detection need no change at call sites: a query that fails with a
//! connection-class error marks the connection broken (r2d2 then drops it at checkin instead
//! of pooling it) and invalidates the pool's older connections.
//!
//! The application's own default instrumentation (`diesel::connection::set_default_instrumentation`)
//! keeps working: the tracker forwards every event to it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use parking_lot::Mutex;
use pool_core::budget::{Budget, ClassId, Permit};
use pool_core::classify::ErrorClass;
use pool_core::config::PoolConfig;
use pool_core::events::{EventListener, PoolEvent};
use pool_core::lifecycle::{CloseReason, ConnectionState, Epoch};
use pool_core::stats::PoolStats;

use crate::socket::ConnSocket;
use crate::watchdog::Armed;

/// State shared by a pool and all its connections.
pub(crate) struct Shared {
    pub(crate) config: PoolConfig,
    pub(crate) stats: PoolStats,
    pub(crate) epoch: Epoch,
    pub(crate) listener: Arc<dyn EventListener>,
    /// The shared budget this pool's connections take permits from, and its class.
    pub(crate) budget: Option<(Budget, ClassId)>,
    /// Idle connections to close on their next checkout, to give permits back to the budget.
    pub(crate) reclaim: AtomicU32,
    next_id: AtomicU64,
    last_invalidation_event: Mutex<Option<Instant>>,
}

impl Shared {
    pub(crate) fn new(
        config: PoolConfig,
        listener: Arc<dyn EventListener>,
        budget: Option<(Budget, ClassId)>,
    ) -> Shared {
        Shared {
            config,
            stats: PoolStats::new(),
            epoch: Epoch::default(),
            listener,
            budget,
            reclaim: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            last_invalidation_event: Mutex::new(None),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Every connection validated before now gets pinged before its next use.
    pub(crate) fn invalidate(&self, reason: &str) {
        self.epoch.bump();
        self.stats.record_invalidation();
        // A restart kills every connection at once: report the first, not each of them.
        let mut last = self.last_invalidation_event.lock();
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            drop(last);
            self.listener.on_event(&PoolEvent::Invalidated {
                pool: self.name(),
                reason,
            });
        }
    }
}

/// The pool's view of one connection; lives in the connection's instrumentation slot.
pub(crate) struct Tracker {
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
    pub(crate) state: ConnectionState,
    pub(crate) socket: Option<ConnSocket>,
    /// Why the pool decided to close it, reported when it is dropped.
    pub(crate) close_reason: Option<CloseReason>,
    /// The leak timer of the current checkout.
    pub(crate) leak_timer: Option<Armed>,
    /// The budget permit this connection holds; released when the connection is dropped
    /// (after its socket is closed: the connection's fields drop before its instrumentation).
    pub(crate) permit: Option<Permit>,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Tracker {
    pub(crate) fn new(shared: Arc<Shared>, socket: Option<ConnSocket>) -> Tracker {
        let now = Instant::now();
        let state = shared
            .config
            .lifecycle
            .new_connection(now, shared.epoch.current());
        Tracker {
            id: shared.next_id(),
            shared,
            state,
            socket,
            close_reason: None,
            leak_timer: None,
            permit: None,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }

    fn observe_error(&mut self, err: &diesel::result::Error) {
        let class = crate::classify::classify_diesel(err);
        let lost = matches!(
            class,
            ErrorClass::ConnectionLost
                | ErrorClass::AdminShutdown
                | ErrorClass::ReadOnlyTransaction
        );
        if lost && !self.state.broken {
            self.state.broken = true;
            self.close_reason = Some(CloseReason::Broken);
        }
        if class.invalidates_pool() {
            self.shared.invalidate(class.as_str());
        }
    }
}

impl Instrumentation for Tracker {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery {
            error: Some(err), ..
        } = &event
        {
            self.observe_error(err);
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let reason = self.close_reason.unwrap_or(CloseReason::Released);
        self.shared.stats.record_close(reason);
        self.shared.listener.on_event(&PoolEvent::Closed {
            pool: self.shared.name(),
            connection_id: self.id,
            reason,
        });
    }
}

/// The tracker of a pooled connection, if it still carries one (an application may have
/// replaced the connection's instrumentation).
pub(crate) fn tracker_of<C: diesel::Connection>(conn: &mut C) -> Option<&mut Tracker> {
    conn.instrumentation().downcast_mut::<Tracker>()
}
