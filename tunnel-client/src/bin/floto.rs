//! `floto`: the operator's command line.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use floto_client::broker::{self, Transport};
use floto_client::cli::Program;
use floto_proto::{rfc3339, DeviceId};
use floto_tunnel_client::exec;
use floto_tunnel_client::forward::{self, ForwardSpec};
use floto_tunnel_client::operator::{self, default_config_dir, Operator};
use floto_tunnel_client::ssh::{self, shell_quote};

#[derive(Parser)]
#[command(
    name = "floto",
    version,
    about = "floto-connect operator CLI: reach devices by UUID"
)]
struct Cli {
    /// Operator config dir (default: $XDG_CONFIG_HOME/floto).
    #[arg(long, env = "FLOTO_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// Broker transport: QUIC, HTTPS CONNECT, or QUIC falling back to CONNECT.
    #[arg(long, env = "FLOTO_BROKER_TRANSPORT", value_enum, default_value_t = TransportArg::Auto, global = true)]
    transport: TransportArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Auto,
    Quic,
    Connect,
}

impl TransportArg {
    fn transport(self) -> Transport {
        match self {
            Self::Auto => Transport::Auto,
            Self::Quic => Transport::Quic,
            Self::Connect => Transport::Connect,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Trade a one-time login token for an operator certificate.
    Login {
        /// The server's API, https://HOST[:PORT].
        #[arg(long, env = "FLOTO_SERVER")]
        server: String,
        #[arg(long, env = "FLOTO_TOKEN", hide_env_values = true)]
        token: String,
        /// CA certificate (PEM) of the server's TLS certificate (default: the system's CAs).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// List devices you may see.
    Devices {
        #[arg(long)]
        online: bool,
        #[arg(long)]
        json: bool,
    },
    /// ssh into a device through the broker (runs the system `ssh`). Exits with ssh's
    /// status, or 255 when the broker refuses, as ssh does when it cannot connect.
    Ssh {
        device: String,
        /// Remote user.
        #[arg(short = 'l', default_value = "root")]
        user: String,
        /// Remote port.
        #[arg(short = 'p', default_value_t = 22)]
        port: u16,
        /// Offer your own keys and ssh-agent too (by default only floto's certificate is
        /// offered, so ~/.ssh is never touched).
        #[arg(long)]
        own_keys: bool,
        /// Arguments for ssh (options, then the remote command).
        #[arg(last = true)]
        ssh_args: Vec<String>,
    },
    /// Get a fresh SSH certificate for a device (HOST: UUID or UUID.floto) and write it and
    /// the known-hosts file; what the `floto ssh-config` block runs before each connection.
    SshCert { host: String },
    /// Connect stdin/stdout to a device port (for ssh's ProxyCommand).
    Proxy {
        device: String,
        port: u16,
        /// Internal to `floto ssh`: splice with the stream it opened, handed over on this
        /// Unix socket.
        #[arg(long, hide = true)]
        attach: Option<PathBuf>,
    },
    /// Forward local ports to device ports: [LOCAL_ADDR:]LOCAL_PORT:REMOTE_PORT...
    Tunnel {
        device: String,
        #[arg(required = true)]
        forwards: Vec<ForwardSpec>,
    },
    /// Print an ssh_config block so plain ssh, scp, rsync and ansible reach UUID.floto.
    SshConfig,
    /// Run a command on every device of a fleet (ssh in batch mode through the broker,
    /// each session audited) and print one row per device, by UUID: UUID, STATUS (the
    /// exit code, or offline, timeout, refused, error), DURATION, the first line of
    /// output. Devices the list shows offline are not tried; they get an `offline` row.
    /// Exits 0 when every device ran the command with exit 0, 1 when any did not, 255
    /// when nothing could be run (not logged in, server unreachable, no devices).
    Exec {
        /// The fleet whose devices run the command.
        #[arg(long)]
        fleet: String,
        /// Only devices that are online (offline ones get no row).
        #[arg(long)]
        online: bool,
        /// Devices at once (1 to 256).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
        parallel: u16,
        /// Per device, from its certificate request to the end of ssh; ssh is killed then.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// A JSON array of rows instead of the table.
        #[arg(long)]
        json: bool,
        /// Save each device's stdout and stderr as DIR/<uuid>.out and DIR/<uuid>.err
        /// (DIR made 0700, files 0600), for the devices whose ssh ran.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
        /// Remote user.
        #[arg(short = 'l', default_value = "root")]
        user: String,
        /// Remote port.
        #[arg(short = 'p', default_value_t = 22)]
        port: u16,
        /// The command, run by the user's shell on each device (words joined by spaces,
        /// as ssh does).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    floto_tunnel_client::init_logging("warn");
    let cli = Cli::parse();
    // `floto proxy` reads stdin on a blocking thread that cannot be cancelled; waiting for it
    // would keep ssh's ProxyCommand alive after the device side has ended.
    Program::new("floto")
        // As ssh does when it cannot connect, so scripts tell "not reached" from a remote
        // command's failure.
        .exit_code(|e| match e.downcast_ref::<broker::BrokerError>() {
            Some(_) => ExitCode::from(255),
            None => ExitCode::FAILURE,
        })
        .abandon_blocking_tasks()
        .run(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = cli.config_dir.clone().unwrap_or_else(default_config_dir);
    let transport = cli.transport;
    match cli.command {
        Command::Login { server, token, ca } => {
            let ca_pem = match ca {
                Some(path) => floto_files::read_to_string(&path)?,
                None => system_roots()?,
            };
            let config = operator::login(&dir, &server, &token, &ca_pem).await?;
            eprintln!(
                "logged in to {} as {} ({}); certificate valid until {}",
                config.server,
                config.name,
                config.role,
                rfc3339(config.expires_at)
            );
        }
        Command::Devices { online, json } => {
            let op = Operator::load_renewing(&dir).await?;
            let devices = op.api()?.devices(online.then_some(true)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!("{}", floto_client::table::devices(&devices));
            }
        }
        Command::Ssh {
            device,
            user,
            port,
            own_keys,
            ssh_args,
        } => {
            let id = DeviceId::from_host(&device)?;
            let op = Operator::load_renewing(&dir).await?;
            let files = ssh::SshFiles::new(&dir);
            let opened = ssh::Session::open(
                &op,
                &files,
                &id,
                &user,
                port,
                transport.transport(),
                own_keys,
            )
            .await;
            let mut session = match opened {
                Ok(session) => session,
                Err(ssh::OpenError::Certificate(e)) => {
                    eprintln!("floto: {e:#}");
                    return Ok(ExitCode::from(255));
                }
                // The broker's own error, so that main exits 255 for it.
                Err(ssh::OpenError::Broker(e)) => return Err(e.into()),
                Err(e) => return Err(e.into()),
            };
            if !session.issued().host_certified {
                tracing::warn!(
                    "{id} has no SSH host certificate; its host key is trusted on first use"
                );
            }
            let host = session.host().to_owned();
            session.command().arg(host).args(&ssh_args);
            let status = session.run().await?;
            return Ok(ExitCode::from(ssh::exit_code(status)));
        }
        Command::Exec {
            fleet,
            online,
            parallel,
            timeout,
            json,
            output_dir,
            user,
            port,
            command,
        } => {
            let options = exec::Options {
                fleet,
                online_only: online,
                parallel: parallel.into(),
                timeout,
                login: user,
                port,
                command,
                output_dir,
                transport: transport.transport(),
            };
            let ran = async {
                let op = Operator::load_renewing(&dir).await?;
                exec::run(&op, ssh::SshFiles::new(&dir), options).await
            };
            let rows = match ran.await {
                Ok(rows) => rows,
                Err(e) => {
                    eprintln!("floto: {e:#}");
                    return Ok(ExitCode::from(exec::NOTHING_RAN));
                }
            };
            if json {
                println!("{}", exec::json(&rows)?);
            } else {
                print!("{}", exec::table(&rows));
            }
            eprintln!("{}", exec::summary(&rows));
            return Ok(ExitCode::from(exec::exit_status(&rows)));
        }
        Command::Proxy {
            device,
            port,
            attach: Some(socket),
        } => {
            // `device` and `port` are only for ssh's %n and %p; the stream is already open.
            let _ = (device, port);
            forward::attach_stdio(&socket).await?;
        }
        Command::Proxy {
            device,
            port,
            attach: None,
        } => {
            let op = Operator::load_renewing(&dir).await?;
            forward::proxy_stdio(&op.broker_target()?, &device, port, transport.transport())
                .await?;
        }
        Command::Tunnel { device, forwards } => {
            let op = Operator::load_renewing(&dir).await?;
            let target = op.broker_target()?;
            let id = DeviceId::from_host(&device)?;
            forward::tunnel(
                target,
                id.to_string(),
                forwards,
                transport.transport(),
                |bound| {
                    for (local, remote) in bound {
                        eprintln!("forwarding {local} -> {id}:{remote}");
                    }
                },
            )
            .await?;
        }
        Command::SshCert { host } => {
            let Some(id) = host
                .strip_suffix(floto_proto::ssh::HOST_SUFFIX)
                .or(Some(host.as_str()))
                .and_then(|h| DeviceId::from_host(h).ok())
            else {
                // Not a device name: `Match exec` must not apply the block.
                return Ok(ExitCode::FAILURE);
            };
            let op = Operator::load_renewing(&dir).await?;
            let issued = ssh::SshFiles::new(&dir).refresh(&op, &id, &[]).await?;
            tracing::info!(
                logins = %issued.principals.join(","),
                until = %rfc3339(issued.valid_before),
                "SSH certificate for {id}"
            );
        }
        Command::SshConfig => {
            let exe = std::env::current_exe()?;
            print!("{}", ssh_config(&exe, cli.config_dir.as_deref()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ssh_config(exe: &Path, config_dir: Option<&Path>) -> String {
    let flag = config_dir
        .map(|d| format!(" --config-dir {}", shell_quote(&d.to_string_lossy())))
        .unwrap_or_default();
    let files = ssh::SshFiles::new(&config_dir.map_or_else(default_config_dir, Path::to_owned));
    let floto = format!("{}{flag}", shell_quote(&exe.to_string_lossy()));
    let q = |p: PathBuf| shell_quote(&p.to_string_lossy());
    format!(
        "# floto-connect: `ssh UUID.floto` reaches a device through the broker, with a fresh\n\
         # SSH certificate per connection and the device verified by its host certificate.\n\
         Match host *.floto exec \"{floto} ssh-cert %h\"\n    \
         ProxyCommand {floto} proxy %h %p\n    \
         User root\n    \
         IdentityFile {key}\n    \
         CertificateFile {certs}/%h-cert.pub\n    \
         IdentitiesOnly yes\n    \
         UserKnownHostsFile {first_use} {known}\n    \
         StrictHostKeyChecking yes\n\
         # Devices named the openBalena way: no certificates, the host key is asked for once.\n\
         Host *.balena\n    \
         ProxyCommand {floto} proxy %n %p\n    \
         User root\n",
        key = q(files.key()),
        certs = q(files
            .certificate("x")
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default()),
        known = q(files.known_hosts()),
        first_use = q(files.first_use_hosts()),
    )
}

/// The system's CA bundle, for servers whose certificate is publicly trusted.
fn system_roots() -> anyhow::Result<String> {
    let candidates = [
        std::env::var("SSL_CERT_FILE").ok(),
        Some("/etc/ssl/certs/ca-certificates.crt".to_owned()),
        Some("/etc/pki/tls/certs/ca-bundle.crt".to_owned()),
    ];
    for c in candidates.into_iter().flatten() {
        if let Ok(pem) = std::fs::read_to_string(&c) {
            return Ok(pem);
        }
    }
    anyhow::bail!(
        "no --ca given and no system CA bundle found; pass --ca with the server's CA certificate"
    )
}
