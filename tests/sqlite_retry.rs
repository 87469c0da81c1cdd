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
