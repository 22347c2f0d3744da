//! A map that remembers only its most recently inserted keys: the bounded
//! memory behind message de-duplication and the client's small caches.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A map of at most `capacity` keys; inserting a new key past that forgets
/// the oldest one (first in, first out).
#[derive(Debug)]
pub(crate) struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> Recent<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Inserts or replaces; a replaced key keeps its age.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Removes a key (its place in the order goes when it comes up).
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let value = self.map.remove(key)?;
        self.order.retain(|k| k != key);
        Some(value)
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Entries, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.order
            .iter()
            .filter_map(|k| self.map.get(k).map(|v| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_past_capacity() {
        let mut r = Recent::new(2);
        r.insert(1, "a");
        r.insert(2, "b");
        r.insert(1, "a2"); // replace keeps age
        r.insert(3, "c");
        assert!(!r.contains(&1));
        assert_eq!(r.get(&2), Some(&"b"));
        assert_eq!(r.get(&3), Some(&"c"));
        assert_eq!(r.map.len(), 2);
        assert_eq!(r.order.len(), 2);
    }
}
