//! The bounded queue between the UDP receive path and the handshake workers. Receive
//! loops stay cheap (they only admit initiations through MAC1 and the rate limiter, and
//! handle data inline), so data is never stuck behind handshakes and the sockets are
//! drained before the kernel drops anything; the expensive part of a handshake (the
//! Diffie-Hellmans) runs on worker threads. When the queue is full, new initiations are
//! dropped rather than the queue growing; entries that waited longer than a device waits
//! before retrying are dropped too, so a storm is never answered with stale work.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub use floto_proto::wireguard::INITIATION_LEN;

/// An initiation waiting for a worker.
#[derive(Debug, Clone)]
pub struct QueuedInitiation {
    pub from: SocketAddr,
    /// When it was received.
    pub at: Instant,
    pub datagram: [u8; INITIATION_LEN],
}

/// A bounded multi-producer, multi-consumer FIFO of initiations.
#[derive(Debug)]
pub struct HandshakeQueue {
    inner: Mutex<VecDeque<QueuedInitiation>>,
    ready: Condvar,
    capacity: usize,
}

impl HandshakeQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues an initiation; `false` (and nothing queued) if the queue is full or the
    /// datagram is not initiation-sized.
    pub fn push(&self, from: SocketAddr, datagram: &[u8], at: Instant) -> bool {
        let Ok(datagram) = <[u8; INITIATION_LEN]>::try_from(datagram) else {
            return false;
        };
        let mut q = self.inner.lock();
        if q.len() >= self.capacity {
            return false;
        }
        q.push_back(QueuedInitiation { from, at, datagram });
        drop(q);
        self.ready.notify_one();
        true
    }

    /// The oldest queued initiation, waiting up to `timeout` for one.
    pub fn pop(&self, timeout: Duration) -> Option<QueuedInitiation> {
        let mut q = self.inner.lock();
        if q.is_empty() {
            self.ready.wait_for(&mut q, timeout);
        }
        q.pop_front()
    }

    /// Whether the oldest queued initiation arrived `age` or more before `now`.
    pub fn backlogged(&self, now: Instant, age: Duration) -> bool {
        self.inner
            .lock()
            .front()
            .is_some_and(|head| now.saturating_duration_since(head.at) >= age)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every waiting worker (at shutdown).
    pub fn wake_all(&self) {
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo_that_drops_when_full() {
        let q = HandshakeQueue::new(2);
        let from = SocketAddr::from(([127, 0, 0, 1], 1));
        let now = Instant::now();
        let mut a = [0u8; INITIATION_LEN];
        a[0] = 1;
        let mut b = a;
        b[1] = 2;
        assert!(q.push(from, &a, now));
        assert!(q.push(from, &b, now));
        assert!(!q.push(from, &a, now), "a full queue must not grow");
        assert!(!q.push(from, &a[..100], now), "only initiations are queued");
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(Duration::ZERO).map(|i| i.datagram), Some(a));
        assert_eq!(q.pop(Duration::ZERO).map(|i| i.datagram), Some(b));
        assert!(q.pop(Duration::from_millis(1)).is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn backlogged_when_the_oldest_entry_waited_long_enough() {
        let q = HandshakeQueue::new(4);
        let from = SocketAddr::from(([127, 0, 0, 1], 1));
        let t0 = Instant::now();
        let age = Duration::from_secs(1);
        assert!(
            !q.backlogged(t0 + age * 10, age),
            "an empty queue has no backlog"
        );
        let mut a = [0u8; INITIATION_LEN];
        a[0] = 1;
        assert!(q.push(from, &a, t0));
        assert!(q.push(from, &a, t0 + age));
        assert!(!q.backlogged(t0 + age / 2, age));
        assert!(q.backlogged(t0 + age, age));
        q.pop(Duration::ZERO);
        assert!(!q.backlogged(t0 + age, age), "only the head's age counts");
        assert!(q.backlogged(t0 + age * 2, age));
    }
}
