//! Safe retries for diesel-async: [`with_retry`], [`commit_with_retry`] and [`commit_with_key`].
//!
//! The same guarantees as the sync adapter's, on the same loop
//! ([`pool_core::retry::run_async`], sleeping with tokio's timer):
//!
//! * only [transient](pool_core::classify::ErrorClass::is_transient) errors are retried
//!   (serialization failures, deadlocks, lost connections, shutdowns, too many clients,
//!   read-only after failover, pool timeouts), with exponential backoff and full jitter
//!   ([`RetryPolicy`]); everything else is returned after one attempt;
//! * every attempt takes a fresh connection and runs **one transaction** through
//!   diesel-async's transaction manager (`BEGIN`, the body, `COMMIT`);
//! * an **ambiguous commit** is never turned into a duplicate. Only a connection lost while
//!   `COMMIT` is in flight leaves the outcome open (a serialization failure or deadlock
//!   reported by `COMMIT` is a definite rollback). On PostgreSQL, [`commit_with_retry`] reads
//!   `txid_current()` just before `COMMIT`, then asks fresh connections for `txid_status()`:
//!   *committed* returns the body's result, *aborted* retries, *in progress* asks again, until
//!   the policy's `commit_resolution_timeout`, which also bounds every checkout made to ask.
//!   A transaction still in progress whose session sits idle in it lost its `COMMIT` on the
//!   way: that session is ended ([`RetryConnection::end_abandoned`]), so the transaction can
//!   never commit and the next answer is *aborted*.
//!   Only when no answer can be had does it return [`RetryError::AmbiguousCommit`]. On
//!   backends without transaction ids, [`commit_with_key`] writes an idempotency key in the
//!   same transaction and looks it up instead.
//!
//! Cancellation: dropping the returned future at any point never leaves a connection in the
//! pool inside a transaction — a cancelled `BEGIN` or `COMMIT` leaves diesel-async's
//! transaction manager marked broken, a cancelled body leaves the transaction open, and the
//! pool closes such connections when they come back.
//!
//! ```no_run
//! use diesel_async::RunQueryDsl;
//! use diesel_async_ext::retry::{commit_with_retry, RetryPolicy};
//! use diesel_async_ext::PgPool;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::builder("postgres://app@localhost/app").build().await?;
//! let policy = RetryPolicy::default();
//! // The closure may run more than once: keep side effects outside the database out of it.
//! let moved = commit_with_retry(&pool, &policy, async |conn| {
//!     diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
//!         .execute(conn)
//!         .await?;
//!     diesel::sql_query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
//!         .execute(conn)
//!         .await
//! })
//! .await?;
//! # let _ = moved; Ok(())
//! # }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::result::Error as DieselError;
use diesel::QueryResult;
use diesel_async::{AsyncConnection, TransactionManager};
use diesel_ext_common::resolve::{asked, is_unique_violation, key_owner, key_probe_answer};
use pool_core::config::Pooler;
use pool_core::retry::{
    finish_ambiguous, log_abandoned_ended, no_txid_reason, other_server_reason, run_async, xid_of,
    Asked, AttemptError, Resolution, Resolved, RetryHooks, Step,
};
pub use pool_core::retry::{
    IdempotencyTable, Keyed, PolicyError, PoolError, RetryError, RetryPolicy, TxStatus,
    IDEMPOTENCY_TABLE_SQL, MAX_IDEMPOTENCY_KEY_CHARS,
};

use crate::backend::ExtConnection;
use crate::classify::{classify_diesel, session_answers, Classify, DRIVER};
use crate::manager::ExtManager;
use crate::pool::ExtPool;
use pool_core::classify::ErrorClass;

/// A pool the retry functions can check connections out of: [`ExtPool`] and any plain
/// `bb8::Pool` of diesel-async connections.
pub trait RetryablePool: Sync {
    /// The diesel-async connection type.
    type Connection: AsyncConnection + Send + 'static;

    /// Checks a connection out (bb8's `PooledConnection`), waiting at most the pool's own
    /// timeout, and at most `timeout` if given.
    fn checkout(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<impl DerefMut<Target = Self::Connection> + Send + '_, PoolError>>
           + Send;

    /// Where attempts are reported (pool name, stats, listener).
    fn hooks(&self) -> RetryHooks<'_> {
        RetryHooks::default()
    }

    /// How long the retry functions wait for the one `SELECT 1` that checks an error's claim
    /// that the connection is gone (see [`with_retry`]). Default 5 s; [`ExtPool`] uses its
    /// `validation_timeout`.
    fn answer_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// The pooler in front of the server (the `pooler` setting): behind a transaction-mode
    /// pooler, an ambiguous commit is resolved only on the server that ran it, and the
    /// question is asked inside a transaction. A plain bb8 pool knows of none.
    fn pooler(&self) -> Pooler {
        Pooler::None
    }
}

impl<C: ExtConnection> RetryablePool for ExtPool<C> {
    type Connection = C;

    fn checkout(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<impl DerefMut<Target = C> + Send + '_, PoolError>> + Send {
        let pool_timeout = self.config().pool_timeout;
        let timeout = timeout.map_or(pool_timeout, |t| t.min(pool_timeout));
        async move {
            let guard: bb8::PooledConnection<'_, ExtManager<C>> =
                self.get_timeout(timeout).await.map_err(PoolError::new)?;
            Ok(guard)
        }
    }

    fn hooks(&self) -> RetryHooks<'_> {
        self.state().retry_hooks()
    }

    fn answer_timeout(&self) -> Duration {
        self.config().lifecycle.validation.timeout
    }

    fn pooler(&self) -> Pooler {
        self.config().connect.pooler
    }
}

impl<M> RetryablePool for bb8::Pool<M>
where
    M: bb8::ManageConnection,
    M::Connection: AsyncConnection,
{
    type Connection = M::Connection;

    // Not `async fn`: the trait's opaque guard type is kept (no refinement to bb8's type).
    #[allow(clippy::manual_async_fn)]
    fn checkout(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<impl DerefMut<Target = M::Connection> + Send + '_, PoolError>> + Send
    {
        async move {
            let get = self.get();
            let result = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, get)
                    .await
                    .unwrap_or(Err(bb8::RunError::TimedOut)),
                None => get.await,
            };
            result.map_err(|e| match e {
                bb8::RunError::User(e) => PoolError::new(format_args!("{e:?}")),
                bb8::RunError::TimedOut => PoolError::new("timed out waiting for a connection"),
            })
        }
    }
}

/// What is left of the loop's `max_elapsed` (a checkout never outlasts it), if it has one.
fn left_of(policy: &RetryPolicy, started: Instant) -> Option<Duration> {
    policy
        .max_elapsed()
        .map(|limit| limit.saturating_sub(started.elapsed()))
}

/// The future bound of a retried body: `body(conn)` is a `Send` future. Implemented for every
/// async closure that does not lend from its own state — `async |conn| ...` capturing what it
/// uses by reference (`&order`, an `Arc` it calls methods on), or capturing nothing; write
/// `async |conn|`, not `async move |conn|`, when the body uses captured values by reference.
/// Like diesel-async's own `AsyncFunc`, it names the future so that its `Send`-ness is checked
/// where the body is written, and the retry functions' futures can be spawned.
pub trait RetryBody<'r, C: 'r, R>: FnMut(&'r mut C) -> <Self as RetryBody<'r, C, R>>::Fut {
    /// The future one call of the body returns.
    type Fut: Future<Output = R> + Send;
}

impl<'r, C: 'r, R, F, Fut> RetryBody<'r, C, R> for F
where
    F: FnMut(&'r mut C) -> Fut,
    Fut: Future<Output = R> + Send,
{
    type Fut = Fut;
}

/// What [`commit_with_retry`] and [`commit_with_key`] need from a backend. Implemented for the
/// connection types the crate supports.
pub trait RetryConnection: AsyncConnection + Send {
    /// The current transaction's id, or `None` if the backend has none to offer.
    fn current_txid(&mut self) -> impl Future<Output = diesel::QueryResult<Option<i64>>> + Send;

    /// What became of transaction `txid`, asked on another connection.
    fn txid_status(
        &mut self,
        txid: i64,
    ) -> impl Future<Output = diesel::QueryResult<TxStatus>> + Send;

    /// Inserts `key` into the idempotency table `table` ([`IdempotencyTable`]); returns the
    /// inserting transaction's id (the row's `xmin`) where the backend has one.
    fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> impl Future<Output = diesel::QueryResult<Option<u32>>> + Send;

    /// The id of the transaction that committed `key`'s row (its `xmin`), where the backend
    /// has one; `None` otherwise, or if there is no such row.
    fn idempotency_key_owner(
        &mut self,
        _table: &IdempotencyTable,
        _key: &str,
    ) -> impl Future<Output = diesel::QueryResult<Option<u32>>> + Send {
        async { Ok(None) }
    }

    /// Ends transaction `xid` (its 32-bit id) if a session of this role sits idle in it: a
    /// `COMMIT` cut off on the way never reached the server, which would keep the
    /// transaction open (its outcome "in progress") until it noticed the client was gone.
    /// `Ok(true)` if a session was told to end; backends that cannot tell do nothing
    /// (`Ok(false)`). See [`pool_core::retry::sql::END_ABANDONED`].
    fn end_abandoned(
        &mut self,
        _xid: u32,
    ) -> impl Future<Output = diesel::QueryResult<bool>> + Send {
        async { Ok(false) }
    }

    /// Behind a transaction-mode pooler: the current transaction's id and the identity of
    /// the server running it, in one round trip; `None` if the backend has no transaction
    /// ids.
    fn current_txid_and_server(
        &mut self,
    ) -> impl Future<Output = diesel::QueryResult<Option<(i64, String)>>> + Send {
        async { Ok(None) }
    }

    /// Behind a transaction-mode pooler: what became of transaction `txid`, if the server
    /// answering is `server` and not a standby; `None` when it is not (the answer would be a
    /// guess).
    fn txid_status_on(
        &mut self,
        _txid: i64,
        _server: &str,
    ) -> impl Future<Output = diesel::QueryResult<Option<TxStatus>>> + Send {
        async { Ok(None) }
    }
}

/// Creates the idempotency table if it does not exist (for applications that do not run the
/// migration). For a table set with `RetryPolicy::builder().idempotency_table(..)`, run
/// `conn.batch_execute(&policy.idempotency_table().create_sql())` instead.
pub async fn ensure_idempotency_table<C>(conn: &mut C) -> diesel::QueryResult<()>
where
    C: diesel_async::SimpleAsyncConnection + Send,
{
    conn.batch_execute(IDEMPOTENCY_TABLE_SQL).await
}

#[cfg(feature = "postgres-core")]
mod pg_functions {
    use diesel::sql_types::BigInt;

    // Declared functions have a static query id: their statements are prepared once per
    // connection, so reading the transaction id costs one round trip.
    diesel::define_sql_function! {
        /// PostgreSQL's `txid_current()`.
        fn txid_current() -> BigInt;
    }
    diesel::define_sql_function! {
        /// PostgreSQL's `txid_status(bigint)`.
        fn txid_status(txid: BigInt) -> Nullable<Text>;
    }
}

#[cfg(feature = "postgres-core")]
impl RetryConnection for diesel_async::AsyncPgConnection {
    async fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>> {
        use diesel_async::RunQueryDsl;
        diesel::select(pg_functions::txid_current())
            .get_result(self)
            .await
            .map(Some)
    }

    async fn txid_status(&mut self, txid: i64) -> diesel::QueryResult<TxStatus> {
        use diesel_async::RunQueryDsl;
        let status: Option<String> = diesel::select(pg_functions::txid_status(txid))
            .get_result(self)
            .await?;
        Ok(TxStatus::from_txid_status(status.as_deref()))
    }

    async fn end_abandoned(&mut self, xid: u32) -> diesel::QueryResult<bool> {
        use diesel_async::RunQueryDsl;
        let row: diesel_ext_common::resolve::EndedRow =
            diesel::sql_query(pool_core::retry::sql::END_ABANDONED)
                .bind::<diesel::sql_types::Text, _>(xid.to_string())
                .get_result(self)
                .await?;
        Ok(row.ended > 0)
    }

    async fn current_txid_and_server(&mut self) -> diesel::QueryResult<Option<(i64, String)>> {
        use diesel::sql_types::{BigInt, Text};
        use diesel_async::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<(BigInt, Text)>(&format!(
            "{}, {}",
            pool_core::retry::sql::TXID_CURRENT,
            pool_core::retry::sql::SERVER_IDENTITY
        )))
        .get_result(self)
        .await
        .map(Some)
    }

    async fn txid_status_on(
        &mut self,
        txid: i64,
        server: &str,
    ) -> diesel::QueryResult<Option<TxStatus>> {
        use diesel::sql_types::{BigInt, Bool, Nullable, Text};
        use diesel_async::RunQueryDsl;
        let (status, answering, standby): (Option<String>, String, bool) = diesel::select(
            diesel::dsl::sql::<(Nullable<Text>, Text, Bool)>(&format!(
                "{}(",
                pool_core::retry::sql::TXID_STATUS
            ))
            .bind::<BigInt, _>(txid)
            .sql(&format!(
                "), {}",
                pool_core::retry::sql::TXID_STATUS_ON_SERVER
            )),
        )
        .get_result(self)
        .await?;
        Ok(
            (answering == server && !standby)
                .then(|| TxStatus::from_txid_status(status.as_deref())),
        )
    }

    async fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel_async::RunQueryDsl;
        let row: diesel_ext_common::resolve::XminRow =
            diesel::sql_query(table.insert_returning_xmin_sql_pg())
                .bind::<diesel::sql_types::Text, _>(key)
                .get_result(self)
                .await?;
        Ok(row.id())
    }

    async fn idempotency_key_owner(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel::OptionalExtension;
        use diesel_async::RunQueryDsl;
        let row: Option<diesel_ext_common::resolve::XminRow> =
            diesel::sql_query(table.xmin_sql_pg())
                .bind::<diesel::sql_types::Text, _>(key)
                .get_result(self)
                .await
                .optional()?;
        Ok(row.and_then(|r| r.id()))
    }
}

#[cfg(feature = "sqlite")]
impl RetryConnection
    for diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>
{
    async fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>> {
        Ok(None)
    }

    async fn txid_status(&mut self, _txid: i64) -> diesel::QueryResult<TxStatus> {
        Ok(TxStatus::Unknown)
    }

    async fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel_async::RunQueryDsl;
        diesel::sql_query(table.insert_sql_sqlite())
            .bind::<diesel::sql_types::Text, _>(key.to_owned())
            .execute(self)
            .await
            .map(|_| None)
    }
}

/// Runs `op` with a fresh connection per attempt, retrying transient failures.
///
/// `op` is not wrapped in a transaction. A statement cut off by a lost connection is retried,
/// and with autocommit it may already have taken effect: use this for reads and idempotent
/// writes, and [`commit_with_retry`] for everything else.
///
/// An error that says the connection is gone is believed only if the connection agrees.
/// diesel-async hides a server error's SQLSTATE and severity, so an application's
/// `RAISE EXCEPTION 'terminating connection due to administrator command'` reads exactly like
/// the server's FATAL. After such an error the connection is sent one `SELECT 1` (bounded by
/// [`RetryablePool::answer_timeout`]): if the server answers, the session is alive, the error
/// was the application's and it is returned after this one attempt as
/// [`RetryError::Permanent`]; the pool is not invalidated and the connection is kept. A
/// server that sent a FATAL has closed the session: the ping fails and the error is retried.
pub async fn with_retry<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    op: F,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    F: for<'r> AsyncFnMut(&'r mut P::Connection) -> Result<T, E>
        + for<'r> RetryBody<'r, P::Connection, Result<T, E>>,
    E: Classify + Display,
{
    // Attempts run one after another; the lock only lends the closure to each in turn.
    let op = tokio::sync::Mutex::new(op);
    let hooks = pool.hooks();
    let started = Instant::now();
    let answered = AtomicBool::new(false);
    let timeout = pool.answer_timeout();
    run_async(
        policy,
        &hooks,
        |e: &E| believed(e.class_for(DRIVER), &answered),
        |_attempt| {
            let (op, answered) = (&op, &answered);
            async move {
                let mut guard = pool
                    .checkout(left_of(policy, started))
                    .await
                    .map_err(AttemptError::Pool)?;
                let mut op = op.lock().await;
                let op: &mut F = &mut op;
                match op(&mut *guard).await {
                    Ok(value) => Ok(value),
                    Err(e) => {
                        check_claim(&e, &mut *guard, timeout, answered).await;
                        Err(AttemptError::Op(e))
                    }
                }
            }
        },
        tokio::time::sleep,
    )
    .await
}

/// After an attempt's error `e` that claims the connection is gone: records in `answered`
/// whether the session still answers ([`session_answers`]).
async fn check_claim<C: AsyncConnection, E: Classify>(
    e: &E,
    conn: &mut C,
    timeout: Duration,
    answered: &AtomicBool,
) {
    if e.class_for(DRIVER).is_disconnect() {
        answered.store(session_answers(conn, timeout).await, Ordering::Relaxed);
    }
}

/// The class the loop acts on: a disconnect the session contradicted (it answered after the
/// error, see [`check_claim`]) was an application's error. Clears `answered` for the next
/// attempt.
fn believed(class: ErrorClass, answered: &AtomicBool) -> ErrorClass {
    if answered.swap(false, Ordering::Relaxed) && class.is_disconnect() {
        ErrorClass::Permanent
    } else {
        class
    }
}

/// Runs `body` inside a transaction, commits, and retries the whole transaction on transient
/// failures; never commits twice (see the [module documentation](self)).
///
/// `body` **may run more than once**: it must not have side effects outside the database that
/// cannot be repeated. To run at another isolation level, make
/// `SET TRANSACTION ISOLATION LEVEL ...` its first statement.
pub async fn commit_with_retry<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    body: F,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
    F: for<'r> AsyncFnMut(&'r mut P::Connection) -> Result<T, E>
        + for<'r> RetryBody<'r, P::Connection, Result<T, E>>,
    E: From<DieselError> + Classify + Display,
{
    let mode = Mode::Txid {
        verify: policy.verify_commit(),
        pooled: pool.pooler().is_transaction_mode(),
    };
    match run_transactions(pool, policy, &mode, body).await? {
        Outcome::Value(value) => Ok(value),
        Outcome::AlreadyCommitted => unreachable!("only an idempotency key finds this"),
    }
}

/// Like [`commit_with_retry`], for any backend: inserts `key` into the idempotency table
/// (the policy's [`IdempotencyTable`], whose rustdoc shows the SQL) in the same transaction,
/// so that a commit cut off by a lost connection is resolved by looking the key up, and a
/// call repeated with the same key does nothing. Keys are at most
/// [`MAX_IDEMPOTENCY_KEY_CHARS`] characters (an empty or longer key is refused before any
/// round trip, as [`RetryError::Permanent`]) and share one table: namespace them by what
/// they guard (`webhook:stripe:evt_...`).
///
/// Resolution inserts the key again on a fresh connection: if the cut-off transaction is
/// still running, the insert waits on its lock, so the answer is never read too early.
pub async fn commit_with_key<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    key: &str,
    body: F,
) -> Result<Keyed<T>, RetryError<E>>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
    F: for<'r> AsyncFnMut(&'r mut P::Connection) -> Result<T, E>
        + for<'r> RetryBody<'r, P::Connection, Result<T, E>>,
    E: From<DieselError> + Classify + Display,
{
    if let Err(reason) = pool_core::retry::check_idempotency_key(key) {
        return Err(RetryError::Permanent(
            DieselError::QueryBuilderError(reason.into()).into(),
        ));
    }
    let mode = Mode::Key(key.to_owned(), policy.idempotency_table().clone());
    Ok(match run_transactions(pool, policy, &mode, body).await? {
        Outcome::Value(value) => Keyed::Committed(value),
        Outcome::AlreadyCommitted => Keyed::AlreadyCommitted,
    })
}

/// How a transaction's commit is made resolvable.
enum Mode {
    /// Read `txid_current()` before `COMMIT` (if `verify`), ask `txid_status()` after a cut.
    /// Behind a transaction-mode pooler (`pooled`), with the identity of the server that
    /// runs the transaction, and the answer taken only from that server.
    Txid { verify: bool, pooled: bool },
    /// Insert the idempotency key in the transaction; look it up after a cut.
    Key(String, IdempotencyTable),
}

/// What an attempt's preparation left to do.
enum Prepared<T> {
    /// The body ran inside an open transaction: commit it. `key_owner`: in key mode, the
    /// transaction's id as its key's row has it (PostgreSQL).
    Commit {
        value: T,
        txid: Option<Txid>,
        key_owner: Option<u32>,
    },
    /// A transaction with this key had committed before; nothing to commit.
    AlreadyCommitted,
}

/// A transaction's id, read before `COMMIT`, and (behind a transaction-mode pooler) the
/// identity of the server that ran it.
struct Txid {
    id: i64,
    server: Option<String>,
}

/// What [`run_transactions`] ended with.
enum Outcome<T> {
    /// The body's result, committed.
    Value(T),
    /// The idempotency key was there already: nothing was run.
    AlreadyCommitted,
}

/// `BEGIN`, the key (in key mode), the body, the transaction id (in txid mode); on a failure
/// before `COMMIT`, rolls back and reports it.
async fn prepare<C, T, E, F>(
    conn: &mut C,
    mode: &Mode,
    body: &mut F,
) -> Result<Prepared<T>, AttemptError<E>>
where
    C: RetryConnection,
    F: for<'r> AsyncFnMut(&'r mut C) -> Result<T, E> + for<'r> RetryBody<'r, C, Result<T, E>>,
    E: From<DieselError>,
{
    begin(conn).await.map_err(|e| AttemptError::Op(e.into()))?;
    let mut key_owner = None;
    if let Mode::Key(key, table) = mode {
        match conn.insert_idempotency_key(table, key).await {
            Ok(xmin) => key_owner = xmin,
            Err(e) if is_unique_violation(&e) => {
                let _ = rollback(conn).await;
                return Ok(Prepared::AlreadyCommitted);
            }
            Err(e) => return Err(abandon(conn, e.into()).await),
        }
    }
    let value = match body(conn).await {
        Ok(value) => value,
        Err(e) => return Err(abandon(conn, e).await),
    };
    let txid = match mode {
        Mode::Txid {
            verify: true,
            pooled: false,
        } => conn
            .current_txid()
            .await
            .map(|id| id.map(|id| Txid { id, server: None })),
        Mode::Txid {
            verify: true,
            pooled: true,
        } => conn.current_txid_and_server().await.map(|id| {
            id.map(|(id, server)| Txid {
                id,
                server: Some(server),
            })
        }),
        _ => Ok(None),
    };
    let txid = match txid {
        Ok(txid) => txid,
        Err(e) => return Err(abandon(conn, e.into()).await),
    };
    Ok(Prepared::Commit {
        value,
        txid,
        key_owner,
    })
}

/// After a `COMMIT` cut off by a lost connection: what became of the transaction.
async fn resolve<P>(
    pool: &P,
    policy: &RetryPolicy,
    mode: &Mode,
    txid: Option<&Txid>,
    key_owner: Option<u32>,
) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    let question = match (mode, txid) {
        (Mode::Key(key, table), _) => Question::Key {
            key: key.clone(),
            table: table.clone(),
            ours: key_owner,
            // Behind a transaction-mode pooler the question may reach another server, where
            // the same 32-bit id is another transaction: nothing is ended there.
            end: key_owner.filter(|_| !pool.pooler().is_transaction_mode()),
        },
        (Mode::Txid { .. }, Some(Txid { id, server: None })) => Question::Txid(*id),
        (
            Mode::Txid { .. },
            Some(Txid {
                id,
                server: Some(server),
            }),
        ) => Question::TxidOn(*id, server.clone()),
        (Mode::Txid { verify, .. }, None) => return Err(no_txid_reason(*verify)),
    };
    poll_until(pool, policy, &question).await
}

/// The retry loop around one transaction per attempt: [`prepare`] opens the transaction and
/// runs the body; this commits, and if the connection is lost during `COMMIT`, asks
/// [`resolve`] what became of the transaction.
async fn run_transactions<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    mode: &Mode,
    body: F,
) -> Result<Outcome<T>, RetryError<E>>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
    F: for<'r> AsyncFnMut(&'r mut P::Connection) -> Result<T, E>
        + for<'r> RetryBody<'r, P::Connection, Result<T, E>>,
    E: From<DieselError> + Classify + Display,
{
    // Attempts run one after another; the lock only lends the closure to each in turn.
    let body = tokio::sync::Mutex::new(body);
    let hooks = pool.hooks();
    let started = Instant::now();
    let answered = AtomicBool::new(false);
    let timeout = pool.answer_timeout();
    let (body, hooks_ref, answered_ref) = (&body, &hooks, &answered);
    run_async(
        policy,
        &hooks,
        |e: &E| believed(e.class_for(DRIVER), &answered),
        |_attempt| async move {
            let answered = answered_ref;
            let mut guard = pool
                .checkout(left_of(policy, started))
                .await
                .map_err(AttemptError::Pool)?;
            let prepared = {
                let mut body = body.lock().await;
                let body: &mut F = &mut body;
                match prepare(&mut *guard, mode, body).await {
                    Ok(prepared) => prepared,
                    Err(AttemptError::Op(e)) => {
                        check_claim(&e, &mut *guard, timeout, answered).await;
                        return Err(AttemptError::Op(e));
                    }
                    Err(e) => return Err(e),
                }
            };
            let (value, txid, key_owner) = match prepared {
                Prepared::AlreadyCommitted => return Ok(Outcome::AlreadyCommitted),
                Prepared::Commit {
                    value,
                    txid,
                    key_owner,
                } => (Outcome::Value(value), txid, key_owner),
            };
            let Err(commit_error) = commit(&mut *guard).await else {
                return Ok(value);
            };
            // Only a lost connection leaves the outcome open; a serialization failure or
            // deadlock reported by COMMIT itself is a definite rollback, and so is an error
            // claiming a lost connection when the session still answers (a deferred
            // trigger's `RAISE EXCEPTION` quoting the server's words).
            if !classify_diesel(&commit_error).is_disconnect() {
                return Err(AttemptError::Op(commit_error.into()));
            }
            if session_answers(&mut *guard, timeout).await {
                answered.store(true, Ordering::Relaxed);
                return Err(AttemptError::Op(commit_error.into()));
            }
            drop(guard);
            let resolution = resolve(pool, policy, mode, txid.as_ref(), key_owner).await;
            finish_ambiguous(
                hooks_ref,
                commit_error,
                txid.map(|t| t.id),
                resolution,
                value,
                // Only key mode hears `CommittedElsewhere`.
                || Some(Outcome::AlreadyCommitted),
            )
        },
        tokio::time::sleep,
    )
    .await
}

async fn begin<C: AsyncConnection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::begin_transaction(conn).await
}

async fn commit<C: AsyncConnection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::commit_transaction(conn).await
}

async fn rollback<C: AsyncConnection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::rollback_transaction(conn).await
}

/// Rolls back after a failure before `COMMIT`: the transaction did not commit, so `e` is a
/// plain attempt error. A failed rollback leaves the connection marked broken by
/// diesel-async's transaction manager, and the pool closes it at checkin.
async fn abandon<C: AsyncConnection, E>(conn: &mut C, e: E) -> AttemptError<E> {
    let _ = rollback(conn).await;
    AttemptError::Op(e)
}

/// What resolution asks the server.
enum Question {
    /// `txid_status()` of the transaction id read before `COMMIT`.
    Txid(i64),
    /// The same behind a transaction-mode pooler, asked inside a transaction (tokio-postgres
    /// prepares a statement in a round trip of its own, and between round trips outside a
    /// transaction such a pooler may switch server connections), and answered only by the
    /// server identified so.
    TxidOn(i64, String),
    /// Insert the key again in a throwaway transaction: success means the cut-off
    /// transaction did not commit (the probe is rolled back); a unique violation means a
    /// transaction with the key did, and the row's `xmin` against the cut-off transaction's
    /// id (`ours`, where the backend has one) says whether it was this one.
    Key {
        /// The idempotency key.
        key: String,
        /// Where keys are kept.
        table: IdempotencyTable,
        /// The cut-off transaction's id (the key row's `xmin` it inserted).
        ours: Option<u32>,
        /// The transaction to end first if its session sits idle in it (`ours`, unless the
        /// question may reach another server): its COMMIT was lost on the way, and it holds
        /// the key's lock, which the probe would wait for.
        end: Option<u32>,
    },
}

/// Asks the server to end the transaction `xid` if its session sits idle in it
/// ([`RetryConnection::end_abandoned`]); what that came to is logged, never the resolution's
/// error (a role without the right to end it leaves the resolution as it was).
async fn end_abandoned<C: RetryConnection>(conn: &mut C, hooks: &RetryHooks<'_>, xid: u32) {
    let outcome = conn
        .end_abandoned(xid)
        .await
        .map_err(|e| pool_core::redact::redact(&e.to_string()));
    log_abandoned_ended(hooks, xid, outcome);
}

/// Asks once.
async fn ask<C: RetryConnection>(
    conn: &mut C,
    hooks: &RetryHooks<'_>,
    question: &Question,
) -> QueryResult<Asked> {
    match question {
        Question::Txid(txid) => {
            let status = conn.txid_status(*txid).await?;
            if status == TxStatus::InProgress {
                // Still open: if its session sits idle in it, the COMMIT never arrived.
                // Ending it decides the outcome (aborted, unless the COMMIT got in first),
                // which the next question reads.
                end_abandoned(conn, hooks, xid_of(*txid)).await;
            }
            Ok(status.answer(*txid))
        }
        Question::TxidOn(txid, server) => {
            begin(conn).await?;
            let status = conn.txid_status_on(*txid, server).await;
            let _ = rollback(conn).await;
            Ok(match status? {
                Some(status) => status.answer(*txid),
                None => Asked::Final(other_server_reason(*txid)),
            })
        }
        Question::Key {
            key,
            table,
            ours,
            end,
        } => {
            if let Some(xid) = end {
                end_abandoned(conn, hooks, *xid).await;
            }
            begin(conn).await?;
            let probe = conn.insert_idempotency_key(table, key).await.map(drop);
            let _ = rollback(conn).await;
            match key_probe_answer(probe)? {
                Asked::Answer(Resolved::Committed) if ours.is_some() => Ok(Asked::Answer(
                    key_owner(*ours, conn.idempotency_key_owner(table, key).await?),
                )),
                other => Ok(other),
            }
        }
    }
}

/// Asks fresh connections until an answer or the policy's resolution time is up; every
/// checkout and every question is bounded by what is left of it.
async fn poll_until<P>(
    pool: &P,
    policy: &RetryPolicy,
    question: &Question,
) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    let mut resolution = Resolution::start(policy);
    let hooks = pool.hooks();
    loop {
        let left = resolution.left();
        let outcome = match pool.checkout(Some(left)).await {
            Ok(mut conn) => {
                match tokio::time::timeout(left, ask(&mut *conn, &hooks, question)).await {
                    Ok(result) => asked(result, classify_diesel, pool_core::redact::redact),
                    Err(_) => Asked::NoReply,
                }
            }
            Err(e) => Asked::NoConnection(e.message),
        };
        match resolution.after(outcome) {
            Step::Done(resolved) => return resolved,
            Step::Wait(pause) => tokio::time::sleep(pause).await,
        }
    }
}
