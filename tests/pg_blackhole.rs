//! A blackholed network (diesel issue 3016: "r2d2 hangs on dropped packets"): the server and
//! the pool share a private network namespace whose loopback is taken down, so every packet is
//! dropped without a reset. With keepalives and `tcp_user_timeout` (the extended pool's
//! defaults, shortened here) the pool notices and recovers; a plain r2d2 pool with the OS
//! defaults waits on the held connection until the network comes back.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use test_support::{NetNs, PgServer};

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

fn query(conn: &mut PgConnection) -> Result<i32, String> {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("1"))
        .get_result(conn)
        .map_err(|e| e.to_string())
}

/// What the worker inside the namespace saw while the network was down (printed for the
/// record; the times are asserted only against the bounds the settings promise, with room
/// for a loaded machine).
#[derive(Debug)]
#[allow(dead_code)]
struct Seen {
    held_query: Result<i32, String>,
    held_query_took: Duration,
    checkout: Result<i32, String>,
    checkout_took: Duration,
}

#[test]
fn keepalives_and_tcp_user_timeout_turn_a_blackhole_into_errors_and_the_pool_recovers() {
    let Some(ns) = namespace() else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel();
    let (back_tx, back_rx) = mpsc::channel::<()>();
    let worker = ns.spawn(move || {
        let pg = PgServer::start().expect("a private server inside the namespace");
        let pool = resilient_diesel::PgPool::builder(&pg.url_with("sslmode=disable"))
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
            .unwrap();
        warm(&pool, 2);
        let mut held = pool.get().unwrap();
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let t = Instant::now();
        let held_query = query(&mut held);
        let held_query_took = t.elapsed();
        drop(held);
        let t = Instant::now();
        let checkout = select_one(&pool);
        let checkout_took = t.elapsed();
        seen_tx
            .send(Seen {
                held_query,
                held_query_took,
                checkout,
                checkout_took,
            })
            .unwrap();
        back_rx.recv().unwrap();
        // The network is back: the pool serves again without a restart.
        let deadline = Instant::now() + Duration::from_secs(20);
        while select_one(&pool).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        errors_over(&pool, 20)
    });
    ready_rx.recv().expect("worker ready");
    ns.blackhole().unwrap();
    go_tx.send(()).unwrap();
    let seen = seen_rx.recv_timeout(Duration::from_secs(30));
    ns.restore().unwrap();
    back_tx.send(()).ok();
    let seen = seen.expect("the extended pool hung on a blackholed network");
    eprintln!("blackhole, extended pool: {seen:?}");
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
    let errors = worker.join().unwrap();
    assert!(errors.is_empty(), "the pool must serve again: {errors:?}");
    assert_no_secret_in_logs();
}

#[test]
fn control_plain_r2d2_with_os_defaults_hangs_on_a_blackholed_network() {
    let Some(ns) = namespace() else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel();
    let worker = ns.spawn(move || {
        let pg = PgServer::start().expect("a private server inside the namespace");
        let pool = r2d2::Pool::builder()
            .max_size(1)
            .build(ConnectionManager::<PgConnection>::new(
                pg.url_with("sslmode=disable&application_name=plain_blackhole"),
            ))
            .unwrap();
        let mut held = pool.get().unwrap();
        query(&mut held).unwrap();
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let t = Instant::now();
        let result = query(&mut held);
        let _ = seen_tx.send((result, t.elapsed()));
    });
    ready_rx.recv().expect("worker ready");
    ns.blackhole().unwrap();
    go_tx.send(()).unwrap();
    let seen = seen_rx.recv_timeout(Duration::from_secs(12));
    ns.restore().unwrap();
    assert!(
        seen.is_err(),
        "plain r2d2 was expected to wait on the dropped packets, got {seen:?}"
    );
    // Once the network is back, TCP retransmits and the query completes.
    worker.join().unwrap();
}
