//! An idle fleet: N simulated devices come online (a storm), then only send keepalives
//! every 25 s and rekey as kernel WireGuard does (a keepalive on a session older than 120 s
//! starts a new handshake), for several minutes after a warm-up that lets the rekey waves
//! begin. Measured on the server: resident memory (total, and per online device
//! over the enrolled-but-offline baseline) and CPU per second of wall time.

use std::time::{Duration, Instant};

use serde::Serialize;

use floto_e2e::fleet::{CounterSnapshot, Fleet, FleetOptions};

use crate::report::{self, Machine};
use crate::storm::wait_all_online;
use crate::target::{Floto, Kind, Usage, WireguardGo, WIREGUARD_GO_MAX_PEERS};

#[derive(Debug, Clone)]
pub struct Args {
    pub devices: usize,
    pub duration: Duration,
    /// Time between all devices online and the start of the measured window.
    pub warmup: Duration,
    pub threads: usize,
    pub compare: bool,
    /// Also run wireguard-go with this many devices when N is over its limit.
    pub compare_devices: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Side {
    server: Kind,
    devices: usize,
    seconds_to_online: f64,
    online_at_end: Option<f64>,
    /// RSS with every device configured and none online.
    rss_configured_bytes: u64,
    /// Largest RSS sampled during the idle window.
    rss_online_bytes: u64,
    bytes_per_online_device: f64,
    bytes_per_device_over_configured: f64,
    window_seconds: f64,
    /// Server CPU seconds per second of the window, in % of one core.
    cpu_percent_of_one_core: f64,
    /// Handshakes the fleet completed per second of the window (its rekeys).
    handshakes_per_second: f64,
    /// What the fleet did during the window (keepalives, re-handshakes).
    fleet: CounterSnapshot,
    kernel_drops: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: &'static str,
    machine: Machine,
    load_before: String,
    command: String,
    sides: Vec<Side>,
    note: Option<String>,
}

fn delta(a: CounterSnapshot, b: CounterSnapshot) -> CounterSnapshot {
    CounterSnapshot {
        initiations_sent: b.initiations_sent - a.initiations_sent,
        cookie_replies: b.cookie_replies - a.cookie_replies,
        handshakes_completed: b.handshakes_completed - a.handshakes_completed,
        rejected: b.rejected - a.rejected,
        sent: b.sent - a.sent,
        received: b.received - a.received,
        send_errors: b.send_errors - a.send_errors,
        pongs: b.pongs - a.pongs,
    }
}

async fn measure(
    server: Kind,
    fleet: &Fleet,
    pid: u32,
    rss_configured: u64,
    args: &Args,
    online: &dyn Fn() -> Option<f64>,
) -> anyhow::Result<Side> {
    let start = fleet.start();
    wait_all_online(fleet, Duration::from_secs(300)).await;
    let seconds_to_online = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        fleet.online_count() == fleet.len(),
        "{}: only {} of {} devices came online",
        server.label(),
        fleet.online_count(),
        fleet.len()
    );
    // Let the storm's stragglers and the first keepalives settle, and the rekeys begin.
    tokio::time::sleep(args.warmup).await;
    let before = Usage::of(pid);
    let counters = fleet.counters();
    let drops = report::udp_rcvbuf_errors(pid);
    let window = Instant::now();
    let mut rss_max = before.rss_bytes;
    while window.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_max = rss_max.max(report::rss_bytes(pid));
        let s = window.elapsed().as_secs();
        if s % 60 < 5 {
            eprintln!(
                "  {s} s: rss {} MiB, cpu {:.1} s",
                rss_max >> 20,
                report::cpu_seconds(pid) - before.cpu_seconds
            );
        }
    }
    let after = Usage::of(pid);
    let secs = window.elapsed().as_secs_f64();
    let n = fleet.len();
    Ok(Side {
        server,
        devices: n,
        seconds_to_online,
        online_at_end: online(),
        rss_configured_bytes: rss_configured,
        rss_online_bytes: rss_max,
        bytes_per_online_device: rss_max as f64 / n as f64,
        bytes_per_device_over_configured: rss_max.saturating_sub(rss_configured) as f64 / n as f64,
        window_seconds: secs,
        cpu_percent_of_one_core: (after.cpu_seconds - before.cpu_seconds) / secs * 100.0,
        handshakes_per_second: (fleet.counters().handshakes_completed
            - counters.handshakes_completed) as f64
            / secs,
        fleet: delta(counters, fleet.counters()),
        kernel_drops: report::udp_rcvbuf_errors(pid) - drops,
    })
}

fn options(args: &Args) -> FleetOptions {
    FleetOptions {
        threads: args.threads,
        keepalive: Some(25),
        // Keepalives every 25 s need no finer timers; this keeps the generator's share small.
        timer_sweep: Duration::from_secs(1),
        rekey_like_kernel: true,
        ..FleetOptions::default()
    }
}

pub async fn main(args: Args, command: String) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut sides = Vec::new();
    {
        eprintln!("idle: floto-vpn-server, {} devices", args.devices);
        let target = Floto::new(args.devices, &[]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_configured = report::rss_bytes(target.pid());
        let fleet = target.fleet(options(&args))?;
        let online = || Some(target.online());
        sides.push(
            measure(
                Kind::FlotoVpnServer,
                &fleet,
                target.pid(),
                rss_configured,
                &args,
                &online,
            )
            .await?,
        );
    }
    let wg_devices = args
        .compare_devices
        .unwrap_or(args.devices)
        .min(WIREGUARD_GO_MAX_PEERS);
    let note = (args.compare && wg_devices < args.devices).then(|| {
        format!(
            "wireguard-go run with {wg_devices} devices: it holds at most {WIREGUARD_GO_MAX_PEERS} peers"
        )
    });
    if args.compare {
        eprintln!("idle: wireguard-go, {wg_devices} devices");
        let target = WireguardGo::new(wg_devices)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_configured = report::rss_bytes(target.pid());
        let fleet = target.fleet(options(&args))?;
        let online = || None;
        sides.push(
            measure(
                Kind::WireguardGo,
                &fleet,
                target.pid(),
                rss_configured,
                &args,
                &online,
            )
            .await?,
        );
    }
    let rows: Vec<Vec<String>> = sides
        .iter()
        .map(|s| {
            vec![
                s.server.label().to_owned(),
                s.devices.to_string(),
                format!("{:.1}", s.seconds_to_online),
                s.online_at_end.map_or("-".into(), |v| format!("{v:.0}")),
                format!("{:.0}", s.rss_configured_bytes as f64 / (1 << 20) as f64),
                format!("{:.0}", s.rss_online_bytes as f64 / (1 << 20) as f64),
                format!("{:.0}", s.bytes_per_online_device),
                format!("{:.0}", s.bytes_per_device_over_configured),
                format!("{:.0}", s.window_seconds),
                format!("{:.1}", s.cpu_percent_of_one_core),
                s.fleet.handshakes_completed.to_string(),
                format!("{:.0}", s.handshakes_per_second),
                s.kernel_drops.to_string(),
            ]
        })
        .collect();
    report::print_table(
        &[
            "server",
            "devices",
            "online s",
            "srv online",
            "rss cfg MiB",
            "rss MiB",
            "B/device",
            "B/dev over cfg",
            "window s",
            "cpu % core",
            "rehandshakes",
            "hs/s",
            "kern drops",
        ],
        &rows,
    );
    if let Some(n) = &note {
        println!("{n}");
    }
    let results = Results {
        scenario: "idle",
        machine: Machine::this(),
        load_before,
        command,
        sides,
        note,
    };
    let path = report::write_json("idle", &results)?;
    println!("wrote {}", path.display());
    Ok(())
}
