//! Operators, roles, tokens, the audit log, revocation with live sessions, and the metrics
//! and events that follow the devices. Outside clients throughout: `curl`, OpenSSH,
//! wireguard-go.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use floto_e2e::api::{assert_error, curl, parse_sse};
use floto_e2e::device::{client_key, WgGoDevice};
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::{metric, Server};
use floto_e2e::{
    floto, last_line, output, require, require_root, run, ssh_opts, stdout, wait_for, Child,
};

/// `floto-vpn-server audit --json ARGS`
fn audit(server: &Server, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "--json", "--limit", "1000"];
    all.extend_from_slice(args);
    let out = server.admin(&all);
    assert!(
        out.status.success(),
        "audit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn actions(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `curl` through the server's CONNECT front end; returns the CONNECT response code (0 if
/// none) and curl's stderr.
fn connect_with(server: &Server, target: &str, auth: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "--max-time",
        "10",
    ])
    .arg("--proxy")
    .arg(format!("https://127.0.0.1:{}", server.bound.api.port()))
    .arg("--proxy-cacert")
    .arg(server.ca_path())
    .args(auth)
    .arg("-p")
    .arg(format!("http://{target}/"));
    let out = output(&mut cmd);
    (
        stdout(&out).parse().unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn roles_tokens_and_the_audit_log() {
    require(&["curl"]);
    let server = Server::start(&["--login-token-lifetime", "2s"]);
    let dirs = tempfile::tempdir().unwrap();
    let alice = dirs.path().join("alice");
    server.login_operator("alice", "admin", &[], &alice);

    // A login token works once.
    let token = server.add_operator("bob", "operator", &["lab"]);
    let bob = dirs.path().join("bob");
    let login = |dir: &std::path::Path, token: &str| {
        output(
            floto(dir)
                .args([
                    "login",
                    "--server",
                    &server.local_url(),
                    "--token",
                    token,
                    "--ca",
                ])
                .arg(server.ca_path()),
        )
    };
    assert!(login(&bob, &token).status.success());
    let again = login(&dirs.path().join("bob2"), &token);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already used"),
        "{again:?}"
    );
    // ... and only while it is fresh.
    let late = server.add_operator("dave", "operator", &["lab"]);
    std::thread::sleep(Duration::from_millis(2500));
    let expired = login(&dirs.path().join("dave"), &late);
    assert!(!expired.status.success());
    assert!(
        String::from_utf8_lossy(&expired.stderr).contains("expired"),
        "{expired:?}"
    );
    // A name the CA could not put in a certificate is refused by `operator add` itself,
    // before any token exists (not by `floto login` after using the token up).
    for bad in [".alice", "_alice"] {
        let out = server.admin(&[
            "operator", "add", bad, "--role", "operator", "--fleet", "lab",
        ]);
        assert!(!out.status.success(), "{bad} was added");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("must start with a letter or a digit"),
            "{out:?}"
        );
    }
    // An e-mail address is a name the CA takes: added and logged in.
    let mail = dirs.path().join("mail");
    let token = server.add_operator("carol@example.org", "operator", &["lab"]);
    let done = login(&mail, &token);
    assert!(done.status.success(), "{done:?}");

    // An operator without a fleet reaches nothing, so it is refused at once.
    let none = server.admin(&["operator", "add", "nobody", "--role", "operator"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("at least one fleet"));

    // A viewer gets a bearer API token: read-only.
    let out = server.admin(&["operator", "add", "prometheus", "--role", "viewer"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("API token"));
    let viewer = last_line(&out);
    assert!(viewer.starts_with("fvt_"), "{viewer}");
    let (s, devices) = curl(&server, "GET", "/v1/devices").bearer(&viewer).send();
    assert_eq!(s, 200, "{devices}");
    assert!(devices.is_array());
    let (s, b) = curl(&server, "GET", "/v1/keys").bearer(&viewer).send();
    assert_error(s, &b, 403, "forbidden", "may not administer");
    let (s, b) = curl(&server, "GET", "/v1/audit").bearer(&viewer).send();
    assert_error(s, &b, 403, "forbidden", "may not administer");
    let (s, b) = curl(&server, "POST", "/v1/keys")
        .bearer(&viewer)
        .body(r#"{"fleet":"lab"}"#)
        .send();
    assert_error(s, &b, 403, "forbidden", "may not administer");
    // Forged and expired tokens.
    let (s, b) = curl(&server, "GET", "/v1/devices")
        .bearer("fvt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .send();
    assert_error(s, &b, 401, "unauthorized", "unknown API token");
    let (s, b) = curl(&server, "GET", "/v1/devices").send();
    assert_error(s, &b, 401, "unauthorized", "client certificate");
    let out = server.admin(&[
        "operator",
        "add",
        "old",
        "--role",
        "viewer",
        "--expires",
        "1s",
    ]);
    let old = last_line(&out);
    std::thread::sleep(Duration::from_millis(1500));
    let (s, b) = curl(&server, "GET", "/v1/devices").bearer(&old).send();
    assert_error(s, &b, 401, "unauthorized", "expired");

    // A viewer token cannot open a broker session, and the refusal is audited.
    let some_device = "11111111-2222-4333-8444-555555555555";
    let (code, err) = connect_with(
        &server,
        &format!("{some_device}:22"),
        &["--proxy-header", &format!("Authorization: Bearer {viewer}")],
    );
    assert_eq!(code, 403, "{err}");
    // Refusals repeated by one caller do not write a record each: the first is written at
    // once, the rest are counted into one record when its 10 s window closes.
    for _ in 0..30 {
        let (code, _) = connect_with(
            &server,
            &format!("{some_device}:22"),
            &["--proxy-header", &format!("Authorization: Bearer {viewer}")],
        );
        assert_eq!(code, 403);
    }
    let refusals = || {
        audit(&server, &["--operator", "prometheus"])
            .into_iter()
            .filter(|e| e["action"] == "broker.refused")
            .collect::<Vec<_>>()
    };
    assert_eq!(refusals().len(), 1, "{:?}", refusals());
    let rows = wait_for(
        Duration::from_secs(20),
        "the repeated refusals' record",
        || {
            let rows = refusals();
            (rows.len() == 2).then_some(rows)
        },
    );
    assert_eq!(rows[0]["detail"]["repeated"], 30, "{rows:?}");
    assert_eq!(rows[0]["detail"]["result"], "forbidden");
    let m = server.metrics();
    assert_eq!(
        metric(&m, "floto_broker_sessions_total{result=\"forbidden\"}"),
        Some(31.0)
    );
    // Malformed targets and oversized headers on CONNECT, with the admin's certificate.
    let cert = [
        "--proxy-cert",
        &alice.join("operator.pem").display().to_string(),
        "--proxy-key",
        &alice.join("operator.key").display().to_string(),
    ]
    .map(|s| s.to_owned());
    let cert: Vec<&str> = cert.iter().map(String::as_str).collect();
    let (code, err) = connect_with(&server, "not-a-uuid:22", &cert);
    assert_eq!(code, 400, "{err}");
    let (code, err) = connect_with(&server, &format!("{some_device}:0"), &cert);
    assert_eq!(code, 400, "{err}");
    let big = format!("X-Padding: {}", "a".repeat(100 * 1024));
    let mut with_big = cert.clone();
    with_big.extend(["--proxy-header", big.as_str()]);
    let (code, _) = connect_with(&server, &format!("{some_device}:22"), &with_big);
    assert_ne!(code, 200, "a 100 KiB header was accepted");
    assert_eq!(
        floto_e2e::server::http_get(server.bound.metrics, "/healthz").trim(),
        "ok"
    );

    // Event streams end when their credential does: an operator's at its revocation (below),
    // a viewer's when its token expires.
    let out = server.admin(&[
        "operator",
        "add",
        "brief",
        "--role",
        "viewer",
        "--expires",
        "3s",
    ]);
    let brief = last_line(&out);
    let mut by_token = events_stream(&server, &["-H", &format!("Authorization: Bearer {brief}")]);
    let bob_cert = bob.join("operator.pem").display().to_string();
    let bob_key = bob.join("operator.key").display().to_string();
    let mut by_cert = events_stream(&server, &["--cert", &bob_cert, "--key", &bob_key]);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        by_token.try_wait().unwrap().is_none(),
        "the stream ended early"
    );
    assert!(
        ends_within(&mut by_token, Duration::from_secs(6)),
        "a stream outlived its token"
    );

    // A revoked operator is refused everywhere at once.
    assert!(output(floto(&bob).args(["devices", "--json"]))
        .status
        .success());
    assert!(
        by_cert.try_wait().unwrap().is_none(),
        "the stream ended early"
    );
    run(Command::new(floto_e2e::bin("floto-vpn-server"))
        .args(["operator", "revoke", "bob", "--data-dir"])
        .arg(server.data_dir()));
    assert!(
        ends_within(&mut by_cert, Duration::from_secs(3)),
        "an event stream outlived its operator's revocation"
    );
    let refused = output(floto(&bob).args(["devices"]));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{refused:?}"
    );
    let local = server.admin(&["operator", "revoke", "admin"]);
    assert!(
        !local.status.success(),
        "the local admin must not be revocable"
    );
    let listed = server.admin(&["operator", "list", "--json"]);
    let ops: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let bob_row = ops.iter().find(|o| o["name"] == "bob").unwrap();
    assert!(bob_row["revoked_at"].is_string());

    // The audit log has all of it, newest first, and filters.
    let all = audit(&server, &[]);
    let acts = actions(&all);
    for want in [
        "operator.added",
        "operator.login",
        "operator.revoked",
        "broker.refused",
    ] {
        assert!(acts.iter().any(|a| a == want), "no {want} in {acts:?}");
    }
    let ats: Vec<&str> = all.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {ats:?}"
    );
    let by_viewer = audit(&server, &["--operator", "prometheus"]);
    assert!(!by_viewer.is_empty());
    assert!(by_viewer.iter().all(|e| e["actor"] == "prometheus"));
    let refusal = by_viewer
        .iter()
        .find(|e| e["action"] == "broker.refused" && e["detail"]["repeated"].is_null())
        .unwrap();
    assert_eq!(refusal["detail"]["result"], "forbidden");
    assert_eq!(refusal["detail"]["via"], "connect");
    assert!(audit(&server, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert_eq!(audit(&server, &["--since", "1h"]).len(), all.len());
    let bad = server.admin(&["audit", "--since", "yesterday-ish"]);
    assert!(!bad.status.success());
}

/// An enrolled wireguard-go device with sshd, and an admin and an operator logged in.
struct Live {
    server: Server,
    device: WgGoDevice,
    dirs: tempfile::TempDir,
    key: std::path::PathBuf,
}

fn live() -> Live {
    live_with(&[])
}

/// [`live`] with more server flags.
fn live_with(flags: &[&str]) -> Live {
    require_root();
    require(&["wireguard-go", "wg", "sshd", "ssh", "ping", "curl"]);
    let ns = Netns::new();
    let host = ns.host_ip().to_string();
    let mut args = vec!["--tls-name", host.as_str()];
    args.extend_from_slice(flags);
    let server = Server::start(&args);
    let pkey = server.create_key("lab", None);
    let mut device = WgGoDevice::enroll(ns, &server, &pkey);
    device.set_keepalive(2);
    device.up();
    let dirs = tempfile::tempdir().unwrap();
    let (key, public) = client_key(dirs.path());
    device.start_sshd(&public);
    server.login_operator("alice", "admin", &[], &dirs.path().join("alice"));
    server.login_operator("bob", "operator", &["lab"], &dirs.path().join("bob"));
    server.wait_online(&device.uuid, true, Duration::from_secs(30));
    Live {
        server,
        device,
        dirs,
        key,
    }
}

/// A `floto ssh UUID -- sleep 120` left running.
fn long_session(l: &Live, who: &str) -> Child {
    long_sessions(l, who, 1)
}

/// A `floto ssh UUID -- sleep 120` left running, once the broker has `open` sessions.
fn long_sessions(l: &Live, who: &str, open: usize) -> Child {
    let mut cmd = floto(&l.dirs.path().join(who));
    cmd.args(["ssh", &l.device.uuid, "--"])
        .args(ssh_opts(&l.key))
        .args(["sleep", "120"]);
    let child = Child::spawn(&format!("ssh-{who}"), cmd, l.dirs.path());
    wait_for(
        Duration::from_secs(20),
        "the broker session to open",
        || {
            let m = l.server.metrics();
            (metric(&m, "floto_broker_sessions_active").unwrap_or(0.0) >= open as f64).then_some(())
        },
    );
    child
}

/// Waits for a process to exit; returns how long it took.
fn exits_within(child: &mut Child, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_for(limit, &format!("{} to exit", child.name), || {
        child.inner.try_wait().ok().flatten()
    });
    start.elapsed()
}

#[test]
fn one_operator_or_one_device_cannot_take_every_broker_session() {
    let l = live_with(&[
        "--max-sessions-per-operator",
        "2",
        "--max-sessions-per-device",
        "3",
    ]);
    let refused = |who: &str| {
        let out = output(floto(&l.dirs.path().join(who)).args(["proxy", &l.device.uuid, "22"]));
        assert!(!out.status.success(), "{who}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let _bob1 = long_sessions(&l, "bob", 1);
    let _bob2 = long_sessions(&l, "bob", 2);
    // Bob has all his places...
    let err = refused("bob");
    assert!(err.contains("--max-sessions-per-operator"), "{err}");
    // ...which leaves alice hers, until the device's are taken.
    let _alice1 = long_sessions(&l, "alice", 3);
    let err = refused("alice");
    assert!(err.contains("--max-sessions-per-device"), "{err}");
    let m = l.server.metrics();
    assert_eq!(
        metric(&m, "floto_broker_sessions_total{result=\"operator_limit\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "floto_broker_sessions_total{result=\"device_limit\"}"),
        Some(1.0)
    );
}

#[test]
fn revoking_an_operator_closes_its_live_session() {
    let l = live();
    let mut ssh = long_session(&l, "bob");
    // The session's start is on record while it runs (a crash now would still leave it).
    let started = audit(&l.server, &["--operator", "bob"])
        .into_iter()
        .find(|e| e["action"] == "broker.started")
        .expect("no broker.started record for the open session");
    assert_eq!(started["detail"]["port"], 22);
    run(Command::new(floto_e2e::bin("floto-vpn-server"))
        .args(["operator", "revoke", "bob", "--data-dir"])
        .arg(l.server.data_dir()));
    let took = exits_within(&mut ssh, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "bob's session lived {took:?} after revocation"
    );
    let again = output(floto(&l.dirs.path().join("bob")).args(["proxy", &l.device.uuid, "22"]));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("revoked"),
        "{again:?}"
    );
    // The session's audit record ends as cancelled; alice is unaffected.
    wait_for(Duration::from_secs(5), "the session's audit record", || {
        audit(&l.server, &["--operator", "bob"])
            .iter()
            .any(|e| {
                e["action"] == "broker.session"
                    && e["detail"]["result"] == "cancelled"
                    && e["detail"]["session"] == started["detail"]["session"]
            })
            .then_some(())
    });
    let out = output(
        floto(&l.dirs.path().join("alice"))
            .args(["ssh", &l.device.uuid, "--"])
            .args(ssh_opts(&l.key))
            .args(["echo", "still-here"]),
    );
    assert_eq!(stdout(&out), "still-here");
}

#[test]
fn revoking_a_device_drops_its_tunnel_its_sessions_and_its_certificate_at_once() {
    let l = live();
    let logs = tempfile::tempdir().unwrap();
    let target = Ipv4Addr::new(10, 240, 0, 1);
    let ping = Ping::start(
        &l.device.ns,
        target,
        Duration::from_millis(100),
        logs.path(),
    );
    let mut ssh = long_session(&l, "alice");
    std::thread::sleep(Duration::from_millis(500));
    let revoked_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let out = l.server.admin(&["device", "revoke", &l.device.uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = exits_within(&mut ssh, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "the ssh session lived {took:?} after revocation"
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = ping.stop();
    let last = report.last_reply.expect("pings before the revocation");
    assert!(
        last - revoked_at < 1.0,
        "the tunnel still answered {:.2} s after revocation",
        last - revoked_at
    );
    // Its certificate is refused.
    let state = l.device.state_dir();
    let (s, b) = curl(&l.server, "POST", "/v1/renew")
        .client_cert(state.join("device.pem"), state.join("device.key"))
        .body(r#"{"csr_pem":"x"}"#)
        .send();
    assert_error(s, &b, 403, "revoked", "was revoked");
    let d = l.server.device(&l.device.uuid);
    assert!(d["revoked_at"].is_string());
    assert_eq!(d["online"], false);
    let m = l.server.metrics();
    assert_eq!(metric(&m, "floto_devices_enrolled"), Some(0.0));
    assert_eq!(metric(&m, "floto_devices_online"), Some(0.0));
    assert!(actions(&audit(&l.server, &["--device", &l.device.uuid]))
        .iter()
        .any(|a| a == "device.revoked"));
}

#[test]
fn metrics_and_events_follow_the_devices() {
    require_root();
    require(&["wireguard-go", "wg", "curl", "promtool"]);
    let nss = [Netns::new(), Netns::new(), Netns::new()];
    let names: Vec<String> = nss.iter().map(|n| n.host_ip().to_string()).collect();
    let server = Server::start(&["--tls-name", &names.join(","), "--online-window", "6s"]);
    let pkey = server.create_key("lab", None);
    let out = server.admin(&["operator", "add", "api", "--role", "viewer"]);
    let viewer = last_line(&out);
    let logs = tempfile::tempdir().unwrap();
    let events_cmd = |extra: &[&str]| {
        let mut c = Command::new("curl");
        c.args(["-sS", "-N", "--cacert"])
            .arg(server.ca_path())
            .args(["-H", &format!("Authorization: Bearer {viewer}")])
            .args(extra)
            .arg(format!("{}/v1/events", server.local_url()));
        c
    };
    let stream = Child::spawn("events", events_cmd(&[]), logs.path());
    let mut devices: Vec<WgGoDevice> = nss
        .into_iter()
        .map(|ns| WgGoDevice::enroll(ns, &server, &pkey))
        .collect();
    for d in &mut devices {
        d.set_keepalive(2);
        d.up();
    }
    for d in &devices {
        server.wait_online(&d.uuid, true, Duration::from_secs(30));
    }
    let m = server.metrics();
    assert_eq!(
        metric(&m, "floto_devices_online"),
        Some(3.0),
        "three devices are connected"
    );
    assert_eq!(metric(&m, "floto_devices_enrolled"), Some(3.0));
    // One goes away: after the online window the metric and the events say so.
    let gone = devices.pop().unwrap();
    let gone_uuid = gone.uuid.clone();
    drop(gone);
    server.wait_online(&gone_uuid, false, Duration::from_secs(20));
    let m = server.metrics();
    assert_eq!(
        metric(&m, "floto_devices_online"),
        Some(2.0),
        "two devices are connected"
    );
    let log = wait_for(Duration::from_secs(5), "the offline event", || {
        let log = stream.log();
        log.contains("event: offline").then_some(log)
    });
    let events: Vec<(u64, Value)> = parse_sse(&log);
    let onlines: Vec<&Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["kind"] == "online")
        .collect();
    assert_eq!(onlines.len(), 3, "{log}");
    let offline = events.iter().find(|(_, e)| e["kind"] == "offline").unwrap();
    assert_eq!(offline.1["uuid"], gone_uuid.as_str());
    assert_eq!(
        offline.1["generation"], 2,
        "online was generation 1, offline 2"
    );
    assert_eq!(offline.1["fleet"], "lab");
    assert!(events.windows(2).all(|w| w[1].0 > w[0].0), "ids grow");

    // Reconnecting with Last-Event-ID gets exactly what came after that event.
    let first = events[0].0;
    // (curl ends the stream after 2 s with status 28: that is the point.)
    let replay = output(&mut events_cmd(&[
        "--max-time",
        "2",
        "-H",
        &format!("Last-Event-ID: {first}"),
    ]));
    let replayed = parse_sse(&String::from_utf8_lossy(&replay.stdout));
    let want: Vec<u64> = events
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| *id > first)
        .collect();
    let got: Vec<u64> = replayed.iter().map(|(id, _)| *id).collect();
    assert_eq!(got, want);

    // And the metrics stay valid for Prometheus' checker.
    let file = logs.path().join("metrics.txt");
    std::fs::write(&file, server.metrics()).unwrap();
    let check = output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display())),
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// `GET /v1/events` streamed by curl, running.
fn events_stream(server: &Server, auth: &[&str]) -> std::process::Child {
    Command::new("curl")
        .args(["-sSN", "--cacert"])
        .arg(server.ca_path())
        .args(auth)
        .arg(format!("{}/v1/events", server.local_url()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("curl")
}

/// Whether `child` exits within `limit` (it is killed if not).
fn ends_within(child: &mut std::process::Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// A QUIC broker connection carries its operator's identity for its whole life: every
/// stream is checked again, revoking the operator closes the connection at once, and the
/// connection ends when the certificate it was made with expires.
#[test]
fn a_quic_connection_lives_no_longer_than_its_operator() {
    use floto_client::broker::{BrokerError, BrokerTarget, QuicBroker};
    use floto_proto::ErrorCode;

    let server = Server::start(&["--operator-cert-lifetime", "30s"]);
    let dirs = tempfile::tempdir().unwrap();
    let (eve, frank) = (dirs.path().join("eve"), dirs.path().join("frank"));
    server.login_operator("eve", "operator", &["lab"], &eve);
    server.login_operator("frank", "operator", &["lab"], &frank);
    let logged_in = Instant::now();
    let target = |dir: &std::path::Path| BrokerTarget {
        host: "127.0.0.1".into(),
        api_port: server.bound.api.port(),
        quic_port: server.bound.quic.port(),
        ca_pem: std::fs::read_to_string(server.ca_path()).unwrap(),
        identity: floto_client::Identity {
            cert_pem: std::fs::read_to_string(dir.join("operator.pem")).unwrap(),
            key_pem: std::fs::read_to_string(dir.join("operator.key")).unwrap(),
        },
    };
    let refusal = |r: Result<floto_client::broker::BrokerStream, BrokerError>| match r {
        Err(BrokerError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // A device nobody has: a stream the broker answers after checking its operator.
    let nowhere = "11111111-2222-4333-8444-555555555555";
    floto_client::tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let eve_conn = QuicBroker::connect(&target(&eve), None).await.unwrap();
        let frank_conn = QuicBroker::connect(&target(&frank), None).await.unwrap();
        for conn in [&eve_conn, &frank_conn] {
            let e = refusal(conn.open(nowhere, 22).await);
            assert_eq!(e.error, ErrorCode::NotFound, "{e:?}");
        }

        // Revoking eve closes her connection by itself, and nothing more opens on it.
        let revoked = tokio::task::block_in_place(|| server.admin(&["operator", "revoke", "eve"]));
        assert!(revoked.status.success());
        let why = tokio::time::timeout(Duration::from_secs(3), eve_conn.closed())
            .await
            .expect("eve's connection outlived her revocation");
        match why {
            BrokerError::Refused(e) => assert_eq!(e.error, ErrorCode::Revoked, "{e:?}"),
            other => panic!("closed without the reason: {other:?}"),
        }
        assert!(eve_conn.open(nowhere, 22).await.is_err());

        // Frank's goes on, until the certificate it was made with expires.
        let e = refusal(frank_conn.open(nowhere, 22).await);
        assert_eq!(e.error, ErrorCode::NotFound, "{e:?}");
        let why = tokio::time::timeout(Duration::from_secs(45), frank_conn.closed())
            .await
            .expect("frank's connection outlived his certificate");
        assert!(
            logged_in.elapsed() >= Duration::from_secs(25),
            "closed too early: {:?} after login ({why:?})",
            logged_in.elapsed()
        );
        match why {
            BrokerError::Refused(e) => {
                assert_eq!(e.error, ErrorCode::Unauthorized, "{e:?}");
                assert!(e.message.contains("expired"), "{e:?}");
            }
            other => panic!("closed without the reason: {other:?}"),
        }
    });
}
