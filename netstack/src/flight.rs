//! How much unacknowledged data one connection may have: twice its measured bandwidth-delay
//! product, as BBR caps its flight, and never less than a floor that covers a fast local
//! path.
//!
//! smoltcp's congestion controllers only react to loss, and its loss recovery is slow (no
//! SACK, a 1 s minimum retransmission timeout). Given a 256 KiB buffer it sends a whole window
//! at once, which overflows the socket of a WireGuard device that decrypts slower than we send
//! (measured: `UdpRcvbufErrors` on a wireguard-go device, and a third of its throughput). The
//! driver controls how much it moves into each socket's send buffer, and smoltcp can only send
//! what is in that buffer, so limiting the buffer limits the flight without touching smoltcp.
//!
//! The estimate comes from the byte counts alone: the driver knows how much it wrote and how
//! much is still queued (written minus queued is acknowledged). A few writes are marked with
//! their time (only writes into an almost empty socket, which leave at once); when a mark is
//! acknowledged it yields a round-trip sample. The delivery rate is what was acknowledged over
//! intervals of at least a round trip and at least 10 ms: ACKs come in bursts (a device's
//! WireGuard decrypts in batches), and a rate taken over one burst was measured at six to nine
//! times the real one. The cap is `2 × max rate × min RTT`: while the cap is what limits the
//! connection and no queue has built, each round trip delivers the whole cap, so the cap
//! doubles every round trip; once a bottleneck is full the rate stops growing and the cap
//! settles at twice the path's BDP.
//!
//! A queue that stands for good would creep into the minimum RTT and raise the cap with it. As
//! BBR does, a connection whose minimum RTT is 10 s old drains for a moment (a few segments in
//! flight for 200 ms or a round trip, whichever is longer) to measure it afresh.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How long a minimum RTT is trusted before the connection drains to measure it again.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long a drain to measure the RTT lasts at least.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// Segments in flight while draining.
const PROBE_RTT_SEGMENTS: usize = 4;
/// Delivery-rate samples span at least this long (and at least the minimum RTT).
const RATE_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// The delivery-rate maximum covers this many minimum RTTs ...
const RATE_WINDOW_RTTS: u32 = 10;
/// ... but at least this long, and at most `MIN_RTT_WINDOW`.
const RATE_WINDOW_MIN: Duration = Duration::from_millis(100);
/// Marks outstanding at once; more writes go unmarked.
const MAX_MARKS: usize = 16;
/// Marks are at least this fraction of the cap apart.
const MARKS_PER_CAP: usize = 8;

/// The flight cap of one connection. Feed it every change: [`Flight::acked`] before looking at
/// [`Flight::room`], [`Flight::wrote`] after moving bytes into the socket.
#[derive(Debug)]
pub(crate) struct Flight {
    /// The cap never goes below this (bytes).
    floor: usize,
    /// ... nor above this (the socket's send buffer).
    ceiling: usize,
    /// One segment (bytes).
    mss: usize,
    /// Bytes moved into the socket so far.
    written: u64,
    /// Bytes the peer acknowledged so far.
    acked: u64,
    marks: VecDeque<Mark>,
    min_rtt: Option<Stamped<Duration>>,
    max_rate: MaxFilter,
    /// Where the current delivery-rate interval began: (when, `acked` then).
    rate_from: Option<(Instant, u64)>,
    probe: Probe,
}

/// Draining to measure the minimum RTT afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Off,
    /// Waiting for the flight to shrink to the probe's cap.
    Draining,
    /// Holding the flight small until then.
    Holding(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Acknowledging this offset acknowledges the mark.
    end: u64,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Stamped<T> {
    value: T,
    at: Instant,
}

impl Flight {
    pub(crate) fn new(floor: usize, ceiling: usize, mss: usize) -> Self {
        let mss = mss.max(1);
        let ceiling = ceiling.max(mss);
        Self {
            floor: floor.clamp(mss, ceiling),
            ceiling,
            mss,
            written: 0,
            acked: 0,
            marks: VecDeque::with_capacity(MAX_MARKS),
            min_rtt: None,
            max_rate: MaxFilter::default(),
            rate_from: None,
            probe: Probe::Off,
        }
    }

    /// The most the socket's send buffer (unacknowledged plus unsent) may hold now.
    pub(crate) fn cap(&self) -> usize {
        if self.probe != Probe::Off {
            return self.probe_cap();
        }
        let bdp = match (self.min_rtt, self.max_rate.best()) {
            (Some(rtt), Some(rate)) => {
                rate.saturating_mul(rtt.value.as_micros() as u64) / 1_000_000
            }
            _ => 0,
        };
        usize::try_from(bdp.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .clamp(self.floor, self.ceiling)
    }

    fn probe_cap(&self) -> usize {
        (PROBE_RTT_SEGMENTS * self.mss).min(self.floor)
    }

    /// How many more bytes may go into a socket whose send queue holds `queued`.
    pub(crate) fn room(&self, queued: usize) -> usize {
        self.cap().saturating_sub(queued)
    }

    /// The socket's send queue holds `queued` bytes at `now`: whatever left it was acknowledged.
    pub(crate) fn acked(&mut self, queued: usize, now: Instant) {
        let acked = self.written.saturating_sub(queued as u64);
        if acked <= self.acked {
            self.check_probe(queued, now);
            return;
        }
        self.acked = acked;
        while let Some(mark) = self.marks.front().copied() {
            if mark.end > acked {
                break;
            }
            self.marks.pop_front();
            self.round_trip(now.saturating_duration_since(mark.at), now);
        }
        self.rate_sample(now);
        self.check_probe(queued, now);
    }

    /// `n` bytes were moved at `now` into a socket whose send queue held `queued` bytes.
    pub(crate) fn wrote(&mut self, n: usize, queued: usize, now: Instant) {
        if n == 0 {
            return;
        }
        let start = self.written;
        self.written += n as u64;
        // Only a byte that leaves at once times the round trip; one that waits in the socket
        // for smoltcp's congestion window would add that wait to the sample, and a minimum RTT
        // inflated so raises the cap, which lengthens the queue it measured (seen: 75 ms
        // measured on a 50 ms path, and 3 BDPs in flight). smoltcp's window is at least two
        // segments outside loss recovery, and at least the probe's few segments when it has
        // just been carrying more.
        let first = n.min(self.mss);
        let leaves_at_once = match self.probe {
            Probe::Holding(_) => self.probe_cap(),
            _ => 2 * self.mss,
        };
        if queued + first > leaves_at_once {
            return;
        }
        let end = start + first as u64;
        let spacing = (self.cap() / MARKS_PER_CAP).max(self.mss) as u64;
        let due = self
            .marks
            .back()
            .is_none_or(|last| end >= last.end + spacing);
        if due && self.marks.len() < MAX_MARKS {
            self.marks.push_back(Mark { end, at: now });
        }
    }

    /// A round-trip sample: from an acknowledged mark, or measured elsewhere (the
    /// connection's handshake).
    pub(crate) fn round_trip(&mut self, rtt: Duration, now: Instant) {
        if rtt.is_zero() {
            return;
        }
        let expired = self
            .min_rtt
            .is_none_or(|m| now.saturating_duration_since(m.at) >= MIN_RTT_WINDOW);
        if expired || self.min_rtt.is_some_and(|m| rtt <= m.value) {
            self.min_rtt = Some(Stamped {
                value: rtt,
                at: now,
            });
        }
    }

    /// New data was acknowledged at `now`: closes the rate interval if it is long enough.
    fn rate_sample(&mut self, now: Instant) {
        let Some((from, acked_then)) = self.rate_from else {
            self.rate_from = Some((now, self.acked));
            return;
        };
        let min_rtt = self.min_rtt.map_or(Duration::ZERO, |m| m.value);
        let elapsed = now.saturating_duration_since(from);
        if elapsed < RATE_INTERVAL_MIN.max(min_rtt) {
            return;
        }
        self.rate_from = Some((now, self.acked));
        let delivered = u128::from(self.acked - acked_then);
        let rate =
            u64::try_from(delivered * 1_000_000 / elapsed.as_micros().max(1)).unwrap_or(u64::MAX);
        let window = (min_rtt * RATE_WINDOW_RTTS).clamp(RATE_WINDOW_MIN, MIN_RTT_WINDOW);
        self.max_rate.update(rate, now, window);
    }

    /// Starts, advances or ends a drain to measure the RTT. A connection with nothing in flight
    /// has no queue to drain: its next sample, taken on an expired minimum, replaces it anyway.
    ///
    /// The minimum stays expired until a sample replaces it. The first one may still carry the
    /// old queue; those taken while drained are smaller and replace it in turn.
    fn check_probe(&mut self, queued: usize, now: Instant) {
        let Some(min) = self.min_rtt else {
            return;
        };
        if self.probe == Probe::Off
            && queued > 0
            && now.saturating_duration_since(min.at) >= MIN_RTT_WINDOW
        {
            self.probe = Probe::Draining;
        }
        if self.probe == Probe::Draining && queued <= self.probe_cap() {
            self.probe = Probe::Holding(now + min.value.max(PROBE_RTT_TIME));
        }
        if let Probe::Holding(until) = self.probe {
            if now >= until {
                self.probe = Probe::Off;
            }
        }
    }

    #[cfg(test)]
    fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|m| m.value)
    }
}

/// A running maximum over a time window: the best, second-best and third-best samples of
/// successive sub-windows (Kathleen Nichols' algorithm, as in Linux's `lib/minmax.c`), so the
/// maximum decays to a recent value when the best sample ages out instead of dropping to zero.
#[derive(Debug, Default)]
struct MaxFilter {
    s: [Option<Stamped<u64>>; 3],
}

impl MaxFilter {
    fn best(&self) -> Option<u64> {
        self.s[0].map(|s| s.value)
    }

    fn update(&mut self, value: u64, now: Instant, window: Duration) {
        let sample = Stamped { value, at: now };
        let reset = match self.s[0] {
            None => true,
            Some(best) => value >= best.value || now.saturating_duration_since(best.at) > window,
        };
        if reset {
            self.s = [Some(sample); 3];
            return;
        }
        if self.s[1].is_none_or(|s| value >= s.value) {
            self.s[1] = Some(sample);
            self.s[2] = Some(sample);
        } else if self.s[2].is_none_or(|s| value >= s.value) {
            self.s[2] = Some(sample);
        }
        self.subwin_update(sample, window);
    }

    fn subwin_update(&mut self, sample: Stamped<u64>, window: Duration) {
        let (Some(best), Some(second), Some(third)) = (self.s[0], self.s[1], self.s[2]) else {
            return;
        };
        let age = sample.at.saturating_duration_since(best.at);
        if age > window {
            // The best is out of the window: the second and third move up.
            self.s = [Some(second), Some(third), Some(sample)];
            if let (Some(b), Some(s)) = (self.s[0], self.s[1]) {
                if sample.at.saturating_duration_since(b.at) > window {
                    self.s = [Some(s), Some(sample), Some(sample)];
                }
            }
        } else if second.at == best.at && age > window / 4 {
            // A quarter of the window passed without a second choice: take one.
            self.s[1] = Some(sample);
            self.s[2] = Some(sample);
        } else if third.at == second.at && age > window / 2 {
            self.s[2] = Some(sample);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1380;
    const FLOOR: usize = 64 * 1024;
    const CEILING: usize = 1 << 20;

    /// A path with a bottleneck of `rate` bytes/s, a fixed round trip `rtt` and a queue in front
    /// of the bottleneck, behind a sender's socket that, like smoltcp's in slow start, sends
    /// at most `cwnd` unacknowledged bytes and grows `cwnd` by what is acknowledged.
    struct Path {
        rate: u64,
        /// Written into the socket, not sent yet.
        unsent: u64,
        cwnd: u64,
        rtt: Duration,
        /// (bytes, when they leave the bottleneck) in order.
        queue: VecDeque<(u64, Instant)>,
        /// Acknowledgements on their way back: (acked total, when they arrive).
        acks: VecDeque<(u64, Instant)>,
        sent: u64,
        delivered: u64,
        bottleneck_free: Instant,
        start: Instant,
        /// ACKs reach the sender in bursts, this far apart.
        ack_period: Option<Duration>,
    }

    impl Path {
        fn new(rate: u64, rtt: Duration, start: Instant) -> Self {
            Self {
                rate,
                unsent: 0,
                cwnd: 2 * MSS as u64,
                rtt,
                queue: VecDeque::new(),
                acks: VecDeque::new(),
                sent: 0,
                delivered: 0,
                bottleneck_free: start,
                start,
                ack_period: None,
            }
        }

        /// The application writes `bytes` into the socket.
        fn write(&mut self, bytes: u64, acked: u64, now: Instant) {
            self.unsent += bytes;
            self.release(acked, now);
        }

        /// The socket sends what its window allows.
        fn release(&mut self, acked: u64, now: Instant) {
            while self.unsent > 0 && self.sent - acked < self.cwnd {
                let n = self.unsent.min(MSS as u64);
                self.unsent -= n;
                self.send(n, now);
            }
        }

        /// What the socket holds: sent and unacknowledged, or not sent yet.
        fn queued(&self, acked: u64) -> usize {
            (self.sent + self.unsent - acked) as usize
        }

        fn send(&mut self, bytes: u64, now: Instant) {
            let start = self.bottleneck_free.max(now);
            let done = start + Duration::from_nanos(bytes * 1_000_000_000 / self.rate);
            self.bottleneck_free = done;
            self.sent += bytes;
            self.queue.push_back((self.sent, done));
        }

        /// Moves time to `now`; returns the acknowledged total known to the sender.
        fn advance(&mut self, now: Instant, acked: &mut u64) -> u64 {
            while let Some(&(end, done)) = self.queue.front() {
                if done > now {
                    break;
                }
                self.queue.pop_front();
                self.delivered = end;
                let mut at = done + self.rtt;
                if let Some(period) = self.ack_period {
                    let since = at.saturating_duration_since(self.start).as_nanos();
                    let p = period.as_nanos();
                    let next = since.div_ceil(p) * p;
                    at = self.start + Duration::from_nanos(next as u64);
                }
                self.acks.push_back((end, at));
            }
            while let Some(&(end, at)) = self.acks.front() {
                if at > now {
                    break;
                }
                self.acks.pop_front();
                self.cwnd += end - *acked;
                *acked = end;
            }
            self.release(*acked, now);
            // Bytes waiting in front of the bottleneck (or on it).
            self.sent - self.delivered
        }
    }

    /// Runs a bulk transfer for `duration`; returns (flight, bytes delivered, max queue).
    fn bulk(rate: u64, rtt: Duration, duration: Duration) -> (Flight, u64, u64) {
        bulk_on(Path::new(rate, rtt, Instant::now()), duration)
    }

    fn bulk_on(mut path: Path, duration: Duration) -> (Flight, u64, u64) {
        let start = path.start;
        let mut flight = Flight::new(FLOOR, CEILING, MSS);
        let tick = Duration::from_micros(200);
        let mut now = start;
        let mut acked = 0u64;
        let mut max_queue = 0;
        while now < start + duration {
            let queue = step(&mut path, &mut flight, &mut acked, now);
            if now > start + Duration::from_secs(2) {
                max_queue = max_queue.max(queue);
            }
            now += tick;
        }
        (flight, path.delivered, max_queue)
    }

    /// One turn of a sender that always has data and writes all the room it is given, as the
    /// driver does. Returns the bottleneck's queue.
    fn step(path: &mut Path, flight: &mut Flight, acked: &mut u64, now: Instant) -> u64 {
        let queue = path.advance(now, acked);
        let queued = path.queued(*acked);
        flight.acked(queued, now);
        let room = flight.room(queued);
        if room > 0 {
            path.write(room as u64, *acked, now);
            flight.wrote(room, queued, now);
        }
        queue
    }

    #[test]
    fn a_fast_near_path_stays_at_the_floor() {
        // 1 Gbit/s, 300 µs: the BDP is 37 KB, twice that is just above the floor.
        let (flight, _, _) = bulk(
            125_000_000,
            Duration::from_micros(300),
            Duration::from_secs(3),
        );
        let cap = flight.cap();
        assert!((FLOOR..=2 * FLOOR).contains(&cap), "cap {cap}");
    }

    #[test]
    fn acks_in_bursts_do_not_pass_for_a_faster_path() {
        // 200 Mbit/s, 200 µs, the ACKs arriving once a millisecond (as from a device that
        // decrypts in batches): a rate taken over one burst of ACKs is several times the real
        // one, and twice that times the RTT would be well above the floor.
        let mut path = Path::new(25_000_000, Duration::from_micros(200), Instant::now());
        path.ack_period = Some(Duration::from_millis(1));
        let (flight, _, _) = bulk_on(path, Duration::from_secs(3));
        let rate = flight.max_rate.best().unwrap();
        assert!(rate <= 30_000_000, "rate {rate} B/s on a 25 MB/s path");
        assert_eq!(flight.cap(), FLOOR);
    }

    #[test]
    fn a_far_path_grows_to_twice_its_bdp_and_fills_the_bottleneck() {
        // 20 Mbit/s, 100 ms: the BDP is 250 KB, far above the floor. At the floor alone the
        // connection would reach 64 KiB per 100 ms, about a quarter of the link.
        let rate = 2_500_000;
        let rtt = Duration::from_millis(100);
        let (flight, delivered, max_queue) = bulk(rate, rtt, Duration::from_secs(8));
        let bdp: usize = 250_000;
        let cap = flight.cap();
        assert!(
            cap >= 3 * bdp / 2 && cap <= 5 * bdp / 2,
            "cap {cap}, bdp {bdp}"
        );
        // After the first seconds of growth the link is busy.
        assert!(
            delivered >= rate * 6,
            "delivered {delivered} in 8 s at {rate} B/s"
        );
        // The standing queue stays around one BDP, not the whole buffer.
        assert!(max_queue <= 3 * bdp as u64 / 2, "queue {max_queue}");
        let min_rtt = flight.min_rtt().unwrap();
        assert!(
            min_rtt >= rtt && min_rtt < rtt * 3 / 2,
            "min rtt {min_rtt:?}"
        );
    }

    #[test]
    fn a_slow_path_keeps_the_queue_near_the_floor() {
        // 1 Mbit/s, 50 ms: the BDP is 6 KB. The floor is allowed to stand in the queue, no
        // more, over several 10 s RTT windows (the drains keep the minimum RTT honest).
        let (flight, _, max_queue) =
            bulk(125_000, Duration::from_millis(50), Duration::from_secs(35));
        assert!(flight.cap() <= 2 * FLOOR, "cap {}", flight.cap());
        assert!(
            max_queue <= FLOOR as u64 + 8 * MSS as u64,
            "queue {max_queue}"
        );
    }

    #[test]
    fn a_stale_minimum_rtt_drains_the_connection_then_takes_the_new_path() {
        // The device roams from a 10 ms path to a 200 ms one (both 20 Mbit/s).
        let start = Instant::now();
        let mut flight = Flight::new(FLOOR, CEILING, MSS);
        let mut now = start;
        let mut acked = 0u64;
        let mut path = Path::new(2_500_000, Duration::from_millis(10), start);
        let tick = Duration::from_micros(500);
        let mut probed = false;
        while now < start + Duration::from_secs(30) {
            if now >= start + Duration::from_secs(5) && path.rtt == Duration::from_millis(10) {
                path.rtt = Duration::from_millis(200);
            }
            step(&mut path, &mut flight, &mut acked, now);
            if flight.cap() < FLOOR {
                probed = true;
            }
            now += tick;
        }
        assert!(probed, "the connection never drained to measure its RTT");
        let min_rtt = flight.min_rtt().unwrap();
        assert!(
            min_rtt >= Duration::from_millis(200) && min_rtt < Duration::from_millis(300),
            "min rtt {min_rtt:?}"
        );
        // 20 Mbit/s × 200 ms = 500 KB; the cap follows the new path.
        assert!(flight.cap() >= 750_000, "cap {}", flight.cap());
    }

    #[test]
    fn without_samples_the_cap_is_the_floor_and_room_never_underflows() {
        let now = Instant::now();
        let mut flight = Flight::new(FLOOR, CEILING, MSS);
        assert_eq!(flight.cap(), FLOOR);
        assert_eq!(flight.room(0), FLOOR);
        assert_eq!(flight.room(10 * FLOOR), 0);
        // A queue larger than what was written (the socket held data before) is harmless.
        flight.acked(10 * FLOOR, now);
        flight.wrote(100, 0, now);
        flight.acked(0, now + Duration::from_millis(1));
        assert_eq!(flight.cap(), FLOOR);
    }

    #[test]
    fn the_floor_and_ceiling_are_kept_in_order() {
        let flight = Flight::new(1 << 20, 4096, MSS);
        assert_eq!(flight.cap(), 4096);
        let flight = Flight::new(0, 4096, MSS);
        assert_eq!(flight.cap(), MSS);
    }

    #[test]
    fn the_max_filter_forgets_an_old_peak() {
        let start = Instant::now();
        let window = Duration::from_millis(100);
        let mut f = MaxFilter::default();
        f.update(1000, start, window);
        for i in 1..=30u32 {
            f.update(10, start + Duration::from_millis(10) * i, window);
        }
        assert_eq!(f.best(), Some(10));
        f.update(50, start + Duration::from_millis(310), window);
        assert_eq!(f.best(), Some(50));
    }
}
