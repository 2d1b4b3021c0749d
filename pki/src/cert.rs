//! Reading facts out of certificates.

use std::net::IpAddr;

use floto_proto::DeviceId;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::describe;
use crate::pem::{self, Outside};
use crate::{PkiError, Serial};

/// URI SAN prefix of device certificates.
pub(crate) const DEVICE_URI_PREFIX: &str = "urn:uuid:";
/// URI SAN prefix of operator certificates.
pub(crate) const OPERATOR_URI_PREFIX: &str = "urn:floto:operator:";
/// URI SAN prefix of node certificates (the nodes of a cluster, to each other).
pub(crate) const NODE_URI_PREFIX: &str = "urn:floto:node:";
/// Facts read from a certificate, used by the server for renewal and revocation and by
/// clients to inspect their own certificate. Nothing here says the certificate is trusted:
/// [`crate::Ca::verify_client_cert`] does that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, in the same canonical form as the one it was issued with.
    pub serial: Serial,
    /// First common name of the subject, if it is a readable string.
    pub common_name: Option<String>,
    /// `uniformResourceIdentifier` subject alternative names, in order.
    pub uri_sans: Vec<String>,
    /// `dNSName` subject alternative names, in order.
    pub dns_sans: Vec<String>,
    /// `iPAddress` subject alternative names, in order.
    pub ip_sans: Vec<IpAddr>,
    /// Start of validity (inclusive).
    pub not_before: OffsetDateTime,
    /// End of validity (inclusive).
    pub not_after: OffsetDateTime,
    /// SubjectPublicKeyInfo DER of the certified key, byte for byte as in the certificate.
    pub public_key_der: Vec<u8>,
    /// basicConstraints CA:TRUE.
    pub is_ca: bool,
}

impl CertInfo {
    /// The device UUID of a device certificate: its only URI SAN is `urn:uuid:<uuid>`, the
    /// UUID is a valid [`DeviceId`] in canonical (lowercase, hyphenated) form, the CN is the
    /// same string, and the certificate is not a CA. `None` for anything else.
    pub fn device_id(&self) -> Option<DeviceId> {
        if self.is_ca {
            return None;
        }
        let [uri] = self.uri_sans.as_slice() else {
            return None;
        };
        let uuid = uri.strip_prefix(DEVICE_URI_PREFIX)?;
        let id: DeviceId = uuid.parse().ok()?;
        let canonical = id.to_string();
        (canonical == uuid && self.common_name.as_deref() == Some(uuid)).then_some(id)
    }

    /// The operator name of an operator certificate: its only URI SAN is
    /// `urn:floto:operator:<name>`, the name is valid (see [`crate::Ca::sign_operator`]), the
    /// CN is the same name, and the certificate is not a CA. `None` for anything else.
    pub fn operator_name(&self) -> Option<&str> {
        if self.is_ca {
            return None;
        }
        let [uri] = self.uri_sans.as_slice() else {
            return None;
        };
        let name = uri.strip_prefix(OPERATOR_URI_PREFIX)?;
        (validate_operator_name(name).is_ok() && self.common_name.as_deref() == Some(name))
            .then_some(name)
    }

    /// The node name of a node certificate: its only URI SAN is `urn:floto:node:<name>`
    /// and it is not a CA. Such a certificate names no device and no operator, so it is
    /// refused wherever those are asked for. `None` for anything else.
    pub fn node_name(&self) -> Option<&str> {
        if self.is_ca {
            return None;
        }
        let [uri] = self.uri_sans.as_slice() else {
            return None;
        };
        let name = uri.strip_prefix(NODE_URI_PREFIX)?;
        (!name.is_empty()).then_some(name)
    }

    pub(crate) fn from_x509(cert: &X509Certificate<'_>) -> Result<Self, PkiError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            PkiError::BadCertificate(format!("{what}: {e}"))
        };
        let serial = Serial::from_der_integer(cert.raw_serial())?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|e| bad("basicConstraints", &e))?
            .is_some_and(|bc| bc.value.ca);
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        let mut ip_sans = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| bad("subjectAltName", &e))?
        {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                    GeneralName::IPAddress(octets) => {
                        let ip = describe::ip_from_octets(octets).ok_or_else(|| {
                            bad(
                                "subjectAltName",
                                &"an IP address that is neither 4 nor 16 bytes",
                            )
                        })?;
                        ip_sans.push(ip);
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            serial,
            common_name: describe::common_name(cert.subject()),
            uri_sans,
            dns_sans,
            ip_sans,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            public_key_der: cert.public_key().raw.to_vec(),
            is_ca,
        })
    }
}

/// Operator names: [`floto_proto::admin::operator_name_problem`] is the one rule.
pub(crate) fn validate_operator_name(name: &str) -> Result<(), PkiError> {
    match floto_proto::admin::operator_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(PkiError::BadName {
            kind: "operator name",
            name: describe::sanitize(name),
            reason,
        }),
    }
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        ));
    }
    Ok(cert)
}

/// Decodes a PEM input holding exactly one `CERTIFICATE` block (text around it is allowed).
pub(crate) fn cert_der_from_pem(pem: &str, what: &'static str) -> Result<Vec<u8>, PkiError> {
    let blocks = pem::parse_blocks(pem, Outside::AnyText).map_err(|e| PkiError::Pem {
        what,
        reason: e.to_string(),
    })?;
    let mut certs = blocks.into_iter().filter(|b| b.label == "CERTIFICATE");
    match (certs.next(), certs.next()) {
        (Some(block), None) => Ok(block.der),
        (None, _) => Err(PkiError::Pem {
            what,
            reason: "no \"CERTIFICATE\" block found".to_owned(),
        }),
        (Some(_), Some(_)) => Err(PkiError::Pem {
            what,
            reason: "more than one \"CERTIFICATE\" block; give exactly one certificate".to_owned(),
        }),
    }
}

/// Reads the facts of a PEM certificate (exactly one `CERTIFICATE` block). Checks nothing
/// about trust or validity time.
pub fn parse_cert_pem(pem: &str) -> Result<CertInfo, PkiError> {
    parse_cert_der(&cert_der_from_pem(pem, "certificate PEM")?)
}

/// Reads the facts of a DER certificate. Checks nothing about trust or validity time.
pub fn parse_cert_der(der: &[u8]) -> Result<CertInfo, PkiError> {
    let cert = parse_x509(der).map_err(PkiError::BadCertificate)?;
    CertInfo::from_x509(&cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cn: Option<&str>, uris: &[&str]) -> CertInfo {
        CertInfo {
            serial: Serial::random(),
            common_name: cn.map(str::to_owned),
            uri_sans: uris.iter().map(|s| (*s).to_owned()).collect(),
            dns_sans: vec![],
            ip_sans: vec![],
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH,
            public_key_der: vec![],
            is_ca: false,
        }
    }

    #[test]
    fn device_id_needs_matching_cn_and_one_canonical_uri() {
        let id = DeviceId::new_random();
        let uri = format!("urn:uuid:{id}");
        let s = id.to_string();
        assert_eq!(info(Some(&s), &[&uri]).device_id(), Some(id));
        assert_eq!(info(Some("other"), &[&uri]).device_id(), None);
        assert_eq!(info(None, &[&uri]).device_id(), None);
        assert_eq!(info(Some(&s), &[&uri, &uri]).device_id(), None);
        assert_eq!(info(Some(&s), &[]).device_id(), None);
        let upper = s.to_uppercase();
        assert_eq!(
            info(Some(&upper), &[&format!("urn:uuid:{upper}")]).device_id(),
            None
        );
        let mut ca = info(Some(&s), &[&uri]);
        ca.is_ca = true;
        assert_eq!(ca.device_id(), None);
        assert_eq!(info(Some(&s), &[&uri]).operator_name(), None);
    }

    #[test]
    fn operator_name_needs_matching_cn() {
        let uri = "urn:floto:operator:alice@example.com";
        assert_eq!(
            info(Some("alice@example.com"), &[uri]).operator_name(),
            Some("alice@example.com")
        );
        assert_eq!(info(Some("bob"), &[uri]).operator_name(), None);
        assert_eq!(info(Some("alice@example.com"), &[uri]).device_id(), None);
        assert_eq!(
            info(Some("a b"), &["urn:floto:operator:a b"]).operator_name(),
            None
        );
    }

    #[test]
    fn operator_name_rules_are_protos() {
        // The rule itself is tested in floto-proto; here, that the CA applies it.
        assert!(validate_operator_name("alice@example.com").is_ok());
        let err = validate_operator_name(".alice").unwrap_err().to_string();
        assert!(err.contains("start with a letter or a digit"), "{err}");
    }

    #[test]
    fn parse_refuses_garbage_and_wrong_blocks() {
        assert!(matches!(
            parse_cert_der(b"garbage"),
            Err(PkiError::BadCertificate(_))
        ));
        assert!(matches!(
            parse_cert_pem("garbage"),
            Err(PkiError::Pem { .. })
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        assert!(matches!(
            parse_cert_pem(&key.serialize_pem()),
            Err(PkiError::Pem { .. })
        ));
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        let two = format!("{}{}", cert.pem(), cert.pem());
        assert!(matches!(parse_cert_pem(&two), Err(PkiError::Pem { .. })));
        let mut der = cert.der().to_vec();
        der.push(0);
        assert!(matches!(
            parse_cert_der(&der),
            Err(PkiError::BadCertificate(_))
        ));
    }
}
