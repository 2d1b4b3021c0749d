//! `floto-bench`: run one benchmark scenario, print its table, write its JSON.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "floto-bench",
    about = "floto-connect benchmarks (build with --release)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Enrollments per second over HTTPS with durable commits.
    Enroll {
        #[arg(long, default_value_t = 5000)]
        devices: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// A wireguard-go device pinging floto-vpn-server and a wireguard-go server side by side
    /// through rekeys and expiries (needs root, wireguard-go, wireguard-tools).
    Soak {
        /// How long, e.g. 400s (past the 120 s rekey and 180 s reject timers twice).
        #[arg(long, default_value = "400s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Ping interval.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// N devices handshake at once with a server that has no session for them.
    Storm(StormFlags),
    /// N devices online; the server is killed and started again.
    Restart(StormFlags),
    /// N devices online sending only keepalives: server memory and CPU.
    Idle {
        #[arg(long, default_value_t = 100_000)]
        devices: usize,
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Wait between all devices online and the measured window (rekeys start 120 s
        /// after each device's handshake).
        #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
        warmup: std::time::Duration,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Only floto-vpn-server.
        #[arg(long)]
        no_compare: bool,
        /// Devices for the wireguard-go side (it holds at most 65,536).
        #[arg(long)]
        compare_devices: Option<usize>,
    },
    /// Two nodes on one PostgreSQL: a storm split between them, the database's load while
    /// the fleet idles, and the takeover of a killed node's devices (needs PostgreSQL).
    Cluster {
        /// Devices per node.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// How long the fleet idles before the kill (presence writes are measured over it).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
    },
    /// The cost of one X25519 on one thread: variable base (vendored and as published) and
    /// base point.
    Dh {
        #[arg(long, default_value_t = 20_000)]
        ops: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// One device, TCP through the tunnel with iperf3 (needs root, iperf3, wireguard-go).
    Throughput {
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

#[derive(clap::Args)]
struct StormFlags {
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Load generator threads (each drives its share of the devices over one socket).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Give up waiting for devices after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Only floto-vpn-server (no wireguard-go run).
    #[arg(long)]
    no_compare: bool,
    /// restart: how long devices stay online before the kill.
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    settle: std::time::Duration,
    /// Extra flags for floto-vpn-server run, e.g. --server-arg=--handshake-rate-limit=8000.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

impl StormFlags {
    fn args(self) -> floto_bench::storm::Args {
        floto_bench::storm::Args {
            devices: self.devices,
            runs: self.runs,
            threads: self.threads,
            timeout: self.timeout,
            compare: !self.no_compare,
            settle: self.settle,
            server_args: self.server_args,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.scenario {
        Scenario::Enroll {
            devices,
            concurrency,
            runs,
        } => rt.block_on(floto_bench::enroll::main(
            floto_bench::enroll::Args {
                devices,
                concurrency,
                runs,
            },
            command,
        )),
        Scenario::Soak { duration, interval } => {
            floto_bench::soak::main(floto_bench::soak::Args { duration, interval }, command)
        }
        Scenario::Storm(f) => rt.block_on(floto_bench::storm::main(
            floto_bench::storm::Scenario::Storm,
            f.args(),
            command,
        )),
        Scenario::Restart(f) => rt.block_on(floto_bench::storm::main(
            floto_bench::storm::Scenario::Restart,
            f.args(),
            command,
        )),
        Scenario::Idle {
            devices,
            duration,
            warmup,
            threads,
            no_compare,
            compare_devices,
        } => rt.block_on(floto_bench::idle::main(
            floto_bench::idle::Args {
                devices,
                duration,
                warmup,
                threads,
                compare: !no_compare,
                compare_devices,
            },
            command,
        )),
        Scenario::Cluster {
            devices,
            runs,
            threads,
            timeout,
            idle,
        } => rt.block_on(floto_bench::cluster::main(
            floto_bench::cluster::Args {
                devices,
                runs,
                threads,
                timeout,
                idle,
            },
            command,
        )),
        Scenario::Dh { ops, runs } => {
            floto_bench::dh::main(floto_bench::dh::Args { ops, runs }, command)
        }
        Scenario::Throughput { seconds, runs } => {
            floto_bench::throughput::main(floto_bench::throughput::Args { seconds, runs }, command)
        }
    }
}
