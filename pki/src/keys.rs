//! Private keys: loading the forms floto accepts, and the client-side helpers devices and
//! operators use to make their key and CSR.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::cert::{cert_der_from_pem, parse_x509};
use crate::describe;
use crate::pem::{self, Outside};
use crate::PkiError;

/// AlgorithmIdentifier contents for id-ecPublicKey with namedCurve prime256v1.
const ALG_EC_P256: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, // prime256v1
];
/// AlgorithmIdentifier contents for id-ecPublicKey with namedCurve secp384r1.
const ALG_EC_P384: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, // secp384r1
];
/// AlgorithmIdentifier contents for rsaEncryption with NULL parameters.
const ALG_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, // rsaEncryption
    0x05, 0x00, // NULL
];

/// DER tag-length-value.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let skip = len.iter().position(|&b| b != 0).unwrap_or(len.len() - 1);
            let len = &len[skip..];
            // At most size_of::<usize>() (8) length bytes, which fits the 7-bit count.
            out.push(0x80 | u8::try_from(len.len()).unwrap_or(0x7f));
            out.extend_from_slice(len);
        }
    }
    out.extend_from_slice(content);
    out
}

/// Wraps a SEC1 `ECPrivateKey` or PKCS#1 `RSAPrivateKey` into a PKCS#8 `PrivateKeyInfo`.
fn wrap_pkcs8(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend(der_tlv(0x30, algorithm));
    body.extend(der_tlv(0x04, private_key));
    der_tlv(0x30, &body)
}

const SIGNABLE: &str = "ECDSA P-256 or P-384, Ed25519, or RSA 2048 to 8192 bits";

/// Loads a private key from PEM.
///
/// Accepted: PKCS#8 `PRIVATE KEY` (ECDSA P-256/P-384, Ed25519, RSA), SEC1 `EC PRIVATE KEY`
/// (P-256/P-384, as written by `openssl ecparam -genkey`; an `EC PARAMETERS` block next to
/// it is skipped) and PKCS#1 `RSA PRIVATE KEY`. Text outside the blocks is ignored.
/// Refused with a hint: encrypted keys, and anything `ring` cannot sign with.
pub(crate) fn load_private_key(key_pem: &str) -> Result<KeyPair, PkiError> {
    let blocks = pem::parse_blocks(key_pem, Outside::AnyText).map_err(|e| PkiError::Pem {
        what: "private key PEM",
        reason: e.to_string(),
    })?;
    let mut keys = blocks.into_iter().filter(|b| b.label != "EC PARAMETERS");
    let block = match (keys.next(), keys.next()) {
        (Some(block), None) => block,
        (None, _) => {
            return Err(PkiError::Pem {
                what: "private key PEM",
                reason: "no private key block found".to_owned(),
            })
        }
        (Some(_), Some(_)) => {
            return Err(PkiError::Pem {
                what: "private key PEM",
                reason: "more than one PEM block; give exactly one private key".to_owned(),
            })
        }
    };
    let unsupported = |form: &str, e: rcgen::Error| {
        PkiError::BadKey(format!(
            "the {form} key is corrupt or of a type floto cannot sign with (supported: {SIGNABLE}): {e}"
        ))
    };
    match block.label.as_str() {
        "PRIVATE KEY" => {
            KeyPair::try_from(block.der.as_slice()).map_err(|e| unsupported("PKCS#8", e))
        }
        "EC PRIVATE KEY" => KeyPair::try_from(wrap_pkcs8(ALG_EC_P256, &block.der))
            .or_else(|_| KeyPair::try_from(wrap_pkcs8(ALG_EC_P384, &block.der)))
            .map_err(|e| unsupported("SEC1 EC", e)),
        "RSA PRIVATE KEY" => KeyPair::try_from(wrap_pkcs8(ALG_RSA, &block.der))
            .map_err(|e| unsupported("PKCS#1 RSA", e)),
        "ENCRYPTED PRIVATE KEY" => Err(PkiError::BadKey(
            "the key is encrypted; decrypt it first, e.g. `openssl pkey -in key.pem -out plain.pem`, and keep the result private (mode 0600)".to_owned(),
        )),
        other => Err(PkiError::BadKey(format!(
            "found a \"{}\" PEM block where a private key was expected",
            describe::sanitize(other)
        ))),
    }
}

/// Whether `key` is the private half of `spki`. Compares the key type and the key bits.
pub(crate) fn key_matches_spki(key: &KeyPair, spki: &SubjectPublicKeyInfo<'_>) -> bool {
    let key_spki_der = key.subject_public_key_info();
    let Ok((_, key_spki)) = SubjectPublicKeyInfo::from_der(&key_spki_der) else {
        return false;
    };
    describe::key_type(&key_spki) == describe::key_type(spki)
        && key.der_bytes() == &*spki.subject_public_key.data
}

/// A new ECDSA P-256 private key, as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
/// Store it with mode 0600.
pub fn generate_key() -> Result<String, PkiError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::Signing {
            action: "generate an ECDSA P-256 key",
            detail: e.to_string(),
        })?;
    Ok(key.serialize_pem())
}

/// A CSR (`-----BEGIN CERTIFICATE REQUEST-----`) for an ECDSA P-256 key, with subject
/// `CN=<common_name>` and nothing else. The CA decides every other field; the CN is only a
/// hint (devices usually put their UUID there).
///
/// `key_pem` is any form [`Ca::from_pem`](crate::Ca::from_pem) accepts, but the key must be
/// ECDSA P-256. `common_name` must be 1 to 64 characters without control characters.
pub fn make_csr(key_pem: &str, common_name: &str) -> Result<String, PkiError> {
    let key = load_private_key(key_pem)?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        let spki_der = key.subject_public_key_info();
        let found = SubjectPublicKeyInfo::from_der(&spki_der)
            .map(|(_, spki)| describe::key_type(&spki))
            .unwrap_or_else(|_| "not ECDSA P-256".to_owned());
        return Err(PkiError::UnsupportedKey(format!(
            "the key is {found}; floto devices and operators must use ECDSA P-256 keys (make one with generate_key or `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)"
        )));
    }
    validate_common_name(common_name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| PkiError::Signing {
            action: "make the CSR",
            detail: e.to_string(),
        })?;
    Ok(csr)
}

/// Common names we put in certificates and CSRs: 1 to 64 characters, no control characters.
pub(crate) fn validate_common_name(cn: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::BadName {
        kind: "common name",
        name: describe::sanitize(cn),
        reason: reason.to_owned(),
    };
    if cn.trim().is_empty() {
        return Err(bad("it must not be empty"));
    }
    if cn.chars().count() > 64 {
        return Err(bad("it must be at most 64 characters (X.520 upper bound)"));
    }
    if cn.chars().any(char::is_control) {
        return Err(bad("it must not contain control characters"));
    }
    Ok(())
}

/// Whether the private key in `key_pem` belongs to the certificate in `cert_pem` (same key
/// type and public key). Errors only when either input cannot be read.
pub fn key_matches_cert(key_pem: &str, cert_pem: &str) -> Result<bool, PkiError> {
    let key = load_private_key(key_pem)?;
    let der = cert_der_from_pem(cert_pem, "certificate PEM")?;
    let cert = parse_x509(&der).map_err(PkiError::BadCertificate)?;
    Ok(key_matches_spki(&key, cert.public_key()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::parse_csr;
    use crate::test_util::openssl;

    #[test]
    fn der_lengths() {
        assert_eq!(der_tlv(0x04, &[1, 2]), [0x04, 0x02, 1, 2]);
        let long = der_tlv(0x04, &[0; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        let longer = der_tlv(0x04, &[0; 300]);
        assert_eq!(&longer[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn generate_make_csr_and_match_round_trip() {
        let key_pem = generate_key().unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let csr_pem = make_csr(&key_pem, "3f2a0000-0000-4000-8000-000000000001").unwrap();
        let csr = parse_csr(&csr_pem).unwrap();
        assert_eq!(csr.subject(), "CN=3f2a0000-0000-4000-8000-000000000001");
        let key = load_private_key(&key_pem).unwrap();
        assert_eq!(csr.public_key_der(), key.subject_public_key_info());

        let cert = CertificateParams::default()
            .self_signed(&key)
            .unwrap()
            .pem();
        assert!(key_matches_cert(&key_pem, &cert).unwrap());
        let other = generate_key().unwrap();
        assert!(!key_matches_cert(&other, &cert).unwrap());
        assert!(key_matches_cert("junk", &cert).is_err());
        assert!(key_matches_cert(&key_pem, "junk").is_err());
    }

    #[test]
    fn make_csr_refuses_non_p256_keys_and_bad_names() {
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .serialize_pem();
        let err = make_csr(&p384, "x").unwrap_err();
        assert!(err.to_string().contains("ECDSA P-384"), "{err}");
        let key = generate_key().unwrap();
        for bad in ["", "  ", "a\nb", &"x".repeat(65)] {
            assert!(
                matches!(make_csr(&key, bad), Err(PkiError::BadName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn loads_openssl_key_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // SEC1 with an EC PARAMETERS block in front (openssl ecparam -genkey).
        openssl(d, "ecparam -name prime256v1 -genkey -out sec1.pem");
        // PKCS#8 P-384, and its SEC1 form.
        openssl(
            d,
            "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out p384.pem",
        );
        openssl(d, "ec -in p384.pem -out p384-sec1.pem");
        // PKCS#1 RSA.
        openssl(
            d,
            "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa8.pem",
        );
        openssl(d, "rsa -in rsa8.pem -traditional -out rsa1.pem");
        openssl(d, "genpkey -algorithm ED25519 -out ed.pem");
        openssl(d, "pkcs8 -topk8 -in p384.pem -passout pass:x -out enc.pem");

        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert!(read("sec1.pem").contains("EC PARAMETERS"));
        assert!(read("p384-sec1.pem").contains("EC PRIVATE KEY"));
        assert!(read("rsa1.pem").contains("RSA PRIVATE KEY"));
        let expected = [
            ("sec1.pem", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384.pem", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("p384-sec1.pem", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("rsa8.pem", &rcgen::PKCS_RSA_SHA256),
            ("rsa1.pem", &rcgen::PKCS_RSA_SHA256),
            ("ed.pem", &rcgen::PKCS_ED25519),
        ];
        for (file, alg) in expected {
            let key = load_private_key(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(key.algorithm(), alg, "{file}");
            // The public key openssl derives is the one we derive.
            let pub_pem = openssl(d, &format!("pkey -in {file} -pubout"));
            let pub_der = &pem::parse_blocks(&pub_pem, Outside::AnyText).unwrap()[0].der;
            let (_, spki) = SubjectPublicKeyInfo::from_der(pub_der).unwrap();
            assert!(key_matches_spki(&key, &spki), "{file}");
        }
        // A SEC1 P-256 key works for make_csr, a P-384 one does not.
        assert!(make_csr(&read("sec1.pem"), "x").is_ok());
        let err = load_private_key(&read("enc.pem")).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
        let err = load_private_key(&format!("{}{}", read("ed.pem"), read("p384.pem"))).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }
}
