//! `POST /v1/enroll` and `POST /v1/renew`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{DeviceId, WgKey};

/// Body of `POST /v1/enroll` (with `Authorization: Bearer <provisioning key>`).
///
/// Fields are strings on the wire and validated by the server, so that a malformed
/// value gets a message naming the field rather than a generic JSON error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The device's UUID; the server makes one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// PKCS#10 CSR, PEM, signed by the device's ECDSA P-256 key.
    pub csr_pem: String,
    /// The device's WireGuard public key, base64.
    pub wg_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Body of `POST /v1/renew` (over mTLS with the device's current certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A CSR for the new certificate; it may carry a new key.
    pub csr_pem: String,
    /// A new WireGuard public key, when the device rotates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
}

/// Response to enrollment (201 new device, 200 re-enrollment) and to renewal (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub uuid: DeviceId,
    /// The device's leaf certificate, PEM.
    pub certificate_pem: String,
    /// The CA that signs device certificates (and the server's TLS certificate), PEM.
    pub ca_pem: String,
    /// The device's overlay address, without prefix length.
    pub overlay_ip: Ipv4Addr,
    pub server_overlay_ip: Ipv4Addr,
    /// The overlay network, CIDR (the `AllowedIPs` a device routes to the server).
    pub overlay_network: String,
    /// The server's WireGuard endpoint, `HOST:PORT`.
    pub endpoint: String,
    pub server_public_key: WgKey,
    /// Seconds between keepalives the device should send.
    pub persistent_keepalive: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub renew_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// A wg-quick config with every line but `PrivateKey`, which only the device has.
    pub wg_quick_config: String,
}
