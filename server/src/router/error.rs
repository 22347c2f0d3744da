//! Errors the router answers requests with. `gateway::wire_error` maps each
//! to a wire error code; internals never reach clients.

use super::order::HeldBy;
use crate::limits::{Limit, Refused};
use crate::store::{DeviceId, StoreError, UserId};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    // ---- the caller's fault
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Wrong or revoked credential.
    #[error("unauthenticated")]
    Unauthenticated,
    /// No such user or phone number.
    #[error("unknown user")]
    UnknownUser,
    /// Not an E.164 phone number.
    #[error("invalid phone number")]
    InvalidPhone,
    /// Wrong verification code.
    #[error("wrong code")]
    CodeInvalid,
    /// No valid code outstanding.
    #[error("code expired or never requested")]
    CodeExpired,
    /// Too many wrong codes.
    #[error("too many wrong codes; request a new code")]
    CodeLocked,
    /// The account has a PIN and none was given; the code was kept.
    #[error("PIN required")]
    PinRequired,
    /// Wrong PIN; the code was kept.
    #[error("wrong PIN")]
    PinInvalid,
    /// Too many wrong PINs: the number is locked.
    #[error("too many wrong PINs")]
    PinLocked {
        /// When the lock ends.
        retry_after_ms: u64,
    },
    /// Too many requests.
    #[error("rate limited ({})", limit.name())]
    RateLimited {
        /// Which limit.
        limit: Limit,
        /// When to try again.
        retry_after_ms: u64,
    },
    /// An earlier send of this device to this user was refused and has not
    /// been sent again; this one is refused the same way so it cannot
    /// overtake it (`router::order`).
    #[error("held behind an earlier refused send")]
    OrderHeld {
        /// The earlier refusal.
        by: HeldBy,
        /// When to try again.
        retry_after_ms: u64,
    },
    /// A recipient device's durable queue is at its quota.
    #[error("queue full")]
    QueueFull {
        /// When to try again.
        retry_after_ms: u64,
    },
    /// The send did not address exactly the recipient's devices.
    #[error("device list mismatch")]
    DeviceMismatch {
        /// Whose devices: the recipient's or the sender's own.
        user: UserId,
        /// Current devices the send left out.
        missing: Vec<DeviceId>,
        /// Addressed devices that do not exist (any more).
        stale: Vec<DeviceId>,
    },

    /// Keys are malformed, badly signed or contradict the identity.
    #[error("invalid keys: {0}")]
    InvalidKeys(String),
    /// Only the primary device may do this.
    #[error("only the primary device may do this")]
    NotPrimary,
    /// The user has the most devices allowed.
    #[error("too many devices")]
    TooManyDevices,
    /// Unknown, used or expired link code.
    #[error("invalid link code")]
    LinkCodeInvalid,
    /// No such group, or the requester is not a member.
    #[error("no such group")]
    UnknownGroup,
    /// The requester's role in the group does not allow this.
    #[error("only group admins may do this")]
    NotGroupAdmin,
    /// The group has the most members allowed.
    #[error("the group is full")]
    GroupFull,
    /// A `SendGroupKeys` part names a user outside the group.
    #[error("not a member of the group")]
    NotGroupMember,

    // ---- infrastructure
    /// The store failed; nothing was acknowledged.
    #[error("storage unavailable: {0}")]
    Storage(#[from] StoreError),
    /// A forwarding cluster node has no link to the node serving the
    /// partitions (it died or stopped, and another is taking over);
    /// nothing was done. Clients see it as STORAGE_UNAVAILABLE.
    #[error("no link to the node serving the partitions")]
    NoServingNode,
    /// The code could not be delivered.
    #[error("could not deliver the code: {0}")]
    CodeDelivery(String),
    /// The code sender is failing and its circuit is open; no code was
    /// issued.
    #[error("code sender unavailable")]
    CodeSenderUnavailable {
        /// When to try again.
        retry_after_ms: u64,
    },
    /// The shard could not take the request in time; nothing was done.
    #[error("overloaded")]
    Overloaded {
        /// When to try again.
        retry_after_ms: u64,
    },
    /// A bug was caught (a panic); the shard restarted from the store.
    #[error("internal error")]
    Internal,
    /// The shard is gone (shutting down).
    #[error("shutting down")]
    ShuttingDown,
}

impl From<Refused> for RouteError {
    fn from(r: Refused) -> Self {
        RouteError::RateLimited {
            limit: r.limit,
            retry_after_ms: r.retry_after_ms,
        }
    }
}
