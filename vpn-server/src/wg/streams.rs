//! Stream endpoints: WireGuard datagrams that travel over a TLS stream instead of UDP (for
//! devices on networks that block UDP). Each open stream gets an address of its own in
//! `100::/64`, the IPv6 discard-only prefix (RFC 6666), which no real peer can have; the
//! core treats it as any other endpoint, so moving between UDP and a stream is ordinary
//! WireGuard roaming, with one session and one online state. Datagrams for a stream go to
//! its bounded queue, and are dropped when the queue is full: TCP under TCP must not build
//! queues.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::mpsc;

/// Datagrams waiting for one stream's writer at most; more are dropped.
pub const STREAM_QUEUE: usize = 256;

/// What the concentrator knows of the open streams.
#[derive(Debug, Default)]
pub struct StreamEndpoints {
    next: AtomicU64,
    open: DashMap<SocketAddr, Stream>,
    /// Bytes of datagrams received from and sent to streams.
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Datagrams dropped because a stream's queue was full, or it had closed.
    pub dropped: AtomicU64,
    /// Streams opened, and closed by the server (a bad frame, silence, a revoked device).
    pub opened: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Debug)]
struct Stream {
    to_device: mpsc::Sender<Vec<u8>>,
    /// The TCP peer the stream came from (for people: where the device is).
    remote: SocketAddr,
}

/// Whether `addr` is a stream's endpoint address (never a real peer's).
pub fn is_stream(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(v6) => v6.ip().segments()[..4] == [0x100, 0, 0, 0],
        SocketAddr::V4(_) => false,
    }
}

impl StreamEndpoints {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new stream from `remote`: its endpoint address, and the receiver of the
    /// datagrams the core sends to it.
    pub fn open(&self, remote: SocketAddr) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let ip = Ipv6Addr::new(
            0x100,
            0,
            0,
            0,
            (n >> 48) as u16,
            (n >> 32) as u16,
            (n >> 16) as u16,
            n as u16,
        );
        let addr = SocketAddr::V6(SocketAddrV6::new(ip, 443, 0, 0));
        let (to_device, rx) = mpsc::channel(STREAM_QUEUE);
        self.open.insert(addr, Stream { to_device, remote });
        self.opened.fetch_add(1, Ordering::Relaxed);
        (addr, rx)
    }

    /// Forgets a closed stream: datagrams for it are dropped from now on.
    pub fn close(&self, addr: &SocketAddr) {
        self.open.remove(addr);
    }

    /// Queues `datagram` for the stream at `to`; drops it when the stream's queue is full or
    /// the stream is gone.
    pub fn send(&self, to: &SocketAddr, datagram: &[u8]) {
        let sent = self
            .open
            .get(to)
            .is_some_and(|s| s.to_device.try_send(datagram.to_vec()).is_ok());
        if sent {
            self.tx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The TCP peer of the stream at `addr`, while it is open.
    pub fn remote(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        self.open.get(addr).map(|s| s.remote)
    }

    /// Streams open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_addresses_are_unique_and_never_a_real_peers() {
        let s = StreamEndpoints::new();
        let remote: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let (a, _ra) = s.open(remote);
        let (b, mut rb) = s.open(remote);
        assert_ne!(a, b);
        assert!(is_stream(&a) && is_stream(&b));
        for real in [
            "192.0.2.1:51820",
            "[2001:db8::1]:51820",
            "[::1]:1",
            "[100:0:0:1::1]:1",
        ] {
            assert!(!is_stream(&real.parse().unwrap()), "{real}");
        }
        assert_eq!(s.remote(&b), Some(remote));
        s.send(&b, b"one");
        assert_eq!(rb.try_recv().unwrap(), b"one");
        // A full queue drops; a closed stream drops.
        for _ in 0..STREAM_QUEUE + 5 {
            s.send(&b, b"x");
        }
        assert_eq!(s.dropped.load(Ordering::Relaxed), 5);
        s.close(&b);
        s.send(&b, b"late");
        assert_eq!(s.dropped.load(Ordering::Relaxed), 6);
        assert_eq!(s.len(), 1);
        assert_eq!(s.remote(&b), None);
    }
}
