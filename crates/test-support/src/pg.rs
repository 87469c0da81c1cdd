//! Private, throwaway PostgreSQL clusters.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use parking_lot::Mutex;

use crate::sys::{self, redact, RunAs};
use crate::{certs, free_port, TestSupportError};

/// `application_name` of the helpers' own superuser connections (never matched by tests).
const ADMIN_APP: &str = "test-support-admin";
/// How many log lines an error carries.
const TAIL_LINES: usize = 20;
/// How often a start is retried on a fresh port when the port was taken meanwhile.
const PORT_ATTEMPTS: usize = 8;
/// `pg_ctl -t` for start.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Options for [`PgServer::start_with`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Extra `postgresql.conf` lines, e.g. `"idle_session_timeout = '500ms'"`. They come after
    /// the crate's own settings, so they override them.
    pub extra_conf: Vec<String>,
    /// Whether the server offers TLS (default `true`). Without it, `sslmode=require` fails.
    pub ssl: bool,
    /// The names the server certificate is issued for (DNS names or IP addresses). Empty (the
    /// default) means `localhost` and `127.0.0.1`.
    pub cert_names: Vec<String>,
    /// Whether role `app` must log in over TLS with a client certificate (default `false`):
    /// see [`PgOptions::client_cert_auth`].
    pub client_cert_auth: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            extra_conf: Vec::new(),
            ssl: true,
            cert_names: Vec::new(),
            client_cert_auth: false,
        }
    }
}

impl PgOptions {
    /// The defaults: TLS on, no extra settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one `postgresql.conf` line.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// Turns TLS on or off.
    pub fn ssl(mut self, on: bool) -> Self {
        self.ssl = on;
        self
    }

    /// Issues the server certificate for these names instead of `localhost` and `127.0.0.1`
    /// (each an IP address SAN if it parses as one, else a DNS SAN), e.g.
    /// `cert_names(&["db.example.invalid"])` for a certificate that does not match the host
    /// clients connect to. Still signed by [`PgServer::ca_cert_path`]'s CA.
    pub fn cert_names(mut self, names: &[&str]) -> Self {
        self.cert_names = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Client-certificate authentication for role `app`: its TCP connections must use TLS
    /// and present a certificate signed by [`PgServer::ca_cert_path`]'s CA whose CN is `app`
    /// (pg_hba method `cert`; issue one with [`PgServer::issue_client_cert`]); its password
    /// no longer gets it in, over TCP in clear (`hostnossl ... reject`) or the unix socket
    /// (`local ... reject`). The server verifies client certificates against that CA
    /// (`ssl_ca_file`). Turns TLS on whatever [`PgOptions::ssl`] says. The superuser keeps
    /// its trust lines, so the admin helpers work as usual. Default: off (SCRAM for `app`).
    pub fn client_cert_auth(mut self, on: bool) -> Self {
        self.client_cert_auth = on;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Server binaries
// ---------------------------------------------------------------------------------------------

/// Where `initdb`, `pg_ctl` and `postgres` live.
#[derive(Debug)]
struct PgBins {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    postgres: PathBuf,
}

impl PgBins {
    fn in_dir(dir: &Path) -> Option<PgBins> {
        let exe = |name: &str| {
            let path = dir.join(name);
            let meta = fs::metadata(&path).ok()?;
            (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(path)
        };
        Some(PgBins {
            initdb: exe("initdb")?,
            pg_ctl: exe("pg_ctl")?,
            postgres: exe("postgres")?,
        })
    }

    fn get() -> Result<&'static PgBins, TestSupportError> {
        static BINS: OnceLock<Result<PgBins, String>> = OnceLock::new();
        BINS.get_or_init(find_bins)
            .as_ref()
            .map_err(|e| TestSupportError::BinariesNotFound(e.clone()))
    }
}

/// `PG_BIN_DIR`, then `PATH` (following symlinks to the real directory), then the highest
/// version under `/usr/lib/postgresql/*/bin`.
fn find_bins() -> Result<PgBins, String> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return PgBins::in_dir(&dir).ok_or_else(|| {
            format!(
                "PG_BIN_DIR={} does not contain executable initdb, pg_ctl and postgres",
                dir.display()
            )
        });
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let pg_ctl = dir.join("pg_ctl");
            if !pg_ctl.is_file() {
                continue;
            }
            if let Some(real_dir) = fs::canonicalize(&pg_ctl)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                if let Some(bins) = PgBins::in_dir(&real_dir) {
                    return Ok(bins);
                }
            }
            if let Some(bins) = PgBins::in_dir(&dir) {
                return Ok(bins);
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_owned();
                let version = name
                    .split('.')
                    .map(|p| p.parse::<u32>().ok())
                    .collect::<Option<Vec<_>>>()?;
                Some((version, e.path().join("bin")))
            })
            .collect()
        })
        .unwrap_or_default();
    versions.sort();
    for (_, dir) in versions.iter().rev() {
        if let Some(bins) = PgBins::in_dir(dir) {
            return Ok(bins);
        }
    }
    Err(
        "looked for initdb, pg_ctl and postgres in $PG_BIN_DIR (unset), on PATH and under \
         /usr/lib/postgresql/*/bin; install the PostgreSQL server package (e.g. \
         `apt-get install postgresql`) or point PG_BIN_DIR at its bin directory"
            .into(),
    )
}

// ---------------------------------------------------------------------------------------------
// Temp dirs, template cluster, janitor
// ---------------------------------------------------------------------------------------------

/// Where clusters live. `TEST_SUPPORT_TMPDIR` if set; else `/dev/shm` when it is a tmpfs with
/// room to spare (copying a data directory there is ~10x faster than on disk); else `/tmp`.
/// Kept short: the unix socket path must stay under ~100 bytes.
fn base_dir() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TEST_SUPPORT_TMPDIR") {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && free_bytes(shm).is_some_and(|free| free >= 2 << 30) {
            return shm.to_path_buf();
        }
        let tmp = Path::new("/tmp");
        if tmp.is_dir() {
            tmp.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

/// Every place an earlier process may have left clusters in.
pub(crate) fn sweep_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![base_dir().to_path_buf()];
    for candidate in ["/dev/shm", "/tmp"] {
        if !dirs.iter().any(|d| d == Path::new(candidate)) {
            dirs.push(PathBuf::from(candidate));
        }
    }
    dirs
}

fn free_bytes(path: &Path) -> Option<u64> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; an all-zero value is valid and gets overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: cpath is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

const DIR_PREFIX: &str = "rdpg-";
const TEMPLATE_PREFIX: &str = "rdpg-tpl-";

/// A temp dir named after our pid (so a later process can tell it is stale), owned by the
/// server's user, mode 0700.
pub(crate) fn make_root(
    prefix: &str,
    run_as: RunAs,
) -> Result<tempfile::TempDir, TestSupportError> {
    let base = base_dir();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempdir_in(base)
        .map_err(|e| {
            TestSupportError::io(format!("creating a temp dir in {}", base.display()), e)
        })?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
        .map_err(|e| TestSupportError::io(format!("chmod {}", dir.path().display()), e))?;
    run_as.chown(dir.path())?;
    Ok(dir)
}

/// The first line of `postmaster.pid`.
fn read_postmaster_pid(data: &Path) -> Option<i32> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is the postmaster of the cluster in `data`.
fn is_our_postmaster(pid: i32, data: &Path) -> bool {
    sys::process_alive(pid) && sys::cmdline(pid).contains(&*data.to_string_lossy())
}

/// Kills a postmaster of ours and whatever backends it leaves behind.
fn kill_cluster(pm: i32, data: &Path) {
    if !is_our_postmaster(pm, data) {
        return;
    }
    let children = sys::children_of(pm);
    for &child in &children {
        // A stopped backend would never act on its shutdown signal.
        let _ = sys::signal(child, libc::SIGCONT, "SIGCONT");
    }
    let _ = sys::signal(pm, libc::SIGKILL, "SIGKILL");
    sys::wait_gone(pm, Duration::from_secs(5));
    for child in children {
        if sys::process_alive(child) && sys::cmdline(child).starts_with("postgres") {
            let _ = sys::signal(child, libc::SIGKILL, "SIGKILL");
        }
    }
}

/// Removes the temp dirs (and kills the servers) that processes which died without cleaning up
/// left behind. Only touches `rdpg-<pid>-*` dirs (in `/dev/shm`, `/tmp` or the base dir) whose creating process is gone, and only
/// kills a postmaster whose command line names that dir.
fn sweep_stale() {
    for dir in sweep_dirs() {
        if let Ok(entries) = fs::read_dir(&dir) {
            sweep_entries(entries);
        }
    }
}

fn sweep_entries(entries: fs::ReadDir) {
    let me = std::process::id() as i32;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(TEMPLATE_PREFIX)
            .or_else(|| name.strip_prefix(DIR_PREFIX))
        else {
            continue;
        };
        let Some(Ok(owner)) = rest.split('-').next().map(str::parse::<i32>) else {
            continue;
        };
        if owner == me || sys::process_alive(owner) {
            continue;
        }
        let path = entry.path();
        let data = path.join("data");
        if let Some(pm) = read_postmaster_pid(&data) {
            kill_cluster(pm, &data);
        }
        let _ = fs::remove_dir_all(&path);
    }
}

/// A data directory made once per process (initdb, role `app`, database `app`, pg_hba.conf)
/// that each server copies: much faster than an initdb per server.
struct Template {
    root: PathBuf,
    data: PathBuf,
}

static TEMPLATE: OnceLock<Result<Template, String>> = OnceLock::new();

extern "C" fn remove_template() {
    if let Some(Ok(template)) = TEMPLATE.get() {
        let _ = fs::remove_dir_all(&template.root);
    }
}

impl Template {
    fn get(bins: &PgBins, run_as: RunAs) -> Result<&'static Template, TestSupportError> {
        TEMPLATE
            .get_or_init(|| {
                sweep_stale();
                let made = Template::build(bins, run_as).map_err(|e| e.to_string());
                if made.is_ok() {
                    // SAFETY: registering a plain extern "C" fn; it only reads a OnceLock.
                    unsafe { libc::atexit(remove_template) };
                }
                made
            })
            .as_ref()
            .map_err(|e| TestSupportError::Template(e.clone()))
    }

    fn build(bins: &PgBins, run_as: RunAs) -> Result<Template, TestSupportError> {
        let dir = make_root(TEMPLATE_PREFIX, run_as)?;
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        sys::run(
            sys::pg_command(&bins.initdb, run_as, &root)
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
                // 1 MB WAL segments instead of 16: a smaller, faster-to-copy template.
                .arg("--wal-segsize=1")
                .args(["--no-sync", "--no-instructions"]),
            None,
        )?;
        let sql = format!(
            "CREATE ROLE app LOGIN PASSWORD '{}';\nCREATE DATABASE app OWNER app;\n",
            crate::PgServer::PASSWORD
        );
        sys::run(
            sys::pg_command(&bins.postgres, run_as, &root)
                .arg("--single")
                .arg("-D")
                .arg(&data)
                .args([
                    "-F",
                    "-c",
                    "exit_on_error=on",
                    "-c",
                    "password_encryption=scram-sha-256",
                ])
                .arg("postgres"),
            Some(sql.as_bytes()),
        )?;
        write_file(&data.join("pg_hba.conf"), PG_HBA.as_bytes(), 0o600, run_as)?;
        let conf = data.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| TestSupportError::io(format!("opening {}", conf.display()), e))?;
        file.write_all(
            b"\n# resilient-diesel test-support\ninclude_if_exists = 'test_support.conf'\n",
        )
        .map_err(|e| TestSupportError::io(format!("writing {}", conf.display()), e))?;
        Ok(Template {
            root: dir.keep(),
            data,
        })
    }
}

const PG_HBA: &str = "\
# resilient-diesel test-support: trust for the superuser, SCRAM for everyone else.
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 trust
host    all       postgres  127.0.0.1/32   trust
host    all       postgres  ::1/128        trust
local   all       all                      scram-sha-256
host    all       all       127.0.0.1/32   scram-sha-256
host    all       all       ::1/128        scram-sha-256
";

/// `pg_hba.conf` of a server started with [`PgOptions::client_cert_auth`]: the superuser's
/// trust lines first (the harness manages the server through them), then role `app` only over
/// TLS with a client certificate of CN `app`, then SCRAM for everyone else.
const PG_HBA_CLIENT_CERT: &str = "\
# resilient-diesel test-support: trust for the superuser, a client certificate for app.
# TYPE    DATABASE  USER      ADDRESS        METHOD
local     all       postgres                 trust
host      all       postgres  127.0.0.1/32   trust
host      all       postgres  ::1/128        trust
hostssl   all       app       127.0.0.1/32   cert
hostssl   all       app       ::1/128        cert
hostnossl all       app       all            reject
local     all       app                      reject
local     all       all                      scram-sha-256
host      all       all       127.0.0.1/32   scram-sha-256
host      all       all       ::1/128        scram-sha-256
";

/// The file in the data directory holding the CA that client certificates are verified
/// against (`ssl_ca_file`), for servers with [`PgOptions::client_cert_auth`].
const CLIENT_CA_FILE: &str = "client_ca.crt";

fn write_file(path: &Path, bytes: &[u8], mode: u32, run_as: RunAs) -> Result<(), TestSupportError> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| TestSupportError::io(format!("creating {}", path.display()), e))?;
    file.write_all(bytes)
        .map_err(|e| TestSupportError::io(format!("writing {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| TestSupportError::io(format!("chmod {}", path.display()), e))?;
    run_as.chown(path)
}

/// Copies a directory tree (keeping modes) and gives every entry to the server's user.
fn copy_tree(src: &Path, dst: &Path, run_as: RunAs) -> Result<(), TestSupportError> {
    let mode = fs::metadata(src)
        .map_err(|e| TestSupportError::io(format!("reading {}", src.display()), e))?
        .permissions()
        .mode();
    fs::create_dir(dst)
        .map_err(|e| TestSupportError::io(format!("creating {}", dst.display()), e))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| TestSupportError::io(format!("chmod {}", dst.display()), e))?;
    run_as.chown(dst)?;
    let entries = fs::read_dir(src)
        .map_err(|e| TestSupportError::io(format!("listing {}", src.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| TestSupportError::io(format!("listing {}", src.display()), e))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(|e| TestSupportError::io(format!("reading {}", from.display()), e))?;
        if kind.is_dir() {
            copy_tree(&from, &to, run_as)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from)
                .map_err(|e| TestSupportError::io(format!("reading {}", from.display()), e))?;
            std::os::unix::fs::symlink(target, &to)
                .map_err(|e| TestSupportError::io(format!("creating {}", to.display()), e))?;
            run_as.chown(&to)?;
        } else {
            fs::copy(&from, &to).map_err(|e| {
                TestSupportError::io(format!("copying {} to {}", from.display(), to.display()), e)
            })?;
            run_as.chown(&to)?;
        }
    }
    Ok(())
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Double-quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// One private PostgreSQL cluster: its own temp dir, data directory, unix socket directory,
/// loopback port, TLS certificates and log file. Dropping it stops the server
/// (`pg_ctl stop -m immediate`, then `SIGKILL` of the postmaster and its backends if they are
/// still alive, also after a test panicked) and removes the temp dir.
///
/// The cluster has a superuser `postgres` (trust over the socket and over loopback TCP) and a
/// role `app` with password [`PgServer::PASSWORD`] (SCRAM-SHA-256) that owns database `app`.
/// Settings: `listen_addresses = '127.0.0.1'`, `max_connections = 200`, `fsync = off`,
/// `ssl = on` with a fresh CA ([`PgServer::ca_cert_path`]) and a server certificate for
/// `localhost` and `127.0.0.1`. With [`PgOptions::client_cert_auth`], role `app` logs in
/// with a client certificate instead ([`PgServer::issue_client_cert`]).
pub struct PgServer {
    port: u16,
    host: String,
    ca_cert: PathBuf,
    ca: certs::Ca,
    issued: std::sync::atomic::AtomicUsize,
    cluster: Cluster,
}

/// The files of a client certificate issued by [`PgServer::issue_client_cert`], for libpq's
/// `sslcert` and `sslkey`. They are removed with the server's temp dir.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The certificate (PEM), signed by the server's CA ([`PgServer::ca_cert_path`]).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM, unencrypted), mode 0600 and owned by the current user, as
    /// libpq requires.
    pub key: PathBuf,
}

impl ClientCert {
    /// `sslcert=<cert>&sslkey=<key>`, to append to a URL's query (paths as they are: the
    /// crate's temp paths need no percent-encoding).
    pub fn url_params(&self) -> String {
        format!(
            "sslcert={}&sslkey={}",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// The part that owns processes and files; its `Drop` does the cleanup, also for a server
/// whose start failed half-way.
struct Cluster {
    bins: &'static PgBins,
    run_as: RunAs,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    postmaster: Mutex<Option<i32>>,
    paused: Arc<Mutex<HashSet<i32>>>,
    // Last, so it is removed after `Drop::drop` stopped the server.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("port", &self.port)
            .field("data_dir", &self.cluster.data)
            .field("postmaster", &*self.cluster.postmaster.lock())
            .finish()
    }
}

impl PgServer {
    /// The password of role `app`. A sentinel: tests assert it never appears in logs or errors.
    pub const PASSWORD: &'static str = "s3ntinel-P4ssw0rd-do-not-log";

    /// Starts a private cluster with the default [`PgOptions`] (TLS on).
    pub fn start() -> Result<PgServer, TestSupportError> {
        Self::start_with(PgOptions::default())
    }

    /// Starts a private cluster: copies this process's template data directory (made by
    /// `initdb` on first use), writes fresh TLS certificates and the settings, and starts it
    /// with `pg_ctl start -w` on a free loopback port (another port is tried if that one was
    /// taken meanwhile). On failure the error carries the last lines of the server log.
    pub fn start_with(opts: PgOptions) -> Result<PgServer, TestSupportError> {
        let bins = PgBins::get()?;
        let run_as = RunAs::get()?;
        let template = Template::get(bins, run_as)?;

        let dir = make_root(DIR_PREFIX, run_as)?;
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let sock = root.join("sock");
        let ca_cert = root.join("root.crt");
        let cluster = Cluster {
            bins,
            run_as,
            data: data.clone(),
            sock: sock.clone(),
            log: root.join("server.log"),
            postmaster: Mutex::new(None),
            paused: Arc::new(Mutex::new(HashSet::new())),
            _dir: dir,
        };

        copy_tree(&template.data, &data, run_as)?;
        fs::create_dir(&sock)
            .map_err(|e| TestSupportError::io(format!("creating {}", sock.display()), e))?;
        run_as.chown(&sock)?;

        let certs = certs::generate_for(&opts.cert_names)?;
        write_file(&ca_cert, &certs.ca_pem, 0o644, run_as)?;
        if opts.client_cert_auth {
            // After the copy: the template (shared by every server) keeps SCRAM for `app`.
            write_file(
                &data.join("pg_hba.conf"),
                PG_HBA_CLIENT_CERT.as_bytes(),
                0o600,
                run_as,
            )?;
            write_file(&data.join(CLIENT_CA_FILE), &certs.ca_pem, 0o644, run_as)?;
        }
        write_file(
            &data.join("server.crt"),
            &certs.server_cert_pem,
            0o644,
            run_as,
        )?;
        write_file(
            &data.join("server.key"),
            &certs.server_key_pem,
            0o600,
            run_as,
        )?;

        let mut attempt = 0;
        let port = loop {
            attempt += 1;
            let port = free_port();
            write_file(
                &data.join("test_support.conf"),
                settings(port, &sock, &opts).as_bytes(),
                0o600,
                run_as,
            )?;
            match cluster.pg_ctl_start(port) {
                Ok(()) => break port,
                Err((err, port_taken)) if port_taken && attempt < PORT_ATTEMPTS => {
                    log::debug!("test-support: port {port} was taken, retrying: {err}");
                }
                Err((err, _)) => return Err(err),
            }
        };
        Ok(PgServer {
            port,
            host: "127.0.0.1".into(),
            ca_cert,
            ca: certs.ca,
            issued: std::sync::atomic::AtomicUsize::new(0),
            cluster,
        })
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `postgres://app:PASSWORD@127.0.0.1:PORT/app`: the password role over TCP (SCRAM).
    pub fn url(&self) -> String {
        format!(
            "postgres://app:{}@{}:{}/app",
            Self::PASSWORD,
            self.host,
            self.port
        )
    }

    /// [`PgServer::url`] plus `"?"` and `params`, e.g. `url_with("sslmode=require")`.
    /// An empty `params` gives the plain URL.
    pub fn url_with(&self, params: &str) -> String {
        let params = params.trim_start_matches('?');
        if params.is_empty() {
            self.url()
        } else {
            format!("{}?{}", self.url(), params)
        }
    }

    /// [`PgServer::url_with`], but to another port on 127.0.0.1, e.g. a [`FaultProxy`]'s:
    /// `pg.url_via(proxy.port(), "sslmode=disable")`.
    ///
    /// [`FaultProxy`]: crate::FaultProxy
    pub fn url_via(&self, port: u16, params: &str) -> String {
        let url = format!(
            "postgres://app:{}@{}:{}/app",
            Self::PASSWORD,
            self.host,
            port
        );
        let params = params.trim_start_matches('?');
        if params.is_empty() {
            url
        } else {
            format!("{url}?{params}")
        }
    }

    /// `127.0.0.1:PORT`, e.g. for [`FaultProxy::start`](crate::FaultProxy::start).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser over TCP (trust, no
    /// password).
    pub fn superuser_url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.host, self.port)
    }

    /// The PEM file of the CA that signed the server certificate, for `sslrootcert=` with
    /// `sslmode=verify-ca` or `verify-full` (the certificate names `localhost` and `127.0.0.1`).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert
    }

    /// Issues a client certificate for `common_name` (for PostgreSQL's `cert` method, the
    /// role name, e.g. `"app"`), signed by the CA of [`PgServer::ca_cert_path`], and writes it
    /// and its private key as PEM files into a fresh directory under the server's temp dir:
    /// the key with mode 0600, owned by the current user (libpq refuses a key that group or
    /// others may read). Each call makes a new key pair; the files go away with the server.
    pub fn issue_client_cert(&self, common_name: &str) -> Result<ClientCert, TestSupportError> {
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let safe: String = common_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = self.cluster.root().join(format!("client-{n}-{safe}"));
        fs::create_dir(&dir)
            .map_err(|e| TestSupportError::io(format!("creating {}", dir.display()), e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| TestSupportError::io(format!("chmod {}", dir.display()), e))?;
        let (cert_pem, key_pem) = certs::issue_client(&self.ca, common_name)?;
        let files = ClientCert {
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
        };
        // Owned by us (the client), not by the server's user: no chown.
        let me = RunAs { ids: None };
        write_file(&files.cert, &cert_pem, 0o644, me)?;
        write_file(&files.key, &key_pem, 0o600, me)?;
        Ok(files)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.cluster.data
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.PORT`).
    pub fn socket_dir(&self) -> &Path {
        &self.cluster.sock
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.cluster.log
    }

    /// The postmaster's pid while the server runs (`None` while it is stopped).
    pub fn postmaster_pid(&self) -> Option<i32> {
        self.cluster.running_postmaster()
    }

    fn admin_conninfo(&self, host: &str, database: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname={database} sslmode=disable \
             application_name={ADMIN_APP} connect_timeout=10",
            self.port
        )
    }

    /// A short superuser connection over the unix socket, never through anything under test.
    fn admin_to(&self, database: &str) -> Result<PgConnection, TestSupportError> {
        let conninfo = self.admin_conninfo(&self.cluster.sock.to_string_lossy(), database);
        PgConnection::establish(&conninfo).map_err(|source| TestSupportError::Connect {
            port: self.port,
            source,
        })
    }

    fn admin(&self) -> Result<PgConnection, TestSupportError> {
        self.admin_to("postgres")
    }

    /// Sends `pg_terminate_backend` to every backend whose `application_name` is
    /// `application_name` and returns how many were signalled. They end asynchronously: use
    /// [`PgServer::wait_backends_gone`] to wait for it.
    pub fn terminate_backends(&self, application_name: &str) -> Result<usize, TestSupportError> {
        const SQL: &str =
            "SELECT count(*)::bigint AS n FROM (SELECT pg_terminate_backend(pid) AS ok \
             FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()) t \
             WHERE ok";
        let row: CountRow = diesel::sql_query(SQL)
            .bind::<Text, _>(application_name)
            .get_result(&mut self.admin()?)
            .map_err(|source| query_error(SQL, source))?;
        Ok(usize::try_from(row.n).unwrap_or(0))
    }

    /// Polls `pg_stat_activity` until no backend with that `application_name` remains.
    pub fn wait_backends_gone(
        &self,
        application_name: &str,
        timeout: Duration,
    ) -> Result<(), TestSupportError> {
        self.wait_backends_at_most(application_name, 0, timeout)
    }

    /// Polls `pg_stat_activity` until at most `n` backends with that `application_name`
    /// remain.
    pub fn wait_backends_at_most(
        &self,
        application_name: &str,
        n: i64,
        timeout: Duration,
    ) -> Result<(), TestSupportError> {
        let deadline = Instant::now() + timeout;
        let mut conn = self.admin()?;
        loop {
            let seen = count_backends(&mut conn, application_name)?;
            if seen <= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestSupportError::Timeout {
                    what: format!(
                        "{seen} backend(s) with application_name {application_name:?} to be \
                         {n} or fewer"
                    ),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many backends with that `application_name` are connected.
    pub fn count_backends(&self, application_name: &str) -> Result<i64, TestSupportError> {
        count_backends(&mut self.admin()?, application_name)
    }

    /// The pids of the backends with that `application_name`, ascending.
    pub fn backend_pids(&self, application_name: &str) -> Result<Vec<i32>, TestSupportError> {
        const SQL: &str = "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid() ORDER BY pid";
        let rows: Vec<PidRow> = diesel::sql_query(SQL)
            .bind::<Text, _>(application_name)
            .load(&mut self.admin()?)
            .map_err(|source| query_error(SQL, source))?;
        Ok(rows.into_iter().map(|r| r.pid).collect())
    }

    /// Runs SQL (one or more statements) as the superuser in database `app` (the one
    /// [`PgServer::url`] connects to), e.g. `ALTER ROLE app SET idle_session_timeout = '500ms'`
    /// or `CREATE TABLE t (..); GRANT ALL ON t TO app`. Objects it creates belong to
    /// `postgres`: grant what role `app` needs.
    pub fn execute(&self, sql: &str) -> Result<(), TestSupportError> {
        self.execute_in("app", sql)
    }

    /// Like [`PgServer::execute`], in another database (e.g. `"postgres"`).
    pub fn execute_in(&self, database: &str, sql: &str) -> Result<(), TestSupportError> {
        self.admin_to(database)?
            .batch_execute(sql)
            .map_err(|source| query_error(sql, source))
    }

    /// `ALTER ROLE role SET idle_session_timeout = '<ms>ms'`: sessions of that role opened
    /// from now on are ended by the server after that much idle time (`Duration::ZERO`
    /// turns it off).
    pub fn set_idle_session_timeout(
        &self,
        role: &str,
        timeout: Duration,
    ) -> Result<(), TestSupportError> {
        self.execute(&format!(
            "ALTER ROLE {} SET idle_session_timeout = '{}ms'",
            quote_ident(role),
            timeout.as_millis()
        ))
    }

    /// Restarts the server like `pg_ctl restart -m fast` (`pg_ctl stop -m fast`, then
    /// `pg_ctl start`, polling the pid file at millisecond granularity instead of pg_ctl's
    /// 100 ms) on the same port; returns once it accepts connections again. Held connections
    /// get the terminate FATAL; while it is down, connects are refused. Paused backends are
    /// continued first (a stopped process would block the shutdown).
    pub fn restart_fast(&self) -> Result<(), TestSupportError> {
        self.cluster.resume_paused();
        self.cluster.pg_ctl_stop("fast", self.port)?;
        self.cluster
            .pg_ctl_start(self.port)
            .map_err(|(err, _)| err)?;
        self.wait_accepting(Duration::from_secs(30))
    }

    /// `pg_ctl stop -m fast`, returning once the postmaster is gone: the server stays down
    /// (connections are refused) until [`PgServer::start_again`]. Paused backends are
    /// continued first. A no-op if it is not running.
    pub fn stop(&self) -> Result<(), TestSupportError> {
        self.cluster.resume_paused();
        self.cluster.pg_ctl_stop("fast", self.port)
    }

    /// Starts the server again after [`PgServer::stop`], on the same port; returns once it
    /// accepts connections.
    pub fn start_again(&self) -> Result<(), TestSupportError> {
        self.cluster
            .pg_ctl_start(self.port)
            .map_err(|(err, _)| err)?;
        self.wait_accepting(Duration::from_secs(30))
    }

    /// Restarts the server as a **hot standby** of nobody: `pg_ctl stop -m fast`, a
    /// `standby.signal` file, and a start on the same port. It replays its own WAL, accepts
    /// read-only connections, and `pg_is_in_recovery()` is true: every write fails with 25006
    /// ("cannot execute INSERT in a read-only transaction"). What a former primary looks like
    /// to the clients still connected to it (or reconnecting by an old address) after a
    /// failover. Tables made before stay readable. Returns once it accepts connections.
    pub fn restart_as_standby(&self) -> Result<(), TestSupportError> {
        self.cluster.resume_paused();
        self.cluster.pg_ctl_stop("fast", self.port)?;
        write_file(
            &self.cluster.data.join("standby.signal"),
            b"",
            0o600,
            self.cluster.run_as,
        )?;
        self.start_again()
    }

    /// Polls until a superuser connection over TCP succeeds.
    fn wait_accepting(&self, timeout: Duration) -> Result<(), TestSupportError> {
        let deadline = Instant::now() + timeout;
        loop {
            match PgConnection::establish(&self.admin_conninfo(&self.host, "postgres")) {
                Ok(_) => return Ok(()),
                Err(source) if Instant::now() >= deadline => {
                    return Err(TestSupportError::Connect {
                        port: self.port,
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends `SIGSTOP` to every backend with that `application_name` (a hung server: the
    /// kernel still ACKs, the client waits forever). The returned guard sends `SIGCONT` when
    /// dropped, so a panicking test never leaves a stopped backend; [`BackendPause::resume`]
    /// does it early. Returns once the backends are stopped. Fails with [`TestSupportError::NoBackends`] if there is none.
    pub fn pause_backends(&self, application_name: &str) -> Result<BackendPause, TestSupportError> {
        self.pause_backends_of(&[application_name])
    }

    /// [`PgServer::pause_backends`] for the backends of every name in `application_names`,
    /// found by one query and then stopped together: a backend stopped while it holds a
    /// server lock can hold up any later query, the next name's search included. Fails with
    /// [`TestSupportError::NoBackends`] if none has a backend.
    pub fn pause_backends_of(
        &self,
        application_names: &[&str],
    ) -> Result<BackendPause, TestSupportError> {
        const SQL: &str = "SELECT pid FROM pg_stat_activity \
             WHERE application_name = ANY($1) AND pid <> pg_backend_pid() ORDER BY pid";
        let names: Vec<String> = application_names.iter().map(|n| (*n).to_owned()).collect();
        let rows: Vec<PidRow> = diesel::sql_query(SQL)
            .bind::<diesel::sql_types::Array<Text>, _>(&names)
            .load(&mut self.admin()?)
            .map_err(|source| query_error(SQL, source))?;
        let mut paused = Vec::new();
        for pid in rows.into_iter().map(|r| r.pid) {
            // Register first: whoever drops last (guard or server) continues it.
            self.cluster.paused.lock().insert(pid);
            match sys::signal(pid, libc::SIGSTOP, "SIGSTOP") {
                Ok(()) => paused.push(pid),
                Err(_) => {
                    // It ended between the query and the signal.
                    self.cluster.paused.lock().remove(&pid);
                }
            }
        }
        if paused.is_empty() {
            return Err(TestSupportError::NoBackends(application_names.join(", ")));
        }
        // SIGSTOP takes effect asynchronously: return only once they are really stopped.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !paused.iter().all(|&pid| sys::stopped_or_gone(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The pause ends by itself after PAUSE_EXPIRES_AFTER: a client blocked on a stopped
        // backend with no deadline of its own (a mechanism removed, under mutation testing)
        // then gets its answer, and the test fails by an assertion instead of hanging.
        let (pids, registry) = (paused.clone(), Arc::clone(&self.cluster.paused));
        let expiry = std::thread::Builder::new()
            .name("pg-pause-expiry".into())
            .spawn(move || {
                std::thread::sleep(PAUSE_EXPIRES_AFTER);
                let mut registry = registry.lock();
                for pid in &pids {
                    if registry.remove(pid) {
                        let _ = sys::signal(*pid, libc::SIGCONT, "SIGCONT");
                    }
                }
            });
        drop(expiry);
        Ok(BackendPause {
            pids: paused,
            registry: Arc::clone(&self.cluster.paused),
        })
    }

    /// The current value of a setting, as `SHOW name` prints it.
    pub fn server_setting(&self, name: &str) -> Result<String, TestSupportError> {
        const SQL: &str = "SELECT current_setting($1) AS value";
        let row: SettingRow = diesel::sql_query(SQL)
            .bind::<Text, _>(name)
            .get_result(&mut self.admin()?)
            .map_err(|source| query_error(SQL, source))?;
        Ok(row.value)
    }
}

fn settings(port: u16, sock: &Path, opts: &PgOptions) -> String {
    let mut conf = format!(
        "# written by resilient-diesel test-support\n\
         port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{}'\n\
         max_connections = 200\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         shared_buffers = 32MB\n\
         autovacuum = off\n\
         logging_collector = off\n\
         log_line_prefix = '%m [%p] %q%a '\n\
         ssl = {}\n\
         ssl_cert_file = 'server.crt'\n\
         ssl_key_file = 'server.key'\n",
        sock.to_string_lossy().replace('\'', "''"),
        if opts.ssl || opts.client_cert_auth {
            "on"
        } else {
            "off"
        },
    );
    if opts.client_cert_auth {
        conf.push_str(&format!("ssl_ca_file = '{CLIENT_CA_FILE}'\n"));
    }
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

fn query_error(sql: &str, source: diesel::result::Error) -> TestSupportError {
    TestSupportError::Query {
        sql: redact(sql),
        source,
    }
}

fn count_backends(
    conn: &mut PgConnection,
    application_name: &str,
) -> Result<i64, TestSupportError> {
    const SQL: &str = "SELECT count(*)::bigint AS n FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()";
    let row: CountRow = diesel::sql_query(SQL)
        .bind::<Text, _>(application_name)
        .get_result(conn)
        .map_err(|source| query_error(SQL, source))?;
    Ok(row.n)
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct PidRow {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct SettingRow {
    #[diesel(sql_type = Text)]
    value: String,
}

impl Cluster {
    fn root(&self) -> &Path {
        self._dir.path()
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The log written since `offset` (redacted).
    fn log_since(&self, offset: u64) -> String {
        let all = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(all.len());
        redact(&String::from_utf8_lossy(&all[start..]))
    }

    fn start_failed(&self, port: u16, reason: String, log_offset: u64) -> TestSupportError {
        TestSupportError::StartFailed {
            port,
            reason,
            log: self.log.clone(),
            tail: last_lines(&self.log_since(log_offset), TAIL_LINES),
        }
    }

    /// The running postmaster of this cluster, if any.
    fn running_postmaster(&self) -> Option<i32> {
        [read_postmaster_pid(&self.data), *self.postmaster.lock()]
            .into_iter()
            .flatten()
            .find(|&pid| is_our_postmaster(pid, &self.data))
    }

    /// The postmaster's pid once `postmaster.pid` says "ready" (it accepts connections).
    fn ready_postmaster(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let pid: i32 = lines.first()?.trim().parse().ok()?;
        (lines.get(7)?.trim() == "ready" && is_our_postmaster(pid, &self.data)).then_some(pid)
    }

    /// `pg_ctl start -w`, returning as soon as the pid file says "ready" (pg_ctl itself only
    /// looks every 100 ms; it is reaped in the background). On failure: the error (with the
    /// log's tail), and whether the port was taken.
    fn pg_ctl_start(&self, port: u16) -> Result<(), (TestSupportError, bool)> {
        let log_offset = self.log_len();
        let mut cmd = sys::pg_command(&self.bins.pg_ctl, self.run_as, self.root());
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"]);
        let command = sys::describe(&cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            let err = TestSupportError::Command {
                binary: self.bins.pg_ctl.display().to_string(),
                command: command.clone(),
                status: format!("could not be started: {e}"),
                output: String::new(),
            };
            (err, false)
        })?;
        let failure = loop {
            if let Some(pid) = self.ready_postmaster() {
                *self.postmaster.lock() = Some(pid);
                // pg_ctl notices within 100 ms and exits; reap it without waiting here.
                let _ = std::thread::Builder::new()
                    .name("pg_ctl-reaper".into())
                    .spawn(move || {
                        let _ = child.wait_with_output();
                    });
                return Ok(());
            }
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Ok(Some(status)) if status.success() => {
                    // Ready between our look and pg_ctl's.
                    self.note_postmaster();
                    return Ok(());
                }
                Ok(Some(status)) => {
                    let output = child
                        .wait_with_output()
                        .map(|o| {
                            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                            text.push_str(&String::from_utf8_lossy(&o.stderr));
                            text
                        })
                        .unwrap_or_default();
                    break format!("{command}: {status}: {}", redact(output.trim()));
                }
                Err(e) => break format!("{command}: could not be waited for: {e}"),
            }
        };
        let new_log = self.log_since(log_offset);
        let port_taken = new_log.contains("could not bind")
            || new_log.contains("Address already in use")
            || new_log.contains("could not create any TCP/IP sockets");
        // pg_ctl may have given up while the postmaster still runs.
        if let Some(pm) = read_postmaster_pid(&self.data) {
            kill_cluster(pm, &self.data);
        }
        Err((self.start_failed(port, failure, log_offset), port_taken))
    }

    /// `pg_ctl stop -m MODE -W`, then waits (polling `/proc`) until the postmaster is gone.
    fn pg_ctl_stop(&self, mode: &str, port: u16) -> Result<(), TestSupportError> {
        let Some(pm) = self.running_postmaster() else {
            return Ok(());
        };
        sys::run(
            sys::pg_command(&self.bins.pg_ctl, self.run_as, self.root())
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", mode, "-W", "-s"]),
            None,
        )?;
        let timeout = Duration::from_secs(60);
        if sys::wait_gone(pm, timeout) {
            Ok(())
        } else {
            Err(TestSupportError::Timeout {
                what: format!("the postmaster (pid {pm}, port {port}) to stop ({mode} mode)"),
                timeout,
            })
        }
    }

    fn note_postmaster(&self) {
        if let Some(pid) = read_postmaster_pid(&self.data) {
            *self.postmaster.lock() = Some(pid);
        }
    }

    fn resume_paused(&self) {
        for pid in self.paused.lock().drain() {
            let _ = sys::signal(pid, libc::SIGCONT, "SIGCONT");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.resume_paused();
        let Some(pm) = self.running_postmaster() else {
            return;
        };
        let children = sys::children_of(pm);
        // Immediate shutdown without pg_ctl's 100 ms polling; we poll /proc ourselves.
        let _ = sys::run(
            sys::pg_command(&self.bins.pg_ctl, self.run_as, self.root())
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-W", "-s"]),
            None,
        );
        if !sys::wait_gone(pm, Duration::from_secs(10)) {
            kill_cluster(pm, &self.data);
        }
        for child in children {
            if sys::process_alive(child) && sys::cmdline(child).starts_with("postgres") {
                let _ = sys::signal(child, libc::SIGKILL, "SIGKILL");
            }
        }
    }
}

/// How long [`PgServer::pause_backends`] keeps backends stopped at most: longer than any
/// bound a test asserts on a hung backend, short enough that a test whose mechanism is
/// removed fails by an assertion well within a mutation run's timeout.
pub const PAUSE_EXPIRES_AFTER: Duration = Duration::from_secs(30);

/// Backends stopped with `SIGSTOP` by [`PgServer::pause_backends`]; dropping this (or
/// [`BackendPause::resume`]) sends them `SIGCONT`, and so does the pause's own expiry after
/// [`PAUSE_EXPIRES_AFTER`].
#[derive(Debug)]
pub struct BackendPause {
    pids: Vec<i32>,
    registry: Arc<Mutex<HashSet<i32>>>,
}

impl BackendPause {
    /// Continues the backends now.
    pub fn resume(self) {
        drop(self);
    }

    /// The pids that were stopped.
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// Continues the backends `after` from now, on a thread of its own (join it to know they
    /// were continued): a backend that takes that long to exit.
    pub fn resume_after(self, after: Duration) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            self.resume();
        })
    }
}

impl Drop for BackendPause {
    fn drop(&mut self) {
        let mut registry = self.registry.lock();
        for pid in &self.pids {
            // Only if the server has not continued (and maybe replaced) it already.
            if registry.remove(pid) {
                let _ = sys::signal(*pid, libc::SIGCONT, "SIGCONT");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn keeps_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }

    #[test]
    fn extra_conf_comes_last() {
        let opts = PgOptions::new().ssl(false).conf("max_connections = 7");
        let conf = settings(5555, Path::new("/tmp/x/sock"), &opts);
        assert!(conf.contains("port = 5555\n"));
        assert!(conf.contains("ssl = off\n"));
        assert!(conf.contains("unix_socket_directories = '/tmp/x/sock'\n"));
        assert!(conf.ends_with("max_connections = 7\n"));
        assert!(!conf.contains("ssl_ca_file"));
    }

    #[test]
    fn client_cert_auth_turns_tls_on_and_names_the_ca() {
        let opts = PgOptions::new().ssl(false).client_cert_auth(true);
        let conf = settings(5555, Path::new("/tmp/x/sock"), &opts);
        assert!(conf.contains("ssl = on\n"));
        assert!(conf.contains("ssl_ca_file = 'client_ca.crt'\n"));
        // The superuser's trust lines come before anything about `app`.
        let first_app = PG_HBA_CLIENT_CERT.find(" app ").unwrap();
        assert!(PG_HBA_CLIENT_CERT.rfind(" postgres ").unwrap() < first_app);
    }
}
