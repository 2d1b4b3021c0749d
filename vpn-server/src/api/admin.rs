//! Admin and operator routes: provisioning keys, operators, login, revocation, CA and CRL.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use time::OffsetDateTime;
use tracing::info;

use floto_pki::Serial;
use floto_proto::admin::{
    validate_fleet_name, validate_operator_name, AddOperatorRequest, AddOperatorResponse,
    AuditEntry, CreateKeyRequest, CreateKeyResponse, KeyInfo, LoginRequest, LoginResponse,
    NodeInfo, OperatorInfo, RenewLoginRequest, Role, TokenKind,
};
use floto_proto::devices::DeviceInfo;
use floto_proto::ErrorCode;
use floto_registry::{
    AuditRecord, CertKind, Change, IssuedCertRecord, NewKey, NewOperator, TokenRefusal,
};

use super::{
    parse_json, parse_uuid, unknown_device, AppState, Caller, ConnInfo, Failure, LimitedBody,
};
use crate::authz::Action;
use crate::datadir::LOCAL_ADMIN;
use crate::enroll::parse_csr_field;
use crate::identify::PeerCert;
use crate::secret::{hash_secret, new_secret, secret_id};

/// Longest provisioning-key lifetime accepted.
const MAX_KEY_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn bad(message: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::BadRequest, message)
}

/// `POST /v1/keys` (admin): a new provisioning key, shown once.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    axum::Extension(conn): axum::Extension<ConnInfo>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<(StatusCode, Json<CreateKeyResponse>), Failure> {
    // The body first (see `Caller::of`).
    let caller = Caller::of(&state, &conn, &headers).await?;
    caller.require(Action::Administer, None)?;
    let op = caller.0;
    let req: CreateKeyRequest = parse_json(&body)?;
    validate_fleet_name(&req.fleet).map_err(bad)?;
    if req.uses == Some(0) {
        return Err(bad("uses must be at least 1 (omit it for unlimited)"));
    }
    let now = OffsetDateTime::now_utc();
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(0) => return Err(bad("expires_in_secs must be at least 1")),
        Some(s) if Duration::from_secs(s) > MAX_KEY_LIFETIME => {
            return Err(bad("a provisioning key may live at most 10 years"))
        }
        Some(s) => Some(now + Duration::from_secs(s)),
    };
    let secret = new_secret("fpk");
    let hash = hash_secret(&secret);
    let key = state
        .store
        .create_key(NewKey {
            id: secret_id(&hash),
            hash,
            fleet: req.fleet.clone(),
            uses: req.uses,
            expires_at,
            created_at: now,
        })
        .await?;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: op.name.clone(),
            action: "key.created".into(),
            device: None,
            detail: serde_json::json!({"id": key.id, "fleet": key.fleet, "uses": key.uses_left, "expires_at": expires_at.map(|t| t.unix_timestamp())}).to_string(),
        })
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreateKeyResponse {
            id: key.id,
            key: secret,
            fleet: key.fleet,
            uses: key.uses_left,
            expires_at,
        }),
    ))
}

/// `GET /v1/keys` (admin): keys without their secrets.
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<KeyInfo>>, Failure> {
    caller.require(Action::Administer, None)?;
    Ok(Json(state.store.list_keys().await?))
}

/// `GET /v1/nodes` (admin): the cluster's nodes with their leases and the devices each
/// holds; a single node lists itself.
pub async fn nodes(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<NodeInfo>>, Failure> {
    caller.require(Action::Administer, None)?;
    let (Some(node), Some(cluster)) = (&state.node, &state.cluster) else {
        return Ok(Json(vec![NodeInfo {
            id: "local".into(),
            name: state.config.node_name.clone(),
            address: state.bound.api.to_string(),
            alive: true,
            this: true,
            started_at: None,
            lease_expires_at: None,
            devices: state.wg.table.online_count(),
        }]));
    };
    let me = node.id();
    Ok(Json(
        cluster
            .nodes()
            .await?
            .into_iter()
            .map(|n| NodeInfo {
                this: *n.id == *me,
                id: n.id,
                name: n.name,
                address: n.address,
                alive: n.alive,
                started_at: Some(n.started_at),
                lease_expires_at: Some(n.lease_expires_at),
                devices: n.sessions,
            })
            .collect(),
    ))
}

/// `POST /v1/keys/{id}/revoke` (admin): the key enrolls nothing more (a leaked key is
/// stopped); devices it enrolled keep their certificates.
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, Failure> {
    caller.require(Action::Administer, None)?;
    let now = OffsetDateTime::now_utc();
    let key = state.store.revoke_key(&id, now).await?.ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            format!("no provisioning key {id:?}; `key list` shows their ids"),
        )
    })?;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: caller.0.name.clone(),
            action: "key.revoked".into(),
            device: None,
            detail: serde_json::json!({"id": key.id, "fleet": key.fleet}).to_string(),
        })
        .await;
    info!(key = %key.id, by = %caller.0.name, "provisioning key revoked");
    Ok(Json(key))
}

/// `POST /v1/operators` (admin): a new operator and its one-time login token.
pub async fn add_operator(
    State(state): State<Arc<AppState>>,
    axum::Extension(conn): axum::Extension<ConnInfo>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<(StatusCode, Json<AddOperatorResponse>), Failure> {
    // The body first (see `Caller::of`).
    let caller = Caller::of(&state, &conn, &headers).await?;
    caller.require(Action::Administer, None)?;
    let admin = caller.0;
    let req: AddOperatorRequest = parse_json(&body)?;
    validate_operator_name(&req.name).map_err(bad)?;
    for fleet in &req.fleets {
        validate_fleet_name(fleet).map_err(bad)?;
    }
    if req.role == Role::Operator && req.fleets.is_empty() {
        return Err(bad(
            "an operator needs at least one fleet (--fleet NAME); admins reach every fleet",
        ));
    }
    let fleets = if req.role == Role::Admin {
        Vec::new()
    } else {
        let mut f = req.fleets.clone();
        f.sort();
        f.dedup();
        f
    };
    let now = OffsetDateTime::now_utc();
    // Viewers are machine clients: they get a bearer API token. Admins and operators are
    // people: they get a one-time token for `floto login`.
    let (token_kind, token, token_expires_at) = if req.role == Role::Viewer {
        let expires = match req.token_expires_in_secs {
            None => None,
            Some(0) => return Err(bad("token_expires_in_secs must be at least 1")),
            Some(s) if Duration::from_secs(s) > MAX_KEY_LIFETIME => {
                return Err(bad("an API token may live at most 10 years"))
            }
            Some(s) => Some(now + Duration::from_secs(s)),
        };
        (TokenKind::Api, new_secret("fvt"), expires)
    } else {
        (
            TokenKind::Login,
            new_secret("fot"),
            Some(now + state.config.login_token_lifetime),
        )
    };
    let added = state
        .store
        .add_operator(NewOperator {
            name: req.name.clone(),
            role: req.role,
            fleets: fleets.clone(),
            token_kind,
            token_hash: hash_secret(&token),
            token_expires_at,
            now,
        })
        .await?;
    if added.is_none() {
        return Err(Failure::new(
            ErrorCode::Conflict,
            format!("operator {:?} already exists", req.name),
        ));
    }
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: admin.name.clone(),
            action: "operator.added".into(),
            device: None,
            detail: serde_json::json!({"name": req.name, "role": req.role, "fleets": fleets})
                .to_string(),
        })
        .await;
    Ok((
        StatusCode::CREATED,
        Json(AddOperatorResponse {
            name: req.name,
            role: req.role,
            fleets,
            token_kind,
            token,
            token_expires_at,
        }),
    ))
}

/// `GET /v1/operators` (admin)
pub async fn list_operators(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Vec<OperatorInfo>>, Failure> {
    caller.require(Action::Administer, None)?;
    Ok(Json(state.store.operators().await?))
}

/// `POST /v1/login`: a one-time token and a CSR for an operator certificate.
pub async fn login(
    State(state): State<Arc<AppState>>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<LoginResponse>, Failure> {
    let req: LoginRequest = parse_json(&body)?;
    // Check the CSR before taking the token, so a bad CSR does not burn it.
    let csr = parse_csr_field(&req.csr_pem)?;
    let now = OffsetDateTime::now_utc();
    let op = state
        .store
        .consume_login_token(&hash_secret(&req.token), now)
        .await?
        .map_err(|refusal| {
            let message = match refusal {
                TokenRefusal::Unknown => "unknown login token",
                TokenRefusal::Used => {
                    "this login token was already used; ask an admin for a new one (operator add)"
                }
                TokenRefusal::Expired => "this login token expired; ask an admin for a new one",
                TokenRefusal::OperatorRevoked => "this operator was revoked",
            };
            Failure::new(ErrorCode::Unauthorized, message)
        })?;
    let resp = issue_operator_certificate(&state, &op, &csr, now, "operator.login").await?;
    info!(operator = %op.name, "operator logged in");
    Ok(Json(resp))
}

/// `POST /v1/login/renew`, over mTLS with the operator's current certificate (not with an
/// API token): a new certificate for a new key. `floto` calls it when a third of the
/// certificate's lifetime is left.
pub async fn renew_login(
    State(state): State<Arc<AppState>>,
    conn: axum::Extension<ConnInfo>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<LoginResponse>, Failure> {
    if matches!(conn.peer_cert, PeerCert::None) {
        return Err(Failure::new(
            ErrorCode::Unauthorized,
            "renewal needs the current operator certificate (mTLS); run `floto login` with a new token",
        ));
    }
    let op = state
        .identify
        .operator(&conn.peer_cert, None, OffsetDateTime::now_utc())
        .await?;
    let req: RenewLoginRequest = parse_json(&body)?;
    let csr = parse_csr_field(&req.csr_pem)?;
    let now = OffsetDateTime::now_utc();
    Ok(Json(
        issue_operator_certificate(&state, &op, &csr, now, "operator.renewed").await?,
    ))
}

/// Signs, records and audits an operator certificate.
async fn issue_operator_certificate(
    state: &AppState,
    op: &OperatorInfo,
    csr: &floto_pki::VerifiedCsr,
    now: OffsetDateTime,
    action: &str,
) -> Result<LoginResponse, Failure> {
    let serial = Serial::random();
    let cert = state
        .ca
        .sign_operator(
            csr,
            &op.name,
            &serial,
            now,
            state.config.operator_cert_lifetime,
        )
        .map_err(|e| Failure::internal(format!("signing an operator certificate: {e}")))?;
    state
        .store
        .record_certificate(IssuedCertRecord {
            serial: serial.to_hex(),
            kind: CertKind::Operator,
            subject: op.name.clone(),
            issued_at: now,
            expires_at: cert.not_after,
            revoked_at: None,
        })
        .await?;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: op.name.clone(),
            action: action.into(),
            device: None,
            detail: serde_json::json!({"serial": serial.to_hex(), "expires_at": cert.not_after.unix_timestamp()})
                .to_string(),
        })
        .await;
    Ok(LoginResponse {
        name: op.name.clone(),
        role: op.role,
        fleets: op.fleets.clone(),
        certificate_pem: cert.pem,
        ca_pem: state.ca.cert_pem().to_owned(),
        expires_at: cert.not_after,
        quic_port: state.bound.quic.port(),
    })
}

/// `POST /v1/operators/{name}/revoke` (admin): the operator's certificates and API token
/// are refused from now on and its open broker sessions are closed.
pub async fn revoke_operator(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<OperatorInfo>, Failure> {
    caller.require(Action::Administer, None)?;
    if name == LOCAL_ADMIN {
        return Err(bad(
            "the local admin cannot be revoked; its certificate lives in the data dir",
        ));
    }
    let now = OffsetDateTime::now_utc();
    let revocation = state
        .store
        .revoke_operator(&name, now)
        .await?
        .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no operator {name:?}")))?;
    let op = revocation.operator.clone();
    let closed = state
        .changes
        .after_write(&Change::OperatorRevoked(revocation))
        .await
        .sessions_closed;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: caller.0.name.clone(),
            action: "operator.revoked".into(),
            device: None,
            detail: serde_json::json!({"name": name, "sessions_closed": closed}).to_string(),
        })
        .await;
    info!(operator = %name, by = %caller.0.name, closed, "operator revoked");
    Ok(Json(op))
}

/// Query of `GET /v1/audit`.
#[derive(Debug, serde::Deserialize)]
pub struct AuditQuery {
    pub device: Option<String>,
    pub operator: Option<String>,
    /// RFC 3339.
    pub since: Option<String>,
    pub limit: Option<u32>,
}

/// `GET /v1/audit` (admin): newest first, at most `limit` (default 1000, at most 10000).
pub async fn audit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, Failure> {
    caller.require(Action::Administer, None)?;
    let device = q.device.as_deref().map(parse_uuid).transpose()?;
    let since = q
        .since
        .as_deref()
        .map(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
                bad(format!(
                    "since: {e} (expected RFC 3339, e.g. 2026-11-22T10:00:00Z)"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let records = state
        .store
        .audit(device.as_ref(), q.operator.as_deref(), since, limit)
        .await?;
    Ok(Json(
        records
            .into_iter()
            .map(|r| AuditEntry {
                at: r.at,
                actor: r.actor,
                action: r.action,
                device: r.device,
                detail: serde_json::from_str(&r.detail)
                    .unwrap_or(serde_json::Value::String(r.detail)),
            })
            .collect(),
    ))
}

/// `POST /v1/devices/{uuid}/revoke` (admin): the peer and its session go at once, its
/// certificates are refused from now on, and its broker sessions are closed.
pub async fn revoke_device(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(uuid): Path<String>,
) -> Result<Json<DeviceInfo>, Failure> {
    caller.require(Action::Administer, None)?;
    let admin = caller.0;
    let id = parse_uuid(&uuid)?;
    let now = OffsetDateTime::now_utc();
    let revocation = state
        .store
        .revoke_device(&id, now)
        .await?
        .ok_or_else(|| unknown_device(&id))?;
    let device = revocation.device.clone();
    state
        .changes
        .after_write(&Change::DeviceRevoked(revocation))
        .await;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: admin.name.clone(),
            action: "device.revoked".into(),
            device: Some(id),
            detail: serde_json::json!({"fleet": device.fleet, "serial": device.cert_serial})
                .to_string(),
        })
        .await;
    info!(device = %id, by = %admin.name, "device revoked");
    let elsewhere = state.elsewhere(Some(&device.id)).await;
    Ok(Json(state.live_info(&device, &elsewhere)))
}

/// `GET /v1/ca`: the CA certificate, PEM.
pub async fn ca_pem(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.cert_pem().to_owned(),
    )
}

/// `GET /v1/crl`: the current CRL, PEM (signed when the revoked set changes).
pub async fn crl_pem(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, Failure> {
    let pem = state
        .crl
        .pem(OffsetDateTime::now_utc())
        .await
        .map_err(Failure::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem))
}
