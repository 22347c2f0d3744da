//! The Switchboard wire protocol, shared by the server and every client.
//!
//! It owns the message schema (`pb`, generated from `schema/switchboard.proto`),
//! the byte framing (`record`, `frame`), the Noise handshake and transport
//! (`noise`), the versioning rules (`version`) and the size limits (`limits`).
//!
//! This crate is sans-I/O in the manner of rustls and quinn-proto: it never
//! touches a socket, a clock or an async runtime. Callers feed it bytes and
//! get frames back, which keeps it deterministic, fuzzable and identical on
//! both ends of the wire.
//!
//! The layering on the wire is:
//!
//! ```text
//! stream   = PREAMBLE record*
//! record   = u16-be length, Noise message (handshake or transport)
//! plaintext of transport records = frame*  (frames may span records)
//! frame    = varint length, protobuf ClientFrame | ServerFrame
//! ```
#![deny(missing_docs)]

mod aws_lc;
pub mod frame;
pub mod limits;
pub mod noise;
pub mod record;
pub mod session;
pub mod version;

mod error;

pub use error::ProtoError;
pub use session::Session;

/// Message types generated from `schema/switchboard.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
}

/// The first bytes a client sends on a new stream: "SWB" and the framing
/// generation. The protocol version proper is negotiated in the handshake.
pub const PREAMBLE: &[u8; 4] = b"SWB\x01";
