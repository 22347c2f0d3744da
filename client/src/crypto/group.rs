//! Group encryption with Megolm sender keys (vodozemac).
//!
//! Each device keeps one outbound session per group it sends to. Its key
//! (the ratchet at the current index and the session's signing key) goes to
//! every member device pairwise over Olm, as a plaintext of kind
//! [`KIND_SENDER_KEY`]; a message is then sealed once for all members. A
//! device that receives the key at index `i` can read messages from `i` on,
//! never before: a member added later cannot read what came before it
//! joined.
//!
//! The outbound session is replaced (a new key for everyone) when a member
//! leaves or is removed, after [`ROTATE_AFTER_MESSAGES`] messages and after
//! [`ROTATE_AFTER_MS`], so a removed member cannot read what comes after.
//!
//! Inbound sessions are kept per session id, bound to the group and the
//! sending device that delivered the key over Olm; a group message is
//! decrypted only with a session bound to the group and sender the server
//! routed it for.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    MegolmMessage, SessionConfig, SessionKey,
};

use super::envelope::{EnvelopeError, MEGOLM, WIRE_VERSION};

/// Plaintext kind: the body is a Megolm session key for the plaintext's
/// `group_id` (handled by the SDK, never shown to the application).
pub const KIND_SENDER_KEY: u32 = 2;

/// Messages sealed with one outbound session before it is replaced.
pub const ROTATE_AFTER_MESSAGES: u32 = 1000;

/// Age of an outbound session after which it is replaced (one week).
pub const ROTATE_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

/// Inbound sessions kept; past it the oldest go (their messages are then
/// undecryptable if redelivered).
const MAX_INBOUND_SESSIONS: usize = 4096;

/// Group messages whose receipts are tallied; past it the oldest go.
const MAX_TALLIES: usize = 256;

/// The receipts of one group message this device sent, per member.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Tally {
    /// Members it was sent to (this account not counted).
    pub members: u32,
    /// Members with it on a device.
    pub delivered: BTreeSet<u64>,
    /// Members who read it.
    pub read: BTreeSet<u64>,
}

/// This device's sending state for one group.
struct Outbound {
    session: GroupSession,
    /// Member devices holding the current key.
    shared: BTreeSet<(u64, u32)>,
    created_ms: u64,
}

/// A key received from a member device.
struct Inbound {
    group_id: u64,
    user_id: u64,
    device_id: u32,
    session: InboundGroupSession,
    /// Arrival order, for eviction.
    order: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredOutbound {
    group_id: u64,
    session: GroupSessionPickle,
    shared: Vec<(u64, u32)>,
    created_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredInbound {
    group_id: u64,
    user_id: u64,
    device_id: u32,
    session: InboundGroupSessionPickle,
}

/// The persisted form of [`GroupKeys`] (part of the crypto snapshot).
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct StoredGroupKeys {
    outbound: Vec<StoredOutbound>,
    /// Oldest first.
    inbound: Vec<StoredInbound>,
    /// (group, client message id, tally), oldest first.
    #[serde(default)]
    tallies: Vec<(u64, String, Tally)>,
}

/// The device's Megolm state.
#[derive(Default)]
pub(crate) struct GroupKeys {
    outbound: HashMap<u64, Outbound>,
    inbound: HashMap<String, Inbound>,
    next_order: u64,
    /// Receipt tallies of sent group messages, oldest first.
    tallies: std::collections::VecDeque<(u64, String, Tally)>,
}

/// A group message opened with a sender key.
#[derive(Debug)]
pub(crate) struct GroupOpened {
    /// The plaintext envelope inside.
    pub plaintext: Vec<u8>,
}

/// Encodes a Megolm message as a wire envelope (version, type 2).
fn encode_megolm(message: &MegolmMessage) -> Bytes {
    let body = message.to_bytes();
    let mut out = Vec::with_capacity(2 + body.len());
    out.push(WIRE_VERSION);
    out.push(MEGOLM);
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// Decodes a wire envelope holding a Megolm message.
fn decode_megolm(payload: &[u8]) -> Result<MegolmMessage, EnvelopeError> {
    let [version, kind, body @ ..] = payload else {
        return Err(EnvelopeError::Truncated(payload.len()));
    };
    if *version != WIRE_VERSION {
        return Err(EnvelopeError::Version(*version));
    }
    if *kind != MEGOLM {
        return Err(EnvelopeError::MessageType(*kind));
    }
    MegolmMessage::from_bytes(body).map_err(|e| EnvelopeError::Olm(e.to_string()))
}

impl GroupKeys {
    pub(crate) fn restore(stored: StoredGroupKeys) -> Self {
        let mut keys = Self {
            tallies: stored.tallies.into_iter().collect(),
            ..Self::default()
        };
        for o in stored.outbound {
            keys.outbound.insert(
                o.group_id,
                Outbound {
                    session: GroupSession::from_pickle(o.session),
                    shared: o.shared.into_iter().collect(),
                    created_ms: o.created_ms,
                },
            );
        }
        for i in stored.inbound {
            let session = InboundGroupSession::from_pickle(i.session);
            let order = keys.next_order;
            keys.next_order += 1;
            keys.inbound.insert(
                session.session_id(),
                Inbound {
                    group_id: i.group_id,
                    user_id: i.user_id,
                    device_id: i.device_id,
                    session,
                    order,
                },
            );
        }
        keys
    }

    pub(crate) fn stored(&self) -> StoredGroupKeys {
        let mut outbound: Vec<StoredOutbound> = self
            .outbound
            .iter()
            .map(|(group_id, o)| StoredOutbound {
                group_id: *group_id,
                session: o.session.pickle(),
                shared: o.shared.iter().copied().collect(),
                created_ms: o.created_ms,
            })
            .collect();
        outbound.sort_by_key(|o| o.group_id);
        let mut inbound: Vec<&Inbound> = self.inbound.values().collect();
        inbound.sort_by_key(|i| i.order);
        StoredGroupKeys {
            outbound,
            inbound: inbound
                .into_iter()
                .map(|i| StoredInbound {
                    group_id: i.group_id,
                    user_id: i.user_id,
                    device_id: i.device_id,
                    session: i.session.pickle(),
                })
                .collect(),
            tallies: self.tallies.iter().cloned().collect(),
        }
    }

    /// Starts the tally of a group message sent to `members` others.
    pub(crate) fn track(&mut self, group: u64, client_msg_id: &str, members: u32) {
        if self
            .tallies
            .iter()
            .any(|(g, id, _)| *g == group && id == client_msg_id)
        {
            return;
        }
        self.tallies.push_back((
            group,
            client_msg_id.to_owned(),
            Tally {
                members,
                ..Tally::default()
            },
        ));
        while self.tallies.len() > MAX_TALLIES {
            self.tallies.pop_front();
        }
    }

    /// Counts a receipt of `member` for a tracked message (a read implies
    /// delivery); the tally after it, or `None` for an untracked message.
    pub(crate) fn count(
        &mut self,
        group: u64,
        client_msg_id: &str,
        member: u64,
        read: bool,
    ) -> Option<(u32, u32, u32)> {
        let (_, _, tally) = self
            .tallies
            .iter_mut()
            .find(|(g, id, _)| *g == group && id == client_msg_id)?;
        tally.delivered.insert(member);
        if read {
            tally.read.insert(member);
        }
        let n = |set: &BTreeSet<u64>| u32::try_from(set.len()).unwrap_or(u32::MAX);
        Some((n(&tally.delivered), n(&tally.read), tally.members))
    }

    /// The outbound session of `group`, made (or replaced when due) now.
    fn outbound(&mut self, group: u64, now_ms: u64) -> &mut Outbound {
        let fresh = || Outbound {
            session: GroupSession::new(SessionConfig::version_1()),
            shared: BTreeSet::new(),
            created_ms: now_ms,
        };
        let outbound = self.outbound.entry(group).or_insert_with(fresh);
        if outbound.session.message_index() >= ROTATE_AFTER_MESSAGES
            || now_ms.saturating_sub(outbound.created_ms) >= ROTATE_AFTER_MS
        {
            *outbound = fresh();
        }
        outbound
    }

    /// Whether `device` of `user` lacks the current key of `group` (after
    /// making or rotating the session if due).
    pub(crate) fn lacks_key(&mut self, group: u64, user: u64, device: u32, now_ms: u64) -> bool {
        let outbound = self.outbound(group, now_ms);
        !outbound.shared.contains(&(user, device))
    }

    /// The current key of `group`, to send to member devices.
    pub(crate) fn session_key(&mut self, group: u64, now_ms: u64) -> Bytes {
        let outbound = self.outbound(group, now_ms);
        Bytes::from(outbound.session.session_key().to_bytes())
    }

    /// The current session id of `group`, if there is one.
    pub(crate) fn session_id(&self, group: u64) -> Option<String> {
        self.outbound.get(&group).map(|o| o.session.session_id())
    }

    /// Devices now holding the key of session `session_id` of `group` (a
    /// session replaced meanwhile is left alone).
    pub(crate) fn mark_shared(
        &mut self,
        group: u64,
        session_id: &str,
        devices: impl IntoIterator<Item = (u64, u32)>,
    ) {
        if let Some(o) = self.outbound.get_mut(&group)
            && o.session.session_id() == session_id
        {
            o.shared.extend(devices);
        }
    }

    /// Forgets the outbound session of `group`: the next message starts a
    /// new one, whose key goes to the members of that time only.
    pub(crate) fn rotate(&mut self, group: u64) -> bool {
        self.outbound.remove(&group).is_some()
    }

    /// Seals `plaintext` for `group` with the current session.
    pub(crate) fn encrypt(&mut self, group: u64, plaintext: &[u8], now_ms: u64) -> Bytes {
        let outbound = self.outbound(group, now_ms);
        encode_megolm(&outbound.session.encrypt(plaintext))
    }

    /// Takes a key for `group` sent by `device` of `user` over Olm. A key
    /// for a session already known is merged (the earlier index is kept).
    ///
    /// # Errors
    /// A malformed key.
    pub(crate) fn import(
        &mut self,
        group: u64,
        user: u64,
        device: u32,
        key: &[u8],
    ) -> Result<(), String> {
        let key = SessionKey::from_bytes(key).map_err(|e| format!("bad sender key: {e}"))?;
        let mut session = InboundGroupSession::new(&key, SessionConfig::version_1());
        let id = session.session_id();
        let order = self.next_order;
        self.next_order += 1;
        if let Some(known) = self.inbound.get_mut(&id) {
            if (known.group_id, known.user_id, known.device_id) != (group, user, device) {
                return Err("a sender key already bound to another group or sender".into());
            }
            if let Some(merged) = known.session.merge(&mut session) {
                known.session = merged;
            }
            return Ok(());
        }
        self.inbound.insert(
            id,
            Inbound {
                group_id: group,
                user_id: user,
                device_id: device,
                session,
                order,
            },
        );
        if self.inbound.len() > MAX_INBOUND_SESSIONS
            && let Some(oldest) = self
                .inbound
                .iter()
                .min_by_key(|(_, i)| i.order)
                .map(|(id, _)| id.clone())
        {
            self.inbound.remove(&oldest);
        }
        Ok(())
    }

    /// Opens a group message routed as from `device` of `user` in `group`.
    ///
    /// # Errors
    /// Why it cannot be read (no key from that sender, a damaged message).
    pub(crate) fn decrypt(
        &mut self,
        group: u64,
        user: u64,
        device: u32,
        payload: &[u8],
    ) -> Result<GroupOpened, String> {
        let message = decode_megolm(payload).map_err(|e| e.to_string())?;
        let index = message.message_index();
        let mut why = format!(
            "no sender key from device {device} of user {user} opens message {index} of this group"
        );
        // A sender has a few sessions per group (one per rotation); the
        // message does not name its session, so each is tried.
        for inbound in self.inbound.values_mut() {
            if (inbound.group_id, inbound.user_id, inbound.device_id) != (group, user, device) {
                continue;
            }
            match inbound.session.decrypt(&message) {
                Ok(opened) => {
                    return Ok(GroupOpened {
                        plaintext: opened.plaintext,
                    });
                }
                Err(e) => why = format!("message {index}: {e}"),
            }
        }
        Err(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_opens_messages_from_its_index_on_and_only_for_its_sender() {
        let mut alice = GroupKeys::default();
        let early = alice.encrypt(7, b"before bob joined", 0);
        let key = alice.session_key(7, 0);
        let later = alice.encrypt(7, b"after", 0);
        let mut bob = GroupKeys::default();
        bob.import(7, 1, 1, &key).unwrap();
        assert_eq!(bob.decrypt(7, 1, 1, &later).unwrap().plaintext, b"after");
        // Before the key's index: unreadable.
        assert!(bob.decrypt(7, 1, 1, &early).is_err());
        // Routed as from another sender or group: refused.
        assert!(bob.decrypt(7, 2, 1, &later).is_err());
        assert!(bob.decrypt(8, 1, 1, &later).is_err());
        // Survives a snapshot.
        let mut bob = GroupKeys::restore(
            serde_json::from_slice(&serde_json::to_vec(&bob.stored()).unwrap()).unwrap(),
        );
        assert_eq!(bob.decrypt(7, 1, 1, &later).unwrap().plaintext, b"after");
    }

    #[test]
    fn rotation_locks_out_holders_of_the_old_key() {
        let mut alice = GroupKeys::default();
        let old_key = alice.session_key(7, 0);
        alice.mark_shared(7, &alice.session_id(7).unwrap(), [(2, 1)]);
        assert!(!alice.lacks_key(7, 2, 1, 0));
        assert!(alice.rotate(7));
        assert!(alice.lacks_key(7, 2, 1, 0));
        let after = alice.encrypt(7, b"secret", 0);
        let mut removed = GroupKeys::default();
        removed.import(7, 1, 1, &old_key).unwrap();
        assert!(removed.decrypt(7, 1, 1, &after).is_err());
        // Time-based rotation too.
        assert!(alice.lacks_key(7, 3, 1, ROTATE_AFTER_MS + 1));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut keys = GroupKeys::default();
        assert!(keys.import(1, 1, 1, b"junk").is_err());
        assert!(keys.decrypt(1, 1, 1, b"").is_err());
        assert!(keys.decrypt(1, 1, 1, &[1, 2, 0, 1]).is_err());
        assert!(keys.decrypt(1, 1, 1, &[1, 1, 0]).is_err());
    }
}
