//! Correlated faults, sync pool: faults that hit every connection at once must cost the pool
//! a bounded number of timeouts, whatever its size.
//!
//! "Every flow silent" is a proxy that stops forwarding the connections it already carries
//! (sockets open, nothing answered: a NAT or load balancer that forgot its flows, a failover
//! that left the old sockets hanging) while it passes new ones.

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel::prelude::*;

const POOL: u32 = 8;

/// A pool of 8 through `url`, warmed (8 connections open and idle), then left idle past the
/// bypass window so that every checkout wants a ping.
fn warmed_pool(url: &str, app: &str, validation_timeout: Duration) -> resilient_diesel::PgPool {
    warmed_pool_of(POOL, url, app, validation_timeout)
}

/// [`warmed_pool`] of `size` connections.
fn warmed_pool_of(
    size: u32,
    url: &str,
    app: &str,
    validation_timeout: Duration,
) -> resilient_diesel::PgPool {
    let pool = resilient_diesel::PgPool::builder(url)
        .application_name(app)
        .pool_size(size)
        // No overflow: a connect started for the warm-up cannot leave one more connection.
        .max_overflow(0)
        .validation_timeout(validation_timeout)
        // The suspects alone (hedging has its own test below).
        .hedged_validation(false)
        .build()
        .expect("pool");
    warm(&pool, size as usize);
    assert_eq!(pool.state().idle_connections, size, "warm-up");
    std::thread::sleep(Duration::from_millis(600));
    pool
}

#[test]
fn every_pooled_connection_silent_at_once_costs_one_validation_timeout_not_one_per_connection() {
    silent_at_once_costs_one_timeout(POOL, "ext_silent");
}

/// The same fault on a pool four times as large: still one validation timeout, whatever the
/// pool's size.
#[test]
fn a_pool_of_32_all_silent_at_once_still_costs_one_validation_timeout() {
    silent_at_once_costs_one_timeout(32, "ext_silent_32");
}

/// Every connection of a warmed pool of `size` silent at once: the first request pays one
/// validation timeout and one connect, twenty more pay nothing, one ping fails and the other
/// silent connections are closed without a ping.
fn silent_at_once_costs_one_timeout(size: u32, app: &str) {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let validation_timeout = Duration::from_secs(2);
    let pool = warmed_pool_of(size, &url, app, validation_timeout);
    // A connect started for the warm-up may have added one more idle connection since.
    let idle = u64::from(pool.state().idle_connections);
    assert!(idle >= u64::from(size), "{idle}");
    assert!(proxy.silence_existing() >= size as usize);

    // The first request pays one validation timeout and one connect, not eight timeouts.
    let started = Instant::now();
    let first = select_one(&pool);
    let first_took = started.elapsed();
    assert_eq!(
        first,
        Ok(1),
        "the first request after the fault must succeed"
    );
    let bound = validation_timeout + Duration::from_secs(1);
    assert!(
        first_took < bound,
        "first request took {first_took:?}: more than one validation timeout ({validation_timeout:?}) \
         plus one connect; the pool pinged its silent connections in series: {:?}",
        pool.stats()
    );
    // Twenty more, one after another: no further timeout at all.
    let started = Instant::now();
    let errors = errors_over(&pool, 20);
    let rest_took = started.elapsed();
    assert!(errors.is_empty(), "errors after the fault: {errors:?}");
    assert!(
        first_took + rest_took < 2 * validation_timeout,
        "21 requests took {:?} in all: more than two validation timeouts",
        first_took + rest_took
    );
    let stats = pool.stats();
    assert_eq!(
        stats.validations_failed, 1,
        "exactly one ping timed out: {stats:?}"
    );
    assert_eq!(
        stats.closed.invalidated,
        idle - 1,
        "the other silent connections were closed without a ping: {stats:?}"
    );
    println!(
        "silent, sync, pool of {size}: first request {first_took:?}, 20 more {rest_took:?}, \
         0 errors"
    );
}

#[test]
fn control_plain_r2d2_at_its_defaults_hangs_when_every_pooled_connection_goes_silent() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = plain_pool_defaults(&url);
    warm(&pool, 10);
    proxy.silence_existing();
    // r2d2's validity check has no time limit of its own (r2d2#116): it waits for a reply
    // that never comes.
    let _hung = assert_checkout_hangs(&pool, Duration::from_secs(5));
    // Dropping the proxy resets its connections, which ends the hung ping; the thread then
    // waits out r2d2's 30 s timeout for a connect that is refused, and is left to it.
}

#[test]
fn the_keepalive_sweep_meets_silence_with_one_timeout_and_never_repools_what_it_shut_down() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let validation_timeout = Duration::from_secs(2);
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("ext_silent_sweep")
        .pool_size(POOL)
        // No overflow: a connect started for the warm-up cannot leave a ninth connection.
        .max_overflow(0)
        .validation_timeout(validation_timeout)
        .keepalive_ping(Some(Duration::from_millis(400)))
        .build()
        .expect("pool");
    warm(&pool, POOL as usize);
    let idle = u64::from(pool.state().idle_connections);
    proxy.silence_existing();
    // The sweep pings one connection, which times out; the other seven are closed without a
    // ping, and the one whose socket the watchdog shut down is closed too, never put back.
    let started = Instant::now();
    let deadline = started + validation_timeout * 4;
    while pool.state().connections > 0 {
        assert!(
            Instant::now() < deadline,
            "the sweep left {} of {POOL} silent connections open after {:?} \
             (validation timeout {validation_timeout:?}): {:?}",
            pool.state().connections,
            started.elapsed(),
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = pool.stats();
    assert_eq!(stats.closed.ping_failed, 1, "{stats:?}");
    assert_eq!(stats.closed.invalidated, idle - 1, "{stats:?}");
    // Fresh connections serve again.
    assert_eq!(select_one(&pool), Ok(1));
}

#[test]
fn a_hung_backend_makes_the_idle_connections_suspect_and_they_are_replaced_not_pinged() {
    // One backend stopped (SIGSTOP), not the path: the pool cannot tell the two apart from
    // one unanswered ping, so it prefers reconnecting to pinging the others in series.
    let Some(pg) = server() else { return };
    let app = "ext_silent_one";
    let validation_timeout = Duration::from_secs(2);
    let pool = warmed_pool(
        &pg.url_with(&format!("sslmode=disable&application_name={app}")),
        app,
        validation_timeout,
    );
    // The connection handed out first is the one returned last: rename its backend, stop it.
    {
        let mut conn = pool.get().expect("checkout");
        diesel::sql_query("SET application_name = 'ext_silent_victim'")
            .execute(&mut *conn)
            .expect("rename");
    }
    std::thread::sleep(Duration::from_millis(600));
    let pause = pg
        .pause_backends("ext_silent_victim")
        .expect("pause one backend");
    assert_eq!(pause.pids().len(), 1);
    let started = Instant::now();
    let result = select_one(&pool);
    let took = started.elapsed();
    pause.resume();
    assert_eq!(result, Ok(1));
    assert!(
        took < validation_timeout + Duration::from_secs(1),
        "{took:?}: {:?}",
        pool.stats()
    );
    assert!(errors_over(&pool, 20).is_empty());
}

#[test]
fn hedged_validation_serves_well_under_one_validation_timeout_when_every_flow_goes_silent() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At its defaults (validation_timeout 5 s, room to open more than pool_size).
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("ext_hedged")
        .pool_size(POOL)
        .build()
        .expect("pool");
    warm(&pool, POOL as usize);
    std::thread::sleep(Duration::from_millis(600));
    proxy.silence_existing();
    let started = Instant::now();
    assert_eq!(select_one(&pool), Ok(1));
    let first = started.elapsed();
    let errors = errors_over(&pool, 20);
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
    println!(
        "silent, sync, hedged, pool of {POOL} at defaults: first request {first:?}, 21 in \
         {total:?}, {} hedges won",
        stats.hedges_won
    );
}

#[test]
fn at_the_cap_a_slow_connection_is_given_up_at_the_hedge_delay_never_pinged_out_or_exceeded() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At the cap: 2 of 2 open, no overflow, so a hedge has no room beside the slow ping.
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("ext_hedge_cap")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .expect("pool");
    warm(&pool, 2);
    std::thread::sleep(Duration::from_millis(600));
    proxy.silence_existing();
    let started = Instant::now();
    assert_eq!(select_one(&pool), Ok(1));
    let first = started.elapsed();
    let stats = pool.stats();
    // Waiting the ping out would take the validation timeout (5 s); giving each silent
    // connection up at the hedge delay (100 ms) costs two delays and a connect.
    assert!(
        first < Duration::from_millis(2500),
        "first request took {first:?}: the slow ping at the cap was waited out: {stats:?}"
    );
    assert!(stats.hedges_gave_up >= 1, "{stats:?}");
    // The first slow connection is given up; the next may be hedged in the room it left.
    assert!(
        pool.state().connections <= 2,
        "never past the sizes: {:?}",
        pool.state()
    );
    assert!(errors_over(&pool, 10).is_empty());
    println!(
        "silent, sync, at the cap (2 of 2): first request {first:?}, {} given up",
        stats.hedges_gave_up
    );
}

#[test]
fn at_the_cap_a_pool_of_8_all_silent_gives_up_two_connections_not_one_per_connection() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // At the cap: 8 of 8 open, no overflow. Each silent connection pinged in turn would be
    // given up at the hedge delay: 8 delays for one checkout, and more for a burst.
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("ext_hedge_cap8")
        .pool_size(POOL)
        .max_overflow(0)
        .build()
        .expect("pool");
    warm(&pool, POOL as usize);
    std::thread::sleep(Duration::from_millis(600));
    proxy.silence_existing();
    assert_eq!(select_one(&pool), Ok(1));
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
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..POOL).map(|_| s.spawn(|| select_one(&pool))).collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().err())
            .collect()
    });
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
        "silent, sync, at the cap (8 of 8): {} given up, {} hedged, {} closed as \
         suspects",
        stats.hedges_gave_up, stats.hedges_won, stats.closed.invalidated
    );
}

#[test]
fn a_hedge_connection_whose_setup_failed_is_never_handed_out() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // The application's per-session setup: it fails on the second connection only (the
    // hedge's), before setting anything.
    let calls = Arc::new(AtomicUsize::new(0));
    let hook_calls = Arc::clone(&calls);
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("ext_hedge_setup")
        .pool_size(1)
        .max_overflow(1)
        .validation_timeout(Duration::from_secs(1))
        .after_connect(move |conn| {
            if hook_calls.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(diesel::result::Error::QueryBuilderError(
                    "the session setup failed".into(),
                ));
            }
            diesel::connection::SimpleConnection::batch_execute(conn, "SET work_mem = '7MB'")
        })
        .build()
        .expect("pool");
    warm(&pool, 1);
    std::thread::sleep(Duration::from_millis(600));
    proxy.silence_existing();
    let mut conn = pool.get().expect("a connection after the silence");
    let work_mem: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
        "current_setting('work_mem')",
    ))
    .get_result(&mut *conn)
    .expect("query");
    assert_eq!(
        work_mem,
        "7MB",
        "a connection whose session setup failed (or never ran) was handed out: {:?}",
        pool.stats()
    );
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the hedge never connected: {:?}",
        pool.stats()
    );
}

#[test]
fn on_a_healthy_pool_hedging_opens_nothing() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_hedge_idle", 4)
        .validation_bypass_window(Duration::ZERO)
        .build()
        .expect("pool");
    warm(&pool, 4);
    let connects = pool.stats().connects;
    assert!(errors_over(&pool, 200).is_empty());
    let stats = pool.stats();
    assert!(stats.pings >= 200, "every checkout pinged: {stats:?}");
    assert_eq!(stats.hedges, 0, "{stats:?}");
    assert_eq!(stats.connects, connects, "{stats:?}");
}

// ---- Connect errors: hopeless ones fail fast, transient ones are waited out ----

/// The test server's URL for database `db` (plaintext).
fn url_for_db(pg: &PgServer, db: &str) -> String {
    pg.url_with("sslmode=disable")
        .replace("/app?", &format!("/{db}?"))
}

#[test]
fn a_database_that_does_not_exist_fails_build_at_once_with_the_cause() {
    let Some(pg) = server() else { return };
    let url = url_for_db(&pg, "no_such_db");
    let started = Instant::now();
    let error = resilient_diesel::PgPool::builder(&url)
        .pool_size(2)
        .build()
        .expect_err("a database that does not exist");
    let took = started.elapsed();
    let text = error.to_string();
    assert!(
        text.contains("does not exist"),
        "the cause is named: {text}"
    );
    assert!(!text.contains(PgServer::PASSWORD), "{text}");
    assert!(
        took < Duration::from_secs(2),
        "build took {took:?} (pool_timeout is 30 s): it must fail at the first attempt"
    );
    println!("hopeless, sync build: failed after {took:?}: {text}");
}

#[test]
fn control_plain_r2d2_waits_its_whole_timeout_for_a_database_that_does_not_exist() {
    let Some(pg) = server() else { return };
    let url = url_for_db(&pg, "no_such_db");
    let (outcome, _thread) = within(Duration::from_secs(3), move || {
        r2d2::Pool::new(diesel::r2d2::ConnectionManager::<PgConnection>::new(url)).is_ok()
    });
    assert!(
        outcome.is_none(),
        "plain r2d2 was expected to keep trying for its 30 s connection_timeout"
    );
}

/// Polls `select_one` until it succeeds; fails the test after `limit`.
fn served_within(pool: &resilient_diesel::PgPool, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        match select_one(pool) {
            Ok(_) => return started.elapsed(),
            Err(e) => assert!(
                started.elapsed() < limit,
                "{what}: still failing after {:?}: {e}",
                started.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rotated_password_fails_checkouts_fast_and_the_pool_heals_when_it_works_again() {
    let Some(pg) = server() else { return };
    let app = "ext_rotated";
    let pool = ext_pool(&pg, app, 1).build().expect("pool");
    warm(&pool, 1);
    pg.execute("ALTER ROLE app PASSWORD 'rotated-elsewhere'")
        .expect("rotate");
    terminate_all(&pg, app);
    for attempt in 0..2 {
        let started = Instant::now();
        let error = select_one(&pool).expect_err("the password no longer works");
        let took = started.elapsed();
        assert!(
            error.contains("password authentication failed"),
            "attempt {attempt}: {error}"
        );
        assert!(!error.contains(PgServer::PASSWORD), "{error}");
        assert!(
            took < Duration::from_secs(2),
            "attempt {attempt}: took {took:?} (pool_timeout 10 s): {error}"
        );
    }
    pg.execute(&format!("ALTER ROLE app PASSWORD '{}'", PgServer::PASSWORD))
        .expect("restore");
    let healed = served_within(
        &pool,
        Duration::from_secs(5),
        "after the password works again",
    );
    println!("rotated password: healed {healed:?} after it was restored");
    assert!(errors_over(&pool, 10).is_empty());
}

#[test]
fn a_lazily_built_pool_starts_before_its_database_exists_and_serves_once_it_does() {
    let Some(pg) = server() else { return };
    let pool = resilient_diesel::PgPool::builder(&url_for_db(&pg, "late"))
        .pool_size(2)
        .build_lazy()
        .expect("a lazy build opens nothing");
    let started = Instant::now();
    let error = select_one(&pool).expect_err("no database yet");
    assert!(error.contains("does not exist"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!pool.status().is_healthy(), "{}", pool.status());
    pg.execute("CREATE DATABASE late OWNER app")
        .expect("create");
    served_within(
        &pool,
        Duration::from_secs(5),
        "after the database was created",
    );
    assert!(pool.status().is_healthy(), "{}", pool.status());
}

#[test]
fn checkouts_waiting_through_an_outage_are_served_within_250ms_of_the_servers_return() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = resilient_diesel::PgPool::builder(&url)
        .pool_size(2)
        .pool_timeout(Duration::from_secs(10))
        .build()
        .expect("pool");
    warm(&pool, 2);
    proxy.refuse_connections(true);
    let p = pool.clone();
    let waiter = std::thread::spawn(move || {
        let result = select_one(&p);
        (result, Instant::now())
    });
    // Not a whole number of seconds: a retry schedule of whole seconds must not land on the
    // return by chance.
    std::thread::sleep(Duration::from_millis(2300));
    let status = pool.status().to_string();
    assert!(
        status.contains("unreachable"),
        "the status says so: {status}"
    );
    let back = Instant::now();
    proxy.refuse_connections(false);
    let (result, served) = waiter.join().expect("waiter");
    assert_eq!(result, Ok(1), "the checkout waited through the outage");
    let late = served.duration_since(back);
    assert!(
        late < Duration::from_millis(250),
        "served {late:?} after the server came back"
    );
    println!("outage, sync: served {late:?} after the server's return");
}

#[test]
fn with_fail_fast_when_down_checkouts_fail_at_once_during_an_outage_and_pass_again_after_it() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = resilient_diesel::PgPool::builder(&url)
        .pool_size(1)
        .pool_timeout(Duration::from_secs(10))
        .fail_fast_when_down(Some(Duration::from_millis(500)))
        .build()
        .expect("pool");
    warm(&pool, 1);
    proxy.refuse_connections(true);
    let started = Instant::now();
    let first = select_one(&pool).expect_err("down");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first checkout waits out the breaker's threshold only: {:?}",
        started.elapsed()
    );
    assert!(first.contains("unreachable"), "{first}");
    let started = Instant::now();
    let second = select_one(&pool).expect_err("still down");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "the breaker is open: {:?} ({second})",
        started.elapsed()
    );
    // Each checkout that failed fast is one the application saw time out (the maintenance
    // thread's own waits, which fail fast the same way, are not).
    assert_eq!(
        pool.stats().timeouts,
        2,
        "checkouts that failed fast are counted as timed out: {:?}",
        pool.stats()
    );
    proxy.refuse_connections(false);
    served_within(&pool, Duration::from_secs(2), "after the outage");
}

#[test]
fn the_retry_loop_never_runs_past_its_own_max_elapsed() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = resilient_diesel::PgPool::builder(&url)
        .pool_size(1)
        .pool_timeout(Duration::from_secs(3))
        .build()
        .expect("pool");
    warm(&pool, 1);
    proxy.refuse_connections(true);
    let policy = resilient_diesel::RetryPolicy::builder()
        .max_elapsed(Some(Duration::from_secs(4)))
        .build()
        .expect("policy");
    let started = Instant::now();
    let result = resilient_diesel::with_retry(&pool, &policy, |conn| {
        diesel::sql_query("SELECT 1").execute(conn)
    });
    let took = started.elapsed();
    assert!(result.is_err(), "the server is down");
    assert!(
        took < Duration::from_millis(4500),
        "with_retry took {took:?} with max_elapsed 4 s: {result:?}"
    );
}
