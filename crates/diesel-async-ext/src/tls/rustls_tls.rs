//! The rustls connector (feature `rustls`): rustls with the *ring* provider, set up with
//! libpq's meanings (see the [parent module](super)), and tokio-postgres's TLS traits
//! implemented here (no third-party glue crate).
//!
//! - No verification (`require`, `prefer`, `allow` without a root file): any certificate is
//!   accepted, but the handshake's signatures are still checked against the certificate's
//!   key, as OpenSSL does with `SSL_VERIFY_NONE`.
//! - The chain (`verify-ca`, or a weaker mode with a root file): webpki's verifier, whose
//!   name mismatch alone is forgiven (it checks the chain, then the name).
//! - The chain and the name (`verify-full`): webpki's verifier as is.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pool_core::error::ConfigError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::{
    check_key_permissions, encrypted_key_error, invalid, RootCerts, TlsSettings, TlsVersion,
    Verification, SYSTEM_BUNDLES,
};

/// tokio-postgres's TLS connector through rustls, built by
/// [`TlsSettings::rustls_connector`] (or by [`PgConnector`](crate::PgConnector) with
/// [`TlsBackend::Rustls`](super::TlsBackend::Rustls)) with libpq's `sslmode` meanings. Cloning
/// shares the rustls configuration (a reference count).
#[derive(Clone)]
pub struct RustlsConnector {
    config: Arc<ClientConfig>,
    verification: Verification,
}

impl fmt::Debug for RustlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsConnector")
            .field("verification", &self.verification)
            .finish_non_exhaustive()
    }
}

/// One connection's TLS handshake, for one server name (see [`RustlsConnector`]).
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for RustlsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsConnect")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A TLS stream of [`RustlsConnector`]: tokio-rustls's, with `tls-server-end-point` channel
/// binding (for SCRAM-SHA-256-PLUS and `channel_binding=require`).
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> fmt::Debug for RustlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsStream").finish_non_exhaustive()
    }
}

/// A failed rustls handshake (or a host name it cannot use). A certificate that did not
/// verify reads as OpenSSL's would (`certificate verify failed: hostname mismatch`, ...),
/// followed by rustls's own reason, so hints and error classes are the same for both stacks.
#[derive(Debug)]
pub struct RustlsError {
    message: String,
    source: Option<io::Error>,
}

impl fmt::Display for RustlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RustlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Not the rustls error the message already describes: only an I/O failure's own.
        self.source
            .as_ref()
            .filter(|e| e.get_ref().is_none())
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = RustlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, RustlsError> {
        let name = match ServerName::try_from(domain) {
            Ok(name) => name.to_owned(),
            // No name to check against: never for verify-full (the translation refuses it,
            // and this refuses every handshake that would reach here anyway).
            Err(_) if self.verification == Verification::ChainAndHostName => {
                return Err(RustlsError {
                    message: format!(
                        "certificate verify failed: sslmode=verify-full needs a host name to \
                         check the certificate against, and {domain:?} is not one"
                    ),
                    source: None,
                })
            }
            // The name is not checked: an address sends no SNI, as for `hostaddr`.
            Err(_) => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
        };
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = RustlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, RustlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let is_address = matches!(self.name, ServerName::IpAddress(_));
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
                .map_err(|e| describe(e, is_address))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the server certificate's hash with its signature's
    /// hash function (SHA-256 for MD5 and SHA-1), as postgres-openssl; none for algorithms
    /// without one (Ed25519, RSA-PSS), as libpq.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| {
                let algorithm = signature_hash(leaf)?;
                Some(ChannelBinding::tls_server_end_point(
                    ring::digest::digest(algorithm, leaf).as_ref().to_vec(),
                ))
            })
            .unwrap_or_else(ChannelBinding::none)
    }
}

/// The hash of a DER certificate's `signatureAlgorithm`, for `tls-server-end-point`.
fn signature_hash(cert: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    use ring::digest::{SHA256, SHA384, SHA512};
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, .. }
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, _, rest) = der(certificate)? else {
        return None;
    };
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(algorithm)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    match oid {
        ECDSA_SHA1 => Some(&SHA256),
        [prefix @ .., last] if prefix == RSA => match last {
            // md5, sha1, sha256 with RSA
            0x04 | 0x05 | 0x0b => Some(&SHA256),
            0x0c => Some(&SHA384),
            0x0d => Some(&SHA512),
            _ => None,
        },
        [prefix @ .., last] if prefix == ECDSA_SHA2 => match last {
            0x02 => Some(&SHA256),
            0x03 => Some(&SHA384),
            0x04 => Some(&SHA512),
            _ => None,
        },
        _ => None,
    }
}

/// One DER element: its tag, its contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The handshake error, worded as OpenSSL's for a certificate that did not verify.
fn describe(err: io::Error, is_address: bool) -> RustlsError {
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let message = match inner {
        Some(rustls::Error::InvalidCertificate(cause)) => {
            let reason = match cause {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    if is_address {
                        "IP address mismatch"
                    } else {
                        "hostname mismatch"
                    }
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "certificate has expired"
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "certificate is not yet valid"
                }
                CertificateError::UnknownIssuer => "unable to get local issuer certificate",
                CertificateError::BadSignature => "certificate signature failure",
                CertificateError::Revoked => "certificate revoked",
                _ => "the certificate was rejected",
            };
            format!(
                "certificate verify failed: {reason} (rustls: {})",
                inner.map(ToString::to_string).unwrap_or_default()
            )
        }
        Some(other) => format!("rustls: {other}"),
        None => err.to_string(),
    };
    RustlsError {
        message,
        source: Some(err),
    }
}

/// Accepts any certificate (`sslmode` without verification), but still checks that the
/// handshake was signed by the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The chain only (`verify-ca`): webpki's verifier checks the chain first, then the name; a
/// name mismatch alone is forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Builds the rustls connector; the settings were validated by the caller.
pub(super) fn connector(settings: &TlsSettings) -> Result<RustlsConnector, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = versions(settings)?;
    let verification = settings.verification();
    let verifier: Arc<dyn ServerCertVerifier> = match verification {
        Verification::None => Arc::new(AnyCertificate(provider.clone())),
        Verification::Chain | Verification::ChainAndHostName => {
            let roots = match &settings.root_certs {
                RootCerts::File(path) => file_roots(path)?,
                RootCerts::System | RootCerts::Unset => system_roots()?,
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        invalid("sslrootcert", format!("no usable root certificate: {e}"))
                    })?;
            if verification == Verification::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| invalid("ssl_min_protocol_version", format!("not accepted: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let (chain, key) = client_certificate(cert, key, &provider)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("sslkey", format!("the key is not usable: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.enable_sni = settings.sni;
    if settings.direct {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Ok(RustlsConnector {
        config: Arc::new(config),
        verification,
    })
}

/// The protocol versions allowed: rustls speaks 1.2 and 1.3 only.
fn versions(
    settings: &TlsSettings,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, ConfigError> {
    let min = settings.min_protocol.unwrap_or(TlsVersion::Tls1_0);
    let max = settings.max_protocol.unwrap_or(TlsVersion::Tls1_3);
    let versions: Vec<_> = [
        (TlsVersion::Tls1_2, &rustls::version::TLS12),
        (TlsVersion::Tls1_3, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (min..=max).contains(v))
    .map(|(_, version)| version)
    .collect();
    if versions.is_empty() {
        return Err(invalid(
            if max < TlsVersion::Tls1_2 {
                "ssl_max_protocol_version"
            } else {
                "ssl_min_protocol_version"
            },
            format!(
                "no TLS version rustls speaks (TLSv1.2, TLSv1.3) is between \
                 ssl_min_protocol_version={min} and ssl_max_protocol_version={max}"
            ),
        ));
    }
    Ok(versions)
}

/// The certificates of a PEM file.
fn read_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    super::read_certs(setting, path, |pem| {
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()
    })
}

/// Only the certificates of the `sslrootcert` file, as libpq.
fn file_roots(path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("sslrootcert", path)? {
        roots.add(cert).map_err(|e| {
            invalid(
                "sslrootcert",
                format!("{} holds an unusable certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

/// The system's roots, where OpenSSL finds them: `SSL_CERT_FILE`, the files of
/// `SSL_CERT_DIR` (`:`-separated), and the first distribution bundle that exists.
fn system_roots() -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    let mut add = |path: &Path| {
        if let Ok(pem) = fs::read(path) {
            roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).flatten());
        }
    };
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        add(Path::new(&file));
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs) {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                add(&entry.path());
            }
        }
    }
    if let Some(bundle) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
        add(bundle);
    }
    if roots.is_empty() {
        return Err(invalid(
            "sslrootcert",
            format!(
                "no system root certificate found (looked at SSL_CERT_FILE, SSL_CERT_DIR and \
                 {}); give the server's CA with sslrootcert=/path/to/ca.crt",
                SYSTEM_BUNDLES.join(", ")
            ),
        ));
    }
    Ok(roots)
}

/// The client certificate chain and its unencrypted key (PEM or DER, as libpq), checked to
/// belong together. Never asks for a passphrase: an encrypted key is refused.
fn client_certificate(
    cert: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
    let chain = read_certs("sslcert", cert)?;
    check_key_permissions(key_path)?;
    let bytes = fs::read(key_path)
        .map_err(|e| invalid("sslkey", format!("cannot read {}: {e}", key_path.display())))?;
    let key = match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => key,
        Err(_) if String::from_utf8_lossy(&bytes).contains("ENCRYPTED") => {
            return Err(encrypted_key_error(key_path))
        }
        Err(_) => PrivateKeyDer::try_from(bytes.as_slice())
            .map(|key| key.clone_key())
            .map_err(|_| {
                invalid(
                    "sslkey",
                    format!("{} is not a PEM or DER private key", key_path.display()),
                )
            })?,
    };
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            invalid(
                "sslkey",
                format!("{} is not a usable private key: {e}", key_path.display()),
            )
        })?;
    match CertifiedKey::new(chain.clone(), signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => Err(invalid(
            "sslkey",
            format!(
                "{} does not belong to the sslcert certificate {}",
                key_path.display(),
                cert.display()
            ),
        )),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) | Ok(()) => {
            Ok((chain, key))
        }
        Err(e) => Err(invalid(
            "sslcert",
            format!("{} is not a usable certificate: {e}", cert.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::{PKey, Private};
    use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
    use openssl::x509::{X509Builder, X509NameBuilder, X509};
    // Test-only: rustls keeps `DigitallySignedStruct::new` private; its wire form is public.
    use rustls::internal::msgs::codec::{Codec, Reader};

    fn ec_key() -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    /// A v3 certificate for `key`, signed with `digest` by `issuer` (self-signed without one),
    /// a CA when `ca`, with `dns` as its subject alternative name if given.
    fn cert(
        key: &PKey<Private>,
        digest: MessageDigest,
        issuer: Option<(&X509, &PKey<Private>)>,
        ca: bool,
        dns: Option<&str>,
    ) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", if ca { "unit CA" } else { "unit leaf" })
            .unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let serial = BigNum::from_u32(if ca { 1 } else { 2 }).unwrap();
        b.set_serial_number(&serial.to_asn1_integer().unwrap())
            .unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
            .unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        if ca {
            let bc = BasicConstraints::new().critical().ca().build().unwrap();
            b.append_extension(bc).unwrap();
        }
        if let Some(dns) = dns {
            let san = SubjectAlternativeName::new()
                .dns(dns)
                .build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None))
                .unwrap();
            b.append_extension(san).unwrap();
        }
        b.sign(issuer.map_or(key, |(_, k)| k), digest).unwrap();
        b.build()
    }

    fn der_of(cert: &X509) -> CertificateDer<'static> {
        CertificateDer::from(cert.to_der().unwrap())
    }

    /// A certificate-shaped DER whose `signatureAlgorithm` is `oid` (an empty tbs).
    fn with_algorithm(oid: &[u8]) -> Vec<u8> {
        let mut algorithm = vec![0x06, u8::try_from(oid.len()).unwrap()];
        algorithm.extend_from_slice(oid);
        let mut body = vec![0x30, 0x00, 0x30, u8::try_from(algorithm.len()).unwrap()];
        body.extend_from_slice(&algorithm);
        let mut cert = vec![0x30, u8::try_from(body.len()).unwrap()];
        cert.extend_from_slice(&body);
        cert
    }

    #[test]
    fn der_reads_short_and_long_lengths_and_refuses_what_does_not_fit() {
        assert_eq!(der(&[]), None);
        assert_eq!(der(&[0x04]), None);
        assert_eq!(
            der(&[0x04, 0x02, 7, 8, 9]),
            Some((0x04, &[7u8, 8][..], &[9u8][..]))
        );
        assert_eq!(
            der(&[0x04, 0x02, 7, 8]),
            Some((0x04, &[7u8, 8][..], &[][..]))
        );
        assert_eq!(der(&[0x04, 0x03, 7, 8]), None, "content cut short");
        // The longest short form, and the first long form.
        let mut short = vec![0x04, 0x7f];
        short.extend(std::iter::repeat_n(1u8, 127));
        assert_eq!(der(&short).map(|(_, c, _)| c.len()), Some(127));
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(1u8, 128));
        assert_eq!(der(&long).map(|(_, c, _)| c.len()), Some(128));
        // 0x80 alone is BER's indefinite length: not DER.
        let mut indefinite = vec![0x04, 0x80];
        indefinite.extend(std::iter::repeat_n(1u8, 128));
        assert_eq!(der(&indefinite), None);
        // Two length bytes, big-endian: 0x0102 = 258.
        let mut two = vec![0x30, 0x82, 0x01, 0x02];
        two.extend(std::iter::repeat_n(2u8, 260));
        assert_eq!(
            der(&two).map(|(t, c, r)| (t, c.len(), r.len())),
            Some((0x30, 258, 2))
        );
        // Four length bytes are read; five are refused; missing length bytes too.
        assert_eq!(
            der(&[0x04, 0x84, 0, 0, 0, 1, 5]),
            Some((0x04, &[5u8][..], &[][..]))
        );
        assert_eq!(der(&[0x04, 0x85, 0, 0, 0, 0, 1, 5]), None);
        assert_eq!(der(&[0x04, 0x82, 0x01]), None);
        assert_eq!(der(&[0x04, 0x81, 0x00]), Some((0x04, &[][..], &[][..])));
    }

    #[test]
    fn the_channel_binding_hash_follows_the_certificates_signature_algorithm() {
        let name = |a: Option<&'static ring::digest::Algorithm>| a.map(|a| format!("{a:?}"));
        let sha = |a: &'static ring::digest::Algorithm| Some(format!("{a:?}"));
        use ring::digest::{SHA256, SHA384, SHA512};
        const RSA: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
        const ECDSA_SHA2: [u8; 7] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
        let rsa = |last: u8| [&RSA[..], &[last]].concat();
        let ecdsa = |last: u8| [&ECDSA_SHA2[..], &[last]].concat();
        let cases: [(Vec<u8>, Option<String>, &str); 13] = [
            (rsa(0x04), sha(&SHA256), "md5WithRSAEncryption: SHA-256"),
            (rsa(0x05), sha(&SHA256), "sha1WithRSAEncryption: SHA-256"),
            (rsa(0x0b), sha(&SHA256), "sha256WithRSAEncryption"),
            (rsa(0x0c), sha(&SHA384), "sha384WithRSAEncryption"),
            (rsa(0x0d), sha(&SHA512), "sha512WithRSAEncryption"),
            (rsa(0x0a), None, "RSASSA-PSS: none, as libpq"),
            (
                vec![0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],
                sha(&SHA256),
                "ecdsa-with-SHA1: SHA-256",
            ),
            (ecdsa(0x02), sha(&SHA256), "ecdsa-with-SHA256"),
            (ecdsa(0x03), sha(&SHA384), "ecdsa-with-SHA384"),
            (ecdsa(0x04), sha(&SHA512), "ecdsa-with-SHA512"),
            (ecdsa(0x01), None, "ecdsa-with-SHA224: none"),
            (vec![0x2b, 0x65, 0x70], None, "Ed25519: none, as libpq"),
            (
                vec![0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02],
                None,
                "dsa-with-sha256 (ends as ecdsa-with-SHA256 does): none",
            ),
        ];
        for (oid, want, what) in cases {
            assert_eq!(name(signature_hash(&with_algorithm(&oid))), want, "{what}");
        }
        // Not a certificate: no binding rather than a wrong one.
        assert_eq!(name(signature_hash(&[])), None);
        assert_eq!(name(signature_hash(&[0x04, 0x00])), None);
        // Real certificates, as OpenSSL writes them.
        let key = ec_key();
        for (digest, want) in [
            (MessageDigest::sha256(), &SHA256),
            (MessageDigest::sha384(), &SHA384),
            (MessageDigest::sha512(), &SHA512),
        ] {
            let c = cert(&key, digest, None, true, None);
            assert_eq!(name(signature_hash(&c.to_der().unwrap())), sha(want));
        }
    }

    /// `ecdsa_secp256r1_sha256` over `message`, signed by `key`, in TLS's wire form.
    fn signed(key: &PKey<Private>, message: &[u8]) -> DigitallySignedStruct {
        let mut signer = openssl::sign::Signer::new(MessageDigest::sha256(), key).unwrap();
        signer.update(message).unwrap();
        let sig = signer.sign_to_vec().unwrap();
        let mut wire = vec![0x04, 0x03];
        wire.extend_from_slice(&u16::try_from(sig.len()).unwrap().to_be_bytes());
        wire.extend_from_slice(&sig);
        DigitallySignedStruct::read(&mut Reader::init(&wire)).unwrap()
    }

    /// A private CA (certificate and key) and webpki's verifier trusting it alone.
    fn private_ca() -> (X509, PKey<Private>, Arc<WebPkiServerVerifier>) {
        let ca_key = ec_key();
        let ca = cert(&ca_key, MessageDigest::sha256(), None, true, None);
        let mut roots = RootCertStore::empty();
        roots.add(der_of(&ca)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        (ca, ca_key, webpki)
    }

    /// Every verifier checks the handshake's signature against the certificate's key, the
    /// one without verification (`require`) too: a server that shows a certificate whose key
    /// it does not hold is refused, as OpenSSL refuses it with `SSL_VERIFY_NONE`.
    #[test]
    fn every_verifier_checks_the_handshake_signature_against_the_certificates_key() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (ca, ca_key, webpki) = private_ca();
        let verifiers: [(&str, Arc<dyn ServerCertVerifier>); 2] = [
            ("none", Arc::new(AnyCertificate(provider.clone()))),
            ("chain", Arc::new(ChainOnly(webpki.clone()))),
        ];
        let key = ec_key();
        let leaf = der_of(&cert(
            &key,
            MessageDigest::sha256(),
            Some((&ca, &ca_key)),
            false,
            Some("localhost"),
        ));
        let message = b"the handshake transcript";
        let good = signed(&key, message);
        let by_another_key = signed(&ec_key(), message);
        for (what, v) in verifiers {
            assert!(
                v.supported_verify_schemes()
                    .contains(&SignatureScheme::ECDSA_NISTP256_SHA256),
                "{what}: {:?}",
                v.supported_verify_schemes()
            );
            assert_eq!(
                v.supported_verify_schemes(),
                webpki.supported_verify_schemes(),
                "{what}"
            );
            assert!(
                v.verify_tls13_signature(message, &leaf, &good).is_ok(),
                "{what}"
            );
            assert!(
                v.verify_tls12_signature(message, &leaf, &good).is_ok(),
                "{what}"
            );
            assert!(
                v.verify_tls13_signature(message, &leaf, &by_another_key)
                    .is_err(),
                "{what}: a TLS 1.3 handshake signed by another key was accepted"
            );
            assert!(
                v.verify_tls12_signature(message, &leaf, &by_another_key)
                    .is_err(),
                "{what}: a TLS 1.2 handshake signed by another key was accepted"
            );
            assert!(
                v.verify_tls13_signature(b"another transcript", &leaf, &good)
                    .is_err(),
                "{what}: a signature over another transcript was accepted"
            );
        }
    }

    /// A host that is no valid server name (the translation refuses it for `verify-full`):
    /// `verify-full` refuses to start the handshake, having nothing to check the certificate
    /// against; weaker modes go on without SNI, as for an address.
    #[test]
    fn direct_negotiation_offers_alpn_postgresql_and_sslsni_decides_the_server_name_sent() {
        use pool_core::config::SslMode;
        for (direct, sni) in [(false, true), (true, true), (true, false), (false, false)] {
            let settings = TlsSettings {
                mode: SslMode::Require,
                direct,
                sni,
                ..TlsSettings::default()
            };
            let made = connector(&settings).unwrap();
            let alpn: Vec<Vec<u8>> = if direct {
                vec![b"postgresql".to_vec()]
            } else {
                Vec::new()
            };
            assert_eq!(made.config.alpn_protocols, alpn, "direct {direct}");
            assert_eq!(made.config.enable_sni, sni, "sslsni {sni}");
        }
    }

    #[test]
    fn verify_full_refuses_a_host_that_is_no_server_name_and_weaker_modes_go_on() {
        use pool_core::config::SslMode;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.crt");
        let ca = cert(&ec_key(), MessageDigest::sha256(), None, true, None);
        fs::write(&root, ca.to_pem().unwrap()).unwrap();
        for (mode, refused) in [
            (SslMode::VerifyFull, true),
            (SslMode::VerifyCa, false),
            (SslMode::Require, false),
        ] {
            let settings = TlsSettings {
                mode: mode.clone(),
                root_certs: RootCerts::File(root.clone()),
                ..TlsSettings::default()
            };
            let mut connector = connector(&settings).unwrap();
            let shown = format!("{connector:?}");
            assert!(
                shown.starts_with("RustlsConnector") && shown.contains("verification"),
                "{shown}"
            );
            let made = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
                &mut connector,
                "not a host name",
            );
            match made {
                Err(e) if refused => {
                    assert!(e.to_string().contains("needs a host name"), "{mode:?}: {e}")
                }
                Ok(c) if !refused => {
                    let shown = format!("{c:?}");
                    assert!(shown.starts_with("RustlsConnect {"), "{shown}");
                    assert!(
                        matches!(c.name, ServerName::IpAddress(_)),
                        "{mode:?}: {c:?}"
                    )
                }
                Err(e) => panic!("{mode:?}: refused: {e}"),
                Ok(c) => panic!("{mode:?}: a handshake without a name to check: {c:?}"),
            }
        }
    }

    /// A handshake refused for the certificate reads as OpenSSL words it (what libpq users
    /// search for), with rustls's own words beside; an address's mismatch is an address's.
    #[test]
    fn certificate_refusals_are_worded_as_openssls() {
        let refusal = |cause: CertificateError| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(cause),
            )
        };
        let cases = [
            (
                CertificateError::NotValidForName,
                false,
                "hostname mismatch",
            ),
            (
                CertificateError::NotValidForName,
                true,
                "IP address mismatch",
            ),
            (CertificateError::Expired, false, "certificate has expired"),
            (
                CertificateError::NotValidYet,
                false,
                "certificate is not yet valid",
            ),
            (
                CertificateError::UnknownIssuer,
                false,
                "unable to get local issuer certificate",
            ),
            (
                CertificateError::BadSignature,
                false,
                "certificate signature failure",
            ),
            (CertificateError::Revoked, false, "certificate revoked"),
            (
                CertificateError::BadEncoding,
                false,
                "the certificate was rejected",
            ),
        ];
        for (cause, is_address, want) in cases {
            let what = format!("{cause:?}");
            let message = describe(refusal(cause), is_address).to_string();
            assert!(
                message.starts_with(&format!("certificate verify failed: {want} (rustls: ")),
                "{what}: {message}"
            );
        }
        let other = describe(
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::NoCertificatesPresented,
            ),
            false,
        );
        assert!(other.to_string().starts_with("rustls: "), "{other}");
        let plain = describe(io::Error::from(io::ErrorKind::ConnectionReset), false);
        assert_eq!(plain.to_string(), "connection reset");
        // The source is the I/O failure's own; a rustls error is already in the message.
        use std::error::Error as _;
        assert_eq!(
            plain.source().map(ToString::to_string).as_deref(),
            Some("connection reset")
        );
        assert!(other.source().is_none(), "{:?}", other.source());
    }

    /// rustls speaks TLS 1.2 and 1.3: the bounds pick among them, and bounds that leave
    /// neither name the setting to change (a maximum below 1.2, else the minimum).
    #[test]
    fn the_protocol_bounds_pick_among_the_versions_rustls_speaks() {
        let with = |min: Option<TlsVersion>, max: Option<TlsVersion>| {
            versions(&TlsSettings {
                min_protocol: min,
                max_protocol: max,
                ..TlsSettings::default()
            })
            .map(|v| v.iter().map(|v| v.version).collect::<Vec<_>>())
            .map_err(|e| match e {
                ConfigError::Invalid { setting, .. } => setting,
                other => panic!("{other}"),
            })
        };
        use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
        use TlsVersion::*;
        assert_eq!(with(None, None), Ok(vec![TLSv1_2, TLSv1_3]));
        assert_eq!(with(Some(Tls1_3), None), Ok(vec![TLSv1_3]));
        assert_eq!(with(None, Some(Tls1_2)), Ok(vec![TLSv1_2]));
        assert_eq!(with(Some(Tls1_0), Some(Tls1_2)), Ok(vec![TLSv1_2]));
        assert_eq!(with(None, Some(Tls1_1)), Err("ssl_max_protocol_version"));
        assert_eq!(
            with(Some(Tls1_3), Some(Tls1_2)),
            Err("ssl_min_protocol_version")
        );
    }

    /// `verify-ca`: the chain must lead to a root; the name alone is forgiven.
    #[test]
    fn the_chain_only_verifier_forgives_the_name_and_nothing_else() {
        let (ca, ca_key, webpki) = private_ca();
        let chain = ChainOnly(webpki);
        let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();
        let verify = |leaf: &X509, server: &str| {
            chain.verify_server_cert(&der_of(leaf), &[], &name(server), &[], UnixTime::now())
        };
        let ours = cert(
            &ec_key(),
            MessageDigest::sha256(),
            Some((&ca, &ca_key)),
            false,
            Some("localhost"),
        );
        assert!(verify(&ours, "localhost").is_ok());
        assert!(
            verify(&ours, "db.other.example").is_ok(),
            "verify-ca refused a certificate of the right chain for another name"
        );
        let stranger_key = ec_key();
        let stranger_ca = cert(&stranger_key, MessageDigest::sha256(), None, true, None);
        let theirs = cert(
            &ec_key(),
            MessageDigest::sha256(),
            Some((&stranger_ca, &stranger_key)),
            false,
            Some("localhost"),
        );
        // (Both CAs have the same name: the root found by name did not sign it.)
        assert!(
            matches!(
                verify(&theirs, "localhost"),
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadSignature | CertificateError::UnknownIssuer
                ))
            ),
            "verify-ca did not refuse a certificate of another CA: {:?}",
            verify(&theirs, "localhost")
        );
    }
}
