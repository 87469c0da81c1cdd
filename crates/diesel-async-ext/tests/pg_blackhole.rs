//! A blackholed network: the server and the pool share a private network namespace whose
//! loopback is taken down, so every packet is dropped without a reset (a dead NAT, a cut
//! cable). With keepalives and `tcp_user_timeout` (the pool's defaults, shortened here) a
//! held connection fails instead of hanging, and the pool recovers; the control — plain bb8 +
//! diesel-async's manager, tokio-postgres's OS defaults — waits on the held connection until
//! the network comes back.
#![cfg(feature = "postgres")]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use diesel_async_ext::PgPool;
use test_support::NetNs;

fn namespace() -> Option<NetNs> {
    test_support::capture_logs();
    match NetNs::new() {
        Ok(ns) => Some(ns),
        Err(e) if !test_support::ci_mode() => {
            eprintln!("skipped: cannot make a network namespace: {e}");
            None
        }
        Err(e) => panic!("CI=true and no network namespace could be made: {e}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// What the worker inside the namespace saw while the network was down (printed; the held
/// query's time is asserted only against the bound the settings promise, with room for a
/// loaded machine).
#[derive(Debug)]
#[allow(dead_code)]
struct Seen {
    held_query: Result<i32, String>,
    held_query_took: Duration,
    checkout: Result<i32, String>,
    checkout_took: Duration,
}

#[test]
fn a_held_connection_on_a_blackholed_network_fails_within_the_keepalive_bound_and_the_pool_recovers(
) {
    let Some(ns) = namespace() else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel();
    let (back_tx, back_rx) = mpsc::channel::<()>();
    let worker = ns.spawn(move || {
        let pg = PgServer::start().expect("a private server inside the namespace");
        runtime().block_on(async move {
            let pool = PgPool::builder(&pg.url_with("sslmode=disable"))
                .application_name("ext_blackhole")
                .pool_size(2)
                .max_overflow(0)
                .keepalives_idle(Duration::from_secs(1))
                .keepalives_interval(Duration::from_secs(1))
                .keepalives_count(2)
                .tcp_user_timeout(Some(Duration::from_secs(2)))
                .connect_timeout(Some(Duration::from_secs(2)))
                .validation_bypass_window(Duration::from_millis(1))
                .validation_timeout(Duration::from_secs(2))
                .pool_timeout(Duration::from_secs(5))
                .build()
                .await
                .unwrap();
            pool.warm(2).await;
            let mut held = pool.get().await.unwrap();
            ready_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || go_rx.recv().unwrap())
                .await
                .unwrap();
            let t = Instant::now();
            let held_query = one(&mut held).await;
            let held_query_took = t.elapsed();
            drop(held);
            let t = Instant::now();
            let checkout = pool.select_one().await;
            let checkout_took = t.elapsed();
            seen_tx
                .send(Seen {
                    held_query,
                    held_query_took,
                    checkout,
                    checkout_took,
                })
                .unwrap();
            tokio::task::spawn_blocking(move || back_rx.recv().unwrap())
                .await
                .unwrap();
            // The network is back: the pool serves again without a restart.
            let deadline = Instant::now() + Duration::from_secs(20);
            while pool.select_one().await.is_err() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let errors = errors_over(&pool, 20).await;
            (errors, pool.stats())
        })
    });
    ready_rx.recv().expect("worker ready");
    ns.blackhole().unwrap();
    go_tx.send(()).unwrap();
    let seen = seen_rx.recv_timeout(Duration::from_secs(30));
    ns.restore().unwrap();
    back_tx.send(()).ok();
    let seen = seen.expect("the held connection hung on a blackholed network");
    println!("blackhole, our pool: {seen:?}");
    assert!(seen.held_query.is_err(), "{seen:?}");
    // `tcp_user_timeout` (2 s) ends the held query, not the 30 s this test waits.
    assert!(
        seen.held_query_took < Duration::from_secs(6),
        "the held query failed only after {:?} (tcp_user_timeout 2 s): {seen:?}",
        seen.held_query_took
    );
    // The checkout is bounded by the pool timeout (5 s), whatever the blackhole does.
    assert!(
        seen.checkout_took < Duration::from_secs(7),
        "the checkout took {:?} (pool_timeout 5 s): {seen:?}",
        seen.checkout_took
    );
    let (errors, stats) = worker.join().unwrap();
    assert!(errors.is_empty(), "the pool must serve again: {errors:?}");
    assert!(
        stats.closed.broken >= 1,
        "the dead connection was not pooled again: {stats:?}"
    );
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_bb8_with_os_defaults_hangs_on_a_blackholed_network() {
    let Some(ns) = namespace() else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel();
    let worker = ns.spawn(move || {
        let pg = PgServer::start().expect("a private server inside the namespace");
        runtime().block_on(async move {
            let pool =
                control_verified(&pg.url_with("sslmode=disable&application_name=bb8_blackhole"))
                    .await;
            let mut held = pool.get().await.unwrap();
            one(&mut held).await.unwrap();
            ready_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || go_rx.recv().unwrap())
                .await
                .unwrap();
            let t = Instant::now();
            let result = one(&mut held).await;
            let _ = seen_tx.send((result, t.elapsed()));
        })
    });
    ready_rx.recv().expect("worker ready");
    ns.blackhole().unwrap();
    go_tx.send(()).unwrap();
    let seen = seen_rx.recv_timeout(Duration::from_secs(8));
    ns.restore().unwrap();
    println!("blackhole, bb8 + Verified after 8 s: {seen:?}");
    assert!(
        seen.is_err(),
        "the control was expected to wait on the dropped packets, got {seen:?}"
    );
    // Once the network is back, TCP retransmits and the query completes.
    worker.join().unwrap();
}
