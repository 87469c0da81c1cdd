//! The backend- and pool-agnostic core of resilient-diesel.
//!
//! Nothing here knows Diesel, r2d2 or bb8: the adapters (`diesel-r2d2-ext`, the async one)
//! build on these pieces, each in one file:
//!
//! | module | holds |
//! |---|---|
//! | [`config`] | [`PoolConfig`]: a builder with documented defaults, and the same from environment variables |
//! | [`url`] | [`DatabaseUrl`]: which backend, where, and a password that never prints |
//! | [`redact`](mod@redact) | [`redact()`](fn@redact): masks passwords in URLs, connection strings and free text |
//! | [`lifecycle`] | [`LifecyclePolicy`]: when a connection is trusted, checked or retired |
//! | [`stats`] | [`PoolStats`]: counters and wait-time percentiles, read as a [`StatsSnapshot`] |
//! | [`status`] | [`StatusReport`]: the snapshots as a report for people and as JSON |
//! | [`metrics`](mod@metrics) | the pools' metrics through the `metrics` facade (feature `metrics`): OpenTelemetry's `db.client.connection.*` and ours |
//! | [`readiness`] | [`Health`]: whether a pool can serve now, for readiness probes; [`WarmUp`] for startup gates |
//! | [`events`] | [`PoolEvent`]s, the [`EventListener`] trait and the [`LogListener`] |
//! | [`budget`] | [`Budget`]: a connection budget shared by classes with reserved floors |
//! | [`classes`] | [`Class`](classes::Class) and [`Classes`](classes::Classes): one pool per class of work, planned from the budget |
//! | [`capacity`] | [`ServerCapacity`](capacity::ServerCapacity): does the budget fit what the server has left |
//! | [`classify`] | [`ErrorClass`]: which errors are transient, which mean the pool is stale |
//! | [`retry`] | [`RetryPolicy`], the retry loop behind `with_retry` / `commit_with_retry`, and the resolution of a cut-off `COMMIT` |
//! | [`engine`] | the checkout engine both adapters run: pool and connection state, checkout and checkin decisions, the FIFO gate, the watchdog, leak timers |
//! | [`settings`] | the one table of settings: name, environment variable, default, kind, doc |
//! | [`error`] | [`ConfigError`]: what was wrong, where, and what to do |
//!
//! ```
//! use std::time::Duration;
//! use pool_core::{Gauges, PoolConfig, PoolStats, StatusReport};
//!
//! let config = PoolConfig::builder("postgres://app:s3cret@db.example.com:5432/app")
//!     .pool_size(50)
//!     .max_overflow(5)
//!     .pool_timeout(Duration::from_secs(60))
//!     .max_lifetime(Some(Duration::from_secs(30 * 60)))
//!     .name("automation")
//!     .build()?;
//! assert_eq!(config.max_size(), 55);
//! assert!(!format!("{config:?}").contains("s3cret"));
//!
//! // The adapter records what happens and knows its gauges; a snapshot combines them.
//! let stats = PoolStats::new();
//! stats.record_connect();
//! stats.record_checkout(Duration::from_millis(2));
//! let snapshot = stats.snapshot(Gauges {
//!     name: config.name.clone(),
//!     in_use: 1,
//!     idle: 4,
//!     pool_size: config.pool_size,
//!     max_overflow: config.max_overflow,
//!     ..Gauges::default()
//! });
//! let report = StatusReport::new(vec![snapshot]).with_budget(60, 5);
//! println!("{report}");
//! assert!(report.to_string().contains("In Use: 1/55"));
//! # Ok::<(), pool_core::ConfigError>(())
//! ```
#![deny(missing_docs)]

pub mod budget;
pub mod capacity;
pub mod classes;
pub mod classify;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod lifecycle;
pub mod metrics;
pub mod readiness;
pub mod redact;
pub mod retry;
pub mod settings;
pub mod stats;
pub mod status;
pub mod url;

pub use crate::budget::{Budget, BudgetError, BudgetSnapshot, ClassId, Permit};
pub use crate::classify::ErrorClass;
pub use crate::config::{parse_duration, PoolConfig, PoolConfigBuilder, Pooler, SslMode};
pub use crate::error::ConfigError;
#[cfg(feature = "tracing")]
pub use crate::events::TracingListener;
pub use crate::events::{EventListener, LogListener, PoolEvent};
pub use crate::lifecycle::LifecyclePolicy;
pub use crate::readiness::{ClassesHealth, Health, HealthState, WarmUp};
pub use crate::redact::{redact, redact_with};
pub use crate::retry::{RetryError, RetryPolicy};
pub use crate::stats::{CloseReason, Gauges, PoolStats, StatsSnapshot};
pub use crate::status::StatusReport;
pub use crate::url::{Backend, DatabaseUrl};

#[cfg(test)]
mod no_secret_leaks {
    //! The promise of the whole crate: no password in any `Debug` or `Display`.

    use super::*;

    const SENTINEL: &str = "S3NT1NEL";

    fn variant(e: &ConfigError) -> &'static str {
        // No wildcard: a new variant must be added to this test.
        match e {
            ConfigError::InvalidUrl { .. } => "InvalidUrl",
            ConfigError::UnsupportedScheme { .. } => "UnsupportedScheme",
            ConfigError::MissingVar { .. } => "MissingVar",
            ConfigError::InvalidVar { .. } => "InvalidVar",
            ConfigError::Invalid { .. } => "Invalid",
            ConfigError::UnknownSslMode { .. } => "UnknownSslMode",
            ConfigError::UnknownSetting { .. } => "UnknownSetting",
        }
    }

    fn assert_clean(what: &str, shown: &str) {
        assert!(
            !shown.contains(SENTINEL),
            "{what} leaked the password: {shown}"
        );
    }

    #[test]
    fn the_sentinel_password_never_appears_in_urls_configs_or_errors() {
        let urls = [
            "postgres://app:S3NT1NEL@db.example.com:5432/app?sslmode=require",
            "postgresql://app:S3NT1NEL@/app?host=/var/run/postgresql",
            "postgres://app@db/app?password=S3NT1NEL",
            "postgres://app:p%40S3NT1NEL@db/app",
            "mysql://root:S3NT1NEL@127.0.0.1:3306/app",
            "mariadb://root:S3NT1NEL@db/app?sslpassword=S3NT1NEL",
        ];
        for url in urls {
            let parsed = DatabaseUrl::parse(url).unwrap();
            assert_clean("DatabaseUrl Debug", &format!("{parsed:?}"));
            assert_clean("DatabaseUrl Display", &format!("{parsed}"));
            assert_clean("DatabaseUrl::redacted", &parsed.redacted());
            assert_clean(
                "DatabaseUrl::query_pairs",
                &format!("{:?}", parsed.query_pairs()),
            );
            assert_eq!(
                parsed.expose_secret(),
                url,
                "the driver gets the URL as written"
            );
            let builder = PoolConfig::builder(url).application_name("orders-api");
            assert_clean("PoolConfigBuilder Debug", &format!("{builder:?}"));
            let config = builder.build().unwrap();
            assert_clean("PoolConfig Debug", &format!("{config:?}"));
            assert_clean("PoolConfig Debug (pretty)", &format!("{config:#?}"));
        }

        let env = |vars: &'static [(&'static str, &'static str)]| {
            PoolConfig::from_lookup(
                move |k| {
                    vars.iter()
                        .find(|(n, _)| *n == k)
                        .map(|(_, v)| (*v).to_owned())
                },
                None,
            )
        };
        let errors: Vec<ConfigError> = vec![
            DatabaseUrl::parse("postgres://app:S3NT1NEL@db:port/app").unwrap_err(),
            DatabaseUrl::parse("postgres://app:S3NT1NEL@h1,h2:x/app").unwrap_err(),
            DatabaseUrl::parse("postgres://app:pass/S3NT1NEL@db/app").unwrap_err(),
            DatabaseUrl::parse("host=db password=S3NT1NEL").unwrap_err(),
            DatabaseUrl::parse("redis://app:S3NT1NEL@cache/0").unwrap_err(),
            DatabaseUrl::parse("S3NT1NEL").unwrap_err(),
            env(&[]).unwrap_err(),
            env(&[("DATABASE_URL", "postgres://app:S3NT1NEL@db:99999/app")]).unwrap_err(),
            env(&[("DATABASE_URL", "S3NT1NEL")]).unwrap_err(),
            env(&[
                ("DATABASE_URL", "postgres://app:S3NT1NEL@db/app"),
                ("DB_POOL_SIZE", "S3NT1NEL"),
            ])
            .unwrap_err(),
            PoolConfig::builder("postgres://app:S3NT1NEL@db/app")
                .pool_size(0)
                .max_overflow(0)
                .build()
                .unwrap_err(),
            "password=S3NT1NEL".parse::<SslMode>().unwrap_err(),
            PoolConfig::from_settings([
                ("url", "postgres://app:S3NT1NEL@db/app"),
                ("S3NT1NEL", "1"),
            ])
            .unwrap_err(),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for e in &errors {
            seen.insert(variant(e));
            assert_clean("ConfigError Display", &e.to_string());
            assert_clean("ConfigError Debug", &format!("{e:?}"));
        }
        assert_eq!(seen.len(), 7, "every variant is exercised: {seen:?}");
    }
}

/// A deadline on this crate's unit-test binary as a whole. The run takes a few seconds in a
/// debug build; a library loop that stops advancing (a scan whose index no longer moves, a
/// retry schedule of zero delays) would otherwise hang it, as libtest has no per-test timeout
/// and a spinning call cannot be interrupted. Past [`DEADLINE`](test_deadline::DEADLINE) the
/// binary fails with a message saying so. Set `POOL_CORE_TEST_NO_DEADLINE=1` to run without
/// it (under a debugger, say).
#[cfg(all(test, target_os = "linux", not(loom)))]
mod test_deadline {
    use std::time::Duration;

    /// How long the unit tests may take together (about 3 s in a debug build on 2 cores).
    pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

    extern "C" fn start() {
        if std::env::var_os("POOL_CORE_TEST_NO_DEADLINE").is_some() {
            return;
        }
        std::thread::spawn(|| {
            std::thread::sleep(DEADLINE);
            eprintln!(
                "pool-core's unit tests are still running after {DEADLINE:?}: a test is stuck \
                 (a library loop that no longer advances?); failing the run"
            );
            std::process::exit(101);
        });
    }

    /// Runs `start` when the test binary is loaded, before libtest's `main`.
    #[used]
    #[link_section = ".init_array"]
    static START: extern "C" fn() = start;
}

#[cfg(test)]
mod no_panics {
    //! Whatever text a user or a server hands us, parsing and redaction return; they never
    //! panic (on char boundaries, overflow, empty input).

    use super::*;

    const PIECES: &[&str] = &[
        "postgres",
        "sqlite",
        "mysql",
        "file",
        "://",
        ":",
        "@",
        "/",
        "?",
        "#",
        "&",
        "=",
        "%",
        "%4",
        "%zz",
        ",",
        "[",
        "]",
        "'",
        "\"",
        "\\",
        " ",
        "\n",
        "password",
        "Some(",
        "-",
        "0",
        "9",
        "99999999999999999999",
        "ms",
        "h",
        ".db",
        ":memory:",
        "é",
        "☕",
        "\u{0}",
        "🦀",
    ];

    fn garbage() -> String {
        let len = rand::random_range(0..12);
        (0..len)
            .map(|_| PIECES[rand::random_range(0..PIECES.len())])
            .collect()
    }

    #[test]
    fn parsing_and_redaction_never_panic_on_garbage() {
        for _ in 0..20_000 {
            let text = garbage();
            let masked = redact(&text);
            assert_eq!(redact(&masked), masked, "not idempotent on {text:?}");
            let _ = redact_with(&text, &garbage());
            let _ = DatabaseUrl::parse(&text).map(|u| (u.redacted(), u.host(), u.query_pairs()));
            let _ = parse_duration(&text);
            let _ = text.parse::<SslMode>();
            let value = text.clone();
            let _ = PoolConfig::from_lookup(
                move |k| (k != "DATABASE_URL").then(|| value.clone()),
                Some("sqlite://x.db"),
            );
        }
    }
}
