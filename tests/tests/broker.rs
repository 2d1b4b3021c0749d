//! `floto ssh <uuid>` reaches a real WireGuard device: wireguard-go configured with `wg`
//! from the enrollment's config, a real sshd in the device's namespace, the real OpenSSH
//! client through the broker (QUIC and HTTPS CONNECT), `floto tunnel` with plain ssh, and
//! scp of 10 MB with a matching checksum.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use floto_e2e::device::{client_key, WgGoDevice};
use floto_e2e::net::Netns;
use floto_e2e::server::Server;
use floto_e2e::{
    bin, floto, output, require, require_root, run, ssh_opts, stdout, wait_for, Child,
};

const TOOLS: &[&str] = &[
    "wireguard-go",
    "wg",
    "sshd",
    "ssh",
    "scp",
    "ssh-keygen",
    "ss",
];

struct Setup {
    server: Server,
    device: WgGoDevice,
    operator_dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

fn setup(fleet: &str) -> Setup {
    require_root();
    require(TOOLS);
    let ns = Netns::new();
    let server = Server::start(&["--tls-name", &ns.host_ip().to_string()]);
    let pkey = server.create_key(fleet, None);
    let mut device = WgGoDevice::enroll(ns, &server, &pkey);
    device.up();
    let operator_dir = tempfile::tempdir().unwrap();
    let (key, public) = client_key(operator_dir.path());
    device.start_sshd(&public);
    server.login_operator("alice", "admin", &[], &operator_dir.path().join("cfg"));
    server.wait_online(&device.uuid, true, Duration::from_secs(30));
    Setup {
        server,
        device,
        operator_dir,
        key,
    }
}

#[test]
fn floto_ssh_runs_a_command_on_a_wireguard_go_device() {
    let s = setup("lab");
    let cfg = s.operator_dir.path().join("cfg");
    for transport in ["quic", "connect"] {
        let out = output(
            floto(&cfg)
                .args(["--transport", transport, "ssh", &s.device.uuid, "--"])
                .args(ssh_opts(&s.key))
                .args(["echo", "hello-from-device"]),
        );
        assert!(
            out.status.success(),
            "floto ssh over {transport} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.server.child.log()
        );
        assert_eq!(stdout(&out), "hello-from-device", "over {transport}");
    }
    // ssh's exit status is floto's.
    let out = output(
        floto(&cfg)
            .args(["ssh", &s.device.uuid, "--"])
            .args(ssh_opts(&s.key))
            .args(["exit", "7"]),
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // The device's sshd saw the connection come from the server's overlay address.
    let out = output(
        floto(&cfg)
            .args(["ssh", &s.device.uuid, "--"])
            .args(ssh_opts(&s.key))
            .args(["sh", "-c", "'echo $SSH_CLIENT'"]),
    );
    assert!(stdout(&out).starts_with("10.240.0.1 "), "{}", stdout(&out));
    // Every session is audited, with its bytes and result.
    wait_for(
        Duration::from_secs(10),
        "the audit lines of the sessions",
        || {
            let log = s.server.child.log();
            let n = log
                .lines()
                .filter(|l| l.contains("broker.session") && l.contains("bytes_from_device"))
                .count();
            (n >= 4).then_some(())
        },
    );
}

#[test]
fn floto_tunnel_plain_ssh_and_scp_of_10_mb() {
    let s = setup("lab");
    let cfg = s.operator_dir.path().join("cfg");
    let mut tunnel = floto(&cfg);
    tunnel.args(["tunnel", &s.device.uuid, "127.0.0.1:0:22"]);
    let tunnel = Child::spawn("floto-tunnel-cmd", tunnel, s.operator_dir.path());
    let port: u16 = wait_for(Duration::from_secs(15), "floto tunnel to listen", || {
        let log = tunnel.log();
        let line = log
            .lines()
            .find(|l| l.starts_with("forwarding 127.0.0.1:"))?;
        line.trim_start_matches("forwarding 127.0.0.1:")
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let out = output(
        Command::new("ssh")
            .args(["-p", &port.to_string()])
            .args(ssh_opts(&s.key))
            .args(["root@127.0.0.1", "echo", "hello-through-tunnel"]),
    );
    assert_eq!(
        stdout(&out),
        "hello-through-tunnel",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 10 MB through the tunnel with scp, and back through `floto proxy` as ProxyCommand.
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = s.operator_dir.path().join("payload.bin");
    std::fs::write(&src, &data).unwrap();
    let remote = s.operator_dir.path().join("received.bin");
    run(Command::new("scp")
        .args(["-q", "-P", &port.to_string()])
        .args(ssh_opts(&s.key))
        .arg(&src)
        .arg(format!("root@127.0.0.1:{}", remote.display())));
    assert!(
        std::fs::read(&remote).unwrap() == data,
        "file changed on the way to the device"
    );
    let back = s.operator_dir.path().join("back.bin");
    let proxy = format!(
        "{} --config-dir {} proxy %n %p",
        bin("floto").display(),
        cfg.display()
    );
    run(Command::new("scp")
        .args(["-q", "-o", &format!("ProxyCommand={proxy}")])
        .args(ssh_opts(&s.key))
        .arg(format!("root@{}.floto:{}", s.device.uuid, remote.display()))
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "file changed on the way back"
    );
}

#[test]
fn broker_errors_are_distinct_and_clear() {
    let s = setup("lab");
    let cfg = s.operator_dir.path().join("cfg");
    let proxy = |device: &str, port: &str, transport: &str| {
        let out = output(floto(&cfg).args(["--transport", transport, "proxy", device, port]));
        assert!(
            !out.status.success(),
            "proxy to {device}:{port} should fail"
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    for transport in ["quic", "connect"] {
        let unknown = proxy("00000000-1111-4222-8333-444444444444", "22", transport);
        assert!(unknown.contains("unknown device"), "{transport}: {unknown}");
        let bad = proxy("not-a-uuid", "22", transport);
        assert!(bad.contains("not a device UUID"), "{transport}: {bad}");
        let closed = proxy(&s.device.uuid, "2323", transport);
        assert!(
            closed.contains("port 2323") && closed.contains("unreachable"),
            "{transport}: {closed}"
        );
        // `floto ssh` to the closed port: the broker's reason, once, and nothing from
        // OpenSSH after it.
        let out = output(floto(&cfg).args([
            "--transport",
            transport,
            "ssh",
            "-p",
            "2323",
            &s.device.uuid,
            "--",
            "true",
        ]));
        assert_eq!(out.status.code(), Some(255), "{transport}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches("unreachable").count(), 1, "{transport}: {err}");
        for noise in ["kex_exchange_identification", "Connection closed"] {
            assert!(
                !err.contains(noise),
                "{transport}: ssh added {noise:?}: {err}"
            );
        }
    }

    // An operator of another fleet is refused exactly as for a device that does not exist
    // (it learns nothing of the device), and the audit record says it was forbidden.
    let bob = s.operator_dir.path().join("bob");
    s.server.login_operator("bob", "operator", &["prod"], &bob);
    let nowhere = "11111111-2222-4333-8444-555555555555";
    for transport in ["quic", "connect"] {
        let refusal = |uuid: &str| {
            let out = output(floto(&bob).args(["--transport", transport, "proxy", uuid, "22"]));
            assert!(!out.status.success(), "{transport}: {out:?}");
            String::from_utf8_lossy(&out.stderr).replace(uuid, "UUID")
        };
        let err = refusal(&s.device.uuid);
        assert!(err.contains("unknown device"), "{transport}: {err}");
        assert_eq!(err, refusal(nowhere), "{transport}: the refusals differ");
    }
    let (cert, key) = (bob.join("operator.pem"), bob.join("operator.key"));
    for uuid in [s.device.uuid.as_str(), nowhere] {
        let (status, body) = floto_e2e::api::curl(&s.server, "GET", &format!("/v1/devices/{uuid}"))
            .client_cert(&cert, &key)
            .send();
        floto_e2e::api::assert_error(status, &body, 404, "not_found", "no device");
    }
    let log = s.server.child.log();
    assert!(
        log.contains("broker.refused") && log.contains("forbidden"),
        "the refusal is audited"
    );
    // Bob sees no devices of fleet lab either.
    let listed = run(floto(&bob).args(["devices", "--json"]));
    assert_eq!(stdout(&listed), "[]");

    // `floto ssh` says why once, without OpenSSH's noise after it.
    let out = output(floto(&bob).args(["ssh", &s.device.uuid, "--", "true"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no device"), "{err}");
    for noise in ["kex_exchange_identification", "Connection closed"] {
        assert!(!err.contains(noise), "ssh added {noise:?}: {err}");
    }
}

#[test]
fn an_offline_device_is_reported_offline() {
    require_root();
    require(TOOLS);
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let server = Server::start(&[
        "--tls-name",
        &format!("{},{}", ns_a.host_ip(), ns_b.host_ip()),
        "--online-window",
        "6s",
    ]);
    let pkey = server.create_key("lab", None);
    let mut a = WgGoDevice::enroll(ns_a, &server, &pkey);
    let mut b = WgGoDevice::enroll(ns_b, &server, &pkey);
    for d in [&mut a, &mut b] {
        // Keepalives faster than the window, so an idle device stays online.
        d.set_keepalive(2);
        d.up();
    }
    server.wait_online(&a.uuid, true, Duration::from_secs(30));
    server.wait_online(&b.uuid, true, Duration::from_secs(30));
    b.down();
    let out = wait_for(Duration::from_secs(20), "b to go offline", || {
        let v: serde_json::Value =
            serde_json::from_slice(&server.admin(&["device", "show", &b.uuid, "--json"]).stdout)
                .ok()?;
        (v["online"] == false).then_some(v)
    });
    assert!(out["generation"].as_u64().unwrap() >= 2);
    assert_eq!(
        server.device(&a.uuid)["online"],
        true,
        "the other device stays online"
    );
    let dir = tempfile::tempdir().unwrap();
    server.login_operator("carol", "admin", &[], dir.path());
    let out = output(floto(dir.path()).args(["proxy", &b.uuid, "22"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is offline") && err.contains("last seen"),
        "{err}"
    );
    // So does `floto ssh`, without OpenSSH's noise after it.
    let out = output(floto(dir.path()).args(["ssh", &b.uuid, "--", "true"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is offline") && err.contains("last seen"),
        "{err}"
    );
    assert!(!err.contains("Connection closed"), "{err}");
}
