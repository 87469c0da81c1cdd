//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::Integer;
use resilient_diesel::PgPool;
pub use test_support::PgServer;

/// A private server, or `None` (test skipped, reason printed) outside CI.
pub fn server() -> Option<PgServer> {
    test_support::capture_logs();
    test_support::pg_or_skip()
}

/// `SELECT 1` through a fresh checkout.
pub fn select_one<M>(pool: &r2d2::Pool<M>) -> Result<i32, String>
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    diesel::select(diesel::dsl::sql::<Integer>("1"))
        .get_result::<i32>(&mut *conn)
        .map_err(|e| e.to_string())
}

/// Runs `n` checkouts + queries one after another; returns the errors seen.
pub fn errors_over<M>(pool: &r2d2::Pool<M>, n: usize) -> Vec<String>
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    (0..n).filter_map(|_| select_one(pool).err()).collect()
}

/// Checks out `n` connections at once (so the pool really holds `n`), uses and returns them.
pub fn warm<M>(pool: &r2d2::Pool<M>, n: usize)
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = pool.get().expect("warm-up checkout");
        diesel::select(diesel::dsl::sql::<Integer>("1"))
            .get_result::<i32>(&mut *conn)
            .expect("warm-up query");
        held.push(conn);
    }
}

/// An extended pool on `server` whose connections carry `app` as application_name.
pub fn ext_pool(
    server: &PgServer,
    app: &str,
    size: u32,
) -> resilient_diesel::Builder<PgConnection> {
    PgPool::builder(&server.url_with("sslmode=disable"))
        .application_name(app)
        .pool_size(size)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(10))
}

/// A plain r2d2 pool as applications build it today (the control case).
pub fn plain_pool(
    server: &PgServer,
    params: &str,
    size: u32,
    test_on_check_out: bool,
) -> r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>> {
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .test_on_check_out(test_on_check_out)
        .connection_timeout(Duration::from_secs(5))
        .build(diesel::r2d2::ConnectionManager::new(
            server.url_with(params),
        ))
        .expect("plain pool")
}

/// Kills every backend of `app` and waits until the server has let them go.
pub fn terminate_all(server: &PgServer, app: &str) {
    let n = server.terminate_backends(app).expect("terminate");
    assert!(n > 0, "no backend of {app} to terminate");
    server
        .wait_backends_gone(app, Duration::from_secs(10))
        .expect("backends gone");
    // The FATAL + close reach the client socket within microseconds on loopback; leave a
    // little room for a loaded machine.
    std::thread::sleep(Duration::from_millis(50));
}

/// Runs `f` on a thread; `Some(result)` if it finished within `limit`, `None` if it was
/// still running (the thread is left to finish later).
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (Option<T>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    (rx.recv_timeout(limit).ok(), handle)
}

/// The sentinel password never appears in anything logged so far.
pub fn assert_no_secret_in_logs() {
    for line in test_support::captured_logs() {
        assert!(
            !line.contains(PgServer::PASSWORD),
            "a log line leaks the password: {line}"
        );
    }
}

/// Runs a checkout + query on a thread and asserts it *returns* (with an error or not) within
/// `limit` instead of hanging until `fault` is lifted. Returns the thread, to be joined after
/// the fault is lifted.
pub fn assert_checkout_returns<M>(
    pool: &r2d2::Pool<M>,
    limit: Duration,
    fault: &str,
) -> std::thread::JoinHandle<()>
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let p = pool.clone();
    let started = std::time::Instant::now();
    let (outcome, handle) = within(limit, move || select_one(&p));
    assert!(
        outcome.is_some(),
        "checkout hung for {:?} {fault}",
        started.elapsed()
    );
    handle
}

/// The control's half of a fault test: after the fault, 100 checkouts + queries on a plain
/// pool surface at least one error (so the test can fail).
pub fn assert_fault_hurts<M>(pool: &r2d2::Pool<M>)
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    assert!(
        !errors_over(pool, 100).is_empty(),
        "the fault must hurt a plain pool"
    );
}

/// The control's half of a stall test: a checkout + query is still running after `limit`.
/// Returns the thread, to be joined after the fault is lifted.
pub fn assert_checkout_hangs<M>(
    pool: &r2d2::Pool<M>,
    limit: Duration,
) -> std::thread::JoinHandle<()>
where
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let p = pool.clone();
    let (outcome, handle) = within(limit, move || select_one(&p));
    assert!(
        outcome.is_none(),
        "plain r2d2 was expected to hang, got {outcome:?}"
    );
    handle
}
