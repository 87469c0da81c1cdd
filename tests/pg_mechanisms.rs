//! Mechanisms of the sync pool that no fault test reached, each proven by its effect on a
//! private PostgreSQL server: a panic outside a transaction, a socket left ambiguous at
//! connect, a validation ping that answered only after its deadline fired.
//!
//! Two of them need control over moments inside a connect or a ping, which a test only gets
//! through Diesel's default instrumentation (the pool's tracker forwards every event to it):
//! [`Hooks`] opens an intruding Unix socket inside a chosen connect, or stalls the thread
//! that just finished a query.

mod common;

use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::Duration;

use common::*;
use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text};
use resilient_diesel::PgPool;

thread_local! {
    /// Set on a test's own thread: the next query finished on this thread sleeps this long
    /// before the driver returns (once).
    static STALL_NEXT_QUERY: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// A connect of `needle` (found in the conninfo) opens a Unix stream to `socket` inside its
/// connect window, held in `opened` until the test drops it.
struct Intruder {
    needle: String,
    socket: PathBuf,
    opened: Vec<UnixStream>,
}

static INTRUDERS: Mutex<Vec<Intruder>> = Mutex::new(Vec::new());

/// The default instrumentation of every connection of this test binary: inert unless a test
/// armed an [`Intruder`] or [`STALL_NEXT_QUERY`].
struct Hooks;

impl Instrumentation for Hooks {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartEstablishConnection { url, .. } => {
                let mut intruders = INTRUDERS.lock().unwrap_or_else(|e| e.into_inner());
                for i in intruders.iter_mut().filter(|i| url.contains(&i.needle)) {
                    let stream = UnixStream::connect(&i.socket).expect("intruding Unix stream");
                    i.opened.push(stream);
                }
            }
            InstrumentationEvent::FinishQuery { .. } => {
                if let Some(stall) = STALL_NEXT_QUERY.with(Cell::take) {
                    std::thread::sleep(stall);
                }
            }
            _ => {}
        }
    }
}

fn install_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        diesel::connection::set_default_instrumentation(|| Some(Box::new(Hooks)))
            .expect("default instrumentation");
    });
}

fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(conn)
        .expect("pg_backend_pid()")
}

/// A panic while a connection is out means the code holding it stopped half-way: whatever
/// session state it set up to undo later (here a row-level-security tenant, set with
/// `set_config(.., false)` and reset at the end of the request) is still set. Outside a
/// transaction nothing else marks such a session; plain r2d2 hands it to the next caller,
/// who then reads and writes as the other tenant.
#[test]
fn a_connection_returned_by_a_panicking_thread_is_closed_even_outside_a_transaction() {
    let Some(pg) = server() else { return };
    let app = "mech_panic";
    let pool = ext_pool(&pg, app, 1).build().unwrap();
    let p = pool.clone();
    let handler = std::thread::spawn(move || -> i32 {
        let mut conn = p.get().expect("checkout");
        let pid = backend_pid(&mut conn);
        diesel::sql_query("SELECT set_config('app.tenant', 'tenant-42', false)")
            .execute(&mut *conn)
            .expect("set the tenant");
        if pid > 0 {
            panic!("handler bug after setting the tenant (backend {pid})");
        }
        pid
    });
    assert!(handler.join().is_err(), "the handler was meant to panic");
    let mut conn = pool.get().expect("checkout after the panic");
    let tenant: Option<String> = diesel::select(diesel::dsl::sql::<Nullable<Text>>(
        "nullif(current_setting('app.tenant', true), '')",
    ))
    .get_result(&mut *conn)
    .expect("read the tenant");
    assert_eq!(
        tenant, None,
        "the session a panicking thread returned was handed out again, still set up for \
         the other tenant"
    );
    let stats = pool.stats();
    assert_eq!(stats.closed.broken, 1, "{stats:?}");
}

/// A connection returned inside a raw `BEGIN` is sent a `ROLLBACK` at checkin; when that
/// fails (here its backend was terminated while the application held it), the connection is
/// closed there and then, not put back for the next checkout's probe to find.
#[test]
fn a_connection_whose_rollback_at_checkin_failed_is_closed_at_checkin() {
    let Some(pg) = server() else { return };
    let app = "mech_rollback_failed";
    let pool = ext_pool(&pg, app, 1).build().unwrap();
    let mut conn = pool.get().expect("checkout");
    let pid = backend_pid(&mut conn);
    conn.batch_execute("BEGIN").expect("BEGIN");
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"))
        .expect("terminate the backend");
    pg.wait_backends_gone(app, Duration::from_secs(10))
        .expect("backend gone");
    std::thread::sleep(Duration::from_millis(50));
    drop(conn);
    let stats = pool.stats();
    assert_eq!(
        (stats.closed.broken, stats.idle),
        (1, 0),
        "the connection whose ROLLBACK failed was put back: {stats:?}"
    );
}

/// A connect that overlapped another stream to the same Unix socket cannot tell which of the
/// two new sockets is its own (Unix sockets have no byte counters to compare). Until that
/// is resolved the pool has no probe and, worse, no socket for the watchdog to shut down: a
/// ping to a hung backend is as unbounded as plain r2d2's. Once the other stream closes,
/// the next checkout resolves it by elimination: the probe vouches for the connection again
/// (no ping inside the bypass window) and a hung backend is cut off at `validation_timeout`.
#[test]
fn a_socket_left_ambiguous_at_connect_is_resolved_later_and_its_pings_are_bounded_again() {
    let Some(pg) = server() else { return };
    install_hooks();
    let app = "mech_ambiguous";
    let socket = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let needle = format!("application_name={app}");
    INTRUDERS.lock().unwrap().push(Intruder {
        needle: needle.clone(),
        socket,
        opened: Vec::new(),
    });
    let url = format!(
        "postgres://app:{}@/app?host={}&port={}",
        PgServer::PASSWORD,
        pg.socket_dir().display(),
        pg.port()
    );
    let validation_timeout = Duration::from_secs(1);
    let pool_timeout = Duration::from_secs(3);
    let pool = PgPool::builder(&url)
        .application_name(app)
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(Duration::from_secs(30))
        .validation_timeout(validation_timeout)
        .pool_timeout(pool_timeout)
        .build()
        .unwrap();
    warm(&pool, 1);
    // The intruder stays open for now; it is dropped after the precondition is checked.
    let intruder = {
        let mut intruders = INTRUDERS.lock().unwrap();
        let at = intruders
            .iter()
            .position(|i| i.needle == needle)
            .expect("registered");
        intruders.remove(at)
    };
    assert_eq!(
        intruder.opened.len(),
        1,
        "the connect window must have seen exactly one intruding stream"
    );
    // Precondition: while the intruder is open the socket is ambiguous, so the pool pings
    // every checkout, even inside the bypass window.
    let pings = pool.stats().pings;
    for _ in 0..3 {
        select_one(&pool).expect("checkout while ambiguous");
    }
    assert_eq!(
        pool.stats().pings - pings,
        3,
        "precondition: an ambiguous socket cannot be probed, every checkout pings"
    );

    drop(intruder);
    let pings = pool.stats().pings;
    for _ in 0..3 {
        select_one(&pool).expect("checkout after the intruder left");
    }
    // A pending socket is resolved only right after a statement on the connection succeeded
    // (see `socket.rs`): the first checkout still pings, that ping resolves it, the rest probe.
    assert!(
        pool.stats().pings - pings <= 1,
        "the intruder closed, yet the pool still could not probe the connection: its socket \
         was never resolved ({} pings for 3 checkouts)",
        pool.stats().pings - pings
    );

    // The effect that matters: the watchdog bounds a ping to a hung backend.
    pool.invalidate();
    let pause = pg.pause_backends(app).unwrap();
    let limit = validation_timeout + pool_timeout + Duration::from_secs(2);
    let handle = assert_checkout_returns(
        &pool,
        limit,
        "on a hung backend: the ping was not bounded, its socket was never resolved",
    );
    pause.resume();
    handle.join().unwrap();
    assert!(pool.stats().validations_failed >= 1, "{:?}", pool.stats());
}

/// The watchdog shuts a ping's socket down at `validation_timeout`. When the reply was
/// already in hand at that moment (the thread was descheduled between reading it and
/// returning, here stalled in the instrumentation), the ping "succeeds" on a socket that no
/// longer works: counted as a success, that connection would be handed out and fail the
/// caller's first query. It counts as a failed ping, and the caller gets another connection.
///
/// Hedging is off: the watchdog's deadline is the only thing that ends this ping (with
/// hedging on, a pool with no room gives the slow connection up at the hedge delay first:
/// the test below).
#[test]
fn a_ping_that_returned_only_after_the_watchdog_cut_its_socket_counts_as_failed() {
    late_ping_counts_as_failed("mech_late_ping", false);
}

/// As above, with hedged validation on (the default): at the hedge delay the pool, with no
/// room for a fresh connection, gives the slow one up and shuts its socket down; a reply
/// that was already in hand does not make that connection usable again.
#[test]
fn a_ping_whose_connection_was_given_up_at_the_hedge_delay_counts_as_failed() {
    late_ping_counts_as_failed("mech_late_ping_hedged", true);
}

fn late_ping_counts_as_failed(app: &str, hedged: bool) {
    let Some(pg) = server() else { return };
    install_hooks();
    let validation_timeout = Duration::from_millis(300);
    let pool = ext_pool(&pg, app, 1)
        .name(app)
        .validation_timeout(validation_timeout)
        .hedged_validation(hedged)
        .build()
        .unwrap();
    warm(&pool, 1);
    let first = pg.backend_pids(app).unwrap();
    assert_eq!(first.len(), 1);
    pool.invalidate();
    STALL_NEXT_QUERY.with(|s| s.set(Some(validation_timeout * 3)));
    let mut conn = pool.get().expect("checkout");
    STALL_NEXT_QUERY.with(|s| s.set(None));
    let pid = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result::<i32>(&mut *conn)
        .unwrap_or_else(|e| {
            panic!("the caller got the connection whose socket the watchdog shut down: {e}")
        });
    assert_ne!(pid, first[0], "the cut-off connection was handed out");
    let stats = pool.stats();
    assert_eq!(
        stats.validations_failed, 1,
        "the ping that came back after the watchdog shut its socket counted as a success: \
         {stats:?}"
    );
    drop(conn);
    assert_eq!(pool.stats().closed.ping_failed, 1, "{:?}", pool.stats());
    // A failed ping is worth a line of its own, at info, naming the pool.
    let lines = test_support::captured_logs();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("INFO")
                && l.contains(&format!("pool {app}: validation ping failed"))),
        "no info line for the failed ping: {:?}",
        lines.iter().filter(|l| l.contains(app)).collect::<Vec<_>>()
    );
}

/// A `LISTEN`ing connection returned to the pool keeps its notifications: the checkout's
/// probe looks at the socket without reading it, and a validation ping leaves what libpq
/// queued to the application. A notification sent while the connection sat idle is there at
/// its next checkout, whether the checkout only probed it (inside the bypass window) or
/// pinged it (past it).
#[test]
fn notifications_sent_while_a_listening_connection_sat_idle_survive_its_next_checkout() {
    let Some(pg) = server() else { return };
    let pool = PgPool::builder(&pg.url_with("sslmode=disable&application_name=mech_listen"))
        .pool_size(1)
        .max_overflow(0)
        .build()
        .unwrap();
    pool.get().unwrap().batch_execute("LISTEN pool_ch").unwrap();
    for (round, idle) in [
        (1, Duration::from_millis(100)),
        (2, Duration::from_millis(800)),
    ] {
        pg.execute(&format!("NOTIFY pool_ch, 'sent while idle {round}'"))
            .unwrap();
        std::thread::sleep(idle);
        let mut conn = pool.get().unwrap();
        let got: Vec<String> = conn
            .notifications_iter()
            .map(|n| n.map(|n| n.payload))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            vec![format!("sent while idle {round}")],
            "round {round} (idle {idle:?}): {:?}",
            pool.stats()
        );
    }
    let stats = pool.stats();
    assert_eq!(
        stats.connects, 1,
        "the same connection throughout: {stats:?}"
    );
    assert!(stats.pings >= 1, "the second checkout pinged: {stats:?}");
}

/// After a "read-only transaction" error the checkin asks the server whether it is a standby
/// now (a failover), on the application's thread. The question is bounded by
/// `validation_timeout`: against a stopped backend (a hung server) the checkin returns, and
/// the connection is closed, not pooled again with the question unanswered.
#[test]
fn the_checkins_standby_check_is_bounded_and_an_unanswered_connection_is_closed() {
    let Some(pg) = server() else { return };
    let app = "mech_standby_bound";
    let pool = PgPool::builder(&pg.url_with(&format!("sslmode=disable&application_name={app}")))
        .pool_size(1)
        .max_overflow(0)
        .validation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    conn.batch_execute("SET default_transaction_read_only = on")
        .unwrap();
    let write = conn.batch_execute("CREATE TABLE mech_standby_bound (x int)");
    assert!(
        write
            .as_ref()
            .is_err_and(|e| e.to_string().contains("read-only transaction")),
        "precondition: a write in a read-only session fails with 25006: {write:?}"
    );
    conn.batch_execute("RESET default_transaction_read_only")
        .unwrap();
    let pause = pg.pause_backends(app).unwrap();
    let (done, returned) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        drop(conn);
        let _ = done.send(());
    });
    let back = returned.recv_timeout(Duration::from_secs(10));
    let took = started.elapsed();
    drop(pause);
    assert!(
        back.is_ok(),
        "the checkin's standby check waited 10 s on a stopped backend (validation_timeout 1 s)"
    );
    assert!(took < Duration::from_secs(5), "the checkin took {took:?}");
    let stats = pool.stats();
    assert_eq!(stats.closed.broken, 1, "closed, not pooled: {stats:?}");
    assert!(select_one(&pool).is_ok(), "a fresh connection serves");
}
