//! The certificate authority: issuing, revoking and verifying.

use std::fmt;
use std::net::IpAddr;

use floto_proto::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType,
};
use rustls_pki_types::{CertificateDer, DnsName};
use time::{OffsetDateTime, UtcOffset};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::cert::{
    cert_der_from_pem, parse_x509, validate_operator_name, CertInfo, DEVICE_URI_PREFIX,
    OPERATOR_URI_PREFIX,
};
use crate::csr::VerifiedCsr;
use crate::keys::{key_matches_spki, load_private_key, validate_common_name};
use crate::{describe, pem, PkiError, Serial, VerifyError};

/// How far `not_before` is set back from `now`, for clients whose clock runs a little slow.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// A certificate revocation: the serial and when it was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Serial of the revoked certificate.
    pub serial: Serial,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate as PEM (`-----BEGIN CERTIFICATE-----`).
    pub pem: String,
    /// The certificate as DER.
    pub der: Vec<u8>,
    /// Its serial (the one passed in).
    pub serial: Serial,
    /// Start of validity, as written in the certificate (whole seconds, UTC).
    pub not_before: OffsetDateTime,
    /// End of validity, as written in the certificate (whole seconds, UTC).
    pub not_after: OffsetDateTime,
    /// What the CSR asked for and did not get, e.g. `requested CN=evil`, `requested CA:TRUE`,
    /// `requested SAN DNS:example.com`, `requested EKU serverAuth`. For the log; text from
    /// the CSR is sanitised (no control characters) and the list is bounded.
    pub ignored_requests: Vec<String>,
}

/// The certificate authority: its certificate and signing key.
///
/// `Debug` shows the subject and expiry, never the key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    /// DER of the CA subject Name: what every certificate it issues has as issuer.
    subject_der: Vec<u8>,
    /// Readable subject, for messages.
    subject: String,
    /// SubjectPublicKeyInfo DER of the CA key, as in its certificate.
    spki_der: Vec<u8>,
    /// How the authority key identifier of CRLs is made (the CA's SKI when it has one).
    key_id: KeyIdMethod,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn signing_error(action: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |e| PkiError::Signing {
        action,
        detail: e.to_string(),
    }
}

/// `t` in UTC, whole seconds (what X.509 times can hold).
fn utc_seconds(t: OffsetDateTime) -> Result<OffsetDateTime, PkiError> {
    t.to_offset(UtcOffset::UTC)
        .replace_nanosecond(0)
        .map_err(|e| PkiError::BadValidity(e.to_string()))
}

/// `(now - 5 min, now + lifetime)` in whole seconds, checked to be encodable.
fn validity(
    now: OffsetDateTime,
    lifetime: std::time::Duration,
) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if lifetime.is_zero() {
        return Err(PkiError::BadValidity(
            "the lifetime must be longer than zero".to_owned(),
        ));
    }
    let too_far = || {
        PkiError::BadValidity(format!(
            "a lifetime of {lifetime:?} from {} ends after the year 9999",
            describe::time(&now)
        ))
    };
    let now = utc_seconds(now)?;
    let lifetime = time::Duration::try_from(lifetime).map_err(|_| too_far())?;
    let not_before = now.checked_sub(BACKDATE).ok_or_else(too_far)?;
    let not_after = utc_seconds(now.checked_add(lifetime).ok_or_else(too_far)?)?;
    if not_before.year() < 1950 {
        return Err(PkiError::BadValidity(format!(
            "{} is before 1950; check the clock",
            describe::time(&now)
        )));
    }
    Ok((not_before, not_after))
}

impl Ca {
    /// A new self-signed ECDSA P-256 CA with subject `CN=<common_name>`: basicConstraints
    /// CA:TRUE, pathlen 0 (critical), keyUsage keyCertSign and cRLSign (critical), SKI, a
    /// random serial, `not_before = now - 5 min`, `not_after = now + lifetime`.
    pub fn generate(
        common_name: &str,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<Ca, PkiError> {
        validate_common_name(common_name)?;
        let (not_before, not_after) = validity(now, lifetime)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(signing_error("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(Serial::random().to_rcgen());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .self_signed(&key)
            .map_err(signing_error("self-sign the CA certificate"))?;
        Self::assemble(cert.der().to_vec(), Issuer::new(params, key))
    }

    /// Loads an existing CA, e.g. the one a fleet's devices already trust.
    ///
    /// `cert_pem`: exactly one `CERTIFICATE` PEM block (text around it is ignored). It must
    /// have basicConstraints CA:TRUE; if it has a keyUsage extension, that must include
    /// keyCertSign and cRLSign (floto signs CRLs); its subject must be one attribute per RDN
    /// without repeated attribute types, with standard string types (so that issued
    /// certificates name it as issuer byte for byte).
    ///
    /// `key_pem`: one of PKCS#8 `PRIVATE KEY` (ECDSA P-256 or P-384, Ed25519, RSA 2048 to
    /// 8192 bits), SEC1 `EC PRIVATE KEY` (P-256 or P-384, an `EC PARAMETERS` block beside it
    /// is skipped) or PKCS#1 `RSA PRIVATE KEY`; not encrypted. It must be the key of the
    /// certificate. [`Ca::key_pem`] gives it back as PKCS#8.
    ///
    /// The certificate's own validity is not checked here (there is no `now`); see
    /// [`Ca::not_after`]. Signing is tried once on a throw-away certificate to make sure
    /// what this CA issues verifies against `cert_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let der = cert_der_from_pem(cert_pem, "CA certificate PEM")?;
        let cert = parse_x509(&der).map_err(PkiError::BadCertificate)?;
        let subject = describe::name(cert.subject());
        let bc = cert
            .basic_constraints()
            .map_err(|e| PkiError::BadCertificate(format!("basicConstraints: {e}")))?;
        if !bc.is_some_and(|bc| bc.value.ca) {
            return Err(PkiError::NotCa { subject });
        }
        let ku = cert
            .key_usage()
            .map_err(|e| PkiError::BadCertificate(format!("keyUsage: {e}")))?;
        if let Some(ku) = ku {
            if !ku.value.key_cert_sign() {
                return Err(PkiError::CaKeyUsage {
                    subject,
                    missing: "keyCertSign",
                    purpose: "sign certificates",
                });
            }
            if !ku.value.crl_sign() {
                return Err(PkiError::CaKeyUsage {
                    subject,
                    missing: "cRLSign",
                    purpose: "sign certificate revocation lists",
                });
            }
        }
        let key = load_private_key(key_pem)?;
        if !key_matches_spki(&key, cert.public_key()) {
            return Err(PkiError::KeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(der.as_slice()), key).map_err(|e| {
                PkiError::CaSubject {
                    subject: subject.clone(),
                    reason: e.to_string(),
                }
            })?;
        let ca = Self::assemble(der, issuer)?;
        ca.check_issuing()?;
        Ok(ca)
    }

    /// Builds the `Ca` from its certificate DER and the matching rcgen issuer.
    fn assemble(cert_der: Vec<u8>, issuer: Issuer<'static, KeyPair>) -> Result<Ca, PkiError> {
        let (subject_der, subject, spki_der, ski, not_after) = {
            let cert = parse_x509(&cert_der).map_err(PkiError::BadCertificate)?;
            let ski = cert
                .iter_extensions()
                .find_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                    _ => None,
                });
            (
                cert.subject().as_raw().to_vec(),
                describe::name(cert.subject()),
                cert.public_key().raw.to_vec(),
                ski,
                cert.validity().not_after.to_datetime(),
            )
        };
        Ok(Ca {
            issuer,
            cert_pem: pem::encode("CERTIFICATE", &cert_der),
            cert_der,
            subject_der,
            subject,
            spki_der,
            key_id: ski.map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified),
            not_after,
        })
    }

    /// Signs a throw-away certificate and checks that it names this CA as issuer byte for
    /// byte and verifies with the CA certificate's key.
    fn check_issuing(&self) -> Result<(), PkiError> {
        let probe_key = KeyPair::generate().map_err(signing_error("generate a probe key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "floto-pki issuing check");
        params.serial_number = Some(Serial::random().to_rcgen());
        let probe = params
            .signed_by(&probe_key, &self.issuer)
            .map_err(signing_error("sign a probe certificate"))?;
        let probe = parse_x509(probe.der()).map_err(PkiError::BadCertificate)?;
        if probe.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(PkiError::CaSubject {
                subject: self.subject.clone(),
                reason: format!(
                    "it would be written as \"{}\"",
                    describe::name(probe.issuer())
                ),
            });
        }
        probe
            .verify_signature(Some(&self.spki()?))
            .map_err(|e| PkiError::Signing {
                action: "verify a probe certificate against the CA certificate",
                detail: e.to_string(),
            })
    }

    fn spki(&self) -> Result<SubjectPublicKeyInfo<'_>, PkiError> {
        SubjectPublicKeyInfo::from_der(&self.spki_der)
            .map(|(_, spki)| spki)
            .map_err(|e| PkiError::BadCertificate(format!("CA public key: {e}")))
    }

    /// The CA certificate as PEM (re-encoded: 64-column base64, `\n` line ends).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key as unencrypted PKCS#8 PEM. Write it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA certificate expires. Leaf certificates never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a device certificate for the public key of `csr`. Everything else the CSR
    /// asked for is ignored and listed in [`IssuedCert::ignored_requests`]: subject
    /// `CN=<uuid>` only, exactly one SAN `URI:urn:uuid:<uuid>`, EKU clientAuth only, keyUsage
    /// digitalSignature (critical), basicConstraints CA:FALSE (critical), SKI and AKI,
    /// `serial`, `not_before = now - 5 min`, `not_after = min(now + lifetime, CA not_after)`.
    pub fn sign_device(
        &self,
        csr: &VerifiedCsr,
        device: &DeviceId,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let cn = device.to_string();
        let uri = format!("{DEVICE_URI_PREFIX}{cn}");
        self.sign_client(csr, &cn, &uri, serial, now, lifetime)
    }

    /// Issues an operator certificate: as [`Ca::sign_device`] but with subject `CN=<name>`
    /// and SAN `URI:urn:floto:operator:<name>`. Names are 1 to 64 characters from
    /// `A-Z a-z 0-9 . _ - @ +`, starting with a letter or digit.
    pub fn sign_operator(
        &self,
        csr: &VerifiedCsr,
        name: &str,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_operator_name(name)?;
        let uri = format!("{OPERATOR_URI_PREFIX}{name}");
        self.sign_client(csr, name, &uri, serial, now, lifetime)
    }

    fn sign_client(
        &self,
        csr: &VerifiedCsr,
        cn: &str,
        uri: &str,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(csr.public_key_der())
            .map_err(signing_error("read the CSR public key"))?;
        let san = SanType::URI(
            uri.try_into()
                .map_err(|e: rcgen::Error| PkiError::BadName {
                    kind: "URI",
                    name: describe::sanitize(uri),
                    reason: e.to_string(),
                })?,
        );
        let mut issued = self.sign_leaf(
            &public_key,
            Some(cn),
            vec![san],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            serial,
            now,
            lifetime,
        )?;
        issued.ignored_requests = csr.ignored_requests(cn, &format!("URI:{uri}"));
        Ok(issued)
    }

    /// Issues a server TLS certificate for a fresh ECDSA P-256 key made here, and returns
    /// it with that key (PKCS#8 PEM).
    ///
    /// Each of `names` is an IP address literal (`10.0.0.1`, `::1`: an IP SAN) or a DNS name
    /// (a DNS SAN; a trailing dot is dropped; no wildcards). Empty or invalid names are
    /// refused; repeated names are written once. CN = the first name when it fits the
    /// 64-character CN limit. EKU serverAuth and clientAuth (nodes also use it to talk to
    /// each other), keyUsage digitalSignature, CA:FALSE, validity as [`Ca::sign_device`].
    pub fn issue_server(
        &self,
        names: &[String],
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<(IssuedCert, String), PkiError> {
        self.issue_named(names, None, serial, now, lifetime)
    }

    /// Issues a node certificate, for the nodes of a cluster to authenticate to each other
    /// (both ends): as [`Ca::issue_server`] for `names` (where other nodes reach this one),
    /// plus the SAN `URI:urn:floto:node:<node>`. It is its own kind: no device UUID and no
    /// operator name, so it is refused as either credential.
    pub fn issue_node(
        &self,
        node: &str,
        names: &[String],
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<(IssuedCert, String), PkiError> {
        let valid = !node.is_empty()
            && node.len() <= 64
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !valid {
            return Err(PkiError::BadName {
                kind: "node name",
                name: describe::sanitize(node),
                reason: "use 1 to 64 letters, digits, '-', '.' or '_'".to_owned(),
            });
        }
        let uri = format!("{}{node}", crate::cert::NODE_URI_PREFIX);
        self.issue_named(names, Some(uri), serial, now, lifetime)
    }

    fn issue_named(
        &self,
        names: &[String],
        uri: Option<String>,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<(IssuedCert, String), PkiError> {
        if names.is_empty() {
            return Err(PkiError::BadName {
                kind: "server name list",
                name: String::new(),
                reason: "give at least one DNS name or IP address".to_owned(),
            });
        }
        let mut sans: Vec<SanType> = Vec::new();
        let mut first: Option<String> = None;
        for name in names {
            let bad = |reason: &str| PkiError::BadName {
                kind: "server name",
                name: describe::sanitize(name),
                reason: reason.to_owned(),
            };
            let (san, text) = if let Ok(ip) = name.parse::<IpAddr>() {
                (SanType::IpAddress(ip), ip.to_string())
            } else {
                let dns = name.strip_suffix('.').unwrap_or(name);
                if dns.is_empty() {
                    return Err(bad("it is empty"));
                }
                DnsName::try_from(dns).map_err(|_| {
                    bad("it is neither an IP address nor a valid DNS name (letters, digits, hyphens and dots; no wildcards)")
                })?;
                let ia5 = dns
                    .try_into()
                    .map_err(|e: rcgen::Error| bad(&e.to_string()))?;
                (SanType::DnsName(ia5), dns.to_owned())
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
            first.get_or_insert(text);
        }
        if let Some(uri) = uri {
            sans.push(SanType::URI(uri.as_str().try_into().map_err(
                |e: rcgen::Error| PkiError::BadName {
                    kind: "URI",
                    name: describe::sanitize(&uri),
                    reason: e.to_string(),
                },
            )?));
        }
        let cn = first.filter(|cn| cn.len() <= 64);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(signing_error("generate the server key"))?;
        let issued = self.sign_leaf(
            &key,
            cn.as_deref(),
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            serial,
            now,
            lifetime,
        )?;
        Ok((issued, key.serialize_pem()))
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        cn: Option<&str>,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let (not_before, not_after) = validity(now, lifetime)?;
        if now > self.not_after {
            return Err(PkiError::CaExpired {
                not_after: self.not_after,
            });
        }
        let not_after = not_after.min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            validate_common_name(cn)?;
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = ekus;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.to_rcgen());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(signing_error("sign the certificate"))?;
        Ok(IssuedCert {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            serial: *serial,
            not_before,
            not_after,
            ignored_requests: Vec::new(),
        })
    }

    /// A v2 CRL signed by the CA, as PEM (`-----BEGIN X509 CRL-----`): the `revoked`
    /// serials with their revocation times (whole seconds), CRL number `crl_number` (the
    /// caller keeps it increasing), `thisUpdate = now`, `nextUpdate = now + validity`, and
    /// an authority key identifier equal to the CA's SKI.
    pub fn crl(
        &self,
        revoked: &[RevokedSerial],
        crl_number: u64,
        now: OffsetDateTime,
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        Ok(pem::encode(
            "X509 CRL",
            &self.crl_der(revoked, crl_number, now, validity)?,
        ))
    }

    /// [`Ca::crl`] as DER (what `rustls`/`webpki` load).
    pub fn crl_der(
        &self,
        revoked: &[RevokedSerial],
        crl_number: u64,
        now: OffsetDateTime,
        validity: std::time::Duration,
    ) -> Result<Vec<u8>, PkiError> {
        let this_update = utc_seconds(now)?;
        let (_, next_update) = self::validity(this_update, validity)?;
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: r.serial.to_rcgen(),
                    revocation_time: utc_seconds(r.revoked_at)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: rcgen::SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id.clone(),
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(signing_error("sign the CRL"))?;
        Ok(crl.der().to_vec())
    }

    /// Verifies a certificate a client presented (DER): issued by this CA (issuer name is
    /// this CA's subject and the signature verifies with this CA's key), `now` within
    /// `[not_before, not_after]`, not a CA, EKU contains clientAuth, keyUsage (if present)
    /// contains digitalSignature, no unknown critical extension. Returns its facts.
    ///
    /// Revocation is not checked here: look the serial up in the registry.
    pub fn verify_client_cert(
        &self,
        cert_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<CertInfo, VerifyError> {
        let cert = parse_x509(cert_der).map_err(VerifyError::Malformed)?;
        if cert.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(VerifyError::NotIssuedByThisCa(format!(
                "its issuer is \"{}\", this CA is \"{}\"",
                describe::name(cert.issuer()),
                self.subject
            )));
        }
        let spki = self
            .spki()
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        cert.verify_signature(Some(&spki)).map_err(|e| {
            VerifyError::NotIssuedByThisCa(format!(
                "its signature does not verify with this CA's key ({e}); it was signed by another CA with the same name"
            ))
        })?;
        let info = CertInfo::from_x509(&cert).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if now < info.not_before {
            return Err(VerifyError::NotYetValid {
                not_before: info.not_before,
            });
        }
        if now > info.not_after {
            return Err(VerifyError::Expired {
                not_after: info.not_after,
            });
        }
        check_client_usage(&cert, &info)?;
        Ok(info)
    }
}

fn check_client_usage(cert: &X509Certificate<'_>, info: &CertInfo) -> Result<(), VerifyError> {
    if info.is_ca {
        return Err(VerifyError::WrongUsage(
            "it is a CA certificate (basicConstraints CA:TRUE)".to_owned(),
        ));
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| VerifyError::Malformed(format!("extendedKeyUsage: {e}")))?;
    match eku {
        None => {
            return Err(VerifyError::WrongUsage(
                "it has no extendedKeyUsage extension; floto client certificates carry clientAuth"
                    .to_owned(),
            ))
        }
        Some(eku) if !eku.value.client_auth => {
            return Err(VerifyError::WrongUsage(format!(
                "its extendedKeyUsage is {} without clientAuth",
                describe::eku_names(eku.value).join(", ")
            )))
        }
        Some(_) => {}
    }
    let ku = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(format!("keyUsage: {e}")))?;
    if let Some(ku) = ku {
        if !ku.value.digital_signature() {
            return Err(VerifyError::WrongUsage(format!(
                "its keyUsage ({}) lacks digitalSignature",
                describe::key_usage_names(ku.value).join(", ")
            )));
        }
    }
    if let Some(ext) = cert
        .iter_extensions()
        .find(|ext| ext.critical && ext.parsed_extension().unsupported())
    {
        return Err(VerifyError::WrongUsage(format!(
            "it carries the unknown critical extension {}",
            describe::oid_name(&ext.oid)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Unit tests of the certificate profiles and of checks that need the CA's internals.
    //! What openssl makes of the CA and what it issues is tested in `tests/openssl_*.rs`.

    use std::time::Duration;

    use rcgen::CustomExtension;
    use rustls_pki_types::ServerName;
    use time::macros::datetime;
    use x509_parser::extensions::GeneralName;
    use x509_parser::x509::X509Version;

    use super::*;
    use crate::test_util::{
        csr_with, device_cert, plain_csr, test_ca, webpki_verify, DAY, TEN_YEARS,
    };
    use crate::{generate_key, key_matches_cert, parse_cert_der, parse_cert_pem};

    type ParamsEdit<'a> = &'a dyn Fn(&mut CertificateParams);

    const NOW: OffsetDateTime = datetime!(2030-06-01 12:00:00 UTC);

    fn ext_oids(cert: &X509Certificate<'_>) -> Vec<String> {
        let mut oids: Vec<String> = cert
            .iter_extensions()
            .map(|e| e.oid.to_id_string())
            .collect();
        oids.sort();
        oids
    }

    fn ski_of(cert: &X509Certificate<'_>) -> Vec<u8> {
        cert.iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .expect("certificate has a subjectKeyIdentifier")
    }

    fn aki_of(cert: &X509Certificate<'_>) -> Vec<u8> {
        cert.iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            })
            .expect("certificate has an authorityKeyIdentifier with a key id")
    }

    /// Every field of a client (device or operator) certificate, as the profile says.
    #[allow(clippy::too_many_arguments)]
    fn assert_client_profile(
        ca: &Ca,
        issued: &IssuedCert,
        cn: &str,
        uri: &str,
        csr: &VerifiedCsr,
        serial: &Serial,
        now: OffsetDateTime,
        lifetime: Duration,
    ) {
        let blocks = pem::parse_blocks(&issued.pem, pem::Outside::WhitespaceOnly).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].label, "CERTIFICATE");
        assert_eq!(blocks[0].der, issued.der);

        let cert = parse_x509(&issued.der).unwrap();
        assert_eq!(cert.version(), X509Version::V3);
        // Subject: CN only.
        let attrs: Vec<_> = cert.subject().iter_attributes().collect();
        assert_eq!(attrs.len(), 1, "subject {}", cert.subject());
        assert_eq!(describe::name(cert.subject()), format!("CN={cn}"));
        // Issued by this CA, signature verifies with its key.
        assert_eq!(cert.issuer().as_raw(), ca.subject_der.as_slice());
        cert.verify_signature(Some(&ca.spki().unwrap())).unwrap();
        // Serial: same bytes, same hex.
        assert_eq!(issued.serial, *serial);
        let raw = cert.raw_serial();
        let stripped = &raw[raw.iter().position(|&b| b != 0).unwrap()..];
        assert_eq!(stripped, serial.as_bytes());
        assert_eq!(
            parse_cert_der(&issued.der).unwrap().serial.to_hex(),
            serial.to_hex()
        );
        // Validity.
        let now_s = utc_seconds(now).unwrap();
        assert_eq!(issued.not_before, now_s - time::Duration::minutes(5));
        assert_eq!(issued.not_after, now_s + lifetime);
        assert_eq!(cert.validity().not_before.to_datetime(), issued.not_before);
        assert_eq!(cert.validity().not_after.to_datetime(), issued.not_after);
        // The CSR's key and nothing else of it.
        assert_eq!(cert.public_key().raw, csr.public_key_der());
        // Extensions: exactly SKI, KU, SAN, BC, AKI, EKU.
        assert_eq!(
            ext_oids(&cert),
            [
                "2.5.29.14",
                "2.5.29.15",
                "2.5.29.17",
                "2.5.29.19",
                "2.5.29.35",
                "2.5.29.37"
            ]
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(!san.critical);
        assert_eq!(san.value.general_names, [GeneralName::URI(uri)]);
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert_eq!(describe::eku_names(eku.value), ["clientAuth"]);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert_eq!(describe::key_usage_names(ku.value), ["digitalSignature"]);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(!bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
        let ca_cert = parse_x509(ca.cert_der()).unwrap();
        assert_eq!(aki_of(&cert), ski_of(&ca_cert));
        assert!(!ski_of(&cert).is_empty());
    }

    fn assert_device_profile(
        ca: &Ca,
        issued: &IssuedCert,
        device: &DeviceId,
        csr: &VerifiedCsr,
        serial: &Serial,
    ) {
        let uri = format!("urn:uuid:{device}");
        assert_client_profile(
            ca,
            issued,
            &device.to_string(),
            &uri,
            csr,
            serial,
            NOW,
            30 * DAY,
        );
        let info = parse_cert_der(&issued.der).unwrap();
        assert_eq!(info.device_id(), Some(*device));
        assert_eq!(info.operator_name(), None);
        assert_eq!(info.uri_sans, [uri]);
        assert!(info.dns_sans.is_empty() && info.ip_sans.is_empty());
        assert!(!info.is_ca);
    }

    #[test]
    fn ca_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
        assert_send_sync::<VerifiedCsr>();
        assert_send_sync::<IssuedCert>();
    }

    #[test]
    fn generated_ca_profile() {
        let ca = test_ca(NOW);
        let cert = parse_x509(ca.cert_der()).unwrap();
        assert_eq!(describe::name(cert.subject()), "CN=floto test CA");
        assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
        cert.verify_signature(None).unwrap();
        assert!(describe::is_p256(cert.public_key()));
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert_eq!(
            describe::key_usage_names(ku.value),
            ["keyCertSign", "cRLSign"]
        );
        assert_eq!(ski_of(&cert).len(), 20);
        assert_eq!(ext_oids(&cert), ["2.5.29.14", "2.5.29.15", "2.5.29.19"]);
        assert_eq!(
            cert.validity().not_before.to_datetime(),
            NOW - time::Duration::minutes(5)
        );
        assert_eq!(cert.validity().not_after.to_datetime(), NOW + TEN_YEARS);
        assert_eq!(ca.not_after(), NOW + TEN_YEARS);
        let info = parse_cert_pem(ca.cert_pem()).unwrap();
        assert!(info.is_ca);
        assert_eq!(info.serial.as_bytes()[0] & 0x80, 0);
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(key_matches_cert(&ca.key_pem(), ca.cert_pem()).unwrap());
        // Two CAs never share a serial or a key.
        let other = test_ca(NOW);
        assert_ne!(
            parse_cert_pem(other.cert_pem()).unwrap().serial,
            info.serial
        );
        assert_ne!(other.spki_der, ca.spki_der);
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn generate_refuses_bad_input() {
        assert!(matches!(
            Ca::generate("", NOW, DAY),
            Err(PkiError::BadName { .. })
        ));
        assert!(matches!(
            Ca::generate("x", NOW, Duration::ZERO),
            Err(PkiError::BadValidity(_))
        ));
        assert!(matches!(
            Ca::generate("x", NOW, Duration::from_secs(u64::MAX)),
            Err(PkiError::BadValidity(_))
        ));
    }

    #[test]
    fn device_certificate_profile() {
        let ca = test_ca(NOW);
        let device = DeviceId::new_random();
        let cn = device.to_string();
        let csr = csr_with(|p| p.distinguished_name.push(DnType::CommonName, cn.as_str()));
        for serial in [
            Serial::random(),
            Serial::from_hex("01").unwrap(),
            Serial::from_hex("00ff").unwrap(),
            Serial::from_hex(&"ff".repeat(16)).unwrap(),
            Serial::from_hex(&format!("0a{}", "00".repeat(15))).unwrap(),
            Serial::from_hex(&"7f".repeat(20)).unwrap(),
        ] {
            let issued = ca
                .sign_device(&csr, &device, &serial, NOW, 30 * DAY)
                .unwrap();
            assert_device_profile(&ca, &issued, &device, &csr, &serial);
            // A CSR that asked for exactly what it got has nothing ignored.
            assert_eq!(issued.ignored_requests, Vec::<String>::new());
        }
    }

    #[test]
    fn hostile_csrs_yield_plain_device_certificates() {
        let ca = test_ca(NOW);
        let device = DeviceId::new_random();
        let victim = DeviceId::new_random();
        let with_ext = |oid: &[u64], critical: bool| {
            let mut ext = CustomExtension::from_oid_content(oid, vec![0x05, 0x00]);
            ext.set_criticality(critical);
            ext
        };
        let cases: Vec<(VerifiedCsr, Vec<String>)> = vec![
            (
                csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(5))),
                vec!["requested CA:TRUE, pathlen:5".into()],
            ),
            (
                csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
                vec!["requested CA:TRUE".into()],
            ),
            (
                csr_with(|p| {
                    p.extended_key_usages = vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::Any,
                    ]
                }),
                vec![
                    "requested EKU serverAuth".into(),
                    "requested EKU anyExtendedKeyUsage".into(),
                ],
            ),
            (
                csr_with(|p| {
                    p.subject_alt_names = vec![
                        SanType::DnsName("example.com".try_into().unwrap()),
                        SanType::IpAddress("192.0.2.7".parse().unwrap()),
                        SanType::URI(format!("urn:uuid:{victim}").try_into().unwrap()),
                        SanType::URI(format!("urn:uuid:{device}").try_into().unwrap()),
                        SanType::Rfc822Name("root@example.com".try_into().unwrap()),
                    ]
                }),
                vec![
                    "requested SAN DNS:example.com".into(),
                    "requested SAN IP:192.0.2.7".into(),
                    format!("requested SAN URI:urn:uuid:{victim}"),
                    "requested SAN email:root@example.com".into(),
                ],
            ),
            (
                csr_with(|p| {
                    p.distinguished_name
                        .push(DnType::CommonName, victim.to_string());
                    p.distinguished_name
                        .push(DnType::OrganizationName, "floto operators");
                }),
                vec![
                    format!("requested CN={victim}"),
                    "requested O=floto operators".into(),
                ],
            ),
            (
                csr_with(|p| {
                    p.custom_extensions = vec![
                        with_ext(&[1, 3, 6, 1, 4, 1, 55555, 7], true),
                        with_ext(&[1, 3, 6, 1, 4, 1, 55555, 8], false),
                    ];
                    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
                }),
                vec![
                    "requested extension 1.3.6.1.4.1.55555.7 (critical)".into(),
                    "requested extension 1.3.6.1.4.1.55555.8".into(),
                    "requested keyUsage keyCertSign".into(),
                    "requested keyUsage cRLSign".into(),
                ],
            ),
        ];
        for (csr, expected) in cases {
            let serial = Serial::random();
            let issued = ca
                .sign_device(&csr, &device, &serial, NOW, 30 * DAY)
                .unwrap();
            assert_device_profile(&ca, &issued, &device, &csr, &serial);
            let mut got = issued.ignored_requests.clone();
            let mut want = expected.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want);
            assert!(ca.verify_client_cert(&issued.der, NOW).is_ok());
        }
    }

    #[test]
    fn operator_certificate_profile() {
        let ca = test_ca(NOW);
        let csr = csr_with(|p| p.distinguished_name.push(DnType::CommonName, "root"));
        let serial = Serial::random();
        let issued = ca
            .sign_operator(&csr, "alice@example.com", &serial, NOW, 30 * DAY)
            .unwrap();
        assert_client_profile(
            &ca,
            &issued,
            "alice@example.com",
            "urn:floto:operator:alice@example.com",
            &csr,
            &serial,
            NOW,
            30 * DAY,
        );
        assert_eq!(issued.ignored_requests, ["requested CN=root"]);
        let info = ca.verify_client_cert(&issued.der, NOW).unwrap();
        assert_eq!(info.operator_name(), Some("alice@example.com"));
        assert_eq!(info.device_id(), None);
        for bad in ["", "a b", "x/y", "-x", "ops\n"] {
            assert!(
                matches!(
                    ca.sign_operator(&csr, bad, &serial, NOW, DAY),
                    Err(PkiError::BadName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn times_are_utc_whole_seconds_and_capped_by_the_ca() {
        let ca = Ca::generate("short CA", NOW, 10 * DAY).unwrap();
        let device = DeviceId::new_random();
        let odd_now = datetime!(2030-06-01 14:00:00.999 +02:00);
        let issued = ca
            .sign_device(&plain_csr(), &device, &Serial::random(), odd_now, DAY)
            .unwrap();
        assert_eq!(issued.not_before, datetime!(2030-06-01 11:55:00 UTC));
        assert_eq!(issued.not_after, datetime!(2030-06-02 12:00:00 UTC));
        assert_eq!(issued.not_after.offset(), UtcOffset::UTC);
        let info = parse_cert_der(&issued.der).unwrap();
        assert_eq!(
            (info.not_before, info.not_after),
            (issued.not_before, issued.not_after)
        );

        // A leaf never outlives its CA.
        let long = ca
            .sign_device(&plain_csr(), &device, &Serial::random(), NOW, 30 * DAY)
            .unwrap();
        assert_eq!(long.not_after, ca.not_after());
        assert_eq!(parse_cert_der(&long.der).unwrap().not_after, ca.not_after());

        // An expired CA issues nothing.
        let later = ca.not_after() + time::Duration::seconds(1);
        let err = ca
            .sign_device(&plain_csr(), &device, &Serial::random(), later, DAY)
            .unwrap_err();
        assert_eq!(
            err,
            PkiError::CaExpired {
                not_after: ca.not_after()
            }
        );
        assert!(matches!(
            ca.sign_device(
                &plain_csr(),
                &device,
                &Serial::random(),
                NOW,
                Duration::ZERO
            ),
            Err(PkiError::BadValidity(_))
        ));
    }

    #[test]
    fn from_pem_round_trip() {
        let ca = test_ca(NOW);
        let loaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.not_after(), ca.not_after());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        // Certificates from the loaded CA verify under the original one and vice versa.
        let device = DeviceId::new_random();
        let a = device_cert(&loaded, &device, NOW, DAY);
        let b = device_cert(&ca, &device, NOW, DAY);
        assert!(ca.verify_client_cert(&a.der, NOW).is_ok());
        assert!(loaded.verify_client_cert(&b.der, NOW).is_ok());
        assert_eq!(
            aki_of(&parse_x509(&a.der).unwrap()),
            aki_of(&parse_x509(&b.der).unwrap())
        );
        // Explanatory text around the PEM blocks is fine.
        let noisy_cert = format!("subject=CN = floto test CA\n{}", ca.cert_pem());
        let noisy_key = format!("Bag Attributes\n    localKeyID: 01\n{}", ca.key_pem());
        assert!(Ca::from_pem(&noisy_cert, &noisy_key).is_ok());
    }

    #[test]
    fn from_pem_refusals() {
        let ca = test_ca(NOW);
        let other = test_ca(NOW);
        assert_eq!(
            Ca::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err(),
            PkiError::KeyMismatch
        );
        assert_eq!(
            Ca::from_pem(ca.cert_pem(), &generate_key().unwrap()).unwrap_err(),
            PkiError::KeyMismatch
        );

        // A leaf certificate with its own key is not a CA.
        let names = vec!["floto.example.com".to_owned()];
        let (server, server_key) = ca
            .issue_server(&names, &Serial::random(), NOW, DAY)
            .unwrap();
        let err = Ca::from_pem(&server.pem, &server_key).unwrap_err();
        assert!(matches!(err, PkiError::NotCa { .. }), "{err}");
        assert!(err.to_string().contains("not a CA"), "{err}");

        // A CA whose keyUsage lacks keyCertSign, or cRLSign.
        for (usages, missing) in [
            (
                vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
                "keyCertSign",
            ),
            (vec![KeyUsagePurpose::KeyCertSign], "cRLSign"),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = usages;
            let cert = params.self_signed(&key).unwrap();
            let err = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap_err();
            assert!(
                matches!(err, PkiError::CaKeyUsage { missing: m, .. } if m == missing),
                "{err}"
            );
        }

        // Garbage and wrong blocks.
        assert!(matches!(
            Ca::from_pem("garbage", &ca.key_pem()),
            Err(PkiError::Pem { .. })
        ));
        assert!(matches!(
            Ca::from_pem(&ca.key_pem(), &ca.key_pem()),
            Err(PkiError::Pem { .. })
        ));
        assert!(matches!(
            Ca::from_pem(
                &format!("{}{}", ca.cert_pem(), other.cert_pem()),
                &ca.key_pem()
            ),
            Err(PkiError::Pem { .. })
        ));
        assert!(matches!(
            Ca::from_pem(&pem::encode("CERTIFICATE", b"junk"), &ca.key_pem()),
            Err(PkiError::BadCertificate(_))
        ));
        assert!(matches!(
            Ca::from_pem(ca.cert_pem(), ca.cert_pem()),
            Err(PkiError::BadKey(_))
        ));
        assert!(matches!(
            Ca::from_pem(ca.cert_pem(), &pem::encode("PRIVATE KEY", b"junk")),
            Err(PkiError::BadKey(_))
        ));
        assert!(matches!(
            Ca::from_pem(ca.cert_pem(), ""),
            Err(PkiError::Pem { .. })
        ));
    }

    #[test]
    fn verify_accepts_own_client_certificates() {
        let ca = test_ca(NOW);
        let device = DeviceId::new_random();
        let serial = Serial::random();
        let issued = ca
            .sign_device(&plain_csr(), &device, &serial, NOW, 30 * DAY)
            .unwrap();
        let info = ca.verify_client_cert(&issued.der, NOW).unwrap();
        assert_eq!(info.serial, serial);
        assert_eq!(info.device_id(), Some(device));
        assert_eq!(info.common_name, Some(device.to_string()));
        assert_eq!(
            info.public_key_der,
            parse_x509(&issued.der).unwrap().public_key().raw
        );
        // Server certificates also carry clientAuth (node to node).
        let (server, _) = ca
            .issue_server(&["node1.example".to_owned()], &Serial::random(), NOW, DAY)
            .unwrap();
        assert!(ca.verify_client_cert(&server.der, NOW).is_ok());
    }

    #[test]
    fn node_certificates_are_their_own_kind() {
        let ca = test_ca(NOW);
        let (node, key_pem) = ca
            .issue_node(
                "node-2",
                &["10.0.0.2".to_owned(), "node2.example".to_owned()],
                &Serial::random(),
                NOW,
                DAY,
            )
            .unwrap();
        let info = ca.verify_client_cert(&node.der, NOW).unwrap();
        assert_eq!(info.node_name(), Some("node-2"));
        assert_eq!(info.operator_name(), None, "not an operator credential");
        assert_eq!(info.device_id(), None, "not a device credential");
        assert_eq!(info.ip_sans, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.dns_sans, ["node2.example"]);
        assert!(key_matches_cert(&key_pem, &node.pem).unwrap());
        // Neither is an operator's or a device's certificate a node's, nor a server's.
        let (server, _) = ca
            .issue_server(&["10.0.0.2".to_owned()], &Serial::random(), NOW, DAY)
            .unwrap();
        assert_eq!(parse_cert_der(&server.der).unwrap().node_name(), None);
        let operator = ca
            .sign_operator(&plain_csr(), "node-2", &Serial::random(), NOW, DAY)
            .unwrap();
        assert_eq!(parse_cert_der(&operator.der).unwrap().node_name(), None);
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(ca
                .issue_node(bad, &["10.0.0.2".to_owned()], &Serial::random(), NOW, DAY)
                .is_err());
        }
    }

    #[test]
    fn verify_checks_the_validity_period() {
        let ca = test_ca(NOW - 400 * DAY);
        let device = DeviceId::new_random();
        // Issued 60 days ago for 30 days: expired.
        let old = ca
            .sign_device(
                &plain_csr(),
                &device,
                &Serial::random(),
                NOW - 60 * DAY,
                30 * DAY,
            )
            .unwrap();
        let err = ca.verify_client_cert(&old.der, NOW).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Expired {
                not_after: old.not_after
            }
        );
        assert!(
            err.to_string().contains("expired at 2030-05-02T12:00:00Z"),
            "{err}"
        );
        // Boundaries are inclusive.
        assert!(ca.verify_client_cert(&old.der, old.not_after).is_ok());
        assert!(ca.verify_client_cert(&old.der, old.not_before).is_ok());
        assert!(matches!(
            ca.verify_client_cert(&old.der, old.not_after + time::Duration::seconds(1)),
            Err(VerifyError::Expired { .. })
        ));
        // Issued for tomorrow: not yet valid.
        let future = ca
            .sign_device(
                &plain_csr(),
                &device,
                &Serial::random(),
                NOW + DAY,
                30 * DAY,
            )
            .unwrap();
        assert_eq!(
            ca.verify_client_cert(&future.der, NOW).unwrap_err(),
            VerifyError::NotYetValid {
                not_before: future.not_before
            }
        );
        assert!(matches!(
            ca.verify_client_cert(&future.der, future.not_before - time::Duration::seconds(1)),
            Err(VerifyError::NotYetValid { .. })
        ));
    }

    #[test]
    fn verify_refuses_certificates_of_other_cas() {
        let ca = test_ca(NOW);
        let twin = test_ca(NOW); // same name, other key
        let stranger = Ca::generate("someone else", NOW, TEN_YEARS).unwrap();
        let device = DeviceId::new_random();
        for other in [&twin, &stranger] {
            let issued = other
                .sign_device(&plain_csr(), &device, &Serial::random(), NOW, DAY)
                .unwrap();
            let err = ca.verify_client_cert(&issued.der, NOW).unwrap_err();
            assert!(matches!(err, VerifyError::NotIssuedByThisCa(_)), "{err}");
        }
        // A certificate whose signature was altered.
        let mut issued = ca
            .sign_device(&plain_csr(), &device, &Serial::random(), NOW, DAY)
            .unwrap();
        let last = issued.der.len() - 1;
        issued.der[last] ^= 1;
        assert!(matches!(
            ca.verify_client_cert(&issued.der, NOW),
            Err(VerifyError::NotIssuedByThisCa(_))
        ));
    }

    #[test]
    fn verify_refuses_wrong_usage() {
        let ca = test_ca(NOW);
        let leaf = |edit: &dyn Fn(&mut CertificateParams)| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.serial_number = Some(Serial::random().to_rcgen());
            params.not_before = NOW - time::Duration::hours(1);
            params.not_after = NOW + time::Duration::hours(1);
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            edit(&mut params);
            params.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
        };
        // The baseline passes, so each refusal below is due to its one change.
        assert!(ca.verify_client_cert(&leaf(&|_| {}), NOW).is_ok());
        let cases: [(&str, ParamsEdit<'_>); 5] = [
            ("serverAuth only", &|p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
            }),
            ("no EKU", &|p| p.extended_key_usages = vec![]),
            ("a CA", &|p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }),
            ("KU without digitalSignature", &|p| {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
            }),
            ("unknown critical extension", &|p| {
                let mut ext =
                    CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 9], vec![5, 0]);
                ext.set_criticality(true);
                p.custom_extensions = vec![ext];
            }),
        ];
        for (what, edit) in cases {
            let err = ca.verify_client_cert(&leaf(edit), NOW).unwrap_err();
            assert!(matches!(err, VerifyError::WrongUsage(_)), "{what}: {err}");
        }
        // The CA's own certificate is issued by itself, but is a CA.
        assert!(matches!(
            ca.verify_client_cert(ca.cert_der(), NOW),
            Err(VerifyError::WrongUsage(_))
        ));
    }

    #[test]
    fn verify_refuses_garbage() {
        let ca = test_ca(NOW);
        let issued = ca
            .sign_device(
                &plain_csr(),
                &DeviceId::new_random(),
                &Serial::random(),
                NOW,
                DAY,
            )
            .unwrap();
        for bad in [
            &b""[..],
            b"garbage",
            issued.pem.as_bytes(),
            &issued.der[..issued.der.len() / 2],
        ] {
            assert!(matches!(
                ca.verify_client_cert(bad, NOW),
                Err(VerifyError::Malformed(_))
            ));
        }
    }

    #[test]
    fn server_certificate_profile() {
        let now = NOW;
        let ca = test_ca(now);
        let names: Vec<String> = [
            "floto.example.com",
            "10.1.2.3",
            "::1",
            "node-2.example.com.",
            "floto.example.com",
        ]
        .map(String::from)
        .into();
        let serial = Serial::random();
        let (issued, key_pem) = ca.issue_server(&names, &serial, now, 90 * DAY).unwrap();
        assert!(key_matches_cert(&key_pem, &issued.pem).unwrap());
        assert!(issued.ignored_requests.is_empty());
        let info = parse_cert_der(&issued.der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("floto.example.com"));
        assert_eq!(info.dns_sans, ["floto.example.com", "node-2.example.com"]);
        assert_eq!(
            info.ip_sans,
            [
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(info.serial, serial);
        let cert = parse_x509(&issued.der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert_eq!(describe::eku_names(eku.value), ["serverAuth", "clientAuth"]);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        assert_eq!(
            describe::key_usage_names(cert.key_usage().unwrap().unwrap().value),
            ["digitalSignature"]
        );

        // As rustls would check it.
        let usage = webpki::KeyUsage::server_auth();
        webpki_verify(ca.cert_der(), &issued.der, usage, now, None).unwrap();
        let leaf = CertificateDer::from(issued.der.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        for good in ["floto.example.com", "node-2.example.com", "10.1.2.3", "::1"] {
            ee.verify_is_valid_for_subject_name(&ServerName::try_from(good).unwrap())
                .unwrap_or_else(|e| panic!("{good}: {e:?}"));
        }
        for bad in ["other.example.com", "10.1.2.4"] {
            assert!(ee
                .verify_is_valid_for_subject_name(&ServerName::try_from(bad).unwrap())
                .is_err());
        }
        // Another CA's server certificate does not verify.
        let stranger = test_ca(now);
        assert!(webpki_verify(stranger.cert_der(), &issued.der, usage, now, None).is_err());
        // An IP-only certificate has the address as CN.
        let (ip_only, _) = ca
            .issue_server(&["192.0.2.1".to_owned()], &Serial::random(), now, DAY)
            .unwrap();
        assert_eq!(
            parse_cert_der(&ip_only.der).unwrap().common_name.as_deref(),
            Some("192.0.2.1")
        );
    }

    #[test]
    fn server_certificate_refuses_bad_names() {
        let ca = test_ca(NOW);
        let serial = Serial::random();
        assert!(matches!(
            ca.issue_server(&[], &serial, NOW, DAY),
            Err(PkiError::BadName { .. })
        ));
        for bad in [
            "",
            ".",
            "bad name",
            "*.example.com",
            "-x.example",
            "a..b",
            "exa mple",
            "10.0.0.256.1",
            "ex/ample",
        ] {
            let names = vec!["ok.example".to_owned(), bad.to_owned()];
            assert!(
                matches!(
                    ca.issue_server(&names, &serial, NOW, DAY),
                    Err(PkiError::BadName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn crl_parses_back_and_verifies_with_the_ca_key() {
        let ca = test_ca(NOW);
        let revoked = [
            RevokedSerial {
                serial: Serial::random(),
                revoked_at: NOW - DAY,
            },
            RevokedSerial {
                serial: Serial::from_hex("00ff01").unwrap(),
                revoked_at: datetime!(2030-05-01 08:30:15.5 UTC),
            },
        ];
        let crl_pem = ca.crl(&revoked, 42, NOW, 7 * DAY).unwrap();
        let blocks = pem::parse_blocks(&crl_pem, pem::Outside::WhitespaceOnly).unwrap();
        assert_eq!(blocks[0].label, "X509 CRL");
        let (rest, crl) = x509_parser::parse_x509_crl(&blocks[0].der).unwrap();
        assert!(rest.is_empty());
        assert_eq!(crl.version(), Some(X509Version::V2));
        assert_eq!(crl.issuer().as_raw(), ca.subject_der.as_slice());
        crl.verify_signature(&ca.spki().unwrap()).unwrap();
        assert_eq!(crl.last_update().to_datetime(), NOW);
        assert_eq!(crl.next_update().unwrap().to_datetime(), NOW + 7 * DAY);
        assert_eq!(crl.crl_number().unwrap().to_string(), "42");
        let got: Vec<(String, OffsetDateTime)> = crl
            .iter_revoked_certificates()
            .map(|r| {
                let serial = Serial::from_der_integer(r.raw_serial()).unwrap();
                (serial.to_hex(), r.revocation_date.to_datetime())
            })
            .collect();
        assert_eq!(
            got,
            [
                (revoked[0].serial.to_hex(), NOW - DAY),
                ("ff01".to_owned(), datetime!(2030-05-01 08:30:15 UTC)),
            ]
        );
        let aki = crl
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(aki, ski_of(&parse_x509(ca.cert_der()).unwrap()));
        // Another CA's key does not verify it.
        assert!(crl.verify_signature(&test_ca(NOW).spki().unwrap()).is_err());
        // An empty CRL is fine; a zero validity is not.
        assert!(ca.crl(&[], 0, NOW, DAY).is_ok());
        assert!(matches!(
            ca.crl(&[], 1, NOW, Duration::ZERO),
            Err(PkiError::BadValidity(_))
        ));
    }
}
