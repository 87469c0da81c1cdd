//! diesel-async's errors mapped to [`pool_core::classify::ErrorClass`].
//!
//! diesel-async reports errors differently from sync Diesel (see the crate's notes):
//!
//! * a tokio-postgres error **without** a SQLSTATE — an I/O failure, a closed connection, a
//!   TLS failure — arrives as `DatabaseError(UnableToSendCommand, text)`, where the text is
//!   tokio-postgres's short description (`connection closed`, `error communicating with the
//!   server`): matched as a client library's message
//!   ([`classify_client_message`](pool_core::classify::classify_client_message));
//! * a server error whose SQLSTATE diesel-async does not map — deadlocks, the FATALs of an
//!   administrator shutdown (57P01) or an idle-session timeout (57P05), "too many clients" —
//!   arrives as `DatabaseError(Unknown, info)` with the server's primary message, never as
//!   `ClosedConnection`: matched whole against the server's own forms
//!   ([`classify_server_message`](pool_core::classify::classify_server_message)), never
//!   searched for a client library's phrases;
//! * serialization failures and read-only transactions have their own kinds.
//!
//! An application's `RAISE EXCEPTION` also arrives as `Unknown` (its SQLSTATE, P0001, is
//! hidden by diesel-async), so its text can read exactly like a server's FATAL. A lost
//! connection or shutdown read from a message's text is therefore only a claim: the pool's
//! per-connection bookkeeping does not act on it (no broken mark, no pool invalidation), and
//! the retry functions believe it only when the connection fails one `SELECT 1` sent right
//! after the error — a server that sent a FATAL has ended the session, an application's error
//! leaves it answering.
//!
//! The mapping is `diesel-ext-common`'s, as diesel-async reports errors
//! ([`Driver::DieselAsync`]). Your own error types take part through [`Classify`]: implement
//! it by delegating to the `diesel::result::Error` inside, and the retry functions accept
//! them:
//!
//! ```
//! use diesel_async_ext::classify::{classify_diesel, Classify};
//! use pool_core::classify::ErrorClass;
//!
//! #[derive(Debug)]
//! enum AppError {
//!     Db(diesel::result::Error),
//!     OutOfStock,
//! }
//!
//! impl From<diesel::result::Error> for AppError {
//!     fn from(e: diesel::result::Error) -> Self {
//!         AppError::Db(e)
//!     }
//! }
//!
//! impl Classify for AppError {
//!     fn class(&self) -> ErrorClass {
//!         match self {
//!             AppError::Db(e) => classify_diesel(e),
//!             AppError::OutOfStock => ErrorClass::Permanent,
//!         }
//!     }
//! }
//! ```

pub use diesel_ext_common::classify::{classify_diesel_async as classify_diesel, Classify, Driver};

use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error};
use diesel_async::AsyncConnection;
use pool_core::classify::ErrorClass;

/// How the errors of this crate's connections are reported.
pub(crate) const DRIVER: Driver = Driver::DieselAsync;

/// The class the pool's per-connection bookkeeping acts on (marking a connection broken,
/// invalidating the pool): a disconnect only when the driver reports one, never one read from
/// a server message's text ([`Driver::classify_trusted`]).
pub(crate) fn classify_observed(err: &Error) -> ErrorClass {
    DRIVER.classify_trusted(err)
}

/// Whether the session behind `conn` is still there, after an error that claims it is not.
///
/// diesel-async hides the SQLSTATE and severity of a server error: a FATAL 57P01 and an
/// application's `RAISE EXCEPTION 'terminating connection due to administrator command'` both
/// arrive as `DatabaseError(Unknown, "terminating connection due to administrator command")`.
/// What tells them apart for sure is what a FATAL does: the server ends the session right
/// after sending it, so nothing sent afterwards is ever answered. One `SELECT 1` (a simple
/// query) is sent: answered by the server — with its result, or with an error of its own such
/// as "current transaction is aborted" — the session is alive and the error was the
/// application's; failed without a server answer (client closed, I/O error) or not answered
/// within `timeout`, the session is gone (or unusable, which the pool treats alike). The
/// failed ping also goes through the connection's instrumentation, so the pool marks the
/// connection broken and invalidates its older connections, as for any lost connection.
pub(crate) async fn session_answers<C: AsyncConnection>(conn: &mut C, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, conn.batch_execute("SELECT 1")).await {
        Ok(Ok(())) => true,
        Ok(Err(Error::DatabaseError(kind, _))) => !matches!(
            kind,
            DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection
        ),
        Ok(Err(_)) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn diesel_asyncs_forms_map_to_their_classes() {
        use DatabaseErrorKind::*;
        let cases = [
            (
                db(UnableToSendCommand, "connection closed"),
                ErrorClass::ConnectionLost,
            ),
            (
                db(UnableToSendCommand, "error communicating with the server"),
                ErrorClass::ConnectionLost,
            ),
            (
                db(UnableToSendCommand, "channel closed"),
                ErrorClass::ConnectionLost,
            ),
            (
                db(
                    Unknown,
                    "terminating connection due to administrator command",
                ),
                ErrorClass::AdminShutdown,
            ),
            (db(Unknown, "deadlock detected"), ErrorClass::Deadlock),
            (
                db(SerializationFailure, "could not serialize access"),
                ErrorClass::SerializationFailure,
            ),
            (db(UniqueViolation, "duplicate key"), ErrorClass::Permanent),
            (
                db(Unknown, "relation \"nope\" does not exist"),
                ErrorClass::Permanent,
            ),
            (
                db(UnableToSendCommand, "task 7 panicked"),
                ErrorClass::Permanent,
            ),
            (Error::BrokenTransactionManager, ErrorClass::ConnectionLost),
            (Error::NotFound, ErrorClass::Permanent),
        ];
        for (err, class) in cases {
            assert_eq!(classify_diesel(&err), class, "{err:?}");
        }
    }

    #[test]
    fn an_applications_text_quoting_client_phrases_is_permanent() {
        // What `RAISE EXCEPTION` delivers: `Unknown` with the application's words.
        for text in [
            "payment gateway: connection refused",
            "server closed the connection unexpectedly",
            "upstream: connection reset by peer",
            "could not receive data from server",
            "connection closed",
            "FATAL:  terminating connection due to administrator command",
        ] {
            let err = db(DatabaseErrorKind::Unknown, text);
            assert_eq!(classify_diesel(&err), ErrorClass::Permanent, "{text}");
            assert_eq!(classify_observed(&err), ErrorClass::Permanent, "{text}");
        }
    }

    #[test]
    fn a_disconnect_read_from_a_servers_text_is_only_a_claim_the_bookkeeping_ignores() {
        use DatabaseErrorKind::*;
        for (err, claimed) in [
            (
                db(
                    Unknown,
                    "terminating connection due to administrator command",
                ),
                ErrorClass::AdminShutdown,
            ),
            (
                db(
                    Unknown,
                    "terminating connection due to idle-session timeout",
                ),
                ErrorClass::ConnectionLost,
            ),
        ] {
            assert_eq!(classify_diesel(&err), claimed, "{err:?}");
            assert_eq!(classify_observed(&err), ErrorClass::Permanent, "{err:?}");
            let wrapped = Error::RollbackErrorOnCommit {
                rollback_error: Box::new(Error::NotFound),
                commit_error: Box::new(err),
            };
            assert_eq!(classify_observed(&wrapped), ErrorClass::Permanent);
        }
        // What the driver itself reports is believed.
        for err in [
            db(UnableToSendCommand, "connection closed"),
            db(
                ClosedConnection,
                "terminating connection due to administrator command",
            ),
            Error::BrokenTransactionManager,
        ] {
            assert!(classify_observed(&err).is_disconnect(), "{err:?}");
        }
        assert_eq!(
            classify_observed(&db(Unknown, "deadlock detected")),
            ErrorClass::Deadlock
        );
    }
}
