//! Device online/offline events: numbered, kept in a bounded buffer for clients that
//! reconnect with `Last-Event-ID`, and broadcast to live subscribers.
//!
//! On one node the hub numbers its own events. In a cluster, every node's events go to the
//! database first ([`EventHub::take_outgoing`]) and come back numbered with everybody
//! else's ([`EventHub::publish_numbered`], fed by `cluster::Node`), so the stream, its
//! numbers and `Last-Event-ID` are the same on every node. Generations are then made from
//! the session's epoch, which orders sessions on different nodes as their session rows do.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tracing::debug;

use floto_proto::devices::{DeviceEvent, DeviceEventKind};
use floto_proto::DeviceId;

use crate::wg::{PeerEvent, PeerEventSink};

/// Events kept for late readers.
pub const BUFFER: usize = 16_384;
/// In a cluster: events waiting to be written, at most (the oldest are dropped beyond it,
/// while the database does not answer).
const OUTGOING_MAX: usize = 200_000;

/// Maps the monotonic clock the data plane uses to wall-clock time for the API.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    start: Instant,
    start_wall: OffsetDateTime,
}

impl WallClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            start_wall: OffsetDateTime::now_utc(),
        }
    }

    pub fn wall(&self, t: Instant) -> OffsetDateTime {
        match t.checked_duration_since(self.start) {
            Some(d) => self.start_wall + d,
            None => self.start_wall - self.start.duration_since(t),
        }
    }

    /// A session's epoch: when it came up, in wall-clock milliseconds. Cluster nodes order
    /// the sessions of one device by it.
    pub fn epoch_ms(&self, since: Instant) -> i64 {
        i64::try_from(self.wall(since).unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }
}

/// How an event shows where a device is: its address, or `tls` for a WireGuard over TLS
/// stream (whose endpoint address is one of our own).
fn endpoint_text(e: &std::net::SocketAddr) -> String {
    if crate::wg::streams::is_stream(e) {
        "tls".to_owned()
    } else {
        e.to_string()
    }
}

/// A cluster event's generation: twice the session's epoch, plus one when it ended, so a
/// newer session on any node outranks the end of an older one.
pub fn cluster_generation(epoch_ms: i64, ended: bool) -> u64 {
    (epoch_ms.max(0) as u64).saturating_mul(2) + u64::from(ended)
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The event hub.
#[derive(Debug)]
pub struct EventHub {
    clock: WallClock,
    inner: Mutex<Inner>,
    live: broadcast::Sender<DeviceEvent>,
    /// Woken when a device gets a new endpoint (online, roamed), so it is persisted soon.
    endpoints_changed: tokio::sync::Notify,
    /// In a cluster: this node's events on their way to the database.
    outgoing: Option<Outgoing>,
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    buffer: VecDeque<DeviceEvent>,
}

#[derive(Debug)]
struct Outgoing {
    node: String,
    pending: Mutex<Pending>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<DeviceEvent>,
    /// The epoch of each session online here, for the generation of its end.
    epochs: HashMap<DeviceId, i64>,
    dropped: u64,
}

impl EventHub {
    /// Sequence numbers start at the server's start time in microseconds, so they keep
    /// growing across restarts and a reader's `Last-Event-ID` stays meaningful.
    pub fn new(clock: WallClock) -> Self {
        let first = (clock.start_wall.unix_timestamp_nanos() / 1000).max(1) as u64;
        Self {
            clock,
            inner: Mutex::new(Inner {
                next_seq: first,
                buffer: VecDeque::with_capacity(1024),
            }),
            live: broadcast::channel(4096).0,
            endpoints_changed: tokio::sync::Notify::new(),
            outgoing: None,
        }
    }

    /// The hub of cluster node `node`: its events are numbered by the database.
    pub fn for_cluster(clock: WallClock, node: String) -> Self {
        Self {
            outgoing: Some(Outgoing {
                node,
                pending: Mutex::new(Pending::default()),
                ready: tokio::sync::Notify::new(),
            }),
            ..Self::new(clock)
        }
    }

    /// In a cluster: completes when events wait to be written (at once if some were
    /// queued since the last call); never on one node.
    pub async fn outgoing_ready(&self) {
        match &self.outgoing {
            Some(o) => o.ready.notified().await,
            None => std::future::pending().await,
        }
    }

    /// In a cluster: the events waiting to be written, oldest first, and how many were
    /// dropped since the last call because too many waited.
    pub fn take_outgoing(&self) -> (Vec<DeviceEvent>, u64) {
        let Some(o) = &self.outgoing else {
            return (Vec::new(), 0);
        };
        let mut p = o.pending.lock();
        (p.events.drain(..).collect(), std::mem::take(&mut p.dropped))
    }

    /// Puts back events that could not be written, ahead of any queued since.
    pub fn return_outgoing(&self, events: Vec<DeviceEvent>) {
        if let Some(o) = &self.outgoing {
            let mut p = o.pending.lock();
            for e in events.into_iter().rev() {
                p.events.push_front(e);
            }
            p.trim();
        }
    }

    /// In a cluster: queues the end of a session this node did not hold (a dead node's
    /// device, taken over), with the generation of that session's end.
    pub fn queue_ended(
        &self,
        uuid: DeviceId,
        fleet: &str,
        epoch_ms: i64,
        node: Option<String>,
        at: OffsetDateTime,
    ) {
        if let Some(o) = &self.outgoing {
            o.pending.lock().push(DeviceEvent {
                seq: 0,
                uuid,
                fleet: fleet.to_owned(),
                kind: DeviceEventKind::Offline,
                generation: cluster_generation(epoch_ms, true),
                at,
                endpoint: None,
                node,
            });
            o.ready.notify_one();
        }
    }

    /// Publishes an event the database numbered (in a cluster), once: an event at or below
    /// the last published number is ignored.
    pub fn publish_numbered(&self, event: DeviceEvent) {
        let mut inner = self.inner.lock();
        if inner
            .buffer
            .back()
            .is_some_and(|last| last.seq >= event.seq)
        {
            return;
        }
        inner.next_seq = event.seq + 1;
        if inner.buffer.len() == BUFFER {
            inner.buffer.pop_front();
        }
        inner.buffer.push_back(event.clone());
        let _ = self.live.send(event);
    }

    /// Completes after a device's endpoint changed (at once if one changed since the last
    /// call).
    pub async fn endpoint_changed(&self) {
        self.endpoints_changed.notified().await;
    }

    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    pub fn publish_peer(&self, event: PeerEvent) {
        let (uuid, fleet, kind, generation, at, endpoint) = match event {
            PeerEvent::Online {
                id,
                fleet,
                generation,
                endpoint,
                at,
            } => (
                id,
                fleet,
                DeviceEventKind::Online,
                generation,
                at,
                Some(endpoint),
            ),
            PeerEvent::Offline {
                id,
                fleet,
                generation,
                at,
            } => (id, fleet, DeviceEventKind::Offline, generation, at, None),
            PeerEvent::Removed {
                id,
                fleet,
                generation,
                at,
            } => (id, fleet, DeviceEventKind::Revoked, generation, at, None),
            // Roaming is not an online/offline transition; it shows in the device view.
            PeerEvent::Roamed { id, endpoint, .. } => {
                debug!(device = %id, %endpoint, "device roamed");
                self.endpoints_changed.notify_one();
                return;
            }
        };
        if kind == DeviceEventKind::Online {
            self.endpoints_changed.notify_one();
        }
        debug!(device = %uuid, ?kind, generation, "device state");
        if let Some(o) = &self.outgoing {
            let mut p = o.pending.lock();
            let epoch = match kind {
                DeviceEventKind::Online => {
                    let epoch = self.clock.epoch_ms(at);
                    p.epochs.insert(uuid, epoch);
                    epoch
                }
                _ => p
                    .epochs
                    .remove(&uuid)
                    .unwrap_or_else(|| self.clock.epoch_ms(at)),
            };
            p.push(DeviceEvent {
                seq: 0,
                uuid,
                fleet: fleet.to_string(),
                kind,
                generation: cluster_generation(epoch, kind != DeviceEventKind::Online),
                at: self.clock.wall(at),
                endpoint: endpoint.map(|e| endpoint_text(&e)),
                node: Some(o.node.clone()),
            });
            drop(p);
            o.ready.notify_one();
            return;
        }
        let mut inner = self.inner.lock();
        let event = DeviceEvent {
            seq: inner.next_seq,
            uuid,
            fleet: fleet.to_string(),
            kind,
            generation,
            at: self.clock.wall(at),
            endpoint: endpoint.map(|e| endpoint_text(&e)),
            node: None,
        };
        inner.next_seq += 1;
        if inner.buffer.len() == BUFFER {
            inner.buffer.pop_front();
        }
        inner.buffer.push_back(event.clone());
        // Send while holding the lock so that live order equals buffer order.
        let _ = self.live.send(event);
    }

    /// Buffered events after `last_seen` (all when `None`), and a receiver for what comes
    /// next; taken together so that nothing falls between them.
    pub fn subscribe(
        &self,
        last_seen: Option<u64>,
    ) -> (Vec<DeviceEvent>, broadcast::Receiver<DeviceEvent>) {
        let inner = self.inner.lock();
        let rx = self.live.subscribe();
        let backlog = inner
            .buffer
            .iter()
            .filter(|e| last_seen.is_none_or(|s| e.seq > s))
            .cloned()
            .collect();
        (backlog, rx)
    }
}

impl Pending {
    fn push(&mut self, event: DeviceEvent) {
        self.events.push_back(event);
        self.trim();
    }

    fn trim(&mut self) {
        while self.events.len() > OUTGOING_MAX {
            self.events.pop_front();
            self.dropped += 1;
        }
    }
}

impl PeerEventSink for EventHub {
    fn peer_event(&self, event: PeerEvent) {
        self.publish_peer(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floto_proto::DeviceId;

    #[test]
    fn replay_after_last_event_id_and_bounded_buffer() {
        let hub = EventHub::new(WallClock::new());
        let id = DeviceId::new_random();
        let now = Instant::now();
        for g in 1..=3 {
            hub.publish_peer(PeerEvent::Offline {
                id,
                fleet: "lab".into(),
                generation: g,
                at: now,
            });
        }
        let (all, _) = hub.subscribe(None);
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let (after, _) = hub.subscribe(Some(all[0].seq));
        assert_eq!(
            after.iter().map(|e| e.generation).collect::<Vec<_>>(),
            [2, 3]
        );
        for g in 0..BUFFER as u64 {
            hub.publish_peer(PeerEvent::Offline {
                id,
                fleet: "lab".into(),
                generation: 10 + g,
                at: now,
            });
        }
        let (all, _) = hub.subscribe(None);
        assert_eq!(all.len(), BUFFER);
    }

    /// In a cluster nothing is published until the database numbers it; generations come
    /// from the session's epoch, so a later session on any node outranks an earlier end.
    #[test]
    fn a_cluster_hub_sends_its_events_out_and_publishes_them_numbered() {
        let clock = WallClock::new();
        let hub = EventHub::for_cluster(clock, "a".into());
        let id = DeviceId::new_random();
        let t0 = Instant::now();
        let addr: std::net::SocketAddr = "192.0.2.1:5000".parse().unwrap();
        hub.publish_peer(PeerEvent::Online {
            id,
            fleet: "lab".into(),
            generation: 1,
            endpoint: addr,
            at: t0,
        });
        hub.publish_peer(PeerEvent::Offline {
            id,
            fleet: "lab".into(),
            generation: 2,
            at: t0 + std::time::Duration::from_secs(30),
        });
        let (backlog, _) = hub.subscribe(None);
        assert!(
            backlog.is_empty(),
            "published before the database numbered it"
        );
        let (out, dropped) = hub.take_outgoing();
        assert_eq!(dropped, 0);
        let epoch = clock.epoch_ms(t0);
        let gens: Vec<(DeviceEventKind, u64)> =
            out.iter().map(|e| (e.kind, e.generation)).collect();
        assert_eq!(
            gens,
            [
                (DeviceEventKind::Online, cluster_generation(epoch, false)),
                (DeviceEventKind::Offline, cluster_generation(epoch, true)),
            ]
        );
        assert!(out.iter().all(|e| e.node.as_deref() == Some("a")));
        // A newer session (on another node, one millisecond later) outranks the end.
        assert!(cluster_generation(epoch + 1, false) > out[1].generation);
        // Put back after a failed write: first again, in order.
        hub.queue_ended(id, "lab", epoch - 5, Some("b".into()), clock.wall(t0));
        hub.return_outgoing(out.clone());
        let (again, _) = hub.take_outgoing();
        assert_eq!(again[..2], out[..]);
        assert_eq!(again[2].generation, cluster_generation(epoch - 5, true));
        // Numbered events are published once each, in order.
        let (_, mut live) = hub.subscribe(None);
        for (seq, e) in [
            (7, &again[0]),
            (8, &again[1]),
            (8, &again[1]),
            (3, &again[2]),
        ] {
            hub.publish_numbered(DeviceEvent { seq, ..e.clone() });
        }
        let (all, _) = hub.subscribe(None);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 8]);
        assert_eq!(live.try_recv().unwrap().seq, 7);
        assert_eq!(live.try_recv().unwrap().seq, 8);
        assert!(live.try_recv().is_err());
    }
}
