//! The one error type of the SDK, grouped by fault: the server refused, the
//! transport failed, the peer broke the protocol, the session is closed, the
//! caller misused the API, or local storage failed.

use std::path::PathBuf;
use std::time::Duration;

use switchboard_proto::pb::{self, ErrorCode};

use crate::ids::{self, DeviceId, UserId};

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the SDK.
///
/// Each variant's message already names its cause, so no variant reports a
/// `source()`: a reporter that walks the chain (`anyhow`'s `{:#}`) would
/// print the cause twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with `Error{code, …}`; code and retry hints are kept.
    #[error("server refused: {0}")]
    Server(ServerError),
    /// The byte stream failed (connect, read, write, WebSocket).
    #[error("transport: {0}")]
    Transport(TransportError),
    /// The peer sent something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(ProtocolError),
    /// The connection or client is closed; see the reason.
    #[error("closed: {0}")]
    Closed(CloseReason),
    /// The caller passed something invalid; retrying as is will not help.
    #[error("invalid use: {0}")]
    Usage(UsageError),
    /// The outbox holds its maximum number of pending sends; retry once some
    /// have been acknowledged.
    #[error("outbox full: {capacity} sends are pending")]
    OutboxFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// Too many requests are waiting for a connection; retry later.
    #[error("busy: {0} requests are already waiting for a connection")]
    Busy(usize),
    /// Reading or writing local state (outbox, crypto store) failed.
    #[error("local storage: {0}")]
    Storage(StorageError),
    /// End-to-end encryption could not be set up or used.
    #[error("end-to-end encryption: {0}")]
    Crypto(CryptoError),
    /// An operation did not complete in time.
    #[error("timed out while {0}")]
    Timeout(&'static str),
}

impl Error {
    /// The server's error code, when the server refused.
    #[must_use]
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server(e) => Some(e.code),
            Self::Closed(CloseReason::Goodbye(e) | CloseReason::Rejected(e)) => Some(e.code),
            _ => None,
        }
    }

    /// True when retrying the same call later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Server(e) => e.is_retryable(),
            Self::Transport(_) | Self::OutboxFull { .. } | Self::Busy(_) | Self::Timeout(_) => true,
            Self::Closed(reason) => matches!(reason, CloseReason::ConnectionLost),
            // A device whose registration could not publish its keys does
            // so when its client first connects: the same send later finds
            // them.
            Self::Crypto(CryptoError::NoKeys { .. }) => true,
            _ => false,
        }
    }
}

impl From<switchboard_proto::ProtoError> for Error {
    fn from(e: switchboard_proto::ProtoError) -> Self {
        Self::Protocol(ProtocolError::Proto(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::Transport(TransportError::Io(e))
    }
}

/// An `Error` frame from the server, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// What went wrong (`UNSPECIFIED` when the code is unknown to this build).
    pub code: ErrorCode,
    /// Human-readable explanation, for logs only.
    pub message: String,
    /// For retryable errors: how long to wait before retrying.
    pub retry_after: Option<Duration>,
    /// `DEVICE_MISMATCH`: current devices the send did not address.
    pub missing_devices: Vec<DeviceId>,
    /// `DEVICE_MISMATCH`: addressed devices the recipient no longer has.
    pub stale_devices: Vec<DeviceId>,
    /// `DEVICE_MISMATCH`: whose device list was wrong (the recipient, or the
    /// sender itself for its other devices), when given.
    pub user_id: Option<UserId>,
}

impl ServerError {
    /// True for codes the server documents as "retry later".
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::RateLimited
                | ErrorCode::Overloaded
                | ErrorCode::StorageUnavailable
                | ErrorCode::Internal
                | ErrorCode::ShuttingDown
                | ErrorCode::QueueFull
        )
    }
}

impl From<pb::Error> for ServerError {
    fn from(e: pb::Error) -> Self {
        Self {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
            retry_after: (e.retry_after_ms > 0).then(|| Duration::from_millis(e.retry_after_ms)),
            missing_devices: ids::devices(&e.missing_devices),
            stale_devices: ids::devices(&e.stale_devices),
            user_id: (e.user_id != 0).then_some(UserId(e.user_id)),
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code.as_str_name())?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(after) = self.retry_after {
            write!(f, " (retry after {} ms)", after.as_millis())?;
        }
        if !self.missing_devices.is_empty() || !self.stale_devices.is_empty() {
            write!(
                f,
                " (missing devices {:?}, stale devices {:?})",
                ids::device_ints(&self.missing_devices),
                ids::device_ints(&self.stale_devices)
            )?;
        }
        Ok(())
    }
}

/// The byte stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket operation failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The WebSocket layer failed (handshake, framing).
    #[error("websocket: {0}")]
    WebSocket(Box<dyn std::error::Error + Send + Sync>),
    /// Connecting and completing the handshake took longer than allowed.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
}

/// The peer broke the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The wire format layer rejected bytes (bad record, decryption, decode).
    #[error("{0}")]
    Proto(switchboard_proto::ProtoError),
    /// The server's static key is not the pinned one.
    #[error("server key mismatch: expected {expected}, got {got}")]
    ServerKeyMismatch {
        /// Pinned key, hex.
        expected: String,
        /// Key presented by the server, hex (empty if none).
        got: String,
    },
    /// A frame of the wrong kind answered a request.
    #[error("expected {expected}, got {got}")]
    UnexpectedFrame {
        /// What the request expects.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// A WebSocket message that is not binary.
    #[error("non-binary websocket message")]
    NonBinaryMessage,
    /// Too many frames arrived while waiting for a response.
    #[error("more than {0} unrelated frames arrived while waiting for a response")]
    TooManyBufferedFrames(usize),
}

/// Why a connection or client is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The caller closed it ([`crate::Client::close`], or every handle dropped).
    ByClient,
    /// The server said `Goodbye` before closing (`REPLACED`, `SHUTTING_DOWN`, …).
    Goodbye(ServerError),
    /// The server refused the session for good: bad credential
    /// (`UNAUTHENTICATED`) or no common protocol version.
    Rejected(ServerError),
    /// The server's static key is not the pinned one.
    ServerKeyMismatch,
    /// The link ended without a `Goodbye` (reset, EOF).
    ConnectionLost,
    /// The client hit a local condition it cannot recover from.
    Fatal(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ByClient => f.write_str("closed by the client"),
            Self::Goodbye(e) => write!(f, "server said goodbye: {e}"),
            Self::Rejected(e) => write!(f, "server rejected the session: {e}"),
            Self::ServerKeyMismatch => f.write_str("server key does not match the pinned key"),
            Self::ConnectionLost => f.write_str("connection lost"),
            Self::Fatal(why) => write!(f, "fatal: {why}"),
        }
    }
}

/// The caller passed something invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The server address does not parse.
    #[error("invalid endpoint {input:?}: {reason}")]
    InvalidEndpoint {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A client message id must be 1..=64 bytes.
    #[error("client message id must be 1..={max} bytes, got {len}")]
    InvalidClientMsgId {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// One device payload is larger than the protocol allows.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The whole request would exceed the frame size limit.
    #[error("request of {len} bytes exceeds the frame limit of {max} bytes")]
    FrameTooLarge {
        /// Encoded length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Too many ids in one read receipt.
    #[error("{len} ids in one receipt; the maximum is {max}")]
    TooManyIds {
        /// How many were given.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Something else about the arguments is wrong.
    #[error("{0}")]
    Invalid(&'static str),
    /// The pinned server key is not 32 bytes.
    #[error("pinned server key must be 32 bytes, got {0}")]
    BadServerKey(usize),
    /// The call needs a Tokio runtime and there is none.
    #[error("no Tokio runtime is running")]
    NoRuntime,
    /// Another client (in this or another process) is using this state
    /// directory: two would overwrite each other's keys, sessions and
    /// outbox. Stop the other one, or give each device its own directory.
    #[error("the state directory {} is in use by another client", .0.display())]
    StateDirInUse(PathBuf),
}

/// End-to-end encryption failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A device of the recipient (or of this account) has not published its
    /// keys yet (registered by an older SDK, or its registration could not
    /// publish them, and it has never connected since); it cannot be
    /// messaged until it does. Retryable.
    #[error("device {device_id} of user {user_id} has not published its encryption keys yet")]
    NoKeys {
        /// The user.
        user_id: UserId,
        /// The device.
        device_id: DeviceId,
    },
    /// A key bundle from the server failed verification (bad signature or
    /// malformed key): the server or the network misbehaved.
    #[error("invalid key bundle for device {device_id} of user {user_id}: {reason}")]
    BadBundle {
        /// The user.
        user_id: UserId,
        /// The device.
        device_id: DeviceId,
        /// What was wrong.
        reason: String,
    },
    /// The server refused this device's identity keys (`INVALID_KEYS`): the
    /// device's crypto state was lost or replaced. Register or link again.
    #[error("the server refused this device's keys: {0}")]
    KeysRejected(String),
    /// The local crypto state does not parse.
    #[error("crypto state is unusable: {0}")]
    State(String),
    /// Encrypting failed (no usable session).
    #[error("cannot encrypt for device {device_id} of user {user_id}: {reason}")]
    Encrypt {
        /// The user.
        user_id: UserId,
        /// The device.
        device_id: DeviceId,
        /// Why.
        reason: String,
    },
    /// The peer's identity keys are unknown, so no safety number exists yet.
    #[error("no identity keys known for user {0}")]
    UnknownIdentity(UserId),
}

/// Local storage (outbox, crypto store) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A blocking storage task failed to run.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// `From` conversions for `?`, without making the inner error a `source()`
/// (see [`Error`]).
macro_rules! from_without_source {
    ($($from:ty => $to:ident :: $variant:ident),* $(,)?) => {
        $(impl From<$from> for $to {
            fn from(e: $from) -> Self {
                Self::$variant(e)
            }
        })*
    };
}

from_without_source! {
    TransportError => Error::Transport,
    ProtocolError => Error::Protocol,
    UsageError => Error::Usage,
    StorageError => Error::Storage,
    CryptoError => Error::Crypto,
    std::io::Error => TransportError::Io,
    switchboard_proto::ProtoError => ProtocolError::Proto,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_the_server_documents_as_temporary_are_retryable() {
        let err = |code: ErrorCode| {
            ServerError::from(pb::Error {
                code: code as i32,
                retry_after_ms: 1000,
                ..Default::default()
            })
        };
        for code in [
            ErrorCode::RateLimited,
            ErrorCode::Overloaded,
            ErrorCode::StorageUnavailable,
            ErrorCode::Internal,
            ErrorCode::ShuttingDown,
            ErrorCode::QueueFull,
        ] {
            assert!(err(code).is_retryable(), "{code:?}");
        }
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::DeviceMismatch,
            ErrorCode::UnknownUser,
        ] {
            assert!(!err(code).is_retryable(), "{code:?}");
        }
        assert_eq!(
            err(ErrorCode::QueueFull).retry_after,
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_cause_is_named_once_in_a_reported_chain() {
        let e: Error = TransportError::from(std::io::Error::other("connection refused")).into();
        assert_eq!(e.to_string(), "transport: connection refused");
        assert!(std::error::Error::source(&e).is_none());
        let e: Error = UsageError::Invalid("max_in_flight_sends must be at least 1").into();
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string().matches("at least 1").count(), 1);
    }
}
