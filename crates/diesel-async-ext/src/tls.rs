//! TLS for PostgreSQL connections through openssl, with libpq's `sslmode` meanings.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and leaves verification to the
//! TLS connector (postgres-openssl's [`MakeTlsConnector`] verifies chain *and* host name
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
//! Roots: the `sslrootcert` file alone (as libpq: the system's roots are then not trusted), or
//! with `sslrootcert=system` or none given with `verify-full`, the system's roots (OpenSSL's
//! default paths, the `SSL_CERT_FILE` / `SSL_CERT_DIR` variables, and the usual distribution
//! bundles, which a vendored OpenSSL does not know about).
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
//! An encrypted key is refused with an error saying so: OpenSSL is never left to ask for its
//! passphrase on the terminal (which blocked a process).
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

use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use pool_core::config::SslMode;
use pool_core::error::ConfigError;
use postgres_openssl::MakeTlsConnector;

/// Certificate bundles of the common distributions, used in addition to OpenSSL's default
/// paths (a vendored OpenSSL looks only under `/usr/local/ssl`).
const SYSTEM_BUNDLES: &[&str] = &[
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
    pub min_protocol: Option<SslVersion>,
    /// `ssl_max_protocol_version`. Default: none.
    pub max_protocol: Option<SslVersion>,
    /// `sslnegotiation=direct` (PostgreSQL 17+): TLS from the first byte, with ALPN
    /// `postgresql`.
    pub direct: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_certs: RootCerts::Unset,
            client_cert: None,
            client_key: None,
            sni: true,
            min_protocol: Some(SslVersion::TLS1_2),
            max_protocol: None,
            direct: false,
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

    /// Builds the connector: reads the root and client certificate files once. Every
    /// connection clones it (a reference count).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `sslrootcert`, `sslcert` or `sslkey` when a file cannot
    /// be read or holds no usable certificate or key.
    pub fn connector(&self) -> Result<MakeTlsConnector, ConfigError> {
        self.validate()?;
        let openssl_err = |setting: &'static str, what: &str, e: openssl::error::ErrorStack| {
            invalid(setting, format!("{what}: {e}"))
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| openssl_err("sslmode", "OpenSSL could not be set up", e))?;
        builder
            .set_min_proto_version(self.min_protocol)
            .map_err(|e| openssl_err("ssl_min_protocol_version", "not accepted", e))?;
        builder
            .set_max_proto_version(self.max_protocol)
            .map_err(|e| openssl_err("ssl_max_protocol_version", "not accepted", e))?;
        match &self.root_certs {
            RootCerts::File(path) => {
                // Only this file, as libpq: replace the store that has the default paths.
                let mut store = X509StoreBuilder::new()
                    .map_err(|e| openssl_err("sslrootcert", "OpenSSL store", e))?;
                for cert in read_certs("sslrootcert", path)? {
                    store
                        .add_cert(cert)
                        .map_err(|e| openssl_err("sslrootcert", "adding a certificate", e))?;
                }
                builder.set_cert_store(store.build());
            }
            RootCerts::System | RootCerts::Unset => {
                if self.verification() != Verification::None {
                    add_system_bundle(&mut builder);
                }
            }
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let mut chain = read_certs("sslcert", cert)?.into_iter();
            let leaf = chain.next().ok_or_else(|| {
                invalid(
                    "sslcert",
                    format!("{} holds no certificate", cert.display()),
                )
            })?;
            builder
                .set_certificate(&leaf)
                .map_err(|e| openssl_err("sslcert", "the certificate is not usable", e))?;
            for extra in chain {
                builder
                    .add_extra_chain_cert(extra)
                    .map_err(|e| openssl_err("sslcert", "an intermediate is not usable", e))?;
            }
            let key_path = key;
            let key = read_key(key_path)?;
            if !leaf.public_key().is_ok_and(|public| public.public_eq(&key)) {
                return Err(invalid(
                    "sslkey",
                    format!(
                        "{} does not belong to the sslcert certificate {}",
                        key_path.display(),
                        cert.display()
                    ),
                ));
            }
            builder
                .set_private_key(&key)
                .map_err(|e| openssl_err("sslkey", "the key is not usable", e))?;
            builder.check_private_key().map_err(|e| {
                openssl_err(
                    "sslkey",
                    "the key does not belong to the sslcert certificate",
                    e,
                )
            })?;
        }
        let verification = self.verification();
        builder.set_verify(match verification {
            Verification::None => SslVerifyMode::NONE,
            Verification::Chain | Verification::ChainAndHostName => SslVerifyMode::PEER,
        });
        if self.direct {
            postgres_openssl::set_postgresql_alpn(&mut builder)
                .map_err(|e| openssl_err("sslnegotiation", "ALPN could not be set", e))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        let sni = self.sni;
        connector.set_callback(move |ssl, domain| {
            ssl.set_use_server_name_indication(sni);
            match verification {
                Verification::None | Verification::Chain => ssl.set_verify_hostname(false),
                Verification::ChainAndHostName if domain.is_empty() => {
                    // OpenSSL would skip the name check for an empty name: refuse every
                    // certificate instead (the translation never lets this happen).
                    ssl.set_verify_callback(SslVerifyMode::PEER, |_, _| false);
                }
                Verification::ChainAndHostName => {}
            }
            Ok(())
        });
        Ok(connector)
    }
}

fn invalid(setting: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { setting, reason }
}

/// Adds the first distribution bundle that exists to the default paths already loaded.
fn add_system_bundle(builder: &mut openssl::ssl::SslConnectorBuilder) {
    for bundle in SYSTEM_BUNDLES {
        let Ok(pem) = fs::read(bundle) else { continue };
        let Ok(certs) = X509::stack_from_pem(&pem) else {
            continue;
        };
        let store = builder.cert_store_mut();
        for cert in certs {
            // A duplicate of a default-path certificate is not an error worth reporting.
            let _ = store.add_cert(cert);
        }
        return;
    }
}

/// The certificates of a PEM file (read here, so non-UTF-8 paths work).
fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<X509>, ConfigError> {
    let pem = fs::read(path)
        .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
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

/// Refuses a key file others may read, as libpq does: owned by this user, no group or other
/// permission at all (`0600` or less); owned by another user (root), group read at most
/// (`0640` or less). Also a key that is not a regular file.
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

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<(), ConfigError> {
    Ok(())
}

/// An unencrypted private key, PEM or DER (libpq accepts both). Never lets OpenSSL prompt for
/// a passphrase: an encrypted key fails with an error saying so.
fn read_key(path: &Path) -> Result<PKey<Private>, ConfigError> {
    check_key_permissions(path)?;
    let bytes = fs::read(path)
        .map_err(|e| invalid("sslkey", format!("cannot read {}: {e}", path.display())))?;
    // An explicit passphrase callback that gives none: without it, OpenSSL's default callback
    // asks on the terminal and blocks the process.
    if let Ok(key) = PKey::private_key_from_pem_callback(&bytes, |_| Ok(0)) {
        return Ok(key);
    }
    PKey::private_key_from_der(&bytes).map_err(|_| {
        let encrypted = String::from_utf8_lossy(&bytes).contains("ENCRYPTED");
        invalid(
            "sslkey",
            if encrypted {
                format!(
                    "{} is encrypted and this pool takes no passphrase (sslpassword); \
                     decrypt it (openssl pkey -in {} -out client.key), keep it readable only \
                     by this user (chmod 600) and name the decrypted file in sslkey",
                    path.display(),
                    path.display()
                )
            } else {
                format!("{} is not a PEM or DER private key", path.display())
            },
        )
    })
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

    #[test]
    fn impossible_combinations_are_refused_as_libpq_does() {
        let err = settings(SslMode::Require, RootCerts::System)
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("sslrootcert=system needs sslmode=verify-full"),
            "{err}"
        );
        let s = TlsSettings {
            client_cert: Some("/x/client.crt".into()),
            ..TlsSettings::default()
        };
        assert!(s.connector().err().unwrap().to_string().contains("sslkey"));
        let s = TlsSettings {
            direct: true,
            ..TlsSettings::default()
        };
        assert!(s
            .connector()
            .err()
            .unwrap()
            .to_string()
            .contains("sslnegotiation=direct"));
    }

    #[test]
    fn unreadable_certificate_files_are_named() {
        let s = settings(
            SslMode::VerifyFull,
            RootCerts::File("/nonexistent/root.crt".into()),
        );
        let err = s.connector().err().unwrap().to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(err.contains("/nonexistent/root.crt"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("root.crt");
        fs::write(&not_pem, "hello").unwrap();
        let err = settings(SslMode::VerifyCa, RootCerts::File(not_pem))
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
    }

    #[test]
    fn a_client_certificate_and_its_key_are_loaded_and_a_wrong_key_is_refused() {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::x509::{X509Builder, X509NameBuilder};
        let key = || {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
            PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
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
        let with = |key: &Path| TlsSettings {
            mode: SslMode::Require,
            client_cert: Some(cert_path.clone()),
            client_key: Some(key.to_path_buf()),
            ..TlsSettings::default()
        };
        assert!(with(&key_path).connector().is_ok());
        let err = with(&other_key).connector().err().unwrap().to_string();
        assert!(err.contains("does not belong"), "{err}");

        // Readable by group or others: refused as libpq does, naming the file and the fix.
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).unwrap();
            let err = with(&key_path).connector().err().unwrap().to_string();
            assert!(err.contains("sslkey"), "{mode:o}: {err}");
            assert!(err.contains("chmod 600"), "{mode:o}: {err}");
        }
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(with(&key_path).connector().is_ok());

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
        let started = std::time::Instant::now();
        let err = with(&encrypted).connector().err().unwrap().to_string();
        assert!(err.contains("is encrypted"), "{err}");
        assert!(err.contains("sslkey"), "{err}");
        assert!(!err.contains("correct horse"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn verify_ca_without_a_root_file_is_refused_and_verify_full_uses_the_system_roots() {
        let err = settings(SslMode::VerifyCa, RootCerts::Unset)
            .connector()
            .err()
            .expect("verify-ca with the public roots and no name check")
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(err.contains("verify-full"), "{err}");
        assert!(settings(SslMode::VerifyFull, RootCerts::Unset)
            .connector()
            .is_ok());
    }

    /// Writes a key file readable by its owner only (as libpq requires).
    fn write_private(path: &Path, bytes: &[u8]) {
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
