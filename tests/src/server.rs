//! A real `floto-vpn-server` process on a fresh data dir, and its admin commands.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::Deserialize;

use crate::{bin, last_line, output, run, wait_for, Child};

/// What the server wrote to `server.json`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Bound {
    pub wg: SocketAddr,
    pub api: SocketAddr,
    pub quic: SocketAddr,
    pub metrics: SocketAddr,
    /// The extra HTTPS listener (`--wg-tls-listen`), when asked for.
    #[serde(default)]
    pub wg_tls: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
struct RuntimeInfo {
    pid: u32,
    bound: Bound,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    // Fields drop in order: the process first, while its log file still exists.
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub bound: Bound,
    args: Vec<String>,
    log: String,
}

impl Server {
    /// Starts a server on a new data dir with every port chosen by the kernel. `args` are
    /// extra flags for `run` (e.g. `--tls-name 10.201.0.1`).
    pub fn start(args: &[&str]) -> Self {
        Self::start_logging(args, "info,floto_vpn_server=debug")
    }

    /// A temp dir for [`start_on`](Self::start_on); its data dir is `DIR/data`.
    pub fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("floto-e2e-")
            .tempdir()
            .expect("temp dir")
    }

    /// As [`start`](Self::start), on `dir/data`, which may have been made already (e.g. by
    /// `init --ca-cert`).
    pub fn start_on(dir: tempfile::TempDir, args: &[&str]) -> Self {
        Self::start_in(dir, args, "info,floto_vpn_server=debug")
    }

    /// Another node of this server's cluster: a new data dir with this one's identity (CA,
    /// WireGuard key, TLS and admin credentials, config), without its registry file or
    /// runtime state, started with `args` (which name the shared `--database-url`).
    pub fn start_joining(&self, args: &[&str]) -> Self {
        let dir = Self::temp_dir();
        let to = dir.path().join("data");
        std::fs::create_dir(&to).expect("data dir");
        for entry in std::fs::read_dir(self.data_dir()).expect("reading the data dir") {
            let entry = entry.expect("data dir entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("registry.db") || name == "server.json" {
                continue;
            }
            run(Command::new("cp").arg("-a").arg(entry.path()).arg(&to));
        }
        Self::start_in(dir, args, &self.log)
    }

    /// As [`start`](Self::start), with a `FLOTO_LOG` filter (benchmarks log little).
    pub fn start_logging(args: &[&str], log: &str) -> Self {
        Self::start_in(Self::temp_dir(), args, log)
    }

    fn start_in(dir: tempfile::TempDir, args: &[&str], log: &str) -> Self {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = spawn(&dir.path().join("data"), dir.path(), &args, None, log);
        let bound = wait_ready(&dir.path().join("data"), &child);
        Self {
            child,
            dir,
            bound,
            args,
            log: log.to_owned(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    /// The API's URL at `host` (an address the server listens on).
    pub fn api_url(&self, host: IpAddr) -> String {
        match host {
            IpAddr::V4(ip) => format!("https://{ip}:{}", self.bound.api.port()),
            IpAddr::V6(ip) => format!("https://[{ip}]:{}", self.bound.api.port()),
        }
    }

    /// The API on loopback.
    pub fn local_url(&self) -> String {
        self.api_url(IpAddr::from([127, 0, 0, 1]))
    }

    /// Kills the server with SIGKILL (no shutdown work at all).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts the server again on the same data dir and the same ports.
    pub fn start_again(&mut self) {
        let data = self.data_dir();
        let _ = std::fs::remove_file(data.join("server.json"));
        self.child = spawn(
            &data,
            self.dir.path(),
            &self.args,
            Some(self.bound),
            &self.log,
        );
        self.bound = wait_ready(&data, &self.child);
    }

    /// Runs `floto-vpn-server ARGS --data-dir D`.
    pub fn admin(&self, args: &[&str]) -> Output {
        output(
            Command::new(bin("floto-vpn-server"))
                .args(args)
                .arg("--data-dir")
                .arg(self.data_dir()),
        )
    }

    /// A new provisioning key for `fleet`.
    pub fn create_key(&self, fleet: &str, uses: Option<u32>) -> String {
        let mut args = vec!["key", "create", "--fleet", fleet];
        let uses_s;
        if let Some(u) = uses {
            uses_s = u.to_string();
            args.extend(["--uses", &uses_s]);
        }
        let out = self.admin(&args);
        assert!(
            out.status.success(),
            "key create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        last_line(&out)
    }

    /// A new operator; returns its login token.
    pub fn add_operator(&self, name: &str, role: &str, fleets: &[&str]) -> String {
        let mut args = vec!["operator", "add", name, "--role", role];
        for f in fleets {
            args.extend(["--fleet", f]);
        }
        let out = self.admin(&args);
        assert!(
            out.status.success(),
            "operator add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        last_line(&out)
    }

    /// Adds an operator and logs it in with `floto login` into `config_dir`.
    pub fn login_operator(&self, name: &str, role: &str, fleets: &[&str], config_dir: &Path) {
        let token = self.add_operator(name, role, fleets);
        run(crate::floto(config_dir)
            .args([
                "login",
                "--server",
                &self.local_url(),
                "--token",
                &token,
                "--ca",
            ])
            .arg(self.ca_path()));
    }

    /// A device as the admin API shows it.
    pub fn device(&self, uuid: &str) -> serde_json::Value {
        let out = self.admin(&["device", "show", uuid, "--json"]);
        assert!(
            out.status.success(),
            "device show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("device json")
    }

    /// Waits until the API shows the device with `online` as given.
    pub fn wait_online(&self, uuid: &str, online: bool, timeout: Duration) -> serde_json::Value {
        wait_for(timeout, &format!("device {uuid} online={online}"), || {
            let v = self.device(uuid);
            (v["online"] == online).then_some(v)
        })
    }

    /// `GET /metrics` over plain HTTP.
    pub fn metrics(&self) -> String {
        http_get(self.bound.metrics, "/metrics")
    }
}

/// A minimal HTTP/1.0 GET (no client library between the test and the server).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn spawn(data: &Path, logs: &Path, args: &[String], ports: Option<Bound>, log: &str) -> Child {
    let listen =
        |p: Option<SocketAddr>, default: &str| p.map_or(default.to_owned(), |a| a.to_string());
    let mut cmd = Command::new(bin("floto-vpn-server"));
    cmd.arg("run")
        .arg("--data-dir")
        .arg(data)
        .args(["--wg-listen", &listen(ports.map(|b| b.wg), "0.0.0.0:0")])
        .args(["--api-listen", &listen(ports.map(|b| b.api), "0.0.0.0:0")])
        .args(["--quic-listen", &listen(ports.map(|b| b.quic), "0.0.0.0:0")])
        .args([
            "--metrics-listen",
            &listen(ports.map(|b| b.metrics), "127.0.0.1:0"),
        ])
        .args(args)
        .env("FLOTO_LOG", log);
    let n = std::fs::read_dir(logs).map(|d| d.count()).unwrap_or(0);
    Child::spawn(&format!("server-{n}"), cmd, logs)
}

fn wait_ready(data: &Path, child: &Child) -> Bound {
    let file = data.join("server.json");
    wait_for(Duration::from_secs(60), "the server to listen", || {
        let text = std::fs::read_to_string(&file).ok()?;
        let info: RuntimeInfo = serde_json::from_str(&text).ok()?;
        (info.pid == child.pid()).then_some(info.bound)
    })
}

/// Runs `floto-vpn-server` subcommands that do not need a running server (e.g. `init`).
pub fn offline(args: &[&str], data: &Path) -> Output {
    run(Command::new(bin("floto-vpn-server"))
        .args(args)
        .arg("--data-dir")
        .arg(data))
}

/// The value of one sample in a Prometheus text exposition, e.g.
/// `metric(&text, "floto_wg_dropped_total{reason=\"spoofed\"}")`.
pub fn metric(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
