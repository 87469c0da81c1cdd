//! What resilient-diesel's two Diesel adapters share: the sync pool (`diesel-r2d2-ext`, r2d2
//! over Diesel's own connections) and the async one (`diesel-async-ext`, bb8 over
//! diesel-async). Everything here knows Diesel but no pool and no driver; what knows neither
//! is in [`pool_core`].
//!
//! | module | holds |
//! |---|---|
//! | [`classify`] | [`Classify`], and Diesel's errors mapped to error classes as each [`Driver`] reports them |
//! | [`tracker`] | [`Tracker`]: the pool's per-connection state, carried in the connection's instrumentation slot |
//! | [`session`] | session settings (`SET statement_timeout`, ...) validated and rendered for the adapters' customizers |
//! | [`resolve`] | Diesel's side of resolving a cut-off `COMMIT` (the idempotency key's answer, a failed question) |
//! | `capacity` | the capacity query's row and `CapacityError` (feature `postgres`) |
//! | `sqlite` | the pragmas applied to every new SQLite connection (feature `sqlite`) |
//! | `socket` | a connection's socket found among the process's descriptors: probed, shut down, waited on at close (feature `socket`) |
//!
//! Applications use it through the adapters, which re-export what they need of it.
//!
//! ```
//! use diesel::result::{DatabaseErrorKind, Error};
//! use diesel_ext_common::classify::{Classify, Driver};
//! use pool_core::classify::ErrorClass;
//!
//! // diesel-async reports a connection whose task ended as "channel closed".
//! let closed = Error::DatabaseError(
//!     DatabaseErrorKind::UnableToSendCommand,
//!     Box::new("channel closed".to_owned()),
//! );
//! assert_eq!(closed.class_for(Driver::DieselAsync), ErrorClass::ConnectionLost);
//! ```
#![deny(missing_docs)]

#[cfg(feature = "postgres")]
pub mod capacity;
pub mod classify;
pub mod resolve;
pub mod session;
#[cfg(feature = "socket")]
pub mod socket;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod tracker;

#[cfg(feature = "postgres")]
pub use capacity::CapacityError;
pub use classify::{Classify, Driver};
pub use tracker::Tracker;
