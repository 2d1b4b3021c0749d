//! Timers of the concentrator core: a heap of per-peer deadlines (no scan of all peers),
//! boringtun's own timers run on time, the online window, and freeing idle `Tunn`s.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;

use floto_proto::wireguard::is_initiation;

use super::counters::{bump, DropReason};
use super::effects::Effects;
use super::peers::{OfflineCause, Peer, PeerState, PeerTable};

/// How often `Tunn::update_timers` must have run before we hand a `Tunn` a packet, so the
/// times boringtun stamps on events are fresh (it stamps them with the time of the last
/// `update_timers`: DESIGN.md, timer bug A).
pub(super) const TIMER_REFRESH: Duration = Duration::from_millis(100);

/// While a peer has traffic in flight, check its timers this often.
const BUSY_CHECK: Duration = Duration::from_millis(500);

/// A peer whose traffic stopped is "busy" this long: covers boringtun's 10 s passive
/// keepalive and 15 s handshake-on-silence timers.
const BUSY_FOR: Duration = Duration::from_secs(20);

/// Drop a peer's `Tunn` after this long without an authenticated packet: all its session
/// keys are past WireGuard's 180 s REJECT_AFTER_TIME by then.
pub const TUNN_IDLE_DROP: Duration = Duration::from_secs(200);

/// Peers by the time they next need attention; entries are superseded, not removed.
pub(super) type TimerHeap = BinaryHeap<Reverse<(Instant, u64, PeerRef)>>;

/// A heap entry's handle on a peer (wrapped so the heap does not need `Ord` on `Peer`).
pub(super) struct PeerRef(Arc<Peer>);

impl PartialEq for PeerRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for PeerRef {}
impl PartialOrd for PeerRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PeerRef {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl PeerTable {
    // ---- timers -------------------------------------------------------------------

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.timers
            .lock()
            .peek()
            .map(|Reverse((at, _, _))| (*at, "peer timers"))
    }

    /// Runs every peer timer due at `now`: boringtun's timers (retransmits, keepalives,
    /// rekeys), online-window expiry, and freeing idle `Tunn`s. Also starts a new second
    /// for the handshake rate limit (and resets the gates' own counts, which boringtun
    /// never does for a shared limiter): call this at least once a second.
    pub fn handle_timeout(&self, now: Instant, scratch: &mut [u8], fx: &mut Effects) {
        self.admission.tick(now);
        loop {
            let due = {
                let mut heap = self.timers.lock();
                match heap.peek() {
                    Some(Reverse((at, _, _))) if *at <= now => heap.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((at, _, peer))) = due else {
                break;
            };
            let peer = &peer.0;
            let mut st = peer.state.lock();
            if st.scheduled != Some(at) || st.removed {
                continue; // superseded entry
            }
            st.scheduled = None;
            self.service(peer, &mut st, now, scratch, fx);
        }
    }

    fn service(
        &self,
        peer: &Arc<Peer>,
        st: &mut PeerState,
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        let mut expired = false;
        if st.tunn.is_some() {
            st.timers_refreshed = None;
            if let Some(WireGuardError::ConnectionExpired) =
                self.refresh_timers(st, now, scratch, fx)
            {
                expired = true;
            }
        }
        let silent_for = st.last_rx.map(|t| now.saturating_duration_since(t));
        if silent_for.is_none_or(|d| d >= self.online_window) {
            self.go_offline(peer, st, now, OfflineCause::Silent, fx);
        }
        let idle = !st.online
            && st
                .last_traffic
                .max(st.last_rx)
                .max(st.tunn_since)
                .is_none_or(|t| now.saturating_duration_since(t) >= TUNN_IDLE_DROP);
        if st.tunn.is_some() && (idle || (expired && !st.online)) {
            self.drop_tunn(peer, st);
        }
        let deadline = self.next_deadline(st, now);
        self.schedule(peer, st, deadline);
    }

    /// The next time this peer needs attention, if any.
    pub(super) fn next_deadline(&self, st: &PeerState, now: Instant) -> Option<Instant> {
        let busy = st
            .last_traffic
            .is_some_and(|t| now.saturating_duration_since(t) < BUSY_FOR)
            || (st.tunn.is_some() && !st.online);
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Instant| {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        };
        if busy {
            consider(now + BUSY_CHECK);
        }
        if st.online {
            if let Some(last) = st.last_rx {
                consider(last + self.online_window);
            }
        }
        if st.tunn.is_some() {
            let last = st
                .last_traffic
                .max(st.last_rx)
                .max(st.tunn_since)
                .unwrap_or(now);
            consider(last + TUNN_IDLE_DROP);
        }
        deadline.map(|d| d.max(now))
    }

    pub(super) fn schedule(&self, peer: &Arc<Peer>, st: &mut PeerState, deadline: Option<Instant>) {
        let Some(at) = deadline else { return };
        // An earlier entry already queued will reschedule when it fires.
        if st.scheduled.is_some_and(|s| s <= at) {
            return;
        }
        st.scheduled = Some(at);
        let seq = self.timer_seq.fetch_add(1, Ordering::Relaxed);
        self.timers
            .lock()
            .push(Reverse((at, seq, PeerRef(peer.clone()))));
    }

    /// Runs `update_timers` if it has not run lately, sending what it produces.
    pub(super) fn refresh_timers(
        &self,
        st: &mut PeerState,
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) -> Option<WireGuardError> {
        if st
            .timers_refreshed
            .is_some_and(|t| now.saturating_duration_since(t) < TIMER_REFRESH)
        {
            return None;
        }
        st.timers_refreshed = Some(now);
        let endpoint = st.endpoint;
        let tunn = st.tunn.as_mut()?;
        match tunn.update_timers(scratch) {
            TunnResult::WriteToNetwork(pkt) => {
                if let Some(to) = endpoint {
                    if is_initiation(pkt) {
                        bump(&self.counters.handshakes_initiated, 1);
                    }
                    fx.send_datagram(to, pkt);
                } else {
                    self.counters.drop(DropReason::NoEndpoint);
                }
                None
            }
            TunnResult::Err(e) => Some(e),
            _ => None,
        }
    }
}
