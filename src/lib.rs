//! Resilient Diesel connection pools for managed PostgreSQL.
//!
//! This umbrella crate re-exports the pieces most applications need:
//!
//! * [`PgPool`] / [`SqlitePool`] — drop-in extended r2d2 pools (from `diesel-r2d2-ext`):
//!   liveness probe on every checkout, stall-proof validation, lifetimes with jitter, TCP
//!   keepalives, TLS, stats and a status report;
//! * [`pool_core`] — the backend-agnostic core: configuration (builder and environment),
//!   lifecycle policy, stats, status report, events, redaction, retry policy, budget.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Reads DATABASE_URL, DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_TIMEOUT, DB_POOL_RECYCLE, ...
//! let pool = resilient_diesel::PgPool::from_env()?;
//! let mut conn = pool.get()?;
//! # let _ = &mut conn;
//! println!("{}", pool.status());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub use diesel_r2d2_ext::*;
pub use pool_core::config::{PoolConfig, PoolConfigBuilder, Pooler, SslMode};
pub use pool_core::status::StatusReport;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[doc = include_str!("../docs/adoption.md")]
#[cfg(doctest)]
pub struct AdoptionGuide;
