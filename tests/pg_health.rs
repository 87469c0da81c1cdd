//! Readiness of the sync pool on a private server: `health()` answers from evidence without a
//! round trip, checks an idle connection with one bounded ping, finds dead connections (and
//! invalidates the pool as a checkout would), says unreachable with the cause's class when the
//! server is stopped, never waits behind a saturated pool; `warm_up` opens `pool_size`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use resilient_diesel::pool_core::readiness::{HealthSource, HealthState};

/// A pool of `size` on `pg` whose connections carry `app`, trusting a connection used within
/// `window` without a ping.
fn pool(pg: &PgServer, app: &str, size: u32, window: Duration) -> resilient_diesel::PgPool {
    ext_pool(pg, app, size)
        .validation_bypass_window(window)
        .build()
        .expect("pool")
}

#[test]
fn a_pool_used_within_the_bypass_window_answers_ready_without_a_round_trip() {
    let Some(pg) = server() else { return };
    // A long window: the answer must not depend on how fast this machine is right now.
    let pool = pool(&pg, "health_evidence", 2, Duration::from_secs(30));
    warm(&pool, 2);
    let before = pool.stats();
    let health = pool.health();
    let after = pool.stats();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::Evidence, "{health}");
    assert!(!health.round_trip, "{health}");
    assert_eq!(after.pings, before.pings, "no ping: {health}");
    assert_eq!(after.connects, before.connects, "no connect: {health}");
    assert_eq!(after.checkouts, before.checkouts, "a check is no checkout");
    assert!(health.evidence_age_ms.is_some(), "{}", health.to_json());
}

#[test]
fn a_pool_idle_past_the_bypass_window_answers_with_one_bounded_check() {
    let Some(pg) = server() else { return };
    let window = Duration::from_millis(100);
    let pool = pool(&pg, "health_idle", 2, window);
    warm(&pool, 2);
    std::thread::sleep(window * 3);
    let before = pool.stats();
    let health = pool.health();
    let after = pool.stats();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::IdleCheck, "{health}");
    assert!(health.round_trip, "{health}");
    assert_eq!(after.pings, before.pings + 1, "exactly one ping: {health}");
    assert_eq!(after.connects, before.connects, "no connect: {health}");
    // The check is evidence in turn: the next answer needs no round trip.
    let again = pool.health();
    assert_eq!(again.source, HealthSource::Evidence, "{again}");
}

#[test]
fn a_stopped_server_is_unreachable_with_the_connect_errors_class_and_the_status_is_not_healthy() {
    let Some(pg) = server() else { return };
    let pool = pool(&pg, "health_stopped", 1, Duration::from_millis(100));
    warm(&pool, 1);
    pg.stop().expect("stop the server");
    // Past the bypass window: the evidence of the warm-up no longer answers for the server.
    std::thread::sleep(Duration::from_millis(300));
    let health = pool.health();
    assert_eq!(
        health.state,
        HealthState::Unreachable,
        "{}",
        health.to_json()
    );
    assert_eq!(health.source, HealthSource::Connect, "{health}");
    assert_eq!(health.error_class.as_deref(), Some("transient"), "{health}");
    assert!(health.round_trip, "{health}");
    assert!(
        health.found_dead >= 1,
        "the stopped server's session: {health}"
    );
    let error = health.error.clone().unwrap_or_default();
    assert!(
        error.contains("refused") || error.contains("No such file"),
        "{error}"
    );
    // Every connect refused: neither the stats nor the status report say healthy.
    let stats = pool.stats();
    assert!(!stats.is_healthy, "{stats:?}");
    assert!(stats.server_down.is_some(), "{stats:?}");
    let status = pool.status();
    assert!(!status.is_healthy());
    let text = status.to_string();
    assert!(text.contains("Server unreachable"), "{text}");
    assert!(!text.contains("Healthy"), "{text}");
    // Asked again at once (from the known failure, or one more attempt if it is due).
    assert_eq!(pool.health().state, HealthState::Unreachable);
}

#[test]
fn terminated_backends_are_found_dead_by_the_check_which_invalidates_the_pool_and_reconnects() {
    let Some(pg) = server() else { return };
    let app = "health_terminated";
    let window = Duration::from_millis(100);
    let pool = pool(&pg, app, 2, window);
    warm(&pool, 2);
    pg.terminate_backends(app).expect("terminate");
    pg.wait_backends_gone(app, Duration::from_secs(10))
        .expect("backends gone");
    std::thread::sleep(window * 3);
    let before = pool.stats();
    let health = pool.health();
    let after = pool.stats();
    assert!(health.found_dead >= 1, "{}", health.to_json());
    assert!(
        after.invalidations > before.invalidations,
        "a dead connection invalidates the pool: {after:?}"
    );
    assert!(
        after.closed.probe_dead > before.closed.probe_dead,
        "{after:?}"
    );
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert!(health.round_trip, "{health}");
}

#[test]
fn a_connection_whose_ping_fails_during_the_check_counts_as_found_dead() {
    let Some(pg) = server() else { return };
    let app = "health_hung";
    let window = Duration::from_millis(100);
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(window)
        .validation_timeout(Duration::from_millis(500))
        .build()
        .expect("pool");
    warm(&pool, 1);
    std::thread::sleep(window * 3);
    // The backend hangs: its socket stays open (the probe sees nothing wrong), the check's
    // ping gets no answer within `validation_timeout`.
    let pause = pg.pause_backends(app).expect("pause");
    let before = pool.stats();
    let health = pool.health();
    let after = pool.stats();
    pause.resume();
    assert!(
        after.validations_failed > before.validations_failed,
        "precondition: the check's ping failed: {after:?}"
    );
    assert_eq!(
        after.probe_detected_dead, before.probe_detected_dead,
        "precondition: the probe saw nothing wrong"
    );
    assert!(health.found_dead >= 1, "{}", health.to_json());
}

#[test]
fn a_saturated_pool_answers_degraded_without_waiting() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "health_saturated", 1)
        .pool_timeout(Duration::from_secs(30))
        .build()
        .expect("pool");
    let held = pool.get().expect("the only connection");
    let started = Instant::now();
    let health = pool.health();
    let took = started.elapsed();
    // The bound this test proves: far below `pool_timeout` (30 s), which a wait would take.
    assert!(took < Duration::from_secs(5), "{took:?}: {health}");
    assert_eq!(health.state, HealthState::Degraded, "{health}");
    assert_eq!(health.error_class.as_deref(), Some("saturated"), "{health}");
    assert!(!health.round_trip, "{health}");
    assert_eq!(health.stats.in_use, 1);
    drop(held);
}

#[test]
fn a_class_whose_budget_is_all_in_use_elsewhere_answers_without_a_round_trip() {
    use diesel::PgConnection;
    use resilient_diesel::{Class, ClassPools};
    let Some(pg) = server() else { return };
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(0).max_overflow(2))
        .class("adhoc", Class::new().pool_size(0).max_overflow(2))
        .configure(|b| b.application_name("health_budget"))
        .build()
        .expect("class pools");
    let automation = pools.class("automation").unwrap();
    let _all: Vec<_> = (0..2).map(|_| automation.get().unwrap()).collect();
    // adhoc: nothing idle, room in its own pool, but no permit free in the budget.
    let health = pools.class("adhoc").unwrap().health();
    assert_eq!(health.error_class.as_deref(), Some("budget"), "{health}");
    assert!(
        !health.round_trip,
        "no ping and no connect were made: {health}"
    );
}

#[test]
fn a_check_waits_for_a_slow_connect_within_its_bound() {
    let Some(pg) = server() else { return };
    // Every chunk delayed 40 ms: the connect's exchanges (startup, SCRAM, settings) take
    // several times the check's 20 ms slices.
    let proxy = test_support::FaultProxy::start(pg.addr()).expect("fault proxy");
    proxy.set_latency(Duration::from_millis(40));
    let pool = resilient_diesel::PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name("health_slow_connect")
        .pool_size(1)
        .build_lazy()
        .expect("lazy pool");
    let health = pool.health();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::Connect, "{health}");
}

#[test]
fn warm_up_waits_for_slow_connects_within_its_timeout() {
    let Some(pg) = server() else { return };
    // Every chunk delayed 40 ms: each connect takes several times warm-up's 20 ms slices.
    let proxy = test_support::FaultProxy::start(pg.addr()).expect("fault proxy");
    proxy.set_latency(Duration::from_millis(40));
    let pool = resilient_diesel::PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name("health_slow_warm")
        .pool_size(2)
        .build_lazy()
        .expect("lazy pool");
    let warm = pool.warm_up(Duration::from_secs(30));
    assert!(warm.complete(), "{warm:?}");
    assert_eq!((warm.wanted, warm.opened), (2, 2), "{warm:?}");
}

#[test]
fn warm_up_against_a_hopeless_server_stops_at_the_first_failure_not_at_its_timeout() {
    let Some(pg) = server() else { return };
    let url = pg
        .url_with("sslmode=disable")
        .replace("/app?", "/no_such_db?");
    let pool = resilient_diesel::PgPool::builder(&url)
        .pool_size(2)
        .build_lazy()
        .expect("lazy pool");
    let started = Instant::now();
    let warm = pool.warm_up(Duration::from_secs(12));
    let took = started.elapsed();
    assert!(!warm.complete(), "{warm:?}");
    assert!(
        warm.errors.iter().any(|e| e.contains("does not exist")),
        "{warm:?}"
    );
    // The bound this test proves: a hopeless connect error ends the warm-up, far below the
    // 12 s it was given.
    assert!(
        took < Duration::from_secs(6),
        "warm-up took {took:?}: {warm:?}"
    );
}

#[test]
fn warm_up_opens_pool_size_connections_and_then_finds_them_idle() {
    let Some(pg) = server() else { return };
    let app = "health_warm";
    let pool = ext_pool(&pg, app, 3)
        .max_overflow(2)
        .build_lazy()
        .expect("lazy pool");
    assert_eq!(
        pg.count_backends(app).expect("count"),
        0,
        "lazy: nothing open"
    );
    let warm = pool.warm_up(Duration::from_secs(20));
    assert!(warm.complete(), "{warm:?}");
    assert_eq!(
        (warm.wanted, warm.opened, warm.already_idle),
        (3, 3, 0),
        "{warm:?}"
    );
    assert!(warm.errors.is_empty(), "{warm:?}");
    assert_eq!(pg.count_backends(app).expect("count"), 3);
    let again = pool.warm_up(Duration::from_secs(20));
    assert_eq!((again.opened, again.already_idle), (0, 3), "{again:?}");
    assert_eq!(pool.stats().idle, 3);
}

#[test]
fn a_lazy_pool_with_nothing_open_answers_with_one_connect_that_stays_in_the_pool() {
    let Some(pg) = server() else { return };
    let app = "health_lazy";
    let pool = ext_pool(&pg, app, 2).build_lazy().expect("lazy pool");
    let health = pool.health();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::Connect, "{health}");
    assert!(health.round_trip);
    assert_eq!(pool.stats().connects, 1, "one attempt");
    assert_eq!(pool.stats().idle, 1, "the connection stays in the pool");
}

#[test]
fn a_class_set_answers_per_class_a_saturated_class_degraded_beside_a_ready_reserved_one() {
    use resilient_diesel::classes::{Class, ClassPools};
    let Some(pg) = server() else { return };
    let pools = ClassPools::<diesel::PgConnection>::builder(&pg.url_with("sslmode=disable"), 3)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class("adhoc", Class::new().reserved(1))
        .configure(|b| {
            b.application_name("health_classes")
                .pool_timeout(Duration::from_secs(30))
        })
        .build()
        .expect("class pools");
    let automation = pools.class("automation").expect("automation");
    let held = [automation.get().expect("1"), automation.get().expect("2")];
    let started = Instant::now();
    let health = pools.health();
    // The bound this test proves: no class's check waits out `pool_timeout` (30 s).
    assert!(started.elapsed() < Duration::from_secs(5), "{health}");
    assert_eq!(health.state, HealthState::Degraded, "{}", health.to_json());
    assert!(!health.is_ready());
    let a = health.class("automation").expect("automation's answer");
    assert_eq!(a.state, HealthState::Degraded, "{health}");
    assert_eq!(a.error_class.as_deref(), Some("saturated"), "{health}");
    let adhoc = health.class("adhoc").expect("adhoc's answer");
    assert_eq!(adhoc.state, HealthState::Ready, "{health}");
    drop(held);
    let health = pools.health();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    pg.stop().expect("stop the server");
    std::thread::sleep(Duration::from_millis(300));
    pools.class("adhoc").expect("adhoc").invalidate();
    let health = pools.health();
    assert_eq!(health.state, HealthState::Unreachable, "{health}");
}
