//! floto-netstack: a userspace TCP/IP stack (smoltcp) on one IPv4 address, bridged to tokio:
//! dial and accept TCP connections over a channel of raw IP packets. No TUN device and no root.
//!
//! It does not do WireGuard, routing between peers, UDP or IPv6 (of ICMP it only answers
//! pings): the caller feeds it the IPv4 packets addressed to the stack (`inbound`) and carries
//! away the packets it emits ([`PacketSink`]). The server dials devices' overlay addresses
//! with it (broker sessions); the device agent accepts connections on its overlay address with
//! it (userspace mode).
//!
//! ```no_run
//! # use tokio::sync::mpsc::Receiver;
//! # async fn demo(inbound: Receiver<Vec<u8>>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::{net::{Ipv4Addr, SocketAddrV4}, time::Duration};
//! let config = floto_netstack::Config::new(Ipv4Addr::new(10, 240, 0, 1), 16);
//! let (stack, driver) = floto_netstack::new(config, inbound, |packet: &[u8]| {
//!     // encapsulate `packet` into WireGuard here (never block)
//! });
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(driver.run(shutdown.clone()));
//! let stream = stack
//!     .connect(SocketAddrV4::new(Ipv4Addr::new(10, 240, 3, 7), 22), Duration::from_secs(10))
//!     .await?;
//! # drop(stream); Ok(()) }
//! ```
//!
//! Sending: smoltcp's congestion control only reacts to loss, so the driver also caps how much
//! of each stream it hands to smoltcp: twice the connection's measured bandwidth-delay
//! product, and at least 64 KiB (as BBR bounds its flight). A fast sender then does not
//! overflow a slow WireGuard peer's socket with a whole window at once.
//!
//! Threading: one driver task owns the smoltcp interface and all sockets. Streams exchange
//! bytes with it through small bounded queues (one per direction) and wake it when they add
//! data or free space, so a slow reader applies backpressure all the way to the peer's window.
#![forbid(unsafe_code)]

mod clock;
mod connection;
mod device;
mod driver;
mod flight;
mod listeners;
mod packet;
mod ports;
mod stream;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

pub use driver::NetstackDriver;
pub use stream::{TcpListener, TcpStream};

/// Settings of one stack. Build it with [`Config::new`] and adjust fields as needed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The stack's own address.
    pub address: Ipv4Addr,
    /// Prefix length of `address`'s network. Destinations outside it are reachable too: every
    /// packet goes to the [`PacketSink`] anyway.
    pub prefix_len: u8,
    /// More addresses of the stack, each with its network's prefix length (at most three):
    /// a connection to a peer in one of those networks is made from the address there, so
    /// the peer sees an address of its own network. Default none.
    pub more_addresses: Vec<(Ipv4Addr, u8)>,
    /// Largest IP packet the stack emits (the MSS it announces is `mtu - 40`). Default 1420,
    /// WireGuard's usual MTU.
    pub mtu: usize,
    /// Per-socket receive and transmit buffer in bytes (the receive buffer is the TCP window).
    /// Default 256 KiB. Memory is touched only as data flows. A connection keeps at most this
    /// much unacknowledged, and usually less: about twice its measured bandwidth-delay
    /// product, at least 64 KiB (see the driver's flight cap).
    pub tcp_buffer: usize,
    /// Upper bound on smoltcp sockets: connections, half-open handshakes, listening slots and
    /// sockets still closing. Beyond it `connect` fails with [`ConnectError::TooManySockets`],
    /// `listen` with [`ListenError::TooManySockets`] and incoming SYNs are refused (RST).
    /// Default 4096.
    pub max_sockets: usize,
    /// Idle connections send a keep-alive probe this often, so that a vanished peer is noticed
    /// (see `peer_timeout`). `None` turns keep-alives off, and with them `peer_timeout`: a
    /// connection to a vanished peer then lives until the application closes it. Default 30 s.
    pub keep_alive: Option<Duration>,
    /// An established connection is reset when the peer has sent nothing (no data, no ACK, no
    /// answer to a keep-alive probe) for this long. Default 120 s.
    pub peer_timeout: Duration,
}

impl Config {
    /// A config for a stack on `address`/`prefix_len` with the defaults for the rest.
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            address,
            prefix_len,
            more_addresses: Vec::new(),
            mtu: 1420,
            tcp_buffer: 256 * 1024,
            max_sockets: 4096,
            keep_alive: Some(Duration::from_secs(30)),
            peer_timeout: Duration::from_secs(120),
        }
    }
}

/// Where the stack's outgoing IP packets go (the caller encapsulates them into WireGuard).
///
/// `send` is called from the driver task and must not block: if the path is congested, drop the
/// packet (TCP retransmits), as a network card would.
pub trait PacketSink: Send + 'static {
    /// Take one complete IPv4 packet.
    fn send(&mut self, packet: &[u8]);

    /// The driver's round is over: send anything held back. A sink may keep the packets of a
    /// round to send them together; the driver calls this before it sleeps.
    fn flush(&mut self) {}
}

impl<F: FnMut(&[u8]) + Send + 'static> PacketSink for F {
    fn send(&mut self, packet: &[u8]) {
        self(packet)
    }
}

/// Create a stack. Incoming IP packets are fed through `inbound`. Returns a cloneable handle
/// and the driver, which must be spawned (`tokio::spawn(driver.run(shutdown))`) for anything to
/// happen.
pub fn new(
    config: Config,
    inbound: mpsc::Receiver<Vec<u8>>,
    outbound: impl PacketSink,
) -> (NetstackHandle, NetstackDriver) {
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let wake = Arc::new(DriverWake::default());
    let counters = Arc::new(Counters::default());
    let link = Arc::new(Link {
        commands: commands_tx,
        wake: wake.clone(),
        counters: counters.clone(),
    });
    let driver = NetstackDriver::new(
        config,
        inbound,
        Box::new(outbound),
        commands_rx,
        Arc::downgrade(&link),
        wake,
        counters,
    );
    (NetstackHandle { link }, driver)
}

/// A cheap, cloneable handle to a running stack.
#[derive(Clone)]
pub struct NetstackHandle {
    link: Arc<Link>,
}

impl std::fmt::Debug for NetstackHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetstackHandle").finish_non_exhaustive()
    }
}

impl NetstackHandle {
    /// TCP connect from this stack's address (an ephemeral local port) to `remote`.
    ///
    /// Fails with [`ConnectError::Refused`] when the peer answers with RST and with
    /// [`ConnectError::TimedOut`] when nothing answers within `timeout` (the SYN is retransmitted
    /// after 1, 3, 7, 15 ... seconds). Dropping the future abandons the attempt.
    pub async fn connect(
        &self,
        remote: SocketAddrV4,
        timeout: Duration,
    ) -> Result<TcpStream, ConnectError> {
        let (reply, answer) = oneshot::channel();
        self.link
            .commands
            .send(Command::Connect {
                remote,
                timeout,
                reply,
            })
            .map_err(|_| ConnectError::StackClosed)?;
        // If this future is dropped before the answer, have the driver notice soon rather
        // than at the next SYN retransmission.
        struct SweepOnDrop<'a>(Option<&'a mpsc::UnboundedSender<Command>>);
        impl Drop for SweepOnDrop<'_> {
            fn drop(&mut self) {
                if let Some(commands) = self.0 {
                    let _ = commands.send(Command::Sweep);
                }
            }
        }
        let mut guard = SweepOnDrop(Some(&self.link.commands));
        let answer = answer.await;
        guard.0 = None;
        answer.map_err(|_| ConnectError::StackClosed)?
    }

    /// Accept TCP connections on `port` of this stack's address (0 picks a free port from the
    /// ephemeral range; see [`TcpListener::local_port`]). A few sockets are kept listening and
    /// replenished as SYNs arrive, so parallel connection attempts are not refused.
    pub async fn listen(&self, port: u16) -> Result<TcpListener, ListenError> {
        let (reply, answer) = oneshot::channel();
        self.link
            .commands
            .send(Command::Listen { port, reply })
            .map_err(|_| ListenError::StackClosed)?;
        let registered = answer.await.map_err(|_| ListenError::StackClosed)??;
        Ok(TcpListener::new(registered, self.link.clone()))
    }

    /// Counters for tests and metrics, updated by the driver after each round of work.
    pub fn stats(&self) -> Stats {
        self.link.counters.snapshot()
    }
}

/// A snapshot of the stack's counters (see [`NetstackHandle::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// smoltcp sockets in use: connections of every kind plus listening slots.
    pub open_sockets: usize,
    /// Sockets that carry a connection (dialing, handshaking, open, closing, or for 2 s in
    /// TIME-WAIT after this end closed first).
    pub connections: usize,
    /// Sockets waiting in LISTEN for a SYN.
    pub listening_sockets: usize,
    /// Ports with a live [`TcpListener`].
    pub listeners: usize,
    /// IP packets received through `inbound`.
    pub packets_in: u64,
    /// Bytes received through `inbound`.
    pub bytes_in: u64,
    /// IP packets given to the [`PacketSink`].
    pub packets_out: u64,
    /// Bytes given to the [`PacketSink`].
    pub bytes_out: u64,
    /// Inbound packets dropped before smoltcp saw them (not IPv4, or a repeated SYN for a
    /// connection that already exists). smoltcp silently drops malformed packets on its own.
    pub packets_dropped: u64,
    /// `connect` calls that produced a stream.
    pub connects_established: u64,
    /// `connect` calls answered with RST.
    pub connects_refused: u64,
    /// `connect` calls that got no answer in time.
    pub connects_timed_out: u64,
    /// Incoming connections handed to a [`TcpListener`].
    pub accepted: u64,
    /// Incoming SYNs refused because no listening socket could be made (`max_sockets` or the
    /// per-listener handshake limit reached) or the listener's accept queue was full.
    pub accepts_refused: u64,
    /// Connections this stack aborted with RST (closing took too long, accept queue full,
    /// connect abandoned or timed out, stack shut down).
    pub aborted: u64,
    /// Rounds of work the driver has done (each wake-up is one); for spotting busy loops.
    pub wakeups: u64,
}

/// Errors of [`NetstackHandle::connect`] and [`TcpListener::accept`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The peer answered with RST: nothing listens on that port.
    #[error("connection refused: nothing listens on that port")]
    Refused,
    /// No answer within the timeout (the host is down, offline or filtered).
    #[error("connection timed out: the host is down, offline or filtered")]
    TimedOut,
    /// The stack has as many sockets as `max_sockets`.
    #[error(
        "the userspace network stack has reached max_sockets; close connections or raise the limit"
    )]
    TooManySockets,
    /// Every port of the ephemeral range (49152-65535) is taken by a connection.
    #[error("no free ephemeral port left (49152-65535 all in use)")]
    NoFreePort,
    /// The address cannot be dialed (unspecified address or port 0).
    #[error("cannot connect to {0}: unspecified address or port 0")]
    Unaddressable(SocketAddrV4),
    /// The stack's driver stopped.
    #[error("the userspace network stack has stopped")]
    StackClosed,
}

/// Errors of [`NetstackHandle::listen`].
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another [`TcpListener`] of this stack holds the port.
    #[error("port {0} already has a listener on this stack")]
    AlreadyListening(u16),
    /// The stack has as many sockets as `max_sockets`.
    #[error(
        "the userspace network stack has reached max_sockets; close connections or raise the limit"
    )]
    TooManySockets,
    /// The stack's driver stopped.
    #[error("the userspace network stack has stopped")]
    StackClosed,
}

/// What handles, listeners and streams share with the driver. The command channel closes
/// when the last of them is dropped.
pub(crate) struct Link {
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) wake: Arc<DriverWake>,
    pub(crate) counters: Arc<Counters>,
}

/// A listener as registered by the driver.
pub(crate) struct Registered {
    pub(crate) port: u16,
    pub(crate) id: u64,
    pub(crate) accepted: mpsc::Receiver<(TcpStream, SocketAddrV4)>,
}

pub(crate) enum Command {
    Connect {
        remote: SocketAddrV4,
        timeout: Duration,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    },
    Listen {
        port: u16,
        reply: oneshot::Sender<Result<Registered, ListenError>>,
    },
    Unlisten {
        port: u16,
        id: u64,
    },
    /// Look at every connection now (a `connect` was abandoned).
    Sweep,
}

/// Identifies a connection for its whole life (smoltcp handles are reused).
pub(crate) type ConnId = u64;

/// How streams wake the driver: they queue their id and notify.
#[derive(Default)]
pub(crate) struct DriverWake {
    pub(crate) notify: Notify,
    pub(crate) dirty: parking_lot::Mutex<Vec<ConnId>>,
}

impl DriverWake {
    pub(crate) fn schedule(&self, id: ConnId) {
        self.dirty.lock().push(id);
        self.notify.notify_one();
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) open_sockets: AtomicUsize,
    pub(crate) connections: AtomicUsize,
    pub(crate) listening_sockets: AtomicUsize,
    pub(crate) listeners: AtomicUsize,
    pub(crate) packets_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) packets_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) packets_dropped: AtomicU64,
    pub(crate) connects_established: AtomicU64,
    pub(crate) connects_refused: AtomicU64,
    pub(crate) connects_timed_out: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) accepts_refused: AtomicU64,
    pub(crate) aborted: AtomicU64,
    pub(crate) wakeups: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Stats {
        let u = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            open_sockets: u(&self.open_sockets),
            connections: u(&self.connections),
            listening_sockets: u(&self.listening_sockets),
            listeners: u(&self.listeners),
            packets_in: n(&self.packets_in),
            bytes_in: n(&self.bytes_in),
            packets_out: n(&self.packets_out),
            bytes_out: n(&self.bytes_out),
            packets_dropped: n(&self.packets_dropped),
            connects_established: n(&self.connects_established),
            connects_refused: n(&self.connects_refused),
            connects_timed_out: n(&self.connects_timed_out),
            accepted: n(&self.accepted),
            accepts_refused: n(&self.accepts_refused),
            aborted: n(&self.aborted),
            wakeups: n(&self.wakeups),
        }
    }
}
