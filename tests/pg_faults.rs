//! The extended r2d2 pool against real faults on a private PostgreSQL server, each with a
//! control case showing a plain r2d2 pool failing on the same fault.

mod common;

use std::time::Duration;

use common::*;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn terminated_backends_never_reach_the_caller_even_inside_the_bypass_window() {
    let Some(pg) = server() else { return };
    let app = "ext_terminate";
    // A bypass window of an hour: every connection is "hot", so only the liveness probe
    // stands between a dead connection and the caller.
    let pool = ext_pool(&pg, app, 4)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap();
    warm(&pool, 4);
    assert_eq!(pg.count_backends(app).unwrap(), 4);
    terminate_all(&pg, app);
    let errors = errors_over(&pool, 100);
    assert!(errors.is_empty(), "errors surfaced: {errors:?}");
    let stats = pool.stats();
    assert!(stats.probe_detected_dead >= 4, "{stats:?}");
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_surfaces_terminated_backends() {
    let Some(pg) = server() else { return };
    let app = "plain_terminate";
    let pool = plain_pool(
        &pg,
        &format!("sslmode=disable&application_name={app}"),
        4,
        false,
    );
    warm(&pool, 4);
    terminate_all(&pg, app);
    assert_fault_hurts(&pool);
}

#[test]
fn a_fast_server_restart_is_invisible_to_callers() {
    let Some(pg) = server() else { return };
    let app = "ext_restart";
    let pool = ext_pool(&pg, app, 4)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap();
    warm(&pool, 4);
    pg.restart_fast().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let errors = errors_over(&pool, 100);
    assert!(errors.is_empty(), "errors surfaced: {errors:?}");
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_surfaces_a_server_restart() {
    let Some(pg) = server() else { return };
    let pool = plain_pool(
        &pg,
        "sslmode=disable&application_name=plain_restart",
        4,
        false,
    );
    warm(&pool, 4);
    pg.restart_fast().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_fault_hurts(&pool);
}

#[test]
fn connections_closed_by_idle_session_timeout_are_replaced_silently() {
    let Some(pg) = server() else { return };
    let app = "ext_idle";
    pg.set_idle_session_timeout("app", Duration::from_millis(500))
        .unwrap();
    let pool = ext_pool(&pg, app, 4)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap();
    warm(&pool, 4);
    pg.wait_backends_gone(app, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let errors = errors_over(&pool, 100);
    assert!(errors.is_empty(), "errors surfaced: {errors:?}");
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_surfaces_idle_session_timeouts() {
    let Some(pg) = server() else { return };
    let app = "plain_idle";
    pg.set_idle_session_timeout("app", Duration::from_millis(500))
        .unwrap();
    let pool = plain_pool(
        &pg,
        &format!("sslmode=disable&application_name={app}"),
        4,
        false,
    );
    warm(&pool, 4);
    pg.wait_backends_gone(app, Duration::from_secs(10)).unwrap();
    assert_fault_hurts(&pool);
}

#[test]
fn tls_connections_survive_a_killed_backend_under_sslmode_require_and_verify_ca() {
    let Some(pg) = server() else { return };
    for (app, params) in [
        ("ext_ssl_require", "sslmode=require".to_string()),
        (
            "ext_ssl_verify",
            format!(
                "sslmode=verify-ca&sslrootcert={}",
                pg.ca_cert_path().display()
            ),
        ),
    ] {
        let pool = resilient_diesel::PgPool::builder(&pg.url_with(&params))
            .application_name(app)
            .pool_size(3)
            .max_overflow(0)
            .validation_bypass_window(HOUR)
            .build()
            .unwrap();
        let mut conn = pool.get().unwrap();
        let ssl: bool = diesel::select(diesel::dsl::sql::<Bool>(
            "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
        ))
        .get_result(&mut *conn)
        .unwrap();
        assert!(ssl, "{app}: the connection must be encrypted");
        drop(conn);
        warm(&pool, 3);
        terminate_all(&pg, app);
        let errors = errors_over(&pool, 100);
        assert!(errors.is_empty(), "{app}: errors surfaced: {errors:?}");
    }
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_over_tls_surfaces_a_killed_backend() {
    let Some(pg) = server() else { return };
    let app = "plain_ssl";
    let pool = plain_pool(
        &pg,
        &format!("sslmode=require&application_name={app}"),
        3,
        false,
    );
    warm(&pool, 3);
    terminate_all(&pg, app);
    assert_fault_hurts(&pool);
}

#[test]
fn validation_against_a_hung_backend_returns_within_its_timeout_and_recovers() {
    let Some(pg) = server() else { return };
    let app = "ext_stall";
    let validation_timeout = Duration::from_secs(1);
    let pool_timeout = Duration::from_secs(3);
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(validation_timeout)
        .pool_timeout(pool_timeout)
        .build()
        .unwrap();
    warm(&pool, 1);
    let pause = pg.pause_backends(app).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // The bound is generous: this checks "returns" versus "hangs until the fault is lifted",
    // not speed.
    let limit = validation_timeout + pool_timeout + Duration::from_secs(5);
    let handle = assert_checkout_returns(&pool, limit, "against a stopped backend");
    let stats = pool.stats();
    assert!(stats.validations_failed >= 1, "{stats:?}");
    pause.resume();
    handle.join().unwrap();
    let errors = errors_over(&pool, 10);
    assert!(errors.is_empty(), "pool must serve again: {errors:?}");
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_checkout_hangs_on_a_hung_backend_until_it_resumes() {
    let Some(pg) = server() else { return };
    let app = "plain_stall";
    let pool = plain_pool(
        &pg,
        &format!("sslmode=disable&application_name={app}"),
        1,
        true,
    );
    warm(&pool, 1);
    let pause = pg.pause_backends(app).unwrap();
    // connection_timeout is 5 s; r2d2's validity check has no time limit of its own.
    let handle = assert_checkout_hangs(&pool, Duration::from_secs(9));
    pause.resume();
    handle.join().unwrap();
}

#[test]
fn a_disconnect_seen_by_a_query_invalidates_the_other_connections() {
    let Some(pg) = server() else { return };
    let app = "ext_invalidate";
    let pool = ext_pool(&pg, app, 3)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap();
    warm(&pool, 3);
    let mut conn = pool.get().unwrap();
    let pid: i32 = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(&mut *conn)
        .unwrap();
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Read the socket through a query: the caller holding the connection sees the error...
    let failed = diesel::select(diesel::dsl::sql::<Integer>("1")).get_result::<i32>(&mut *conn);
    assert!(failed.is_err());
    let before = pool.stats();
    drop(conn); // ...and the connection is not put back.
    assert!(before.invalidations >= 1, "{before:?}");
    // The other two connections are hot (inside the bypass window) yet are pinged once.
    warm(&pool, 3);
    let after = pool.stats();
    assert!(
        after.pings >= before.pings + 2,
        "before {before:?} after {after:?}"
    );
    assert!(errors_over(&pool, 20).is_empty());
}

#[test]
fn a_connection_left_inside_a_transaction_by_a_panic_is_never_reused() {
    let Some(pg) = server() else { return };
    let app = "ext_panic";
    let pool = ext_pool(&pg, app, 1).build().unwrap();
    let p = pool.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut conn = p.get().unwrap();
        let _ = conn.transaction::<(), diesel::result::Error, _>(|c| {
            diesel::sql_query("CREATE TEMP TABLE panicked (x int)").execute(c)?;
            panic!("handler bug inside a transaction");
        });
    }));
    assert!(result.is_err());
    pg.wait_backends_gone(app, Duration::from_secs(5)).ok();
    let open: i64 = {
        let mut conn = pool.get().unwrap();
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "(SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state LIKE 'idle in transaction%')"
        )))
        .get_result(&mut *conn)
        .unwrap()
    };
    assert_eq!(
        open, 0,
        "no session may stay inside the panicked transaction"
    );
}

#[test]
fn idle_connections_kept_alive_by_pings_survive_an_idle_session_timeout() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(1500))
        .unwrap();
    let app = "ext_keepalive";
    let pool = ext_pool(&pg, app, 2)
        .keepalive_ping(Some(Duration::from_millis(300)))
        .validation_bypass_window(Duration::from_millis(100))
        .build()
        .unwrap();
    warm(&pool, 2);
    let before = pg.backend_pids(app).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let after = pg.backend_pids(app).unwrap();
    assert_eq!(before.len(), 2);
    let mut b = before.clone();
    let mut a = after.clone();
    b.sort();
    a.sort();
    assert_eq!(a, b, "the same sessions must still be open");
}

#[test]
fn control_without_keepalive_pings_idle_sessions_are_dropped_by_the_server() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(1500))
        .unwrap();
    let app = "ext_no_keepalive";
    let pool = ext_pool(&pg, app, 2).build().unwrap();
    warm(&pool, 2);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(pg.count_backends(app).unwrap(), 0);
    drop(pool);
}

#[test]
fn a_connection_held_past_the_leak_threshold_is_reported_once_with_its_checkout_site() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_leak", 1)
        .leak_detection_threshold(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    let conn = pool.get().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(pool.stats().leaks, 1);
    drop(conn);
    let conn = pool.get().unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.stats().leaks, 1, "a returned connection is not a leak");
    let logs = test_support::captured_logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("a_connection_held_past_the_leak_threshold")),
        "the report names where the connection was checked out"
    );
}

#[test]
fn the_status_report_reads_like_the_field_reports_and_serializes_to_json() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_status", 2).name("web").build().unwrap();
    warm(&pool, 2);
    let report = pool.status();
    let text = report.to_string();
    assert!(text.contains("web"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["pools"][0]["name"], "web");
    assert!(!text.contains(PgServer::PASSWORD));
    assert!(!format!("{pool:?}").contains(PgServer::PASSWORD));
}

#[test]
fn validation_through_a_stalled_proxy_returns_within_its_timeout_and_recovers() {
    let Some(pg) = server() else { return };
    let proxy = test_support::FaultProxy::start(pg.addr()).expect("fault proxy");
    let validation_timeout = Duration::from_secs(1);
    let pool_timeout = Duration::from_secs(3);
    let pool = resilient_diesel::PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name("ext_proxy_stall")
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(validation_timeout)
        .pool_timeout(pool_timeout)
        .build()
        .unwrap();
    warm(&pool, 1);
    std::thread::sleep(Duration::from_millis(20));
    proxy.stall(true);
    let limit = validation_timeout + pool_timeout + Duration::from_secs(5);
    let handle = assert_checkout_returns(&pool, limit, "behind a stalled proxy");
    assert!(pool.stats().validations_failed >= 1, "{:?}", pool.stats());
    proxy.stall(false);
    handle.join().unwrap();
    let errors = errors_over(&pool, 10);
    assert!(errors.is_empty(), "pool must serve again: {errors:?}");
}

#[test]
fn control_plain_r2d2_checkout_hangs_behind_a_stalled_proxy_until_it_resumes() {
    let Some(pg) = server() else { return };
    let proxy = test_support::FaultProxy::start(pg.addr()).expect("fault proxy");
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(5))
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            pg.url_via(proxy.port(), "sslmode=disable"),
        ))
        .unwrap();
    warm(&pool, 1);
    proxy.stall(true);
    // connection_timeout is 5 s; r2d2's validity check has no time limit of its own.
    let handle = assert_checkout_hangs(&pool, Duration::from_secs(9));
    proxy.stall(false);
    handle.join().unwrap();
}
