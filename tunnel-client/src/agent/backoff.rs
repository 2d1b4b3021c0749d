//! Exponential backoff with full jitter: the n-th retry waits a uniformly random time in
//! `[0, min(cap, base * 2^n)]` (the "full jitter" of the AWS architecture blog), so a fleet
//! that lost its server together does not come back together. No clock and no RNG of its
//! own: the caller passes both.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
}

impl Backoff {
    /// The agent's defaults: 1 s base, 2 min cap.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(120);

    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
        }
    }

    /// The largest delay of retry number `attempt` (0-based): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay for retry number `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

/// `d` scaled by a uniformly random factor in `[1 - spread, 1 + spread]` (`spread` in 0..1).
pub fn jittered(d: Duration, spread: f64, rng: &mut impl Rng) -> Duration {
    let spread = spread.clamp(0.0, 1.0);
    let factor = rng.random_range((1.0 - spread)..=(1.0 + spread));
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        let ceilings: Vec<u64> = (0..10).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
        assert_eq!(b.ceiling(1000), Duration::from_secs(120));
    }

    #[test]
    fn delays_are_spread_over_the_whole_range_and_never_exceed_it() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..2000).map(|_| b.delay(20, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= b.cap));
        // Full jitter: each tenth of [0, cap] gets some of them.
        let mut deciles = [0u32; 10];
        for d in &delays {
            let i = ((d.as_secs_f64() / 120.0) * 10.0) as usize;
            deciles[i.min(9)] += 1;
        }
        assert!(deciles.iter().all(|&n| n > 120), "{deciles:?}");
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100), 0.25, &mut rng);
            assert!(d >= Duration::from_secs(75) && d <= Duration::from_secs(125));
        }
    }
}
