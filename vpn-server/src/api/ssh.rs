//! SSH certificates. `POST /v1/ssh/user-cert` gives an operator a short-lived OpenSSH user
//! certificate for one device: principals are the logins its fleet allows, the key ID names
//! the operator and an audit session, `source-address` is the server's overlay addresses (so
//! it works only through the broker), and it ends no later than the operator's own
//! certificate. Devices get host certificates at enrollment and renewal ([`device_ssh`]).
//! `GET /v1/ssh/user-ca` and `/v1/ssh/host-ca` publish the CAs' public keys;
//! `GET /v1/fleets` and `PUT /v1/fleets/{name}` read and set the logins per fleet.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use bytes::Bytes;
use time::OffsetDateTime;
use tracing::info;

use floto_pki::ssh::{check_login, parse_public_key, CertSpec, SshError, BACKDATE};
use floto_proto::ssh::{
    DeviceSsh, DeviceSshPolicy, FleetSettings, UserCertRequest, UserCertResponse, DEFAULT_LOGIN,
    HOST_SUFFIX,
};
use floto_proto::{DeviceId, ErrorCode};
use floto_registry::{AuditRecord, Registry};

use super::{parse_json, parse_uuid, unknown_device, AppState, Caller, ConnInfo, Failure};
use crate::authz::Action;
use crate::datadir::SshCas;
use crate::identify::PeerCert;

/// Host keys a device may send at once (sshd has one per key type).
pub const MAX_HOST_KEYS: usize = 8;

fn public_line(line: String) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{line}\n"),
    )
}

/// `GET /v1/ssh/user-ca`: the public key devices trust for operators' certificates.
pub async fn user_ca(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    public_line(state.ssh.user.public_line())
}

/// `GET /v1/ssh/host-ca`: the public key operators trust for devices' host certificates.
pub async fn host_ca(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    public_line(state.ssh.host.public_line())
}

/// The logins operators may use on `fleet`.
pub async fn fleet_logins(store: &dyn Registry, fleet: &str) -> Result<Vec<String>, Failure> {
    Ok(store
        .fleet_ssh_logins(fleet)
        .await?
        .unwrap_or_else(|| vec![DEFAULT_LOGIN.to_owned()]))
}

fn bad(e: SshError) -> Failure {
    Failure::new(ErrorCode::BadRequest, e.to_string())
}

/// `POST /v1/ssh/user-cert`.
pub async fn user_cert(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<UserCertResponse>, Failure> {
    let caller = Caller::of(&state, &conn, &headers).await?;
    let req: UserCertRequest = parse_json(&body)?;
    let id = parse_uuid(&req.device)?;
    // A device outside the caller's fleets gets the same 404 as an unknown one: the caller
    // learns nothing of its existence or fleet.
    let device = state
        .store
        .device(&id)
        .await?
        .filter(|d| super::devices::may_see(&caller.0, &d.fleet))
        .ok_or_else(|| unknown_device(&id))?;
    if device.is_revoked() {
        return Err(Failure::new(
            ErrorCode::Revoked,
            format!("device {id} was revoked"),
        ));
    }
    caller.require(Action::Connect, Some(&device.fleet))?;
    let op = caller.0;
    let key = parse_public_key(&req.public_key).map_err(bad)?;
    let allowed = fleet_logins(state.store.as_ref(), &device.fleet).await?;
    let principals = if req.logins.is_empty() {
        allowed
    } else {
        for login in &req.logins {
            check_login(login).map_err(bad)?;
            if !allowed.contains(login) {
                return Err(Failure::new(
                    ErrorCode::Forbidden,
                    format!(
                        "login {login:?} is not allowed on fleet {:?} (allowed: {}); an admin sets them with `floto-vpn-server fleet set`",
                        device.fleet,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        req.logins
    };
    let now = OffsetDateTime::now_utc();
    let mut valid_before = now + state.config.ssh_cert_lifetime;
    if let PeerCert::Valid(cert) = &conn.peer_cert {
        valid_before = valid_before.min(cert.not_after);
    }
    let session = format!("{:016x}", rand::random::<u64>());
    let key_id = format!("floto:{}:{session}", op.name);
    let serial = rand::random::<u64>().max(1);
    let spec = CertSpec {
        serial,
        key_id: key_id.clone(),
        principals: principals.clone(),
        valid_after: now - BACKDATE,
        valid_before,
        source_addresses: state
            .config
            .overlays
            .server_addresses()
            .into_iter()
            .map(IpAddr::V4)
            .collect(),
    };
    let cert = state
        .ssh
        .user
        .sign_user(&key, &spec)
        .map_err(Failure::internal)?;
    let certificate = cert.to_openssh().map_err(Failure::internal)?;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: op.name.clone(),
            action: "ssh.certificate".into(),
            device: Some(id),
            detail: serde_json::json!({
                "serial": serial,
                "session": session,
                "principals": principals,
                "valid_before": floto_proto::rfc3339(valid_before),
                "key": key.fingerprint(Default::default()).to_string(),
            })
            .to_string(),
        })
        .await;
    info!(operator = %op.name, device = %id, serial, "SSH user certificate issued");
    let host_certified = !state.store.device_ssh_host_keys(&id).await?.is_empty();
    Ok(Json(UserCertResponse {
        certificate,
        serial,
        key_id,
        principals,
        valid_before,
        host_ca: state.ssh.host.public_line(),
        host_certified,
    }))
}

/// `GET /v1/ssh/device` (a device's certificate): the user CA and its fleet's logins now.
pub async fn device_policy(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<ConnInfo>,
) -> Result<Json<DeviceSshPolicy>, Failure> {
    let (id, _) = state
        .identify
        .device(&conn.peer_cert, OffsetDateTime::now_utc())?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| unknown_device(&id))?;
    if device.is_revoked() {
        return Err(Failure::new(
            ErrorCode::Revoked,
            format!("device {id} was revoked"),
        ));
    }
    Ok(Json(DeviceSshPolicy {
        user_ca: state.ssh.user.public_line(),
        logins: fleet_logins(state.store.as_ref(), &device.fleet).await?,
    }))
}

/// What a device is told about SSH: host certificates for the host keys it sent (valid
/// `<uuid>.floto` and `<uuid>`, until `until`), the user CA and its fleet's logins. `None`
/// when it sent no host key (an agent that does not manage sshd).
pub async fn device_ssh(
    ssh: &SshCas,
    store: &dyn Registry,
    device: &DeviceId,
    fleet: &str,
    host_keys: &[String],
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<Option<DeviceSsh>, Failure> {
    if host_keys.is_empty() {
        return Ok(None);
    }
    let keys = check_host_keys(host_keys)?;
    let spec = CertSpec {
        serial: rand::random::<u64>().max(1),
        key_id: format!("floto-device:{device}"),
        principals: vec![format!("{device}{HOST_SUFFIX}"), device.to_string()],
        valid_after: now - BACKDATE,
        valid_before: until,
        source_addresses: Vec::new(),
    };
    let mut host_certificates = Vec::with_capacity(keys.len());
    for key in &keys {
        let cert = ssh.host.sign_host(key, &spec).map_err(Failure::internal)?;
        host_certificates.push(cert.to_openssh().map_err(Failure::internal)?);
    }
    Ok(Some(DeviceSsh {
        host_certificates,
        user_ca: ssh.user.public_line(),
        logins: fleet_logins(store, fleet).await?,
    }))
}

/// The host keys of an enrollment or renewal request, each checked, with a message naming
/// the bad one.
pub fn check_host_keys(lines: &[String]) -> Result<Vec<ssh_key::PublicKey>, Failure> {
    if lines.len() > MAX_HOST_KEYS {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "{} SSH host keys: at most {MAX_HOST_KEYS} may be sent",
                lines.len()
            ),
        ));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            parse_public_key(line).map_err(|e| {
                Failure::new(ErrorCode::BadRequest, format!("ssh_host_keys[{i}]: {e}"))
            })
        })
        .collect()
}

/// `GET /v1/fleets`: fleets with settings of their own (admins).
pub async fn list_fleets(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<FleetSettings>>, Failure> {
    caller.require(Action::Administer, None)?;
    Ok(Json(
        state
            .store
            .fleet_settings()
            .await?
            .into_iter()
            .map(|f| FleetSettings {
                name: f.name,
                ssh_logins: Some(f.ssh_logins),
            })
            .collect(),
    ))
}

/// `PUT /v1/fleets/{name}`: sets a fleet's SSH logins (admins); `null` goes back to the
/// default.
pub async fn set_fleet(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<FleetSettings>, Failure> {
    let caller = Caller::of(&state, &conn, &headers).await?;
    caller.require(Action::Administer, None)?;
    let admin = caller.0;
    let req: FleetSettings = parse_json(&body)?;
    floto_proto::admin::validate_fleet_name(&name)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, e))?;
    if let Some(logins) = &req.ssh_logins {
        if logins.is_empty() {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "ssh_logins is empty: give at least one login, or null for the default",
            ));
        }
        for login in logins {
            check_login(login).map_err(bad)?;
        }
    }
    let now = OffsetDateTime::now_utc();
    state
        .store
        .set_fleet_ssh_logins(&name, req.ssh_logins.as_deref(), now)
        .await?;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: admin.name.clone(),
            action: "fleet.updated".into(),
            device: None,
            detail: serde_json::json!({"fleet": name, "ssh_logins": req.ssh_logins}).to_string(),
        })
        .await;
    let logins = fleet_logins(state.store.as_ref(), &name).await?;
    Ok(Json(FleetSettings {
        name,
        ssh_logins: Some(logins),
    }))
}
