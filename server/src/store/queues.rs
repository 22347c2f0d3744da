//! The queues domain: one store-and-forward queue per device, holding an
//! entry only until the device acknowledges it.
//!
//! Atomic unit: one user (all its devices' queues), together with the dedup
//! records addressed to it ([`super::Dedup`]); in a cluster backend, one
//! Redis script in the user's hash slot.

use bytes::Bytes;

use super::{DeviceKey, StoreError, UserId};

/// One queue entry as stored: its sequence number and the encoded
/// `pb::QueueEntry` (which repeats the sequence number and timestamp).
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// Position in the device's queue.
    pub seq: u64,
    /// Encoded `pb::QueueEntry`.
    pub bytes: Bytes,
}

/// Reads of the queues domain.
pub trait Queues {
    /// The highest sequence number ever reserved for a device's queue (0 if
    /// none): every seq used so far is at or below it.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError>;

    /// Up to `limit` entries of a device's queue with `seq > after`, in order.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// How many entries and bytes a device's queue holds (for its quota).
    /// Reads the whole queue by default; a backend that keeps counts may
    /// answer from them.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn queue_usage(&self, device: DeviceKey) -> Result<(u64, u64), StoreError> {
        /// Entries read per page while counting.
        const PAGE: usize = 1024;
        let (mut entries, mut bytes, mut after) = (0u64, 0u64, 0u64);
        loop {
            let page = self.read_queue(device, after, PAGE)?;
            let Some(last) = page.last() else {
                return Ok((entries, bytes));
            };
            after = last.seq;
            entries += page.len() as u64;
            bytes += page.iter().map(|e| e.bytes.len() as u64).sum::<u64>();
            if page.len() < PAGE {
                return Ok((entries, bytes));
            }
        }
    }

    /// Queue entries anywhere whose timestamp is before `before_ms`, for the
    /// TTL sweep: `(device, seq)` pairs, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError>;

    /// The timestamp of the oldest queue entry of each of `buckets` groups
    /// of devices (`bucket_of` maps a user to its group; `None`: no
    /// entry), for the backlog-age gauge. Reads the head of every queue.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError>;

    /// Roughly how many queue entries are stored (for the backlog gauge).
    fn approximate_queue_entries(&self) -> u64;
}

/// Writes of the queues domain.
#[derive(Clone, Debug)]
pub enum QueueOp {
    /// Append an entry to a device's queue. Its seq must have been
    /// reserved (see [`QueueOp::ReserveSeqs`]) in this batch or an earlier
    /// one.
    Enqueue {
        /// The queue.
        device: DeviceKey,
        /// The entry.
        entry: StoredEntry,
    },
    /// Reserve the seqs of a device's queue up to `upto`, so none of them is
    /// handed out again after a restart. Shards reserve a block at a time:
    /// one counter write per block of entries instead of one per entry.
    ReserveSeqs {
        /// The queue.
        device: DeviceKey,
        /// The highest seq reserved.
        upto: u64,
    },
    /// Remove an entry from a device's queue.
    Dequeue {
        /// The queue.
        device: DeviceKey,
        /// The entry.
        seq: u64,
    },
    /// Remove a device's whole queue and counter (device revoked).
    DropQueue(DeviceKey),
}
