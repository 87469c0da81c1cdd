//! Does the connection budget fit the server? What the adapters' capacity checks share.
//!
//! A budget of 60 on a server that allows 100 connections, keeps 3 for superusers and already
//! serves 45 other clients cannot be honoured: the 38th connection fails with *too many
//! clients* whatever the pool promises. The adapters run one of the queries here (sync or
//! async) and hand the numbers to [`ServerCapacity::measure`], which compares and logs.
//!
//! ```
//! use pool_core::capacity::{ServerCapacity, ServerCounts};
//!
//! let server = ServerCounts {
//!     max_connections: 100,
//!     superuser_reserved: 3,
//!     reserved_connections: 0,
//!     clients: 50,
//! };
//! // 5 of those 50 client backends are our own pools' connections.
//! let capacity = ServerCapacity::measure(server, 5, 60);
//! assert_eq!(capacity.available, 52);
//! assert!(!capacity.fits());
//! ```

use std::fmt;

pub mod slices;

/// The server's settings and every client backend it has, as `pg_stat_activity` counts them
/// (`clients`). Columns: `max_connections`, `superuser_reserved`, `reserved_connections`,
/// `clients`, each an `int`.
pub const CAPACITY_SQL: &str =
    "SELECT current_setting('max_connections')::int AS max_connections, \
            current_setting('superuser_reserved_connections')::int AS superuser_reserved, \
            COALESCE(current_setting('reserved_connections', true), '0')::int AS reserved_connections, \
            (SELECT count(*) FROM pg_stat_activity \
              WHERE backend_type = 'client backend')::int AS clients";

/// As [`CAPACITY_SQL`], but `clients` counts only the client backends of other applications:
/// not this session, and none whose `application_name` is in the text array bound as `$1`.
pub const CAPACITY_SQL_OTHER_APPLICATIONS: &str =
    "SELECT current_setting('max_connections')::int AS max_connections, \
            current_setting('superuser_reserved_connections')::int AS superuser_reserved, \
            COALESCE(current_setting('reserved_connections', true), '0')::int AS reserved_connections, \
            (SELECT count(*) FROM pg_stat_activity \
              WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                AND NOT (COALESCE(application_name, '') = ANY($1)))::int AS clients";

/// What the capacity query returned, as the server said it (a negative number reads as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCounts {
    /// `max_connections`.
    pub max_connections: i32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: i32,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub reserved_connections: i32,
    /// The client backends the query counted.
    pub clients: i32,
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
    /// Client connections that are not ours right now. Replicas of the same service count
    /// here unless the check knows them as ours.
    pub other_clients: u32,
    /// What is left for the budget: `max - superuser_reserved - reserved - other_clients`.
    pub available: u32,
    /// The budget's total.
    pub requested: u32,
}

impl ServerCapacity {
    /// Compares a budget of `requested` connections with what `server` has left, `ours` of
    /// its counted clients being our own connections; logs the result (a warning when it
    /// does not fit).
    pub fn measure(server: ServerCounts, ours: u32, requested: u32) -> ServerCapacity {
        let n = |v: i32| u32::try_from(v).unwrap_or(0);
        let (max, su, reserved) = (
            n(server.max_connections),
            n(server.superuser_reserved),
            n(server.reserved_connections),
        );
        let others = n(server.clients).saturating_sub(ours);
        let capacity = ServerCapacity {
            max_connections: max,
            superuser_reserved: su,
            reserved_connections: reserved,
            other_clients: others,
            available: max
                .saturating_sub(su)
                .saturating_sub(reserved)
                .saturating_sub(others),
            requested,
        };
        if capacity.fits() {
            log::info!(target: crate::events::LOG_TARGET, "{capacity}");
        } else {
            log::warn!(target: crate::events::LOG_TARGET, "{capacity}");
        }
        capacity
    }

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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_is_max_minus_reserved_minus_other_clients() {
        let server = ServerCounts {
            max_connections: 100,
            superuser_reserved: 3,
            reserved_connections: 2,
            clients: 45,
        };
        let fits = ServerCapacity::measure(server, 5, 50);
        assert_eq!((fits.other_clients, fits.available), (40, 55));
        assert!(fits.fits());
        let short = ServerCapacity::measure(server, 0, 60);
        assert_eq!(short.available, 50);
        assert!(short.to_string().ends_with(
            "(max_connections 100 - superuser_reserved 3 - reserved 2 - 45 other client(s)): \
             10 connection(s) of the budget cannot be opened"
        ));
    }
}
