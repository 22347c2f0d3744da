//! The high-level client: a cloneable [`Client`] handle and a background
//! task that owns the connection.
//!
//! The task (see `actor.rs`) keeps the device connected and authenticated,
//! reconnecting with [`Backoff`] after failures, pings when the link is
//! quiet, writes sends from the local outbox with many in flight
//! at once, and turns pushed queue entries into [`Event`]s. Handles talk to
//! it over a bounded channel and get answers over oneshot channels, so a
//! handle never blocks on the network, only on the task's inbox.

mod actor;
mod groups;

pub use groups::{
    Group, GroupChange, GroupChangeKind, GroupMember, GroupRole, GroupSummary, MAX_GROUP_MEMBERS,
    NewGroup,
};

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use switchboard_proto::limits;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::connection::ConnectOptions;
use crate::crypto::Crypto;
use crate::endpoint::Endpoint;
use crate::error::{CloseReason, Error, StorageError, UsageError};
use crate::ids::{self, DeviceId, GroupId, Seq, UserId};
use crate::outbox::{self, Content, StoredPayload};
use crate::register::Credentials;
use crate::store::StateFile;
use switchboard_proto::pb::{self, DevicePayload, ReceiptKind};

/// Default quiet time before a `Ping`: well inside the server's ~75 s idle
/// timeout even if one ping is lost, and rare enough to cost nothing.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);

/// Default wait for any frame after a `Ping` before the link is declared
/// dead and replaced.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(20);

/// Default number of sends written but not yet answered: enough to fill a
/// long fat link with small messages, small enough to bound what is resent
/// after a reconnect.
pub const DEFAULT_MAX_IN_FLIGHT_SENDS: usize = 256;

/// Default number of `DEVICE_MISMATCH` corrections per send before giving up
/// (a recipient changing devices faster than this is not a person).
pub const DEFAULT_MAX_DEVICE_RETRIES: u32 = 5;

/// Default capacity of the [`Events`] channel. When it is full the client
/// keeps reading answers (so a send awaited inside the event loop gets its
/// ✓) and sets pushed messages aside until the application catches up.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Default capacity of the handle → task command channel. When full,
/// callers wait.
pub const DEFAULT_COMMAND_CAPACITY: usize = 256;

/// How a [`Client`] behaves. Build one with [`ClientConfig::new`] and change
/// fields as needed (new fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The server.
    pub endpoint: Endpoint,
    /// Handshake options (user agent, pinned key, timeouts, frame limit).
    pub connect: ConnectOptions,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Quiet time before a `Ping` is sent.
    pub ping_interval: Duration,
    /// Wait for an answer to a `Ping` before reconnecting.
    pub pong_timeout: Duration,
    /// Where to keep pending sends across restarts (one file per send,
    /// sealed with the state key, mode 0600 in a 0700 directory); `None`
    /// keeps them in memory only. Needs `state_dir`; a subdirectory of it
    /// is a good place. [`crate::Outbox`] reads it while no client runs.
    pub outbox_dir: Option<PathBuf>,
    /// Where to keep the device's end-to-end encryption state (identity
    /// keys, sessions), encrypted at rest, mode 0700. `None` keeps it in
    /// memory only: the device's identity then dies with the client, and a
    /// later client for the same device is refused by the server (its
    /// identity keys may never change), so only tests should leave it
    /// unset. One client at a time may use it: [`Client::start`] locks it
    /// until the client stops.
    pub state_dir: Option<PathBuf>,
    /// Most pending sends; more fail with [`Error::OutboxFull`].
    pub outbox_capacity: usize,
    /// Most sends written and not yet answered.
    pub max_in_flight_sends: usize,
    /// `DEVICE_MISMATCH` corrections per send before it fails.
    pub max_device_retries: u32,
    /// Capacity of the [`Events`] channel.
    pub event_capacity: usize,
    /// Capacity of the command channel shared by all handles.
    pub command_capacity: usize,
}

impl ClientConfig {
    /// Defaults for `endpoint`: in-memory outbox, 25 s pings, 100 ms → 30 s
    /// backoff.
    #[must_use]
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            connect: ConnectOptions::default(),
            backoff: Backoff::default(),
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            outbox_dir: None,
            state_dir: None,
            outbox_capacity: outbox::DEFAULT_CAPACITY,
            max_in_flight_sends: DEFAULT_MAX_IN_FLIGHT_SENDS,
            max_device_retries: DEFAULT_MAX_DEVICE_RETRIES,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            command_capacity: DEFAULT_COMMAND_CAPACITY,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |why| Err(Error::Usage(UsageError::Invalid(why)));
        if self.outbox_capacity == 0 {
            return invalid("outbox_capacity must be at least 1");
        }
        if self.max_in_flight_sends == 0 {
            return invalid("max_in_flight_sends must be at least 1");
        }
        if self.event_capacity == 0 || self.command_capacity == 0 {
            return invalid("channel capacities must be at least 1");
        }
        if self.ping_interval.is_zero() || self.pong_timeout.is_zero() {
            return invalid("ping_interval and pong_timeout must be positive");
        }
        if self.outbox_dir.is_some() && self.state_dir.is_none() {
            return invalid(
                "outbox_dir needs a state_dir (its files are sealed with the state key)",
            );
        }
        if let Some(key) = &self.connect.server_key
            && key.len() != switchboard_proto::noise::KEY_BYTES
        {
            return Err(UsageError::BadServerKey(key.len()).into());
        }
        Ok(())
    }
}

/// A send that got its ✓: the server stored it durably for every recipient
/// device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sent {
    /// The client message id.
    pub client_msg_id: String,
    /// The recipient (0 for a group message).
    pub to_user: UserId,
    /// When the server accepted it (ms since the Unix epoch).
    pub server_ts_ms: u64,
    /// True when the server had already accepted this id (a retry).
    pub duplicate: bool,
    /// The group, for a group message.
    pub group_id: Option<GroupId>,
    /// Its place in the group's order, for a group message.
    pub group_seq: Option<u64>,
}

/// Something that happened, delivered on [`Events`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// The client is connected and authenticated; the device's queue follows.
    Connected {
        /// The account's phone number, as the server knows it.
        phone: String,
        /// The server's clock (ms since the Unix epoch).
        server_time_ms: u64,
    },
    /// A message for this device, decrypted. Acknowledge `seq` with
    /// [`Client::ack`] once it is safely handled; until then the server
    /// keeps it and redelivers it on the next connection.
    ///
    /// When `from_user` is this account, another device of the account sent
    /// it to `to_user` (a copy, so every device shows the conversation).
    Message {
        /// Queue position, to acknowledge.
        seq: Seq,
        /// Sender.
        from_user: UserId,
        /// Sender's device.
        from_device: DeviceId,
        /// Sender's phone number.
        from_phone: String,
        /// The conversation's recipient: this account, or for a copy of a
        /// message sent by another device of this account, the peer.
        to_user: UserId,
        /// True for a copy of a message sent by another device of this
        /// account (then `to_user` is the peer it was sent to).
        from_own_device: bool,
        /// Sender's message id (unique per sending device).
        client_msg_id: String,
        /// The decrypted payload, as the sender passed it to `send_to_*`.
        payload: Bytes,
        /// The sender's clock when it was encrypted (ms since the Unix
        /// epoch; not verified, for display).
        sent_at_ms: u64,
        /// When the server accepted it (ms since the Unix epoch).
        server_ts_ms: u64,
    },
    /// A message to a group this account is a member of, decrypted with the
    /// sender's sender key. Acknowledge `seq` like a [`Event::Message`];
    /// messages of one group come in the group's order (`group_seq`, with
    /// [`Event::GroupChanged`] in the same order).
    GroupMessage {
        /// Queue position, to acknowledge.
        seq: Seq,
        /// The group.
        group_id: GroupId,
        /// Its place in the group's order.
        group_seq: u64,
        /// Sender.
        from_user: UserId,
        /// Sender's device.
        from_device: DeviceId,
        /// Sender's phone number.
        from_phone: String,
        /// True when another device of this account sent it.
        from_own_device: bool,
        /// Sender's message id.
        client_msg_id: String,
        /// The decrypted payload.
        payload: Bytes,
        /// The sender's clock when it was encrypted (not verified).
        sent_at_ms: u64,
        /// When the server accepted it (ms since the Unix epoch).
        server_ts_ms: u64,
    },
    /// A group's members or info changed (or it was created with this
    /// account in it), in the group's order. Already acknowledged by the
    /// client. When members leave or are removed, this device's sender key
    /// for the group is replaced before its next message.
    GroupChanged {
        /// The group.
        group_id: GroupId,
        /// Its place in the group's order.
        group_seq: u64,
        /// Who made the change.
        actor: UserId,
        /// What changed.
        kind: GroupChangeKind,
        /// Whom it concerns.
        users: Vec<UserId>,
        /// The group's info after the change, for `Created` and
        /// `InfoChanged` (without members: [`Client::group`] has them).
        info: Option<Group>,
    },
    /// The running tally of receipts for one group message this device
    /// sent: how many members have it on a device, and how many read it,
    /// out of the members when it was sent (this account not counted).
    /// Follows each [`Event::Receipt`] with a `group_id`.
    GroupReceipts {
        /// The group.
        group_id: GroupId,
        /// The message.
        client_msg_id: String,
        /// Members with it on at least one device (✓✓).
        delivered: u32,
        /// Members who read it.
        read: u32,
        /// Members it was sent to.
        members: u32,
    },
    /// A message for this device that cannot be decrypted (no session, a
    /// damaged or replayed payload). The client has already acknowledged
    /// it, so it never blocks the queue; the session with the sender's
    /// device is dropped, so the next message to it starts a fresh one.
    Undecryptable {
        /// Queue position (already acknowledged).
        seq: Seq,
        /// Sender.
        from_user: UserId,
        /// Sender's device.
        from_device: DeviceId,
        /// Sender's phone number.
        from_phone: String,
        /// Sender's message id.
        client_msg_id: String,
        /// The group, for a group message (whose sender key was missing).
        group_id: Option<GroupId>,
        /// Why it could not be read.
        reason: String,
    },
    /// The identity keys of a peer's devices changed (a re-registration, a
    /// new or replaced device), so the safety number with them changed.
    /// Messaging goes on; the user may want to compare safety numbers again.
    SafetyNumberChanged {
        /// The peer.
        user_id: UserId,
        /// The peer's phone number, when known.
        phone: String,
    },
    /// A contact's devices changed: a device was linked or revoked, or the
    /// contact re-registered (every device replaced). Reported when the
    /// client learns it (a send corrected by the server, a message from a
    /// new device, [`Client::safety_number`]); a change of keys comes with
    /// [`Event::SafetyNumberChanged`] too.
    ContactDevicesChanged {
        /// The contact.
        user_id: UserId,
        /// The contact's phone number, when known.
        phone: String,
        /// The contact's devices now, ascending.
        devices: Vec<DeviceId>,
        /// Devices new since the last report.
        added: Vec<DeviceId>,
        /// Devices gone since the last report.
        removed: Vec<DeviceId>,
    },
    /// Messages this account sent to `to_user` were never delivered: the
    /// recipient re-registered its number and the devices that held them
    /// were replaced. The device that sent them sends them again, once, to
    /// the recipient's current devices (those in `resending`, with the same
    /// ids; their ✓ comes as [`Event::Sent`]), after the change of the
    /// recipient's keys is reported. Already acknowledged by the client.
    Undelivered {
        /// The recipient.
        to_user: UserId,
        /// The recipient's phone number, when known.
        phone: String,
        /// The messages concerned.
        client_msg_ids: Vec<String>,
        /// The ones this client is sending again.
        resending: Vec<String>,
    },
    /// The account's device list changed (a device was linked or revoked).
    /// Already acknowledged by the client.
    DevicesChanged {
        /// The account's current devices, ascending.
        devices: Vec<DeviceId>,
    },
    /// This device's public keys were uploaded to the server's key
    /// directory (at first start, and whenever its one-time keys run low).
    KeysPublished {
        /// One-time keys the server now holds for this device.
        one_time_keys_remaining: u32,
    },
    /// A receipt for messages this account sent (✓✓ or read). Receipts may
    /// repeat (one per recipient device, redeliveries): treat them
    /// idempotently. Acknowledge `seq` like a message.
    Receipt {
        /// Queue position, to acknowledge.
        seq: Seq,
        /// The recipient who received or read.
        from_user: UserId,
        /// The recipient's device.
        from_device: DeviceId,
        /// The recipient's phone number.
        from_phone: String,
        /// Delivered or read.
        kind: ReceiptKind,
        /// Ids of the messages concerned.
        client_msg_ids: Vec<String>,
        /// When the server made the receipt (ms since the Unix epoch).
        server_ts_ms: u64,
        /// The group, when the messages were sent to one (`from_user` is
        /// then the member).
        group_id: Option<GroupId>,
    },
    /// The device's queue is drained; what follows arrives live.
    UpToDate,
    /// A send whose caller is gone (loaded from the outbox directory at
    /// start, or whose future was dropped) got its ✓.
    Sent(Sent),
    /// A send whose caller is gone failed for good.
    SendFailed {
        /// Its client message id.
        client_msg_id: String,
        /// The recipient, when known.
        to_user: Option<UserId>,
        /// Why.
        error: Error,
    },
    /// The link is down (a connection dropped or an attempt failed); the
    /// client reconnects after a backoff.
    Disconnected {
        /// What went wrong.
        reason: Error,
    },
    /// The client stopped for good (closed by the caller, replaced by
    /// another connection of this device, credential rejected). Last event.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// The stream of [`Event`]s of one [`Client`]: call [`Events::recv`], or
/// use it as a [`futures_util::Stream`] (`while let Some(event) =
/// events.next().await` with `StreamExt`).
///
/// Drain it. Awaiting a send (or any call) inside the loop that drains it is
/// fine: while the channel is full the client still reads answers and only
/// sets pushed messages aside (as many as the server lets a connection hold
/// unacknowledged). Dropping it discards further events (messages then
/// stay unacknowledged on the server).
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Events {
    /// The next event; `None` after [`Event::Closed`].
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// A new random client message id: 16 random bytes in hex.
#[must_use]
pub fn new_client_msg_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Whom an end-to-end encrypted send is for.
enum Recipient<'a> {
    User(UserId),
    Phone(&'a str),
}

/// Requests from handles to the task.
enum Command {
    Send {
        client_msg_id: String,
        /// The id was made here by `new_client_msg_id` for this send.
        fresh_id: bool,
        to_user: Option<u64>,
        to_phone: Option<String>,
        content: Content,
        reply: Reply<Sent>,
    },
    Lookup {
        phone: String,
        reply: Reply<pb::UserInfo>,
    },
    ReadReceipt {
        to_user: u64,
        /// The group the messages were sent to (0: none).
        group_id: u64,
        client_msg_ids: Vec<String>,
        reply: Reply<()>,
    },
    /// A group management request, answered with the server's body.
    Group {
        body: pb::client_frame::Body,
        reply: Reply<pb::server_frame::Body>,
    },
    Ack {
        seqs: Vec<u64>,
    },
    CreateLinkCode {
        reply: Reply<pb::LinkCode>,
    },
    ListDevices {
        reply: Reply<Vec<Device>>,
    },
    RevokeDevice {
        device_id: u32,
        reply: Reply<()>,
    },
    /// Make sure the identities of `user_id`'s devices are known.
    FetchKeys {
        user_id: u64,
        reply: Reply<()>,
    },
    SafetyNumber {
        user_id: u64,
        reply: Reply<String>,
    },
    KeysPublished {
        reply: Reply<()>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// State shared by the handles and the task.
#[derive(Debug)]
struct Shared {
    /// Set once by the task when it stops.
    closed: OnceLock<CloseReason>,
    // Raw: the task compares them with wire fields.
    user_id: u64,
    device_id: u32,
    phone: String,
}

/// A handle to a running client. Clone it freely; the client stops when
/// [`Client::close`] is called or every handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    /// The task's inbox. Bounded: when full, callers wait.
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

fn check_msg_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > limits::MAX_CLIENT_MSG_ID_BYTES {
        return Err(UsageError::InvalidClientMsgId {
            len: id.len(),
            max: limits::MAX_CLIENT_MSG_ID_BYTES,
        }
        .into());
    }
    Ok(())
}

/// Largest payload of [`Client::send_to_user`] and friends: the protocol's
/// per-device limit less room for the encryption (wire envelope, Olm
/// pre-key header and MAC, padding, the plaintext envelope with the
/// sender's identity keys).
pub const MAX_PLAINTEXT_BYTES: usize = limits::MAX_PAYLOAD_BYTES - 1024;

/// One device of this account, from [`Client::list_devices`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Device {
    /// The device id.
    pub device_id: DeviceId,
    /// Whether it is the primary device (the one that registered the phone).
    pub primary: bool,
    /// Whether it is the device this client runs as.
    pub this_device: bool,
    /// When it was registered or linked (ms since the Unix epoch).
    pub created_ms: u64,
    /// Its Ed25519 identity key in base64, once it has published keys.
    pub identity_key: Option<String>,
}

/// A user found by phone number, from [`Client::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserInfo {
    /// The account.
    pub user_id: UserId,
    /// Its phone number, as the server knows it.
    pub phone: String,
    /// Its current devices, ascending.
    pub devices: Vec<DeviceId>,
}

impl From<pb::UserInfo> for UserInfo {
    fn from(info: pb::UserInfo) -> Self {
        Self {
            user_id: UserId(info.user_id),
            phone: info.phone,
            devices: ids::devices(&info.devices),
        }
    }
}

fn check_plaintext(payload: &[u8]) -> Result<(), Error> {
    if payload.len() > MAX_PLAINTEXT_BYTES {
        return Err(UsageError::PayloadTooLarge {
            len: payload.len(),
            max: MAX_PLAINTEXT_BYTES,
        }
        .into());
    }
    Ok(())
}

fn check_payload(payload: &[u8]) -> Result<(), Error> {
    if payload.len() > limits::MAX_PAYLOAD_BYTES {
        return Err(UsageError::PayloadTooLarge {
            len: payload.len(),
            max: limits::MAX_PAYLOAD_BYTES,
        }
        .into());
    }
    Ok(())
}

fn check_user(to_user: UserId) -> Result<(), Error> {
    if to_user.get() == 0 {
        return Err(UsageError::Invalid("user id 0 is not a user").into());
    }
    Ok(())
}

fn check_phone(phone: &str) -> Result<(), Error> {
    if phone.trim().is_empty() {
        return Err(UsageError::Invalid("empty phone number").into());
    }
    Ok(())
}

/// Locks `dir` and loads the device's crypto state from it (creating it on
/// first run, or when the stored state belongs to another device), or makes
/// an in-memory one.
async fn open_crypto(
    dir: Option<PathBuf>,
    creds: &Credentials,
) -> Result<(Crypto, Option<Arc<StateFile>>), Error> {
    let (user_id, device_id) = (creds.user_id, creds.device_id);
    let Some(dir) = dir else {
        return Ok((Crypto::new(user_id.get(), device_id.get()), None));
    };
    tokio::task::spawn_blocking(move || {
        let file = StateFile::open(dir)?;
        let crypto = load_crypto(&file, user_id, device_id)?;
        Ok((crypto, Some(Arc::new(file))))
    })
    .await
    .map_err(|e| StorageError::Task(e.to_string()))?
}

/// The crypto state of device `device_id` of `user_id` in `file`, made and
/// stored when there is none (or it belongs to another device). Blocks.
pub(crate) fn load_crypto(
    file: &StateFile,
    user_id: UserId,
    device_id: DeviceId,
) -> Result<Crypto, Error> {
    let (user_id, device_id) = (user_id.get(), device_id.get());
    let restored = match file.load()? {
        Some(bytes) => Crypto::restore(&bytes, user_id, device_id)?,
        None => None,
    };
    Ok(match restored {
        Some(crypto) => crypto,
        None => {
            // A new identity: stored before its keys are ever uploaded, so
            // the server never holds keys this device has lost.
            let crypto = Crypto::new(user_id, device_id);
            file.save(&crypto.snapshot()?)?;
            crypto
        }
    })
}

impl Client {
    /// Starts a client for the device `creds`: loads the outbox (if
    /// `config.outbox_dir` is set) and spawns the task that connects,
    /// authenticates and stays connected. Returns at once; watch
    /// [`Event::Connected`], or just call methods (they wait for the link).
    ///
    /// Sends loaded from the outbox go first, in their original order; their
    /// outcome is reported as [`Event::Sent`] / [`Event::SendFailed`].
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for an invalid config or when called outside a Tokio
    /// runtime, and with [`UsageError::StateDirInUse`] while another client
    /// (in this or another process) uses `config.state_dir`;
    /// [`Error::Storage`] if the outbox or state directory cannot be read or
    /// written; [`Error::Crypto`] if the stored crypto state is unusable.
    /// Connection problems are not errors here: they show up as
    /// [`Event::Disconnected`] (retried) or [`Event::Closed`] (final, e.g. a
    /// rejected credential).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(creds: switchboard_client::Credentials) -> Result<(), switchboard_client::Error> {
    /// use switchboard_client::{Client, ClientConfig, Event};
    /// let mut config = ClientConfig::new("ws://127.0.0.1:8080/ws".parse()?);
    /// config.state_dir = Some("/var/lib/myapp/sb-state".into());
    /// config.outbox_dir = Some("/var/lib/myapp/sb-state/outbox".into());
    /// let (client, mut events) = Client::start(config, creds).await?;
    /// let ok = client.send_to_phone("+15550002222", "hi".into()).await?;
    /// println!("✓ {}", ok.client_msg_id);
    /// while let Some(event) = events.recv().await {
    ///     match event {
    ///         Event::Receipt { seq, kind, client_msg_ids, .. } => {
    ///             println!("{kind:?} {client_msg_ids:?}");
    ///             client.ack([seq]).await?;
    ///         }
    ///         Event::Closed { .. } => break,
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start(config: ClientConfig, creds: Credentials) -> Result<(Self, Events), Error> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(UsageError::NoRuntime.into());
        }
        // The state directory first: it is locked before anything in it (or
        // in the outbox, sealed with its key) is read.
        let (crypto, state_file) = open_crypto(config.state_dir.clone(), &creds).await?;
        let (store, loaded) = match (config.outbox_dir.clone(), &state_file) {
            (Some(dir), Some(state)) => {
                let sealer = state.sealer();
                let (store, sends) =
                    tokio::task::spawn_blocking(move || outbox::Store::open(dir, sealer))
                        .await
                        .map_err(|e| StorageError::Task(e.to_string()))??;
                (Some(Arc::new(store)), sends)
            }
            _ => (None, Vec::new()),
        };
        // The server key to pin: the caller's, else the one the device was
        // registered with, else the one first seen by an earlier run.
        let mut config = config;
        if config.connect.server_key.is_none() {
            config.connect.server_key = match (&creds.server_key, config.state_dir.clone()) {
                (Some(key), _) => Some(key.clone()),
                (None, Some(dir)) => {
                    tokio::task::spawn_blocking(move || crate::store::load_server_key(&dir))
                        .await
                        .map_err(|e| StorageError::Task(e.to_string()))??
                }
                (None, None) => None,
            };
            config.validate()?;
        }
        // Handles → task; bounded, callers wait when it is full.
        let (tx, commands) = mpsc::channel(config.command_capacity);
        // Task → application; bounded. While it is full the task keeps
        // events in its own queue and sets pushed entries aside (bounded by
        // the server's unacked limit); it never stops reading answers.
        let (events_tx, events_rx) = mpsc::channel(config.event_capacity);
        let shared = Arc::new(Shared {
            closed: OnceLock::new(),
            user_id: creds.user_id.get(),
            device_id: creds.device_id.get(),
            phone: creds.phone.clone(),
        });
        let span = tracing::info_span!(
            "client",
            user_id = creds.user_id.get(),
            device_id = creds.device_id.get()
        );
        let task = actor::Actor::new(
            config,
            creds,
            Arc::clone(&shared),
            commands,
            events_tx,
            store,
            loaded,
            crypto,
            state_file,
        );
        tokio::spawn(task.run().instrument(span));
        Ok((Self { tx, shared }, Events { rx: events_rx }))
    }

    /// The account.
    #[must_use]
    pub fn user_id(&self) -> UserId {
        UserId(self.shared.user_id)
    }

    /// This device.
    #[must_use]
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.shared.device_id)
    }

    /// The account's phone number, from the credentials.
    #[must_use]
    pub fn phone(&self) -> &str {
        &self.shared.phone
    }

    /// Why the client stopped, once it has.
    #[must_use]
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.closed.get().cloned()
    }

    fn closed_error(&self) -> Error {
        Error::Closed(self.close_reason().unwrap_or(CloseReason::ByClient))
    }

    async fn command(&self, command: Command) -> Result<(), Error> {
        self.tx.send(command).await.map_err(|_| self.closed_error())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.command(make(reply)).await?;
        rx.await.map_err(|_| self.closed_error())?
    }

    /// Looks up a user by phone number (waits for a connection if needed).
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `UNKNOWN_USER`; [`Error::Busy`] when too many
    /// requests wait for a connection; [`Error::Closed`] after the client
    /// stopped.
    pub async fn lookup(&self, phone: &str) -> Result<UserInfo, Error> {
        check_phone(phone)?;
        let phone = phone.to_owned();
        let info = self.call(|reply| Command::Lookup { phone, reply }).await?;
        Ok(UserInfo::from(info))
    }

    /// Sends explicit per-device payloads (one per current device of the
    /// recipient) under a fresh client message id, as they are: **not
    /// encrypted** and without copies for this account's other devices (for
    /// tests, benchmarks and callers doing their own encryption). Use
    /// [`Client::send_to_user`] for messages. Resolves on ✓.
    ///
    /// Dropping the future does not cancel the send: it stays in the outbox
    /// until it gets its ✓ (reported as [`Event::Sent`]).
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `DEVICE_MISMATCH` (fix the list and retry with
    /// [`Client::send_with_id`] and the same id) or another refusal;
    /// [`Error::Usage`] for invalid arguments; [`Error::OutboxFull`];
    /// [`Error::Storage`] if the outbox file cannot be written;
    /// [`Error::Closed`] if the client stops first (a persisted send is still
    /// resent by the next client using the same outbox directory).
    pub async fn send(&self, to_user: UserId, payloads: Vec<DevicePayload>) -> Result<Sent, Error> {
        self.send_per_device(new_client_msg_id(), true, to_user, payloads)
            .await
    }

    /// As [`Client::send`], with a caller-chosen client message id (1..=64
    /// bytes, unique per sending device; reuse it only to retry).
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn send_with_id(
        &self,
        client_msg_id: impl Into<String>,
        to_user: UserId,
        payloads: Vec<DevicePayload>,
    ) -> Result<Sent, Error> {
        self.send_per_device(client_msg_id.into(), false, to_user, payloads)
            .await
    }

    async fn send_per_device(
        &self,
        client_msg_id: String,
        fresh_id: bool,
        to_user: UserId,
        payloads: Vec<DevicePayload>,
    ) -> Result<Sent, Error> {
        check_msg_id(&client_msg_id)?;
        check_user(to_user)?;
        if payloads.is_empty() {
            return Err(UsageError::Invalid("a send needs at least one device payload").into());
        }
        for p in &payloads {
            check_payload(&p.payload)?;
        }
        let content = Content::PerDevice(
            payloads
                .into_iter()
                .map(|p| StoredPayload {
                    device_id: p.device_id,
                    payload: p.payload,
                })
                .collect(),
        );
        self.submit(client_msg_id, fresh_id, Some(to_user.get()), None, content)
            .await
    }

    /// Sends `payload` end-to-end encrypted to every current device of
    /// `to_user`, with a copy for each other device of this account. The
    /// client finds the device lists (cache, lookup by a known phone number,
    /// or the server's `DEVICE_MISMATCH` answer), fetches key bundles for
    /// devices it has no session with, and fixes all of it transparently.
    /// Resolves on ✓. At most [`MAX_PLAINTEXT_BYTES`].
    ///
    /// # Errors
    ///
    /// As [`Client::send`]; `DEVICE_MISMATCH` only after
    /// [`ClientConfig::max_device_retries`] corrections; [`Error::Crypto`]
    /// when a device has not published keys (after retrying for about 5 s)
    /// or its key bundle fails verification.
    pub async fn send_to_user(&self, to_user: UserId, payload: Bytes) -> Result<Sent, Error> {
        self.send_plaintext(new_client_msg_id(), true, Recipient::User(to_user), payload)
            .await
    }

    /// As [`Client::send_to_user`], with a caller-chosen client message id.
    ///
    /// # Errors
    ///
    /// As [`Client::send_to_user`].
    pub async fn send_to_user_with_id(
        &self,
        client_msg_id: impl Into<String>,
        to_user: UserId,
        payload: Bytes,
    ) -> Result<Sent, Error> {
        let recipient = Recipient::User(to_user);
        self.send_plaintext(client_msg_id.into(), false, recipient, payload)
            .await
    }

    /// Sends `payload` to every current device of the user with this phone
    /// number (looked up when the send goes out). Resolves on ✓.
    ///
    /// # Errors
    ///
    /// As [`Client::send_to_user`], plus `UNKNOWN_USER`.
    pub async fn send_to_phone(&self, phone: &str, payload: Bytes) -> Result<Sent, Error> {
        self.send_plaintext(new_client_msg_id(), true, Recipient::Phone(phone), payload)
            .await
    }

    /// As [`Client::send_to_phone`], with a caller-chosen client message id.
    ///
    /// # Errors
    ///
    /// As [`Client::send_to_phone`].
    pub async fn send_to_phone_with_id(
        &self,
        client_msg_id: impl Into<String>,
        phone: &str,
        payload: Bytes,
    ) -> Result<Sent, Error> {
        let recipient = Recipient::Phone(phone);
        self.send_plaintext(client_msg_id.into(), false, recipient, payload)
            .await
    }

    /// The send behind `send_to_user` and `send_to_phone`; `fresh_id` when
    /// the id was made here for it.
    async fn send_plaintext(
        &self,
        client_msg_id: String,
        fresh_id: bool,
        to: Recipient<'_>,
        payload: Bytes,
    ) -> Result<Sent, Error> {
        check_msg_id(&client_msg_id)?;
        let (to_user, to_phone) = match to {
            Recipient::User(user) => {
                check_user(user)?;
                (Some(user.get()), None)
            }
            Recipient::Phone(phone) => {
                check_phone(phone)?;
                (None, Some(phone.to_owned()))
            }
        };
        check_plaintext(&payload)?;
        let content = Content::AllDevices { payload };
        self.submit(client_msg_id, fresh_id, to_user, to_phone, content)
            .await
    }

    async fn submit(
        &self,
        client_msg_id: String,
        fresh_id: bool,
        to_user: Option<u64>,
        to_phone: Option<String>,
        content: Content,
    ) -> Result<Sent, Error> {
        self.call(|reply| Command::Send {
            client_msg_id,
            fresh_id,
            to_user,
            to_phone,
            content,
            reply,
        })
        .await
    }

    /// Acknowledges queue entries ([`Event::Message`] / [`Event::Receipt`]
    /// `seq`s): the server deletes them and, for messages, tells the sender
    /// ✓✓. Returns once the ack is queued; acks made while disconnected are
    /// sent after the next authentication.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] after the client stopped.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(client: switchboard_client::Client, mut events: switchboard_client::Events)
    /// # -> Result<(), switchboard_client::Error> {
    /// use switchboard_client::Event;
    /// while let Some(event) = events.recv().await {
    ///     if let Event::Message { seq, from_user, payload, .. } = event {
    ///         println!("{from_user}: {}", String::from_utf8_lossy(&payload));
    ///         client.ack([seq]).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// It takes queue positions ([`Seq`]), not the sender's [`UserId`]:
    ///
    /// ```compile_fail
    /// # async fn demo(client: switchboard_client::Client, mut events: switchboard_client::Events)
    /// # -> Result<(), switchboard_client::Error> {
    /// use switchboard_client::Event;
    /// if let Some(Event::Message { from_user, .. }) = events.recv().await {
    ///     client.ack([from_user]).await?; // error: expected `Seq`, found `UserId`
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self, seqs: impl IntoIterator<Item = Seq>) -> Result<(), Error> {
        let seqs: Vec<u64> = seqs.into_iter().map(Seq::get).collect();
        if seqs.is_empty() {
            return Ok(());
        }
        self.command(Command::Ack { seqs }).await
    }

    /// Tells `to_user` that these messages of theirs were read (blue ✓✓).
    /// Waits for the server's `ReceiptOk`.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for more than 1000 ids; [`Error::Server`];
    /// [`Error::Busy`]; [`Error::Closed`].
    pub async fn send_read_receipt(
        &self,
        to_user: UserId,
        client_msg_ids: Vec<String>,
    ) -> Result<(), Error> {
        check_user(to_user)?;
        self.read_receipt(to_user, 0, client_msg_ids).await
    }

    /// The checks and the request behind the read receipts; `group_id` 0
    /// for a 1:1 conversation.
    async fn read_receipt(
        &self,
        to_user: UserId,
        group_id: u64,
        client_msg_ids: Vec<String>,
    ) -> Result<(), Error> {
        if client_msg_ids.len() > limits::MAX_RECEIPT_IDS {
            return Err(UsageError::TooManyIds {
                len: client_msg_ids.len(),
                max: limits::MAX_RECEIPT_IDS,
            }
            .into());
        }
        if client_msg_ids.is_empty() {
            return Ok(());
        }
        for id in &client_msg_ids {
            check_msg_id(id)?;
        }
        self.call(|reply| Command::ReadReceipt {
            to_user: to_user.get(),
            group_id,
            client_msg_ids,
            reply,
        })
        .await
    }

    /// Makes a link code (`XXXX-XXXX-XXXX-XXXX`, valid 5 minutes) that a new
    /// device presents to [`crate::register::link_device`] to join this
    /// account. Primary device only.
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `NOT_PRIMARY` or `TOO_MANY_DEVICES` (1 primary
    /// + 4 linked); [`Error::Busy`]; [`Error::Closed`].
    pub async fn create_link_code(&self) -> Result<pb::LinkCode, Error> {
        self.call(|reply| Command::CreateLinkCode { reply }).await
    }

    /// This account's devices. Their identity keys are verified and
    /// remembered (they feed the safety numbers).
    ///
    /// # Errors
    ///
    /// [`Error::Server`]; [`Error::Busy`]; [`Error::Closed`].
    pub async fn list_devices(&self) -> Result<Vec<Device>, Error> {
        self.call(|reply| Command::ListDevices { reply }).await
    }

    /// Revokes another device of this account: it is disconnected at once
    /// and its credential stops working. Primary device only.
    ///
    /// # Errors
    ///
    /// [`Error::Server`] with `NOT_PRIMARY`, or `BAD_REQUEST` for this
    /// device or an unknown one; [`Error::Busy`]; [`Error::Closed`].
    pub async fn revoke_device(&self, device_id: DeviceId) -> Result<(), Error> {
        let device_id = device_id.get();
        self.call(|reply| Command::RevokeDevice { device_id, reply })
            .await
    }

    /// The safety number of this account and `peer_user`: 60 digits in 12
    /// groups of 5, computed from both users' device identity keys, the
    /// same on both sides (see [`crate::crypto::safety`]). Both users
    /// compare it out of band to make sure nobody sits in the middle.
    ///
    /// It refreshes this account's device list and, when some of the peer's
    /// devices are unknown, fetches their keys first.
    ///
    /// # Errors
    ///
    /// [`Error::Server`] (e.g. `UNKNOWN_USER`); [`Error::Crypto`] with
    /// [`crate::CryptoError::UnknownIdentity`] when the peer has no device
    /// with published keys; [`Error::Busy`]; [`Error::Closed`].
    pub async fn safety_number(&self, peer_user: UserId) -> Result<String, Error> {
        check_user(peer_user)?;
        self.list_devices().await?;
        if peer_user != self.user_id() {
            self.call(|reply| Command::FetchKeys {
                user_id: peer_user.get(),
                reply,
            })
            .await?;
        }
        self.call(|reply| Command::SafetyNumber {
            user_id: peer_user.get(),
            reply,
        })
        .await
    }

    /// Waits until this device's keys are in the server's key directory
    /// (uploaded by this client, or found there at authentication), so
    /// others can start sessions with it.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the client stops first (e.g. the server refused
    /// the keys: [`crate::CryptoError::KeysRejected`]).
    pub async fn keys_published(&self) -> Result<(), Error> {
        self.call(|reply| Command::KeysPublished { reply }).await
    }

    /// Stops the client gracefully: queued acks are flushed, the link is
    /// closed, pending callers get [`Error::Closed`] (persisted sends stay on
    /// disk for the next start), and [`Event::Closed`] is emitted. Returns
    /// when the task has finished. Closing a closed client is a no-op.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for a flush that can fail.
    pub async fn close(&self) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).await.is_err() {
            return Ok(());
        }
        let _ = rx.await;
        Ok(())
    }
}
