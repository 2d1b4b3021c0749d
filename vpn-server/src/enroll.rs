//! Enrollment and renewal, without HTTP: the checks of every field a device sends, what a
//! refusal tells the device, and the response it gets. The decisions that need the
//! registry's facts (key, UUID, WireGuard key, addresses) are the registry's rules
//! ([`floto_registry::rules`]), taken inside its transaction; the HTTP handlers that tie
//! these together are in `api::enroll`.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use time::OffsetDateTime;

use floto_pki::VerifiedCsr;
use floto_proto::enroll::{Assignment, EnrollRequest, EnrollResponse};
use floto_proto::{ApiError, DeviceId, ErrorCode, WgKey};
use floto_registry::{Device, EnrollRefusal, RenewRefusal};

/// Longest `device_type` and `hostname` accepted.
const MAX_LABEL: usize = 253;

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
    let csr = parse_csr_field(&req.csr_pem)?;
    Ok(ValidEnroll {
        device,
        csr,
        wg_public_key,
        device_type: validate_label("device_type", req.device_type.as_deref())?,
        hostname: validate_label("hostname", req.hostname.as_deref())?,
    })
}

/// The CSR of a request's `csr_pem` field, checked (signature, key type).
pub fn parse_csr_field(pem: &str) -> Result<VerifiedCsr, ApiError> {
    floto_pki::parse_csr(pem).map_err(|e| bad_request(format!("csr_pem: {e}")))
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

/// What a device is told when its enrollment is refused.
pub fn enroll_refusal(refusal: &EnrollRefusal, device: &DeviceId) -> ApiError {
    use EnrollRefusal::*;
    let (code, message) = match refusal {
            KeyUnknown => (ErrorCode::Unauthorized, "unknown provisioning key".to_owned()),
            KeyRevoked => (ErrorCode::Unauthorized, "provisioning key was revoked; ask an admin for a new one".to_owned()),
            KeyExpired { at } => (ErrorCode::Unauthorized, format!("provisioning key expired at {}; ask an admin for a new one", floto_proto::timestamp::rfc3339(*at))),
            KeyUsedUp => (ErrorCode::Unauthorized, "provisioning key has no uses left; ask an admin for a new one".to_owned()),
            // No fleet names: the key's holder may not learn the other fleet.
            WrongFleet { .. } => (ErrorCode::Forbidden, format!("device {device} is enrolled in another fleet; use a provisioning key of its own fleet")),
            DeviceRevoked => (ErrorCode::Revoked, format!("device {device} was revoked; an admin must enroll it under a new UUID")),
            UuidHeldByAnotherKey => (ErrorCode::Conflict, format!("device {device} is enrolled with a different device key; re-enrollment must use the key of its current certificate")),
            WgKeyBound { other } => (ErrorCode::Conflict, format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key")),
            AddressPoolExhausted { overlay } => (ErrorCode::Unavailable, format!("no overlay address left in {overlay}; an admin must widen the overlay")),
        };
    ApiError::new(code, message)
}

/// What a device is told when its renewal is refused.
pub fn renew_refusal(refusal: &RenewRefusal, device: &DeviceId) -> ApiError {
    match refusal {
            RenewRefusal::UnknownDevice => ApiError::new(ErrorCode::Unauthorized, format!("device {device} is not enrolled here")),
            RenewRefusal::DeviceRevoked => ApiError::new(ErrorCode::Revoked, format!("device {device} was revoked")),
            RenewRefusal::NotNewestSerial { presented, .. } => ApiError::new(
                ErrorCode::Forbidden,
                format!("certificate {presented} of device {device} has been superseded; only the newest certificate may renew"),
            ),
            RenewRefusal::WgKeyBound { other } => ApiError::new(
                ErrorCode::Conflict,
                format!("this WireGuard public key is already bound to device {other}; generate a new WireGuard key"),
            ),
        }
}

/// When a device should renew: at 2/3 of its certificate's lifetime.
pub fn renew_after(issued: OffsetDateTime, expires: OffsetDateTime) -> OffsetDateTime {
    issued + (expires - issued) * 2 / 3
}

/// What a device is told about the server it enrolled with.
#[derive(Debug, Clone)]
pub struct ServerFacts<'a> {
    pub overlay: Ipv4Net,
    pub server_overlay_ip: Ipv4Addr,
    /// The WireGuard endpoint, `HOST:PORT` (see [`device_endpoint`]).
    pub endpoint: String,
    pub server_public_key: WgKey,
    pub ca_pem: &'a str,
}

/// The enrollment or renewal response for `device` with its new certificate.
pub fn enroll_response(
    device: &Device,
    certificate_pem: String,
    issued: OffsetDateTime,
    server: &ServerFacts<'_>,
) -> EnrollResponse {
    let assignment = Assignment {
        uuid: device.id,
        overlay_ip: device.overlay_ip,
        server_overlay_ip: server.server_overlay_ip,
        overlay_network: server.overlay.to_string(),
        endpoint: server.endpoint.clone(),
        server_public_key: server.server_public_key,
        persistent_keepalive: floto_proto::defaults::PERSISTENT_KEEPALIVE_SECS,
        renew_after: renew_after(issued, device.cert_expires_at),
        expires_at: device.cert_expires_at,
    };
    EnrollResponse {
        wg_quick_config: assignment.wg_quick_config().render(None),
        assignment,
        certificate_pem,
        ca_pem: server.ca_pem.to_owned(),
    }
}

/// The WireGuard endpoint to give a device: the configured one, else the host the device
/// used to reach the API (`api_host`, else the address it connected to) with the
/// concentrator's port.
pub fn device_endpoint(
    configured: Option<&str>,
    api_host: Option<&str>,
    api_local_ip: IpAddr,
    wg_port: u16,
) -> String {
    if let Some(e) = configured {
        return e.to_owned();
    }
    match api_host {
        Some(host) if host.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{host}]:{wg_port}"),
        Some(host) => format!("{host}:{wg_port}"),
        None => format!("{api_local_ip}:{wg_port}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
}
