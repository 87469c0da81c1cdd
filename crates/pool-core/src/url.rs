//! Database URLs: which backend, where, and the secret kept out of every printout.
//!
//! [`DatabaseUrl::parse`] accepts the forms Diesel users write: `postgres://` and
//! `postgresql://` (host-less URLs mean a Unix socket, as in libpq; multi-host lists as libpq
//! takes them), `mysql://` and `mariadb://`, and SQLite as `sqlite://path`, `sqlite:path`,
//! `file:path`, `:memory:` or a plain path ending in `.db`, `.sqlite` or `.sqlite3`. `Debug`
//! and `Display` print only [`DatabaseUrl::redacted`]; the text with the password is reachable
//! only through [`DatabaseUrl::expose_secret`], to hand to the driver.
//!
//! # The rule: one reading of every URL
//!
//! libpq splits `postgres://app:p@ss@host/db` at the *first* `@` (its password is `p`, its host
//! `ss@host`, and its error quotes that host); URL parsers split at the *last*. A URL that two
//! parsers could read differently leaks pieces of its password through the driver's errors, so
//! PostgreSQL and MySQL URLs are refused ([`ConfigError::InvalidUrl`], saying what to
//! percent-encode, the URL redacted) when they contain:
//! - a space or other whitespace, or a control character, anywhere (libpq quotes the text
//!   around a space);
//! - a `%` not followed by two hex digits, or `%00`, anywhere;
//! - a raw `#` anywhere (libpq has no fragments; URL parsers cut the URL there);
//! - more than one raw `@`, or an `@` with a `/` or `?` before it: the only raw `@` is the one
//!   ending the user info (tokio-postgres even takes the first `@` anywhere in the URL for it).
//!   A password with a raw `@`, `/`, `?` or `#` always breaks one of these, as the user info's
//!   `@` follows it;
//! - PostgreSQL only: a scheme other than exactly `postgres://` or `postgresql://` (libpq's
//!   test is case-sensitive, and it would read `POSTGRES://...` as a keyword/value string and
//!   quote it whole), and a query parameter that is not `key=value` with exactly one `=` and a
//!   non-empty key (libpq refuses those).
//!
//! In the user info, `:` in the password is fine (every parser ends the user name at the first
//! `:`), and so are `& = ' " \ , ;` and non-ASCII characters, raw or percent-encoded: libpq
//! decodes `%XX` to bytes and takes other bytes as they are (in a `password=` parameter, `&`
//! and `=` must be encoded too). A `%` followed by two hex digits is always read as an escape,
//! by every parser alike: a password holding `%41` must be written `%2541`.

use std::fmt;

use crate::error::ConfigError;
use crate::redact::{self, Redactor, Scope, MASK};

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

/// One host a PostgreSQL URL names, as libpq pairs its `host`, `hostaddr` and `port` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostSpec {
    /// The host name or IP address (IPv6 without brackets), or a Unix socket directory (it
    /// starts with `/`, or `@` for an abstract socket), percent-decoded. `None`: libpq's
    /// default (its socket directory), or only `hostaddr` is given.
    pub host: Option<String>,
    /// The numeric address to connect to instead of resolving `host` (`hostaddr=`).
    pub hostaddr: Option<String>,
    /// The port; `None` for the driver's default (5432).
    pub port: Option<u16>,
}

impl HostSpec {
    /// Whether libpq connects to this host through a Unix socket: no `hostaddr`, and a host
    /// that is a socket directory or not given at all (libpq's default is its socket
    /// directory).
    pub fn is_unix_socket(&self) -> bool {
        self.hostaddr.is_none()
            && self
                .host
                .as_deref()
                .is_none_or(|h| h.starts_with('/') || h.starts_with('@'))
    }
}

/// A validated database URL. Prints (`Debug`, `Display`) only its redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// The text as given (trimmed), or for SQLite the form the driver accepts.
    raw: String,
    backend: Backend,
    redacted: String,
    /// The hosts, in libpq's order (one for MySQL, none for SQLite).
    hosts: Vec<HostSpec>,
    /// Query parameters, decoded, secrets included.
    query: Vec<(String, String)>,
    /// Masks the password and secret parameters, in every form.
    redactor: Redactor,
}

impl DatabaseUrl {
    /// Parses and validates a database URL. Surrounding whitespace is ignored.
    ///
    /// PostgreSQL and MySQL URLs must follow the [module's rule](self#the-rule-one-reading-of-every-url):
    /// no URL is accepted that libpq and a URL parser could split differently. Ports must be
    /// numbers from 1 to 65535 (also in `port=`). PostgreSQL URLs are split exactly as libpq
    /// splits them, multi-host lists included (`postgres://h1:5433,h2:5434/db`,
    /// `?host=h1,h2&port=5433,5434`, `hostaddr=` lists, `[::1]` literals; see
    /// [`hosts`](Self::hosts)); a URL without a host (`postgres:///db`,
    /// `postgres://user@/db?host=/run/postgresql`) means a Unix socket, as in libpq.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] (with the URL redacted, so that no part of the password
    /// shows) for an empty or malformed URL, [`ConfigError::UnsupportedScheme`] for any other
    /// kind of URL.
    ///
    /// ```
    /// use pool_core::url::{Backend, DatabaseUrl};
    /// let url = DatabaseUrl::parse("postgres://app:hunter2@db.internal:6543/app")?;
    /// assert_eq!(url.backend(), Backend::Postgres);
    /// assert_eq!(url.port(), Some(6543));
    /// assert_eq!(url.to_string(), "postgres://app:***@db.internal:6543/app");
    ///
    /// let err = DatabaseUrl::parse("postgres://app:p@ssw0rd@db.internal/app").unwrap_err();
    /// assert!(err.to_string().contains("@ as %40"));
    /// assert!(!err.to_string().contains("ssw0rd"));
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

    /// The first host: its name, address or socket directory (percent-decoded, IPv6 without
    /// brackets), else its `hostaddr`. As libpq reads it, a `host=` parameter replaces the
    /// URL's hosts. `None` for SQLite and URLs without a host (libpq's default socket).
    pub fn host(&self) -> Option<String> {
        let first = self.hosts.first()?;
        first.host.clone().or_else(|| first.hostaddr.clone())
    }

    /// The first host's port: the URL's or, replacing it as in libpq, its `port=` parameter.
    /// `None` when not given (the driver's default applies) and for SQLite.
    pub fn port(&self) -> Option<u16> {
        self.hosts.first().and_then(|h| h.port)
    }

    /// Every host, in the order libpq tries them (one for MySQL, none for SQLite).
    ///
    /// As libpq pairs them: the `host` list (the URL's, or a `host=` parameter, which replaces
    /// it) and the `hostaddr=` list have the same length when both are given; a `port` list
    /// (the URL's or `port=`) has one entry for all hosts or one per host. Empty entries are
    /// libpq's defaults (`None`).
    ///
    /// ```
    /// use pool_core::url::DatabaseUrl;
    /// let url = DatabaseUrl::parse("postgres://app:pw@db1:5433,[::1]:5434/app")?;
    /// let hosts = url.hosts();
    /// assert_eq!(hosts.len(), 2);
    /// assert_eq!(hosts[1].host.as_deref(), Some("::1"));
    /// assert_eq!(hosts[1].port, Some(5434));
    /// let url = DatabaseUrl::parse("postgres:///app?host=h1,h2&port=6432")?;
    /// assert!(url.hosts().iter().all(|h| h.port == Some(6432)));
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    pub fn hosts(&self) -> Vec<HostSpec> {
        self.hosts.clone()
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

    /// A [`Redactor`] that knows this URL's secrets: the user-info password and the values of
    /// secret-named parameters (`password=`, `sslpassword=`, ...), each as written and
    /// decoded. Apply it to every driver message before it is shown.
    ///
    /// ```
    /// use pool_core::url::DatabaseUrl;
    /// let url = DatabaseUrl::parse("postgres://app:s3cr%40t-Pw@db/app")?;
    /// assert_eq!(
    ///     url.redactor().redact("auth failed for s3cr@t-Pw (s3cr%40t-Pw)"),
    ///     "auth failed for *** (***)"
    /// );
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The same URL with `password` in place of its password: for a connect function that
    /// fetches a short-lived credential for every new connection (an RDS IAM token, a
    /// Vault lease) and keeps everything else the pool put in the URL.
    ///
    /// `password` is taken as is and percent-encoded here (any character may appear). It
    /// replaces a `password=` parameter where the URL has one (libpq lets it win over the
    /// user info), else the user info's password, which is added when the URL has none. The
    /// result is parsed again, so its [`redactor`](Self::redactor) masks the new password.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] for a SQLite URL (it has no password), and whatever
    /// [`parse`](Self::parse) refuses in the result (with the password masked).
    ///
    /// ```
    /// use pool_core::url::DatabaseUrl;
    /// let url = DatabaseUrl::parse("postgres://app:old@db.internal/app?keepalives=1")?;
    /// let fresh = url.with_password("t0ken/with:@&=")?;
    /// assert_eq!(
    ///     fresh.expose_secret(),
    ///     "postgres://app:t0ken%2Fwith%3A%40%26%3D@db.internal/app?keepalives=1"
    /// );
    /// assert_eq!(fresh.to_string(), "postgres://app:***@db.internal/app?keepalives=1");
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    pub fn with_password(&self, password: &str) -> Result<DatabaseUrl, ConfigError> {
        if self.backend == Backend::Sqlite {
            return Err(ConfigError::InvalidUrl {
                url: self.redacted(),
                reason: "a SQLite URL has no password to replace".into(),
            });
        }
        let raw = &self.raw;
        let encoded = redact::percent_encode(password);
        let (base, query) = match raw.find('?') {
            Some(q) => (&raw[..q], Some(&raw[q + 1..])),
            None => (raw.as_str(), None),
        };
        let mut replaced_param = false;
        let query = query.map(|query| {
            query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => {
                        replaced_param = true;
                        format!("password={encoded}")
                    }
                    _ => pair.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        let base = if replaced_param {
            base.to_owned()
        } else {
            let start = raw.find("://").map_or(0, |sep| sep + 3);
            match user_info_end(&base[start..]).map_err(|reason| invalid(raw, reason))? {
                Some(at) => {
                    let user_info = &base[start..start + at];
                    let user = user_info
                        .split_once(':')
                        .map_or(user_info, |(user, _)| user);
                    format!("{}{user}:{encoded}{}", &base[..start], &base[start + at..])
                }
                None => format!("{}:{encoded}@{}", &base[..start], &base[start..]),
            }
        };
        let url = match query {
            Some(query) => format!("{base}?{query}"),
            None => base,
        };
        DatabaseUrl::parse(&url)
    }

    fn sqlite(raw: String) -> Self {
        DatabaseUrl {
            redacted: redact::redact_url(&raw, Scope::Whole),
            raw,
            backend: Backend::Sqlite,
            hosts: Vec::new(),
            query: Vec::new(),
            redactor: Redactor::new(),
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

/// What to percent-encode, said in every refusal that a special character can cause.
const ENCODE: &str = "percent-encode them in the password (and anywhere else in the URL): \
                      @ as %40, / as %2F, ? as %3F, # as %23, space as %20, % as %25";

/// PostgreSQL and MySQL: the checks of the module's rule, then the URL split as the driver
/// splits it.
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
    check_characters(s).map_err(|reason| invalid(s, reason))?;
    let at = user_info_end(&s[sep + 3..]).map_err(|reason| invalid(s, reason))?;
    match backend {
        Backend::Postgres => {
            let scheme = &s[..sep];
            if scheme != "postgres" && scheme != "postgresql" {
                return Err(invalid(
                    s,
                    "write the scheme in lower case, postgres:// or postgresql://: libpq does not \
                     recognise any other spelling and would read the whole URL, password \
                     included, as a keyword/value string",
                ));
            }
            parse_postgres(s, sep + 3, at)
        }
        _ => parse_mysql(s, sep, at),
    }
}

/// Whitespace, control characters, `%` without two hex digits, `%00` and `#`: refused
/// anywhere in the URL.
fn check_characters(s: &str) -> Result<(), String> {
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the URL contains a space, tab, line break or other control character; drivers \
             cut the URL there differently, and libpq quotes the text around it in its error; \
             {ENCODE}"
        ));
    }
    let b = s.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    for (i, _) in s.match_indices('%') {
        if !(hex(i + 1) && hex(i + 2)) {
            return Err(format!(
                "a % is not followed by two hex digits, so it is not a percent-encoded \
                 character; a % in the password must be written %25; {ENCODE}"
            ));
        }
        if &b[i + 1..i + 3] == b"00" {
            return Err("%00 (a NUL byte) cannot be part of a database URL".to_owned());
        }
    }
    if s.contains('#') {
        return Err(format!(
            "the URL contains a raw #: libpq has no URL fragments and takes it as part of the \
             password, database name or a parameter, while URL parsers cut the URL there; \
             {ENCODE}"
        ));
    }
    Ok(())
}

/// The position of the `@` ending the user info in `rest` (what follows `scheme://`), if any:
/// the URL may hold one raw `@`, and no `/` or `?` may come before it.
fn user_info_end(rest: &str) -> Result<Option<usize>, String> {
    let mut ats = rest.match_indices('@').map(|(i, _)| i);
    let Some(at) = ats.next() else {
        return Ok(None);
    };
    if ats.next().is_some() {
        return Err(format!(
            "the URL has more than one @; only the @ ending the user name and password may be \
             written as is, and libpq splits at the first @ where URL parsers split at the last \
             (quoting the rest of the password as a host name); {ENCODE}"
        ));
    }
    if rest[..at].contains(['/', '?']) {
        return Err(format!(
            "the URL has an @ after a / or ?: a password with / or ? in it makes libpq and URL \
             parsers disagree on where the host is; {ENCODE} (an @ in a database name or a \
             parameter also as %40)"
        ));
    }
    Ok(Some(at))
}

/// PostgreSQL, split exactly as libpq splits it (`conninfo_uri_parse_options`).
fn parse_postgres(s: &str, start: usize, at: Option<usize>) -> Result<DatabaseUrl, ConfigError> {
    let r = &s[start..];
    let mut masked_spans = Vec::new();
    let mut redactor = Redactor::new();
    let rest = match at {
        Some(at) => {
            if let Some(colon) = r[..at].find(':') {
                let written = &r[colon + 1..at];
                masked_spans.push((start + colon + 1, start + at));
                let decoded = percent_decode(written);
                redactor.add(written);
                redactor.add(&decoded);
            }
            &r[at + 1..]
        }
        None => r,
    };
    let netloc_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (host_list, port_list) =
        split_netloc(&rest[..netloc_end]).map_err(|reason| invalid(s, reason))?;
    let tail = &rest[netloc_end..];
    let query_text = tail.find('?').map(|q| &tail[q + 1..]);
    let mut query = Vec::new();
    if let Some(q) = query_text {
        let mut offset = s.len() - q.len();
        let pieces: Vec<&str> = q.split('&').collect();
        for (k, piece) in pieces.iter().enumerate() {
            if piece.is_empty() && k + 1 == pieces.len() {
                break; // `?` alone or a trailing `&`: libpq accepts both.
            }
            let reason = match piece.matches('=').count() {
                0 => Some(
                    "a query parameter is not written key=value (libpq refuses it); write & \
                     inside a value as %26",
                ),
                1 if piece.starts_with('=') => Some("a query parameter has an empty name"),
                1 => None,
                _ => Some(
                    "a query parameter has more than one = (libpq refuses it); write = inside a \
                     value as %3D",
                ),
            };
            if let Some(reason) = reason {
                return Err(invalid(s, reason));
            }
            let eq = piece.find('=').unwrap_or(piece.len());
            let key = percent_decode(&piece[..eq]);
            let value_written = piece.get(eq + 1..).unwrap_or("");
            let value = percent_decode(value_written);
            if redact::is_secret_key(&key) {
                masked_spans.push((offset + eq + 1, offset + piece.len()));
                redactor.add(value_written);
                redactor.add(&value);
            }
            query.push((key, value));
            offset += piece.len() + 1;
        }
    }
    let param = |key: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let host =
        param("host").or_else(|| (!host_list.is_empty()).then(|| percent_decode(&host_list)));
    let port =
        param("port").or_else(|| (!port_list.is_empty()).then(|| percent_decode(&port_list)));
    let hosts = pair_hosts(
        host.as_deref(),
        param("hostaddr").as_deref(),
        port.as_deref(),
    )
    .map_err(|reason| invalid(s, reason))?;
    Ok(DatabaseUrl {
        raw: s.to_owned(),
        backend: Backend::Postgres,
        redacted: redact::redact_url(&mask_spans(s, &mut masked_spans), Scope::Authority),
        hosts,
        query,
        redactor,
    })
}

/// `s` with each byte span replaced by [`MASK`].
fn mask_spans(s: &str, spans: &mut [(usize, usize)]) -> String {
    spans.sort_unstable();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    for &mut (start, end) in spans {
        if start < copied || !s.is_char_boundary(start) || !s.is_char_boundary(end) {
            continue;
        }
        out.push_str(&s[copied..start]);
        out.push_str(MASK);
        copied = end;
    }
    out.push_str(&s[copied..]);
    out
}

/// libpq's reading of `host1:port1,[v6]:port2,...` (still percent-encoded): the host list and
/// the port list, each comma-separated as libpq builds them (`"h1,h2"`, `"5433,"`).
fn split_netloc(netloc: &str) -> Result<(String, String), String> {
    let mut hosts = String::new();
    let mut ports = String::new();
    let mut rest = netloc;
    loop {
        let after = if let Some(inner) = rest.strip_prefix('[') {
            let Some(close) = inner.find(']') else {
                return Err("an IPv6 address is missing its closing ]".to_owned());
            };
            if close == 0 {
                return Err("an IPv6 address between [ and ] is empty".to_owned());
            }
            hosts.push_str(&inner[..close]);
            let after = &inner[close + 1..];
            if !(after.is_empty() || after.starts_with([':', ','])) {
                return Err(
                    "after an IPv6 address in [ ] only :port or a comma and the next host may \
                     follow"
                        .to_owned(),
                );
            }
            after
        } else {
            let end = rest.find([':', ',']).unwrap_or(rest.len());
            hosts.push_str(&rest[..end]);
            &rest[end..]
        };
        let after = match after.strip_prefix(':') {
            Some(port) => {
                let end = port.find(',').unwrap_or(port.len());
                ports.push_str(&port[..end]);
                &port[end..]
            }
            None => after,
        };
        match after.strip_prefix(',') {
            Some(next) => {
                hosts.push(',');
                ports.push(',');
                rest = next;
            }
            None => return Ok((hosts, ports)),
        }
    }
}

/// libpq's pairing of the `host`, `hostaddr` and `port` lists (`pqConnectOptions2`): as many
/// hosts as `hostaddr` entries (else `host` entries, else one); `host` and `hostaddr` lists of
/// the same length; one port for all hosts or one per host. Empty entries mean libpq's default.
fn pair_hosts(
    host: Option<&str>,
    hostaddr: Option<&str>,
    port: Option<&str>,
) -> Result<Vec<HostSpec>, String> {
    let list = |v: Option<&str>| {
        v.filter(|v| !v.is_empty())
            .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
    };
    let (hosts, addrs, ports) = (list(host), list(hostaddr), list(port));
    let n = match (&addrs, &hosts) {
        (Some(a), Some(h)) if a.len() != h.len() => {
            return Err(format!(
                "{} host names but {} hostaddr values; libpq pairs them in order, so give as \
                 many of each",
                h.len(),
                a.len()
            ))
        }
        (Some(a), _) => a.len(),
        (None, Some(h)) => h.len(),
        (None, None) => 1,
    };
    let ports = match ports {
        None => vec![None; n],
        Some(p) if p.len() == 1 || p.len() == n => {
            let parsed = p
                .iter()
                .map(|p| parse_port(p))
                .collect::<Result<Vec<_>, _>>()?;
            if parsed.len() == n {
                parsed
            } else {
                vec![parsed[0]; n]
            }
        }
        Some(p) => {
            return Err(format!(
                "{} ports for {n} hosts; give one port for all hosts or one per host",
                p.len()
            ))
        }
    };
    let entry = |l: &Option<Vec<String>>, i: usize| {
        l.as_ref()
            .and_then(|l| l.get(i))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(ports
        .into_iter()
        .enumerate()
        .map(|(i, port)| HostSpec {
            host: entry(&hosts, i),
            hostaddr: entry(&addrs, i),
            port,
        })
        .collect())
}

/// A port as libpq takes it: empty for the default, else a number from 1 to 65535. The value
/// is not quoted in the error: without its `@`, a password stands where the port belongs.
fn parse_port(p: &str) -> Result<Option<u16>, String> {
    if p.is_empty() {
        return Ok(None);
    }
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port; use e.g. 5432".to_owned()),
        Ok(port) if p.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(port)),
        _ => Err(bad_port()),
    }
}

fn bad_port() -> String {
    format!(
        "the port is not a number from 1 to 65535 (if the text after the host's : is the \
         password, the URL lacks the @ before the host, or special characters in the password \
         are not encoded: {ENCODE})"
    )
}

/// MySQL / MariaDB: split with the `url` crate, as Diesel's MySQL backend does. One host.
fn parse_mysql(s: &str, sep: usize, at: Option<usize>) -> Result<DatabaseUrl, ConfigError> {
    let after = &s[sep + 3..];
    let authority = &after[..after.find(['/', '?']).unwrap_or(after.len())];
    let host_port = match at {
        Some(at) => &after[at + 1..authority.len().max(at + 1)],
        None => authority,
    };
    if host_port.contains(',') {
        return Err(invalid(
            s,
            "MySQL URLs take a single host; give the primary's or a proxy's address",
        ));
    }
    // The `url` crate rejects user info without a host: parse a copy with a placeholder host.
    let host_less = host_port.is_empty() || host_port.starts_with(':');
    let parse_text = match at {
        Some(at) if host_less => {
            let insert_at = sep + 3 + at + 1;
            format!("{}localhost{}", &s[..insert_at], &s[insert_at..])
        }
        _ => s.to_owned(),
    };
    let parsed = ::url::Url::parse(&parse_text).map_err(|e| {
        let reason = match e {
            ::url::ParseError::InvalidPort => bad_port(),
            other => format!("{other}; check the URL's syntax ({ENCODE})"),
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
    let port = match parsed.port() {
        Some(0) => return Err(invalid(s, "port 0 is not a port; use e.g. 3306")),
        p => p,
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
    let mut redactor = Redactor::new();
    if let Some(written) = parsed.password() {
        redactor.add(written);
        redactor.add(&percent_decode(written));
    }
    if let Some(at) = at {
        // The password as written in the URL (the `url` crate re-encodes some characters).
        if let Some(colon) = after[..at].find(':') {
            redactor.add(&after[colon + 1..at]);
        }
    }
    for (k, v) in &query {
        if redact::is_secret_key(k) {
            redactor.add(v);
        }
    }
    // Each secret value as written too: the decoded one differs from it wherever the text
    // holds an escape that is not UTF-8 (`%ba`), and a message may quote either.
    if let Some(q) = after.find('?') {
        for piece in after[q + 1..].split('&') {
            let (key, written) = piece.split_once('=').unwrap_or((piece, ""));
            if redact::is_secret_key(&percent_decode(key)) {
                redactor.add(written);
            }
        }
    }
    Ok(DatabaseUrl {
        raw: s.to_owned(),
        backend: Backend::Mysql,
        redacted: redact::redact_url(s, Scope::Authority),
        hosts: vec![HostSpec {
            host,
            hostaddr: None,
            port,
        }],
        query,
        redactor,
    })
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

    #[test]
    fn with_password_replaces_the_user_infos_or_the_parameters_password_and_masks_the_new_one() {
        let sentinel = "p@ss:w/o%rd#?&='  ünï";
        let encoded = "p%40ss%3Aw%2Fo%25rd%23%3F%26%3D%27%20%20%C3%BCn%C3%AF";
        for (given, expected) in [
            (
                "postgres://app:old@db:5432/app?sslmode=require",
                format!("postgres://app:{encoded}@db:5432/app?sslmode=require"),
            ),
            (
                "postgres://app@h1:5433,h2:5434/app",
                format!("postgres://app:{encoded}@h1:5433,h2:5434/app"),
            ),
            ("postgres://db/app", format!("postgres://:{encoded}@db/app")),
            (
                "postgres://app:old@db/app?password=older&keepalives=1",
                format!("postgres://app:old@db/app?password={encoded}&keepalives=1"),
            ),
            (
                "mysql://app:old@db/app",
                format!("mysql://app:{encoded}@db/app"),
            ),
        ] {
            let fresh = DatabaseUrl::parse(given)
                .unwrap()
                .with_password(sentinel)
                .unwrap();
            assert_eq!(fresh.expose_secret(), expected);
            let shown = format!("{fresh} {fresh:?}");
            assert!(
                !shown.contains(encoded) && !shown.contains("p@ss"),
                "{shown}"
            );
            assert_eq!(
                fresh
                    .redactor()
                    .redact(&format!("x {sentinel} {encoded} y")),
                "x *** *** y"
            );
        }
        let err = DatabaseUrl::parse("sqlite://app.db")
            .unwrap()
            .with_password("x")
            .unwrap_err();
        assert!(err.to_string().contains("no password"), "{err}");
    }

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
        assert!(reason("POSTGRES://u:pw@h/db").contains("lower case"));
        assert!(reason("Postgresql://h/db").contains("lower case"));
        assert_eq!(parse("MySQL://h/db").backend(), Backend::Mysql);
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

    fn host(host: Option<&str>, hostaddr: Option<&str>, port: Option<u16>) -> HostSpec {
        HostSpec {
            host: host.map(str::to_owned),
            hostaddr: hostaddr.map(str::to_owned),
            port,
        }
    }

    #[test]
    fn multi_host_urls_are_read_as_libpq_reads_them() {
        let u = parse("postgres://u:pw@h1:5433,h2:5434/db");
        assert_eq!(
            u.hosts(),
            vec![
                host(Some("h1"), None, Some(5433)),
                host(Some("h2"), None, Some(5434))
            ]
        );
        assert_eq!((u.host().as_deref(), u.port()), (Some("h1"), Some(5433)));
        assert_eq!(u.redacted(), "postgres://u:***@h1:5433,h2:5434/db");
        // One port for all hosts, or one per host; a missing one is the default.
        let u = parse("postgres://h1,h2/db?port=5433,5434");
        assert_eq!(u.hosts()[1], host(Some("h2"), None, Some(5434)));
        let u = parse("postgres://h1,h2,h3/db?port=6432");
        assert!(u.hosts().iter().all(|h| h.port == Some(6432)));
        let u = parse("postgres://h1:5433,h2/db");
        assert_eq!(u.hosts()[1], host(Some("h2"), None, None));
        // host= replaces the URL's hosts, as in libpq.
        let u = parse("postgres:///db?host=h1,h2");
        assert_eq!(u.hosts().len(), 2);
        let u = parse("postgres://ignored:1/db?host=/run/pg,h2&port=5432");
        assert_eq!(
            u.hosts(),
            vec![
                host(Some("/run/pg"), None, Some(5432)),
                host(Some("h2"), None, Some(5432))
            ]
        );
        assert!(u.hosts()[0].is_unix_socket() && !u.hosts()[1].is_unix_socket());
        // hostaddr lists: paired with host names, or alone.
        let u = parse("postgres://h1,h2/db?hostaddr=10.0.0.1,10.0.0.2");
        assert_eq!(u.hosts()[1], host(Some("h2"), Some("10.0.0.2"), None));
        let u = parse("postgres:///db?hostaddr=10.0.0.1,::1&port=1,2");
        assert_eq!(u.hosts()[1], host(None, Some("::1"), Some(2)));
        assert_eq!(u.host().as_deref(), Some("10.0.0.1"));
        assert!(!u.hosts()[0].is_unix_socket());
        // IPv6 literals in lists, empty entries (libpq's default host).
        let u = parse("postgres://[::1]:5433,[fe80::1%25eth0],h3:5435/db");
        assert_eq!(
            u.hosts(),
            vec![
                host(Some("::1"), None, Some(5433)),
                host(Some("fe80::1%eth0"), None, None),
                host(Some("h3"), None, Some(5435))
            ]
        );
        let u = parse("postgres://,h2/db");
        assert_eq!(u.hosts()[0], host(None, None, None));
        assert!(u.hosts()[0].is_unix_socket());
        // libpq decodes the list before splitting it.
        assert_eq!(parse("postgres://h1%2Ch2/db").hosts().len(), 2);
        // The pairing rules.
        assert!(reason("postgres://h1,h2,h3/db?port=1,2").contains("2 ports for 3 hosts"));
        assert!(reason("postgres://h1,h2/db?hostaddr=10.0.0.1").contains("hostaddr"));
        assert!(reason("postgres://h1:5432,h2:x/db").contains("port"));
        assert!(reason("postgres://[::1/db").contains("]"));
        assert!(reason("postgres://[]/db").contains("empty"));
        assert!(reason("postgres://[::1]x/db").contains("IPv6"));
        assert!(reason("mysql://h1,h2/db").contains("single host"));
    }

    const ENCODE_ADVICE: [&str; 6] = [
        "@ as %40",
        "/ as %2F",
        "? as %3F",
        "# as %23",
        "space as %20",
        "% as %25",
    ];

    /// The URL is refused, its reason gives the percent-encoding advice, and no piece of
    /// `password` (4 characters or more) shows in the error's `Display` or `Debug`.
    fn refused_hiding(url: &str, password: &str) -> String {
        let err = DatabaseUrl::parse(url).unwrap_err();
        assert!(matches!(err, ConfigError::InvalidUrl { .. }), "{err:?}");
        let (shown, debug) = (err.to_string(), format!("{err:?}"));
        for advice in ENCODE_ADVICE {
            assert!(shown.contains(advice), "{url}: no {advice:?} in {shown}");
        }
        let chars: Vec<char> = password.chars().collect();
        for len in 4..=chars.len() {
            for piece in chars.windows(len) {
                let piece: String = piece.iter().collect();
                assert!(
                    !shown.contains(&piece) && !debug.contains(&piece),
                    "{url}: {piece:?} shows in {shown} / {debug}"
                );
            }
        }
        shown
    }

    #[test]
    fn urls_that_parsers_split_differently_are_refused_without_the_password() {
        // The brief's example: every special character at once.
        refused_hiding("postgres://app:p@ss/w?rd#x y@host", "p@ss/w?rd#x y");
        for (password, what) in [
            ("Kq7@Wz9Pm", "more than one @"),
            ("Kq7/Wz9Pm", "after a / or ?"),
            ("Kq7?Wz9Pm", "after a / or ?"),
            ("Kq7#Wz9Pm", "raw #"),
            ("Kq7 Wz9Pm", "space"),
            ("Kq7\tWz9Pm", "space"),
            ("Kq7%zzWz9Pm", "two hex digits"),
            ("Kq7%4", "two hex digits"),
            ("Kq7/Wz9?Pm@x", "more than one @"),
        ] {
            for url in [
                format!("postgres://app:{password}@db.example.com:5432/app"),
                format!("postgresql://app:{password}@db/app?sslmode=require"),
                format!("postgres://app:{password}@/app?host=/run/postgresql"),
                format!("postgres://app:{password}@h1,h2/app"),
                format!("mysql://root:{password}@db/app"),
            ] {
                let shown = refused_hiding(&url, password);
                assert!(shown.contains(what), "{url}: {shown}");
            }
        }
        // An @ where libpq and URL parsers disagree, with no password involved.
        assert!(reason("postgres://h?application_name=a@b").contains("after a / or ?"));
        assert!(reason("postgres://h/db?application_name=a@b").contains("@"));
        assert!(reason("postgres://h/my@db").contains("@"));
        // libpq refuses %00 and parameters that are not key=value.
        assert!(reason("postgres://u:pw%00@h/db").contains("%00"));
        assert!(reason("postgres://h/db?sslmode").contains("key=value"));
        assert!(reason("postgres://h/db?a=1&&b=2").contains("key=value"));
        assert!(reason("postgres://h/db?options=-c%20x=1").contains("%3D"));
        assert!(reason("postgres://h/db?=x").contains("empty name"));
        assert!(parse("postgres://h/db?").query_pairs().is_empty());
        assert_eq!(parse("postgres://h/db?a=1&").query_pairs().len(), 1);
    }

    #[test]
    fn password_parameters_refused_with_raw_characters_stay_hidden() {
        for url in [
            "postgres://app@db/app?password=Kq7 Wz9Pm&sslmode=require",
            "postgres://app@db/app?sslpassword=Kq7 Wz9Pm",
            "postgres://app@db/app?password=Kq7#Wz9Pm",
            "postgres://app@db/app?password=Kq7%zzWz9Pm",
            "postgres://app@db/app?password=Kq7&Wz9Pm",
            "postgres://app@db/app?password=Kq7@Wz9Pm&sslmode=require",
            "postgres://app:Kq7@db/app?password=Wz9@Pm",
        ] {
            let err = DatabaseUrl::parse(url).unwrap_err();
            let (shown, debug) = (err.to_string(), format!("{err:?}"));
            for piece in ["Kq7", "Wz9Pm"] {
                assert!(!shown.contains(piece) && !debug.contains(piece), "{shown}");
            }
        }
    }

    #[test]
    fn colons_quotes_and_non_ascii_in_the_password_are_fine_raw_or_encoded() {
        for (written, decoded) in [
            ("p:ss:w0rd", "p:ss:w0rd"),
            ("p&s=s'w\"0\\rd,;", "p&s=s'w\"0\\rd,;"),
            ("pé密ss", "pé密ss"),
            ("p%C3%A9%E5%AF%86ss", "pé密ss"),
            ("p%40s%2Fs%3Fw%23o%20r%25d", "p@s/s?w#o r%d"),
            ("p%40s%2fs", "p@s/s"),
        ] {
            let u = parse(&format!("postgres://app:{written}@db:5432/app"));
            // The password as decoded is a known secret, whole.
            assert_eq!(u.redactor().redact(decoded), "***", "{written}");
            assert_eq!(u.redacted(), "postgres://app:***@db:5432/app");
            assert_eq!(u.host().as_deref(), Some("db"));
            assert_eq!(
                format!("{u:?}"),
                "DatabaseUrl(\"postgres://app:***@db:5432/app\")"
            );
            let msg = format!("auth failed: {decoded} / {written} / \"{}\"", &decoded[1..]);
            let masked = u.redactor().redact(&msg);
            assert!(!masked.contains(&decoded[1..]), "{masked}");
            assert!(!masked.contains(&written[1..]), "{masked}");
        }
    }

    #[test]
    fn secret_parameters_are_known_to_the_redactor_as_libpq_decodes_them() {
        let u =
            parse("postgres://db/app?password=Kq7%2BWz9+Pm&sslpassword=Xy8%27Vb2&sslmode=require");
        // libpq does not read + as a space.
        assert_eq!(u.query[0].1, "Kq7+Wz9+Pm");
        assert_eq!(
            u.redacted(),
            "postgres://db/app?password=***&sslpassword=***&sslmode=require"
        );
        let masked = u
            .redactor()
            .redact("x Kq7+Wz9+Pm y Xy8'Vb2 z Kq7%2bWz9%2BPm 'Wz9+'");
        assert_eq!(masked, "x *** y *** z *** '***'");
        // An encoded key is still a secret key.
        let u = parse("postgres://db/app?pass%77ord=Kq7Wz9Pm");
        assert!(!u.redacted().contains("Kq7"), "{}", u.redacted());
        assert_eq!(u.redactor().redact("Kq7Wz9Pm"), "***");
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
    fn host_names_and_hostaddr_values_must_pair_up() {
        let why = reason("postgres://h1,h2/db?hostaddr=10.0.0.1");
        assert!(why.contains("2 host names but 1 hostaddr values"), "{why}");
        let u = parse("postgres://h1,h2/db?hostaddr=10.0.0.1,10.0.0.2");
        assert_eq!(u.hosts().len(), 2);
    }

    #[test]
    fn mysql_urls_give_their_one_host_port_and_masked_password() {
        for (url, host, port, shown) in [
            (
                "mysql://app:pw9Kq@db:3307/app",
                Some("db"),
                Some(3307),
                "mysql://app:***@db:3307/app",
            ),
            ("mysql://app:pw9Kq@/app", None, None, "mysql://app:***@/app"),
            (
                "mysql://app:pw9Kq@:3307/app",
                None,
                Some(3307),
                "mysql://app:***@:3307/app",
            ),
            (
                "mysql://app@10.0.0.5/app",
                Some("10.0.0.5"),
                None,
                "mysql://app@10.0.0.5/app",
            ),
            (
                "mysql://app@[::1]:3307/app",
                Some("::1"),
                Some(3307),
                "mysql://app@[::1]:3307/app",
            ),
            (
                "mysql://app@/app?host=db2",
                Some("db2"),
                None,
                "mysql://app@/app?host=db2",
            ),
            (
                "mysql:///app?host=db3",
                Some("db3"),
                None,
                "mysql:///app?host=db3",
            ),
            (
                "mariadb://app:p%40ss9Kq@db.internal/app",
                Some("db.internal"),
                None,
                "mariadb://app:***@db.internal/app",
            ),
        ] {
            let u = parse(url);
            assert_eq!(u.backend(), Backend::Mysql, "{url}");
            assert_eq!(u.host().as_deref(), host, "{url}");
            assert_eq!(u.port(), port, "{url}");
            assert_eq!(u.redacted(), shown, "{url}");
        }
        let u = parse("mariadb://app:p%40ss9Kq@db.internal/app");
        assert_eq!(u.redactor().redact("p@ss9Kq and p%40ss9Kq"), "*** and ***");
        assert!(reason("mysql://app@db:0/app").contains("port 0"));
        assert!(reason("mysql://app@db1,db2/app").contains("single host"));
    }

    #[test]
    fn a_port_is_digits_only() {
        assert!(reason("postgres://h:+5432/db").contains("port"));
        assert_eq!(parse("postgres://h:5432/db").port(), Some(5432));
    }

    #[test]
    fn backends_are_named_in_lower_case() {
        for (url, name) in [
            ("postgres://h/db", "postgres"),
            ("sqlite://app.db", "sqlite"),
            ("mysql://h/db", "mysql"),
        ] {
            let backend = parse(url).backend();
            assert_eq!(
                (backend.as_str(), backend.to_string().as_str()),
                (name, name)
            );
        }
    }

    #[test]
    fn the_shown_url_masks_exactly_the_password() {
        // A short user info before a long host: the masked span ends at the `@`, wherever
        // the host ends.
        for (url, shown) in [
            (
                "postgres://a:b@hostname.example.com/dbname",
                "postgres://a:***@hostname.example.com/dbname",
            ),
            (
                "postgresql://app:S3NT1NEL@db.internal:5433/app?sslmode=require",
                "postgresql://app:***@db.internal:5433/app?sslmode=require",
            ),
        ] {
            assert_eq!(parse(url).redacted(), shown);
        }
        // A secret parameter after others: its masked span is where the parameter is.
        let url = "postgres://h/d?x=&password=S3NT1NEL&options=-c%20statement_timeout%3D5000";
        assert_eq!(
            parse(url).redacted(),
            "postgres://h/d?x=&password=***&options=-c%20statement_timeout%3D5000"
        );
    }

    #[test]
    fn a_mysql_query_password_is_masked_as_written_and_decoded() {
        // `%ba` is an escape whose byte is not UTF-8: the decoded value differs from the
        // written one, and a message may quote the written one (a configuration file's
        // unknown setting of that name, found by tests/parsing_props.rs).
        let written = r#"%ba,a\"a密Zaé密"#;
        let u = parse(&format!("mysql://app@db/app?password={written}"));
        let shown = format!("unknown setting {written:?}: {}", "UnknownSetting");
        let out = u.redactor().redact(&shown);
        assert!(!out.contains('密') && !out.contains("%ba"), "{out}");
        assert_eq!(u.redactor().redact(written), "***");
        // The first parameter, and a key matched whole (`pwd`), not by its ending.
        let u = parse("mysql://app@db/app?pwd=%ba9Kq");
        assert_eq!(u.redactor().redact("pw %ba9Kq"), "pw ***");
        let u = parse("mysql://app@db/app?x=1&password=Kq7%2B-Wz9Pm");
        assert_eq!(u.redactor().redact("pw Kq7+-Wz9Pm"), "pw ***");
        assert_eq!(u.redactor().redact("pw Kq7%2B-Wz9Pm"), "pw ***");
        assert!(!u.redacted().contains("Kq7"), "{}", u.redacted());
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
        let u = parse("postgres://app:S3NT1NEL@db/app?options=-c%20x%3Da%40b");
        assert_eq!(
            u.redacted(),
            "postgres://app:***@db/app?options=-c%20x%3Da%40b"
        );
        assert_eq!(u.query_pairs()[0].1, "-c x=a@b");
    }
}
