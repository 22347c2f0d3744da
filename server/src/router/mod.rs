//! The router: N shards, each owning the users and phone numbers that hash
//! to it, and a cloneable [`Router`] handle that finds the right shard.
//!
//! A shard is an OS thread (it does blocking storage I/O) with a bounded
//! inbox. It takes every command waiting in its inbox, applies them in order
//! to its in-memory state and one storage batch, commits that batch with one
//! sync (group commit), and only then answers and pushes. All state of one
//! user (devices, queue counters, online connections, dedup) is touched by
//! one shard only, so nothing needs a lock.

mod conn_queue;
mod error;
mod forward;
mod mail;
mod order;
mod remote;
mod shard;

pub use conn_queue::{ConnRx, ConnTx, Received, TrySendError, conn_queue};
pub use error::RouteError;
pub use forward::{Forwarder, LinkError, serve_links};
pub use order::HeldBy;
use shard::Queued;
pub use shard::{KickReason, Notice, OwedReceipt, ToConn};

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use switchboard_proto::pb;
use tokio::sync::{mpsc, oneshot};

use crate::store::{DeviceId, DeviceKey, GroupId, Store, UserId};
use shard::{Command, Shard};

/// Router tuning, from the server configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Number of shards.
    pub shards: usize,
    /// Commands each shard's inbox holds before senders wait.
    pub inbox_capacity: usize,
    /// Most commands one shard applies per storage batch.
    pub max_batch_commands: usize,
    /// Least time between the starts of two synced commits of a shard
    /// (group commit pacing; zero disables it).
    pub group_commit_interval: std::time::Duration,
    /// Entries per drain batch pushed to a reconnecting device.
    pub drain_batch: usize,
    /// How long queued entries live, in milliseconds.
    pub queue_ttl_ms: u64,
    /// How long accepted sends are remembered for deduplication, in ms.
    pub dedup_window_ms: u64,
    /// Most user records a shard keeps cached (online users stay regardless).
    pub max_cached_users: usize,
    /// How long a request may wait for its shard before it is answered
    /// OVERLOADED instead of being done late.
    pub request_deadline: std::time::Duration,
    /// Verification codes per phone number.
    pub code_requests_per_phone: crate::limits::Rate,
    /// Wrong codes per phone number per day, across code re-requests.
    pub wrong_codes_per_phone_per_day: u32,
    /// One-time keys of one device handed out; past it, the fallback key.
    pub one_time_keys_per_device: crate::limits::Rate,
    /// Entries a device's durable queue may hold.
    pub queue_max_entries: u64,
    /// Bytes a device's durable queue may hold.
    pub queue_max_bytes: u64,
}

/// A verification code issued to a phone number.
#[derive(Debug, Clone)]
pub struct CodeIssued {
    /// The code to deliver.
    pub code: String,
    /// When it expires (ms since epoch).
    pub expires_at_ms: u64,
}

/// A device registered by phone verification.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The account.
    pub user: UserId,
    /// The new device.
    pub device: DeviceId,
    /// Its bearer credential (only a hash is stored).
    pub credential: Vec<u8>,
}

/// Step 1 of registration: the code is right.
#[derive(Debug, Clone)]
pub struct CodeChecked {
    /// The number's account, if it has one.
    pub user: Option<UserId>,
    /// Set when the PIN presented was the last allowed before a lockout:
    /// if it is wrong, the number is locked until then.
    pub locked_until_ms: Option<u64>,
}

/// A connection's way to receive pushes, handed to the owning shard at
/// authentication.
#[derive(Debug)]
pub struct ConnLink {
    /// Unique id of this connection.
    pub conn_id: u64,
    /// Pushes for the connection, and its end. Bounded: the shard uses
    /// `try_send`, and a connection whose queue is full is kicked as a slow
    /// reader (its entries stay in its durable queue).
    pub push: ConnTx,
}

/// A send as submitted by the sender's connection (already validated for
/// sizes).
#[derive(Debug)]
pub struct SendRequest {
    /// The sending device.
    pub from: DeviceKey,
    /// The sender's phone, shown to the recipient.
    pub from_phone: String,
    /// The client's message id.
    pub client_msg_id: String,
    /// The recipient.
    pub to_user: UserId,
    /// One payload per recipient device.
    pub payloads: Vec<pb::DevicePayload>,
    /// The client says this id was never sent before: no dedup lookup.
    pub first_attempt: bool,
    /// A part of `SendGroupKeys` for this group (0: an ordinary send):
    /// stored as a `Message` with `group_id` set, which owes no receipt.
    pub group_id: u64,
}

/// Answer to a send: the ✓.
#[derive(Debug, Clone, Copy)]
pub struct SendAccepted {
    /// Server timestamp of the message.
    pub server_ts_ms: u64,
    /// The send was a retry of an accepted one.
    pub duplicate: bool,
}

/// Answer to a group send: the ✓ and the message's place in the group's
/// order.
#[derive(Debug, Clone, Copy)]
pub struct GroupSent {
    /// Server timestamp of the message.
    pub server_ts_ms: u64,
    /// The send was a retry of an accepted one.
    pub duplicate: bool,
    /// Its `group_seq`.
    pub group_seq: u64,
}

/// A message to a group, as the router takes it.
#[derive(Debug, Clone)]
pub struct GroupSendRequest {
    /// The sending device.
    pub from: DeviceKey,
    /// The sender's phone, shown to the members.
    pub from_phone: String,
    /// The group.
    pub group_id: GroupId,
    /// The client's message id.
    pub client_msg_id: String,
    /// The payload, sealed once for every member device.
    pub payload: bytes::Bytes,
    /// The client says this id was never sent before: no dedup lookup.
    pub first_attempt: bool,
}

/// What a connection learns when it authenticates.
#[derive(Debug, Clone)]
pub struct AuthInfo {
    /// The user's phone number.
    pub phone: String,
    /// Whether this is the primary device.
    pub primary: bool,
    /// Whether the device has published identity keys.
    pub has_keys: bool,
    /// One-time keys in stock.
    pub one_time_keys: u32,
    /// The user's current devices.
    pub devices: Vec<DeviceId>,
}

/// Public facts about a user.
#[derive(Debug, Clone)]
pub struct UserSummary {
    /// The user.
    pub user: UserId,
    /// Phone number.
    pub phone: String,
    /// Current devices, ascending.
    pub devices: Vec<DeviceId>,
}

type Reply<T> = oneshot::Sender<Result<T, RouteError>>;

/// Where a send is answered from: the connection that submitted it and the
/// id of its `Send` frame.
#[derive(Debug, Clone, Copy)]
pub struct AnswerTo {
    /// The submitting connection.
    pub conn_id: u64,
    /// The id of the `Send` frame, echoed by the answer.
    pub frame: u32,
}

/// How the ✓ of a send reaches its connection.
#[derive(Debug)]
pub(super) enum SendReply {
    /// Through a oneshot in a [`SendTicket`] (the sender's copies went to
    /// another shard, and the ✓ joins two answers).
    Ticket(Reply<SendAccepted>),
    /// Through the sender's push queue as [`ToConn::SendAnswer`]: the
    /// answering shard owns the sender, so its connection is registered
    /// there. No oneshot and no future per send.
    Queued {
        to: AnswerTo,
        /// When the send was submitted (for the ✓ latency histogram).
        submitted: std::time::Instant,
    },
}

/// The pending ✓ of a submitted send: the recipient's part and, when the
/// sender's copies went to another shard, theirs.
#[derive(Debug)]
pub struct SendTicket {
    peer: oneshot::Receiver<Result<SendAccepted, RouteError>>,
    own: Option<oneshot::Receiver<Result<SendAccepted, RouteError>>>,
}

impl SendTicket {
    /// Waits for the ✓.
    ///
    /// # Errors
    /// The first part's error; [`RouteError::Internal`] if a shard dropped
    /// the request (it restarted after an internal error).
    pub async fn accepted(self) -> Result<SendAccepted, RouteError> {
        let peer = self.peer.await.unwrap_or(Err(RouteError::Internal));
        let own = match self.own {
            Some(own) => Some(own.await.unwrap_or(Err(RouteError::Internal))),
            None => None,
        };
        joint_answer(peer, own)
    }
}

/// The answer to a send from the answers to its two parts: the recipient's
/// copy is the message of record (its timestamp and duplicate flag are the
/// answer), but either part's failure fails the send.
pub(super) fn joint_answer(
    peer: Result<SendAccepted, RouteError>,
    own: Option<Result<SendAccepted, RouteError>>,
) -> Result<SendAccepted, RouteError> {
    match (peer, own) {
        (Ok(a), None | Some(Ok(_))) => Ok(a),
        (Err(e), _) | (Ok(_), Some(Err(e))) => Err(e),
    }
}

/// Handle to the shards. Cloning is cheap.
///
/// A router either owns its shards (the embedded server, a serving cluster
/// node) or forwards every command to the node that does
/// ([`Router::forwarding`]: a cluster node that does not serve the
/// partitions).
#[derive(Clone)]
pub struct Router {
    /// The shards of this node: set at the start, or (a forwarding router)
    /// once the node takes the partitions over ([`Router::serve_locally`]);
    /// every clone sees them at once.
    shards: Arc<OnceLock<Arc<[mpsc::Sender<Queued>]>>>,
    deadline: std::time::Duration,
    forward: Option<Arc<Forwarder>>,
}

/// No shards (a forwarding router before it serves).
const NO_SHARDS: &[mpsc::Sender<Queued>] = &[];

/// Where a command goes: a shard of this node, or over the link to the
/// serving node.
#[derive(Clone, Copy)]
enum Dest<'a> {
    Shard(&'a mpsc::Sender<Queued>),
    Remote(&'a Forwarder),
}

/// The shard threads, to be joined at shutdown.
pub struct ShardThreads(Vec<JoinHandle<()>>);

/// Stable 64-bit mix of a user id (splitmix64 finalizer), so shard choice
/// does not depend on how ids were allocated.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Stable hash of a phone number (FNV-1a), for the same reason.
pub(crate) fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Which of `n` shards owns `user`.
#[must_use]
pub fn shard_of_user(user: UserId, n: usize) -> usize {
    (mix64(user) % n.max(1) as u64) as usize
}

/// Which of `n` shards owns a string key (a phone number or a link code).
#[must_use]
pub fn shard_of_phone(phone: &str, n: usize) -> usize {
    (mix64(hash_str(phone)) % n.max(1) as u64) as usize
}

impl Router {
    /// Starts the shard threads.
    ///
    /// # Errors
    /// An I/O error if a thread cannot be spawned.
    pub fn start(
        store: Arc<dyn Store>,
        cfg: RouterConfig,
    ) -> std::io::Result<(Self, ShardThreads)> {
        let n = cfg.shards.max(1);
        // The shards' inboxes. Held by every connection (through Router);
        // when full, senders wait, which stops their socket reads:
        // backpressure reaches the clients instead of memory growing.
        // Shards hold weak handles too, for mail, and never wait on them.
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| mpsc::channel::<Queued>(cfg.inbox_capacity.max(1)))
            .unzip();
        let senders: Arc<[mpsc::Sender<Queued>]> = senders.into();
        let peers: Arc<[mpsc::WeakSender<Queued>]> =
            senders.iter().map(mpsc::Sender::downgrade).collect();
        let mut threads = Vec::with_capacity(n);
        for (id, rx) in receivers.into_iter().enumerate() {
            let shard = Shard::new(id, peers.clone(), store.clone(), cfg.clone());
            let handle = std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || shard.run(rx))?;
            threads.push(handle);
        }
        Ok((
            Self {
                shards: Arc::new(OnceLock::from(senders)),
                deadline: cfg.request_deadline,
                forward: None,
            },
            ShardThreads(threads),
        ))
    }

    /// A router with no shards of its own: every command goes over
    /// `forwarder`'s link to the serving node, until
    /// [`Router::serve_locally`].
    #[must_use]
    pub fn forwarding(forwarder: Arc<Forwarder>, request_deadline: std::time::Duration) -> Self {
        Self {
            shards: Arc::new(OnceLock::new()),
            deadline: request_deadline,
            forward: Some(forwarder),
        }
    }

    /// From now on this forwarding router sends every command to
    /// `local`'s shards (this node took the partitions over), and the
    /// connections it forwarded are attached to them, without ending.
    /// Does nothing on a router that already has shards.
    pub fn serve_locally(&self, local: &Router) {
        let Some(forwarder) = &self.forward else {
            return;
        };
        let Some(shards) = local.shards.get() else {
            return;
        };
        if self.shards.set(shards.clone()).is_ok() {
            forwarder.hand_over(local.clone());
        }
    }

    /// This node's shards (none while it forwards).
    fn local(&self) -> &[mpsc::Sender<Queued>] {
        self.shards.get().map_or(NO_SHARDS, |s| s)
    }

    /// The forwarder, while this router forwards.
    fn forwarder(&self) -> Option<&Forwarder> {
        match self.shards.get() {
            Some(_) => None,
            None => self.forward.as_deref(),
        }
    }

    /// Whether this router forwards to another node.
    #[must_use]
    pub fn is_forwarding(&self) -> bool {
        self.forwarder().is_some()
    }

    fn user_shard(&self, user: UserId) -> Dest<'_> {
        match self.forwarder() {
            Some(f) => Dest::Remote(f),
            None => {
                let shards = self.local();
                Dest::Shard(&shards[shard_of_user(user, shards.len())])
            }
        }
    }

    fn phone_shard(&self, phone: &str) -> Dest<'_> {
        match self.forwarder() {
            Some(f) => Dest::Remote(f),
            None => {
                let shards = self.local();
                Dest::Shard(&shards[shard_of_phone(phone, shards.len())])
            }
        }
    }

    /// The shard of a key, for a command forwarded by another node.
    fn key_shard(&self, key: &remote::RouteKey) -> Option<&mpsc::Sender<Queued>> {
        let shards = self.local();
        let n = shards.len();
        if n == 0 {
            return None;
        }
        match key {
            remote::RouteKey::Id(id) => shards.get(shard_of_user(*id, n)),
            remote::RouteKey::Str(s) => shards.get(shard_of_phone(s, n)),
        }
    }

    /// Queues a command that must be applied however late (acks,
    /// deletions, disconnects): waits for room in the inbox.
    async fn post(&self, dest: Dest<'_>, cmd: Command) {
        match dest {
            Dest::Shard(shard) => {
                let _ = shard.send(Queued::new(cmd)).await;
            }
            Dest::Remote(f) => {
                // Boxed: every connection task's future is as large as its
                // largest state, and forwarding's (the command, its encoding)
                // would otherwise be part of every connection, forwarded or
                // not, for its whole life.
                if let Err(e) = Box::pin(f.forward(cmd, self.deadline)).await {
                    tracing::debug!(error = %e, "a forwarded ack or disconnect was not sent");
                }
            }
        }
    }

    /// Queues a request with this router's deadline: waits at most that
    /// long for room in the inbox (then OVERLOADED), and the shard discards
    /// it if it is still waiting when the deadline passes.
    async fn enqueue(&self, dest: Dest<'_>, cmd: Command) -> Result<(), RouteError> {
        let shard = match dest {
            Dest::Shard(shard) => shard,
            // Boxed, as in `post`.
            Dest::Remote(f) => return Box::pin(f.forward(cmd, self.deadline)).await,
        };
        let deadline = std::time::Instant::now() + self.deadline;
        // Usually there is room: take it without arming a timer.
        let queued = match shard.try_send(Queued::with_deadline(cmd, deadline)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(RouteError::ShuttingDown),
            Err(mpsc::error::TrySendError::Full(queued)) => queued,
        };
        match shard.send_timeout(queued, self.deadline).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                metrics::counter!(crate::telemetry::DISCARDED_REQUESTS).increment(1);
                Err(RouteError::Overloaded {
                    retry_after_ms: shard::OVERLOADED_RETRY_AFTER_MS,
                })
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(RouteError::ShuttingDown),
        }
    }

    async fn call<T>(
        &self,
        dest: Dest<'_>,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, RouteError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(dest, make(tx)).await?;
        // A dropped reply means the shard restarted mid-command (a caught
        // panic) or is shutting down.
        rx.await.map_err(|_| RouteError::Internal)?
    }

    /// Stops every shard after it has applied what is already in its inbox,
    /// and waits for the threads.
    /// Ends every authenticated connection (each says goodbye once it has
    /// written what was queued for it): the start of a shutdown.
    pub async fn closing(&self) {
        if let Some(f) = &self.forward {
            f.close_connections(KickReason::ShuttingDown);
        }
        for shard in self.local() {
            let _ = shard.send(Queued::new(Command::Closing)).await;
        }
    }

    /// Stops the shards once each has applied what is in its inbox.
    pub async fn shutdown(&self, threads: ShardThreads) {
        for shard in self.local() {
            let _ = shard.send(Queued::new(Command::Shutdown)).await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads.0 {
                if t.join().is_err() {
                    tracing::error!("a shard thread panicked during shutdown");
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_is_stable_and_spread() {
        assert_eq!(shard_of_user(42, 8), shard_of_user(42, 8));
        assert_eq!(
            shard_of_phone("+15550001", 8),
            shard_of_phone("+15550001", 8)
        );
        let mut counts = [0usize; 4];
        for u in 0..4000u64 {
            counts[shard_of_user(u, 4)] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(shard_of_user(7, 1), 0);
    }
}
