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
    }
}
