//! One shard: the single owner of the users and phone numbers that hash to
//! it. Runs on its own thread; see the module docs of `router` for the
//! batching discipline.
//!
//! Invariants:
//! - Nothing is answered or pushed before the batch that produced it is
//!   committed (`effects` and `live` run after `commit`).
//! - A device's queue is read by seq cursor, so entries acked but not yet
//!   deleted are never re-read on the same connection.
//! - On a failed commit the caches are dropped and reloaded from the store,
//!   so memory never runs ahead of what is durable.
//!
//! This file keeps the machinery every kind shares: the `Command` enum and
//! its dispatch (`apply`, `reject`), the loop, batching and group commit,
//! the caches and the staging helpers. What each kind does is in a
//! submodule, as an `impl Shard` block of its own:
//!
//! - `accounts`: verification codes, two-step PINs, registration, lookups
//! - `keys`: key uploads and bundles
//! - `devices`: link codes, linking, listing and revoking devices
//! - `messaging`: sends and receipts into device queues
//! - `delivery`: authentication, acks, the drain and pushes to connections
//! - `mail`: mail between shards and `Undelivered` notices
//! - `sweep`: expiry of queue entries, dedup days and link codes
//!
//! A new command: its variant in `Command` (with its arm in `reject` and in
//! `apply`) and its logic in the submodule of its concern.

mod accounts;
mod delivery;
mod devices;
mod groups;
mod keys;
mod mail;
mod messaging;
mod sweep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use switchboard_proto::pb;
use tokio::sync::mpsc;

use super::mail::{MailId, Mailroom};
use super::order::{HeldBy, Holds, Part};
use super::{
    AnswerTo, AuthInfo, CodeChecked, CodeIssued, ConnLink, GroupSendRequest, GroupSent, Registered,
    Reply, RouteError, RouterConfig, SendAccepted, SendReply, SendRequest, UserSummary,
    shard_of_user,
};
use crate::clock::now_ms;
use crate::limits::{self, Limit};
use crate::store::{
    AccountOp, CodeRecord, DedupKey, DeviceId, DeviceKey, DeviceKeysRecord, GroupId,
    LinkCodeRecord, MailRecord, Op, QueueOp, Store, StoreError, StoredEntry, UserId, UserRecord,
};
use crate::telemetry as tm;
use crate::{FastMap, FastSet};

/// Seqs a shard reserves for a device queue with one durable counter write.
/// Seqs only need to increase, not to be dense: after a restart the unused
/// rest of a block is skipped. 1,024 makes the counter write rare (it was
/// one of the five writes per message) while a device that restarts a
/// million times still uses under 2^31 of its 2^64 seqs.
const SEQ_BLOCK: u64 = 1024;

/// A device queue's seq counter: the last seq handed out and the highest
/// one reserved in the store (committed or staged in this batch).
#[derive(Debug, Clone, Copy)]
struct SeqCounter {
    last: u64,
    reserved: u64,
}

/// How much of a device's quota its durable queue uses. Entries are
/// counted exactly; bytes too, except that a removal whose size is not at
/// hand (an ack, an expiry) takes off the average entry and marks the
/// figure inexact. A send that would pass the quota on an inexact figure
/// recounts from the store before it is refused.
#[derive(Debug, Clone, Copy)]
struct QueueUsage {
    entries: u64,
    bytes: u64,
    exact: bool,
}

/// When to retry a send refused with QUEUE_FULL: the device has to come
/// online and drain first, which takes a person's time, not a machine's.
const QUEUE_FULL_RETRY_AFTER_MS: u64 = 60_000;

/// Bytes a queue entry takes besides its payload (sender, ids, framing),
/// counted when a send is checked against the quota before it is encoded.
const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// The retry hint of a failed commit (as the gateway gives for
/// STORAGE_UNAVAILABLE).
const STORAGE_RETRY_AFTER_MS: u64 = 1000;

/// What a shard pushes to a connection.
#[derive(Debug)]
pub enum ToConn {
    /// Queue entries, in queue order. A boxed slice (and one variant for
    /// the small notices) keeps `ToConn` small: its size is that of every
    /// queued push's node in its connection's channel.
    Deliver(Box<[pb::QueueEntry]>),
    /// A notice with no queue entry.
    Notice(Notice),
    /// The answer to the connection's `Send` frame `frame`: the ✓ once the
    /// send is durable, or why it was refused.
    SendAnswer {
        frame: u32,
        result: Result<SendAccepted, Box<RouteError>>,
    },
}

/// Pushes that are not queue entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The queue has been drained; live delivery follows.
    UpToDate,
    /// The device's one-time key stock is low.
    KeysLow(u32),
}

// Kept small on purpose (see `ToConn::Deliver`).
const _: () = assert!(std::mem::size_of::<ToConn>() <= 24);

/// Why a shard ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KickReason {
    /// The same device authenticated on a newer connection.
    Replaced = 1,
    /// The connection's push queue overflowed.
    SlowReader,
    /// The device was revoked.
    Revoked,
    /// The queue could not be read; reconnecting retries.
    Unavailable,
    /// The server is shutting down.
    ShuttingDown,
}

/// A command with the time it entered the inbox (to measure the backlog)
/// and, for requests, the time after which it is not worth doing.
pub(super) struct Queued {
    at: Instant,
    deadline: Option<Instant>,
    /// Boxed: a command is a few hundred bytes, and a queued one is moved
    /// several times on its way through the inbox (into the channel's
    /// block, out of it, into the batch); a pointer moves cheaply.
    cmd: Box<Command>,
}

impl Queued {
    /// A command that must be applied however late (acks, disconnects).
    pub(super) fn new(cmd: Command) -> Self {
        Self {
            at: Instant::now(),
            deadline: None,
            cmd: Box::new(cmd),
        }
    }

    /// A request that is discarded unprocessed after `deadline`.
    pub(super) fn with_deadline(cmd: Command, deadline: Instant) -> Self {
        Self {
            at: Instant::now(),
            deadline: Some(deadline),
            cmd: Box::new(cmd),
        }
    }
}

/// How long a client should wait after OVERLOADED: long enough for a
/// backlog to drain, short enough not to be noticed by a person.
pub(super) const OVERLOADED_RETRY_AFTER_MS: u64 = 250;

impl Command {
    /// Answers the command with `err` without doing it. Commands that carry
    /// no answer (acks, deletes, ...) are returned: they must be applied;
    /// so are sends answered through a push queue (the shard pushes it).
    fn reject(self, err: RouteError) -> Option<Command> {
        match self {
            Command::RequestCode { reply, .. } => reply_now(reply, Err(err)),
            Command::CheckCode { reply, .. } => reply_now(reply, Err(err)),
            Command::UserPin { reply, .. } => reply_now(reply, Err(err)),
            Command::SetPin { reply, .. } => reply_now(reply, Err(err)),
            Command::VerifyCode { reply, .. } | Command::TakeLinkCode { reply, .. } => {
                reply_now(reply, Err(err));
            }
            Command::LookupPhone { reply, .. } => reply_now(reply, Err(err)),
            Command::RegisterDevice { reply, .. } | Command::AddLinkedDevice { reply, .. } => {
                reply_now(reply, Err(err));
            }
            Command::Authenticate { reply, .. } => reply_now(reply, Err(err)),
            Command::Send {
                reply: SendReply::Ticket(reply),
                ..
            }
            | Command::SendSelf { reply, .. } => {
                reply_now(reply, Err(err));
            }
            Command::UploadKeys { reply, .. } => reply_now(reply, Err(err)),
            Command::FetchBundles { reply, .. } => reply_now(reply, Err(err)),
            Command::CreateLinkCode { reply, .. } => reply_now(reply, Err(err)),
            Command::StoreLinkCode { reply, .. }
            | Command::RevokeDevice { reply, .. }
            | Command::EnqueueReceipt { reply, .. } => reply_now(reply, Err(err)),
            Command::ListDevices { reply, .. } => reply_now(reply, Err(err)),
            Command::CreateGroup { reply, .. }
            | Command::ChangeGroup { reply, .. }
            | Command::GetGroup { reply, .. } => reply_now(reply, Err(err)),
            Command::ListGroups { reply, .. } => reply_now(reply, Err(err)),
            Command::SendGroup { reply, .. } => reply_now(reply, Err(err)),
            Command::MemberDevicesChanged { reply, .. } => reply_now(reply, Err(err)),
            Command::LookupUser { reply, .. } => reply_now(reply, Err(err)),
            other @ (Command::Send {
                reply: SendReply::Queued { .. },
                ..
            }
            | Command::Delete { .. }
            | Command::Ack { .. }
            | Command::Disconnected { .. }
            | Command::Closing
            | Command::Sweep
            | Command::Tick
            | Command::Mail { .. }
            | Command::MailDone { .. }
            | Command::PayloadReleased { .. }
            | Command::Shutdown) => return Some(other),
        }
        None
    }
}

/// A delivery receipt a device's ack owes a sender, and the message
/// entries it covers (removed once the receipt is stored).
#[derive(Debug)]
pub struct OwedReceipt {
    /// The sender.
    pub to_user: UserId,
    /// The receipt to queue for every device of the sender.
    pub receipt: pb::Receipt,
    /// The acked message entries (in the acking device's queue) it covers.
    pub message_seqs: Vec<u64>,
    /// The group payloads they reference: `(entry seq, (group,
    /// group_seq))`, released with them.
    pub released: Vec<(u64, (GroupId, u64))>,
}

pub(super) enum Command {
    RequestCode {
        phone: String,
        reply: Reply<CodeIssued>,
    },
    VerifyCode {
        phone: String,
        code: String,
        reply: Reply<UserId>,
    },
    RegisterDevice {
        user: UserId,
        phone: String,
        reply: Reply<Registered>,
    },
    /// Two-step verification, step 1 on the phone's shard: checks the code
    /// without using it up, and counts a presented PIN.
    CheckCode {
        phone: String,
        code: String,
        pin_presented: bool,
        reply: Reply<CodeChecked>,
    },
    /// The account's PIN hash (empty: none), on the user's shard.
    UserPin {
        user: UserId,
        reply: Reply<String>,
    },
    /// Sets (empty: clears) the PIN hash; primary device only.
    SetPin {
        device: DeviceKey,
        pin_hash: String,
        reply: Reply<bool>,
    },
    Authenticate {
        device: DeviceKey,
        credential: Vec<u8>,
        link: ConnLink,
        reply: Reply<AuthInfo>,
    },
    SendSelf {
        req: SendRequest,
        reply: Reply<SendAccepted>,
    },
    UploadKeys {
        device: DeviceKey,
        upload: pb::UploadKeys,
        reply: Reply<(u32, bool)>,
    },
    FetchBundles {
        requester: DeviceKey,
        user: UserId,
        /// Identity keys only: no one-time or fallback key.
        identities_only: bool,
        reply: Reply<Vec<pb::DeviceBundle>>,
    },
    CreateLinkCode {
        device: DeviceKey,
        reply: Reply<(String, u64)>,
    },
    StoreLinkCode {
        code: String,
        record: LinkCodeRecord,
        reply: Reply<()>,
    },
    TakeLinkCode {
        code: String,
        reply: Reply<UserId>,
    },
    AddLinkedDevice {
        user: UserId,
        code: String,
        reply: Reply<Registered>,
    },
    ListDevices {
        user: UserId,
        reply: Reply<Vec<pb::DeviceInfo>>,
    },
    RevokeDevice {
        by: DeviceKey,
        target: DeviceId,
        reply: Reply<()>,
    },
    /// On the shard of `group` (a new random id).
    CreateGroup {
        group: GroupId,
        creator: DeviceKey,
        req: pb::CreateGroup,
        reply: Reply<pb::GroupInfo>,
    },
    /// On the group's shard.
    ChangeGroup {
        by: DeviceKey,
        req: pb::ChangeGroup,
        reply: Reply<pb::GroupInfo>,
    },
    /// On the group's shard.
    GetGroup {
        by: UserId,
        group: GroupId,
        reply: Reply<pb::GroupInfo>,
    },
    /// On the user's shard.
    ListGroups {
        user: UserId,
        reply: Reply<Vec<pb::GroupSummary>>,
    },
    /// On the group's shard.
    SendGroup {
        req: GroupSendRequest,
        reply: Reply<GroupSent>,
    },
    /// On the group's shard: `user` has a new device with keys.
    MemberDevicesChanged {
        group: GroupId,
        user: UserId,
        reply: Reply<()>,
    },
    LookupPhone {
        phone: String,
        reply: Reply<UserId>,
    },
    LookupUser {
        user: UserId,
        reply: Reply<UserSummary>,
    },
    /// A send; `copies` are the sender's copies for its other devices
    /// when the sender lives on this shard too (else they come as a
    /// separate `SendSelf` to the sender's shard).
    Send {
        req: SendRequest,
        copies: Option<SendRequest>,
        reply: SendReply,
    },
    EnqueueReceipt {
        to_user: UserId,
        receipt: pb::Receipt,
        /// Answer UNKNOWN_USER (rather than dropping it) if there is no such user.
        must_exist: bool,
        reply: Reply<()>,
    },
    Delete {
        device: DeviceKey,
        seqs: Vec<u64>,
        /// Group payloads the deleted entries referenced, by entry seq.
        released: Vec<(u64, (GroupId, u64))>,
    },
    /// A device's ack, handled in one batch: `seqs` were received on
    /// `conn_id`; the receipt entries `delete` go; each of `receipts` is
    /// queued for its user (who lives on this shard) and, if it could be
    /// staged, the message entries it covers are removed in the same atomic
    /// batch.
    Ack {
        device: DeviceKey,
        conn_id: u64,
        seqs: Vec<u64>,
        delete: Vec<u64>,
        /// Group payloads the `delete` entries referenced, by entry seq.
        released: Vec<(u64, (GroupId, u64))>,
        receipts: Vec<OwedReceipt>,
    },
    Disconnected {
        device: DeviceKey,
        conn_id: u64,
    },
    Sweep,
    /// Periodic upkeep: post mail not yet delivered.
    Tick,
    /// Mail from shard `from` (see `router/mail.rs`): queue `record`'s
    /// entry for every device of its user, then confirm.
    Mail {
        from: usize,
        owner: UserId,
        id: u64,
        record: MailRecord,
    },
    /// This shard's mail `id` was applied by its receiver.
    MailDone {
        id: MailId,
    },
    /// On a group's shard: shard `from` holds no more references to the
    /// payload of `(group, seq)`.
    PayloadReleased {
        group: GroupId,
        seq: u64,
    },
    /// The server is shutting down: end every connection.
    Closing,
    Shutdown,
}

enum Drain {
    /// Pushing stored entries page by page; the next page goes out when every
    /// seq of the previous one has been acked.
    Draining { cursor: u64, inflight: FastSet<u64> },
    /// Caught up: new entries are pushed as they are committed.
    Live,
}

struct Online {
    conn_id: u64,
    push: super::ConnTx,
    drain: Drain,
}

impl Online {
    /// Ends the connection, which sees the reason before anything still
    /// queued for it.
    fn kick(self, reason: KickReason) {
        self.push.kick(reason);
    }
}

/// Runs after the batch commits; gets the commit error if it failed.
type Effect = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A send part's answer, and whether it waits for the batch's commit.
#[derive(Debug)]
struct Answer {
    result: Result<SendAccepted, RouteError>,
    after_commit: bool,
}

impl Answer {
    /// An answer that needs nothing stored (an error, a known duplicate).
    fn now(result: Result<SendAccepted, RouteError>) -> Self {
        Self {
            result,
            after_commit: false,
        }
    }
}

/// A send's answer waiting for the batch's commit, for the connection
/// `to.conn_id` of `device`.
#[derive(Debug)]
struct PendingAnswer {
    device: DeviceKey,
    to: AnswerTo,
    submitted: Instant,
    result: Result<SendAccepted, RouteError>,
}

/// Metric handles a shard records into for every command, message or
/// commit, looked up once in `run` (a lookup searches the registry).
struct ShardMetrics {
    inbox_wait: metrics::Histogram,
    messages_in: metrics::Counter,
    batch_ops: metrics::Histogram,
    commit_seconds: metrics::Histogram,
    send_ack_seconds: metrics::Histogram,
    mail_pending: metrics::Gauge,
}

impl ShardMetrics {
    fn noop() -> Self {
        Self {
            inbox_wait: metrics::Histogram::noop(),
            messages_in: metrics::Counter::noop(),
            batch_ops: metrics::Histogram::noop(),
            commit_seconds: metrics::Histogram::noop(),
            send_ack_seconds: metrics::Histogram::noop(),
            mail_pending: metrics::Gauge::noop(),
        }
    }

    fn registered(shard: &str) -> Self {
        Self {
            inbox_wait: metrics::histogram!(tm::SHARD_INBOX_WAIT_SECONDS),
            messages_in: metrics::counter!(tm::MESSAGES_IN),
            batch_ops: metrics::histogram!(tm::STORE_BATCH_OPS),
            commit_seconds: metrics::histogram!(tm::STORE_COMMIT_SECONDS),
            send_ack_seconds: metrics::histogram!(tm::SEND_ACK_SECONDS),
            mail_pending: metrics::gauge!(tm::SHARD_MAIL_PENDING, "shard" => shard.to_owned()),
        }
    }
}

pub(super) struct Shard {
    id: usize,
    shards: usize,
    /// Every shard's inbox (this one's too), for mail (`router/mail.rs`).
    peers: Arc<[mpsc::WeakSender<Queued>]>,
    store: Arc<dyn Store>,
    cfg: RouterConfig,
    /// Cached user records (committed or staged in the current batch).
    users: FastMap<UserId, UserRecord>,
    /// Seq counters of device queues.
    last_seq: FastMap<DeviceKey, SeqCounter>,
    /// Cached key records (committed or staged).
    keys: FastMap<DeviceKey, DeviceKeysRecord>,
    /// Authenticated connections of this shard's devices.
    online: FastMap<DeviceKey, Online>,
    /// One-time keys each device may still hand out (in memory: a restart
    /// gives every device a full hour's budget again).
    one_time_key_budget: limits::KeyedLimiter<DeviceKey>,
    /// Durable queue usage of devices, loaded when first needed.
    queue_usage: FastMap<DeviceKey, QueueUsage>,
    /// Sends held behind an earlier refused one (`router::order`).
    holds: Holds,
    /// Mail to and from other shards.
    mail: Mailroom,
    /// Sends staged in this batch, held if its commit fails.
    batch_sends: Vec<((DeviceKey, UserId, Part), String)>,
    /// Size of `users` that triggers the next eviction.
    evict_at: usize,
    metrics: ShardMetrics,
    // ---- the batch being built
    ops: Vec<Op>,
    /// Messages from users in this batch, counted once it commits.
    messages_in: u64,
    effects: Vec<Effect>,
    /// Answers to sends that go through push queues, after the commit.
    send_answers: Vec<PendingAnswer>,
    live: Vec<(DeviceKey, pb::QueueEntry)>,
    kicks: Vec<(DeviceKey, KickReason)>,
    pushes: Vec<(DeviceKey, ToConn)>,
    staged_dedup: HashMap<DedupKey, u64>,
    staged_codes: HashMap<String, CodeRecord>,
    staged_phones: HashMap<String, UserId>,
    /// Group sends staged in this batch: (server time, group seq).
    staged_group_dedup: HashMap<DedupKey, (u64, u64)>,
    /// Groups this shard owns, and the order of group mail it applied.
    groups: groups::GroupCache,
    /// Entries and bytes enqueued per device in this batch (not yet in the
    /// store), for a quota recount in the middle of a batch.
    batch_enqueued: FastMap<DeviceKey, (u64, u64)>,
    /// An ack in this batch let a draining device's next page go: the
    /// device waits for this batch's commit before its next ack is taken,
    /// so the batch commits without pacing (a drain is one round trip per
    /// page, and pacing would add up to an interval to each).
    drain_advanced: bool,
}

fn reply_now<T>(reply: Reply<T>, result: Result<T, RouteError>) {
    // The requester may have gone away; nothing to do then.
    let _ = reply.send(result);
}

impl Shard {
    pub(super) fn new(
        id: usize,
        peers: Arc<[mpsc::WeakSender<Queued>]>,
        store: Arc<dyn Store>,
        cfg: RouterConfig,
    ) -> Self {
        let evict_at = cfg.max_cached_users.max(1);
        let one_time_keys_per_device = cfg.one_time_keys_per_device;
        Self {
            id,
            shards: peers.len(),
            peers,
            store,
            cfg,
            users: FastMap::default(),
            last_seq: FastMap::default(),
            keys: FastMap::default(),
            online: FastMap::default(),
            one_time_key_budget: limits::KeyedLimiter::new(
                one_time_keys_per_device,
                limits::MAX_TRACKED_KEYS,
            ),
            queue_usage: FastMap::default(),
            holds: Holds::default(),
            mail: Mailroom::default(),
            batch_sends: Vec::new(),
            evict_at,
            metrics: ShardMetrics::noop(),
            ops: Vec::new(),
            messages_in: 0,
            effects: Vec::new(),
            send_answers: Vec::new(),
            live: Vec::new(),
            kicks: Vec::new(),
            pushes: Vec::new(),
            staged_dedup: HashMap::new(),
            staged_codes: HashMap::new(),
            staged_phones: HashMap::new(),
            staged_group_dedup: HashMap::new(),
            groups: groups::GroupCache::default(),
            batch_enqueued: FastMap::default(),
            drain_advanced: false,
        }
    }

    /// The shard loop: take a batch of commands, apply, commit, answer.
    pub(super) fn run(mut self, mut inbox: mpsc::Receiver<Queued>) {
        let span = tracing::info_span!("shard", id = self.id);
        let _enter = span.enter();
        let shard_label = self.id.to_string();
        let batch_size = metrics::histogram!(tm::SHARD_BATCH_COMMANDS);
        self.metrics = ShardMetrics::registered(&shard_label);
        self.metrics.mail_pending.set(0.0);
        let depth = metrics::gauge!(tm::SHARD_INBOX_DEPTH, "shard" => shard_label);
        self.load_mail();
        let mut stopping = false;
        // When the last synced commit started (group commit pacing).
        let mut last_sync: Option<Instant> = None;
        while !stopping {
            let first = match inbox.try_recv() {
                Ok(first) => first,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: what the last commit's aftermath staged (a
                    // group payload released by the acks it applied) is
                    // committed now, not kept in memory until a next
                    // command that may be long in coming (a crash would
                    // lose it to the expiry sweep). Under load the inbox is
                    // seldom empty, so this adds no commit there.
                    if !self.ops.is_empty() {
                        if self.ops.iter().any(Op::needs_sync) {
                            last_sync = Some(Instant::now());
                        }
                        self.commit_contained();
                    }
                    match inbox.blocking_recv() {
                        Some(first) => first,
                        None => break,
                    }
                }
            };
            let mut applied: usize = 0;
            self.take_waiting(Some(first), &mut inbox, &mut applied, &mut stopping);
            // Pacing: a shard that synced less than an interval ago waits
            // out the rest and takes in what arrived meanwhile, so under
            // load one fsync (and one wake-up of this thread) covers many
            // messages. An idle shard commits at once, and so does a batch
            // that let a drain go on.
            let drain_advanced = std::mem::take(&mut self.drain_advanced);
            if !stopping
                && !drain_advanced
                && applied < self.cfg.max_batch_commands
                && self.ops.iter().any(Op::needs_sync)
                && let Some(rest) = last_sync
                    .and_then(|t| self.cfg.group_commit_interval.checked_sub(t.elapsed()))
                    .filter(|rest| !rest.is_zero())
            {
                std::thread::sleep(rest);
                self.take_waiting(None, &mut inbox, &mut applied, &mut stopping);
            }
            if self.ops.iter().any(Op::needs_sync) {
                last_sync = Some(Instant::now());
            }
            batch_size.record(applied as f64);
            self.commit_contained();
            depth.set(inbox.len() as f64);
            self.maybe_evict();
        }
        // What the last commit's aftermath staged before a stop is
        // committed here, not lost with the process.
        if !self.ops.is_empty() {
            self.commit_contained();
        }
        for (_, online) in self.online.drain() {
            drop(online);
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    /// Applies `first` and the commands already waiting in `inbox`, without
    /// blocking, until the batch holds `max_batch_commands` or a shutdown is
    /// seen. At the start of a batch (`first` given), the records their
    /// authentications need are read first, in one go
    /// ([`Shard::read_ahead`]); later in a batch the store may lag what the
    /// batch staged (a device's keys dropped but not yet committed), so the
    /// commands read for themselves as before.
    fn take_waiting(
        &mut self,
        first: Option<Queued>,
        inbox: &mut mpsc::Receiver<Queued>,
        applied: &mut usize,
        stopping: &mut bool,
    ) {
        if *stopping {
            return;
        }
        let batch_start = first.is_some();
        let mut taken: Vec<Queued> = first.into_iter().collect();
        while *applied + taken.len() < self.cfg.max_batch_commands
            && !taken
                .last()
                .is_some_and(|q| matches!(*q.cmd, Command::Shutdown))
        {
            let Ok(queued) = inbox.try_recv() else {
                break;
            };
            taken.push(queued);
        }
        if batch_start {
            self.read_ahead(&taken);
        }
        for queued in taken {
            *applied += 1;
            if self.take(queued) {
                *stopping = true;
                return;
            }
        }
    }

    /// Reads into the caches, in one query per kind, the users and device
    /// keys that the authentications among `taken` will look up and that
    /// are not cached: after a takeover or a restart, thousands of
    /// connections authenticate at once with a cold cache, and in cluster
    /// mode each read alone is a PostgreSQL round trip. Called before a
    /// batch stages anything of its own: every earlier batch was committed
    /// (the ops an idle shard keeps between batches are payload releases,
    /// not accounts or keys), so what is read is what each command would
    /// have read. A failure is left to the commands, which read again and
    /// answer it.
    fn read_ahead(&mut self, taken: &[Queued]) {
        let devices: Vec<DeviceKey> = taken
            .iter()
            .filter_map(|q| match &*q.cmd {
                Command::Authenticate { device, .. } => Some(*device),
                _ => None,
            })
            .collect();
        if devices.len() < 2 {
            return;
        }
        let mut users: Vec<UserId> = devices
            .iter()
            .map(|d| d.user)
            .filter(|u| !self.users.contains_key(u))
            .collect();
        users.sort_unstable();
        users.dedup();
        if !users.is_empty() {
            match self.store.users(&users) {
                Ok(found) => self.users.extend(found),
                Err(e) => tracing::debug!(error = %e, "reading users ahead failed"),
            }
        }
        let mut keys: Vec<DeviceKey> = devices
            .into_iter()
            .filter(|d| !self.keys.contains_key(d))
            .collect();
        keys.sort_unstable_by_key(|d| (d.user, d.device));
        keys.dedup();
        if !keys.is_empty() {
            match self.store.many_device_keys(&keys) {
                Ok(found) => self.keys.extend(found),
                Err(e) => tracing::debug!(error = %e, "reading device keys ahead failed"),
            }
        }
    }

    /// Applies one command from the inbox, or rejects it if it waited past
    /// its deadline. Returns true for `Shutdown`.
    fn take(&mut self, queued: Queued) -> bool {
        self.metrics
            .inbox_wait
            .record(queued.at.elapsed().as_secs_f64());
        if matches!(*queued.cmd, Command::Shutdown) {
            return true;
        }
        let mut cmd = Some(*queued.cmd);
        if queued.deadline.is_some_and(|d| Instant::now() > d) {
            // Stale work: the requester has likely given up.
            let overloaded = || RouteError::Overloaded {
                retry_after_ms: OVERLOADED_RETRY_AFTER_MS,
            };
            if let Some(c) = cmd.take() {
                self.hold_refused(&c, HeldBy::Overloaded, OVERLOADED_RETRY_AFTER_MS);
                cmd = match c.reject(overloaded()) {
                    Some(Command::Send {
                        req,
                        reply: reply @ SendReply::Queued { .. },
                        ..
                    }) => {
                        self.answer_send(reply, req.from, Answer::now(Err(overloaded())));
                        None
                    }
                    other => other,
                };
            }
            if cmd.is_none() {
                metrics::counter!(tm::DISCARDED_REQUESTS).increment(1);
            }
        }
        if let Some(cmd) = cmd {
            self.apply_contained(cmd);
        }
        false
    }

    /// Applies one command; a panic in it is caught and the shard
    /// restarts from the store: the batch is failed, caches are dropped and
    /// connections are told to reconnect (they re-drain from the store).
    fn apply_contained(&mut self, cmd: Command) {
        self.contained("in shard command", |shard| shard.apply(cmd));
    }

    /// Runs `f`; a panic in it (`what` says where, for the log) is caught
    /// and the shard restarts from the store.
    fn contained(&mut self, what: &str, f: impl FnOnce(&mut Self)) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if result.is_err() {
            metrics::counter!(tm::PANICS, "where" => "shard").increment(1);
            tracing::error!(
                shard = self.id,
                "panic {what}; restarting the shard from the store"
            );
            self.restart();
        }
    }

    /// Throws away everything not yet committed and all memory state.
    fn restart(&mut self) {
        self.hold_batch_sends();
        self.mail.discard_staged();
        self.ops.clear();
        self.messages_in = 0;
        self.live.clear();
        self.pushes.clear();
        self.kicks.clear();
        self.staged_dedup.clear();
        self.staged_codes.clear();
        self.staged_phones.clear();
        self.staged_group_dedup.clear();
        for effect in std::mem::take(&mut self.effects) {
            effect(Some(&StoreError::Engine(
                "shard restarted after an internal error".into(),
            )));
        }
        // Their connections are kicked below; the clients resend.
        self.send_answers.clear();
        self.users.clear();
        self.groups.clear();
        self.last_seq.clear();
        self.keys.clear();
        self.queue_usage.clear();
        self.batch_enqueued.clear();
        for (_, online) in self.online.drain() {
            online.kick(KickReason::Unavailable);
        }
    }

    fn owns_user(&self, user: UserId) -> bool {
        shard_of_user(user, self.shards) == self.id
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::RequestCode { phone, reply } => self.request_code(phone, reply),
            Command::VerifyCode { phone, code, reply } => self.verify_code(phone, &code, reply),
            Command::CheckCode {
                phone,
                code,
                pin_presented,
                reply,
            } => self.check_code(phone, &code, pin_presented, reply),
            Command::UserPin { user, reply } => self.user_pin(user, reply),
            Command::SetPin {
                device,
                pin_hash,
                reply,
            } => self.set_pin(device, pin_hash, reply),
            Command::RegisterDevice { user, phone, reply } => {
                self.register_device(user, phone, reply);
            }
            Command::Authenticate {
                device,
                credential,
                link,
                reply,
            } => self.authenticate(device, &credential, link, reply),
            Command::LookupPhone { phone, reply } => self.lookup_phone(&phone, reply),
            Command::LookupUser { user, reply } => self.lookup_user(user, reply),
            Command::Send {
                req,
                copies: None,
                reply,
            } => {
                let from = req.from;
                let answer = self.send(req);
                self.answer_send(reply, from, answer);
            }
            Command::Send {
                req,
                copies: Some(copies),
                reply,
            } => {
                let from = req.from;
                let answer = self.send_with_copies(req, copies);
                self.answer_send(reply, from, answer);
            }
            Command::SendSelf { req, reply } => {
                let from = req.from;
                let answer = self.send_self(req);
                self.answer_send(SendReply::Ticket(reply), from, answer);
            }
            Command::UploadKeys {
                device,
                upload,
                reply,
            } => self.upload_keys(device, upload, reply),
            Command::FetchBundles {
                requester,
                user,
                identities_only,
                reply,
            } => self.fetch_bundles(requester, user, identities_only, reply),
            Command::CreateLinkCode { device, reply } => self.create_link_code(device, reply),
            Command::StoreLinkCode {
                code,
                record,
                reply,
            } => self.store_link_code(code, record, reply),
            Command::TakeLinkCode { code, reply } => self.take_link_code(code, reply),
            Command::AddLinkedDevice { user, code, reply } => {
                self.add_linked_device(user, &code, reply);
            }
            Command::ListDevices { user, reply } => self.list_devices(user, reply),
            Command::RevokeDevice { by, target, reply } => self.revoke_device(by, target, reply),
            Command::CreateGroup {
                group,
                creator,
                req,
                reply,
            } => self.create_group(group, creator, req, reply),
            Command::ChangeGroup { by, req, reply } => self.change_group(by, req, reply),
            Command::GetGroup { by, group, reply } => self.get_group(by, group, reply),
            Command::ListGroups { user, reply } => self.list_groups(user, reply),
            Command::SendGroup { req, reply } => self.send_group(req, reply),
            Command::MemberDevicesChanged { group, user, reply } => {
                self.member_devices_changed(group, user, reply);
            }
            Command::EnqueueReceipt {
                to_user,
                receipt,
                must_exist,
                reply,
            } => self.enqueue_receipt(to_user, receipt, must_exist, reply),
            Command::Delete {
                device,
                seqs,
                released,
            } => self.delete(device, seqs, released),
            Command::Ack {
                device,
                conn_id,
                seqs,
                delete,
                released,
                receipts,
            } => self.ack(device, conn_id, &seqs, delete, released, receipts),
            Command::PayloadReleased { group, seq } => self.payload_released(group, seq),
            Command::Disconnected { device, conn_id } => self.disconnected(device, conn_id),
            Command::Sweep => self.sweep(),
            Command::Tick => self.tick(),
            Command::Mail {
                from,
                owner,
                id,
                record,
            } => self.receive_mail(from, (owner, id), record),
            Command::MailDone { id } => self.mail_done(id),
            Command::Closing => {
                for (_, online) in self.online.drain() {
                    online.kick(KickReason::ShuttingDown);
                }
            }
            Command::Shutdown => {}
        }
    }

    // ------------------------------------------------------------ batching

    /// Answers `reply` with `result` once the current batch is committed (or
    /// with the storage error if it is not).
    fn after_commit<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, RouteError>) {
        self.effects.push(Box::new(move |err| {
            let result = match err {
                Some(e) if result.is_ok() => Err(RouteError::Storage(e.clone())),
                _ => result,
            };
            reply_now(reply, result);
        }));
    }

    /// Adds a write, of any domain, to the batch being built.
    pub(super) fn stage(&mut self, op: impl Into<Op>) {
        self.ops.push(op.into());
    }

    /// [`Shard::commit`], contained as a command is.
    fn commit_contained(&mut self) {
        self.contained("while committing", Self::commit);
    }

    fn commit(&mut self) {
        let ops = std::mem::take(&mut self.ops);
        let sync = ops.iter().any(Op::needs_sync);
        let started = Instant::now();
        let op_count = ops.len();
        let result = self.store.commit(ops, sync);
        if op_count > 0 {
            self.metrics.batch_ops.record(op_count as f64);
            self.metrics
                .commit_seconds
                .record(started.elapsed().as_secs_f64());
        }
        let messages_in = std::mem::take(&mut self.messages_in);
        if result.is_ok() && messages_in > 0 {
            self.metrics.messages_in.increment(messages_in);
        }
        if result.is_err() {
            self.hold_batch_sends();
        }
        self.batch_sends.clear();
        if let Err(e) = &result {
            metrics::counter!(tm::STORE_COMMIT_FAILURES).increment(1);
            tracing::error!(error = %e, "batch commit failed; answering with STORAGE_UNAVAILABLE");
            // Memory may be ahead of the store now: reload from it.
            self.users.clear();
            self.groups.clear();
            self.last_seq.clear();
            self.keys.clear();
            self.queue_usage.clear();
        }
        self.batch_enqueued.clear();
        self.staged_dedup.clear();
        self.staged_codes.clear();
        self.staged_phones.clear();
        self.staged_group_dedup.clear();
        let err = result.err();
        for effect in std::mem::take(&mut self.effects) {
            effect(err.as_ref());
        }
        self.after_commit_groups(err.is_none());
        let shards = self.shards;
        self.mail
            .after_commit(err.is_none(), self.id, &self.peers, |user| {
                shard_of_user(user, shards)
            });
        for mut answer in std::mem::take(&mut self.send_answers) {
            if let (Some(e), Ok(_)) = (&err, &answer.result) {
                answer.result = Err(RouteError::Storage(e.clone()));
            }
            self.push_answer(answer);
        }
        let live = std::mem::take(&mut self.live);
        let kicks = std::mem::take(&mut self.kicks);
        let pushes = std::mem::take(&mut self.pushes);
        if err.is_some() {
            return;
        }
        for (device, push) in pushes {
            self.push(device, push);
        }
        // Coalesce consecutive entries for the same device into one frame.
        let mut run: Option<(DeviceKey, Vec<pb::QueueEntry>)> = None;
        for (device, entry) in live {
            match &mut run {
                Some((d, entries)) if *d == device => entries.push(entry),
                _ => {
                    if let Some((d, entries)) = run.take() {
                        self.push_live(d, entries);
                    }
                    run = Some((device, vec![entry]));
                }
            }
        }
        if let Some((d, entries)) = run {
            self.push_live(d, entries);
        }
        for (device, reason) in kicks {
            if let Some(online) = self.online.remove(&device) {
                online.kick(reason);
            }
        }
    }

    fn maybe_evict(&mut self) {
        if self.users.len() <= self.evict_at {
            return;
        }
        let online_users: FastSet<UserId> = self.online.keys().map(|d| d.user).collect();
        self.users.retain(|u, _| online_users.contains(u));
        self.last_seq.retain(|d, _| online_users.contains(&d.user));
        self.keys.retain(|d, _| online_users.contains(&d.user));
        self.queue_usage
            .retain(|d, _| online_users.contains(&d.user));
        self.evict_at = self.cfg.max_cached_users.max(self.users.len() * 2).max(1);
    }

    // ------------------------------------------------------------ state access

    fn user(&mut self, user: UserId) -> Result<Option<&UserRecord>, StoreError> {
        if !self.users.contains_key(&user) {
            match self.store.user(user)? {
                Some(rec) => {
                    self.users.insert(user, rec);
                }
                None => return Ok(None),
            }
        }
        Ok(self.users.get(&user))
    }

    /// Whether `device` is its user's only device.
    fn sole_device(&mut self, device: DeviceKey) -> bool {
        matches!(self.user(device.user), Ok(Some(u))
            if u.devices.len() == 1 && u.devices.iter().all(|d| d.device_id == device.device))
    }

    fn phone_user(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        if let Some(u) = self.staged_phones.get(phone) {
            return Ok(Some(*u));
        }
        self.store.phone(phone)
    }

    fn code_record(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        if let Some(r) = self.staged_codes.get(phone) {
            return Ok(Some(r.clone()));
        }
        self.store.code(phone)
    }

    fn stage_code(&mut self, phone: &str, record: CodeRecord) {
        self.staged_codes.insert(phone.to_owned(), record.clone());
        self.stage(AccountOp::PutCode {
            phone: phone.to_owned(),
            record,
        });
    }

    /// Takes the next seq of `device`'s queue, staging the reservation of
    /// a new block of [`SEQ_BLOCK`] seqs when the current one is used up.
    fn next_seq(&mut self, device: DeviceKey) -> Result<u64, StoreError> {
        let counter = match self.last_seq.get_mut(&device) {
            Some(c) => c,
            None => {
                // After a restart, continue above everything reserved: the
                // rest of the block in use then is skipped, never reused.
                let reserved = self.store.reserved_seq(device)?;
                self.last_seq.entry(device).or_insert(SeqCounter {
                    last: reserved,
                    reserved,
                })
            }
        };
        let next = counter.last.saturating_add(1);
        counter.last = next;
        if next > counter.reserved {
            counter.reserved = next.saturating_add(SEQ_BLOCK - 1);
            let upto = counter.reserved;
            self.stage(QueueOp::ReserveSeqs { device, upto });
        }
        Ok(next)
    }

    /// Stages an entry for `device` and its live push.
    fn stage_entry(&mut self, device: DeviceKey, seq: u64, ts: u64, body: pb::queue_entry::Body) {
        self.stage_entry_pushed_as(device, seq, ts, body, None);
    }

    /// Stages an entry for `device`, pushed live as `live` when given (a
    /// group message stored as a reference goes out whole).
    fn stage_entry_pushed_as(
        &mut self,
        device: DeviceKey,
        seq: u64,
        ts: u64,
        body: pb::queue_entry::Body,
        live: Option<pb::queue_entry::Body>,
    ) {
        let mut entry = pb::QueueEntry {
            seq,
            server_ts_ms: ts,
            body: Some(body),
        };
        let bytes: bytes::Bytes = entry.encode_to_vec().into();
        if live.is_some() {
            entry.body = live;
        }
        let size = bytes.len() as u64;
        let batch = self.batch_enqueued.entry(device).or_default();
        batch.0 += 1;
        batch.1 += size;
        if let Some(usage) = self.queue_usage.get_mut(&device) {
            usage.entries += 1;
            usage.bytes += size;
        }
        self.stage(QueueOp::Enqueue {
            device,
            entry: StoredEntry { seq, bytes },
        });
        self.live.push((device, entry));
    }

    /// Holds later sends behind a send refused before it was applied.
    fn hold_refused(&mut self, cmd: &Command, by: HeldBy, retry_after_ms: u64) {
        let now = now_ms();
        let mut hold = |req: &SendRequest, part| {
            self.holds.hold(
                (req.from, req.to_user, part),
                &req.client_msg_id,
                by,
                retry_after_ms,
                now,
            );
        };
        match cmd {
            Command::Send { req, copies, .. } => {
                hold(req, Part::Peer);
                if let Some(c) = copies {
                    hold(c, Part::Own);
                }
            }
            Command::SendSelf { req, .. } => hold(req, Part::Own),
            Command::SendGroup { req, .. } => self.holds.hold(
                (req.from, req.group_id, Part::Group),
                &req.client_msg_id,
                by,
                retry_after_ms,
                now,
            ),
            _ => {}
        }
    }

    /// Holds later sends behind every send of a batch that will not be
    /// committed.
    fn hold_batch_sends(&mut self) {
        let now = now_ms();
        for (key, id) in std::mem::take(&mut self.batch_sends) {
            self.holds
                .hold(key, &id, HeldBy::Unavailable, STORAGE_RETRY_AFTER_MS, now);
        }
    }

    /// Stages the removal of a queue entry; `size` is its encoded size when
    /// known.
    fn stage_dequeue(&mut self, device: DeviceKey, seq: u64, size: Option<u64>) {
        if let Some(usage) = self.queue_usage.get_mut(&device) {
            let size = size.unwrap_or_else(|| {
                usage.exact = false;
                usage.bytes.checked_div(usage.entries).unwrap_or(0)
            });
            usage.entries = usage.entries.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(size);
        }
        self.stage(QueueOp::Dequeue { device, seq });
    }

    /// A device's queue usage: from the cache, or counted in the store (plus
    /// what this batch has enqueued) when absent or, with `exact`, when the
    /// cached figure is an estimate.
    fn queue_usage(&mut self, device: DeviceKey, exact: bool) -> Result<QueueUsage, StoreError> {
        if let Some(u) = self.queue_usage.get(&device)
            && (u.exact || !exact)
        {
            return Ok(*u);
        }
        let (mut entries, mut bytes) = self.store.queue_usage(device)?;
        if let Some((e, b)) = self.batch_enqueued.get(&device) {
            entries += e;
            bytes += b;
        }
        let usage = QueueUsage {
            entries,
            bytes,
            exact: true,
        };
        self.queue_usage.insert(device, usage);
        Ok(usage)
    }

    /// Whether `adding` more bytes in one more entry fit each device's
    /// quota; QUEUE_FULL if any would pass it. Nothing is staged.
    fn check_quota(
        &mut self,
        devices: impl Iterator<Item = (DeviceKey, u64)>,
    ) -> Result<(), RouteError> {
        let (max_entries, max_bytes) = (self.cfg.queue_max_entries, self.cfg.queue_max_bytes);
        for (device, adding) in devices {
            let fits = |u: QueueUsage| {
                u.entries < max_entries && u.bytes.saturating_add(adding) <= max_bytes
            };
            let usage = self.queue_usage(device, false)?;
            if fits(usage) {
                continue;
            }
            if usage.exact || !fits(self.queue_usage(device, true)?) {
                Limit::QueueFull.tripped();
                return Err(RouteError::QueueFull {
                    retry_after_ms: QUEUE_FULL_RETRY_AFTER_MS,
                });
            }
        }
        Ok(())
    }
}
