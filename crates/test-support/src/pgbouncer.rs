//! Private, throwaway PgBouncers in front of a [`PgServer`].
//!
//! The binary is Debian's `pgbouncer` package (1.18 on bookworm); when it is missing,
//! `scripts/install-pgbouncer.sh` is run once per process to install it (root and apt-get
//! needed; the package's own system service is never started). [`Release::Recent`] runs
//! PgBouncer 1.24.1 instead, built from Debian 13's source by
//! `scripts/install-pgbouncer-recent.sh` when missing, for what needs 1.21 or later
//! (protocol-level prepared statements, `max_prepared_statements`). Each [`PgBouncer`] has its
//! own temp dir (config, auth file, log), a free loopback port, no unix socket, and an admin
//! console user; it runs as the server's unprivileged user, as a child of the test process
//! that dies with the thread that started it, and is killed (its dir removed) on drop, also
//! when the test panicked.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sys::{self, redact, RunAs};
use crate::{free_port, PgServer, TestSupportError};

/// Prefix of the temp dirs (`rdpgb-<pid>-*`), so a later process can tell stale ones.
const DIR_PREFIX: &str = "rdpgb-";
/// The admin console's user.
const ADMIN_USER: &str = "pgb_admin";
/// The admin console user's password (not a secret: the console is on loopback only and
/// exists for the test's lifetime).
const ADMIN_PASSWORD: &str = "pgb-admin-password";
/// How often a start is retried on a fresh port when the port was taken meanwhile.
const PORT_ATTEMPTS: usize = 8;
/// How long a start may take until the port accepts connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// PgBouncer's `pool_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// `session`: a server connection per client connection, as long as it lasts.
    Session,
    /// `transaction`: a server connection per transaction; between transactions the
    /// client's next statement may run on another one.
    Transaction,
}

impl PoolMode {
    /// PgBouncer's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// Which PgBouncer binary runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12's package (1.18): `PGBOUNCER`, else `pgbouncer` on `PATH` or in `/usr/sbin`,
    /// else installed by `scripts/install-pgbouncer.sh`.
    Debian,
    /// 1.24.1, with protocol-level prepared statements (`max_prepared_statements`, 1.21+):
    /// `PGBOUNCER_RECENT`, else built from Debian 13's source by
    /// `scripts/install-pgbouncer-recent.sh` into `/opt/resilient-diesel/pgbouncer-1.24.1`.
    Recent,
}

impl Release {
    /// The version this release's binary reports (`pgbouncer --version`).
    pub fn version(self) -> &'static str {
        match self {
            Release::Debian => "1.18",
            Release::Recent => RECENT_VERSION,
        }
    }
}

/// The version `scripts/install-pgbouncer-recent.sh` builds.
const RECENT_VERSION: &str = "1.24.1";

/// Options for [`PgBouncer::start_with`].
#[derive(Clone, Debug)]
pub struct PgBouncerOptions {
    pool_mode: PoolMode,
    default_pool_size: u32,
    extra_conf: Vec<String>,
    release: Release,
}

impl PgBouncerOptions {
    /// `pool_mode` as given, `default_pool_size = 2`.
    pub fn new(pool_mode: PoolMode) -> Self {
        PgBouncerOptions {
            pool_mode,
            default_pool_size: 2,
            extra_conf: Vec::new(),
            release: Release::Debian,
        }
    }

    /// Runs `release`'s binary instead of Debian 12's package.
    pub fn release(mut self, release: Release) -> Self {
        self.release = release;
        self
    }

    /// Server connections per database/user pair (`default_pool_size`).
    pub fn pool_size(mut self, n: u32) -> Self {
        self.default_pool_size = n;
        self
    }

    /// An extra line for the `[pgbouncer]` section, e.g. `"server_check_delay = 0"`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }
}

/// One private PgBouncer in front of a [`PgServer`]'s database `app`, for role `app` (the
/// same password, [`PgServer::PASSWORD`], SCRAM on both sides), on 127.0.0.1 only.
///
/// Settings: the given `pool_mode` and `default_pool_size` (2 by default), `min_pool_size`
/// and `reserve_pool_size` 0, `max_client_conn = 500`, `server_login_retry = 1` (the default
/// 15 s would stall every test after a server restart), `server_tls_sslmode = disable`, no
/// `ignore_startup_parameters` (so a client that sends a startup parameter PgBouncer does
/// not know is refused, as in production). The admin console (`RECONNECT`, `KILL`,
/// `RESUME`, `SHOW POOLS`) is reached through [`PgBouncer::admin`].
pub struct PgBouncer {
    port: u16,
    opts: PgBouncerOptions,
    binary: PathBuf,
    run_as: RunAs,
    conf: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    // Last, so it is removed after `Drop::drop` stopped the process.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("pool_mode", &self.opts.pool_mode)
            .field("release", &self.opts.release)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl PgBouncer {
    /// Starts a PgBouncer in `pool_mode` with the default [`PgBouncerOptions`] in front of
    /// `pg`.
    pub fn start(pg: &PgServer, pool_mode: PoolMode) -> Result<PgBouncer, TestSupportError> {
        Self::start_with(pg, PgBouncerOptions::new(pool_mode))
    }

    /// Starts a PgBouncer in front of `pg` (installing the package first if the binary is
    /// missing) and returns once its port accepts connections. Another port is tried if the
    /// one chosen was taken meanwhile.
    pub fn start_with(
        pg: &PgServer,
        opts: PgBouncerOptions,
    ) -> Result<PgBouncer, TestSupportError> {
        let binary = binary(opts.release)?;
        let run_as = RunAs::get()?;
        sweep_stale();
        let dir = crate::pg::make_root(DIR_PREFIX, run_as)?;
        let auth = dir.path().join("userlist.txt");
        write_private(
            &auth,
            &format!(
                "\"app\" \"{}\"\n\"{ADMIN_USER}\" \"{ADMIN_PASSWORD}\"\n",
                PgServer::PASSWORD
            ),
            run_as,
        )?;
        let mut bouncer = PgBouncer {
            port: 0,
            conf: dir.path().join("pgbouncer.ini"),
            log: dir.path().join("pgbouncer.log"),
            opts,
            binary: binary.to_path_buf(),
            run_as,
            child: Mutex::new(None),
            dir,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            bouncer.port = free_port();
            bouncer.write_conf(pg.port(), &auth)?;
            match bouncer.spawn() {
                Ok(()) => return Ok(bouncer),
                Err((err, port_taken)) if port_taken && attempt < PORT_ATTEMPTS => {
                    log::debug!(
                        "test-support: pgbouncer port {} was taken, retrying: {err}",
                        bouncer.port
                    );
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    /// The version the running PgBouncer reports (`SHOW VERSION`), e.g. `PgBouncer 1.24.1`.
    pub fn version(&self) -> Result<String, TestSupportError> {
        let rows = self.admin("SHOW VERSION")?;
        Ok(rows
            .into_iter()
            .flatten()
            .map(|(_, value)| value)
            .next()
            .unwrap_or_default())
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pool mode it runs in.
    pub fn pool_mode(&self) -> PoolMode {
        self.opts.pool_mode
    }

    /// `postgres://app:PASSWORD@127.0.0.1:PORT/app`: role `app` through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://app:{}@127.0.0.1:{}/app",
            PgServer::PASSWORD,
            self.port
        )
    }

    /// [`PgBouncer::url`] plus `"?"` and `params` (e.g. `"sslmode=disable"`).
    pub fn url_with(&self, params: &str) -> String {
        let params = params.trim_start_matches('?');
        if params.is_empty() {
            self.url()
        } else {
            format!("{}?{params}", self.url())
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child
            .lock()
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Runs one admin console command (simple query protocol, as the console requires) and
    /// returns its rows as (column, value) pairs; `NULL` reads as an empty string.
    pub fn admin(&self, command: &str) -> Result<Vec<Vec<(String, String)>>, TestSupportError> {
        let conninfo = format!(
            "host=127.0.0.1 port={} dbname=pgbouncer user={ADMIN_USER} password={ADMIN_PASSWORD} \
             sslmode=disable connect_timeout=5",
            self.port
        );
        admin_query(&conninfo, command).map_err(|message| TestSupportError::Admin {
            command: command.to_owned(),
            message: format!(
                "{} (the pgbouncer process {})\nlast lines of {}:\n{}",
                redact(&message),
                self.process_state(),
                self.log.display(),
                last_lines(&log_since(&self.log, 0), 10)
            ),
        })
    }

    /// "runs", "exited with ...", or "is not started", for messages.
    fn process_state(&self) -> String {
        match self.child.lock().as_mut().map(Child::try_wait) {
            None => "is not started".into(),
            Some(Ok(None)) => "runs".into(),
            Some(Ok(Some(status))) => format!("exited with {status}"),
            Some(Err(e)) => format!("cannot be waited for: {e}"),
        }
    }

    /// `RECONNECT app`: every server connection is closed once it is released (after its
    /// transaction, in transaction mode) and a new one is opened when needed.
    pub fn reconnect(&self) -> Result<(), TestSupportError> {
        self.admin("RECONNECT app").map(drop)
    }

    /// `KILL app`: drops every client and server connection of database `app` at once; the
    /// database stays paused (new clients wait) until [`PgBouncer::resume`].
    pub fn kill_db(&self) -> Result<(), TestSupportError> {
        self.admin("KILL app").map(drop)
    }

    /// `RESUME app`, after [`PgBouncer::kill_db`].
    pub fn resume(&self) -> Result<(), TestSupportError> {
        self.admin("RESUME app").map(drop)
    }

    /// `KILL app`, `pause`, then `RESUME app`: every client and server connection of `app`
    /// is cut, as a pooler's operator does it. PgBouncer itself sometimes crashes (SIGSEGV)
    /// on `KILL` while clients are busy (seen here with 1.18; pgbouncer/pgbouncer#1401
    /// reports it in 1.24.1): then it is restarted, which cuts every client too, and the
    /// returned value is `true`. Call it from the thread that started it (see
    /// [`PgBouncer::restart`]).
    pub fn kill_and_resume(&self, pause: Duration) -> Result<bool, TestSupportError> {
        let killed = self.kill_db();
        std::thread::sleep(pause);
        match killed.and_then(|()| self.resume()) {
            Ok(()) => Ok(false),
            Err(e) => {
                log::warn!("test-support: PgBouncer did not survive KILL, restarting it: {e}");
                self.restart().map(|()| true)
            }
        }
    }

    /// Restarts PgBouncer if its process has exited (crashed: see
    /// [`PgBouncer::kill_and_resume`]); `true` if it did. Call it from the thread that
    /// started it.
    pub fn restart_if_crashed(&self) -> Result<bool, TestSupportError> {
        let exited = matches!(
            self.child.lock().as_mut().map(Child::try_wait),
            Some(Ok(Some(_)))
        );
        if !exited {
            return Ok(false);
        }
        log::warn!(
            "test-support: PgBouncer {}, restarting it",
            self.process_state()
        );
        self.restart().map(|()| true)
    }

    /// `SHOW POOLS`, the row of database `app` (`cl_active`, `cl_waiting`, `sv_active`,
    /// `sv_idle`, `sv_used`, `pool_mode`, ...).
    pub fn pool_row(&self) -> Result<Vec<(String, String)>, TestSupportError> {
        let rows = self.admin("SHOW POOLS")?;
        rows.into_iter()
            .find(|row| row.iter().any(|(k, v)| k == "database" && v == "app"))
            .ok_or_else(|| TestSupportError::Admin {
                command: "SHOW POOLS".into(),
                message: "no pool for database app".into(),
            })
    }

    /// Server connections to PostgreSQL now (`sv_active + sv_idle + sv_used + sv_tested +
    /// sv_login` of [`PgBouncer::pool_row`]).
    pub fn server_connections(&self) -> Result<u32, TestSupportError> {
        let row = self.pool_row()?;
        Ok(row
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "sv_active" | "sv_idle" | "sv_used" | "sv_tested" | "sv_login"
                )
            })
            .filter_map(|(_, v)| v.parse::<u32>().ok())
            .sum())
    }

    /// Stops the process (`SIGTERM`: immediate shutdown, every client is cut off) and starts
    /// it again on the same port; returns once the port accepts connections. Call it from the
    /// thread that started it (the process dies with the thread that spawned it).
    pub fn restart(&self) -> Result<(), TestSupportError> {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The old listener's port may linger for a moment.
                Err((_, true)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    fn write_conf(&self, pg_port: u16, auth: &Path) -> Result<(), TestSupportError> {
        let mut conf = format!(
            "; written by resilient-diesel test-support\n\
             [databases]\n\
             app = host=127.0.0.1 port={pg_port} dbname=app\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {auth}\n\
             admin_users = {ADMIN_USER}\n\
             pool_mode = {mode}\n\
             default_pool_size = {size}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = 500\n\
             server_login_retry = 1\n\
             server_tls_sslmode = disable\n\
             logfile = {log}\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            port = self.port,
            auth = auth.display(),
            mode = self.opts.pool_mode.as_str(),
            size = self.opts.default_pool_size,
            log = self.log.display(),
        );
        for line in &self.opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        write_private(&self.conf, &conf, self.run_as)
    }

    /// Starts the process and waits until its port accepts connections. On failure: the
    /// error (with the log's tail), and whether the port was taken.
    fn spawn(&self) -> Result<(), (TestSupportError, bool)> {
        let log_offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = sys::pg_command(&self.binary, self.run_as, self.dir.path());
        cmd.arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; it runs in the child after the uid change
        // (which would clear it), so the process dies with the thread that started it even
        // when the test process is killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let describe = sys::describe(&cmd);
        let mut child = cmd.spawn().map_err(|e| {
            let err = TestSupportError::Command {
                binary: self.binary.display().to_string(),
                command: describe.clone(),
                status: format!("could not be started: {e}"),
                output: String::new(),
            };
            (err, false)
        })?;
        let deadline = Instant::now() + START_TIMEOUT;
        let failure = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("{describe}: exited with {status}");
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                *self.child.lock() = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break format!(
                    "{describe}: port {} not accepting after {START_TIMEOUT:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let new_log = log_since(&self.log, log_offset);
        let port_taken = new_log.contains("Address already in use");
        let err = TestSupportError::StartFailed {
            port: self.port,
            reason: redact(&failure),
            log: self.log.clone(),
            tail: last_lines(&new_log, 20),
        };
        Err((err, port_taken))
    }

    /// Kills the process (SIGTERM, then SIGKILL after 5 s) and reaps it.
    fn stop(&self) {
        let Some(mut child) = self.child.lock().take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = sys::signal(pid, libc::SIGTERM, "SIGTERM");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The binary of `release`: found by [`find_binary`]; when none is found, the release's
/// script is run once per process (and release) and the binary looked for again.
fn binary(release: Release) -> Result<&'static Path, TestSupportError> {
    static DEBIAN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static RECENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let (cell, script) = match release {
        Release::Debian => (&DEBIAN, "install-pgbouncer.sh"),
        Release::Recent => (&RECENT, "install-pgbouncer-recent.sh"),
    };
    cell.get_or_init(|| {
        if let Some(path) = find_binary(release) {
            return Ok(path);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts")
            .join(script);
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        find_binary(release).ok_or_else(|| {
            format!(
                "{} succeeded but no pgbouncer {} binary was found",
                script.display(),
                release.version()
            )
        })
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| TestSupportError::PgBouncerMissing(e.clone()))
}

/// Debian: `PGBOUNCER` if set, else `pgbouncer` on `PATH` or in `/usr/sbin`. Recent:
/// `PGBOUNCER_RECENT` if set, else the install script's prefix.
fn find_binary(release: Release) -> Option<PathBuf> {
    if release == Release::Recent {
        if let Some(path) = std::env::var_os("PGBOUNCER_RECENT") {
            return Some(PathBuf::from(path));
        }
        let built = PathBuf::from(format!(
            "/opt/resilient-diesel/pgbouncer-{RECENT_VERSION}/bin/pgbouncer"
        ));
        return built.is_file().then_some(built);
    }
    if let Some(path) = std::env::var_os("PGBOUNCER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
}

/// Removes `rdpgb-<pid>-*` dirs whose process is gone (their PgBouncer died with it).
fn sweep_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for dir in crate::pg::sweep_dirs() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
                    continue;
                };
                let Some(Ok(owner)) = rest.split('-').next().map(str::parse::<i32>) else {
                    continue;
                };
                if owner != std::process::id() as i32 && !sys::process_alive(owner) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}

fn write_private(path: &Path, text: &str, run_as: RunAs) -> Result<(), TestSupportError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TestSupportError::io(format!("writing {}", path.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| TestSupportError::io(format!("writing {}", path.display()), e))?;
    run_as.chown(path)
}

fn log_since(log: &Path, offset: u64) -> String {
    let all = fs::read(log).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(all.len());
    redact(&String::from_utf8_lossy(&all[start..]))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One simple query on a fresh libpq connection: its rows, or libpq's message.
fn admin_query(conninfo: &str, command: &str) -> Result<Vec<Vec<(String, String)>>, String> {
    use pq_sys::{ConnStatusType, ExecStatusType};

    struct Conn(*mut pq_sys::PGconn);
    impl Drop for Conn {
        fn drop(&mut self) {
            // SAFETY: the pointer came from PQconnectdb and is finished once.
            unsafe { pq_sys::PQfinish(self.0) }
        }
    }
    struct Res(*mut pq_sys::PGresult);
    impl Drop for Res {
        fn drop(&mut self) {
            // SAFETY: the pointer came from PQexec and is cleared once.
            unsafe { pq_sys::PQclear(self.0) }
        }
    }
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: libpq returns NUL-terminated strings valid while the result lives.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let conninfo = CString::new(conninfo).map_err(|e| e.to_string())?;
    let command_c = CString::new(command).map_err(|e| e.to_string())?;
    // SAFETY: conninfo is a valid C string; the result is checked and freed by `Conn`.
    let conn = Conn(unsafe { pq_sys::PQconnectdb(conninfo.as_ptr()) });
    if conn.0.is_null() {
        return Err("libpq could not allocate a connection".into());
    }
    // SAFETY: conn.0 is a live connection.
    if unsafe { pq_sys::PQstatus(conn.0) } != ConnStatusType::CONNECTION_OK {
        // SAFETY: as above.
        return Err(text(unsafe { pq_sys::PQerrorMessage(conn.0) })
            .trim()
            .to_owned());
    }
    // SAFETY: as above; the result is freed by `Res`.
    let res = Res(unsafe { pq_sys::PQexec(conn.0, command_c.as_ptr()) });
    if res.0.is_null() {
        // SAFETY: as above.
        return Err(text(unsafe { pq_sys::PQerrorMessage(conn.0) })
            .trim()
            .to_owned());
    }
    // SAFETY: res.0 is a live result.
    match unsafe { pq_sys::PQresultStatus(res.0) } {
        ExecStatusType::PGRES_TUPLES_OK => {}
        ExecStatusType::PGRES_COMMAND_OK | ExecStatusType::PGRES_EMPTY_QUERY => {
            return Ok(Vec::new())
        }
        // SAFETY: as above.
        _ => {
            return Err(text(unsafe { pq_sys::PQresultErrorMessage(res.0) })
                .trim()
                .to_owned())
        }
    }
    // SAFETY: res.0 is a live result; indexes stay within PQntuples/PQnfields.
    unsafe {
        let (rows, cols) = (pq_sys::PQntuples(res.0), pq_sys::PQnfields(res.0));
        Ok((0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| {
                        (
                            text(pq_sys::PQfname(res.0, c)),
                            text(pq_sys::PQgetvalue(res.0, r, c)),
                        )
                    })
                    .collect()
            })
            .collect())
    }
}

/// Starts a [`PgBouncer`] in front of `pg`, or decides what to do when it cannot: under
/// [`ci_mode`](crate::ci_mode) it panics with the error's text; otherwise it prints
/// `skipping: <why>` to stderr and returns `None` (as [`pg_or_skip`](crate::pg_or_skip)).
pub fn pgbouncer_or_skip(pg: &PgServer, opts: PgBouncerOptions) -> Option<PgBouncer> {
    match PgBouncer::start_with(pg, opts) {
        Ok(bouncer) => Some(bouncer),
        Err(err) if crate::ci_mode() => panic!(
            "could not start a private PgBouncer, and CI=true makes that a failure instead of \
             a skip: {err}"
        ),
        Err(err) => {
            eprintln!("skipping: could not start a private PgBouncer: {err}");
            None
        }
    }
}
