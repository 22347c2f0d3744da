//! Groups, on the shard that owns the group's id (PROTOCOL.md §11.24):
//! management (create, change, info), the group's one order, and group
//! messages.
//!
//! **One order.** Every message and every membership or info change gets
//! the group's next `group_seq` here, on the one shard that owns the group,
//! so concurrent changes are serialised without a lock. The entries for
//! member devices are staged in that order: for members this shard owns, in
//! the same batch; for the others, as durable mail to their shard, one
//! piece per shard and change, each naming the `group_seq` of the one
//! before it to that shard, so the receiver applies them in order (a gap
//! waits for the mail before it, which is posted again).
//!
//! **Stored once.** A message's payload is stored once (`store::Payloads`,
//! keyed by group and `group_seq`); every member device's queue gets a
//! reference: a `GroupMessage` entry holding only the group and the seq.
//! Entries are resolved to the whole message when they are pushed.
//!
//! **Collected when the last reference goes.** Each shard counts, per
//! payload, the references it queued and not yet removed (`held`); when an
//! acked entry's removal is committed and the count reaches zero, it tells
//! the group's shard, which counts the shards still holding references
//! (`awaiting`) and deletes the payload after the last. The counts live in
//! memory: after a restart, or for references dropped with a revoked
//! device's queue, the expiry sweep collects the payload after the queue
//! TTL instead.

use prost::Message;
use switchboard_proto::pb;

use super::{Shard, reply_now};
use crate::FastMap;
use crate::clock::now_ms;
use crate::router::order::Part;
use crate::router::{GroupSendRequest, GroupSent, Reply, RouteError, shard_of_user};
use crate::store::{
    DedupKey, DedupOp, DedupRecord, DeviceKey, GroupId, GroupOp, GroupRecord, MailRecord,
    MemberRecord, PayloadId, PayloadOp, PayloadRecord, Recipient, StoreError, UserId,
};

/// Most members a group may have.
pub(super) const MAX_GROUP_MEMBERS: usize = 1024;
/// Longest group name, description and icon reference (bytes).
pub(super) const MAX_GROUP_NAME_BYTES: usize = 100;
/// See [`MAX_GROUP_NAME_BYTES`].
pub(super) const MAX_GROUP_DESCRIPTION_BYTES: usize = 512;
/// See [`MAX_GROUP_NAME_BYTES`].
pub(super) const MAX_GROUP_ICON_REF_BYTES: usize = 256;
/// Group seqs reserved per counter write, as for queues.
const GROUP_SEQ_BLOCK: u64 = 1024;
/// Payloads resolved for pushes, kept per shard.
const PAYLOAD_CACHE: usize = 256;
/// Most payloads whose references one shard counts; past it, new ones are
/// left to the expiry sweep (memory stays bounded).
const MAX_COUNTED_PAYLOADS: usize = 1_000_000;

const MEMBER: i32 = pb::GroupRole::Member as i32;
const ADMIN: i32 = pb::GroupRole::Admin as i32;
const CREATOR: i32 = pb::GroupRole::Creator as i32;

/// A group this shard owns, as cached.
#[derive(Debug)]
pub(super) struct GroupState {
    record: GroupRecord,
    /// The last group_seq used and the highest reserved.
    last_seq: u64,
    reserved: u64,
    /// Per other shard: the group_seq of the last mail sent there (0: none
    /// since this shard started).
    sent_to: FastMap<usize, u64>,
}

/// The groups state of a shard.
#[derive(Debug, Default)]
pub(super) struct GroupCache {
    /// Groups this shard owns, loaded when first needed.
    owned: FastMap<GroupId, GroupState>,
    /// Per group: the last group_seq whose mail this shard applied (in
    /// memory; after a restart the first mail of a group is taken as is).
    applied: FastMap<GroupId, u64>,
    /// Whole group messages by (group, seq), for pushes.
    payloads: FastMap<(GroupId, u64), pb::GroupMessage>,
    /// Per payload: references this shard queued and has not removed.
    held: FastMap<(GroupId, u64), u64>,
    /// Per payload of a group this shard owns: shards still holding
    /// references to it.
    awaiting: FastMap<(GroupId, u64), u32>,
    /// References whose removal is staged in this batch.
    releasing: Vec<(GroupId, u64)>,
    /// The entries they are in: an entry acked twice (delivered again
    /// before its first removal committed) releases once.
    released_entries: crate::FastSet<(DeviceKey, u64)>,
    /// Payloads of which this batch queued no reference here (mail for
    /// members without devices): released once it commits.
    pub(super) none_held: Vec<(GroupId, u64)>,
}

impl GroupCache {
    /// Forgets everything (memory may be ahead of the store).
    pub(super) fn clear(&mut self) {
        self.owned.clear();
        self.applied.clear();
        self.payloads.clear();
        // Counts may be ahead of the store: their payloads are left to the
        // expiry sweep.
        self.held.clear();
        self.awaiting.clear();
        self.releasing.clear();
        self.released_entries.clear();
        self.none_held.clear();
    }

    /// Counts `n` more references to a payload queued on this shard.
    pub(super) fn hold(&mut self, payload: (GroupId, u64), n: u64) {
        if let Some(count) = self.held.get_mut(&payload) {
            *count += n;
        } else if self.held.len() < MAX_COUNTED_PAYLOADS {
            self.held.insert(payload, n);
        }
    }
}

fn role_of(record: &GroupRecord, user: UserId) -> Option<i32> {
    record
        .members
        .iter()
        .find(|m| m.user_id == user)
        .map(|m| m.role)
}

fn is_admin(role: i32) -> bool {
    role == ADMIN || role == CREATOR
}

/// The group as its members see it; `with_members` lists them.
fn info(record: &GroupRecord, seq: u64, with_members: bool) -> pb::GroupInfo {
    pb::GroupInfo {
        group_id: record.group_id,
        name: record.name.clone(),
        description: record.description.clone(),
        icon_ref: record.icon_ref.clone(),
        info_admin_only: record.info_admin_only,
        members: if with_members {
            record
                .members
                .iter()
                .map(|m| pb::GroupMember {
                    user_id: m.user_id,
                    role: m.role,
                    joined_seq: m.joined_seq,
                    phone: m.phone.clone(),
                })
                .collect()
        } else {
            Vec::new()
        },
        seq,
        created_ms: record.created_ms,
    }
}

fn check_len(what: &str, value: &str, max: usize, min: usize) -> Result<(), RouteError> {
    if value.len() < min || value.len() > max {
        return Err(RouteError::BadRequest(format!(
            "the group {what} must be {min} to {max} bytes"
        )));
    }
    Ok(())
}

/// A user ids list without duplicates, in first-seen order.
fn distinct(users: &[UserId]) -> Vec<UserId> {
    let mut seen = crate::FastSet::default();
    users.iter().copied().filter(|u| seen.insert(*u)).collect()
}

impl Shard {
    /// The group's state, loaded from the store when not cached; `None`
    /// when there is no such group.
    fn group_state(&mut self, group: GroupId) -> Result<Option<&mut GroupState>, StoreError> {
        if !self.groups.owned.contains_key(&group) {
            let Some(record) = self.store.group(group)? else {
                return Ok(None);
            };
            // After a restart, continue above everything reserved.
            let reserved = self.store.group_reserved_seq(group)?;
            self.groups.owned.insert(
                group,
                GroupState {
                    record,
                    last_seq: reserved,
                    reserved,
                    sent_to: FastMap::default(),
                },
            );
        }
        Ok(self.groups.owned.get_mut(&group))
    }

    /// The next group_seq, staging a new block's reservation when needed.
    fn next_group_seq(&mut self, group: GroupId) -> Option<u64> {
        let state = self.groups.owned.get_mut(&group)?;
        state.last_seq += 1;
        let seq = state.last_seq;
        if seq > state.reserved {
            state.reserved = seq + GROUP_SEQ_BLOCK - 1;
            let upto = state.reserved;
            self.stage(GroupOp::ReserveSeqs { group, upto });
        }
        Some(seq)
    }

    /// A registered user's phone number.
    fn phone_of(&mut self, user: UserId) -> Result<Option<String>, StoreError> {
        if self.owns_user(user) {
            return Ok(self.user(user)?.map(|u| u.phone.clone()));
        }
        Ok(self.store.user(user)?.map(|u| u.phone))
    }

    /// New member records for `users` (all must be registered).
    fn new_members(
        &mut self,
        users: &[UserId],
        role: i32,
        joined_seq: u64,
    ) -> Result<Vec<MemberRecord>, RouteError> {
        let mut out = Vec::with_capacity(users.len());
        for &user_id in users {
            let phone = self.phone_of(user_id)?.ok_or_else(|| {
                RouteError::BadRequest(format!("user {user_id} is not registered"))
            })?;
            out.push(MemberRecord {
                user_id,
                role,
                joined_seq,
                phone,
            });
        }
        Ok(out)
    }

    pub(super) fn create_group(
        &mut self,
        group: GroupId,
        creator: DeviceKey,
        req: pb::CreateGroup,
        reply: Reply<pb::GroupInfo>,
    ) {
        let result = self.try_create_group(group, creator, req);
        match result {
            Ok(info) => self.after_commit(reply, Ok(info)),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    fn try_create_group(
        &mut self,
        group: GroupId,
        creator: DeviceKey,
        req: pb::CreateGroup,
    ) -> Result<pb::GroupInfo, RouteError> {
        check_len("name", &req.name, MAX_GROUP_NAME_BYTES, 1)?;
        check_len(
            "description",
            &req.description,
            MAX_GROUP_DESCRIPTION_BYTES,
            0,
        )?;
        check_len("icon reference", &req.icon_ref, MAX_GROUP_ICON_REF_BYTES, 0)?;
        let others: Vec<UserId> = distinct(&req.members)
            .into_iter()
            .filter(|u| *u != creator.user)
            .collect();
        if others.len() + 1 > MAX_GROUP_MEMBERS {
            return Err(RouteError::GroupFull);
        }
        if self.group_state(group)?.is_some() {
            // A random id that is taken: the client retries and gets another.
            return Err(RouteError::Internal);
        }
        let now = now_ms();
        let mut members = self.new_members(&[creator.user], CREATOR, 1)?;
        members.extend(self.new_members(&others, MEMBER, 1)?);
        let record = GroupRecord {
            group_id: group,
            name: req.name,
            description: req.description,
            icon_ref: req.icon_ref,
            info_admin_only: req.info_admin_only,
            created_ms: now,
            members,
        };
        self.groups.owned.insert(
            group,
            GroupState {
                record: record.clone(),
                last_seq: 0,
                reserved: 0,
                sent_to: FastMap::default(),
            },
        );
        let seq = self.next_group_seq(group).ok_or(RouteError::Internal)?;
        for m in &record.members {
            self.stage(GroupOp::PutMembership {
                user: m.user_id,
                group,
            });
        }
        self.stage(GroupOp::PutGroup(record.clone()));
        let all: Vec<UserId> = record.members.iter().map(|m| m.user_id).collect();
        let event = pb::GroupEvent {
            group_id: group,
            group_seq: seq,
            actor: creator.user,
            kind: pb::GroupEventKind::Created as i32,
            users: all.clone(),
            info: Some(info(&record, seq, false)),
        };
        self.fan_out(
            group,
            seq,
            now,
            &all,
            &pb::queue_entry::Body::GroupEvent(event),
            None,
            None,
        )?;
        Ok(info(&record, seq, true))
    }

    pub(super) fn change_group(
        &mut self,
        by: DeviceKey,
        req: pb::ChangeGroup,
        reply: Reply<pb::GroupInfo>,
    ) {
        match self.try_change_group(by, req) {
            Ok(info) => self.after_commit(reply, Ok(info)),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    fn try_change_group(
        &mut self,
        by: DeviceKey,
        req: pb::ChangeGroup,
    ) -> Result<pb::GroupInfo, RouteError> {
        use pb::change_group::Change;
        let group = req.group_id;
        let Some(state) = self.group_state(group)? else {
            return Err(RouteError::UnknownGroup);
        };
        let Some(my_role) = role_of(&state.record, by.user) else {
            return Err(RouteError::UnknownGroup);
        };
        let mut record = state.record.clone();
        let change = req
            .change
            .ok_or_else(|| RouteError::BadRequest("ChangeGroup needs a change".into()))?;
        let admin_only = |role: i32| {
            if is_admin(role) {
                Ok(())
            } else {
                Err(RouteError::NotGroupAdmin)
            }
        };
        let member_index = |record: &GroupRecord, user: UserId| {
            record
                .members
                .iter()
                .position(|m| m.user_id == user)
                .ok_or_else(|| RouteError::BadRequest(format!("user {user} is not a member")))
        };
        // What to announce: kind, whom, and who else must hear it (a
        // removed or leaving member).
        let (kind, users, extra): (pb::GroupEventKind, Vec<UserId>, Vec<UserId>);
        let mut event_info = None;
        let mut also = None;
        match change {
            Change::Add(add) => {
                admin_only(my_role)?;
                let new: Vec<UserId> = distinct(&add.users)
                    .into_iter()
                    .filter(|u| role_of(&record, *u).is_none())
                    .collect();
                if new.is_empty() {
                    let seq = self.group_state(group)?.map_or(0, |s| s.last_seq);
                    return Ok(info(&record, seq, true));
                }
                if record.members.len() + new.len() > MAX_GROUP_MEMBERS {
                    return Err(RouteError::GroupFull);
                }
                // joined_seq is set below, once the seq is taken.
                record.members.extend(self.new_members(&new, MEMBER, 0)?);
                (kind, users, extra) = (pb::GroupEventKind::Added, new, Vec::new());
            }
            Change::Remove(user) => {
                admin_only(my_role)?;
                let i = member_index(&record, user)?;
                if record.members[i].role == CREATOR {
                    return Err(RouteError::NotGroupAdmin);
                }
                record.members.remove(i);
                (kind, users, extra) = (pb::GroupEventKind::Removed, vec![user], vec![user]);
            }
            Change::Promote(user) => {
                admin_only(my_role)?;
                let i = member_index(&record, user)?;
                if is_admin(record.members[i].role) {
                    let seq = self.group_state(group)?.map_or(0, |s| s.last_seq);
                    return Ok(info(&record, seq, true));
                }
                record.members[i].role = ADMIN;
                (kind, users, extra) = (pb::GroupEventKind::Promoted, vec![user], Vec::new());
            }
            Change::Demote(user) => {
                admin_only(my_role)?;
                let i = member_index(&record, user)?;
                match record.members[i].role {
                    CREATOR => return Err(RouteError::NotGroupAdmin),
                    MEMBER => {
                        let seq = self.group_state(group)?.map_or(0, |s| s.last_seq);
                        return Ok(info(&record, seq, true));
                    }
                    _ => record.members[i].role = MEMBER,
                }
                (kind, users, extra) = (pb::GroupEventKind::Demoted, vec![user], Vec::new());
            }
            Change::Edit(edit) => {
                if record.info_admin_only || edit.info_admin_only.is_some() {
                    admin_only(my_role)?;
                }
                if let Some(name) = edit.name {
                    check_len("name", &name, MAX_GROUP_NAME_BYTES, 1)?;
                    record.name = name;
                }
                if let Some(d) = edit.description {
                    check_len("description", &d, MAX_GROUP_DESCRIPTION_BYTES, 0)?;
                    record.description = d;
                }
                if let Some(icon) = edit.icon_ref {
                    check_len("icon reference", &icon, MAX_GROUP_ICON_REF_BYTES, 0)?;
                    record.icon_ref = icon;
                }
                if let Some(only) = edit.info_admin_only {
                    record.info_admin_only = only;
                }
                event_info = Some(());
                (kind, users, extra) = (pb::GroupEventKind::InfoChanged, Vec::new(), Vec::new());
            }
            Change::Leave(_) => {
                let i = member_index(&record, by.user)?;
                let leaving = record.members.remove(i);
                if leaving.role == CREATOR
                    && let Some(heir) = record.members.iter().position(|m| m.role == ADMIN).or(
                        if record.members.is_empty() {
                            None
                        } else {
                            Some(0)
                        },
                    )
                {
                    record.members[heir].role = CREATOR;
                    also = Some(record.members[heir].user_id);
                }
                (kind, users, extra) = (pb::GroupEventKind::Left, vec![by.user], vec![by.user]);
            }
        }
        let now = now_ms();
        let seq = self.next_group_seq(group).ok_or(RouteError::Internal)?;
        for m in &mut record.members {
            if m.joined_seq == 0 {
                m.joined_seq = seq;
            }
        }
        let mut targets: Vec<UserId> = record.members.iter().map(|m| m.user_id).collect();
        targets.extend(extra.iter().copied());
        let event = pb::GroupEvent {
            group_id: group,
            group_seq: seq,
            actor: by.user,
            kind: kind as i32,
            users: users.clone(),
            info: event_info.map(|()| info(&record, seq, false)),
        };
        self.fan_out(
            group,
            seq,
            now,
            &targets,
            &pb::queue_entry::Body::GroupEvent(event),
            None,
            None,
        )?;
        let mut last = seq;
        if let Some(heir) = also {
            let seq = self.next_group_seq(group).ok_or(RouteError::Internal)?;
            let event = pb::GroupEvent {
                group_id: group,
                group_seq: seq,
                actor: by.user,
                kind: pb::GroupEventKind::CreatorChanged as i32,
                users: vec![heir],
                info: None,
            };
            let members: Vec<UserId> = record.members.iter().map(|m| m.user_id).collect();
            self.fan_out(
                group,
                seq,
                now,
                &members,
                &pb::queue_entry::Body::GroupEvent(event),
                None,
                None,
            )?;
            last = seq;
        }
        match kind {
            pb::GroupEventKind::Added => {
                for &user in &users {
                    self.stage(GroupOp::PutMembership { user, group });
                }
            }
            pb::GroupEventKind::Removed | pb::GroupEventKind::Left => {
                for &user in &users {
                    self.stage(GroupOp::DeleteMembership { user, group });
                }
            }
            _ => {}
        }
        let answer = if kind == pb::GroupEventKind::Left {
            info(&record, last, false)
        } else {
            info(&record, last, true)
        };
        if record.members.is_empty() {
            self.stage(GroupOp::DropGroup(group));
            self.groups.owned.remove(&group);
        } else {
            self.stage(GroupOp::PutGroup(record.clone()));
            if let Some(state) = self.groups.owned.get_mut(&group) {
                state.record = record;
            }
        }
        Ok(answer)
    }

    pub(super) fn get_group(&mut self, by: UserId, group: GroupId, reply: Reply<pb::GroupInfo>) {
        let result = match self.group_state(group) {
            Ok(Some(state)) if role_of(&state.record, by).is_some() => {
                Ok(info(&state.record, state.last_seq, true))
            }
            Ok(_) => Err(RouteError::UnknownGroup),
            Err(e) => Err(e.into()),
        };
        // After the commit: a change staged in this batch is not yet durable.
        self.after_commit(reply, result);
    }

    /// The groups of `user` (read from the store: every change is
    /// committed before it is answered).
    pub(super) fn list_groups(&mut self, user: UserId, reply: Reply<Vec<pb::GroupSummary>>) {
        let result = (|| -> Result<Vec<pb::GroupSummary>, StoreError> {
            let mut out = Vec::new();
            for group in self.store.user_groups(user)? {
                if let Some(record) = self.store.group(group)?
                    && let Some(role) = role_of(&record, user)
                {
                    out.push(pb::GroupSummary {
                        group_id: group,
                        name: record.name,
                        role,
                        members: u32::try_from(record.members.len()).unwrap_or(u32::MAX),
                    });
                }
            }
            Ok(out)
        })();
        reply_now(reply, result.map_err(Into::into));
    }

    /// Tells every member of `group`, in the group's order, that member
    /// `user` has a new device with keys (so senders give it their key).
    pub(super) fn member_devices_changed(
        &mut self,
        group: GroupId,
        user: UserId,
        reply: Reply<()>,
    ) {
        let result = (|| -> Result<bool, RouteError> {
            let Some(state) = self.group_state(group)? else {
                return Ok(false);
            };
            if role_of(&state.record, user).is_none() {
                return Ok(false);
            }
            let members: Vec<UserId> = state.record.members.iter().map(|m| m.user_id).collect();
            let seq = self.next_group_seq(group).ok_or(RouteError::Internal)?;
            let event = pb::GroupEvent {
                group_id: group,
                group_seq: seq,
                actor: user,
                kind: pb::GroupEventKind::MemberDevicesChanged as i32,
                users: vec![user],
                info: None,
            };
            self.fan_out(
                group,
                seq,
                now_ms(),
                &members,
                &pb::queue_entry::Body::GroupEvent(event),
                None,
                None,
            )?;
            Ok(true)
        })();
        match result {
            Ok(true) => self.after_commit(reply, Ok(())),
            Ok(false) => reply_now(reply, Ok(())),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    pub(super) fn send_group(&mut self, req: GroupSendRequest, reply: Reply<GroupSent>) {
        match self.try_send_group(req) {
            Ok((accepted, true)) => self.after_commit(reply, Ok(accepted)),
            Ok((accepted, false)) => reply_now(reply, Ok(accepted)),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    /// Stages a group message; says whether its answer waits for the commit.
    fn try_send_group(&mut self, req: GroupSendRequest) -> Result<(GroupSent, bool), RouteError> {
        let group = req.group_id;
        let key = DedupKey {
            to: Recipient::Group(group),
            from: req.from,
            client_msg_id: req.client_msg_id.clone(),
        };
        let Some(state) = self.group_state(group)? else {
            return Err(RouteError::UnknownGroup);
        };
        if role_of(&state.record, req.from.user).is_none() {
            return Err(RouteError::UnknownGroup);
        }
        if let Some(&(server_ts_ms, group_seq)) = self.staged_group_dedup.get(&key) {
            return Ok((
                GroupSent {
                    server_ts_ms,
                    duplicate: true,
                    group_seq,
                },
                true,
            ));
        }
        if !req.first_attempt
            && let Some(rec) = self.store.dedup(&key)?
        {
            self.holds
                .release((req.from, group, Part::Group), &req.client_msg_id);
            return Ok((
                GroupSent {
                    server_ts_ms: rec.server_ts_ms,
                    duplicate: true,
                    group_seq: rec.group_seq,
                },
                false,
            ));
        }
        // Behind a refused earlier message of this device to the group
        // (`router::order`).
        let order = (req.from, group, Part::Group);
        self.holds.check(order, &req.client_msg_id, now_ms())?;
        let members: Vec<UserId> = self
            .groups
            .owned
            .get(&group)
            .map(|s| s.record.members.iter().map(|m| m.user_id).collect())
            .unwrap_or_default();
        let now = now_ms();
        let seq = self.next_group_seq(group).ok_or(RouteError::Internal)?;
        let client_msg_id = req.client_msg_id.clone();
        let whole = pb::GroupMessage {
            group_id: group,
            group_seq: seq,
            from_user: req.from.user,
            from_device: req.from.device,
            from_phone: req.from_phone,
            client_msg_id: req.client_msg_id,
            payload: req.payload,
        };
        let reference = pb::GroupMessage {
            group_id: group,
            group_seq: seq,
            ..pb::GroupMessage::default()
        };
        self.fan_out(
            group,
            seq,
            now,
            &members,
            &pb::queue_entry::Body::GroupMessage(reference),
            Some(&pb::queue_entry::Body::GroupMessage(whole.clone())),
            Some(req.from),
        )?;
        // The payload before anything that references it (`Op::domain_rank`).
        self.stage(PayloadOp::Put {
            id: PayloadId { owner: group, seq },
            record: PayloadRecord {
                body: whole.encode_to_vec().into(),
                created_ms: now,
            },
        });
        self.remember_payload(whole);
        self.staged_group_dedup.insert(key.clone(), (now, seq));
        self.stage(DedupOp::Put {
            key,
            record: DedupRecord {
                server_ts_ms: now,
                accepted_ms: now,
                voided: false,
                group_seq: seq,
            },
        });
        self.messages_in += 1;
        // Held behind if the batch fails to commit.
        self.batch_sends.push((order, client_msg_id));
        Ok((
            GroupSent {
                server_ts_ms: now,
                duplicate: false,
                group_seq: seq,
            },
            true,
        ))
    }

    /// Stages entry `stored` (pushed as `live` when given) for every device
    /// of `users` but `skip`: this shard's users in this batch, the others
    /// by mail to their shard.
    #[allow(clippy::too_many_arguments)]
    fn fan_out(
        &mut self,
        group: GroupId,
        seq: u64,
        ts: u64,
        users: &[UserId],
        stored: &pb::queue_entry::Body,
        live: Option<&pb::queue_entry::Body>,
        skip: Option<DeviceKey>,
    ) -> Result<(), RouteError> {
        let mut by_shard: FastMap<usize, Vec<UserId>> = FastMap::default();
        let mut local = Vec::new();
        for &user in users {
            if self.owns_user(user) {
                let devices: Vec<u32> = match self.user(user)? {
                    Some(u) => u.devices.iter().map(|d| d.device_id).collect(),
                    None => continue,
                };
                for d in devices {
                    let device = DeviceKey { user, device: d };
                    if Some(device) != skip && self.group_entry_fits(device)? {
                        local.push((device, self.next_seq(device)?));
                    }
                }
            } else {
                by_shard
                    .entry(shard_of_user(user, self.shards))
                    .or_default()
                    .push(user);
            }
        }
        let payload = matches!(stored, pb::queue_entry::Body::GroupMessage(_));
        if payload && !local.is_empty() {
            self.groups.hold((group, seq), local.len() as u64);
        }
        let holders = u32::from(payload && !local.is_empty()) + by_shard.len() as u32;
        if payload && holders > 0 && self.groups.awaiting.len() < MAX_COUNTED_PAYLOADS {
            self.groups.awaiting.insert((group, seq), holders);
        }
        for (device, qseq) in local {
            self.stage_entry_pushed_as(device, qseq, ts, stored.clone(), live.cloned());
        }
        let mut shards: Vec<(usize, Vec<UserId>)> = by_shard.into_iter().collect();
        shards.sort_unstable_by_key(|(s, _)| *s);
        for (shard, to_users) in shards {
            let prev = self
                .groups
                .owned
                .get_mut(&group)
                .map_or(0, |s| s.sent_to.insert(shard, seq).unwrap_or(0));
            let record = MailRecord {
                to_user: to_users.first().copied().unwrap_or_default(),
                entry: Some(pb::QueueEntry {
                    seq: 0,
                    server_ts_ms: ts,
                    body: Some(stored.clone()),
                }),
                to_users,
                group_id: group,
                group_seq: seq,
                prev_group_seq: prev,
                skip_user: skip.map_or(0, |d| d.user),
                skip_device: skip.map_or(0, |d| d.device),
            };
            let op = self.mail.stage(group, record, ts);
            self.stage(op);
        }
        Ok(())
    }

    /// Whether one more group entry fits `device`'s queue quota. A group
    /// entry is never refused for one member's full queue (that would let
    /// one absent member stop the group): it is left out of that queue, and
    /// counted.
    pub(super) fn group_entry_fits(&mut self, device: DeviceKey) -> Result<bool, RouteError> {
        /// A reference or an event, roughly (quota accounting only).
        const GROUP_ENTRY_BYTES: u64 = 64;
        match self.check_quota(std::iter::once((device, GROUP_ENTRY_BYTES))) {
            Ok(()) => Ok(true),
            Err(RouteError::QueueFull { .. }) => {
                metrics::counter!(crate::telemetry::GROUP_ENTRIES_DROPPED).increment(1);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether group mail for `group` at `seq` (following `prev` to this
    /// shard) may be applied now: not while the mail before it is missing.
    pub(super) fn group_mail_in_order(&self, group: GroupId, seq: u64, prev: u64) -> bool {
        match self.groups.applied.get(&group) {
            Some(&last) => prev == 0 || last >= prev || seq <= last,
            None => true,
        }
    }

    /// Group mail for `group` at `seq` was applied in this batch.
    pub(super) fn group_mail_applied(&mut self, group: GroupId, seq: u64) {
        let last = self.groups.applied.entry(group).or_default();
        *last = (*last).max(seq);
    }

    /// The removal of `device`'s entries `(seq, payload)` is staged: each
    /// entry still stored releases its payload reference, once.
    pub(super) fn release_references(
        &mut self,
        device: DeviceKey,
        released: Vec<(u64, (GroupId, u64))>,
    ) {
        for (seq, payload) in released {
            if !self.groups.released_entries.insert((device, seq)) {
                continue;
            }
            let stored = seq
                .checked_sub(1)
                .and_then(|after| self.store.read_queue(device, after, 1).ok())
                .is_some_and(|e| e.first().is_some_and(|e| e.seq == seq));
            if stored {
                self.groups.releasing.push(payload);
            }
        }
    }

    /// The batch committed (`ok`) or failed: counts the removed references
    /// down, and tells each payload's group shard when this shard holds no
    /// more of them.
    pub(super) fn after_commit_groups(&mut self, ok: bool) {
        let releasing = std::mem::take(&mut self.groups.releasing);
        self.groups.released_entries.clear();
        let mut none_held = std::mem::take(&mut self.groups.none_held);
        if !ok {
            return;
        }
        for payload in releasing {
            if let Some(count) = self.groups.held.get_mut(&payload) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.groups.held.remove(&payload);
                    none_held.push(payload);
                }
            }
        }
        for (group, seq) in none_held {
            let owner = shard_of_user(group, self.shards);
            if owner == self.id {
                self.payload_released(group, seq);
            } else if let Some(peer) = self
                .peers
                .get(owner)
                .and_then(tokio::sync::mpsc::WeakSender::upgrade)
            {
                // Lost if that inbox is full: the expiry sweep collects it.
                let _ = peer.try_send(super::Queued::new(super::Command::PayloadReleased {
                    group,
                    seq,
                }));
            }
        }
    }

    /// A shard holds no more references to the payload of `(group, seq)`:
    /// after the last one, it is deleted.
    pub(super) fn payload_released(&mut self, group: GroupId, seq: u64) {
        let Some(left) = self.groups.awaiting.get_mut(&(group, seq)) else {
            return;
        };
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.groups.awaiting.remove(&(group, seq));
            self.groups.payloads.remove(&(group, seq));
            self.stage(PayloadOp::Delete(PayloadId { owner: group, seq }));
            metrics::counter!(crate::telemetry::GROUP_PAYLOADS_COLLECTED, "reason" => "released")
                .increment(1);
        }
    }

    fn remember_payload(&mut self, message: pb::GroupMessage) {
        if self.groups.payloads.len() >= PAYLOAD_CACHE {
            self.groups.payloads.clear();
        }
        self.groups
            .payloads
            .insert((message.group_id, message.group_seq), message);
    }

    /// The whole message a stored reference stands for; `None` when its
    /// payload is gone (expired).
    pub(super) fn resolve_group_message(
        &mut self,
        reference: &pb::GroupMessage,
    ) -> Result<Option<pb::GroupMessage>, StoreError> {
        let key = (reference.group_id, reference.group_seq);
        if let Some(m) = self.groups.payloads.get(&key) {
            return Ok(Some(m.clone()));
        }
        let Some(record) = self.store.payload(PayloadId {
            owner: reference.group_id,
            seq: reference.group_seq,
        })?
        else {
            return Ok(None);
        };
        let message = pb::GroupMessage::decode(record.body).map_err(|e| StoreError::Corrupt {
            what: "payload",
            detail: e.to_string(),
        })?;
        self.remember_payload(message.clone());
        Ok(Some(message))
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;
    use tokio::sync::oneshot;

    impl crate::router::Router {
        /// Creates a group with `creator` as its creator.
        ///
        /// # Errors
        /// [`RouteError::GroupFull`], [`RouteError::BadRequest`] (names,
        /// unregistered members), storage.
        pub async fn create_group(
            &self,
            creator: DeviceKey,
            req: pb::CreateGroup,
        ) -> Result<pb::GroupInfo, RouteError> {
            let group: GroupId = rand::random::<u64>().max(1);
            self.call(self.user_shard(group), |reply| Command::CreateGroup {
                group,
                creator,
                req,
                reply,
            })
            .await
        }

        /// Applies one change to a group on behalf of `by`.
        ///
        /// # Errors
        /// [`RouteError::UnknownGroup`], [`RouteError::NotGroupAdmin`],
        /// [`RouteError::GroupFull`], [`RouteError::BadRequest`], storage.
        pub async fn change_group(
            &self,
            by: DeviceKey,
            req: pb::ChangeGroup,
        ) -> Result<pb::GroupInfo, RouteError> {
            self.call(self.user_shard(req.group_id), |reply| {
                Command::ChangeGroup { by, req, reply }
            })
            .await
        }

        /// A group as member `by` sees it.
        ///
        /// # Errors
        /// [`RouteError::UnknownGroup`] (also for non-members), storage.
        pub async fn get_group(
            &self,
            by: UserId,
            group: GroupId,
        ) -> Result<pb::GroupInfo, RouteError> {
            self.call(self.user_shard(group), |reply| Command::GetGroup {
                by,
                group,
                reply,
            })
            .await
        }

        /// The groups `user` is a member of.
        ///
        /// # Errors
        /// Storage.
        pub async fn list_groups(&self, user: UserId) -> Result<Vec<pb::GroupSummary>, RouteError> {
            self.call(self.user_shard(user), |reply| Command::ListGroups {
                user,
                reply,
            })
            .await
        }

        /// Tells the members of every group of `user` that it has a new
        /// device with keys (a `MEMBER_DEVICES_CHANGED` event in each
        /// group's order), so their clients give it their sender keys.
        /// Best effort: a group that cannot be reached is logged and
        /// skipped (its senders' keys reach the device at their next
        /// rotation).
        pub async fn announce_new_device(&self, user: UserId) {
            let groups = match self.list_groups(user).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::warn!(user, error = %e, "cannot list a user's groups to announce its new device");
                    return;
                }
            };
            for g in groups {
                let group = g.group_id;
                let result = self
                    .call(self.user_shard(group), |reply| {
                        Command::MemberDevicesChanged { group, user, reply }
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(user, group, error = %e, "cannot announce a new device to a group");
                }
            }
        }

        /// Hands a message to every member device of a group to the group's
        /// shard; returns once it is in the shard's inbox (so a device's
        /// group messages reach the shard in frame order). The receiver
        /// yields the ✓ once the message is stored with every member's
        /// reference (or the mail that owes it), or the refusal
        /// ([`RouteError::UnknownGroup`], also for non-members; storage; a
        /// hold behind a refused earlier message).
        ///
        /// # Errors
        /// [`RouteError::Overloaded`] or [`RouteError::ShuttingDown`].
        pub async fn submit_group_send(
            &self,
            req: GroupSendRequest,
        ) -> Result<oneshot::Receiver<Result<GroupSent, RouteError>>, RouteError> {
            let (reply, rx) = oneshot::channel();
            self.enqueue(
                self.user_shard(req.group_id),
                Command::SendGroup { req, reply },
            )
            .await?;
            Ok(rx)
        }
    }
}
