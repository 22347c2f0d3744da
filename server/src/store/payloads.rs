//! The payloads domain: message bodies stored once and referenced from
//! many queue entries (a group message to every member device).
//!
//! Atomic unit: one payload (its own hash slot in a cluster backend). A
//! payload is written before, or in the same batch as, the first entry that
//! references it ([`super::Op::domain_rank`] puts payloads first), and is
//! collected by its owner once no entry references it.

use super::{PayloadRecord, StoreError};

/// Identifies a stored payload: the owner's id space (a group's id) and a
/// number unique within it (the group's sequence number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PayloadId {
    /// Whose payload: the group (or user) that owns and collects it.
    pub owner: u64,
    /// Unique per owner.
    pub seq: u64,
}

/// Reads of the payloads domain.
pub trait Payloads {
    /// A stored payload.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>, StoreError>;

    /// Payloads stored before `before_ms`, at most `limit`, for the expiry
    /// sweep (a payload lives no longer than the entries that reference it).
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn expired_payloads(&self, before_ms: u64, limit: usize) -> Result<Vec<PayloadId>, StoreError>;
}

/// Writes of the payloads domain.
#[derive(Clone, Debug)]
pub enum PayloadOp {
    /// Store (or replace) a payload.
    Put {
        /// Which.
        id: PayloadId,
        /// The payload.
        record: PayloadRecord,
    },
    /// Collect a payload (its last reference is gone, or it expired).
    Delete(PayloadId),
}
