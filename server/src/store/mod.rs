//! Storage: the traits the router writes through, and the embedded backend.
//!
//! The router never talks to a database directly. It reads through [`Store`]
//! and writes by handing a whole batch of [`Op`]s to [`Store::commit`], so a
//! shard's group commit is one call, and a cluster backend (PostgreSQL +
//! Redis) can later implement the same trait without touching the router.

mod embedded;
pub mod faults;
mod hot;
mod keys;
mod log;
pub mod records;

pub use embedded::EmbeddedStore;
pub use records::{
    CodeRecord, DedupRecord, DeviceKeysRecord, DeviceRecord, LinkCodeRecord, MailRecord, UserRecord,
};

use bytes::Bytes;

/// A user's id: random, never reused.
pub type UserId = u64;
/// A device's id, unique within its user.
pub type DeviceId = u32;

/// One device of one user: the owner of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The user.
    pub user: UserId,
    /// The device within the user.
    pub device: DeviceId,
}

/// Identifies one accepted send for deduplication: the recipient, the sending
/// device and the client's message id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    /// The recipient user (the owner of this record).
    pub to_user: UserId,
    /// The sending device.
    pub from: DeviceKey,
    /// The sender's client message id.
    pub client_msg_id: String,
}

/// One queue entry as stored: its sequence number and the encoded
/// `pb::QueueEntry` (which repeats the sequence number and timestamp).
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// Position in the device's queue.
    pub seq: u64,
    /// Encoded `pb::QueueEntry`.
    pub bytes: Bytes,
}

/// One write. A batch of them is applied atomically by [`Store::commit`].
#[derive(Clone, Debug)]
pub enum Op {
    /// Create or replace a user record.
    PutUser(UserRecord),
    /// Map a phone number to a user.
    PutPhone {
        /// E.164 phone number.
        phone: String,
        /// Its user.
        user: UserId,
    },
    /// Create or replace the code state of a phone number.
    PutCode {
        /// E.164 phone number.
        phone: String,
        /// The state.
        record: CodeRecord,
    },
    /// Append an entry to a device's queue. Its seq must have been
    /// reserved (see [`Op::ReserveSeqs`]) in this batch or an earlier one.
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
    /// Remember an accepted send.
    PutDedup {
        /// Which send.
        key: DedupKey,
        /// What was answered.
        record: DedupRecord,
    },
    /// Create or replace a device's key record.
    PutDeviceKeys {
        /// The device.
        device: DeviceKey,
        /// Its keys.
        record: DeviceKeysRecord,
    },
    /// Store one one-time key.
    PutOneTimeKey {
        /// The device.
        device: DeviceKey,
        /// Its index (ascending in upload order).
        index: u64,
        /// The key (encoded `pb::SignedKey`).
        key: Bytes,
    },
    /// Remove one one-time key (handed out).
    DeleteOneTimeKey {
        /// The device.
        device: DeviceKey,
        /// Its index.
        index: u64,
    },
    /// Remove every key of a device (revoked).
    DropDeviceKeys(DeviceKey),
    /// Store a link code.
    PutLinkCode {
        /// The code.
        code: String,
        /// What it links to.
        record: LinkCodeRecord,
    },
    /// Remove a link code (used or expired).
    DeleteLinkCode(String),
    /// Keep a piece of shard-to-shard mail until it is delivered.
    PutMail {
        /// The user on whose behalf it was sent (its shard resends it).
        owner: UserId,
        /// Unique per owner.
        id: u64,
        /// The mail.
        record: MailRecord,
    },
    /// Forget delivered mail.
    DeleteMail {
        /// As in [`Op::PutMail`].
        owner: UserId,
        /// As in [`Op::PutMail`].
        id: u64,
    },
}

impl Op {
    /// Whether losing this write in a crash would break a promise. Deletions
    /// that only cause a redelivery do not need a sync of their own.
    #[must_use]
    pub fn needs_sync(&self) -> bool {
        !matches!(
            self,
            Op::Dequeue { .. } | Op::DropQueue(_) | Op::DeleteLinkCode(_) | Op::DeleteMail { .. }
        )
    }
}

/// Storage failures. All are infrastructure faults: retryable by the client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage engine failed (I/O error, disk full, poisoned journal).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record did not decode: corruption or a bug.
    #[error("corrupt record in {what}: {detail}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
}

/// Everything the router needs from storage. Reads may be served from any
/// thread; writes come only through [`Store::commit`], one batch at a time
/// per shard.
pub trait Store: Send + Sync + 'static {
    /// A user's record.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError>;

    /// The user a phone number belongs to.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError>;

    /// The code state of a phone number.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError>;

    /// An accepted send, if it is still remembered.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError>;

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

    /// Forgets dedup records accepted before `before_ms`, in whole time
    /// buckets: a record is remembered at least until `before_ms` passes
    /// its `accepted_ms`, and at most one bucket longer. Says how many
    /// buckets were dropped.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError>;

    /// Queue entries anywhere whose timestamp is before `before_ms`, for the
    /// TTL sweep: `(device, seq)` pairs, at most `limit`, scanning from `from`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError>;

    /// A device's published keys.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError>;

    /// The device's one-time key with the lowest index `>= from`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError>;

    /// A link code.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError>;

    /// Link codes that expired before `before_ms`, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Every piece of mail not yet delivered: `(owner, id, record)`, for
    /// the owners' shards to resend after a restart.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError>;

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

    /// Applies a batch atomically; with `sync`, returns only once it is on
    /// stable storage.
    ///
    /// # Errors
    /// [`StoreError::Engine`] if the batch could not be written or synced; then
    /// none of it must be acknowledged.
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError>;

    /// Roughly how many queue entries are stored (for the backlog gauge).
    fn approximate_queue_entries(&self) -> u64;

    /// Flushes everything to stable storage (at shutdown).
    ///
    /// # Errors
    /// [`StoreError::Engine`] on failure.
    fn flush(&self) -> Result<(), StoreError>;
}
