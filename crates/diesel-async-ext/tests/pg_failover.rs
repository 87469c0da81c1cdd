//! Failover, async pool: the pool's connections reach a server that is now a read-only
//! standby (a former primary, or a reader an old DNS answer still points to) while new
//! connects reach the new primary. The first write that meets the standby (25006) tells the
//! pool; every connection to the old server is closed without a ping (a standby answers
//! pings), so the write's retry, and every request after it, runs on the new primary.

mod common;

use std::time::Duration;

use common::*;
use diesel::sql_types::{Bool, Integer};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::retry::{commit_with_retry, RetryPolicy};
use diesel_async_ext::PgPool;
use test_support::PgServer;

/// Sixteen connections for the default policy's five attempts: even a pool that found the
/// standby two connections per failed write (the check on the next checkout) would run out.
const POOL: u32 = 16;

fn schema(pg: &PgServer) {
    pg.execute(
        "CREATE TABLE failover_ledger (id int PRIMARY KEY); GRANT ALL ON failover_ledger TO app",
    )
    .expect("schema");
}

async fn rows(pg: &PgServer) -> i32 {
    let mut c = AsyncPgConnection::establish(&pg.url_with("sslmode=disable"))
        .await
        .expect("connection");
    diesel::select(diesel::dsl::sql::<Integer>(
        "(SELECT count(*)::int FROM failover_ledger)",
    ))
    .get_result::<i32>(&mut c)
    .await
    .expect("count")
}

/// Two private servers with the same table: `old`, restarted as a standby (the former
/// primary), and `new`; a proxy to `old`, and its URL. The test moves the proxy to `new`
/// (the failover, as the clients see it) once its pool holds connections to `old`.
fn failed_over() -> Option<(PgServer, PgServer, test_support::FaultProxy, String)> {
    let old = server()?;
    let new = server()?;
    schema(&old);
    schema(&new);
    old.restart_as_standby()
        .expect("the old primary as a standby");
    let (proxy, url) = proxied(&old, "sslmode=disable");
    Some((old, new, proxy, url))
}

/// A write in a `READ ONLY` transaction on a primary: 25006, as a standby would answer.
async fn deliberate_read_only_write(conn: &mut AsyncPgConnection) -> diesel::QueryResult<usize> {
    conn.transaction::<_, diesel::result::Error, _>(async |c| {
        diesel::sql_query("SET TRANSACTION READ ONLY")
            .execute(c)
            .await?;
        diesel::sql_query("INSERT INTO failover_ledger VALUES (1)")
            .execute(c)
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_a_write_reaches_the_new_primary_and_no_request_meets_the_standby_again() {
    let Some((old, new, proxy, url)) = failed_over() else {
        return;
    };
    let pool = PgPool::builder(&url)
        .application_name("failover")
        .pool_size(POOL)
        .max_overflow(0)
        .build()
        .await
        .expect("pool");
    pool.warm(POOL as usize).await;
    // The address moves to the new primary; the pool's connections still reach the standby,
    // and each answers a ping.
    proxy.retarget(new.addr());

    // Five attempts (the default policy) for sixteen connections to the standby.
    let written = commit_with_retry(&pool, &RetryPolicy::default(), async |conn| {
        diesel::sql_query("INSERT INTO failover_ledger VALUES (1)")
            .execute(conn)
            .await
    })
    .await;
    let stats = pool.stats();
    assert!(
        written.is_ok(),
        "the write after the failover failed: {written:?}; {stats:?}"
    );
    assert_eq!(rows(&new).await, 1, "the write is on the new primary, once");
    assert!(stats.invalidations >= 1, "{stats:?}");

    // A burst of POOL at once: none of them is served by the standby.
    let burst: Vec<_> = (0..POOL)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                diesel::select(diesel::dsl::sql::<Bool>("pg_is_in_recovery()"))
                    .get_result::<bool>(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut standby = Vec::new();
    for task in burst {
        match task.await.expect("task") {
            Ok(false) => {}
            Ok(true) => standby.push("served by the standby".to_owned()),
            Err(e) => standby.push(e),
        }
    }
    let stats = pool.stats();
    assert!(
        standby.is_empty(),
        "after the failover was seen, requests still met the standby: {standby:?}; {stats:?}"
    );
    // The connections to the standby were closed, not pooled again.
    let gone = tokio::task::spawn_blocking(move || {
        let gone = old.wait_backends_gone("failover", Duration::from_secs(5));
        (old, gone)
    })
    .await
    .expect("wait");
    assert!(
        gone.1.is_ok(),
        "connections to the standby still open: {:?}; {stats:?}",
        gone.1
    );
    println!(
        "failover, async, pool of {POOL}: the write succeeded; closed as suspects {}, broken {}",
        stats.closed.invalidated, stats.closed.broken
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plain_bb8_at_its_defaults_keeps_serving_from_the_standby_after_a_failover() {
    let Some((_old, new, proxy, url)) = failed_over() else {
        return;
    };
    let plain = bb8::Pool::builder()
        .max_size(POOL)
        .build(
            diesel_async::pooled_connection::AsyncDieselConnectionManager::<AsyncPgConnection>::new(
                &url,
            ),
        )
        .await
        .expect("plain pool");
    plain.warm(POOL as usize).await;
    proxy.retarget(new.addr());
    // Its checkout check (`SELECT 1`) passes on a standby: every write fails, for as long
    // as its connections live.
    let mut failed = 0;
    for id in 0..2 * POOL as i32 {
        let mut conn = plain.get().await.expect("checkout");
        if diesel::sql_query(format!("INSERT INTO failover_ledger VALUES ({id})"))
            .execute(&mut *conn)
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert_eq!(
        failed,
        2 * POOL,
        "plain bb8 was expected to keep its connections to the standby"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_write_in_a_read_only_transaction_neither_invalidates_the_pool_nor_loses_the_connection(
) {
    let Some(pg) = server() else { return };
    schema(&pg);
    let pool = ext_pool(&pg, "ro_deliberate", 2).build().await.unwrap();
    pool.warm(2).await;
    let denied = {
        let mut conn = pool.get().await.unwrap();
        deliberate_read_only_write(&mut conn).await
    };
    assert!(
        matches!(
            denied,
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ReadOnlyTransaction,
                _
            ))
        ),
        "{denied:?}"
    );
    // The next checkouts (whichever connection they get) ask the server and find a primary.
    assert!(errors_over(&pool, 4).await.is_empty());
    let stats = pool.stats();
    assert_eq!(stats.invalidations, 0, "a primary is no standby: {stats:?}");
    assert_eq!(stats.closed.broken, 0, "{stats:?}");
    assert_eq!(
        stats.connects, 2,
        "the same connections serve on: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_check_is_one_simple_query_safe_behind_a_transaction_pooler() {
    let Some(pg) = server() else { return };
    schema(&pg);
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .application_name("ro_check")
        .pool_size(1)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let denied = {
        let mut conn = pool.get().await.unwrap();
        deliberate_read_only_write(&mut conn).await
    };
    assert!(denied.is_err(), "{denied:?}");
    proxy.reset_counts();
    // This checkout asks the server whether it became a standby, and nothing else.
    drop(pool.get().await.expect("checkout"));
    let sent = proxy.messages();
    let stats = pool.stats();
    assert_eq!(stats.invalidations, 0, "a primary: {stats:?}");
    assert_eq!(
        (sent.parses, sent.syncs),
        (0, 0),
        "the standby check prepared a statement (unsafe behind a transaction pooler): {sent:?}"
    );
    assert!(sent.queries >= 1, "no standby check was sent: {sent:?}");
}

/// `target_session_attrs=read-write` against a standby alone: the server refused the
/// session, said as such (not a network failure), and the next host of a list is tried.
#[tokio::test]
async fn a_standby_refused_by_target_session_attrs_is_a_server_refusal() {
    let Some(standby) = server() else { return };
    let Some(primary) = server() else { return };
    standby.restart_as_standby().expect("a standby");
    let settings = pool_core::config::ConnectSettings::default();
    let only = standby.url_with("sslmode=disable&target_session_attrs=read-write");
    let err = diesel_async_ext::establish(&only, &settings)
        .await
        .err()
        .expect("a standby is not read-write");
    assert!(
        matches!(
            err,
            diesel_async_ext::ConnectError::Server { code: None, .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not allow writes"), "{err}");
    // Both in one list: the primary is found after the standby.
    let both = format!(
        "postgres://app:{}@127.0.0.1:{},127.0.0.1:{}/app?sslmode=disable&target_session_attrs=read-write",
        PgServer::PASSWORD,
        standby.port(),
        primary.port()
    );
    let mut conn = diesel_async_ext::establish(&both, &settings)
        .await
        .expect("the primary, second in the list");
    let standby_now: bool = diesel::select(diesel::dsl::sql::<Bool>("pg_is_in_recovery()"))
        .get_result(&mut conn)
        .await
        .unwrap();
    assert!(!standby_now);
}

/// A transaction's status is never taken from a standby, even one with the identity of the
/// primary that ran it (here the very server, restarted as a standby, as a former primary
/// is after a failover): it may not have replayed the commit yet, so its answer would be a
/// guess.
#[tokio::test]
async fn txid_status_is_never_taken_from_a_standby() {
    use diesel_async_ext::retry::{RetryConnection, TxStatus};
    let Some(pg) = server() else { return };
    let url = pg.url_with("sslmode=disable");
    let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
    let (txid, server) = conn
        .transaction(async |c| c.current_txid_and_server().await)
        .await
        .expect("txid and server")
        .expect("PostgreSQL has transaction ids");
    assert_eq!(
        conn.txid_status_on(txid, &server).await.expect("asked"),
        Some(TxStatus::Committed),
        "the primary answers"
    );
    drop(conn);
    pg.restart_as_standby().expect("the server as a standby");
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .expect("connect to the standby");
    assert_eq!(
        conn.txid_status_on(txid, &server).await.expect("asked"),
        None,
        "a standby's answer was taken"
    );
}
