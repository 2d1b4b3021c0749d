//! Operations: graceful and hard restarts with wireguard-go devices (the longest gap in
//! reachability, measured), backup while running and restore, CA import, rotating the API
//! certificate, and the deploy files checked against the server they deploy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use floto_e2e::device::{client_key, WgGoDevice};
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::{http_get, metric, offline, Server};
use floto_e2e::{
    bin, floto, output, require, require_root, run, ssh_opts, stdout, wait_for, Child,
};
use floto_proto::defaults;

const SERVER_OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cmd` through `sh -c`, its stdout.
fn sh(cmd: &str) -> String {
    stdout(&output(Command::new("sh").arg("-c").arg(cmd)))
}

fn tls_names(nss: &[Netns]) -> String {
    nss.iter()
        .map(|n| n.host_ip().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn restarts_finish_open_sessions_and_devices_come_back_in_seconds() {
    require_root();
    require(&["wireguard-go", "wg", "sshd", "ssh", "ping"]);
    // Three devices with WireGuard's real-world keepalive (25 s): after a restart they are
    // back because the server calls them, not because their own timers fire.
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    let mut server = Server::start(&["--tls-name", &tls_names(&nss), "--shutdown-grace", "20s"]);
    let key = server.create_key("lab", None);
    let mut devs: Vec<WgGoDevice> = nss
        .into_iter()
        .map(|ns| WgGoDevice::enroll(ns, &server, &key))
        .collect();
    let dirs = tempfile::tempdir().unwrap();
    let (ssh_key, public) = client_key(dirs.path());
    for d in &mut devs {
        d.up();
    }
    devs[0].start_sshd(&public);
    let alice = dirs.path().join("alice");
    server.login_operator("alice", "admin", &[], &alice);
    for d in &devs {
        server.wait_online(&d.uuid, true, Duration::from_secs(30));
    }
    let logs = tempfile::tempdir().unwrap();
    let pings: Vec<Ping> = devs
        .iter()
        .map(|d| {
            Ping::start(
                &d.ns,
                SERVER_OVERLAY,
                Duration::from_millis(100),
                logs.path(),
            )
        })
        .collect();

    // A session that is still running when SIGTERM comes.
    let mut cmd = floto(&alice);
    cmd.args(["ssh", &devs[0].uuid, "--"])
        .args(ssh_opts(&ssh_key))
        .args(["sleep 4; echo finished"]);
    let mut session = Child::spawn("ssh-session", cmd, logs.path());
    wait_for(
        Duration::from_secs(20),
        "the broker session to open",
        || (metric(&server.metrics(), "floto_broker_sessions_active")? >= 1.0).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));

    // 1. Graceful: SIGTERM.
    server.child.signal(libc::SIGTERM);
    wait_for(
        Duration::from_secs(3),
        "/readyz to say the server is draining",
        || {
            http_get(server.bound.metrics, "/readyz")
                .contains("shutting down")
                .then_some(())
        },
    );
    let refused = output(floto(&alice).args(["proxy", &devs[0].uuid, "22"]));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("shutting down"),
        "{refused:?}"
    );
    let status = wait_for(
        Duration::from_secs(15),
        "the open session to finish",
        || session.inner.try_wait().ok().flatten(),
    );
    assert!(status.success(), "{}", session.log());
    assert!(session.log().contains("finished"), "{}", session.log());
    let exit = wait_for(Duration::from_secs(10), "the server to exit", || {
        server.child.inner.try_wait().ok().flatten()
    });
    assert!(exit.success(), "the server exited with {exit}");
    server.start_again();
    let listening = Instant::now();
    for d in &devs {
        server.wait_online(&d.uuid, true, Duration::from_secs(10));
    }
    let graceful_back = listening.elapsed();
    let closed = server.admin(&["audit", "--json", "--device", &devs[0].uuid]);
    let records: Vec<Value> = serde_json::from_slice(&closed.stdout).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "broker.session" && r["detail"]["result"] == "closed"),
        "{records:?}"
    );

    // 2. Hard: SIGKILL. Endpoints are written within half a second of a device coming
    // online, so the server can call the devices back although it had no time to save them.
    std::thread::sleep(Duration::from_secs(2));
    server.kill();
    server.start_again();
    let listening = Instant::now();
    for d in &devs {
        server.wait_online(&d.uuid, true, Duration::from_secs(10));
    }
    let killed_back = listening.elapsed();
    std::thread::sleep(Duration::from_secs(2));

    let reports: Vec<_> = pings.into_iter().map(Ping::stop).collect();
    eprintln!("restart       | all online after listening again");
    eprintln!("SIGTERM       | {graceful_back:?}");
    eprintln!("SIGKILL       | {killed_back:?}");
    for (d, r) in devs.iter().zip(&reports) {
        eprintln!(
            "device {} | pings sent {} received {} | longest gap {:?}",
            d.uuid, r.sent, r.received, r.max_gap
        );
    }
    let worst = reports.iter().map(|r| r.max_gap).max().unwrap();
    eprintln!("longest gap in reachability across both restarts: {worst:?}");
    assert!(graceful_back < Duration::from_secs(10));
    assert!(killed_back < Duration::from_secs(10));
    // Each restart costs the time the process is down plus one call-back handshake.
    assert!(worst < Duration::from_secs(3), "longest gap {worst:?}");
    // The `ssh` above went through one device: the others were reachable throughout
    // the drain, which shows in their pings, too.
    for r in &reports {
        assert!(r.received > 0);
    }
}

#[test]
fn a_backup_taken_while_running_restores_devices_without_reenrolling() {
    require_root();
    require(&["wireguard-go", "wg", "ping"]);
    let nss = [Netns::new(), Netns::new()];
    let mut server = Server::start(&["--tls-name", &tls_names(&nss)]);
    let key = server.create_key("lab", None);
    let devs: Vec<WgGoDevice> = nss
        .into_iter()
        .map(|ns| {
            let mut d = WgGoDevice::enroll(ns, &server, &key);
            d.up();
            d
        })
        .collect();
    for d in &devs {
        server.wait_online(&d.uuid, true, Duration::from_secs(30));
    }
    let before: Vec<Value> = devs.iter().map(|d| server.device(&d.uuid)).collect();
    std::thread::sleep(Duration::from_secs(6)); // endpoints written

    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("floto-backup.tar.gz");
    let made = server.admin(&["backup", archive.to_str().unwrap()]);
    assert!(made.status.success(), "{made:?}");
    assert!(stdout(&made).contains("2 devices"), "{}", stdout(&made));
    let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a backup holds the CA key");
    // Restoring under a running server is refused.
    let busy = server.admin(&["restore", archive.to_str().unwrap(), "--force"]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("is running"),
        "{busy:?}"
    );

    // The server and its disk are lost; the backup is restored into an empty data dir.
    server.kill();
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    let restored = server.admin(&["restore", archive.to_str().unwrap()]);
    assert!(restored.status.success(), "{restored:?}");
    let mode = std::fs::metadata(server.data_dir().join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    server.start_again();
    let listening = Instant::now();
    for (d, was) in devs.iter().zip(&before) {
        let now = server.wait_online(&d.uuid, true, Duration::from_secs(15));
        assert_eq!(now["overlay_ip"], was["overlay_ip"]);
        assert_eq!(now["cert_serial"], was["cert_serial"]);
    }
    eprintln!(
        "devices online {:?} after the restored server listened",
        listening.elapsed()
    );
    for d in &devs {
        run(d
            .ns
            .command("ping")
            .args(["-c", "3", "-W", "2", &SERVER_OVERLAY.to_string()]));
    }
    // Nobody enrolled again: the audit log has each enrollment once.
    let audit = server.admin(&["audit", "--json", "--limit", "1000"]);
    let records: Vec<Value> = serde_json::from_slice(&audit.stdout).unwrap();
    let enrolled = records
        .iter()
        .filter(|r| r["action"] == "device.enrolled" || r["action"] == "device.reenrolled")
        .count();
    assert_eq!(enrolled, 2, "{records:?}");
}

/// An installation whose overlay is full adds a network to its config and restarts: the
/// device it had keeps its address and comes back; a new device gets an address in the added
/// network, talks to the server's address there, and the broker reaches it from that address.
#[test]
fn an_installation_adds_an_overlay_network_without_renumbering() {
    require_root();
    require(&["wireguard-go", "wg", "ping", "python3"]);
    let nss = [Netns::new(), Netns::new()];
    // Room for one device.
    let mut server = Server::start(&["--tls-name", &tls_names(&nss), "--overlay", "10.77.0.0/30"]);
    let key = server.create_key("lab", None);
    let [ns1, ns2] = nss;
    let mut first = WgGoDevice::enroll(ns1, &server, &key);
    first.set_keepalive(2);
    first.up();
    server.wait_online(&first.uuid, true, Duration::from_secs(30));
    assert_eq!(first.overlay_ip, Ipv4Addr::new(10, 77, 0, 2));
    std::thread::sleep(Duration::from_secs(6)); // its endpoint written, to be called back

    // The next device is refused with what to do about it.
    let refused = output(
        ns2.command(bin("floto-tunnel"))
            .arg("enroll")
            .arg("--server")
            .arg(server.api_url(ns2.host_ip().into()))
            .arg("--ca")
            .arg(server.ca_path())
            .args(["--provisioning-key", &key, "--state-dir"])
            .arg(server.dir.path().join("refused-state")),
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("no overlay address left in 10.77.0.0/30") && err.contains("--extra-overlay"),
        "{err}"
    );

    // The admin adds a network in the config file and restarts.
    let config = server.data_dir().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("extra_overlay = [\"10.78.0.0/29\"]\n");
    std::fs::write(&config, text).unwrap();
    server.kill();
    server.start_again();
    let back = server.wait_online(&first.uuid, true, Duration::from_secs(15));
    assert_eq!(back["overlay_ip"], "10.77.0.2", "renumbered");
    run(first
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.77.0.1"]));

    let mut second = WgGoDevice::enroll(ns2, &server, &key);
    assert_eq!(second.overlay_ip, Ipv4Addr::new(10, 78, 0, 2));
    let status = run(second
        .ns
        .command(bin("floto-tunnel"))
        .args(["status", "--json", "--state-dir"])
        .arg(second.state_dir()));
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["server_overlay_ip"], "10.78.0.1", "{status}");
    second.set_keepalive(2);
    second.up();
    server.wait_online(&second.uuid, true, Duration::from_secs(30));
    run(second
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.78.0.1"]));
    // A service on the device says who connected: the server's address in its network.
    let logs = tempfile::tempdir().unwrap();
    let mut listener = second.ns.command("python3");
    listener.args([
        "-c",
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 7000)); s.listen()\n\
         c, a = s.accept(); c.sendall(('from ' + a[0]).encode()); c.close()",
    ]);
    let _listening = Child::spawn("listener", listener, logs.path());
    let ops = tempfile::tempdir().unwrap();
    server.login_operator("ada", "admin", &[], ops.path());
    let said = wait_for(Duration::from_secs(10), "the device's service", || {
        let out = output(floto(ops.path()).args(["proxy", &second.uuid, "7000"]));
        let said = stdout(&out);
        said.starts_with("from").then_some(said)
    });
    assert_eq!(said.trim(), "from 10.78.0.1");
}

fn openssl(args: &[&str]) {
    run(Command::new("openssl").args(args));
}

/// A CA made by someone else's tooling: OpenSSL, with an RSA or a P-384 key.
fn outside_ca(dir: &Path, kind: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{kind}-ca.key"));
    let cert = dir.join(format!("{kind}-ca.pem"));
    let k = key.to_str().unwrap();
    match kind {
        "rsa" => openssl(&["genrsa", "-out", k, "2048"]),
        _ => openssl(&[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            k,
        ]),
    }
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        k,
        "-subj",
        &format!("/O=FLOTO/CN=Old FLOTO CA ({kind})"),
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

#[test]
fn an_imported_ca_keeps_devices_that_trust_it() {
    require(&["openssl", "curl"]);
    let work = tempfile::tempdir().unwrap();
    for kind in ["rsa", "p384"] {
        let (ca_cert, ca_key) = outside_ca(work.path(), kind);
        let dir = Server::temp_dir();
        offline(
            &[
                "init",
                "--ca-cert",
                ca_cert.to_str().unwrap(),
                "--ca-key",
                ca_key.to_str().unwrap(),
            ],
            &dir.path().join("data"),
        );
        // `init` never replaces a CA.
        let again = output(
            Command::new(bin("floto-vpn-server"))
                .args(["init", "--ca-cert"])
                .arg(&ca_cert)
                .arg("--ca-key")
                .arg(&ca_key)
                .arg("--data-dir")
                .arg(dir.path().join("data")),
        );
        assert!(stdout(&again).contains("kept"), "{again:?}");
        let server = Server::start_on(dir, &[]);
        // A device that knows only the old CA certificate trusts the API...
        let ca = ca_cert.to_str().unwrap();
        let code = sh(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' --cacert {ca} {}/v1/ca",
            server.local_url()
        ));
        assert_eq!(code, "200", "{kind}");
        // ... enrolls with it, and gets a certificate that chains to it.
        let key = server.create_key("lab", None);
        let state = work.path().join(format!("{kind}-device"));
        run(Command::new(bin("floto-tunnel"))
            .args(["enroll", "--server", &server.local_url(), "--ca", ca])
            .args(["--provisioning-key", &key, "--state-dir"])
            .arg(&state));
        let verified = sh(&format!(
            "openssl verify -CAfile {ca} {}",
            state.join("device.pem").display()
        ));
        assert!(verified.ends_with(": OK"), "{kind}: {verified}");
    }
}

/// A leaf for 127.0.0.1 signed by `ca`, with `serial`, written to `dir/SERIAL.{pem,key}`.
fn leaf(dir: &Path, ca: &(PathBuf, PathBuf), serial: &str, days: u32) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{serial}.key"));
    let csr = dir.join(format!("{serial}.csr"));
    let cert = dir.join(format!("{serial}.pem"));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-subj",
        "/CN=vpn",
        "-out",
        csr.to_str().unwrap(),
    ]);
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        ca.0.to_str().unwrap(),
        "-CAkey",
        ca.1.to_str().unwrap(),
        "-set_serial",
        &format!("0x{serial}"),
        "-days",
        &days.to_string(),
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

/// Replaces `to` with a copy of `from` by rename, as cert-manager's Secret update does.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn served_serial(server: &Server) -> String {
    sh(&format!(
        "openssl s_client -connect 127.0.0.1:{} </dev/null 2>/dev/null | openssl x509 -noout -serial",
        server.bound.api.port()
    ))
}

#[test]
fn the_api_certificate_rotates_without_a_restart() {
    require(&["openssl", "curl"]);
    let work = tempfile::tempdir().unwrap();
    let ca = outside_ca(work.path(), "p384");
    let first = leaf(work.path(), &ca, "1001", 30);
    let second = leaf(work.path(), &ca, "1002", 60);
    let tls = work.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (cert, key) = (tls.join("tls.crt"), tls.join("tls.key"));
    install(&first.0, &cert);
    install(&first.1, &key);
    let server = Server::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(served_serial(&server), "serial=1001");
    let expiry = |server: &Server| {
        metric(
            &server.metrics(),
            "floto_certificate_expiry_timestamp_seconds{cert=\"tls\"}",
        )
        .unwrap()
    };
    let was = expiry(&server);

    // Half a rotation: the new certificate, the old key. Still serving the old pair.
    install(&second.0, &cert);
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(served_serial(&server), "serial=1001");
    assert!(server
        .child
        .log()
        .contains("cannot load the new TLS certificate"));
    // The key arrives: the new certificate is served, without a restart.
    install(&second.1, &key);
    wait_for(
        Duration::from_secs(15),
        "the new certificate to be served",
        || (served_serial(&server) == "serial=1002").then_some(()),
    );
    let now = expiry(&server);
    assert!(now - was > 25.0 * 86400.0, "expiry metric {was} -> {now}");
    let code = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' --cacert {} {}/v1/ca",
        ca.0.display(),
        server.local_url()
    ));
    assert_eq!(code, "200");
}

// ---- the deploy files against the server ------------------------------------------------

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_deploy_files_agree_with_the_server() {
    require(&["systemd-analyze", "promtool", "curl"]);
    let deploy = repo().join("deploy");

    // systemd units: verified with the built binaries in place of the install paths.
    let units = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(deploy.join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "/usr/local/bin/",
            &format!("{}/", floto_e2e::bin_dir().display()),
        );
        let copy = units.path().join(path.file_name().unwrap());
        std::fs::write(&copy, &text).unwrap();
        let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{}: {err}",
            path.display()
        );
        // Any grace the server is given must fit in systemd's stop timeout.
        if text.contains("floto-vpn-server run") {
            assert!(
                text.contains("TimeoutStopSec=45"),
                "TimeoutStopSec vs shutdown grace"
            );
        }
        checked += 1;
    }
    assert!(checked >= 1, "no systemd unit in deploy/systemd");

    // Prometheus: config, rules, and the rules' own unit tests.
    let prom = deploy.join("prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "floto-alerts.test.yml"],
    ] {
        let out = output(Command::new("promtool").args(&args).current_dir(&prom));
        assert!(out.status.success(), "promtool {args:?}: {out:?}");
    }

    // Kubernetes: the StatefulSet's environment runs the real server, whose ports and
    // probe paths must be those the manifests name.
    let k8s = deploy.join("kubernetes");
    let mut docs = yaml_docs(&k8s.join("base/statefulset.yaml"));
    docs.extend(yaml_docs(&k8s.join("base/services.yaml")));
    let sts = find(&docs, "StatefulSet", "floto-vpn-server");
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let data_dir = get("FLOTO_DATA_DIR").expect("FLOTO_DATA_DIR");
    assert_eq!(c["volumeMounts"][0]["mountPath"], data_dir.as_str());
    let grace: u64 = get("FLOTO_SHUTDOWN_GRACE")
        .map(|g| g.trim_end_matches('s').parse().unwrap())
        .unwrap_or(defaults::SHUTDOWN_GRACE_SECS);
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > grace);
    // (clap wraps its help to the terminal: compare with the whitespace folded.)
    let help = stdout(&output(
        Command::new(bin("floto-vpn-server")).args(["run", "--help"]),
    ))
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ");
    for (name, _) in &env {
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} is not a server setting"
        );
    }
    let port = |name: &str| -> (u16, String) {
        let p = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"));
        (
            p["containerPort"].as_u64().unwrap() as u16,
            p["protocol"].as_str().unwrap().to_owned(),
        )
    };

    // The server with that environment and its defaults (a temp data dir in place of the
    // volume). It binds the default ports, which nothing else in the suite uses.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = Command::new(bin("floto-vpn-server"));
    cmd.arg("run");
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("FLOTO_DATA_DIR", &data)
        .env("FLOTO_LOG_FORMAT", "human");
    let server = Child::spawn("server-defaults", cmd, tmp.path());
    let bound: Value = wait_for(Duration::from_secs(30), "the server to listen", || {
        serde_json::from_str::<Value>(&std::fs::read_to_string(data.join("server.json")).ok()?).ok()
    });
    let bound_port = |which: &str| -> u16 {
        bound["bound"][which]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap()
    };
    assert_eq!(port("wireguard"), (bound_port("wg"), "UDP".into()));
    assert_eq!(port("api"), (bound_port("api"), "TCP".into()));
    assert_eq!(port("broker-quic"), (bound_port("quic"), "UDP".into()));
    assert_eq!(port("metrics"), (bound_port("metrics"), "TCP".into()));
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], bound_port("metrics")));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
        let path = c[probe]["httpGet"]["path"].as_str().unwrap();
        let body = http_get(metrics_addr, path);
        assert!(
            body.starts_with("ok") || body.starts_with("ready"),
            "{probe} {path}: {body}"
        );
    }
    // Services route to the named container ports, and Prometheus is told the right one.
    let lb = find(&docs, "Service", "floto-vpn-server");
    for p in lb["spec"]["ports"].as_array().unwrap() {
        let (num, proto) = port(p["targetPort"].as_str().unwrap());
        assert_eq!(p["port"].as_u64().unwrap() as u16, num);
        assert_eq!(p["protocol"].as_str().unwrap(), proto);
    }
    let m = find(&docs, "Service", "floto-vpn-server-metrics");
    assert_eq!(
        m["metadata"]["annotations"]["prometheus.io/port"],
        port("metrics").0.to_string().as_str()
    );
    assert_eq!(
        m["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );

    // Every metric the alert rules use exists (a refused enrollment makes the counter appear).
    let refused = sh(&format!(
        "curl -sk -o /dev/null -w '%{{http_code}}' -X POST -H 'Authorization: Bearer fpk_nope' \
         -H 'Content-Type: application/json' -d '{{}}' https://127.0.0.1:{}/v1/enroll",
        bound_port("api")
    ));
    assert_eq!(refused, "401");
    let exposition = http_get(metrics_addr, "/metrics");
    let rules = std::fs::read_to_string(prom.join("floto-alerts.yml")).unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("floto_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 3, "{used:?}");
    for name in used {
        assert!(
            exposition.lines().any(|l| l.starts_with(name)),
            "the alert rules use {name}, which the server does not export"
        );
    }
    drop(server);

    // The cert-manager variant mounts the Secret the Certificate fills, where the env says.
    let cm_cert = yaml_docs(&k8s.join("cert-manager/certificate.yaml"));
    let cm_patch = yaml_docs(&k8s.join("cert-manager/tls-patch.yaml"));
    let secret = cm_cert[0]["spec"]["secretName"].as_str().unwrap();
    let ps = &cm_patch[0]["spec"]["template"]["spec"];
    assert_eq!(ps["volumes"][0]["secret"]["secretName"], secret);
    let mount = ps["containers"][0]["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap();
    for e in ps["containers"][0]["env"].as_array().unwrap() {
        assert!(e["value"].as_str().unwrap().starts_with(mount));
        assert!(help.contains(&format!("env: {}", e["name"].as_str().unwrap())));
    }
    if floto_e2e::which("kubectl").is_some() {
        for variant in ["base", "cert-manager"] {
            let out = output(
                Command::new("kubectl")
                    .arg("kustomize")
                    .arg(k8s.join(variant)),
            );
            assert!(out.status.success(), "kubectl kustomize {variant}: {out:?}");
        }
    } else {
        eprintln!("NOTE: kubectl not installed: the kustomizations were parsed, not rendered");
    }

    // Container builds: the ports they expose are the server's defaults. (No container
    // engine runs here; the images are not built by the suite.)
    let df = std::fs::read_to_string(deploy.join("container/Dockerfile.server")).unwrap();
    let expose = df.lines().find(|l| l.starts_with("EXPOSE")).unwrap();
    for p in [
        format!("{}/udp", defaults::WG_PORT),
        format!("{}/tcp", defaults::API_PORT),
        format!("{}/udp", defaults::API_PORT),
        format!("{}/tcp", defaults::METRICS_PORT),
    ] {
        assert!(expose.contains(&p), "Dockerfile.server does not expose {p}");
    }
    assert!(df.contains(&format!("FLOTO_DATA_DIR={data_dir}")));
}

/// The cluster's manifests and the Grafana dashboard agree with the server: every setting
/// they pass is one the server has, their ports are the server's, and every metric the
/// dashboard queries is one a cluster node exports.
#[test]
fn the_cluster_deploy_files_and_dashboard_agree_with_the_server() {
    require(&["curl"]);
    let deploy = repo().join("deploy");
    let k8s = deploy.join("kubernetes");
    let docs = yaml_docs(&k8s.join("cluster/deployment.yaml"));
    let services = yaml_docs(&k8s.join("cluster/services.yaml"));
    let base = yaml_docs(&k8s.join("base/statefulset.yaml"));
    let dep = find(&docs, "Deployment", "floto-vpn-server");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let help = stdout(&output(
        Command::new(bin("floto-vpn-server")).args(["run", "--help"]),
    ))
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ");
    let names: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in &names {
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} is not a server setting"
        );
    }
    assert!(names.contains(&"FLOTO_DATABASE_URL") && names.contains(&"FLOTO_NODE_NAME"));
    // The same ports as the single node's, and the services route to them.
    let base_c = &find(&base, "StatefulSet", "floto-vpn-server")["spec"]["template"]["spec"]
        ["containers"][0];
    assert_eq!(c["ports"], base_c["ports"]);
    assert_eq!(c["readinessProbe"], base_c["readinessProbe"]);
    let port_names: Vec<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for svc in &services {
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(port_names.contains(&target), "service port {target}");
        }
    }
    // The init container restores the identity with a real subcommand, into the data dir
    // the server uses.
    let init = &pod["initContainers"][0];
    let sub = init["args"][0].as_str().unwrap();
    let out = output(Command::new(bin("floto-vpn-server")).args([sub, "--help"]));
    assert!(out.status.success(), "{sub}: {out:?}");
    assert_eq!(
        init["env"][0], c["env"][0],
        "the init container restores into the data dir"
    );

    // A cluster node (one is enough) exports every metric the dashboard queries.
    let pg = floto_pgtest::Postgres::start();
    let url = pg.create_database("floto");
    let server = Server::start(&["--database-url", &url, "--node-name", "n1"]);
    let refused = sh(&format!(
        "curl -sk -o /dev/null -w '%{{http_code}}' -X POST -H 'Authorization: Bearer fpk_nope' \
         -H 'Content-Type: application/json' -d '{{}}' https://127.0.0.1:{}/v1/enroll",
        server.bound.api.port()
    ));
    assert_eq!(refused, "401");
    // A refused broker session makes the session counter appear.
    let op = tempfile::tempdir().unwrap();
    server.login_operator("grafana-check", "admin", &[], op.path());
    let out =
        output(floto(op.path()).args(["proxy", "00000000-1111-4222-8333-444444444444", "22"]));
    assert!(!out.status.success(), "{out:?}");
    let exposition = wait_for(Duration::from_secs(15), "the cluster gauges", || {
        let text = server.metrics();
        text.contains("floto_cluster_nodes").then_some(text)
    });
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/floto-connect.json")).unwrap(),
    )
    .unwrap();
    let mut used = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            used.extend(
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("floto_"))
                    .map(str::to_owned),
            );
        }
    }
    used.sort();
    used.dedup();
    assert!(used.len() >= 8, "{used:?}");
    for name in used {
        assert!(
            exposition
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "the dashboard queries {name}, which the server does not export"
        );
    }
    if floto_e2e::which("kubectl").is_some() {
        let out = output(
            Command::new("kubectl")
                .arg("kustomize")
                .arg(k8s.join("cluster")),
        );
        assert!(out.status.success(), "kubectl kustomize cluster: {out:?}");
    } else {
        eprintln!(
            "NOTE: kubectl not installed: the cluster kustomization was parsed, not rendered"
        );
    }
}
