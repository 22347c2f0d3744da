//! Per-recipient order under refusals.
//!
//! A device's sends to one user are stored in the order they reach the
//! shard. When one is refused with a retryable error (the shard was
//! overloaded, the commit failed, the recipient's queue was full), a later
//! send may still be accepted, and the refused one's retry would then land
//! after it. So the shard remembers the refusal: until the refused message
//! is sent again (same client message id), every later send of that device
//! to that user is refused the same way. The retry clears the hold and is
//! handled as usual; the later sends, retried after it, follow in order.
//!
//! Group messages are held the same way, per sending device and group
//! (`Part::Group`), on the group's shard.
//!
//! A hold lapses after [`HOLD_TTL_MS`] (a client that gave the message up
//! must not be blocked for good) and the map is bounded
//! ([`MAX_HOLDS`]). Holds live in the memory of the shard that owns the
//! part (the recipient's shard for the recipient's copy, the sender's for
//! its own devices' copies); a restart drops them, and the sender's client
//! resends its unacknowledged messages in order on reconnect anyway.

use super::RouteError;
use crate::FastMap;
use crate::store::{DeviceKey, UserId};

/// How long a hold lasts without the refused message coming back: longer
/// than any retry hint the server gives (60 s for QUEUE_FULL), so a client
/// that retries as told always finds it.
pub const HOLD_TTL_MS: u64 = 120_000;

/// Holds kept at most per shard; past it, lapsed ones go first, then any.
pub const MAX_HOLDS: usize = 100_000;

/// Which copy of a send: the recipient's, or the sender's other devices'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The recipient's devices.
    Peer,
    /// The sender's other devices.
    Own,
    /// A group's members (the key's user id is the group's id).
    Group,
}

/// Why sends are held: the refusal they repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBy {
    /// The shard was overloaded.
    Overloaded,
    /// The commit failed.
    Unavailable,
    /// A recipient device's queue was full.
    QueueFull,
}

#[derive(Debug)]
struct Hold {
    client_msg_id: String,
    by: HeldBy,
    retry_after_ms: u64,
    until_ms: u64,
}

/// The holds of one shard.
#[derive(Debug, Default)]
pub struct Holds {
    map: FastMap<(DeviceKey, UserId, Part), Hold>,
}

impl Holds {
    /// Holds later sends of `from` to `to` after the refusal of
    /// `client_msg_id`. A hold already there for another message stays: it
    /// names the earliest refused message, which must come back first.
    pub fn hold(
        &mut self,
        key: (DeviceKey, UserId, Part),
        client_msg_id: &str,
        by: HeldBy,
        retry_after_ms: u64,
        now_ms: u64,
    ) {
        if let Some(h) = self.map.get_mut(&key) {
            if h.until_ms > now_ms && h.client_msg_id != client_msg_id {
                return;
            }
            h.by = by;
            h.retry_after_ms = retry_after_ms;
            h.until_ms = now_ms + HOLD_TTL_MS;
            client_msg_id.clone_into(&mut h.client_msg_id);
            return;
        }
        if self.map.len() >= MAX_HOLDS {
            self.map.retain(|_, h| h.until_ms > now_ms);
            if self.map.len() >= MAX_HOLDS
                && let Some(k) = self.map.keys().next().copied()
            {
                self.map.remove(&k);
            }
        }
        self.map.insert(
            key,
            Hold {
                client_msg_id: client_msg_id.to_owned(),
                by,
                retry_after_ms,
                until_ms: now_ms + HOLD_TTL_MS,
            },
        );
    }

    /// Whether a send may go on: the refused message itself clears its
    /// hold; any other is refused while the hold lasts.
    ///
    /// # Errors
    /// [`RouteError::OrderHeld`] while an earlier refused message has not
    /// come back.
    pub fn check(
        &mut self,
        key: (DeviceKey, UserId, Part),
        client_msg_id: &str,
        now_ms: u64,
    ) -> Result<(), RouteError> {
        if self.map.is_empty() {
            return Ok(());
        }
        let Some(h) = self.map.get(&key) else {
            return Ok(());
        };
        if h.until_ms <= now_ms || h.client_msg_id == client_msg_id {
            self.map.remove(&key);
            return Ok(());
        }
        Err(RouteError::OrderHeld {
            by: h.by,
            retry_after_ms: h.retry_after_ms,
        })
    }

    /// Clears the hold of `key` if it names `client_msg_id`: that
    /// message was answered after all (its retry found it stored, as a
    /// cluster backend may leave a failed commit's writes in place).
    pub fn release(&mut self, key: (DeviceKey, UserId, Part), client_msg_id: &str) {
        if self
            .map
            .get(&key)
            .is_some_and(|h| h.client_msg_id == client_msg_id)
        {
            self.map.remove(&key);
        }
    }

    /// Holds kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DeviceKey = DeviceKey { user: 1, device: 1 };

    #[test]
    fn a_held_message_answered_as_a_duplicate_releases_its_hold() {
        let mut h = Holds::default();
        let key = (A, 2, Part::Peer);
        h.hold(key, "m1", HeldBy::Unavailable, 1_000, 0);
        // Another message's duplicate answer leaves the hold in place.
        h.release(key, "m0");
        assert!(h.check(key, "m2", 10).is_err());
        h.release(key, "m1");
        assert!(h.check(key, "m2", 10).is_ok());
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_refused_message_holds_later_ones_until_it_comes_back() {
        let mut h = Holds::default();
        let key = (A, 2, Part::Peer);
        h.hold(key, "m1", HeldBy::QueueFull, 60_000, 0);
        // A later message is refused; so is a third, naming the same hold.
        assert!(matches!(
            h.check(key, "m2", 10),
            Err(RouteError::OrderHeld {
                by: HeldBy::QueueFull,
                retry_after_ms: 60_000
            })
        ));
        // Its refusal does not move the hold to m2.
        h.hold(key, "m2", HeldBy::Overloaded, 250, 10);
        assert!(h.check(key, "m3", 20).is_err());
        // Other recipients and the other part are not held.
        assert!(h.check((A, 3, Part::Peer), "x", 20).is_ok());
        assert!(h.check((A, 2, Part::Own), "m2", 20).is_ok());
        // m1 comes back: it and then the rest go through.
        assert!(h.check(key, "m1", 30).is_ok());
        assert!(h.check(key, "m2", 30).is_ok());
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_hold_lapses() {
        let mut h = Holds::default();
        let key = (A, 2, Part::Peer);
        h.hold(key, "m1", HeldBy::Unavailable, 1000, 0);
        assert!(h.check(key, "m2", HOLD_TTL_MS - 1).is_err());
        assert!(h.check(key, "m2", HOLD_TTL_MS).is_ok());
    }
}
