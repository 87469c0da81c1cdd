//! The extended pool: a real `bb8::Pool`, built with the lifecycle policy wired in.
//!
//! [`ExtPool`] dereferences to `bb8::Pool<ExtManager<C>>`, and [`ExtPool::get`] yields bb8's
//! own `PooledConnection`, so every diesel-async call site keeps compiling; what it adds is
//! checkouts served in arrival order, errors that name their cause, [`ExtPool::status`],
//! [`ExtPool::stats`], [`ExtPool::invalidate`] and one maintenance task.

use std::future::Future;
use std::ops::Deref;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bb8::PooledConnection;
use pool_core::budget::{Budget, ClassId};
use pool_core::config::{PoolConfig, PoolConfigBuilder};
use pool_core::engine::{Maintenance, PoolState};
use pool_core::error::ConfigError;
use pool_core::events::{EventListener, LogListener};
use pool_core::lifecycle::CloseReason;
use pool_core::stats::StatsSnapshot;
use pool_core::status::StatusReport;
use tokio::sync::watch;

use crate::backend::ExtConnection;
use crate::demand::{Demand, Held};
use crate::manager::{BoxFuture, ExtError, ExtManager, Hooks, LastError, Mode, Sink, MODE};
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
    #[error("pool {pool}: could not open the initial {wanted} connection(s) (pool_timeout {timeout:?}): {error}")]
    Connect {
        /// Pool name.
        pool: String,
        /// How many connections `build` waited for (`pool_size`, or a class's floor).
        wanted: u32,
        /// The pool timeout it waited.
        timeout: Duration,
        /// Why (its cause names the last connect error), redacted.
        error: ExtError,
    },
}

/// A diesel-async connection pool with validation, lifetimes, keepalives and stats.
///
/// Dereferences to the [`bb8::Pool`] it wraps (`pool.state()` works as before).
/// [`ExtPool::get`] and [`ExtPool::get_owned`] return bb8's own `PooledConnection`; they,
/// and [`ExtPool::dedicated_connection`], are this pool's own methods, so a call written for
/// bb8 reaches them, not bb8's: checkouts are served in arrival order and counted by the
/// budget, the stats and leak detection. Connections are opened only for checkouts made
/// through this pool; the wrapped pool's `add` would put a connection past its bookkeeping
/// (do not). Cloning is
/// cheap and shares the pool; the maintenance task stops when the last clone is dropped.
pub struct ExtPool<C: ExtConnection> {
    parts: Parts<C>,
    /// Held by every clone; when the last one goes, the maintenance task stops.
    life: Arc<Lifeline>,
}

/// What the pool and its maintenance task share (the task never holds the lifeline).
struct Parts<C: ExtConnection> {
    inner: bb8::Pool<ExtManager<C>>,
    manager: ExtManager<C>,
    state: Arc<PoolState>,
    demand: Arc<Demand>,
    last: Arc<LastError>,
}

impl<C: ExtConnection> Clone for Parts<C> {
    fn clone(&self) -> Self {
        Parts {
            inner: self.inner.clone(),
            manager: self.manager.clone(),
            state: self.state.clone(),
            demand: self.demand.clone(),
            last: self.last.clone(),
        }
    }
}

/// Dropped with the last clone of a pool: ends the connects waiting for demand and, by
/// dropping the sender, the maintenance task.
struct Lifeline {
    demand: Arc<Demand>,
    _stop: watch::Sender<()>,
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        self.demand.close();
    }
}

/// The extended pool for PostgreSQL.
#[cfg(feature = "postgres-core")]
pub type PgPool = ExtPool<diesel_async::AsyncPgConnection>;

/// The extended pool for SQLite (diesel-async's sync wrapper around `SqliteConnection`).
#[cfg(feature = "sqlite")]
pub type SqlitePool =
    ExtPool<diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>>;

impl<C: ExtConnection> Clone for ExtPool<C> {
    fn clone(&self) -> Self {
        ExtPool {
            parts: self.parts.clone(),
            life: self.life.clone(),
        }
    }
}

impl<C: ExtConnection> Deref for ExtPool<C> {
    type Target = bb8::Pool<ExtManager<C>>;

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
    pub async fn from_config(config: PoolConfig) -> Result<ExtPool<C>, BuildError> {
        build(config, Arc::new(LogListener), None).await
    }

    /// Builds a pool from the environment (`DATABASE_URL`, `DB_POOL_SIZE`, ...; see
    /// [`PoolConfig::from_lookup`] for every variable).
    pub async fn from_env() -> Result<ExtPool<C>, BuildError> {
        Self::from_config(PoolConfig::from_env()?).await
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

    /// The manager the pool opens and checks its connections with.
    pub(crate) fn manager(&self) -> &ExtManager<C> {
        &self.parts.manager
    }

    /// Checks out a connection, waiting at most `pool_timeout`: bb8's own
    /// `PooledConnection`, which every diesel-async call and every `&mut AsyncPgConnection`
    /// helper accepts. Callers are served in arrival order (a returned connection goes to the
    /// one that waited longest), and the wait counts in the stats.
    ///
    /// # Errors
    /// [`ExtError::Timeout`] when no connection could be had in time, with its cause when
    /// something went wrong (the last connect error — refused, authentication, TLS, connect
    /// timeout —, the budget and its state, a failed validation); never a password.
    pub async fn get(&self) -> Result<PooledConnection<'_, ExtManager<C>>, ExtError> {
        self.get_timeout(self.parts.state.config().pool_timeout)
            .await
    }

    /// [`ExtPool::get`] with another timeout for this checkout (at most
    /// [`MAX_DURATION`](pool_core::config::MAX_DURATION), 365 days: a longer one waits that
    /// long).
    ///
    /// # Errors
    /// As [`ExtPool::get`].
    pub async fn get_timeout(
        &self,
        timeout: Duration,
    ) -> Result<PooledConnection<'_, ExtManager<C>>, ExtError> {
        self.checkout(timeout, || self.parts.inner.get()).await
    }

    /// An owned checkout (`PooledConnection<'static, _>`, for a task or a struct that outlives
    /// the borrow of the pool, such as an axum extractor): the same gate, arrival order,
    /// validation, budget and stats as [`ExtPool::get`], waiting at most `pool_timeout`.
    ///
    /// Call it on this pool, not on [`ExtPool::inner`]: the wrapped bb8 pool's own
    /// `get_owned` would skip the gate and the pool's bookkeeping.
    ///
    /// # Errors
    /// As [`ExtPool::get`].
    pub async fn get_owned(&self) -> Result<PooledConnection<'static, ExtManager<C>>, ExtError> {
        let timeout = self.parts.state.config().pool_timeout;
        self.checkout(timeout, || self.parts.inner.get_owned())
            .await
    }

    /// The checkout both forms share: `fetch` is bb8's own `get` or `get_owned`.
    async fn checkout<'c, F, Fut>(
        &self,
        timeout: Duration,
        fetch: F,
    ) -> Result<PooledConnection<'c, ExtManager<C>>, ExtError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<PooledConnection<'c, ExtManager<C>>, bb8::RunError<ExtError>>>,
    {
        // At most 365 days (a longer one waits that long, never overflows the clock).
        let timeout = timeout.min(pool_core::config::MAX_DURATION);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let state = &self.parts.state;
        // In `db.client.connection.pending_requests` until this returns (feature `metrics`).
        let _pending = state.pending();
        // The gate first (arrival order); a dropped wait leaves its queue at once.
        let gate = match state.gate().try_enter() {
            Some(permit) => permit,
            None => match tokio::time::timeout_at(deadline, state.gate().enter_async()).await {
                Ok(permit) => permit,
                Err(_) => return Err(self.timed_out(started)),
            },
        };
        // From here on this checkout is demand: a connect may open a connection for it.
        let _wanting = self.parts.demand.want();
        loop {
            let got = tokio::select! {
                biased;
                got = tokio::time::timeout_at(deadline, fetch()) => got,
                unavailable = self.parts.unavailable(started) => {
                    state.stats().record_checkout_timeout();
                    return Err(unavailable);
                }
            };
            match got {
                Ok(Ok(mut conn)) => {
                    // No await between bb8 handing the connection over and this: a dropped
                    // future cannot leave it out of the engine's count.
                    if let Some(t) = tracker_of(&mut *conn) {
                        t.state.handed_out(started, Some(gate));
                    }
                    return Ok(conn);
                }
                // bb8's own timeout (its `connection_timeout`) came first: keep waiting.
                Ok(Err(_)) if tokio::time::Instant::now() < deadline => continue,
                _ => return Err(self.timed_out(started)),
            }
        }
    }

    /// The error of a checkout that waited since `started` and got nothing.
    fn timed_out(&self, started: Instant) -> ExtError {
        let state = &self.parts.state;
        state.stats().record_checkout_timeout();
        self.parts.timeout_error(started)
    }

    /// A connection outside the pool (for `LISTEN`, say), opened with the pool's settings: it
    /// is not counted against `pool_size` nor checked by the pool, but it does take a budget
    /// permit (held until it is dropped) if the pool has a budget. Use this rather than the
    /// wrapped bb8 pool's `dedicated_connection`, which waits for a checkout's demand.
    ///
    /// # Errors
    /// [`ExtError::Connect`] or [`ExtError::Budget`].
    pub async fn dedicated_connection(&self) -> Result<C, ExtError> {
        self.parts.manager.open_dedicated().await
    }

    /// The wrapped bb8 pool.
    pub fn inner(&self) -> &bb8::Pool<ExtManager<C>> {
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
    /// What a checkout that waited since `started` reports: the pool's state and the last
    /// thing that went wrong during the wait, else the budget's state if connects are queued
    /// for permits.
    fn timeout_error(&self, started: Instant) -> ExtError {
        let state = &self.state;
        let bb = self.inner.state();
        let budget_waiters = state.budget().map_or(0, |(b, c)| b.waiters(c));
        let cause = self.last.since(started).or_else(|| {
            let (budget, class) = state.budget()?;
            (budget_waiters > 0).then(|| ExtError::Budget {
                pool: state.name().to_owned(),
                message: format!(
                    "budget: class {:?} has {budget_waiters} connect(s) waiting for a permit; {}",
                    budget.class_name(class),
                    budget.snapshot()
                ),
            })
        });
        ExtError::Timeout {
            pool: state.name().to_owned(),
            waited: started.elapsed(),
            state: format!(
                "{} in use, {} idle, max {}, {} waiting",
                bb.connections.saturating_sub(bb.idle_connections),
                bb.idle_connections,
                state.config().max_size(),
                state.gate().waiters()
            ),
            cause: cause.map(Box::new),
        }
    }

    /// Holds `n` connections at once (opening what is missing, as demand, all at once) in
    /// maintenance mode, then returns them: warms the pool, or brings a budget class back to
    /// its floor.
    /// Resolves when a checkout that started at `started` should stop waiting (see
    /// `ServerHealth::fail_fast`): the server refuses connections for a hopeless reason, or
    /// the breaker is open. Polls the pool's health every 20 ms; never polled at all when a
    /// connection is at hand.
    async fn unavailable(&self, started: Instant) -> ExtError {
        let breaker = self.state.config().fail_fast_when_down;
        loop {
            if let Some(message) = self.state.health().fail_fast(started, breaker) {
                let pool = self.state.name().to_owned();
                // With the cause of the last failure, when it is known.
                let cause = self.last.latest().and_then(|e| e.connect_cause());
                return match cause {
                    Some(cause) => ExtError::Connect {
                        pool,
                        cause,
                        message,
                    },
                    None => ExtError::Unavailable { pool, message },
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn hold(&self, n: u32, timeout: Duration) -> Result<(), ExtError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let gets: Vec<_> = (0..n)
            .map(|_| {
                Box::pin(async move {
                    let _wanting = self.demand.want();
                    let get = MODE.scope(Mode::Sweep, self.inner.get());
                    tokio::time::timeout_at(deadline, get).await.ok()?.ok()
                })
            })
            .collect();
        // Each get keeps its connection until all are done: they are held at once.
        let held = tokio::select! {
            biased;
            held = join_all(gets) => held,
            unavailable = self.unavailable(started) => return Err(unavailable),
        };
        if held.iter().all(Option::is_some) {
            Ok(())
        } else {
            Err(self.timeout_error(started))
        }
    }

    /// Takes one idle connection out, in maintenance mode, without waiting: `None` if there
    /// is none (or another checkout took the last one first). The [`Held`] guard must be
    /// dropped after the connection is returned.
    fn take_idle(&self) -> Option<(PooledConnection<'_, ExtManager<C>>, Held<'_>)> {
        if self.inner.state().idle_connections == 0 {
            return None;
        }
        let held = self.demand.hold();
        let mut get = pin!(MODE.scope(Mode::Sweep, self.inner.get()));
        // One poll: an idle connection is handed over at once (the sweep decision does no
        // I/O); if none is left, the future is dropped.
        match get.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(conn)) => Some((conn, held)),
            _ => None,
        }
    }

    /// Walks the idle connections once (bb8's idle queue is FIFO: each is taken from the
    /// front and returned to the back): retires the dead, broken, expired and (above the
    /// floor) idle-too-long ones, pings those due a keepalive ping. Opens nothing.
    async fn sweep(&self) {
        let n = self.inner.state().idle_connections;
        let lifecycle = &self.state.config().lifecycle;
        let (keepalive, timeout) = (lifecycle.keepalive_ping, lifecycle.validation.timeout);
        for _ in 0..n {
            let Some((mut conn, held)) = self.take_idle() else {
                break;
            };
            let due = keepalive.is_some_and(|every| {
                tracker_of(&mut *conn).is_some_and(|t| t.state.keepalive_due(every, Instant::now()))
            });
            if due {
                let pinged = self.manager.bounded_ping(&mut conn, timeout).await;
                if pinged.is_err() {
                    if let Some(t) = tracker_of(&mut *conn) {
                        t.state.set_close_reason(CloseReason::PingFailed);
                    }
                }
            }
            held.release();
            drop(conn);
        }
    }

    /// Closes up to `n` idle connections with `reason`; returns how many.
    fn close_idle(&self, n: u32, reason: CloseReason) -> u32 {
        // At most the connections idle now: each is closed when it comes back (`has_broken`),
        // and should one ever return to the idle list instead, this loop (which never
        // yields) still ends rather than freeze the runtime thread.
        let n = n.min(self.inner.state().idle_connections);
        let mut closed = 0;
        while closed < n {
            let Some((mut conn, held)) = self.take_idle() else {
                break;
            };
            if let Some(t) = tracker_of(&mut *conn) {
                t.state.set_close_reason(reason);
            }
            held.release();
            drop(conn);
            closed += 1;
        }
        closed
    }
}

/// Polls every future until all are done; their outputs, in order.
async fn join_all<F: Future>(futures: Vec<std::pin::Pin<Box<F>>>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
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
    /// Runs `hook` on every new connection right after it is opened, before any checkout
    /// sees it: per-session setup such as `SET`. Bounded by `connect_timeout`. Default: none.
    ///
    /// Its error fails that connect: the message (redacted) is what waiting checkouts and
    /// `build()` report ([`ConnectCause::Setup`](crate::ConnectCause::Setup)), and it is
    /// classified like a connect error: a lost connection is retried as usual, anything else
    /// (a rejected `SET`) counts as hopeless, so checkouts fail at once with it instead of
    /// waiting `pool_timeout`, and it is retried at most once a second.
    ///
    /// ```no_run
    /// use diesel_async::SimpleAsyncConnection;
    /// use diesel_async_ext::PgPool;
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::builder("postgres://app@db/app")
    ///     .after_connect(|conn| Box::pin(conn.batch_execute("SET search_path TO app, public")))
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
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

    /// Opens connections with the application's own function instead of the built-in
    /// connector: the function an app already hands diesel-async's
    /// `ManagerConfig::custom_setup` (its documented way to TLS, e.g. rustls through
    /// tokio-postgres-rustls), called with the pool's URL as written. Default: the built-in
    /// connector (libpq's URL meanings, OpenSSL or rustls TLS).
    ///
    /// Everything around the connect stays the pool's: each call is bounded by
    /// `connect_timeout`, counted against the pool's sizes and budget, paced by the server's
    /// health (backoff, fail-fast on hopeless errors), followed by `after_connect`, and its
    /// connection validated and checked in like any other. Its error is redacted and
    /// classified by its text (libpq's and the server's wordings; `InvalidConnectionUrl` is
    /// hopeless, the rest is retried unless recognised). The URL's settings and the
    /// builder's connection settings (keepalives, TLS, `application_name`) are then the
    /// function's to apply: the pool does not see its socket. The URL is still read by the
    /// pool at build (so that it can redact it), and must be one it accepts.
    ///
    /// For a credential that changes between connects (an RDS IAM token, a Vault lease),
    /// fetch it in the function and open
    /// [`DatabaseUrl::parse(url)?.with_password(&token)?`](pool_core::url::DatabaseUrl::with_password):
    /// the rest of the URL stays as written. Such a credential is yours to keep out of the
    /// errors you return (the pool redacts the URL's own password).
    ///
    /// ```no_run
    /// use diesel::{ConnectionError, ConnectionResult};
    /// use diesel_async::AsyncPgConnection;
    /// use diesel_async_ext::{BoxFuture, PgPool};
    ///
    /// // The function the app gave `ManagerConfig::custom_setup`, unchanged.
    /// fn establish_connection(url: &str) -> BoxFuture<'_, ConnectionResult<AsyncPgConnection>> {
    ///     Box::pin(async move {
    ///         let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
    ///             .await
    ///             .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    ///         AsyncPgConnection::try_from_client_and_connection(client, conn).await
    ///     })
    /// }
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::builder("postgres://app@db/app")
    ///     .custom_connect(establish_connection)
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
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

    // One setter per row of pool-core's settings table (same names, docs and defaults as
    // `PoolConfigBuilder`'s, and as the sync pool's builder).
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
    /// `pool_timeout`), starts the maintenance task and returns the pool. Call it inside a
    /// tokio runtime.
    ///
    /// # Errors
    /// [`BuildError::Config`] for a bad setting, [`BuildError::Connect`] (naming the cause)
    /// when the first connections cannot be opened.
    pub async fn build(self) -> Result<ExtPool<C>, BuildError> {
        let hooks = self.hooks.clone();
        let (config, listener) = self.into_parts();
        build_pool(config.build()?, listener, None, false, hooks).await
    }

    /// Validates the settings and returns the pool without opening any connection: for a
    /// service that must start (and answer 503) while its database is still down, instead of
    /// crash-looping. Checkouts open connections as they need them; while the server is
    /// unreachable they wait up to `pool_timeout` (or fail at once with
    /// `fail_fast_when_down`), and they fail at once when it refuses connections for a
    /// reason no retry can fix. Returns without waiting for anything.
    pub async fn build_lazy(self) -> Result<ExtPool<C>, BuildError> {
        let hooks = self.hooks.clone();
        let (config, listener) = self.into_parts();
        build_pool(config.build()?, listener, None, true, hooks).await
    }
}

#[cfg(feature = "postgres-core")]
impl Builder<diesel_async::AsyncPgConnection> {
    /// The TLS stack the built-in connector uses (see [`crate::tls`]). Default: OpenSSL when
    /// the `tls-openssl` feature (in `postgres`) is on, else rustls. Only needed when both
    /// are compiled and rustls is wanted; a stack that is not compiled fails `build()` with
    /// [`BuildError::Config`] (unless `sslmode=disable`). Not used with
    /// [`custom_connect`](Self::custom_connect).
    ///
    /// ```no_run
    /// use diesel_async_ext::{PgPool, TlsBackend};
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::builder("postgres://app@db/app?sslmode=verify-full")
    ///     .tls_backend(TlsBackend::Rustls)
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls_backend(mut self, backend: crate::tls::TlsBackend) -> Self {
        self.hooks.opener.tls_backend = Some(backend);
        self
    }
}

pub(crate) async fn build<C: ExtConnection>(
    config: PoolConfig,
    listener: Arc<dyn EventListener>,
    budget: Option<(Budget, ClassId)>,
) -> Result<ExtPool<C>, BuildError> {
    build_pool(config, listener, budget, false, Hooks::default()).await
}

pub(crate) async fn build_pool<C: ExtConnection>(
    config: PoolConfig,
    listener: Arc<dyn EventListener>,
    budget: Option<(Budget, ClassId)>,
    lazy: bool,
    hooks: Hooks<C>,
) -> Result<ExtPool<C>, BuildError> {
    let state = Arc::new(PoolState::new(config, listener, budget)?);
    let demand = Arc::new(Demand::default());
    let last = Arc::new(LastError::default());
    let manager = ExtManager::<C>::new(state.clone(), demand.clone(), last.clone(), hooks)?;
    let cfg = state.config();
    // bb8's `min_idle` top-up, reaper, lifetimes and idle timeouts are all off: `pool_size`
    // is the most kept open (overflow closes on return, see `ConnState::checkin`); idle
    // timeouts, lifetimes, keepalive pings and budget floors are the maintenance task's.
    // A failed connect is retried by our manager, paced by the server's health, while a
    // checkout waits (see `ExtManager::connect`).
    let inner = bb8::Pool::builder()
        .max_size(cfg.max_size())
        .min_idle(None)
        .test_on_check_out(true)
        .max_lifetime(None)
        .idle_timeout(None)
        .connection_timeout(cfg.pool_timeout)
        .retry_connection(true)
        .queue_strategy(bb8::QueueStrategy::Fifo)
        .error_sink(Box::new(Sink {
            last: last.clone(),
            pool: Arc::downgrade(&state),
        }))
        .build_unchecked(manager.clone());
    let (stop_tx, stop_rx) = watch::channel(());
    let pool = ExtPool {
        parts: Parts {
            inner,
            manager,
            state: state.clone(),
            demand: demand.clone(),
            last,
        },
        life: Arc::new(Lifeline {
            demand,
            _stop: stop_tx,
        }),
    };
    // Opening the first connections here reports a wrong URL, password or host at once.
    let warm = if lazy { 0 } else { state.initial_size() };
    if warm > 0 {
        pool.parts
            .hold(warm, cfg.pool_timeout)
            .await
            .map_err(|error| BuildError::Connect {
                pool: cfg.name.clone(),
                wanted: warm,
                timeout: cfg.pool_timeout,
                error,
            })?;
    }
    tokio::spawn(maintain(pool.parts.clone(), stop_rx));
    Ok(pool)
}

/// The pool's one maintenance task: gives borrowed budget headroom back the moment another
/// class waits (woken by the budget, no polling), walks the idle connections as the
/// [`Maintenance`] schedule says, and keeps a budget class's reserved floor open. When the
/// last clone of the pool is dropped, it closes the idle connections and stops.
async fn maintain<C: ExtConnection>(parts: Parts<C>, mut stop: watch::Receiver<()>) {
    let mut schedule = Maintenance::new(&parts.state);
    loop {
        let tick = schedule.tick(Duration::from_secs(1));
        let pressure = async {
            match parts.state.budget() {
                Some((budget, class)) if schedule.borrows() => budget.pressure_async(class).await,
                _ => std::future::pending().await,
            }
        };
        let wanted = tokio::select! {
            _ = stop.changed() => {
                parts.close_idle(u32::MAX, CloseReason::Released);
                return;
            }
            wanted = pressure => wanted,
            () = tokio::time::sleep(tick) => 0,
        };
        if wanted > 0 && parts.close_idle(wanted, CloseReason::Reclaimed) == 0 {
            // Everything borrowed is in use; it goes back at checkin. Do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A round may follow another at once (a class still waits for headroom): let the
        // runtime's other tasks run in between, on a current-thread runtime too.
        tokio::task::yield_now().await;
        if schedule.sweep_due() {
            parts.sweep().await;
            schedule.swept();
        }
        if let Some(floor) = parts.state.below_floor() {
            let _ = parts.hold(floor, parts.state.config().pool_timeout).await;
        }
    }
}
