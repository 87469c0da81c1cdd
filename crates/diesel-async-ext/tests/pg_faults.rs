//! The async pool against real faults on a private PostgreSQL server. Each fault has the
//! control the field uses: plain bb8 + diesel-async's `AsyncDieselConnectionManager` **at its
//! defaults** (`RecyclingMethod::Verified`: a `SELECT 1` before every checkout). Where that
//! control survives the fault too, the test counts what each pays for it (protocol round trips,
//! counted by a proxy on plaintext connections); a second control, labelled as weakened, runs
//! `RecyclingMethod::Fast`, as people configure it to save that round trip.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::*;
use diesel_async_ext::{ConnectCause, PgPool};

const HOUR: Duration = Duration::from_secs(3600);

/// After `fault` (given the pools' application names), 100 checkouts + queries on our pool and
/// on the Verified control, each behind its own counting proxy: neither surfaces an error;
/// ours spends about one round trip per checkout, the control two. Returns (ours, control).
async fn survive_and_count<F, Fut>(pg: &PgServer, name: &str, fault: F) -> (u64, u64)
where
    F: Fn(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let ours_app = format!("{name}_ours");
    let ctl_app = format!("{name}_bb8");
    let (ours_proxy, ours_url) = proxied(pg, "sslmode=disable");
    let (ctl_proxy, ctl_url) = proxied(pg, &format!("sslmode=disable&application_name={ctl_app}"));
    let ours = PgPool::builder(&ours_url)
        .application_name(&ours_app)
        .pool_size(4)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let control = control_verified(&ctl_url).await;
    ours.warm(4).await;
    control.warm(4).await;
    fault(vec![ours_app.clone(), ctl_app.clone()]).await;
    ours_proxy.reset_counts();
    ctl_proxy.reset_counts();
    let errors = errors_over(&ours, 100).await;
    assert!(
        errors.is_empty(),
        "{name}: errors surfaced by our pool: {errors:?}"
    );
    let errors = errors_over(&control, 100).await;
    assert!(
        errors.is_empty(),
        "{name}: the Verified control survives this fault: {errors:?}"
    );
    let (a, b) = (
        ours_proxy.messages().round_trips(),
        ctl_proxy.messages().round_trips(),
    );
    println!(
        "{name}: 100 checkouts + queries after the fault: ours {a} round trips ({} reconnects), \
         bb8 + Verified {b} ({} reconnects)",
        ours_proxy.connections_accepted(),
        ctl_proxy.connections_accepted()
    );
    // Ours: 100 queries + a few reconnect set-ups; the control: 100 pings + 100 queries + its own.
    assert!(
        a * 10 <= b * 6,
        "{name}: ours {a} vs control {b} round trips"
    );
    assert_no_secret_in_logs();
    (a, b)
}

/// The weakened control: bb8 + `RecyclingMethod::Fast` hands the dead connections out.
async fn weakened_control_hurts<F, Fut>(pg: &PgServer, name: &str, params: &str, fault: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let app = format!("{name}_bb8_fast");
    let pool = control_fast(&pg.url_with(&format!("{params}&application_name={app}"))).await;
    pool.warm(4).await;
    fault(app).await;
    let errors = errors_over(&pool, 100).await;
    println!(
        "{name}: bb8 + Fast surfaced {} error(s) in 100 checkouts",
        errors.len()
    );
    assert!(
        !errors.is_empty(),
        "the fault must hurt the weakened control"
    );
}

async fn terminate_apps(pg: &PgServer, apps: Vec<String>) {
    for app in apps {
        terminate_all(pg, &app).await;
    }
}

#[tokio::test]
async fn terminated_backends_never_reach_the_caller_even_inside_the_bypass_window() {
    let Some(pg) = server() else { return };
    let app = "ext_terminate";
    // A bypass window of an hour: every connection is "hot", so only the liveness probe
    // stands between a dead connection and the caller.
    let pool = ext_pool(&pg, app, 4)
        .validation_bypass_window(HOUR)
        .build()
        .await
        .unwrap();
    pool.warm(4).await;
    assert_eq!(pg.count_backends(app).unwrap(), 4);
    terminate_all(&pg, app).await;
    let errors = errors_over(&pool, 100).await;
    assert!(errors.is_empty(), "errors surfaced: {errors:?}");
    let stats = pool.stats();
    assert!(stats.probe_detected_dead >= 4, "{stats:?}");
    assert_eq!(stats.pings, 0, "the probe alone caught them: {stats:?}");
    assert_no_secret_in_logs();
}

#[tokio::test]
async fn after_terminated_backends_we_spend_about_half_the_round_trips_of_bb8_verified() {
    let Some(pg) = server() else { return };
    survive_and_count(&pg, "terminate", |apps| terminate_apps(&pg, apps)).await;
    let pg = &pg;
    weakened_control_hurts(pg, "terminate", "sslmode=disable", |app| async move {
        terminate_all(pg, &app).await
    })
    .await;
}

#[tokio::test]
async fn after_a_fast_restart_no_caller_sees_an_error_and_we_spend_half_the_round_trips() {
    let Some(pg) = server() else { return };
    let restart = || async {
        pg.restart_fast().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    survive_and_count(&pg, "restart", |_| restart()).await;
    weakened_control_hurts(&pg, "restart", "sslmode=disable", |_| restart()).await;
}

#[tokio::test]
async fn after_idle_session_timeouts_no_caller_sees_an_error_and_we_spend_half_the_round_trips() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(300))
        .unwrap();
    // Sessions opened from now on are ended by the server after 300 ms idle.
    let idle = || async {
        tokio::time::sleep(Duration::from_millis(800)).await;
    };
    survive_and_count(&pg, "idle_session", |_| idle()).await;
    weakened_control_hurts(&pg, "idle_session", "sslmode=disable", |_| idle()).await;
}

#[tokio::test]
async fn tls_sessions_killed_under_the_pool_never_reach_the_caller() {
    use diesel_async::pooled_connection::RecyclingMethod;
    let Some(pg) = server() else { return };
    let ca = pg.ca_cert_path().display().to_string();
    for (mode, params) in [
        ("require", "sslmode=require".to_owned()),
        (
            "verify_full",
            format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    ] {
        let app = format!("ext_tls_{mode}");
        let pool = PgPool::builder(&pg.url_with(&params))
            .application_name(&app)
            .pool_size(3)
            .max_overflow(0)
            .validation_bypass_window(HOUR)
            .build()
            .await
            .unwrap();
        pool.warm(3).await;
        terminate_all(&pg, &app).await;
        let errors = errors_over(&pool, 100).await;
        assert!(errors.is_empty(), "{mode}: errors surfaced: {errors:?}");
        assert!(pool.stats().probe_detected_dead >= 3, "{:?}", pool.stats());
    }
    // The controls over TLS (sslmode=require through the same connector): Verified survives
    // by pinging every checkout; Fast hands the killed sessions out.
    let url = |app: &str| pg.url_with(&format!("sslmode=require&application_name={app}"));
    let verified = control_tls(&url("bb8_tls_verified"), RecyclingMethod::Verified).await;
    verified.warm(3).await;
    terminate_all(&pg, "bb8_tls_verified").await;
    assert!(errors_over(&verified, 100).await.is_empty());
    let fast = control_tls(&url("bb8_tls_fast"), RecyclingMethod::Fast).await;
    fast.warm(3).await;
    terminate_all(&pg, "bb8_tls_fast").await;
    let errors = errors_over(&fast, 100).await;
    println!(
        "killed TLS sessions: bb8 + Fast surfaced {} error(s): {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        !errors.is_empty(),
        "the weakened control hands killed TLS sessions out"
    );
    assert_no_secret_in_logs();
}

/// Runs `SELECT 1` through a fresh checkout on a task; `Some(result)` if it finished within
/// `limit` (a generous bound: this separates "returns" from "hangs until the fault is lifted",
/// it does not measure speed).
async fn returns_within<P: Checkout>(pool: &P, limit: Duration) -> Option<Result<i32, String>> {
    let p = pool.clone();
    let task = tokio::spawn(async move { p.select_one().await });
    tokio::time::timeout(limit, task)
        .await
        .ok()
        .map(|r| r.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_against_a_hung_backend_returns_and_the_control_hangs() {
    let Some(pg) = server() else { return };
    let app = "ext_stall";
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(Duration::from_millis(500))
        .pool_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    pool.warm(1).await;
    let ctl_app = "bb8_stall";
    let control =
        control_verified(&pg.url_with(&format!("sslmode=disable&application_name={ctl_app}")))
            .await;
    control.warm(10).await;
    let pause = pg.pause_backends(app).unwrap();
    let ctl_pause = pg.pause_backends(ctl_app).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ours = returns_within(&pool, Duration::from_secs(10)).await;
    let theirs = returns_within(&control, Duration::from_secs(4)).await;
    println!("hung backend: ours {ours:?}; bb8 + Verified after 4 s: {theirs:?}");
    assert!(ours.is_some(), "our checkout hung on a stopped backend");
    assert_eq!(ours.unwrap(), Ok(1), "the hung connection is replaced");
    assert!(
        theirs.is_none(),
        "the control was expected to wait on the stopped backend"
    );
    let stats = pool.stats();
    assert!(stats.validations_failed >= 1, "{stats:?}");
    pause.resume();
    ctl_pause.resume();
    assert!(errors_over(&pool, 10).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_through_a_stalled_proxy_returns_and_the_control_hangs() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .application_name("ext_proxy_stall")
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(Duration::from_millis(500))
        .connect_timeout(Some(Duration::from_millis(500)))
        .pool_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    pool.warm(1).await;
    let (ctl_proxy, ctl_url) = proxied(&pg, "sslmode=disable&application_name=bb8_proxy_stall");
    let control = control_verified(&ctl_url).await;
    control.warm(10).await;
    proxy.stall(true);
    ctl_proxy.stall(true);
    // Through the stalled proxy nothing can work, not even a new connection: ours returns
    // with an error naming what happened; the control is still waiting.
    let ours = returns_within(&pool, Duration::from_secs(10)).await;
    let theirs = returns_within(&control, Duration::from_secs(4)).await;
    println!("stalled proxy: ours {ours:?}; bb8 + Verified after 4 s: {theirs:?}");
    let ours = ours.expect("our checkout hung behind a stalled proxy");
    let err = ours.unwrap_err();
    assert!(
        err.contains("validation") || err.contains("connect"),
        "{err}"
    );
    assert!(pool.stats().validations_failed >= 1, "{:?}", pool.stats());
    assert!(
        theirs.is_none(),
        "the control was expected to wait behind the stalled proxy"
    );
    proxy.stall(false);
    ctl_proxy.stall(false);
    let errors = errors_over(&pool, 10).await;
    assert!(errors.is_empty(), "the pool must serve again: {errors:?}");
}

#[tokio::test]
async fn a_host_that_never_answers_tls_fails_within_the_connect_bound_naming_it() {
    let silent = test_support::SilentServer::start().expect("silent server");
    let url = format!(
        "postgres://app:{}@127.0.0.1:{}/app?sslmode=require",
        PgServer::PASSWORD,
        silent.port()
    );
    let started = std::time::Instant::now();
    let built = tokio::time::timeout(
        Duration::from_secs(20),
        PgPool::builder(&url)
            .pool_size(1)
            .max_overflow(0)
            .connect_timeout(Some(Duration::from_millis(500)))
            .pool_timeout(Duration::from_secs(2))
            .build(),
    )
    .await
    .expect("building against a silent host must return");
    let err = built.unwrap_err();
    println!("silent TLS host, after {:?}: {err}", started.elapsed());
    let diesel_async_ext::BuildError::Connect { error, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(error.connect_cause(), Some(ConnectCause::Timeout), "{err}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert!(!err.to_string().contains(PgServer::PASSWORD));
}

#[tokio::test]
async fn a_disconnect_seen_by_a_query_invalidates_the_other_connections() {
    let Some(pg) = server() else { return };
    let app = "ext_invalidate";
    let pool = ext_pool(&pg, app, 3)
        .validation_bypass_window(HOUR)
        .build()
        .await
        .unwrap();
    pool.warm(3).await;
    let mut conn = pool.get().await.unwrap();
    let pid: i32 = {
        use diesel_async::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
            "pg_backend_pid()",
        ))
        .get_result(&mut conn)
        .await
        .unwrap()
    };
    PgServer::execute(&pg, &format!("SELECT pg_terminate_backend({pid})")).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The caller holding the connection sees the error...
    assert!(one(&mut conn).await.is_err());
    let before = pool.stats();
    drop(conn); // ...and the connection is not put back.
    assert!(before.invalidations >= 1, "{before:?}");
    // The other two connections are hot (inside the bypass window) yet are pinged once.
    pool.warm(3).await;
    let after = pool.stats();
    assert!(
        after.pings >= before.pings + 2,
        "before {before:?} after {after:?}"
    );
    assert!(after.closed.broken >= 1, "{after:?}");
    assert!(errors_over(&pool, 20).await.is_empty());
}
