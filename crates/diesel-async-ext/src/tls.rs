//! TLS for PostgreSQL connections, through OpenSSL or rustls, with libpq's `sslmode` meanings.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and leaves verification to the
//! TLS connector (postgres-openssl's `MakeTlsConnector` verifies chain *and* host name
//! unless told otherwise). [`TlsSettings`] holds what libpq would do and builds the connector
//! once, so every connection of a pool shares it:
//!
//! | `sslmode` | tokio-postgres mode | certificate check |
//! |---|---|---|
//! | `disable` | `disable` | none (no TLS) |
//! | `allow`, `prefer` | `prefer` | none; the chain if `sslrootcert` names a file |
//! | `require` | `require` | none; the chain if `sslrootcert` names a file |
//! | `verify-ca` | `require` | the chain |
//! | `verify-full` | `require` | the chain and the host name |
//!
//! # Two TLS stacks
//!
//! The same settings and checks are built with either stack ([`TlsBackend`]):
//! - OpenSSL (cargo feature `tls-openssl`, part of the default `postgres`): postgres-openssl.
//! - rustls (cargo feature `rustls`, or `postgres-rustls` for PostgreSQL with rustls and no
//!   OpenSSL in the dependency tree): rustls with the *ring* provider and this crate's own
//!   tokio-postgres connector (`RustlsConnector`), with `tls-server-end-point` channel
//!   binding as postgres-openssl.
//!
//! When both are compiled, OpenSSL is the default (so that enabling `rustls` somewhere in a
//! dependency graph changes no other user's connections) and rustls is chosen with
//! [`PgConnectConfig::with_tls_backend`](crate::PgConnectConfig::with_tls_backend) or the
//! pool builder's `tls_backend`. When only one is compiled, it is the default. With neither
//! (`postgres-core` alone), as libpq built without SSL: `disable`, `allow` and `prefer`
//! connect in clear, stronger modes are refused.
//!
//! What differs between the two stacks:
//! - rustls speaks TLS 1.2 and 1.3 only: `ssl_min_protocol_version=TLSv1` or `TLSv1.1` means
//!   1.2 with it, and `ssl_max_protocol_version` below `TLSv1.2` is refused.
//! - Verification failures read the same (`certificate verify failed: hostname mismatch`,
//!   `... unable to get local issuer certificate`, ...) with rustls's own reason after them.
//!
//! Roots: the `sslrootcert` file alone (as libpq: the system's roots are then not trusted), or
//! with `sslrootcert=system` or none given with `verify-full`, the system's roots (OpenSSL's
//! default paths, the `SSL_CERT_FILE` / `SSL_CERT_DIR` variables, and the usual distribution
//! bundles, which a vendored OpenSSL does not know about; rustls reads the variables and the
//! bundles).
//!
//! Without `sslrootcert`, libpq reads `~/.postgresql/root.crt` and fails when it is missing;
//! this connector reads no implicit file, so:
//! - `verify-ca` without `sslrootcert` is refused when the pool is built: the system's public
//!   roots with no name check would accept any certificate any public CA issued to anyone
//!   (PostgreSQL 16's libpq refuses `sslrootcert=system` with `verify-ca` for that reason);
//! - `verify-full` without `sslrootcert` means `sslrootcert=system` (libpq 16+): the system's
//!   roots, and the host name checked. Name the server's CA file to trust only it.
//!
//! The client key (`sslkey`) is refused, as libpq does, when group or others may read it
//! (owned by this user: `0600` or less; owned by another user such as root: `0640` or less).
//! An encrypted key is refused with an error saying so (with both stacks; `sslpassword` is
//! not supported): OpenSSL is never left to ask for its passphrase on the terminal (which
//! blocked a process), and rustls cannot decrypt keys.
//!
//! Where this differs from libpq, it is stricter or says so:
//! - `allow` tries TLS first (libpq tries plain first); both accept either.
//! - A failed handshake is an error in every mode; libpq's `prefer` would retry in clear.
//! - Files are read when the connector is built, not per connection: a rotated root or client
//!   certificate needs a new connector. libpq's implicit files (`~/.postgresql/root.crt`,
//!   `postgresql.crt`, `postgresql.key`) and `PG*` environment variables are not read: name the
//!   files in the URL or the settings.
//!
//! The host name is never checked against an empty name: tokio-postgres hands the connector
//! `""` when only `hostaddr` is given, and OpenSSL then skips the check silently. The
//! translation in [`crate::pg`] refuses `verify-full` without a host name, and the connector
//! fails every handshake that would reach it anyway.

use std::fs;
use std::path::{Path, PathBuf};

use pool_core::config::SslMode;
use pool_core::error::ConfigError;
#[cfg(feature = "tls-openssl")]
use postgres_openssl::MakeTlsConnector;

#[cfg(feature = "tls-openssl")]
mod openssl_tls;
#[cfg(feature = "rustls")]
mod rustls_tls;

#[cfg(feature = "rustls")]
pub use rustls_tls::{RustlsConnect, RustlsConnector, RustlsError, RustlsStream};

/// Certificate bundles of the common distributions: the system roots of `verify-full` without
/// `sslrootcert` (and of `sslrootcert=system`). They are looked at in this order and the first
/// that exists is read, by OpenSSL in addition to its default paths (a vendored OpenSSL looks
/// only under `/usr/local/ssl`), and by rustls after `SSL_CERT_FILE` and `SSL_CERT_DIR`.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Which certificates the server's chain is verified against (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// No `sslrootcert`: `verify-full` uses the system's roots (as `sslrootcert=system`),
    /// `verify-ca` is refused, weaker modes verify nothing.
    Unset,
    /// `sslrootcert=system`: the system's roots. As libpq, only with `verify-full`.
    System,
    /// `sslrootcert=<file>`: only the certificates in this PEM file are trusted.
    File(PathBuf),
}

/// What a TLS handshake checks about the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: TLS encrypts, but any certificate is accepted.
    None,
    /// The chain up to a trusted root, not the name (`verify-ca`, or `require` with a root
    /// file).
    Chain,
    /// The chain and that the certificate names the host (`verify-full`).
    ChainAndHostName,
}

/// The TLS part of a PostgreSQL connection's settings, with libpq's meanings. Built by
/// [`crate::pg::PgConnectConfig`]; see the [module documentation](self) for the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSettings {
    /// `sslmode`; libpq's default is `prefer`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_certs: RootCerts,
    /// `sslcert`: the client certificate (PEM, may carry intermediates after the leaf).
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM or DER, unencrypted, readable only
    /// by its owner as libpq requires).
    pub client_key: Option<PathBuf>,
    /// `sslsni`: send the host name as SNI (never for IP addresses). Default: `true`.
    pub sni: bool,
    /// `ssl_min_protocol_version`. Default: TLS 1.2, as libpq.
    pub min_protocol: Option<TlsVersion>,
    /// `ssl_max_protocol_version`. Default: none.
    pub max_protocol: Option<TlsVersion>,
    /// `sslnegotiation=direct` (PostgreSQL 17+): TLS from the first byte, with ALPN
    /// `postgresql`.
    pub direct: bool,
    /// Which TLS stack builds the connector. Default: [`TlsBackend::default`].
    pub backend: TlsBackend,
}

/// A TLS protocol version (`ssl_min_protocol_version`, `ssl_max_protocol_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    /// `TLSv1` (TLS 1.0). OpenSSL only; rustls starts at 1.2.
    Tls1_0,
    /// `TLSv1.1`. OpenSSL only; rustls starts at 1.2.
    Tls1_1,
    /// `TLSv1.2`, libpq's default minimum.
    Tls1_2,
    /// `TLSv1.3`.
    Tls1_3,
}

impl std::fmt::Display for TlsVersion {
    /// libpq's spelling: `TLSv1`, `TLSv1.1`, `TLSv1.2`, `TLSv1.3`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsVersion::Tls1_0 => "TLSv1",
            TlsVersion::Tls1_1 => "TLSv1.1",
            TlsVersion::Tls1_2 => "TLSv1.2",
            TlsVersion::Tls1_3 => "TLSv1.3",
        })
    }
}

/// The TLS stack that builds the connector (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsBackend {
    /// OpenSSL through postgres-openssl (cargo feature `tls-openssl`, in `postgres`).
    OpenSsl,
    /// rustls with the *ring* provider (cargo feature `rustls`, in `postgres-rustls`).
    Rustls,
}

impl TlsBackend {
    /// Whether this stack is compiled in (its cargo feature is on). A connector for a stack
    /// that is not is refused when built, unless no TLS is needed (`sslmode=disable`).
    pub fn is_compiled(self) -> bool {
        match self {
            TlsBackend::OpenSsl => cfg!(feature = "tls-openssl"),
            TlsBackend::Rustls => cfg!(feature = "rustls"),
        }
    }

    /// Its cargo feature.
    fn feature(self) -> &'static str {
        match self {
            TlsBackend::OpenSsl => "tls-openssl (or postgres)",
            TlsBackend::Rustls => "rustls (or postgres-rustls)",
        }
    }
}

impl Default for TlsBackend {
    /// OpenSSL when its feature is on (also when rustls is compiled too), else rustls when
    /// its feature is on, else OpenSSL (which then refuses modes that need TLS).
    fn default() -> Self {
        if cfg!(feature = "tls-openssl") || !cfg!(feature = "rustls") {
            TlsBackend::OpenSsl
        } else {
            TlsBackend::Rustls
        }
    }
}

impl std::fmt::Display for TlsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsBackend::OpenSsl => "OpenSSL",
            TlsBackend::Rustls => "rustls",
        })
    }
}

/// A built connector: one per pool, cloned (reference counts) per connection.
#[derive(Clone)]
pub(crate) enum Connector {
    /// postgres-openssl's.
    #[cfg(feature = "tls-openssl")]
    OpenSsl(MakeTlsConnector),
    /// Ours, on rustls.
    #[cfg(feature = "rustls")]
    Rustls(RustlsConnector),
    /// No TLS stack for this connector: only modes that may connect in clear.
    Plain,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_certs: RootCerts::Unset,
            client_cert: None,
            client_key: None,
            sni: true,
            min_protocol: Some(TlsVersion::Tls1_2),
            max_protocol: None,
            direct: false,
            backend: TlsBackend::default(),
        }
    }
}

impl TlsSettings {
    /// What the handshake checks, following libpq: weak modes (`allow`, `prefer`, `require`)
    /// verify the chain only when `sslrootcert` names a file.
    pub fn verification(&self) -> Verification {
        match (&self.mode, &self.root_certs) {
            (SslMode::Disable, _) => Verification::None,
            (SslMode::VerifyFull, _) => Verification::ChainAndHostName,
            (SslMode::VerifyCa, _) => Verification::Chain,
            (_, RootCerts::File(_)) => Verification::Chain,
            (_, _) => Verification::None,
        }
    }

    /// The mode tokio-postgres is given: `disable`, `prefer` (for `allow` and `prefer`) or
    /// `require` (for `require`, `verify-ca` and `verify-full`).
    pub fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self.mode {
            SslMode::Disable => Driver::Disable,
            SslMode::Allow | SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }

    /// Checks the combination, as libpq does before connecting.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.root_certs == RootCerts::Unset && self.mode == SslMode::VerifyCa {
            return Err(invalid(
                "sslrootcert",
                "sslmode=verify-ca needs sslrootcert naming the server's CA file: it checks \
                 the chain but not the host name, so trusting the system's public roots would \
                 accept a certificate any public CA issued to anyone (libpq fails without \
                 ~/.postgresql/root.crt, which this pool does not read); give \
                 sslrootcert=/path/to/ca.crt, or use sslmode=verify-full"
                    .to_owned(),
            ));
        }
        if self.root_certs == RootCerts::System && self.mode != SslMode::VerifyFull {
            return Err(invalid(
                "sslrootcert",
                format!(
                    "sslrootcert=system needs sslmode=verify-full (libpq refuses weaker modes \
                     with the system's roots), but sslmode is {}",
                    self.mode
                ),
            ));
        }
        if self.client_key.is_some() != self.client_cert.is_some() {
            return Err(invalid(
                if self.client_cert.is_some() {
                    "sslkey"
                } else {
                    "sslcert"
                },
                "a client certificate needs both sslcert (the certificate) and sslkey (its \
                 private key); give both or neither"
                    .to_owned(),
            ));
        }
        if self.direct
            && matches!(
                self.mode,
                SslMode::Disable | SslMode::Allow | SslMode::Prefer
            )
        {
            return Err(invalid(
                "sslnegotiation",
                format!(
                    "sslnegotiation=direct needs sslmode=require or stronger (as libpq), but \
                     sslmode is {}",
                    self.mode
                ),
            ));
        }
        Ok(())
    }

    /// Builds the connector of [`backend`](Self::backend) (reads the root and client
    /// certificate files once), or none when that stack is not compiled and the mode lets
    /// connections go in clear.
    pub(crate) fn build(&self) -> Result<Connector, ConfigError> {
        self.validate()?;
        match self.backend {
            #[cfg(feature = "tls-openssl")]
            TlsBackend::OpenSsl => return Ok(Connector::OpenSsl(openssl_tls::connector(self)?)),
            #[cfg(feature = "rustls")]
            TlsBackend::Rustls => return Ok(Connector::Rustls(rustls_tls::connector(self)?)),
            #[allow(unreachable_patterns)]
            _ => {}
        }
        let no_stack_at_all =
            !TlsBackend::OpenSsl.is_compiled() && !TlsBackend::Rustls.is_compiled();
        match self.mode {
            SslMode::Disable => Ok(Connector::Plain),
            // As a libpq built without SSL: the weak modes connect in clear.
            SslMode::Allow | SslMode::Prefer if no_stack_at_all => Ok(Connector::Plain),
            _ => Err(invalid(
                "sslmode",
                format!(
                    "sslmode={} needs TLS through {}, which this build of diesel-async-ext \
                     does not have: enable its cargo feature {}",
                    self.mode,
                    self.backend,
                    self.backend.feature()
                ),
            )),
        }
    }

    /// Builds the OpenSSL connector, whatever [`backend`](Self::backend) says: reads the root
    /// and client certificate files once. Every connection clones it (a reference count).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `sslrootcert`, `sslcert` or `sslkey` when a file cannot
    /// be read or holds no usable certificate or key.
    #[cfg(feature = "tls-openssl")]
    pub fn connector(&self) -> Result<MakeTlsConnector, ConfigError> {
        self.validate()?;
        openssl_tls::connector(self)
    }

    /// Builds the rustls connector, whatever [`backend`](Self::backend) says: reads the root
    /// and client certificate files once. Every connection clones it (a reference count).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `sslrootcert`, `sslcert`, `sslkey` or
    /// `ssl_max_protocol_version` when a file cannot be read or holds no usable certificate
    /// or key, or no TLS version rustls speaks is allowed.
    #[cfg(feature = "rustls")]
    pub fn rustls_connector(&self) -> Result<RustlsConnector, ConfigError> {
        self.validate()?;
        rustls_tls::connector(self)
    }
}

fn invalid(setting: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { setting, reason }
}

/// The certificates of the PEM file at `path` (read here, so non-UTF-8 paths work), parsed
/// by the TLS stack's `parse`; a file that cannot be read or parsed, or holds none, is the
/// error of `setting`.
#[cfg_attr(
    not(any(feature = "tls-openssl", feature = "rustls")),
    allow(dead_code)
)]
fn read_certs<T, E: std::fmt::Display>(
    setting: &'static str,
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<Vec<T>, E>,
) -> Result<Vec<T>, ConfigError> {
    let pem = fs::read(path)
        .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
    let certs = parse(&pem).map_err(|e| {
        invalid(
            setting,
            format!("{} is not a PEM certificate file: {e}", path.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(invalid(
            setting,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The error for an encrypted `sslkey`: no passphrase is taken (`sslpassword` is refused by
/// the URL translation), and the path is named, never anything read from the file.
#[cfg_attr(
    not(any(feature = "tls-openssl", feature = "rustls")),
    allow(dead_code)
)]
fn encrypted_key_error(path: &Path) -> ConfigError {
    invalid(
        "sslkey",
        format!(
            "{} is encrypted and this pool takes no passphrase (sslpassword); decrypt it \
             (openssl pkey -in {} -out client.key), keep it readable only by this user \
             (chmod 600) and name the decrypted file in sslkey",
            path.display(),
            path.display()
        ),
    )
}

/// Refuses a key file others may read, as libpq does: owned by this user, no group or other
/// permission at all (`0600` or less); owned by another user (root), group read at most
/// (`0640` or less). Also a key that is not a regular file.
#[cfg_attr(
    not(any(feature = "tls-openssl", feature = "rustls")),
    allow(dead_code)
)]
#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)
        .map_err(|e| invalid("sslkey", format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(
            "sslkey",
            format!("{} is not a regular file", path.display()),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o777;
    let (too_open, allowed) = if meta.uid() == euid {
        (
            mode & 0o077 != 0,
            "0600 (u=rw) or less when owned by this user",
        )
    } else {
        (
            mode & 0o037 != 0,
            "0640 (u=rw,g=r) or less when owned by root",
        )
    };
    if too_open {
        return Err(invalid(
            "sslkey",
            format!(
                "{} has permissions {mode:04o}: a private key others can read is refused (as \
                 libpq does); it must be {allowed}: chmod 600 {}",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg_attr(
    not(any(feature = "tls-openssl", feature = "rustls")),
    allow(dead_code)
)]
#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<(), ConfigError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, root_certs: RootCerts) -> TlsSettings {
        TlsSettings {
            mode,
            root_certs,
            ..TlsSettings::default()
        }
    }

    #[test]
    fn sslmodes_map_to_libpq_verification() {
        use tokio_postgres::config::SslMode as Driver;
        let file = || RootCerts::File("/x/root.crt".into());
        let cases = [
            (
                SslMode::Disable,
                RootCerts::Unset,
                Driver::Disable,
                Verification::None,
            ),
            (
                SslMode::Disable,
                file(),
                Driver::Disable,
                Verification::None,
            ),
            (
                SslMode::Allow,
                RootCerts::Unset,
                Driver::Prefer,
                Verification::None,
            ),
            (
                SslMode::Prefer,
                RootCerts::Unset,
                Driver::Prefer,
                Verification::None,
            ),
            (SslMode::Prefer, file(), Driver::Prefer, Verification::Chain),
            (
                SslMode::Require,
                RootCerts::Unset,
                Driver::Require,
                Verification::None,
            ),
            (
                SslMode::Require,
                file(),
                Driver::Require,
                Verification::Chain,
            ),
            (
                SslMode::VerifyCa,
                RootCerts::Unset,
                Driver::Require,
                Verification::Chain,
            ),
            (
                SslMode::VerifyCa,
                file(),
                Driver::Require,
                Verification::Chain,
            ),
            (
                SslMode::VerifyFull,
                RootCerts::Unset,
                Driver::Require,
                Verification::ChainAndHostName,
            ),
            (
                SslMode::VerifyFull,
                RootCerts::System,
                Driver::Require,
                Verification::ChainAndHostName,
            ),
        ];
        for (mode, roots, driver, verification) in cases {
            let s = settings(mode.clone(), roots.clone());
            assert_eq!(s.driver_mode(), driver, "{mode} {roots:?}");
            assert_eq!(s.verification(), verification, "{mode} {roots:?}");
        }
    }

    /// Builds `s` with each compiled TLS stack: every result, each with its stack.
    fn build_each(s: &TlsSettings) -> Vec<(TlsBackend, Result<(), String>)> {
        [TlsBackend::OpenSsl, TlsBackend::Rustls]
            .into_iter()
            .filter(|b| b.is_compiled())
            .map(|backend| {
                let s = TlsSettings {
                    backend,
                    ..s.clone()
                };
                (backend, s.build().map(|_| ()).map_err(|e| e.to_string()))
            })
            .collect()
    }

    /// The error of each compiled stack (fails if one builds).
    fn errors(s: &TlsSettings) -> Vec<String> {
        build_each(s)
            .into_iter()
            .map(|(b, r)| r.err().unwrap_or_else(|| panic!("{b} accepted {s:?}")))
            .collect()
    }

    #[test]
    fn impossible_combinations_are_refused_as_libpq_does() {
        for err in errors(&settings(SslMode::Require, RootCerts::System)) {
            assert!(
                err.contains("sslrootcert=system needs sslmode=verify-full"),
                "{err}"
            );
        }
        let s = TlsSettings {
            client_cert: Some("/x/client.crt".into()),
            ..TlsSettings::default()
        };
        for err in errors(&s) {
            assert!(err.contains("sslkey"), "{err}");
        }
        let s = TlsSettings {
            direct: true,
            ..TlsSettings::default()
        };
        for err in errors(&s) {
            assert!(err.contains("sslnegotiation=direct"), "{err}");
        }
    }

    #[test]
    fn unreadable_certificate_files_are_named() {
        let s = settings(
            SslMode::VerifyFull,
            RootCerts::File("/nonexistent/root.crt".into()),
        );
        for err in errors(&s) {
            assert!(err.contains("sslrootcert"), "{err}");
            assert!(err.contains("/nonexistent/root.crt"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("root.crt");
        fs::write(&not_pem, "hello").unwrap();
        for err in errors(&settings(SslMode::VerifyCa, RootCerts::File(not_pem))) {
            assert!(err.contains("sslrootcert"), "{err}");
        }
    }

    #[test]
    fn verify_ca_without_a_root_file_is_refused_and_verify_full_uses_the_system_roots() {
        for err in errors(&settings(SslMode::VerifyCa, RootCerts::Unset)) {
            assert!(err.contains("sslrootcert"), "{err}");
            assert!(err.contains("verify-full"), "{err}");
        }
        for (backend, built) in build_each(&settings(SslMode::VerifyFull, RootCerts::Unset)) {
            assert!(built.is_ok(), "{backend}: {built:?}");
        }
    }

    #[test]
    fn versions_and_stacks_display_as_libpq_and_the_docs_name_them() {
        let versions = [
            TlsVersion::Tls1_0,
            TlsVersion::Tls1_1,
            TlsVersion::Tls1_2,
            TlsVersion::Tls1_3,
        ]
        .map(|v| v.to_string());
        assert_eq!(versions, ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]);
        assert_eq!(TlsBackend::OpenSsl.to_string(), "OpenSSL");
        assert_eq!(TlsBackend::Rustls.to_string(), "rustls");
    }

    #[test]
    fn without_its_stack_a_connector_connects_in_clear_only_where_libpq_would() {
        for backend in [TlsBackend::OpenSsl, TlsBackend::Rustls] {
            if backend.is_compiled() {
                continue;
            }
            let s = |mode| TlsSettings {
                backend,
                ..settings(mode, RootCerts::Unset)
            };
            assert!(matches!(s(SslMode::Disable).build(), Ok(Connector::Plain)));
            let err = s(SslMode::Require).build().err().unwrap().to_string();
            // The error names the mode, the stack and the feature that brings it.
            let (name, feature) = match backend {
                TlsBackend::OpenSsl => ("OpenSSL", "tls-openssl (or postgres)"),
                TlsBackend::Rustls => ("rustls", "rustls (or postgres-rustls)"),
            };
            assert!(
                err.contains(&format!(
                    "sslmode=require needs TLS through {name}, which this build"
                )),
                "{err}"
            );
            assert!(
                err.contains(&format!("enable its cargo feature {feature}")),
                "{err}"
            );
            let none_at_all =
                !TlsBackend::OpenSsl.is_compiled() && !TlsBackend::Rustls.is_compiled();
            assert_eq!(
                matches!(s(SslMode::Prefer).build(), Ok(Connector::Plain)),
                none_at_all
            );
        }
    }

    #[test]
    fn a_client_certificate_and_its_key_are_loaded_and_a_wrong_key_is_refused() {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::x509::{X509Builder, X509NameBuilder};
        let key = || {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
            openssl::pkey::PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
        };
        let (k1, k2) = (key(), key());
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "app").unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&k1).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&k1, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("client.crt");
        let key_path = dir.path().join("client.key");
        let other_key = dir.path().join("other.key");
        fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
        write_private(&key_path, &k1.private_key_to_der().unwrap());
        write_private(&other_key, &k2.private_key_to_pem_pkcs8().unwrap());
        let sec1_pem = dir.path().join("sec1.key");
        write_private(
            &sec1_pem,
            &k1.ec_key().unwrap().private_key_to_pem().unwrap(),
        );
        let with = |key: &Path| TlsSettings {
            mode: SslMode::Require,
            client_cert: Some(cert_path.clone()),
            client_key: Some(key.to_path_buf()),
            ..TlsSettings::default()
        };
        let builds = |key: &Path| {
            for (backend, built) in build_each(&with(key)) {
                assert!(built.is_ok(), "{backend}: {built:?}");
            }
        };
        builds(&key_path); // DER
        builds(&sec1_pem); // PEM, "EC PRIVATE KEY"
        for err in errors(&with(&other_key)) {
            assert!(err.contains("does not belong"), "{err}");
        }

        // Readable by group or others: refused as libpq does, naming the file and the fix.
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).unwrap();
            for err in errors(&with(&key_path)) {
                assert!(err.contains("sslkey"), "{mode:o}: {err}");
                assert!(err.contains("chmod 600"), "{mode:o}: {err}");
            }
        }
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o400)).unwrap();
        builds(&key_path);
        // Owned by another user (root, for a key the system manages): group read is allowed
        // too, and nothing more. Only root can give a file away; others skip this part.
        let owned_elsewhere = dir.path().join("system.key");
        fs::copy(&key_path, &owned_elsewhere).unwrap();
        if std::os::unix::fs::chown(&owned_elsewhere, Some(65534), Some(65534)).is_ok() {
            for mode in [0o640, 0o600, 0o400] {
                fs::set_permissions(&owned_elsewhere, fs::Permissions::from_mode(mode)).unwrap();
                builds(&owned_elsewhere);
            }
            for mode in [0o660, 0o644, 0o642, 0o641] {
                fs::set_permissions(&owned_elsewhere, fs::Permissions::from_mode(mode)).unwrap();
                for err in errors(&with(&owned_elsewhere)) {
                    assert!(err.contains("0640 (u=rw,g=r) or less"), "{mode:o}: {err}");
                }
            }
        } else {
            eprintln!("not root: the rule for a key owned by another user is not checked");
        }

        // Encrypted: an error at once, never OpenSSL's passphrase prompt, no passphrase shown.
        let passphrase = b"correct horse battery staple";
        let encrypted = dir.path().join("encrypted.key");
        write_private(
            &encrypted,
            &k1.private_key_to_pem_pkcs8_passphrase(
                openssl::symm::Cipher::aes_256_cbc(),
                passphrase,
            )
            .unwrap(),
        );
        // The legacy PEM encryption (`Proc-Type: 4,ENCRYPTED`) too.
        let legacy = dir.path().join("legacy.key");
        write_private(
            &legacy,
            &k1.ec_key()
                .unwrap()
                .private_key_to_pem_passphrase(openssl::symm::Cipher::aes_256_cbc(), passphrase)
                .unwrap(),
        );
        let started = std::time::Instant::now();
        for key in [&encrypted, &legacy] {
            for err in errors(&with(key)) {
                assert!(err.contains("is encrypted"), "{err}");
                assert!(err.contains("sslkey"), "{err}");
                assert!(!err.contains("correct horse"), "{err}");
            }
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Writes a key file readable by its owner only (as libpq requires).
    pub(crate) fn write_private(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }
}
