//! Property tests of the concentrator core, on the in-memory harness of [`super::tests`]:
//! junk datagrams from anywhere, and random sequences of what devices and the registry do,
//! checked against a simple model after every step. The normal suite runs a bounded number
//! of cases; `benches/fuzz.sh` runs many more (`PROPTEST_CASES`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use proptest::prelude::*;
use proptest::sample::Index;

use floto_proto::wireguard::is_initiation;

use super::counters::DropReason;
use super::tests::{device_tunn, ipv4, Device, Server, SERVER_IP, WINDOW};
use super::timers::TUNN_IDLE_DROP;

/// `cases` cases, unless `PROPTEST_CASES` asks for another number (a long run).
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        default
    } else {
        ProptestConfig { cases, ..default }
    }
}

impl Server {
    /// Feeds a datagram as the UDP driver does: an initiation through `admit` and, when
    /// admitted, `handle_initiation` (a handshake worker's part); anything else through
    /// `route_datagram`.
    fn drive(&mut self, from: SocketAddr, datagram: &[u8], backlogged: bool) {
        if is_initiation(datagram) {
            if self
                .table
                .admit(from, datagram, backlogged, &mut self.scratch, &mut self.out)
            {
                self.table.handle_initiation(
                    from,
                    datagram,
                    self.now,
                    &mut self.scratch,
                    &mut self.out,
                );
            }
        } else {
            self.table
                .route_datagram(from, datagram, self.now, &mut self.scratch, &mut self.out);
        }
    }

    /// Drops of every reason together.
    fn drops(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(*r)).sum()
    }
}

// ---- junk datagrams -------------------------------------------------------------------

/// One junk datagram and how it arrives.
#[derive(Debug, Clone)]
struct Junk {
    bytes: Vec<u8>,
    /// Its receiver index (where its type has one) replaced by the live session's, so that
    /// it gets past the index lookup to the session itself.
    at_session: bool,
    /// Sent from the enrolled device's own address rather than `from`.
    from_device: bool,
    from: SocketAddr,
    /// `None`: through `route_datagram`; `Some(backlogged)`: as the UDP driver does.
    driver: Option<bool>,
}

/// Any bytes, but mostly of WireGuard's shapes: types 1 to 4 with zero reserved bytes, and
/// the lengths of an initiation (148), a response (92), a cookie reply (64) and data (32
/// and up in steps of 16).
fn junk_bytes() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        3 => prop_oneof![Just(148usize), Just(92), Just(64)],
        2 => (0usize..=8).prop_map(|k| 32 + 16 * k),
        1 => 0usize..=200,
        1 => 0usize..=2000,
    ];
    let first = prop_oneof![4 => 1u8..=4, 1 => any::<u8>()];
    (len, first, any::<bool>()).prop_flat_map(|(len, first, zero_reserved)| {
        prop::collection::vec(any::<u8>(), len).prop_map(move |mut b| {
            if let Some(b0) = b.first_mut() {
                *b0 = first;
            }
            if zero_reserved && b.len() >= 4 {
                b[1..4].fill(0);
            }
            b
        })
    })
}

fn junk() -> impl Strategy<Value = Junk> {
    (
        junk_bytes(),
        any::<bool>(),
        any::<bool>(),
        any::<SocketAddr>(),
        any::<Option<bool>>(),
    )
        .prop_map(|(bytes, at_session, from_device, from, driver)| Junk {
            bytes,
            at_session,
            from_device,
            from,
            driver,
        })
}

/// The server's receiver index of `d`'s session, as `d` puts it on its data messages.
fn session_index(d: &mut Device) -> [u8; 4] {
    let keepalive = d.encrypt(&[]);
    [keepalive[4], keepalive[5], keepalive[6], keepalive[7]]
}

proptest! {
    #![proptest_config(config(512))]

    /// Junk from an enrolled device's address or anyone else's, through either path: each
    /// datagram is one drop and nothing else (no reply, no packet for the host, no event,
    /// no session, no change to the device), and the device's session still carries data.
    #[test]
    fn junk_datagrams_are_each_dropped_once_and_the_session_carries_on(
        junks in prop::collection::vec(junk(), 1..=8),
    ) {
        let mut s = Server::new();
        let mut d = s.enroll(1);
        d.connect(&mut s);
        let index = session_index(&mut d);
        for j in &junks {
            let mut datagram = j.bytes.clone();
            // Types 3 and 4 carry the receiver index at 4, a response (2) at 8.
            let at = if datagram.first() == Some(&2) { 8 } else { 4 };
            if j.at_session && datagram.len() >= at + 4 {
                datagram[at..at + 4].copy_from_slice(&index);
            }
            let from = if j.from_device { d.addr } else { j.from };
            let drops = s.drops();
            let sent = s.out.datagrams().len();
            let status = s.table.status(&d.id);
            match j.driver {
                None => {
                    s.receive(from, &datagram);
                }
                Some(backlogged) => s.drive(from, &datagram, backlogged),
            }
            prop_assert_eq!(s.drops(), drops + 1, "drops counted for {:?}", datagram);
            prop_assert_eq!(s.out.datagrams().len(), sent, "answered {:?}", datagram);
            prop_assert!(s.out.host().is_empty());
            prop_assert!(s.out.events().len() == 1, "only the device's Online event");
            prop_assert_eq!(s.table.active_sessions(), 1);
            prop_assert_eq!(&s.table.status(&d.id), &status);
        }
        let packet = ipv4(d.ip, SERVER_IP, b"still here");
        let data = d.encrypt(&packet);
        s.receive(d.addr, &data);
        prop_assert_eq!(s.out.host().clone(), vec![(d.id, packet)]);
    }
}

// ---- random lives of devices against a model ------------------------------------------

/// What happens next.
#[derive(Debug, Clone)]
enum Step {
    /// A new device enrolls.
    Enroll,
    /// The device handshakes.
    Connect(Index),
    /// The device moves to a new source address and sends data.
    Roam(Index),
    /// The device renews with a new WireGuard key.
    Rekey(Index),
    /// The device is revoked.
    Revoke(Index),
    /// Time passes, seconds.
    Wait(u64),
    /// The device sends data.
    Data(Index),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Enroll),
        4 => any::<Index>().prop_map(Step::Connect),
        2 => any::<Index>().prop_map(Step::Roam),
        1 => any::<Index>().prop_map(Step::Rekey),
        1 => any::<Index>().prop_map(Step::Revoke),
        // Short waits keep devices online, long ones end sessions.
        2 => prop_oneof![1u64..=30, 1u64..=300].prop_map(Step::Wait),
        3 => any::<Index>().prop_map(Step::Data),
    ]
}

/// A simulated device and what the table should say of it.
struct Model {
    dev: Device,
    removed: bool,
    online: bool,
    generation: u64,
    /// The highest generation the table has shown for this device.
    seen_generation: u64,
    /// The server holds a session made with the device's current `Tunn`.
    session: bool,
    /// The device's `Tunn` has a session (it can encrypt).
    device_session: bool,
    endpoint: Option<SocketAddr>,
    /// Last authenticated packet from the device.
    last_rx: Option<Instant>,
    /// Last authenticated packet, or data either way.
    last_active: Option<Instant>,
}

impl Model {
    fn new(dev: Device) -> Self {
        Self {
            dev,
            removed: false,
            online: false,
            generation: 0,
            seen_generation: 0,
            session: false,
            device_session: false,
            endpoint: None,
            last_rx: None,
            last_active: None,
        }
    }

    /// An authenticated packet from `from` arrived at `now`.
    fn alive(&mut self, from: SocketAddr, now: Instant) {
        self.last_rx = Some(now);
        self.last_active = Some(now);
        self.endpoint = Some(from);
        if !self.online {
            self.online = true;
            self.generation += 1;
        }
    }

    /// The peer left the table (revoked, or replaced with a new key).
    fn leave(&mut self) {
        if self.online {
            self.online = false;
            self.generation += 1;
        }
        self.session = false;
    }

    /// Timers ran at `now`: the online window, then the idle session.
    fn tick(&mut self, now: Instant) {
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        if self.online && since(self.last_rx).is_some_and(|d| d >= WINDOW) {
            self.online = false;
            self.generation += 1;
        }
        if self.session
            && !self.online
            && since(self.last_active).is_some_and(|d| d >= TUNN_IDLE_DROP)
        {
            self.session = false;
        }
    }
}

/// Fresh keys for re-keyed devices, none of them a key the harness enrolls with.
fn rekey_secret(k: u16) -> StaticSecret {
    let mut bytes = [0x5a; 32];
    bytes[8..10].copy_from_slice(&k.to_le_bytes());
    StaticSecret::from(bytes)
}

/// Sends data from `m`'s device at its current address, if it can encrypt; checks that it
/// reaches the host exactly when the server has its session.
fn send_data(s: &mut Server, m: &mut Model) -> Result<(), TestCaseError> {
    if !m.device_session {
        return Ok(());
    }
    let packet = ipv4(m.dev.ip, SERVER_IP, b"data");
    let datagram = m.dev.encrypt(&packet);
    s.receive(m.dev.addr, &datagram);
    let delivered = std::mem::take(s.out.host());
    let expected = !m.removed && m.session;
    prop_assert_eq!(
        delivered,
        if expected {
            vec![(m.dev.id, packet)]
        } else {
            vec![]
        },
        "data of {:?}",
        m.dev.id
    );
    if expected {
        m.alive(m.dev.addr, s.now);
    }
    Ok(())
}

/// Everything the table says agrees with the model; then a packet to every device's
/// address goes to that device, or is dropped for the reason the model gives.
fn check(s: &mut Server, models: &mut [Model]) -> Result<(), TestCaseError> {
    let live = models.iter().filter(|m| !m.removed).count();
    prop_assert_eq!(s.table.len(), live);
    let mut online = 0;
    let mut sessions = 0;
    for m in models.iter_mut() {
        let status = s.table.status(&m.dev.id);
        if m.removed {
            prop_assert_eq!(status, None, "a removed device has a status");
            continue;
        }
        let Some(st) = status else {
            return Err(TestCaseError::fail(format!("{:?} has no status", m.dev.id)));
        };
        prop_assert_eq!(st.online, m.online, "online of {:?}", m.dev.id);
        prop_assert_eq!(st.has_session, m.session, "session of {:?}", m.dev.id);
        prop_assert!(!st.online || st.has_session, "online without a session");
        prop_assert_eq!(st.endpoint, m.endpoint);
        prop_assert_eq!(st.generation, m.generation);
        prop_assert!(
            st.generation >= m.seen_generation,
            "generation of {:?} went down from {} to {}",
            m.dev.id,
            m.seen_generation,
            st.generation
        );
        m.seen_generation = st.generation;
        online += u64::from(st.online);
        sessions += usize::from(st.has_session);
    }
    prop_assert_eq!(s.table.online_count(), online);
    prop_assert_eq!(s.table.active_sessions(), sessions);

    for m in models.iter_mut() {
        let packet = ipv4(SERVER_IP, m.dev.ip, b"probe");
        let why = if m.removed {
            DropReason::NoPeer
        } else if m.endpoint.is_none() {
            DropReason::NoEndpoint
        } else if m.online {
            let before = s.out.datagrams().len();
            s.table
                .send_to_device(&packet, s.now, &mut s.scratch, &mut s.out);
            let sent = s.out.datagrams().split_off(before);
            prop_assert_eq!(sent.len(), 1, "datagrams to {}", m.dev.ip);
            let (to, datagram) = &sent[0];
            prop_assert_eq!(Some(*to), m.endpoint, "sent to another endpoint");
            prop_assert_eq!(m.dev.decrypt(datagram), Some(packet), "not for this device");
            m.last_active = Some(s.now);
            continue;
        } else {
            // Offline with an endpoint: a packet would start a handshake; not probed.
            continue;
        };
        let (before, dropped) = (s.out.datagrams().len(), s.dropped(why));
        s.table
            .send_to_device(&packet, s.now, &mut s.scratch, &mut s.out);
        prop_assert_eq!(s.out.datagrams().len(), before, "sent to {}", m.dev.ip);
        prop_assert_eq!(s.dropped(why), dropped + 1, "{:?} for {}", why, m.dev.ip);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1024))]

    /// Devices enroll, connect, roam, re-key, get revoked and fall silent in any order; after
    /// every step the table agrees with a model of them: who is enrolled, online and holds a
    /// session, where each is reached, its generation, and that no address leads elsewhere.
    #[test]
    fn any_sequence_of_device_lives_keeps_the_table_consistent(
        steps in prop::collection::vec(step(), 1..=40),
    ) {
        let mut s = Server::new();
        let mut models: Vec<Model> = Vec::new();
        let mut fresh: u16 = 0;
        for step in &steps {
            fresh += 1;
            let count = models.len();
            let pick = |i: &Index| (count > 0).then(|| i.index(count));
            match step {
                Step::Enroll => {
                    let n = u8::try_from(models.len() + 1).unwrap_or(u8::MAX);
                    models.push(Model::new(s.enroll(n)));
                }
                Step::Connect(i) => {
                    let Some(m) = pick(i).map(|i| &mut models[i]) else { continue };
                    if m.removed {
                        let init = m.dev.initiation();
                        let replies = s.receive(m.dev.addr, &init);
                        prop_assert!(replies.is_empty(), "a revoked device was answered");
                    } else {
                        m.dev.connect(&mut s);
                        m.session = true;
                        m.device_session = true;
                        m.alive(m.dev.addr, s.now);
                    }
                }
                Step::Roam(i) => {
                    let Some(m) = pick(i).map(|i| &mut models[i]) else { continue };
                    let [a, b] = fresh.to_be_bytes();
                    m.dev.addr = SocketAddr::from((Ipv4Addr::new(198, 18, a, b), 30_000));
                    send_data(&mut s, m)?;
                }
                Step::Data(i) => {
                    let Some(m) = pick(i).map(|i| &mut models[i]) else { continue };
                    send_data(&mut s, m)?;
                }
                Step::Rekey(i) => {
                    let Some(m) = pick(i).map(|i| &mut models[i]) else { continue };
                    if m.removed {
                        continue;
                    }
                    let private = rekey_secret(fresh);
                    s.rekey(&m.dev, &private);
                    let old = m.dev.initiation();
                    let replies = s.receive(m.dev.addr, &old);
                    prop_assert!(replies.is_empty(), "the old key was answered");
                    m.dev.tunn = device_tunn(private, s.public, 1000 + u32::from(fresh));
                    m.leave();
                    // The replacing peer carries the generation over (it once restarted at
                    // 0, found by this test: Enroll, Connect, Rekey).
                    m.device_session = false;
                    m.endpoint = None;
                    m.last_rx = None;
                    m.last_active = None;
                }
                Step::Revoke(i) => {
                    let Some(m) = pick(i).map(|i| &mut models[i]) else { continue };
                    let id = m.dev.id;
                    prop_assert_eq!(s.table.remove(&id, s.now, &mut s.out), !m.removed);
                    m.leave();
                    m.removed = true;
                }
                Step::Wait(secs) => {
                    s.advance(Duration::from_secs(*secs));
                    for m in models.iter_mut().filter(|m| !m.removed) {
                        m.tick(s.now);
                    }
                }
            }
            check(&mut s, &mut models)?;
        }
    }
}
