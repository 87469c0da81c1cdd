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
    // The async pool takes the same settings, and says the same.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let err = rt
        .block_on(
            diesel_async_ext::PgPool::builder("postgres://app@localhost/app")
                .pool_size(0)
                .max_overflow(0)
                .build(),
        )
        .unwrap_err();
    assert_clear(&err, "pool_size");
    let err = rt
        .block_on(
            diesel_async_ext::PgPool::builder(&format!("postgres://app:{SECRET}@db:notaport/app"))
                .build(),
        )
        .unwrap_err();
    assert_clear(&err, "port");
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

/// Set in the child process that runs [`huge_sizes_child`]'s cases.
const HUGE_SIZES_CHILD: &str = "RESILIENT_DIESEL_HUGE_SIZES_CHILD";

/// Every way to ask for an absurd number of connections — builders (sync and async), the
/// environment, budget totals and class sizes — returns an error naming the setting. Run in
/// a child process: before the bound, `max_overflow(u32::MAX - 1)` made r2d2 reserve about
/// 700 GB and the process aborted, which would take this whole test binary down without a
/// word; here the parent reports it.
#[test]
fn absurd_pool_sizes_are_refused_without_aborting_the_process() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let started = Instant::now();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "huge_sizes_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HUGE_SIZES_CHILD, "1")
        .output()
        .expect("running the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a size case panicked or aborted the process ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("all size cases refused"),
        "the child ran no cases:\n{stdout}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refusing sizes must not take long: {:?}",
        started.elapsed()
    );
}

/// The cases; runs only in the child process [`absurd_pool_sizes_are_refused_without_aborting_the_process`]
/// starts.
#[test]
fn huge_sizes_child() {
    use resilient_diesel::{Class, ClassPools};
    if std::env::var_os(HUGE_SIZES_CHILD).is_none() {
        return;
    }
    // Nothing listens here: a refusal must come from the settings, before any connect.
    let url = format!(
        "postgres://app:{SECRET}@127.0.0.1:{}/app?sslmode=disable",
        test_support::free_port()
    );
    let sized = |pool_size: u32, max_overflow: u32| {
        PgPool::builder(&url)
            .pool_size(pool_size)
            .max_overflow(max_overflow)
            .pool_timeout(Duration::from_millis(300))
    };
    let builders = [
        (sized(10, u32::MAX - 1), "max_overflow"),
        (sized(u32::MAX, 0), "pool_size"),
        (sized(u32::MAX, 1), "pool_size"),
        (sized(10_001, 0), "pool_size"),
        (sized(5_000, 5_001), "max_overflow"),
    ];
    for (builder, setting) in builders {
        let err = builder.build().unwrap_err();
        assert!(matches!(err, BuildError::Config(_)), "{err:?}");
        assert_clear(&err, setting);
        assert_clear(&err, "10000");
    }
    for (var, value) in [
        ("DB_MAX_OVERFLOW", "4000000000"),
        ("DB_POOL_SIZE", "4000000000"),
        ("DB_POOL_SIZE", "10001"),
    ] {
        let err =
            PoolConfig::from_lookup(env(&[("DATABASE_URL", url.as_str()), (var, value)]), None)
                .unwrap_err();
        assert_clear(&err, var);
        assert_clear(&err, "10000");
    }
    let budgets = [
        ClassPools::<diesel::PgConnection>::builder(&url, u32::MAX)
            .class("adhoc", Class::new().reserved(1)),
        ClassPools::builder(&url, 60).class("adhoc", Class::new().pool_size(u32::MAX - 1)),
        ClassPools::builder(&url, 60).class("adhoc", Class::new().max_overflow(u32::MAX - 1)),
        ClassPools::builder(&url, 60)
            .class("a", Class::new().reserved(u32::MAX))
            .class("b", Class::new().reserved(u32::MAX)),
    ];
    for builder in budgets {
        let err = builder.build().unwrap_err();
        assert_clear(&err, "budget");
    }
    // The async pool takes the same settings.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let sized = |pool_size: u32, max_overflow: u32| {
            diesel_async_ext::PgPool::builder(&url)
                .pool_size(pool_size)
                .max_overflow(max_overflow)
                .pool_timeout(Duration::from_millis(300))
        };
        for (pool_size, max_overflow, setting) in [
            (10, u32::MAX - 1, "max_overflow"),
            (u32::MAX, 0, "pool_size"),
            (u32::MAX, 1, "pool_size"),
            (10_001, 0, "pool_size"),
            (5_000, 5_001, "max_overflow"),
        ] {
            let err = sized(pool_size, max_overflow).build().await.unwrap_err();
            assert_clear(&err, setting);
            assert_clear(&err, "10000");
            let err = sized(pool_size, max_overflow)
                .build_lazy()
                .await
                .unwrap_err();
            assert_clear(&err, setting);
        }
        type Async = diesel_async::AsyncPgConnection;
        let budgets = [
            diesel_async_ext::ClassPools::<Async>::builder(&url, u32::MAX)
                .class("adhoc", Class::new().reserved(1)),
            diesel_async_ext::ClassPools::<Async>::builder(&url, 60)
                .class("adhoc", Class::new().pool_size(u32::MAX - 1)),
            diesel_async_ext::ClassPools::<Async>::builder(&url, 60)
                .class("adhoc", Class::new().max_overflow(u32::MAX - 1)),
            diesel_async_ext::ClassPools::<Async>::builder(&url, 60)
                .class("a", Class::new().reserved(u32::MAX))
                .class("b", Class::new().reserved(u32::MAX)),
        ];
        for builder in budgets {
            let err = builder.build().await.unwrap_err();
            assert_clear(&err, "budget");
        }
    });
    println!("all size cases refused");
}

#[test]
fn the_standalone_manager_names_its_target_redacted_when_a_connect_fails() {
    // A free port nobody listens on: the connect is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let secret = "S3nt1nel-pw";
    let url = format!("postgres://app:{secret}@127.0.0.1:{port}/app?sslmode=disable");
    let manager = resilient_diesel::ExtManager::<diesel::PgConnection>::standalone(&url)
        .expect("a valid URL");
    let err = r2d2::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(500))
        .build(manager)
        .expect_err("nothing listens there");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "the error names the server it could not reach: {text}"
    );
    assert!(!text.contains(secret), "the password leaked: {text}");
}

/// `Duration::MAX` where a caller may pass any duration (a checkout's own timeout, a warm-up's,
/// a retry policy's) is a long wait or a clear error, never an overflow of the clock: a
/// checkout that can be served is served, a warm-up of a warm pool returns, and the retry
/// policy refuses what is past 365 days.
#[test]
fn duration_max_is_a_long_wait_or_a_clear_error_never_a_panic() {
    let Some(pg) = server() else { return };
    let pool = PgPool::builder(&pg.url_with("sslmode=disable&application_name=bad_max"))
        .pool_size(1)
        .max_overflow(0)
        .build()
        .unwrap();
    let conn = pool.get_timeout(Duration::MAX).expect("served at once");
    drop(conn);
    let warm = pool.warm_up(Duration::MAX);
    assert!(warm.complete(), "{warm:?}");
    let err = resilient_diesel::RetryPolicy::builder()
        .commit_resolution_timeout(Duration::MAX)
        .build()
        .unwrap_err();
    assert_clear(&err, "365 days");
}
