//! SQLite: a connection returned inside a transaction Diesel's manager did not open, or inside
//! a test transaction, is never handed to the next checkout inside it (issue 17, promise 1).

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use resilient_diesel::SqlitePool;

fn pool() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let pool = SqlitePool::builder(&url)
        .pool_size(1)
        .max_overflow(0)
        .build()
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute("CREATE TABLE t (tag TEXT NOT NULL)")
        .unwrap();
    (dir, pool)
}

fn count(conn: &mut SqliteConnection, tag: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "count(*) FROM t WHERE tag = '{tag}'"
    )))
    .get_result(conn)
    .unwrap()
}

#[test]
fn a_raw_begin_is_rolled_back_before_the_next_checkout() {
    let (_dir, pool) = pool();
    let mut conn = pool.get().unwrap();
    conn.batch_execute("BEGIN; INSERT INTO t VALUES ('inside')")
        .unwrap();
    drop(conn);
    let mut conn = pool.get().unwrap();
    let next = conn.transaction::<_, diesel::result::Error, _>(|c| {
        c.batch_execute("INSERT INTO t VALUES ('next')")
    });
    assert!(
        next.is_ok(),
        "the next checkout was inside a transaction: {next:?}"
    );
    assert_eq!(count(&mut conn, "inside"), 0, "rolled back");
    // Rolled back, not closed: an embedded database has no socket to bound the ROLLBACK
    // with, and needs none.
    let stats = pool.stats();
    assert_eq!(
        (stats.connects, stats.closed.broken),
        (1, 0),
        "the connection was closed instead of rolled back: {stats:?}"
    );
}

#[test]
fn a_trigger_whose_body_says_begin_keeps_its_connection() {
    // The transaction watch counts any `BEGIN` as a possible opener (a false alarm costs a
    // `ROLLBACK`). SQLite refuses that `ROLLBACK` outside a transaction, and the refusal means
    // "no transaction": the connection stays, and nothing it did is undone.
    let (_dir, pool) = pool();
    let mut conn = pool.get().unwrap();
    conn.batch_execute(
        "CREATE TABLE audit (tag TEXT NOT NULL);
         CREATE TRIGGER t_audit AFTER INSERT ON t BEGIN INSERT INTO audit VALUES (new.tag); END;
         INSERT INTO t VALUES ('kept')",
    )
    .unwrap();
    drop(conn);
    let mut conn = pool.get().unwrap();
    assert_eq!(count(&mut conn, "kept"), 1, "the insert was undone");
    let audited: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "count(*) FROM audit",
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(audited, 1, "the trigger did not run");
    let stats = pool.stats();
    assert_eq!(
        (stats.connects, stats.closed.broken),
        (1, 0),
        "the connection was closed for a keyword in a trigger's body: {stats:?}"
    );
}

#[test]
fn a_test_transaction_is_never_handed_to_the_next_checkout() {
    let (_dir, pool) = pool();
    let mut conn = pool.get().unwrap();
    conn.begin_test_transaction().unwrap();
    conn.batch_execute("INSERT INTO t VALUES ('inside')")
        .unwrap();
    drop(conn);
    let mut conn = pool.get().unwrap();
    let next = conn.begin_test_transaction();
    assert!(
        next.is_ok(),
        "the next checkout was inside a transaction: {next:?}"
    );
}

/// `try_get` hands out an idle connection at once, and `None` (without waiting) when none is
/// idle; what it hands out is a checkout of the pool like any other.
#[test]
fn try_get_takes_an_idle_connection_at_once_or_says_none() {
    let (_dir, pool) = pool();
    let mut held = pool.try_get().expect("the pool's one connection is idle");
    held.batch_execute("SELECT 1").unwrap();
    let started = std::time::Instant::now();
    assert!(pool.try_get().is_none(), "the only connection is in use");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "try_get waited {:?}",
        started.elapsed()
    );
    drop(held);
    assert!(pool.try_get().is_some(), "returned, it is idle again");
    // `pool()`'s own checkout, then the two above.
    assert_eq!(pool.stats().checkouts, 3, "{:?}", pool.stats());
}

/// A checkout that times out is counted once, whichever way it came: through the pool (its
/// own wait counts it, not each of r2d2's slices), or straight through the wrapped r2d2
/// pool, on the same thread right after a wait of the pool's own.
#[test]
fn timed_out_checkouts_are_counted_once_through_the_pool_or_straight_through_r2d2() {
    let (_dir, pool) = pool();
    let held = pool.get().unwrap();
    let short = std::time::Duration::from_millis(150);
    assert!(
        pool.get_timeout(short).is_err(),
        "the only connection is in use"
    );
    assert_eq!(pool.stats().timeouts, 1, "{:?}", pool.stats());
    assert!(pool.inner().get_timeout(short).is_err());
    assert_eq!(
        pool.stats().timeouts,
        2,
        "r2d2's own timeout, right after the pool's wait: {:?}",
        pool.stats()
    );
    drop(held);
}

/// A pool's maintenance thread waits between its rounds: a second of an idle pool costs its
/// thread (and every other pool's in this process) little CPU.
#[test]
fn an_idle_pools_maintenance_thread_sleeps_between_rounds() {
    let (_dir, pool) = pool();
    drop(pool.get().unwrap());
    let before = test_support::threads_cpu(test_support::MAINTENANCE_THREADS);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = test_support::threads_cpu(test_support::MAINTENANCE_THREADS) - before;
    assert!(
        used < std::time::Duration::from_millis(300),
        "the maintenance threads used {used:?} of CPU in a second of an idle pool"
    );
    drop(pool);
}
