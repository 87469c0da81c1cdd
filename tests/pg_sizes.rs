//! `pool_size` and `max_overflow` mean what SQLAlchemy users expect, counted as backends in
//! `pg_stat_activity`: at most `pool_size` kept open, up to `max_overflow` more under load,
//! overflow closed when returned; background work never opens a connection; a budget class
//! keeps its reserved floor open for as long as it lives.

mod common;

use std::time::Duration;

use common::*;
use resilient_diesel::{Class, ClassPools};

#[test]
fn holding_pool_size_connections_opens_no_more_and_overflow_closes_on_return() {
    let Some(pg) = server() else { return };
    let app = "sizes_overflow";
    let pool = ext_pool(&pg, app, 2)
        .max_overflow(3)
        .idle_timeout(None)
        .build()
        .unwrap();
    assert_eq!(settle_backends(&pg, app, 2), 2, "pool_size opened at build");
    let held = hold(&pool, 2);
    // r2d2's min_idle would open 2 more idle ones *besides* the 2 in use.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        pg.count_backends(app).unwrap(),
        2,
        "holding pool_size opens nothing"
    );
    let more = hold(&pool, 3);
    assert_eq!(settle_backends(&pg, app, 5), 5, "overflow opens under load");
    drop(more);
    drop(held);
    assert_eq!(
        settle_backends(&pg, app, 2),
        2,
        "overflow is closed when returned; pool_size stays"
    );
    let stats = pool.stats();
    assert_eq!(stats.closed.overflow, 3, "{stats:?}");
    assert_eq!((stats.in_use, stats.idle), (0, 2), "{stats:?}");
}

/// `pool_size(0)` means what its rustdoc says: no connection is kept once returned (not
/// SQLAlchemy's "no limit": at most `max_overflow` are open at once).
/// Dropping the last clone of a pool stops its maintenance thread, which lets r2d2's pool go:
/// every connection is closed, none left open on the server for the life of the process.
#[test]
fn dropping_the_last_clone_of_a_pool_closes_its_connections() {
    let Some(pg) = server() else { return };
    let app = "sizes_dropped";
    let pool = ext_pool(&pg, app, 3).build().unwrap();
    let clone = pool.clone();
    assert_eq!(settle_backends(&pg, app, 3), 3, "pool_size opened at build");
    drop(pool);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        pg.count_backends(app).unwrap(),
        3,
        "a clone still holds the pool: its connections stay"
    );
    drop(clone);
    assert_eq!(
        settle_backends(&pg, app, 0),
        0,
        "10 s after the last clone was dropped, its connections are still open"
    );
}

#[test]
fn a_pool_size_of_zero_keeps_no_connection_once_returned() {
    let Some(pg) = server() else { return };
    let app = "sizes_zero";
    let pool = ext_pool(&pg, app, 0)
        .max_overflow(3)
        .idle_timeout(None)
        .build()
        .unwrap();
    assert_eq!(settle_backends(&pg, app, 0), 0, "nothing opened at build");
    let held = hold(&pool, 3);
    assert_eq!(
        settle_backends(&pg, app, 3),
        3,
        "up to max_overflow under load"
    );
    let err = pool
        .get_timeout(Duration::from_millis(200))
        .err()
        .expect("no fourth connection: the limit is pool_size + max_overflow");
    println!("fourth checkout with pool_size 0, max_overflow 3: {err}");
    drop(held);
    assert_eq!(
        settle_backends(&pg, app, 0),
        0,
        "every connection is closed when returned"
    );
    let stats = pool.stats();
    assert_eq!(stats.closed.overflow, 3, "{stats:?}");
    assert_eq!((stats.in_use, stats.idle), (0, 0), "{stats:?}");
}

#[test]
fn the_keepalive_ping_never_opens_a_connection() {
    let Some(pg) = server() else { return };
    let app = "sizes_keepalive";
    let pool = ext_pool(&pg, app, 2)
        .max_overflow(3)
        .idle_timeout(None)
        .keepalive_ping(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    assert_eq!(settle_backends(&pg, app, 2), 2);
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(pg.count_backends(app).unwrap());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        most, 2,
        "keepalive pings must use the idle connections, not open more"
    );
    let stats = pool.stats();
    assert!(
        stats.pings >= 2,
        "the idle connections were pinged: {stats:?}"
    );
    assert_eq!(stats.connects, 2, "{stats:?}");
}

/// The maintenance's walk pings only connections due a keepalive ping: with the pings off,
/// walks that run for the idle timeout's sake send nothing.
#[test]
fn walks_without_keepalive_pings_send_no_ping() {
    let Some(pg) = server() else { return };
    let app = "sizes_no_keepalive";
    let pool = ext_pool(&pg, app, 2)
        .max_overflow(0)
        .keepalive_ping(None)
        .max_lifetime(None)
        // A walk every 2.5 s, none of which finds a connection idle for 10 s yet (a wide
        // margin: a loaded machine may take seconds to build and settle the pool).
        .idle_timeout(Some(Duration::from_secs(10)))
        .build()
        .unwrap();
    assert_eq!(settle_backends(&pg, app, 2), 2);
    let before = pool.stats().pings;
    std::thread::sleep(Duration::from_millis(5600));
    let stats = pool.stats();
    assert_eq!(
        (stats.idle, stats.closed.idle_timeout),
        (2, 0),
        "both connections stayed idle through the walks: {stats:?}"
    );
    assert_eq!(
        stats.pings - before,
        0,
        "2 walks of 2 idle connections, no keepalive: {stats:?}"
    );
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let Some(pg) = server() else { return };
    let app = "sizes_idle";
    let pool = ext_pool(&pg, app, 3)
        .idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    assert_eq!(settle_backends(&pg, app, 3), 3);
    assert_eq!(
        settle_backends(&pg, app, 0),
        0,
        "idle past the timeout: closed"
    );
    // The server can see a backend go a moment before the pool counts its close: Diesel
    // drops libpq's connection before the connection's instrumentation (our state, which
    // counts the close when it is dropped).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pool.stats().closed.idle_timeout < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(pool.stats().closed.idle_timeout, 3, "{:?}", pool.stats());
    assert!(select_one(&pool).is_ok(), "and reopened on demand");
}

#[test]
fn a_budget_class_keeps_its_reserved_floor_open_past_the_idle_timeout() {
    let Some(pg) = server() else { return };
    let app = "sizes_floor";
    let pools = ClassPools::<diesel::PgConnection>::builder(&pg.url_with("sslmode=disable"), 6)
        .class("automation", Class::new().pool_size(0).max_overflow(4))
        .class("adhoc", Class::new().reserved(2))
        .configure(|b| {
            b.application_name(app)
                .idle_timeout(Some(Duration::from_millis(200)))
                .pool_timeout(Duration::from_secs(5))
        })
        .build()
        .unwrap();
    let automation = pools.class("automation").unwrap();
    drop(hold(automation, 3));
    assert_eq!(
        settle_backends(&pg, app, 2),
        2,
        "automation's idle ones go, the floor stays"
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        pg.count_backends(app).unwrap(),
        2,
        "the floor outlives the idle timeout"
    );
    let adhoc = pools.class("adhoc").unwrap();
    assert_eq!(adhoc.stats().closed.idle_timeout, 0);
    assert!(select_one(adhoc).is_ok());
}

/// `max_lifetime` retires connections while they sit idle (the maintenance thread: no
/// checkout needed), and a budget class's reserved floor is replaced as it is retired: the
/// server goes on counting the floor's two sessions, none of them the first ones.
#[test]
fn max_lifetime_retires_idle_connections_and_the_reserved_floor_is_replaced() {
    let Some(pg) = server() else { return };
    let app = "sizes_lifetime";
    let pools = ClassPools::<diesel::PgConnection>::builder(&pg.url_with("sslmode=disable"), 4)
        .class("automation", Class::new().pool_size(0).max_overflow(2))
        .class("adhoc", Class::new().reserved(2))
        .configure(|b| {
            b.application_name(app)
                .max_lifetime(Some(Duration::from_millis(400)))
                .lifetime_jitter(0.0)
                .pool_timeout(Duration::from_secs(5))
        })
        .build()
        .unwrap();
    assert_eq!(
        settle_backends(&pg, app, 2),
        2,
        "the floor, opened at build"
    );
    let first = pg.backend_pids(app).unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = pg.backend_pids(app).unwrap();
        let expired = adhoc.stats().closed.expired;
        if expired >= 2 && now.len() == 2 && now.iter().all(|pid| !first.contains(pid)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "10 s with a 400 ms lifetime: backends {now:?} (the first {first:?}), {:?}",
            adhoc.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(select_one(adhoc).is_ok());
}
