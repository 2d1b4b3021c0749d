//! The driver task: owns the smoltcp interface and every socket, feeds it inbound packets,
//! answers commands, and carries each connection through its phases (dialing or handshaking,
//! open, closing) until its socket is freed. Listening ports are `listeners.rs`'s; an open
//! connection's bytes and ends are `connection.rs`'s; this file ties them together each round.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use smoltcp::iface::{self, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use crate::clock::{far_future, Clock};
use crate::connection::{new_socket, window_granularity, Connection, Verdict};
use crate::device::VirtualDevice;
use crate::listeners::{Listeners, Resources};
use crate::packet::{classify, Inbound, Tuple};
use crate::ports::EphemeralPorts;
use crate::stream::End;
use crate::{Command, Config, ConnId, ConnectError, Counters, DriverWake, Link, TcpStream};

/// Inbound packets handled per round before output is flushed and timers are looked at.
const INGRESS_BATCH: usize = 256;
/// Every connection is looked at least this often while the stack is busy.
const FULL_SWEEP: Duration = Duration::from_secs(1);
/// smoltcp refuses receive buffers above 1 GiB; below a few segments TCP is pointless.
const TCP_BUFFER_RANGE: (usize, usize) = (4 * 1024, 1 << 30);

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
            // A fresh interface has room for four addresses (smoltcp's
            // `iface-max-addr-count-4`).
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.address), prefix_len));
            for (address, prefix_len) in &config.more_addresses {
                let cidr = IpCidr::new(IpAddress::Ipv4(*address), (*prefix_len).min(32));
                if addrs.push(cidr).is_err() {
                    warn!(%address, "netstack: no room for another address; connections to its network come from the first one");
                }
            }
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
                listeners: Listeners::default(),
                ports: EphemeralPorts::default(),
                next_id: 1,
                closing: Vec::new(),
                deadline: None,
                smol_wake: None,
                last_sweep: clock.base,
                sweep_requested: false,
                window_align,
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

/// A socket the driver tracks as a connection, in whichever phase.
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
    Open(Box<Connection>),
    /// Aborted; removed once smoltcp has sent its RST.
    Closing,
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
    listeners: Listeners,
    ports: EphemeralPorts,
    /// The id of the next connection.
    next_id: ConnId,
    /// Connections aborted this round, reaped after their RST went out.
    closing: Vec<ConnId>,
    /// Earliest dial timeout or close linger.
    deadline: Option<Instant>,
    /// When smoltcp last asked to be polled.
    smol_wake: Option<Instant>,
    last_sweep: Instant,
    /// Someone asked for every connection to be looked at.
    sweep_requested: bool,
    /// The unit of the receive window smoltcp advertises (2^window-scale bytes).
    window_align: usize,
}

impl Driver {
    /// The stack's address in `remote`'s network, else its first address.
    fn local_address_for(&self, remote: Ipv4Addr) -> Ipv4Addr {
        let within = |address: Ipv4Addr, prefix_len: u8| {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            u32::from(address) & mask == u32::from(remote) & mask
        };
        self.config
            .more_addresses
            .iter()
            .find(|(a, p)| within(*a, *p))
            .map_or(self.config.address, |(a, _)| *a)
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        let now = Instant::now();
        self.smol_wake = self
            .iface
            .poll_at(self.clock.smol(now), &self.sockets)
            .map(|at| self.clock.tokio(at));
        [self.smol_wake, self.deadline].into_iter().flatten().min()
    }

    fn socket_count(&self) -> usize {
        self.conns.len() + self.listeners.listening_sockets()
    }

    /// The listeners, with what they may use of the rest of the driver.
    fn split_listeners(&mut self) -> (&mut Listeners, Resources<'_>) {
        let resources = Resources {
            sockets: &mut self.sockets,
            ports: &mut self.ports,
            config: &self.config,
            counters: &self.counters,
            connections: self.conns.len(),
        };
        (&mut self.listeners, resources)
    }

    /// Tracks a new connection on `handle`.
    fn track(&mut self, handle: SocketHandle, tuple: Tuple, dialed: bool, phase: Phase) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(
            id,
            Conn {
                handle,
                tuple,
                dialed,
                phase,
            },
        );
        self.by_tuple.insert(tuple, id);
        id
    }

    fn command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Connect {
                remote,
                timeout,
                reply,
            } => self.dial(remote, timeout, reply, now),
            Command::Listen { port, reply } => {
                let (listeners, mut res) = self.split_listeners();
                listeners.listen(port, reply, now, &mut res);
            }
            Command::Unlisten { port, id } => {
                let (listeners, mut res) = self.split_listeners();
                listeners.unlisten(port, id, now, &mut res);
            }
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
            .allocate(now, |p| listeners.contains(p))
            .ok_or(ConnectError::NoFreePort)?;
        let mut socket = new_socket(self.config.tcp_buffer);
        let local = SocketAddrV4::new(self.local_address_for(*remote.ip()), local_port);
        if socket.connect(self.iface.context(), remote, local).is_err() {
            self.ports.release(local_port, now);
            return Err(ConnectError::Unaddressable(remote));
        }
        let handle = self.sockets.add(socket);
        let tuple = Tuple { remote, local_port };
        let id = self.track(handle, tuple, true, Phase::Closing);
        let deadline = now.checked_add(timeout).unwrap_or_else(|| far_future(now));
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        trace!(%remote, local_port, "netstack: dialing");
        Ok((id, deadline))
    }

    /// After a SYN to `port`: listening slots that took a SYN become connections.
    fn claim_slots(&mut self, port: u16) {
        let Some((listener_id, claimed)) = self.listeners.claim(port, &mut self.sockets) else {
            return;
        };
        for (handle, remote) in claimed {
            let tuple = Tuple {
                remote,
                local_port: port,
            };
            let phase = Phase::Handshaking {
                listener: port,
                listener_id,
            };
            self.track(handle, tuple, false, phase);
            trace!(%remote, port, "netstack: SYN received");
        }
        let (listeners, mut res) = self.split_listeners();
        listeners.replenish(port, &mut res);
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
        let (listeners, mut res) = self.split_listeners();
        listeners.replenish_short(&mut res);
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
                    let (listeners, mut res) = self.split_listeners();
                    listeners.check_refusal(tuple.local_port, now, &mut res);
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
                if self.listeners.contains(tuple.local_port) {
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
            Phase::Open(connection) => self.service_open(handle, connection, now),
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
                let local =
                    SocketAddrV4::new(self.local_address_for(*tuple.remote.ip()), tuple.local_port);
                let Some((mut connection, stream)) =
                    self.open_stream(id, handle, local, tuple.remote)
                else {
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    return (Phase::Closing, Verdict::Closing);
                };
                let (remote, local_port) = (tuple.remote, tuple.local_port);
                debug!(%remote, local_port, "netstack: connected");
                Counters::add(&self.counters.connects_established, 1);
                // If the caller gave up just now, dropping the stream closes it gracefully.
                let _ = reply.send(Ok(stream));
                connection.handshake_took(now.saturating_duration_since(since), now);
                self.service_open(handle, connection, now)
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
                self.listeners.left_handshake(port, listener_id);
                (Phase::Closing, self.closing_verdict(handle))
            }
            _ => {
                self.listeners.left_handshake(port, listener_id);
                let local = SocketAddrV4::new(self.config.address, port);
                let opened = self
                    .listeners
                    .acceptor(port, listener_id)
                    .and_then(|acceptor| {
                        self.open_stream(id, handle, local, tuple.remote)
                            .map(|(connection, stream)| (acceptor, connection, stream))
                    });
                let Some((acceptor, connection, stream)) = opened else {
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    Counters::add(&self.counters.accepts_refused, 1);
                    Counters::add(&self.counters.aborted, 1);
                    return (Phase::Closing, Verdict::Closing);
                };
                acceptor.offer(stream, tuple.remote, &self.counters);
                self.service_open(handle, connection, now)
            }
        }
    }

    /// An established socket gets its stream (unless every handle is gone).
    fn open_stream(
        &mut self,
        id: ConnId,
        handle: SocketHandle,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> Option<(Box<Connection>, TcpStream)> {
        let link = self.link.upgrade()?;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        Some(Connection::establish(
            id,
            socket,
            link,
            &self.config,
            local,
            remote,
        ))
    }

    fn service_open(
        &mut self,
        handle: SocketHandle,
        mut connection: Box<Connection>,
        now: Instant,
    ) -> (Phase, Verdict) {
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match connection.service(socket, now, self.window_align, &self.counters) {
            Verdict::Keep => {
                for deadline in connection.deadlines() {
                    self.note_deadline(deadline);
                }
                (Phase::Open(connection), Verdict::Keep)
            }
            verdict => (Phase::Closing, verdict),
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
            } => self.listeners.left_handshake(listener, listener_id),
            Phase::Open(connection) => connection.detach(End::Reset),
            Phase::Dialing { reply, .. } => {
                let _ = reply.send(Err(ConnectError::Refused));
            }
            Phase::Closing => {}
        }
        trace!(remote = %conn.tuple.remote, "netstack: connection reaped");
    }

    fn publish(&self) {
        let listening = self.listeners.listening_sockets();
        let c = &self.counters;
        c.open_sockets
            .store(self.conns.len() + listening, Ordering::Relaxed);
        c.connections.store(self.conns.len(), Ordering::Relaxed);
        c.listening_sockets.store(listening, Ordering::Relaxed);
        c.listeners.store(self.listeners.count(), Ordering::Relaxed);
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
        let (listeners, mut res) = self.split_listeners();
        listeners.unlisten_all(now, &mut res);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(conn) = self.conns.remove(&id) {
                self.sockets.remove(conn.handle);
                if let Phase::Open(connection) = conn.phase {
                    connection.detach(End::StackClosed);
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
            if let Phase::Open(connection) = &conn.phase {
                connection.detach(End::StackClosed);
            }
        }
    }
}
