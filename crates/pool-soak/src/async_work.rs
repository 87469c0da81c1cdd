//! The async writers: our async `ClassPools` (through `commit_with_retry` / `commit_with_key`)
//! with its ad-hoc probe, and the plain bb8 + diesel-async control with the naive retry loop.

use std::sync::Arc;
use std::time::Instant;

use diesel::sql_types::{Integer, Text};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{commit_with_key, commit_with_retry, ClassPools, Keyed, RetryError};
use tokio::task::JoinHandle;

use crate::ledger::{Tally, INSERT_SQL};
use crate::{Settings, Shared};

/// Our async pools for one route.
pub type OursAsync = ClassPools<AsyncPgConnection>;

/// A plain bb8 pool of diesel-async connections at its defaults.
pub type PlainBb8 = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// Inserts one ledger row.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    key: &str,
    writer: &str,
    n: i32,
) -> diesel::QueryResult<()> {
    diesel::sql_query(INSERT_SQL)
        .bind::<Text, _>(key)
        .bind::<Text, _>(writer)
        .bind::<Integer, _>(n)
        .execute(conn)
        .await
        .map(drop)
}

/// Builds our async class pools, shaped like the sync ones.
pub async fn build_ours(url: &str, app: &str, s: &Settings) -> Result<OursAsync, String> {
    ClassPools::<AsyncPgConnection>::builder(url, s.budget)
        .class(
            "automation",
            diesel_async_ext::Class::new()
                .pool_size(1)
                .max_overflow(s.budget - 1),
        )
        .class(
            "adhoc",
            diesel_async_ext::Class::new()
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
        .await
        .map_err(|e| format!("building the async class pools for {app}: {e}"))
}

/// Starts the automation writers and the ad-hoc probe as tasks.
pub fn spawn_ours(
    rt: &tokio::runtime::Runtime,
    pools: &OursAsync,
    route: &'static str,
    tally: &Arc<Tally>,
    shared: &Arc<Shared>,
    s: &Settings,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for w in 0..s.workers {
        let (pools, tally, shared, s) = (pools.clone(), tally.clone(), shared.clone(), s.clone());
        handles.push(rt.spawn(async move {
            let Ok(pool) = pools.class("automation") else {
                return;
            };
            let writer = format!("{}/{route}/w{w}", tally.system);
            let mut seq = 0i32;
            while !shared.stopping() {
                seq += 1;
                let key = format!("{writer}/{seq}");
                write_ours(pool, &s, w % 2 == 1, &key, &writer, seq, &tally, &shared).await;
                tokio::time::sleep(s.think).await;
            }
        }));
    }
    let (pools, tally, shared, s) = (pools.clone(), tally.clone(), shared.clone(), s.clone());
    handles.push(rt.spawn(async move {
        let Ok(pool) = pools.class("adhoc") else {
            return;
        };
        let writer = format!("{}/{route}/probe", tally.system);
        let mut seq = 0i32;
        let mut next = tokio::time::Instant::now();
        while !shared.stopping() {
            seq += 1;
            let t = Instant::now();
            let got = pool.get().await;
            let took = t.elapsed();
            let miss = match got {
                Ok(mut conn) => {
                    let _ = diesel::sql_query("SELECT 1").execute(&mut *conn).await;
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
            write_ours(pool, &s, true, &key, &writer, seq, &tally, &shared).await;
            next += s.probe_every;
            let now = tokio::time::Instant::now();
            if next > now {
                tokio::time::sleep_until(next).await;
            } else {
                next = now;
            }
        }
    }));
    handles
}

#[allow(clippy::too_many_arguments)]
async fn write_ours(
    pool: &diesel_async_ext::ExtPool<AsyncPgConnection>,
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
        commit_with_key(pool, &s.policy, key, async |conn| {
            insert(conn, key, writer, n).await
        })
        .await
        .map(|k| {
            if matches!(k, Keyed::AlreadyCommitted) {
                tally.already_committed();
            }
        })
    } else {
        commit_with_retry(pool, &s.policy, async |conn| {
            insert(conn, key, writer, n).await
        })
        .await
    };
    match result {
        Ok(()) => tally.ack(key.to_owned(), t.elapsed()),
        Err(e) => {
            let ambiguous = matches!(e, RetryError::AmbiguousCommit { .. });
            tally.surfaced(shared.surfaced(writer, key, e.to_string()), ambiguous);
        }
    }
}

/// Builds a plain bb8 pool at its defaults (`RecyclingMethod::Verified`, 10 connections,
/// 30 s timeout). diesel-async's own `establish` has no TLS: with `tls`, connections are
/// opened by our connector through `custom_setup`, as diesel-async's docs show.
pub async fn build_bb8(url: &str, tls: bool) -> Result<PlainBb8, String> {
    let manager = if tls {
        let connector = diesel_async_ext::PgConnector::from_url(
            url,
            &pool_core::config::ConnectSettings::default(),
        )
        .map_err(|e| format!("a connector for the bb8 control: {e}"))?;
        let mut config = ManagerConfig::default();
        config.custom_setup = Box::new(move |_url| {
            let connector = connector.clone();
            Box::pin(async move {
                connector
                    .connect()
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
            })
        });
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config)
    } else {
        AsyncDieselConnectionManager::<AsyncPgConnection>::new(url)
    };
    bb8::Pool::builder()
        .build(manager)
        .await
        .map_err(|e| format!("building the plain bb8 pool: {e}"))
}

/// Starts the bb8 control's writers with the naive loop (any error, 3 tries, 1 s apart).
pub fn spawn_bb8(
    rt: &tokio::runtime::Runtime,
    pool: &PlainBb8,
    route: &'static str,
    tally: &Arc<Tally>,
    shared: &Arc<Shared>,
    s: &Settings,
) -> Vec<JoinHandle<()>> {
    (0..s.control_workers)
        .map(|w| {
            let (pool, tally, shared, s) = (pool.clone(), tally.clone(), shared.clone(), s.clone());
            rt.spawn(async move {
                let writer = format!("{}/{route}/w{w}", tally.system);
                let mut seq = 0i32;
                while !shared.stopping() {
                    seq += 1;
                    let key = format!("{writer}/{seq}");
                    let t = Instant::now();
                    let mut last = String::new();
                    let mut ok = false;
                    for attempt in 1..=crate::NAIVE_TRIES {
                        let r = match pool.get().await {
                            Ok(mut conn) => {
                                let (k, wr) = (&key, &writer);
                                conn.transaction::<_, diesel::result::Error, _>(async |c| {
                                    insert(c, k, wr, seq).await
                                })
                                .await
                                .map_err(|e| e.to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        match r {
                            Ok(()) => {
                                ok = true;
                                break;
                            }
                            Err(e) => last = e,
                        }
                        if attempt < crate::NAIVE_TRIES {
                            tokio::time::sleep(crate::NAIVE_PAUSE).await;
                        }
                    }
                    if ok {
                        tally.ack(key, t.elapsed());
                    } else {
                        tally.surfaced(shared.surfaced(&writer, &key, last), false);
                    }
                    tokio::time::sleep(s.think).await;
                }
            })
        })
        .collect()
}

/// Checkouts still out: our pools' `in_use` over every class.
pub fn leaked_ours(pools: &OursAsync) -> u64 {
    pools
        .classes()
        .map(|(_, p)| u64::from(p.stats().in_use))
        .sum()
}

/// Checkouts still out of a plain bb8 pool.
pub fn leaked_bb8(pool: &PlainBb8) -> u64 {
    let state = pool.state();
    u64::from(state.connections.saturating_sub(state.idle_connections))
}
