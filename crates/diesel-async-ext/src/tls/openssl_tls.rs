//! The OpenSSL connector (feature `tls-openssl`, part of `postgres`): postgres-openssl's
//! [`MakeTlsConnector`] set up with libpq's meanings (see the [parent module](super)).

use std::fs;
use std::path::Path;

use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use pool_core::error::ConfigError;
use postgres_openssl::MakeTlsConnector;

use super::{
    check_key_permissions, encrypted_key_error, invalid, RootCerts, TlsSettings, TlsVersion,
    Verification, SYSTEM_BUNDLES,
};

fn version(v: TlsVersion) -> SslVersion {
    match v {
        TlsVersion::Tls1_0 => SslVersion::TLS1,
        TlsVersion::Tls1_1 => SslVersion::TLS1_1,
        TlsVersion::Tls1_2 => SslVersion::TLS1_2,
        TlsVersion::Tls1_3 => SslVersion::TLS1_3,
    }
}

/// Builds the OpenSSL connector; the settings were validated by the caller.
pub(super) fn connector(settings: &TlsSettings) -> Result<MakeTlsConnector, ConfigError> {
    let openssl_err = |setting: &'static str, what: &str, e: openssl::error::ErrorStack| {
        invalid(setting, format!("{what}: {e}"))
    };
    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| openssl_err("sslmode", "OpenSSL could not be set up", e))?;
    builder
        .set_min_proto_version(settings.min_protocol.map(version))
        .map_err(|e| openssl_err("ssl_min_protocol_version", "not accepted", e))?;
    builder
        .set_max_proto_version(settings.max_protocol.map(version))
        .map_err(|e| openssl_err("ssl_max_protocol_version", "not accepted", e))?;
    match &settings.root_certs {
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
            if settings.verification() != Verification::None {
                add_system_bundle(&mut builder);
            }
        }
    }
    if let (Some(cert), Some(key)) = (&settings.client_cert, &settings.client_key) {
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
    let verification = settings.verification();
    builder.set_verify(match verification {
        Verification::None => SslVerifyMode::NONE,
        Verification::Chain | Verification::ChainAndHostName => SslVerifyMode::PEER,
    });
    if settings.direct {
        postgres_openssl::set_postgresql_alpn(&mut builder)
            .map_err(|e| openssl_err("sslnegotiation", "ALPN could not be set", e))?;
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    let sni = settings.sni;
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

/// The certificates of a PEM file.
fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<X509>, ConfigError> {
    super::read_certs(setting, path, X509::stack_from_pem)
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
        if String::from_utf8_lossy(&bytes).contains("ENCRYPTED") {
            encrypted_key_error(path)
        } else {
            invalid(
                "sslkey",
                format!("{} is not a PEM or DER private key", path.display()),
            )
        }
    })
}
