//! Quickstart: build the extended pool, run a small concurrent workload (each insert in
//! `commit_with_retry`), print the status.
//!
//! ```text
//! cargo run --example quickstart                      # SQLite in a temp file
//! DATABASE_URL=postgres://... cargo run --example quickstart
//! ```
//!
//! Pool settings come from the environment (`DB_POOL_SIZE`, `DB_MAX_OVERFLOW`,
//! `DB_POOL_TIMEOUT`, `DB_POOL_RECYCLE`, ...), as in the field reports' apps.

use std::error::Error;
use std::thread;

use diesel::prelude::*;
use resilient_diesel::retry::{commit_with_retry, RetryPolicy};
use resilient_diesel::{PgPool, PoolConfig, SqlitePool};

diesel::table! {
    events (id) {
        id -> Text,
        payload -> Text,
    }
}

const CREATE: &str =
    "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, payload TEXT NOT NULL)";

/// The same workload for any backend: 4 threads x 25 inserts, then a count.
macro_rules! workload {
    ($pool:expr) => {{
        let pool = $pool;
        diesel::sql_query(CREATE).execute(&mut pool.get()?)?;
        let run = std::process::id();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let pool = pool.clone();
                thread::spawn(move || -> Result<(), String> {
                    let policy = RetryPolicy::default();
                    for i in 0..25 {
                        // One transaction per event, retried on transient errors, never
                        // committed twice.
                        commit_with_retry(&pool, &policy, |conn| {
                            diesel::insert_into(events::table)
                                .values((
                                    events::id.eq(format!("{run}-{w}-{i}")),
                                    events::payload.eq("webhook received"),
                                ))
                                .execute(conn)
                        })
                        .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "worker panicked")??;
        }
        let total: i64 = events::table.count().get_result(&mut pool.get()?)?;
        println!("inserted 100 events; the table now holds {total}\n");
        println!("{}", pool.status());
    }};
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!(
        "resilient-diesel-quickstart-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let fallback = format!("sqlite://{}", dir.join("quickstart.db").display());
    let config = PoolConfig::from_env_or(&fallback)?;
    println!("database: {}", config.url);
    match config.url.backend() {
        resilient_diesel::pool_core::url::Backend::Postgres => {
            workload!(PgPool::from_config(config.clone())?)
        }
        resilient_diesel::pool_core::url::Backend::Sqlite => {
            workload!(SqlitePool::from_config(config.clone())?)
        }
        other => return Err(format!("{other:?} is not supported by this example yet").into()),
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
