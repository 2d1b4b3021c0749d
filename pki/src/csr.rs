//! Parsing and checking certificate signing requests (PKCS#10) sent by devices and operators.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::error::X509Error;
use x509_parser::extensions::{ParsedExtension, X509Extension};
use x509_parser::prelude::FromDer;

use crate::describe;
use crate::pem::{self, Outside, PemError};

/// Largest CSR input [`parse_csr`] looks at, in bytes. A P-256 CSR is about 500 bytes.
pub const MAX_CSR_PEM: usize = 16 * 1024;

/// At most this many entries in an `ignored_requests` list (the rest is summarised).
const MAX_REPORTED_REQUESTS: usize = 32;

const CSR_LABEL: &str = "CERTIFICATE REQUEST";

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Nothing but whitespace was sent.
    #[error("the CSR is empty; send one PEM \"-----BEGIN CERTIFICATE REQUEST-----\" block")]
    Empty,
    /// More input than [`MAX_CSR_PEM`].
    #[error("the CSR is {len} bytes, over the {max}-byte limit; a floto CSR (ECDSA P-256, no extensions) is under 1 KiB")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not PEM, or PEM that is broken (truncated, bad base64, text around it).
    #[error("the CSR is not a PEM \"CERTIFICATE REQUEST\" block: {0}")]
    NotPem(String),
    /// A PEM block with another label, e.g. a certificate or a private key.
    #[error("expected a PEM \"CERTIFICATE REQUEST\" block, found a \"{0}\" block")]
    WrongLabel(String),
    /// More than one PEM block.
    #[error("the input holds {0} PEM blocks; send exactly one \"CERTIFICATE REQUEST\"")]
    MultipleBlocks(usize),
    /// The block does not decode as a PKCS#10 request.
    #[error("the CSR is not a valid PKCS#10 certificate request: {0}")]
    Malformed(String),
    /// The requested key is not ECDSA P-256.
    #[error("CSR key is {0}; floto devices must use ECDSA P-256 keys")]
    UnsupportedKey(String),
    /// The CSR is signed with an algorithm floto cannot check.
    #[error("the CSR is signed with {0}; sign it with ecdsa-with-SHA256")]
    UnsupportedSignatureAlgorithm(String),
    /// The self-signature does not verify with the key in the CSR.
    #[error("the CSR signature does not verify with the public key it carries: the request was altered, or signed with a different key")]
    BadSignature,
}

/// A CSR whose self-signature verified and whose key is ECDSA P-256.
///
/// Only [`VerifiedCsr::public_key_der`] is ever used to issue a certificate. What else the
/// CSR asked for is kept so that the issuing functions can report what they ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
    subject: String,
    common_name: Option<String>,
    requests: Vec<Request>,
}

/// One thing a CSR asked for (all text already sanitised for logging).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// A subject attribute: short name and value.
    Subject { attr: String, value: String },
    /// A subject alternative name, formatted like `DNS:example.com`.
    San(String),
    /// An extended key usage, by name.
    Eku(String),
    /// basicConstraints CA:TRUE with an optional path length.
    Ca(Option<u32>),
    /// A keyUsage bit.
    KeyUsage(&'static str),
    /// Any other extension, by name.
    Extension { name: String, critical: bool },
    /// A CSR attribute other than the extension request (e.g. challengePassword).
    Attribute(String),
}

impl VerifiedCsr {
    /// The requested public key as SubjectPublicKeyInfo DER (ECDSA P-256, uncompressed point).
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The requested subject, e.g. `CN=3f2a..., O=Acme` (sanitised, for logs).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The requested common name, if any (sanitised, for logs).
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The requested subject alternative names, formatted like `URI:urn:uuid:...`.
    pub fn requested_sans(&self) -> Vec<&str> {
        self.requests
            .iter()
            .filter_map(|r| match r {
                Request::San(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    /// What the CSR asked for beyond `CN=<granted_cn>`, SAN `<granted_san>` (formatted like
    /// `URI:urn:uuid:...`), EKU clientAuth and keyUsage digitalSignature: the list for
    /// [`crate::IssuedCert::ignored_requests`].
    pub(crate) fn ignored_requests(&self, granted_cn: &str, granted_san: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .requests
            .iter()
            .filter_map(|r| match r {
                Request::Subject { attr, value } => (!(attr == "CN" && value == granted_cn))
                    .then(|| format!("requested {attr}={value}")),
                Request::San(san) => (san != granted_san).then(|| format!("requested SAN {san}")),
                Request::Eku(eku) => (eku != "clientAuth").then(|| format!("requested EKU {eku}")),
                Request::Ca(None) => Some("requested CA:TRUE".to_owned()),
                Request::Ca(Some(len)) => Some(format!("requested CA:TRUE, pathlen:{len}")),
                Request::KeyUsage(ku) => {
                    (*ku != "digitalSignature").then(|| format!("requested keyUsage {ku}"))
                }
                Request::Extension { name, critical } => Some(format!(
                    "requested extension {name}{}",
                    if *critical { " (critical)" } else { "" }
                )),
                Request::Attribute(name) => Some(format!("requested attribute {name}")),
            })
            .collect();
        if out.len() > MAX_REPORTED_REQUESTS {
            let more = out.len() - MAX_REPORTED_REQUESTS;
            out.truncate(MAX_REPORTED_REQUESTS);
            out.push(format!("... and {more} more requests"));
        }
        out
    }
}

/// Parses and checks a PEM CSR.
///
/// Accepts exactly one `CERTIFICATE REQUEST` PEM block, optionally surrounded by whitespace,
/// of at most [`MAX_CSR_PEM`] bytes in all, whose DER is a PKCS#10 request (nothing after
/// it), whose key is ECDSA P-256 (id-ecPublicKey, namedCurve prime256v1, uncompressed
/// point) and whose self-signature verifies with that key.
pub fn parse_csr(pem: &str) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM {
        return Err(CsrError::TooLarge {
            len: pem.len(),
            max: MAX_CSR_PEM,
        });
    }
    let mut blocks = pem::parse_blocks(pem, Outside::WhitespaceOnly).map_err(|e| match e {
        PemError::Empty => CsrError::Empty,
        other => CsrError::NotPem(other.to_string()),
    })?;
    if blocks.len() > 1 {
        return Err(CsrError::MultipleBlocks(blocks.len()));
    }
    let block = blocks.remove(0);
    if block.label != CSR_LABEL {
        return Err(CsrError::WrongLabel(describe::sanitize(&block.label)));
    }
    parse_csr_der(&block.der)
}

/// [`parse_csr`] for DER input.
pub fn parse_csr_der(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_PEM {
        return Err(CsrError::TooLarge {
            len: der.len(),
            max: MAX_CSR_PEM,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} unexpected bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrError::Malformed(format!(
            "version {} (only version 1, encoded 0, exists)",
            info.version.0
        )));
    }
    let spki = &info.subject_pki;
    if !describe::is_p256(spki) {
        return Err(CsrError::UnsupportedKey(describe::key_type(spki)));
    }
    let point = &spki.subject_public_key.data;
    if point.len() != 65 || point[0] != 0x04 {
        return Err(CsrError::Malformed(
            "the P-256 public key is not an uncompressed point (65 bytes starting with 04)".into(),
        ));
    }
    match csr.verify_signature() {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            return Err(CsrError::UnsupportedSignatureAlgorithm(describe::oid_name(
                &csr.signature_algorithm.algorithm,
            )))
        }
        Err(_) => return Err(CsrError::BadSignature),
    }

    let mut requests = Vec::new();
    for attr in info.subject.iter_attributes() {
        let value = attr
            .as_str()
            .map(describe::sanitize)
            .unwrap_or_else(|_| format!("#{}", hex::encode(attr.as_slice())));
        requests.push(Request::Subject {
            attr: describe::oid_name(attr.attr_type()),
            value,
        });
    }
    for attr in info.iter_attributes() {
        match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(ext_req) => {
                for ext in &ext_req.extensions {
                    collect_extension(ext, &mut requests);
                }
            }
            // Never copy a challenge password into a log.
            ParsedCriAttribute::ChallengePassword(_) => {
                requests.push(Request::Attribute("challengePassword".to_owned()))
            }
            ParsedCriAttribute::UnsupportedAttribute => {
                requests.push(Request::Attribute(describe::oid_name(&attr.oid)))
            }
        }
    }

    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
        subject: describe::name(&info.subject),
        common_name: describe::common_name(&info.subject).map(|cn| describe::sanitize(&cn)),
        requests,
    })
}

fn collect_extension(ext: &X509Extension<'_>, out: &mut Vec<Request>) {
    match ext.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => out.extend(
            san.general_names
                .iter()
                .map(|n| Request::San(describe::general_name(n))),
        ),
        ParsedExtension::ExtendedKeyUsage(eku) => {
            out.extend(describe::eku_names(eku).into_iter().map(Request::Eku))
        }
        ParsedExtension::BasicConstraints(bc) => {
            if bc.ca {
                out.push(Request::Ca(bc.path_len_constraint));
            }
        }
        ParsedExtension::KeyUsage(ku) => out.extend(
            describe::key_usage_names(ku)
                .into_iter()
                .map(Request::KeyUsage),
        ),
        ParsedExtension::ParseError { .. } => out.push(Request::Extension {
            name: format!("{} (malformed)", describe::oid_name(&ext.oid)),
            critical: ext.critical,
        }),
        _ => out.push(Request::Extension {
            name: describe::oid_name(&ext.oid),
            critical: ext.critical,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use base64::Engine as _;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, SanType,
    };

    use super::*;

    /// An RSA-2048 CSR made offline with
    /// `openssl req -new -newkey rsa:2048 -nodes -keyout /dev/null -subj /CN=rsa-device`
    /// (a CSR is public; its private key was thrown away).
    pub(crate) const RSA_2048_CSR: &str = include_str!("testdata/rsa2048.csr.pem");

    pub(crate) fn csr_pem(params: &CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn plain_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
    }

    fn der_of(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn accepts_a_plain_p256_csr() {
        let key = KeyPair::generate().unwrap();
        let csr = parse_csr(&csr_pem(&plain_params("device-1"), &key)).unwrap();
        assert_eq!(
            csr.public_key_der(),
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        assert_eq!(csr.subject(), "CN=device-1");
        assert_eq!(csr.common_name(), Some("device-1"));
        assert!(csr.requested_sans().is_empty());
        assert!(csr.ignored_requests("device-1", "URI:x").is_empty());
        assert_eq!(
            csr.ignored_requests("other", "URI:x"),
            ["requested CN=device-1"]
        );
    }

    #[test]
    fn der_entry_point_matches_pem() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(&plain_params("x"), &key);
        assert_eq!(
            parse_csr_der(&der_of(&pem)).unwrap(),
            parse_csr(&pem).unwrap()
        );
    }

    #[test]
    fn whitespace_around_the_block_is_fine() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(&plain_params("x"), &key);
        assert!(parse_csr(&format!("\n\t  {}\r\n\n", pem.replace('\n', "\r\n"))).is_ok());
    }

    #[test]
    fn records_everything_requested() {
        let key = KeyPair::generate().unwrap();
        let mut params = plain_params("evil");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Evil Corp");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(3));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::CodeSigning,
        ];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        params.subject_alt_names = vec![
            SanType::DnsName("example.com".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
            SanType::URI("urn:uuid:granted".try_into().unwrap()),
        ];
        let mut custom =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
        custom.set_criticality(true);
        params.custom_extensions = vec![custom];
        let csr = parse_csr(&csr_pem(&params, &key)).unwrap();
        assert_eq!(
            csr.requested_sans(),
            ["DNS:example.com", "IP:10.0.0.1", "URI:urn:uuid:granted"]
        );
        let ignored = csr.ignored_requests("granted-cn", "URI:urn:uuid:granted");
        for expected in [
            "requested CN=evil",
            "requested O=Evil Corp",
            "requested CA:TRUE, pathlen:3",
            "requested EKU serverAuth",
            "requested EKU codeSigning",
            "requested keyUsage keyCertSign",
            "requested SAN DNS:example.com",
            "requested SAN IP:10.0.0.1",
            "requested extension 1.3.6.1.4.1.99999.1 (critical)",
        ] {
            assert!(
                ignored.iter().any(|i| i == expected),
                "{expected} missing from {ignored:?}"
            );
        }
        for granted in ["clientAuth", "digitalSignature", "urn:uuid:granted"] {
            assert!(
                !ignored.iter().any(|i| i.contains(granted)),
                "{granted} listed: {ignored:?}"
            );
        }
    }

    #[test]
    fn hostile_text_is_sanitised_and_the_list_bounded() {
        let key = KeyPair::generate().unwrap();
        let mut params = plain_params("line1\nFAKE LOG LINE");
        params.subject_alt_names = (0..100)
            .map(|i| SanType::DnsName(format!("host{i}.example").try_into().unwrap()))
            .collect();
        let csr = parse_csr(&csr_pem(&params, &key)).unwrap();
        let ignored = csr.ignored_requests("granted", "URI:none");
        assert_eq!(ignored.len(), MAX_REPORTED_REQUESTS + 1);
        assert!(ignored[0].contains("line1\\nFAKE"), "{}", ignored[0]);
        assert!(ignored.iter().all(|i| !i.contains('\n')));
        assert!(ignored.last().unwrap().contains("more requests"));
    }

    #[test]
    fn refuses_tampered_signature_and_key() {
        let key = KeyPair::generate().unwrap();
        let der = der_of(&csr_pem(&plain_params("x"), &key));

        // The signature is the last field: flip its last byte (inside s of the ECDSA sig).
        let mut bad_sig = der.clone();
        let last = bad_sig.len() - 1;
        bad_sig[last] ^= 0x01;
        assert_eq!(parse_csr_der(&bad_sig), Err(CsrError::BadSignature));

        // Flip the last byte of the public key point (the y coordinate).
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let at = der
            .windows(spki.len())
            .position(|w| w == spki.as_slice())
            .unwrap();
        let mut bad_key = der.clone();
        bad_key[at + spki.len() - 1] ^= 0x01;
        assert_eq!(parse_csr_der(&bad_key), Err(CsrError::BadSignature));

        // A valid CSR whose key was swapped for another valid P-256 key.
        let other = rcgen::PublicKeyData::subject_public_key_info(&KeyPair::generate().unwrap());
        let mut swapped = der.clone();
        swapped[at..at + spki.len()].copy_from_slice(&other);
        assert_eq!(parse_csr_der(&swapped), Err(CsrError::BadSignature));
    }

    #[test]
    fn refuses_other_key_types_by_name() {
        for (alg, name) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ECDSA P-384"),
            (&rcgen::PKCS_ED25519, "Ed25519"),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let err = parse_csr(&csr_pem(&plain_params("x"), &key)).unwrap_err();
            assert_eq!(err, CsrError::UnsupportedKey(name.to_owned()));
            assert!(err.to_string().contains("must use ECDSA P-256"), "{err}");
        }
        let err = parse_csr(RSA_2048_CSR).unwrap_err();
        assert_eq!(err, CsrError::UnsupportedKey("RSA-2048".to_owned()));
        assert_eq!(
            err.to_string(),
            "CSR key is RSA-2048; floto devices must use ECDSA P-256 keys"
        );
    }

    #[test]
    fn refuses_bad_pem() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(&plain_params("x"), &key);

        assert_eq!(parse_csr(""), Err(CsrError::Empty));
        assert_eq!(parse_csr(" \n\t"), Err(CsrError::Empty));
        assert!(matches!(parse_csr("garbage"), Err(CsrError::NotPem(_))));
        assert!(matches!(
            parse_csr(&format!("hello\n{pem}")),
            Err(CsrError::NotPem(_))
        ));
        assert!(matches!(
            parse_csr(&format!("{pem}trailing words")),
            Err(CsrError::NotPem(_))
        ));
        assert_eq!(
            parse_csr(&format!("{pem}{pem}")),
            Err(CsrError::MultipleBlocks(2))
        );

        let cert = CertificateParams::default()
            .self_signed(&key)
            .unwrap()
            .pem();
        assert_eq!(
            parse_csr(&cert),
            Err(CsrError::WrongLabel("CERTIFICATE".into()))
        );
        assert_eq!(
            parse_csr(&key.serialize_pem()),
            Err(CsrError::WrongLabel("PRIVATE KEY".into()))
        );

        // Truncated: cut in the middle of the body (no END line).
        let truncated = &pem[..pem.len() / 2];
        assert!(
            matches!(parse_csr(truncated), Err(CsrError::NotPem(ref m)) if m.contains("truncated")),
            "{:?}",
            parse_csr(truncated)
        );
        // Truncated body but the END line kept: decodes, then fails as DER.
        let lines: Vec<&str> = pem.lines().collect();
        let short = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1]);
        assert!(
            matches!(
                parse_csr(&short),
                Err(CsrError::Malformed(_)) | Err(CsrError::NotPem(_))
            ),
            "{:?}",
            parse_csr(&short)
        );
        // Valid base64 of garbage.
        let junk = pem::encode(CSR_LABEL, b"not a csr at all");
        assert!(matches!(parse_csr(&junk), Err(CsrError::Malformed(_))));
        // Trailing bytes after the DER.
        let mut der = der_of(&pem);
        der.push(0);
        assert!(matches!(
            parse_csr(&pem::encode(CSR_LABEL, &der)),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversized_input_before_parsing() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_pem(&plain_params("x"), &key);
        let padded = format!("{pem}{}", " ".repeat(MAX_CSR_PEM + 1 - pem.len()));
        assert_eq!(padded.len(), MAX_CSR_PEM + 1);
        assert_eq!(
            parse_csr(&padded),
            Err(CsrError::TooLarge {
                len: MAX_CSR_PEM + 1,
                max: MAX_CSR_PEM
            })
        );
        // Exactly at the limit is accepted.
        assert!(parse_csr(&padded[..MAX_CSR_PEM]).is_ok());
    }

    #[test]
    fn challenge_password_is_never_echoed() {
        let key = KeyPair::generate().unwrap();
        // challengePassword attribute: SET { UTF8String "hunter2" }
        let values = vec![
            0x31, 0x09, 0x0c, 0x07, b'h', b'u', b'n', b't', b'e', b'r', b'2',
        ];
        let attr = rcgen::Attribute {
            oid: &[1, 2, 840, 113549, 1, 9, 7],
            values,
        };
        let pem = plain_params("x")
            .serialize_request_with_attributes(&key, vec![attr])
            .unwrap()
            .pem()
            .unwrap();
        let csr = parse_csr(&pem).unwrap();
        let ignored = csr.ignored_requests("x", "URI:y");
        assert_eq!(ignored, ["requested attribute challengePassword"]);
        assert!(!format!("{csr:?}").contains("hunter2"));
    }
}
