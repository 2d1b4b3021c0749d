//! The cost of one X25519 on this machine, single-threaded: the variable-base
//! multiplication a handshake does three times (as the vendored curve25519-dalek does it,
//! and with its Montgomery ladder, which is what the published crate does), and the
//! base-point multiplication it does once. A responder handshake's floor is three of the
//! first and one of the last.

use std::hint::black_box;
use std::time::Instant;

use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::clamp_integer;
use serde::Serialize;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::report::{self, Machine};

pub struct Args {
    /// Operations per run and kind.
    pub ops: usize,
    pub runs: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    operation: &'static str,
    /// Median over the runs of the mean time per operation.
    median_us: f64,
    runs_us: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Output {
    command: String,
    machine: Machine,
    avx2: bool,
    /// AVX-512 IFMA (the vendored curve25519-dalek's fastest backend).
    avx512ifma: bool,
    ops_per_run: usize,
    rows: Vec<Row>,
}

/// Mean microseconds per call of `op` over `n` calls, each fed the last one's output (so
/// none can be skipped, and every point is a real public key).
fn time(n: usize, mut op: impl FnMut([u8; 32], [u8; 32]) -> [u8; 32]) -> f64 {
    let mut k = [0x5au8; 32];
    let mut u = PublicKey::from(&StaticSecret::from([7u8; 32])).to_bytes();
    let start = Instant::now();
    for i in 0..n {
        k[0] = i as u8;
        u = op(black_box(k), black_box(u));
    }
    black_box(u);
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

pub fn main(args: Args, command: String) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.ops > 0 && args.runs > 0,
        "--ops and --runs must be at least 1"
    );
    type Op = fn([u8; 32], [u8; 32]) -> [u8; 32];
    let kinds: [(&'static str, Op); 3] = [
        (
            "X25519, variable base (vendored curve25519-dalek)",
            |k, u| x25519_dalek::x25519(k, u),
        ),
        (
            "X25519, variable base (Montgomery ladder, as published)",
            |k, u| {
                let k = clamp_integer(k);
                let bits = (0..255).rev().map(|i| (k[i / 8] >> (i % 8)) & 1 == 1);
                MontgomeryPoint(u).mul_bits_be(bits).to_bytes()
            },
        ),
        ("X25519, base point (a public key)", |k, _| {
            PublicKey::from(&StaticSecret::from(k)).to_bytes()
        }),
    ];
    let mut rows = Vec::new();
    for (operation, op) in kinds {
        let runs_us: Vec<f64> = (0..args.runs).map(|_| time(args.ops, op)).collect();
        let median_us = report::median(&mut runs_us.clone());
        rows.push(Row {
            operation,
            median_us,
            runs_us,
        });
    }
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512ifma) = (
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("avx512ifma")
            && std::arch::is_x86_feature_detected!("avx512vl"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512ifma) = (false, false);
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "one thread, {} operations per run, {} runs, AVX2 {}, AVX-512 IFMA {}",
        args.ops,
        args.runs,
        yes(avx2),
        yes(avx512ifma)
    );
    report::print_table(
        &["operation", "median us", "ratio to the ladder"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.operation.to_owned(),
                    format!("{:.1}", r.median_us),
                    format!("{:.2}", r.median_us / rows[1].median_us),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let floor = 3.0 * rows[0].median_us + rows[2].median_us;
    println!("a responder handshake's X25519 (three variable-base, one base point): {floor:.0} us");
    let path = report::write_json(
        "dh",
        &Output {
            command,
            machine: Machine::this(),
            avx2,
            avx512ifma,
            ops_per_run: args.ops,
            rows,
        },
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
