//! The r2d2 `ManageConnection` implementation: connect, checkout check, checkin check.
//!
//! The pool is always built with `test_on_check_out(true)`, so r2d2 calls
//! [`ExtManager::is_valid`] on every checkout and [`ExtManager::has_broken`] on every checkin;
//! those two are where the [`LifecyclePolicy`](pool_core::lifecycle::LifecyclePolicy) is
//! applied. Validation is bounded by its timeout even when the server hangs: the ping runs
//! under the [watchdog](crate::watchdog), which shuts the socket down at the deadline.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use diesel::r2d2::R2D2Connection;
use pool_core::config::PoolConfig;
use pool_core::error::ConfigError;
use pool_core::events::PoolEvent;
use pool_core::lifecycle::{CheckoutAction, CloseReason, ProbeResult};
use pool_core::redact::redact;

use crate::socket::{self, PeerHint, Probe};
use crate::tracker::{tracker_of, Shared, Tracker};
use crate::watchdog::{Action, Watchdog};

/// A Diesel connection type the extended pool can manage (PostgreSQL, SQLite).
///
/// Sealed: implemented by this crate for the backends enabled by cargo features.
pub trait ExtConnection: R2D2Connection + Send + Sized + 'static + sealed::Backend {}

pub(crate) mod sealed {
    use super::*;

    /// What the manager needs to know about a backend; not nameable outside the crate.
    pub trait Backend {
        /// The string handed to `establish`, and what the connection's socket looks like
        /// (`None` for embedded databases).
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerHint>), ConfigError>;

        /// Settings applied right after connecting.
        fn after_connect(&mut self, _config: &PoolConfig) -> diesel::QueryResult<()> {
            Ok(())
        }
    }

    #[cfg(feature = "postgres")]
    impl Backend for diesel::PgConnection {
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerHint>), ConfigError> {
            let (url, hint) = crate::pg::render(config)?;
            Ok((url, Some(hint)))
        }
    }

    #[cfg(feature = "sqlite")]
    impl Backend for diesel::SqliteConnection {
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerHint>), ConfigError> {
            Ok((config.url.expose_secret().to_owned(), None))
        }

        fn after_connect(&mut self, config: &PoolConfig) -> diesel::QueryResult<()> {
            crate::sqlite::apply(self, &config.sqlite)
        }
    }
}

#[cfg(feature = "postgres")]
impl ExtConnection for diesel::PgConnection {}

#[cfg(feature = "sqlite")]
impl ExtConnection for diesel::SqliteConnection {}

/// Why the manager refused to open or hand out a connection. Never contains a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtError {
    /// The server could not be reached or refused the connection.
    #[error("could not connect to {target}: {message}")]
    Connect {
        /// The redacted URL.
        target: String,
        /// The driver's message, redacted.
        message: String,
    },
    /// The connection was opened but the per-connection settings failed.
    #[error("connected to {target}, but applying the connection settings failed: {message}")]
    Setup {
        /// The redacted URL.
        target: String,
        /// The driver's message, redacted.
        message: String,
    },
    /// The connection was retired on checkout (dead, expired, idle too long); r2d2 takes
    /// another one.
    #[error("connection retired on checkout: {0:?}")]
    Retired(CloseReason),
    /// The shared connection budget had no permit for this pool's class in time.
    #[error("{0}")]
    Budget(String),
    /// The validation ping failed or outlived its timeout.
    #[error("validation ping failed after {elapsed_ms} ms (timeout {timeout_ms} ms): {message}")]
    PingFailed {
        /// How long the ping took.
        elapsed_ms: u128,
        /// The validation timeout.
        timeout_ms: u128,
        /// The driver's message, redacted.
        message: String,
    },
}

/// r2d2 connection manager for Diesel connections with the lifecycle policy applied.
///
/// Built by [`ExtPool`](crate::ExtPool); you rarely name it except in type aliases such as
/// `r2d2::PooledConnection<ExtManager<PgConnection>>`.
pub struct ExtManager<C> {
    pub(crate) shared: Arc<Shared>,
    conninfo: String,
    hint: Option<PeerHint>,
    _conn: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for ExtManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtManager")
            .field("pool", &self.shared.name())
            .field("url", &self.shared.config.url)
            .finish()
    }
}

impl<C: ExtConnection> ExtManager<C> {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<ExtManager<C>, ConfigError> {
        let (conninfo, hint) = C::target(&shared.config)?;
        Ok(ExtManager {
            shared,
            conninfo,
            hint,
            _conn: PhantomData,
        })
    }

    fn establish(&self) -> (diesel::ConnectionResult<C>, Option<socket::ConnSocket>) {
        let Some(hint) = self.hint else {
            return (C::establish(&self.conninfo), None);
        };
        let lock = socket::connect_lock(&format!("{hint:?}"));
        let _serialized = lock.lock();
        let before = socket::snapshot();
        let conn = C::establish(&self.conninfo);
        let sock = match (&conn, before, socket::snapshot()) {
            (Ok(_), Some(before), Some(after)) => socket::identify(&before, &after, hint),
            _ => None,
        };
        if conn.is_ok() && sock.is_none() {
            log::debug!(target: "resilient_diesel", "pool {}: could not identify the new connection's socket; it will be validated by pings only", self.shared.name());
        }
        (conn, sock)
    }

    fn target_redacted(&self) -> String {
        self.shared.config.url.redacted()
    }
}

impl<C: ExtConnection> r2d2::ManageConnection for ExtManager<C> {
    type Connection = C;
    type Error = ExtError;

    fn connect(&self) -> Result<C, ExtError> {
        let started = Instant::now();
        let shared = &self.shared;
        // The permit comes first: no connection is opened beyond the budget, and nothing is
        // locked while waiting for it. The wait ends a little before the checkout's, so that a
        // checkout timing out on the budget reports the budget's state (r2d2 quotes the last
        // connect error).
        let permit = match &shared.budget {
            Some((budget, class)) => Some(
                budget
                    .acquire(*class, shared.config.pool_timeout.mul_f64(0.8))
                    .map_err(|e| ExtError::Budget(format!("pool {}: {e}", shared.name())))?,
            ),
            None => None,
        };
        let (conn, sock) = self.establish();
        let mut conn = conn.map_err(|e| {
            shared.stats.record_connect_failure();
            let message = redact(&e.to_string());
            shared.listener.on_event(&PoolEvent::ConnectFailed {
                pool: shared.name(),
                error: &message,
            });
            ExtError::Connect {
                target: self.target_redacted(),
                message,
            }
        })?;
        conn.after_connect(&shared.config)
            .map_err(|e| ExtError::Setup {
                target: self.target_redacted(),
                message: redact(&e.to_string()),
            })?;
        let mut tracker = Tracker::new(shared.clone(), sock);
        tracker.permit = permit;
        let id = tracker.id;
        conn.set_instrumentation(tracker);
        shared.stats.record_connect();
        shared.listener.on_event(&PoolEvent::Connected {
            pool: shared.name(),
            connection_id: id,
            took: started.elapsed(),
        });
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut C) -> Result<(), ExtError> {
        let shared = &self.shared;
        let policy = &shared.config.lifecycle;
        let now = Instant::now();
        let epoch = shared.epoch.current();
        if tracker_of(conn).is_none() {
            // The application replaced the connection's instrumentation: we know nothing of
            // this connection any more, so treat it as new but unvalidated.
            let mut tracker = Tracker::new(shared.clone(), None);
            tracker.state.validated_epoch = epoch.saturating_sub(1);
            tracker.state.last_used = now - policy.validation.bypass_window;
            conn.set_instrumentation(tracker);
        }
        let Some(tracker) = tracker_of(conn) else {
            return Ok(());
        };
        if take_reclaim(&shared.reclaim) {
            tracker.close_reason = Some(CloseReason::Reclaimed);
            return Err(ExtError::Retired(CloseReason::Reclaimed));
        }
        let probe = match tracker.socket.as_ref().map(socket::ConnSocket::probe) {
            Some(Probe::Alive) => ProbeResult::Alive,
            Some(Probe::Dead) => ProbeResult::Dead,
            Some(Probe::Unknown) => ProbeResult::Unknown,
            None => ProbeResult::Unavailable,
        };
        match policy.on_checkout(&tracker.state, now, epoch, probe) {
            CheckoutAction::Reuse => {}
            CheckoutAction::Discard(reason) => {
                tracker.close_reason = Some(reason);
                if reason == CloseReason::ProbeDead {
                    shared.stats.record_probe_dead();
                    shared.invalidate("liveness probe found a connection closed by the server");
                }
                return Err(ExtError::Retired(reason));
            }
            CheckoutAction::Ping => {
                let timeout = policy.validation.timeout;
                let deadline = tracker
                    .socket
                    .clone()
                    .map(|s| Watchdog::global().arm(now + timeout, Action::Shutdown(s)));
                let result = conn.ping();
                drop(deadline);
                shared.stats.record_ping(result.is_ok());
                let Some(tracker) = tracker_of(conn) else {
                    return result.map_err(|e| ping_failed(now, timeout, &e));
                };
                match result {
                    Ok(()) => tracker.state.validated_epoch = epoch,
                    Err(e) => {
                        tracker.close_reason = Some(CloseReason::PingFailed);
                        return Err(ping_failed(now, timeout, &e));
                    }
                }
            }
        }
        if let Some(threshold) = policy.leak_detection_threshold {
            crate::leak::arm(tracker_of(conn), threshold);
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut C) -> bool {
        let panicking_or_open_txn = std::thread::panicking() || conn.is_broken();
        let Some(tracker) = tracker_of(conn) else {
            return panicking_or_open_txn;
        };
        tracker.leak_timer = None;
        let now = Instant::now();
        tracker.state.last_used = now;
        if panicking_or_open_txn {
            tracker.close_reason = Some(CloseReason::Broken);
            return true;
        }
        // Borrowed budget headroom goes back as soon as its connection is returned, if another
        // class is waiting for it.
        if let Some((budget, class)) = &self.shared.budget {
            if budget.reclaim_wanted(*class) > 0 {
                tracker.close_reason = Some(CloseReason::Reclaimed);
                return true;
            }
        }
        match self.shared.config.lifecycle.on_checkin(&tracker.state, now) {
            Some(reason) => {
                tracker.close_reason = Some(reason);
                true
            }
            None => false,
        }
    }
}

/// Takes one unit of a pending reclaim request, if any.
fn take_reclaim(reclaim: &std::sync::atomic::AtomicU32) -> bool {
    use std::sync::atomic::Ordering;
    reclaim
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn ping_failed(
    start: Instant,
    timeout: std::time::Duration,
    e: &diesel::result::Error,
) -> ExtError {
    ExtError::PingFailed {
        elapsed_ms: start.elapsed().as_millis(),
        timeout_ms: timeout.as_millis(),
        message: redact(&e.to_string()),
    }
}
