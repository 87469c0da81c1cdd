//! The rustls TLS stack against real, private PostgreSQL servers with TLS: libpq's `sslmode`
//! meanings as with OpenSSL (`pg_connect.rs`), checked through `pg_stat_ssl` of the test's
//! own backend. Every connector here asks for rustls explicitly, so these tests mean the same
//! whether OpenSSL is compiled too (`cargo test --workspace`) or not
//! (`--no-default-features --features postgres-rustls`).
#![cfg(feature = "rustls")]

use diesel::sql_types::{Bool, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_async_ext::{ConnectError, PgConnectConfig, PgConnector, PgPool, TlsBackend};
use pool_core::config::ConnectSettings;
use pool_core::error::ConfigError;
use test_support::{ci_mode, PgOptions, PgServer};

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

/// A connector for `url` on rustls.
fn rustls(url: &str) -> Result<PgConnector, ConfigError> {
    let config = PgConnectConfig::from_url(url, &ConnectSettings::default())?
        .with_tls_backend(TlsBackend::Rustls);
    assert_eq!(config.tls().backend, TlsBackend::Rustls);
    PgConnector::new(config)
}

async fn connect(url: &str) -> Result<AsyncPgConnection, ConnectError> {
    rustls(url)?.connect().await
}

#[derive(QueryableByName)]
struct SslRow {
    #[diesel(sql_type = Bool)]
    ssl: bool,
    #[diesel(sql_type = Text)]
    version: String,
}

/// `pg_stat_ssl` of this connection's own backend: whether it is TLS, and which version.
async fn tls_of(conn: &mut AsyncPgConnection) -> (bool, String) {
    let row = diesel::sql_query(
        "SELECT ssl, coalesce(version, '') AS version FROM pg_stat_ssl \
         WHERE pid = pg_backend_pid()",
    )
    .get_result::<SslRow>(conn)
    .await
    .expect("pg_stat_ssl");
    (row.ssl, row.version)
}

/// The TLS error of a connect that must fail; fails the test if the password shows.
fn tls_error(result: Result<AsyncPgConnection, ConnectError>, what: &str) -> String {
    let err = result.err().unwrap_or_else(|| panic!("{what} must fail"));
    let shown = format!("{err} | {err:?}");
    eprintln!("{what}: {err}");
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
    match err {
        ConnectError::Tls { message, .. } => message,
        other => panic!("{what}: expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_a_root_cert_and_disable_does_not() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    for (mode, tls) in [
        ("require", true),
        ("prefer", true),
        ("allow", true),
        ("disable", false),
    ] {
        let mut conn = connect(&url_for(&pg, "localhost", &format!("sslmode={mode}")))
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        let (ssl, version) = tls_of(&mut conn).await;
        assert_eq!(ssl, tls, "sslmode={mode}");
        if tls {
            assert!(version == "TLSv1.3" || version == "TLSv1.2", "{version}");
        }
    }
    // The protocol bounds reach rustls.
    let mut conn = connect(&url_for(
        &pg,
        "localhost",
        "sslmode=require&ssl_max_protocol_version=TLSv1.2",
    ))
    .await
    .expect("TLS 1.2 only");
    assert_eq!(tls_of(&mut conn).await, (true, "TLSv1.2".to_owned()));
}

#[tokio::test]
async fn verify_full_with_the_private_ca_connects_over_tls_with_channel_binding() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    for host in ["localhost", "127.0.0.1"] {
        // channel_binding=require: SCRAM-SHA-256-PLUS over rustls's tls-server-end-point.
        let url = url_for(
            &pg,
            host,
            &format!(
                "sslmode=verify-full&sslrootcert={}&channel_binding=require",
                ca(&pg)
            ),
        );
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(tls_of(&mut conn).await.0, "{host}");
    }
}

#[tokio::test]
async fn a_wrong_ca_fails_verify_full_and_verify_ca_with_the_cause_and_require_still_encrypts() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let Some(other) = test_support::pg_or_skip() else {
        return;
    };
    // The other server's CA did not sign this server's certificate. Both CAs have the same
    // name: the chain is built up to the wrong root, whose key the signature does not match.
    for mode in ["verify-full", "verify-ca"] {
        let url = url_for(
            &pg,
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", ca(&other)),
        );
        let message = tls_error(connect(&url).await, mode);
        assert!(message.contains("certificate verify failed"), "{message}");
        assert!(
            message.contains("certificate signature failure")
                || message.contains("unable to get local issuer certificate"),
            "{message}"
        );
        assert!(message.contains("rustls"), "{message}");
        assert!(
            message.contains("not signed by a root in sslrootcert"),
            "the hint: {message}"
        );
    }
    // require without a root file does not verify: it connects, encrypted.
    let mut conn = connect(&url_for(&pg, "localhost", "sslmode=require"))
        .await
        .expect("require");
    assert!(tls_of(&mut conn).await.0);
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_verify_full_and_passes_verify_ca() {
    let Some(pg) = pg_with(PgOptions::new().cert_names(&["db.example.invalid"])) else {
        return;
    };
    for (host, mismatch) in [
        ("localhost", "hostname mismatch"),
        ("127.0.0.1", "IP address mismatch"),
    ] {
        let url = url_for(
            &pg,
            host,
            &format!("sslmode=verify-full&sslrootcert={}", ca(&pg)),
        );
        let message = tls_error(connect(&url).await, host);
        assert!(message.contains("certificate verify failed"), "{message}");
        assert!(message.contains(mismatch), "{host}: {message}");
        assert!(
            message.contains("does not name the host"),
            "hint: {message}"
        );

        let url = url_for(
            &pg,
            host,
            &format!("sslmode=verify-ca&sslrootcert={}", ca(&pg)),
        );
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("verify-ca {host}: {e}"));
        assert!(tls_of(&mut conn).await.0);
    }
    // require with a root file verifies the chain (as libpq), not the name.
    let url = url_for(
        &pg,
        "localhost",
        &format!("sslmode=require&sslrootcert={}", ca(&pg)),
    );
    let mut conn = connect(&url).await.expect("require + sslrootcert");
    assert!(tls_of(&mut conn).await.0);
    // hostaddr only: verify-ca checks the chain, verify-full is refused (no name to check).
    let url = format!(
        "postgres://app:{PASSWORD}@/app?port={}&hostaddr=127.0.0.1&sslmode=verify-ca\
         &sslrootcert={}",
        pg.port(),
        ca(&pg)
    );
    let mut conn = connect(&url).await.expect("verify-ca with hostaddr only");
    assert!(tls_of(&mut conn).await.0);
    let url = url.replace("verify-ca", "verify-full");
    let err = rustls(&url).expect_err("verify-full without a host name");
    assert!(err.to_string().contains("hostaddr"), "{err}");
}

#[tokio::test]
async fn verify_ca_without_a_root_file_is_refused_before_connecting() {
    // No server needed: refused when the connector is built, as with OpenSSL.
    let err = rustls("postgres://app@localhost:1/app?sslmode=verify-ca")
        .expect_err("verify-ca without sslrootcert");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                setting: "sslrootcert",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("verify-full"), "{text}");
    // rustls speaks no TLS below 1.2: a maximum below it is refused, naming the setting.
    let err =
        rustls("postgres://app@localhost:1/app?sslmode=require&ssl_max_protocol_version=TLSv1.1")
            .expect_err("TLS 1.1 at most");
    assert!(
        err.to_string().contains("ssl_max_protocol_version"),
        "{err}"
    );
}

#[tokio::test]
async fn a_pool_on_rustls_verifies_and_encrypts() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let url = url_for(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca(&pg)),
    );
    let pool = PgPool::builder(&url)
        .tls_backend(TlsBackend::Rustls)
        .pool_size(2)
        .build()
        .await
        .expect("pool on rustls");
    let mut conn = pool.get().await.expect("checkout");
    assert!(tls_of(&mut conn).await.0);
    drop(conn);

    // A wrong CA: the pool fails fast with the verification's cause (a hopeless error).
    let Some(other) = test_support::pg_or_skip() else {
        return;
    };
    let url = url_for(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca(&other)),
    );
    let started = std::time::Instant::now();
    let err = PgPool::builder(&url)
        .tls_backend(TlsBackend::Rustls)
        .pool_size(1)
        .pool_timeout(std::time::Duration::from_secs(20))
        .build()
        .await
        .expect_err("wrong CA");
    let text = err.to_string();
    assert!(text.contains("certificate verify failed"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "a verification failure is not retried until pool_timeout: {:?}",
        started.elapsed()
    );
}
