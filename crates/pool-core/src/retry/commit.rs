//! Resolving a `COMMIT` cut off by a lost connection: what both adapters' `commit_with_retry`
//! and `commit_with_key` share.
//!
//! When the connection is lost while `COMMIT` is in flight, the transaction may have
//! committed. The adapter asks fresh connections what became of it (`txid_status()` of the id
//! read before `COMMIT`, or the idempotency key inserted again), each question bounded by what
//! is left of the policy's `commit_resolution_timeout`. A [`Resolution`] keeps that
//! bookkeeping: the deadline, the pause between questions (20 ms, doubling up to 500 ms) and
//! the last reason there was no answer; the adapter checks out, asks, and sleeps with its own
//! timer. [`finish_ambiguous`] turns the answer into the attempt's outcome.
//!
//! ```
//! use std::time::Duration;
//! use pool_core::retry::{Asked, Resolution, Resolved, RetryPolicy, Step, TxStatus};
//!
//! let policy = RetryPolicy::builder()
//!     .commit_resolution_timeout(Duration::from_millis(50))
//!     .build()?;
//! let mut resolution = Resolution::start(&policy);
//! let answers = [Some("in progress"), Some("committed")];
//! let mut answers = answers.iter();
//! let outcome = loop {
//!     // An adapter checks a connection out within `resolution.left()` and asks the server.
//!     let asked = match answers.next() {
//!         Some(text) => TxStatus::from_txid_status(*text).answer(7),
//!         None => Asked::NoConnection("pool timed out".into()),
//!     };
//!     match resolution.after(asked) {
//!         Step::Done(outcome) => break outcome,
//!         Step::Wait(pause) => std::thread::sleep(pause),
//!     }
//! };
//! assert_eq!(outcome, Ok(Resolved::Committed));
//! # Ok::<(), pool_core::retry::PolicyError>(())
//! ```

use std::time::{Duration, Instant};

use super::{AttemptError, RetryHooks, RetryPolicy};
use crate::classify::ErrorClass;

/// The idempotency table, as the repository's `migrations/` creates it (PostgreSQL, SQLite
/// and MySQL accept it).
pub const IDEMPOTENCY_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS resilient_diesel_idempotency_keys (\
     idempotency_key VARCHAR(255) PRIMARY KEY, \
     created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";

/// The longest idempotency key `commit_with_key` accepts, in characters: the key column is
/// `VARCHAR(255)`. Keys share one table across the application: namespace them by what
/// they guard (`webhook:stripe:evt_1NXa...`, `job:send-invoice:4711`).
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// Why `key` cannot be an idempotency key (empty, or longer than
/// [`MAX_IDEMPOTENCY_KEY_CHARS`]); the key itself is not quoted.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    let chars = key.chars().count();
    if chars == 0 {
        return Err("the idempotency key is empty; give each operation its own key".to_owned());
    }
    if chars > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(format!(
            "the idempotency key is {chars} characters long; the limit is \
             {MAX_IDEMPOTENCY_KEY_CHARS} (hash a longer natural key)"
        ));
    }
    Ok(())
}

/// The table `commit_with_key` records its keys in: `resilient_diesel_idempotency_keys` by
/// default, or a name set with
/// [`RetryPolicyBuilder::idempotency_table`](super::RetryPolicyBuilder::idempotency_table)
/// (`table` or `schema.table`: lowercase letters, digits and `_`, not starting with a digit,
/// at most 63 bytes each, so it is never quoted and never an injection).
///
/// Its SQL, for PostgreSQL, SQLite and MySQL alike:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS resilient_diesel_idempotency_keys (
///     idempotency_key VARCHAR(255) PRIMARY KEY,
///     created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)
/// -- in the transaction of commit_with_key, before its body:
/// INSERT INTO resilient_diesel_idempotency_keys (idempotency_key) VALUES ($1)
/// ```
///
/// A unique violation on that insert means the key was committed before: the body is not
/// run. Rows are never deleted by the library; prune old ones by `created_at` when the
/// operations they guard can no longer be repeated.
///
/// ```
/// use pool_core::retry::IdempotencyTable;
/// let table = IdempotencyTable::new("billing.webhook_keys")?;
/// assert!(table.create_sql().starts_with("CREATE TABLE IF NOT EXISTS billing.webhook_keys ("));
/// assert!(IdempotencyTable::new("keys; DROP TABLE users").is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyTable {
    name: String,
}

impl Default for IdempotencyTable {
    fn default() -> Self {
        IdempotencyTable {
            name: IdempotencyTable::DEFAULT.to_owned(),
        }
    }
}

impl IdempotencyTable {
    /// The default table's name.
    pub const DEFAULT: &'static str = "resilient_diesel_idempotency_keys";

    /// A table called `name` (`table` or `schema.table`).
    ///
    /// # Errors
    /// A sentence saying what is wrong with the name, for a name that is not a plain
    /// lowercase SQL identifier (or two, joined by a dot).
    pub fn new(name: &str) -> Result<IdempotencyTable, String> {
        let parts: Vec<&str> = name.split('.').collect();
        let plain = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(format!(
                "{:?} is not a table name this library writes unquoted; use `table` or \
                 `schema.table` in lowercase letters, digits and _ (at most 63 each)",
                crate::redact::redact(name)
            ));
        }
        Ok(IdempotencyTable {
            name: name.to_owned(),
        })
    }

    /// The table's name, as written in the SQL.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `CREATE TABLE IF NOT EXISTS` for this table (PostgreSQL, SQLite and MySQL).
    pub fn create_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\
             idempotency_key VARCHAR(255) PRIMARY KEY, \
             created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
            self.name
        )
    }

    /// PostgreSQL: the insert of a key bound as `$1`.
    pub fn insert_sql_pg(&self) -> String {
        format!("INSERT INTO {} (idempotency_key) VALUES ($1)", self.name)
    }

    /// PostgreSQL: the insert of a key bound as `$1`, returning the inserting transaction's
    /// id as the row's `xmin` (text): how a resolution later tells this transaction's key
    /// from a concurrent one's ([`IdempotencyTable::xmin_sql_pg`]).
    pub fn insert_returning_xmin_sql_pg(&self) -> String {
        format!(
            "INSERT INTO {} (idempotency_key) VALUES ($1) RETURNING xmin::text AS xmin",
            self.name
        )
    }

    /// PostgreSQL: the `xmin` (text) of key `$1`'s row: the id of the transaction that
    /// committed it.
    pub fn xmin_sql_pg(&self) -> String {
        format!(
            "SELECT xmin::text AS xmin FROM {} WHERE idempotency_key = $1",
            self.name
        )
    }

    /// SQLite and MySQL: the insert of a key bound as `?`.
    pub fn insert_sql_sqlite(&self) -> String {
        format!("INSERT INTO {} (idempotency_key) VALUES (?)", self.name)
    }
}

/// The SQL the adapters send to make a commit resolvable and to resolve it.
pub mod sql {
    use std::time::Duration;

    /// PostgreSQL: the current transaction's id (an expression, selected).
    pub const TXID_CURRENT: &str = "txid_current()";

    /// PostgreSQL: the function asked what became of a transaction id; its answer is read
    /// by [`TxStatus::from_txid_status`](super::TxStatus::from_txid_status).
    pub const TXID_STATUS: &str = "txid_status";

    /// PostgreSQL: which server (cluster) runs the statement, as text: its
    /// `system_identifier` (an expression, selected; `pg_control_system()` is executable by
    /// every role by default). Behind a transaction-mode pooler it is read with the
    /// transaction id before `COMMIT` and again with `txid_status()`, whose answer is trusted
    /// only when the two match (see [`TXID_STATUS_ON_SERVER`]).
    pub const SERVER_IDENTITY: &str = "(SELECT system_identifier::text FROM pg_control_system())";

    /// PostgreSQL: the columns selected, after `txid_status($1)`, when resolving behind a
    /// transaction-mode pooler: the answering server's identity ([`SERVER_IDENTITY`]) and
    /// whether it is a standby (whose `txid_status()` lags the primary's).
    pub const TXID_STATUS_ON_SERVER: &str =
        "(SELECT system_identifier::text FROM pg_control_system()), pg_is_in_recovery()";

    /// PostgreSQL: ends the transaction whose 32-bit id is bound as `$1` (text), if a
    /// session of the current role sits idle in it: a `COMMIT` cut off on the way (a
    /// blackholed network) never reached the server, which keeps the transaction open, its
    /// outcome "in progress", until it notices the client is gone (hours with default
    /// settings). Selects how many sessions were told to end (0 or 1).
    ///
    /// The candidates are chosen in a materialized CTE before `pg_terminate_backend` is
    /// called on any row, so no other session is ever signalled. A session that is running
    /// a statement (a `COMMIT` that did arrive) is left alone; ending one idle in the
    /// transaction only decides its outcome, which the next `txid_status()` reads.
    pub const END_ABANDONED: &str = "WITH abandoned AS MATERIALIZED (\
        SELECT pid FROM pg_stat_activity \
        WHERE backend_xid::text = $1 AND state = 'idle in transaction' \
        AND usename = current_user AND pid <> pg_backend_pid()) \
        SELECT count(*) AS ended FROM abandoned WHERE pg_terminate_backend(pid)";

    /// PostgreSQL: inserts the idempotency key bound as `$1`.
    pub const INSERT_KEY_PG: &str =
        "INSERT INTO resilient_diesel_idempotency_keys (idempotency_key) VALUES ($1)";

    /// SQLite: inserts the idempotency key bound as `?`.
    pub const INSERT_KEY_SQLITE: &str =
        "INSERT INTO resilient_diesel_idempotency_keys (idempotency_key) VALUES (?)";

    /// PostgreSQL, inside a transaction: waiting for a lock longer than `limit` (at least
    /// 1 ms) fails the statement instead.
    pub fn lock_timeout(limit: Duration) -> String {
        let ms = limit.as_millis().clamp(1, i32::MAX as u128);
        format!("SET LOCAL lock_timeout = {ms}")
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

impl TxStatus {
    /// Reads PostgreSQL's `txid_status()` answer (`NULL` when it no longer knows).
    pub fn from_txid_status(text: Option<&str>) -> TxStatus {
        match text {
            Some("committed") => TxStatus::Committed,
            Some("aborted") => TxStatus::Aborted,
            Some("in progress") => TxStatus::InProgress,
            _ => TxStatus::Unknown,
        }
    }

    /// What resolution makes of this status of transaction `txid`.
    pub fn answer(self, txid: i64) -> Asked {
        match self {
            TxStatus::Committed => Asked::Answer(Resolved::Committed),
            TxStatus::Aborted => Asked::Answer(Resolved::Aborted),
            TxStatus::InProgress => Asked::InProgress,
            TxStatus::Unknown => {
                Asked::Final(format!("the server no longer knows transaction {txid}"))
            }
        }
    }
}

/// The 32-bit transaction id (`xid`, as `pg_stat_activity.backend_xid` and a row's `xmin`
/// show it) of a 64-bit `txid_current()` value: its low 32 bits (the high ones count
/// wraparounds).
pub fn xid_of(txid: i64) -> u32 {
    (txid as u64 & 0xFFFF_FFFF) as u32
}

/// Why `txid_status()` is not asked behind a transaction-mode pooler: the server connection
/// that would answer is not on the server (cluster) that ran transaction `txid`, or is a
/// standby. Its answer would be a guess: the commit stays ambiguous.
pub fn other_server_reason(txid: i64) -> String {
    format!(
        "behind a transaction-mode pooler, the server connection that would answer \
         txid_status({txid}) is on another server or a standby, whose answer would be a guess; \
         use commit_with_key to make such commits resolvable"
    )
}

/// How an ambiguous commit was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The cut-off transaction committed.
    Committed,
    /// It did not: the attempt failed and may be retried.
    Aborted,
    /// `commit_with_key`: it did not, but another transaction with the same key did (a
    /// concurrent call, say a webhook delivered twice at once, that got the key's lock when
    /// this one's connection died). The call answers `Keyed::AlreadyCommitted`: its own
    /// body's value was rolled back, and running it again would do the work twice.
    CommittedElsewhere,
}

/// Why a commit cannot be resolved without a transaction id: verification is off
/// (`verify_commit` false), or the backend has no transaction ids.
pub fn no_txid_reason(verify_commit: bool) -> String {
    if verify_commit {
        "this backend has no transaction ids; use commit_with_key".to_owned()
    } else {
        "commit verification is off".to_owned()
    }
}

/// What one question during resolution came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// The server's final answer.
    Answer(Resolved),
    /// The transaction is still running: ask again.
    InProgress,
    /// No answer will ever come (the reason); stop asking.
    Final(String),
    /// Asking failed with an error of `class` (its message, redacted): asked again if the
    /// class is transient.
    Failed {
        /// The error's class.
        class: ErrorClass,
        /// The error's message, redacted.
        message: String,
    },
    /// No connection to ask with (the pool's message, redacted).
    NoConnection(String),
    /// The server did not answer within what was left of the resolution time.
    NoReply,
}

/// What to do after a question: stop with the outcome, or wait and ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Resolution is over: the answer, or why there is none.
    Done(Result<Resolved, String>),
    /// Sleep this long, then check out and ask again.
    Wait(Duration),
}

/// The bookkeeping of one commit resolution: its deadline, the pause between questions and
/// the last reason there was no answer.
#[derive(Debug)]
pub struct Resolution {
    limit: Duration,
    deadline: Instant,
    wait: Duration,
    last: String,
}

impl Resolution {
    /// Starts resolving now, for at most the policy's `commit_resolution_timeout`.
    pub fn start(policy: &RetryPolicy) -> Resolution {
        let limit = policy.commit_resolution_timeout();
        Resolution {
            limit,
            deadline: Instant::now() + limit,
            wait: Duration::from_millis(20),
            last: String::new(),
        }
    }

    /// What is left of the resolution time (at least 1 ms): the bound of the next checkout
    /// and of the question asked on it.
    pub fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Takes in a question's outcome: done (an answer, a final reason, a permanent error, or
    /// the time is up), or how long to wait before asking again.
    pub fn after(&mut self, asked: Asked) -> Step {
        self.last = match asked {
            Asked::Answer(answer) => return Step::Done(Ok(answer)),
            Asked::Final(reason) => return Step::Done(Err(reason)),
            Asked::Failed { class, message } if !class.is_transient() => {
                return Step::Done(Err(format!("asking the server failed: {message}")))
            }
            Asked::Failed { message, .. } | Asked::NoConnection(message) => message,
            Asked::InProgress => "the transaction was still in progress".to_owned(),
            Asked::NoReply => "the server did not answer in time".to_owned(),
        };
        let now = Instant::now();
        if now >= self.deadline {
            return Step::Done(Err(format!(
                "no answer within {:?} ({})",
                self.limit, self.last
            )));
        }
        let pause = self.wait.min(self.deadline - now);
        self.wait = (self.wait * 2).min(Duration::from_millis(500));
        Step::Wait(pause)
    }
}

/// Turns a `COMMIT` cut off by a lost connection (`commit_error`) into the attempt's
/// outcome: the body's `value` if the transaction committed (counted in the stats and
/// logged), `elsewhere()` if another transaction with the same idempotency key committed
/// instead ([`Resolved::CommittedElsewhere`]; `None` there counts as committed), the commit
/// error if nothing did, and [`AttemptError::AmbiguousCommit`] if no answer could be had.
pub fn finish_ambiguous<T, D, E>(
    hooks: &RetryHooks<'_>,
    commit_error: D,
    txid: Option<i64>,
    resolution: Result<Resolved, String>,
    value: T,
    elsewhere: impl FnOnce() -> Option<T>,
) -> Result<T, AttemptError<E>>
where
    E: From<D>,
{
    let already = match resolution {
        // Only `commit_with_key` can hear this; for anything else, committed is the answer
        // that never runs the work twice.
        Ok(Resolved::CommittedElsewhere) => elsewhere(),
        Ok(Resolved::Committed) => None,
        Ok(Resolved::Aborted) => return Err(AttemptError::Op(commit_error.into())),
        Err(reason) => {
            return Err(AttemptError::AmbiguousCommit {
                error: commit_error.into(),
                txid,
                reason,
            })
        }
    };
    let (value, event, what) = match already {
        Some(already) => (
            already,
            "commit_elsewhere",
            "the transaction did not commit, another with the same idempotency key did",
        ),
        None => (
            value,
            "commit_confirmed",
            "the server confirms the transaction committed",
        ),
    };
    if let Some(stats) = hooks.stats {
        stats.record_commit_resolved();
    }
    log::warn!(
        target: crate::events::LOG_TARGET,
        pool = hooks.pool,
        event = event;
        "pool {}: connection lost during COMMIT; {what}",
        hooks.pool
    );
    Ok(value)
}

/// Logs what asking the server to end abandoned transaction `xid` came to (see
/// [`sql::END_ABANDONED`]): `Ok(true)` its session was told to end (logged at `warn`, as
/// the resolution's outcome is), `Ok(false)` no session sat idle in it, `Err` the question
/// failed (its message, redacted; logged at `debug`: the resolution goes on asking).
pub fn log_abandoned_ended(hooks: &RetryHooks<'_>, xid: u32, outcome: Result<bool, String>) {
    match outcome {
        Ok(true) => log::warn!(
            target: crate::events::LOG_TARGET,
            pool = hooks.pool,
            event = "abandoned_transaction_ended";
            "pool {}: connection lost during COMMIT, which never reached the server: ended the \
             session left idle in transaction {xid}, so that it can never commit",
            hooks.pool
        ),
        Ok(false) => {}
        Err(error) => log::debug!(
            target: crate::events::LOG_TARGET,
            pool = hooks.pool,
            event = "abandoned_transaction_end_failed",
            error = error.as_str();
            "pool {}: could not end a session left idle in transaction {xid}: {error}",
            hooks.pool
        ),
    }
}

/// What an adapter's `commit_with_key` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyed<T> {
    /// The transaction committed now (possibly after retries); the closure's result.
    Committed(T),
    /// A transaction with this key had committed before this call; nothing was run.
    AlreadyCommitted,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_table_sql_names_the_table_the_inserts_use() {
        assert!(IDEMPOTENCY_TABLE_SQL.contains("resilient_diesel_idempotency_keys"));
        assert!(IDEMPOTENCY_TABLE_SQL.contains("idempotency_key"));
        for insert in [sql::INSERT_KEY_PG, sql::INSERT_KEY_SQLITE] {
            assert!(insert.contains("resilient_diesel_idempotency_keys (idempotency_key)"));
        }
    }

    #[test]
    fn the_default_table_is_the_migrations_table() {
        let t = IdempotencyTable::default();
        assert_eq!(t.create_sql(), IDEMPOTENCY_TABLE_SQL);
        assert_eq!(t.insert_sql_pg(), sql::INSERT_KEY_PG);
        assert_eq!(t.insert_sql_sqlite(), sql::INSERT_KEY_SQLITE);
    }

    #[test]
    fn only_plain_lowercase_names_are_tables() {
        for ok in ["keys", "billing.keys", "_k9", "a_b.c_d"] {
            let t = IdempotencyTable::new(ok).unwrap();
            assert_eq!(t.name(), ok);
            assert!(t.insert_sql_pg().contains(&format!("INTO {ok} (")));
        }
        let long = "k".repeat(64);
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "9keys",
            "Keys",
            "keys;",
            "keys --",
            "k\"eys",
            "ké",
            "a b",
            long.as_str(),
        ] {
            assert!(IdempotencyTable::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(IdempotencyTable::new(&"k".repeat(63)).is_ok());
    }

    #[test]
    fn keys_are_checked_for_length_in_characters() {
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("a").is_ok());
        assert!(
            check_idempotency_key(&"é".repeat(255)).is_ok(),
            "255 characters, 510 bytes"
        );
        let e = check_idempotency_key(&"x".repeat(256)).unwrap_err();
        assert!(e.contains("256") && e.contains("255"), "{e}");
    }

    #[test]
    fn the_small_pieces_say_what_they_mean() {
        assert_eq!(
            sql::lock_timeout(Duration::from_millis(250)),
            "SET LOCAL lock_timeout = 250"
        );
        assert_eq!(
            sql::lock_timeout(Duration::ZERO),
            "SET LOCAL lock_timeout = 1",
            "0 would mean no limit"
        );
        assert!(no_txid_reason(true).contains("commit_with_key"));
        assert!(no_txid_reason(false).contains("verification is off"));
        let other = other_server_reason(42);
        assert!(
            other.contains("txid_status(42)") && other.contains("commit_with_key"),
            "{other}"
        );
        let policy = RetryPolicy::builder()
            .commit_resolution_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let left = Resolution::start(&policy).left();
        assert!(
            left > Duration::from_millis(1500) && left <= Duration::from_secs(2),
            "{left:?}"
        );
    }

    #[test]
    fn a_txids_xid_is_its_low_32_bits() {
        assert_eq!(xid_of(7), 7);
        assert_eq!(xid_of((3 << 32) | 1234), 1234);
        assert_eq!(xid_of((1 << 32) + u32::MAX as i64), u32::MAX);
    }

    #[test]
    fn txid_status_answers_map_to_resolutions() {
        let asked = |text| TxStatus::from_txid_status(text).answer(7);
        assert_eq!(asked(Some("committed")), Asked::Answer(Resolved::Committed));
        assert_eq!(asked(Some("aborted")), Asked::Answer(Resolved::Aborted));
        assert_eq!(asked(Some("in progress")), Asked::InProgress);
        assert_eq!(
            asked(None),
            Asked::Final("the server no longer knows transaction 7".to_owned())
        );
    }

    #[test]
    fn resolution_asks_again_on_transient_failures_until_its_time_is_up() {
        let policy = RetryPolicy::builder()
            .commit_resolution_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let mut resolution = Resolution::start(&policy);
        let permanent = Asked::Failed {
            class: ErrorClass::Permanent,
            message: "syntax error".to_owned(),
        };
        assert_eq!(
            Resolution::start(&policy).after(permanent),
            Step::Done(Err("asking the server failed: syntax error".to_owned()))
        );
        let mut pauses = Vec::new();
        let outcome = loop {
            let lost = Asked::Failed {
                class: ErrorClass::ConnectionLost,
                message: "connection closed".to_owned(),
            };
            match resolution.after(lost) {
                Step::Wait(pause) => {
                    pauses.push(pause);
                    std::thread::sleep(pause);
                }
                Step::Done(outcome) => break outcome,
            }
        };
        assert_eq!(
            outcome,
            Err(format!(
                "no answer within {:?} (connection closed)",
                Duration::from_millis(200)
            ))
        );
        // 20 ms, then doubling (each pause cut short by the deadline).
        assert_eq!(pauses.first(), Some(&Duration::from_millis(20)));
        assert_eq!(pauses.get(1), Some(&Duration::from_millis(40)), "doubled");
        assert!(pauses.windows(2).all(|w| w[1] <= w[0] * 2), "{pauses:?}");
    }
}
