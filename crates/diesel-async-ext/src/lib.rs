//! Drop-in extended bb8 pools for diesel-async, for PostgreSQL as managed services run it (and
//! SQLite), with the same promises as the sync pool (`diesel-r2d2-ext`):
//!
//! ```no_run
//! use diesel::sql_types::Integer;
//! use diesel_async::{AsyncPgConnection, RunQueryDsl};
//! use diesel_async_ext::PgPool;
//!
//! pub type DbPool = PgPool; // was: bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>
//!
//! async fn one(conn: &mut AsyncPgConnection) -> diesel::QueryResult<i32> {
//!     diesel::select(diesel::dsl::sql::<Integer>("1")).get_result(conn).await
//! }
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let pool: DbPool = PgPool::builder("postgres://app@localhost/app?sslmode=verify-full")
//!     .pool_size(10)
//!     .max_overflow(5)
//!     .application_name("orders-api")
//!     .build()
//!     .await?;
//! let mut conn = pool.get().await?; // bb8's own PooledConnection
//! diesel::sql_query("SELECT 1").execute(&mut conn).await?;
//! one(&mut conn).await?;
//! println!("{}", pool.status()); // human-readable; pool.status().to_json() for machines
//! # Ok(())
//! # }
//! ```
//!
//! Only the pool's type alias and the builder call change; `pool.get().await` returns bb8's
//! own `PooledConnection`, which every diesel-async call and every `&mut AsyncPgConnection`
//! helper accepts.
//!
//! # What happens on checkout
//!
//! The engine decides (`pool_core::engine`), this crate performs, on bb8's hooks:
//!
//! 1. **Liveness probe, every checkout, no round trip**: the tokio-postgres client's closed
//!    state. A server that ended a session (killed backend, restart, idle-session timeout, a
//!    proxy or NAT reset) has sent its FATAL or FIN; diesel-async's connection task has read
//!    it and ended, so the connection is retired before anyone sees it.
//! 2. **Ping only when it is worth it** (idle past the bypass window, after the pool saw a
//!    disconnect), **bounded** by `validation_timeout` with `tokio::time::timeout`, so a hung
//!    server or a stalled proxy cannot hold a checkout. A checkout dropped in the middle of
//!    its ping never puts the connection back.
//! 3. **Broken connections never go back**: a connection whose client closed (the server or
//!    the network ended it), returned inside a transaction, with its transaction manager
//!    broken by a cancelled `BEGIN`/`COMMIT`, or during a panic, is closed at checkin; a query
//!    that failed with a connection-class error (diesel-async's `UnableToSendCommand` I/O
//!    failures and the server's FATALs, classified by [`classify`]) also makes the pool's
//!    older connections suspect.
//! 4. Errors name their cause: bb8 only ever says "timed out"; [`ExtPool::get`] returns
//!    [`ExtError::Timeout`] with the last connect failure (refused, authentication, TLS,
//!    connect timeout), the budget's state, or a failed validation. No password, ever.
//!
//! One maintenance task per pool pings idle connections (`keepalive_ping`), closes those idle
//! past `idle_timeout` and those past their jittered lifetime, keeps a budget class's
//! reserved floor open, and gives borrowed budget headroom back the moment another class waits;
//! it never opens a connection beyond what the pool keeps, and stops with the last clone of the
//! pool. Connections are opened by [`PgConnector`] (libpq's URL meanings, TLS through OpenSSL
//! or rustls ([`tls`]) with libpq's `sslmode`s, `connect_timeout` over the whole connect) — or for SQLite by
//! diesel-async's `SyncConnectionWrapper` with `busy_timeout`, WAL and foreign keys.
//!
//! | module | holds |
//! |---|---|
//! | [`ExtPool`], [`Builder`] | the pool, its builder (every setting of the sync pool, the same environment variables) |
//! | [`classes`] | [`ClassPools`]: pools of different kinds of work sharing one connection budget |
//! | [`retry`] | [`with_retry`], [`commit_with_retry`], [`commit_with_key`]: retries that never commit twice |
//! | [`customize`] | [`customize::SessionSettings`]: session settings for a stock bb8 builder, in one line |
//! | [`classify`] | diesel-async's errors mapped to error classes |
//! | [`pg`], [`tls`] | the PostgreSQL connector |
//! | `axum` (feature `axum`) | an axum extractor for a checkout (`DbConn`), `ready` and `pool_status` handlers |
//!
//! Check out through [`ExtPool::get`] (not through the wrapped bb8 pool, which it dereferences
//! to): connections are opened only for its checkouts, which are served in arrival order and
//! counted by the stats and the budget.
#![deny(missing_docs)]

#[cfg(feature = "axum")]
pub mod axum;
pub mod backend;
#[cfg(feature = "postgres-core")]
pub mod capacity;
pub mod classes;
pub mod classify;
pub mod customize;
mod demand;
mod health;
mod manager;
#[cfg(feature = "postgres-core")]
pub mod pg;
mod pool;
pub mod retry;
#[cfg(feature = "postgres-core")]
pub mod tls;
mod tracker;

pub use backend::ExtConnection;
/// The pool crate this one wraps, re-exported: name its types (`bb8::PooledConnection`,
/// ...) through it so that both always agree.
pub use bb8;
/// The checkout [`ExtPool::get`] returns: bb8's own.
pub use bb8::PooledConnection;
pub use classes::{Class, ClassPools};
pub use manager::{
    AfterConnect, BoxFuture, ConnectCause, CustomConnect, ExtError, ExtManager, ManagerStats,
};
#[cfg(feature = "postgres-core")]
pub use pg::{establish, ConnectError, PgConnectConfig, PgConnector, PgTarget};
#[cfg(feature = "postgres-core")]
pub use pool::PgPool;
#[cfg(feature = "sqlite")]
pub use pool::SqlitePool;
pub use pool::{BuildError, Builder, ExtPool};
pub use pool_core;
pub use retry::{commit_with_key, commit_with_retry, with_retry, Keyed, RetryError, RetryPolicy};
#[cfg(feature = "postgres-core")]
pub use tls::{RootCerts, TlsBackend, TlsSettings, TlsVersion, Verification};
#[cfg(feature = "rustls")]
pub use tls::{RustlsConnect, RustlsConnector, RustlsError, RustlsStream};
