//! PgServer against a real private cluster: TLS + SCRAM logins, admin helpers, restarts,
//! pauses, and that nothing survives Drop.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use test_support::{pg_or_skip, process_alive, PgOptions, PgServer, TestSupportError};

fn connect(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap_or_else(|e| panic!("connect failed: {e}"))
}

fn one(conn: &mut PgConnection) -> QueryResult<i64> {
    diesel::select(diesel::dsl::sql::<BigInt>("1::bigint")).get_result(conn)
}

fn text(conn: &mut PgConnection, sql: &str) -> String {
    diesel::select(diesel::dsl::sql::<Text>(sql))
        .get_result(conn)
        .unwrap()
}

fn start_opts(opts: PgOptions) -> Option<PgServer> {
    match PgServer::start_with(opts) {
        Ok(s) => Some(s),
        Err(e) if test_support::ci_mode() => panic!("{e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn password_login_over_tls_require_verify_ca_and_verify_full() {
    let t = Instant::now();
    let Some(pg) = pg_or_skip() else { return };
    eprintln!("server start took {:?}", t.elapsed());

    assert_eq!(pg.host(), "127.0.0.1");
    assert!(pg.url().starts_with("postgres://app:"));
    assert!(pg.url().ends_with(&format!("@127.0.0.1:{}/app", pg.port())));
    assert_eq!(
        pg.url_with("sslmode=require"),
        format!("{}?sslmode=require", pg.url())
    );

    let mut conn = connect(&pg.url_with("sslmode=require"));
    assert_eq!(text(&mut conn, "current_user::text"), "app");
    assert_eq!(text(&mut conn, "current_database()::text"), "app");
    let ssl: bool = diesel::select(diesel::dsl::sql::<Bool>(
        "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    ))
    .get_result(&mut conn)
    .unwrap();
    assert!(ssl, "connection is not encrypted");
    // The password role authenticates with SCRAM (checked as the trusted superuser).
    let mut su = connect(&pg.superuser_url());
    assert_eq!(text(&mut su, "current_user::text"), "postgres");
    assert!(text(
        &mut su,
        "(SELECT rolpassword FROM pg_authid WHERE rolname = 'app')"
    )
    .starts_with("SCRAM-SHA-256$"));

    let ca = pg.ca_cert_path().display().to_string();
    let mut verified = connect(&pg.url_with(&format!("sslmode=verify-ca&sslrootcert={ca}")));
    one(&mut verified).unwrap();
    let mut full = connect(&pg.url_with(&format!("sslmode=verify-full&sslrootcert={ca}")));
    one(&mut full).unwrap();
    let localhost = format!(
        "postgres://app:{}@localhost:{}/app?sslmode=verify-full&sslrootcert={ca}",
        PgServer::PASSWORD,
        pg.port()
    );
    one(&mut connect(&localhost)).unwrap();

    // A CA the server's certificate was not signed by is refused.
    let Some(other) = pg_or_skip() else { return };
    let wrong_ca = other.ca_cert_path().display().to_string();
    let refused =
        PgConnection::establish(&pg.url_with(&format!("sslmode=verify-ca&sslrootcert={wrong_ca}")));
    assert!(refused.is_err(), "verify-ca accepted a foreign CA");

    // A wrong password is refused, and the error does not echo the real one.
    let bad = format!("postgres://app:wrong@127.0.0.1:{}/app", pg.port());
    let err = PgConnection::establish(&bad)
        .err()
        .expect("wrong password accepted");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    assert!(!err.to_string().contains(PgServer::PASSWORD));
}

#[test]
fn options_extra_conf_and_no_ssl() {
    let Some(pg) = start_opts(
        PgOptions::default()
            .ssl(false)
            .conf("idle_in_transaction_session_timeout = '7s'"),
    ) else {
        return;
    };
    assert_eq!(
        pg.server_setting("idle_in_transaction_session_timeout")
            .unwrap(),
        "7s"
    );
    assert_eq!(pg.server_setting("max_connections").unwrap(), "200");
    assert_eq!(pg.server_setting("fsync").unwrap(), "off");
    assert_eq!(pg.server_setting("ssl").unwrap(), "off");
    assert_eq!(pg.server_setting("listen_addresses").unwrap(), "127.0.0.1");
    let sock = pg.server_setting("unix_socket_directories").unwrap();
    assert_eq!(std::path::Path::new(&sock), pg.socket_dir());
    assert!(pg
        .socket_dir()
        .join(format!(".s.PGSQL.{}", pg.port()))
        .exists());
    assert!(PgConnection::establish(&pg.url_with("sslmode=require")).is_err());
    one(&mut connect(&pg.url_with("sslmode=disable"))).unwrap();
    let err = pg.server_setting("no_such_setting").unwrap_err();
    assert!(matches!(err, TestSupportError::Query { .. }), "{err}");
}

#[test]
fn terminate_count_and_wait_backends() {
    let Some(pg) = pg_or_skip() else { return };
    let url = pg.url_with("application_name=victim");
    let mut a = connect(&url);
    let mut b = connect(&url);
    let _bystander = connect(&pg.url_with("application_name=bystander"));
    assert_eq!(pg.count_backends("victim").unwrap(), 2);
    let pids = pg.backend_pids("victim").unwrap();
    assert_eq!(pids.len(), 2);
    assert!(pids.windows(2).all(|w| w[0] < w[1]));

    assert_eq!(pg.terminate_backends("victim").unwrap(), 2);
    pg.wait_backends_gone("victim", Duration::from_secs(5))
        .unwrap();
    assert_eq!(pg.count_backends("victim").unwrap(), 0);
    assert_eq!(pg.count_backends("bystander").unwrap(), 1);
    let err = one(&mut a).unwrap_err();
    assert!(
        err.to_string().contains("terminating connection") || err.to_string().contains("closed"),
        "{err}"
    );
    assert!(one(&mut b).is_err());
    assert_eq!(pg.terminate_backends("victim").unwrap(), 0);

    // wait_backends_gone times out while one stays.
    let err = pg
        .wait_backends_gone("bystander", Duration::from_millis(50))
        .unwrap_err();
    assert!(matches!(err, TestSupportError::Timeout { .. }), "{err}");
}

#[test]
fn idle_session_timeout_and_execute() {
    let Some(pg) = pg_or_skip() else { return };
    pg.set_idle_session_timeout("app", Duration::from_millis(200))
        .unwrap();
    let mut conn = connect(&pg.url());
    assert_eq!(
        text(&mut conn, "current_setting('idle_session_timeout')"),
        "200ms"
    );
    std::thread::sleep(Duration::from_millis(500));
    let err = one(&mut conn).unwrap_err();
    assert!(err.to_string().contains("idle-session timeout"), "{err}");

    pg.execute("ALTER ROLE app RESET idle_session_timeout; CREATE TABLE t (id int)")
        .unwrap();
    let mut conn = connect(&pg.url());
    assert_eq!(
        text(&mut conn, "current_setting('idle_session_timeout')"),
        "0"
    );
    let err = pg.execute("SELEC 1").unwrap_err();
    assert!(err.to_string().contains("SELEC 1"), "{err}");
}

#[test]
fn restart_fast_keeps_port_and_kills_held_connections() {
    let Some(pg) = pg_or_skip() else { return };
    let port = pg.port();
    let pm_before = pg.postmaster_pid().unwrap();
    let mut held = connect(&pg.url_with("sslmode=require"));
    one(&mut held).unwrap();
    let t = Instant::now();
    pg.restart_fast().unwrap();
    eprintln!("restart_fast took {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert!(
        one(&mut held).is_err(),
        "held connection survived a restart"
    );
    one(&mut connect(&pg.url())).unwrap();
    let pm_after = pg.postmaster_pid().unwrap();
    assert_ne!(pm_before, pm_after);
    assert!(!process_alive(pm_before));
}

#[test]
fn stop_refuses_connections_until_start_again() {
    let Some(pg) = pg_or_skip() else { return };
    pg.stop().unwrap();
    assert!(pg.postmaster_pid().is_none());
    let err = PgConnection::establish(&pg.url())
        .err()
        .expect("server still up");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(pg.count_backends("x").is_err());
    pg.start_again().unwrap();
    one(&mut connect(&pg.url())).unwrap();
}

fn process_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

#[test]
fn pause_backends_hangs_queries_until_resumed() {
    let Some(pg) = pg_or_skip() else { return };
    let mut conn = connect(&pg.url_with("application_name=sleepy"));
    one(&mut conn).unwrap();
    let pause = pg.pause_backends("sleepy").unwrap();
    assert_eq!(pause.pids().len(), 1);
    assert_eq!(process_state(pause.pids()[0]), 'T');

    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let result = one(&mut conn);
        tx.send(result.is_ok()).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "query completed against a stopped backend"
    );
    pause.resume();
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    worker.join().unwrap();

    // No backend: a clear error instead of an empty guard.
    let err = pg.pause_backends("nobody").unwrap_err();
    assert!(matches!(err, TestSupportError::NoBackends(_)), "{err}");
}

#[test]
fn pause_backends_of_stops_every_named_applications_backends_and_only_those() {
    let Some(pg) = pg_or_skip() else { return };
    let mut a = connect(&pg.url_with("application_name=sleepy_a"));
    let mut b = connect(&pg.url_with("application_name=sleepy_b"));
    let mut other = connect(&pg.url_with("application_name=awake"));
    for conn in [&mut a, &mut b, &mut other] {
        one(conn).unwrap();
    }
    let expected: Vec<i32> = {
        let mut pids = pg.backend_pids("sleepy_a").unwrap();
        pids.extend(pg.backend_pids("sleepy_b").unwrap());
        pids.sort_unstable();
        pids
    };
    let pause = pg
        .pause_backends_of(&["sleepy_a", "sleepy_b", "nobody"])
        .unwrap();
    assert_eq!(pause.pids(), expected.as_slice());
    for pid in pause.pids() {
        assert_eq!(process_state(*pid), 'T');
    }
    let awake = pg.backend_pids("awake").unwrap()[0];
    assert_ne!(process_state(awake), 'T');
    one(&mut other).unwrap();
    pause.resume();
    one(&mut a).unwrap();
    one(&mut b).unwrap();
    let err = pg.pause_backends_of(&["nobody", "none"]).unwrap_err();
    assert!(err.to_string().contains("nobody, none"), "{err}");
}

#[test]
fn pause_guard_continues_backends_when_a_test_panics() {
    let Some(pg) = pg_or_skip() else { return };
    let _conn = connect(&pg.url_with("application_name=panicky"));
    let pid = pg.backend_pids("panicky").unwrap()[0];
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _pause = pg.pause_backends("panicky").unwrap();
        assert_eq!(process_state(pid), 'T');
        panic!("test failed while the backend was stopped");
    }));
    assert!(result.is_err());
    assert_ne!(process_state(pid), 'T');
    assert_eq!(pg.count_backends("panicky").unwrap(), 1);
}

#[test]
fn drop_leaves_no_process_and_no_files() {
    let Some(pg) = pg_or_skip() else { return };
    let _c = connect(&pg.url_with("application_name=leftover"));
    let paused_conn = connect(&pg.url_with("application_name=frozen"));
    let pause = pg.pause_backends("frozen").unwrap();
    let postmaster = pg.postmaster_pid().unwrap();
    let mut pids = pg.backend_pids("leftover").unwrap();
    pids.extend(pause.pids());
    let data = pg.data_dir().to_path_buf();
    assert!(process_alive(postmaster));
    // The pause guard outlives the server: the server must still continue and stop it.
    let t = Instant::now();
    drop(pg);
    eprintln!("drop took {:?}", t.elapsed());
    assert!(
        !process_alive(postmaster),
        "postmaster {postmaster} survived Drop"
    );
    for pid in pids {
        assert!(!process_alive(pid), "backend {pid} survived Drop");
    }
    assert!(!data.exists(), "{} still exists", data.display());
    drop(pause);
    drop(paused_conn);
}

#[test]
fn parallel_servers_get_distinct_ports() {
    let t = Instant::now();
    let servers: Vec<Option<PgServer>> = (0..3)
        .map(|_| std::thread::spawn(pg_or_skip))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    eprintln!("3 parallel starts took {:?}", t.elapsed());
    let servers: Vec<PgServer> = servers.into_iter().flatten().collect();
    let mut ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        let mut conn = connect(&s.url());
        conn.batch_execute("CREATE TABLE mine (x int)").unwrap();
    }
}

#[test]
fn client_cert_auth_lets_app_in_with_its_certificate_only_and_leaves_others_alone() {
    let Some(pg) = start_opts(PgOptions::new().client_cert_auth(true)) else {
        return;
    };
    let ca = pg.ca_cert_path().display().to_string();
    let app = pg.issue_client_cert("app").unwrap();
    // The key is the client's: mode 0600, owned by this process's user.
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&app.key).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    }
    let url = |params: &str| pg.url_with(&format!("sslmode=verify-full&sslrootcert={ca}{params}"));

    let mut conn = connect(&url(&format!("&{}", app.url_params())));
    assert_eq!(text(&mut conn, "current_user::text"), "app");
    let dn = text(
        &mut conn,
        "(SELECT coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    );
    assert!(dn.contains("CN=app"), "client_dn {dn:?}");

    // The password alone no longer gets `app` in: over TLS without a certificate, in clear,
    // or with a certificate for another name.
    let refused = |url: String, what: &str| {
        let err = PgConnection::establish(&url)
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"))
            .to_string();
        assert!(!err.contains(PgServer::PASSWORD), "{what}: {err}");
        err
    };
    let err = refused(url(""), "no certificate");
    assert!(
        err.contains("connection requires a valid client certificate"),
        "{err}"
    );
    let err = refused(pg.url_with("sslmode=disable"), "in clear");
    assert!(err.contains("pg_hba.conf rejects connection"), "{err}");
    let mallory = pg.issue_client_cert("mallory").unwrap();
    let err = refused(url(&format!("&{}", mallory.url_params())), "CN=mallory");
    assert!(
        err.contains("certificate authentication failed for user \"app\""),
        "{err}"
    );

    // The harness still manages the server through the superuser.
    pg.execute("SELECT 1").unwrap();
    assert_eq!(pg.server_setting("ssl_ca_file").unwrap(), "client_ca.crt");

    // Only this server: a default one in the same process (same template) keeps SCRAM.
    let Some(other) = pg_or_skip() else { return };
    let mut conn = connect(&other.url_with("sslmode=disable"));
    assert_eq!(one(&mut conn).unwrap(), 1);
}
