//! Connecting to real, private PostgreSQL servers with libpq's meanings: TLS modes checked
//! through `pg_stat_ssl` of the test's own backend, the connect bound against a server that
//! never answers, the user's libpq URL as is, and plain diesel-async as a control.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use diesel::sql_types::{Bool, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{establish, ConnectError, PgConnector};
use pool_core::config::ConnectSettings;
use test_support::{ci_mode, PgOptions, PgServer, SilentServer};

const PASSWORD: &str = PgServer::PASSWORD;

/// `pg_or_skip` for a server with options.
fn pg_with(opts: PgOptions) -> Option<PgServer> {
    match PgServer::start_with(opts) {
        Ok(server) => Some(server),
        Err(err) if ci_mode() => panic!(
            "could not start a private PostgreSQL server, and CI=true makes that a failure: {err}"
        ),
        Err(err) => {
            eprintln!("skipping: could not start a private PostgreSQL server: {err}");
            None
        }
    }
}

fn settings() -> ConnectSettings {
    ConnectSettings::default()
}

/// The role `app` over TCP to `host` (which may differ from the address the server has).
fn url_for(pg: &PgServer, host: &str, params: &str) -> String {
    format!(
        "postgres://app:{PASSWORD}@{host}:{}/app?{params}",
        pg.port()
    )
}

fn ca(pg: &PgServer) -> String {
    pg.ca_cert_path().display().to_string()
}

#[derive(QueryableByName)]
struct SslRow {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    value: String,
}

/// `pg_stat_ssl.ssl` of this connection's own backend.
async fn uses_tls(conn: &mut AsyncPgConnection) -> bool {
    diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result::<SslRow>(conn)
        .await
        .expect("pg_stat_ssl")
        .ssl
}

async fn show(conn: &mut AsyncPgConnection, name: &str) -> String {
    diesel::sql_query("SELECT current_setting($1) AS value")
        .bind::<Text, _>(name)
        .get_result::<Setting>(conn)
        .await
        .expect("current_setting")
        .value
}

async fn connect(url: &str) -> Result<AsyncPgConnection, ConnectError> {
    establish(url, &settings()).await
}

/// Fails the test if the password shows in the error's `Display` or `Debug`.
fn assert_no_password(err: &ConnectError) {
    let shown = format!("{err} | {err:?}");
    eprintln!("error: {err}");
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
}

#[tokio::test]
async fn verify_full_with_the_private_ca_connects_over_tls() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = url_for(
            &pg,
            host,
            &format!("sslmode=verify-full&sslrootcert={}", ca(&pg)),
        );
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(uses_tls(&mut conn).await, "{host}");
    }
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_verify_full_and_passes_verify_ca() {
    let Some(pg) = pg_with(PgOptions::new().cert_names(&["db.example.invalid"])) else {
        return;
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = url_for(
            &pg,
            host,
            &format!("sslmode=verify-full&sslrootcert={}", ca(&pg)),
        );
        let err = connect(&url).await.err().expect("verify-full must fail");
        assert_no_password(&err);
        let ConnectError::Tls { message, .. } = &err else {
            panic!("{host}: expected a TLS error, got {err:?}");
        };
        assert!(message.contains("mismatch"), "{host}: {err}");
        assert!(message.contains("certificate verify failed"), "{err}");

        let url = url_for(
            &pg,
            host,
            &format!("sslmode=verify-ca&sslrootcert={}", ca(&pg)),
        );
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(uses_tls(&mut conn).await);
    }
    // require with a root file verifies the chain (as libpq), not the name.
    let url = url_for(
        &pg,
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={}", ca(&pg)),
    );
    let mut conn = connect(&url).await.expect("require + sslrootcert");
    assert!(uses_tls(&mut conn).await);
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_fails_verification_with_a_reason() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let Some(other) = test_support::pg_or_skip() else {
        return;
    };
    // The other server's CA did not sign this server's certificate.
    let url = url_for(
        &pg,
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", ca(&other)),
    );
    let err = connect(&url).await.err().expect("wrong CA must fail");
    assert_no_password(&err);
    assert!(
        matches!(&err, ConnectError::Tls { message, .. } if message.contains("certificate verify failed")),
        "{err}"
    );
    // require without a root file does not verify: it connects, encrypted.
    let mut conn = connect(&url_for(&pg, "localhost", "sslmode=require"))
        .await
        .expect("require");
    assert!(uses_tls(&mut conn).await);
}

#[tokio::test]
async fn require_prefer_allow_use_tls_without_a_root_cert_and_disable_does_not() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    for (mode, tls) in [
        ("require", true),
        ("prefer", true),
        ("allow", true),
        ("disable", false),
    ] {
        let url = pg.url_with(&format!("sslmode={mode}"));
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(uses_tls(&mut conn).await, tls, "sslmode={mode}");
    }
    // libpq's default is prefer.
    let mut conn = connect(&pg.url()).await.expect("default sslmode");
    assert!(uses_tls(&mut conn).await);
    // As libpq, TLS is never asked for over a Unix socket, whatever the sslmode.
    let url = format!(
        "postgres://app:{PASSWORD}@/app?host={}&port={}&sslmode=require",
        pg.socket_dir().display(),
        pg.port()
    );
    let mut conn = connect(&url).await.expect("require over a Unix socket");
    assert!(!uses_tls(&mut conn).await);
}

#[tokio::test]
async fn prefer_falls_back_to_plain_and_require_fails_when_the_server_has_no_tls() {
    let Some(pg) = pg_with(PgOptions::new().ssl(false)) else {
        return;
    };
    let mut conn = connect(&pg.url_with("sslmode=prefer"))
        .await
        .expect("prefer");
    assert!(!uses_tls(&mut conn).await);
    let err = connect(&pg.url_with("sslmode=require"))
        .await
        .err()
        .expect("require must fail without TLS");
    assert!(
        matches!(&err, ConnectError::Tls { message, .. } if message.contains("does not support TLS")),
        "{err}"
    );
}

#[tokio::test]
async fn verify_full_with_only_hostaddr_is_refused_and_with_a_host_name_verifies_it() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let base = format!(
        "postgres://app:{PASSWORD}@/app?port={}&sslmode=verify-full&sslrootcert={}\
         &application_name=hostaddr-only",
        pg.port(),
        ca(&pg)
    );
    let err = connect(&format!("{base}&hostaddr=127.0.0.1"))
        .await
        .err()
        .expect("verify-full without a host name must fail");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("hostaddr"), "{err}");
    assert_eq!(pg.count_backends("hostaddr-only").unwrap(), 0);

    // With a name: connects to the address, verifies the name.
    let mut conn = connect(&format!("{base}&host=localhost&hostaddr=127.0.0.1"))
        .await
        .expect("host=localhost&hostaddr=127.0.0.1");
    assert!(uses_tls(&mut conn).await);
    // A name the certificate does not carry is checked too, not skipped.
    let err = connect(&format!(
        "{base}&host=db.example.invalid&hostaddr=127.0.0.1"
    ))
    .await
    .err()
    .expect("the name must be verified");
    assert!(
        matches!(&err, ConnectError::Tls { message, .. } if message.contains("mismatch")),
        "{err}"
    );
    // Weaker modes need no name: the address stands in.
    let url = format!(
        "postgres://app:{PASSWORD}@/app?port={}&hostaddr=127.0.0.1&sslmode=verify-ca\
         &sslrootcert={}",
        pg.port(),
        ca(&pg)
    );
    let mut conn = connect(&url).await.expect("verify-ca with hostaddr only");
    assert!(uses_tls(&mut conn).await);
}

#[tokio::test]
async fn a_server_that_never_answers_gives_a_timeout_within_the_connect_bound() {
    let silent = SilentServer::start().expect("silent server");
    let mut s = settings();
    s.connect_timeout = Some(Duration::from_millis(300));
    for mode in ["prefer", "disable", "verify-full"] {
        let url = format!(
            "postgres://app:{PASSWORD}@127.0.0.1:{}/app?sslmode={mode}",
            silent.port()
        );
        let err = establish(&url, &s)
            .await
            .err()
            .expect("a silent server must time out");
        assert_no_password(&err);
        assert!(
            matches!(err, ConnectError::Timeout { timeout, .. } if timeout == Duration::from_millis(300)),
            "sslmode={mode}: {err:?}"
        );
    }
    // The URL's connect_timeout (libpq seconds) wins over the settings.
    let url = format!(
        "postgres://app@127.0.0.1:{}/app?connect_timeout=2",
        silent.port()
    );
    let err = establish(&url, &s).await.err().expect("timeout");
    assert!(
        matches!(err, ConnectError::Timeout { timeout, .. } if timeout == Duration::from_secs(2)),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_users_libpq_url_works_unchanged() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let url = pg.url_with(&format!(
        "sslmode=verify-full&sslrootcert={}&keepalives_count=3&tcp_user_timeout=3000\
         &application_name=x",
        ca(&pg)
    ));
    let connector = PgConnector::from_url(&url, &settings()).expect("translate");
    // Client side, in the driver's units: 3000 ms, not 3000 s; keepalives_count -> retries.
    let driver = connector.config().driver_config();
    assert_eq!(
        driver.get_tcp_user_timeout(),
        Some(&Duration::from_millis(3000))
    );
    assert_eq!(driver.get_keepalives_retries(), Some(3));
    let mut conn = connector.connect().await.expect("connect");
    assert!(uses_tls(&mut conn).await);
    assert_eq!(show(&mut conn, "application_name").await, "x");
    // tcp_user_timeout is a client socket option, as in libpq: it is not sent to the server,
    // whose GUC of the same name (its own socket) keeps its default.
    assert_eq!(show(&mut conn, "tcp_user_timeout").await, "0");
}

#[tokio::test]
async fn control_plain_diesel_async_cannot_verify_and_does_not_encrypt() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    // CONTROL: plain `AsyncPgConnection::establish` hands the URL to tokio-postgres with NoTls.
    let verify_full = pg.url_with(&format!("sslmode=verify-full&sslrootcert={}", ca(&pg)));
    let plain = AsyncPgConnection::establish(&verify_full).await;
    let err = plain
        .err()
        .expect("tokio-postgres rejects libpq's verify-full URL");
    assert!(!format!("{err} {err:?}").contains(PASSWORD));
    // CONTROL: with `require` it cannot do TLS at all (NoTls) and fails against a TLS server.
    let plain = AsyncPgConnection::establish(&pg.url_with("sslmode=require")).await;
    let err = plain.err().expect("NoTls cannot satisfy require");
    assert!(err.to_string().contains("TLS"), "{err}");
    // CONTROL: libpq's default (prefer) silently connects in clear.
    let mut conn = AsyncPgConnection::establish(&pg.url())
        .await
        .expect("plain establish");
    assert!(
        !uses_tls(&mut conn).await,
        "plain diesel-async never encrypts"
    );

    // Ours, same URLs: verified TLS, TLS, TLS.
    let mut conn = connect(&verify_full).await.expect("ours: verify-full");
    assert!(uses_tls(&mut conn).await);
    let mut conn = connect(&pg.url_with("sslmode=require"))
        .await
        .expect("ours: require");
    assert!(uses_tls(&mut conn).await);
    let mut conn = connect(&pg.url()).await.expect("ours: default");
    assert!(uses_tls(&mut conn).await);
}

#[tokio::test]
async fn errors_name_the_cause_and_never_show_the_password() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    // Wrong user, same password: the server rejects the credentials.
    let url = format!(
        "postgres://nobody:{PASSWORD}@127.0.0.1:{}/app?sslmode=require",
        pg.port()
    );
    let err = connect(&url).await.err().expect("auth");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    // Password in a parameter, wrong one: also Auth, also masked.
    let url = format!(
        "postgres://app@127.0.0.1:{}/app?password={PASSWORD}x&sslmode=disable",
        pg.port()
    );
    let err = connect(&url).await.err().expect("auth");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    // No password at all: the server asks for one.
    let url = format!("postgres://app@127.0.0.1:{}/app", pg.port());
    let err = connect(&url).await.err().expect("no password");
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    // No such database.
    let err = connect(&url_for(&pg, "127.0.0.1", "").replace("/app?", "/nope?"))
        .await
        .err()
        .expect("no database");
    assert_no_password(&err);
    assert!(
        matches!(&err, ConnectError::Server { code: Some(code), .. } if code == "3D000"),
        "{err:?}"
    );
    // Nothing listening.
    let closed = test_support::free_port();
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{closed}/app");
    let err = connect(&url).await.err().expect("refused");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    // A name that does not resolve.
    let url = format!("postgres://app:{PASSWORD}@no-such-host.invalid:5432/app");
    let err = connect(&url).await.err().expect("dns");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Dns { .. }), "{err:?}");
    // A parameter that is not libpq's.
    let err = connect(&pg.url_with("keepalives_retries=3"))
        .await
        .err()
        .expect("unknown key");
    assert_no_password(&err);
    assert!(err.to_string().contains("keepalives_retries"), "{err}");
}

#[tokio::test]
async fn one_connector_serves_many_connections_and_tries_hosts_in_order() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let closed = test_support::free_port();
    // First host refuses, the second is the server: libpq's multi-host URL.
    let url = format!(
        "postgres://app:{PASSWORD}@127.0.0.1:{closed},localhost:{}/app?sslmode=verify-full\
         &sslrootcert={}&application_name=shared",
        pg.port(),
        ca(&pg)
    );
    let connector = Arc::new(PgConnector::from_url(&url, &settings()).expect("translate"));
    let (a, b) = tokio::join!(connector.connect(), connector.connect());
    let (mut a, mut b) = (a.expect("first"), b.expect("second"));
    assert!(uses_tls(&mut a).await && uses_tls(&mut b).await);
    assert_eq!(pg.count_backends("shared").unwrap(), 2);
}

/// Each host that fails is logged with "trying the next host" before the next is tried, all
/// but the last: its error is the one returned.
#[tokio::test]
async fn every_failed_host_but_the_last_is_logged_before_the_next_is_tried() {
    test_support::capture_logs();
    let (first, second) = (test_support::free_port(), test_support::free_port());
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{first},127.0.0.1:{second}/app");
    let err = connect(&url).await.err().expect("both refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!(":{second}")), "{err}");
    let logged = |port: u16| {
        test_support::captured_logs()
            .iter()
            .filter(|l| l.contains("trying the next host") && l.contains(&format!(":{port} ")))
            .count()
    };
    assert_eq!(logged(first), 1, "{:?}", test_support::captured_logs());
    assert_eq!(logged(second), 0, "{:?}", test_support::captured_logs());
}

/// What the server's authentication says is an authentication error, named as such: no
/// password where the server asks for one, channel binding required where none can be used.
#[tokio::test]
async fn authentication_failures_are_named_as_such() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let port = pg.port();
    let err = connect(&format!(
        "postgres://app@127.0.0.1:{port}/app?sslmode=disable"
    ))
    .await
    .err()
    .expect("no password");
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("the server asks for a password and none is given"),
        "{err}"
    );
    let err = connect(&format!(
        "postgres://app:{PASSWORD}@127.0.0.1:{port}/app?sslmode=disable&channel_binding=require"
    ))
    .await
    .err()
    .expect("channel binding without TLS");
    assert_no_password(&err);
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
}

/// An error names the place connected to as typed, with the address tried when the host is
/// a name.
#[tokio::test]
async fn an_error_names_the_host_as_typed_and_the_address_of_a_name() {
    let closed = test_support::free_port();
    let err = connect(&format!("postgres://app@localhost:{closed}/app"))
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains(&format!("localhost:{closed} (127.0.0.1)")),
        "{err}"
    );
    let err = connect(&format!("postgres://app@127.0.0.1:{closed}/app"))
        .await
        .err()
        .expect("refused");
    let shown = err.to_string();
    assert!(shown.contains(&format!("127.0.0.1:{closed}")), "{shown}");
    assert!(!shown.contains("(127.0.0.1)"), "{shown}");
}

/// One `verify-full` connect to `url` on its own current-thread runtime, through each TLS
/// stack built in: whether it is encrypted, or the error.
fn verify_full_on_each_stack(url: String) -> Vec<(&'static str, Result<bool, String>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    #[cfg_attr(not(feature = "rustls"), allow(unused_mut))]
    let mut stacks: Vec<(&'static str, diesel_async_ext::TlsBackend)> =
        vec![("openssl", diesel_async_ext::TlsBackend::OpenSsl)];
    #[cfg(feature = "rustls")]
    stacks.push(("rustls", diesel_async_ext::TlsBackend::Rustls));
    stacks
        .into_iter()
        .map(|(name, backend)| {
            let result = runtime.block_on(async {
                let config = diesel_async_ext::PgConnectConfig::from_url(&url, &settings())
                    .map_err(|e| e.to_string())?
                    .with_tls_backend(backend);
                let connector = PgConnector::new(config).map_err(|e| e.to_string())?;
                let mut conn = connector.connect().await.map_err(|e| e.to_string())?;
                Ok(uses_tls(&mut conn).await)
            });
            (name, result)
        })
        .collect()
}

/// `verify-full` without `sslrootcert` trusts the distribution's CA bundle, as libpq's
/// `sslrootcert=system` does: a managed server whose certificate a public CA signed verifies
/// with no file to ship. For one thread, in a private mount namespace, `/etc/ssl` holds only a
/// bundle with the test server's private CA, at the last place the connectors look
/// (`/etc/ssl/cert.pem`), so that neither OpenSSL's defaults nor `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` (set on some machines, and pointing into `/etc/ssl/certs`) find it: only the
/// connectors' own list does. The machine's trust store is never touched; outside the
/// namespace the same connect fails for want of the issuer.
#[test]
fn verify_full_without_a_root_file_trusts_the_distributions_ca_bundle() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    use diesel_async_ext::tls::SYSTEM_BUNDLES;
    // The last place looked at, in a directory a tmpfs can cover.
    let last = std::path::Path::new(SYSTEM_BUNDLES[SYSTEM_BUNDLES.len() - 1]);
    let (Some(dir), Some(name)) = (last.parent(), last.file_name().and_then(|n| n.to_str())) else {
        panic!("{last:?} names no file in a directory");
    };
    let elsewhere: Vec<&str> = SYSTEM_BUNDLES
        .iter()
        .copied()
        .filter(|b| !std::path::Path::new(b).starts_with(dir) && std::path::Path::new(b).exists())
        .collect();
    if !elsewhere.is_empty() {
        eprintln!(
            "skipping: this machine's bundles outside {dir:?} would be found first: {elsewhere:?}"
        );
        return;
    }
    let ca = std::fs::read(pg.ca_cert_path()).expect("the server's CA");
    let url = url_for(&pg, "localhost", "sslmode=verify-full");
    let inside = {
        let url = url.clone();
        let files: [(&str, &[u8]); 1] = [(name, &ca)];
        match test_support::with_dir_replaced(dir, &files, move || verify_full_on_each_stack(url)) {
            Ok(results) => results,
            Err(e) if !ci_mode() => {
                eprintln!("skipping: no private mount namespace: {e}");
                return;
            }
            Err(e) => panic!("a private mount namespace, needed under CI=true: {e}"),
        }
    };
    for (stack, result) in inside {
        assert_eq!(
            result,
            Ok(true),
            "{stack}: verify-full did not trust the CA in the distribution's bundle"
        );
    }
    for (stack, result) in verify_full_on_each_stack(url) {
        let err = result.expect_err("verify-full trusted a private CA that no bundle holds");
        assert!(err.contains("certificate verify failed"), "{stack}: {err}");
        assert!(!err.contains(PASSWORD), "{stack}: {err}");
    }
}

/// A connection that breaks after authentication, while diesel-async sets up its session
/// (`SET TIME ZONE 'UTC'`, here cut before it reaches the server), is a network failure
/// (transient: the next connect may pass), not the server's refusal.
#[tokio::test]
async fn a_connection_lost_during_the_session_setup_is_a_network_failure() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let proxy = test_support::FaultProxy::start(pg.addr()).expect("proxy");
    proxy.sever_before_forwarding(b"SET TIME ZONE");
    let url = pg.url_via(proxy.port(), "sslmode=disable");
    let err = tokio::time::timeout(Duration::from_secs(20), connect(&url))
        .await
        .expect("the connect did not end within 20 s")
        .err()
        .expect("the setup was cut: the connect must fail");
    assert_no_password(&err);
    assert!(!proxy.trigger_armed(), "the cut never happened: {err}");
    assert!(
        matches!(err, ConnectError::Network { .. }),
        "not a network failure: {err:?}"
    );
    assert!(err.to_string().contains("session setup failed"), "{err}");
}
