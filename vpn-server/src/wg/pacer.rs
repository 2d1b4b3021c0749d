//! How fast the server calls devices back (after a restart, or when a cluster node takes a
//! dead node's devices over): as fast as the answers come back without queueing, measured,
//! rather than at a fixed rate.
//!
//! A call-back costs the server about one handshake (its initiation, then the response's
//! Diffie-Hellmans) and the device one. The pacer starts at a safe rate and, every step,
//! looks at the call-backs answered in it and their mean round trip (initiation sent to
//! response handled, both on the server, so the server's own queues count too). The lowest
//! step mean seen is the fleet's round trip without queueing; a step mean well above it
//! means something is queueing (the server's receive path, its CPU, the devices' side) and
//! the rate comes down, a step mean close to it lets the rate grow. Devices that connect by
//! themselves meanwhile come first: while an initiation queued now would wait, the rate
//! comes down too. Unanswered call-backs (devices that moved or are off) do not count:
//! only answers carry a round trip.

use std::time::Duration;

/// What one step saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Step {
    /// Call-backs answered in the step.
    pub answered: u64,
    /// Their round trips, summed.
    pub rtt_sum: Duration,
    /// Whether devices' own initiations are waiting for the handshake workers.
    pub devices_waiting: bool,
}

/// Round-trip growth over the fleet's base below which the rate grows.
const QUEUE_LOW: Duration = Duration::from_millis(50);
/// Round-trip growth over the base above which the rate comes down.
const QUEUE_HIGH: Duration = Duration::from_millis(250);
/// Answers a step needs before its mean round trip is trusted.
const MIN_ANSWERS: u64 = 8;
const GROW: f64 = 1.15;
const SHRINK: f64 = 0.7;

#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    min: f64,
    max: f64,
    /// The lowest step mean round trip seen.
    base: Option<Duration>,
}

impl Pacer {
    /// Starts at `start` per second, never below `min` nor above `max`.
    pub fn new(start: f64, min: f64, max: f64) -> Self {
        Self {
            rate: start.clamp(min, max),
            min,
            max,
            base: None,
        }
    }

    /// Call-backs per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes one step's feedback; returns the new rate.
    pub fn step(&mut self, s: Step) -> f64 {
        if s.devices_waiting {
            self.rate = (self.rate * SHRINK).max(self.min);
            return self.rate;
        }
        if s.answered < MIN_ANSWERS {
            return self.rate;
        }
        let mean = s.rtt_sum / u32::try_from(s.answered).unwrap_or(u32::MAX);
        let base = self.base.map_or(mean, |b| b.min(mean));
        self.base = Some(base);
        let queueing = mean.saturating_sub(base);
        if queueing <= QUEUE_LOW {
            self.rate = (self.rate * GROW).min(self.max);
        } else if queueing >= QUEUE_HIGH {
            self.rate = (self.rate * SHRINK).max(self.min);
        }
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(n: u64, rtt_ms: u64) -> Step {
        Step {
            answered: n,
            rtt_sum: Duration::from_millis(rtt_ms) * n as u32,
            devices_waiting: false,
        }
    }

    #[test]
    fn grows_while_answers_come_back_without_queueing_and_backs_off_when_they_queue() {
        let mut p = Pacer::new(2000.0, 1000.0, 50_000.0);
        // A fleet 300 ms away (cellular): its own round trip is not queueing.
        for _ in 0..5 {
            p.step(answered(200, 300));
        }
        assert!(p.rate() > 2000.0 * 1.9, "grew: {}", p.rate());
        let grown = p.rate();
        // Answers now take 400 ms more than the fleet's base: something queues.
        p.step(answered(200, 700));
        assert!((p.rate() - grown * SHRINK).abs() < 1e-6);
        // In between: held.
        let held = p.rate();
        p.step(answered(200, 450));
        assert_eq!(p.rate(), held);
        // Back to the base: grows again, up to the ceiling.
        for _ in 0..200 {
            p.step(answered(200, 300));
        }
        assert_eq!(p.rate(), 50_000.0);
    }

    #[test]
    fn holds_without_enough_answers_and_yields_to_devices_that_wait() {
        let mut p = Pacer::new(2000.0, 1000.0, 50_000.0);
        // Devices that do not answer (moved, off) give no round trip: nothing to act on.
        assert_eq!(p.step(answered(0, 0)), 2000.0);
        assert_eq!(p.step(answered(3, 5)), 2000.0);
        let waiting = Step {
            devices_waiting: true,
            ..answered(500, 1)
        };
        assert_eq!(p.step(waiting), 1400.0);
        assert_eq!(p.step(waiting), 1000.0, "never below the floor");
        assert_eq!(p.step(waiting), 1000.0);
    }
}
