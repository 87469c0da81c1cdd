//! Safe retries: [`with_retry`], [`commit_with_retry`] and [`commit_with_key`].
//!
//! The field reports' `commit_with_retry` loops retried on any error and slept a fixed second;
//! they retried constraint violations, hammered a restarting server in lockstep and, worst,
//! reran a transaction whose `COMMIT` had reached the server before the connection dropped —
//! committing it twice. These functions:
//!
//! * retry only [transient](pool_core::classify::ErrorClass::is_transient) errors
//!   (serialization failures, deadlocks, lost connections, shutdowns, too many clients,
//!   read-only after failover, pool timeouts), with exponential backoff and full jitter
//!   ([`RetryPolicy`]); everything else is returned after one attempt;
//! * take a fresh connection for every attempt (a connection that saw a disconnect is never
//!   pooled again, and the pool's other connections are re-validated);
//! * never turn an **ambiguous commit** into a duplicate. When the connection is lost while
//!   `COMMIT` is in flight, the transaction may have committed. On PostgreSQL,
//!   [`commit_with_retry`] reads `txid_current()` just before `COMMIT` (one round trip; turn it
//!   off with [`RetryPolicyBuilder::verify_commit`](pool_core::retry::RetryPolicyBuilder::verify_commit)),
//!   then asks a fresh connection for `txid_status()`: *committed* returns the closure's result,
//!   *aborted* retries, *in progress* asks again until the policy's
//!   `commit_resolution_timeout`. A transaction still in progress whose session sits idle
//!   in it lost its `COMMIT` on the way: that session is ended
//!   ([`RetryConnection::end_abandoned`]), so the transaction can never commit and the next
//!   answer is *aborted*. Only when the answer cannot be had does it return
//!   [`RetryError::AmbiguousCommit`]. On backends without transaction ids, [`commit_with_key`]
//!   writes an idempotency key in the same transaction and looks it up instead.
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel_r2d2_ext::retry::{commit_with_retry, RetryPolicy};
//! use diesel_r2d2_ext::PgPool;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::builder("postgres://app@localhost/app").build()?;
//! let policy = RetryPolicy::default();
//! // The closure may run more than once: keep side effects outside the database out of it.
//! let balance: i64 = commit_with_retry(&pool, &policy, |conn| {
//!     diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(conn)?;
//!     diesel::sql_query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
//!         .execute(conn)?;
//!     diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
//!         "(SELECT balance FROM accounts WHERE id = 1)",
//!     ))
//!     .get_result(conn)
//! })?;
//! # Ok(())
//! # }
//! ```

use std::fmt::Display;
use std::ops::DerefMut;
use std::time::Duration;

use diesel::connection::{Connection, TransactionManager};
use diesel::result::Error as DieselError;
use diesel::QueryResult;
use diesel_ext_common::resolve::{asked, is_unique_violation, key_owner, key_probe_answer};
use pool_core::config::Pooler;
// `sql` holds PostgreSQL's statements: unused in a SQLite-only build.
#[cfg_attr(not(feature = "postgres"), allow(unused_imports))]
use pool_core::retry::{
    finish_ambiguous, log_abandoned_ended, no_txid_reason, other_server_reason, run_sync, sql,
    xid_of, Asked, AttemptError, Resolution, Resolved, RetryHooks, Step,
};
pub use pool_core::retry::{
    IdempotencyTable, Keyed, PolicyError, PoolError, RetryError, RetryPolicy, TxStatus,
    IDEMPOTENCY_TABLE_SQL, MAX_IDEMPOTENCY_KEY_CHARS,
};

use crate::classify::{classify_diesel, Classify, DRIVER};
use crate::manager::ExtConnection;
use crate::pool::ExtPool;

/// A pool the retry functions can check connections out of: [`ExtPool`] and any plain
/// `r2d2::Pool` of Diesel connections.
pub trait RetryablePool {
    /// The Diesel connection type.
    type Connection: Connection;
    /// What a checkout returns (r2d2's `PooledConnection`).
    type Guard: DerefMut<Target = Self::Connection>;

    /// Checks a connection out.
    fn checkout(&self) -> Result<Self::Guard, PoolError>;

    /// Checks a connection out, waiting at most `timeout` (resolving an ambiguous commit
    /// must end within its own time limit).
    fn checkout_within(&self, timeout: Duration) -> Result<Self::Guard, PoolError>;

    /// How long a checkout waits by default (the pool's `pool_timeout`, r2d2's
    /// `connection_timeout`): the retry loop waits less when less is left of its
    /// `max_elapsed`.
    fn pool_timeout(&self) -> Duration;

    /// Where attempts are reported (pool name, stats, listener).
    fn hooks(&self) -> RetryHooks<'_> {
        RetryHooks::default()
    }

    /// The pooler in front of the server (the `pooler` setting): behind a transaction-mode
    /// pooler, an ambiguous commit is resolved only on the server that ran it. A plain r2d2
    /// pool knows of none.
    fn pooler(&self) -> Pooler {
        Pooler::None
    }

    /// `text` with every secret masked, for the messages resolution reports. The extended
    /// pool masks its URL's known secrets too; a plain pool, password-like patterns.
    fn redact(&self, text: &str) -> String {
        pool_core::redact::redact(text)
    }
}

impl<M> RetryablePool for r2d2::Pool<M>
where
    M: r2d2::ManageConnection,
    M::Connection: Connection,
{
    type Connection = M::Connection;
    type Guard = r2d2::PooledConnection<M>;

    fn checkout(&self) -> Result<Self::Guard, PoolError> {
        self.get().map_err(PoolError::new)
    }

    fn checkout_within(&self, timeout: Duration) -> Result<Self::Guard, PoolError> {
        self.get_timeout(timeout).map_err(PoolError::new)
    }

    fn pool_timeout(&self) -> Duration {
        self.connection_timeout()
    }
}

impl<C: ExtConnection> RetryablePool for ExtPool<C> {
    type Connection = C;
    type Guard = r2d2::PooledConnection<crate::ExtManager<C>>;

    fn checkout(&self) -> Result<Self::Guard, PoolError> {
        self.checkout_within(self.config().pool_timeout)
    }

    fn checkout_within(&self, timeout: Duration) -> Result<Self::Guard, PoolError> {
        self.get_timeout(timeout).map_err(|e| {
            PoolError::new(format_args!(
                "pool {}: {}",
                self.config().name,
                self.state().redact(&e.to_string())
            ))
        })
    }

    fn redact(&self, text: &str) -> String {
        self.state().redact(text)
    }

    fn pool_timeout(&self) -> Duration {
        self.config().pool_timeout
    }

    fn hooks(&self) -> RetryHooks<'_> {
        self.state().retry_hooks()
    }

    fn pooler(&self) -> Pooler {
        self.config().connect.pooler
    }
}

/// What [`commit_with_retry`] and [`commit_with_key`] need from a backend. Implemented for the
/// connection types the crate supports.
pub trait RetryConnection: Connection {
    /// The current transaction's id, or `None` if the backend has none to offer.
    fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>>;

    /// What became of transaction `txid`, asked on another connection.
    fn txid_status(&mut self, txid: i64) -> diesel::QueryResult<TxStatus>;

    /// Inserts `key` into the idempotency table `table` ([`IdempotencyTable`]); returns the
    /// inserting transaction's id (the row's `xmin`) where the backend has one.
    fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>>;

    /// The id of the transaction that committed `key`'s row (its `xmin`), where the backend
    /// has one; `None` otherwise, or if there is no such row.
    fn idempotency_key_owner(
        &mut self,
        _table: &IdempotencyTable,
        _key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        Ok(None)
    }

    /// Behind a transaction-mode pooler: the current transaction's id and the identity of
    /// the server running it, in one round trip; `None` if the backend has no transaction
    /// ids.
    fn current_txid_and_server(&mut self) -> diesel::QueryResult<Option<(i64, String)>> {
        Ok(None)
    }

    /// Behind a transaction-mode pooler: what became of transaction `txid`, if the server
    /// answering is `server` and not a standby; `None` when it is not (the answer would be a
    /// guess).
    fn txid_status_on(
        &mut self,
        _txid: i64,
        _server: &str,
    ) -> diesel::QueryResult<Option<TxStatus>> {
        Ok(None)
    }

    /// Ends transaction `xid` (its 32-bit id) if a session of this role sits idle in it: a
    /// `COMMIT` cut off on the way never reached the server, which would keep the
    /// transaction open (its outcome "in progress") until it noticed the client was gone.
    /// `Ok(true)` if a session was told to end; backends that cannot tell do nothing
    /// (`Ok(false)`). See [`sql::END_ABANDONED`].
    fn end_abandoned(&mut self, _xid: u32) -> diesel::QueryResult<bool> {
        Ok(false)
    }

    /// Inside a transaction: waiting for a lock longer than `limit` fails the statement
    /// instead (PostgreSQL `SET LOCAL lock_timeout`). Backends without a per-transaction
    /// limit rely on their own (SQLite's `busy_timeout`).
    fn limit_lock_wait(&mut self, _limit: Duration) -> diesel::QueryResult<()> {
        Ok(())
    }
}

/// Creates the idempotency table if it does not exist (for applications that do not run the
/// crate's migration). For a table set with `RetryPolicy::builder().idempotency_table(..)`,
/// run `conn.batch_execute(&policy.idempotency_table().create_sql())` instead.
pub fn ensure_idempotency_table<C: Connection>(conn: &mut C) -> diesel::QueryResult<()> {
    conn.batch_execute(IDEMPOTENCY_TABLE_SQL)
}

#[cfg(feature = "postgres")]
impl RetryConnection for diesel::PgConnection {
    fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>> {
        use diesel::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            sql::TXID_CURRENT,
        ))
        .get_result(self)
        .map(Some)
    }

    fn txid_status(&mut self, txid: i64) -> diesel::QueryResult<TxStatus> {
        use diesel::sql_types::{BigInt, Nullable, Text};
        use diesel::RunQueryDsl;
        let status: Option<String> = diesel::select(
            diesel::dsl::sql::<Nullable<Text>>(&format!("{}(", sql::TXID_STATUS))
                .bind::<BigInt, _>(txid)
                .sql(")"),
        )
        .get_result(self)?;
        Ok(TxStatus::from_txid_status(status.as_deref()))
    }

    fn current_txid_and_server(&mut self) -> diesel::QueryResult<Option<(i64, String)>> {
        use diesel::sql_types::{BigInt, Text};
        use diesel::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<(BigInt, Text)>(&format!(
            "{}, {}",
            sql::TXID_CURRENT,
            sql::SERVER_IDENTITY
        )))
        .get_result(self)
        .map(Some)
    }

    fn txid_status_on(&mut self, txid: i64, server: &str) -> diesel::QueryResult<Option<TxStatus>> {
        use diesel::sql_types::{BigInt, Bool, Nullable, Text};
        use diesel::RunQueryDsl;
        let (status, answering, standby): (Option<String>, String, bool) = diesel::select(
            diesel::dsl::sql::<(Nullable<Text>, Text, Bool)>(&format!("{}(", sql::TXID_STATUS))
                .bind::<BigInt, _>(txid)
                .sql(&format!("), {}", sql::TXID_STATUS_ON_SERVER)),
        )
        .get_result(self)?;
        Ok(
            (answering == server && !standby)
                .then(|| TxStatus::from_txid_status(status.as_deref())),
        )
    }

    fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel::RunQueryDsl;
        let row: diesel_ext_common::resolve::XminRow =
            diesel::sql_query(table.insert_returning_xmin_sql_pg())
                .bind::<diesel::sql_types::Text, _>(key)
                .get_result(self)?;
        Ok(row.id())
    }

    fn idempotency_key_owner(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel::{OptionalExtension, RunQueryDsl};
        let row: Option<diesel_ext_common::resolve::XminRow> =
            diesel::sql_query(table.xmin_sql_pg())
                .bind::<diesel::sql_types::Text, _>(key)
                .get_result(self)
                .optional()?;
        Ok(row.and_then(|r| r.id()))
    }

    fn end_abandoned(&mut self, xid: u32) -> diesel::QueryResult<bool> {
        use diesel::RunQueryDsl;
        let row: diesel_ext_common::resolve::EndedRow = diesel::sql_query(sql::END_ABANDONED)
            .bind::<diesel::sql_types::Text, _>(xid.to_string())
            .get_result(self)?;
        Ok(row.ended > 0)
    }

    fn limit_lock_wait(&mut self, limit: Duration) -> diesel::QueryResult<()> {
        use diesel::connection::SimpleConnection;
        self.batch_execute(&sql::lock_timeout(limit))
    }
}

#[cfg(feature = "sqlite")]
impl RetryConnection for diesel::SqliteConnection {
    fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>> {
        Ok(None)
    }

    fn txid_status(&mut self, _txid: i64) -> diesel::QueryResult<TxStatus> {
        Ok(TxStatus::Unknown)
    }

    fn insert_idempotency_key(
        &mut self,
        table: &IdempotencyTable,
        key: &str,
    ) -> diesel::QueryResult<Option<u32>> {
        use diesel::RunQueryDsl;
        diesel::sql_query(table.insert_sql_sqlite())
            .bind::<diesel::sql_types::Text, _>(key)
            .execute(self)
            .map(|_| None)
    }
}

/// Runs `op` with a fresh connection per attempt, retrying transient failures.
///
/// `op` is not wrapped in a transaction. A statement that was cut off by a lost connection is
/// retried, and with autocommit it may already have taken effect: use this for reads and
/// idempotent writes, and [`commit_with_retry`] for everything else.
pub fn with_retry<P, T, E, F>(pool: &P, policy: &RetryPolicy, mut op: F) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    F: FnMut(&mut P::Connection) -> Result<T, E>,
    E: Classify + Display,
{
    retry_checkouts(pool, policy, |_, mut conn| {
        op(&mut conn).map_err(AttemptError::Op)
    })
}

/// The retry loop with a fresh checkout per attempt, reported through the pool's hooks.
fn retry_checkouts<P, T, E>(
    pool: &P,
    policy: &RetryPolicy,
    mut attempt: impl FnMut(&RetryHooks<'_>, P::Guard) -> Result<T, AttemptError<E>>,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    E: Classify + Display,
{
    let hooks = pool.hooks();
    let started = std::time::Instant::now();
    run_sync(
        policy,
        &hooks,
        |e: &E| e.class_for(DRIVER),
        |_attempt| {
            // A checkout never outlasts what is left of the loop's own `max_elapsed`.
            let timeout = policy.max_elapsed().map_or(pool.pool_timeout(), |limit| {
                pool.pool_timeout()
                    .min(limit.saturating_sub(started.elapsed()))
            });
            let guard = pool.checkout_within(timeout).map_err(AttemptError::Pool)?;
            attempt(&hooks, guard)
        },
    )
}

/// Runs `body` inside a transaction, commits, and retries the whole transaction on transient
/// failures; never commits twice (see the [module documentation](self)).
///
/// `body` is `FnMut` because it **may run more than once**: it must not have side effects
/// outside the database that cannot be repeated. To run at another isolation level, make
/// `SET TRANSACTION ISOLATION LEVEL ...` its first statement.
pub fn commit_with_retry<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    mut body: F,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
    F: FnMut(&mut P::Connection) -> Result<T, E>,
    E: From<DieselError> + Classify + Display,
{
    // Behind a transaction-mode pooler the connection that answers `txid_status()` may be
    // on another server than the one that ran the transaction: its identity is read with
    // the id, and an answer from anywhere else is not taken.
    let pooled = pool.pooler().is_transaction_mode();
    run_transactions(
        pool,
        policy,
        |conn| {
            let value = run_body(conn, &mut body)?;
            let txid = match (policy.verify_commit(), pooled) {
                (false, _) => Ok(None),
                (true, false) => conn.current_txid().map(|id| id.map(Txid::direct)),
                (true, true) => conn.current_txid_and_server().map(|id| {
                    id.map(|(id, server)| Txid {
                        id,
                        server: Some(server),
                    })
                }),
            }
            .map_err(|e| abandon(conn, e.into()))?;
            Ok(Prepared::Commit {
                value,
                txid,
                key_owner: None,
            })
        },
        |txid, _| match txid {
            None => Err(no_txid_reason(policy.verify_commit())),
            Some(Txid { id, server: None }) => resolve_by_txid(pool, policy, *id),
            Some(Txid {
                id,
                server: Some(server),
            }) => resolve_by_txid_on(pool, policy, *id, server),
        },
        || None,
    )
}

/// Like [`commit_with_retry`], for any backend: inserts `key` into the idempotency table
/// (`migrations/`, or [`ensure_idempotency_table`]; the policy's [`IdempotencyTable`], whose
/// rustdoc shows the SQL) in the same transaction, so that a commit cut off by a lost
/// connection is resolved by looking the key up, and a call repeated with the same key (say,
/// by a job runner after a crash) does nothing. Keys are at most
/// [`MAX_IDEMPOTENCY_KEY_CHARS`] characters (an empty or longer key is refused before any
/// round trip, as [`RetryError::Permanent`]) and share one table: namespace them by what
/// they guard (`webhook:stripe:evt_...`).
///
/// Resolution inserts the key again on a fresh connection: if the cut-off transaction is
/// still running, the insert waits on its lock, so the answer is never read too early.
pub fn commit_with_key<P, T, E, F>(
    pool: &P,
    policy: &RetryPolicy,
    key: &str,
    mut body: F,
) -> Result<Keyed<T>, RetryError<E>>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
    F: FnMut(&mut P::Connection) -> Result<T, E>,
    E: From<DieselError> + Classify + Display,
{
    if let Err(reason) = pool_core::retry::check_idempotency_key(key) {
        return Err(RetryError::Permanent(
            DieselError::QueryBuilderError(reason.into()).into(),
        ));
    }
    let table = policy.idempotency_table();
    run_transactions(
        pool,
        policy,
        |conn| {
            let mut ours = None;
            let value = run_body(conn, &mut |conn: &mut P::Connection| match conn
                .insert_idempotency_key(table, key)
            {
                Ok(xmin) => {
                    ours = xmin;
                    body(conn).map(Keyed::Committed)
                }
                Err(e) if is_unique_violation(&e) => Ok(Keyed::AlreadyCommitted),
                Err(e) => Err(e.into()),
            })?;
            if matches!(value, Keyed::AlreadyCommitted) {
                let _ = rollback(conn);
                return Ok(Prepared::Done(Keyed::AlreadyCommitted));
            }
            Ok(Prepared::Commit {
                value,
                txid: None,
                key_owner: ours,
            })
        },
        |_, ours| resolve_by_key(pool, policy, key, ours),
        || Some(Keyed::AlreadyCommitted),
    )
}

/// A transaction's id, read before `COMMIT`, and (behind a transaction-mode pooler) the
/// identity of the server that ran it.
struct Txid {
    id: i64,
    server: Option<String>,
}

impl Txid {
    fn direct(id: i64) -> Txid {
        Txid { id, server: None }
    }
}

/// What an attempt's preparation left to do.
enum Prepared<T> {
    /// The body ran inside an open transaction: commit it. `key_owner`: for
    /// `commit_with_key`, the transaction's id as its key's row has it (PostgreSQL).
    Commit {
        value: T,
        txid: Option<Txid>,
        key_owner: Option<u32>,
    },
    /// Nothing to commit (the transaction was rolled back); return this.
    Done(T),
}

/// The retry loop around one transaction per attempt: `prepare` opens the transaction and
/// runs the body; this commits, and if the connection is lost during `COMMIT`, asks `resolve`
/// what became of the transaction.
fn run_transactions<P, T, E>(
    pool: &P,
    policy: &RetryPolicy,
    mut prepare: impl FnMut(&mut P::Connection) -> Result<Prepared<T>, AttemptError<E>>,
    resolve: impl Fn(Option<&Txid>, Option<u32>) -> Result<Resolved, String>,
    elsewhere: impl Fn() -> Option<T>,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    E: From<DieselError> + Classify + Display,
{
    retry_checkouts(pool, policy, |hooks, mut guard| {
        let (value, txid, key_owner) = match prepare(&mut guard)? {
            Prepared::Done(value) => return Ok(value),
            Prepared::Commit {
                value,
                txid,
                key_owner,
            } => (value, txid, key_owner),
        };
        let Err(commit_error) = commit(&mut *guard) else {
            return Ok(value);
        };
        // Only a lost connection leaves the outcome open; a serialization failure or
        // deadlock reported by COMMIT itself is a definite rollback.
        if !classify_diesel(&commit_error).is_disconnect() {
            return Err(AttemptError::Op(commit_error.into()));
        }
        drop(guard);
        let resolved = resolve(txid.as_ref(), key_owner);
        finish_ambiguous(
            hooks,
            commit_error,
            txid.map(|t| t.id),
            resolved,
            value,
            &elsewhere,
        )
    })
}

fn begin<C: Connection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::begin_transaction(conn)
}

fn commit<C: Connection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::commit_transaction(conn)
}

fn rollback<C: Connection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::rollback_transaction(conn)
}

/// `BEGIN`, then the body; on the body's failure, rolls back and reports it.
fn run_body<C, T, E>(
    conn: &mut C,
    body: &mut impl FnMut(&mut C) -> Result<T, E>,
) -> Result<T, AttemptError<E>>
where
    C: Connection,
    E: From<DieselError>,
{
    begin(conn).map_err(|e| AttemptError::Op(e.into()))?;
    body(conn).map_err(|e| abandon(conn, e))
}

/// Rolls back after a failure before `COMMIT`: the transaction did not commit, so `e` is a
/// plain attempt error. A failed rollback leaves the connection marked broken by Diesel's
/// transaction manager, and the pool discards it at checkin.
fn abandon<C: Connection, E>(conn: &mut C, e: E) -> AttemptError<E> {
    let _ = rollback(conn);
    AttemptError::Op(e)
}

/// Asks fresh connections what became of `txid` until the answer is final or the policy's
/// resolution time is up.
fn resolve_by_txid<P>(pool: &P, policy: &RetryPolicy, txid: i64) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    let hooks = pool.hooks();
    poll_until(pool, policy, |conn: &mut P::Connection, _left| {
        let status = conn.txid_status(txid)?;
        if status == TxStatus::InProgress {
            // Still open: if its session sits idle in it, the COMMIT never arrived. Ending
            // it decides the outcome (aborted, unless the COMMIT got in first), which the
            // next question reads.
            end_abandoned(pool, &hooks, conn, xid_of(txid));
        }
        Ok(status.answer(txid))
    })
}

/// Asks the server to end the transaction `xid` if its session sits idle in it
/// ([`RetryConnection::end_abandoned`]); what that came to is logged, never the resolution's
/// error (a role without the right to end it leaves the resolution as it was).
fn end_abandoned<P>(pool: &P, hooks: &RetryHooks<'_>, conn: &mut P::Connection, xid: u32)
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    let outcome = conn
        .end_abandoned(xid)
        .map_err(|e| pool.redact(&e.to_string()));
    log_abandoned_ended(hooks, xid, outcome);
}

/// [`resolve_by_txid`] behind a transaction-mode pooler: an answer counts only from `server`
/// (the one that ran the transaction) and not from a standby; from anywhere else the commit
/// stays ambiguous.
fn resolve_by_txid_on<P>(
    pool: &P,
    policy: &RetryPolicy,
    txid: i64,
    server: &str,
) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    poll_until(pool, policy, |conn: &mut P::Connection, _left| {
        Ok(match conn.txid_status_on(txid, server)? {
            Some(status) => status.answer(txid),
            None => Asked::Final(other_server_reason(txid)),
        })
    })
}

/// Inserts the key again in a throwaway transaction: success means the cut-off transaction
/// did not commit (the probe is rolled back); a unique violation means a transaction with
/// the key did, and the row's `xmin` against `ours` (the cut-off transaction's id, where
/// the backend has one) says whether it was this one or a concurrent call with the same key.
fn resolve_by_key<P>(
    pool: &P,
    policy: &RetryPolicy,
    key: &str,
    ours: Option<u32>,
) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    let table = policy.idempotency_table();
    let hooks = pool.hooks();
    // Behind a transaction-mode pooler the question may reach another server, where the
    // same 32-bit id is another transaction: nothing is ended there.
    let end = ours.filter(|_| !pool.pooler().is_transaction_mode());
    poll_until(pool, policy, |conn: &mut P::Connection, left| {
        // The cut-off transaction may sit idle with the key's lock, its COMMIT lost on the
        // way: ended, it can never commit, and the probe below gets the lock at once.
        if let Some(xid) = end {
            end_abandoned(pool, &hooks, conn, xid);
        }
        begin(conn)?;
        // The cut-off transaction may still hold the key's lock: wait for it only as long as
        // the resolution may take.
        let probe = conn
            .limit_lock_wait(left)
            .and_then(|()| conn.insert_idempotency_key(table, key).map(drop));
        let _ = rollback(conn);
        match key_probe_answer(probe)? {
            Asked::Answer(Resolved::Committed) if ours.is_some() => Ok(Asked::Answer(key_owner(
                ours,
                conn.idempotency_key_owner(table, key)?,
            ))),
            other => Ok(other),
        }
    })
}

/// Asks fresh connections until an answer or the policy's resolution time is up: every
/// checkout is bounded by what is left of it, and `ask` is told how much that is.
fn poll_until<P>(
    pool: &P,
    policy: &RetryPolicy,
    mut ask: impl FnMut(&mut P::Connection, Duration) -> QueryResult<Asked>,
) -> Result<Resolved, String>
where
    P: RetryablePool,
{
    let mut resolution = Resolution::start(policy);
    loop {
        let left = resolution.left();
        let outcome = match pool.checkout_within(left) {
            Ok(mut conn) => asked(ask(&mut conn, left), classify_diesel, |text| {
                pool.redact(text)
            }),
            Err(e) => Asked::NoConnection(e.message),
        };
        match resolution.after(outcome) {
            Step::Done(resolved) => return resolved,
            Step::Wait(pause) => std::thread::sleep(pause),
        }
    }
}
