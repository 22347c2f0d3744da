//! Queue entries held in memory between the store's log and fjall: the ones
//! logged since the last checkpoint and not yet removed.
//!
//! Kept per device, in seq order: a device's entries are appended with
//! rising seqs and usually acked from the front, so both are O(1) plus one
//! hash of the device key, where one ordered map over every entry cost a
//! tree descent of 20-byte key comparisons per insert and per removal.

use std::collections::VecDeque;

use crate::FastMap;

use bytes::Bytes;

/// `user (8) | device (4)`, as in `layout::device`.
type Device = [u8; 12];

/// A device's queue keeps a spare buffer of at most this many entries once
/// empty (an online device's queue empties after every ack).
const KEEP_EMPTY_CAPACITY: usize = 8;

/// The entries, by device and seq.
#[derive(Debug, Default)]
pub struct Hot {
    devices: FastMap<Device, VecDeque<(u64, Bytes)>>,
    len: usize,
}

/// Splits a queue key (`layout::queue_entry`) into device and seq.
fn split(key: &[u8; 20]) -> (Device, u64) {
    let mut device = [0u8; 12];
    device.copy_from_slice(&key[..12]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[12..]);
    (device, u64::from_be_bytes(seq))
}

fn join(device: &Device, seq: u64) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..12].copy_from_slice(device);
    key[12..].copy_from_slice(&seq.to_be_bytes());
    key
}

impl Hot {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Sets the entry under a queue key.
    pub fn insert(&mut self, key: &[u8; 20], value: Bytes) {
        let (device, seq) = split(key);
        let queue = self.devices.entry(device).or_default();
        if queue.back().is_none_or(|(last, _)| *last < seq) {
            queue.push_back((seq, value));
            self.len += 1;
            return;
        }
        match queue.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(i) => queue[i].1 = value,
            Err(i) => {
                queue.insert(i, (seq, value));
                self.len += 1;
            }
        }
    }

    /// Removes the entry under a queue key; says whether there was one.
    pub fn remove(&mut self, key: &[u8; 20]) -> bool {
        let (device, seq) = split(key);
        let Some(queue) = self.devices.get_mut(&device) else {
            return false;
        };
        let removed = if queue.front().is_some_and(|(first, _)| *first == seq) {
            queue.pop_front().is_some()
        } else {
            match queue.binary_search_by_key(&seq, |(s, _)| *s) {
                Ok(i) => queue.remove(i).is_some(),
                Err(_) => false,
            }
        };
        if queue.is_empty() && queue.capacity() > KEEP_EMPTY_CAPACITY {
            self.devices.remove(&device);
        }
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Removes every entry whose queue key starts with `prefix`.
    pub fn remove_prefix(&mut self, prefix: &[u8]) {
        if let Ok(device) = <Device>::try_from(prefix) {
            // A device's whole queue: the only prefix the store removes.
            if let Some(queue) = self.devices.remove(&device) {
                self.len -= queue.len();
            }
            return;
        }
        if prefix.len() < 12 {
            let doomed: Vec<Device> = self
                .devices
                .keys()
                .filter(|d| d.starts_with(prefix))
                .copied()
                .collect();
            for device in doomed {
                self.remove_prefix(&device);
            }
            return;
        }
        // Reaching into the seq.
        let keys: Vec<[u8; 20]> = self
            .entries()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(prefix))
            .collect();
        for k in keys {
            self.remove(&k);
        }
    }

    /// Up to `limit` entries of `device` with seq ≥ `from`, in seq order.
    pub fn range(&self, device: &Device, from: u64, limit: usize) -> Vec<(u64, Bytes)> {
        let Some(queue) = self.devices.get(device) else {
            return Vec::new();
        };
        let start = queue.partition_point(|(s, _)| *s < from);
        queue
            .range(start..)
            .take(limit)
            .map(|(s, v)| (*s, v.clone()))
            .collect()
    }

    /// The first entry of each device's queue, keyed as in `layout::queue_entry`.
    pub fn heads(&self) -> Vec<([u8; 20], Bytes)> {
        self.devices
            .iter()
            .filter_map(|(device, queue)| {
                queue
                    .front()
                    .map(|(seq, bytes)| (join(device, *seq), bytes.clone()))
            })
            .collect()
    }

    /// Every entry with its queue key.
    pub fn entries(&self) -> Vec<([u8; 20], Bytes)> {
        let mut out = Vec::with_capacity(self.len);
        for (device, queue) in &self.devices {
            out.extend(queue.iter().map(|(s, v)| (join(device, *s), v.clone())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: u64, device: u32, seq: u64) -> [u8; 20] {
        let mut k = [0u8; 20];
        k[..8].copy_from_slice(&user.to_be_bytes());
        k[8..12].copy_from_slice(&device.to_be_bytes());
        k[12..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    fn dev(user: u64, device: u32) -> Device {
        let mut d = [0u8; 12];
        d.copy_from_slice(&key(user, device, 0)[..12]);
        d
    }

    fn seqs(hot: &Hot, user: u64, device: u32) -> Vec<u64> {
        hot.range(&dev(user, device), 0, usize::MAX)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn entries_stay_in_seq_order_per_device() {
        let mut hot = Hot::default();
        for seq in [5, 6, 9, 7, 1] {
            hot.insert(&key(1, 1, seq), Bytes::from(vec![seq as u8]));
        }
        hot.insert(&key(1, 2, 3), Bytes::from_static(b"other device"));
        hot.insert(&key(1, 1, 6), Bytes::from_static(b"again"));
        assert_eq!(hot.len(), 6);
        assert_eq!(seqs(&hot, 1, 1), vec![1, 5, 6, 7, 9]);
        let from_six = hot.range(&dev(1, 1), 6, 2);
        assert_eq!(from_six[0], (6, Bytes::from_static(b"again")));
        assert_eq!(from_six[1].0, 7);

        // From the front, from the middle, and one that is not there.
        assert!(hot.remove(&key(1, 1, 1)));
        assert!(hot.remove(&key(1, 1, 7)));
        assert!(!hot.remove(&key(1, 1, 8)));
        assert!(!hot.remove(&key(3, 1, 1)));
        assert_eq!(seqs(&hot, 1, 1), vec![5, 6, 9]);
        assert_eq!(hot.len(), 4);

        let mut all: Vec<[u8; 20]> = hot.entries().into_iter().map(|(k, _)| k).collect();
        all.sort_unstable();
        assert_eq!(
            all,
            vec![key(1, 1, 5), key(1, 1, 6), key(1, 1, 9), key(1, 2, 3)]
        );
    }

    #[test]
    fn prefixes_remove_whole_queues() {
        let mut hot = Hot::default();
        for (user, device) in [(1, 1), (1, 2), (2, 1)] {
            for seq in 1..=3 {
                hot.insert(&key(user, device, seq), Bytes::new());
            }
        }
        hot.remove_prefix(&dev(1, 2));
        assert_eq!(hot.len(), 6);
        assert!(seqs(&hot, 1, 2).is_empty());
        // A user's every device.
        hot.remove_prefix(&1u64.to_be_bytes());
        assert_eq!(hot.len(), 3);
        assert_eq!(seqs(&hot, 2, 1), vec![1, 2, 3]);
        // Reaching into the seq.
        hot.remove_prefix(&key(2, 1, 2));
        assert_eq!(seqs(&hot, 2, 1), vec![1, 3]);
        assert_eq!(hot.len(), 2);
    }
}
