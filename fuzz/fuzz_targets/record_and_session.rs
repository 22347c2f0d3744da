//! Arbitrary bytes into `record::decode` and into an established `Session`
//! (`read_record` via `poll_frame`), as the server's read loop drives it.
//!
//! Each run builds a fresh client/server pair from one Noise handshake with
//! fixed static keys (the ephemeral keys are random, which only changes the
//! ciphertext), then, by the first byte:
//! - raw bytes from the network go to the server: none may ever come out as
//!   a frame, since they are not sealed with the session key;
//! - the bytes are the plaintext stream a genuine peer seals, records cut
//!   at a chosen size: the session must yield exactly the frames, and the
//!   error, that a `FrameDecoder` yields on the same plaintext, however the
//!   records are delivered (both directions);
//! - the same, with one bit flipped in transit: whatever frames come out
//!   are a prefix of the untampered ones.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchboard_proto::frame::FrameDecoder;
use switchboard_proto::limits::{DEFAULT_MAX_FRAME_BYTES, MAX_NOISE_MESSAGE_BYTES};
use switchboard_proto::noise::Handshake;
use switchboard_proto::{Session, pb, record};

/// Fixed static keys: any 32 bytes are an X25519 private key.
const CLIENT_KEY: [u8; 32] = [1; 32];
const SERVER_KEY: [u8; 32] = [2; 32];

/// A frame limit small enough that "too large" is reachable with short
/// inputs; the default limit is tried too.
const SMALL_MAX_FRAME_BYTES: usize = 1024;

/// What a reader made of a stream: the frames, then the error if any.
type Outcome<M> = (Vec<M>, Option<String>);

fuzz_target!(|data: &[u8]| {
    records(data);

    let [mode, piece, chunk, rest @ ..] = data else {
        return;
    };
    let max = if mode & 4 == 0 {
        SMALL_MAX_FRAME_BYTES
    } else {
        DEFAULT_MAX_FRAME_BYTES
    };
    // Delivery size (the socket's reads) and plaintext bytes per record.
    let piece = usize::from(*piece) + 1;
    let chunk = usize::from(*chunk) * 16 + 1;
    let (mut client, mut server) = pair(max);
    match mode % 4 {
        0 => {
            let (frames, _) = deliver::<pb::ClientFrame>(&mut server, rest, piece);
            assert!(frames.is_empty(), "unsealed bytes came out as a frame");
        }
        1 => {
            let wire = seal(&mut client, rest, chunk);
            let got = deliver::<pb::ClientFrame>(&mut server, &wire, piece);
            assert_eq!(got, reference(max, rest));
        }
        2 => {
            let wire = seal(&mut server, rest, chunk);
            let got = deliver::<pb::ServerFrame>(&mut client, &wire, piece);
            assert_eq!(got, reference(max, rest));
        }
        _ => {
            let mut wire = seal(&mut client, rest, chunk);
            if wire.is_empty() {
                return;
            }
            let at = (piece * 256 + chunk) % wire.len();
            wire[at] ^= 1 << (mode >> 5);
            let (frames, _) = deliver::<pb::ClientFrame>(&mut server, &wire, piece);
            let (expected, _) = reference::<pb::ClientFrame>(max, rest);
            assert!(
                expected.starts_with(&frames),
                "a tampered record gave a frame"
            );
        }
    }
});

/// Every record in `data`: none is empty or longer than a Noise message, and
/// each takes exactly its header and body off the buffer.
fn records(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match record::decode(&mut buf) {
            Ok(Some(body)) => {
                assert!(!body.is_empty() && body.len() <= MAX_NOISE_MESSAGE_BYTES);
                assert_eq!(before - buf.len(), record::HEADER_BYTES + body.len());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                return;
            }
            Err(_) => return,
        }
    }
}

/// A client and a server session after a complete XX handshake.
fn pair(max_frame_bytes: usize) -> (Session, Session) {
    let mut client = Handshake::initiator(&CLIENT_KEY).expect("client handshake");
    let mut server = Handshake::responder(&SERVER_KEY).expect("server handshake");
    let mut wire = BytesMut::new();
    for turn in 0..3 {
        let (from, to) = if turn % 2 == 0 {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        from.write_message(&[], &mut wire).expect("handshake write");
        let rec = record::decode(&mut wire)
            .expect("record")
            .expect("whole record");
        to.read_message(&rec).expect("handshake read");
    }
    (
        client
            .into_session(max_frame_bytes)
            .expect("client session"),
        server
            .into_session(max_frame_bytes)
            .expect("server session"),
    )
}

/// `plaintext` sealed by `from`, `chunk` bytes per record.
fn seal(from: &mut Session, plaintext: &[u8], chunk: usize) -> BytesMut {
    let mut wire = BytesMut::new();
    for part in plaintext.chunks(chunk) {
        from.queue_unframed(part);
        from.seal(&mut wire).expect("seal");
    }
    wire
}

/// `wire` handed to `to` `piece` bytes at a time, polling after each read
/// as the server does, until the first error.
fn deliver<M: Message + Default>(to: &mut Session, wire: &[u8], piece: usize) -> Outcome<M> {
    let mut inbox = BytesMut::new();
    let mut frames = Vec::new();
    for part in wire.chunks(piece) {
        inbox.extend_from_slice(part);
        loop {
            match to.poll_frame::<M>(&mut inbox) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, None)
}

/// What a bare frame decoder makes of the whole plaintext at once.
fn reference<M: Message + Default>(max_frame_bytes: usize, plaintext: &[u8]) -> Outcome<M> {
    let decoder = FrameDecoder::new(max_frame_bytes);
    let mut buf = BytesMut::from(plaintext);
    let mut frames = Vec::new();
    loop {
        match decoder.decode_message::<M>(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e.to_string())),
        }
    }
}
