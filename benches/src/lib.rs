//! floto-bench: the load generator and benchmarks of floto-connect. Programs, not timed
//! tests: each scenario prints a table and writes JSON under `benches/results/`. It starts
//! the release binaries of the workspace (`cargo build --release` first) with the harness
//! of the end-to-end tests (floto-e2e), so both drive the same real processes.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod cluster;
pub mod dh;
pub mod enroll;
pub mod idle;
pub mod report;
pub mod soak;
pub mod storm;
pub mod target;
pub mod throughput;
