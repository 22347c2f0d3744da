//! Router commands between nodes (cluster mode): the codec that turns a
//! [`Command`] into a body for a node link and back, with a typed way to
//! deliver its answer, and the same for the pushes a shard sends to a
//! connection served through a link.
//!
//! Owns the link's message schema (the prost structs of `wire`, encoded
//! like the store's records so fields can be added without breaking a
//! node of the previous version) and the conversions. It does no I/O: the
//! transport (`router::forward`) frames the bodies, numbers requests and
//! matches answers to them.
//!
//! Choices:
//! - The routing key is derived from the command on both ends (the same
//!   `user_shard`/`phone_shard` choice the `Router` methods make), not
//!   sent: the receiving node applies it with its own shard count, and a
//!   body cannot name a key that contradicts its command.
//! - What cannot cross (oneshots, push queues, instants) is rebuilt on the
//!   receiving side: a fresh oneshot whose answer is encoded back, a fresh
//!   push queue pumped back by the transport, `Instant::now()`.
//! - A `RouteError` crosses with its variant and fields so a client sees
//!   the same wire error whichever node served it. Limits cross by name
//!   ([`Limit::name`]), the metric label, which stays stable when variants
//!   are added or reordered.

use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use prost::Message;
use switchboard_proto::pb;
use tokio::sync::oneshot;

use super::shard::{Command, OwedReceipt};
use super::{
    AnswerTo, AuthInfo, CodeChecked, CodeIssued, ConnLink, ConnRx, GroupSendRequest, GroupSent,
    HeldBy, KickReason, Notice, Received, Registered, Reply, RouteError, SendAccepted, SendReply,
    SendRequest, ToConn, UserSummary, conn_queue,
};
use crate::limits::Limit;
use crate::store::{DeviceKey, GroupId, StoreError, UserId};

/// Which shard a command belongs to, as its key, so the receiving node
/// routes it with its own shard count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteKey {
    /// A user or group id: the shard is `shard_of_user`.
    Id(u64),
    /// A phone number or link code: the shard is `shard_of_phone`.
    Str(String),
}

/// Delivers the encoded answer of a forwarded command to the waiting
/// caller: decodes the answer and fulfils the command's oneshot. A body
/// that does not decode becomes [`RouteError::Internal`].
pub(crate) type AnswerSlot = Box<dyn FnOnce(Result<&[u8], RouteError>) + Send>;

/// The encoded answer of a command received from another node, once its
/// shard answers.
pub(crate) type AnswerFuture = BoxFuture<'static, Result<Vec<u8>, RouteError>>;

/// A command ready to travel.
pub(crate) struct Outbound {
    /// The shard it goes to on the serving node (which derives it from the
    /// body again; a transport with several serving nodes picks one by it).
    #[allow(
        dead_code,
        reason = "the one-serving-node transport does not need it to pick a node"
    )]
    pub(crate) key: RouteKey,
    /// The encoded command.
    pub(crate) body: Vec<u8>,
    /// Where its answer goes. `None` for commands without a reply oneshot
    /// (`Ack`, `Delete`, `Disconnected`, and a `Send` answered through the
    /// connection's push queue: `SendReply::Queued`).
    pub(crate) answer: Option<AnswerSlot>,
    /// `Authenticate`'s link: the forwarding node keeps it (by `conn_id`)
    /// to deliver the pushes that come back.
    pub(crate) link: Option<ConnLink>,
}

/// A command received from another node.
pub(crate) struct Inbound {
    /// The shard it goes to.
    pub(crate) key: RouteKey,
    /// The command, with a fresh reply oneshot (and push queue) of this
    /// node.
    pub(super) cmd: Command,
    /// Resolves to the encoded answer once the shard answers (`None` when
    /// the command has no reply); to [`RouteError::Internal`] if the shard
    /// drops the oneshot. An `Err` is for the transport to encode with
    /// [`encode_error`].
    pub(crate) answer: Option<AnswerFuture>,
    /// For `Authenticate`: the connection id and the receiving end of the
    /// fresh push queue whose sender went into the command's `ConnLink`;
    /// the transport pumps it back to the forwarding node (and dropping it
    /// tells the shard the connection is gone).
    pub(crate) conn: Option<(u64, ConnRx)>,
}

/// Why a body from another node could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The body is not a protobuf message of the expected type.
    #[error("undecodable body: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// The body names no kind this node knows: empty, or from a newer node.
    #[error("no known {0} kind in the body")]
    UnknownKind(&'static str),
    /// A field every body of its kind carries is absent.
    #[error("missing field: {0}")]
    Missing(&'static str),
    /// A field holds a value this node does not know.
    #[error("unknown {what}: {value}")]
    UnknownValue {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
    },
}

/// The link's message schema. Tags are never reused: a field or kind that
/// goes keeps its tag reserved, so nodes of adjacent versions interoperate.
mod wire {
    use prost::{Message, Oneof};
    use switchboard_proto::pb;

    use crate::store::LinkCodeRecord;

    /// A message without fields.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Empty {}

    /// A `DeviceKey`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Device {
        /// The user.
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
        /// The device within the user.
        #[prost(uint32, tag = "2")]
        pub(super) device: u32,
    }

    /// A `SendRequest`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct SendRequest {
        /// The sending device.
        #[prost(message, optional, tag = "1")]
        pub(super) from: Option<Device>,
        /// The sender's phone.
        #[prost(string, tag = "2")]
        pub(super) from_phone: String,
        /// The client's message id.
        #[prost(string, tag = "3")]
        pub(super) client_msg_id: String,
        /// The recipient.
        #[prost(uint64, tag = "4")]
        pub(super) to_user: u64,
        /// One payload per recipient device.
        #[prost(message, repeated, tag = "5")]
        pub(super) payloads: Vec<pb::DevicePayload>,
        /// No dedup lookup.
        #[prost(bool, tag = "6")]
        pub(super) first_attempt: bool,
        /// A `SendGroupKeys` part's group (0: an ordinary send).
        #[prost(uint64, tag = "7")]
        pub(super) group_id: u64,
    }

    /// A `GroupSendRequest`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct GroupSendRequest {
        /// The sending device.
        #[prost(message, optional, tag = "1")]
        pub(super) from: Option<Device>,
        /// The sender's phone.
        #[prost(string, tag = "2")]
        pub(super) from_phone: String,
        /// The group.
        #[prost(uint64, tag = "3")]
        pub(super) group_id: u64,
        /// The client's message id.
        #[prost(string, tag = "4")]
        pub(super) client_msg_id: String,
        /// The sealed payload.
        #[prost(bytes = "bytes", tag = "5")]
        pub(super) payload: bytes::Bytes,
        /// No dedup lookup.
        #[prost(bool, tag = "6")]
        pub(super) first_attempt: bool,
    }

    /// One `(entry seq, (group, group_seq))` of a `released` list.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Released {
        /// The queue entry's seq.
        #[prost(uint64, tag = "1")]
        pub(super) seq: u64,
        /// The group of the payload it referenced.
        #[prost(uint64, tag = "2")]
        pub(super) group: u64,
        /// The payload's `group_seq`.
        #[prost(uint64, tag = "3")]
        pub(super) group_seq: u64,
    }

    /// An `OwedReceipt`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct OwedReceipt {
        /// The sender owed the receipt.
        #[prost(uint64, tag = "1")]
        pub(super) to_user: u64,
        /// The receipt.
        #[prost(message, optional, tag = "2")]
        pub(super) receipt: Option<pb::Receipt>,
        /// The acked message entries it covers.
        #[prost(uint64, repeated, tag = "3")]
        pub(super) message_seqs: Vec<u64>,
        /// The group payloads they reference.
        #[prost(message, repeated, tag = "4")]
        pub(super) released: Vec<Released>,
    }

    /// An `AnswerTo`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct AnswerTo {
        /// The submitting connection.
        #[prost(uint64, tag = "1")]
        pub(super) conn_id: u64,
        /// Its `Send` frame.
        #[prost(uint32, tag = "2")]
        pub(super) frame: u32,
    }

    // ---------------------------------------------------------- commands

    /// A forwarded command.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Command {
        /// Which command, with its fields.
        #[prost(
            oneof = "Kind",
            tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29"
        )]
        pub(super) kind: Option<Kind>,
    }

    /// The forwarded commands, one tag each (several share a shape).
    #[derive(Clone, PartialEq, Oneof)]
    pub(super) enum Kind {
        #[prost(message, tag = "1")]
        RequestCode(Phone),
        #[prost(message, tag = "2")]
        VerifyCode(PhoneCode),
        #[prost(message, tag = "3")]
        RegisterDevice(UserPhone),
        #[prost(message, tag = "4")]
        CheckCode(CheckCode),
        #[prost(message, tag = "5")]
        UserPin(User),
        #[prost(message, tag = "6")]
        SetPin(SetPin),
        #[prost(message, tag = "7")]
        Authenticate(Authenticate),
        #[prost(message, tag = "8")]
        SendSelf(SendRequest),
        #[prost(message, tag = "9")]
        UploadKeys(UploadKeys),
        #[prost(message, tag = "10")]
        FetchBundles(FetchBundles),
        #[prost(message, tag = "11")]
        CreateLinkCode(DeviceOnly),
        #[prost(message, tag = "12")]
        StoreLinkCode(StoreLinkCode),
        #[prost(message, tag = "13")]
        TakeLinkCode(Code),
        #[prost(message, tag = "14")]
        AddLinkedDevice(UserCode),
        #[prost(message, tag = "15")]
        ListDevices(User),
        #[prost(message, tag = "16")]
        RevokeDevice(RevokeDevice),
        #[prost(message, tag = "17")]
        CreateGroup(CreateGroup),
        #[prost(message, tag = "18")]
        ChangeGroup(ChangeGroup),
        #[prost(message, tag = "19")]
        GetGroup(GetGroup),
        #[prost(message, tag = "20")]
        ListGroups(User),
        #[prost(message, tag = "21")]
        SendGroup(GroupSendRequest),
        #[prost(message, tag = "22")]
        MemberDevicesChanged(GroupUser),
        #[prost(message, tag = "23")]
        LookupPhone(Phone),
        #[prost(message, tag = "24")]
        LookupUser(User),
        #[prost(message, tag = "25")]
        Send(Send),
        #[prost(message, tag = "26")]
        EnqueueReceipt(EnqueueReceipt),
        #[prost(message, tag = "27")]
        Delete(Delete),
        #[prost(message, tag = "28")]
        Ack(Ack),
        #[prost(message, tag = "29")]
        Disconnected(Disconnected),
    }

    /// `RequestCode`, `LookupPhone`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Phone {
        #[prost(string, tag = "1")]
        pub(super) phone: String,
    }

    /// `VerifyCode`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct PhoneCode {
        #[prost(string, tag = "1")]
        pub(super) phone: String,
        #[prost(string, tag = "2")]
        pub(super) code: String,
    }

    /// `RegisterDevice`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct UserPhone {
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
        #[prost(string, tag = "2")]
        pub(super) phone: String,
    }

    /// `CheckCode`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct CheckCode {
        #[prost(string, tag = "1")]
        pub(super) phone: String,
        #[prost(string, tag = "2")]
        pub(super) code: String,
        #[prost(bool, tag = "3")]
        pub(super) pin_presented: bool,
    }

    /// `UserPin`, `ListDevices`, `ListGroups`, `LookupUser`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct User {
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
    }

    /// `SetPin`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct SetPin {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(string, tag = "2")]
        pub(super) pin_hash: String,
    }

    /// `Authenticate`: the link's connection id; its push queue is made on
    /// the receiving node.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Authenticate {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(bytes = "vec", tag = "2")]
        pub(super) credential: Vec<u8>,
        #[prost(uint64, tag = "3")]
        pub(super) conn_id: u64,
    }

    /// `UploadKeys`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct UploadKeys {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(message, optional, tag = "2")]
        pub(super) upload: Option<pb::UploadKeys>,
    }

    /// `FetchBundles`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct FetchBundles {
        #[prost(message, optional, tag = "1")]
        pub(super) requester: Option<Device>,
        #[prost(uint64, tag = "2")]
        pub(super) user: u64,
        #[prost(bool, tag = "3")]
        pub(super) identities_only: bool,
    }

    /// `CreateLinkCode`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct DeviceOnly {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
    }

    /// `StoreLinkCode`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct StoreLinkCode {
        #[prost(string, tag = "1")]
        pub(super) code: String,
        #[prost(message, optional, tag = "2")]
        pub(super) record: Option<LinkCodeRecord>,
    }

    /// `TakeLinkCode`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Code {
        #[prost(string, tag = "1")]
        pub(super) code: String,
    }

    /// `AddLinkedDevice`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct UserCode {
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
        #[prost(string, tag = "2")]
        pub(super) code: String,
    }

    /// `RevokeDevice`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct RevokeDevice {
        #[prost(message, optional, tag = "1")]
        pub(super) by: Option<Device>,
        #[prost(uint32, tag = "2")]
        pub(super) target: u32,
    }

    /// `CreateGroup`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct CreateGroup {
        #[prost(uint64, tag = "1")]
        pub(super) group: u64,
        #[prost(message, optional, tag = "2")]
        pub(super) creator: Option<Device>,
        #[prost(message, optional, tag = "3")]
        pub(super) req: Option<pb::CreateGroup>,
    }

    /// `ChangeGroup`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct ChangeGroup {
        #[prost(message, optional, tag = "1")]
        pub(super) by: Option<Device>,
        #[prost(message, optional, tag = "2")]
        pub(super) req: Option<pb::ChangeGroup>,
    }

    /// `GetGroup`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct GetGroup {
        #[prost(uint64, tag = "1")]
        pub(super) by: u64,
        #[prost(uint64, tag = "2")]
        pub(super) group: u64,
    }

    /// `MemberDevicesChanged`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct GroupUser {
        #[prost(uint64, tag = "1")]
        pub(super) group: u64,
        #[prost(uint64, tag = "2")]
        pub(super) user: u64,
    }

    /// `Send`: answered through the connection's push queue when `queued`
    /// is set, else through the request's answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Send {
        #[prost(message, optional, tag = "1")]
        pub(super) req: Option<SendRequest>,
        #[prost(message, optional, tag = "2")]
        pub(super) copies: Option<SendRequest>,
        #[prost(message, optional, tag = "3")]
        pub(super) queued: Option<AnswerTo>,
    }

    /// `EnqueueReceipt`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct EnqueueReceipt {
        #[prost(uint64, tag = "1")]
        pub(super) to_user: u64,
        #[prost(message, optional, tag = "2")]
        pub(super) receipt: Option<pb::Receipt>,
        #[prost(bool, tag = "3")]
        pub(super) must_exist: bool,
    }

    /// `Delete`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Delete {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(uint64, repeated, tag = "2")]
        pub(super) seqs: Vec<u64>,
        #[prost(message, repeated, tag = "3")]
        pub(super) released: Vec<Released>,
    }

    /// `Ack`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Ack {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(uint64, tag = "2")]
        pub(super) conn_id: u64,
        #[prost(uint64, repeated, tag = "3")]
        pub(super) seqs: Vec<u64>,
        #[prost(uint64, repeated, tag = "4")]
        pub(super) delete: Vec<u64>,
        #[prost(message, repeated, tag = "5")]
        pub(super) released: Vec<Released>,
        #[prost(message, repeated, tag = "6")]
        pub(super) receipts: Vec<OwedReceipt>,
    }

    /// `Disconnected`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Disconnected {
        #[prost(message, optional, tag = "1")]
        pub(super) device: Option<Device>,
        #[prost(uint64, tag = "2")]
        pub(super) conn_id: u64,
    }

    // ---------------------------------------------------------- answers

    /// A `UserId` answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Id {
        #[prost(uint64, tag = "1")]
        pub(super) value: u64,
    }

    /// A `String` answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Text {
        #[prost(string, tag = "1")]
        pub(super) value: String,
    }

    /// A `bool` answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Flag {
        #[prost(bool, tag = "1")]
        pub(super) value: bool,
    }

    /// A `CodeIssued`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct CodeIssued {
        #[prost(string, tag = "1")]
        pub(super) code: String,
        #[prost(uint64, tag = "2")]
        pub(super) expires_at_ms: u64,
    }

    /// A `Registered`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Registered {
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
        #[prost(uint32, tag = "2")]
        pub(super) device: u32,
        #[prost(bytes = "vec", tag = "3")]
        pub(super) credential: Vec<u8>,
    }

    /// A `CodeChecked`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct CodeChecked {
        #[prost(uint64, optional, tag = "1")]
        pub(super) user: Option<u64>,
        #[prost(uint64, optional, tag = "2")]
        pub(super) locked_until_ms: Option<u64>,
    }

    /// An `AuthInfo`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct AuthInfo {
        #[prost(string, tag = "1")]
        pub(super) phone: String,
        #[prost(bool, tag = "2")]
        pub(super) primary: bool,
        #[prost(bool, tag = "3")]
        pub(super) has_keys: bool,
        #[prost(uint32, tag = "4")]
        pub(super) one_time_keys: u32,
        #[prost(uint32, repeated, tag = "5")]
        pub(super) devices: Vec<u32>,
    }

    /// A `SendAccepted`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct SendAccepted {
        #[prost(uint64, tag = "1")]
        pub(super) server_ts_ms: u64,
        #[prost(bool, tag = "2")]
        pub(super) duplicate: bool,
    }

    /// `UploadKeys`' answer: one-time keys in stock, and whether the upload
    /// published the device's identity.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct KeysUploaded {
        #[prost(uint32, tag = "1")]
        pub(super) one_time_keys: u32,
        #[prost(bool, tag = "2")]
        pub(super) identity_published: bool,
    }

    /// `FetchBundles`' answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Bundles {
        #[prost(message, repeated, tag = "1")]
        pub(super) bundles: Vec<pb::DeviceBundle>,
    }

    /// `CreateLinkCode`'s answer: the code and its expiry.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct LinkCode {
        #[prost(string, tag = "1")]
        pub(super) code: String,
        #[prost(uint64, tag = "2")]
        pub(super) expires_ms: u64,
    }

    /// `ListDevices`' answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Devices {
        #[prost(message, repeated, tag = "1")]
        pub(super) devices: Vec<pb::DeviceInfo>,
    }

    /// `ListGroups`' answer.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Groups {
        #[prost(message, repeated, tag = "1")]
        pub(super) groups: Vec<pb::GroupSummary>,
    }

    /// A `GroupSent`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct GroupSent {
        #[prost(uint64, tag = "1")]
        pub(super) server_ts_ms: u64,
        #[prost(bool, tag = "2")]
        pub(super) duplicate: bool,
        #[prost(uint64, tag = "3")]
        pub(super) group_seq: u64,
    }

    /// A `UserSummary`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct UserSummary {
        #[prost(uint64, tag = "1")]
        pub(super) user: u64,
        #[prost(string, tag = "2")]
        pub(super) phone: String,
        #[prost(uint32, repeated, tag = "3")]
        pub(super) devices: Vec<u32>,
    }

    // ---------------------------------------------------------- errors

    /// A `RouteError`: its variant (`kind`, see `remote::code`) and the
    /// fields of that variant; the others are left at their defaults.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Error {
        #[prost(uint32, tag = "1")]
        pub(super) kind: u32,
        /// The message of `BadRequest`, `InvalidKeys`, `CodeDelivery`; the
        /// store's message of `Storage`.
        #[prost(string, tag = "2")]
        pub(super) text: String,
        #[prost(uint64, tag = "3")]
        pub(super) retry_after_ms: u64,
        /// `RateLimited`: the limit's name.
        #[prost(string, tag = "4")]
        pub(super) limit: String,
        /// `OrderHeld`: see `remote::held_by_code`.
        #[prost(uint32, tag = "5")]
        pub(super) held_by: u32,
        /// `DeviceMismatch`.
        #[prost(uint64, tag = "6")]
        pub(super) user: u64,
        /// `DeviceMismatch`.
        #[prost(uint32, repeated, tag = "7")]
        pub(super) missing: Vec<u32>,
        /// `DeviceMismatch`.
        #[prost(uint32, repeated, tag = "8")]
        pub(super) stale: Vec<u32>,
        /// `Storage`: a corrupt record (else an engine failure) ...
        #[prost(bool, tag = "9")]
        pub(super) corrupt: bool,
        /// ... of this kind.
        #[prost(string, tag = "10")]
        pub(super) what: String,
        /// `NoServingNode`, sent as `Storage` with this set: a node of the
        /// previous version ignores the field and sees the `Storage` error
        /// it always did.
        #[prost(bool, tag = "11")]
        pub(super) no_serving_node: bool,
    }

    // ---------------------------------------------------------- pushes

    /// What a connection's queue yielded on the serving node.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Push {
        /// The connection (as in its `Authenticate`).
        #[prost(uint64, tag = "1")]
        pub(super) conn_id: u64,
        /// What it yielded.
        #[prost(oneof = "PushItem", tags = "2, 3, 4, 5, 6, 7")]
        pub(super) item: Option<PushItem>,
    }

    /// `Received` and, for `Item`, its `ToConn`.
    #[derive(Clone, PartialEq, Oneof)]
    pub(super) enum PushItem {
        #[prost(message, tag = "2")]
        Deliver(Entries),
        #[prost(message, tag = "3")]
        UpToDate(Empty),
        #[prost(uint32, tag = "4")]
        KeysLow(u32),
        #[prost(message, tag = "5")]
        SendAnswer(SendAnswer),
        /// See `remote::kick_code`.
        #[prost(uint32, tag = "6")]
        Kicked(u32),
        #[prost(message, tag = "7")]
        Closed(Empty),
    }

    /// `ToConn::Deliver`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct Entries {
        #[prost(message, repeated, tag = "1")]
        pub(super) entries: Vec<pb::QueueEntry>,
    }

    /// `ToConn::SendAnswer`.
    #[derive(Clone, PartialEq, Message)]
    pub(super) struct SendAnswer {
        #[prost(uint32, tag = "1")]
        pub(super) frame: u32,
        #[prost(oneof = "SendResult", tags = "2, 3")]
        pub(super) result: Option<SendResult>,
    }

    /// The result of a `ToConn::SendAnswer`.
    #[derive(Clone, PartialEq, Oneof)]
    pub(super) enum SendResult {
        #[prost(message, tag = "2")]
        Accepted(SendAccepted),
        #[prost(message, tag = "3")]
        Refused(Error),
    }
}

use wire::Kind;

// ------------------------------------------------------------------ commands

/// The shard key of a command, as the `Router` method that sends it
/// chooses its shard (`user_shard`/`phone_shard`); `None` for commands that
/// never leave their node.
fn route_key(cmd: &Command) -> Option<RouteKey> {
    use RouteKey::{Id, Str};
    Some(match cmd {
        Command::RequestCode { phone, .. }
        | Command::VerifyCode { phone, .. }
        | Command::CheckCode { phone, .. }
        | Command::LookupPhone { phone, .. } => Str(phone.clone()),
        // Link codes live on the shard of the code, as a phone would.
        Command::StoreLinkCode { code, .. } | Command::TakeLinkCode { code, .. } => {
            Str(code.clone())
        }
        Command::RegisterDevice { user, .. }
        | Command::UserPin { user, .. }
        | Command::FetchBundles { user, .. }
        | Command::AddLinkedDevice { user, .. }
        | Command::ListDevices { user, .. }
        | Command::ListGroups { user, .. }
        | Command::LookupUser { user, .. } => Id(*user),
        Command::SetPin { device, .. }
        | Command::Authenticate { device, .. }
        | Command::UploadKeys { device, .. }
        | Command::CreateLinkCode { device, .. }
        | Command::Delete { device, .. }
        | Command::Ack { device, .. }
        | Command::Disconnected { device, .. } => Id(device.user),
        Command::RevokeDevice { by, .. } => Id(by.user),
        // Groups live on the shard of their id.
        Command::CreateGroup { group, .. }
        | Command::GetGroup { group, .. }
        | Command::MemberDevicesChanged { group, .. } => Id(*group),
        Command::ChangeGroup { req, .. } => Id(req.group_id),
        Command::SendGroup { req, .. } => Id(req.group_id),
        // The recipient's part on the recipient's shard; the sender's
        // copies on the sender's.
        Command::Send { req, .. } => Id(req.to_user),
        Command::SendSelf { req, .. } => Id(req.from.user),
        Command::EnqueueReceipt { to_user, .. } => Id(*to_user),
        Command::Sweep
        | Command::Tick
        | Command::Mail { .. }
        | Command::MailDone { .. }
        | Command::PayloadReleased { .. }
        | Command::Closing
        | Command::Shutdown => return None,
    })
}

/// Encodes `cmd` for the serving node, keeping what cannot travel (its
/// reply oneshot, its push queue) on this side.
///
/// # Errors
/// The command itself for those that never travel: `Sweep`, `Tick`,
/// `Mail`, `MailDone`, `PayloadReleased`, `Closing`, `Shutdown` (each node
/// runs its own upkeep).
#[allow(
    clippy::result_large_err,
    reason = "the command is handed back whole, on a path a correct caller never takes"
)]
pub(super) fn encode_command(cmd: Command) -> Result<Outbound, Command> {
    let Some(key) = route_key(&cmd) else {
        return Err(cmd);
    };
    let mut link = None;
    let (kind, answer) = match cmd {
        Command::RequestCode { phone, reply } => {
            (Kind::RequestCode(wire::Phone { phone }), slot(reply))
        }
        Command::VerifyCode { phone, code, reply } => (
            Kind::VerifyCode(wire::PhoneCode { phone, code }),
            slot(reply),
        ),
        Command::RegisterDevice { user, phone, reply } => (
            Kind::RegisterDevice(wire::UserPhone { user, phone }),
            slot(reply),
        ),
        Command::CheckCode {
            phone,
            code,
            pin_presented,
            reply,
        } => (
            Kind::CheckCode(wire::CheckCode {
                phone,
                code,
                pin_presented,
            }),
            slot(reply),
        ),
        Command::UserPin { user, reply } => (Kind::UserPin(wire::User { user }), slot(reply)),
        Command::SetPin {
            device,
            pin_hash,
            reply,
        } => (
            Kind::SetPin(wire::SetPin {
                device: Some(device.into()),
                pin_hash,
            }),
            slot(reply),
        ),
        Command::Authenticate {
            device,
            credential,
            link: conn,
            reply,
        } => {
            let conn_id = conn.conn_id;
            link = Some(conn);
            (
                Kind::Authenticate(wire::Authenticate {
                    device: Some(device.into()),
                    credential,
                    conn_id,
                }),
                slot(reply),
            )
        }
        Command::SendSelf { req, reply } => (Kind::SendSelf(req.into()), slot(reply)),
        Command::UploadKeys {
            device,
            upload,
            reply,
        } => (
            Kind::UploadKeys(wire::UploadKeys {
                device: Some(device.into()),
                upload: Some(upload),
            }),
            slot(reply),
        ),
        Command::FetchBundles {
            requester,
            user,
            identities_only,
            reply,
        } => (
            Kind::FetchBundles(wire::FetchBundles {
                requester: Some(requester.into()),
                user,
                identities_only,
            }),
            slot(reply),
        ),
        Command::CreateLinkCode { device, reply } => (
            Kind::CreateLinkCode(wire::DeviceOnly {
                device: Some(device.into()),
            }),
            slot(reply),
        ),
        Command::StoreLinkCode {
            code,
            record,
            reply,
        } => (
            Kind::StoreLinkCode(wire::StoreLinkCode {
                code,
                record: Some(record),
            }),
            slot(reply),
        ),
        Command::TakeLinkCode { code, reply } => {
            (Kind::TakeLinkCode(wire::Code { code }), slot(reply))
        }
        Command::AddLinkedDevice { user, code, reply } => (
            Kind::AddLinkedDevice(wire::UserCode { user, code }),
            slot(reply),
        ),
        Command::ListDevices { user, reply } => {
            (Kind::ListDevices(wire::User { user }), slot(reply))
        }
        Command::RevokeDevice { by, target, reply } => (
            Kind::RevokeDevice(wire::RevokeDevice {
                by: Some(by.into()),
                target,
            }),
            slot(reply),
        ),
        Command::CreateGroup {
            group,
            creator,
            req,
            reply,
        } => (
            Kind::CreateGroup(wire::CreateGroup {
                group,
                creator: Some(creator.into()),
                req: Some(req),
            }),
            slot(reply),
        ),
        Command::ChangeGroup { by, req, reply } => (
            Kind::ChangeGroup(wire::ChangeGroup {
                by: Some(by.into()),
                req: Some(req),
            }),
            slot(reply),
        ),
        Command::GetGroup { by, group, reply } => {
            (Kind::GetGroup(wire::GetGroup { by, group }), slot(reply))
        }
        Command::ListGroups { user, reply } => (Kind::ListGroups(wire::User { user }), slot(reply)),
        Command::SendGroup { req, reply } => (Kind::SendGroup(req.into()), slot(reply)),
        Command::MemberDevicesChanged { group, user, reply } => (
            Kind::MemberDevicesChanged(wire::GroupUser { group, user }),
            slot(reply),
        ),
        Command::LookupPhone { phone, reply } => {
            (Kind::LookupPhone(wire::Phone { phone }), slot(reply))
        }
        Command::LookupUser { user, reply } => (Kind::LookupUser(wire::User { user }), slot(reply)),
        Command::Send { req, copies, reply } => {
            let (queued, answer) = match reply {
                SendReply::Ticket(reply) => (None, slot(reply)),
                // The serving node's shard pushes the ✓ to the connection's
                // queue there, which is pumped back here.
                SendReply::Queued { to, .. } => (
                    Some(wire::AnswerTo {
                        conn_id: to.conn_id,
                        frame: to.frame,
                    }),
                    None,
                ),
            };
            (
                Kind::Send(wire::Send {
                    req: Some(req.into()),
                    copies: copies.map(Into::into),
                    queued,
                }),
                answer,
            )
        }
        Command::EnqueueReceipt {
            to_user,
            receipt,
            must_exist,
            reply,
        } => (
            Kind::EnqueueReceipt(wire::EnqueueReceipt {
                to_user,
                receipt: Some(receipt),
                must_exist,
            }),
            slot(reply),
        ),
        Command::Delete {
            device,
            seqs,
            released,
        } => (
            Kind::Delete(wire::Delete {
                device: Some(device.into()),
                seqs,
                released: released_to_wire(released),
            }),
            None,
        ),
        Command::Ack {
            device,
            conn_id,
            seqs,
            delete,
            released,
            receipts,
        } => (
            Kind::Ack(wire::Ack {
                device: Some(device.into()),
                conn_id,
                seqs,
                delete,
                released: released_to_wire(released),
                receipts: receipts.into_iter().map(Into::into).collect(),
            }),
            None,
        ),
        Command::Disconnected { device, conn_id } => (
            Kind::Disconnected(wire::Disconnected {
                device: Some(device.into()),
                conn_id,
            }),
            None,
        ),
        // `route_key` has already sent these back.
        local @ (Command::Sweep
        | Command::Tick
        | Command::Mail { .. }
        | Command::MailDone { .. }
        | Command::PayloadReleased { .. }
        | Command::Closing
        | Command::Shutdown) => return Err(local),
    };
    Ok(Outbound {
        key,
        body: wire::Command { kind: Some(kind) }.encode_to_vec(),
        answer,
        link,
    })
}

/// Decodes a command from another node, with a fresh reply oneshot whose
/// answer [`Inbound::answer`] encodes, and for `Authenticate` a fresh push
/// queue of `push_capacity` pushes.
///
/// # Errors
/// [`WireError`] if `body` is not a command this node knows, or lacks a
/// field its kind needs.
pub(crate) fn decode_command(body: &[u8], push_capacity: usize) -> Result<Inbound, WireError> {
    let kind = wire::Command::decode(body)?
        .kind
        .ok_or(WireError::UnknownKind("command"))?;
    let mut conn = None;
    let (cmd, answer) = match kind {
        Kind::RequestCode(w) => answered(|reply| Command::RequestCode {
            phone: w.phone,
            reply,
        }),
        Kind::VerifyCode(w) => answered(|reply| Command::VerifyCode {
            phone: w.phone,
            code: w.code,
            reply,
        }),
        Kind::RegisterDevice(w) => answered(|reply| Command::RegisterDevice {
            user: w.user,
            phone: w.phone,
            reply,
        }),
        Kind::CheckCode(w) => answered(|reply| Command::CheckCode {
            phone: w.phone,
            code: w.code,
            pin_presented: w.pin_presented,
            reply,
        }),
        Kind::UserPin(w) => answered(|reply| Command::UserPin {
            user: w.user,
            reply,
        }),
        Kind::SetPin(w) => {
            let device = device(w.device, "device")?;
            answered(|reply| Command::SetPin {
                device,
                pin_hash: w.pin_hash,
                reply,
            })
        }
        Kind::Authenticate(w) => {
            let device = device(w.device, "device")?;
            // The shard pushes into this queue as into a local
            // connection's; the transport pumps its other end back to the
            // forwarding node. Full: the shard kicks the connection as a
            // slow reader, as it would a local one.
            let (push, rx) = conn_queue(push_capacity);
            conn = Some((w.conn_id, rx));
            answered(|reply| Command::Authenticate {
                device,
                credential: w.credential,
                link: ConnLink {
                    conn_id: w.conn_id,
                    push,
                },
                reply,
            })
        }
        Kind::SendSelf(w) => {
            let req = SendRequest::try_from(w)?;
            answered(|reply| Command::SendSelf { req, reply })
        }
        Kind::UploadKeys(w) => {
            let device = device(w.device, "device")?;
            let upload = w.upload.ok_or(WireError::Missing("upload"))?;
            answered(|reply| Command::UploadKeys {
                device,
                upload,
                reply,
            })
        }
        Kind::FetchBundles(w) => {
            let requester = device(w.requester, "requester")?;
            answered(|reply| Command::FetchBundles {
                requester,
                user: w.user,
                identities_only: w.identities_only,
                reply,
            })
        }
        Kind::CreateLinkCode(w) => {
            let device = device(w.device, "device")?;
            answered(|reply| Command::CreateLinkCode { device, reply })
        }
        Kind::StoreLinkCode(w) => {
            let record = w.record.ok_or(WireError::Missing("record"))?;
            answered(|reply| Command::StoreLinkCode {
                code: w.code,
                record,
                reply,
            })
        }
        Kind::TakeLinkCode(w) => answered(|reply| Command::TakeLinkCode {
            code: w.code,
            reply,
        }),
        Kind::AddLinkedDevice(w) => answered(|reply| Command::AddLinkedDevice {
            user: w.user,
            code: w.code,
            reply,
        }),
        Kind::ListDevices(w) => answered(|reply| Command::ListDevices {
            user: w.user,
            reply,
        }),
        Kind::RevokeDevice(w) => {
            let by = device(w.by, "by")?;
            answered(|reply| Command::RevokeDevice {
                by,
                target: w.target,
                reply,
            })
        }
        Kind::CreateGroup(w) => {
            let creator = device(w.creator, "creator")?;
            let req = w.req.ok_or(WireError::Missing("req"))?;
            answered(|reply| Command::CreateGroup {
                group: w.group,
                creator,
                req,
                reply,
            })
        }
        Kind::ChangeGroup(w) => {
            let by = device(w.by, "by")?;
            let req = w.req.ok_or(WireError::Missing("req"))?;
            answered(|reply| Command::ChangeGroup { by, req, reply })
        }
        Kind::GetGroup(w) => answered(|reply| Command::GetGroup {
            by: w.by,
            group: w.group,
            reply,
        }),
        Kind::ListGroups(w) => answered(|reply| Command::ListGroups {
            user: w.user,
            reply,
        }),
        Kind::SendGroup(w) => {
            let req = GroupSendRequest::try_from(w)?;
            answered(|reply| Command::SendGroup { req, reply })
        }
        Kind::MemberDevicesChanged(w) => answered(|reply| Command::MemberDevicesChanged {
            group: w.group,
            user: w.user,
            reply,
        }),
        Kind::LookupPhone(w) => answered(|reply| Command::LookupPhone {
            phone: w.phone,
            reply,
        }),
        Kind::LookupUser(w) => answered(|reply| Command::LookupUser {
            user: w.user,
            reply,
        }),
        Kind::Send(w) => {
            let req = SendRequest::try_from(w.req.ok_or(WireError::Missing("req"))?)?;
            let copies = w.copies.map(SendRequest::try_from).transpose()?;
            match w.queued {
                Some(to) => (
                    Command::Send {
                        req,
                        copies,
                        reply: SendReply::Queued {
                            to: AnswerTo {
                                conn_id: to.conn_id,
                                frame: to.frame,
                            },
                            // The ✓ latency measured here leaves out the
                            // forwarding node's part.
                            submitted: Instant::now(),
                        },
                    },
                    None,
                ),
                None => answered(|reply| Command::Send {
                    req,
                    copies,
                    reply: SendReply::Ticket(reply),
                }),
            }
        }
        Kind::EnqueueReceipt(w) => {
            let receipt = w.receipt.ok_or(WireError::Missing("receipt"))?;
            answered(|reply| Command::EnqueueReceipt {
                to_user: w.to_user,
                receipt,
                must_exist: w.must_exist,
                reply,
            })
        }
        Kind::Delete(w) => (
            Command::Delete {
                device: device(w.device, "device")?,
                seqs: w.seqs,
                released: released_from_wire(w.released),
            },
            None,
        ),
        Kind::Ack(w) => (
            Command::Ack {
                device: device(w.device, "device")?,
                conn_id: w.conn_id,
                seqs: w.seqs,
                delete: w.delete,
                released: released_from_wire(w.released),
                receipts: w
                    .receipts
                    .into_iter()
                    .map(OwedReceipt::try_from)
                    .collect::<Result<_, _>>()?,
            },
            None,
        ),
        Kind::Disconnected(w) => (
            Command::Disconnected {
                device: device(w.device, "device")?,
                conn_id: w.conn_id,
            },
            None,
        ),
    };
    let key = route_key(&cmd).ok_or(WireError::UnknownKind("command"))?;
    Ok(Inbound {
        key,
        cmd,
        answer,
        conn,
    })
}

/// The answer slot of a forwarded command whose caller waits on `reply`.
fn slot<T: Answer>(reply: Reply<T>) -> Option<AnswerSlot> {
    let slot: AnswerSlot = Box::new(move |answer: Result<&[u8], RouteError>| {
        let result = answer.and_then(|body| {
            decode_answer::<T>(body).map_err(|e| {
                tracing::warn!(error = %e, "undecodable answer on a node link");
                RouteError::Internal
            })
        });
        // The caller may have stopped waiting; nothing to do then.
        let _ = reply.send(result);
    });
    Some(slot)
}

/// A command made with a fresh reply oneshot, and the future of its
/// encoded answer.
fn answered<T: Answer>(make: impl FnOnce(Reply<T>) -> Command) -> (Command, Option<AnswerFuture>) {
    // The shard holds the sender; the future (held by the transport) the
    // receiver. A dropped sender means the shard restarted mid-command or
    // discarded the request, as `Router::call` treats it.
    let (tx, rx) = oneshot::channel::<Result<T, RouteError>>();
    let answer = async move {
        match rx.await {
            Ok(Ok(value)) => Ok(encode_answer(value)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RouteError::Internal),
        }
    };
    (make(tx), Some(answer.boxed()))
}

/// A device from its wire form, which `what` must carry.
fn device(d: Option<wire::Device>, what: &'static str) -> Result<DeviceKey, WireError> {
    let d = d.ok_or(WireError::Missing(what))?;
    Ok(DeviceKey {
        user: d.user,
        device: d.device,
    })
}

impl From<DeviceKey> for wire::Device {
    fn from(d: DeviceKey) -> Self {
        Self {
            user: d.user,
            device: d.device,
        }
    }
}

impl From<SendRequest> for wire::SendRequest {
    fn from(r: SendRequest) -> Self {
        Self {
            from: Some(r.from.into()),
            from_phone: r.from_phone,
            client_msg_id: r.client_msg_id,
            to_user: r.to_user,
            payloads: r.payloads,
            first_attempt: r.first_attempt,
            group_id: r.group_id,
        }
    }
}

impl TryFrom<wire::SendRequest> for SendRequest {
    type Error = WireError;

    fn try_from(w: wire::SendRequest) -> Result<Self, WireError> {
        Ok(Self {
            from: device(w.from, "from")?,
            from_phone: w.from_phone,
            client_msg_id: w.client_msg_id,
            to_user: w.to_user,
            payloads: w.payloads,
            first_attempt: w.first_attempt,
            group_id: w.group_id,
        })
    }
}

impl From<GroupSendRequest> for wire::GroupSendRequest {
    fn from(r: GroupSendRequest) -> Self {
        Self {
            from: Some(r.from.into()),
            from_phone: r.from_phone,
            group_id: r.group_id,
            client_msg_id: r.client_msg_id,
            payload: r.payload,
            first_attempt: r.first_attempt,
        }
    }
}

impl TryFrom<wire::GroupSendRequest> for GroupSendRequest {
    type Error = WireError;

    fn try_from(w: wire::GroupSendRequest) -> Result<Self, WireError> {
        Ok(Self {
            from: device(w.from, "from")?,
            from_phone: w.from_phone,
            group_id: w.group_id,
            client_msg_id: w.client_msg_id,
            payload: w.payload,
            first_attempt: w.first_attempt,
        })
    }
}

impl From<OwedReceipt> for wire::OwedReceipt {
    fn from(r: OwedReceipt) -> Self {
        Self {
            to_user: r.to_user,
            receipt: Some(r.receipt),
            message_seqs: r.message_seqs,
            released: released_to_wire(r.released),
        }
    }
}

impl TryFrom<wire::OwedReceipt> for OwedReceipt {
    type Error = WireError;

    fn try_from(w: wire::OwedReceipt) -> Result<Self, WireError> {
        Ok(Self {
            to_user: w.to_user,
            receipt: w.receipt.ok_or(WireError::Missing("receipt"))?,
            message_seqs: w.message_seqs,
            released: released_from_wire(w.released),
        })
    }
}

fn released_to_wire(released: Vec<(u64, (GroupId, u64))>) -> Vec<wire::Released> {
    released
        .into_iter()
        .map(|(seq, (group, group_seq))| wire::Released {
            seq,
            group,
            group_seq,
        })
        .collect()
}

fn released_from_wire(released: Vec<wire::Released>) -> Vec<(u64, (GroupId, u64))> {
    released
        .into_iter()
        .map(|r| (r.seq, (r.group, r.group_seq)))
        .collect()
}

// ------------------------------------------------------------------ answers

/// A command's answer type, with its wire form.
trait Answer: Sized + Send + 'static {
    /// The prost message it travels as.
    type Wire: Message + Default;
    /// Its wire form.
    fn into_wire(self) -> Self::Wire;
    /// Back from its wire form.
    fn from_wire(w: Self::Wire) -> Self;
}

fn encode_answer<T: Answer>(value: T) -> Vec<u8> {
    value.into_wire().encode_to_vec()
}

fn decode_answer<T: Answer>(body: &[u8]) -> Result<T, WireError> {
    Ok(T::from_wire(T::Wire::decode(body)?))
}

impl Answer for () {
    type Wire = wire::Empty;
    fn into_wire(self) -> wire::Empty {
        wire::Empty {}
    }
    fn from_wire(_: wire::Empty) -> Self {}
}

impl Answer for UserId {
    type Wire = wire::Id;
    fn into_wire(self) -> wire::Id {
        wire::Id { value: self }
    }
    fn from_wire(w: wire::Id) -> Self {
        w.value
    }
}

impl Answer for String {
    type Wire = wire::Text;
    fn into_wire(self) -> wire::Text {
        wire::Text { value: self }
    }
    fn from_wire(w: wire::Text) -> Self {
        w.value
    }
}

impl Answer for bool {
    type Wire = wire::Flag;
    fn into_wire(self) -> wire::Flag {
        wire::Flag { value: self }
    }
    fn from_wire(w: wire::Flag) -> Self {
        w.value
    }
}

impl Answer for CodeIssued {
    type Wire = wire::CodeIssued;
    fn into_wire(self) -> wire::CodeIssued {
        wire::CodeIssued {
            code: self.code,
            expires_at_ms: self.expires_at_ms,
        }
    }
    fn from_wire(w: wire::CodeIssued) -> Self {
        Self {
            code: w.code,
            expires_at_ms: w.expires_at_ms,
        }
    }
}

impl Answer for Registered {
    type Wire = wire::Registered;
    fn into_wire(self) -> wire::Registered {
        wire::Registered {
            user: self.user,
            device: self.device,
            credential: self.credential,
        }
    }
    fn from_wire(w: wire::Registered) -> Self {
        Self {
            user: w.user,
            device: w.device,
            credential: w.credential,
        }
    }
}

impl Answer for CodeChecked {
    type Wire = wire::CodeChecked;
    fn into_wire(self) -> wire::CodeChecked {
        wire::CodeChecked {
            user: self.user,
            locked_until_ms: self.locked_until_ms,
        }
    }
    fn from_wire(w: wire::CodeChecked) -> Self {
        Self {
            user: w.user,
            locked_until_ms: w.locked_until_ms,
        }
    }
}

impl Answer for AuthInfo {
    type Wire = wire::AuthInfo;
    fn into_wire(self) -> wire::AuthInfo {
        wire::AuthInfo {
            phone: self.phone,
            primary: self.primary,
            has_keys: self.has_keys,
            one_time_keys: self.one_time_keys,
            devices: self.devices,
        }
    }
    fn from_wire(w: wire::AuthInfo) -> Self {
        Self {
            phone: w.phone,
            primary: w.primary,
            has_keys: w.has_keys,
            one_time_keys: w.one_time_keys,
            devices: w.devices,
        }
    }
}

impl Answer for SendAccepted {
    type Wire = wire::SendAccepted;
    fn into_wire(self) -> wire::SendAccepted {
        wire::SendAccepted {
            server_ts_ms: self.server_ts_ms,
            duplicate: self.duplicate,
        }
    }
    fn from_wire(w: wire::SendAccepted) -> Self {
        Self {
            server_ts_ms: w.server_ts_ms,
            duplicate: w.duplicate,
        }
    }
}

/// `UploadKeys`: (one-time keys in stock, identity published).
impl Answer for (u32, bool) {
    type Wire = wire::KeysUploaded;
    fn into_wire(self) -> wire::KeysUploaded {
        wire::KeysUploaded {
            one_time_keys: self.0,
            identity_published: self.1,
        }
    }
    fn from_wire(w: wire::KeysUploaded) -> Self {
        (w.one_time_keys, w.identity_published)
    }
}

/// `CreateLinkCode`: (code, expiry).
impl Answer for (String, u64) {
    type Wire = wire::LinkCode;
    fn into_wire(self) -> wire::LinkCode {
        wire::LinkCode {
            code: self.0,
            expires_ms: self.1,
        }
    }
    fn from_wire(w: wire::LinkCode) -> Self {
        (w.code, w.expires_ms)
    }
}

impl Answer for Vec<pb::DeviceBundle> {
    type Wire = wire::Bundles;
    fn into_wire(self) -> wire::Bundles {
        wire::Bundles { bundles: self }
    }
    fn from_wire(w: wire::Bundles) -> Self {
        w.bundles
    }
}

impl Answer for Vec<pb::DeviceInfo> {
    type Wire = wire::Devices;
    fn into_wire(self) -> wire::Devices {
        wire::Devices { devices: self }
    }
    fn from_wire(w: wire::Devices) -> Self {
        w.devices
    }
}

impl Answer for pb::GroupInfo {
    type Wire = pb::GroupInfo;
    fn into_wire(self) -> pb::GroupInfo {
        self
    }
    fn from_wire(w: pb::GroupInfo) -> Self {
        w
    }
}

impl Answer for Vec<pb::GroupSummary> {
    type Wire = wire::Groups;
    fn into_wire(self) -> wire::Groups {
        wire::Groups { groups: self }
    }
    fn from_wire(w: wire::Groups) -> Self {
        w.groups
    }
}

impl Answer for GroupSent {
    type Wire = wire::GroupSent;
    fn into_wire(self) -> wire::GroupSent {
        wire::GroupSent {
            server_ts_ms: self.server_ts_ms,
            duplicate: self.duplicate,
            group_seq: self.group_seq,
        }
    }
    fn from_wire(w: wire::GroupSent) -> Self {
        Self {
            server_ts_ms: w.server_ts_ms,
            duplicate: w.duplicate,
            group_seq: w.group_seq,
        }
    }
}

impl Answer for UserSummary {
    type Wire = wire::UserSummary;
    fn into_wire(self) -> wire::UserSummary {
        wire::UserSummary {
            user: self.user,
            phone: self.phone,
            devices: self.devices,
        }
    }
    fn from_wire(w: wire::UserSummary) -> Self {
        Self {
            user: w.user,
            phone: w.phone,
            devices: w.devices,
        }
    }
}

// ------------------------------------------------------------------ errors

/// The `kind` of a `wire::Error`: one per `RouteError` variant. Never
/// renumbered.
mod code {
    pub(super) const BAD_REQUEST: u32 = 1;
    pub(super) const UNAUTHENTICATED: u32 = 2;
    pub(super) const UNKNOWN_USER: u32 = 3;
    pub(super) const INVALID_PHONE: u32 = 4;
    pub(super) const CODE_INVALID: u32 = 5;
    pub(super) const CODE_EXPIRED: u32 = 6;
    pub(super) const CODE_LOCKED: u32 = 7;
    pub(super) const PIN_REQUIRED: u32 = 8;
    pub(super) const PIN_INVALID: u32 = 9;
    pub(super) const PIN_LOCKED: u32 = 10;
    pub(super) const RATE_LIMITED: u32 = 11;
    pub(super) const ORDER_HELD: u32 = 12;
    pub(super) const QUEUE_FULL: u32 = 13;
    pub(super) const DEVICE_MISMATCH: u32 = 14;
    pub(super) const INVALID_KEYS: u32 = 15;
    pub(super) const NOT_PRIMARY: u32 = 16;
    pub(super) const TOO_MANY_DEVICES: u32 = 17;
    pub(super) const LINK_CODE_INVALID: u32 = 18;
    pub(super) const UNKNOWN_GROUP: u32 = 19;
    pub(super) const NOT_GROUP_ADMIN: u32 = 20;
    pub(super) const GROUP_FULL: u32 = 21;
    pub(super) const NOT_GROUP_MEMBER: u32 = 22;
    pub(super) const STORAGE: u32 = 23;
    pub(super) const CODE_DELIVERY: u32 = 24;
    pub(super) const CODE_SENDER_UNAVAILABLE: u32 = 25;
    pub(super) const OVERLOADED: u32 = 26;
    pub(super) const INTERNAL: u32 = 27;
    pub(super) const SHUTTING_DOWN: u32 = 28;
}

/// What a decoded `StoreError::Corrupt` names as its record kind: the
/// original's is in its detail (`what` is a `&'static str`, which a
/// decoded string cannot become).
const REMOTE_CORRUPT_WHAT: &str = "a store of the serving node";

/// Encodes an error answer (or a refused send's error) for the link.
pub(crate) fn encode_error(e: &RouteError) -> Vec<u8> {
    error_to_wire(e).encode_to_vec()
}

/// Decodes an error encoded by [`encode_error`].
///
/// # Errors
/// [`WireError`] for a body that is not an error this node knows.
pub(crate) fn decode_error(body: &[u8]) -> Result<RouteError, WireError> {
    error_from_wire(wire::Error::decode(body)?)
}

fn plain(kind: u32) -> wire::Error {
    wire::Error {
        kind,
        ..Default::default()
    }
}

fn with_text(kind: u32, text: &str) -> wire::Error {
    wire::Error {
        text: text.to_owned(),
        ..plain(kind)
    }
}

fn with_retry(kind: u32, retry_after_ms: u64) -> wire::Error {
    wire::Error {
        retry_after_ms,
        ..plain(kind)
    }
}

fn error_to_wire(e: &RouteError) -> wire::Error {
    match e {
        RouteError::BadRequest(m) => with_text(code::BAD_REQUEST, m),
        RouteError::Unauthenticated => plain(code::UNAUTHENTICATED),
        RouteError::UnknownUser => plain(code::UNKNOWN_USER),
        RouteError::InvalidPhone => plain(code::INVALID_PHONE),
        RouteError::CodeInvalid => plain(code::CODE_INVALID),
        RouteError::CodeExpired => plain(code::CODE_EXPIRED),
        RouteError::CodeLocked => plain(code::CODE_LOCKED),
        RouteError::PinRequired => plain(code::PIN_REQUIRED),
        RouteError::PinInvalid => plain(code::PIN_INVALID),
        RouteError::PinLocked { retry_after_ms } => with_retry(code::PIN_LOCKED, *retry_after_ms),
        RouteError::RateLimited {
            limit,
            retry_after_ms,
        } => wire::Error {
            limit: limit.name().to_owned(),
            ..with_retry(code::RATE_LIMITED, *retry_after_ms)
        },
        RouteError::OrderHeld { by, retry_after_ms } => wire::Error {
            held_by: held_by_code(*by),
            ..with_retry(code::ORDER_HELD, *retry_after_ms)
        },
        RouteError::QueueFull { retry_after_ms } => with_retry(code::QUEUE_FULL, *retry_after_ms),
        RouteError::DeviceMismatch {
            user,
            missing,
            stale,
        } => wire::Error {
            user: *user,
            missing: missing.clone(),
            stale: stale.clone(),
            ..plain(code::DEVICE_MISMATCH)
        },
        RouteError::InvalidKeys(m) => with_text(code::INVALID_KEYS, m),
        RouteError::NotPrimary => plain(code::NOT_PRIMARY),
        RouteError::TooManyDevices => plain(code::TOO_MANY_DEVICES),
        RouteError::LinkCodeInvalid => plain(code::LINK_CODE_INVALID),
        RouteError::UnknownGroup => plain(code::UNKNOWN_GROUP),
        RouteError::NotGroupAdmin => plain(code::NOT_GROUP_ADMIN),
        RouteError::GroupFull => plain(code::GROUP_FULL),
        RouteError::NotGroupMember => plain(code::NOT_GROUP_MEMBER),
        RouteError::Storage(StoreError::Engine(m)) => with_text(code::STORAGE, m),
        RouteError::Storage(StoreError::Corrupt { what, detail }) => wire::Error {
            corrupt: true,
            what: (*what).to_owned(),
            ..with_text(code::STORAGE, detail)
        },
        RouteError::NoServingNode => wire::Error {
            no_serving_node: true,
            ..with_text(code::STORAGE, &RouteError::NoServingNode.to_string())
        },
        RouteError::CodeDelivery(m) => with_text(code::CODE_DELIVERY, m),
        RouteError::CodeSenderUnavailable { retry_after_ms } => {
            with_retry(code::CODE_SENDER_UNAVAILABLE, *retry_after_ms)
        }
        RouteError::Overloaded { retry_after_ms } => with_retry(code::OVERLOADED, *retry_after_ms),
        RouteError::Internal => plain(code::INTERNAL),
        RouteError::ShuttingDown => plain(code::SHUTTING_DOWN),
    }
}

fn error_from_wire(w: wire::Error) -> Result<RouteError, WireError> {
    let retry_after_ms = w.retry_after_ms;
    Ok(match w.kind {
        code::BAD_REQUEST => RouteError::BadRequest(w.text),
        code::UNAUTHENTICATED => RouteError::Unauthenticated,
        code::UNKNOWN_USER => RouteError::UnknownUser,
        code::INVALID_PHONE => RouteError::InvalidPhone,
        code::CODE_INVALID => RouteError::CodeInvalid,
        code::CODE_EXPIRED => RouteError::CodeExpired,
        code::CODE_LOCKED => RouteError::CodeLocked,
        code::PIN_REQUIRED => RouteError::PinRequired,
        code::PIN_INVALID => RouteError::PinInvalid,
        code::PIN_LOCKED => RouteError::PinLocked { retry_after_ms },
        code::RATE_LIMITED => RouteError::RateLimited {
            limit: Limit::ALL.into_iter().find(|l| l.name() == w.limit).ok_or(
                WireError::UnknownValue {
                    what: "limit",
                    value: w.limit,
                },
            )?,
            retry_after_ms,
        },
        code::ORDER_HELD => RouteError::OrderHeld {
            by: held_by_from_code(w.held_by)?,
            retry_after_ms,
        },
        code::QUEUE_FULL => RouteError::QueueFull { retry_after_ms },
        code::DEVICE_MISMATCH => RouteError::DeviceMismatch {
            user: w.user,
            missing: w.missing,
            stale: w.stale,
        },
        code::INVALID_KEYS => RouteError::InvalidKeys(w.text),
        code::NOT_PRIMARY => RouteError::NotPrimary,
        code::TOO_MANY_DEVICES => RouteError::TooManyDevices,
        code::LINK_CODE_INVALID => RouteError::LinkCodeInvalid,
        code::UNKNOWN_GROUP => RouteError::UnknownGroup,
        code::NOT_GROUP_ADMIN => RouteError::NotGroupAdmin,
        code::GROUP_FULL => RouteError::GroupFull,
        code::NOT_GROUP_MEMBER => RouteError::NotGroupMember,
        // Every store error is STORAGE_UNAVAILABLE on the wire; the text is
        // kept for the logs.
        code::STORAGE if w.no_serving_node => RouteError::NoServingNode,
        code::STORAGE if w.corrupt => RouteError::Storage(StoreError::Corrupt {
            what: REMOTE_CORRUPT_WHAT,
            detail: format!("{}: {}", w.what, w.text),
        }),
        code::STORAGE => RouteError::Storage(StoreError::Engine(w.text)),
        code::CODE_DELIVERY => RouteError::CodeDelivery(w.text),
        code::CODE_SENDER_UNAVAILABLE => RouteError::CodeSenderUnavailable { retry_after_ms },
        code::OVERLOADED => RouteError::Overloaded { retry_after_ms },
        code::INTERNAL => RouteError::Internal,
        code::SHUTTING_DOWN => RouteError::ShuttingDown,
        other => {
            return Err(WireError::UnknownValue {
                what: "error kind",
                value: other.to_string(),
            });
        }
    })
}

/// `HeldBy` on the wire. Never renumbered.
fn held_by_code(by: HeldBy) -> u32 {
    match by {
        HeldBy::Overloaded => 1,
        HeldBy::Unavailable => 2,
        HeldBy::QueueFull => 3,
    }
}

fn held_by_from_code(code: u32) -> Result<HeldBy, WireError> {
    match code {
        1 => Ok(HeldBy::Overloaded),
        2 => Ok(HeldBy::Unavailable),
        3 => Ok(HeldBy::QueueFull),
        other => Err(WireError::UnknownValue {
            what: "held_by",
            value: other.to_string(),
        }),
    }
}

// ------------------------------------------------------------------ pushes

/// `KickReason` on the wire: its declared discriminant.
fn kick_code(reason: KickReason) -> u32 {
    u32::from(reason as u8)
}

fn kick_from_code(code: u32) -> Result<KickReason, WireError> {
    [
        KickReason::Replaced,
        KickReason::SlowReader,
        KickReason::Revoked,
        KickReason::Unavailable,
        KickReason::ShuttingDown,
    ]
    .into_iter()
    .find(|r| kick_code(*r) == code)
    .ok_or(WireError::UnknownValue {
        what: "kick reason",
        value: code.to_string(),
    })
}

/// Encodes what a remote connection's queue yielded, with its connection
/// id. (Queue entries are cloned into the message: their payloads are
/// `Bytes`, so that is a reference count, plus the short strings.)
pub(crate) fn encode_push(conn_id: u64, item: &Received) -> Vec<u8> {
    use wire::PushItem;
    let item = match item {
        Received::Item(ToConn::Deliver(entries)) => PushItem::Deliver(wire::Entries {
            entries: entries.to_vec(),
        }),
        Received::Item(ToConn::Notice(Notice::UpToDate)) => PushItem::UpToDate(wire::Empty {}),
        Received::Item(ToConn::Notice(Notice::KeysLow(n))) => PushItem::KeysLow(*n),
        Received::Item(ToConn::SendAnswer { frame, result }) => {
            PushItem::SendAnswer(wire::SendAnswer {
                frame: *frame,
                result: Some(match result {
                    Ok(accepted) => wire::SendResult::Accepted(accepted.into_wire()),
                    Err(e) => wire::SendResult::Refused(error_to_wire(e)),
                }),
            })
        }
        Received::Kicked(reason) => PushItem::Kicked(kick_code(*reason)),
        Received::Closed => PushItem::Closed(wire::Empty {}),
    };
    wire::Push {
        conn_id,
        item: Some(item),
    }
    .encode_to_vec()
}

/// Decodes a push encoded by [`encode_push`]: the connection id and what
/// its queue yielded.
///
/// # Errors
/// [`WireError`] for a body that is not a push this node knows.
pub(crate) fn decode_push(body: &[u8]) -> Result<(u64, Received), WireError> {
    use wire::PushItem;
    let push = wire::Push::decode(body)?;
    let received = match push.item.ok_or(WireError::UnknownKind("push"))? {
        PushItem::Deliver(e) => Received::Item(ToConn::Deliver(e.entries.into_boxed_slice())),
        PushItem::UpToDate(_) => Received::Item(ToConn::Notice(Notice::UpToDate)),
        PushItem::KeysLow(n) => Received::Item(ToConn::Notice(Notice::KeysLow(n))),
        PushItem::SendAnswer(a) => Received::Item(ToConn::SendAnswer {
            frame: a.frame,
            result: match a.result.ok_or(WireError::Missing("result"))? {
                wire::SendResult::Accepted(w) => Ok(SendAccepted::from_wire(w)),
                wire::SendResult::Refused(w) => Err(Box::new(error_from_wire(w)?)),
            },
        }),
        PushItem::Kicked(code) => Received::Kicked(kick_from_code(code)?),
        PushItem::Closed(_) => Received::Closed,
    };
    Ok((push.conn_id, received))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::store::LinkCodeRecord;

    const DEV: DeviceKey = DeviceKey {
        user: 0x1111_2222_3333_4444,
        device: 7,
    };
    const OTHER: DeviceKey = DeviceKey {
        user: 0x5555_6666_7777_8888,
        device: 3,
    };

    fn reply<T>() -> Reply<T> {
        oneshot::channel().0
    }

    /// A command's fields (not its reply) as text, to compare a decoded
    /// command with the original (`Command` has no `Debug`).
    fn fields(cmd: &Command) -> String {
        match cmd {
            Command::RequestCode { phone, .. } => format!("RequestCode {phone:?}"),
            Command::VerifyCode { phone, code, .. } => format!("VerifyCode {phone:?} {code:?}"),
            Command::RegisterDevice { user, phone, .. } => {
                format!("RegisterDevice {user} {phone:?}")
            }
            Command::CheckCode {
                phone,
                code,
                pin_presented,
                ..
            } => format!("CheckCode {phone:?} {code:?} {pin_presented}"),
            Command::UserPin { user, .. } => format!("UserPin {user}"),
            Command::SetPin {
                device, pin_hash, ..
            } => format!("SetPin {device:?} {pin_hash:?}"),
            Command::Authenticate {
                device,
                credential,
                link,
                ..
            } => format!("Authenticate {device:?} {credential:?} {}", link.conn_id),
            Command::SendSelf { req, .. } => format!("SendSelf {req:?}"),
            Command::UploadKeys { device, upload, .. } => {
                format!("UploadKeys {device:?} {upload:?}")
            }
            Command::FetchBundles {
                requester,
                user,
                identities_only,
                ..
            } => format!("FetchBundles {requester:?} {user} {identities_only}"),
            Command::CreateLinkCode { device, .. } => format!("CreateLinkCode {device:?}"),
            Command::StoreLinkCode { code, record, .. } => {
                format!("StoreLinkCode {code:?} {record:?}")
            }
            Command::TakeLinkCode { code, .. } => format!("TakeLinkCode {code:?}"),
            Command::AddLinkedDevice { user, code, .. } => {
                format!("AddLinkedDevice {user} {code:?}")
            }
            Command::ListDevices { user, .. } => format!("ListDevices {user}"),
            Command::RevokeDevice { by, target, .. } => format!("RevokeDevice {by:?} {target}"),
            Command::CreateGroup {
                group,
                creator,
                req,
                ..
            } => format!("CreateGroup {group} {creator:?} {req:?}"),
            Command::ChangeGroup { by, req, .. } => format!("ChangeGroup {by:?} {req:?}"),
            Command::GetGroup { by, group, .. } => format!("GetGroup {by} {group}"),
            Command::ListGroups { user, .. } => format!("ListGroups {user}"),
            Command::SendGroup { req, .. } => format!("SendGroup {req:?}"),
            Command::MemberDevicesChanged { group, user, .. } => {
                format!("MemberDevicesChanged {group} {user}")
            }
            Command::LookupPhone { phone, .. } => format!("LookupPhone {phone:?}"),
            Command::LookupUser { user, .. } => format!("LookupUser {user}"),
            Command::Send { req, copies, reply } => {
                let reply = match reply {
                    SendReply::Ticket(_) => "ticket".to_owned(),
                    SendReply::Queued { to, .. } => format!("queued {to:?}"),
                };
                format!("Send {req:?} {copies:?} {reply}")
            }
            Command::EnqueueReceipt {
                to_user,
                receipt,
                must_exist,
                ..
            } => format!("EnqueueReceipt {to_user} {receipt:?} {must_exist}"),
            Command::Delete {
                device,
                seqs,
                released,
            } => format!("Delete {device:?} {seqs:?} {released:?}"),
            Command::Ack {
                device,
                conn_id,
                seqs,
                delete,
                released,
                receipts,
            } => format!("Ack {device:?} {conn_id} {seqs:?} {delete:?} {released:?} {receipts:?}"),
            Command::Disconnected { device, conn_id } => {
                format!("Disconnected {device:?} {conn_id}")
            }
            Command::Sweep
            | Command::Tick
            | Command::Mail { .. }
            | Command::MailDone { .. }
            | Command::PayloadReleased { .. }
            | Command::Closing
            | Command::Shutdown => "local".to_owned(),
        }
    }

    fn send_request(to_user: UserId, from: DeviceKey) -> SendRequest {
        SendRequest {
            from,
            from_phone: "+15550001111".into(),
            client_msg_id: "msg-42".into(),
            to_user,
            payloads: vec![
                pb::DevicePayload {
                    device_id: 1,
                    payload: bytes::Bytes::from_static(b"sealed one"),
                },
                pb::DevicePayload {
                    device_id: 9,
                    payload: bytes::Bytes::from_static(&[0, 255, 7]),
                },
            ],
            first_attempt: true,
            group_id: 0x0abc,
        }
    }

    fn receipt() -> pb::Receipt {
        pb::Receipt {
            from_user: 77,
            from_device: 2,
            from_phone: "+15550002222".into(),
            kind: 2,
            client_msg_ids: vec!["a".into(), "b".into()],
            group_id: 5,
        }
    }

    fn identity_keys() -> pb::IdentityKeys {
        pb::IdentityKeys {
            curve25519: bytes::Bytes::from_static(&[1; 32]),
            ed25519: bytes::Bytes::from_static(&[2; 32]),
            signature: bytes::Bytes::from_static(&[3; 64]),
        }
    }

    /// One command of every forwarded kind, its key, and whether it has an
    /// answer.
    fn every_forwarded() -> Vec<(Command, RouteKey, bool)> {
        use RouteKey::{Id, Str};
        let phone = "+15557654321".to_owned();
        let released = vec![(11, (0xfeed, 3)), (12, (0xbeef, u64::MAX))];
        vec![
            (
                Command::RequestCode {
                    phone: phone.clone(),
                    reply: reply(),
                },
                Str(phone.clone()),
                true,
            ),
            (
                Command::VerifyCode {
                    phone: phone.clone(),
                    code: "123456".into(),
                    reply: reply(),
                },
                Str(phone.clone()),
                true,
            ),
            (
                Command::RegisterDevice {
                    user: 99,
                    phone: phone.clone(),
                    reply: reply(),
                },
                Id(99),
                true,
            ),
            (
                Command::CheckCode {
                    phone: phone.clone(),
                    code: "654321".into(),
                    pin_presented: true,
                    reply: reply(),
                },
                Str(phone.clone()),
                true,
            ),
            (
                Command::UserPin {
                    user: 100,
                    reply: reply(),
                },
                Id(100),
                true,
            ),
            (
                Command::SetPin {
                    device: DEV,
                    pin_hash: "$argon2id$v=19$x".into(),
                    reply: reply(),
                },
                Id(DEV.user),
                true,
            ),
            (
                Command::SendSelf {
                    req: send_request(OTHER.user, DEV),
                    reply: reply(),
                },
                Id(DEV.user),
                true,
            ),
            (
                Command::UploadKeys {
                    device: DEV,
                    upload: pb::UploadKeys {
                        identity: Some(identity_keys()),
                        fallback_key: Some(pb::SignedKey {
                            key_id: "fb".into(),
                            public_key: bytes::Bytes::from_static(&[4; 32]),
                            signature: bytes::Bytes::from_static(&[5; 64]),
                        }),
                        one_time_keys: vec![pb::SignedKey {
                            key_id: "otk1".into(),
                            ..Default::default()
                        }],
                    },
                    reply: reply(),
                },
                Id(DEV.user),
                true,
            ),
            (
                Command::FetchBundles {
                    requester: DEV,
                    user: OTHER.user,
                    identities_only: true,
                    reply: reply(),
                },
                Id(OTHER.user),
                true,
            ),
            (
                Command::CreateLinkCode {
                    device: DEV,
                    reply: reply(),
                },
                Id(DEV.user),
                true,
            ),
            (
                Command::StoreLinkCode {
                    code: "ABCD-EFGH".into(),
                    record: LinkCodeRecord {
                        user_id: 4242,
                        expires_ms: 1_700_000_000_000,
                    },
                    reply: reply(),
                },
                Str("ABCD-EFGH".into()),
                true,
            ),
            (
                Command::TakeLinkCode {
                    code: "WXYZ-1234".into(),
                    reply: reply(),
                },
                Str("WXYZ-1234".into()),
                true,
            ),
            (
                Command::AddLinkedDevice {
                    user: 4242,
                    code: "WXYZ-1234".into(),
                    reply: reply(),
                },
                Id(4242),
                true,
            ),
            (
                Command::ListDevices {
                    user: 31,
                    reply: reply(),
                },
                Id(31),
                true,
            ),
            (
                Command::RevokeDevice {
                    by: OTHER,
                    target: 6,
                    reply: reply(),
                },
                Id(OTHER.user),
                true,
            ),
            (
                Command::CreateGroup {
                    group: 0xc0ffee,
                    creator: DEV,
                    req: pb::CreateGroup {
                        name: "climbers".into(),
                        description: "weekends".into(),
                        icon_ref: "icon/1".into(),
                        members: vec![1, 2, 3],
                        info_admin_only: true,
                    },
                    reply: reply(),
                },
                Id(0xc0ffee),
                true,
            ),
            (
                Command::ChangeGroup {
                    by: DEV,
                    req: pb::ChangeGroup {
                        group_id: 0xc0ffee,
                        change: Some(pb::change_group::Change::Add(pb::GroupUsers {
                            users: vec![8, 9],
                        })),
                    },
                    reply: reply(),
                },
                Id(0xc0ffee),
                true,
            ),
            (
                Command::GetGroup {
                    by: 12,
                    group: 0xdead,
                    reply: reply(),
                },
                Id(0xdead),
                true,
            ),
            (
                Command::ListGroups {
                    user: 13,
                    reply: reply(),
                },
                Id(13),
                true,
            ),
            (
                Command::SendGroup {
                    req: GroupSendRequest {
                        from: DEV,
                        from_phone: phone.clone(),
                        group_id: 0xabba,
                        client_msg_id: "g-1".into(),
                        payload: bytes::Bytes::from_static(b"sealed for all"),
                        first_attempt: false,
                    },
                    reply: reply(),
                },
                Id(0xabba),
                true,
            ),
            (
                Command::MemberDevicesChanged {
                    group: 0xabba,
                    user: 14,
                    reply: reply(),
                },
                Id(0xabba),
                true,
            ),
            (
                Command::LookupPhone {
                    phone: phone.clone(),
                    reply: reply(),
                },
                Str(phone.clone()),
                true,
            ),
            (
                Command::LookupUser {
                    user: 15,
                    reply: reply(),
                },
                Id(15),
                true,
            ),
            (
                Command::Send {
                    req: send_request(OTHER.user, DEV),
                    copies: None,
                    reply: SendReply::Ticket(reply()),
                },
                Id(OTHER.user),
                true,
            ),
            (
                Command::Send {
                    req: send_request(OTHER.user, DEV),
                    copies: Some(send_request(OTHER.user, DEV)),
                    reply: SendReply::Queued {
                        to: AnswerTo {
                            conn_id: 0x1234_5678_9abc,
                            frame: 77,
                        },
                        submitted: Instant::now(),
                    },
                },
                Id(OTHER.user),
                false,
            ),
            (
                Command::EnqueueReceipt {
                    to_user: 16,
                    receipt: receipt(),
                    must_exist: true,
                    reply: reply(),
                },
                Id(16),
                true,
            ),
            (
                Command::Delete {
                    device: DEV,
                    seqs: vec![1, 2, u64::MAX],
                    released: released.clone(),
                },
                Id(DEV.user),
                false,
            ),
            (
                Command::Ack {
                    device: DEV,
                    conn_id: 555,
                    seqs: vec![4, 5],
                    delete: vec![6],
                    released: released.clone(),
                    receipts: vec![
                        OwedReceipt {
                            to_user: 17,
                            receipt: receipt(),
                            message_seqs: vec![4],
                            released: released.clone(),
                        },
                        OwedReceipt {
                            to_user: 18,
                            receipt: pb::Receipt::default(),
                            message_seqs: vec![],
                            released: vec![],
                        },
                    ],
                },
                Id(DEV.user),
                false,
            ),
            (
                Command::Disconnected {
                    device: DEV,
                    conn_id: 556,
                },
                Id(DEV.user),
                false,
            ),
        ]
    }

    #[test]
    fn every_forwarded_command_round_trips_with_its_key() {
        let all = every_forwarded();
        // Authenticate has its own test; this covers every other kind.
        assert_eq!(all.len(), 29);
        for (cmd, key, has_answer) in all {
            let before = fields(&cmd);
            let Ok(out) = encode_command(cmd) else {
                panic!("not forwardable: {before}");
            };
            assert_eq!(out.key, key, "{before}");
            assert_eq!(out.answer.is_some(), has_answer, "{before}");
            assert!(out.link.is_none());
            let inbound = decode_command(&out.body, 4).unwrap();
            assert_eq!(fields(&inbound.cmd), before);
            assert_eq!(inbound.key, key, "{before}");
            assert_eq!(inbound.answer.is_some(), has_answer, "{before}");
            assert!(inbound.conn.is_none());
        }
    }

    #[test]
    fn a_queued_send_is_answered_through_the_push_queue_and_timed_here() {
        let (tx, rx) = oneshot::channel();
        drop(rx);
        for reply in [
            SendReply::Ticket(tx),
            SendReply::Queued {
                to: AnswerTo {
                    conn_id: 9,
                    frame: 10,
                },
                submitted: Instant::now(),
            },
        ] {
            let queued = matches!(reply, SendReply::Queued { .. });
            let cmd = Command::Send {
                req: send_request(2, DEV),
                copies: None,
                reply,
            };
            let out = encode_command(cmd).ok().unwrap();
            let before = Instant::now();
            let inbound = decode_command(&out.body, 4).unwrap();
            match inbound.cmd {
                Command::Send {
                    reply: SendReply::Queued { to, submitted },
                    ..
                } => {
                    assert!(queued);
                    assert_eq!((to.conn_id, to.frame), (9, 10));
                    assert!(submitted >= before);
                }
                Command::Send {
                    reply: SendReply::Ticket(_),
                    ..
                } => assert!(!queued),
                _ => panic!("not a send"),
            }
            assert_eq!(inbound.answer.is_some(), !queued);
        }
    }

    #[test]
    fn authenticate_keeps_the_link_here_and_gets_a_fresh_queue_there() {
        let (push, mut local_rx) = conn_queue(4);
        let cmd = Command::Authenticate {
            device: DEV,
            credential: vec![9, 8, 7],
            link: ConnLink {
                conn_id: 0xfeed_f00d,
                push,
            },
            reply: reply(),
        };
        let before = fields(&cmd);
        let out = encode_command(cmd).ok().unwrap();
        assert_eq!(out.key, RouteKey::Id(DEV.user));
        assert!(out.answer.is_some());
        let link = out.link.unwrap();
        assert_eq!(link.conn_id, 0xfeed_f00d);

        let inbound = decode_command(&out.body, 2).unwrap();
        assert_eq!(fields(&inbound.cmd), before);
        assert_eq!(inbound.key, RouteKey::Id(DEV.user));
        let (conn_id, mut remote_rx) = inbound.conn.unwrap();
        assert_eq!(conn_id, 0xfeed_f00d);
        let Command::Authenticate { link: remote, .. } = inbound.cmd else {
            panic!("not an authenticate");
        };
        // The shard's pushes reach the new queue, capacity as asked, and
        // come back to the original through the push codec.
        remote
            .push
            .try_send(ToConn::Notice(Notice::KeysLow(3)))
            .unwrap();
        remote
            .push
            .try_send(ToConn::Notice(Notice::UpToDate))
            .unwrap();
        assert!(
            remote
                .push
                .try_send(ToConn::Notice(Notice::UpToDate))
                .is_err()
        );
        let item = remote_rx.try_recv().unwrap();
        let (id, received) = decode_push(&encode_push(conn_id, &Received::Item(item))).unwrap();
        assert_eq!(id, link.conn_id);
        let Received::Item(item) = received else {
            panic!("not an item");
        };
        link.push.try_send(item).unwrap();
        assert!(matches!(
            local_rx.try_recv(),
            Some(ToConn::Notice(Notice::KeysLow(3)))
        ));
    }

    #[test]
    fn local_commands_never_travel() {
        let record = crate::store::MailRecord::default();
        for cmd in [
            Command::Sweep,
            Command::Tick,
            Command::Mail {
                from: 1,
                owner: 2,
                id: 3,
                record,
            },
            Command::MailDone { id: (1, 2) },
            Command::PayloadReleased { group: 1, seq: 2 },
            Command::Closing,
            Command::Shutdown,
        ] {
            let name = format!("{:?}", std::mem::discriminant(&cmd));
            assert!(encode_command(cmd).is_err(), "{name}");
        }
    }

    /// Sends `value` into the decoded command's reply and checks the
    /// original caller receives an equal value through the codec.
    macro_rules! answer_trip {
        ($variant:ident { $($field:ident : $val:expr),* $(,)? }, $value:expr) => {{
            let (tx, mut rx) = oneshot::channel();
            let out = encode_command(Command::$variant { $($field: $val,)* reply: tx })
                .ok()
                .unwrap();
            let inbound = decode_command(&out.body, 4).unwrap();
            let Command::$variant { reply, .. } = inbound.cmd else {
                panic!("decoded as another command");
            };
            reply.send(Ok($value)).unwrap();
            let body = inbound.answer.unwrap().now_or_never().unwrap().unwrap();
            (out.answer.unwrap())(Ok(body.as_slice()));
            let got = rx.try_recv().unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{:?}", $value));
        }};
    }

    #[test]
    fn every_answer_type_round_trips() {
        let phone = || "+15550003333".to_owned();
        answer_trip!(
            RequestCode { phone: phone() },
            CodeIssued {
                code: "123456".into(),
                expires_at_ms: 1_700_000_000_123,
            }
        );
        answer_trip!(
            VerifyCode {
                phone: phone(),
                code: "1".into()
            },
            0xdead_beef_u64
        );
        answer_trip!(
            RegisterDevice {
                user: 1,
                phone: phone()
            },
            Registered {
                user: 1,
                device: 4,
                credential: vec![1, 2, 3, 0, 255],
            }
        );
        for (user, locked_until_ms) in [(None, None), (Some(0), Some(99)), (Some(5), None)] {
            answer_trip!(
                CheckCode {
                    phone: phone(),
                    code: "1".into(),
                    pin_presented: false
                },
                CodeChecked {
                    user,
                    locked_until_ms,
                }
            );
        }
        answer_trip!(UserPin { user: 1 }, String::from("$argon2id$hash"));
        answer_trip!(
            SetPin {
                device: DEV,
                pin_hash: String::new()
            },
            true
        );
        answer_trip!(
            Authenticate {
                device: DEV,
                credential: vec![1],
                link: ConnLink {
                    conn_id: 1,
                    push: conn_queue(1).0,
                }
            },
            AuthInfo {
                phone: phone(),
                primary: true,
                has_keys: true,
                one_time_keys: 17,
                devices: vec![1, 2, 5],
            }
        );
        answer_trip!(
            SendSelf {
                req: send_request(1, DEV)
            },
            SendAccepted {
                server_ts_ms: 123,
                duplicate: true,
            }
        );
        answer_trip!(
            UploadKeys {
                device: DEV,
                upload: pb::UploadKeys::default()
            },
            (42_u32, true)
        );
        answer_trip!(
            FetchBundles {
                requester: DEV,
                user: 2,
                identities_only: false
            },
            vec![
                pb::DeviceBundle {
                    device_id: 1,
                    identity: Some(identity_keys()),
                    key: Some(pb::device_bundle::Key::OneTimeKey(pb::SignedKey {
                        key_id: "k".into(),
                        ..Default::default()
                    })),
                },
                pb::DeviceBundle::default(),
            ]
        );
        answer_trip!(
            CreateLinkCode { device: DEV },
            (String::from("ABCD-EFGH"), 77_u64)
        );
        answer_trip!(
            StoreLinkCode {
                code: "c".into(),
                record: LinkCodeRecord::default()
            },
            ()
        );
        answer_trip!(
            ListDevices { user: 1 },
            vec![pb::DeviceInfo {
                device_id: 2,
                primary: true,
                created_ms: 3,
                identity: Some(identity_keys()),
            }]
        );
        answer_trip!(
            GetGroup { by: 1, group: 2 },
            pb::GroupInfo {
                group_id: 2,
                name: "n".into(),
                description: "d".into(),
                icon_ref: "i".into(),
                info_admin_only: true,
                members: vec![pb::GroupMember {
                    user_id: 1,
                    role: 2,
                    joined_seq: 3,
                    phone: phone(),
                }],
                seq: 9,
                created_ms: 10,
            }
        );
        answer_trip!(
            ListGroups { user: 1 },
            vec![pb::GroupSummary {
                group_id: 2,
                name: "n".into(),
                role: 1,
                members: 12,
            }]
        );
        answer_trip!(
            SendGroup {
                req: GroupSendRequest {
                    from: DEV,
                    from_phone: phone(),
                    group_id: 3,
                    client_msg_id: "x".into(),
                    payload: bytes::Bytes::new(),
                    first_attempt: true,
                }
            },
            GroupSent {
                server_ts_ms: 5,
                duplicate: false,
                group_seq: 6,
            }
        );
        answer_trip!(
            LookupUser { user: 1 },
            UserSummary {
                user: 1,
                phone: phone(),
                devices: vec![1, 3],
            }
        );
    }

    #[test]
    fn errors_dropped_replies_and_bad_answers_reach_the_caller() {
        // An error answer, as the transport carries it.
        let (tx, mut rx) = oneshot::channel();
        let out = encode_command(Command::LookupUser { user: 1, reply: tx })
            .ok()
            .unwrap();
        let inbound = decode_command(&out.body, 4).unwrap();
        let Command::LookupUser {
            reply: shard_reply, ..
        } = inbound.cmd
        else {
            panic!("decoded as another command");
        };
        shard_reply.send(Err(RouteError::UnknownUser)).unwrap();
        let e = inbound.answer.unwrap().now_or_never().unwrap().unwrap_err();
        (out.answer.unwrap())(Err(decode_error(&encode_error(&e)).unwrap()));
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(RouteError::UnknownUser)
        ));

        // A shard that drops the request.
        let out = encode_command(Command::ListGroups {
            user: 1,
            reply: reply(),
        })
        .ok()
        .unwrap();
        let inbound = decode_command(&out.body, 4).unwrap();
        drop(inbound.cmd);
        assert!(matches!(
            inbound.answer.unwrap().now_or_never().unwrap(),
            Err(RouteError::Internal)
        ));

        // An answer body that does not decode.
        let (tx, mut rx) = oneshot::channel();
        let out = encode_command(Command::LookupUser { user: 1, reply: tx })
            .ok()
            .unwrap();
        (out.answer.unwrap())(Ok(&[0xff_u8, 0xff, 0xff][..]));
        assert!(matches!(rx.try_recv().unwrap(), Err(RouteError::Internal)));
    }

    fn every_error() -> Vec<RouteError> {
        let mut all = vec![
            RouteError::BadRequest("too long".into()),
            RouteError::Unauthenticated,
            RouteError::UnknownUser,
            RouteError::InvalidPhone,
            RouteError::CodeInvalid,
            RouteError::CodeExpired,
            RouteError::CodeLocked,
            RouteError::PinRequired,
            RouteError::PinInvalid,
            RouteError::PinLocked {
                retry_after_ms: 3_600_000,
            },
            RouteError::QueueFull {
                retry_after_ms: 60_000,
            },
            RouteError::DeviceMismatch {
                user: 0x77,
                missing: vec![1, 4],
                stale: vec![9],
            },
            RouteError::InvalidKeys("bad signature".into()),
            RouteError::NotPrimary,
            RouteError::TooManyDevices,
            RouteError::LinkCodeInvalid,
            RouteError::UnknownGroup,
            RouteError::NotGroupAdmin,
            RouteError::GroupFull,
            RouteError::NotGroupMember,
            RouteError::Storage(StoreError::Engine("disk full".into())),
            RouteError::NoServingNode,
            RouteError::CodeDelivery("sms gateway 503".into()),
            RouteError::CodeSenderUnavailable {
                retry_after_ms: 30_000,
            },
            RouteError::Overloaded {
                retry_after_ms: 250,
            },
            RouteError::Internal,
            RouteError::ShuttingDown,
        ];
        all.extend(Limit::ALL.map(|limit| RouteError::RateLimited {
            limit,
            retry_after_ms: 1234,
        }));
        all.extend(
            [HeldBy::Overloaded, HeldBy::Unavailable, HeldBy::QueueFull].map(|by| {
                RouteError::OrderHeld {
                    by,
                    retry_after_ms: 4321,
                }
            }),
        );
        all
    }

    #[test]
    fn every_route_error_round_trips_to_the_same_variant_and_fields() {
        let all = every_error();
        // Every kind code is exercised (Storage's Corrupt below).
        let mut kinds: Vec<u32> = all.iter().map(|e| error_to_wire(e).kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds, (1..=28).collect::<Vec<_>>());
        for e in all {
            let back = decode_error(&encode_error(&e)).unwrap();
            // Debug shows the variant and every field: equal Debug, equal
            // wire error (`gateway::wire::route_error` reads nothing else).
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
    }

    #[test]
    fn no_serving_node_reads_as_a_storage_error_on_a_node_of_the_previous_version() {
        let body = encode_error(&RouteError::NoServingNode);
        // The previous version's schema: `Error` without field 11.
        let old = wire::Error::decode(body.as_slice()).map(|mut w| {
            w.no_serving_node = false;
            w
        });
        match error_from_wire(old.unwrap()).unwrap() {
            RouteError::Storage(StoreError::Engine(text)) => {
                assert_eq!(text, RouteError::NoServingNode.to_string());
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_corrupt_record_stays_a_corrupt_store_error_with_its_text() {
        let e = RouteError::Storage(StoreError::Corrupt {
            what: "queue key",
            detail: "short key".into(),
        });
        match decode_error(&encode_error(&e)).unwrap() {
            RouteError::Storage(StoreError::Corrupt { what, detail }) => {
                assert_eq!(what, REMOTE_CORRUPT_WHAT);
                assert_eq!(detail, "queue key: short key");
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn unknown_error_kinds_and_values_are_wire_errors() {
        for w in [
            plain(0),
            plain(999),
            wire::Error {
                limit: "no_such_limit".into(),
                ..plain(code::RATE_LIMITED)
            },
            wire::Error {
                held_by: 0,
                ..plain(code::ORDER_HELD)
            },
        ] {
            assert!(decode_error(&w.encode_to_vec()).is_err(), "{w:?}");
        }
    }

    fn every_push() -> Vec<Received> {
        let entry = |seq| pb::QueueEntry {
            seq,
            server_ts_ms: 1_700_000_000_000 + seq,
            body: Some(pb::queue_entry::Body::Message(pb::Message {
                from_user: 1,
                from_device: 2,
                from_phone: "+15550004444".into(),
                client_msg_id: format!("m{seq}"),
                payload: bytes::Bytes::from_static(b"ciphertext"),
                to_user: 3,
                group_id: 0,
            })),
        };
        let mut all = vec![
            Received::Item(ToConn::Deliver(vec![entry(1), entry(2)].into_boxed_slice())),
            Received::Item(ToConn::Deliver(Box::new([]))),
            Received::Item(ToConn::Notice(Notice::UpToDate)),
            Received::Item(ToConn::Notice(Notice::KeysLow(0))),
            Received::Item(ToConn::Notice(Notice::KeysLow(5))),
            Received::Item(ToConn::SendAnswer {
                frame: 12,
                result: Ok(SendAccepted {
                    server_ts_ms: 99,
                    duplicate: true,
                }),
            }),
            Received::Closed,
        ];
        all.extend(every_error().into_iter().map(|e| {
            Received::Item(ToConn::SendAnswer {
                frame: u32::MAX,
                result: Err(Box::new(e)),
            })
        }));
        all.extend(
            [
                KickReason::Replaced,
                KickReason::SlowReader,
                KickReason::Revoked,
                KickReason::Unavailable,
                KickReason::ShuttingDown,
            ]
            .map(Received::Kicked),
        );
        all
    }

    #[test]
    fn every_push_round_trips() {
        for (i, push) in every_push().into_iter().enumerate() {
            let conn_id = 0x0102_0304_0506_0708 + i as u64;
            let (id, back) = decode_push(&encode_push(conn_id, &push)).unwrap();
            assert_eq!(id, conn_id);
            assert_eq!(format!("{back:?}"), format!("{push:?}"));
        }
    }

    #[test]
    fn empty_and_truncated_bodies_are_wire_errors() {
        assert!(matches!(
            decode_command(&[], 4),
            Err(WireError::UnknownKind("command"))
        ));
        assert!(matches!(
            decode_push(&[]),
            Err(WireError::UnknownKind("push"))
        ));
        // A command without its required device.
        let body = wire::Command {
            kind: Some(Kind::Disconnected(wire::Disconnected {
                device: None,
                conn_id: 1,
            })),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_command(&body, 4),
            Err(WireError::Missing("device"))
        ));
        // Every strict prefix of a valid body either fails or decodes to
        // something, never panics; most fail.
        let out = encode_command(Command::Ack {
            device: DEV,
            conn_id: 1,
            seqs: vec![1, 2, 3],
            delete: vec![4],
            released: vec![(1, (2, 3))],
            receipts: vec![OwedReceipt {
                to_user: 1,
                receipt: receipt(),
                message_seqs: vec![1],
                released: vec![],
            }],
        })
        .ok()
        .unwrap();
        let failed = (0..out.body.len())
            .filter(|n| decode_command(&out.body[..*n], 4).is_err())
            .count();
        assert!(failed > out.body.len() / 2);
    }

    #[test]
    fn garbage_never_panics() {
        // xorshift64: deterministic bytes, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut errors = 0;
        for round in 0..2000 {
            let len = (next() % 64) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && !body.is_empty() {
                // A plausible first key (field 1..29, length-delimited) so
                // the decoders get past the first byte.
                body[0] = (((next() % 29 + 1) as u8) << 3) | 2;
            }
            errors += usize::from(decode_command(&body, 1).is_err());
            let _ = decode_push(&body);
            let _ = decode_error(&body);
            let (tx, _rx) = oneshot::channel::<Result<AuthInfo, RouteError>>();
            (slot(tx).unwrap())(Ok(body.as_slice()));
        }
        assert!(errors > 1000);
        for body in [
            &[0xff_u8; 16][..],
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
            &[0x08],
        ] {
            assert!(decode_command(body, 1).is_err());
            assert!(decode_push(body).is_err());
            assert!(decode_error(body).is_err());
        }
    }
}
