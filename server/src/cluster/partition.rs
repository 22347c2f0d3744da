//! Partitions: the unit of ownership in a cluster.
//!
//! Every user, group, phone number and link code belongs to one of
//! [`PARTITIONS`] partitions by a fixed hash of its key. A partition is
//! served by one node at a time, its *owner*, which is the single writer of
//! everything in it (the router's shards keep their single-owner
//! invariants in a cluster). Ownership is recorded in both engines and
//! checked by each engine inside its own atomic step: every Redis script
//! of a partition first compares the partition's owner key (same hash slot)
//! with the writer's token, and every PostgreSQL transaction first locks
//! the `partition_owners` rows of the partitions it writes and compares
//! them. A node that lost a partition (it stalled past its lease, another
//! node took over) therefore cannot write to it any more: its writes fail
//! as [`crate::store::StoreError::Engine`] "fenced" and nothing of them is
//! acknowledged.
//!
//! The number is fixed for the life of a cluster (keys are laid out by
//! it): 4,096 spreads partitions over the masters of any Redis Cluster up
//! to hundreds of masters while a scan of every partition's index stays
//! one pipeline per master.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::router::{hash_str, mix64};

/// Partitions of a cluster.
pub const PARTITIONS: u32 = 4096;

/// The partition of a user or group id.
#[must_use]
pub fn of_id(id: u64) -> u32 {
    // Bits of the mix the shard choice does not use first.
    u32::try_from((mix64(id) >> 20) % u64::from(PARTITIONS)).unwrap_or(0)
}

/// The partition of a string key: a phone number or a link code.
#[must_use]
pub fn of_str(key: &str) -> u32 {
    of_id(hash_str(key))
}

/// What this node may write: its token (unique per process start) and the
/// partitions it owns.
#[derive(Debug)]
pub struct Ownership {
    token: String,
    owned: Vec<AtomicBool>,
}

impl Ownership {
    /// Nothing owned yet, under `token`.
    #[must_use]
    pub fn new(token: String) -> Self {
        Self {
            token,
            owned: (0..PARTITIONS).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The token written as owner of this node's partitions.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether this node owns `partition`.
    #[must_use]
    pub fn owns(&self, partition: u32) -> bool {
        self.owned
            .get(partition as usize)
            .is_some_and(|o| o.load(Ordering::Acquire))
    }

    /// Records that `partition` is (or no longer is) this node's.
    pub fn set(&self, partition: u32, owned: bool) {
        if let Some(o) = self.owned.get(partition as usize) {
            o.store(owned, Ordering::Release);
        }
    }

    /// The partitions this node owns, in order.
    #[must_use]
    pub fn owned(&self) -> Vec<u32> {
        (0..PARTITIONS).filter(|p| self.owns(*p)).collect()
    }

    /// Whether this node owns every partition.
    #[must_use]
    pub fn owns_all(&self) -> bool {
        (0..PARTITIONS).all(|p| self.owns(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_ids_evenly() {
        let mut counts = vec![0u32; PARTITIONS as usize];
        for id in 0..PARTITIONS as u64 * 64 {
            if let Some(c) = counts.get_mut(of_id(id.wrapping_mul(0x9e37_79b9)) as usize) {
                *c += 1;
            }
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(min > Some(&20) && max < Some(&120), "{min:?}..{max:?}");
        assert_eq!(of_str("+15550001"), of_str("+15550001"));
    }
}
