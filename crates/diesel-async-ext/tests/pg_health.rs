//! Readiness of the async pool on a private server: `health()` answers from evidence without a
//! round trip, checks an idle connection with one bounded ping, finds dead connections (and
//! invalidates the pool as a checkout would), says unreachable with the cause's class when the
//! server is stopped, never waits behind a saturated pool; `warm_up` opens `pool_size`.
#![cfg(feature = "postgres")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel_async_ext::PgPool;
use pool_core::readiness::{HealthSource, HealthState};

/// A pool of `size` on `pg` whose connections carry `app`, trusting a connection used within
/// `window` without a ping.
async fn pool(pg: &PgServer, app: &str, size: u32, window: Duration) -> PgPool {
    ext_pool(pg, app, size)
        .validation_bypass_window(window)
        .build()
        .await
        .expect("pool")
}

#[tokio::test]
async fn a_pool_used_within_the_bypass_window_answers_ready_without_a_round_trip() {
    let Some(pg) = server() else { return };
    // A long window: the answer must not depend on how fast this machine is right now.
    let pool = pool(&pg, "ahealth_evidence", 2, Duration::from_secs(30)).await;
    pool.warm(2).await;
    let before = pool.stats();
    let health = pool.health().await;
    let after = pool.stats();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::Evidence, "{health}");
    assert!(!health.round_trip, "{health}");
    assert_eq!(after.pings, before.pings, "no ping: {health}");
    assert_eq!(after.connects, before.connects, "no connect: {health}");
    assert_eq!(after.checkouts, before.checkouts, "a check is no checkout");
}

#[tokio::test]
async fn a_pool_idle_past_the_bypass_window_answers_with_one_bounded_check() {
    let Some(pg) = server() else { return };
    let window = Duration::from_millis(100);
    let pool = pool(&pg, "ahealth_idle", 2, window).await;
    pool.warm(2).await;
    tokio::time::sleep(window * 3).await;
    let before = pool.stats();
    let health = pool.health().await;
    let after = pool.stats();
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::IdleCheck, "{health}");
    assert!(health.round_trip, "{health}");
    assert_eq!(after.pings, before.pings + 1, "exactly one ping: {health}");
    assert_eq!(after.connects, before.connects, "no connect: {health}");
    assert_eq!(after.idle, 2, "the checked connection is back in the pool");
    let again = pool.health().await;
    assert_eq!(again.source, HealthSource::Evidence, "{again}");
}

/// A readiness probe with a deadline shorter than the check's ping (the backend is stopped, so
/// the ping never answers) drops the check half-way: the connection it was pinging comes back
/// with the pool's own round trip in flight, and is closed, not pooled, where the next caller
/// would wait on it. Two mechanisms see it, either one enough: the tracker's watch (a
/// statement started and not finished) and the engine's ping in flight (a validation ping
/// started and not finished); the standby check's test pins the first alone.
#[tokio::test]
async fn a_health_check_dropped_mid_ping_closes_the_connection_it_was_pinging() {
    let Some(pg) = server() else { return };
    let app = "ahealth_cut";
    let window = Duration::from_millis(100);
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(window)
        .validation_timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("pool");
    pool.warm(1).await;
    let pids = pg.backend_pids(app).unwrap();
    assert_eq!(pids.len(), 1, "precondition: one connection open");
    tokio::time::sleep(window * 3).await;
    let pause = pg.pause_backends(app).unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(300), pool.health()).await;
    assert!(
        cut.is_err(),
        "precondition: the check was cut short in its ping: {cut:?}"
    );
    let after_cut = pool.stats();
    assert_eq!(
        (after_cut.closed.total(), after_cut.idle),
        (1, 0),
        "the connection whose health-check ping was cut short was pooled again, not closed: \
         {after_cut:?}"
    );
    next_caller_avoids(
        &pool,
        pids[0],
        "the connection whose health-check ping was cut short",
    )
    .await;
    pause.resume();
}

#[tokio::test]
async fn a_stopped_server_is_unreachable_with_the_connect_errors_class_and_the_status_is_not_healthy(
) {
    let Some(pg) = server() else { return };
    let pool = pool(&pg, "ahealth_stopped", 1, Duration::from_millis(100)).await;
    pool.warm(1).await;
    pg.stop().expect("stop the server");
    // Past the bypass window: the evidence of the warm-up no longer answers for the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = pool.health().await;
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
    let stats = pool.stats();
    assert!(!stats.is_healthy, "{stats:?}");
    assert!(stats.server_down.is_some(), "{stats:?}");
    let text = pool.status().to_string();
    assert!(text.contains("Server unreachable"), "{text}");
    assert!(!text.contains("Healthy"), "{text}");
    assert_eq!(pool.health().await.state, HealthState::Unreachable);
}

#[tokio::test]
async fn terminated_backends_are_found_dead_by_the_check_which_invalidates_the_pool_and_reconnects()
{
    let Some(pg) = server() else { return };
    let app = "ahealth_terminated";
    let window = Duration::from_millis(100);
    let pool = pool(&pg, app, 2, window).await;
    pool.warm(2).await;
    pg.terminate_backends(app).expect("terminate");
    pg.wait_backends_gone(app, Duration::from_secs(10))
        .expect("backends gone");
    // Past the window; meanwhile diesel-async's connection tasks read the FATAL.
    tokio::time::sleep(window * 3).await;
    let before = pool.stats();
    let health = pool.health().await;
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
    assert_eq!(health.source, HealthSource::Connect, "{health}");
    assert!(
        after.idle >= 1,
        "the reconnected connection stays in the pool"
    );
}

#[tokio::test]
async fn a_connection_whose_ping_fails_during_the_check_counts_as_found_dead() {
    let Some(pg) = server() else { return };
    let app = "ahealth_hung";
    let window = Duration::from_millis(100);
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(window)
        .validation_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("pool");
    pool.warm(1).await;
    tokio::time::sleep(window * 3).await;
    // The backend hangs: its socket stays open (the probe sees nothing wrong), the check's
    // ping gets no answer within `validation_timeout`.
    let pause = pg.pause_backends(app).expect("pause");
    let before = pool.stats();
    let health = pool.health().await;
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
    // The backend runs again; past the bypass window, the pool (a failed ping in its
    // history) is checked again, and answers.
    tokio::time::sleep(window * 3).await;
    let health = pool.health().await;
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.found_dead, 0, "{}", health.to_json());
}

#[tokio::test]
async fn a_saturated_pool_answers_degraded_without_waiting() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ahealth_saturated", 1)
        .pool_timeout(Duration::from_secs(30))
        .build()
        .await
        .expect("pool");
    let held = pool.get().await.expect("the only connection");
    let started = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(10), pool.health())
        .await
        .expect("health() waited behind the saturated pool");
    let took = started.elapsed();
    // The bound this test proves: far below `pool_timeout` (30 s), which a wait would take.
    assert!(took < Duration::from_secs(5), "{took:?}: {health}");
    assert_eq!(health.state, HealthState::Degraded, "{health}");
    assert_eq!(health.error_class.as_deref(), Some("saturated"), "{health}");
    assert!(!health.round_trip, "{health}");
    drop(held);
}

#[tokio::test]
async fn warm_up_opens_pool_size_connections_and_then_finds_them_idle() {
    let Some(pg) = server() else { return };
    let app = "ahealth_warm";
    let pool = ext_pool(&pg, app, 3)
        .max_overflow(2)
        .build_lazy()
        .await
        .expect("lazy pool");
    assert_eq!(
        pg.count_backends(app).expect("count"),
        0,
        "lazy: nothing open"
    );
    let warm = pool.warm_up(Duration::from_secs(20)).await;
    assert!(warm.complete(), "{warm:?}");
    assert_eq!(
        (warm.wanted, warm.opened, warm.already_idle),
        (3, 3, 0),
        "{warm:?}"
    );
    assert!(warm.errors.is_empty(), "{warm:?}");
    assert_eq!(pg.count_backends(app).expect("count"), 3);
    // Done once it holds `pool_size`: far from the 20 s it was given.
    assert!(warm.took_ms < 10_000, "{warm:?}");
    let again = pool.warm_up(Duration::from_secs(20)).await;
    assert_eq!((again.opened, again.already_idle), (0, 3), "{again:?}");
    assert!(again.took_ms < 10_000, "{again:?}");
    assert_eq!(pool.stats().idle, 3);
}

/// Warm-up waits for connects slower than its 20 ms slices (here through a proxy delaying
/// every chunk 40 ms), each slice a real wait: the runtime's one thread stays mostly idle.
#[tokio::test]
async fn warm_up_waits_for_slow_connects_within_its_timeout_without_spinning() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    proxy.set_latency(Duration::from_millis(40));
    let pool = diesel_async_ext::PgPool::builder(&url)
        .application_name("ahealth_slow_warm")
        .pool_size(2)
        .build_lazy()
        .await
        .expect("lazy pool");
    let cpu_before = test_support::this_thread_cpu();
    let started = Instant::now();
    let warm = pool.warm_up(Duration::from_secs(30)).await;
    let (took, cpu) = (
        started.elapsed(),
        test_support::this_thread_cpu() - cpu_before,
    );
    assert!(warm.complete(), "{warm:?}");
    assert_eq!((warm.wanted, warm.opened), (2, 2), "{warm:?}");
    assert!(
        cpu < took / 2,
        "the warm-up's thread burned {cpu:?} of CPU in {took:?}"
    );
}

#[tokio::test]
async fn warm_up_against_a_hopeless_server_stops_at_the_first_failure_not_at_its_timeout() {
    let Some(pg) = server() else { return };
    let url = pg
        .url_with("sslmode=disable")
        .replace("/app?", "/no_such_db?");
    let pool = diesel_async_ext::PgPool::builder(&url)
        .pool_size(2)
        .build_lazy()
        .await
        .expect("lazy pool");
    let started = Instant::now();
    let warm = pool.warm_up(Duration::from_secs(12)).await;
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

#[tokio::test]
async fn a_lazy_pool_with_nothing_open_answers_with_one_connect_that_stays_in_the_pool() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ahealth_lazy", 2)
        .build_lazy()
        .await
        .expect("lazy pool");
    let health = pool.health().await;
    assert_eq!(health.state, HealthState::Ready, "{health}");
    assert_eq!(health.source, HealthSource::Connect, "{health}");
    assert!(health.round_trip);
    assert_eq!(pool.stats().connects, 1, "one attempt");
    assert_eq!(pool.stats().idle, 1, "the connection stays in the pool");
}

#[tokio::test]
async fn a_class_set_answers_per_class_a_saturated_class_degraded_beside_a_ready_reserved_one() {
    use diesel_async::AsyncPgConnection;
    use diesel_async_ext::{Class, ClassPools};
    let Some(pg) = server() else { return };
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 3)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class("adhoc", Class::new().reserved(1))
        .configure(|b| {
            b.application_name("ahealth_classes")
                .pool_timeout(Duration::from_secs(30))
        })
        .build()
        .await
        .expect("class pools");
    let automation = pools.class("automation").expect("automation");
    let held = [
        automation.get().await.expect("1"),
        automation.get().await.expect("2"),
    ];
    let started = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(10), pools.health())
        .await
        .expect("health() waited behind the saturated class");
    // The bound this test proves: no class's check waits out `pool_timeout` (30 s).
    assert!(started.elapsed() < Duration::from_secs(5), "{health}");
    assert_eq!(health.state, HealthState::Degraded, "{}", health.to_json());
    assert!(!health.is_ready());
    let a = health.class("automation").expect("automation's answer");
    assert_eq!(a.state, HealthState::Degraded, "{health}");
    assert_eq!(a.error_class.as_deref(), Some("saturated"), "{health}");
    let adhoc = health.class("adhoc").expect("adhoc's answer");
    assert_eq!(adhoc.state, HealthState::Ready, "{health}");
    // The set's `Debug` names its classes and the budget's state, and no password.
    let shown = format!("{pools:?}");
    for part in ["ClassPools", "\"automation\"", "\"adhoc\"", "Budget"] {
        assert!(shown.contains(part), "the Debug lacks {part}: {shown}");
    }
    assert!(!shown.contains(PgServer::PASSWORD), "{shown}");
    drop(held);
    let health = pools.health().await;
    assert_eq!(health.state, HealthState::Ready, "{health}");
    pg.stop().expect("stop the server");
    tokio::time::sleep(Duration::from_millis(300)).await;
    pools.class("adhoc").expect("adhoc").invalidate();
    let health = pools.health().await;
    assert_eq!(health.state, HealthState::Unreachable, "{health}");
}

/// A class with nothing idle and room in its own pool, but no budget permit free (every
/// permit in use by another class), answers at once with the budget as its cause: no ping,
/// no connect, nothing opened beyond the budget.
#[tokio::test]
async fn a_class_whose_budget_is_all_in_use_elsewhere_answers_without_a_round_trip() {
    use diesel_async::AsyncPgConnection;
    use diesel_async_ext::{Class, ClassPools};
    let Some(pg) = server() else { return };
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(0).max_overflow(2))
        .class("adhoc", Class::new().pool_size(0).max_overflow(2))
        .configure(|b| b.application_name("ahealth_budget"))
        .build()
        .await
        .expect("class pools");
    let automation = pools.class("automation").unwrap();
    let _all = [
        automation.get().await.expect("1"),
        automation.get().await.expect("2"),
    ];
    let adhoc = pools.class("adhoc").unwrap();
    let health = adhoc.health().await;
    assert_eq!(health.error_class.as_deref(), Some("budget"), "{health}");
    assert!(
        !health.round_trip,
        "no ping and no connect were made: {health}"
    );
    assert_eq!(adhoc.stats().connects, 0, "{:?}", adhoc.stats());
    assert_eq!(pg.count_backends("ahealth_budget").unwrap(), 2);
}
