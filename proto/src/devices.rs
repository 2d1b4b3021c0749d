//! Device views: `GET /v1/devices`, `GET /v1/devices/{uuid}`, and the events of
//! `GET /v1/events`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{DeviceId, WgKey};

/// One device as the API shows it: registry facts joined with live session state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub uuid: DeviceId,
    pub fleet: String,
    pub overlay_ip: Ipv4Addr,
    pub wg_public_key: WgKey,
    /// An authenticated packet arrived within the online window.
    pub online: bool,
    /// Start of the current online period.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub online_since: Option<OffsetDateTime>,
    /// Last authenticated packet.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_seen: Option<OffsetDateTime>,
    /// Last authenticated UDP source, `IP:PORT`.
    pub endpoint: Option<String>,
    /// Session generation: grows with every online/offline transition.
    pub generation: u64,
    /// Bytes of decapsulated payload from the device, this server run.
    pub rx_bytes: u64,
    /// Bytes of payload encapsulated to the device, this server run.
    pub tx_bytes: u64,
    /// Serial of the newest certificate, hex.
    pub cert_serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub cert_expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
    pub device_type: Option<String>,
    pub hostname: Option<String>,
    /// In a cluster: the node holding the device's session (absent on a single node, and
    /// for a device that is offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How the device's datagrams travel while it is online here: `udp`, or `tls`
    /// (WireGuard over TLS, for networks that block UDP; `endpoint` is then the TCP peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

impl DeviceInfo {
    /// The ONLINE column of device tables: `yes`, `no` or `revoked`.
    pub fn online_word(&self) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.online {
            "yes"
        } else {
            "no"
        }
    }
}

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceEventKind {
    Online,
    Offline,
    Revoked,
}

/// One server-sent event of `GET /v1/events`; the SSE `id:` is `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    /// Sequence number of the event on this server (in a cluster: in the whole cluster,
    /// the same on every node), for `Last-Event-ID`.
    pub seq: u64,
    pub uuid: DeviceId,
    pub fleet: String,
    pub kind: DeviceEventKind,
    /// Session generation of the device after this transition. A consumer keeps, per
    /// device, the event with the highest generation; a late event never undoes a newer one.
    /// In a cluster it is made from the session's epoch (twice its milliseconds, plus one
    /// when the session ended), so sessions on different nodes compare as the nodes'
    /// session rows do.
    pub generation: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub endpoint: Option<String>,
    /// In a cluster: the name of the node that held the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}
