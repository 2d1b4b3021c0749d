//! This server as one node of a cluster on PostgreSQL: it holds a lease, writes the
//! sessions of the devices it serves in batches, takes over the devices of nodes whose
//! lease ran out, and fences itself when it cannot renew its own lease.
//!
//! - **Lease**: renewed every [`LEASE_RENEW_EVERY`], valid for [`LEASE_TTL`] (about three
//!   missed renewals), on the database's clock. A node that has not renewed within
//!   [`LEASE_TTL`] fences itself: `/readyz` fails, the broker refuses new sessions and it
//!   stops claiming devices (its WireGuard sessions keep passing traffic). A node whose lease
//!   expired comes back under a new id, since others may have taken its devices.
//! - **Sessions**: a device online here is claimed with its session epoch (the wall-clock
//!   milliseconds its session came up), written when it changes and refreshed every third
//!   of the online window, in one statement per batch: never per keepalive. A device that
//!   went offline is released, by this node and epoch only.
//! - **Takeover**: the sessions of nodes whose lease expired are split between the live
//!   nodes by UUID, and each calls its share back at their last endpoints, as a restarted
//!   node does. WireGuard lets a device follow: the response is authenticated by the same
//!   server key. The node that takes a device over records the end of its old session.
//! - **Events**: this node's device events go to the database, and every node publishes
//!   the cluster's events in the database's order (see [`crate::events`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use floto_proto::DeviceId;
use floto_registry::cluster::{Cluster, SessionWrite};

use crate::broker::Broker;
use crate::events::{EventHub, WallClock, BUFFER};
use crate::metrics::Metrics;
use crate::wg::{Concentrator, PeerTable};

pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(2);
/// A lease lives this long after its last renewal: about three missed renewals.
pub const LEASE_TTL: Duration = Duration::from_secs(7);
const SESSIONS_EVERY: Duration = Duration::from_secs(1);
const TAKEOVER_EVERY: Duration = Duration::from_secs(1);
/// After this node was fenced, it takes no devices over for this long. When the database
/// was away, every node's lease ran out and every node comes back under a new id at about
/// the same time: each must first claim its own sessions again (within SESSIONS_EVERY), or
/// the first to look would take the others' devices as orphans (seen in
/// `postgres_restarted_under_the_nodes`, once in five runs of the suite).
const TAKEOVER_AFTER_FENCE: Duration = Duration::from_secs(3);
const COUNTS_EVERY: Duration = Duration::from_secs(5);
/// Claims written per statement.
const BATCH: usize = 5000;
/// Handshakes per second a node starts calling taken-over devices back at (then paced by
/// their answers, `wg::pacer`).
const TAKEOVER_RATE: u32 = 2000;
/// Nodes dead this long are forgotten, with their session rows.
const FORGET_NODES_AFTER: Duration = Duration::from_secs(3600);
/// How often the cluster's events are read without a wake-up (one may be lost while the
/// listener reconnects).
const EVENTS_POLL: Duration = Duration::from_secs(1);
/// Events read per query.
const EVENTS_BATCH: usize = 5000;
/// Events kept in the database (the newest), for readers that reconnect.
const EVENTS_KEPT: u64 = 4 * BUFFER as u64;
const EVENTS_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// This node.
pub struct Node {
    cluster: Arc<dyn Cluster>,
    name: String,
    address: String,
    /// Changes when the node comes back after losing its lease.
    id: Mutex<Arc<str>>,
    fenced: AtomicBool,
    /// Refuses new sessions while fenced.
    broker: Arc<Broker>,
    /// Live nodes and devices online in the cluster, as last read.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id())
            .field("name", &self.name)
            .field("fenced", &self.is_fenced())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Joins the cluster: takes a lease under a new id, or fails.
    pub async fn join(
        cluster: Arc<dyn Cluster>,
        name: String,
        address: String,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let node = Arc::new(Self {
            cluster,
            name,
            address,
            id: Mutex::new(new_id()),
            fenced: AtomicBool::new(false),
            broker,
            metrics,
        });
        let id = node.id();
        if !node
            .cluster
            .renew_lease(&id, &node.name, &node.address, LEASE_TTL)
            .await?
        {
            anyhow::bail!("node id {id} is already taken");
        }
        info!(node = %id, name = %node.name, "joined the cluster");
        Ok(node)
    }

    pub fn id(&self) -> Arc<str> {
        self.id.lock().clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True while the node cannot renew its lease: not ready, no new broker sessions, no
    /// claims.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn fence(&self, fenced: bool) -> bool {
        self.broker.set_fenced(fenced);
        self.fenced.swap(fenced, Ordering::SeqCst)
    }

    /// Runs the lease, session, takeover and count loops until `shutdown`; then gives the
    /// lease up, so the other nodes take this node's devices at once.
    pub async fn run(
        self: Arc<Self>,
        table: Arc<PeerTable>,
        wg: Arc<Concentrator>,
        events: Arc<EventHub>,
        online_window: Duration,
        shutdown: CancellationToken,
    ) {
        let clock = *events.clock();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().lease_loop(shutdown.clone()));
        tasks.spawn(self.clone().sessions_loop(
            table.clone(),
            wg.clone(),
            clock,
            online_window / 3,
            shutdown.clone(),
        ));
        tasks.spawn(self.clone().takeover_loop(
            wg,
            table.clone(),
            events.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(self.clone().counts_loop(online_window, shutdown.clone()));
        tasks.spawn(self.clone().events_loop(events.clone(), shutdown.clone()));
        while tasks.join_next().await.is_some() {}
        // The sessions this node still holds end with it: say so, as a takeover would.
        let now = OffsetDateTime::now_utc();
        for (device, since, _) in table.online_sessions() {
            if let Some(fleet) = table.fleet_of(&device) {
                events.queue_ended(
                    device,
                    &fleet,
                    clock.epoch_ms(since),
                    Some(self.name.clone()),
                    now,
                );
            }
        }
        let (last, _) = events.take_outgoing();
        if let Err(e) =
            tokio::time::timeout(Duration::from_secs(2), self.cluster.append_events(&last))
                .await
                .unwrap_or_else(|_| {
                    Err(floto_registry::StoreError::Inconsistent("timed out".into()))
                })
        {
            warn!(error = %e, events = last.len(), "could not write the last device events");
        }
        if let Err(e) = self.cluster.end_lease(&self.id()).await {
            warn!(error = %e, "could not give up the lease; the other nodes take over when it runs out");
        }
    }

    /// At start: of the devices with a last known endpoint, those no live node holds and
    /// that fall to this node (split by UUID between the live nodes, as a takeover is), to be
    /// called back as a restarted single node calls back its devices. (After
    /// `migrate-registry`, and after the whole cluster was down, no device has a session.)
    pub async fn share_to_call_back(
        &self,
        candidates: Vec<(DeviceId, SocketAddr)>,
        online_window: Duration,
    ) -> anyhow::Result<Vec<(DeviceId, SocketAddr)>> {
        // Other nodes started just before this one may be calling devices back now: let
        // their claims land first, so that a device is not called away from them.
        let others = self
            .cluster
            .nodes()
            .await?
            .iter()
            .filter(|n| n.alive)
            .count()
            > 1;
        if others {
            tokio::time::sleep(2 * SESSIONS_EVERY + Duration::from_millis(500)).await;
        }
        let held: HashSet<DeviceId> = self
            .cluster
            .online_sessions(online_window)
            .await?
            .into_iter()
            .map(|s| s.device)
            .collect();
        let mut live: Vec<String> = self
            .cluster
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.alive)
            .map(|n| n.id)
            .collect();
        live.sort();
        let id = self.id();
        let Some(me) = live.iter().position(|n| **n == *id) else {
            return Ok(Vec::new());
        };
        Ok(candidates
            .into_iter()
            .filter(|(d, _)| !held.contains(d) && owner(d, live.len()) == me)
            .collect())
    }

    async fn lease_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_renewed = Instant::now();
        let mut tick = tokio::time::interval(LEASE_RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let id = self.id();
            // A database that does not answer is a failed renewal, not a wait: a partition
            // must fence the node within its lease.
            let renewed = tokio::time::timeout(
                LEASE_RENEW_EVERY,
                self.cluster
                    .renew_lease(&id, &self.name, &self.address, LEASE_TTL),
            )
            .await
            .unwrap_or_else(|_| {
                Err(floto_registry::StoreError::Inconsistent(
                    "the database did not answer within the renewal interval".into(),
                ))
            });
            match renewed {
                Ok(true) => {
                    last_renewed = Instant::now();
                    if self.fence(false) {
                        info!(node = %id, "lease renewed: serving again");
                    }
                }
                Ok(false) => {
                    // Our lease ran out while we could not reach the database; other nodes
                    // may hold our devices now. Come back as a new node.
                    let fresh = new_id();
                    warn!(old = %id, new = %fresh, "the lease had expired; rejoining under a new id");
                    *self.id.lock() = fresh;
                }
                Err(e) => {
                    if last_renewed.elapsed() >= LEASE_TTL && !self.fence(true) {
                        error!(node = %id, error = %e, "cannot renew the lease: fenced (not ready, no new broker sessions, no claims)");
                    } else if !self.is_fenced() {
                        warn!(node = %id, error = %e, "cannot renew the lease; retrying");
                    }
                }
            }
            // Fenced also when the renewals succeed too late to be trusted.
            if last_renewed.elapsed() >= LEASE_TTL && !self.fence(true) {
                error!(node = %self.id(), "lease not renewed in time: fenced");
            }
        }
    }

    async fn sessions_loop(
        self: Arc<Self>,
        table: Arc<PeerTable>,
        wg: Arc<Concentrator>,
        clock: WallClock,
        refresh: Duration,
        shutdown: CancellationToken,
    ) {
        // What this node wrote: epoch and when.
        let mut written: HashMap<DeviceId, (i64, Instant)> = HashMap::new();
        let mut written_as: Arc<str> = self.id();
        let mut failing = false;
        let mut tick = tokio::time::interval(SESSIONS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if self.is_fenced() {
                continue;
            }
            let id = self.id();
            if id != written_as {
                // A new id: every session is claimed again under it.
                written.clear();
                written_as = id.clone();
            }
            let now = Instant::now();
            let online = table.online_sessions();
            let mut batch = Vec::new();
            let mut seen = HashSet::with_capacity(online.len());
            for (device, since, endpoint) in online {
                let epoch = clock.epoch_ms(since);
                seen.insert(device);
                let stale = match written.get(&device) {
                    Some((e, at)) => *e != epoch || now.duration_since(*at) >= refresh,
                    None => true,
                };
                if stale {
                    batch.push(SessionWrite::Claim {
                        device,
                        epoch,
                        endpoint,
                    });
                }
            }
            for (device, (epoch, _)) in &written {
                if !seen.contains(device) {
                    batch.push(SessionWrite::Release {
                        device: *device,
                        epoch: *epoch,
                    });
                }
            }
            for chunk in batch.chunks(BATCH) {
                match self.cluster.write_sessions(&id, chunk).await {
                    Ok(rejected) => {
                        if std::mem::take(&mut failing) {
                            info!("writing device sessions again");
                        }
                        for w in chunk {
                            match w {
                                SessionWrite::Claim { device, epoch, .. } => {
                                    written.insert(*device, (*epoch, now));
                                }
                                SessionWrite::Release { device, .. } => {
                                    written.remove(device);
                                }
                            }
                        }
                        // Held by another node with a newer session: one holder only.
                        for device in rejected {
                            written.remove(&device);
                            if wg.release_peer(&device) {
                                info!(%device, "another node holds a newer session of this device; letting ours go");
                            }
                        }
                    }
                    Err(e) => {
                        // Once per failure spell, not every second.
                        if !std::mem::replace(&mut failing, true) {
                            warn!(error = %e, "cannot write device sessions; retrying");
                        }
                        break;
                    }
                }
            }
        }
        // A clean stop releases what this node held.
        let releases: Vec<SessionWrite> = written
            .iter()
            .map(|(device, (epoch, _))| SessionWrite::Release {
                device: *device,
                epoch: *epoch,
            })
            .collect();
        for chunk in releases.chunks(BATCH) {
            let _ = self.cluster.write_sessions(&written_as, chunk).await;
        }
    }

    async fn takeover_loop(
        self: Arc<Self>,
        wg: Arc<Concentrator>,
        table: Arc<PeerTable>,
        events: Arc<EventHub>,
        shutdown: CancellationToken,
    ) {
        // Called back already: device, node and epoch of the orphaned session.
        let mut called: HashSet<(DeviceId, String, i64)> = HashSet::new();
        let mut tick = tokio::time::interval(TAKEOVER_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut forgotten_at = Instant::now();
        // When this node was last seen fenced (see TAKEOVER_AFTER_FENCE).
        let mut fenced_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.is_fenced() {
                fenced_at = Some(Instant::now());
                continue;
            }
            if fenced_at.is_some_and(|at| at.elapsed() < TAKEOVER_AFTER_FENCE) {
                continue;
            }
            let orphans = match self.cluster.orphaned_sessions().await {
                Ok(o) => o,
                Err(e) => {
                    warn!(error = %e, "cannot read orphaned sessions");
                    continue;
                }
            };
            if orphans.is_empty() {
                called.clear();
            } else if let Ok(nodes) = self.cluster.nodes().await {
                let mut live: Vec<String> = nodes
                    .into_iter()
                    .filter(|n| n.alive)
                    .map(|n| n.id)
                    .collect();
                live.sort();
                let id = self.id();
                if let Some(me) = live.iter().position(|n| **n == *id) {
                    let now = OffsetDateTime::now_utc();
                    let share: Vec<(DeviceId, SocketAddr)> = orphans
                        .into_iter()
                        .filter(|s| owner(&s.device, live.len()) == me)
                        .filter(|s| called.insert((s.device, s.node.clone(), s.epoch)))
                        .inspect(|s| {
                            // The old session ended with its node.
                            if let Some(fleet) = table.fleet_of(&s.device) {
                                let node = s.node_name.clone().or(Some(s.node.clone()));
                                events.queue_ended(s.device, &fleet, s.epoch, node, now);
                            }
                        })
                        .filter_map(|s| Some((s.device, s.endpoint?)))
                        .collect();
                    if !share.is_empty() {
                        info!(
                            devices = share.len(),
                            "taking over the devices of a node whose lease expired"
                        );
                        let wg = wg.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            wg.call_back(share, TAKEOVER_RATE, shutdown).await;
                        });
                    }
                }
            }
            if forgotten_at.elapsed() >= FORGET_NODES_AFTER / 4 {
                forgotten_at = Instant::now();
                if let Err(e) = self.cluster.prune_nodes(FORGET_NODES_AFTER).await {
                    warn!(error = %e, "cannot prune dead nodes");
                }
            }
        }
    }

    /// Writes this node's device events and publishes the cluster's, in the database's
    /// order, starting with the newest [`BUFFER`] for readers that reconnect.
    async fn events_loop(self: Arc<Self>, hub: Arc<EventHub>, shutdown: CancellationToken) {
        let mut last: Option<u64> = None;
        let mut failing = false;
        let mut pruned_at = Instant::now();
        loop {
            if last.is_none() {
                match self.cluster.last_event().await {
                    Ok(n) => last = Some(n.saturating_sub(BUFFER as u64)),
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            warn!(error = %e, "cannot read the cluster's events; retrying");
                        }
                    }
                }
            }
            let (out, dropped) = hub.take_outgoing();
            if dropped > 0 {
                error!(
                    dropped,
                    "device events were dropped while the database did not answer"
                );
            }
            if !out.is_empty() {
                if let Err(e) = self.cluster.append_events(&out).await {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(error = %e, "cannot write device events; retrying");
                    }
                    hub.return_outgoing(out);
                }
            }
            if let Some(mut after) = last {
                loop {
                    match self.cluster.events_after(after, EVENTS_BATCH).await {
                        Ok(batch) => {
                            let full = batch.len() == EVENTS_BATCH;
                            for e in batch {
                                after = e.seq;
                                hub.publish_numbered(e);
                            }
                            last = Some(after);
                            if std::mem::take(&mut failing) {
                                info!("device events flow again");
                            }
                            if !full {
                                break;
                            }
                        }
                        Err(e) => {
                            if !std::mem::replace(&mut failing, true) {
                                warn!(error = %e, "cannot read the cluster's events; retrying");
                            }
                            break;
                        }
                    }
                }
            }
            if pruned_at.elapsed() >= EVENTS_PRUNE_EVERY {
                pruned_at = Instant::now();
                if let Err(e) = self.cluster.prune_events(EVENTS_KEPT).await {
                    warn!(error = %e, "cannot prune old device events");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hub.outgoing_ready() => {
                    // Let a burst (a storm's sessions) gather into one write.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ = self.cluster.wait_for_events(EVENTS_POLL) => {}
            }
        }
    }

    async fn counts_loop(self: Arc<Self>, online_window: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(COUNTS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Ok((nodes, online)) = self.cluster.counts(online_window).await {
                self.metrics.cluster_counts(nodes, online);
            }
        }
    }
}

fn new_id() -> Arc<str> {
    Arc::from(DeviceId::new_random().to_string())
}

/// Which of `nodes` live nodes (sorted by id) takes over `device`.
fn owner(device: &DeviceId, nodes: usize) -> usize {
    let n = device.as_uuid().as_u128();
    (n % nodes.max(1) as u128) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_split_between_the_live_nodes() {
        let mut share = [0usize; 3];
        for _ in 0..3000 {
            share[owner(&DeviceId::new_random(), 3)] += 1;
        }
        assert!(share.iter().all(|&n| n > 800), "{share:?}");
        let d = DeviceId::new_random();
        assert_eq!(owner(&d, 1), 0);
        assert_eq!(owner(&d, 3), owner(&d, 3), "the same answer on every node");
    }
}
