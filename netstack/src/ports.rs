//! Ephemeral port allocation for outgoing connections.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// A port freed less than this long ago is not reused while others are free: the peer may
/// still hold the old connection in TIME-WAIT (Linux: 60 s).
const COOLDOWN: Duration = Duration::from_secs(60);
/// At most this many ports cool down at once, so that plenty stay available.
const MAX_COOLING: usize = 8192;
/// Random picks before falling back to a scan.
const RANDOM_TRIES: usize = 32;

#[derive(Default)]
pub(crate) struct EphemeralPorts {
    in_use: HashSet<u16>,
    cooling: HashSet<u16>,
    freed: VecDeque<(u16, Instant)>,
}

impl EphemeralPorts {
    /// A free port, random in the ephemeral range, not in use, not cooling down (unless only
    /// cooling ones are left) and not rejected by `taken` (listening ports).
    pub(crate) fn allocate(&mut self, now: Instant, taken: impl Fn(u16) -> bool) -> Option<u16> {
        while let Some(&(port, at)) = self.freed.front() {
            if now.saturating_duration_since(at) < COOLDOWN && self.freed.len() <= MAX_COOLING {
                break;
            }
            self.freed.pop_front();
            self.cooling.remove(&port);
        }
        let free = |p: &u16| !self.in_use.contains(p) && !taken(*p);
        let mut pick = None;
        for _ in 0..RANDOM_TRIES {
            let p = rand::random_range(EPHEMERAL);
            if free(&p) && !self.cooling.contains(&p) {
                pick = Some(p);
                break;
            }
        }
        if pick.is_none() {
            let start = rand::random_range(EPHEMERAL);
            let scan = || (start..=*EPHEMERAL.end()).chain(*EPHEMERAL.start()..start);
            pick = scan()
                .find(|p| free(p) && !self.cooling.contains(p))
                .or_else(|| scan().find(free));
        }
        let port = pick?;
        self.in_use.insert(port);
        Some(port)
    }

    pub(crate) fn release(&mut self, port: u16, now: Instant) {
        if self.in_use.remove(&port) && self.cooling.insert(port) {
            self.freed.push_back((port, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique_and_in_range() {
        let now = Instant::now();
        let mut ports = EphemeralPorts::default();
        let mut seen = HashSet::new();
        for _ in 0..EPHEMERAL.len() {
            let p = ports.allocate(now, |_| false).unwrap();
            assert!(EPHEMERAL.contains(&p));
            assert!(seen.insert(p), "port {p} handed out twice");
        }
        assert_eq!(ports.allocate(now, |_| false), None, "range exhausted");
        ports.release(50000, now);
        assert_eq!(ports.allocate(now, |_| false), Some(50000));
    }

    #[test]
    fn listening_ports_are_skipped() {
        let now = Instant::now();
        let mut ports = EphemeralPorts::default();
        for _ in 0..1000 {
            let p = ports.allocate(now, |p| p % 2 == 0).unwrap();
            assert_eq!(p % 2, 1);
        }
    }

    #[test]
    fn recently_freed_ports_cool_down() {
        let now = Instant::now();
        let mut ports = EphemeralPorts::default();
        let all: Vec<u16> = EPHEMERAL
            .map(|_| ports.allocate(now, |_| false).unwrap())
            .collect();
        // Free two ports; the older one has cooled down by `later`.
        ports.release(all[0], now);
        let later = now + COOLDOWN;
        ports.release(all[1], later);
        assert_eq!(ports.allocate(later, |_| false), Some(all[0]));
        // Only a cooling port is left: it is used rather than failing.
        assert_eq!(ports.allocate(later, |_| false), Some(all[1]));
    }
}
