//! Hostile and broken input at the real WireGuard socket while a wireguard-go device keeps
//! pinging the server: each kind is dropped and counted in /metrics (checked by promtool),
//! the server answers floods with cookies, and the established session never notices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use floto_e2e::device::WgGoDevice;
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::{metric, Server};
use floto_e2e::{output, require, require_root, stdout, wait_for};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);

fn server_key(server: &Server) -> PublicKey {
    let text = std::fs::read_to_string(server.data_dir().join("wg.key")).unwrap();
    let bytes: [u8; 32] = base64_decode(text.trim()).try_into().unwrap();
    PublicKey::from(&StaticSecret::from(bytes))
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn initiation(tunn: &mut Tunn) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

fn counter(server: &Server, sample: &str) -> f64 {
    metric(&server.metrics(), sample).unwrap_or_else(|| panic!("no {sample} in /metrics"))
}

fn wait_counter_above(server: &Server, sample: &str, floor: f64) {
    wait_for(Duration::from_secs(10), sample, || {
        (counter(server, sample) > floor).then_some(())
    });
}

#[test]
fn hostile_datagrams_are_dropped_counted_and_the_session_never_notices() {
    require_root();
    require(&["wireguard-go", "wg", "ping", "promtool"]);
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    // A low cookie threshold, so one test socket can push the server past it.
    let server = Server::start(&[
        "--tls-name",
        &format!("{},{}", ns_a.host_ip(), ns_b.host_ip()),
        "--handshake-rate-limit",
        "200",
    ]);
    let key = server.create_key("lab", None);
    let mut a = WgGoDevice::enroll(ns_a, &server, &key);
    let mut b = WgGoDevice::enroll(ns_b, &server, &key);
    a.up();
    b.up();
    let logs = tempfile::tempdir().unwrap();
    // The established session under watch for the whole test.
    wait_for(Duration::from_secs(20), "a to reach the server", || {
        output(
            a.ns.command("ping")
                .args(["-c", "1", "-W", "1", &SERVER_IP.to_string()]),
        )
        .status
        .success()
        .then_some(())
    });
    let ping = Ping::start(&a.ns, SERVER_IP, Duration::from_millis(100), logs.path());

    let wg = SocketAddr::from(([127, 0, 0, 1], server.bound.wg.port()));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // 1. Junk and truncated datagrams, and data for receiver indices nobody holds.
    let before = counter(&server, "floto_wg_dropped_total{reason=\"malformed\"}");
    for n in [0usize, 1, 3, 4, 31, 91, 147, 149, 1500] {
        let junk: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
        sock.send_to(&junk, wg).unwrap();
    }
    for kind in [1u8, 2, 3] {
        let mut truncated = vec![kind, 0, 0, 0];
        truncated.extend_from_slice(&[7u8; 40]);
        sock.send_to(&truncated, wg).unwrap();
    }
    wait_counter_above(
        &server,
        "floto_wg_dropped_total{reason=\"malformed\"}",
        before + 9.0,
    );
    for idx in 0..50u32 {
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&(idx * 7919).to_le_bytes());
        data.extend_from_slice(&[0u8; 40]);
        sock.send_to(&data, wg).unwrap();
    }
    wait_counter_above(
        &server,
        "floto_wg_dropped_total{reason=\"unknown_index\"}",
        40.0,
    );

    // 2. A flood of valid initiations from a key that is not enrolled: no answers at first,
    // then cookie replies once the rate limit is hit; never a handshake response.
    let server_public = server_key(&server);
    let mut stranger = Tunn::new(
        StaticSecret::from([42u8; 32]),
        server_public,
        None,
        None,
        1,
        None,
    );
    let mut replies = [0usize; 4];
    for _ in 0..2_000 {
        sock.send_to(&initiation(&mut stranger), wg).unwrap();
    }
    let mut buf = [0u8; 256];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if n >= 1 && (buf[0] as usize) < replies.len() {
            replies[buf[0] as usize] += 1;
        }
    }
    assert_eq!(replies[2], 0, "a handshake response to an unknown key");
    assert!(
        replies[3] > 0,
        "no cookie replies under an initiation flood"
    );
    assert!(counter(&server, "floto_cookie_replies_total") >= replies[3] as f64);
    assert!(counter(&server, "floto_handshakes_total{result=\"unknown_peer\"}") > 0.0);

    // 3. A replayed initiation: made with the device's own key (so it is valid once), sent
    // twice; the second is rejected by its timestamp. Wait out the rate limiter first.
    std::thread::sleep(Duration::from_millis(1100));
    let device_key: [u8; 32] = base64_decode(
        std::fs::read_to_string(a.state_dir().join("wg.key"))
            .unwrap()
            .trim(),
    )
    .try_into()
    .unwrap();
    let mut as_device = Tunn::new(
        StaticSecret::from(device_key),
        server_public,
        None,
        None,
        2,
        None,
    );
    let init = initiation(&mut as_device);
    let rejected_before = counter(&server, "floto_wg_dropped_total{reason=\"rejected\"}");
    sock.send_to(&init, wg).unwrap();
    sock.send_to(&init, wg).unwrap();
    wait_counter_above(
        &server,
        "floto_wg_dropped_total{reason=\"rejected\"}",
        rejected_before,
    );

    // 4. The device sends from an address that is not its own.
    let iface = a.ns.wg_iface();
    a.ns.ip(&["addr", "add", "10.240.200.200/32", "dev", &iface]);
    let spoof = output(a.ns.command("ping").args([
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.240.200.200",
        &SERVER_IP.to_string(),
    ]));
    assert!(!spoof.status.success(), "a spoofed source got an answer");
    wait_counter_above(&server, "floto_wg_dropped_total{reason=\"spoofed\"}", 0.0);

    // 5. Device to device: isolated.
    wait_for(Duration::from_secs(20), "b to reach the server", || {
        output(
            b.ns.command("ping")
                .args(["-c", "1", "-W", "1", &SERVER_IP.to_string()]),
        )
        .status
        .success()
        .then_some(())
    });
    let lateral = output(a.ns.command("ping").args([
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        &b.overlay_ip.to_string(),
    ]));
    assert!(!lateral.status.success(), "device a reached device b");
    wait_counter_above(&server, "floto_wg_dropped_total{reason=\"isolated\"}", 0.0);

    // Through all of it the established session kept answering.
    let report = ping.stop();
    assert!(report.received > 0);
    assert!(
        report.max_gap < Duration::from_secs(2),
        "the established session stalled for {:?} ({report:?})",
        report.max_gap
    );
    assert!(
        report.sent - report.received <= 2,
        "the established session lost pings: {report:?}"
    );
    assert!(server.child.inner.id() > 0);
    let status = output(
        Command::new("kill")
            .arg("-0")
            .arg(server.child.pid().to_string()),
    );
    assert!(status.status.success(), "the server died");

    // The exposition is valid for Prometheus' own checker.
    let metrics_file = logs.path().join("metrics.txt");
    std::fs::write(&metrics_file, server.metrics()).unwrap();
    let check = output(Command::new("sh").arg("-c").arg(format!(
        "promtool check metrics < {}",
        metrics_file.display()
    )));
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        stdout(&check),
        String::from_utf8_lossy(&check.stderr)
    );
}
