//! The retry functions on SQLite, with the idempotency table created by the crate's migration.

use std::sync::atomic::{AtomicU32, Ordering};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use resilient_diesel::retry::{commit_with_key, commit_with_retry, Keyed, RetryError, RetryPolicy};
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
