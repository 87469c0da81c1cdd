//! The extended pool: a real `r2d2::Pool`, built with the lifecycle policy wired in.
//!
//! [`ExtPool`] dereferences to `r2d2::Pool<ExtManager<C>>`, so `pool.get()` yields r2d2's
//! own `PooledConnection` and every Diesel call site keeps compiling; what it adds is
//! [`ExtPool::status`], [`ExtPool::stats`] and [`ExtPool::invalidate`].

use std::ops::Deref;
use std::sync::{Arc, Weak};

use std::time::Duration;

use pool_core::config::{PoolConfig, PoolConfigBuilder};
use pool_core::error::ConfigError;
use pool_core::events::{EventListener, LogListener, PoolEvent};
use pool_core::stats::{Gauges, StatsSnapshot};
use pool_core::status::StatusReport;

use crate::manager::{ExtConnection, ExtError, ExtManager};
use crate::tracker::Shared;

/// Why a pool could not be built. Never contains a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is invalid (bad URL, impossible size, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The connection budget is impossible (reserved above the total, ...).
    #[error(transparent)]
    Budget(#[from] pool_core::budget::BudgetError),
    /// The pool could not open its initial connections in time.
    #[error("pool {pool}: could not open the initial {wanted} connection(s) within {timeout:?}: {message}")]
    Connect {
        /// Pool name.
        pool: String,
        /// How many connections `build` waited for (`pool_size`).
        wanted: u32,
        /// The pool timeout it waited.
        timeout: Duration,
        /// The last connection error, redacted.
        message: String,
    },
}

/// A Diesel connection pool with validation, lifetimes, keepalives and stats.
///
/// Dereferences to the [`r2d2::Pool`] it wraps: `pool.get()`, `pool.state()`, `&*pool` as
/// `&r2d2::Pool<_>` all work as before. Cloning is cheap and shares the pool.
pub struct ExtPool<C: ExtConnection> {
    inner: r2d2::Pool<ExtManager<C>>,
    shared: Arc<Shared>,
    /// Held by every clone; background threads stop when it dies.
    alive: Arc<()>,
}

/// The extended pool for PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgPool = ExtPool<diesel::PgConnection>;

/// The extended pool for SQLite.
#[cfg(feature = "sqlite")]
pub type SqlitePool = ExtPool<diesel::SqliteConnection>;

impl<C: ExtConnection> Clone for ExtPool<C> {
    fn clone(&self) -> Self {
        ExtPool {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            alive: self.alive.clone(),
        }
    }
}

impl<C: ExtConnection> Deref for ExtPool<C> {
    type Target = r2d2::Pool<ExtManager<C>>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<C: ExtConnection> std::fmt::Debug for ExtPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtPool")
            .field("name", &self.shared.name())
            .field("url", &self.shared.config.url)
            .field("state", &self.inner.state())
            .finish()
    }
}

impl<C: ExtConnection> ExtPool<C> {
    /// Starts building a pool for `url`. Settings not given keep their documented defaults.
    pub fn builder(url: &str) -> Builder<C> {
        Builder {
            config: PoolConfig::builder(url),
            listener: None,
            _conn: std::marker::PhantomData,
        }
    }

    /// Builds a pool from a finished configuration (for instance [`PoolConfig::from_env`]).
    pub fn from_config(config: PoolConfig) -> Result<ExtPool<C>, BuildError> {
        build(config, Arc::new(LogListener), None)
    }

    /// Builds a pool from the environment (`DATABASE_URL`, `DB_POOL_SIZE`, ...; see
    /// [`PoolConfig::from_env`]).
    pub fn from_env() -> Result<ExtPool<C>, BuildError> {
        Self::from_config(PoolConfig::from_env()?)
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Closes up to `n` idle connections (giving their budget permits back); returns how many.
    pub(crate) fn reclaim_idle(&self, n: u32) -> u32 {
        use std::sync::atomic::Ordering;
        let n = n.min(self.inner.state().idle_connections);
        if n == 0 {
            return 0;
        }
        // While the request lasts, each checkout retires the idle connection it would hand
        // out (see `ExtManager::is_valid`); one `try_get` walks the idle list doing so and
        // stops at the first connection it may keep, or when none is left.
        self.shared.reclaim.store(n, Ordering::SeqCst);
        drop(self.inner.try_get());
        n - self.shared.reclaim.swap(0, Ordering::SeqCst)
    }

    /// The wrapped r2d2 pool.
    pub fn inner(&self) -> &r2d2::Pool<ExtManager<C>> {
        &self.inner
    }

    /// Marks every connection opened or validated so far as suspect: each is pinged before
    /// its next use. The pool does this by itself when it sees a disconnect.
    pub fn invalidate(&self) {
        self.shared.invalidate("invalidated by the application");
    }

    /// Counters and gauges of this pool.
    pub fn stats(&self) -> StatsSnapshot {
        let state = self.inner.state();
        let cfg = &self.shared.config;
        // r2d2 does not count its waiters; with a budget, those waiting for a permit are known.
        let (reserved, waiters) = match &self.shared.budget {
            Some((budget, class)) => (budget.limits(*class).reserved, Some(budget.waiters(*class))),
            None => (0, None),
        };
        self.shared.stats.snapshot(Gauges {
            name: cfg.name.clone(),
            in_use: state.connections.saturating_sub(state.idle_connections),
            idle: state.idle_connections,
            pool_size: cfg.pool_size,
            max_overflow: cfg.max_overflow,
            reserved,
            waiters,
        })
    }

    /// A status report (human-readable through `Display`, JSON through `to_json`).
    pub fn status(&self) -> StatusReport {
        StatusReport::new(vec![self.stats()])
    }
}

/// Builder of an [`ExtPool`]; every setter documents its default.
#[must_use = "a builder does nothing until .build() is called"]
pub struct Builder<C> {
    config: PoolConfigBuilder,
    listener: Option<Arc<dyn EventListener>>,
    _conn: std::marker::PhantomData<fn() -> C>,
}

macro_rules! forward {
    ($($(#[$doc:meta])* $name:ident($ty:ty);)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config = self.config.$name(value);
            self
        }
    )*};
}

impl<C: ExtConnection> Builder<C> {
    forward! {
        /// Connections kept open (r2d2's `min_idle`). Default: 10.
        pool_size(u32);
        /// Extra connections opened under load and closed once idle; the pool's maximum is
        /// `pool_size + max_overflow`. Default: 10.
        max_overflow(u32);
        /// How long `get()` waits for a connection. Default: 30 s.
        pool_timeout(Duration);
        /// Retire connections after this long (`pool_recycle`); `None` keeps them. Default: 30 min.
        max_lifetime(Option<Duration>);
        /// Spread of lifetimes, a fraction in `[0, 1)`. Default: 0.1.
        lifetime_jitter(f64);
        /// Close connections idle this long; `None` never does. Default: 10 min.
        idle_timeout(Option<Duration>);
        /// Validate connections on checkout (`pool_pre_ping`). Default: true.
        validate_on_checkout(bool);
        /// Connections used more recently than this skip the validation ping (the liveness
        /// probe still runs). Default: 500 ms.
        validation_bypass_window(Duration);
        /// Longest a validation ping may take, even against a hung server. Default: 5 s.
        validation_timeout(Duration);
        /// Ping idle connections this often; `None` disables it. Default: `None`.
        keepalive_ping(Option<Duration>);
        /// Report connections held longer than this; `None` disables it. Default: `None`.
        leak_detection_threshold(Option<Duration>);
        /// Connect timeout (libpq `connect_timeout`); `None` waits for the OS. Default: 10 s.
        connect_timeout(Option<Duration>);
        /// TCP keepalives on or off. Default: on.
        keepalives(bool);
        /// Idle time before the first keepalive probe. Default: 30 s.
        keepalives_idle(Duration);
        /// Time between keepalive probes. Default: 10 s.
        keepalives_interval(Duration);
        /// Unanswered probes before the connection is dead. Default: 3.
        keepalives_count(u32);
        /// Give up on unacknowledged data after this long (`tcp_user_timeout`). Default: 30 s.
        tcp_user_timeout(Option<Duration>);
        /// TLS mode (`sslmode`). Default: the URL's, else libpq's (`prefer`).
        ssl_mode(pool_core::config::SslMode);
        /// Root certificate for `verify-ca` / `verify-full`. Default: none.
        ssl_root_cert(std::path::PathBuf);
        /// `application_name` shown in `pg_stat_activity`. Default: none.
        application_name(&str);
        /// SQLite `busy_timeout`. Default: 5 s.
        sqlite_busy_timeout(Duration);
        /// SQLite WAL journaling. Default: on.
        sqlite_wal(bool);
        /// SQLite foreign key enforcement. Default: on.
        sqlite_foreign_keys(bool);
        /// Name of the pool in stats, events and errors. Default: "default".
        name(&str);
    }

    /// Sends pool events to `listener` instead of the `log` facade.
    pub fn event_listener(mut self, listener: impl EventListener) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    pub(crate) fn into_parts(self) -> (PoolConfigBuilder, Arc<dyn EventListener>) {
        (
            self.config,
            self.listener.unwrap_or_else(|| Arc::new(LogListener)),
        )
    }

    /// Validates the settings, opens `pool_size` connections (waiting at most
    /// `pool_timeout`) and returns the pool.
    pub fn build(self) -> Result<ExtPool<C>, BuildError> {
        let config = self.config.build()?;
        build(
            config,
            self.listener.unwrap_or_else(|| Arc::new(LogListener)),
            None,
        )
    }
}

pub(crate) fn build<C: ExtConnection>(
    config: PoolConfig,
    listener: Arc<dyn EventListener>,
    budget: Option<(pool_core::budget::Budget, pool_core::budget::ClassId)>,
) -> Result<ExtPool<C>, BuildError> {
    config.lifecycle.validate()?;
    let shared = Arc::new(Shared::new(config, listener, budget));
    let manager = ExtManager::<C>::new(shared.clone())?;
    let cfg = &shared.config;
    // r2d2 keeps `min_idle` connections idle *besides* those in use, opening them in the
    // background. A class of a budget must not: such connects would queue for permits nobody
    // asked for and make other classes give headroom back for nothing. It opens connections on
    // demand only, and its reserved floor is warmed once below.
    let (min_idle, warm) = match &shared.budget {
        Some((budget, class)) => (0, budget.limits(*class).reserved),
        None => (cfg.pool_size, 0),
    };
    // r2d2's own lifetime check is only a backstop: the jittered per-connection lifetime is
    // enforced by the manager on checkout and checkin.
    let builder = r2d2::Pool::builder()
        .max_size(cfg.max_size())
        .min_idle(Some(min_idle))
        .connection_timeout(cfg.pool_timeout)
        .test_on_check_out(true)
        .max_lifetime(cfg.lifecycle.max_lifetime)
        .idle_timeout(cfg.lifecycle.idle_timeout)
        .error_handler(Box::new(ErrorHandler(Arc::downgrade(&shared))))
        .event_handler(Box::new(EventHandler(Arc::downgrade(&shared))));
    let inner = if min_idle == 0 {
        builder.build_unchecked(manager)
    } else {
        builder.build(manager).map_err(|e| BuildError::Connect {
            pool: cfg.name.clone(),
            wanted: min_idle,
            timeout: cfg.pool_timeout,
            message: pool_core::redact::redact(&e.to_string()),
        })?
    };
    if warm > 0 {
        let held: Result<Vec<_>, _> = (0..warm).map(|_| inner.get()).collect();
        held.map_err(|e| BuildError::Connect {
            pool: cfg.name.clone(),
            wanted: warm,
            timeout: cfg.pool_timeout,
            message: pool_core::redact::redact(&e.to_string()),
        })?;
    }
    let pool = ExtPool {
        inner,
        shared,
        alive: Arc::new(()),
    };
    if let Some(every) = pool.shared.config.lifecycle.keepalive_ping {
        spawn_keepalive(&pool, every);
    }
    Ok(pool)
}

/// Pings idle connections periodically: every `every`, all idle connections are checked out
/// at once (each checkout runs the validation, which pings a connection idle longer than the
/// bypass window) and returned. The thread stops once the application dropped every clone of
/// the pool.
fn spawn_keepalive<C: ExtConnection>(pool: &ExtPool<C>, every: Duration) {
    let alive = Arc::downgrade(&pool.alive);
    let inner = pool.inner.clone();
    let spawned = std::thread::Builder::new()
        .name("resilient-diesel-keepalive".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            if alive.strong_count() == 0 {
                return;
            }
            let idle = inner.state().idle_connections;
            let held: Vec<_> = (0..idle).map_while(|_| inner.try_get()).collect();
            drop(held);
        });
    if let Err(e) = spawned {
        log::warn!(target: "resilient_diesel", "could not start the keepalive thread: {e}");
    }
}

#[derive(Debug)]
struct ErrorHandler(Weak<Shared>);

impl r2d2::HandleError<ExtError> for ErrorHandler {
    fn handle_error(&self, error: ExtError) {
        // Connect failures were reported as events where they happened; retirements on
        // checkout are routine. Only failed pings are worth a line of their own.
        if let ExtError::PingFailed { .. } = error {
            if let Some(shared) = self.0.upgrade() {
                log::info!(target: "resilient_diesel", "pool {}: {error}", shared.name());
            }
        }
    }
}

#[derive(Debug)]
struct EventHandler(Weak<Shared>);

impl r2d2::HandleEvent for EventHandler {
    fn handle_checkout(&self, event: r2d2::event::CheckoutEvent) {
        if let Some(shared) = self.0.upgrade() {
            shared.stats.record_checkout(event.duration());
            shared.listener.on_event(&PoolEvent::CheckedOut {
                pool: shared.name(),
                connection_id: event.connection_id(),
                waited: event.duration(),
            });
        }
    }

    fn handle_timeout(&self, _event: r2d2::event::TimeoutEvent) {
        if let Some(shared) = self.0.upgrade() {
            shared.stats.record_checkout_timeout();
        }
    }

    fn handle_checkin(&self, event: r2d2::event::CheckinEvent) {
        if let Some(shared) = self.0.upgrade() {
            shared.listener.on_event(&PoolEvent::CheckedIn {
                pool: shared.name(),
                connection_id: event.connection_id(),
                held: event.duration(),
            });
        }
    }
}
