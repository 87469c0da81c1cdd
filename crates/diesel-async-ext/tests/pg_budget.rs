//! Budget classes under async load on a private PostgreSQL server: the reserved class always
//! gets in while another class saturates the budget, the server never sees more than the
//! total (`pg_stat_activity`), borrowed headroom comes back when another class waits, and a
//! budget timeout names the class and the budget. The control: one plain bb8 pool sized to the
//! total, shared by both kinds of work, locks the ad-hoc work out.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use diesel_async::AsyncPgConnection;
use diesel_async_ext::{BuildError, Class, ClassPools};

type Pools = ClassPools<AsyncPgConnection>;

async fn pools(pg: &PgServer, app: &str, total: u32, automation: Class, adhoc: Class) -> Pools {
    ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), total)
        .class("automation", automation)
        .class("adhoc", adhoc)
        .configure(|b| b.application_name(app).pool_timeout(Duration::from_secs(3)))
        .build()
        .await
        .unwrap()
}

/// Polls the server's count of `app` backends until `stop`; returns the most seen.
fn watch_backends(pg: &PgServer, app: &str, stop: Arc<AtomicBool>, max: Arc<AtomicI64>) {
    while !AtomicBool::load(&stop, Ordering::SeqCst) {
        let n = pg.count_backends(app).unwrap();
        max.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `tasks` tasks that check automation connections out, hold each a few ms, until `stop`.
fn saturate(
    pools: &Pools,
    tasks: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..tasks)
        .map(|_| {
            let pool = pools.class("automation").unwrap().clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut served = 0;
                while !AtomicBool::load(&stop, Ordering::SeqCst) {
                    if let Ok(mut conn) = pool.get().await {
                        one(&mut conn).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        served += 1;
                    }
                }
                served
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_class_always_gets_in_and_the_server_never_sees_more_than_the_total() {
    let Some(pg) = server() else { return };
    let app = "budget_load";
    let total = 8;
    // Automation may take everything but ad-hoc's floor of 1.
    let pools = pools(
        &pg,
        app,
        total,
        Class::new().pool_size(4),
        Class::new().reserved(1),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicI64::new(0));
    let pg = Arc::new(pg);
    let watch = {
        let (pg, stop, max, app) = (pg.clone(), stop.clone(), max.clone(), app.to_owned());
        std::thread::spawn(move || watch_backends(&pg, &app, stop, max))
    };
    let workers = saturate(&pools, 16, &stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let adhoc = pools.class("adhoc").unwrap();
    let mut waits = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut conn = adhoc.get().await.expect("ad-hoc work must always get in");
        waits.push(t.elapsed());
        one(&mut conn).await.unwrap();
        assert!(pools.budget().is_healthy(), "{}", pools.budget_snapshot());
    }
    stop.store(true, Ordering::SeqCst);
    let served: u32 = futures_join(workers).await;
    watch.join().unwrap();
    waits.sort();
    let seen = AtomicI64::load(&max, Ordering::SeqCst);
    println!(
        "budget {total}: 200/200 ad-hoc checkouts while 16 automation tasks saturated it \
         ({served} automation checkouts); ad-hoc wait p50 {:?} max {:?}; most backends seen {seen}",
        waits[100], waits[199]
    );
    println!("{}", pools.status());
    assert!(seen <= i64::from(total), "the server saw {seen} > {total}");
    assert!(served > 0);
    assert_no_secret_in_logs();
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<u32>>) -> u32 {
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_one_plain_bb8_pool_sized_to_the_total_locks_adhoc_out() {
    let Some(pg) = server() else { return };
    let pool: Control = bb8::Pool::builder()
        .max_size(8)
        .connection_timeout(Duration::from_millis(500))
        .build(
            diesel_async::pooled_connection::AsyncDieselConnectionManager::new(
                pg.url_with("sslmode=disable&application_name=bb8_budget"),
            ),
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                // Automation saturates the pool: each worker that gets a connection keeps it
                // until the end; the others keep asking.
                while !AtomicBool::load(&stop, Ordering::SeqCst) {
                    if let Ok(mut conn) = pool.get().await {
                        one(&mut conn).await.unwrap();
                        while !AtomicBool::load(&stop, Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                0
            })
        })
        .collect();
    // Until all 8 are held.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pool.state().idle_connections > 0 || pool.state().connections < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers never took all 8"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut locked_out = 0;
    for _ in 0..10 {
        if pool.get().await.is_err() {
            locked_out += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    futures_join(workers).await;
    println!("control: ad-hoc locked out of a shared bb8 pool in {locked_out} of 10 tries");
    assert!(
        locked_out > 0,
        "the shared pool was expected to lock ad-hoc work out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_idle_headroom_goes_back_when_another_class_waits() {
    let Some(pg) = server() else { return };
    let app = "budget_reclaim";
    // Ad-hoc keeps up to 5 open (1 reserved, 4 borrowed); automation may use 5.
    let pools = pools(
        &pg,
        app,
        6,
        Class::new().max_overflow(5),
        Class::new().reserved(1).pool_size(5),
    )
    .await;
    let adhoc = pools.class("adhoc").unwrap();
    let held: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(adhoc.get().await.unwrap());
        }
        v
    };
    drop(held);
    assert_eq!(
        settle_backends(&pg, app, 5).await,
        5,
        "ad-hoc keeps its 5 idle"
    );
    // Automation now needs 4 at once: 1 is free, 3 must come back from ad-hoc's idle ones.
    let automation = pools.class("automation").unwrap();
    let started = Instant::now();
    let gets: Vec<_> = (0..4)
        .map(|_| {
            let pool = automation.clone();
            tokio::spawn(async move {
                let mut conn = pool.get().await.expect("borrowed headroom must come back");
                one(&mut conn).await.unwrap();
                let at = started.elapsed();
                tokio::time::sleep(Duration::from_millis(300)).await;
                at
            })
        })
        .collect();
    // How fast ad-hoc's maintenance gives permits back once automation waits (connects in a
    // debug build take ~80 ms of SCRAM each: measured separately from the reclaim).
    let (mut first, mut all) = (None, None);
    while all.is_none() && started.elapsed() < Duration::from_secs(10) {
        let n = adhoc.stats().closed.reclaimed;
        if n >= 1 && first.is_none() {
            first = Some(started.elapsed());
        }
        if n >= 3 {
            all = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut served = Vec::new();
    for g in gets {
        served.push(g.await.unwrap());
    }
    let snap = pools.budget_snapshot();
    println!(
        "reclaim: first permit back from ad-hoc after {first:?}, all 3 after {all:?}; \
         automation served at {served:?}; {snap}"
    );
    assert!(
        all.is_some(),
        "ad-hoc must give 3 idle borrowed connections back"
    );
    // Only what automation waited for: ad-hoc keeps its other 2 idle connections.
    let reclaimed = adhoc.stats().closed.reclaimed;
    assert_eq!(
        reclaimed, 3,
        "ad-hoc gave {reclaimed} connections back for automation's 3; {snap}"
    );
    assert!(snap.in_use <= 6, "{snap}");
    assert!(pg.count_backends(app).unwrap() <= 6);
}

#[tokio::test]
async fn a_budget_timeout_names_the_class_and_the_budget_state() {
    let Some(pg) = server() else { return };
    let app = "budget_timeout";
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class(
            "adhoc",
            // Long enough that a checkout given less (below) times out while its connect
            // is still queued for a permit (the connect waits 80% of it), even on a loaded
            // machine.
            Class::new().pool_timeout(Duration::from_secs(3)),
        )
        .configure(|b| b.application_name(app))
        .build()
        .await
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let _a = automation.get().await.unwrap();
    let _b = automation.get().await.unwrap();
    let err = pools
        .class("adhoc")
        .unwrap()
        .get()
        .await
        .err()
        .expect("a timeout");
    println!("budget timeout: {err}");
    assert!(err.is_timeout() && err.is_budget(), "{err}");
    let text = err.to_string();
    assert!(text.contains("\"adhoc\""), "{text}");
    assert!(text.contains("automation: 2/2 in use"), "{text}");
    assert!(!text.contains(PgServer::PASSWORD));
    // A checkout that gives up while its connect is still queued for a permit (its own
    // timeout is shorter than the connect's permit wait) names the queue.
    let err = pools
        .class("adhoc")
        .unwrap()
        .get_timeout(Duration::from_millis(1000))
        .await
        .err()
        .expect("a timeout");
    let text = err.to_string();
    assert!(err.is_timeout() && err.is_budget(), "{err}");
    assert!(
        text.contains("\"adhoc\" has 1 connect(s) waiting for a permit"),
        "{text}"
    );
    // A checkout that timed out waiting for its own class's connections in use names no
    // budget queue: none of its connects waited.
    let err = automation
        .get_timeout(Duration::from_millis(150))
        .await
        .err()
        .expect("a timeout");
    assert!(err.is_timeout() && !err.is_budget(), "{err}");
    assert!(!err.to_string().contains("waiting for a permit"), "{err}");
    // Nothing leaked: the connects that waited for the permit left the queue.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let snap = pools.budget_snapshot();
        if snap.classes[1].waiters == 0 {
            assert_eq!(snap.classes[1].in_use, 0, "{snap}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a connect stayed queued for a permit nobody waits for: {snap}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn impossible_budgets_are_rejected_when_built() {
    let url = "postgres://app@127.0.0.1:1/app?sslmode=disable";
    let cases = [
        (
            Class::new().reserved(5),
            Class::new().reserved(6),
            "reserve",
        ),
        (Class::new().pool_size(20), Class::new(), "total"),
    ];
    for (a, b, needle) in cases {
        let err = ClassPools::<AsyncPgConnection>::builder(url, 10)
            .class("a", a)
            .class("b", b)
            .build()
            .await
            .expect_err("rejected");
        assert!(matches!(err, BuildError::Budget(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
}

#[tokio::test]
async fn the_server_capacity_check_says_whether_the_budget_fits() {
    let Some(pg) = server() else { return };
    let small = pools(
        &pg,
        "budget_capacity",
        8,
        Class::new().pool_size(1),
        Class::new().reserved(1),
    )
    .await;
    let fits = small.check_server_capacity().await.unwrap();
    println!("{fits}");
    assert!(fits.fits(), "{fits}");
    let huge = pools(
        &pg,
        "budget_capacity",
        500,
        Class::new().pool_size(1),
        Class::new().reserved(1),
    )
    .await;
    let too_big = huge.check_server_capacity().await.unwrap();
    println!("{too_big}");
    assert!(!too_big.fits());
    assert!(
        too_big.to_string().contains("cannot be opened"),
        "{too_big}"
    );
}

/// Query logging, as applications install it: replaces the pool's own instrumentation.
struct QueryLog;

impl diesel::connection::Instrumentation for QueryLog {
    fn on_connection_event(&mut self, _event: diesel::connection::InstrumentationEvent<'_>) {}
}

#[tokio::test]
async fn replacing_a_connections_instrumentation_never_lets_it_escape_the_budget() {
    use diesel_async::AsyncConnection;
    let Some(pg) = server() else { return };
    let app = "budget_instrumented_async";
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class(
            "adhoc",
            Class::new().pool_timeout(Duration::from_millis(500)),
        )
        .configure(|b| b.application_name(app))
        .build()
        .await
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    for round in 0..2 {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut conn = automation.get().await.unwrap();
            conn.set_instrumentation(QueryLog);
            assert_eq!(one(&mut conn).await, Ok(1));
            held.push(conn);
        }
        assert!(
            adhoc.get().await.is_err(),
            "round {round}: the budget of 2 is spent, yet adhoc got a third connection"
        );
        let seen = pg.count_backends(app).unwrap();
        assert!(
            seen <= 2,
            "round {round}: the server saw {seen} backends for a budget of 2"
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = adhoc
        .get()
        .await
        .expect("adhoc after automation returned its connections");
    assert_eq!(one(&mut conn).await, Ok(1));
    assert!(pg.count_backends(app).unwrap() <= 2);
}

/// Query events seen by the application's own default instrumentation.
static APP_EVENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct CountingInstrumentation;

impl diesel::connection::Instrumentation for CountingInstrumentation {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if matches!(
            event,
            diesel::connection::InstrumentationEvent::FinishQuery { .. }
        ) {
            APP_EVENTS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A dedicated connection (for `LISTEN`, say) of a budget class takes a budget permit, held
/// until the connection is dropped, and its queries still reach the application's own
/// default instrumentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_connection_holds_a_permit_until_dropped_and_keeps_the_apps_instrumentation() {
    let Some(pg) = server() else { return };
    // Counting only: harmless to the other tests of this binary.
    let _ =
        diesel::connection::set_default_instrumentation(|| Some(Box::new(CountingInstrumentation)));
    let pools = pools(
        &pg,
        "adedicated",
        3,
        Class::new().pool_size(1).max_overflow(0),
        Class::new().reserved(1),
    )
    .await;
    let before = pools.budget_snapshot().in_use;
    let mut conn = pools
        .class("automation")
        .unwrap()
        .dedicated_connection()
        .await
        .expect("a dedicated connection");
    assert_eq!(
        pools.budget_snapshot().in_use,
        before + 1,
        "{}",
        pools.budget_snapshot()
    );
    let seen = APP_EVENTS.load(Ordering::SeqCst);
    one(&mut conn).await.expect("a query");
    assert!(
        APP_EVENTS.load(Ordering::SeqCst) > seen,
        "the application's instrumentation no longer sees the dedicated connection's queries"
    );
    drop(conn);
    assert_eq!(
        pools.budget_snapshot().in_use,
        before,
        "the permit went back with the connection: {}",
        pools.budget_snapshot()
    );
}

/// While another class waits for headroom that is all in use (nothing idle to give back), the
/// lending class's maintenance waits for a checkin instead of spinning. The pools run on a
/// single-threaded runtime of their own (every task of both pools on one thread): a second of
/// that wait must cost the thread little CPU, and a maintenance loop that never yields would
/// starve the runtime, which the test thread sees as no answer within 20 s.
#[test]
fn a_reclaim_with_nothing_idle_to_give_back_waits_without_spinning() {
    let Some(pg) = server() else { return };
    let url = pg.url_with("sslmode=disable");
    let (tx, rx) = std::sync::mpsc::channel();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pools = ClassPools::<AsyncPgConnection>::builder(&url, 2)
                .class("automation", Class::new().pool_size(2).max_overflow(0))
                .class("adhoc", Class::new())
                .configure(|b| {
                    b.application_name("budget_no_spin")
                        .pool_timeout(Duration::from_secs(3))
                })
                .build()
                .await
                .unwrap();
            let automation = pools.class("automation").unwrap();
            let _a = automation.get().await.unwrap();
            let _b = automation.get().await.unwrap();
            let adhoc = pools.class("adhoc").unwrap().clone();
            let waiter = tokio::spawn(async move { adhoc.get().await.map(drop) });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let before = test_support::this_thread_cpu();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let used = test_support::this_thread_cpu() - before;
            let _ = tx.send(used);
            let _ = done.send(waiter.await.unwrap().is_err());
        });
    });
    let used = rx.recv_timeout(Duration::from_secs(20)).expect(
        "the pools' runtime made no progress in 20 s: the maintenance loop never yields \
         while another class waits for headroom that is all in use",
    );
    println!("a second of reclaim pressure with nothing idle: {used:?} of CPU");
    assert!(
        used < Duration::from_millis(400),
        "the maintenance spun while waiting for a checkin: {used:?} of CPU in 1 s"
    );
    let timed_out = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("ad-hoc's checkout ended within 20 s");
    assert!(timed_out, "the budget is spent: ad-hoc times out");
}

/// Opens a transaction through Diesel's manager (not a test transaction): the checkin closes
/// the connection (bb8's and ours alike).
async fn open_transaction(conn: &mut AsyncPgConnection) {
    use diesel_async::{AsyncConnection, TransactionManager};
    <AsyncPgConnection as AsyncConnection>::TransactionManager::begin_transaction(conn)
        .await
        .unwrap();
}

/// Budget `n` with one class, `automation`, of `n` for `app` (10 s pool timeout).
async fn one_class(pg: &PgServer, app: &str, n: u32) -> Pools {
    ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), n)
        .class("automation", Class::new().pool_size(n).max_overflow(0))
        .configure(|b| {
            b.application_name(app)
                .pool_timeout(Duration::from_secs(10))
        })
        .build()
        .await
        .unwrap()
}

/// Budget `n` with one class of `n` for `app`, and `n` of its connections checked out, each
/// inside a transaction Diesel's manager opened (not a test transaction): the checkin closes
/// each (bb8's and ours alike).
async fn closing_on_checkin(
    pg: &PgServer,
    app: &str,
    n: u32,
) -> (
    Pools,
    Vec<bb8::PooledConnection<'static, diesel_async_ext::ExtManager<AsyncPgConnection>>>,
) {
    let pools = one_class(pg, app, n).await;
    let pool = pools.class("automation").unwrap().clone();
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = pool.get_owned().await.unwrap();
        one(&mut conn).await.unwrap();
        open_transaction(&mut conn).await;
        held.push(conn);
    }
    (pools, held)
}

/// A closed connection's permit comes back only once the server let its session go: the
/// backend keeps its socket open until its process has exited, and the pool waits, in a task
/// of its own, for that end-of-file on its duplicate of the socket (bounded). Here the
/// backend is stopped when the connection closes and continued 300 ms later: the
/// replacement must not connect while the server still counts the old session. The control
/// below shows plain bb8 connecting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connections_permit_comes_back_only_once_the_server_let_its_session_go() {
    let Some(pg) = server() else { return };
    let app = "abudget_confirm_close";
    let (pools, mut held) = closing_on_checkin(&pg, app, 1).await;
    let pause = pg.pause_backends(app).expect("the backend is there");
    let resumer = pause.resume_after(Duration::from_millis(300));
    drop(held.pop());
    let started = Instant::now();
    let mut again = pools.class("automation").unwrap().get().await.unwrap();
    let waited = started.elapsed();
    let seen = pg.count_backends(app).unwrap();
    one(&mut again).await.unwrap();
    resumer.join().unwrap();
    assert_eq!(
        seen, 1,
        "the replacement connected while the server still counted the closed session: {seen} \
         backends for a budget of 1 (it waited {waited:?})"
    ); // The backend went on after 300 ms and left at once: the permit came back then, not at
       // the bound (1 s), which is what a server that never read our end of the stream gives.
    assert!(
        waited < Duration::from_millis(800),
        "the permit came back after {waited:?}, at the bound: the server did not see the \
         connection's end"
    );
}

/// Connections opened together each know their own socket: several new sockets to the
/// server's port at once are told apart by a round trip on the new connection (whose byte
/// counters only its own socket advances), so every one of them waits for its own session to
/// go. Four connects at once, each closed with its backend stopped for 300 ms: the server never
/// counts more than the budget of 4. Without the tiebreak, the connects that overlapped know no
/// socket and release their permit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_together_each_wait_for_their_own_session_to_go() {
    let Some(pg) = server() else { return };
    let app = "abudget_confirm_together";
    let pools = one_class(&pg, app, 4).await;
    let pool = pools.class("automation").unwrap().clone();
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.get_owned().await.unwrap();
                one(&mut conn).await.unwrap();
                open_transaction(&mut conn).await;
                conn
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in opened {
        held.push(task.await.unwrap());
    }
    let pause = pg.pause_backends(app).expect("the backends are there");
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicI64::new(0));
    let pg = Arc::new(pg);
    let watcher = {
        let (pg, stop, max) = (pg.clone(), stop.clone(), max.clone());
        std::thread::spawn(move || watch_backends(&pg, app, stop, max))
    };
    let resumer = pause.resume_after(Duration::from_millis(300));
    drop(held);
    let again: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.get_owned().await.unwrap();
                one(&mut conn).await.unwrap();
                conn
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in again {
        held.push(task.await.unwrap());
    }
    resumer.join().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let most = max.load(Ordering::SeqCst);
    assert!(
        most <= 4,
        "the server counted {most} backends for a budget of 4: a connection opened beside the \
         others did not wait for its own session to go"
    );
    drop(held);
}

/// The wait is bounded: with the closed sessions' backends stopped for good, the first
/// permit comes back after one bound (the validation timeout, at most 1 s), and the close of
/// another connection not heard from since that wait began does not wait at all: one bound
/// per outage, not one per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_server_does_not_answer_holds_the_permit_one_bound_and_then_closes_stop_waiting(
) {
    let Some(pg) = server() else { return };
    let app = "abudget_confirm_outage";
    let (pools, mut held) = closing_on_checkin(&pg, app, 2).await;
    let pause = pg.pause_backends(app).expect("the backends are there");
    let pool = pools.class("automation").unwrap().clone();
    drop(held.pop());
    let started = Instant::now();
    let mut again = tokio::time::timeout(Duration::from_secs(8), pool.get_owned())
        .await
        .expect("the permit never came back: the wait for a stopped backend is unbounded")
        .unwrap();
    let took = started.elapsed();
    one(&mut again).await.unwrap();
    assert!(
        took >= Duration::from_millis(900),
        "the replacement came after {took:?}: the close did not wait for the server at all"
    );
    // The other connection, also stopped, has not heard from the server since that wait
    // began: its close does not wait, and its permit is back at once.
    drop(held.pop());
    let started = Instant::now();
    let mut third = tokio::time::timeout(Duration::from_secs(8), pool.get())
        .await
        .expect("no connection within 8 s")
        .unwrap();
    let took = started.elapsed();
    one(&mut third).await.unwrap();
    pause.resume();
    assert!(
        took < Duration::from_millis(700),
        "the close right after a wait ran out waited again ({took:?}): one bound per outage, \
         not one per connection"
    );
}

/// After a wait ran out, the connections the pool opens as it recovers still wait for their
/// own sessions to go: the one that replaced the unanswered close is closed with its backend
/// stopped for 300 ms, and its replacement must not connect while the server still counts it.
/// (A pause of every close for a while after an outage let the pool above its budget just as
/// it reconnects.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_after_an_outage_still_wait_for_their_own_session_to_go() {
    let Some(pg) = server() else { return };
    let app = "abudget_confirm_after_outage";
    let (pools, mut held) = closing_on_checkin(&pg, app, 1).await;
    let pool = pools.class("automation").unwrap().clone();
    let stopped = pg.pause_backends(app).expect("the backend is there");
    drop(held.pop());
    let mut again = tokio::time::timeout(Duration::from_secs(8), pool.get_owned())
        .await
        .expect("the permit never came back after the bound")
        .unwrap();
    one(&mut again).await.unwrap();
    // The old backend goes on and exits (it read our end of the stream): one session left.
    stopped.resume();
    pg.wait_backends_at_most(app, 1, Duration::from_secs(5))
        .expect("the unanswered session ends once its backend goes on");
    open_transaction(&mut again).await;
    let pause = pg.pause_backends(app).expect("the new backend is there");
    let resumer = pause.resume_after(Duration::from_millis(300));
    drop(again);
    let mut third = tokio::time::timeout(Duration::from_secs(8), pool.get())
        .await
        .expect("no connection within 8 s")
        .unwrap();
    let seen = pg.count_backends(app).unwrap();
    one(&mut third).await.unwrap();
    resumer.join().unwrap();
    assert_eq!(
        seen, 1,
        "after an outage, the replacement connected while the server still counted the \
         closed session: {seen} backends for a budget of 1"
    );
}

/// Control: plain bb8 at its defaults over diesel-async's manager, sized to the same 1
/// connection. A connection returned inside a transaction is broken to bb8, which drops it
/// and connects anew at the next checkout: with the old backend stopped, the server counts
/// 2 sessions for a pool of 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plain_bb8_replaces_a_closed_connection_while_the_server_still_counts_it() {
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    let Some(pg) = server() else { return };
    let app = "abudget_confirm_control";
    let pool = bb8::Pool::builder()
        .max_size(1)
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
            pg.url_with(&format!("sslmode=disable&application_name={app}")),
        ))
        .await
        .unwrap();
    let mut conn = pool.get().await.unwrap();
    one(&mut conn).await.unwrap();
    open_transaction(&mut conn).await;
    let pause = pg.pause_backends(app).expect("the backend is there");
    drop(conn);
    let mut again = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("no connection within 10 s")
        .unwrap();
    let seen = pg.count_backends(app).unwrap();
    one(&mut again).await.unwrap();
    pause.resume();
    assert_eq!(
        seen, 2,
        "the control did not reproduce the overlap: the server counted {seen} sessions"
    );
}

/// A checkout's validation hedges a slow ping with a fresh connect. When the ping wins while
/// the connect is still under way, the connect is not dropped half-way: it finishes on its
/// own task and its connection closes like any other, its budget permit held until the
/// server let the session go. Dropped half-way (here: inside the after-connect hook, the
/// session already set up), its permit came back while the server still counted its
/// session, and the next connect could take it: a backend above the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_that_lost_its_race_keeps_its_permit_until_its_session_is_gone() {
    use std::sync::atomic::AtomicUsize;
    let Some(pg) = server() else { return };
    let app = "abudget_hedge_lost";
    // The first connection opens freely; every later one (the hedge's) waits in its
    // after-connect hook until the test lets it go.
    let hooked = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, g) = (hooked.clone(), gate.clone());
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .configure(move |b| {
            b.application_name(app)
                .pool_timeout(Duration::from_secs(10))
                .connect_timeout(Some(Duration::from_secs(10)))
                .after_connect(move |_conn| {
                    let (h, g) = (h.clone(), g.clone());
                    Box::pin(async move {
                        if h.fetch_add(1, Ordering::SeqCst) >= 1 {
                            let _ = g.acquire().await.map(|p| p.forget());
                        }
                        Ok(())
                    })
                })
        })
        .build()
        .await
        .unwrap();
    let pool = pools.class("automation").unwrap().clone();
    let mut first = pool.get().await.unwrap();
    one(&mut first).await.unwrap();
    drop(first);
    // Past the validation bypass window: the next checkout pings.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        pools.budget_snapshot().in_use,
        1,
        "{}",
        pools.budget_snapshot()
    );
    // The idle connection's backend stopped: its ping hangs, and past the hedge delay a
    // fresh connect starts beside it.
    let pause = pg.pause_backends(app).expect("the backend is there");
    let checkout = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get_owned().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooked.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "no hedge reached its after-connect hook within 10 s: {:?}",
            pools.class("automation").unwrap().stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The ping wins: the backend goes on while the hedge's connect waits in its hook.
    pause.resume();
    let mut conn = tokio::time::timeout(Duration::from_secs(10), checkout)
        .await
        .expect("the checkout did not return within 10 s of the ping's answer")
        .unwrap()
        .expect("the pinged connection");
    assert_eq!(one(&mut conn).await, Ok(1));
    let snap = pools.budget_snapshot();
    let seen = pg.count_backends(app).unwrap();
    assert_eq!(
        snap.in_use, 2,
        "the hedge's connect was dropped when the ping won: its permit came back while its \
         session was set up on the server ({seen} backends): {snap}"
    );
    let stats = pools.class("automation").unwrap().stats();
    assert_eq!(
        (stats.hedges, stats.hedges_won),
        (1, 0),
        "one hedge, which the ping won: {stats:?}"
    );
    // Let the hedge finish: its connection closes, and then its permit comes back.
    gate.add_permits(1);
    pg.wait_backends_at_most(app, 1, Duration::from_secs(5))
        .expect("the hedge's session ends once its connection closed");
    permits_in_use_at_most(&pools, 1, "the hedge's permit never came back").await;
    assert_eq!(pg.count_backends(app).unwrap(), 1);
    assert_eq!(one(&mut conn).await, Ok(1));
}

/// A connection given up before it joined the pool (its after-connect hook failed after its
/// session was set up) holds its budget permit until the server let the session go, as any
/// closed connection does. Here its backend is stopped when the hook fails: the permit stays
/// out (within the close's bound) until the backend goes on and exits. Released at once, it
/// let the next connect in while the server still counted the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_after_connect_hook_failed_keeps_its_permit_until_its_session_is_gone() {
    use std::sync::atomic::AtomicUsize;
    let Some(pg) = server() else { return };
    let app = "abudget_hook_failed";
    // The first hook waits for the test, then fails; later ones fail at once.
    let hooked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, f, g) = (hooked.clone(), failed.clone(), gate.clone());
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 1)
        .class("automation", Class::new().pool_size(1).max_overflow(0))
        .configure(move |b| {
            b.application_name(app)
                .pool_timeout(Duration::from_secs(10))
                .connect_timeout(Some(Duration::from_secs(10)))
                .after_connect(move |_conn| {
                    let (h, f, g) = (h.clone(), f.clone(), g.clone());
                    Box::pin(async move {
                        if h.fetch_add(1, Ordering::SeqCst) == 0 {
                            let _ = g.acquire().await.map(|p| p.forget());
                            f.store(true, Ordering::SeqCst);
                        }
                        Err(diesel::result::Error::QueryBuilderError(
                            "refused by the test".into(),
                        ))
                    })
                })
        })
        .build()
        .await
        .unwrap();
    let pool = pools.class("automation").unwrap().clone();
    let checkout = tokio::spawn(async move { pool.get_owned().await.map(|_| ()) });
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooked.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no connect reached the after-connect hook within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pause = pg.pause_backends(app).expect("the hook's session is there");
    gate.add_permits(1);
    while !failed.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the hook never went on");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Well inside the close's bound (1 s): the stopped backend cannot have exited.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snap = pools.budget_snapshot();
    let seen = pg.count_backends(app).unwrap();
    assert_eq!(
        snap.in_use, 1,
        "the connection whose hook failed gave its permit back while the server still \
         counted its session ({seen} backends): {snap}"
    );
    checkout.abort();
    pause.resume();
    pg.wait_backends_at_most(app, 0, Duration::from_secs(5))
        .expect("the refused session ends once its backend goes on");
    permits_in_use_at_most(&pools, 0, "the refused connection's permit never came back").await;
}

/// Waits up to 5 s for the budget's permits in use to fall to `n`; fails with `what` and
/// the budget's state.
async fn permits_in_use_at_most(pools: &Pools, n: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools.budget_snapshot().in_use > n {
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            pools.budget_snapshot()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `max_lifetime` retires connections while they sit idle (the maintenance task: no
/// checkout needed), and a budget class's reserved floor is replaced as it is retired: the
/// server goes on counting the floor's two sessions, none of them the first ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_retires_idle_connections_and_the_reserved_floor_is_replaced() {
    let Some(pg) = server() else { return };
    let app = "abudget_lifetime";
    let pools = ClassPools::<AsyncPgConnection>::builder(&pg.url_with("sslmode=disable"), 4)
        .class("automation", Class::new().pool_size(0).max_overflow(2))
        .class("adhoc", Class::new().reserved(2))
        .configure(|b| {
            b.application_name(app)
                .max_lifetime(Some(Duration::from_millis(400)))
                .lifetime_jitter(0.0)
                .pool_timeout(Duration::from_secs(5))
        })
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.count_backends(app).unwrap() != 2 {
        assert!(
            Instant::now() < deadline,
            "the floor was not opened at build"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = pg.backend_pids(app).unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    loop {
        let now = pg.backend_pids(app).unwrap();
        let expired = adhoc.stats().closed.expired;
        if expired >= 2 && now.len() == 2 && now.iter().all(|pid| !first.contains(pid)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s with a 400 ms lifetime: backends {now:?} (the first {first:?}), {:?}",
            adhoc.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = adhoc.get().await.unwrap();
    assert_eq!(one(&mut conn).await, Ok(1));
}
