//! The dedup domain: accepted sends, remembered so a retry under the same
//! client message id is answered instead of stored twice.
//!
//! Atomic unit: one recipient user, together with its queues
//! ([`super::Queues`]): a send's queue entries and its dedup record are
//! written all or none (one Redis script in the user's hash slot in a
//! cluster backend).

use super::{DedupRecord, DeviceKey, GroupId, StoreError, UserId};

/// Whom a send went to: a user (1:1) or a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Recipient {
    /// A user's devices.
    User(UserId),
    /// Every member device of a group.
    Group(GroupId),
}

impl Recipient {
    /// The user or group id (they share one id space); the owner of the
    /// dedup record is the shard that owns this id.
    #[must_use]
    pub fn id(self) -> u64 {
        match self {
            Recipient::User(id) | Recipient::Group(id) => id,
        }
    }
}

/// Identifies one accepted send for deduplication: the recipient, the sending
/// device and the client's message id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    /// The recipient (the owner of this record).
    pub to: Recipient,
    /// The sending device.
    pub from: DeviceKey,
    /// The sender's client message id.
    pub client_msg_id: String,
}

/// Reads and expiry of the dedup domain.
pub trait Dedup {
    /// An accepted send, if it is still remembered.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError>;

    /// Forgets records accepted before `before_ms`, at the backend's own
    /// granularity: a record is remembered at least until `before_ms`
    /// passes its `accepted_ms`, and at most [`DEDUP_EXPIRY_SLACK_MS`]
    /// longer (the embedded backend drops whole day buckets; a backend with
    /// per-key TTLs may do nothing). Says how many units were dropped.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError>;
}

/// How much longer than asked a backend may remember a dedup record.
pub const DEDUP_EXPIRY_SLACK_MS: u64 = 86_400_000;

/// Writes of the dedup domain.
#[derive(Clone, Debug)]
pub enum DedupOp {
    /// Remember (or overwrite) an accepted send.
    Put {
        /// Which send.
        key: DedupKey,
        /// What was answered.
        record: DedupRecord,
    },
}
