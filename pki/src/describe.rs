//! Human-readable descriptions of X.509 pieces, for error messages and logs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use x509_parser::extensions::{ExtendedKeyUsage, GeneralName, KeyUsage};
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::oid_registry::Oid;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

pub(crate) const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
pub(crate) const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_SECP256K1: &str = "1.3.132.0.10";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_DSA: &str = "1.2.840.10040.4.1";
const OID_X25519: &str = "1.3.101.110";
const OID_X448: &str = "1.3.101.111";
const OID_ED25519: &str = "1.3.101.112";
const OID_ED448: &str = "1.3.101.113";

/// Longest piece of attacker-controlled text we copy into a message.
const MAX_TEXT: usize = 128;

/// Makes untrusted text safe to log: no control characters (so no forged log lines),
/// bounded length.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_TEXT {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// "ECDSA P-256", "RSA-2048", "Ed25519", ...
pub(crate) fn key_type(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let alg = spki.algorithm.algorithm.to_id_string();
    match alg.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            match curve.as_deref() {
                Some(OID_P256) => "ECDSA P-256".to_owned(),
                Some(OID_P384) => "ECDSA P-384".to_owned(),
                Some(OID_P521) => "ECDSA P-521".to_owned(),
                Some(OID_SECP256K1) => "ECDSA secp256k1".to_owned(),
                Some(other) => format!("an EC key on curve {other}"),
                None => "an EC key with explicit (unnamed) curve parameters".to_owned(),
            }
        }
        OID_RSA | OID_RSA_PSS => {
            let name = if alg == OID_RSA { "RSA" } else { "RSA-PSS" };
            match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => format!("{name}-{}", rsa.key_size()),
                _ => name.to_owned(),
            }
        }
        OID_DSA => "DSA".to_owned(),
        OID_ED25519 => "Ed25519".to_owned(),
        OID_ED448 => "Ed448".to_owned(),
        OID_X25519 => "X25519 (a key-agreement key, which cannot sign)".to_owned(),
        OID_X448 => "X448 (a key-agreement key, which cannot sign)".to_owned(),
        _ => format!("a key of type {}", oid_name(&spki.algorithm.algorithm)),
    }
}

/// Whether the key is ECDSA on P-256.
pub(crate) fn is_p256(spki: &SubjectPublicKeyInfo<'_>) -> bool {
    spki.algorithm.algorithm.to_id_string() == OID_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid.to_id_string() == OID_P256)
}

/// Registry short name of an OID, or its dotted form.
pub(crate) fn oid_name(oid: &Oid<'_>) -> String {
    match oid2abbrev(oid, oid_registry()) {
        Ok(name) => name.to_owned(),
        Err(_) => oid.to_id_string(),
    }
}

/// `CN=x, O=y` (RFC 4514-like, most significant first as encoded).
pub(crate) fn name(name: &X509Name<'_>) -> String {
    name.iter_attributes()
        .map(|attr| {
            let value = attr
                .as_str()
                .map(sanitize)
                .unwrap_or_else(|_| format!("#{}", hex::encode(attr.as_slice())));
            format!("{}={value}", oid_name(attr.attr_type()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first common name, if it is a readable string.
pub(crate) fn common_name(name: &X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// `DNS:example.com`, `IP:10.0.0.1`, `URI:urn:uuid:...`, as openssl prints them.
pub(crate) fn general_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(s) => format!("DNS:{}", sanitize(s)),
        GeneralName::URI(s) => format!("URI:{}", sanitize(s)),
        GeneralName::RFC822Name(s) => format!("email:{}", sanitize(s)),
        GeneralName::IPAddress(octets) => match ip_from_octets(octets) {
            Some(ip) => format!("IP:{ip}"),
            None => format!("IP:#{}", hex::encode(octets)),
        },
        GeneralName::DirectoryName(dn) => format!("dirName:{}", self::name(dn)),
        GeneralName::OtherName(oid, _) => format!("otherName:{}", oid_name(oid)),
        GeneralName::RegisteredID(oid) => format!("registeredID:{}", oid_name(oid)),
        GeneralName::X400Address(_) => "x400Address".to_owned(),
        GeneralName::EDIPartyName(_) => "ediPartyName".to_owned(),
        GeneralName::Invalid(tag, _) => format!("invalid name (tag {})", tag.0),
    }
}

pub(crate) fn ip_from_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        Some(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        Some(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        None
    }
}

/// Names of the purposes in an EKU extension, in openssl's short spelling.
pub(crate) fn eku_names(eku: &ExtendedKeyUsage<'_>) -> Vec<String> {
    let mut names = Vec::new();
    for (present, name) in [
        (eku.any, "anyExtendedKeyUsage"),
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ] {
        if present {
            names.push(name.to_owned());
        }
    }
    names.extend(eku.other.iter().map(oid_name));
    names
}

/// Names of the bits set in a keyUsage extension.
pub(crate) fn key_usage_names(ku: &KeyUsage) -> Vec<&'static str> {
    [
        (ku.digital_signature(), "digitalSignature"),
        (ku.non_repudiation(), "nonRepudiation"),
        (ku.key_encipherment(), "keyEncipherment"),
        (ku.data_encipherment(), "dataEncipherment"),
        (ku.key_agreement(), "keyAgreement"),
        (ku.key_cert_sign(), "keyCertSign"),
        (ku.crl_sign(), "cRLSign"),
        (ku.encipher_only(), "encipherOnly"),
        (ku.decipher_only(), "decipherOnly"),
    ]
    .into_iter()
    .filter_map(|(present, name)| present.then_some(name))
    .collect()
}

/// RFC 3339 text for error messages.
pub(crate) fn time(t: &time::OffsetDateTime) -> String {
    floto_proto::rfc3339(*t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_control_characters_and_bounds_length() {
        assert_eq!(sanitize("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(1000);
        assert_eq!(sanitize(&long).chars().count(), MAX_TEXT + 1);
    }
}
