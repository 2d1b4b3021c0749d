//! The server's data directory: where each file lives, how secrets are written (0600,
//! atomically), and `init`, which creates what is missing and never replaces a CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use floto_files::{read_secret, read_to_string, write_atomic, write_public, write_secret};
use floto_pki::ssh::SshCa;
use floto_pki::Ca;
use floto_proto::WgKey;

use crate::config::{self, Config, ServerSettings};

/// Name of the built-in admin operator whose certificate (`admin.pem`, `admin.key` here)
/// the admin subcommands use.
pub const LOCAL_ADMIN: &str = "admin";

/// The addresses a running server actually bound (ports may have been 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub wg: SocketAddr,
    pub api: SocketAddr,
    pub quic: SocketAddr,
    pub metrics: SocketAddr,
    /// The extra HTTPS listener for WireGuard over TLS (`--wg-tls-listen`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_tls: Option<SocketAddr>,
}

/// What a running server writes to `server.json` in its data dir, for the admin CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub pid: u32,
    pub bound: Bound,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
}

/// Lifetime of a CA the server generates.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(config::CONFIG_FILE)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The CA of operators' SSH user certificates (OpenSSH private key, 0600).
    pub fn ssh_user_ca(&self) -> PathBuf {
        self.root.join("ssh_user_ca")
    }

    /// The CA of devices' SSH host certificates (OpenSSH private key, 0600).
    pub fn ssh_host_ca(&self) -> PathBuf {
        self.root.join("ssh_host_ca")
    }

    pub fn wg_key(&self) -> PathBuf {
        self.root.join("wg.key")
    }
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls.pem")
    }
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls.key")
    }
    /// In a cluster: this node's certificate for the node link, issued at every start.
    pub fn node_cert(&self) -> PathBuf {
        self.root.join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// The local admin's operator certificate, used by the admin subcommands.
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin.pem")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin.key")
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("registry.db")
    }
    /// Written by a running server: its pid and bound addresses.
    pub fn runtime(&self) -> PathBuf {
        self.root.join("server.json")
    }

    /// A data dir is initialised once it has a CA and a WireGuard key.
    pub fn is_initialised(&self) -> bool {
        self.ca_cert().exists() && self.ca_key().exists() && self.wg_key().exists()
    }

    pub fn load_ca(&self) -> anyhow::Result<Ca> {
        let cert = read_to_string(&self.ca_cert())?;
        let key = read_secret(&self.ca_key())?;
        Ca::from_pem(&cert, &key).with_context(|| {
            format!(
                "loading the CA from {} and {}",
                self.ca_cert().display(),
                self.ca_key().display()
            )
        })
    }

    /// The SSH CAs (see [`DataDir::ensure_ssh_cas`]).
    pub fn load_ssh_cas(&self) -> anyhow::Result<SshCas> {
        let load = |path: &Path| -> anyhow::Result<SshCa> {
            let text = read_secret(path)?;
            SshCa::from_openssh(&text).with_context(|| format!("loading {}", path.display()))
        };
        Ok(SshCas {
            user: load(&self.ssh_user_ca())?,
            host: load(&self.ssh_host_ca())?,
        })
    }

    /// Makes the SSH CAs that are missing (or imports them from `import`), so that a data dir
    /// made before they existed gets them at its next start. An existing CA is kept; asking
    /// to import a different one is an error.
    pub fn ensure_ssh_cas(
        &self,
        import: Option<&ImportSsh>,
        report: &mut InitReport,
    ) -> anyhow::Result<()> {
        let id = hex::encode(rand::random::<[u8; 4]>());
        for (path, from, what) in [
            (self.ssh_user_ca(), import.map(|i| &i.user), "SSH user CA"),
            (self.ssh_host_ca(), import.map(|i| &i.host), "SSH host CA"),
        ] {
            match (path.exists(), from) {
                (true, None) => {
                    read_secret(&path)
                        .map_err(anyhow::Error::from)
                        .and_then(|t| Ok(SshCa::from_openssh(&t)?))
                        .with_context(|| format!("checking {}", path.display()))?;
                    report.kept.push(what.into());
                }
                (true, Some(from)) => {
                    let have = SshCa::from_openssh(&read_secret(&path)?)?;
                    let want = SshCa::from_openssh(&read_secret(from)?)
                        .with_context(|| format!("importing {what} from {}", from.display()))?;
                    if have.public_line() != want.public_line() {
                        bail!(
                            "{} already has an {what}; refusing to replace it with {}",
                            self.root.display(),
                            from.display()
                        );
                    }
                    report
                        .kept
                        .push(format!("{what} (same as the one imported)"));
                }
                (false, Some(from)) => {
                    let ca = SshCa::from_openssh(&read_secret(from)?)
                        .with_context(|| format!("importing {what} from {}", from.display()))?;
                    write_secret(&path, ca.to_openssh()?.as_bytes())?;
                    report
                        .created
                        .push(format!("{what} imported from {}", from.display()));
                }
                (false, None) => {
                    let ca = SshCa::generate(&format!("floto-connect {what} {id}"))?;
                    write_secret(&path, ca.to_openssh()?.as_bytes())?;
                    report.created.push(format!("{what} (Ed25519)"));
                }
            }
        }
        Ok(())
    }

    /// The server's WireGuard private key.
    pub fn load_wg_key(&self) -> anyhow::Result<x25519_dalek::StaticSecret> {
        let text = read_secret(&self.wg_key())?;
        let key: WgKey = text
            .trim()
            .parse()
            .with_context(|| format!("{} is not a WireGuard key", self.wg_key().display()))?;
        Ok(x25519_dalek::StaticSecret::from(*key.as_bytes()))
    }

    /// Creates whatever is missing. An existing CA, WireGuard key or config is kept; asking
    /// for a different one is an error rather than a silent replacement.
    pub fn init(&self, opts: &InitOptions, now: OffsetDateTime) -> anyhow::Result<InitReport> {
        let mut report = InitReport::default();
        floto_files::create_private_dir(&self.root)?;

        // CA
        match (&opts.import_ca, self.ca_cert().exists()) {
            (Some(import), true) => {
                let existing = read_to_string(&self.ca_cert())?;
                let wanted = read_to_string(&import.cert)?;
                if normalise_pem(&existing) != normalise_pem(&wanted) {
                    bail!(
                        "{} already has a CA ({}); refusing to replace it. To migrate to another CA, \
                         start from an empty data dir with `init --ca-cert --ca-key` and restore the \
                         registry (see README, CA migration)",
                        self.root.display(),
                        self.ca_cert().display()
                    );
                }
                report.kept.push("CA (same as --ca-cert)".into());
            }
            (None, true) => {
                if !self.ca_key().exists() {
                    bail!(
                        "{} exists but {} is missing; restore the key from backup",
                        self.ca_cert().display(),
                        self.ca_key().display()
                    );
                }
                report.kept.push("CA".into());
            }
            (Some(import), false) => {
                let cert = read_to_string(&import.cert)?;
                let key = read_secret(&import.key)?;
                let ca = Ca::from_pem(&cert, &key).with_context(|| {
                    format!(
                        "importing the CA from {} and {}",
                        import.cert.display(),
                        import.key.display()
                    )
                })?;
                write_secret(&self.ca_key(), ca.key_pem().as_bytes())?;
                write_public(&self.ca_cert(), ca.cert_pem().as_bytes())?;
                report
                    .created
                    .push(format!("CA imported from {}", import.cert.display()));
            }
            (None, false) => {
                let id = hex::encode(rand::random::<[u8; 4]>());
                let ca = Ca::generate(&format!("floto-connect CA {id}"), now, CA_LIFETIME)
                    .context("generating the CA")?;
                write_secret(&self.ca_key(), ca.key_pem().as_bytes())?;
                write_public(&self.ca_cert(), ca.cert_pem().as_bytes())?;
                report.created.push("CA (ECDSA P-256, 10 years)".into());
            }
        }

        // WireGuard key
        if self.wg_key().exists() {
            self.load_wg_key()?;
            report.kept.push("WireGuard key".into());
        } else {
            let secret = random_wg_secret();
            let text = format!("{}\n", WgKey(secret.to_bytes()));
            write_secret(&self.wg_key(), text.as_bytes())?;
            report.created.push("WireGuard key".into());
        }

        self.ensure_ssh_cas(opts.import_ssh.as_ref(), &mut report)?;

        // Config file: overlay and endpoint are fixed at init; the overlay cannot change later
        // without renumbering devices.
        if self.config().exists() {
            let current = config::read_settings(&self.config())?;
            if let (Some(want), Some(have)) = (opts.overlay, current.overlay) {
                if want != have {
                    bail!(
                        "{} already uses overlay {have}; changing it to {want} would renumber enrolled devices",
                        self.root.display()
                    );
                }
            }
            if let Some(endpoint) = &opts.endpoint {
                if current.endpoint.as_deref() != Some(endpoint) {
                    let mut updated = current.clone();
                    updated.endpoint = Some(endpoint.clone());
                    self.write_config(&updated)?;
                    report.created.push(format!("endpoint set to {endpoint}"));
                }
            }
            report.kept.push("config".into());
        } else {
            let overlay = match opts.overlay {
                Some(net) => net,
                None => floto_proto::defaults::OVERLAY.parse()?,
            };
            let settings = Config::persisted_settings(overlay, opts.endpoint.clone());
            // Validate before writing, so a bad value never reaches the file.
            Config::from_settings(&self.root, &settings)?;
            self.write_config(&settings)?;
            report.created.push(format!("config (overlay {overlay})"));
        }
        Ok(report)
    }

    fn write_config(&self, settings: &ServerSettings) -> anyhow::Result<()> {
        let body = toml::to_string(settings).context("serialising config")?;
        let text = format!(
            "# floto-vpn-server settings. Flags and FLOTO_* environment variables override these.\n{body}"
        );
        Ok(write_public(&self.config(), text.as_bytes())?)
    }
}

/// What `init` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub overlay: Option<Ipv4Net>,
    pub endpoint: Option<String>,
    pub import_ca: Option<ImportCa>,
    pub import_ssh: Option<ImportSsh>,
}

/// Existing SSH CA keys to import (OpenSSH private keys, unencrypted Ed25519).
#[derive(Debug, Clone)]
pub struct ImportSsh {
    pub user: PathBuf,
    pub host: PathBuf,
}

/// The server's SSH certificate authorities.
#[derive(Debug)]
pub struct SshCas {
    /// Signs operators' user certificates; devices trust it (`TrustedUserCAKeys`).
    pub user: SshCa,
    /// Signs devices' host certificates; operators trust it (`@cert-authority`).
    pub host: SshCa,
}

/// An existing CA to import (CA migration).
#[derive(Debug, Clone)]
pub struct ImportCa {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `init` created and what it found already there.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    pub created: Vec<String>,
    pub kept: Vec<String>,
}

/// A new random WireGuard private key.
pub fn random_wg_secret() -> x25519_dalek::StaticSecret {
    x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>())
}

/// Base64 of a WireGuard public key.
pub fn wg_public_key(secret: &x25519_dalek::StaticSecret) -> WgKey {
    WgKey(x25519_dalek::PublicKey::from(secret).to_bytes())
}

fn normalise_pem(s: &str) -> String {
    s.split_whitespace().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_creates_then_keeps_and_never_replaces_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("data"));
        let now = OffsetDateTime::now_utc();
        let first = d.init(&InitOptions::default(), now).unwrap();
        assert!(first.created.iter().any(|c| c.starts_with("CA")));
        assert!(d.is_initialised());
        for f in [d.ca_key(), d.wg_key()] {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            fs::metadata(d.root()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let ca_before = fs::read(d.ca_cert()).unwrap();
        let wg_before = fs::read(d.wg_key()).unwrap();

        let second = d.init(&InitOptions::default(), now).unwrap();
        assert!(second.created.is_empty(), "{:?}", second.created);
        assert_eq!(fs::read(d.ca_cert()).unwrap(), ca_before);
        assert_eq!(fs::read(d.wg_key()).unwrap(), wg_before);

        // Importing a different CA over an existing one is refused.
        let other = Ca::generate("other", now, CA_LIFETIME).unwrap();
        let cert = dir.path().join("o.pem");
        let key = dir.path().join("o.key");
        fs::write(&cert, other.cert_pem()).unwrap();
        fs::write(&key, other.key_pem()).unwrap();
        let err = d
            .init(
                &InitOptions {
                    import_ca: Some(ImportCa { cert, key }),
                    ..Default::default()
                },
                now,
            )
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("refusing to replace"),
            "{err:#}"
        );
        assert_eq!(fs::read(d.ca_cert()).unwrap(), ca_before);

        // Changing the overlay is refused.
        let err = d
            .init(
                &InitOptions {
                    overlay: Some("10.9.0.0/16".parse().unwrap()),
                    ..Default::default()
                },
                now,
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("renumber"), "{err:#}");
    }

    #[test]
    fn init_imports_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let old = Ca::generate("fleet CA", now, CA_LIFETIME).unwrap();
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        fs::write(&cert, old.cert_pem()).unwrap();
        fs::write(&key, old.key_pem()).unwrap();
        let d = DataDir::new(dir.path().join("data"));
        d.init(
            &InitOptions {
                import_ca: Some(ImportCa { cert, key }),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(d.load_ca().unwrap().cert_pem(), old.cert_pem());
    }
}
