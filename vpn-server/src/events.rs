//! Device online/offline events: numbered, kept in a bounded buffer for clients that
//! reconnect with `Last-Event-ID`, and broadcast to live subscribers.

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tracing::debug;

use floto_proto::devices::{DeviceEvent, DeviceEventKind};

use crate::wg::{PeerEvent, PeerEventSink};

/// Events kept for late readers.
pub const BUFFER: usize = 16_384;

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
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    buffer: VecDeque<DeviceEvent>,
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
        }
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
        let mut inner = self.inner.lock();
        let event = DeviceEvent {
            seq: inner.next_seq,
            uuid,
            fleet: fleet.to_string(),
            kind,
            generation,
            at: self.clock.wall(at),
            endpoint: endpoint.map(|e| e.to_string()),
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
}
