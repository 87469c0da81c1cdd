//! Behind PgBouncer (Debian's 1.18, a private one per test, `default_pool_size = 2`): the sync
//! pool with `pooler(Pooler::Transaction)` serves a mixed workload of queries and
//! `commit_with_retry` transactions from many client connections over two server connections
//! with no error, also through server and pooler faults; Diesel's defaults fail there (the
//! controls), and session mode works as it is. On PgBouncer 1.24.1 with
//! `max_prepared_statements`, Diesel's cached statements work too (and fail without it).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use diesel::prelude::*;
use resilient_diesel::retry::{
    commit_with_retry, with_retry, RetryError, RetryPolicy, RetryablePool,
};
use resilient_diesel::{PgPool, Pooler};
use test_support::{pgbouncer_or_skip, PgBouncer, PgBouncerOptions, PoolMode, Release};

diesel::table! {
    pooler_ledger (id) {
        id -> BigInt,
        worker -> Integer,
        seq -> Integer,
    }
}

use pooler_ledger::dsl::{pooler_ledger as ledger, seq, worker};

/// A ledger row per committed transaction; `UNIQUE (worker, seq)` turns a transaction
/// committed twice into an error.
const SCHEMA: &str = "CREATE TABLE pooler_ledger (id bigserial PRIMARY KEY, \
     worker int NOT NULL, seq int NOT NULL, UNIQUE (worker, seq)); \
     GRANT ALL ON pooler_ledger TO app; GRANT ALL ON SEQUENCE pooler_ledger_id_seq TO app";

/// Client connections per pool.
const CLIENTS: u32 = 8;

fn setup(opts: PgBouncerOptions) -> Option<(PgServer, PgBouncer)> {
    let pg = server()?;
    pg.execute(SCHEMA).expect("schema");
    let bouncer = pgbouncer_or_skip(&pg, opts)?;
    Some((pg, bouncer))
}

fn ours(bouncer: &PgBouncer, app: &str, pooler: Pooler) -> PgPool {
    PgPool::builder(&bouncer.url_with("sslmode=disable"))
        .pooler(pooler)
        .application_name(app)
        .pool_size(CLIENTS)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(30))
        .build()
        .expect("pool through pgbouncer")
}

fn patient() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(1000)
        .max_elapsed(Some(Duration::from_secs(60)))
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(50))
        .build()
        .expect("policy")
}

/// What a workload did.
#[derive(Default, Debug)]
struct Tally {
    /// Transactions `commit_with_retry` reported committed, as (worker, seq).
    committed: Vec<(i32, i32)>,
    /// Queries that returned.
    queries: u64,
    /// Every error a caller saw.
    errors: Vec<String>,
    /// Transactions reported `AmbiguousCommit`, as (worker, seq).
    ambiguous: Vec<(i32, i32)>,
}

/// One unit of the workload on worker `w`, step `k`: a query (this worker's committed rows,
/// which must be all of them: read your writes), then a transaction adding row (w, k).
/// Queries go through `with_retry` when `retried`, else through a plain checkout.
fn step<P>(pool: &P, policy: &RetryPolicy, retried: bool, w: i32, k: i32, tally: &Mutex<Tally>)
where
    P: Checkout + RetryablePool<Connection = PgConnection>,
{
    let expected = tally
        .lock()
        .unwrap()
        .committed
        .iter()
        .filter(|(cw, _)| *cw == w)
        .count() as i64;
    let count =
        |conn: &mut PgConnection| ledger.filter(worker.eq(w)).count().get_result::<i64>(conn);
    let seen = if retried {
        with_retry(pool, policy, count).map_err(|e| e.to_string())
    } else {
        Checkout::checkout(pool)
            .map_err(|e| e.to_string())
            .and_then(|mut c| count(&mut c).map_err(|e| e.to_string()))
    };
    let mut t = tally.lock().unwrap();
    match seen {
        Ok(n) if n == expected => t.queries += 1,
        Ok(n) => t.errors.push(format!(
            "worker {w} read {n} of its rows, committed {expected}"
        )),
        Err(e) => t.errors.push(format!("query: {e}")),
    }
    drop(t);
    let inserted = commit_with_retry(pool, policy, |conn| {
        diesel::insert_into(ledger)
            .values((worker.eq(w), seq.eq(k)))
            .execute(conn)
    });
    let mut t = tally.lock().unwrap();
    match inserted {
        Ok(_) => t.committed.push((w, k)),
        Err(e @ RetryError::AmbiguousCommit { .. }) => {
            t.errors
                .push(format!("ambiguous commit of ({w}, {k}): {e}"));
            t.ambiguous.push((w, k));
        }
        Err(e) => t.errors.push(format!("transaction: {e}")),
    }
}

/// `threads` workers (ids from `first_worker`) each run `steps` steps; returns the tally.
fn run_steps<P>(pool: &P, first_worker: i32, threads: i32, steps: i32, retried: bool) -> Tally
where
    P: Checkout + RetryablePool<Connection = PgConnection> + Sync,
{
    run(pool, first_worker, threads, steps, retried)
}

fn run<P>(pool: &P, first_worker: i32, threads: i32, steps: i32, retried: bool) -> Tally
where
    P: Checkout + RetryablePool<Connection = PgConnection> + Sync,
{
    let tally = Arc::new(Mutex::new(Tally::default()));
    let policy = patient();
    std::thread::scope(|s| {
        for w in first_worker..first_worker + threads {
            let (tally, policy) = (&tally, &policy);
            s.spawn(move || {
                for k in 0..steps {
                    step(pool, policy, retried, w, k, tally);
                }
            });
        }
    });
    Arc::try_unwrap(tally).unwrap().into_inner().unwrap()
}

/// Every transaction reported committed is in the ledger exactly once, and nothing else is.
fn assert_ledger_matches(pg: &PgServer, pool: &PgPool, committed: &[(i32, i32)]) {
    let mut conn = pool.get().expect("checkout for the ledger check");
    let mut rows: Vec<(i32, i32)> = ledger
        .select((worker, seq))
        .load(&mut conn)
        .expect("read the ledger");
    rows.sort_unstable();
    let mut expected = committed.to_vec();
    expected.sort_unstable();
    assert_eq!(
        rows.len(),
        expected.len(),
        "ledger rows vs transactions reported committed (server log: {})",
        pg.log_path().display()
    );
    assert_eq!(
        rows, expected,
        "the ledger is exactly the committed transactions"
    );
}

#[test]
fn transaction_mode_serves_a_mixed_workload_of_two_pools_over_two_server_connections_without_error()
{
    let Some((pg, bouncer)) = setup(PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    let a = ours(&bouncer, "pooler-a", Pooler::Transaction);
    let b = ours(&bouncer, "pooler-b", Pooler::Transaction);
    let started = Instant::now();
    let (ta, tb) = std::thread::scope(|s| {
        let ta = s.spawn(|| run_steps(&a, 0, CLIENTS as i32, 40, false));
        let tb = s.spawn(|| run_steps(&b, 100, CLIENTS as i32, 40, false));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let elapsed = started.elapsed();
    let servers = bouncer.server_connections().expect("SHOW POOLS");
    eprintln!(
        "transaction mode: {} transactions and {} queries from {} client connections over \
         {servers} server connections in {elapsed:?}",
        ta.committed.len() + tb.committed.len(),
        ta.queries + tb.queries,
        2 * CLIENTS,
    );
    assert!(
        ta.errors.is_empty() && tb.errors.is_empty(),
        "errors: {:?} {:?}",
        ta.errors,
        tb.errors
    );
    assert!(
        servers <= 2,
        "PgBouncer opened {servers} server connections"
    );
    let mut committed = ta.committed;
    committed.extend(tb.committed);
    assert_eq!(committed.len(), 2 * CLIENTS as usize * 40);
    assert_ledger_matches(&pg, &a, &committed);
}

/// The first error that names a Diesel prepared statement, for the control's message.
fn statement_error(errors: &[String]) -> Option<&String> {
    errors
        .iter()
        .find(|e| e.contains("prepared statement \"__diesel_stmt_"))
}

/// Holds `CLIENTS` connections of `pool` at once and runs one cached query on each, stopping
/// at the first error: returns the errors. Each client connection names its first cached
/// statement `__diesel_stmt_0`, and in transaction mode a statement is prepared on whichever
/// server connection PgBouncer lends: with fewer server connections than clients holding a
/// connection at once, a client's prepare lands on a server connection that already holds
/// that name. Whether a workload of short steps meets it depends on timing (a pool that
/// happens to reuse the two lucky clients never does); holding them all at once does not.
fn errors_holding_every_connection<P: Checkout>(pool: &P) -> Vec<String> {
    let mut held = Vec::new();
    for _ in 0..CLIENTS {
        match Checkout::checkout(pool) {
            Ok(conn) => held.push(conn),
            Err(e) => return vec![format!("checkout {} of {CLIENTS}: {e}", held.len() + 1)],
        }
    }
    held.iter_mut()
        .filter_map(|conn| {
            ledger
                .filter(worker.eq(0))
                .count()
                .get_result::<i64>(&mut **conn)
                .err()
                .map(|e| format!("query: {e}"))
        })
        .take(1)
        .collect()
}

#[test]
fn in_transaction_mode_diesels_defaults_fail_plain_r2d2_and_our_pool_without_the_setting() {
    // Two server connections (the default of these tests) for eight clients held at once.
    let Some((_pg, bouncer)) = setup(PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    let url = bouncer.url_with("sslmode=disable");
    // Plain r2d2 at its defaults but for a short timeout: its checkout test (`SELECT 1`) is
    // itself a cached statement, and once every server connection holds `__diesel_stmt_0`,
    // each further connection fails it and r2d2 keeps reconnecting until the timeout.
    let plain = r2d2::Pool::builder()
        .max_size(CLIENTS)
        .connection_timeout(Duration::from_secs(3))
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(&url))
        .expect("plain pool");
    let ours_off = PgPool::builder(&url)
        .application_name("pooler-off")
        .pool_size(CLIENTS)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(3))
        .build()
        .expect("pool through pgbouncer");
    let plain_errors = errors_holding_every_connection(&plain);
    let off_errors = errors_holding_every_connection(&ours_off);
    for (name, errors) in [
        ("plain r2d2", &plain_errors),
        ("ours, pooler none", &off_errors),
    ] {
        eprintln!("{name}, {CLIENTS} connections held at once: {errors:?}");
        assert!(
            statement_error(errors).is_some(),
            "{name} was expected to fail on a Diesel prepared statement; errors: {errors:?}"
        );
    }
}

/// PgBouncer 1.24.1 in transaction mode with `max_prepared_statements`.
fn recent(max_prepared_statements: u32) -> PgBouncerOptions {
    PgBouncerOptions::new(PoolMode::Transaction)
        .release(Release::Recent)
        .conf(format!(
            "max_prepared_statements = {max_prepared_statements}"
        ))
}

/// Plain r2d2 at its defaults through `bouncer`, with a short timeout.
fn plain_r2d2(bouncer: &PgBouncer) -> r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>> {
    r2d2::Pool::builder()
        .max_size(CLIENTS)
        .connection_timeout(Duration::from_secs(3))
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            bouncer.url_with("sslmode=disable"),
        ))
        .expect("plain pool")
}

#[test]
fn on_pgbouncer_1_24_with_max_prepared_statements_diesels_cached_statements_work_and_so_does_ours()
{
    // The control, on the same binary: with `max_prepared_statements = 0` Diesel's cached
    // statements collide as on 1.18.
    let Some((_pg, bouncer)) = setup(recent(0)) else {
        return;
    };
    let version = bouncer.version().expect("SHOW VERSION");
    assert!(version.contains("1.24.1"), "expected 1.24.1, got {version}");
    let off = errors_holding_every_connection(&plain_r2d2(&bouncer));
    eprintln!("plain r2d2, 1.24.1, max_prepared_statements = 0: {off:?}");
    assert!(
        statement_error(&off).is_some(),
        "without max_prepared_statements Diesel's cached statements were expected to collide; \
         errors: {off:?}"
    );
    drop((bouncer, _pg));

    let Some((pg, bouncer)) = setup(recent(200)) else {
        return;
    };
    let on = errors_holding_every_connection(&plain_r2d2(&bouncer));
    assert!(
        on.is_empty(),
        "PgBouncer 1.24.1 with max_prepared_statements carries Diesel's cached statements; \
         errors: {on:?}"
    );
    let a = ours(&bouncer, "pooler-recent", Pooler::Transaction);
    let started = Instant::now();
    let ta = run_steps(&a, 0, CLIENTS as i32, 40, false);
    eprintln!(
        "sync, 1.24.1, max_prepared_statements = 200: plain r2d2 held {CLIENTS} connections \
         with cached statements without error; ours: {} transactions and {} queries in {:?}, \
         errors {:?}",
        ta.committed.len(),
        ta.queries,
        started.elapsed(),
        ta.errors
    );
    assert!(ta.errors.is_empty(), "errors: {:?}", ta.errors);
    assert_eq!(ta.committed.len(), CLIENTS as usize * 40);
    assert_ledger_matches(&pg, &a, &ta.committed);
}

#[test]
fn session_mode_serves_the_same_workload_with_diesels_defaults_and_with_ours() {
    // Session mode keeps a server connection per client connection: as many as both pools
    // hold.
    let opts = PgBouncerOptions::new(PoolMode::Session).pool_size(2 * CLIENTS);
    let Some((pg, bouncer)) = setup(opts) else {
        return;
    };
    let plain = r2d2::Pool::builder()
        .max_size(CLIENTS)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            bouncer.url_with("sslmode=disable"),
        ))
        .expect("plain pool");
    let ours = ours(&bouncer, "pooler-session", Pooler::Session);
    let (tp, to) = std::thread::scope(|s| {
        let p = s.spawn(|| run_steps(&plain, 0, CLIENTS as i32, 20, false));
        let o = s.spawn(|| run_steps(&ours, 100, CLIENTS as i32, 20, false));
        (p.join().unwrap(), o.join().unwrap())
    });
    assert!(
        tp.errors.is_empty(),
        "plain r2d2 in session mode: {:?}",
        tp.errors
    );
    assert!(
        to.errors.is_empty(),
        "ours in session mode: {:?}",
        to.errors
    );
    let mut committed = tp.committed;
    committed.extend(to.committed);
    assert_ledger_matches(&pg, &ours, &committed);
}

/// A workload running on its own threads until stopped: `CLIENTS` workers on `pool`, every
/// query and transaction retried (`with_retry`, `commit_with_retry`).
struct Background {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Background {
    fn start(pool: &PgPool, first_worker: i32) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (first_worker..first_worker + CLIENTS as i32)
            .map(|w| {
                let (pool, stop, tally) = (pool.clone(), stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    let policy = patient();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        step(&pool, &policy, true, w, k, &tally);
                        k += 1;
                    }
                })
            })
            .collect();
        Background {
            stop,
            tally,
            threads,
        }
    }

    fn committed(&self) -> usize {
        self.tally.lock().unwrap().committed.len()
    }

    /// Waits until `more` transactions beyond the count now have committed (restarting
    /// PgBouncer if it crashed meanwhile: see `PgBouncer::kill_and_resume`); `true` if it
    /// had to.
    fn wait_progress(&self, more: usize, what: &str, bouncer: &PgBouncer) -> bool {
        let mut crashed = false;
        let target = self.committed() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.committed() < target {
            if bouncer
                .restart_if_crashed()
                .expect("restart a crashed PgBouncer")
            {
                crashed = true;
                eprintln!("{what}: PgBouncer had crashed and was restarted");
            }
            let t = self.tally.lock().unwrap();
            assert!(
                Instant::now() < deadline,
                "{what}: no progress to {target} commits within 60 s ({} committed, errors {:?})",
                t.committed.len(),
                t.errors
            );
            drop(t);
            std::thread::sleep(Duration::from_millis(5));
        }
        crashed
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("worker thread");
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

/// Runs the retried workload through a transaction-mode PgBouncer while `fault` is injected
/// three times, each after some progress; asserts no caller saw an error and the ledger holds
/// exactly the committed transactions.
fn survives(name: &str, fault: impl Fn(&PgServer, &PgBouncer) -> bool) {
    let Some((pg, bouncer)) = setup(PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    let pool = ours(&bouncer, "pooler-faults", Pooler::Transaction);
    let work = Background::start(&pool, 0);
    // PgBouncer 1.18 itself crashes now and then on KILL (pgbouncer#1401).
    let mut crashed = work.wait_progress(20, "before the first fault", &bouncer);
    // PgBouncer gives its server connections the application_name of the client using them.
    let before = pg
        .backend_pids("pooler-faults")
        .expect("server connections");
    assert!(!before.is_empty(), "PgBouncer holds server connections");
    for round in 0..3 {
        crashed |= fault(&pg, &bouncer);
        crashed |= work.wait_progress(20, &format!("after {name} #{}", round + 1), &bouncer);
    }
    let after = pg
        .backend_pids("pooler-faults")
        .expect("server connections");
    let tally = work.finish();
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "{name} replaced PgBouncer's server connections: before {before:?}, after {after:?}"
    );
    eprintln!(
        "{name}: {} transactions, {} queries, {} errors",
        tally.committed.len(),
        tally.queries,
        tally.errors.len()
    );
    // A pooler that crashes in the middle of a COMMIT may leave it unanswerable within
    // `commit_resolution_timeout`: then, and only then, `AmbiguousCommit` is the honest
    // answer, and the ledger may hold such a transaction or not.
    let errors: Vec<&String> = tally
        .errors
        .iter()
        .filter(|e| !(crashed && e.starts_with("ambiguous commit")))
        .collect();
    assert!(
        errors.is_empty(),
        "{name}: errors reached callers: {:?}",
        tally.errors
    );
    if !tally.ambiguous.is_empty() {
        eprintln!("{name}: PgBouncer crashed; ambiguous: {:?}", tally.errors);
    }
    let mut committed = tally.committed.clone();
    // Each ambiguous transaction counts as committed if the ledger holds it.
    for (w, k) in &tally.ambiguous {
        if ledger_holds(&pg, *w, *k) {
            committed.push((*w, *k));
        }
    }
    assert_ledger_matches(&pg, &pool, &committed);
}

/// Whether the ledger holds row (w, k).
fn ledger_holds(pg: &PgServer, w: i32, k: i32) -> bool {
    let mut conn = PgConnection::establish(&pg.url_with("sslmode=disable")).expect("connect");
    let n: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "(SELECT count(*) FROM ledger WHERE worker = {w} AND seq = {k})"
    )))
    .get_result(&mut conn)
    .expect("count");
    n > 0
}

/// `pg_terminate_backend` of every server connection PgBouncer holds.
fn terminate_server_connections(pg: &PgServer) {
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE usename = 'app' AND pid <> pg_backend_pid()",
    )
    .expect("terminate PgBouncer's server connections");
}

#[test]
fn terminated_server_backends_behind_the_pooler_reach_no_caller() {
    survives("pg_terminate_backend", |pg, _| {
        terminate_server_connections(pg);
        false
    });
}

#[test]
fn a_server_restart_behind_the_pooler_reaches_no_caller() {
    survives("restart_fast", |pg, _| {
        pg.restart_fast().expect("restart");
        false
    });
}

#[test]
fn pgbouncer_reconnect_reaches_no_caller() {
    survives("RECONNECT", |_, bouncer| {
        bouncer.reconnect().expect("RECONNECT");
        false
    });
}

#[test]
fn pgbouncer_kill_cutting_every_client_reaches_no_caller() {
    survives("KILL", |_, bouncer| {
        let crashed = bouncer
            .kill_and_resume(Duration::from_millis(100))
            .expect("KILL, RESUME");
        if crashed {
            eprintln!("PgBouncer crashed on KILL (pgbouncer#1401) and was restarted");
        }
        crashed
    });
}

#[test]
fn a_commit_cut_behind_the_pooler_is_resolved_on_the_server_that_ran_it_and_committed_once() {
    let Some((pg, bouncer)) = setup(PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    // Client -> fault proxy -> PgBouncer -> PostgreSQL: the proxy cuts the client's
    // connection right after forwarding COMMIT, so the outcome is unknown to the client.
    let proxy = test_support::FaultProxy::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        bouncer.port(),
    )))
    .expect("fault proxy");
    let url = format!(
        "postgres://app:{}@127.0.0.1:{}/app?sslmode=disable",
        PgServer::PASSWORD,
        proxy.port()
    );
    let pool = PgPool::builder(&url)
        .pooler(Pooler::Transaction)
        .application_name("pooler-cut")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .expect("pool");
    let runs = std::sync::atomic::AtomicU32::new(0);
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    commit_with_retry(&pool, &patient(), |conn| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::insert_into(ledger)
            .values((worker.eq(7), seq.eq(7)))
            .execute(conn)
    })
    .expect("resolved as committed by txid_status() on the same server");
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "never rerun after a commit"
    );
    assert_eq!(pool.stats().commits_resolved, 1);
    assert_ledger_matches(&pg, &pool, &[(7, 7)]);
}

#[test]
fn txid_status_is_taken_only_from_the_server_that_ran_the_transaction() {
    use resilient_diesel::retry::{RetryConnection, TxStatus};
    let Some((_pg, bouncer)) = setup(PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    let pool = ours(&bouncer, "pooler-identity", Pooler::Transaction);
    // The retry functions read the setting through the pool: it decides whether
    // `commit_with_retry` reads the server's identity with the transaction id and asks only
    // that server (a second cluster behind one pooler, which would show it end to end, is
    // not built here: test clusters share their template's system identifier).
    assert_eq!(
        resilient_diesel::retry::RetryablePool::pooler(&pool),
        Pooler::Transaction
    );
    let mut conn = pool.get().expect("checkout");
    let (txid, server) = conn
        .transaction(|c| c.current_txid_and_server())
        .expect("txid and server")
        .expect("PostgreSQL has transaction ids");
    assert_eq!(
        conn.txid_status_on(txid, &server).expect("asked"),
        Some(TxStatus::Committed),
        "the same server answers"
    );
    assert_eq!(
        conn.txid_status_on(txid, "another cluster").expect("asked"),
        None,
        "another server's answer would be a guess"
    );
}
