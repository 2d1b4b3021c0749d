//! The one path from "the registry changed" to the running server. Every write a running
//! server must follow appends to the registry's change feed in its own transaction; the
//! [`Feed`] reads the feed in sequence order and hands each change to the [`Applier`],
//! which brings the concentrator, the broker and the set of revoked certificates in line
//! with it. A node's own writes and other nodes' writes take the same path: a handler that
//! has committed calls [`Feed::after_write`], which reads everything up to and including
//! its write; other nodes' writes arrive by [`Feed::follow`] (woken by the registry, and
//! reading at least every [`POLL_EVERY`] whatever the wake-ups say).
//!
//! Revocation is final: once a device's revocation is applied, a change that would serve
//! the device again (a renewal or re-enrollment committed just before the revocation and
//! applied just after it) is ignored, so a revoked peer never comes back.

use std::sync::Arc;

use std::time::Duration;

use dashmap::DashSet;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn};

use floto_proto::DeviceId;
use floto_registry::{Change, Device, DeviceRevocation, Feed as Page, Registry, StoreError};

use crate::broker::Broker;
use crate::identify::RevokedSerials;
use crate::wg::{Concentrator, PeerConfig};

/// What applying a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Broker sessions closed because of it.
    pub sessions_closed: usize,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, other: Self) {
        self.sessions_closed += other.sessions_closed;
    }
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

/// How often the feed is read even when no wake-up came (a lost NOTIFY, SQLite).
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Feed entries read per query.
const PAGE: u32 = 1024;
/// Feed entries older than this are pruned; a node away longer loads everything again.
const KEEP_CHANGES: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Follows the registry's change feed, applying each change once and in order.
pub struct Feed {
    registry: Arc<dyn Registry>,
    applier: Arc<Applier>,
    /// The sequence number of the last change applied; held while reading and applying, so
    /// changes are applied by one reader at a time and in order.
    applied: tokio::sync::Mutex<u64>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Feed {
    pub fn new(registry: Arc<dyn Registry>, applier: Arc<Applier>) -> Self {
        Self {
            registry,
            applier,
            applied: tokio::sync::Mutex::new(0),
        }
    }

    /// Loads the whole registry through the applier and continues the feed after what it
    /// held then. Returns the live devices with their last known endpoints, to call back.
    pub async fn load(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<(DeviceId, std::net::SocketAddr)>, StoreError> {
        let mut applied = self.applied.lock().await;
        self.load_locked(&mut applied, now).await
    }

    async fn load_locked(
        &self,
        applied: &mut u64,
        now: OffsetDateTime,
    ) -> Result<Vec<(DeviceId, std::net::SocketAddr)>, StoreError> {
        // Read first: a change committed during the load is read again afterwards, and
        // applying it twice brings the node to the same place.
        let start = self.registry.last_change().await?;
        let serials: Vec<String> = self
            .registry
            .revoked_certificates(now)
            .await?
            .into_iter()
            .map(|c| c.serial)
            .collect();
        self.applier.revoke_serials(&serials);
        let mut call_back = Vec::new();
        for device in self.registry.devices().await? {
            if let (false, Some(endpoint)) = (device.is_revoked(), device.last_endpoint) {
                call_back.push((device.id, endpoint));
            }
            let change = if device.is_revoked() {
                Change::DeviceRevoked(DeviceRevocation {
                    device,
                    serials: Vec::new(),
                })
            } else {
                Change::DeviceUpdated {
                    device,
                    previous_wg_key: None,
                }
            };
            self.applier.apply(&change);
        }
        *applied = start;
        Ok(call_back)
    }

    /// Applies every change committed so far that this node has not applied.
    pub async fn catch_up(&self) -> Result<Applied, StoreError> {
        let mut applied = self.applied.lock().await;
        let mut total = Applied::default();
        loop {
            match self.registry.changes_after(*applied, PAGE).await? {
                Page::Entries(entries) if entries.is_empty() => return Ok(total),
                Page::Entries(entries) => {
                    for entry in entries {
                        if let Some(change) = &entry.change {
                            total += self.applier.apply(change);
                        }
                        *applied = entry.seq;
                    }
                }
                Page::Pruned { .. } => {
                    warn!(
                        after = *applied,
                        "the change feed was pruned past this node; loading the registry again"
                    );
                    self.load_locked(&mut applied, OffsetDateTime::now_utc())
                        .await?;
                }
            }
        }
    }

    /// After a handler committed `own`: applies the feed up to and including it. If the
    /// feed cannot be read just now, `own` is applied directly (applying converges, and
    /// [`Feed::follow`] reads the feed again shortly), so the node never lags its own
    /// writes.
    pub async fn after_write(&self, own: &Change) -> Applied {
        match self.catch_up().await {
            Ok(applied) => applied,
            Err(e) => {
                warn!(error = %e, "cannot read the change feed; applying this node's write directly");
                self.applier.apply(own)
            }
        }
    }

    /// Reads the feed whenever the registry says another writer may have appended, and
    /// every [`POLL_EVERY`] regardless; prunes old entries now and then.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        let mut pruned_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.registry.wait_for_changes(POLL_EVERY) => {}
            }
            match self.catch_up().await {
                Ok(_) if failing => {
                    failing = false;
                    info!("reading the change feed again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "cannot read the change feed; retrying");
                }
                Err(_) => {}
            }
            if pruned_at.elapsed() >= PRUNE_EVERY {
                pruned_at = tokio::time::Instant::now();
                let before = OffsetDateTime::now_utc() - KEEP_CHANGES;
                match self.registry.prune_changes(before).await {
                    Ok(n) if n > 0 => debug!(pruned = n, "old change-feed entries pruned"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot prune the change feed"),
                }
            }
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

    /// An applier over a real concentrator, broker and revoked set, for `registry`.
    fn harness(registry: Arc<dyn Registry>) -> (Applier, Arc<PeerTable>, Arc<RevokedSerials>) {
        let overlay = "10.240.0.0/16".parse().unwrap();
        let clock = WallClock::new();
        let table = Arc::new(PeerTable::new(
            boringtun::x25519::StaticSecret::from([1u8; 32]),
            vec![overlay],
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
        let (netstack, _driver) = Netstack::new(&overlay.into(), wg.clone(), from_devices);
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
        (Applier::new(wg, broker, revoked.clone()), table, revoked)
    }

    async fn sqlite_registry(dir: &tempfile::TempDir) -> Arc<dyn Registry> {
        Arc::new(
            SqliteRegistry::open(
                &dir.path().join("db"),
                "10.240.0.0/16".parse::<ipnet::Ipv4Net>().unwrap(),
            )
            .await
            .unwrap(),
        )
    }

    /// A renewal committed just before a revocation but applied just after it must not
    /// bring the revoked peer back.
    #[tokio::test]
    async fn a_late_renewal_never_brings_a_revoked_device_back() {
        let dir = tempfile::tempdir().unwrap();
        let (applier, table, revoked) = harness(sqlite_registry(&dir).await);

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

    /// The feed applies what was committed, in order, whoever wrote it, and a reader behind
    /// pruned entries loads everything again.
    #[tokio::test]
    async fn the_feed_applies_writes_in_order_and_reloads_after_pruning() {
        use floto_proto::WgKey;
        use floto_registry::{EnrollCommit, NewKey};
        let dir = tempfile::tempdir().unwrap();
        let registry = sqlite_registry(&dir).await;
        let (applier, table, revoked) = harness(registry.clone());
        let feed = Feed::new(registry.clone(), Arc::new(applier));
        assert!(feed
            .load(OffsetDateTime::now_utc())
            .await
            .unwrap()
            .is_empty());
        let now = OffsetDateTime::now_utc();
        registry
            .create_key(NewKey {
                id: "k".into(),
                hash: [1; 32],
                fleet: "lab".into(),
                uses: None,
                expires_at: None,
                created_at: now,
            })
            .await
            .unwrap();
        let mut ids = Vec::new();
        for wg in 1..=3u8 {
            let id = DeviceId::new_random();
            registry
                .enroll(EnrollCommit {
                    key_hash: [1; 32],
                    device: id,
                    wg_public_key: WgKey([wg; 32]),
                    cert_serial: format!("{wg:02x}"),
                    cert_public_key: vec![wg],
                    cert_expires_at: now + Duration::from_secs(3600),
                    device_type: None,
                    hostname: None,
                    now,
                    reuse_addresses_revoked_before: now,
                })
                .await
                .unwrap()
                .unwrap();
            ids.push(id);
        }
        // Written by "another node": nothing is applied until the feed is read.
        assert_eq!(table.len(), 0);
        feed.catch_up().await.unwrap();
        assert_eq!(table.len(), 3);
        registry.revoke_device(&ids[0], now).await.unwrap().unwrap();
        feed.catch_up().await.unwrap();
        assert!(table.status(&ids[0]).is_none(), "the revoked peer is gone");
        assert!(revoked.contains("01"), "and its certificate is refused");
        // A reader that fell behind pruned entries loads the registry again.
        registry
            .prune_changes(now + Duration::from_secs(3600))
            .await
            .unwrap();
        let (fresh, fresh_table, _) = harness(registry.clone());
        let late = Feed::new(registry.clone(), Arc::new(fresh));
        late.catch_up().await.unwrap();
        assert_eq!(fresh_table.len(), 2, "the live devices, from the reload");
        assert!(fresh_table.status(&ids[0]).is_none());
    }
}
