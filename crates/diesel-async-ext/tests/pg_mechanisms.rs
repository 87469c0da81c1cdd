//! Mechanisms of the async pool that no fault test reached, each proven by its effect on a
//! private PostgreSQL server: what happens to a connection returned during a panic, in the
//! middle of the pool's own round trip, or after the maintenance gave up on it; and the
//! order in which waiting checkouts are served (with plain bb8 as the control).
#![cfg(feature = "postgres")]

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use diesel::sql_types::{Nullable, Text};
use diesel_async::RunQueryDsl;
use diesel_async_ext::PgPool;

/// Waits until `done` holds, checking every 10 ms; fails with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A panic while a connection is out means the code holding it stopped half-way: whatever
/// session state it set up to undo later (here a row-level-security tenant, set with
/// `set_config(.., false)` and reset at the end of the request) is still set. Outside a
/// transaction the session looks clean to the driver; plain bb8 hands it to the next
/// caller, who then reads and writes as the other tenant.
#[tokio::test]
async fn a_connection_returned_by_a_panicking_task_is_closed_even_outside_a_transaction() {
    let Some(pg) = server() else { return };
    let app = "amech_panic";
    let pool = ext_pool(&pg, app, 1).build().await.unwrap();
    let p = pool.clone();
    let handler = tokio::spawn(async move {
        let mut conn = p.get().await.expect("checkout");
        diesel::sql_query("SELECT set_config('app.tenant', 'tenant-42', false)")
            .execute(&mut conn)
            .await
            .expect("set the tenant");
        panic!("handler bug after setting the tenant");
    });
    let joined = tokio::time::timeout(Duration::from_secs(10), handler)
        .await
        .expect("the handler task did not end within 10 s");
    assert!(
        joined.is_err_and(|e| e.is_panic()),
        "the handler was meant to panic"
    );
    let mut conn = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("no checkout within 10 s after the panic")
        .expect("checkout after the panic");
    let tenant: Option<String> = diesel::select(diesel::dsl::sql::<Nullable<Text>>(
        "nullif(current_setting('app.tenant', true), '')",
    ))
    .get_result(&mut conn)
    .await
    .expect("read the tenant");
    assert_eq!(
        tenant, None,
        "the session a panicking task returned was handed out again, still set up for the \
         other tenant"
    );
    assert_eq!(pool.stats().closed.broken, 1, "{:?}", pool.stats());
}

/// The server ended a session while the application held its connection without using it
/// (an idle-session timeout, a terminate, a restart): the driver read the FATAL and the FIN
/// (its connection is closed), no query saw an error. The checkin closes it there and then,
/// instead of putting it back for the next checkout's probe to find.
#[tokio::test]
async fn a_connection_the_server_closed_while_it_was_held_unused_is_closed_at_checkin() {
    use diesel_async::pooled_connection::PoolableConnection;
    let Some(pg) = server() else { return };
    let app = "amech_closed_held";
    let pool = ext_pool(&pg, app, 2).build().await.unwrap();
    let mut conn = pool.get().await.expect("checkout");
    terminate_all(&pg, app).await;
    eventually(
        Duration::from_secs(5),
        "the driver never saw its server close the connection",
        || PoolableConnection::is_broken(&mut *conn),
    )
    .await;
    let before = pool.stats();
    drop(conn);
    let after = pool.stats();
    assert_eq!(
        after.closed.broken - before.closed.broken,
        1,
        "a connection its server had closed was put back at checkin: {after:?}"
    );
    assert_eq!(
        pool.inner().state().idle_connections,
        1,
        "the closed connection went back to the idle list (the other one, idle all along, is the only one there)"
    );
}

/// After a "read-only transaction" error the next checkout asks the server whether it became
/// a standby: a round trip of the pool's own, inside the caller's checkout. A caller that
/// gives up meanwhile (its deadline, a client gone) drops the checkout half-way and bb8 takes
/// the connection back with the question unanswered: the server may be hung (here: its
/// backend is stopped), or its reply may still be on the way. Such a connection is closed;
/// pooled again, it would be handed to the next caller inside the bypass window, unchecked,
/// and that caller would hang on it.
#[tokio::test]
async fn a_connection_whose_standby_check_was_cut_short_is_closed_not_pooled() {
    let Some(pg) = server() else { return };
    let app = "amech_busy";
    let pool = ext_pool(&pg, app, 1)
        .validation_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    {
        let mut conn = pool.get().await.unwrap();
        diesel::sql_query("SET default_transaction_read_only = on")
            .execute(&mut conn)
            .await
            .unwrap();
        let write = diesel::sql_query("CREATE TABLE mech_busy (x int)")
            .execute(&mut conn)
            .await;
        assert!(
            write
                .as_ref()
                .is_err_and(|e| e.to_string().contains("read-only transaction")),
            "precondition: a write in a read-only session fails with 25006: {write:?}"
        );
        diesel::sql_query("RESET default_transaction_read_only")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let pids = pg.backend_pids(app).unwrap();
    assert_eq!(pids.len(), 1);
    let pause = pg.pause_backends(app).unwrap();
    // A caller with a short deadline: its checkout is dropped in the middle of the standby
    // check, which the stopped backend never answers.
    let cut = pool.get_timeout(Duration::from_millis(300)).await;
    assert!(
        cut.as_ref().is_err_and(|e| e.is_timeout()),
        "precondition: the checkout was cut short in the standby check: {:?}",
        cut.map(|_| ())
    );
    next_caller_avoids(
        &pool,
        pids[0],
        "the connection whose standby check was cut short",
    )
    .await;
    pause.resume();
    assert_eq!(pool.stats().closed.broken, 1, "{:?}", pool.stats());
}

/// The maintenance pings idle connections (keepalive); when a ping fails (here the backend
/// is stopped, so it outlives `validation_timeout`), the connection is closed by the
/// maintenance itself, not put back in the idle list where the next caller would pay a whole
/// validation timeout to find it dead (and the maintenance would ping it again and again).
#[tokio::test]
async fn an_idle_connection_whose_keepalive_ping_failed_is_closed_by_the_maintenance() {
    let Some(pg) = server() else { return };
    let app = "amech_keepalive";
    let pool = ext_pool(&pg, app, 1)
        .keepalive_ping(Some(Duration::from_millis(200)))
        .validation_timeout(Duration::from_millis(300))
        .idle_timeout(None)
        .build()
        .await
        .unwrap();
    let pids = pg.backend_pids(app).unwrap();
    assert_eq!(pids.len(), 1);
    let pause = pg.pause_backends(app).unwrap();
    eventually(
        Duration::from_secs(5),
        "no keepalive ping failed on the stopped backend",
        || pool.stats().validations_failed >= 1,
    )
    .await;
    eventually(
        Duration::from_secs(2),
        "the connection whose keepalive ping failed was put back in the idle list",
        || pool.stats().closed.ping_failed >= 1,
    )
    .await;
    assert_eq!(pool.state().connections, 0, "{:?}", pool.state());
    pause.resume();
    let mut conn = tokio::time::timeout(Duration::from_secs(5), pool.get())
        .await
        .expect("no checkout within 5 s")
        .expect("checkout");
    assert_ne!(backend_pid(&mut conn).await.unwrap(), pids[0]);
}

/// A pool checkouts can be timed on: check out, note the moment it is handed over, hold it,
/// give it back.
trait Lender: Clone + Send + Sync + 'static {
    fn lend(&self, served: impl FnOnce() + Send, hold: Duration)
        -> impl Future<Output = ()> + Send;
}

impl Lender for PgPool {
    async fn lend(&self, served: impl FnOnce() + Send, hold: Duration) {
        let conn = self.get().await.expect("checkout");
        served();
        tokio::time::sleep(hold).await;
        drop(conn);
    }
}

impl Lender for Control {
    async fn lend(&self, served: impl FnOnce() + Send, hold: Duration) {
        let conn = self.get().await.expect("checkout");
        served();
        tokio::time::sleep(hold).await;
        drop(conn);
    }
}

/// `tasks` tasks each check out `rounds` times in a row (asking again as soon as they gave
/// the connection back, as a worker loop does). Every checkout draws an arrival number just
/// before asking; returns the arrival numbers in the order the checkouts were served. On a
/// current-thread runtime nothing runs between drawing the number and asking, so arrival
/// order is exact.
async fn service_order<L: Lender>(pool: &L, tasks: usize, rounds: usize) -> Vec<u64> {
    let arrivals = Arc::new(AtomicU64::new(0));
    let served = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (pool, arrivals, served) = (pool.clone(), arrivals.clone(), served.clone());
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let n = arrivals.fetch_add(1, Ordering::SeqCst);
                    let served = &served;
                    pool.lend(
                        move || served.lock().unwrap().push(n),
                        Duration::from_millis(2),
                    )
                    .await;
                }
            })
        })
        .collect();
    for h in handles {
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("a task was not served 4 times within 30 s")
            .expect("task");
    }
    let order = served.lock().unwrap().clone();
    order
}

/// How many checkouts were served while one that arrived earlier still waited.
fn overtakes(order: &[u64]) -> usize {
    order
        .iter()
        .enumerate()
        .filter(|&(i, &n)| order[i + 1..].iter().any(|&later| later < n))
        .count()
}

/// The most later arrivals served ahead of any one checkout (how long the worst-treated
/// caller was passed over).
fn most_overtaken(order: &[u64]) -> usize {
    order
        .iter()
        .enumerate()
        .map(|(i, &n)| order[..i].iter().filter(|&&before| before > n).count())
        .max()
        .unwrap_or(0)
}

/// Pool of 8, 16 tasks asking 4 times each (64 checkouts, twice as many callers as
/// connections): a task giving its connection back and asking again at once must queue
/// behind those already waiting, never take the connection straight back. (Rounds rather than
/// 64 one-shot tasks on 32 connections: asking again right after returning is the case the
/// gate exists for, which one wave of first arrivals never reaches; and 8 backends instead of
/// 32 keep the test light on a small machine.)
#[tokio::test]
async fn with_twice_as_many_tasks_as_connections_checkouts_are_served_in_arrival_order() {
    let Some(pg) = server() else { return };
    // No validation ping in the way (connections are checked by the probe alone): a ping
    // would let a checkout that was granted a connection earlier finish after a later one.
    let pool = ext_pool(&pg, "amech_fifo", 8)
        .validation_bypass_window(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let order = service_order(&pool, 16, 4).await;
    assert_eq!(order.len(), 64);
    assert_eq!(
        order,
        (0..64).collect::<Vec<u64>>(),
        "served out of arrival order ({} checkouts overtook an earlier one)",
        overtakes(&order)
    );
}

/// The control: plain bb8 at its defaults (only `max_size` set to 8). bb8 puts a returned
/// connection in its idle queue and wakes a waiter, but the task that returned it asks again
/// first and takes it back; the woken waiter queues again at the back.
#[tokio::test]
async fn control_plain_bb8_lets_a_returning_task_take_its_connection_back_past_waiting_ones() {
    let Some(pg) = server() else { return };
    let url = pg.url_with("sslmode=disable&application_name=amech_fifo_bb8");
    let pool: Control = bb8::Pool::builder()
        .max_size(8)
        .build(diesel_async::pooled_connection::AsyncDieselConnectionManager::new(url))
        .await
        .expect("control pool");
    let order = service_order(&pool, 16, 4).await;
    let n = overtakes(&order);
    println!(
        "plain bb8: {n} of 64 checkouts overtook an earlier arrival; the worst-treated one was \
         passed over by {} later arrivals; service order {order:?}",
        most_overtaken(&order)
    );
    assert_eq!(order.len(), 64);
    assert!(n > 0, "the control served every checkout in arrival order");
}

/// A validation ping that fails (here the network resets its connection as the `SELECT 1`
/// goes out) is reported with the driver's reason, not as a ping that got no reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_validation_ping_is_reported_with_the_drivers_reason() {
    let Some(pg) = server() else { return };
    let (proxy, url) = proxied(&pg, "sslmode=disable");
    let pool = PgPool::builder(&url)
        .name("amech_ping_cut")
        .pool_size(1)
        .max_overflow(0)
        .build()
        .await
        .expect("pool");
    pool.warm(1).await;
    // Past the bypass window: the next checkout pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.sever_before_forwarding(b"SELECT 1");
    assert_eq!(
        pool.select_one().await,
        Ok(1),
        "the pool replaces the connection"
    );
    assert!(!proxy.trigger_armed(), "precondition: the ping was cut");
    let stats = pool.stats();
    assert_eq!(stats.closed.ping_failed, 1, "{stats:?}");
    let reported: Vec<String> = test_support::captured_logs()
        .into_iter()
        .filter(|l| l.contains("pool amech_ping_cut: validation ping failed"))
        .collect();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(
        !reported[0].contains("no reply within"),
        "a ping that failed is reported as one that got no reply: {reported:?}"
    );
}

/// A `LISTEN`ing connection returned to the pool keeps its notifications: the checkout's
/// probe is the client's closed state (nothing read), and a validation ping leaves
/// diesel-async's notification channel to the application. A notification sent while the
/// connection sat idle is there at its next checkout, whether the checkout only probed it
/// (inside the bypass window) or pinged it (past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_sent_while_a_listening_connection_sat_idle_survive_its_next_checkout() {
    use futures_util::StreamExt;
    let Some(pg) = server() else { return };
    let pool = PgPool::builder(&pg.url_with("sslmode=disable&application_name=amech_listen"))
        .pool_size(1)
        .max_overflow(0)
        .build()
        .await
        .unwrap();
    diesel::sql_query("LISTEN pool_ch")
        .execute(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    for (round, idle) in [
        (1, Duration::from_millis(100)),
        (2, Duration::from_millis(800)),
    ] {
        PgServer::execute(&pg, &format!("NOTIFY pool_ch, 'sent while idle {round}'")).unwrap();
        tokio::time::sleep(idle).await;
        let mut conn = pool.get().await.unwrap();
        let mut stream = std::pin::pin!(conn.notifications_stream());
        let got = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .unwrap_or_else(|_| panic!("round {round}: no notification within 2 s"))
            .expect("the stream ended")
            .unwrap();
        assert_eq!(
            got.payload,
            format!("sent while idle {round}"),
            "round {round} (idle {idle:?})"
        );
    }
    let stats = pool.stats();
    assert_eq!(
        stats.connects, 1,
        "the same connection throughout: {stats:?}"
    );
    assert!(stats.pings >= 1, "the second checkout pinged: {stats:?}");
}
