//! Reserved classes: automation saturates its class of a shared connection budget (more
//! threads than its share), and an ad-hoc query still gets in within its short timeout,
//! because the ad-hoc class's reserved floor is always there for it. Prints how long the
//! ad-hoc checkout took and the status report (per class and for the budget).
//!
//! ```text
//! cargo run --example reserved_classes                      # SQLite in a temp file
//! DATABASE_URL=postgres://... cargo run --example reserved_classes
//! ```
//!
//! The budget is 5 connections: automation may hold at most 3 (`pool_size` 3, no overflow:
//! its load is steady, so it keeps its 3 open instead of opening and closing an overflow
//! connection per job), ad-hoc work has 2 reserved. Eight automation threads want 8: five of
//! them queue inside their class, and never take the ad-hoc floor.

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use resilient_diesel::pool_core::url::{Backend, DatabaseUrl};
use resilient_diesel::{Class, ClassPools};

const TOTAL: u32 = 5;
const AUTOMATION_THREADS: usize = 8;
/// How long an automation job holds its connection.
const JOB: Duration = Duration::from_millis(100);
/// The ad-hoc query's checkout timeout: a person at a console, not a batch job.
const ADHOC_TIMEOUT: Duration = Duration::from_millis(250);

macro_rules! demo {
    ($conn:ty, $url:expr) => {{
        let pools = ClassPools::<$conn>::builder($url, TOTAL)
            // At most 3 of the 5: automation can never take the last 2.
            .class("automation", Class::new().pool_size(3).max_overflow(0))
            // Always 2. (Its checkouts below wait at most ADHOC_TIMEOUT; the class keeps the
            // default pool_timeout, which also bounds opening its floor at build.)
            .class("adhoc", Class::new().reserved(2))
            .configure(|b| b.application_name("reserved-classes-example"))
            .build()?;
        let pools = Arc::new(pools);

        // Automation: more threads than its share, each running jobs back to back.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..AUTOMATION_THREADS)
            .map(|_| {
                let (pools, stop) = (pools.clone(), stop.clone());
                thread::spawn(move || -> Result<u32, String> {
                    let pool = pools.class("automation").map_err(|e| e.to_string())?;
                    let mut jobs = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let mut conn = pool.get().map_err(|e| e.to_string())?;
                        diesel::sql_query("SELECT 1")
                            .execute(&mut conn)
                            .map_err(|e| e.to_string())?;
                        thread::sleep(JOB);
                        jobs += 1;
                    }
                    Ok(jobs)
                })
            })
            .collect();

        // Let automation saturate its class, then come in as a person would.
        let automation = pools.class("automation")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while automation.stats().waiters.unwrap_or(0) == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        // What automation looks like meanwhile, sampled over 200 ms.
        let (mut in_use, mut waiting) = (0, 0);
        let sampling = Instant::now();
        while sampling.elapsed() < Duration::from_millis(200) {
            let stats = automation.stats();
            in_use = in_use.max(stats.in_use);
            waiting = waiting.max(stats.waiters.unwrap_or(0));
            thread::sleep(Duration::from_millis(5));
        }
        println!(
            "automation: {in_use} of its 3 connections in use, {waiting} thread(s) waiting in \
             its queue (the most seen in 200 ms)"
        );
        println!("{}", pools.budget_snapshot());

        let started = Instant::now();
        let adhoc = pools.class("adhoc")?.get_timeout(ADHOC_TIMEOUT);
        let took = started.elapsed();
        match adhoc {
            Ok(mut conn) => {
                diesel::sql_query("SELECT 1").execute(&mut conn)?;
                println!(
                    "ad-hoc query got in: checkout took {:.2} ms (its timeout: {} ms), \
                     while automation was saturated",
                    took.as_secs_f64() * 1000.0,
                    ADHOC_TIMEOUT.as_millis(),
                );
            }
            Err(e) => println!(
                "ad-hoc query did NOT get in after {:.2} ms: {e}",
                took.as_secs_f64() * 1000.0
            ),
        }

        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let mut jobs = 0;
        for w in workers {
            jobs += w.join().map_err(|_| "automation thread panicked")??;
        }
        println!(
            "automation ran {jobs} jobs on {AUTOMATION_THREADS} threads, never more than 3 \
             connections at once\n"
        );
        println!("{}", pools.status());
    }};
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!(
        "resilient-diesel-reserved-classes-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => format!("sqlite://{}", dir.join("classes.db").display()),
    };
    let result = (|| -> Result<(), Box<dyn Error>> {
        match DatabaseUrl::parse(&url)?.backend() {
            Backend::Postgres => {
                println!("database: PostgreSQL (DATABASE_URL)");
                demo!(diesel::PgConnection, &url);
            }
            Backend::Sqlite => {
                println!("database: SQLite in a temp file (set DATABASE_URL for PostgreSQL)");
                demo!(diesel::SqliteConnection, &url);
            }
            other => return Err(format!("{other:?} is not supported by this example").into()),
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&dir).ok();
    result
}
