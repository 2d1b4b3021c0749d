//! Enrollment and renewal: `POST /v1/enroll` and `POST /v1/renew`.
//!
//! The rules are pure functions ([`validate_enroll_request`], [`decide_enrollment`],
//! [`decide_renewal`]); the registry calls the deciding ones inside its transaction, so a
//! decision and the write it leads to are atomic. The handlers at the bottom only move
//! data between HTTP, the CA, the registry and the concentrator.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ipnet::Ipv4Net;
use time::OffsetDateTime;
use tracing::{info, warn};

use floto_pki::{Serial, VerifiedCsr};
use floto_proto::enroll::{EnrollRequest, EnrollResponse, RenewRequest};
use floto_proto::wgconf::WgQuickConfig;
use floto_proto::{ApiError, DeviceId, ErrorCode, WgKey};

use crate::api::{parse_json, ConnInfo, Failure, LimitedBody};
use crate::secret::{hash_secret, secret_id};
use crate::store::{
    AuditRecord, Device, EnrollCommit, EnrollOutcome, ProvisioningKey, RenewCommit,
};
use crate::AppState;

/// Longest `device_type` and `hostname` accepted.
const MAX_LABEL: usize = 253;

/// The overlay address at `offset` from the network address, if it is a usable device
/// address: offsets 0 (network) and 1 (the server) and the broadcast address are not.
pub fn overlay_address(overlay: Ipv4Net, offset: u32) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - overlay.prefix_len());
    if offset < 2 || u64::from(offset) >= size - 1 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(overlay.network()) + offset))
}

/// The address after the highest one given out (`None` before the first device), or
/// `None` when the overlay is full.
pub fn next_overlay_address(overlay: Ipv4Net, highest: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    let offset = match highest {
        None => 2,
        Some(ip) => u32::from(ip)
            .checked_sub(u32::from(overlay.network()))?
            .checked_add(1)?,
    };
    overlay_address(overlay, offset)
}

/// How many devices an overlay can hold.
pub fn overlay_capacity(overlay: Ipv4Net) -> u64 {
    (1u64 << (32 - overlay.prefix_len())).saturating_sub(3)
}

/// An enrollment request whose every field has been checked.
#[derive(Debug)]
pub struct ValidEnroll {
    pub device: Option<DeviceId>,
    pub csr: VerifiedCsr,
    pub wg_public_key: WgKey,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Checks every field of an enrollment request, naming the field that is wrong.
pub fn validate_enroll_request(req: &EnrollRequest) -> Result<ValidEnroll, ApiError> {
    let device = req
        .uuid
        .as_deref()
        .map(|u| u.parse::<DeviceId>())
        .transpose()
        .map_err(|e| bad_request(format!("uuid: {e}")))?;
    let wg_public_key = validate_wg_key(&req.wg_public_key)?;
    let csr =
        floto_pki::parse_csr(&req.csr_pem).map_err(|e| bad_request(format!("csr_pem: {e}")))?;
    Ok(ValidEnroll {
        device,
        csr,
        wg_public_key,
        device_type: validate_label("device_type", req.device_type.as_deref())?,
        hostname: validate_label("hostname", req.hostname.as_deref())?,
    })
}

/// A WireGuard public key: 32 bytes of base64 that is a usable Curve25519 point (a
/// low-order point would make every shared secret zero).
pub fn validate_wg_key(s: &str) -> Result<WgKey, ApiError> {
    let key: WgKey = s
        .parse()
        .map_err(|e| bad_request(format!("wg_public_key: {e}")))?;
    let probe = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
    let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(*key.as_bytes()));
    if !shared.was_contributory() {
        return Err(bad_request(
            "wg_public_key: not a usable Curve25519 public key (low-order point)",
        ));
    }
    Ok(key)
}

fn validate_label(field: &str, value: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    if v.is_empty() || v.len() > MAX_LABEL || !v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(bad_request(format!(
            "{field}: must be 1 to {MAX_LABEL} printable ASCII characters"
        )));
    }
    Ok(Some(v.to_owned()))
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No key with this secret.
    KeyUnknown,
    /// The key was revoked.
    KeyRevoked,
    /// The key expired.
    KeyExpired { at: OffsetDateTime },
    /// The key has enrolled as many devices as it may.
    KeyUsedUp,
    /// The UUID belongs to a device of another fleet.
    WrongFleet { device_fleet: String },
    /// The UUID belongs to a revoked device.
    DeviceRevoked,
    /// The UUID is enrolled with a different device key.
    UuidHeldByAnotherKey,
    /// The WireGuard key is bound to another device.
    WgKeyBound { other: DeviceId },
    /// Every address of the overlay is taken.
    AddressPoolExhausted { overlay: Ipv4Net },
}

impl EnrollRefusal {
    pub fn to_api_error(&self, device: &DeviceId) -> ApiError {
        use EnrollRefusal::*;
        let (code, message) = match self {
            KeyUnknown => (ErrorCode::Unauthorized, "unknown provisioning key".to_owned()),
            KeyRevoked => (ErrorCode::Unauthorized, "provisioning key was revoked; ask an admin for a new one".to_owned()),
            KeyExpired { at } => (ErrorCode::Unauthorized, format!("provisioning key expired at {}; ask an admin for a new one", rfc3339(*at))),
            KeyUsedUp => (ErrorCode::Unauthorized, "provisioning key has no uses left; ask an admin for a new one".to_owned()),
            WrongFleet { device_fleet } => (ErrorCode::Forbidden, format!("device {device} belongs to fleet {device_fleet:?}; this provisioning key is for another fleet")),
            DeviceRevoked => (ErrorCode::Revoked, format!("device {device} was revoked; an admin must enroll it under a new UUID")),
            UuidHeldByAnotherKey => (ErrorCode::Conflict, format!("device {device} is enrolled with a different device key; re-enrollment must use the key of its current certificate")),
            WgKeyBound { other } => (ErrorCode::Conflict, format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key")),
            AddressPoolExhausted { overlay } => (ErrorCode::Unavailable, format!("no overlay address left in {overlay}; an admin must widen the overlay")),
        };
        ApiError::new(code, message)
    }
}

/// What to do with a valid enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollDecision {
    /// A new device: allocate an address, take a use of the key.
    Create,
    /// The device proved the key of its current certificate again: same UUID and address,
    /// no use of the key taken. This is how a device whose certificate expired comes back.
    Reenroll,
}

/// Checks a provisioning key on its own (before any work is done for the request).
pub fn check_key(
    key: Option<&ProvisioningKey>,
    now: OffsetDateTime,
) -> Result<&ProvisioningKey, EnrollRefusal> {
    let key = key.ok_or(EnrollRefusal::KeyUnknown)?;
    if key.revoked_at.is_some() {
        return Err(EnrollRefusal::KeyRevoked);
    }
    if let Some(at) = key.expires_at {
        if at <= now {
            return Err(EnrollRefusal::KeyExpired { at });
        }
    }
    Ok(key)
}

/// The enrollment rules, given what the registry holds at the moment of the transaction.
pub fn decide_enrollment(
    key: Option<&ProvisioningKey>,
    existing: Option<&Device>,
    wg_key_owner: Option<&DeviceId>,
    c: &EnrollCommit,
) -> Result<EnrollDecision, EnrollRefusal> {
    let key = check_key(key, c.now)?;
    let bound_elsewhere = wg_key_owner.filter(|owner| **owner != c.device);
    match existing {
        Some(device) => {
            if device.fleet != key.fleet {
                return Err(EnrollRefusal::WrongFleet {
                    device_fleet: device.fleet.clone(),
                });
            }
            if device.is_revoked() {
                return Err(EnrollRefusal::DeviceRevoked);
            }
            if device.cert_public_key != c.cert_public_key {
                return Err(EnrollRefusal::UuidHeldByAnotherKey);
            }
            if let Some(other) = bound_elsewhere {
                return Err(EnrollRefusal::WgKeyBound { other: *other });
            }
            Ok(EnrollDecision::Reenroll)
        }
        None => {
            if key.uses_left == Some(0) {
                return Err(EnrollRefusal::KeyUsedUp);
            }
            if let Some(other) = bound_elsewhere {
                return Err(EnrollRefusal::WgKeyBound { other: *other });
            }
            Ok(EnrollDecision::Create)
        }
    }
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewRefusal {
    /// The certificate names a device the registry does not have.
    UnknownDevice,
    /// The device was revoked.
    DeviceRevoked,
    /// An older certificate tried to renew: the device key was cloned, or an old backup
    /// came back to life.
    NotNewestSerial { presented: String, newest: String },
    /// The new WireGuard key is bound to another device.
    WgKeyBound { other: DeviceId },
}

impl RenewRefusal {
    pub fn to_api_error(&self, device: &DeviceId) -> ApiError {
        match self {
            Self::UnknownDevice => ApiError::new(ErrorCode::Unauthorized, format!("device {device} is not enrolled here")),
            Self::DeviceRevoked => ApiError::new(ErrorCode::Revoked, format!("device {device} was revoked")),
            Self::NotNewestSerial { presented, .. } => ApiError::new(
                ErrorCode::Forbidden,
                format!("certificate {presented} of device {device} has been superseded; only the newest certificate may renew"),
            ),
            Self::WgKeyBound { other } => ApiError::new(
                ErrorCode::Conflict,
                format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key"),
            ),
        }
    }
}

/// The renewal rules. Returns the device as it was before the renewal.
pub fn decide_renewal<'a>(
    device: Option<&'a Device>,
    wg_key_owner: Option<&DeviceId>,
    c: &RenewCommit,
) -> Result<&'a Device, RenewRefusal> {
    let device = device.ok_or(RenewRefusal::UnknownDevice)?;
    if device.is_revoked() {
        return Err(RenewRefusal::DeviceRevoked);
    }
    if device.cert_serial != c.presented_serial {
        return Err(RenewRefusal::NotNewestSerial {
            presented: c.presented_serial.clone(),
            newest: device.cert_serial.clone(),
        });
    }
    if let Some(other) = wg_key_owner.filter(|o| **o != c.device) {
        return Err(RenewRefusal::WgKeyBound { other: *other });
    }
    Ok(device)
}

/// When a device should renew: at 2/3 of its certificate's lifetime.
pub fn renew_after(issued: OffsetDateTime, expires: OffsetDateTime) -> OffsetDateTime {
    issued + (expires - issued) * 2 / 3
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

// ---------------------------------------------------------------------------------------
// HTTP handlers

/// Reads `Authorization: Bearer <secret>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

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
    if let Err(refusal) = check_key(key.as_ref(), now) {
        return Err(Failure::from(refusal.to_api_error(&DeviceId::new_random())));
    }

    // 2. The request.
    let req: EnrollRequest = parse_json(body)?;
    let valid = validate_enroll_request(&req)?;
    let device = valid.device.unwrap_or_else(DeviceId::new_random);

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
        info!(device = %device, ignored = ?cert.ignored_requests, "CSR asked for more than a device certificate; ignored");
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
    };
    let outcome = state
        .store
        .enroll(commit)
        .await?
        .map_err(|refusal| Failure::from(refusal.to_api_error(&device)))?;

    // 5. The running concentrator learns the peer.
    let (status, action, previous_wg_key) = match &outcome {
        EnrollOutcome::Created(_) => (StatusCode::CREATED, "device.enrolled", None),
        EnrollOutcome::Reenrolled {
            previous_wg_key, ..
        } => (StatusCode::OK, "device.reenrolled", *previous_wg_key),
    };
    let device_row = outcome.device();
    state.wg.upsert_peer(device_row, previous_wg_key.as_ref());
    state
        .audit(AuditRecord {
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
    info!(device = %device, fleet = %device_row.fleet, ip = %device_row.overlay_ip, status = status.as_u16(), "device enrolled");
    Ok((
        status,
        state.enroll_response(device_row, cert.pem, now, conn),
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

async fn renew(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    body: &[u8],
) -> Result<EnrollResponse, Failure> {
    let now = OffsetDateTime::now_utc();
    let (device, presented) = conn.device_identity(state, now)?;
    let req: RenewRequest = parse_json(body)?;
    let csr = floto_pki::parse_csr(&req.csr_pem)
        .map_err(|e| Failure::from(bad_request(format!("csr_pem: {e}"))))?;
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
    let renewed = state
        .store
        .renew(commit)
        .await?
        .map_err(|refusal| {
            if let RenewRefusal::NotNewestSerial { presented, newest } = &refusal {
                warn!(device = %device, presented, newest, "superseded certificate tried to renew: the device key may be cloned");
            }
            Failure::from(refusal.to_api_error(&device))
        })?;
    state
        .wg
        .upsert_peer(&renewed.device, renewed.previous_wg_key.as_ref());
    state
        .audit(AuditRecord {
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
    info!(device = %device, "certificate renewed");
    Ok(state.enroll_response(&renewed.device, cert.pem, now, conn))
}

impl AppState {
    /// The enrollment/renewal response for `device` with its new certificate.
    fn enroll_response(
        &self,
        device: &Device,
        certificate_pem: String,
        issued: OffsetDateTime,
        conn: &ConnInfo,
    ) -> EnrollResponse {
        let endpoint = self.device_endpoint(conn);
        let wg = WgQuickConfig {
            address: device.overlay_ip,
            allowed_ips: self.config.overlay.to_string(),
            server_public_key: self.server_wg_public,
            endpoint: endpoint.clone(),
            persistent_keepalive: floto_proto::defaults::PERSISTENT_KEEPALIVE_SECS,
        };
        EnrollResponse {
            uuid: device.id,
            certificate_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            overlay_ip: device.overlay_ip,
            server_overlay_ip: self.config.server_overlay_ip(),
            overlay_network: self.config.overlay.to_string(),
            endpoint,
            server_public_key: self.server_wg_public,
            persistent_keepalive: floto_proto::defaults::PERSISTENT_KEEPALIVE_SECS,
            renew_after: renew_after(issued, device.cert_expires_at),
            expires_at: device.cert_expires_at,
            wg_quick_config: wg.render(None),
        }
    }

    /// The WireGuard endpoint to give a device: the configured one, else the host the
    /// device used to reach this API with the concentrator's port.
    fn device_endpoint(&self, conn: &ConnInfo) -> String {
        if let Some(e) = &self.config.endpoint {
            return e.clone();
        }
        let port = self.bound.wg.port();
        match conn.host.as_deref() {
            Some(host) if host.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{host}]:{port}"),
            Some(host) => format!("{host}:{port}"),
            None => format!("{}:{port}", conn.local.ip()),
        }
    }
}

/// Time before a shed request should be retried, randomised so that shed clients do not
/// come back together.
pub fn retry_after_jitter() -> Duration {
    Duration::from_secs(rand::random_range(1..=5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uses: Option<u32>) -> ProvisioningKey {
        ProvisioningKey {
            id: "k".into(),
            fleet: "lab".into(),
            uses_left: uses,
            expires_at: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
        }
    }

    fn commit(device: DeviceId, spki: &[u8]) -> EnrollCommit {
        EnrollCommit {
            key_hash: [0; 32],
            device,
            wg_public_key: WgKey([9; 32]),
            cert_serial: "01".into(),
            cert_public_key: spki.to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            device_type: None,
            hostname: None,
            now: OffsetDateTime::UNIX_EPOCH + Duration::from_secs(100),
        }
    }

    fn device(id: DeviceId, fleet: &str, spki: &[u8]) -> Device {
        Device {
            id,
            fleet: fleet.into(),
            wg_public_key: WgKey([9; 32]),
            overlay_ip: Ipv4Addr::new(10, 240, 0, 2),
            cert_serial: "01".into(),
            cert_public_key: spki.to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
            key_id: None,
            device_type: None,
            hostname: None,
            last_endpoint: None,
            last_seen: None,
        }
    }

    #[test]
    fn overlay_addresses_skip_network_server_and_broadcast() {
        let net: Ipv4Net = "10.240.0.0/30".parse().unwrap();
        assert_eq!(overlay_address(net, 0), None);
        assert_eq!(overlay_address(net, 1), None);
        assert_eq!(overlay_address(net, 2), Some(Ipv4Addr::new(10, 240, 0, 2)));
        assert_eq!(overlay_address(net, 3), None);
        assert_eq!(overlay_capacity(net), 1);
        let big: Ipv4Net = "10.240.0.0/16".parse().unwrap();
        assert_eq!(overlay_capacity(big), 65533);
        assert_eq!(
            overlay_address(big, 65534),
            Some(Ipv4Addr::new(10, 240, 255, 254))
        );
        assert_eq!(overlay_address(big, 65535), None);
        assert_eq!(
            next_overlay_address(net, None),
            Some(Ipv4Addr::new(10, 240, 0, 2))
        );
        assert_eq!(
            next_overlay_address(net, Some(Ipv4Addr::new(10, 240, 0, 2))),
            None
        );
        assert_eq!(
            next_overlay_address(big, Some(Ipv4Addr::new(10, 240, 1, 255))),
            Some(Ipv4Addr::new(10, 240, 2, 0))
        );
        assert_eq!(
            next_overlay_address(big, Some(Ipv4Addr::new(10, 240, 255, 254))),
            None
        );
    }

    #[test]
    fn key_states() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(check_key(None, now), Err(EnrollRefusal::KeyUnknown));
        let mut k = key(None);
        k.revoked_at = Some(now);
        assert_eq!(check_key(Some(&k), now), Err(EnrollRefusal::KeyRevoked));
        let mut k = key(None);
        k.expires_at = Some(now);
        assert!(matches!(
            check_key(Some(&k), now),
            Err(EnrollRefusal::KeyExpired { .. })
        ));
        k.expires_at = Some(now + Duration::from_secs(1));
        assert!(check_key(Some(&k), now).is_ok());
    }

    #[test]
    fn decisions() {
        let id = DeviceId::new_random();
        let other = DeviceId::new_random();
        let c = commit(id, b"spki-a");
        // New device.
        assert_eq!(
            decide_enrollment(Some(&key(None)), None, None, &c),
            Ok(EnrollDecision::Create)
        );
        assert_eq!(
            decide_enrollment(Some(&key(Some(0))), None, None, &c),
            Err(EnrollRefusal::KeyUsedUp)
        );
        assert_eq!(
            decide_enrollment(Some(&key(Some(1))), None, Some(&other), &c),
            Err(EnrollRefusal::WgKeyBound { other })
        );
        // Existing device.
        let d = device(id, "lab", b"spki-a");
        assert_eq!(
            decide_enrollment(Some(&key(Some(0))), Some(&d), Some(&id), &c),
            Ok(EnrollDecision::Reenroll)
        );
        assert_eq!(
            decide_enrollment(
                Some(&key(None)),
                Some(&device(id, "lab", b"spki-b")),
                None,
                &c
            ),
            Err(EnrollRefusal::UuidHeldByAnotherKey)
        );
        assert!(matches!(
            decide_enrollment(
                Some(&key(None)),
                Some(&device(id, "prod", b"spki-a")),
                None,
                &c
            ),
            Err(EnrollRefusal::WrongFleet { .. })
        ));
        let mut revoked = d.clone();
        revoked.revoked_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            decide_enrollment(Some(&key(None)), Some(&revoked), None, &c),
            Err(EnrollRefusal::DeviceRevoked)
        );
        assert_eq!(
            decide_enrollment(Some(&key(None)), Some(&d), Some(&other), &c),
            Err(EnrollRefusal::WgKeyBound { other })
        );
    }

    #[test]
    fn renewal_decisions() {
        let id = DeviceId::new_random();
        let d = device(id, "lab", b"spki");
        let c = RenewCommit {
            device: id,
            presented_serial: "01".into(),
            new_wg_public_key: None,
            cert_serial: "02".into(),
            cert_public_key: b"spki2".to_vec(),
            cert_expires_at: OffsetDateTime::UNIX_EPOCH,
            now: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(decide_renewal(Some(&d), None, &c).is_ok());
        assert_eq!(
            decide_renewal(None, None, &c),
            Err(RenewRefusal::UnknownDevice)
        );
        let old = RenewCommit {
            presented_serial: "00".into(),
            ..c.clone()
        };
        assert!(matches!(
            decide_renewal(Some(&d), None, &old),
            Err(RenewRefusal::NotNewestSerial { .. })
        ));
        let mut revoked = d.clone();
        revoked.revoked_at = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            decide_renewal(Some(&revoked), None, &c),
            Err(RenewRefusal::DeviceRevoked)
        );
    }

    #[test]
    fn wg_keys_that_are_low_order_points_are_refused() {
        // The all-zero key is refused at parse; 1 (a low-order point) by the DH check.
        let mut one = [0u8; 32];
        one[0] = 1;
        let err = validate_wg_key(&WgKey(one).to_base64()).unwrap_err();
        assert!(err.message.contains("low-order"), "{}", err.message);
        let good = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32]));
        assert!(validate_wg_key(&WgKey(good.to_bytes()).to_base64()).is_ok());
    }

    #[test]
    fn labels() {
        assert!(validate_label("hostname", Some("sensor-1")).is_ok());
        assert!(validate_label("hostname", Some("")).is_err());
        assert!(validate_label("hostname", Some("a\nb")).is_err());
        assert!(validate_label("hostname", Some(&"a".repeat(300))).is_err());
    }

    #[test]
    fn renew_after_is_two_thirds() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(
            renew_after(t0, t0 + Duration::from_secs(90)),
            t0 + Duration::from_secs(60)
        );
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(http::header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(http::header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(http::header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
