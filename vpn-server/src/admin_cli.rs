//! The admin subcommands (`key`, `operator`, `device`, `audit`): clients of the running
//! server's API, with the local admin's certificate from the data dir, so that what they
//! do (a revocation) takes effect at once.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use floto_client::{ApiClient, AuditQuery, Identity};
use floto_proto::admin::{AddOperatorRequest, CreateKeyRequest, TokenKind};
use floto_proto::ssh::FleetSettings;
use floto_proto::timestamp::rfc3339;
use floto_proto::DeviceId;
use floto_vpn_server::datadir::DataDir;
use floto_vpn_server::RuntimeInfo;

use crate::cli::{DeviceCommand, FleetCommand, KeyCommand, NodeCommand, OperatorCommand};

pub(crate) async fn node(command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::List { dir, json } => {
            let nodes = admin_client(&dir.data_dir)?.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:<38} {:<20} {:<6} {:<8} {:<22} ADDRESS",
                    "ID", "NAME", "ALIVE", "DEVICES", "LEASE UNTIL"
                );
                for n in nodes {
                    println!(
                        "{:<38} {:<20} {:<6} {:<8} {:<22} {}{}",
                        n.id,
                        n.name,
                        if n.alive { "yes" } else { "no" },
                        n.devices,
                        n.lease_expires_at.map_or("-".to_owned(), rfc3339),
                        n.address,
                        if n.this { "  (this node)" } else { "" }
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn fleet(command: FleetCommand) -> anyhow::Result<ExitCode> {
    match command {
        FleetCommand::Set {
            dir,
            name,
            ssh_logins,
            default,
        } => {
            let settings = FleetSettings {
                name: String::new(),
                ssh_logins: (!default).then_some(ssh_logins),
            };
            let set = admin_client(&dir.data_dir)?
                .set_fleet(&name, &settings)
                .await?;
            println!(
                "fleet {name}: ssh logins {}",
                set.ssh_logins.unwrap_or_default().join(", ")
            );
        }
        FleetCommand::List { dir, json } => {
            let fleets = admin_client(&dir.data_dir)?.fleets().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleets)?);
            } else {
                println!("{:<24} SSH LOGINS", "FLEET");
                for f in fleets {
                    println!(
                        "{:<24} {}",
                        f.name,
                        f.ssh_logins.unwrap_or_default().join(", ")
                    );
                }
                println!("(other fleets: {})", floto_proto::ssh::DEFAULT_LOGIN);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn key(command: KeyCommand) -> anyhow::Result<ExitCode> {
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
        KeyCommand::Revoke { dir, id } => {
            let key = admin_client(&dir.data_dir)?.revoke_key(&id).await?;
            println!(
                "revoked provisioning key {} (fleet {:?})",
                key.id, key.fleet
            );
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

pub(crate) async fn operator(command: OperatorCommand) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn device(command: DeviceCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeviceCommand::List { dir, online, json } => {
            let devices = admin_client(&dir.data_dir)?
                .devices(online.then_some(true))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!("{}", floto_client::table::devices(&devices));
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

pub(crate) async fn audit(
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
