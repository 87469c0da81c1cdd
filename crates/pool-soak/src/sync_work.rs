//! The sync writers: our `ClassPools` (through `commit_with_retry` / `commit_with_key`) with
//! its ad-hoc probe, and the plain r2d2 control with the field reports' naive retry loop.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{Integer, Text};
use resilient_diesel::{commit_with_key, commit_with_retry, ClassPools, Keyed, RetryError};

use crate::ledger::{Tally, INSERT_SQL};
use crate::{Settings, Shared};

/// Our sync pools for one route.
pub type OursSync = Arc<ClassPools<PgConnection>>;

/// A plain r2d2 pool at its defaults.
pub type PlainR2d2 = r2d2::Pool<ConnectionManager<PgConnection>>;

/// Inserts one ledger row.
pub fn insert(conn: &mut PgConnection, key: &str, writer: &str, n: i32) -> QueryResult<()> {
    diesel::sql_query(INSERT_SQL)
        .bind::<Text, _>(key)
        .bind::<Text, _>(writer)
        .bind::<Integer, _>(n)
        .execute(conn)
        .map(drop)
}

/// Builds our sync class pools for `url`: an automation class capped at the whole budget and
/// an ad-hoc class with a reserved floor and its own timeout.
pub fn build_ours(url: &str, app: &str, s: &Settings) -> Result<OursSync, String> {
    let pools = ClassPools::<PgConnection>::builder(url, s.budget)
        .class(
            "automation",
            resilient_diesel::Class::new()
                .pool_size(1)
                .max_overflow(s.budget - 1),
        )
        .class(
            "adhoc",
            resilient_diesel::Class::new()
                .reserved(s.adhoc_reserved)
                .pool_timeout(s.adhoc_timeout),
        )
        .configure(|b| {
            b.application_name(app)
                .pool_timeout(s.pool_timeout)
                .validation_timeout(s.validation_timeout)
                .connect_timeout(Some(s.connect_timeout))
        })
        .build()
        .map_err(|e| format!("building the sync class pools for {app}: {e}"))?;
    Ok(Arc::new(pools))
}

/// Starts `s.workers` automation writers (even ones `commit_with_retry`, odd ones
/// `commit_with_key`) and the ad-hoc probe.
pub fn spawn_ours(
    pools: &OursSync,
    route: &'static str,
    tally: &Arc<Tally>,
    shared: &Arc<Shared>,
    s: &Settings,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for w in 0..s.workers {
        let (pools, tally, shared, s) = (pools.clone(), tally.clone(), shared.clone(), s.clone());
        handles.push(std::thread::spawn(move || {
            let Ok(pool) = pools.class("automation") else {
                return;
            };
            let writer = format!("{}/{route}/w{w}", tally.system);
            let mut seq = 0i32;
            while !shared.stopping() {
                seq += 1;
                let key = format!("{writer}/{seq}");
                write_ours(pool, &s, w % 2 == 1, &key, &writer, seq, &tally, &shared);
                std::thread::sleep(s.think);
            }
        }));
    }
    let (pools, tally, shared, s) = (pools.clone(), tally.clone(), shared.clone(), s.clone());
    handles.push(std::thread::spawn(move || {
        let Ok(pool) = pools.class("adhoc") else {
            return;
        };
        let writer = format!("{}/{route}/probe", tally.system);
        let mut seq = 0i32;
        let mut next = Instant::now();
        while !shared.stopping() {
            seq += 1;
            let t = Instant::now();
            let got = pool.get();
            let took = t.elapsed();
            let miss = match got {
                Ok(mut conn) => {
                    let _ = diesel::sql_query("SELECT 1").execute(&mut *conn);
                    (took > s.adhoc_timeout).then(|| {
                        format!(
                            "{writer} at {} ms ({}): got in after {took:?}, over {:?}",
                            shared.elapsed_ms(),
                            shared.fault_label(),
                            s.adhoc_timeout
                        )
                    })
                }
                Err(e) => Some(format!(
                    "{writer} at {} ms ({}): no connection after {took:?}: {e}",
                    shared.elapsed_ms(),
                    shared.fault_label()
                )),
            };
            tally.probe(miss);
            let key = format!("{writer}/{seq}");
            write_ours(pool, &s, true, &key, &writer, seq, &tally, &shared);
            next += s.probe_every;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }));
    handles
}

#[allow(clippy::too_many_arguments)]
fn write_ours(
    pool: &resilient_diesel::ExtPool<PgConnection>,
    s: &Settings,
    keyed: bool,
    key: &str,
    writer: &str,
    n: i32,
    tally: &Tally,
    shared: &Shared,
) {
    let t = Instant::now();
    let result = if keyed {
        commit_with_key(pool, &s.policy, key, |conn| insert(conn, key, writer, n)).map(|k| {
            if matches!(k, Keyed::AlreadyCommitted) {
                tally.already_committed();
            }
        })
    } else {
        commit_with_retry(pool, &s.policy, |conn| insert(conn, key, writer, n))
    };
    match result {
        Ok(()) => tally.ack(key.to_owned(), t.elapsed()),
        Err(e) => {
            let ambiguous = matches!(e, RetryError::AmbiguousCommit { .. });
            tally.surfaced(shared.surfaced(writer, key, e.to_string()), ambiguous);
        }
    }
}

/// Builds a plain r2d2 pool at its defaults (`test_on_check_out(true)`, 10 connections,
/// 30 s timeout).
pub fn build_r2d2(url: &str) -> Result<PlainR2d2, String> {
    r2d2::Pool::builder()
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|e| format!("building the plain r2d2 pool: {e}"))
}

/// Starts `s.control_workers` writers on the plain r2d2 pool with the naive loop: any error
/// is retried, 3 tries, 1 s apart.
pub fn spawn_r2d2(
    pool: &PlainR2d2,
    route: &'static str,
    tally: &Arc<Tally>,
    shared: &Arc<Shared>,
    s: &Settings,
) -> Vec<JoinHandle<()>> {
    (0..s.control_workers)
        .map(|w| {
            let (pool, tally, shared, s) = (pool.clone(), tally.clone(), shared.clone(), s.clone());
            std::thread::spawn(move || {
                let writer = format!("{}/{route}/w{w}", tally.system);
                let mut seq = 0i32;
                while !shared.stopping() {
                    seq += 1;
                    let key = format!("{writer}/{seq}");
                    let t = Instant::now();
                    let mut last = String::new();
                    let mut ok = false;
                    for attempt in 1..=crate::NAIVE_TRIES {
                        let r = pool.get().map_err(|e| e.to_string()).and_then(|mut conn| {
                            conn.transaction(|c| insert(c, &key, &writer, seq))
                                .map_err(|e| e.to_string())
                        });
                        match r {
                            Ok(()) => {
                                ok = true;
                                break;
                            }
                            Err(e) => last = e,
                        }
                        if attempt < crate::NAIVE_TRIES {
                            std::thread::sleep(crate::NAIVE_PAUSE);
                        }
                    }
                    if ok {
                        tally.ack(key, t.elapsed());
                    } else {
                        tally.surfaced(shared.surfaced(&writer, &key, last), false);
                    }
                    std::thread::sleep(s.think);
                }
            })
        })
        .collect()
}

/// Checkouts still out: our pools' `in_use` over every class.
pub fn leaked_ours(pools: &OursSync) -> u64 {
    pools
        .classes()
        .map(|(_, p)| u64::from(p.stats().in_use))
        .sum()
}

/// Checkouts still out of a plain r2d2 pool.
pub fn leaked_r2d2(pool: &PlainR2d2) -> u64 {
    let state = pool.state();
    u64::from(state.connections.saturating_sub(state.idle_connections))
}

/// How long to wait for a pool to settle before reading its leak count.
pub const SETTLE: Duration = Duration::from_millis(200);
