//! One device, TCP through the tunnel with iperf3, ours against wireguard-go in the same
//! run. The device is wireguard-go in a network namespace in both cases, running
//! `iperf3 -s`. With floto-vpn-server the operator's path is the product's: `floto tunnel`
//! (QUIC to the broker) -> the server's userspace TCP stack -> WireGuard (boringtun) -> the
//! device; the server has no TUN interface. The reference is a wireguard-go server with a
//! kernel TUN interface, reached by the host's own TCP stack.
//!
//! A third device runs the product's own agent (`floto-tunnel run`, TUN mode) in its own
//! namespace, reached through the same server and operator path: what a FLOTO device gets.
//! A fourth runs the agent with `--transport tls` (WireGuard over TLS, for networks that
//! block UDP), so the two transports are compared in the same run.

use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use floto_e2e::agent::{Agent, AgentOptions};
use floto_e2e::device::{WgGoDevice, WgGoHost};
use floto_e2e::net::Netns;
use floto_e2e::server::Server;
use floto_e2e::{floto, output, wait_for, Child};

use crate::report::{self, Machine};

#[derive(Debug, Clone, Copy)]
pub struct Args {
    pub seconds: u32,
    pub runs: usize,
}

#[derive(Debug, Serialize)]
struct Run {
    server: &'static str,
    device: &'static str,
    direction: &'static str,
    run: usize,
    mbit_per_s: f64,
    server_cpu_s: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: &'static str,
    machine: Machine,
    load_before: String,
    command: String,
    seconds: u32,
    runs: Vec<Run>,
    medians: Vec<(String, String, f64)>,
    /// Seconds from the agent's start to online over TLS, in a namespace that drops UDP
    /// (a new device each time: enrollment included).
    online_with_udp_blocked_s: Vec<f64>,
}

const OURS: &str = "floto-vpn-server";
const WG_GO: &str = "wireguard-go";
const AGENT: &str = "floto-tunnel";
const AGENT_TLS: &str = "floto-tunnel (tls)";

/// `floto tunnel <uuid> 127.0.0.1:0:5201`; returns the process and its local port.
fn operator_tunnel(
    cfg: &std::path::Path,
    uuid: &str,
    name: &str,
    logs: &std::path::Path,
) -> (Child, u16) {
    let mut tunnel = floto(cfg);
    tunnel.args(["tunnel", uuid, "127.0.0.1:0:5201"]);
    let tunnel = Child::spawn(&format!("floto-tunnel-cmd-{name}"), tunnel, logs);
    let port: u16 = wait_for(Duration::from_secs(15), "floto tunnel to listen", || {
        tunnel
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("forwarding 127.0.0.1:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    (tunnel, port)
}

/// Runs iperf3 against `host:port`; returns received Mbit/s.
fn iperf(host: &str, port: u16, seconds: u32, reverse: bool) -> anyhow::Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    if reverse {
        cmd.arg("-R");
    }
    let out = output(&mut cmd);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
    Ok(bps / 1e6)
}

fn iperf_server(ns: &Netns, dir: &std::path::Path) -> Child {
    let mut cmd = ns.command("iperf3");
    cmd.args(["-s", "-p", "5201"]);
    let child = Child::spawn(&format!("iperf3-{}", ns.name), cmd, dir);
    wait_for(Duration::from_secs(10), "iperf3 to listen", || {
        let out = output(ns.command("ss").args(["-ltn", "sport = :5201"]));
        String::from_utf8_lossy(&out.stdout)
            .contains(":5201")
            .then_some(())
    });
    child
}

pub fn main(args: Args, command: String) -> anyhow::Result<()> {
    floto_e2e::require_root();
    floto_e2e::require(&["wireguard-go", "wg", "ip", "ss"]);
    anyhow::ensure!(
        floto_e2e::which("iperf3").is_some(),
        "the throughput benchmark needs iperf3: apt-get install -y iperf3"
    );
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let logs = tempfile::tempdir()?;

    // floto-vpn-server, a wireguard-go device, `floto tunnel` to its iperf3.
    let ns = Netns::new();
    let agent_ns = Netns::new();
    let tls_ns = Netns::new();
    // Devices on a network that drops UDP, one per run.
    let blocked_nss: Vec<Netns> = (0..args.runs).map(|_| Netns::new()).collect();
    let names: Vec<String> = [&ns, &agent_ns, &tls_ns]
        .into_iter()
        .chain(&blocked_nss)
        .map(|n| n.host_ip().to_string())
        .collect();
    let server = Server::start_logging(&["--tls-name", &names.join(",")], "warn");
    let key = server.create_key("bench", None);
    let mut device = WgGoDevice::enroll(ns, &server, &key);
    device.up();
    let _iperf_ours = iperf_server(&device.ns, logs.path());
    let cfg = logs.path().join("operator");
    server.login_operator("bench", "admin", &[], &cfg);
    server.wait_online(&device.uuid, true, Duration::from_secs(30));
    let (_tunnel, port) = operator_tunnel(&cfg, &device.uuid, "wg-go", logs.path());

    // The product's agent as a device, through the same server.
    let mut agent = Agent::new(
        &agent_ns,
        &server,
        &key,
        AgentOptions {
            args: Vec::new(),
            user: None,
        },
    );
    agent.start();
    agent.wait_connected(Duration::from_secs(30));
    let agent_uuid = agent.uuid();
    let _iperf_agent = iperf_server(&agent_ns, logs.path());
    server.wait_online(&agent_uuid, true, Duration::from_secs(30));
    let (_agent_tunnel, agent_port) = operator_tunnel(&cfg, &agent_uuid, "agent", logs.path());

    // The agent again, its datagrams over TLS.
    let mut tls_agent = Agent::new(
        &tls_ns,
        &server,
        &key,
        AgentOptions {
            args: vec!["--transport".into(), "tls".into()],
            user: None,
        },
    );
    tls_agent.start();
    tls_agent.wait_connected(Duration::from_secs(30));
    let tls_uuid = tls_agent.uuid();
    let _iperf_tls = iperf_server(&tls_ns, logs.path());
    server.wait_online(&tls_uuid, true, Duration::from_secs(30));
    anyhow::ensure!(
        server.device(&tls_uuid)["transport"] == "tls",
        "the TLS agent's datagrams do not travel over TLS"
    );
    let (_tls_tunnel, tls_port) = operator_tunnel(&cfg, &tls_uuid, "agent-tls", logs.path());

    // The reference: wireguard-go server and device.
    let tag = std::process::id() % 250;
    let host = WgGoHost::new(
        &format!("fwtp{tag}"),
        std::net::Ipv4Addr::new(10, 242, tag as u8, 1),
    );
    let mut reference = WgGoDevice::bare(Netns::new());
    let device_ip = std::net::Ipv4Addr::new(10, 242, tag as u8, 2);
    let conf = host.add_device(&reference.ns, device_ip, 25);
    reference.up_with(&conf);
    let _iperf_ref = iperf_server(&reference.ns, logs.path());
    wait_for(Duration::from_secs(20), "the reference tunnel", || {
        output(Command::new("ping").args(["-c", "1", "-W", "1", &device_ip.to_string()]))
            .status
            .success()
            .then_some(())
    });

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        for (direction, reverse) in [("to device", false), ("from device", true)] {
            for (device, port) in [(WG_GO, port), (AGENT, agent_port), (AGENT_TLS, tls_port)] {
                let cpu = report::cpu_seconds(server.child.pid());
                let mbit = iperf("127.0.0.1", port, args.seconds, reverse)?;
                runs.push(Run {
                    server: OURS,
                    device,
                    direction,
                    run,
                    mbit_per_s: mbit,
                    server_cpu_s: report::cpu_seconds(server.child.pid()) - cpu,
                });
            }
            let pid = host.pid().unwrap_or(0);
            let cpu = report::cpu_seconds(pid);
            let mbit = iperf(&device_ip.to_string(), 5201, args.seconds, reverse)?;
            runs.push(Run {
                server: WG_GO,
                device: WG_GO,
                direction,
                run,
                mbit_per_s: mbit,
                server_cpu_s: report::cpu_seconds(pid) - cpu,
            });
            eprintln!("run {run} {direction} done");
        }
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.server.to_owned(),
                r.device.to_owned(),
                r.direction.to_owned(),
                r.run.to_string(),
                format!("{:.0}", r.mbit_per_s),
                format!("{:.2}", r.server_cpu_s),
            ]
        })
        .collect();
    report::print_table(
        &[
            "server",
            "device",
            "direction",
            "run",
            "Mbit/s",
            "server cpu s",
        ],
        &rows,
    );
    let mut medians = Vec::new();
    for direction in ["to device", "from device"] {
        let mut m = [0.0f64; 4];
        for (i, (server, device)) in [
            (OURS, WG_GO),
            (OURS, AGENT),
            (WG_GO, WG_GO),
            (OURS, AGENT_TLS),
        ]
        .into_iter()
        .enumerate()
        {
            let mut v: Vec<f64> = runs
                .iter()
                .filter(|r| r.server == server && r.device == device && r.direction == direction)
                .map(|r| r.mbit_per_s)
                .collect();
            m[i] = report::median(&mut v);
            medians.push((format!("{server} / {device}"), direction.to_string(), m[i]));
        }
        let reference = m[2].max(1e-9);
        println!(
            "median {direction}: floto-vpn-server {:.0} Mbit/s (wireguard-go device, ratio {:.2}), \
             {:.0} Mbit/s (floto-tunnel device, ratio {:.2}), {:.0} Mbit/s (floto-tunnel over \
             TLS, {:.2} of the same agent over UDP); wireguard-go {:.0} Mbit/s",
            m[0],
            m[0] / reference,
            m[1],
            m[1] / reference,
            m[3],
            m[3] / m[1].max(1e-9),
            m[2]
        );
    }

    // A device on a network that drops UDP: from the agent's start to online over TLS.
    let mut blocked = Vec::new();
    for (run, ns) in (1..).zip(&blocked_nss) {
        ns.block_udp();
        let mut agent = Agent::new(
            ns,
            &server,
            &key,
            AgentOptions {
                args: Vec::new(),
                user: None,
            },
        );
        let started = std::time::Instant::now();
        agent.start();
        let uuid = agent.uuid();
        wait_for(Duration::from_secs(30), "online over TLS", || {
            (server.device(&uuid)["transport"] == "tls").then_some(())
        });
        let took = started.elapsed().as_secs_f64();
        eprintln!("run {run}: online over TLS {took:.1} s after start, with UDP blocked");
        blocked.push(took);
    }
    let mut sorted = blocked.clone();
    println!(
        "online with UDP blocked (auto: UDP first, then TLS): median {:.1} s over {} runs",
        report::median(&mut sorted),
        blocked.len()
    );
    let results = Results {
        scenario: "throughput",
        machine: Machine::this(),
        load_before,
        command,
        seconds: args.seconds,
        runs,
        medians,
        online_with_udp_blocked_s: blocked,
    };
    let path = report::write_json("throughput", &results)?;
    println!("wrote {}", path.display());
    Ok(())
}
