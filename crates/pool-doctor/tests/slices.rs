//! Budget slices across replicas: two processes share one private server under one total,
//! each running a sync `ClassPools` built from the slice `pool-doctor size` computed, both
//! under heavy load with a reserved class. `pg_stat_activity` is sampled throughout.
//!
//! The replicas are this test binary run again (`replica_child`, which does nothing unless
//! `POOL_DOCTOR_REPLICA` is set).

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{doctor, run, server};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_r2d2_ext::{Class, ClassPools};
use test_support::PgOptions;

const APP: &str = "slice-test";
const CHILD_ENV: &str = "POOL_DOCTOR_REPLICA";
/// How long each replica runs its load.
const LOAD: Duration = Duration::from_secs(4);
/// The reserved class's checkout timeout: every ad-hoc checkout must get in within it.
const ADHOC_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[test]
fn two_replicas_sliced_by_size_never_exceed_the_total_and_keep_their_reserved_class() {
    let Some(pg) = server(PgOptions::new().conf("max_connections = 30")) else {
        return;
    };
    let url = pg.url_with("sslmode=disable");
    // What one replica declares: automation wants 40 (more than the server has), ad-hoc
    // work keeps 2 for itself.
    let out = run(doctor(
        &[
            "size",
            "--json",
            "--replicas",
            "2",
            "--url",
            &url,
            "--app",
            APP,
            "--class",
            "automation:pool_size=40",
            "--class",
            "adhoc:reserved=2",
        ],
        &[],
    ));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let json = out.json();
    let slice = &json["slice"];
    let total = slice["total"].as_u64().unwrap();
    let per_replica = slice["per_replica"].as_u64().unwrap();
    // 30 - 3 superuser_reserved, less whatever else was connected at that moment.
    assert!((20..=27).contains(&total), "{json}");
    assert_eq!(per_replica, total / 2, "{json}");
    let adhoc = &slice["classes"][1];
    assert_eq!(
        (adhoc["name"].as_str(), adhoc["reserved"].as_u64()),
        (Some("adhoc"), Some(2))
    );
    let text = run(doctor(
        &[
            "size",
            "--replicas",
            "2",
            "--url",
            &url,
            "--app",
            APP,
            "--class",
            "automation:pool_size=40",
            "--class",
            "adhoc:reserved=2",
        ],
        &[],
    ));
    println!("{}", text.stdout);

    // Sample the server throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_seen) = (stop.clone(), max_seen.clone());
        let admin = pg.superuser_url();
        std::thread::spawn(move || {
            let mut conn = PgConnection::establish(&admin).expect("sampler");
            let mut samples = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let c: Count = match diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{APP}'"
                ))
                .get_result(&mut conn)
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("sampler stopped: {e}");
                        break;
                    }
                };
                max_seen.fetch_max(u64::try_from(c.n).unwrap_or(0), Ordering::SeqCst);
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    };

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "replica_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(
                    CHILD_ENV,
                    serde_json::json!({ "url": url, "slice": slice, "replica": i }).to_string(),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning a replica")
        })
        .collect();
    let results: Vec<serde_json::Value> = children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("replica");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "replica failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = stdout
                .lines()
                .find_map(|l| l.split_once("REPLICA_RESULT ").map(|(_, r)| r))
                .unwrap_or_else(|| panic!("no result in:\n{stdout}"));
            serde_json::from_str(line).unwrap()
        })
        .collect();
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let max_seen = max_seen.load(Ordering::SeqCst);
    println!("samples {samples}, most backends seen {max_seen} (total {total}, per replica {per_replica}); replicas: {results:?}");

    assert!(samples > 20, "too few samples: {samples}");
    assert!(max_seen <= total, "the server saw {max_seen} > {total}");
    assert!(
        max_seen <= 2 * per_replica,
        "the server saw {max_seen} > 2 × {per_replica}"
    );
    // The load was real: together the replicas held more than one slice.
    assert!(
        max_seen > per_replica,
        "load never exceeded one slice: {max_seen}"
    );
    for r in &results {
        assert_eq!(r["adhoc_failed"], 0, "{r}");
        assert!(r["adhoc_ok"].as_u64().unwrap() >= 5, "{r}");
        assert!(
            r["adhoc_max_ms"].as_u64().unwrap() < ADHOC_TIMEOUT.as_millis() as u64,
            "{r}"
        );
        assert!(r["automation_done"].as_u64().unwrap() > 0, "{r}");
    }
}

/// One replica: `ClassPools` from the slice, automation hammered by more threads than it may
/// hold, ad-hoc checkouts every 100 ms that must each get in within `ADHOC_TIMEOUT`.
#[test]
fn replica_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // run directly: nothing to do
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let slice = &spec["slice"];
    let per_replica = u32::try_from(slice["per_replica"].as_u64().unwrap()).unwrap();
    let mut builder =
        ClassPools::<PgConnection>::builder(spec["url"].as_str().unwrap(), per_replica)
            .configure(|b| b.application_name(APP));
    for c in slice["classes"].as_array().unwrap() {
        let n = |k: &str| u32::try_from(c[k].as_u64().unwrap()).unwrap();
        let mut class = Class::new()
            .reserved(n("reserved"))
            .pool_size(n("pool_size"))
            .max_overflow(n("max_overflow"));
        if c["name"] == "adhoc" {
            class = class.pool_timeout(ADHOC_TIMEOUT);
        }
        builder = builder.class(c["name"].as_str().unwrap(), class);
    }
    let pools = Arc::new(builder.build().expect("building the replica's pools"));
    let deadline = Instant::now() + LOAD;
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..24)
        .map(|_| {
            let (pools, done) = (pools.clone(), done.clone());
            std::thread::spawn(move || {
                let automation = pools.class("automation").unwrap();
                while Instant::now() < deadline {
                    if let Ok(mut conn) = automation.get() {
                        if diesel::sql_query("SELECT pg_sleep(0.02)")
                            .execute(&mut *conn)
                            .is_ok()
                        {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    let adhoc = pools.class("adhoc").unwrap();
    let (mut ok, mut failed, mut max_ms) = (0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    while Instant::now() < deadline {
        let started = Instant::now();
        match adhoc.get().map_err(|e| e.to_string()).and_then(|mut conn| {
            diesel::sql_query("SELECT 1")
                .execute(&mut *conn)
                .map_err(|e| e.to_string())
        }) {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                errors.push(e);
            }
        }
        max_ms = max_ms.max(started.elapsed().as_millis() as u64);
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in workers {
        w.join().unwrap();
    }
    println!(
        "REPLICA_RESULT {}",
        serde_json::json!({
            "replica": spec["replica"],
            "adhoc_ok": ok,
            "adhoc_failed": failed,
            "adhoc_max_ms": max_ms,
            "adhoc_errors": errors,
            "automation_done": done.load(Ordering::SeqCst),
        })
    );
}
