//! Customizers for a stock bb8 builder: session settings added in one line to a pool you keep
//! building yourself.
//!
//! ```no_run
//! use std::time::Duration;
//! use diesel_async::pooled_connection::AsyncDieselConnectionManager;
//! use diesel_async::AsyncPgConnection;
//! use diesel_async_ext::customize::SessionSettings;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new("postgres://app@db/app");
//! let pool = bb8::Pool::builder()
//!     .max_size(15)
//!     .connection_customizer(Box::new(
//!         SessionSettings::new().statement_timeout(Duration::from_secs(30)).validate()?,
//!     ))
//!     .build(manager)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! Works with diesel-async's `AsyncDieselConnectionManager` (error type
//! `diesel_async::pooled_connection::PoolError`) and with [`ExtManager`](crate::ExtManager)
//! ([`ExtError`]); see [`CustomizeError`]. A customizer's error fails that connect (bb8 drops
//! the connection and hands the error to its error sink).
//!
//! **No TCP keepalive customizer here, on purpose.** tokio-postgres moves the socket into the
//! connection task it spawns, and neither it nor diesel-async gives access to the socket of an
//! established connection. Keepalives and `TCP_USER_TIMEOUT` are set before the connect
//! instead: in tokio-postgres's config (`keepalives_idle`, `keepalives_interval`,
//! `keepalives_retries` and `tcp_user_timeout` **in seconds** in the URL of diesel-async's own
//! manager), or by [`ExtManager`](crate::ExtManager) / [`PgConnector`](crate::PgConnector),
//! which apply the pool's keepalive settings (on by default: 30 s idle, 10 s interval, 3
//! probes, `TCP_USER_TIMEOUT` 30 s) and read libpq's spelling of them in the URL.

use diesel_async::pooled_connection::PoolError;
use diesel_ext_common::session::{Session, SettingsError};

use crate::manager::{ConnectCause, ExtError};

/// The error types of the bb8 managers these customizers work with: diesel-async's
/// `AsyncDieselConnectionManager` (`PoolError`) and [`ExtManager`](crate::ExtManager)
/// ([`ExtError`]).
pub trait CustomizeError: Sized + Send + 'static {
    /// The error a failed customizer returns, from the statement's error.
    fn from_query(error: diesel::result::Error) -> Self;

    /// The error a customizer holding a bad value returns.
    fn from_settings(error: SettingsError) -> Self;
}

impl CustomizeError for PoolError {
    fn from_query(error: diesel::result::Error) -> Self {
        PoolError::QueryError(error)
    }

    fn from_settings(error: SettingsError) -> Self {
        PoolError::QueryError(diesel::result::Error::QueryBuilderError(Box::new(error)))
    }
}

impl CustomizeError for ExtError {
    fn from_query(error: diesel::result::Error) -> Self {
        ExtError::Connect {
            pool: "(connection customizer)".to_owned(),
            cause: ConnectCause::Setup,
            message: error.to_string(),
        }
    }

    fn from_settings(error: SettingsError) -> Self {
        ExtError::Connect {
            pool: "(connection customizer)".to_owned(),
            cause: ConnectCause::Setup,
            message: error.to_string(),
        }
    }
}

/// Session settings (`statement_timeout`, `lock_timeout`,
/// `idle_in_transaction_session_timeout`, `application_name`) set with one round trip on
/// every new connection of a stock bb8 pool of `AsyncPgConnection`s.
///
/// ```no_run
/// use std::time::Duration;
/// use diesel_async::pooled_connection::AsyncDieselConnectionManager;
/// use diesel_async::AsyncPgConnection;
/// use diesel_async_ext::customize::SessionSettings;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = SessionSettings::new()
///     .statement_timeout(Duration::from_secs(30))
///     .lock_timeout(Duration::from_secs(5))
///     .idle_in_transaction_session_timeout(Duration::from_secs(60))
///     .application_name("orders-api")
///     .validate()?; // optional: a bad value would otherwise fail every connect
/// let pool = bb8::Pool::builder()
///     .connection_customizer(Box::new(settings))
///     .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new("postgres://app@db/app"))
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSettings(Session);

impl SessionSettings {
    diesel_ext_common::session_setters!();
}

#[cfg(feature = "postgres-core")]
impl<E: CustomizeError> bb8::CustomizeConnection<diesel_async::AsyncPgConnection, E>
    for SessionSettings
{
    fn on_acquire<'a>(
        &'a self,
        conn: &'a mut diesel_async::AsyncPgConnection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 'a>> {
        use diesel_async::SimpleAsyncConnection;
        Box::pin(async move {
            let sql = self.0.sql().map_err(E::from_settings)?;
            if sql.is_empty() {
                return Ok(());
            }
            conn.batch_execute(&sql).await.map_err(E::from_query)
        })
    }
}

/// Two customizers in one, run in order (bb8 takes one per pool):
/// `.connection_customizer(Box::new(Both(SessionSettings::new()..., your_own)))`. Nest it for
/// more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Both<A, B>(pub A, pub B);

impl<C, E, A, B> bb8::CustomizeConnection<C, E> for Both<A, B>
where
    C: Send + 'static,
    E: 'static,
    A: bb8::CustomizeConnection<C, E>,
    B: bb8::CustomizeConnection<C, E>,
{
    fn on_acquire<'a>(
        &'a self,
        conn: &'a mut C,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 'a>> {
        Box::pin(async move {
            self.0.on_acquire(conn).await?;
            self.1.on_acquire(conn).await
        })
    }
}
