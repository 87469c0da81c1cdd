//! Does the connection budget fit the server? A check run once, at start.
//!
//! A budget of 60 on a server that allows 100 connections, keeps 3 for superusers and already
//! serves 45 other clients cannot be honoured: the 38th connection fails with *too many
//! clients* whatever the pool promises. [`check_server_capacity`] asks the server and says so
//! (the comparison is [`pool_core::capacity`]'s).

use diesel::sql_types::{Array, Text};
use diesel::QueryResult;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
pub use diesel_ext_common::capacity::CapacityError;
use diesel_ext_common::capacity::CapacityRow;
pub use pool_core::capacity::ServerCapacity;
use pool_core::capacity::CAPACITY_SQL_OTHER_APPLICATIONS;

/// Compares a budget of `total` connections with what the server has left, counting as
/// "other clients" every client backend whose `application_name` is not in `ours` (so give
/// your pools an `application_name` for an exact count). Logs a warning when it does not fit.
///
/// Reading `pg_stat_activity` of other roles needs `pg_read_all_stats` for the exact
/// application names; without it, other roles' sessions still count (their names read as
/// empty), which errs on the safe side.
///
/// # Errors
/// The query's error.
pub async fn check_server_capacity(
    conn: &mut AsyncPgConnection,
    total: u32,
    ours: &[String],
) -> QueryResult<ServerCapacity> {
    let row: CapacityRow = diesel::sql_query(CAPACITY_SQL_OTHER_APPLICATIONS)
        .bind::<Array<Text>, _>(ours)
        .get_result(conn)
        .await?;
    Ok(ServerCapacity::measure(row.into(), 0, total))
}
