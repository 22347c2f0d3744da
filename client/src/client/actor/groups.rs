//! The client task's group concern: sending a group message (members,
//! sessions, sender-key distribution, then the one sealed payload) and
//! turning group entries into events.
//!
//! A group send is an outbox entry like any other, so it keeps its place in
//! the device's send order and survives restarts. Before it goes out:
//!
//! 1. the group's members are known (`GetGroup`, cached until a change of
//!    the group is seen);
//! 2. every member device that lacks this device's current sender key has
//!    an Olm session (key bundles fetched as for a 1:1 send);
//! 3. the key goes to those devices in `SendGroupKeys` requests of up to
//!    [`MAX_KEY_PARTS`] members each, all on the wire at once; a member's
//!    `DEVICE_MISMATCH` fixes its device list and goes again, other
//!    refusals leave that member out of this message;
//! 4. the message is sealed once and sent with `SendGroup`.
//!
//! Each member device's queue then holds the key before the message: the
//! key's ✓ came before the message was sent.

use switchboard_proto::pb::{self, client_frame, server_frame};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Actor, InFlight, Link, MIN_RETRY_DELAY, now_ms};
use crate::client::{Event, GroupChangeKind};
use crate::crypto::Decrypted;
use crate::crypto::envelope::{KIND_MESSAGE, Plaintext};
use crate::crypto::group::KIND_SENDER_KEY;
use crate::error::{Error, ServerError};
use crate::ids::{DeviceId, GroupId, Seq, UserId};
use crate::outbox::{Content, State};
use crate::{ErrorCode, ReceiptKind};

/// Members per `SendGroupKeys` request (the server's limit).
pub(super) const MAX_KEY_PARTS: usize = 256;

/// Bytes of sender-key payloads per request, leaving room in a 1 MiB frame.
const MAX_KEY_BYTES: usize = 768 * 1024;

/// Members whose key bundles are fetched at once for a group send.
const FETCH_WINDOW: usize = 128;

/// Members and the devices a key request addresses.
type Parts = Vec<(u64, Vec<u32>)>;

/// Groups whose member lists are cached.
pub(super) const GROUP_CACHE_CAPACITY: usize = 1024;

impl Actor {
    /// Writes group outbox entry `seq` (or what it needs first).
    pub(super) fn start_group_send(&mut self, link: &mut Link, seq: u64, group: u64) {
        let me = self.shared.user_id;
        let my_device = self.shared.device_id;
        let now = now_ms();
        let Some(members) = self.group_members.get(&group).cloned() else {
            let Some(entry) = self.queue.get_mut(seq) else {
                return;
            };
            entry.state = State::Resolving;
            let id = link.next_id();
            link.session.queue(&pb::ClientFrame {
                id,
                body: Some(client_frame::Body::GetGroup(pb::GetGroup {
                    group_id: group,
                })),
            });
            link.in_flight.insert(id, InFlight::GroupInfo(seq));
            link.sends_in_flight += 1;
            return;
        };
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        // Who lacks the current key, and who must be fetched first.
        let mut fetch = Vec::new();
        let mut parts: Vec<(u64, Vec<u32>)> = Vec::new();
        for user in members {
            if entry.skip.contains(&user) {
                continue;
            }
            let known = if user == me {
                Some(self.crypto.known_devices(me).unwrap_or_default())
            } else {
                self.devices
                    .get(&user)
                    .cloned()
                    .or_else(|| self.crypto.known_devices(user))
            };
            let Some(mut devices) = known else {
                fetch.push(user);
                continue;
            };
            if user == me {
                devices.retain(|d| *d != my_device);
            }
            let groups = self.crypto.groups_mut();
            if !devices
                .iter()
                .any(|d| groups.lacks_key(group, user, *d, now))
            {
                continue;
            }
            if devices.iter().any(|d| !self.crypto.has_session(user, *d)) {
                fetch.push(user);
                continue;
            }
            parts.push((user, devices));
        }
        if !fetch.is_empty() {
            // A window at a time, so a big group does not flood the server
            // with bundle requests (the rest follow when these are in).
            fetch.truncate(FETCH_WINDOW);
            super::send::fetch_bundles(link, entry, seq, fetch);
            return;
        }
        if !parts.is_empty() {
            self.send_keys(link, seq, group, parts, now);
            return;
        }
        let others = self
            .group_members
            .get(&group)
            .map_or(0, |m| m.iter().filter(|u| **u != me).count());
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        // The tally counts out of the members of this moment.
        entry.group_others = u32::try_from(others).unwrap_or(u32::MAX);
        let Content::Group { payload, .. } = &entry.send.content else {
            return;
        };
        let plaintext = Plaintext {
            kind: KIND_MESSAGE,
            body: payload.clone(),
            sent_at_ms: now,
            to_user: 0,
            sender_identity: None,
            group_id: group,
        };
        let sealed = self
            .crypto
            .groups_mut()
            .encrypt(group, &plaintext.encode(), now);
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::SendGroup(pb::SendGroup {
                group_id: group,
                client_msg_id: entry.send.client_msg_id.clone(),
                payload: sealed,
                first_attempt: entry.send.never_sent,
            })),
        });
        entry.state = State::InFlight;
        entry.send.never_sent = false;
        link.in_flight.insert(id, InFlight::Send(seq));
        link.sends_in_flight += 1;
    }

    /// Sends the current key of `group` to the devices of `parts`, in as
    /// few requests as the limits allow.
    fn send_keys(&mut self, link: &mut Link, seq: u64, group: u64, parts: Parts, now: u64) {
        let key = self.crypto.groups_mut().session_key(group, now);
        let Some(session_id) = self.crypto.groups().session_id(group) else {
            return;
        };
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        let round = entry
            .key_round
            .get_or_insert_with(crate::client::new_client_msg_id)
            .clone();
        let mut chunks: Vec<(Vec<pb::UserPayloads>, Parts)> = Vec::new();
        let mut bytes = 0;
        for (user, devices) in parts {
            let plaintext = Plaintext {
                kind: KIND_SENDER_KEY,
                body: key.clone(),
                sent_at_ms: now,
                to_user: user,
                sender_identity: None,
                group_id: group,
            };
            let mut payloads = Vec::with_capacity(devices.len());
            let mut failed = None;
            for d in &devices {
                match self.crypto.encrypt(user, *d, &plaintext) {
                    Ok(payload) => payloads.push(pb::DevicePayload {
                        device_id: *d,
                        payload,
                    }),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                warn!(user, error = %e, "cannot seal the sender key for a member; it cannot read this message");
                if let Some(entry) = self.queue.get_mut(seq) {
                    entry.skip.insert(user);
                }
                continue;
            }
            let size: usize = payloads.iter().map(|p| p.payload.len() + 16).sum();
            let start_new = chunks
                .last()
                .is_none_or(|(c, _)| c.len() >= MAX_KEY_PARTS || bytes + size > MAX_KEY_BYTES);
            if start_new {
                chunks.push((Vec::new(), Vec::new()));
                bytes = 0;
            }
            bytes += size;
            if let Some((wire, sent)) = chunks.last_mut() {
                wire.push(pb::UserPayloads {
                    user_id: user,
                    payloads,
                });
                sent.push((user, devices));
            }
        }
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        if chunks.is_empty() {
            // Every member left to key was skipped: send the message.
            entry.state = State::Ready;
            return;
        }
        entry.state = State::Resolving;
        entry.key_parts = chunks.len();
        debug!(
            seq,
            group,
            requests = chunks.len(),
            "sending the group's sender key"
        );
        for (wire, sent) in chunks {
            let id = link.next_id();
            link.session.queue(&pb::ClientFrame {
                id,
                body: Some(client_frame::Body::SendGroupKeys(pb::SendGroupKeys {
                    group_id: group,
                    client_msg_id: round.clone(),
                    parts: wire,
                    first_attempt: false,
                })),
            });
            link.in_flight.insert(
                id,
                InFlight::GroupKeys {
                    seq,
                    group,
                    session_id: session_id.clone(),
                    parts: sent,
                },
            );
            link.sends_in_flight += 1;
        }
    }

    /// The members of the group of outbox entry `seq`.
    pub(super) fn on_group_info_answer(
        &mut self,
        seq: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        match body {
            Some(server_frame::Body::GroupInfo(info)) => {
                self.learn_group(&info);
                if let Some(entry) = self.queue.get_mut(seq) {
                    entry.state = State::Ready;
                }
                Ok(())
            }
            Some(server_frame::Body::Error(e)) => {
                self.on_group_step_error(seq, e.into());
                Ok(())
            }
            other => Err(crate::connection::unexpected("GroupInfo", other.as_ref())),
        }
    }

    /// Caches a group's members (and their phone numbers).
    pub(super) fn learn_group(&mut self, info: &pb::GroupInfo) {
        if info.members.is_empty() {
            // The answer to a leave: this account is no member any more.
            self.group_members.remove(&info.group_id);
            return;
        }
        for m in &info.members {
            if !m.phone.is_empty() {
                self.phones.insert(m.user_id, m.phone.clone());
            }
        }
        self.group_members.insert(
            info.group_id,
            info.members.iter().map(|m| m.user_id).collect(),
        );
    }

    /// A refused step (member list, whole key request) of a group send.
    fn on_group_step_error(&mut self, seq: u64, error: ServerError) {
        if error.is_retryable()
            && let Some(entry) = self.queue.get_mut(seq)
        {
            entry.retries = entry.retries.saturating_add(1);
            let delay = error
                .retry_after
                .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                .max(MIN_RETRY_DELAY);
            entry.key_parts = entry.key_parts.saturating_sub(1);
            entry.state = State::RetryAt(Instant::now() + delay);
            return;
        }
        self.fail(seq, Error::Server(error));
    }

    /// The answer to one `SendGroupKeys` request of outbox entry `seq`.
    pub(super) fn on_group_keys_answer(
        &mut self,
        seq: u64,
        group: u64,
        session_id: &str,
        parts: Parts,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        let sent = match body {
            Some(server_frame::Body::GroupKeysSent(sent)) => sent,
            Some(server_frame::Body::Error(e)) => {
                self.on_group_step_error(seq, e.into());
                return Ok(());
            }
            other => {
                return Err(crate::connection::unexpected(
                    "GroupKeysSent",
                    other.as_ref(),
                ));
            }
        };
        let max_device_retries = self.config.max_device_retries;
        let me = self.shared.user_id;
        let refused: Vec<ServerError> = sent.refused.into_iter().map(ServerError::from).collect();
        let refused_user = |user: u64| {
            refused
                .iter()
                .find(|e| e.user_id.map(UserId::get) == Some(user))
        };
        let mut shared = Vec::new();
        for (user, devices) in &parts {
            if refused_user(*user).is_none() {
                shared.extend(devices.iter().map(|d| (*user, *d)));
            }
        }
        self.crypto
            .groups_mut()
            .mark_shared(group, session_id, shared);
        let mut members_changed = false;
        for error in &refused {
            let Some(user) = error.user_id.map(UserId::get) else {
                continue;
            };
            let Some(entry) = self.queue.get_mut(seq) else {
                break;
            };
            match error.code {
                ErrorCode::DeviceMismatch if entry.mismatches < max_device_retries => {
                    entry.mismatches += 1;
                    let stale = crate::ids::device_ints(&error.stale_devices);
                    let missing = crate::ids::device_ints(&error.missing_devices);
                    let mut devices = if user == me {
                        self.crypto.known_devices(me).unwrap_or_default()
                    } else {
                        self.devices.get(&user).cloned().unwrap_or_default()
                    };
                    devices.retain(|d| !stale.contains(d));
                    devices.extend_from_slice(&missing);
                    devices.sort_unstable();
                    devices.dedup();
                    if user == me {
                        self.crypto.set_own_devices(&devices);
                    } else {
                        self.devices.insert(user, devices);
                    }
                    self.crypto.forget_devices(user, &stale);
                }
                ErrorCode::NotGroupMember => {
                    members_changed = true;
                    entry.skip.insert(user);
                }
                _ => {
                    warn!(user, %error, "a member's sender key was refused; it cannot read this message");
                    entry.skip.insert(user);
                }
            }
        }
        if members_changed {
            self.group_members.remove(&group);
        }
        if let Some(entry) = self.queue.get_mut(seq) {
            entry.key_parts = entry.key_parts.saturating_sub(1);
            if entry.key_parts == 0 && entry.state == State::Resolving {
                entry.state = State::Ready;
            }
        }
        Ok(())
    }

    /// A group message for this device.
    pub(super) fn on_group_message(&mut self, seq: u64, server_ts_ms: u64, m: pb::GroupMessage) {
        self.phones.insert(m.from_user, m.from_phone.clone());
        if self.handled_before(seq, (m.from_user, m.from_device, m.client_msg_id.clone())) {
            return;
        }
        let opened = self
            .crypto
            .groups_mut()
            .decrypt(m.group_id, m.from_user, m.from_device, &m.payload)
            .and_then(|opened| Plaintext::decode(&opened.plaintext).map_err(|e| e.to_string()))
            .and_then(|p| {
                if p.kind != KIND_MESSAGE {
                    return Err(format!("unsupported content kind {}", p.kind));
                }
                if p.group_id != m.group_id {
                    return Err("sealed for another group than the server says".into());
                }
                Ok(p)
            });
        match opened {
            Ok(p) => {
                let message = Decrypted {
                    from_user: m.from_user,
                    from_device: m.from_device,
                    from_phone: m.from_phone,
                    to_user: 0,
                    client_msg_id: m.client_msg_id,
                    body: p.body,
                    sent_at_ms: p.sent_at_ms,
                    server_ts_ms,
                    group_id: m.group_id,
                    group_seq: m.group_seq,
                };
                self.crypto.hold(seq, message.clone());
                self.emit_message(seq, message);
            }
            Err(reason) => {
                warn!(seq, group_id = m.group_id, from_user = m.from_user, %reason, "cannot decrypt a group message");
                self.acks.push_back(seq);
                self.emit(Event::Undecryptable {
                    seq: Seq(seq),
                    from_user: UserId(m.from_user),
                    from_device: DeviceId(m.from_device),
                    from_phone: m.from_phone,
                    client_msg_id: m.client_msg_id,
                    group_id: Some(GroupId(m.group_id)),
                    reason,
                });
            }
        }
    }

    /// A sender key that arrived in a 1:1 message from a member device.
    pub(super) fn on_sender_key(&mut self, m: &pb::Message, p: &Plaintext) -> Result<(), String> {
        if m.group_id == 0 || p.group_id != m.group_id {
            return Err("a sender key for another group than the server says".into());
        }
        self.crypto
            .groups_mut()
            .import(p.group_id, m.from_user, m.from_device, &p.body)?;
        debug!(
            group_id = p.group_id,
            from_user = m.from_user,
            "sender key received"
        );
        Ok(())
    }

    /// A membership or info change of a group.
    pub(super) fn on_group_event(&mut self, seq: u64, e: pb::GroupEvent) {
        let kind = GroupChangeKind::from_wire(e.kind);
        // Members changed: ask the server afresh before the next send.
        self.group_members.remove(&e.group_id);
        if kind.removes_members() && self.crypto.groups_mut().rotate(e.group_id) {
            debug!(
                group_id = e.group_id,
                "members left; the sender key will be replaced"
            );
        }
        if kind == GroupChangeKind::MemberDevicesChanged {
            // Learn the member's devices now, so the next message gives
            // the new one this device's key. The next send asks for the
            // group's members first (the cache was just dropped), and that
            // answer comes after this one's.
            for &user in &e.users {
                if user != self.shared.user_id {
                    self.refresh_devices(user);
                }
            }
        }
        self.acks.push_back(seq);
        self.emit(Event::GroupChanged {
            group_id: GroupId(e.group_id),
            group_seq: e.group_seq,
            actor: UserId(e.actor),
            kind,
            users: e.users.into_iter().map(UserId).collect(),
            info: e.info.map(crate::client::Group::from),
        });
    }

    /// Counts a receipt for group messages this device sent, and reports
    /// each message's tally.
    pub(super) fn tally_group_receipt(&mut self, r: &pb::Receipt, kind: ReceiptKind) {
        let read = kind == ReceiptKind::Read;
        for id in &r.client_msg_ids {
            if let Some((delivered, read_count, members)) =
                self.crypto
                    .groups_mut()
                    .count(r.group_id, id, r.from_user, read)
            {
                self.emit(Event::GroupReceipts {
                    group_id: GroupId(r.group_id),
                    client_msg_id: id.clone(),
                    delivered,
                    read: read_count,
                    members,
                });
            }
        }
    }

    /// A group send got its ✓: start its receipt tally, out of the
    /// `others` members it was sealed for.
    pub(super) fn track_group_send(&mut self, group: u64, client_msg_id: &str, others: u32) {
        self.crypto.groups_mut().track(group, client_msg_id, others);
    }
}
