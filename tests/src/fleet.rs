//! A fleet of simulated WireGuard devices for storms, restarts and idle fleets. Each device
//! is a real boringtun `Tunn` (the initiator, as a device is) with its own key and its own
//! loopback source address (`127.1.0.0` + n), so the server sees N distinct endpoints.
//! A few threads drive all devices over one UDP socket each: the source address of every
//! datagram is set with `IP_PKTINFO`, and the destination address of every reply (also from
//! `IP_PKTINFO`) names its device, so 100,000 devices need one socket per thread rather
//! than one per device. The sockets can be made inside a network namespace, to reach a
//! server there (wireguard-go) over that namespace's own loopback.
//!
//! What it does not do: enroll devices (see [`crate::enroll`]) or decide what is measured;
//! it records, per device, when a handshake last completed, and counts messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The first device's source address; device n sends from `127.1.0.0 + n`.
pub const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 0);

/// Devices one fleet can hold (source addresses up to 127.254.255.255).
pub const MAX_DEVICES: usize = 0x00fd_ffff;

/// Source address of device `n`.
pub fn source_address(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_SOURCE) + n as u32)
}

/// One simulated device: its WireGuard key and (when it pings) its overlay address.
pub struct FleetDevice {
    pub secret: StaticSecret,
    pub overlay_ip: Option<Ipv4Addr>,
}

/// How the fleet runs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Driver threads (each with one socket and its share of the devices).
    pub threads: usize,
    /// The devices' persistent keepalive, seconds.
    pub keepalive: Option<u16>,
    /// Every device's boringtun timers run at least this often (retransmits, keepalives,
    /// rekeys): 250 ms is finer than WireGuard's 333 ms retransmit jitter.
    pub timer_sweep: Duration,
    /// Make the sockets inside this network namespace (its name under /run/netns).
    pub netns: Option<String>,
    /// Where ICMP echo requests go when [`Fleet::ping_all`] is called.
    pub ping_target: Option<Ipv4Addr>,
    /// Rekey as kernel WireGuard and wireguard-go do (`keep_key_fresh`): a device whose
    /// session it started more than 120 s ago starts a new handshake when it sends anything,
    /// keepalives included. boringtun 0.7 rekeys only when it sends data, so without this an
    /// idle device's session simply expires after 180 s.
    pub rekey_like_kernel: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            keepalive: Some(25),
            timer_sweep: Duration::from_millis(250),
            netns: None,
            ping_target: None,
            rekey_like_kernel: false,
        }
    }
}

/// WireGuard's REKEY_AFTER_TIME and REKEY_TIMEOUT.
const REKEY_AFTER: Duration = Duration::from_secs(120);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of the whole fleet.
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Handshake initiations sent (first attempts and retransmits).
    pub initiations_sent: AtomicU64,
    /// Cookie replies received (the server was under load).
    pub cookie_replies: AtomicU64,
    /// Handshakes completed, as initiator (response received) or responder (server called).
    pub handshakes_completed: AtomicU64,
    /// Datagrams the devices' sessions rejected.
    pub rejected: AtomicU64,
    /// Datagrams sent and received.
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Datagrams the kernel refused to send (full buffers).
    pub send_errors: AtomicU64,
    /// ICMP echo replies decrypted.
    pub pongs: AtomicU64,
}

/// A plain copy of [`FleetCounters`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CounterSnapshot {
    pub initiations_sent: u64,
    pub cookie_replies: u64,
    pub handshakes_completed: u64,
    pub rejected: u64,
    pub sent: u64,
    pub received: u64,
    pub send_errors: u64,
    pub pongs: u64,
}

impl FleetCounters {
    fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            initiations_sent: l(&self.initiations_sent),
            cookie_replies: l(&self.cookie_replies),
            handshakes_completed: l(&self.handshakes_completed),
            rejected: l(&self.rejected),
            sent: l(&self.sent),
            received: l(&self.received),
            send_errors: l(&self.send_errors),
            pongs: l(&self.pongs),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Per-device records, in nanoseconds since the fleet's epoch plus one (0 = never).
#[derive(Default)]
struct DeviceRecord {
    /// First handshake completed since the last [`Fleet::mark`].
    since_mark: AtomicU64,
    /// Last handshake completed.
    last_handshake: AtomicU64,
    /// Echo replies received.
    pongs: AtomicU64,
}

struct Shared {
    epoch: Instant,
    server: SocketAddr,
    devices: usize,
    threads: usize,
    /// Devices start handshaking when this is set.
    go: AtomicBool,
    stop: AtomicBool,
    ready: AtomicUsize,
    /// Incremented by [`Fleet::ping_all`]; threads ping once per increment.
    ping_round: AtomicU64,
    records: Vec<DeviceRecord>,
    counters: FleetCounters,
}

impl Shared {
    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp > 0).then(|| self.epoch + Duration::from_nanos(stamp - 1))
    }
}

/// A running fleet; its threads stop when it is dropped.
pub struct Fleet {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.shared.devices)
            .field("threads", &self.shared.threads)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Builds every device's `Tunn` (before any clock starts) and opens the sockets; the
    /// devices stay silent until [`start`](Self::start).
    pub fn new(
        server: SocketAddr,
        server_public: PublicKey,
        devices: Vec<FleetDevice>,
        options: FleetOptions,
    ) -> std::io::Result<Self> {
        assert!(
            devices.len() <= MAX_DEVICES,
            "too many devices for one fleet"
        );
        raise_fd_limit();
        let threads = options.threads.max(1);
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            server,
            devices: devices.len(),
            threads,
            go: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            ping_round: AtomicU64::new(0),
            records: (0..devices.len())
                .map(|_| DeviceRecord::default())
                .collect(),
            counters: FleetCounters::default(),
        });
        // Device n belongs to thread n % threads, at slot n / threads.
        let mut shares: Vec<Vec<(usize, FleetDevice)>> = (0..threads).map(|_| Vec::new()).collect();
        for (n, d) in devices.into_iter().enumerate() {
            shares[n % threads].push((n, d));
        }
        let mut handles = Vec::with_capacity(threads);
        for (t, share) in shares.into_iter().enumerate() {
            let socket = fleet_socket(options.netns.as_deref())?;
            let shared = shared.clone();
            let options = options.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fleet-{t}"))
                .spawn(move || {
                    let mut driver = Driver::new(t, share, socket, server_public, &options, shared);
                    driver.run();
                })?;
            handles.push(handle);
        }
        let fleet = Self { shared, handles };
        while fleet.shared.ready.load(Ordering::Acquire) < threads {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.shared.devices
    }

    pub fn is_empty(&self) -> bool {
        self.shared.devices == 0
    }

    /// Every device sends its first initiation now (a storm). Returns the start time, which
    /// is also a [`mark`](Self::mark).
    pub fn start(&self) -> Instant {
        let t = self.mark();
        self.shared.go.store(true, Ordering::Release);
        t
    }

    /// Forgets which devices completed a handshake, so [`online_since_mark`] counts only
    /// handshakes from now on (e.g. at a server restart). Returns the mark's time.
    ///
    /// [`online_since_mark`]: Self::online_since_mark
    pub fn mark(&self) -> Instant {
        for r in &self.shared.records {
            r.since_mark.store(0, Ordering::Relaxed);
        }
        Instant::now()
    }

    /// Per device: when its first handshake since the last mark completed.
    pub fn online_since_mark(&self) -> Vec<Option<Instant>> {
        self.shared
            .records
            .iter()
            .map(|r| self.shared.at(r.since_mark.load(Ordering::Relaxed)))
            .collect()
    }

    /// Devices with a handshake completed since the last mark.
    pub fn online_count(&self) -> usize {
        self.shared
            .records
            .iter()
            .filter(|r| r.since_mark.load(Ordering::Relaxed) > 0)
            .count()
    }

    /// Per device: echo replies received so far.
    pub fn pongs(&self) -> Vec<u64> {
        self.shared
            .records
            .iter()
            .map(|r| r.pongs.load(Ordering::Relaxed))
            .collect()
    }

    /// Every device with a session sends one ICMP echo request to the ping target.
    pub fn ping_all(&self) {
        self.shared.ping_round.fetch_add(1, Ordering::Release);
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    /// The server the fleet talks to.
    pub fn server(&self) -> SocketAddr {
        self.shared.server
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

struct SimDevice {
    n: usize,
    tunn: Tunn,
    overlay_ip: Option<Ipv4Addr>,
    /// Where this device sends: the fleet's server at first, then wherever an
    /// authenticated packet last came from (WireGuard roaming: a device follows a cluster
    /// node that calls it back).
    endpoint: SocketAddr,
    /// When this device last started a kernel-like rekey (at most one per REKEY_TIMEOUT).
    rekeyed_at: Option<Instant>,
}

/// One thread's devices and socket.
struct Driver {
    thread: usize,
    devices: Vec<SimDevice>,
    socket: UdpSocket,
    shared: Arc<Shared>,
    server_ip: IpAddr,
    ping_target: Option<Ipv4Addr>,
    sweep: Duration,
    keepalive: bool,
    rekey_like_kernel: bool,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// Initiations a thread sends between two looks at its socket during a storm.
const INITIATE_BATCH: usize = 32;
/// Device timers a thread runs between two looks at its socket. A retransmit costs a
/// Diffie-Hellman: after a slow turn an uncapped sweep would retransmit for thousands of
/// devices at once while the server's answers overflow the socket, and the devices'
/// simulated slowness would be counted as the server's.
const TIMER_BATCH: usize = 512;
/// Datagrams a thread reads in one turn before it looks at its timers again.
const RECEIVE_BATCH: usize = 4096;

impl Driver {
    fn new(
        thread: usize,
        share: Vec<(usize, FleetDevice)>,
        socket: UdpSocket,
        server_public: PublicKey,
        options: &FleetOptions,
        shared: Arc<Shared>,
    ) -> Self {
        let devices = share
            .into_iter()
            .map(|(n, d)| SimDevice {
                n,
                // The 24-bit local index is the device number: unique in the fleet.
                tunn: Tunn::new(
                    d.secret,
                    server_public,
                    None,
                    options.keepalive,
                    n as u32,
                    None,
                ),
                overlay_ip: d.overlay_ip,
                endpoint: shared.server,
                rekeyed_at: None,
            })
            .collect();
        let server_ip = shared.server.ip();
        Self {
            thread,
            devices,
            socket,
            shared,
            server_ip,
            ping_target: options.ping_target,
            sweep: options.timer_sweep,
            keepalive: options.keepalive.is_some(),
            rekey_like_kernel: options.rekey_like_kernel,
            buf: vec![0; 65_536],
            out: vec![0; 65_536],
        }
    }

    fn run(&mut self) {
        self.shared.ready.fetch_add(1, Ordering::Release);
        let mut initiated = 0usize;
        let mut sweep_pos = 0usize;
        let mut last_sweep = Instant::now();
        // Devices whose timers are due but not yet run (the rest of a capped sweep).
        let mut sweep_owed = 0.0f64;
        let mut ping_round = 0u64;
        let mut ping_pos = usize::MAX;
        while !self.shared.stop.load(Ordering::Acquire) {
            let mut busy = self.receive_all();
            let go = self.shared.go.load(Ordering::Acquire);
            if go && initiated < self.devices.len() {
                let end = (initiated + INITIATE_BATCH).min(self.devices.len());
                for slot in initiated..end {
                    self.initiate(slot);
                }
                initiated = end;
                busy = true;
            }
            // Timers: a share of the devices proportional to the time since the last share,
            // at most TIMER_BATCH per turn; what is left is owed to the next turns (never
            // more than one full sweep).
            if go && !self.devices.is_empty() {
                let now = Instant::now();
                let len = self.devices.len() as f64;
                sweep_owed = (sweep_owed
                    + (now - last_sweep).as_secs_f64() / self.sweep.as_secs_f64() * len)
                    .min(len);
                last_sweep = now;
                let run = (sweep_owed as usize).min(TIMER_BATCH);
                for _ in 0..run {
                    self.timers(sweep_pos);
                    sweep_pos = (sweep_pos + 1) % self.devices.len();
                }
                sweep_owed -= run as f64;
                busy |= sweep_owed >= 1.0;
            }
            let round = self.shared.ping_round.load(Ordering::Acquire);
            if round != ping_round {
                ping_round = round;
                ping_pos = 0;
            }
            if ping_pos < self.devices.len() {
                let end = (ping_pos + INITIATE_BATCH).min(self.devices.len());
                for slot in ping_pos..end {
                    self.ping(slot);
                }
                ping_pos = end;
                busy = true;
            }
            if !busy {
                wait_readable(self.socket.as_raw_fd(), Duration::from_millis(5));
            }
        }
    }

    /// Handles every datagram queued on the socket; `true` if there was any.
    fn receive_all(&mut self) -> bool {
        let mut any = false;
        for _ in 0..RECEIVE_BATCH {
            let Some((len, dst, from)) = recv_with_dst(&self.socket, &mut self.buf) else {
                break;
            };
            any = true;
            bump(&self.shared.counters.received);
            let n = (u32::from(dst).wrapping_sub(u32::from(FIRST_SOURCE))) as usize;
            if n >= self.shared.devices || n % self.shared.threads != self.thread {
                continue;
            }
            self.handle(n / self.shared.threads, len, from);
        }
        any
    }

    fn handle(&mut self, slot: usize, len: usize, from: SocketAddr) {
        let kind = self.buf.first().copied().unwrap_or(0);
        if kind == 3 {
            bump(&self.shared.counters.cookie_replies);
        }
        let dev = &mut self.devices[slot];
        let n = dev.n;
        let mut completed = false;
        let mut first = true;
        loop {
            let input = if first { &self.buf[..len] } else { &[][..] };
            let r = dev
                .tunn
                .decapsulate(Some(self.server_ip), input, &mut self.out);
            if first && !matches!(r, TunnResult::Err(_)) && from.port() != 0 {
                dev.endpoint = from;
            }
            match r {
                TunnResult::WriteToNetwork(p) => {
                    // A response (kind 2) or our keepalive after one: a session now.
                    if first && (kind == 2 || (kind == 1 && p.first() == Some(&2))) {
                        completed = true;
                    }
                    send_from(
                        &self.socket,
                        source_address(n),
                        dev.endpoint,
                        p,
                        &self.shared.counters,
                    );
                }
                TunnResult::WriteToTunnelV4(packet, _) => {
                    if packet.get(9) == Some(&1) && packet.get(20) == Some(&0) {
                        bump(&self.shared.counters.pongs);
                        self.shared.records[n].pongs.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                TunnResult::Err(_) => {
                    if first {
                        bump(&self.shared.counters.rejected);
                    }
                    break;
                }
                _ => break,
            }
            first = false;
        }
        if completed {
            let stamp = self.shared.stamp(Instant::now());
            let rec = &self.shared.records[n];
            rec.last_handshake.store(stamp, Ordering::Relaxed);
            let _ = rec
                .since_mark
                .compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed);
            bump(&self.shared.counters.handshakes_completed);
        }
    }

    fn initiate(&mut self, slot: usize) {
        let dev = &mut self.devices[slot];
        if let TunnResult::WriteToNetwork(p) =
            dev.tunn.format_handshake_initiation(&mut self.out, false)
        {
            bump(&self.shared.counters.initiations_sent);
            send_from(
                &self.socket,
                source_address(dev.n),
                dev.endpoint,
                p,
                &self.shared.counters,
            );
        }
    }

    fn timers(&mut self, slot: usize) {
        let dev = &mut self.devices[slot];
        let n = dev.n;
        let mut rekey = false;
        let expired = match dev.tunn.update_timers(&mut self.out) {
            TunnResult::WriteToNetwork(p) => {
                if p.first() == Some(&1) {
                    bump(&self.shared.counters.initiations_sent);
                }
                // A keepalive (a data message with no payload) on an old session: kernel
                // WireGuard starts a new handshake with it (keep_key_fresh).
                rekey = self.rekey_like_kernel
                    && p.first() == Some(&4)
                    && p.len() == 32
                    && dev
                        .tunn
                        .time_since_last_handshake()
                        .is_some_and(|age| age >= REKEY_AFTER)
                    && dev
                        .rekeyed_at
                        .is_none_or(|at| at.elapsed() >= REKEY_TIMEOUT);
                send_from(
                    &self.socket,
                    source_address(n),
                    dev.endpoint,
                    p,
                    &self.shared.counters,
                );
                false
            }
            TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => true,
            _ => false,
        };
        if rekey {
            self.devices[slot].rekeyed_at = Some(Instant::now());
            self.initiate(slot);
        }
        // A device with a persistent keepalive never gives up: its next keepalive starts a
        // new handshake after boringtun's 90 s of retries.
        if expired && self.keepalive {
            self.initiate(slot);
        }
    }

    fn ping(&mut self, slot: usize) {
        let dev = &mut self.devices[slot];
        let (Some(src), Some(dst)) = (dev.overlay_ip, self.ping_target) else {
            return;
        };
        if dev.tunn.time_since_last_handshake().is_none() {
            return;
        }
        let packet = icmp_echo(src, dst, dev.n as u16);
        if let TunnResult::WriteToNetwork(p) = dev.tunn.encapsulate(&packet, &mut self.out) {
            send_from(
                &self.socket,
                source_address(dev.n),
                dev.endpoint,
                p,
                &self.shared.counters,
            );
        }
    }
}

/// An IPv4 ICMP echo request with a valid header checksum and ICMP checksum.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let payload = b"floto-fleet-ping";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&0x0f10u16.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p[28..].copy_from_slice(payload);
    let sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---- sockets: the only unsafe code of the fleet ----------------------------------------

/// Raises the soft RLIMIT_NOFILE to the hard limit (the fleet itself needs few, but the
/// benchmarks around it open many).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A non-blocking UDP socket on 0.0.0.0 with a kernel-chosen port, `IP_PKTINFO` on and big
/// buffers; made inside `netns` when given.
fn fleet_socket(netns: Option<&str>) -> std::io::Result<UdpSocket> {
    let Some(ns) = netns else {
        return plain_fleet_socket();
    };
    let path = format!("/run/netns/{ns}");
    let ns_file = std::fs::File::open(&path)?;
    // A socket belongs to the namespace of the thread that made it: make it on a thread
    // that joins the namespace, then hand it back.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (short-lived) thread with a valid namespace fd.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            plain_fleet_socket()
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    })
}

fn plain_fleet_socket() -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_nonblocking(true)?;
    let fd = socket.as_raw_fd();
    let one: libc::c_int = 1;
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt on an open socket with pointers to live ints of the right size.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // Buffers past rmem_max need CAP_NET_ADMIN (FORCE); fall back to the capped ones.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let len = size_of::<libc::c_int>() as libc::socklen_t;
            let p = (&size as *const libc::c_int).cast();
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, len) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, len);
            }
        }
    }
    Ok(socket)
}

/// Sends `data` to `to` from the local address `from` (IP_PKTINFO).
fn send_from(
    socket: &UdpSocket,
    from: Ipv4Addr,
    to: SocketAddr,
    data: &[u8],
    counters: &FleetCounters,
) {
    let SocketAddr::V4(to) = to else {
        bump(&counters.send_errors);
        return;
    };
    let mut dst = sockaddr_in(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u8; 64];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
    // SAFETY: msghdr is plain data; every pointer set below points at locals that outlive
    // the sendmsg call, and the control buffer is large enough for one in_pktinfo cmsg.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(from).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), info);
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        bump(&counters.send_errors);
    } else {
        bump(&counters.sent);
    }
}

/// Receives one datagram; returns its length and the local address it was sent to.
/// Receives one datagram: its length, the local address it was sent to (which device), and
/// who sent it.
fn recv_with_dst(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, Ipv4Addr, SocketAddr)> {
    let mut src: libc::sockaddr_in = unsafe_zeroed_sockaddr();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u8; 128];
    // SAFETY: as in send_from: every pointer refers to a local that outlives recvmsg, and
    // the cmsg walk stays inside the control length the kernel reports.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut src as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return None;
        }
        let from = SocketAddr::from((
            Ipv4Addr::from(u32::from_be(src.sin_addr.s_addr)),
            u16::from_be(src.sin_port),
        ));
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                return Some((
                    n as usize,
                    Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)),
                    from,
                ));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Some((n as usize, Ipv4Addr::UNSPECIFIED, from))
    }
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    let mut sa = unsafe_zeroed_sockaddr();
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr = libc::in_addr {
        s_addr: u32::from(*addr.ip()).to_be(),
    };
    sa
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    unsafe {
        libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int);
    }
}

/// A flood of valid handshake initiations from keys the server does not know, sent from
/// many loopback addresses (127.200.0.0/16) at a fixed rate, as an attacker with a botnet
/// would. Counts what comes back. Stops when dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pub sent: Arc<AtomicU64>,
    pub cookie_replies: Arc<AtomicU64>,
    /// Handshake responses to the flood: there must never be any.
    pub responses: Arc<AtomicU64>,
}

/// First source address of a flood.
pub const FLOOD_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 200, 0, 0);

impl Flood {
    pub fn start(
        server: SocketAddr,
        server_public: PublicKey,
        per_second: u32,
    ) -> std::io::Result<Self> {
        let socket = plain_fleet_socket()?;
        // 64 distinct unknown keys, 4 initiations each, replayed round robin: each valid
        // until the server sees a newer timestamp, and costing the server the same work.
        let mut inits = Vec::new();
        let mut buf = vec![0u8; 256];
        for k in 0..64u8 {
            let mut t = Tunn::new(
                StaticSecret::from([k.wrapping_add(1); 32]),
                server_public,
                None,
                None,
                0x00ff_0000 + u32::from(k),
                None,
            );
            for _ in 0..4 {
                if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true)
                {
                    inits.push(p.to_vec());
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let cookie_replies = Arc::new(AtomicU64::new(0));
        let responses = Arc::new(AtomicU64::new(0));
        let (s, c, r, flag) = (
            sent.clone(),
            cookie_replies.clone(),
            responses.clone(),
            stop.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || {
                let counters = FleetCounters::default();
                let start = Instant::now();
                let mut n = 0u64;
                let mut rx = vec![0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    let due = (start.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
                    while n < due {
                        let from = Ipv4Addr::from(u32::from(FLOOD_SOURCE) + (n % 65_536) as u32);
                        send_from(
                            &socket,
                            from,
                            server,
                            &inits[(n as usize) % inits.len()],
                            &counters,
                        );
                        n += 1;
                    }
                    s.store(n, Ordering::Relaxed);
                    while let Some((len, _, _)) = recv_with_dst(&socket, &mut rx) {
                        match rx.first() {
                            Some(3) if len == 64 => bump(&c),
                            Some(2) => bump(&r),
                            _ => {}
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
            sent,
            cookie_replies,
            responses,
        })
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
