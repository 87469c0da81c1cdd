//! Bad input gets a clear error, never a panic, and never shows the password.

mod common;

use std::time::{Duration, Instant};

use common::*;
use resilient_diesel::pool_core::config::PoolConfig;
use resilient_diesel::{BuildError, PgPool};

const SECRET: &str = PgServer::PASSWORD;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let owned: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |key| owned.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn assert_clear(err: &dyn std::fmt::Display, must_mention: &str) {
    let text = err.to_string();
    assert!(
        text.contains(must_mention),
        "error should mention {must_mention:?}: {text}"
    );
    assert!(!text.contains(SECRET), "error leaks the password: {text}");
}

#[test]
fn a_malformed_url_is_a_clear_error() {
    let err = PgPool::builder(&format!("postgres://app:{SECRET}@db:notaport/app"))
        .build()
        .unwrap_err();
    assert!(matches!(err, BuildError::Config(_)), "{err:?}");
    assert_clear(&err, "port");
    assert!(!format!("{err:?}").contains(SECRET));
}

#[test]
fn an_unknown_sslmode_is_a_clear_error() {
    let err = PoolConfig::from_lookup(
        env(&[
            ("DATABASE_URL", "postgres://app@localhost/app"),
            ("DB_SSLMODE", "sometimes"),
        ]),
        None,
    )
    .unwrap_err();
    assert_clear(&err, "sometimes");
}

#[test]
fn a_pool_of_size_zero_is_rejected() {
    let err = PgPool::builder("postgres://app@localhost/app")
        .pool_size(0)
        .max_overflow(0)
        .build()
        .unwrap_err();
    assert_clear(&err, "pool_size");
}

#[test]
fn an_overflow_that_is_not_a_number_names_the_variable() {
    let err = PoolConfig::from_lookup(
        env(&[
            ("DATABASE_URL", "postgres://app@localhost/app"),
            ("DB_MAX_OVERFLOW", "lots"),
        ]),
        None,
    )
    .unwrap_err();
    assert_clear(&err, "DB_MAX_OVERFLOW");
    assert_clear(&err, "lots");
}

#[test]
fn a_bad_duration_in_the_environment_names_the_variable() {
    for value in ["-5", "5 parsecs", "", "99999999999999999999h"] {
        let err = PoolConfig::from_lookup(
            env(&[
                ("DATABASE_URL", "postgres://app@localhost/app"),
                ("DB_POOL_TIMEOUT", value),
            ]),
            None,
        )
        .unwrap_err();
        assert_clear(&err, "DB_POOL_TIMEOUT");
    }
}

#[test]
fn a_server_that_never_answers_fails_within_the_connect_timeout() {
    test_support::capture_logs();
    let silent = test_support::SilentServer::start().expect("silent listener");
    let url = format!(
        "postgres://app:{SECRET}@127.0.0.1:{}/app?sslmode=disable",
        silent.port()
    );
    let started = Instant::now();
    let err = PgPool::builder(&url)
        .connect_timeout(Some(Duration::from_secs(1)))
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(2))
        .build()
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, BuildError::Connect { .. }), "{err:?}");
    assert_clear(&err, "timeout");
    // r2d2 keeps retrying until the pool timeout; the first connect attempt alone must not
    // hang past it.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_no_secret_in_logs();
}

#[test]
fn a_refused_connection_is_a_clear_error() {
    test_support::capture_logs();
    let port = test_support::free_port();
    let url = format!("postgres://app:{SECRET}@127.0.0.1:{port}/app?sslmode=disable");
    let err = PgPool::builder(&url)
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_clear(&err, "refused");
    assert_no_secret_in_logs();
}

#[test]
fn a_wrong_password_is_reported_without_the_password() {
    let Some(pg) = server() else { return };
    let url = pg
        .url_with("sslmode=disable")
        .replace(SECRET, &format!("wrong-{SECRET}"));
    let err = PgPool::builder(&url)
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_clear(&err, "password authentication failed");
    assert!(!format!("{err:?}").contains(SECRET));
    assert_no_secret_in_logs();
}
