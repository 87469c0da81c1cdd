//! The extended pool: a real `r2d2::Pool`, built with the lifecycle policy wired in.
//!
//! [`ExtPool`] dereferences to `r2d2::Pool<ExtManager<C>>`, so `pool.get()` yields r2d2's
//! own `PooledConnection` and every Diesel call site keeps compiling; what it adds is
//! [`ExtPool::status`], [`ExtPool::stats`] and [`ExtPool::invalidate`].

use std::ops::Deref;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pool_core::config::{PoolConfig, PoolConfigBuilder};
use pool_core::engine::{Maintenance, PoolState};
use pool_core::error::ConfigError;
use pool_core::events::{EventListener, LogListener};
use pool_core::stats::StatsSnapshot;
use pool_core::status::StatusReport;
use r2d2::PooledConnection;

use crate::demand::Demand;
use crate::forge;
use crate::manager::{sweeping, ExtConnection, ExtError, ExtManager, Hooks};
use crate::tracker::tracker_of;

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
    #[error("pool {pool}: could not open the initial {wanted} connection(s) (pool_timeout {timeout:?}): {message}")]
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
/// Dereferences to the [`r2d2::Pool`] it wraps: `pool.state()`, `&*pool` as
/// `&r2d2::Pool<_>` work as before. [`ExtPool::get`] returns r2d2's own `PooledConnection`;
/// check out through it (not through the wrapped pool) to be served in arrival order and
/// counted by the budget, stats and leak detection. Cloning is cheap and shares the pool.
pub struct ExtPool<C: ExtConnection> {
    parts: Parts<C>,
    /// Held by every clone; when the last one goes, background work stops.
    life: Arc<Lifeline>,
}

/// What the pool and its maintenance thread share (the thread never holds the lifeline).
struct Parts<C: ExtConnection> {
    inner: r2d2::Pool<ExtManager<C>>,
    state: Arc<PoolState>,
    demand: Arc<Demand>,
}

impl<C: ExtConnection> Clone for Parts<C> {
    fn clone(&self) -> Self {
        Parts {
            inner: self.inner.clone(),
            state: self.state.clone(),
            demand: self.demand.clone(),
        }
    }
}

/// Dropped with the last clone of a pool: stops its maintenance thread and its connects
/// waiting for demand.
struct Lifeline {
    demand: Arc<Demand>,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        self.demand.close();
        let (lock, cv) = &*self.stop;
        *lock.lock() = true;
        cv.notify_all();
    }
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
            parts: self.parts.clone(),
            life: self.life.clone(),
        }
    }
}

impl<C: ExtConnection> Deref for ExtPool<C> {
    type Target = r2d2::Pool<ExtManager<C>>;

    fn deref(&self) -> &Self::Target {
        &self.parts.inner
    }
}

impl<C: ExtConnection> std::fmt::Debug for ExtPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtPool")
            .field("name", &self.parts.state.name())
            .field("url", &self.parts.state.config().url)
            .field("state", &self.parts.inner.state())
            .finish()
    }
}

impl<C: ExtConnection> ExtPool<C> {
    /// Starts building a pool for `url`. Settings not given keep their documented defaults.
    pub fn builder(url: &str) -> Builder<C> {
        Builder {
            config: PoolConfig::builder(url),
            listener: None,
            hooks: Hooks::default(),
            _conn: std::marker::PhantomData,
        }
    }

    /// Builds a pool from a configuration (for instance [`PoolConfig::from_env`]); it is
    /// validated again here, since its fields may have been edited.
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
        self.parts.state.config()
    }

    /// The engine state shared with the pool's connections.
    pub(crate) fn state(&self) -> &Arc<PoolState> {
        &self.parts.state
    }

    /// What the pool's connects open connections for (see `demand`).
    pub(crate) fn demand(&self) -> &Arc<Demand> {
        &self.parts.demand
    }

    /// Checks out a connection, waiting at most `pool_timeout`. Same signature and result
    /// as r2d2's `get`, plus: callers are served in arrival order (a returned connection
    /// goes to the one that waited longest), the wait counts in the stats, and a checkout
    /// that needs a new connection fails at once, with the cause, when the server refuses
    /// connections for a reason no retry can fix (a wrong password, a database that does
    /// not exist; see [`ServerHealth`](pool_core::engine::ServerHealth)) or, with
    /// `fail_fast_when_down`, while the server has been unreachable for that long.
    pub fn get(&self) -> Result<PooledConnection<ExtManager<C>>, r2d2::Error> {
        self.get_timeout(self.parts.state.config().pool_timeout)
    }

    /// [`ExtPool::get`] with another timeout for this checkout (at most
    /// [`MAX_DURATION`](pool_core::config::MAX_DURATION), 365 days: a longer one waits that
    /// long).
    pub fn get_timeout(
        &self,
        timeout: Duration,
    ) -> Result<PooledConnection<ExtManager<C>>, r2d2::Error> {
        let timeout = timeout.min(pool_core::config::MAX_DURATION);
        let started = Instant::now();
        let state = &self.parts.state;
        let gate = state.gate();
        // Not saturated: a permit at once, without reading the clock again.
        if let Some(permit) = gate.try_enter() {
            if let Some(conn) = self.parts.inner.try_get() {
                return Ok(self.handed_out(conn, started, Some(permit)));
            }
            // In `db.client.connection.pending_requests` while it waits (feature `metrics`;
            // a checkout served at once above never was pending, and pays nothing for it).
            let _pending = state.pending();
            let conn = self.parts.wait(started, started + timeout, false)?;
            return Ok(self.handed_out(conn, started, Some(permit)));
        }
        let _pending = state.pending();
        let gate = match gate.enter(timeout) {
            Ok(permit) => permit,
            Err(_) => {
                // Never ask the wrapped pool now: an idle connection it holds is the next
                // caller's in line.
                state.stats().record_checkout_timeout();
                return Err(forge::r2d2_error(&format!(
                    "pool {}: no connection within {timeout:?}: every connection is in use \
                     ({} checkout(s) waiting, max {})",
                    state.name(),
                    gate.waiters(),
                    state.config().max_size()
                )));
            }
        };
        let conn = self.parts.wait(started, started + timeout, false)?;
        Ok(self.handed_out(conn, started, Some(gate)))
    }

    /// A connection if one can be had at once: an idle one, with nobody waiting before us.
    pub fn try_get(&self) -> Option<PooledConnection<ExtManager<C>>> {
        let gate = self.parts.state.gate().try_enter()?;
        self.checked_out(
            self.parts.inner.try_get().ok_or(()),
            Instant::now(),
            Some(gate),
        )
        .ok()
    }

    fn checked_out<E>(
        &self,
        result: Result<PooledConnection<ExtManager<C>>, E>,
        started: Instant,
        gate: Option<pool_core::budget::Permit>,
    ) -> Result<PooledConnection<ExtManager<C>>, E> {
        Ok(self.handed_out(result?, started, gate))
    }

    fn handed_out(
        &self,
        mut conn: PooledConnection<ExtManager<C>>,
        started: Instant,
        gate: Option<pool_core::budget::Permit>,
    ) -> PooledConnection<ExtManager<C>> {
        if let Some(tracker) = tracker_of(&mut *conn) {
            tracker.state.handed_out(started, gate);
        }
        conn
    }

    /// The wrapped r2d2 pool.
    pub fn inner(&self) -> &r2d2::Pool<ExtManager<C>> {
        &self.parts.inner
    }

    /// Marks every connection opened or validated so far as suspect: each is pinged before
    /// its next use. The pool does this by itself when it sees a disconnect.
    pub fn invalidate(&self) {
        self.parts
            .state
            .invalidate("invalidated by the application");
    }

    /// Counters and gauges of this pool.
    pub fn stats(&self) -> StatsSnapshot {
        let counts = self.parts.inner.state();
        self.parts
            .state
            .snapshot_counts(counts.connections, counts.idle_connections)
    }

    /// A status report (human-readable through `Display`, JSON through `to_json`).
    pub fn status(&self) -> StatusReport {
        StatusReport::new(vec![self.stats()])
    }
}

impl<C: ExtConnection> Parts<C> {
    /// Holds `n` connections at once (opening what is missing) in maintenance mode, then
    /// returns them: warms the pool, or brings a budget class back to its floor. Fails at
    /// once, like a checkout, when the server refuses connections for a hopeless reason.
    fn hold(&self, n: u32, timeout: Duration) -> Result<(), r2d2::Error> {
        let started = Instant::now();
        let held: Result<Vec<_>, _> = (0..n)
            .map(|_| self.wait(started, started + timeout, true))
            .collect();
        held.map(drop)
    }

    /// Waits for a connection from the wrapped pool until `deadline` (in maintenance mode if
    /// `sweep`), in short slices, so that the wait ends at once when the server turns out to
    /// refuse connections for a hopeless reason or the breaker opens. The error quotes what
    /// kept the pool from serving: the last connect failure, budget or validation error.
    fn wait(
        &self,
        started: Instant,
        deadline: Instant,
        sweep: bool,
    ) -> Result<PooledConnection<ExtManager<C>>, r2d2::Error> {
        const SLICE: Duration = Duration::from_millis(20);
        // This wait is demand: a connect may open a connection for it (one at a time).
        let _wanting = self.demand.want();
        let breaker = self.state.config().fail_fast_when_down;
        let mut quoted: Option<String> = None;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(SLICE);
            let got = quiet_timeouts(|| {
                if sweep {
                    sweeping(|| self.inner.get_timeout(slice))
                } else {
                    self.inner.get_timeout(slice)
                }
            });
            let error = match got {
                Ok(conn) => return Ok(conn),
                Err(error) => error,
            };
            // r2d2 quotes its last error once (a budget or validation failure): keep it.
            if let Some(message) = error.to_string().strip_prefix(R2D2_PREFIX) {
                quoted = Some(message.to_owned());
            }
            let health = self.state.health();
            if let Some(why) = health.fail_fast(started, breaker) {
                if !sweep {
                    self.state.stats().record_checkout_timeout();
                }
                return Err(forge::r2d2_error(&format!(
                    "pool {}: no connection: {why}",
                    self.state.name()
                )));
            }
            if Instant::now() >= deadline {
                if !sweep {
                    self.state.stats().record_checkout_timeout();
                }
                let waited = started.elapsed();
                if let Some(budget) = self.demand.budget_error_since(started) {
                    return Err(forge::r2d2_error(&format!(
                        "pool {}: {budget}",
                        self.state.name()
                    )));
                }
                return Err(match (health.last_error_since(started), quoted) {
                    (Some(connect), _) => forge::r2d2_error(&format!(
                        "pool {}: no connection within {waited:.1?}; the server could not be \
                         reached: {connect}",
                        self.state.name()
                    )),
                    (None, Some(quoted)) => forge::r2d2_error(&quoted),
                    (None, None) => error,
                });
            }
        }
    }

    /// Closes up to `n` idle connections (giving their budget permits back); returns how many.
    fn reclaim_idle(&self, n: u32) -> u32 {
        let n = n.min(self.inner.state().idle_connections);
        if n == 0 {
            return 0;
        }
        // While the request lasts, each checkout retires the idle connection it would hand
        // out (see `ConnState::begin_checkout`); one `try_get` walks the idle list doing so and
        // stops at the first connection it may keep, or when none is left.
        self.state.request_reclaim(n);
        drop(self.inner.try_get());
        n - self.state.request_reclaim(0)
    }

    /// Walks the idle connections: retires the dead, broken, expired, suspect and (above the
    /// floor) idle-too-long ones, and pings those due a keepalive ping, one at a time. Every
    /// idle connection is out of the idle list only for a walk itself (microseconds), except
    /// the one being pinged: the others stay available to checkouts meanwhile. A ping that
    /// fails marks its connection broken (closed, never back in the idle list); one that goes
    /// unanswered makes the rest suspect, so the next walk closes them instead of pinging
    /// them in series.
    fn sweep(&self) {
        let keepalive = self.state.config().lifecycle.keepalive_ping;
        let timeout = self.state.config().lifecycle.validation.timeout;
        // Each round pings at most one connection; a pinged one is no longer due, so this
        // ends after at most one round per idle connection (bounded anyway).
        let rounds = self.inner.state().idle_connections.saturating_add(1);
        for _ in 0..rounds {
            let mut held = Vec::new();
            sweeping(|| {
                while let Some(conn) = self.inner.try_get() {
                    held.push(conn);
                }
            });
            let now = Instant::now();
            let mut due = None;
            // Back in the order they came out, so the idle list keeps its order.
            while let Some(mut conn) = held.pop() {
                let ping = due.is_none()
                    && keepalive.is_some_and(|every| {
                        tracker_of(&mut *conn).is_some_and(|t| t.state.keepalive_due(every, now))
                    });
                if ping {
                    due = Some(conn);
                } else {
                    drop(conn);
                }
            }
            let Some(mut conn) = due else {
                return;
            };
            // A failed ping marks the connection broken; it is closed when it goes back.
            let _ = ExtManager::<C>::bounded_ping(&mut conn, timeout);
        }
    }
}

/// Builder of an [`ExtPool`]; every setter documents its default.
#[must_use = "a builder does nothing until .build() is called"]
pub struct Builder<C> {
    config: PoolConfigBuilder,
    listener: Option<Arc<dyn EventListener>>,
    pub(crate) hooks: Hooks<C>,
    _conn: std::marker::PhantomData<fn() -> C>,
}

impl<C: ExtConnection> Builder<C> {
    /// Runs `hook` on every new connection right after it is opened (and after the pool's
    /// own settings), before any checkout sees it: per-session setup such as `SET`.
    /// Default: none.
    ///
    /// Its error fails that connect: the message (redacted) is what waiting checkouts and
    /// `build()` report, and it is classified like a connect error: a lost connection is
    /// retried as usual, anything else (a rejected `SET`) counts as hopeless, so checkouts
    /// fail at once with it instead of waiting `pool_timeout`, and it is retried at most
    /// once a second. A statement of the hook still waiting on the server at
    /// `connect_timeout` is cut (the connection's socket is shut down, where the pool knows
    /// it) and that connect fails as a lost connection; a hook blocked on anything else is
    /// not the pool's to cut.
    ///
    /// ```no_run
    /// use diesel::connection::SimpleConnection;
    /// use diesel_r2d2_ext::PgPool;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::builder("postgres://app@db/app")
    ///     .after_connect(|conn| conn.batch_execute("SET search_path TO app, public"))
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn after_connect(
        mut self,
        hook: impl Fn(&mut C) -> diesel::QueryResult<()> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.after_connect = Some(Arc::new(hook));
        self
    }

    /// Opens every connection with `connect` instead of `C::establish`: for an application
    /// with its own connect, such as one that fetches a short-lived password (an RDS IAM
    /// token, a Vault lease) for every new connection. Default: none.
    ///
    /// `connect` is given the conninfo the pool would open: the URL with the pool's libpq
    /// keys added (`connect_timeout`, keepalives, `tcp_user_timeout`). Open that, changing
    /// only what you must ([`DatabaseUrl::with_password`](pool_core::url::DatabaseUrl::with_password)
    /// replaces the password): libpq's `connect_timeout` in it is what bounds a sync connect,
    /// since a thread blocked in your function cannot be interrupted. Everything else stays
    /// the pool's: the socket is found and probed, `after_connect` and the pooler settings
    /// apply, errors are classified (a refused password fails at once, as hopeless) and
    /// redacted with the URL's password (a credential made in `connect` is yours to keep out
    /// of the errors you return).
    ///
    /// ```no_run
    /// use diesel::{Connection, ConnectionError, PgConnection};
    /// use diesel_r2d2_ext::pool_core::url::DatabaseUrl;
    /// use diesel_r2d2_ext::PgPool;
    ///
    /// fn iam_token() -> String {
    ///     // Ask your cloud's SDK for a fresh token.
    ///     # String::new()
    /// }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::builder("postgres://app@db.internal/app?sslmode=require")
    ///     .custom_connect(|conninfo| {
    ///         let url = DatabaseUrl::parse(conninfo)
    ///             .and_then(|url| url.with_password(&iam_token()))
    ///             .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    ///         PgConnection::establish(url.expose_secret())
    ///     })
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn custom_connect(
        mut self,
        connect: impl Fn(&str) -> diesel::ConnectionResult<C> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.custom_connect = Some(Arc::new(connect));
        self
    }

    // One setter per row of pool-core's settings table (same names, docs and defaults as
    // `PoolConfigBuilder`'s).
    pool_core::with_settings!(pool_core::forward_settings);

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
        let hooks = self.hooks.clone();
        let (config, listener) = self.into_parts();
        build_pool(config.build()?, listener, None, false, hooks)
    }

    /// Validates the settings and returns the pool without opening any connection: for a
    /// service that must start (and answer 503) while its database is still down, instead of
    /// crash-looping. Checkouts open connections as they need them; while the server is
    /// unreachable they wait up to `pool_timeout` (or fail at once with
    /// `fail_fast_when_down`), and they fail at once when it refuses connections for a
    /// reason no retry can fix.
    pub fn build_lazy(self) -> Result<ExtPool<C>, BuildError> {
        let hooks = self.hooks.clone();
        let (config, listener) = self.into_parts();
        build_pool(config.build()?, listener, None, true, hooks)
    }
}

pub(crate) fn build<C: ExtConnection>(
    config: PoolConfig,
    listener: Arc<dyn EventListener>,
    budget: Option<(pool_core::budget::Budget, pool_core::budget::ClassId)>,
) -> Result<ExtPool<C>, BuildError> {
    build_pool(config, listener, budget, false, Hooks::default())
}

pub(crate) fn build_pool<C: ExtConnection>(
    config: PoolConfig,
    listener: Arc<dyn EventListener>,
    budget: Option<(pool_core::budget::Budget, pool_core::budget::ClassId)>,
    lazy: bool,
    hooks: Hooks<C>,
) -> Result<ExtPool<C>, BuildError> {
    let state = Arc::new(PoolState::new(config, listener, budget)?);
    let demand = Arc::new(Demand::default());
    let manager = ExtManager::<C>::new(state.clone(), demand.clone())?.with_hooks(hooks);
    let cfg = state.config();
    // r2d2 keeps `min_idle` connections idle *besides* those in use and has its own reaper;
    // both are off: `pool_size` is the most kept open (overflow closes on return, see
    // `ConnState::checkin`), and idle timeouts, lifetimes, keepalives and budget floors are
    // the maintenance thread's.
    let inner = r2d2::Pool::builder()
        .max_size(cfg.max_size())
        .min_idle(Some(0))
        .connection_timeout(cfg.pool_timeout)
        .test_on_check_out(true)
        .max_lifetime(None)
        .idle_timeout(None)
        .error_handler(Box::new(ErrorHandler(Arc::downgrade(&state))))
        .event_handler(Box::new(EventHandler(Arc::downgrade(&state))))
        .build_unchecked(manager);
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let pool = ExtPool {
        parts: Parts {
            inner,
            state: state.clone(),
            demand: demand.clone(),
        },
        life: Arc::new(Lifeline {
            demand,
            stop: stop.clone(),
        }),
    };
    // Opening the first connections here reports a wrong URL, password or host at once.
    let warm = if lazy { 0 } else { state.initial_size() };
    if warm > 0 {
        pool.parts
            .hold(warm, cfg.pool_timeout)
            .map_err(|e| BuildError::Connect {
                pool: cfg.name.clone(),
                wanted: warm,
                timeout: cfg.pool_timeout,
                message: {
                    let text = e.to_string();
                    // r2d2's fixed prefix says "timed out" even for a failure at once.
                    state.redact(text.strip_prefix(R2D2_PREFIX).unwrap_or(&text))
                },
            })?;
    }
    spawn_maintenance(&pool, stop);
    Ok(pool)
}

/// The pool's one background thread: gives borrowed budget headroom back the moment another
/// class waits (woken by the budget, no polling), walks the idle connections as the
/// [`Maintenance`] schedule says, and keeps a budget class's reserved floor open. Stops when
/// the last clone of the pool is dropped.
fn spawn_maintenance<C: ExtConnection>(pool: &ExtPool<C>, stop: Arc<(Mutex<bool>, Condvar)>) {
    let weak = Arc::downgrade(&pool.life);
    let worker = pool.parts.clone();
    let mut schedule = Maintenance::new(&worker.state);
    let name = format!("resilient-diesel-{}", worker.state.name());
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        loop {
            let tick = schedule.tick(Duration::from_millis(200));
            let wanted = match worker.state.budget() {
                Some((budget, class)) if schedule.borrows() => {
                    budget.wait_for_pressure(class, tick)
                }
                _ => {
                    let (lock, cv) = &*stop;
                    let mut stopped = lock.lock();
                    if !*stopped {
                        cv.wait_for(&mut stopped, tick);
                    }
                    0
                }
            };
            if weak.strong_count() == 0 {
                return;
            }
            if wanted > 0 && worker.reclaim_idle(wanted) == 0 {
                // Everything borrowed is in use; it goes back at checkin. Do not spin.
                std::thread::sleep(Duration::from_millis(10));
            }
            if schedule.sweep_due() {
                worker.sweep();
                schedule.swept();
            }
            if let Some(floor) = worker.state.below_floor() {
                let _ = worker.hold(floor, worker.state.config().pool_timeout);
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!(target: pool_core::events::LOG_TARGET, "could not start the pool's maintenance thread: {e}; idle timeouts, keepalive pings and budget reclaim will not run");
    }
}

#[derive(Debug)]
struct ErrorHandler(Weak<PoolState>);

impl r2d2::HandleError<ExtError> for ErrorHandler {
    fn handle_error(&self, error: ExtError) {
        // Connect failures were reported as events where they happened; retirements on
        // checkout are routine. Only failed pings are worth a line of their own.
        if let ExtError::PingFailed { .. } = error {
            if let Some(state) = self.0.upgrade() {
                log::info!(target: pool_core::events::LOG_TARGET, pool = state.name(), event = "ping_failed"; "pool {}: {}", state.name(), state.redact(&error.to_string()));
            }
        }
    }
}

/// r2d2's events carry r2d2's connection ids; ours are reported by the engine with the pool's
/// own ids. Only timeouts are taken from r2d2 (it is the one that gives up).
#[derive(Debug)]
struct EventHandler(Weak<PoolState>);

impl r2d2::HandleEvent for EventHandler {
    fn handle_timeout(&self, _event: r2d2::event::TimeoutEvent) {
        // The pool's own waits count their timeouts themselves (once per checkout, not per
        // slice); a checkout straight through the wrapped pool is counted here.
        if QUIET.with(|q| q.get()) {
            return;
        }
        if let Some(state) = self.0.upgrade() {
            state.stats().record_checkout_timeout();
        }
    }
}

/// What r2d2 puts before the message it quotes.
const R2D2_PREFIX: &str = "timed out waiting for connection: ";

thread_local! {
    /// Set while the pool waits in slices: r2d2's timeout of a slice is not a checkout's.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn quiet_timeouts<T>(f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(false));
        }
    }
    QUIET.with(|q| q.set(true));
    let _reset = Reset;
    f()
}
