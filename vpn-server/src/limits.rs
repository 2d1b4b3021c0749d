//! Caps on how many of something one key may hold at once: broker sessions per operator and
//! per device, API connections per source address. A place is taken with
//! [`PerKeyCap::take`] and given back when the returned [`Place`] is dropped.

use std::hash::Hash;
use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    use super::*;

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
