//! Pool configuration: a builder with documented defaults, and the same settings read from
//! environment variables.
//!
//! Settings are held typed (durations are [`Duration`]s, `sslmode` is a [`SslMode`]) and each
//! adapter renders them for its driver: libpq and tokio-postgres disagree on keys and units,
//! so nothing here is passed through as one string. Settings that do not apply to a backend
//! (keepalives or TLS for SQLite) are kept but never sent to it, so one environment can serve
//! a PostgreSQL deployment and a SQLite fallback.
//!
//! ```
//! use std::time::Duration;
//! use pool_core::config::{PoolConfig, SslMode};
//!
//! let config = PoolConfig::builder("postgres://app:secret@db.example.com/app")
//!     .pool_size(20)
//!     .max_overflow(5)
//!     .max_lifetime(Some(Duration::from_secs(30 * 60)))
//!     .ssl_mode(SslMode::Require)
//!     .build()?;
//! assert_eq!(config.max_size(), 25);
//! # Ok::<(), pool_core::ConfigError>(())
//! ```

mod env;
mod file;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use env::{env_vars, parse_duration};

use crate::error::ConfigError;
use crate::lifecycle::LifecyclePolicy;
use crate::url::DatabaseUrl;

/// The longest duration any setting accepts (365 days). Longer values are almost always a
/// unit mistake, and they would overflow deadline arithmetic in the adapters.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The most connections one pool (`pool_size + max_overflow`) or one budget may allow:
/// 10 000.
///
/// Far above what any one server serves: PostgreSQL's default `max_connections` is 100,
/// managed services cap it at a few thousand, and every connection is a server process with
/// its own memory. Far below what would hurt the client: r2d2 reserves a slot per allowed
/// connection when the pool is built, so `max_overflow(u32::MAX - 1)` used to ask for about
/// 700 GB and abort the process. A larger value is a typo or a unit mistake, and is refused
/// with an error naming the setting.
pub const MAX_CONNECTIONS: u32 = 10_000;

/// PostgreSQL's `sslmode`, with libpq's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, plain otherwise (libpq's default).
    Prefer,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS, with a certificate signed by a trusted authority.
    VerifyCa,
    /// TLS, with a trusted certificate whose name matches the host.
    VerifyFull,
}

impl SslMode {
    /// libpq's spelling: `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    /// Parses libpq's spelling, ignoring case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" => Ok(SslMode::Disable),
            "allow" => Ok(SslMode::Allow),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            _ => Err(ConfigError::UnknownSslMode {
                value: crate::redact::redact(s),
            }),
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The connection pooler between the pool and PostgreSQL (PgBouncer, Supavisor, RDS Proxy),
/// set with [`pooler`](PoolConfigBuilder::pooler) / `DB_POOLER`.
///
/// Only [`Pooler::Transaction`] changes anything: there the server connection behind a
/// client connection may change after every transaction, so session state does not survive
/// and a named prepared statement may not exist (or may already exist) where the next
/// statement runs. The adapters then keep no prepared statement past its statement, send no
/// session-level `SET` and no startup `options`, and trust `txid_status()` only on the server
/// that ran the transaction (README, "Behind PgBouncer / Supavisor").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooler {
    /// A direct connection to PostgreSQL (the default).
    #[default]
    None,
    /// A pooler in session mode: one server connection per client connection, for as long as
    /// it lasts. Nothing changes.
    Session,
    /// A pooler in transaction mode: the server connection may change between transactions.
    Transaction,
}

impl Pooler {
    /// The spelling the setting takes: `none`, `session`, `transaction`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::Session => "session",
            Pooler::Transaction => "transaction",
        }
    }

    /// Whether the server connection may change between transactions.
    pub fn is_transaction_mode(self) -> bool {
        self == Pooler::Transaction
    }
}

impl FromStr for Pooler {
    type Err = ConfigError;

    /// Parses `none`, `session` or `transaction`, ignoring case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "off" => Ok(Pooler::None),
            "session" => Ok(Pooler::Session),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err(ConfigError::Invalid {
                setting: "pooler",
                reason: format!(
                    "{:?} is not a pooler mode; use none, session or transaction",
                    crate::redact::redact(s)
                ),
            }),
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TCP keepalives: how a connection dropped by a NAT or a dead peer is noticed while idle.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Keepalives {
    /// Send keepalive probes at all. Default: `true`.
    pub enabled: bool,
    /// Idle time before the first probe. Default: 30 s.
    pub idle: Duration,
    /// Time between probes. Default: 10 s.
    pub interval: Duration,
    /// Unanswered probes before the connection is declared dead. Default: 3.
    pub count: u32,
}

impl Default for Keepalives {
    fn default() -> Self {
        Keepalives {
            enabled: true,
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
        }
    }
}

/// How connections to a network database (PostgreSQL, MySQL) are opened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConnectSettings {
    /// The longest a connection attempt may take. Default: 10 s.
    pub connect_timeout: Option<Duration>,
    /// TCP keepalives. See [`Keepalives`].
    pub keepalives: Keepalives,
    /// How long sent data may stay unacknowledged before the connection is dropped (Linux
    /// `TCP_USER_TIMEOUT`). Keepalives do not fire while data is outstanding and this does not
    /// fire while only waiting for a reply: set both. Default: 30 s.
    pub tcp_user_timeout: Option<Duration>,
    /// TLS mode. `None` leaves it to the URL's `sslmode` or the driver's default. Default:
    /// `None`.
    pub ssl_mode: Option<SslMode>,
    /// Root certificates to verify the server with (`sslrootcert`). Default: `None`.
    pub ssl_root_cert: Option<PathBuf>,
    /// Name shown in `pg_stat_activity.application_name`. Default: `None`.
    pub application_name: Option<String>,
    /// The pooler between the pool and the server. Default: [`Pooler::None`].
    pub pooler: Pooler,
}

impl Default for ConnectSettings {
    fn default() -> Self {
        ConnectSettings {
            connect_timeout: Some(Duration::from_secs(10)),
            keepalives: Keepalives::default(),
            tcp_user_timeout: Some(Duration::from_secs(30)),
            ssl_mode: None,
            ssl_root_cert: None,
            application_name: None,
            pooler: Pooler::None,
        }
    }
}

/// What applies to SQLite connections (and only to them).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SqliteSettings {
    /// How long a writer waits for a lock instead of failing with "database is locked".
    /// Default: 5 s.
    pub busy_timeout: Duration,
    /// Journal in WAL mode (readers do not block the writer). Default: `true`.
    pub wal: bool,
    /// Enforce foreign keys. Default: `true`.
    pub foreign_keys: bool,
}

impl Default for SqliteSettings {
    fn default() -> Self {
        SqliteSettings {
            busy_timeout: Duration::from_secs(5),
            wal: true,
            foreign_keys: true,
        }
    }
}

/// Everything a pool needs to know. Build it with [`PoolConfig::builder`] or read it from the
/// environment with [`PoolConfig::from_env`]. `Debug` shows the URL redacted.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// The database.
    pub url: DatabaseUrl,
    /// Connections kept open once load drops: opened when the pool is built, and the most
    /// kept when returned (not r2d2's or bb8's `min_idle`, which keeps that many *idle*
    /// besides the busy ones; the adapters turn it off). Default: 10. Zero keeps
    /// none: every connection is closed when returned (not SQLAlchemy's "no limit").
    pub pool_size: u32,
    /// Extra connections opened under load and closed again when idle. Default: 10.
    /// `pool_size + max_overflow` is at most [`MAX_CONNECTIONS`].
    pub max_overflow: u32,
    /// How long a checkout waits for a connection before failing. Default: 30 s.
    pub pool_timeout: Duration,
    /// Lifetimes, validation, leak detection. See [`LifecyclePolicy`].
    pub lifecycle: LifecyclePolicy,
    /// How network connections are opened. See [`ConnectSettings`].
    pub connect: ConnectSettings,
    /// SQLite settings. See [`SqliteSettings`].
    pub sqlite: SqliteSettings,
    /// The pool's name in stats, status reports and log lines. Default: `"default"`.
    pub name: String,
    /// Fail checkouts that need a new connection at once, with the cause, once connects have
    /// been failing for this long (a breaker: request handlers answer 503 instead of waiting
    /// `pool_timeout`); the first successful connect closes it. `None` (the default) waits.
    pub fail_fast_when_down: Option<Duration>,
}

impl PoolConfig {
    /// A builder for the database at `url`; every setting starts at its default. The URL is
    /// checked by [`PoolConfigBuilder::build`].
    pub fn builder(url: &str) -> PoolConfigBuilder {
        PoolConfigBuilder::new(url)
    }

    /// Reads the configuration from the process environment; `DATABASE_URL` is required.
    /// See [`PoolConfig::from_lookup`] for the variables.
    ///
    /// # Errors
    /// [`ConfigError::MissingVar`] without `DATABASE_URL`, [`ConfigError::InvalidVar`] for a
    /// value that cannot be used (also one that is not valid UTF-8).
    pub fn from_env() -> Result<PoolConfig, ConfigError> {
        env::from_process_env(None)
    }

    /// Like [`PoolConfig::from_env`], but uses `fallback_url` when `DATABASE_URL` is not set
    /// (e.g. `sqlite://dev.db` for local development).
    ///
    /// # Errors
    /// As [`PoolConfig::from_env`]; an invalid `fallback_url` gives
    /// [`ConfigError::InvalidUrl`] or [`ConfigError::UnsupportedScheme`].
    pub fn from_env_or(fallback_url: &str) -> Result<PoolConfig, ConfigError> {
        env::from_process_env(Some(fallback_url))
    }

    /// Reads the configuration through `lookup` (a variable's value, or `None` when unset):
    /// the testable core of [`PoolConfig::from_env`].
    ///
    /// | variable | setting | example |
    /// |---|---|---|
    /// | `DATABASE_URL` | the URL (else `fallback_url`, else an error) | `postgres://u:p@h/db` |
    /// | `DB_POOL_SIZE` | [`pool_size`](PoolConfigBuilder::pool_size) | `10` |
    /// | `DB_MAX_OVERFLOW` | [`max_overflow`](PoolConfigBuilder::max_overflow) | `10` |
    /// | `DB_POOL_TIMEOUT` | [`pool_timeout`](PoolConfigBuilder::pool_timeout) | `30s` |
    /// | `DB_POOL_RECYCLE` | [`max_lifetime`](PoolConfigBuilder::max_lifetime) | `30m`, `off` |
    /// | `DB_POOL_IDLE_TIMEOUT` | [`idle_timeout`](PoolConfigBuilder::idle_timeout) | `10m`, `off` |
    /// | `DB_POOL_PRE_PING` | [`validate_on_checkout`](PoolConfigBuilder::validate_on_checkout) | `true` |
    /// | `DB_VALIDATION_BYPASS` | [`validation_bypass_window`](PoolConfigBuilder::validation_bypass_window) | `500ms` |
    /// | `DB_VALIDATION_TIMEOUT` | [`validation_timeout`](PoolConfigBuilder::validation_timeout) | `5s` |
    /// | `DB_LIVENESS_PROBE` | [`liveness_probe`](PoolConfigBuilder::liveness_probe) | `on` |
    /// | `DB_HEDGED_VALIDATION` | [`hedged_validation`](PoolConfigBuilder::hedged_validation) | `on` |
    /// | `DB_KEEPALIVE_PING` | [`keepalive_ping`](PoolConfigBuilder::keepalive_ping) | `4m`, `off` |
    /// | `DB_LEAK_DETECTION` | [`leak_detection_threshold`](PoolConfigBuilder::leak_detection_threshold) | `60s`, `off` |
    /// | `DB_FAIL_FAST_WHEN_DOWN` | [`fail_fast_when_down`](PoolConfigBuilder::fail_fast_when_down) | `5s`, `off` |
    /// | `DB_CONNECT_TIMEOUT` | [`connect_timeout`](PoolConfigBuilder::connect_timeout) | `10s`, `off` |
    /// | `DB_KEEPALIVES` | [`keepalives`](PoolConfigBuilder::keepalives) | `on` |
    /// | `DB_KEEPALIVES_IDLE` | [`keepalives_idle`](PoolConfigBuilder::keepalives_idle) | `30s` |
    /// | `DB_KEEPALIVES_INTERVAL` | [`keepalives_interval`](PoolConfigBuilder::keepalives_interval) | `10s` |
    /// | `DB_KEEPALIVES_COUNT` | [`keepalives_count`](PoolConfigBuilder::keepalives_count) | `3` |
    /// | `DB_TCP_USER_TIMEOUT` | [`tcp_user_timeout`](PoolConfigBuilder::tcp_user_timeout) | `30s`, `off` |
    /// | `DB_SSLMODE` | [`ssl_mode`](PoolConfigBuilder::ssl_mode) | `verify-full` |
    /// | `DB_SSLROOTCERT` | [`ssl_root_cert`](PoolConfigBuilder::ssl_root_cert) | `/etc/ssl/rds.pem` |
    /// | `DB_APPLICATION_NAME` | [`application_name`](PoolConfigBuilder::application_name) | `orders-api` |
    /// | `DB_POOLER` | [`pooler`](PoolConfigBuilder::pooler) | `transaction` |
    /// | `DB_POOL_NAME` | [`name`](PoolConfigBuilder::name) | `automation` |
    ///
    /// Durations are whole numbers with a unit (`250ms`, `30s`, `5m`, `1h`) or plain seconds
    /// (`30`); see [`parse_duration`]. Settings that can be switched off (the table's `off`
    /// examples) also take `0`, `off` or `none`. Booleans are `true/false`, `1/0`, `yes/no`,
    /// `on/off`, in any case. Surrounding whitespace is ignored; an empty value is an error
    /// (unset the variable to get the default).
    ///
    /// # Errors
    /// [`ConfigError::MissingVar`] when `DATABASE_URL` is unset and there is no fallback;
    /// [`ConfigError::InvalidVar`] naming the variable for every value that cannot be used
    /// (a bad `DATABASE_URL` is shown redacted).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pool_core::config::PoolConfig;
    ///
    /// let vars = [("DB_POOL_SIZE", "50"), ("DB_MAX_OVERFLOW", "5"), ("DB_POOL_RECYCLE", "30m")];
    /// let lookup = |name: &str| {
    ///     vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    /// };
    /// let config = PoolConfig::from_lookup(lookup, Some("sqlite://dev.db"))?;
    /// assert_eq!(config.max_size(), 55);
    /// assert_eq!(config.lifecycle.max_lifetime, Some(Duration::from_secs(1800)));
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        fallback_url: Option<&str>,
    ) -> Result<PoolConfig, ConfigError> {
        env::from_lookup(&lookup, fallback_url)
    }

    /// This configuration as a manager inside a stock r2d2/bb8 pool uses it: the stock
    /// builder decides how many connections there are and when idle ones go, so the sizes
    /// never close a connection at checkin and leave a hedge room (`pool_size` at
    /// [`MAX_CONNECTIONS`], no overflow), and idle timeouts, keepalive pings and leak
    /// detection (which need the full pool's maintenance) are off.
    pub fn for_stock_pool(mut self) -> PoolConfig {
        self.pool_size = MAX_CONNECTIONS;
        self.max_overflow = 0;
        self.lifecycle.idle_timeout = None;
        self.lifecycle.keepalive_ping = None;
        self.lifecycle.leak_detection_threshold = None;
        self
    }

    /// The most connections the pool opens: `pool_size + max_overflow`.
    pub fn max_size(&self) -> u32 {
        self.pool_size.saturating_add(self.max_overflow)
    }

    /// Masks every secret of this pool in `text` (a driver's error message, a log line): the
    /// URL's password and secret parameters in any encoding and any quoted piece of them (see
    /// [`Redactor`](crate::redact::Redactor)), then every pattern [`redact`](crate::redact())
    /// finds. Idempotent; never panics.
    pub fn redact(&self, text: &str) -> String {
        self.url.redactor().redact(text)
    }
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("url", &self.url)
            .field("pool_size", &self.pool_size)
            .field("max_overflow", &self.max_overflow)
            .field("pool_timeout", &self.pool_timeout)
            .field("lifecycle", &self.lifecycle)
            .field("connect", &self.connect)
            .field("sqlite", &self.sqlite)
            .field("name", &self.name)
            .field("fail_fast_when_down", &self.fail_fast_when_down)
            .finish()
    }
}

/// Builds a [`PoolConfig`]; every method documents its default. Nothing is checked until
/// [`build`](PoolConfigBuilder::build).
#[derive(Clone)]
#[must_use = "a builder does nothing until `build()` is called"]
pub struct PoolConfigBuilder {
    url: String,
    pool_size: u32,
    max_overflow: u32,
    pool_timeout: Duration,
    lifecycle: LifecyclePolicy,
    connect: ConnectSettings,
    sqlite: SqliteSettings,
    name: String,
    fail_fast_when_down: Option<Duration>,
}

impl fmt::Debug for PoolConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfigBuilder")
            .field(
                "url",
                &crate::redact::redact_url(&self.url, crate::redact::Scope::Whole),
            )
            .field("pool_size", &self.pool_size)
            .field("max_overflow", &self.max_overflow)
            .field("pool_timeout", &self.pool_timeout)
            .field("lifecycle", &self.lifecycle)
            .field("connect", &self.connect)
            .field("sqlite", &self.sqlite)
            .field("name", &self.name)
            .field("fail_fast_when_down", &self.fail_fast_when_down)
            .finish()
    }
}

impl PoolConfigBuilder {
    fn new(url: &str) -> Self {
        PoolConfigBuilder {
            url: url.to_owned(),
            pool_size: 10,
            max_overflow: 10,
            pool_timeout: Duration::from_secs(30),
            lifecycle: LifecyclePolicy::default(),
            connect: ConnectSettings::default(),
            sqlite: SqliteSettings::default(),
            name: "default".to_owned(),
            fail_fast_when_down: None,
        }
    }

    /// Checks the settings and builds the configuration.
    ///
    /// # Errors
    /// The URL's parse error ([`ConfigError::InvalidUrl`], [`ConfigError::UnsupportedScheme`]),
    /// or [`ConfigError::Invalid`] naming the setting: `pool_size + max_overflow` of 0 (or
    /// above [`MAX_CONNECTIONS`]), a zero timeout or keepalive value, a duration over [`MAX_DURATION`], a
    /// `lifetime_jitter` outside `[0, 1)`, an empty name or certificate path, an
    /// `application_name` PostgreSQL would mangle.
    pub fn build(self) -> Result<PoolConfig, ConfigError> {
        let config = PoolConfig {
            url: DatabaseUrl::parse(&self.url)?,
            pool_size: self.pool_size,
            max_overflow: self.max_overflow,
            pool_timeout: self.pool_timeout,
            lifecycle: self.lifecycle,
            connect: self.connect,
            sqlite: self.sqlite,
            name: self.name,
            fail_fast_when_down: self.fail_fast_when_down,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Callback of [`with_settings!`](crate::with_settings): the builder's setters, one per row
/// of the settings table.
macro_rules! builder_setters {
    ($( $(#[doc = $doc:literal])* $name:ident($v:ident : $ty:ty) env $env:tt kind $kind:ident default $default:literal
        set |$b:ident| $set:expr; get |$c:ident| $get:expr; )*) => {
        impl PoolConfigBuilder {
            $(
                $(#[doc = $doc])*
                #[doc = ""]
                #[doc = concat!("Default: ", $default, ".")]
                pub fn $name(mut self, $v: $ty) -> Self {
                    {
                        let $b = &mut self;
                        $set;
                    }
                    self
                }
            )*
        }
    };
}
pub(crate) use builder_setters;

crate::with_settings!(crate::config::builder_setters);

impl PoolConfig {
    /// Checks every setting; [`PoolConfigBuilder::build`] calls it, and so does every pool
    /// built from a `PoolConfig` (whose fields are public and may have been edited since).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first setting that cannot be used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &'static str, reason: &str| ConfigError::Invalid {
            setting,
            reason: reason.to_owned(),
        };
        match self.pool_size.checked_add(self.max_overflow) {
            Some(0) => {
                return Err(invalid(
                    "pool_size",
                    "pool_size + max_overflow is 0, so no connection could ever be opened; \
                     set pool_size to at least 1 (e.g. 10)",
                ))
            }
            Some(max) if max <= MAX_CONNECTIONS => {}
            _ => {
                // Name the setting that is out of bounds on its own, else the overflow.
                let setting = if self.pool_size > MAX_CONNECTIONS {
                    "pool_size"
                } else {
                    "max_overflow"
                };
                return Err(ConfigError::Invalid {
                    setting,
                    reason: format!(
                        "pool_size {} + max_overflow {} is more than {MAX_CONNECTIONS} \
                         connections, the most a pool may allow (a server serves hundreds or \
                         a few thousand, and r2d2 reserves memory for every allowed \
                         connection up front); set a realistic maximum, e.g. pool_size 10 \
                         and max_overflow 10",
                        self.pool_size, self.max_overflow
                    ),
                });
            }
        }
        self.lifecycle.validate()?;
        let c = &self.connect;
        let required = [
            ("pool_timeout", Some(self.pool_timeout)),
            ("connect_timeout", c.connect_timeout),
            ("tcp_user_timeout", c.tcp_user_timeout),
            ("sqlite_busy_timeout", Some(self.sqlite.busy_timeout)),
        ];
        for (setting, value) in required {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(invalid(
                    setting,
                    "must be longer than zero; give a positive duration (or leave the default)",
                ));
            }
        }
        if c.keepalives.enabled {
            for (setting, value) in [
                ("keepalives_idle", c.keepalives.idle),
                ("keepalives_interval", c.keepalives.interval),
            ] {
                if value.is_zero() {
                    return Err(invalid(
                        setting,
                        "must be longer than zero; use e.g. 30s (or turn keepalives off)",
                    ));
                }
            }
            if c.keepalives.count == 0 {
                return Err(invalid(
                    "keepalives_count",
                    "must be at least 1; use e.g. 3 (or turn keepalives off)",
                ));
            }
        }
        let l = &self.lifecycle;
        let all_durations = [
            ("pool_timeout", Some(self.pool_timeout)),
            ("max_lifetime", l.max_lifetime),
            ("idle_timeout", l.idle_timeout),
            ("validation_bypass_window", Some(l.validation.bypass_window)),
            ("validation_timeout", Some(l.validation.timeout)),
            ("keepalive_ping", l.keepalive_ping),
            ("leak_detection_threshold", l.leak_detection_threshold),
            ("connect_timeout", c.connect_timeout),
            ("keepalives_idle", Some(c.keepalives.idle)),
            ("keepalives_interval", Some(c.keepalives.interval)),
            ("tcp_user_timeout", c.tcp_user_timeout),
            ("sqlite_busy_timeout", Some(self.sqlite.busy_timeout)),
        ];
        for (setting, value) in all_durations {
            if value.is_some_and(|d| d > MAX_DURATION) {
                return Err(invalid(
                    setting,
                    "is longer than 365 days, which is surely a unit mistake; give a shorter \
                     duration (or leave it unset to disable it, where that is allowed)",
                ));
            }
        }
        if c.ssl_root_cert
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "ssl_root_cert",
                "is an empty path; give the path of a PEM file with the root certificates",
            ));
        }
        if let Some(name) = &c.application_name {
            check_application_name(name)?;
        }
        if self.name.trim().is_empty() {
            return Err(invalid(
                "name",
                "is empty; give the pool a name to tell it apart in stats and logs, e.g. \"default\"",
            ));
        }
        Ok(())
    }
}

/// PostgreSQL keeps at most 63 bytes of `application_name` and replaces anything but
/// printable ASCII with `?`: refuse instead of letting it be mangled silently.
///
/// # Errors
/// [`ConfigError::Invalid`] saying what is wrong with the name.
pub fn check_application_name(name: &str) -> Result<(), ConfigError> {
    let reason = if name.is_empty() {
        "is empty; give a name such as \"orders-api\", or leave it unset"
    } else if name.len() > 63 {
        "is longer than 63 bytes, and PostgreSQL would cut it; use a shorter name"
    } else if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        "has characters other than printable ASCII, which PostgreSQL would replace with '?'; \
         use letters, digits and punctuation"
    } else {
        return Ok(());
    };
    Err(ConfigError::Invalid {
        setting: "application_name",
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(b: PoolConfigBuilder) -> Result<PoolConfig, String> {
        b.build().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = PoolConfig::builder("postgres://h/db").build().unwrap();
        assert_eq!((c.pool_size, c.max_overflow, c.max_size()), (10, 10, 20));
        assert_eq!(c.pool_timeout, Duration::from_secs(30));
        assert_eq!(c.lifecycle, LifecyclePolicy::default());
        assert_eq!(c.connect.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.connect.tcp_user_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.connect.keepalives, Keepalives::default());
        assert!(c.connect.keepalives.enabled);
        assert_eq!(c.connect.ssl_mode, None);
        assert_eq!(c.connect.application_name, None);
        assert_eq!(c.sqlite.busy_timeout, Duration::from_secs(5));
        assert!(c.sqlite.wal && c.sqlite.foreign_keys);
        assert_eq!(c.name, "default");
    }

    #[test]
    fn every_setter_reaches_its_field() {
        let s = Duration::from_secs;
        let c = PoolConfig::builder("postgres://h/db")
            .pool_size(50)
            .max_overflow(5)
            .pool_timeout(s(60))
            .max_lifetime(None)
            .lifetime_jitter(0.2)
            .idle_timeout(Some(s(300)))
            .validate_on_checkout(false)
            .validation_bypass_window(Duration::ZERO)
            .validation_timeout(s(2))
            .keepalive_ping(Some(s(240)))
            .leak_detection_threshold(Some(s(60)))
            .connect_timeout(None)
            .keepalives(true)
            .keepalives_idle(s(2))
            .keepalives_interval(s(1))
            .keepalives_count(5)
            .tcp_user_timeout(Some(s(3)))
            .ssl_mode(SslMode::VerifyFull)
            .ssl_root_cert("/etc/ssl/root.pem")
            .application_name("orders-api")
            .sqlite_busy_timeout(s(1))
            .sqlite_wal(false)
            .sqlite_foreign_keys(false)
            .name("automation")
            .build()
            .unwrap();
        assert_eq!(c.max_size(), 55);
        assert_eq!(c.pool_timeout, s(60));
        let l = &c.lifecycle;
        assert_eq!((l.max_lifetime, l.lifetime_jitter), (None, 0.2));
        assert_eq!(l.idle_timeout, Some(s(300)));
        assert!(!l.validation.on_checkout);
        assert_eq!(l.validation.bypass_window, Duration::ZERO);
        assert_eq!(l.validation.timeout, s(2));
        assert_eq!(l.keepalive_ping, Some(s(240)));
        assert_eq!(l.leak_detection_threshold, Some(s(60)));
        let k = &c.connect.keepalives;
        assert_eq!((k.idle, k.interval, k.count), (s(2), s(1), 5));
        assert_eq!(c.connect.connect_timeout, None);
        assert_eq!(c.connect.tcp_user_timeout, Some(s(3)));
        assert_eq!(c.connect.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(
            c.connect.ssl_root_cert,
            Some(PathBuf::from("/etc/ssl/root.pem"))
        );
        assert_eq!(c.connect.application_name.as_deref(), Some("orders-api"));
        assert_eq!(
            c.sqlite,
            SqliteSettings {
                busy_timeout: s(1),
                wal: false,
                foreign_keys: false
            }
        );
        assert_eq!(c.name, "automation");
    }

    #[test]
    fn a_pool_that_could_never_open_a_connection_is_refused() {
        let err = PoolConfig::builder("postgres://h/db")
            .pool_size(0)
            .max_overflow(0)
            .build()
            .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                setting: "pool_size",
                ..
            }
        ));
        assert!(PoolConfig::builder("postgres://h/db")
            .pool_size(0)
            .build()
            .is_ok());
        let err = build(
            PoolConfig::builder("postgres://h/db")
                .pool_size(u32::MAX)
                .max_overflow(1),
        );
        assert!(err.unwrap_err().contains("max_overflow"));
    }

    #[test]
    fn the_bounds_are_inclusive_and_the_error_names_the_setting_past_them() {
        let b = |size: u32, overflow: u32| {
            PoolConfig::builder("postgres://h/db")
                .pool_size(size)
                .max_overflow(overflow)
                .build()
        };
        assert!(b(MAX_CONNECTIONS, 0).is_ok());
        assert!(b(MAX_CONNECTIONS - 5, 5).is_ok());
        for (size, overflow, named) in [
            (MAX_CONNECTIONS, 1, "max_overflow"),
            (MAX_CONNECTIONS + 1, 0, "pool_size"),
            (1, MAX_CONNECTIONS, "max_overflow"),
            (u32::MAX, 1, "pool_size"),
        ] {
            match b(size, overflow) {
                Err(ConfigError::Invalid { setting, reason }) => {
                    assert_eq!(setting, named, "{size} + {overflow}: {reason}");
                    assert!(reason.contains("10000 connections"), "{reason}");
                }
                other => panic!("{size} + {overflow} was not refused: {other:?}"),
            }
        }
        let life = |d: Duration| {
            PoolConfig::builder("postgres://h/db")
                .max_lifetime(Some(d))
                .build()
        };
        assert!(life(MAX_DURATION).is_ok());
        assert!(life(MAX_DURATION + Duration::from_secs(1)).is_err());
        let name = |n: &str| build(PoolConfig::builder("postgres://h/db").application_name(n));
        assert!(name(&"x".repeat(63)).is_ok());
        assert!(name(" ~").is_ok());
    }

    #[test]
    fn modes_display_in_the_spelling_they_parse_from() {
        for mode in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.to_string(), mode.as_str());
            assert_eq!(mode.to_string().parse::<SslMode>().unwrap(), mode);
        }
        for pooler in [Pooler::None, Pooler::Session, Pooler::Transaction] {
            assert_eq!(pooler.to_string(), pooler.as_str());
            assert_eq!(pooler.to_string().parse::<Pooler>().unwrap(), pooler);
        }
    }

    #[test]
    fn zero_timeouts_bad_jitter_and_absurd_durations_are_refused() {
        let b = || PoolConfig::builder("postgres://h/db");
        for (builder, setting) in [
            (b().pool_timeout(Duration::ZERO), "pool_timeout"),
            (b().connect_timeout(Some(Duration::ZERO)), "connect_timeout"),
            (
                b().tcp_user_timeout(Some(Duration::ZERO)),
                "tcp_user_timeout",
            ),
            (b().keepalives_idle(Duration::ZERO), "keepalives_idle"),
            (b().keepalives_count(0), "keepalives_count"),
            (b().validation_timeout(Duration::ZERO), "validation_timeout"),
            (b().idle_timeout(Some(Duration::ZERO)), "idle_timeout"),
            (
                b().sqlite_busy_timeout(Duration::ZERO),
                "sqlite_busy_timeout",
            ),
            (b().lifetime_jitter(1.0), "lifetime_jitter"),
            (b().lifetime_jitter(-0.1), "lifetime_jitter"),
            (b().lifetime_jitter(f64::NAN), "lifetime_jitter"),
            (b().max_lifetime(Some(Duration::MAX)), "max_lifetime"),
            (b().ssl_root_cert(""), "ssl_root_cert"),
            (b().name(" "), "name"),
        ] {
            let msg = build(builder).unwrap_err();
            assert!(msg.contains(setting), "{setting}: {msg}");
        }
        assert!(build(b().keepalives(false).keepalives_count(0)).is_ok());
    }

    #[test]
    fn application_names_postgres_would_mangle_are_refused() {
        let b = |n: &str| build(PoolConfig::builder("postgres://h/db").application_name(n));
        assert!(b("orders-api worker 3").is_ok());
        assert!(b(&"x".repeat(64)).unwrap_err().contains("63 bytes"));
        assert!(b("café").unwrap_err().contains("ASCII"));
        assert!(b("").is_err());
    }

    #[test]
    fn a_bad_url_fails_the_build_redacted() {
        let msg = build(PoolConfig::builder("postgres://u:S3NT1NEL@h:port/db")).unwrap_err();
        assert!(msg.contains("port"), "{msg}");
        assert!(!msg.contains("S3NT1NEL"), "{msg}");
    }

    #[test]
    fn sslmodes_parse_in_libpq_spelling() {
        for mode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(mode.parse::<SslMode>().unwrap().as_str(), mode);
        }
        assert_eq!(
            " VERIFY-FULL ".parse::<SslMode>().unwrap(),
            SslMode::VerifyFull
        );
        assert!(matches!(
            "verify_full".parse::<SslMode>(),
            Err(ConfigError::UnknownSslMode { .. })
        ));
    }

    #[test]
    fn pooler_modes_parse_and_a_bad_one_is_refused_naming_the_variable() {
        for mode in ["none", "session", "transaction"] {
            assert_eq!(mode.parse::<Pooler>().unwrap().as_str(), mode);
        }
        assert_eq!(
            " Transaction ".parse::<Pooler>().unwrap(),
            Pooler::Transaction
        );
        assert!(Pooler::Transaction.is_transaction_mode());
        assert!(!Pooler::Session.is_transaction_mode());
        let lookup = |name: &str| (name == "DB_POOLER").then(|| "statement".to_owned());
        let err = PoolConfig::from_lookup(lookup, Some("postgres://app@db/app")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::InvalidVar { var, .. } if var == "DB_POOLER"),
            "{err}"
        );
        assert!(
            err.to_string().contains("none, session or transaction"),
            "{err}"
        );
    }

    #[test]
    fn debug_output_of_the_builder_and_config_hides_the_password() {
        let b = PoolConfig::builder("postgres://u:S3NT1NEL@h/db").pool_size(7);
        let shown = format!("{b:?}");
        assert!(!shown.contains("S3NT1NEL"), "{shown}");
        assert!(
            shown.starts_with("PoolConfigBuilder {") && shown.contains("pool_size: 7"),
            "{shown}"
        );
        assert!(shown.contains("u:***@h/db"), "{shown}");
        let c = b.build().unwrap();
        assert!(!format!("{c:?}").contains("S3NT1NEL"));
        assert!(format!("{c:?}").contains("u:***@h/db"));
    }
}
