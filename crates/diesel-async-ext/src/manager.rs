//! The bb8 `ManageConnection` implementation: bb8's hooks mapped onto the engine.
//!
//! The pool is always built with `test_on_check_out(true)`, so bb8 calls
//! [`ExtManager::is_valid`](bb8::ManageConnection::is_valid) on every checkout and
//! [`has_broken`](bb8::ManageConnection::has_broken) on every return (also of a connection
//! whose checkout future was dropped, and of one `is_valid` refused). The decisions are the
//! engine's ([`ConnState`]); this file performs them:
//!
//! * `connect`: waits for demand (see [`demand`](crate::demand)), takes a budget permit if
//!   the pool has a budget, opens the connection ([`ConnState::opened`]);
//! * `is_valid`: [`ConnState::begin_checkout`] with the zero-round-trip probe, then, if asked,
//!   a ping bounded by `tokio::time::timeout(validation_timeout)` and
//!   [`ConnState::finish_ping`]. A checkout dropped in the middle of the ping returns the
//!   connection with its ping unreported: the engine closes it at checkin;
//! * `has_broken`: [`ConnState::checkin`] with the session's verdict (a panic, a transaction
//!   left open or its manager broken by a cancelled `BEGIN`/`COMMIT`, the client closed).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_ext_common::tracker::close_abandoned;
use parking_lot::Mutex;
use pool_core::budget::{Budget, ClassId, Permit};
use pool_core::config::PoolConfig;
use pool_core::engine::{Attempt, CheckoutStep, ConnState, ConnectClass, PoolState};
use pool_core::error::ConfigError;
use pool_core::lifecycle::{CloseReason, ProbeResult};

use crate::backend::sealed::OpenFailure;
use crate::backend::ExtConnection;
use crate::demand::{Claim, Demand};
use crate::tracker::{tracker, tracker_of, ServerSocket};

/// What made opening a connection fail, as far as a caller can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectCause {
    /// Nothing accepts connections there (the server is down or restarting).
    Refused,
    /// The server rejected the credentials.
    Auth,
    /// TLS could not be established or the certificate did not verify.
    Tls,
    /// The attempt did not complete within `connect_timeout`.
    Timeout,
    /// The host name could not be resolved.
    Dns,
    /// The server refused the session (no such database, too many clients, starting up).
    Server,
    /// The connection broke while being set up.
    Network,
    /// The settings cannot work.
    Config,
    /// Opened, but the per-connection settings (SQLite pragmas) failed.
    Setup,
    /// Anything else (a SQLite file that cannot be opened, ...).
    Other,
}

impl ConnectCause {
    /// A short stable name (`refused`, `auth`, `tls`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectCause::Refused => "refused",
            ConnectCause::Auth => "auth",
            ConnectCause::Tls => "tls",
            ConnectCause::Timeout => "connect_timeout",
            ConnectCause::Dns => "dns",
            ConnectCause::Server => "server",
            ConnectCause::Network => "network",
            ConnectCause::Config => "config",
            ConnectCause::Setup => "setup",
            ConnectCause::Other => "other",
        }
    }
}

/// Why the pool could not open or hand out a connection. Never contains a password.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ExtError {
    /// A connection could not be opened.
    #[error("pool {pool}: could not connect ({}): {message}", cause.as_str())]
    Connect {
        /// The pool's name.
        pool: String,
        /// What went wrong.
        cause: ConnectCause,
        /// The driver's message, redacted.
        message: String,
    },
    /// The shared connection budget had no permit for this pool's class in time.
    #[error("pool {pool}: {message}")]
    Budget {
        /// The pool's name.
        pool: String,
        /// How long it waited and the budget at that moment.
        message: String,
    },
    /// The connection was retired on checkout (dead, expired, idle too long); the pool takes
    /// another one.
    #[error("connection retired on checkout: {0}")]
    Retired(CloseReason),
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
    /// No connection within the checkout's time. `cause` is what kept the pool from having
    /// one: the last connect or budget failure, or the last failed validation, seen during
    /// the wait; `None` when every connection was simply in use.
    #[error("pool {pool}: no connection within {waited:?} ({state}){}",
        cause.as_ref().map(|c| format!("; last error: {c}")).unwrap_or_default())]
    Timeout {
        /// The pool's name.
        pool: String,
        /// How long the checkout waited.
        waited: Duration,
        /// The pool at that moment (connections in use, idle, waiting).
        state: String,
        /// What kept the pool from serving, if anything went wrong.
        cause: Option<Box<ExtError>>,
    },
    /// No connection, at once: the server refuses connections for a reason no retry can
    /// fix (a wrong password, a database that does not exist), or it has been unreachable for
    /// longer than `fail_fast_when_down`. The pool keeps trying and heals on its own.
    #[error("pool {pool}: no connection: {message}")]
    Unavailable {
        /// The pool's name.
        pool: String,
        /// Why, with the last connect error (redacted).
        message: String,
    },
    /// The pool was dropped while a connect waited for demand.
    #[error("pool {pool} is closed")]
    Closed {
        /// The pool's name.
        pool: String,
    },
}

impl ExtError {
    /// Whether the checkout timed out (whatever the cause).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ExtError::Timeout { .. })
    }

    /// The underlying failure: for a timeout, its cause (if any); otherwise the error itself.
    pub fn root(&self) -> &ExtError {
        match self {
            ExtError::Timeout {
                cause: Some(cause), ..
            } => cause.root(),
            other => other,
        }
    }

    /// The connect failure's cause, if the error (or the timeout's cause) is one.
    pub fn connect_cause(&self) -> Option<ConnectCause> {
        match self.root() {
            ExtError::Connect { cause, .. } => Some(*cause),
            _ => None,
        }
    }

    /// Whether the error (or the timeout's cause) is the budget's.
    pub fn is_budget(&self) -> bool {
        matches!(self.root(), ExtError::Budget { .. })
    }
}

/// A custom connect's error, classified by what it says (the shape of the application's
/// `ConnectionError` is all there is to go by) and redacted.
fn custom_connect_failure(e: &diesel::ConnectionError, config: &PoolConfig) -> OpenFailure {
    use diesel::ConnectionError as E;
    let message = config.redact(&format!("the custom connect failed: {e}"));
    let (cause, class) = match e {
        E::InvalidConnectionUrl(_) => (ConnectCause::Config, ConnectClass::Hopeless),
        E::CouldntSetupConfiguration(_) => (ConnectCause::Setup, ConnectClass::Transient),
        _ => (
            ConnectCause::Other,
            ConnectClass::of_libpq_message(&message),
        ),
    };
    OpenFailure {
        cause,
        class,
        message,
    }
}

/// The last error bb8 reported (through its error sink), with when it happened: what a
/// checkout that times out quotes, since bb8 itself only ever says "timed out".
#[derive(Debug, Default)]
pub(crate) struct LastError(Mutex<Option<(Instant, ExtError)>>);

impl LastError {
    pub(crate) fn record(&self, error: ExtError) {
        *self.0.lock() = Some((Instant::now(), error));
    }

    /// The last error recorded, however old.
    pub(crate) fn latest(&self) -> Option<ExtError> {
        self.0.lock().as_ref().map(|(_, e)| e.clone())
    }

    /// The last error recorded at or after `since`.
    pub(crate) fn since(&self, since: Instant) -> Option<ExtError> {
        self.0
            .lock()
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }
}

/// bb8's error sink: keeps the last connect, budget or validation failure; retirements are
/// routine and not kept.
#[derive(Debug, Clone)]
pub(crate) struct Sink {
    pub(crate) last: Arc<LastError>,
    pub(crate) pool: std::sync::Weak<PoolState>,
}

impl bb8::ErrorSink<ExtError> for Sink {
    fn sink(&self, error: ExtError) {
        match &error {
            ExtError::Retired(_) | ExtError::Closed { .. } => {}
            ExtError::PingFailed { .. } => {
                if let Some(pool) = self.pool.upgrade() {
                    log::info!(target: pool_core::events::LOG_TARGET, pool = pool.name(), event = "ping_failed"; "pool {}: {}", pool.name(), pool.redact(&error.to_string()));
                }
                self.last.record(error);
            }
            _ => self.last.record(error),
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ExtError>> {
        Box::new(self.clone())
    }
}

/// What a checkout of the pool's own maintenance does with each idle connection it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Walk: retire only dead, broken, expired and (above the floor) idle-too-long
    /// connections; no ping, no reclaim, no leak timer. Its checkin leaves the idle time alone.
    Sweep,
    /// A readiness check (`ExtPool::health`): a checkout's decision (a dead connection is
    /// closed and invalidates the pool), without its ping: the check pings it itself.
    Health,
}

tokio::task_local! {
    /// Set while the pool's maintenance checks connections out (see `ExtPool::sweep`).
    pub(crate) static MODE: Mode;
}

/// bb8 connection manager for diesel-async connections with the lifecycle policy applied.
///
/// Built by [`ExtPool`](crate::ExtPool); you rarely name it except in type aliases such as
/// `bb8::PooledConnection<'_, ExtManager<AsyncPgConnection>>`.
pub struct ExtManager<C: ExtConnection> {
    pub(crate) pool: Arc<PoolState>,
    pub(crate) demand: Arc<Demand>,
    opener: Arc<C::Opener>,
    /// Where connect failures are kept for the timeout errors that quote them.
    last: Arc<LastError>,
    /// The application's own connect and after-connect hook, if any.
    hooks: Hooks<C>,
    /// Built by `standalone`: no `ExtPool` around it (no demand, one attempt per connect).
    standalone: bool,
}

/// A boxed future, as hooks return them (`Box::pin(async move { .. })`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A hook run on every new connection right after it is opened (see
/// [`Builder::after_connect`](crate::Builder::after_connect)).
pub type AfterConnect<C> =
    Arc<dyn for<'a> Fn(&'a mut C) -> BoxFuture<'a, diesel::QueryResult<()>> + Send + Sync>;

/// The application's own connect function (see
/// [`Builder::custom_connect`](crate::Builder::custom_connect)): the shape of diesel-async's
/// `ManagerConfig::custom_setup`, given the pool's URL.
pub type CustomConnect<C> =
    Arc<dyn for<'a> Fn(&'a str) -> BoxFuture<'a, diesel::ConnectionResult<C>> + Send + Sync>;

/// The application's hooks on opening connections.
pub(crate) struct Hooks<C> {
    pub(crate) after_connect: Option<AfterConnect<C>>,
    pub(crate) custom_connect: Option<CustomConnect<C>>,
    /// How the built-in opener is set up (the TLS stack).
    pub(crate) opener: crate::backend::sealed::OpenerOptions,
}

impl<C> Default for Hooks<C> {
    fn default() -> Self {
        Hooks {
            after_connect: None,
            custom_connect: None,
            opener: Default::default(),
        }
    }
}

impl<C> Clone for Hooks<C> {
    fn clone(&self) -> Self {
        Hooks {
            after_connect: self.after_connect.clone(),
            custom_connect: self.custom_connect.clone(),
            opener: self.opener.clone(),
        }
    }
}

impl<C: ExtConnection> Clone for ExtManager<C> {
    fn clone(&self) -> Self {
        ExtManager {
            pool: self.pool.clone(),
            demand: self.demand.clone(),
            opener: self.opener.clone(),
            last: self.last.clone(),
            hooks: self.hooks.clone(),
            standalone: self.standalone,
        }
    }
}

/// The counters of a [`ExtManager::standalone`] manager (see [`ExtManager::stats_handle`]).
#[derive(Debug, Clone)]
pub struct ManagerStats(Arc<PoolState>);

impl ManagerStats {
    /// The counters now. Gauges of connections in use and idle are bb8's (`pool.state()`)
    /// and read 0 here.
    pub fn snapshot(&self) -> pool_core::stats::StatsSnapshot {
        self.0.snapshot(0, 0)
    }
}

impl<C: ExtConnection> std::fmt::Debug for ExtManager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtManager")
            .field("pool", &self.pool.name())
            .field("url", &self.pool.config().url)
            .finish()
    }
}

impl<C: ExtConnection> ExtManager<C> {
    pub(crate) fn new(
        pool: Arc<PoolState>,
        demand: Arc<Demand>,
        last: Arc<LastError>,
        hooks: Hooks<C>,
    ) -> Result<Self, ConfigError> {
        let opener = Arc::new(C::opener(pool.config(), &hooks.opener)?);
        Ok(ExtManager {
            pool,
            demand,
            opener,
            last,
            hooks,
            standalone: false,
        })
    }

    /// A manager for a stock `bb8::Pool::builder()` (for those who keep building their pool
    /// themselves), with the URL's and the defaults' settings: see
    /// [`ExtManager::standalone_with`].
    ///
    /// # Errors
    /// A URL or setting that cannot work (redacted).
    pub fn standalone(url: &str) -> Result<ExtManager<C>, ConfigError> {
        Self::standalone_with(PoolConfig::builder(url).build()?)
    }

    /// A manager for a stock `bb8::Pool::builder()`, with `config`'s connection settings
    /// (libpq's URL meanings, OpenSSL or rustls TLS with libpq's `sslmode`s, keepalives and
    /// `tcp_user_timeout` in tokio-postgres's config, `connect_timeout` over the whole
    /// connect; SQLite pragmas), its validation settings (liveness probe, bypass window,
    /// `validation_timeout`, hedging) and `max_lifetime` (jittered, at checkout).
    ///
    /// ```no_run
    /// use diesel_async::AsyncPgConnection;
    /// use diesel_async_ext::ExtManager;
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = bb8::Pool::builder() // your builder, unchanged
    ///     .max_size(15)
    ///     .build(ExtManager::<AsyncPgConnection>::standalone("postgres://app@db/app")?)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// What it gives inside a stock pool, on bb8's hooks: every checkout runs the
    /// zero-round-trip liveness probe (the client's closed state) and pings only past the
    /// bypass window or after a disconnect was seen, that ping bounded by
    /// `validation_timeout`, and a connection whose ping was cut short is closed; a
    /// connection whose client closed, returned inside a transaction, with its transaction
    /// manager broken by a cancelled `BEGIN`/`COMMIT`, or during a panic, is never put back,
    /// and a disconnect makes the pool's older connections re-validated before their next
    /// use. Connect errors are redacted and name their cause (bb8's error sink gets them).
    /// Keep bb8's `test_on_check_out(true)` (its default): with it off, bb8 never asks the
    /// manager at checkout.
    ///
    /// What only the full pool ([`ExtPool`](crate::ExtPool)) gives: arrival-order checkouts,
    /// connections opened only for waiting checkouts, `pool_size` + `max_overflow`, budgets
    /// and classes, fail-fast on hopeless connect errors and timeouts that name their cause
    /// (bb8's `get()` only ever says "timed out"), leak detection, keepalive pings and idle
    /// timeouts of its maintenance task, stats and the status report. `pool_size`,
    /// `max_overflow`, `pool_timeout`, `idle_timeout`, `keepalive_ping` and
    /// `leak_detection_threshold` of `config` are not used: the bb8 builder's own settings
    /// rule. Each connect is one attempt; bb8 retries.
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
        let mut manager = Self::new(
            state,
            Arc::new(Demand::default()),
            Arc::new(LastError::default()),
            Hooks::default(),
        )?;
        manager.standalone = true;
        Ok(manager)
    }

    /// Runs `hook` on every new connection right after it is opened (see
    /// [`Builder::after_connect`](crate::Builder::after_connect), which it is for a
    /// standalone manager).
    pub fn after_connect(
        mut self,
        hook: impl for<'a> Fn(&'a mut C) -> BoxFuture<'a, diesel::QueryResult<()>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.hooks.after_connect = Some(Arc::new(hook));
        self
    }

    /// Opens connections with `connect` instead of the built-in connector (see
    /// [`Builder::custom_connect`](crate::Builder::custom_connect), which it is for a
    /// standalone manager).
    pub fn custom_connect(
        mut self,
        connect: impl for<'a> Fn(&'a str) -> BoxFuture<'a, diesel::ConnectionResult<C>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.hooks.custom_connect = Some(Arc::new(connect));
        self
    }

    /// A handle on the manager's counters (connects, pings, probes that found a dead
    /// connection, ...): take it before the manager goes into the pool, which keeps it.
    pub fn stats_handle(&self) -> ManagerStats {
        ManagerStats(self.pool.clone())
    }

    /// Opens one connection: the application's connect if it gave one (bounded by
    /// `connect_timeout`), else the backend's; then the application's after-connect hook
    /// (bounded by `connect_timeout` too). Errors are redacted and classified.
    ///
    /// With `claim_socket` (a connection that will hold a budget permit), the built-in
    /// connector also claims our duplicate of the connection's socket, waited on at close
    /// (see [`ServerSocket`]); a custom connect never gives one.
    ///
    /// `permit` is the connection's budget permit, kept by the caller: if the after-connect
    /// hook fails (or runs out of time), the connection is given up and the permit taken out
    /// of `permit`, to come back once the server confirmed the session gone (see
    /// [`close_abandoned`]).
    async fn open_raw(
        &self,
        claim_socket: bool,
        permit: &mut Option<Permit>,
    ) -> Result<(C, ServerSocket), OpenFailure> {
        let config = self.config();
        let bound = config.connect.connect_timeout;
        let timed_out = |what: &str| OpenFailure {
            cause: ConnectCause::Timeout,
            class: ConnectClass::Transient,
            message: format!("{what} did not finish within connect_timeout ({bound:?})"),
        };
        let (mut conn, socket) = match &self.hooks.custom_connect {
            None => C::open(&*self.opener, config, claim_socket).await?,
            Some(connect) => {
                let url = config.url.expose_secret();
                let result = match bound {
                    Some(bound) => tokio::time::timeout(bound, connect(url))
                        .await
                        .map_err(|_| timed_out("the custom connect"))?,
                    None => connect(url).await,
                };
                (
                    result.map_err(|e| custom_connect_failure(&e, config))?,
                    ServerSocket::default(),
                )
            }
        };
        if let Some(hook) = &self.hooks.after_connect {
            let result = match bound {
                Some(bound) => match tokio::time::timeout(bound, hook(&mut conn)).await {
                    Ok(result) => result,
                    Err(_) => {
                        close_abandoned(&self.pool, conn, socket, permit.take());
                        return Err(timed_out("the after_connect hook"));
                    }
                },
                None => hook(&mut conn).await,
            };
            if let Err(e) = result {
                close_abandoned(&self.pool, conn, socket, permit.take());
                return Err(OpenFailure {
                    cause: ConnectCause::Setup,
                    // A lost connection may pass next time; a rejected `SET` never will.
                    class: if C::classify(&e).is_disconnect() {
                        ConnectClass::Transient
                    } else {
                        ConnectClass::Hopeless
                    },
                    message: config.redact(&format!("the after_connect hook failed: {e}")),
                });
            }
        }
        Ok((conn, socket))
    }

    fn config(&self) -> &PoolConfig {
        self.pool.config()
    }

    /// Opens a connection, taking a budget permit first if the pool has a budget: no
    /// connection is ever opened beyond the budget. For a `claimed` connect (one working for a
    /// waiting checkout) the permit is queued for only while a checkout waits; otherwise it is
    /// queued for without condition (see [`ExtManager::permit`]).
    pub(crate) async fn open(&self, claimed: bool) -> Result<C, ExtError> {
        let started = Instant::now();
        let (permit, mut conn, socket) = self.open_with_permit(claimed, true).await?;
        let state = ConnState::opened(&self.pool, started.elapsed(), permit);
        conn.set_instrumentation(tracker(state, socket, C::classify));
        Ok(conn)
    }

    /// A connection outside the pool: it holds a budget permit (released when it is
    /// dropped) but is not in the pool's count, stats or checks.
    pub(crate) async fn open_dedicated(&self) -> Result<C, ExtError> {
        let (permit, mut conn, _) = self.open_with_permit(false, false).await?;
        if let Some(permit) = permit {
            conn.set_instrumentation(crate::tracker::Dedicated::new(permit));
        }
        Ok(conn)
    }

    /// `confirm_close`: the connection's close will wait for the server (a pooled one, not
    /// a dedicated one), so its socket is claimed when it holds a permit.
    async fn open_with_permit(
        &self,
        claimed: bool,
        confirm_close: bool,
    ) -> Result<(Option<Permit>, C, ServerSocket), ExtError> {
        let pool = &self.pool;
        let mut permit = match pool.budget() {
            Some((budget, class)) => Some(self.permit(budget, class, claimed).await?),
            None => None,
        };
        let (conn, socket) = self
            .open_raw(confirm_close && permit.is_some(), &mut permit)
            .await
            .map_err(|f| ExtError::Connect {
                pool: pool.name().to_owned(),
                cause: f.cause,
                message: pool.connect_failed(f.class, &f.message),
            })?;
        Ok((permit, conn, socket))
    }

    /// A budget permit for a connect. A permit free at once is taken whoever asked. Otherwise
    /// it is queued for while a checkout of this pool waits, for at most 80% of the pool
    /// timeout of continuous demand (so that a checkout timing out on the budget finds the
    /// budget's error to quote); with no demand, it waits outside the queue.
    async fn permit(
        &self,
        budget: &Budget,
        class: ClassId,
        claimed: bool,
    ) -> Result<Permit, ExtError> {
        if let Some(permit) = budget.try_acquire(class) {
            return Ok(permit);
        }
        let pool = || self.pool.name().to_owned();
        let wait = self.pool.connect_permit_wait();
        loop {
            if claimed {
                self.demand
                    .wanted()
                    .await
                    .map_err(|_| ExtError::Closed { pool: pool() })?;
            }
            let started = Instant::now();
            let acquire = budget.acquire_async(class);
            let gone = async {
                if claimed {
                    self.demand.unwanted().await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                permit = acquire => return Ok(permit),
                // Nobody waits any more: leave the budget's queue (dropping the future does).
                () = gone => continue,
                () = tokio::time::sleep(wait) => {
                    return Err(ExtError::Budget {
                        pool: pool(),
                        message: budget.timed_out(class, started.elapsed()).to_string(),
                    });
                }
            }
        }
    }

    /// Pings `conn` within `timeout` and reports it to the engine (as a failure when the
    /// deadline passed first).
    pub(crate) async fn bounded_ping(
        &self,
        conn: &mut C,
        timeout: Duration,
    ) -> Result<(), ExtError> {
        let started = Instant::now();
        if let Some(t) = tracker_of(conn) {
            t.state.ping_starting();
        }
        let result = tokio::time::timeout(timeout, conn.ping_round_trip())
            .await
            .ok();
        self.ping_done(conn, started, timeout, result)
    }

    /// Reports a finished ping (`None`: no reply within `timeout`) to the engine and turns it
    /// into the checkout's outcome.
    fn ping_done(
        &self,
        conn: &mut C,
        started: Instant,
        timeout: Duration,
        result: Option<diesel::QueryResult<()>>,
    ) -> Result<(), ExtError> {
        if let Some(t) = tracker_of(conn) {
            match result {
                Some(Ok(())) => {
                    t.state.finish_ping(true);
                }
                Some(Err(_)) => {
                    t.state.finish_ping(false);
                }
                // No reply in time: silence, which says something about every idle
                // connection of the pool (see `PoolState::path_went_silent`).
                None => t.state.finish_ping_silent(),
            }
        }
        match result {
            Some(Ok(())) => Ok(()),
            other => Err(ExtError::PingFailed {
                elapsed_ms: started.elapsed().as_millis(),
                timeout_ms: timeout.as_millis(),
                message: match other {
                    Some(Err(e)) => self.pool.redact(&e.to_string()),
                    _ => "no reply within the validation timeout; the connection is closed"
                        .to_owned(),
                },
            }),
        }
    }

    /// A checkout's validation: a ping bounded by `timeout`, **hedged**: once it has taken
    /// longer than the pool's hedge delay (a small multiple of the round trip it observes,
    /// see `PoolState::hedge_delay`), a fresh connect starts beside it if the pool has room
    /// (below its sizes, a budget permit free at once), and whichever is ready first is
    /// handed out. If the fresh connection wins, it takes `conn`'s place and the slow one is
    /// closed; if the ping wins, the connect finishes on its task and its connection is
    /// closed there (as the sync pool's hedge thread does). At the cap (no room, or no permit)
    /// the slow connection is **given up first**: its ping is dropped and the checkout fails
    /// it, so bb8 closes it and goes on to the next idle connection or a connect in its
    /// place, never past the sizes or the budget. On a healthy pool a ping never comes near
    /// the delay: no connect, no cost beyond a timer.
    pub(crate) async fn validate(&self, conn: &mut C, timeout: Duration) -> Result<(), ExtError> {
        let Some(delay) = self.pool.hedge_delay().filter(|d| *d < timeout) else {
            return self.bounded_ping(conn, timeout).await;
        };
        enum Winner<C> {
            Ping(Option<diesel::QueryResult<()>>),
            Hedge(C),
            /// No room for a fresh connection: the slow one is given up (its ping dropped).
            GaveUp,
        }
        let started = Instant::now();
        if let Some(t) = tracker_of(conn) {
            t.state.ping_starting();
        }
        let mut hedged = false;
        let winner = {
            let ping = conn.ping_round_trip();
            tokio::pin!(ping);
            match tokio::time::timeout(delay, &mut ping).await {
                Ok(result) => Winner::Ping(Some(result)),
                Err(_) => {
                    let deadline = tokio::time::Instant::from_std(started + timeout);
                    // On a task of its own: a connect that loses the race (or whose
                    // checkout is dropped) finishes there (see `spawn_hedge`).
                    let (mut hedge, raced) = self.spawn_hedge();
                    let mut racing = true;
                    loop {
                        tokio::select! {
                            result = tokio::time::timeout_at(deadline, &mut ping) => {
                                // A connect under way, still racing: a hedge the ping won.
                                hedged |= racing && raced.load(Ordering::Acquire);
                                break Winner::Ping(result.ok());
                            }
                            fresh = &mut hedge, if racing => match fresh {
                                Ok(Some(Ok(fresh))) => {
                                    hedged = true;
                                    break Winner::Hedge(fresh);
                                }
                                // No room, the connect failed (or panicked): wait the
                                // ping out.
                                Ok(Some(Err(_))) | Err(_) => {
                                    hedged = true;
                                    racing = false;
                                }
                                // At the cap: the slow connection is given up first,
                                // so that a connect in its place fits the sizes.
                                Ok(None) => break Winner::GaveUp,
                            },
                        }
                    }
                }
            }
        };
        match winner {
            Winner::Ping(result) => {
                if hedged {
                    self.pool.stats().record_hedge(false);
                }
                self.ping_done(conn, started, timeout, result)
            }
            Winner::Hedge(fresh) => {
                self.pool.stats().record_hedge(true);
                let mut slow = std::mem::replace(conn, fresh);
                if let Some(t) = tracker_of(&mut slow) {
                    // A failed ping (closed as `PingFailed`), and a strike against the path
                    // (see `PoolState::slow_ping_lost`).
                    t.state.slow_ping_lost();
                }
                // Closed now: its ping may still be answered, but nobody will read it.
                drop(slow);
                Ok(())
            }
            Winner::GaveUp => {
                self.pool.stats().record_hedge_gave_up();
                if let Some(t) = tracker_of(conn) {
                    // A failed ping (the connection is closed, bb8 goes on to the next one
                    // or a connect). One slow ping says nothing about the others; a second
                    // given up within a validation timeout makes them suspect.
                    t.state.slow_ping_lost();
                }
                Err(ExtError::PingFailed {
                    elapsed_ms: started.elapsed().as_millis(),
                    timeout_ms: timeout.as_millis(),
                    message: "no reply within the hedge delay and no room for a fresh \
                              connection beside it: the connection was given up"
                        .to_owned(),
                })
            }
        }
    }

    /// [`ExtManager::open_hedge`] on a task of its own, never dropped half-way: a connect no
    /// longer wanted (its race lost, its checkout or health check dropped, its bound run
    /// out) finishes there, and its connection closes like any other, its budget permit held
    /// until the server let the session go. Dropped mid-connect, it would give the permit
    /// back while its session is still on the server (set up, or running the after-connect
    /// hook), and the next connect could take it. The flag says whether the connect began
    /// (the pool had room).
    pub(crate) fn spawn_hedge(
        &self,
    ) -> (
        tokio::task::JoinHandle<Option<Result<C, ExtError>>>,
        Arc<AtomicBool>,
    ) {
        let hedger = self.clone();
        let connecting = Arc::new(AtomicBool::new(false));
        let began = connecting.clone();
        let task = tokio::spawn(async move { hedger.open_hedge(&began).await });
        (task, connecting)
    }

    /// A fresh connection for a hedge (or a readiness check), if the pool has room at once
    /// (below its sizes, and a budget permit free without waiting); `None` otherwise.
    /// `connecting` is set once the room was found and the connect begins.
    async fn open_hedge(&self, connecting: &AtomicBool) -> Option<Result<C, ExtError>> {
        if !self.pool.hedge_room() {
            return None;
        }
        let mut permit = match self.pool.budget() {
            Some((budget, class)) => Some(budget.try_acquire(class)?),
            None => None,
        };
        connecting.store(true, Ordering::Release);
        let started = Instant::now();
        let pool = &self.pool;
        let opened = self.open_raw(permit.is_some(), &mut permit).await;
        Some(match opened {
            Ok((mut conn, socket)) => {
                let state = ConnState::opened(pool, started.elapsed(), permit);
                conn.set_instrumentation(tracker(state, socket, C::classify));
                Ok(conn)
            }
            Err(f) => Err(ExtError::Connect {
                pool: pool.name().to_owned(),
                cause: f.cause,
                message: pool.connect_failed(f.class, &f.message),
            }),
        })
    }
}

impl<C: ExtConnection> bb8::ManageConnection for ExtManager<C> {
    type Connection = C;
    type Error = ExtError;

    async fn connect(&self) -> Result<C, ExtError> {
        if self.standalone {
            // No pool of ours around it: one attempt, its failure to bb8 (which retries).
            let opened = self.open(false).await;
            if let Err(error) = &opened {
                self.last.record(error.clone());
            }
            return opened;
        }
        // bb8 starts a connect for every checkout that finds nothing idle, including the
        // maintenance's: open only for a checkout that waits and has no connect of its own.
        let claim: Claim<'_> = self.demand.claim().await.map_err(|_| ExtError::Closed {
            pool: self.pool.name().to_owned(),
        })?;
        // Attempts go on here, paced by the server's health, for as long as the claim lasts:
        // a failure is recorded (and fails waiting checkouts fast when it is hopeless), never
        // handed back to bb8, whose own retry pauses grow to half its timeout (a checkout
        // would be served up to seconds after the server's return).
        let mut failed = None;
        loop {
            match self.pool.health().attempt() {
                Attempt::Go(_probe) => match self.open(true).await {
                    Ok(conn) => {
                        claim.opened();
                        return Ok(conn);
                    }
                    Err(error @ ExtError::Connect { .. }) => {
                        self.last.record(error.clone());
                        failed = Some(error);
                    }
                    Err(other) => return Err(other),
                },
                Attempt::Wait(pause) => {
                    tokio::time::sleep(pause.min(Duration::from_millis(50))).await;
                }
            }
            if !self.demand.is_wanted() {
                // Nobody waits any more: bb8 gets the last failure (its error sink keeps it).
                return Err(failed.unwrap_or_else(|| ExtError::Closed {
                    pool: self.pool.name().to_owned(),
                }));
            }
        }
    }

    async fn is_valid(&self, conn: &mut C) -> Result<(), ExtError> {
        if tracker_of(conn).is_none() {
            // The application replaced the connection's instrumentation: we know nothing of
            // it any more, so treat it as unvalidated.
            conn.set_instrumentation(tracker(
                ConnState::adopted(&self.pool),
                ServerSocket::default(),
                C::classify,
            ));
        }
        // The probe is a look at the client's state: cheap, taken before the state is borrowed.
        let probe: ProbeResult = conn.probe();
        let now = Instant::now();
        let mode = MODE.try_with(|m| *m).ok();
        let Some(t) = tracker_of(conn) else {
            return Ok(());
        };
        if mode == Some(Mode::Sweep) {
            return match t.state.sweep(|| probe, now) {
                Some(reason) => Err(ExtError::Retired(reason)),
                None => Ok(()),
            };
        }
        if mode == Some(Mode::Health) {
            // No await here: the check takes an idle connection in one poll.
            return match t.state.begin_checkout(|| probe, now) {
                CheckoutStep::Discard(reason) => Err(ExtError::Retired(reason)),
                CheckoutStep::Reuse | CheckoutStep::Ping { .. } => Ok(()),
            };
        }
        if t.state.take_read_only_suspect() {
            // A "read-only transaction" error since the last checkout: a failover, or a
            // deliberate write in a READ ONLY transaction? Ask the server.
            // A statement: if this future is dropped before it answers, the tracker sees it
            // in flight and the connection is closed at checkin.
            let timeout = self.config().lifecycle.validation.timeout;
            let standby = tokio::time::timeout(timeout, conn.is_standby())
                .await
                .unwrap_or(true);
            if standby {
                if let Some(t) = tracker_of(conn) {
                    t.state.failover_detected();
                }
                return Err(ExtError::Retired(CloseReason::Broken));
            }
        }
        let Some(t) = tracker_of(conn) else {
            return Ok(());
        };
        match t.state.begin_checkout(|| probe, now) {
            CheckoutStep::Reuse => Ok(()),
            CheckoutStep::Discard(reason) => Err(ExtError::Retired(reason)),
            CheckoutStep::Ping { timeout } => self.validate(conn, timeout).await,
        }
    }

    fn has_broken(&self, conn: &mut C) -> bool {
        let panicking = std::thread::panicking();
        // Reaching into the connection must never take bb8's return path down with it.
        let close = catch_unwind(AssertUnwindSafe(|| {
            if tracker_of(conn).is_none() {
                // The application replaced the connection's instrumentation while it had it:
                // take back what its state held (budget and gate permits), then check it in.
                conn.set_instrumentation(tracker(
                    ConnState::adopted(&self.pool),
                    ServerSocket::default(),
                    C::classify,
                ));
                // Its statements were not seen: it may be inside a transaction.
                if let Some(t) = tracker_of(conn) {
                    t.mark_transaction_suspect();
                }
            }
            let dirty =
                panicking || conn.session_dirty() || crate::tracker::left_in_transaction(conn);
            let Some(t) = tracker_of(conn) else {
                return dirty;
            };
            if t.state.close_reason().is_some() && !t.state.is_checked_out() {
                // Retired on checkout or by the maintenance: close it, counted once.
                return true;
            }
            t.state.checkin(dirty).is_some()
        }))
        .unwrap_or(true);
        if close {
            // A checkout may have been waiting for this one (held by the maintenance): it
            // needs a connect now.
            self.demand.notify();
        }
        close
    }
}
