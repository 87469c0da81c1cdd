//! One line added to a stock bb8 builder: the session-settings customizer read back from the
//! server, and `ExtManager::standalone` inside an unchanged `bb8::Pool::builder()` against a
//! mass terminate, with bb8 + diesel-async's manager at its defaults (`Verified`) and with
//! `Fast` as controls. Also the extended pool's `after_connect` hook and `custom_connect`.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use diesel::sql_types::Text;
use diesel::{ConnectionError, ConnectionResult, QueryableByName};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_async_ext::customize::{Both, SessionSettings};
use diesel_async_ext::pool_core::url::DatabaseUrl;
use diesel_async_ext::{BoxFuture, ConnectCause, ExtManager};

type Stock = bb8::Pool<ExtManager<AsyncPgConnection>>;

impl Checkout for Stock {
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

#[derive(QueryableByName, Debug)]
struct Setting {
    #[diesel(sql_type = Text)]
    v: String,
}

async fn show(conn: &mut AsyncPgConnection, name: &str) -> String {
    diesel::sql_query(format!("SELECT current_setting('{name}') AS v"))
        .get_result::<Setting>(conn)
        .await
        .unwrap_or_else(|e| panic!("reading {name}: {e}"))
        .v
}

fn session() -> SessionSettings {
    SessionSettings::new()
        .statement_timeout(Duration::from_millis(1234))
        .lock_timeout(Duration::from_secs(2))
        .idle_in_transaction_session_timeout(Duration::from_secs(3))
        .application_name("acust_session")
}

async fn assert_session_settings(conn: &mut AsyncPgConnection) {
    assert_eq!(show(conn, "statement_timeout").await, "1234ms");
    assert_eq!(show(conn, "lock_timeout").await, "2s");
    assert_eq!(
        show(conn, "idle_in_transaction_session_timeout").await,
        "3s"
    );
    assert_eq!(show(conn, "application_name").await, "acust_session");
}

#[tokio::test]
async fn session_settings_are_in_effect_on_every_connection_of_a_stock_bb8_pool() {
    let Some(pg) = server() else { return };
    let pool = bb8::Pool::builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(session().validate().expect("valid settings")))
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
            pg.url_with("sslmode=disable"),
        ))
        .await
        .expect("stock pool with the customizer");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = pool.get().await.expect("checkout");
        assert_session_settings(&mut conn).await;
        held.push(conn);
    }
    assert_eq!(
        settle_backends(&pg, "acust_session", 3).await,
        3,
        "pg_stat_activity shows the application_name of every connection"
    );
}

#[tokio::test]
async fn session_settings_work_with_the_standalone_manager_too() {
    let Some(pg) = server() else { return };
    let manager = ExtManager::<AsyncPgConnection>::standalone(&pg.url_with("sslmode=disable"))
        .expect("standalone manager");
    let pool = bb8::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(Both(
            session(),
            // Run second: its application_name wins.
            SessionSettings::new().application_name("acust_both"),
        )))
        .build(manager)
        .await
        .expect("stock pool with our manager");
    let mut a = pool.get().await.expect("checkout");
    let mut b = pool.get().await.expect("checkout");
    for conn in [&mut a, &mut b] {
        assert_eq!(show(conn, "statement_timeout").await, "1234ms");
        assert_eq!(show(conn, "lock_timeout").await, "2s");
        assert_eq!(show(conn, "application_name").await, "acust_both");
    }
}

/// bb8's error sink, kept for the test to read.
#[derive(Debug, Clone, Default)]
struct Kept(Arc<parking_lot::Mutex<Vec<String>>>);

impl<E: std::fmt::Display> bb8::ErrorSink<E> for Kept {
    fn sink(&self, error: E) {
        self.0.lock().push(error.to_string());
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(self.clone())
    }
}

#[tokio::test]
async fn a_bad_value_is_a_clear_error_never_a_panic_and_fails_the_connects() {
    let e = session()
        .statement_timeout(Duration::from_micros(300))
        .validate()
        .unwrap_err();
    assert_eq!(e.setting, "statement_timeout");
    let e = SessionSettings::new()
        .application_name(&"x".repeat(64))
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("63 bytes"), "{e}");

    let Some(pg) = server() else { return };
    let kept = Kept::default();
    let pool = bb8::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(2))
        .error_sink(Box::new(kept.clone()))
        .connection_customizer(Box::new(
            SessionSettings::new().lock_timeout(Duration::from_nanos(5)),
        ))
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
            pg.url_with("sslmode=disable"),
        ))
        .await
        .expect("bb8 opens nothing at build");
    assert!(pool.get().await.is_err(), "no connection can be customized");
    // bb8 retries in the background; its sink has the error once one connect got that far.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let errors = kept.0.lock().clone();
        if errors.iter().any(|e| e.contains("lock_timeout")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bb8's error sink never got the setting's error: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_standalone_manager_in_a_stock_bb8_pool_turns_a_mass_terminate_into_zero_errors() {
    let Some(pg) = server() else { return };
    let (ours_proxy, ours_url) = proxied(&pg, "sslmode=disable&application_name=astock_ours");
    // A bypass window of an hour: no connection is pinged at checkout, so only the liveness
    // probe stands between a dead connection and the caller.
    let config = pool_core::config::PoolConfig::builder(&ours_url)
        .validation_bypass_window(Duration::from_secs(3600))
        .build()
        .expect("config");
    let manager = ExtManager::<AsyncPgConnection>::standalone_with(config).expect("manager");
    let stats = manager.stats_handle();
    let ours: Stock = bb8::Pool::builder()
        .max_size(4)
        .build(manager)
        .await
        .expect("stock pool with our manager");
    // Control: bb8 + diesel-async's manager at their defaults (Verified: a SELECT 1 read back
    // before every checkout), but for its size, the same as ours.
    let (ctl_proxy, ctl_url) = proxied(&pg, "sslmode=disable&application_name=astock_bb8");
    let control: Control = bb8::Pool::builder()
        .max_size(4)
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
            ctl_url,
        ))
        .await
        .expect("control pool");

    ours.warm(4).await;
    control.warm(4).await;
    assert_eq!(
        settle_backends(&pg, "astock_ours", 4).await,
        4,
        "ours: four backends"
    );
    assert_eq!(
        settle_backends(&pg, "astock_bb8", 4).await,
        4,
        "control: four backends"
    );
    terminate_all(&pg, "astock_ours").await;
    terminate_all(&pg, "astock_bb8").await;
    ours_proxy.reset_counts();
    ctl_proxy.reset_counts();

    let errors = errors_over(&ours, 100).await;
    assert!(
        errors.is_empty(),
        "errors surfaced through our manager: {errors:?}"
    );
    let errors = errors_over(&control, 100).await;
    assert!(
        errors.is_empty(),
        "bb8 + Verified survives this: {errors:?}"
    );
    let (a, b) = (
        ours_proxy.messages().round_trips(),
        ctl_proxy.messages().round_trips(),
    );
    let s = stats.snapshot();
    println!(
        "mass terminate, 100 checkouts + queries: standalone manager {a} round trips \
         ({} reconnects, {} dead found by the probe, {} pings), bb8 + Verified {b} \
         ({} reconnects)",
        ours_proxy.connections_accepted(),
        s.probe_detected_dead,
        s.pings,
        ctl_proxy.connections_accepted()
    );
    assert!(
        s.probe_detected_dead >= 1,
        "the probe found the dead connections: {s:?}"
    );
    assert!(
        a * 10 <= b * 6,
        "ours {a} vs bb8 + Verified {b} round trips"
    );
    assert_no_secret_in_logs();
}

#[tokio::test]
async fn weakened_control_bb8_fast_surfaces_a_mass_terminate() {
    let Some(pg) = server() else { return };
    let pool = control_fast(&pg.url_with("sslmode=disable&application_name=astock_fast")).await;
    pool.warm(4).await;
    terminate_all(&pg, "astock_fast").await;
    let errors = errors_over(&pool, 100).await;
    println!(
        "mass terminate: bb8 + Fast surfaced {} error(s) in 100 checkouts",
        errors.len()
    );
    assert!(!errors.is_empty(), "the terminate must hurt bb8 + Fast");
}

#[tokio::test]
async fn the_after_connect_hook_runs_on_every_new_connection_of_the_extended_pool() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ahook_ok", 2)
        .after_connect(|conn| Box::pin(conn.batch_execute("SET work_mem = '7MB'")))
        .build()
        .await
        .expect("pool with a hook");
    pool.warm(2).await;
    terminate_all(&pg, "ahook_ok").await;
    for _ in 0..4 {
        let mut conn = pool.get().await.expect("checkout after the terminate");
        assert_eq!(show(&mut conn, "work_mem").await, "7MB");
    }
}

#[tokio::test]
async fn a_failing_after_connect_hook_fails_that_connect_at_once_with_its_cause() {
    let Some(pg) = server() else { return };
    let err = ext_pool(&pg, "ahook_bad", 1)
        .pool_timeout(Duration::from_secs(30))
        .after_connect(|conn| Box::pin(conn.batch_execute("SET no_such_setting_here = 1")))
        .build()
        .await
        .expect_err("every connect fails");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("after_connect hook failed"), "{text}");
    assert!(text.contains("no_such_setting_here"), "{text}");
    assert!(!text.contains(PgServer::PASSWORD), "{text}");
    let diesel_async_ext::BuildError::Connect { error, .. } = &err else {
        panic!("a connect error: {err:?}");
    };
    assert_eq!(
        error.connect_cause(),
        Some(ConnectCause::Setup),
        "{error:?}"
    );
    // Hopeless: failed at once with the cause, not after waiting the 30 s pool timeout.
    assert!(
        !error.is_timeout(),
        "it waited the pool timeout out: {error:?}"
    );
}

/// The connect function an app hands diesel-async's `ManagerConfig::custom_setup`, counting
/// the connections it opened.
fn counting_connect(
    calls: Arc<AtomicUsize>,
) -> impl for<'a> Fn(&'a str) -> BoxFuture<'a, ConnectionResult<AsyncPgConnection>> + Send + Sync {
    move |url| {
        let opened = calls.clone();
        Box::pin(async move {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            let conn = AsyncPgConnection::try_from_client_and_connection(client, conn).await?;
            opened.fetch_add(1, Ordering::SeqCst);
            Ok(conn)
        })
    }
}

#[tokio::test]
async fn custom_connect_opens_every_connection_with_the_pools_lifecycle_around_it() {
    let Some(pg) = server() else { return };
    let calls = Arc::new(AtomicUsize::new(0));
    let url = pg.url_with("sslmode=disable&application_name=acustom");
    let pool = diesel_async_ext::PgPool::builder(&url)
        .pool_size(3)
        .max_overflow(0)
        .custom_connect(counting_connect(calls.clone()))
        .after_connect(|conn| Box::pin(conn.batch_execute("SET work_mem = '9MB'")))
        .build()
        .await
        .expect("pool with the app's connect");
    assert_eq!(
        AtomicUsize::load(&calls, Ordering::SeqCst),
        3,
        "the pool's initial connections"
    );
    pool.warm(3).await;
    terminate_all(&pg, "acustom").await;
    let errors = errors_over(&pool, 50).await;
    assert!(
        errors.is_empty(),
        "the probe retires the dead ones: {errors:?}"
    );
    assert!(
        AtomicUsize::load(&calls, Ordering::SeqCst) >= 4,
        "replacements are opened through the app's connect too"
    );
    let mut conn = pool.get().await.expect("checkout");
    assert_eq!(show(&mut conn, "work_mem").await, "9MB");
    assert!(pool.stats().probe_detected_dead >= 1, "{:?}", pool.stats());
}

#[tokio::test]
async fn a_custom_connect_that_hangs_is_bounded_by_connect_timeout() {
    let Some(pg) = server() else { return };
    let started = Instant::now();
    let err = diesel_async_ext::PgPool::builder(&pg.url_with("sslmode=disable"))
        .pool_size(1)
        .connect_timeout(Some(Duration::from_secs(1)))
        .pool_timeout(Duration::from_secs(3))
        .custom_connect(|_url| Box::pin(std::future::pending()))
        .build()
        .await
        .expect_err("the connect never finishes");
    let diesel_async_ext::BuildError::Connect { error, .. } = &err else {
        panic!("a connect error: {err:?}");
    };
    assert_eq!(error.connect_cause(), Some(ConnectCause::Timeout), "{err}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    // The bound this test exists for: build() returns around its pool timeout (3 s) instead
    // of hanging with the connect.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_custom_connect_error_is_redacted_and_a_bad_url_fails_at_once() {
    let Some(pg) = server() else { return };
    let err = diesel_async_ext::PgPool::builder(&pg.url_with("sslmode=disable"))
        .pool_size(1)
        .pool_timeout(Duration::from_secs(30))
        .custom_connect(|url| {
            let message = format!("cannot use {url}");
            Box::pin(async move { Err(ConnectionError::InvalidConnectionUrl(message)) })
        })
        .build()
        .await
        .expect_err("every connect fails");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("custom connect failed"), "{text}");
    assert!(
        !text.contains(PgServer::PASSWORD),
        "the password leaked: {text}"
    );
    let diesel_async_ext::BuildError::Connect { error, .. } = &err else {
        panic!("a connect error: {err:?}");
    };
    assert_eq!(
        error.connect_cause(),
        Some(ConnectCause::Config),
        "{error:?}"
    );
    assert!(
        !error.is_timeout(),
        "hopeless: no wait for the pool timeout: {error:?}"
    );
    assert_no_secret_in_logs();
}

#[tokio::test]
async fn a_custom_connect_that_cannot_set_up_its_session_is_a_transient_setup_failure() {
    let Some(pg) = server() else { return };
    let err = diesel_async_ext::PgPool::builder(&pg.url_with("sslmode=disable"))
        .pool_size(1)
        .pool_timeout(Duration::from_millis(500))
        .custom_connect(|_| {
            Box::pin(async {
                Err(ConnectionError::CouldntSetupConfiguration(
                    diesel::result::Error::NotFound,
                ))
            })
        })
        .build()
        .await
        .expect_err("every connect fails");
    let diesel_async_ext::BuildError::Connect { error, .. } = &err else {
        panic!("a connect error: {err:?}");
    };
    assert_eq!(
        error.connect_cause(),
        Some(ConnectCause::Setup),
        "{error:?}"
    );
    // Transient: retried until the pool timeout, not failed at once.
    assert!(error.is_timeout(), "retried until pool_timeout: {error:?}");
}

#[test]
fn the_standalone_managers_debug_names_it_and_its_target_without_the_password() {
    let url = "postgres://app:s3cr%40t-Pw@db.internal:6543/app";
    let manager = ExtManager::<AsyncPgConnection>::standalone(url).expect("manager");
    let shown = format!("{manager:?}");
    assert!(shown.contains("ExtManager"), "{shown}");
    assert!(shown.contains("db.internal:6543"), "{shown}");
    assert!(!shown.contains("s3cr"), "{shown}");
}

/// A sentinel credential: every character a URL or a log line could mishandle.
fn rotated_token(round: usize) -> String {
    format!("tok{round} p@ss:w/o%rd#?&='ünï")
}

/// The connect an app with short-lived credentials gives the pool: the URL the pool holds,
/// with the password its credential source says now.
fn fresh_password_connect(
    current: Arc<parking_lot::Mutex<String>>,
    connects: Arc<AtomicUsize>,
) -> impl for<'a> Fn(&'a str) -> BoxFuture<'a, ConnectionResult<AsyncPgConnection>> + Send + Sync {
    move |url| {
        connects.fetch_add(1, Ordering::SeqCst);
        let fresh = DatabaseUrl::parse(url).and_then(|u| u.with_password(&current.lock()));
        Box::pin(async move {
            let fresh = fresh.map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            let (client, conn) =
                tokio_postgres::connect(fresh.expose_secret(), tokio_postgres::NoTls)
                    .await
                    .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            AsyncPgConnection::try_from_client_and_connection(client, conn).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_connect_fetching_a_fresh_password_per_connect_keeps_the_pool_open_across_rotations(
) {
    let Some(pg) = server() else { return };
    let current = Arc::new(parking_lot::Mutex::new(PgServer::PASSWORD.to_owned()));
    let connects = Arc::new(AtomicUsize::new(0));
    // The custom connect is given the URL as written: its application_name is there.
    let pool =
        diesel_async_ext::PgPool::builder(&pg.url_with("sslmode=disable&application_name=aiam"))
            .pool_size(2)
            .max_overflow(0)
            .pool_timeout(Duration::from_secs(10))
            .custom_connect(fresh_password_connect(current.clone(), connects.clone()))
            .build()
            .await
            .expect("pool with the app's connect");
    let stock: Stock = bb8::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(10))
        .build(
            ExtManager::<AsyncPgConnection>::standalone(
                &pg.url_with("sslmode=disable&application_name=aiam_stock"),
            )
            .expect("standalone manager")
            .custom_connect(fresh_password_connect(current.clone(), connects.clone())),
        )
        .await
        .expect("stock pool");
    // The control: plain bb8 with the URL's password (defaults but a 3 s timeout).
    let plain = bb8::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(3))
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
            pg.url_with("sslmode=disable&application_name=aiam_plain"),
        ))
        .await
        .expect("plain bb8");
    pool.warm(2).await;
    stock.warm(2).await;
    plain.warm(2).await;
    let opened = AtomicUsize::load(&connects, Ordering::SeqCst);
    for round in 0..3 {
        let token = rotated_token(round);
        PgServer::execute(
            &pg,
            &format!("ALTER ROLE app PASSWORD '{}'", token.replace('\'', "''")),
        )
        .expect("ALTER ROLE");
        *current.lock() = token.clone();
        terminate_all(&pg, "aiam").await;
        terminate_all(&pg, "aiam_stock").await;
        if round == 0 {
            terminate_all(&pg, "aiam_plain").await;
        }
        let mut errors = errors_over(&pool, 20).await;
        errors.extend(errors_over(&stock, 20).await);
        assert!(errors.is_empty(), "round {round}: {errors:?}");
        let plain_errors = errors_over(&plain, 1).await;
        assert!(
            plain_errors
                .iter()
                .any(|e| e.contains("password authentication failed")
                    || e.to_lowercase().contains("timed out")),
            "round {round}: the URL's password no longer works for plain bb8: {plain_errors:?}"
        );
    }
    assert!(
        AtomicUsize::load(&connects, Ordering::SeqCst) >= opened + 6,
        "every replacement was opened through the app's connect"
    );
    assert!(pool.stats().probe_detected_dead >= 3, "{:?}", pool.stats());
    let shown = format!("{pool:?} {}", pool.status().to_json());
    assert!(!shown.contains("p@ss"), "{shown}");
}

#[derive(QueryableByName)]
struct TxidRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    txid: Option<i64>,
}

async fn txid_if_assigned(conn: &mut AsyncPgConnection) -> Option<i64> {
    diesel::sql_query("SELECT txid_current_if_assigned() AS txid")
        .get_result::<TxidRow>(conn)
        .await
        .expect("txid_current_if_assigned")
        .txid
}

/// The standalone manager in an unchanged `bb8::Pool::builder()` keeps the checkin and
/// checkout rules of the extended pool: a connection returned inside a transaction opened by
/// a raw `BEGIN` (which Diesel's own manager does not see) is never handed out still inside
/// it, and a checkout facing a stopped backend returns within `validation_timeout` (the
/// bounded ping), not after bb8's 30 s connection timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_manager_in_a_stock_bb8_pool_drops_raw_transactions_and_bounds_its_ping() {
    let Some(pg) = server() else { return };
    let app = "astock_rules";
    let config = diesel_async_ext::pool_core::config::PoolConfig::builder(
        &pg.url_with(&format!("sslmode=disable&application_name={app}")),
    )
    .validation_timeout(Duration::from_secs(1))
    .build()
    .expect("config");
    let pool: Stock = bb8::Pool::builder()
        .max_size(1)
        .build(ExtManager::<AsyncPgConnection>::standalone_with(config).expect("manager"))
        .await
        .expect("stock pool with our manager");
    {
        let mut conn = pool.get().await.unwrap();
        conn.batch_execute("BEGIN").await.unwrap();
        let _ = diesel::sql_query("SELECT txid_current()")
            .execute(&mut *conn)
            .await;
        assert!(
            txid_if_assigned(&mut conn).await.is_some(),
            "inside the transaction"
        );
    }
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        txid_if_assigned(&mut conn).await,
        None,
        "the next checkout was handed the session still inside the raw transaction"
    );
    drop(conn);
    // Past the bypass window, the next checkout pings; its backend is stopped.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pause = pg.pause_backends(app).expect("the pooled backend");
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), pool.get())
        .await
        .expect("the checkout hung on a stopped backend");
    let took = started.elapsed();
    drop(pause);
    let mut conn = got.expect("a fresh connection in place of the stopped one");
    assert_eq!(one(&mut conn).await, Ok(1));
    // The bound this test proves: the ping's 1 s (plus a connect), not bb8's 30 s.
    assert!(
        took < Duration::from_secs(10),
        "the checkout waited {took:?} on a stopped backend (validation_timeout 1 s)"
    );
}
