//! Does the connection budget fit the server? A check run once, at start.
//!
//! A budget of 60 on a server that allows 100 connections, keeps 3 for superusers and already
//! serves 45 other clients cannot be honoured: the 38th connection fails with *too many
//! clients* whatever the pool promises. [`check_server_capacity`] asks the server and says so.

use std::fmt;

use diesel::sql_types::{Array, Integer, Text};
use diesel::{QueryResult, QueryableByName};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

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

/// What the server can give the budget, read from its settings and `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCapacity {
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: u32,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub reserved_connections: u32,
    /// Client connections of other applications right now (not ours, not this check's).
    pub other_clients: u32,
    /// What is left for the budget: `max - superuser_reserved - reserved - other_clients`.
    pub available: u32,
    /// The budget's total.
    pub requested: u32,
}

impl ServerCapacity {
    /// Whether the budget fits in what the server has left.
    pub fn fits(&self) -> bool {
        self.requested <= self.available
    }
}

impl fmt::Display for ServerCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "budget {} vs. server capacity {} (max_connections {} - superuser_reserved {} - \
             reserved {} - {} other client(s))",
            self.requested,
            self.available,
            self.max_connections,
            self.superuser_reserved,
            self.reserved_connections,
            self.other_clients
        )?;
        if !self.fits() {
            write!(
                f,
                ": {} connection(s) of the budget cannot be opened",
                self.requested - self.available
            )?;
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Integer)]
    max_connections: i32,
    #[diesel(sql_type = Integer)]
    superuser_reserved: i32,
    #[diesel(sql_type = Integer)]
    reserved_connections: i32,
    #[diesel(sql_type = Integer)]
    other_clients: i32,
}

/// Compares a budget of `total` connections with what the server has left, counting as
/// "other clients" every client backend whose `application_name` is not in `ours` (so give
/// your pools an `application_name` for an exact count). Logs a warning when it does not fit.
///
/// Reading `pg_stat_activity` of other roles needs `pg_read_all_stats` for the exact
/// application names; without it, other roles' sessions still count (their names read as
/// empty), which errs on the safe side.
pub async fn check_server_capacity(
    conn: &mut AsyncPgConnection,
    total: u32,
    ours: &[String],
) -> QueryResult<ServerCapacity> {
    let row: Row = diesel::sql_query(
        "SELECT current_setting('max_connections')::int AS max_connections, \
                current_setting('superuser_reserved_connections')::int AS superuser_reserved, \
                COALESCE(current_setting('reserved_connections', true), '0')::int AS reserved_connections, \
                (SELECT count(*) FROM pg_stat_activity \
                  WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                    AND NOT (COALESCE(application_name, '') = ANY($1)))::int AS other_clients",
    )
    .bind::<Array<Text>, _>(ours)
    .get_result(conn)
    .await?;
    let n = |v: i32| u32::try_from(v).unwrap_or(0);
    let (max, su, reserved, others) = (
        n(row.max_connections),
        n(row.superuser_reserved),
        n(row.reserved_connections),
        n(row.other_clients),
    );
    let capacity = ServerCapacity {
        max_connections: max,
        superuser_reserved: su,
        reserved_connections: reserved,
        other_clients: others,
        available: max
            .saturating_sub(su)
            .saturating_sub(reserved)
            .saturating_sub(others),
        requested: total,
    };
    if capacity.fits() {
        log::info!(target: pool_core::events::LOG_TARGET, "{capacity}");
    } else {
        log::warn!(target: pool_core::events::LOG_TARGET, "{capacity}");
    }
    Ok(capacity)
}
