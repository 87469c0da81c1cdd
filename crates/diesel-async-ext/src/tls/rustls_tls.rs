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
