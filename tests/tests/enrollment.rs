//! Enrollment through real HTTPS with outside clients: CSRs made by `openssl req`, requests
//! sent by `curl`, certificates checked by `openssl verify` and `openssl x509 -text`.
//! Every refusal is checked for its status and message, and for storing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use floto_e2e::api::assert_error;
use floto_e2e::server::Server;
use floto_e2e::{output, require, run, stdout};

const TOOLS: &[&str] = &["curl", "openssl"];

/// A device's keys made with openssl: an ECDSA P-256 CSR and an X25519 WireGuard key.
struct OpensslDevice {
    dir: PathBuf,
    csr_pem: String,
    wg_public: String,
}

fn openssl_device(dir: &Path, name: &str, cn: &str) -> OpensslDevice {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(d.join("device.key"))
        .arg("-out")
        .arg(d.join("device.csr")));
    OpensslDevice {
        csr_pem: std::fs::read_to_string(d.join("device.csr")).unwrap(),
        wg_public: x25519_public(&d),
        dir: d,
    }
}

/// An X25519 key made by openssl; its raw public key, base64.
fn x25519_public(dir: &Path) -> String {
    let key = dir.join("wg.key");
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "X25519", "-out"])
        .arg(&key));
    let der = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key))
    .stdout;
    base64::engine::general_purpose::STANDARD.encode(&der[der.len() - 32..])
}

/// POSTs JSON with curl; returns (status, body).
fn curl(
    server: &Server,
    path: &str,
    bearer: Option<&str>,
    body: &str,
    client: Option<(&Path, &Path)>,
) -> (u16, Value) {
    let mut c = floto_e2e::api::curl(server, "POST", path).body(body);
    if let Some(b) = bearer {
        c = c.bearer(b);
    }
    if let Some((cert, key)) = client {
        c = c.client_cert(cert, key);
    }
    c.send()
}

/// The CRL as `GET /v1/crl` serves it, read by openssl.
#[derive(Debug, PartialEq, Eq)]
struct Crl {
    number: u64,
    /// `openssl crl -text`.
    text: String,
}

fn crl(server: &Server, dir: &Path) -> Crl {
    let file = dir.join("crl.pem");
    run(Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(server.ca_path())
        .arg("-o")
        .arg(&file)
        .arg(format!("{}/v1/crl", server.local_url())));
    let text = stdout(&run(Command::new("openssl")
        .args(["crl", "-noout", "-text", "-CAfile"])
        .arg(server.ca_path())
        .arg("-in")
        .arg(&file)));
    let number = stdout(&run(Command::new("openssl")
        .args(["crl", "-noout", "-crlnumber", "-in"])
        .arg(&file)));
    // `crlNumber=0x01` (OpenSSL 3) or `crlNumber=01` (1.1): hex either way.
    let hex = number
        .trim()
        .trim_start_matches("crlNumber=")
        .trim_start_matches("0x");
    Crl {
        number: u64::from_str_radix(hex, 16).expect("crl number"),
        text,
    }
}

fn enroll_body(uuid: Option<&str>, dev: &OpensslDevice) -> String {
    let mut v = json!({"csr_pem": dev.csr_pem, "wg_public_key": dev.wg_public});
    if let Some(u) = uuid {
        v["uuid"] = json!(u);
    }
    v.to_string()
}

fn devices(server: &Server) -> Vec<Value> {
    let out = server.admin(&["device", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout(&out)).expect("device list json")
}

fn key_uses(server: &Server) -> Vec<Option<u64>> {
    let out = server.admin(&["key", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    keys.iter().map(|k| k["uses_left"].as_u64()).collect()
}

#[test]
fn curl_enrolls_an_openssl_csr_and_openssl_verifies_the_certificate() {
    require(TOOLS);
    let server = Server::start(&[]);
    let key = server.create_key("lab", Some(5));
    let tmp = tempfile::tempdir().unwrap();
    let uuid = "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    // The CSR asks for another CN; the server must overwrite it.
    let dev = openssl_device(tmp.path(), "a", "evil.example.com");
    let (status, body) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(Some(uuid), &dev),
        None,
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["uuid"], uuid);
    let overlay_ip = body["overlay_ip"].as_str().unwrap();
    assert_eq!(
        overlay_ip, "10.240.0.2",
        "first device gets the first device address"
    );
    assert_eq!(body["server_overlay_ip"], "10.240.0.1");
    assert_eq!(body["persistent_keepalive"], 25);
    assert!(body["renew_after"].is_string() && body["expires_at"].is_string());
    let endpoint = format!("127.0.0.1:{}", server.bound.wg.port());
    assert_eq!(body["endpoint"], endpoint.as_str());
    let wg = body["wg_quick_config"].as_str().unwrap();
    assert!(wg.contains(&format!("Address = {overlay_ip}/32")), "{wg}");
    assert!(wg.contains(&format!("Endpoint = {endpoint}")), "{wg}");
    assert!(wg.contains(&format!(
        "PublicKey = {}",
        body["server_public_key"].as_str().unwrap()
    )));
    assert!(wg.contains("PersistentKeepalive = 25"));
    assert!(
        !wg.lines().any(|l| l.starts_with("PrivateKey")),
        "the server never has the device's key"
    );

    let cert = dev.dir.join("device.pem");
    std::fs::write(&cert, body["certificate_pem"].as_str().unwrap()).unwrap();
    let ca = dev.dir.join("ca.pem");
    std::fs::write(&ca, body["ca_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        std::fs::read_to_string(server.ca_path()).unwrap()
    );
    let verified = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca)
        .arg(&cert));
    assert!(stdout(&verified).ends_with(": OK"), "{}", stdout(&verified));
    let purpose = output(
        Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(&ca)
            .arg(&cert),
    );
    assert!(
        !purpose.status.success(),
        "a device certificate must not be usable as a server certificate"
    );

    let text = stdout(&run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)));
    assert!(
        text.contains(&format!("Subject: CN = {uuid}"))
            || text.contains(&format!("Subject: CN={uuid}")),
        "{text}"
    );
    assert!(text.contains(&format!("URI:urn:uuid:{uuid}")), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        !text.contains("evil.example.com"),
        "requested CN leaked into the certificate"
    );
    let serial = stdout(&run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&cert)));
    let hex = serial.trim_start_matches("serial=");
    assert!(
        hex.len() >= 30,
        "serial {hex} should carry ~128 random bits"
    );
    let end = stdout(&run(Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-checkend",
            &(29 * 86_400).to_string(),
            "-in",
        ])
        .arg(&cert)));
    assert!(end.contains("will not expire"), "30-day lifetime: {end}");
    let end = output(
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-checkend",
                &(31 * 86_400).to_string(),
                "-in",
            ])
            .arg(&cert),
    );
    assert!(!end.status.success(), "lifetime is 30 days, not more");

    // The server's own TLS certificate chains to the same CA (curl already checked it).
    let listed = devices(&server);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["overlay_ip"], overlay_ip);
    assert_eq!(key_uses(&server), vec![Some(4)]);

    // Re-enrollment: same key, same CSR key -> 200, same UUID and address, no use taken.
    let (status, again) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(Some(uuid), &dev),
        None,
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["overlay_ip"], overlay_ip);
    assert_eq!(key_uses(&server), vec![Some(4)]);
}

#[test]
fn bad_enrollments_get_clear_errors_and_store_nothing() {
    require(TOOLS);
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let lab = server.create_key("lab", None);
    let other_fleet = server.create_key("prod", None);
    let one_use = server.create_key("lab", Some(1));
    let short_lived = {
        let out = server.admin(&["key", "create", "--fleet", "lab", "--expires", "1s"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        floto_e2e::last_line(&out)
    };
    let a = openssl_device(tmp.path(), "a", "a");
    let uuid_a = "11111111-2222-4333-8444-555555555555";
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&lab),
        &enroll_body(Some(uuid_a), &a),
        None,
    );
    assert_eq!(s, 201, "{b}");
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&one_use),
        &enroll_body(None, &openssl_device(tmp.path(), "u", "u")),
        None,
    );
    assert_eq!(s, 201, "{b}");
    let leaked = server.create_key("leak", None);
    let baseline_devices = devices(&server).len();
    let baseline_uses = key_uses(&server);

    let fresh = openssl_device(tmp.path(), "f", "f");
    let body = enroll_body(None, &fresh);
    let check_nothing_stored = |what: &str| {
        assert_eq!(
            devices(&server).len(),
            baseline_devices,
            "{what} stored a device"
        );
        assert_eq!(key_uses(&server), baseline_uses, "{what} took a key use");
    };

    let (s, b) = curl(&server, "/v1/enroll", None, &body, None);
    assert_error(s, &b, 401, "unauthorized", "missing provisioning key");
    check_nothing_stored("no key");
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some("fpk_not-a-real-key"),
        &body,
        None,
    );
    assert_error(s, &b, 401, "unauthorized", "unknown provisioning key");
    check_nothing_stored("unknown key");
    let (s, b) = curl(&server, "/v1/enroll", Some(&one_use), &body, None);
    assert_error(s, &b, 401, "unauthorized", "no uses left");
    check_nothing_stored("used-up key");
    // A leaked key is stopped with `key revoke ID` (the id from `key list`).
    let listed = server.admin(&["key", "list", "--json"]);
    let keys: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let id = keys.iter().find(|k| k["fleet"] == "leak").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = server.admin(&["key", "revoke", &id]);
    assert!(revoked.status.success(), "{revoked:?}");
    let (s, b) = curl(&server, "/v1/enroll", Some(&leaked), &body, None);
    assert_error(s, &b, 401, "unauthorized", "was revoked");
    check_nothing_stored("revoked key");
    let listed = server.admin(&["key", "list", "--json"]);
    let keys: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(keys
        .iter()
        .any(|k| k["id"] == id && k["revoked_at"].is_string()));
    let unknown = server.admin(&["key", "revoke", "000000000000"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no provisioning key"));
    let audit = server.admin(&["audit", "--json", "--limit", "1000"]);
    assert!(stdout(&audit).contains("key.revoked"));

    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (s, b) = curl(&server, "/v1/enroll", Some(&short_lived), &body, None);
    assert_error(s, &b, 401, "unauthorized", "expired");
    check_nothing_stored("expired key");
    // Another fleet's key for an existing device.
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&other_fleet),
        &enroll_body(Some(uuid_a), &a),
        None,
    );
    assert_error(s, &b, 403, "forbidden", "another fleet");
    check_nothing_stored("other fleet");
    // The UUID held by another device key.
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&lab),
        &enroll_body(Some(uuid_a), &fresh),
        None,
    );
    assert_error(s, &b, 409, "conflict", "different device key");
    check_nothing_stored("uuid conflict");
    // A WireGuard key bound to another device.
    let stolen = json!({"csr_pem": fresh.csr_pem, "wg_public_key": a.wg_public}).to_string();
    let (s, b) = curl(&server, "/v1/enroll", Some(&lab), &stolen, None);
    assert_error(s, &b, 409, "conflict", "already bound");
    check_nothing_stored("wg key conflict");

    // SSH host keys that cannot be certified: a type we do not sign, and no key at all.
    for (keys, words) in [
        (
            json!(["ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAPFLsUyB4J2/yCaIhd2x1I7FHrnjbtCkGNntkyGrk4JNyRSNqoZYvtnj0cMXhO2OPLQkthVd36sjbmNivNzNIsUCnONvgbbK9Cto9bD8cAXGsDRiMtFoIIO9sYJ5KtbTGQ5DuP6c5cOMX8TWmv0N+3gMpsAx8pRL1odxhvSp+fzQ x"]),
            "ssh_host_keys[0]: ssh-dss keys are not accepted",
        ),
        (
            json!(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBNbH2xjFuqCKRs3l0v4ZvDZYQ3W7u8UuXxgrmZ1R4i7", "garbage"]),
            "ssh_host_keys[1]: not an openssh public key",
        ),
    ] {
        let mut v: Value = serde_json::from_str(&body).unwrap();
        v["ssh_host_keys"] = keys;
        let (s, b) = curl(&server, "/v1/enroll", Some(&lab), &v.to_string(), None);
        assert_error(s, &b, 400, "bad_request", words);
        check_nothing_stored("a bad SSH host key");
    }

    // Malformed input, each naming the field.
    let rsa_dir = tmp.path().join("rsa");
    std::fs::create_dir_all(&rsa_dir).unwrap();
    run(Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa", "-keyout",
        ])
        .arg(rsa_dir.join("k"))
        .arg("-out")
        .arg(rsa_dir.join("csr")));
    let rsa_csr = std::fs::read_to_string(rsa_dir.join("csr")).unwrap();
    let mut tampered = fresh.csr_pem.clone();
    {
        // Flip a byte of the signature (the end of the DER).
        let b64: String = tampered
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let n = der.len();
        der[n - 5] ^= 0x40;
        let enc = base64::engine::general_purpose::STANDARD.encode(der);
        tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{enc}\n-----END CERTIFICATE REQUEST-----\n"
        );
    }
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{not json".into(), 400, "bad_request", "not valid json"),
        (json!({"csr_pem": fresh.csr_pem}).to_string(), 400, "bad_request", "wg_public_key"),
        (json!({"csr_pem": fresh.csr_pem, "wg_public_key": fresh.wg_public, "admin": true}).to_string(), 400, "bad_request", "unknown field"),
        (json!({"csr_pem": "not a pem", "wg_public_key": fresh.wg_public}).to_string(), 400, "bad_request", "csr_pem"),
        (json!({"csr_pem": tampered, "wg_public_key": fresh.wg_public}).to_string(), 400, "bad_request", "signature"),
        (json!({"csr_pem": rsa_csr, "wg_public_key": fresh.wg_public}).to_string(), 400, "bad_request", "RSA"),
        (json!({"uuid": "not-a-uuid", "csr_pem": fresh.csr_pem, "wg_public_key": fresh.wg_public}).to_string(), 400, "bad_request", "uuid"),
        (json!({"csr_pem": fresh.csr_pem, "wg_public_key": "AAAA"}).to_string(), 400, "bad_request", "32 bytes"),
        (json!({"csr_pem": fresh.csr_pem, "wg_public_key": "!!not base64!!"}).to_string(), 400, "bad_request", "base64"),
        (json!({"csr_pem": fresh.csr_pem, "wg_public_key": fresh.wg_public, "hostname": "a\nb"}).to_string(), 400, "bad_request", "hostname"),
        (format!("{{\"csr_pem\": \"{}\"}}", "A".repeat(70 * 1024)), 413, "payload_too_large", "limit"),
    ];
    for (body, status, code, words) in cases {
        let (s, b) = curl(&server, "/v1/enroll", Some(&lab), &body, None);
        assert_error(s, &b, status, code, words);
        check_nothing_stored(words);
    }
    // A 3 MB body gets its 413 and message over HTTP/2 as over HTTP/1.1 (it once got a reset
    // stream, which curl reports as a framing error).
    let big = format!("{{\"csr_pem\": \"{}\"}}", "A".repeat(3 << 20));
    for http2 in [true, false] {
        let mut c = floto_e2e::api::curl(&server, "POST", "/v1/enroll")
            .bearer(&lab)
            .body(&big);
        if http2 {
            c = c.http2();
        }
        let (s, b) = c.send();
        assert_error(s, &b, 413, "payload_too_large", "limit");
    }
    check_nothing_stored("a 3 MB body");
}

#[test]
fn a_key_enrolling_too_fast_is_slowed_down() {
    require(TOOLS);
    // 1 a second, bursts of 10.
    let server = Server::start(&["--enroll-rate-per-key", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let fast = server.create_key("lab", None);
    let other = server.create_key("lab", None);
    let statuses: Vec<(u16, Value)> = (0..12)
        .map(|i| {
            let dev = openssl_device(tmp.path(), &format!("f{i}"), "f");
            curl(
                &server,
                "/v1/enroll",
                Some(&fast),
                &enroll_body(None, &dev),
                None,
            )
        })
        .collect();
    let created = statuses.iter().filter(|(s, _)| *s == 201).count();
    let (_, shed) = statuses
        .iter()
        .find(|(s, _)| *s == 429)
        .expect("no enrollment was slowed down");
    assert!((10..12).contains(&created), "{created} created");
    assert!(
        shed["message"]
            .as_str()
            .unwrap()
            .contains("--enroll-rate-per-key"),
        "{shed}"
    );
    // Another key is not slowed by the first.
    let dev = openssl_device(tmp.path(), "o", "o");
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&other),
        &enroll_body(None, &dev),
        None,
    );
    assert_eq!(s, 201, "{b}");
}

#[test]
fn concurrent_enrollments_race_and_exactly_one_wins() {
    require(TOOLS);
    let server = Arc::new(Server::start(&["--max-concurrent-enrollments", "1024"]));
    let tmp = tempfile::tempdir().unwrap();
    let n = 12;
    // The same UUID from different device keys.
    let lab = server.create_key("lab", None);
    let uuid = "99999999-8888-4777-8666-555555555555";
    let devs: Vec<_> = (0..n)
        .map(|i| openssl_device(tmp.path(), &format!("r{i}"), "race"))
        .collect();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = devs
            .iter()
            .map(|d| {
                let server = &server;
                let lab = &lab;
                s.spawn(move || {
                    curl(
                        server,
                        "/v1/enroll",
                        Some(lab),
                        &enroll_body(Some(uuid), d),
                        None,
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        n - 1,
        "{statuses:?}"
    );

    // The last use of a key.
    let last = server.create_key("lab", Some(1));
    let devs: Vec<_> = (0..n)
        .map(|i| openssl_device(tmp.path(), &format!("k{i}"), "key"))
        .collect();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = devs
            .iter()
            .map(|d| {
                let server = &server;
                let last = &last;
                s.spawn(move || {
                    curl(
                        server,
                        "/v1/enroll",
                        Some(last),
                        &enroll_body(None, d),
                        None,
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        n - 1,
        "{statuses:?}"
    );
    assert_eq!(devices(&server).len(), 2);
}

#[test]
fn renewal_over_mtls_and_its_refusals() {
    require(TOOLS);
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let key = server.create_key("lab", None);
    let dev = openssl_device(tmp.path(), "d", "d");
    let (s, body) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(None, &dev),
        None,
    );
    assert_eq!(s, 201, "{body}");
    let ip = body["overlay_ip"].clone();
    let cert1 = dev.dir.join("cert1.pem");
    std::fs::write(&cert1, body["certificate_pem"].as_str().unwrap()).unwrap();
    let dkey = dev.dir.join("device.key");

    // Renewal without a client certificate.
    let renew_body = json!({"csr_pem": dev.csr_pem}).to_string();
    let (s, b) = curl(&server, "/v1/renew", None, &renew_body, None);
    assert_error(s, &b, 401, "unauthorized", "client certificate");

    // Renewal with the current certificate and a rotated WireGuard key.
    let new_wg = x25519_public(&dev.dir);
    let (s, renewed) = curl(
        &server,
        "/v1/renew",
        None,
        &json!({"csr_pem": dev.csr_pem, "wg_public_key": new_wg}).to_string(),
        Some((&cert1, &dkey)),
    );
    assert_eq!(s, 200, "{renewed}");
    assert_eq!(renewed["overlay_ip"], ip);
    assert_ne!(renewed["certificate_pem"], body["certificate_pem"]);
    let listed = devices(&server);
    assert_eq!(listed[0]["wg_public_key"], new_wg.as_str());

    // The superseded certificate may not renew (a cloned key).
    let (s, b) = curl(
        &server,
        "/v1/renew",
        None,
        &renew_body,
        Some((&cert1, &dkey)),
    );
    assert_error(s, &b, 403, "forbidden", "superseded");

    // A certificate from another CA.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=intruder",
            "-addext",
            "extendedKeyUsage=clientAuth",
            "-keyout",
        ])
        .arg(other.join("k"))
        .arg("-out")
        .arg(other.join("c")));
    let (s, b) = curl(
        &server,
        "/v1/renew",
        None,
        &renew_body,
        Some((&other.join("c"), &other.join("k"))),
    );
    assert_error(s, &b, 401, "unauthorized", "refused");

    // A revoked device's newest certificate.
    let cert2 = dev.dir.join("cert2.pem");
    std::fs::write(&cert2, renewed["certificate_pem"].as_str().unwrap()).unwrap();
    let uuid = body["uuid"].as_str().unwrap();
    // The CRL is signed once per change of the revoked set: fetching it again gives the
    // same CRL (no registry write), a revocation a new one with the next number.
    let before = crl(&server, &dev.dir);
    assert_eq!(crl(&server, &dev.dir), before, "the CRL was signed again");
    assert!(server.admin(&["device", "revoke", uuid]).status.success());
    let after = crl(&server, &dev.dir);
    assert_eq!(after.number, before.number + 1);
    let serial = output(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&cert2),
    );
    let serial = stdout(&serial)
        .trim()
        .trim_start_matches("serial=")
        .to_owned();
    assert!(
        after.text.to_uppercase().contains(&serial.to_uppercase()),
        "serial {serial} not in the CRL:\n{}",
        after.text
    );
    assert_eq!(crl(&server, &dev.dir), after);
    let (s, b) = curl(
        &server,
        "/v1/renew",
        None,
        &renew_body,
        Some((&cert2, &dkey)),
    );
    assert_error(s, &b, 403, "revoked", "was revoked");
    // ... and it cannot come back by enrolling again.
    let (s, b) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(Some(uuid), &dev),
        None,
    );
    assert_error(s, &b, 403, "revoked", "was revoked");
}

#[test]
fn an_expired_certificate_cannot_renew_but_re_enrolls_with_its_uuid_and_address() {
    require(TOOLS);
    let server = Server::start(&["--cert-lifetime", "30s"]);
    let tmp = tempfile::tempdir().unwrap();
    let key = server.create_key("lab", Some(1));
    let dev = openssl_device(tmp.path(), "d", "d");
    let (s, body) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(None, &dev),
        None,
    );
    assert_eq!(s, 201, "{body}");
    let cert = dev.dir.join("cert.pem");
    std::fs::write(&cert, body["certificate_pem"].as_str().unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(32));
    let (s, b) = curl(
        &server,
        "/v1/renew",
        None,
        &json!({"csr_pem": dev.csr_pem}).to_string(),
        Some((&cert, &dev.dir.join("device.key"))),
    );
    assert_error(s, &b, 401, "unauthorized", "expired");
    // Re-enrollment with the (now used-up) key still brings the device back: it proves the
    // key of its certificate.
    let (s, again) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(body["uuid"].as_str(), &dev),
        None,
    );
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["overlay_ip"], body["overlay_ip"]);
}

#[test]
fn everything_survives_sigkill() {
    require(TOOLS);
    let mut server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let key = server.create_key("lab", Some(3));
    let a = openssl_device(tmp.path(), "a", "a");
    let (s, body) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(None, &a),
        None,
    );
    assert_eq!(s, 201, "{body}");
    server.kill();
    server.start_again();
    let listed = devices(&server);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["uuid"], body["uuid"]);
    assert_eq!(listed[0]["overlay_ip"], body["overlay_ip"]);
    assert_eq!(key_uses(&server), vec![Some(2)]);
    // The next device gets the next address, never the first one again.
    let b = openssl_device(tmp.path(), "b", "b");
    let (s, second) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(None, &b),
        None,
    );
    assert_eq!(s, 201, "{second}");
    assert_eq!(second["overlay_ip"], "10.240.0.3");
    assert_eq!(key_uses(&server), vec![Some(1)]);
    // The first device re-enrolls: same address.
    let (s, again) = curl(
        &server,
        "/v1/enroll",
        Some(&key),
        &enroll_body(body["uuid"].as_str(), &a),
        None,
    );
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["overlay_ip"], body["overlay_ip"]);
}
