//! WireGuard over TLS, the device side end to end: the real agent (`floto-tunnel run`, TUN
//! mode) in a network namespace whose firewall (nftables, inside the namespace) drops UDP, or
//! lets nothing out but an HTTP proxy (tinyproxy, on the host side of the link), against the
//! real server; OpenSSH's sshd on the device and `floto ssh` / scp through the broker. The
//! agent comes online over TLS when UDP is blocked from the start, through the proxy when
//! that is the only way out, moves back to UDP when UDP works again and to TLS when UDP stops
//! during a session, and an ssh session open across the move survives it. `--transport tls`
//! never tries UDP, `--transport udp` never opens a stream.
//!
//! Timings are printed (`cargo test -p floto-e2e --test wg_tls -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use floto_e2e::agent::{start_sshd, Agent, AgentOptions};
use floto_e2e::device::client_key;
use floto_e2e::net::Netns;
use floto_e2e::server::Server;
use floto_e2e::{
    bin, floto, output, require, require_root, run, ssh_opts, stdout, wait_for, Child,
};

const TOOLS: &[&str] = &[
    "sshd",
    "ssh",
    "scp",
    "ssh-keygen",
    "ss",
    "setpriv",
    "nft",
    "tinyproxy",
    "timeout",
    "bash",
];

/// The nftables table the tests put in a device's namespace (gone with the namespace).
/// How often the agent looks whether UDP works again, in these tests (default 3 min, at least
/// 10 s).
const PROBE_EVERY: Duration = Duration::from_secs(10);

fn probe_every_flags() -> Vec<String> {
    vec![
        "--udp-probe-every".into(),
        format!("{}s", PROBE_EVERY.as_secs()),
    ]
}

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
    /// `extra` are flags for `floto-tunnel run` besides `--tun` and a 2 s keepalive (a
    /// session that stops answering is dead after 9 s). The backoff cap stays at its default,
    /// so an attempt waits for its answer as long as by default (5 s).
    fn new(extra: &[String]) -> Self {
        require_root();
        require(TOOLS);
        let ns = Netns::new();
        let host = ns.host_ip().to_string();
        let server = Server::start(&["--tls-name", &host]);
        let pkey = server.create_key("lab", None);
        let operator = tempfile::tempdir().unwrap();
        let (key, public) = client_key(operator.path());
        let sshd = start_sshd(&ns, operator.path(), &public, &["0.0.0.0:22"]);
        server.login_operator("alice", "admin", &[], &operator.path().join("cfg"));
        let mut args: Vec<String> = ["--tun", "--keepalive", "2s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend_from_slice(extra);
        let agent = Agent::new(&ns, &server, &pkey, AgentOptions { args, user: None });
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

    /// `floto ssh UUID -- ARGS` must work; returns its stdout.
    fn ssh_ok(&self, uuid: &str, args: &[&str]) -> String {
        let out = output(
            floto(&self.cfg())
                .args(["ssh", uuid, "--"])
                .args(ssh_opts(&self.key))
                .args(args),
        );
        assert!(
            out.status.success(),
            "floto ssh {uuid} failed: {}\nagent log:\n{}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent.log(),
            self.sshd.log()
        );
        stdout(&out)
    }

    /// The API's port (the TLS transport's).
    fn api_port(&self) -> u16 {
        self.server.bound.api.port()
    }

    /// Waits until the agent says it is connected over `transport`; returns its status.
    fn wait_transport(&self, transport: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.agent.status() {
                if v["running"] == true && v["connected"] == true && v["transport"] == transport {
                    return v;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "the agent is not connected over {transport} after {timeout:?}: {:?}\n{}",
                self.agent.status(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the server shows the device online over `transport`.
    fn wait_server_sees(&self, uuid: &str, transport: &str) -> serde_json::Value {
        wait_for(
            Duration::from_secs(15),
            &format!("the server to see {uuid} over {transport}"),
            || {
                let v = self.server.device(uuid);
                (v["online"] == true && v["transport"] == transport).then_some(v)
            },
        )
    }
}

/// Whether a TCP connection from the namespace to `to` opens within 3 s.
fn tcp_reaches(ns: &Netns, to: SocketAddr) -> bool {
    output(ns.command("timeout").args([
        "3",
        "bash",
        "-c",
        &format!("echo > /dev/tcp/{}/{}", to.ip(), to.port()),
    ]))
    .status
    .success()
}

/// tinyproxy on the host's address of `ns`'s link, allowing only the namespace, CONNECT only
/// to `connect_port`. Killed on drop.
fn start_tinyproxy(ns: &Netns, dir: &Path, connect_port: u16) -> (Child, SocketAddr) {
    // A free port on the host's link address.
    let port = TcpListener::bind((ns.host_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen {host}\nTimeout 600\nAllow {dev}\nConnectPort {connect_port}\n\
             DisableViaHeader Yes\nLogLevel Info\nMaxClients 20\n",
            host = ns.host_ip(),
            dev = ns.dev_ip(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(floto_e2e::which("tinyproxy").unwrap());
    cmd.arg("-d").arg("-c").arg(&conf);
    let child = Child::spawn("tinyproxy", cmd, dir);
    let addr = SocketAddr::from((ns.host_ip(), port));
    wait_for(Duration::from_secs(10), "tinyproxy to listen", || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(drop)
    });
    (child, addr)
}

/// An ssh session kept open: a shell on the device that echoes every line back.
struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Session {
    fn open(s: &Setup, uuid: &str) -> Self {
        let mut child = floto(&s.cfg())
            .args(["ssh", uuid, "--"])
            .args(ssh_opts(&s.key))
            .args(["-T", "sh", "-c", "'while read l; do echo got-$l; done'"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Sends `text` and waits for the device's echo; returns how long it took.
    fn roundtrip(&mut self, text: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.send(text);
        self.expect(text, timeout);
        start.elapsed()
    }

    /// Types a line.
    fn send(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the device's echo of `text`.
    fn expect(&mut self, text: &str, timeout: Duration) {
        let got = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "no echo of {text:?} within {timeout:?} ({e}); ssh {}",
                match self.child.try_wait() {
                    Ok(Some(status)) => format!("exited: {status}"),
                    _ => "still running".to_owned(),
                }
            )
        });
        assert_eq!(got, format!("got-{text}"));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 10 MB to the device with scp and back, through `floto proxy` as ProxyCommand; the copies
/// must be equal.
fn scp_10_mb(s: &Setup, uuid: &str) -> Duration {
    let start = Instant::now();
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let dir = s.operator.path();
    let src = dir.join("payload.bin");
    std::fs::write(&src, &data).unwrap();
    let on_device = dir.join("on-device.bin");
    let proxy = format!(
        "{} --config-dir {} proxy %n %p",
        bin("floto").display(),
        s.cfg().display()
    );
    // -O: the scp protocol (the test's sshd has no sftp subsystem).
    run(Command::new("scp")
        .args(["-q", "-O", "-o", &format!("ProxyCommand={proxy}")])
        .args(ssh_opts(&s.key))
        .arg(&src)
        .arg(format!("root@{uuid}.floto:{}", on_device.display())));
    // The device's copy, checksummed on the device.
    let sum = s.ssh_ok(uuid, &["sha256sum", &on_device.display().to_string()]);
    let local = stdout(&run(Command::new("sha256sum").arg(&src)));
    assert_eq!(
        sum.split_whitespace().next(),
        local.split_whitespace().next(),
        "the file changed on the way to the device"
    );
    let back = dir.join("back.bin");
    run(Command::new("scp")
        .args(["-q", "-O", "-o", &format!("ProxyCommand={proxy}")])
        .args(ssh_opts(&s.key))
        .arg(format!("root@{uuid}.floto:{}", on_device.display()))
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the file changed on the way back"
    );
    start.elapsed()
}

fn host_port(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

#[test]
fn with_udp_blocked_the_agent_comes_online_over_tls_and_ssh_and_scp_work() {
    let mut s = Setup::new(&[]);
    s.ns.block_udp();
    let started = Instant::now();
    s.agent.start();
    let uuid = s.agent.uuid();
    let status = s.wait_transport("tls", Duration::from_secs(15));
    let online_after = started.elapsed();
    eprintln!("UDP blocked: online over TLS {online_after:?} after the agent started");
    assert_eq!(
        status["endpoint"],
        host_port(s.ns.host_ip(), s.api_port()),
        "{status}"
    );
    assert!(status["proxy"].is_null(), "{status}");
    // It tried UDP first, and said why it moved.
    let log = s.agent.log();
    assert!(log.contains("no answer over UDP"), "{log}");
    let view = s.wait_server_sees(&uuid, "tls");
    eprintln!("the server's view: {view}");

    let hostname = stdout(&output(&mut s.ns.command("hostname")));
    assert_eq!(s.ssh_ok(&uuid, &["hostname"]), hostname);
    let took = scp_10_mb(&s, &uuid);
    eprintln!("scp of 10 MB to the device and back over TLS: {took:?}");

    // The human-readable status names the transport.
    let text = stdout(&output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--state-dir"])
            .arg(s.agent.state_dir()),
    ));
    assert!(text.contains("transport    tls"), "{text}");
    // Still on TLS: UDP never answered a probe.
    assert_eq!(s.agent.status().unwrap()["transport"], "tls");
    s.agent.stop();
}

#[test]
fn with_only_an_http_proxy_out_the_agent_comes_online_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Setup::new(&[]);
    let (proxy, proxy_addr) = start_tinyproxy(&s.ns, dir.path(), s.api_port());
    // The agent of this test names the proxy (known only now).
    s.agent = Agent::new(
        &s.ns,
        &s.server,
        &s.server.create_key("lab", None),
        AgentOptions {
            args: ["--tun", "--keepalive", "2s", "--proxy"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("http://{proxy_addr}")])
                .collect(),
            user: None,
        },
    );
    let setup = &mut s;
    // The device has never been online: it enrolls through the proxy too.
    setup.ns.only_the_proxy(proxy_addr);
    // What the firewall lets through: the proxy, not the server.
    assert!(
        tcp_reaches(&setup.ns, proxy_addr),
        "the proxy is not reachable"
    );
    let api = SocketAddr::from((setup.ns.host_ip(), setup.api_port()));
    assert!(
        !tcp_reaches(&setup.ns, api),
        "the server's HTTPS port is reachable without the proxy"
    );
    let started = Instant::now();
    setup.agent.start();
    let uuid = setup.agent.uuid();
    let status = setup.wait_transport("tls", Duration::from_secs(20));
    eprintln!(
        "only a proxy out: enrolled and online over TLS through it {:?} after the agent started",
        started.elapsed()
    );
    assert_eq!(status["proxy"], format!("http://{proxy_addr}"), "{status}");
    setup.wait_server_sees(&uuid, "tls");
    let hostname = stdout(&output(&mut setup.ns.command("hostname")));
    assert_eq!(setup.ssh_ok(&uuid, &["hostname"]), hostname);
    // The stream went through the proxy.
    let log = proxy.log();
    let target = host_port(setup.ns.host_ip(), setup.api_port());
    assert!(
        log.lines()
            .any(|l| l.contains("CONNECT") && l.contains(&target)),
        "no CONNECT to {target} in tinyproxy's log:\n{log}"
    );
    let text = stdout(&output(
        Command::new(bin("floto-tunnel"))
            .args(["status", "--state-dir"])
            .arg(setup.agent.state_dir()),
    ));
    assert!(
        text.contains(&format!(
            "transport    tls (through proxy http://{proxy_addr})"
        )),
        "{text}"
    );
    setup.agent.stop();
}

#[test]
fn when_udp_works_again_the_agent_moves_back_and_an_open_ssh_session_goes_on() {
    let mut s = Setup::new(&probe_every_flags());
    s.ns.block_udp();
    s.agent.start();
    let uuid = s.agent.uuid();
    s.wait_transport("tls", Duration::from_secs(15));
    s.wait_server_sees(&uuid, "tls");
    let mut session = Session::open(&s, &uuid);
    session.roundtrip("1", Duration::from_secs(30));
    // While UDP stays blocked, the probes change nothing.
    std::thread::sleep(PROBE_EVERY + Duration::from_secs(7));
    assert_eq!(s.agent.status().unwrap()["transport"], "tls");
    session.roundtrip("2", Duration::from_secs(10));

    s.ns.unblock();
    let unblocked = Instant::now();
    let status = s.wait_transport("udp", PROBE_EVERY * 2);
    let back_after = unblocked.elapsed();
    eprintln!("UDP unblocked: back on UDP after {back_after:?} (probing every {PROBE_EVERY:?})");
    assert!(
        back_after <= PROBE_EVERY + Duration::from_secs(2),
        "back on UDP only after {back_after:?}"
    );
    let endpoint = status["endpoint"].as_str().unwrap();
    assert!(
        endpoint.starts_with(&format!("{}:", s.ns.host_ip()))
            && !endpoint.ends_with(&format!(":{}", s.api_port())),
        "{status}"
    );
    s.wait_server_sees(&uuid, "udp");
    let took = session.roundtrip("3", Duration::from_secs(15));
    eprintln!("the open ssh session answered {took:?} after the move");
    for i in 4..8 {
        session.roundtrip(&i.to_string(), Duration::from_secs(5));
    }
    // The stream is closed once the session is on UDP.
    wait_for(
        Duration::from_secs(15),
        "the agent to close its TLS stream",
        || {
            s.agent
                .log()
                .contains("TLS stream closed by the agent")
                .then_some(())
        },
    );
    session.roundtrip("8", Duration::from_secs(5));
    assert_eq!(s.agent.status().unwrap()["transport"], "udp");
    s.agent.stop();
}

#[test]
fn when_udp_stops_during_a_session_the_agent_moves_to_tls_and_the_session_survives() {
    let mut s = Setup::new(&probe_every_flags());
    s.agent.start();
    let uuid = s.agent.uuid();
    s.wait_transport("udp", Duration::from_secs(15));
    s.wait_server_sees(&uuid, "udp");
    let mut session = Session::open(&s, &uuid);
    session.roundtrip("1", Duration::from_secs(30));

    s.ns.block_udp();
    let blocked = Instant::now();
    // A line typed while the path is gone: it reaches the device, and its echo comes back,
    // after the move (TCP retransmits it over the new transport).
    std::thread::sleep(Duration::from_secs(1));
    let typed = Instant::now();
    session.send("2");
    let moved_after = loop {
        if let Some(v) = s.agent.status() {
            if v["connected"] == true && v["transport"] == "tls" {
                break blocked.elapsed();
            }
        }
        assert!(
            blocked.elapsed() < Duration::from_secs(40),
            "not on TLS 40 s after UDP was blocked: {:?}\n{}",
            s.agent.status(),
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "UDP blocked during a session: on TLS after {moved_after:?} (session dead after 9 s, one UDP attempt of 5 s)"
    );
    s.wait_server_sees(&uuid, "tls");
    session.expect("2", Duration::from_secs(60));
    eprintln!(
        "the line typed during the outage was echoed {:?} after it was typed ({:?} after the move)",
        typed.elapsed(),
        blocked.elapsed().saturating_sub(moved_after)
    );
    for i in 3..8 {
        session.roundtrip(&i.to_string(), Duration::from_secs(5));
    }
    // And a new one works too.
    assert_eq!(s.ssh_ok(&uuid, &["echo", "new"]), "new");
    assert_eq!(s.agent.status().unwrap()["transport"], "tls");
    s.agent.stop();
}

#[test]
fn transport_tls_goes_over_tls_at_once_and_transport_udp_never_does() {
    let mut s = Setup::new(&["--transport".into(), "tls".into()]);
    // UDP works, but the agent is told to use TLS only.
    let started = Instant::now();
    s.agent.start();
    let uuid = s.agent.uuid();
    s.wait_transport("tls", Duration::from_secs(5));
    eprintln!(
        "--transport tls: online over TLS {:?} after the agent started",
        started.elapsed()
    );
    s.wait_server_sees(&uuid, "tls");
    assert!(
        !s.agent
            .log()
            .contains("handshaking with the server endpoint="),
        "a UDP attempt with --transport tls:\n{}",
        s.agent.log()
    );
    assert_eq!(s.ssh_ok(&uuid, &["echo", "tls-only"]), "tls-only");
    s.agent.stop();

    // UDP only, with UDP blocked: no stream, ever; the agent says why it is not connected.
    s.ns.block_udp();
    s.agent = Agent::new(
        &s.ns,
        &s.server,
        &s.server.create_key("lab", None),
        AgentOptions {
            args: ["--tun", "--keepalive", "2s", "--transport", "udp"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            user: None,
        },
    );
    s.agent.start();
    let _ = s.agent.uuid();
    std::thread::sleep(Duration::from_secs(12));
    let status = s.agent.status().unwrap();
    assert_eq!(status["connected"], false, "{status}");
    assert_eq!(status["transport"], "udp", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("over udp got no answer")),
        "{status}"
    );
    let log = s.agent.log();
    assert!(!log.contains("TLS stream"), "{log}");
    s.agent.stop();
}
