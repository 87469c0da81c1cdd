//! `pool-doctor check` through PgBouncer in transaction mode (when `pgbouncer` is
//! installed): the pooler is detected and the fix named.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{doctor, run, server};
use test_support::{PgOptions, PgServer};

/// A PgBouncer process, stopped when dropped.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/pgbouncer",
        "/usr/bin/pgbouncer",
        "/usr/local/bin/pgbouncer",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Gives `dir` to the `postgres` user when running as root (PgBouncer refuses to run as
/// root, and writes its log and pid file there).
fn run_as_postgres(dir: &Path, cmd: &mut Command) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: a valid C string; the result is read at once, before any other getpw* call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no postgres user to run pgbouncer as");
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    cmd.args(["-u", "postgres"]);
}

fn start_bouncer(pg: &PgServer, bin: &Path) -> Bouncer {
    let dir = tempfile::tempdir().unwrap();
    let port = test_support::free_port();
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             app = host=127.0.0.1 port={} dbname=app user=app password={}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = transaction\n\
             default_pool_size = 4\n\
             logfile = {}\n",
            pg.port(),
            PgServer::PASSWORD,
            dir.path().join("pgbouncer.log").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    run_as_postgres(dir.path(), &mut cmd);
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting pgbouncer");
    let bouncer = Bouncer {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "pgbouncer did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    bouncer
}

#[test]
fn a_transaction_mode_pooler_is_detected_and_the_setting_named() {
    let Some(bin) = pgbouncer_binary() else {
        eprintln!("skipping: pgbouncer is not installed");
        return;
    };
    let Some(pg) = server(PgOptions::new().ssl(false)) else {
        return;
    };
    let bouncer = start_bouncer(&pg, &bin);
    let url = pg.url_via(bouncer.port, "sslmode=disable");
    let out = run(doctor(&["check", "--json", "--url", &url], &[]));
    let pooler = out.check("pooler");
    println!("{pooler:#}");
    assert_eq!(pooler["outcome"], "warn", "{}", out.stdout);
    assert_eq!(
        pooler["fix"],
        "transaction-mode pooler detected: set DB_POOLER=transaction"
    );
    assert_eq!(pooler["data"]["transaction_mode"], true);
    // Directly to the server: nothing in front.
    let out = run(doctor(
        &["check", "--json", "--url", &pg.url_with("sslmode=disable")],
        &[],
    ));
    assert_eq!(out.outcome("pooler"), "pass", "{}", out.stdout);
    assert_eq!(out.check("pooler")["data"]["transaction_mode"], false);
}
