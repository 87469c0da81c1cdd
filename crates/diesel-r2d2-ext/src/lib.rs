//! Drop-in extended r2d2 pools for Diesel, for PostgreSQL as managed services run it.
//!
//! Connections dropped while idle, SSL sessions closed under the pool, restarts, failovers and
//! hung servers are handled where they should be — in the pool — instead of failing requests:
//!
//! * checkouts are served **in arrival order**, and connections are opened only for checkouts
//!   that want them;
//! * every checkout runs a zero-round-trip **liveness probe** (a look at the socket) and, for
//!   connections idle longer than a bypass window or after a disconnect was seen, a **ping
//!   bounded by a timeout** even against a hung server;
//! * a connection that saw a connection-class error is **never put back**, and the pool's other
//!   connections are re-validated before their next use;
//! * lifetimes with **jitter**, idle timeouts, `pool_size` + `max_overflow`, TCP keepalives,
//!   `tcp_user_timeout`, `connect_timeout`, TLS and `application_name`, rendered as libpq
//!   parameters (parameters in your URL win);
//! * stats and a status report; no password in any log line, error, `Debug` or `Display`.
//!
//! Adopting it changes the pool's type alias and the builder call, nothing else:
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel_r2d2_ext::PgPool;
//!
//! pub type DbPool = PgPool; // was: r2d2::Pool<ConnectionManager<PgConnection>>
//!
//! fn count(conn: &mut PgConnection) -> QueryResult<i64> {
//!     diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>("1")).get_result(conn)
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool: DbPool = PgPool::builder("postgres://app@localhost/app")
//!     .pool_size(10)
//!     .max_overflow(5)
//!     .application_name("orders-api")
//!     .build()?;
//! let mut conn = pool.get()?; // r2d2's own PooledConnection<_>
//! count(&mut conn)?;
//! println!("{}", pool.status());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

#[cfg(feature = "postgres")]
pub mod capacity;
pub mod classes;
pub mod classify;
pub mod customize;
mod demand;
mod forge;
mod health;
mod manager;
#[cfg(feature = "postgres")]
mod pg;
mod pool;
pub mod retry;
use diesel_ext_common::socket;
mod tracker;

pub use classes::{Class, ClassPools};
pub use manager::{AfterConnect, CustomConnect, ExtConnection, ExtError, ExtManager, ManagerStats};
#[cfg(feature = "postgres")]
pub use pool::PgPool;
#[cfg(feature = "sqlite")]
pub use pool::SqlitePool;
pub use pool::{BuildError, Builder, ExtPool};
pub use pool_core;
/// The pool crate this one wraps, re-exported: name its types (`r2d2::PooledConnection`,
/// ...) through it so that both always agree.
pub use r2d2;
/// The checkout [`ExtPool::get`] returns: r2d2's own.
pub use r2d2::PooledConnection;
pub use retry::{commit_with_key, commit_with_retry, with_retry, Keyed, RetryError, RetryPolicy};
