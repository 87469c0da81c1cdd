//! The connection budget with reserved classes, on a real PostgreSQL server: automation can
//! saturate its share and never lock out ad-hoc work; borrowed headroom comes back; the server
//! never sees more connections than the budget. The control shows a plain r2d2 pool sized to
//! the total locking ad-hoc work out under the same saturation.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use diesel::prelude::*;
use diesel::sql_types::Integer;
use resilient_diesel::classes::{Class, ClassPools};
use resilient_diesel::BuildError;
use test_support::{PgOptions, PgServer};

type Pools = ClassPools<PgConnection>;

fn field_report_pools(pg: &PgServer, app: &str) -> Pools {
    pools_with(
        pg,
        app,
        Class::new().pool_size(50).max_overflow(5),
        Class::new().reserved(5),
    )
}

fn pools_with(pg: &PgServer, app: &str, automation: Class, adhoc: Class) -> Pools {
    ClassPools::builder(&pg.url_with("sslmode=disable"), 60)
        .class("automation", automation)
        .class("adhoc", adhoc)
        .configure(|b| b.application_name(app).pool_timeout(Duration::from_secs(5)))
        .build()
        .expect("the budget is valid")
}

fn query<C: std::ops::DerefMut<Target = PgConnection>>(conn: &mut C) -> i32 {
    diesel::select(diesel::dsl::sql::<Integer>("1"))
        .get_result(&mut **conn)
        .expect("query on a checked-out connection")
}

/// Samples `pg_stat_activity` for `app` until stopped; returns the highest count seen.
fn watch_backends(pg: &PgServer, app: &str, stop: &AtomicBool) -> i64 {
    let mut max = 0;
    while !stop.load(Ordering::Relaxed) {
        max = max.max(pg.count_backends(app).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(10));
    }
    max.max(pg.count_backends(app).unwrap_or(0))
}

/// `threads` workers each take a connection from `get` and hold it until `stop`; those that
/// cannot get one keep trying. Returns once `holding` of them hold one.
fn saturate<'scope, F, G>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    threads: usize,
    holding: u32,
    stop: &'static AtomicBool,
    get: F,
) where
    F: Fn() -> Option<G> + Send + Sync + Copy + 'static,
    G: Send,
{
    let held = Arc::new(AtomicU32::new(0));
    for _ in 0..threads {
        let held = held.clone();
        scope.spawn(move || {
            let conn = loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(c) = get() {
                    break c;
                }
            };
            held.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(conn);
        });
    }
    while held.load(Ordering::SeqCst) < holding {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn leak_flag() -> &'static AtomicBool {
    Box::leak(Box::new(AtomicBool::new(false)))
}

/// Raises the flag when dropped, also when a failed assertion unwinds: the threads that
/// `saturate` started stop, and the scope can end (a failure must fail, never hang).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn adhoc_gets_its_reserved_connections_in_1000_of_1000_trials_while_automation_is_saturated() {
    let Some(pg) = server() else { return };
    saturated_automation_never_locks_adhoc_out(
        &pg,
        "budget_saturate",
        field_report_pools(&pg, "budget_saturate"),
    );
}

/// Here automation's cap is the whole budget: only the reserved floor stands between it and
/// the last five connections.
#[test]
fn the_reserved_floor_alone_keeps_adhoc_in_when_automation_may_take_the_whole_budget() {
    let Some(pg) = server() else { return };
    let app = "budget_floor_only";
    let pools = pools_with(
        &pg,
        app,
        Class::new().pool_size(0).max_overflow(60),
        Class::new().reserved(5),
    );
    assert_eq!(
        pools
            .budget()
            .limits(pools.budget().class_id("automation").unwrap())
            .max,
        60
    );
    saturated_automation_never_locks_adhoc_out(&pg, app, pools);
}

fn saturated_automation_never_locks_adhoc_out(pg: &PgServer, app: &str, pools: Pools) {
    let pools: &'static Pools = Box::leak(Box::new(pools));
    let stop = leak_flag();
    let watching = AtomicBool::new(false);
    let (max_seen, ok) = std::thread::scope(|s| {
        let _stop = StopOnDrop(stop);
        let _stop_watching = StopOnDrop(&watching);
        let watcher = s.spawn(|| watch_backends(pg, app, &watching));
        // 70 threads for automation's 55: all 55 held, 15 waiting.
        saturate(s, 70, 55, stop, || {
            pools
                .class("automation")
                .unwrap()
                .get_timeout(Duration::from_millis(200))
                .ok()
        });
        let adhoc = pools.class("adhoc").unwrap();
        let mut ok = 0;
        for trial in 0..1000 {
            // Every tenth trial takes the whole floor at once.
            let n = if trial % 10 == 0 { 5 } else { 1 };
            let mut held: Vec<_> = (0..n)
                .map(|_| adhoc.get().expect("adhoc is never locked out"))
                .collect();
            for c in &mut held {
                assert_eq!(query(c), 1);
            }
            ok += 1;
        }
        let snapshot = pools.budget_snapshot();
        assert!(snapshot.classes[0].waiters > 0 || snapshot.classes[0].in_use == 55);
        assert!(
            pools.status().to_string().contains("adhoc"),
            "{}",
            pools.status()
        );
        stop.store(true, Ordering::Relaxed);
        watching.store(true, Ordering::Relaxed);
        (watcher.join().unwrap(), ok)
    });
    assert_eq!(ok, 1000);
    assert!(
        max_seen <= 60,
        "the server saw {max_seen} connections for a budget of 60"
    );
    // Sampled: automation's cap (55) at least; adhoc's moments on top may fall between two
    // samples on a loaded machine.
    assert!(
        max_seen >= 55,
        "the saturation reached the server ({max_seen})"
    );
    assert!(pools.budget().is_healthy());
    assert_no_secret_in_logs();
}

#[test]
fn control_a_plain_r2d2_pool_sized_to_the_total_locks_adhoc_out() {
    let Some(pg) = server() else { return };
    let app = "budget_control";
    // As people size it: one pool for the whole plan, r2d2's defaults otherwise.
    let pool: &'static r2d2::Pool<_> = Box::leak(Box::new(
        r2d2::Pool::builder()
            .max_size(60)
            .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
                pg.url_with(&format!("sslmode=disable&application_name={app}")),
            ))
            .unwrap(),
    ));
    let stop = leak_flag();
    let failures = std::thread::scope(|s| {
        let _stop = StopOnDrop(stop);
        saturate(s, 70, 60, stop, || {
            pool.get_timeout(Duration::from_millis(200)).ok()
        });
        let failures = (0..10)
            .filter(|_| pool.get_timeout(Duration::from_millis(300)).is_err())
            .count();
        stop.store(true, Ordering::Relaxed);
        failures
    });
    assert_eq!(
        failures, 10,
        "ad-hoc work got in: the control did not reproduce the lock-out"
    );
}

#[test]
fn borrowed_headroom_goes_back_to_automation_when_it_needs_it() {
    let Some(pg) = server() else { return };
    let app = "budget_borrow";
    // adhoc may keep 25 open: what it borrows stays open (idle) after it is returned.
    let pools: &'static Pools = Box::leak(Box::new(pools_with(
        &pg,
        app,
        Class::new().pool_size(50).max_overflow(5),
        Class::new().reserved(5).pool_size(25),
    )));
    let automation = pools.class("automation").unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    let stop = leak_flag();
    let taken = std::thread::scope(|s| {
        let _stop = StopOnDrop(stop);
        saturate(s, 35, 35, stop, || {
            automation.get_timeout(Duration::from_millis(200)).ok()
        });
        // adhoc borrows 20 beyond its floor, then returns them: they stay open, idle.
        let borrowed: Vec<_> = (0..25).map(|_| adhoc.get().unwrap()).collect();
        assert_eq!(pools.budget_snapshot().free, 0);
        drop(borrowed);
        assert_eq!(adhoc.state().idle_connections, 25);
        // Now automation demands 20 more.
        // Each waiter holds what it got until the permits are counted (or the test failed:
        // `stop` is raised as a failed assertion unwinds, so no waiter is left waiting).
        let counted = leak_flag();
        let started = Instant::now();
        let waits: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(move || {
                    let conn = automation.get();
                    let took = started.elapsed();
                    while !counted.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    (conn.is_ok(), took)
                })
            })
            .collect();
        // How fast the permits come back (what the budget controls), apart from how long
        // opening 20 connections takes (what the server and libpq control).
        let give_up = started + Duration::from_secs(30);
        while pools.budget_snapshot().classes[1].in_use == 25 {
            assert!(
                Instant::now() < give_up,
                "adhoc never gave a borrowed permit back"
            );
            std::thread::yield_now();
        }
        let first_back = started.elapsed();
        while pools.budget_snapshot().classes[1].in_use > 5 {
            assert!(Instant::now() < give_up, "adhoc kept borrowed permits");
            std::thread::yield_now();
        }
        let given_back = started.elapsed();
        eprintln!("adhoc gave its first borrowed permit back after {first_back:?}");
        counted.store(true, Ordering::Relaxed);
        let results: Vec<_> = waits.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!("adhoc gave its 20 borrowed permits back in {given_back:?}");
        stop.store(true, Ordering::Relaxed);
        results
    });
    let slowest = taken.iter().map(|(_, t)| *t).max().unwrap();
    eprintln!("automation held 20 more connections (permits + connects) after {slowest:?}");
    assert!(taken.iter().all(|(ok, _)| *ok), "automation was refused");
    let stats = adhoc.stats();
    assert_eq!(stats.closed.reclaimed, 20, "{stats:?}");
    assert!(pools.budget().is_healthy());
}

#[test]
fn a_budget_timeout_names_the_class_and_the_budget_state() {
    let Some(pg) = server() else { return };
    let app = "budget_timeout";
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 6)
        .class("automation", Class::new().pool_size(0).max_overflow(4))
        .class(
            "adhoc",
            Class::new()
                .reserved(2)
                .pool_timeout(Duration::from_millis(300)),
        )
        .configure(|b| b.application_name(app))
        .build()
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    let _auto: Vec<_> = (0..4).map(|_| automation.get().unwrap()).collect();
    let _floor: Vec<_> = (0..2).map(|_| adhoc.get().unwrap()).collect();
    let Err(err) = adhoc.get() else {
        panic!("adhoc got a connection beyond the budget")
    };
    let err = err.to_string();
    assert!(err.contains("class \"adhoc\" waited"), "{err}");
    assert!(err.contains("automation: 4/4 in use"), "{err}");
    assert!(err.contains("adhoc: 2/"), "{err}");
    let report = pools.status();
    let text = report.to_string();
    assert!(text.contains("Connection budget: 6 connections"), "{text}");
    assert!(
        text.contains("Permits: 6/6 held, 0 free; reserved floors available"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["budget"]["classes"][1]["name"], "adhoc");
    assert!(json["budget"]["classes"][1]["timeouts"].as_u64().unwrap() >= 1);
    // The set's `Debug` names its classes and the budget's state, and no password.
    let shown = format!("{pools:?}");
    for part in ["ClassPools", "\"automation\"", "\"adhoc\"", "Budget"] {
        assert!(shown.contains(part), "the Debug lacks {part}: {shown}");
    }
    assert!(!shown.contains(PgServer::PASSWORD), "{shown}");
    assert_no_secret_in_logs();
}

#[test]
fn impossible_budgets_are_rejected_when_built() {
    let url = "postgres://app:s3cret@127.0.0.1:1/app";
    let err = ClassPools::<PgConnection>::builder(url, 10)
        .class("a", Class::new().reserved(6))
        .class("b", Class::new().reserved(6))
        .build()
        .unwrap_err();
    assert!(matches!(err, BuildError::Budget(_)), "{err}");
    assert!(err.to_string().contains("reserve 12 in all"), "{err}");
    let err = ClassPools::<PgConnection>::builder(url, 10)
        .class("a", Class::new().pool_size(10).max_overflow(5))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("more than the total of 10"),
        "{err}"
    );
    let err = ClassPools::<PgConnection>::builder(url, 0)
        .class("a", Class::new())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
    assert!(!err.to_string().contains("s3cret"));
}

#[test]
fn the_server_capacity_check_warns_when_the_budget_cannot_fit() {
    test_support::capture_logs();
    let pg = match PgServer::start_with(PgOptions::new().conf("max_connections = 50")) {
        Ok(pg) => pg,
        Err(e) if !test_support::ci_mode() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 60)
        .class("automation", Class::new().max_overflow(55))
        .class("adhoc", Class::new().reserved(5))
        .configure(|b| b.application_name("budget_capacity"))
        .build()
        .unwrap();
    let capacity = pools.check_server_capacity().unwrap();
    assert_eq!(capacity.max_connections, 50);
    assert!(!capacity.fits(), "{capacity}");
    assert!(
        capacity.to_string().contains("cannot be opened"),
        "{capacity}"
    );
    let small = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 20)
        .class("adhoc", Class::new().reserved(2))
        .configure(|b| b.application_name("budget_capacity_small"))
        .build()
        .unwrap();
    assert!(small.check_server_capacity().unwrap().fits());
}

#[test]
fn the_capacity_check_counts_a_replicas_connections_as_other_clients() {
    let Some(pg) = server() else { return };
    // Two replicas of one service: same URL, same application_name.
    let replica = || {
        ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 10)
            .class("adhoc", Class::new().reserved(3))
            .configure(|b| b.application_name("budget_replicas"))
            .build()
            .unwrap()
    };
    let a = replica();
    let b = replica();
    // Each replica settles at its reserved floor of 3 (a connect r2d2 started while the
    // pool filled can still be finishing right after build).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = pg.count_backends("budget_replicas").unwrap();
        if n == 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "two replicas at rest hold 6 backends, not {n}: {} / {}",
            a.status(),
            b.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let capacity = a.check_server_capacity().unwrap();
    assert!(
        (3..=4).contains(&capacity.other_clients),
        "the other replica's 3 connections are not ours: {capacity}"
    );
    drop(b);
}

#[test]
fn a_checkout_that_gave_up_on_the_budget_leaves_no_connect_waiting_for_a_permit() {
    let Some(pg) = server() else { return };
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 4)
        .class("automation", Class::new().pool_size(4).max_overflow(0))
        .class(
            "adhoc",
            Class::new()
                .pool_size(0)
                .max_overflow(4)
                .pool_timeout(Duration::from_secs(10)),
        )
        .configure(|b| b.application_name("budget_phantom"))
        .build()
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    let mut held: Vec<_> = (0..4).map(|_| automation.get().unwrap()).collect();
    // The caller gives up long before the class's own 10 s: a connect still queued for a
    // permit in its name would stay queued for those 10 s.
    assert!(
        adhoc.get_timeout(Duration::from_millis(300)).is_err(),
        "the budget is spent"
    );
    // The connect that worked for it leaves the budget's queue once nobody wants it.
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while pools.budget_snapshot().classes[1].waiters > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a connect stayed queued for a permit 500 ms after its checkout gave up: {}",
            pools.budget_snapshot()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Automation's work ends; its connections go back to its pool, idle. A connect of
    // adhoc's still queued for a permit (r2d2 retries failed connects) would now make
    // automation close them, for nobody.
    held.truncate(2);
    std::thread::sleep(Duration::from_millis(1500));
    let snapshot = pools.budget_snapshot();
    assert_eq!(snapshot.classes[1].waiters, 0, "{snapshot}");
    assert_eq!(
        automation.stats().closed.reclaimed,
        0,
        "{:?}",
        automation.stats()
    );
    assert_eq!(
        adhoc.stats().connects,
        0,
        "adhoc opened a connection nobody asked for"
    );
    drop(held);
    // Served once automation gives headroom back (a reclaim and a connect: allow for a
    // loaded machine; the 300 ms above is the class's own timeout, meant to expire).
    assert!(
        adhoc.get_timeout(Duration::from_secs(5)).is_ok(),
        "a new checkout is served"
    );
}

/// Query logging, as applications install it: replaces the pool's own instrumentation.
struct QueryLog;

impl diesel::connection::Instrumentation for QueryLog {
    fn on_connection_event(&mut self, _event: diesel::connection::InstrumentationEvent<'_>) {}
}

#[test]
fn replacing_a_connections_instrumentation_never_lets_it_escape_the_budget() {
    let Some(pg) = server() else { return };
    let app = "budget_instrumented";
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class(
            "adhoc",
            Class::new().pool_timeout(Duration::from_millis(500)),
        )
        .configure(|b| b.application_name(app))
        .build()
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let adhoc = pools.class("adhoc").unwrap();
    for round in 0..2 {
        let mut held: Vec<_> = (0..2).map(|_| automation.get().unwrap()).collect();
        for conn in &mut held {
            conn.set_instrumentation(QueryLog);
            assert_eq!(query(conn), 1);
        }
        assert!(
            adhoc.get().is_err(),
            "round {round}: the budget of 2 is spent, yet adhoc got a third connection"
        );
        let seen = pg.count_backends(app).unwrap();
        assert!(
            seen <= 2,
            "round {round}: the server saw {seen} backends for a budget of 2"
        );
        drop(held);
    }
    // Given back at checkin: adhoc gets in once automation's connections are idle (its
    // headroom is reclaimed).
    let mut conn = adhoc
        .get()
        .expect("adhoc after automation returned its connections");
    assert_eq!(query(&mut conn), 1);
    // The reclaimed connection was closed on our side before adhoc's opened; its backend may
    // take a moment to exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let seen = pg.count_backends(app).unwrap();
        if seen <= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{seen} backends stayed for a budget of 2"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// While another class waits for headroom that is all in use (nothing idle to give back), the
/// lending class's maintenance thread waits for a checkin instead of spinning: a second of
/// that wait costs the pools' maintenance threads little CPU.
#[test]
fn a_reclaim_with_nothing_idle_to_give_back_waits_without_spinning() {
    let Some(pg) = server() else { return };
    let others = test_support::threads_named(test_support::MAINTENANCE_THREADS);
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 2)
        .class("automation", Class::new().pool_size(2).max_overflow(0))
        .class("adhoc", Class::new().pool_timeout(Duration::from_secs(3)))
        .configure(|b| b.application_name("budget_no_spin"))
        .build()
        .unwrap();
    let automation = pools.class("automation").unwrap();
    let _a = automation.get().unwrap();
    let _b = automation.get().unwrap();
    // This test's pools' maintenance threads: the ones started since (other tests of this
    // binary run their own, which may be busy).
    let ours: Vec<u32> = test_support::threads_named(test_support::MAINTENANCE_THREADS)
        .into_iter()
        .filter(|id| !others.contains(id))
        .collect();
    assert!(
        !ours.is_empty(),
        "no maintenance thread of these pools found"
    );
    std::thread::scope(|s| {
        let waiter = s.spawn(|| pools.class("adhoc").unwrap().get().map(drop));
        std::thread::sleep(Duration::from_millis(200));
        let before = test_support::cpu_of_threads(&ours);
        std::thread::sleep(Duration::from_secs(1));
        let used = test_support::cpu_of_threads(&ours) - before;
        assert!(
            used < Duration::from_millis(300),
            "the maintenance spun while waiting for a checkin: {used:?} of CPU in 1 s"
        );
        assert!(
            waiter.join().unwrap().is_err(),
            "the budget is spent: ad-hoc times out"
        );
    });
}

/// A budget that checks out `n` connections of `app` through one class sized `n`, each held
/// inside a transaction Diesel's manager opened (`begin_test_transaction`): its checkin
/// closes it without a round trip first.
fn closing_on_checkin(pg: &PgServer, app: &str, n: u32) -> (Pools, Vec<ClassConn>) {
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), n)
        .class("automation", Class::new().pool_size(n).max_overflow(0))
        .configure(|b| {
            b.application_name(app)
                .pool_timeout(Duration::from_secs(10))
        })
        .build()
        .expect("the budget is valid");
    let held = (0..n)
        .map(|_| {
            let mut conn = pools.class("automation").unwrap().get().unwrap();
            query(&mut conn);
            conn.begin_test_transaction().unwrap();
            conn
        })
        .collect();
    (pools, held)
}

type ClassConn = r2d2::PooledConnection<resilient_diesel::ExtManager<PgConnection>>;

/// A closed connection's permit comes back only once the server let its session go: the
/// backend keeps its socket open until its process has exited, and the pool waits for that
/// end-of-file (bounded). Here the backend is stopped when the connection closes and
/// continued 300 ms later: the replacement must not connect while the server still counts
/// the old session. Without the wait (hand mutation `close-confirm-skipped`) the replacement
/// connected at once; the control below shows plain r2d2 doing the same.
#[test]
fn a_closed_connections_permit_comes_back_only_once_the_server_let_its_session_go() {
    let Some(pg) = server() else { return };
    let app = "budget_confirm_close";
    let (pools, mut held) = closing_on_checkin(&pg, app, 1);
    let pause = pg.pause_backends(app).expect("the backend is there");
    let resumer = pause.resume_after(Duration::from_millis(300));
    drop(held.pop());
    let mut again = pools.class("automation").unwrap().get().unwrap();
    let seen = pg.count_backends(app).unwrap();
    query(&mut again);
    resumer.join().unwrap();
    assert_eq!(
        seen, 1,
        "the replacement connected while the server still counted the closed session: {seen} \
         backends for a budget of 1"
    );
}

/// The wait for the server's confirmation is one bound per outage, not one per connection:
/// closing 4 connections whose backends are all stopped takes one bound (the validation
/// timeout, at most 1 s), after which the pool stops waiting for a while.
#[test]
fn closes_stop_waiting_for_a_server_that_does_not_answer_after_one_bound() {
    let Some(pg) = server() else { return };
    let app = "budget_confirm_outage";
    let (_pools, held) = closing_on_checkin(&pg, app, 4);
    let pause = pg.pause_backends(app).expect("the backends are there");
    let started = Instant::now();
    drop(held);
    let took = started.elapsed();
    pause.resume();
    assert!(
        took >= Duration::from_millis(900),
        "closing took {took:?}: the first close did not wait for the server at all"
    );
    assert!(
        took < Duration::from_millis(1900),
        "closing 4 connections to a stopped server took {took:?}: more than one bound of 1 s"
    );
}

/// After a wait ran out, the connections the pool opens as it recovers still wait for their
/// own sessions to go: the one that replaced the unanswered close is closed with its backend
/// stopped for 300 ms, and its replacement must not connect while the server still counts it.
/// (A pause of every close for a while after an outage let the pool above its budget just as
/// it reconnects.)
#[test]
fn connections_opened_after_an_outage_still_wait_for_their_own_session_to_go() {
    let Some(pg) = server() else { return };
    let app = "budget_confirm_after_outage";
    let (pools, mut held) = closing_on_checkin(&pg, app, 1);
    let pool = pools.class("automation").unwrap();
    let stopped = pg.pause_backends(app).expect("the backend is there");
    let started = Instant::now();
    drop(held.pop());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "the close took {took:?}: it did not wait for the stopped server"
    );
    let mut again = pool.get().unwrap();
    query(&mut again);
    // The old backend goes on and exits (it read our end of the stream): one session left.
    stopped.resume();
    pg.wait_backends_at_most(app, 1, Duration::from_secs(5))
        .expect("the unanswered session ends once its backend goes on");
    again.begin_test_transaction().unwrap();
    let pause = pg.pause_backends(app).expect("the new backend is there");
    let resumer = pause.resume_after(Duration::from_millis(300));
    drop(again);
    let mut third = pool.get().unwrap();
    let seen = pg.count_backends(app).unwrap();
    query(&mut third);
    resumer.join().unwrap();
    assert_eq!(
        seen, 1,
        "after an outage, the replacement connected while the server still counted the \
         closed session: {seen} backends for a budget of 1"
    );
}

/// Control: plain r2d2 at its defaults, sized to the same 1 connection. A connection returned
/// by a panicking thread is broken to r2d2, which starts its replacement before it even
/// closes the old one: with the old backend stopped, the server counts 2 sessions for a pool
/// of 1.
#[test]
fn control_plain_r2d2_replaces_a_closed_connection_while_the_server_still_counts_it() {
    let Some(pg) = server() else { return };
    let app = "budget_confirm_control";
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            pg.url_with(&format!("sslmode=disable&application_name={app}")),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    query(&mut conn);
    let pause = pg.pause_backends(app).expect("the backend is there");
    // The connection goes back while its thread unwinds: r2d2 closes it.
    let holder = std::thread::spawn(move || {
        let _conn = conn;
        panic!("returned during a panic (expected by the test)");
    });
    assert!(holder.join().is_err());
    let mut again = pool.get_timeout(Duration::from_secs(10)).unwrap();
    let seen = pg.count_backends(app).unwrap();
    query(&mut again);
    pause.resume();
    assert_eq!(
        seen, 2,
        "the control did not reproduce the overlap: the server counted {seen} sessions"
    );
}

/// A connection given up before it joined the pool (its after-connect hook failed after its
/// session was set up) holds its budget permit until the server let the session go, as any
/// closed connection does. Here its backend is stopped when the hook fails: the permit stays
/// out (within the close's bound) until the backend goes on and exits. Released at once, it
/// let the next connect in while the server still counted the session.
#[test]
fn a_connection_whose_after_connect_hook_failed_keeps_its_permit_until_its_session_is_gone() {
    let Some(pg) = server() else { return };
    let app = "budget_hook_failed";
    // The first hook waits for the test, then fails; later ones fail at once.
    let hooked = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(parking_lot::Mutex::new(gate));
    let (h, f) = (hooked.clone(), failed.clone());
    let pools = ClassPools::<PgConnection>::builder(&pg.url_with("sslmode=disable"), 1)
        .class("automation", Class::new().pool_size(1).max_overflow(0))
        .configure(move |b| {
            b.application_name(app)
                .pool_timeout(Duration::from_secs(3))
                .after_connect(move |_conn| {
                    if h.fetch_add(1, Ordering::SeqCst) == 0 {
                        let _ = gate.lock().recv_timeout(Duration::from_secs(10));
                        f.store(true, Ordering::SeqCst);
                    }
                    Err(diesel::result::Error::QueryBuilderError(
                        "refused by the test".into(),
                    ))
                })
        })
        .build()
        .expect("the budget is valid");
    let pool = pools.class("automation").unwrap().clone();
    let checkout = std::thread::spawn(move || pool.get().map(|_| ()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooked.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no connect reached the after-connect hook within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pause = pg.pause_backends(app).expect("the hook's session is there");
    go.send(()).unwrap();
    while !failed.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the hook never went on");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Well inside the close's bound (1 s): the stopped backend cannot have exited.
    std::thread::sleep(Duration::from_millis(200));
    let snap = pools.budget_snapshot();
    let seen = pg.count_backends(app).unwrap();
    assert_eq!(
        snap.in_use, 1,
        "the connection whose hook failed gave its permit back while the server still \
         counted its session ({seen} backends): {snap}"
    );
    pause.resume();
    pg.wait_backends_at_most(app, 0, Duration::from_secs(5))
        .expect("the refused session ends once its backend goes on");
    assert!(
        checkout.join().unwrap().is_err(),
        "the hook refused every connection"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools.budget_snapshot().in_use > 0 {
        assert!(
            Instant::now() < deadline,
            "the refused connection's permit never came back: {}",
            pools.budget_snapshot()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
