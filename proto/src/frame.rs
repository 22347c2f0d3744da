//! Frames: the application layer inside the Noise transport. Each frame is a
//! LEB128 varint length followed by that many bytes of protobuf, so a small
//! frame costs one or two bytes of framing.
//!
//! The decoder checks the announced length against the configured maximum as
//! soon as the varint is complete, before buffering a single byte of the body.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::ProtoError;

/// Longest LEB128 encoding of a u64.
const MAX_VARINT_BYTES: usize = 10;

/// Reads the varint at the front of `buf` without consuming it.
///
/// Returns `Ok(None)` if the varint is incomplete, otherwise the value and the
/// number of bytes it occupies.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, ProtoError> {
    let mut value: u64 = 0;
    for (i, byte) in buf.iter().take(MAX_VARINT_BYTES).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if i == MAX_VARINT_BYTES - 1 && bits > 1 {
            return Err(ProtoError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_BYTES {
        return Err(ProtoError::BadLength);
    }
    Ok(None)
}

/// Splits a plaintext byte stream into frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_frame_bytes`.
    #[must_use]
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The configured maximum frame size.
    #[must_use]
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Takes one whole frame body off the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    ///
    /// [`ProtoError::FrameTooLarge`] as soon as the length prefix announces too
    /// many bytes; [`ProtoError::BadLength`] for a malformed prefix.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtoError> {
        let Some((len, prefix)) = peek_varint(buf)? else {
            return Ok(None);
        };
        let len_usize = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.max_frame_bytes)
            .ok_or(ProtoError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            })?;
        // The prefix is in `buf`, so this subtraction cannot underflow; the
        // sum `prefix + len_usize` could overflow under a maximum near
        // `usize::MAX` (found by the `frame_decoder` fuzz target).
        if buf.len() - prefix < len_usize {
            return Ok(None);
        }
        buf.advance(prefix);
        Ok(Some(buf.split_to(len_usize)))
    }

    /// Takes one whole frame off the front of `buf` and decodes it as `M`.
    ///
    /// # Errors
    ///
    /// As [`FrameDecoder::decode`], plus [`ProtoError::Decode`] for bytes
    /// that are not a valid `M`.
    pub fn decode_message<M: Message + Default>(
        &self,
        buf: &mut BytesMut,
    ) -> Result<Option<M>, ProtoError> {
        match self.decode(buf)? {
            Some(body) => Ok(Some(M::decode(body.freeze())?)),
            None => Ok(None),
        }
    }
}

/// Appends `msg` as one frame (varint length + protobuf) to `out`.
pub fn encode<M: Message>(msg: &M, out: &mut BytesMut) {
    let len = msg.encoded_len();
    out.reserve(prost::length_delimiter_len(len) + len);
    // `encode_length_delimited` would measure the message a second time
    // (a walk over every nested field), and a BytesMut grows on demand.
    prost::encoding::encode_varint(len as u64, out);
    msg.encode_raw(out);
}

/// Appends raw frame bytes (already protobuf-encoded) as one frame.
pub fn encode_raw(body: &[u8], out: &mut BytesMut) {
    out.reserve(MAX_VARINT_BYTES + body.len());
    let _ = prost::encode_length_delimiter(body.len(), out);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use proptest::prelude::*;

    #[test]
    fn golden_ping_frame() {
        let frame = pb::ClientFrame {
            id: 7,
            body: Some(pb::client_frame::Body::Ping(pb::Ping {})),
        };
        let mut out = BytesMut::new();
        encode(&frame, &mut out);
        // length 4, field 1 varint 7, field 2 length-delimited empty.
        assert_eq!(&out[..], &[0x04, 0x08, 0x07, 0x12, 0x00]);
        let decoded: pb::ClientFrame = FrameDecoder::new(100)
            .decode_message(&mut out)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, frame);
        assert!(out.is_empty());
    }

    #[test]
    fn too_large_is_refused_from_the_prefix_alone() {
        let mut out = BytesMut::new();
        encode_raw(&[0u8; 300], &mut out);
        out.truncate(2); // only the varint (0xac 0x02) has arrived
        let err = FrameDecoder::new(299).decode(&mut out).unwrap_err();
        assert!(matches!(
            err,
            ProtoError::FrameTooLarge { len: 300, max: 299 }
        ));
    }

    #[test]
    fn overlong_varint_is_refused() {
        let mut buf = BytesMut::from(&[0xffu8; 11][..]);
        assert!(matches!(
            FrameDecoder::new(10).decode(&mut buf),
            Err(ProtoError::BadLength | ProtoError::FrameTooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0x80u8; 3][..]);
        assert!(FrameDecoder::new(10).decode(&mut buf).unwrap().is_none());
    }

    /// Fuzz crash `frame_decoder` 9d75dbff: with no limit (`usize::MAX`) a
    /// length prefix of `u64::MAX` overflowed `prefix + len` and panicked.
    #[test]
    fn fuzz_frame_decoder_9d75dbff_u64_max_length_with_no_limit() {
        let mut wire = vec![0xffu8; 9];
        wire.extend_from_slice(&[0x01, 0x06, 0x00, 0x00]);
        let dec = FrameDecoder::new(usize::MAX);
        let mut buf = BytesMut::from(&wire[..]);
        // Waiting for 2^64 - 1 bytes of body, or refused where usize is smaller.
        assert!(matches!(
            dec.decode(&mut buf),
            Ok(None) | Err(ProtoError::FrameTooLarge { .. })
        ));
        assert_eq!(&buf[..], &wire[..]);
        assert!(matches!(
            dec.decode_message::<pb::ClientFrame>(&mut buf),
            Ok(None) | Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip_any_bodies(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..20), split in 0usize..50_000) {
            let mut wire = BytesMut::new();
            for b in &bodies {
                encode_raw(b, &mut wire);
            }
            // Feed in two arbitrary pieces.
            let split = split.min(wire.len());
            let rest = wire.split_off(split);
            let dec = FrameDecoder::new(4096);
            let mut buf = wire;
            let mut got = Vec::new();
            while let Some(f) = dec.decode(&mut buf).unwrap() { got.push(f.to_vec()); }
            buf.extend_from_slice(&rest);
            while let Some(f) = dec.decode(&mut buf).unwrap() { got.push(f.to_vec()); }
            prop_assert_eq!(got, bodies);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let dec = FrameDecoder::new(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(body)) = dec.decode(&mut buf) {
                let _ = <pb::ClientFrame as Message>::decode(body.clone().freeze());
                let _ = <pb::ServerFrame as Message>::decode(body.freeze());
            }
        }
    }
}
