//! A device running the real `floto-tunnel run` agent in a network namespace, and OpenSSH's
//! sshd beside it: what the agent tests drive. The agent writes `status.json`; the harness
//! reads it through `floto-tunnel status --json`, as a user would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::net::Netns;
use crate::server::Server;
use crate::{bin, output, stdout, wait_for, Child};

/// How an agent process is started.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Extra flags for `floto-tunnel run` (mode, forwards, keepalive...).
    pub args: Vec<String>,
    /// Run as this uid/gid (through `setpriv`), not as root.
    pub user: Option<u32>,
}

/// A `floto-tunnel run` process in a namespace, with its state dir and config file.
#[derive(Debug)]
pub struct Agent {
    // Fields drop in order: the process first (its log lives in `dir`).
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    ns_name: String,
    options: AgentOptions,
    starts: u32,
}

impl Agent {
    /// An agent that enrolls by itself: a config file with the server URL (at the host's
    /// address on `ns`'s link), a copy of the CA and a provisioning key file.
    pub fn new(ns: &Netns, server: &Server, provisioning_key: &str, options: AgentOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("floto-agent-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        std::fs::copy(server.ca_path(), d.join("ca.pem")).expect("copy the CA");
        std::fs::write(d.join("provisioning.key"), format!("{provisioning_key}\n"))
            .expect("key file");
        std::fs::write(
            d.join("floto-tunnel.toml"),
            format!(
                // sshd is left alone unless a test hands the agent one of its own
                // (`--manage-sshd --sshd-dir`): never the machine's /etc/ssh.
                "server = \"{}\"\nca = \"{}\"\nprovisioning_key_file = \"{}\"\nstate_dir = \"{}\"\nmanage_sshd = false\n",
                server.api_url(ns.host_ip().into()),
                d.join("ca.pem").display(),
                d.join("provisioning.key").display(),
                d.join("state").display()
            ),
        )
        .expect("config file");
        if let Some(uid) = options.user {
            // The unprivileged agent must reach its files and own its state dir.
            let state = d.join("state");
            std::fs::create_dir(&state).expect("state dir");
            chown(&state, uid);
            for f in ["ca.pem", "provisioning.key", "floto-tunnel.toml"] {
                chown(&d.join(f), uid);
            }
            set_mode(d, 0o755);
            set_mode(&state, 0o700);
        }
        Self {
            child: None,
            dir,
            ns_name: ns.name.clone(),
            options,
            starts: 0,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("floto-tunnel.toml")
    }

    /// Configures several server URLs (a cluster's nodes, in order) instead of the one
    /// written by [`new`](Self::new): the config file's `server` becomes a list.
    pub fn set_servers(&self, urls: &[String]) {
        let config = std::fs::read_to_string(self.config_file()).expect("config file");
        let list = urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (servers, others): (Vec<&str>, Vec<&str>) =
            config.lines().partition(|l| l.starts_with("server = "));
        assert_eq!(servers.len(), 1, "one server line in {config}");
        let mut config = format!("server = [{list}]\n");
        for line in others {
            config.push_str(line);
            config.push('\n');
        }
        std::fs::write(self.config_file(), config).expect("config file");
    }

    /// The `floto-tunnel run` command line (inside the namespace, as the configured user).
    pub fn run_command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_name]);
        if let Some(uid) = self.options.user {
            cmd.arg("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups");
        }
        cmd.arg(bin("floto-tunnel"))
            .arg("run")
            .arg("--config")
            .arg(self.config_file())
            .args(&self.options.args)
            .env("FLOTO_LOG", "info,floto_tunnel_client=debug");
        cmd
    }

    /// Starts (or restarts) the agent.
    pub fn start(&mut self) {
        crate::require(&["setpriv"]);
        self.starts += 1;
        let name = format!("agent-{}-{}", self.ns_name, self.starts);
        self.child = Some(Child::spawn(&name, self.run_command(), self.dir.path()));
    }

    /// SIGTERM, waiting for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = c.terminate(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "the agent did not stop cleanly on SIGTERM: {status:?}\n{}",
                c.log()
            );
        }
    }

    /// SIGKILL (the device loses power).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// The running agent process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::pid)
    }

    /// The agent's output so far (of its latest start).
    pub fn log(&self) -> String {
        self.child.as_ref().map(Child::log).unwrap_or_default()
    }

    /// `floto-tunnel status --json`, or `None` when it fails (not enrolled yet).
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = output(
            Command::new(bin("floto-tunnel"))
                .args(["status", "--json", "--state-dir"])
                .arg(self.state_dir()),
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_str(&stdout(&out)).ok()
    }

    /// Waits until the agent reports itself connected; returns the status.
    pub fn wait_connected(&self, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.status() {
                if v["running"] == true && v["connected"] == true {
                    return v;
                }
            }
            if let Some(c) = &self.child {
                // A process that died will never connect: say why.
                if let Some(pid) = Some(c.pid()) {
                    assert!(
                        Path::new(&format!("/proc/{pid}")).exists(),
                        "the agent exited:\n{}",
                        c.log()
                    );
                }
            }
            assert!(
                start.elapsed() < timeout,
                "the agent did not connect within {timeout:?}; status {:?}\n{}",
                self.status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The device's UUID, once enrolled.
    pub fn uuid(&self) -> String {
        let v = wait_for(Duration::from_secs(30), "the agent to enroll", || {
            self.status()
        });
        v["uuid"].as_str().expect("uuid").to_owned()
    }
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// An sshd of a device for its agent to manage, in `dir` (its own config directory: host key,
/// an `sshd_config` that includes `sshd_config.d/*.conf`, no authorized keys at all, a pid
/// file), listening on port 22 of namespace `ns`. Returns it with the flags that hand it to
/// `floto-tunnel run`. Killed on drop.
pub fn start_managed_sshd(ns: &Netns, dir: &Path) -> (Child, Vec<String>) {
    let host_key = host_key_in(dir);
    let pid = dir.join("sshd.pid");
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Include {dir}/sshd_config.d/*.conf\nPort 22\nListenAddress 0.0.0.0\nHostKey {key}\n\
             AuthorizedKeysFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {pid}\n\
             LogLevel VERBOSE\nSetEnv HOME={dir}\n",
            dir = dir.display(),
            key = host_key.display(),
            pid = pid.display(),
        ),
    )
    .expect("sshd_config");
    let child = run_sshd(ns, dir, &dir.join("sshd_config"), &["22"]);
    let flags = vec![
        "--manage-sshd".to_owned(),
        "--sshd-dir".to_owned(),
        dir.display().to_string(),
        "--sshd-reload".to_owned(),
        format!("kill -HUP $(cat {})", pid.display()),
    ];
    (child, flags)
}

/// OpenSSH's sshd in a namespace, listening on `listen` (e.g. `["0.0.0.0:22"]`) and
/// accepting `authorized_key` for root. Killed on drop.
pub fn start_sshd(ns: &Netns, dir: &Path, authorized_key: &str, listen: &[&str]) -> Child {
    let host_key = host_key_in(dir);
    let auth = dir.join("authorized_keys");
    std::fs::write(&auth, authorized_key).expect("authorized_keys");
    let config = dir.join("sshd_config");
    let listen_lines: String = listen
        .iter()
        .map(|l| format!("ListenAddress {l}\n"))
        .collect();
    // Sessions get the test's dir as HOME, so they do not read the machine's own
    // dotfiles (root's .bashrc may run slow or blocking tools, such as pyenv's rehash
    // waiting a minute on a stale lock).
    std::fs::write(
        &config,
        format!(
            "{listen_lines}HostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
             LogLevel VERBOSE\nSetEnv HOME={}\n",
            host_key.display(),
            auth.display(),
            dir.display()
        ),
    )
    .expect("sshd_config");
    let ports: Vec<&str> = listen
        .iter()
        .map(|l| l.rsplit(':').next().unwrap_or("22"))
        .collect();
    run_sshd(ns, dir, &config, &ports)
}

/// The Ed25519 host key in `dir`, made once.
fn host_key_in(dir: &Path) -> PathBuf {
    crate::require(&["sshd", "ssh-keygen", "ss"]);
    let host_key = dir.join("ssh_host_ed25519_key");
    if !host_key.exists() {
        crate::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key),
        );
    }
    host_key
}

/// sshd with `config`, in namespace `ns` (its log in `dir`), once it listens on `ports`.
fn run_sshd(ns: &Netns, dir: &Path, config: &Path, ports: &[&str]) -> Child {
    std::fs::create_dir_all("/run/sshd").expect("sshd privilege separation dir");
    let sshd = crate::which("sshd").expect("sshd");
    let mut cmd = ns.command(sshd);
    cmd.arg("-D").arg("-e").arg("-f").arg(config);
    let child = Child::spawn(&format!("sshd-{}", ns.name), cmd, dir);
    for port in ports {
        wait_for(Duration::from_secs(10), "sshd to listen", || {
            let out = output(ns.command("ss").args(["-ltn", &format!("sport = :{port}")]));
            stdout(&out).contains(&format!(":{port}")).then_some(())
        });
    }
    child
}
