//! The two servers a fleet of simulated devices can aim at: floto-vpn-server (a release
//! process on loopback, every device enrolled through its HTTPS API) and wireguard-go
//! configured by `wg setconf` with the same number of peers, inside a network namespace
//! the fleet's sockets join (so both are reached over a loopback interface).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;

use floto_e2e::enroll::{enroll_devices, EnrolledFleet};
use floto_e2e::fleet::{Fleet, FleetDevice, FleetOptions};
use floto_e2e::net::Netns;
use floto_e2e::server::{metric, Server};
use floto_e2e::{output, run, wait_for, Child};

use crate::report;

/// wireguard-go's hard limit of peers on one interface.
pub const WIREGUARD_GO_MAX_PEERS: usize = 65_536;

/// Overlay used by the benchmarks: room for 262,142 devices.
pub const BENCH_OVERLAY: &str = "10.64.0.0/14";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    FlotoVpnServer,
    WireguardGo,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::FlotoVpnServer => "floto-vpn-server",
            Kind::WireguardGo => "wireguard-go",
        }
    }
}

/// floto-vpn-server with N enrolled devices.
pub struct Floto {
    pub server: Server,
    pub enrolled: EnrolledFleet,
}

impl Floto {
    /// Starts a fresh server and enrolls `n` devices through its API.
    pub async fn new(n: usize, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec![
            "--overlay",
            BENCH_OVERLAY,
            "--max-concurrent-enrollments",
            "100000",
            // The benchmarks enroll their whole fleet with one key, as fast as they can.
            "--enroll-rate-per-key",
            "1000000",
        ];
        args.extend_from_slice(extra_args);
        let server = Server::start_logging(&args, "warn");
        let key = server.create_key("bench", None);
        let enrolled = enroll_devices(&server, &key, n, 64).await;
        eprintln!(
            "enrolled {n} devices in {:.1} s ({:.0}/s)",
            enrolled.elapsed.as_secs_f64(),
            n as f64 / enrolled.elapsed.as_secs_f64()
        );
        Ok(Self { server, enrolled })
    }

    pub fn pid(&self) -> u32 {
        self.server.child.pid()
    }

    pub fn wg_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.server.bound.wg.port()))
    }

    pub fn fleet(&self, mut options: FleetOptions) -> anyhow::Result<Fleet> {
        options.ping_target = Some(self.enrolled.server_overlay_ip);
        Ok(Fleet::new(
            self.wg_addr(),
            self.enrolled.server_public,
            self.enrolled.fleet_devices(),
            options,
        )?)
    }

    /// `floto_devices_online` as the server reports it.
    pub fn online(&self) -> f64 {
        metric(&self.server.metrics(), "floto_devices_online").unwrap_or(-1.0)
    }

    /// Initiations the server shed (queue full or stale).
    pub fn shed(&self) -> f64 {
        metric(
            &self.server.metrics(),
            "floto_wg_dropped_total{reason=\"overloaded\"}",
        )
        .unwrap_or(0.0)
    }

    pub fn cookie_replies(&self) -> f64 {
        metric(&self.server.metrics(), "floto_cookie_replies_total").unwrap_or(0.0)
    }

    /// SIGKILL, then start again on the same data dir and ports. Returns when it listens.
    pub fn kill_and_restart(&mut self) -> Instant {
        self.server.kill();
        self.server.start_again();
        Instant::now()
    }
}

/// wireguard-go as the server, in its own namespace, with N peers from `wg setconf`.
pub struct WireguardGo {
    child: Option<Child>,
    pub ns: Netns,
    dir: tempfile::TempDir,
    iface: String,
    port: u16,
    private: StaticSecret,
    pub devices: Vec<StaticSecret>,
    conf: std::path::PathBuf,
}

impl WireguardGo {
    /// Generates `n` device keys and the server's, writes the config and starts it.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        floto_e2e::require_root();
        floto_e2e::require(&["wireguard-go", "wg", "ip"]);
        anyhow::ensure!(
            n <= WIREGUARD_GO_MAX_PEERS,
            "wireguard-go holds at most {WIREGUARD_GO_MAX_PEERS} peers per interface"
        );
        let ns = Netns::new();
        let dir = tempfile::tempdir()?;
        let private = StaticSecret::from(rand::random::<[u8; 32]>());
        let devices: Vec<StaticSecret> = (0..n)
            .map(|_| StaticSecret::from(rand::random::<[u8; 32]>()))
            .collect();
        let port = 51820;
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {port}\n",
            b64(private.as_bytes())
        );
        for (i, d) in devices.iter().enumerate() {
            // Device i holds 10.64.0.0/14 + 2 + i, as on our server.
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + 2 + i as u32);
            conf.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nAllowedIPs = {ip}/32\n",
                b64(PublicKey::from(d).as_bytes())
            ));
        }
        let conf_path = dir.path().join("wg.conf");
        std::fs::write(&conf_path, conf)?;
        let iface = ns.wg_iface();
        let mut me = Self {
            child: None,
            ns,
            dir,
            iface,
            port,
            private,
            devices,
            conf: conf_path,
        };
        me.start()?;
        Ok(me)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.ns.command("wireguard-go");
        cmd.args(["-f", &self.iface]).env("LOG_LEVEL", "error");
        self.child = Some(Child::spawn(
            &format!("wireguard-go-{}", self.iface),
            cmd,
            self.dir.path(),
        ));
        wait_for(Duration::from_secs(10), "wireguard-go's interface", || {
            output(self.ns.command("ip").args(["link", "show", &self.iface]))
                .status
                .success()
                .then_some(())
        });
        let started = Instant::now();
        run(self
            .ns
            .command("wg")
            .args(["setconf", &self.iface])
            .arg(&self.conf));
        self.ns
            .ip(&["addr", "add", "10.64.0.1/14", "dev", &self.iface]);
        self.ns.ip(&["link", "set", &self.iface, "up"]);
        eprintln!(
            "wireguard-go configured with {} peers in {:.1} s",
            self.devices.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::pid)
    }

    pub fn wg_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn fleet(&self, mut options: FleetOptions) -> anyhow::Result<Fleet> {
        options.netns = Some(self.ns.name.clone());
        options.ping_target = Some(Ipv4Addr::new(10, 64, 0, 1));
        let devices = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, s)| FleetDevice {
                secret: s.clone(),
                overlay_ip: Some(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 64, 0, 0)) + 2 + i as u32,
                )),
            })
            .collect();
        Ok(Fleet::new(
            self.wg_addr(),
            PublicKey::from(&self.private),
            devices,
            options,
        )?)
    }

    /// SIGKILL, then start again with the same config. Returns when it is configured and up.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<Instant> {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        // The TUN interface goes with the process; wait for it before making it again.
        wait_for(Duration::from_secs(10), "the old interface to go", || {
            (!output(self.ns.command("ip").args(["link", "show", &self.iface]))
                .status
                .success())
            .then_some(())
        });
        self.start()?;
        Ok(Instant::now())
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        self.child = None;
        let _ = Command::new("ip")
            .args(["-n", &self.ns.name, "link", "del", &self.iface])
            .output();
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// CPU seconds and RSS of a process, sampled.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Self {
        Self {
            cpu_seconds: report::cpu_seconds(pid),
            rss_bytes: report::rss_bytes(pid),
        }
    }
}
