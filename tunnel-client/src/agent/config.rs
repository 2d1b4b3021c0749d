//! The agent's configuration: the TOML file (`/etc/floto-tunnel.toml`, or `--config`)
//! merged under the command-line flags, validated into one [`AgentConfig`] before anything
//! is opened. It does not read files other than the ones it names (CA, key file).
//!
//! `server` is one URL or several (the nodes of a cluster, in order of preference): in the
//! file `server = "https://a:8443"` or `server = ["https://a:8443", "https://b:8443"]`, on
//! the command line `--server` repeated (or URLs separated by commas). The flags' list
//! replaces the file's.
//!
//! `transport` (`auto`, `udp` or `tls`) says what carries WireGuard's datagrams, and `proxy`
//! an HTTP proxy for the TLS transport (default: `HTTPS_PROXY`, then `https_proxy`, from the
//! environment; `NO_PROXY` is not read; `proxy = ""` or `--proxy ""` means none).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use floto_proto::DeviceId;

use super::backoff::Backoff;
use super::sshd::SshdConfig;
use super::transport::{MIN_UDP_PROBE_EVERY, UDP_PROBE_EVERY};
use super::wg_tls::ProxyUrl;
use crate::enroll::EnrollOptions;
use crate::servers::ServerUrl;

/// The config file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/floto-tunnel.toml";

/// The TUN interface's default name.
pub const DEFAULT_TUN_NAME: &str = "floto0";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this program.
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value is wrong or settings contradict each other.
    #[error("{0}")]
    Invalid(String),
}

/// How the device's services are reached from the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A TUN interface with the overlay address: every local service is reachable.
    Tun,
    /// A userspace TCP stack on the overlay address: only the forwarded ports are reachable.
    Userspace,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tun => "tun",
            Self::Userspace => "userspace",
        })
    }
}

/// What may carry WireGuard's datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// UDP first; a TLS stream to the server's HTTPS port when UDP gets no answer, and back
    /// to UDP when it answers again.
    #[default]
    Auto,
    /// UDP only (any WireGuard peer).
    Udp,
    /// A TLS stream only (networks that let nothing but HTTPS out).
    Tls,
}

impl FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "udp" => Ok(Self::Udp),
            "tls" => Ok(Self::Tls),
            _ => Err(format!("transport {s:?}: expected auto, udp or tls")),
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Udp => "udp",
            Self::Tls => "tls",
        })
    }
}

/// `PORT[=HOST:PORT]`: connections to `PORT` of the overlay address go to `target`
/// (default `127.0.0.1:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub port: u16,
    /// `HOST:PORT`, resolved at each connection.
    pub target: String,
}

impl FromStr for Forward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("forward {s:?}: {why} (expected PORT or PORT=HOST:PORT)");
        let (port, target) = match s.split_once('=') {
            Some((p, t)) => (p, Some(t)),
            None => (s, None),
        };
        let port: u16 = port.trim().parse().map_err(|_| bad("bad port"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        let target = match target {
            None => format!("127.0.0.1:{port}"),
            Some(t) => {
                let t = t.trim();
                let (host, tport) = t.rsplit_once(':').ok_or_else(|| bad("no target port"))?;
                let tport: u16 = tport.parse().map_err(|_| bad("bad target port"))?;
                if host.is_empty() || tport == 0 {
                    return Err(bad("bad target"));
                }
                t.to_owned()
            }
        };
        Ok(Self { port, target })
    }
}

/// The config file. Every key is optional; flags override them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The server's API, `https://HOST[:PORT]` (needed to enroll); for a cluster, a list of
    /// URLs in order of preference.
    #[serde(default, deserialize_with = "one_or_more_urls")]
    pub server: Vec<ServerUrl>,
    /// CA certificate (PEM) the server's TLS certificate chains to (needed to enroll).
    pub ca: Option<PathBuf>,
    /// The fleet's provisioning key.
    pub provisioning_key: Option<String>,
    /// A file holding the provisioning key (first line).
    pub provisioning_key_file: Option<PathBuf>,
    /// The UUID to enroll as (default: a new one).
    pub uuid: Option<DeviceId>,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub tun_name: Option<String>,
    #[serde(default)]
    pub forward: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    pub backoff_cap: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub keepalive: Option<Duration>,
    /// Whether the agent sets sshd up for certificates (default true).
    pub manage_sshd: Option<bool>,
    /// sshd's configuration directory (default `/etc/ssh`).
    pub sshd_dir: Option<PathBuf>,
    /// A shell command that reloads sshd (default: SIGHUP to `/run/sshd.pid`, else
    /// `systemctl reload ssh`).
    pub sshd_reload: Option<String>,
    /// How often to ask for the fleet's current logins and user CA (default 5m).
    #[serde(default, with = "humantime_serde")]
    pub sshd_refresh: Option<Duration>,
    /// What carries WireGuard's datagrams (default auto).
    pub transport: Option<TransportChoice>,
    /// An HTTP proxy for the TLS transport, `http://HOST:PORT`; `""` for none.
    pub proxy: Option<String>,
    /// While on TLS, how often UDP is tried again (default 3m).
    #[serde(default, with = "humantime_serde")]
    pub udp_probe_every: Option<Duration>,
}

impl FileConfig {
    /// Reads `path`; `None` reads [`DEFAULT_CONFIG_FILE`] if it exists.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path,
            message: e.to_string(),
        })
    }
}

/// `server = "URL"` or `server = ["URL", ...]`.
fn one_or_more_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ServerUrl>, D::Error> {
    struct Urls;
    impl<'de> serde::de::Visitor<'de> for Urls {
        type Value = Vec<ServerUrl>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a server URL or a list of server URLs")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse().map(|url| vec![url]).map_err(E::custom)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element()? {
                urls.push(url);
            }
            Ok(urls)
        }
    }
    d.deserialize_any(Urls)
}

/// Flags of `floto-tunnel run`, as given (all optional: the file fills the gaps).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--server`, in the order given; when not empty it replaces the file's list.
    pub servers: Vec<ServerUrl>,
    pub ca: Option<PathBuf>,
    pub provisioning_key: Option<String>,
    pub provisioning_key_file: Option<PathBuf>,
    pub uuid: Option<DeviceId>,
    pub state_dir: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub tun_name: Option<String>,
    pub forward: Vec<Forward>,
    pub backoff_cap: Option<Duration>,
    pub keepalive: Option<Duration>,
    pub manage_sshd: Option<bool>,
    pub sshd_dir: Option<PathBuf>,
    pub sshd_reload: Option<String>,
    pub sshd_refresh: Option<Duration>,
    pub transport: Option<TransportChoice>,
    /// `--proxy`, as given (`""`: none).
    pub proxy: Option<String>,
    /// `HTTPS_PROXY` (or `https_proxy`) from the environment: the proxy when neither the
    /// flag nor the file names one.
    pub proxy_from_env: Option<String>,
    pub udp_probe_every: Option<Duration>,
}

/// The validated configuration of `floto-tunnel run`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The API servers, in order of preference, each once. Enrollment asks them in this
    /// order, renewal asks the server the device enrolled with first; their hosts are also
    /// WireGuard endpoints. May be empty: the device then uses only what it was told at
    /// enrollment.
    pub servers: Vec<ServerUrl>,
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub tun_name: String,
    pub forwards: Vec<Forward>,
    pub backoff_cap: Duration,
    /// `None`: the server's `persistent_keepalive`.
    pub keepalive: Option<Duration>,
    /// `None`: no provisioning key configured (the device must be enrolled already, and
    /// cannot come back by itself once its certificate expired).
    pub enroll: Option<EnrollOptions>,
    /// How sshd is set up for certificates; `None` with `--manage-sshd=false`.
    pub sshd: Option<SshdConfig>,
    pub transport: TransportChoice,
    /// The HTTP proxy the TLS transport goes through.
    pub proxy: Option<ProxyUrl>,
    /// While on TLS (auto), how often UDP is tried again.
    pub udp_probe_every: Duration,
}

impl AgentConfig {
    /// Merges flags over the file and validates the result.
    pub fn build(
        file: FileConfig,
        flags: Overrides,
        default_state_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let mode = flags.mode.or(file.mode).unwrap_or(Mode::Tun);
        let forwards = if flags.forward.is_empty() {
            file.forward
                .iter()
                .map(|s| s.parse::<Forward>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?
        } else {
            flags.forward
        };
        match mode {
            Mode::Userspace if forwards.is_empty() => {
                return Err(invalid(
                    "userspace mode forwards only the listed ports, and none is listed: add --forward PORT[=HOST:PORT] (or `forward = [\"22\"]` in the config file)".into(),
                ))
            }
            Mode::Tun if !forwards.is_empty() => {
                return Err(invalid(
                    "--forward is for --userspace mode; with --tun every local service is reachable on the overlay address".into(),
                ))
            }
            _ => {}
        }
        let mut ports: Vec<u16> = forwards.iter().map(|f| f.port).collect();
        ports.sort_unstable();
        if ports.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("a port is forwarded twice".into()));
        }
        let backoff_cap = flags
            .backoff_cap
            .or(file.backoff_cap)
            .unwrap_or(Backoff::DEFAULT_CAP);
        if backoff_cap < Duration::from_secs(1) {
            return Err(invalid(format!(
                "backoff cap {} is below 1 s",
                humantime::format_duration(backoff_cap)
            )));
        }
        let keepalive = flags.keepalive.or(file.keepalive);
        if keepalive.is_some_and(|k| k < Duration::from_secs(1)) {
            return Err(invalid("keepalive must be at least 1 s".into()));
        }
        let key = match (flags.provisioning_key, flags.provisioning_key_file) {
            (Some(k), _) => Some(k),
            (None, Some(f)) => Some(read_key_file(&f)?),
            (None, None) => match (file.provisioning_key, file.provisioning_key_file) {
                (Some(k), _) => Some(k),
                (None, Some(f)) => Some(read_key_file(&f)?),
                (None, None) => None,
            },
        };
        let listed = if flags.servers.is_empty() {
            file.server
        } else {
            flags.servers
        };
        let mut servers: Vec<ServerUrl> = Vec::with_capacity(listed.len());
        for url in listed {
            if !servers.contains(&url) {
                servers.push(url);
            }
        }
        let transport = flags.transport.or(file.transport).unwrap_or_default();
        let proxy = match flags.proxy.or(file.proxy) {
            Some(p) if p.trim().is_empty() => None,
            Some(_) if transport == TransportChoice::Udp => {
                return Err(invalid(
                    "a proxy is configured but the transport is udp: a proxy carries only the TLS transport (set transport to auto or tls, or leave the proxy out)".into(),
                ))
            }
            Some(p) => Some(p.parse::<ProxyUrl>().map_err(invalid)?),
            // The environment's proxy is for many programs: one this agent cannot use is
            // left out, not a reason to stop.
            None => flags
                .proxy_from_env
                .filter(|p| !p.trim().is_empty() && transport != TransportChoice::Udp)
                .and_then(|p| {
                    p.parse::<ProxyUrl>()
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, "HTTPS_PROXY is not usable for WireGuard over TLS; going without a proxy (set --proxy)")
                        })
                        .ok()
                }),
        };
        let udp_probe_every = flags
            .udp_probe_every
            .or(file.udp_probe_every)
            .unwrap_or(UDP_PROBE_EVERY);
        if udp_probe_every < MIN_UDP_PROBE_EVERY {
            return Err(invalid(format!(
                "udp_probe_every must be at least {} (a probe's handshake must be over before the next)",
                humantime::format_duration(MIN_UDP_PROBE_EVERY)
            )));
        }
        let ca = flags.ca.or(file.ca);
        let enroll = match (key, servers.is_empty(), ca) {
            (None, _, _) => None,
            (Some(provisioning_key), false, Some(ca)) => {
                let server_ca_pem = std::fs::read_to_string(&ca).map_err(|source| {
                    ConfigError::Read {
                        path: ca.clone(),
                        source,
                    }
                })?;
                Some(EnrollOptions {
                    servers: servers.clone(),
                    server_ca_pem,
                    provisioning_key: provisioning_key.trim().to_owned(),
                    uuid: flags.uuid.or(file.uuid),
                    device_type: file.device_type,
                    hostname: file.hostname,
                    ssh_host_keys: Vec::new(),
                    proxy: None,
                })
            }
            (Some(_), true, _) => {
                return Err(invalid(
                    "a provisioning key is configured but no server: set --server (or `server` in the config file)".into(),
                ))
            }
            (Some(_), _, None) => {
                return Err(invalid(
                    "a provisioning key is configured but no CA: set --ca (or `ca` in the config file)".into(),
                ))
            }
        };
        Ok(Self {
            servers,
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| default_state_dir.to_owned()),
            mode,
            tun_name: flags
                .tun_name
                .or(file.tun_name)
                .unwrap_or_else(|| DEFAULT_TUN_NAME.to_owned()),
            forwards,
            backoff_cap,
            keepalive,
            // Enrollment and renewal go through the proxy too: a device that can only get out
            // through it must still keep its certificate.
            enroll: enroll.map(|e| EnrollOptions {
                proxy: proxy.as_ref().map(ToString::to_string),
                ..e
            }),
            sshd: flags
                .manage_sshd
                .or(file.manage_sshd)
                .unwrap_or(true)
                .then(|| SshdConfig {
                    dir: flags
                        .sshd_dir
                        .or(file.sshd_dir)
                        .unwrap_or_else(|| SshdConfig::default().dir),
                    reload: flags.sshd_reload.or(file.sshd_reload),
                    refresh: flags
                        .sshd_refresh
                        .or(file.sshd_refresh)
                        .unwrap_or(super::sshd::REFRESH)
                        .max(Duration::from_secs(1)),
                }),
            transport,
            proxy,
            udp_probe_every,
        })
    }
}

fn read_key_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let key = text.lines().next().unwrap_or_default().trim().to_owned();
    if key.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "provisioning key file {} is empty",
            path.display()
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        assert_eq!(
            "22".parse::<Forward>().unwrap(),
            Forward {
                port: 22,
                target: "127.0.0.1:22".into()
            }
        );
        assert_eq!(
            "2222=127.0.0.1:22".parse::<Forward>().unwrap(),
            Forward {
                port: 2222,
                target: "127.0.0.1:22".into()
            }
        );
        assert_eq!(
            "80=localhost:8080".parse::<Forward>().unwrap().target,
            "localhost:8080"
        );
        for bad in ["", "0", "x", "22=", "22=host", "22=:1", "22=h:0", "70000"] {
            assert!(bad.parse::<Forward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_file_fills_gaps_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "CA").unwrap();
        let keyfile = dir.path().join("key");
        std::fs::write(&keyfile, "fpk_fromfile\n").unwrap();
        let conf = dir.path().join("floto-tunnel.toml");
        std::fs::write(
            &conf,
            format!(
                "server = \"https://vpn.example:8443\"\nca = {:?}\nprovisioning_key_file = {:?}\nmode = \"userspace\"\nforward = [\"22\", \"8080=127.0.0.1:80\"]\nbackoff_cap = \"30s\"\n",
                ca, keyfile
            ),
        )
        .unwrap();
        let file = FileConfig::load(Some(&conf)).unwrap();
        let c = AgentConfig::build(file.clone(), Overrides::default(), Path::new("/d")).unwrap();
        assert_eq!(c.mode, Mode::Userspace);
        assert_eq!(c.forwards.len(), 2);
        assert_eq!(c.backoff_cap, Duration::from_secs(30));
        assert_eq!(c.state_dir, Path::new("/d"));
        let e = c.enroll.unwrap();
        assert_eq!(e.provisioning_key, "fpk_fromfile");
        assert_eq!(e.server_ca_pem, "CA");

        let flags = Overrides {
            mode: Some(Mode::Tun),
            forward: vec![],
            provisioning_key: Some("fpk_flag".into()),
            backoff_cap: Some(Duration::from_secs(5)),
            ..Overrides::default()
        };
        // Tun mode with the file's forwards is refused: forwards are for userspace.
        assert!(AgentConfig::build(file.clone(), flags.clone(), Path::new("/d")).is_err());
        let mut file2 = file;
        file2.forward.clear();
        let c = AgentConfig::build(file2, flags, Path::new("/d")).unwrap();
        assert_eq!(c.mode, Mode::Tun);
        assert_eq!(c.backoff_cap, Duration::from_secs(5));
        assert_eq!(c.enroll.unwrap().provisioning_key, "fpk_flag");
    }

    fn urls(list: &[&str]) -> Vec<ServerUrl> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn server_is_one_url_or_a_list_and_the_flags_list_replaces_the_files() {
        let parse = |text: &str| toml::from_str::<FileConfig>(text);
        // The old form, one URL, stays valid.
        let one = parse("server = \"https://a.example:8443\"\n").unwrap();
        assert_eq!(one.server, urls(&["https://a.example:8443"]));
        let many =
            parse("server = [\"https://a.example:8443\", \"https://10.0.0.2:8443/\"]\n").unwrap();
        assert_eq!(
            many.server,
            urls(&["https://a.example:8443", "https://10.0.0.2:8443"])
        );
        assert!(parse("").unwrap().server.is_empty());
        assert!(parse("server = []\n").unwrap().server.is_empty());
        for (bad, says) in [
            ("server = \"http://a.example\"", "https://"),
            ("server = [\"https://a\", \"b\"]", "https://"),
            ("server = [\"https://a\", 8443]", "a server URL"),
            ("server = 8443", "a server URL or a list"),
            ("server = \"https://a:port\"", "no valid host"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("server"), "{bad}: {err}");
        }

        // The file's list, each URL once, when no flag says otherwise.
        let file = FileConfig {
            server: urls(&["https://a", "https://b", "https://a/"]),
            ..FileConfig::default()
        };
        let c = AgentConfig::build(file.clone(), Overrides::default(), Path::new("/d")).unwrap();
        assert_eq!(c.servers, urls(&["https://a", "https://b"]));
        // No provisioning key: nothing to enroll with, but the servers are still known
        // (renewal and WireGuard endpoints use them).
        assert!(c.enroll.is_none());
        // `--server` given: its list, in its order, replaces the file's.
        let flags = Overrides {
            servers: urls(&["https://c", "https://b"]),
            ..Overrides::default()
        };
        let c = AgentConfig::build(file, flags, Path::new("/d")).unwrap();
        assert_eq!(c.servers, urls(&["https://c", "https://b"]));

        // Enrollment gets the same list.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "CA").unwrap();
        let flags = Overrides {
            servers: urls(&["https://c", "https://b"]),
            ca: Some(ca),
            provisioning_key: Some("fpk_x".into()),
            ..Overrides::default()
        };
        let c = AgentConfig::build(FileConfig::default(), flags, Path::new("/d")).unwrap();
        assert_eq!(c.enroll.unwrap().servers, urls(&["https://c", "https://b"]));
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../../deploy/floto-tunnel.toml.example");
        let file: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(file.mode, Some(Mode::Tun));
        assert_eq!(file.backoff_cap, Some(Backoff::DEFAULT_CAP));
        assert_eq!(
            file.state_dir.as_deref(),
            Some(Path::new("/var/lib/floto-tunnel"))
        );
        // The commented-out userspace lines are valid too.
        let userspace: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with("mode = \"userspace\"") || rest.starts_with("forward") =>
                {
                    rest
                }
                _ if l.starts_with("mode = \"tun\"") => "",
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: FileConfig = toml::from_str(&userspace).unwrap();
        assert_eq!(file.mode, Some(Mode::Userspace));
        assert_eq!(file.forward, ["22", "9100=127.0.0.1:9100"]);
    }

    #[test]
    fn transport_and_proxy_from_flags_file_and_environment() {
        let build = |file: &str, flags: Overrides| {
            let file: FileConfig = toml::from_str(file).unwrap();
            AgentConfig::build(file, flags, Path::new("/d"))
        };
        // Defaults: auto, no proxy, UDP probed every 3 minutes.
        let c = build("", Overrides::default()).unwrap();
        assert_eq!(c.transport, TransportChoice::Auto);
        assert_eq!(c.proxy, None);
        assert_eq!(c.udp_probe_every, Duration::from_secs(180));
        // The file's, then the flags' over them.
        let file =
            "transport = \"tls\"\nproxy = \"http://10.0.0.1:3128\"\nudp_probe_every = \"10s\"\n";
        let c = build(file, Overrides::default()).unwrap();
        assert_eq!(c.transport, TransportChoice::Tls);
        assert_eq!(c.proxy.unwrap().to_string(), "http://10.0.0.1:3128");
        assert_eq!(c.udp_probe_every, Duration::from_secs(10));
        let flags = Overrides {
            transport: Some(TransportChoice::Auto),
            proxy: Some("proxy.corp:8080".into()),
            udp_probe_every: Some(Duration::from_secs(20)),
            proxy_from_env: Some("http://env:1".into()),
            ..Overrides::default()
        };
        let c = build(file, flags).unwrap();
        assert_eq!(c.transport, TransportChoice::Auto);
        assert_eq!(c.proxy.unwrap().to_string(), "http://proxy.corp:8080");
        assert_eq!(c.udp_probe_every, Duration::from_secs(20));
        // The environment's proxy when none is configured; `""` turns it off.
        let env = |proxy: Option<&str>, from_env: &str| Overrides {
            proxy: proxy.map(str::to_owned),
            proxy_from_env: Some(from_env.to_owned()),
            ..Overrides::default()
        };
        let c = build("", env(None, "http://env:3128")).unwrap();
        assert_eq!(c.proxy.unwrap().to_string(), "http://env:3128");
        assert_eq!(
            build("", env(Some(""), "http://env:3128")).unwrap().proxy,
            None
        );
        assert_eq!(
            build("proxy = \"\"", env(None, "http://env:1"))
                .unwrap()
                .proxy,
            None
        );
        // An environment proxy this agent cannot use is left out, not fatal; a configured
        // one is an error that says why.
        assert_eq!(build("", env(None, "https://env:443")).unwrap().proxy, None);
        let err = build("proxy = \"https://p:443\"", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("only http://"), "{err}");
        // A proxy with UDP only is a contradiction, unless it only came from the environment.
        let err = build(
            "transport = \"udp\"\nproxy = \"http://p:1\"",
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("transport is udp"), "{err}");
        assert_eq!(
            build("transport = \"udp\"", env(None, "http://env:1"))
                .unwrap()
                .proxy,
            None
        );
        let fast = Overrides {
            udp_probe_every: Some(Duration::from_secs(9)),
            ..Overrides::default()
        };
        assert!(build("", fast)
            .unwrap_err()
            .to_string()
            .contains("udp_probe_every"));
        for (text, want) in [
            ("auto", TransportChoice::Auto),
            ("UDP", TransportChoice::Udp),
            (" tls", TransportChoice::Tls),
        ] {
            assert_eq!(text.parse::<TransportChoice>(), Ok(want));
        }
        assert!("quic"
            .parse::<TransportChoice>()
            .unwrap_err()
            .contains("auto, udp or tls"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let msg = |file: FileConfig, flags: Overrides| {
            AgentConfig::build(file, flags, Path::new("/d"))
                .unwrap_err()
                .to_string()
        };
        let userspace = Overrides {
            mode: Some(Mode::Userspace),
            ..Overrides::default()
        };
        assert!(msg(FileConfig::default(), userspace).contains("--forward"));
        let key_only = Overrides {
            provisioning_key: Some("k".into()),
            ..Overrides::default()
        };
        assert!(msg(FileConfig::default(), key_only).contains("no server"));
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("c.toml");
        std::fs::write(&conf, "sever = \"typo\"\n").unwrap();
        let err = FileConfig::load(Some(&conf)).unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");
        assert!(FileConfig::load(Some(&dir.path().join("missing"))).is_err());
        let cap = Overrides {
            backoff_cap: Some(Duration::from_millis(10)),
            ..Overrides::default()
        };
        assert!(msg(FileConfig::default(), cap).contains("backoff cap"));
    }

    /// The config file against any text: read exactly when it is what the docs describe.
    mod proptests {
        use proptest::prelude::*;
        use toml::{Table, Value};

        use super::*;

        /// Keys whose value is any string.
        const TEXT_KEYS: [&str; 8] = [
            "proxy",
            "ca",
            "provisioning_key",
            "provisioning_key_file",
            "device_type",
            "hostname",
            "state_dir",
            "tun_name",
        ];
        const KEYS: [&str; 16] = [
            "transport",
            "proxy",
            "udp_probe_every",
            "server",
            "ca",
            "provisioning_key",
            "provisioning_key_file",
            "device_type",
            "hostname",
            "state_dir",
            "tun_name",
            "uuid",
            "mode",
            "forward",
            "backoff_cap",
            "keepalive",
        ];

        /// `bytes` as a config file, read as the agent reads it.
        fn load(bytes: &[u8]) -> Result<FileConfig, ConfigError> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("floto-tunnel.toml");
            std::fs::write(&path, bytes).unwrap();
            FileConfig::load(Some(&path))
        }

        /// Whether each value has the type its key documents.
        fn well_typed(table: &Table) -> bool {
            table.iter().all(|(k, v)| {
                let text = v.as_str();
                let url = |v: &Value| v.as_str().is_some_and(|s| s.parse::<ServerUrl>().is_ok());
                match k.as_str() {
                    k if TEXT_KEYS.contains(&k) => text.is_some(),
                    "server" => url(v) || v.as_array().is_some_and(|a| a.iter().all(url)),
                    "uuid" => text.is_some_and(|s| s.parse::<DeviceId>().is_ok()),
                    "mode" => matches!(text, Some("tun" | "userspace")),
                    "transport" => matches!(text, Some("auto" | "udp" | "tls")),
                    "forward" => v.as_array().is_some_and(|a| a.iter().all(Value::is_str)),
                    "backoff_cap" | "keepalive" | "udp_probe_every" => {
                        text.is_some_and(|s| humantime::parse_duration(s).is_ok())
                    }
                    _ => false,
                }
            })
        }

        /// A TOML value of any type, often one a key takes.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => any::<String>().prop_map(|s| Value::String(s).to_string()),
                1 => prop::sample::select(vec![
                    "\"tun\"", "\"userspace\"", "\"TUN\"", "\"30s\"", "\"5 min\"",
                    "\"auto\"", "\"udp\"", "\"tls\"", "\"Tls\"", "\"http://10.0.0.1:3128\"",
                    "\"0s\"", "\"soon\"", "\"3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c\"",
                    "\"3f2a6b1c\"", "[\"22\", \"80=127.0.0.1:8080\"]", "[]", "[22]",
                    "\"https://vpn.example:8443\"", "\"http://vpn.example\"",
                    "[\"https://a.example\", \"https://10.0.0.2:9443/\"]",
                    "[\"https://a.example\", \"ftp://b\"]", "[\"https://a\", 1]",
                    "\"22\"", "22", "-1", "1.5", "true", "{ a = 1 }", "1979-05-27T07:32:00Z",
                    "'literal'", "\"\"\"multi\nline\"\"\"",
                ])
                .prop_map(str::to_owned),
                1 => "[^\n]{0,12}",
            ]
        }

        /// A value `key` does not take: one of another type, or for a key that parses its
        /// string, a string it cannot parse.
        fn wrong_value(key: &str) -> BoxedStrategy<Value> {
            let other_type = prop_oneof![
                any::<i64>().prop_map(Value::Integer),
                any::<bool>().prop_map(Value::Boolean),
                Just(Value::Float(0.5)),
                Just(Value::Array(vec![Value::Integer(1)])),
                Just(Value::Table(Table::new())),
            ];
            if TEXT_KEYS.contains(&key) {
                other_type.boxed()
            } else {
                prop_oneof![other_type, "[a-z ]{0,10}!".prop_map(Value::String)].boxed()
            }
        }

        /// Lines of `key = value`, keys known or not, and now and then a line of anything.
        fn text() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                4 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
                1 => "[a-z_]{1,10}",
                1 => "[^\n=]{0,10}",
            ];
            let line = prop_oneof![
                6 => (key, value()).prop_map(|(k, v)| format!("{k} = {v}")),
                1 => "[^\n]{0,30}",
                1 => Just("# a comment".to_owned()),
                1 => Just("[section]".to_owned()),
            ];
            prop::collection::vec(line, 0..=8).prop_map(|lines| lines.join("\n"))
        }

        proptest! {
            /// Any bytes as the config file: never a panic; not UTF-8 is a read error; and
            /// otherwise the file is read exactly when it is TOML whose every key is one the
            /// agent knows with a value of that key's type, giving those values.
            #[test]
            fn a_config_file_is_read_exactly_when_every_key_is_known_and_well_typed(
                bytes in prop_oneof![
                    text().prop_map(String::into_bytes),
                    prop::collection::vec(any::<u8>(), 0..=300),
                ],
            ) {
                let got = load(&bytes);
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    prop_assert!(matches!(got, Err(ConfigError::Read { .. })), "{:?}", got);
                    return Ok(());
                };
                let table = text.parse::<Table>();
                let expected = table.as_ref().is_ok_and(well_typed);
                match got {
                    Ok(file) => {
                        prop_assert!(expected, "read {:?} as {:?}", text, file);
                        let table = table.unwrap();
                        let text_of =
                            |k: &str| table.get(k).and_then(Value::as_str).map(str::to_owned);
                        let urls: Vec<ServerUrl> = match table.get("server") {
                            Some(Value::Array(a)) => {
                                a.iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect()
                            }
                            Some(v) => vec![v.as_str().unwrap().parse().unwrap()],
                            None => vec![],
                        };
                        prop_assert_eq!(file.server, urls);
                        prop_assert_eq!(file.hostname, text_of("hostname"));
                        prop_assert_eq!(file.mode.map(|m| m.to_string()), text_of("mode"));
                        prop_assert_eq!(file.state_dir, text_of("state_dir").map(PathBuf::from));
                    }
                    Err(e) => {
                        prop_assert!(!expected, "refused {:?}: {}", text, e);
                        prop_assert!(matches!(e, ConfigError::Parse { .. }), "{}", e);
                    }
                }
            }

            /// A complete, valid config with any one value replaced by one its key does not
            /// take is refused, and the error shows the key.
            #[test]
            fn a_config_with_one_wrong_value_is_refused_naming_its_key(
                (key, junk) in prop::sample::select(KEYS.to_vec())
                    .prop_flat_map(|k| (Just(k), wrong_value(k))),
            ) {
                let mut table: Table = toml::from_str(concat!(
                    "server = \"https://vpn.example.org:8443\"\nca = \"/etc/floto/ca.pem\"\n",
                    "provisioning_key = \"fpk_x\"\nprovisioning_key_file = \"/etc/floto/key\"\n",
                    "uuid = \"3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c\"\ndevice_type = \"pi\"\n",
                    "hostname = \"sensor-17\"\nstate_dir = \"/var/lib/floto-tunnel\"\n",
                    "mode = \"userspace\"\ntun_name = \"floto0\"\nforward = [\"22\"]\n",
                    "backoff_cap = \"5m\"\nkeepalive = \"25s\"\n",
                    "transport = \"tls\"\nproxy = \"http://10.0.0.1:3128\"\n",
                    "udp_probe_every = \"3m\"\n",
                ))
                .unwrap();
                prop_assert_eq!(table.len(), KEYS.len());
                prop_assert!(load(table.to_string().as_bytes()).is_ok());
                table.insert(key.to_owned(), junk);
                let err = load(table.to_string().as_bytes()).unwrap_err().to_string();
                prop_assert!(err.contains(key), "{}", err);
            }
        }
    }
}
