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

/// A pool the helpers can check out from: the extended pool through its own `get` (served
/// in order, counted), a plain r2d2 pool through r2d2's.
pub trait Checkout: Clone + Send + 'static {
    /// The r2d2 manager of the connections handed out.
    type M: r2d2::ManageConnection<Connection = PgConnection>;
    /// Checks out a connection, as an application would.
    fn checkout(&self) -> Result<r2d2::PooledConnection<Self::M>, r2d2::Error>;
}

impl<M: r2d2::ManageConnection<Connection = PgConnection>> Checkout for r2d2::Pool<M> {
    type M = M;
    fn checkout(&self) -> Result<r2d2::PooledConnection<M>, r2d2::Error> {
        self.get()
    }
}

impl Checkout for PgPool {
    type M = resilient_diesel::ExtManager<PgConnection>;
    fn checkout(&self) -> Result<r2d2::PooledConnection<Self::M>, r2d2::Error> {
        self.get()
    }
}

/// `SELECT 1` through a fresh checkout.
pub fn select_one<P: Checkout>(pool: &P) -> Result<i32, String> {
    // On a thread of its own, within the test's deadline: a query handed a silent or stopped
    // connection (a mechanism removed, under mutation testing) fails the test by an
    // assertion instead of hanging it (the thread is left blocked until the fault ends).
    let pool = pool.clone();
    let (answer, _thread) = within(QUERY_DEADLINE, move || {
        let mut conn = pool.checkout().map_err(|e| e.to_string())?;
        diesel::select(diesel::dsl::sql::<Integer>("1"))
            .get_result::<i32>(&mut *conn)
            .map_err(|e| e.to_string())
    });
    answer.unwrap_or_else(|| {
        Err(format!(
            "no answer within {QUERY_DEADLINE:?} (the test's deadline)"
        ))
    })
}

/// The longest [`select_one`] waits for its checkout and answer: longer than any a test
/// waits for on purpose (a pool timeout of 30 s, a paused backend's 30 s expiry).
pub const QUERY_DEADLINE: Duration = Duration::from_secs(40);

/// A failed request that took this long waited out a timeout: [`errors_over`] stops there,
/// so that a pool that fails every request slowly (a mechanism removed, under mutation
/// testing) fails its test within seconds instead of `n` timeouts.
pub const SLOW_FAILURE: Duration = Duration::from_secs(5);

/// Runs `n` checkouts + queries one after another; returns the errors seen. Stops after the
/// first error that took [`SLOW_FAILURE`] or longer (noted in its text).
pub fn errors_over<P: Checkout>(pool: &P, n: usize) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..n {
        let started = std::time::Instant::now();
        if let Err(e) = select_one(pool) {
            let took = started.elapsed();
            if took >= SLOW_FAILURE {
                errors.push(format!("{e} (after {took:?}; no more requests tried)"));
                break;
            }
            errors.push(e);
        }
    }
    errors
}

/// Checks out `n` connections at once (so the pool really holds `n`), uses and returns them.
pub fn warm<P: Checkout>(pool: &P, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = pool.checkout().expect("warm-up checkout");
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

/// The control: a plain r2d2 pool exactly as applications build it, at r2d2's defaults
/// (`test_on_check_out(true)`: a `SELECT 1` before every checkout; 10 connections;
/// 30 s timeout).
pub fn plain_pool_defaults(url: &str) -> r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>> {
    r2d2::Pool::new(diesel::r2d2::ConnectionManager::new(url)).expect("plain pool")
}

/// The second, weakened control: plain r2d2 with `test_on_check_out(false)` (what people turn
/// off to save the round trip), everything else at r2d2's defaults.
pub fn plain_pool_without_checkout_test(
    url: &str,
) -> r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>> {
    r2d2::Pool::builder()
        .test_on_check_out(false)
        .build(diesel::r2d2::ConnectionManager::new(url))
        .expect("plain pool")
}

/// A counting fault proxy in front of `server`, and the URL through it with `params`.
pub fn proxied(server: &PgServer, params: &str) -> (test_support::FaultProxy, String) {
    let proxy = test_support::FaultProxy::start(server.addr()).expect("fault proxy");
    let url = server.url_via(proxy.port(), params);
    (proxy, url)
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
pub fn assert_checkout_returns<P: Checkout>(
    pool: &P,
    limit: Duration,
    fault: &str,
) -> std::thread::JoinHandle<()> {
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
pub fn assert_fault_hurts<P: Checkout>(pool: &P) {
    assert!(
        !errors_over(pool, 100).is_empty(),
        "the fault must hurt a plain pool"
    );
}

/// The control's half of a stall test: a checkout + query is still running after `limit`.
/// Returns the thread, to be joined after the fault is lifted.
pub fn assert_checkout_hangs<P: Checkout>(
    pool: &P,
    limit: Duration,
) -> std::thread::JoinHandle<()> {
    let p = pool.clone();
    let (outcome, handle) = within(limit, move || select_one(&p));
    assert!(
        outcome.is_none(),
        "plain r2d2 was expected to hang, got {outcome:?}"
    );
    handle
}

/// Polls `pg_stat_activity` until `app` has exactly `n` backends (a closed connection's
/// backend exits asynchronously); returns the last count seen, `n` on success.
pub fn settle_backends(server: &PgServer, app: &str, n: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = server.count_backends(app).expect("count backends");
        if seen == n || std::time::Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks out `n` connections at once and runs a query on each; returns them held.
pub fn hold<P: Checkout>(pool: &P, n: usize) -> Vec<r2d2::PooledConnection<P::M>> {
    (0..n)
        .map(|_| {
            let mut conn = pool.checkout().expect("checkout");
            diesel::select(diesel::dsl::sql::<Integer>("1"))
                .get_result::<i32>(&mut *conn)
                .expect("query");
            conn
        })
        .collect()
}

/// A pool of one connection for `url` (as `app`) with a 1 s validation timeout: pauses its
/// backend and checks that a checkout returns (with or without a connection) instead of
/// hanging until the backend resumes, then that the pool serves again. The ping was bounded,
/// which needs the connection's socket to have been found.
pub fn hung_backend_is_bounded(server: &PgServer, app: &str, url: &str) {
    hung_backend_is_bounded_with(server, app, url, true);
}

/// [`hung_backend_is_bounded`] with hedged validation on or off: off, the stall watchdog
/// alone bounds the ping (on, a pool with no room gives the slow connection up at the hedge
/// delay too).
pub fn hung_backend_is_bounded_with(server: &PgServer, app: &str, url: &str, hedged: bool) {
    let validation_timeout = Duration::from_secs(1);
    let pool_timeout = Duration::from_secs(3);
    let pool = PgPool::builder(url)
        .hedged_validation(hedged)
        .application_name(app)
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(validation_timeout)
        .pool_timeout(pool_timeout)
        .build()
        .unwrap_or_else(|e| panic!("{app}: {e}"));
    warm(&pool, 1);
    let pause = server.pause_backends(app).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // The bound is generous: this checks "returns" versus "hangs until the fault is lifted",
    // not speed.
    let limit = validation_timeout + pool_timeout + Duration::from_secs(5);
    let handle = assert_checkout_returns(&pool, limit, &format!("({app}: {url})"));
    assert!(
        pool.stats().validations_failed >= 1,
        "{app}: {:?}",
        pool.stats()
    );
    pause.resume();
    handle.join().unwrap();
    let errors = errors_over(&pool, 5);
    assert!(
        errors.is_empty(),
        "{app}: the pool must serve again: {errors:?}"
    );
    assert_no_secret_in_logs();
}
