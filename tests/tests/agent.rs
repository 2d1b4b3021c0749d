//! The device agent `floto-tunnel run` end to end: the real server, the real agent in a
//! network namespace (TUN mode as root; userspace mode as an unprivileged user), OpenSSH's
//! sshd on the device and `floto ssh` with the real ssh client through the broker. Through a
//! server SIGKILL and restart, a change of the device's address, certificates that expire
//! every 30 s, and damaged state dirs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use floto_e2e::agent::{start_sshd, Agent, AgentOptions};
use floto_e2e::device::client_key;
use floto_e2e::net::Netns;
use floto_e2e::ping::Ping;
use floto_e2e::server::Server;
use floto_e2e::{bin, floto, output, require, require_root, ssh_opts, stdout, wait_for, Child};

const TOOLS: &[&str] = &["sshd", "ssh", "ssh-keygen", "ss", "setpriv", "ping"];

/// Short timings so that a dead session is noticed in seconds (defaults: 25 s and 2 min).
const FAST: &[&str] = &["--keepalive", "2s", "--backoff-cap", "4s"];

/// A server, a namespace with sshd, an operator logged in, and an agent (not started).
struct Setup {
    agent: Agent,
    sshd: Child,
    ns: Netns,
    server: Server,
    operator: tempfile::TempDir,
    key: PathBuf,
}

impl Setup {
    fn new(server_args: &[&str], options: AgentOptions, sshd_listen: &[&str]) -> Self {
        require_root();
        require(TOOLS);
        let ns = Netns::new();
        let host = ns.host_ip().to_string();
        let mut args = vec!["--tls-name", host.as_str()];
        args.extend_from_slice(server_args);
        let server = Server::start(&args);
        let pkey = server.create_key("lab", None);
        let operator = tempfile::tempdir().unwrap();
        let (key, public) = client_key(operator.path());
        let sshd = start_sshd(&ns, operator.path(), &public, sshd_listen);
        server.login_operator("alice", "admin", &[], &operator.path().join("cfg"));
        let agent = Agent::new(&ns, &server, &pkey, options);
        Self {
            agent,
            sshd,
            ns,
            server,
            operator,
            key,
        }
    }

    fn cfg(&self) -> PathBuf {
        self.operator.path().join("cfg")
    }

    /// `floto ssh UUID [-p PORT] -- ARGS`.
    fn ssh(&self, uuid: &str, port: Option<u16>, args: &[&str]) -> std::process::Output {
        let mut cmd = floto(&self.cfg());
        cmd.args(["ssh", uuid]);
        if let Some(p) = port {
            cmd.args(["-p", &p.to_string()]);
        }
        output(
            cmd.arg("--")
                .args(ssh_opts(&self.key))
                .args(["-o", "ConnectTimeout=5"])
                .args(args),
        )
    }

    /// `floto ssh UUID -- ARGS` must work; returns its stdout.
    fn ssh_ok(&self, uuid: &str, args: &[&str]) -> String {
        let out = self.ssh(uuid, None, args);
        assert!(
            out.status.success(),
            "floto ssh {uuid} failed: {}\nagent log:\n{}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent.log(),
            self.sshd.log()
        );
        stdout(&out)
    }
}

fn tun() -> AgentOptions {
    AgentOptions {
        args: ["--tun"].iter().chain(FAST).map(|s| s.to_string()).collect(),
        user: None,
    }
}

#[test]
fn tun_mode_floto_ssh_runs_hostname_on_the_device() {
    let mut s = Setup::new(&[], tun(), &["0.0.0.0:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    // The status says what a person needs: connected, since, endpoint, address, expiry.
    assert_eq!(status["uuid"], uuid.as_str());
    assert_eq!(status["mode"], "tun");
    assert!(status["since"].is_string(), "{status}");
    let endpoint = status["endpoint"].as_str().expect("endpoint");
    assert!(endpoint.starts_with(&s.ns.host_ip().to_string()), "{endpoint}");
    assert!(status["cert_expires_at"].is_string());
    let overlay_ip = status["overlay_ip"].as_str().unwrap().to_owned();
    // The TUN interface carries the overlay address.
    let addrs = stdout(&output(s.ns.command("ip").args(["-4", "-o", "addr", "show", "floto0"])));
    assert!(addrs.contains(&overlay_ip), "{addrs}");
    s.server.wait_online(&uuid, true, Duration::from_secs(10));

    let hostname = stdout(&output(&mut s.ns.command("hostname")));
    assert_eq!(s.ssh_ok(&uuid, &["hostname"]), hostname);
    // sshd saw the connection come from the server's overlay address, through the TUN.
    let client = s.ssh_ok(&uuid, &["sh", "-c", "'echo $SSH_CLIENT'"]);
    assert!(client.starts_with("10.240.0.1 "), "{client}");

    // The human-readable status too.
    let text = stdout(&output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--state-dir"])
            .arg(s.agent.state_dir()),
    ));
    assert!(text.contains("connected since"), "{text}");
    assert!(text.contains(&overlay_ip), "{text}");
    s.agent.stop();
    let v = s.agent.status().unwrap();
    assert_eq!(v["running"], false, "{v}");
    assert_eq!(v["connected"], false, "{v}");
}

/// The uid the unprivileged agent runs as.
const NOBODY: u32 = 65_534;

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("effective uid")
}

#[test]
fn userspace_mode_without_root_forwards_only_the_listed_ports() {
    let options = AgentOptions {
        args: ["--userspace", "--forward", "22=127.0.0.1:22"]
            .iter()
            .chain(FAST)
            .map(|s| s.to_string())
            .collect(),
        user: Some(NOBODY),
    };
    // sshd listens on two loopback ports of the device; only 22 is forwarded.
    let mut s = Setup::new(&[], options, &["127.0.0.1:22", "127.0.0.1:2222"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    assert_eq!(status["mode"], "userspace");
    let pid = s.agent.pid().unwrap();
    assert_eq!(uid_of(pid), NOBODY, "the agent runs without root");
    // No TUN interface: the namespace has only lo and the veth.
    let links = stdout(&output(s.ns.command("ip").args(["-o", "link", "show"])));
    assert_eq!(links.lines().count(), 2, "{links}");

    let hostname = stdout(&output(&mut s.ns.command("hostname")));
    assert_eq!(s.ssh_ok(&uuid, &["hostname"]), hostname);
    // sshd sees the forwarder's loopback connection.
    let client = s.ssh_ok(&uuid, &["sh", "-c", "'echo $SSH_CLIENT'"]);
    assert!(client.starts_with("127.0.0.1 "), "{client}");

    // Port 2222 has a listener on the device, but is not forwarded: refused.
    let out = output(floto(&s.cfg()).args(["proxy", &uuid, "2222"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "proxy to an unforwarded port worked");
    assert!(err.contains("port 2222") && err.contains("unreachable"), "{err}");
    let out = s.ssh(&uuid, Some(2222), &["true"]);
    assert!(!out.status.success(), "ssh to an unforwarded port worked");
    // And the forwarded one still works after the refusal.
    assert_eq!(s.ssh_ok(&uuid, &["echo", "still-here"]), "still-here");
}
