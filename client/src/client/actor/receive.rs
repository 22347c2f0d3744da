//! The client task's receiving side: pushed queue entries set aside while
//! the application is behind are taken as it catches up, then each is
//! de-duplicated (against acks, the persisted window and what this process
//! already handed over), decrypted if it is a message, and turned into an
//! event; receipts, device changes and undelivered notices are acted on.
//!
//! Group messages and group events branch off to `groups.rs`.

use switchboard_proto::pb;
use tracing::{info, warn};

use super::{Actor, Deferred};
use crate::ReceiptKind;
use crate::client::Event;
use crate::crypto::Decrypted;
use crate::crypto::envelope::KIND_MESSAGE;
use crate::crypto::group::KIND_SENDER_KEY;
use crate::ids::{self, DeviceId, GroupId, Seq, UserId};

impl Actor {
    /// Turns deferred pushes into events while the application has room.
    pub(super) fn take_deferred(&mut self) {
        while self.pending_events.len() < self.config.event_capacity
            && let Some(push) = self.deferred.pop_front()
        {
            match push {
                Deferred::Entry(entry) => self.on_entry(entry),
                Deferred::UpToDate => self.emit(Event::UpToDate),
            }
        }
    }

    /// One pushed queue entry: de-duplicate, decrypt, then hand it to the
    /// application.
    fn on_entry(&mut self, entry: pb::QueueEntry) {
        use pb::queue_entry::Body;
        if self.app_acked.contains(&entry.seq) {
            // Acked before, but the ack was lost with a link: ack again.
            self.acks.push_back(entry.seq);
            return;
        }
        match entry.body {
            Some(Body::Message(m)) => self.on_message(entry.seq, entry.server_ts_ms, m),
            Some(Body::Receipt(r)) => {
                self.phones.insert(r.from_user, r.from_phone.clone());
                match ReceiptKind::try_from(r.kind) {
                    Ok(kind @ (ReceiptKind::Delivered | ReceiptKind::Read)) => {
                        if r.from_user != self.shared.user_id {
                            self.forgets.extend(r.client_msg_ids.iter().cloned());
                        }
                        let group = (r.group_id != 0).then_some(GroupId(r.group_id));
                        if group.is_some() {
                            self.tally_group_receipt(&r, kind);
                        }
                        self.emit(Event::Receipt {
                            seq: Seq(entry.seq),
                            from_user: UserId(r.from_user),
                            from_device: DeviceId(r.from_device),
                            from_phone: r.from_phone,
                            kind,
                            client_msg_ids: r.client_msg_ids,
                            server_ts_ms: entry.server_ts_ms,
                            group_id: group,
                        });
                    }
                    _ => {
                        warn!(
                            seq = entry.seq,
                            kind = r.kind,
                            "receipt of unknown kind; dropping"
                        );
                        self.acks.push_back(entry.seq);
                    }
                }
            }
            Some(Body::DevicesChanged(changed)) => {
                if changed.user_id == self.shared.user_id {
                    info!(devices = ?changed.devices, "this account's devices changed");
                    self.crypto.set_own_devices(&changed.devices);
                    self.emit(Event::DevicesChanged {
                        devices: ids::devices(&changed.devices),
                    });
                }
                self.acks.push_back(entry.seq);
            }
            Some(Body::Undelivered(u)) => {
                self.acks.push_back(entry.seq);
                if u.from_device == self.shared.device_id {
                    // Resent from `flush_retained`, after the link's turn.
                    self.undelivered.push(u);
                } else {
                    // Another device of this account sent them; it resends.
                    let phone = self.phones.get(&u.to_user).cloned().unwrap_or_default();
                    self.emit(Event::Undelivered {
                        to_user: UserId(u.to_user),
                        phone,
                        client_msg_ids: u.client_msg_ids,
                        resending: Vec::new(),
                    });
                }
            }
            Some(Body::GroupMessage(m)) => self.on_group_message(entry.seq, entry.server_ts_ms, m),
            Some(Body::GroupEvent(e)) => self.on_group_event(entry.seq, e),
            None => {
                warn!(seq = entry.seq, "queue entry of unknown kind; dropping");
                self.acks.push_back(entry.seq);
            }
        }
    }

    /// Whether the message `key` in entry `seq` was handled already (and
    /// so is dealt with here): a second copy is acked; one the application
    /// holds waits for its ack; one handled by an earlier run is handed
    /// over again from the copy kept until the ack (its Olm or Megolm key
    /// is used up), else acked. A new one is remembered and left to the
    /// caller.
    pub(super) fn handled_before(&mut self, seq: u64, key: (u64, u32, String)) -> bool {
        match self.crypto.seen.get(&key).copied() {
            Some(first) if first != seq => {
                self.acks.push_back(seq);
                true
            }
            Some(_) if self.emitted.contains(&seq) => true,
            Some(_) => {
                match self.crypto.held(seq).cloned() {
                    Some(held) => self.emit_message(seq, held),
                    None => self.acks.push_back(seq),
                }
                true
            }
            None => {
                self.crypto.seen.insert(key, seq);
                self.crypto.mark_dirty();
                false
            }
        }
    }

    fn on_message(&mut self, seq: u64, server_ts_ms: u64, m: pb::Message) {
        self.phones.insert(m.from_user, m.from_phone.clone());
        if self.handled_before(seq, (m.from_user, m.from_device, m.client_msg_id.clone())) {
            return;
        }
        // A device of a known contact never seen before: its other devices
        // may have changed too (a re-registration replaces them all).
        let unknown_device = m.from_user != self.shared.user_id
            && self
                .crypto
                .known_devices(m.from_user)
                .is_some_and(|known| !known.contains(&m.from_device));
        if unknown_device {
            self.refresh_devices(m.from_user);
        }
        let opened = self
            .crypto
            .decrypt(m.from_user, m.from_device, &m.payload, unknown_device)
            .and_then(|opened| {
                let p = &opened.plaintext;
                if p.kind != KIND_MESSAGE && p.kind != KIND_SENDER_KEY {
                    return Err(format!("unsupported content kind {}", p.kind));
                }
                if m.to_user != 0 && p.to_user != m.to_user {
                    return Err("addressed to another conversation than the server says".into());
                }
                Ok(opened)
            });
        let opened = opened.and_then(|opened| {
            if opened.plaintext.kind == KIND_SENDER_KEY {
                self.on_sender_key(&m, &opened.plaintext)?;
            }
            Ok(opened)
        });
        match opened {
            Ok(opened) if opened.plaintext.kind == KIND_SENDER_KEY => {
                if opened.identity_changed {
                    self.safety_number_changed(m.from_user);
                }
                // Handled here: nothing for the application.
                self.acks.push_back(seq);
            }
            Ok(opened) => {
                if opened.identity_changed {
                    self.safety_number_changed(m.from_user);
                }
                let message = Decrypted {
                    from_user: m.from_user,
                    from_device: m.from_device,
                    from_phone: m.from_phone,
                    to_user: opened.plaintext.to_user,
                    client_msg_id: m.client_msg_id,
                    body: opened.plaintext.body,
                    sent_at_ms: opened.plaintext.sent_at_ms,
                    server_ts_ms,
                    group_id: 0,
                    group_seq: 0,
                };
                self.crypto.hold(seq, message.clone());
                self.emit_message(seq, message);
            }
            Err(reason) => {
                warn!(
                    seq,
                    from_user = m.from_user,
                    from_device = m.from_device,
                    %reason,
                    "cannot decrypt a message"
                );
                // Whatever we hold with that device is out of step with it:
                // the next message to it starts a new session.
                self.crypto.forget_sessions(m.from_user, m.from_device);
                self.acks.push_back(seq);
                self.emit(Event::Undecryptable {
                    seq: Seq(seq),
                    from_user: UserId(m.from_user),
                    from_device: DeviceId(m.from_device),
                    from_phone: m.from_phone,
                    client_msg_id: m.client_msg_id,
                    group_id: None,
                    reason,
                });
            }
        }
    }

    pub(super) fn emit_message(&mut self, seq: u64, m: Decrypted) {
        self.emitted.insert(seq, ());
        let from_own_device = m.from_user == self.shared.user_id;
        if m.group_id != 0 {
            self.emit(Event::GroupMessage {
                seq: Seq(seq),
                group_id: GroupId(m.group_id),
                group_seq: m.group_seq,
                from_user: UserId(m.from_user),
                from_device: DeviceId(m.from_device),
                from_phone: m.from_phone,
                from_own_device,
                client_msg_id: m.client_msg_id,
                payload: m.body,
                sent_at_ms: m.sent_at_ms,
                server_ts_ms: m.server_ts_ms,
            });
            return;
        }
        self.emit(Event::Message {
            seq: Seq(seq),
            from_user: UserId(m.from_user),
            from_device: DeviceId(m.from_device),
            from_phone: m.from_phone,
            to_user: UserId(m.to_user),
            from_own_device,
            client_msg_id: m.client_msg_id,
            payload: m.body,
            sent_at_ms: m.sent_at_ms,
            server_ts_ms: m.server_ts_ms,
        });
    }
}
