//! The async pool's promises on a private PostgreSQL server: drop-in at call sites,
//! `pool_size` / `max_overflow` as `pg_stat_activity` counts them, keepalive pings that never
//! open a connection, idle timeouts, errors that name their cause and never the password,
//! panics inside a transaction, leaks, the status report.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use diesel::sql_types::{BigInt, Integer};
use diesel::QueryResult;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{ConnectCause, ExtError, PgPool};

/// An application helper written for `&mut AsyncPgConnection`, unchanged.
async fn backend_pid(conn: &mut AsyncPgConnection) -> QueryResult<i32> {
    diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(conn)
        .await
}

/// Application code as it is written against plain bb8 + diesel-async: only the pool type
/// changed. It has to compile.
async fn handler(pool: &PgPool) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    let mut conn = pool.get().await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    let pid = backend_pid(&mut conn).await?;
    let n: i64 = conn
        .transaction(async |c| {
            diesel::select(diesel::dsl::sql::<BigInt>("count(*) FROM pg_stat_activity"))
                .get_result::<i64>(c)
                .await
        })
        .await?;
    assert!(pid > 0);
    // Deref to the bb8 pool: its own API is still there.
    let _state: bb8::State = pool.state();
    Ok(n)
}

#[tokio::test]
async fn application_code_compiles_and_runs_unchanged() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_dropin", 2).build().await.unwrap();
    assert!(handler(&pool).await.unwrap() >= 1);
    // A handler on a spawned task (the future is Send).
    let p = pool.clone();
    tokio::spawn(async move { handler(&p).await.map_err(|e| e.to_string()) })
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_pool_size_opens_no_more_and_overflow_closes_on_return() {
    let Some(pg) = server() else { return };
    let app = "ext_sizes";
    let pool = ext_pool(&pg, app, 2).max_overflow(2).build().await.unwrap();
    assert_eq!(
        settle_backends(&pg, app, 2).await,
        2,
        "build opens pool_size"
    );
    let held: Vec<_> = futures_hold(&pool, 2).await;
    assert_eq!(
        pg.count_backends(app).unwrap(),
        2,
        "holding pool_size opens no more"
    );
    drop(held);
    let held = futures_hold(&pool, 4).await;
    assert_eq!(
        pg.count_backends(app).unwrap(),
        4,
        "overflow opens up to max"
    );
    let timed_out = pool
        .get_timeout(Duration::from_millis(200))
        .await
        .err()
        .expect("a timeout");
    assert!(timed_out.is_timeout(), "{timed_out}");
    assert!(
        timed_out.root().is_timeout(),
        "all in use: no other cause: {timed_out}"
    );
    drop(held);
    assert_eq!(
        settle_backends(&pg, app, 2).await,
        2,
        "overflow closes on return"
    );
    let stats = pool.stats();
    println!("sizes: {stats:?}");
    assert_eq!(stats.closed.overflow, 2, "{stats:?}");
    assert_eq!(pool.state().connections, 2);
}

/// Checks out `n` connections at once, each used once.
async fn futures_hold(
    pool: &PgPool,
    n: usize,
) -> Vec<bb8::PooledConnection<'_, diesel_async_ext::ExtManager<AsyncPgConnection>>> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = pool.get().await.unwrap();
        one(&mut conn).await.unwrap();
        held.push(conn);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_keep_idle_sessions_alive_and_never_open_a_connection() {
    let Some(pg) = server() else { return };
    pg.set_idle_session_timeout("app", Duration::from_secs(1))
        .unwrap();
    let app = "ext_keepalive";
    // Through a proxy adding 15 ms per chunk, so that each keepalive ping holds its
    // connection long enough for callers to arrive meanwhile.
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .application_name(app)
        .pool_size(2)
        .max_overflow(0)
        .keepalive_ping(Some(Duration::from_millis(100)))
        .idle_timeout(None)
        .build()
        .await
        .unwrap();
    proxy.set_latency(Duration::from_millis(15));
    let before = pg.backend_pids(app).unwrap();
    assert_eq!(before.len(), 2);
    // Meanwhile a caller takes both connections at once, again and again: arriving while the
    // keepalive holds one, it must wait for it, never make the pool open a third.
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (stop, p) = (stop.clone(), pool.clone());
        tokio::spawn(async move {
            let (mut rounds, mut waited) = (0u32, 0u32);
            while !AtomicBool::load(&stop, Ordering::SeqCst) {
                let t = std::time::Instant::now();
                let mut a = p.get().await.unwrap();
                let mut b = p.get().await.unwrap();
                // Both were idle: a wait means the keepalive held one.
                waited += u32::from(t.elapsed() > Duration::from_millis(10));
                one(&mut a).await.unwrap();
                one(&mut b).await.unwrap();
                drop((a, b));
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(130)).await;
            }
            (rounds, waited)
        })
    };
    let mut max_seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < deadline {
        max_seen = max_seen.max(pg.count_backends(app).unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (rounds, waited) = caller.await.unwrap();
    let pings_alongside = pool.stats().pings;
    // Now idle for longer than the server's idle_session_timeout: pings keep them alive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = pg.backend_pids(app).unwrap();
    let stats = pool.stats();
    println!(
        "keepalive: {rounds} rounds of 2 checkouts alongside {pings_alongside} pings ({waited} \
         waited for a connection the keepalive held); most backends seen {max_seen}; pings in \
         all {}, connections opened {}",
        stats.pings, stats.connects
    );
    assert_eq!(after, before, "the same sessions must still be open");
    assert_eq!(max_seen, 2, "a third connection was opened");
    assert_eq!(stats.connects, 2, "{stats:?}");
    assert!(
        pings_alongside > 0,
        "the keepalive ran alongside the caller: {stats:?}"
    );
    assert!(stats.pings >= pings_alongside + 4, "{stats:?}");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let Some(pg) = server() else { return };
    let app = "ext_idle";
    let pool = ext_pool(&pg, app, 2)
        .idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .await
        .unwrap();
    assert_eq!(pg.count_backends(app).unwrap(), 2);
    assert_eq!(settle_backends(&pg, app, 0).await, 0);
    assert_eq!(pool.stats().closed.idle_timeout, 2, "{:?}", pool.stats());
    // And the pool opens what a caller needs again.
    assert!(errors_over(&pool, 3).await.is_empty());
}

#[tokio::test]
async fn the_idle_connections_close_when_the_last_clone_of_the_pool_is_dropped() {
    let Some(pg) = server() else { return };
    let app = "ext_drop";
    let pool = ext_pool(&pg, app, 3).build().await.unwrap();
    let clone = pool.clone();
    drop(pool);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        pg.count_backends(app).unwrap(),
        3,
        "a clone still holds the pool"
    );
    drop(clone);
    assert_eq!(settle_backends(&pg, app, 0).await, 0);
}

/// An owned checkout (an axum extractor's, a spawned task's) keeps bb8's pool alive after
/// the last clone of ours is dropped. The idle connections still close at once: the pool's
/// maintenance retires each one ("released") and its checkin honours that, instead of
/// putting them back into a pool nobody can reach, open until the last checkout ends.
#[tokio::test]
async fn the_idle_connections_close_at_the_pools_drop_while_an_owned_checkout_is_still_out() {
    let Some(pg) = server() else { return };
    let app = "ext_drop_owned";
    let pool = ext_pool(&pg, app, 3).build().await.unwrap();
    let mut owned = pool.get_owned().await.expect("an owned checkout");
    assert_eq!(settle_backends(&pg, app, 3).await, 3, "warm-up");
    drop(pool);
    assert_eq!(
        settle_backends(&pg, app, 1).await,
        1,
        "the pool's last clone is gone, yet its idle connections stayed open behind the \
         owned checkout"
    );
    diesel::sql_query("SELECT 1")
        .execute(&mut *owned)
        .await
        .expect("the owned checkout still works");
    drop(owned);
    assert_eq!(settle_backends(&pg, app, 0).await, 0);
}

fn assert_clean(what: &str, shown: &str) {
    assert!(
        !shown.contains(PgServer::PASSWORD),
        "{what} leaks the password: {shown}"
    );
}

#[tokio::test]
async fn checkout_errors_name_the_real_cause_and_never_the_password() {
    let Some(pg) = server() else { return };
    let quick = |url: &str| {
        PgPool::builder(url)
            .pool_size(0)
            .max_overflow(1)
            .connect_timeout(Some(Duration::from_secs(2)))
            .pool_timeout(Duration::from_millis(800))
    };
    // Nothing listens there.
    let port = test_support::free_port();
    let refused = quick(&pg.url_via(port, "sslmode=disable"))
        .build()
        .await
        .unwrap();
    let err = refused.get().await.err().expect("an error");
    println!("refused: {err}");
    assert_eq!(err.connect_cause(), Some(ConnectCause::Refused), "{err}");
    assert!(!err.is_budget(), "not the budget's: {err}");
    assert!(
        err.to_string().contains("could not connect (refused)"),
        "the cause is named in the message: {err}"
    );
    assert!(err.to_string().contains("refused"), "{err}");
    assert_clean("refused", &format!("{err} {err:?}"));

    // A wrong password.
    let wrong = pg
        .url_with("sslmode=disable")
        .replace(PgServer::PASSWORD, "not-the-password");
    let auth = quick(&wrong).build().await.unwrap();
    let err = auth.get().await.err().expect("an error");
    println!("auth: {err}");
    assert_eq!(err.connect_cause(), Some(ConnectCause::Auth), "{err}");
    assert!(!err.is_budget(), "not the budget's: {err}");
    assert!(
        err.to_string().contains("could not connect (auth)"),
        "the cause is named in the message: {err}"
    );
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );

    // verify-full against a certificate from a CA nobody gave us.
    let tls = quick(&pg.url_with("sslmode=verify-full&sslrootcert=system"))
        .build()
        .await;
    let err = match tls {
        Ok(pool) => pool.get().await.err().expect("an error"),
        Err(e) => panic!("{e}"),
    };
    println!("tls: {err}");
    assert_eq!(err.connect_cause(), Some(ConnectCause::Tls), "{err}");
    assert!(!err.is_budget(), "not the budget's: {err}");
    assert!(
        err.to_string().contains("could not connect (tls)"),
        "the cause is named in the message: {err}"
    );
    assert_clean("tls", &format!("{err} {err:?}"));

    // Something listens there and hangs up at once (a crashing proxy, a half-configured load
    // balancer): neither a refusal nor TLS, the network.
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listener");
    let hangup_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let hangup = quick(&pg.url_via(hangup_port, "sslmode=disable"))
        .build()
        .await
        .unwrap();
    let err = hangup.get().await.err().expect("an error");
    println!("hang-up: {err}");
    assert_eq!(err.connect_cause(), Some(ConnectCause::Network), "{err}");
    assert!(
        err.to_string().contains("could not connect (network)"),
        "the cause is named in the message: {err}"
    );
    assert_clean("hang-up", &format!("{err} {err:?}"));

    // The right password, but the pool is busy: a timeout with no other cause.
    let ok = quick(&pg.url_with("sslmode=disable"))
        .build()
        .await
        .unwrap();
    let held = ok.get().await.unwrap();
    let err = ok.get().await.err().expect("an error");
    println!("busy: {err}");
    assert!(
        matches!(&err, ExtError::Timeout { cause: None, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("1 in use"), "{err}");
    drop(held);
    for pool in [&refused, &auth, &ok] {
        assert_clean("Debug", &format!("{pool:?}"));
        assert_clean("status", &pool.status().to_string());
    }
    assert_no_secret_in_logs();
}

#[tokio::test]
async fn a_connection_left_inside_a_transaction_by_a_panic_is_never_reused() {
    let Some(pg) = server() else { return };
    let app = "ext_panic";
    let pool = ext_pool(&pg, app, 1).build().await.unwrap();
    let p = pool.clone();
    let seen = Arc::new(AtomicI64::new(0));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut conn = p.get().await.unwrap();
        let _: Result<(), diesel::result::Error> = conn
            .transaction(async |c| {
                let pid = backend_pid(c).await?;
                s.store(i64::from(pid), Ordering::SeqCst);
                diesel::sql_query("CREATE TEMP TABLE panicked (x int)")
                    .execute(c)
                    .await?;
                panic!("handler bug inside a transaction");
            })
            .await;
    });
    assert!(task.await.unwrap_err().is_panic());
    let panicked_pid = AtomicI64::load(&seen, Ordering::SeqCst) as i32;
    assert_ne!(panicked_pid, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg.backend_pids(app).unwrap().contains(&panicked_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the session left inside the transaction is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conn = pool.get().await.unwrap();
    assert_ne!(backend_pid(&mut conn).await.unwrap(), panicked_pid);
    assert_eq!(pool.stats().closed.broken, 1);
}

#[tokio::test]
async fn a_connection_held_past_the_leak_threshold_is_reported_once() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_leak", 1)
        .leak_detection_threshold(Some(Duration::from_millis(100)))
        .build()
        .await
        .unwrap();
    let conn = pool.get().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pool.stats().leaks == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.stats().leaks, 1, "reported once");
    drop(conn);
    let conn = pool.get().await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.stats().leaks, 1, "a returned connection is not a leak");
    let logs = test_support::captured_logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("a_connection_held_past_the_leak_threshold")),
        "the report names where the connection was checked out"
    );
}

#[tokio::test]
async fn the_status_report_names_the_pool_and_serializes_to_json() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "ext_status", 2)
        .name("web")
        .build()
        .await
        .unwrap();
    pool.warm(2).await;
    let report = pool.status();
    let text = report.to_string();
    assert!(text.contains("web"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["pools"][0]["name"], "web");
    assert_eq!(json["pools"][0]["probe_available"], true);
    assert_clean("status", &text);
    assert_clean("Debug", &format!("{pool:?}"));
}

/// A connection retired at checkout (here: its backend was terminated) is routine: a checkout
/// that then times out (its replacement's connect hangs) says it found no connection, and
/// does not quote the retirement as the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_never_quotes_a_routine_retirement_as_its_cause() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable&application_name=aretired");
    let pool = PgPool::builder(&url)
        .pool_size(1)
        .max_overflow(0)
        .connect_timeout(Some(Duration::from_secs(10)))
        .pool_timeout(Duration::from_millis(800))
        .build()
        .await
        .expect("pool");
    pool.warm(1).await;
    terminate_all(&pg, "aretired").await;
    // New connects get through to the proxy and hang there.
    proxy.stall(true);
    let err = pool
        .get()
        .await
        .err()
        .expect("no connection within the timeout");
    proxy.stall(false);
    let text = err.to_string();
    println!("{text}");
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        !text.contains("retired"),
        "the retirement was quoted as the timeout's cause: {text}"
    );
    assert!(pool.stats().probe_detected_dead >= 1, "{:?}", pool.stats());
}

/// The pool's `Debug` (what `#[derive(Debug)]` on an application's state prints) names the
/// pool, its server and its connections, and never the password, in the URL's userinfo or
/// its query, percent-encoded or not.
#[tokio::test]
async fn a_pools_debug_names_it_and_its_server_and_hides_the_password() {
    let password = "p@ss:/%#?&='  wörd";
    let encoded = "p%40ss%3A%2F%25%23%3F%26%3D%27%20%20w%C3%B6rd";
    for url in [
        format!("postgres://app:{encoded}@127.0.0.1:1/app?sslmode=disable"),
        format!("postgres://app@127.0.0.1:1/app?sslmode=disable&password={encoded}"),
    ] {
        let pool = PgPool::builder(&url)
            .name("debugged")
            .build_lazy()
            .await
            .expect("a lazy build opens nothing");
        let shown = format!("{pool:?}");
        for part in ["ExtPool", "debugged", "127.0.0.1", "connections"] {
            assert!(shown.contains(part), "the Debug lacks {part:?}: {shown}");
        }
        for secret in [password, encoded, "wörd", "w%C3%B6rd"] {
            assert!(
                !shown.contains(secret),
                "the Debug shows {secret:?}: {shown}"
            );
        }
    }
}

/// `get_timeout` longer than `pool_timeout` waits its own time for a connection in use (in
/// the pool's arrival-order gate; `pg_correlated` has the same through an outage, where bb8's
/// own wait, bounded by `pool_timeout`, is entered again until the caller's deadline).
#[tokio::test]
async fn get_timeout_longer_than_the_pool_timeout_waits_its_own_time() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "get_timeout_longer", 1)
        .max_overflow(0)
        .pool_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let held = pool.get().await.expect("the only connection");
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            pool.get_timeout(Duration::from_secs(10))
                .await
                .map(|_| started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held);
    let waited = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("the waiter ended within its own 10 s")
        .expect("the waiter's task")
        .unwrap_or_else(|e| {
            panic!("get_timeout(10 s) gave up before the connection came back after 1 s: {e}")
        });
    assert!(
        waited >= Duration::from_millis(900),
        "served only once the connection came back: {waited:?}"
    );
}

/// `Duration::MAX` where a caller may pass any duration (a checkout's own timeout, a
/// warm-up's) is a long wait, never an overflow of the clock: a checkout that can be served
/// is served, and a warm-up of a warm pool returns.
#[tokio::test]
async fn duration_max_is_a_long_wait_never_a_panic() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "abad_max", 1).build().await.unwrap();
    let conn = pool
        .get_timeout(Duration::MAX)
        .await
        .expect("served at once");
    drop(conn);
    let owned = pool.get_owned().await.expect("served at once");
    drop(owned);
    let warm = pool.warm_up(Duration::MAX).await;
    assert!(warm.complete(), "{warm:?}");
}
