//! The command line of `floto-vpn-server`: every subcommand and flag (clap). What each
//! does is in `main.rs` (run), `data_cli.rs` (init, backup, restore) and `admin_cli.rs`
//! (commands that act on the running server through its API).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

use floto_proto::admin::Role;
use floto_proto::DeviceId;
use floto_vpn_server::config::ServerSettings;

#[derive(Parser)]
#[command(
    name = "floto-vpn-server",
    version,
    about = "floto-connect server: WireGuard concentrator, enrollment API, broker"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct DataDirArg {
    /// Server data directory (CA, keys, registry, config).
    #[arg(long, env = "FLOTO_DATA_DIR", default_value = floto_proto::defaults::DATA_DIR, global = true)]
    pub(crate) data_dir: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Import this SSH user CA (OpenSSH Ed25519 private key, unencrypted) instead of
        /// making one: the CA devices already trust for operators' certificates.
        #[arg(long, value_name = "FILE", requires = "ssh_host_ca")]
        ssh_user_ca: Option<PathBuf>,
        /// Import this SSH host CA (as --ssh-user-ca): the CA operators already trust for
        /// devices' host certificates.
        #[arg(long, value_name = "FILE", requires = "ssh_user_ca")]
        ssh_host_ca: Option<PathBuf>,
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
    /// Fleet settings: the logins operators may use over SSH.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// The SSH CAs: `show` prints their public keys (for devices configured by hand).
    SshCa {
        #[command(subcommand)]
        command: SshCaCommand,
    },
    /// The nodes of a cluster (a single node lists itself).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
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
    /// Copy this data dir's SQLite registry into an empty PostgreSQL database, to go from
    /// one node to a cluster without re-enrolling a device. The server must be stopped; the
    /// SQLite file is only read, and a database that holds anything is refused.
    MigrateRegistry {
        #[command(flatten)]
        dir: DataDirArg,
        /// The cluster's database, postgres://USER:PASSWORD@HOST/DB.
        #[arg(
            long,
            env = "FLOTO_DATABASE_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        to: String,
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
pub(crate) enum KeyCommand {
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
    /// Revoke a provisioning key: it enrolls nothing more. Devices it enrolled stay.
    Revoke {
        #[command(flatten)]
        dir: DataDirArg,
        /// The key's id (`key list`, or the line `key create` printed to stderr).
        id: String,
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
pub(crate) enum OperatorCommand {
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
pub(crate) enum FleetCommand {
    /// Set the logins operators may use on a fleet's devices (the principals of their SSH
    /// certificates); `--default` goes back to `root`.
    Set {
        #[command(flatten)]
        dir: DataDirArg,
        name: String,
        /// A login (repeatable, or comma-separated).
        #[arg(
            long = "ssh-login",
            value_delimiter = ',',
            required_unless_present = "default"
        )]
        ssh_logins: Vec<String>,
        #[arg(long, conflicts_with = "ssh_logins")]
        default: bool,
    },
    /// List fleets with settings of their own.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum SshCaCommand {
    /// Print the user CA (for sshd's TrustedUserCAKeys) and the host CA (for known_hosts'
    /// `@cert-authority *.floto`), read from the data dir.
    Show {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only the user CA's line.
        #[arg(long, conflicts_with = "host")]
        user: bool,
        /// Only the host CA's line.
        #[arg(long)]
        host: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum NodeCommand {
    /// List nodes: lease, whether alive, devices held.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum DeviceCommand {
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
