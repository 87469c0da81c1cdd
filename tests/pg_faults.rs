//! The extended r2d2 pool against real faults on a private PostgreSQL server. Each fault has
//! the control the field uses: plain r2d2 **at its defaults** (`test_on_check_out(true)`,
//! which pings before every checkout). Where that control survives the fault too, the test
//! counts what each pays for it (round trips, counted by the proxy); a second control,
//! labelled as weakened, runs plain r2d2 without its checkout test, as people configure it to
//! save that round trip.

mod common;

use std::time::Duration;

use common::*;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};
use test_support::FaultProxy;

const HOUR: Duration = Duration::from_secs(3600);

/// After `fault` (given the pools' application names), 100 checkouts + queries on our pool
/// and on plain r2d2 at its defaults, each behind its own counting proxy: both surface no
/// error; ours spends about one round trip per checkout, r2d2's default two. Returns
/// (ours, control) round trips.
fn survive_and_count(pg: &PgServer, name: &str, fault: impl Fn(&[&str])) -> (u64, u64) {
    let ours_app = format!("{name}_ours");
    let ctl_app = format!("{name}_r2d2");
    let (ours_proxy, ours_url) = proxied(pg, "sslmode=disable");
    let (ctl_proxy, ctl_url) = proxied(pg, &format!("sslmode=disable&application_name={ctl_app}"));
    let ours = resilient_diesel::PgPool::builder(&ours_url)
        .application_name(&ours_app)
        .pool_size(4)
        .max_overflow(0)
        .build()
        .unwrap();
    let control = plain_pool_defaults(&ctl_url);
    warm(&ours, 4);
    warm(&control, 4);
    fault(&[&ours_app, &ctl_app]);
    ours_proxy.reset_counts();
    ctl_proxy.reset_counts();
    let errors = errors_over(&ours, 100);
    assert!(
        errors.is_empty(),
        "{name}: errors surfaced by our pool: {errors:?}"
    );
    let errors = errors_over(&control, 100);
    assert!(
        errors.is_empty(),
        "{name}: r2d2's default survives this fault: {errors:?}"
    );
    let (a, b) = (
        ours_proxy.messages().round_trips(),
        ctl_proxy.messages().round_trips(),
    );
    println!(
        "{name}: 100 checkouts + queries after the fault: ours {a} round trips ({} reconnects), \
         r2d2 at its defaults {b} ({} reconnects)",
        ours_proxy.connections_accepted(),
        ctl_proxy.connections_accepted()
    );
    // Ours: 100 queries + a few reconnect set-ups; r2d2: 100 pings + 100 queries + its own.
    assert!(a * 10 <= b * 6, "{name}: ours {a} vs r2d2 {b} round trips");
    assert_no_secret_in_logs();
    (a, b)
}

/// The weakened control: plain r2d2 without its checkout test surfaces the fault.
fn weakened_control_hurts(pg: &PgServer, name: &str, params: &str, fault: impl Fn(&str)) {
    let app = format!("{name}_r2d2_notest");
    let pool =
        plain_pool_without_checkout_test(&pg.url_with(&format!("{params}&application_name={app}")));
    warm(&pool, 4);
    fault(&app);
    assert_fault_hurts(&pool);
}

fn terminate_apps(pg: &PgServer, apps: &[&str]) {
    for app in apps {
        terminate_all(pg, app);
    }
}

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
fn after_terminated_backends_we_spend_about_half_the_round_trips_of_r2d2_at_its_defaults() {
    let Some(pg) = server() else { return };
    survive_and_count(&pg, "terminate", |apps| terminate_apps(&pg, apps));
}

#[test]
fn weakened_control_plain_r2d2_without_checkout_test_surfaces_terminated_backends() {
    let Some(pg) = server() else { return };
    weakened_control_hurts(&pg, "terminate", "sslmode=disable", |app| {
        terminate_all(&pg, app)
    });
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
fn after_a_restart_we_spend_about_half_the_round_trips_of_r2d2_at_its_defaults() {
    let Some(pg) = server() else { return };
    survive_and_count(&pg, "restart", |_| {
        pg.restart_fast().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn weakened_control_plain_r2d2_without_checkout_test_surfaces_a_server_restart() {
    let Some(pg) = server() else { return };
    weakened_control_hurts(&pg, "restart", "sslmode=disable", |_| {
        pg.restart_fast().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    });
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
fn after_idle_session_timeouts_we_spend_about_half_the_round_trips_of_r2d2_at_its_defaults() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(500))
        .unwrap();
    survive_and_count(&pg, "idle", |apps| {
        for app in apps {
            pg.wait_backends_gone(app, Duration::from_secs(10)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn weakened_control_plain_r2d2_without_checkout_test_surfaces_idle_session_timeouts() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(500))
        .unwrap();
    weakened_control_hurts(&pg, "idle", "sslmode=disable", |app| {
        pg.wait_backends_gone(app, Duration::from_secs(10)).unwrap();
    });
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
        assert_eq!(
            pool.stats().pings,
            0,
            "{app}: the probe, not pings, caught them"
        );
    }
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_at_its_defaults_survives_a_killed_tls_backend_by_pinging_every_checkout() {
    let Some(pg) = server() else { return };
    let app = "plain_ssl";
    let pool =
        plain_pool_defaults(&pg.url_with(&format!("sslmode=require&application_name={app}")));
    warm(&pool, 3);
    terminate_all(&pg, app);
    // r2d2's default survives this one; what it pays (a ping per checkout) is counted in the
    // plaintext tests above, where the proxy can read the protocol.
    assert!(errors_over(&pool, 100).is_empty());
}

#[test]
fn weakened_control_plain_r2d2_without_checkout_test_over_tls_surfaces_a_killed_backend() {
    let Some(pg) = server() else { return };
    weakened_control_hurts(&pg, "tls", "sslmode=require", |app| terminate_all(&pg, app));
}

#[test]
fn validation_against_a_hung_backend_returns_within_its_timeout_and_recovers() {
    let Some(pg) = server() else { return };
    hung_backend_is_bounded(&pg, "ext_stall", &pg.url_with("sslmode=disable"));
}

/// The same with hedged validation off: the stall watchdog, which shuts the ping's socket down
/// at `validation_timeout`, is then the only bound.
#[test]
fn validation_against_a_hung_backend_is_bounded_by_the_watchdog_alone_with_hedging_off() {
    let Some(pg) = server() else { return };
    hung_backend_is_bounded_with(
        &pg,
        "ext_stall_unhedged",
        &pg.url_with("sslmode=disable"),
        false,
    );
}

#[test]
fn control_plain_r2d2_at_its_defaults_hangs_on_a_hung_backend_until_it_resumes() {
    let Some(pg) = server() else { return };
    let app = "plain_stall";
    let pool =
        plain_pool_defaults(&pg.url_with(&format!("sslmode=disable&application_name={app}")));
    warm(&pool, 10);
    let pause = pg.pause_backends(app).unwrap();
    // r2d2's validity check has no time limit of its own.
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
    let panicked_pid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let seen = panicked_pid.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut conn = p.get().unwrap();
        let _ = conn.transaction::<(), diesel::result::Error, _>(|c| {
            let pid: i32 =
                diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()")).get_result(c)?;
            seen.store(pid, std::sync::atomic::Ordering::SeqCst);
            diesel::sql_query("CREATE TEMP TABLE panicked (x int)").execute(c)?;
            panic!("handler bug inside a transaction");
        });
    }));
    assert!(result.is_err());
    let panicked_pid = panicked_pid.load(std::sync::atomic::Ordering::SeqCst);
    assert_ne!(panicked_pid, 0);
    // Seen from outside the pool: the panicked session is gone, not parked in the pool.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg.backend_pids(app).unwrap().contains(&panicked_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the session left inside the transaction is still open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut conn = pool.get().unwrap();
    let pid: i32 = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(&mut *conn)
        .unwrap();
    assert_ne!(pid, panicked_pid, "the next checkout got a fresh session");
    assert_eq!(pool.stats().closed.broken, 1);
}

#[test]
fn idle_connections_kept_alive_by_pings_survive_an_idle_session_timeout() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_secs(2))
        .unwrap();
    let app = "ext_keepalive";
    let pool = ext_pool(&pg, app, 2)
        .keepalive_ping(Some(Duration::from_millis(200)))
        .idle_timeout(None)
        .build()
        .unwrap();
    warm(&pool, 2);
    let before = pg.backend_pids(app).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let after = pg.backend_pids(app).unwrap();
    assert_eq!(before.len(), 2);
    assert_eq!(after, before, "the same sessions must still be open");
    assert!(pool.stats().pings >= 4, "{:?}", pool.stats());
}

#[test]
fn control_without_keepalive_pings_idle_sessions_are_dropped_by_the_server() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_secs(2))
        .unwrap();
    let app = "ext_no_keepalive";
    let pool = ext_pool(&pg, app, 2).idle_timeout(None).build().unwrap();
    warm(&pool, 2);
    assert_eq!(settle_backends(&pg, app, 0), 0);
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pool.stats().leaks == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.stats().leaks, 1, "reported once");
    drop(conn);
    let conn = pool.get().unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
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
    assert_eq!(json["pools"][0]["probe_available"], true);
    assert!(!text.contains(PgServer::PASSWORD));
    assert!(!format!("{pool:?}").contains(PgServer::PASSWORD));
}

#[test]
fn validation_through_a_stalled_proxy_returns_within_its_timeout_and_recovers() {
    let Some(pg) = server() else { return };
    let proxy = FaultProxy::start(pg.addr()).expect("fault proxy");
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
fn control_plain_r2d2_at_its_defaults_hangs_behind_a_stalled_proxy_until_it_resumes() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = plain_pool_defaults(&url);
    warm(&pool, 10);
    proxy.stall(true);
    // r2d2's validity check has no time limit of its own.
    let handle = assert_checkout_hangs(&pool, Duration::from_secs(9));
    proxy.stall(false);
    handle.join().unwrap();
}
