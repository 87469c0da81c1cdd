//! The retry functions on SQLite, with the idempotency table created by the crate's migration.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use resilient_diesel::retry::{
    commit_with_key, commit_with_retry, with_retry, Keyed, RetryError, RetryPolicy, RetryablePool,
};
use resilient_diesel::SqlitePool;

const MIGRATION: &str = include_str!("../migrations/2026-11-23-000000_idempotency_keys/up.sql");

fn pool() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let pool = SqlitePool::builder(&url)
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "{MIGRATION}; CREATE TABLE ledger (id INTEGER PRIMARY KEY, note TEXT NOT NULL UNIQUE);"
        ))
        .unwrap();
    (dir, pool)
}

fn rows(pool: &SqlitePool) -> i64 {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM ledger)",
    ))
    .get_result(&mut *pool.get().unwrap())
    .unwrap()
}

#[test]
fn a_keyed_transaction_runs_once_however_often_it_is_called() {
    let (_dir, pool) = pool();
    let runs = AtomicU32::new(0);
    let body = |conn: &mut SqliteConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('job-7')").execute(conn)
    };
    let policy = RetryPolicy::default();
    assert_eq!(
        commit_with_key(&pool, &policy, "job-7", body).unwrap(),
        Keyed::Committed(1)
    );
    for _ in 0..3 {
        assert_eq!(
            commit_with_key(&pool, &policy, "job-7", body).unwrap(),
            Keyed::AlreadyCommitted
        );
    }
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    assert_eq!(rows(&pool), 1);
}

#[test]
fn a_failed_keyed_transaction_leaves_no_key_behind() {
    let (_dir, pool) = pool();
    let policy = RetryPolicy::default();
    pool.get()
        .unwrap()
        .batch_execute("INSERT INTO ledger (note) VALUES ('taken')")
        .unwrap();
    let out = commit_with_key(&pool, &policy, "job-8", |conn: &mut SqliteConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('taken')").execute(conn)
    });
    assert!(matches!(out, Err(RetryError::Permanent(_))), "{out:?}");
    // The key was rolled back with the work: a corrected retry runs.
    let out = commit_with_key(&pool, &policy, "job-8", |conn: &mut SqliteConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('free')").execute(conn)
    });
    assert_eq!(out.unwrap(), Keyed::Committed(1));
}

#[test]
fn commit_with_retry_commits_on_sqlite_and_rolls_back_on_error() {
    let (_dir, pool) = pool();
    let policy = RetryPolicy::default();
    commit_with_retry(&pool, &policy, |conn: &mut SqliteConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('a')").execute(conn)
    })
    .unwrap();
    let out = commit_with_retry(&pool, &policy, |conn: &mut SqliteConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('b')").execute(conn)?;
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('a')").execute(conn)
    });
    assert!(matches!(out, Err(RetryError::Permanent(_))));
    assert_eq!(rows(&pool), 1, "the failed transaction was rolled back");
}

/// A policy's own idempotency table (`schema.table` in PostgreSQL; here a plain name) is the
/// one `commit_with_key` writes to and looks keys up in; the default table stays untouched.
#[test]
fn keys_go_to_the_table_the_policy_names() {
    let (_dir, pool) = pool();
    let policy = RetryPolicy::builder()
        .idempotency_table("webhook_keys")
        .build()
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&policy.idempotency_table().create_sql())
        .unwrap();
    let body = |conn: &mut SqliteConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('hook')").execute(conn)
    };
    assert_eq!(
        commit_with_key(&pool, &policy, "stripe:evt_1", body).unwrap(),
        Keyed::Committed(1)
    );
    assert_eq!(
        commit_with_key(&pool, &policy, "stripe:evt_1", body).unwrap(),
        Keyed::AlreadyCommitted
    );
    let count = |table: &str| -> i64 {
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "(SELECT count(*) FROM {table})"
        )))
        .get_result(&mut *pool.get().unwrap())
        .unwrap()
    };
    assert_eq!(count("webhook_keys"), 1);
    assert_eq!(count("resilient_diesel_idempotency_keys"), 0);
    // A name that would need quoting (or inject SQL) is refused when the policy is built.
    let err = RetryPolicy::builder()
        .idempotency_table("keys; DROP TABLE ledger")
        .build()
        .unwrap_err();
    assert_eq!(err.setting, "idempotency_table");
}

/// An empty or over-long key is refused before any round trip, as a permanent error that
/// says why; the body never runs.
#[test]
fn keys_longer_than_the_column_are_refused_up_front() {
    let (_dir, pool) = pool();
    let policy = RetryPolicy::default();
    let runs = AtomicU32::new(0);
    let body = |conn: &mut SqliteConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('x')").execute(conn)
    };
    for key in [String::new(), "k".repeat(256)] {
        match commit_with_key(&pool, &policy, &key, body) {
            Err(RetryError::Permanent(e)) => {
                let shown = e.to_string();
                assert!(shown.contains("idempotency key"), "{shown}");
            }
            other => panic!("a key of {} characters: {other:?}", key.len()),
        }
    }
    assert_eq!(runs.load(Ordering::Relaxed), 0);
    let longest = "é".repeat(255);
    assert_eq!(
        commit_with_key(&pool, &policy, &longest, body).unwrap(),
        Keyed::Committed(1)
    );
}

/// Holds `pool`'s only connection on another thread for `held`, returning once it is taken.
fn hold_the_only_connection<P>(pool: &P, held: Duration) -> std::thread::JoinHandle<()>
where
    P: RetryablePool + Clone + Send + 'static,
    P::Guard: Send,
{
    let (taken, was_taken) = mpsc::channel();
    let pool = pool.clone();
    let holder = std::thread::spawn(move || {
        let guard = pool.checkout().expect("the holder's checkout");
        taken.send(()).unwrap();
        std::thread::sleep(held);
        drop(guard);
    });
    was_taken
        .recv_timeout(Duration::from_secs(10))
        .expect("the holder took the connection within 10 s");
    holder
}

/// An attempt's checkout waits as long as the pool's own checkout would (the extended pool's
/// `pool_timeout`, r2d2's `connection_timeout`) when the loop has no `max_elapsed` shorter:
/// a pool whose one connection is busy for a moment serves a call with no retries once the
/// connection is back, on both pools.
#[test]
fn an_attempts_checkout_waits_as_long_as_the_pools_own_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db").display().to_string();
    let ours = SqlitePool::builder(&format!("sqlite://{path}"))
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let plain = r2d2::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(10))
        .build(diesel::r2d2::ConnectionManager::<SqliteConnection>::new(
            path.as_str(),
        ))
        .unwrap();
    assert_eq!(ours.pool_timeout(), Duration::from_secs(10));
    assert_eq!(RetryablePool::pool_timeout(&plain), Duration::from_secs(10));
    let no_retry = RetryPolicy::no_retry();
    let select_one = |conn: &mut SqliteConnection| diesel::sql_query("SELECT 1").execute(conn);
    let holder = hold_the_only_connection(&ours, Duration::from_millis(300));
    let out = with_retry(&ours, &no_retry, select_one);
    assert!(
        out.is_ok(),
        "our pool: the attempt's checkout did not wait for the busy connection: {out:?}"
    );
    holder.join().unwrap();
    let holder = hold_the_only_connection(&plain, Duration::from_millis(300));
    let out = with_retry(&plain, &no_retry, select_one);
    assert!(
        out.is_ok(),
        "plain r2d2: the attempt's checkout did not wait for the busy connection: {out:?}"
    );
    holder.join().unwrap();
}

/// A key insert that fails for any reason other than the key's unique violation (here: the
/// idempotency table was never created) is returned as that error, never taken for "already
/// committed", which would drop the body's write without a word.
#[test]
fn a_key_insert_failing_for_another_reason_is_an_error_not_already_committed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let pool = SqlitePool::builder(&url).pool_size(1).build().unwrap();
    let runs = AtomicU32::new(0);
    let out = commit_with_key(
        &pool,
        &RetryPolicy::default(),
        "job-9",
        |_: &mut SqliteConnection| {
            runs.fetch_add(1, Ordering::Relaxed);
            Ok::<_, diesel::result::Error>(())
        },
    );
    match out {
        Err(RetryError::Permanent(e)) => assert!(
            e.to_string().contains("no such table"),
            "the error says what failed: {e}"
        ),
        other => panic!("no idempotency table: expected the insert's error, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::Relaxed), 0, "the body never ran");
}
