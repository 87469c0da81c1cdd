//! Cancellation safety: a request future dropped at any await point — waiting at the gate,
//! validating, `BEGIN`, the body, `txid_current()`, `COMMIT`, resolving a cut `COMMIT` — never
//! leaves a connection in the pool inside a transaction, half-read or half-validated, and never
//! leaks a budget permit or a waiter.
//!
//! Not one case but a loop over cancellation points: the same `commit_with_retry` request is
//! run under `tokio::time::timeout` with a budget growing by 1 ms per iteration, through a
//! proxy that adds latency (so every await point is hit, several times), until it completes.
//! The proxy's message counts say how far each cancelled request got. After each iteration:
//! no session of the pool is `idle in transaction` (`pg_stat_activity`), the budget has no
//! waiter and exactly one permit per open connection, the gate has no waiter, the next
//! checkout works, and the request's row is there at most once.
#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::retry::{commit_with_key, commit_with_retry, RetryPolicy};
use diesel_async_ext::{Class, ClassPools, PgPool};

const APP: &str = "ext_cancel";

async fn admin(pg: &PgServer) -> AsyncPgConnection {
    AsyncPgConnection::establish(&format!("{}?sslmode=disable", pg.superuser_url()))
        .await
        .expect("admin connection")
}

async fn scalar(conn: &mut AsyncPgConnection, sql: &str, bind: &str) -> i64 {
    diesel::select(
        diesel::dsl::sql::<BigInt>("(")
            .sql(sql)
            .bind::<Text, _>(bind.to_owned())
            .sql(")"),
    )
    .get_result(conn)
    .await
    .unwrap()
}

/// Sessions of the pool left inside a transaction, once closed connections' backends are gone.
async fn idle_in_transaction(admin: &mut AsyncPgConnection) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = scalar(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
             AND application_name = ",
            APP,
        )
        .await;
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The budget settles to one permit per open connection of each class and no waiter.
async fn budget_settles(pools: &ClassPools<AsyncPgConnection>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let snap = pools.budget_snapshot();
        let open: Vec<u32> = pools
            .classes()
            .map(|(_, p)| p.state().connections)
            .collect();
        let gate: u32 = pools
            .classes()
            .map(|(_, p)| p.stats().waiters.unwrap_or(0))
            .sum();
        let matches = snap
            .classes
            .iter()
            .zip(&open)
            .all(|(c, open)| c.in_use == *open && c.waiters == 0);
        if matches && gate == 0 && snap.healthy {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{snap}; open per class {open:?}; gate waiters {gate}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The request: one ledger row per iteration, in `commit_with_retry`, or with `keyed` in
/// `commit_with_key` under the key `req-{i}` (its own await points: the key's insert, the
/// key's lookup when a `COMMIT` is cut, the ending of a session the cut left open).
async fn request(pool: &PgPool, i: u32, keyed: bool) -> Result<(), String> {
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1))
        .commit_resolution_timeout(Duration::from_secs(5))
        .seed(i.into())
        .build()
        .unwrap();
    let note = format!("req-{i}");
    let insert = async |c: &mut AsyncPgConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ($1)")
            .bind::<Text, _>(&note)
            .execute(c)
            .await
    };
    if keyed {
        commit_with_key(pool, &policy, &note, insert)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        commit_with_retry(pool, &policy, insert)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

struct Run {
    /// Round trips the cancelled request had sent, and how often.
    reached: BTreeMap<u64, u32>,
    iterations: u32,
    completed: u32,
}

/// The loop: budgets of 0, 1, 2, ... ms until the request completes three times.
async fn cancellation_loop(
    pg: &PgServer,
    proxy: &FaultProxy,
    pools: &ClassPools<AsyncPgConnection>,
    cut_commit: bool,
    first_budget_ms: u64,
    base: u32,
    keyed: bool,
) -> Run {
    let pool = pools.class("work").unwrap();
    let mut admin = admin(pg).await;
    let mut run = Run {
        reached: BTreeMap::new(),
        iterations: 0,
        completed: 0,
    };
    for step in 0..400u32 {
        let i = base + step;
        // A competitor holds both connections for 3 ms: the request starts at the gate.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let competitor = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let a = pool.get().await.unwrap();
                let b = pool.get().await.unwrap();
                let _ = held_tx.send(());
                tokio::time::sleep(Duration::from_millis(3)).await;
                drop((a, b));
            })
        };
        held_rx.await.unwrap();
        if cut_commit {
            proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(5));
        }
        let before = proxy.messages().round_trips();
        let budget = Duration::from_millis(first_budget_ms + u64::from(step));
        let outcome = tokio::time::timeout(budget, request(pool, i, keyed)).await;
        let sent = proxy.messages().round_trips() - before;
        competitor.await.unwrap();
        run.iterations += 1;
        match outcome {
            Ok(result) => {
                result.unwrap_or_else(|e| panic!("iteration {i}: the request failed: {e}"));
                run.completed += 1;
            }
            Err(_) => *run.reached.entry(sent).or_default() += 1,
        }
        // The invariants, after every cancellation point.
        assert_eq!(
            idle_in_transaction(&mut admin).await,
            0,
            "iteration {i} (budget {budget:?}, {sent} round trips): a session of the pool is \
             left idle in transaction"
        );
        if let Err(state) = budget_settles(pools).await {
            panic!("iteration {i}: the budget leaked a permit or a waiter: {state}");
        }
        let mut conn = pool
            .get()
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: next checkout unusable: {e}"));
        let rows = scalar(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = ",
            &format!("req-{i}"),
        )
        .await;
        let keys = if keyed {
            scalar(
                &mut conn,
                "SELECT count(*) FROM resilient_diesel_idempotency_keys WHERE idempotency_key = ",
                &format!("req-{i}"),
            )
            .await
        } else {
            rows
        };
        drop(conn);
        assert!(
            rows <= 1,
            "iteration {i}: the request committed {rows} times"
        );
        assert_eq!(
            keys, rows,
            "iteration {i}: the key and the row did not commit together"
        );
        if outcome_completed(&run) {
            break;
        }
    }
    run
}

/// The loops' pools: a budget of 3, the class `work` (1 reserved, 2 at most) behind a proxy
/// adding 2 ms to every chunk (so that every await point is hit), every checkout validated
/// (the ping is a cancellation point too).
async fn cancel_pools(pg: &PgServer) -> (FaultProxy, ClassPools<AsyncPgConnection>) {
    let (proxy, url) = proxied(pg, "sslmode=disable");
    let pools = ClassPools::<AsyncPgConnection>::builder(&url, 3)
        .class(
            "work",
            Class::new().reserved(1).pool_size(2).max_overflow(0),
        )
        .class("other", Class::new().reserved(1))
        .configure(|b| {
            b.application_name(APP)
                .validation_bypass_window(Duration::from_millis(1))
                .pool_timeout(Duration::from_secs(5))
        })
        .build()
        .await
        .unwrap();
    proxy.set_latency(Duration::from_millis(2));
    (proxy, pools)
}

fn outcome_completed(run: &Run) -> bool {
    run.completed >= 3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_request_at_any_await_point_leaves_nothing_behind() {
    let Some(pg) = server() else { return };
    PgServer::execute(
        &pg,
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL); \
         GRANT ALL ON ledger TO app; GRANT ALL ON SEQUENCE ledger_id_seq TO app",
    )
    .unwrap();
    let (proxy, pools) = cancel_pools(&pg).await;

    // Checkout (gate, validation), BEGIN, body, txid_current(), COMMIT.
    let plain = cancellation_loop(&pg, &proxy, &pools, false, 0, 0, false).await;
    println!(
        "cancellation loop: {} iterations, {} completed; cancelled after N round trips \
         (N: times): {:?}",
        plain.iterations, plain.completed, plain.reached
    );
    assert!(
        plain.reached.len() >= 5,
        "the loop must cancel at many different points: {:?}",
        plain.reached
    );

    // The same with every COMMIT cut by the proxy: cancellation inside the resolution
    // (checkouts and txid_status() on fresh connections).
    let cut = cancellation_loop(&pg, &proxy, &pools, true, 10, 1000, false).await;
    println!(
        "with COMMIT cut: {} iterations, {} completed (each resolved as committed); \
         cancelled after N round trips: {:?}",
        cut.iterations, cut.completed, cut.reached
    );
    let stats = pools.class("work").unwrap().stats();
    println!("work pool after both loops: {stats:?}");
    assert!(stats.commits_resolved >= 3, "{stats:?}");
    assert!(
        stats.closed.broken > 0,
        "cancelled transactions were closed: {stats:?}"
    );
    assert_no_secret_in_logs();
}

/// The same loop over `commit_with_key`, whose await points are its own: the key's insert in
/// the transaction, the key's lookup on a fresh connection when a `COMMIT` is cut, and the
/// ending of a session the cut left open. Dropped at any of them, it leaves no session idle
/// in a transaction, no permit or waiter behind, and the key and the row committed together
/// or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_keyed_request_at_any_await_point_leaves_nothing_behind() {
    let Some(pg) = server() else { return };
    PgServer::execute(
        &pg,
        &format!(
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL); \
             GRANT ALL ON ledger TO app; GRANT ALL ON SEQUENCE ledger_id_seq TO app; \
             {}; GRANT ALL ON resilient_diesel_idempotency_keys TO app",
            diesel_async_ext::retry::IDEMPOTENCY_TABLE_SQL
        ),
    )
    .unwrap();
    let (proxy, pools) = cancel_pools(&pg).await;
    let plain = cancellation_loop(&pg, &proxy, &pools, false, 0, 0, true).await;
    println!(
        "keyed cancellation loop: {} iterations, {} completed; cancelled after N round trips \
         (N: times): {:?}",
        plain.iterations, plain.completed, plain.reached
    );
    assert!(
        plain.reached.len() >= 5,
        "the loop must cancel at many different points: {:?}",
        plain.reached
    );
    let cut = cancellation_loop(&pg, &proxy, &pools, true, 10, 1000, true).await;
    println!(
        "keyed, with COMMIT cut: {} iterations, {} completed; cancelled after N round trips: \
         {:?}",
        cut.iterations, cut.completed, cut.reached
    );
    assert!(
        cut.reached.len() >= 3,
        "the cut loop must cancel at several points: {:?}",
        cut.reached
    );
    assert_no_secret_in_logs();
}
