//! The WireGuard concentrator: the I/O-free [`peers::PeerTable`] and the UDP driver
//! around it (one `SO_REUSEPORT` socket per worker, a timer task, no per-peer sockets or
//! tasks). It knows nothing of the registry, the API or who listens to its events: it is
//! told which peers to serve ([`PeerConfig`]) and reports what happened to a
//! [`PeerEventSink`].

pub mod admission;
pub mod batch;
pub mod counters;
pub mod effects;
pub mod handshake_queue;
pub mod host_queue;
pub mod peers;
#[cfg(test)]
mod proptests;
pub mod streams;
#[cfg(test)]
mod tests;
pub mod timers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use floto_proto::wireguard::is_initiation;
use floto_proto::{DeviceId, WgKey};

pub use batch::SendBatch;
pub use counters::{Counters, DropReason};
pub use effects::Effects;
pub use handshake_queue::HandshakeQueue;
pub use host_queue::HostQueue;
pub use peers::{Peer, PeerConfig, PeerEvent, PeerStatus, PeerTable};
pub use streams::StreamEndpoints;

/// Who hears of the concentrator's online-state transitions and endpoint changes.
pub trait PeerEventSink: Send + Sync {
    fn peer_event(&self, event: PeerEvent);
}

/// An IP packet from a device to the server's overlay address, for the netstack.
pub type HostPacket = Vec<u8>;

/// Handshake initiations waiting for a worker; beyond this they are dropped (the device
/// retries after 5 s). About 5 s of work for this many handshake workers at full speed.
const HANDSHAKE_QUEUE: usize = 16_384;

/// An initiation that waited longer than this is dropped unanswered: WireGuard devices
/// retry after 5 s with a new ephemeral key, so an answer to the old one is wasted work.
const HANDSHAKE_MAX_AGE: Duration = Duration::from_secs(3);

/// When the oldest queued initiation has waited this long, the server is under load: new
/// initiations must carry a cookie (MAC2), or they are answered with a cookie reply. One
/// admitted now would likely wait about as long, close to `HANDSHAKE_MAX_AGE`, so the
/// cookie costs a legitimate device little (it retries after 5 s, then with proof of its
/// address), while a spoofed flood stops reaching the workers. A storm the
/// workers keep up with is answered without cookies. WireGuard's own implementations
/// decide by queue length (an eighth of it), which in a storm of real devices puts most of
/// them through a 5 s cookie round.
///
/// 1 s was measured too eager: in the 10,000-device storm, where the load generator shares
/// the two cores and its initiations arrive over 3 s, the last few hundred devices were sent
/// through a cookie round in one run of three (all online in 6.8 s instead of 3.1 s).
const HANDSHAKE_BACKLOG: Duration = Duration::from_secs(2);

/// The running concentrator: the peer table plus the sockets that feed it.
pub struct Concentrator {
    pub table: Arc<PeerTable>,
    sockets: Vec<Arc<UdpSocket>>,
    to_host: Arc<HostQueue>,
    events: Arc<dyn PeerEventSink>,
    local_addr: SocketAddr,
    handshakes: HandshakeQueue,
    /// Time to answer one handshake initiation (`floto_handshake_duration_seconds`).
    handshake_seconds: Histogram,
    /// Devices' TLS streams, as endpoints (see [`streams`]).
    pub streams: Arc<StreamEndpoints>,
}

impl std::fmt::Debug for Concentrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Concentrator")
            .field("local_addr", &self.local_addr)
            .field("peers", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl Concentrator {
    /// Binds `workers` sockets on `listen` (the first one picks the port when it is 0).
    pub fn bind(
        listen: SocketAddr,
        workers: usize,
        table: Arc<PeerTable>,
        events: Arc<dyn PeerEventSink>,
        handshake_seconds: Histogram,
    ) -> anyhow::Result<(Self, Arc<HostQueue>)> {
        let mut sockets = Vec::with_capacity(workers.max(1));
        let first = reuseport_socket(listen)
            .with_context(|| format!("binding the WireGuard socket on UDP {listen}"))?;
        let local_addr = first.local_addr()?;
        sockets.push(Arc::new(first));
        for _ in 1..workers.max(1) {
            sockets.push(Arc::new(reuseport_socket(local_addr)?));
        }
        let to_host = Arc::new(HostQueue::default());
        let from_devices = to_host.clone();
        Ok((
            Self {
                table,
                sockets,
                to_host,
                events,
                local_addr,
                handshakes: HandshakeQueue::new(HANDSHAKE_QUEUE),
                handshake_seconds,
                streams: Arc::new(StreamEndpoints::new()),
            },
            from_devices,
        ))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn public_key(&self) -> WgKey {
        self.table.public_key()
    }

    /// Carries out what the core decided: datagrams out of `socket`, packets to the
    /// netstack, events to the sink.
    fn carry_out(&self, socket: &UdpSocket, fx: &mut Effects) {
        while let Some((to, datagram)) = fx.poll_transmit() {
            if streams::is_stream(&to) {
                self.streams.send(&to, datagram);
                continue;
            }
            if let Err(e) = socket.try_send_to(datagram, to) {
                // UDP: a full send buffer drops, as the kernel would.
                debug!(%to, error = %e, "datagram not sent");
            }
        }
        self.deliver(fx);
    }

    /// Like [`Self::carry_out`], but datagrams wait in `batch` until [`Self::flush`].
    fn carry_out_batched(&self, fx: &mut Effects, batch: &mut SendBatch) {
        while let Some((to, datagram)) = fx.poll_transmit() {
            if streams::is_stream(&to) {
                self.streams.send(&to, datagram);
            } else {
                batch.push(&self.sockets[0], to, datagram);
            }
        }
        self.deliver(fx);
    }

    /// Host packets to the netstack, events to the sink.
    fn deliver(&self, fx: &mut Effects) {
        while let Some((from, packet)) = fx.poll_host_packet() {
            if !self.to_host.push(from, packet) {
                self.table.count_drop(DropReason::HostQueueFull);
            }
        }
        while let Some(event) = fx.poll_event() {
            self.events.peer_event(event);
        }
    }

    /// Runs `step` on the core with a fresh [`Effects`] and carries out its effects on the
    /// first socket (for calls outside the worker loops).
    fn with_effects<T>(&self, step: impl FnOnce(&mut Effects) -> T) -> T {
        let mut fx = Effects::new();
        let result = step(&mut fx);
        self.carry_out(&self.sockets[0], &mut fx);
        result
    }

    /// Serves a peer as `config` says: adds it, or re-keys it (its session drops and the
    /// device handshakes again with its new key).
    pub fn upsert_peer(&self, config: PeerConfig) {
        let now = Instant::now();
        self.with_effects(|fx| self.table.upsert(config, now, fx));
    }

    /// Removes a device's peer and drops its session at once.
    pub fn remove_peer(&self, id: &DeviceId) -> bool {
        let now = Instant::now();
        self.with_effects(|fx| self.table.remove(id, now, fx))
    }

    /// Lets a device's session here go: another node of the cluster holds a newer one.
    pub fn release_peer(&self, id: &DeviceId) -> bool {
        let now = Instant::now();
        self.with_effects(|fx| self.table.release(id, now, fx))
    }

    /// Encrypts an IP packet from the server's netstack for its device; the datagrams wait in
    /// `batch` until [`Self::flush`].
    pub fn send_to_device(
        &self,
        packet: &[u8],
        scratch: &mut [u8],
        fx: &mut Effects,
        batch: &mut SendBatch,
    ) {
        self.table
            .send_to_device(packet, Instant::now(), scratch, fx);
        self.carry_out_batched(fx, batch);
    }

    /// Sends what `batch` holds.
    pub fn flush(&self, batch: &mut SendBatch) {
        batch.flush(&self.sockets[0]);
    }

    /// Starts handshakes to devices' last known endpoints, `per_second` at a time, so that
    /// after a restart devices are back in seconds rather than after their own retry timers.
    pub async fn call_back(
        &self,
        targets: Vec<(DeviceId, SocketAddr)>,
        per_second: u32,
        shutdown: CancellationToken,
    ) {
        if targets.is_empty() {
            return;
        }
        let started = Instant::now();
        let gap = Duration::from_secs(1) / per_second.max(1);
        let mut tick = tokio::time::interval(gap);
        let mut scratch = vec![0u8; peers::MAX_DATAGRAM];
        let mut fx = Effects::new();
        let mut sent = 0usize;
        for (id, endpoint) in &targets {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let called = self
                .table
                .initiate(id, *endpoint, Instant::now(), &mut scratch, &mut fx);
            self.carry_out(&self.sockets[0], &mut fx);
            if called {
                sent += 1;
            }
        }
        info!(sent, known = targets.len(), elapsed = ?started.elapsed(), "called back devices at their last endpoints");
    }

    /// Runs the worker and timer loops until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for socket in &self.sockets {
            let me = self.clone();
            let socket = socket.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { me.receive_loop(&socket, shutdown).await });
        }
        // Handshake workers: threads, as the work is CPU-bound (Diffie-Hellmans).
        for i in 0..self.sockets.len() {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn_blocking(move || me.handshake_worker(i, &shutdown));
        }
        let me = self.clone();
        let timer_shutdown = shutdown.clone();
        tasks.spawn(async move { me.timer_loop(timer_shutdown).await });
        {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                me.handshakes.wake_all();
            });
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                warn!(error = %e, "concentrator task ended abnormally");
            }
        }
    }

    async fn receive_loop(&self, socket: &UdpSocket, shutdown: CancellationToken) {
        let mut buf = vec![0u8; peers::MAX_DATAGRAM];
        let mut scratch = vec![0u8; peers::MAX_DATAGRAM];
        let mut fx = Effects::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.readable() => {
                    if let Err(e) = r {
                        warn!(error = %e, "WireGuard socket failed");
                        return;
                    }
                }
            }
            // Drain what is queued before yielding again.
            for _ in 0..256 {
                match socket.try_recv_from(&mut buf) {
                    Ok((n, from)) => {
                        self.on_datagram(from, &buf[..n], &mut scratch, &mut fx);
                        self.carry_out(socket, &mut fx);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors surface here on Linux (ECONNREFUSED); nothing to do.
                        debug!(error = %e, "recv error");
                        break;
                    }
                }
            }
        }
    }

    /// One datagram from `from` (a UDP peer or a stream): an initiation is checked cheaply
    /// here and queued for a worker (the Diffie-Hellmans), anything else is routed.
    fn on_datagram(&self, from: SocketAddr, datagram: &[u8], scratch: &mut [u8], fx: &mut Effects) {
        let now = Instant::now();
        if is_initiation(datagram) {
            let backlogged = self.handshakes.backlogged(now, HANDSHAKE_BACKLOG);
            if self.table.admit(from, datagram, backlogged, scratch, fx)
                && !self.handshakes.push(from, datagram, now)
            {
                self.table.count_drop(DropReason::Overloaded);
            }
        } else {
            self.table.route_datagram(from, datagram, now, scratch, fx);
        }
    }

    /// A datagram that arrived on the TLS stream at endpoint `from` (see [`streams`]):
    /// handled as a UDP one. `scratch` must hold [`peers::MAX_DATAGRAM`] bytes.
    pub fn receive_from_stream(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        fx: &mut Effects,
    ) {
        self.streams
            .rx_bytes
            .fetch_add(datagram.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.on_datagram(from, datagram, scratch, fx);
        self.carry_out(&self.sockets[0], fx);
    }

    /// Answers queued handshake initiations until `shutdown`.
    fn handshake_worker(&self, n: usize, shutdown: &CancellationToken) {
        let mut scratch = vec![0u8; peers::MAX_DATAGRAM];
        let mut fx = Effects::new();
        let socket = &self.sockets[n % self.sockets.len()];
        while !shutdown.is_cancelled() {
            let Some(init) = self.handshakes.pop(Duration::from_millis(200)) else {
                continue;
            };
            let now = Instant::now();
            if now.saturating_duration_since(init.at) > HANDSHAKE_MAX_AGE {
                self.table.count_drop(DropReason::Overloaded);
                continue;
            }
            self.table
                .handle_initiation(init.from, &init.datagram, now, &mut scratch, &mut fx);
            self.handshake_seconds.observe(now.elapsed().as_secs_f64());
            self.carry_out(socket, &mut fx);
        }
    }

    async fn timer_loop(&self, shutdown: CancellationToken) {
        let mut scratch = vec![0u8; peers::MAX_DATAGRAM];
        let mut fx = Effects::new();
        loop {
            let now = Instant::now();
            // At least once a second, for the rate limiter's reset.
            let next = self
                .table
                .poll_timeout()
                .map_or(now + Duration::from_secs(1), |(at, _)| at)
                .min(now + Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next.into()) => {}
            }
            self.table
                .handle_timeout(Instant::now(), &mut scratch, &mut fx);
            self.carry_out(&self.sockets[0], &mut fx);
        }
    }
}

/// A non-blocking UDP socket with `SO_REUSEPORT`, so several workers share one port.
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Bigger buffers ride out bursts (handshake storms); the kernel caps them at rmem_max.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}
