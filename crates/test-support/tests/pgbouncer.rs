//! PgBouncer in front of a private PgServer: logins through it, the admin console, restart,
//! and that neither its process nor its directory survives Drop, also after a panic.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Text;
use test_support::{
    pg_or_skip, pgbouncer_or_skip, process_alive, PgBouncer, PgBouncerOptions, PoolMode,
};

fn application_name(conn: &mut PgConnection) -> String {
    diesel::select(diesel::dsl::sql::<Text>(
        "current_setting('application_name')",
    ))
    .get_result(conn)
    .expect("query through pgbouncer")
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pgbouncer (pid {pid}) still runs 10 s after Drop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_transaction_mode_pgbouncer_serves_logins_answers_its_console_and_restarts() {
    let Some(pg) = pg_or_skip() else { return };
    let Some(bouncer) = pgbouncer_or_skip(&pg, PgBouncerOptions::new(PoolMode::Transaction)) else {
        return;
    };
    let url = bouncer.url_with("sslmode=disable&application_name=through-bouncer");
    let mut conn = PgConnection::establish(&url).expect("login through pgbouncer");
    assert_eq!(application_name(&mut conn), "through-bouncer");
    let row = bouncer.pool_row().expect("SHOW POOLS");
    let mode = row
        .iter()
        .find(|(k, _)| k == "pool_mode")
        .map(|(_, v)| v.as_str());
    assert_eq!(mode, Some("transaction"), "{row:?}");
    assert!(bouncer.server_connections().expect("server connections") <= 2);
    bouncer.reconnect().expect("RECONNECT");
    bouncer.kill_db().expect("KILL");
    bouncer.resume().expect("RESUME");
    let pid = bouncer.pid().expect("running");
    bouncer.restart().expect("restart");
    assert_ne!(bouncer.pid(), Some(pid), "a new process after restart");
    assert!(!process_alive(pid), "the old process is gone");
    let mut conn = PgConnection::establish(&url).expect("login after restart");
    assert_eq!(application_name(&mut conn), "through-bouncer");
}

#[test]
fn drop_kills_pgbouncer_and_removes_its_directory_even_when_the_test_panics() {
    let Some(pg) = pg_or_skip() else { return };
    let Some(bouncer) = pgbouncer_or_skip(&pg, PgBouncerOptions::new(PoolMode::Session)) else {
        return;
    };
    let pid = bouncer.pid().expect("running");
    let dir = bouncer
        .log_path()
        .parent()
        .expect("log in its dir")
        .to_path_buf();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _bouncer: PgBouncer = bouncer;
        panic!("a failing test");
    }));
    assert!(outcome.is_err());
    wait_gone(pid);
    assert!(!dir.exists(), "{} left behind", dir.display());
}
