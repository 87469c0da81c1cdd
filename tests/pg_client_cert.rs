//! Client-certificate authentication through libpq (`sslcert` / `sslkey` in the URL, handled
//! by libpq itself) with the sync pool, against a real, private PostgreSQL server whose
//! pg_hba.conf lets role `app` in over TLS with a certificate of CN `app` only
//! ([`PgOptions::client_cert_auth`]): the certificate gets in and the server sees it
//! (`pg_stat_ssl.client_dn`); no certificate, one for another name or from another CA, or a
//! key others may read is refused and `build()` fails fast with the reason.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};
use resilient_diesel::{BuildError, PgPool};
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

/// `verify-full` against the server's CA, plus the client certificate's files when there is
/// one. The password is in the URL as well: it must neither get `app` in nor show anywhere.
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

/// `build()` of a pool of one connection with [`POOL_TIMEOUT`], on a thread: its outcome and
/// how long it took, or a test failure once [`DEADLINE`] has passed.
fn build_pool(url: &str) -> (Result<PgPool, BuildError>, Duration) {
    let url = url.to_owned();
    let started = Instant::now();
    let (outcome, handle) = common::within(DEADLINE, move || {
        PgPool::builder(&url)
            .pool_size(1)
            .max_overflow(0)
            .pool_timeout(POOL_TIMEOUT)
            .build()
    });
    let outcome = outcome.unwrap_or_else(|| panic!("build(): no outcome within {DEADLINE:?}"));
    let took = started.elapsed();
    handle.join().unwrap();
    (outcome, took)
}

/// `build()` of a pool that must be refused: fails within [`FAST`], as a connect failure
/// classed as hopeless, with no password and no key material in its text. Returns the text.
fn refused_fast(url: &str, what: &str) -> String {
    let (built, took) = build_pool(url);
    let err = built
        .err()
        .unwrap_or_else(|| panic!("{what}: the pool was built"));
    let text = err.to_string();
    eprintln!("{what} ({took:?}): {text}");
    assert!(
        took < FAST,
        "{what}: a refusal no retry can fix must fail build() at once, not after {took:?} \
         (pool_timeout {POOL_TIMEOUT:?}): {text}"
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
    common::assert_no_secret_in_logs();
    text
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

#[test]
fn the_client_certificate_gets_app_in_through_libpq_and_the_server_sees_it() {
    let Some(pg) = server() else { return };
    let cert = pg.issue_client_cert("app").unwrap();
    let (built, _) = build_pool(&url(&pg, Some(&cert)));
    let pool = built.unwrap_or_else(|e| panic!("pool with the client certificate: {e}"));
    let mut conn = pool.get().expect("checkout");
    let row: SslRow = diesel::sql_query(
        "SELECT ssl, coalesce(client_dn, '') AS client_dn, current_user::text AS user \
         FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .get_result(&mut *conn)
    .expect("pg_stat_ssl");
    assert!(row.ssl, "not TLS");
    assert!(
        row.client_dn.contains("CN=app"),
        "client_dn {:?}",
        row.client_dn
    );
    assert_eq!(row.user, "app");
}

#[test]
fn no_certificate_or_another_cn_is_refused_and_build_fails_fast() {
    let Some(pg) = server() else { return };
    let text = refused_fast(&url(&pg, None), "without a certificate");
    assert!(
        text.contains("connection requires a valid client certificate"),
        "{text}"
    );
    let mallory = pg.issue_client_cert("mallory").unwrap();
    let text = refused_fast(&url(&pg, Some(&mallory)), "with CN=mallory");
    assert!(
        text.contains("certificate authentication failed for user \"app\""),
        "{text}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused_at_the_handshake_and_build_fails_fast() {
    let Some(pg) = server() else { return };
    // CN=app, but signed by another server's CA: the server's TLS stack refuses it.
    let Some(other) = server() else { return };
    let foreign = other.issue_client_cert("app").unwrap();
    let text = refused_fast(
        &url(&pg, Some(&foreign)),
        "with a certificate of another CA",
    );
    assert!(text.contains("alert unknown ca"), "{text}");
}

#[test]
fn a_client_key_readable_by_others_is_refused_by_libpq_and_build_fails_fast() {
    let Some(pg) = server() else { return };
    let cert = pg.issue_client_cert("app").unwrap();
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = refused_fast(&url(&pg, Some(&cert)), "with a 0644 key");
    assert!(text.contains("has group or world access"), "{text}");
    assert!(text.contains(&cert.key.display().to_string()), "{text}");

    // The same file at 0600 gets in: the mode was the only thing wrong.
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (built, _) = build_pool(&url(&pg, Some(&cert)));
    built.unwrap_or_else(|e| panic!("the key at 0600: {e}"));
}
