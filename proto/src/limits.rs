//! Size limits shared by both ends of the wire. Servers may configure lower
//! frame limits; these are the defaults and the hard ceilings.

/// Default largest frame (after decryption, without its length prefix).
/// A send carries one payload per device addressed (up to 64 KiB each; the
/// server accepts at most 16 per send, 1 MiB in all), so 1 MiB holds any
/// valid send without letting a peer make us buffer much.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest opaque payload for one device in a `Send`.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Longest client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;

/// Most message ids in one `SendReceipt`.
pub const MAX_RECEIPT_IDS: usize = 1000;

/// Most sequence numbers in one `Ack`.
pub const MAX_ACK_SEQS: usize = 1000;

/// Largest Noise message, fixed by the Noise specification.
pub const MAX_NOISE_MESSAGE_BYTES: usize = 65_535;

/// Authentication tag added by ChaCha20-Poly1305 to every transport record.
pub const NOISE_TAG_BYTES: usize = 16;

/// Largest plaintext carried by one transport record.
pub const MAX_RECORD_PLAINTEXT_BYTES: usize = MAX_NOISE_MESSAGE_BYTES - NOISE_TAG_BYTES;
