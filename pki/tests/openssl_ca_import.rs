//! CAs made by openssl: imported with the key forms openssl writes, or refused when their
//! subject cannot be reproduced as the issuer of new certificates. Needs the `openssl`
//! command; without it these fail.

mod common;

use common::*;
use floto_pki::{Ca, PkiError, RevokedSerial};
use floto_proto::DeviceId;
use time::OffsetDateTime;

#[test]
fn imports_cas_made_by_openssl() {
    let now = OffsetDateTime::now_utc();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let subj = "/C=DE/O=Acme_Fleet/OU=Devices/CN=Acme_Device_CA";
    // P-384 CA; key given back in SEC1 form.
    openssl(d, &format!("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout p384.key -out p384.pem -subj {subj} -days 30 -addext keyUsage=critical,keyCertSign,cRLSign"));
    openssl(d, "ec -in p384.key -out p384-sec1.key");
    // RSA CA, PKCS#1 key, no keyUsage extension at all.
    openssl(
        d,
        &format!(
            "req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.pem -subj {subj} -days 30"
        ),
    );
    openssl(d, "rsa -in rsa.key -traditional -out rsa1.key");
    // Ed25519 CA.
    openssl(
        d,
        "req -x509 -newkey ed25519 -nodes -keyout ed.key -out ed.pem -subj /CN=Ed_CA -days 30",
    );
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert!(read("p384-sec1.key").contains("EC PRIVATE KEY"));
    assert!(read("rsa1.key").contains("RSA PRIVATE KEY"));

    for (cert, key) in [
        ("p384.pem", "p384.key"),
        ("p384.pem", "p384-sec1.key"),
        ("rsa.pem", "rsa.key"),
        ("rsa.pem", "rsa1.key"),
        ("ed.pem", "ed.key"),
    ] {
        let ca = Ca::from_pem(&read(cert), &read(key)).unwrap_or_else(|e| panic!("{cert}: {e}"));
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        // What key_pem gives back (PKCS#8) loads again.
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        let device = DeviceId::new_random();
        let issued = device_cert(&ca, &device, now, DAY);
        write(d, "leaf.pem", &issued.pem);
        let out = openssl(
            d,
            &format!("verify -CAfile {cert} -purpose sslclient leaf.pem"),
        );
        assert!(out.contains("leaf.pem: OK"), "{cert}: {out}");
        assert!(ca.verify_client_cert(&issued.der, now).is_ok(), "{cert}");
        let usage = webpki::KeyUsage::client_auth();
        webpki_verify(ca.cert_der(), &issued.der, usage, now, None)
            .unwrap_or_else(|e| panic!("{cert}: {e:?}"));
        // Its CRL verifies too.
        let revoked = [RevokedSerial {
            serial: issued.serial,
            revoked_at: now,
        }];
        write(d, "crl.pem", &ca.crl(&revoked, 1, now, DAY).unwrap());
        let out = openssl(d, &format!("crl -in crl.pem -CAfile {cert} -noout"));
        assert!(out.contains("verify OK"), "{cert}: {out}");
    }
    // The key of one CA does not fit the other.
    assert_eq!(
        Ca::from_pem(&read("rsa.pem"), &read("p384.key")).unwrap_err(),
        PkiError::KeyMismatch
    );
}

#[test]
fn refuses_ca_subjects_it_cannot_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, subject) in [
        // Repeated attribute type (DC twice): rcgen keeps one value per type.
        "-subj /DC=com/DC=example/CN=LDAP_style_CA",
        // A multi-valued RDN.
        "-multivalue-rdn -subj /O=Acme+OU=Fleet/CN=Multi_CA",
    ]
    .into_iter()
    .enumerate()
    {
        let (cert, key) = (format!("ca{i}.pem"), format!("ca{i}.key"));
        openssl(d, &format!("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {key} -out {cert} -days 30 {subject}"));
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        let err = Ca::from_pem(&read(&cert), &read(&key)).unwrap_err();
        assert!(matches!(err, PkiError::CaSubject { .. }), "{cert}: {err}");
    }
}
