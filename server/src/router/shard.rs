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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use switchboard_proto::pb;
use tokio::sync::mpsc;

use super::mail::{MailId, Mailroom};
use super::order::{HeldBy, Holds, Part};
use super::{
    AnswerTo, AuthInfo, CodeChecked, CodeIssued, ConnLink, Registered, Reply, RouteError,
    RouterConfig, SendAccepted, SendReply, SendRequest, UserSummary, shard_of_phone, shard_of_user,
};
use crate::accounts;
use crate::clock::now_ms;
use crate::keys;
use crate::limits::{self, Limit, Rate};
use crate::store::{
    CodeRecord, DedupKey, DedupRecord, DeviceId, DeviceKey, DeviceKeysRecord, DeviceRecord,
    LinkCodeRecord, MailRecord, Op, Store, StoreError, StoredEntry, UserId, UserRecord,
};
use crate::telemetry as tm;
use crate::{FastMap, FastSet};

/// The sending "device" in the dedup records of applied shard mail (no
/// real device has this id: they count up from 1).
const MAIL_DEVICE: DeviceId = DeviceId::MAX;

/// The window of `wrong_codes_per_phone_per_day`.
const WRONG_CODE_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Link codes a user may create.
const LINK_CODE_RATE: Rate = Rate::per_hour(accounts::MAX_LINK_CODES_PER_HOUR);

/// Most entries the expiry sweep removes per tick, so one sweep never
/// stalls a shard for long; the next tick continues.
const SWEEP_LIMIT: usize = 10_000;

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

/// The hold key of a send part stored for `owner`'s devices: the recipient's
/// part when `owner` is the recipient (or a note to self), else the
/// sender's own part.
fn order_key(req: &SendRequest, owner: UserId) -> (DeviceKey, UserId, Part) {
    let part = if owner == req.to_user {
        Part::Peer
    } else {
        Part::Own
    };
    (req.from, req.to_user, part)
}

/// What a shard pushes to a connection.
#[derive(Debug)]
pub enum Push {
    /// Queue entries, in queue order. A boxed slice (and one variant for
    /// the small notices) keeps `Push` small: its size is that of every
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

// Kept small on purpose (see `Push::Deliver`).
const _: () = assert!(std::mem::size_of::<Push>() <= 24);

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
            Command::LookupUser { reply, .. } => reply_now(reply, Err(err)),
            other @ (Command::Send {
                reply: SendReply::Push { .. },
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
        reply: Reply<u32>,
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
    push: super::PushTx,
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
    pushes: Vec<(DeviceKey, Push)>,
    staged_dedup: HashMap<DedupKey, u64>,
    staged_codes: HashMap<String, CodeRecord>,
    staged_phones: HashMap<String, UserId>,
    /// Entries and bytes enqueued per device in this batch (not yet in the
    /// store), for a quota recount in the middle of a batch.
    batch_enqueued: FastMap<DeviceKey, (u64, u64)>,
    /// An ack in this batch let a draining device's next page go: the
    /// device waits for this batch's commit before its next ack is taken,
    /// so the batch commits without pacing (a drain is one round trip per
    /// page, and pacing would add up to an interval to each).
    drain_advanced: bool,
}

/// Checks that `payloads` address exactly the devices `expected` yields
/// (devices of `user`).
fn check_devices<I>(
    user: UserId,
    expected: I,
    payloads: &[pb::DevicePayload],
) -> Result<(), RouteError>
where
    I: Iterator<Item = u32> + Clone,
{
    // The usual case, without building sets (a few devices at most): one
    // payload per expected device, none twice.
    if payloads.len() == expected.clone().count()
        && payloads.iter().enumerate().all(|(i, p)| {
            expected.clone().any(|d| d == p.device_id)
                && payloads.iter().take(i).all(|q| q.device_id != p.device_id)
        })
    {
        return Ok(());
    }
    let expected: BTreeSet<u32> = expected.collect();
    let addressed: BTreeSet<u32> = payloads.iter().map(|p| p.device_id).collect();
    if expected == addressed {
        return Ok(());
    }
    Err(RouteError::DeviceMismatch {
        user,
        missing: expected.difference(&addressed).copied().collect(),
        stale: addressed.difference(&expected).copied().collect(),
    })
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
            let Some(first) = inbox.blocking_recv() else {
                break;
            };
            let mut applied: usize = 1;
            stopping = self.take(first);
            self.take_waiting(&mut inbox, &mut applied, &mut stopping);
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
                self.take_waiting(&mut inbox, &mut applied, &mut stopping);
            }
            if self.ops.iter().any(Op::needs_sync) {
                last_sync = Some(Instant::now());
            }
            batch_size.record(applied as f64);
            let committed =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit()));
            if committed.is_err() {
                metrics::counter!(tm::PANICS, "where" => "shard").increment(1);
                tracing::error!(
                    shard = self.id,
                    "panic while committing; restarting the shard from the store"
                );
                self.restart();
            }
            depth.set(inbox.len() as f64);
            self.maybe_evict();
        }
        for (_, online) in self.online.drain() {
            drop(online);
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    /// Applies the commands already waiting in `inbox`, without blocking,
    /// until the batch holds `max_batch_commands` or a shutdown is seen.
    fn take_waiting(
        &mut self,
        inbox: &mut mpsc::Receiver<Queued>,
        applied: &mut usize,
        stopping: &mut bool,
    ) {
        while !*stopping && *applied < self.cfg.max_batch_commands {
            let Ok(queued) = inbox.try_recv() else {
                return;
            };
            *applied += 1;
            *stopping = self.take(queued);
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
                        reply: reply @ SendReply::Push { .. },
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
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(cmd)));
        if result.is_err() {
            metrics::counter!(tm::PANICS, "where" => "shard").increment(1);
            tracing::error!(
                shard = self.id,
                "panic in shard command; restarting the shard from the store"
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
        for effect in std::mem::take(&mut self.effects) {
            effect(Some(&StoreError::Engine(
                "shard restarted after an internal error".into(),
            )));
        }
        // Their connections are kicked below; the clients resend.
        self.send_answers.clear();
        self.users.clear();
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
            Command::UserPin { user, reply } => {
                let r = self
                    .user(user)
                    .map(|u| u.map(|u| u.pin_hash.clone()).unwrap_or_default())
                    .map_err(RouteError::from);
                self.after_commit(reply, r);
            }
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
            Command::LookupPhone { phone, reply } => {
                let r = self
                    .phone_user(&phone)
                    .map_err(RouteError::from)
                    .and_then(|u| u.ok_or(RouteError::UnknownUser));
                self.after_commit(reply, r);
            }
            Command::LookupUser { user, reply } => {
                let r = match self.user(user) {
                    Ok(Some(u)) => Ok(UserSummary {
                        user,
                        phone: u.phone.clone(),
                        devices: u.devices.iter().map(|d| d.device_id).collect(),
                    }),
                    Ok(None) => Err(RouteError::UnknownUser),
                    Err(e) => Err(e.into()),
                };
                self.after_commit(reply, r);
            }
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
            } => {
                self.ops.push(Op::PutLinkCode { code, record });
                self.after_commit(reply, Ok(()));
            }
            Command::TakeLinkCode { code, reply } => self.take_link_code(code, reply),
            Command::AddLinkedDevice { user, code, reply } => {
                self.add_linked_device(user, &code, reply);
            }
            Command::ListDevices { user, reply } => self.list_devices(user, reply),
            Command::RevokeDevice { by, target, reply } => self.revoke_device(by, target, reply),
            Command::EnqueueReceipt {
                to_user,
                receipt,
                must_exist,
                reply,
            } => self.enqueue_receipt(to_user, receipt, must_exist, reply),
            Command::Delete { device, seqs } => {
                for seq in seqs {
                    self.stage_dequeue(device, seq, None);
                }
            }
            Command::Ack {
                device,
                conn_id,
                seqs,
                delete,
                receipts,
            } => {
                self.acked(device, conn_id, &seqs);
                for seq in delete {
                    self.stage_dequeue(device, seq, None);
                }
                for owed in receipts {
                    match self.stage_receipt(owed.to_user, &owed.receipt, false) {
                        Ok(()) => {
                            for seq in owed.message_seqs {
                                self.stage_dequeue(device, seq, None);
                            }
                        }
                        // The messages stay queued and are delivered again;
                        // their receipt is owed until then.
                        Err(e) => tracing::warn!(
                            error = %e,
                            "delivery receipt not stored; entries kept for redelivery"
                        ),
                    }
                }
            }
            Command::Disconnected { device, conn_id } => {
                if self
                    .online
                    .get(&device)
                    .is_some_and(|o| o.conn_id == conn_id)
                {
                    self.online.remove(&device);
                }
            }
            Command::Sweep => self.sweep(),
            Command::Tick => self.tick(),
            Command::Mail {
                from,
                owner,
                id,
                record,
            } => self.receive_mail(from, (owner, id), record),
            Command::MailDone { id } => {
                if let Some(op) = self.mail.done(id) {
                    self.ops.push(op);
                }
            }
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
            self.last_seq.clear();
            self.keys.clear();
            self.queue_usage.clear();
        }
        self.batch_enqueued.clear();
        self.staged_dedup.clear();
        self.staged_codes.clear();
        self.staged_phones.clear();
        let err = result.err();
        for effect in std::mem::take(&mut self.effects) {
            effect(err.as_ref());
        }
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
        self.ops.push(Op::PutCode {
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
            self.ops.push(Op::ReserveSeqs { device, upto });
        }
        Ok(next)
    }

    /// Stages an entry for `device` and its live push.
    fn stage_entry(&mut self, device: DeviceKey, seq: u64, ts: u64, body: pb::queue_entry::Body) {
        let entry = pb::QueueEntry {
            seq,
            server_ts_ms: ts,
            body: Some(body),
        };
        let bytes: bytes::Bytes = entry.encode_to_vec().into();
        let size = bytes.len() as u64;
        let batch = self.batch_enqueued.entry(device).or_default();
        batch.0 += 1;
        batch.1 += size;
        if let Some(usage) = self.queue_usage.get_mut(&device) {
            usage.entries += 1;
            usage.bytes += size;
        }
        self.ops.push(Op::Enqueue {
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
        self.ops.push(Op::Dequeue { device, seq });
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

    // ------------------------------------------------------------ accounts

    fn request_code(&mut self, phone: String, reply: Reply<CodeIssued>) {
        let now = now_ms();
        let mut rec = match self.code_record(&phone) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let Err(retry_after_ms) =
            limits::take_from_log(&mut rec.requested_ms, now, self.cfg.code_requests_per_phone)
        {
            return reply_now(
                reply,
                Err(Limit::CodeRequestsPerPhone.refuse(retry_after_ms).into()),
            );
        }
        let code = accounts::new_code();
        rec.code_hash = accounts::code_hash(&phone, &code);
        rec.expires_ms = now + accounts::CODE_TTL_MS;
        rec.wrong_attempts = 0;
        let expires_at_ms = rec.expires_ms;
        self.stage_code(&phone, rec);
        self.after_commit(
            reply,
            Ok(CodeIssued {
                code,
                expires_at_ms,
            }),
        );
    }

    /// The phone's code record if `code` is right and usable now (and,
    /// with `honour_pin_lock`, the number not locked by wrong PINs); a
    /// wrong code is counted (staged).
    fn right_code(
        &mut self,
        phone: &str,
        code: &str,
        now: u64,
        honour_pin_lock: bool,
    ) -> Result<CodeRecord, RouteError> {
        let mut rec = self.code_record(phone)?.ok_or(RouteError::CodeExpired)?;
        if rec.wrong_attempts >= accounts::MAX_WRONG_CODE_ATTEMPTS {
            return Err(RouteError::CodeLocked);
        }
        // Wrong codes per number per day, whatever codes were requested:
        // without it, each new code (3 an hour) brought 5 new guesses.
        (rec.wrong_window_start_ms, rec.wrong_in_window) = limits::window_count(
            rec.wrong_window_start_ms,
            rec.wrong_in_window,
            now,
            WRONG_CODE_WINDOW,
        );
        if rec.wrong_in_window >= self.cfg.wrong_codes_per_phone_per_day {
            let retry_after_ms = rec
                .wrong_window_start_ms
                .saturating_add(WRONG_CODE_WINDOW.as_millis().try_into().unwrap_or(u64::MAX))
                .saturating_sub(now);
            return Err(Limit::WrongCodes.refuse(retry_after_ms).into());
        }
        if rec.code_hash.is_empty() || now >= rec.expires_ms {
            return Err(RouteError::CodeExpired);
        }
        if honour_pin_lock && rec.pin_locked_until_ms > now {
            return Err(RouteError::PinLocked {
                retry_after_ms: rec.pin_locked_until_ms - now,
            });
        }
        if !accounts::hashes_equal(&accounts::code_hash(phone, code), &rec.code_hash) {
            rec.wrong_attempts += 1;
            rec.wrong_in_window += 1;
            let err = if rec.wrong_attempts >= accounts::MAX_WRONG_CODE_ATTEMPTS {
                RouteError::CodeLocked
            } else {
                RouteError::CodeInvalid
            };
            self.stage_code(phone, rec);
            return Err(err);
        }
        Ok(rec)
    }

    /// Two-step verification, step 1: the code is right (not used up), and
    /// a presented PIN is counted before it is checked, locking the number
    /// once [`accounts::MAX_WRONG_PIN_ATTEMPTS`] have not been followed by a
    /// registration.
    fn check_code(
        &mut self,
        phone: String,
        code: &str,
        pin_presented: bool,
        reply: Reply<CodeChecked>,
    ) {
        let now = now_ms();
        let mut rec = match self.right_code(&phone, code, now, true) {
            Ok(r) => r,
            Err(e) => return self.after_commit(reply, Err(e)),
        };
        let user = match self.phone_user(&phone) {
            Ok(u) => u,
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut locked_until_ms = None;
        if pin_presented && user.is_some() {
            rec.pin_attempts += 1;
            if rec.pin_attempts >= accounts::MAX_WRONG_PIN_ATTEMPTS {
                // Locked unless this attempt succeeds (verify_code lifts it).
                rec.pin_attempts = 0;
                rec.pin_locked_until_ms = now + accounts::PIN_LOCKOUT_MS;
                locked_until_ms = Some(rec.pin_locked_until_ms);
            }
            self.stage_code(&phone, rec);
        }
        self.after_commit(
            reply,
            Ok(CodeChecked {
                user,
                locked_until_ms,
            }),
        );
    }

    /// The record of `device`'s user, if `device` is its primary device.
    fn primary_user(&mut self, device: DeviceKey) -> Result<UserRecord, RouteError> {
        let rec = self
            .user(device.user)?
            .cloned()
            .ok_or(RouteError::Unauthenticated)?;
        if rec
            .devices
            .iter()
            .any(|d| d.device_id == device.device && d.primary)
        {
            Ok(rec)
        } else {
            Err(RouteError::NotPrimary)
        }
    }

    fn set_pin(&mut self, device: DeviceKey, pin_hash: String, reply: Reply<bool>) {
        let mut rec = match self.primary_user(device) {
            Ok(r) => r,
            Err(e) => return reply_now(reply, Err(e)),
        };
        let enabled = !pin_hash.is_empty();
        rec.pin_hash = pin_hash;
        self.ops.push(Op::PutUser(rec.clone()));
        self.users.insert(device.user, rec);
        self.after_commit(reply, Ok(enabled));
    }

    /// Uses up a right code (after the PIN, if any, was checked) and returns
    /// the phone's account, created if new.
    fn verify_code(&mut self, phone: String, code: &str, reply: Reply<UserId>) {
        let now = now_ms();
        // Reached only once the PIN, if any, was right: a lock set by that
        // same attempt (the last allowed one) does not apply.
        let mut rec = match self.right_code(&phone, code, now, false) {
            Ok(r) => r,
            Err(e) => return self.after_commit(reply, Err(e)),
        };
        // Right code: consume it (the request history stays for the limit).
        rec.code_hash.clear();
        rec.wrong_attempts = 0;
        rec.pin_attempts = 0;
        rec.pin_locked_until_ms = 0;
        self.stage_code(&phone, rec);
        let user = match self.phone_user(&phone) {
            Ok(Some(u)) => u,
            Ok(None) => match self.allocate_user_id() {
                Ok(u) => {
                    self.staged_phones.insert(phone.clone(), u);
                    self.ops.push(Op::PutPhone { phone, user: u });
                    u
                }
                Err(e) => return reply_now(reply, Err(e.into())),
            },
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        self.after_commit(reply, Ok(user));
    }

    /// A random, unused, non-zero user id (ids are not sequential, so they
    /// reveal nothing about the number of users).
    fn allocate_user_id(&self) -> Result<UserId, StoreError> {
        loop {
            let id: u64 = rand::random();
            if id != 0 && self.store.user(id)?.is_none() {
                return Ok(id);
            }
        }
    }

    fn register_device(&mut self, user: UserId, phone: String, reply: Reply<Registered>) {
        let now = now_ms();
        let mut rec = match self.user(user) {
            Ok(Some(r)) => r.clone(),
            Ok(None) => UserRecord {
                user_id: user,
                phone: phone.clone(),
                devices: Vec::new(),
                next_device_id: 1,
                created_ms: now,
                ..Default::default()
            },
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        rec.phone = phone;
        // Re-registering the phone number starts the account's devices over,
        // as on WhatsApp: every previous device (primary and linked) is
        // revoked, and the new primary brings a new identity.
        let revoked: Vec<u32> = rec.devices.iter().map(|d| d.device_id).collect();
        rec.devices.clear();
        rec.link_code.clear();
        let device_id = rec.next_device_id.max(1);
        rec.next_device_id = device_id + 1;
        let credential = accounts::new_credential();
        rec.devices.push(DeviceRecord {
            device_id,
            credential_hash: accounts::credential_hash(&credential),
            created_ms: now,
            primary: true,
        });
        rec.devices.sort_by_key(|d| d.device_id);
        // The messages waiting for the replaced devices will never reach
        // them: their senders are told, durably, and may resend.
        if let Err(e) = self.undelivered(user, &revoked) {
            return reply_now(reply, Err(e.into()));
        }
        self.revoke(user, &revoked);
        self.ops.push(Op::PutUser(rec.clone()));
        self.users.insert(user, rec);
        self.after_commit(
            reply,
            Ok(Registered {
                user,
                device: device_id,
                credential,
            }),
        );
    }

    fn authenticate(
        &mut self,
        device: DeviceKey,
        credential: &[u8],
        link: ConnLink,
        reply: Reply<AuthInfo>,
    ) {
        let (phone, primary, devices) = match self.user(device.user) {
            Ok(Some(u)) => {
                let found = u.devices.iter().find(|d| {
                    d.device_id == device.device
                        && accounts::hashes_equal(
                            &accounts::credential_hash(credential),
                            &d.credential_hash,
                        )
                });
                let devices = u.devices.iter().map(|d| d.device_id).collect();
                match found {
                    Some(d) => (u.phone.clone(), d.primary, devices),
                    None => return reply_now(reply, Err(RouteError::Unauthenticated)),
                }
            }
            Ok(None) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let (has_keys, one_time_keys) = match self.device_keys(device) {
            Ok(Some(k)) => (k.identity.is_some(), k.one_time_keys),
            Ok(None) => (false, 0),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let Some(old) = self.online.remove(&device) {
            old.kick(KickReason::Replaced);
        }
        self.online.insert(
            device,
            Online {
                conn_id: link.conn_id,
                push: link.push,
                drain: Drain::Draining {
                    cursor: 0,
                    inflight: FastSet::default(),
                },
            },
        );
        reply_now(
            reply,
            Ok(AuthInfo {
                phone,
                primary,
                has_keys,
                one_time_keys,
                devices,
            }),
        );
        self.drain_next(device);
    }

    // ------------------------------------------------------------ messages

    fn send(&mut self, req: SendRequest) -> Answer {
        let key = DedupKey {
            to_user: req.to_user,
            from: req.from,
            client_msg_id: req.client_msg_id.clone(),
        };
        if let Some(duplicate) = self.answer_duplicate(&key, req.first_attempt) {
            return duplicate;
        }
        let order = (req.from, req.to_user, Part::Peer);
        if let Err(e) = self.holds.check(order, &req.client_msg_id, now_ms()) {
            return Answer::now(Err(e));
        }
        // A note to self goes to the sender's other devices.
        let to_self = req.to_user == req.from.user;
        let checked = match self.user(req.to_user) {
            Ok(Some(u)) => check_devices(
                req.to_user,
                u.devices
                    .iter()
                    .map(|d| d.device_id)
                    .filter(|d| !to_self || *d != req.from.device),
                &req.payloads,
            ),
            Ok(None) => Err(RouteError::UnknownUser),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = checked {
            return Answer::now(Err(e));
        }
        self.store_send(&req, req.to_user, key, true)
    }

    /// A send whose sender lives on this shard too: both parts in this
    /// batch, one answer once both are durable.
    fn send_with_copies(&mut self, req: SendRequest, copies: SendRequest) -> Answer {
        // The usual case: a sender with one device and nothing for itself.
        // Its part would be answered at once with nothing stored, so the
        // answer is the recipient's part's.
        if copies.payloads.is_empty() && self.sole_device(copies.from) {
            return self.send(req);
        }
        let peer = self.send(req);
        let own = self.send_self(copies);
        Answer {
            result: super::joint_answer(peer.result, Some(own.result)),
            after_commit: peer.after_commit || own.after_commit,
        }
    }

    /// The sender's copies of a send for its other devices; `req.to_user`
    /// is the conversation peer.
    fn send_self(&mut self, req: SendRequest) -> Answer {
        let me = req.from.user;
        let (alone, checked) = match self.user(me) {
            Ok(Some(u)) => {
                let mine = u
                    .devices
                    .iter()
                    .map(|d| d.device_id)
                    .filter(|d| *d != req.from.device);
                (
                    mine.clone().next().is_none(),
                    check_devices(me, mine, &req.payloads),
                )
            }
            // The sender's own account vanished (re-registered meanwhile).
            Ok(None) => return Answer::now(Err(RouteError::Unauthenticated)),
            Err(e) => return Answer::now(Err(e.into())),
        };
        if alone && req.payloads.is_empty() {
            // A single-device user: nothing to store, so nothing to
            // deduplicate either (the recipient's part is the record).
            return Answer::now(Ok(SendAccepted {
                server_ts_ms: now_ms(),
                duplicate: false,
            }));
        }
        let key = DedupKey {
            to_user: me,
            from: req.from,
            client_msg_id: req.client_msg_id.clone(),
        };
        if let Some(duplicate) = self.answer_duplicate(&key, req.first_attempt) {
            return duplicate;
        }
        let order = (req.from, req.to_user, Part::Own);
        if let Err(e) = self.holds.check(order, &req.client_msg_id, now_ms()) {
            return Answer::now(Err(e));
        }
        if let Err(e) = checked {
            return Answer::now(Err(e));
        }
        self.store_send(&req, me, key, false)
    }

    /// The answer to a retry of an accepted send (after the commit if the
    /// original is in this batch); `None` when the send is new. A
    /// `first_attempt` is looked for in this batch only: the store lookup is
    /// a memtable search, about a tenth of the shard's time per message.
    fn answer_duplicate(&mut self, key: &DedupKey, first_attempt: bool) -> Option<Answer> {
        let (server_ts_ms, staged) = if let Some(ts) = self.staged_dedup.get(key) {
            (*ts, true)
        } else if first_attempt {
            return None;
        } else {
            match self.store.dedup(key) {
                Ok(Some(rec)) if !rec.voided => (rec.server_ts_ms, false),
                Ok(Some(_)) => return None,
                Ok(None) => return None,
                Err(e) => return Some(Answer::now(Err(e.into()))),
            }
        };
        Some(Answer {
            result: Ok(SendAccepted {
                server_ts_ms,
                duplicate: true,
            }),
            after_commit: staged,
        })
    }

    /// Stages a validated send: one entry per payload for the devices of
    /// `owner` and the dedup record; the ✓ once committed.
    fn store_send(
        &mut self,
        req: &SendRequest,
        owner: UserId,
        key: DedupKey,
        count_in: bool,
    ) -> Answer {
        let now = now_ms();
        // Check every queue's quota, then reserve every seq (both
        // fallible), then stage (infallible), so a refusal or a storage
        // error never leaves half a send staged.
        let overhead =
            ENTRY_OVERHEAD_BYTES + (req.from_phone.len() + req.client_msg_id.len()) as u64;
        if let Err(e) = self.check_quota(req.payloads.iter().map(|p| {
            (
                DeviceKey {
                    user: owner,
                    device: p.device_id,
                },
                p.payload.len() as u64 + overhead,
            )
        })) {
            self.holds.hold(
                order_key(req, owner),
                &req.client_msg_id,
                HeldBy::QueueFull,
                QUEUE_FULL_RETRY_AFTER_MS,
                now,
            );
            return Answer::now(Err(e));
        }
        let mut seqs = Vec::with_capacity(req.payloads.len());
        for p in &req.payloads {
            let device = DeviceKey {
                user: owner,
                device: p.device_id,
            };
            match self.next_seq(device) {
                Ok(seq) => seqs.push((device, seq)),
                Err(e) => return Answer::now(Err(e.into())),
            }
        }
        for ((device, seq), p) in seqs.into_iter().zip(&req.payloads) {
            let body = pb::queue_entry::Body::Message(pb::Message {
                from_user: req.from.user,
                from_device: req.from.device,
                from_phone: req.from_phone.clone(),
                client_msg_id: req.client_msg_id.clone(),
                payload: p.payload.clone(),
                to_user: req.to_user,
            });
            self.stage_entry(device, seq, now, body);
        }
        self.batch_sends
            .push((order_key(req, owner), req.client_msg_id.clone()));
        self.staged_dedup.insert(key.clone(), now);
        self.ops.push(Op::PutDedup {
            key,
            record: DedupRecord {
                server_ts_ms: now,
                accepted_ms: now,
                voided: false,
            },
        });
        if count_in {
            self.messages_in += 1;
        }
        Answer {
            result: Ok(SendAccepted {
                server_ts_ms: now,
                duplicate: false,
            }),
            after_commit: true,
        }
    }

    /// Gives a send's answer to its connection: now, or once the batch
    /// commits (then a failed commit turns a ✓ into the storage error).
    fn answer_send(&mut self, reply: SendReply, from: DeviceKey, answer: Answer) {
        match reply {
            SendReply::Ticket(reply) if answer.after_commit => {
                self.after_commit(reply, answer.result);
            }
            SendReply::Ticket(reply) => reply_now(reply, answer.result),
            SendReply::Push { to, submitted } => {
                let pending = PendingAnswer {
                    device: from,
                    to,
                    submitted,
                    result: answer.result,
                };
                if answer.after_commit {
                    self.send_answers.push(pending);
                } else {
                    self.push_answer(pending);
                }
            }
        }
    }

    /// Pushes a send's answer to the connection that submitted it, if that
    /// connection is still the device's registered one.
    fn push_answer(&mut self, answer: PendingAnswer) {
        if answer.result.is_ok() {
            self.metrics
                .send_ack_seconds
                .record(answer.submitted.elapsed().as_secs_f64());
        }
        if self
            .online
            .get(&answer.device)
            .is_some_and(|o| o.conn_id == answer.to.conn_id)
        {
            self.push(
                answer.device,
                Push::SendAnswer {
                    frame: answer.to.frame,
                    result: answer.result.map_err(Box::new),
                },
            );
        }
    }

    // ------------------------------------------------------------ keys

    fn device_keys(&mut self, device: DeviceKey) -> Result<Option<&DeviceKeysRecord>, StoreError> {
        if !self.keys.contains_key(&device) {
            match self.store.device_keys(device)? {
                Some(rec) => {
                    self.keys.insert(device, rec);
                }
                None => return Ok(None),
            }
        }
        Ok(self.keys.get(&device))
    }

    fn stage_device_keys(&mut self, device: DeviceKey, record: DeviceKeysRecord) {
        self.keys.insert(device, record.clone());
        self.ops.push(Op::PutDeviceKeys { device, record });
    }

    /// True if `device` is a current device of its user.
    fn is_current(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .user(device.user)?
            .is_some_and(|u| u.devices.iter().any(|d| d.device_id == device.device)))
    }

    fn upload_keys(&mut self, device: DeviceKey, up: pb::UploadKeys, reply: Reply<u32>) {
        match self.is_current(device) {
            Ok(true) => {}
            Ok(false) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        }
        let mut rec = match self.device_keys(device) {
            Ok(r) => r.cloned().unwrap_or_default(),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let (Some(old), Some(new)) = (&rec.identity, &up.identity)
            && (old.curve25519 != new.curve25519 || old.ed25519 != new.ed25519)
        {
            return reply_now(
                reply,
                Err(RouteError::InvalidKeys(
                    "identity keys differ from the ones this device published; a new identity needs a new device".into(),
                )),
            );
        }
        let room = keys::MAX_STOCK_ONE_TIME_KEYS.saturating_sub(rec.one_time_keys);
        if up.one_time_keys.len() > room as usize {
            return reply_now(
                reply,
                Err(RouteError::InvalidKeys(format!(
                    "the stock is limited to {} one-time keys; {room} more accepted",
                    keys::MAX_STOCK_ONE_TIME_KEYS
                ))),
            );
        }
        if rec.identity.is_none() {
            rec.identity = up.identity;
        }
        if let Some(fb) = up.fallback_key {
            rec.fallback = Some(fb);
        }
        for key in up.one_time_keys {
            let index = rec.next_index;
            rec.next_index += 1;
            rec.one_time_keys += 1;
            self.ops.push(Op::PutOneTimeKey {
                device,
                index,
                key: key.encode_to_vec().into(),
            });
        }
        let remaining = rec.one_time_keys;
        self.stage_device_keys(device, rec);
        self.after_commit(reply, Ok(remaining));
    }

    fn fetch_bundles(
        &mut self,
        requester: DeviceKey,
        user: UserId,
        identities_only: bool,
        reply: Reply<Vec<pb::DeviceBundle>>,
    ) {
        let devices: Vec<u32> = match self.user(user) {
            Ok(Some(u)) => u
                .devices
                .iter()
                .map(|d| d.device_id)
                .filter(|d| !(user == requester.user && *d == requester.device))
                .collect(),
            Ok(None) => return reply_now(reply, Err(RouteError::UnknownUser)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut bundles = Vec::with_capacity(devices.len());
        for device_id in devices {
            let device = DeviceKey {
                user,
                device: device_id,
            };
            let bundle = if identities_only {
                self.device_keys(device).map(|rec| pb::DeviceBundle {
                    device_id,
                    identity: rec.and_then(|r| r.identity.clone()),
                    key: None,
                })
            } else {
                self.take_bundle(device)
            };
            match bundle {
                Ok(b) => bundles.push(b),
                Err(e) => return reply_now(reply, Err(e.into())),
            }
        }
        self.after_commit(reply, Ok(bundles));
    }

    /// One device's bundle, consuming a one-time key (or falling back).
    fn take_bundle(&mut self, device: DeviceKey) -> Result<pb::DeviceBundle, StoreError> {
        let mut bundle = pb::DeviceBundle {
            device_id: device.device,
            ..Default::default()
        };
        let Some(mut rec) = self.device_keys(device)?.cloned() else {
            return Ok(bundle);
        };
        if rec.identity.is_none() {
            return Ok(bundle);
        }
        bundle.identity = rec.identity.clone();
        // Past the device's hourly budget of one-time keys, fetchers get its
        // fallback key: whoever fetches in a loop (from any number of
        // accounts) cannot drain the stock, and nobody is refused a session.
        let within_budget = self
            .one_time_key_budget
            .take(&device, Instant::now())
            .is_ok();
        if !within_budget {
            Limit::OneTimeKeys.tripped();
        }
        let one_time_key = if within_budget {
            self.store.first_one_time_key(device, rec.consumed_below)?
        } else {
            None
        };
        match one_time_key {
            Some((index, bytes)) => {
                let key = pb::SignedKey::decode(bytes).map_err(|e| StoreError::Corrupt {
                    what: "one-time key",
                    detail: e.to_string(),
                })?;
                bundle.key = Some(pb::device_bundle::Key::OneTimeKey(key));
                self.ops.push(Op::DeleteOneTimeKey { device, index });
                rec.consumed_below = index + 1;
                rec.one_time_keys = rec.one_time_keys.saturating_sub(1);
                if rec.one_time_keys < keys::LOW_STOCK_ONE_TIME_KEYS {
                    self.pushes
                        .push((device, Push::Notice(Notice::KeysLow(rec.one_time_keys))));
                }
                self.stage_device_keys(device, rec);
            }
            None => {
                bundle.key = rec
                    .fallback
                    .clone()
                    .map(pb::device_bundle::Key::FallbackKey);
                if within_budget {
                    self.pushes.push((device, Push::Notice(Notice::KeysLow(0))));
                }
            }
        }
        Ok(bundle)
    }

    // ------------------------------------------------------------ linked devices

    fn create_link_code(&mut self, device: DeviceKey, reply: Reply<(String, u64)>) {
        let now = now_ms();
        let mut rec = match self.primary_user(device) {
            Ok(r) => r,
            Err(e) => return reply_now(reply, Err(e)),
        };
        if rec.devices.len() > accounts::MAX_LINKED_DEVICES {
            return reply_now(reply, Err(RouteError::TooManyDevices));
        }
        if let Err(retry_after_ms) =
            limits::take_from_log(&mut rec.link_codes_created_ms, now, LINK_CODE_RATE)
        {
            return reply_now(reply, Err(Limit::LinkCodes.refuse(retry_after_ms).into()));
        }
        let code = accounts::new_link_code();
        let Some(canonical) = accounts::normalize_link_code(&code) else {
            return reply_now(reply, Err(RouteError::LinkCodeInvalid));
        };
        rec.link_code = canonical;
        self.ops.push(Op::PutUser(rec.clone()));
        self.users.insert(device.user, rec);
        self.after_commit(reply, Ok((code, now + accounts::LINK_CODE_TTL_MS)));
    }

    fn take_link_code(&mut self, code: String, reply: Reply<UserId>) {
        match self.store.link_code(&code) {
            Ok(Some(rec)) if rec.expires_ms > now_ms() => {
                self.ops.push(Op::DeleteLinkCode(code));
                self.after_commit(reply, Ok(rec.user_id));
            }
            Ok(_) => reply_now(reply, Err(RouteError::LinkCodeInvalid)),
            Err(e) => reply_now(reply, Err(e.into())),
        }
    }

    fn add_linked_device(&mut self, user: UserId, code: &str, reply: Reply<Registered>) {
        let now = now_ms();
        let mut rec = match self.user(user) {
            Ok(Some(u)) => u.clone(),
            Ok(None) => return reply_now(reply, Err(RouteError::LinkCodeInvalid)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        // Only the newest code of the account works, and only once.
        if rec.link_code.is_empty() || rec.link_code != code {
            return reply_now(reply, Err(RouteError::LinkCodeInvalid));
        }
        if rec.devices.len() > accounts::MAX_LINKED_DEVICES {
            return reply_now(reply, Err(RouteError::TooManyDevices));
        }
        rec.link_code.clear();
        let device_id = rec.next_device_id.max(1);
        rec.next_device_id = device_id + 1;
        let credential = accounts::new_credential();
        rec.devices.push(DeviceRecord {
            device_id,
            credential_hash: accounts::credential_hash(&credential),
            created_ms: now,
            primary: false,
        });
        rec.devices.sort_by_key(|d| d.device_id);
        if let Err(e) = self.announce_devices(&rec, Some(device_id)) {
            return reply_now(reply, Err(e.into()));
        }
        self.ops.push(Op::PutUser(rec.clone()));
        self.users.insert(user, rec);
        self.after_commit(
            reply,
            Ok(Registered {
                user,
                device: device_id,
                credential,
            }),
        );
    }

    fn list_devices(&mut self, user: UserId, reply: Reply<Vec<pb::DeviceInfo>>) {
        let devices: Vec<(u32, bool, u64)> = match self.user(user) {
            Ok(Some(u)) => u
                .devices
                .iter()
                .map(|d| (d.device_id, d.primary, d.created_ms))
                .collect(),
            Ok(None) => return reply_now(reply, Err(RouteError::UnknownUser)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut out = Vec::with_capacity(devices.len());
        for (device_id, primary, created_ms) in devices {
            let identity = match self.device_keys(DeviceKey {
                user,
                device: device_id,
            }) {
                Ok(k) => k.and_then(|k| k.identity.clone()),
                Err(e) => return reply_now(reply, Err(e.into())),
            };
            out.push(pb::DeviceInfo {
                device_id,
                primary,
                created_ms,
                identity,
            });
        }
        self.after_commit(reply, Ok(out));
    }

    fn revoke_device(&mut self, by: DeviceKey, target: DeviceId, reply: Reply<()>) {
        let mut rec = match self.user(by.user) {
            Ok(Some(u)) => u.clone(),
            Ok(None) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if !rec
            .devices
            .iter()
            .any(|d| d.device_id == by.device && d.primary)
        {
            return reply_now(reply, Err(RouteError::NotPrimary));
        }
        if target == by.device {
            return reply_now(
                reply,
                Err(RouteError::BadRequest(
                    "the primary device cannot revoke itself; register the phone number again instead".into(),
                )),
            );
        }
        if !rec.devices.iter().any(|d| d.device_id == target) {
            return reply_now(
                reply,
                Err(RouteError::BadRequest(format!("no device {target}"))),
            );
        }
        rec.devices.retain(|d| d.device_id != target);
        if let Err(e) = self.announce_devices(&rec, None) {
            return reply_now(reply, Err(e.into()));
        }
        self.revoke(by.user, &[target]);
        self.ops.push(Op::PutUser(rec.clone()));
        self.users.insert(by.user, rec);
        self.after_commit(reply, Ok(()));
    }

    /// Stages the removal of devices: queue, keys, connection.
    fn revoke(&mut self, user: UserId, devices: &[DeviceId]) {
        for &d in devices {
            let device = DeviceKey { user, device: d };
            self.ops.push(Op::DropQueue(device));
            self.queue_usage.remove(&device);
            self.batch_enqueued.remove(&device);
            self.ops.push(Op::DropDeviceKeys(device));
            self.last_seq.remove(&device);
            self.keys.remove(&device);
            self.kicks.push((device, KickReason::Revoked));
        }
    }

    /// Queues `DevicesChanged` for every device of `rec` except `skip`.
    fn announce_devices(
        &mut self,
        rec: &UserRecord,
        skip: Option<DeviceId>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let ids: Vec<u32> = rec.devices.iter().map(|d| d.device_id).collect();
        let mut seqs = Vec::new();
        for &d in &ids {
            if Some(d) == skip {
                continue;
            }
            let device = DeviceKey {
                user: rec.user_id,
                device: d,
            };
            seqs.push((device, self.next_seq(device)?));
        }
        for (device, seq) in seqs {
            let body = pb::queue_entry::Body::DevicesChanged(pb::DevicesChanged {
                user_id: rec.user_id,
                devices: ids.clone(),
            });
            self.stage_entry(device, seq, now, body);
        }
        Ok(())
    }

    fn enqueue_receipt(
        &mut self,
        to_user: UserId,
        receipt: pb::Receipt,
        must_exist: bool,
        reply: Reply<()>,
    ) {
        match self.stage_receipt(to_user, &receipt, must_exist) {
            Ok(()) => self.after_commit(reply, Ok(())),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    /// Stages `receipt` in the queue of every device of `to_user`. An
    /// unknown user is an error with `must_exist`, else nothing to do (the
    /// account is gone).
    fn stage_receipt(
        &mut self,
        to_user: UserId,
        receipt: &pb::Receipt,
        must_exist: bool,
    ) -> Result<(), RouteError> {
        let now = now_ms();
        let devices: Vec<u32> = match self.user(to_user)? {
            Some(u) => u.devices.iter().map(|d| d.device_id).collect(),
            None if must_exist => return Err(RouteError::UnknownUser),
            None => return Ok(()),
        };
        // A client's READ receipt is held to the quota of the queues it
        // goes to, like a message. Delivery receipts (made by the server
        // from acks) are never refused: the acked entries go only once
        // their receipt is stored.
        if must_exist {
            let size = ENTRY_OVERHEAD_BYTES
                + receipt
                    .client_msg_ids
                    .iter()
                    .map(|m| m.len() as u64 + 2)
                    .sum::<u64>();
            self.check_quota(devices.iter().map(|&d| {
                (
                    DeviceKey {
                        user: to_user,
                        device: d,
                    },
                    size,
                )
            }))?;
        }
        let mut seqs = Vec::with_capacity(devices.len());
        for d in devices {
            let device = DeviceKey {
                user: to_user,
                device: d,
            };
            seqs.push((device, self.next_seq(device)?));
        }
        for (device, seq) in seqs {
            self.stage_entry(
                device,
                seq,
                now,
                pb::queue_entry::Body::Receipt(receipt.clone()),
            );
        }
        Ok(())
    }

    // ------------------------------------------------------------ delivery

    fn acked(&mut self, device: DeviceKey, conn_id: u64, seqs: &[u64]) {
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        if online.conn_id != conn_id {
            return;
        }
        if let Drain::Draining { inflight, .. } = &mut online.drain {
            for s in seqs {
                inflight.remove(s);
            }
            if inflight.is_empty() {
                self.drain_advanced = true;
                self.drain_next(device);
            }
        }
    }

    /// Pushes the next page of a draining device's queue, or `UpToDate`.
    fn drain_next(&mut self, device: DeviceKey) {
        let cursor = match self.online.get(&device) {
            Some(Online {
                drain: Drain::Draining { cursor, inflight },
                ..
            }) if inflight.is_empty() => *cursor,
            _ => return,
        };
        let cutoff = now_ms().saturating_sub(self.cfg.queue_ttl_ms);
        let mut cursor = cursor;
        let mut page = Vec::new();
        // Skip pages that held only expired entries (they are deleted in this
        // batch) until a live entry or the end of the queue: declaring the
        // device up to date early would let newer entries overtake older ones.
        loop {
            let stored = match self.store.read_queue(device, cursor, self.cfg.drain_batch) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, ?device, "queue read failed; closing connection");
                    if let Some(online) = self.online.remove(&device) {
                        online.kick(KickReason::Unavailable);
                    }
                    return;
                }
            };
            let Some(last) = stored.last() else {
                break;
            };
            cursor = last.seq;
            for s in stored {
                let size = s.bytes.len() as u64;
                match pb::QueueEntry::decode(s.bytes) {
                    Ok(e) if e.server_ts_ms >= cutoff => page.push(e),
                    Ok(_) => self.stage_dequeue(device, s.seq, Some(size)),
                    Err(e) => {
                        tracing::error!(error = %e, ?device, seq = s.seq, "corrupt queue entry dropped");
                        self.stage_dequeue(device, s.seq, Some(size));
                    }
                }
            }
            if !page.is_empty() {
                break;
            }
        }
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        if page.is_empty() {
            online.drain = Drain::Live;
            self.push(device, Push::Notice(Notice::UpToDate));
        } else {
            online.drain = Drain::Draining {
                cursor,
                inflight: page.iter().map(|e| e.seq).collect(),
            };
            self.push(device, Push::Deliver(page.into_boxed_slice()));
        }
    }

    fn push_live(&mut self, device: DeviceKey, entries: Vec<pb::QueueEntry>) {
        if matches!(
            self.online.get(&device),
            Some(Online {
                drain: Drain::Live,
                ..
            })
        ) {
            self.push(device, Push::Deliver(entries.into_boxed_slice()));
        }
    }

    fn push(&mut self, device: DeviceKey, push: Push) {
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        match online.push.try_send(push) {
            Ok(()) => {}
            Err(super::TrySendError::Full) => {
                tracing::info!(?device, "push queue full; disconnecting slow reader");
                metrics::counter!(tm::SLOW_READER_DISCONNECTS).increment(1);
                if let Some(online) = self.online.remove(&device) {
                    online.kick(KickReason::SlowReader);
                }
            }
            Err(super::TrySendError::Gone) => {
                self.online.remove(&device);
            }
        }
    }

    // ------------------------------------------------------------ mail

    /// Loads the mail an earlier run left undelivered, and posts it.
    fn load_mail(&mut self) {
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

    fn tick(&mut self) {
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
    /// user; confirmed once committed. A user gone meanwhile needs nothing.
    fn receive_mail(&mut self, from: usize, id: MailId, record: MailRecord) {
        // Applied before (its confirmation was lost, or the sender
        // restarted first): confirm again, queue nothing.
        let applied = DedupKey {
            to_user: record.to_user,
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
            super::mail::confirm(&self.peers, from, id);
            return;
        }
        let devices: Vec<u32> = match self.user(record.to_user) {
            Ok(Some(u)) => u.devices.iter().map(|d| d.device_id).collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                // Not confirmed: the sender posts it again later.
                tracing::warn!(error = %e, "cannot apply shard mail now");
                return;
            }
        };
        let body = record.entry.and_then(|e| e.body);
        let mut seqs = Vec::with_capacity(devices.len());
        if body.is_some() {
            for d in devices {
                let device = DeviceKey {
                    user: record.to_user,
                    device: d,
                };
                match self.next_seq(device) {
                    Ok(seq) => seqs.push((device, seq)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot apply shard mail now");
                        return;
                    }
                }
            }
        }
        let now = now_ms();
        if let Some(body) = body {
            for (device, seq) in seqs {
                self.stage_entry(device, seq, now, body.clone());
            }
        }
        self.staged_dedup.insert(applied.clone(), now);
        self.ops.push(Op::PutDedup {
            key: applied,
            record: DedupRecord {
                server_ts_ms: now,
                accepted_ms: now,
                voided: false,
            },
        });
        self.mail.applied(from, id);
    }

    /// The messages from other users waiting in the queues of `devices`
    /// (about to be dropped), as `Undelivered` mail to each sender, and the
    /// voiding of their dedup records so that resends are stored. Reads
    /// each queue whole: bounded by the queue quota, and re-registration
    /// by the code limits.
    fn undelivered(&mut self, user: UserId, devices: &[DeviceId]) -> Result<(), StoreError> {
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
            if let Op::Enqueue { device, entry } = op
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
                    to_user: user,
                    from: sender,
                    client_msg_id: id.clone(),
                };
                self.staged_dedup.remove(&key);
                self.ops.push(Op::PutDedup {
                    key,
                    record: DedupRecord {
                        server_ts_ms: 0,
                        accepted_ms: now,
                        voided: true,
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
                };
                let op = self.mail.stage(user, record, now);
                self.ops.push(op);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ expiry

    fn sweep(&mut self) {
        let now = now_ms();
        // Dedup records expire in whole day keyspaces shared by all
        // shards; one shard drops them.
        if self.id == 0 {
            match self
                .store
                .expire_dedup(now.saturating_sub(self.cfg.dedup_window_ms))
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(buckets = n, "expired dedup records dropped"),
                Err(e) => tracing::warn!(error = %e, "dedup sweep failed"),
            }
        }
        match self
            .store
            .expired_entries(now.saturating_sub(self.cfg.queue_ttl_ms), SWEEP_LIMIT)
        {
            Ok(list) => {
                for (device, seq) in list {
                    if self.owns_user(device.user) {
                        self.stage_dequeue(device, seq, None);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "queue expiry sweep failed"),
        }
        match self.store.expired_link_codes(now, SWEEP_LIMIT) {
            Ok(codes) => {
                for code in codes {
                    if shard_of_phone(&code, self.shards) == self.id {
                        self.ops.push(Op::DeleteLinkCode(code));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "link code sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(devices: &[u32]) -> Vec<pb::DevicePayload> {
        devices
            .iter()
            .map(|&device_id| pb::DevicePayload {
                device_id,
                ..Default::default()
            })
            .collect()
    }

    fn check(expected: &[u32], addressed: &[u32]) -> Result<(), RouteError> {
        check_devices(7, expected.iter().copied(), &payloads(addressed))
    }

    #[test]
    fn devices_match_in_any_order() {
        assert!(check(&[1], &[1]).is_ok());
        assert!(check(&[1, 2, 3], &[3, 1, 2]).is_ok());
        assert!(check(&[], &[]).is_ok());
    }

    #[test]
    fn a_mismatch_names_the_missing_and_the_stale_devices() {
        let mismatch = |expected: &[u32], addressed: &[u32]| match check(expected, addressed) {
            Err(RouteError::DeviceMismatch {
                user,
                missing,
                stale,
            }) => (user, missing, stale),
            other => panic!("{expected:?} vs {addressed:?}: {other:?}"),
        };
        assert_eq!(mismatch(&[1, 2], &[1]), (7, vec![2], vec![]));
        assert_eq!(mismatch(&[1], &[1, 4]), (7, vec![], vec![4]));
        assert_eq!(mismatch(&[1, 2], &[1, 3]), (7, vec![2], vec![3]));
        // As many payloads as devices, but one device twice.
        assert_eq!(mismatch(&[1, 2], &[1, 1]), (7, vec![2], vec![]));
    }
}
