//! Several server nodes on one PostgreSQL (a throwaway server started here, as the
//! `postgres` user): what one node commits reaches the others through the change feed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use floto_e2e::api::parse_sse;
use floto_e2e::device::{client_key, WgGoDevice};
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::Server;
use floto_e2e::{
    floto, last_line, output, require, require_root, run, ssh_opts, stdout, wait_for, Child,
};
use floto_pgtest::Postgres;

/// A node-link request for a device no node holds.
const UNHELD: &[u8] =
    b"{\"device\":\"00000000-1111-4222-8333-444444444444\",\"port\":22,\"operator\":\"x\",\"session\":1}\n";

/// Connects to the node link of the node on loopback `port` with a client certificate,
/// sends `header` on a stream, and returns the node's answer line, or the reason it closed
/// the connection with.
fn node_link(cert: &Path, key: &Path, ca: &Path, port: u16, header: &[u8]) -> String {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
        let chain = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        tls.alpn_protocols = vec![b"floto-node/1".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                "127.0.0.1",
            )
            .unwrap()
            .await
            .expect("the TLS handshake itself succeeds: the refusal comes after it");
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let _ = send.write_all(header).await;
            let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(4096));
            if let Ok(Ok(bytes)) = answer.await {
                if !bytes.is_empty() {
                    return format!("answer: {}", String::from_utf8_lossy(&bytes));
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                format!("closed: {}", String::from_utf8_lossy(&close.reason))
            }
            other => format!("neither answered nor closed: {other:?}"),
        }
    })
}

/// Brings up a device enrolled through node `enrolled_on` with its WireGuard endpoint moved
/// to node `served_by` (nodes on one host differ by port only).
fn up_through(device: &mut WgGoDevice, enrolled_on: &Server, served_by: &Server) {
    let conf = run(device
        .ns
        .command(floto_e2e::bin("floto-tunnel"))
        .args(["wg-config", "--state-dir"])
        .arg(device.state_dir()));
    let (from, to) = (
        format!(":{}\n", enrolled_on.bound.wg.port()),
        format!(":{}\n", served_by.bound.wg.port()),
    );
    let text = String::from_utf8_lossy(&conf.stdout);
    assert!(text.contains(&from), "{text}");
    device.up_with(&text.replace(&from, &to));
}

/// `GET /v1/events` of `server` streamed by curl, with `bearer`, and `extra` curl flags.
fn events_curl(server: &Server, bearer: &str, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "-N", "--cacert"])
        .arg(server.ca_path())
        .args(["-H", &format!("Authorization: Bearer {bearer}")])
        .args(extra)
        .arg(format!("{}/v1/events", server.local_url()));
    c
}

/// The events of a takeover, once a stream has all of them: for every device, online at
/// node `a`, offline at `a` (its node lost) and online again at `b` or `c`, with growing
/// generations.
fn takeover_story(events: &[(u64, serde_json::Value)], devices: &[WgGoDevice]) -> Option<()> {
    for d in devices {
        let mine: Vec<&serde_json::Value> = events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e["uuid"] == d.uuid.as_str())
            .collect();
        let at = |kind: &str, node: &dyn Fn(&str) -> bool| {
            mine.iter()
                .position(|e| e["kind"] == kind && node(e["node"].as_str().unwrap_or("")))
        };
        let up = at("online", &|n| n == "a")?;
        let down = at("offline", &|n| n == "a")?;
        let back = at("online", &|n| n == "b" || n == "c")?;
        assert!(up < down && down < back, "out of order: {mine:?}");
        let g = |i: usize| mine[i]["generation"].as_u64().unwrap();
        assert!(
            g(up) < g(down) && g(down) < g(back),
            "generations: {mine:?}"
        );
    }
    Some(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A device enrolled through node B and served by node A (A learns of it only from the
/// feed); revoked through B, its tunnel on A stops within a second.
#[test]
fn two_nodes_on_one_postgres_apply_each_others_changes() {
    require_root();
    require(&[
        "wireguard-go",
        "wg",
        "ping",
        "ip",
        "cp",
        "sshd",
        "ssh",
        "ssh-keygen",
    ]);
    let pg = Postgres::start();
    let url = pg.create_database("floto");
    let ns = Netns::new();
    let tls = ns.host_ip().to_string();
    let args = |name: &'static str| {
        [
            "--database-url",
            url.as_str(),
            "--tls-name",
            tls.as_str(),
            "--node-name",
            name,
            "--node-address",
            "127.0.0.1",
        ]
    };
    let a = Server::start(&args("a"));
    let b = a.start_joining(&args("b"));

    // A key made on A enrolls a device through B.
    let key = a.create_key("lab", None);
    let mut device = WgGoDevice::enroll(ns, &b, &key);
    assert_eq!(b.device(&device.uuid)["fleet"], "lab");
    // The device is configured for B's WireGuard port; point it at A's.
    up_through(&mut device, &b, &a);
    a.wait_online(&device.uuid, true, Duration::from_secs(20));

    // An operator logged in on B reaches the device A holds: B authorizes and audits, A
    // dials the device, over the node link (real OpenSSH, real sshd).
    let operator = tempfile::tempdir().unwrap();
    let (ssh_key, public) = client_key(operator.path());
    device.start_sshd(&public);
    let cfg = operator.path().join("cfg");
    b.login_operator("alice", "admin", &[], &cfg);
    wait_for(
        Duration::from_secs(5),
        "B to see the device held by A",
        || (b.device(&device.uuid)["node"] == "a").then_some(()),
    );
    for transport in ["quic", "connect"] {
        let out = output(
            floto(&cfg)
                .args(["--transport", transport, "ssh", &device.uuid, "--"])
                .args(ssh_opts(&ssh_key))
                .args(["echo", "held-by-a"]),
        );
        assert_eq!(
            stdout(&out),
            "held-by-a",
            "floto ssh over {transport} through B: {}\nB: {}",
            String::from_utf8_lossy(&out.stderr),
            b.child.log()
        );
    }
    assert!(
        a.child.log().contains("dialling for another node"),
        "A dialled the device for B"
    );
    // A node certificate is no operator credential...
    let forged = operator.path().join("forged");
    run(std::process::Command::new("cp")
        .arg("-a")
        .arg(&cfg)
        .arg(&forged));
    std::fs::copy(b.data_dir().join("node.pem"), forged.join("operator.pem")).unwrap();
    std::fs::copy(b.data_dir().join("node.key"), forged.join("operator.key")).unwrap();
    for transport in ["quic", "connect"] {
        let out =
            output(floto(&forged).args(["--transport", transport, "proxy", &device.uuid, "22"]));
        assert!(!out.status.success(), "{transport}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not an operator"), "{transport}: {err}");
    }
    // ...and an operator's certificate is no node credential on the node link.
    let refused = node_link(
        &cfg.join("operator.pem"),
        &cfg.join("operator.key"),
        &a.ca_path(),
        a.bound.quic.port(),
        UNHELD,
    );
    assert!(
        refused.starts_with("closed:") && refused.contains("node certificates only"),
        "{refused}"
    );
    // With B's node certificate: a device A does not hold is refused (the loop guard), and
    // so is a header that is not a request, each with its reason; A goes on serving.
    let as_b = |header: &[u8]| {
        node_link(
            &b.data_dir().join("node.pem"),
            &b.data_dir().join("node.key"),
            &a.ca_path(),
            a.bound.quic.port(),
            header,
        )
    };
    let unheld = as_b(UNHELD);
    assert!(
        unheld.starts_with("answer:") && unheld.contains("not held by this node"),
        "{unheld}"
    );
    for garbage in [&b"not json\n"[..], b"{\"device\":\"x\"}\n", &[b'a'; 5000]] {
        let answer = as_b(garbage);
        assert!(
            answer.starts_with("answer:") && answer.contains("bad_request"),
            "{answer}"
        );
    }
    let out = output(
        floto(&cfg)
            .args(["ssh", &device.uuid, "--"])
            .args(ssh_opts(&ssh_key))
            .args(["echo", "still-served"]),
    );
    assert_eq!(stdout(&out), "still-served", "{out:?}");

    let logs = tempfile::tempdir().unwrap();
    let ping = Ping::start(
        &device.ns,
        Ipv4Addr::new(10, 240, 0, 1),
        Duration::from_millis(100),
        logs.path(),
    );
    std::thread::sleep(Duration::from_millis(800));
    let revoked_at = unix_now();
    let out = b.admin(&["device", "revoke", &device.uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = ping.stop();
    let last = report
        .last_reply
        .expect("replies through node A before the revocation");
    assert!(
        last - revoked_at < 1.0,
        "node A still served the device {:.2} s after node B revoked it\n{}",
        last - revoked_at,
        a.child.log()
    );
    let on_a = a.device(&device.uuid);
    assert_eq!(on_a["online"], false, "{on_a}");
    assert!(on_a["revoked_at"].is_string(), "{on_a}");
    // Both nodes decided on one registry: the key's use and the device row are shared.
    wait_for(Duration::from_secs(5), "the device in A's list", || {
        let out = a.admin(&["device", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .any(|d| d["uuid"] == device.uuid.as_str())
            .then_some(())
    });
}

/// Three nodes; devices held by node A. A is killed with SIGKILL: its devices come back on
/// B and C by themselves (lease expiry, takeover, call-back) within 15 s, pass traffic, and
/// the cluster counts each device once. The event streams of B and C are the same stream
/// (same numbers, same events: each device's session at A ended, then came up at B or C),
/// and a reader can move between nodes with its `Last-Event-ID`. A restarted A joins again
/// and serves a device, and no device is counted twice.
#[test]
fn a_killed_nodes_devices_come_back_on_the_others() {
    require_root();
    require(&["wireguard-go", "wg", "ping", "ip", "cp"]);
    let pg = Postgres::start();
    let url = pg.create_database("floto");
    let mut nss: Vec<Netns> = (0..4).map(|_| Netns::new()).collect();
    let names = nss
        .iter()
        .map(|ns| ns.host_ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    // The fourth device comes after A's restart.
    let later = nss.pop().unwrap();
    let args = |name: &'static str| {
        [
            "--database-url",
            url.as_str(),
            "--tls-name",
            names.as_str(),
            "--online-window",
            "10s",
            "--node-name",
            name,
        ]
    };
    let mut a = Server::start(&args("a"));
    let b = a.start_joining(&args("b"));
    let c = a.start_joining(&args("c"));
    let key = a.create_key("lab", None);
    let mut devices: Vec<WgGoDevice> = nss
        .into_iter()
        .map(|ns| WgGoDevice::enroll(ns, &a, &key))
        .collect();
    for d in &mut devices {
        d.set_keepalive(2);
        d.up();
    }
    for d in &devices {
        a.wait_online(&d.uuid, true, Duration::from_secs(20));
        // The other nodes see it online too, held by A.
        let seen = b.wait_online(&d.uuid, true, Duration::from_secs(10));
        assert_eq!(seen["node"], "a", "{seen}");
    }
    let cluster_online =
        |s: &Server| floto_e2e::server::metric(&s.metrics(), "floto_cluster_devices_online");
    wait_for(Duration::from_secs(10), "the cluster count on B", || {
        (cluster_online(&b) == Some(3.0)).then_some(())
    });
    // The event streams of B and C, which see A's devices come and go.
    let viewer = last_line(&a.admin(&["operator", "add", "watcher", "--role", "viewer"]));
    let logs = tempfile::tempdir().unwrap();
    let on_b = Child::spawn("events-b", events_curl(&b, &viewer, &[]), logs.path());
    let on_c = Child::spawn("events-c", events_curl(&c, &viewer, &[]), logs.path());

    let held =
        |s: &Server| floto_e2e::server::metric(&s.metrics(), "floto_devices_online").unwrap_or(0.0);
    let killed = std::time::Instant::now();
    a.kill();
    wait_for(
        Duration::from_secs(30),
        "the devices held by B and C",
        || (held(&b) + held(&c) == 3.0).then_some(()),
    );
    let took = killed.elapsed();
    eprintln!(
        "takeover of {} devices: {took:?} after SIGKILL",
        devices.len()
    );
    assert!(
        took < Duration::from_secs(15),
        "the devices took {took:?} to come back\nB: {}\nC: {}",
        b.child.log(),
        c.child.log()
    );
    // They pass traffic through their new nodes.
    for d in &devices {
        run(d
            .ns
            .command("ping")
            .args(["-c", "1", "-W", "2", "10.240.0.1"]));
    }
    // Each device is held by exactly one node, and every node's view says which (session
    // rows are written within a second of a change).
    assert_eq!(
        held(&b) + held(&c),
        3.0,
        "every device held by exactly one node"
    );
    for d in &devices {
        wait_for(Duration::from_secs(5), "C's view of the device", || {
            let v = c.device(&d.uuid);
            (v["online"] == true && (v["node"] == "b" || v["node"] == "c")).then_some(())
        });
    }
    // The cluster counts each device once: the node list (read from the database) and
    // the metric every node exports.
    wait_for(
        Duration::from_secs(10),
        "the node list after the takeover",
        || {
            let out = b.admin(&["node", "list", "--json"]);
            let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let nodes = nodes.as_array()?;
            let alive: Vec<&serde_json::Value> =
                nodes.iter().filter(|n| n["alive"] == true).collect();
            let held: u64 = alive.iter().filter_map(|n| n["devices"].as_u64()).sum();
            let dead_held: u64 = nodes
                .iter()
                .filter(|n| n["alive"] == false)
                .filter_map(|n| n["devices"].as_u64())
                .sum();
            (alive.len() == 2 && held == 3 && dead_held == 0).then_some(())
        },
    );
    wait_for(Duration::from_secs(10), "exact cluster counts", || {
        (cluster_online(&b) == Some(3.0) && cluster_online(&c) == Some(3.0)).then_some(())
    });

    // Every node tells the same story, numbered the same: each device online at A, offline
    // when A's lease ran out, online again at B or C.
    let (b_events, c_events) = wait_for(
        Duration::from_secs(10),
        "the takeover in both event streams",
        || {
            let (eb, ec) = (parse_sse(&on_b.log()), parse_sse(&on_c.log()));
            takeover_story(&eb, &devices)?;
            takeover_story(&ec, &devices)?;
            (eb.len() == ec.len()).then_some((eb, ec))
        },
    );
    assert_eq!(b_events, c_events, "the nodes' event streams differ");
    // A reader that moves from B to C with its Last-Event-ID misses nothing and repeats
    // nothing (curl ends the stream after 2 s with status 28: that is the point).
    let first = b_events[0].0;
    let replay = output(&mut events_curl(
        &c,
        &viewer,
        &["--max-time", "2", "-H", &format!("Last-Event-ID: {first}")],
    ));
    let replayed = parse_sse(&String::from_utf8_lossy(&replay.stdout));
    assert_eq!(replayed[..b_events.len() - 1], b_events[1..]);

    // A comes back: it joins under a new id, serves a device again, and no device is
    // counted twice.
    a.start_again();
    let mut fourth = WgGoDevice::enroll(later, &a, &key);
    fourth.set_keepalive(2);
    fourth.up();
    let seen = c.wait_online(&fourth.uuid, true, Duration::from_secs(20));
    assert_eq!(seen["node"], "a", "{seen}");
    run(fourth
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.240.0.1"]));
    wait_for(Duration::from_secs(10), "exact counts with A back", || {
        let counted = [&a, &b, &c].map(cluster_online);
        (counted.iter().all(|n| *n == Some(4.0)) && held(&a) + held(&b) + held(&c) == 4.0)
            .then_some(())
    });
    let out = c.admin(&["node", "list", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alive: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(alive.len(), 3, "{nodes}");
    assert!(["a", "b", "c"].iter().all(|n| alive.contains(n)), "{nodes}");
}

/// PostgreSQL crashes and comes back under two running nodes: the devices' traffic never
/// stops, both nodes fence themselves within their lease while the database is gone, and
/// serve again when it returns; a device enrolled through one node afterwards is served by
/// the other (the feed resumes after the listener reconnects).
#[test]
fn postgres_restarted_under_the_nodes() {
    require_root();
    require(&["wireguard-go", "wg", "ping", "ip", "cp"]);
    let mut pg = Postgres::start();
    let url = pg.create_database("floto");
    let (ns1, ns2) = (Netns::new(), Netns::new());
    let names = format!("{},{}", ns1.host_ip(), ns2.host_ip());
    let args = |name: &'static str| {
        [
            "--database-url",
            url.as_str(),
            "--tls-name",
            names.as_str(),
            "--node-name",
            name,
        ]
    };
    let a = Server::start(&args("a"));
    let b = a.start_joining(&args("b"));
    let key = a.create_key("lab", None);
    let mut first = WgGoDevice::enroll(ns1, &a, &key);
    first.set_keepalive(2);
    first.up();
    a.wait_online(&first.uuid, true, Duration::from_secs(20));
    let logs = tempfile::tempdir().unwrap();
    let ping = Ping::start(
        &first.ns,
        Ipv4Addr::new(10, 240, 0, 1),
        Duration::from_millis(100),
        logs.path(),
    );
    std::thread::sleep(Duration::from_secs(1));

    let crashed = std::time::Instant::now();
    pg.kill();
    let ready = |s: &Server| floto_e2e::server::http_get(s.bound.metrics, "/readyz");
    for s in [&a, &b] {
        wait_for(Duration::from_secs(15), "the node to fence itself", || {
            ready(s).contains("fenced").then_some(())
        });
    }
    let fenced = crashed.elapsed();
    eprintln!("both nodes fenced {fenced:?} after PostgreSQL went away");
    assert!(
        fenced < Duration::from_secs(10),
        "fencing took {fenced:?} (lease 7 s)"
    );
    std::thread::sleep(Duration::from_secs(2));
    pg.restart();
    for s in [&a, &b] {
        wait_for(Duration::from_secs(20), "the node to serve again", || {
            ready(s).starts_with("ready").then_some(())
        });
    }
    let report = ping.stop();
    assert!(
        report.max_gap < Duration::from_secs(1),
        "the device's traffic stopped for {:?} while the database was away",
        report.max_gap
    );
    // A change made after the database returned reaches the other node.
    let mut second = WgGoDevice::enroll(ns2, &b, &key);
    up_through(&mut second, &b, &a);
    a.wait_online(&second.uuid, true, Duration::from_secs(20));
    // And the first device is still held by exactly one node, under A's new lease.
    wait_for(
        Duration::from_secs(10),
        "the sessions written again",
        || {
            let v = b.device(&first.uuid);
            (v["online"] == true && v["node"] == "a").then_some(())
        },
    );
}

/// From one node to two: a single node's registry is copied into PostgreSQL with
/// `migrate-registry`, and its device, never enrolled again, is served by the cluster.
#[test]
fn a_single_nodes_registry_moves_to_the_cluster_without_reenrolling() {
    require_root();
    require(&["wireguard-go", "wg", "ping", "ip", "cp"]);
    let pg = Postgres::start();
    let url = pg.create_database("floto");
    let ns = Netns::new();
    let tls = ns.host_ip().to_string();
    let mut single = Server::start(&["--tls-name", &tls]);
    let key = single.create_key("lab", None);
    let mut device = WgGoDevice::enroll(ns, &single, &key);
    device.set_keepalive(2);
    device.up();
    single.wait_online(&device.uuid, true, Duration::from_secs(20));
    let before = single.device(&device.uuid);

    // Refused while the node runs: it could write after the copy.
    let out = single.admin(&["migrate-registry", "--to", &url]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{out:?}"
    );
    single.child.terminate(Duration::from_secs(40));
    let out = single.admin(&["migrate-registry", "--to", &url]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("devices"), "{}", stdout(&out));
    // Once only: the database now holds a registry.
    let again = single.admin(&["migrate-registry", "--to", &url]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{again:?}"
    );

    let args = |name: &'static str| {
        [
            "--database-url",
            url.as_str(),
            "--tls-name",
            tls.as_str(),
            "--node-name",
            name,
            "--node-address",
            "127.0.0.1",
        ]
    };
    let a = single.start_joining(&args("a"));
    let b = single.start_joining(&args("b"));
    // The nodes call back the devices nobody holds (as a restarted single node does), so
    // the device is served again without being touched.
    let after = wait_for(
        Duration::from_secs(20),
        "the device online in the cluster",
        || {
            let v = a.device(&device.uuid);
            (v["online"] == true).then_some(v)
        },
    );
    for field in ["overlay_ip", "wg_public_key", "cert_serial", "fleet"] {
        assert_eq!(before[field], after[field], "{field}");
    }
    // Both nodes may call it back at once while the second joins; within a couple of
    // seconds one holds it (the other's claim with an older session is refused and it lets
    // its session go), and both views say which.
    wait_for(Duration::from_secs(10), "one holder in both views", || {
        let (on_a, on_b) = (a.device(&device.uuid), b.device(&device.uuid));
        let holder = on_a["node"].as_str()?.to_owned();
        (on_a["online"] == true
            && on_b["online"] == true
            && on_b["node"] == holder.as_str()
            && (holder == "a" || holder == "b"))
            .then_some(())
    });
}
