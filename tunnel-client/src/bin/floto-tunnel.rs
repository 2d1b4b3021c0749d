//! `floto-tunnel`: the device agent's command line.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use floto_client::files;
use floto_proto::DeviceId;
use floto_tunnel_client::enroll::{enroll, EnrollOptions};
use floto_tunnel_client::state::StateDir;

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

#[derive(Subcommand)]
enum Command {
    /// Enroll this device once: make its keys, prove the provisioning key, store the identity.
    Enroll {
        #[command(flatten)]
        dir: StateDirArg,
        /// The server's API, https://HOST[:PORT].
        #[arg(long, env = "FLOTO_SERVER")]
        server: String,
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
    /// Show the device's identity and state.
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
    floto_client::tls::install_default_provider();
    floto_tunnel_client::init_logging("info");
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floto-tunnel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floto-tunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            dir,
            server,
            ca,
            provisioning_key,
            uuid,
            device_type,
            hostname,
        } => {
            let server_ca_pem = files::read_to_string(&ca)?;
            let state_dir = StateDir::new(dir.state_dir);
            let (state, created) = enroll(
                &state_dir,
                &EnrollOptions {
                    server,
                    server_ca_pem,
                    provisioning_key,
                    uuid,
                    device_type,
                    hostname,
                },
            )
            .await?;
            eprintln!(
                "{} device {} with overlay address {}; certificate valid until {}",
                if created { "enrolled" } else { "re-enrolled" },
                state.file.uuid,
                state.file.overlay_ip,
                rfc3339(state.file.expires_at)
            );
            println!("{}", state.file.uuid);
        }
        Command::Status { dir, json } => {
            let state = StateDir::new(dir.state_dir).load()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state.file)?);
            } else {
                let f = &state.file;
                println!("device       {}", f.uuid);
                println!("server       {}", f.server);
                println!("overlay ip   {}", f.overlay_ip);
                println!("endpoint     {}", f.endpoint);
                println!("wg key       {}", state.wg_public());
                println!("cert expires {}", rfc3339(f.expires_at));
                println!("renew after  {}", rfc3339(f.renew_after));
            }
        }
        Command::WgConfig { dir } => {
            let state = StateDir::new(dir.state_dir).load()?;
            print!("{}", state.wg_quick_config());
        }
    }
    Ok(())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
