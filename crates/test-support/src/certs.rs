//! A throwaway CA, a server certificate signed by it, and client certificates signed by the
//! same CA on demand (EC P-256, SHA-256).

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509};

/// The CA of one test server, kept in memory so that client certificates can be issued later.
pub(crate) struct Ca {
    cert: X509,
    key: PKey<Private>,
}

/// PEM files for one test server.
pub(crate) struct Certs {
    /// The CA that signed the server certificate (and signs client certificates).
    pub(crate) ca: Ca,
    /// The CA certificate (what clients put in `sslrootcert`).
    pub(crate) ca_pem: Vec<u8>,
    /// The server certificate: by default CN `localhost`, SAN `DNS:localhost`, `IP:127.0.0.1`
    /// (see [`generate_for`]).
    pub(crate) server_cert_pem: Vec<u8>,
    /// The server's private key (PKCS#8).
    pub(crate) server_key_pem: Vec<u8>,
}

fn key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn name(cn: &str) -> Result<X509Name, ErrorStack> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("O", "resilient-diesel tests")?;
    name.append_entry_by_text("CN", cn)?;
    Ok(name.build())
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(64, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn validity(builder: &mut X509Builder) -> Result<(), ErrorStack> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // An hour back, so clock granularity never makes a fresh certificate "not yet valid".
    let not_before = Asn1Time::from_unix((now - 3600) as libc::time_t)?;
    let not_after = Asn1Time::days_from_now(3650)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    Ok(())
}

/// Generates a fresh CA and a server certificate for `names` (each an IP address SAN if it
/// parses as one, else a DNS SAN; the first is also the CN). Empty `names` means `localhost`
/// and `127.0.0.1`.
pub(crate) fn generate_for(names: &[String]) -> Result<Certs, ErrorStack> {
    let default_names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let names = if names.is_empty() {
        &default_names[..]
    } else {
        names
    };
    let ca_key = key()?;
    let ca_name = name("resilient-diesel test CA")?;
    let mut ca = X509Builder::new()?;
    ca.set_version(2)?;
    let ca_serial = serial()?;
    ca.set_serial_number(&ca_serial)?;
    ca.set_subject_name(&ca_name)?;
    ca.set_issuer_name(&ca_name)?;
    ca.set_pubkey(&ca_key)?;
    validity(&mut ca)?;
    ca.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    ca.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&ca.x509v3_context(None, None))?;
    ca.append_extension(ski)?;
    ca.sign(&ca_key, MessageDigest::sha256())?;
    let ca: X509 = ca.build();

    let server_key = key()?;
    let mut leaf = X509Builder::new()?;
    leaf.set_version(2)?;
    let leaf_serial = serial()?;
    let leaf_name = name(&names[0])?;
    leaf.set_serial_number(&leaf_serial)?;
    leaf.set_subject_name(&leaf_name)?;
    leaf.set_issuer_name(ca.subject_name())?;
    leaf.set_pubkey(&server_key)?;
    validity(&mut leaf)?;
    leaf.append_extension(BasicConstraints::new().build()?)?;
    leaf.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_agreement()
            .build()?,
    )?;
    leaf.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        if n.parse::<std::net::IpAddr>().is_ok() {
            san.ip(n);
        } else {
            san.dns(n);
        }
    }
    let san = san.build(&leaf.x509v3_context(Some(&ca), None))?;
    leaf.append_extension(san)?;
    let ski = SubjectKeyIdentifier::new().build(&leaf.x509v3_context(Some(&ca), None))?;
    leaf.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&leaf.x509v3_context(Some(&ca), None))?;
    leaf.append_extension(aki)?;
    leaf.sign(&ca_key, MessageDigest::sha256())?;
    let leaf = leaf.build();

    Ok(Certs {
        ca_pem: ca.to_pem()?,
        server_cert_pem: leaf.to_pem()?,
        server_key_pem: server_key.private_key_to_pem_pkcs8()?,
        ca: Ca {
            cert: ca,
            key: ca_key,
        },
    })
}

/// A client certificate (PEM) and its private key (PKCS#8 PEM) for `common_name`, signed by
/// `ca`: CN `common_name` (what PostgreSQL's `cert` method compares with the user name),
/// extended key usage `clientAuth`.
pub(crate) fn issue_client(ca: &Ca, common_name: &str) -> Result<(Vec<u8>, Vec<u8>), ErrorStack> {
    let client_key = key()?;
    let mut leaf = X509Builder::new()?;
    leaf.set_version(2)?;
    let leaf_serial = serial()?;
    let leaf_name = name(common_name)?;
    leaf.set_serial_number(&leaf_serial)?;
    leaf.set_subject_name(&leaf_name)?;
    leaf.set_issuer_name(ca.cert.subject_name())?;
    leaf.set_pubkey(&client_key)?;
    validity(&mut leaf)?;
    leaf.append_extension(BasicConstraints::new().build()?)?;
    leaf.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_agreement()
            .build()?,
    )?;
    leaf.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    let ski = SubjectKeyIdentifier::new().build(&leaf.x509v3_context(Some(&ca.cert), None))?;
    leaf.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&leaf.x509v3_context(Some(&ca.cert), None))?;
    leaf.append_extension(aki)?;
    leaf.sign(&ca.key, MessageDigest::sha256())?;
    let leaf = leaf.build();
    Ok((leaf.to_pem()?, client_key.private_key_to_pem_pkcs8()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sans(pem: &[u8]) -> Vec<String> {
        let cert = X509::from_pem(pem).unwrap();
        cert.subject_alt_names()
            .unwrap()
            .iter()
            .map(|n| match (n.dnsname(), n.ipaddress()) {
                (Some(d), _) => d.to_owned(),
                (None, Some(ip)) => format!("{ip:?}"),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn default_names_are_localhost_and_loopback_and_others_can_be_asked_for() {
        let certs = generate_for(&[]).unwrap();
        assert_eq!(
            sans(&certs.server_cert_pem),
            ["localhost", "[127, 0, 0, 1]"]
        );
        let certs = generate_for(&["db.example.invalid".to_owned()]).unwrap();
        assert_eq!(sans(&certs.server_cert_pem), ["db.example.invalid"]);
    }

    #[test]
    fn a_client_certificate_names_its_cn_and_verifies_against_the_ca() {
        let certs = generate_for(&[]).unwrap();
        let (cert_pem, key_pem) = issue_client(&certs.ca, "app").unwrap();
        let cert = X509::from_pem(&cert_pem).unwrap();
        let cn: Vec<String> = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .map(|e| e.data().to_string().unwrap())
            .collect();
        assert_eq!(cn, ["app"]);
        let ca = X509::from_pem(&certs.ca_pem).unwrap();
        assert!(cert.verify(&ca.public_key().unwrap()).unwrap());
        let key = PKey::private_key_from_pem(&key_pem).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key));
    }
}
