//! The two envelopes of an end-to-end encrypted message: the wire envelope
//! the server routes (version, Olm message type, Olm ciphertext) and the
//! plaintext envelope inside the ciphertext (content kind, body, sender
//! metadata), both defined in `docs/PROTOCOL.md` ("End-to-end encryption").
//!
//! The wire envelope is a fixed binary layout, so it can be parsed before
//! anything is decrypted; the plaintext is a small protobuf, so later
//! content kinds (edits, reactions, media) add fields without a new version.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use switchboard_proto::pb;
use vodozemac::olm::OlmMessage;

/// Version byte of the wire envelope.
pub const WIRE_VERSION: u8 = 1;

/// Olm message type byte for a pre-key message (it creates a session).
pub const OLM_PRE_KEY: u8 = 0;

/// Olm message type byte for a normal message.
pub const OLM_NORMAL: u8 = 1;

/// Message type byte for a Megolm group message (sealed with a sender key,
/// see `crypto::group`).
pub const MEGOLM: u8 = 2;

/// Bytes before the Olm message: version and type.
const WIRE_HEADER_BYTES: usize = 2;

/// Plaintext kind: a message whose body is the application's payload.
pub const KIND_MESSAGE: u32 = 1;

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than the header.
    #[error("payload of {0} bytes is too short for an envelope")]
    Truncated(usize),
    /// A version this build does not know.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// An Olm message type other than 0 or 1.
    #[error("unknown Olm message type {0}")]
    MessageType(u8),
    /// The Olm message does not parse.
    #[error("malformed Olm message: {0}")]
    Olm(String),
    /// The decrypted plaintext envelope does not parse.
    #[error("malformed plaintext envelope: {0}")]
    Plaintext(String),
}

/// Encodes an Olm message as a wire envelope.
#[must_use]
pub fn encode_wire(message: &OlmMessage) -> Bytes {
    let (kind, body) = message.to_parts();
    let kind = if kind == 0 { OLM_PRE_KEY } else { OLM_NORMAL };
    let mut out = BytesMut::with_capacity(WIRE_HEADER_BYTES + body.len());
    out.put_u8(WIRE_VERSION);
    out.put_u8(kind);
    out.put_slice(&body);
    out.freeze()
}

/// Decodes a wire envelope into its Olm message.
///
/// # Errors
///
/// [`EnvelopeError`] when the bytes are not a version-1 envelope holding a
/// well-formed Olm message.
pub fn decode_wire(payload: &[u8]) -> Result<OlmMessage, EnvelopeError> {
    let [version, kind, body @ ..] = payload else {
        return Err(EnvelopeError::Truncated(payload.len()));
    };
    if *version != WIRE_VERSION {
        return Err(EnvelopeError::Version(*version));
    }
    if *kind != OLM_PRE_KEY && *kind != OLM_NORMAL {
        return Err(EnvelopeError::MessageType(*kind));
    }
    OlmMessage::from_parts(usize::from(*kind), body).map_err(|e| EnvelopeError::Olm(e.to_string()))
}

/// The plaintext inside every Olm message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Plaintext {
    /// What the body is ([`KIND_MESSAGE`]; other values are reserved for
    /// later content kinds).
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// The application's payload.
    #[prost(bytes = "bytes", tag = "2")]
    pub body: Bytes,
    /// The sender's clock when the message was made (ms since the epoch).
    #[prost(uint64, tag = "3")]
    pub sent_at_ms: u64,
    /// The conversation's recipient user, as the sender addressed it; the
    /// receiver checks it against the server's routing.
    #[prost(uint64, tag = "4")]
    pub to_user: u64,
    /// The sender device's signed identity keys; set in pre-key messages so
    /// the receiver learns the device's Ed25519 key with the session.
    #[prost(message, optional, tag = "5")]
    pub sender_identity: Option<pb::IdentityKeys>,
    /// The group: in a group message (the receiver checks it against the
    /// server's routing), and in a sender key (the group it is for).
    #[prost(uint64, tag = "6")]
    pub group_id: u64,
}

impl Plaintext {
    /// Serializes the envelope.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Parses a decrypted envelope.
    ///
    /// # Errors
    ///
    /// [`EnvelopeError::Plaintext`] when the bytes are not a `Plaintext`.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        <Self as prost::Message>::decode(bytes).map_err(|e| EnvelopeError::Plaintext(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vodozemac::olm::{Account, SessionConfig};

    fn olm_pair() -> (vodozemac::olm::Session, Account) {
        let alice = Account::new();
        let mut bob = Account::new();
        bob.generate_one_time_keys(1);
        let otk = *bob.one_time_keys().values().next().unwrap();
        let session = alice
            .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
            .unwrap();
        (session, bob)
    }

    #[test]
    fn wire_envelope_round_trips_both_message_types() {
        let (mut session, mut bob) = olm_pair();
        let pre_key = session.encrypt(b"first").unwrap();
        let wire = encode_wire(&pre_key);
        assert_eq!(&wire[..2], &[WIRE_VERSION, OLM_PRE_KEY]);
        let decoded = decode_wire(&wire).unwrap();
        assert_eq!(decoded, pre_key);
        let OlmMessage::PreKey(m) = decoded else {
            panic!("not a pre-key message")
        };
        let mut inbound = bob
            .create_inbound_session(SessionConfig::version_1(), m.identity_key(), &m)
            .unwrap();
        assert_eq!(inbound.plaintext, b"first");
        let reply = inbound.session.encrypt(b"reply").unwrap();
        let wire = encode_wire(&reply);
        assert_eq!(&wire[..2], &[WIRE_VERSION, OLM_NORMAL]);
        let decoded = decode_wire(&wire).unwrap();
        assert_eq!(session.decrypt(&decoded).unwrap(), b"reply");
    }

    #[test]
    fn wire_envelope_refuses_garbage() {
        assert_eq!(decode_wire(&[]), Err(EnvelopeError::Truncated(0)));
        assert_eq!(decode_wire(&[1]), Err(EnvelopeError::Truncated(1)));
        assert_eq!(decode_wire(&[2, 1, 0]), Err(EnvelopeError::Version(2)));
        assert_eq!(decode_wire(&[1, 7, 0]), Err(EnvelopeError::MessageType(7)));
        assert!(matches!(
            decode_wire(&[1, 1, 0xff, 0]),
            Err(EnvelopeError::Olm(_))
        ));
    }

    #[test]
    fn plaintext_round_trips_and_has_stable_bytes() {
        let p = Plaintext {
            kind: KIND_MESSAGE,
            body: Bytes::from_static(b"hi"),
            sent_at_ms: 1,
            to_user: 2,
            sender_identity: None,
            group_id: 0,
        };
        let bytes = p.encode();
        // Golden bytes: field 1 = 1, field 2 = "hi", field 3 = 1, field 4 = 2.
        assert_eq!(bytes, [0x08, 1, 0x12, 2, b'h', b'i', 0x18, 1, 0x20, 2]);
        assert_eq!(Plaintext::decode(&bytes).unwrap(), p);
        assert!(Plaintext::decode(&[0x12, 5, 1]).is_err());
    }
}
