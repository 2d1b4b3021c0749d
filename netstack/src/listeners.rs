//! Listening ports: a few sockets kept in LISTEN per port and replenished as SYNs take them,
//! within the handshake and socket limits; SYNs that find none are counted (and reported) as
//! refused; established connections are queued for `accept`.
//!
//! It does not service connections: a slot that took a SYN goes to the driver as a handshake,
//! and the driver offers the established connection back through an [`Acceptor`].

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::clock::smol_duration;
use crate::connection::new_socket;
use crate::ports::EphemeralPorts;
use crate::{Config, Counters, ListenError, Registered, TcpStream};

/// Sockets kept in LISTEN per listener. They are replenished after every SYN, so this only
/// needs to cover SYNs arriving within one packet of each other.
const LISTEN_SLOTS: usize = 4;
/// Handshakes in progress per listener (SYN-flood bound).
const MAX_HALF_OPEN: usize = 256;
/// Established connections waiting for `accept`; beyond it new ones are reset.
const ACCEPT_QUEUE: usize = 256;
/// A handshake that does not complete within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What listeners use of the rest of the driver.
pub(crate) struct Resources<'a> {
    pub(crate) sockets: &'a mut SocketSet<'static>,
    pub(crate) ports: &'a mut EphemeralPorts,
    pub(crate) config: &'a Config,
    pub(crate) counters: &'a Counters,
    /// Sockets held by connections (every other socket is a listening slot).
    pub(crate) connections: usize,
}

struct Listener {
    id: u64,
    accept: mpsc::Sender<(TcpStream, SocketAddrV4)>,
    slots: Vec<SocketHandle>,
    half_open: usize,
    /// The port came from the ephemeral allocator (listen on port 0).
    ephemeral: bool,
}

/// The stack's listeners, by port.
#[derive(Default)]
pub(crate) struct Listeners {
    by_port: HashMap<u16, Listener>,
    next_id: u64,
    last_refusal_warning: Option<Instant>,
}

/// Where one listener's established connections go.
pub(crate) struct Acceptor {
    port: u16,
    accept: mpsc::Sender<(TcpStream, SocketAddrV4)>,
}

impl Listeners {
    /// Ports with a listener.
    pub(crate) fn count(&self) -> usize {
        self.by_port.len()
    }

    pub(crate) fn contains(&self, port: u16) -> bool {
        self.by_port.contains_key(&port)
    }

    /// Sockets waiting in LISTEN for a SYN.
    pub(crate) fn listening_sockets(&self) -> usize {
        self.by_port.values().map(|l| l.slots.len()).sum()
    }

    fn sockets_in_use(&self, res: &Resources<'_>) -> usize {
        res.connections + self.listening_sockets()
    }

    /// Answers a `listen` command.
    pub(crate) fn listen(
        &mut self,
        port: u16,
        reply: oneshot::Sender<Result<Registered, ListenError>>,
        now: Instant,
        res: &mut Resources<'_>,
    ) {
        let result = self.start(port, now, res);
        if let Err(e) = &result {
            debug!(port, error = %e, "netstack: listen failed");
        }
        if let Err(Ok(registered)) = reply.send(result) {
            // The caller went away before getting its listener.
            self.unlisten(registered.port, registered.id, now, res);
        }
    }

    fn start(
        &mut self,
        port: u16,
        now: Instant,
        res: &mut Resources<'_>,
    ) -> Result<Registered, ListenError> {
        if port != 0 && self.by_port.contains_key(&port) {
            return Err(ListenError::AlreadyListening(port));
        }
        if self.sockets_in_use(res) >= res.config.max_sockets {
            return Err(ListenError::TooManySockets);
        }
        let (port, ephemeral) = if port == 0 {
            let by_port = &self.by_port;
            let Some(port) = res.ports.allocate(now, |p| by_port.contains_key(&p)) else {
                return Err(ListenError::TooManySockets);
            };
            (port, true)
        } else {
            (port, false)
        };
        let id = self.next_id;
        self.next_id += 1;
        let (accept, accepted) = mpsc::channel(ACCEPT_QUEUE);
        self.by_port.insert(
            port,
            Listener {
                id,
                accept,
                slots: Vec::new(),
                half_open: 0,
                ephemeral,
            },
        );
        self.replenish(port, res);
        debug!(port, "netstack: listening");
        Ok(Registered { port, id, accepted })
    }

    /// Stops listener `id` on `port` (if it is still the one there).
    pub(crate) fn unlisten(&mut self, port: u16, id: u64, now: Instant, res: &mut Resources<'_>) {
        if self.by_port.get(&port).is_none_or(|l| l.id != id) {
            return;
        }
        if let Some(listener) = self.by_port.remove(&port) {
            for handle in listener.slots {
                // LISTEN sockets have no peer: nothing to send.
                res.sockets.remove(handle);
            }
            if listener.ephemeral {
                res.ports.release(port, now);
            }
            debug!(port, "netstack: stopped listening");
        }
    }

    /// Stops every listener.
    pub(crate) fn unlisten_all(&mut self, now: Instant, res: &mut Resources<'_>) {
        let ports: Vec<(u16, u64)> = self.by_port.iter().map(|(p, l)| (*p, l.id)).collect();
        for (port, id) in ports {
            self.unlisten(port, id, now, res);
        }
    }

    /// Keeps `LISTEN_SLOTS` sockets listening on `port`, within the limits.
    pub(crate) fn replenish(&mut self, port: u16, res: &mut Resources<'_>) {
        let mut sockets_in_use = self.sockets_in_use(res);
        let Some(listener) = self.by_port.get(&port) else {
            return;
        };
        let mut missing = LISTEN_SLOTS.saturating_sub(listener.slots.len());
        let mut added = Vec::new();
        while missing > 0
            && listener.half_open < MAX_HALF_OPEN
            && sockets_in_use < res.config.max_sockets
        {
            let mut socket = new_socket(res.config.tcp_buffer);
            socket.set_timeout(Some(smol_duration(HANDSHAKE_TIMEOUT)));
            if socket
                .listen(SocketAddrV4::new(res.config.address, port))
                .is_err()
            {
                break;
            }
            added.push(res.sockets.add(socket));
            sockets_in_use += 1;
            missing -= 1;
        }
        if let Some(listener) = self.by_port.get_mut(&port) {
            listener.slots.extend(added);
        }
    }

    /// Sockets freed this round go back to listeners that ran short.
    pub(crate) fn replenish_short(&mut self, res: &mut Resources<'_>) {
        let short: Vec<u16> = self
            .by_port
            .iter()
            .filter(|(_, l)| l.slots.len() < LISTEN_SLOTS)
            .map(|(port, _)| *port)
            .collect();
        for port in short {
            self.replenish(port, res);
        }
    }

    /// After a SYN to `port`: takes the listening slots that took a SYN out of LISTEN and
    /// counts them as handshakes of the listener. Returns the listener's id and each slot with
    /// its peer, for the driver to track as a connection (and then to `replenish` the port).
    /// A slot without an IPv4 peer is dropped.
    pub(crate) fn claim(
        &mut self,
        port: u16,
        sockets: &mut SocketSet<'static>,
    ) -> Option<(u64, Vec<(SocketHandle, SocketAddrV4)>)> {
        let listener = self.by_port.get_mut(&port)?;
        let mut claimed = Vec::new();
        listener.slots.retain(|&handle| {
            let listening = sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen;
            if !listening {
                claimed.push(handle);
            }
            listening
        });
        let mut handshakes = Vec::new();
        for handle in claimed {
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            match socket.remote_endpoint() {
                Some(IpEndpoint {
                    addr: IpAddress::Ipv4(addr),
                    port: remote_port,
                }) => handshakes.push((handle, SocketAddrV4::new(addr, remote_port))),
                _ => {
                    sockets.remove(handle);
                }
            }
        }
        listener.half_open += handshakes.len();
        Some((listener.id, handshakes))
    }

    /// A SYN for `port` arrives: if its listener has no socket left to take it (and none can
    /// be made), smoltcp will answer RST. Count that and tell the operator (at most every 10 s).
    pub(crate) fn check_refusal(&mut self, port: u16, now: Instant, res: &mut Resources<'_>) {
        if self.by_port.get(&port).is_some_and(|l| l.slots.is_empty()) {
            self.replenish(port, res);
        }
        let Some(listener) = self.by_port.get(&port) else {
            return;
        };
        if !listener.slots.is_empty() {
            return;
        }
        Counters::add(&res.counters.accepts_refused, 1);
        let quiet = self
            .last_refusal_warning
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(10));
        if !quiet {
            self.last_refusal_warning = Some(now);
            warn!(
                port,
                half_open = listener.half_open,
                max_half_open = MAX_HALF_OPEN,
                sockets = self.sockets_in_use(res),
                max_sockets = res.config.max_sockets,
                "netstack: refusing incoming connections: socket or handshake limit reached"
            );
        }
    }

    /// A handshake of listener `listener_id` on `port` ended (established or not).
    pub(crate) fn left_handshake(&mut self, port: u16, listener_id: u64) {
        if let Some(listener) = self.by_port.get_mut(&port) {
            if listener.id == listener_id {
                listener.half_open = listener.half_open.saturating_sub(1);
            }
        }
    }

    /// Where connections of listener `listener_id` on `port` go, if it is still listening.
    pub(crate) fn acceptor(&self, port: u16, listener_id: u64) -> Option<Acceptor> {
        self.by_port
            .get(&port)
            .filter(|l| l.id == listener_id)
            .map(|l| Acceptor {
                port,
                accept: l.accept.clone(),
            })
    }
}

impl Acceptor {
    /// Queues an established connection for `accept`; if the queue is full (or the listener
    /// is gone) the connection is reset.
    pub(crate) fn offer(&self, stream: TcpStream, remote: SocketAddrV4, counters: &Counters) {
        let port = self.port;
        match self.accept.try_send((stream, remote)) {
            Ok(()) => {
                trace!(%remote, port, "netstack: accepted");
                Counters::add(&counters.accepted, 1);
            }
            Err(e) => {
                debug!(%remote, port, "netstack: accept queue full, resetting");
                let (stream, _) = e.into_inner();
                stream.abort_on_drop();
                drop(stream);
                Counters::add(&counters.accepts_refused, 1);
            }
        }
    }
}
