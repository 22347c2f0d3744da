//! The client task: owns the connection, the outbox queue and the
//! de-duplication state; nothing else touches them, so there are no locks.
//!
//! Its life is a loop of three phases: wait (backoff), connect +
//! authenticate, then drive the link until it drops. In every phase it keeps
//! serving handle commands, so sends made while offline join the outbox and
//! `close()` is prompt.
//!
//! While driving the link, reads and writes never wait for each other:
//! sealed bytes go to a small writer task through a bounded channel, and the
//! task stops taking new work while too many bytes wait to be written.
//!
//! A slow application never stops the reading: an app that awaits a send
//! inside its event loop needs the ✓ to be read while its events channel is
//! full. Instead, pushed queue entries are set aside (`deferred`) and turned
//! into events only as the application takes them; the server bounds what
//! can pile up there (it never has more than `max_unacked` entries
//! unacknowledged on one connection).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use switchboard_proto::pb::{self, client_frame, server_frame};
use switchboard_proto::{Session, limits};
use tokio::sync::mpsc::error::{SendError, TryRecvError};
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, info, warn};

mod groups;

use super::{Command, Device, Event, Reply, Sent, Shared};
use crate::connection::{Connection, Parts, goodbye_reason, unexpected};
use crate::crypto::envelope::{KIND_MESSAGE, Plaintext};
use crate::crypto::group::KIND_SENDER_KEY;
use crate::crypto::{BundleOutcome, Crypto, Decrypted, DeviceChange, ONE_TIME_KEY_LOW};
use crate::error::{
    CloseReason, CryptoError, Error, ProtocolError, ServerError, StorageError, UsageError,
};
use crate::ids::{self, DeviceId, GroupId, Seq, UserId};
use crate::outbox::{Content, Next, PendingSend, Queue, Retained, State, Store};
use crate::recent::Recent;
use crate::register::Credentials;
use crate::store::StateFile;
use crate::transport::{Reader, Writer};
use crate::{ClientConfig, ErrorCode, ReceiptKind};

/// Stop taking new commands and writing new requests while this many bytes
/// wait to be written: a few max-size frames, so the link stays busy without
/// buffering a backlog the kernel could not take anyway.
const WRITE_HIGH_WATER_BYTES: usize = 1024 * 1024;

/// Stop reading (which produces acks) past this many unwritten bytes, so a
/// stalled writer bounds memory.
const READ_PAUSE_BYTES: usize = 4 * WRITE_HIGH_WATER_BYTES;

/// Sealed chunks queued for the writer task. The task holds the rest in its
/// own buffer (see `WRITE_HIGH_WATER_BYTES`); a few chunks keep the writer
/// busy while the task seals the next.
const WRITER_QUEUE_CHUNKS: usize = 4;

/// Commands taken per wake-up, so a flood of sends is persisted in batches
/// (one fsync'd directory per batch) without starving reads.
const COMMAND_BATCH: usize = 64;

/// Lookups and read receipts waiting for a connection; past this, callers get
/// `Error::Busy` rather than growing an unbounded backlog.
const MAX_PENDING_REQUESTS: usize = 1024;

/// Acks waiting for a connection. Past this the oldest are forgotten: the
/// server redelivers them and the client acks the redelivery (it remembers
/// what the application acked in `app_acked`).
const MAX_PENDING_ACKS: usize = 10_000;

/// Acked seqs remembered for re-acking redeliveries (message ids for
/// de-duplication are kept, persisted, by [`Crypto`]): more than a server
/// batch many times over.
const DEDUP_CAPACITY: usize = crate::crypto::DEDUP_CAPACITY;

/// Key bundle fetches that may list a device without keys before a send
/// fails with `CryptoError::NoKeys`: a device that just registered or
/// linked uploads its keys within a round trip or two of connecting.
const MAX_KEY_WAITS: u32 = 20;

/// Wait between those fetches (so about 5 s in all).
const KEY_WAIT_DELAY: Duration = Duration::from_millis(250);

/// Pushed queue entries set aside while the application is behind on
/// events. The server never leaves more than `max_unacked` (8192 by
/// default) entries unacknowledged on a connection, so this is not reached
/// against a well-behaved server; past it, reading pauses (the ✓ of a send
/// awaited inside the event loop then waits too).
const MAX_DEFERRED_ENTRIES: usize = 16_384;

/// Users whose device list and phone number are cached.
const DIRECTORY_CAPACITY: usize = 10_000;

/// Shortest wait before retrying a send the server refused as retryable.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Sent messages kept in memory for a resend when there is no outbox
/// directory (with one, `outbox::RETAIN_MAX` are kept on disk).
const RETAINED_IN_MEMORY: usize = 256;

/// Time allowed to flush and close the link gracefully.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed to hand the last events to a slow application at shutdown.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A lookup or read receipt: requests that are not part of the outbox and
/// are re-sent after a reconnect (both are idempotent).
enum Request {
    Lookup {
        phone: String,
        reply: Reply<pb::UserInfo>,
    },
    ReadReceipt {
        to_user: u64,
        group_id: u64,
        client_msg_ids: Vec<String>,
        reply: Reply<()>,
    },
    /// Create, change, get or list groups.
    Group {
        body: client_frame::Body,
        reply: Reply<server_frame::Body>,
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
    FetchKeys {
        user_id: u64,
        /// Only the devices' identity keys (no session made, no one-time
        /// key used up): for safety numbers and noticing device changes.
        identities_only: bool,
        reply: Reply<()>,
    },
}

impl Request {
    fn body(&self) -> client_frame::Body {
        match self {
            Self::Lookup { phone, .. } => client_frame::Body::LookupUser(pb::LookupUser {
                phone: phone.clone(),
            }),
            Self::ReadReceipt {
                to_user,
                group_id,
                client_msg_ids,
                ..
            } => client_frame::Body::SendReceipt(pb::SendReceipt {
                to_user: *to_user,
                kind: ReceiptKind::Read.into(),
                client_msg_ids: client_msg_ids.clone(),
                group_id: *group_id,
            }),
            Self::Group { body, .. } => body.clone(),
            Self::CreateLinkCode { .. } => {
                client_frame::Body::CreateLinkCode(pb::CreateLinkCode {})
            }
            Self::ListDevices { .. } => client_frame::Body::ListDevices(pb::ListDevices {}),
            Self::RevokeDevice { device_id, .. } => {
                client_frame::Body::RevokeDevice(pb::RevokeDevice {
                    device_id: *device_id,
                })
            }
            Self::FetchKeys {
                user_id,
                identities_only,
                ..
            } => client_frame::Body::FetchBundles(pb::FetchBundles {
                user_id: *user_id,
                identities_only: *identities_only,
            }),
        }
    }

    fn expected(&self) -> &'static str {
        match self {
            Self::Lookup { .. } => "UserInfo",
            Self::ReadReceipt { .. } => "ReceiptOk",
            Self::Group { .. } => "GroupInfo or GroupList",
            Self::CreateLinkCode { .. } => "LinkCode",
            Self::ListDevices { .. } => "DeviceList",
            Self::RevokeDevice { .. } => "DeviceRevoked",
            Self::FetchKeys { .. } => "Bundles",
        }
    }

    fn fail(self, error: Error) {
        // A caller that stopped waiting has nothing to be told.
        match self {
            Self::Lookup { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ReadReceipt { reply, .. }
            | Self::RevokeDevice { reply, .. }
            | Self::FetchKeys { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::CreateLinkCode { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::ListDevices { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Group { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What a request id on the current link stands for.
enum InFlight {
    /// A `Send` of this outbox entry.
    Send(u64),
    /// A lookup of this outbox entry's recipient.
    Resolve(u64),
    /// Key bundles of `user` for this outbox entry.
    Fetch { seq: u64, user: u64 },
    /// The members of the group of this outbox entry.
    GroupInfo(u64),
    /// A `SendGroupKeys` for this outbox entry: the key of session
    /// `session_id` of `group` for these users' devices.
    GroupKeys {
        seq: u64,
        group: u64,
        session_id: String,
        parts: Vec<(u64, Vec<u32>)>,
    },
    /// This device's key upload.
    Upload,
    /// A caller's request.
    Request(Request),
    /// A keep-alive.
    Ping,
}

/// A push set aside until the application takes events again, in arrival
/// order.
enum Deferred {
    Entry(pb::QueueEntry),
    UpToDate,
}

/// How a link ended.
enum Down {
    /// Stop the client.
    Stop(CloseReason),
    /// Reconnect, waiting at least `after` (server's hint).
    Retry {
        error: Error,
        after: Option<Duration>,
    },
}

impl Down {
    fn retry(error: impl Into<Error>) -> Self {
        Self::Retry {
            error: error.into(),
            after: None,
        }
    }
}

/// One live, authenticated connection.
struct Link {
    reader: Reader,
    session: Session,
    /// Bytes read and not yet decrypted.
    inbuf: BytesMut,
    /// Sealed bytes not yet handed to the writer task.
    out: BytesMut,
    /// To the writer task; bounded (`WRITER_QUEUE_CHUNKS`): when full, bytes
    /// wait in `out`. Dropping it makes the writer flush and shut down.
    writer_tx: mpsc::Sender<Bytes>,
    writer: JoinHandle<Result<(), Error>>,
    next_id: u32,
    in_flight: HashMap<u32, InFlight>,
    /// Outbox entries in flight (sends and their lookups).
    sends_in_flight: usize,
    last_write: Instant,
    /// Set while a ping waits for any inbound frame.
    pong_deadline: Option<Instant>,
}

impl Link {
    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    fn unwritten(&self) -> usize {
        self.out.len() + self.session.pending_bytes()
    }

    fn has_room(&self) -> bool {
        self.unwritten() < WRITE_HIGH_WATER_BYTES
    }
}

/// Writes what the task hands over; on channel close, shuts the link down.
async fn write_loop(mut writer: Writer, mut rx: mpsc::Receiver<Bytes>) -> Result<(), Error> {
    while let Some(bytes) = rx.recv().await {
        writer.write(bytes).await?;
    }
    writer.shutdown().await
}

/// Connects and authenticates; also returns the server's static key.
async fn connect_and_auth(
    config: &ClientConfig,
    creds: &Credentials,
) -> Result<(Parts, pb::AuthOk, Vec<u8>), Error> {
    let mut conn = Connection::connect(&config.endpoint, &config.connect).await?;
    let key = conn.server_public_key().to_vec();
    let ok = timeout(config.connect.connect_timeout, conn.auth(creds))
        .await
        .map_err(|_| Error::Timeout("authenticating"))??;
    Ok((conn.into_parts(), ok, key))
}

/// Failures after which reconnecting cannot help.
fn fatal(error: &Error) -> Option<CloseReason> {
    match error {
        Error::Server(e)
            if matches!(
                e.code,
                ErrorCode::Unauthenticated | ErrorCode::UnsupportedVersion
            ) =>
        {
            Some(CloseReason::Rejected(e.clone()))
        }
        Error::Closed(CloseReason::Goodbye(e))
            if matches!(e.code, ErrorCode::Replaced | ErrorCode::DeviceRevoked) =>
        {
            Some(CloseReason::Goodbye(e.clone()))
        }
        Error::Protocol(ProtocolError::ServerKeyMismatch { .. }) => {
            Some(CloseReason::ServerKeyMismatch)
        }
        Error::Usage(u) => Some(CloseReason::Fatal(u.to_string())),
        _ => None,
    }
}

/// The server's "wait at least this long" hint in an error.
fn retry_hint(error: &Error) -> Option<Duration> {
    match error {
        Error::Server(e) | Error::Closed(CloseReason::Goodbye(e)) => e.retry_after,
        _ => None,
    }
}

fn storage_error_copy(e: &StorageError) -> StorageError {
    match e {
        StorageError::Io { path, source } => StorageError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        StorageError::Task(why) => StorageError::Task(why.clone()),
    }
}

pub(super) struct Actor {
    config: ClientConfig,
    creds: Credentials,
    shared: Arc<Shared>,
    /// From the handles. Bounded (`command_capacity`): callers wait.
    commands: mpsc::Receiver<Command>,
    /// To the application. Bounded (`event_capacity`); events wait in
    /// `pending_events`, and while that is full pushed entries wait in
    /// `deferred`.
    events: mpsc::Sender<Event>,
    pending_events: VecDeque<Event>,
    /// Pushes of the current link not yet turned into events, because
    /// `pending_events` is full; cleared with the link (the server
    /// redelivers what was not acknowledged).
    deferred: VecDeque<Deferred>,
    /// The application dropped `Events`: discard instead of queueing.
    events_gone: bool,
    store: Option<Arc<Store>>,
    queue: Queue,
    /// Callers waiting for a send's ✓, by outbox seq.
    waiters: HashMap<u64, Reply<Sent>>,
    /// New sends not yet persisted (and so not yet in `queue`).
    admitting: Vec<(PendingSend, Reply<Sent>)>,
    /// Outbox files to delete.
    removals: Vec<u64>,
    /// Sent messages kept for a resend after `Undelivered`, on disk (with
    /// an outbox directory; opened on first use) ...
    retained: Option<Arc<Retained>>,
    /// ... or in memory.
    retained_mem: Recent<String, PendingSend>,
    /// Outbox files to move to `retained`: (outbox seq, message id).
    retirements: Vec<(u64, String)>,
    /// Kept sends to drop (delivered).
    forgets: Vec<String>,
    /// `Undelivered` notices for this device, to act on.
    undelivered: Vec<pb::Undelivered>,
    requests: VecDeque<Request>,
    acks: VecDeque<u64>,
    /// Seqs the application acknowledged (redeliveries are re-acked).
    app_acked: Recent<u64, ()>,
    /// Seqs of messages handed to the application by this process (held
    /// until acked; a redelivery of one is not emitted again).
    emitted: Recent<u64, ()>,
    /// Keys, sessions, identities and the persisted de-duplication window.
    crypto: Crypto,
    /// Where `crypto` is persisted; `None` keeps it in memory.
    state_file: Option<Arc<StateFile>>,
    keys: Keys,
    /// Device lists by user.
    devices: Recent<u64, Vec<u32>>,
    /// Phone numbers by user.
    phones: Recent<u64, String>,
    /// Member lists by group, until a change of the group is seen.
    group_members: Recent<u64, Vec<u64>>,
    /// Consecutive failed links; reset when a link reaches `UpToDate`.
    attempt: u32,
    /// When the head of the outbox may be retried.
    retry_at: Option<Instant>,
    close_replies: Vec<oneshot::Sender<()>>,
    /// Set when the client must stop (close, handles gone).
    stop: Option<CloseReason>,
}

/// Where this device's published keys stand.
#[derive(Default)]
struct Keys {
    /// The server holds this device's identity keys.
    has_keys: bool,
    /// One-time keys the server holds, as last reported.
    stock: u32,
    /// An upload is on the wire.
    uploading: bool,
    /// Callers of `keys_published`, answered once `has_keys`.
    waiters: Vec<Reply<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Actor {
    #[allow(clippy::too_many_arguments)] // one call site, all distinct parts
    pub(super) fn new(
        config: ClientConfig,
        creds: Credentials,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        store: Option<Arc<Store>>,
        loaded: Vec<PendingSend>,
        crypto: Crypto,
        state_file: Option<Arc<StateFile>>,
    ) -> Self {
        if !loaded.is_empty() {
            info!(count = loaded.len(), "resending sends left in the outbox");
        }
        Self {
            config,
            creds,
            shared,
            commands,
            events,
            pending_events: VecDeque::new(),
            deferred: VecDeque::new(),
            events_gone: false,
            store,
            queue: Queue::new(loaded),
            waiters: HashMap::new(),
            admitting: Vec::new(),
            removals: Vec::new(),
            retained: None,
            retained_mem: Recent::new(RETAINED_IN_MEMORY),
            retirements: Vec::new(),
            forgets: Vec::new(),
            undelivered: Vec::new(),
            requests: VecDeque::new(),
            acks: VecDeque::new(),
            app_acked: Recent::new(DEDUP_CAPACITY),
            emitted: Recent::new(DEDUP_CAPACITY),
            crypto,
            state_file,
            keys: Keys::default(),
            devices: Recent::new(DIRECTORY_CAPACITY),
            phones: Recent::new(DIRECTORY_CAPACITY),
            group_members: Recent::new(groups::GROUP_CACHE_CAPACITY),
            attempt: 0,
            retry_at: None,
            close_replies: Vec::new(),
            stop: None,
        }
    }

    pub(super) async fn run(mut self) {
        let reason = self.run_links().await;
        self.finish(reason).await;
    }

    async fn run_links(&mut self) -> CloseReason {
        let mut delay = Duration::ZERO;
        loop {
            if let Err(reason) = self.wait(delay).await {
                return reason;
            }
            let (parts, ok) = match self.connect().await {
                Err(reason) => return reason,
                Ok(Ok(connected)) => connected,
                Ok(Err(error)) => {
                    if let Some(reason) = fatal(&error) {
                        warn!(%error, "connection refused for good");
                        return reason;
                    }
                    delay = self.next_delay(retry_hint(&error));
                    warn!(%error, ?delay, "connect failed; retrying");
                    self.emit(Event::Disconnected { reason: error });
                    continue;
                }
            };
            match self.connected(parts, ok).await {
                Down::Stop(reason) => return reason,
                Down::Retry { error, after } => {
                    delay = self.next_delay(after);
                    warn!(%error, ?delay, "disconnected; reconnecting");
                    self.emit(Event::Disconnected { reason: error });
                }
            }
        }
    }

    fn next_delay(&mut self, at_least: Option<Duration>) -> Duration {
        let delay = self.config.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay.max(at_least.unwrap_or_default())
    }

    fn emit(&mut self, event: Event) {
        if !self.events_gone {
            self.pending_events.push_back(event);
        }
    }

    fn on_event_slot(&mut self, permit: Result<OwnedPermit<Event>, SendError<()>>) {
        match permit {
            Ok(permit) => {
                if let Some(event) = self.pending_events.pop_front() {
                    permit.send(event);
                }
            }
            Err(_) => {
                debug!("events receiver dropped; discarding events");
                self.events_gone = true;
                self.pending_events.clear();
            }
        }
    }

    /// Turns deferred pushes into events while the application has room.
    fn take_deferred(&mut self) {
        while self.pending_events.len() < self.config.event_capacity
            && let Some(push) = self.deferred.pop_front()
        {
            match push {
                Deferred::Entry(entry) => self.on_entry(entry),
                Deferred::UpToDate => self.emit(Event::UpToDate),
            }
        }
    }

    /// Waits out a backoff delay while serving commands.
    async fn wait(&mut self, delay: Duration) -> Result<(), CloseReason> {
        let deadline = Instant::now() + delay;
        loop {
            if let Some(reason) = self.stop.clone() {
                return Err(reason);
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
            tokio::select! {
                () = sleep_until(deadline) => return Ok(()),
                cmd = self.commands.recv() => self.on_commands(cmd).await,
                permit = self.events.clone().reserve_owned(), if !self.pending_events.is_empty() => {
                    self.on_event_slot(permit);
                }
            }
        }
    }

    /// One connect + auth attempt, serving commands meanwhile.
    async fn connect(&mut self) -> Result<Result<(Parts, pb::AuthOk), Error>, CloseReason> {
        let config = self.config.clone();
        let creds = self.creds.clone();
        let attempt = connect_and_auth(&config, &creds);
        tokio::pin!(attempt);
        loop {
            if let Some(reason) = self.stop.clone() {
                return Err(reason);
            }
            tokio::select! {
                result = &mut attempt => {
                    return Ok(match result {
                        Ok((parts, ok, key)) => {
                            self.pin_server_key(key).await;
                            Ok((parts, ok))
                        }
                        Err(e) => Err(e),
                    });
                }
                cmd = self.commands.recv() => self.on_commands(cmd).await,
                permit = self.events.clone().reserve_owned(), if !self.pending_events.is_empty() => {
                    self.on_event_slot(permit);
                }
            }
        }
    }

    /// Trust on first use: with no key pinned yet (credentials from before
    /// keys were kept, no `ConnectOptions::server_key`), the first server
    /// key seen is pinned for every later connection, and kept in the state
    /// directory for later runs.
    async fn pin_server_key(&mut self, key: Vec<u8>) {
        if self.config.connect.server_key.is_some() {
            return;
        }
        info!(server_key = %hex::encode(&key), "pinning the server's key (first use)");
        self.config.connect.server_key = Some(key.clone());
        if let Some(dir) = self.config.state_dir.clone() {
            let saved =
                tokio::task::spawn_blocking(move || crate::store::save_server_key(&dir, &key))
                    .await
                    .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
            if let Err(e) = saved {
                warn!(error = %e, "cannot keep the server's key; it is pinned for this run only");
            }
        }
    }

    /// Runs one authenticated link until it ends.
    async fn connected(&mut self, parts: Parts, ok: pb::AuthOk) -> Down {
        info!(phone = %ok.phone, "connected");
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE_CHUNKS);
        let writer = tokio::spawn(write_loop(parts.writer, writer_rx).in_current_span());
        let mut link = Link {
            reader: parts.reader,
            session: parts.session,
            inbuf: parts.inbuf,
            out: BytesMut::new(),
            writer_tx,
            writer,
            next_id: parts.next_id,
            in_flight: HashMap::new(),
            sends_in_flight: 0,
            last_write: Instant::now(),
            pong_deadline: None,
        };
        self.keys.has_keys = ok.has_keys;
        self.keys.stock = ok.one_time_keys_remaining;
        self.keys.uploading = false;
        self.emit(Event::Connected {
            phone: ok.phone,
            server_time_ms: ok.server_time_ms,
        });
        self.answer_key_waiters();
        self.maybe_upload(&mut link);
        // Frames that came with the AuthOk: those already decoded, then
        // those still in the read buffer.
        let mut down = None;
        for frame in parts.buffered {
            down = self.on_frame(&mut link, frame);
            if down.is_some() {
                break;
            }
        }
        if down.is_none() {
            down = self.on_bytes(&mut link);
        }
        let down = match down {
            Some(down) => down,
            None => self.drive(&mut link).await,
        };
        let graceful = matches!(down, Down::Stop(CloseReason::ByClient));
        self.teardown(link, graceful).await;
        down
    }

    async fn drive(&mut self, link: &mut Link) -> Down {
        loop {
            if let Some(reason) = self.stop.clone() {
                return Down::Stop(reason);
            }
            self.take_deferred();
            if let Err(e) = self.pump(link) {
                return Down::retry(e);
            }
            // New ciphertext and keys are written only after the state
            // that made them is on disk (the writer gets `out` below).
            self.save_crypto().await;
            let now = Instant::now();
            let can_read =
                self.deferred.len() < MAX_DEFERRED_ENTRIES && link.unwritten() < READ_PAUSE_BYTES;
            let can_take_commands = link.has_room();
            let can_ping = link.pong_deadline.is_none() && link.out.is_empty();
            let ping_at = link.last_write + self.config.ping_interval;
            let pong_deadline = link.pong_deadline;
            let retry_at = self.retry_at;
            tokio::select! {
                read = link.reader.read(&mut link.inbuf), if can_read => match read {
                    Ok(0) => return Down::retry(Error::Closed(CloseReason::ConnectionLost)),
                    Ok(_) => {
                        if let Some(down) = self.on_bytes(link) {
                            return down;
                        }
                    }
                    Err(e) => return Down::retry(e),
                },
                permit = link.writer_tx.clone().reserve_owned(), if !link.out.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(link.out.split().freeze());
                        link.last_write = Instant::now();
                    }
                    Err(_) => return Down::retry(Error::Closed(CloseReason::ConnectionLost)),
                },
                ended = &mut link.writer => {
                    let error = match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => Error::Closed(CloseReason::ConnectionLost),
                        Err(join) => Error::Closed(CloseReason::Fatal(format!("writer task: {join}"))),
                    };
                    return Down::retry(error);
                }
                cmd = self.commands.recv(), if can_take_commands => self.on_commands(cmd).await,
                permit = self.events.clone().reserve_owned(), if !self.pending_events.is_empty() => {
                    self.on_event_slot(permit);
                }
                () = sleep_until(ping_at), if can_ping => self.queue_ping(link),
                () = sleep_until(pong_deadline.unwrap_or(now)), if pong_deadline.is_some() => {
                    return Down::retry(Error::Timeout("waiting for an answer to a ping"));
                }
                () = sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => {}
            }
            self.flush_removals().await;
        }
    }

    /// Ends a link: flushes it when closing gracefully, and puts everything
    /// that was in flight back in line for the next link.
    async fn teardown(&mut self, mut link: Link, graceful: bool) {
        if graceful {
            self.queue_acks(&mut link);
            if link.session.seal(&mut link.out).is_ok() && !link.out.is_empty() {
                let last = link.out.split().freeze();
                let _ = timeout(CLOSE_TIMEOUT, link.writer_tx.send(last)).await;
            }
            drop(link.writer_tx);
            if timeout(CLOSE_TIMEOUT, &mut link.writer).await.is_err() {
                link.writer.abort();
            }
        } else {
            link.writer.abort();
        }
        self.deferred.clear();
        self.queue.reset_in_flight();
        let mut requests: Vec<(u32, Request)> = link
            .in_flight
            .drain()
            .filter_map(|(id, what)| match what {
                InFlight::Request(r) => Some((id, r)),
                _ => None,
            })
            .collect();
        requests.sort_by_key(|(id, _)| *id);
        for (_, request) in requests.into_iter().rev() {
            self.requests.push_front(request);
        }
    }

    /// Handles one command and whatever else is already waiting (up to a
    /// batch), then persists new sends together.
    async fn on_commands(&mut self, first: Option<Command>) {
        self.on_command(first);
        for _ in 0..COMMAND_BATCH {
            if self.stop.is_some() {
                break;
            }
            match self.commands.try_recv() {
                Ok(cmd) => self.on_command(Some(cmd)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.on_command(None),
            }
        }
        self.admit().await;
    }

    fn on_command(&mut self, cmd: Option<Command>) {
        let Some(cmd) = cmd else {
            // Every handle is gone: nobody can use the client any more.
            self.stop.get_or_insert(CloseReason::ByClient);
            return;
        };
        match cmd {
            Command::Send {
                client_msg_id,
                fresh_id,
                to_user,
                to_phone,
                content,
                reply,
            } => {
                let capacity = self.config.outbox_capacity;
                if self.queue.len() + self.admitting.len() >= capacity {
                    let _ = reply.send(Err(Error::OutboxFull { capacity }));
                    return;
                }
                let send = PendingSend {
                    seq: self.queue.alloc_seq(),
                    client_msg_id,
                    to_user,
                    to_phone,
                    queued_at_ms: now_ms(),
                    never_sent: fresh_id,
                    resent: false,
                    content,
                };
                self.admitting.push((send, reply));
            }
            Command::Lookup { phone, reply } => {
                self.push_request(Request::Lookup { phone, reply });
            }
            Command::ReadReceipt {
                to_user,
                group_id,
                client_msg_ids,
                reply,
            } => self.push_request(Request::ReadReceipt {
                to_user,
                group_id,
                client_msg_ids,
                reply,
            }),
            Command::Group { body, reply } => self.push_request(Request::Group { body, reply }),
            Command::Ack { seqs } => {
                for seq in seqs {
                    self.app_acked.insert(seq, ());
                    self.crypto.release(seq);
                    self.acks.push_back(seq);
                }
                while self.acks.len() > MAX_PENDING_ACKS {
                    self.acks.pop_front();
                }
            }
            Command::CreateLinkCode { reply } => {
                self.push_request(Request::CreateLinkCode { reply });
            }
            Command::ListDevices { reply } => self.push_request(Request::ListDevices { reply }),
            Command::RevokeDevice { device_id, reply } => {
                self.push_request(Request::RevokeDevice { device_id, reply });
            }
            Command::FetchKeys { user_id, reply } => {
                // The peer's current devices and identities, always asked
                // afresh: a known list may hold devices since replaced.
                self.push_request(Request::FetchKeys {
                    user_id,
                    identities_only: true,
                    reply,
                });
            }
            Command::SafetyNumber { user_id, reply } => {
                let _ = reply.send(self.crypto.safety_number(user_id).map_err(Error::from));
            }
            Command::KeysPublished { reply } => {
                self.keys.waiters.push(reply);
                self.answer_key_waiters();
            }
            Command::Close { reply } => {
                self.close_replies.push(reply);
                self.stop.get_or_insert(CloseReason::ByClient);
            }
        }
    }

    fn answer_key_waiters(&mut self) {
        if self.keys.has_keys {
            for waiter in self.keys.waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Uploads keys when the server lacks this device's identity or its
    /// one-time keys run low (one upload at a time).
    fn maybe_upload(&mut self, link: &mut Link) {
        if self.keys.uploading || (self.keys.has_keys && self.keys.stock >= ONE_TIME_KEY_LOW) {
            return;
        }
        let upload = self.crypto.upload(self.keys.stock, !self.keys.has_keys);
        debug!(
            one_time_keys = upload.one_time_keys.len(),
            fallback = upload.fallback_key.is_some(),
            "uploading keys"
        );
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::UploadKeys(upload)),
        });
        link.in_flight.insert(id, InFlight::Upload);
        self.keys.uploading = true;
    }

    /// The answer to a key upload; `Some` stops the client.
    fn on_upload_answer(
        &mut self,
        link: &mut Link,
        body: Option<server_frame::Body>,
    ) -> Option<Down> {
        self.keys.uploading = false;
        match body {
            Some(server_frame::Body::KeysUploaded(k)) => {
                self.crypto.published();
                self.keys.has_keys = true;
                self.keys.stock = k.one_time_keys_remaining;
                debug!(stock = k.one_time_keys_remaining, "keys published");
                self.emit(Event::KeysPublished {
                    one_time_keys_remaining: k.one_time_keys_remaining,
                });
                self.answer_key_waiters();
                // Keys fetched meanwhile may have brought the stock low again.
                self.maybe_upload(link);
                None
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.code == ErrorCode::InvalidKeys {
                    warn!(%error, "the server refused this device's keys");
                    let why = CryptoError::KeysRejected(error.to_string());
                    return Some(Down::Stop(CloseReason::Fatal(why.to_string())));
                }
                // Retried on the next connection or KeysLow.
                warn!(%error, "key upload failed");
                None
            }
            other => Some(Down::retry(unexpected("KeysUploaded", other.as_ref()))),
        }
    }

    /// Persists the crypto state if it changed.
    async fn save_crypto(&mut self) {
        if !self.crypto.take_dirty() {
            return;
        }
        let Some(file) = &self.state_file else {
            return;
        };
        let bytes = match self.crypto.snapshot() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot serialize the crypto state");
                return;
            }
        };
        let file = Arc::clone(file);
        let saved = tokio::task::spawn_blocking(move || file.save(&bytes))
            .await
            .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
        if let Err(e) = saved {
            // Kept in memory and retried at the next change; a crash before
            // then may reuse message keys the peer then cannot decrypt.
            warn!(error = %e, "cannot persist the crypto state");
            self.crypto.mark_dirty();
        }
    }

    fn push_request(&mut self, request: Request) {
        if self.requests.len() >= MAX_PENDING_REQUESTS {
            request.fail(Error::Busy(self.requests.len()));
        } else {
            self.requests.push_back(request);
        }
    }

    /// Persists new sends (one blocking batch) and puts them in the queue.
    async fn admit(&mut self) {
        if self.admitting.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.admitting);
        if let Some(store) = &self.store {
            let sends: Vec<PendingSend> = batch.iter().map(|(s, _)| s.clone()).collect();
            let store = Arc::clone(store);
            let written = tokio::task::spawn_blocking(move || {
                let result = store.write(&sends);
                if result.is_err() {
                    // Leave no half-written batch to be sent by a later start
                    // after its callers were told it failed.
                    let seqs: Vec<u64> = sends.iter().map(|s| s.seq).collect();
                    let _ = store.remove(&seqs);
                }
                result
            })
            .await
            .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
            if let Err(e) = written {
                warn!(error = %e, "cannot persist sends");
                for (_, reply) in batch {
                    let _ = reply.send(Err(Error::Storage(storage_error_copy(&e))));
                }
                return;
            }
        }
        for (send, reply) in batch {
            self.waiters.insert(send.seq, reply);
            self.queue.insert(send);
        }
    }

    async fn flush_removals(&mut self) {
        self.flush_retained().await;
        if self.removals.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.removals);
        if let Some(store) = &self.store {
            let store = Arc::clone(store);
            let removed = tokio::task::spawn_blocking(move || store.remove(&seqs))
                .await
                .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
            if let Err(e) = removed {
                // Harmless: the send is resent at the next start and the
                // server answers it as a duplicate.
                warn!(error = %e, "cannot remove acknowledged sends from the outbox");
            }
        }
    }

    /// The kept sends (see `outbox::Retained`): the outbox files of sends
    /// that got their ✓ move there, delivered ones go, and the ones the
    /// server reported undelivered are sent again, once.
    async fn flush_retained(&mut self) {
        if self.retirements.is_empty() && self.forgets.is_empty() && self.undelivered.is_empty() {
            return;
        }
        let retirements = std::mem::take(&mut self.retirements);
        let forgets = std::mem::take(&mut self.forgets);
        let notices = std::mem::take(&mut self.undelivered);
        let ids: Vec<String> = notices
            .iter()
            .flat_map(|n| n.client_msg_ids.iter().cloned())
            .collect();
        let retained = self.retained_store().await;
        let taken: Vec<Option<PendingSend>> = match (self.store.clone(), retained) {
            (Some(store), Some(retained)) => tokio::task::spawn_blocking(move || {
                for (seq, id) in retirements {
                    if let Err(e) = retained.keep(&store, seq, &id) {
                        warn!(error = %e, "cannot keep a sent message for a resend");
                        let _ = store.remove(&[seq]);
                    }
                }
                for id in forgets {
                    let _ = retained.forget(&id);
                }
                ids.iter()
                    .map(|id| retained.take(id).ok().flatten())
                    .collect()
            })
            .await
            .unwrap_or_default(),
            (store, _) => {
                if let Some(store) = store {
                    // Nowhere to keep them: gone like any acknowledged send.
                    let seqs: Vec<u64> = retirements.iter().map(|(seq, _)| *seq).collect();
                    let _ = tokio::task::spawn_blocking(move || store.remove(&seqs)).await;
                }
                for id in &forgets {
                    self.retained_mem.remove(id);
                }
                ids.iter().map(|id| self.retained_mem.remove(id)).collect()
            }
        };
        let mut taken = taken.into_iter();
        for notice in notices {
            let mut resending = Vec::new();
            for id in &notice.client_msg_ids {
                let Some(Some(send)) = taken.next() else {
                    continue;
                };
                if send.resent || send.to_user != Some(notice.to_user) {
                    continue;
                }
                let resend = PendingSend {
                    seq: self.queue.alloc_seq(),
                    never_sent: false,
                    resent: true,
                    ..send
                };
                // Nobody waits for it: its ✓ comes as `Event::Sent`.
                let (reply, _) = oneshot::channel();
                self.admitting.push((resend, reply));
                resending.push(id.clone());
            }
            info!(
                to_user = notice.to_user,
                undelivered = notice.client_msg_ids.len(),
                resending = resending.len(),
                "messages never delivered (the recipient's devices were replaced)"
            );
            let phone = self
                .phones
                .get(&notice.to_user)
                .cloned()
                .unwrap_or_default();
            self.emit(Event::Undelivered {
                to_user: UserId(notice.to_user),
                phone,
                client_msg_ids: notice.client_msg_ids,
                resending,
            });
        }
        self.admit().await;
    }

    /// The on-disk store of kept sends, opened on first use; `None` without
    /// an outbox directory (or if it cannot be opened).
    async fn retained_store(&mut self) -> Option<Arc<Retained>> {
        if self.retained.is_none()
            && let Some(store) = self.store.clone()
        {
            match tokio::task::spawn_blocking(move || Retained::open(&store)).await {
                Ok(Ok(r)) => self.retained = Some(Arc::new(r)),
                Ok(Err(e)) => warn!(error = %e, "cannot open the store of sent messages"),
                Err(e) => warn!(error = %e, "cannot open the store of sent messages"),
            }
        }
        self.retained.clone()
    }

    fn queue_acks(&mut self, link: &mut Link) {
        while !self.acks.is_empty() {
            let n = self.acks.len().min(limits::MAX_ACK_SEQS);
            let seqs: Vec<u64> = self.acks.drain(..n).collect();
            link.session.queue(&pb::ClientFrame {
                id: 0,
                body: Some(client_frame::Body::Ack(pb::Ack { seqs })),
            });
        }
    }

    fn queue_ping(&mut self, link: &mut Link) {
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::Ping(pb::Ping {})),
        });
        link.in_flight.insert(id, InFlight::Ping);
        link.pong_deadline = Some(Instant::now() + self.config.pong_timeout);
    }

    /// Moves acks, requests and outbox entries onto the link, within its
    /// limits, and seals them.
    fn pump(&mut self, link: &mut Link) -> Result<(), Error> {
        // Acks first and regardless of the write backlog: the server's drain
        // waits for them.
        self.queue_acks(link);
        while link.has_room()
            && let Some(request) = self.requests.pop_front()
        {
            let id = link.next_id();
            link.session.queue(&pb::ClientFrame {
                id,
                body: Some(request.body()),
            });
            link.in_flight.insert(id, InFlight::Request(request));
        }
        self.retry_at = None;
        let now = Instant::now();
        while link.has_room() && link.sends_in_flight < self.config.max_in_flight_sends {
            match self.queue.next(now) {
                Next::Send(seq) => self.start_send(link, seq),
                Next::Blocked(at) => {
                    self.retry_at = at;
                    break;
                }
                Next::Idle => break,
            }
        }
        if link.session.pending_bytes() > 0 {
            link.session.seal(&mut link.out)?;
        }
        Ok(())
    }

    fn resolve(link: &mut Link, entry_seq: u64, phone: String) {
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::LookupUser(pb::LookupUser { phone })),
        });
        link.in_flight.insert(id, InFlight::Resolve(entry_seq));
        link.sends_in_flight += 1;
    }

    /// Writes outbox entry `seq` (or the lookup or key fetch it needs
    /// first).
    fn start_send(&mut self, link: &mut Link, seq: u64) {
        let max_frame = self.config.connect.max_frame_bytes;
        let me = self.shared.user_id;
        let my_device = self.shared.device_id;
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        if let Content::Group { group_id, .. } = entry.send.content {
            self.start_group_send(link, seq, group_id);
            return;
        }
        let Some(to_user) = entry.send.to_user else {
            entry.state = State::Resolving;
            let phone = entry.send.to_phone.clone().unwrap_or_default();
            Self::resolve(link, seq, phone);
            return;
        };
        let (payloads, self_payloads) = match &entry.send.content {
            Content::PerDevice(payloads) => (
                payloads
                    .iter()
                    .map(|p| pb::DevicePayload {
                        device_id: p.device_id,
                        payload: p.payload.clone(),
                    })
                    .collect(),
                Vec::new(),
            ),
            Content::Group { .. } => return,
            Content::AllDevices { payload } => {
                let payload = payload.clone();
                let known = entry
                    .devices
                    .clone()
                    .or_else(|| self.devices.get(&to_user).cloned())
                    .or_else(|| self.crypto.known_devices(to_user));
                let mut devices = match known {
                    Some(devices) => devices,
                    None => {
                        let phone = entry
                            .send
                            .to_phone
                            .clone()
                            .or_else(|| self.phones.get(&to_user).cloned());
                        if let Some(phone) = phone {
                            entry.state = State::Resolving;
                            Self::resolve(link, seq, phone);
                            return;
                        }
                        // Unknown devices and no phone to look them up by:
                        // the server's DEVICE_MISMATCH answer lists them.
                        Vec::new()
                    }
                };
                if to_user == me {
                    // A note to self goes to this account's other devices.
                    devices.retain(|d| *d != my_device);
                }
                let own: Vec<u32> = if to_user == me {
                    Vec::new()
                } else {
                    self.crypto.known_devices(me).unwrap_or_default()
                };
                entry.devices = Some(devices.clone());
                // Devices without a session need their key bundles first.
                let mut fetch = Vec::new();
                if devices
                    .iter()
                    .any(|d| !self.crypto.has_session(to_user, *d))
                {
                    fetch.push(to_user);
                }
                if own.iter().any(|d| !self.crypto.has_session(me, *d)) {
                    fetch.push(me);
                }
                if !fetch.is_empty() {
                    entry.state = State::Resolving;
                    entry.fetches = fetch.len();
                    entry.key_wait = false;
                    for user in fetch {
                        let id = link.next_id();
                        link.session.queue(&pb::ClientFrame {
                            id,
                            body: Some(client_frame::Body::FetchBundles(pb::FetchBundles {
                                user_id: user,
                                identities_only: false,
                            })),
                        });
                        link.in_flight.insert(id, InFlight::Fetch { seq, user });
                        link.sends_in_flight += 1;
                    }
                    return;
                }
                let plaintext = Plaintext {
                    kind: KIND_MESSAGE,
                    body: payload,
                    sent_at_ms: now_ms(),
                    to_user,
                    sender_identity: None,
                    group_id: 0,
                };
                let sealed = self
                    .seal(to_user, &devices, &plaintext)
                    .and_then(|payloads| Ok((payloads, self.seal(me, &own, &plaintext)?)));
                match sealed {
                    Ok(sealed) => sealed,
                    Err(e) => {
                        self.fail(seq, e.into());
                        return;
                    }
                }
            }
        };
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        let id = link.next_id();
        let frame = pb::ClientFrame {
            id,
            body: Some(client_frame::Body::Send(pb::Send {
                client_msg_id: entry.send.client_msg_id.clone(),
                to_user,
                payloads,
                self_payloads,
                first_attempt: entry.send.never_sent,
            })),
        };
        let len = frame.encoded_len();
        if len > max_frame {
            self.fail(
                seq,
                UsageError::FrameTooLarge {
                    len,
                    max: max_frame,
                }
                .into(),
            );
            return;
        }
        entry.state = State::InFlight;
        entry.send.never_sent = false;
        link.session.queue(&frame);
        link.in_flight.insert(id, InFlight::Send(seq));
        link.sends_in_flight += 1;
    }

    /// Encrypts `plaintext` once for each of `user`'s `devices`.
    fn seal(
        &mut self,
        user: u64,
        devices: &[u32],
        plaintext: &Plaintext,
    ) -> Result<Vec<pb::DevicePayload>, CryptoError> {
        devices
            .iter()
            .map(|d| {
                Ok(pb::DevicePayload {
                    device_id: *d,
                    payload: self.crypto.encrypt(user, *d, plaintext)?,
                })
            })
            .collect()
    }

    /// Key bundles for outbox entry `seq`: new sessions, then the send goes
    /// again (or waits for devices that have not published keys yet).
    fn on_fetch_answer(
        &mut self,
        seq: u64,
        user: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        let error = match body {
            Some(server_frame::Body::Bundles(bundles)) => {
                // Sessions are made even if the send is gone: the bundles'
                // one-time keys are used up either way.
                match self.crypto.add_bundles(&bundles) {
                    Ok(outcome) => {
                        let devices: Vec<u32> =
                            bundles.devices.iter().map(|d| d.device_id).collect();
                        if user != self.shared.user_id {
                            self.devices.insert(user, devices.clone());
                        }
                        self.report_changes(user, &outcome);
                        let Some(entry) = self.queue.get_mut(seq) else {
                            return Ok(());
                        };
                        if entry.send.to_user == Some(user) && user != self.shared.user_id {
                            entry.devices = Some(devices);
                        }
                        entry.fetches = entry.fetches.saturating_sub(1);
                        if let Some(device_id) = outcome.keyless.first() {
                            entry.key_waits += 1;
                            if entry.key_waits > MAX_KEY_WAITS {
                                let error = CryptoError::NoKeys {
                                    user_id: UserId(user),
                                    device_id: DeviceId(*device_id),
                                };
                                self.fail(seq, error.into());
                                return Ok(());
                            }
                            entry.key_wait = true;
                        }
                        if entry.fetches == 0 {
                            entry.state = if std::mem::take(&mut entry.key_wait) {
                                State::RetryAt(Instant::now() + KEY_WAIT_DELAY)
                            } else {
                                State::Ready
                            };
                        }
                        return Ok(());
                    }
                    Err(e) => Error::Crypto(e),
                }
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.is_retryable()
                    && let Some(entry) = self.queue.get_mut(seq)
                {
                    entry.retries = entry.retries.saturating_add(1);
                    entry.fetches = entry.fetches.saturating_sub(1);
                    let delay = error
                        .retry_after
                        .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                        .max(MIN_RETRY_DELAY);
                    if entry.fetches == 0 {
                        entry.state = State::RetryAt(Instant::now() + delay);
                    }
                    return Ok(());
                }
                Error::Server(error)
            }
            other => return Err(unexpected("Bundles", other.as_ref())),
        };
        self.fail(seq, error);
        Ok(())
    }

    fn safety_number_changed(&mut self, user_id: u64) {
        let phone = self.phones.get(&user_id).cloned().unwrap_or_default();
        info!(user_id, "a peer's identity keys changed");
        self.emit(Event::SafetyNumberChanged {
            user_id: UserId(user_id),
            phone,
        });
    }

    fn contact_devices_changed(&mut self, user_id: u64, change: DeviceChange) {
        let phone = self.phones.get(&user_id).cloned().unwrap_or_default();
        info!(user_id, added = ?change.added, removed = ?change.removed, "a peer's devices changed");
        self.emit(Event::ContactDevicesChanged {
            user_id: UserId(user_id),
            phone,
            devices: ids::devices(&change.devices),
            added: ids::devices(&change.added),
            removed: ids::devices(&change.removed),
        });
    }

    /// Tells the application what a batch of bundles changed about `user`.
    fn report_changes(&mut self, user_id: u64, outcome: &BundleOutcome) {
        if let Some(change) = outcome.devices_changed.clone() {
            self.contact_devices_changed(user_id, change);
        }
        if outcome.identity_changed {
            self.safety_number_changed(user_id);
        }
    }

    /// Asks for `user_id`'s current devices and identities, for nobody in
    /// particular (the answer reports any change).
    fn refresh_devices(&mut self, user_id: u64) {
        let (reply, _) = oneshot::channel();
        self.push_request(Request::FetchKeys {
            user_id,
            identities_only: true,
            reply,
        });
    }

    /// Decodes every whole frame read so far.
    fn on_bytes(&mut self, link: &mut Link) -> Option<Down> {
        loop {
            match link.session.poll_frame::<pb::ServerFrame>(&mut link.inbuf) {
                Ok(Some(frame)) => {
                    link.pong_deadline = None;
                    if let Some(down) = self.on_frame(link, frame) {
                        return Some(down);
                    }
                }
                Ok(None) => return None,
                Err(e) => return Some(Down::retry(e)),
            }
        }
    }

    fn on_frame(&mut self, link: &mut Link, frame: pb::ServerFrame) -> Option<Down> {
        use server_frame::Body;
        if frame.id != 0 {
            let Some(what) = link.in_flight.remove(&frame.id) else {
                warn!(id = frame.id, "answer to an unknown request");
                return None;
            };
            let answered = match what {
                InFlight::Send(seq) => {
                    link.sends_in_flight = link.sends_in_flight.saturating_sub(1);
                    self.on_send_answer(seq, frame.body)
                }
                InFlight::Resolve(seq) => {
                    link.sends_in_flight = link.sends_in_flight.saturating_sub(1);
                    self.on_resolve_answer(seq, frame.body)
                }
                InFlight::Fetch { seq, user } => {
                    link.sends_in_flight = link.sends_in_flight.saturating_sub(1);
                    self.on_fetch_answer(seq, user, frame.body)
                }
                InFlight::GroupInfo(seq) => {
                    link.sends_in_flight = link.sends_in_flight.saturating_sub(1);
                    self.on_group_info_answer(seq, frame.body)
                }
                InFlight::GroupKeys {
                    seq,
                    group,
                    session_id,
                    parts,
                } => {
                    link.sends_in_flight = link.sends_in_flight.saturating_sub(1);
                    self.on_group_keys_answer(seq, group, &session_id, parts, frame.body)
                }
                InFlight::Upload => return self.on_upload_answer(link, frame.body),
                InFlight::Request(request) => self.on_request_answer(request, frame.body),
                InFlight::Ping => match frame.body {
                    Some(Body::Pong(_)) => Ok(()),
                    other => Err(unexpected("Pong", other.as_ref())),
                },
            };
            return answered.err().map(Down::retry);
        }
        match frame.body {
            Some(Body::Deliver(deliver)) => {
                self.deferred
                    .extend(deliver.entries.into_iter().map(Deferred::Entry));
                self.take_deferred();
            }
            Some(Body::UpToDate(_)) => {
                debug!("queue drained");
                self.attempt = 0;
                self.deferred.push_back(Deferred::UpToDate);
                self.take_deferred();
            }
            Some(Body::KeysLow(low)) => {
                debug!(stock = low.one_time_keys_remaining, "one-time keys low");
                self.keys.stock = low.one_time_keys_remaining;
                self.maybe_upload(link);
            }
            Some(Body::Goodbye(goodbye)) => {
                let reason = goodbye_reason(goodbye);
                info!(%reason, "server said goodbye");
                return Some(
                    if matches!(reason.code, ErrorCode::Replaced | ErrorCode::DeviceRevoked) {
                        Down::Stop(CloseReason::Goodbye(reason))
                    } else {
                        Down::Retry {
                            after: reason.retry_after,
                            error: Error::Closed(CloseReason::Goodbye(reason)),
                        }
                    },
                );
            }
            Some(Body::Error(e)) => {
                warn!(error = %ServerError::from(e), "error pushed by the server");
            }
            other => {
                warn!(
                    frame = crate::connection::body_name(other.as_ref()),
                    "unexpected push"
                );
            }
        }
        None
    }

    fn on_send_answer(&mut self, seq: u64, body: Option<server_frame::Body>) -> Result<(), Error> {
        match body {
            Some(server_frame::Body::SendOk(ok)) => {
                self.complete(seq, &ok);
                Ok(())
            }
            Some(server_frame::Body::Error(e)) => {
                self.on_send_error(seq, e.into());
                Ok(())
            }
            other => Err(unexpected("SendOk", other.as_ref())),
        }
    }

    fn on_send_error(&mut self, seq: u64, error: ServerError) {
        let max_device_retries = self.config.max_device_retries;
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        if error.code == ErrorCode::DeviceMismatch
            && matches!(entry.send.content, Content::AllDevices { .. })
            && entry.mismatches < max_device_retries
        {
            entry.mismatches += 1;
            entry.state = State::Ready;
            let me = self.shared.user_id;
            let to_user = entry.send.to_user.unwrap_or_default();
            let whose = error.user_id.map_or(to_user, UserId::get);
            let stale = ids::device_ints(&error.stale_devices);
            let missing = ids::device_ints(&error.missing_devices);
            let fix = |list: Option<Vec<u32>>| {
                let mut devices = list.unwrap_or_default();
                devices.retain(|d| !stale.contains(d));
                devices.extend_from_slice(&missing);
                devices.sort_unstable();
                devices.dedup();
                devices
            };
            if whose == to_user {
                let devices = fix(entry.devices.take());
                debug!(seq, ?devices, "recipient devices changed; resending");
                if to_user != me {
                    self.devices.insert(to_user, devices.clone());
                }
                entry.devices = Some(devices);
            }
            if whose == me {
                let devices = fix(self.crypto.known_devices(me));
                debug!(seq, ?devices, "this account's devices changed; resending");
                self.crypto.set_own_devices(&devices);
            }
            self.crypto.forget_devices(whose, &stale);
            // A replacement is reported once the new devices' keys are
            // fetched; a removal alone, now.
            if error.missing_devices.is_empty()
                && let Some(change) = self.crypto.check_devices(whose)
            {
                self.contact_devices_changed(whose, change);
            }
            return;
        }
        if error.is_retryable() {
            entry.retries = entry.retries.saturating_add(1);
            let delay = error
                .retry_after
                .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                .max(MIN_RETRY_DELAY);
            debug!(seq, %error, ?delay, "send refused for now; will retry");
            entry.state = State::RetryAt(Instant::now() + delay);
            return;
        }
        self.fail(seq, Error::Server(error));
    }

    fn on_resolve_answer(
        &mut self,
        seq: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        match body {
            Some(server_frame::Body::UserInfo(info)) => {
                self.devices.insert(info.user_id, info.devices.clone());
                self.phones.insert(info.user_id, info.phone.clone());
                if let Some(entry) = self.queue.get_mut(seq) {
                    let to_user = *entry.send.to_user.get_or_insert(info.user_id);
                    // A cached phone number now owned by someone else: let
                    // the server's DEVICE_MISMATCH answer give the devices.
                    entry.devices = Some(if to_user == info.user_id {
                        info.devices
                    } else {
                        Vec::new()
                    });
                    entry.state = State::Ready;
                }
                Ok(())
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.is_retryable() {
                    if let Some(entry) = self.queue.get_mut(seq) {
                        entry.retries = entry.retries.saturating_add(1);
                        let delay = error
                            .retry_after
                            .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                            .max(MIN_RETRY_DELAY);
                        entry.state = State::RetryAt(Instant::now() + delay);
                    }
                } else {
                    self.fail(seq, Error::Server(error));
                }
                Ok(())
            }
            other => Err(unexpected("UserInfo", other.as_ref())),
        }
    }

    fn on_request_answer(
        &mut self,
        request: Request,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        use server_frame::Body;
        match (request, body) {
            (Request::Lookup { reply, .. }, Some(Body::UserInfo(info))) => {
                self.devices.insert(info.user_id, info.devices.clone());
                self.phones.insert(info.user_id, info.phone.clone());
                let _ = reply.send(Ok(info));
            }
            (Request::ReadReceipt { reply, .. }, Some(Body::ReceiptOk(_))) => {
                let _ = reply.send(Ok(()));
            }
            (
                Request::Group { reply, .. },
                Some(body @ (Body::GroupInfo(_) | Body::GroupList(_))),
            ) => {
                if let Body::GroupInfo(info) = &body {
                    self.learn_group(info);
                }
                let _ = reply.send(Ok(body));
            }
            (Request::CreateLinkCode { reply }, Some(Body::LinkCode(code))) => {
                let _ = reply.send(Ok(code));
            }
            (Request::ListDevices { reply }, Some(Body::DeviceList(list))) => {
                let bad = self.crypto.add_own_device_list(&list.devices);
                if !bad.is_empty() {
                    warn!(devices = ?bad, "devices of this account with invalid identity keys");
                }
                let me = self.shared.device_id;
                let devices = list
                    .devices
                    .into_iter()
                    .map(|d| Device {
                        device_id: DeviceId(d.device_id),
                        primary: d.primary,
                        this_device: d.device_id == me,
                        created_ms: d.created_ms,
                        identity_key: d.identity.as_ref().and_then(|i| {
                            let key: [u8; 32] = i.ed25519.as_ref().try_into().ok()?;
                            Some(vodozemac::base64_encode(key))
                        }),
                    })
                    .collect();
                let _ = reply.send(Ok(devices));
            }
            (Request::RevokeDevice { device_id, reply }, Some(Body::DeviceRevoked(_))) => {
                self.crypto
                    .forget_devices(self.shared.user_id, &[device_id]);
                let _ = reply.send(Ok(()));
            }
            (
                Request::FetchKeys {
                    user_id,
                    identities_only,
                    reply,
                },
                Some(Body::Bundles(bundles)),
            ) => {
                let outcome = if identities_only {
                    self.crypto.refresh_identities(&bundles)
                } else {
                    self.crypto.add_bundles(&bundles)
                };
                match outcome {
                    Ok(outcome) => {
                        let devices = bundles.devices.iter().map(|d| d.device_id).collect();
                        if user_id != self.shared.user_id {
                            self.devices.insert(user_id, devices);
                        }
                        self.report_changes(user_id, &outcome);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            (request, Some(Body::Error(e))) => request.fail(Error::Server(e.into())),
            (request, other) => {
                let expected = request.expected();
                request.fail(unexpected(expected, other.as_ref()));
                return Err(unexpected(expected, other.as_ref()));
            }
        }
        Ok(())
    }

    /// ✓ for outbox entry `seq`.
    fn complete(&mut self, seq: u64, ok: &pb::SendOk) {
        let Some(entry) = self.queue.remove(seq) else {
            return;
        };
        // Kept until its ✓✓ in case the server reports it undelivered.
        let keep = matches!(entry.send.content, Content::AllDevices { .. })
            && !entry.send.resent
            && entry.send.to_user.is_some_and(|u| u != self.shared.user_id);
        match (&self.store, keep) {
            (Some(_), true) => self
                .retirements
                .push((seq, entry.send.client_msg_id.clone())),
            (Some(_), false) => self.removals.push(seq),
            (None, true) => self
                .retained_mem
                .insert(entry.send.client_msg_id.clone(), entry.send.clone()),
            (None, false) => {}
        }
        let group_id = match entry.send.content {
            Content::Group { group_id, .. } => {
                self.track_group_send(group_id, &entry.send.client_msg_id);
                Some(GroupId(group_id))
            }
            _ => None,
        };
        let sent = Sent {
            client_msg_id: entry.send.client_msg_id,
            to_user: UserId(entry.send.to_user.unwrap_or_default()),
            server_ts_ms: ok.server_ts_ms,
            duplicate: ok.duplicate,
            group_id,
            group_seq: group_id.map(|_| ok.group_seq),
        };
        debug!(seq, client_msg_id = %sent.client_msg_id, "sent");
        match self.waiters.remove(&seq) {
            Some(waiter) if !waiter.is_closed() => {
                let _ = waiter.send(Ok(sent));
            }
            _ => self.emit(Event::Sent(sent)),
        }
    }

    /// Outbox entry `seq` failed for good.
    fn fail(&mut self, seq: u64, error: Error) {
        let Some(entry) = self.queue.remove(seq) else {
            return;
        };
        if self.store.is_some() {
            self.removals.push(seq);
        }
        match self.waiters.remove(&seq) {
            Some(waiter) if !waiter.is_closed() => {
                debug!(seq, client_msg_id = %entry.send.client_msg_id, %error, "send failed");
                let _ = waiter.send(Err(error));
            }
            _ => {
                warn!(seq, client_msg_id = %entry.send.client_msg_id, %error, "send failed; its caller is gone");
                self.emit(Event::SendFailed {
                    client_msg_id: entry.send.client_msg_id,
                    to_user: entry.send.to_user.map(UserId),
                    error,
                });
            }
        }
    }

    /// One pushed queue entry: de-duplicate, decrypt, then hand it to the
    /// application.
    fn on_entry(&mut self, entry: pb::QueueEntry) {
        use pb::queue_entry::Body;
        if self.app_acked.contains(&entry.seq) {
            // Acked before, but the ack was lost with a link: ack again.
            self.acks.push_back(entry.seq);
            return;
        }
        match entry.body {
            Some(Body::Message(m)) => self.on_message(entry.seq, entry.server_ts_ms, m),
            Some(Body::Receipt(r)) => {
                self.phones.insert(r.from_user, r.from_phone.clone());
                match ReceiptKind::try_from(r.kind) {
                    Ok(kind @ (ReceiptKind::Delivered | ReceiptKind::Read)) => {
                        if r.from_user != self.shared.user_id {
                            self.forgets.extend(r.client_msg_ids.iter().cloned());
                        }
                        let group = (r.group_id != 0).then_some(GroupId(r.group_id));
                        if group.is_some() {
                            self.tally_group_receipt(&r, kind);
                        }
                        self.emit(Event::Receipt {
                            seq: Seq(entry.seq),
                            from_user: UserId(r.from_user),
                            from_device: DeviceId(r.from_device),
                            from_phone: r.from_phone,
                            kind,
                            client_msg_ids: r.client_msg_ids,
                            server_ts_ms: entry.server_ts_ms,
                            group_id: group,
                        });
                    }
                    _ => {
                        warn!(
                            seq = entry.seq,
                            kind = r.kind,
                            "receipt of unknown kind; dropping"
                        );
                        self.acks.push_back(entry.seq);
                    }
                }
            }
            Some(Body::DevicesChanged(changed)) => {
                if changed.user_id == self.shared.user_id {
                    info!(devices = ?changed.devices, "this account's devices changed");
                    self.crypto.set_own_devices(&changed.devices);
                    self.emit(Event::DevicesChanged {
                        devices: ids::devices(&changed.devices),
                    });
                }
                self.acks.push_back(entry.seq);
            }
            Some(Body::Undelivered(u)) => {
                self.acks.push_back(entry.seq);
                if u.from_device == self.shared.device_id {
                    // Resent from `flush_retained`, after the link's turn.
                    self.undelivered.push(u);
                } else {
                    // Another device of this account sent them; it resends.
                    let phone = self.phones.get(&u.to_user).cloned().unwrap_or_default();
                    self.emit(Event::Undelivered {
                        to_user: UserId(u.to_user),
                        phone,
                        client_msg_ids: u.client_msg_ids,
                        resending: Vec::new(),
                    });
                }
            }
            Some(Body::GroupMessage(m)) => self.on_group_message(entry.seq, entry.server_ts_ms, m),
            Some(Body::GroupEvent(e)) => self.on_group_event(entry.seq, e),
            None => {
                warn!(seq = entry.seq, "queue entry of unknown kind; dropping");
                self.acks.push_back(entry.seq);
            }
        }
    }

    fn on_message(&mut self, seq: u64, server_ts_ms: u64, m: pb::Message) {
        self.phones.insert(m.from_user, m.from_phone.clone());
        let key = (m.from_user, m.from_device, m.client_msg_id.clone());
        match self.crypto.seen.get(&key).copied() {
            Some(first) if first != seq => {
                // A second copy of a message already handled.
                self.acks.push_back(seq);
                return;
            }
            // The application holds this entry and will ack it.
            Some(_) if self.emitted.contains(&seq) => return,
            Some(_) => {
                // Handled by an earlier run: its Olm key is used up, so hand
                // over the copy kept until the ack, if any; else it was acked.
                match self.crypto.held(seq).cloned() {
                    Some(held) => self.emit_message(seq, held),
                    None => self.acks.push_back(seq),
                }
                return;
            }
            None => {}
        }
        self.crypto.seen.insert(key, seq);
        self.crypto.mark_dirty();
        // A device of a known contact never seen before: its other devices
        // may have changed too (a re-registration replaces them all).
        let unknown_device = m.from_user != self.shared.user_id
            && self
                .crypto
                .known_devices(m.from_user)
                .is_some_and(|known| !known.contains(&m.from_device));
        if unknown_device {
            self.refresh_devices(m.from_user);
        }
        let opened = self
            .crypto
            .decrypt(m.from_user, m.from_device, &m.payload, unknown_device)
            .and_then(|opened| {
                let p = &opened.plaintext;
                if p.kind != KIND_MESSAGE && p.kind != KIND_SENDER_KEY {
                    return Err(format!("unsupported content kind {}", p.kind));
                }
                if m.to_user != 0 && p.to_user != m.to_user {
                    return Err("addressed to another conversation than the server says".into());
                }
                Ok(opened)
            });
        let opened = opened.and_then(|opened| {
            if opened.plaintext.kind == KIND_SENDER_KEY {
                self.on_sender_key(&m, &opened.plaintext)?;
            }
            Ok(opened)
        });
        match opened {
            Ok(opened) if opened.plaintext.kind == KIND_SENDER_KEY => {
                if opened.identity_changed {
                    self.safety_number_changed(m.from_user);
                }
                // Handled here: nothing for the application.
                self.acks.push_back(seq);
            }
            Ok(opened) => {
                if opened.identity_changed {
                    self.safety_number_changed(m.from_user);
                }
                let message = Decrypted {
                    from_user: m.from_user,
                    from_device: m.from_device,
                    from_phone: m.from_phone,
                    to_user: opened.plaintext.to_user,
                    client_msg_id: m.client_msg_id,
                    body: opened.plaintext.body,
                    sent_at_ms: opened.plaintext.sent_at_ms,
                    server_ts_ms,
                    group_id: 0,
                    group_seq: 0,
                };
                self.crypto.hold(seq, message.clone());
                self.emit_message(seq, message);
            }
            Err(reason) => {
                warn!(
                    seq,
                    from_user = m.from_user,
                    from_device = m.from_device,
                    %reason,
                    "cannot decrypt a message"
                );
                // Whatever we hold with that device is out of step with it:
                // the next message to it starts a new session.
                self.crypto.forget_sessions(m.from_user, m.from_device);
                self.acks.push_back(seq);
                self.emit(Event::Undecryptable {
                    seq: Seq(seq),
                    from_user: UserId(m.from_user),
                    from_device: DeviceId(m.from_device),
                    from_phone: m.from_phone,
                    client_msg_id: m.client_msg_id,
                    group_id: None,
                    reason,
                });
            }
        }
    }

    fn emit_message(&mut self, seq: u64, m: Decrypted) {
        self.emitted.insert(seq, ());
        let from_own_device = m.from_user == self.shared.user_id;
        if m.group_id != 0 {
            self.emit(Event::GroupMessage {
                seq: Seq(seq),
                group_id: GroupId(m.group_id),
                group_seq: m.group_seq,
                from_user: UserId(m.from_user),
                from_device: DeviceId(m.from_device),
                from_phone: m.from_phone,
                from_own_device,
                client_msg_id: m.client_msg_id,
                payload: m.body,
                sent_at_ms: m.sent_at_ms,
                server_ts_ms: m.server_ts_ms,
            });
            return;
        }
        self.emit(Event::Message {
            seq: Seq(seq),
            from_user: UserId(m.from_user),
            from_device: DeviceId(m.from_device),
            from_phone: m.from_phone,
            to_user: UserId(m.to_user),
            from_own_device,
            client_msg_id: m.client_msg_id,
            payload: m.body,
            sent_at_ms: m.sent_at_ms,
            server_ts_ms: m.server_ts_ms,
        });
    }

    /// The client stops: tell everyone still waiting.
    async fn finish(&mut self, reason: CloseReason) {
        info!(%reason, "client stopped");
        let _ = self.shared.closed.set(reason.clone());
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            let closed = || Error::Closed(reason.clone());
            match cmd {
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::Lookup { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::ReadReceipt { reply, .. }
                | Command::RevokeDevice { reply, .. }
                | Command::FetchKeys { reply, .. }
                | Command::KeysPublished { reply } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::CreateLinkCode { reply } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::ListDevices { reply } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::Group { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::SafetyNumber { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
                Command::Ack { seqs } => {
                    for seq in seqs {
                        self.crypto.release(seq);
                    }
                }
                Command::Close { reply } => self.close_replies.push(reply),
            }
        }
        for (_, reply) in self.admitting.drain(..) {
            let _ = reply.send(Err(Error::Closed(reason.clone())));
        }
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.send(Err(Error::Closed(reason.clone())));
        }
        for request in self.requests.drain(..) {
            request.fail(Error::Closed(reason.clone()));
        }
        for waiter in self.keys.waiters.drain(..) {
            let _ = waiter.send(Err(Error::Closed(reason.clone())));
        }
        self.flush_removals().await;
        self.save_crypto().await;
        // Unlocks the state directory before `close()` returns, so a new
        // client may start on it at once.
        self.state_file = None;
        self.store = None;
        for reply in self.close_replies.drain(..) {
            let _ = reply.send(());
        }
        self.emit(Event::Closed { reason });
        let events = self.events.clone();
        let mut pending = std::mem::take(&mut self.pending_events);
        let _ = timeout(EVENT_FLUSH_TIMEOUT, async move {
            while let Some(event) = pending.pop_front() {
                if events.send(event).await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}
