//! `POST /v1/enroll` and `POST /v1/renew`: HTTP in and out of the enrollment rules
//! ([`crate::enroll`], [`floto_registry::rules`]), the CA, the registry and the applier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use time::OffsetDateTime;
use tracing::{info, warn};

use floto_pki::Serial;
use floto_proto::enroll::{EnrollRequest, EnrollResponse, RenewRequest};
use floto_proto::{DeviceId, ErrorCode};
use floto_registry::rules::check_key;
use floto_registry::{AuditRecord, EnrollCommit, EnrollOutcome, RenewCommit, RenewRefusal};

use super::{bearer, parse_json, AppState, ConnInfo, Failure, LimitedBody};
use crate::enroll::{
    enroll_refusal, enroll_response, parse_csr_field, renew_refusal, validate_enroll_request,
    validate_wg_key,
};
use crate::secret::{hash_secret, secret_id};

/// `POST /v1/enroll`
pub async fn enroll_handler(
    State(state): State<Arc<AppState>>,
    conn: axum::Extension<ConnInfo>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    let started = Instant::now();
    let result = enroll(&state, &conn, &headers, &body).await;
    let label = match &result {
        Ok((StatusCode::CREATED, _)) => "created",
        Ok(_) => "reenrolled",
        Err(f) => f.metric_label(),
    };
    state.metrics.enrollment(label, started.elapsed());
    match result {
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(f) => f.into_response(),
    }
}

#[tracing::instrument(skip_all, fields(device = tracing::field::Empty))]
async fn enroll(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, EnrollResponse), Failure> {
    let _slot = state
        .enroll_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Failure::shed("the server is busy enrolling other devices; retry after the given delay")
        })?;
    let now = OffsetDateTime::now_utc();

    // 1. The key, before any work is spent on the body.
    let secret = bearer(headers).ok_or_else(|| {
        Failure::new(
            ErrorCode::Unauthorized,
            "missing provisioning key: send it as `Authorization: Bearer <key>`",
        )
    })?;
    let key_hash = hash_secret(secret);
    let key = state.store.find_key(&key_hash).await?;
    let key = match check_key(key.as_ref(), now) {
        Ok(key) => key,
        Err(refusal) => {
            return Err(Failure::from(enroll_refusal(
                &refusal,
                &DeviceId::new_random(),
            )))
        }
    };
    // A leaked key is slowed down (until an admin revokes it).
    if let Err(wait) = state.enroll_rate.take(key.id.clone(), Instant::now()) {
        let mut f = Failure::shed(format!(
            "provisioning key {} is enrolling more than {} devices a second (--enroll-rate-per-key); retry after the given delay",
            key.id, state.config.enroll_rate_per_key
        ));
        f.retry_after = Some(wait.max(Duration::from_secs(1)));
        return Err(f);
    }

    // 2. The request.
    let req: EnrollRequest = parse_json(body)?;
    let valid = validate_enroll_request(&req)?;
    super::ssh::check_host_keys(&req.ssh_host_keys)?;
    let device = valid.device.unwrap_or_else(DeviceId::new_random);
    tracing::Span::current().record("device", tracing::field::display(device));

    // 3. The certificate (signed before the transaction; discarded if it refuses).
    let serial = Serial::random();
    let cert = state
        .ca
        .sign_device(
            &valid.csr,
            &device,
            &serial,
            now,
            state.config.cert_lifetime,
        )
        .map_err(|e| Failure::internal(format!("signing the device certificate: {e}")))?;
    if !cert.ignored_requests.is_empty() {
        info!(ignored = ?cert.ignored_requests, "CSR asked for more than a device certificate; ignored");
    }

    // 4. The registry decides and records, atomically. Its writer task runs the commit, so
    // a client hanging up cannot cancel it half-way.
    let commit = EnrollCommit {
        key_hash,
        device,
        wg_public_key: valid.wg_public_key,
        cert_serial: serial.to_hex(),
        cert_public_key: valid.csr.public_key_der().to_vec(),
        cert_expires_at: cert.not_after,
        device_type: valid.device_type,
        hostname: valid.hostname,
        now,
        reuse_addresses_revoked_before: now - state.config.address_reuse_after,
    };
    let outcome = state
        .store
        .enroll(commit)
        .await?
        .map_err(|refusal| Failure::from(enroll_refusal(&refusal, &device)))?;

    // 5. The running server follows what was committed.
    state.changes.after_write(&outcome.change()).await;
    let (status, action) = match &outcome {
        EnrollOutcome::Created(_) => (StatusCode::CREATED, "device.enrolled"),
        EnrollOutcome::Reenrolled { .. } => (StatusCode::OK, "device.reenrolled"),
    };
    let device_row = outcome.device();
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: format!("key:{}", secret_id(&key_hash)),
            action: action.into(),
            device: Some(device),
            detail: serde_json::json!({
                "fleet": device_row.fleet,
                "overlay_ip": device_row.overlay_ip,
                "serial": device_row.cert_serial,
                "wg_public_key": device_row.wg_public_key,
            })
            .to_string(),
        })
        .await;
    info!(fleet = %device_row.fleet, ip = %device_row.overlay_ip, status = status.as_u16(), "device enrolled");
    let ssh = device_ssh(state, device_row, &req.ssh_host_keys, now).await?;
    Ok((
        status,
        enroll_response(device_row, cert.pem, now, &state.server_facts(conn), ssh),
    ))
}

/// `POST /v1/renew`, over mTLS with the device's current certificate.
pub async fn renew_handler(
    State(state): State<Arc<AppState>>,
    conn: axum::Extension<ConnInfo>,
    LimitedBody(body): LimitedBody,
) -> Response {
    match renew(&state, &conn, &body).await {
        Ok(resp) => (StatusCode::OK, Json(resp)).into_response(),
        Err(f) => f.into_response(),
    }
}

#[tracing::instrument(skip_all, fields(device = tracing::field::Empty))]
async fn renew(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    body: &[u8],
) -> Result<EnrollResponse, Failure> {
    let now = OffsetDateTime::now_utc();
    let (device, presented) = state.identify.device(&conn.peer_cert, now)?;
    tracing::Span::current().record("device", tracing::field::display(device));
    let req: RenewRequest = parse_json(body)?;
    let csr = parse_csr_field(&req.csr_pem)?;
    super::ssh::check_host_keys(&req.ssh_host_keys)?;
    let new_wg_public_key = req
        .wg_public_key
        .as_deref()
        .map(validate_wg_key)
        .transpose()?;
    let serial = Serial::random();
    let cert = state
        .ca
        .sign_device(&csr, &device, &serial, now, state.config.cert_lifetime)
        .map_err(|e| Failure::internal(format!("signing the device certificate: {e}")))?;
    let commit = RenewCommit {
        device,
        presented_serial: presented.serial.to_hex(),
        new_wg_public_key,
        cert_serial: serial.to_hex(),
        cert_public_key: csr.public_key_der().to_vec(),
        cert_expires_at: cert.not_after,
        now,
    };
    let renewed = state.store.renew(commit).await?.map_err(|refusal| {
        if let RenewRefusal::NotNewestSerial { presented, newest } = &refusal {
            warn!(
                presented,
                newest, "superseded certificate tried to renew: the device key may be cloned"
            );
        }
        Failure::from(renew_refusal(&refusal, &device))
    })?;
    state.changes.after_write(&renewed.change()).await;
    state
        .audit
        .record(AuditRecord {
            at: now,
            actor: format!("device:{device}"),
            action: "device.renewed".into(),
            device: Some(device),
            detail: serde_json::json!({
                "serial": renewed.device.cert_serial,
                "previous_serial": presented.serial.to_hex(),
                "wg_key_rotated": renewed.previous_wg_key.is_some(),
            })
            .to_string(),
        })
        .await;
    info!("certificate renewed");
    let ssh = device_ssh(state, &renewed.device, &req.ssh_host_keys, now).await?;
    Ok(enroll_response(
        &renewed.device,
        cert.pem,
        now,
        &state.server_facts(conn),
        ssh,
    ))
}

/// Host certificates for the host keys an enrollment or renewal sent (valid as long as the
/// device certificate), and the record of those keys (operators' `floto ssh` then verifies
/// the device strictly). A request without host keys clears the record: the device no longer
/// gets host certificates, so it will not hold valid ones for long.
async fn device_ssh(
    state: &AppState,
    device: &floto_registry::Device,
    host_keys: &[String],
    now: OffsetDateTime,
) -> Result<Option<floto_proto::ssh::DeviceSsh>, Failure> {
    let ssh = super::ssh::device_ssh(
        &state.ssh,
        state.store.as_ref(),
        &device.id,
        &device.fleet,
        host_keys,
        now,
        device.cert_expires_at,
    )
    .await?;
    // A write only when there is something to record or to clear: enrollments of devices
    // that manage no sshd cost one read, not a transaction.
    if !host_keys.is_empty()
        || !state
            .store
            .device_ssh_host_keys(&device.id)
            .await?
            .is_empty()
    {
        state
            .store
            .set_device_ssh_host_keys(&device.id, host_keys, now)
            .await?;
    }
    Ok(ssh)
}
