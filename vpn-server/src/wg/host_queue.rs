//! The queue from the data plane to the server's own TCP stack (broker sessions), fair per
//! device: each device may hold at most [`PER_DEVICE`] packets in it, and packets leave in
//! turn, one device after the other, so a device flooding the server's overlay address
//! cannot starve the broker sessions of the others. What does not fit is dropped (TCP
//! retransmits) and counted by the caller.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use tokio::sync::Notify;

use floto_proto::DeviceId;

use super::HostPacket;

/// Packets one device may have waiting.
pub const PER_DEVICE: usize = 256;
/// Packets waiting in all.
pub const TOTAL: usize = 4096;

/// A round-robin queue of per-device queues.
#[derive(Debug)]
pub struct HostQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    per_device: usize,
    total: usize,
}

#[derive(Debug, Default)]
struct Inner {
    queues: HashMap<DeviceId, VecDeque<HostPacket>>,
    /// Devices with packets waiting, in the order they get their next turn.
    turns: VecDeque<DeviceId>,
    len: usize,
}

impl Default for HostQueue {
    fn default() -> Self {
        Self::new(PER_DEVICE, TOTAL)
    }
}

impl HostQueue {
    pub fn new(per_device: usize, total: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            per_device,
            total,
        }
    }

    /// Queues a packet from `from`; false (dropped) when `from` has its share waiting or
    /// the queue is full.
    #[must_use]
    pub fn push(&self, from: DeviceId, packet: HostPacket) -> bool {
        {
            let mut inner = self.inner.lock();
            if inner.len >= self.total {
                return false;
            }
            let queue = inner.queues.entry(from).or_default();
            if queue.len() >= self.per_device {
                return false;
            }
            queue.push_back(packet);
            if queue.len() == 1 {
                inner.turns.push_back(from);
            }
            inner.len += 1;
        }
        self.ready.notify_one();
        true
    }

    /// The next packet, from the device whose turn it is.
    #[must_use]
    pub fn try_pop(&self) -> Option<HostPacket> {
        let mut inner = self.inner.lock();
        let device = inner.turns.pop_front()?;
        let queue = inner.queues.get_mut(&device)?;
        let packet = queue.pop_front();
        if queue.is_empty() {
            inner.queues.remove(&device);
        } else {
            inner.turns.push_back(device);
        }
        if packet.is_some() {
            inner.len -= 1;
        }
        packet
    }

    /// Waits for the next packet.
    pub async fn pop(&self) -> HostPacket {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(p) = self.try_pop() {
                return p;
            }
            ready.await;
        }
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_device_gets_its_share_and_no_more() {
        let q = HostQueue::new(8, 64);
        let (flood, quiet) = (DeviceId::new_random(), DeviceId::new_random());
        let pushed = (0..1000u16)
            .filter(|i| q.push(flood, i.to_be_bytes().to_vec()))
            .count();
        assert_eq!(pushed, 8, "the flooding device kept more than its share");
        assert!(q.push(quiet, b"q1".to_vec()));
        assert!(q.push(quiet, b"q2".to_vec()));
        // Turns alternate: the quiet device's packets leave among the first.
        let first: Vec<_> = (0..4).filter_map(|_| q.try_pop()).collect();
        assert_eq!(
            first,
            vec![vec![0, 0], b"q1".to_vec(), vec![0, 1], b"q2".to_vec()]
        );
        let rest: Vec<_> = std::iter::from_fn(|| q.try_pop()).collect();
        assert_eq!(rest.len(), 6);
        assert!(q.is_empty());
        // Its share is free again.
        assert!(q.push(flood, vec![9]));
    }

    #[test]
    fn the_whole_queue_is_bounded_too() {
        let q = HostQueue::new(8, 20);
        let mut accepted = 0;
        for _ in 0..10 {
            let d = DeviceId::new_random();
            accepted += (0..8).filter(|_| q.push(d, vec![1])).count();
        }
        assert_eq!(accepted, 20);
        assert_eq!(q.len(), 20);
    }

    #[tokio::test]
    async fn pop_waits_for_a_packet() {
        let q = std::sync::Arc::new(HostQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        assert!(q.push(DeviceId::new_random(), vec![7]));
        assert_eq!(waiter.await.unwrap(), vec![7]);
    }
}
