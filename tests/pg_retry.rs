//! `with_retry`, `commit_with_retry` and `commit_with_key` against real PostgreSQL faults:
//! serialization failures, deadlocks, terminated backends, a connection cut while COMMIT is in
//! flight. Each resilience claim has a control run that fails on the same fault.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::BigInt;
use resilient_diesel::classify::classify_diesel;
use resilient_diesel::pool_core::classify::ErrorClass;
use resilient_diesel::retry::{
    commit_with_key, commit_with_retry, with_retry, Keyed, RetryError, RetryPolicy, RetryablePool,
};
use resilient_diesel::PgPool;
use test_support::FaultProxy;

fn patient() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(1000)
        .max_elapsed(Some(Duration::from_secs(120)))
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(50))
        .seed(11)
        .build()
        .unwrap()
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(&format!("({sql})")))
        .get_result(conn)
        .unwrap()
}

fn setup(pg: &PgServer, sql: &str) {
    pg.execute(sql).unwrap();
}

/// One read-modify-write increment at SERIALIZABLE: concurrent ones conflict with 40001.
fn increment(conn: &mut PgConnection) -> QueryResult<i64> {
    diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(conn)?;
    let v: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT v FROM counter WHERE id = 1)",
    ))
    .get_result(conn)?;
    diesel::sql_query(format!("UPDATE counter SET v = {} WHERE id = 1", v + 1)).execute(conn)?;
    Ok(v + 1)
}

fn counter_run(pool: &PgPool, policy: &RetryPolicy) -> (i64, u32) {
    let failures = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            let policy = policy.clone();
            let failures = failures.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    if commit_with_retry(&pool, &policy, increment).is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut conn = pool.get().unwrap();
    (
        count(&mut conn, "SELECT v FROM counter WHERE id = 1"),
        failures.load(Ordering::Relaxed),
    )
}

const COUNTER: &str = "CREATE TABLE counter (id int PRIMARY KEY, v bigint NOT NULL); \
     INSERT INTO counter VALUES (1, 0); GRANT ALL ON counter TO app";

#[test]
fn serializable_counter_8x200_with_commit_with_retry_ends_at_exactly_1600() {
    let Some(pg) = server() else { return };
    setup(&pg, COUNTER);
    let pool = ext_pool(&pg, "retry_counter", 8).build().unwrap();
    let (value, failures) = counter_run(&pool, &patient());
    assert_eq!(failures, 0);
    assert_eq!(value, 1600);
    assert!(
        pool.stats().retries > 0,
        "the run must have hit serialization failures: {:?}",
        pool.stats()
    );
    assert_no_secret_in_logs();
}

#[test]
fn control_the_same_counter_without_retries_loses_increments() {
    let Some(pg) = server() else { return };
    setup(&pg, COUNTER);
    let pool = ext_pool(&pg, "noretry_counter", 8).build().unwrap();
    let (value, failures) = counter_run(&pool, &RetryPolicy::no_retry());
    assert!(failures > 0, "8 threads on one row must conflict");
    assert_eq!(value, 1600 - i64::from(failures));
}

#[test]
fn two_deadlocked_transactions_both_commit() {
    let Some(pg) = server() else { return };
    setup(
        &pg,
        "CREATE TABLE acct (id int PRIMARY KEY, v int NOT NULL); \
         INSERT INTO acct VALUES (1, 0), (2, 0); GRANT ALL ON acct TO app",
    );
    let pool = ext_pool(&pg, "retry_deadlock", 2).build().unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let runs = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = [(1, 2), (2, 1)]
        .into_iter()
        .map(|(first, second)| {
            let (pool, barrier, runs) = (pool.clone(), barrier.clone(), runs.clone());
            std::thread::spawn(move || {
                let mut first_run = true;
                commit_with_retry(&pool, &patient(), |conn| {
                    runs.fetch_add(1, Ordering::Relaxed);
                    diesel::sql_query(format!("UPDATE acct SET v = v + 1 WHERE id = {first}"))
                        .execute(conn)?;
                    if std::mem::take(&mut first_run) {
                        // Both hold their first row before either asks for its second.
                        barrier.wait();
                    }
                    diesel::sql_query(format!("UPDATE acct SET v = v + 1 WHERE id = {second}"))
                        .execute(conn)
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().expect("both transactions commit");
    }
    let mut conn = pool.get().unwrap();
    assert_eq!(count(&mut conn, "SELECT sum(v)::bigint FROM acct"), 4);
    assert!(runs.load(Ordering::Relaxed) >= 3, "the victim ran again");
    assert!(
        test_support::captured_logs()
            .iter()
            .any(|l| l.contains("deadlock")),
        "the retry was logged with its class"
    );
}

const LEDGER: &str = "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL); \
     GRANT ALL ON ledger TO app; GRANT ALL ON SEQUENCE ledger_id_seq TO app";

#[test]
fn a_backend_terminated_mid_transaction_is_retried_and_committed_once() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let app = "retry_terminate";
    let pool = ext_pool(&pg, app, 2).build().unwrap();
    let attempts = AtomicU32::new(0);
    let id: i64 = commit_with_retry(&pool, &patient(), |conn| {
        let n = attempts.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('mid')").execute(conn)?;
        if n == 0 {
            pg.terminate_backends(app).unwrap();
        }
        diesel::select(diesel::dsl::sql::<BigInt>("currval('ledger_id_seq')")).get_result(conn)
    })
    .expect("retried after the backend died");
    assert_eq!(attempts.load(Ordering::Relaxed), 2);
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'mid'"),
        1
    );
    assert_eq!(count(&mut conn, "SELECT max(id)::bigint FROM ledger"), id);
    assert!(
        pool.stats().invalidations >= 1,
        "the disconnect invalidated the pool"
    );
}

fn proxied(pg: &PgServer) -> FaultProxy {
    FaultProxy::start(pg.addr()).expect("fault proxy")
}

/// Our pool of 2 (no overflow) through `proxy`, its sessions named `app`.
fn pool_via(pg: &PgServer, proxy: &FaultProxy, app: &str) -> PgPool {
    PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name(app)
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap()
}

/// The ledger and the idempotency key table, both writable by the app's role.
fn setup_keyed(pg: &PgServer) {
    setup(pg, LEDGER);
    pg.execute(&format!(
        "{}; GRANT ALL ON resilient_diesel_idempotency_keys TO app",
        resilient_diesel::retry::IDEMPOTENCY_TABLE_SQL
    ))
    .unwrap();
}

#[test]
fn a_connection_cut_while_commit_is_in_flight_commits_exactly_once() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let proxy = proxied(&pg);
    let pool = pool_via(&pg, &proxy, "retry_commit_cut");
    let runs = AtomicU32::new(0);
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let id: i64 = commit_with_retry(&pool, &patient(), |conn| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('once')").execute(conn)?;
        diesel::select(diesel::dsl::sql::<BigInt>("currval('ledger_id_seq')")).get_result(conn)
    })
    .expect("resolved as committed");
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "never rerun after a commit"
    );
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'once'"),
        1
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT id::bigint FROM ledger WHERE note = 'once'"
        ),
        id,
        "the call returns the committed transaction's result"
    );
    assert_eq!(pool.stats().commits_resolved, 1);
}

/// A `COMMIT` cut in flight on `pool` (through `proxy`), whose resolution is then left to
/// `commit_with_retry`: its outcome.
fn cut_commit<P>(pool: &P, proxy: &FaultProxy, note: &str) -> Result<(), RetryError<DieselError>>
where
    P: RetryablePool<Connection = PgConnection>,
{
    let policy = RetryPolicy::builder()
        .commit_resolution_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let out = commit_with_retry(pool, &policy, |conn| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ($1)")
            .bind::<diesel::sql_types::Text, _>(note)
            .execute(conn)
            .map(drop)
    });
    assert!(!proxy.trigger_armed(), "precondition: the COMMIT was cut");
    out
}

/// When the resolution's own query is refused for good (here the app's role may not run
/// `txid_status`), the commit is returned as ambiguous with the server's reason in it, read
/// through the pool's redaction, on our pool and on plain r2d2: an operator sees why it could
/// not be resolved.
#[test]
fn an_ambiguous_commit_whose_resolution_query_is_refused_says_why() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    pg.execute("REVOKE EXECUTE ON FUNCTION txid_status(bigint) FROM PUBLIC")
        .unwrap();
    let proxy = proxied(&pg);
    let url = pg.url_via(proxy.port(), "sslmode=disable");
    let ours = PgPool::builder(&url)
        .application_name("retry_refused")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    let plain = r2d2::Pool::builder()
        .max_size(2)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(url))
        .unwrap();
    for (pool, out) in [
        ("ours", cut_commit(&ours, &proxy, "refused-ours")),
        ("plain r2d2", cut_commit(&plain, &proxy, "refused-plain")),
    ] {
        match out {
            Err(RetryError::AmbiguousCommit { reason, .. }) => {
                assert!(
                    reason.contains("permission denied for function txid_status"),
                    "{pool}: the reason does not carry the server's: {reason}"
                );
                assert!(!reason.contains(PgServer::PASSWORD), "{pool}: {reason}");
            }
            other => panic!("{pool}: expected an ambiguous commit, got {other:?}"),
        }
    }
}

#[test]
fn control_a_naive_retry_loop_writes_twice_when_commit_is_cut() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let proxy = proxied(&pg);
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            pg.url_via(proxy.port(), "sslmode=disable"),
        ))
        .unwrap();
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    // The field reports' loop: any error, sleep, try again, three times.
    for _ in 0..3 {
        let mut conn = pool.get().unwrap();
        let done = conn.transaction::<_, DieselError, _>(|c| {
            diesel::sql_query("INSERT INTO ledger (note) VALUES ('naive')").execute(c)
        });
        if done.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'naive'"
        ),
        2,
        "the naive loop duplicates the committed row"
    );
}

#[test]
fn an_idempotency_key_resolves_a_cut_commit_and_makes_repeats_no_ops() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let proxy = proxied(&pg);
    let pool = PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .name("retry_key_cut")
        .application_name("retry_key")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    let policy = RetryPolicy::builder().verify_commit(false).build().unwrap();
    let runs = AtomicU32::new(0);
    let insert = |conn: &mut PgConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('keyed')").execute(conn)
    };
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let first = commit_with_key(&pool, &policy, "order-42", insert).unwrap();
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(first, Keyed::Committed(1));
    let again = commit_with_key(&pool, &policy, "order-42", insert).unwrap();
    assert_eq!(again, Keyed::AlreadyCommitted);
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'keyed'"
        ),
        1
    );
    // The resolution asked the server to end the transaction if its session still sat idle
    // in it; it had committed, so nothing was ended, and nothing says so.
    assert!(
        !test_support::captured_logs()
            .iter()
            .any(|l| l.contains("pool retry_key_cut:") && l.contains("ended the session")),
        "an ending was logged where no session was ended"
    );
}

#[test]
fn a_cut_keyed_commit_that_rolled_back_while_a_concurrent_call_committed_the_key_is_already_committed(
) {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let proxy = proxied(&pg);
    // A through the proxy, whose COMMIT never reaches the server (so it rolls back); B, a
    // second delivery of the same key, direct.
    let a = PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name("retry_key_race_a")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    let b = ext_pool(&pg, "retry_key_race_b", 2).build().unwrap();
    let policy = RetryPolicy::builder().verify_commit(false).build().unwrap();
    let a_holds_the_key = Arc::new(Barrier::new(2));
    let b_thread = {
        let (b, policy, barrier) = (b.clone(), policy.clone(), a_holds_the_key.clone());
        std::thread::spawn(move || {
            barrier.wait();
            // Waits on A's key lock until A's transaction is rolled back.
            commit_with_key(&b, &policy, "dup-7", |conn: &mut PgConnection| {
                diesel::sql_query("INSERT INTO ledger (note) VALUES ('b')").execute(conn)?;
                Ok::<_, DieselError>("b")
            })
        })
    };
    proxy.sever_before_forwarding(b"COMMIT");
    let a_runs = AtomicU32::new(0);
    let got_a = commit_with_key(&a, &policy, "dup-7", |conn: &mut PgConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('a')").execute(conn)?;
        if a_runs.fetch_add(1, Ordering::Relaxed) == 0 {
            a_holds_the_key.wait();
            // B is now blocked on the key this transaction inserted.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok::<_, DieselError>("a")
    });
    let got_b = b_thread.join().expect("B's thread");
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert_eq!(
        got_b.as_ref().ok(),
        Some(&Keyed::Committed("b")),
        "{got_b:?}"
    );
    // Before the fix: Committed("a"), a value from a transaction that rolled back.
    assert_eq!(
        got_a.as_ref().ok(),
        Some(&Keyed::AlreadyCommitted),
        "A's transaction rolled back and B's committed the key: {got_a:?}"
    );
    let mut conn = b.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note IN ('a', 'b')"
        ),
        1,
        "stored once"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'b'"),
        1
    );
}

#[test]
fn a_unique_violation_is_tried_once_and_returned_as_permanent() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let pool = ext_pool(&pg, "retry_unique", 1).build().unwrap();
    let attempts = AtomicU32::new(0);
    let out = commit_with_retry(&pool, &patient(), |conn| {
        attempts.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (id, note) VALUES (1, 'a'), (1, 'b')").execute(conn)
    });
    assert!(matches!(out, Err(RetryError::Permanent(_))), "{out:?}");
    assert_eq!(attempts.load(Ordering::Relaxed), 1);
    assert_eq!(pool.stats().retries, 0);
}

#[test]
fn with_retry_rides_over_terminated_backends_even_on_a_plain_r2d2_pool() {
    let Some(pg) = server() else { return };
    let app = "retry_plain";
    // Without r2d2's checkout test, dead connections are handed out: only the retry helps.
    let pool = plain_pool_without_checkout_test(
        &pg.url_with(&format!("sslmode=disable&application_name={app}")),
    );
    warm(&pool, 3);
    terminate_all(&pg, app);
    for _ in 0..10 {
        let one: i64 = with_retry(&pool, &patient(), |conn| {
            diesel::select(diesel::dsl::sql::<BigInt>("1::bigint")).get_result(conn)
        })
        .expect("with_retry hides the dead connections");
        assert_eq!(one, 1);
    }
}

/// Every class is built from an error a real server produced.
#[test]
fn errors_from_a_real_server_are_classified() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let url = pg.url_with("sslmode=disable");
    let connect = || PgConnection::establish(&url).unwrap();

    // Every connection opened here is closed before the connection-limit case below.
    {
        let mut c = connect();
        let syntax = diesel::sql_query("SELEC 1").execute(&mut c).unwrap_err();
        assert_eq!(classify_diesel(&syntax), ErrorClass::Permanent);

        diesel::sql_query("INSERT INTO ledger (id, note) VALUES (7, 'x')")
            .execute(&mut c)
            .unwrap();
        let unique = diesel::sql_query("INSERT INTO ledger (id, note) VALUES (7, 'x')")
            .execute(&mut c)
            .unwrap_err();
        assert_eq!(classify_diesel(&unique), ErrorClass::Permanent);

        let read_only = c
            .transaction::<(), DieselError, _>(|c| {
                diesel::sql_query("SET TRANSACTION READ ONLY").execute(c)?;
                diesel::sql_query("INSERT INTO ledger (note) VALUES ('ro')").execute(c)?;
                Ok(())
            })
            .unwrap_err();
        assert_eq!(classify_diesel(&read_only), ErrorClass::ReadOnlyTransaction);

        // Serialization failure: two SERIALIZABLE transactions updating the same row.
        setup(&pg, COUNTER);
        let (mut a, mut b) = (connect(), connect());
        let conns = [&mut a, &mut b];
        for (who, sql) in [
            (0, "BEGIN ISOLATION LEVEL SERIALIZABLE"),
            (1, "BEGIN ISOLATION LEVEL SERIALIZABLE"),
            (0, "SELECT v FROM counter"),
            (1, "SELECT v FROM counter"),
            (0, "UPDATE counter SET v = v + 1"),
            (0, "COMMIT"),
        ] {
            conns[who].batch_execute(sql).unwrap();
        }
        let serialization = b.batch_execute("UPDATE counter SET v = v + 1").unwrap_err();
        assert_eq!(
            classify_diesel(&serialization),
            ErrorClass::SerializationFailure
        );

        // Deadlock: each holds one row and asks for the other's.
        setup(
            &pg,
            "CREATE TABLE dl (id int PRIMARY KEY); INSERT INTO dl VALUES (1), (2); GRANT ALL ON dl TO app",
        );
        let (mut a, mut b) = (connect(), connect());
        a.batch_execute("BEGIN; UPDATE dl SET id = id WHERE id = 1")
            .unwrap();
        b.batch_execute("BEGIN; UPDATE dl SET id = id WHERE id = 2")
            .unwrap();
        let waiter = std::thread::spawn(move || {
            let r = a.batch_execute("UPDATE dl SET id = id WHERE id = 2");
            (a, r)
        });
        std::thread::sleep(Duration::from_millis(200));
        let r_b = b.batch_execute("UPDATE dl SET id = id WHERE id = 1");
        let (_a, r_a) = waiter.join().unwrap();
        let deadlock = r_a.err().or(r_b.err()).expect("one of them is the victim");
        assert_eq!(classify_diesel(&deadlock), ErrorClass::Deadlock);

        // Administrator shutdown: the backend is terminated.
        let mut c = connect();
        c.batch_execute("SET application_name = 'classify_kill'")
            .unwrap();
        pg.terminate_backends("classify_kill").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let killed = diesel::sql_query("SELECT 1").execute(&mut c).unwrap_err();
        assert!(
            classify_diesel(&killed).is_disconnect(),
            "{killed}: {:?}",
            classify_diesel(&killed)
        );
        let after = diesel::sql_query("SELECT 1").execute(&mut c).unwrap_err();
        assert!(classify_diesel(&after).is_disconnect(), "{after}");

        // The connection cut by the network (the proxy resets it).
        let proxy = proxied(&pg);
        let mut c = PgConnection::establish(&pg.url_via(proxy.port(), "sslmode=disable")).unwrap();
        proxy.sever_all();
        let cut = diesel::sql_query("SELECT 1").execute(&mut c).unwrap_err();
        assert_eq!(classify_diesel(&cut), ErrorClass::ConnectionLost, "{cut}");
    }

    // Too many connections for the role.
    pg.execute("ALTER ROLE app CONNECTION LIMIT 1").unwrap();
    // Closed sessions may take a moment to leave: wait for the one slot.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _held = loop {
        match PgConnection::establish(&url) {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let Err(refused) = PgConnection::establish(&url) else {
        panic!("the role's connection limit was not enforced")
    };
    assert_eq!(
        resilient_diesel::classify::classify_connection_error(&refused),
        ErrorClass::TooManyConnections,
        "{refused}"
    );
    pg.execute("ALTER ROLE app CONNECTION LIMIT -1").unwrap();

    // idle_session_timeout closes the session.
    pg.set_idle_session_timeout("app", Duration::from_millis(300))
        .unwrap();
    let mut c = connect();
    std::thread::sleep(Duration::from_millis(900));
    let idle = diesel::sql_query("SELECT 1").execute(&mut c).unwrap_err();
    assert_eq!(classify_diesel(&idle), ErrorClass::ConnectionLost, "{idle}");
}

#[test]
fn resolving_a_cut_keyed_commit_waits_on_the_key_lock_no_longer_than_the_resolution_timeout() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let proxy = proxied(&pg);
    let app = "retry_key_locked";
    // One connection: resolution opens a fresh one (not paused) that meets the key's lock.
    let pool = PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .application_name(app)
        .pool_size(1)
        .max_overflow(0)
        .build()
        .unwrap();
    let policy = RetryPolicy::builder()
        .verify_commit(false)
        .commit_resolution_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(100));
    let (to_main, from_body) = std::sync::mpsc::channel::<()>();
    let (to_body, from_main) = std::sync::mpsc::channel::<()>();
    let (p, pol) = (pool.clone(), policy.clone());
    let (result_tx, result_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let out = commit_with_key(&p, &pol, "order-7", |conn| {
            diesel::sql_query("INSERT INTO ledger (note) VALUES ('locked')").execute(conn)?;
            // The backend is stopped here, holding the key's row lock, before COMMIT.
            to_main.send(()).unwrap();
            from_main.recv().unwrap();
            Ok::<_, DieselError>(())
        });
        let _ = result_tx.send(out.map_err(|e| format!("{e:?}")));
    });
    from_body.recv().unwrap();
    let pause = pg.pause_backends(app).unwrap();
    to_body.send(()).unwrap();
    // While the backend still holds the lock, resolution must give up on its own.
    let outcome = result_rx.recv_timeout(Duration::from_secs(30));
    pause.resume();
    worker.join().unwrap();
    let outcome = outcome.expect("resolution waited for the lock instead of giving up in time");
    assert!(
        matches!(&outcome, Err(e) if e.starts_with("AmbiguousCommit")),
        "with the lock still held the outcome cannot be known: {outcome:?}"
    );
    // The resolution told the hung session (idle in the transaction: it had not read the
    // COMMIT) to end; once it runs again it ends, and its transaction with it. The caller
    // was told the outcome is unknown, and nothing was written twice.
    let mut conn = pool.get().unwrap();
    assert_none_left_idle_in_transaction(&mut conn, app);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'locked'"
        ),
        0
    );
}

/// Other sessions of the app's role, each left idle in a transaction that wrote a row: the
/// resolution of someone else's lost `COMMIT` must never end them.
fn bystanders(pg: &PgServer) -> Vec<PgConnection> {
    (0..2)
        .map(|i| {
            let mut c = PgConnection::establish(&pg.url_with("application_name=bystander"))
                .expect("a bystander session");
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO ledger (note) VALUES ('bystander {i}')"
            ))
            .expect("a bystander's open transaction");
            c
        })
        .collect()
}

/// Each bystander's transaction is still there: it commits now.
fn assert_bystanders_untouched(bystanders: Vec<PgConnection>) {
    for (i, mut c) in bystanders.into_iter().enumerate() {
        c.batch_execute("COMMIT")
            .unwrap_or_else(|e| panic!("bystander {i}'s open transaction was ended: {e}"));
    }
}

/// Waits (5 s at most) until no session of application `app` is left idle in a transaction.
fn assert_none_left_idle_in_transaction(conn: &mut PgConnection, app: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = '{app}' AND state = 'idle in transaction'"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count(conn, &sql) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        count(conn, &sql),
        0,
        "the session of the lost COMMIT is still open"
    );
}

/// A `COMMIT` lost on the way (the server never hears of the client again, as behind a
/// blackholed network): the server keeps the transaction open, idle in it, its outcome "in
/// progress" for hours with default settings. The resolution ends that session (and no
/// other), so the transaction can never commit, reads "aborted" and runs the body again:
/// committed once, with no server setting. Without the ending, the resolution times out
/// and the call fails as an ambiguous commit.
#[test]
fn a_commit_lost_on_the_way_is_ended_on_the_server_then_retried_and_committed_once() {
    let Some(pg) = server() else { return };
    setup(&pg, LEDGER);
    let proxy = proxied(&pg);
    let app = "retry_commit_lost";
    let pool = pool_via(&pg, &proxy, app);
    let policy = RetryPolicy::builder()
        .commit_resolution_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let bystanders = bystanders(&pg);
    let runs = AtomicU32::new(0);
    proxy.lose_before_forwarding(b"COMMIT");
    let out = commit_with_retry(&pool, &policy, |conn| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('lost')")
            .execute(conn)
            .map(drop)
    });
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        out.is_ok(),
        "the lost COMMIT's outcome must be decided, not left ambiguous: {out:?}"
    );
    assert_eq!(
        runs.load(Ordering::Relaxed),
        2,
        "the body runs again once its first transaction was ended"
    );
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM ledger WHERE note = 'lost'"),
        1
    );
    assert_none_left_idle_in_transaction(&mut conn, app);
    assert_bystanders_untouched(bystanders);
    assert!(
        test_support::captured_logs()
            .iter()
            .any(|l| l.contains("ended the session left idle in transaction")),
        "the ending is logged"
    );
}

/// The same for `commit_with_key`: the lost transaction holds the key's lock, which the
/// resolution's probe would wait for until the resolution timed out; ended, it releases it.
#[test]
fn a_keyed_commit_lost_on_the_way_is_ended_on_the_server_then_retried_and_committed_once() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let proxy = proxied(&pg);
    let app = "retry_key_lost";
    let pool = pool_via(&pg, &proxy, app);
    let policy = RetryPolicy::builder()
        .verify_commit(false)
        .commit_resolution_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let bystanders = bystanders(&pg);
    let runs = AtomicU32::new(0);
    proxy.lose_before_forwarding(b"COMMIT");
    let out = commit_with_key(&pool, &policy, "order-lost", |conn: &mut PgConnection| {
        runs.fetch_add(1, Ordering::Relaxed);
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('keyed lost')").execute(conn)
    });
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        matches!(out, Ok(Keyed::Committed(1))),
        "the lost COMMIT's outcome must be decided, not left ambiguous: {out:?}"
    );
    assert_eq!(runs.load(Ordering::Relaxed), 2);
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM ledger WHERE note = 'keyed lost'"
        ),
        1
    );
    assert_none_left_idle_in_transaction(&mut conn, app);
    assert_bystanders_untouched(bystanders);
}

/// Behind a transaction-mode pooler the resolution's question may reach another server, where
/// the lost transaction's 32-bit id belongs to someone else's transaction: nothing is ended
/// there, and the lost keyed commit stays ambiguous (the pooler, which saw its client go,
/// rolls such a transaction back itself).
#[test]
fn behind_a_transaction_mode_pooler_a_lost_keyed_commit_ends_no_session() {
    let Some(pg) = server() else { return };
    setup_keyed(&pg);
    let proxy = proxied(&pg);
    let app = "retry_key_lost_pooled";
    let pool = PgPool::builder(&pg.url_via(proxy.port(), "sslmode=disable"))
        .pooler(resilient_diesel::Pooler::Transaction)
        .application_name(app)
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    let policy = RetryPolicy::builder()
        .verify_commit(false)
        .commit_resolution_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    proxy.lose_before_forwarding(b"COMMIT");
    let out = commit_with_key(&pool, &policy, "order-lost", |conn: &mut PgConnection| {
        diesel::sql_query("INSERT INTO ledger (note) VALUES ('pooled lost')").execute(conn)
    });
    assert!(!proxy.trigger_armed(), "the fault fired");
    assert!(
        matches!(out, Err(RetryError::AmbiguousCommit { .. })),
        "{out:?}"
    );
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = '{app}' AND state = 'idle in transaction'"
            )
        ),
        1,
        "the lost transaction's session was ended behind a transaction-mode pooler"
    );
    proxy.sever_silenced();
}

/// The control for a `COMMIT` lost on the way: plain r2d2 at its defaults with the field
/// reports' naive retry loop. The lost transaction stays open on the server, holding its
/// locks; the retry of the same row waits behind it, here until the test lets the server
/// see the client gone (in the field, until the server notices: hours with default
/// settings).
#[test]
fn control_a_naive_retry_of_a_lost_commit_waits_behind_the_transaction_left_open() {
    let Some(pg) = server() else { return };
    setup(
        &pg,
        "CREATE TABLE orders (key text PRIMARY KEY); GRANT ALL ON orders TO app",
    );
    let proxy = proxied(&pg);
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            pg.url_via(proxy.port(), "sslmode=disable&application_name=naive_lost"),
        ))
        .unwrap();
    proxy.lose_before_forwarding(b"COMMIT");
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            // The field reports' loop: any error, sleep, try again, three times.
            let mut attempts = 0;
            let mut last = Err("not run".to_owned());
            for _ in 0..3 {
                attempts += 1;
                let mut conn = pool.get().unwrap();
                last = conn
                    .transaction::<_, DieselError, _>(|c| {
                        diesel::sql_query("INSERT INTO orders (key) VALUES ('order-9')").execute(c)
                    })
                    .map(drop)
                    .map_err(|e| e.to_string());
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = tx.send((attempts, last));
        })
    };
    let waiting = rx.recv_timeout(Duration::from_secs(4));
    assert!(
        waiting.is_err(),
        "the naive retry was expected to wait behind the open transaction, got {waiting:?}"
    );
    let mut conn = pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'naive_lost' AND wait_event_type = 'Lock'"
        ),
        1,
        "the retry waits on a lock"
    );
    drop(conn);
    // The server sees its client gone: the open transaction rolls back, the retry goes on.
    proxy.sever_silenced();
    let (attempts, last) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the retry never ended after the open transaction rolled back");
    worker.join().unwrap();
    println!("naive retry after the lost COMMIT: {attempts} attempts, {last:?}");
    assert_eq!(last, Ok(()));
    let mut conn = pool.get().unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM orders"), 1);
}
