//! The one place internal errors become wire errors. Internals (storage
//! messages, paths) are logged, never sent.

use switchboard_proto::pb::{self, ErrorCode};

use crate::limits::Limit;
use crate::router::{HeldBy, KickReason, RouteError};

/// How long clients should wait before retrying after a storage failure.
const STORAGE_RETRY_AFTER_MS: u64 = 1000;

/// Logs of storage failures, throttled.
static STORAGE_LOG: Throttle = Throttle::new();

/// Lets one log line through per second, counting the ones held back.
struct Throttle {
    /// When the last line went through (ms since the epoch).
    last_ms: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Self {
            last_ms: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` if this one may go out.
    fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = crate::clock::now_ms();
        let last = self.last_ms.load(Relaxed);
        if now.saturating_sub(last) >= 1_000
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Relaxed));
        }
        self.held.fetch_add(1, Relaxed);
        None
    }
}

/// The message of a send refused because an earlier send of the same
/// device to the same user was refused and has not been sent again.
pub const HELD_MESSAGE: &str =
    "an earlier message to this user was refused: send it again first, then this one";

/// Builds a wire error.
pub fn error(code: ErrorCode, message: impl Into<String>) -> pb::Error {
    pb::Error {
        code: code as i32,
        message: message.into(),
        ..Default::default()
    }
}

/// Maps a router error to its wire form.
pub fn route_error(err: &RouteError) -> pb::Error {
    match err {
        RouteError::BadRequest(m) => error(ErrorCode::BadRequest, m.clone()),
        RouteError::Unauthenticated => error(
            ErrorCode::Unauthenticated,
            "unknown device or wrong credential",
        ),
        RouteError::UnknownUser => error(ErrorCode::UnknownUser, "no such user"),
        RouteError::InvalidPhone => error(
            ErrorCode::InvalidPhone,
            "phone numbers must be E.164: '+' and 8 to 15 digits",
        ),
        RouteError::CodeInvalid => error(ErrorCode::CodeInvalid, "wrong code"),
        RouteError::CodeExpired => error(
            ErrorCode::CodeExpired,
            "no valid code for this number; request a new one",
        ),
        RouteError::CodeLocked => error(
            ErrorCode::CodeLocked,
            "too many wrong codes; request a new one",
        ),
        RouteError::RateLimited {
            limit,
            retry_after_ms,
        } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(ErrorCode::RateLimited, limit.message())
        },
        RouteError::OrderHeld { by, retry_after_ms } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(
                match by {
                    HeldBy::Overloaded => ErrorCode::Overloaded,
                    HeldBy::Unavailable => ErrorCode::StorageUnavailable,
                    HeldBy::QueueFull => ErrorCode::QueueFull,
                },
                HELD_MESSAGE,
            )
        },
        RouteError::QueueFull { retry_after_ms } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(ErrorCode::QueueFull, Limit::QueueFull.message())
        },
        RouteError::DeviceMismatch {
            user,
            missing,
            stale,
        } => pb::Error {
            user_id: *user,
            missing_devices: missing.clone(),
            stale_devices: stale.clone(),
            ..error(
                ErrorCode::DeviceMismatch,
                "the send must address exactly the recipient's current devices",
            )
        },
        RouteError::InvalidKeys(m) => error(ErrorCode::InvalidKeys, m.clone()),
        RouteError::PinRequired => error(
            ErrorCode::PinRequired,
            "this account has a two-step verification PIN: verify again with the same code and the PIN",
        ),
        RouteError::PinInvalid => error(ErrorCode::PinInvalid, "wrong PIN"),
        RouteError::PinLocked { retry_after_ms } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(
                ErrorCode::PinLocked,
                "too many wrong PINs: registration of this number is locked (a new code does not lift it)",
            )
        },
        RouteError::NotPrimary => {
            error(ErrorCode::NotPrimary, "only the primary device may do this")
        }
        RouteError::TooManyDevices => error(
            ErrorCode::TooManyDevices,
            format!(
                "a user has at most 1 primary and {} linked devices",
                crate::accounts::MAX_LINKED_DEVICES
            ),
        ),
        RouteError::LinkCodeInvalid => error(
            ErrorCode::LinkCodeInvalid,
            "unknown, used or expired link code",
        ),
        RouteError::UnknownGroup => error(
            ErrorCode::UnknownGroup,
            "no such group, or you are not a member of it",
        ),
        RouteError::NotGroupAdmin => error(
            ErrorCode::NotGroupAdmin,
            "only group admins may do this (and nobody may remove or demote the creator)",
        ),
        RouteError::NotGroupMember => error(
            ErrorCode::NotGroupMember,
            "this user is not a member of the group",
        ),
        RouteError::GroupFull => error(
            ErrorCode::GroupFull,
            "a group has at most 1024 members; nobody was added",
        ),
        RouteError::Storage(e) => {
            // One line a second at most: an engine fault or a failover
            // refuses every request for a while.
            if let Some(more) = STORAGE_LOG.admit() {
                tracing::error!(error = %e, similar_before = more, "storage failure answered as STORAGE_UNAVAILABLE");
            }
            storage_unavailable()
        }
        RouteError::NoServingNode => {
            // Expected while another node takes the partitions over: a
            // warning, not an error, and one line a second at most.
            if let Some(more) = STORAGE_LOG.admit() {
                tracing::warn!(
                    similar_before = more,
                    "no serving node yet: answered STORAGE_UNAVAILABLE"
                );
            }
            storage_unavailable()
        }
        RouteError::CodeDelivery(e) => {
            tracing::error!(error = %e, "code delivery failed");
            pb::Error {
                retry_after_ms: STORAGE_RETRY_AFTER_MS,
                ..error(
                    ErrorCode::Internal,
                    "the code could not be delivered; retry",
                )
            }
        }
        RouteError::CodeSenderUnavailable { retry_after_ms } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(
                ErrorCode::Overloaded,
                "verification codes cannot be sent right now (the SMS gateway is failing); \
                 no code was issued, retry after retry_after_ms",
            )
        },
        RouteError::ShuttingDown => error(ErrorCode::ShuttingDown, "server shutting down"),
        RouteError::Overloaded { retry_after_ms } => pb::Error {
            retry_after_ms: *retry_after_ms,
            ..error(
                ErrorCode::Overloaded,
                "server overloaded; not acknowledged, retry later with the same id",
            )
        },
        RouteError::Internal => pb::Error {
            retry_after_ms: STORAGE_RETRY_AFTER_MS,
            ..error(ErrorCode::Internal, "internal error; retry")
        },
    }
}

/// The goodbye for a connection the server ends because it stops.
pub fn shutting_down() -> pb::Error {
    error(ErrorCode::ShuttingDown, "server shutting down; reconnect")
}

/// The goodbye for a connection the shard ended.
pub fn kick_error(reason: KickReason) -> pb::Error {
    match reason {
        KickReason::Replaced => error(
            ErrorCode::Replaced,
            "this device connected again on another connection",
        ),
        KickReason::SlowReader => error(
            ErrorCode::SlowReader,
            "too slow to read; messages stay queued, reconnect",
        ),
        KickReason::Revoked => error(ErrorCode::DeviceRevoked, "this device was revoked"),
        KickReason::ShuttingDown => shutting_down(),
        KickReason::Unavailable => pb::Error {
            retry_after_ms: STORAGE_RETRY_AFTER_MS,
            ..error(
                ErrorCode::StorageUnavailable,
                "queue unavailable; reconnect",
            )
        },
    }
}

/// A response frame carrying an error.
pub fn error_frame(id: u32, err: pb::Error) -> pb::ServerFrame {
    pb::ServerFrame {
        id,
        body: Some(pb::server_frame::Body::Error(err)),
    }
}

/// STORAGE_UNAVAILABLE, retryable: nothing was acknowledged.
fn storage_unavailable() -> pb::Error {
    pb::Error {
        retry_after_ms: STORAGE_RETRY_AFTER_MS,
        ..error(
            ErrorCode::StorageUnavailable,
            "storage unavailable; not acknowledged, retry with the same id",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        // A second later (moved back in time instead of sleeping).
        t.last_ms
            .fetch_sub(1_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.admit(), Some(2));
    }

    #[test]
    fn no_serving_node_is_a_retryable_storage_unavailable() {
        let e = route_error(&RouteError::NoServingNode);
        assert_eq!(e.code(), ErrorCode::StorageUnavailable);
        assert_eq!(e.retry_after_ms, STORAGE_RETRY_AFTER_MS);
        assert_eq!(
            route_error(&RouteError::Storage(crate::store::StoreError::Engine(
                "disk".into()
            ))),
            e
        );
    }
}
