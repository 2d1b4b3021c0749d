//! One typed configuration, merged from flags, `FLOTO_*` environment variables and the
//! config file (in that order of precedence), and validated before any port is bound.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use floto_proto::defaults;
use floto_registry::Overlays;

/// Overlay networks that may be added to the first one (the server's userspace TCP stack
/// holds four addresses).
pub const MAX_EXTRA_OVERLAYS: usize = 3;

/// Name of the config file inside the data dir, written by `init`.
pub const CONFIG_FILE: &str = "config.toml";

/// Server settings that may come from flags, environment or the config file.
///
/// Every field is optional here; [`Config::load`] fills in the defaults. The same names
/// (with `_` for `-`) are the keys of the TOML config file.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ServerSettings {
    /// Overlay network the devices' addresses come from; the server takes the first address.
    #[arg(long, env = "FLOTO_OVERLAY", value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Ipv4Net>,

    /// More overlay networks, filled after the first one is full (up to three; repeat the
    /// flag, or separate with commas). Devices keep their addresses; a device in an added
    /// network talks to the server's address there (its first host). Networks may be added,
    /// never removed while devices hold addresses in them. The same on every cluster node.
    #[arg(
        long = "extra-overlay",
        env = "FLOTO_EXTRA_OVERLAY",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_overlay: Vec<Ipv4Net>,

    /// WireGuard endpoint devices are told to use, HOST:PORT. Defaults to the host name
    /// the device used to reach the API, with the WireGuard port.
    #[arg(long, env = "FLOTO_ENDPOINT", value_name = "HOST:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// UDP address of the WireGuard concentrator.
    #[arg(long, env = "FLOTO_WG_LISTEN", value_name = "ADDR:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_listen: Option<SocketAddr>,

    /// TCP address of the HTTPS API (enrollment, REST, broker CONNECT).
    #[arg(long, env = "FLOTO_API_LISTEN", value_name = "ADDR:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<SocketAddr>,

    /// UDP address of the QUIC broker.
    #[arg(long, env = "FLOTO_QUIC_LISTEN", value_name = "ADDR:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_listen: Option<SocketAddr>,

    /// TCP address of the plain-HTTP metrics and health endpoints.
    #[arg(long, env = "FLOTO_METRICS_LISTEN", value_name = "ADDR:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,

    /// Another TCP address serving the same HTTPS (for devices that may only reach TCP 443
    /// for WireGuard over TLS), e.g. `0.0.0.0:443`.
    #[arg(long, env = "FLOTO_WG_TLS_LISTEN", value_name = "ADDR:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_tls_listen: Option<SocketAddr>,

    /// Lifetime of device certificates, e.g. `30d`, `12h`, `60s`.
    #[arg(long, env = "FLOTO_CERT_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub cert_lifetime: Option<Duration>,

    /// Lifetime of operator certificates issued by `floto login`.
    #[arg(long, env = "FLOTO_OPERATOR_CERT_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub operator_cert_lifetime: Option<Duration>,

    /// Longest life of an operator's SSH user certificate (never past its operator
    /// certificate's end).
    #[arg(long, env = "FLOTO_SSH_CERT_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ssh_cert_lifetime: Option<Duration>,

    /// How long a one-time login token from `operator add` may wait to be used.
    #[arg(long, env = "FLOTO_LOGIN_TOKEN_LIFETIME", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub login_token_lifetime: Option<Duration>,

    /// At SIGTERM, how long open broker sessions may go on (new ones are refused) before
    /// they are closed and the server exits. Keep it below the supervisor's own limit
    /// (Kubernetes' terminationGracePeriodSeconds, systemd's TimeoutStopSec).
    #[arg(long, env = "FLOTO_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub shutdown_grace: Option<Duration>,

    /// A device is online while an authenticated packet arrived within this window.
    #[arg(long, env = "FLOTO_ONLINE_WINDOW", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub online_window: Option<Duration>,

    /// PEM certificate chain for the API's TLS, e.g. mounted by cert-manager. Without it
    /// the server issues its own from its CA.
    #[arg(
        long,
        env = "FLOTO_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(
        long,
        env = "FLOTO_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// Extra DNS names or IP addresses for the server's own TLS certificate (repeatable).
    #[arg(
        long = "tls-name",
        env = "FLOTO_TLS_NAMES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_names: Vec<String>,

    /// Handshake messages per second (all devices together) before the server answers new
    /// ones with cookies, so initiators must prove their address first. Cookies are also
    /// asked for, whatever the rate, while the handshake queue has fallen behind.
    #[arg(long, env = "FLOTO_HANDSHAKE_RATE_LIMIT", value_name = "PER_SECOND")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_rate_limit: Option<u64>,

    /// Enrollments processed at once; more are answered 429 with Retry-After.
    #[arg(long, env = "FLOTO_MAX_CONCURRENT_ENROLLMENTS", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_enrollments: Option<usize>,

    /// HTTPS connections served at once; more wait in the listen backlog.
    #[arg(long, env = "FLOTO_MAX_CONNECTIONS", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// HTTPS connections one source address may hold at once; more are closed at accept.
    /// Behind a load balancer that hides client addresses, raise it (or keep the addresses:
    /// `externalTrafficPolicy: Local`).
    #[arg(long, env = "FLOTO_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_address: Option<usize>,

    /// How long an HTTPS connection may sit without a request in flight (before its first
    /// request, or between two), and how long a request body may take to arrive.
    #[arg(long, env = "FLOTO_CLIENT_IDLE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_idle_timeout: Option<Duration>,

    /// When the overlay has no fresh address left, the address of a device revoked at least
    /// this long ago is given to a new device.
    #[arg(long, env = "FLOTO_ADDRESS_REUSE_AFTER", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub address_reuse_after: Option<Duration>,

    /// Enrollments per second one provisioning key may make (bursts of ten seconds' worth);
    /// more are answered 429 with Retry-After. Slows a leaked key down until it is revoked.
    #[arg(long, env = "FLOTO_ENROLL_RATE_PER_KEY", value_name = "PER_SECOND")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_rate_per_key: Option<u32>,

    /// Broker sessions one operator may have open at once (ssh, tunnels); more are refused
    /// with 429 until one closes.
    #[arg(long, env = "FLOTO_MAX_SESSIONS_PER_OPERATOR", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_operator: Option<usize>,

    /// Broker sessions into one device at once, all operators together.
    #[arg(long, env = "FLOTO_MAX_SESSIONS_PER_DEVICE", value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_device: Option<usize>,

    /// The registry of a cluster of nodes: `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (any libpq-style URL sqlx accepts, e.g. `?host=/run/postgresql` for a socket).
    /// Without it the registry is SQLite in the data dir, for a single node.
    #[arg(
        long,
        env = "FLOTO_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,

    /// This node's name in a cluster (`node list`, the device views); the host name by
    /// default. Only with `--database-url`.
    #[arg(long, env = "FLOTO_NODE_NAME", value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// Where the other nodes of a cluster reach this one (a name or an IP address; the port
    /// is the QUIC port): for broker sessions to devices this node holds. The host name by
    /// default; in Kubernetes, the pod IP. Only with `--database-url`.
    #[arg(long, env = "FLOTO_NODE_ADDRESS", value_name = "HOST")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_address: Option<String>,

    /// Log format.
    #[arg(long, env = "FLOTO_LOG_FORMAT", value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Broker sessions one operator may have open at once, by default: many ssh sessions and
/// tunnels, far below the broker's 4,096.
pub const DEFAULT_SESSIONS_PER_OPERATOR: usize = 256;
/// Broker sessions into one device at once, by default (a small device's sshd allows 10
/// unauthenticated connections; tunnels to other ports count too).
pub const DEFAULT_SESSIONS_PER_DEVICE: usize = 32;

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The first overlay network (the server's own address is its first host).
    pub overlay: Ipv4Net,
    /// All overlay networks, the first one first.
    pub overlays: Overlays,
    pub endpoint: Option<String>,
    pub wg_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub quic_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub wg_tls_listen: Option<SocketAddr>,
    pub cert_lifetime: Duration,
    pub operator_cert_lifetime: Duration,
    pub ssh_cert_lifetime: Duration,
    pub login_token_lifetime: Duration,
    pub shutdown_grace: Duration,
    pub online_window: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_names: Vec<String>,
    pub handshake_rate_limit: u64,
    pub max_concurrent_enrollments: usize,
    pub max_sessions_per_operator: usize,
    pub max_sessions_per_device: usize,
    pub enroll_rate_per_key: u32,
    pub address_reuse_after: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub client_idle_timeout: Duration,
    /// PostgreSQL for a cluster; `None`: SQLite in the data dir.
    pub database_url: Option<DatabaseUrl>,
    pub node_name: String,
    pub node_address: String,
    pub log_format: LogFormat,
}

/// A PostgreSQL URL, whose password never reaches a log or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "database URL {:?} is not a postgres:// URL; leave it out to use SQLite in the data dir",
                Self(url.to_owned()).redacted()
            );
        }
        Ok(Self(url.to_owned()))
    }

    /// The URL to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.clone();
        };
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
                None => url.clone(),
            },
            None => url.clone(),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Config {
    /// Merges `flags` (which already carry environment values, through clap) over the
    /// config file, over the defaults, and validates the result.
    ///
    /// The config file is `file` when given, else `data_dir/config.toml` when it exists.
    pub fn load(
        data_dir: &Path,
        file: Option<&Path>,
        flags: &ServerSettings,
    ) -> anyhow::Result<Self> {
        let from_file = match file {
            Some(path) => read_settings(path)?,
            None => {
                let default = data_dir.join(CONFIG_FILE);
                if default.exists() {
                    read_settings(&default)?
                } else {
                    ServerSettings::default()
                }
            }
        };
        Self::from_settings(data_dir, &flags.clone().over(from_file))
    }

    /// Applies defaults to `s` and validates.
    pub fn from_settings(data_dir: &Path, s: &ServerSettings) -> anyhow::Result<Self> {
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let config = Config {
            data_dir: data_dir.to_owned(),
            overlay: match s.overlay {
                Some(net) => net,
                None => defaults::OVERLAY.parse().context("built-in overlay")?,
            },
            overlays: {
                let first = match s.overlay {
                    Some(net) => net,
                    None => defaults::OVERLAY.parse().context("built-in overlay")?,
                };
                if s.extra_overlay.len() > MAX_EXTRA_OVERLAYS {
                    bail!(
                        "{} extra overlay networks: at most {MAX_EXTRA_OVERLAYS} may be added",
                        s.extra_overlay.len()
                    );
                }
                Overlays::new(first, &s.extra_overlay)?
            },
            endpoint: s.endpoint.clone(),
            wg_listen: s.wg_listen.unwrap_or(any(defaults::WG_PORT)),
            api_listen: s.api_listen.unwrap_or(any(defaults::API_PORT)),
            quic_listen: s.quic_listen.unwrap_or(any(defaults::API_PORT)),
            metrics_listen: s.metrics_listen.unwrap_or(any(defaults::METRICS_PORT)),
            wg_tls_listen: s.wg_tls_listen,
            cert_lifetime: s
                .cert_lifetime
                .unwrap_or(Duration::from_secs(defaults::DEVICE_CERT_LIFETIME_SECS)),
            operator_cert_lifetime: s
                .operator_cert_lifetime
                .unwrap_or(Duration::from_secs(12 * 3600)),
            ssh_cert_lifetime: s.ssh_cert_lifetime.unwrap_or(Duration::from_secs(3600)),
            login_token_lifetime: s
                .login_token_lifetime
                .unwrap_or(Duration::from_secs(24 * 3600)),
            shutdown_grace: s
                .shutdown_grace
                .unwrap_or(Duration::from_secs(defaults::SHUTDOWN_GRACE_SECS)),
            online_window: s.online_window.unwrap_or(Duration::from_secs(
                3 * u64::from(defaults::PERSISTENT_KEEPALIVE_SECS) + 10,
            )),
            tls_cert: s.tls_cert.clone(),
            tls_key: s.tls_key.clone(),
            tls_names: s.tls_names.clone(),
            handshake_rate_limit: s
                .handshake_rate_limit
                .unwrap_or(crate::wg::admission::DEFAULT_HANDSHAKE_RATE),
            max_concurrent_enrollments: s.max_concurrent_enrollments.unwrap_or(256),
            max_sessions_per_operator: s
                .max_sessions_per_operator
                .unwrap_or(DEFAULT_SESSIONS_PER_OPERATOR),
            max_sessions_per_device: s
                .max_sessions_per_device
                .unwrap_or(DEFAULT_SESSIONS_PER_DEVICE),
            enroll_rate_per_key: s.enroll_rate_per_key.unwrap_or(100),
            address_reuse_after: s
                .address_reuse_after
                .unwrap_or(Duration::from_secs(30 * 24 * 3600)),
            max_connections: s.max_connections.unwrap_or(16_384),
            max_connections_per_address: s.max_connections_per_address.unwrap_or(256),
            client_idle_timeout: s.client_idle_timeout.unwrap_or(Duration::from_secs(30)),
            database_url: s
                .database_url
                .as_deref()
                .map(DatabaseUrl::parse)
                .transpose()?,
            node_name: s
                .node_name
                .clone()
                .or_else(local_hostname)
                .unwrap_or_else(|| "node".to_owned()),
            node_address: s
                .node_address
                .clone()
                .or_else(local_hostname)
                .unwrap_or_else(|| "localhost".to_owned()),
            log_format: s.log_format.unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(endpoint) = &self.endpoint {
            validate_endpoint(endpoint)?;
        }
        if self.cert_lifetime < Duration::from_secs(30) {
            bail!(
                "cert lifetime {} is too short: at least 30s",
                humantime::format_duration(self.cert_lifetime)
            );
        }
        if self.operator_cert_lifetime < Duration::from_secs(30) {
            bail!("operator cert lifetime must be at least 30s");
        }
        if !(Duration::from_secs(30)..=Duration::from_secs(7 * 24 * 3600))
            .contains(&self.ssh_cert_lifetime)
        {
            bail!("SSH certificate lifetime must be between 30s and 7d");
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            bail!("shutdown grace must be at most 1h");
        }
        if self.login_token_lifetime < Duration::from_secs(1) {
            bail!("login token lifetime must be at least 1s");
        }
        if self.online_window < Duration::from_secs(5) {
            bail!("online window must be at least 5s");
        }
        if self.handshake_rate_limit == 0 {
            bail!("handshake rate limit must be at least 1 per second");
        }
        if self.max_concurrent_enrollments == 0 {
            bail!("max concurrent enrollments must be at least 1");
        }
        if self.max_sessions_per_operator == 0 || self.max_sessions_per_device == 0 {
            bail!("max sessions per operator and per device must be at least 1");
        }
        if self.enroll_rate_per_key == 0 {
            bail!("enroll rate per key must be at least 1 per second");
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            bail!("max connections (in all and per address) must be at least 1");
        }
        if self.client_idle_timeout < Duration::from_secs(1) {
            bail!("client idle timeout must be at least 1s");
        }
        for name in &self.tls_names {
            if name.is_empty() || name.contains(char::is_whitespace) {
                bail!("TLS name {name:?} is not a DNS name or IP address");
            }
        }
        if self.node_name.is_empty()
            || self.node_name.len() > 64
            || !self
                .node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            bail!(
                "node name {:?} must be 1 to 64 letters, digits, '-', '.' or '_'",
                self.node_name
            );
        }
        if self.node_address.is_empty() || self.node_address.contains(char::is_whitespace) {
            bail!(
                "node address {:?} is not a host name or IP address",
                self.node_address
            );
        }
        if self.api_listen == self.metrics_listen && self.api_listen.port() != 0 {
            bail!("API and metrics cannot both listen on {}", self.api_listen);
        }
        Ok(())
    }

    /// The server's own overlay address: the first host of the overlay.
    pub fn server_overlay_ip(&self) -> Ipv4Addr {
        let n = u32::from(self.overlay.network());
        Ipv4Addr::from(n + 1)
    }

    /// The settings `init` writes to the config file: only what was chosen explicitly.
    pub fn persisted_settings(overlay: Ipv4Net, endpoint: Option<String>) -> ServerSettings {
        ServerSettings {
            overlay: Some(overlay),
            endpoint,
            ..ServerSettings::default()
        }
    }
}

impl ServerSettings {
    /// `self` where set, else `lower`.
    fn over(self, lower: ServerSettings) -> ServerSettings {
        ServerSettings {
            overlay: self.overlay.or(lower.overlay),
            extra_overlay: if self.extra_overlay.is_empty() {
                lower.extra_overlay
            } else {
                self.extra_overlay
            },
            endpoint: self.endpoint.or(lower.endpoint),
            wg_listen: self.wg_listen.or(lower.wg_listen),
            api_listen: self.api_listen.or(lower.api_listen),
            quic_listen: self.quic_listen.or(lower.quic_listen),
            metrics_listen: self.metrics_listen.or(lower.metrics_listen),
            wg_tls_listen: self.wg_tls_listen.or(lower.wg_tls_listen),
            cert_lifetime: self.cert_lifetime.or(lower.cert_lifetime),
            operator_cert_lifetime: self.operator_cert_lifetime.or(lower.operator_cert_lifetime),
            ssh_cert_lifetime: self.ssh_cert_lifetime.or(lower.ssh_cert_lifetime),
            login_token_lifetime: self.login_token_lifetime.or(lower.login_token_lifetime),
            shutdown_grace: self.shutdown_grace.or(lower.shutdown_grace),
            online_window: self.online_window.or(lower.online_window),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_names: if self.tls_names.is_empty() {
                lower.tls_names
            } else {
                self.tls_names
            },
            handshake_rate_limit: self.handshake_rate_limit.or(lower.handshake_rate_limit),
            max_concurrent_enrollments: self
                .max_concurrent_enrollments
                .or(lower.max_concurrent_enrollments),
            max_sessions_per_operator: self
                .max_sessions_per_operator
                .or(lower.max_sessions_per_operator),
            max_sessions_per_device: self
                .max_sessions_per_device
                .or(lower.max_sessions_per_device),
            enroll_rate_per_key: self.enroll_rate_per_key.or(lower.enroll_rate_per_key),
            address_reuse_after: self.address_reuse_after.or(lower.address_reuse_after),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .or(lower.max_connections_per_address),
            client_idle_timeout: self.client_idle_timeout.or(lower.client_idle_timeout),
            database_url: self.database_url.or(lower.database_url),
            node_name: self.node_name.or(lower.node_name),
            node_address: self.node_address.or(lower.node_address),
            log_format: self.log_format.or(lower.log_format),
        }
    }
}

/// Reads a TOML config file.
pub fn read_settings(path: &Path) -> anyhow::Result<ServerSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
}

/// `HOST:PORT` where HOST is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn validate_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let bad = || {
        anyhow::anyhow!(
            "endpoint {endpoint:?} must be HOST:PORT (a DNS name or IP address, and a port 1-65535)"
        )
    };
    if endpoint.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if port == 0 || !host_ok {
        return Err(bad());
    }
    Ok(())
}

/// The machine's host name, when it is a usable DNS name.
pub fn local_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_settings(Path::new("d"), &ServerSettings::default()).unwrap();
        assert_eq!(c.overlay.to_string(), "10.240.0.0/12");
        assert!(floto_registry::rules::overlay_capacity(c.overlay) >= 1_000_000);
        assert_eq!(c.server_overlay_ip(), Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(c.wg_listen.port(), 51820);
        assert_eq!(c.api_listen.port(), 8443);
        assert_eq!(c.quic_listen.port(), 8443);
        assert_eq!(c.metrics_listen.port(), 9090);
        assert_eq!(c.cert_lifetime, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.online_window, Duration::from_secs(85));
    }

    #[test]
    fn flags_win_over_file() {
        let file: ServerSettings = toml::from_str(
            "overlay = \"10.9.0.0/16\"\nendpoint = \"a.example:1\"\ncert_lifetime = \"2d\"\n",
        )
        .unwrap();
        let flags = ServerSettings {
            endpoint: Some("b.example:2".into()),
            ..Default::default()
        };
        let c = Config::from_settings(Path::new("d"), &flags.over(file)).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("b.example:2"));
        assert_eq!(c.overlay.to_string(), "10.9.0.0/16");
        assert_eq!(c.cert_lifetime, Duration::from_secs(2 * 24 * 3600));
        // A list from the file, unless the flags give one.
        let file: ServerSettings =
            toml::from_str("overlay = \"10.9.0.0/16\"\nextra_overlay = [\"10.8.0.0/24\"]\n")
                .unwrap();
        let c = Config::from_settings(
            Path::new("d"),
            &ServerSettings::default().over(file.clone()),
        )
        .unwrap();
        assert_eq!(c.overlays.to_string(), "10.9.0.0/16, 10.8.0.0/24");
        let flags = ServerSettings {
            extra_overlay: vec!["10.7.0.0/24".parse().unwrap()],
            ..Default::default()
        };
        let c = Config::from_settings(Path::new("d"), &flags.over(file)).unwrap();
        assert_eq!(c.overlays.to_string(), "10.9.0.0/16, 10.7.0.0/24");
    }

    #[test]
    fn invalid_settings_are_refused_with_a_reason() {
        let cases = [
            ("overlay = \"10.240.0.1/16\"", "not a network address"),
            ("overlay = \"10.240.0.0/31\"", "prefix /31"),
            (
                "overlay = \"10.240.0.0/16\"\nextra_overlay = [\"10.240.8.0/24\"]",
                "overlaps",
            ),
            (
                "extra_overlay = [\"10.9.0.0/24\", \"10.9.1.0/24\", \"10.9.2.0/24\", \"10.9.3.0/24\"]",
                "at most 3",
            ),
            ("extra_overlay = [\"10.9.0.1/24\"]", "not a network address"),
            ("ssh_cert_lifetime = \"10s\"", "between 30s and 7d"),
            ("ssh_cert_lifetime = \"8d\"", "between 30s and 7d"),
            ("endpoint = \"no-port\"", "HOST:PORT"),
            ("endpoint = \"host:0\"", "HOST:PORT"),
            ("cert_lifetime = \"1s\"", "too short"),
            ("shutdown_grace = \"2h\"", "at most 1h"),
            ("max_sessions_per_operator = 0", "at least 1"),
            ("max_sessions_per_device = 0", "at least 1"),
            ("max_connections = 0", "at least 1"),
            ("max_connections_per_address = 0", "at least 1"),
            ("client_idle_timeout = \"500ms\"", "at least 1s"),
            ("enroll_rate_per_key = 0", "at least 1 per second"),
            ("node_name = \"\"", "1 to 64 letters"),
            ("node_name = \"node 1\"", "1 to 64 letters"),
            ("node_name = \"a/b\"", "1 to 64 letters"),
            ("node_address = \"\"", "not a host name or IP address"),
            (
                "node_address = \"10.0.0.1 x\"",
                "not a host name or IP address",
            ),
            (
                "database_url = \"mysql://u:hunter2@db/x\"",
                "not a postgres:// URL",
            ),
        ];
        for (toml_text, want) in cases {
            let s: ServerSettings = toml::from_str(toml_text).unwrap();
            let err = Config::from_settings(Path::new("d"), &s).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{toml_text}: {err:#}");
        }
        assert!(toml::from_str::<ServerSettings>("no_such_key = 1").is_err());
    }

    #[test]
    fn endpoints() {
        for ok in [
            "vpn.example.org:51820",
            "10.0.0.1:51820",
            "[::1]:51820",
            "localhost:1",
        ] {
            validate_endpoint(ok).unwrap();
        }
        for bad in ["", ":51820", "host:", "host:70000", "ho st:1", "a..b:1"] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn database_urls_are_postgres_and_never_show_their_password() {
        let url = DatabaseUrl::parse("postgres://floto:s3cret@db.example:5432/floto").unwrap();
        assert_eq!(
            url.expose(),
            "postgres://floto:s3cret@db.example:5432/floto"
        );
        for shown in [format!("{url}"), format!("{url:?}")] {
            assert_eq!(shown, "postgres://floto:***@db.example:5432/floto");
        }
        let socket = DatabaseUrl::parse("postgresql://floto@localhost/floto?host=/run/postgresql");
        assert!(socket.is_ok());
        let err = DatabaseUrl::parse("mysql://u:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a postgres:// URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = DatabaseUrl::parse("sqlite://x.db").unwrap_err().to_string();
        assert!(err.contains("SQLite in the data dir"), "{err}");
    }
}
