//! The concentrator core: every enrolled device's WireGuard peer, the routing of incoming
//! datagrams to them, online tracking and timers. No sockets and no clock: callers pass
//! datagrams and `now`, and get what to send through [`Output`].
//!
//! Routing (as DESIGN.md): every handshake message's MAC1 is checked first and, under load,
//! its MAC2 (without a valid cookie it is answered with a cookie reply); a handshake
//! initiation is matched to its peer by the
//! static key `parse_handshake_anon` decrypts; every other message by `receiver_idx >> 8`,
//! a 24-bit index unique to the peer while it has a session.
//!
//! A `Tunn` (about 11 KB) exists only while a device is making or has a session; an idle
//! enrolled device costs one [`Peer`] and four map entries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use dashmap::DashMap;
use parking_lot::Mutex;

use floto_proto::{DeviceId, WgKey};

/// Default handshake messages per second (all peers together) admitted before the server
/// answers with cookies, requiring initiators to prove their address (WireGuard's DoS
/// defence). A ceiling above what a node answers (a 2-core node about 3,000 a second), so
/// that a storm of real devices arriving at once is not sent through a 5 s cookie round by
/// its arrival rate alone: the queue's backlog and the count of failed initiations
/// ([`STRANGER_LIMIT`]) are what put the server under load first.
pub const DEFAULT_HANDSHAKE_RATE: u64 = 20_000;

/// Initiations per second that cost a Diffie-Hellman and led nowhere (an unknown or
/// revoked key, an undecryptable or replayed initiation) before the server asks every
/// initiator for a cookie, until the next second. Real devices rarely fail; a flood of
/// made-up initiations fails every time, so it is held to about this many
/// Diffie-Hellmans a second (a few percent of a core) whatever its rate.
pub const STRANGER_LIMIT: u64 = 1000;

/// How often `Tunn::update_timers` must have run before we hand a `Tunn` a packet, so the
/// times boringtun stamps on events are fresh (it stamps them with the time of the last
/// `update_timers`: DESIGN.md, timer bug A).
const TIMER_REFRESH: Duration = Duration::from_millis(100);

/// While a peer has traffic in flight, check its timers this often.
const BUSY_CHECK: Duration = Duration::from_millis(500);

/// A peer whose traffic stopped is "busy" this long: covers boringtun's 10 s passive
/// keepalive and 15 s handshake-on-silence timers.
const BUSY_FOR: Duration = Duration::from_secs(20);

/// Drop a peer's `Tunn` after this long without an authenticated packet: all its session
/// keys are past WireGuard's 180 s REJECT_AFTER_TIME by then.
pub const TUNN_IDLE_DROP: Duration = Duration::from_secs(200);

/// Largest message a peer can produce from one input, plus WireGuard's overhead.
pub const MAX_DATAGRAM: usize = 65_535;

/// A device's peer: fixed identity plus mutable session state.
pub struct Peer {
    pub id: DeviceId,
    pub fleet: Arc<str>,
    pub public_key: WgKey,
    pub overlay_ip: Ipv4Addr,
    state: Mutex<PeerState>,
}

#[derive(Default)]
struct PeerState {
    tunn: Option<Box<Tunn>>,
    /// 24-bit index of the current `Tunn`.
    index: Option<u32>,
    /// Where to send: the source of the last authenticated packet.
    endpoint: Option<SocketAddr>,
    /// Last authenticated packet (data, keepalive or handshake response).
    last_rx: Option<Instant>,
    /// Last non-empty data packet in either direction.
    last_traffic: Option<Instant>,
    timers_refreshed: Option<Instant>,
    /// When the current `Tunn` was made: a session being made is kept as long as an idle
    /// one, not dropped before the device's confirmation can arrive.
    tunn_since: Option<Instant>,
    online: bool,
    online_since: Option<Instant>,
    generation: u64,
    rx_bytes: u64,
    tx_bytes: u64,
    /// The deadline this peer is queued under in the timer heap (lazy deletion).
    scheduled: Option<Instant>,
    /// Set when the peer leaves the table; holders of an `Arc<Peer>` then drop packets.
    removed: bool,
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

/// Where the core's results go. The UDP driver sends datagrams and feeds the netstack;
/// tests collect them.
pub trait Output {
    /// Send a WireGuard datagram.
    fn send_datagram(&mut self, to: SocketAddr, datagram: &[u8]);
    /// An authenticated IP packet from `from` addressed to the server's overlay address.
    fn deliver_to_host(&mut self, from: &Peer, packet: &[u8]);
    /// An online/offline transition.
    fn event(&mut self, event: PeerEvent);
}

/// Why a datagram or packet was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a WireGuard message, or the wrong length for its type.
    Malformed,
    /// A handshake message whose MAC1 is wrong (not for our key).
    BadMac,
    /// A handshake initiation that does not decrypt to a static key.
    BadHandshake,
    /// A valid initiation from a key that is not enrolled (or was revoked).
    UnknownPeer,
    /// A message for a receiver index no peer holds.
    UnknownIndex,
    /// Rejected by the peer's session: bad tag, replayed counter or timestamp, no session.
    Rejected,
    /// Decrypted, but its inner source address is not the device's own.
    Spoofed,
    /// Decrypted, addressed to another device; devices are isolated.
    Isolated,
    /// Decrypted, but not IPv4, or addressed outside the overlay.
    NotRoutable,
    /// An outgoing packet for a device that has no known endpoint.
    NoEndpoint,
    /// An outgoing packet for an address no device holds.
    NoPeer,
    /// A handshake initiation shed because the handshake queue was full, or it waited
    /// there so long that the device has retried since.
    Overloaded,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Malformed,
        DropReason::BadMac,
        DropReason::BadHandshake,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::Rejected,
        DropReason::Spoofed,
        DropReason::Isolated,
        DropReason::NotRoutable,
        DropReason::NoEndpoint,
        DropReason::NoPeer,
        DropReason::Overloaded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadMac => "bad_mac",
            DropReason::BadHandshake => "bad_handshake",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::Rejected => "rejected",
            DropReason::Spoofed => "spoofed",
            DropReason::Isolated => "isolated",
            DropReason::NotRoutable => "not_routable",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoPeer => "no_peer",
            DropReason::Overloaded => "overloaded",
        }
    }
}

/// Counters of the core, read by the metrics exporter.
#[derive(Debug, Default)]
pub struct Counters {
    /// Initiations answered with a response.
    pub handshakes_completed: AtomicU64,
    /// Initiations this server sent (after a restart, or when boringtun's timers ask).
    pub handshakes_initiated: AtomicU64,
    /// Responses to our initiations that completed a session.
    pub handshakes_responded: AtomicU64,
    pub cookie_replies: AtomicU64,
    /// Decapsulated payload bytes from devices.
    pub rx_bytes: AtomicU64,
    /// Payload bytes encapsulated to devices.
    pub tx_bytes: AtomicU64,
    pub tunns_created: AtomicU64,
    pub tunns_dropped: AtomicU64,
    drops: [AtomicU64; 12],
}

impl Counters {
    fn drop(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The peer table.
pub struct PeerTable {
    private: StaticSecret,
    public: PublicKey,
    server_ip: Ipv4Addr,
    overlay: ipnet::Ipv4Net,
    online_window: Duration,
    /// Checks MAC1 and always MAC2: answers a cookie reply unless the sender has a valid
    /// cookie. Used under load (boringtun's limiter with a count limit of 0).
    cookie_gate: Arc<RateLimiter>,
    /// Checks MAC1 only (a count limit never reached). Also the `Tunn`s' own limiter, so a
    /// handshake admitted here is never answered with a cookie after its Diffie-Hellmans.
    mac1_gate: Arc<RateLimiter>,
    /// Handshake messages per second admitted without a cookie when there is no backlog
    /// (`--handshake-rate-limit`).
    rate_limit: u64,
    /// Handshake messages checked since `rate_reset`.
    rate_count: AtomicU64,
    /// Initiations that failed after their Diffie-Hellmans since `rate_reset`.
    strangers: AtomicU64,
    rate_reset: Mutex<Instant>,
    by_key: DashMap<[u8; 32], Arc<Peer>>,
    by_id: DashMap<DeviceId, Arc<Peer>>,
    by_ip: DashMap<Ipv4Addr, Arc<Peer>>,
    by_index: DashMap<u32, Arc<Peer>>,
    timers: Mutex<TimerHeap>,
    timer_seq: AtomicU64,
    online: AtomicU64,
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

/// Peers by the time they next need attention; entries are superseded, not removed.
type TimerHeap = BinaryHeap<Reverse<(Instant, u64, PeerRef)>>;

/// A heap entry's handle on a peer (wrapped so the heap does not need `Ord` on `Peer`).
struct PeerRef(Arc<Peer>);

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

/// What the core needs to serve a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: DeviceId,
    pub fleet: Arc<str>,
    pub public_key: WgKey,
    pub overlay_ip: Ipv4Addr,
}

impl PeerTable {
    /// `rate_limit`: handshake messages per second admitted without a cookie even when
    /// the caller does not report a backlog (see [`Self::admit`]).
    pub fn new(
        private: StaticSecret,
        overlay: ipnet::Ipv4Net,
        server_ip: Ipv4Addr,
        online_window: Duration,
        rate_limit: u64,
    ) -> Self {
        let public = PublicKey::from(&private);
        Self {
            cookie_gate: Arc::new(RateLimiter::new(&public, 0)),
            mac1_gate: Arc::new(RateLimiter::new(&public, u64::MAX)),
            rate_limit: rate_limit.max(1),
            rate_count: AtomicU64::new(0),
            strangers: AtomicU64::new(0),
            rate_reset: Mutex::new(Instant::now()),
            private,
            public,
            server_ip,
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

    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
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
    pub fn upsert(&self, config: PeerConfig, now: Instant, out: &mut dyn Output) -> bool {
        if let Some(existing) = self.by_id.get(&config.id).map(|p| p.clone()) {
            if existing.public_key == config.public_key && existing.overlay_ip == config.overlay_ip
            {
                return false;
            }
            self.remove(&config.id, now, out);
        }
        if let Some(holder) = self.by_key.get(config.public_key.as_bytes()).map(|p| p.id) {
            // The registry guarantees one key per device; a stale holder can only be a
            // peer replaced above. Never let two peers share a key.
            self.remove(&holder, now, out);
        }
        let peer = Arc::new(Peer {
            id: config.id,
            fleet: config.fleet,
            public_key: config.public_key,
            overlay_ip: config.overlay_ip,
            state: Mutex::new(PeerState::default()),
        });
        self.by_key
            .insert(*config.public_key.as_bytes(), peer.clone());
        self.by_ip.insert(config.overlay_ip, peer.clone());
        self.by_id.insert(config.id, peer);
        true
    }

    /// Removes a peer and drops its session at once. Returns `false` if it was not there.
    pub fn remove(&self, id: &DeviceId, now: Instant, out: &mut dyn Output) -> bool {
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
        if st.online {
            st.online = false;
            st.generation += 1;
            self.online.fetch_sub(1, Ordering::Relaxed);
            out.event(PeerEvent::Removed {
                id: peer.id,
                fleet: peer.fleet.clone(),
                generation: st.generation,
                at: now,
            });
        }
        true
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

    /// Live endpoints of all peers that have one, for persisting.
    pub fn endpoints(&self) -> Vec<(DeviceId, SocketAddr, Instant)> {
        self.by_id
            .iter()
            .filter_map(|p| {
                let st = p.state.lock();
                Some((p.id, st.endpoint?, st.last_rx?))
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
        out: &mut dyn Output,
    ) {
        if self.admit(from, datagram, false, scratch, out) {
            self.dispatch(from, datagram, now, scratch, out);
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
        out: &mut dyn Output,
    ) -> bool {
        let handshake = matches!(datagram.first(), Some(1 | 2));
        let over_rate =
            handshake && self.rate_count.fetch_add(1, Ordering::Relaxed) >= self.rate_limit;
        let under_load =
            backlogged || over_rate || self.strangers.load(Ordering::Relaxed) >= STRANGER_LIMIT;
        let gate = if handshake && under_load {
            &self.cookie_gate
        } else {
            &self.mac1_gate
        };
        match gate.verify_packet(Some(from.ip()), datagram, scratch) {
            Ok(_) => true,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                bump(&self.counters.cookie_replies, 1);
                out.send_datagram(from, cookie);
                false
            }
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                self.counters.drop(DropReason::BadMac);
                false
            }
            Err(_) => {
                self.counters.drop(DropReason::Malformed);
                false
            }
        }
    }

    /// Handles a handshake initiation that passed [`Self::admit`] (the expensive part:
    /// finding its peer by decrypting its static key, then answering it).
    pub fn handle_initiation(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        out: &mut dyn Output,
    ) {
        self.dispatch(from, datagram, now, scratch, out);
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
        out: &mut dyn Output,
    ) {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return self.counters.drop(DropReason::Malformed);
        };
        let (peer, kind) = match &packet {
            Packet::HandshakeInit(init) => {
                let half = match parse_handshake_anon(&self.private, &self.public, init) {
                    Ok(half) => half,
                    Err(_) => {
                        self.counters.drop(DropReason::BadHandshake);
                        bump(&self.strangers, 1);
                        return;
                    }
                };
                match self.by_key.get(&half.peer_static_public) {
                    Some(p) => (p.clone(), Kind::Init),
                    None => {
                        self.counters.drop(DropReason::UnknownPeer);
                        bump(&self.strangers, 1);
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
        self.deliver(&peer, kind, from, datagram, now, scratch, out);
    }

    fn peer_by_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        self.by_index.get(&(receiver_idx >> 8)).map(|p| p.clone())
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        peer: &Arc<Peer>,
        kind: Kind,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &mut [u8],
        out: &mut dyn Output,
    ) {
        let mut st = peer.state.lock();
        if st.removed {
            self.counters.drop(DropReason::UnknownPeer);
            return;
        }
        if st.tunn.is_none() {
            if kind != Kind::Init {
                // An index can only lead here while the peer has a `Tunn`.
                self.counters.drop(DropReason::UnknownIndex);
                return;
            }
            self.create_tunn(peer, &mut st, now);
        }
        self.refresh_timers(&mut st, now, scratch, out);
        let Some(tunn) = st.tunn.as_mut() else { return };
        let mut authenticated = false;
        let mut delivered: Option<usize> = None;
        match tunn.decapsulate(Some(from.ip()), datagram, scratch) {
            TunnResult::Done => {
                // A keepalive decrypted (authenticated), or a cookie reply consumed (not).
                authenticated = kind == Kind::Data;
            }
            TunnResult::Err(_) => {
                self.counters.drop(DropReason::Rejected);
                if kind == Kind::Init {
                    // A replayed or stale initiation of a known key.
                    bump(&self.strangers, 1);
                }
            }
            TunnResult::WriteToNetwork(reply) => {
                match kind {
                    Kind::Init => bump(&self.counters.handshakes_completed, 1),
                    Kind::Response => {
                        bump(&self.counters.handshakes_responded, 1);
                        authenticated = true;
                    }
                    // boringtun 0.7 answers neither a cookie reply nor data with a datagram;
                    // should a later version, there is nothing to count here.
                    Kind::Cookie | Kind::Data => {}
                }
                // Answer where the message came from; the endpoint itself moves only on
                // authenticated packets (an initiation can be replayed by anyone).
                out.send_datagram(from, reply);
                self.flush_queue(peer, &mut st, from, scratch, out);
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                authenticated = true;
                if src != peer.overlay_ip {
                    self.counters.drop(DropReason::Spoofed);
                } else {
                    delivered = Some(packet.len());
                    let dst = Tunn::dst_address(packet);
                    match dst {
                        Some(IpAddr::V4(dst)) if dst == self.server_ip => {
                            out.deliver_to_host(peer, packet);
                        }
                        Some(IpAddr::V4(dst)) if self.overlay.contains(&dst) => {
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
            self.mark_alive(peer, &mut st, from, now, out);
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
        out: &mut dyn Output,
    ) {
        let Some(tunn) = st.tunn.as_mut() else { return };
        let mut sent = 0u64;
        while let TunnResult::WriteToNetwork(pkt) = tunn.decapsulate(None, &[], scratch) {
            out.send_datagram(to, pkt);
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
        out: &mut dyn Output,
    ) {
        st.last_rx = Some(now);
        let moved = st.endpoint != Some(from);
        st.endpoint = Some(from);
        if !st.online {
            st.online = true;
            st.online_since = Some(now);
            st.generation += 1;
            self.online.fetch_add(1, Ordering::Relaxed);
            out.event(PeerEvent::Online {
                id: peer.id,
                fleet: peer.fleet.clone(),
                generation: st.generation,
                endpoint: from,
                at: now,
            });
        } else if moved {
            out.event(PeerEvent::Roamed {
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
            let candidate = rand::random::<u32>() & 0x00ff_ffff;
            if let dashmap::Entry::Vacant(v) = self.by_index.entry(candidate) {
                v.insert(peer.clone());
                break candidate;
            }
        };
        st.tunn = Some(Box::new(Tunn::new(
            self.private.clone(),
            PublicKey::from(*peer.public_key.as_bytes()),
            None,
            None,
            index,
            Some(self.mac1_gate.clone()),
        )));
        st.index = Some(index);
        st.tunn_since = Some(now);
        st.timers_refreshed = None;
        bump(&self.counters.tunns_created, 1);
    }

    fn drop_tunn(&self, peer: &Arc<Peer>, st: &mut PeerState) {
        if let Some(index) = st.index.take() {
            self.by_index.remove_if(&index, |_, p| Arc::ptr_eq(p, peer));
        }
        if st.tunn.take().is_some() {
            bump(&self.counters.tunns_dropped, 1);
        }
    }

    /// Runs `update_timers` if it has not run lately, sending what it produces.
    fn refresh_timers(
        &self,
        st: &mut PeerState,
        now: Instant,
        scratch: &mut [u8],
        out: &mut dyn Output,
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
                    out.send_datagram(to, pkt);
                } else {
                    self.counters.drop(DropReason::NoEndpoint);
                }
                None
            }
            TunnResult::Err(e) => Some(e),
            _ => None,
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
        out: &mut dyn Output,
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
        self.refresh_timers(&mut st, now, scratch, out);
        let Some(tunn) = st.tunn.as_mut() else { return };
        match tunn.encapsulate(packet, scratch) {
            TunnResult::WriteToNetwork(pkt) => {
                if is_initiation(pkt) {
                    // No session: the packet waits in the `Tunn` while we handshake.
                    bump(&self.counters.handshakes_initiated, 1);
                } else {
                    st.tx_bytes += packet.len() as u64;
                    bump(&self.counters.tx_bytes, packet.len() as u64);
                }
                out.send_datagram(to, pkt);
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
        out: &mut dyn Output,
    ) -> bool {
        let Some(peer) = self.by_id.get(id).map(|p| p.clone()) else {
            return false;
        };
        let mut st = peer.state.lock();
        if st.removed || st.tunn.is_some() {
            return false;
        }
        self.create_tunn(&peer, &mut st, now);
        st.endpoint = Some(endpoint);
        self.refresh_timers(&mut st, now, scratch, out);
        let Some(tunn) = st.tunn.as_mut() else {
            return false;
        };
        if let TunnResult::WriteToNetwork(pkt) = tunn.format_handshake_initiation(scratch, false) {
            bump(&self.counters.handshakes_initiated, 1);
            out.send_datagram(endpoint, pkt);
        }
        st.last_traffic = Some(now);
        let deadline = self.next_deadline(&st, now);
        self.schedule(&peer, &mut st, deadline);
        true
    }

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
    pub fn handle_timeout(&self, now: Instant, scratch: &mut [u8], out: &mut dyn Output) {
        {
            let mut reset = self.rate_reset.lock();
            if now.saturating_duration_since(*reset) >= Duration::from_secs(1) {
                self.rate_count.store(0, Ordering::Relaxed);
                self.strangers.store(0, Ordering::Relaxed);
                *reset = now;
            }
        }
        self.cookie_gate.reset_count();
        self.mac1_gate.reset_count();
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
            self.service(peer, &mut st, now, scratch, out);
        }
    }

    fn service(
        &self,
        peer: &Arc<Peer>,
        st: &mut PeerState,
        now: Instant,
        scratch: &mut [u8],
        out: &mut dyn Output,
    ) {
        let mut expired = false;
        if st.tunn.is_some() {
            st.timers_refreshed = None;
            if let Some(WireGuardError::ConnectionExpired) =
                self.refresh_timers(st, now, scratch, out)
            {
                expired = true;
            }
        }
        let silent_for = st.last_rx.map(|t| now.saturating_duration_since(t));
        if st.online && silent_for.is_none_or(|d| d >= self.online_window) {
            st.online = false;
            st.generation += 1;
            self.online.fetch_sub(1, Ordering::Relaxed);
            out.event(PeerEvent::Offline {
                id: peer.id,
                fleet: peer.fleet.clone(),
                generation: st.generation,
                at: now,
            });
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
    fn next_deadline(&self, st: &PeerState, now: Instant) -> Option<Instant> {
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

    fn schedule(&self, peer: &Arc<Peer>, st: &mut PeerState, deadline: Option<Instant>) {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Response,
    Cookie,
    Data,
}

fn is_initiation(datagram: &[u8]) -> bool {
    datagram.len() == 148 && datagram[..4] == [1, 0, 0, 0]
}
