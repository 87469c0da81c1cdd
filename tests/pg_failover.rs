//! Failover, sync pool: the pool's connections reach a server that is now a read-only standby
//! (a former primary, or a reader an old DNS answer still points to) while new connects reach
//! the new primary. The first write that meets the standby (25006) tells the pool; every
//! connection to the old server is closed without a ping (a standby answers pings), so the
//! write's retry, and every request after it, runs on the new primary.

mod common;

use std::time::Duration;

use common::*;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};
use resilient_diesel::{commit_with_retry, PgPool, RetryPolicy};
use test_support::PgServer;

const POOL: u32 = 8;

fn in_recovery(conn: &mut PgConnection) -> QueryResult<bool> {
    diesel::select(diesel::dsl::sql::<Bool>("pg_is_in_recovery()")).get_result(conn)
}

/// Two private servers with the same table: `old`, restarted as a standby (the former
/// primary), and `new`; a proxy to `old`, and its URL. The test moves the proxy to `new`
/// (the failover, as the clients see it) once its pool holds connections to `old`.
fn failed_over() -> Option<(PgServer, PgServer, test_support::FaultProxy, String)> {
    let old = server()?;
    let new = server()?;
    for pg in [&old, &new] {
        pg.execute(
            "CREATE TABLE failover_ledger (id int PRIMARY KEY); GRANT ALL ON failover_ledger TO app",
        )
        .expect("schema");
    }
    old.restart_as_standby()
        .expect("the old primary as a standby");
    let (proxy, url) = proxied(&old, "sslmode=disable");
    Some((old, new, proxy, url))
}

#[test]
fn after_a_failover_a_write_reaches_the_new_primary_and_no_request_meets_the_standby_again() {
    let Some((old, new, proxy, url)) = failed_over() else {
        return;
    };
    let pool = PgPool::builder(&url)
        .application_name("failover")
        .pool_size(POOL)
        .max_overflow(0)
        .build()
        .expect("pool");
    warm(&pool, POOL as usize);
    // The address moves to the new primary; the pool's eight connections still reach the
    // standby, and each answers a ping.
    proxy.retarget(new.addr());

    // Five attempts (the default policy) for eight connections to the standby: each found
    // by a failed write of its own would exhaust them.
    let written = commit_with_retry(&pool, &RetryPolicy::default(), |conn| {
        diesel::sql_query("INSERT INTO failover_ledger VALUES (1)").execute(conn)
    });
    let stats = pool.stats();
    assert!(
        written.is_ok(),
        "the write after the failover failed: {written:?}; {stats:?}"
    );
    let rows = |pg: &PgServer| {
        let mut c = PgConnection::establish(&pg.url_with("sslmode=disable")).expect("connection");
        diesel::select(diesel::dsl::sql::<Integer>(
            "(SELECT count(*)::int FROM failover_ledger)",
        ))
        .get_result::<i32>(&mut c)
        .expect("count")
    };
    assert_eq!(rows(&new), 1, "the write is on the new primary, once");
    assert!(stats.invalidations >= 1, "{stats:?}");

    // A burst of POOL at once: none of them is served by the standby.
    let standby: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..POOL)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = pool.get().map_err(|e| e.to_string())?;
                    in_recovery(&mut conn).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join().unwrap() {
                Ok(false) => None,
                Ok(true) => Some("served by the standby".to_owned()),
                Err(e) => Some(e),
            })
            .collect()
    });
    let stats = pool.stats();
    assert!(
        standby.is_empty(),
        "after the failover was seen, requests still met the standby: {standby:?}; {stats:?}"
    );
    // The connections to the standby were closed, not pooled again.
    let gone = old.wait_backends_gone("failover", Duration::from_secs(5));
    assert!(
        gone.is_ok(),
        "connections to the standby still open: {gone:?}; {stats:?}"
    );
    println!(
        "failover, sync, pool of {POOL}: the write succeeded; closed as suspects {}, broken {}",
        stats.closed.invalidated, stats.closed.broken
    );
}

#[test]
fn control_plain_r2d2_at_its_defaults_keeps_serving_from_the_standby_after_a_failover() {
    let Some((_old, new, proxy, url)) = failed_over() else {
        return;
    };
    let plain = r2d2::Pool::builder()
        .max_size(POOL)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(&url))
        .expect("plain pool");
    warm(&plain, POOL as usize);
    proxy.retarget(new.addr());
    // Its checkout test (`SELECT 1`) passes on a standby: every write fails, for as long as
    // its connections live (`max_lifetime`, 30 minutes by default).
    let failed = (0..2 * POOL as i32)
        .filter(|id| {
            let mut conn = plain.get().expect("checkout");
            diesel::sql_query(format!("INSERT INTO failover_ledger VALUES ({id})"))
                .execute(&mut *conn)
                .is_err()
        })
        .count();
    assert_eq!(
        failed,
        2 * POOL as usize,
        "plain r2d2 was expected to keep its connections to the standby"
    );
}

/// A transaction's status is never taken from a standby, even one with the identity of the
/// primary that ran it (here the very server, restarted as a standby, as a former primary
/// is after a failover): it may not have replayed the commit yet, so its answer would be a
/// guess.
#[test]
fn txid_status_is_never_taken_from_a_standby() {
    use resilient_diesel::retry::{RetryConnection, TxStatus};
    let Some(pg) = server() else { return };
    let url = pg.url_with("sslmode=disable");
    let mut conn = PgConnection::establish(&url).expect("connect");
    let (txid, server) = conn
        .transaction(|c| c.current_txid_and_server())
        .expect("txid and server")
        .expect("PostgreSQL has transaction ids");
    assert_eq!(
        conn.txid_status_on(txid, &server).expect("asked"),
        Some(TxStatus::Committed),
        "the primary answers"
    );
    drop(conn);
    pg.restart_as_standby().expect("the server as a standby");
    let mut conn = PgConnection::establish(&url).expect("connect to the standby");
    assert!(in_recovery(&mut conn).expect("pg_is_in_recovery"));
    assert_eq!(
        conn.txid_status_on(txid, &server).expect("asked"),
        None,
        "a standby's answer was taken"
    );
}
