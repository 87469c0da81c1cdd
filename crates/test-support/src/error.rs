//! The one error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, driving or stopping a test server or a fault
/// injector. Every message says what was attempted (which binary, which command, which SQL)
/// and, where there is one, what the tool printed. [`PgServer::PASSWORD`] never appears in a
/// message: command output and log tails are redacted before they are stored here.
///
/// [`PgServer::PASSWORD`]: crate::PgServer::PASSWORD
#[derive(Debug, thiserror::Error)]
pub enum TestSupportError {
    /// The PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) could not be found.
    #[error("PostgreSQL server binaries not found: {0}")]
    BinariesNotFound(String),

    /// Running as root, but there is no unprivileged `postgres` system user to run the server as.
    #[error(
        "running as root and no `postgres` system user exists: PostgreSQL refuses to run as \
         root, so test servers need an unprivileged `postgres` user (create one, e.g. \
         `useradd --system --user-group postgres`, or run the tests as a normal user)"
    )]
    NoUnprivilegedUser,

    /// An external command could not be run or exited unsuccessfully.
    #[error("`{binary}` failed: {status}\ncommand: {command}\noutput:\n{output}")]
    Command {
        /// The binary that was run (full path).
        binary: String,
        /// The whole command line, for copy and paste.
        command: String,
        /// How it ended (exit status, or why it could not be spawned).
        status: String,
        /// Its stdout and stderr (redacted).
        output: String,
    },

    /// The server did not come up.
    #[error("PostgreSQL test server did not start on port {port}: {reason}\nlast lines of {}:\n{tail}", log.display())]
    StartFailed {
        /// The port the server was configured with.
        port: u16,
        /// What went wrong (pg_ctl's output or a timeout).
        reason: String,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of that log (redacted).
        tail: String,
    },

    /// A file-system or socket operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Generating the TLS CA or server certificate failed.
    #[error("generating the test TLS certificates failed: {0}")]
    Tls(#[from] openssl::error::ErrorStack),

    /// The admin connection (superuser, over TCP) could not be opened.
    #[error("could not open an admin connection to the test server on port {port}: {source}")]
    Connect {
        /// The server's port.
        port: u16,
        /// Diesel's error.
        #[source]
        source: diesel::ConnectionError,
    },

    /// An admin query failed.
    #[error("admin query failed: {sql}: {source}")]
    Query {
        /// The SQL that failed.
        sql: String,
        /// Diesel's error.
        #[source]
        source: diesel::result::Error,
    },

    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },

    /// No backend with the given `application_name` exists (e.g. nothing to pause).
    #[error("no backend with application_name {0:?} is connected")]
    NoBackends(String),

    /// Sending a signal to a process failed.
    #[error("sending {signal} to pid {pid} failed: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The target process.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// PgBouncer is not installed and could not be installed
    /// (`scripts/install-pgbouncer.sh`).
    #[error("PgBouncer is not available: {0}")]
    PgBouncerMissing(String),

    /// A PgBouncer admin console command failed.
    #[error("PgBouncer admin command {command:?} failed: {message}")]
    Admin {
        /// The command.
        command: String,
        /// libpq's or PgBouncer's message (redacted).
        message: String,
    },

    /// The per-process template cluster could not be prepared earlier in this process.
    #[error("the template cluster of this process could not be prepared: {0}")]
    Template(String),
}

impl TestSupportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TestSupportError::Io {
            context: context.into(),
            source,
        }
    }
}
