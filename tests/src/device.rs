//! A device nobody here wrote: wireguard-go configured with `wg`, plus OpenSSH's sshd,
//! inside a network namespace, enrolled with `floto-tunnel enroll`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::net::Netns;
use crate::server::Server;
use crate::{bin, output, run, stdout, wait_for, Child};

/// An enrolled device in its own namespace.
#[derive(Debug)]
pub struct WgGoDevice {
    // Fields drop in order: processes first (their logs live in `dir`), then the namespace.
    wireguard_go: Option<Child>,
    sshd: Option<Child>,
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub uuid: String,
    pub overlay_ip: Ipv4Addr,
    server_public_key: String,
    keepalive: Option<u32>,
}

impl WgGoDevice {
    /// Creates the namespace and enrolls a device in it over HTTPS to the server's address
    /// on the link. The server must list that address with `--tls-name`; use
    /// [`WgGoDevice::server_args`] before starting it.
    pub fn enroll(ns: Netns, server: &Server, key: &str) -> Self {
        crate::require(&["ip"]);
        let dir = tempfile::Builder::new()
            .prefix("floto-dev-")
            .tempdir()
            .expect("temp dir");
        let state = dir.path().join("state");
        let out = run(ns
            .command(bin("floto-tunnel"))
            .arg("enroll")
            .arg("--server")
            .arg(server.api_url(ns.host_ip().into()))
            .arg("--ca")
            .arg(server.ca_path())
            .arg("--provisioning-key")
            .arg(key)
            .arg("--state-dir")
            .arg(&state));
        let uuid = crate::last_line(&out);
        let status = run(ns
            .command(bin("floto-tunnel"))
            .args(["status", "--json", "--state-dir"])
            .arg(&state));
        let v: serde_json::Value = serde_json::from_str(&stdout(&status)).expect("status json");
        let overlay_ip = v["overlay_ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("overlay_ip in status");
        Self {
            ns,
            dir,
            uuid,
            overlay_ip,
            server_public_key: String::new(),
            keepalive: None,
            wireguard_go: None,
            sshd: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A device in `ns` that is not enrolled anywhere, to be configured with
    /// [`up_with`](Self::up_with) (reference setups: wireguard-go on both ends).
    pub fn bare(ns: Netns) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("floto-dev-")
            .tempdir()
            .expect("temp dir");
        Self {
            wireguard_go: None,
            sshd: None,
            ns,
            dir,
            uuid: String::new(),
            overlay_ip: Ipv4Addr::UNSPECIFIED,
            server_public_key: String::new(),
            keepalive: None,
        }
    }

    /// Brings the tunnel up with wireguard-go, configured by `wg setconf` from the
    /// wg-quick config `floto-tunnel wg-config` prints.
    pub fn up(&mut self) {
        let conf = run(self
            .ns
            .command(bin("floto-tunnel"))
            .args(["wg-config", "--state-dir"])
            .arg(self.state_dir()));
        let text = String::from_utf8_lossy(&conf.stdout).to_string();
        self.up_with(&text);
    }

    /// Brings the tunnel up with wireguard-go from a wg-quick config (with `Address`).
    pub fn up_with(&mut self, wg_quick: &str) {
        crate::require(&["wireguard-go", "wg"]);
        let text = wg_quick;
        // `wg setconf` takes the [Interface]/[Peer] keys wg itself knows; Address is wg-quick's.
        let address = text
            .lines()
            .find_map(|l| l.strip_prefix("Address = "))
            .expect("Address line")
            .to_owned();
        if let Some(ip) = address.split('/').next().and_then(|a| a.parse().ok()) {
            self.overlay_ip = ip;
        }
        self.server_public_key = text
            .lines()
            .find_map(|l| l.strip_prefix("PublicKey = "))
            .expect("PublicKey line")
            .to_owned();
        let allowed = text
            .lines()
            .find_map(|l| l.strip_prefix("AllowedIPs = "))
            .expect("AllowedIPs line")
            .to_owned();
        let keepalive = self.keepalive;
        let wg_conf: String = text
            .lines()
            .filter(|l| !l.starts_with("Address"))
            .map(
                |l| match (l.starts_with("PersistentKeepalive"), keepalive) {
                    (true, Some(k)) => format!("PersistentKeepalive = {k}\n"),
                    _ => format!("{l}\n"),
                },
            )
            .collect();
        let conf_path = self.dir.path().join("wg.conf");
        std::fs::write(&conf_path, wg_conf).expect("write wg conf");
        let iface = self.ns.wg_iface();
        let mut cmd = self.ns.command("wireguard-go");
        cmd.args(["-f", &iface]).env("LOG_LEVEL", "error");
        self.wireguard_go = Some(Child::spawn(
            &format!("wireguard-go-{}", self.ns.name),
            cmd,
            self.dir.path(),
        ));
        wait_for(Duration::from_secs(10), "wireguard-go's interface", || {
            output(self.ns.command("ip").args(["link", "show", &iface]))
                .status
                .success()
                .then_some(())
        });
        run(self
            .ns
            .command("wg")
            .args(["setconf", &iface])
            .arg(&conf_path));
        self.ns.ip(&["addr", "add", &address, "dev", &iface]);
        self.ns.ip(&["link", "set", &iface, "up"]);
        self.ns.ip(&["route", "add", &allowed, "dev", &iface]);
    }

    /// Unix times of the latest handshake wireguard-go reports (0 before the first).
    pub fn latest_handshake(&self) -> u64 {
        let out =
            output(
                self.ns
                    .command("wg")
                    .args(["show", &self.ns.wg_iface(), "latest-handshakes"]),
            );
        stdout(&out)
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    /// Starts OpenSSH's sshd in the namespace, accepting `authorized_key` for root.
    pub fn start_sshd(&mut self, authorized_key: &str) {
        self.start_sshd_with(authorized_key, "");
    }

    /// The sshd's log (its stderr), while it runs.
    pub fn sshd_log(&self) -> String {
        self.sshd.as_ref().map(Child::log).unwrap_or_default()
    }

    /// As [`start_sshd`](Self::start_sshd), with `extra` lines first in its config (the
    /// first value of an option wins in sshd_config). Its host key is made once and kept.
    pub fn start_sshd_with(&mut self, authorized_key: &str, extra: &str) {
        crate::require(&["sshd", "ssh-keygen"]);
        self.sshd = None;
        let d = self.dir.path();
        let host_key = d.join("ssh_host_ed25519_key");
        if !host_key.exists() {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key));
        }
        let auth = d.join("authorized_keys");
        std::fs::write(&auth, authorized_key).expect("authorized_keys");
        let config = d.join("sshd_config");
        // Sessions get the test's dir as HOME, so they do not read the machine's own
        // dotfiles (root's .bashrc may run slow or blocking tools, such as pyenv's rehash
        // waiting a minute on a stale lock).
        std::fs::write(
            &config,
            format!(
                "{extra}Port 22\nListenAddress 0.0.0.0\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\nSetEnv HOME={}\n",
                host_key.display(),
                auth.display(),
                d.display()
            ),
        )
        .expect("sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("sshd privilege separation dir");
        let sshd = crate::which("sshd").expect("sshd");
        let mut cmd = self.ns.command(sshd);
        cmd.arg("-D").arg("-e").arg("-f").arg(&config);
        self.sshd = Some(Child::spawn(&format!("sshd-{}", self.ns.name), cmd, d));
        wait_for(Duration::from_secs(10), "sshd to listen", || {
            let out = output(self.ns.command("ss").args(["-ltn", "sport = :22"]));
            stdout(&out).contains(":22").then_some(())
        });
    }

    /// Uses this persistent keepalive (seconds) instead of the server's, from the next
    /// [`up`](Self::up). (wireguard-go arms its keepalive timer at the handshake, so the
    /// interval must be set before it.)
    pub fn set_keepalive(&mut self, secs: u32) {
        self.keepalive = Some(secs);
    }

    /// Stops wireguard-go (the device goes silent).
    pub fn down(&mut self) {
        self.wireguard_go = None;
    }
}

/// An ssh client key pair for the tests: (private key path, public key line).
pub fn client_key(dir: &std::path::Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public)
}

/// A wireguard-go interface in the host namespace playing the server: the reference that
/// floto-vpn-server is compared with. Deleted on drop.
#[derive(Debug)]
pub struct WgGoHost {
    pub iface: String,
    pub public_key: String,
    pub port: u16,
    pub address: Ipv4Addr,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl WgGoHost {
    /// `iface` must be unique on the host; `address` is the host's overlay address (/24).
    pub fn new(iface: &str, address: Ipv4Addr) -> Self {
        crate::require_root();
        crate::require(&["wireguard-go", "wg", "ip"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let _ = output(Command::new("ip").args(["link", "del", iface]));
        let (private, public_key) = wg_keypair();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, format!("{private}\n")).expect("key");
        let port = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.local_addr())
            .expect("free UDP port")
            .port();
        let mut cmd = Command::new("wireguard-go");
        cmd.args(["-f", iface]).env("LOG_LEVEL", "error");
        let child = Child::spawn(&format!("wireguard-go-{iface}"), cmd, dir.path());
        wait_for(Duration::from_secs(10), "the reference interface", || {
            output(Command::new("ip").args(["link", "show", iface]))
                .status
                .success()
                .then_some(())
        });
        run(Command::new("wg")
            .args([
                "set",
                iface,
                "listen-port",
                &port.to_string(),
                "private-key",
            ])
            .arg(&key_file));
        run(Command::new("ip").args(["addr", "add", &format!("{address}/24"), "dev", iface]));
        run(Command::new("ip").args(["link", "set", iface, "up"]));
        Self {
            iface: iface.to_owned(),
            public_key,
            port,
            address,
            child: Some(child),
            _dir: dir,
        }
    }

    /// Adds a device peer; returns the wg-quick config the device needs (with its key).
    pub fn add_device(&self, ns: &Netns, device_ip: Ipv4Addr, keepalive: u32) -> String {
        let (private, public) = wg_keypair();
        run(Command::new("wg").args([
            "set",
            &self.iface,
            "peer",
            &public,
            "allowed-ips",
            &format!("{device_ip}/32"),
        ]));
        let net = Ipv4Addr::from(u32::from(self.address) & 0xffff_ff00);
        format!(
            "[Interface]\nPrivateKey = {private}\nAddress = {device_ip}/32\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {net}/24\nEndpoint = {}:{}\nPersistentKeepalive = {keepalive}\n",
            self.public_key,
            ns.host_ip(),
            self.port
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::pid)
    }
}

impl Drop for WgGoHost {
    fn drop(&mut self) {
        self.child = None;
        let _ = output(Command::new("ip").args(["link", "del", &self.iface]));
    }
}

/// A WireGuard key pair from `wg genkey` / `wg pubkey`.
pub fn wg_keypair() -> (String, String) {
    let private = stdout(&run(Command::new("wg").arg("genkey")));
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{private}").expect("write key");
    }
    let out = child.wait_with_output().expect("wg pubkey");
    (
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}
