//! Records as stored, encoded with protobuf (prost derive) so fields can be
//! added later without a migration.

use prost::Message;
use switchboard_proto::pb;

/// A user account.
#[derive(Clone, PartialEq, Message)]
pub struct UserRecord {
    /// The user's id.
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    /// The verified E.164 phone number.
    #[prost(string, tag = "2")]
    pub phone: String,
    /// Current devices, ascending by id.
    #[prost(message, repeated, tag = "3")]
    pub devices: Vec<DeviceRecord>,
    /// The id the next device will get.
    #[prost(uint32, tag = "4")]
    pub next_device_id: u32,
    /// When the account was created (ms since epoch).
    #[prost(uint64, tag = "5")]
    pub created_ms: u64,
    /// The one link code that may currently join this account.
    #[prost(string, tag = "6")]
    pub link_code: String,
    /// When link codes were created, for the hourly limit (ms since epoch).
    #[prost(uint64, repeated, tag = "7")]
    pub link_codes_created_ms: Vec<u64>,
    /// Two-step verification: Argon2id PHC string of the PIN; empty when
    /// the account has none.
    #[prost(string, tag = "8")]
    pub pin_hash: String,
}

/// One device of a user.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceRecord {
    /// The device id.
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    /// SHA-256 of the device's bearer credential.
    #[prost(bytes = "vec", tag = "2")]
    pub credential_hash: Vec<u8>,
    /// When the device was added (ms since epoch).
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
    /// The primary device (registered by phone) as opposed to a linked one.
    #[prost(bool, tag = "4")]
    pub primary: bool,
}

/// Verification-code state of one phone number.
#[derive(Clone, PartialEq, Message)]
pub struct CodeRecord {
    /// SHA-256 of phone and code; empty when no code is outstanding.
    #[prost(bytes = "vec", tag = "1")]
    pub code_hash: Vec<u8>,
    /// When the outstanding code expires (ms since epoch).
    #[prost(uint64, tag = "2")]
    pub expires_ms: u64,
    /// Wrong attempts against the outstanding code.
    #[prost(uint32, tag = "3")]
    pub wrong_attempts: u32,
    /// When codes were requested, for the hourly limit (ms since epoch).
    #[prost(uint64, repeated, tag = "4")]
    pub requested_ms: Vec<u64>,
    /// Start of the current day-long window of wrong codes (ms since epoch).
    #[prost(uint64, tag = "10")]
    pub wrong_window_start_ms: u64,
    /// Wrong codes in that window, across every code requested in it.
    #[prost(uint32, tag = "11")]
    pub wrong_in_window: u32,
    /// PINs presented since the last successful registration (counted
    /// before they are checked, so parallel guesses cannot exceed the
    /// limit); a new code does not reset them.
    #[prost(uint32, tag = "5")]
    pub pin_attempts: u32,
    /// Re-registration is refused until then (ms since epoch).
    #[prost(uint64, tag = "6")]
    pub pin_locked_until_ms: u64,
}

/// An accepted send, remembered for deduplication.
#[derive(Clone, PartialEq, Message)]
pub struct DedupRecord {
    /// The timestamp the send was acknowledged with.
    #[prost(uint64, tag = "1")]
    pub server_ts_ms: u64,
    /// When it was accepted (ms since epoch); drives expiry.
    #[prost(uint64, tag = "2")]
    pub accepted_ms: u64,
    /// The send was voided: it never reached the recipient (its devices
    /// were replaced) and its sender was told so; a resend under the same
    /// id is stored again.
    #[prost(bool, tag = "3")]
    pub voided: bool,
    /// A group message's `group_seq` (0 for 1:1 sends).
    #[prost(uint64, tag = "4")]
    pub group_seq: u64,
}

/// Durable mail from one shard to the owner of another user (see
/// `router/mail.rs`): kept by the sending shard until the receiving one
/// has committed its effect.
#[derive(Clone, PartialEq, Message)]
pub struct MailRecord {
    /// The user whose devices get the entry.
    #[prost(uint64, tag = "1")]
    pub to_user: u64,
    /// The entry to queue for each of them (seq and time are set there).
    #[prost(message, optional, tag = "2")]
    pub entry: Option<pb::QueueEntry>,
    /// Group mail: every user of the receiving shard that gets the entry
    /// (`to_user` is the first of them, naming the shard).
    #[prost(uint64, repeated, tag = "3")]
    pub to_users: Vec<u64>,
    /// Group mail: the group, the entry's `group_seq` and the `group_seq`
    /// of the group's previous mail to the same shard (0: unknown), which
    /// must be applied first.
    #[prost(uint64, tag = "4")]
    pub group_id: u64,
    /// See `group_id`.
    #[prost(uint64, tag = "5")]
    pub group_seq: u64,
    /// See `group_id`.
    #[prost(uint64, tag = "6")]
    pub prev_group_seq: u64,
    /// A device that does not get the entry (the sender's own).
    #[prost(uint64, tag = "7")]
    pub skip_user: u64,
    /// See `skip_user`.
    #[prost(uint32, tag = "8")]
    pub skip_device: u32,
}

/// The public keys a device has published.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceKeysRecord {
    /// Identity keys (immutable once set).
    #[prost(message, optional, tag = "1")]
    pub identity: Option<pb::IdentityKeys>,
    /// The current fallback key.
    #[prost(message, optional, tag = "2")]
    pub fallback: Option<pb::SignedKey>,
    /// One-time keys in stock.
    #[prost(uint32, tag = "3")]
    pub one_time_keys: u32,
    /// Index the next uploaded one-time key gets.
    #[prost(uint64, tag = "4")]
    pub next_index: u64,
    /// Every one-time key below this index has been handed out.
    #[prost(uint64, tag = "5")]
    pub consumed_below: u64,
}

/// An outstanding link code.
#[derive(Clone, PartialEq, Message)]
pub struct LinkCodeRecord {
    /// The account the code joins.
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    /// When it stops working (ms since epoch).
    #[prost(uint64, tag = "2")]
    pub expires_ms: u64,
}

/// A payload stored once for many queue entries (see `store/payloads.rs`).
#[derive(Clone, PartialEq, Message)]
pub struct PayloadRecord {
    /// The bytes every referencing entry delivers.
    #[prost(bytes = "bytes", tag = "1")]
    pub body: bytes::Bytes,
    /// When it was stored (ms since epoch); drives expiry.
    #[prost(uint64, tag = "2")]
    pub created_ms: u64,
}

/// A group (see `store/groups.rs`).
#[derive(Clone, PartialEq, Message)]
pub struct GroupRecord {
    /// The group's id.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// Its name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Its description.
    #[prost(string, tag = "3")]
    pub description: String,
    /// An opaque reference to its icon.
    #[prost(string, tag = "4")]
    pub icon_ref: String,
    /// Only admins may edit name, description and icon.
    #[prost(bool, tag = "5")]
    pub info_admin_only: bool,
    /// When it was created (ms since epoch).
    #[prost(uint64, tag = "6")]
    pub created_ms: u64,
    /// Members, oldest first.
    #[prost(message, repeated, tag = "7")]
    pub members: Vec<MemberRecord>,
}

/// One member of a group.
#[derive(Clone, PartialEq, Message)]
pub struct MemberRecord {
    /// The member.
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    /// `pb::GroupRole` as its number.
    #[prost(int32, tag = "2")]
    pub role: i32,
    /// The group_seq of the change that added the member.
    #[prost(uint64, tag = "3")]
    pub joined_seq: u64,
    /// The member's phone number (a user keeps its number for life).
    #[prost(string, tag = "4")]
    pub phone: String,
}
