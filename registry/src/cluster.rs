//! What the nodes of a cluster share besides the registry: node leases and device
//! sessions. A node holds a lease it renews every few seconds; a device's session row names
//! the node holding it and the session's epoch. A device is online when its session row is
//! fresh *and* the lease of the node named in it is alive, so a dead node's devices turn
//! offline by themselves when its lease runs out: no reaper is needed for correctness.
//!
//! Writes are conditional so that late events never undo newer ones: a claim replaces a
//! row only with a newer epoch (or refreshes the same node's same epoch), a release deletes
//! only the row of that node and epoch.
//!
//! Leases and freshness are measured on the database's clock, never a node's, so nodes
//! whose clocks disagree still agree on who is alive.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use floto_proto::devices::DeviceEvent;
use floto_proto::DeviceId;

use crate::StoreError;

/// One node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Unique per process start: a restarted node is a new node.
    pub id: String,
    /// A name for people (host name by default).
    pub name: String,
    /// Where other nodes reach it (node-to-node traffic).
    pub address: String,
    pub started_at: OffsetDateTime,
    /// On the database's clock.
    pub lease_expires_at: OffsetDateTime,
    /// Whether the lease was alive when read.
    pub alive: bool,
    /// Devices whose session row names this node (fresh or not).
    pub sessions: u64,
}

/// A node's claim of a device, or its release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionWrite {
    /// The device is online here with this epoch (new, or refreshed).
    Claim {
        device: DeviceId,
        epoch: i64,
        endpoint: Option<SocketAddr>,
    },
    /// The device's session of this epoch here ended.
    Release { device: DeviceId, epoch: i64 },
}

/// One device's session row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub device: DeviceId,
    pub node: String,
    /// The holding node's name and address, while the node is known.
    pub node_name: Option<String>,
    pub node_address: Option<String>,
    pub epoch: i64,
    pub endpoint: Option<SocketAddr>,
    /// When the holding node last wrote the row (the database's clock).
    pub refreshed_at: OffsetDateTime,
}

/// Leases and sessions of a cluster.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// Registers or renews the lease of the node with `id` for `ttl`. Returns false
    /// (changing nothing) when that lease has already expired: a node that lost its lease
    /// must not come back under the same id, since other nodes may have taken its devices.
    async fn renew_lease(
        &self,
        id: &str,
        name: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Gives up a node's lease at once (a clean shutdown), so that others need not wait
    /// for it to run out.
    async fn end_lease(&self, id: &str) -> Result<(), StoreError>;
    /// Every node with its session count, live or not (expired ones until pruned).
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Applies a batch of claims and releases by node `id`. Returns the devices whose claim
    /// did not take: another live node holds them with a newer session, and node `id` must
    /// let its own go.
    async fn write_sessions(
        &self,
        id: &str,
        batch: &[SessionWrite],
    ) -> Result<Vec<DeviceId>, StoreError>;
    /// Sessions whose node's lease is alive and whose row was written within `fresh`.
    async fn online_sessions(&self, fresh: Duration) -> Result<Vec<SessionRecord>, StoreError>;
    /// One device's session, if it is online in the cluster's eyes.
    async fn online_session(
        &self,
        device: &DeviceId,
        fresh: Duration,
    ) -> Result<Option<SessionRecord>, StoreError>;
    /// Live nodes, and devices online in the whole cluster (as [`Cluster::online_sessions`]
    /// counts them), in one read.
    async fn counts(&self, fresh: Duration) -> Result<(u64, u64), StoreError>;
    /// Sessions held by nodes whose lease has expired: the devices to take over.
    async fn orphaned_sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;
    /// Deletes nodes whose lease expired more than `after` ago, with their session rows.
    async fn prune_nodes(&self, after: Duration) -> Result<u64, StoreError>;

    /// Appends device events to the cluster's stream, numbering them (their `seq` is
    /// ignored). Events become visible in the order of their numbers.
    async fn append_events(&self, events: &[DeviceEvent]) -> Result<(), StoreError>;
    /// Up to `limit` events numbered above `after`, in order.
    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<DeviceEvent>, StoreError>;
    /// The number of the last event (0 when there is none).
    async fn last_event(&self) -> Result<u64, StoreError>;
    /// Completes when another node may have appended events, or after `timeout`.
    async fn wait_for_events(&self, timeout: Duration);
    /// Deletes all but the last `keep` events.
    async fn prune_events(&self, keep: u64) -> Result<u64, StoreError>;
}
