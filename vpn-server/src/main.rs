//! `floto-vpn-server`: command-line entry point. Parses the command, builds the config,
//! runs the server or talks to a running one; signals are handled here only.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

use floto_client::{ApiClient, AuditQuery, Identity};
use floto_proto::admin::{AddOperatorRequest, CreateKeyRequest, Role, TokenKind};
use floto_proto::devices::DeviceInfo;
use floto_proto::DeviceId;
use floto_vpn_server::config::{Config, LogFormat, ServerSettings};
use floto_vpn_server::datadir::{DataDir, ImportCa, InitOptions};
use floto_vpn_server::RuntimeInfo;

#[derive(Parser)]
#[command(
    name = "floto-vpn-server",
    version,
    about = "floto-connect server: WireGuard concentrator, enrollment API, broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DataDirArg {
    /// Server data directory (CA, keys, registry, config).
    #[arg(long, env = "FLOTO_DATA_DIR", default_value = floto_proto::defaults::DATA_DIR, global = true)]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data dir: CA (or import one), WireGuard key, config. Never replaces a CA.
    Init {
        #[command(flatten)]
        dir: DataDirArg,
        /// Overlay network for device addresses.
        #[arg(long, env = "FLOTO_OVERLAY", value_name = "CIDR")]
        overlay: Option<Ipv4Net>,
        /// WireGuard endpoint devices are told to use, HOST:PORT.
        #[arg(long, env = "FLOTO_ENDPOINT", value_name = "HOST:PORT")]
        endpoint: Option<String>,
        /// Import this CA certificate (PEM) instead of generating one.
        #[arg(long, value_name = "FILE", requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The imported CA's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_key: Option<PathBuf>,
    },
    /// Run the server (initialises an empty data dir first).
    Run {
        #[command(flatten)]
        dir: DataDirArg,
        /// Config file (TOML); defaults to DATA_DIR/config.toml when present.
        #[arg(long, env = "FLOTO_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<ServerSettings>,
    },
    /// Provisioning keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Operators.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Write a consistent snapshot of the data dir (registry, CA, WireGuard key, settings)
    /// to FILE, a gzipped tar readable only by its owner. Safe while the server runs.
    Backup {
        #[command(flatten)]
        dir: DataDirArg,
        file: PathBuf,
    },
    /// Put a backup back into the data dir. The server must be stopped. A data dir that
    /// already holds one is replaced only with --force, and its files are kept aside.
    Restore {
        #[command(flatten)]
        dir: DataDirArg,
        file: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Read the audit log (newest first): broker sessions and refusals, admin actions.
    Audit {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only records about this device.
        #[arg(long)]
        device: Option<DeviceId>,
        /// Only records by this operator (or `device:UUID`, `key:ID`).
        #[arg(long)]
        operator: Option<String>,
        /// Only records since this time: RFC 3339, or a duration ago such as `2h`.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a provisioning key; prints it once, alone on the last line of stdout.
    Create {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        fleet: String,
        /// How many devices it may enroll (default: unlimited).
        #[arg(long)]
        uses: Option<u32>,
        /// Lifetime, e.g. `7d`, `12h` (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List provisioning keys (never their secrets).
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Add an operator and print its token alone on the last line of stdout: a one-time
    /// login token (for `floto login`) for admins and operators, a bearer API token for
    /// viewers (machine clients: Prometheus, the FLOTO API).
    Add {
        #[command(flatten)]
        dir: DataDirArg,
        name: String,
        #[arg(long)]
        role: Role,
        /// Fleets the operator may reach (repeatable). A viewer without fleets sees all.
        #[arg(long = "fleet")]
        fleets: Vec<String>,
        /// Lifetime of a viewer's API token, e.g. `90d` (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// Revoke an operator: its certificates and token are refused and its sessions closed.
    Revoke {
        #[command(flatten)]
        dir: DataDirArg,
        name: String,
    },
    /// List operators.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List enrolled devices with their live state.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        online: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        #[command(flatten)]
        dir: DataDirArg,
        uuid: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device: its session drops at once and its certificate is refused.
    Revoke {
        #[command(flatten)]
        dir: DataDirArg,
        uuid: String,
    },
}

/// Exit code for an unusable configuration (as linkerd: EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    floto_client::tls::install_default_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init {
            dir,
            overlay,
            endpoint,
            ca_cert,
            ca_key,
        } => {
            init_logging(LogFormat::Human);
            let import_ca = ca_cert
                .zip(ca_key)
                .map(|(cert, key)| ImportCa { cert, key });
            if let Some(e) = &endpoint {
                floto_vpn_server::config::validate_endpoint(e)?;
            }
            let data = DataDir::new(&dir.data_dir);
            let report = data.init(
                &InitOptions {
                    overlay,
                    endpoint,
                    import_ca,
                },
                time::OffsetDateTime::now_utc(),
            )?;
            for c in &report.created {
                println!("created {c}");
            }
            for k in &report.kept {
                println!("kept    {k}");
            }
            println!("data dir {} is ready", dir.data_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            dir,
            config,
            settings,
        } => {
            let config = match Config::load(&dir.data_dir, config.as_deref(), &settings) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: invalid configuration: {e:#}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            init_logging(config.log_format);
            let (first, second) = shutdown_signals();
            floto_vpn_server::run(config, first, second).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { dir, file } => {
            let data = DataDir::new(&dir.data_dir);
            let r = floto_vpn_server::backup::backup(&data, &file, time::OffsetDateTime::now_utc())
                .await?;
            println!(
                "wrote {} ({} bytes): {} devices, schema {}, files {}",
                r.path.display(),
                r.bytes,
                r.manifest.devices,
                r.manifest.schema_version,
                r.manifest
                    .files
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { dir, file, force } => {
            let data = DataDir::new(&dir.data_dir);
            let r = floto_vpn_server::backup::restore(
                &data,
                &file,
                force,
                time::OffsetDateTime::now_utc(),
            )
            .await?;
            if let Some(aside) = &r.kept_previous {
                println!("kept the replaced files in {}", aside.display());
            }
            println!(
                "restored {} (taken {}, {} devices) into {}; start the server with `run`",
                file.display(),
                rfc3339(r.manifest.created_at),
                r.manifest.devices,
                dir.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Key { command } => key(command).await,
        Command::Operator { command } => operator(command).await,
        Command::Device { command } => device(command).await,
        Command::Audit {
            dir,
            device,
            operator,
            since,
            limit,
            json,
        } => {
            audit(
                &dir.data_dir,
                device,
                operator,
                since.as_deref(),
                limit,
                json,
            )
            .await
        }
    }
}

async fn key(command: KeyCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeyCommand::Create {
            dir,
            fleet,
            uses,
            expires,
        } => {
            let api = admin_client(&dir.data_dir)?;
            let created = api
                .create_key(&CreateKeyRequest {
                    fleet,
                    uses,
                    expires_in_secs: expires.map(|d| d.as_secs().max(1)),
                })
                .await?;
            eprintln!(
                "provisioning key {} for fleet {:?}: {}, {}; shown only this once",
                created.id,
                created.fleet,
                created
                    .uses
                    .map_or("unlimited uses".to_owned(), |u| format!("{u} use(s)")),
                created
                    .expires_at
                    .map_or("no expiry".to_owned(), |t| format!(
                        "expires {}",
                        rfc3339(t)
                    )),
            );
            println!("{}", created.key);
        }
        KeyCommand::List { dir, json } => {
            let keys = admin_client(&dir.data_dir)?.list_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<14} {:<20} {:<10} {:<22} STATE",
                    "ID", "FLEET", "USES LEFT", "EXPIRES"
                );
                for k in keys {
                    println!(
                        "{:<14} {:<20} {:<10} {:<22} {}",
                        k.id,
                        k.fleet,
                        k.uses_left.map_or("-".to_owned(), |u| u.to_string()),
                        k.expires_at.map_or("-".to_owned(), rfc3339),
                        if k.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn operator(command: OperatorCommand) -> anyhow::Result<ExitCode> {
    match command {
        OperatorCommand::Add {
            dir,
            name,
            role,
            fleets,
            expires,
        } => {
            let api = admin_client(&dir.data_dir)?;
            let added = api
                .add_operator(&AddOperatorRequest {
                    name,
                    role,
                    fleets,
                    token_expires_in_secs: expires.map(|d| d.as_secs().max(1)),
                })
                .await?;
            let kind = match added.token_kind {
                TokenKind::Login => "one-time login token for `floto login`",
                TokenKind::Api => "API token (send it as `Authorization: Bearer <token>`)",
            };
            eprintln!(
                "operator {:?} ({}{}); {kind}, {}, shown only this once:",
                added.name,
                added.role,
                if added.fleets.is_empty() {
                    String::new()
                } else {
                    format!(", fleets {}", added.fleets.join(","))
                },
                added
                    .token_expires_at
                    .map_or("no expiry".to_owned(), |t| format!(
                        "valid until {}",
                        rfc3339(t)
                    ))
            );
            println!("{}", added.token);
        }
        OperatorCommand::Revoke { dir, name } => {
            let op = admin_client(&dir.data_dir)?.revoke_operator(&name).await?;
            println!("revoked operator {} ({})", op.name, op.role);
        }
        OperatorCommand::List { dir, json } => {
            let ops = admin_client(&dir.data_dir)?.list_operators().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ops)?);
            } else {
                println!("{:<24} {:<9} {:<30} STATE", "NAME", "ROLE", "FLEETS");
                for o in ops {
                    println!(
                        "{:<24} {:<9} {:<30} {}",
                        o.name,
                        o.role,
                        if o.fleets.is_empty() {
                            "*".to_owned()
                        } else {
                            o.fleets.join(",")
                        },
                        if o.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn device(command: DeviceCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeviceCommand::List { dir, online, json } => {
            let devices = admin_client(&dir.data_dir)?
                .devices(online.then_some(true))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print_devices(&devices);
            }
        }
        DeviceCommand::Show { dir, uuid, json } => {
            let id: DeviceId = uuid.parse()?;
            let d = admin_client(&dir.data_dir)?.device(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                let v = serde_json::to_value(&d)?;
                if let Some(map) = v.as_object() {
                    for (k, v) in map {
                        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        println!("{k:<16} {text}");
                    }
                }
            }
        }
        DeviceCommand::Revoke { dir, uuid } => {
            let id: DeviceId = uuid.parse()?;
            let d = admin_client(&dir.data_dir)?.revoke_device(&id).await?;
            println!(
                "revoked device {} (fleet {}, {})",
                d.uuid, d.fleet, d.overlay_ip
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(
    data_dir: &Path,
    device: Option<DeviceId>,
    operator: Option<String>,
    since: Option<&str>,
    limit: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let since = since.map(parse_since).transpose()?;
    let entries = admin_client(data_dir)?
        .audit(&AuditQuery {
            device,
            operator,
            since,
            limit: Some(limit),
        })
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        println!(
            "{:<20} {:<24} {:<18} {:<36} DETAIL",
            "AT", "ACTOR", "ACTION", "DEVICE"
        );
        for e in entries {
            println!(
                "{:<20} {:<24} {:<18} {:<36} {}",
                rfc3339(e.at),
                e.actor,
                e.action,
                e.device.map_or("-".to_owned(), |d| d.to_string()),
                e.detail
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: RFC 3339, or a duration ago (`90m`, `2h`, `7d`).
fn parse_since(s: &str) -> anyhow::Result<time::OffsetDateTime> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .with_context(|| format!("--since {s:?} is neither RFC 3339 nor a duration like 2h"))?;
    Ok(time::OffsetDateTime::now_utc() - ago)
}

fn print_devices(devices: &[DeviceInfo]) {
    println!(
        "{:<38} {:<16} {:<15} {:<8} {:<22} ENDPOINT",
        "UUID", "FLEET", "OVERLAY IP", "ONLINE", "LAST SEEN"
    );
    for d in devices {
        println!(
            "{:<38} {:<16} {:<15} {:<8} {:<22} {}",
            d.uuid,
            d.fleet,
            d.overlay_ip,
            d.online_word(),
            d.last_seen.map_or("-".to_owned(), rfc3339),
            d.endpoint.as_deref().unwrap_or("-"),
        );
    }
}

/// A client of the server running on `data_dir`, with the local admin's certificate.
fn admin_client(data_dir: &Path) -> anyhow::Result<ApiClient> {
    let data = DataDir::new(data_dir);
    let runtime_file = data.runtime();
    let text = std::fs::read_to_string(&runtime_file).with_context(|| {
        format!(
            "no floto-vpn-server is running with data dir {} ({} is missing); start it with `floto-vpn-server run --data-dir {}`",
            data_dir.display(),
            runtime_file.display(),
            data_dir.display()
        )
    })?;
    let runtime: RuntimeInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid", runtime_file.display()))?;
    let api = runtime.bound.api;
    let host = if api.ip().is_unspecified() {
        if api.is_ipv6() {
            "[::1]".to_owned()
        } else {
            "127.0.0.1".to_owned()
        }
    } else if api.is_ipv6() {
        format!("[{}]", api.ip())
    } else {
        api.ip().to_string()
    };
    let ca = floto_vpn_server::datadir::read_to_string(&data.ca_cert())?;
    let identity = Identity {
        cert_pem: floto_vpn_server::datadir::read_to_string(&data.admin_cert())?,
        key_pem: floto_vpn_server::datadir::read_secret(&data.admin_key())?,
    };
    Ok(ApiClient::new(
        &format!("https://{host}:{}", api.port()),
        &ca,
        Some(&identity),
    )?)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLOTO_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Two futures: the first SIGTERM or SIGINT starts the graceful shutdown, the next one cuts
/// its grace period short.
fn shutdown_signals() -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let first = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                eprintln!("error: cannot install signal handlers; stop with SIGKILL");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(());
        });
    };
    let second = async move {
        let _ = rx.await;
    };
    (first, second)
}
