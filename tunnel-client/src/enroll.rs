//! Device enrollment: make keys once, keep them before asking, and store what the server
//! signs. A retry (after a timeout or a crash) reuses the same keys and UUID, so the server
//! sees a re-enrollment rather than a second device. With several servers (a cluster's
//! nodes), the request goes to each in turn until one answers ([`crate::servers`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::info;

use floto_client::ApiClient;
use floto_proto::enroll::EnrollRequest;
use floto_proto::{DeviceId, WgKey};

use crate::servers::{call_in_turn, CallError, ServerUrl};
use crate::state::{DeviceState, StateDir, StateError};

/// What enrolling needs (`floto-tunnel enroll`, and the agent's first start or its
/// re-enrollment after its certificate expired).
#[derive(Clone)]
pub struct EnrollOptions {
    /// The API servers, asked in this order (at least one).
    pub servers: Vec<ServerUrl>,
    /// CA of the server's TLS certificate, PEM.
    pub server_ca_pem: String,
    pub provisioning_key: String,
    pub uuid: Option<DeviceId>,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
    /// sshd's public host keys, for host certificates (empty when sshd is not managed).
    pub ssh_host_keys: Vec<String>,
    /// An HTTP proxy (`http://HOST:PORT`) the API is reached through, if any.
    pub proxy: Option<String>,
}

// Never prints the provisioning key.
impl std::fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("servers", &self.servers)
            .field("uuid", &self.uuid)
            .finish_non_exhaustive()
    }
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The state dir cannot be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A server refused, or none could be reached. The servers' messages are in this
    /// error's own text and not also its source, so that a printed chain (`{:#}`) says
    /// them once.
    #[error("enrollment {}: {}", if .0.is_transient() { "failed" } else { "refused" }, .0)]
    Client(CallError),
    /// The options do not fit the state dir.
    #[error("{0}")]
    Usage(String),
    /// No key could be made.
    #[error("key generation failed: {0}")]
    Keys(String),
}

/// Keys kept while an enrollment is in flight.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    uuid: DeviceId,
    /// The first server asked (informational).
    server: String,
}

/// Enrolls (or re-enrolls) the device whose identity lives in `dir`.
///
/// Returns the loaded state and whether the server created a new device (201) rather than
/// re-enrolling an existing one (200). `state.json` records the server that answered.
pub async fn enroll(
    dir: &StateDir,
    opts: &EnrollOptions,
) -> Result<(DeviceState, bool), EnrollError> {
    floto_files::create_private_dir(dir.root()).map_err(StateError::from)?;
    let uuid = identity_to_use(dir, opts)?;
    let device_key = dir.device_key();
    let wg_path = dir.wg_key();
    if !device_key.exists() {
        let key = floto_pki::generate_key().map_err(|e| EnrollError::Keys(e.to_string()))?;
        floto_files::write_secret(&device_key, key.as_bytes()).map_err(StateError::from)?;
    }
    if !wg_path.exists() {
        let secret = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        floto_files::write_secret(
            &wg_path,
            format!("{}\n", WgKey(secret.to_bytes())).as_bytes(),
        )
        .map_err(StateError::from)?;
    }
    let Some(first) = opts.servers.first() else {
        return Err(EnrollError::Usage(
            "no server to enroll with: set --server".into(),
        ));
    };
    if !dir.is_enrolled() {
        let pending = Pending {
            uuid,
            server: first.to_string(),
        };
        let json =
            serde_json::to_vec_pretty(&pending).map_err(|e| EnrollError::Usage(e.to_string()))?;
        floto_files::write_public(&dir.pending(), &json).map_err(StateError::from)?;
    }
    let key_pem = floto_files::read_secret(&device_key).map_err(StateError::from)?;
    let wg_text = floto_files::read_secret(&wg_path).map_err(StateError::from)?;
    let wg: WgKey = wg_text.trim().parse().map_err(|e| StateError::Damaged {
        dir: dir.root().to_owned(),
        file: "wg.key",
        reason: format!("{e}"),
    })?;
    let wg_public =
        WgKey(x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(wg.0)).to_bytes());
    let csr =
        floto_pki::make_csr(&key_pem, &uuid.to_string()).map_err(|e| StateError::Damaged {
            dir: dir.root().to_owned(),
            file: "device.key",
            reason: e.to_string(),
        })?;
    let clients = opts
        .servers
        .iter()
        .map(|s| ApiClient::via_proxy(s.as_str(), &opts.server_ca_pem, None, opts.proxy.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EnrollError::Client(CallError::Refused(e)))?;
    let req = EnrollRequest {
        uuid: Some(uuid.to_string()),
        csr_pem: csr,
        wg_public_key: wg_public.to_base64(),
        device_type: opts.device_type.clone(),
        hostname: opts.hostname.clone(),
        ssh_host_keys: opts.ssh_host_keys.clone(),
    };
    let (key, req) = (&opts.provisioning_key, &req);
    let (api, (status, resp)) =
        call_in_turn(&clients, |api| async move { api.enroll(key, req).await })
            .await
            .map_err(EnrollError::Client)?;
    if resp.assignment.uuid != uuid {
        return Err(EnrollError::Usage(format!(
            "the server enrolled {} instead of {uuid}",
            resp.assignment.uuid
        )));
    }
    dir.save_enrollment(
        &resp,
        api.server(),
        &opts.server_ca_pem,
        OffsetDateTime::now_utc(),
    )?;
    let _ = std::fs::remove_file(dir.pending());
    let state = dir.load()?;
    info!(device = %uuid, ip = %resp.assignment.overlay_ip, status, "enrolled");
    Ok((state, status == 201))
}

/// The UUID this enrollment is for: the one already in the state dir (enrolled or
/// pending), else `--uuid`, else a new one. A conflicting `--uuid` is an error.
fn identity_to_use(dir: &StateDir, opts: &EnrollOptions) -> Result<DeviceId, EnrollError> {
    let existing = if dir.is_enrolled() {
        Some(dir.load()?.file.assignment.uuid)
    } else if dir.pending().exists() {
        let text = floto_files::read_to_string(&dir.pending()).map_err(StateError::from)?;
        let pending: Pending = serde_json::from_str(&text).map_err(|e| StateError::Damaged {
            dir: dir.root().to_owned(),
            file: "pending.json",
            reason: e.to_string(),
        })?;
        Some(pending.uuid)
    } else {
        if dir.device_key().exists() || dir.wg_key().exists() {
            // Keys without a record of which device they belong to: refuse to guess.
            return Err(StateError::Damaged {
                dir: dir.root().to_owned(),
                file: "state.json",
                reason: "keys are present but neither state.json nor pending.json says which device they belong to".into(),
            }
            .into());
        }
        None
    };
    match (existing, opts.uuid) {
        (Some(have), Some(want)) if have != want => Err(EnrollError::Usage(format!(
            "{} already holds device {have}; use another --state-dir for {want}",
            dir.root().display()
        ))),
        (Some(have), _) => Ok(have),
        (None, Some(want)) => Ok(want),
        (None, None) => Ok(DeviceId::new_random()),
    }
}

#[cfg(test)]
mod tests {
    use floto_client::ClientError;

    use super::*;

    #[test]
    fn a_refusal_is_said_once() {
        let refused = EnrollError::Client(CallError::Refused(ClientError::Api {
            status: 401,
            error: floto_proto::ApiError::new(
                floto_proto::ErrorCode::Unauthorized,
                "unknown provisioning key",
            ),
        }));
        let printed = format!("{:#}", anyhow::Error::from(refused));
        assert_eq!(
            printed,
            "enrollment refused: unknown provisioning key (HTTP 401)"
        );
        let unreachable = EnrollError::Client(CallError::Unanswered(vec![(
            "https://a".into(),
            ClientError::Transport {
                server: "https://a".into(),
                detail: "connection refused".into(),
            },
        )]));
        assert_eq!(
            format!("{:#}", anyhow::Error::from(unreachable)),
            "enrollment failed: cannot reach https://a: connection refused"
        );
    }

    #[test]
    fn debug_output_never_shows_the_provisioning_key() {
        let opts = EnrollOptions {
            servers: vec!["https://vpn.example:8443".parse().unwrap()],
            server_ca_pem: "-----BEGIN CERTIFICATE-----".into(),
            provisioning_key: "fpk_secret_value_1234".into(),
            uuid: None,
            device_type: Some("rpi4".into()),
            hostname: Some("sensor-1".into()),
            ssh_host_keys: Vec::new(),
            proxy: None,
        };
        let shown = format!("{opts:?} {opts:#?}");
        assert!(shown.contains("vpn.example"), "{shown}");
        assert!(!shown.contains("fpk_secret_value_1234"), "{shown}");
    }
}
