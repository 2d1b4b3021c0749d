//! Starts the workspace's release `floto-vpn-server` on a fresh data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;

/// Where the binaries are: next to this one (target/release).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary dir")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it: cargo build --release -p floto-vpn-server -p floto-bench",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Bound {
    pub wg: SocketAddr,
    pub api: SocketAddr,
    pub quic: SocketAddr,
    pub metrics: SocketAddr,
}

#[derive(Deserialize)]
struct RuntimeInfo {
    pid: u32,
    bound: Bound,
}

/// A running server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub bound: Bound,
}

impl Server {
    pub fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("floto-bench-").tempdir()?;
        let data = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(bin("floto-vpn-server")?)
            .arg("run")
            .arg("--data-dir")
            .arg(&data)
            .args(["--wg-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .args([
                "--quic-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("FLOTO_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting floto-vpn-server")?;
        let bound = wait_ready(&data, child.id())?;
        Ok(Self { child, dir, bound })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir().join("ca.pem"))?)
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.bound.api.port())
    }

    /// `floto-vpn-server key create`: a provisioning key.
    pub fn create_key(&self, fleet: &str) -> anyhow::Result<String> {
        let out = Command::new(bin("floto-vpn-server")?)
            .args(["key", "create", "--fleet", fleet, "--data-dir"])
            .arg(self.data_dir())
            .output()?;
        if !out.status.success() {
            bail!("key create: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().last().unwrap_or_default().trim().to_owned())
    }

    /// CPU seconds (user + system) the server process has used.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds of a process from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn wait_ready(data: &Path, pid: u32) -> anyhow::Result<Bound> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(text) = std::fs::read_to_string(data.join("server.json")) {
            if let Ok(info) = serde_json::from_str::<RuntimeInfo>(&text) {
                if info.pid == pid {
                    return Ok(info.bound);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the server did not start within 60 s")
}
