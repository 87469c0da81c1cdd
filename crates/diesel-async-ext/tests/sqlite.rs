//! SQLite through diesel-async's `SyncConnectionWrapper<SqliteConnection>`: the pool, its
//! SQLite settings (and nothing meant for a server), `from_env`, retries with an idempotency
//! key, and cancellation (multi-threaded runtime: the wrapper blocks in `Drop` until a
//! cancelled call ends).
#![cfg(feature = "sqlite")]

use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use diesel_async_ext::retry::{
    commit_with_key, commit_with_retry, ensure_idempotency_table, Keyed, RetryPolicy,
};
use diesel_async_ext::SqlitePool;

#[derive(QueryableByName)]
struct Mode {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

#[derive(QueryableByName)]
struct Fk {
    #[diesel(sql_type = Integer)]
    foreign_keys: i32,
}

#[derive(QueryableByName)]
struct Busy {
    #[diesel(sql_type = Integer)]
    timeout: i32,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn db(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("app.db").display())
}

async fn count(pool: &SqlitePool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_connections_get_their_settings_and_nothing_meant_for_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::builder(&db(&dir))
        .pool_size(2)
        .max_overflow(0)
        .sqlite_busy_timeout(Duration::from_millis(1500))
        // PostgreSQL settings: accepted, never sent to SQLite.
        .application_name("ignored")
        .keepalives_idle(Duration::from_secs(5))
        .tcp_user_timeout(Some(Duration::from_secs(1)))
        .build()
        .await
        .unwrap();
    let mut conn = pool.get().await.unwrap();
    let mode: Mode = diesel::sql_query("PRAGMA journal_mode")
        .get_result(&mut conn)
        .await
        .unwrap();
    let fk: Fk = diesel::sql_query("PRAGMA foreign_keys")
        .get_result(&mut conn)
        .await
        .unwrap();
    let busy: Busy = diesel::sql_query("PRAGMA busy_timeout")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode.journal_mode, "wal");
    assert_eq!(fk.foreign_keys, 1);
    assert_eq!(busy.timeout, 1500);
    diesel::sql_query("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query("CREATE TABLE child (parent INTEGER REFERENCES parent(id))")
        .execute(&mut conn)
        .await
        .unwrap();
    let orphan = diesel::sql_query("INSERT INTO child VALUES (42)")
        .execute(&mut conn)
        .await;
    assert!(orphan.is_err(), "foreign keys are enforced");
    drop(conn);
    let stats = pool.stats();
    assert_eq!(stats.connects, 2, "{stats:?}");
    assert!(stats.probe_available);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_env_reads_the_same_variables_and_retries_write_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // This test binary's only reader of these variables.
    std::env::set_var("DATABASE_URL", db(&dir));
    std::env::set_var("DB_POOL_SIZE", "3");
    std::env::set_var("DB_MAX_OVERFLOW", "1");
    let pool = SqlitePool::from_env().await.unwrap();
    std::env::remove_var("DATABASE_URL");
    assert_eq!(pool.config().pool_size, 3);
    assert_eq!(pool.config().max_size(), 4);
    {
        let mut conn = pool.get().await.unwrap();
        ensure_idempotency_table(&mut *conn).await.unwrap();
        diesel::sql_query("CREATE TABLE events (id TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let policy = RetryPolicy::builder()
        .base_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    // 4 tasks x 10 writes, each in commit_with_retry (busy_timeout makes writers wait).
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (pool, policy) = (pool.clone(), policy.clone());
            tokio::spawn(async move {
                for i in 0..10 {
                    let id = format!("{w}-{i}");
                    commit_with_retry(&pool, &policy, async |c| {
                        diesel::sql_query("INSERT INTO events (id) VALUES (?)")
                            .bind::<Text, _>(&id)
                            .execute(c)
                            .await
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&pool, "SELECT count(*) AS n FROM events").await, 40);
    let insert = async |c: &mut _| {
        diesel::sql_query("INSERT INTO events (id) VALUES ('keyed')")
            .execute(c)
            .await
    };
    let first = commit_with_key(&pool, &policy, "job-7", insert)
        .await
        .unwrap();
    let again = commit_with_key(&pool, &policy, "job-7", insert)
        .await
        .unwrap();
    assert_eq!(first, Keyed::Committed(1));
    assert_eq!(again, Keyed::AlreadyCommitted);
    assert_eq!(count(&pool, "SELECT count(*) AS n FROM events").await, 41);
}

/// Polls `inner` at most `polls` times, then drops it (a cancelled request): walks through
/// every await point of a request, one per value of `polls`.
struct CancelAfter<F> {
    inner: std::pin::Pin<Box<F>>,
    polls: u32,
}

impl<F: std::future::Future> std::future::Future for CancelAfter<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.polls == 0 {
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        self.inner.as_mut().poll(cx).map(Some)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sqlite_transaction_never_stays_in_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::builder(&db(&dir))
        .pool_size(2)
        .max_overflow(0)
        .sqlite_busy_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    diesel::sql_query("CREATE TABLE t (x INTEGER)")
        .execute(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    let policy = RetryPolicy::no_retry();
    let (mut completed, mut cancelled) = (0, 0);
    for polls in 0..200u32 {
        let request = commit_with_retry(&pool, &policy, async |c| {
            diesel::sql_query("INSERT INTO t VALUES (1)")
                .execute(c)
                .await?;
            diesel::sql_query("INSERT INTO t VALUES (2)")
                .execute(c)
                .await
        });
        let done = CancelAfter {
            inner: Box::pin(request),
            polls,
        }
        .await;
        match done {
            Some(result) => {
                result.unwrap();
                completed += 1;
            }
            None => cancelled += 1,
        }
        // Both pooled connections can write at once after every cancellation point: none is
        // left holding a transaction (its write lock would make the other wait, then fail).
        let mut a = pool.get().await.unwrap();
        let mut b = pool.get().await.unwrap();
        for conn in [&mut a, &mut b] {
            diesel::sql_query("INSERT INTO t VALUES (3)")
                .execute(conn)
                .await
                .unwrap_or_else(|e| {
                    panic!("after {polls} polls: a connection was left in a transaction: {e}")
                });
        }
        if completed >= 3 {
            break;
        }
    }
    let closed = pool.stats().closed;
    println!(
        "sqlite cancellation loop: {cancelled} requests dropped after 0..{cancelled} polls, \
         {completed} completed; closed {closed:?}"
    );
    assert!(completed >= 3, "the loop must reach completion");
    assert!(
        closed.broken >= 1,
        "requests dropped inside their transaction were closed"
    );
}

/// A new file (journal `delete`) with a reader holding its shared lock, in an open
/// transaction on a thread of its own, until the returned sender sends or is dropped (or
/// `hold` passes). Switching the file to WAL needs it to itself.
fn hold_a_read_lock(
    dir: &tempfile::TempDir,
    hold: Duration,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let path = dir.path().join("app.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut conn = diesel::SqliteConnection::establish(path.to_str().unwrap())
            .expect("the reader's connection");
        conn.batch_execute(
            "CREATE TABLE t (id INTEGER); INSERT INTO t VALUES (1); BEGIN; SELECT id FROM t;",
        )
        .expect("set up the file and take the read lock");
        locked_tx.send(()).expect("tell the test");
        let _ = release_rx.recv_timeout(hold);
        conn.batch_execute("COMMIT").expect("end the read");
    });
    locked_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader did not take its lock within 10 s");
    (release_tx, reader)
}

/// Switching a new file to WAL needs it to itself; SQLite reports a lock found there as
/// "database is locked" once `busy_timeout` has run out (two connects switching at the same
/// instant find each other so without waiting: the race the retry answers). A 1 ms
/// `busy_timeout` and a reader's lock held 60 ms make that failure on demand: the connect
/// tries again until the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_switch_that_finds_the_file_locked_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let (release, reader) = hold_a_read_lock(&dir, Duration::from_secs(10));
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        let _ = release.send(());
    });
    let built = tokio::time::timeout(
        Duration::from_secs(10),
        SqlitePool::builder(&db(&dir))
            .pool_size(1)
            .max_overflow(0)
            .sqlite_busy_timeout(Duration::from_millis(1))
            .pool_timeout(Duration::from_secs(5))
            .build(),
    )
    .await
    .expect("the pool's first connect did not return within 10 s");
    releaser.join().unwrap();
    reader.join().unwrap();
    let pool = built.unwrap_or_else(|e| {
        panic!("a WAL switch that found the file locked for 60 ms was not tried again: {e}")
    });
    let mode: Mode = diesel::sql_query("PRAGMA journal_mode")
        .get_result(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert_eq!(mode.journal_mode, "wal");
}

/// The retry is bounded: a lock that stays (a long reader) fails the connect with SQLite's
/// own message after 20 tries 10 ms apart, well before the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_switch_that_stays_locked_fails_with_sqlites_message_within_its_tries() {
    let dir = tempfile::tempdir().unwrap();
    let (release, reader) = hold_a_read_lock(&dir, Duration::from_secs(5));
    let built = tokio::time::timeout(
        Duration::from_secs(3),
        SqlitePool::builder(&db(&dir))
            .pool_size(1)
            .max_overflow(0)
            .sqlite_busy_timeout(Duration::from_millis(1))
            .pool_timeout(Duration::from_secs(10))
            .build(),
    )
    .await;
    drop(release);
    reader.join().unwrap();
    let built = built.expect(
        "the pool's first connect was still trying 3 s into a lock held 5 s: its retry is \
         not bounded",
    );
    let Err(err) = built else {
        panic!("the switch succeeded while another connection held the file");
    };
    assert!(err.to_string().contains("database is locked"), "{err}");
}

/// A "read-only transaction" error makes the next checkout ask the server whether it became a
/// standby. An embedded database has no standby: the question is answered "no" without a
/// round trip, whatever text brought it up (here a trigger's own `RAISE` in PostgreSQL's
/// words), and the connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_database_is_never_taken_for_a_standby() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let dir = tempfile::tempdir().unwrap();
    // Set up outside the pool: a trigger's `BEGIN ... END` looks like a transaction opened
    // behind Diesel's back, which closes the pool's connection at checkin.
    diesel::SqliteConnection::establish(dir.path().join("app.db").to_str().unwrap())
        .unwrap()
        .batch_execute(
            "CREATE TABLE t (x INTEGER); \
             CREATE TRIGGER no_writes BEFORE INSERT ON t BEGIN \
             SELECT RAISE(ABORT, 'cannot execute INSERT in a read-only transaction'); END;",
        )
        .unwrap();
    let pool = SqlitePool::builder(&db(&dir))
        .pool_size(1)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    let mut conn = pool.get().await.unwrap();
    let refused = diesel::sql_query("INSERT INTO t VALUES (1)")
        .execute(&mut conn)
        .await
        .expect_err("the trigger refuses every insert");
    assert!(
        refused.to_string().contains("read-only transaction"),
        "{refused}"
    );
    drop(conn);
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap();
    let stats = pool.stats();
    assert_eq!(
        (stats.connects, stats.closed.broken),
        (1, 0),
        "the SQLite connection was taken for a standby and replaced: {stats:?}"
    );
}

/// `get_owned` (the form an axum extractor or a spawned task needs) goes through the pool's
/// gate, budget and stats like `get`: it is counted, and it waits its turn instead of
/// slipping past the wrapped bb8 pool (which `Deref` would otherwise reach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_owned_is_a_checkout_of_this_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::builder(&db(&dir))
        .pool_size(1)
        .max_overflow(0)
        .pool_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let before = pool.stats().checkouts;
    let owned = pool.get_owned().await.expect("an owned checkout");
    let held = tokio::spawn(async move {
        let mut conn = owned;
        diesel::sql_query("SELECT 1 AS n")
            .get_result::<Count>(&mut conn)
            .await
            .map(|c| c.n)
    });
    assert_eq!(held.await.unwrap().unwrap(), 1);
    assert_eq!(pool.stats().checkouts, before + 1, "counted as a checkout");
    assert_eq!(pool.stats().in_use, 0, "returned when the task dropped it");

    let first = pool.get_owned().await.unwrap();
    assert_eq!(pool.stats().in_use, 1, "the pool sees it checked out");
    let second = tokio::time::timeout(Duration::from_secs(5), pool.get_owned())
        .await
        .expect("the pool's own pool_timeout (300 ms) ends the wait");
    assert!(
        second.is_err(),
        "a pool of 1 with its connection out has nothing to give"
    );
    assert!(pool.stats().timeouts >= 1, "the timeout is counted");
    drop(first);
}

/// The policy's own idempotency table is the one the async `commit_with_key` uses, and an
/// over-long key is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_to_the_policy_table_and_long_keys_are_refused() {
    use diesel_async::SimpleAsyncConnection;
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::builder(&db(&dir)).build().await.unwrap();
    let policy = RetryPolicy::builder()
        .idempotency_table("webhook_keys")
        .build()
        .unwrap();
    {
        let mut conn = pool.get().await.unwrap();
        conn.batch_execute(&format!(
            "{}; CREATE TABLE hooks (id INTEGER PRIMARY KEY);",
            policy.idempotency_table().create_sql()
        ))
        .await
        .unwrap();
    }
    let insert = async |conn: &mut diesel_async::sync_connection_wrapper::SyncConnectionWrapper<
        diesel::SqliteConnection,
    >| {
        diesel::sql_query("INSERT INTO hooks DEFAULT VALUES")
            .execute(conn)
            .await
    };
    let first = commit_with_key(&pool, &policy, "stripe:evt_1", insert).await;
    assert_eq!(first.unwrap(), Keyed::Committed(1));
    let again = commit_with_key(&pool, &policy, "stripe:evt_1", insert).await;
    assert_eq!(again.unwrap(), Keyed::AlreadyCommitted);
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM webhook_keys").await,
        1
    );
    let long = "k".repeat(256);
    let refused = commit_with_key(&pool, &policy, &long, insert).await;
    assert!(
        matches!(&refused, Err(diesel_async_ext::RetryError::Permanent(e)) if e.to_string().contains("256")),
        "{refused:?}"
    );
    assert_eq!(count(&pool, "SELECT count(*) AS n FROM hooks").await, 1);
}

/// A key insert that fails for any reason other than the key's unique violation (here: the
/// idempotency table was never created) is returned as that error, never taken for "already
/// committed", which would drop the body's write without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_insert_failing_for_another_reason_is_an_error_not_already_committed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::builder(&db(&dir)).build().await.unwrap();
    let runs = std::sync::atomic::AtomicU32::new(0);
    let body = async |_: &mut diesel_async::sync_connection_wrapper::SyncConnectionWrapper<
        diesel::SqliteConnection,
    >| {
        runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, diesel::result::Error>(())
    };
    let out = commit_with_key(&pool, &RetryPolicy::default(), "job-9", body).await;
    match out {
        Err(diesel_async_ext::RetryError::Permanent(e)) => assert!(
            e.to_string().contains("no such table"),
            "the error says what failed: {e}"
        ),
        other => panic!("no idempotency table: expected the insert's error, got {other:?}"),
    }
    assert_eq!(
        std::sync::atomic::AtomicU32::load(&runs, std::sync::atomic::Ordering::Relaxed),
        0,
        "the body never ran"
    );
}
