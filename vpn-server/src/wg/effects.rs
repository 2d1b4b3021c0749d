//! What the concentrator core decided to do, for its caller to carry out: datagrams to
//! send, IP packets for the server's own stack, and online-state events. The core's
//! methods fill an [`Effects`]; the driver drains it with the `poll_*` methods after each
//! call. Buffers are kept between calls, so a steady driver allocates nothing per datagram.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;

use floto_proto::DeviceId;

use super::peers::PeerEvent;

/// The core's output, in the order it was produced.
#[derive(Debug, Default)]
pub struct Effects {
    /// Every datagram's bytes, back to back.
    bytes: Vec<u8>,
    transmits: Vec<(SocketAddr, Range<usize>)>,
    /// Transmits already handed out by [`Self::poll_transmit`].
    sent: usize,
    host: VecDeque<(DeviceId, Vec<u8>)>,
    events: VecDeque<PeerEvent>,
}

impl Effects {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a WireGuard datagram for `to`.
    pub(super) fn send_datagram(&mut self, to: SocketAddr, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.transmits.push((to, start..self.bytes.len()));
    }

    /// Queues an authenticated IP packet from device `from` to the server's own address.
    pub(super) fn deliver_to_host(&mut self, from: DeviceId, packet: &[u8]) {
        self.host.push_back((from, packet.to_vec()));
    }

    /// Queues an online-state transition or an endpoint change.
    pub(super) fn event(&mut self, event: PeerEvent) {
        self.events.push_back(event);
    }

    /// The next datagram to send, and where.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, &[u8])> {
        let Some((to, range)) = self.transmits.get(self.sent).cloned() else {
            self.bytes.clear();
            self.transmits.clear();
            self.sent = 0;
            return None;
        };
        self.sent += 1;
        Some((to, &self.bytes[range]))
    }

    /// The next IP packet for the server's stack, with the device it came from.
    #[must_use]
    pub fn poll_host_packet(&mut self) -> Option<(DeviceId, Vec<u8>)> {
        self.host.pop_front()
    }

    /// The next online-state event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_come_out_in_order_and_the_buffer_is_reused() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2".parse().unwrap();
        let mut fx = Effects::new();
        fx.send_datagram(a, b"one");
        fx.send_datagram(b, b"three");
        assert_eq!(fx.poll_transmit(), Some((a, &b"one"[..])));
        assert_eq!(fx.poll_transmit(), Some((b, &b"three"[..])));
        assert_eq!(fx.poll_transmit(), None);
        let capacity = fx.bytes.capacity();
        fx.send_datagram(a, b"two");
        assert_eq!(fx.poll_transmit(), Some((a, &b"two"[..])));
        assert_eq!(fx.poll_transmit(), None);
        assert_eq!(fx.bytes.capacity(), capacity);
    }
}
