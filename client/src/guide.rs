//! How to write an application on the SDK: the event loop, what to
//! acknowledge, and what is stored where. (Documentation only.)
//!
//! The crate's `examples/echo_bot.rs` follows every rule below; its test
//! runs it against a real server.
//!
//! # Registering a device
//!
//! [`register::request_code`](crate::register::request_code), then
//! [`register::verify_code`](crate::register::verify_code) (or
//! [`register::link_device`](crate::register::link_device) for a second
//! device) with the device's state directory. They return the
//! [`Credentials`](crate::Credentials) — store them, they are shown once —
//! and have already created the device's identity in the state directory
//! and published its keys: peers can message it before it ever starts a
//! [`Client`](crate::Client).
//!
//! # The event loop
//!
//! [`Client::start`](crate::Client::start) returns the client and its
//! [`Events`](crate::Events). Drain the events for as long as the client
//! runs, with `events.recv().await` or as a `Stream`:
//!
//! ```no_run
//! # async fn demo(client: switchboard_client::Client, mut events: switchboard_client::Events) -> Result<(), switchboard_client::Error> {
//! use futures_util::StreamExt;
//! use switchboard_client::Event;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message { seq, from_user, payload, .. } => {
//!             // Awaiting here is fine, even a send.
//!             client.send_to_user(from_user, payload).await?;
//!             client.ack([seq]).await?;
//!         }
//!         Event::Receipt { seq, .. } => client.ack([seq]).await?,
//!         Event::Closed { .. } => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - Awaiting any client call inside the loop is safe: while the events
//!   channel ([`ClientConfig::event_capacity`](crate::ClientConfig::event_capacity))
//!   is full the client keeps reading the server's answers, and only sets
//!   pushed messages aside until the loop takes events again. The server
//!   keeps at most a bounded number of unacknowledged messages in flight
//!   per connection; past that it disconnects the device as a slow reader,
//!   so do not leave messages unacknowledged for long.
//! - [`Event::Closed`](crate::Event::Closed) is the last event; the
//!   client does not reconnect after it.
//! - Connection trouble is not an error of the loop: it shows up as
//!   [`Event::Disconnected`](crate::Event::Disconnected) and the client
//!   reconnects by itself.
//!
//! # Acknowledging
//!
//! Messages and receipts are queue entries the server keeps for this device
//! until they are acknowledged with [`Client::ack`](crate::Client::ack), and
//! hands over again on every connection until then (for up to 30 days).
//! It takes the [`Seq`](crate::Seq) an event carries: queue positions,
//! accounts ([`UserId`](crate::UserId)) and devices
//! ([`DeviceId`](crate::DeviceId)) are distinct types (see [`crate::ids`]),
//! so passing the sender where its message's position belongs does not
//! compile.
//!
//! - Acknowledge a message once it is safely handled (stored, shown,
//!   answered). Acknowledging tells its sender ✓✓ (delivered).
//! - Acknowledge receipts too, once seen: they are queue entries like
//!   messages, and an unacknowledged receipt comes back on every connect.
//! - Events the client handles itself (devices changed, undecryptable
//!   messages, unknown kinds) are already acknowledged.
//! - Work that may be repeated after a crash (handled, then crashed before
//!   the ack) should be idempotent: answer with
//!   [`Client::send_to_user_with_id`](crate::Client::send_to_user_with_id)
//!   and an id derived from the message, so a repeat is a duplicate the
//!   server ignores.
//!
//! # Sending
//!
//! A send resolves on ✓: the server stored it for every recipient device.
//! Until then it sits in the outbox and is retried across reconnects (and,
//! with [`ClientConfig::outbox_dir`](crate::ClientConfig::outbox_dir),
//! across restarts). Dropping the future does not cancel it; its outcome is
//! then reported as [`Event::Sent`](crate::Event::Sent) or
//! [`Event::SendFailed`](crate::Event::SendFailed). A stopped client's
//! pending sends can be listed and cancelled with
//! [`Outbox`](crate::Outbox).
//!
//! A message that was waiting for a contact's old devices when the contact
//! re-registered comes back as [`Event::Undelivered`](crate::Event::Undelivered):
//! the client sends it once more, same id, to the new devices (sent
//! messages are kept until their ✓✓ for that; in `outbox_dir/sent/` when
//! there is an outbox directory), after reporting the contact's new keys.
//! Changes of a contact's devices come as
//! [`Event::ContactDevicesChanged`](crate::Event::ContactDevicesChanged) and
//! [`Event::SafetyNumberChanged`](crate::Event::SafetyNumberChanged): show
//! them in the conversation.
//!
//! [`Error::is_retryable`](crate::Error::is_retryable) says whether the same
//! call may succeed later (e.g. a recipient device that has not published
//! its keys yet, a rate limit, a lost connection).
//!
//! # Storage
//!
//! - [`ClientConfig::state_dir`](crate::ClientConfig::state_dir): the
//!   device's identity keys, Olm sessions and de-duplication window,
//!   encrypted at rest under `state.key` beside them. Keep it for the life
//!   of the device: a device that loses it must register or link again.
//!   It is created mode 0700 with files 0600, and locked while in use: one
//!   client (or [`Outbox`](crate::Outbox)) per directory at a time;
//!   another gets [`UsageError::StateDirInUse`](crate::UsageError::StateDirInUse).
//! - [`ClientConfig::outbox_dir`](crate::ClientConfig::outbox_dir): one
//!   file per pending send, sealed with the state key (unsent messages are
//!   not yet end-to-end encrypted), mode 0600 in a 0700 directory. It needs
//!   a `state_dir`; a subdirectory of it is a good place.
//! - The key beside the state protects files copied alone (backups, sync
//!   tools), not an attacker who can read the whole directory.
//! - Keep [`Credentials`](crate::Credentials) whole, `server_key` included:
//!   it pins the server's key seen at registration, and a server presenting
//!   another is refused before the credential is sent
//!   ([`CloseReason::ServerKeyMismatch`](crate::CloseReason::ServerKeyMismatch)).
//!   Credentials without one pin the first key seen, kept in `state_dir`.
