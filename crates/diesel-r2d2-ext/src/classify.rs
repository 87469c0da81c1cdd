//! Diesel's and r2d2's errors mapped to [`ErrorClass`].
//!
//! Diesel reports a few SQLSTATEs as [`DatabaseErrorKind`](diesel::result::DatabaseErrorKind)
//! variants (serialization failure, read-only transaction, closed connection, constraint
//! violations); other server errors arrive as `DatabaseErrorKind::Unknown` with the server's
//! primary message, matched whole against the server's own forms
//! ([`classify_server_message`](pool_core::classify::classify_server_message)); libpq's own
//! failures (`UnableToSendCommand`) carry libpq's text
//! ([`classify_message`](pool_core::classify::classify_message)). The mapping is
//! `diesel-ext-common`'s, as sync Diesel reports errors ([`Driver::Diesel`]).
//!
//! Your own error types take part through [`Classify`]: implement it by delegating to the
//! `diesel::result::Error` inside, and `with_retry` / `commit_with_retry` accept them.
//!
//! ```
//! use diesel_r2d2_ext::classify::{classify_diesel, Classify};
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

pub use diesel_ext_common::classify::{
    classify_connection_error, classify_diesel_sync as classify_diesel, Classify, Driver,
};
use pool_core::classify::ErrorClass;

/// How the errors of this crate's connections are reported.
pub(crate) const DRIVER: Driver = Driver::Diesel;

/// Classifies an r2d2 checkout error. r2d2 only fails a checkout when its timeout expires.
pub fn classify_r2d2(_err: &r2d2::Error) -> ErrorClass {
    ErrorClass::PoolTimeout
}
