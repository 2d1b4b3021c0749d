//! `POST /v1/enroll` and `POST /v1/renew`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::wgconf::WgQuickConfig;
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
    /// The public host keys of the device's sshd (OpenSSH lines), to get host certificates
    /// for; none when the agent does not manage sshd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_host_keys: Vec<String>,
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
    /// As in [`EnrollRequest::ssh_host_keys`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_host_keys: Vec<String>,
}

/// Response to enrollment (201 new device, 200 re-enrollment) and to renewal (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// Its fields are at the top level of the JSON, next to the ones below.
    #[serde(flatten)]
    pub assignment: Assignment,
    /// The device's leaf certificate, PEM.
    pub certificate_pem: String,
    /// The CA that signs device certificates (and the server's TLS certificate), PEM.
    pub ca_pem: String,
    /// A wg-quick config with every line but `PrivateKey`, which only the device has.
    pub wg_quick_config: String,
    /// Host certificates for the host keys the request carried, the user CA and the fleet's
    /// logins; absent when it carried none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<crate::ssh::DeviceSsh>,
}

/// What the server assigns a device at enrollment and renewal: its place in the overlay,
/// the server's WireGuard peer, and when its certificate is due for renewal and expires.
/// The device keeps it in its state dir (`floto-tunnel`'s `state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub uuid: DeviceId,
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
}

impl Assignment {
    /// The wg-quick config of this assignment (render it with or without the private key).
    pub fn wg_quick_config(&self) -> WgQuickConfig {
        WgQuickConfig {
            address: self.overlay_ip,
            allowed_ips: self.overlay_network.clone(),
            server_public_key: self.server_public_key,
            endpoint: self.endpoint.clone(),
            persistent_keepalive: self.persistent_keepalive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An enrollment response as servers wrote it before `Assignment` was split out, the
    /// fields of both at one level: clients must keep reading it, and servers keep writing it.
    const RESPONSE_JSON: &str = concat!(
        r#"{"uuid": "9b1d2c3e-4f5a-4b6c-8d7e-0f1a2b3c4d5e", "certificate_pem": "CERT","#,
        r#" "ca_pem": "CA", "overlay_ip": "10.9.0.2", "server_overlay_ip": "10.9.0.1","#,
        r#" "overlay_network": "10.9.0.0/24", "endpoint": "203.0.113.5:51820","#,
        r#" "server_public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","#,
        r#" "persistent_keepalive": 15, "renew_after": "2030-01-11T00:00:00Z","#,
        r#" "expires_at": "2030-01-31T00:00:00Z", "wg_quick_config": "[Interface]\n"}"#
    );

    #[test]
    fn response_json_is_flat() {
        let resp: EnrollResponse = serde_json::from_str(RESPONSE_JSON).unwrap();
        let a = &resp.assignment;
        assert_eq!(a.uuid.to_string(), "9b1d2c3e-4f5a-4b6c-8d7e-0f1a2b3c4d5e");
        assert_eq!(a.server_overlay_ip, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(a.server_public_key, WgKey([1; 32]));
        assert_eq!(a.persistent_keepalive, 15);
        assert_eq!(a.expires_at, time::macros::datetime!(2030-01-31 0:00 UTC));
        assert_eq!(
            (resp.certificate_pem.as_str(), resp.ca_pem.as_str()),
            ("CERT", "CA")
        );
        assert_eq!(resp.wg_quick_config, "[Interface]\n");
        let written = serde_json::to_value(&resp).unwrap();
        let before: serde_json::Value = serde_json::from_str(RESPONSE_JSON).unwrap();
        assert_eq!(written, before);
    }

    #[test]
    fn wg_quick_config_is_the_assignment() {
        let resp: EnrollResponse = serde_json::from_str(RESPONSE_JSON).unwrap();
        assert_eq!(
            resp.assignment.wg_quick_config(),
            WgQuickConfig {
                address: Ipv4Addr::new(10, 9, 0, 2),
                allowed_ips: "10.9.0.0/24".into(),
                server_public_key: WgKey([1; 32]),
                endpoint: "203.0.113.5:51820".into(),
                persistent_keepalive: 15,
            }
        );
    }
}
