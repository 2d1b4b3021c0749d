//! `floto-vpn-server`: command-line entry point. Parses the command, builds the config,
//! runs the server or talks to a running one; signals are handled here only.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin_cli;
mod cli;
mod data_cli;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser as _;

use floto_vpn_server::config::{Config, LogFormat, ServerSettings};
use floto_vpn_server::datadir::ImportSsh;

use cli::{Cli, Command};

/// Exit code for an unusable configuration (as linkerd: EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    floto_client::cli::Program::new("error").run(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init {
            dir,
            overlay,
            endpoint,
            ca_cert,
            ca_key,
            ssh_user_ca,
            ssh_host_ca,
        } => {
            init_logging(LogFormat::Human);
            let import_ssh = ssh_user_ca
                .zip(ssh_host_ca)
                .map(|(user, host)| ImportSsh { user, host });
            data_cli::init(dir, overlay, endpoint, ca_cert, ca_key, import_ssh)
        }
        Command::Run {
            dir,
            config,
            settings,
        } => run(&dir.data_dir, config.as_deref(), &settings).await,
        Command::Backup { dir, file } => data_cli::backup(dir, file).await,
        Command::Restore { dir, file, force } => data_cli::restore(dir, file, force).await,
        Command::MigrateRegistry { dir, to } => data_cli::migrate_registry(dir, to).await,
        Command::Key { command } => admin_cli::key(command).await,
        Command::Operator { command } => admin_cli::operator(command).await,
        Command::Device { command } => admin_cli::device(command).await,
        Command::Node { command } => admin_cli::node(command).await,
        Command::Fleet { command } => admin_cli::fleet(command).await,
        Command::SshCa { command } => data_cli::ssh_ca(command),
        Command::Audit {
            dir,
            device,
            operator,
            since,
            limit,
            json,
        } => {
            admin_cli::audit(
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

/// `run`: the configuration is validated before any port is bound; an invalid one exits
/// with [`EXIT_CONFIG`].
async fn run(
    data_dir: &Path,
    config_file: Option<&Path>,
    settings: &ServerSettings,
) -> anyhow::Result<ExitCode> {
    let config = match Config::load(data_dir, config_file, settings) {
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
