//! Arbitrary bytes into `frame::FrameDecoder`, whole and split in two.
//!
//! It must never panic, never hand out a frame longer than its maximum, and
//! give the same frames, the same error and the same leftover bytes however
//! the stream is cut (the socket decides that, not the peer's framing).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchboard_proto::frame::FrameDecoder;
use switchboard_proto::limits::DEFAULT_MAX_FRAME_BYTES;
use switchboard_proto::{ProtoError, pb};

/// Longest LEB128 length prefix.
const MAX_PREFIX_BYTES: usize = 10;

fuzz_target!(|data: &[u8]| {
    // Two bytes pick a small maximum, so "too large" is reachable with short
    // inputs; two more pick where the stream is cut.
    let [a, b, c, d, stream @ ..] = data else {
        return;
    };
    let small_max = usize::from(u16::from_le_bytes([*a, *b]));
    let cut = usize::from(u16::from_le_bytes([*c, *d])).min(stream.len());
    // The server's default, and "no limit" (any `usize` is a valid maximum).
    for decoder in [
        FrameDecoder::new(small_max),
        FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES),
        FrameDecoder::new(usize::MAX),
    ] {
        let whole = bodies(&decoder, &[stream]);
        let (head, tail) = stream.split_at(cut);
        assert_eq!(whole, bodies(&decoder, &[head, tail]));
        messages::<pb::ClientFrame>(&decoder, head, tail);
        messages::<pb::ServerFrame>(&decoder, head, tail);
    }
});

/// What a decoder made of a stream: the frame bodies, the error that ended
/// it if any, and the bytes it had not consumed.
type Outcome = (Vec<Vec<u8>>, Option<String>, Vec<u8>);

/// Feeds `pieces` in turn, taking every whole frame after each.
fn bodies(decoder: &FrameDecoder, pieces: &[&[u8]]) -> Outcome {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(body)) => {
                    assert!(body.len() <= decoder.max_frame_bytes());
                    got.push(body.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    let mut rest = buf.to_vec();
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| rest.extend_from_slice(p));
                    return (got, Some(e.to_string()), rest);
                }
            }
        }
    }
    (got, None, buf.to_vec())
}

/// `decode_message` as the server's read loop calls it: the head, then the
/// tail appended. A frame that is not a valid `M` is consumed and skipped.
fn messages<M: Message + Default>(decoder: &FrameDecoder, head: &[u8], tail: &[u8]) {
    let mut buf = BytesMut::from(head);
    for piece in [&[][..], tail] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode_message::<M>(&mut buf) {
                Ok(Some(_)) | Err(ProtoError::Decode(_)) => {
                    let taken = before - buf.len();
                    let most = decoder.max_frame_bytes().saturating_add(MAX_PREFIX_BYTES);
                    assert!(taken > 0 && taken <= most);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}
