//! The r2d2 `ManageConnection` implementation: r2d2's hooks mapped onto the engine.
//!
//! The pool is always built with `test_on_check_out(true)`, so r2d2 calls
//! [`ExtManager::is_valid`] on every checkout and [`ExtManager::has_broken`] on every checkin;
//! the decisions are the engine's ([`ConnState`]), this file performs them: the socket probe,
//! a ping bounded by the [`Watchdog`] (which shuts the socket down at the deadline, so even a
//! hung server cannot hold a checkout), and libpq/SQLite specifics.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::r2d2::R2D2Connection;
use diesel_ext_common::tracker::close_abandoned;
use pool_core::config::PoolConfig;
use pool_core::engine::{Attempt, CheckoutStep, ConnState, ConnectClass, PoolState, Watchdog};
use pool_core::error::ConfigError;
use pool_core::lifecycle::{CloseReason, ProbeResult};

use crate::demand::Demand;
use crate::socket::{self, PeerFilter, Probe, SocketClaim};
use crate::tracker::{tracker, tracker_of, SocketSlot};

/// A Diesel connection type the extended pool can manage (PostgreSQL, SQLite).
///
/// Sealed: implemented by this crate for the backends enabled by cargo features.
pub trait ExtConnection: R2D2Connection + Send + Sized + 'static + sealed::Backend {}

pub(crate) mod sealed {
    use super::*;

    /// What the manager needs to know about a backend; not nameable outside the crate.
    pub trait Backend: Sized {
        /// The string handed to `establish`, and which sockets it may open (`None` for
        /// embedded databases).
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerFilter>), ConfigError>;

        /// Settings applied right after connecting.
        fn after_connect(&mut self, _config: &PoolConfig) -> diesel::QueryResult<()> {
            Ok(())
        }

        /// Right after `establish`, before anything else runs on the connection: what the
        /// configured [`Pooler`](pool_core::config::Pooler) needs.
        fn for_pooler(&mut self, _config: &PoolConfig) {}

        /// After a "read-only transaction" error: is the server a standby now (a failover)?
        /// An error answering counts as yes.
        fn is_standby(&mut self) -> bool {
            false
        }
    }

    #[cfg(feature = "postgres")]
    impl Backend for diesel::PgConnection {
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerFilter>), ConfigError> {
            let url = crate::pg::render(config)?;
            let filter = PeerFilter::from_conninfo(&url, &|var| std::env::var(var).ok());
            Ok((url, Some(filter)))
        }

        /// Behind a transaction-mode pooler, Diesel's statement cache is turned off: a
        /// cached statement is a named prepared statement (`__diesel_stmt_N`) that lives on
        /// the server connection it was prepared on, which the next transaction may not get
        /// (`prepared statement "__diesel_stmt_0" does not exist`) while another client may
        /// (`... already exists`). Uncached, Diesel 2.3 sends each statement with
        /// `PQsendQueryParams`: parse, bind and execute in one message sequence, the unnamed
        /// statement, nothing left behind.
        fn for_pooler(&mut self, config: &PoolConfig) {
            if config.connect.pooler.is_transaction_mode() {
                use diesel::connection::{CacheSize, Connection};
                self.set_prepared_statement_cache_size(CacheSize::Disabled);
            }
        }

        fn is_standby(&mut self) -> bool {
            use diesel::prelude::*;
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
                "pg_is_in_recovery()",
            ))
            .get_result::<bool>(self)
            .unwrap_or(true)
        }
    }

    #[cfg(feature = "sqlite")]
    impl Backend for diesel::SqliteConnection {
        fn target(config: &PoolConfig) -> Result<(String, Option<PeerFilter>), ConfigError> {
            Ok((config.url.expose_secret().to_owned(), None))
        }

        fn after_connect(&mut self, config: &PoolConfig) -> diesel::QueryResult<()> {
            diesel_ext_common::sqlite::apply(self, &config.sqlite)
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
    #[error("connection retired on checkout: {0}")]
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

/// The counters of a [`ExtManager::standalone`] manager (see [`ExtManager::stats_handle`]).
#[derive(Debug, Clone)]
pub struct ManagerStats(Arc<PoolState>);

impl ManagerStats {
    /// The counters now. Gauges of connections in use and idle are r2d2's (`pool.state()`)
    /// and read 0 here.
    pub fn snapshot(&self) -> pool_core::stats::StatsSnapshot {
        self.0.snapshot(0, 0)
    }
}

/// A hook run on every new connection right after it is opened (see
/// [`Builder::after_connect`](crate::Builder::after_connect)).
pub type AfterConnect<C> = Arc<dyn Fn(&mut C) -> diesel::QueryResult<()> + Send + Sync>;

/// The application's own connect, given the conninfo the pool would open (see
/// [`Builder::custom_connect`](crate::Builder::custom_connect)).
pub type CustomConnect<C> = Arc<dyn Fn(&str) -> diesel::ConnectionResult<C> + Send + Sync>;

/// The application's hooks around opening a connection.
pub(crate) struct Hooks<C> {
    pub(crate) after_connect: Option<AfterConnect<C>>,
    pub(crate) custom_connect: Option<CustomConnect<C>>,
}

impl<C> Default for Hooks<C> {
    fn default() -> Self {
        Hooks {
            after_connect: None,
            custom_connect: None,
        }
    }
}

impl<C> Clone for Hooks<C> {
    fn clone(&self) -> Self {
        Hooks {
            after_connect: self.after_connect.clone(),
            custom_connect: self.custom_connect.clone(),
        }
    }
}

/// r2d2 connection manager for Diesel connections with the lifecycle policy applied.
///
/// Built by [`ExtPool`](crate::ExtPool); you rarely name it except in type aliases such as
/// `r2d2::PooledConnection<ExtManager<PgConnection>>`. To keep building a stock r2d2 pool
/// yourself, make one with [`ExtManager::standalone`].
pub struct ExtManager<C> {
    pub(crate) pool: Arc<PoolState>,
    pub(crate) demand: Arc<Demand>,
    conninfo: String,
    peers: Option<PeerFilter>,
    /// Built by `standalone`: no `ExtPool` around it (no demand, one attempt per connect).
    standalone: bool,
    hooks: Hooks<C>,
    _conn: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for ExtManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtManager")
            .field("pool", &self.pool.name())
            .field("url", &self.pool.config().url)
            .finish()
    }
}

thread_local! {
    /// Set while the pool's maintenance walks the idle connections (see `ExtPool::sweep`).
    static SWEEPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with checkouts on this thread in maintenance mode: no reclaim, ping or leak
/// timer; only dead, broken, expired and idle-too-long connections are retired.
pub(crate) fn sweeping<T>(f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SWEEPING.with(|s| s.set(false));
        }
    }
    SWEEPING.with(|s| s.set(true));
    let _reset = Reset;
    f()
}

impl<C: ExtConnection> ExtManager<C> {
    pub(crate) fn new(
        pool: Arc<PoolState>,
        demand: Arc<Demand>,
    ) -> Result<ExtManager<C>, ConfigError> {
        let (conninfo, peers) = C::target(pool.config())?;
        if peers.is_some() && !socket::supported() {
            pool.set_probe_available(false, "sockets cannot be identified on this platform");
        }
        Ok(ExtManager {
            pool,
            demand,
            conninfo,
            peers,
            standalone: false,
            hooks: Hooks::default(),
            _conn: PhantomData,
        })
    }

    /// Sets the hooks around opening a connection (see `Builder::after_connect` and
    /// `Builder::custom_connect`).
    pub(crate) fn with_hooks(mut self, hooks: Hooks<C>) -> Self {
        self.hooks = hooks;
        self
    }

    /// A manager for a stock `r2d2::Pool::builder()` (for those who keep building their
    /// pool themselves), with the URL's and the defaults' settings: see
    /// [`ExtManager::standalone_with`].
    ///
    /// # Errors
    /// A URL or setting that cannot work (redacted).
    pub fn standalone(url: &str) -> Result<ExtManager<C>, ConfigError> {
        Self::standalone_with(PoolConfig::builder(url).build()?)
    }

    /// A manager for a stock `r2d2::Pool::builder()`, with `config`'s connection settings
    /// (keepalives, `tcp_user_timeout`, `connect_timeout`, TLS, `application_name`, SQLite
    /// pragmas: rendered into the connection string as the extended pool does) and
    /// validation settings (liveness probe, bypass window, `validation_timeout`, hedging),
    /// and `max_lifetime` (jittered) retiring connections at checkout.
    ///
    /// ```no_run
    /// use diesel::PgConnection;
    /// use diesel_r2d2_ext::ExtManager;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = r2d2::Pool::builder() // your builder, unchanged
    ///     .max_size(15)
    ///     .build(ExtManager::<PgConnection>::standalone("postgres://app@db/app")?)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// What it gives inside a stock pool, on r2d2's hooks: every checkout runs the
    /// zero-round-trip liveness probe and pings only past the bypass window or after a
    /// disconnect was seen, that ping bounded by `validation_timeout` even against a hung
    /// server; a connection that saw a connection-class error, or is returned inside a
    /// transaction or during a panic, is never put back, and a disconnect makes the pool's
    /// older connections re-validated before their next use. Keep r2d2's
    /// `test_on_check_out(true)` (its default): with it off, r2d2 never asks the manager at
    /// checkout and only the checkin checks remain.
    ///
    /// What only the full pool ([`ExtPool`](crate::ExtPool)) gives: arrival-order
    /// checkouts, connections opened only for waiting checkouts, `pool_size` +
    /// `max_overflow`, budgets and classes, fail-fast on hopeless connect errors, leak
    /// detection, keepalive pings and idle timeouts of its maintenance thread, stats and
    /// the status report. `pool_size`, `max_overflow`, `pool_timeout`, `idle_timeout`,
    /// `keepalive_ping` and `leak_detection_threshold` of `config` are not used here: the
    /// r2d2 builder's own settings rule. Each connect is one attempt; r2d2 retries.
    ///
    /// # Errors
    /// A setting that cannot work.
    pub fn standalone_with(config: PoolConfig) -> Result<ExtManager<C>, ConfigError> {
        let config = config.for_stock_pool();
        let state = Arc::new(PoolState::new(
            config,
            Arc::new(pool_core::events::LogListener),
            None,
        )?);
        let mut manager = Self::new(state, Arc::new(Demand::default()))?;
        manager.standalone = true;
        Ok(manager)
    }

    /// Runs `hook` on every new connection right after it is opened, before r2d2 sees it;
    /// its error fails that connect (see `Builder::after_connect`).
    pub fn after_connect(
        mut self,
        hook: impl Fn(&mut C) -> diesel::QueryResult<()> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.after_connect = Some(Arc::new(hook));
        self
    }

    /// Opens connections with `connect` instead of `C::establish` (see
    /// [`Builder::custom_connect`](crate::Builder::custom_connect), which it is for a
    /// standalone manager).
    pub fn custom_connect(
        mut self,
        connect: impl Fn(&str) -> diesel::ConnectionResult<C> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.custom_connect = Some(Arc::new(connect));
        self
    }

    /// A handle on the manager's counters (connects, pings, probes that found a dead
    /// connection, ...): take it before the manager goes into the pool, which keeps it.
    pub fn stats_handle(&self) -> ManagerStats {
        ManagerStats(self.pool.clone())
    }

    /// Opens the connection and finds its socket (no lock: see [`socket`]).
    fn establish(&self) -> Result<(C, SocketSlot), diesel::ConnectionError> {
        let config = self.pool.config();
        let Some(peers) = self.peers.as_ref().filter(|_| socket::supported()) else {
            let mut conn = self.open_raw()?;
            conn.for_pooler(config);
            return Ok((conn, SocketSlot::None));
        };
        let window = socket::begin_connect();
        let mut conn = self.open_raw()?;
        // Before the tiebreak's ping: nothing may be prepared and cached before this.
        conn.for_pooler(config);
        let slot = match window.finish(peers, &mut || conn.ping().is_ok()) {
            SocketClaim::Found(sock) => SocketSlot::Known(sock),
            SocketClaim::Ambiguous(candidates) => SocketSlot::Pending(candidates),
            SocketClaim::Unavailable => {
                log::debug!(target: pool_core::events::LOG_TARGET, pool = self.pool.name(), event = "socket_unidentified"; "pool {}: could not identify the new connection's socket; it will be validated by pings only", self.pool.name());
                SocketSlot::None
            }
        };
        Ok((conn, slot))
    }

    /// The application's connect if it gave one, else `C::establish`, on the conninfo.
    fn open_raw(&self) -> Result<C, diesel::ConnectionError> {
        match &self.hooks.custom_connect {
            Some(connect) => connect(&self.conninfo),
            None => C::establish(&self.conninfo),
        }
    }

    fn target_redacted(&self) -> String {
        self.pool.config().url.redacted()
    }

    /// Pings `conn` within `timeout`: the watchdog shuts its socket down at the deadline, so
    /// a hung server cannot hold the ping. A ping that succeeded just as the deadline fired
    /// counts as failed (the socket is shut down).
    pub(crate) fn bounded_ping(conn: &mut C, timeout: Duration) -> Result<(), ExtError> {
        let started = Instant::now();
        let socket = tracker_of(conn).and_then(|t| {
            t.state.ping_starting();
            t.extra.get().cloned()
        });
        let deadline = socket
            .map(|s| Watchdog::global().arm_critical(started + timeout, move || s.shutdown()));
        let result = conn.ping();
        let fired = deadline.is_some_and(|d| d.disarm());
        let ok = result.is_ok() && !fired;
        if let Some(t) = tracker_of(conn) {
            if fired {
                // No reply in time: silence, which says something about every idle
                // connection of the pool (see `PoolState::path_went_silent`).
                t.state.finish_ping_silent();
            } else {
                t.state.finish_ping(ok);
            }
        }
        if ok {
            return Ok(());
        }
        let message = match result {
            Err(e) => e.to_string(),
            Ok(()) => "the validation timeout passed; the socket was shut down".to_owned(),
        };
        Err(ExtError::PingFailed {
            elapsed_ms: started.elapsed().as_millis(),
            timeout_ms: timeout.as_millis(),
            message,
        })
    }
}

/// Where a hedged validation's two contenders meet: the ping (on the checkout's thread) and
/// the fresh connect (on a thread of its own). Whoever comes second sees what the first left.
enum Race<C> {
    /// The ping is still waiting for its reply.
    Pinging,
    /// The fresh connection was ready first (the slow connection's socket was shut down).
    Fresh(C),
    /// The pool had no room for a fresh connection: the slow connection's socket was shut
    /// down (its ping returns), and it is closed to make room.
    GaveUp,
    /// The ping is over; a fresh connection arriving now is closed.
    Done,
}

impl<C: ExtConnection> ExtManager<C> {
    /// What a hedge connect needs, detached from r2d2's manager (which r2d2 owns).
    fn opener(&self) -> ExtManager<C> {
        ExtManager {
            pool: self.pool.clone(),
            demand: self.demand.clone(),
            conninfo: self.conninfo.clone(),
            peers: self.peers.clone(),
            standalone: self.standalone,
            hooks: self.hooks.clone(),
            _conn: PhantomData,
        }
    }

    /// Runs the application's after-connect hook, if any. Its error is redacted and
    /// classified: a lost connection may pass on the next attempt, anything else (a bad
    /// `SET`) will fail every time.
    ///
    /// Bounded by `connect_timeout` when the connection's `socket` is known: the watchdog
    /// shuts the socket down at the deadline, so a statement of the hook waiting on a hung
    /// server returns with an error, and the connect fails as a lost connection would (a
    /// hook blocked on anything but the server is not the pool's to cut). Unbounded, such a
    /// hook would hold a connect (and the demand it serves) for ever.
    fn run_after_connect(
        &self,
        conn: &mut C,
        socket: &SocketSlot,
    ) -> Result<(), (ConnectClass, String)> {
        let Some(hook) = &self.hooks.after_connect else {
            return Ok(());
        };
        let bound = self.pool.config().connect.connect_timeout;
        let deadline = match (bound, socket.get()) {
            (Some(bound), Some(sock)) => {
                let sock = sock.clone();
                Some(
                    Watchdog::global()
                        .arm_critical(Instant::now() + bound, move || sock.shutdown()),
                )
            }
            _ => None,
        };
        let result = hook(conn);
        if deadline.is_some_and(|d| d.disarm()) {
            // Cut at the deadline (its socket is shut down, whatever the hook returned).
            let bound = bound.unwrap_or_default();
            return Err((
                ConnectClass::Transient,
                format!("the after_connect hook did not finish within connect_timeout ({bound:?})"),
            ));
        }
        result.map_err(|e| {
            let class = if crate::classify::classify_diesel(&e).is_disconnect() {
                ConnectClass::Transient
            } else {
                ConnectClass::Hopeless
            };
            (class, format!("the after_connect hook failed: {e}"))
        })
    }

    /// A checkout's validation: the ping bounded by the watchdog, **hedged**: once it has
    /// taken longer than the pool's hedge delay (a small multiple of the round trip it
    /// observes, see `PoolState::hedge_delay`), a fresh connect starts on a thread of its own
    /// if the pool has room (below its sizes, a budget permit free at once). If the fresh
    /// connection is ready first, the slow connection's socket is shut down (its ping
    /// returns), the fresh connection takes its place and the slow one is closed; if the
    /// ping comes back first, the fresh connection is closed when it arrives. At the cap
    /// (no room, or no permit) the slow connection is **given up first**: its socket is shut
    /// down at the hedge delay and the checkout fails it, so r2d2 closes it and goes on to
    /// the next idle connection or a connect in its place, never past the sizes or the
    /// budget. On a healthy pool a ping never comes near the delay: an armed timer, nothing
    /// else.
    fn validate(&self, conn: &mut C, timeout: Duration) -> Result<(), ExtError> {
        let delay = self.pool.hedge_delay().filter(|d| *d < timeout);
        let socket = tracker_of(conn).and_then(|t| t.extra.get().cloned());
        let (Some(delay), Some(socket)) = (delay, socket) else {
            // No hedging, or a socket that cannot be cut short (then neither can the ping).
            return Self::bounded_ping(conn, timeout);
        };
        let race = Arc::new(parking_lot::Mutex::new(Race::<C>::Pinging));
        let hedge = {
            let (race, opener) = (race.clone(), self.opener());
            Watchdog::global().arm_critical(Instant::now() + delay, move || {
                // Only a thread is started here: the watchdog's thread never connects.
                let spawned = std::thread::Builder::new()
                    .name("resilient-diesel-hedge".into())
                    .spawn(move || opener.hedge(&race, &socket));
                if spawned.is_err() {
                    log::debug!(target: pool_core::events::LOG_TARGET, "could not start a hedge thread; the ping is waited out");
                }
            })
        };
        let pinged = Self::bounded_ping(conn, timeout);
        let hedged = hedge.disarm();
        let outcome = std::mem::replace(&mut *race.lock(), Race::Done);
        match outcome {
            Race::Fresh(fresh) => {
                self.pool.stats().record_hedge(true);
                let mut slow = std::mem::replace(conn, fresh);
                if let Some(t) = tracker_of(&mut slow) {
                    t.state.set_close_reason(CloseReason::PingFailed);
                    // A strike against the path (see `PoolState::slow_ping_lost`).
                    t.state.slow_ping_lost();
                }
                drop(slow);
                Ok(())
            }
            Race::GaveUp => {
                self.pool.stats().record_hedge_gave_up();
                if let Some(t) = tracker_of(conn) {
                    t.state.set_close_reason(CloseReason::PingFailed);
                    // A strike against the path: the second within a validation timeout
                    // makes the other idle connections suspect (closed without a ping).
                    t.state.slow_ping_lost();
                }
                // Failed even if its reply came in just before the socket was shut down:
                // the socket is gone either way.
                Err(ExtError::PingFailed {
                    elapsed_ms: delay.as_millis(),
                    timeout_ms: timeout.as_millis(),
                    message: "no reply within the hedge delay and no room for a fresh \
                              connection beside it: the connection was given up"
                        .to_owned(),
                })
            }
            Race::Pinging | Race::Done => {
                if hedged {
                    self.pool.stats().record_hedge(false);
                }
                pinged
            }
        }
    }

    /// The hedge found no room for a fresh connection: gives the slow connection up (its
    /// socket shut down, so its ping returns) unless the ping is already over.
    fn give_up(race: &parking_lot::Mutex<Race<C>>, slow: &crate::socket::ConnSocket) {
        let mut race = race.lock();
        if let Race::Pinging = *race {
            *race = Race::GaveUp;
            slow.shutdown();
        }
    }

    /// The hedge's side (on its own thread): opens a fresh connection if the pool has room,
    /// and hands it over if the ping is still waiting, cutting the ping short; with no room,
    /// gives the slow connection up.
    fn hedge(&self, race: &parking_lot::Mutex<Race<C>>, slow: &crate::socket::ConnSocket) {
        let pool = &self.pool;
        if !pool.hedge_room() {
            return Self::give_up(race, slow);
        }
        let permit = match pool.budget() {
            Some((budget, class)) => match budget.try_acquire(class) {
                Some(permit) => Some(permit),
                None => return Self::give_up(race, slow),
            },
            None => None,
        };
        let started = Instant::now();
        let (mut conn, socket) = match self.establish() {
            Ok(opened) => opened,
            Err(e) => {
                let text = e.to_string();
                pool.connect_failed(ConnectClass::of_libpq_message(&text), &text);
                return;
            }
        };
        if conn.after_connect(pool.config()).is_err()
            || self.run_after_connect(&mut conn, &socket).is_err()
        {
            return close_abandoned(&self.pool, conn, socket, permit);
        }
        let mut state = ConnState::opened(pool, started.elapsed(), permit);
        // Not opened for a waiting checkout through r2d2: nothing to count as fresh.
        state.take_fresh();
        conn.set_instrumentation(tracker(state, socket));
        let mut race = race.lock();
        if let Race::Pinging = *race {
            *race = Race::Fresh(conn);
            // The ping returns with an error now; the checkout takes the fresh connection.
            slow.shutdown();
        }
        // Else the ping came back first: `conn` is closed here (r2d2 cannot take a
        // connection it did not open itself).
    }
}

impl<C: ExtConnection> ExtManager<C> {
    /// [`ManageConnection::is_valid`]'s checks, on a tracked connection.
    fn check_out(&self, conn: &mut C) -> Result<(), ExtError> {
        let Some(tracker) = tracker_of(conn) else {
            return Ok(());
        };
        let (state, socket) = (&mut tracker.state, &mut tracker.extra);
        let now = Instant::now();
        if SWEEPING.with(|s| s.get()) {
            return match state.sweep(|| probe_of(socket), now) {
                Some(reason) => Err(ExtError::Retired(reason)),
                None => Ok(()),
            };
        }
        match state.begin_checkout(|| probe_of(socket), now) {
            CheckoutStep::Reuse => Ok(()),
            CheckoutStep::Discard(reason) => Err(ExtError::Retired(reason)),
            CheckoutStep::Ping { timeout } => self.validate(conn, timeout).map_err(|e| match e {
                ExtError::PingFailed {
                    elapsed_ms,
                    timeout_ms,
                    message,
                } => ExtError::PingFailed {
                    elapsed_ms,
                    timeout_ms,
                    message: self.pool.redact(&message),
                },
                other => other,
            }),
        }
    }

    /// A standalone manager's connect (no `ExtPool` around it): one attempt, its failure
    /// returned to r2d2, which retries with its own backoff.
    fn connect_once(&self) -> Result<C, ExtError> {
        let pool = &self.pool;
        let started = Instant::now();
        let (mut conn, socket) = self.establish().map_err(|e| {
            let text = e.to_string();
            ExtError::Connect {
                target: self.target_redacted(),
                message: pool.connect_failed(ConnectClass::of_libpq_message(&text), &text),
            }
        })?;
        conn.after_connect(pool.config())
            .map_err(|e| ExtError::Setup {
                target: self.target_redacted(),
                message: pool.redact(&e.to_string()),
            })?;
        self.run_after_connect(&mut conn, &socket)
            .map_err(|(class, text)| ExtError::Setup {
                target: self.target_redacted(),
                message: pool.connect_failed(class, &text),
            })?;
        let state = ConnState::opened(pool, started.elapsed(), None);
        conn.set_instrumentation(tracker(state, socket));
        Ok(conn)
    }
}

/// At checkin, after a "read-only transaction" error: whether the server is a standby now
/// (a failover), asked with one query on the application's thread, bounded by `timeout` (the
/// watchdog shuts the socket down at the deadline, as for the checkin's `ROLLBACK`). No
/// answer in time, an error, or a socket the pool cannot bound (unless `embedded`) counts as
/// a standby: the connection is closed, never pooled again with the question unanswered.
fn standby_within<C: ExtConnection>(conn: &mut C, embedded: bool, timeout: Duration) -> bool {
    let socket = tracker_of(conn).and_then(|t| t.extra.get().cloned());
    let Some(socket) = socket else {
        return !embedded || conn.is_standby();
    };
    let deadline =
        Watchdog::global().arm_critical(Instant::now() + timeout, move || socket.shutdown());
    let standby = conn.is_standby();
    let fired = deadline.disarm();
    standby || fired
}

fn probe_of(slot: &mut SocketSlot) -> ProbeResult {
    match slot.get().map(socket::ConnSocket::probe) {
        Some(Probe::Alive) => ProbeResult::Alive,
        Some(Probe::Dead) => ProbeResult::Dead,
        Some(Probe::Unknown) => ProbeResult::Unknown,
        None => ProbeResult::Unavailable,
    }
}

impl<C: ExtConnection> r2d2::ManageConnection for ExtManager<C> {
    type Connection = C;
    type Error = ExtError;

    fn connect(&self) -> Result<C, ExtError> {
        let pool = &self.pool;
        // Attempts go on here, paced by the server's health, for as long as a checkout of
        // this pool wants a connection: a failure is recorded (and fails waiting checkouts
        // fast when it is hopeless), never handed back to r2d2, whose own retry pauses grow
        // to half the pool timeout (a checkout would be served up to seconds after the
        // server's return).
        if self.standalone {
            return self.connect_once();
        }
        loop {
            // A checkout must want this connection (see `demand`), and a budget class needs
            // a permit first: no connection is opened beyond the budget, and nothing is
            // locked while waiting. The permit wait ends a little before the checkout's, so
            // that a checkout timing out on the budget reports the budget's state.
            let (claim, permit) = self
                .demand
                .ready(pool.budget(), pool.connect_permit_wait())
                .map_err(|e| match pool.budget() {
                    Some(_) => ExtError::Budget(format!("pool {}: {e}", pool.name())),
                    None => ExtError::Budget(format!(
                        "pool {}: the pool was dropped; no checkout waits for this connection",
                        pool.name()
                    )),
                })?;
            let _probe = match pool.health().attempt() {
                Attempt::Go(probe) => probe,
                Attempt::Wait(pause) => {
                    // The server is down: another connect is trying it, or the backoff runs.
                    drop(permit);
                    std::thread::sleep(pause.min(Duration::from_millis(50)));
                    continue;
                }
            };
            let started = Instant::now();
            let (mut conn, socket) = match self.establish() {
                Ok(opened) => opened,
                Err(e) => {
                    let text = e.to_string();
                    pool.connect_failed(ConnectClass::of_libpq_message(&text), &text);
                    continue;
                }
            };
            if let Err(e) = conn.after_connect(pool.config()) {
                close_abandoned(&self.pool, conn, socket, permit);
                return Err(ExtError::Setup {
                    target: self.target_redacted(),
                    message: pool.redact(&e.to_string()),
                });
            }
            if let Err((class, text)) = self.run_after_connect(&mut conn, &socket) {
                // Recorded like a failed connect: a hopeless one fails waiting checkouts at
                // once with the cause, and is retried at most once a second.
                pool.connect_failed(class, &text);
                close_abandoned(&self.pool, conn, socket, permit);
                continue;
            }
            let state = ConnState::opened(pool, started.elapsed(), permit);
            conn.set_instrumentation(tracker(state, socket));
            claim.opened();
            return Ok(conn);
        }
    }

    fn is_valid(&self, conn: &mut C) -> Result<(), ExtError> {
        if tracker_of(conn).is_none() {
            // (also a connection opened by another manager: a stock pool never mixes them)
            // The application replaced the connection's instrumentation: we know nothing of
            // this connection any more, so treat it as unvalidated.
            conn.set_instrumentation(tracker(ConnState::adopted(&self.pool), SocketSlot::None));
        }
        let Some(tracker) = tracker_of(conn) else {
            return Ok(());
        };
        let served = tracker.state.take_fresh();
        if served {
            self.demand.taken_fresh();
        }
        let checked = self.check_out(conn);
        if served && checked.is_err() {
            self.demand.unserve();
        }
        checked
    }

    fn has_broken(&self, conn: &mut C) -> bool {
        if tracker_of(conn).is_none() {
            // The application replaced the connection's instrumentation while it had it: take
            // back what its state held (budget and gate permits), then check it in as usual.
            conn.set_instrumentation(tracker(ConnState::adopted(&self.pool), SocketSlot::None));
            // Its statements were not seen: it may be inside a transaction.
            if let Some(t) = tracker_of(conn) {
                t.mark_transaction_suspect();
            }
        }
        let dirty = std::thread::panicking()
            || conn.is_broken()
            || crate::tracker::left_in_transaction(
                conn,
                self.peers.is_none(),
                self.pool.config().lifecycle.validation.timeout,
            );
        let suspect = tracker_of(conn).is_some_and(|t| t.state.take_read_only_suspect());
        let standby = suspect
            && !dirty
            && standby_within(
                conn,
                self.peers.is_none(),
                self.pool.config().lifecycle.validation.timeout,
            );
        let Some(tracker) = tracker_of(conn) else {
            return dirty;
        };
        if standby {
            tracker.state.failover_detected();
        }
        tracker.state.checkin(dirty).is_some()
    }
}
