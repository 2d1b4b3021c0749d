//! `floto ssh` and `floto exec`'s sessions ([`Session`]): the broker session is opened
//! before ssh runs, so that a refusal (unknown device, offline, port closed, a cap
//! reached) is said once, by floto, and ssh never adds its own "kex_exchange_identification:
//! Connection closed" to it. The open stream is then handed to ssh's ProxyCommand
//! (`floto proxy --attach SOCKET`) over a Unix socket in a private directory.
//!
//! Authentication needs no keys on the device and no prompts: floto keeps an SSH key of
//! its own in the config dir, gets a short-lived user certificate for it from the server
//! for each session ([`SshFiles::refresh`]), and trusts devices' host certificates through
//! a known-hosts file of its own (`@cert-authority *.floto <host CA>`), with
//! `StrictHostKeyChecking yes`.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, PoisonError};

use tokio::net::UnixListener;

use floto_client::broker::{self, BrokerError, BrokerStream, Transport};
use floto_proto::DeviceId;

use crate::operator::{Operator, OperatorError};

/// Sessions of one process (`floto exec`) make floto's key one at a time, so that only one
/// is ever made.
static MAKING_KEY: Mutex<()> = Mutex::new(());

/// How long the ProxyCommand of an exited ssh gets to close its end of the socket.
const PROXY_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Why an ssh session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The server gave no certificate: a login the fleet does not allow, a revoked
    /// operator, the API unreachable.
    #[error("{0:#}")]
    Certificate(anyhow::Error),
    /// The broker refused the stream (unknown device, offline, port closed, a cap
    /// reached) or could not be reached.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The operator config cannot be used.
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// The rendezvous socket could not be made, or floto's own path found.
    #[error(transparent)]
    Local(#[from] std::io::Error),
}

/// An ssh session to one device, ready to run: a certificate for the login, the broker
/// stream open, and the `ssh` command (ProxyCommand, key, certificate, known hosts, port,
/// login) to which the caller adds its options, then [`Session::host`] and the remote
/// command. `floto ssh` and `floto exec` are the two callers.
pub struct Session {
    ssh: std::process::Command,
    issued: Issued,
    host: String,
    splice: Splice,
}

impl Session {
    /// Gets a certificate for `login` on `device`, then opens the broker stream to `port`.
    pub async fn open(
        op: &Operator,
        files: &SshFiles,
        device: &DeviceId,
        login: &str,
        port: u16,
        transport: Transport,
        own_keys: bool,
    ) -> Result<Self, OpenError> {
        let target = op.broker_target()?;
        // A login the fleet does not allow is refused here, once, before any connection.
        let issued = files
            .refresh(op, device, &[login.to_owned()])
            .await
            .map_err(OpenError::Certificate)?;
        let stream = broker::open(&target, &device.to_string(), port, transport).await?;
        let handover = Handover::new()?;
        let exe = std::env::current_exe()?;
        let proxy = format!(
            "{} proxy --attach {} {device} %p",
            shell_quote(&exe.to_string_lossy()),
            shell_quote(&handover.socket().to_string_lossy()),
        );
        let host = format!("{device}{}", floto_proto::ssh::HOST_SUFFIX);
        let mut ssh = std::process::Command::new("ssh");
        ssh.arg("-o").arg(format!("ProxyCommand={proxy}"));
        for opt in files.options(&host, issued.host_certified, own_keys) {
            ssh.arg("-o").arg(opt);
        }
        ssh.arg("-p").arg(port.to_string()).arg("-l").arg(login);
        Ok(Self {
            ssh,
            issued,
            host,
            splice: Splice { handover, stream },
        })
    }

    /// The ssh command, for the caller's options, destination and remote command.
    pub fn command(&mut self) -> &mut std::process::Command {
        &mut self.ssh
    }

    /// The destination to give ssh: `<uuid>.floto`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The certificate the session uses.
    pub fn issued(&self) -> &Issued {
        &self.issued
    }

    /// Runs ssh on the terminal until it exits. Interrupts typed at the terminal go to
    /// ssh, which decides; floto waits for it.
    pub async fn run(self) -> std::io::Result<ExitStatus> {
        use tokio::signal::unix::{signal, SignalKind};
        // Held, never polled: while they exist, SIGINT and SIGQUIT do not end floto.
        let _int = signal(SignalKind::interrupt())?;
        let _quit = signal(SignalKind::quit())?;
        let (mut child, splice) = self.spawn()?;
        splice.run(&mut child).await
    }

    /// Starts ssh with the stdio set on [`command`](Self::command); it is killed when the
    /// child is dropped. The stream reaches it once [`Splice::run`] is driven.
    pub fn spawn(self) -> std::io::Result<(tokio::process::Child, Splice)> {
        let program = self.ssh.get_program().to_string_lossy().into_owned();
        let child = tokio::process::Command::from(self.ssh)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
        Ok((child, self.splice))
    }
}

/// The broker side of a spawned ssh: the open stream, and the socket its ProxyCommand
/// attaches to.
pub struct Splice {
    handover: Handover,
    stream: BrokerStream,
}

impl Splice {
    /// Splices the ProxyCommand's connection with the stream until ssh exits. Dropping the
    /// future drops the stream and the socket, which ends the ProxyCommand.
    pub async fn run(self, child: &mut tokio::process::Child) -> std::io::Result<ExitStatus> {
        let Self {
            handover: Handover { dir, listener },
            mut stream,
        } = self;
        let status = tokio::select! {
            status = child.wait() => status,
            accepted = listener.accept() => {
                drop(listener);
                let (mut proxy, _) = accepted?;
                let exited = {
                    let copy = tokio::io::copy_bidirectional(&mut proxy, &mut stream);
                    tokio::pin!(copy);
                    tokio::select! {
                        status = child.wait() => {
                            // ssh hangs its ProxyCommand up as it exits. Read what the
                            // ProxyCommand still sends until it closes: a socket closed on
                            // unread bytes would end it with "Connection reset by peer",
                            // printed on ssh's stderr after ssh itself is gone.
                            let _ = tokio::time::timeout(PROXY_DRAIN, &mut copy).await;
                            Some(status)
                        }
                        _ = &mut copy => None,
                    }
                };
                // The device side ended: closing the socket ends the ProxyCommand, and
                // with it ssh.
                drop(proxy);
                match exited {
                    Some(status) => status,
                    None => child.wait().await,
                }
            }
        };
        stream.close().await;
        drop(dir);
        status
    }
}

/// The rendezvous between ssh and its ProxyCommand: a socket in a private directory.
struct Handover {
    // Only this user can reach the socket: the directory is made 0700.
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl Handover {
    fn new() -> std::io::Result<Self> {
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
    fn socket(&self) -> PathBuf {
        self.dir.path().join("s")
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
        let _turn = MAKING_KEY.lock().unwrap_or_else(PoisonError::into_inner);
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
        op: &Operator,
        device: &DeviceId,
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

/// Quotes for /bin/sh, which runs ssh's ProxyCommand.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
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
