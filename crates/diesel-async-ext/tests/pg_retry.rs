//! `with_retry`, `commit_with_retry` and `commit_with_key` for diesel-async against real
//! PostgreSQL faults: serialization failures, a connection cut while COMMIT is in flight
//! (with a naive retry loop as the control, which commits twice), idempotency keys.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::retry::{
    commit_with_key, commit_with_retry, with_retry, Keyed, RetryError, RetryPolicy,
    IDEMPOTENCY_TABLE_SQL,
};
use diesel_async_ext::PgPool;

fn patient() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(1000)
        .max_elapsed(Some(Duration::from_secs(60)))
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(50))
        .seed(11)
        .build()
        .unwrap()
}

async fn count(conn: &mut AsyncPgConnection, sql: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(&format!("({sql})")))
        .get_result(conn)
        .await
        .unwrap()
}

const LEDGER: &str = "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL); \
     GRANT ALL ON ledger TO app; GRANT ALL ON SEQUENCE ledger_id_seq TO app";

/// The ledger and the idempotency key table, both writable by the app's role.
fn setup_keyed(pg: &PgServer) {
    PgServer::execute(
        pg,
        &format!(
            "{LEDGER}; {IDEMPOTENCY_TABLE_SQL}; \
             GRANT ALL ON resilient_diesel_idempotency_keys TO app"
        ),
    )
    .unwrap();
}

/// Our pool of 2 (no overflow) at `url`, its sessions named `app`.
async fn pool_at(url: &str, app: &str) -> PgPool {
    PgPool::builder(url)
        .application_name(app)
        .pool_size(2)
        .max_overflow(0)
        .build()
        .await
        .unwrap()
}

const COUNTER: &str = "CREATE TABLE counter (id int PRIMARY KEY, v bigint NOT NULL); \
     INSERT INTO counter VALUES (1, 0); GRANT ALL ON counter TO app";

/// One read-modify-write increment at SERIALIZABLE: concurrent ones conflict with 40001.
async fn increment(conn: &mut AsyncPgConnection) -> diesel::QueryResult<i64> {
    diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .execute(conn)
        .await?;
    let v: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT v FROM counter WHERE id = 1)",
    ))
    .get_result(conn)
    .await?;
    diesel::sql_query(format!("UPDATE counter SET v = {} WHERE id = 1", v + 1))
        .execute(conn)
        .await?;
    Ok(v + 1)
}

/// 6 tasks x 30 increments; returns (final value, failed calls).
async fn counter_run(pool: &PgPool, policy: &RetryPolicy) -> (i64, u32) {
    let failures = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (pool, policy, failures) = (pool.clone(), policy.clone(), failures.clone());
            // Spawned: the retry futures are Send.
            tokio::spawn(async move {
                for _ in 0..30 {
                    if commit_with_retry(&pool, &policy, async |c| increment(c).await)
                        .await
                        .is_err()
                    {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut conn = pool.get().await.unwrap();
    (
        count(&mut conn, "SELECT v FROM counter WHERE id = 1").await,
        AtomicU32::load(&failures, Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_counter_with_commit_with_retry_ends_exact_and_without_retries_loses() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, COUNTER).unwrap();
    let pool = ext_pool(&pg, "retry_counter", 6).build().await.unwrap();
    let (value, failures) = counter_run(&pool, &patient()).await;
    let retries = pool.stats().retries;
    println!("serializable counter 6x30: {value} with commit_with_retry ({retries} retries)");
    assert_eq!(failures, 0);
    assert_eq!(value, 180);
    assert!(retries > 0, "the run must have hit serialization failures");
    // The control: the same run without retries loses increments.
    PgServer::execute(&pg, "UPDATE counter SET v = 0").unwrap();
    let (value, failures) = counter_run(&pool, &RetryPolicy::no_retry()).await;
    println!("without retries: {value} ({failures} calls failed)");
    assert!(failures > 0, "6 tasks on one row must conflict");
    assert_eq!(value, 180 - i64::from(failures));
    assert_no_secret_in_logs();
}

#[tokio::test]
async fn a_connection_cut_while_commit_is_in_flight_commits_exactly_once() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, LEDGER).unwrap();
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = pool_at(&url, "retry_commit_cut").await;
    let runs = Arc::new(AtomicU32::new(0));
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let (p, r) = (pool.clone(), runs.clone());
    let id: i64 = tokio::spawn(async move {
        commit_with_retry(&p, &patient(), async |conn| {
            r.fetch_add(1, Ordering::Relaxed);
            diesel::sql_query("INSERT INTO ledger (note) VALUES ('once')")
                .execute(conn)
                .await?;
            diesel::select(diesel::dsl::sql::<BigInt>("currval('ledger_id_seq')"))
                .get_result::<i64>(conn)
                .await
        })
        .await
    })
    .await
    .unwrap()
    .expect("resolved as committed");
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(
        AtomicU32::load(&runs, Ordering::Relaxed),
        1,
        "never rerun after a commit"
    );
    let mut conn = pool.get().await.unwrap();
    let rows = count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'once'").await;
    println!("COMMIT cut: commit_with_retry wrote {rows} row(s), body ran once");
    assert_eq!(rows, 1);
    assert_eq!(
        count(&mut conn, "SELECT id FROM ledger WHERE note = 'once'").await,
        id,
        "the call returns the committed transaction's result"
    );
    assert_eq!(pool.stats().commits_resolved, 1);
}

#[tokio::test]
async fn control_a_naive_retry_loop_writes_twice_when_commit_is_cut() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, LEDGER).unwrap();
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = control_verified(&url).await;
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    // The field reports' loop: any error, sleep, try again, three times.
    for _ in 0..3 {
        let mut conn = pool.get().await.unwrap();
        let done: Result<usize, diesel::result::Error> = conn
            .transaction(async |c| {
                diesel::sql_query("INSERT INTO ledger (note) VALUES ('naive')")
                    .execute(c)
                    .await
            })
            .await;
        if done.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = pool.get().await.unwrap();
    let rows = count(
        &mut conn,
        "SELECT count(*) FROM ledger WHERE note = 'naive'",
    )
    .await;
    println!("COMMIT cut: the naive loop wrote {rows} rows");
    assert_eq!(rows, 2, "the naive loop duplicates the committed row");
}

#[tokio::test]
async fn an_idempotency_key_resolves_a_cut_commit_and_makes_repeats_no_ops() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .name("aretry_key_cut")
        .application_name("retry_key")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let policy = RetryPolicy::builder().verify_commit(false).build().unwrap();
    let runs = AtomicU32::new(0);
    let insert = async |conn: &mut AsyncPgConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('keyed')")
            .execute(conn)
            .await
    };
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let first = commit_with_key(&pool, &policy, "order-42", insert)
        .await
        .unwrap();
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(first, Keyed::Committed(1));
    let again = commit_with_key(&pool, &policy, "order-42", insert)
        .await
        .unwrap();
    assert_eq!(again, Keyed::AlreadyCommitted);
    assert_eq!(AtomicU32::load(&runs, Ordering::Relaxed), 1);
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'keyed'"
        )
        .await,
        1
    );
    // The resolution asked the server to end the transaction if its session still sat idle
    // in it; it had committed, so nothing was ended, and nothing says so.
    assert!(
        !test_support::captured_logs()
            .iter()
            .any(|l| l.contains("pool aretry_key_cut:") && l.contains("ended the session")),
        "an ending was logged where no session was ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_keyed_commit_that_rolled_back_while_a_concurrent_call_committed_the_key_is_already_committed(
) {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    // A through the proxy, whose COMMIT never reaches the server (so it rolls back); B, a
    // second delivery of the same key, direct.
    let a = PgPool::builder(&url)
        .application_name("retry_key_race_a")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let b = ext_pool(&pg, "retry_key_race_b", 2).build().await.unwrap();
    let policy = RetryPolicy::builder().verify_commit(false).build().unwrap();
    let a_holds_the_key = tokio::sync::Barrier::new(2);
    // B, polled beside A in this task (no spawn: the closures borrow the test's state).
    let b_call = async {
        a_holds_the_key.wait().await;
        // Waits on A's key lock until A's transaction is rolled back.
        commit_with_key(
            &b,
            &policy,
            "dup-7",
            async |conn: &mut AsyncPgConnection| {
                diesel::sql_query("INSERT INTO ledger (note) VALUES ('b')")
                    .execute(conn)
                    .await?;
                Ok::<_, diesel::result::Error>("b")
            },
        )
        .await
    };
    proxy.sever_before_forwarding(b"COMMIT");
    let a_runs = AtomicU32::new(0);
    let a_call = commit_with_key(
        &a,
        &policy,
        "dup-7",
        async |conn: &mut AsyncPgConnection| {
            diesel::sql_query("INSERT INTO ledger (note) VALUES ('a')")
                .execute(conn)
                .await?;
            if a_runs.fetch_add(1, Ordering::Relaxed) == 0 {
                a_holds_the_key.wait().await;
                // B is now blocked on the key this transaction inserted.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok::<_, diesel::result::Error>("a")
        },
    );
    let (got_a, got_b) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(a_call, b_call)
    })
    .await
    .expect("both calls end");
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(
        got_b.as_ref().ok(),
        Some(&Keyed::Committed("b")),
        "{got_b:?}"
    );
    // Before the fix: Committed("a"), a value from a transaction that rolled back.
    assert_eq!(
        got_a.as_ref().ok(),
        Some(&Keyed::AlreadyCommitted),
        "A's transaction rolled back and B's committed the key: {got_a:?}"
    );
    let mut conn = b.get().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note IN ('a', 'b')"
        )
        .await,
        1,
        "stored once"
    );
}

#[tokio::test]
async fn a_unique_violation_is_tried_once_and_a_lost_connection_is_retried() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, LEDGER).unwrap();
    PgServer::execute(&pg, "INSERT INTO ledger (id, note) VALUES (1, 'taken')").unwrap();
    let app = "retry_classes";
    let pool = ext_pool(&pg, app, 2).build().await.unwrap();
    let runs = AtomicU32::new(0);
    let err = commit_with_retry(&pool, &patient(), async |c| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (id, note) VALUES (1, 'again')")
            .execute(c)
            .await
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::Permanent(_)), "{err}");
    assert_eq!(AtomicU32::load(&runs, Ordering::Relaxed), 1);
    // with_retry rides over backends terminated under the pool, on a plain bb8 pool too.
    let control =
        control_verified(&pg.url_with("sslmode=disable&application_name=retry_bb8")).await;
    control.warm(3).await;
    pool.warm(2).await;
    terminate_all(&pg, app).await;
    terminate_all(&pg, "retry_bb8").await;
    for _ in 0..5 {
        with_retry(&pool, &patient(), async |c| one(c).await.map_err(to_diesel))
            .await
            .unwrap();
        with_retry(&control, &patient(), async |c| {
            one(c).await.map_err(to_diesel)
        })
        .await
        .unwrap();
    }
}

fn to_diesel(message: String) -> diesel::result::Error {
    diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::UnableToSendCommand,
        Box::new(message),
    )
}

/// Other sessions of the app's role, each left idle in a transaction that wrote a row: the
/// resolution of someone else's lost `COMMIT` must never end them.
async fn bystanders(pg: &PgServer) -> Vec<AsyncPgConnection> {
    use diesel_async::SimpleAsyncConnection;
    let mut out = Vec::new();
    for i in 0..2 {
        let mut c = AsyncPgConnection::establish(&pg.url_with("application_name=bystander"))
            .await
            .expect("a bystander session");
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO ledger (note) VALUES ('bystander {i}')"
        ))
        .await
        .expect("a bystander's open transaction");
        out.push(c);
    }
    out
}

/// Each bystander's transaction is still there: it commits now.
async fn assert_bystanders_untouched(bystanders: Vec<AsyncPgConnection>) {
    use diesel_async::SimpleAsyncConnection;
    for (i, mut c) in bystanders.into_iter().enumerate() {
        if let Err(e) = c.batch_execute("COMMIT").await {
            panic!("bystander {i}'s open transaction was ended: {e}");
        }
    }
}

/// Waits (5 s at most) until no session of application `app` is left idle in a transaction.
async fn assert_none_left_idle_in_transaction(conn: &mut AsyncPgConnection, app: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = '{app}' AND state = 'idle in transaction'"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count(conn, &sql).await > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(conn, &sql).await,
        0,
        "the session of the lost COMMIT is still open"
    );
}

/// A `COMMIT` lost on the way (the server never hears of the client again, as behind a
/// blackholed network): the server keeps the transaction open, idle in it, its outcome "in
/// progress" for hours with default settings. The resolution ends that session (and no
/// other), so the transaction can never commit, reads "aborted" and runs the body again:
/// committed once, with no server setting. Without the ending, the resolution times out
/// and the call fails as an ambiguous commit.
#[tokio::test]
async fn a_commit_lost_on_the_way_is_ended_on_the_server_then_retried_and_committed_once() {
    let Some(pg) = server() else { return };
    PgServer::execute(&pg, LEDGER).unwrap();
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let app = "aretry_commit_lost";
    let pool = pool_at(&url, app).await;
    let policy = RetryPolicy::builder()
        .commit_resolution_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let bystanders = bystanders(&pg).await;
    let runs = AtomicU32::new(0);
    proxy.lose_before_forwarding(b"COMMIT");
    let out = commit_with_retry(&pool, &policy, async |conn: &mut AsyncPgConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('lost')")
            .execute(conn)
            .await
            .map(drop)
    })
    .await;
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        out.is_ok(),
        "the lost COMMIT's outcome must be decided, not left ambiguous: {out:?}"
    );
    assert_eq!(
        AtomicU32::load(&runs, Ordering::Relaxed),
        2,
        "the body runs again once its first transaction was ended"
    );
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'lost'").await,
        1
    );
    assert_none_left_idle_in_transaction(&mut conn, app).await;
    assert_bystanders_untouched(bystanders).await;
    assert!(
        test_support::captured_logs()
            .iter()
            .any(|l| l.contains("ended the session left idle in transaction")),
        "the ending is logged"
    );
}

/// The control for a lost `COMMIT`: plain bb8 at its defaults (diesel-async's manager,
/// `RecyclingMethod::Verified`) with the field reports' naive retry loop. The lost
/// transaction stays open on the server, holding its locks; the retry of the same row waits
/// behind it, here until the test lets the server see the client gone (in the field, until
/// the server notices: hours with default settings).
#[tokio::test]
async fn control_a_naive_retry_of_a_lost_commit_waits_behind_the_transaction_left_open() {
    let Some(pg) = server() else { return };
    PgServer::execute(
        &pg,
        "CREATE TABLE orders (key text PRIMARY KEY); GRANT ALL ON orders TO app",
    )
    .unwrap();
    let (proxy, url) = proxied(&pg, "sslmode=disable&application_name=anaive_lost");
    let pool = control_verified(&url).await;
    proxy.lose_before_forwarding(b"COMMIT");
    let mut worker = tokio::spawn({
        let pool = pool.clone();
        async move {
            // The field reports' loop: any error, sleep, try again, three times.
            let mut attempts = 0;
            let mut last = Err("not run".to_owned());
            for _ in 0..3 {
                attempts += 1;
                let mut conn = match pool.get().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        last = Err(e.to_string());
                        continue;
                    }
                };
                last = conn
                    .transaction::<_, diesel::result::Error, _>(async |c| {
                        diesel::sql_query("INSERT INTO orders (key) VALUES ('order-9')")
                            .execute(c)
                            .await
                    })
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string());
                if last.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (attempts, last)
        }
    });
    let waiting = tokio::time::timeout(Duration::from_secs(4), &mut worker).await;
    assert!(
        waiting.is_err(),
        "the naive retry was expected to wait behind the open transaction, got {waiting:?}"
    );
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'anaive_lost' AND wait_event_type = 'Lock'"
        )
        .await,
        1,
        "the retry waits on a lock"
    );
    drop(conn);
    // The server sees its client gone: the open transaction rolls back, the retry goes on.
    proxy.sever_silenced();
    let (attempts, last) = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the retry never ended after the open transaction rolled back")
        .expect("the naive loop panicked");
    println!("naive retry after the lost COMMIT: {attempts} attempts, {last:?}");
    assert_eq!(last, Ok(()));
    let mut conn = pool.get().await.unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM orders").await, 1);
}

/// The same for `commit_with_key`: the lost transaction holds the key's lock, which the
/// resolution's probe would wait for until the resolution timed out; ended, it releases it.
#[tokio::test]
async fn a_keyed_commit_lost_on_the_way_is_ended_on_the_server_then_retried_and_committed_once() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let app = "aretry_key_lost";
    let pool = pool_at(&url, app).await;
    let policy = RetryPolicy::builder()
        .verify_commit(false)
        .commit_resolution_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let bystanders = bystanders(&pg).await;
    let runs = AtomicU32::new(0);
    proxy.lose_before_forwarding(b"COMMIT");
    let out = commit_with_key(
        &pool,
        &policy,
        "order-lost",
        async |conn: &mut AsyncPgConnection| {
            runs.fetch_add(1, Ordering::Relaxed);
            diesel::sql_query("INSERT INTO ledger (note) VALUES ('keyed lost')")
                .execute(conn)
                .await
        },
    )
    .await;
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        matches!(out, Ok(Keyed::Committed(1))),
        "the lost COMMIT's outcome must be decided, not left ambiguous: {out:?}"
    );
    assert_eq!(AtomicU32::load(&runs, Ordering::Relaxed), 2);
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'keyed lost'"
        )
        .await,
        1
    );
    assert_none_left_idle_in_transaction(&mut conn, app).await;
    assert_bystanders_untouched(bystanders).await;
}

/// Behind a transaction-mode pooler the resolution's question may reach another server, where
/// the lost transaction's 32-bit id belongs to someone else's transaction: nothing is ended
/// there, and the lost keyed commit stays ambiguous (the pooler, which saw its client go,
/// rolls such a transaction back itself).
#[tokio::test]
async fn behind_a_transaction_mode_pooler_a_lost_keyed_commit_ends_no_session() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let app = "aretry_key_lost_pooled";
    let pool = PgPool::builder(&url)
        .pooler(pool_core::config::Pooler::Transaction)
        .application_name(app)
        .pool_size(2)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let policy = RetryPolicy::builder()
        .verify_commit(false)
        .commit_resolution_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    proxy.lose_before_forwarding(b"COMMIT");
    let started = std::time::Instant::now();
    // The key's lookup waits on the lost transaction's lock: only the resolution's bound
    // (1.5 s) ends that wait. A deadline of its own turns a missing bound into a failure.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        commit_with_key(
            &pool,
            &policy,
            "order-lost",
            async |conn: &mut AsyncPgConnection| {
                diesel::sql_query("INSERT INTO ledger (note) VALUES ('pooled lost')")
                    .execute(conn)
                    .await
            },
        ),
    )
    .await
    .expect("the keyed resolution waited 20 s on the lost transaction's lock");
    let took = started.elapsed();
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        matches!(out, Err(RetryError::AmbiguousCommit { .. })),
        "{out:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the resolution took {took:?} (commit_resolution_timeout 1.5 s)"
    );
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = '{app}' AND state = 'idle in transaction'"
            )
        )
        .await,
        1,
        "the lost transaction's session was ended behind a transaction-mode pooler"
    );
    proxy.sever_silenced();
}
