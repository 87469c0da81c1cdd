//! `check` for SQLite (or no `DATABASE_URL`): what applies, and nothing that would create
//! the database file.

use pool_core::config::PoolConfig;
use pool_core::settings::show_duration;

use crate::load::UrlSource;
use crate::report::{Check, Report};

/// The lines that apply to a SQLite database (or to no URL at all).
pub fn check(config: &PoolConfig, source: UrlSource, report: &mut Report) {
    if source == UrlSource::Unset {
        report.push(Check::warn(
            "url",
            "DATABASE_URL is not set: PgPool::from_env() fails, from_env_or(fallback) opens its \
             SQLite fallback",
            "set DATABASE_URL (or pass --url) to check a server",
        ));
    } else {
        report.push(Check::pass(
            "url",
            format!("SQLite database {}", config.url.redacted()),
        ));
    }
    let s = &config.sqlite;
    report.push(Check::pass(
        "sqlite",
        format!(
            "busy_timeout {}, WAL {}, foreign_keys {}",
            show_duration(s.busy_timeout),
            if s.wal { "on" } else { "off" },
            if s.foreign_keys { "on" } else { "off" }
        ),
    ));
    if source != UrlSource::Unset {
        let path = config.url.expose_secret();
        let file = path.strip_prefix("file:").unwrap_or(path);
        let file = file.split('?').next().unwrap_or(file);
        if file != ":memory:" && !std::path::Path::new(file).exists() {
            report.push(Check::warn(
                "sqlite_file",
                format!("{} does not exist yet", config.redact(file)),
                "the pool creates it on first connect; check the path if you expected data",
            ));
        } else if file != ":memory:" {
            match sqlite_journal(path) {
                Ok(mode) if mode == "wal" || !s.wal => report.push(Check::pass(
                    "sqlite_file",
                    format!("opened; journal_mode {mode}"),
                )),
                Ok(mode) => report.push(Check::pass(
                    "sqlite_file",
                    format!("opened; journal_mode {mode} (the pool switches it to WAL)"),
                )),
                Err(e) => report.push(Check::fail(
                    "sqlite_file",
                    format!("cannot open it: {}", config.redact(&e)),
                    "check the path and its permissions",
                )),
            }
        }
    }
    report.push(Check::pass(
        "not_applicable",
        "TLS, keepalives, server timeouts, max_connections and poolers do not apply to SQLite",
    ));
}

fn sqlite_journal(path: &str) -> Result<String, String> {
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        journal_mode: String,
    }
    let mut conn = diesel::SqliteConnection::establish(path).map_err(|e| e.to_string())?;
    diesel::sql_query("PRAGMA journal_mode")
        .get_result::<Mode>(&mut conn)
        .map(|m| m.journal_mode)
        .map_err(|e| e.to_string())
}
