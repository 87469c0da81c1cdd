//! A connection returned inside a transaction Diesel's transaction manager did not open (a raw
//! `BEGIN`, `begin_test_transaction`, a `BEGIN` whose future was dropped) is closed at checkin,
//! never handed to the next caller inside it (issue 17, promise 1). Control: plain bb8 +
//! diesel-async at their defaults hand it out inside the transaction.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Xid {
    #[diesel(sql_type = Nullable<BigInt>)]
    xid: Option<i64>,
}

#[derive(QueryableByName)]
struct State {
    #[diesel(sql_type = Nullable<Text>)]
    state: Option<String>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn pid(conn: &mut AsyncPgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .await
        .expect("backend pid")
        .pid
}

async fn rows(observer: &mut AsyncPgConnection, table: &str, tag: &str) -> i64 {
    diesel::sql_query(format!(
        "SELECT count(*) AS n FROM {table} WHERE tag = '{tag}'"
    ))
    .get_result::<Count>(observer)
    .await
    .expect("count rows")
    .n
}

/// What the pool's next caller finds after a session that opened a transaction, inserted a
/// row inside it and returned the connection.
#[derive(Debug)]
struct NextCheckout {
    same_backend: bool,
    /// The first backend's `pg_stat_activity.state` right after the checkin (`None`: gone).
    state_after_checkin: Option<String>,
    /// `txid_current_if_assigned()` on the next checkout.
    xid_on_next_checkout: Option<i64>,
    /// Whether a row the next checkout inserts is visible from another connection at once.
    next_insert_visible: bool,
}

/// Runs the scenario on `$pool` (anything whose `get().await` derefs to a connection), the
/// first session opening its transaction with `$open` (an async block using `$c`).
macro_rules! next_checkout_after {
    ($pg:expr, $pool:expr, $table:expr, |$c:ident| $open:expr) => {{
        let table = $table;
        let mut observer = AsyncPgConnection::establish(&$pg.url_with("sslmode=disable"))
            .await
            .expect("observer");
        diesel::sql_query(format!("CREATE TABLE {table} (tag text)"))
            .execute(&mut observer)
            .await
            .expect("create table");
        let mut conn = $pool.get().await.expect("first checkout");
        let first_pid = pid(&mut conn).await;
        {
            let $c: &mut AsyncPgConnection = &mut conn;
            $open;
        }
        diesel::sql_query(format!("INSERT INTO {table} VALUES ('inside')"))
            .execute(&mut *conn)
            .await
            .expect("insert inside the transaction");
        drop(conn);
        // bb8 puts a connection back on a task of its own.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let state_after_checkin = diesel::sql_query(format!(
            "SELECT state::text AS state FROM pg_stat_activity WHERE pid = {first_pid}"
        ))
        .get_results::<State>(&mut observer)
        .await
        .expect("pg_stat_activity")
        .into_iter()
        .next()
        .and_then(|s| s.state);
        let mut conn = $pool.get().await.expect("next checkout");
        let same_backend = pid(&mut conn).await == first_pid;
        let xid_on_next_checkout = diesel::sql_query("SELECT txid_current_if_assigned() AS xid")
            .get_result::<Xid>(&mut *conn)
            .await
            .expect("txid")
            .xid;
        diesel::sql_query(format!("INSERT INTO {table} VALUES ('next')"))
            .execute(&mut *conn)
            .await
            .expect("insert on the next checkout");
        let next_insert_visible = rows(&mut observer, table, "next").await == 1;
        NextCheckout {
            same_backend,
            state_after_checkin,
            xid_on_next_checkout,
            next_insert_visible,
        }
    }};
}

fn assert_clean(seen: &NextCheckout) {
    assert_ne!(
        seen.state_after_checkin.as_deref(),
        Some("idle in transaction"),
        "the returned connection stayed inside the transaction: {seen:?}"
    );
    assert_eq!(seen.xid_on_next_checkout, None, "{seen:?}");
    assert!(seen.next_insert_visible, "{seen:?}");
}

async fn ours(pg: &PgServer, app: &str) -> diesel_async_ext::PgPool {
    ext_pool(pg, app, 1)
        .validation_bypass_window(HOUR)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_raw_begin_through_batch_execute_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_batch_begin").await;
    let seen = next_checkout_after!(pg, pool, "atx_batch_begin", |c| c
        .batch_execute("BEGIN")
        .await
        .unwrap());
    assert_clean(&seen);
}

/// Instrumentation that sees nothing: what an application installs when it replaces the
/// connection's instrumentation with its own.
struct Unseen;

impl diesel::connection::Instrumentation for Unseen {
    fn on_connection_event(&mut self, _: diesel::connection::InstrumentationEvent<'_>) {}
}

#[tokio::test]
async fn a_raw_begin_the_pool_could_not_see_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_unseen_begin").await;
    // The application replaced the tracker: the pool saw none of the session's statements,
    // so it must treat the session as possibly inside a transaction.
    let seen = next_checkout_after!(pg, pool, "atx_unseen_begin", |c| {
        c.set_instrumentation(Unseen);
        c.batch_execute("BEGIN").await.unwrap()
    });
    assert_clean(&seen);
}

#[tokio::test]
async fn a_raw_begin_through_sql_query_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_sql_begin").await;
    let seen = next_checkout_after!(pg, pool, "atx_sql_begin", |c| diesel::sql_query(
        "START TRANSACTION"
    )
    .execute(c)
    .await
    .unwrap());
    assert_clean(&seen);
}

#[tokio::test]
async fn a_test_transaction_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_test_txn").await;
    let seen = next_checkout_after!(pg, pool, "atx_test_txn", |c| c
        .begin_test_transaction()
        .await
        .unwrap());
    assert_clean(&seen);
}

#[tokio::test]
async fn a_raw_begin_whose_future_was_dropped_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_dropped_begin").await;
    // `BEGIN; SELECT pg_sleep(5)` is sent, then its future is dropped: the server runs it.
    let seen = next_checkout_after!(pg, pool, "atx_dropped_begin", |c| {
        let sent = tokio::time::timeout(
            Duration::from_millis(200),
            c.batch_execute("BEGIN; SELECT pg_sleep(0.5)"),
        )
        .await;
        assert!(sent.is_err(), "the statement was to be cut short");
        tokio::time::sleep(Duration::from_millis(700)).await;
    });
    assert_clean(&seen);
}

#[tokio::test]
async fn a_session_of_diesel_queries_and_committed_transactions_keeps_its_connection() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_hot_path").await;
    let mut conn = pool.get().await.unwrap();
    let first = pid(&mut conn).await;
    diesel::sql_query("CREATE TEMP TABLE hot (tag text)")
        .execute(&mut *conn)
        .await
        .unwrap();
    for _ in 0..3 {
        one(&mut conn).await.unwrap();
    }
    conn.transaction::<_, diesel::result::Error, _>(async |c| {
        diesel::sql_query("INSERT INTO hot VALUES ('diesel')")
            .execute(c)
            .await
    })
    .await
    .unwrap();
    conn.batch_execute("BEGIN").await.unwrap();
    diesel::sql_query("INSERT INTO hot VALUES ('raw')")
        .execute(&mut *conn)
        .await
        .unwrap();
    conn.batch_execute("COMMIT").await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conn = pool.get().await.unwrap();
    assert_eq!(pid(&mut conn).await, first, "kept, not closed");
    assert_eq!(pool.stats().closed.total(), 0, "{:?}", pool.stats());
}

#[tokio::test]
async fn control_plain_bb8_at_its_defaults_hands_out_the_connection_inside_the_transaction() {
    let Some(pg) = server() else { return };
    let pool = control_verified(&pg.url_with("sslmode=disable&application_name=atx_control")).await;
    let seen = next_checkout_after!(pg, pool, "atx_control", |c| c
        .batch_execute("BEGIN")
        .await
        .unwrap());
    assert!(seen.same_backend, "{seen:?}");
    assert_eq!(
        seen.state_after_checkin.as_deref(),
        Some("idle in transaction"),
        "{seen:?}"
    );
    assert!(seen.xid_on_next_checkout.is_some(), "{seen:?}");
    assert!(!seen.next_insert_visible, "{seen:?}");
}

#[tokio::test]
async fn a_test_transaction_committed_by_hand_never_leaves_diesel_confused_for_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "atx_test_commit").await;
    let mut conn = pool.get().await.unwrap();
    conn.begin_test_transaction().await.unwrap();
    // The server's transaction ends; Diesel's manager still counts its test transaction.
    conn.batch_execute("COMMIT").await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conn = pool.get().await.unwrap();
    let next = conn
        .transaction::<_, diesel::result::Error, _>(async |c| {
            one(c)
                .await
                .map_err(|e| diesel::result::Error::QueryBuilderError(e.into()))
        })
        .await;
    assert!(
        next.is_ok(),
        "the next checkout's transaction failed: {next:?}"
    );
}
