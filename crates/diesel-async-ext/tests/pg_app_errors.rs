//! An application's own error is never taken for a lost connection, whatever its text says:
//! a PL/pgSQL `RAISE EXCEPTION` quoting connection phrases (or the server's own FATAL text)
//! runs once through the retry functions, leaves the pool's invalidation counter where it was
//! and closes no connection; a real `pg_terminate_backend` under a running query is still
//! retried.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use diesel::sql_types::{Integer, Text};
use diesel_async::RunQueryDsl;
use diesel_async_ext::retry::{
    commit_with_retry, with_retry, RetryError, RetryPolicy, RetryablePool,
};

/// What applications raise: their own words, quoting a connection phrase somewhere, or the
/// server's own FATAL messages word for word.
const PHRASES: &[&str] = &[
    "payment gateway: connection refused",
    "server closed the connection unexpectedly",
    "upstream said: connection reset by peer",
    "could not receive data from server",
    "connection closed",
    "terminating connection due to administrator command",
    "terminating connection due to idle-session timeout",
];

const FAIL_WITH: &str = "CREATE FUNCTION fail_with(msg text) RETURNS int LANGUAGE plpgsql AS \
     $$BEGIN RAISE EXCEPTION '%', msg; END$$; GRANT EXECUTE ON FUNCTION fail_with(text) TO app";

fn eager() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(4)
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .seed(3)
        .build()
        .unwrap()
}

async fn fail_with(
    conn: &mut diesel_async::AsyncPgConnection,
    msg: &str,
) -> diesel::QueryResult<usize> {
    diesel::sql_query("SELECT fail_with($1)")
        .bind::<Text, _>(msg)
        .execute(conn)
        .await
}

async fn backend_pid(pool: &diesel_async_ext::PgPool) -> i32 {
    let mut conn = pool.get().await.unwrap();
    diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(&mut conn)
        .await
        .unwrap()
}

/// `with_retry` on `pool` runs a body failing with `phrase` once, and returns its error as
/// permanent.
async fn with_retry_runs_once<P>(pool: &P, phrase: &str, which: &str)
where
    P: RetryablePool<Connection = diesel_async::AsyncPgConnection>,
{
    let runs = AtomicU32::new(0);
    let err = with_retry(pool, &eager(), async |c| {
        runs.fetch_add(1, Ordering::Relaxed);
        fail_with(c, phrase).await
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, RetryError::Permanent(_)),
        "{which}, {phrase}: {err}"
    );
    assert_eq!(
        AtomicU32::load(&runs, Ordering::Relaxed),
        1,
        "with_retry reran {phrase:?} on {which}"
    );
}

#[tokio::test]
async fn an_application_error_quoting_connection_phrases_runs_once_and_leaves_the_pool_alone() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, FAIL_WITH).unwrap();
    let pool = ext_pool(&pg, "app_errors", 1).build().await.unwrap();
    let pid = backend_pid(&pool).await;
    let before = pool.stats();
    for phrase in PHRASES {
        with_retry_runs_once(&pool, phrase, "our pool").await;

        let runs = AtomicU32::new(0);
        let err = commit_with_retry(&pool, &eager(), async |c| {
            runs.fetch_add(1, Ordering::Relaxed);
            fail_with(c, phrase).await
        })
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::Permanent(_)), "{phrase}: {err}");
        assert_eq!(
            AtomicU32::load(&runs, Ordering::Relaxed),
            1,
            "commit_with_retry reran {phrase:?}"
        );
        let stats = pool.stats();
        assert_eq!(
            stats.invalidations, before.invalidations,
            "{phrase:?} invalidated the pool"
        );
        assert_eq!(stats.retries, before.retries, "{phrase:?} was retried");
        assert_eq!(
            stats.closed.total(),
            before.closed.total(),
            "{phrase:?} closed a connection: {:?}",
            stats.closed
        );
    }
    assert_eq!(
        backend_pid(&pool).await,
        pid,
        "the one connection was kept all along"
    );
}

/// The same on a plain bb8 pool given to the retry functions, over a link with 20 ms of
/// latency: the one `SELECT 1` that checks an error's claim to a lost connection gets its
/// default 5 s to answer, so it does, and the application's error runs once.
#[tokio::test]
async fn on_plain_bb8_an_application_error_quoting_connection_phrases_runs_once_too() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, FAIL_WITH).unwrap();
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    proxy.set_latency(Duration::from_millis(20));
    let pool = control_verified(&url).await;
    for phrase in PHRASES {
        with_retry_runs_once(&pool, phrase, "plain bb8").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_under_a_running_query_is_still_retried() {
    let Some(pg) = server() else { return };
    let pg = std::sync::Arc::new(pg);
    let app = "app_errors_terminate";
    let pool = ext_pool(&pg, app, 1).build().await.unwrap();
    let runs = AtomicU32::new(0);
    let killer = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || {
            // Wait for the first attempt's query to be running, then kill its backend.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let busy = pg.backend_pids(app).map(|p| !p.is_empty()).unwrap_or(false)
                    && PgServer::execute(
                        &pg,
                        &format!(
                            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_stat_activity \
                             WHERE application_name = '{app}' AND query LIKE '%pg_sleep%' \
                             AND state = 'active') THEN RAISE EXCEPTION 'not yet'; END IF; END$$"
                        ),
                    )
                    .is_ok();
                if busy {
                    return pg.terminate_backends(app).unwrap();
                }
                assert!(
                    Instant::now() < deadline,
                    "the first attempt's query never showed up in pg_stat_activity"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let value = tokio::time::timeout(
        Duration::from_secs(30),
        with_retry(&pool, &eager(), async |c| {
            let run = runs.fetch_add(1, Ordering::Relaxed);
            let sql = if run == 0 {
                "SELECT 7 FROM pg_sleep(30)"
            } else {
                "SELECT 7"
            };
            let result = diesel::select(diesel::dsl::sql::<Integer>(&format!("({sql})")))
                .get_result::<i32>(c)
                .await;
            println!("attempt {run}: {result:?}");
            result
        }),
    )
    .await
    .expect("with_retry returned within 30 s")
    .expect("retried onto a fresh connection");
    let stats = pool.stats();
    println!("{stats:?}");
    assert_eq!(value, 7);
    assert_eq!(killer.await.unwrap(), 1, "one backend was terminated");
    assert_eq!(
        AtomicU32::load(&runs, Ordering::Relaxed),
        2,
        "one retry after the terminate"
    );
    assert_eq!(stats.retries, 1);
    assert!(
        stats.invalidations >= 1,
        "a real lost connection still invalidates the pool: {stats:?}"
    );
}
