//! floto-pki: the certificate authority of floto-connect: checks device and operator CSRs,
//! issues device, operator and server certificates, signs CRLs and verifies client
//! certificates. No I/O: it never touches files, sockets or the clock; every function that
//! needs the time takes `now`. Storing keys, serials and revocations is the caller's job.
//!
//! Profile of what it issues (all signed by the CA key, serial chosen by the caller):
//!
//! | certificate | subject | SAN | EKU | KU (critical) | basicConstraints (critical) |
//! | --- | --- | --- | --- | --- | --- |
//! | CA ([`Ca::generate`]) | `CN=<name>` | none | none | keyCertSign, cRLSign | CA:TRUE, pathlen 0 |
//! | device ([`Ca::sign_device`]) | `CN=<uuid>` | `URI:urn:uuid:<uuid>` | clientAuth | digitalSignature | CA:FALSE |
//! | operator ([`Ca::sign_operator`]) | `CN=<name>` | `URI:urn:floto:operator:<name>` | clientAuth | digitalSignature | CA:FALSE |
//! | server ([`Ca::issue_server`]) | `CN=<first name>` | DNS / IP names | serverAuth, clientAuth | digitalSignature | CA:FALSE |
//! | node ([`Ca::issue_node`]) | `CN=<first name>` | DNS / IP names, `URI:urn:floto:node:<name>` | serverAuth, clientAuth | digitalSignature | CA:FALSE |
//!
//! Leaf certificates carry SKI and AKI, `not_before = now - 5 min`, and
//! `not_after = min(now + lifetime, CA not_after)`. Nothing a CSR asks for is copied except
//! its public key; what was ignored is returned in [`IssuedCert::ignored_requests`].

mod ca;
mod cert;
mod csr;
mod describe;
mod keys;
mod pem;
mod serial;
pub mod ssh;
// The test helpers live with the integration tests, which share them; they name this
// crate `floto_pki`, as the integration tests do.
#[cfg(test)]
extern crate self as floto_pki;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_util;

use time::OffsetDateTime;

pub use ca::{Ca, IssuedCert, RevokedSerial};
pub use cert::{parse_cert_der, parse_cert_pem, CertInfo};
pub use csr::{parse_csr, parse_csr_der, CsrError, VerifiedCsr, MAX_CSR_PEM};
pub use keys::{generate_key, key_matches_cert, make_csr};
pub use serial::Serial;

/// Errors of the CA and of the certificate and key helpers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    /// The input is not the PEM the function expects (no block, wrong label, several
    /// blocks, truncated, bad base64).
    #[error("{what}: {reason}")]
    Pem {
        /// What was being read, e.g. "CA certificate PEM".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate's DER could not be parsed as X.509.
    #[error("the certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// A private key could not be loaded.
    #[error("the private key cannot be used: {0}")]
    BadKey(String),
    /// A key of a type the operation does not support.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The CA private key does not belong to the CA certificate.
    #[error("the private key does not belong to the CA certificate (their public keys differ); pass the key file that was made together with this certificate")]
    KeyMismatch,
    /// The certificate given as a CA is not a CA.
    #[error("certificate \"{subject}\" is not a CA certificate (it lacks basicConstraints CA:TRUE); import the CA certificate that signs your devices' certificates, not a leaf certificate")]
    NotCa {
        /// Subject of the certificate.
        subject: String,
    },
    /// The CA certificate's keyUsage forbids what a floto CA must do.
    #[error("CA certificate \"{subject}\" has a keyUsage extension without {missing}, so it may not {purpose}; re-issue the CA with keyCertSign and cRLSign")]
    CaKeyUsage {
        /// Subject of the CA certificate.
        subject: String,
        /// The missing keyUsage bit.
        missing: &'static str,
        /// What that bit allows.
        purpose: &'static str,
    },
    /// The CA certificate's subject cannot be written as the issuer name of new
    /// certificates byte for byte (certificate chains would not build).
    #[error("CA certificate subject \"{subject}\" cannot be reproduced exactly as the issuer of new certificates ({reason}); floto supports subjects with one attribute per RDN and no repeated attribute types")]
    CaSubject {
        /// Subject of the CA certificate.
        subject: String,
        /// Why not.
        reason: String,
    },
    /// The CA has expired: anything it signed now would not verify.
    #[error("the CA certificate expired at {}; create or import a new CA", describe::time(.not_after))]
    CaExpired {
        /// The CA's not_after.
        not_after: OffsetDateTime,
    },
    /// A serial number that is zero, negative, too long or not hex.
    #[error("invalid certificate serial {input:?}: {reason}")]
    BadSerial {
        /// The input (truncated).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A name (common name, operator name, server DNS name) that cannot go into a certificate.
    #[error("invalid {kind} {name:?}: {reason}")]
    BadName {
        /// Which kind of name.
        kind: &'static str,
        /// The name (sanitised, truncated).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A lifetime or time that cannot be encoded.
    #[error("invalid validity period: {0}")]
    BadValidity(String),
    /// The certificate library failed to build or sign something.
    #[error("could not {action}: {detail}")]
    Signing {
        /// What was being done.
        action: &'static str,
        /// The library's error.
        detail: String,
    },
}

/// Why a client certificate was refused by [`Ca::verify_client_cert`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a parseable X.509 certificate.
    #[error("the client certificate is malformed: {0}")]
    Malformed(String),
    /// Another issuer, or the signature does not verify with this CA's key.
    #[error("the client certificate was not issued by this CA: {0}")]
    NotIssuedByThisCa(String),
    /// `now` is after `not_after`.
    #[error("the client certificate expired at {}; renew it, or re-enroll the device with a provisioning key", describe::time(.not_after))]
    Expired {
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// `now` is before `not_before`.
    #[error("the client certificate is not valid before {}; check the clocks of the client and the server", describe::time(.not_before))]
    NotYetValid {
        /// When it becomes valid.
        not_before: OffsetDateTime,
    },
    /// Issued by this CA, but not for client authentication.
    #[error("the certificate may not be used for client authentication: {0}")]
    WrongUsage(String),
}
