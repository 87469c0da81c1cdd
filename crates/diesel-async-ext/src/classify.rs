//! diesel-async's errors mapped to [`ErrorClass`].
//!
//! diesel-async reports errors differently from sync Diesel (see the crate's notes):
//!
//! * a tokio-postgres error **without** a SQLSTATE — an I/O failure, a closed connection, a
//!   TLS failure — arrives as `DatabaseError(UnableToSendCommand, text)`, where the text is
//!   tokio-postgres's short description (`connection closed`, `error communicating with the
//!   server`): matched as a client library's message ([`classify_client_message`]);
//! * a server error whose SQLSTATE diesel-async does not map — deadlocks, the FATALs of an
//!   administrator shutdown (57P01) or an idle-session timeout (57P05), "too many clients" —
//!   arrives as `DatabaseError(Unknown, info)` with the server's primary message, never as
//!   `ClosedConnection`: matched whole against the server's own forms
//!   ([`classify_server_message`]);
//! * serialization failures and read-only transactions have their own kinds.
//!
//! Your own error types take part through [`Classify`]: implement it by delegating to the
//! `diesel::result::Error` inside, and the retry functions accept them.

use diesel::result::{DatabaseErrorKind, Error};
use pool_core::classify::{classify_client_message, classify_server_message, ErrorClass};

/// What diesel-async says when its connection task ended without an error of its own (the
/// error channel closed) or the server sent something out of order: the connection is gone.
const LOST_WITHOUT_A_CAUSE: &[&str] = &["channel closed", "unexpected message from server"];

/// Classifies a Diesel error as diesel-async (PostgreSQL, or SQLite through the sync
/// wrapper) produces it.
pub fn classify_diesel(err: &Error) -> ErrorClass {
    match err {
        Error::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::SerializationFailure => ErrorClass::SerializationFailure,
            DatabaseErrorKind::ReadOnlyTransaction => ErrorClass::ReadOnlyTransaction,
            DatabaseErrorKind::ClosedConnection => ErrorClass::ConnectionLost,
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::RestrictViolation
            | DatabaseErrorKind::ExclusionViolation => ErrorClass::Permanent,
            DatabaseErrorKind::UnableToSendCommand => {
                let message = info.message();
                match classify_client_message(message) {
                    ErrorClass::Permanent
                        if LOST_WITHOUT_A_CAUSE
                            .iter()
                            .any(|m| message.trim().eq_ignore_ascii_case(m)) =>
                    {
                        ErrorClass::ConnectionLost
                    }
                    class => class,
                }
            }
            _ => match classify_server_message(info.message()) {
                // SQLite reports "database is locked" and the like through `Unknown` too.
                ErrorClass::Permanent => pool_core::classify::classify_message(info.message()),
                class => class,
            },
        },
        // A commit that failed, followed by a failed rollback: what cut the commit off decides.
        Error::RollbackErrorOnCommit { commit_error, .. } => classify_diesel(commit_error),
        // The transaction manager gave up on the connection (a cancelled BEGIN/COMMIT, an
        // error it could not recover from): a fresh connection fixes it.
        Error::BrokenTransactionManager => ErrorClass::ConnectionLost,
        _ => ErrorClass::Permanent,
    }
}

/// An error type the retry functions can classify. Implemented for Diesel's errors;
/// implement it for your own error type by finding the Diesel error inside:
///
/// ```
/// use diesel_async_ext::classify::{classify_diesel, Classify};
/// use pool_core::classify::ErrorClass;
///
/// #[derive(Debug)]
/// enum AppError {
///     Db(diesel::result::Error),
///     OutOfStock,
/// }
///
/// impl From<diesel::result::Error> for AppError {
///     fn from(e: diesel::result::Error) -> Self {
///         AppError::Db(e)
///     }
/// }
///
/// impl Classify for AppError {
///     fn class(&self) -> ErrorClass {
///         match self {
///             AppError::Db(e) => classify_diesel(e),
///             AppError::OutOfStock => ErrorClass::Permanent,
///         }
///     }
/// }
/// ```
pub trait Classify {
    /// The error's class.
    fn class(&self) -> ErrorClass;
}

impl Classify for Error {
    fn class(&self) -> ErrorClass {
        classify_diesel(self)
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
}
