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
    }
}
