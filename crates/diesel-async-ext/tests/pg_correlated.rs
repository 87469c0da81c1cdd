//! Correlated faults, async pool: faults that hit every connection at once must cost the pool
//! a bounded number of timeouts, whatever its size.
//!
//! "Every flow silent" is a proxy that stops forwarding the connections it already carries
//! (sockets open, nothing answered) while it passes new ones.

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel_async::AsyncPgConnection;
use diesel_async_ext::{Builder, PgPool};

const POOL: u32 = 8;

/// A pool of `size` through `url`, warmed (`size` connections open and idle), then left idle
/// past the bypass window so that every checkout wants a ping.
async fn warmed_pool_of(size: u32, url: &str, app: &str, validation_timeout: Duration) -> PgPool {
    let pool = PgPool::builder(url)
        .application_name(app)
        .pool_size(size)
        // No overflow: a connect started for the warm-up cannot leave one more connection.
        .max_overflow(0)
        .validation_timeout(validation_timeout)
        // The suspects alone (hedging has its own test below).
        .hedged_validation(false)
        .build()
        .await
        .expect("pool");
    pool.warm(size as usize).await;
    assert_eq!(pool.state().idle_connections, size, "warm-up");
    tokio::time::sleep(Duration::from_millis(600)).await;
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_silent_at_once_costs_one_validation_timeout_not_one_per_connection(
) {
    silent_at_once_costs_one_timeout(POOL, "async_silent").await;
}

/// The same fault on a pool four times as large: still one validation timeout, whatever the
/// pool's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_32_all_silent_at_once_still_costs_one_validation_timeout() {
    silent_at_once_costs_one_timeout(32, "async_silent_32").await;
}

/// Every connection of a warmed pool of `size` silent at once: the first request pays one
/// validation timeout and one connect, twenty more pay nothing, one ping fails and the other
/// silent connections are closed without a ping.
async fn silent_at_once_costs_one_timeout(size: u32, app: &str) {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let validation_timeout = Duration::from_secs(2);
    let pool = warmed_pool_of(size, &url, app, validation_timeout).await;
    // A connect started for the warm-up may have added one more idle connection since.
    let idle = u64::from(pool.state().idle_connections);
    assert!(idle >= u64::from(size), "{idle}");
    assert!(proxy.silence_existing() >= size as usize);

    let started = Instant::now();
    let first = pool.select_one().await;
    let first_took = started.elapsed();
    assert_eq!(
        first,
        Ok(1),
        "the first request after the fault must succeed"
    );
    assert!(
        first_took < validation_timeout + Duration::from_secs(1),
        "first request took {first_took:?}: more than one validation timeout \
         ({validation_timeout:?}) plus one connect; silent connections were pinged in series: {:?}",
        pool.stats()
    );
    let started = Instant::now();
    let errors = errors_over(&pool, 20).await;
    let rest_took = started.elapsed();
    assert!(errors.is_empty(), "errors after the fault: {errors:?}");
    assert!(
        first_took + rest_took < 2 * validation_timeout,
        "21 requests took {:?} in all",
        first_took + rest_took
    );
    let stats = pool.stats();
    assert_eq!(stats.validations_failed, 1, "one ping timed out: {stats:?}");
    assert_eq!(
        stats.closed.invalidated,
        idle - 1,
        "the other silent connections were closed without a ping: {stats:?}"
    );
    println!(
        "silent, async, pool of {size}: first request {first_took:?}, 20 more {rest_took:?}, \
         0 errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plain_bb8_at_its_defaults_gives_no_connection_for_seconds_when_every_flow_goes_silent(
) {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let control = control_verified(&url).await;
    control.warm(POOL as usize).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.silence_existing();
    // bb8 validates with a `SELECT 1` that has no time limit but bb8's whole 30 s checkout
    // timeout, and puts the connection back when that gives up.
    let waited = Duration::from_secs(3);
    let outcome = tokio::time::timeout(waited, control.select_one()).await;
    assert!(
        outcome.is_err(),
        "plain bb8 was expected to still be waiting after {waited:?}, got {outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keepalive_sweep_meets_silence_with_one_timeout_and_never_repools_what_it_gave_up_on() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let validation_timeout = Duration::from_secs(2);
    let pool = PgPool::builder(&url)
        .application_name("async_silent_sweep")
        .pool_size(POOL)
        // No overflow: a connect started for the warm-up cannot leave a ninth connection.
        .max_overflow(0)
        .validation_timeout(validation_timeout)
        .keepalive_ping(Some(Duration::from_millis(400)))
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
    let idle = u64::from(pool.state().idle_connections);
    proxy.silence_existing();
    let started = Instant::now();
    let deadline = started + validation_timeout * 4;
    while pool.state().connections > 0 {
        assert!(
            Instant::now() < deadline,
            "the sweep left {} of {POOL} silent connections open after {:?}: {:?}",
            pool.state().connections,
            started.elapsed(),
            pool.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = pool.stats();
    assert_eq!(stats.closed.ping_failed, 1, "{stats:?}");
    assert_eq!(stats.closed.invalidated, idle - 1, "{stats:?}");
    // Fresh connections serve again.
    assert_eq!(pool.select_one().await, Ok(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_validation_serves_well_under_one_validation_timeout_when_every_flow_goes_silent() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At its defaults (validation_timeout 5 s, room to open more than pool_size).
    let pool = PgPool::builder(&url)
        .application_name("async_hedged")
        .pool_size(POOL)
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.silence_existing();
    let started = Instant::now();
    assert_eq!(pool.select_one().await, Ok(1));
    let first = started.elapsed();
    let errors = errors_over(&pool, 20).await;
    let total = started.elapsed();
    let stats = pool.stats();
    assert!(errors.is_empty(), "{errors:?}");
    // Well under one validation timeout (5 s) plus a connect, which is what the suspects
    // alone would cost; about the hedge delay (100 ms) plus a connect on a quiet machine.
    assert!(
        first < Duration::from_millis(2500),
        "first request took {first:?}: the slow ping was not hedged (validation timeout 5 s): \
         {stats:?}"
    );
    assert!(
        total < Duration::from_secs(10),
        "21 requests took {total:?}, more than two validation timeouts: {stats:?}"
    );
    assert!(stats.hedges_won >= 1, "{stats:?}");
    assert!(
        stats.closed.total() + u64::from(pool.state().connections) <= stats.connects,
        "nothing beyond the connections opened: {stats:?}"
    );
    println!(
        "silent, async, hedged, pool of {POOL} at defaults: first request {first:?}, 21 in \
         {total:?}, {} hedges won",
        stats.hedges_won
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_slow_connection_is_given_up_at_the_hedge_delay_never_pinged_out_or_exceeded()
{
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At the cap: 2 of 2 open, no overflow, so a hedge has no room beside the slow ping.
    let pool = PgPool::builder(&url)
        .application_name("async_hedge_cap")
        .name("async_hedge_cap")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .await
        .expect("pool");
    pool.warm(2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.silence_existing();
    let started = Instant::now();
    assert_eq!(pool.select_one().await, Ok(1));
    let first = started.elapsed();
    let stats = pool.stats();
    // Waiting the ping out would take the validation timeout (5 s); giving each silent
    // connection up at the hedge delay (100 ms) costs two delays and a connect.
    assert!(
        first < Duration::from_millis(2500),
        "first request took {first:?}: the slow ping at the cap was waited out: {stats:?}"
    );
    assert!(stats.hedges_gave_up >= 1, "{stats:?}");
    // Each connection given up is reported, at info, with the pool's name.
    let reported = test_support::captured_logs()
        .into_iter()
        .filter(|l| {
            l.starts_with("INFO")
                && l.contains("pool async_hedge_cap: validation ping failed")
                && l.contains("given up")
        })
        .count();
    assert_eq!(
        reported as u64, stats.hedges_gave_up,
        "a log line per connection given up"
    );
    // The first slow connection is given up; the next may be hedged in the room it left.
    assert!(
        pool.state().connections <= 2,
        "never past the sizes: {:?}",
        pool.state()
    );
    assert!(errors_over(&pool, 10).await.is_empty());
    println!(
        "silent, async, at the cap (2 of 2): first request {first:?}, {} given up",
        stats.hedges_gave_up
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_pool_of_8_all_silent_gives_up_two_connections_not_one_per_connection() {
    const POOL: u32 = 8;
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At the cap: 8 of 8 open, no overflow. Each silent connection pinged in turn would be
    // given up at the hedge delay: 8 delays for one checkout, and more for a burst.
    let pool = PgPool::builder(&url)
        .application_name("async_hedge_cap8")
        .pool_size(POOL)
        .max_overflow(0)
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.silence_existing();
    assert_eq!(pool.select_one().await, Ok(1));
    let first = pool.stats();
    // Two slow pings within one validation timeout (given up, or hedged in the room the
    // first left): the path went silent, the other six are suspects, closed without a ping.
    let met = |s: &pool_core::stats::StatsSnapshot| s.hedges_won + s.hedges_gave_up;
    assert!(
        met(&first) <= 2,
        "the first request met {} silent connection(s) (each a hedge delay), expected at most \
         2: {first:?}",
        met(&first)
    );
    // A burst of POOL at once: none of them pings a suspect.
    let burst: Vec<_> = (0..POOL)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.select_one().await })
        })
        .collect();
    let mut errors = Vec::new();
    for task in burst {
        if let Err(e) = task.await.expect("task") {
            errors.push(e);
        }
    }
    let stats = pool.stats();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        met(&stats) <= 2 && stats.closed.invalidated >= u64::from(POOL) - 2,
        "a burst after the silence met {} silent connection(s) (each one more hedge delay) and \
         closed {} as suspects: {stats:?}",
        met(&stats),
        stats.closed.invalidated
    );
    assert!(
        pool.state().connections <= POOL,
        "never past the sizes: {:?}",
        pool.state()
    );
    println!(
        "silent, async, at the cap (8 of 8): {} given up, {} hedged, {} closed as \
         suspects",
        stats.hedges_gave_up, stats.hedges_won, stats.closed.invalidated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_healthy_pool_hedging_opens_nothing() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "async_hedge_idle", 4)
        .validation_bypass_window(Duration::ZERO)
        .build()
        .await
        .expect("pool");
    pool.warm(4).await;
    let connects = pool.stats().connects;
    assert!(errors_over(&pool, 200).await.is_empty());
    let stats = pool.stats();
    assert!(stats.pings >= 200, "every checkout pinged: {stats:?}");
    assert_eq!(stats.hedges, 0, "{stats:?}");
    assert_eq!(stats.connects, connects, "{stats:?}");
}

// ---- Connect errors: hopeless ones fail fast, transient ones are waited out ----

fn url_for_db(pg: &PgServer, db: &str) -> String {
    pg.url_with("sslmode=disable")
        .replace("/app?", &format!("/{db}?"))
}

async fn served_within(pool: &PgPool, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        match pool.select_one().await {
            Ok(_) => return started.elapsed(),
            Err(e) => assert!(
                started.elapsed() < limit,
                "{what}: still failing after {:?}: {e}",
                started.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_exist_fails_build_at_once_with_the_cause() {
    let Some(pg) = server() else { return };
    let started = Instant::now();
    let error = PgPool::builder(&url_for_db(&pg, "no_such_db"))
        .pool_size(2)
        .build()
        .await
        .expect_err("a database that does not exist");
    let took = started.elapsed();
    let text = error.to_string();
    assert!(text.contains("does not exist"), "{text}");
    assert!(!text.contains(PgServer::PASSWORD), "{text}");
    assert!(took < Duration::from_secs(2), "build took {took:?}");
    println!("hopeless, async build: failed after {took:?}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plain_bb8_waits_its_whole_timeout_for_a_database_that_does_not_exist() {
    let Some(pg) = server() else { return };
    let url = url_for_db(&pg, "no_such_db");
    let control = bb8::Pool::builder().build_unchecked(
        diesel_async::pooled_connection::AsyncDieselConnectionManager::<
            diesel_async::AsyncPgConnection,
        >::new(url),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(3), control.get()).await;
    assert!(
        outcome.is_err(),
        "plain bb8 was expected to keep trying for its 30 s timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_fails_checkouts_fast_and_the_pool_heals_when_it_works_again() {
    let Some(pg) = server() else { return };
    let app = "async_rotated";
    let pool = ext_pool(&pg, app, 1).build().await.expect("pool");
    pool.warm(1).await;
    pg.execute("ALTER ROLE app PASSWORD 'rotated-elsewhere'")
        .expect("rotate");
    terminate_all(&pg, app).await;
    for attempt in 0..2 {
        let started = Instant::now();
        let error = pool.select_one().await.expect_err("wrong password now");
        let took = started.elapsed();
        assert!(error.contains("password"), "attempt {attempt}: {error}");
        assert!(!error.contains(PgServer::PASSWORD), "{error}");
        assert!(
            took < Duration::from_secs(2),
            "attempt {attempt}: {took:?}: {error}"
        );
    }
    pg.execute(&format!("ALTER ROLE app PASSWORD '{}'", PgServer::PASSWORD))
        .expect("restore");
    let healed = served_within(
        &pool,
        Duration::from_secs(5),
        "after the password works again",
    )
    .await;
    println!("rotated password, async: healed {healed:?} after it was restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazily_built_pool_starts_before_its_database_exists_and_serves_once_it_does() {
    let Some(pg) = server() else { return };
    let pool = PgPool::builder(&url_for_db(&pg, "late_async"))
        .pool_size(2)
        .build_lazy()
        .await
        .expect("a lazy build opens nothing");
    let error = pool.select_one().await.expect_err("no database yet");
    assert!(error.contains("does not exist"), "{error}");
    assert!(!pool.status().is_healthy(), "{}", pool.status());
    pg.execute("CREATE DATABASE late_async OWNER app")
        .expect("create");
    served_within(
        &pool,
        Duration::from_secs(5),
        "after the database was created",
    )
    .await;
    assert!(pool.status().is_healthy(), "{}", pool.status());
}

/// A pool of `size` through a fault proxy, `configure`d, warmed, then cut off: the proxy
/// refuses connections, and the clients' connection tasks have read the resets (the async
/// probe is the client's closed state).
async fn warmed_then_cut_off(
    pg: &PgServer,
    size: u32,
    configure: impl FnOnce(Builder<AsyncPgConnection>) -> Builder<AsyncPgConnection>,
) -> (FaultProxy, PgPool) {
    let (proxy, url) = proxied(pg, "sslmode=disable");
    let pool = configure(PgPool::builder(&url).pool_size(size))
        .build()
        .await
        .expect("pool");
    pool.warm(size as usize).await;
    proxy.refuse_connections(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    (proxy, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_waiting_through_an_outage_are_served_within_250ms_of_the_servers_return() {
    let Some(pg) = server() else { return };
    let (proxy, pool) =
        warmed_then_cut_off(&pg, 2, |b| b.pool_timeout(Duration::from_secs(10))).await;
    let p = pool.clone();
    let waiter = tokio::spawn(async move {
        let result = p.select_one().await;
        (result, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let status = pool.status().to_string();
    assert!(status.contains("unreachable"), "{status}");
    let back = Instant::now();
    proxy.refuse_connections(false);
    let (result, served) = waiter.await.expect("waiter");
    assert_eq!(result, Ok(1));
    let late = served.duration_since(back);
    assert!(
        late < Duration::from_millis(250),
        "served {late:?} after the return"
    );
    println!("outage, async: served {late:?} after the server's return");
}

/// A checkout given more time than `pool_timeout` (`get_timeout`) waits through an outage
/// for its own time: bb8's wait, bounded by `pool_timeout` (bb8's `connection_timeout`),
/// is entered again until the caller's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_timeout_longer_than_the_pool_timeout_waits_through_an_outage_for_its_own_time() {
    let Some(pg) = server() else { return };
    let (proxy, pool) =
        warmed_then_cut_off(&pg, 1, |b| b.pool_timeout(Duration::from_millis(300))).await;
    let p = pool.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let got = p.get_timeout(Duration::from_secs(10)).await.map(drop);
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.refuse_connections(false);
    let (got, waited) = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("the checkout ended within its own 10 s")
        .expect("the waiter's task");
    got.unwrap_or_else(|e| {
        panic!("get_timeout(10 s) gave up after {waited:?}, with pool_timeout 300 ms: {e}")
    });
    assert!(
        waited >= Duration::from_millis(1400),
        "served only after the outage: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_fast_when_down_checkouts_fail_at_once_during_an_outage_and_pass_again_after_it()
{
    let Some(pg) = server() else { return };
    let (proxy, pool) = warmed_then_cut_off(&pg, 1, |b| {
        b.pool_timeout(Duration::from_secs(10))
            .fail_fast_when_down(Some(Duration::from_millis(500)))
    })
    .await;
    let started = Instant::now();
    let first = pool.select_one().await.expect_err("down");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(first.contains("unreachable"), "{first}");
    let started = Instant::now();
    let second = pool.select_one().await.expect_err("still down");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}: {second}",
        started.elapsed()
    );
    proxy.refuse_connections(false);
    served_within(&pool, Duration::from_secs(2), "after the outage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_loop_never_runs_past_its_own_max_elapsed() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .pool_size(1)
        .pool_timeout(Duration::from_secs(3))
        .build()
        .await
        .expect("pool");
    pool.warm(1).await;
    proxy.refuse_connections(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let policy = diesel_async_ext::RetryPolicy::builder()
        .max_elapsed(Some(Duration::from_secs(4)))
        .build()
        .expect("policy");
    let started = Instant::now();
    let result = diesel_async_ext::with_retry(&pool, &policy, async |conn| {
        diesel_async::SimpleAsyncConnection::batch_execute(conn, "SELECT 1").await
    })
    .await;
    let took = started.elapsed();
    assert!(result.is_err());
    assert!(
        took < Duration::from_millis(4500),
        "with_retry took {took:?}"
    );
}
