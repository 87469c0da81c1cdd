//! Quickstart: build the extended pool sized to a small concurrent workload (each insert in
//! `commit_with_retry`), and, on PostgreSQL, terminate the pool's backends halfway through:
//! our pool reports 0 errors, a plain r2d2 pool at its defaults running the same workload
//! beside it surfaces the errors. Then the status report.
//!
//! ```text
//! cargo run --example quickstart                      # SQLite in a temp file
//! DATABASE_URL=postgres://... cargo run --example quickstart
//! ```
//!
//! Pool settings come from the environment (`DB_POOL_TIMEOUT`, `DB_POOL_RECYCLE`, ...), as in
//! the field reports' apps; `DB_POOL_SIZE` / `DB_MAX_OVERFLOW` override the sizes chosen here
//! for the workload. On PostgreSQL the example terminates only the backends it opened itself
//! (found by an `application_name` unique to this process) and writes to its own table,
//! `quickstart_events`.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Text};
use resilient_diesel::pool_core::url::Backend;
use resilient_diesel::retry::{commit_with_retry, RetryPolicy};
use resilient_diesel::{PgPool, PoolConfig, SqlitePool};

diesel::table! {
    quickstart_events (id) {
        id -> Text,
        payload -> Text,
    }
}

const CREATE: &str =
    "CREATE TABLE IF NOT EXISTS quickstart_events (id TEXT PRIMARY KEY, payload TEXT NOT NULL)";

/// The workload: `WORKERS` threads, each inserting `PER_WORKER` events, one transaction per
/// event, each transaction holding its connection for `WORK` (the handler's work inside it).
const WORKERS: usize = 4;
const PER_WORKER: usize = 25;
const TOTAL: usize = WORKERS * PER_WORKER;
const WORK: Duration = Duration::from_millis(10);

/// Pool sizes for this workload. Each worker holds one connection at a time and the
/// setup/count run before and after the workers, never beside them: 4 workers need 4
/// connections, so `pool_size` 4 (opened at build, kept) and `max_overflow` 0 (no burst to
/// absorb). The defaults (10 + 10) would open 10 for 4 threads of work, and a plain r2d2 pool
/// at its defaults opens 10 too (`min_idle` = `max_size` = 10).
const POOL_SIZE: u32 = WORKERS as u32;
const MAX_OVERFLOW: u32 = 0;

/// What one pool's run of the workload saw.
#[derive(Default)]
struct Outcome {
    inserted: AtomicUsize,
    done: AtomicUsize,
    errors: Mutex<BTreeMap<String, usize>>,
}

impl Outcome {
    fn error(&self, message: String) {
        *self.errors.lock().unwrap().entry(message).or_default() += 1;
    }

    fn error_count(&self) -> usize {
        self.errors.lock().unwrap().values().sum()
    }
}

/// Runs the workload on `pool` with one thread per worker, each insert through `insert`;
/// returns the threads' handles.
fn spawn_workers<P: Clone + Send + 'static>(
    pool: &P,
    prefix: &'static str,
    outcome: &Arc<Outcome>,
    insert: fn(&P, String) -> Result<(), String>,
) -> Vec<thread::JoinHandle<()>> {
    let run = std::process::id();
    (0..WORKERS)
        .map(|w| {
            let (pool, outcome) = (pool.clone(), outcome.clone());
            thread::spawn(move || {
                for i in 0..PER_WORKER {
                    match insert(&pool, format!("{prefix}-{run}-{w}-{i}")) {
                        Ok(()) => outcome.inserted.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            outcome.error(e);
                            0
                        }
                    };
                    outcome.done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// One event: a transaction retried on transient errors, never committed twice.
macro_rules! insert_with_retry {
    ($pool:expr, $id:expr) => {{
        commit_with_retry($pool, &RetryPolicy::default(), |conn| {
            let n = diesel::insert_into(quickstart_events::table)
                .values((
                    quickstart_events::id.eq(&$id),
                    quickstart_events::payload.eq("webhook received"),
                ))
                .execute(conn)?;
            thread::sleep(WORK); // the handler's work, inside the transaction
            Ok::<_, diesel::result::Error>(n)
        })
        .map(drop)
        .map_err(|e| $pool.config().redact(&e.to_string()))
    }};
}

fn ours_pg(pool: &PgPool, id: String) -> Result<(), String> {
    insert_with_retry!(pool, id)
}

fn ours_sqlite(pool: &SqlitePool, id: String) -> Result<(), String> {
    insert_with_retry!(pool, id)
}

type PlainPool = r2d2::Pool<ConnectionManager<PgConnection>>;

/// The same event as applications write it without this crate: one transaction, no retry.
fn plain_pg(pool: &PlainPool, id: String) -> Result<(), String> {
    let mut conn = pool.get().map_err(|e| format!("checkout: {e}"))?;
    conn.transaction(|conn| {
        diesel::insert_into(quickstart_events::table)
            .values((
                quickstart_events::id.eq(&id),
                quickstart_events::payload.eq("webhook received"),
            ))
            .execute(conn)?;
        thread::sleep(WORK);
        Ok::<_, diesel::result::Error>(())
    })
    .map_err(|e| e.to_string())
}

#[derive(QueryableByName)]
struct Terminated {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!(
        "resilient-diesel-quickstart-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let fallback = format!("sqlite://{}", dir.join("quickstart.db").display());
    let mut config = PoolConfig::from_env_or(&fallback)?;
    if std::env::var_os("DB_POOL_SIZE").is_none() {
        config.pool_size = POOL_SIZE;
    }
    if std::env::var_os("DB_MAX_OVERFLOW").is_none() {
        config.max_overflow = MAX_OVERFLOW;
    }
    println!(
        "workload: {WORKERS} threads x {PER_WORKER} inserts, one transaction each; \
         pool_size {} + max_overflow {}",
        config.pool_size, config.max_overflow
    );
    let result = match config.url.backend() {
        Backend::Postgres => postgres(config),
        Backend::Sqlite => sqlite(config),
        other => Err(format!("{other:?} is not supported by this example yet").into()),
    };
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn sqlite(config: PoolConfig) -> Result<(), Box<dyn Error>> {
    println!("database: SQLite in a temp file (set DATABASE_URL=postgres://... for PostgreSQL)");
    println!(
        "not shown on SQLite: a lost server. SQLite is a file in this process, with no server \
         to terminate connections, restart or drop them idle; run against PostgreSQL to see \
         the pool's backends terminated halfway through and 0 errors.\n"
    );
    let pool = SqlitePool::from_config(config)?;
    diesel::sql_query(CREATE).execute(&mut pool.get()?)?;
    let ours = Arc::new(Outcome::default());
    for w in spawn_workers(&pool, "ours", &ours, ours_sqlite) {
        w.join().map_err(|_| "worker panicked")?;
    }
    report("ours (commit_with_retry)", &ours);
    let total: i64 = quickstart_events::table
        .count()
        .get_result(&mut pool.get()?)?;
    println!("the table now holds {total} events\n");
    println!("{}", pool.status());
    Ok(())
}

fn postgres(mut config: PoolConfig) -> Result<(), Box<dyn Error>> {
    println!("database: PostgreSQL (DATABASE_URL)");
    let url = config.url.expose_secret().to_owned();
    // Names unique to this process: the terminate below must hit our backends and nobody
    // else's (an application_name written in the URL would win over ours; then nothing is
    // found and the fault is skipped).
    let ours_name = format!("quickstart-{}", std::process::id());
    let plain_name = format!("quickstart-plain-{}", std::process::id());
    config.connect.application_name = Some(ours_name.clone());
    let sep = if url.contains('?') { '&' } else { '?' };
    let plain_url = format!("{url}{sep}application_name={plain_name}");

    let pool = PgPool::from_config(config.clone())?;
    diesel::sql_query(CREATE).execute(&mut pool.get()?)?;
    // The control: r2d2 at its defaults, as applications build it (max_size 10, a
    // `SELECT 1` before every checkout).
    let plain: PlainPool = r2d2::Pool::builder().build(ConnectionManager::new(plain_url))?;
    let mut admin = PgConnection::establish(&url)
        .map_err(|e| format!("admin connection: {}", config.redact(&e.to_string())))?;

    let started = Instant::now();
    let ours = Arc::new(Outcome::default());
    let theirs = Arc::new(Outcome::default());
    let mut workers = spawn_workers(&pool, "ours", &ours, ours_pg);
    workers.extend(spawn_workers(&plain, "plain", &theirs, plain_pg));

    // Halfway through, terminate every backend of both pools at once, from the separate
    // admin connection.
    while ours.done.load(Ordering::Relaxed) < TOTAL / 2
        && started.elapsed() < Duration::from_secs(20)
    {
        thread::sleep(Duration::from_millis(2));
    }
    let terminated: Vec<Terminated> = diesel::sql_query(
        "SELECT application_name AS name, count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n \
         FROM pg_stat_activity WHERE application_name IN ($1, $2) AND pid <> pg_backend_pid() \
         GROUP BY application_name",
    )
    .bind::<Text, _>(&ours_name)
    .bind::<Text, _>(&plain_name)
    .load(&mut admin)
    .map_err(|e| config.redact(&e.to_string()))?;
    let count = |name: &str| {
        terminated
            .iter()
            .find(|t| t.name == name)
            .map_or(0, |t| t.n)
    };
    println!(
        "after {} of {TOTAL} inserts: terminated {} backend(s) of ours and {} of plain r2d2 \
         (pg_terminate_backend, as a failover, a proxy restart or an idle-session timeout would)\n",
        ours.done.load(Ordering::Relaxed),
        count(&ours_name),
        count(&plain_name),
    );
    if count(&ours_name) == 0 {
        println!("(no backend of ours found: is application_name set in DATABASE_URL?)\n");
    }
    for w in workers {
        w.join().map_err(|_| "worker panicked")?;
    }

    report("ours (commit_with_retry)", &ours);
    report(
        "plain r2d2 at its defaults (conn.transaction(), as apps write it)",
        &theirs,
    );
    println!(
        "\nThe plain pool's errors are the transactions whose connection was terminated under \
         them (its SELECT 1 before every checkout protects only idle connections). Ours \
         retried them on fresh connections (commit_with_retry: transient errors only, never \
         committing twice) and closed the broken connections at checkin instead of putting \
         them back: see Retries and Connections in the status below.\n"
    );
    let total: i64 = quickstart_events::table
        .count()
        .get_result(&mut pool.get()?)?;
    println!("the table now holds {total} events\n");
    println!("{}", pool.status());
    Ok(())
}

fn report(who: &str, outcome: &Outcome) {
    let errors = outcome.error_count();
    println!(
        "{who}: {} of {TOTAL} inserted, {errors} errors",
        outcome.inserted.load(Ordering::Relaxed)
    );
    for (message, n) in outcome.errors.lock().unwrap().iter() {
        println!("    {n} x {}", message.trim());
    }
}
