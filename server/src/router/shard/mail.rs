//! Shard mail (`router/mail.rs` keeps the mailroom): loading and posting
//! it, applying mail from other shards, and the `Undelivered` notices for
//! messages left in the queues of replaced devices.

use std::collections::BTreeSet;
use std::time::Instant;

use prost::Message;
use switchboard_proto::pb;

use super::Shard;
use crate::clock::now_ms;
use crate::router::mail::MailId;
use crate::router::shard_of_user;
use crate::store::{
    DedupKey, DedupOp, DedupRecord, DeviceId, DeviceKey, MailRecord, Op, QueueOp, Recipient,
    StoreError, UserId,
};

/// The sending "device" in the dedup records of applied shard mail (no
/// real device has this id: they count up from 1).
const MAIL_DEVICE: DeviceId = DeviceId::MAX;

impl Shard {
    /// Loads the mail an earlier run left undelivered, and posts it.
    pub(super) fn load_mail(&mut self) {
        if self.mail.loaded() {
            return;
        }
        match self.store.mail() {
            Ok(stored) => {
                let (id, shards) = (self.id, self.shards);
                self.mail
                    .load(stored, |owner| shard_of_user(owner, shards) == id);
                self.mail.post(
                    self.id,
                    &self.peers,
                    |user| shard_of_user(user, shards),
                    Instant::now(),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load shard mail; retrying on the next tick")
            }
        }
    }

    pub(super) fn tick(&mut self) {
        self.load_mail();
        let shards = self.shards;
        self.mail.post(
            self.id,
            &self.peers,
            |user| shard_of_user(user, shards),
            Instant::now(),
        );
        self.metrics.mail_pending.set(self.mail.pending() as f64);
    }

    /// Queues the entry of mail from shard `from` for every device of its
    /// users; confirmed once committed. A user gone meanwhile needs
    /// nothing. Group mail waits (unconfirmed, so it is posted again) while
    /// the group's mail before it to this shard is missing.
    pub(super) fn receive_mail(&mut self, from: usize, id: MailId, record: MailRecord) {
        // Applied before (its confirmation was lost, or the sender
        // restarted first): confirm again, queue nothing.
        let applied = DedupKey {
            to: Recipient::User(record.to_user),
            from: DeviceKey {
                user: id.0,
                device: MAIL_DEVICE,
            },
            client_msg_id: format!("mail-{}", id.1),
        };
        let seen = if self.staged_dedup.contains_key(&applied) {
            true
        } else {
            match self.store.dedup(&applied) {
                Ok(rec) => rec.is_some(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot apply shard mail now");
                    return;
                }
            }
        };
        if seen {
            crate::router::mail::confirm(&self.peers, from, id);
            return;
        }
        let group = record.group_id;
        if group != 0 && !self.group_mail_in_order(group, record.group_seq, record.prev_group_seq) {
            tracing::debug!(
                group,
                seq = record.group_seq,
                "group mail ahead of a missing one; waiting for it"
            );
            return;
        }
        let users = if record.to_users.is_empty() {
            vec![record.to_user]
        } else {
            record.to_users.clone()
        };
        let skip = DeviceKey {
            user: record.skip_user,
            device: record.skip_device,
        };
        let (ts, body) = match record.entry {
            Some(e) => (e.server_ts_ms, e.body),
            None => (0, None),
        };
        let now = now_ms();
        let ts = if ts == 0 { now } else { ts };
        // A group message goes out whole; its payload is committed before
        // its mail is posted.
        let live = match &body {
            Some(pb::queue_entry::Body::GroupMessage(reference)) => {
                match self.resolve_group_message(reference) {
                    Ok(whole) => whole.map(pb::queue_entry::Body::GroupMessage),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot apply shard mail now");
                        return;
                    }
                }
            }
            _ => None,
        };
        let mut seqs = Vec::new();
        if body.is_some() {
            for user in users {
                let devices: Vec<u32> = match self.user(user) {
                    Ok(Some(u)) => u.devices.iter().map(|d| d.device_id).collect(),
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        // Not confirmed: the sender posts it again later.
                        tracing::warn!(error = %e, "cannot apply shard mail now");
                        return;
                    }
                };
                for d in devices {
                    let device = DeviceKey { user, device: d };
                    if device == skip {
                        continue;
                    }
                    if group != 0 {
                        match self.group_entry_fits(device) {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot apply shard mail now");
                                return;
                            }
                        }
                    }
                    match self.next_seq(device) {
                        Ok(seq) => seqs.push((device, seq)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot apply shard mail now");
                            return;
                        }
                    }
                }
            }
        }
        if matches!(body, Some(pb::queue_entry::Body::GroupMessage(_))) {
            let payload = (group, record.group_seq);
            if seqs.is_empty() {
                self.groups.none_held.push(payload);
            } else {
                self.groups.hold(payload, seqs.len() as u64);
            }
        }
        if let Some(body) = body {
            for (device, seq) in seqs {
                self.stage_entry_pushed_as(device, seq, ts, body.clone(), live.clone());
            }
        }
        if group != 0 {
            self.group_mail_applied(group, record.group_seq);
        }
        self.staged_dedup.insert(applied.clone(), now);
        self.stage(DedupOp::Put {
            key: applied,
            record: DedupRecord {
                server_ts_ms: now,
                accepted_ms: now,
                voided: false,
                group_seq: 0,
            },
        });
        self.mail.applied(from, id);
    }

    /// The messages from other users waiting in the queues of `devices`
    /// (about to be dropped), as `Undelivered` mail to each sender, and the
    /// voiding of their dedup records so that resends are stored. Reads
    /// each queue whole: bounded by the queue quota, and re-registration
    /// by the code limits.
    pub(super) fn undelivered(
        &mut self,
        user: UserId,
        devices: &[DeviceId],
    ) -> Result<(), StoreError> {
        /// Message ids per notice.
        const IDS_PER_NOTICE: usize = 512;
        let mut by_sender: std::collections::BTreeMap<DeviceKey, BTreeSet<String>> =
            std::collections::BTreeMap::new();
        let mut note = |bytes: &[u8]| {
            if let Ok(pb::QueueEntry {
                body: Some(pb::queue_entry::Body::Message(m)),
                ..
            }) = pb::QueueEntry::decode(bytes)
                && m.from_user != user
            {
                by_sender
                    .entry(DeviceKey {
                        user: m.from_user,
                        device: m.from_device,
                    })
                    .or_default()
                    .insert(m.client_msg_id);
            }
        };
        for &d in devices {
            let device = DeviceKey { user, device: d };
            let mut after = 0;
            loop {
                let page = self.store.read_queue(device, after, 1024)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    note(&e.bytes);
                }
            }
        }
        // Entries staged in this batch are not in the store yet.
        for op in &self.ops {
            if let Op::Queue(QueueOp::Enqueue { device, entry }) = op
                && device.user == user
                && devices.contains(&device.device)
            {
                note(&entry.bytes);
            }
        }
        let now = now_ms();
        for (sender, ids) in by_sender {
            for id in &ids {
                let key = DedupKey {
                    to: Recipient::User(user),
                    from: sender,
                    client_msg_id: id.clone(),
                };
                self.staged_dedup.remove(&key);
                self.stage(DedupOp::Put {
                    key,
                    record: DedupRecord {
                        server_ts_ms: 0,
                        accepted_ms: now,
                        voided: true,
                        group_seq: 0,
                    },
                });
            }
            let ids: Vec<String> = ids.into_iter().collect();
            for chunk in ids.chunks(IDS_PER_NOTICE) {
                let record = MailRecord {
                    to_user: sender.user,
                    entry: Some(pb::QueueEntry {
                        seq: 0,
                        server_ts_ms: now,
                        body: Some(pb::queue_entry::Body::Undelivered(pb::Undelivered {
                            to_user: user,
                            from_device: sender.device,
                            client_msg_ids: chunk.to_vec(),
                            reason: pb::UndeliveredReason::DevicesReplaced.into(),
                        })),
                    }),
                    ..MailRecord::default()
                };
                let op = self.mail.stage(user, record, now);
                self.stage(op);
            }
        }
        Ok(())
    }

    /// This shard's mail `id` was applied: it is forgotten.
    pub(super) fn mail_done(&mut self, id: MailId) {
        if let Some(op) = self.mail.done(id) {
            self.stage(op);
        }
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::{Command, Queued};

    impl crate::router::Router {
        /// Asks every shard for its periodic upkeep (mail not yet delivered is
        /// posted again; skipped by busy shards).
        pub fn tick(&self) {
            for shard in self.local() {
                let _ = shard.try_send(Queued::new(Command::Tick));
            }
        }
    }
}
