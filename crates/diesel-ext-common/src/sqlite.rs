//! SQLite: the settings that apply to an embedded database, applied right after connecting.
//!
//! No PostgreSQL setting (keepalives, TLS, timeouts on a socket) means anything here, and none
//! is ever sent: SQLite gets `busy_timeout` (so a writer waits for the lock instead of failing
//! with "database is locked"), WAL journaling (readers do not block the writer) and foreign
//! key enforcement.

use diesel::connection::SimpleConnection;
use diesel::QueryResult;
use pool_core::config::SqliteSettings;

/// The statements run on every new SQLite connection.
pub fn pragmas(s: &SqliteSettings) -> String {
    let mut sql = format!("PRAGMA busy_timeout = {};", s.busy_timeout.as_millis());
    if s.wal {
        sql.push_str(" PRAGMA journal_mode = WAL;");
    }
    sql.push_str(if s.foreign_keys {
        " PRAGMA foreign_keys = ON;"
    } else {
        " PRAGMA foreign_keys = OFF;"
    });
    sql
}

/// Applies [`pragmas`] to a fresh (sync) connection.
///
/// # Errors
/// The connection's error, if a pragma fails.
pub fn apply(conn: &mut impl SimpleConnection, s: &SqliteSettings) -> QueryResult<()> {
    conn.batch_execute(&pragmas(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pragmas_cover_busy_timeout_wal_and_foreign_keys() {
        let s = pool_core::config::PoolConfig::builder("sqlite://app.db")
            .sqlite_busy_timeout(Duration::from_millis(2500))
            .build()
            .unwrap()
            .sqlite;
        let sql = pragmas(&s);
        assert!(sql.contains("busy_timeout = 2500"));
        assert!(sql.contains("journal_mode = WAL"));
        assert!(sql.contains("foreign_keys = ON"));
        assert!(!sql.contains("keepalives"));
    }

    #[test]
    fn pragmas_cover_busy_timeout_wal_and_foreign_keys_and_nothing_else() {
        let s = pool_core::config::PoolConfig::builder("sqlite://app.db")
            .sqlite_busy_timeout(Duration::from_millis(2500))
            .sqlite_wal(false)
            .build()
            .unwrap()
            .sqlite;
        let sql = pragmas(&s);
        assert_eq!(sql, "PRAGMA busy_timeout = 2500; PRAGMA foreign_keys = ON;");
    }
}
