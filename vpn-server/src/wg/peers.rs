//! The concentrator core: every enrolled device's WireGuard peer, the routing of incoming
//! datagrams to them, and online tracking. No sockets, no clock and no randomness of its
//! own: callers pass datagrams, `now` and a seed, and drain what to send and what happened
//! from an [`Effects`]. Admission (cookies, under-load) is in [`super::admission`], timers in
//! [`super::timers`], counters in [`super::counters`].
//!
//! Routing (as DESIGN.md): every handshake message's MAC1 is checked first and, under load,
//! its MAC2 (without a valid cookie it is answered with a cookie reply); a handshake
//! initiation is matched to its peer by the
//! static key `parse_handshake_anon` decrypts; every other message by `receiver_idx >> 8`,
//! a 24-bit index unique to the peer while it has a session.
//!
//! A `Tunn` (about 11 KB) exists only while a device is making or has a session; an idle
//! enrolled device costs one [`Peer`] and four map entries.

use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use boringtun::noise::handshake::{parse_handshake_anon, HalfHandshake};
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use dashmap::DashMap;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use zeroize::Zeroizing;

use floto_proto::{DeviceId, WgKey};

use super::admission::Admission;
use super::counters::{bump, Counters, DropReason};
use super::effects::Effects;
use super::timers::TimerHeap;

/// Largest message a peer can produce from one input, plus WireGuard's overhead.
pub const MAX_DATAGRAM: usize = 65_535;

/// A device's peer: fixed identity plus mutable session state.
pub struct Peer {
    pub id: DeviceId,
    pub fleet: Arc<str>,
    pub public_key: WgKey,
    pub overlay_ip: Ipv4Addr,
    /// DH(server's static key, the device's static key): the same for every handshake
    /// with this device, so computed once ([`PeerTable::precompute`], or at the first
    /// handshake) and kept, as kernel WireGuard keeps it with the peer.
    static_shared: OnceLock<Zeroizing<[u8; 32]>>,
    pub(super) state: Mutex<PeerState>,
}

#[derive(Default)]
pub(super) struct PeerState {
    pub(super) tunn: Option<Box<Tunn>>,
    /// 24-bit index of the current `Tunn`.
    pub(super) index: Option<u32>,
    /// Where to send: the source of the last authenticated packet.
    pub(super) endpoint: Option<SocketAddr>,
    /// Last authenticated packet (data, keepalive or handshake response).
    pub(super) last_rx: Option<Instant>,
    /// Last non-empty data packet in either direction.
    pub(super) last_traffic: Option<Instant>,
    pub(super) timers_refreshed: Option<Instant>,
    /// When the current `Tunn` was made: a session being made is kept as long as an idle
    /// one, not dropped before the device's confirmation can arrive.
    pub(super) tunn_since: Option<Instant>,
    /// When [`PeerTable::initiate`] called the device (cleared by its answer).
    pub(super) called_at: Option<Instant>,
    pub(super) online: bool,
    pub(super) online_since: Option<Instant>,
    pub(super) generation: u64,
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
    /// The deadline this peer is queued under in the timer heap (lazy deletion).
    pub(super) scheduled: Option<Instant>,
    /// Set when the peer leaves the table; holders of an `Arc<Peer>` then drop packets.
    pub(super) removed: bool,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("id", &self.id)
            .field("overlay_ip", &self.overlay_ip)
            .finish_non_exhaustive()
    }
}

/// A snapshot of a peer's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: DeviceId,
    pub online: bool,
    pub online_since: Option<Instant>,
    pub last_seen: Option<Instant>,
    pub endpoint: Option<SocketAddr>,
    pub generation: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub has_session: bool,
}

/// Online-state transitions and endpoint changes, each with the generation after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Online {
        id: DeviceId,
        fleet: Arc<str>,
        generation: u64,
        endpoint: SocketAddr,
        at: Instant,
    },
    Offline {
        id: DeviceId,
        fleet: Arc<str>,
        generation: u64,
        at: Instant,
    },
    /// The device is still online but now talks from another address (roaming, NAT rebinding).
    Roamed {
        id: DeviceId,
        fleet: Arc<str>,
        generation: u64,
        endpoint: SocketAddr,
        at: Instant,
    },
    /// The peer was removed (revoked or re-keyed) while online.
    Removed {
        id: DeviceId,
        fleet: Arc<str>,
        generation: u64,
        at: Instant,
    },
}

/// The peer table.
pub struct PeerTable {
    private: StaticSecret,
    public: PublicKey,
    /// The server's address in each overlay network (the first network's first).
    server_ips: Vec<Ipv4Addr>,
    /// The overlay networks, the first one first.
    overlay: Vec<ipnet::Ipv4Net>,
    pub(super) online_window: Duration,
    pub(super) admission: Admission,
    /// Draws the 24-bit session indices (seeded by the caller).
    index_rng: Mutex<StdRng>,
    by_key: DashMap<[u8; 32], Arc<Peer>>,
    by_id: DashMap<DeviceId, Arc<Peer>>,
    by_ip: DashMap<Ipv4Addr, Arc<Peer>>,
    by_index: DashMap<u32, Arc<Peer>>,
    pub(super) timers: Mutex<TimerHeap>,
    pub(super) timer_seq: AtomicU64,
    pub(super) online: AtomicU64,
    pub counters: Counters,
}

impl std::fmt::Debug for PeerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTable")
            .field("peers", &self.by_id.len())
            .field("sessions", &self.by_index.len())
            .field("online", &self.online_count())
            .finish_non_exhaustive()
    }
}

/// What the core needs to serve a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: DeviceId,
    pub fleet: Arc<str>,
    pub public_key: WgKey,
    pub overlay_ip: Ipv4Addr,
}

impl PeerTable {
    /// `overlay`: the overlay networks, the first one first; the server's address in each
    /// is its first host. `rate_limit`: handshake messages per second admitted without a cookie even when
    /// the caller does not report a backlog (see [`Self::admit`]). `seed` seeds the
    /// session indices the table draws.
    pub fn new(
        private: StaticSecret,
        overlay: Vec<ipnet::Ipv4Net>,
        online_window: Duration,
        rate_limit: u64,
        seed: u64,
    ) -> Self {
        let public = PublicKey::from(&private);
        Self {
            admission: Admission::new(&public, rate_limit),
            index_rng: Mutex::new(StdRng::seed_from_u64(seed)),
            private,
            public,
            // The first host of each network.
            server_ips: overlay
                .iter()
                .map(|n| Ipv4Addr::from(u32::from(n.network()) + 1))
                .collect(),
            overlay,
            online_window,
            by_key: DashMap::new(),
            by_id: DashMap::new(),
            by_ip: DashMap::new(),
            by_index: DashMap::new(),
            timers: Mutex::new(BinaryHeap::new()),
            timer_seq: AtomicU64::new(0),
            online: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> WgKey {
        WgKey(self.public.to_bytes())
    }

    /// The server's address in each overlay network, the first network's first.
    pub fn server_ips(&self) -> &[Ipv4Addr] {
        &self.server_ips
    }

    /// Number of enrolled (not revoked) peers.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Devices online now, from the session table.
    pub fn online_count(&self) -> u64 {
        self.online.load(Ordering::Relaxed)
    }

    /// Peers holding a `Tunn` (making or having a session).
    pub fn active_sessions(&self) -> usize {
        self.by_index.len()
    }

    /// Entries in the timer heap, superseded ones included (tests watch it for growth).
    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.lock().len()
    }

    // ---- configuration ------------------------------------------------------------

    /// Adds a peer, or replaces one whose key or address changed. A replaced peer loses
    /// its session (the device handshakes again with its new key). Returns `true` if
    /// anything changed.
    pub fn upsert(&self, config: PeerConfig, now: Instant, fx: &mut Effects) -> bool {
        // A replaced peer's generation carries over, so that the device's generation never
        // goes down (consumers of its events keep the highest).
        let mut generation = 0;
        if let Some(existing) = self.by_id.get(&config.id).map(|p| p.clone()) {
            if existing.public_key == config.public_key && existing.overlay_ip == config.overlay_ip
            {
                return false;
            }
            // A new key (renewal) ends the session; the device is not revoked.
            self.take_out(&config.id, now, OfflineCause::Silent, fx);
            generation = existing.state.lock().generation;
        }
        if let Some(holder) = self.by_key.get(config.public_key.as_bytes()).map(|p| p.id) {
            // The registry guarantees one key per device; a stale holder can only be a
            // peer replaced above. Never let two peers share a key.
            self.take_out(&holder, now, OfflineCause::Silent, fx);
        }
        let peer = Arc::new(Peer {
            id: config.id,
            fleet: config.fleet,
            public_key: config.public_key,
            overlay_ip: config.overlay_ip,
            static_shared: OnceLock::new(),
            state: Mutex::new(PeerState {
                generation,
                ..PeerState::default()
            }),
        });
        self.by_key
            .insert(*config.public_key.as_bytes(), peer.clone());
        self.by_ip.insert(config.overlay_ip, peer.clone());
        self.by_id.insert(config.id, peer);
        true
    }

    /// Removes a peer (revoked) and drops its session at once. Returns `false` if it was not
    /// there.
    pub fn remove(&self, id: &DeviceId, now: Instant, fx: &mut Effects) -> bool {
        self.take_out(id, now, OfflineCause::Removed, fx)
    }

    /// The fleet of an enrolled device.
    pub fn fleet_of(&self, id: &DeviceId) -> Option<Arc<str>> {
        self.by_id.get(id).map(|p| p.fleet.clone())
    }

    fn take_out(&self, id: &DeviceId, now: Instant, cause: OfflineCause, fx: &mut Effects) -> bool {
        let Some((_, peer)) = self.by_id.remove(id) else {
            return false;
        };
        self.by_key
            .remove_if(peer.public_key.as_bytes(), |_, p| Arc::ptr_eq(p, &peer));
        self.by_ip
            .remove_if(&peer.overlay_ip, |_, p| Arc::ptr_eq(p, &peer));
        let mut st = peer.state.lock();
        st.removed = true;
        self.drop_tunn(&peer, &mut st);
        self.go_offline(&peer, &mut st, now, cause, fx);
        true
    }

    /// Lets a device's session go (another node of the cluster holds a newer one): drops its
    /// state and marks it offline here; the peer stays, so the device may come back.
    /// Returns `false` if it was not online here.
    pub fn release(&self, id: &DeviceId, now: Instant, fx: &mut Effects) -> bool {
        let Some(peer) = self.by_id.get(id).map(|p| p.clone()) else {
            return false;
        };
        let mut st = peer.state.lock();
        if !st.online {
            return false;
        }
        self.drop_tunn(&peer, &mut st);
        self.go_offline(&peer, &mut st, now, OfflineCause::Silent, fx);
        true
    }

    /// The one offline transition: a new generation, the online count, and the event (a
    /// no-op for a peer that is not online).
    pub(super) fn go_offline(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        now: Instant,
        cause: OfflineCause,
        fx: &mut Effects,
    ) {
        if !st.online {
            return;
        }
        st.online = false;
        st.generation += 1;
        self.online.fetch_sub(1, Ordering::Relaxed);
        let (id, fleet, generation, at) = (peer.id, peer.fleet.clone(), st.generation, now);
        fx.event(match cause {
            OfflineCause::Silent => PeerEvent::Offline {
                id,
                fleet,
                generation,
                at,
            },
            OfflineCause::Removed => PeerEvent::Removed {
                id,
                fleet,
                generation,
                at,
            },
        });
    }

    pub fn status(&self, id: &DeviceId) -> Option<PeerStatus> {
        let peer = self.by_id.get(id)?.clone();
        let st = peer.state.lock();
        Some(PeerStatus {
            id: peer.id,
            online: st.online,
            online_since: st.online_since,
            last_seen: st.last_rx,
            endpoint: st.endpoint,
            generation: st.generation,
            rx_bytes: st.rx_bytes,
            tx_bytes: st.tx_bytes,
            has_session: st.tunn.is_some(),
        })
    }

    /// Peers holding a session, by whether their endpoint is a UDP address or a TLS stream
    /// ([`super::streams`]): `(udp, tls)`.
    pub fn sessions_by_transport(&self) -> (usize, usize) {
        let (mut udp, mut tls) = (0, 0);
        for p in self.by_id.iter() {
            let st = p.state.lock();
            if st.tunn.is_none() {
                continue;
            }
            match st.endpoint {
                Some(e) if super::streams::is_stream(&e) => tls += 1,
                _ => udp += 1,
            }
        }
        (udp, tls)
    }

    /// Live endpoints of all peers that have one, for persisting.
    /// (A TLS stream's endpoint is left out: nobody can call a device back at it.)
    pub fn endpoints(&self) -> Vec<(DeviceId, SocketAddr, Instant)> {
        self.by_id
            .iter()
            .filter_map(|p| {
                let st = p.state.lock();
                let endpoint = st.endpoint.filter(|e| !super::streams::is_stream(e))?;
                Some((p.id, endpoint, st.last_rx?))
            })
            .collect()
    }

    /// Peers online now: when their session came up and where they are (no address for a
    /// TLS stream: another node cannot call it), for a cluster's session rows.
    pub fn online_sessions(&self) -> Vec<(DeviceId, Instant, Option<SocketAddr>)> {
        self.by_id
            .iter()
            .filter_map(|p| {
                let st = p.state.lock();
                let endpoint = st.endpoint.filter(|e| !super::streams::is_stream(e));
                st.online.then_some((p.id, st.online_since?, endpoint))
            })
            .collect()
    }

    // ---- network input ------------------------------------------------------------

    /// Handles one datagram from the network. `scratch` must hold at least
    /// [`MAX_DATAGRAM`] bytes.
    pub fn route_datagram(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        if self.admit(from, datagram, false, scratch, fx) {
            self.dispatch(from, datagram, now, scratch, fx);
        }
    }

    /// The cheap checks every datagram passes first: its shape, and for handshake messages
    /// their MAC1 and, under load, their MAC2 (a sender without a valid cookie gets a
    /// cookie reply instead). Returns `true` if the datagram should be handled. The UDP
    /// driver runs this on its receive path and queues admitted initiations for
    /// [`Self::handle_initiation`].
    ///
    /// Under load means `backlogged` (the caller's handshake queue holds more work than it
    /// answers in time: a message admitted now would wait close to when its sender retries,
    /// so a cookie costs a legitimate device little and a spoofed flood its way in), more
    /// failed initiations this second than [`STRANGER_LIMIT`], or more handshake messages
    /// this second than the rate limit.
    pub fn admit(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        backlogged: bool,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) -> bool {
        self.admission
            .admit(from, datagram, backlogged, scratch, &self.counters, fx)
    }

    /// Checks a queued initiation again when a worker takes it: while initiations are
    /// failing ([`super::admission::STRANGER_LIMIT`] this second), one without a valid
    /// cookie gets a cookie reply instead of its Diffie-Hellman. A flood admitted before the
    /// failures were counted (at the start of each second) is then answered cheaply from the
    /// queue, instead of keeping the workers busy with it. `false`: not to be handled.
    pub fn recheck(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        fx: &mut Effects,
    ) -> bool {
        self.admission
            .recheck(from, datagram, scratch, &self.counters, fx)
    }

    /// Handles a handshake initiation that passed [`Self::admit`] (the expensive part:
    /// finding its peer by decrypting its static key, then answering it).
    pub fn handle_initiation(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        self.dispatch(from, datagram, now, scratch, fx);
    }

    /// Call-backs answered so far and their round trips summed (see
    /// [`super::pacer`]).
    pub fn call_back_answers(&self) -> (u64, Duration) {
        self.counters.call_back_answers()
    }

    /// Counts a datagram the driver dropped before handling it.
    pub fn count_drop(&self, why: DropReason) {
        self.counters.drop(why);
    }

    /// Routes an admitted datagram to its peer.
    fn dispatch(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return self.counters.drop(DropReason::Malformed);
        };
        let mut half = None;
        let (peer, kind) = match &packet {
            Packet::HandshakeInit(init) => {
                let parsed = match parse_handshake_anon(&self.private, &self.public, init) {
                    Ok(half) => half,
                    Err(_) => {
                        self.counters.drop(DropReason::BadHandshake);
                        self.admission.count_failure();
                        return;
                    }
                };
                let peer = self
                    .by_key
                    .get(&parsed.peer_static_public)
                    .map(|p| p.clone());
                // The peer's `Tunn` goes on from this parse (its Diffie-Hellman is not
                // done twice).
                half = Some(parsed);
                match peer {
                    Some(p) => (p, Kind::Init),
                    None => {
                        self.counters.drop(DropReason::UnknownPeer);
                        self.admission.count_failure();
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(p) => match self.peer_by_index(p.receiver_idx) {
                Some(peer) => (peer, Kind::Response),
                None => return self.counters.drop(DropReason::UnknownIndex),
            },
            Packet::PacketCookieReply(p) => match self.peer_by_index(p.receiver_idx) {
                Some(peer) => (peer, Kind::Cookie),
                None => return self.counters.drop(DropReason::UnknownIndex),
            },
            Packet::PacketData(p) => match self.peer_by_index(p.receiver_idx) {
                Some(peer) => (peer, Kind::Data),
                None => return self.counters.drop(DropReason::UnknownIndex),
            },
        };
        self.deliver(&peer, kind, half.as_ref(), from, datagram, now, scratch, fx);
    }

    fn peer_by_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        self.by_index.get(&(receiver_idx >> 8)).map(|p| p.clone())
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        peer: &Arc<Peer>,
        kind: Kind,
        half: Option<&HalfHandshake>,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        let mut st = peer.state.lock();
        if st.removed {
            self.counters.drop(DropReason::UnknownPeer);
            return;
        }
        // A `Tunn` made for this initiation is kept only if the handshake works: an
        // initiation that names an enrolled key (public) but cannot prove it must not leave
        // an 11 KB session state behind for 200 s.
        let fresh = st.tunn.is_none();
        if fresh {
            if kind != Kind::Init {
                // An index can only lead here while the peer has a `Tunn`.
                self.counters.drop(DropReason::UnknownIndex);
                return;
            }
            self.create_tunn(peer, &mut st, now);
        }
        self.refresh_timers(&mut st, now, scratch, fx);
        let Some(tunn) = st.tunn.as_mut() else { return };
        let mut authenticated = false;
        let mut delivered: Option<usize> = None;
        let result = match half {
            Some(half) => tunn.decapsulate_parsed_init(Some(from.ip()), datagram, half, scratch),
            None => tunn.decapsulate(Some(from.ip()), datagram, scratch),
        };
        match result {
            TunnResult::Done => {
                // A keepalive decrypted (authenticated), or a cookie reply consumed (not).
                authenticated = kind == Kind::Data;
            }
            TunnResult::Err(_) => {
                self.counters.drop(DropReason::Rejected);
                if kind == Kind::Init {
                    // A replayed, stale or forged initiation of a known key.
                    self.admission.count_failure();
                    if fresh {
                        self.drop_tunn(peer, &mut st);
                        return;
                    }
                }
            }
            TunnResult::WriteToNetwork(reply) => {
                match kind {
                    Kind::Init => bump(&self.counters.handshakes_completed, 1),
                    Kind::Response => {
                        bump(&self.counters.handshakes_responded, 1);
                        authenticated = true;
                        if let Some(at) = st.called_at.take() {
                            self.counters
                                .call_back_answered(now.saturating_duration_since(at));
                        }
                    }
                    // boringtun 0.7 answers neither a cookie reply nor data with a datagram;
                    // should a later version, there is nothing to count here.
                    Kind::Cookie | Kind::Data => {}
                }
                // Answer where the message came from; the endpoint itself moves only on
                // authenticated packets (an initiation can be replayed by anyone).
                fx.send_datagram(from, reply);
                self.flush_queue(peer, &mut st, from, scratch, fx);
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                authenticated = true;
                if src != peer.overlay_ip {
                    self.counters.drop(DropReason::Spoofed);
                } else {
                    delivered = Some(packet.len());
                    let dst = Tunn::dst_address(packet);
                    match dst {
                        Some(IpAddr::V4(dst)) if self.server_ips.contains(&dst) => {
                            fx.deliver_to_host(peer.id, packet);
                        }
                        Some(IpAddr::V4(dst)) if self.overlay.iter().any(|n| n.contains(&dst)) => {
                            self.counters.drop(DropReason::Isolated);
                        }
                        _ => self.counters.drop(DropReason::NotRoutable),
                    }
                }
            }
            TunnResult::WriteToTunnelV6(..) => {
                authenticated = true;
                self.counters.drop(DropReason::NotRoutable);
            }
        }
        if let Some(n) = delivered {
            st.rx_bytes += n as u64;
            st.last_traffic = Some(now);
            bump(&self.counters.rx_bytes, n as u64);
        }
        if authenticated {
            self.mark_alive(peer, &mut st, from, now, fx);
        }
        let deadline = self.next_deadline(&st, now);
        self.schedule(peer, &mut st, deadline);
    }

    /// Sends what the `Tunn` queued while it had no session.
    fn flush_queue(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        to: SocketAddr,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        let Some(tunn) = st.tunn.as_mut() else { return };
        let mut sent = 0u64;
        while let TunnResult::WriteToNetwork(pkt) = tunn.decapsulate(None, &[], scratch) {
            fx.send_datagram(to, pkt);
            sent += 1;
        }
        if sent > 0 {
            tracing::trace!(device = %peer.id, sent, "flushed queued packets");
        }
    }

    fn mark_alive(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        from: SocketAddr,
        now: Instant,
        fx: &mut Effects,
    ) {
        st.last_rx = Some(now);
        let moved = st.endpoint != Some(from);
        st.endpoint = Some(from);
        if !st.online {
            st.online = true;
            st.online_since = Some(now);
            st.generation += 1;
            self.online.fetch_add(1, Ordering::Relaxed);
            fx.event(PeerEvent::Online {
                id: peer.id,
                fleet: peer.fleet.clone(),
                generation: st.generation,
                endpoint: from,
                at: now,
            });
        } else if moved {
            fx.event(PeerEvent::Roamed {
                id: peer.id,
                fleet: peer.fleet.clone(),
                generation: st.generation,
                endpoint: from,
                at: now,
            });
        }
    }

    fn create_tunn(&self, peer: &Arc<Peer>, st: &mut PeerState, now: Instant) {
        let index = loop {
            let candidate = self.index_rng.lock().random::<u32>() & 0x00ff_ffff;
            if let dashmap::Entry::Vacant(v) = self.by_index.entry(candidate) {
                v.insert(peer.clone());
                break candidate;
            }
        };
        st.tunn = Some(Box::new(Tunn::new_precomputed(
            self.private.clone(),
            self.public,
            PublicKey::from(*peer.public_key.as_bytes()),
            self.static_shared(peer),
            None,
            None,
            index,
            Some(self.admission.tunn_limiter()),
        )));
        st.index = Some(index);
        st.tunn_since = Some(now);
        st.timers_refreshed = None;
        bump(&self.counters.tunns_created, 1);
    }

    /// The peer's static-static Diffie-Hellman, computed now if it was not yet.
    fn static_shared(&self, peer: &Peer) -> [u8; 32] {
        **peer.static_shared.get_or_init(|| {
            let device = PublicKey::from(*peer.public_key.as_bytes());
            Zeroizing::new(self.private.diffie_hellman(&device).to_bytes())
        })
    }

    /// Computes `id`'s static-static Diffie-Hellman ahead of its handshakes, as kernel
    /// WireGuard does when a peer is configured (otherwise its first handshake pays for
    /// it). `false` if the device is not (or no longer) here.
    pub fn precompute(&self, id: &DeviceId) -> bool {
        let Some(peer) = self.by_id.get(id).map(|p| p.clone()) else {
            return false;
        };
        self.static_shared(&peer);
        true
    }

    /// Whether `id`'s static-static Diffie-Hellman has been computed (for tests).
    #[cfg(test)]
    pub(super) fn has_static_shared(&self, id: &DeviceId) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|p| p.static_shared.get().is_some())
    }

    pub(super) fn drop_tunn(&self, peer: &Arc<Peer>, st: &mut PeerState) {
        if let Some(index) = st.index.take() {
            self.by_index.remove_if(&index, |_, p| Arc::ptr_eq(p, peer));
        }
        st.called_at = None;
        if st.tunn.take().is_some() {
            bump(&self.counters.tunns_dropped, 1);
        }
    }

    // ---- host output ----------------------------------------------------------------

    /// Sends an IP packet from the server (the netstack) to the device that holds its
    /// destination address.
    pub fn send_to_device(
        &self,
        packet: &[u8],
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(packet) else {
            self.counters.drop(DropReason::NotRoutable);
            return;
        };
        let Some(peer) = self.by_ip.get(&dst).map(|p| p.clone()) else {
            self.counters.drop(DropReason::NoPeer);
            return;
        };
        let mut st = peer.state.lock();
        if st.removed {
            self.counters.drop(DropReason::NoPeer);
            return;
        }
        let Some(to) = st.endpoint else {
            self.counters.drop(DropReason::NoEndpoint);
            return;
        };
        if st.tunn.is_none() {
            self.create_tunn(&peer, &mut st, now);
        }
        self.refresh_timers(&mut st, now, scratch, fx);
        let Some(tunn) = st.tunn.as_mut() else { return };
        match tunn.encapsulate(packet, scratch) {
            TunnResult::WriteToNetwork(pkt) => {
                if floto_proto::wireguard::is_initiation(pkt) {
                    // No session: the packet waits in the `Tunn` while we handshake.
                    bump(&self.counters.handshakes_initiated, 1);
                } else {
                    st.tx_bytes += packet.len() as u64;
                    bump(&self.counters.tx_bytes, packet.len() as u64);
                }
                fx.send_datagram(to, pkt);
            }
            TunnResult::Done => {}
            _ => self.counters.drop(DropReason::Rejected),
        }
        st.last_traffic = Some(now);
        let deadline = self.next_deadline(&st, now);
        self.schedule(&peer, &mut st, deadline);
    }

    /// Starts a handshake with a device at an address it was last seen at (after a server
    /// restart). Returns `false` if the device is unknown or already has a session.
    pub fn initiate(
        &self,
        id: &DeviceId,
        endpoint: SocketAddr,
        now: Instant,
        scratch: &mut [u8],
        fx: &mut Effects,
    ) -> bool {
        let Some(peer) = self.by_id.get(id).map(|p| p.clone()) else {
            return false;
        };
        let mut st = peer.state.lock();
        if st.removed || st.tunn.is_some() {
            return false;
        }
        self.create_tunn(&peer, &mut st, now);
        st.called_at = Some(now);
        st.endpoint = Some(endpoint);
        self.refresh_timers(&mut st, now, scratch, fx);
        let Some(tunn) = st.tunn.as_mut() else {
            return false;
        };
        if let TunnResult::WriteToNetwork(pkt) = tunn.format_handshake_initiation(scratch, false) {
            bump(&self.counters.handshakes_initiated, 1);
            fx.send_datagram(endpoint, pkt);
        }
        st.last_traffic = Some(now);
        let deadline = self.next_deadline(&st, now);
        self.schedule(&peer, &mut st, deadline);
        true
    }
}

/// Why a peer goes offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OfflineCause {
    /// No authenticated packet within the online window.
    Silent,
    /// Removed from the table (revoked or re-keyed).
    Removed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Response,
    Cookie,
    Data,
}
