//! The mail domain: durable shard-to-shard mail (`router/mail.rs`), kept by
//! the sending shard until the receiving one has committed its effect.
//!
//! Atomic unit: one owner user (its hash slot in a cluster backend).

use super::{MailRecord, StoreError, UserId};

/// Reads of the mail domain.
pub trait Mailboxes {
    /// Every piece of mail not yet delivered: `(owner, id, record)`, for
    /// the owners' shards to resend after a restart.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError>;
}

/// Writes of the mail domain.
#[derive(Clone, Debug)]
pub enum MailOp {
    /// Keep a piece of mail until it is delivered.
    Put {
        /// The user on whose behalf it was sent (its shard resends it).
        owner: UserId,
        /// Unique per owner.
        id: u64,
        /// The mail (boxed: group mail lists many users).
        record: Box<MailRecord>,
    },
    /// Forget delivered mail.
    Delete {
        /// As in [`MailOp::Put`].
        owner: UserId,
        /// As in [`MailOp::Put`].
        id: u64,
    },
}
