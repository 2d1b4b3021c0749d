//! The WireGuard concentrator: the I/O-free [`peers::PeerTable`] and the UDP driver
//! around it (one `SO_REUSEPORT` socket per worker, a timer task, no per-peer sockets or
//! tasks). It knows nothing of the registry, the API or who listens to its events: it is
//! told which peers to serve ([`PeerConfig`]) and reports what happened to a
//! [`PeerEventSink`].

pub mod admission;
pub mod batch;
pub mod counters;
#[cfg(test)]
mod dh_tests;
pub mod effects;
pub mod handshake_queue;
pub mod host_queue;
pub mod pacer;
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
/// retries after 5 s). Longer than [`HANDSHAKE_DRAIN_LIMIT`] of work at any pace measured
/// here (about 5,000 a second on 2 cores), so that the drain limit, not the length, decides.
const HANDSHAKE_QUEUE: usize = 32_768;

/// An initiation that waited longer than this is dropped unanswered: WireGuard devices
/// retry 5 s after their initiation (plus up to a third of a second of jitter) with a new
/// ephemeral key, so an answer to the old one would be wasted work.
const HANDSHAKE_MAX_AGE: Duration = Duration::from_millis(4500);

/// The server is under load when an initiation queued now would wait this long: the
/// queue's length at the workers' measured pace ([`HandshakeQueue::backlogged`]). Then new
/// initiations must carry a cookie (MAC2), or they are answered with a cookie reply.
///
/// Up to this much work is taken on without cookies, so that in a storm the workers stay
/// busy until the devices turned away retry (5 s later): a cookie costs its device that 5 s
/// retry, and turning away work the server could have done before then leaves its cores
/// idle. The margin to [`HANDSHAKE_MAX_AGE`] absorbs the pace changing under the queue.
/// An initiation flood from unknown keys is turned to cookies at once by its failures
/// ([`admission::STRANGER_LIMIT`]), not by this.
///
/// Before, the rule was the age of the queue's head (2 s): a burst filled the queue with
/// several seconds of work before its head was old enough, the excess was shed unanswered
/// at 3 s, and from then on devices got cookies while the queue emptied: the 50,000-device
/// storm sent about 20,000 to 30,000 cookie replies and took 17 to 19 s.
const HANDSHAKE_DRAIN_LIMIT: Duration = Duration::from_millis(3500);

/// Ceiling of the call-back rate ([`Concentrator::call_back`]).
const CALL_BACK_MAX_RATE: f64 = 50_000.0;
/// How often the call-back sends what its rate allows.
const CALL_BACK_TICK: Duration = Duration::from_millis(10);
/// How often the call-back's rate is reconsidered ([`pacer`]).
const CALL_BACK_STEP: Duration = Duration::from_millis(100);
/// The call-back slows down while a device's own initiation queued now would wait this
/// long: devices that connect by themselves come first.
const CALL_BACK_YIELD: Duration = Duration::from_millis(500);

/// The running concentrator: the peer table plus the sockets that feed it.
pub struct Concentrator {
    pub table: Arc<PeerTable>,
    sockets: Vec<Arc<UdpSocket>>,
    to_host: Arc<HostQueue>,
    events: Arc<dyn PeerEventSink>,
    local_addr: SocketAddr,
    /// Initiations waiting for the handshake workers.
    pub handshakes: Arc<HandshakeQueue>,
    /// Time to answer one handshake initiation (`floto_handshake_duration_seconds`).
    handshake_seconds: Histogram,
    /// Devices' TLS streams, as endpoints (see [`streams`]).
    pub streams: Arc<StreamEndpoints>,
    /// Devices whose static-static Diffie-Hellman is yet to be computed, for the
    /// low-priority thread [`Self::run`] starts ([`PeerTable::precompute`]).
    precompute_tx: std::sync::mpsc::Sender<DeviceId>,
    precompute_rx: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<DeviceId>>>,
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
        let (precompute_tx, precompute_rx) = std::sync::mpsc::channel();
        let handshakes = Arc::new(HandshakeQueue::new(HANDSHAKE_QUEUE, sockets.len()));
        Ok((
            Self {
                table,
                sockets,
                to_host,
                events,
                local_addr,
                handshakes,
                handshake_seconds,
                streams: Arc::new(StreamEndpoints::new()),
                precompute_tx,
                precompute_rx: parking_lot::Mutex::new(Some(precompute_rx)),
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
        let id = config.id;
        if self.with_effects(|fx| self.table.upsert(config, now, fx)) {
            // Ends only with the concentrator (then nothing needs computing).
            let _ = self.precompute_tx.send(id);
        }
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

    /// Starts handshakes to devices' last known endpoints, so that after a restart (or a
    /// takeover) devices are back in seconds rather than after their own retry timers.
    /// Starts at `start_per_second`, then goes as fast as the answers come back without
    /// queueing ([`pacer`]).
    pub async fn call_back(
        &self,
        targets: Vec<(DeviceId, SocketAddr)>,
        start_per_second: u32,
        shutdown: CancellationToken,
    ) {
        if targets.is_empty() {
            return;
        }
        let start = f64::from(start_per_second.max(1));
        let mut pacer = pacer::Pacer::new(start, start / 2.0, CALL_BACK_MAX_RATE);
        let started = Instant::now();
        let mut tick = tokio::time::interval(CALL_BACK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scratch = vec![0u8; peers::MAX_DATAGRAM];
        let mut fx = Effects::new();
        let mut sent = 0usize;
        let mut next = targets.iter();
        let mut budget = 0.0f64;
        let mut last = Instant::now();
        let mut step_started = last;
        let mut answers = self.table.call_back_answers();
        let mut peak = pacer.rate();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            if now.saturating_duration_since(step_started) >= CALL_BACK_STEP {
                let seen = self.table.call_back_answers();
                pacer.step(pacer::Step {
                    answered: seen.0 - answers.0,
                    rtt_sum: seen.1.saturating_sub(answers.1),
                    devices_waiting: self.handshakes.backlogged(now, CALL_BACK_YIELD),
                });
                peak = peak.max(pacer.rate());
                answers = seen;
                step_started = now;
            }
            // At most a tick's worth carried over, so a stall does not turn into a burst.
            budget = (budget + pacer.rate() * now.saturating_duration_since(last).as_secs_f64())
                .min(pacer.rate() * CALL_BACK_TICK.as_secs_f64() * 2.0);
            last = now;
            while budget >= 1.0 {
                let Some((id, endpoint)) = next.next() else {
                    info!(sent, known = targets.len(), elapsed = ?started.elapsed(), peak_per_second = peak.round(), "called back devices at their last endpoints");
                    return;
                };
                if self
                    .table
                    .initiate(id, *endpoint, Instant::now(), &mut scratch, &mut fx)
                {
                    sent += 1;
                    budget -= 1.0;
                }
                self.carry_out(&self.sockets[0], &mut fx);
            }
        }
    }

    /// Runs the worker and timer loops until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Some(rx) = self.precompute_rx.lock().take() {
            spawn_precompute(self.table.clone(), rx, shutdown.clone());
        }
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
            let backlogged = self.handshakes.backlogged(now, HANDSHAKE_DRAIN_LIMIT);
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
            if !self
                .table
                .recheck(init.from, &init.datagram, &mut scratch, &mut fx)
            {
                self.carry_out(socket, &mut fx);
                continue;
            }
            self.table
                .handle_initiation(init.from, &init.datagram, now, &mut scratch, &mut fx);
            let took = now.elapsed();
            self.handshakes.record_service(took);
            self.handshake_seconds.observe(took.as_secs_f64());
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

/// Computes the static-static Diffie-Hellman of each device `rx` names, on a thread of
/// its own at a lower priority (nice 10): peers loaded at start-up or enrolled later get
/// theirs ahead of their handshakes when the CPU has time, and a handshake that comes
/// first computes it itself (once either way).
fn spawn_precompute(
    table: Arc<PeerTable>,
    rx: std::sync::mpsc::Receiver<DeviceId>,
    shutdown: CancellationToken,
) {
    let spawned = std::thread::Builder::new()
        .name("floto-wg-precompute".into())
        .spawn(move || {
            // SAFETY: setpriority only reads its arguments; on Linux, PRIO_PROCESS with the
            // thread's id sets the nice value of this thread alone.
            let niced = unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10)
            };
            if niced != 0 {
                debug!("could not lower the precompute thread's priority");
            }
            let started = Instant::now();
            let mut done = 0u64;
            while !shutdown.is_cancelled() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(id) => {
                        if table.precompute(&id) {
                            done += 1;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if done > 0 {
                            debug!(peers = done, elapsed = ?started.elapsed(), "precomputed static Diffie-Hellmans");
                            done = 0;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "no precompute thread: each device's first handshake computes its static Diffie-Hellman");
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
