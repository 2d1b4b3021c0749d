//! `floto-tunnel`: the device agent's command line.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use floto_client::cli::Program;
use floto_proto::{rfc3339, DeviceId};
use floto_tunnel_client::agent::config::{
    AgentConfig, ConfigError, FileConfig, Forward, Mode, Overrides, TransportChoice,
};
use floto_tunnel_client::agent::status::AgentStatus;
use floto_tunnel_client::enroll::{enroll, EnrollOptions};
use floto_tunnel_client::servers::ServerUrl;
use floto_tunnel_client::state::{StateDir, StateError};

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status for a damaged state dir (EX_DATAERR): a person must look at it.
const EXIT_DAMAGED: u8 = 65;

#[derive(Parser)]
#[command(name = "floto-tunnel", version, about = "floto-connect device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct StateDirArg {
    /// Where the device keeps its identity.
    #[arg(long, env = "FLOTO_STATE_DIR", default_value = floto_proto::defaults::STATE_DIR, global = true)]
    state_dir: PathBuf,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Config file (TOML; default /etc/floto-tunnel.toml when it exists). Flags override it.
    #[arg(long, env = "FLOTO_CONFIG")]
    config: Option<PathBuf>,
    /// Where the device keeps its identity [default: /var/lib/floto-tunnel].
    #[arg(long, env = "FLOTO_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// A TUN interface with the overlay address: every local service is reachable (root).
    #[arg(long, conflicts_with = "userspace")]
    tun: bool,
    /// No TUN and no root: a userspace TCP stack forwards only the --forward ports.
    #[arg(long)]
    userspace: bool,
    /// PORT[=HOST:PORT]: overlay PORT goes to HOST:PORT (default 127.0.0.1:PORT). Repeatable.
    #[arg(long = "forward", value_name = "PORT[=HOST:PORT]")]
    forwards: Vec<Forward>,
    /// Name of the TUN interface [default: floto0].
    #[arg(long, env = "FLOTO_TUN_NAME")]
    tun_name: Option<String>,
    /// The server's API, https://HOST[:PORT] (to enroll when the state dir is empty, and to
    /// renew). For a cluster, repeat it or separate the URLs with commas (also in
    /// FLOTO_SERVER): enrollment asks them in order until one answers, renewal asks the one
    /// the device enrolled with first, and each URL's host is also tried as a WireGuard
    /// endpoint (with the assigned endpoint's port) when the assigned one does not answer.
    /// Replaces the config file's `server` list.
    #[arg(
        long = "server",
        env = "FLOTO_SERVER",
        value_name = "URL",
        value_delimiter = ','
    )]
    servers: Vec<ServerUrl>,
    /// CA certificate (PEM) the server's TLS certificate chains to (to enroll).
    #[arg(long, env = "FLOTO_CA")]
    ca: Option<PathBuf>,
    /// The fleet's provisioning key (to enroll, and to re-enroll after expiry).
    #[arg(long, env = "FLOTO_PROVISIONING_KEY", hide_env_values = true)]
    provisioning_key: Option<String>,
    /// A file whose first line is the provisioning key.
    #[arg(long, env = "FLOTO_PROVISIONING_KEY_FILE")]
    provisioning_key_file: Option<PathBuf>,
    /// The UUID to enroll as (default: a new one).
    #[arg(long, env = "FLOTO_UUID")]
    uuid: Option<DeviceId>,
    /// Longest wait between reconnection attempts [default: 2m].
    #[arg(long, env = "FLOTO_BACKOFF_CAP", value_parser = humantime::parse_duration)]
    backoff_cap: Option<std::time::Duration>,
    /// Keepalive interval [default: the server's, 25s]; the session counts as dead after
    /// two of them plus 5 s without an answer.
    #[arg(long, env = "FLOTO_KEEPALIVE", value_parser = humantime::parse_duration)]
    keepalive: Option<std::time::Duration>,
    /// Set sshd up so operators log in with certificates and the device shows host
    /// certificates (an sshd_config.d drop-in, checked with `sshd -t`) [default: true].
    #[arg(long, env = "FLOTO_MANAGE_SSHD", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    manage_sshd: Option<bool>,
    /// sshd's configuration directory [default: /etc/ssh].
    #[arg(long, env = "FLOTO_SSHD_DIR", value_name = "DIR")]
    sshd_dir: Option<PathBuf>,
    /// Shell command that reloads sshd [default: SIGHUP to /run/sshd.pid, else `systemctl
    /// reload ssh`].
    #[arg(long, env = "FLOTO_SSHD_RELOAD", value_name = "COMMAND")]
    sshd_reload: Option<String>,
    /// How often to ask the server for the fleet's current SSH logins and user CA
    /// [default: 5m].
    #[arg(long, env = "FLOTO_SSHD_REFRESH", value_name = "DURATION", value_parser = humantime::parse_duration)]
    sshd_refresh: Option<std::time::Duration>,
    /// What carries WireGuard: auto (UDP, and a TLS stream to the server's HTTPS port when
    /// UDP gets no answer, back to UDP when it answers again), udp, or tls [default: auto].
    #[arg(long, env = "FLOTO_TRANSPORT", value_name = "auto|udp|tls")]
    transport: Option<TransportChoice>,
    /// HTTP proxy for the TLS transport, http://HOST:PORT (CONNECT to the server's HTTPS
    /// port) [default: HTTPS_PROXY or https_proxy from the environment; NO_PROXY is not
    /// read]. "" for none.
    #[arg(long, env = "FLOTO_PROXY", value_name = "URL")]
    proxy: Option<String>,
    /// While on TLS (auto), how often to look whether UDP works again (at least 10s)
    /// [default: 3m].
    #[arg(long, env = "FLOTO_UDP_PROBE_EVERY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    udp_probe_every: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device once: make its keys, prove the provisioning key, store the identity.
    Enroll {
        #[command(flatten)]
        dir: StateDirArg,
        /// The server's API, https://HOST[:PORT]. For a cluster, repeat it or separate the
        /// URLs with commas (also in FLOTO_SERVER): they are asked in order until one answers.
        #[arg(
            long = "server",
            env = "FLOTO_SERVER",
            value_name = "URL",
            value_delimiter = ',',
            required = true
        )]
        servers: Vec<ServerUrl>,
        /// CA certificate (PEM) the server's TLS certificate chains to.
        #[arg(long, env = "FLOTO_CA")]
        ca: PathBuf,
        /// The fleet's provisioning key.
        #[arg(long, env = "FLOTO_PROVISIONING_KEY", hide_env_values = true)]
        provisioning_key: String,
        /// This device's UUID (default: keep the one in the state dir, or make one).
        #[arg(long, env = "FLOTO_UUID")]
        uuid: Option<DeviceId>,
        #[arg(long)]
        device_type: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Run the agent: enroll if needed, keep the tunnel up, renew the certificate.
    Run(Box<RunArgs>),
    /// Show the device's identity and the running agent's state.
    Status {
        #[command(flatten)]
        dir: StateDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Print a complete wg-quick config, for kernel WireGuard or wireguard-go.
    WgConfig {
        #[command(flatten)]
        dir: StateDirArg,
    },
}

fn main() -> ExitCode {
    floto_tunnel_client::init_logging("info");
    let cli = Cli::parse();
    Program::new("floto-tunnel")
        .exit_code(exit_code)
        .run(async { dispatch(cli).await.map(|()| ExitCode::SUCCESS) })
}

/// EX_USAGE for an invalid configuration, EX_DATAERR for a damaged state dir, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else if matches!(
        e.downcast_ref::<StateError>(),
        Some(StateError::Damaged { .. })
    ) {
        ExitCode::from(EXIT_DAMAGED)
    } else {
        ExitCode::FAILURE
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            dir,
            servers,
            ca,
            provisioning_key,
            uuid,
            device_type,
            hostname,
        } => {
            let server_ca_pem = floto_files::read_to_string(&ca)?;
            let state_dir = StateDir::new(dir.state_dir);
            let (state, created) = enroll(
                &state_dir,
                &EnrollOptions {
                    servers,
                    server_ca_pem,
                    provisioning_key,
                    uuid,
                    device_type,
                    hostname,
                    // The agent asks for host certificates when it runs.
                    ssh_host_keys: Vec::new(),
                    proxy: None,
                },
            )
            .await?;
            eprintln!(
                "{} device {} with overlay address {}; certificate valid until {}",
                if created { "enrolled" } else { "re-enrolled" },
                state.file.assignment.uuid,
                state.file.assignment.overlay_ip,
                rfc3339(state.file.assignment.expires_at)
            );
            println!("{}", state.file.assignment.uuid);
        }
        Command::Run(args) => run(*args).await?,
        Command::Status { dir, json } => status(dir.state_dir, json)?,
        Command::WgConfig { dir } => {
            let state = StateDir::new(dir.state_dir).load()?;
            print!("{}", state.wg_quick_config());
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = FileConfig::load(args.config.as_deref())?;
    let mode = match (args.tun, args.userspace) {
        (true, _) => Some(Mode::Tun),
        (_, true) => Some(Mode::Userspace),
        _ => None,
    };
    let config = AgentConfig::build(
        file,
        Overrides {
            servers: args.servers,
            ca: args.ca,
            provisioning_key: args.provisioning_key,
            provisioning_key_file: args.provisioning_key_file,
            uuid: args.uuid,
            state_dir: args.state_dir,
            mode,
            tun_name: args.tun_name,
            forward: args.forwards,
            backoff_cap: args.backoff_cap,
            keepalive: args.keepalive,
            manage_sshd: args.manage_sshd,
            sshd_dir: args.sshd_dir,
            sshd_reload: args.sshd_reload,
            sshd_refresh: args.sshd_refresh,
            transport: args.transport,
            proxy: args.proxy,
            proxy_from_env: ["HTTPS_PROXY", "https_proxy"]
                .iter()
                .find_map(|name| std::env::var(name).ok()),
            udp_probe_every: args.udp_probe_every,
        },
        std::path::Path::new(floto_proto::defaults::STATE_DIR),
    )?;
    floto_tunnel_client::agent::run(config, shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `floto-tunnel status`: the identity, and the running agent's report.
fn status(state_dir: PathBuf, json: bool) -> anyhow::Result<()> {
    let dir = StateDir::new(state_dir);
    let state = dir.load()?;
    let agent = AgentStatus::read(&dir.status())?;
    let running = agent.as_ref().is_some_and(AgentStatus::agent_running);
    let live = agent.as_ref().filter(|_| running);
    let f = &state.file;
    let assigned = &f.assignment;
    if json {
        let v = serde_json::json!({
            "uuid": assigned.uuid,
            "server": f.server,
            "overlay_ip": assigned.overlay_ip,
            "server_overlay_ip": assigned.server_overlay_ip,
            "configured_endpoint": assigned.endpoint,
            "wg_public_key": state.wg_public().to_base64(),
            "cert_expires_at": rfc3339(assigned.expires_at),
            "renew_after": rfc3339(assigned.renew_after),
            "running": running,
            "pid": live.map(|a| a.pid),
            "mode": live.map(|a| a.mode),
            "connected": live.is_some_and(|a| a.connected),
            "since": live.and_then(|a| a.since).map(rfc3339),
            "endpoint": live.and_then(|a| a.endpoint.clone()),
            "transport": live.and_then(|a| a.transport),
            "proxy": live.and_then(|a| a.proxy.clone()),
            "revoked": live.is_some_and(|a| a.revoked),
            "failed_attempts": live.map(|a| a.failed_attempts),
            "connects": live.map(|a| a.connects),
            "renewals": live.map(|a| a.renewals),
            "last_error": agent.as_ref().and_then(|a| a.last_error.clone()),
            "last_error_at": agent.as_ref().and_then(|a| a.last_error_at).map(rfc3339),
            "status_updated_at": agent.as_ref().map(|a| rfc3339(a.updated_at)),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("device       {}", assigned.uuid);
    println!("server       {}", f.server);
    println!("overlay ip   {}", assigned.overlay_ip);
    println!("wg key       {}", state.wg_public());
    println!("cert expires {}", rfc3339(assigned.expires_at));
    match live {
        None => {
            println!("agent        not running");
            println!("endpoint     {}", assigned.endpoint);
        }
        Some(a) => {
            let since = a.since.map(rfc3339).unwrap_or_default();
            let what = if a.revoked {
                "REVOKED (retrying rarely)"
            } else if a.connected {
                "connected"
            } else {
                "not connected"
            };
            println!("agent        running (pid {}, {} mode)", a.pid, a.mode);
            println!("state        {what} since {since}");
            println!(
                "endpoint     {}",
                a.endpoint.as_deref().unwrap_or(assigned.endpoint.as_str())
            );
            if let Some(transport) = a.transport {
                match &a.proxy {
                    Some(proxy) => println!("transport    {transport} (through proxy {proxy})"),
                    None => println!("transport    {transport}"),
                }
            }
            if a.failed_attempts > 0 {
                println!("failed tries {}", a.failed_attempts);
            }
        }
    }
    if let Some(a) = &agent {
        if let (Some(e), Some(at)) = (&a.last_error, a.last_error_at) {
            println!("last error   {e} (at {})", rfc3339(at));
        }
    }
    Ok(())
}
