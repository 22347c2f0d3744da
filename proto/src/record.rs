//! Records: the outer framing of the byte stream. Each record is a 2-byte
//! big-endian length followed by one Noise message (at most 65,535 bytes, so
//! the length always fits and a record can never make us allocate more).

use bytes::{Buf, BufMut, BytesMut};

use crate::ProtoError;
use crate::limits::MAX_NOISE_MESSAGE_BYTES;

/// Bytes of framing per record.
pub const HEADER_BYTES: usize = 2;

/// Takes one whole record off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed.
///
/// # Errors
///
/// [`ProtoError::EmptyRecord`] for a zero-length record.
pub fn decode(buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtoError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len == 0 {
        return Err(ProtoError::EmptyRecord);
    }
    if buf.len() < HEADER_BYTES + len {
        buf.reserve(HEADER_BYTES + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    Ok(Some(buf.split_to(len)))
}

/// Appends one record holding `body` to `out`.
///
/// # Errors
///
/// [`ProtoError::Internal`] if `body` is empty or longer than a Noise message.
pub fn encode(body: &[u8], out: &mut BytesMut) -> Result<(), ProtoError> {
    let len = u16::try_from(body.len())
        .ok()
        .filter(|l| *l > 0 && usize::from(*l) <= MAX_NOISE_MESSAGE_BYTES)
        .ok_or(ProtoError::Internal("record body size out of range"))?;
    out.reserve(HEADER_BYTES + body.len());
    out.put_u16(len);
    out.put_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let mut out = BytesMut::new();
        encode(b"abc", &mut out).unwrap();
        assert_eq!(&out[..], b"\x00\x03abc");
    }

    #[test]
    fn partial_then_whole() {
        let mut buf = BytesMut::from(&b"\x00\x03ab"[..]);
        assert!(decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"c\x00\x01z");
        assert_eq!(&decode(&mut buf).unwrap().unwrap()[..], b"abc");
        assert_eq!(&decode(&mut buf).unwrap().unwrap()[..], b"z");
        assert!(decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn empty_record_is_an_error() {
        let mut buf = BytesMut::from(&b"\x00\x00"[..]);
        assert!(matches!(decode(&mut buf), Err(ProtoError::EmptyRecord)));
        assert!(encode(b"", &mut BytesMut::new()).is_err());
    }
}
