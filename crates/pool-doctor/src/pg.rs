//! Asking a PostgreSQL server (through the library's own pool, so the connection carries
//! exactly the settings an application's would) what the checks compare.
//!
//! Every query returns one JSON text column, read into the typed structs here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use diesel::PgConnection;
use diesel_r2d2_ext::ExtPool;
use pool_core::config::PoolConfig;
use serde::{Deserialize, Serialize};

use crate::socket::{self, SocketOptions};

#[derive(QueryableByName)]
struct Json {
    #[diesel(sql_type = Text)]
    j: String,
}

/// This session, as the server sees it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Session {
    /// `server_version`.
    pub server_version: String,
    /// `pg_backend_pid()`.
    pub pid: i32,
    /// `current_user`.
    pub user: String,
    /// `current_database()`.
    pub database: String,
    /// `current_setting('application_name')`.
    pub application_name: String,
    /// `inet_server_port()` (none over a Unix socket).
    pub server_port: Option<i32>,
    /// `inet_client_port()` (none over a Unix socket).
    pub client_port: Option<i32>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Whether the role is a superuser.
    pub superuser: Option<bool>,
    /// The role's `CONNECTION LIMIT` (-1: none).
    pub role_conn_limit: Option<i32>,
    /// The database's `CONNECTION LIMIT` (-1: none).
    pub db_conn_limit: Option<i32>,
}

const SESSION_SQL: &str = "SELECT json_build_object(\
    'server_version', current_setting('server_version'), \
    'pid', pg_backend_pid(), \
    'user', current_user, \
    'database', current_database(), \
    'application_name', current_setting('application_name'), \
    'server_port', inet_server_port(), \
    'client_port', inet_client_port(), \
    'in_recovery', pg_is_in_recovery(), \
    'superuser', (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
    'role_conn_limit', (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user), \
    'db_conn_limit', (SELECT datconnlimit FROM pg_database WHERE datname = current_database())\
    )::text AS j";

/// This session's TLS, from `pg_stat_ssl`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Tls {
    /// TLS in use.
    pub ssl: bool,
    /// `TLSv1.3`, ...
    pub version: Option<String>,
    /// The cipher.
    pub cipher: Option<String>,
}

const TLS_SQL: &str = "SELECT COALESCE((SELECT json_build_object('ssl', ssl, 'version', version, \
    'cipher', cipher) FROM pg_stat_ssl WHERE pid = pg_backend_pid()), \
    json_build_object('ssl', false))::text AS j";

/// One server setting as `pg_settings` has it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ServerSetting {
    /// The value, in `unit`.
    pub setting: String,
    /// `ms`, `s`, `min`, or none.
    pub unit: Option<String>,
}

impl ServerSetting {
    /// A time setting in milliseconds (`None` when it is not a number).
    pub fn millis(&self) -> Option<u64> {
        let n: u64 = self.setting.trim().parse().ok()?;
        let factor = match self.unit.as_deref() {
            Some("ms") => 1,
            Some("s") => 1000,
            Some("min") => 60_000,
            Some("h") => 3_600_000,
            Some("d") => 86_400_000,
            _ => 1,
        };
        n.checked_mul(factor)
    }

    /// A count.
    pub fn count(&self) -> Option<u32> {
        self.setting.trim().parse().ok()
    }
}

/// The server settings the checks read.
pub const SETTING_NAMES: &[&str] = &[
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
];

fn settings_sql() -> String {
    let names: Vec<String> = SETTING_NAMES.iter().map(|n| format!("'{n}'")).collect();
    format!(
        "SELECT COALESCE(json_object_agg(name, json_build_object('setting', setting, 'unit', \
         unit)), '{{}}'::json)::text AS j FROM pg_settings WHERE name IN ({})",
        names.join(", ")
    )
}

/// One `application_name`'s client backends.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AppUsage {
    /// The `application_name` (empty when none).
    pub name: String,
    /// Backends.
    pub total: u32,
    /// Running a query.
    pub active: u32,
    /// Idle.
    pub idle: u32,
    /// Idle inside a transaction.
    pub idle_in_transaction: u32,
}

/// Who else is connected, not counting this session.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Activity {
    /// Client backends other than this session.
    pub others: u32,
    /// Of those, the ones of this role.
    pub role_others: u32,
    /// Of those, the ones to this database.
    pub db_others: u32,
    /// Of `others`, the ones whose `application_name` is the one bound (`--app`).
    pub app_own: u32,
    /// Per `application_name`, most first.
    pub apps: Vec<AppUsage>,
}

const ACTIVITY_SQL: &str = "WITH c AS (SELECT * FROM pg_stat_activity \
      WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) \
    SELECT json_build_object(\
      'others', (SELECT count(*) FROM c), \
      'role_others', (SELECT count(*) FROM c WHERE usename = current_user), \
      'db_others', (SELECT count(*) FROM c WHERE datname = current_database()), \
      'app_own', (SELECT count(*) FROM c WHERE COALESCE(application_name, '') = $1), \
      'apps', COALESCE((SELECT json_agg(a ORDER BY a.total DESC, a.name) FROM (\
         SELECT COALESCE(application_name, '') AS name, count(*) AS total, \
           count(*) FILTER (WHERE state = 'active') AS active, \
           count(*) FILTER (WHERE state = 'idle') AS idle, \
           count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction \
         FROM c GROUP BY 1) a), '[]'::json)\
    )::text AS j";

/// What the server said, and what this process saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    /// How long opening the connection took.
    pub connect: Duration,
    /// The session.
    pub session: Session,
    /// Its TLS.
    pub tls: Tls,
    /// Server settings by name.
    pub settings: BTreeMap<String, ServerSetting>,
    /// Other clients.
    pub activity: Activity,
    /// `SELECT 1` round trips.
    pub round_trips: Vec<Duration>,
    /// `pg_backend_pid()` in consecutive transactions.
    pub pids: Vec<i32>,
    /// `pg_backend_pid()` of a second client connection, taking turns with the first.
    pub pids_second: Vec<i32>,
    /// `SHOW pool_mode`, when something answered it.
    pub pool_mode: Option<String>,
    /// This process's TCP sockets to the database's port.
    pub sockets: Vec<SocketOptions>,
}

fn json<T: for<'de> Deserialize<'de>>(conn: &mut PgConnection, sql: &str) -> Result<T, String> {
    let row: Json = diesel::sql_query(sql)
        .get_result(conn)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&row.j).map_err(|e| format!("unexpected answer: {e}"))
}

/// The pool the doctor connects with: the application's settings, one connection.
pub fn doctor_pool(
    config: &PoolConfig,
    timeout: Duration,
) -> Result<(ExtPool<PgConnection>, Duration), String> {
    let mut c = config.clone();
    c.pool_size = 1;
    // A second connection only for the pooler probe.
    c.max_overflow = 1;
    c.pool_timeout = timeout;
    c.name = "pool-doctor".to_owned();
    let started = Instant::now();
    let pool =
        ExtPool::<PgConnection>::from_config(c).map_err(|e| config.redact(&e.to_string()))?;
    Ok((pool, started.elapsed()))
}

/// Connects with the application's settings and gathers the facts. `app` is the
/// `application_name` counted apart (`--app`).
///
/// # Errors
/// The connect's or a query's error, redacted.
pub fn gather(
    config: &PoolConfig,
    timeout: Duration,
    samples: u32,
    app: Option<&str>,
) -> Result<Facts, String> {
    let (pool, connect) = doctor_pool(config, timeout)?;
    let redact = |e: String| config.redact(&e);
    let mut conn = pool.get().map_err(|e| redact(e.to_string()))?;
    let conn: &mut PgConnection = &mut conn;
    let session: Session = json(conn, SESSION_SQL).map_err(redact)?;
    let tls: Tls = json(conn, TLS_SQL).map_err(redact)?;
    let settings: BTreeMap<String, ServerSetting> = json(conn, &settings_sql()).map_err(redact)?;
    let row: Json = diesel::sql_query(ACTIVITY_SQL)
        .bind::<Text, _>(app.unwrap_or("\u{1}no application\u{1}"))
        .get_result(conn)
        .map_err(|e| redact(e.to_string()))?;
    let activity: Activity =
        serde_json::from_str(&row.j).map_err(|e| format!("unexpected answer: {e}"))?;
    let mut round_trips = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        diesel::select(diesel::dsl::sql::<Integer>("1"))
            .get_result::<i32>(conn)
            .map_err(|e| redact(e.to_string()))?;
        round_trips.push(started.elapsed());
    }
    // A second client connection, taking turns with the first: directly or through a
    // session-mode pooler each keeps its own backend; a transaction-mode pooler hands the
    // backend one just used to the other (or moves one between backends).
    let mut second = pool.get_timeout(timeout).ok();
    let (mut pids, mut pids_second) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        pids.extend(backend_pid(conn));
        if let Some(second) = second.as_mut() {
            pids_second.extend(backend_pid(second));
        }
    }
    drop(second);
    let pool_mode = show_pool_mode(conn);
    let peer = config
        .url
        .port()
        .or(Some(5432))
        .filter(|_| config.url.host().is_some_and(|h| !h.starts_with('/')));
    let sockets = if peer.is_some() {
        socket::connected_tcp(peer)
    } else {
        Vec::new()
    };
    Ok(Facts {
        connect,
        session,
        tls,
        settings,
        activity,
        round_trips,
        pids,
        pids_second,
        pool_mode,
        sockets,
    })
}

fn backend_pid(conn: &mut PgConnection) -> Option<i32> {
    diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result::<i32>(conn)
        .ok()
}

#[derive(QueryableByName)]
struct PoolMode {
    #[diesel(sql_type = Text)]
    pool_mode: String,
}

/// PostgreSQL has no `pool_mode` and refuses the statement; a pooler that answers it is
/// in front.
fn show_pool_mode(conn: &mut PgConnection) -> Option<String> {
    diesel::sql_query("SHOW pool_mode")
        .get_result::<PoolMode>(conn)
        .ok()
        .map(|r| r.pool_mode)
}

/// The connections the server has left and the role's and database's limits, for `size`.
pub struct Limits {
    /// `max_connections - superuser_reserved - reserved_connections`.
    pub server: u32,
    /// Client backends that are not ours (this session and `--app` not counted).
    pub others: u32,
    /// The role's `CONNECTION LIMIT` minus its other backends, if it has one.
    pub role: Option<u32>,
    /// The database's `CONNECTION LIMIT` minus its other backends, if it has one.
    pub database: Option<u32>,
    /// The facts they came from.
    pub facts: Facts,
}

impl Limits {
    /// What the replicas may hold together: the smallest of the limits.
    pub fn total(&self) -> u32 {
        let mut total = self.server.saturating_sub(self.others);
        for limit in [self.role, self.database].into_iter().flatten() {
            total = total.min(limit);
        }
        total
    }
}

/// Reads [`Limits`] from the facts; `app`'s backends are not counted as others.
pub fn limits(facts: Facts, app: Option<&str>) -> Limits {
    let count = |name: &str| {
        facts
            .settings
            .get(name)
            .and_then(ServerSetting::count)
            .unwrap_or(0)
    };
    let server = count("max_connections")
        .saturating_sub(count("superuser_reserved_connections"))
        .saturating_sub(count("reserved_connections"));
    let own = if app.is_some() {
        facts.activity.app_own
    } else {
        0
    };
    let others = facts.activity.others.saturating_sub(own);
    // Our own backends of the role/database are not counted either (approximately: those
    // named `app` are assumed to be of this role and database).
    let limit = |limit: Option<i32>, used: u32| {
        let limit = u32::try_from(limit?).ok()?;
        Some(limit.saturating_sub(used.saturating_sub(own)))
    };
    Limits {
        server,
        others,
        role: limit(facts.session.role_conn_limit, facts.activity.role_others),
        database: limit(facts.session.db_conn_limit, facts.activity.db_others),
        facts,
    }
}
