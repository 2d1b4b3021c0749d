//! The I/O half of certificate upkeep: performs a [`CertAction`] (renewal over mTLS with a
//! fresh key, or re-enrollment with the provisioning key) and stores the result crash-safely
//! through [`StateDir::save_renewal`]. When to act is decided by
//! [`super::renewal::RenewalPlanner`]. Both fail over between the configured servers
//! ([`crate::servers`]): a renewal asks the server the device enrolled with first.

use time::OffsetDateTime;

use floto_client::{ApiClient, ClientError};
use floto_proto::enroll::{EnrollRequest, RenewRequest};
use floto_proto::ErrorCode;

use super::renewal::{CertAction, CertFailure};
use crate::enroll::EnrollOptions;
use crate::servers::{self, call_in_turn, CallError, ServerUrl};
use crate::state::{DeviceState, StateDir, StateError};

/// A failed action: how it failed (for the planner) and what to tell a person.
#[derive(Debug, Clone)]
pub struct Failed {
    pub failure: CertFailure,
    pub message: String,
}

impl Failed {
    fn new(failure: CertFailure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

impl From<StateError> for Failed {
    fn from(e: StateError) -> Self {
        // The disk may come back (full, read-only for a moment); the identity is unchanged.
        Self::new(
            CertFailure::Transient,
            format!("storing the certificate: {e}"),
        )
    }
}

/// How a server's refusal should be treated.
fn classify(action: CertAction, e: &ClientError) -> CertFailure {
    match e {
        ClientError::Api { error, .. } if error.error == ErrorCode::Revoked => CertFailure::Revoked,
        e if e.is_transient() => {
            if let ClientError::Transport { detail, .. } = e {
                // A TLS alert about our certificate (expired, unknown, revoked) is a refusal,
                // not a network problem.
                let d = detail.to_ascii_lowercase();
                if action == CertAction::Renew && d.contains("certificate") {
                    return CertFailure::CertificateRefused;
                }
            }
            CertFailure::Transient
        }
        ClientError::Api { error, .. } => match (action, error.error) {
            (CertAction::Renew, ErrorCode::Forbidden) => CertFailure::Superseded,
            (CertAction::Renew, ErrorCode::Unauthorized) => CertFailure::CertificateRefused,
            _ => CertFailure::Refused,
        },
        _ => CertFailure::Refused,
    }
}

/// How a call that went to several servers failed: a refusal as [`classify`] says; when no
/// server answered, a certificate refused in the TLS handshake by any of them counts.
fn classify_call(action: CertAction, e: &CallError) -> CertFailure {
    e.errors()
        .map(|e| classify(action, e))
        .find(|f| *f != CertFailure::Transient)
        .unwrap_or(CertFailure::Transient)
}

/// Performs `action` for the device in `dir`. `servers`: the configured API servers (a
/// renewal asks the one in `state.json` first, then these). `ssh_host_keys`: sshd's host
/// keys, to get host certificates for.
pub async fn perform(
    action: CertAction,
    dir: &StateDir,
    state: &DeviceState,
    servers: &[ServerUrl],
    enroll: Option<&EnrollOptions>,
    ssh_host_keys: &[String],
    proxy: Option<&str>,
) -> Result<DeviceState, Failed> {
    match action {
        CertAction::Renew => renew(dir, state, servers, ssh_host_keys, proxy).await,
        CertAction::Reenroll => match enroll {
            Some(settings) => reenroll(dir, state, settings, ssh_host_keys).await,
            None => Err(Failed::new(
                CertFailure::Refused,
                "the certificate cannot be renewed and no provisioning key is configured to re-enroll with",
            )),
        },
    }
}

/// The key a renewal asks for: the one a cut-short renewal left, else a fresh one, written
/// as `device.key.next` before the request so that a retry (or a crash) reuses it.
fn next_key(dir: &StateDir) -> Result<String, Failed> {
    let path = dir.device_key_next();
    if path.exists() {
        return floto_files::read_secret(&path)
            .map_err(|e| Failed::new(CertFailure::Transient, e.to_string()));
    }
    let key = floto_pki::generate_key()
        .map_err(|e| Failed::new(CertFailure::Transient, format!("making a key: {e}")))?;
    floto_files::write_secret(&path, key.as_bytes())
        .map_err(|e| Failed::new(CertFailure::Transient, e.to_string()))?;
    Ok(key)
}

async fn renew(
    dir: &StateDir,
    state: &DeviceState,
    servers: &[ServerUrl],
    ssh_host_keys: &[String],
    proxy: Option<&str>,
) -> Result<DeviceState, Failed> {
    let key = next_key(dir)?;
    let csr = floto_pki::make_csr(&key, &state.file.assignment.uuid.to_string())
        .map_err(|e| Failed::new(CertFailure::Refused, format!("making the CSR: {e}")))?;
    let clients = servers::preferring(&state.file.server, servers)
        .iter()
        .map(|server| state.api_via(server, proxy))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failed::new(CertFailure::Refused, e.to_string()))?;
    let req = RenewRequest {
        csr_pem: csr,
        wg_public_key: None,
        ssh_host_keys: ssh_host_keys.to_vec(),
    };
    let req = &req;
    let (_, resp) = call_in_turn(&clients, |api| async move { api.renew(req).await })
        .await
        .map_err(|e| {
            Failed::new(
                classify_call(CertAction::Renew, &e),
                format!("renewal: {e}"),
            )
        })?;
    Ok(dir.save_renewal(&resp, true, OffsetDateTime::now_utc())?)
}

async fn reenroll(
    dir: &StateDir,
    state: &DeviceState,
    settings: &EnrollOptions,
    ssh_host_keys: &[String],
) -> Result<DeviceState, Failed> {
    let clients = settings
        .servers
        .iter()
        .map(|s| {
            ApiClient::via_proxy(
                s.as_str(),
                &settings.server_ca_pem,
                None,
                settings.proxy.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failed::new(CertFailure::Refused, e.to_string()))?;
    // A renewal cut short may have reached the server: then its key is the current one.
    let mut keys = Vec::new();
    if dir.has_pending_key() {
        let pending = floto_files::read_secret(&dir.device_key_next())
            .map_err(|e| Failed::new(CertFailure::Transient, e.to_string()))?;
        keys.push((pending, true));
    }
    keys.push((state.device_key_pem.clone(), false));
    let mut last = None;
    for (key, is_next) in keys {
        let csr = floto_pki::make_csr(&key, &state.file.assignment.uuid.to_string())
            .map_err(|e| Failed::new(CertFailure::Refused, format!("making the CSR: {e}")))?;
        let req = EnrollRequest {
            uuid: Some(state.file.assignment.uuid.to_string()),
            csr_pem: csr,
            wg_public_key: state.wg_public().to_base64(),
            device_type: settings.device_type.clone(),
            hostname: settings.hostname.clone(),
            ssh_host_keys: ssh_host_keys.to_vec(),
        };
        let (key, req) = (&settings.provisioning_key, &req);
        let answer = call_in_turn(&clients, |api| async move { api.enroll(key, req).await }).await;
        match answer {
            Ok((_, (_, resp))) => {
                let saved = dir.save_renewal(&resp, is_next, OffsetDateTime::now_utc())?;
                if !is_next {
                    let _ = std::fs::remove_file(dir.device_key_next());
                }
                return Ok(saved);
            }
            Err(e) if e.code() == Some(ErrorCode::Conflict) && is_next => {
                // The server never saw the pending key: try the current one.
                last = Some(e);
            }
            Err(e) => {
                return Err(Failed::new(
                    classify_call(CertAction::Reenroll, &e),
                    format!("re-enrollment: {e}"),
                ))
            }
        }
    }
    let e = last.map_or_else(|| "no key to re-enroll with".to_owned(), |e| e.to_string());
    Err(Failed::new(
        CertFailure::Refused,
        format!("re-enrollment: {e}"),
    ))
}
