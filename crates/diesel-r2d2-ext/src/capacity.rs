//! Does the connection budget fit the server? A check run once, at start.
//!
//! A budget of 60 on a server that allows 100 connections, keeps 3 for superusers and already
//! serves 45 other clients cannot be honoured: the 38th connection fails with *too many
//! clients* whatever the pool promises. [`check_server_capacity`] asks the server and says so
//! (the comparison is [`pool_core::capacity`]'s).

use diesel::{PgConnection, QueryResult, RunQueryDsl};
pub use diesel_ext_common::capacity::CapacityError;
use diesel_ext_common::capacity::CapacityRow;
pub use pool_core::capacity::ServerCapacity;
use pool_core::capacity::CAPACITY_SQL;

/// Compares a budget of `total` connections with what the server has left. `ours` is how
/// many connections our pools hold now, `conn` (the one asking) among them: every other
/// client backend counts as another client, whatever its `application_name` (replicas of
/// the same service included). Logs a warning when it does not fit.
///
/// Connections opened or closed while the check runs can make it off by those; run it at
/// start. `pg_stat_activity` lists every backend to every role (their details need
/// `pg_read_all_stats`, their count does not).
///
/// # Errors
/// The query's error.
pub fn check_server_capacity(
    conn: &mut PgConnection,
    total: u32,
    ours: u32,
) -> QueryResult<ServerCapacity> {
    let row: CapacityRow = diesel::sql_query(CAPACITY_SQL).get_result(conn)?;
    Ok(ServerCapacity::measure(row.into(), ours, total))
}
