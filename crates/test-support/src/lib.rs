//! Test support for resilient-diesel: private throwaway PostgreSQL servers and real fault
//! injection.
//!
//! - [`PgServer`]: a private cluster per test (temp dir, free loopback port, TLS with its own
//!   CA, a password role `app`), with admin helpers to kill, pause, restart and reconfigure
//!   it. Dropping it stops the server and removes its files, also when the test panicked.
//! - [`FaultProxy`]: a TCP proxy that resets, stalls, delays, or cuts a connection right
//!   after the `COMMIT` went through.
//! - [`PgBouncer`]: a private PgBouncer (session or transaction pooling, 2 server
//!   connections by default, admin console for `RECONNECT`/`KILL`/`SHOW POOLS`) in front of a
//!   `PgServer`; the package is installed by `scripts/install-pgbouncer.sh` when missing
//!   ([`pgbouncer_or_skip`] skips or, under `CI=true`, fails when it cannot be had).
//! - [`SilentServer`]: accepts TCP connections and never answers.
//! - [`with_dir_replaced`]: runs a closure on a thread that sees a machine directory (the
//!   CA bundles') holding other files, in a private mount namespace.
//! - [`capture_logs`] / [`captured_logs`]: assert that a secret never reaches the logs.
//!
//! Server binaries are found through `PG_BIN_DIR`, then `PATH`, then the highest version under
//! `/usr/lib/postgresql/*/bin`. As root, the server runs as the `postgres` system user.
//! Clusters live in `/dev/shm` when it has room (else `/tmp`; `TEST_SUPPORT_TMPDIR`
//! overrides), as copies of one template made by `initdb` once per test process; dirs and
//! servers left behind by a killed test process are cleaned up by the next one.
//! Tests that need a server use [`pg_or_skip`]: under `CI=true` a server that cannot start
//! fails the test, elsewhere the test says why and skips.
#![warn(missing_docs)]

mod certs;
mod cpu;
mod error;
mod logs;
mod mountns;
mod netns;
mod pg;
mod pgbouncer;
mod proxy;
pub mod sentinel;
mod silent;
mod sys;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::OnceLock;

use parking_lot::Mutex;

pub use cpu::{cpu_of_threads, this_thread_cpu, threads_cpu, threads_named, MAINTENANCE_THREADS};
pub use error::TestSupportError;
pub use logs::{capture_logs, captured_logs};
pub use mountns::with_dir_replaced;
pub use netns::NetNs;
pub use pg::{BackendPause, ClientCert, PgOptions, PgServer, PAUSE_EXPIRES_AFTER};
pub use pgbouncer::{pgbouncer_or_skip, PgBouncer, PgBouncerOptions, PoolMode, Release};
pub use proxy::{FaultProxy, MessageCounts, SILENCE_EXPIRES_AFTER};
pub use silent::SilentServer;
pub use sys::process_alive;

/// A currently free TCP port on 127.0.0.1: binds port 0, reads the port, closes. A port is
/// never handed out twice by one process; another process may still take it before it is
/// used, so callers that bind it must retry on "address in use" ([`PgServer::start`] does).
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    let mut last = 0;
    for _ in 0..64 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port == 0 {
            continue;
        }
        last = port;
        if handed_out.lock().insert(port) {
            return port;
        }
    }
    if last != 0 {
        return last;
    }
    // Binding port 0 kept failing: fall back to a pseudo-random high port.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    20_000 + (nanos % 30_000) as u16
}

/// Whether server-needing tests must fail instead of skipping: `CI` is set to `true`, `1` or
/// `yes` (any case).
pub fn ci_mode() -> bool {
    std::env::var("CI")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

/// Starts a [`PgServer`], or decides what to do when it cannot: under [`ci_mode`] it panics
/// with the error's text; otherwise it prints `skipping: <why>` to stderr and returns `None`.
///
/// ```no_run
/// let Some(pg) = test_support::pg_or_skip() else { return };
/// println!("{}", pg.url());
/// ```
pub fn pg_or_skip() -> Option<PgServer> {
    match PgServer::start() {
        Ok(server) => Some(server),
        Err(err) if ci_mode() => panic!(
            "could not start a private PostgreSQL server, and CI=true makes that a failure \
             instead of a skip: {err}"
        ),
        Err(err) => {
            eprintln!("skipping: could not start a private PostgreSQL server: {err}");
            None
        }
    }
}
