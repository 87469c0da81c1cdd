//! A connection returned inside a transaction Diesel's transaction manager did not open (a raw
//! `BEGIN`, `begin_test_transaction`) is rolled back or closed at checkin, never handed to the
//! next caller inside it (issue 17, promise 1). Control: plain r2d2 at its defaults hands it
//! out inside the transaction.

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};

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

fn pid(conn: &mut PgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .expect("backend pid")
        .pid
}

fn rows(observer: &mut PgConnection, table: &str, tag: &str) -> i64 {
    diesel::sql_query(format!(
        "SELECT count(*) AS n FROM {table} WHERE tag = '{tag}'"
    ))
    .get_result::<Count>(observer)
    .expect("count rows")
    .n
}

/// What the pool's next caller finds after a session that opened a transaction with `open`,
/// inserted a row inside it and returned the connection.
#[derive(Debug)]
struct NextCheckout {
    /// Whether the next checkout got the same backend.
    same_backend: bool,
    /// The first backend's `pg_stat_activity.state` after the checkin (`None`: gone), read
    /// until it is no longer `idle in transaction` or 5 s have passed.
    state_after_checkin: Option<String>,
    /// `txid_current_if_assigned()` on the next checkout: set if it is still inside the
    /// first session's transaction (which wrote a row).
    xid_on_next_checkout: Option<i64>,
    /// Whether a row the next checkout inserts is visible from another connection at once.
    next_insert_visible: bool,
    /// Whether the row inserted inside the first session's transaction became visible.
    first_insert_visible: bool,
}

fn next_checkout_after<P: Checkout>(
    pg: &PgServer,
    pool: &P,
    table: &str,
    open: impl Fn(&mut PgConnection),
) -> NextCheckout {
    let mut observer = PgConnection::establish(&pg.url_with("sslmode=disable")).expect("observer");
    diesel::sql_query(format!("CREATE TABLE {table} (tag text)"))
        .execute(&mut observer)
        .expect("create table");
    let mut conn = pool.checkout().expect("first checkout");
    let first_pid = pid(&mut conn);
    open(&mut conn);
    diesel::sql_query(format!("INSERT INTO {table} VALUES ('inside')"))
        .execute(&mut *conn)
        .expect("insert inside the transaction");
    drop(conn);
    // A connection the pool closed at checkin (rather than rolled back) leaves a backend that
    // takes a moment to exit, showing its old state until then: read the state until it is
    // no longer inside the transaction, for at most 5 s.
    let state_of_first = |observer: &mut PgConnection| {
        diesel::sql_query(format!(
            "SELECT state::text AS state FROM pg_stat_activity WHERE pid = {first_pid}"
        ))
        .get_results::<State>(observer)
        .expect("pg_stat_activity")
        .into_iter()
        .next()
        .and_then(|s| s.state)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut state_after_checkin = state_of_first(&mut observer);
    while state_after_checkin.as_deref() == Some("idle in transaction")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
        state_after_checkin = state_of_first(&mut observer);
    }
    let mut conn = pool.checkout().expect("next checkout");
    let same_backend = pid(&mut conn) == first_pid;
    let xid_on_next_checkout = diesel::sql_query("SELECT txid_current_if_assigned() AS xid")
        .get_result::<Xid>(&mut *conn)
        .expect("txid")
        .xid;
    diesel::sql_query(format!("INSERT INTO {table} VALUES ('next')"))
        .execute(&mut *conn)
        .expect("insert on the next checkout");
    let next_insert_visible = rows(&mut observer, table, "next") == 1;
    let first_insert_visible = rows(&mut observer, table, "inside") == 1;
    drop(conn);
    NextCheckout {
        same_backend,
        state_after_checkin,
        xid_on_next_checkout,
        next_insert_visible,
        first_insert_visible,
    }
}

fn assert_clean(seen: &NextCheckout) {
    assert_ne!(
        seen.state_after_checkin.as_deref(),
        Some("idle in transaction"),
        "the returned connection stayed inside the transaction: {seen:?}"
    );
    assert_eq!(seen.xid_on_next_checkout, None, "{seen:?}");
    assert!(seen.next_insert_visible, "{seen:?}");
    assert!(
        !seen.first_insert_visible,
        "rolled back, never committed: {seen:?}"
    );
}

fn ours(pg: &PgServer, app: &str) -> resilient_diesel::PgPool {
    ext_pool(pg, app, 1)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap()
}

#[test]
fn a_raw_begin_through_batch_execute_is_rolled_back_at_checkin() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "tx_batch_begin");
    let seen = next_checkout_after(&pg, &pool, "tx_batch_begin", |c| {
        c.batch_execute("BEGIN").unwrap()
    });
    assert_clean(&seen);
    assert!(seen.same_backend, "rolled back, not closed: {seen:?}");
}

/// Instrumentation that sees nothing: what an application installs when it replaces the
/// connection's instrumentation with its own.
struct Unseen;

impl diesel::connection::Instrumentation for Unseen {
    fn on_connection_event(&mut self, _: diesel::connection::InstrumentationEvent<'_>) {}
}

#[test]
fn a_raw_begin_the_pool_could_not_see_is_rolled_back_at_checkin() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "tx_unseen_begin");
    // The application replaced the tracker: the pool saw none of the session's statements,
    // so it must treat the session as possibly inside a transaction.
    let seen = next_checkout_after(&pg, &pool, "tx_unseen_begin", |c| {
        c.set_instrumentation(Unseen);
        c.batch_execute("BEGIN").unwrap()
    });
    assert_clean(&seen);
}

#[test]
fn a_raw_begin_through_sql_query_is_rolled_back_at_checkin() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "tx_sql_begin");
    let seen = next_checkout_after(&pg, &pool, "tx_sql_begin", |c| {
        diesel::sql_query("start transaction isolation level repeatable read")
            .execute(c)
            .unwrap();
    });
    assert_clean(&seen);
}

#[test]
fn a_raw_transaction_left_failed_is_rolled_back_at_checkin() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "tx_failed");
    let mut conn = pool.get().unwrap();
    let first = pid(&mut conn);
    conn.batch_execute("BEGIN").unwrap();
    assert!(conn.batch_execute("SELECT 1/0").is_err());
    drop(conn);
    let mut conn = pool.get().unwrap();
    assert_eq!(pid(&mut conn), first, "the same connection, usable again");
}

#[test]
fn a_test_transaction_is_never_handed_to_the_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = ours(&pg, "tx_test_txn");
    let seen = next_checkout_after(&pg, &pool, "tx_test_txn", |c| {
        c.begin_test_transaction().unwrap()
    });
    assert_clean(&seen);
}

#[test]
fn a_session_of_diesel_queries_and_committed_transactions_pays_no_round_trip_at_checkin() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = resilient_diesel::PgPool::builder(&url)
        .application_name("tx_hot_path")
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(HOUR)
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    let first = pid(&mut conn);
    diesel::sql_query("CREATE TEMP TABLE hot (tag text)")
        .execute(&mut *conn)
        .unwrap();
    drop(conn);
    let mut conn = pool.get().unwrap();
    proxy.reset_counts();
    for _ in 0..3 {
        diesel::select(diesel::dsl::sql::<Integer>("1"))
            .get_result::<i32>(&mut *conn)
            .unwrap();
    }
    conn.transaction::<_, diesel::result::Error, _>(|c| {
        diesel::sql_query("INSERT INTO hot VALUES ('diesel')").execute(c)
    })
    .unwrap();
    conn.batch_execute("BEGIN").unwrap();
    diesel::sql_query("INSERT INTO hot VALUES ('raw')")
        .execute(&mut *conn)
        .unwrap();
    conn.batch_execute("COMMIT").unwrap();
    let session = proxy.messages().round_trips();
    assert_eq!(session, 9, "3 selects, BEGIN+insert+COMMIT twice");
    drop(conn);
    let mut conn = pool.get().unwrap();
    assert_eq!(
        proxy.messages().round_trips(),
        session,
        "nothing sent at checkin or checkout: {:?}",
        proxy.messages()
    );
    assert_eq!(pid(&mut conn), first, "kept, not closed");
}

#[test]
fn a_rollback_at_checkin_against_a_hung_backend_is_bounded_and_closes() {
    let Some(pg) = server() else { return };
    let app = "tx_hung_rollback";
    let validation_timeout = Duration::from_millis(500);
    let pool = ext_pool(&pg, app, 1)
        .validation_bypass_window(HOUR)
        .validation_timeout(validation_timeout)
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    let first = pid(&mut conn);
    conn.batch_execute("BEGIN").unwrap();
    let pause = pg.pause_backends(app).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (returned, handle) = within(Duration::from_secs(10), move || {
        let t = Instant::now();
        drop(conn);
        t.elapsed()
    });
    pause.resume();
    handle.join().unwrap();
    let took = returned.expect("the checkin hung on the hung backend");
    assert!(
        took < validation_timeout + Duration::from_millis(300),
        "checkin took {took:?}"
    );
    let mut conn = pool.get().unwrap();
    assert_ne!(pid(&mut conn), first, "closed, not handed out");
}

#[test]
fn control_plain_r2d2_at_its_defaults_hands_out_the_connection_inside_the_transaction() {
    let Some(pg) = server() else { return };
    let pool = plain_pool_defaults(&pg.url_with("sslmode=disable&application_name=tx_control"));
    let seen = next_checkout_after(&pg, &pool, "tx_control", |c| {
        c.batch_execute("BEGIN").unwrap()
    });
    assert!(seen.same_backend, "{seen:?}");
    assert_eq!(
        seen.state_after_checkin.as_deref(),
        Some("idle in transaction"),
        "{seen:?}"
    );
    assert!(seen.xid_on_next_checkout.is_some(), "{seen:?}");
    assert!(!seen.next_insert_visible, "{seen:?}");
}
