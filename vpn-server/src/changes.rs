//! The one applier: a committed registry change reaches the running server here and only
//! here. Enrollment, renewal and revocation handlers (and, in a cluster, the change feed
//! from other nodes) commit to the registry and hand the [`Change`] it returns to
//! [`Applier::apply`], which brings the concentrator, the broker and the set of revoked
//! certificates in line with it.
//!
//! Revocation is final: once a device's revocation is applied, a change that would serve
//! the device again (a renewal or re-enrollment committed just before the revocation and
//! applied just after it) is ignored, so a revoked peer never comes back.

use std::sync::Arc;

use dashmap::DashSet;
use tracing::{debug, info_span};

use floto_proto::DeviceId;
use floto_registry::{Change, Device};

use crate::broker::Broker;
use crate::identify::RevokedSerials;
use crate::wg::{Concentrator, PeerConfig};

/// What applying a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Broker sessions closed because of it.
    pub sessions_closed: usize,
}

/// Applies committed registry changes to the running parts of the server.
pub struct Applier {
    wg: Arc<Concentrator>,
    broker: Arc<Broker>,
    revoked: Arc<RevokedSerials>,
    /// Devices whose revocation has been applied.
    revoked_devices: DashSet<DeviceId>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("revoked_devices", &self.revoked_devices.len())
            .finish_non_exhaustive()
    }
}

/// What the concentrator needs of a registry row.
pub fn peer_config(device: &Device) -> PeerConfig {
    PeerConfig {
        id: device.id,
        fleet: Arc::from(device.fleet.as_str()),
        public_key: device.wg_public_key,
        overlay_ip: device.overlay_ip,
    }
}

impl Applier {
    pub fn new(wg: Arc<Concentrator>, broker: Arc<Broker>, revoked: Arc<RevokedSerials>) -> Self {
        Self {
            wg,
            broker,
            revoked,
            revoked_devices: DashSet::new(),
        }
    }

    /// Brings the running server in line with one committed change.
    pub fn apply(&self, change: &Change) -> Applied {
        match change {
            Change::DeviceUpdated {
                device,
                previous_wg_key,
            } => {
                let _span = info_span!("device", device = %device.id).entered();
                if device.is_revoked() || self.revoked_devices.contains(&device.id) {
                    debug!("change for a revoked device ignored");
                    return Applied::default();
                }
                if let Some(old) = previous_wg_key {
                    debug!(old = %old, new = %device.wg_public_key, "WireGuard key rotated");
                }
                self.wg.upsert_peer(peer_config(device));
                Applied::default()
            }
            Change::DeviceRevoked(revocation) => {
                let id = revocation.device.id;
                let _span = info_span!("device", device = %id).entered();
                self.revoked_devices.insert(id);
                self.wg.remove_peer(&id);
                self.revoke_serials(&revocation.serials);
                let sessions_closed = self.broker.close_device(&id);
                debug!(sessions_closed, "device revocation applied");
                Applied { sessions_closed }
            }
            Change::OperatorRevoked(revocation) => {
                self.revoke_serials(&revocation.serials);
                let sessions_closed = self.broker.close_operator(&revocation.operator.name);
                debug!(operator = %revocation.operator.name, sessions_closed, "operator revocation applied");
                Applied { sessions_closed }
            }
        }
    }

    /// Certificates the registry holds as revoked (at start).
    pub fn revoke_serials(&self, serials: &[String]) {
        for serial in serials {
            self.revoked.insert(serial.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use floto_proto::WgKey;
    use floto_registry::sqlite::SqliteRegistry;
    use floto_registry::{DeviceRevocation, Registry};
    use time::OffsetDateTime;

    use super::*;
    use crate::audit::Auditor;
    use crate::broker::BrokerDeps;
    use crate::events::{EventHub, WallClock};
    use crate::metrics::Metrics;
    use crate::netstack::Netstack;
    use crate::wg::PeerTable;

    fn device(n: u8) -> Device {
        let now = OffsetDateTime::now_utc();
        Device {
            id: DeviceId::new_random(),
            fleet: "lab".into(),
            wg_public_key: WgKey([n; 32]),
            overlay_ip: Ipv4Addr::new(10, 240, 0, 10 + n),
            cert_serial: format!("{n:02x}"),
            cert_public_key: vec![n],
            cert_expires_at: now,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            key_id: None,
            device_type: None,
            hostname: None,
            last_endpoint: None,
            last_seen: None,
        }
    }

    /// A renewal committed just before a revocation but applied just after it must not
    /// bring the revoked peer back.
    #[tokio::test]
    async fn a_late_renewal_never_brings_a_revoked_device_back() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = "10.240.0.0/16".parse().unwrap();
        let registry: Arc<dyn Registry> = Arc::new(
            SqliteRegistry::open(&dir.path().join("db"), overlay)
                .await
                .unwrap(),
        );
        let clock = WallClock::new();
        let table = Arc::new(PeerTable::new(
            boringtun::x25519::StaticSecret::from([1u8; 32]),
            overlay,
            Ipv4Addr::new(10, 240, 0, 1),
            Duration::from_secs(85),
            100,
            1,
        ));
        let metrics = Arc::new(Metrics::new(table.clone()));
        let (wg, from_devices) = Concentrator::bind(
            "127.0.0.1:0".parse().unwrap(),
            1,
            table.clone(),
            Arc::new(EventHub::new(clock)),
            metrics.handshake_histogram(),
        )
        .unwrap();
        let wg = Arc::new(wg);
        let (netstack, _driver) =
            Netstack::new(Ipv4Addr::new(10, 240, 0, 1), 16, wg.clone(), from_devices);
        let broker = Arc::new(Broker::new(BrokerDeps {
            caps: crate::broker::SessionCaps {
                per_operator: 4,
                per_device: 4,
            },
            registry: registry.clone(),
            table: table.clone(),
            clock,
            netstack,
            metrics,
            audit: Auditor::new(registry),
        }));
        let revoked = Arc::new(RevokedSerials::default());
        let applier = Applier::new(wg, broker, revoked.clone());

        let d = device(1);
        let other = device(2);
        let renewal = Change::DeviceUpdated {
            device: Device {
                cert_serial: "99".into(),
                ..d.clone()
            },
            previous_wg_key: None,
        };
        applier.apply(&Change::DeviceUpdated {
            device: d.clone(),
            previous_wg_key: None,
        });
        applier.apply(&Change::DeviceUpdated {
            device: other.clone(),
            previous_wg_key: None,
        });
        assert_eq!(table.len(), 2);

        applier.apply(&Change::DeviceRevoked(DeviceRevocation {
            device: d.clone(),
            serials: vec!["01".into()],
        }));
        assert!(table.status(&d.id).is_none());
        assert!(revoked.contains("01"));

        applier.apply(&renewal);
        assert!(table.status(&d.id).is_none(), "the revoked peer came back");
        assert!(table.status(&other.id).is_some());
        assert_eq!(table.len(), 1);
    }
}
