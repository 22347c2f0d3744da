//! Groups on the [`Client`]: management calls, the end-to-end encrypted
//! group send, and the types they return.
//!
//! A group message is sealed once with this device's Megolm sender key for
//! the group; before the first message (and after every rotation) the key
//! goes to each member device pairwise over Olm, many members per request
//! (`SendGroupKeys`). The client does all of that inside
//! [`Client::send_to_group`]; see `crypto::group` for when keys rotate.

use bytes::Bytes;
use switchboard_proto::pb::{self, client_frame, server_frame};

use super::{Client, Command, Sent, check_msg_id, check_plaintext, new_client_msg_id};
use crate::error::{Error, UsageError};
use crate::ids::{GroupId, UserId};
use crate::outbox::Content;

/// Most members a group can have.
pub const MAX_GROUP_MEMBERS: usize = 1024;

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GroupRole {
    /// A member.
    Member,
    /// An admin: adds, removes, promotes, demotes (and edits info when the
    /// group restricts that to admins).
    Admin,
    /// The creator (also an admin; cannot be removed or demoted).
    Creator,
}

impl GroupRole {
    fn from_wire(role: i32) -> Self {
        match pb::GroupRole::try_from(role) {
            Ok(pb::GroupRole::Creator) => Self::Creator,
            Ok(pb::GroupRole::Admin) => Self::Admin,
            _ => Self::Member,
        }
    }

    /// Whether the role may administer the group.
    #[must_use]
    pub fn is_admin(self) -> bool {
        matches!(self, Self::Admin | Self::Creator)
    }
}

impl std::fmt::Display for GroupRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Creator => "creator",
        })
    }
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupMember {
    /// The member.
    pub user_id: UserId,
    /// Its phone number.
    pub phone: String,
    /// Its role.
    pub role: GroupRole,
    /// The `group_seq` of the change that added it.
    pub joined_seq: u64,
}

/// A group as its members see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Group {
    /// The group.
    pub group_id: GroupId,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// An opaque reference to its icon.
    pub icon_ref: String,
    /// Only admins may edit name, description and icon.
    pub info_admin_only: bool,
    /// Members, oldest first (empty in the answer to a leave).
    pub members: Vec<GroupMember>,
    /// The `group_seq` of its latest message or change.
    pub seq: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
}

impl From<pb::GroupInfo> for Group {
    fn from(info: pb::GroupInfo) -> Self {
        Self {
            group_id: GroupId(info.group_id),
            name: info.name,
            description: info.description,
            icon_ref: info.icon_ref,
            info_admin_only: info.info_admin_only,
            members: info
                .members
                .into_iter()
                .map(|m| GroupMember {
                    user_id: UserId(m.user_id),
                    phone: m.phone,
                    role: GroupRole::from_wire(m.role),
                    joined_seq: m.joined_seq,
                })
                .collect(),
            seq: info.seq,
            created_ms: info.created_ms,
        }
    }
}

/// One group in [`Client::list_groups`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupSummary {
    /// The group.
    pub group_id: GroupId,
    /// Its name.
    pub name: String,
    /// This account's role in it.
    pub role: GroupRole,
    /// How many members it has.
    pub members: u32,
}

/// A new group, for [`Client::create_group_with`]. Build it with
/// [`NewGroup::new`] and set the optional fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NewGroup {
    /// Its name (1..=100 bytes).
    pub name: String,
    /// Its description (at most 512 bytes).
    pub description: String,
    /// An opaque reference to its icon (at most 256 bytes).
    pub icon_ref: String,
    /// Only admins may change name, description and icon.
    pub info_admin_only: bool,
    /// The other members (at most 1,023 registered users).
    pub members: Vec<UserId>,
}

impl NewGroup {
    /// A group named `name` with these other members.
    #[must_use]
    pub fn new(name: impl Into<String>, members: Vec<UserId>) -> Self {
        Self {
            name: name.into(),
            members,
            ..Self::default()
        }
    }
}

/// A change to a group, for [`Client::change_group`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupChange {
    /// Admins: add registered users (members already are ignored).
    Add(Vec<UserId>),
    /// Admins: remove a member (not the creator).
    Remove(UserId),
    /// Admins: make a member an admin.
    Promote(UserId),
    /// Admins: make an admin a member again (not the creator).
    Demote(UserId),
    /// Change name, description, icon or who may change them (`None`: keep).
    Edit {
        /// New name.
        name: Option<String>,
        /// New description.
        description: Option<String>,
        /// New icon reference.
        icon_ref: Option<String>,
        /// New setting: only admins edit info.
        info_admin_only: Option<bool>,
    },
    /// Leave the group.
    Leave,
}

impl GroupChange {
    fn to_wire(&self) -> pb::change_group::Change {
        use pb::change_group::Change;
        match self {
            Self::Add(users) => Change::Add(pb::GroupUsers {
                users: users.iter().map(|u| u.get()).collect(),
            }),
            Self::Remove(u) => Change::Remove(u.get()),
            Self::Promote(u) => Change::Promote(u.get()),
            Self::Demote(u) => Change::Demote(u.get()),
            Self::Edit {
                name,
                description,
                icon_ref,
                info_admin_only,
            } => Change::Edit(pb::GroupInfoEdit {
                name: name.clone(),
                description: description.clone(),
                icon_ref: icon_ref.clone(),
                info_admin_only: *info_admin_only,
            }),
            Self::Leave => Change::Leave(pb::LeaveGroup {}),
        }
    }
}

/// A membership or info change of a group, from [`crate::Event::GroupChanged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GroupChangeKind {
    /// The group was created; `users` are its first members.
    Created,
    /// `users` were added.
    Added,
    /// `users` were removed.
    Removed,
    /// `users` left.
    Left,
    /// `users` became admins.
    Promoted,
    /// `users` are members again.
    Demoted,
    /// Name, description, icon or the edit setting changed.
    InfoChanged,
    /// The creator left; `users` holds the new creator.
    CreatorChanged,
    /// A member (in `users`) has a new device; this client gives it its
    /// sender key before its next message to the group.
    MemberDevicesChanged,
    /// A kind this version does not know.
    Other,
}

impl GroupChangeKind {
    pub(crate) fn from_wire(kind: i32) -> Self {
        use pb::GroupEventKind as K;
        match K::try_from(kind) {
            Ok(K::Created) => Self::Created,
            Ok(K::Added) => Self::Added,
            Ok(K::Removed) => Self::Removed,
            Ok(K::Left) => Self::Left,
            Ok(K::Promoted) => Self::Promoted,
            Ok(K::Demoted) => Self::Demoted,
            Ok(K::InfoChanged) => Self::InfoChanged,
            Ok(K::CreatorChanged) => Self::CreatorChanged,
            Ok(K::MemberDevicesChanged) => Self::MemberDevicesChanged,
            _ => Self::Other,
        }
    }

    /// Whether members left the group (the sender key is then replaced).
    pub(crate) fn removes_members(self) -> bool {
        matches!(self, Self::Removed | Self::Left)
    }
}

fn check_group(group: GroupId) -> Result<(), Error> {
    if group.get() == 0 {
        return Err(UsageError::Invalid("group id 0 is not a group").into());
    }
    Ok(())
}

impl Client {
    async fn group_call(&self, body: client_frame::Body) -> Result<server_frame::Body, Error> {
        self.call(|reply| Command::Group { body, reply }).await
    }

    async fn group_info_call(&self, body: client_frame::Body) -> Result<Group, Error> {
        match self.group_call(body).await? {
            server_frame::Body::GroupInfo(info) => Ok(Group::from(info)),
            other => Err(crate::connection::unexpected("GroupInfo", Some(&other))),
        }
    }

    /// Creates a group named `name` (1..=100 bytes) with this account as
    /// its creator and `members` (at most 1,023 other registered users).
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `UNKNOWN_USER`, `BAD_REQUEST` or
    /// `RATE_LIMITED`; [`Error::Usage`] for too many members; [`Error::Busy`];
    /// [`Error::Closed`].
    pub async fn create_group(&self, name: &str, members: &[UserId]) -> Result<Group, Error> {
        self.create_group_with(NewGroup::new(name, members.to_vec()))
            .await
    }

    /// As [`Client::create_group`], with a description, an icon reference
    /// and who may edit them.
    ///
    /// # Errors
    ///
    /// As [`Client::create_group`].
    pub async fn create_group_with(&self, group: NewGroup) -> Result<Group, Error> {
        if group.members.len() >= MAX_GROUP_MEMBERS {
            return Err(UsageError::Invalid("a group has at most 1,024 members").into());
        }
        let body = client_frame::Body::CreateGroup(pb::CreateGroup {
            name: group.name,
            description: group.description,
            icon_ref: group.icon_ref,
            members: group.members.iter().map(|u| u.get()).collect(),
            info_admin_only: group.info_admin_only,
        });
        self.group_info_call(body).await
    }

    /// Changes a group; returns it as it is after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `UNKNOWN_GROUP` (also for non-members),
    /// `NOT_GROUP_ADMIN`, `GROUP_FULL`, `BAD_REQUEST`, `RATE_LIMITED`;
    /// [`Error::Busy`]; [`Error::Closed`].
    pub async fn change_group(&self, group: GroupId, change: GroupChange) -> Result<Group, Error> {
        check_group(group)?;
        let body = client_frame::Body::ChangeGroup(pb::ChangeGroup {
            group_id: group.get(),
            change: Some(change.to_wire()),
        });
        self.group_info_call(body).await
    }

    /// A group this account is a member of, with its members.
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `UNKNOWN_GROUP`; [`Error::Busy`];
    /// [`Error::Closed`].
    pub async fn group(&self, group: GroupId) -> Result<Group, Error> {
        check_group(group)?;
        let body = client_frame::Body::GetGroup(pb::GetGroup {
            group_id: group.get(),
        });
        self.group_info_call(body).await
    }

    /// The groups this account is a member of.
    ///
    /// # Errors
    ///
    /// [`Error::Server`]; [`Error::Busy`]; [`Error::Closed`].
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>, Error> {
        match self
            .group_call(client_frame::Body::ListGroups(pb::ListGroups {}))
            .await?
        {
            server_frame::Body::GroupList(list) => Ok(list
                .groups
                .into_iter()
                .map(|g| GroupSummary {
                    group_id: GroupId(g.group_id),
                    name: g.name,
                    role: GroupRole::from_wire(g.role),
                    members: g.members,
                })
                .collect()),
            other => Err(crate::connection::unexpected("GroupList", Some(&other))),
        }
    }

    /// Sends `payload` to every member device of `group` (this account's
    /// other devices included), sealed once with this device's sender key;
    /// the key goes first to member devices that lack it. Resolves on ✓
    /// ([`Sent::group_seq`] is the message's place in the group's order).
    /// At most [`crate::MAX_PLAINTEXT_BYTES`].
    ///
    /// Delivered and read receipts come per member as
    /// [`crate::Event::Receipt`] with `group_id` set, and as the running
    /// tally [`crate::Event::GroupReceipts`].
    ///
    /// # Errors
    ///
    /// As [`Client::send_to_user`], plus `UNKNOWN_GROUP` (not a member).
    pub async fn send_to_group(&self, group: GroupId, payload: Bytes) -> Result<Sent, Error> {
        self.group_send(new_client_msg_id(), true, group, payload)
            .await
    }

    /// As [`Client::send_to_group`], with a caller-chosen client message id.
    ///
    /// # Errors
    ///
    /// As [`Client::send_to_group`].
    pub async fn send_to_group_with_id(
        &self,
        client_msg_id: impl Into<String>,
        group: GroupId,
        payload: Bytes,
    ) -> Result<Sent, Error> {
        self.group_send(client_msg_id.into(), false, group, payload)
            .await
    }

    async fn group_send(
        &self,
        client_msg_id: String,
        fresh_id: bool,
        group: GroupId,
        payload: Bytes,
    ) -> Result<Sent, Error> {
        check_msg_id(&client_msg_id)?;
        check_group(group)?;
        check_plaintext(&payload)?;
        let content = Content::Group {
            group_id: group.get(),
            payload,
        };
        self.call(|reply| Command::Send {
            client_msg_id,
            fresh_id,
            to_user: None,
            to_phone: None,
            content,
            reply,
        })
        .await
    }

    /// Tells `sender` that these messages it sent to `group` were read.
    ///
    /// # Errors
    ///
    /// As [`Client::send_read_receipt`].
    pub async fn send_group_read_receipt(
        &self,
        group: GroupId,
        sender: UserId,
        client_msg_ids: Vec<String>,
    ) -> Result<(), Error> {
        check_group(group)?;
        self.read_receipt(sender, group.get(), client_msg_ids).await
    }
}
