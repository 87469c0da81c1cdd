//! diesel-async's errors mapped to [`ErrorClass`](pool_core::classify::ErrorClass).
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
//!   ([`classify_server_message`](pool_core::classify::classify_server_message));
//! * serialization failures and read-only transactions have their own kinds.
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

/// How the errors of this crate's connections are reported.
pub(crate) const DRIVER: Driver = Driver::DieselAsync;

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error};
    use pool_core::classify::ErrorClass;

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
