//! No piece of a password ever shows in an error or a log line of the async pool, whatever
//! characters it holds and whichever way the connection fails: the twin of the sync pool's
//! `tests/secrets.rs`.
//!
//! Sentinel passwords hold each of `@ : / % ? # & = ' " \`, a space and non-ASCII characters
//! (and one holds all of them). Each is written in the URL percent-encoded as the URL rule
//! demands (`@ / ? # %` and spaces in the user info; also `& =` in a `password=` parameter; the
//! rest raw), in the user info and in a `password=` parameter, and goes through every way a
//! connection fails: DNS, refused, wrong password, bad `sslmode`, TLS refused (on every TLS
//! stack compiled in), connect timeout; for `PgPool::builder(url).build().await`,
//! `ClassPools::builder(url, n)...build().await`,
//! `PgPool::from_config(PoolConfig::from_lookup(..)).await`, and the first checkout
//! (`get().await`) of a pool that built without connecting (`build_lazy()`, and a class
//! without a reserved floor). The `Display` and `Debug` of every error and every captured log
//! line must hold no piece of 4 or more characters of the password (nor of its encoded form).
//! Written raw, the passwords that need encoding are refused by `build()` (and by the
//! connector's own URL reading) with an `InvalidUrl` error that says what to encode and hides
//! the password.
//!
//! Each case runs its builds concurrently on the test's runtime, with timeouts of 0.5-2 s, and
//! every build has its own deadline: the file takes seconds (the DNS case the longest, paced
//! by how many lookups the resolver answers).
#![cfg(any(feature = "tls-openssl", feature = "rustls"))]

mod common;

use std::fmt::{Debug, Display};
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async_ext::pool_core::config::{ConnectSettings, PoolConfig};
use diesel_async_ext::pool_core::error::ConfigError;
use diesel_async_ext::{
    BuildError, Builder, Class, ClassPools, PgConnectConfig, PgPool, TlsBackend,
};
use test_support::sentinel::*;
use test_support::{PgOptions, PgServer, SilentServer};

const POOL_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Added to a build's own timeouts to make its deadline: a build (or first checkout) still
/// running then has hung, and fails the test instead of holding it.
const HANG_SLACK: Duration = Duration::from_secs(5);

/// An error as it can be shown.
#[derive(Debug)]
struct Shown {
    display: String,
    debug: String,
    invalid_url: bool,
}

impl Shown {
    fn of(e: &(impl Display + Debug), invalid_url: bool) -> Shown {
        Shown {
            display: e.to_string(),
            debug: format!("{e:?}"),
            invalid_url,
        }
    }

    fn of_build(e: &BuildError) -> Shown {
        Shown::of(
            e,
            matches!(e, BuildError::Config(ConfigError::InvalidUrl { .. })),
        )
    }

    fn assert_hidden(&self, password: &str) {
        assert_hidden("Display", &self.display, password);
        assert_hidden("Debug", &self.debug, password);
    }
}

/// The ways to build a pool (and, for those that build without connecting, to have its
/// first connection fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `PgPool::builder(url).build().await`
    Builder,
    /// `ClassPools::builder(url, 2).class(.., reserved 1).build().await`
    ClassPools,
    /// `PgPool::from_config(PoolConfig::from_lookup(DATABASE_URL=url, ...)).await`
    Env,
    /// `PgPool::builder(url).build_lazy().await`, then `pool.get().await`
    Lazy,
    /// `ClassPools::builder(url, 2).class(.., no floor).build().await` (which connects
    /// nothing), then `pools.class(..).get().await`
    ClassCheckout,
}

const VIAS: [Via; 5] = [
    Via::Builder,
    Via::ClassPools,
    Via::Env,
    Via::Lazy,
    Via::ClassCheckout,
];

/// The TLS stack the built-in connector uses when none is asked for (OpenSSL when compiled).
fn default_stack() -> TlsBackend {
    if cfg!(feature = "tls-openssl") {
        TlsBackend::OpenSsl
    } else {
        TlsBackend::Rustls
    }
}

/// Every TLS stack compiled in.
fn stacks() -> Vec<TlsBackend> {
    [TlsBackend::OpenSsl, TlsBackend::Rustls]
        .into_iter()
        .filter(|s| s.is_compiled())
        .collect()
}

/// `builder`'s shared settings: `pool_timeout`, the connect timeout and the TLS stack (the
/// default when `None`).
fn settings(
    builder: Builder<AsyncPgConnection>,
    pool_timeout: Duration,
    stack: Option<TlsBackend>,
) -> Builder<AsyncPgConnection> {
    let builder = builder
        .pool_timeout(pool_timeout)
        .connect_timeout(Some(CONNECT_TIMEOUT));
    match stack {
        Some(stack) => builder.tls_backend(stack),
        None => builder,
    }
}

/// A pool builder of one connection for `url`.
fn one_connection(
    url: &str,
    pool_timeout: Duration,
    stack: Option<TlsBackend>,
) -> Builder<AsyncPgConnection> {
    settings(
        PgPool::builder(url).pool_size(1).max_overflow(0),
        pool_timeout,
        stack,
    )
}

/// Builds a pool of one connection for `url` `via` one way (waiting for it at most
/// `pool_timeout`), on TLS `stack`; the error as it can be shown, if the build (or the first
/// checkout of a pool built without connecting) failed.
async fn try_build(
    via: Via,
    url: &str,
    pool_timeout: Duration,
    stack: Option<TlsBackend>,
) -> Result<(), Shown> {
    match via {
        Via::Builder => one_connection(url, pool_timeout, stack)
            .build()
            .await
            .map(drop)
            .map_err(|e| Shown::of_build(&e)),
        Via::ClassPools => ClassPools::<AsyncPgConnection>::builder(url, 2)
            .class("reserved", Class::new().reserved(1))
            .configure(|b| settings(b, pool_timeout, stack))
            .build()
            .await
            .map(drop)
            .map_err(|e| Shown::of_build(&e)),
        Via::Env => {
            // The environment names no TLS stack: this route always has the default one.
            assert!(
                stack.is_none() || stack == Some(default_stack()),
                "the Env route cannot use {stack:?}"
            );
            let vars = [
                ("DATABASE_URL", url.to_owned()),
                ("DB_POOL_SIZE", "1".to_owned()),
                ("DB_MAX_OVERFLOW", "0".to_owned()),
                ("DB_POOL_TIMEOUT", format!("{}ms", pool_timeout.as_millis())),
                (
                    "DB_CONNECT_TIMEOUT",
                    format!("{}ms", CONNECT_TIMEOUT.as_millis()),
                ),
            ];
            let lookup = |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            };
            let config = PoolConfig::from_lookup(lookup, None).map_err(|e| {
                let invalid_url = matches!(
                    &e,
                    ConfigError::InvalidVar { var, .. } if var == "DATABASE_URL"
                );
                Shown::of(&e, invalid_url)
            })?;
            PgPool::from_config(config)
                .await
                .map(drop)
                .map_err(|e| Shown::of_build(&e))
        }
        Via::Lazy => {
            let pool = one_connection(url, pool_timeout, stack)
                .build_lazy()
                .await
                .map_err(|e| Shown::of_build(&e))?;
            let checkout = pool.get().await.map(drop);
            checkout.map_err(|e| Shown::of(&e, false))
        }
        Via::ClassCheckout => {
            let pools = ClassPools::<AsyncPgConnection>::builder(url, 2)
                .class("web", Class::new().pool_size(1).max_overflow(0))
                .configure(|b| settings(b, pool_timeout, stack))
                .build()
                .await
                .map_err(|e| Shown::of_build(&e))?;
            let pool = pools.class("web").expect("the class just declared");
            let checkout = pool.get().await.map(drop);
            checkout.map_err(|e| Shown::of(&e, false))
        }
    }
}

/// What became of one build.
#[derive(Debug)]
enum Outcome {
    /// The pool was built (and its first checkout, if any, served).
    Built,
    /// It failed with this error.
    Failed(Shown),
    /// It had not ended by this deadline.
    Hung(Duration),
}

/// [`try_build`] with a deadline of its own.
async fn build(via: Via, url: &str, pool_timeout: Duration, stack: Option<TlsBackend>) -> Outcome {
    let deadline = pool_timeout * 2 + CONNECT_TIMEOUT + HANG_SLACK;
    match tokio::time::timeout(deadline, try_build(via, url, pool_timeout, stack)).await {
        Ok(Ok(())) => Outcome::Built,
        Ok(Err(shown)) => Outcome::Failed(shown),
        Err(_) => Outcome::Hung(deadline),
    }
}

/// One failing build: which way, where the password is written, which password, which TLS
/// stack (`None`: the default, not asked for).
#[derive(Debug, Clone)]
struct Case {
    via: Via,
    place: Place,
    password: String,
    stack: Option<TlsBackend>,
}

/// Every way, place and sentinel, on each of `stacks` (the Env route only on the default
/// stack, the one it can have).
fn cases_on(stacks: &[Option<TlsBackend>]) -> Vec<Case> {
    let mut out = Vec::new();
    for &stack in stacks {
        for via in VIAS {
            if via == Via::Env && stack.is_some_and(|s| s != default_stack()) {
                continue;
            }
            for place in PLACES {
                for password in sentinels() {
                    out.push(Case {
                        via,
                        place,
                        password,
                        stack,
                    });
                }
            }
        }
    }
    out
}

/// Every way, place and sentinel on the default TLS stack.
fn cases() -> Vec<Case> {
    cases_on(&[None])
}

/// Where attempt `a` of case `i` connects to (`host:port`), given `i * ATTEMPTS + a`.
type Target<'a> = &'a dyn Fn(usize) -> String;

/// Builds a pool for every case, `parallel` at a time; every build must fail within its
/// deadline, with an error that mentions `expected` and hides the password. Then no log line
/// may show a piece of any password.
async fn every_build_fails_hiding_the_password(
    cases: &[Case],
    target: Target<'_>,
    params: &str,
    pool_timeout: Duration,
    expected: &'static str,
    parallel: usize,
) {
    test_support::capture_logs();
    let all: Vec<usize> = (0..cases.len()).collect();
    for batch in all.chunks(parallel) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&i| {
                let case = cases[i].clone();
                let written = encoded(&case.password, case.place);
                let urls: Vec<String> = (0..ATTEMPTS)
                    .map(|a| {
                        url(
                            case.place,
                            USER,
                            &written,
                            &target(i * ATTEMPTS + a),
                            params,
                        )
                    })
                    .collect();
                tokio::spawn(async move {
                    // A build whose error carries no driver message (no attempt ended within
                    // the pool timeout: a busy resolver drops queries, a busy server is slow
                    // to answer) tested nothing: it is tried again, on another port where
                    // possible.
                    let mut attempts = Vec::new();
                    for url in &urls {
                        let outcome = build(case.via, url, pool_timeout, case.stack).await;
                        let again = matches!(
                            &outcome,
                            Outcome::Failed(shown) if !shown.display.contains(expected)
                        );
                        attempts.push(outcome);
                        if !again {
                            break;
                        }
                    }
                    attempts
                })
            })
            .collect();
        for (&i, task) in batch.iter().zip(tasks) {
            let attempts = task.await.expect("a build panicked");
            let Case {
                via,
                place,
                password,
                stack,
            } = &cases[i];
            let what = format!("{via:?} on {stack:?}, password in {place:?} {password:?}");
            for outcome in &attempts {
                match outcome {
                    Outcome::Built => panic!("{what}: the pool was built"),
                    Outcome::Hung(deadline) => panic!("{what}: no answer within {deadline:?}"),
                    Outcome::Failed(shown) => shown.assert_hidden(password),
                }
            }
            let Some(Outcome::Failed(last)) = attempts.last() else {
                unreachable!("at least one attempt, and every one failed")
            };
            assert!(
                last.display.contains(expected),
                "{what}: after {} attempt(s), the error should mention {expected:?}: {}",
                attempts.len(),
                last.display
            );
        }
    }
    assert_logs_clean();
}

/// No limit: every case's builds at once.
const ALL_AT_ONCE: usize = usize::MAX;

/// Builds at once for the failures that end a build's wait early: each build costs a few
/// milliseconds of the runtime's one thread (an unoptimized build), so 150 at once starve
/// their own 0.5 s timeouts. (The async connector does not serialize connects to one peer,
/// unlike the sync adapter, so builds against one server overlap too.)
const AT_ONCE: usize = 50;

/// Builds per case at most, when the driver's message does not come in time.
const ATTEMPTS: usize = 8;

/// The cases are listed one way of building after another.
const ONE_VIA_AT_A_TIME: usize = PLACES.len() * (SPECIALS.len() + 1);

/// A distinct port per attempt of each of `n` cases, where nothing listens.
fn free_ports(n: usize) -> Vec<u16> {
    (0..n * ATTEMPTS)
        .map(|_| test_support::free_port())
        .collect()
}

/// For the failures that come at once (no server involved).
const FAST_POOL_TIMEOUT: Duration = Duration::from_millis(500);

/// A host name that cannot resolve (`.invalid` is reserved for that): every build fails with
/// the resolver's answer, hiding the password, and the failures are logged.
///
/// Its own runtime, so that lookups the resolver dropped (each holds a blocking thread for
/// the resolver's 5 s retry, past the connect timeout that gave up on it) do not hold the end
/// of the test.
#[test]
fn dns_failure() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cases = cases();
        let ports = free_ports(cases.len());
        every_build_fails_hiding_the_password(
            &cases,
            &|i| format!("nonexistent.invalid:{}", ports[i]),
            "sslmode=disable",
            FAST_POOL_TIMEOUT,
            "nonexistent.invalid",
            // The resolver drops bursts of lookups (each then takes 5 s): batches of 15 give
            // it pauses, which a steady 15 at a time does not.
            15,
        )
        .await;
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    // The failures were logged: the log check above did look at something.
    assert!(
        test_support::captured_logs()
            .iter()
            .any(|line| line.contains("nonexistent.invalid")),
        "no connect failure was logged"
    );
}

/// A port where nothing listens: every build fails with "refused", hiding the password.
#[tokio::test]
async fn connection_refused() {
    let cases = cases();
    let ports = free_ports(cases.len());
    every_build_fails_hiding_the_password(
        &cases,
        &|i| format!("127.0.0.1:{}", ports[i]),
        "sslmode=disable",
        FAST_POOL_TIMEOUT,
        "refused",
        AT_ONCE,
    )
    .await;
}

/// A server that accepts and never answers: every build fails with the connect timeout,
/// hiding the password.
#[tokio::test]
async fn connect_timeout() {
    let cases = cases();
    let silent: Vec<SilentServer> = (0..cases.len())
        .map(|_| SilentServer::start().expect("silent listener"))
        .collect();
    every_build_fails_hiding_the_password(
        &cases,
        &|i| format!("127.0.0.1:{}", silent[i / ATTEMPTS].port()),
        "sslmode=disable",
        // Longer than the connect timeout, so that an attempt ends and is reported.
        CONNECT_TIMEOUT * 2,
        "connect_timeout",
        ALL_AT_ONCE,
    )
    .await;
}

/// An `sslmode` that does not exist: every build (the async connector reads the URL when
/// the pool is built) fails naming `sslmode`, hiding the password.
#[tokio::test]
async fn bad_sslmode() {
    let cases = cases();
    let ports = free_ports(cases.len());
    every_build_fails_hiding_the_password(
        &cases,
        &|i| format!("127.0.0.1:{}", ports[i]),
        "sslmode=bogus",
        FAST_POOL_TIMEOUT,
        "sslmode",
        ALL_AT_ONCE,
    )
    .await;
}

/// Cases against one real server wait for its answers, a batch at a time.
const SERVER_POOL_TIMEOUT: Duration = Duration::from_secs(1);

/// A real server that knows the role with another password: every build fails with the
/// server's "password authentication failed", hiding the password.
#[tokio::test]
async fn authentication_failure() {
    let Some(pg) = common::server() else {
        return;
    };
    pg.execute(&format!(
        "CREATE ROLE {USER} LOGIN PASSWORD 'a-different-Pw-1'"
    ))
    .expect("create role");
    let host_port = format!("127.0.0.1:{}", pg.port());
    every_build_fails_hiding_the_password(
        &cases(),
        &|_| host_port.clone(),
        "sslmode=disable",
        SERVER_POOL_TIMEOUT,
        "password authentication failed",
        ONE_VIA_AT_A_TIME,
    )
    .await;
}

/// A real server without TLS and `sslmode=require`: on every TLS stack compiled in (asked
/// for through `tls_backend`, and the default one, which the Env route has), every build
/// fails with the TLS error, hiding the password.
#[tokio::test]
async fn tls_refused_by_the_server() {
    test_support::capture_logs();
    let server = match PgServer::start_with(PgOptions::new().ssl(false)) {
        Ok(server) => server,
        Err(e) if test_support::ci_mode() => panic!("could not start a private server: {e}"),
        Err(e) => {
            eprintln!("skipping: could not start a private PostgreSQL server: {e}");
            return;
        }
    };
    let stacks: Vec<Option<TlsBackend>> = stacks().into_iter().map(Some).collect();
    assert!(!stacks.is_empty(), "no TLS stack compiled in");
    let host_port = format!("127.0.0.1:{}", server.port());
    every_build_fails_hiding_the_password(
        &cases_on(&stacks),
        &|_| host_port.clone(),
        "sslmode=require",
        // The server refuses TLS in its first answer.
        FAST_POOL_TIMEOUT,
        "TLS",
        AT_ONCE,
    )
    .await;
}

/// The control: the async connector reads every sentinel, written as the rule demands or
/// encoded throughout, in the user info or in `password=`, as exactly the password we parsed
/// (a role with that password logs in and runs a query).
#[tokio::test]
async fn the_connector_reads_every_sentinel_as_written() {
    let Some(pg) = common::server() else {
        return;
    };
    let passwords = sentinels();
    for (i, password) in passwords.iter().enumerate() {
        pg.execute(&format!(
            "CREATE ROLE sentinel_{i} LOGIN PASSWORD $pw${password}$pw$"
        ))
        .expect("create role");
    }
    let host_port = format!("127.0.0.1:{}", pg.port());
    let mut tasks = Vec::new();
    for (i, password) in passwords.iter().enumerate() {
        for place in PLACES {
            for written in [encoded(password, place), fully_encoded(password)] {
                let url = url(
                    place,
                    &format!("sentinel_{i}"),
                    &written,
                    &host_port,
                    "sslmode=disable",
                );
                let password = password.clone();
                tasks.push(tokio::spawn(async move {
                    let logged_in = async {
                        use diesel_async::RunQueryDsl;
                        let pool = PgPool::builder(&url)
                            .pool_size(1)
                            .max_overflow(0)
                            .pool_timeout(Duration::from_secs(5))
                            .build()
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                        diesel::sql_query("SELECT 1")
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| e.to_string())
                    };
                    let outcome = tokio::time::timeout(Duration::from_secs(15), logged_in).await;
                    match outcome {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(format!("{password:?} written {written:?}: {e}")),
                        Err(_) => Err(format!("{password:?} written {written:?}: hung")),
                    }
                }));
            }
        }
    }
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.expect("a login panicked") {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Written raw, a password that needs encoding is refused before anything connects, with a
/// clear `InvalidUrl` error that says what to encode and shows nothing of the password: by
/// every way of building, and by the connector's own URL reading (`PgConnectConfig`).
#[tokio::test]
async fn raw_passwords_that_need_encoding_are_refused_clearly() {
    test_support::capture_logs();
    let advice = |c: char| match c {
        '@' => "@ as %40",
        '/' => "/ as %2F",
        '?' => "? as %3F",
        '#' => "# as %23",
        ' ' => "space as %20",
        '%' => "% as %25",
        '&' => "%26",
        '=' => "%3D",
        _ => unreachable!(),
    };
    let mut refused = 0;
    for password in sentinels() {
        for place in PLACES {
            let needs: &[char] = match place {
                Place::UserInfo => &['@', '/', '?', '#', ' ', '%'],
                Place::Query => &['@', '#', ' ', '%', '&', '='],
            };
            let Some(special) = password.chars().find(|c| needs.contains(c)) else {
                continue;
            };
            let url = url(
                place,
                USER,
                &password,
                "db.example.com:5432",
                "sslmode=disable",
            );
            let mut shown_by: Vec<(String, Shown)> = Vec::new();
            for via in VIAS {
                match build(via, &url, POOL_TIMEOUT, None).await {
                    Outcome::Failed(shown) => shown_by.push((format!("{via:?}"), shown)),
                    other => panic!(
                        "{via:?}: the raw password {password:?} in {place:?} was not refused: \
                         {other:?}"
                    ),
                }
            }
            match PgConnectConfig::from_url(&url, &ConnectSettings::default()) {
                Ok(_) => panic!("PgConnectConfig accepted the raw {password:?} in {place:?}"),
                Err(e) => shown_by.push((
                    "PgConnectConfig::from_url".to_owned(),
                    Shown::of(&e, matches!(e, ConfigError::InvalidUrl { .. })),
                )),
            }
            for (by, shown) in shown_by {
                assert!(
                    shown.invalid_url,
                    "{by}, {password:?} in {place:?}: not an invalid-URL error: {}",
                    shown.debug
                );
                assert!(
                    shown.display.contains("percent-encode")
                        || shown.display.contains(advice(special)),
                    "{by}, {password:?} in {place:?}: no advice: {}",
                    shown.display
                );
                if password != ALL {
                    assert!(
                        shown.display.contains(advice(special)),
                        "{by}, {password:?} in {place:?}: no {:?}: {}",
                        advice(special),
                        shown.display
                    );
                }
                shown.assert_hidden(&password);
                refused += 1;
            }
        }
    }
    assert!(
        refused >= (VIAS.len() + 1) * 12,
        "only {refused} refusals checked"
    );
    assert_logs_clean();
}

/// `what`'s output, or a panic if it has not ended within [`HANG_SLACK`] (for what connects
/// nothing and should return at once).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG_SLACK, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {HANG_SLACK:?}"))
}

/// A pool's `Debug` (what `{:?}` in an application's log shows) names the pool, its server
/// and bb8's state, and no piece of any sentinel password, in the user info or a parameter;
/// nor do its configuration's `Debug`, its status report, a class set's `Debug`, or the
/// connector's settings' `Debug` (which hold the driver's configuration).
#[tokio::test]
async fn a_pools_debug_names_it_and_its_server_and_hides_the_password() {
    for password in sentinels() {
        for place in PLACES {
            let written = encoded(&password, place);
            let url = url(place, "app", &written, "127.0.0.1:1", "sslmode=disable");
            let pool = within(
                "a lazy build",
                PgPool::builder(&url).name("debugged").build_lazy(),
            )
            .await
            .unwrap_or_else(|e| panic!("{place:?} {password:?}: a lazy build failed: {e}"));
            let shown = format!("{pool:?}");
            for part in ["ExtPool", "debugged", "127.0.0.1", "connections"] {
                assert!(shown.contains(part), "the Debug lacks {part:?}: {shown}");
            }
            assert_hidden("the pool's Debug", &shown, &password);
            assert_hidden(
                "the pool's configuration's Debug",
                &format!("{:?}", pool.config()),
                &password,
            );
            let status = pool.status();
            assert_hidden("the pool's status", &format!("{status}"), &password);
            assert_hidden("the status's Debug", &format!("{status:?}"), &password);

            let pools = within(
                "a floorless build",
                ClassPools::<AsyncPgConnection>::builder(&url, 2)
                    .class("web", Class::new().pool_size(1).max_overflow(0))
                    .build(),
            )
            .await
            .unwrap_or_else(|e| panic!("{place:?} {password:?}: a floorless build: {e}"));
            let shown = format!("{pools:?}");
            assert!(shown.contains("web"), "the Debug lacks the class: {shown}");
            assert_hidden("the class set's Debug", &shown, &password);
            assert_hidden(
                "the class set's status",
                &format!("{}", pools.status()),
                &password,
            );

            let config = PgConnectConfig::from_url(&url, &ConnectSettings::default())
                .unwrap_or_else(|e| panic!("{place:?} {password:?}: the connector refused: {e}"));
            let shown = format!("{config:?}");
            assert!(
                shown.contains("127.0.0.1"),
                "the Debug lacks the host: {shown}"
            );
            assert_hidden("the connector's settings' Debug", &shown, &password);
        }
    }
}
