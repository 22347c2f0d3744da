//! Storage, by domain: one trait per kind of state, and the backends.
//!
//! The router never talks to a database directly. It reads through the
//! domain traits and writes by handing a batch of [`Op`]s (each one
//! domain's write) to [`Store::commit`], so a shard's group commit is one
//! call. The domains, their atomicity units and where a cluster backend
//! keeps them (docs/ARCHITECTURE.md, "Storage by domain", has the whole
//! mapping):
//!
//! | domain | trait | writes | atomic unit | cluster |
//! |---|---|---|---|---|
//! | accounts, phones, codes, link codes | [`Accounts`] | [`AccountOp`] | the batch | PostgreSQL, one transaction |
//! | device keys, one-time keys | [`Keys`] | [`KeyOp`] | the batch | PostgreSQL, the same transaction |
//! | device queues | [`Queues`] | [`QueueOp`] | one user | Redis, the user's hash slot |
//! | dedup records | [`Dedup`] | [`DedupOp`] | one user (the recipient), together with its queues | Redis, the same slot |
//! | shard-to-shard mail | [`Mailboxes`] | [`MailOp`] | one owner user | Redis, the owner's slot |
//! | groups, members, group counters, each user's groups | [`Groups`] | [`GroupOp`] | the batch | PostgreSQL, one transaction |
//! | shared payloads | [`Payloads`] | [`PayloadOp`] | one payload | Redis, the payload's slot |
//!
//! [`Store::commit`] states what a batch spanning several units promises;
//! the embedded backend is stronger (a whole batch is atomic), and the
//! router relies only on the weaker promise. Every backend passes the one
//! [`conformance`] suite.

mod accounts;
pub mod conformance;
mod dedup;
mod device_keys;
mod embedded;
pub mod faults;
mod groups;
mod mail;
mod payloads;
mod queues;
pub mod records;

pub use accounts::{AccountOp, Accounts};
pub use dedup::{DEDUP_EXPIRY_SLACK_MS, Dedup, DedupKey, DedupOp, Recipient};
pub use device_keys::{KeyOp, Keys};
pub use embedded::EmbeddedStore;
pub use groups::{GroupId, GroupOp, Groups};
pub use mail::{MailOp, Mailboxes};
pub use payloads::{PayloadId, PayloadOp, Payloads};
pub use queues::{QueueOp, Queues, StoredEntry};
pub use records::{
    CodeRecord, DedupRecord, DeviceKeysRecord, DeviceRecord, GroupRecord, LinkCodeRecord,
    MailRecord, MemberRecord, PayloadRecord, UserRecord,
};

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

/// One write, of one domain. A batch of them is applied by
/// [`Store::commit`].
#[derive(Clone, Debug)]
pub enum Op {
    /// Accounts, phones, codes, link codes.
    Account(AccountOp),
    /// Device keys and one-time keys.
    Key(KeyOp),
    /// Device queues.
    Queue(QueueOp),
    /// Dedup records.
    Dedup(DedupOp),
    /// Shard-to-shard mail.
    Mail(MailOp),
    /// Shared payloads.
    Payload(PayloadOp),
    /// Groups and memberships.
    Group(GroupOp),
}

impl Op {
    /// Whether losing this write in a crash would break a promise. Deletions
    /// that only cause a redelivery do not need a sync of their own.
    #[must_use]
    pub fn needs_sync(&self) -> bool {
        !matches!(
            self,
            Op::Queue(QueueOp::Dequeue { .. } | QueueOp::DropQueue(_))
                | Op::Account(AccountOp::DeleteLinkCode(_))
                | Op::Mail(MailOp::Delete { .. })
        )
    }

    /// The order in which a backend that cannot apply a whole batch
    /// atomically makes the domains' parts of it durable (see
    /// [`Store::commit`]); lower first.
    #[must_use]
    pub fn domain_rank(&self) -> u8 {
        match self {
            // A group's counter before anything numbered from it.
            Op::Payload(_) | Op::Group(GroupOp::ReserveSeqs { .. }) => 0,
            Op::Mail(_) => 1,
            Op::Queue(_) | Op::Dedup(_) => 2,
            Op::Key(_) => 3,
            Op::Account(_) | Op::Group(_) => 4,
        }
    }
}

macro_rules! op_from {
    ($($domain:ident => $variant:ident),* $(,)?) => {
        $(impl From<$domain> for Op {
            fn from(op: $domain) -> Self {
                Op::$variant(op)
            }
        })*
    };
}
op_from!(
    AccountOp => Account,
    KeyOp => Key,
    QueueOp => Queue,
    DedupOp => Dedup,
    MailOp => Mail,
    PayloadOp => Payload,
    GroupOp => Group,
);

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

/// A whole storage backend: every domain, and the one way to write.
/// Reads may be served from any thread; writes come only through
/// [`Store::commit`], one batch at a time per shard.
pub trait Store:
    Accounts + Keys + Queues + Dedup + Mailboxes + Payloads + Groups + Send + Sync + 'static
{
    /// Applies a batch; with `sync`, returns only once it is on stable
    /// storage.
    ///
    /// **What a batch promises.** Each domain's writes within one atomic
    /// unit (the table in the module docs: the batch for accounts and keys,
    /// one user for queues and dedup, one owner for mail, one payload) are
    /// applied all or none, in the batch's order. Across units a backend
    /// may make the parts durable one after another, in the order of
    /// [`Op::domain_rank`] (payloads and group counters, mail, queues and
    /// dedup, keys, accounts and groups): after a crash in the middle, a later part may be missing
    /// while an earlier one is there, never the reverse. Nothing of a
    /// failed batch is acknowledged. The router builds its batches so that
    /// every such prefix is safe (ARCHITECTURE.md lists why, per batch).
    /// The embedded backend applies a whole batch atomically.
    ///
    /// # Errors
    /// [`StoreError::Engine`] if the batch could not be written or synced;
    /// then none of it must be acknowledged.
    fn commit(&self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError>;

    /// Flushes everything to stable storage (at shutdown).
    ///
    /// # Errors
    /// [`StoreError::Engine`] on failure.
    fn flush(&self) -> Result<(), StoreError>;
}
