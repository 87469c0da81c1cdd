//! What `commit_with_retry` costs when nothing fails, and what it buys when everything
//! conflicts. Runs against a private PostgreSQL server (started from the installed binaries);
//! every figure is compared with its baseline in the same run.
//!
//! ```sh
//! cargo bench --bench retry
//! ```
//!
//! 1. Overhead: one-row `UPDATE` transactions on one connection checked out per operation,
//!    as a plain `conn.transaction()` and as `commit_with_retry` with commit verification off
//!    and on. Rounds alternate between the three so drift hits all alike; the median round
//!    is reported, with the overhead of verification in `SELECT 1` round trips.
//! 2. Goodput: 8 threads incrementing one counter at SERIALIZABLE for a fixed time, with
//!    `commit_with_retry` vs. the field reports' loop (any error: sleep 1 s, at most 3 tries).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use resilient_diesel::retry::{commit_with_retry, RetryPolicy};
use resilient_diesel::PgPool;
use test_support::PgServer;

const OPS_PER_ROUND: u32 = 500;
const ROUNDS: usize = 9;

fn update(conn: &mut PgConnection) -> QueryResult<usize> {
    diesel::sql_query("UPDATE bench SET v = v + 1 WHERE id = 1").execute(conn)
}

fn per_op(f: &mut dyn FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..OPS_PER_ROUND {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(OPS_PER_ROUND)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn overhead(pool: &PgPool) {
    let off = RetryPolicy::builder().verify_commit(false).build().unwrap();
    let on = RetryPolicy::default();
    let mut plain = Vec::new();
    let mut ours_off = Vec::new();
    let mut ours_on = Vec::new();
    let mut rtt = Vec::new();
    // Warm-up.
    for _ in 0..200 {
        commit_with_retry(pool, &on, update).unwrap();
    }
    for _ in 0..ROUNDS {
        plain.push(per_op(&mut || {
            let mut conn = pool.get().unwrap();
            (*conn).transaction(update).unwrap();
        }));
        ours_off.push(per_op(&mut || {
            commit_with_retry(pool, &off, update).unwrap();
        }));
        ours_on.push(per_op(&mut || {
            commit_with_retry(pool, &on, update).unwrap();
        }));
        let mut held = pool.get().unwrap();
        rtt.push(per_op(&mut || {
            diesel::select(diesel::dsl::sql::<BigInt>("1::bigint"))
                .get_result::<i64>(&mut *held)
                .unwrap();
        }));
    }
    let (plain, off, on, rtt) = (
        median(plain),
        median(ours_off),
        median(ours_on),
        median(rtt),
    );
    println!("## Overhead without failures ({ROUNDS} rounds x {OPS_PER_ROUND} transactions, median round)");
    println!("| variant | µs/transaction | ratio vs conn.transaction() |");
    println!("|---|---|---|");
    println!("| conn.transaction() | {:.1} | 1.000 |", plain / 1e3);
    println!(
        "| commit_with_retry, verify_commit off | {:.1} | {:.3} |",
        off / 1e3,
        off / plain
    );
    println!(
        "| commit_with_retry, verify_commit on | {:.1} | {:.3} |",
        on / 1e3,
        on / plain
    );
    println!(
        "verification costs {:.1} µs = {:.2} round trips (one SELECT 1 on a held connection takes {:.1} µs)\n",
        (on - plain) / 1e3,
        (on - plain) / rtt,
        rtt / 1e3
    );
}

fn increment(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(conn)?;
    let v: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT v FROM counter WHERE id = 1)",
    ))
    .get_result(conn)?;
    diesel::sql_query(format!("UPDATE counter SET v = {} WHERE id = 1", v + 1)).execute(conn)?;
    Ok(())
}

/// The field reports' loop: any error, sleep a second, at most three tries.
fn fixed_delay(pool: &PgPool) -> bool {
    for attempt in 0..3 {
        let mut conn = pool.get().unwrap();
        if (*conn).transaction(increment).is_ok() {
            return true;
        }
        if attempt < 2 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    false
}

fn goodput(
    pool: &PgPool,
    label: &str,
    run: impl Fn(&PgPool) -> bool + Send + Sync + 'static,
) -> f64 {
    let run = Arc::new(run);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let window = Duration::from_secs(6);
    let start = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (pool, run, stop, done, failed) = (
                pool.clone(),
                run.clone(),
                stop.clone(),
                done.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if run(&pool) {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = done.load(Ordering::Relaxed) as f64 / secs;
    println!(
        "| {label} | {} | {} | {secs:.1} | {rate:.0} |",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    rate
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list here.
    }
    let pg = PgServer::start().expect("a private PostgreSQL server for the benchmark");
    pg.execute(
        "CREATE TABLE bench (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO bench VALUES (1, 0); \
         CREATE TABLE counter (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO counter VALUES (1, 0); \
         GRANT ALL ON bench, counter TO app",
    )
    .unwrap();
    let pool = PgPool::builder(&pg.url_with("sslmode=disable"))
        .application_name("bench_retry")
        .pool_size(8)
        .max_overflow(0)
        .build()
        .unwrap();
    overhead(&pool);

    println!("## Goodput: 8 threads, one SERIALIZABLE counter, 6 s each");
    println!("| loop | committed | given up | seconds | committed/s |");
    println!("|---|---|---|---|---|");
    let policy = RetryPolicy::builder()
        .max_attempts(50)
        .base_delay(Duration::from_millis(2))
        .max_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let ours = goodput(
        &pool,
        "commit_with_retry (default backoff, 50 attempts)",
        move |p| commit_with_retry(p, &policy, increment).is_ok(),
    );
    let naive = goodput(&pool, "fixed 1 s delay, 3 tries", fixed_delay);
    println!(
        "goodput ratio (ours / fixed-delay): {:.1}x",
        ours / naive.max(f64::MIN_POSITIVE)
    );
}
