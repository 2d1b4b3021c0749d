//! floto-proto: the wire types shared by the floto-connect server and its clients
//! (enrollment and renewal JSON, device and event views, admin requests, broker headers,
//! the wg-quick config text), with the validation of the identifiers they carry.
//! No I/O and no crypto: the server and the clients both depend on this crate so that no
//! type is written twice.

pub mod admin;
pub mod broker;
pub mod devices;
pub mod enroll;
pub mod error;
pub mod ids;
pub mod ssh;
pub mod timestamp;
pub mod wgconf;
pub mod wireguard;

pub use error::{ApiError, ErrorCode};
pub use ids::{DeviceId, IdError, WgKey};
pub use timestamp::rfc3339;

/// Default ports and paths: the contract of DESIGN.md, in one place.
pub mod defaults {
    /// WireGuard, UDP.
    pub const WG_PORT: u16 = 51820;
    /// HTTPS API (enrollment, REST, broker CONNECT) on TCP, and the QUIC broker on UDP.
    pub const API_PORT: u16 = 8443;
    /// Plain-HTTP metrics and health.
    pub const METRICS_PORT: u16 = 9090;
    /// Overlay network: 10.240.0.0 to 10.255.255.255, room for 1,048,573 devices (DESIGN.md:
    /// "large enough for a million devices").
    pub const OVERLAY: &str = "10.240.0.0/12";
    /// Server data directory.
    pub const DATA_DIR: &str = "./floto-data";
    /// Device state directory.
    pub const STATE_DIR: &str = "/var/lib/floto-tunnel";
    /// The keepalive interval devices use to hold their NAT mappings open, seconds.
    pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
    /// Default device certificate lifetime, seconds (30 days).
    pub const DEVICE_CERT_LIFETIME_SECS: u64 = 30 * 24 * 3600;
    /// How long open broker sessions may finish at SIGTERM.
    pub const SHUTDOWN_GRACE_SECS: u64 = 30;
}

/// API paths.
pub mod paths {
    pub const ENROLL: &str = "/v1/enroll";
    pub const RENEW: &str = "/v1/renew";
    pub const DEVICES: &str = "/v1/devices";
    pub const EVENTS: &str = "/v1/events";
    pub const CRL: &str = "/v1/crl";
    pub const CA: &str = "/v1/ca";
    pub const LOGIN: &str = "/v1/login";
    pub const LOGIN_RENEW: &str = "/v1/login/renew";
    pub const KEYS: &str = "/v1/keys";
    pub const OPERATORS: &str = "/v1/operators";
    pub const AUDIT: &str = "/v1/audit";
    pub const NODES: &str = "/v1/nodes";
    pub const SSH_USER_CERT: &str = "/v1/ssh/user-cert";
    pub const SSH_USER_CA: &str = "/v1/ssh/user-ca";
    pub const SSH_HOST_CA: &str = "/v1/ssh/host-ca";
    pub const SSH_DEVICE: &str = "/v1/ssh/device";
    /// WireGuard over TLS (an HTTP/1.1 upgrade to `floto-wg/1`).
    pub const WG: &str = "/v1/wg";
    pub const FLEETS: &str = "/v1/fleets";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";

    /// `/v1/devices/{uuid}`
    pub fn device(uuid: &crate::DeviceId) -> String {
        format!("{DEVICES}/{uuid}")
    }

    /// `/v1/devices/{uuid}/revoke`
    pub fn device_revoke(uuid: &crate::DeviceId) -> String {
        format!("{DEVICES}/{uuid}/revoke")
    }

    /// `/v1/keys/{id}/revoke`
    pub fn key_revoke(id: &str) -> String {
        format!("{KEYS}/{id}/revoke")
    }

    /// `/v1/operators/{name}/revoke`
    pub fn operator_revoke(name: &str) -> String {
        format!("{OPERATORS}/{name}/revoke")
    }
}
