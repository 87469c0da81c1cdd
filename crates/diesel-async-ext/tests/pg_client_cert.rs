//! Client-certificate authentication (`sslcert` / `sslkey`) against a real, private
//! PostgreSQL server whose pg_hba.conf lets role `app` in over TLS with a certificate of CN
//! `app` only ([`PgOptions::client_cert_auth`]), with each TLS stack: the certificate gets
//! in and the server sees it (`pg_stat_ssl.client_dn`); no certificate, one for another
//! name, or one from another CA is refused and the pool fails fast with the server's reason;
//! a key others may read is refused before any connect. Every connector and pool here names
//! its stack explicitly.
#![cfg(any(feature = "tls-openssl", feature = "rustls"))]

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use diesel::sql_types::{Bool, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{
    BuildError, ConnectError, PgConnectConfig, PgConnector, PgPool, TlsBackend,
};
use pool_core::config::ConnectSettings;
use pool_core::error::ConfigError;
use test_support::{ci_mode, ClientCert, PgOptions, PgServer};

const PASSWORD: &str = PgServer::PASSWORD;
/// The pool timeout of the pools that must fail fast: a hopeless refusal ends `build()` long
/// before it ([`FAST`]).
const POOL_TIMEOUT: Duration = Duration::from_secs(30);
/// What "fast" means here: a third of the pool timeout (a connect and a refusal take
/// milliseconds; the margin is for a loaded machine).
const FAST: Duration = Duration::from_secs(10);
/// The deadline of every single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(60);

/// A server that requires a client certificate for `app`, or `None` (skipped, reason printed)
/// outside CI.
fn server() -> Option<PgServer> {
    test_support::capture_logs();
    match PgServer::start_with(PgOptions::new().client_cert_auth(true)) {
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

/// `fut`, or a test failure naming `what` once [`DEADLINE`] has passed.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome within {DEADLINE:?}"))
}

/// `verify-full` against the server's CA (so the server is authenticated too), plus the
/// client certificate's files when there is one. The password is in the URL as well: it
/// must neither get `app` in nor show in any error.
fn url(pg: &PgServer, cert: Option<&ClientCert>) -> String {
    let mut params = format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.ca_cert_path().display()
    );
    if let Some(cert) = cert {
        params.push('&');
        params.push_str(&cert.url_params());
    }
    format!(
        "postgres://app:{PASSWORD}@localhost:{}/app?{params}",
        pg.port()
    )
}

fn connector(url: &str, backend: TlsBackend) -> Result<PgConnector, ConfigError> {
    let config =
        PgConnectConfig::from_url(url, &ConnectSettings::default())?.with_tls_backend(backend);
    assert_eq!(config.tls().backend, backend);
    PgConnector::new(config)
}

async fn connect(url: &str, backend: TlsBackend) -> Result<AsyncPgConnection, ConnectError> {
    let connector = connector(url, backend)?;
    within(&format!("{backend} connect"), connector.connect()).await
}

#[derive(QueryableByName)]
struct SslRow {
    #[diesel(sql_type = Bool)]
    ssl: bool,
    #[diesel(sql_type = Text)]
    client_dn: String,
    #[diesel(sql_type = Text)]
    user: String,
}

/// What the server knows of this connection: TLS or not, the client certificate's DN (empty
/// without one) and the role.
async fn seen_by_server(conn: &mut AsyncPgConnection) -> (bool, String, String) {
    let row = within(
        "pg_stat_ssl",
        diesel::sql_query(
            "SELECT ssl, coalesce(client_dn, '') AS client_dn, current_user::text AS user \
             FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .get_result::<SslRow>(conn),
    )
    .await
    .expect("pg_stat_ssl");
    (row.ssl, row.client_dn, row.user)
}

/// Asserts the server sees `conn` as TLS with the certificate of CN `app`.
async fn assert_authenticated_by_certificate(conn: &mut AsyncPgConnection, what: &str) {
    let (ssl, dn, user) = seen_by_server(conn).await;
    assert!(ssl, "{what}: not TLS");
    assert!(dn.contains("CN=app"), "{what}: client_dn {dn:?}");
    assert_eq!(user, "app", "{what}");
}

/// A pool of one connection on `backend` with [`POOL_TIMEOUT`].
async fn build_pool(url: &str, backend: TlsBackend) -> Result<PgPool, BuildError> {
    within(
        &format!("{backend} pool build"),
        PgPool::builder(url)
            .tls_backend(backend)
            .pool_size(1)
            .max_overflow(0)
            .pool_timeout(POOL_TIMEOUT)
            .build(),
    )
    .await
}

/// `build()` of a pool that must be refused: fails within [`FAST`], as a connect failure,
/// with no password and no key material in its text. Returns the text.
async fn refused_fast(url: &str, backend: TlsBackend, what: &str) -> String {
    let started = Instant::now();
    let err = build_pool(url, backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("{backend} {what}: the pool was built"));
    let took = started.elapsed();
    let text = err.to_string();
    eprintln!("{backend} {what} ({took:?}): {text}");
    assert!(
        took < FAST,
        "{backend} {what}: a refusal no retry can fix must fail build() at once, not after \
         {took:?} (pool_timeout {POOL_TIMEOUT:?})"
    );
    assert!(matches!(err, BuildError::Connect { .. }), "{err:?}");
    assert!(
        text.contains("no retry can fix"),
        "classed hopeless: {text}"
    );
    let shown = format!("{text} | {err:?}");
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
    assert!(
        !shown.contains("PRIVATE KEY"),
        "key material leaked: {shown}"
    );
    text
}

async fn the_certificate_gets_app_in(backend: TlsBackend) {
    let Some(pg) = server() else { return };
    let cert = pg.issue_client_cert("app").unwrap();
    let url = url(&pg, Some(&cert));

    let mut conn = connect(&url, backend)
        .await
        .unwrap_or_else(|e| panic!("{backend} with the client certificate: {e}"));
    assert_authenticated_by_certificate(&mut conn, &format!("{backend} connector")).await;

    let pool = build_pool(&url, backend)
        .await
        .unwrap_or_else(|e| panic!("{backend} pool with the client certificate: {e}"));
    let mut conn = within("checkout", pool.get())
        .await
        .expect("checkout from the pool");
    assert_authenticated_by_certificate(&mut conn, &format!("{backend} pool")).await;
}

async fn no_certificate_or_another_cn_is_refused_and_the_pool_fails_fast(backend: TlsBackend) {
    let Some(pg) = server() else { return };

    // No certificate: TLS and the password, and still refused, with the server's reason.
    let err = connect(&url(&pg, None), backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("{backend}: connected without a client certificate"));
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("connection requires a valid client certificate"),
        "{err}"
    );
    let text = refused_fast(&url(&pg, None), backend, "without a certificate").await;
    assert!(
        text.contains("connection requires a valid client certificate"),
        "{text}"
    );

    // A valid certificate from the same CA, for another name.
    let mallory = pg.issue_client_cert("mallory").unwrap();
    let err = connect(&url(&pg, Some(&mallory)), backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("{backend}: CN=mallory got in as app"));
    assert!(matches!(err, ConnectError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("certificate authentication failed for user \"app\""),
        "{err}"
    );
    let text = refused_fast(&url(&pg, Some(&mallory)), backend, "with CN=mallory").await;
    assert!(
        text.contains("certificate authentication failed for user \"app\""),
        "{text}"
    );
}

async fn a_certificate_from_another_ca_is_refused_at_the_handshake(backend: TlsBackend) {
    let Some(pg) = server() else { return };
    // CN=app, but signed by another server's CA: the server's TLS stack refuses it.
    let Some(other) = server() else { return };
    let foreign = other.issue_client_cert("app").unwrap();
    let url = url(&pg, Some(&foreign));
    // TLS 1.3: the server checks the client's certificate after the client finished its side
    // of the handshake, so the client may be writing its startup message when the server's
    // alert and close arrive, and see the close (EOF, reset) before the alert. Every attempt
    // fails; within a few, one reads the alert.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let err = connect(&url, backend)
            .await
            .err()
            .unwrap_or_else(|| panic!("{backend}: a certificate of another CA got in"));
        let shown = format!("{err} | {err:?}");
        assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
        let lower = err.to_string().to_lowercase();
        seen.push(err.to_string());
        if lower.contains("alert unknown ca") || lower.contains("alert: unknownca") {
            break;
        }
    }
    assert!(
        seen.iter().any(|e| {
            let lower = e.to_lowercase();
            lower.contains("alert unknown ca") || lower.contains("alert: unknownca")
        }),
        "the server's alert, in 5 attempts: {seen:?}"
    );
    let text = refused_fast(&url, backend, "with a certificate of another CA").await;
    assert!(text.to_lowercase().contains("unknown"), "{text}");
    assert!(
        text.contains("could not connect (tls)"),
        "a TLS refusal: {text}"
    );
}

async fn a_key_others_can_read_is_refused_before_connecting(backend: TlsBackend) {
    let Some(pg) = server() else { return };
    let cert = pg.issue_client_cert("app").unwrap();
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = url(&pg, Some(&cert));
    let key = cert.key.display().to_string();

    let err = connector(&url, backend)
        .err()
        .unwrap_or_else(|| panic!("{backend}: a 0644 key was accepted"));
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                setting: "sslkey",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains(&key), "names the file: {text}");
    assert!(text.contains("0644"), "names the mode: {text}");
    assert!(text.contains("chmod 600"), "names the fix: {text}");

    let started = Instant::now();
    let err = build_pool(&url, backend)
        .await
        .err()
        .unwrap_or_else(|| panic!("{backend}: a pool was built with a 0644 key"));
    assert!(matches!(err, BuildError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    assert!(started.elapsed() < FAST, "{:?}", started.elapsed());

    // The same file at 0600 gets in: the mode was the only thing wrong.
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut conn = connect(&url, backend)
        .await
        .unwrap_or_else(|e| panic!("{backend} with the key at 0600: {e}"));
    assert_authenticated_by_certificate(&mut conn, &format!("{backend} 0600")).await;
}

#[cfg(feature = "tls-openssl")]
mod openssl {
    use super::*;

    #[tokio::test]
    async fn the_client_certificate_gets_app_in_and_the_server_sees_it() {
        the_certificate_gets_app_in(TlsBackend::OpenSsl).await;
    }

    #[tokio::test]
    async fn no_certificate_or_another_cn_is_refused_and_build_fails_fast() {
        no_certificate_or_another_cn_is_refused_and_the_pool_fails_fast(TlsBackend::OpenSsl).await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_and_build_fails_fast() {
        a_certificate_from_another_ca_is_refused_at_the_handshake(TlsBackend::OpenSsl).await;
    }

    #[tokio::test]
    async fn a_client_key_readable_by_others_is_refused() {
        a_key_others_can_read_is_refused_before_connecting(TlsBackend::OpenSsl).await;
    }
}

#[cfg(feature = "rustls")]
mod rustls {
    use super::*;

    #[tokio::test]
    async fn the_client_certificate_gets_app_in_and_the_server_sees_it() {
        the_certificate_gets_app_in(TlsBackend::Rustls).await;
    }

    #[tokio::test]
    async fn no_certificate_or_another_cn_is_refused_and_build_fails_fast() {
        no_certificate_or_another_cn_is_refused_and_the_pool_fails_fast(TlsBackend::Rustls).await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_and_build_fails_fast() {
        a_certificate_from_another_ca_is_refused_at_the_handshake(TlsBackend::Rustls).await;
    }

    #[tokio::test]
    async fn a_client_key_readable_by_others_is_refused() {
        a_key_others_can_read_is_refused_before_connecting(TlsBackend::Rustls).await;
    }
}
