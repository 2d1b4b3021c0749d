//! `GET /v1/devices` and `GET /v1/devices/{uuid}`: registry facts joined with the live
//! session table.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;

use floto_proto::devices::DeviceInfo;
use floto_registry::cluster::SessionRecord;
use floto_registry::{Device, OperatorInfo};

use super::{parse_uuid, unknown_device, AppState, Caller, Failure};
use crate::authz::Action;
use crate::events::WallClock;
use crate::wg::PeerStatus;

/// Joins a registry row with its live status here (absent when the server is not running
/// or the device is revoked) and, in a cluster, its session on another node.
pub fn device_info(
    d: &Device,
    live: Option<&PeerStatus>,
    clock: &WallClock,
    here: Option<&str>,
    elsewhere: Option<&SessionRecord>,
) -> DeviceInfo {
    let held_here = live.is_some_and(|s| s.online);
    let (online, online_since, last_seen, endpoint, generation, rx, tx) = match (live, elsewhere) {
        (Some(s), _) if s.online => (
            s.online,
            s.online_since.map(|t| clock.wall(t)),
            s.last_seen.map(|t| clock.wall(t)).or(d.last_seen),
            s.endpoint.or(d.last_endpoint),
            s.generation,
            s.rx_bytes,
            s.tx_bytes,
        ),
        (_, Some(e)) if d.revoked_at.is_none() => (
            true,
            None,
            Some(e.refreshed_at),
            e.endpoint.or(d.last_endpoint),
            0,
            0,
            0,
        ),
        (Some(s), _) => (
            s.online,
            s.online_since.map(|t| clock.wall(t)),
            s.last_seen.map(|t| clock.wall(t)).or(d.last_seen),
            s.endpoint.or(d.last_endpoint),
            s.generation,
            s.rx_bytes,
            s.tx_bytes,
        ),
        (None, _) => (false, None, d.last_seen, d.last_endpoint, 0, 0, 0),
    };
    let node = if held_here {
        here.map(str::to_owned)
    } else if online {
        elsewhere.map(|e| e.node_name.clone().unwrap_or_else(|| e.node.clone()))
    } else {
        None
    };
    DeviceInfo {
        uuid: d.id,
        fleet: d.fleet.clone(),
        overlay_ip: d.overlay_ip,
        wg_public_key: d.wg_public_key,
        online,
        online_since,
        last_seen,
        endpoint: endpoint.map(|e| e.to_string()),
        generation,
        rx_bytes: rx,
        tx_bytes: tx,
        cert_serial: d.cert_serial.clone(),
        cert_expires_at: d.cert_expires_at,
        created_at: d.created_at,
        revoked_at: d.revoked_at,
        device_type: d.device_type.clone(),
        hostname: d.hostname.clone(),
        node,
        transport: None,
    }
}

/// May this operator see devices of `fleet`?
pub fn may_see(op: &OperatorInfo, fleet: &str) -> bool {
    crate::authz::allowed(op.role, &op.fleets, Action::ViewDevice, Some(fleet))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub online: Option<bool>,
    #[serde(default)]
    pub fleet: Option<String>,
}

/// `GET /v1/devices[?online=true][&fleet=F]`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(op): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<DeviceInfo>>, Failure> {
    let devices = state.store.devices().await?;
    let elsewhere = state.elsewhere(None).await;
    let out = devices
        .iter()
        .filter(|d| may_see(&op, &d.fleet))
        .filter(|d| q.fleet.as_ref().is_none_or(|f| *f == d.fleet))
        .map(|d| state.live_info(d, &elsewhere))
        .filter(|i| q.online.is_none_or(|want| i.online == want))
        .collect();
    Ok(Json(out))
}

/// `GET /v1/devices/{uuid}`
pub async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(uuid): Path<String>,
) -> Result<Json<DeviceInfo>, Failure> {
    let id = parse_uuid(&uuid)?;
    // A device outside the caller's fleets gets the same 404 as an unknown one: the caller
    // learns nothing of its existence or fleet.
    let device = state
        .store
        .device(&id)
        .await?
        .filter(|d| may_see(&caller.0, &d.fleet))
        .ok_or_else(|| unknown_device(&id))?;
    let elsewhere = state.elsewhere(Some(&device.id)).await;
    Ok(Json(state.live_info(&device, &elsewhere)))
}
