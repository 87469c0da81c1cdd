//! The one table of settings: name, environment variable, default, kind (unit and check),
//! and doc line, written once in [`with_settings!`](crate::with_settings).
//!
//! Everything else comes from it: the setters of [`PoolConfigBuilder`] and of the adapters'
//! builders (same names, same docs), the environment reader ([`PoolConfig::from_lookup`]),
//! the list of variables ([`env_vars`](crate::config::env_vars)) and [`SETTINGS`], which a
//! test compares with the README's settings table and with the defaults the builder really
//! has.
//!
//! [`PoolConfigBuilder`]: crate::config::PoolConfigBuilder
//! [`PoolConfig::from_lookup`]: crate::config::PoolConfig::from_lookup

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{PoolConfig, Pooler, SslMode};

/// How a setting's value is written (in the environment) and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole number (`10`).
    Count,
    /// A positive duration (`250ms`, `30s`, `5m`, `1h`, or seconds).
    Duration,
    /// A duration that may be zero.
    Window,
    /// A duration, or `off` (also `0`, `none`) to disable it.
    OptionalDuration,
    /// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
    Bool,
    /// A fraction in `[0, 1)`.
    Fraction,
    /// libpq's `sslmode` spelling.
    SslMode,
    /// `none`, `session` or `transaction` (see [`Pooler`]).
    Pooler,
    /// A file path.
    Path,
    /// Text.
    Text,
}

impl Kind {
    /// What a value of this kind looks like, for documentation tables.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Count => "number",
            Kind::Duration | Kind::Window => "duration",
            Kind::OptionalDuration => "duration or off",
            Kind::Bool => "on/off",
            Kind::Fraction => "fraction",
            Kind::SslMode => "sslmode",
            Kind::Pooler => "none/session/transaction",
            Kind::Path => "path",
            Kind::Text => "text",
        }
    }
}

/// One row of the settings table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The builder method (and the name errors use).
    pub name: &'static str,
    /// The environment variable [`PoolConfig::from_env`] reads, if any.
    pub env: Option<&'static str>,
    /// The default, as the documentation shows it (`10`, `30s`, `off`, `unset`).
    pub default: &'static str,
    /// How the value is written and checked.
    pub kind: Kind,
    /// The doc line of the setter.
    pub doc: &'static str,
}

/// The settings table, in display order. See the [module documentation](self).
pub const SETTINGS: &[Setting] = crate::with_settings!(crate::settings_table);

/// The setting an environment variable sets.
pub fn by_env(var: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.env == Some(var))
}

/// The setting called `name`.
pub fn by_name(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Every setting's value in `config`, shown as the table shows defaults: applied to a
/// freshly built configuration, it must equal each [`Setting::default`] (a test checks it).
pub fn shown_values(config: &PoolConfig) -> Vec<(&'static str, String)> {
    crate::with_settings!(crate::settings_shown_values)(config)
}

/// A value shown the way the table shows defaults.
pub trait Show {
    /// The text.
    fn show(&self) -> String;
}

/// A duration in the largest unit that divides it: `500ms`, `30s`, `5m`, `1h`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

impl Show for Duration {
    fn show(&self) -> String {
        show_duration(*self)
    }
}

impl Show for Option<Duration> {
    fn show(&self) -> String {
        self.map_or_else(|| "off".to_owned(), show_duration)
    }
}

impl Show for u32 {
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Show for f64 {
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Show for bool {
    fn show(&self) -> String {
        if *self { "on" } else { "off" }.to_owned()
    }
}

impl Show for String {
    fn show(&self) -> String {
        self.clone()
    }
}

impl Show for Option<String> {
    fn show(&self) -> String {
        self.clone().unwrap_or_else(|| "unset".to_owned())
    }
}

impl Show for Option<PathBuf> {
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "unset".to_owned(), |p| p.display().to_string())
    }
}

impl Show for Option<SslMode> {
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "unset".to_owned(), |m| m.as_str().to_owned())
    }
}

impl Show for Pooler {
    fn show(&self) -> String {
        self.as_str().to_owned()
    }
}

/// The table. Each row: doc comment, `name(v: Type)`, `env "VAR"` (or `env none`), `kind`,
/// `default "shown"`, `set |b| ...` (on a `&mut PoolConfigBuilder`), `get |c| ...` (on a
/// `&PoolConfig`). Invoked with a callback macro that turns the rows into code; not meant
/// to be called outside this workspace.
#[doc(hidden)]
#[macro_export]
macro_rules! with_settings {
    ($($callback:tt)+) => {
        $($callback)+! {
            /// Connections kept open once load drops: opened when the pool is built, and the
            /// most the pool keeps when they are returned. Zero keeps none: every connection
            /// is closed when returned (SQLAlchemy reads 0 as "no limit"; here the limit is
            /// always `pool_size + max_overflow`).
            pool_size(v: u32) env "DB_POOL_SIZE" kind Count default "10"
                set |b| b.pool_size = v; get |c| c.pool_size;
            /// Extra connections opened under load, beyond `pool_size`; each is closed when
            /// returned while the pool holds `pool_size` or more. `pool_size + max_overflow`
            /// is at least 1 and at most 10 000 (`MAX_CONNECTIONS`).
            max_overflow(v: u32) env "DB_MAX_OVERFLOW" kind Count default "10"
                set |b| b.max_overflow = v; get |c| c.max_overflow;
            /// How long a checkout waits for a connection before failing.
            pool_timeout(v: ::std::time::Duration) env "DB_POOL_TIMEOUT" kind Duration default "30s"
                set |b| b.pool_timeout = v; get |c| c.pool_timeout;
            /// Retire connections after this long (SQLAlchemy's `pool_recycle`); `None` keeps
            /// them.
            max_lifetime(v: ::std::option::Option<::std::time::Duration>) env "DB_POOL_RECYCLE" kind OptionalDuration default "30m"
                set |b| b.lifecycle.max_lifetime = v; get |c| c.lifecycle.max_lifetime;
            /// Spread of lifetimes, a fraction in `[0, 1)`: each connection lives between
            /// `max_lifetime × (1 − jitter)` and `max_lifetime`, so they do not all reconnect
            /// in the same second.
            lifetime_jitter(v: f64) env none kind Fraction default "0.1"
                set |b| b.lifecycle.lifetime_jitter = v; get |c| c.lifecycle.lifetime_jitter;
            /// Close connections idle this long (never below a budget class's reserved
            /// floor); `None` never does.
            idle_timeout(v: ::std::option::Option<::std::time::Duration>) env "DB_POOL_IDLE_TIMEOUT" kind OptionalDuration default "10m"
                set |b| b.lifecycle.idle_timeout = v; get |c| c.lifecycle.idle_timeout;
            /// Validate connections on checkout (`pool_pre_ping`, done cheaply: the liveness
            /// probe on every checkout, a ping only past the bypass window).
            validate_on_checkout(v: bool) env "DB_POOL_PRE_PING" kind Bool default "on"
                set |b| b.lifecycle.validation.on_checkout = v; get |c| c.lifecycle.validation.on_checkout;
            /// A connection used or validated less than this long ago skips the ping (the
            /// probe still runs); zero pings on every checkout.
            validation_bypass_window(v: ::std::time::Duration) env "DB_VALIDATION_BYPASS" kind Window default "500ms"
                set |b| b.lifecycle.validation.bypass_window = v; get |c| c.lifecycle.validation.bypass_window;
            /// The longest a validation ping may take, even against a hung server.
            validation_timeout(v: ::std::time::Duration) env "DB_VALIDATION_TIMEOUT" kind Duration default "5s"
                set |b| b.lifecycle.validation.timeout = v; get |c| c.lifecycle.validation.timeout;
            /// The zero-round-trip liveness probe on every checkout; off makes every checkout
            /// ping when validation is on (for comparison and debugging).
            liveness_probe(v: bool) env "DB_LIVENESS_PROBE" kind Bool default "on"
                set |b| b.lifecycle.validation.probe = v; get |c| c.lifecycle.validation.probe;
            /// Race a validation ping slower than 4 × the observed round trip (at least
            /// 100 ms) against a fresh connect and hand out whichever is ready first, within
            /// the pool's sizes and budget.
            hedged_validation(v: bool) env "DB_HEDGED_VALIDATION" kind Bool default "on"
                set |b| b.lifecycle.validation.hedge = v; get |c| c.lifecycle.validation.hedge;
            /// Ping idle connections this often so NATs and proxies keep them (HikariCP's
            /// `keepaliveTime`); `None` disables it.
            keepalive_ping(v: ::std::option::Option<::std::time::Duration>) env "DB_KEEPALIVE_PING" kind OptionalDuration default "off"
                set |b| b.lifecycle.keepalive_ping = v; get |c| c.lifecycle.keepalive_ping;
            /// Report a connection held longer than this, once, with where it was checked
            /// out; `None` disables it.
            leak_detection_threshold(v: ::std::option::Option<::std::time::Duration>) env "DB_LEAK_DETECTION" kind OptionalDuration default "off"
                set |b| b.lifecycle.leak_detection_threshold = v; get |c| c.lifecycle.leak_detection_threshold;
            /// Fail checkouts that need a new connection at once, with the cause, once
            /// connects have been failing this long (a breaker, for handlers that answer 503
            /// instead of waiting); `None` waits up to `pool_timeout`.
            fail_fast_when_down(v: ::std::option::Option<::std::time::Duration>) env "DB_FAIL_FAST_WHEN_DOWN" kind OptionalDuration default "off"
                set |b| b.fail_fast_when_down = v; get |c| c.fail_fast_when_down;
            /// The longest a connection attempt may take; `None` waits as long as the driver
            /// does.
            connect_timeout(v: ::std::option::Option<::std::time::Duration>) env "DB_CONNECT_TIMEOUT" kind OptionalDuration default "10s"
                set |b| b.connect.connect_timeout = v; get |c| c.connect.connect_timeout;
            /// TCP keepalive probes on idle connections.
            keepalives(v: bool) env "DB_KEEPALIVES" kind Bool default "on"
                set |b| b.connect.keepalives.enabled = v; get |c| c.connect.keepalives.enabled;
            /// Idle time before the first keepalive probe.
            keepalives_idle(v: ::std::time::Duration) env "DB_KEEPALIVES_IDLE" kind Duration default "30s"
                set |b| b.connect.keepalives.idle = v; get |c| c.connect.keepalives.idle;
            /// Time between keepalive probes.
            keepalives_interval(v: ::std::time::Duration) env "DB_KEEPALIVES_INTERVAL" kind Duration default "10s"
                set |b| b.connect.keepalives.interval = v; get |c| c.connect.keepalives.interval;
            /// Unanswered keepalive probes before the connection is declared dead.
            keepalives_count(v: u32) env "DB_KEEPALIVES_COUNT" kind Count default "3"
                set |b| b.connect.keepalives.count = v; get |c| c.connect.keepalives.count;
            /// How long sent data may stay unacknowledged (`TCP_USER_TIMEOUT`); set it with
            /// keepalives. `None` leaves the OS default (minutes).
            tcp_user_timeout(v: ::std::option::Option<::std::time::Duration>) env "DB_TCP_USER_TIMEOUT" kind OptionalDuration default "30s"
                set |b| b.connect.tcp_user_timeout = v; get |c| c.connect.tcp_user_timeout;
            /// TLS mode (libpq's `sslmode`). An `sslmode` written in the URL wins; unset, the
            /// URL's or the driver's default (`prefer`) applies.
            ssl_mode(v: $crate::config::SslMode) env "DB_SSLMODE" kind SslMode default "unset"
                set |b| b.connect.ssl_mode = Some(v); get |c| c.connect.ssl_mode;
            /// Root certificates to verify the server with (libpq's `sslrootcert`).
            ssl_root_cert(v: impl Into<::std::path::PathBuf>) env "DB_SSLROOTCERT" kind Path default "unset"
                set |b| b.connect.ssl_root_cert = Some(v.into()); get |c| c.connect.ssl_root_cert;
            /// The name shown in `pg_stat_activity` (printable ASCII, at most 63 bytes). An
            /// `application_name` in the URL wins.
            application_name(v: impl Into<::std::string::String>) env "DB_APPLICATION_NAME" kind Text default "unset"
                set |b| b.connect.application_name = Some(v.into()); get |c| c.connect.application_name;
            /// The connection pooler in front of PostgreSQL: `none`, `session`, or
            /// `transaction` for PgBouncer/Supavisor in transaction mode, where the server
            /// connection changes between transactions: no prepared statement outlives its
            /// statement, and an ambiguous commit is resolved only on the server that ran it.
            pooler(v: $crate::config::Pooler) env "DB_POOLER" kind Pooler default "none"
                set |b| b.connect.pooler = v; get |c| c.connect.pooler;
            /// How long a SQLite writer waits for a lock instead of failing with
            /// "database is locked".
            sqlite_busy_timeout(v: ::std::time::Duration) env none kind Duration default "5s"
                set |b| b.sqlite.busy_timeout = v; get |c| c.sqlite.busy_timeout;
            /// Journal SQLite databases in WAL mode (readers do not block the writer).
            sqlite_wal(v: bool) env none kind Bool default "on"
                set |b| b.sqlite.wal = v; get |c| c.sqlite.wal;
            /// Enforce SQLite foreign keys.
            sqlite_foreign_keys(v: bool) env none kind Bool default "on"
                set |b| b.sqlite.foreign_keys = v; get |c| c.sqlite.foreign_keys;
            /// The pool's name in stats, status reports, events and errors.
            name(v: impl Into<::std::string::String>) env "DB_POOL_NAME" kind Text default "default"
                set |b| b.name = v.into(); get |c| c.name;
        }
    };
}

/// `env "VAR"` → `Some("VAR")`, `env none` → `None`.
#[doc(hidden)]
#[macro_export]
macro_rules! settings_env {
    (none) => {
        ::std::option::Option::None
    };
    ($var:literal) => {
        ::std::option::Option::Some($var)
    };
}

/// Callback of [`with_settings!`]: the [`SETTINGS`] array.
#[doc(hidden)]
#[macro_export]
macro_rules! settings_table {
    ($( $(#[doc = $doc:literal])* $name:ident($v:ident : $ty:ty) env $env:tt kind $kind:ident default $default:literal
        set |$b:ident| $set:expr; get |$c:ident| $get:expr; )*) => {
        &[$(
            $crate::settings::Setting {
                name: stringify!($name),
                env: $crate::settings_env!($env),
                default: $default,
                kind: $crate::settings::Kind::$kind,
                doc: concat!($($doc, "\n"),*),
            },
        )*]
    };
}

/// Callback of [`with_settings!`]: every setting's value in a configuration, shown.
#[doc(hidden)]
#[macro_export]
macro_rules! settings_shown_values {
    ($( $(#[doc = $doc:literal])* $name:ident($v:ident : $ty:ty) env $env:tt kind $kind:ident default $default:literal
        set |$b:ident| $set:expr; get |$c:ident| $get:expr; )*) => {
        |config: &$crate::config::PoolConfig| -> ::std::vec::Vec<(&'static str, ::std::string::String)> {
            use $crate::settings::Show;
            vec![$( (stringify!($name), { let $c = config; $get.show() }), )*]
        }
    };
}

/// Callback of [`with_settings!`]: the setters of a builder that holds a
/// `PoolConfigBuilder` in a field named `config` (the adapters' builders): same names, same
/// docs, forwarded.
#[doc(hidden)]
#[macro_export]
macro_rules! forward_settings {
    ($( $(#[doc = $doc:literal])* $name:ident($v:ident : $ty:ty) env $env:tt kind $kind:ident default $default:literal
        set |$b:ident| $set:expr; get |$c:ident| $get:expr; )*) => {
        $(
            $(#[doc = $doc])*
            #[doc = ""]
            #[doc = concat!("Default: ", $default, ".")]
            pub fn $name(mut self, $v: $ty) -> Self {
                self.config = self.config.$name($v);
                self
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_says_how_its_values_are_written() {
        let units: Vec<(Kind, &str)> = [
            Kind::Count,
            Kind::Duration,
            Kind::Window,
            Kind::OptionalDuration,
            Kind::Bool,
            Kind::Fraction,
            Kind::SslMode,
            Kind::Pooler,
            Kind::Path,
            Kind::Text,
        ]
        .into_iter()
        .map(|k| (k, k.unit()))
        .collect();
        assert_eq!(units[0], (Kind::Count, "number"));
        assert_eq!(units[3], (Kind::OptionalDuration, "duration or off"));
        assert_eq!(
            Kind::Duration.unit(),
            Kind::Window.unit(),
            "both are durations"
        );
        let mut distinct: Vec<&str> = units.iter().map(|(_, u)| *u).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), units.len() - 1, "{units:?}");
        assert!(distinct.iter().all(|u| !u.is_empty() && *u != "xyzzy"));
    }

    #[test]
    fn every_default_in_the_table_is_the_default_the_builder_has() {
        let config = PoolConfig::builder("postgres://app@db/app")
            .build()
            .unwrap();
        let shown = shown_values(&config);
        assert_eq!(shown.len(), SETTINGS.len());
        for ((name, value), setting) in shown.iter().zip(SETTINGS) {
            assert_eq!(*name, setting.name);
            assert_eq!(
                value, setting.default,
                "{name}: the table says {}",
                setting.default
            );
        }
    }

    #[test]
    fn names_and_variables_are_unique_and_every_variable_is_read() {
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        let vars: Vec<_> = crate::config::env_vars().collect();
        assert_eq!(vars[0], "DATABASE_URL");
        assert_eq!(
            vars.len(),
            1 + SETTINGS.iter().filter(|s| s.env.is_some()).count(),
            "{vars:?}"
        );
        let mut unique = vars.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), vars.len());
        for setting in SETTINGS {
            assert!(
                !setting.doc.trim().is_empty(),
                "{} has no doc",
                setting.name
            );
            if let Some(var) = setting.env {
                assert_eq!(by_env(var).map(|s| s.name), Some(setting.name));
            }
        }
    }

    #[test]
    fn a_value_set_through_its_variable_reaches_its_setting() {
        // One non-default value per kind, through the environment reader.
        let vars = [
            ("DB_POOL_SIZE", "7"),
            ("DB_POOL_RECYCLE", "off"),
            ("DB_VALIDATION_BYPASS", "0"),
            ("DB_LIVENESS_PROBE", "off"),
            ("DB_SSLMODE", "verify-full"),
            ("DB_SSLROOTCERT", "/etc/ssl/root.pem"),
            ("DB_APPLICATION_NAME", "orders"),
            ("DB_POOLER", "transaction"),
        ];
        let lookup = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        let config = PoolConfig::from_lookup(lookup, Some("postgres://app@db/app")).unwrap();
        let shown: std::collections::HashMap<_, _> = shown_values(&config).into_iter().collect();
        for (var, expected) in [
            ("DB_POOL_SIZE", "7"),
            ("DB_POOL_RECYCLE", "off"),
            ("DB_VALIDATION_BYPASS", "0s"),
            ("DB_LIVENESS_PROBE", "off"),
            ("DB_SSLMODE", "verify-full"),
            ("DB_SSLROOTCERT", "/etc/ssl/root.pem"),
            ("DB_APPLICATION_NAME", "orders"),
            ("DB_POOLER", "transaction"),
        ] {
            let setting = by_env(var).unwrap();
            assert_eq!(shown[setting.name], expected, "{var}");
        }
    }
}
