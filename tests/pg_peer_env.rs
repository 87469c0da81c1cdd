//! The server named only by libpq's environment variables (PGHOST, PGPORT): the socket is
//! still found, so a ping against a hung backend is bounded. Its own test binary, because it
//! sets the process environment.

mod common;

use std::time::Duration;

use common::*;
use resilient_diesel::PgPool;

#[test]
fn the_socket_is_found_when_pghost_and_pgport_name_the_server() {
    let Some(pg) = server() else { return };
    // SAFETY of the environment change: this binary has this one test, and nothing else runs
    // in it yet.
    std::env::set_var("PGHOST", "127.0.0.1");
    std::env::set_var("PGPORT", pg.port().to_string());
    let url = format!("postgres://app:{}@/app?sslmode=disable", PgServer::PASSWORD);
    let app = "form_env";
    let validation_timeout = Duration::from_secs(1);
    let pool_timeout = Duration::from_secs(3);
    let pool = PgPool::builder(&url)
        .application_name(app)
        .pool_size(1)
        .max_overflow(0)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(validation_timeout)
        .pool_timeout(pool_timeout)
        .build()
        .unwrap();
    warm(&pool, 1);
    let pause = pg.pause_backends(app).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let limit = validation_timeout + pool_timeout + Duration::from_secs(5);
    let handle = assert_checkout_returns(&pool, limit, "(server named by PGHOST/PGPORT)");
    pause.resume();
    handle.join().unwrap();
    assert!(errors_over(&pool, 5).is_empty());
}
