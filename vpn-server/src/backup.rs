//! `backup` and `restore`: a consistent snapshot of a data dir (registry, CA, WireGuard key,
//! settings) in one gzipped tar archive, taken while the server runs, and put back whole.
//!
//! The archive holds `manifest.json` (format, versions, SHA-256 of every file) and the files
//! themselves, flat. A restore checks all of it (names, sizes, digests, that the CA and the
//! WireGuard key load, that this build can read the registry's schema) in a staging dir
//! before it touches the data dir, and keeps whatever it replaces.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::datadir::DataDir;
use floto_registry::sqlite;

/// The archive format written by this build.
pub const FORMAT: &str = "floto-backup/1";

const MANIFEST: &str = "manifest.json";
const DATABASE: &str = "registry.db";
/// Files a backup must hold.
const REQUIRED: [&str; 4] = [DATABASE, "ca.pem", "ca.key", "wg.key"];
/// Files a backup may also hold. The API's TLS certificate is not among them: the server
/// issues it again at start (or it is mounted).
const OPTIONAL: [&str; 5] = [
    "config.toml",
    "admin.pem",
    "admin.key",
    "ssh_user_ca",
    "ssh_host_ca",
];
/// Files written 0600.
const SECRET: [&str; 6] = [
    DATABASE,
    "ca.key",
    "wg.key",
    "admin.key",
    "ssh_user_ca",
    "ssh_host_ca",
];
/// No single file of a data dir comes near this; an archive that claims more is refused.
const MAX_FILE: u64 = 16 << 30;

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub server_version: String,
    pub schema_version: i64,
    pub devices: u64,
    /// File name to hex SHA-256.
    pub files: BTreeMap<String, String>,
}

/// What `backup` wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub bytes: u64,
}

/// What `restore` did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub manifest: Manifest,
    /// Where the files the restore replaced were moved, if any.
    pub kept_previous: Option<PathBuf>,
}

/// Writes a backup of `data` to `out` (atomically, mode 0600; replaces `out`). Safe while a
/// server runs on `data`.
pub async fn backup(
    data: &DataDir,
    out: &Path,
    now: OffsetDateTime,
) -> anyhow::Result<BackupReport> {
    ensure!(
        data.is_initialised(),
        "{} is not a floto-vpn-server data dir (no CA or WireGuard key)",
        data.root().display()
    );
    ensure!(
        data.database().exists(),
        "{} has no registry yet; start the server once first",
        data.root().display()
    );
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = Staging::new(&parent, "backup")?;
    let snapshot = staging.path.join(DATABASE);
    let info = sqlite::snapshot(&data.database(), &snapshot)
        .await
        .with_context(|| format!("snapshotting {}", data.database().display()))?;

    let mut sources: Vec<(&str, PathBuf)> = vec![(DATABASE, snapshot)];
    for name in REQUIRED.iter().skip(1).chain(OPTIONAL.iter()) {
        let path = data.root().join(name);
        if path.exists() {
            sources.push((name, path));
        } else if REQUIRED.contains(name) {
            bail!("{} is missing", path.display());
        }
    }
    let mut files = BTreeMap::new();
    let mut contents = Vec::new();
    for (name, path) in sources {
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        files.insert(name.to_owned(), sha256_hex(&bytes));
        contents.push((name, bytes));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        created_at: now,
        server_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: info.schema_version,
        devices: info.devices,
        files,
    };

    let tmp = staging.path.join("archive.tar.gz");
    {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mtime = now.unix_timestamp().max(0) as u64;
        let manifest_json = serde_json::to_vec_pretty(&manifest)?;
        append(&mut tar, MANIFEST, &manifest_json, mtime)?;
        for (name, bytes) in &contents {
            append(&mut tar, name, bytes, mtime)?;
        }
        let file = tar.into_inner()?.finish()?;
        file.sync_all()?;
    }
    let bytes = fs::metadata(&tmp)?.len();
    fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    sync_dir(&parent);
    Ok(BackupReport {
        path: out.to_path_buf(),
        manifest,
        bytes,
    })
}

/// Puts the backup at `archive` into `data`. Refuses while a server runs on `data`, and
/// refuses a data dir that already holds one unless `force` (then its files are moved to
/// `replaced-<time>/` inside it, never deleted). Checks everything before changing anything.
pub async fn restore(
    data: &DataDir,
    archive: &Path,
    force: bool,
    now: OffsetDateTime,
) -> anyhow::Result<RestoreReport> {
    if let Some(pid) = running_server(data) {
        bail!(
            "a server (pid {pid}) is running on {}; stop it before restoring",
            data.root().display()
        );
    }
    let occupied = data.is_initialised() || data.database().exists();
    if occupied && !force {
        bail!(
            "{} already holds a data dir; pass --force to replace it (its files are kept in a \
             replaced-<time> folder inside it)",
            data.root().display()
        );
    }
    fs::create_dir_all(data.root())
        .with_context(|| format!("creating {}", data.root().display()))?;
    fs::set_permissions(data.root(), fs::Permissions::from_mode(0o700))?;

    // Unpack into a staging dir inside the data dir (the same file system, also when the
    // data dir is a mounted volume, so the files can be renamed into place) and check it
    // all there.
    let staging = Staging::new(data.root(), "restore")?;
    let manifest = unpack(archive, &staging.path)
        .with_context(|| format!("{} is not a usable backup", archive.display()))?;
    let staged = DataDir::new(&staging.path);
    staged
        .load_ca()
        .context("the backup's CA certificate and key do not load")?;
    staged
        .load_wg_key()
        .context("the backup's WireGuard key does not load")?;
    let info = sqlite::inspect(&staging.path.join(DATABASE))
        .await
        .context("the backup's registry does not open")?;
    ensure!(
        info.schema_version <= sqlite::SCHEMA_VERSION,
        "the backup's registry has schema version {}, newer than this floto-vpn-server ({}); \
         restore it with a newer release",
        info.schema_version,
        sqlite::SCHEMA_VERSION
    );

    // Move the current files aside, then the staged ones in.
    let kept_previous = if occupied {
        let stamp = now.unix_timestamp();
        let aside = data.root().join(format!("replaced-{stamp}"));
        fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
        fs::set_permissions(&aside, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(data.root())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::rename(entry.path(), aside.join(entry.file_name()))?;
            }
        }
        Some(aside)
    } else {
        None
    };
    for name in manifest.files.keys() {
        fs::rename(staging.path.join(name), data.root().join(name))
            .with_context(|| format!("moving {name} into {}", data.root().display()))?;
    }
    sync_dir(data.root());
    Ok(RestoreReport {
        manifest,
        kept_previous,
    })
}

/// Reads `archive` into `dir`: only the manifest and the files it lists, flat, each with the
/// digest the manifest gives.
fn unpack(archive: &Path, dir: &Path) -> anyhow::Result<Manifest> {
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut manifest: Option<Manifest> = None;
    let mut digests = BTreeMap::new();
    for entry in tar.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let known = name == MANIFEST
            || REQUIRED.contains(&name.as_str())
            || OPTIONAL.contains(&name.as_str());
        ensure!(known, "unexpected entry {name:?}");
        ensure!(
            entry.header().entry_type().is_file(),
            "{name} is not a regular file"
        );
        ensure!(entry.size() <= MAX_FILE, "{name} is implausibly large");
        ensure!(!digests.contains_key(&name), "{name} appears twice");
        if name == MANIFEST {
            let mut text = Vec::new();
            entry.read_to_end(&mut text)?;
            let m: Manifest = serde_json::from_slice(&text).context("reading manifest.json")?;
            ensure!(
                m.format == FORMAT,
                "archive format {:?}, this build reads {FORMAT:?}",
                m.format
            );
            digests.insert(name, String::new());
            manifest = Some(m);
            continue;
        }
        let path = dir.join(&name);
        let mode = if SECRET.contains(&name.as_str()) {
            0o600
        } else {
            0o644
        };
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("reading {name}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        digests.insert(name, hex::encode(hasher.finish()));
    }
    let manifest = manifest.context("no manifest.json")?;
    for required in REQUIRED {
        ensure!(
            manifest.files.contains_key(required),
            "the manifest lists no {required}"
        );
    }
    for (name, want) in &manifest.files {
        match digests.get(name) {
            Some(got) if got == want => {}
            Some(_) => bail!("{name} does not match its SHA-256 in the manifest"),
            None => bail!("{name} is listed in the manifest but missing (truncated archive?)"),
        }
    }
    Ok(manifest)
}

/// The pid in `server.json` when that process is alive.
/// The pid of a server running on `data`, if one is.
pub fn running_server(data: &DataDir) -> Option<u32> {
    let text = fs::read_to_string(data.runtime()).ok()?;
    let info: crate::datadir::RuntimeInfo = serde_json::from_str(&text).ok()?;
    Path::new(&format!("/proc/{}", info.pid))
        .exists()
        .then_some(info.pid)
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    mtime: u64,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A private working dir, removed when dropped.
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn new(parent: &Path, what: &str) -> anyhow::Result<Self> {
        let path = parent.join(format!(
            ".floto-{what}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating a staging dir in {}", parent.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server_data_dir(root: &Path) -> DataDir {
        let data = DataDir::new(root.join("data"));
        data.init(&Default::default(), OffsetDateTime::now_utc())
            .unwrap();
        let overlay: ipnet::Ipv4Net = "10.240.0.0/16".parse().unwrap();
        let reg = sqlite::SqliteRegistry::open(&data.database(), overlay)
            .await
            .unwrap();
        drop(reg);
        data
    }

    #[tokio::test]
    async fn round_trip_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let data = server_data_dir(tmp.path()).await;
        let archive = tmp.path().join("b.tar.gz");
        let report = backup(&data, &archive, OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert_eq!(report.manifest.schema_version, sqlite::SCHEMA_VERSION);
        let mode = fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Into an empty dir.
        let fresh = DataDir::new(tmp.path().join("fresh"));
        let r = restore(&fresh, &archive, false, OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert!(r.kept_previous.is_none());
        assert_eq!(
            fs::read(fresh.ca_key()).unwrap(),
            fs::read(data.ca_key()).unwrap()
        );
        assert_eq!(
            fs::metadata(fresh.wg_key()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Over an existing one: only with --force, keeping the old files.
        let again = restore(&fresh, &archive, false, OffsetDateTime::now_utc()).await;
        assert!(again.unwrap_err().to_string().contains("--force"));
        let r = restore(&fresh, &archive, true, OffsetDateTime::now_utc())
            .await
            .unwrap();
        let aside = r.kept_previous.unwrap();
        assert!(aside.join("ca.key").exists());

        // A truncated archive changes nothing.
        let bytes = fs::read(&archive).unwrap();
        let cut = tmp.path().join("cut.tar.gz");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let empty = DataDir::new(tmp.path().join("empty"));
        let err = restore(&empty, &cut, false, OffsetDateTime::now_utc())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("not a usable backup"),
            "{err:#}"
        );
        assert!(!empty.ca_key().exists());
        // Neither does one with a tampered file.
        let tampered = tmp.path().join("tampered.tar.gz");
        {
            let file = File::create(&tampered).unwrap();
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let mut tar = tar::Builder::new(gz);
            let mut src =
                tar::Archive::new(flate2::read::GzDecoder::new(File::open(&archive).unwrap()));
            for e in src.entries().unwrap() {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut body = Vec::new();
                e.read_to_end(&mut body).unwrap();
                if name == "wg.key" {
                    body[0] ^= 1;
                }
                append(&mut tar, &name, &body, 0).unwrap();
            }
            tar.into_inner().unwrap().finish().unwrap();
        }
        let err = restore(&empty, &tampered, false, OffsetDateTime::now_utc())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("SHA-256"), "{err:#}");
        assert!(!empty.ca_key().exists());
        // And a path outside the archive's flat layout is refused.
        let evil = tmp.path().join("evil.tar.gz");
        {
            let file = File::create(&evil).unwrap();
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let mut tar = tar::Builder::new(gz);
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_mode(0o600);
            header.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the name into the header directly.
            header.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../ca.key\0");
            header.set_cksum();
            tar.append(&header, &b"x"[..]).unwrap();
            tar.into_inner().unwrap().finish().unwrap();
        }
        let err = restore(&empty, &evil, false, OffsetDateTime::now_utc())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("unexpected entry"), "{err:#}");
        assert!(!tmp.path().join("ca.key").exists());
    }
}
