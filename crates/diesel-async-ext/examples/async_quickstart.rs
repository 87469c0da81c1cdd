//! Quickstart for the async pool: build it from the environment, run a small concurrent
//! workload (each insert in `commit_with_retry`), print the status.
//!
//! ```text
//! cargo run -p diesel-async-ext --example async_quickstart                      # SQLite in a temp file
//! DATABASE_URL=postgres://... cargo run -p diesel-async-ext --example async_quickstart
//! ```
//!
//! Pool settings come from the environment (`DB_POOL_SIZE`, `DB_MAX_OVERFLOW`,
//! `DB_POOL_TIMEOUT`, `DB_POOL_RECYCLE`, ...), as for the sync pool.

use std::error::Error;

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use diesel_async_ext::pool_core::config::PoolConfig;
use diesel_async_ext::pool_core::url::Backend;
use diesel_async_ext::retry::{commit_with_retry, RetryPolicy};
use diesel_async_ext::{PgPool, SqlitePool};

const CREATE: &str =
    "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, payload TEXT NOT NULL)";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The same workload for any backend: 4 tasks x 25 inserts, then a count.
macro_rules! workload {
    ($pool:expr) => {{
        let pool = $pool;
        diesel::sql_query(CREATE)
            .execute(&mut pool.get().await?)
            .await?;
        let run = std::process::id();
        let tasks: Vec<_> = (0..4)
            .map(|w| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let policy = RetryPolicy::default();
                    for i in 0..25 {
                        let id = format!("{run}-{w}-{i}");
                        // One transaction per event, retried on transient errors, never
                        // committed twice.
                        commit_with_retry(&pool, &policy, async |conn| {
                            diesel::sql_query("INSERT INTO events (id, payload) VALUES ($1, $2)")
                                .bind::<Text, _>(&id)
                                .bind::<Text, _>("webhook received")
                                .execute(conn)
                                .await
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let total = diesel::sql_query("SELECT count(*) AS n FROM events")
            .get_result::<Count>(&mut pool.get().await?)
            .await?
            .n;
        println!("inserted 100 events; the table now holds {total}\n");
        println!("{}", pool.status());
    }};
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!(
        "resilient-diesel-async-quickstart-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let fallback = format!("sqlite://{}", dir.join("quickstart.db").display());
    let config = PoolConfig::from_env_or(&fallback)?;
    println!("database: {}", config.url);
    match config.url.backend() {
        Backend::Postgres => workload!(PgPool::from_config(config.clone()).await?),
        Backend::Sqlite => workload!(SqlitePool::from_config(config.clone()).await?),
        other => return Err(format!("{other:?} is not supported by this example").into()),
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
