//! The server named only by libpq's environment variables (PGHOST, PGPORT): the socket is
//! still found, so a ping against a hung backend is bounded. Its own test binary, because it
//! sets the process environment.

mod common;

use common::*;

#[test]
fn the_socket_is_found_when_pghost_and_pgport_name_the_server() {
    let Some(pg) = server() else { return };
    // SAFETY of the environment change: this binary has this one test, and nothing else runs
    // in it yet.
    std::env::set_var("PGHOST", "127.0.0.1");
    std::env::set_var("PGPORT", pg.port().to_string());
    let url = format!("postgres://app:{}@/app?sslmode=disable", PgServer::PASSWORD);
    hung_backend_is_bounded(&pg, "form_env", &url);
}
