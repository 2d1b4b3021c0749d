//! In-memory tests of the concentrator core: simulated devices (boringtun initiators)
//! talk to a [`PeerTable`] through queues; the table's own time is virtual.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use floto_proto::{DeviceId, WgKey};

use super::admission::STRANGER_LIMIT;
use super::counters::DropReason;
use super::effects::Effects;
use super::peers::*;
use super::timers::TUNN_IDLE_DROP;

pub(super) const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
pub(super) const WINDOW: Duration = Duration::from_secs(85);
/// `--handshake-rate-limit` in these tests.
const RATE: u64 = 4000;

/// Everything the table produced: its [`Effects`], drained into lists that tests read
/// through the accessors.
#[derive(Default)]
pub(super) struct Collected {
    fx: Effects,
    datagrams: Vec<(SocketAddr, Vec<u8>)>,
    host: Vec<(DeviceId, Vec<u8>)>,
    events: Vec<PeerEvent>,
}

impl Collected {
    fn drain(&mut self) {
        while let Some((to, d)) = self.fx.poll_transmit() {
            self.datagrams.push((to, d.to_vec()));
        }
        while let Some(p) = self.fx.poll_host_packet() {
            self.host.push(p);
        }
        while let Some(e) = self.fx.poll_event() {
            self.events.push(e);
        }
    }

    pub(super) fn datagrams(&mut self) -> &mut Vec<(SocketAddr, Vec<u8>)> {
        self.drain();
        &mut self.datagrams
    }

    pub(super) fn host(&mut self) -> &mut Vec<(DeviceId, Vec<u8>)> {
        self.drain();
        &mut self.host
    }

    pub(super) fn events(&mut self) -> &mut Vec<PeerEvent> {
        self.drain();
        &mut self.events
    }
}

impl std::ops::Deref for Collected {
    type Target = Effects;
    fn deref(&self) -> &Effects {
        &self.fx
    }
}

impl std::ops::DerefMut for Collected {
    fn deref_mut(&mut self) -> &mut Effects {
        &mut self.fx
    }
}

pub(super) struct Server {
    pub(super) table: PeerTable,
    pub(super) public: PublicKey,
    pub(super) scratch: Vec<u8>,
    pub(super) out: Collected,
    pub(super) now: Instant,
}

impl Server {
    pub(super) fn new() -> Self {
        let private = StaticSecret::from([3u8; 32]);
        let public = PublicKey::from(&private);
        Self {
            table: PeerTable::new(
                private,
                vec!["10.240.0.0/16".parse().unwrap()],
                WINDOW,
                RATE,
                7,
            ),
            public,
            scratch: vec![0; MAX_DATAGRAM],
            out: Collected::default(),
            now: Instant::now(),
        }
    }

    /// Enrolls device `n` (1 to 245): its own key, overlay address `10.240.0.(10+n)` and
    /// source address `192.0.2.n`.
    pub(super) fn enroll(&mut self, n: u8) -> Device {
        let private = StaticSecret::from([n.wrapping_add(100); 32]);
        let id = DeviceId::new_random();
        let ip = Ipv4Addr::new(10, 240, 0, 10 + n);
        self.serve(id, &PublicKey::from(&private), ip);
        Device {
            id,
            ip,
            addr: SocketAddr::from(([192, 0, 2, n], 40000 + u16::from(n))),
            tunn: device_tunn(private, self.public, u32::from(n)),
            buf: vec![0; MAX_DATAGRAM],
        }
    }

    /// Tells the table to serve device `id` with `key` at `ip` (adding or re-keying it).
    fn serve(&mut self, id: DeviceId, key: &PublicKey, ip: Ipv4Addr) {
        self.table.upsert(
            PeerConfig {
                id,
                fleet: "lab".into(),
                public_key: WgKey(key.to_bytes()),
                overlay_ip: ip,
            },
            self.now,
            &mut self.out,
        );
    }

    /// Serves `d` with the key of `private` from now on, as a renewal with a new WireGuard
    /// key does; `d` itself keeps its old `Tunn` (swap it for one with the new key).
    pub(super) fn rekey(&mut self, d: &Device, private: &StaticSecret) {
        self.serve(d.id, &PublicKey::from(private), d.ip);
    }

    /// A device with the key `[seed; 32]`, which the server does not know.
    fn stranger(&self, seed: u8) -> Device {
        Device {
            id: DeviceId::new_random(),
            ip: Ipv4Addr::new(10, 240, 255, seed),
            addr: SocketAddr::from(([198, 51, 100, seed], 5000)),
            tunn: device_tunn(StaticSecret::from([seed; 32]), self.public, u32::from(seed)),
            buf: vec![0; MAX_DATAGRAM],
        }
    }

    /// Feeds one datagram from `from`; returns what the server sent back to it.
    pub(super) fn receive(&mut self, from: SocketAddr, datagram: &[u8]) -> Vec<Vec<u8>> {
        let before = self.out.datagrams().len();
        self.table
            .route_datagram(from, datagram, self.now, &mut self.scratch, &mut self.out);
        self.out.datagrams()[before..]
            .iter()
            .filter(|(to, _)| *to == from)
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        self.table
            .handle_timeout(self.now, &mut self.scratch, &mut self.out);
    }

    pub(super) fn dropped(&self, why: DropReason) -> u64 {
        self.table.counters.dropped(why)
    }
}

pub(super) struct Device {
    pub(super) id: DeviceId,
    pub(super) ip: Ipv4Addr,
    pub(super) addr: SocketAddr,
    pub(super) tunn: Tunn,
    buf: Vec<u8>,
}

impl Device {
    /// Handshake, then the initiator's confirming keepalive: the device is online after.
    /// Completes a handshake with `server`; returns the initiation it sent (for replays).
    pub(super) fn connect(&mut self, server: &mut Server) -> Vec<u8> {
        let init = self.initiation();
        let replies = server.receive(self.addr, &init);
        assert_eq!(replies.len(), 1, "expected one handshake response");
        let keepalive = self.receive(&replies[0]);
        assert_eq!(
            keepalive.len(),
            1,
            "initiator sends a keepalive after the response"
        );
        server.receive(self.addr, &keepalive[0]);
        init
    }

    pub(super) fn initiation(&mut self) -> Vec<u8> {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// Feeds a datagram from the server; returns datagrams the device sends back.
    pub(super) fn receive(&mut self, datagram: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut input = datagram;
        while let TunnResult::WriteToNetwork(p) = self.tunn.decapsulate(None, input, &mut self.buf)
        {
            out.push(p.to_vec());
            input = &[];
        }
        out
    }

    /// Decrypts a datagram from the server into an IP packet.
    pub(super) fn decrypt(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.decapsulate(None, datagram, &mut self.buf) {
            TunnResult::WriteToTunnelV4(p, _) => Some(p.to_vec()),
            _ => None,
        }
    }

    pub(super) fn encrypt(&mut self, ip_packet: &[u8]) -> Vec<u8> {
        match self.tunn.encapsulate(ip_packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no session to encrypt with: {other:?}"),
        }
    }
}

/// A simulated device's `Tunn`, without boringtun's limit of 10 incoming handshake messages
/// a second: it counts them in real time, and these tests make many handshakes in one.
pub(super) fn device_tunn(private: StaticSecret, server: PublicKey, index: u32) -> Tunn {
    let limiter = Arc::new(RateLimiter::new(&PublicKey::from(&private), u64::MAX));
    Tunn::new(private, server, None, None, index, Some(limiter))
}

/// A minimal IPv4/UDP packet.
pub(super) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for chunk in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&1234u16.to_be_bytes());
    p[22..24].copy_from_slice(&5678u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

#[test]
fn handshake_makes_the_device_online_and_data_reaches_the_host() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    assert_eq!(s.table.online_count(), 0);
    d.connect(&mut s);
    let status = s.table.status(&d.id).unwrap();
    assert!(status.online);
    assert_eq!(status.generation, 1);
    assert_eq!(status.endpoint, Some(d.addr));
    assert_eq!(s.table.online_count(), 1);
    assert!(matches!(
        s.out.events()[..],
        [PeerEvent::Online { generation: 1, .. }]
    ));

    let packet = ipv4(d.ip, SERVER_IP, b"hello");
    let datagram = d.encrypt(&packet);
    s.receive(d.addr, &datagram);
    assert_eq!(*s.out.host(), vec![(d.id, packet)]);
}

#[test]
fn the_server_reaches_the_device_and_rx_tx_are_counted() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    d.connect(&mut s);
    let packet = ipv4(SERVER_IP, d.ip, b"from the broker");
    let before = s.out.datagrams().len();
    s.table
        .send_to_device(&packet, s.now, &mut s.scratch, &mut s.out);
    let (to, datagram) = s.out.datagrams()[before].clone();
    assert_eq!(to, d.addr);
    assert_eq!(d.decrypt(&datagram), Some(packet.clone()));
    let status = s.table.status(&d.id).unwrap();
    assert_eq!(status.tx_bytes, packet.len() as u64);
}

#[test]
fn spoofed_sources_and_device_to_device_traffic_are_dropped() {
    let mut s = Server::new();
    let mut a = s.enroll(1);
    let mut b = s.enroll(2);
    a.connect(&mut s);
    b.connect(&mut s);
    // a claims b's address
    let spoof = a.encrypt(&ipv4(b.ip, SERVER_IP, b"spoof"));
    s.receive(a.addr, &spoof);
    assert_eq!(s.dropped(DropReason::Spoofed), 1);
    // a talks to b directly
    let lateral = a.encrypt(&ipv4(a.ip, b.ip, b"hi b"));
    s.receive(a.addr, &lateral);
    assert_eq!(s.dropped(DropReason::Isolated), 1);
    // outside the overlay
    let out = a.encrypt(&ipv4(a.ip, Ipv4Addr::new(192, 0, 2, 1), b"out"));
    s.receive(a.addr, &out);
    assert_eq!(s.dropped(DropReason::NotRoutable), 1);
    assert!(s.out.host().is_empty());
    // the session is unharmed
    let fine = a.encrypt(&ipv4(a.ip, SERVER_IP, b"fine"));
    s.receive(a.addr, &fine);
    assert_eq!(s.out.host().len(), 1);
}

#[test]
fn unknown_keys_malformed_and_unknown_indices_are_dropped_quietly() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    // A device whose key the server does not know.
    let init = s.stranger(77).initiation();
    let from: SocketAddr = "198.51.100.7:5555".parse().unwrap();
    assert!(s.receive(from, &init).is_empty());
    assert_eq!(s.dropped(DropReason::UnknownPeer), 1);

    // Malformed: empty, short, wrong type, wrong lengths, random.
    for junk in [
        vec![],
        vec![1, 0, 0],
        vec![9, 0, 0, 0, 1, 2, 3, 4],
        vec![1, 0, 0, 0]
            .into_iter()
            .chain([0u8; 100])
            .collect::<Vec<_>>(),
        vec![2, 0, 0, 0]
            .into_iter()
            .chain([0u8; 10])
            .collect::<Vec<_>>(),
        (0..200u8).collect::<Vec<_>>(),
    ] {
        assert!(s.receive(from, &junk).is_empty());
    }
    assert!(
        s.dropped(DropReason::Malformed) >= 5,
        "{}",
        s.dropped(DropReason::Malformed)
    );

    // A handshake initiation for another server (bad MAC1).
    let mut wrong = init.clone();
    wrong[120] ^= 0xff;
    assert!(s.receive(from, &wrong).is_empty());
    assert_eq!(s.dropped(DropReason::BadMac), 1);

    // Data for an index nobody holds.
    let mut data = vec![4u8, 0, 0, 0];
    data.extend_from_slice(&0x00ab_cd00u32.to_le_bytes());
    data.extend_from_slice(&[0u8; 40]);
    assert!(s.receive(from, &data).is_empty());
    assert_eq!(s.dropped(DropReason::UnknownIndex), 1);

    // Nothing of that touched the enrolled device, which still connects.
    d.connect(&mut s);
    assert!(s.table.status(&d.id).unwrap().online);
}

#[test]
fn replayed_initiations_are_rejected_and_do_not_move_the_endpoint() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    let init = d.connect(&mut s);
    assert_eq!(s.table.status(&d.id).unwrap().endpoint, Some(d.addr));
    // An attacker replays the captured initiation from elsewhere.
    let attacker: SocketAddr = "203.0.113.9:666".parse().unwrap();
    assert!(s.receive(attacker, &init).is_empty());
    assert_eq!(s.dropped(DropReason::Rejected), 1);
    assert_eq!(s.table.status(&d.id).unwrap().endpoint, Some(d.addr));
    // A captured data packet replayed is rejected too (counter reuse).
    let data = d.encrypt(&ipv4(d.ip, SERVER_IP, b"once"));
    s.receive(d.addr, &data);
    s.receive(attacker, &data);
    assert_eq!(s.out.host().len(), 1);
    assert_eq!(s.dropped(DropReason::Rejected), 2);
    assert_eq!(s.table.status(&d.id).unwrap().endpoint, Some(d.addr));
}

#[test]
fn an_unanswered_initiation_from_a_replay_does_not_make_a_device_online() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    let init = d.initiation();
    // The server answers, but nobody confirms the session with data.
    assert_eq!(s.receive(d.addr, &init).len(), 1);
    let st = s.table.status(&d.id).unwrap();
    assert!(!st.online);
    assert_eq!(st.endpoint, None);
}

#[test]
fn a_silent_device_goes_offline_after_the_window_and_the_other_stays() {
    let mut s = Server::new();
    let mut a = s.enroll(1);
    let mut b = s.enroll(2);
    a.connect(&mut s);
    b.connect(&mut s);
    assert_eq!(s.table.online_count(), 2);
    // b keeps sending keepalives; a falls silent.
    for _ in 0..4 {
        s.advance(Duration::from_secs(25));
        let ka = b.encrypt(&[]);
        s.receive(b.addr, &ka);
    }
    assert!(!s.table.status(&a.id).unwrap().online);
    assert!(s.table.status(&b.id).unwrap().online);
    assert_eq!(s.table.online_count(), 1);
    let offline: Vec<_> = s
        .out
        .events
        .iter()
        .filter(|e| matches!(e, PeerEvent::Offline { .. }))
        .collect();
    assert_eq!(offline.len(), 1);
    assert!(matches!(offline[0], PeerEvent::Offline { id, generation: 2, .. } if *id == a.id));
    // a comes back: a new generation.
    a.connect(&mut s);
    assert_eq!(s.table.status(&a.id).unwrap().generation, 3);
}

#[test]
fn idle_sessions_are_freed_and_can_be_made_again() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    d.connect(&mut s);
    assert_eq!(s.table.active_sessions(), 1);
    s.advance(WINDOW);
    s.advance(TUNN_IDLE_DROP);
    assert_eq!(s.table.active_sessions(), 0);
    assert!(!s.table.status(&d.id).unwrap().online);
    d.connect(&mut s);
    assert_eq!(s.table.active_sessions(), 1);
    assert!(s.table.status(&d.id).unwrap().online);
}

#[test]
fn removing_a_peer_drops_its_session_at_once() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    d.connect(&mut s);
    assert!(s.table.remove(&d.id, s.now, &mut s.out));
    assert!(matches!(
        s.out.events().last(),
        Some(PeerEvent::Removed { generation: 2, .. })
    ));
    assert_eq!(s.table.online_count(), 0);
    assert_eq!(s.table.active_sessions(), 0);
    let data = d.encrypt(&ipv4(d.ip, SERVER_IP, b"after revoke"));
    s.receive(d.addr, &data);
    assert!(s.out.host().is_empty());
    // and it cannot handshake again
    let init = d.initiation();
    assert!(s.receive(d.addr, &init).is_empty());
    assert_eq!(s.dropped(DropReason::UnknownPeer), 1);
}

#[test]
fn a_rotated_key_replaces_the_old_one() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    d.connect(&mut s);
    let new_private = StaticSecret::from([201u8; 32]);
    s.rekey(&d, &new_private);
    // The session ends as an offline transition: a renewal is not a revocation.
    assert!(
        matches!(
            s.out.events().last(),
            Some(PeerEvent::Offline { generation: 2, .. })
        ),
        "{:?}",
        s.out.events().last()
    );
    // The old key is gone.
    let old_init = d.initiation();
    assert!(s.receive(d.addr, &old_init).is_empty());
    // The new key works, same address and id, generation continues.
    d.tunn = device_tunn(new_private, s.public, 50);
    d.connect(&mut s);
    let st = s.table.status(&d.id).unwrap();
    assert!(st.online);
    // Online (1), offline with the old key (2), online with the new one (3): it never
    // goes down, so event consumers that keep the highest see every change.
    assert_eq!(st.generation, 3, "the generation carries over a re-key");
    assert_eq!(s.table.len(), 1);
}

#[test]
fn an_initiation_flood_gets_cookies_and_established_devices_keep_flowing() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    d.connect(&mut s);
    // Initiations from one unknown key, many sources: valid MAC1, so they count.
    let mut stranger = s.stranger(78);
    let mut cookies = 0;
    for i in 0..(RATE + 200) {
        let init = stranger.initiation();
        let from = SocketAddr::from(([198, 51, 100, (i % 250) as u8], 1000 + (i % 5000) as u16));
        let replies = s.receive(from, &init);
        cookies += replies.iter().filter(|r| r[0] == 3).count();
        if i % 500 == 0 {
            // data from the established device in the middle of the flood
            let data = d.encrypt(&ipv4(d.ip, SERVER_IP, b"still here"));
            s.receive(d.addr, &data);
        }
    }
    assert!(cookies > 0, "no cookie replies under load");
    assert!(
        s.table
            .counters
            .cookie_replies
            .load(std::sync::atomic::Ordering::Relaxed)
            >= cookies as u64
    );
    assert_eq!(s.out.host().len(), (RATE as usize + 200).div_ceil(500));
    // Still under load: a new legitimate device gets a cookie, proves its address with
    // it, and connects.
    let mut fresh = s.enroll(2);
    let init = fresh.initiation();
    let replies = s.receive(fresh.addr, &init);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0][0], 3, "expected a cookie reply under load");
    assert!(fresh.receive(&replies[0]).is_empty());
    let init = fresh.initiation();
    let replies = s.receive(fresh.addr, &init);
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0][0], 2,
        "expected a handshake response with a valid cookie"
    );
    for k in fresh.receive(&replies[0]) {
        s.receive(fresh.addr, &k);
    }
    assert!(s.table.status(&fresh.id).unwrap().online);
}

#[test]
fn failed_initiations_put_the_server_under_load_until_the_next_second() {
    let mut s = Server::new();
    let mut stranger = s.stranger(79);
    // Far below the rate limit, but every one costs a Diffie-Hellman and leads nowhere.
    for i in 0..STRANGER_LIMIT {
        let init = stranger.initiation();
        let from = SocketAddr::from(([198, 51, 100, (i % 250) as u8], 2000 + i as u16));
        assert!(
            s.receive(from, &init).is_empty(),
            "an unknown key gets no answer"
        );
    }
    // A real device is now asked for a cookie.
    let mut d = s.enroll(1);
    let replies = s.receive(d.addr, &d.initiation());
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0][0], 3,
        "expected a cookie reply after the failures"
    );
    // In the next second the count starts again: no cookie asked.
    s.advance(Duration::from_secs(1));
    let mut fresh = s.enroll(2);
    fresh.connect(&mut s);
    assert!(s.table.status(&fresh.id).unwrap().online);
}

#[test]
fn replayed_initiations_of_a_known_key_count_as_failures_and_lose_nothing() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    let init = d.connect(&mut s);
    // A captured initiation replayed from many addresses: each costs a Diffie-Hellman
    // and is rejected (stale timestamp).
    for i in 0..STRANGER_LIMIT {
        let from = SocketAddr::from(([203, 0, 113, (i % 250) as u8], 3000 + i as u16));
        assert!(s.receive(from, &init).is_empty());
    }
    assert_eq!(s.dropped(DropReason::Rejected), STRANGER_LIMIT);
    // The server is now under load: a new device is asked for a cookie...
    let mut other = s.enroll(2);
    let replies = s.receive(other.addr, &other.initiation());
    assert_eq!(replies.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![3]);
    // ...while the established session still carries data, from its own endpoint.
    let data = d.encrypt(&ipv4(d.ip, SERVER_IP, b"still here"));
    s.receive(d.addr, &data);
    assert_eq!(s.out.host().len(), 1);
    assert_eq!(s.table.status(&d.id).unwrap().endpoint, Some(d.addr));
}

#[test]
fn a_backlog_asks_for_cookies_below_the_rate_limit_and_a_cookie_gets_through() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut out = Collected::default();
    // Without a backlog (and far below the rate limit) an initiation is admitted as is.
    let init = d.initiation();
    assert!(s.table.admit(d.addr, &init, false, &mut scratch, &mut out));
    assert!(out.datagrams().is_empty());
    // With one, it is answered with a cookie reply instead, and not admitted.
    let init = d.initiation();
    assert!(!s.table.admit(d.addr, &init, true, &mut scratch, &mut out));
    assert_eq!(out.datagrams().len(), 1);
    let (to, cookie) = out.datagrams().pop().unwrap();
    assert_eq!(
        (to, cookie[0]),
        (d.addr, 3),
        "expected a cookie reply to the sender"
    );
    assert_eq!(
        s.table
            .counters
            .cookie_replies
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The device's retry carries MAC2 and is admitted despite the backlog...
    assert!(d.receive(&cookie).is_empty());
    let retry = d.initiation();
    assert!(s.table.admit(d.addr, &retry, true, &mut scratch, &mut out));
    assert!(out.datagrams().is_empty());
    // ...but the cookie is bound to the address: from elsewhere it is asked again.
    let elsewhere = SocketAddr::from(([198, 51, 100, 7], 4000));
    assert!(!s
        .table
        .admit(elsewhere, &retry, true, &mut scratch, &mut out));
    assert_eq!(out.datagrams().pop().map(|(_, c)| c[0]), Some(3));
    // A worker answers the admitted retry: the device comes online.
    s.table
        .handle_initiation(d.addr, &retry, s.now, &mut scratch, &mut out);
    let (_, response) = out.datagrams().pop().expect("a handshake response");
    assert_eq!(response[0], 2);
    for k in d.receive(&response) {
        s.receive(d.addr, &k);
    }
    assert!(s.table.status(&d.id).unwrap().online);
}

#[test]
fn repeated_connect_and_expire_cycles_of_the_same_devices_leave_nothing_behind() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = Server::new();
    let mut devices: Vec<Device> = (1..=100).map(|n| s.enroll(n)).collect();
    for cycle in 0..6 {
        for d in &mut devices {
            d.connect(&mut s);
            // Some traffic, so data timers are armed too.
            let data = d.encrypt(&ipv4(d.ip, SERVER_IP, b"hello"));
            s.receive(d.addr, &data);
        }
        assert_eq!(s.table.online_count(), 100);
        assert_eq!(s.table.active_sessions(), 100);
        // Silence until every session is past the online window and the idle drop.
        let quiet = WINDOW + TUNN_IDLE_DROP + Duration::from_secs(5);
        let step = Duration::from_millis(250);
        let mut waited = Duration::ZERO;
        while waited < quiet {
            s.advance(step);
            waited += step;
        }
        assert_eq!(
            s.table.online_count(),
            0,
            "cycle {cycle}: devices still online"
        );
        assert_eq!(
            s.table.active_sessions(),
            0,
            "cycle {cycle}: sessions (Tunns and receiver indices) not freed"
        );
        let c = &s.table.counters;
        assert_eq!(
            c.tunns_created.load(Relaxed),
            c.tunns_dropped.load(Relaxed),
            "cycle {cycle}: every Tunn made is freed"
        );
        // A peer with nothing to do has no deadline: the heap drains, it does not grow.
        let entries = s.table.timer_entries();
        assert_eq!(entries, 0, "cycle {cycle}: {entries} timer entries left");
        s.out = Collected::default();
        let peers = s.table.len();
        assert_eq!(peers, 100);
    }
    assert_eq!(
        s.table.counters.tunns_created.load(Relaxed),
        600,
        "one Tunn per device per cycle"
    );
}

#[test]
fn a_session_being_made_survives_a_slow_confirmation() {
    // Under a storm (or on a slow link) the device's confirming keepalive can arrive
    // seconds after the response; the half-made session must still be there. Also for a
    // device returning after its previous session was freed (its last packet is old).
    let mut s = Server::new();
    let mut d = s.enroll(1);
    for round in 0..2 {
        let init = d.initiation();
        let replies = s.receive(d.addr, &init);
        assert_eq!(replies.len(), 1, "round {round}: a handshake response");
        let keepalive = d.receive(&replies[0]);
        for _ in 0..12 {
            s.advance(Duration::from_millis(250));
        }
        s.receive(d.addr, &keepalive[0]);
        assert!(
            s.table.status(&d.id).unwrap().online,
            "round {round}: a confirmation 3 s late was refused"
        );
        assert_eq!(s.dropped(DropReason::UnknownIndex), 0, "round {round}");
        s.advance(WINDOW);
        s.advance(TUNN_IDLE_DROP);
        assert_eq!(
            s.table.active_sessions(),
            0,
            "round {round}: freed when idle"
        );
    }
}

/// `msg` with its MAC1 recomputed for the server's key, as an attacker who knows only the
/// server's public key can.
fn with_valid_mac1(mut msg: Vec<u8>, server_public: &PublicKey) -> Vec<u8> {
    use blake2::digest::consts::U16;
    use blake2::digest::{Digest as _, KeyInit, Mac as _};
    let key = blake2::Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(server_public.as_bytes())
        .finalize();
    let mac1_at = msg.len() - 32;
    let mut mac = <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(&msg[..mac1_at]);
    msg[mac1_at..mac1_at + 16].copy_from_slice(&mac.finalize().into_bytes());
    msg
}

#[test]
fn junk_with_a_bad_mac1_does_not_put_the_server_under_load() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    // More than the rate limit of made-up initiations in one second...
    for i in 0..RATE + 50 {
        let mut junk = vec![0u8; floto_proto::wireguard::INITIATION_LEN];
        junk[0] = 1;
        junk[4..12].copy_from_slice(&i.to_le_bytes());
        let from = SocketAddr::from(([203, 0, 113, (i % 250) as u8], 1000));
        assert!(s.receive(from, &junk).is_empty());
    }
    assert_eq!(s.dropped(DropReason::BadMac), RATE + 50);
    // ...count for nothing: a real device is answered at once, not with a cookie.
    let replies = s.receive(d.addr, &d.initiation());
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0][0], 2,
        "expected a handshake response, not a cookie"
    );
    assert_eq!(
        s.table
            .counters
            .cookie_replies
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_forged_initiation_naming_an_enrolled_key_leaves_no_session_behind() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    // The static key decrypts (it names the enrolled device), the timestamp does not: the
    // sender does not hold the device's private key.
    let mut forged = d.initiation();
    forged[100] ^= 0xff;
    let forged = with_valid_mac1(forged, &s.public);
    assert!(s.receive(d.addr, &forged).is_empty());
    assert_eq!(s.dropped(DropReason::Rejected), 1);
    assert_eq!(
        s.table.active_sessions(),
        0,
        "a Tunn was kept for a forgery"
    );
    assert!(!s.table.status(&d.id).unwrap().has_session);
    // The device itself still connects.
    d.connect(&mut s);
    assert!(s.table.status(&d.id).unwrap().online);
    assert_eq!(s.table.active_sessions(), 1);
}

/// The server side of a handshake made the way the table makes it: a `Tunn` from the
/// peer's precomputed static Diffie-Hellman, and the initiation going on from its
/// `parse_handshake_anon` (the patch in vendor/boringtun.patch).
#[test]
fn a_tunn_made_from_the_precomputed_static_dh_and_the_parsed_initiation_interoperates() {
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::Packet;

    let server_private = StaticSecret::from([3u8; 32]);
    let server_public = PublicKey::from(&server_private);
    let device_private = StaticSecret::from([42u8; 32]);
    let device_public = PublicKey::from(&device_private);
    let mut device = Device {
        id: DeviceId::new_random(),
        ip: Ipv4Addr::new(10, 240, 0, 42),
        addr: SocketAddr::from(([192, 0, 2, 42], 4242)),
        tunn: device_tunn(device_private, server_public, 42),
        buf: vec![0; MAX_DATAGRAM],
    };
    let responder = |shared: [u8; 32]| {
        Tunn::new_precomputed(
            server_private.clone(),
            server_public,
            device_public,
            shared,
            None,
            None,
            1,
            Some(Arc::new(RateLimiter::new(&server_public, u64::MAX))),
        )
    };
    let parse = |datagram: &[u8]| match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(init)) => {
            parse_handshake_anon(&server_private, &server_public, &init).expect("parses")
        }
        _ => panic!("not an initiation"),
    };
    let mut out = vec![0u8; MAX_DATAGRAM];
    let first = device.initiation();
    let half_of_first = parse(&first);
    assert_eq!(half_of_first.peer_static_public, device_public.to_bytes());

    // A wrong static DH: the handshake fails (so the given one is the one used).
    let mut wrong = responder([7u8; 32]);
    assert!(matches!(
        wrong.decapsulate_parsed_init(None, &first, &half_of_first, &mut out),
        TunnResult::Err(_)
    ));

    let shared = server_private.diffie_hellman(&device_public).to_bytes();
    let mut server = responder(shared);
    // The parse of another initiation is refused, and leaves the handshake state alone.
    let second = device.initiation();
    assert!(matches!(
        server.decapsulate_parsed_init(None, &second, &half_of_first, &mut out),
        TunnResult::Err(_)
    ));
    let half_of_second = parse(&second);
    let response = match server.decapsulate_parsed_init(None, &second, &half_of_second, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no response: {other:?}"),
    };
    let keepalive = device.receive(&response);
    assert_eq!(keepalive.len(), 1, "the device accepts the response");
    assert!(matches!(
        server.decapsulate(None, &keepalive[0], &mut out),
        TunnResult::Done
    ));
    // Data both ways.
    let up = ipv4(device.ip, SERVER_IP, b"up");
    let sealed = device.encrypt(&up);
    match server.decapsulate(None, &sealed, &mut out) {
        TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &up[..]),
        other => panic!("not delivered: {other:?}"),
    }
    let down = ipv4(SERVER_IP, device.ip, b"down");
    let sealed = match server.encapsulate(&down, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("not sealed: {other:?}"),
    };
    assert_eq!(device.decrypt(&sealed), Some(down));
    // A replay of the same initiation with its own parse: refused (timestamp).
    assert!(matches!(
        server.decapsulate_parsed_init(None, &second, &half_of_second, &mut out),
        TunnResult::Err(_)
    ));
}

#[test]
fn precomputed_and_lazily_computed_static_dh_both_serve_handshakes() {
    let mut s = Server::new();
    let mut early = s.enroll(1);
    let mut late = s.enroll(2);
    assert!(
        !s.table.has_static_shared(&early.id),
        "nothing computed at enrollment"
    );
    assert!(s.table.precompute(&early.id));
    assert!(s.table.has_static_shared(&early.id));
    assert!(
        !s.table.precompute(&DeviceId::new_random()),
        "unknown device"
    );
    early.connect(&mut s);
    // The late one's first handshake computes it, and it is kept.
    assert!(!s.table.has_static_shared(&late.id));
    late.connect(&mut s);
    assert!(s.table.has_static_shared(&late.id));
    assert_eq!(s.table.online_count(), 2);
    // A new key is a new peer: its Diffie-Hellman is computed again.
    s.rekey(&late, &StaticSecret::from([222u8; 32]));
    assert!(!s.table.has_static_shared(&late.id));
}

/// What the workers do with an initiation they take from the queue: while initiations are
/// failing, one without a cookie is answered with a cookie reply instead of its
/// Diffie-Hellmans (a flood queued before its failures were counted costs no more of them).
#[test]
fn queued_initiations_are_rechecked_for_a_cookie_while_initiations_fail() {
    let mut s = Server::new();
    let mut d = s.enroll(1);
    let queued = d.initiation();
    let mut fx = Effects::new();
    assert!(
        s.table.recheck(d.addr, &queued, &mut s.scratch, &mut fx),
        "no failures yet: handled"
    );
    assert!(fx.poll_transmit().is_none());
    let mut stranger = s.stranger(80);
    for i in 0..STRANGER_LIMIT {
        let from = SocketAddr::from(([198, 51, 100, (i % 250) as u8], 3000 + i as u16));
        s.receive(from, &stranger.initiation());
    }
    assert!(
        !s.table.recheck(d.addr, &queued, &mut s.scratch, &mut fx),
        "after the failures it needs a cookie"
    );
    let (to, cookie) = fx.poll_transmit().expect("a cookie reply");
    assert_eq!((to, cookie[0]), (d.addr, 3));
    // With the cookie, the retry is handled.
    let cookie = cookie.to_vec();
    assert!(d.receive(&cookie).is_empty());
    let retry = d.initiation();
    assert!(s.table.recheck(d.addr, &retry, &mut s.scratch, &mut fx));
    // And in the next second, without one again.
    s.advance(Duration::from_secs(1));
    let mut fresh = s.enroll(2);
    let init = fresh.initiation();
    assert!(s.table.recheck(fresh.addr, &init, &mut s.scratch, &mut fx));
}
