//! The Switchboard Rust SDK, used by every client we ship (`sbchat`, the
//! load generator, the server's integration tests).
//!
//! It owns everything a device needs to talk to a Switchboard server:
//!
//! - [`endpoint`]: where the server is (`127.0.0.1:5222`, `tcp://…`, `ws://…/ws`);
//! - [`ids`]: typed ids ([`UserId`], [`DeviceId`], [`Seq`]), so an account
//!   cannot be passed where a queue position is expected;
//! - [`register`]: phone verification and device linking, yielding
//!   [`Credentials`] and publishing the new device's keys;
//! - [`client`]: the high-level [`Client`] — an actor that stays connected,
//!   re-authenticates, pings, pipelines sends through a local outbox and
//!   turns pushed queue entries into [`Event`]s (a [`Stream`] of them:
//!   [`Events`]);
//! - [`Outbox`]: the pending sends of a stopped client, to list or cancel;
//! - [`crypto`]: end-to-end encryption (vodozemac Olm sessions per device
//!   pair, key publishing, safety numbers), kept encrypted at rest in
//!   [`ClientConfig::state_dir`], which one client at a time may use;
//! - [`backoff`]: reconnect delays (exponential, full jitter).
//!
//! Every `send_to_*` is end-to-end encrypted for each device of the
//! recipient and each other device of the sender; the server only routes
//! ciphertext. [`Client::send`] still takes raw per-device payloads, for
//! tests and benchmarks.
//!
//! Read the [`guide`] before writing an application: the event loop, what
//! to acknowledge, and what is stored where.
//!
//! The transport, the raw connection and the wire types (`pb`) are public
//! for the bench crate and the tests, hidden from these docs, and not part
//! of the supported surface.
//!
//! [`Stream`]: futures_util::Stream
//!
//! # Example
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use switchboard_client::{Client, ClientConfig, Endpoint, Event, register};
//!
//! # async fn demo() -> Result<(), switchboard_client::Error> {
//! let endpoint: Endpoint = "127.0.0.1:5222".parse()?;
//! let options = Default::default();
//! let state_dir = "/var/lib/myapp/sb-state"; // keys, sessions, outbox
//! register::request_code(&endpoint, &options, "+15550001111").await?;
//! let creds =
//!     register::verify_code(&endpoint, &options, "+15550001111", "123456", state_dir).await?;
//!
//! let mut config = ClientConfig::new(endpoint);
//! config.state_dir = Some(state_dir.into());
//! config.outbox_dir = Some(format!("{state_dir}/outbox").into());
//! let (client, mut events) = Client::start(config, creds).await?;
//! let sent = client.send_to_phone("+15550002222", "hello".into()).await?; // ✓
//! println!("stored at {}", sent.server_ts_ms);
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message { seq, payload, .. } => {
//!             println!("{}", String::from_utf8_lossy(&payload));
//!             client.ack([seq]).await?; // handled: the server may delete it
//!         }
//!         Event::Receipt { seq, kind, client_msg_ids, .. } => {
//!             println!("{kind:?}: {client_msg_ids:?}");
//!             client.ack([seq]).await?; // receipts are queue entries too
//!         }
//!         Event::Closed { .. } => break,
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod backoff;
pub mod client;
#[doc(hidden)]
pub mod connection;
pub mod crypto;
pub mod endpoint;
mod error;
pub mod guide;
pub mod ids;
#[doc(hidden)]
pub mod outbox;
mod recent;
pub mod register;
mod store;
#[doc(hidden)]
pub mod transport;

pub use backoff::Backoff;
pub use client::{
    Client, ClientConfig, Device, Event, Events, Group, GroupChange, GroupChangeKind, GroupMember,
    GroupRole, GroupSummary, MAX_GROUP_MEMBERS, MAX_PLAINTEXT_BYTES, NewGroup, Sent, UserInfo,
    new_client_msg_id,
};
pub use connection::ConnectOptions;
#[doc(hidden)]
pub use connection::Connection;
pub use endpoint::Endpoint;
pub use error::{
    CloseReason, CryptoError, Error, ProtocolError, Result, ServerError, StorageError,
    TransportError, UsageError,
};
pub use ids::{DeviceId, GroupId, Seq, UserId};
pub use outbox::{Outbox, QueuedSend};
pub use register::Credentials;

/// Wire types re-exported from `switchboard-proto`, so users of the SDK need
/// no direct dependency on it.
pub use switchboard_proto::pb::{CodeSent, DevicePayload, ErrorCode, LinkCode, ReceiptKind};

/// The generated protocol types, for raw-frame tests and tools.
#[doc(hidden)]
pub use switchboard_proto::pb;
