//! Diesel's errors mapped to [`ErrorClass`], as each driver reports them.
//!
//! Diesel reports a few SQLSTATEs as [`DatabaseErrorKind`] variants (serialization failure,
//! read-only transaction, closed connection, constraint violations), the same under both
//! drivers. The rest depends on the driver ([`Driver`]):
//!
//! * sync Diesel ([`Driver::Diesel`]: libpq, SQLite's library): other server errors arrive
//!   as `DatabaseErrorKind::Unknown` with the server's primary message, matched whole against
//!   the server's own forms ([`classify_server_message`]); libpq's own failures
//!   (`UnableToSendCommand`) carry libpq's text ([`classify_message`]);
//! * diesel-async ([`Driver::DieselAsync`]): a tokio-postgres error **without** a SQLSTATE —
//!   an I/O failure, a closed connection, a TLS failure — arrives as
//!   `DatabaseError(UnableToSendCommand, text)` with tokio-postgres's short description
//!   (`connection closed`, `error communicating with the server`, `channel closed`): matched
//!   as a client library's message ([`classify_client_message`]); a server error whose
//!   SQLSTATE diesel-async does not map — deadlocks, the FATALs of an administrator shutdown
//!   (57P01) or an idle-session timeout (57P05), "too many clients" — arrives as
//!   `DatabaseError(Unknown, info)` with the server's primary message, never as
//!   `ClosedConnection`; SQLite's "database is locked" comes through `Unknown` too. An
//!   application's `RAISE EXCEPTION` arrives the same way (its SQLSTATE P0001 is hidden), so
//!   such a message is matched whole against the server's own forms, never searched for a
//!   client library's phrases; and a disconnect read from it is only a claim
//!   ([`Driver::classify_trusted`] does not believe it; the retry functions check it against
//!   the connection).
//!
//! Your own error types take part through [`Classify`]: implement it by delegating to the
//! `diesel::result::Error` inside, and the adapters' retry functions accept them.

use diesel::result::{DatabaseErrorKind, Error};
use pool_core::classify::{
    classify_client_message, classify_message, classify_server_message, ErrorClass,
};

/// How a driver under Diesel reports its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Driver {
    /// Sync Diesel's own connections (`PgConnection` over libpq, `SqliteConnection`), as
    /// `diesel-r2d2-ext` pools them.
    Diesel,
    /// diesel-async's connections (`AsyncPgConnection` over tokio-postgres, SQLite through
    /// `SyncConnectionWrapper`), as `diesel-async-ext` pools them.
    DieselAsync,
}

/// What diesel-async says when its connection task ended without an error of its own (the
/// error channel closed) or the server sent something out of order: the connection is gone.
const LOST_WITHOUT_A_CAUSE: &[&str] = &["channel closed", "unexpected message from server"];

impl Driver {
    /// Classifies a Diesel error as this driver produces it.
    pub fn classify(self, err: &Error) -> ErrorClass {
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
                kind => self.classify_message(kind, info.message()),
            },
            // A commit that failed, followed by a failed rollback: what cut the commit off
            // decides.
            Error::RollbackErrorOnCommit { commit_error, .. } => self.classify(commit_error),
            // The transaction manager gave up on the connection (an error it could not recover
            // from, a cancelled BEGIN/COMMIT): in practice a lost connection; a fresh one
            // fixes it.
            Error::BrokenTransactionManager => ErrorClass::ConnectionLost,
            _ => ErrorClass::Permanent,
        }
    }

    /// The text of a database error of `kind` with no class of its own.
    fn classify_message(self, kind: &DatabaseErrorKind, message: &str) -> ErrorClass {
        match (self, kind) {
            (Driver::Diesel, DatabaseErrorKind::Unknown) => classify_server_message(message),
            (Driver::Diesel, _) => classify_message(message),
            (Driver::DieselAsync, DatabaseErrorKind::UnableToSendCommand) => {
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
            // A server's message (SQLite's "database is locked" comes through `Unknown` too),
            // matched whole against the server's own forms: never searched for a client
            // library's phrases, which an application's `RAISE EXCEPTION` may quote.
            (Driver::DieselAsync, _) => classify_server_message(message),
        }
    }

    /// The class of `err` as far as the driver itself vouches for it: like
    /// [`Driver::classify`], except that a lost connection or a shutdown read from a server
    /// message's *text* (diesel-async's `DatabaseErrorKind::Unknown`, which also carries an
    /// application's `RAISE EXCEPTION 'terminating connection due to administrator command'`)
    /// is [`ErrorClass::Permanent`]: only an error kind or a client library's own failure
    /// says a connection is gone.
    ///
    /// What the pool's per-connection bookkeeping uses to mark a connection broken and
    /// invalidate the pool. A real server FATAL is not lost by it: the server closes the
    /// session after sending it, the client reports itself closed, and the pool closes the
    /// connection at checkin (or its probe does at the next checkout); the retry functions
    /// check a disconnect read from a message against the connection itself.
    pub fn classify_trusted(self, err: &Error) -> ErrorClass {
        match (self, err) {
            (Driver::DieselAsync, Error::DatabaseError(DatabaseErrorKind::Unknown, _))
                if self.classify(err).is_disconnect() =>
            {
                ErrorClass::Permanent
            }
            (_, Error::RollbackErrorOnCommit { commit_error, .. }) => {
                self.classify_trusted(commit_error)
            }
            _ => self.classify(err),
        }
    }

    /// Classifies a connection error (from `establish`).
    pub fn classify_connection(self, err: &diesel::ConnectionError) -> ErrorClass {
        match err {
            // Refused, reset, timed out while connecting: the server may be restarting.
            diesel::ConnectionError::BadConnection(message) => classify_message(message),
            diesel::ConnectionError::CouldntSetupConfiguration(e) => self.classify(e),
            _ => ErrorClass::Permanent,
        }
    }
}

/// Classifies a Diesel error as sync Diesel (libpq, SQLite) produces it.
pub fn classify_diesel_sync(err: &Error) -> ErrorClass {
    Driver::Diesel.classify(err)
}

/// Classifies a Diesel error as diesel-async (PostgreSQL, or SQLite through the sync
/// wrapper) produces it.
pub fn classify_diesel_async(err: &Error) -> ErrorClass {
    Driver::DieselAsync.classify(err)
}

/// Classifies a connection error (from `establish`), as sync Diesel produces it.
pub fn classify_connection_error(err: &diesel::ConnectionError) -> ErrorClass {
    Driver::Diesel.classify_connection(err)
}

/// An error type the retry functions can classify. Implemented for Diesel's errors;
/// implement it for your own error type by finding the Diesel error inside, with your
/// adapter's `classify_diesel` (`diesel_r2d2_ext::classify` or `diesel_async_ext::classify`):
///
/// ```
/// use diesel_ext_common::classify::{classify_diesel_sync as classify_diesel, Classify};
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

    /// The error's class as `driver` reports errors; what the adapters' retry functions ask.
    /// Defaults to [`Classify::class`]: implement that one. Diesel's own errors, which do
    /// not say which driver made them, are classified as `driver` makes them.
    fn class_for(&self, driver: Driver) -> ErrorClass {
        let _ = driver;
        self.class()
    }
}

/// Diesel's error on its own is classified as sync Diesel reports it; the adapters' retry
/// functions ask [`Classify::class_for`] with their driver.
impl Classify for Error {
    fn class(&self) -> ErrorClass {
        Driver::Diesel.classify(self)
    }

    fn class_for(&self, driver: Driver) -> ErrorClass {
        driver.classify(self)
    }
}

/// Classified as sync Diesel reports it; the adapters' retry functions ask
/// [`Classify::class_for`] with their driver.
impl Classify for diesel::ConnectionError {
    fn class(&self) -> ErrorClass {
        Driver::Diesel.classify_connection(self)
    }

    fn class_for(&self, driver: Driver) -> ErrorClass {
        driver.classify_connection(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    fn commit_cut_by(commit_error: Error) -> Error {
        Error::RollbackErrorOnCommit {
            rollback_error: Box::new(Error::BrokenTransactionManager),
            commit_error: Box::new(commit_error),
        }
    }

    const SHUTDOWN: &str = "terminating connection due to administrator command";

    #[test]
    fn a_commit_followed_by_a_failed_rollback_is_classified_by_what_cut_the_commit_off() {
        for driver in [Driver::Diesel, Driver::DieselAsync] {
            let conflict = db(
                DatabaseErrorKind::SerializationFailure,
                "could not serialize",
            );
            assert_eq!(
                driver.classify(&commit_cut_by(conflict)),
                ErrorClass::SerializationFailure,
                "{driver:?}"
            );
            let duplicate = db(DatabaseErrorKind::UniqueViolation, "duplicate key");
            assert_eq!(
                driver.classify(&commit_cut_by(duplicate)),
                ErrorClass::Permanent
            );
        }
    }

    #[test]
    fn a_transaction_manager_that_gave_up_means_the_connection_is_lost() {
        for driver in [Driver::Diesel, Driver::DieselAsync] {
            assert_eq!(
                driver.classify(&Error::BrokenTransactionManager),
                ErrorClass::ConnectionLost
            );
            assert_eq!(
                driver.classify_trusted(&Error::BrokenTransactionManager),
                ErrorClass::ConnectionLost
            );
        }
        assert_eq!(
            Driver::Diesel.classify(&Error::NotFound),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn diesel_async_s_bare_channel_closed_is_a_lost_connection_and_other_bare_texts_are_not() {
        let send = |m: &str| db(DatabaseErrorKind::UnableToSendCommand, m);
        let d = Driver::DieselAsync;
        assert_eq!(
            d.classify(&send("channel closed")),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            d.classify(&send(" Unexpected message from server ")),
            ErrorClass::ConnectionLost
        );
        assert_eq!(
            d.classify(&send("connection closed")),
            ErrorClass::ConnectionLost
        );
        // A client failure that names no lost connection stays permanent.
        assert_eq!(
            d.classify(&send("invalid configuration: bad sslmode")),
            ErrorClass::Permanent
        );
        assert_eq!(
            d.classify(&send("the channel closed its doors")),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn classify_trusted_doubts_only_a_disconnect_read_from_diesel_async_s_server_text() {
        let unknown = |m: &str| db(DatabaseErrorKind::Unknown, m);
        let d = Driver::DieselAsync;
        // Read from a message's text: a claim an application's RAISE EXCEPTION can make.
        assert_eq!(d.classify(&unknown(SHUTDOWN)), ErrorClass::AdminShutdown);
        assert_eq!(
            d.classify_trusted(&unknown(SHUTDOWN)),
            ErrorClass::Permanent
        );
        // Also when it cut a commit off.
        assert_eq!(
            d.classify_trusted(&commit_cut_by(unknown(SHUTDOWN))),
            ErrorClass::Permanent
        );
        assert_eq!(
            d.classify(&commit_cut_by(unknown(SHUTDOWN))),
            ErrorClass::AdminShutdown
        );
        // Transient classes that are no disconnect are believed.
        assert_eq!(
            d.classify_trusted(&unknown("deadlock detected")),
            ErrorClass::Deadlock
        );
        // An error kind, or the client library's own failure, is believed.
        let closed = db(DatabaseErrorKind::ClosedConnection, SHUTDOWN);
        assert_eq!(d.classify_trusted(&closed), ErrorClass::ConnectionLost);
        let io = db(DatabaseErrorKind::UnableToSendCommand, "connection closed");
        assert_eq!(d.classify_trusted(&io), ErrorClass::ConnectionLost);
        // Sync Diesel's server text comes from libpq with the server's severity: believed.
        assert_eq!(
            Driver::Diesel.classify_trusted(&unknown(SHUTDOWN)),
            ErrorClass::AdminShutdown
        );
    }

    #[test]
    fn connection_errors_are_classified_by_their_text_or_the_setup_error_inside() {
        let refused = diesel::ConnectionError::BadConnection(
            "connection to server at \"db\" (10.0.0.5), port 5432 failed: Connection refused"
                .to_owned(),
        );
        let setup = diesel::ConnectionError::CouldntSetupConfiguration(db(
            DatabaseErrorKind::SerializationFailure,
            "could not serialize",
        ));
        let bad_url = diesel::ConnectionError::InvalidConnectionUrl("nope".to_owned());
        for driver in [Driver::Diesel, Driver::DieselAsync] {
            assert_eq!(
                driver.classify_connection(&refused),
                ErrorClass::ConnectionLost
            );
            assert_eq!(
                driver.classify_connection(&setup),
                ErrorClass::SerializationFailure
            );
            assert_eq!(driver.classify_connection(&bad_url), ErrorClass::Permanent);
            assert_eq!(refused.class_for(driver), ErrorClass::ConnectionLost);
        }
        assert_eq!(refused.class(), ErrorClass::ConnectionLost);
        assert_eq!(classify_connection_error(&bad_url), ErrorClass::Permanent);
    }
}
