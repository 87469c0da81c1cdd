//! The capacity check's Diesel side: the row its query returns and why it could not run.
//! The query's text and the comparison are [`pool_core::capacity`]'s; the adapters run the
//! query (sync or async).

use diesel::sql_types::Integer;
use diesel::QueryableByName;
use pool_core::capacity::ServerCounts;

/// Why the capacity check could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapacityError {
    /// No connection to ask with (the pool's error, redacted).
    #[error("no connection for the capacity check: {0}")]
    Pool(String),
    /// The query failed.
    #[error("the capacity query failed: {0}")]
    Query(#[from] diesel::result::Error),
}

/// One row of [`CAPACITY_SQL`](pool_core::capacity::CAPACITY_SQL) (or its variant that
/// leaves other applications' clients out).
#[derive(Debug, Clone, Copy, QueryableByName)]
pub struct CapacityRow {
    #[diesel(sql_type = Integer)]
    max_connections: i32,
    #[diesel(sql_type = Integer)]
    superuser_reserved: i32,
    #[diesel(sql_type = Integer)]
    reserved_connections: i32,
    #[diesel(sql_type = Integer)]
    clients: i32,
}

impl From<CapacityRow> for ServerCounts {
    fn from(row: CapacityRow) -> ServerCounts {
        ServerCounts {
            max_connections: row.max_connections,
            superuser_reserved: row.superuser_reserved,
            reserved_connections: row.reserved_connections,
            clients: row.clients,
        }
    }
}
