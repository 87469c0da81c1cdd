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
//!   `commit_resolution_timeout`. Only when the answer cannot be had does it return
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
use std::time::{Duration, Instant};

use diesel::connection::{Connection, TransactionManager};
use diesel::result::Error as DieselError;
use pool_core::retry::{run_sync, AttemptError, RetryHooks};
pub use pool_core::retry::{PolicyError, PoolError, RetryError, RetryPolicy};

use crate::classify::{classify_diesel, Classify};
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

    /// Where attempts are reported (pool name, stats, listener).
    fn hooks(&self) -> RetryHooks<'_> {
        RetryHooks::default()
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

    fn hooks(&self) -> RetryHooks<'_> {
        let state = self.state();
        RetryHooks {
            pool: state.name(),
            stats: Some(state.stats()),
            listener: &**state,
        }
    }
}

/// What the server says became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// It committed.
    Committed,
    /// It rolled back (or its session died before `COMMIT`).
    Aborted,
    /// It is still running: ask again.
    InProgress,
    /// The server no longer knows (the id is too old, or the backend cannot tell).
    Unknown,
}

/// What [`commit_with_retry`] and [`commit_with_key`] need from a backend. Implemented for the
/// connection types the crate supports.
pub trait RetryConnection: Connection {
    /// The current transaction's id, or `None` if the backend has none to offer.
    fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>>;

    /// What became of transaction `txid`, asked on another connection.
    fn txid_status(&mut self, txid: i64) -> diesel::QueryResult<TxStatus>;

    /// Inserts `key` into the idempotency table ([`IDEMPOTENCY_TABLE_SQL`]).
    fn insert_idempotency_key(&mut self, key: &str) -> diesel::QueryResult<()>;

    /// Inside a transaction: waiting for a lock longer than `limit` fails the statement
    /// instead (PostgreSQL `SET LOCAL lock_timeout`). Backends without a per-transaction
    /// limit rely on their own (SQLite's `busy_timeout`).
    fn limit_lock_wait(&mut self, _limit: Duration) -> diesel::QueryResult<()> {
        Ok(())
    }
}

/// The idempotency table, as `migrations/` creates it (PostgreSQL, SQLite and MySQL accept it).
pub const IDEMPOTENCY_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS resilient_diesel_idempotency_keys (\
     idempotency_key VARCHAR(255) PRIMARY KEY, \
     created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// Creates the idempotency table if it does not exist (for applications that do not run the
/// crate's migration).
pub fn ensure_idempotency_table<C: Connection>(conn: &mut C) -> diesel::QueryResult<()> {
    conn.batch_execute(IDEMPOTENCY_TABLE_SQL)
}

#[cfg(feature = "postgres")]
impl RetryConnection for diesel::PgConnection {
    fn current_txid(&mut self) -> diesel::QueryResult<Option<i64>> {
        use diesel::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "txid_current()",
        ))
        .get_result(self)
        .map(Some)
    }

    fn txid_status(&mut self, txid: i64) -> diesel::QueryResult<TxStatus> {
        use diesel::sql_types::{BigInt, Nullable, Text};
        use diesel::RunQueryDsl;
        let status: Option<String> = diesel::select(
            diesel::dsl::sql::<Nullable<Text>>("txid_status(")
                .bind::<BigInt, _>(txid)
                .sql(")"),
        )
        .get_result(self)?;
        Ok(match status.as_deref() {
            Some("committed") => TxStatus::Committed,
            Some("aborted") => TxStatus::Aborted,
            Some("in progress") => TxStatus::InProgress,
            _ => TxStatus::Unknown,
        })
    }

    fn insert_idempotency_key(&mut self, key: &str) -> diesel::QueryResult<()> {
        use diesel::RunQueryDsl;
        diesel::sql_query(
            "INSERT INTO resilient_diesel_idempotency_keys (idempotency_key) VALUES ($1)",
        )
        .bind::<diesel::sql_types::Text, _>(key)
        .execute(self)
        .map(drop)
    }

    fn limit_lock_wait(&mut self, limit: Duration) -> diesel::QueryResult<()> {
        use diesel::connection::SimpleConnection;
        let ms = limit.as_millis().clamp(1, i32::MAX as u128);
        self.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))
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

    fn insert_idempotency_key(&mut self, key: &str) -> diesel::QueryResult<()> {
        use diesel::RunQueryDsl;
        diesel::sql_query(
            "INSERT INTO resilient_diesel_idempotency_keys (idempotency_key) VALUES (?)",
        )
        .bind::<diesel::sql_types::Text, _>(key)
        .execute(self)
        .map(drop)
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
    run_sync(
        policy,
        &hooks,
        |e: &E| e.class(),
        |_attempt| {
            let guard = pool.checkout().map_err(AttemptError::Pool)?;
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
    run_transactions(
        pool,
        policy,
        |conn| {
            let value = run_body(conn, &mut body)?;
            let txid = if policy.verify_commit() {
                conn.current_txid().map_err(|e| abandon(conn, e.into()))?
            } else {
                None
            };
            Ok(Prepared::Commit { value, txid })
        },
        |txid| match txid {
            None if !policy.verify_commit() => Err("commit verification is off".to_owned()),
            None => Err("this backend has no transaction ids; use commit_with_key".to_owned()),
            Some(txid) => resolve_by_txid(pool, policy, txid),
        },
    )
}

/// What [`commit_with_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyed<T> {
    /// The transaction committed now (possibly after retries); the closure's result.
    Committed(T),
    /// A transaction with this key had committed before this call; nothing was run.
    AlreadyCommitted,
}

/// Like [`commit_with_retry`], for any backend: inserts `key` into the idempotency table
/// (`migrations/`, or [`ensure_idempotency_table`]) in the same transaction, so that a commit
/// cut off by a lost connection is resolved by looking the key up, and a call repeated with
/// the same key (say, by a job runner after a crash) does nothing.
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
    run_transactions(
        pool,
        policy,
        |conn| {
            let value = run_body(conn, &mut |conn: &mut P::Connection| match conn
                .insert_idempotency_key(key)
            {
                Ok(()) => body(conn).map(Keyed::Committed),
                Err(e) if is_unique_violation(&e) => Ok(Keyed::AlreadyCommitted),
                Err(e) => Err(e.into()),
            })?;
            if matches!(value, Keyed::AlreadyCommitted) {
                let _ = rollback(conn);
                return Ok(Prepared::Done(Keyed::AlreadyCommitted));
            }
            Ok(Prepared::Commit { value, txid: None })
        },
        |_| resolve_by_key(pool, policy, key),
    )
}

/// What an attempt's preparation left to do.
enum Prepared<T> {
    /// The body ran inside an open transaction: commit it.
    Commit { value: T, txid: Option<i64> },
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
    resolve: impl Fn(Option<i64>) -> Result<Resolved, String>,
) -> Result<T, RetryError<E>>
where
    P: RetryablePool,
    E: From<DieselError> + Classify + Display,
{
    retry_checkouts(pool, policy, |hooks, mut guard| {
        let (value, txid) = match prepare(&mut guard)? {
            Prepared::Done(value) => return Ok(value),
            Prepared::Commit { value, txid } => (value, txid),
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
        finish_ambiguous(hooks, commit_error, txid, resolve(txid), value)
    })
}

fn is_unique_violation(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
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

/// How an ambiguous commit was resolved.
enum Resolved {
    Committed,
    Aborted,
}

/// Turns a `COMMIT` cut off by a lost connection into the attempt's outcome.
fn finish_ambiguous<T, E>(
    hooks: &RetryHooks<'_>,
    commit_error: DieselError,
    txid: Option<i64>,
    resolution: Result<Resolved, String>,
    value: T,
) -> Result<T, AttemptError<E>>
where
    E: From<DieselError>,
{
    match resolution {
        Ok(Resolved::Committed) => {
            if let Some(stats) = hooks.stats {
                stats.record_commit_resolved();
            }
            log::warn!(
                target: pool_core::events::LOG_TARGET,
                "pool {}: connection lost during COMMIT; the server confirms the transaction committed",
                hooks.pool
            );
            Ok(value)
        }
        Ok(Resolved::Aborted) => Err(AttemptError::Op(commit_error.into())),
        Err(reason) => Err(AttemptError::AmbiguousCommit {
            error: commit_error.into(),
            txid,
            reason,
        }),
    }
}

/// Asks fresh connections what became of `txid` until the answer is final or the policy's
/// resolution time is up.
fn resolve_by_txid<P>(pool: &P, policy: &RetryPolicy, txid: i64) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    poll_until(
        policy,
        |conn: &mut P::Connection, _left: Duration| match conn.txid_status(txid)? {
            TxStatus::Committed => Ok(Some(Resolved::Committed)),
            TxStatus::Aborted => Ok(Some(Resolved::Aborted)),
            TxStatus::InProgress => Ok(None),
            TxStatus::Unknown => Err(ProbeError::Final(format!(
                "the server no longer knows transaction {txid}"
            ))),
        },
        pool,
    )
}

/// Inserts the key again in a throwaway transaction: a unique violation means the cut-off
/// transaction committed; success means it did not (the probe is rolled back).
fn resolve_by_key<P>(pool: &P, policy: &RetryPolicy, key: &str) -> Result<Resolved, String>
where
    P: RetryablePool,
    P::Connection: RetryConnection,
{
    poll_until(
        policy,
        |conn: &mut P::Connection, left: Duration| {
            begin(conn)?;
            // The cut-off transaction may still hold the key's lock: wait for it only as
            // long as the resolution may take.
            let probe = conn
                .limit_lock_wait(left)
                .and_then(|()| conn.insert_idempotency_key(key));
            let _ = rollback(conn);
            match probe {
                Ok(()) => Ok(Some(Resolved::Aborted)),
                Err(e) if is_unique_violation(&e) => Ok(Some(Resolved::Committed)),
                Err(e) => Err(e.into()),
            }
        },
        pool,
    )
}

/// Errors while resolving: a transient database error is asked again, a `Final` one is not.
enum ProbeError {
    Db(DieselError),
    Final(String),
}

impl From<DieselError> for ProbeError {
    fn from(e: DieselError) -> Self {
        ProbeError::Db(e)
    }
}

fn poll_until<P, R>(
    policy: &RetryPolicy,
    mut probe: impl FnMut(&mut P::Connection, Duration) -> Result<Option<R>, ProbeError>,
    pool: &P,
) -> Result<R, String>
where
    P: RetryablePool,
{
    let deadline = Instant::now() + policy.commit_resolution_timeout();
    let mut wait = Duration::from_millis(20);
    let mut last;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match pool.checkout_within(left.max(Duration::from_millis(1))) {
            Ok(mut conn) => match probe(&mut conn, left) {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => last = "the transaction was still in progress".into(),
                Err(ProbeError::Final(reason)) => return Err(reason),
                Err(ProbeError::Db(e)) if classify_diesel(&e).is_transient() => {
                    last = pool.redact(&e.to_string());
                }
                Err(ProbeError::Db(e)) => {
                    return Err(format!(
                        "asking the server failed: {}",
                        pool.redact(&e.to_string())
                    ))
                }
            },
            Err(e) => last = e.message,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "no answer within {:?} ({last})",
                policy.commit_resolution_timeout()
            ));
        }
        std::thread::sleep(wait.min(deadline - now));
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_table_sql_names_the_table_the_inserts_use() {
        assert!(IDEMPOTENCY_TABLE_SQL.contains("resilient_diesel_idempotency_keys"));
        assert!(IDEMPOTENCY_TABLE_SQL.contains("idempotency_key"));
    }
}
