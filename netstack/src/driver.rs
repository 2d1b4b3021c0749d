//! The driver task: owns the smoltcp interface and sockets, feeds them inbound packets, moves
//! bytes between sockets and streams, and turns socket states into connects, accepts, EOFs and
//! resets.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use smoltcp::iface::{self, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use crate::device::VirtualDevice;
use crate::flight::Flight;
use crate::packet::{classify, Inbound, Tuple};
use crate::ports::EphemeralPorts;
use crate::stream::{self, End, Shutdown, StreamShared};
use crate::{
    Command, Config, ConnId, ConnectError, Counters, DriverWake, Link, ListenError, Registered,
    TcpStream,
};

/// The flight cap of a connection never goes below this (bytes): on a fast path nearby, whose
/// bandwidth-delay product is smaller, this much in flight keeps it busy without overflowing
/// a WireGuard device's socket. See `flight.rs`.
const FLIGHT_FLOOR: usize = 64 * 1024;
/// Sockets kept in LISTEN per listener. They are replenished after every SYN, so this only
/// needs to cover SYNs arriving within one packet of each other.
const LISTEN_SLOTS: usize = 4;
/// Handshakes in progress per listener (SYN-flood bound).
const MAX_HALF_OPEN: usize = 256;
/// Established connections waiting for `accept`; beyond it new ones are reset.
const ACCEPT_QUEUE: usize = 256;
/// A handshake that does not complete within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A dropped stream that has not finished closing after this long is aborted (RST).
const CLOSE_LINGER: Duration = Duration::from_secs(60);
/// How long a connection we closed first stays in TIME-WAIT (smoltcp would keep it 10 s): long
/// enough for the final ACK to leave and to answer one retransmitted FIN.
const TIME_WAIT: Duration = Duration::from_secs(2);
/// Bytes queued between a stream and its socket, per direction (the socket buffers hold the
/// TCP window; these only decouple the application from the driver).
const APP_QUEUE: usize = 64 * 1024;
/// Inbound packets handled per round before output is flushed and timers are looked at.
const INGRESS_BATCH: usize = 256;
/// Every connection is looked at least this often while the stack is busy.
const FULL_SWEEP: Duration = Duration::from_secs(1);
/// smoltcp refuses receive buffers above 1 GiB; below a few segments TCP is pointless.
const TCP_BUFFER_RANGE: (usize, usize) = (4 * 1024, 1 << 30);
/// How far a stream's receive queue may exceed its capacity to keep the window aligned (see
/// `rx_take`).
const ALIGN_OVERFLOW: usize = 4 * 1024;

/// Runs the stack: spawn [`NetstackDriver::run`] on a tokio runtime.
pub struct NetstackDriver {
    driver: Driver,
}

impl std::fmt::Debug for NetstackDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetstackDriver")
            .field("address", &self.driver.config.address)
            .finish_non_exhaustive()
    }
}

impl NetstackDriver {
    pub(crate) fn new(
        mut config: Config,
        inbound: mpsc::Receiver<Vec<u8>>,
        sink: Box<dyn crate::PacketSink>,
        commands: mpsc::UnboundedReceiver<Command>,
        link: Weak<Link>,
        wake: Arc<DriverWake>,
        counters: Arc<Counters>,
    ) -> Self {
        let window_align = window_granularity(
            config
                .tcp_buffer
                .clamp(TCP_BUFFER_RANGE.0, TCP_BUFFER_RANGE.1),
        );
        config.tcp_buffer = config
            .tcp_buffer
            .clamp(TCP_BUFFER_RANGE.0, TCP_BUFFER_RANGE.1)
            / window_align
            * window_align;
        // smoltcp needs room for headers and a minimal segment.
        config.mtu = config.mtu.max(576);
        let clock = Clock {
            base: Instant::now(),
        };
        let mut device = VirtualDevice::new(sink, config.mtu, counters.clone());
        let mut iface_config = iface::Config::new(HardwareAddress::Ip);
        iface_config.random_seed = rand::random();
        let mut iface = Interface::new(iface_config, &mut device, clock.smol(clock.base));
        let prefix_len = config.prefix_len.min(32);
        iface.update_ip_addrs(|addrs| {
            // A fresh interface has room for this one address.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.address), prefix_len));
        });
        // Everything outside the prefix goes to the sink too: the caller routes.
        if iface
            .routes_mut()
            .add_default_ipv4_route(config.address)
            .is_err()
        {
            warn!("netstack: no room for the default route; only the local prefix is reachable");
        }
        Self {
            driver: Driver {
                config,
                clock,
                iface,
                device,
                sockets: SocketSet::new(Vec::new()),
                inbound,
                inbound_open: true,
                commands,
                commands_open: true,
                link,
                wake,
                counters,
                conns: HashMap::new(),
                by_tuple: HashMap::new(),
                listeners: HashMap::new(),
                ports: EphemeralPorts::default(),
                next_id: 1,
                closing: Vec::new(),
                deadline: None,
                smol_wake: None,
                last_sweep: clock.base,
                sweep_requested: false,
                window_align,
                last_refusal_warning: None,
            },
        }
    }

    /// Runs the stack until `shutdown` is cancelled or every handle, listener and stream and
    /// the inbound channel are gone. One task; it never blocks. On the way out, connections
    /// are aborted (RST to the peers) and streams fail with `ConnectionAborted`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut d = self.driver;
        debug!(address = %d.config.address, "netstack running");
        loop {
            let wake_at = d.next_wakeup();
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                packet = d.inbound.recv(), if d.inbound_open => Event::Packet(packet),
                command = d.commands.recv(), if d.commands_open => Event::Command(command),
                () = d.wake.notify.notified() => Event::Woken,
                () = sleep_until(wake_at), if wake_at.is_some() => Event::Timer,
            };
            let now = Instant::now();
            let mut first_packet = None;
            match event {
                Event::Packet(Some(packet)) => first_packet = Some(packet),
                Event::Packet(None) => d.inbound_open = false,
                Event::Command(Some(command)) => d.command(command, now),
                Event::Command(None) => d.commands_open = false,
                Event::Woken | Event::Timer => {}
            }
            if !d.inbound_open && !d.commands_open {
                break;
            }
            while let Ok(command) = d.commands.try_recv() {
                d.command(command, now);
            }
            d.step(now, first_packet);
        }
        d.shut_down();
        debug!(address = %d.config.address, "netstack stopped");
    }
}

/// A sleep until `at` (or forever: the branch is disabled when `at` is `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Event {
    Packet(Option<Vec<u8>>),
    Command(Option<Command>),
    Woken,
    Timer,
}

/// smoltcp time is microseconds since the driver was created, on tokio's clock (so tests may
/// pause time).
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
}

impl Clock {
    fn smol(&self, at: Instant) -> smoltcp::time::Instant {
        let micros = at.saturating_duration_since(self.base).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn tokio(&self, at: smoltcp::time::Instant) -> Instant {
        let since_base = Duration::from_micros(u64::try_from(at.total_micros()).unwrap_or(0));
        self.base
            .checked_add(since_base)
            .unwrap_or_else(|| far_future(self.base))
    }
}

struct Conn {
    handle: SocketHandle,
    tuple: Tuple,
    /// The local port came from the ephemeral allocator.
    dialed: bool,
    phase: Phase,
}

enum Phase {
    /// SYN sent, waiting for SYN-ACK.
    Dialing {
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
        deadline: Instant,
        /// When the dial began (the SYN left in the same round).
        since: Instant,
    },
    /// A listening slot received a SYN; waiting for the final ACK.
    Handshaking { listener: u16, listener_id: u64 },
    /// Established and owned by a [`TcpStream`] (possibly dropped and closing).
    Open(Box<Open>),
    /// Aborted; removed once smoltcp has sent its RST.
    Closing,
}

/// An established connection's state on the driver's side.
struct Open {
    shared: Arc<StreamShared>,
    fin_queued: bool,
    /// When a dropped stream's connection is reset if it has not closed by then.
    linger: Option<Instant>,
    /// When the connection leaves TIME-WAIT.
    time_wait: Option<Instant>,
    /// How much of the stream may be unacknowledged.
    flight: Flight,
}

struct Listener {
    id: u64,
    accept: mpsc::Sender<(TcpStream, SocketAddrV4)>,
    slots: Vec<SocketHandle>,
    half_open: usize,
    /// The port came from the ephemeral allocator (listen on port 0).
    ephemeral: bool,
}

struct Driver {
    config: Config,
    clock: Clock,
    iface: Interface,
    device: VirtualDevice,
    sockets: SocketSet<'static>,
    inbound: mpsc::Receiver<Vec<u8>>,
    inbound_open: bool,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_open: bool,
    link: Weak<Link>,
    wake: Arc<DriverWake>,
    counters: Arc<Counters>,
    conns: HashMap<ConnId, Conn>,
    by_tuple: HashMap<Tuple, ConnId>,
    listeners: HashMap<u16, Listener>,
    ports: EphemeralPorts,
    next_id: u64,
    /// Connections aborted this round, reaped after their RST went out.
    closing: Vec<ConnId>,
    /// Earliest dial timeout or close linger.
    deadline: Option<Instant>,
    /// When smoltcp last asked to be polled.
    smol_wake: Option<Instant>,
    last_sweep: Instant,
    /// Someone asked for every connection to be looked at.
    sweep_requested: bool,
    last_refusal_warning: Option<Instant>,
    /// The unit of the receive window smoltcp advertises (2^window-scale bytes).
    window_align: usize,
}

/// What servicing decided about a connection.
enum Verdict {
    Keep,
    /// Wait for the RST to be sent, then reap.
    Closing,
    Reap,
}

impl Driver {
    fn next_wakeup(&mut self) -> Option<Instant> {
        let now = Instant::now();
        self.smol_wake = self
            .iface
            .poll_at(self.clock.smol(now), &self.sockets)
            .map(|at| self.clock.tokio(at));
        [self.smol_wake, self.deadline].into_iter().flatten().min()
    }

    fn socket_count(&self) -> usize {
        self.conns.len() + self.listening_count()
    }

    fn listening_count(&self) -> usize {
        self.listeners.values().map(|l| l.slots.len()).sum()
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let size = self.config.tcp_buffer;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; size]),
            tcp::SocketBuffer::new(vec![0u8; size]),
        );
        // The application decides when to write; forwarding keystrokes must not wait for ACKs.
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket
    }

    fn command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Connect {
                remote,
                timeout,
                reply,
            } => self.dial(remote, timeout, reply, now),
            Command::Listen { port, reply } => self.listen(port, reply, now),
            Command::Unlisten { port, id } => self.unlisten(port, id, now),
            // The next round looks at every connection (the abandoned one frees its socket).
            Command::Sweep => self.sweep_requested = true,
        }
    }

    /// Starts a connection; an immediate failure is answered here.
    fn dial(
        &mut self,
        remote: SocketAddrV4,
        timeout: Duration,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
        now: Instant,
    ) {
        match self.start_dial(remote, timeout, now) {
            Ok((id, deadline)) => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.phase = Phase::Dialing {
                        reply,
                        deadline,
                        since: now,
                    };
                }
            }
            Err(e) => {
                debug!(%remote, error = %e, "netstack: connect failed");
                let _ = reply.send(Err(e));
            }
        }
    }

    fn start_dial(
        &mut self,
        remote: SocketAddrV4,
        timeout: Duration,
        now: Instant,
    ) -> Result<(ConnId, Instant), ConnectError> {
        if remote.ip().is_unspecified() || remote.port() == 0 {
            return Err(ConnectError::Unaddressable(remote));
        }
        if self.socket_count() >= self.config.max_sockets {
            return Err(ConnectError::TooManySockets);
        }
        let listeners = &self.listeners;
        let local_port = self
            .ports
            .allocate(now, |p| listeners.contains_key(&p))
            .ok_or(ConnectError::NoFreePort)?;
        let mut socket = self.new_socket();
        let local = SocketAddrV4::new(self.config.address, local_port);
        if socket.connect(self.iface.context(), remote, local).is_err() {
            self.ports.release(local_port, now);
            return Err(ConnectError::Unaddressable(remote));
        }
        let handle = self.sockets.add(socket);
        let id = self.next_id;
        self.next_id += 1;
        let tuple = Tuple { remote, local_port };
        let deadline = now.checked_add(timeout).unwrap_or_else(|| far_future(now));
        self.conns.insert(
            id,
            Conn {
                handle,
                tuple,
                dialed: true,
                phase: Phase::Closing,
            },
        );
        self.by_tuple.insert(tuple, id);
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        trace!(%remote, local_port, "netstack: dialing");
        Ok((id, deadline))
    }

    fn listen(
        &mut self,
        port: u16,
        reply: oneshot::Sender<Result<Registered, ListenError>>,
        now: Instant,
    ) {
        let result = self.start_listen(port, now);
        if let Err(e) = &result {
            debug!(port, error = %e, "netstack: listen failed");
        }
        if let Err(Ok(registered)) = reply.send(result) {
            // The caller went away before getting its listener.
            self.unlisten(registered.port, registered.id, now);
        }
    }

    fn start_listen(&mut self, port: u16, now: Instant) -> Result<Registered, ListenError> {
        if port != 0 && self.listeners.contains_key(&port) {
            return Err(ListenError::AlreadyListening(port));
        }
        if self.socket_count() >= self.config.max_sockets {
            return Err(ListenError::TooManySockets);
        }
        let (port, ephemeral) = if port == 0 {
            let listeners = &self.listeners;
            let Some(port) = self.ports.allocate(now, |p| listeners.contains_key(&p)) else {
                return Err(ListenError::TooManySockets);
            };
            (port, true)
        } else {
            (port, false)
        };
        let id = self.next_id;
        self.next_id += 1;
        let (accept, accepted) = mpsc::channel(ACCEPT_QUEUE);
        self.listeners.insert(
            port,
            Listener {
                id,
                accept,
                slots: Vec::new(),
                half_open: 0,
                ephemeral,
            },
        );
        self.replenish(port);
        debug!(port, "netstack: listening");
        Ok(Registered { port, id, accepted })
    }

    fn unlisten(&mut self, port: u16, id: u64, now: Instant) {
        if self.listeners.get(&port).is_none_or(|l| l.id != id) {
            return;
        }
        if let Some(listener) = self.listeners.remove(&port) {
            for handle in listener.slots {
                // LISTEN sockets have no peer: nothing to send.
                self.sockets.remove(handle);
            }
            if listener.ephemeral {
                self.ports.release(port, now);
            }
            debug!(port, "netstack: stopped listening");
        }
    }

    /// Keeps `LISTEN_SLOTS` sockets listening on `port`, within the limits.
    fn replenish(&mut self, port: u16) {
        let mut sockets_in_use = self.socket_count();
        let Some(listener) = self.listeners.get(&port) else {
            return;
        };
        let mut missing = LISTEN_SLOTS.saturating_sub(listener.slots.len());
        let mut added = Vec::new();
        while missing > 0
            && listener.half_open < MAX_HALF_OPEN
            && sockets_in_use < self.config.max_sockets
        {
            let mut socket = self.new_socket();
            socket.set_timeout(Some(smol_duration(HANDSHAKE_TIMEOUT)));
            if socket
                .listen(SocketAddrV4::new(self.config.address, port))
                .is_err()
            {
                break;
            }
            added.push(self.sockets.add(socket));
            sockets_in_use += 1;
            missing -= 1;
        }
        if let Some(listener) = self.listeners.get_mut(&port) {
            listener.slots.extend(added);
        }
    }

    /// After a SYN to `port`: turn listening slots that took a SYN into connections.
    fn claim_slots(&mut self, port: u16) {
        let Some(listener) = self.listeners.get_mut(&port) else {
            return;
        };
        let sockets = &mut self.sockets;
        let mut claimed = Vec::new();
        listener.slots.retain(|&handle| {
            let listening = sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen;
            if !listening {
                claimed.push(handle);
            }
            listening
        });
        let listener_id = listener.id;
        for handle in claimed {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let remote = match socket.remote_endpoint() {
                Some(IpEndpoint {
                    addr: IpAddress::Ipv4(addr),
                    port: remote_port,
                }) => SocketAddrV4::new(addr, remote_port),
                _ => {
                    self.sockets.remove(handle);
                    continue;
                }
            };
            let tuple = Tuple {
                remote,
                local_port: port,
            };
            let id = self.next_id;
            self.next_id += 1;
            self.conns.insert(
                id,
                Conn {
                    handle,
                    tuple,
                    dialed: false,
                    phase: Phase::Handshaking {
                        listener: port,
                        listener_id,
                    },
                },
            );
            self.by_tuple.insert(tuple, id);
            if let Some(listener) = self.listeners.get_mut(&port) {
                listener.half_open += 1;
            }
            trace!(%remote, port, "netstack: SYN received");
        }
        self.replenish(port);
    }

    /// One round of work: app-side changes, inbound packets, output, socket states.
    fn step(&mut self, now: Instant, first_packet: Option<Vec<u8>>) {
        Counters::add(&self.counters.wakeups, 1);
        let smol_now = self.clock.smol(now);
        let timers_due =
            self.smol_wake.is_some_and(|at| at <= now) || self.deadline.is_some_and(|at| at <= now);

        let dirty = std::mem::take(&mut *self.wake.dirty.lock());
        for id in dirty {
            self.service(id, now);
        }

        let mut next = first_packet;
        let mut budget = INGRESS_BATCH;
        loop {
            let packet = match next.take() {
                Some(packet) => packet,
                None if budget == 0 => break,
                None => match self.inbound.try_recv() {
                    Ok(packet) => packet,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.inbound_open = false;
                        break;
                    }
                },
            };
            budget = budget.saturating_sub(1);
            self.ingest(packet, now, smol_now);
        }
        if budget == 0 {
            // More may be waiting: come back right after this round.
            self.wake.notify.notify_one();
        }

        self.egress(smol_now);

        if timers_due
            || self.sweep_requested
            || now.saturating_duration_since(self.last_sweep) >= FULL_SWEEP
        {
            self.sweep(now);
            self.egress(smol_now);
        }

        let closing = std::mem::take(&mut self.closing);
        for id in closing {
            self.service(id, now);
        }
        if !self.closing.is_empty() {
            // An RST could not go out yet: look again shortly.
            self.note_deadline(now + Duration::from_millis(10));
        }
        // Sockets freed this round go back to listeners that ran short.
        let short: Vec<u16> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.slots.len() < LISTEN_SLOTS)
            .map(|(port, _)| *port)
            .collect();
        for port in short {
            self.replenish(port);
        }
        self.device.flush();
        self.publish();
    }

    fn ingest(&mut self, packet: Vec<u8>, now: Instant, smol_now: smoltcp::time::Instant) {
        Counters::add(&self.counters.packets_in, 1);
        Counters::add(&self.counters.bytes_in, packet.len() as u64);
        let verdict = classify(&packet);
        match verdict {
            Inbound::NotIpv4 => {
                trace!(
                    len = packet.len(),
                    "netstack: dropping a packet that is not IPv4"
                );
                Counters::add(&self.counters.packets_dropped, 1);
                return;
            }
            Inbound::Tcp { tuple, opens } => {
                if self.by_tuple.contains_key(&tuple) {
                    if opens {
                        // A repeated SYN: the connection's socket retransmits on its own, and
                        // a listening socket must not take the SYN as a second connection.
                        Counters::add(&self.counters.packets_dropped, 1);
                        return;
                    }
                } else if opens {
                    self.check_refusal(tuple.local_port, now);
                }
            }
            Inbound::Other => {}
        }
        self.device.rx = Some(packet);
        let _ = self
            .iface
            .poll_ingress_single(smol_now, &mut self.device, &mut self.sockets);
        self.device.rx = None;
        if let Inbound::Tcp { tuple, opens } = verdict {
            if opens {
                if self.listeners.contains_key(&tuple.local_port) {
                    self.claim_slots(tuple.local_port);
                }
            } else if let Some(&id) = self.by_tuple.get(&tuple) {
                // Right away, before the next packet: the receive window must be realigned
                // before smoltcp advertises it again, and an RST in SYN-RECEIVED puts a slot
                // back into LISTEN under a tuple that is no longer its own (it must go before
                // it takes another SYN).
                self.service(id, now);
            }
        }
    }

    /// A SYN for `port` arrives: if its listener has no socket left to take it (and none can
    /// be made), smoltcp will answer RST. Count that and tell the operator (at most every 10 s).
    fn check_refusal(&mut self, port: u16, now: Instant) {
        if self
            .listeners
            .get(&port)
            .is_some_and(|l| l.slots.is_empty())
        {
            self.replenish(port);
        }
        let Some(listener) = self.listeners.get(&port) else {
            return;
        };
        if !listener.slots.is_empty() {
            return;
        }
        Counters::add(&self.counters.accepts_refused, 1);
        let quiet = self
            .last_refusal_warning
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(10));
        if !quiet {
            self.last_refusal_warning = Some(now);
            warn!(
                port,
                half_open = listener.half_open,
                max_half_open = MAX_HALF_OPEN,
                sockets = self.socket_count(),
                max_sockets = self.config.max_sockets,
                "netstack: refusing incoming connections: socket or handshake limit reached"
            );
        }
    }

    fn egress(&mut self, smol_now: smoltcp::time::Instant) {
        self.iface.poll_maintenance(smol_now);
        while self
            .iface
            .poll_egress(smol_now, &mut self.device, &mut self.sockets)
            == iface::PollResult::SocketStateChanged
        {}
    }

    /// Services every connection and recomputes the earliest own deadline.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        self.sweep_requested = false;
        self.deadline = None;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.service(id, now);
        }
    }

    fn note_deadline(&mut self, at: Instant) {
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
    }

    /// Brings one connection up to date with its socket and its stream.
    fn service(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let handle = conn.handle;
        let tuple = conn.tuple;
        let phase = std::mem::replace(&mut conn.phase, Phase::Closing);
        let (phase, verdict) = match phase {
            Phase::Dialing {
                reply,
                deadline,
                since,
            } => self.service_dialing(id, handle, tuple, reply, (deadline, since), now),
            Phase::Handshaking {
                listener,
                listener_id,
            } => self.service_handshaking(id, handle, tuple, listener, listener_id, now),
            Phase::Open(open) => self.service_open(handle, open, now),
            Phase::Closing => (Phase::Closing, self.closing_verdict(handle)),
        };
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.phase = phase;
        }
        match verdict {
            Verdict::Keep => {}
            Verdict::Closing => self.closing.push(id),
            Verdict::Reap => self.reap(id, now),
        }
    }

    fn closing_verdict(&mut self, handle: SocketHandle) -> Verdict {
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.state() {
            // No peer left to tell, or the RST went out.
            tcp::State::Closed if socket.remote_endpoint().is_none() => Verdict::Reap,
            // The RST goes out with the next egress.
            tcp::State::Closed => Verdict::Closing,
            tcp::State::TimeWait | tcp::State::Listen => Verdict::Reap,
            _ => {
                socket.abort();
                Verdict::Closing
            }
        }
    }

    fn service_dialing(
        &mut self,
        id: ConnId,
        handle: SocketHandle,
        tuple: Tuple,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
        (deadline, since): (Instant, Instant),
        now: Instant,
    ) -> (Phase, Verdict) {
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                if reply.is_closed() {
                    trace!(remote = %tuple.remote, "netstack: connect abandoned");
                    socket.abort();
                    Counters::add(&self.counters.aborted, 1);
                    (Phase::Closing, Verdict::Closing)
                } else if now >= deadline {
                    debug!(remote = %tuple.remote, "netstack: connect timed out");
                    socket.abort();
                    Counters::add(&self.counters.connects_timed_out, 1);
                    let _ = reply.send(Err(ConnectError::TimedOut));
                    (Phase::Closing, Verdict::Closing)
                } else {
                    self.note_deadline(deadline);
                    let phase = Phase::Dialing {
                        reply,
                        deadline,
                        since,
                    };
                    (phase, Verdict::Keep)
                }
            }
            tcp::State::Closed | tcp::State::Listen => {
                debug!(remote = %tuple.remote, "netstack: connection refused");
                Counters::add(&self.counters.connects_refused, 1);
                let _ = reply.send(Err(ConnectError::Refused));
                (Phase::Closing, self.closing_verdict(handle))
            }
            _ => {
                let local = SocketAddrV4::new(self.config.address, tuple.local_port);
                let Some((shared, stream)) = self.open_stream(id, handle, local, tuple.remote)
                else {
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    return (Phase::Closing, Verdict::Closing);
                };
                let (remote, local_port) = (tuple.remote, tuple.local_port);
                debug!(%remote, local_port, "netstack: connected");
                Counters::add(&self.counters.connects_established, 1);
                // If the caller gave up just now, dropping the stream closes it gracefully.
                let _ = reply.send(Ok(stream));
                let mut open = self.new_open(shared);
                // The handshake is a first round trip, unless the SYN had to be sent again
                // (smoltcp waits at least 1 s for that).
                let handshake = now.saturating_duration_since(since);
                if handshake < Duration::from_secs(1) {
                    open.flight.round_trip(handshake, now);
                }
                self.service_open(handle, open, now)
            }
        }
    }

    fn service_handshaking(
        &mut self,
        id: ConnId,
        handle: SocketHandle,
        tuple: Tuple,
        port: u16,
        listener_id: u64,
        now: Instant,
    ) -> (Phase, Verdict) {
        let state = self.sockets.get::<tcp::Socket>(handle).state();
        match state {
            tcp::State::SynReceived => (
                Phase::Handshaking {
                    listener: port,
                    listener_id,
                },
                Verdict::Keep,
            ),
            tcp::State::Listen | tcp::State::Closed => {
                self.left_handshake(port, listener_id);
                (Phase::Closing, self.closing_verdict(handle))
            }
            _ => {
                self.left_handshake(port, listener_id);
                let local = SocketAddrV4::new(self.config.address, port);
                let accept = self
                    .listeners
                    .get(&port)
                    .filter(|l| l.id == listener_id)
                    .map(|l| l.accept.clone());
                let opened = accept.and_then(|accept| {
                    self.open_stream(id, handle, local, tuple.remote)
                        .map(|(shared, stream)| (accept, shared, stream))
                });
                let Some((accept, shared, stream)) = opened else {
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    Counters::add(&self.counters.accepts_refused, 1);
                    Counters::add(&self.counters.aborted, 1);
                    return (Phase::Closing, Verdict::Closing);
                };
                match accept.try_send((stream, tuple.remote)) {
                    Ok(()) => {
                        trace!(remote = %tuple.remote, port, "netstack: accepted");
                        Counters::add(&self.counters.accepted, 1);
                    }
                    Err(e) => {
                        let remote = tuple.remote;
                        debug!(%remote, port, "netstack: accept queue full, resetting");
                        let (stream, _) = e.into_inner();
                        stream.abort_on_drop();
                        drop(stream);
                        Counters::add(&self.counters.accepts_refused, 1);
                    }
                }
                let open = self.new_open(shared);
                self.service_open(handle, open, now)
            }
        }
    }

    fn left_handshake(&mut self, port: u16, listener_id: u64) {
        if let Some(listener) = self.listeners.get_mut(&port) {
            if listener.id == listener_id {
                listener.half_open = listener.half_open.saturating_sub(1);
            }
        }
    }

    /// An established socket gets its stream.
    fn open_stream(
        &mut self,
        id: ConnId,
        handle: SocketHandle,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> Option<(Arc<StreamShared>, TcpStream)> {
        let link = self.link.upgrade()?;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        // smoltcp aborts a socket whose peer has been silent for the timeout, even an idle
        // one: only with keep-alives does silence mean the peer is gone.
        let keep_alive = self.config.keep_alive.map(smol_duration);
        socket.set_keep_alive(keep_alive);
        socket.set_timeout(keep_alive.map(|_| smol_duration(self.config.peer_timeout)));
        let shared = StreamShared::new(id, APP_QUEUE.min(self.config.tcp_buffer));
        let stream = TcpStream::new(shared.clone(), link, local, remote);
        Some((shared, stream))
    }

    fn new_open(&self, shared: Arc<StreamShared>) -> Box<Open> {
        Box::new(Open {
            shared,
            fin_queued: false,
            linger: None,
            time_wait: None,
            flight: Flight::new(
                FLIGHT_FLOOR,
                self.config.tcp_buffer,
                self.config.mtu.saturating_sub(40),
            ),
        })
    }

    fn service_open(
        &mut self,
        handle: SocketHandle,
        mut open: Box<Open>,
        now: Instant,
    ) -> (Phase, Verdict) {
        let Open {
            shared,
            fin_queued,
            linger,
            time_wait,
            flight,
        } = &mut *open;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        flight.acked(socket.send_queue(), now);
        let mut st = shared.state.lock();
        st.queued = false;
        let mut wake_read = false;
        let mut wake_write = false;

        if st.abort {
            socket.abort();
            st.rx_end.get_or_insert(End::Reset);
            st.tx_error.get_or_insert(End::Reset);
            st.tx.clear();
            let wakers = (st.read_waker.take(), st.write_waker.take());
            drop(st);
            stream::wake(wakers);
            Counters::add(&self.counters.aborted, 1);
            return (Phase::Closing, Verdict::Closing);
        }

        // Application -> socket, as far as the flight cap allows.
        let queued = socket.send_queue();
        let room = flight.room(queued);
        if !st.tx.is_empty() && room > 0 && socket.may_send() {
            let (front, back) = st.tx.as_slices();
            let front = &front[..front.len().min(room)];
            let mut moved = socket.send_slice(front).unwrap_or(0);
            if moved == front.len() && moved < room && !back.is_empty() {
                let back = &back[..back.len().min(room - moved)];
                moved += socket.send_slice(back).unwrap_or(0);
            }
            if moved > 0 {
                st.tx.drain(..moved);
                flight.wrote(moved, queued, now);
                wake_write = true;
            }
        }
        let closing = st.dropped || st.shutdown == Shutdown::Requested;
        if closing && st.tx.is_empty() && !*fin_queued && socket.state() != tcp::State::Closed {
            socket.close();
            *fin_queued = true;
            if st.shutdown == Shutdown::Requested {
                st.shutdown = Shutdown::Done;
                wake_write = true;
            }
        }

        // Socket -> application.
        if st.dropped {
            // Nobody reads any more: discard, so that the window stays open and the peer's
            // FIN can arrive.
            while socket.can_recv() {
                if !matches!(socket.recv(|data| (data.len(), data.len())), Ok(n) if n > 0) {
                    break;
                }
            }
        } else {
            let want = rx_take(
                socket.recv_queue(),
                st.rx.len(),
                st.rx_capacity,
                self.window_align,
            );
            let mut moved_total = 0;
            while moved_total < want {
                let left = want - moved_total;
                let rx = &mut st.rx;
                match socket.recv(|data| {
                    let n = data.len().min(left);
                    rx.extend(&data[..n]);
                    (n, n)
                }) {
                    Ok(n) if n > 0 => moved_total += n,
                    _ => break,
                }
            }
            st.rx_blocked = socket.can_recv();
            if moved_total > 0 {
                wake_read = true;
            }
        }
        if st.rx_end.is_none() && !socket.can_recv() {
            match socket.recv(|_| (0, ())) {
                Err(tcp::RecvError::Finished) => {
                    st.rx_end = Some(End::Eof);
                    wake_read = true;
                }
                Err(tcp::RecvError::InvalidState) if socket.state() == tcp::State::Closed => {
                    st.rx_end = Some(End::Reset);
                    wake_read = true;
                }
                _ => {}
            }
        }

        let state = socket.state();
        if state == tcp::State::Closed && !*fin_queued && st.tx_error.is_none() {
            st.tx_error = Some(End::Reset);
            st.tx.clear();
            wake_write = true;
        }

        let mut verdict = match state {
            tcp::State::Closed if socket.remote_endpoint().is_none() && !socket.can_recv() => {
                Verdict::Reap
            }
            tcp::State::TimeWait if !socket.can_recv() => {
                if now >= *time_wait.get_or_insert(now + TIME_WAIT) {
                    Verdict::Reap
                } else {
                    Verdict::Keep
                }
            }
            _ => Verdict::Keep,
        };
        if st.dropped && matches!(verdict, Verdict::Keep) {
            let deadline = *linger.get_or_insert(now + CLOSE_LINGER);
            if now >= deadline {
                debug!("netstack: connection did not finish closing in time, resetting");
                socket.abort();
                Counters::add(&self.counters.aborted, 1);
                verdict = Verdict::Closing;
            }
        }
        let wakers = (
            if wake_read {
                st.read_waker.take()
            } else {
                None
            },
            if wake_write {
                st.write_waker.take()
            } else {
                None
            },
        );
        drop(st);
        stream::wake(wakers);
        if let Verdict::Keep = verdict {
            for deadline in [*linger, *time_wait].into_iter().flatten() {
                self.note_deadline(deadline);
            }
        }
        match verdict {
            Verdict::Closing => (Phase::Closing, Verdict::Closing),
            Verdict::Reap => {
                shared.detach(End::Reset);
                (Phase::Closing, Verdict::Reap)
            }
            Verdict::Keep => (Phase::Open(open), Verdict::Keep),
        }
    }

    /// Forgets a connection and frees its socket.
    fn reap(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.sockets.remove(conn.handle);
        if self.by_tuple.get(&conn.tuple) == Some(&id) {
            self.by_tuple.remove(&conn.tuple);
        }
        if conn.dialed {
            self.ports.release(conn.tuple.local_port, now);
        }
        match conn.phase {
            Phase::Handshaking {
                listener,
                listener_id,
            } => self.left_handshake(listener, listener_id),
            Phase::Open(open) => open.shared.detach(End::Reset),
            Phase::Dialing { reply, .. } => {
                let _ = reply.send(Err(ConnectError::Refused));
            }
            Phase::Closing => {}
        }
        trace!(remote = %conn.tuple.remote, "netstack: connection reaped");
    }

    fn publish(&self) {
        let listening = self.listening_count();
        let c = &self.counters;
        c.open_sockets
            .store(self.conns.len() + listening, Ordering::Relaxed);
        c.connections.store(self.conns.len(), Ordering::Relaxed);
        c.listening_sockets.store(listening, Ordering::Relaxed);
        c.listeners.store(self.listeners.len(), Ordering::Relaxed);
    }

    /// Aborts every connection (RST to the peers) and stops listening.
    fn shut_down(&mut self) {
        let now = Instant::now();
        let mut aborted = 0;
        for conn in self.conns.values() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.is_active() {
                socket.abort();
                aborted += 1;
            }
        }
        Counters::add(&self.counters.aborted, aborted);
        self.egress(self.clock.smol(now));
        self.device.flush();
        let ports: Vec<(u16, u64)> = self.listeners.iter().map(|(p, l)| (*p, l.id)).collect();
        for (port, id) in ports {
            self.unlisten(port, id, now);
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(conn) = self.conns.remove(&id) {
                self.sockets.remove(conn.handle);
                if let Phase::Open(open) = conn.phase {
                    open.shared.detach(End::StackClosed);
                }
            }
        }
        self.by_tuple.clear();
        self.publish();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Streams of a driver that stops without `shut_down` (task aborted, runtime gone)
        // must not wait forever.
        for conn in self.conns.values() {
            if let Phase::Open(open) = &conn.phase {
                open.shared.detach(End::StackClosed);
            }
        }
    }
}

/// How many received bytes to move from a socket holding `queued` bytes into a stream queue
/// holding `app_len` of `app_capacity`.
///
/// As many as fit, and then some: smoltcp advertises its window in units of `align` bytes,
/// rounded down. When the socket's free space is not a multiple of the unit, the advertised
/// right edge moves left (the window "shrinks"), a smoltcp peer may hold data beyond our
/// window, and once our window is zero we ignore its ACKs (smoltcp drops the ACK field of
/// segments outside the window) while it never rewinds: both ends stall for good. Taking the
/// few bytes that keep the free space a multiple of `align` (the socket capacity is one)
/// prevents that; the stream queue may exceed its capacity by up to `ALIGN_OVERFLOW` for it.
fn rx_take(queued: usize, app_len: usize, app_capacity: usize, align: usize) -> usize {
    let fits = app_capacity.saturating_sub(app_len).min(queued);
    let misaligned = (queued - fits) % align.max(1);
    if app_len + fits + misaligned <= app_capacity + ALIGN_OVERFLOW {
        fits + misaligned
    } else {
        fits
    }
}

/// The unit in which smoltcp advertises a receive window of `capacity` bytes: it scales the
/// window by as many bits as the capacity needs beyond 16.
fn window_granularity(capacity: usize) -> usize {
    let bits = usize::BITS - capacity.leading_zeros();
    1 << bits.saturating_sub(16)
}

fn far_future(from: Instant) -> Instant {
    from + Duration::from_secs(365 * 24 * 3600)
}

fn smol_duration(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_take_keeps_the_socket_free_space_aligned() {
        let align = 8;
        for queued in 0..200 {
            for app_len in [0, 1, 50, 99, 100, 101, 150, 100 + ALIGN_OVERFLOW - 3] {
                let take = rx_take(queued, app_len, 100, align);
                assert!(take <= queued);
                assert!(
                    take >= 100usize.saturating_sub(app_len).min(queued),
                    "fills the queue"
                );
                assert!(
                    app_len + take <= (100 + ALIGN_OVERFLOW).max(app_len),
                    "bounded"
                );
                if app_len + take + align <= 100 + ALIGN_OVERFLOW {
                    assert_eq!(
                        (queued - take) % align,
                        0,
                        "queued {queued} app_len {app_len}"
                    );
                }
            }
        }
        // Without window scaling nothing extra is taken.
        assert_eq!(rx_take(1000, 100, 100, 1), 0);
        assert_eq!(rx_take(1000, 0, 100, 1), 100);
    }

    #[test]
    fn window_granularity_matches_smoltcp_window_scaling() {
        for capacity in [4096, 65535, 65536, 131071, 256 * 1024, 300_000] {
            let align = window_granularity(capacity);
            // smoltcp keeps the shift private; its Debug output shows it.
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; capacity]),
                tcp::SocketBuffer::new(vec![0u8; 1]),
            );
            let shift = align.trailing_zeros();
            assert!(
                format!("{socket:?}").contains(&format!("remote_win_shift: {shift},")),
                "capacity {capacity}: expected shift {shift}"
            );
        }
    }
}
