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
//!
//! This file holds the loop itself; each concern it serves has its own
//! submodule: `send` (the outbox path), `receive` (pushed entries),
//! `groups` (group sends and entries), `requests` (lookups, receipts and
//! other requests outside the outbox), `keys` (this device's keys and the
//! crypto state) and `devices` (peers' device and identity changes).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use switchboard_proto::pb::{self, client_frame, server_frame};
use switchboard_proto::{Session, limits};
use tokio::sync::mpsc::error::{SendError, TryRecvError};
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, info, warn};

mod devices;
mod groups;
mod keys;
mod receive;
mod requests;
mod send;

use requests::Request;

use super::{Command, Event, Reply, Sent, Shared};
use crate::connection::{Connection, Parts, goodbye_reason, unexpected};
use crate::crypto::Crypto;
use crate::error::{CloseReason, Error, ProtocolError, ServerError, StorageError};
use crate::outbox::{PendingSend, Queue, Retained, Store};
use crate::recent::Recent;
use crate::register::Credentials;
use crate::store::StateFile;
use crate::transport::{Reader, Writer};
use crate::{ClientConfig, ErrorCode};

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

/// Acks waiting for a connection. Past this the oldest are forgotten: the
/// server redelivers them and the client acks the redelivery (it remembers
/// what the application acked in `app_acked`).
const MAX_PENDING_ACKS: usize = 10_000;

/// Acked seqs remembered for re-acking redeliveries (message ids for
/// de-duplication are kept, persisted, by [`Crypto`]): more than a server
/// batch many times over.
const DEDUP_CAPACITY: usize = crate::crypto::DEDUP_CAPACITY;

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
        self.pump_requests(link);
        self.pump_sends(link);
        if link.session.pending_bytes() > 0 {
            link.session.seal(&mut link.out)?;
        }
        Ok(())
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
