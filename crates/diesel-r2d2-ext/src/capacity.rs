//! Does the connection budget fit the server? A check run once, at start.
//!
//! A budget of 60 on a server that allows 100 connections, keeps 3 for superusers and already
//! serves 45 other clients cannot be honoured: the 38th connection fails with *too many
//! clients* whatever the pool promises. [`check_server_capacity`] asks the server and says so.

use std::fmt;

use diesel::sql_types::Integer;
use diesel::{PgConnection, QueryResult, QueryableByName, RunQueryDsl};

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerCapacity {
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: u32,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub reserved_connections: u32,
    /// Client connections that are not ours right now: every client backend the server has,
    /// minus the connections our pools hold (this check's included). Replicas of the same
    /// service count here, whatever their `application_name`.
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
            "budget {} vs. server capacity {} (max_connections {} - superuser_reserved {} - reserved {} - {} other client(s))",
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
    clients: i32,
}

/// Compares a budget of `total` connections with what the server has left. `ours` is how
/// many connections our pools hold now, `conn` (the one asking) among them: every other
/// client backend counts as another client, whatever its `application_name` (replicas of
/// the same service included). Logs a warning when it does not fit.
///
/// Connections opened or closed while the check runs can make it off by those; run it at
/// start. `pg_stat_activity` lists every backend to every role (their details need
/// `pg_read_all_stats`, their count does not).
pub fn check_server_capacity(
    conn: &mut PgConnection,
    total: u32,
    ours: u32,
) -> QueryResult<ServerCapacity> {
    let row: Row = diesel::sql_query(
        "SELECT current_setting('max_connections')::int AS max_connections, \
                current_setting('superuser_reserved_connections')::int AS superuser_reserved, \
                COALESCE(current_setting('reserved_connections', true), '0')::int AS reserved_connections, \
                (SELECT count(*) FROM pg_stat_activity \
                  WHERE backend_type = 'client backend')::int AS clients",
    )
    .get_result(conn)?;
    let n = |v: i32| u32::try_from(v).unwrap_or(0);
    let (max, su, reserved, others) = (
        n(row.max_connections),
        n(row.superuser_reserved),
        n(row.reserved_connections),
        n(row.clients).saturating_sub(ours),
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
