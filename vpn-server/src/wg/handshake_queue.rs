//! The bounded queue between the UDP receive path and the handshake workers. Receive
//! loops stay cheap (they only admit initiations through MAC1 and the rate limiter, and
//! handle data inline), so data is never stuck behind handshakes and the sockets are
//! drained before the kernel drops anything; the expensive part of a handshake (the
//! Diffie-Hellmans) runs on worker threads. When the queue is full, new initiations are
//! dropped rather than the queue growing; entries that waited longer than a device waits
//! before retrying are dropped too, so a storm is never answered with stale work.
//!
//! The queue also measures how fast its workers answer (wall time per handshake, as they
//! report it), so that "under load" can be decided by whether what is queued drains in time
//! ([`HandshakeQueue::backlogged`]).

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
    /// Workers popping from the queue.
    workers: u64,
    pace: Mutex<Pace>,
}

/// Handshakes a worker's pace is averaged over. A worker's wall time per handshake has a
/// heavy tail: in a 50,000-device storm sharing 2 cores with its load generator, 85% of the
/// handshakes took under 0.2 ms and 2.5% took 3 to 25 ms (the worker was preempted in the
/// middle). The mean is the pace the queue drains at, but over the last 16 handshakes (as
/// before) one preempted handshake could quadruple it, and with a long queue that was
/// enough to call the server backlogged and send devices through a 5 s cookie round with the
/// workers keeping up (one run in two). Over 512 handshakes (about 0.1 s of a storm) the
/// tail averages out, and a lasting change of pace still shows within a fraction of a second.
const PACE_WINDOW: u32 = 512;

/// A running mean of a worker's wall time per handshake: the plain mean of the samples
/// until there are [`PACE_WINDOW`], then a moving average with weight 1/[`PACE_WINDOW`] (so
/// the first samples count no more than later ones).
#[derive(Debug, Default)]
struct Pace {
    mean_ns: f64,
    samples: u32,
}

impl HandshakeQueue {
    pub fn new(capacity: usize, workers: usize) -> Self {
        Self {
            inner: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            workers: workers.max(1) as u64,
            pace: Mutex::new(Pace::default()),
        }
    }

    /// A worker took `took` (wall time, waits for the CPU included) to answer one
    /// initiation.
    pub fn record_service(&self, took: Duration) {
        let mut pace = self.pace.lock();
        pace.samples = (pace.samples + 1).min(PACE_WINDOW);
        let n = f64::from(pace.samples);
        pace.mean_ns += (took.as_nanos() as f64 - pace.mean_ns) / n;
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

    /// Whether an initiation queued now would wait `limit` or longer: the queue's length
    /// at the workers' measured pace, or, before there is a pace or if the workers stall,
    /// its oldest entry having waited that long already.
    pub fn backlogged(&self, now: Instant, limit: Duration) -> bool {
        let q = self.inner.lock();
        let Some(head) = q.front() else {
            return false;
        };
        now.saturating_duration_since(head.at) >= limit
            || self.drain_time(q.len()).is_some_and(|d| d >= limit)
    }

    /// How long an initiation queued now would wait at the measured pace (`None` before
    /// there is one).
    pub fn expected_wait(&self) -> Option<Duration> {
        self.drain_time(self.len())
    }

    fn drain_time(&self, len: usize) -> Option<Duration> {
        let pace = self.pace.lock();
        (pace.samples > 0).then(|| {
            let secs = pace.mean_ns * 1e-9 * len as f64 / self.workers as f64;
            Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
        })
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

    fn initiator() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    /// Queues `n` initiations received at `at`, each of which must fit.
    fn fill(q: &HandshakeQueue, n: usize, at: Instant) {
        for _ in 0..n {
            assert!(q.push(initiator(), &[1u8; INITIATION_LEN], at));
        }
    }

    #[test]
    fn bounded_fifo_that_drops_when_full() {
        let q = HandshakeQueue::new(2, 1);
        let from = initiator();
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
        let q = HandshakeQueue::new(4, 1);
        let t0 = Instant::now();
        let age = Duration::from_secs(1);
        assert!(
            !q.backlogged(t0 + age * 10, age),
            "an empty queue has no backlog"
        );
        fill(&q, 1, t0);
        fill(&q, 1, t0 + age);
        assert!(!q.backlogged(t0 + age / 2, age));
        assert!(q.backlogged(t0 + age, age));
        q.pop(Duration::ZERO);
        assert!(
            !q.backlogged(t0 + age, age),
            "without a measured pace, only the head's age counts"
        );
        assert!(q.backlogged(t0 + age * 2, age));
    }

    #[test]
    fn backlogged_when_the_queue_would_not_drain_in_time_at_the_measured_pace() {
        // Two workers at 1 ms a handshake: 2,000 a second.
        let q = HandshakeQueue::new(10_000, 2);
        let t0 = Instant::now();
        let limit = Duration::from_secs(1);
        q.record_service(Duration::from_millis(1));
        assert_eq!(q.expected_wait(), Some(Duration::ZERO));
        fill(&q, 1999, t0);
        assert!(
            !q.backlogged(t0, limit),
            "1,999 fresh entries drain in under a second"
        );
        fill(&q, 1, t0);
        assert_eq!(q.expected_wait(), Some(limit));
        assert!(
            q.backlogged(t0, limit),
            "2,000 take a second, though none has waited yet"
        );
        // Faster workers: the same queue drains in time again.
        for _ in 0..64 {
            q.record_service(Duration::from_micros(200));
        }
        assert!(!q.backlogged(t0, limit));
        // And a head that waited the whole limit means the workers stalled.
        assert!(q.backlogged(t0 + limit, limit));
    }

    #[test]
    fn a_preempted_handshake_does_not_make_a_backlog_but_a_slower_pace_does() {
        // Two workers at 200 us a handshake; 7,000 queued drain in 0.7 s.
        let q = HandshakeQueue::new(10_000, 2);
        let t0 = Instant::now();
        let limit = Duration::from_secs(1);
        for _ in 0..2 * PACE_WINDOW {
            q.record_service(Duration::from_micros(200));
        }
        fill(&q, 7000, t0);
        let wait = |q: &HandshakeQueue| q.expected_wait().unwrap().as_secs_f64();
        assert!((wait(&q) - 0.7).abs() < 1e-6, "{}", wait(&q));
        // A handshake whose worker was preempted for 20 ms moves the estimate by a fifth,
        // not (as the 16-sample average did) to 5 s.
        q.record_service(Duration::from_millis(20));
        assert!(wait(&q) < 0.85, "{}", wait(&q));
        assert!(!q.backlogged(t0, limit));
        // A lasting change of pace (the workers at half speed) shows after a few hundred
        // handshakes.
        for _ in 0..PACE_WINDOW {
            q.record_service(Duration::from_micros(400));
        }
        assert!(wait(&q) > 1.0, "{}", wait(&q));
        assert!(q.backlogged(t0, limit));
    }

    #[test]
    fn the_first_samples_count_alike() {
        let q = HandshakeQueue::new(10, 1);
        q.record_service(Duration::from_millis(30));
        q.record_service(Duration::from_millis(10));
        q.record_service(Duration::from_millis(20));
        fill(&q, 1, Instant::now());
        let wait = q.expected_wait().unwrap().as_secs_f64();
        assert!((wait - 0.020).abs() < 1e-9, "{wait}");
    }
}
