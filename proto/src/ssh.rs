//! SSH certificates: `POST /v1/ssh/user-cert` (an operator's short-lived user certificate
//! for one device), the CAs' public keys, and what a device is told about SSH at enrollment
//! and renewal.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The login operators get on a fleet with no setting of its own.
pub const DEFAULT_LOGIN: &str = "root";

/// The host name suffix devices' host certificates are valid for (`<uuid>.floto`).
pub const HOST_SUFFIX: &str = ".floto";

/// Body of `POST /v1/ssh/user-cert` (an operator's mTLS identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCertRequest {
    /// The operator's SSH public key, one OpenSSH line.
    pub public_key: String,
    /// The device the certificate is for (its fleet decides the logins).
    pub device: String,
    /// The logins wanted; empty for every login the operator may use there. Asking for one
    /// the operator may not use is refused (403), never silently dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
}

/// Response to `POST /v1/ssh/user-cert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCertResponse {
    /// The certificate, one OpenSSH line (what `ssh-keygen -s` writes to `*-cert.pub`).
    pub certificate: String,
    pub serial: u64,
    /// `floto:<operator>:<session>`: the device's sshd logs it.
    pub key_id: String,
    /// The logins it is valid for.
    pub principals: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub valid_before: OffsetDateTime,
    /// The host CA's public key line, for `@cert-authority *.floto ...`.
    pub host_ca: String,
    /// Whether the device holds host certificates (it sent its host keys at enrollment or
    /// renewal). A device that does not can only be trusted on first use.
    #[serde(default)]
    pub host_certified: bool,
}

/// What a device is told about SSH in its enrollment or renewal response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSsh {
    /// One host certificate per host key the device sent, in the same order (OpenSSH
    /// lines); valid for `<uuid>.floto` and `<uuid>`.
    pub host_certificates: Vec<String>,
    /// The user CA's public key line (sshd's `TrustedUserCAKeys`).
    pub user_ca: String,
    /// The logins operators may use on this device's fleet.
    pub logins: Vec<String>,
}

/// Response to `GET /v1/ssh/device` (a device's mTLS identity): what its sshd should accept
/// now. Agents ask every few minutes, so a change of its fleet's logins reaches the device
/// without waiting for a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSshPolicy {
    /// The user CA's public key line.
    pub user_ca: String,
    /// The logins operators may use on the device's fleet.
    pub logins: Vec<String>,
}

/// A fleet's settings, as `GET /v1/fleets` lists them and `PUT /v1/fleets/{name}` sets
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// Absent in a `PUT` body (the path names the fleet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The logins operators may use over SSH; `null` (in a `PUT`) goes back to the default
    /// ([`DEFAULT_LOGIN`]).
    pub ssh_logins: Option<Vec<String>>,
}
