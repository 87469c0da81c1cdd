//! Diesel's and r2d2's errors mapped to [`ErrorClass`].
//!
//! Diesel reports a few SQLSTATEs as [`DatabaseErrorKind`] variants (serialization failure,
//! read-only transaction, closed connection, constraint violations); other server errors
//! arrive as `DatabaseErrorKind::Unknown` with the server's primary message, matched whole
//! against the server's own forms ([`classify_server_message`]); libpq's own failures
//! (`UnableToSendCommand`) carry libpq's text ([`classify_message`]).
//!
//! Your own error types take part through [`Classify`]: implement it by delegating to the
//! `diesel::result::Error` inside, and `with_retry` / `commit_with_retry` accept them.

use diesel::result::{DatabaseErrorKind, Error};
use pool_core::classify::{classify_message, classify_server_message, ErrorClass};

/// Classifies a Diesel error.
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
            DatabaseErrorKind::Unknown => classify_server_message(info.message()),
            _ => classify_message(info.message()),
        },
        // A commit that failed, followed by a failed rollback: what cut the commit off decides.
        Error::RollbackErrorOnCommit { commit_error, .. } => classify_diesel(commit_error),
        // The transaction manager gave up on the connection after an error it could not
        // recover from, which in practice is a lost connection; a fresh one fixes it.
        Error::BrokenTransactionManager => ErrorClass::ConnectionLost,
        _ => ErrorClass::Permanent,
    }
}

/// Classifies a connection error (from `establish`).
pub fn classify_connection_error(err: &diesel::ConnectionError) -> ErrorClass {
    match err {
        diesel::ConnectionError::BadConnection(message) => match classify_message(message) {
            // Refused, reset, timed out while connecting: the server may be restarting.
            ErrorClass::Permanent => ErrorClass::Permanent,
            class => class,
        },
        diesel::ConnectionError::CouldntSetupConfiguration(e) => classify_diesel(e),
        _ => ErrorClass::Permanent,
    }
}

/// Classifies an r2d2 checkout error. r2d2 only fails a checkout when its timeout expires.
pub fn classify_r2d2(_err: &r2d2::Error) -> ErrorClass {
    ErrorClass::PoolTimeout
}

/// An error type the retry functions can classify. Implemented for Diesel's errors; implement
/// it for your own error type by finding the Diesel error inside:
///
/// ```
/// use diesel_r2d2_ext::classify::{classify_diesel, Classify};
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

impl Classify for diesel::ConnectionError {
    fn class(&self) -> ErrorClass {
        classify_connection_error(self)
    }
}
