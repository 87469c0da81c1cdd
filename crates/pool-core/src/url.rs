//! Database URLs: which backend, where, and the secret kept out of every printout.
//!
//! [`DatabaseUrl::parse`] accepts the forms Diesel users write: `postgres://` and
//! `postgresql://` (host-less URLs mean a Unix socket, as in libpq), `mysql://` and
//! `mariadb://`, and SQLite as `sqlite://path`, `sqlite:path`, `file:path`, `:memory:` or a
//! plain path ending in `.db`, `.sqlite` or `.sqlite3`. `Debug` and `Display` print only
//! [`DatabaseUrl::redacted`]; the text with the password is reachable only through
//! [`DatabaseUrl::expose_secret`], to hand to the driver.

use std::fmt;

use crate::error::ConfigError;
use crate::redact::{self, Scope, MASK};

/// The kind of database a URL points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Backend {
    /// PostgreSQL (`postgres://`, `postgresql://`).
    Postgres,
    /// SQLite (`sqlite://`, `sqlite:`, `file:`, `:memory:`, `*.db`, `*.sqlite`, `*.sqlite3`).
    Sqlite,
    /// MySQL or MariaDB (`mysql://`, `mariadb://`).
    Mysql,
}

impl Backend {
    /// The backend's name in lower case: `postgres`, `sqlite` or `mysql`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
            Backend::Mysql => "mysql",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated database URL. Prints (`Debug`, `Display`) only its redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// The text as given (trimmed), or for SQLite the form the driver accepts.
    raw: String,
    backend: Backend,
    redacted: String,
    host: Option<String>,
    port: Option<u16>,
    /// Query parameters, decoded, secrets included.
    query: Vec<(String, String)>,
    /// The user-info password, decoded.
    password: Option<String>,
}

impl DatabaseUrl {
    /// Parses and validates a database URL. Surrounding whitespace is ignored.
    ///
    /// PostgreSQL and MySQL URLs are checked with a URL parser: the port must be a number from
    /// 1 to 65535 (also a `port=` parameter), a password with `@ : / ? #` must be
    /// percent-encoded, and multi-host URLs (`postgres://h1,h2/db`) are rejected as not
    /// supported yet. A PostgreSQL URL without a host (`postgres:///db`,
    /// `postgres://user@/db?host=/run/postgresql`) is accepted: libpq reads it as a Unix socket.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] (with the URL redacted) for an empty or malformed URL,
    /// [`ConfigError::UnsupportedScheme`] for any other kind of URL.
    ///
    /// ```
    /// use pool_core::url::{Backend, DatabaseUrl};
    /// let url = DatabaseUrl::parse("postgres://app:hunter2@db.internal:6543/app")?;
    /// assert_eq!(url.backend(), Backend::Postgres);
    /// assert_eq!(url.port(), Some(6543));
    /// assert_eq!(url.to_string(), "postgres://app:***@db.internal:6543/app");
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ConfigError::InvalidUrl {
                url: String::new(),
                reason: "the URL is empty; give one such as \
                         postgres://user:password@host:5432/dbname or sqlite://app.db"
                    .into(),
            });
        }
        let scheme = redact::scheme_prefix_len(s).map(|n| s[..n].to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => parse_network(s, Backend::Postgres),
            Some("mysql" | "mariadb") => parse_network(s, Backend::Mysql),
            Some("sqlite" | "file") => parse_sqlite(s),
            _ if s == ":memory:" || has_sqlite_suffix(s) && !s.contains("://") => {
                Ok(Self::sqlite(s.to_owned()))
            }
            _ if !s.contains("://") && s.contains('=') => Err(ConfigError::InvalidUrl {
                url: redact::redact(s),
                reason: "keyword/value connection strings (host=... dbname=...) are not \
                         supported; write it as a URL: \
                         postgres://user:password@host:5432/dbname?sslmode=require"
                    .into(),
            }),
            _ => Err(ConfigError::UnsupportedScheme {
                scheme: scheme
                    .filter(|sch| s[sch.len() + 1..].starts_with("//"))
                    .unwrap_or_default(),
            }),
        }
    }

    /// The kind of database.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The exact text to hand to the driver, password included. Never log it.
    ///
    /// For PostgreSQL and MySQL it is the URL as given. For SQLite it is what Diesel's
    /// `SqliteConnection::establish` opens: `sqlite://app.db` and `sqlite:app.db` become
    /// `app.db`, `sqlite://:memory:` becomes `:memory:`, and a path with `?` parameters
    /// becomes a SQLite URI (`sqlite://app.db?mode=ro` gives `file:app.db?mode=ro`) so the
    /// parameters are honoured rather than taken as part of the file name.
    pub fn expose_secret(&self) -> &str {
        &self.raw
    }

    /// The URL with its password (user info and `password=`-like parameters) replaced by
    /// `***`. The rest is kept exactly as written.
    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }

    /// The host: the URL's (percent-decoded, IPv6 without brackets) or else its `host=`
    /// parameter (a socket directory for PostgreSQL). `None` for SQLite and host-less URLs.
    pub fn host(&self) -> Option<String> {
        self.host.clone()
    }

    /// The port: the URL's or else its `port=` parameter. `None` when not given (the driver's
    /// default applies) and for SQLite.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The query parameters, decoded, in order (PostgreSQL and MySQL; empty for SQLite).
    /// Values of secret-named keys (`password`, `sslpassword`, ...) are replaced by `***`:
    /// these pairs are for inspection and display; [`expose_secret`](Self::expose_secret) is
    /// what the driver gets.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .iter()
            .map(|(k, v)| {
                let v = if redact::is_secret_key(k) {
                    MASK.to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// The user-info password, decoded, to mask it wherever else it shows up.
    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    fn sqlite(raw: String) -> Self {
        DatabaseUrl {
            redacted: redact::redact_url(&raw, Scope::Whole),
            raw,
            backend: Backend::Sqlite,
            host: None,
            port: None,
            query: Vec::new(),
            password: None,
        }
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        DatabaseUrl::parse(s)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl").field(&self.redacted).finish()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

fn has_sqlite_suffix(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    [".db", ".sqlite", ".sqlite3"]
        .iter()
        .any(|suffix| lower.ends_with(suffix))
}

fn parse_sqlite(s: &str) -> Result<DatabaseUrl, ConfigError> {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("file:") {
        // Already a SQLite URI; Diesel opens connections with SQLITE_OPEN_URI.
        return Ok(DatabaseUrl::sqlite(s.to_owned()));
    }
    let path = if lower.starts_with("sqlite://") {
        &s["sqlite://".len()..]
    } else {
        &s["sqlite:".len()..]
    };
    if path.is_empty() {
        return Err(ConfigError::InvalidUrl {
            url: redact::redact_url(s, Scope::Whole),
            reason: "no database file is given; write sqlite://app.db, sqlite:///abs/path.db \
                     or sqlite://:memory:"
                .into(),
        });
    }
    let raw = if path.contains('?') && path != ":memory:" {
        format!("file:{path}")
    } else {
        path.to_owned()
    };
    Ok(DatabaseUrl::sqlite(raw))
}

fn invalid(s: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidUrl {
        url: redact::redact_url(s, Scope::Whole),
        reason: reason.into(),
    }
}

/// PostgreSQL and MySQL: validated with the `url` crate.
fn parse_network(s: &str, backend: Backend) -> Result<DatabaseUrl, ConfigError> {
    let Some(sep) = s.find("://") else {
        return Err(invalid(
            s,
            format!(
                "expected {}://user:password@host:port/dbname",
                if backend == Backend::Postgres {
                    "postgres"
                } else {
                    "mysql"
                }
            ),
        ));
    };
    let after = &s[sep + 3..];
    let authority = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
    let (userinfo_len, host_port) = match authority.rfind('@') {
        Some(at) => (Some(at), &authority[at + 1..]),
        None => (None, authority),
    };
    if host_port.contains(',') {
        return Err(multi_host(s));
    }
    // The `url` crate rejects user info without a host; libpq reads it as a Unix socket.
    // Parse a copy with a placeholder host, and remember there was none.
    let host_less = host_port.is_empty() || host_port.starts_with(':');
    let parse_text = match userinfo_len {
        Some(at) if host_less => {
            let insert_at = sep + 3 + at + 1;
            format!("{}localhost{}", &s[..insert_at], &s[insert_at..])
        }
        _ => s.to_owned(),
    };
    let parsed = ::url::Url::parse(&parse_text).map_err(|e| {
        let reason = match e {
            ::url::ParseError::InvalidPort if after.contains('@') && userinfo_len.is_none() => {
                "the part after the host is not a port number; if the password contains any of \
                 @ : / ? # % percent-encode them (@ as %40, / as %2F, ? as %3F, # as %23)"
                    .to_owned()
            }
            ::url::ParseError::InvalidPort => {
                "the port is not a number from 1 to 65535".to_owned()
            }
            other => format!("{other}; check the URL's syntax (and percent-encode special characters in the password)"),
        };
        invalid(s, reason)
    })?;
    let query: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |key: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if param("host").is_some_and(|h| h.contains(',')) {
        return Err(multi_host(s));
    }
    let port = match (parsed.port(), param("port")) {
        (Some(0), _) => return Err(invalid(s, "port 0 is not a port; use e.g. 5432")),
        (Some(p), _) => Some(p),
        (None, Some(p)) => match p.trim().parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                return Err(invalid(
                    s,
                    format!("port={p:?} is not a number from 1 to 65535"),
                ))
            }
        },
        (None, None) => None,
    };
    let host = if host_less {
        None
    } else {
        match parsed.host() {
            Some(::url::Host::Ipv6(addr)) => Some(addr.to_string()),
            Some(::url::Host::Ipv4(addr)) => Some(addr.to_string()),
            Some(::url::Host::Domain(d)) if !d.is_empty() => Some(percent_decode(d)),
            _ => None,
        }
    }
    .or_else(|| param("host").filter(|h| !h.is_empty()).map(str::to_owned));
    Ok(DatabaseUrl {
        raw: s.to_owned(),
        backend,
        redacted: redact::redact_url(s, Scope::Authority),
        host,
        port,
        query,
        password: parsed.password().map(percent_decode),
    })
}

fn multi_host(s: &str) -> ConfigError {
    invalid(
        s,
        "multi-host URLs (host1,host2) are not supported yet; give a single host, e.g. the \
         primary's or a pooler's address",
    )
}

/// Decodes `%XX` escapes (e.g. a Unix socket directory written as `%2Fvar%2Frun%2Fpostgresql`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                // Both digits are below 16, so the byte fits.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> DatabaseUrl {
        match DatabaseUrl::parse(s) {
            Ok(u) => u,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn reason(s: &str) -> String {
        match DatabaseUrl::parse(s) {
            Ok(u) => panic!("{s:?} should be rejected, parsed as {u:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn postgres_urls_give_backend_host_port_and_parameters() {
        let u = parse("postgresql://app:pw@DB.example.com:6543/app?sslmode=require");
        assert_eq!(u.backend(), Backend::Postgres);
        assert_eq!(u.host().as_deref(), Some("DB.example.com"));
        assert_eq!(u.port(), Some(6543));
        assert_eq!(u.query_pairs(), vec![("sslmode".into(), "require".into())]);
        assert_eq!(
            u.expose_secret(),
            "postgresql://app:pw@DB.example.com:6543/app?sslmode=require"
        );
        assert_eq!(
            parse("  postgres://h/db \n").expose_secret(),
            "postgres://h/db"
        );
        assert_eq!(parse("POSTGRES://h/db").backend(), Backend::Postgres);
        assert_eq!(
            parse("postgres://[::1]:5433/db").host().as_deref(),
            Some("::1")
        );
    }

    #[test]
    fn host_less_postgres_urls_mean_a_unix_socket() {
        let u = parse("postgres:///app?host=/var/run/postgresql&port=5433");
        assert_eq!(u.host().as_deref(), Some("/var/run/postgresql"));
        assert_eq!(u.port(), Some(5433));
        let u = parse("postgres://app:pw@/app");
        assert_eq!(u.host(), None);
        assert_eq!(u.expose_secret(), "postgres://app:pw@/app");
        assert_eq!(u.redacted(), "postgres://app:***@/app");
        let u = parse("postgres://%2Fvar%2Frun%2Fpostgresql/app");
        assert_eq!(u.host().as_deref(), Some("/var/run/postgresql"));
    }

    #[test]
    fn ports_must_be_numbers_from_1_to_65535() {
        assert!(reason("postgres://h:abc/db").contains("port"));
        assert!(reason("postgres://h:99999/db").contains("port"));
        assert!(reason("postgres://h:0/db").contains("port 0"));
        assert!(reason("postgres://h/db?port=x").contains("port"));
    }

    #[test]
    fn an_unencoded_password_gets_advice_and_stays_hidden() {
        let msg = reason("postgres://app:pa/ss S3NT1NEL@db/app");
        assert!(msg.contains("percent-encode"), "{msg}");
        assert!(!msg.contains("S3NT1NEL"), "{msg}");
    }

    #[test]
    fn multi_host_urls_are_refused_clearly() {
        assert!(reason("postgres://h1,h2/db").contains("multi-host"));
        assert!(reason("postgres://u:pw@h1:5432,h2:5433/db").contains("multi-host"));
        assert!(reason("postgres:///db?host=h1,h2").contains("multi-host"));
    }

    #[test]
    fn mysql_and_mariadb_urls_are_mysql() {
        assert_eq!(
            parse("mysql://root:pw@localhost/app").backend(),
            Backend::Mysql
        );
        assert_eq!(parse("mariadb://root@db:3307/app").port(), Some(3307));
    }

    #[test]
    fn sqlite_forms_become_what_diesel_opens() {
        for (given, driver) in [
            ("sqlite://app.db", "app.db"),
            ("sqlite:///var/lib/app.db", "/var/lib/app.db"),
            ("sqlite:app.db", "app.db"),
            ("sqlite://:memory:", ":memory:"),
            ("sqlite::memory:", ":memory:"),
            ("sqlite://app.db?mode=ro", "file:app.db?mode=ro"),
            ("file:app.db?mode=ro", "file:app.db?mode=ro"),
            (":memory:", ":memory:"),
            ("data/app.sqlite3", "data/app.sqlite3"),
            ("/abs/App.DB", "/abs/App.DB"),
            ("./x.sqlite", "./x.sqlite"),
        ] {
            let u = parse(given);
            assert_eq!(u.backend(), Backend::Sqlite, "{given}");
            assert_eq!(u.expose_secret(), driver, "{given}");
            assert_eq!(u.host(), None);
            assert!(u.query_pairs().is_empty());
        }
        assert!(reason("sqlite://").contains("no database file"));
    }

    #[test]
    fn other_schemes_and_empty_urls_are_refused() {
        assert!(matches!(
            DatabaseUrl::parse("redis://u:pw@h/0"),
            Err(ConfigError::UnsupportedScheme { scheme }) if scheme == "redis"
        ));
        assert!(matches!(
            DatabaseUrl::parse("hunter2:S3NT1NEL"),
            Err(ConfigError::UnsupportedScheme { scheme }) if scheme.is_empty()
        ));
        assert!(matches!(
            DatabaseUrl::parse("app.txt"),
            Err(ConfigError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            DatabaseUrl::parse("   "),
            Err(ConfigError::InvalidUrl { .. })
        ));
        assert!(reason("host=db password=S3NT1NEL").contains("keyword/value"));
        assert!(!reason("host=db password=S3NT1NEL").contains("S3NT1NEL"));
        assert!(reason("postgres:u:S3NT1NEL@h").contains("postgres://"));
        assert!(!reason("postgres:u:S3NT1NEL@h").contains("S3NT1NEL"));
    }

    #[test]
    fn printing_a_url_never_shows_the_password() {
        let u = parse("postgres://app:S3NT1NEL@db/app?sslpassword=S3NT1NEL&sslmode=verify-full");
        for shown in [format!("{u}"), format!("{u:?}"), u.redacted()] {
            assert!(!shown.contains("S3NT1NEL"), "{shown}");
            assert!(shown.contains("app:***@db/app"), "{shown}");
        }
        assert_eq!(
            u.query_pairs(),
            vec![
                ("sslpassword".into(), "***".into()),
                ("sslmode".into(), "verify-full".into())
            ]
        );
        let u = parse("postgres://app:S3NT1NEL@db/app?options=-c%20x=a@b");
        assert_eq!(u.redacted(), "postgres://app:***@db/app?options=-c%20x=a@b");
    }
}
