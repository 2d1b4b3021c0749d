//! Reconnection storms. `storm`: N simulated devices (real boringtun initiators, each with
//! its own key and loopback address) handshake at once with a server that has no session
//! for any of them, as after a server restart; time until 50%, 99% and 100% have a session.
//! `restart`: N devices online, the server is killed (SIGKILL) and started again; time from
//! "listening again" until every device has a new session. Both run against
//! floto-vpn-server and wireguard-go (same generator, same N, same run), side by side.

use std::time::{Duration, Instant};

use serde::Serialize;

use floto_e2e::server::metric;

use floto_e2e::fleet::{CounterSnapshot, Fleet, FleetOptions};

use crate::report::{self, Machine};
use crate::target::{Floto, Kind, Usage, WireguardGo, WIREGUARD_GO_MAX_PEERS};

#[derive(Debug, Clone)]
pub struct Args {
    pub devices: usize,
    pub runs: usize,
    pub threads: usize,
    pub timeout: Duration,
    /// Also run wireguard-go (when N fits its peer limit).
    pub compare: bool,
    /// Restart: how long devices stay online before the kill (the server persists
    /// endpoints every 30 s).
    pub settle: Duration,
    /// Extra flags for floto-vpn-server.
    pub server_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Storm,
    Restart,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub server: Kind,
    pub run: usize,
    pub devices: usize,
    /// Seconds from the start (storm) or from "listening again" (restart).
    pub t50_s: Option<f64>,
    pub t99_s: Option<f64>,
    pub t100_s: Option<f64>,
    pub online: usize,
    pub failures: usize,
    /// Devices online divided by the time the last of them took.
    pub handshakes_per_s: f64,
    pub fleet: CounterSnapshot,
    /// Server CPU seconds over the measured interval.
    pub server_cpu_s: f64,
    /// `server_cpu_s` divided by the handshakes the fleet completed in it, in microseconds:
    /// everything the server did for the storm, per handshake.
    pub server_cpu_per_handshake_us: Option<f64>,
    pub server_rss_bytes: u64,
    /// When the server itself counted 50%, 99% and 100% online (`floto_devices_online`,
    /// sampled every 200 ms; floto-vpn-server only).
    pub server_t50_s: Option<f64>,
    pub server_t99_s: Option<f64>,
    pub server_t100_s: Option<f64>,
    /// Datagrams the kernel dropped for a full receive buffer, in the server's namespace
    /// (the fleet's sockets included).
    pub kernel_drops: u64,
    /// Initiations the server shed (floto_wg_dropped_total{reason="overloaded"}).
    pub server_shed: Option<f64>,
}

/// Samples `floto_devices_online` from a background thread until it reaches `n` or
/// `timeout` passes.
struct OnlineSampler {
    handle: std::thread::JoinHandle<Vec<(Duration, f64)>>,
}

impl OnlineSampler {
    fn start(metrics: std::net::SocketAddr, from: Instant, n: usize, timeout: Duration) -> Self {
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while from.elapsed() < timeout {
                let text = floto_e2e::server::http_get(metrics, "/metrics");
                if let Some(v) = metric(&text, "floto_devices_online") {
                    samples.push((from.elapsed(), v));
                    if v >= n as f64 {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
        });
        Self { handle }
    }

    /// Waits for the sampler; returns when 50%, 99% and 100% of `n` were first reached.
    fn finish(self, n: usize) -> [Option<f64>; 3] {
        let samples = self.handle.join().unwrap_or_default();
        [50.0, 99.0, 100.0].map(|p| {
            let needed = ((p / 100.0) * n as f64).ceil();
            samples
                .iter()
                .find(|(_, v)| *v >= needed)
                .map(|(t, _)| t.as_secs_f64())
        })
    }
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: Scenario,
    machine: Machine,
    load_before: String,
    command: String,
    devices: usize,
    runs: Vec<Run>,
    medians: Vec<Median>,
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Median {
    server: Kind,
    t50_s: Option<f64>,
    t99_s: Option<f64>,
    t100_s: Option<f64>,
    handshakes_per_s: f64,
    server_cpu_per_handshake_us: Option<f64>,
    failures: usize,
}

/// Waits until every device completed a handshake since `fleet`'s last mark, or `timeout`.
pub async fn wait_all_online(fleet: &Fleet, timeout: Duration) {
    let start = Instant::now();
    let mut last_report = Instant::now();
    while fleet.online_count() < fleet.len() && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "  {:.0} s: {} of {} online, {:?}",
                start.elapsed().as_secs_f64(),
                fleet.online_count(),
                fleet.len(),
                fleet.counters()
            );
        }
    }
}

/// Online times relative to `from`, and the run's row.
fn summarize(
    server: Kind,
    run: usize,
    fleet: &Fleet,
    from: Instant,
    counters_before: CounterSnapshot,
    usage_before: Usage,
    pid: u32,
) -> Run {
    let mut times: Vec<Duration> = fleet
        .online_since_mark()
        .into_iter()
        .flatten()
        .map(|t| t.saturating_duration_since(from))
        .collect();
    times.sort();
    let n = fleet.len();
    let at = |p: f64| {
        let needed = ((p / 100.0) * n as f64).ceil() as usize;
        (needed >= 1 && times.len() >= needed).then(|| times[needed - 1].as_secs_f64())
    };
    let after = Usage::of(pid);
    let c = fleet.counters();
    let fleet_delta = CounterSnapshot {
        initiations_sent: c.initiations_sent - counters_before.initiations_sent,
        cookie_replies: c.cookie_replies - counters_before.cookie_replies,
        handshakes_completed: c.handshakes_completed - counters_before.handshakes_completed,
        rejected: c.rejected - counters_before.rejected,
        sent: c.sent - counters_before.sent,
        received: c.received - counters_before.received,
        send_errors: c.send_errors - counters_before.send_errors,
        pongs: c.pongs - counters_before.pongs,
    };
    let last = times.last().map_or(0.0, |d| d.as_secs_f64());
    let server_cpu_s = after.cpu_seconds - usage_before.cpu_seconds;
    Run {
        server,
        run,
        devices: n,
        t50_s: at(50.0),
        t99_s: at(99.0),
        t100_s: at(100.0),
        online: times.len(),
        failures: n - times.len(),
        handshakes_per_s: if last > 0.0 {
            times.len() as f64 / last
        } else {
            0.0
        },
        fleet: fleet_delta,
        server_cpu_s,
        server_cpu_per_handshake_us: (fleet_delta.handshakes_completed > 0)
            .then(|| server_cpu_s * 1e6 / fleet_delta.handshakes_completed as f64),
        server_rss_bytes: after.rss_bytes,
        server_t50_s: None,
        server_t99_s: None,
        server_t100_s: None,
        kernel_drops: 0,
        server_shed: None,
    }
}

fn fleet_options(args: &Args) -> FleetOptions {
    FleetOptions {
        threads: args.threads,
        ..FleetOptions::default()
    }
}

async fn storm_floto(args: &Args, run: usize) -> anyhow::Result<Run> {
    let extra: Vec<&str> = args.server_args.iter().map(String::as_str).collect();
    let target = Floto::new(args.devices, &extra).await?;
    let fleet = target.fleet(fleet_options(args))?;
    let usage = Usage::of(target.pid());
    let before = fleet.counters();
    let drops = report::udp_rcvbuf_errors(target.pid());
    let start = fleet.start();
    let r = until_all_online(args, run, &target, &fleet, start, before, usage, drops).await;
    if std::env::var_os("FLOTO_BENCH_DUMP_METRICS").is_some() {
        for line in target.server.metrics().lines() {
            if line.starts_with("floto_wg") || line.starts_with("floto_hand") {
                eprintln!("    {line}");
            }
        }
    }
    eprintln!(
        "  server: floto_devices_online {} floto_cookie_replies_total {} shed {}",
        target.online(),
        target.cookie_replies(),
        target.shed()
    );
    Ok(r)
}

async fn storm_wggo(args: &Args, run: usize) -> anyhow::Result<Run> {
    let target = WireguardGo::new(args.devices)?;
    let fleet = target.fleet(fleet_options(args))?;
    let usage = Usage::of(target.pid());
    let before = fleet.counters();
    let drops = report::udp_rcvbuf_errors(target.pid());
    let start = fleet.start();
    wait_all_online(&fleet, args.timeout).await;
    let mut r = summarize(
        Kind::WireguardGo,
        run,
        &fleet,
        start,
        before,
        usage,
        target.pid(),
    );
    r.kernel_drops = report::udp_rcvbuf_errors(target.pid()) - drops;
    Ok(r)
}

async fn restart_floto(args: &Args, run: usize) -> anyhow::Result<Run> {
    let extra: Vec<&str> = args.server_args.iter().map(String::as_str).collect();
    let mut target = Floto::new(args.devices, &extra).await?;
    let fleet = target.fleet(fleet_options(args))?;
    fleet.start();
    wait_all_online(&fleet, args.timeout).await;
    anyhow::ensure!(
        fleet.online_count() == fleet.len(),
        "only {} of {} devices came online before the restart",
        fleet.online_count(),
        fleet.len()
    );
    eprintln!("  all online; waiting {:?} before the kill", args.settle);
    tokio::time::sleep(args.settle).await;
    let before = fleet.counters();
    fleet.mark();
    let listening = target.kill_and_restart();
    let usage = Usage::of(target.pid());
    let drops = report::udp_rcvbuf_errors(target.pid());
    Ok(until_all_online(args, run, &target, &fleet, listening, before, usage, drops).await)
}

/// Waits until every device of `fleet` is online (or the timeout), sampling the server's
/// own count meanwhile, and summarizes the run from `from`.
#[allow(clippy::too_many_arguments)]
async fn until_all_online(
    args: &Args,
    run: usize,
    target: &Floto,
    fleet: &Fleet,
    from: Instant,
    before: CounterSnapshot,
    usage: Usage,
    drops: u64,
) -> Run {
    let sampler = OnlineSampler::start(
        target.server.bound.metrics,
        from,
        args.devices,
        args.timeout,
    );
    wait_all_online(fleet, args.timeout).await;
    let mut r = summarize(
        Kind::FlotoVpnServer,
        run,
        fleet,
        from,
        before,
        usage,
        target.pid(),
    );
    [r.server_t50_s, r.server_t99_s, r.server_t100_s] = sampler.finish(args.devices);
    r.kernel_drops = report::udp_rcvbuf_errors(target.pid()) - drops;
    r.server_shed = Some(target.shed());
    r
}

async fn restart_wggo(args: &Args, run: usize) -> anyhow::Result<Run> {
    let mut target = WireguardGo::new(args.devices)?;
    let fleet = target.fleet(fleet_options(args))?;
    fleet.start();
    wait_all_online(&fleet, args.timeout).await;
    eprintln!("  all online; waiting {:?} before the kill", args.settle);
    tokio::time::sleep(args.settle).await;
    let before = fleet.counters();
    fleet.mark();
    let listening = target.kill_and_restart()?;
    let usage = Usage::of(target.pid());
    wait_all_online(&fleet, args.timeout).await;
    Ok(summarize(
        Kind::WireguardGo,
        run,
        &fleet,
        listening,
        before,
        usage,
        target.pid(),
    ))
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2}"))
}

fn median_of(runs: &[Run], server: Kind) -> Option<Median> {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.server == server).collect();
    if mine.is_empty() {
        return None;
    }
    let med = |f: &dyn Fn(&Run) -> Option<f64>| {
        let mut v: Vec<f64> = mine.iter().filter_map(|r| f(r)).collect();
        (v.len() == mine.len()).then(|| report::median(&mut v))
    };
    Some(Median {
        server,
        t50_s: med(&|r| r.t50_s),
        t99_s: med(&|r| r.t99_s),
        t100_s: med(&|r| r.t100_s),
        handshakes_per_s: med(&|r| Some(r.handshakes_per_s)).unwrap_or(0.0),
        server_cpu_per_handshake_us: med(&|r| r.server_cpu_per_handshake_us),
        failures: mine.iter().map(|r| r.failures).sum(),
    })
}

pub async fn main(scenario: Scenario, args: Args, command: String) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let compare = args.compare && args.devices <= WIREGUARD_GO_MAX_PEERS;
    let note = (args.compare && !compare).then(|| {
        format!(
            "wireguard-go not run: {} devices is over its limit of {WIREGUARD_GO_MAX_PEERS} peers",
            args.devices
        )
    });
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        eprintln!(
            "{scenario:?} run {i}: floto-vpn-server, {} devices",
            args.devices
        );
        let r = match scenario {
            Scenario::Storm => storm_floto(&args, i).await?,
            Scenario::Restart => restart_floto(&args, i).await?,
        };
        eprintln!("  t100 {} s, failures {}", fmt_s(r.t100_s), r.failures);
        runs.push(r);
        if compare {
            eprintln!(
                "{scenario:?} run {i}: wireguard-go, {} devices",
                args.devices
            );
            let r = match scenario {
                Scenario::Storm => storm_wggo(&args, i).await?,
                Scenario::Restart => restart_wggo(&args, i).await?,
            };
            eprintln!("  t100 {} s, failures {}", fmt_s(r.t100_s), r.failures);
            runs.push(r);
        }
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.server.label().to_owned(),
                r.run.to_string(),
                r.devices.to_string(),
                fmt_s(r.t50_s),
                fmt_s(r.t99_s),
                fmt_s(r.t100_s),
                fmt_s(r.server_t100_s),
                format!("{:.0}", r.handshakes_per_s),
                r.fleet.cookie_replies.to_string(),
                r.fleet.initiations_sent.to_string(),
                r.failures.to_string(),
                r.kernel_drops.to_string(),
                r.server_shed.map_or("-".into(), |v| format!("{v:.0}")),
                format!("{:.2}", r.server_cpu_s),
                r.server_cpu_per_handshake_us
                    .map_or("-".into(), |us| format!("{us:.0}")),
                format!("{:.0}", r.server_rss_bytes as f64 / (1 << 20) as f64),
            ]
        })
        .collect();
    report::print_table(
        &[
            "server",
            "run",
            "devices",
            "t50 s",
            "t99 s",
            "t100 s",
            "srv t100 s",
            "hs/s",
            "cookies",
            "inits",
            "failed",
            "kern drops",
            "shed",
            "cpu s",
            "cpu/hs us",
            "rss MiB",
        ],
        &rows,
    );
    let medians: Vec<Median> = [Kind::FlotoVpnServer, Kind::WireguardGo]
        .into_iter()
        .filter_map(|k| median_of(&runs, k))
        .collect();
    for m in &medians {
        println!(
            "median {}: t50 {} s, t99 {} s, t100 {} s, {:.0} handshakes/s, {} us of server CPU per handshake, {} failed",
            m.server.label(),
            fmt_s(m.t50_s),
            fmt_s(m.t99_s),
            fmt_s(m.t100_s),
            m.handshakes_per_s,
            m.server_cpu_per_handshake_us
                .map_or("-".into(), |us| format!("{us:.0}")),
            m.failures
        );
    }
    if let [ours, theirs] = medians.as_slice() {
        if let (Some(a), Some(b)) = (ours.t100_s, theirs.t100_s) {
            println!(
                "all online: floto-vpn-server took {:.2}x wireguard-go's time",
                a / b
            );
        }
    }
    if let Some(n) = &note {
        println!("{n}");
    }
    let name = match scenario {
        Scenario::Storm => "storm",
        Scenario::Restart => "restart",
    };
    let results = Results {
        scenario,
        machine: Machine::this(),
        load_before,
        command,
        devices: args.devices,
        runs,
        medians,
        note,
    };
    let path = report::write_json(name, &results)?;
    println!("wrote {}", path.display());
    Ok(())
}
