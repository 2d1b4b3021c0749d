//! Helpers shared by the integration tests (`mod common;`) and the unit tests (lib.rs
//! includes this file as `crate::test_util`). Crate items are named `floto_pki::...`, which
//! lib.rs makes resolve inside the crate too, so both kinds of tests get the same helpers.

// Each test binary, and the unit tests, use a different part; outside a #[test] function
// clippy does not know this is test code.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use floto_pki::{parse_csr, Ca, IssuedCert, Serial, VerifiedCsr};
use floto_proto::DeviceId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{BorrowedCertRevocationList, CertRevocationList, RevocationOptionsBuilder};

pub(crate) const DAY: Duration = Duration::from_secs(86_400);
pub(crate) const TEN_YEARS: Duration = Duration::from_secs(3650 * 86_400);

pub(crate) fn test_ca(now: OffsetDateTime) -> Ca {
    Ca::generate("floto test CA", now, TEN_YEARS).unwrap()
}

/// A CSR for a fresh P-256 key with an empty subject, after `edit`.
pub(crate) fn csr_with(edit: impl FnOnce(&mut CertificateParams)) -> VerifiedCsr {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    edit(&mut params);
    parse_csr(&params.serialize_request(&key).unwrap().pem().unwrap()).unwrap()
}

pub(crate) fn plain_csr() -> VerifiedCsr {
    csr_with(|_| {})
}

/// A certificate for `device` signed by `ca` for a fresh [`plain_csr`] and a random serial.
pub(crate) fn device_cert(
    ca: &Ca,
    device: &DeviceId,
    now: OffsetDateTime,
    lifetime: Duration,
) -> IssuedCert {
    ca.sign_device(&plain_csr(), device, &Serial::random(), now, lifetime)
        .unwrap()
}

/// Verifies `leaf` under `ca` with rustls-webpki, as a rustls server or client would.
pub(crate) fn webpki_verify(
    ca_der: &[u8],
    leaf_der: &[u8],
    usage: webpki::KeyUsage,
    at: OffsetDateTime,
    crl_der: Option<&[u8]>,
) -> Result<(), webpki::Error> {
    let ca = CertificateDer::from(ca_der);
    let anchors = [webpki::anchor_from_trusted_cert(&ca)?];
    let leaf = CertificateDer::from(leaf_der);
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(at.unix_timestamp()).unwrap(),
    ));
    let crls: Vec<CertRevocationList<'_>> = crl_der
        .map(|der| BorrowedCertRevocationList::from_der(der).map(Into::into))
        .transpose()?
        .into_iter()
        .collect();
    let crl_refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
    let revocation =
        (!crl_refs.is_empty()).then(|| RevocationOptionsBuilder::new(&crl_refs).unwrap().build());
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        time,
        usage,
        revocation,
        None,
    )
    .map(|_| ())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Runs openssl in `dir` with `args` split on whitespace (so no argument may contain a
/// space); returns whether it succeeded, and its stdout followed by its stderr.
pub(crate) fn openssl_status(dir: &Path, args: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl is installed (/usr/bin/openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// As [`openssl_status`], panicking with the output if openssl fails.
pub(crate) fn openssl(dir: &Path, args: &str) -> String {
    let (ok, text) = openssl_status(dir, args);
    assert!(ok, "openssl {args} failed: {text}");
    text
}
