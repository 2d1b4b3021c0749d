//! SSH certificates against real OpenSSH: a wireguard-go device whose sshd has no
//! authorized keys at all and trusts only the server's user CA (configured by hand with
//! `floto-vpn-server ssh-ca show`), and `floto ssh` with the certificate it gets for each
//! session. What a certificate allows (logins per fleet, the broker's address only, its
//! lifetime) is checked by the device's own sshd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use floto_e2e::api::{assert_error, curl};
use floto_e2e::device::WgGoDevice;
use floto_e2e::net::Netns;
use floto_e2e::server::Server;
use floto_e2e::{floto, output, require, require_root, run, stdout};

const TOOLS: &[&str] = &["wireguard-go", "wg", "sshd", "ssh", "ssh-keygen", "ss"];

/// The login besides root the test uses: an account every Debian system has. Its shell is
/// nologin, so a session as it ends at once, after the device's sshd accepted it (which its
/// log says).
const OTHER_LOGIN: &str = "www-data";

/// Whether the device's sshd let `login` in (the session itself may fail: nologin).
fn accepted(device: &WgGoDevice, login: &str) -> bool {
    device
        .sshd_log()
        .contains(&format!("Accepted publickey for {login} "))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `floto ssh DEVICE [-l LOGIN] -- id -un`, in batch mode.
fn ssh_id(cfg: &Path, device: &str, login: Option<&str>) -> std::process::Output {
    let mut cmd = floto(cfg);
    cmd.args(["ssh", device]);
    if let Some(l) = login {
        cmd.args(["-l", l]);
    }
    cmd.args([
        "--",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "id",
        "-un",
    ]);
    output(&mut cmd)
}

#[test]
fn operators_log_in_with_certificates_only_through_the_broker() {
    require_root();
    require(TOOLS);
    let ns = Netns::new();
    let server = Server::start(&["--tls-name", &ns.host_ip().to_string()]);
    let key = server.create_key("lab", None);
    let mut device = WgGoDevice::enroll(ns, &server, &key);
    device.up();
    server.wait_online(&device.uuid, true, Duration::from_secs(30));

    // The device is configured by hand: its sshd trusts the user CA, and has no keys.
    let shown = server.admin(&["ssh-ca", "show", "--user"]);
    assert!(shown.status.success(), "{shown:?}");
    let ca_file = device.state_dir().join("user_ca.pub");
    std::fs::write(&ca_file, stdout(&shown)).unwrap();
    let all = stdout(&server.admin(&["ssh-ca", "show"]));
    assert!(
        all.contains("@cert-authority *.floto ssh-ed25519 "),
        "{all}"
    );
    device.start_sshd_with("", &format!("TrustedUserCAKeys {}\n", ca_file.display()));

    let ops = tempfile::tempdir().unwrap();
    let cfg = ops.path().join("alice");
    server.login_operator("alice", "operator", &["lab"], &cfg);

    // root, the default login.
    let out = ssh_id(&cfg, &device.uuid, None);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        device.sshd_log()
    );
    assert_eq!(stdout(&out).trim(), "root");
    // The device's sshd names the operator and the session; the audit log, the serial.
    let log = device.sshd_log();
    assert!(log.contains("ID floto:alice:"), "{log}");
    let audit: Vec<Value> = serde_json::from_slice(
        &server
            .admin(&["audit", "--json", "--operator", "alice"])
            .stdout,
    )
    .unwrap();
    let issued = audit
        .iter()
        .find(|r| r["action"] == "ssh.certificate")
        .unwrap_or_else(|| panic!("{audit:?}"));
    let serial = issued["detail"]["serial"].as_u64().unwrap();
    assert!(
        log.contains(&format!("(serial {serial})")),
        "serial {serial}: {log}"
    );

    // The fleet allows only another login: it works, root is refused by the server.
    let set = server.admin(&["fleet", "set", "lab", "--ssh-login", OTHER_LOGIN]);
    assert!(set.status.success(), "{set:?}");
    let out = ssh_id(&cfg, &device.uuid, Some(OTHER_LOGIN));
    assert!(
        accepted(&device, OTHER_LOGIN)
            && format!("{}{}", stdout(&out), stderr(&out)).contains("not available"),
        "{}\n{}",
        stderr(&out),
        device.sshd_log()
    );
    let out = ssh_id(&cfg, &device.uuid, None);
    assert_eq!(out.status.code(), Some(255));
    let err = stderr(&out);
    assert!(
        err.contains("login \"root\" is not allowed on fleet \"lab\"") && err.contains(OTHER_LOGIN),
        "{err}"
    );
    // ...and the device refuses root to that certificate too (its principals).
    let cert = cfg
        .join("ssh/certs")
        .join(format!("{}.floto-cert.pub", device.uuid));
    let plain_ssh = |login: &str, cert: &Path, proxy: bool| {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o"])
            .arg("IdentityAgent=none")
            .arg("-i")
            .arg(cfg.join("ssh/id_ed25519"))
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "ConnectTimeout=10", "-l", login]);
        if proxy {
            let floto = floto_e2e::bin("floto");
            cmd.arg("-o").arg(format!(
                "ProxyCommand={} --config-dir {} proxy {} 22",
                floto.display(),
                cfg.display(),
                device.uuid
            ));
            cmd.arg(format!("{}.floto", device.uuid));
        } else {
            cmd.arg(device.ns.dev_ip().to_string());
        }
        cmd.args(["id", "-un"]);
        output(&mut cmd)
    };
    let out = plain_ssh("root", &cert, true);
    assert!(
        !out.status.success(),
        "root with a {OTHER_LOGIN} certificate"
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    server.admin(&["fleet", "set", "lab", "--default"]);

    // The same certificate straight to the device's sshd, not through the broker: refused
    // (source-address).
    let out = ssh_id(&cfg, &device.uuid, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = plain_ssh("root", &cert, false);
    assert!(
        !out.status.success(),
        "the certificate worked from {}",
        device.ns.host_ip()
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    let log = device.sshd_log();
    assert!(log.contains("not from a permitted source address"), "{log}");

    // An expired certificate, signed by the real CA, through the broker: refused.
    let expired = ops.path().join("expired-cert.pub");
    let public = cfg.join("ssh/id_ed25519.pub");
    std::fs::copy(&public, ops.path().join("expired.pub")).unwrap();
    run(Command::new("ssh-keygen")
        .arg("-s")
        .arg(server.data_dir().join("ssh_user_ca"))
        .args(["-I", "expired", "-n", "root", "-V", "-2h:-1h", "-q"])
        .arg(ops.path().join("expired.pub")));
    assert!(expired.exists());
    let out = plain_ssh("root", &expired, true);
    assert!(!out.status.success(), "an expired certificate was accepted");
    assert!(
        device.sshd_log().contains("expired"),
        "{}",
        device.sshd_log()
    );

    // A revoked operator gets no certificate.
    let bob = ops.path().join("bob");
    server.login_operator("bob", "operator", &["lab"], &bob);
    assert!(ssh_id(&bob, &device.uuid, None).status.success());
    server.admin(&["operator", "revoke", "bob"]);
    let out = ssh_id(&bob, &device.uuid, None);
    assert_eq!(out.status.code(), Some(255));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}

/// Bad requests for certificates get a clear 4xx: a key of another type or none at all, a
/// login that is not a login, one the fleet does not allow, an unknown device, an operator
/// of another fleet, a device's own certificate.
#[test]
fn bad_certificate_requests_are_refused_with_their_reason() {
    require_root();
    require(&["curl", "wireguard-go", "wg"]);
    let ns = Netns::new();
    let server = Server::start(&["--tls-name", &ns.host_ip().to_string()]);
    let key = server.create_key("lab", None);
    let device = WgGoDevice::enroll(ns, &server, &key);
    let dirs = tempfile::tempdir().unwrap();
    let alice = dirs.path().join("alice");
    server.login_operator("alice", "operator", &["lab"], &alice);
    let eve = dirs.path().join("eve");
    server.login_operator("eve", "operator", &["field"], &eve);
    let good_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBNbH2xjFuqCKRs3l0v4ZvDZYQ3W7u8UuXxgrmZ1R4i7 k";
    let ask = |who: &Path, body: Value| {
        curl(&server, "POST", "/v1/ssh/user-cert")
            .client_cert(who.join("operator.pem"), who.join("operator.key"))
            .body(&body.to_string())
            .send()
    };
    let dss = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAPFLsUyB4J2/yCaIhd2x1I7FHrnjbtCkGNntkyGrk4JNyRSNqoZYvtnj0cMXhO2OPLQkthVd36sjbmNivNzNIsUCnONvgbbK9Cto9bD8cAXGsDRiMtFoIIO9sYJ5KtbTGQ5DuP6c5cOMX8TWmv0N+3gMpsAx8pRL1odxhvSp+fzQ x";
    let cases: Vec<(&Path, Value, u16, &str, &str)> = vec![
        (
            &alice,
            serde_json::json!({"public_key": dss, "device": device.uuid}),
            400,
            "bad_request",
            "ssh-dss keys are not accepted",
        ),
        (
            &alice,
            serde_json::json!({"public_key": "ssh-ed25519 AAAA!!", "device": device.uuid}),
            400,
            "bad_request",
            "not an openssh public key",
        ),
        (
            &alice,
            serde_json::json!({"public_key": good_key, "device": device.uuid, "logins": ["root;id"]}),
            400,
            "bad_request",
            "not a login name",
        ),
        (
            &alice,
            serde_json::json!({"public_key": good_key, "device": device.uuid, "logins": ["admin"]}),
            403,
            "forbidden",
            "not allowed on fleet",
        ),
        (
            &alice,
            serde_json::json!({"public_key": good_key, "device": "00000000-1111-4222-8333-444444444444"}),
            404,
            "not_found",
            "no device",
        ),
        (
            &eve,
            serde_json::json!({"public_key": good_key, "device": device.uuid}),
            404,
            "not_found",
            "no device",
        ),
        (
            &alice,
            serde_json::json!({"public_key": good_key}),
            400,
            "bad_request",
            "device",
        ),
    ];
    for (who, body, status, code, words) in cases {
        let (got, answer) = ask(who, body.clone());
        assert_error(got, &answer, status, code, words);
    }
    // What succeeds, for contrast: the same request with a good key.
    let (status, answer) = ask(
        &alice,
        serde_json::json!({"public_key": good_key, "device": device.uuid}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["principals"], serde_json::json!(["root"]));
    assert!(answer["key_id"]
        .as_str()
        .unwrap()
        .starts_with("floto:alice:"));
    // A viewer sees the device but may not log in to it.
    let viewer = server.add_operator("watcher", "viewer", &[]);
    let (status, answer) = curl(&server, "POST", "/v1/ssh/user-cert")
        .bearer(&viewer)
        .body(&serde_json::json!({"public_key": good_key, "device": device.uuid}).to_string())
        .send();
    assert_error(status, &answer, 403, "forbidden", "may not connect");
    // A device's own certificate is no operator credential.
    let state = device.state_dir();
    let (status, answer) = curl(&server, "POST", "/v1/ssh/user-cert")
        .client_cert(state.join("device.pem"), state.join("device.key"))
        .body(&serde_json::json!({"public_key": good_key, "device": device.uuid}).to_string())
        .send();
    assert!(
        (401..=403).contains(&status),
        "a device certificate got {status}: {answer}"
    );
    // Fleet settings: only admins set them, and only to logins.
    let put = |who: &Path, body: &str| {
        curl(&server, "PUT", "/v1/fleets/lab")
            .client_cert(who.join("operator.pem"), who.join("operator.key"))
            .body(body)
            .send()
    };
    let (status, answer) = put(&alice, r#"{"ssh_logins": ["pi"]}"#);
    assert_error(status, &answer, 403, "forbidden", "may not administer");
    let admin = dirs.path().join("admin");
    server.login_operator("ada", "admin", &[], &admin);
    for (body, words) in [
        (r#"{"ssh_logins": ["root; id"]}"#, "not a login name"),
        (r#"{"ssh_logins": []}"#, "ssh_logins is empty"),
        (r#"{"ssh_logins": "root"}"#, "not valid JSON"),
        (r#"{"ssh_logins": ["pi"], "sudo": true}"#, "not valid JSON"),
    ] {
        let (status, answer) = put(&admin, body);
        assert_error(status, &answer, 400, "bad_request", words);
    }
    // Nothing of it was stored: the fleet still has the default login.
    let (status, answer) = ask(
        &alice,
        serde_json::json!({"public_key": good_key, "device": device.uuid}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["principals"], serde_json::json!(["root"]));
    // The device route gives a device its fleet's logins, and nobody else anything.
    let (status, answer) = curl(&server, "GET", "/v1/ssh/device")
        .client_cert(state.join("device.pem"), state.join("device.key"))
        .send();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["logins"], serde_json::json!(["root"]));
    let (status, answer) = curl(&server, "GET", "/v1/ssh/device")
        .client_cert(alice.join("operator.pem"), alice.join("operator.key"))
        .send();
    assert_error(status, &answer, 403, "forbidden", "for devices");
    // The CAs' public keys are published.
    for (path, words) in [
        ("/v1/ssh/user-ca", "ssh-ed25519 "),
        ("/v1/ssh/host-ca", "ssh-ed25519 "),
    ] {
        let out = output(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(server.ca_path())
                .arg(format!("{}{path}", server.local_url())),
        );
        assert!(stdout(&out).starts_with(words), "{path}: {}", stdout(&out));
    }
}

/// A device running the agent, whose sshd has no authorized keys at all: the agent sends
/// sshd's host keys and sets sshd up with what the server answers. `floto ssh` logs in as
/// root and verifies the device by its host certificate with `StrictHostKeyChecking yes`
/// (nothing is trusted on first use); after a re-flash made new host keys, the device is
/// verified again with no "host identification has changed"; a device showing a host
/// certificate for another UUID is refused.
#[test]
fn the_agent_sets_sshd_up_and_devices_are_verified_by_their_host_certificates() {
    use floto_e2e::agent::{start_managed_sshd, Agent, AgentOptions};
    require_root();
    require(TOOLS);
    let ns = Netns::new();
    let server = Server::start(&["--tls-name", &ns.host_ip().to_string()]);
    let key = server.create_key("lab", None);
    let sshd_dir = tempfile::Builder::new()
        .prefix("floto-sshd-")
        .tempdir()
        .unwrap();
    let (sshd, flags) = start_managed_sshd(&ns, sshd_dir.path());
    let mut args: Vec<String> = ["--tun", "--keepalive", "2s", "--sshd-refresh", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(flags);
    let mut agent = Agent::new(&ns, &server, &key, AgentOptions { args, user: None });
    agent.start();
    let uuid = agent.uuid();
    agent.wait_connected(Duration::from_secs(30));
    let drop_in = sshd_dir.path().join("sshd_config.d/50-floto.conf");
    let ready = || {
        floto_e2e::wait_for(Duration::from_secs(20), "the agent to set sshd up", || {
            agent
                .log()
                .contains("sshd set up for floto-connect certificates")
                .then_some(())
        })
    };
    ready();
    let conf = std::fs::read_to_string(&drop_in).unwrap();
    assert!(
        conf.contains("TrustedUserCAKeys") && conf.contains("HostCertificate"),
        "{conf}"
    );

    let ops = tempfile::tempdir().unwrap();
    let cfg = ops.path().join("alice");
    server.login_operator("alice", "operator", &["lab"], &cfg);
    let ssh = |cfg: &Path| {
        output(floto(cfg).args(["ssh", &uuid, "--", "-o", "BatchMode=yes", "id", "-un"]))
    };
    let out = ssh(&cfg);
    assert!(
        out.status.success(),
        "{}\nagent:\n{}\nsshd:\n{}",
        stderr(&out),
        agent.log(),
        sshd.log()
    );
    assert_eq!(stdout(&out).trim(), "root");
    assert!(
        !stderr(&out).contains("trusted on first use"),
        "{}",
        stderr(&out)
    );
    // Nothing was learnt on first use: the CA line is the only trust.
    let first_use = cfg.join("ssh/known_hosts.first_use");
    assert!(
        std::fs::read_to_string(&first_use)
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "a host key was trusted on first use"
    );
    let known = std::fs::read_to_string(cfg.join("ssh/known_hosts")).unwrap();
    assert!(
        known.starts_with("@cert-authority *.floto ssh-ed25519 "),
        "{known}"
    );

    // Plain OpenSSH with the block `floto ssh-config` prints (and no other configuration):
    // a fresh certificate before the connection, the device verified strictly.
    let block = stdout(&output(floto(&cfg).arg("ssh-config")));
    assert!(block.contains("Match host *.floto exec"), "{block}");
    let config = ops.path().join("ssh_config");
    std::fs::write(&config, &block).unwrap();
    let out = output(Command::new("ssh").arg("-F").arg(&config).args([
        "-o",
        "BatchMode=yes",
        &format!("root@{uuid}.floto"),
        "id",
        "-un",
    ]));
    assert!(out.status.success(), "{}\n{block}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "root");

    // Keep this session's root certificate for later.
    let root_cert = ops.path().join("root-cert.pub");
    std::fs::copy(
        cfg.join(format!("ssh/certs/{uuid}.floto-cert.pub")),
        &root_cert,
    )
    .unwrap();

    // Re-flash: sshd gets new host keys; the agent (same identity) restarts, asks for host
    // certificates for them, and the device is verified again without a warning.
    agent.stop();
    for f in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
        std::fs::remove_file(sshd_dir.path().join(f)).unwrap();
    }
    drop(sshd);
    let (sshd, _) = start_managed_sshd(&ns, sshd_dir.path());
    agent.start();
    agent.wait_connected(Duration::from_secs(30));
    floto_e2e::wait_for(Duration::from_secs(20), "new host certificates", || {
        // (The log is this run's.)
        agent
            .log()
            .contains("sshd set up for floto-connect certificates")
            .then_some(())
    });
    let out = ssh(&cfg);
    assert!(
        out.status.success(),
        "{}\nagent:\n{}\nsshd:\n{}",
        stderr(&out),
        agent.log(),
        sshd.log()
    );
    assert!(
        !stderr(&out).contains("IDENTIFICATION HAS CHANGED"),
        "{}",
        stderr(&out)
    );

    // The fleet now allows only another login: the agent learns it within its refresh
    // interval, and the device itself refuses the root certificate issued before, though it
    // has not expired (its principals files).
    server.admin(&["fleet", "set", "lab", "--ssh-login", OTHER_LOGIN]);
    floto_e2e::wait_for(
        Duration::from_secs(20),
        "the agent to learn the logins",
        || {
            agent
                .log()
                .contains("the fleet's SSH logins changed")
                .then_some(())
        },
    );
    let principals = sshd_dir.path().join("floto/principals");
    floto_e2e::wait_for(Duration::from_secs(10), "the principals files", || {
        (principals.join(OTHER_LOGIN).exists() && !principals.join("root").exists()).then_some(())
    });
    let mut old = Command::new("ssh");
    old.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o"])
        .arg("IdentityAgent=none")
        .arg("-i")
        .arg(cfg.join("ssh/id_ed25519"))
        .arg("-o")
        .arg(format!("CertificateFile={}", root_cert.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(format!(
            "ProxyCommand={} --config-dir {} proxy {uuid} 22",
            floto_e2e::bin("floto").display(),
            cfg.display()
        ))
        .args(["-l", "root", &format!("{uuid}.floto"), "id", "-un"]);
    let out = output(&mut old);
    assert!(
        !out.status.success(),
        "the old root certificate still works"
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    let out = output(floto(&cfg).args([
        "ssh",
        &uuid,
        "-l",
        OTHER_LOGIN,
        "--",
        "-o",
        "BatchMode=yes",
        "id",
        "-un",
    ]));
    assert!(
        sshd.log()
            .contains(&format!("Accepted publickey for {OTHER_LOGIN} ")),
        "{}\n{}",
        stderr(&out),
        sshd.log()
    );
    server.admin(&["fleet", "set", "lab", "--default"]);
    floto_e2e::wait_for(
        Duration::from_secs(10),
        "root back in the principals",
        || principals.join("root").exists().then_some(()),
    );

    // The device shows a host certificate of the real CA for another device: refused.
    let other = "00000000-1111-4222-8333-444444444444";
    let host_pub = sshd_dir.path().join("ssh_host_ed25519_key.pub");
    let cert = sshd_dir.path().join("floto/ssh_host_ed25519_key-cert.pub");
    let forged_pub = ops.path().join("forged.pub");
    std::fs::copy(&host_pub, &forged_pub).unwrap();
    run(Command::new("ssh-keygen")
        .arg("-s")
        .arg(server.data_dir().join("ssh_host_ca"))
        .args(["-h", "-q", "-I", "other", "-n"])
        .arg(format!("{other}.floto,{other}"))
        .arg(&forged_pub));
    std::fs::copy(ops.path().join("forged-cert.pub"), &cert).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "kill -HUP $(cat {})",
        sshd_dir.path().join("sshd.pid").display()
    )));
    std::thread::sleep(Duration::from_millis(500));
    let out = ssh(&cfg);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Host key verification failed"),
        "{}",
        stderr(&out)
    );
    agent.stop();
}
