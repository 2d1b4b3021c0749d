//! `status.json`: what a running agent reports about itself (connected, since when, to which
//! endpoint over which transport, certificate expiry, last error), rewritten atomically on every change, and read by
//! `floto-tunnel status`.

use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use floto_files::FileError;
use floto_proto::DeviceId;

use super::config::Mode;
use super::transport::Transport;

/// The agent's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's process id (`floto-tunnel status` checks it is still running).
    pub pid: u32,
    pub mode: Mode,
    pub uuid: DeviceId,
    pub overlay_ip: Ipv4Addr,
    /// An authenticated packet came from the server within the dead-session limit.
    pub connected: bool,
    /// When `connected` last changed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// The server's WireGuard endpoint in use: the resolved `IP:PORT` over UDP, the API's
    /// `HOST:PORT` over TLS.
    pub endpoint: Option<String>,
    /// What carries the datagrams now (`udp` or `tls`).
    #[serde(default)]
    pub transport: Option<Transport>,
    /// The HTTP proxy the TLS transport goes through, when one is configured.
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub cert_expires_at: OffsetDateTime,
    /// The most recent failure (connecting, renewing), cleared by nothing: read it with `since`.
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_error_at: Option<OffsetDateTime>,
    /// The server said the device is revoked; the agent retries only rarely.
    pub revoked: bool,
    /// Handshake attempts that failed since the link was last up.
    pub failed_attempts: u32,
    /// Times the link came up since the agent started.
    pub connects: u64,
    /// Certificates obtained (renewals and re-enrollments) since the agent started.
    pub renewals: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl AgentStatus {
    /// Writes the status atomically (readers never see half a file).
    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| FileError {
            action: "encoding",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        floto_files::write_public(path, &json)
    }

    /// Reads a status file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, FileError> {
        match floto_files::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| FileError {
                    action: "parsing",
                    path: path.to_owned(),
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the process that wrote this is still running.
    pub fn agent_running(&self) -> bool {
        if self.pid == std::process::id() {
            return true;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"floto-tunnel"))
    }
}
