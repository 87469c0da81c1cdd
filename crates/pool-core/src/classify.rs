//! Which database errors are worth another attempt, and which ones say the pool is stale.
//!
//! The adapters map their driver's errors to an [`ErrorClass`]; everything else here (the retry
//! loop, disconnect detection, pool invalidation) works on the class alone. Two entry points do
//! the backend-independent part:
//!
//! * [`classify_sqlstate`] for drivers that report the SQLSTATE (tokio-postgres, MySQL), and
//! * [`classify_message`] for drivers that only hand over the server's or client library's
//!   message — Diesel's `DatabaseErrorKind` has no variant for a deadlock, an administrator
//!   shutdown or "too many clients", so these are recognised from the text PostgreSQL, libpq,
//!   OpenSSL, SQLite and MariaDB really produce (the integration tests provoke each one on a
//!   real server).
//!
//! Only the *primary* message is looked at, never the detail: a detail can quote user data
//! (`Key (name)=(deadlock detected) already exists`), a primary message cannot.
//!
//! ```
//! use pool_core::classify::{classify_message, classify_sqlstate, ErrorClass};
//!
//! assert_eq!(classify_sqlstate("40001"), ErrorClass::SerializationFailure);
//! assert_eq!(classify_message("deadlock detected"), ErrorClass::Deadlock);
//! assert!(classify_message("server closed the connection unexpectedly").is_transient());
//! assert!(!classify_message("duplicate key value violates unique constraint \"ledger_pkey\"")
//!     .is_transient());
//! ```

use serde::Serialize;

/// What kind of failure an error is, as far as retrying and pool health are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorClass {
    /// The transaction lost a serialization conflict (SQLSTATE 40001). Rerunning it is the
    /// documented remedy.
    SerializationFailure,
    /// The transaction was chosen as a deadlock victim (40P01, MySQL 1213).
    Deadlock,
    /// The connection is gone: reset, closed by the server or a middlebox, TLS session ended,
    /// idle-session timeout (SQLSTATE class 08, 57P05 and the client library's own messages).
    ConnectionLost,
    /// The server is shutting down, crashed or not yet accepting connections (57P01-57P03).
    AdminShutdown,
    /// The server has no connection slot left (53300).
    TooManyConnections,
    /// A write reached a read-only server, typically a former primary after a failover (25006).
    /// The pool's connections all point at the wrong server, so it also invalidates the pool.
    ReadOnlyTransaction,
    /// A lock could not be taken in time (SQLite `database is locked`, MySQL 1205, 55P03).
    LockTimeout,
    /// The pool could not hand out a connection within its timeout.
    PoolTimeout,
    /// Anything else: constraint violations, syntax errors, bad input, application errors.
    /// Rerunning would fail the same way.
    Permanent,
}

impl ErrorClass {
    /// Whether rerunning the whole operation on a fresh connection can succeed.
    ///
    /// [`ErrorClass::PoolTimeout`] counts as transient here; a [`RetryPolicy`] can opt out of
    /// retrying it.
    ///
    /// [`RetryPolicy`]: crate::retry::RetryPolicy
    pub fn is_transient(self) -> bool {
        !matches!(self, ErrorClass::Permanent)
    }

    /// Whether the connection that saw this error is gone: it must be closed instead of
    /// pooled again, and a `COMMIT` cut off this way may or may not have happened.
    pub fn is_disconnect(self) -> bool {
        matches!(self, ErrorClass::ConnectionLost | ErrorClass::AdminShutdown)
    }

    /// Whether the pool's other connections are suspect too: a disconnect seen on one
    /// connection usually means a restart, failover or network event that hit them all, so
    /// each is validated before its next use.
    ///
    /// A read-only-transaction error does not by itself: an application's deliberate write in
    /// a `READ ONLY` transaction raises it too. The adapters ask the server whether it became
    /// a standby (a failover) before invalidating.
    pub fn invalidates_pool(self) -> bool {
        self.is_disconnect()
    }

    /// A short stable name, used in logs, events and stats (`serialization_failure`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::SerializationFailure => "serialization_failure",
            ErrorClass::Deadlock => "deadlock",
            ErrorClass::ConnectionLost => "connection_lost",
            ErrorClass::AdminShutdown => "admin_shutdown",
            ErrorClass::TooManyConnections => "too_many_connections",
            ErrorClass::ReadOnlyTransaction => "read_only_transaction",
            ErrorClass::LockTimeout => "lock_timeout",
            ErrorClass::PoolTimeout => "pool_timeout",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a five-character SQLSTATE. Unknown codes are [`ErrorClass::Permanent`].
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        "40001" => ErrorClass::SerializationFailure,
        "40P01" => ErrorClass::Deadlock,
        "57P01" | "57P02" | "57P03" => ErrorClass::AdminShutdown,
        // idle_session_timeout: the server closed the session.
        "57P05" => ErrorClass::ConnectionLost,
        "53300" => ErrorClass::TooManyConnections,
        "25006" => ErrorClass::ReadOnlyTransaction,
        "55P03" => ErrorClass::LockTimeout,
        // idle_in_transaction_session_timeout: the transaction was rolled back, the session
        // closed.
        "25P03" => ErrorClass::ConnectionLost,
        c if c.starts_with("08") => ErrorClass::ConnectionLost,
        _ => ErrorClass::Permanent,
    }
}

/// How a server message is matched: the whole primary message, or its fixed start (the rest
/// names a relation or role), or its fixed start and end.
#[derive(Clone, Copy)]
enum Form {
    Exact(&'static str),
    Prefix(&'static str),
    Around(&'static str, &'static str),
}

impl Form {
    fn matches(self, message: &str) -> bool {
        match self {
            Form::Exact(text) => message == text,
            Form::Prefix(start) => message.starts_with(start),
            Form::Around(start, end) => {
                message.len() >= start.len() + end.len()
                    && message.starts_with(start)
                    && message.ends_with(end)
            }
        }
    }
}

/// The primary messages servers send for the retryable classes, as they send them (lower
/// case; matched against the whole message, never a fragment of it, so that an application's
/// own `RAISE EXCEPTION 'deadlock detected in job 7'` is not taken for a deadlock).
const SERVER_MESSAGES: &[(Form, ErrorClass)] = &[
    // PostgreSQL 12-17.
    (
        Form::Prefix("could not serialize access due to "),
        ErrorClass::SerializationFailure,
    ),
    (Form::Exact("deadlock detected"), ErrorClass::Deadlock),
    (
        Form::Exact("terminating connection due to administrator command"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("terminating connection due to unexpected postmaster exit"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("terminating connection because of crash of another server process"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("terminating connection due to conflict with recovery"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("the database system is shutting down"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("the database system is starting up"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("the database system is in recovery mode"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("the database system is not yet accepting connections"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("terminating connection due to idle-session timeout"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("terminating connection due to idle-in-transaction timeout"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("sorry, too many clients already"),
        ErrorClass::TooManyConnections,
    ),
    (
        Form::Prefix("remaining connection slots are reserved for "),
        ErrorClass::TooManyConnections,
    ),
    (
        Form::Prefix("too many connections for role \""),
        ErrorClass::TooManyConnections,
    ),
    (
        Form::Prefix("too many connections for database \""),
        ErrorClass::TooManyConnections,
    ),
    (
        Form::Around("cannot execute ", " in a read-only transaction"),
        ErrorClass::ReadOnlyTransaction,
    ),
    (
        Form::Prefix("could not obtain lock on "),
        ErrorClass::LockTimeout,
    ),
    (
        Form::Exact("canceling statement due to lock timeout"),
        ErrorClass::LockTimeout,
    ),
    // PgBouncer (seen from 1.18): pooler errors after which it closes the client's
    // connection: `KILL db`, a server connection lost in the middle of a transaction (found
    // dead on reading from it, `server conn crashed?`, or on forwarding the client's next
    // message to it, `server connection closed`), a server restarting under a client
    // (`invalid server parameter`), a server that is down, PgBouncer's own
    // `idle_transaction_timeout` and `SHUTDOWN`.
    (Form::Exact("database removed"), ErrorClass::ConnectionLost),
    (
        Form::Exact("server connection closed"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("idle transaction timeout"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("server shutting down"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("invalid server parameter"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Prefix("server login has been failing, try again later"),
        ErrorClass::AdminShutdown,
    ),
    (
        Form::Exact("server conn crashed?"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("query_wait_timeout"),
        ErrorClass::ConnectionLost,
    ),
    (
        Form::Exact("no more connections allowed (max_client_conn)"),
        ErrorClass::TooManyConnections,
    ),
    // SQLite.
    (Form::Exact("database is locked"), ErrorClass::LockTimeout),
    (
        Form::Prefix("database table is locked"),
        ErrorClass::LockTimeout,
    ),
    // MySQL / MariaDB.
    (
        Form::Exact("deadlock found when trying to get lock; try restarting transaction"),
        ErrorClass::Deadlock,
    ),
    (
        Form::Exact("lock wait timeout exceeded; try restarting transaction"),
        ErrorClass::LockTimeout,
    ),
    (
        Form::Exact("too many connections"),
        ErrorClass::TooManyConnections,
    ),
    (
        Form::Around(
            "the mysql server is running with the --read-only option",
            "",
        ),
        ErrorClass::ReadOnlyTransaction,
    ),
];

/// What client libraries (libpq, OpenSSL, tokio-postgres, the MySQL client) say when the
/// connection itself failed: matched anywhere in the text (lower case), since they wrap it in
/// context (`connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused`).
/// Never applied to a server's message.
const CLIENT_MESSAGES: &[(&str, ErrorClass)] = &[
    (
        "server closed the connection unexpectedly",
        ErrorClass::ConnectionLost,
    ),
    (
        "ssl connection has been closed unexpectedly",
        ErrorClass::ConnectionLost,
    ),
    ("ssl syscall error", ErrorClass::ConnectionLost),
    ("ssl error: unexpected eof", ErrorClass::ConnectionLost),
    (
        "could not receive data from server",
        ErrorClass::ConnectionLost,
    ),
    ("could not send data to server", ErrorClass::ConnectionLost),
    ("no connection to the server", ErrorClass::ConnectionLost),
    ("connection to server was lost", ErrorClass::ConnectionLost),
    ("connection not open", ErrorClass::ConnectionLost),
    (
        "lost synchronization with server",
        ErrorClass::ConnectionLost,
    ),
    ("broken pipe", ErrorClass::ConnectionLost),
    ("connection reset by peer", ErrorClass::ConnectionLost),
    ("connection refused", ErrorClass::ConnectionLost),
    ("connection timed out", ErrorClass::ConnectionLost),
    ("timeout expired", ErrorClass::ConnectionLost),
    ("no route to host", ErrorClass::ConnectionLost),
    ("network is unreachable", ErrorClass::ConnectionLost),
    ("eof detected", ErrorClass::ConnectionLost),
    // tokio-postgres.
    ("connection closed", ErrorClass::ConnectionLost),
    (
        "error communicating with the server",
        ErrorClass::ConnectionLost,
    ),
    // MySQL client.
    ("mysql server has gone away", ErrorClass::ConnectionLost),
    (
        "lost connection to mysql server",
        ErrorClass::ConnectionLost,
    ),
];

/// Classifies a server's primary error message (what `DatabaseErrorInformation::message()`
/// holds for a server error): the whole message must be one the server sends for a retryable
/// class, otherwise the error is [`ErrorClass::Permanent`].
pub fn classify_server_message(message: &str) -> ErrorClass {
    let lower = message.trim().to_lowercase();
    SERVER_MESSAGES
        .iter()
        .find(|(form, _)| form.matches(&lower))
        .map_or(ErrorClass::Permanent, |&(_, class)| class)
}

/// Classifies a client library's text about a failed connection (libpq's error message, an
/// I/O error): the phrases libraries use for a lost or refused connection, anywhere in it.
pub fn classify_client_message(message: &str) -> ErrorClass {
    let lower = message.to_lowercase();
    CLIENT_MESSAGES
        .iter()
        .find(|(needle, _)| lower.contains(needle))
        .map_or(ErrorClass::Permanent, |&(_, class)| class)
}

/// Classifies an error from its text alone, for drivers that expose no SQLSTATE and do not
/// say where the text came from (a libpq connection error, ...): each line, with a severity
/// prefix (`FATAL:  `, `ERROR:  `) removed, as a server message; else the text as a client
/// library's.
///
/// Recognises the messages PostgreSQL 12-17, libpq, OpenSSL, tokio-postgres, SQLite and
/// MariaDB produce for the retryable classes; anything unrecognised is
/// [`ErrorClass::Permanent`], so an unknown error is never retried.
pub fn classify_message(message: &str) -> ErrorClass {
    for line in message.lines() {
        let line = ["FATAL:", "ERROR:", "PANIC:"]
            .iter()
            .find_map(|sev| line.find(sev).map(|i| &line[i + sev.len()..]))
            .unwrap_or(line);
        match classify_server_message(line) {
            ErrorClass::Permanent => {}
            class => return class,
        }
    }
    classify_client_message(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_their_classes() {
        assert_eq!(classify_sqlstate("40001"), ErrorClass::SerializationFailure);
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Deadlock);
        assert_eq!(classify_sqlstate("08006"), ErrorClass::ConnectionLost);
        assert_eq!(classify_sqlstate("08000"), ErrorClass::ConnectionLost);
        for c in ["57P01", "57P02", "57P03"] {
            assert_eq!(classify_sqlstate(c), ErrorClass::AdminShutdown);
        }
        assert_eq!(classify_sqlstate("53300"), ErrorClass::TooManyConnections);
        assert_eq!(classify_sqlstate("25006"), ErrorClass::ReadOnlyTransaction);
        assert_eq!(classify_sqlstate("23505"), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate("42601"), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate(""), ErrorClass::Permanent);
    }

    #[test]
    fn messages_are_matched_case_insensitively_and_unknown_ones_are_permanent() {
        assert_eq!(
            classify_message("FATAL:  terminating connection due to administrator command"),
            ErrorClass::AdminShutdown
        );
        assert_eq!(
            classify_message("SSL SYSCALL error: EOF detected"),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            classify_message("duplicate key value violates unique constraint \"k\""),
            ErrorClass::Permanent
        );
        assert_eq!(classify_message(""), ErrorClass::Permanent);
        assert_eq!(classify_message("🦀 é"), ErrorClass::Permanent);
    }

    #[test]
    fn only_the_servers_own_message_forms_count_not_an_applications_text() {
        assert_eq!(
            classify_server_message("deadlock detected"),
            ErrorClass::Deadlock
        );
        assert_eq!(
            classify_server_message("deadlock detected in job 7, please retry"),
            ErrorClass::Permanent,
            "a RAISE EXCEPTION quoting the words is the application's error"
        );
        assert_eq!(
            classify_server_message("could not serialize access due to concurrent update"),
            ErrorClass::SerializationFailure
        );
        assert_eq!(
            classify_server_message("cannot execute INSERT in a read-only transaction"),
            ErrorClass::ReadOnlyTransaction
        );
        assert_eq!(
            classify_server_message(
                "job failed: cannot execute INSERT in a read-only transaction!"
            ),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify_server_message("too many connections for role \"app\""),
            ErrorClass::TooManyConnections
        );
        assert_eq!(
            classify_server_message("server closed the connection unexpectedly"),
            ErrorClass::Permanent,
            "client phrases are not server messages"
        );
        assert_eq!(
            classify_server_message("database removed"),
            ErrorClass::ConnectionLost,
            "PgBouncer's KILL"
        );
        assert_eq!(
            classify_server_message(
                "server login has been failing, try again later (server_login_retry)"
            ),
            ErrorClass::AdminShutdown
        );
        assert_eq!(
            classify_server_message("server conn crashed?"),
            ErrorClass::ConnectionLost
        );
        // PgBouncer's answer when forwarding a statement to a server connection that was
        // terminated under it fails (its CI surfaced it to a caller of `commit_with_retry`).
        assert_eq!(
            classify_server_message("server connection closed"),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            classify_server_message("idle transaction timeout"),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            classify_server_message("server shutting down"),
            ErrorClass::AdminShutdown
        );
        assert_eq!(
            classify_server_message("invalid server parameter"),
            ErrorClass::ConnectionLost,
            "PgBouncer, a server restarting under a client"
        );
        assert_eq!(
            classify_server_message("query_wait_timeout"),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            classify_server_message("no more connections allowed (max_client_conn)"),
            ErrorClass::TooManyConnections
        );
        assert_eq!(
            classify_client_message(
                "connection to server at \"127.0.0.1\", port 1 failed: Connection refused"
            ),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            classify_message(
                "connection to server at \"h\", port 5432 failed: FATAL:  the database system is starting up\n"
            ),
            ErrorClass::AdminShutdown
        );
        assert_eq!(
            classify_message("ERROR:  deadlock detected in my function"),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn only_disconnects_invalidate_and_only_permanent_is_final() {
        let all = [
            ErrorClass::SerializationFailure,
            ErrorClass::Deadlock,
            ErrorClass::ConnectionLost,
            ErrorClass::AdminShutdown,
            ErrorClass::TooManyConnections,
            ErrorClass::ReadOnlyTransaction,
            ErrorClass::LockTimeout,
            ErrorClass::PoolTimeout,
            ErrorClass::Permanent,
        ];
        for class in all {
            assert_eq!(class.is_transient(), class != ErrorClass::Permanent);
            assert_eq!(class.to_string(), class.as_str());
        }
        assert!(
            !ErrorClass::ReadOnlyTransaction.invalidates_pool(),
            "a deliberate write in a READ ONLY transaction is no reason to distrust the pool"
        );
        assert!(!ErrorClass::SerializationFailure.invalidates_pool());
        assert!(!ErrorClass::PoolTimeout.is_disconnect());
    }
}
