//! Enrollment throughput over HTTPS with durable commits: N devices enroll through the real
//! API of a release server, C at a time, each with its own ECDSA key, CSR and WireGuard
//! key (made before the clock starts). Two modes: clients that keep their connection
//! (HTTP/2 keep-alive, as a fleet's devices retrying through one proxy would) and a new TLS
//! connection for every enrollment (as independent devices do).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;

use floto_client::ApiClient;
use floto_proto::enroll::EnrollRequest;
use floto_proto::{DeviceId, WgKey};

use crate::report::{self, Machine};
use floto_e2e::server::Server;

#[derive(Debug, Clone, Copy)]
pub struct Args {
    pub devices: usize,
    pub concurrency: usize,
    pub runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    KeepAlive,
    NewConnection,
}

#[derive(Debug, Serialize)]
struct Run {
    mode: Mode,
    devices: usize,
    concurrency: usize,
    seconds: f64,
    enrollments_per_second: f64,
    failures: usize,
    p50_ms: f64,
    p99_ms: f64,
    server_cpu_ms_per_enrollment: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: &'static str,
    machine: Machine,
    command: String,
    runs: Vec<Run>,
    median_keep_alive_per_second: f64,
    median_new_connection_per_second: f64,
}

/// One device's enrollment material.
struct Material {
    uuid: DeviceId,
    csr_pem: String,
    wg_public: WgKey,
}

fn material(n: usize) -> anyhow::Result<Vec<Material>> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || -> anyhow::Result<Vec<Material>> {
                let count = per.min(n.saturating_sub(t * per));
                (0..count)
                    .map(|_| {
                        let uuid = DeviceId::new_random();
                        let key = floto_pki::generate_key()?;
                        let csr_pem = floto_pki::make_csr(&key, &uuid.to_string())?;
                        let secret = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
                        Ok(Material {
                            uuid,
                            csr_pem,
                            wg_public: WgKey(x25519_dalek::PublicKey::from(&secret).to_bytes()),
                        })
                    })
                    .collect()
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("material thread panicked"))??,
        );
    }
    Ok(all)
}

async fn one_run(mode: Mode, args: Args) -> anyhow::Result<Run> {
    let server = Server::start_logging(
        &[
            "--max-concurrent-enrollments",
            "100000",
            "--enroll-rate-per-key",
            "1000000",
        ],
        "warn",
    );
    let key = Arc::new(server.create_key("bench", None));
    let ca = Arc::new(std::fs::read_to_string(server.ca_path())?);
    let url = Arc::new(server.local_url());
    let queue = Arc::new(Mutex::new(material(args.devices)?));
    let cpu_before = report::cpu_seconds(server.child.pid());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (queue, key, ca, url) = (queue.clone(), key.clone(), ca.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            let mut shared = None;
            loop {
                let Some(m) = queue.lock().await.pop() else {
                    break;
                };
                let client = match (mode, &shared) {
                    (Mode::KeepAlive, Some(c)) => c,
                    _ => {
                        shared = Some(ApiClient::new(&url, &ca, None)?);
                        shared.as_ref().ok_or_else(|| anyhow::anyhow!("client"))?
                    }
                };
                let t = Instant::now();
                let r = client
                    .enroll(
                        &key,
                        &EnrollRequest {
                            uuid: Some(m.uuid.to_string()),
                            csr_pem: m.csr_pem,
                            wg_public_key: m.wg_public.to_base64(),
                            device_type: None,
                            hostname: None,
                            ssh_host_keys: Vec::new(),
                        },
                    )
                    .await;
                match r {
                    Ok((201, _)) => latencies.push(t.elapsed()),
                    Ok(_) | Err(_) => failures += 1,
                }
                if mode == Mode::NewConnection {
                    shared = None;
                }
            }
            Ok::<_, anyhow::Error>((latencies, failures))
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await??;
        latencies.extend(l);
        failures += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = report::cpu_seconds(server.child.pid()) - cpu_before;
    latencies.sort();
    Ok(Run {
        mode,
        devices: args.devices,
        concurrency: args.concurrency,
        seconds,
        enrollments_per_second: latencies.len() as f64 / seconds,
        failures,
        p50_ms: ms(report::percentile(&latencies, 50.0)),
        p99_ms: ms(report::percentile(&latencies, 99.0)),
        server_cpu_ms_per_enrollment: cpu * 1000.0 / latencies.len().max(1) as f64,
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

pub async fn main(args: Args, command: String) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for mode in [Mode::KeepAlive, Mode::NewConnection] {
        for i in 0..args.runs {
            let r = one_run(mode, args).await?;
            eprintln!("{mode:?} run {}: {:.0}/s", i + 1, r.enrollments_per_second);
            runs.push(r);
        }
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                format!("{:?}", r.mode),
                r.devices.to_string(),
                r.concurrency.to_string(),
                format!("{:.2}", r.seconds),
                format!("{:.0}", r.enrollments_per_second),
                r.failures.to_string(),
                format!("{:.1}", r.p50_ms),
                format!("{:.1}", r.p99_ms),
                format!("{:.2}", r.server_cpu_ms_per_enrollment),
            ]
        })
        .collect();
    report::print_table(
        &[
            "mode",
            "devices",
            "conc",
            "seconds",
            "enroll/s",
            "failed",
            "p50 ms",
            "p99 ms",
            "srv cpu ms/enr",
        ],
        &rows,
    );
    let rate = |mode| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| r.enrollments_per_second)
            .collect();
        report::median(&mut v)
    };
    let results = Results {
        scenario: "enroll",
        machine: Machine::this(),
        command,
        median_keep_alive_per_second: rate(Mode::KeepAlive),
        median_new_connection_per_second: rate(Mode::NewConnection),
        runs,
    };
    println!(
        "median: {:.0} enrollments/s with keep-alive, {:.0}/s with a new TLS connection each",
        results.median_keep_alive_per_second, results.median_new_connection_per_second
    );
    let path = report::write_json("enroll", &results)?;
    println!("wrote {}", path.display());
    if results.runs.iter().any(|r| r.failures > 0) {
        anyhow::bail!("some enrollments failed");
    }
    Ok(())
}
