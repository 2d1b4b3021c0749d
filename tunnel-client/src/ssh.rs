//! `floto ssh`: the broker session is opened before ssh runs, so that a refusal (unknown
//! device, offline, port closed, a cap reached) is said once, by floto, and ssh never adds
//! its own "kex_exchange_identification: Connection closed" to it. The open stream is then
//! handed to ssh's ProxyCommand (`floto proxy --attach SOCKET`) over a Unix socket in a
//! private directory.
//!
//! Authentication needs no keys on the device and no prompts: floto keeps an SSH key of
//! its own in the config dir, gets a short-lived user certificate for it from the server
//! for each session ([`SshFiles::refresh`]), and trusts devices' host certificates through
//! a known-hosts file of its own (`@cert-authority *.floto <host CA>`), with
//! `StrictHostKeyChecking yes`.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use tokio::net::UnixListener;

use floto_client::broker::BrokerStream;

/// The rendezvous between `floto ssh` and its ProxyCommand.
pub struct Handover {
    // Only this user can reach the socket: the directory is made 0700.
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl Handover {
    pub fn new() -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("floto-ssh-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let socket = dir.path().join("s");
        let listener = UnixListener::bind(&socket).map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding {}: {e}", socket.display()))
        })?;
        Ok(Self { dir, listener })
    }

    /// Where the ProxyCommand connects.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// Runs `ssh` (whose ProxyCommand attaches to [`Handover::socket`]) and splices the
    /// first connection to the socket with `stream` until ssh exits. Interrupts typed at
    /// the terminal go to ssh, which decides; floto waits for it.
    pub async fn run(
        self,
        mut stream: BrokerStream,
        ssh: std::process::Command,
    ) -> std::io::Result<ExitStatus> {
        use tokio::signal::unix::{signal, SignalKind};
        // Held, never polled: while they exist, SIGINT and SIGQUIT do not end floto.
        let _int = signal(SignalKind::interrupt())?;
        let _quit = signal(SignalKind::quit())?;
        let program = ssh.get_program().to_string_lossy().into_owned();
        let mut child = tokio::process::Command::from(ssh)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
        let Self { dir, listener } = self;
        let status = tokio::select! {
            status = child.wait() => status,
            accepted = listener.accept() => {
                drop(listener);
                let (mut proxy, _) = accepted?;
                tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::io::copy_bidirectional(&mut proxy, &mut stream) => {
                        // The device side ended: closing the socket ends the ProxyCommand,
                        // and with it ssh.
                        drop(proxy);
                        child.wait().await
                    }
                }
            }
        };
        stream.close().await;
        drop(dir);
        status
    }
}

/// floto's SSH files in the operator's config dir: its key, the certificates, the
/// known-hosts file.
#[derive(Debug, Clone)]
pub struct SshFiles {
    dir: PathBuf,
}

/// A certificate just obtained.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: PathBuf,
    pub principals: Vec<String>,
    pub valid_before: time::OffsetDateTime,
    /// Whether the device holds a host certificate; if not, its host key is trusted on
    /// first use (and pinned in [`SshFiles::first_use_hosts`]).
    pub host_certified: bool,
}

impl SshFiles {
    /// The SSH files of the operator config dir `config_dir`.
    pub fn new(config_dir: &Path) -> Self {
        Self {
            dir: config_dir.join("ssh"),
        }
    }

    /// floto's own private key (never the user's `~/.ssh` keys).
    pub fn key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    /// The certificate for host `host` (`<uuid>.floto`).
    pub fn certificate(&self, host: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{host}-cert.pub"))
    }

    /// `@cert-authority *.floto <host CA>`: how devices are verified (rewritten at every
    /// certificate).
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Host keys of devices without a host certificate, pinned at first use.
    pub fn first_use_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts.first_use")
    }

    /// Makes the key (once) and returns its public line.
    pub fn ensure_key(&self) -> anyhow::Result<String> {
        let public = self.dir.join("id_ed25519.pub");
        if self.key().exists() {
            return Ok(floto_files::read_to_string(&public)?.trim().to_owned());
        }
        floto_files::create_private_dir(&self.dir)?;
        let (private, public_line) = floto_pki::ssh::new_key("floto operator key")?;
        floto_files::write_secret(&self.key(), private.as_bytes())?;
        floto_files::write_public(&public, format!("{public_line}\n").as_bytes())?;
        Ok(public_line)
    }

    /// Gets a user certificate for `device` (for `logins`, or every login allowed there),
    /// and writes it and the known-hosts file.
    pub async fn refresh(
        &self,
        op: &crate::operator::Operator,
        device: &floto_proto::DeviceId,
        logins: &[String],
    ) -> anyhow::Result<Issued> {
        let public_key = self.ensure_key()?;
        let resp = op
            .api()?
            .ssh_user_cert(&floto_proto::ssh::UserCertRequest {
                public_key,
                device: device.to_string(),
                logins: logins.to_vec(),
            })
            .await?;
        let host = format!("{device}{}", floto_proto::ssh::HOST_SUFFIX);
        let certificate = self.certificate(&host);
        floto_files::create_private_dir(&self.dir.join("certs"))?;
        floto_files::write_public(&certificate, format!("{}\n", resp.certificate).as_bytes())?;
        floto_files::write_public(
            &self.known_hosts(),
            known_hosts_line(&resp.host_ca).as_bytes(),
        )?;
        Ok(Issued {
            certificate,
            principals: resp.principals,
            valid_before: resp.valid_before,
            host_certified: resp.host_certified,
        })
    }

    /// The ssh options that use floto's key and certificate for `host` and verify the
    /// device by its host certificate, or (`host_certified` false) by the key it showed
    /// first. With `own_keys`, the user's keys and agent are offered too.
    pub fn options(&self, host: &str, host_certified: bool, own_keys: bool) -> Vec<String> {
        let mut opts = vec![
            format!("IdentityFile={}", self.key().display()),
            format!("CertificateFile={}", self.certificate(host).display()),
            // New keys are written to the first file; the CA line is read from the second.
            format!(
                "UserKnownHostsFile={} {}",
                self.first_use_hosts().display(),
                self.known_hosts().display()
            ),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            format!(
                "StrictHostKeyChecking={}",
                if host_certified { "yes" } else { "accept-new" }
            ),
            format!("HostKeyAlias={host}"),
        ];
        if !own_keys {
            opts.push("IdentitiesOnly=yes".to_owned());
            opts.push("IdentityAgent=none".to_owned());
        }
        opts
    }
}

/// The known-hosts line that trusts the host CA for every device name.
pub fn known_hosts_line(host_ca: &str) -> String {
    format!(
        "@cert-authority *{} {}\n",
        floto_proto::ssh::HOST_SUFFIX,
        host_ca.trim()
    )
}

/// floto's exit code for ssh's status: ssh's own, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM.
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn the_key_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let files = SshFiles::new(dir.path());
        let first = files.ensure_key().unwrap();
        assert!(first.starts_with("ssh-ed25519 "), "{first}");
        assert_eq!(files.ensure_key().unwrap(), first);
        let mode = std::fs::metadata(files.key()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        let opts = files.options("u.floto", true, false);
        assert!(opts.contains(&"StrictHostKeyChecking=yes".to_owned()));
        assert!(opts.contains(&"IdentityAgent=none".to_owned()));
        assert!(files
            .options("u.floto", false, false)
            .contains(&"StrictHostKeyChecking=accept-new".to_owned()));
        assert!(!files
            .options("u.floto", true, true)
            .contains(&"IdentitiesOnly=yes".to_owned()));
        assert_eq!(
            known_hosts_line("ssh-ed25519 AAAA c\n"),
            "@cert-authority *.floto ssh-ed25519 AAAA c\n"
        );
    }

    #[tokio::test]
    async fn the_socket_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let h = Handover::new().unwrap();
        let mode = std::fs::metadata(h.dir.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert!(h.socket().starts_with(h.dir.path()));
    }
}
