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
mod mail;
mod order;
mod shard;

pub use conn_queue::{ConnRx, ConnTx, Received, TrySendError, conn_queue};
pub use error::RouteError;
pub use order::HeldBy;
use shard::Queued;
pub use shard::{KickReason, Notice, OwedReceipt, ToConn};

use std::sync::Arc;
use std::thread::JoinHandle;

use switchboard_proto::pb;
use tokio::sync::{mpsc, oneshot};

use crate::store::{DeviceId, DeviceKey, Store, UserId};
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
}

/// Answer to a send: the ✓.
#[derive(Debug, Clone, Copy)]
pub struct SendAccepted {
    /// Server timestamp of the message.
    pub server_ts_ms: u64,
    /// The send was a retry of an accepted one.
    pub duplicate: bool,
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
#[derive(Clone)]
pub struct Router {
    shards: Arc<[mpsc::Sender<Queued>]>,
    deadline: std::time::Duration,
}

/// The shard threads, to be joined at shutdown.
pub struct ShardThreads(Vec<JoinHandle<()>>);

/// Stable 64-bit mix of a user id (splitmix64 finalizer), so shard choice
/// does not depend on how ids were allocated.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Stable hash of a phone number (FNV-1a), for the same reason.
fn hash_str(s: &str) -> u64 {
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
                shards: senders,
                deadline: cfg.request_deadline,
            },
            ShardThreads(threads),
        ))
    }

    fn user_shard(&self, user: UserId) -> &mpsc::Sender<Queued> {
        &self.shards[shard_of_user(user, self.shards.len())]
    }

    fn phone_shard(&self, phone: &str) -> &mpsc::Sender<Queued> {
        &self.shards[shard_of_phone(phone, self.shards.len())]
    }

    /// Queues a request with this router's deadline: waits at most that
    /// long for room in the inbox (then OVERLOADED), and the shard discards
    /// it if it is still waiting when the deadline passes.
    async fn enqueue(&self, shard: &mpsc::Sender<Queued>, cmd: Command) -> Result<(), RouteError> {
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
        shard: &mpsc::Sender<Queued>,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, RouteError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(shard, make(tx)).await?;
        // A dropped reply means the shard restarted mid-command (a caught
        // panic) or is shutting down.
        rx.await.map_err(|_| RouteError::Internal)?
    }

    /// Issues a verification code for `phone` (not yet delivered).
    ///
    /// # Errors
    /// [`RouteError::InvalidPhone`], [`RouteError::RateLimited`], storage.
    pub async fn request_code(&self, phone: String) -> Result<CodeIssued, RouteError> {
        if !crate::accounts::is_e164(&phone) {
            return Err(RouteError::InvalidPhone);
        }
        self.call(self.phone_shard(&phone), |reply| Command::RequestCode {
            phone,
            reply,
        })
        .await
    }

    /// Checks a code and, if right, registers a new primary device.
    ///
    /// # Errors
    /// The code errors, storage.
    pub async fn verify_code(
        &self,
        phone: String,
        code: String,
        pin: String,
    ) -> Result<Registered, RouteError> {
        if !crate::accounts::is_e164(&phone) {
            return Err(RouteError::InvalidPhone);
        }
        let checked = self
            .call(self.phone_shard(&phone), |reply| Command::CheckCode {
                phone: phone.clone(),
                code: code.clone(),
                pin_presented: !pin.is_empty(),
                reply,
            })
            .await?;
        if let Some(user) = checked.user {
            let stored = self
                .call(self.user_shard(user), |reply| Command::UserPin {
                    user,
                    reply,
                })
                .await?;
            if !stored.is_empty() {
                if pin.is_empty() {
                    return Err(RouteError::PinRequired);
                }
                // Argon2 is slow on purpose: off the shard and the runtime.
                let right =
                    tokio::task::spawn_blocking(move || crate::accounts::verify_pin(&pin, &stored))
                        .await
                        .map_err(|_| RouteError::Internal)?
                        .map_err(|e| {
                            tracing::error!(error = %e, user, "stored PIN hash unreadable");
                            RouteError::Internal
                        })?;
                if !right {
                    return Err(match checked.locked_until_ms {
                        Some(until) => RouteError::PinLocked {
                            retry_after_ms: until.saturating_sub(crate::clock::now_ms()),
                        },
                        None => RouteError::PinInvalid,
                    });
                }
            }
        }
        let user = self
            .call(self.phone_shard(&phone), |reply| Command::VerifyCode {
                phone: phone.clone(),
                code,
                reply,
            })
            .await?;
        self.call(self.user_shard(user), |reply| Command::RegisterDevice {
            user,
            phone,
            reply,
        })
        .await
    }

    /// Sets the account's PIN hash (empty: clears it); primary device only.
    /// Returns whether a PIN is now set.
    ///
    /// # Errors
    /// [`RouteError::NotPrimary`], storage.
    pub async fn set_pin(&self, device: DeviceKey, pin_hash: String) -> Result<bool, RouteError> {
        self.call(self.user_shard(device.user), |reply| Command::SetPin {
            device,
            pin_hash,
            reply,
        })
        .await
    }

    /// Authenticates a connection as `device` and starts draining its queue
    /// into `link`. Returns the user's phone.
    ///
    /// # Errors
    /// [`RouteError::Unauthenticated`], storage.
    pub async fn authenticate(
        &self,
        device: DeviceKey,
        credential: Vec<u8>,
        link: ConnLink,
    ) -> Result<AuthInfo, RouteError> {
        self.call(self.user_shard(device.user), |reply| {
            Command::Authenticate {
                device,
                credential,
                link,
                reply,
            }
        })
        .await
    }

    /// Looks a user up by phone number.
    ///
    /// # Errors
    /// [`RouteError::UnknownUser`], storage.
    pub async fn lookup_phone(&self, phone: String) -> Result<UserSummary, RouteError> {
        if !crate::accounts::is_e164(&phone) {
            return Err(RouteError::InvalidPhone);
        }
        let user = self
            .call(self.phone_shard(&phone), |reply| Command::LookupPhone {
                phone,
                reply,
            })
            .await?;
        self.call(self.user_shard(user), |reply| Command::LookupUser {
            user,
            reply,
        })
        .await
    }

    /// Hands a send to the recipient's shard and the sender's copies for its
    /// other devices (`copies`, whose `to_user` names the conversation
    /// peer) to the sender's shard. Returns once both are in their inboxes
    /// (so sends from one connection keep their order). When one shard owns
    /// both users (always, with one shard), the ✓ comes once both parts are
    /// durable as a [`ToConn::SendAnswer`] for frame `to.frame` through the
    /// connection's push queue, and this returns `None`; otherwise the
    /// returned [`SendTicket`] yields it.
    ///
    /// When both users live on the same shard the two parts travel as one
    /// command and are stored in one batch.
    ///
    /// # Errors
    /// [`RouteError::Overloaded`] or [`RouteError::ShuttingDown`]. If the
    /// copies could not be queued, the recipient's part may still be
    /// stored; a retry of the send is answered as a duplicate.
    pub async fn submit_send(
        &self,
        req: SendRequest,
        copies: Option<SendRequest>,
        to: AnswerTo,
    ) -> Result<Option<SendTicket>, RouteError> {
        let n = self.shards.len();
        let shard = self.user_shard(req.to_user);
        if shard_of_user(req.from.user, n) == shard_of_user(req.to_user, n) {
            self.enqueue(
                shard,
                Command::Send {
                    req,
                    copies,
                    reply: SendReply::Queued {
                        to,
                        submitted: std::time::Instant::now(),
                    },
                },
            )
            .await?;
            return Ok(None);
        }
        let (tx, peer) = oneshot::channel();
        match copies {
            Some(copies) => {
                self.enqueue(
                    shard,
                    Command::Send {
                        req,
                        copies: None,
                        reply: SendReply::Ticket(tx),
                    },
                )
                .await?;
                let (own_tx, own) = oneshot::channel();
                let own_shard = self.user_shard(copies.from.user);
                self.enqueue(
                    own_shard,
                    Command::SendSelf {
                        req: copies,
                        reply: own_tx,
                    },
                )
                .await?;
                Ok(Some(SendTicket {
                    peer,
                    own: Some(own),
                }))
            }
            None => {
                self.enqueue(
                    shard,
                    Command::Send {
                        req,
                        copies: None,
                        reply: SendReply::Ticket(tx),
                    },
                )
                .await?;
                Ok(Some(SendTicket { peer, own: None }))
            }
        }
    }

    /// Publishes a device's keys (already signature-checked). Returns the
    /// one-time keys in stock.
    ///
    /// # Errors
    /// [`RouteError::InvalidKeys`] for a changed identity or a full stock.
    pub async fn upload_keys(
        &self,
        device: DeviceKey,
        upload: pb::UploadKeys,
    ) -> Result<u32, RouteError> {
        self.call(self.user_shard(device.user), |reply| Command::UploadKeys {
            device,
            upload,
            reply,
        })
        .await
    }

    /// Key bundles of every current device of `user` (but the requester),
    /// each consuming one one-time key; with `identities_only`, only the
    /// devices' identity keys (nothing used up).
    ///
    /// # Errors
    /// [`RouteError::UnknownUser`], storage.
    pub async fn fetch_bundles(
        &self,
        requester: DeviceKey,
        user: UserId,
        identities_only: bool,
    ) -> Result<Vec<pb::DeviceBundle>, RouteError> {
        self.call(self.user_shard(user), |reply| Command::FetchBundles {
            requester,
            user,
            identities_only,
            reply,
        })
        .await
    }

    /// A link code for the primary `device`'s account: (code, expiry).
    ///
    /// # Errors
    /// [`RouteError::NotPrimary`], [`RouteError::TooManyDevices`], rate limit.
    pub async fn create_link_code(&self, device: DeviceKey) -> Result<(String, u64), RouteError> {
        let (code, expires_ms) = self
            .call(self.user_shard(device.user), |reply| {
                Command::CreateLinkCode { device, reply }
            })
            .await?;
        let canonical =
            crate::accounts::normalize_link_code(&code).ok_or(RouteError::LinkCodeInvalid)?;
        self.call(self.phone_shard(&canonical), |reply| {
            Command::StoreLinkCode {
                code: canonical.clone(),
                record: crate::store::LinkCodeRecord {
                    user_id: device.user,
                    expires_ms,
                },
                reply,
            }
        })
        .await?;
        Ok((code, expires_ms))
    }

    /// Joins the account behind `code` as a new linked device.
    ///
    /// # Errors
    /// [`RouteError::LinkCodeInvalid`], [`RouteError::TooManyDevices`].
    pub async fn link_device(&self, code: &str) -> Result<Registered, RouteError> {
        let code = crate::accounts::normalize_link_code(code).ok_or(RouteError::LinkCodeInvalid)?;
        let user = self
            .call(self.phone_shard(&code), |reply| Command::TakeLinkCode {
                code: code.clone(),
                reply,
            })
            .await?;
        self.call(self.user_shard(user), |reply| Command::AddLinkedDevice {
            user,
            code,
            reply,
        })
        .await
    }

    /// The user's devices with their identity keys.
    ///
    /// # Errors
    /// [`RouteError::UnknownUser`], storage.
    pub async fn list_devices(&self, user: UserId) -> Result<Vec<pb::DeviceInfo>, RouteError> {
        self.call(self.user_shard(user), |reply| Command::ListDevices {
            user,
            reply,
        })
        .await
    }

    /// The primary device `by` revokes another device of its user.
    ///
    /// # Errors
    /// [`RouteError::NotPrimary`], [`RouteError::BadRequest`] for an unknown
    /// device or the primary itself.
    pub async fn revoke_device(&self, by: DeviceKey, target: DeviceId) -> Result<(), RouteError> {
        self.call(self.user_shard(by.user), |reply| Command::RevokeDevice {
            by,
            target,
            reply,
        })
        .await
    }

    /// Durably queues a receipt for every device of `to_user`. With
    /// `must_exist`, an unknown user is an error; otherwise the receipt is
    /// dropped (the sender's account is gone).
    ///
    /// # Errors
    /// [`RouteError::UnknownUser`], storage, shutdown.
    pub async fn enqueue_receipt(
        &self,
        to_user: UserId,
        receipt: pb::Receipt,
        must_exist: bool,
    ) -> Result<(), RouteError> {
        self.call(self.user_shard(to_user), |reply| Command::EnqueueReceipt {
            to_user,
            receipt,
            must_exist,
            reply,
        })
        .await
    }

    /// A device's ack of `seqs` on connection `conn_id`: the receipt
    /// entries among them (`receipt_seqs`) are removed, and each sender in
    /// `owed` gets a delivery receipt, after which the message entries it
    /// covers are removed. For senders on the device's shard (all of them,
    /// with one shard) this is one command and one atomic batch. The
    /// receipts for senders on other shards come back, for the caller to
    /// queue ([`Router::enqueue_receipt`]) and only then [`Router::delete`]
    /// their messages.
    pub async fn ack(
        &self,
        device: DeviceKey,
        conn_id: u64,
        seqs: Vec<u64>,
        receipt_seqs: Vec<u64>,
        owed: Vec<OwedReceipt>,
    ) -> Vec<OwedReceipt> {
        let n = self.shards.len();
        let mine = shard_of_user(device.user, n);
        let (local, remote): (Vec<_>, Vec<_>) = owed
            .into_iter()
            .partition(|o| shard_of_user(o.to_user, n) == mine);
        let _ = self.shards[mine]
            .send(Queued::new(Command::Ack {
                device,
                conn_id,
                seqs,
                delete: receipt_seqs,
                receipts: local,
            }))
            .await;
        remote
    }

    /// Removes entries from a device's queue.
    pub async fn delete(&self, device: DeviceKey, seqs: Vec<u64>) {
        let _ = self
            .user_shard(device.user)
            .send(Queued::new(Command::Delete { device, seqs }))
            .await;
    }

    /// Connection `conn_id` of `device` has ended.
    pub async fn disconnected(&self, device: DeviceKey, conn_id: u64) {
        let _ = self
            .user_shard(device.user)
            .send(Queued::new(Command::Disconnected { device, conn_id }))
            .await;
    }

    /// Asks every shard to run its expiry sweep (skipped by busy shards).
    pub fn sweep(&self) {
        for shard in self.shards.iter() {
            // Overflow policy: a full inbox means the shard is busy; the
            // sweep simply waits for the next tick.
            let _ = shard.try_send(Queued::new(Command::Sweep));
        }
    }

    /// Asks every shard for its periodic upkeep (mail not yet delivered is
    /// posted again; skipped by busy shards).
    pub fn tick(&self) {
        for shard in self.shards.iter() {
            let _ = shard.try_send(Queued::new(Command::Tick));
        }
    }

    /// Stops every shard after it has applied what is already in its inbox,
    /// and waits for the threads.
    /// Ends every authenticated connection (each says goodbye once it has
    /// written what was queued for it): the start of a shutdown.
    pub async fn closing(&self) {
        for shard in self.shards.iter() {
            let _ = shard.send(Queued::new(Command::Closing)).await;
        }
    }

    /// Stops the shards once each has applied what is in its inbox.
    pub async fn shutdown(&self, threads: ShardThreads) {
        for shard in self.shards.iter() {
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
