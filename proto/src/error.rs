//! The one error type of the protocol layer.

/// Everything that can go wrong while decoding or encrypting the wire format.
///
/// Every variant except [`ProtoError::Internal`] means the peer misbehaved
/// (or the bytes were corrupted); the connection should be closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The stream did not start with [`crate::PREAMBLE`].
    #[error("bad preamble: not a Switchboard stream")]
    BadPreamble,
    /// A record of length zero was received.
    #[error("empty record")]
    EmptyRecord,
    /// A frame announced more bytes than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// A length prefix was not a valid varint.
    #[error("invalid frame length prefix")]
    BadLength,
    /// A frame's bytes were not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The Noise layer rejected a message (bad handshake, failed decryption).
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// A handshake message arrived out of order or the handshake is incomplete.
    #[error("handshake out of order")]
    HandshakeState,
    /// A local bug: should never happen.
    #[error("internal protocol error: {0}")]
    Internal(&'static str),
}
