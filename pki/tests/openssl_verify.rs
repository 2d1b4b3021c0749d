//! openssl accepts what the CA issues: device certificates (for CSRs openssl made, or from
//! a CA loaded back from PEM) verify for client authentication, and CRLs verify and revoke.
//! rustls-webpki is checked alongside. Needs the `openssl` command; without it these fail.

mod common;

use common::*;
use floto_pki::{generate_key, key_matches_cert, make_csr, parse_csr, Ca, RevokedSerial, Serial};
use floto_proto::DeviceId;
use time::OffsetDateTime;

#[test]
fn crl_is_accepted_by_openssl_and_webpki() {
    let now = OffsetDateTime::now_utc();
    let ca = test_ca(now);
    let device = DeviceId::new_random();
    let revoked_cert = device_cert(&ca, &device, now, DAY);
    let good_cert = device_cert(&ca, &device, now, DAY);
    let revoked = [RevokedSerial {
        serial: revoked_cert.serial,
        revoked_at: now,
    }];
    let crl_pem = ca.crl(&revoked, 7, now, DAY).unwrap();
    let crl_der = ca.crl_der(&revoked, 7, now, DAY).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.pem", ca.cert_pem());
    write(d, "crl.pem", &crl_pem);
    write(d, "revoked.pem", &revoked_cert.pem);
    write(d, "good.pem", &good_cert.pem);
    let out = openssl(d, "crl -in crl.pem -CAfile ca.pem -noout");
    assert!(out.contains("verify OK"), "{out}");
    let out = openssl(
        d,
        "verify -crl_check -CAfile ca.pem -CRLfile crl.pem good.pem",
    );
    assert!(out.contains("good.pem: OK"), "{out}");
    let (ok, out) = openssl_status(
        d,
        "verify -crl_check -CAfile ca.pem -CRLfile crl.pem revoked.pem",
    );
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    // Another CA's CRL is refused by openssl.
    write(d, "other-ca.pem", test_ca(now).cert_pem());
    let (ok, out) = openssl_status(d, "crl -in crl.pem -CAfile other-ca.pem -noout");
    assert!(!ok || !out.contains("verify OK"), "{out}");

    let usage = webpki::KeyUsage::client_auth();
    webpki_verify(ca.cert_der(), &good_cert.der, usage, now, Some(&crl_der)).unwrap();
    assert!(matches!(
        webpki_verify(ca.cert_der(), &revoked_cert.der, usage, now, Some(&crl_der)),
        Err(webpki::Error::CertRevoked)
    ));
}

#[test]
fn loaded_ca_issues_certificates_that_openssl_and_webpki_accept() {
    let now = OffsetDateTime::now_utc();
    let original = test_ca(now);
    let ca = Ca::from_pem(original.cert_pem(), &original.key_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.pem", ca.cert_pem());
    let device = DeviceId::new_random();
    let issued = device_cert(&ca, &device, now, 30 * DAY);
    write(d, "device.pem", &issued.pem);
    let out = openssl(d, "verify -CAfile ca.pem -purpose sslclient device.pem");
    assert!(out.contains("device.pem: OK"), "{out}");
    // openssl refuses it as a TLS server certificate: EKU is clientAuth only.
    let (ok, out) = openssl_status(d, "verify -CAfile ca.pem -purpose sslserver device.pem");
    assert!(!ok, "{out}");
    assert_eq!(
        ca.verify_client_cert(&issued.der, now).unwrap().device_id(),
        Some(device)
    );
    let usage = webpki::KeyUsage::client_auth();
    webpki_verify(ca.cert_der(), &issued.der, usage, now, None).unwrap();
    assert!(matches!(
        webpki_verify(
            ca.cert_der(),
            &issued.der,
            webpki::KeyUsage::server_auth(),
            now,
            None
        ),
        Err(webpki::Error::RequiredEkuNotFoundContext(_))
    ));
}

#[test]
fn openssl_csr_is_accepted_and_its_certificate_verifies() {
    let now = OffsetDateTime::now_utc();
    let ca = test_ca(now);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, "req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=x -keyout device.key -out device.csr");
    let csr = parse_csr(&std::fs::read_to_string(d.join("device.csr")).unwrap()).unwrap();
    assert_eq!(csr.subject(), "CN=x");
    let device = DeviceId::new_random();
    let issued = ca
        .sign_device(&csr, &device, &Serial::random(), now, 30 * DAY)
        .unwrap();
    assert_eq!(issued.ignored_requests, ["requested CN=x"]);
    write(d, "ca.pem", ca.cert_pem());
    write(d, "device.pem", &issued.pem);
    let out = openssl(d, "verify -CAfile ca.pem -purpose sslclient device.pem");
    assert!(out.contains("device.pem: OK"), "{out}");
    let key = std::fs::read_to_string(d.join("device.key")).unwrap();
    assert!(key_matches_cert(&key, &issued.pem).unwrap());
    // openssl reads the same subject and SAN back.
    let text = openssl(d, "x509 -in device.pem -noout -subject -ext subjectAltName");
    assert!(text.contains(&format!("CN = {device}")), "{text}");
    assert!(text.contains(&format!("URI:urn:uuid:{device}")), "{text}");
    // The client helpers make CSRs this CA signs too.
    let own_key = generate_key().unwrap();
    let own_csr = parse_csr(&make_csr(&own_key, &device.to_string()).unwrap()).unwrap();
    let own = ca
        .sign_device(&own_csr, &device, &Serial::random(), now, DAY)
        .unwrap();
    assert!(own.ignored_requests.is_empty());
    assert!(key_matches_cert(&own_key, &own.pem).unwrap());
}
