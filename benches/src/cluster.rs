//! `cluster`: two floto-vpn-server nodes on one PostgreSQL (a throwaway server started here,
//! as the suite does), N simulated devices on each, started at once (a storm split between
//! the nodes). Then, with every device online: the database's write load from presence while
//! the fleet idles, and node A killed with SIGKILL: the time until every one of its devices
//! has handshaken with node B (lease expiry, takeover, call-back), measured from the kill.
//!
//! Devices follow whoever authenticates to them (WireGuard roaming), as real ones do.

use std::time::{Duration, Instant};

use serde::Serialize;

use floto_e2e::enroll::enroll_devices;
use floto_e2e::fleet::{Fleet, FleetOptions};
use floto_e2e::server::{metric, Server};
use floto_pgtest::Postgres;

use crate::report::{self, Machine};
use crate::storm::wait_all_online;
use crate::target::BENCH_OVERLAY;

#[derive(Debug, Clone)]
pub struct Args {
    /// Devices per node.
    pub devices: usize,
    pub runs: usize,
    pub threads: usize,
    pub timeout: Duration,
    /// How long the fleet idles (presence writes are measured over it).
    pub idle: Duration,
}

#[derive(Debug, Serialize)]
struct Run {
    run: usize,
    devices_per_node: usize,
    /// Both halves started at once, one per node: until every device is online.
    storm_t100_s: Option<f64>,
    /// Over the idle window (from 30 s after the storm): database transactions committed
    /// (reads included: every statement outside a transaction is one), and rows written, per
    /// second.
    idle_commits_per_s: f64,
    idle_rows_written_per_s: f64,
    idle_window_s: f64,
    /// From node A's SIGKILL until 50/99/100 % of its devices handshook with node B.
    takeover_t50_s: Option<f64>,
    takeover_t99_s: Option<f64>,
    takeover_t100_s: Option<f64>,
    /// Devices node B holds at the end, by its own count.
    held_by_b: f64,
    /// The cluster's count of online devices as node B reports it at the end.
    cluster_online: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: &'static str,
    machine: Machine,
    load_before: String,
    command: String,
    runs: Vec<Run>,
}

/// Committed transactions and rows written in the database so far.
fn db_writes(pg: &Postgres) -> (f64, f64) {
    let line = pg.psql(
        "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted \
         FROM pg_stat_database WHERE datname = 'floto'",
    );
    let mut it = line
        .split('|')
        .map(|v| v.trim().parse::<f64>().unwrap_or(0.0));
    (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
}

fn at(times: &[Duration], n: usize, p: f64) -> Option<f64> {
    let needed = ((p / 100.0) * n as f64).ceil() as usize;
    (needed >= 1 && times.len() >= needed).then(|| times[needed - 1].as_secs_f64())
}

async fn run_once(args: &Args, run: usize) -> anyhow::Result<Run> {
    let pg = Postgres::try_start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = pg.create_database("floto");
    let node = |name: &'static str| -> Vec<String> {
        [
            "--database-url",
            url.as_str(),
            "--node-name",
            name,
            "--node-address",
            "127.0.0.1",
            "--overlay",
            BENCH_OVERLAY,
            "--max-concurrent-enrollments",
            "100000",
            "--enroll-rate-per-key",
            "1000000",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let a_args = node("a");
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Server::start_logging(&a_args, "warn");
    let b_args = node("b");
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = a.start_joining(&b_args);
    let key = a.create_key("bench", None);
    let enrolled = enroll_devices(&a, &key, 2 * args.devices, 64).await;
    eprintln!(
        "  enrolled {} devices in {:.1} s",
        2 * args.devices,
        enrolled.elapsed.as_secs_f64()
    );
    let mut devices = enrolled.fleet_devices();
    let on_b = devices.split_off(args.devices);
    let options = FleetOptions {
        threads: args.threads,
        ping_target: Some(enrolled.server_overlay_ip),
        ..FleetOptions::default()
    };
    let loopback = |s: &Server| std::net::SocketAddr::from(([127, 0, 0, 1], s.bound.wg.port()));
    let fleet_a = Fleet::new(
        loopback(&a),
        enrolled.server_public,
        devices,
        options.clone(),
    )?;
    let fleet_b = Fleet::new(loopback(&b), enrolled.server_public, on_b, options)?;

    let started = Instant::now();
    fleet_a.start();
    fleet_b.start();
    wait_all_online(&fleet_a, args.timeout).await;
    wait_all_online(&fleet_b, args.timeout).await;
    let storm_t100_s = (fleet_a.online_count() == fleet_a.len()
        && fleet_b.online_count() == fleet_b.len())
    .then(|| started.elapsed().as_secs_f64());
    eprintln!("  storm on two nodes: all online after {storm_t100_s:?} s");

    // Let the first claims land and the database's statistics catch up with the enrollment
    // and the storm, then measure the idle load.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (c0, r0) = db_writes(&pg);
    let idle_start = Instant::now();
    tokio::time::sleep(args.idle).await;
    let (c1, r1) = db_writes(&pg);
    let window = idle_start.elapsed().as_secs_f64();
    eprintln!(
        "  rows written by table since the database was made:\n{}",
        pg.psql_on(
            "floto",
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables \
             WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY relname"
        )
    );
    eprintln!(
        "  idle: {:.1} commits/s, {:.0} rows written/s over {window:.0} s",
        (c1 - c0) / window,
        (r1 - r0) / window
    );

    fleet_a.mark();
    let killed = Instant::now();
    a.kill();
    let deadline = Instant::now() + args.timeout;
    while fleet_a.online_since_mark().iter().flatten().count() < fleet_a.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut times: Vec<Duration> = fleet_a
        .online_since_mark()
        .into_iter()
        .flatten()
        .map(|t| t.saturating_duration_since(killed))
        .collect();
    times.sort();
    // Let B's counts catch up (sessions within 1 s, cluster counts every 5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let metrics = b.metrics();
    Ok(Run {
        run,
        devices_per_node: args.devices,
        storm_t100_s,
        idle_commits_per_s: (c1 - c0) / window,
        idle_rows_written_per_s: (r1 - r0) / window,
        idle_window_s: window,
        takeover_t50_s: at(&times, fleet_a.len(), 50.0),
        takeover_t99_s: at(&times, fleet_a.len(), 99.0),
        takeover_t100_s: at(&times, fleet_a.len(), 100.0),
        held_by_b: metric(&metrics, "floto_devices_online").unwrap_or(-1.0),
        cluster_online: metric(&metrics, "floto_cluster_devices_online").unwrap_or(-1.0),
    })
}

pub async fn main(args: Args, command: String) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        eprintln!("cluster run {i}: two nodes, {} devices each", args.devices);
        runs.push(run_once(&args, i).await?);
    }
    let f = |v: Option<f64>| v.map_or("-".into(), |s| format!("{s:.2}"));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.run.to_string(),
                r.devices_per_node.to_string(),
                f(r.storm_t100_s),
                format!("{:.1}", r.idle_commits_per_s),
                format!("{:.0}", r.idle_rows_written_per_s),
                f(r.takeover_t50_s),
                f(r.takeover_t99_s),
                f(r.takeover_t100_s),
                format!("{:.0}", r.held_by_b),
                format!("{:.0}", r.cluster_online),
            ]
        })
        .collect();
    report::print_table(
        &[
            "run",
            "devices/node",
            "storm t100 s",
            "idle commits/s",
            "idle rows/s",
            "takeover t50 s",
            "t99 s",
            "t100 s",
            "held by B",
            "cluster online",
        ],
        &rows,
    );
    let mut t100: Vec<f64> = runs.iter().filter_map(|r| r.takeover_t100_s).collect();
    let mut commits: Vec<f64> = runs.iter().map(|r| r.idle_commits_per_s).collect();
    println!(
        "median: takeover of {} devices {:.2} s after SIGKILL; {:.1} database commits/s while idle",
        args.devices,
        report::median(&mut t100),
        report::median(&mut commits)
    );
    let results = Results {
        scenario: "cluster",
        machine: Machine::this(),
        load_before,
        command,
        runs,
    };
    let path = report::write_json("cluster", &results)?;
    println!("wrote {}", path.display());
    Ok(())
}
