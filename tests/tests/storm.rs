//! Storms through the real server (short versions of `floto-bench storm`): a thousand
//! simulated devices (boringtun initiators, each with its own key and loopback address,
//! enrolled through the real API) handshake at once and all come online; and under an
//! initiation flood from unknown keys, established devices keep passing traffic while new
//! devices still connect through WireGuard's cookie mechanism.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use floto_e2e::enroll::enroll_devices;
use floto_e2e::fleet::{Fleet, FleetOptions, Flood};
use floto_e2e::server::{metric, Server};
use floto_e2e::wait_for;

fn wg_addr(server: &Server) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.bound.wg.port()))
}

fn server_count(server: &Server, sample: &str) -> f64 {
    metric(&server.metrics(), sample).unwrap_or_else(|| panic!("no {sample} in /metrics"))
}

/// Waits until every device of `fleet` completed a handshake since its last mark.
fn wait_fleet_online(fleet: &Fleet, timeout: Duration, what: &str) -> Duration {
    let start = Instant::now();
    wait_for(timeout, what, || {
        (fleet.online_count() == fleet.len()).then_some(())
    });
    start.elapsed()
}

/// Pings from every device until each has had a reply, or panics naming how many did not.
fn every_device_pings(fleet: &Fleet, timeout: Duration) {
    let start = Instant::now();
    loop {
        let before: Vec<u64> = fleet.pongs();
        fleet.ping_all();
        std::thread::sleep(Duration::from_millis(500));
        let after = fleet.pongs();
        let silent = before.iter().zip(&after).filter(|(b, a)| a <= b).count();
        if silent == 0 {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{silent} of {} devices got no echo reply through the tunnel",
            fleet.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_1000_devices_all_come_online_and_pass_traffic() {
    let server = Server::start_logging(&[], "warn");
    let key = server.create_key("storm", None);
    let enrolled = enroll_devices(&server, &key, 1000, 32).await;
    let fleet = Fleet::new(
        wg_addr(&server),
        enrolled.server_public,
        enrolled.fleet_devices(),
        FleetOptions {
            ping_target: Some(enrolled.server_overlay_ip),
            ..FleetOptions::default()
        },
    )
    .unwrap();
    assert_eq!(server_count(&server, "floto_devices_online"), 0.0);
    fleet.start();
    // Well inside WireGuard's 5 s retry: nobody should need a second attempt.
    let took = wait_fleet_online(&fleet, Duration::from_secs(20), "1000 devices online");
    let c = fleet.counters();
    eprintln!("1000 devices online in {took:?}: {c:?}");
    assert_eq!(c.cookie_replies, 0, "cookies at 1000 handshakes: {c:?}");
    // The server's own count, from authenticated packets only.
    wait_for(
        Duration::from_secs(10),
        "the server to count 1000 online",
        || (server_count(&server, "floto_devices_online") == 1000.0).then_some(()),
    );
    assert_eq!(
        server_count(&server, "floto_handshakes_total{result=\"completed\"}"),
        c.initiations_sent as f64,
        "every initiation answered once"
    );
    // The handshake queue is exported, and empty again.
    assert_eq!(server_count(&server, "floto_handshake_queue"), 0.0);
    assert_eq!(
        server_count(&server, "floto_handshake_queue_wait_seconds"),
        0.0
    );
    every_device_pings(&fleet, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_an_initiation_flood_devices_keep_flowing_and_new_ones_connect_with_cookies() {
    // A low threshold, so the flood puts the server under load at once.
    under_a_flood(&["--handshake-rate-limit", "100"], 20_000).await;
}

/// The default configuration, against a flood faster than the workers could answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_limits_a_fast_flood_is_held_off_by_cookies() {
    under_a_flood(&[], 100_000).await;
}

/// One flood at a time: two floods at once on a 2-core machine starve each other's sender, and
/// a flood below the rate ceiling puts the server under load only in bursts.
static ONE_FLOOD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn under_a_flood(server_args: &[&str], per_second: u32) {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let server = Server::start_logging(server_args, "warn");
    let key = server.create_key("flood", None);
    let established = enroll_devices(&server, &key, 100, 16).await;
    let newcomers = enroll_devices(&server, &key, 50, 16).await;
    let options = FleetOptions {
        ping_target: Some(established.server_overlay_ip),
        ..FleetOptions::default()
    };
    let old = Fleet::new(
        wg_addr(&server),
        established.server_public,
        established.fleet_devices(),
        options.clone(),
    )
    .unwrap();
    old.start();
    wait_fleet_online(&old, Duration::from_secs(15), "established devices online");
    every_device_pings(&old, Duration::from_secs(10));

    // Initiations from 65,536 addresses and 64 unknown keys.
    let flood_started = Instant::now();
    let flood = Flood::start(wg_addr(&server), established.server_public, per_second).unwrap();
    wait_for(
        Duration::from_secs(10),
        "cookie replies to the flood",
        || (flood.cookie_replies.load(Ordering::Relaxed) > 1000).then_some(()),
    );

    // Established sessions: every device still gets echo replies, repeatedly.
    for _ in 0..3 {
        every_device_pings(&old, Duration::from_secs(5));
    }

    // New devices arrive during the flood: the first initiation gets a cookie, the retry
    // (WireGuard's 5 s) carries it and is answered.
    let new = Fleet::new(
        wg_addr(&server),
        newcomers.server_public,
        newcomers.fleet_devices(),
        options,
    )
    .unwrap();
    new.start();
    let took = wait_fleet_online(
        &new,
        Duration::from_secs(25),
        "new devices online under the flood",
    );
    let c = new.counters();
    eprintln!("50 new devices online under the flood in {took:?}: {c:?}");
    assert!(
        c.cookie_replies > 0,
        "new devices got no cookie: the flood did not put the server under load ({c:?})"
    );
    every_device_pings(&new, Duration::from_secs(10));
    every_device_pings(&old, Duration::from_secs(5));

    let sent = flood.sent.load(Ordering::Relaxed);
    let cookies = flood.cookie_replies.load(Ordering::Relaxed);
    assert_eq!(
        flood.responses.load(Ordering::Relaxed),
        0,
        "the server answered an unknown key with a handshake response"
    );
    drop(flood);
    let flood_seconds = flood_started.elapsed().as_secs_f64();
    // Most of the flood was answered by a cookie (cheap), and only what the rate limit
    // admits reached the expensive path.
    let unknown = server_count(&server, "floto_handshakes_total{result=\"unknown_peer\"}");
    eprintln!(
        "flood: {sent} sent in {flood_seconds:.1} s, {cookies} cookie replies, {unknown} decrypted as unknown keys"
    );
    assert!(
        unknown < sent as f64 / 4.0,
        "{unknown} of {sent} flood initiations reached the Diffie-Hellmans"
    );
    // About STRANGER_LIMIT (1,000) failed Diffie-Hellmans a second, whatever the flood's
    // rate: what was queued before a second's failures were counted is answered with
    // cookies from the queue, not worked through (twice the limit allowed for the seconds'
    // edges).
    let limit = 2.0 * 1000.0 * (flood_seconds + 1.0);
    assert!(
        unknown <= limit,
        "{unknown} flood initiations reached a Diffie-Hellman in {flood_seconds:.1} s (at most {limit:.0})"
    );
    assert_eq!(server_count(&server, "floto_devices_online"), 150.0);
}
