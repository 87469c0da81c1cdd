//! Helpers shared by the async pool's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use diesel::sql_types::Integer;
use diesel::IntoSql;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{Builder, PgPool};
pub use test_support::{FaultProxy, PgServer};

/// The control pool: plain bb8 with diesel-async's manager.
pub type Control = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A private server, or `None` (test skipped, reason printed) outside CI.
pub fn server() -> Option<PgServer> {
    test_support::capture_logs();
    test_support::pg_or_skip()
}

/// The server process id behind `conn`.
pub async fn backend_pid(conn: &mut AsyncPgConnection) -> diesel::QueryResult<i32> {
    diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(conn)
        .await
}

/// The next caller of `pool` is served within 3 s by a connection other than backend `old`;
/// panics naming `what` (the connection that must not have been pooled again) otherwise.
pub async fn next_caller_avoids(pool: &PgPool, old: i32, what: &str) {
    let next = tokio::time::timeout(Duration::from_secs(3), async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        backend_pid(&mut conn).await.map_err(|e| e.to_string())
    })
    .await;
    match next {
        Err(_) => panic!("{what} went back to the pool: the next caller hung on it for 3 s"),
        Ok(Err(e)) => panic!("the next caller failed: {e}"),
        Ok(Ok(pid)) => assert_ne!(pid, old, "{what} was reused"),
    }
}

/// The longest [`one`] waits for its answer: a query handed a silent or stopped connection
/// (a mechanism removed, under mutation testing) fails its test by an assertion instead of
/// hanging it. Longer than any answer a test waits for on purpose.
pub const QUERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(40);

/// `SELECT 1` as a cacheable prepared statement (the same one diesel-async's `Verified`
/// ping uses): one round trip once prepared on a connection, within [`QUERY_DEADLINE`].
pub async fn one(conn: &mut AsyncPgConnection) -> Result<i32, String> {
    let query = diesel::select(1_i32.into_sql::<Integer>()).get_result::<i32>(conn);
    match tokio::time::timeout(QUERY_DEADLINE, query).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {QUERY_DEADLINE:?} (the test's deadline)"
        )),
    }
}

/// A pool the helpers check out from: ours through `ExtPool::get`, the controls through
/// bb8's `get`.
pub trait Checkout: Clone + Send + Sync + 'static {
    /// A checkout and `SELECT 1`.
    fn select_one(&self) -> impl Future<Output = Result<i32, String>> + Send;
    /// Holds `n` connections at once, each used once, then returns them.
    fn warm(&self, n: usize) -> impl Future<Output = ()> + Send;
}

impl Checkout for PgPool {
    async fn select_one(&self) -> Result<i32, String> {
        let mut conn = self.get().await.map_err(|e| e.to_string())?;
        one(&mut conn).await
    }

    async fn warm(&self, n: usize) {
        let mut held = Vec::new();
        for _ in 0..n {
            let mut conn = self.get().await.expect("warm-up checkout");
            one(&mut conn).await.expect("warm-up query");
            held.push(conn);
        }
    }
}

impl Checkout for Control {
    async fn select_one(&self) -> Result<i32, String> {
        let mut conn = self.get().await.map_err(|e| e.to_string())?;
        one(&mut conn).await
    }

    async fn warm(&self, n: usize) {
        let mut held = Vec::new();
        for _ in 0..n {
            let mut conn = self.get().await.expect("warm-up checkout");
            one(&mut conn).await.expect("warm-up query");
            held.push(conn);
        }
    }
}

/// A failed request that took this long waited out a timeout: [`errors_over`] stops there,
/// so that a pool that fails every request slowly (a mechanism removed, under mutation
/// testing) fails its test within seconds instead of `n` timeouts.
pub const SLOW_FAILURE: Duration = Duration::from_secs(5);

/// Runs `n` checkouts + queries one after another; returns the errors seen. Stops after the
/// first error that took [`SLOW_FAILURE`] or longer (noted in its text).
pub async fn errors_over<P: Checkout>(pool: &P, n: usize) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..n {
        let started = std::time::Instant::now();
        if let Err(e) = pool.select_one().await {
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

/// Our pool on `server` (plaintext) whose connections carry `app` as application_name.
pub fn ext_pool(server: &PgServer, app: &str, size: u32) -> Builder<AsyncPgConnection> {
    PgPool::builder(&server.url_with("sslmode=disable"))
        .application_name(app)
        .pool_size(size)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(10))
}

/// The control: plain bb8 + diesel-async's manager exactly as applications build them, at
/// their defaults (`RecyclingMethod::Verified`: a `SELECT 1` read back before every checkout;
/// 10 connections; 30 s timeout).
pub async fn control_verified(url: &str) -> Control {
    bb8::Pool::builder()
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
        .await
        .expect("control pool")
}

/// The weakened control: the same with `RecyclingMethod::Fast` (no check on checkout), as
/// people configure it to save the round trip.
pub async fn control_fast(url: &str) -> Control {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    bb8::Pool::builder()
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config))
        .await
        .expect("control pool")
}

/// A control over TLS: plain bb8 + diesel-async's manager with `method`, its connections
/// opened by our connector (diesel-async's own `establish` has no TLS), as the diesel-async
/// docs show with `custom_setup`.
pub async fn control_tls(url: &str, method: RecyclingMethod<AsyncPgConnection>) -> Control {
    let connector = diesel_async_ext::PgConnector::from_url(
        url,
        &pool_core::config::ConnectSettings::default(),
    )
    .expect("connector");
    let mut config = ManagerConfig::default();
    config.recycling_method = method;
    config.custom_setup = Box::new(move |_url| {
        let connector = connector.clone();
        Box::pin(async move {
            connector
                .connect()
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
        })
    });
    bb8::Pool::builder()
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config))
        .await
        .expect("control pool")
}

/// A counting fault proxy in front of `server`, and the URL through it with `params`.
pub fn proxied(server: &PgServer, params: &str) -> (FaultProxy, String) {
    let proxy = FaultProxy::start(server.addr()).expect("fault proxy");
    let url = server.url_via(proxy.port(), params);
    (proxy, url)
}

/// Kills every backend of `app` and waits until the server has let them go and the clients
/// have read the news.
pub async fn terminate_all(server: &PgServer, app: &str) {
    let n = server.terminate_backends(app).expect("terminate");
    assert!(n > 0, "no backend of {app} to terminate");
    server
        .wait_backends_gone(app, Duration::from_secs(10))
        .expect("backends gone");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Polls `pg_stat_activity` until `app` has exactly `n` backends; returns the last count seen.
pub async fn settle_backends(server: &PgServer, app: &str, n: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = server.count_backends(app).expect("count backends");
        if seen == n || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
