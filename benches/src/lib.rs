//! floto-bench: the load generator and benchmarks of floto-connect. Programs, not timed
//! tests: each scenario prints a table and writes JSON under `benches/results/`. It starts
//! the release binaries of the workspace itself (`cargo build --release` first).
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod enroll;
pub mod report;
pub mod server;
