//! Correlated faults, async pool: faults that hit every connection at once must cost the pool
//! a bounded number of timeouts, whatever its size.
//!
//! "Every flow silent" is a proxy that stops forwarding the connections it already carries
//! (sockets open, nothing answered) while it passes new ones.

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel_async_ext::PgPool;

const POOL: u32 = 8;

async fn warmed_pool(url: &str, app: &str, validation_timeout: Duration) -> PgPool {
    let pool = PgPool::builder(url)
        .application_name(app)
        .pool_size(POOL)
        .validation_timeout(validation_timeout)
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
    assert_eq!(pool.state().idle_connections, POOL, "warm-up");
    tokio::time::sleep(Duration::from_millis(600)).await;
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_silent_at_once_costs_one_validation_timeout_not_one_per_connection(
) {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let validation_timeout = Duration::from_secs(1);
    let pool = warmed_pool(&url, "async_silent", validation_timeout).await;
    assert_eq!(proxy.silence_existing(), POOL as usize);

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
        u64::from(POOL) - 1,
        "the other silent connections were closed without a ping: {stats:?}"
    );
    println!(
        "silent, async, pool of {POOL}: first request {first_took:?}, 20 more {rest_took:?}, \
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
    let validation_timeout = Duration::from_secs(1);
    let pool = PgPool::builder(&url)
        .application_name("async_silent_sweep")
        .pool_size(POOL)
        .validation_timeout(validation_timeout)
        .keepalive_ping(Some(Duration::from_millis(400)))
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
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
    assert_eq!(stats.closed.invalidated, u64::from(POOL) - 1, "{stats:?}");
    let started = Instant::now();
    assert_eq!(pool.select_one().await, Ok(1));
    assert!(
        started.elapsed() < validation_timeout,
        "{:?}",
        started.elapsed()
    );
}
