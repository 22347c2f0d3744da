//! The Switchboard Rust SDK, used by every client we ship (`sbchat`, the
//! load generator, the server's integration tests).
//!
//! It owns everything a device needs to talk to a Switchboard server:
//!
//! - [`endpoint`]: where the server is (`127.0.0.1:5222`, `tcp://…`, `ws://…/ws`);
//! - [`transport`]: the byte stream over TCP or binary WebSocket messages;
//! - [`connection`]: the Noise handshake and framed requests over one link, a
//!   low-level [`Connection`] for tests and benchmarks;
//! - [`register`]: phone verification and device linking, yielding
//!   [`Credentials`];
//! - [`client`]: the high-level [`Client`] — an actor that stays connected,
//!   re-authenticates, pings, pipelines sends through a local [`outbox`] and
//!   turns pushed queue entries into [`Event`]s;
//! - [`crypto`]: end-to-end encryption (vodozemac Olm sessions per device
//!   pair, key publishing, envelopes, safety numbers), kept encrypted at
//!   rest in [`ClientConfig::state_dir`];
//! - [`backoff`]: reconnect delays (exponential, full jitter).
//!
//! Every `send_to_*` is end-to-end encrypted for each device of the
//! recipient and each other device of the sender; the server only routes
//! ciphertext. [`Client::send`] still takes raw per-device payloads, for
//! tests and benchmarks.
//!
//! # Example
//!
//! ```no_run
//! use switchboard_client::{Client, ClientConfig, Endpoint, Event, register};
//!
//! # async fn demo() -> Result<(), switchboard_client::Error> {
//! let endpoint: Endpoint = "127.0.0.1:5222".parse()?;
//! let options = Default::default();
//! register::request_code(&endpoint, &options, "+15550001111").await?;
//! let creds = register::verify_code(&endpoint, &options, "+15550001111", "123456").await?;
//!
//! let mut config = ClientConfig::new(endpoint);
//! config.state_dir = Some("/var/lib/myapp/sb-state".into()); // keys and sessions
//! let (client, mut events) = Client::start(config, creds).await?;
//! let sent = client.send_to_phone("+15550002222", "hello".into()).await?; // ✓
//! println!("stored at {}", sent.server_ts_ms);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message { seq, payload, .. } = event {
//!         println!("{}", String::from_utf8_lossy(&payload));
//!         client.ack(vec![seq]).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod backoff;
pub mod client;
pub mod connection;
pub mod crypto;
pub mod endpoint;
mod error;
pub mod outbox;
mod recent;
pub mod register;
mod store;
pub mod transport;

pub use backoff::Backoff;
pub use client::{
    Client, ClientConfig, Device, Event, Events, MAX_PLAINTEXT_BYTES, Sent, new_client_msg_id,
};
pub use connection::{ConnectOptions, Connection};
pub use endpoint::Endpoint;
pub use error::{
    CloseReason, CryptoError, Error, ProtocolError, Result, ServerError, StorageError,
    TransportError, UsageError,
};
pub use register::Credentials;

/// Wire types re-exported from `switchboard-proto`, so users of the SDK need
/// no direct dependency on it.
pub use switchboard_proto::pb::{DevicePayload, ErrorCode, ReceiptKind, UserInfo};

/// The generated protocol types, for raw-frame tests and tools.
pub use switchboard_proto::pb;
