//! No piece of a password ever shows in an error or a log line, whatever characters it holds
//! and whichever way the connection fails.
//!
//! Sentinel passwords hold each of `@ : / % ? # & = ' " \`, a space and non-ASCII characters
//! (and one holds all of them). Each is written in the URL percent-encoded as the URL rule
//! demands (`@ / ? # %` and spaces in the user info; also `& =` in a `password=` parameter; the
//! rest raw), in the user info and in a `password=` parameter, and goes through every way a
//! connection fails: DNS, refused, wrong password, bad `sslmode`, TLS refused, connect timeout;
//! for `PgPool::builder(url).build()`, `ClassPools::builder(url, n)...build()` and
//! `PgPool::from_config(PoolConfig::from_lookup(..))`. The `Display` and `Debug` of every error
//! and every captured log line must hold no piece of 4 or more characters of the password (nor
//! of its encoded form). Written raw, the passwords that need encoding are refused by `build()`
//! with an `InvalidUrl` error that says what to encode and hides the password.
//!
//! Each case runs its builds in parallel, with timeouts of 0.5-2 s: the file takes seconds.

use std::fmt::{Debug, Display};
use std::time::Duration;

use diesel::prelude::*;
use diesel::PgConnection;
use resilient_diesel::pool_core::ConfigError;
use resilient_diesel::{BuildError, Class, ClassPools, PgPool, PoolConfig};
use test_support::sentinel::*;
use test_support::{PgOptions, PgServer, SilentServer};

const POOL_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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

/// The three ways to build a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `PgPool::builder(url).build()`
    Builder,
    /// `ClassPools::builder(url, 2).class(.., reserved 1).build()`
    ClassPools,
    /// `PgPool::from_config(PoolConfig::from_lookup(DATABASE_URL=url, ...))`
    Env,
}

const VIAS: [Via; 3] = [Via::Builder, Via::ClassPools, Via::Env];

/// Builds a pool of one connection for `url` (waiting for it at most `pool_timeout`); the
/// error as it can be shown, if the build failed.
fn build(via: Via, url: &str, pool_timeout: Duration) -> Result<(), Shown> {
    match via {
        Via::Builder => PgPool::builder(url)
            .pool_size(1)
            .max_overflow(0)
            .pool_timeout(pool_timeout)
            .connect_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map(drop)
            .map_err(|e| Shown::of_build(&e)),
        Via::ClassPools => ClassPools::<PgConnection>::builder(url, 2)
            .class("reserved", Class::new().reserved(1))
            .configure(|b| {
                b.pool_timeout(pool_timeout)
                    .connect_timeout(Some(CONNECT_TIMEOUT))
            })
            .build()
            .map(drop)
            .map_err(|e| Shown::of_build(&e)),
        Via::Env => {
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
                .map(drop)
                .map_err(|e| Shown::of_build(&e))
        }
    }
}

/// One failing build: which way, where the password is written, which password.
type Case = (Via, Place, String);

fn cases() -> Vec<Case> {
    VIAS.iter()
        .flat_map(|&via| {
            PLACES.iter().flat_map(move |&place| {
                sentinels()
                    .into_iter()
                    .map(move |password| (via, place, password))
            })
        })
        .collect()
}

/// Where attempt `a` of case `i` connects to (`host:port`), given `i * ATTEMPTS + a`.
type Target<'a> = &'a (dyn Fn(usize) -> String + Sync);

/// Builds a pool for every sentinel, place and way of building, `parallel` at a time; every
/// build must fail, with an error that mentions `expected` and hides the password. Then no log
/// line may show a piece of any password.
///
/// The adapter serializes connection attempts to one peer (to tell new sockets apart), so
/// parallel builds only overlap when their targets differ: give each case its own port where
/// nothing real listens, or build fewer at a time.
fn every_build_fails_hiding_the_password(
    target: Target<'_>,
    params: &str,
    pool_timeout: Duration,
    expected: &str,
    parallel: usize,
) {
    test_support::capture_logs();
    let cases = cases();
    let all: Vec<usize> = (0..cases.len()).collect();
    for batch in all.chunks(parallel) {
        let outcomes: Vec<Vec<Result<(), Shown>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let (via, place, password) = &cases[i];
                    let url = move |attempt: usize| {
                        let target = target(i * ATTEMPTS + attempt);
                        url(*place, USER, &encoded(password, *place), &target, params)
                    };
                    scope.spawn(move || {
                        // A build whose error carries no driver message (no attempt ended
                        // within the pool timeout: a busy resolver drops queries, and the
                        // resolver resends them only after 5 s) tested nothing: it is tried
                        // again, on another port where possible (the connection still under
                        // way holds the port's connect lock).
                        let mut attempts = Vec::new();
                        for attempt in 0..ATTEMPTS {
                            let outcome = build(*via, &url(attempt), pool_timeout);
                            let done = !matches!(
                                &outcome,
                                Err(shown) if !shown.display.contains(expected)
                            );
                            attempts.push(outcome);
                            if done {
                                break;
                            }
                        }
                        attempts
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a build panicked"))
                .collect()
        });
        for (&i, attempts) in batch.iter().zip(outcomes) {
            let (via, place, password) = &cases[i];
            for outcome in &attempts {
                let Err(shown) = outcome else {
                    panic!("{via:?}, password in {place:?} {password:?}: the pool was built");
                };
                shown.assert_hidden(password);
            }
            let Some(Err(last)) = attempts.last() else {
                unreachable!("at least one attempt")
            };
            assert!(
                last.display.contains(expected),
                "{via:?}, password in {place:?} {password:?}: after {ATTEMPTS} attempts, the \
                 error should mention {expected:?}: {}",
                last.display
            );
        }
    }
    assert_logs_clean();
}

const ALL_AT_ONCE: usize = usize::MAX;

/// Builds per case at most, when the driver's message does not come in time.
const ATTEMPTS: usize = 8;

/// The cases are listed one way of building after another.
const ONE_VIA_AT_A_TIME: usize = PLACES.len() * (SPECIALS.len() + 1);

/// A distinct port per attempt of each case, where nothing listens.
fn free_ports() -> Vec<u16> {
    (0..cases().len() * ATTEMPTS)
        .map(|_| test_support::free_port())
        .collect()
}

/// For the failures that come at once (no server involved).
const FAST_POOL_TIMEOUT: Duration = Duration::from_millis(500);

#[test]
fn dns_failure() {
    let ports = free_ports();
    every_build_fails_hiding_the_password(
        &|i| format!("nonexistent.invalid:{}", ports[i]),
        "sslmode=disable",
        FAST_POOL_TIMEOUT,
        "nonexistent.invalid",
        // The resolver may drop bursts of lookups (each then takes 5 s).
        15,
    );
    // The failures were logged: the log check above did look at something.
    assert!(
        test_support::captured_logs()
            .iter()
            .any(|line| line.contains("nonexistent.invalid")),
        "no connect failure was logged"
    );
}

#[test]
fn connection_refused() {
    let ports = free_ports();
    every_build_fails_hiding_the_password(
        &|i| format!("127.0.0.1:{}", ports[i]),
        "sslmode=disable",
        FAST_POOL_TIMEOUT,
        "refused",
        ALL_AT_ONCE,
    );
}

#[test]
fn connect_timeout() {
    let silent: Vec<SilentServer> = (0..cases().len())
        .map(|_| SilentServer::start().expect("silent listener"))
        .collect();
    every_build_fails_hiding_the_password(
        &|i| format!("127.0.0.1:{}", silent[i / ATTEMPTS].port()),
        "sslmode=disable",
        // Longer than the connect timeout, so that an attempt ends and is reported.
        CONNECT_TIMEOUT * 2,
        "timeout",
        ALL_AT_ONCE,
    );
}

#[test]
fn bad_sslmode() {
    let ports = free_ports();
    every_build_fails_hiding_the_password(
        &|i| format!("127.0.0.1:{}", ports[i]),
        "sslmode=bogus",
        FAST_POOL_TIMEOUT,
        "sslmode",
        ALL_AT_ONCE,
    );
}

/// Cases against one real server share its port, so their connects are serialized.
const SERVER_POOL_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn authentication_failure() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    pg.execute(&format!(
        "CREATE ROLE {USER} LOGIN PASSWORD 'a-different-Pw-1'"
    ))
    .expect("create role");
    let host_port = format!("127.0.0.1:{}", pg.port());
    every_build_fails_hiding_the_password(
        &|_| host_port.clone(),
        "sslmode=disable",
        SERVER_POOL_TIMEOUT,
        "password authentication failed",
        ONE_VIA_AT_A_TIME,
    );
}

#[test]
fn tls_refused_by_the_server() {
    let server = match PgServer::start_with(PgOptions::new().ssl(false)) {
        Ok(server) => server,
        Err(e) if test_support::ci_mode() => panic!("could not start a private server: {e}"),
        Err(e) => {
            eprintln!("skipping: could not start a private PostgreSQL server: {e}");
            return;
        }
    };
    let host_port = format!("127.0.0.1:{}", server.port());
    every_build_fails_hiding_the_password(
        &|_| host_port.clone(),
        "sslmode=require",
        SERVER_POOL_TIMEOUT,
        "SSL",
        ALL_AT_ONCE,
    );
}

/// The control: libpq reads every sentinel, written as the rule demands or encoded throughout,
/// in the user info or in `password=`, as exactly the password we parsed (a role with that
/// password logs in).
#[test]
fn libpq_reads_every_sentinel_as_we_do() {
    let Some(pg) = test_support::pg_or_skip() else {
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
    std::thread::scope(|scope| {
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
                    scope.spawn(move || {
                        let pool = PgPool::builder(&url)
                            .pool_size(1)
                            .max_overflow(0)
                            .pool_timeout(Duration::from_secs(5))
                            .build()
                            .unwrap_or_else(|e| panic!("{password:?} written {written:?}: {e}"));
                        let mut conn = pool.get().expect("checkout");
                        diesel::sql_query("SELECT 1")
                            .execute(&mut *conn)
                            .expect("query");
                    });
                }
            }
        }
    });
}

/// Written raw, a password that needs encoding is refused before anything connects, with a
/// clear `InvalidUrl` error that says what to encode and shows nothing of the password.
#[test]
fn raw_passwords_that_need_encoding_are_refused_clearly() {
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
            for via in VIAS {
                let Err(shown) = build(via, &url, POOL_TIMEOUT) else {
                    panic!("{via:?}: the raw password {password:?} in {place:?} was accepted");
                };
                assert!(
                    shown.invalid_url,
                    "{via:?}, {password:?} in {place:?}: not an invalid-URL error: {}",
                    shown.debug
                );
                assert!(
                    shown.display.contains("percent-encode")
                        || shown.display.contains(advice(special)),
                    "{via:?}, {password:?} in {place:?}: no advice: {}",
                    shown.display
                );
                if password != ALL {
                    assert!(
                        shown.display.contains(advice(special)),
                        "{via:?}, {password:?} in {place:?}: no {:?}: {}",
                        advice(special),
                        shown.display
                    );
                }
                shown.assert_hidden(&password);
                refused += 1;
            }
        }
    }
    assert!(refused >= 3 * 12, "only {refused} refusals checked");
    assert_logs_clean();
}

/// A pool's `Debug` (what `{:?}` in an application's log shows) names the pool, its server
/// and r2d2's state, and no piece of any sentinel password, in the user info or a parameter.
#[test]
fn a_pools_debug_names_it_and_its_server_and_hides_the_password() {
    for password in sentinels() {
        for place in [Place::UserInfo, Place::Query] {
            let written = encoded(&password, place);
            let url = url(place, "app", &written, "127.0.0.1:1", "sslmode=disable");
            let pool = resilient_diesel::PgPool::builder(&url)
                .name("debugged")
                .build_lazy()
                .unwrap_or_else(|e| panic!("{place:?} {password:?}: a lazy build failed: {e}"));
            let shown = format!("{pool:?}");
            for part in ["ExtPool", "debugged", "127.0.0.1", "connections"] {
                assert!(shown.contains(part), "the Debug lacks {part:?}: {shown}");
            }
            assert_hidden("the pool's Debug", &shown, &password);
        }
    }
}
