//! The groups domain: each group's record (info, members and their roles)
//! and its sequence counter, and each user's list of groups.
//!
//! Atomic unit: the batch, like accounts (PostgreSQL tables `groups`,
//! `group_members` and a counter column, one transaction per batch, in a
//! cluster backend). Only the group's owner shard writes a group's record,
//! its counter and the memberships naming it, so concurrent changes to one
//! group are serialised there, without a lock.

use super::{GroupRecord, StoreError, UserId};

/// A group's id: random, never reused; the same space as user ids, and
/// owned by the shard that would own a user with that id.
pub type GroupId = u64;

/// Reads of the groups domain.
pub trait Groups {
    /// A group's record.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError>;

    /// The highest group sequence number ever reserved for a group (0 if
    /// none): every `group_seq` used so far is at or below it.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn group_reserved_seq(&self, group: GroupId) -> Result<u64, StoreError>;

    /// The groups a user is a member of, ascending by id.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError>;
}

/// Writes of the groups domain.
#[derive(Clone, Debug)]
pub enum GroupOp {
    /// Create or replace a group's record.
    PutGroup(GroupRecord),
    /// Reserve a group's sequence numbers up to `upto` (a block at a time,
    /// as for queues).
    ReserveSeqs {
        /// The group.
        group: GroupId,
        /// The highest seq reserved.
        upto: u64,
    },
    /// Record that `user` is a member of `group`.
    PutMembership {
        /// The member.
        user: UserId,
        /// The group.
        group: GroupId,
    },
    /// Record that `user` is no longer a member of `group`.
    DeleteMembership {
        /// The former member.
        user: UserId,
        /// The group.
        group: GroupId,
    },
    /// Remove a group's record and counter (its last member left).
    DropGroup(GroupId),
}
