//! Soak past WireGuard's rekey and expiry timers (120 s rekey, 180 s reject, 540 s
//! expiry): a wireguard-go device pinging its server continuously, with floto-vpn-server and
//! with a wireguard-go server side by side in the same run. boringtun issue #495 reports
//! 0.7.1 sessions going deaf 15-30 s after a handshake; a deaf session shows here as a gap.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::Serialize;

use floto_e2e::device::{WgGoDevice, WgGoHost};
use floto_e2e::net::Netns;
use floto_e2e::ping::{Ping, PingReport};
use floto_e2e::server::Server;

use crate::report::{self, Machine};

#[derive(Debug, Clone, Copy)]
pub struct Args {
    pub duration: Duration,
    pub interval: Duration,
}

#[derive(Debug, Serialize)]
struct Side {
    server: &'static str,
    seconds: f64,
    ping: PingReport,
    /// Distinct handshake times the device reported while sampling each second.
    handshakes_seen_by_device: usize,
    server_cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: &'static str,
    machine: Machine,
    command: String,
    interval_ms: u64,
    sides: Vec<Side>,
}

pub fn main(args: Args, command: String) -> anyhow::Result<()> {
    floto_e2e::require_root();
    floto_e2e::require(&["wireguard-go", "wg", "ping", "ip"]);
    let logs = tempfile::tempdir()?;

    // floto-vpn-server with a wireguard-go device.
    let ns = Netns::new();
    let server = Server::start_logging(&["--tls-name", &ns.host_ip().to_string()], "warn");
    let key = server.create_key("soak", None);
    let mut ours = WgGoDevice::enroll(ns, &server, &key);
    ours.up();
    let ours_target = Ipv4Addr::new(10, 240, 0, 1);

    // wireguard-go as the server, with a wireguard-go device: the reference.
    let tag = std::process::id() % 250;
    let host = WgGoHost::new(&format!("fwref{tag}"), Ipv4Addr::new(10, 241, tag as u8, 1));
    let mut reference = WgGoDevice::bare(Netns::new());
    let conf = host.add_device(&reference.ns, Ipv4Addr::new(10, 241, tag as u8, 2), 25);
    reference.up_with(&conf);

    let started = Instant::now();
    let cpu_ours = report::cpu_seconds(server.child.pid());
    let cpu_ref = host.pid().map_or(0.0, report::cpu_seconds);
    let ping_ours = Ping::start(&ours.ns, ours_target, args.interval, logs.path());
    let ping_ref = Ping::start(&reference.ns, host.address, args.interval, logs.path());
    let mut seen_ours = std::collections::BTreeSet::new();
    let mut seen_ref = std::collections::BTreeSet::new();
    while started.elapsed() < args.duration {
        std::thread::sleep(Duration::from_secs(1));
        seen_ours.insert(ours.latest_handshake());
        seen_ref.insert(reference.latest_handshake());
        let s = started.elapsed().as_secs();
        if s.is_multiple_of(30) {
            eprintln!("{s} s ...");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let sides = vec![
        Side {
            server: "floto-vpn-server (boringtun)",
            seconds,
            ping: ping_ours.stop(),
            handshakes_seen_by_device: seen_ours.iter().filter(|t| **t > 0).count(),
            server_cpu_seconds: report::cpu_seconds(server.child.pid()) - cpu_ours,
        },
        Side {
            server: "wireguard-go",
            seconds,
            ping: ping_ref.stop(),
            handshakes_seen_by_device: seen_ref.iter().filter(|t| **t > 0).count(),
            server_cpu_seconds: host.pid().map_or(0.0, report::cpu_seconds) - cpu_ref,
        },
    ];
    let rows: Vec<Vec<String>> = sides
        .iter()
        .map(|s| {
            vec![
                s.server.to_owned(),
                format!("{:.0}", s.seconds),
                s.ping.sent.to_string(),
                s.ping.received.to_string(),
                s.ping.sent.saturating_sub(s.ping.received).to_string(),
                format!("{:.0}", s.ping.max_gap.as_secs_f64() * 1000.0),
                s.ping.gaps_over_1s.to_string(),
                s.handshakes_seen_by_device.to_string(),
                format!("{:.2}", s.server_cpu_seconds),
            ]
        })
        .collect();
    report::print_table(
        &[
            "server",
            "seconds",
            "sent",
            "received",
            "lost",
            "max gap ms",
            "gaps>1s",
            "handshakes",
            "server cpu s",
        ],
        &rows,
    );
    let results = Results {
        scenario: "soak",
        machine: Machine::this(),
        command,
        interval_ms: args.interval.as_millis() as u64,
        sides,
    };
    let path = report::write_json("soak", &results)?;
    println!("wrote {}", path.display());
    Ok(())
}
