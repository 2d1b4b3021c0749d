//! `floto ssh`: the broker session is opened before ssh runs, so that a refusal (unknown
//! device, offline, port closed, a cap reached) is said once, by floto, and ssh never adds
//! its own "kex_exchange_identification: Connection closed" to it. The open stream is then
//! handed to ssh's ProxyCommand (`floto proxy --attach SOCKET`) over a Unix socket in a
//! private directory.

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
    pub fn socket(&self) -> std::path::PathBuf {
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
