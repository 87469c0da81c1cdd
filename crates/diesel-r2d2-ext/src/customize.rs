//! Customizers for a stock r2d2 builder: session settings, SQLite pragmas and TCP keepalives,
//! added in one line to a pool you keep building yourself.
//!
//! ```no_run
//! use std::time::Duration;
//! use diesel::r2d2::ConnectionManager;
//! use diesel::PgConnection;
//! use diesel_r2d2_ext::customize::{SessionSettings, TcpKeepalives};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = r2d2::Pool::builder()
//!     .max_size(15)
//!     .connection_customizer(Box::new(
//!         SessionSettings::new().statement_timeout(Duration::from_secs(30)).validate()?,
//!     ))
//!     .build(ConnectionManager::<PgConnection>::new("postgres://app@db/app"))?;
//! # Ok(())
//! # }
//! ```
//!
//! r2d2 takes one customizer per pool; to apply several, wrap them in [`Both`].
//!
//! Each works with Diesel's own `ConnectionManager` (error type `diesel::r2d2::Error`) and with
//! [`ExtManager`](crate::ExtManager) ([`ExtError`]); see [`CustomizeError`]. A customizer's
//! error fails that connect (r2d2 discards the connection and logs the error through its
//! error handler); no value is ever sent to the server unchecked.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel_ext_common::session::{Session, SettingsError};

use crate::manager::ExtError;

/// The error types of the r2d2 managers these customizers work with: Diesel's
/// `ConnectionManager` (`diesel::r2d2::Error`) and [`ExtManager`](crate::ExtManager)
/// ([`ExtError`]).
pub trait CustomizeError: Sized + 'static {
    /// The error a failed customizer returns, from the statement's error.
    fn from_query(error: diesel::result::Error) -> Self;

    /// The error a customizer holding a bad value returns.
    fn from_settings(error: SettingsError) -> Self;
}

impl CustomizeError for diesel::r2d2::Error {
    fn from_query(error: diesel::result::Error) -> Self {
        diesel::r2d2::Error::QueryError(error)
    }

    fn from_settings(error: SettingsError) -> Self {
        diesel::r2d2::Error::QueryError(diesel::result::Error::QueryBuilderError(Box::new(error)))
    }
}

impl CustomizeError for ExtError {
    fn from_query(error: diesel::result::Error) -> Self {
        ExtError::Setup {
            target: "the server".to_owned(),
            message: error.to_string(),
        }
    }

    fn from_settings(error: SettingsError) -> Self {
        ExtError::Setup {
            target: "the server".to_owned(),
            message: error.to_string(),
        }
    }
}

/// Session settings (`statement_timeout`, `lock_timeout`,
/// `idle_in_transaction_session_timeout`, `application_name`) set with one round trip on
/// every new PostgreSQL connection of a stock r2d2 pool.
///
/// ```no_run
/// use std::time::Duration;
/// use diesel::r2d2::ConnectionManager;
/// use diesel::PgConnection;
/// use diesel_r2d2_ext::customize::SessionSettings;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = SessionSettings::new()
///     .statement_timeout(Duration::from_secs(30))
///     .lock_timeout(Duration::from_secs(5))
///     .idle_in_transaction_session_timeout(Duration::from_secs(60))
///     .application_name("orders-api")
///     .validate()?; // optional: a bad value would otherwise fail every connect
/// let pool = r2d2::Pool::builder()
///     .connection_customizer(Box::new(settings))
///     .build(ConnectionManager::<PgConnection>::new("postgres://app@db/app"))?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSettings(Session);

impl SessionSettings {
    diesel_ext_common::session_setters!();
}

#[cfg(feature = "postgres")]
impl<E: CustomizeError> r2d2::CustomizeConnection<diesel::PgConnection, E> for SessionSettings {
    fn on_acquire(&self, conn: &mut diesel::PgConnection) -> Result<(), E> {
        let sql = self.0.sql().map_err(E::from_settings)?;
        if sql.is_empty() {
            return Ok(());
        }
        conn.batch_execute(&sql).map_err(E::from_query)
    }
}

/// SQLite pragmas (`busy_timeout`, WAL journaling, foreign keys) on every new connection of a
/// stock r2d2 pool of `SqliteConnection`s. Defaults as the extended pool's: 5 s, WAL on,
/// foreign keys on.
///
/// ```no_run
/// use std::time::Duration;
/// use diesel::r2d2::ConnectionManager;
/// use diesel::SqliteConnection;
/// use diesel_r2d2_ext::customize::SqlitePragmas;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = r2d2::Pool::builder()
///     .connection_customizer(Box::new(SqlitePragmas::new().busy_timeout(Duration::from_secs(2))))
///     .build(ConnectionManager::<SqliteConnection>::new("app.db"))?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct SqlitePragmas {
    settings: pool_core::config::SqliteSettings,
    error: Option<SettingsError>,
}

impl SqlitePragmas {
    /// The extended pool's defaults: `busy_timeout` 5 s, WAL on, foreign keys on.
    pub fn new() -> Self {
        Self::default()
    }

    /// `PRAGMA busy_timeout`: how long a writer waits for a lock instead of failing with
    /// "database is locked". Whole milliseconds, up to `i32::MAX`; zero fails at once.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        match diesel_ext_common::session::timeout_millis("busy_timeout", timeout) {
            Ok(_) => self.settings.busy_timeout = timeout,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// `PRAGMA journal_mode = WAL` (readers do not block the writer). Turning it off leaves
    /// the journal mode as it is.
    pub fn wal(mut self, on: bool) -> Self {
        self.settings.wal = on;
        self
    }

    /// `PRAGMA foreign_keys = ON` (or `OFF`).
    pub fn foreign_keys(mut self, on: bool) -> Self {
        self.settings.foreign_keys = on;
        self
    }

    /// Checks the values given: `Ok(self)` if every one can be applied, else the first bad
    /// one (which would otherwise fail every connect).
    ///
    /// # Errors
    /// The first invalid value given.
    pub fn validate(self) -> Result<Self, SettingsError> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(self),
        }
    }
}

#[cfg(feature = "sqlite")]
impl<E: CustomizeError> r2d2::CustomizeConnection<diesel::SqliteConnection, E> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut diesel::SqliteConnection) -> Result<(), E> {
        if let Some(e) = &self.error {
            return Err(E::from_settings(e.clone()));
        }
        let pragmas = diesel_ext_common::sqlite::pragmas(&self.settings);
        // Switching a new file to WAL takes an exclusive lock; two connections opened at once
        // (r2d2 connects on three threads) can find each other holding it, which SQLite
        // reports at once, without waiting for busy_timeout: try again a few times.
        let mut tries = 0;
        loop {
            match conn.batch_execute(&pragmas) {
                Err(e) if tries < 20 && e.to_string().contains("database is locked") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other.map_err(E::from_query),
            }
        }
    }
}

/// TCP keepalives and `TCP_USER_TIMEOUT` set on the socket of every new PostgreSQL
/// connection of a stock r2d2 pool, so that a connection whose peer vanished (a NAT that
/// forgot the flow, a host that died) fails within seconds instead of hanging until the
/// kernel gives up (15 minutes and more). Defaults as the extended pool's: first probe after
/// 30 s idle, then every 10 s, 3 unanswered probes; `TCP_USER_TIMEOUT` 30 s.
///
/// The socket is libpq's, which Diesel keeps private: it is found from the side (the
/// process's sockets, one round trip to tell them apart when there are several; see the
/// crate's `socket` notes), or taken from [`ExtManager`](crate::ExtManager)'s own record.
/// Linux only; elsewhere, or when the socket cannot be told apart from others that are busy
/// at the same instant, nothing is set and a warning is logged. A Unix-socket connection has
/// no TCP options: nothing to set. Writing the same settings as libpq parameters in the URL
/// (`keepalives_idle=30&keepalives_interval=10&keepalives_count=3&tcp_user_timeout=30000`)
/// needs no customizer.
///
/// ```no_run
/// use std::time::Duration;
/// use diesel::r2d2::ConnectionManager;
/// use diesel::PgConnection;
/// use diesel_r2d2_ext::customize::TcpKeepalives;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = r2d2::Pool::builder()
///     .connection_customizer(Box::new(
///         TcpKeepalives::new().idle(Duration::from_secs(20)).user_timeout(Duration::from_secs(15)),
///     ))
///     .build(ConnectionManager::<PgConnection>::new("postgres://app@db/app"))?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpKeepalives {
    idle_secs: u32,
    interval_secs: u32,
    count: u32,
    user_timeout_ms: Option<u32>,
    error: Option<SettingsError>,
}

impl Default for TcpKeepalives {
    fn default() -> Self {
        TcpKeepalives {
            idle_secs: 30,
            interval_secs: 10,
            count: 3,
            user_timeout_ms: Some(30_000),
            error: None,
        }
    }
}

/// Linux's limits (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`, `MAX_TCP_KEEPCNT`).
const MAX_KEEP_SECS: u64 = 32_767;
const MAX_KEEP_COUNT: u32 = 127;

fn whole_secs(setting: &'static str, d: Duration) -> Result<u32, SettingsError> {
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > MAX_KEEP_SECS {
        return Err(SettingsError {
            setting,
            reason: format!("is {d:?}: the kernel takes whole seconds from 1 to {MAX_KEEP_SECS}"),
        });
    }
    Ok(d.as_secs() as u32)
}

impl TcpKeepalives {
    /// The extended pool's defaults: probes after 30 s idle, every 10 s, 3 of them;
    /// `TCP_USER_TIMEOUT` 30 s.
    pub fn new() -> Self {
        Self::default()
    }

    fn keep(&mut self, result: Result<(), SettingsError>) {
        if let (Err(e), None) = (result, &self.error) {
            self.error = Some(e);
        }
    }

    /// Idle time before the first probe (`TCP_KEEPIDLE`): whole seconds, 1 to 32767.
    pub fn idle(mut self, idle: Duration) -> Self {
        let r = whole_secs("keepalives_idle", idle).map(|s| self.idle_secs = s);
        self.keep(r);
        self
    }

    /// Time between probes (`TCP_KEEPINTVL`): whole seconds, 1 to 32767.
    pub fn interval(mut self, interval: Duration) -> Self {
        let r = whole_secs("keepalives_interval", interval).map(|s| self.interval_secs = s);
        self.keep(r);
        self
    }

    /// Unanswered probes before the connection is declared dead (`TCP_KEEPCNT`): 1 to 127.
    pub fn count(mut self, count: u32) -> Self {
        let r = if (1..=MAX_KEEP_COUNT).contains(&count) {
            self.count = count;
            Ok(())
        } else {
            Err(SettingsError {
                setting: "keepalives_count",
                reason: format!("is {count}: the kernel takes 1 to {MAX_KEEP_COUNT}"),
            })
        };
        self.keep(r);
        self
    }

    /// How long sent data may stay unacknowledged before the connection is dropped
    /// (`TCP_USER_TIMEOUT`): whole milliseconds up to `u32::MAX`; zero leaves the kernel's
    /// default (none).
    pub fn user_timeout(mut self, timeout: Duration) -> Self {
        let ms = timeout.as_millis();
        let r = if !timeout.subsec_nanos().is_multiple_of(1_000_000) || ms > u128::from(u32::MAX) {
            Err(SettingsError {
                setting: "tcp_user_timeout",
                reason: format!(
                    "is {timeout:?}: the kernel takes whole milliseconds up to {} ms",
                    u32::MAX
                ),
            })
        } else {
            self.user_timeout_ms = (ms > 0).then_some(ms as u32);
            Ok(())
        };
        self.keep(r);
        self
    }

    /// Checks the values given: `Ok(self)` if every one can be applied, else the first bad
    /// one (which would otherwise fail every connect).
    ///
    /// # Errors
    /// The first invalid value given.
    pub fn validate(self) -> Result<Self, SettingsError> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(self),
        }
    }

    /// Sets the options on `fd` (a TCP socket; a Unix-domain one is left alone).
    #[cfg(all(target_os = "linux", feature = "postgres"))]
    fn apply(&self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        fn set(fd: std::os::fd::RawFd, level: i32, name: i32, value: u32) -> std::io::Result<()> {
            let value = value as libc::c_int;
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`, which lives
            // across the call; `fd` is a socket we hold open.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        // SAFETY: an all-zero `sockaddr_storage` is a valid value of this plain C struct.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `addr`, which we own.
        let rc = unsafe {
            libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if !matches!(i32::from(addr.ss_family), libc::AF_INET | libc::AF_INET6) {
            return Ok(());
        }
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, self.idle_secs)?;
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            self.interval_secs,
        )?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, self.count)?;
        if let Some(ms) = self.user_timeout_ms {
            set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
        }
        Ok(())
    }
}

#[cfg(feature = "postgres")]
impl<E: CustomizeError> r2d2::CustomizeConnection<diesel::PgConnection, E> for TcpKeepalives {
    fn on_acquire(&self, conn: &mut diesel::PgConnection) -> Result<(), E> {
        if let Some(e) = &self.error {
            return Err(E::from_settings(e.clone()));
        }
        #[cfg(target_os = "linux")]
        {
            use diesel::r2d2::R2D2Connection;
            // ExtManager's record first (its socket is claimed, so a scan would not see it).
            let known = crate::tracker::tracker_of(conn).and_then(|t| t.extra.get().cloned());
            let socket = match known {
                Some(socket) => Some(socket),
                None => match crate::socket::find_established(&mut || conn.ping().is_ok()) {
                    crate::socket::SocketClaim::Found(socket) => Some(socket),
                    _ => None,
                },
            };
            match socket {
                Some(socket) => {
                    return self.apply(socket.raw_fd()).map_err(|e| {
                        E::from_settings(SettingsError {
                            setting: "keepalives",
                            reason: format!("could not be set on the connection's socket: {e}"),
                        })
                    });
                }
                None => {
                    log::warn!(target: pool_core::events::LOG_TARGET, "TcpKeepalives: the new connection's socket could not be told apart from other busy sockets of the process; its keepalives are libpq's (set them in the URL to be sure)")
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = conn;
            log::warn!(target: pool_core::events::LOG_TARGET, "TcpKeepalives: sockets cannot be reached on this platform; set keepalives as libpq parameters in the URL");
        }
        Ok(())
    }
}

/// Two customizers in one, run in order (r2d2 takes one per pool):
/// `.connection_customizer(Box::new(Both(SessionSettings::new()..., TcpKeepalives::new())))`.
/// Nest it for more. A connection released by the pool is handed to neither's `on_release`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Both<A, B>(pub A, pub B);

impl<C, E, A, B> r2d2::CustomizeConnection<C, E> for Both<A, B>
where
    A: r2d2::CustomizeConnection<C, E>,
    B: r2d2::CustomizeConnection<C, E>,
{
    fn on_acquire(&self, conn: &mut C) -> Result<(), E> {
        self.0.on_acquire(conn)?;
        self.1.on_acquire(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(keepalives: TcpKeepalives) -> String {
        match keepalives.validate() {
            Ok(k) => panic!("accepted: {k:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn keepalive_seconds_are_whole_and_within_the_kernels_range() {
        for secs in [1, 30, 32_767] {
            let d = Duration::from_secs(secs);
            let k = TcpKeepalives::new().idle(d).interval(d).validate().unwrap();
            assert_eq!((k.idle_secs, k.interval_secs), (secs as u32, secs as u32));
        }
        for d in [
            Duration::ZERO,
            Duration::from_secs(32_768),
            Duration::from_millis(1500),
            Duration::from_millis(500),
        ] {
            let err = refused(TcpKeepalives::new().idle(d));
            assert!(err.contains("keepalives_idle"), "{d:?}: {err}");
            let err = refused(TcpKeepalives::new().interval(d));
            assert!(err.contains("keepalives_interval"), "{d:?}: {err}");
        }
        for n in [0, 128] {
            assert!(refused(TcpKeepalives::new().count(n)).contains("keepalives_count"));
        }
        assert_eq!(
            TcpKeepalives::new().count(127).validate().unwrap().count,
            127
        );
    }

    #[test]
    fn the_user_timeout_is_whole_milliseconds_up_to_u32_max_and_zero_is_none() {
        let k = TcpKeepalives::new()
            .user_timeout(Duration::from_millis(u64::from(u32::MAX)))
            .validate()
            .unwrap();
        assert_eq!(k.user_timeout_ms, Some(u32::MAX));
        let k = TcpKeepalives::new()
            .user_timeout(Duration::ZERO)
            .validate()
            .unwrap();
        assert_eq!(k.user_timeout_ms, None);
        for d in [
            Duration::from_micros(1500),
            Duration::from_millis(u64::from(u32::MAX) + 1),
        ] {
            let err = refused(TcpKeepalives::new().user_timeout(d));
            assert!(err.contains("tcp_user_timeout"), "{d:?}: {err}");
        }
    }

    #[test]
    fn the_first_bad_value_is_the_one_reported() {
        let err = refused(
            TcpKeepalives::new()
                .count(0)
                .idle(Duration::ZERO)
                .interval(Duration::ZERO),
        );
        assert!(err.contains("keepalives_count"), "{err}");
    }
}
