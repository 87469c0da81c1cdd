//! Property tests of parsing: database URLs, redaction, environment variables, durations.
//!
//! For any input: no panic, and no password in any error's `Display` or `Debug`, in a
//! configuration's `Debug` or in a redacted URL, whether the password is written raw or
//! percent-encoded, ASCII or not.
//!
//! How a leak is seen: every generated password holds at least one *marker* character (`J`,
//! `é` or `密`). No fixed text of this crate (messages, advice, variable names) contains a
//! marker (`J` is the only capital letter none of its string literals holds), and every other part of a generated
//! input (user, host, database, other variables' values) is written without them, so a marker
//! in an output can only come from the password. Each property also checks that the whole
//! password, raw and percent-encoded, is absent.
//!
//! Cases per property: [`CASES`] by default (quick in a debug build); set `PROPTEST_CASES` to
//! run more, e.g. `PROPTEST_CASES=5000 cargo test -p pool-core --test parsing_props`.

use std::collections::HashMap;
use std::time::Duration;

use pool_core::config::env_vars;
use pool_core::redact::{redact, Redactor};
use pool_core::settings::show_duration;
use pool_core::{parse_duration, DatabaseUrl, PoolConfig, SslMode};
use proptest::prelude::*;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 128;

fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
        deadline();
    }
    config
}

/// How long the default run of this file may take: well under a second in a debug build, so
/// past this a parse or a redaction has stopped advancing.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts (once) the watch that ends this test binary with a failure if it runs past
/// [`DEADLINE`]: a property whose input makes the library spin would otherwise hang the run
/// (libtest has no per-test timeout, and a spinning case cannot be interrupted).
fn deadline() {
    static WATCH: std::sync::Once = std::sync::Once::new();
    WATCH.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(DEADLINE);
            eprintln!(
                "parsing_props: still running after {DEADLINE:?}: a parse or a redaction no \
                 longer ends on some input"
            );
            std::process::exit(101);
        });
    });
}

/// Characters that only a password holds; one of them is in every generated password.
const MARKERS: [char; 3] = ['J', 'é', '密'];

/// The characters a password is made of: every one that URL parsers and libpq treat
/// specially, a space, non-ASCII, and some plain ones.
const PASSWORD_CHARS: &[char] = &[
    '@', ':', '/', '%', '#', '?', '&', '=', '\'', ' ', 'é', '密', 'a', 'b', '1', '2', 'J', 'Z',
    '4', '0', 'F', '"', '\\', '+', ';', ',',
];

/// A password of 1 to 16 characters from [`PASSWORD_CHARS`] with a marker inserted.
fn password() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(proptest::sample::select(PASSWORD_CHARS), 0..16),
        proptest::sample::select(&MARKERS[..]),
        any::<proptest::sample::Index>(),
    )
        .prop_map(|(mut chars, marker, at)| {
            let at = at.index(chars.len() + 1);
            chars.insert(at, marker);
            chars.into_iter().collect()
        })
}

/// Every byte outside the URL's unreserved set as `%XX` (upper-case hex).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fails when `shown` holds a marker, the password, or its percent-encoded form.
fn assert_hidden(shown: &str, password: &str, context: &str) -> Result<(), TestCaseError> {
    let encoded = percent_encode(password);
    prop_assert!(
        !shown.contains(MARKERS),
        "a piece of the password {password:?} shows in {shown:?} ({context})"
    );
    prop_assert!(
        !shown.contains(password) && !shown.contains(&encoded),
        "the password {password:?} shows in {shown:?} ({context})"
    );
    Ok(())
}

/// Text without markers: what users, hosts, databases and other values are made of.
fn plain_text() -> impl Strategy<Value = String> {
    "[a-z0-9 :/@?#&=%._,'\"\\[\\]-]{0,12}"
}

/// A database URL holding `password` (raw or percent-encoded) in its user info or in a
/// `password=` parameter, with hosts, paths and parameters of every form `parse` takes or
/// refuses.
fn url_with(password: String) -> impl Strategy<Value = (String, String)> {
    let scheme = proptest::sample::select(
        &[
            "postgres://",
            "postgresql://",
            "mysql://",
            "mariadb://",
            "POSTGRES://",
            "postgres:",
        ][..],
    );
    let host = proptest::sample::select(
        &[
            "db",
            "db:5432",
            "h1,h2:5433",
            "",
            "[::1]:5433",
            "db:port",
            "db:0",
            "[::1",
        ][..],
    );
    let path = proptest::sample::select(&["/app", "", "/", "/my@db"][..]);
    let query = proptest::sample::select(
        &[
            "",
            "?sslmode=require",
            "?host=/run/pg&port=5433",
            "?sslmode",
            "?application_name=a@b",
        ][..],
    );
    // Where the password goes: user info, a `password=` parameter, or both.
    let place = 0..3u8;
    (
        scheme,
        host,
        path,
        query,
        place,
        any::<bool>(),
        plain_text(),
    )
        .prop_map(move |(scheme, host, path, query, place, encode, junk)| {
            // Written raw in a `password=` parameter, a `&` ends the value (the rest is
            // another parameter, as every parser reads it: the module's rule says to encode
            // it), and in MySQL URLs, whose parameters are form-encoded, a `+` is a space. The
            // password would not be the one generated.
            let password = if place == 0 || encode {
                password.clone()
            } else if scheme.starts_with("postgres") {
                password.replace('&', "a")
            } else {
                password.replace(['&', '+'], "a")
            };
            let written = if encode {
                percent_encode(&password)
            } else {
                password.clone()
            };
            let userinfo = match place {
                0 | 2 => format!("app:{written}@"),
                _ => "app@".to_owned(),
            };
            let query = match place {
                1 | 2 => {
                    let sep = if query.is_empty() { "?" } else { "&" };
                    format!("{query}{sep}password={written}")
                }
                _ => query.to_owned(),
            };
            // Sometimes junk after the URL, to reach the refusals past the first (not after a
            // `password=` value: it would become part of the password).
            let tail = if place == 0 && junk.len() > 8 {
                junk
            } else {
                String::new()
            };
            (
                format!("{scheme}{userinfo}{host}{path}{query}{tail}"),
                password,
            )
        })
}

fn any_url() -> impl Strategy<Value = (String, String)> {
    password().prop_flat_map(url_with)
}

proptest! {
    #![proptest_config(config())]

    /// Parsing any text returns (never panics), and so does everything a parsed URL shows.
    #[test]
    fn parsing_any_text_never_panics(s in "\\PC{0,40}|(postgres|mysql|sqlite|file)://\\PC{0,40}") {
        match DatabaseUrl::parse(&s) {
            Ok(u) => {
                let _ = (u.redacted(), u.hosts(), u.query_pairs(), u.host(), u.port());
                let _ = format!("{u} {u:?}");
                let _ = u.redactor().redact(&s);
            }
            Err(e) => {
                let _ = format!("{e} {e:?}");
            }
        }
    }

    /// A URL with a password, accepted or refused: the password shows nowhere, in no form.
    #[test]
    fn a_url_password_never_shows((url, password) in any_url()) {
        match DatabaseUrl::parse(&url) {
            Ok(u) => {
                assert_hidden(&u.redacted(), &password, &url)?;
                assert_hidden(&format!("{u} {u:?}"), &password, &url)?;
                assert_hidden(&format!("{:?}", u.query_pairs()), &password, &url)?;
                assert_hidden(&format!("{:?}", u.redactor()), &password, &url)?;
                // What a driver might quote: the password decoded, as written, the URL.
                let message = format!(
                    "auth failed for {password} ({}) at {url} \"{password}\"",
                    percent_encode(&password)
                );
                assert_hidden(&u.redactor().redact(&message), &password, &url)?;
            }
            Err(e) => {
                assert_hidden(&format!("{e}"), &password, &url)?;
                assert_hidden(&format!("{e:?}"), &password, &url)?;
            }
        }
    }

    /// Any password given to `with_password` on any accepted URL: accepted, written
    /// percent-encoded, and hidden in every form the new URL shows (and by its redactor).
    #[test]
    fn with_password_takes_any_password_and_never_shows_it(
        (url, _) in any_url(),
        fresh in password(),
    ) {
        if let Ok(u) = DatabaseUrl::parse(&url) {
            if u.backend() == pool_core::Backend::Sqlite {
                return Ok(());
            }
            let new = u.with_password(&fresh);
            let new = match new {
                Ok(new) => new,
                Err(e) => {
                    assert_hidden(&format!("{e} {e:?}"), &fresh, &url)?;
                    return Err(TestCaseError::fail(format!("refused for {url}: {e}")));
                }
            };
            prop_assert!(new.expose_secret().contains(&percent_encode(&fresh)));
            assert_hidden(&format!("{new} {new:?} {}", new.redacted()), &fresh, &url)?;
            let message = format!("auth failed for {fresh} ({})", percent_encode(&fresh));
            assert_hidden(&new.redactor().redact(&message), &fresh, &url)?;
        }
    }

    /// The same through the builder: its `Debug`, its error, the built configuration's `Debug`.
    #[test]
    fn a_builder_and_config_never_show_the_password((url, password) in any_url()) {
        let builder = PoolConfig::builder(&url);
        assert_hidden(&format!("{builder:?}"), &password, &url)?;
        match builder.build() {
            Ok(c) => assert_hidden(&format!("{c:?}"), &password, &url)?,
            Err(e) => assert_hidden(&format!("{e} {e:?}"), &password, &url)?,
        }
    }

    /// `redact` never panics, and applying it twice gives what applying it once gave.
    #[test]
    fn redact_is_idempotent(s in "\\PC{0,60}|.{0,8}(postgres://|password=|\"password\": )\\PC{0,40}") {
        let once = redact(&s);
        prop_assert_eq!(redact(&once), once);
    }

    /// The same from pieces that matter to URLs, key/value pairs and quoting.
    #[test]
    fn redact_is_idempotent_on_pieces(pieces in proptest::collection::vec(proptest::sample::select(PIECES), 0..12)) {
        let s: String = pieces.concat();
        let once = redact(&s);
        prop_assert_eq!(redact(&once), once);
    }

    /// A redactor that knows secrets masks them in any text, and is a fixed point.
    #[test]
    fn a_redactor_masks_its_secret_anywhere(
        password in password(),
        other in "\\PC{0,8}",
        before in plain_text(),
        after in plain_text(),
    ) {
        let r = Redactor::new().with_secret(&password).with_secret(&other);
        for text in [
            format!("{before}{password}{after}"),
            format!("{before}{}{after}", percent_encode(&password)),
            format!("{before}{password:?}{after}"),
            format!("{before}'{}'{after}", &password[password.char_indices().nth(1).map_or(0, |(i, _)| i)..]),
        ] {
            let once = r.redact(&text);
            // A marker may be in `other` (random text), then it is masked too; only the
            // password's own characters matter here.
            prop_assert!(!once.contains(&password), "{password:?} in {once:?}");
            prop_assert_eq!(r.redact(&once), once.clone(), "not a fixed point for {:?}", text);
        }
    }

    /// Reading the environment: any values, the password also put in other variables (a
    /// shifted environment file). No panic; the password shows neither in the error nor in the
    /// configuration's `Debug`.
    #[test]
    fn the_environment_never_shows_the_password(
        (url, password) in any_url(),
        values in proptest::collection::vec((0..5u8, plain_text(), any::<bool>()), 24),
    ) {
        let mut vars: HashMap<&str, String> = HashMap::new();
        vars.insert("DATABASE_URL", url.clone());
        for (var, (choice, junk, encode)) in env_vars().skip(1).zip(values) {
            let value = match choice {
                0 => continue, // unset
                1 => junk,
                2 => typical_value(var).to_owned(),
                3 if encode => percent_encode(&password),
                3 => password.clone(),
                _ => format!("{} {junk}", typical_value(var)),
            };
            vars.insert(var, value);
        }
        match PoolConfig::from_lookup(|k| vars.get(k).cloned(), None) {
            Ok(c) => assert_hidden(&format!("{c:?}"), &password, &format!("{vars:?}"))?,
            Err(e) => assert_hidden(&format!("{e} {e:?}"), &password, &format!("{vars:?}"))?,
        }
    }

    /// A configuration file's settings (by name, as `serde` gives them): any values, the
    /// password also in other settings and in a setting's name. No panic, and the password
    /// shows neither in the error nor in the configuration's `Debug`.
    #[test]
    fn configuration_files_never_show_the_password(
        (url, password) in any_url(),
        values in proptest::collection::vec((0..6u8, plain_text(), any::<bool>()), 30),
    ) {
        let mut settings: Vec<(String, String)> = vec![("url".to_owned(), url.clone())];
        for (setting, (choice, junk, encode)) in pool_core::settings::SETTINGS.iter().zip(values) {
            let typical = setting.env.map_or(setting.default, typical_value);
            let value = match choice {
                0 => continue,
                1 => junk,
                2 => typical.to_owned(),
                3 if encode => percent_encode(&password),
                3 => password.clone(),
                4 => {
                    settings.push((password.clone(), "1".to_owned()));
                    continue;
                }
                _ => format!("{typical} {junk}"),
            };
            settings.push((setting.name.to_owned(), value));
        }
        match PoolConfig::from_settings(settings.clone()) {
            Ok(c) => assert_hidden(&format!("{c:?}"), &password, &format!("{settings:?}"))?,
            Err(e) => assert_hidden(&format!("{e} {e:?}"), &password, &format!("{settings:?}"))?,
        }
    }

    /// Any text as a variable's value: no panic, and an error names the variable.
    #[test]
    fn any_variable_value_is_read_or_refused_by_name(
        index in 1..24usize,
        value in "\\PC{0,20}|[0-9]{1,25}[ a-zA-Z.,]{0,3}",
    ) {
        let Some(var) = env_vars().nth(index) else { return Ok(()) };
        let lookup = |k: &str| match k {
            "DATABASE_URL" => Some("postgres://app:pw@db/app".to_owned()),
            k if k == var => Some(value.clone()),
            _ => None,
        };
        if let Err(e) = PoolConfig::from_lookup(lookup, None) {
            let shown = e.to_string();
            prop_assert!(shown.starts_with(var), "{var}={value:?}: {shown}");
        }
    }

    /// Any text as a duration: never panics; accepted ones are at most 365 days.
    #[test]
    fn any_text_parses_as_a_duration_or_says_why(s in "\\PC{0,12}|-?[0-9]{1,22} ?(ms|s|m|h|MS|x|\\.5s)?") {
        match parse_duration(&s) {
            Ok(d) => prop_assert!(d <= Duration::from_secs(365 * 24 * 3600), "{s:?} gave {d:?}"),
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
        let _ = s.parse::<SslMode>().map_err(|e| e.to_string());
    }

    /// Every duration the settings table shows parses back to itself.
    #[test]
    fn shown_durations_parse_back(ms in 0..=365u64 * 24 * 3600 * 1000) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&show_duration(d)), Ok(d));
    }

    /// A number with a unit is that many units.
    #[test]
    fn a_number_with_a_unit_is_that_many_units(n in 0..=8760u64, unit in 0..4usize, space in any::<bool>()) {
        let (suffix, secs) = [("ms", 0), ("s", 1), ("m", 60), ("h", 3600)][unit];
        let sep = if space { " " } else { "" };
        let expected = if unit == 0 { Duration::from_millis(n) } else { Duration::from_secs(n * secs) };
        let parsed = parse_duration(&format!("{n}{sep}{}", suffix.to_uppercase()));
        if expected <= Duration::from_secs(365 * 24 * 3600) {
            prop_assert_eq!(parsed, Ok(expected));
        } else {
            prop_assert!(parsed.is_err());
        }
    }
}

/// Pieces of text that matter to URLs, key/value pairs and quoting.
const PIECES: &[&str] = &[
    "postgres",
    "sqlite",
    "mysql",
    "file",
    "://",
    ":",
    "@",
    "/",
    "?",
    "#",
    "&",
    "=",
    "%",
    "%4",
    "%zz",
    ",",
    "[",
    "]",
    "'",
    "\"",
    "\\",
    " ",
    "\n",
    "password",
    "Some(",
    "-",
    "0",
    "9",
    "99999999999999999999",
    "ms",
    "h",
    ".db",
    ":memory:",
    "é",
    "☕",
    "\u{0}",
    "🦀",
    "pw",
    "u",
];

/// A value of the right kind for `var`, as a user would write it.
fn typical_value(var: &str) -> &'static str {
    match var {
        "DB_POOL_SIZE" | "DB_MAX_OVERFLOW" | "DB_KEEPALIVES_COUNT" => "3",
        "DB_POOL_PRE_PING" | "DB_LIVENESS_PROBE" | "DB_KEEPALIVES" => "on",
        "DB_SSLMODE" => "verify-full",
        "DB_SSLROOTCERT" => "/etc/ssl/root.pem",
        "DB_APPLICATION_NAME" | "DB_POOL_NAME" => "orders-api",
        _ => "30s",
    }
}
