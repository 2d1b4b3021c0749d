//! The short soak of the suite: a wireguard-go device pings the server through its first
//! rekey (WireGuard's initiator rekeys 120 s after a handshake). No gap over 2 s. The long
//! version (400 s, two rekeys and the 180 s reject timer, side by side with a wireguard-go
//! server) is `floto-bench soak`; see benches/RESULTS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use floto_e2e::device::WgGoDevice;
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::Server;
use floto_e2e::{output, require, require_root, wait_for};

#[test]
fn a_session_rekeys_without_a_gap() {
    require_root();
    require(&["wireguard-go", "wg", "ping"]);
    let ns = Netns::new();
    let server = Server::start(&["--tls-name", &ns.host_ip().to_string()]);
    let key = server.create_key("lab", None);
    let mut device = WgGoDevice::enroll(ns, &server, &key);
    device.up();
    let target = Ipv4Addr::new(10, 240, 0, 1);
    wait_for(
        Duration::from_secs(20),
        "the device to reach the server",
        || {
            output(
                device
                    .ns
                    .command("ping")
                    .args(["-c", "1", "-W", "1", &target.to_string()]),
            )
            .status
            .success()
            .then_some(())
        },
    );
    let logs = tempfile::tempdir().unwrap();
    let ping = Ping::start(&device.ns, target, Duration::from_millis(200), logs.path());
    let mut handshakes = BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(135) {
        std::thread::sleep(Duration::from_secs(1));
        handshakes.insert(device.latest_handshake());
    }
    let report = ping.stop();
    handshakes.remove(&0);
    assert!(
        handshakes.len() >= 2,
        "the device did not rekey within 135 s: handshakes at {handshakes:?}"
    );
    assert!(
        report.max_gap < Duration::from_secs(2),
        "a gap of {:?} in the pings ({report:?})",
        report.max_gap
    );
    assert!(
        report.received + 3 >= report.sent,
        "pings lost across the rekey: {report:?}"
    );
}
