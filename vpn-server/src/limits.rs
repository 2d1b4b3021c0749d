//! Caps on how many of something one key may hold at once (broker sessions per operator and
//! per device, API connections per source address: [`PerKeyCap`]) and how often one key may
//! do something (enrollments per provisioning key: [`PerKeyRate`]). Time is an input.

use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// At most `cap` places per key.
#[derive(Debug)]
pub struct PerKeyCap<K: Hash + Eq> {
    counts: DashMap<K, usize>,
    cap: usize,
}

/// A place held under a [`PerKeyCap`]; given back on drop.
#[derive(Debug)]
pub struct Place<K: Hash + Eq + Clone> {
    caps: Arc<PerKeyCap<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> PerKeyCap<K> {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: DashMap::new(),
            cap,
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A place under `key`, or `None` when `key` holds all of them.
    pub fn take(self: &Arc<Self>, key: K) -> Option<Place<K>> {
        let mut n = self.counts.entry(key.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        drop(n);
        Some(Place {
            caps: self.clone(),
            key,
        })
    }

    /// Places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.counts.get(key).map_or(0, |n| *n)
    }
}

impl<K: Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        if let Some(mut n) = self.caps.counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
        self.caps.counts.remove_if(&self.key, |_, n| *n == 0);
    }
}

/// At most `per_second` a second per key, with bursts of up to ten seconds' worth (a token
/// bucket per key).
#[derive(Debug)]
pub struct PerKeyRate<K: Hash + Eq> {
    buckets: DashMap<K, (f64, Instant)>,
    per_second: f64,
    burst: f64,
}

impl<K: Hash + Eq> PerKeyRate<K> {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            buckets: DashMap::new(),
            per_second,
            burst: per_second * 10.0,
        }
    }

    /// Takes one go for `key` at `now`, or says how long until the next one.
    pub fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.buckets.entry(key).or_insert((self.burst, now));
        let (tokens, at) = *bucket;
        let refilled = (tokens + now.saturating_duration_since(at).as_secs_f64() * self.per_second)
            .min(self.burst);
        if refilled >= 1.0 {
            *bucket = (refilled - 1.0, now);
            Ok(())
        } else {
            *bucket = (refilled, now);
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_allow_a_burst_then_refill_per_key() {
        let rate = PerKeyRate::new(2);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(rate.take("a", t0).is_ok());
        }
        let wait = rate.take("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(rate.take("b", t0).is_ok(), "keys are separate");
        assert!(rate.take("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(rate.take("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn places_are_capped_per_key_and_given_back_on_drop() {
        let caps = PerKeyCap::new(2);
        let a1 = caps.take("a").unwrap();
        let _a2 = caps.take("a").unwrap();
        assert!(caps.take("a").is_none());
        let _b = caps.take("b").unwrap();
        assert_eq!(caps.held(&"a"), 2);
        drop(a1);
        assert_eq!(caps.held(&"a"), 1);
        assert!(caps.take("a").is_some());
        drop(_b);
        assert_eq!(caps.held(&"b"), 0);
        assert!(caps.counts.get(&"b").is_none(), "an empty key is forgotten");
    }
}
