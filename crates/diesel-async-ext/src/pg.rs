//! PostgreSQL for diesel-async: a libpq-style URL plus our typed settings, connected with
//! libpq's meanings through tokio-postgres and OpenSSL or rustls (see [`crate::tls`]).
//!
//! tokio-postgres parses URLs itself, but not libpq's: it rejects `sslrootcert`,
//! `keepalives_count` and `sslmode=verify-full`, reads `tcp_user_timeout` in seconds (libpq:
//! milliseconds), and never verifies a certificate unless its connector is told how. So the
//! URL is parsed here and translated into typed [`tokio_postgres::Config`]s plus
//! [`TlsSettings`]; the string itself never reaches the driver.
//!
//! - A parameter written in the URL wins over the pool's [`ConnectSettings`]; those fill the
//!   gaps (connect timeout, keepalives, `tcp_user_timeout`, `sslmode`, `sslrootcert`,
//!   `application_name`).
//! - A parameter that is not libpq's, or that this connector cannot honour, is refused with a
//!   [`ConfigError`] naming it; none is passed on or dropped silently (`sslcompression`, which
//!   libpq ignores too, only logs a warning).
//! - `connect_timeout` bounds each attempt as a whole — TCP, TLS, startup, authentication and
//!   diesel-async's setup queries — per host and per address, as libpq's does (tokio-postgres's
//!   own bound covers the TCP connect only).
//! - Hosts are tried in order, each name's addresses in the resolver's order, as libpq does
//!   with `load_balance_hosts=disable`.
//!
//! ```no_run
//! # async fn f() -> Result<(), diesel_async_ext::ConnectError> {
//! use pool_core::config::ConnectSettings;
//! use diesel_async_ext::PgConnector;
//!
//! let connector = PgConnector::from_url(
//!     "postgres://app:secret@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ssl/db.pem",
//!     &ConnectSettings::default(),
//! )?;
//! let conn = connector.connect().await?; // an AsyncPgConnection
//! # let _ = conn; Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use diesel_ext_common::socket::{self, ConnSocket, Next, PeerFilter, SocketClaim};
use pool_core::config::{ConnectSettings, PoolConfig, SslMode};
use pool_core::error::ConfigError;
use pool_core::redact::{redact, Redactor};
use pool_core::url::{Backend, DatabaseUrl};
use tokio_postgres::config::{ChannelBinding, Host, SslNegotiation, TargetSessionAttrs};

use crate::tls::{Connector, RootCerts, TlsBackend, TlsSettings, TlsVersion};

/// A new connection, and our duplicate of its socket when one was claimed.
type Opened = (AsyncPgConnection, Option<ConnSocket>);

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// Where libpq looks for the server's socket when no host is given (Debian's build first,
/// then upstream's).
const DEFAULT_SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/tmp"];

/// libpq parameters this connector understands but cannot honour, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "passfile",
        "put the password in the URL or the settings instead",
    ),
    ("service", "write the service's parameters into the URL"),
    (
        "sslpassword",
        "use an unencrypted key file readable only by this user",
    ),
    ("sslcrl", "certificate revocation lists are not supported"),
    (
        "sslcrldir",
        "certificate revocation lists are not supported",
    ),
    ("sslcertmode", "give sslcert and sslkey, or neither"),
    ("sslkeylogfile", "TLS key logging is not supported"),
    (
        "require_auth",
        "authentication methods cannot be restricted",
    ),
    ("requirepeer", "peer credentials cannot be checked"),
    ("krbsrvname", "GSSAPI/Kerberos is not supported"),
    ("gsslib", "GSSAPI/Kerberos is not supported"),
    ("gssdelegation", "GSSAPI/Kerberos is not supported"),
    ("replication", "replication connections are not supported"),
    (
        "load_balance_hosts",
        "hosts are tried in the order given; list them in the order wanted",
    ),
    ("requiressl", "use sslmode=require"),
    ("tty", "it has no effect since PostgreSQL 7.4; remove it"),
];

/// One host to try, as the URL names it: a TCP host name or address, or a Unix socket
/// directory, and/or a numeric `hostaddr`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgTarget {
    /// `host`: a name or address (TCP), or a socket directory (Unix). `None` when only
    /// `hostaddr` is given.
    pub host: Option<Host>,
    /// `hostaddr`: the address to connect to without a name lookup. The certificate is still
    /// checked against `host`.
    pub hostaddr: Option<IpAddr>,
    /// The port (also names the Unix socket file `.s.PGSQL.<port>`).
    pub port: u16,
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.hostaddr) {
            (Some(Host::Unix(dir)), _) => {
                write!(
                    f,
                    "{}",
                    dir.join(format!(".s.PGSQL.{}", self.port)).display()
                )
            }
            (Some(Host::Tcp(name)), Some(addr)) => write!(f, "{name}:{} ({addr})", self.port),
            (Some(Host::Tcp(name)), None) if name.contains(':') => {
                write!(f, "[{name}]:{}", self.port)
            }
            (Some(Host::Tcp(name)), None) => write!(f, "{name}:{}", self.port),
            (None, Some(IpAddr::V6(addr))) => write!(f, "[{addr}]:{}", self.port),
            (None, Some(addr)) => write!(f, "{addr}:{}", self.port),
            (None, None) => write!(f, "(no host):{}", self.port),
        }
    }
}

/// The translated connection settings: what tokio-postgres gets for each host, the TLS
/// settings and the per-attempt bound. Built once by [`PgConnectConfig::from_url`] or
/// [`PgConnectConfig::from_pool_config`]; `Debug` shows no password.
#[derive(Clone)]
pub struct PgConnectConfig {
    /// Everything but hosts, addresses and ports.
    base: tokio_postgres::Config,
    targets: Vec<PgTarget>,
    tls: TlsSettings,
    connect_timeout: Option<Duration>,
    /// Masks the URL's passwords (user info, `password=`) in every message.
    redactor: Redactor,
    /// The URL with its password masked, for messages.
    redacted_url: String,
}

impl fmt::Debug for PgConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's Debug prints the password as `_`.
        f.debug_struct("PgConnectConfig")
            .field("url", &self.redacted_url)
            .field("base", &self.base)
            .field("targets", &self.targets)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl PgConnectConfig {
    /// Translates a libpq URL (`postgres://` or `postgresql://`, several hosts allowed:
    /// `postgres://u@h1:5432,h2:5433/db`) plus the pool's settings. Parameters in the URL
    /// win; `settings` fill what the URL leaves out.
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`] (URL redacted) naming the parameter for a malformed URL,
    /// an unknown or unsupported parameter, or a bad value; [`ConfigError::Invalid`] for
    /// settings that contradict each other (`verify-full` without a host name to verify,
    /// `sslrootcert=system` with a weaker mode, `sslcert` without `sslkey`).
    pub fn from_url(url: &str, settings: &ConnectSettings) -> Result<Self, ConfigError> {
        let url = DatabaseUrl::parse(url)?;
        if url.backend() != Backend::Postgres {
            return Err(ConfigError::InvalidUrl {
                url: url.redacted(),
                reason: "expected postgres://user:password@host:port/dbname?param=value".into(),
            });
        }
        translate(&url, settings)
    }

    /// [`PgConnectConfig::from_url`] with the pool's URL and [`PoolConfig::connect`].
    ///
    /// # Errors
    /// As [`PgConnectConfig::from_url`].
    pub fn from_pool_config(config: &PoolConfig) -> Result<Self, ConfigError> {
        if config.url.backend() != Backend::Postgres {
            return Err(ConfigError::InvalidUrl {
                url: config.url.redacted(),
                reason: format!(
                    "this is a {} URL; the PostgreSQL connector needs postgres://",
                    config.url.backend()
                ),
            });
        }
        translate(&config.url, &config.connect)
    }

    /// What tokio-postgres is given for every host (user, password, database, timeouts,
    /// keepalives, `sslmode`, ...), without hosts, addresses and ports: those come from
    /// [`targets`](Self::targets), one attempt each.
    pub fn driver_config(&self) -> &tokio_postgres::Config {
        &self.base
    }

    /// The hosts, in the order they are tried.
    pub fn targets(&self) -> &[PgTarget] {
        &self.targets
    }

    /// The TLS settings, with libpq's meanings.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// Builds the TLS connector with `backend` instead of the default (OpenSSL when its
    /// feature is on, else rustls; see [`crate::tls`]). The stack must be compiled in, unless
    /// the settings need no TLS.
    ///
    /// ```no_run
    /// # fn f() -> Result<(), pool_core::error::ConfigError> {
    /// use diesel_async_ext::{PgConnectConfig, PgConnector, TlsBackend};
    /// use pool_core::config::ConnectSettings;
    ///
    /// let config = PgConnectConfig::from_url(
    ///     "postgres://app@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ssl/db.pem",
    ///     &ConnectSettings::default(),
    /// )?
    /// .with_tls_backend(TlsBackend::Rustls);
    /// let connector = PgConnector::new(config)?;
    /// # let _ = connector; Ok(()) }
    /// ```
    #[must_use]
    pub fn with_tls_backend(mut self, backend: TlsBackend) -> Self {
        self.tls.backend = backend;
        self
    }

    /// The bound on each connection attempt (everything from TCP to diesel-async's setup).
    /// `None`: no bound.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// Masks every password of the URL in `text` (the URL's
    /// [`Redactor`]), and anything that looks like one.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
    }

    /// The driver's configuration for one address of one target.
    fn attempt_config(&self, target: &PgTarget, addr: Option<IpAddr>) -> tokio_postgres::Config {
        let mut config = self.base.clone();
        config.port(target.port);
        match &target.host {
            Some(Host::Unix(dir)) => {
                // libpq never asks for TLS over a Unix socket, whatever the sslmode.
                config.host_path(dir);
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
            Some(Host::Tcp(name)) => {
                config.host(name);
            }
            None => {
                // Only `hostaddr`: tokio-postgres refuses TLS without a name, and hands
                // OpenSSL "" (which skips the name check). Modes that check no name get
                // the address; `verify-full` was refused by the translation.
                if let Some(addr) = target.hostaddr {
                    config.host(addr.to_string());
                }
            }
        }
        if let Some(addr) = addr.or(target.hostaddr) {
            config.hostaddr(addr);
        }
        config
    }
}

/// Why a connection could not be opened. Every message has passwords masked; the variants
/// name the cause, so a pool can tell a wrong password from a server that is down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name could not be resolved.
    #[error("could not resolve host name {host:?}: {message}")]
    Dns {
        /// The name.
        host: String,
        /// The resolver's answer.
        message: String,
    },
    /// Nothing accepts connections there (TCP connection refused, no Unix socket).
    #[error(
        "connection to {target} refused ({message}); is the server running there and \
         accepting connections?"
    )]
    Refused {
        /// Where (`host:port`, or the socket's path).
        target: String,
        /// The system's message.
        message: String,
    },
    /// The attempt did not complete within `connect_timeout`: TCP, TLS, startup,
    /// authentication and session setup together.
    #[error(
        "connecting to {target} did not complete within connect_timeout ({timeout:?}, which \
         bounds TCP, TLS, startup, authentication and session setup together)"
    )]
    Timeout {
        /// Where.
        target: String,
        /// The bound.
        timeout: Duration,
    },
    /// TLS could not be established: the server does not offer it, the handshake failed, or
    /// the certificate did not verify (the reason is in the message, e.g.
    /// `certificate verify failed: Hostname mismatch` from OpenSSL, or
    /// `certificate verify failed: hostname mismatch (rustls: ...)` from rustls).
    #[error("TLS with {target} failed: {message}")]
    Tls {
        /// Where.
        target: String,
        /// What went wrong, with the TLS stack's reason.
        message: String,
    },
    /// The server rejected the credentials (SQLSTATE class 28), or asked for a password and
    /// none was given, or SCRAM / channel binding failed.
    #[error("authentication at {target} failed: {message}")]
    Auth {
        /// Where.
        target: String,
        /// The server's or the driver's message.
        message: String,
    },
    /// The server refused the session for another reason (no such database, too many
    /// connections, starting up or shutting down, not the wanted `target_session_attrs`) or
    /// session setup failed.
    #[error("the server at {target} refused the session: {message}")]
    Server {
        /// Where.
        target: String,
        /// The SQLSTATE, when the server sent one (`3D000`, `53300`, `57P03`, ...).
        code: Option<String>,
        /// The server's message.
        message: String,
    },
    /// The connection broke while being set up (reset, closed, unreachable network).
    #[error("the connection to {target} failed while being set up: {message}")]
    Network {
        /// Where.
        target: String,
        /// What the driver or the system said.
        message: String,
    },
    /// The settings cannot work; nothing was tried.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Opens PostgreSQL connections for diesel-async with libpq's meanings. The translation and
/// the TLS connector (root and client certificates read once) are built by the constructor;
/// [`connect`](Self::connect) only clones reference counts, so a pool's connect hook can hold
/// it in an `Arc` (or clone it: clones share everything).
#[derive(Clone)]
pub struct PgConnector {
    config: std::sync::Arc<PgConnectConfig>,
    tls: Connector,
}

impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    /// Builds the TLS connector for `config`, with its [`TlsBackend`] (see
    /// [`PgConnectConfig::with_tls_backend`]).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `sslrootcert`, `sslcert` or `sslkey` when a file
    /// cannot be read or used, or `sslmode` when it needs a TLS stack that is not compiled in.
    pub fn new(config: PgConnectConfig) -> Result<Self, ConfigError> {
        let tls = config.tls.build()?;
        Ok(PgConnector {
            config: std::sync::Arc::new(config),
            tls,
        })
    }

    /// [`PgConnectConfig::from_url`], then [`PgConnector::new`].
    ///
    /// # Errors
    /// As those two.
    pub fn from_url(url: &str, settings: &ConnectSettings) -> Result<Self, ConfigError> {
        Self::new(PgConnectConfig::from_url(url, settings)?)
    }

    /// [`PgConnectConfig::from_pool_config`], then [`PgConnector::new`].
    ///
    /// # Errors
    /// As those two.
    pub fn from_pool_config(config: &PoolConfig) -> Result<Self, ConfigError> {
        Self::new(PgConnectConfig::from_pool_config(config)?)
    }

    /// The translated settings.
    pub fn config(&self) -> &PgConnectConfig {
        &self.config
    }

    /// Opens a connection: each host in turn (each address of a name in turn), each attempt
    /// bounded by `connect_timeout` as a whole, until one succeeds.
    ///
    /// # Errors
    /// The last attempt's [`ConnectError`] (earlier ones are logged as warnings).
    pub async fn connect(&self) -> Result<AsyncPgConnection, ConnectError> {
        Ok(self.connect_claiming(false).await?.0)
    }

    /// [`PgConnector::connect`], and with `claim`, our duplicate of the new connection's
    /// socket when it can be told apart from the process's other sockets (see
    /// `diesel_ext_common::socket`): the pool waits on it, at close, for the server to let
    /// the session go. The identification runs right after tokio-postgres connected and
    /// before its connection task is spawned, so the socket is open and among the
    /// candidates; it reads `/proc/self/fd` twice (about 1 µs per open descriptor, on the
    /// connecting task). Several new sockets to the same port give none: no round trip
    /// tells them apart here.
    pub(crate) async fn connect_claiming(
        &self,
        claim: bool,
    ) -> Result<(AsyncPgConnection, Option<ConnSocket>), ConnectError> {
        let mut last = None;
        let targets = self.config.targets.len();
        for (i, target) in self.config.targets.iter().enumerate() {
            match self.connect_target(target, claim).await {
                Ok(conn) => return Ok(conn),
                Err(err) => {
                    if i + 1 < targets {
                        log::warn!(target: pool_core::events::LOG_TARGET, "{err}; trying the next host");
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            ConnectError::Config(ConfigError::Invalid {
                setting: "host",
                reason: "no host to connect to".into(),
            })
        }))
    }

    async fn connect_target(&self, target: &PgTarget, claim: bool) -> Result<Opened, ConnectError> {
        let name = match (&target.host, target.hostaddr) {
            (Some(Host::Tcp(name)), None) => name,
            _ => return self.attempt(target, None, claim).await,
        };
        if let Ok(addr) = name.parse::<IpAddr>() {
            return self.attempt(target, Some(addr), claim).await;
        }
        let addrs = self.resolve(name, target.port).await?;
        self.connect_addrs(target, name, addrs, claim).await
    }

    /// Tries `name`'s addresses in order (libpq's order): the first connection made, else the
    /// last error. Each failure before the next address is logged with "trying the next
    /// address".
    async fn connect_addrs(
        &self,
        target: &PgTarget,
        name: &str,
        addrs: Vec<IpAddr>,
        claim: bool,
    ) -> Result<Opened, ConnectError> {
        let mut last = None;
        let count = addrs.len();
        for (i, addr) in addrs.into_iter().enumerate() {
            match self.attempt(target, Some(addr), claim).await {
                Ok(conn) => return Ok(conn),
                Err(err) => {
                    if i + 1 < count {
                        log::warn!(target: pool_core::events::LOG_TARGET, "{err}; trying the next address of {name}");
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Dns {
            host: name.to_owned(),
            message: "the name has no addresses".into(),
        }))
    }

    /// The name's addresses, in the resolver's order, without duplicates.
    async fn resolve(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, ConnectError> {
        let dns = |message: String| ConnectError::Dns {
            host: name.to_owned(),
            message,
        };
        let lookup = tokio::net::lookup_host((name, port));
        let found = match self.config.connect_timeout {
            Some(bound) => tokio::time::timeout(bound, lookup).await.map_err(|_| {
                dns(format!(
                    "no answer from the resolver within connect_timeout ({bound:?})"
                ))
            })?,
            None => lookup.await,
        }
        .map_err(|e| dns(self.config.redact(&e.to_string())))?;
        let mut addrs: Vec<IpAddr> = Vec::new();
        for addr in found {
            if !addrs.contains(&addr.ip()) {
                addrs.push(addr.ip());
            }
        }
        if addrs.is_empty() {
            return Err(dns("the name has no addresses".into()));
        }
        Ok(addrs)
    }

    /// One attempt, bounded as a whole by `connect_timeout`.
    async fn attempt(
        &self,
        target: &PgTarget,
        addr: Option<IpAddr>,
        claim: bool,
    ) -> Result<Opened, ConnectError> {
        let config = self.config.attempt_config(target, addr);
        // Only the target's port: a narrowing, the socket itself is told apart by being new.
        let peers = claim.then(|| match &target.host {
            Some(Host::Unix(_)) => PeerFilter::ports(&[], &[target.port]),
            _ => PeerFilter::ports(&[target.port], &[]),
        });
        let place = match (addr, &target.host) {
            (Some(addr), Some(Host::Tcp(name))) if name.parse::<IpAddr>().is_err() => {
                format!("{name}:{} ({addr})", target.port)
            }
            _ => target.to_string(),
        };
        let work = async {
            match &self.tls {
                #[cfg(feature = "tls-openssl")]
                Connector::OpenSsl(tls) => {
                    self.open(&config, tls.clone(), &place, peers.as_ref())
                        .await
                }
                #[cfg(feature = "rustls")]
                Connector::Rustls(tls) => {
                    self.open(&config, tls.clone(), &place, peers.as_ref())
                        .await
                }
                Connector::Plain => {
                    self.open(&config, tokio_postgres::NoTls, &place, peers.as_ref())
                        .await
                }
            }
        };
        match self.config.connect_timeout {
            Some(bound) => match tokio::time::timeout(bound, work).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::Timeout {
                    target: place,
                    timeout: bound,
                }),
            },
            None => work.await,
        }
    }

    /// Connects with one TLS connector and sets diesel-async's session up; with `peers`,
    /// claims the new connection's socket (see [`PgConnector::connect_claiming`]).
    async fn open<T>(
        &self,
        config: &tokio_postgres::Config,
        tls: T,
        place: &str,
        peers: Option<&PeerFilter>,
    ) -> Result<Opened, ConnectError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        let window = peers.map(|peers| (peers, socket::begin_connect()));
        let (client, mut connection) = config
            .connect(tls)
            .await
            .map_err(|e| self.driver_error(&e, place))?;
        let claimed = match window {
            Some((peers, window)) => {
                claim_socket(window.eliminate(peers), &client, &mut connection).await
            }
            None => None,
        };
        let conn = AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| self.setup_error(e, place))?;
        Ok((conn, claimed))
    }

    /// Names the cause of a tokio-postgres error. Its `Display` is the error kind alone
    /// (`error performing TLS handshake`, ...); the details are in its sources.
    fn driver_error(&self, err: &tokio_postgres::Error, target: &str) -> ConnectError {
        let target = target.to_owned();
        if let Some(db) = err.as_db_error() {
            // "FATAL: password authentication failed for user ..." (+ DETAIL, HINT).
            let message = self.config.redact(&db.to_string());
            let code = db.code().code().to_owned();
            return if code.starts_with("28") {
                ConnectError::Auth { target, message }
            } else {
                ConnectError::Server {
                    target,
                    code: Some(code),
                    message,
                }
            };
        }
        let message = self.config.redact(&chain(err));
        let io_kind = std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .map(io::Error::kind);
        match err.to_string().as_str() {
            "error performing TLS handshake" => ConnectError::Tls {
                target,
                message: self.tls_hint(message),
            },
            "authentication error" => ConnectError::Auth { target, message },
            "invalid configuration" if message.contains("password missing") => ConnectError::Auth {
                target,
                message: format!("the server asks for a password and none is given ({message})"),
            },
            "invalid configuration" | "invalid connection string" => {
                ConnectError::Config(ConfigError::Invalid {
                    setting: "url",
                    reason: message,
                })
            }
            "timeout waiting for server" => match self.config.connect_timeout {
                Some(timeout) => ConnectError::Timeout { target, timeout },
                None => ConnectError::Network { target, message },
            },
            "error connecting to server" => match io_kind {
                Some(io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                    ConnectError::Refused { target, message }
                }
                // Ours (the TCP part of connect_timeout), or the kernel's SYN retries.
                Some(io::ErrorKind::TimedOut) => match self.config.connect_timeout {
                    Some(timeout) => ConnectError::Timeout { target, timeout },
                    None => ConnectError::Network { target, message },
                },
                // target_session_attrs: "database does not allow writes" and the like.
                Some(io::ErrorKind::PermissionDenied) => ConnectError::Server {
                    target,
                    code: None,
                    message,
                },
                _ => ConnectError::Network { target, message },
            },
            _ => ConnectError::Network { target, message },
        }
    }

    /// Adds what the `sslmode` means to a certificate failure.
    fn tls_hint(&self, message: String) -> String {
        if !message.contains("certificate verify failed") {
            return message;
        }
        // OpenSSL appends its verify result's text (X509_verify_cert_error_string): each
        // cause gets its own hint, and causes without one get none rather than a wrong one.
        let lower = message.to_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
        let hint = if has(&["hostname mismatch", "ip address mismatch"]) {
            "the certificate does not name the host connected to; sslmode=verify-full \
             checks the name, verify-ca only the chain"
        } else if has(&["certificate has expired"]) {
            "the server's certificate has expired (or this machine's clock is wrong); the \
             server needs a renewed certificate"
        } else if has(&["certificate is not yet valid"]) {
            "the server's certificate is not valid yet (or this machine's clock is wrong)"
        } else if has(&[
            "unable to get local issuer certificate",
            "unable to get issuer certificate",
            "self-signed certificate",
            "self signed certificate",
            "unable to verify the first certificate",
            // A root of the same name but another key (OpenSSL's and rustls's wording).
            "certificate signature failure",
        ]) {
            match &self.config.tls.root_certs {
                RootCerts::File(_) => "the certificate is not signed by a root in sslrootcert",
                _ => {
                    "the certificate is not signed by a root this system trusts; give the \
                     server's CA with sslrootcert"
                }
            }
        } else {
            return message;
        };
        format!("{message}; {hint}")
    }

    fn setup_error(&self, err: ConnectionError, target: &str) -> ConnectError {
        let target = target.to_owned();
        let message = self.config.redact(&format!(
            "diesel-async's session setup failed: {}",
            chain(&err)
        ));
        match err {
            ConnectionError::CouldntSetupConfiguration(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UnableToSendCommand,
                _,
            )) => ConnectError::Network { target, message },
            _ => ConnectError::Server {
                target,
                code: None,
                message,
            },
        }
    }
}

/// Drives `elimination` to its end on a new connection whose task is not spawned yet, with
/// empty queries as the tiebreak's round trips: our claim of the connection's socket, if it
/// was told apart. Nobody polls `connection` but those round trips until it is handed to
/// diesel-async, so its socket is open, new since the window, and (after a successful round
/// trip) was open when the counters were read.
async fn claim_socket<S, T>(
    mut elimination: socket::Elimination,
    client: &tokio_postgres::Client,
    connection: &mut tokio_postgres::Connection<S, T>,
) -> Option<ConnSocket>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match elimination.step() {
            Next::Done(SocketClaim::Found(sock)) => return Some(sock),
            Next::Done(_) => return None,
            Next::Pause(pause) => tokio::time::sleep(pause).await,
            Next::RoundTrip => {
                let started = std::time::Instant::now();
                let ok = round_trip(client, connection).await;
                elimination.round_trip_done(ok, started.elapsed());
            }
        }
    }
}

/// One round trip on a connection whose task is not spawned yet (an empty query, driving the
/// connection meanwhile): whether it succeeded.
async fn round_trip<S, T>(
    client: &tokio_postgres::Client,
    connection: &mut tokio_postgres::Connection<S, T>,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::future::Future;
    let query = client.simple_query("");
    let mut query = std::pin::pin!(query);
    std::future::poll_fn(|cx| {
        // Ended (the server closed it, or an error): no answer is coming.
        if std::pin::Pin::new(&mut *connection).poll(cx).is_ready() {
            return std::task::Poll::Ready(false);
        }
        query.as_mut().poll(cx).map(|answer| answer.is_ok())
    })
    .await
}

/// `err: source: source ...`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        // postgres-openssl's error repeats its source's text: keep it once.
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Opens one connection: [`PgConnector::from_url`] then [`PgConnector::connect`]. A pool
/// should build the [`PgConnector`] once instead.
///
/// # Errors
/// [`ConnectError::Config`] for settings that cannot work, else as [`PgConnector::connect`].
pub async fn establish(
    url: &str,
    settings: &ConnectSettings,
) -> Result<AsyncPgConnection, ConnectError> {
    PgConnector::from_url(url, settings)?.connect().await
}

// ---------------------------------------------------------------------------------------------
// The URL, as libpq reads it
// ---------------------------------------------------------------------------------------------

/// What the URL says, decoded, before the settings fill gaps.
#[derive(Debug, Default)]
struct UrlParts {
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    /// From the authority: `(host, port)` as written (decoded), either may be empty.
    netloc: Vec<(String, String)>,
    /// Query parameters, decoded, in order.
    params: Vec<(String, String)>,
}

/// Splits a libpq URI: `postgres[ql]://[user[:password]@][host][:port][,...][/dbname][?k=v&...]`.
fn split_url(url: &str, bad: &dyn Fn(String) -> ConfigError) -> Result<UrlParts, ConfigError> {
    let rest = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| {
            url.get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &url[scheme.len()..])
        })
        .ok_or_else(|| {
            bad("expected postgres://user:password@host:port/dbname?param=value".into())
        })?;
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
        None => (before_query, None),
    };
    let mut parts = UrlParts::default();
    let hostspec = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let (user, password) = match userinfo.find(':') {
                Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                parts.user = Some(decode(user, "the user name", bad)?);
            }
            if let Some(pw) = password {
                parts.password = Some(decode(pw, "the password", bad)?);
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        for entry in hostspec.split(',') {
            let (host, port) = if let Some(inner) = entry.strip_prefix('[') {
                let close = inner.find(']').ok_or_else(|| {
                    bad(format!("the IPv6 address in {entry:?} has no closing ']'"))
                })?;
                let after = &inner[close + 1..];
                let port = match after.strip_prefix(':') {
                    Some(p) => p,
                    None if after.is_empty() => "",
                    None => {
                        return Err(bad(format!(
                            "unexpected {after:?} after the IPv6 address in {entry:?}"
                        )))
                    }
                };
                (&inner[..close], port)
            } else {
                match entry.find(':') {
                    Some(c) => (&entry[..c], &entry[c + 1..]),
                    None => (entry, ""),
                }
            };
            parts
                .netloc
                .push((decode(host, "a host", bad)?, decode(port, "a port", bad)?));
        }
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        parts.dbname = Some(decode(path, "the database name", bad)?);
    }
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                bad(format!(
                    "the parameter {:?} has no '=value'",
                    redact(&decode_lossy(pair))
                ))
            })?;
            let key = decode(k, "a parameter name", bad)?;
            let value = decode(v, &format!("the value of {key}"), bad)?;
            parts.params.push((key, value));
        }
    }
    Ok(parts)
}

/// Decodes `%XX` escapes (libpq does not read `+` as a space).
fn decode(s: &str, what: &str, bad: &dyn Fn(String) -> ConfigError) -> Result<String, ConfigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(0) => return Err(bad(format!("{what} contains %00"))),
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    return Err(bad(format!(
                        "{what} has a '%' that is not followed by two hex digits; write a \
                         literal '%' as %25"
                    )))
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(format!("{what} is not valid UTF-8 once decoded")))
}

fn decode_lossy(s: &str) -> String {
    decode(s, "", &|r| ConfigError::Invalid {
        setting: "url",
        reason: r,
    })
    .unwrap_or_else(|_| s.to_owned())
}

/// The last value of each parameter, as libpq keeps it.
struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Translates a URL that [`DatabaseUrl::parse`] accepted (so it has one reading: a single raw
/// `@`, no raw `#`, no whitespace, valid `%XX` escapes).
fn translate(
    url: &DatabaseUrl,
    settings: &ConnectSettings,
) -> Result<PgConnectConfig, ConfigError> {
    let redacted_url = url.redacted();
    let bad = |reason: String| ConfigError::InvalidUrl {
        url: redacted_url.clone(),
        reason,
    };
    let parts = split_url(url.expose_secret(), &bad)?;
    for (key, _) in &parts.params {
        check_key(key, &bad)?;
    }
    let params = Params {
        pairs: parts.params.clone(),
    };
    let p = |key: &str| params.get(key);

    let mut base = tokio_postgres::Config::new();
    if let Some(user) = p("user").map(str::to_owned).or(parts.user.clone()) {
        base.user(user);
    }
    if let Some(pw) = p("password").map(str::to_owned).or(parts.password.clone()) {
        base.password(pw);
    }
    if let Some(db) = p("dbname").map(str::to_owned).or(parts.dbname.clone()) {
        if !db.is_empty() {
            base.dbname(db);
        }
    }
    if let Some(options) = p("options").filter(|o| !o.is_empty()) {
        base.options(options);
    }
    let app = p("application_name")
        .map(str::to_owned)
        .or_else(|| settings.application_name.clone())
        .or_else(|| p("fallback_application_name").map(str::to_owned));
    if let Some(app) = app.filter(|a| !a.is_empty()) {
        base.application_name(app);
    }

    // Timeouts and keepalives, libpq's units in the URL, typed settings otherwise.
    let connect_timeout = match p("connect_timeout") {
        // libpq: zero or negative waits forever; 1 is taken as 2.
        Some(v) => match int(v, "connect_timeout", "a whole number of seconds", &bad)? {
            n if n <= 0 => None,
            1 => Some(Duration::from_secs(2)),
            n => Some(Duration::from_secs(n.unsigned_abs())),
        },
        None => settings.connect_timeout,
    };
    if let Some(t) = connect_timeout {
        // The TCP connect alone; the whole attempt is bounded by the connector.
        base.connect_timeout(t);
    }
    let tcp_user_timeout = match p("tcp_user_timeout") {
        // libpq: milliseconds; 0 is the system default.
        Some(v) => match non_negative(
            v,
            "tcp_user_timeout",
            "a whole number of milliseconds",
            &bad,
        )? {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        None => settings.tcp_user_timeout,
    };
    if let Some(t) = tcp_user_timeout {
        base.tcp_user_timeout(t);
    }
    let keepalives = match p("keepalives") {
        Some(v) => int(v, "keepalives", "1 (on) or 0 (off)", &bad)? != 0,
        None => settings.keepalives.enabled,
    };
    base.keepalives(keepalives);
    if keepalives {
        // libpq: seconds; 0 is the system default. tokio-postgres always sets an idle time
        // (its default, 2 h, is Linux's default too) but leaves the others to the system.
        match p("keepalives_idle") {
            Some(v) => {
                let secs = non_negative(v, "keepalives_idle", "a whole number of seconds", &bad)?;
                if secs > 0 {
                    base.keepalives_idle(Duration::from_secs(secs));
                }
            }
            None => {
                base.keepalives_idle(settings.keepalives.idle);
            }
        }
        match p("keepalives_interval") {
            Some(v) => {
                let secs =
                    non_negative(v, "keepalives_interval", "a whole number of seconds", &bad)?;
                if secs > 0 {
                    base.keepalives_interval(Duration::from_secs(secs));
                }
            }
            None => {
                base.keepalives_interval(settings.keepalives.interval);
            }
        }
        match p("keepalives_count") {
            Some(v) => {
                let n = non_negative(v, "keepalives_count", "a whole number", &bad)?;
                if n > 0 {
                    let n = u32::try_from(n)
                        .map_err(|_| bad(format!("keepalives_count={v:?} is too large")))?;
                    base.keepalives_retries(n);
                }
            }
            None => {
                base.keepalives_retries(settings.keepalives.count);
            }
        }
    }
    if let Some(v) = p("target_session_attrs") {
        let attrs = match v {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" | "standby" | "prefer-standby" => {
                return Err(bad(format!(
                    "target_session_attrs={v} is not supported (tokio-postgres checks only \
                     transaction_read_only); use read-write or read-only"
                )))
            }
            _ => {
                return Err(bad(format!(
                    "target_session_attrs={v:?} is not one of any, read-write, read-only, \
                     primary, standby, prefer-standby"
                )))
            }
        };
        base.target_session_attrs(attrs);
    }
    if let Some(v) = p("channel_binding") {
        base.channel_binding(match v {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => {
                return Err(bad(format!(
                    "channel_binding={v:?} is not one of disable, prefer, require"
                )))
            }
        });
    }
    if let Some(v) = p("gssencmode") {
        match v {
            // Without GSSAPI support, libpq treats prefer as disable.
            "disable" | "prefer" => {}
            "require" => {
                return Err(bad(
                    "gssencmode=require is not supported (no GSSAPI); use sslmode for \
                     encryption"
                        .into(),
                ))
            }
            _ => {
                return Err(bad(format!(
                    "gssencmode={v:?} is not one of disable, prefer, require"
                )))
            }
        }
    }
    if let Some(v) = p("client_encoding") {
        if !matches!(
            v.to_ascii_uppercase().as_str(),
            "UTF8" | "UTF-8" | "UNICODE" | "AUTO"
        ) {
            return Err(bad(format!(
                "client_encoding={v:?} is not supported: tokio-postgres and diesel-async \
                 always use UTF8"
            )));
        }
    }
    if p("sslcompression").is_some() {
        log::warn!(
            "sslcompression in the PostgreSQL URL is ignored (as by libpq with current \
             OpenSSL): TLS compression is never used"
        );
    }

    let tls = tls_settings(&params, settings, &bad)?;
    tls.validate()?;
    base.ssl_mode(tls.driver_mode());
    if tls.direct {
        base.ssl_negotiation(SslNegotiation::Direct);
    }

    let targets = targets(&parts, &params, &bad)?;
    if tls.mode == SslMode::VerifyFull {
        if let Some(t) = targets.iter().find(|t| t.host.is_none()) {
            return Err(ConfigError::Invalid {
                setting: "sslmode",
                reason: format!(
                    "sslmode=verify-full checks the server's certificate against the host \
                     name, but {t} is given only as hostaddr; add host=<the name in the \
                     certificate> (hostaddr then only says where to connect), as libpq \
                     requires"
                ),
            });
        }
    }
    Ok(PgConnectConfig {
        base,
        targets,
        tls,
        connect_timeout,
        redactor: url.redactor().clone(),
        redacted_url,
    })
}

/// Refuses parameters that are not libpq's or cannot be honoured.
fn check_key(key: &str, bad: &dyn Fn(String) -> ConfigError) -> Result<(), ConfigError> {
    const KNOWN: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "options",
        "application_name",
        "fallback_application_name",
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslsni",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "sslcompression",
        "target_session_attrs",
        "channel_binding",
        "gssencmode",
        "client_encoding",
    ];
    if KNOWN.contains(&key) {
        return Ok(());
    }
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
        return Err(bad(format!(
            "the libpq parameter `{key}` is not supported by the async PostgreSQL connector: \
             {what}"
        )));
    }
    let hint = match key {
        "keepalives_retries" => "; libpq spells it keepalives_count",
        "ssl" => "; use sslmode=require",
        _ => "",
    };
    Err(bad(format!(
        "unknown parameter `{key}`: it is not a libpq connection parameter{hint}; remove it"
    )))
}

fn int(
    v: &str,
    key: &str,
    expected: &str,
    bad: &dyn Fn(String) -> ConfigError,
) -> Result<i64, ConfigError> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| bad(format!("{key}={v:?} is not {expected}")))
}

fn non_negative(
    v: &str,
    key: &str,
    expected: &str,
    bad: &dyn Fn(String) -> ConfigError,
) -> Result<u64, ConfigError> {
    let n = int(v, key, expected, bad)?;
    u64::try_from(n).map_err(|_| bad(format!("{key}={v:?} is negative; give {expected}")))
}

fn tls_settings(
    params: &Params,
    settings: &ConnectSettings,
    bad: &dyn Fn(String) -> ConfigError,
) -> Result<TlsSettings, ConfigError> {
    let p = |key: &str| params.get(key);
    let root_certs = match p("sslrootcert") {
        Some("system") => RootCerts::System,
        Some("") => RootCerts::Unset,
        Some(path) => RootCerts::File(PathBuf::from(path)),
        None => match &settings.ssl_root_cert {
            Some(path) if path.as_os_str() == "system" => RootCerts::System,
            Some(path) => RootCerts::File(path.clone()),
            None => RootCerts::Unset,
        },
    };
    let mode = match p("sslmode") {
        Some(v) => SslMode::from_str(v).map_err(|_| {
            bad(format!(
                "sslmode={v:?} is not one of disable, allow, prefer, require, verify-ca, \
                 verify-full"
            ))
        })?,
        // libpq: with the system's roots the default becomes verify-full.
        None => settings
            .ssl_mode
            .clone()
            .unwrap_or(if root_certs == RootCerts::System {
                SslMode::VerifyFull
            } else {
                SslMode::Prefer
            }),
    };
    let path = |key: &str| p(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let sni = match p("sslsni") {
        Some(v) => int(v, "sslsni", "1 (on) or 0 (off)", bad)? != 0,
        None => true,
    };
    let version = |key: &str, default: Option<TlsVersion>| -> Result<_, ConfigError> {
        Ok(match p(key) {
            None | Some("") => default,
            Some(v) => Some(match v.to_ascii_lowercase().as_str() {
                "tlsv1" => TlsVersion::Tls1_0,
                "tlsv1.1" => TlsVersion::Tls1_1,
                "tlsv1.2" => TlsVersion::Tls1_2,
                "tlsv1.3" => TlsVersion::Tls1_3,
                _ => {
                    return Err(bad(format!(
                        "{key}={v:?} is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"
                    )))
                }
            }),
        })
    };
    let direct = match p("sslnegotiation") {
        None | Some("postgres") => false,
        Some("direct") => true,
        Some(v) => {
            return Err(bad(format!(
                "sslnegotiation={v:?} is not one of postgres, direct"
            )))
        }
    };
    Ok(TlsSettings {
        mode,
        root_certs,
        client_cert: path("sslcert"),
        client_key: path("sslkey"),
        sni,
        min_protocol: version("ssl_min_protocol_version", Some(TlsVersion::Tls1_2))?,
        max_protocol: version("ssl_max_protocol_version", None)?,
        direct,
        backend: TlsBackend::default(),
    })
}

/// The hosts to try: `host` / `hostaddr` / `port` parameters override the URL's authority;
/// lists must match in length as libpq requires.
fn targets(
    parts: &UrlParts,
    params: &Params,
    bad: &dyn Fn(String) -> ConfigError,
) -> Result<Vec<PgTarget>, ConfigError> {
    let split = |v: &str| -> Vec<String> { v.split(',').map(|s| s.trim().to_owned()).collect() };
    let hosts: Vec<String> = match params.get("host") {
        Some(v) => split(v),
        None => parts.netloc.iter().map(|(h, _)| h.clone()).collect(),
    };
    let ports: Vec<String> = match params.get("port") {
        Some(v) => split(v),
        None if parts.netloc.iter().all(|(_, p)| p.is_empty()) => Vec::new(),
        None => parts.netloc.iter().map(|(_, p)| p.clone()).collect(),
    };
    let hostaddrs: Vec<String> = params.get("hostaddr").map(split).unwrap_or_default();
    if !hosts.is_empty() && !hostaddrs.is_empty() && hosts.len() != hostaddrs.len() {
        return Err(bad(format!(
            "could not match {} host names to {} hostaddr values",
            hosts.len(),
            hostaddrs.len()
        )));
    }
    let n = hosts.len().max(hostaddrs.len()).max(1);
    if ports.len() > 1 && ports.len() != n {
        return Err(bad(format!(
            "could not match {} port numbers to {n} hosts",
            ports.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let port = match ports.get(i).or(ports.first()).map(String::as_str) {
            None | Some("") => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad(format!("port {p:?} is not a number from 1 to 65535"))),
            },
        };
        let hostaddr = match hostaddrs.get(i).map(String::as_str) {
            None | Some("") => None,
            Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
                bad(format!(
                    "hostaddr {a:?} is not a numeric IPv4 or IPv6 address (put names in host)"
                ))
            })?),
        };
        let host = match hosts.get(i).map(String::as_str) {
            Some(h) if h.starts_with('/') => Some(Host::Unix(PathBuf::from(h))),
            Some(h) if h.starts_with('@') => {
                return Err(bad(format!(
                    "host {h:?} is an abstract Unix socket, which tokio-postgres cannot \
                     connect to; use a socket directory or a TCP host"
                )))
            }
            Some(h) if !h.is_empty() => Some(Host::Tcp(h.to_owned())),
            _ if hostaddr.is_some() => None,
            _ => Some(Host::Unix(default_socket_dir())),
        };
        out.push(PgTarget {
            host,
            hostaddr,
            port,
        });
    }
    Ok(out)
}

/// The first of libpq's usual socket directories that exists.
fn default_socket_dir() -> PathBuf {
    DEFAULT_SOCKET_DIRS
        .iter()
        .map(Path::new)
        .find(|d| d.is_dir())
        .unwrap_or(Path::new(DEFAULT_SOCKET_DIRS[0]))
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "S3NT1NEL-pw";

    fn translate_ok(url: &str) -> PgConnectConfig {
        translate_with(url, &ConnectSettings::default())
    }

    /// Set once a translation did not end: every later one fails at once.
    static HUNG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Translates on another thread, within 5 s: a parser that loops fails the test instead
    /// of hanging it (and every later translation fails at once, so that the run ends soon).
    fn from_url_within(
        url: &str,
        settings: &ConnectSettings,
    ) -> Result<PgConnectConfig, ConfigError> {
        use std::sync::atomic::Ordering;
        assert!(
            !HUNG.load(Ordering::Relaxed),
            "an earlier translation never ended"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let (owned, settings) = (url.to_owned(), settings.clone());
        std::thread::spawn(move || {
            let _ = tx.send(PgConnectConfig::from_url(&owned, &settings));
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| {
            HUNG.store(true, Ordering::Relaxed);
            panic!("translating {url:?} did not end within 5 s ({e})")
        })
    }

    fn translate_with(url: &str, settings: &ConnectSettings) -> PgConnectConfig {
        match from_url_within(url, settings) {
            Ok(c) => c,
            Err(e) => panic!("{url:?} should translate: {e}"),
        }
    }

    fn refused(url: &str) -> String {
        match from_url_within(url, &ConnectSettings::default()) {
            Ok(c) => panic!("{url:?} should be refused, got {c:?}"),
            Err(e) => {
                let text = format!("{e} {e:?}");
                assert!(!text.contains(PW), "password leaked: {text}");
                e.to_string()
            }
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn libpq_units_are_converted_tcp_user_timeout_is_milliseconds() {
        let c = translate_ok(
            "postgres://u@h/db?tcp_user_timeout=3000&keepalives_count=3&keepalives_idle=7\
             &keepalives_interval=2&connect_timeout=5",
        );
        let d = c.driver_config();
        assert_eq!(d.get_tcp_user_timeout(), Some(&Duration::from_millis(3000)));
        assert_eq!(d.get_keepalives_retries(), Some(3));
        assert_eq!(d.get_keepalives_idle(), secs(7));
        assert_eq!(d.get_keepalives_interval(), Some(secs(2)));
        assert_eq!(d.get_connect_timeout(), Some(&secs(5)));
        assert_eq!(c.connect_timeout(), Some(secs(5)));
        assert!(d.get_keepalives());
    }

    #[test]
    fn our_settings_fill_the_gaps_and_url_parameters_win() {
        let mut s = ConnectSettings::default();
        s.application_name = Some("orders-api".into());
        s.tcp_user_timeout = Some(Duration::from_millis(2500));
        s.ssl_mode = Some(SslMode::Require);
        let c = translate_with("postgres://u@h/db", &s);
        let d = c.driver_config();
        assert_eq!(d.get_connect_timeout(), Some(&secs(10)));
        assert_eq!(c.connect_timeout(), Some(secs(10)));
        assert_eq!(d.get_tcp_user_timeout(), Some(&Duration::from_millis(2500)));
        assert_eq!(d.get_keepalives_idle(), secs(30));
        assert_eq!(d.get_keepalives_interval(), Some(secs(10)));
        assert_eq!(d.get_keepalives_retries(), Some(3));
        assert_eq!(d.get_application_name(), Some("orders-api"));
        assert_eq!(c.tls().mode, SslMode::Require);
        assert_eq!(d.get_ssl_mode(), tokio_postgres::config::SslMode::Require);

        let c = translate_with(
            "postgres://u@h/db?application_name=mine&sslmode=disable&tcp_user_timeout=0\
             &connect_timeout=0&keepalives=0",
            &s,
        );
        let d = c.driver_config();
        assert_eq!(d.get_application_name(), Some("mine"));
        assert_eq!(c.tls().mode, SslMode::Disable);
        assert_eq!(d.get_tcp_user_timeout(), None, "0 is the system default");
        assert_eq!(c.connect_timeout(), None, "0 waits forever, as libpq");
        assert!(!d.get_keepalives());
    }

    #[test]
    fn connect_timeout_of_one_second_is_two_as_in_libpq() {
        assert_eq!(
            translate_ok("postgres://h/db?connect_timeout=1").connect_timeout(),
            Some(secs(2))
        );
    }

    #[test]
    fn user_password_database_and_options_are_decoded() {
        let c = translate_ok(
            "postgresql://us%40er:p%40ss%2Fw@h/my%20db?options=-c%20search_path%3Dx\
             &fallback_application_name=fb",
        );
        let d = c.driver_config();
        assert_eq!(d.get_user(), Some("us@er"));
        assert_eq!(d.get_password(), Some(&b"p@ss/w"[..]));
        assert_eq!(d.get_dbname(), Some("my db"));
        assert_eq!(d.get_options(), Some("-c search_path=x"));
        assert_eq!(d.get_application_name(), Some("fb"));
        let c = translate_ok("postgres://u:a@h/db?user=v&password=b&dbname=other");
        let d = c.driver_config();
        assert_eq!(d.get_user(), Some("v"));
        assert_eq!(d.get_password(), Some(&b"b"[..]));
        assert_eq!(d.get_dbname(), Some("other"));
    }

    #[test]
    fn hosts_ports_sockets_and_hostaddrs_follow_libpq() {
        let c = translate_ok("postgres://u@h1:5433,[::1]:6000,h3/db");
        let t = c.targets();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].host, Some(Host::Tcp("h1".into())));
        assert_eq!(t[0].port, 5433);
        assert_eq!(t[1].host, Some(Host::Tcp("::1".into())));
        assert_eq!(t[1].port, 6000);
        assert_eq!(t[2].port, 5432);

        let c = translate_ok("postgres://%2Fvar%2Frun%2Fpostgresql:5499/db");
        assert_eq!(
            c.targets()[0].host,
            Some(Host::Unix("/var/run/postgresql".into()))
        );
        assert_eq!(
            c.targets()[0].to_string(),
            "/var/run/postgresql/.s.PGSQL.5499"
        );

        let c = translate_ok("postgres://app@/db?host=/run/pg,db.example&port=5433,5434");
        assert_eq!(c.targets()[0].host, Some(Host::Unix("/run/pg".into())));
        assert_eq!(c.targets()[1].host, Some(Host::Tcp("db.example".into())));
        assert_eq!(c.targets()[1].port, 5434);

        let c = translate_ok("postgres://u@localhost/db?hostaddr=127.0.0.1&port=7000");
        assert_eq!(c.targets()[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.targets()[0].port, 7000);
        let cfg = c.attempt_config(&c.targets()[0], None);
        assert_eq!(cfg.get_hosts(), &[Host::Tcp("localhost".into())]);
        assert_eq!(
            cfg.get_hostaddrs(),
            &["127.0.0.1".parse::<IpAddr>().unwrap()]
        );

        // Host-less: libpq's default socket directory.
        let c = translate_ok("postgres:///db");
        assert!(matches!(c.targets()[0].host, Some(Host::Unix(_))));

        let msg = refused("postgres://h1,h2/db?hostaddr=127.0.0.1");
        assert!(msg.contains("hostaddr"), "{msg}");
        let msg = refused("postgres://h1,h2,h3/db?port=1,2");
        assert!(msg.contains("port"), "{msg}");
        assert!(refused("postgres://h:99999/db").contains("port"));
        assert!(refused("postgres://h/db?hostaddr=db.example").contains("hostaddr"));
    }

    #[test]
    fn unix_sockets_never_ask_for_tls_as_libpq() {
        let c = translate_ok("postgres:///db?host=/run/pg&sslmode=require");
        let cfg = c.attempt_config(&c.targets()[0], None);
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn verify_full_needs_a_host_name_not_only_hostaddr() {
        let msg = refused("postgres://u@/db?hostaddr=127.0.0.1&sslmode=verify-full");
        assert!(
            msg.contains("hostaddr") && msg.contains("verify-full"),
            "{msg}"
        );
        // With a name it verifies against the name and connects to the address.
        let c =
            translate_ok("postgres://u@/db?host=localhost&hostaddr=127.0.0.1&sslmode=verify-full");
        assert_eq!(c.targets()[0].host, Some(Host::Tcp("localhost".into())));
        // Weaker modes check no name: the address stands in for it, so tokio-postgres can
        // do TLS at all.
        let c = translate_ok(
            "postgres://u@/db?hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert=/x/ca.pem",
        );
        let cfg = c.attempt_config(&c.targets()[0], None);
        assert_eq!(cfg.get_hosts(), &[Host::Tcp("127.0.0.1".into())]);
    }

    #[test]
    fn sslmodes_and_certificates_are_read_with_libpq_meanings() {
        let c = translate_ok("postgres://h/db?sslmode=verify-full&sslrootcert=/x/ca.pem");
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
        assert_eq!(c.tls().root_certs, RootCerts::File("/x/ca.pem".into()));
        assert_eq!(
            c.driver_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let c = translate_ok("postgres://h/db?sslmode=allow");
        assert_eq!(
            c.driver_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        // libpq's default.
        assert_eq!(translate_ok("postgres://h/db").tls().mode, SslMode::Prefer);
        // sslrootcert=system makes verify-full the default, and weaker modes an error.
        assert_eq!(
            translate_ok("postgres://h/db?sslrootcert=system")
                .tls()
                .mode,
            SslMode::VerifyFull
        );
        assert!(
            refused("postgres://h/db?sslrootcert=system&sslmode=require").contains("verify-full")
        );
        let c = translate_ok("postgres://h/db?sslcert=/c.crt&sslkey=/c.key&sslsni=0");
        assert_eq!(c.tls().client_cert, Some("/c.crt".into()));
        assert_eq!(c.tls().client_key, Some("/c.key".into()));
        assert!(!c.tls().sni);
        assert!(refused("postgres://h/db?sslcert=/c.crt").contains("sslkey"));
        assert!(refused("postgres://h/db?sslmode=verify-none").contains("sslmode"));
        // The settings' root certificate when the URL has none.
        let mut s = ConnectSettings::default();
        s.ssl_root_cert = Some("/etc/ssl/rds.pem".into());
        assert_eq!(
            translate_with("postgres://h/db", &s).tls().root_certs,
            RootCerts::File("/etc/ssl/rds.pem".into())
        );
    }

    #[test]
    fn session_attributes_and_channel_binding_are_typed() {
        let c =
            translate_ok("postgres://h/db?target_session_attrs=read-write&channel_binding=require");
        assert_eq!(
            c.driver_config().get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            c.driver_config().get_channel_binding(),
            ChannelBinding::Require
        );
        for (v, attrs) in [
            ("any", TargetSessionAttrs::Any),
            ("read-write", TargetSessionAttrs::ReadWrite),
            ("read-only", TargetSessionAttrs::ReadOnly),
        ] {
            let c = translate_ok(&format!("postgres://h/db?target_session_attrs={v}"));
            assert_eq!(c.driver_config().get_target_session_attrs(), attrs, "{v}");
        }
        for v in ["primary", "standby", "prefer-standby"] {
            let err = refused(&format!("postgres://h/db?target_session_attrs={v}"));
            assert!(
                err.contains(&format!("target_session_attrs={v} is not supported")),
                "{err}"
            );
        }
        let err = refused("postgres://h/db?target_session_attrs=leader");
        assert!(err.contains("is not one of"), "{err}");
        for (v, binding) in [
            ("disable", ChannelBinding::Disable),
            ("prefer", ChannelBinding::Prefer),
            ("require", ChannelBinding::Require),
        ] {
            let c = translate_ok(&format!("postgres://h/db?channel_binding={v}"));
            assert_eq!(c.driver_config().get_channel_binding(), binding, "{v}");
        }
    }

    #[test]
    fn unknown_and_unsupported_keys_are_refused_by_name_never_sent() {
        let msg = refused("postgres://u@h/db?ssl=true");
        assert!(msg.contains("use sslmode=require"), "{msg}");
        let msg = refused(&format!("postgres://u:{PW}@h/db?keepalives_retries=3"));
        assert!(
            msg.contains("`keepalives_retries`") && msg.contains("keepalives_count"),
            "{msg}"
        );
        let msg = refused(&format!("postgres://u:{PW}@h/db?sslcrl=/x"));
        assert!(msg.contains("`sslcrl`"), "{msg}");
        let msg = refused(&format!("postgres://u@h/db?password={PW}&bogus=1"));
        assert!(msg.contains("`bogus`"), "{msg}");
        let msg = refused(&format!("postgres://u@h/db?sslpassword={PW}"));
        assert!(msg.contains("`sslpassword`"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_parameter() {
        assert!(refused("postgres://h/db?connect_timeout=ten").contains("connect_timeout"));
        assert!(refused("postgres://h/db?tcp_user_timeout=-1").contains("tcp_user_timeout"));
        assert!(refused("postgres://h/db?keepalives_count=x").contains("keepalives_count"));
        assert!(refused("postgres://h/db?channel_binding=x").contains("channel_binding"));
        assert!(refused("postgres://h/db?sslnegotiation=x").contains("sslnegotiation"));
        assert!(
            refused("postgres://h/db?sslmode=prefer&sslnegotiation=direct")
                .contains("sslnegotiation=direct")
        );
        let msg = refused("postgres://h/db?x");
        assert!(
            msg.contains("key=value") || msg.contains("'=value'"),
            "{msg}"
        );
        assert!(refused("postgres://h/d%zzb").contains("hex"));
        assert!(refused("mysql://h/db").contains("postgres://"));
    }

    #[test]
    fn zero_keepalive_values_leave_the_systems_defaults_as_in_libpq() {
        let c = translate_ok(
            "postgres://u@h/db?keepalives_idle=0&keepalives_interval=0&keepalives_count=0",
        );
        let driver = c.driver_config();
        // tokio-postgres's own idle default (Linux's, 2 h), no interval, no count.
        assert_eq!(driver.get_keepalives_idle(), secs(2 * 60 * 60));
        assert_eq!(driver.get_keepalives_interval(), None);
        assert_eq!(driver.get_keepalives_retries(), None);
    }

    #[test]
    fn gssencmode_is_read_as_a_libpq_without_gssapi_reads_it() {
        for v in ["disable", "prefer"] {
            translate_ok(&format!("postgres://u@h/db?gssencmode={v}"));
        }
        let err = refused("postgres://u@h/db?gssencmode=require");
        assert!(err.contains("not supported (no GSSAPI)"), "{err}");
        let err = refused("postgres://u@h/db?gssencmode=always");
        assert!(err.contains("is not one of"), "{err}");
    }

    #[test]
    fn tls_protocol_versions_are_read_in_libpqs_spelling() {
        for (v, version) in [
            ("TLSv1", TlsVersion::Tls1_0),
            ("TLSv1.1", TlsVersion::Tls1_1),
            ("tlsv1.2", TlsVersion::Tls1_2),
            ("TLSv1.3", TlsVersion::Tls1_3),
        ] {
            let c = translate_ok(&format!(
                "postgres://u@h/db?ssl_min_protocol_version={v}&ssl_max_protocol_version={v}"
            ));
            assert_eq!(c.tls().min_protocol, Some(version), "{v}");
            assert_eq!(c.tls().max_protocol, Some(version), "{v}");
        }
        let err = refused("postgres://u@h/db?ssl_min_protocol_version=SSLv3");
        assert!(err.contains("is not one of TLSv1"), "{err}");
    }

    #[test]
    fn one_port_serves_every_host() {
        let ports = |url: &str| -> Vec<u16> {
            translate_ok(url).targets().iter().map(|t| t.port).collect()
        };
        assert_eq!(ports("postgres://u@/db?host=a,b&port=6000"), [6000, 6000]);
        let err = refused("postgres://u@/db?host=a,b,c&port=6000,6001");
        assert!(err.contains("2 ports for 3 hosts"), "{err}");
    }

    #[test]
    fn an_empty_host_item_is_the_default_socket_or_the_hostaddr_alone() {
        let c = translate_ok("postgres://u@/db?host=,db.example&port=6000,6001");
        let t = c.targets();
        // libpq's usual socket directories, the first that exists.
        assert!(
            matches!(&t[0].host, Some(Host::Unix(dir))
                if DEFAULT_SOCKET_DIRS.iter().any(|d| dir.as_path() == Path::new(d))),
            "{t:?}"
        );
        assert_eq!(t[1].host, Some(Host::Tcp("db.example".into())));
        let c = translate_ok("postgres://u@/db?host=,db.example&hostaddr=10.0.0.1,10.0.0.2");
        assert_eq!(c.targets()[0].host, None);
    }

    #[test]
    fn an_abstract_unix_socket_is_refused() {
        let err = refused("postgres://u@/db?host=%40pg");
        assert!(err.contains("abstract Unix socket"), "{err}");
    }

    #[test]
    fn client_encoding_utf8_is_accepted_and_any_other_refused() {
        for v in ["UTF8", "utf8", "UTF-8", "unicode", "auto"] {
            translate_ok(&format!("postgres://u@h/db?client_encoding={v}"));
        }
        let err = refused("postgres://u@h/db?client_encoding=LATIN1");
        assert!(err.contains("always use UTF8"), "{err}");
    }

    #[test]
    fn a_pool_wide_system_root_means_the_systems_roots_as_in_the_url() {
        let mut s = ConnectSettings::default();
        s.ssl_root_cert = Some(PathBuf::from("system"));
        s.ssl_mode = Some(SslMode::VerifyFull);
        let c = translate_with("postgres://u@db.example/db", &s);
        assert_eq!(c.tls().root_certs, RootCerts::System);
        s.ssl_root_cert = Some(PathBuf::from("/etc/ca.crt"));
        let c = translate_with("postgres://u@db.example/db", &s);
        assert_eq!(c.tls().root_certs, RootCerts::File("/etc/ca.crt".into()));
    }

    #[test]
    fn targets_display_as_libpq_names_them_in_messages() {
        let shown = |url: &str| -> Vec<String> {
            translate_ok(url)
                .targets()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            shown("postgres://u@db.example:6000/db"),
            ["db.example:6000"]
        );
        assert_eq!(shown("postgres://u@[::1]:6000/db"), ["[::1]:6000"]);
        assert_eq!(shown("postgres://u@[::1]/db"), ["[::1]:5432"]);
        assert_eq!(
            shown("postgres://u@db/db?hostaddr=10.0.0.1&port=6001"),
            ["db:6001 (10.0.0.1)"]
        );
        assert_eq!(
            shown("postgres://u@/db?hostaddr=::1&port=6002"),
            ["[::1]:6002"]
        );
        assert_eq!(
            shown("postgres://u@/db?hostaddr=10.0.0.2"),
            ["10.0.0.2:5432"]
        );
        assert_eq!(
            shown("postgres://u@/db?host=/tmp&port=6003"),
            ["/tmp/.s.PGSQL.6003"]
        );
    }

    #[test]
    fn the_config_debugs_its_masked_url_and_its_targets() {
        let c = translate_ok(&format!(
            "postgres://u:{PW}@db.example:6000/db?connect_timeout=7"
        ));
        let debug = format!("{c:?}");
        assert!(debug.starts_with("PgConnectConfig {"), "{debug}");
        assert!(
            debug.contains("url: \"postgres://u:***@db.example:6000/db"),
            "{debug}"
        );
        assert!(debug.contains("port: 6000"), "{debug}");
        assert!(debug.contains("connect_timeout: Some(7s)"), "{debug}");
        assert!(!debug.contains(PW), "{debug}");
        let connector = PgConnector::new(c).unwrap();
        let debug = format!("{connector:?}");
        assert!(
            debug.starts_with("PgConnector { config: PgConnectConfig {"),
            "{debug}"
        );
        assert!(debug.contains("postgres://u:***@db.example"), "{debug}");
        assert!(!debug.contains(PW), "{debug}");
    }

    #[test]
    fn no_password_in_debug_or_errors() {
        let c = translate_ok(&format!("postgres://u:{PW}@h/db"));
        assert!(!format!("{c:?}").contains(PW));
        let c = translate_ok(&format!("postgres://u@h/db?password={PW}"));
        assert!(!format!("{c:?}").contains(PW));
        assert_eq!(c.redact(&format!("auth failed: {PW}")), "auth failed: ***");
        refused(&format!("postgres://u:{PW}@h/db?connect_timeout=x"));
        refused(&format!("postgres://u:{}@h/db?nope=1", "p%40ss"));
    }

    #[test]
    fn pool_config_is_translated_and_other_backends_refused() {
        let config = PoolConfig::builder("postgres://u@h/db?keepalives_count=9")
            .tcp_user_timeout(Some(secs(4)))
            .build()
            .unwrap();
        let c = PgConnectConfig::from_pool_config(&config).unwrap();
        assert_eq!(c.driver_config().get_keepalives_retries(), Some(9));
        assert_eq!(c.driver_config().get_tcp_user_timeout(), Some(&secs(4)));
        let sqlite = PoolConfig::builder("sqlite://x.db").build().unwrap();
        assert!(PgConnectConfig::from_pool_config(&sqlite).is_err());
    }

    #[test]
    fn the_connect_future_is_send_for_pools() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<PgConnector>();
        let connector =
            PgConnector::from_url("postgres://h/db", &ConnectSettings::default()).unwrap();
        let fut = connector.connect();
        assert_send(&fut);
    }

    /// A name with several addresses (a dual-stack host, a round-robin record): each address
    /// but the last, when it fails, is logged with the next one's try, and the error is the
    /// last address's. (The resolver here gives one address per name, so the addresses are
    /// given directly; nothing listens on the port.)
    #[tokio::test]
    async fn each_address_of_a_name_but_the_last_is_logged_before_the_next_is_tried() {
        test_support::capture_logs();
        let port = test_support::free_port();
        let name = "several-addresses.invalid";
        let connector = PgConnector::from_url(
            &format!("postgres://app@{name}:{port}/db?connect_timeout=5"),
            &ConnectSettings::default(),
        )
        .unwrap();
        let target = connector.config().targets()[0].clone();
        let addrs: Vec<IpAddr> = vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()];
        let Err(err) = tokio::time::timeout(
            Duration::from_secs(20),
            connector.connect_addrs(&target, name, addrs, false),
        )
        .await
        .expect("two refused connects took over 20 s") else {
            panic!("connected where nothing listens");
        };
        assert!(
            err.to_string().contains("127.0.0.3"),
            "not the last address's: {err}"
        );
        let warnings: Vec<String> = test_support::captured_logs()
            .into_iter()
            .filter(|l| l.contains(&format!("trying the next address of {name}")))
            .collect();
        assert_eq!(
            warnings.len(),
            1,
            "one warning, before the second address: {warnings:?}"
        );
        assert!(
            warnings[0].contains("127.0.0.2") && warnings[0].starts_with("WARN"),
            "{warnings:?}"
        );
    }
}

#[cfg(all(test, feature = "tls-openssl"))]
mod tls_hint_tests {
    use super::*;

    /// A throwaway self-signed certificate (PEM), as a root file.
    fn self_signed() -> Vec<u8> {
        use openssl::{asn1::Asn1Time, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "ca").unwrap();
        let name = name.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        b.build().to_pem().unwrap()
    }

    /// What OpenSSL reports, with its verify result's text after `::`.
    fn failed(reason: &str) -> String {
        format!(
            "error performing TLS handshake: error:0A000086:SSL routines:\
             tls_post_process_server_certificate:certificate verify failed:\
             ssl/statem/statem_clnt.c:2125:: {reason}"
        )
    }

    #[test]
    fn each_verify_failure_gets_its_own_hint_and_only_an_unknown_issuer_blames_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, self_signed()).unwrap();
        let with_file = PgConnector::from_url(
            &format!(
                "postgres://h/db?sslmode=verify-full&sslrootcert={}",
                ca.display()
            ),
            &ConnectSettings::default(),
        )
        .unwrap();
        let system = PgConnector::from_url(
            "postgres://h/db?sslmode=verify-full",
            &ConnectSettings::default(),
        )
        .unwrap();
        let roots = "not signed by a root";
        for reason in [
            "unable to get local issuer certificate",
            "self-signed certificate in certificate chain",
            "self signed certificate",
            "certificate signature failure",
        ] {
            let hint = with_file.tls_hint(failed(reason));
            assert!(
                hint.contains("not signed by a root in sslrootcert"),
                "{hint}"
            );
            let hint = system.tls_hint(failed(reason));
            assert!(hint.contains("root this system trusts"), "{hint}");
        }
        for (reason, own) in [
            ("certificate has expired", "needs a renewed certificate"),
            ("certificate is not yet valid", "not valid yet"),
            ("hostname mismatch", "does not name the host"),
            ("IP address mismatch", "does not name the host"),
        ] {
            let hint = with_file.tls_hint(failed(reason));
            assert!(hint.contains(own), "{hint}");
            assert!(!hint.contains(roots), "{reason}: {hint}");
        }
        let other = failed("certificate revoked");
        assert_eq!(
            with_file.tls_hint(other.clone()),
            other,
            "no hint rather than a wrong one"
        );
    }
}
