//! The subcommands that act on a data dir directly, with no server running (`init`) or
//! beside one (`backup`, safe while it runs; `restore`, refused while it runs).

use std::path::PathBuf;
use std::process::ExitCode;

use ipnet::Ipv4Net;

use floto_proto::timestamp::rfc3339;
use floto_vpn_server::datadir::{DataDir, ImportCa, ImportSsh, InitOptions};

use crate::cli::{DataDirArg, SshCaCommand};

/// `ssh-ca show`: the SSH CAs' public keys, read from the data dir (no server needed).
pub(crate) fn ssh_ca(command: SshCaCommand) -> anyhow::Result<ExitCode> {
    let SshCaCommand::Show { dir, user, host } = command;
    let cas = DataDir::new(&dir.data_dir).load_ssh_cas()?;
    match (user, host) {
        (true, _) => println!("{}", cas.user.public_line()),
        (_, true) => println!("{}", cas.host.public_line()),
        _ => {
            println!("# user CA: devices trust it for operators (sshd: TrustedUserCAKeys FILE)");
            println!("{}", cas.user.public_line());
            println!("# host CA: operators trust it for devices (known_hosts)");
            println!(
                "@cert-authority *{} {}",
                floto_proto::ssh::HOST_SUFFIX,
                cas.host.public_line()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `init`: creates what is missing in the data dir; never replaces a CA.
pub(crate) fn init(
    dir: DataDirArg,
    overlay: Option<Ipv4Net>,
    endpoint: Option<String>,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    import_ssh: Option<ImportSsh>,
) -> anyhow::Result<ExitCode> {
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
            import_ssh,
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

/// `backup FILE`
pub(crate) async fn backup(dir: DataDirArg, file: PathBuf) -> anyhow::Result<ExitCode> {
    let data = DataDir::new(&dir.data_dir);
    let r = floto_vpn_server::backup::backup(&data, &file, time::OffsetDateTime::now_utc()).await?;
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

/// `restore FILE [--force]`
pub(crate) async fn restore(
    dir: DataDirArg,
    file: PathBuf,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let data = DataDir::new(&dir.data_dir);
    let r = floto_vpn_server::backup::restore(&data, &file, force, time::OffsetDateTime::now_utc())
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

/// `migrate-registry --to URL`: the SQLite registry into an empty PostgreSQL one.
pub(crate) async fn migrate_registry(dir: DataDirArg, to: String) -> anyhow::Result<ExitCode> {
    let url = floto_vpn_server::config::DatabaseUrl::parse(&to)?;
    let data = DataDir::new(&dir.data_dir);
    if let Some(pid) = floto_vpn_server::backup::running_server(&data) {
        anyhow::bail!(
            "a server (pid {pid}) is running on {}; stop it first, so that nothing is written after the copy",
            data.root().display()
        );
    }
    let db = data.database();
    if !db.exists() {
        anyhow::bail!("{} holds no registry", data.root().display());
    }
    let report = floto_registry::postgres::import::copy_from_sqlite(&db, url.expose())
        .await
        .map_err(|e| anyhow::anyhow!("copying the registry to {url}: {e}"))?;
    for (table, rows) in &report.rows {
        println!("{table:<18} {rows} rows");
    }
    println!(
        "copied {} into {url}; run the nodes with --database-url (the SQLite file is unchanged)",
        db.display()
    );
    Ok(ExitCode::SUCCESS)
}
