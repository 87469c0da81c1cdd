//! One line added to a stock r2d2 builder: the customizers (session settings, SQLite
//! pragmas, TCP keepalives) read back from the server, the SQLite file and the kernel, and
//! `ExtManager::standalone` inside an unchanged `r2d2::Pool::builder()` against a mass
//! terminate, with plain r2d2 at its defaults and without its checkout test as controls.
//! Also the extended pool's `after_connect` hook.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Integer, Text};
use resilient_diesel::customize::{Both, SessionSettings, SqlitePragmas, TcpKeepalives};
use resilient_diesel::pool_core::url::DatabaseUrl;
use resilient_diesel::ExtManager;

/// Taken by every test of this file: `TcpKeepalives` tells a new connection's socket from
/// the process's other sockets by one round trip, and a socket another test keeps busy at that
/// instant (a query in a loop, a proxy forwarding) cannot be told apart (the customizer then
/// warns and sets nothing). Applications share a process with their own traffic too: the
/// tiebreak's repeated rounds with random pauses usually separate them; a test must not
/// depend on "usually".
fn serial() -> parking_lot::MutexGuard<'static, ()> {
    static LOCK: parking_lot::Mutex<()> = parking_lot::const_mutex(());
    LOCK.lock()
}

#[derive(QueryableByName, Debug)]
struct Setting {
    #[diesel(sql_type = Text)]
    v: String,
}

fn show(conn: &mut PgConnection, name: &str) -> String {
    diesel::sql_query(format!("SELECT current_setting('{name}') AS v"))
        .get_result::<Setting>(conn)
        .unwrap_or_else(|e| panic!("reading {name}: {e}"))
        .v
}

fn session() -> SessionSettings {
    SessionSettings::new()
        .statement_timeout(Duration::from_millis(1234))
        .lock_timeout(Duration::from_secs(2))
        .idle_in_transaction_session_timeout(Duration::from_secs(3))
        .application_name("cust_session")
}

fn assert_session_settings(conn: &mut PgConnection) {
    assert_eq!(show(conn, "statement_timeout"), "1234ms");
    assert_eq!(show(conn, "lock_timeout"), "2s");
    assert_eq!(show(conn, "idle_in_transaction_session_timeout"), "3s");
    assert_eq!(show(conn, "application_name"), "cust_session");
}

#[test]
fn session_settings_are_in_effect_on_every_connection_of_a_stock_r2d2_pool() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let pool = r2d2::Pool::builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(session().validate().expect("valid settings")))
        .build(ConnectionManager::<PgConnection>::new(
            pg.url_with("sslmode=disable"),
        ))
        .expect("stock pool with the customizer");
    // All three at once: three distinct connections.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = pool.get().expect("checkout");
        assert_session_settings(&mut conn);
        held.push(conn);
    }
    assert_eq!(
        settle_backends(&pg, "cust_session", 3),
        3,
        "pg_stat_activity shows the application_name of every connection"
    );
}

#[test]
fn session_settings_work_with_the_standalone_manager_too() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let manager = ExtManager::<PgConnection>::standalone(&pg.url_with("sslmode=disable"))
        .expect("standalone manager");
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(Both(
            session(),
            TcpKeepalives::new().idle(Duration::from_secs(11)),
        )))
        .build(manager)
        .expect("stock pool with our manager");
    let mut a = pool.get().expect("checkout");
    let mut b = pool.get().expect("checkout");
    for conn in [&mut a, &mut b] {
        assert_session_settings(conn);
        // The manager renders its own keepalive defaults (idle 30 s) into the URL; the
        // customizer, run after, wins on the socket the manager found.
        let port = client_port(conn);
        let options = socket_options_of_local_port(port).expect("the connection's socket");
        assert_eq!(
            options,
            [1, 11, 10, 3, 30_000],
            "SO_KEEPALIVE, idle, interval, count, user timeout"
        );
    }
}

#[test]
fn a_bad_value_is_a_clear_error_never_a_panic_and_fails_the_connects() {
    let _serial = serial();
    let e = session()
        .statement_timeout(Duration::from_micros(300))
        .validate()
        .unwrap_err();
    assert_eq!(e.setting, "statement_timeout");
    assert!(e.to_string().contains("whole milliseconds"), "{e}");
    let e = SessionSettings::new()
        .application_name("naïve")
        .validate()
        .unwrap_err();
    assert_eq!(e.setting, "application_name");
    let e = TcpKeepalives::new().count(0).validate().unwrap_err();
    assert_eq!(e.setting, "keepalives_count");
    let e = TcpKeepalives::new()
        .idle(Duration::from_millis(1500))
        .validate()
        .unwrap_err();
    assert_eq!(e.setting, "keepalives_idle");
    let e = SqlitePragmas::new()
        .busy_timeout(Duration::from_secs(10_000_000))
        .validate()
        .unwrap_err();
    assert_eq!(e.setting, "busy_timeout");

    // Not validated, handed to a pool anyway: every connect fails with the same message.
    let Some(pg) = server() else { return };
    let err = r2d2::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(2))
        .connection_customizer(Box::new(
            SessionSettings::new().lock_timeout(Duration::from_nanos(5)),
        ))
        .build(ConnectionManager::<PgConnection>::new(
            pg.url_with("sslmode=disable"),
        ))
        .expect_err("no connection can be customized");
    assert!(err.to_string().contains("lock_timeout"), "{err}");
    assert!(!err.to_string().contains(PgServer::PASSWORD), "{err}");
}

#[derive(QueryableByName, Debug)]
struct PragmaInt {
    #[diesel(sql_type = BigInt)]
    v: i64,
}

fn pragma_int(conn: &mut SqliteConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<PragmaInt>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .v
}

fn journal_mode(conn: &mut SqliteConnection) -> String {
    diesel::sql_query("SELECT journal_mode AS v FROM pragma_journal_mode()")
        .get_result::<Setting>(conn)
        .expect("journal_mode")
        .v
}

#[test]
fn sqlite_pragmas_are_in_effect_on_every_connection_of_a_stock_r2d2_pool() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.db");
    let pool = r2d2::Pool::builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(
            SqlitePragmas::new().busy_timeout(Duration::from_millis(2500)),
        ))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_str().expect("utf-8 path"),
        ))
        .expect("stock SQLite pool");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = pool.get().expect("checkout");
        assert_eq!(
            pragma_int(&mut conn, "SELECT timeout AS v FROM pragma_busy_timeout()"),
            2500
        );
        assert_eq!(journal_mode(&mut conn), "wal");
        assert_eq!(
            pragma_int(
                &mut conn,
                "SELECT foreign_keys AS v FROM pragma_foreign_keys()"
            ),
            1
        );
        held.push(conn);
    }
    drop(held);

    // Turned off: foreign keys off, the journal left as it is (a new file: DELETE).
    let other = dir.path().join("other.db");
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .connection_customizer(Box::new(
            SqlitePragmas::new().wal(false).foreign_keys(false),
        ))
        .build(ConnectionManager::<SqliteConnection>::new(
            other.to_str().expect("utf-8 path"),
        ))
        .expect("stock SQLite pool");
    let mut conn = pool.get().expect("checkout");
    assert_eq!(
        pragma_int(&mut conn, "SELECT timeout AS v FROM pragma_busy_timeout()"),
        5000
    );
    assert_eq!(journal_mode(&mut conn), "delete");
    assert_eq!(
        pragma_int(
            &mut conn,
            "SELECT foreign_keys AS v FROM pragma_foreign_keys()"
        ),
        0
    );
}

/// The TCP options of the process's socket whose local port is `port`, read with
/// getsockopt: (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT).
/// A new SQLite file (journal `delete`) whose reader holds a shared lock in an open
/// transaction until the returned sender is dropped or sends (or `hold` passes): switching it
/// to WAL needs the file to itself.
fn locked_sqlite_file(
    dir: &std::path::Path,
    hold: Duration,
) -> (
    String,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let path = dir.join("locked.db");
    let url = path.to_str().expect("utf-8 path").to_owned();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader_url = url.clone();
    let reader = std::thread::spawn(move || {
        let mut conn = SqliteConnection::establish(&reader_url).expect("the reader's connection");
        conn.batch_execute("CREATE TABLE t (id INTEGER); INSERT INTO t VALUES (1); BEGIN;")
            .expect("set up the file");
        // The read takes the shared lock, held until the transaction ends.
        pragma_int(&mut conn, "SELECT id AS v FROM t");
        locked_tx.send(()).expect("tell the test");
        let _ = release_rx.recv_timeout(hold);
        conn.batch_execute("COMMIT").expect("end the read");
    });
    locked_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader did not take its lock within 10 s");
    (url, release_tx, reader)
}

/// Runs `SqlitePragmas::on_acquire` (as r2d2 does after each connect) on a fresh connection
/// to `url` on a thread of its own: its result, or `None` if it did not return within `limit`.
fn acquire_with_deadline(
    url: &str,
    pragmas: SqlitePragmas,
    limit: Duration,
) -> Option<Result<String, String>> {
    let url = url.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut conn = SqliteConnection::establish(&url).expect("connection");
        let result =
            r2d2::CustomizeConnection::<SqliteConnection, diesel::r2d2::Error>::on_acquire(
                &pragmas, &mut conn,
            )
            .map(|()| journal_mode(&mut conn))
            .map_err(|e| e.to_string());
        let _ = tx.send(result);
    });
    rx.recv_timeout(limit).ok()
}

/// Switching a new file to WAL needs it to itself, and SQLite reports a lock found there as
/// "database is locked" once `busy_timeout` has run out (two of r2d2's connects switching
/// at the same instant find each other so, without waiting: the race the retry answers).
/// With no `busy_timeout` at all, a reader's lock held 60 ms is the same failure on demand:
/// the customizer tries again until the lock is gone.
#[test]
fn a_wal_switch_that_finds_the_file_locked_is_tried_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, release, reader) = locked_sqlite_file(dir.path(), Duration::from_secs(10));
    let pragmas = SqlitePragmas::new().busy_timeout(Duration::ZERO);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        let _ = release.send(());
    });
    let result = acquire_with_deadline(&url, pragmas, Duration::from_secs(10))
        .expect("on_acquire did not return within 10 s of the lock's release");
    releaser.join().unwrap();
    reader.join().unwrap();
    assert_eq!(
        result.as_deref(),
        Ok("wal"),
        "a WAL switch that found the file locked for 60 ms was not tried again"
    );
}

/// The retry is bounded: a lock that stays (a long reader) fails the connect with SQLite's
/// own message after 20 tries 10 ms apart, well before the lock is gone, instead of waiting
/// on it past the `busy_timeout` the application set.
#[test]
fn a_wal_switch_that_stays_locked_fails_with_sqlites_message_within_its_tries() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, release, reader) = locked_sqlite_file(dir.path(), Duration::from_secs(5));
    let pragmas = SqlitePragmas::new().busy_timeout(Duration::ZERO);
    let result = acquire_with_deadline(&url, pragmas, Duration::from_secs(3));
    drop(release);
    reader.join().unwrap();
    let result = result
        .expect("on_acquire was still trying 3 s into a lock held 5 s: its retry is not bounded");
    let err = result.expect_err("the switch succeeded while another connection held the file");
    assert!(err.contains("database is locked"), "{err}");
}

fn socket_options_of_local_port(port: u16) -> Option<[i32; 5]> {
    fn get(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        v
    }
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: zeroed sockaddr_storage is valid; getsockname writes at most `len` bytes.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 || i32::from(addr.ss_family) != libc::AF_INET {
            continue;
        }
        // SAFETY: the family says it holds a sockaddr_in.
        let sin = unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        if u16::from_be(sin.sin_port) != port {
            continue;
        }
        return Some([
            get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            get(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
        ]);
    }
    None
}

fn client_port(conn: &mut PgConnection) -> u16 {
    let port: i32 = diesel::select(diesel::dsl::sql::<Integer>("inet_client_port()"))
        .get_result(conn)
        .expect("inet_client_port()");
    u16::try_from(port).expect("a TCP port")
}

#[test]
fn tcp_keepalives_and_user_timeout_are_set_on_each_connections_socket() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    // keepalives=0: libpq leaves the socket alone, so whatever is set is the customizer's.
    let url = pg.url_with("sslmode=disable&keepalives=0");
    let pool = r2d2::Pool::builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(20))
        .connection_customizer(Box::new(
            TcpKeepalives::new()
                .idle(Duration::from_secs(7))
                .interval(Duration::from_secs(3))
                .count(4)
                .user_timeout(Duration::from_millis(4500)),
        ))
        .build(ConnectionManager::<PgConnection>::new(url.clone()))
        .expect("stock pool with keepalives");
    // r2d2 opened its three connections at once, on its own threads: the socket of each was
    // told apart from the others' by the tiebreak.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = pool.get().expect("checkout");
        let port = client_port(&mut conn);
        let options = socket_options_of_local_port(port).expect("the connection's socket");
        assert_eq!(
            options,
            [1, 7, 3, 4, 4500],
            "SO_KEEPALIVE, idle, interval, count, user timeout"
        );
        held.push(conn);
    }

    // Control: the same pool without the customizer leaves keepalives off.
    let plain = r2d2::Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<PgConnection>::new(url))
        .expect("plain pool");
    let mut conn = plain.get().expect("checkout");
    let port = client_port(&mut conn);
    let options = socket_options_of_local_port(port).expect("the connection's socket");
    assert_eq!(
        options[0], 0,
        "libpq with keepalives=0 sets no SO_KEEPALIVE: {options:?}"
    );
}

/// 100 checkouts + queries after every backend of `app` was terminated: the errors seen.
fn after_mass_terminate<P: Checkout>(pg: &PgServer, pool: &P, app: &str) -> Vec<String> {
    warm(pool, 4);
    assert_eq!(
        settle_backends(pg, app, 4),
        4,
        "{app}: four backends before the fault"
    );
    terminate_all(pg, app);
    errors_over(pool, 100)
}

#[test]
fn the_standalone_manager_in_a_stock_r2d2_pool_turns_a_mass_terminate_into_zero_errors() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    // Ours: the stock builder, only the manager swapped; counted by a proxy.
    let (ours_proxy, ours_url) = proxied(&pg, "sslmode=disable&application_name=stock_ours");
    // A bypass window of an hour: no connection is pinged at checkout, so only the liveness
    // probe stands between a dead connection and the caller.
    let config = resilient_diesel::PoolConfig::builder(&ours_url)
        .validation_bypass_window(Duration::from_secs(3600))
        .build()
        .expect("config");
    let manager = ExtManager::<PgConnection>::standalone_with(config).expect("manager");
    let stats = manager.stats_handle();
    let ours = r2d2::Pool::builder()
        .max_size(4)
        .build(manager)
        .expect("stock pool with our manager");
    // Control: plain r2d2 at its defaults (a SELECT 1 before every checkout), but for its
    // size, the same as ours.
    let (ctl_proxy, ctl_url) = proxied(&pg, "sslmode=disable&application_name=stock_r2d2");
    let control = r2d2::Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(ctl_url))
        .expect("plain pool");

    warm(&ours, 4);
    warm(&control, 4);
    assert_eq!(
        settle_backends(&pg, "stock_ours", 4),
        4,
        "ours: four backends"
    );
    assert_eq!(
        settle_backends(&pg, "stock_r2d2", 4),
        4,
        "control: four backends"
    );
    terminate_all(&pg, "stock_ours");
    terminate_all(&pg, "stock_r2d2");
    ours_proxy.reset_counts();
    ctl_proxy.reset_counts();

    let errors = errors_over(&ours, 100);
    assert!(
        errors.is_empty(),
        "errors surfaced through our manager: {errors:?}"
    );
    let errors = errors_over(&control, 100);
    assert!(
        errors.is_empty(),
        "plain r2d2 at its defaults survives this: {errors:?}"
    );
    let (a, b) = (
        ours_proxy.messages().round_trips(),
        ctl_proxy.messages().round_trips(),
    );
    let s = stats.snapshot();
    println!(
        "mass terminate, 100 checkouts + queries: standalone manager {a} round trips \
         ({} reconnects, {} dead found by the probe, {} pings), plain r2d2 at its defaults {b} \
         ({} reconnects)",
        ours_proxy.connections_accepted(),
        s.probe_detected_dead,
        s.pings,
        ctl_proxy.connections_accepted()
    );
    assert!(
        s.probe_detected_dead >= 1,
        "the probe found the dead connections: {s:?}"
    );
    // Plain r2d2 pings before every checkout: about 200 round trips for 100 queries; ours
    // about one per query.
    assert!(a * 10 <= b * 6, "ours {a} vs plain r2d2 {b} round trips");
    assert_no_secret_in_logs();
}

#[test]
fn weakened_control_plain_r2d2_without_checkout_test_surfaces_a_mass_terminate() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let pool = r2d2::Pool::builder()
        .max_size(4)
        .test_on_check_out(false)
        .build(ConnectionManager::<PgConnection>::new(
            pg.url_with("sslmode=disable&application_name=stock_notest"),
        ))
        .expect("plain pool");
    let errors = after_mass_terminate(&pg, &pool, "stock_notest");
    assert!(
        !errors.is_empty(),
        "the terminate must hurt plain r2d2 without its checkout test"
    );
}

#[test]
fn the_after_connect_hook_runs_on_every_new_connection_of_the_extended_pool() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "hook_ok", 2)
        .after_connect(|conn| conn.batch_execute("SET work_mem = '7MB'"))
        .build()
        .expect("pool with a hook");
    let held = hold(&pool, 2);
    drop(held);
    // Every backend, new ones included: terminate them, the replacements run it too.
    terminate_all(&pg, "hook_ok");
    for _ in 0..4 {
        let mut conn = pool.get().expect("checkout after the terminate");
        assert_eq!(show(&mut conn, "work_mem"), "7MB");
    }
}

#[test]
fn a_failing_after_connect_hook_fails_that_connect_at_once_with_its_cause() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let err = ext_pool(&pg, "hook_bad", 1)
        .pool_timeout(Duration::from_secs(30))
        .after_connect(|conn| conn.batch_execute("SET no_such_setting_here = 1"))
        .build()
        .expect_err("every connect fails");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("after_connect hook failed"), "{text}");
    assert!(text.contains("no_such_setting_here"), "{text}");
    assert!(!text.contains(PgServer::PASSWORD), "{text}");
    // Hopeless: `build()` returned with the cause instead of waiting its 30 s pool timeout.
    assert!(
        !text.contains("within"),
        "the error says it waited the pool timeout out: {text}"
    );
}

#[test]
fn an_after_connect_error_quoting_the_password_is_redacted_everywhere() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let err = ext_pool(&pg, "hook_secret", 1)
        .after_connect(|_conn| {
            Err(diesel::result::Error::QueryBuilderError(
                format!("cannot log in with {}", PgServer::PASSWORD).into(),
            ))
        })
        .build()
        .expect_err("every connect fails");
    let text = format!("{err} {err:?}");
    assert!(text.contains("cannot log in with"), "{text}");
    assert!(
        !text.contains(PgServer::PASSWORD),
        "the password leaked: {text}"
    );
    assert_no_secret_in_logs();
}

/// A sentinel credential: every character a URL or a log line could mishandle.
fn rotated_token(round: usize) -> String {
    format!("tok{round} p@ss:w/o%rd#?&='ünï")
}

/// Sets the role `app`'s password, as a credential service rotating it would.
fn set_password(pg: &PgServer, password: &str) {
    pg.execute(&format!(
        "ALTER ROLE app PASSWORD '{}'",
        password.replace('\'', "''")
    ))
    .expect("ALTER ROLE");
}

/// The connect an app with short-lived credentials gives the pool: the conninfo the pool
/// would open, with the password its credential source says now.
fn fresh_password_connect(
    current: Arc<parking_lot::Mutex<String>>,
    connects: Arc<AtomicUsize>,
) -> impl Fn(&str) -> ConnectionResult<PgConnection> + Send + Sync + 'static {
    move |conninfo| {
        connects.fetch_add(1, Ordering::SeqCst);
        let url = DatabaseUrl::parse(conninfo)
            .and_then(|url| url.with_password(&current.lock()))
            .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
        PgConnection::establish(url.expose_secret())
    }
}

#[test]
fn a_custom_connect_fetching_a_fresh_password_per_connect_keeps_the_pool_open_across_rotations() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    // The application's credential source (an IAM token service, a Vault lease): the pool's
    // URL keeps the password it was built with, the connect function asks for the current one.
    let current = Arc::new(parking_lot::Mutex::new(PgServer::PASSWORD.to_owned()));
    let connects = Arc::new(AtomicUsize::new(0));
    let pool = ext_pool(&pg, "iam", 2)
        .custom_connect(fresh_password_connect(current.clone(), connects.clone()))
        .build()
        .expect("pool with the app's connect");
    // The same connect in a stock r2d2 builder, through the standalone manager.
    let stock = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(10))
        .build(
            ExtManager::<PgConnection>::standalone(
                &pg.url_with("sslmode=disable&application_name=iam_stock"),
            )
            .expect("standalone manager")
            .custom_connect(fresh_password_connect(current.clone(), connects.clone())),
        )
        .expect("stock pool");
    drop(hold(&stock, 2));
    // The control: the URL's password, as plain r2d2 keeps it.
    let plain = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(3))
        .build(ConnectionManager::<PgConnection>::new(
            pg.url_with("sslmode=disable&application_name=iam_plain"),
        ))
        .expect("plain pool");
    drop(hold(&pool, 2));
    drop(hold(&plain, 2));
    let opened = connects.load(Ordering::SeqCst);
    for round in 0..3 {
        let token = rotated_token(round);
        set_password(&pg, &token);
        *current.lock() = token.clone();
        // Every connection must be opened again, with the new credential.
        terminate_all(&pg, "iam");
        if round == 0 {
            // Later rounds: plain r2d2 has no connection left to terminate.
            terminate_all(&pg, "iam_plain");
        }
        terminate_all(&pg, "iam_stock");
        let mut errors = errors_over(&pool, 20);
        errors.extend(errors_over(&stock, 20));
        assert!(errors.is_empty(), "round {round}: {errors:?}");
        for e in &errors {
            assert!(!e.contains(&token) && !e.contains("p@ss"), "{e}");
        }
        let plain_errors = errors_over(&plain, 1);
        assert!(
            plain_errors
                .iter()
                .any(|e| e.contains("password authentication failed")),
            "round {round}: the URL's password no longer works for plain r2d2: {plain_errors:?}"
        );
    }
    assert!(
        connects.load(Ordering::SeqCst) >= opened + 6,
        "every replacement, of both pools, was opened through the app's connect"
    );
    // The pool's own machinery stays on: the terminated connections were found by the probe.
    assert!(pool.stats().probe_detected_dead >= 3, "{:?}", pool.stats());
    let shown = format!("{pool:?} {}", pool.status().to_json());
    assert!(!shown.contains("p@ss"), "{shown}");
}

#[derive(QueryableByName)]
struct TxidRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    txid: Option<i64>,
}

fn txid_if_assigned(conn: &mut PgConnection) -> Option<i64> {
    diesel::sql_query("SELECT txid_current_if_assigned() AS txid")
        .get_result::<TxidRow>(conn)
        .expect("txid_current_if_assigned")
        .txid
}

/// The standalone manager in an unchanged `r2d2::Pool::builder()` keeps the checkin and
/// checkout rules of the extended pool: a connection returned inside a transaction opened by
/// a raw `BEGIN` (which Diesel's own manager does not see) is never handed out still inside
/// it, and a checkout facing a stopped backend returns within `validation_timeout` (the
/// bounded ping), not after r2d2's 30 s connection timeout.
#[test]
fn the_standalone_manager_in_a_stock_r2d2_pool_rolls_back_raw_transactions_and_bounds_its_ping() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let app = "stock_rules";
    let config = resilient_diesel::PoolConfig::builder(
        &pg.url_with(&format!("sslmode=disable&application_name={app}")),
    )
    .validation_timeout(Duration::from_secs(1))
    .build()
    .expect("config");
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .build(ExtManager::<PgConnection>::standalone_with(config).expect("manager"))
        .expect("stock pool with our manager");
    {
        let mut conn = pool.get().unwrap();
        conn.batch_execute("BEGIN").unwrap();
        let _ = diesel::sql_query("SELECT txid_current()").execute(&mut *conn);
        assert!(
            txid_if_assigned(&mut conn).is_some(),
            "inside the transaction"
        );
    }
    let mut conn = pool.get().unwrap();
    assert_eq!(
        txid_if_assigned(&mut conn),
        None,
        "the next checkout was handed the session still inside the raw transaction"
    );
    drop(conn);
    // Past the bypass window, the next checkout pings; its backend is stopped.
    std::thread::sleep(Duration::from_millis(700));
    let pause = pg.pause_backends(app).expect("the pooled backend");
    let started = std::time::Instant::now();
    let got = pool.get();
    let took = started.elapsed();
    drop(pause);
    let mut conn = got.expect("a fresh connection in place of the stopped one");
    assert_eq!(
        diesel::sql_query("SELECT 1 AS n")
            .execute(&mut *conn)
            .unwrap(),
        1
    );
    // The bound this test proves: the ping's 1 s (plus a connect), not r2d2's 30 s.
    assert!(
        took < Duration::from_secs(10),
        "the checkout waited {took:?} on a stopped backend (validation_timeout 1 s)"
    );
}

/// An after-connect hook whose statement waits on the server for ever (here a one-hour
/// `pg_sleep`, as a hung server or a lock held elsewhere would make it) is cut at
/// `connect_timeout`: that connect fails as a lost connection would, and the next one
/// serves. Unbounded, it held its connect, and the demand it served, for ever: a pool of
/// one never connected again.
#[test]
fn an_after_connect_hook_stuck_on_the_server_is_cut_at_connect_timeout() {
    let _serial = serial();
    let Some(pg) = server() else { return };
    let calls = Arc::new(AtomicUsize::new(0));
    let hooked = calls.clone();
    let started = std::time::Instant::now();
    let pool = ext_pool(&pg, "hook_stuck", 1)
        .connect_timeout(Some(Duration::from_secs(1)))
        .pool_timeout(Duration::from_secs(15))
        .after_connect(move |conn| {
            if hooked.fetch_add(1, Ordering::SeqCst) == 0 {
                conn.batch_execute("SELECT pg_sleep(3600)")
            } else {
                Ok(())
            }
        })
        .build()
        .expect("the second connect serves");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "build() took {took:?} with connect_timeout 1 s"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2);
    assert!(select_one(&pool).is_ok());
}
