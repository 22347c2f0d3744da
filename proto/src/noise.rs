//! The Noise handshake: `Noise_XX_25519_ChaChaPoly_BLAKE2s`, the pattern
//! WhatsApp uses, via the `snow` crate.
//!
//! XX authenticates the server's static key to the client (who may pin it)
//! and gives forward secrecy. The client's static key is not an account
//! credential: accounts authenticate inside the encrypted session. The
//! stream's [`crate::PREAMBLE`] is the Noise prologue, so a man in the middle
//! cannot alter it unnoticed.

use bytes::BytesMut;

use crate::session::Session;
use crate::{PREAMBLE, ProtoError, record};

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// Length of an X25519 key.
pub const KEY_BYTES: usize = 32;

/// A static X25519 key pair.
#[derive(Clone)]
pub struct Keypair {
    /// The private half; keep it secret.
    pub private: Vec<u8>,
    /// The public half; clients may pin the server's.
    pub public: Vec<u8>,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn builder() -> Result<snow::Builder<'static>, ProtoError> {
    let params = PATTERN
        .parse()
        .map_err(|_| ProtoError::Internal("noise pattern does not parse"))?;
    // X25519 and ChaChaPoly from aws-lc-rs (2x and 3-7x faster, see
    // `aws_lc`), BLAKE2s and randomness from snow's default resolver.
    Ok(snow::Builder::with_resolver(
        params,
        Box::new(snow::resolvers::FallbackResolver::new(
            Box::new(crate::aws_lc::Resolver),
            Box::new(snow::resolvers::DefaultResolver),
        )),
    ))
}

/// Generates a fresh static key pair from the OS random source.
///
/// # Errors
///
/// [`ProtoError::Noise`] if no randomness is available.
pub fn generate_keypair() -> Result<Keypair, ProtoError> {
    let kp = builder()?.generate_keypair()?;
    Ok(Keypair {
        private: kp.private.to_vec(),
        public: kp.public.to_vec(),
    })
}

/// One side of a handshake in progress.
pub struct Handshake {
    state: snow::HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").finish_non_exhaustive()
    }
}

impl Handshake {
    /// The client side, with the client's static private key.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] for a malformed key.
    pub fn initiator(local_private: &[u8]) -> Result<Self, ProtoError> {
        let state = builder()?
            .local_private_key(local_private)?
            .prologue(PREAMBLE)?
            .build_initiator()?;
        Ok(Self { state })
    }

    /// The server side, with the server's static private key.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] for a malformed key.
    pub fn responder(local_private: &[u8]) -> Result<Self, ProtoError> {
        let state = builder()?
            .local_private_key(local_private)?
            .prologue(PREAMBLE)?
            .build_responder()?;
        Ok(Self { state })
    }

    /// Writes the next handshake message carrying `payload` as one record
    /// appended to `out`.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] if it is not our turn or the payload is too big.
    pub fn write_message(&mut self, payload: &[u8], out: &mut BytesMut) -> Result<(), ProtoError> {
        let mut buf = vec![0u8; crate::limits::MAX_NOISE_MESSAGE_BYTES];
        let n = self.state.write_message(payload, &mut buf)?;
        record::encode(
            buf.get(..n).ok_or(ProtoError::Internal("noise overran"))?,
            out,
        )
    }

    /// Reads the peer's next handshake message (one record body) and returns
    /// its payload.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Noise`] if the message is invalid or out of turn.
    pub fn read_message(&mut self, record: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut buf = vec![0u8; record.len()];
        let n = self.state.read_message(record, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The peer's static public key, once the handshake has revealed it.
    #[must_use]
    pub fn remote_static(&self) -> Option<Vec<u8>> {
        self.state.get_remote_static().map(<[u8]>::to_vec)
    }

    /// True once all handshake messages have been exchanged.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// Turns a finished handshake into a transport session.
    ///
    /// # Errors
    ///
    /// [`ProtoError::HandshakeState`] if the handshake is not finished.
    pub fn into_session(self, max_frame_bytes: usize) -> Result<Session, ProtoError> {
        if !self.state.is_handshake_finished() {
            return Err(ProtoError::HandshakeState);
        }
        let remote = self.remote_static();
        let transport = self.state.into_transport_mode()?;
        Ok(Session::new(transport, remote, max_frame_bytes))
    }
}
