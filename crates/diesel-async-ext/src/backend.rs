//! What the pool needs to know about each backend: how to open a connection, the
//! zero-round-trip liveness probe, the ping, and whether a returned session is dirty.
//!
//! | | PostgreSQL ([`AsyncPgConnection`](diesel_async::AsyncPgConnection)) | SQLite ([`SyncConnectionWrapper`]`<SqliteConnection>`) |
//! |---|---|---|
//! | open | [`PgConnector`](crate::PgConnector): libpq's URL meanings, OpenSSL or rustls TLS, whole-connect timeout | `establish` on the blocking pool, then `busy_timeout`, WAL, `foreign_keys` |
//! | probe | the tokio-postgres client's closed state: its connection task ends as soon as the server's FATAL or the FIN/RST arrives | none needed (embedded): always alive |
//! | ping | `SELECT 1` as a simple query (one round trip) | `SELECT 1` |
//! | dirty at checkin | a transaction open, its manager broken (a cancelled `BEGIN`/`COMMIT`), or the client closed | a transaction open or its manager broken |

use std::future::Future;

use diesel::QueryResult;
use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::AsyncConnection;
use pool_core::classify::ErrorClass;
use pool_core::config::PoolConfig;
use pool_core::engine::ConnectClass;
use pool_core::error::ConfigError;
use pool_core::lifecycle::ProbeResult;

#[cfg(feature = "sqlite")]
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;

use crate::manager::ConnectCause;
use crate::tracker::ServerSocket;
use sealed::OpenFailure;

/// A diesel-async connection type the extended pool can manage: [`AsyncPgConnection`] and
/// [`SyncConnectionWrapper`]`<SqliteConnection>`.
///
/// Sealed: implemented by this crate for the backends enabled by cargo features.
///
/// [`AsyncPgConnection`]: diesel_async::AsyncPgConnection
pub trait ExtConnection:
    AsyncConnection + PoolableConnection + Send + Sized + 'static + sealed::Backend
{
}

pub(crate) mod sealed {
    use super::*;

    /// A failed attempt to open a connection: its cause and the redacted message.
    #[derive(Debug)]
    pub struct OpenFailure {
        pub(crate) cause: ConnectCause,
        /// Whether retrying can help (see `pool_core::engine::health`).
        pub(crate) class: ConnectClass,
        pub(crate) message: String,
    }

    /// What the pool's builder says about opening connections beyond its `PoolConfig`.
    #[derive(Debug, Clone, Default)]
    pub struct OpenerOptions {
        /// The TLS stack of PostgreSQL connections (`None`: the default).
        #[cfg(feature = "postgres-core")]
        pub(crate) tls_backend: Option<crate::tls::TlsBackend>,
    }

    /// What the manager needs to know about a backend; not nameable outside the crate.
    pub trait Backend: Sized + Send + 'static {
        /// Opens connections; built once per pool.
        type Opener: Send + Sync + 'static;

        /// Builds the opener for `config` (translates the URL, reads certificates).
        fn opener(
            config: &PoolConfig,
            options: &OpenerOptions,
        ) -> Result<Self::Opener, ConfigError>;

        /// Opens one connection with the pool's settings applied; with `claim_socket`, also
        /// our duplicate of its socket where the backend has one and it can be told apart
        /// (for the close confirmation of a connection holding a budget permit).
        fn open(
            opener: &Self::Opener,
            config: &PoolConfig,
            claim_socket: bool,
        ) -> impl Future<Output = Result<(Self, ServerSocket), OpenFailure>> + Send;

        /// The zero-round-trip liveness probe, before any transaction.
        fn probe(&mut self) -> ProbeResult;

        /// One round trip; the caller bounds it by the validation timeout.
        fn ping_round_trip(&mut self) -> impl Future<Output = QueryResult<()>> + Send;

        /// After a "read-only transaction" error: is the server a standby now (a failover)?
        /// An error answering counts as yes.
        fn is_standby(&mut self) -> impl Future<Output = bool> + Send;

        /// The session is not fit to be pooled again: a transaction left open, a transaction
        /// manager left broken (a `BEGIN`/`COMMIT` whose future was dropped), a closed client.
        fn session_dirty(&mut self) -> bool;

        /// The class of a query error on this backend, as the pool's bookkeeping acts on it
        /// (a disconnect only when the driver reports one, never read from a message's text).
        fn classify(err: &diesel::result::Error) -> ErrorClass {
            crate::classify::classify_observed(err)
        }
    }
}

#[cfg(feature = "postgres-core")]
mod pg_backend {
    use super::*;
    use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};

    use crate::pg::{ConnectError, PgConnector};

    impl sealed::Backend for AsyncPgConnection {
        type Opener = PgConnector;

        fn opener(
            config: &PoolConfig,
            options: &sealed::OpenerOptions,
        ) -> Result<PgConnector, ConfigError> {
            let mut pg = crate::pg::PgConnectConfig::from_pool_config(config)?;
            if let Some(backend) = options.tls_backend {
                pg = pg.with_tls_backend(backend);
            }
            PgConnector::new(pg)
        }

        async fn open(
            opener: &PgConnector,
            config: &PoolConfig,
            claim_socket: bool,
        ) -> Result<(AsyncPgConnection, ServerSocket), OpenFailure> {
            let (mut conn, socket) = opener.connect_claiming(claim_socket).await.map_err(|e| {
                // The server's TLS alert refusing our client certificate arrives with the
                // first read after the handshake (TLS 1.3), as a failed read.
                let tls_alert =
                    matches!(&e, ConnectError::Network { message, .. } if message.contains("alert"));
                let class = match &e {
                    ConnectError::Auth { .. } | ConnectError::Config(_) => ConnectClass::Hopeless,
                    ConnectError::Server {
                        code: Some(code), ..
                    } => ConnectClass::of_sqlstate(code),
                    // Verification failed (a handshake cut short by the network is not).
                    ConnectError::Tls { message, .. } => ConnectClass::of_libpq_message(
                        &message.replace("Hostname mismatch", "does not match host name"),
                    ),
                    ConnectError::Network { message, .. } if tls_alert => {
                        ConnectClass::of_libpq_message(message)
                    }
                    _ => ConnectClass::Transient,
                };
                let cause = match &e {
                    ConnectError::Dns { .. } => ConnectCause::Dns,
                    ConnectError::Refused { .. } => ConnectCause::Refused,
                    ConnectError::Timeout { .. } => ConnectCause::Timeout,
                    ConnectError::Tls { .. } => ConnectCause::Tls,
                    ConnectError::Network { .. } if tls_alert => ConnectCause::Tls,
                    ConnectError::Auth { .. } => ConnectCause::Auth,
                    ConnectError::Server { .. } => ConnectCause::Server,
                    ConnectError::Network { .. } => ConnectCause::Network,
                    ConnectError::Config(_) => ConnectCause::Config,
                };
                OpenFailure {
                    cause,
                    class,
                    message: e.to_string(),
                }
            })?;
            if config.connect.pooler.is_transaction_mode() {
                // Behind a transaction-mode pooler a cached statement (a named statement
                // `sN` kept on the server connection it was prepared on) is missing where the
                // next transaction runs. Uncached, each statement is closed right after it
                // ran, inside its transaction. (tokio-postgres still prepares every statement
                // in a round trip of its own, before binding it: see the README for the
                // PgBouncer versions that support that outside transactions.)
                use diesel::connection::CacheSize;
                use diesel_async::AsyncConnection;
                conn.set_prepared_statement_cache_size(CacheSize::Disabled);
            }
            Ok((conn, ServerSocket::new(socket)))
        }

        fn probe(&mut self) -> ProbeResult {
            // Before any transaction this is the client's closed state: tokio-postgres's
            // connection task ends as soon as the server's FATAL, a FIN or a RST is read.
            if PoolableConnection::is_broken(self) {
                ProbeResult::Dead
            } else {
                ProbeResult::Alive
            }
        }

        async fn ping_round_trip(&mut self) -> QueryResult<()> {
            // A simple query: one round trip, no statement to prepare.
            self.batch_execute("SELECT 1").await
        }

        async fn is_standby(&mut self) -> bool {
            // One simple query, no statement prepared: a prepared statement outside a
            // transaction is not safe behind a transaction-mode pooler (its parse and its
            // execution may reach different server connections), and a failed check counts
            // as a standby. Any error (the marker, or a lost connection) says: do not reuse.
            self.batch_execute(STANDBY_CHECK).await.is_err()
        }

        fn session_dirty(&mut self) -> bool {
            PoolableConnection::is_broken(self)
        }
    }

    /// Fails on a server in recovery (a standby), passes on a primary: `pg_is_in_recovery()`
    /// through the simple query protocol, which has no result rows to read here.
    const STANDBY_CHECK: &str = "DO $$BEGIN IF pg_is_in_recovery() THEN \
         RAISE EXCEPTION 'resilient-diesel: the server is in recovery (a standby)'; \
         END IF; END$$";

    impl ExtConnection for AsyncPgConnection {}
}

#[cfg(feature = "sqlite")]
mod sqlite_backend {
    use super::*;
    use diesel::SqliteConnection;
    use diesel_async::SimpleAsyncConnection;

    impl sealed::Backend for SyncConnectionWrapper<SqliteConnection> {
        type Opener = String;

        fn opener(
            config: &PoolConfig,
            _options: &sealed::OpenerOptions,
        ) -> Result<String, ConfigError> {
            if config.url.backend() != pool_core::url::Backend::Sqlite {
                return Err(ConfigError::InvalidUrl {
                    url: config.url.redacted(),
                    reason: format!(
                        "this is a {} URL; a SQLite pool needs sqlite://path (or a path ending \
                         in .db, .sqlite or .sqlite3)",
                        config.url.backend()
                    ),
                });
            }
            Ok(config.url.expose_secret().to_owned())
        }

        async fn open(
            path: &String,
            config: &PoolConfig,
            _claim_socket: bool,
        ) -> Result<(SyncConnectionWrapper<SqliteConnection>, ServerSocket), OpenFailure> {
            let mut conn = SyncConnectionWrapper::<SqliteConnection>::establish(path)
                .await
                .map_err(|e| OpenFailure {
                    cause: ConnectCause::Other,
                    class: ConnectClass::Hopeless,
                    message: config.redact(&e.to_string()),
                })?;
            // Only SQLite's own settings; nothing meant for a server is ever sent. Switching a
            // new file to WAL takes an exclusive lock, and two connections opened at once can
            // find each other holding it (SQLite reports that at once, without waiting for
            // busy_timeout): try again a few times.
            let pragmas = diesel_ext_common::sqlite::pragmas(&config.sqlite);
            let mut tries = 0;
            loop {
                match conn.batch_execute(&pragmas).await {
                    Ok(()) => return Ok((conn, ServerSocket::default())),
                    Err(e) if tries < 20 && e.to_string().contains("database is locked") => {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        return Err(OpenFailure {
                            cause: ConnectCause::Setup,
                            class: ConnectClass::Hopeless,
                            message: config.redact(&e.to_string()),
                        })
                    }
                }
            }
        }

        fn probe(&mut self) -> ProbeResult {
            // An embedded database: nothing can close it under us.
            ProbeResult::Alive
        }

        async fn ping_round_trip(&mut self) -> QueryResult<()> {
            self.batch_execute("SELECT 1").await
        }

        async fn is_standby(&mut self) -> bool {
            false
        }

        fn session_dirty(&mut self) -> bool {
            PoolableConnection::is_broken(self)
        }
    }

    impl ExtConnection for SyncConnectionWrapper<SqliteConnection> {}
}
