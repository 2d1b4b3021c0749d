//! The device agent `floto-tunnel run` end to end: the real server, the real agent in a
//! network namespace (TUN mode as root; userspace mode as an unprivileged user), OpenSSH's
//! sshd on the device and `floto ssh` with the real ssh client through the broker. Through a
//! server SIGKILL and restart, a change of the device's address, certificates that expire
//! every 30 s, damaged state dirs, and server endpoints that stop answering (the agent moves
//! on to the next).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::net::Ipv4Addr;
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
        args: ["--tun"]
            .iter()
            .chain(FAST)
            .map(|s| s.to_string())
            .collect(),
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
    assert!(
        endpoint.starts_with(&s.ns.host_ip().to_string()),
        "{endpoint}"
    );
    assert!(status["cert_expires_at"].is_string());
    let overlay_ip = status["overlay_ip"].as_str().unwrap().to_owned();
    // The TUN interface carries the overlay address.
    let addrs = stdout(&output(
        s.ns.command("ip")
            .args(["-4", "-o", "addr", "show", "floto0"]),
    ));
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
    assert!(
        err.contains("port 2222") && err.contains("unreachable"),
        "{err}"
    );
    let out = s.ssh(&uuid, Some(2222), &["true"]);
    assert!(!out.status.success(), "ssh to an unforwarded port worked");
    // And the forwarded one still works after the refusal.
    assert_eq!(s.ssh_ok(&uuid, &["echo", "still-here"]), "still-here");
}

fn userspace_as_nobody() -> AgentOptions {
    AgentOptions {
        args: ["--userspace", "--forward", "22"]
            .iter()
            .chain(FAST)
            .map(|s| s.to_string())
            .collect(),
        user: Some(NOBODY),
    }
}

/// Polls `floto ssh UUID -- true` until it works; the time it took.
fn time_until_reachable(s: &Setup, uuid: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if s.ssh(uuid, None, &["true"]).status.success() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "device {uuid} not reachable within {limit:?}\nagent log:\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn after_a_server_sigkill_and_restart_the_device_is_back_within_10_s() {
    let mut s = Setup::new(&[], tun(), &["0.0.0.0:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    s.agent.wait_connected(Duration::from_secs(30));
    s.ssh_ok(&uuid, &["true"]);
    let agent_pid = s.agent.pid();

    s.server.kill();
    // Down long enough for the agent to notice (keepalive 2 s: dead after 9 s of silence).
    std::thread::sleep(Duration::from_secs(3));
    s.server.start_again();
    let reachable = time_until_reachable(&s, &uuid, Duration::from_secs(40));
    let online = s.server.device(&uuid)["online"] == true;
    eprintln!(
        "server SIGKILLed, down 3 s, restarted: device reachable by floto ssh {:.1} s after the server listened again (online: {online})",
        reachable.as_secs_f64()
    );
    assert!(online, "reachable but not shown online");
    assert_eq!(s.agent.pid(), agent_pid, "the agent was not restarted");
    assert!(
        reachable < Duration::from_secs(10),
        "the device came back {reachable:?} after the server listened again (limit 10 s)\nagent log:\n{}",
        s.agent.log()
    );
}

/// With the default 25 s keepalive the agent itself would notice the dead session only after
/// 55 s: the device is back within 10 s only because the restarted server calls it back
/// (handshakes to persisted endpoints, DESIGN.md), and the agent answers as responder.
#[test]
fn after_a_server_restart_the_server_calls_the_device_back_within_10_s() {
    let options = AgentOptions {
        args: vec!["--tun".into()],
        user: None,
    };
    let mut s = Setup::new(&[], options, &["0.0.0.0:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    s.agent.wait_connected(Duration::from_secs(30));
    s.ssh_ok(&uuid, &["true"]);

    s.server.kill();
    std::thread::sleep(Duration::from_secs(3));
    s.server.start_again();
    // Measure the real time (up to the agent's own 55 s detection and beyond), then judge.
    let reachable = time_until_reachable(&s, &uuid, Duration::from_secs(90));
    eprintln!(
        "server SIGKILLed and restarted, default 25 s keepalive: device reachable {:.1} s after the server listened again",
        reachable.as_secs_f64()
    );
    assert_eq!(
        s.agent.status().unwrap()["connects"],
        1,
        "the agent answered the server's handshake within its session, without reconnecting"
    );
    assert!(
        reachable < Duration::from_secs(10),
        "the device came back {reachable:?} after the server listened again (limit 10 s)\nagent log:\n{}\nserver log:\n{}",
        s.agent.log(),
        s.server.child.log()
    );
}

#[test]
fn a_device_whose_address_changes_stays_reachable_without_a_restart() {
    let mut s = Setup::new(&[], userspace_as_nobody(), &["127.0.0.1:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    s.agent.wait_connected(Duration::from_secs(30));
    s.ssh_ok(&uuid, &["true"]);
    let pid = s.agent.pid();
    let endpoint = |s: &Setup| {
        s.server.device(&uuid)["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(endpoint(&s).starts_with(&format!("{}:", s.ns.dev_ip())));
    for _ in 0..2 {
        let moved = Instant::now();
        let new_ip = s.ns.roam();
        wait_for(
            Duration::from_secs(10),
            "the server to see the new address",
            || {
                endpoint(&s)
                    .starts_with(&format!("{new_ip}:"))
                    .then_some(())
            },
        );
        let seen = moved.elapsed();
        s.ssh_ok(&uuid, &["true"]);
        eprintln!(
            "device moved to {new_ip}: server saw the new endpoint after {:.1} s, floto ssh works",
            seen.as_secs_f64()
        );
    }
    assert_eq!(s.agent.pid(), pid, "the agent was not restarted");
    let status = s.agent.status().unwrap();
    assert_eq!(status["connected"], true);
    assert_eq!(
        status["connects"], 1,
        "the session itself survived the moves: {status}"
    );
}

#[test]
fn a_revoked_device_stops_retrying_and_says_so() {
    let mut s = Setup::new(&[], tun(), &["0.0.0.0:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    s.agent.wait_connected(Duration::from_secs(30));
    let revoke = s.server.admin(&["device", "revoke", &uuid]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    // The session is dropped, handshakes fail, the agent checks in with the API and learns
    // why: one clear log line, then quiet.
    let status = wait_for(
        Duration::from_secs(60),
        "the agent to see the revocation",
        || s.agent.status().filter(|v| v["revoked"] == true),
    );
    assert_eq!(status["connected"], false);
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{status}"
    );
    let log = s.agent.log();
    assert_eq!(log.matches("REVOKED").count(), 1, "{log}");
    let attempts = |log: &str| {
        log.matches("handshaking with the server").count() + log.matches("handshake failed").count()
    };
    let before = attempts(&log);
    std::thread::sleep(Duration::from_secs(10));
    let log = s.agent.log();
    assert_eq!(
        attempts(&log),
        before,
        "the revoked agent keeps trying:\n{log}"
    );
    assert_eq!(log.matches("REVOKED").count(), 1, "{log}");
    let text = stdout(&output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--state-dir"])
            .arg(s.agent.state_dir()),
    ));
    assert!(text.contains("REVOKED"), "{text}");
    eprintln!("revoked: {}", status["last_error"]);
}

#[test]
fn when_the_server_moves_to_another_address_in_dns_the_device_follows() {
    const NAME: &str = "floto-server.test";
    let mut s = Setup::new(&["--tls-name", NAME], tun(), &["0.0.0.0:22"]);
    let old_ip = s.ns.host_ip();
    let new_ip = Ipv4Addr::from(u32::from(old_ip) + 3);
    // The server's second address on the link; it survives the removal of the first.
    floto_e2e::run(Command::new("sysctl").args([
        "-q",
        "-w",
        &format!("net.ipv4.conf.{}.promote_secondaries=1", s.ns.host_if),
    ]));
    floto_e2e::run(Command::new("ip").args([
        "addr",
        "add",
        &format!("{new_ip}/29"),
        "dev",
        &s.ns.host_if,
    ]));
    s.ns.set_hosts(&[(NAME, old_ip)]);
    // The device knows the server by name: the API URL, and so the WireGuard endpoint.
    let config = std::fs::read_to_string(s.agent.config_file()).unwrap();
    std::fs::write(
        s.agent.config_file(),
        config.replace(&format!("https://{old_ip}:"), &format!("https://{NAME}:")),
    )
    .unwrap();
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    assert!(
        status["configured_endpoint"]
            .as_str()
            .unwrap()
            .starts_with(NAME),
        "{status}"
    );
    assert!(
        status["endpoint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{old_ip}:")),
        "{status}"
    );
    s.ssh_ok(&uuid, &["true"]);

    // The server moves: the name points to the new address, the old one is gone.
    s.ns.set_hosts(&[(NAME, new_ip)]);
    floto_e2e::run(Command::new("ip").args([
        "addr",
        "del",
        &format!("{old_ip}/29"),
        "dev",
        &s.ns.host_if,
    ]));
    // Nothing comes from the server unasked: the agent notices the dead session itself,
    // resolves the name again and handshakes with the new address.
    let moved = Instant::now();
    wait_for(
        Duration::from_secs(40),
        "the agent to follow the server",
        || {
            s.agent.status().filter(|v| {
                v["connected"] == true
                    && v["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.starts_with(&format!("{new_ip}:")))
            })
        },
    );
    eprintln!(
        "server moved from {old_ip} to {new_ip} in DNS: the agent handshook with the new address after {:.1} s (keepalive 2 s: dead after 9 s)",
        moved.elapsed().as_secs_f64()
    );
    let log = s.agent.log();
    assert!(
        log.contains(&format!("handshaking with the server endpoint={new_ip}:")),
        "{log}"
    );
    assert_eq!(s.ssh_ok(&uuid, &["echo", "followed"]), "followed");
}

/// TUN mode with the default timings: a handshake gets 5 s to be answered, and the first
/// retry follows within 1 s.
fn tun_default_timings() -> AgentOptions {
    AgentOptions {
        args: vec!["--tun".into()],
        user: None,
    }
}

/// An address that never answers the device: its own loopback, where nothing listens on the
/// server's ports (TCP is refused, UDP goes unanswered).
const DEAD: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The most a device with a dead first endpoint may take to come online through the next
/// one: one handshake timeout (5 s), the first retry's jitter (up to 1 s), and slack for
/// starting up (and enrolling) on a busy machine.
const FAILOVER_LIMIT: Duration = Duration::from_secs(10);

/// Checks what the agent's log says about one failover: the first attempt went to `dead` and
/// got no answer, the next one to `live`, and nothing else failed.
fn assert_one_failover(log: &str, dead: &str, live: &str) {
    let dead_at = log
        .find(&format!("handshaking with the server endpoint={dead}"))
        .unwrap_or_else(|| panic!("no attempt at {dead}:\n{log}"));
    let live_at = log
        .find(&format!("handshaking with the server endpoint={live}"))
        .unwrap_or_else(|| panic!("no attempt at {live}:\n{log}"));
    assert!(dead_at < live_at, "{dead} was not tried first:\n{log}");
    assert_eq!(log.matches("handshake failed").count(), 1, "{log}");
}

/// A cluster node dies and its name leads nowhere. The device was enrolled through that name
/// (so it is also its WireGuard endpoint); its config lists a second server. Restarted, the
/// agent handshakes with the dead name once, then with the second server's host (on the
/// assigned endpoint's port), stays there, and renews its certificate through the second
/// server too.
#[test]
fn when_the_assigned_endpoint_is_dead_the_agent_comes_online_through_its_second_server() {
    const NODE_A: &str = "node-a.test";
    let mut s = Setup::new(
        &["--tls-name", NODE_A, "--cert-lifetime", "30s"],
        tun_default_timings(),
        &["0.0.0.0:22"],
    );
    let live = s.ns.host_ip();
    let (api, wg) = (s.server.bound.api.port(), s.server.bound.wg.port());
    // At first node A is the server: the device enrolls through it and is told its name.
    s.ns.set_hosts(&[(NODE_A, live)]);
    let node_a = format!("https://{NODE_A}:{api}");
    s.agent
        .set_servers(&[node_a.clone(), s.server.api_url(live.into())]);
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    assert_eq!(status["server"], node_a.as_str(), "{status}");
    assert_eq!(
        status["configured_endpoint"],
        format!("{NODE_A}:{wg}").as_str(),
        "{status}"
    );
    s.agent.stop();

    // Node A is gone: its name leads to an address where nothing answers.
    s.ns.set_hosts(&[(NODE_A, DEAD)]);
    let started = Instant::now();
    s.agent.start();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    let online_after = started.elapsed();
    let live_endpoint = format!("{live}:{wg}");
    eprintln!(
        "assigned endpoint dead, second server's host live: the agent was online {:.1} s after it started",
        online_after.as_secs_f64()
    );
    assert_eq!(status["endpoint"], live_endpoint.as_str(), "{status}");
    assert_one_failover(&s.agent.log(), &format!("{DEAD}:{wg}"), &live_endpoint);
    assert!(
        online_after < FAILOVER_LIMIT,
        "online {online_after:?} after the start (limit {FAILOVER_LIMIT:?})\n{}",
        s.agent.log()
    );
    s.server.wait_online(&uuid, true, Duration::from_secs(10));
    assert_eq!(s.ssh_ok(&uuid, &["echo", "through-b"]), "through-b");

    // The 30 s certificate is renewed at about 20 s: node A, where the device enrolled, is
    // asked first and does not answer; the second server renews.
    let renewed = wait_for(Duration::from_secs(40), "a renewal", || {
        s.agent
            .status()
            .filter(|v| v["renewals"].as_u64().unwrap_or(0) >= 1)
    });
    let log = s.agent.log();
    assert!(
        log.contains("asking the next server") && log.contains(&node_a),
        "the renewal did not move on from node A:\n{log}"
    );
    assert_eq!(renewed["connected"], true, "{renewed}");
    assert_eq!(s.ssh_ok(&uuid, &["echo", "renewed"]), "renewed");
}

/// One name with two addresses (two nodes behind one DNS name), the first dead, and a first
/// server URL that refuses connections. The agent enrolls through the second URL and comes
/// online through the name's live address after one unanswered handshake.
#[test]
fn with_a_dead_first_server_and_a_name_with_a_dead_and_a_live_address_the_agent_comes_online() {
    const NODES: &str = "nodes.test";
    let mut s = Setup::new(
        &["--tls-name", NODES],
        tun_default_timings(),
        &["0.0.0.0:22"],
    );
    let live = s.ns.host_ip();
    let (api, wg) = (s.server.bound.api.port(), s.server.bound.wg.port());
    // The dead address first (a resolver sorting by RFC 6724 puts loopback first anyway).
    s.ns.set_hosts(&[(NODES, DEAD), (NODES, live)]);
    let nodes = format!("https://{NODES}:{api}");
    s.agent
        .set_servers(&[format!("https://{DEAD}:{api}"), nodes.clone()]);
    let started = Instant::now();
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.agent.wait_connected(Duration::from_secs(30));
    let online_after = started.elapsed();
    eprintln!(
        "first server refusing connections, endpoint name with a dead and a live address: the agent enrolled and was online {:.1} s after it started",
        online_after.as_secs_f64()
    );
    let log = s.agent.log();
    assert!(
        log.contains("asking the next server"),
        "the enrollment did not move on from the first server:\n{log}"
    );
    assert_eq!(status["server"], nodes.as_str(), "{status}");
    assert_eq!(
        status["configured_endpoint"],
        format!("{NODES}:{wg}").as_str(),
        "{status}"
    );
    let live_endpoint = format!("{live}:{wg}");
    assert_eq!(status["endpoint"], live_endpoint.as_str(), "{status}");
    assert_one_failover(&log, &format!("{DEAD}:{wg}"), &live_endpoint);
    assert!(
        online_after < FAILOVER_LIMIT,
        "online {online_after:?} after the start (limit {FAILOVER_LIMIT:?})\n{log}"
    );
    // `floto-tunnel status` names the endpoint in use.
    let text = stdout(&output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--state-dir"])
            .arg(s.agent.state_dir()),
    ));
    assert!(
        text.contains(&format!("endpoint     {live_endpoint}")),
        "{text}"
    );
    s.server.wait_online(&uuid, true, Duration::from_secs(10));
    assert_eq!(
        s.ssh_ok(&uuid, &["echo", "through-the-live-one"]),
        "through-the-live-one"
    );
}

/// Copies a state dir (files only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// `floto-tunnel status --json --state-dir DIR` (which loads, and so recovers, the identity).
fn offline_status(dir: &Path) -> std::process::Output {
    output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--json", "--state-dir"])
            .arg(dir),
    )
}

fn rfc3339(v: &serde_json::Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        v.as_str().expect("a time"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
}

#[test]
fn short_certificates_renew_without_a_gap_and_an_expired_device_re_enrolls() {
    let mut s = Setup::new(&["--cert-lifetime", "30s"], tun(), &["0.0.0.0:22"]);
    s.agent.start();
    let uuid = s.agent.uuid();
    let first = s.agent.wait_connected(Duration::from_secs(30));
    let overlay_ip = first["overlay_ip"].clone();
    let work = tempfile::tempdir().unwrap();
    let before = work.path().join("before");
    copy_dir(&s.agent.state_dir(), &before);

    // Pings through the tunnel and an ssh every few seconds while it renews three times.
    let ping = Ping::start(
        &s.ns,
        "10.240.0.1".parse().unwrap(),
        Duration::from_millis(200),
        work.path(),
    );
    let start = Instant::now();
    let mut sessions = 0;
    let renewed = loop {
        s.ssh_ok(&uuid, &["true"]);
        sessions += 1;
        let v = s.agent.status().unwrap();
        if v["renewals"].as_u64().unwrap_or(0) >= 3 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(100),
            "fewer than 3 renewals in 100 s: {v}\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let report = ping.stop();
    eprintln!(
        "3 renewals of 30 s certificates in {:.0} s: {sessions} ssh sessions all worked; pings {}/{} answered, longest gap {:.2} s",
        start.elapsed().as_secs_f64(),
        report.received,
        report.sent,
        report.max_gap.as_secs_f64()
    );
    assert!(report.max_gap < Duration::from_secs(1), "{report:?}");
    assert!(report.received + 5 >= report.sent, "{report:?}");
    assert!(rfc3339(&renewed["cert_expires_at"]) > rfc3339(&first["cert_expires_at"]));
    assert_eq!(renewed["connected"], true);
    // Each renewal brought a fresh key.
    let after_renewals = work.path().join("after");
    copy_dir(&s.agent.state_dir(), &after_renewals);
    assert_ne!(
        read(&before, "device.key"),
        read(&after_renewals, "device.key")
    );
    assert!(!after_renewals.join("device.key.next").exists());

    // The device is off past its certificate's expiry, then starts again: it re-enrolls
    // with the provisioning key and keeps its UUID and overlay address.
    s.agent.stop();
    let expiry = rfc3339(&s.agent.status().unwrap()["cert_expires_at"]);
    while time::OffsetDateTime::now_utc() < expiry + time::Duration::seconds(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    s.agent.start();
    let back = s.agent.wait_connected(Duration::from_secs(30));
    assert_eq!(back["uuid"], uuid.as_str());
    assert_eq!(back["overlay_ip"], overlay_ip);
    assert!(rfc3339(&back["cert_expires_at"]) > time::OffsetDateTime::now_utc());
    assert!(s.agent.log().contains("Reenroll"), "{}", s.agent.log());
    let d = s.server.device(&uuid);
    assert_eq!(d["overlay_ip"], overlay_ip);
    assert_eq!(s.ssh_ok(&uuid, &["echo", "back"]), "back");
    let devices = s.server.admin(&["device", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&devices.stdout).unwrap();
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "no second identity: {list}"
    );

    // A renewal cut short by a crash, at either rename, is completed at the next load.
    let old = &before;
    let new = &after_renewals;
    for (name, setup) in [
        ("both renames pending", 0),
        ("key renamed, certificate pending", 1),
    ] {
        let d = work.path().join(format!("crash-{setup}"));
        copy_dir(old, &d);
        std::fs::remove_file(d.join("status.json")).ok();
        if setup == 0 {
            std::fs::copy(new.join("device.key"), d.join("device.key.next")).unwrap();
        } else {
            std::fs::copy(new.join("device.key"), d.join("device.key")).unwrap();
        }
        std::fs::copy(new.join("device.pem"), d.join("device.pem.next")).unwrap();
        let out = offline_status(&d);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(read(&d, "device.key"), read(new, "device.key"), "{name}");
        assert_eq!(read(&d, "device.pem"), read(new, "device.pem"), "{name}");
        assert!(!d.join("device.key.next").exists() && !d.join("device.pem.next").exists());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["uuid"], uuid.as_str(), "{name}");
    }
}

#[test]
fn a_damaged_state_dir_is_refused_with_a_clear_error_never_replaced() {
    require(&["ss"]);
    let server = Server::start(&[]);
    let pkey = server.create_key("lab", None);
    let work = tempfile::tempdir().unwrap();
    let template = work.path().join("template");
    let enrolled = output(
        Command::new(bin("floto-tunnel"))
            .args(["enroll", "--server", &server.local_url(), "--ca"])
            .arg(server.ca_path())
            .args(["--provisioning-key", &pkey, "--state-dir"])
            .arg(&template),
    );
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let uuid = stdout(&enrolled).lines().last().unwrap().to_owned();

    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, &[&str])> = vec![
        (
            "truncated certificate",
            |d| {
                let p = d.join("device.pem");
                let t = std::fs::read(&p).unwrap();
                std::fs::write(&p, &t[..t.len() / 2]).unwrap();
            },
            &["device.pem"],
        ),
        (
            "truncated device key",
            |d| {
                let p = d.join("device.key");
                let t = std::fs::read(&p).unwrap();
                std::fs::write(&p, &t[..t.len() / 2]).unwrap();
            },
            &["device.key"],
        ),
        (
            "empty WireGuard key",
            |d| std::fs::write(d.join("wg.key"), "").unwrap(),
            &["wg.key"],
        ),
        (
            "truncated state.json",
            |d| {
                let p = d.join("state.json");
                let t = std::fs::read(&p).unwrap();
                std::fs::write(&p, &t[..t.len() / 2]).unwrap();
            },
            &["state.json"],
        ),
        (
            "world-readable device key",
            |d| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(
                    d.join("device.key"),
                    std::fs::Permissions::from_mode(0o644),
                )
                .unwrap();
            },
            &["device.key", "readable by group or others", "chmod 600"],
        ),
        (
            "group-readable WireGuard key",
            |d| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(d.join("wg.key"), std::fs::Permissions::from_mode(0o640))
                    .unwrap();
            },
            &["wg.key", "readable by group or others"],
        ),
        (
            "missing certificate",
            |d| std::fs::remove_file(d.join("device.pem")).unwrap(),
            &["device.pem", "missing"],
        ),
        (
            "keys without state.json",
            |d| std::fs::remove_file(d.join("state.json")).unwrap(),
            &["keys are present"],
        ),
    ];
    for (name, damage, expected) in cases {
        let dir = work.path().join(name.replace(' ', "-"));
        copy_dir(&template, &dir);
        damage(&dir);
        let files_before: Vec<(String, Vec<u8>)> = snapshot(&dir);
        // A provisioning key is configured: the agent could enroll anew, and must not.
        let mut cmd = Command::new(bin("floto-tunnel"));
        cmd.args([
            "run",
            "--manage-sshd=false",
            "--userspace",
            "--forward",
            "22",
            "--server",
            &server.local_url(),
            "--ca",
        ])
        .arg(server.ca_path())
        .args(["--provisioning-key", &pkey, "--state-dir"])
        .arg(&dir);
        let child = Child::spawn(
            &format!("agent-{}", name.replace(' ', "-")),
            cmd,
            work.path(),
        );
        let mut child = child;
        let status = wait_for(
            Duration::from_secs(20),
            &format!("the agent to refuse: {name}"),
            || child.inner.try_wait().ok().flatten(),
        );
        let log = child.log();
        assert_eq!(
            status.code(),
            Some(65),
            "{name}: exit status {status:?}\n{log}"
        );
        for e in expected {
            assert!(
                log.contains(e),
                "{name}: the error does not say {e:?}:\n{log}"
            );
        }
        assert!(
            log.contains("Not creating a new identity"),
            "{name}:\n{log}"
        );
        assert_eq!(
            snapshot(&dir),
            files_before,
            "{name}: the state dir was changed"
        );
        eprintln!(
            "{name}: refused: {}",
            log.lines().last().unwrap_or_default()
        );
    }
    let devices = server.admin(&["device", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&devices.stdout).unwrap();
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "no new identity on the server: {list}"
    );
    assert_eq!(list[0]["uuid"], uuid.as_str());
}

/// Names and contents of the files in a directory, sorted.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}
