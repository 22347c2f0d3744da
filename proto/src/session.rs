//! An established, encrypted session: frames in, frames out.
//!
//! Outgoing frames are queued as plaintext and sealed into as few records as
//! possible by [`Session::seal`], so many small frames cost one write.
//! Buffers start empty and are released when drained, so an idle session
//! holds only the cipher state.

use bytes::{BufMut, BytesMut};
use prost::Message;

use crate::frame::{self, FrameDecoder};
use crate::limits::{MAX_RECORD_PLAINTEXT_BYTES, NOISE_TAG_BYTES};
use crate::{ProtoError, record};

/// Buffers larger than this are freed, not kept, once empty. Zero: an idle
/// session holds no buffer at all (allocation per burst is cheaper than
/// memory per idle connection).
const KEEP_BUFFER_BYTES: usize = 0;

/// An encrypted session after the Noise handshake.
pub struct Session {
    transport: snow::TransportState,
    remote_static: Option<Vec<u8>>,
    decoder: FrameDecoder,
    /// Decrypted bytes not yet taken as frames.
    plain_in: BytesMut,
    /// Encoded frames not yet sealed.
    plain_out: BytesMut,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("plain_in", &self.plain_in.len())
            .field("plain_out", &self.plain_out.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        transport: snow::TransportState,
        remote_static: Option<Vec<u8>>,
        max_frame_bytes: usize,
    ) -> Self {
        Self {
            transport,
            remote_static,
            decoder: FrameDecoder::new(max_frame_bytes),
            plain_in: BytesMut::new(),
            plain_out: BytesMut::new(),
        }
    }

    /// The peer's static public key.
    #[must_use]
    pub fn remote_static(&self) -> Option<&[u8]> {
        self.remote_static.as_deref()
    }

    /// Decrypts one whole record from the front of `wire`, if there is one.
    ///
    /// Returns `Ok(false)` when `wire` holds no complete record. Call
    /// [`Session::next_frame`] after each record so an oversized frame is
    /// refused before its body is buffered.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] when decryption fails (tampering, wrong key).
    pub fn read_record(&mut self, wire: &mut BytesMut) -> Result<bool, ProtoError> {
        let Some(rec) = record::decode(wire)? else {
            return Ok(false);
        };
        let start = self.plain_in.len();
        self.plain_in.resize(start + rec.len(), 0);
        let out = self
            .plain_in
            .get_mut(start..)
            .ok_or(ProtoError::Internal("plaintext buffer"))?;
        let n = self.transport.read_message(&rec, out)?;
        self.plain_in.truncate(start + n);
        Ok(true)
    }

    /// Takes the next whole frame's bytes from the decrypted stream.
    ///
    /// # Errors
    ///
    /// [`ProtoError::FrameTooLarge`] as soon as a too-long length is seen.
    pub fn next_frame_bytes(&mut self) -> Result<Option<BytesMut>, ProtoError> {
        let frame = self.decoder.decode(&mut self.plain_in)?;
        if self.plain_in.is_empty() && self.plain_in.capacity() > KEEP_BUFFER_BYTES {
            self.plain_in = BytesMut::new();
        }
        Ok(frame)
    }

    /// Takes and decodes the next whole frame.
    ///
    /// # Errors
    ///
    /// As [`Session::next_frame_bytes`], plus [`ProtoError::Decode`].
    pub fn next_frame<M: Message + Default>(&mut self) -> Result<Option<M>, ProtoError> {
        match self.next_frame_bytes()? {
            Some(body) => Ok(Some(M::decode(body.freeze())?)),
            None => Ok(None),
        }
    }

    /// Reads records from `wire` until a whole frame is available or `wire`
    /// runs dry.
    ///
    /// # Errors
    ///
    /// As [`Session::read_record`] and [`Session::next_frame`].
    pub fn poll_frame<M: Message + Default>(
        &mut self,
        wire: &mut BytesMut,
    ) -> Result<Option<M>, ProtoError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(Some(frame));
            }
            if !self.read_record(wire)? {
                return Ok(None);
            }
        }
    }

    /// Decrypted bytes held that do not yet make a whole frame: a peer that
    /// keeps this above zero for long is trickling a frame in.
    #[must_use]
    pub fn partial_frame_bytes(&self) -> usize {
        self.plain_in.len()
    }

    /// Queues one frame for the next [`Session::seal`].
    pub fn queue<M: Message>(&mut self, msg: &M) {
        frame::encode(msg, &mut self.plain_out);
    }

    /// Queues one frame whose protobuf bytes are already encoded.
    pub fn queue_raw(&mut self, body: &[u8]) {
        frame::encode_raw(body, &mut self.plain_out);
    }

    /// Queues plaintext bytes with no frame length in front of them. Only a
    /// test or a fuzzer wants this: it lets one send a bare or lying length
    /// prefix to check how the peer reacts.
    pub fn queue_unframed(&mut self, bytes: &[u8]) {
        self.plain_out.extend_from_slice(bytes);
    }

    /// Bytes queued and not yet sealed.
    #[must_use]
    pub fn pending_bytes(&self) -> usize {
        self.plain_out.len()
    }

    /// Encrypts everything queued into records appended to `out`.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] if the cipher fails (nonce exhaustion).
    pub fn seal(&mut self, out: &mut BytesMut) -> Result<(), ProtoError> {
        // Each record is encrypted straight into `out` behind its length
        // (no scratch buffer: zeroing 64 KiB per write was 2% of a busy
        // server's CPU).
        for chunk in self.plain_out.chunks(MAX_RECORD_PLAINTEXT_BYTES) {
            let n = chunk.len() + NOISE_TAG_BYTES;
            let len = u16::try_from(n).map_err(|_| ProtoError::Internal("record too long"))?;
            let start = out.len();
            out.reserve(record::HEADER_BYTES + n);
            out.put_u16(len);
            out.resize(start + record::HEADER_BYTES + n, 0);
            let body = out
                .get_mut(start + record::HEADER_BYTES..)
                .ok_or(ProtoError::Internal("record buffer"))?;
            let written = self.transport.write_message(chunk, body);
            if !matches!(written, Ok(w) if w == n) {
                // Leave no half-written record behind.
                out.truncate(start);
                written?;
                return Err(ProtoError::Internal("noise wrote an unexpected length"));
            }
        }
        self.plain_out.clear();
        if self.plain_out.capacity() > KEEP_BUFFER_BYTES {
            self.plain_out = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::{Handshake, generate_keypair};
    use crate::pb;

    fn pair() -> (Session, Session) {
        let server_key = generate_keypair().unwrap();
        let client_key = generate_keypair().unwrap();
        let mut client = Handshake::initiator(&client_key.private).unwrap();
        let mut server = Handshake::responder(&server_key.private).unwrap();
        let mut wire = BytesMut::new();
        client.write_message(b"hello", &mut wire).unwrap();
        let rec = record::decode(&mut wire).unwrap().unwrap();
        assert_eq!(server.read_message(&rec).unwrap(), b"hello");
        server.write_message(b"welcome", &mut wire).unwrap();
        let rec = record::decode(&mut wire).unwrap().unwrap();
        assert_eq!(client.read_message(&rec).unwrap(), b"welcome");
        assert_eq!(client.remote_static().unwrap(), server_key.public);
        client.write_message(b"", &mut wire).unwrap();
        let rec = record::decode(&mut wire).unwrap().unwrap();
        server.read_message(&rec).unwrap();
        (
            client.into_session(1 << 20).unwrap(),
            server.into_session(1 << 20).unwrap(),
        )
    }

    #[test]
    fn frames_cross_records_both_ways() {
        let (mut client, mut server) = pair();
        let big = pb::ClientFrame {
            id: 1,
            body: Some(pb::client_frame::Body::Send(pb::Send {
                client_msg_id: "m1".into(),
                to_user: 9,
                payloads: vec![pb::DevicePayload {
                    device_id: 1,
                    payload: vec![7u8; 200_000].into(),
                }],
                ..Default::default()
            })),
        };
        client.queue(&big);
        client.queue(&pb::ClientFrame {
            id: 2,
            body: Some(pb::client_frame::Body::Ping(pb::Ping {})),
        });
        let mut wire = BytesMut::new();
        client.seal(&mut wire).unwrap();
        // Deliver the bytes in small pieces.
        let mut inbox = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(1000) {
            inbox.extend_from_slice(piece);
            while let Some(f) = server.poll_frame::<pb::ClientFrame>(&mut inbox).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], big);
        assert_eq!(got[1].id, 2);

        server.queue(&pb::ServerFrame {
            id: 2,
            body: Some(pb::server_frame::Body::Pong(pb::Pong { server_time_ms: 5 })),
        });
        let mut wire = BytesMut::new();
        server.seal(&mut wire).unwrap();
        let f: pb::ServerFrame = client.poll_frame(&mut wire).unwrap().unwrap();
        assert_eq!(f.id, 2);
    }

    #[test]
    fn oversized_frame_refused_after_first_record() {
        let (mut client, server) = pair();
        let mut server = server;
        server.decoder = FrameDecoder::new(1000);
        client.queue_raw(&vec![1u8; 100_000]);
        let mut wire = BytesMut::new();
        client.seal(&mut wire).unwrap();
        // Only the first record is needed to refuse it.
        let first_len = 2 + usize::from(u16::from_be_bytes([wire[0], wire[1]]));
        let mut first = wire.split_to(first_len);
        let err = server
            .poll_frame::<pb::ClientFrame>(&mut first)
            .unwrap_err();
        assert!(matches!(
            err,
            ProtoError::FrameTooLarge {
                len: 100_000,
                max: 1000
            }
        ));
    }

    #[test]
    fn tampered_record_is_rejected() {
        let (mut client, mut server) = pair();
        client.queue(&pb::ClientFrame::default());
        let mut wire = BytesMut::new();
        client.seal(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(matches!(
            server.poll_frame::<pb::ClientFrame>(&mut wire),
            Err(ProtoError::Noise(_))
        ));
    }
}
