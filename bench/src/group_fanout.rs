//! The group fan-out scenario: one group of N members (up to 1,024), every
//! member online on its own connection, sends to the group measured from the
//! send to the last member's receipt.
//!
//! It owns four measurements, each on the same connections: the send→last
//! member (and →median member) latency at a low rate; the highest rate whose
//! p99 send→last member stays within 100 ms (a ramp, as `ramp` does for
//! 1:1), reported as member deliveries per second; the growth of the
//! server's data dir per member delivery; and the same latency and ramp
//! against the baseline relay in the same run, for the ratio.
//!
//! Every member client acks what it receives, as a real client does, so the
//! server also sends the sender a delivery receipt per member: that is part
//! of the cost of a group message and is counted. Senders rotate over the
//! members by default (`--senders`): one user sending hundreds of messages a
//! second to a 1,024-member group would measure its own connection's
//! receipts, not the fan-out.
//!
//! The member connections live for the whole run (a task each, reading and
//! acking all the time), so nothing queues up between phases; a member the
//! server ends (a slow reader in an overloaded ramp step) reconnects and
//! drains, as a client does, and the refining steps after an overloaded
//! one start once no member has received anything for a second. A phase is a
//! [`Book`] the tasks record into, found by the phase number stamped in
//! each payload.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::harness::{
    CpuMeter, CpuUse, Latency, Sut, Target, connect_drained_with, histogram, latency, options,
    print_json, progress, register_users, start_relay,
};
use crate::link::{Link, Plain};
use crate::plot;

/// Concurrent registrations while setting up members.
const REGISTER_CONCURRENCY: usize = 64;
/// Members connecting at once.
const CONNECT_CONCURRENCY: usize = 256;
/// Phone-number prefix of this scenario's users (each scenario has its own).
const PHONE_PREFIX: u32 = 8_000_000;
/// Most members a group may have (PROTOCOL.md §11.24).
const MAX_MEMBERS: usize = 1024;
/// Idle clients ping this often (PROTOCOL.md: the server closes a
/// connection silent for 75 s).
const PING_INTERVAL: Duration = Duration::from_secs(25);
/// Sends handed to one member's task and not yet written. The scheduler
/// never waits for a member: past this the send is counted as skipped (the
/// load generator could not keep up), so the offered rate stays honest.
const SEND_BACKLOG: usize = 64;
/// How long the members may take to see the group's creation.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// After the last send of a latency or ramp phase: time allowed for every
/// member to receive every message (and the senders their receipts).
const DRAIN: Duration = Duration::from_secs(5);
/// The same for the data-dir phase, which must finish to be measured.
const DISK_DRAIN: Duration = Duration::from_secs(120);
/// A ramp step holds when p99 send→last member is within this ...
const P99_LIMIT_MS: f64 = 100.0;
/// ... and at least this share of its messages reached every member.
const KEEP_UP: f64 = 0.95;
/// Each ramp step offers this many times the rate of the one before.
const RAMP_STEP: f64 = 1.5;
/// Pause before each refining step (it follows an overloaded one), so the
/// target works off that step's debt first: at least this long, and until
/// no member has received anything for [`QUIET`] (at most [`SETTLE_MAX`]).
const SETTLE: Duration = Duration::from_secs(5);
/// See [`SETTLE`].
const QUIET: Duration = Duration::from_secs(1);
/// See [`SETTLE`].
const SETTLE_MAX: Duration = Duration::from_secs(120);
/// Times a member may reconnect over the run after the server ended its
/// connection (an overloaded step makes slow readers of some members,
/// which a client answers by reconnecting and draining its queue).
const REJOINS: u32 = 20;
/// The target for p99 send→last member at 1,024 members
/// (docs/BENCHMARKS.md), printed beside the measured figure.
const LATENCY_TARGET_MS: f64 = 20.0;
/// Bytes of the stamp at the start of each payload: phase, message index,
/// send time.
const STAMP_BYTES: usize = 16;
/// Messages sent (at [`WARMUP_RATE`]) before the latency phase and not
/// counted in it: the group's first messages load its state and the
/// payload paths, which a steady-state figure should not include.
const WARMUP_MESSAGES: u64 = 5;
/// See [`WARMUP_MESSAGES`] (messages per second).
const WARMUP_RATE: f64 = 10.0;

/// Options of `group-fanout`.
#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    target: Target,
    /// Members of the group (2 to 1,024), all online, one device each.
    #[arg(long, default_value_t = 1024)]
    members: usize,
    /// Messages per second in the latency phase.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Members that take turns sending (0: every member).
    #[arg(long, default_value_t = 0)]
    senders: usize,
    /// Payload bytes per message (at least 16, the stamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per second of the ramp's first step.
    #[arg(long, default_value_t = 5.0)]
    ramp_from: f64,
    /// Seconds per ramp step.
    #[arg(long, default_value_t = 10)]
    step_seconds: u64,
    /// Most ramp steps before the refining ones.
    #[arg(long, default_value_t = 12)]
    max_steps: usize,
    /// Extra steps after the first failed one, each halving (on a log
    /// scale) the gap between the highest rate that held and the lowest
    /// that failed.
    #[arg(long, default_value_t = 2)]
    refine: u32,
    /// Messages sent to measure the data dir's growth per member delivery.
    /// The server's log grows in 1 MiB steps and starts a new 32 MiB
    /// segment when full: at 1,024 members, 100 messages (about 25 MiB of
    /// log) measure the growth within one segment.
    #[arg(long, default_value_t = 100)]
    disk_messages: u64,
    /// Messages per second while measuring the data dir.
    #[arg(long, default_value_t = 20.0)]
    disk_rate: f64,
    /// Skip the baseline relay (by default its latency and ramp run after
    /// the server's, and the ratio of the sustained fan-outs is reported).
    #[arg(long)]
    no_baseline: bool,
    /// Run the baseline relay with `--receipts`: each member's ack becomes
    /// a receipt for the sender, as the server does.
    #[arg(long)]
    baseline_receipts: bool,
}

// ------------------------------------------------------------------ payload stamp

/// What each payload starts with, so a receiving member can tell which
/// phase and message it got and how long it took.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Stamp {
    phase: u32,
    index: u32,
    /// Microseconds since the run's epoch.
    sent_us: u64,
}

impl Stamp {
    fn payload(&self, size: usize) -> Vec<u8> {
        let mut p = vec![0u8; size.max(STAMP_BYTES)];
        p[..4].copy_from_slice(&self.phase.to_be_bytes());
        p[4..8].copy_from_slice(&self.index.to_be_bytes());
        p[8..16].copy_from_slice(&self.sent_us.to_be_bytes());
        p
    }

    fn parse(p: &[u8]) -> Option<Self> {
        Some(Self {
            phase: u32::from_be_bytes(p.get(..4)?.try_into().ok()?),
            index: u32::from_be_bytes(p.get(4..8)?.try_into().ok()?),
            sent_us: u64::from_be_bytes(p.get(8..16)?.try_into().ok()?),
        })
    }
}

/// The client message id of a phase's message (unique per sending device
/// over the run).
fn client_msg_id(phase: u32, index: u32) -> String {
    format!("{phase}-{index}")
}

/// The phase of a client message id made by [`client_msg_id`].
fn phase_of(client_msg_id: &str) -> Option<u32> {
    client_msg_id.split_once('-')?.0.parse().ok()
}

// ------------------------------------------------------------------ one phase's book

/// One message's arrivals.
#[derive(Default)]
struct Slot {
    /// Members that received it so far.
    received: AtomicU32,
    /// The slowest member's send→receipt (µs).
    last_us: AtomicU64,
    /// The latest send→arrival in a member's socket (µs, from the kernel's
    /// receive time; see [`Link::received_at`]).
    last_socket_us: AtomicU64,
    /// Members whose arrival had a kernel receive time.
    socket_stamped: AtomicU32,
    /// The send→receipt of the member that received it in the middle.
    median_us: AtomicU64,
}

/// What the member tasks record during one phase. Written with atomics
/// from every member task; read once the phase is over.
struct Book {
    id: u32,
    /// Members each message goes to (all but its sender).
    recipients: u32,
    /// The arrival whose latency is the median member's.
    median_rank: u32,
    slots: Vec<Slot>,
    sent: AtomicU64,
    skipped: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    deliveries: AtomicU64,
    complete: AtomicU64,
    receipts: AtomicU64,
    /// send→✓ samples (µs), one per message: a tiny section, no await.
    ack_us: Mutex<Vec<u64>>,
    /// Woken on each completed message, ✓, error and receipt; the phase's
    /// runner waits on it for the phase to settle.
    progress: Notify,
}

impl Book {
    fn new(id: u32, messages: u64, recipients: u32) -> Self {
        Self {
            id,
            recipients,
            median_rank: recipients.div_ceil(2).max(1),
            slots: (0..messages).map(|_| Slot::default()).collect(),
            sent: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            complete: AtomicU64::new(0),
            receipts: AtomicU64::new(0),
            ack_us: Mutex::new(Vec::with_capacity(usize::try_from(messages).unwrap_or(0))),
            progress: Notify::new(),
        }
    }

    /// A member received message `index` `latency_us` after it was sent,
    /// the bytes having reached its socket `socket_us` after (when the
    /// kernel's receive time is known).
    fn arrived(&self, index: u32, latency_us: u64, socket_us: Option<u64>) {
        let Some(slot) = usize::try_from(index).ok().and_then(|i| self.slots.get(i)) else {
            return;
        };
        // The maxima first: whoever counts the last arrival then reads
        // final ones.
        slot.last_us.fetch_max(latency_us, Ordering::AcqRel);
        if let Some(us) = socket_us {
            slot.last_socket_us.fetch_max(us, Ordering::AcqRel);
            slot.socket_stamped.fetch_add(1, Ordering::AcqRel);
        }
        let rank = slot.received.fetch_add(1, Ordering::AcqRel) + 1;
        if rank == self.median_rank {
            slot.median_us.store(latency_us, Ordering::Release);
        }
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if rank == self.recipients {
            self.complete.fetch_add(1, Ordering::AcqRel);
            self.progress.notify_one();
        }
    }

    fn acked(&self, took: Duration) {
        if let Ok(mut v) = self.ack_us.lock() {
            v.push(took.as_micros().max(1) as u64);
        }
        self.acked.fetch_add(1, Ordering::AcqRel);
        self.progress.notify_one();
    }

    fn refused(&self) {
        self.errors.fetch_add(1, Ordering::AcqRel);
        self.progress.notify_one();
    }

    fn receipt(&self) {
        self.receipts.fetch_add(1, Ordering::AcqRel);
        self.progress.notify_one();
    }

    /// Every message is accounted for: reached every member or was never
    /// sent or refused, every sent one has its answer, and (when the target
    /// sends them) every delivery its receipt.
    fn settled(&self, receipts_expected: bool) -> bool {
        let messages = self.slots.len() as u64;
        let skipped = self.skipped.load(Ordering::Acquire);
        let errors = self.errors.load(Ordering::Acquire);
        let answered = self.acked.load(Ordering::Acquire) + errors + skipped >= messages;
        let reached = self.complete.load(Ordering::Acquire) + errors + skipped >= messages;
        let receipted = !receipts_expected
            || self.receipts.load(Ordering::Acquire) >= self.deliveries.load(Ordering::Acquire);
        answered && reached && receipted
    }
}

// ------------------------------------------------------------------ the members

/// What every member task shares.
struct Room {
    /// The time origin of the payload stamps.
    epoch: Instant,
    /// `epoch` on the system clock (the kernel's receive times are on it).
    epoch_wall: SystemTime,
    group_id: u64,
    size: usize,
    /// Members (other than the creator) that have seen the group's
    /// creation.
    joined: AtomicUsize,
    joined_notify: Notify,
    /// When a member last received anything (µs since `epoch`).
    last_delivery_us: AtomicU64,
}

/// A send handed to a member's task.
struct SendCmd {
    book: Arc<Book>,
    index: u32,
}

/// One member's connection, for the whole run: writes the sends it is
/// handed, acks everything it receives, and records what it receives into
/// the current phase's book. Ends when its command channel closes, or with
/// the connection's error.
async fn member(
    mut link: Link,
    me: usize,
    room: Arc<Room>,
    books: watch::Receiver<Arc<Book>>,
    mut sends: mpsc::Receiver<SendCmd>,
    rejoin: Option<Rejoin>,
) -> Result<()> {
    let mut joined = false;
    let mut left = REJOINS;
    loop {
        let ended =
            serve_member(&mut link, me, &room, books.clone(), &mut sends, &mut joined).await;
        let Err(e) = ended else { return Ok(()) };
        let Some(r) = rejoin.as_ref().filter(|_| left > 0) else {
            return Err(e);
        };
        // As a client does: reconnect and drain what is queued (what it
        // drains is not counted: the step it belonged to failed anyway).
        left -= 1;
        tracing::warn!(member = me, error = %e, "member reconnecting");
        tokio::time::sleep(Duration::from_millis(200)).await;
        link = Link::Server(Box::new(
            connect_drained_with(&r.tcp, &r.creds, &member_options())
                .await
                .with_context(|| format!("reconnecting after: {e:#}"))?,
        ));
    }
}

/// A member's connection options: the kernel's receive times on, for
/// [`PhaseReport::send_to_last_member_socket`].
fn member_options() -> switchboard_client::ConnectOptions {
    let mut o = options("group-fanout");
    o.receive_timestamps = true;
    o
}

/// Where a member reconnects when the server ends its connection.
struct Rejoin {
    tcp: String,
    creds: switchboard_client::Credentials,
}

/// One connection's life of a member (see [`member`]).
async fn serve_member(
    link: &mut Link,
    me: usize,
    room: &Room,
    mut books: watch::Receiver<Arc<Book>>,
    sends: &mut mpsc::Receiver<SendCmd>,
    joined: &mut bool,
) -> Result<()> {
    // Request id → (phase, when sent) for sends awaiting their ✓; those of
    // a connection that ended get no answer (their step fails).
    let mut pending: HashMap<u32, (Arc<Book>, Instant)> = HashMap::new();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            cmd = sends.recv() => {
                let Some(SendCmd { book, index }) = cmd else { return Ok(()) };
                let stamp = Stamp {
                    phase: book.id,
                    index,
                    sent_us: room.epoch.elapsed().as_micros() as u64,
                };
                let id = link.next_request_id();
                let t0 = Instant::now();
                link.send_frame(&pb::ClientFrame {
                    id,
                    body: Some(In::SendGroup(pb::SendGroup {
                        group_id: room.group_id,
                        client_msg_id: client_msg_id(book.id, index),
                        payload: stamp.payload(room.size).into(),
                        // Each id goes out once, as from the SDK.
                        first_attempt: true,
                    })),
                })
                .await?;
                book.sent.fetch_add(1, Ordering::Relaxed);
                pending.insert(id, (book, t0));
            }
            _ = ping.tick() => {
                let id = link.next_request_id();
                let ping = pb::ClientFrame { id, body: Some(In::Ping(pb::Ping {})) };
                link.send_frame(&ping).await?;
            }
            frame = link.next_frame() => {
                let frame = frame?;
                match frame.body {
                    Some(Out::SendOk(_)) => {
                        if let Some((book, t0)) = pending.remove(&frame.id) {
                            book.acked(t0.elapsed());
                        }
                    }
                    Some(Out::Error(e)) => {
                        if let Some((book, _)) = pending.remove(&frame.id) {
                            tracing::debug!(?e, "group send refused");
                            book.refused();
                        }
                    }
                    Some(Out::Deliver(d)) => {
                        room.last_delivery_us
                            .fetch_max(room.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                        let book = books.borrow_and_update().clone();
                        let at = link.received_at();
                        let seqs = take_entries(d, at, me, room, &book, joined);
                        link.ack(&seqs).await?;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Records what a member received into the current phase's `book` (and
/// the group's creation into the room); the seqs to ack.
fn take_entries(
    d: pb::Deliver,
    received_at: Option<SystemTime>,
    me: usize,
    room: &Room,
    book: &Book,
    joined: &mut bool,
) -> Vec<u64> {
    use pb::queue_entry::Body;
    let now_us = room.epoch.elapsed().as_micros() as u64;
    let mut seqs = Vec::with_capacity(d.entries.len());
    for e in d.entries {
        seqs.push(e.seq);
        match e.body {
            Some(Body::GroupMessage(m)) if m.group_id == room.group_id => {
                if let Some(s) = Stamp::parse(&m.payload)
                    && s.phase == book.id
                {
                    let socket_us = received_at.map(|at| {
                        let sent = room.epoch_wall + Duration::from_micros(s.sent_us);
                        at.duration_since(sent)
                            .map_or(1, |d| (d.as_micros() as u64).max(1))
                    });
                    book.arrived(s.index, now_us.saturating_sub(s.sent_us).max(1), socket_us);
                }
            }
            Some(Body::GroupEvent(ev))
                if ev.group_id == room.group_id
                    && ev.kind() == pb::GroupEventKind::Created
                    && me != 0
                    && !*joined =>
            {
                *joined = true;
                room.joined.fetch_add(1, Ordering::AcqRel);
                room.joined_notify.notify_one();
            }
            Some(Body::Receipt(r))
                if r.client_msg_ids.first().and_then(|id| phase_of(id)) == Some(book.id) =>
            {
                book.receipt();
            }
            _ => {}
        }
    }
    seqs
}

/// Creates the group from the first member's link, with everyone else as
/// members; the group id. Pushes that arrive meanwhile are acked.
async fn create_group(link: &mut Link, others: &[u64]) -> Result<u64> {
    let id = link.next_request_id();
    link.send_frame(&pb::ClientFrame {
        id,
        body: Some(In::CreateGroup(pb::CreateGroup {
            name: "fan-out".into(),
            members: others.to_vec(),
            ..Default::default()
        })),
    })
    .await?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let f = tokio::time::timeout_at(deadline, link.next_frame())
            .await
            .context("no answer to CreateGroup")??;
        match f.body {
            Some(Out::GroupInfo(info)) if f.id == id => return Ok(info.group_id),
            Some(Out::Error(e)) if f.id == id => bail!("CreateGroup refused: {e:?}"),
            Some(Out::Deliver(d)) => {
                let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                link.ack(&seqs).await?;
            }
            _ => {}
        }
    }
}

/// What one phase asks for.
struct Plan {
    /// "warm-up (not counted)", "latency", "disk" or "ramp".
    kind: &'static str,
    rate: f64,
    messages: u64,
    drain: Duration,
}

/// The members of one target's group, their tasks, and the phases run on
/// them.
struct Fleet {
    /// "switchboard", "baseline" or "baseline+receipts".
    target: &'static str,
    /// The target's process id, for its CPU.
    pid: Option<u32>,
    members: usize,
    /// Members taking turns to send.
    rotation: usize,
    /// The target turns each member's ack into a receipt for the sender.
    receipts_expected: bool,
    /// One per member; its task holds the receiver (see [`SEND_BACKLOG`]).
    sends: Vec<mpsc::Sender<SendCmd>>,
    /// The current phase's book; every member task holds a receiver.
    books: watch::Sender<Arc<Book>>,
    tasks: Vec<JoinHandle<Result<()>>>,
    room: Arc<Room>,
    last_phase: u32,
    quiet: bool,
}

impl Fleet {
    /// Creates the group on `links[0]` with the other `user_ids` in it,
    /// starts a task per member and waits until every member has seen the
    /// group's creation.
    async fn start(
        target: &'static str,
        pid: Option<u32>,
        mut links: Vec<Link>,
        user_ids: &[u64],
        receipts_expected: bool,
        rejoin: Option<(&str, &[switchboard_client::Credentials])>,
        a: &FanoutArgs,
    ) -> Result<Self> {
        let members = links.len();
        let creator = links.first_mut().context("no members")?;
        let group_id = create_group(creator, user_ids.get(1..).unwrap_or_default()).await?;
        let room = Arc::new(Room {
            epoch: Instant::now(),
            epoch_wall: SystemTime::now(),
            group_id,
            size: a.size,
            joined: AtomicUsize::new(0),
            joined_notify: Notify::new(),
            last_delivery_us: AtomicU64::new(0),
        });
        let (books, books_rx) = watch::channel(Arc::new(Book::new(0, 0, 1)));
        let mut sends = Vec::with_capacity(members);
        let mut tasks = Vec::with_capacity(members);
        for (me, link) in links.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(SEND_BACKLOG);
            sends.push(tx);
            let rejoin = rejoin.and_then(|(tcp, users)| {
                Some(Rejoin {
                    tcp: tcp.to_owned(),
                    creds: users.get(me)?.clone(),
                })
            });
            tasks.push(tokio::spawn(member(
                link,
                me,
                room.clone(),
                books_rx.clone(),
                rx,
                rejoin,
            )));
        }
        let mut fleet = Self {
            target,
            pid,
            members,
            rotation: if a.senders == 0 {
                members
            } else {
                a.senders.min(members)
            },
            receipts_expected,
            sends,
            books,
            tasks,
            room: room.clone(),
            last_phase: 0,
            quiet: a.target.json,
        };
        let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
        while room.joined.load(Ordering::Acquire) < members - 1 {
            if tokio::time::timeout_at(deadline, room.joined_notify.notified())
                .await
                .is_err()
            {
                fleet.check_members().await?;
                bail!(
                    "{target}: only {} of {} members saw the group's creation",
                    room.joined.load(Ordering::Acquire),
                    members - 1
                );
            }
        }
        Ok(fleet)
    }

    /// Fails with the error of a member whose connection ended.
    async fn check_members(&mut self) -> Result<()> {
        if let Some(i) = self.tasks.iter().position(JoinHandle::is_finished) {
            let task = self.tasks.swap_remove(i);
            match task.await {
                Ok(Ok(())) => bail!("{}: member {i} stopped", self.target),
                Ok(Err(e)) => return Err(e.context(format!("{}: member {i}", self.target))),
                Err(e) => bail!("{}: member {i}'s task: {e}", self.target),
            }
        }
        Ok(())
    }

    /// Offers `plan.messages` at `plan.rate`, senders taking turns, waits
    /// for them to settle (at most `plan.drain` after the last send), and
    /// measures.
    async fn run(&mut self, plan: &Plan) -> Result<Measured> {
        self.last_phase += 1;
        let recipients = u32::try_from(self.members - 1).context("members")?;
        let book = Arc::new(Book::new(self.last_phase, plan.messages, recipients));
        self.books.send_replace(book.clone());
        let cpu = CpuMeter::start(self.pid);
        let bar = progress(
            plan.messages,
            &format!("{} {} {:.1}/s", self.target, plan.kind, plan.rate),
        );
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate.max(1e-3)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for index in 0..plan.messages {
            tick.tick().await;
            let member = usize::try_from(index).unwrap_or(0) % self.rotation;
            let cmd = SendCmd {
                book: book.clone(),
                index: u32::try_from(index).context("too many messages")?,
            };
            if self.sends[member].try_send(cmd).is_err() {
                book.skipped.fetch_add(1, Ordering::AcqRel);
            }
            bar.inc(1);
        }
        let deadline = tokio::time::Instant::now() + plan.drain;
        while !book.settled(self.receipts_expected) {
            if tokio::time::timeout_at(deadline, book.progress.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let cpu = cpu.finish();
        bar.finish_and_clear();
        self.check_members().await?;
        Measured::new(self, plan, &book, cpu)
    }

    /// Waits [`SETTLE`], then until no member has received anything for
    /// [`QUIET`] (at most [`SETTLE_MAX`]): the target has worked off what
    /// an overloaded step left queued.
    async fn settle(&self) {
        tokio::time::sleep(SETTLE).await;
        let deadline = Instant::now() + SETTLE_MAX;
        while Instant::now() < deadline {
            let last = Duration::from_micros(self.room.last_delivery_us.load(Ordering::Relaxed));
            if self.room.epoch.elapsed().saturating_sub(last) >= QUIET {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the member tasks (closing their connections).
    fn stop(self) {
        drop(self.sends);
        for t in self.tasks {
            t.abort();
        }
    }
}

// ------------------------------------------------------------------ reports

/// One phase's figures.
#[derive(Serialize, Clone)]
struct PhaseReport {
    target: &'static str,
    /// "warm-up (not counted)", "latency", "disk" or "ramp".
    phase: &'static str,
    members: usize,
    offered_msgs_per_sec: f64,
    /// Messages offered (rate × seconds).
    messages: u64,
    /// SendGroup frames written.
    sent: u64,
    /// Not sent: the member's task still had [`SEND_BACKLOG`] sends waiting
    /// (the load generator fell behind).
    skipped: u64,
    /// ✓ (SendOk) received.
    acked: u64,
    /// Sends refused.
    errors: u64,
    /// Messages every other member received.
    complete: u64,
    /// GroupMessages received over all members.
    deliveries: u64,
    /// Member deliveries per second of offered time.
    deliveries_per_sec: f64,
    /// Delivery receipts the senders got for this phase's messages.
    receipts: u64,
    /// Over complete messages: send → the last member's receipt (as the
    /// load generator's member tasks saw it).
    send_to_last_member: Latency,
    /// Over complete messages whose every arrival had a kernel receive
    /// time: send → the bytes reaching the last member's socket (the
    /// delivery itself, without the load generator's own queueing while it
    /// reads a thousand sockets on one core).
    send_to_last_member_socket: Option<Latency>,
    /// Over complete messages: send → the median member's receipt.
    send_to_median_member: Latency,
    send_to_ack: Latency,
    cpu: CpuUse,
    /// Target CPU per member delivery, in µs.
    target_cpu_us_per_delivery: Option<f64>,
}

/// A phase's report and its histograms (µs), for plots.
struct Measured {
    report: PhaseReport,
    last: Histogram<u64>,
    median: Histogram<u64>,
}

impl Measured {
    fn new(fleet: &Fleet, plan: &Plan, book: &Book, cpu: CpuUse) -> Result<Self> {
        let mut last = histogram()?;
        let mut median = histogram()?;
        let mut socket = histogram()?;
        for slot in &book.slots {
            if slot.received.load(Ordering::Acquire) >= book.recipients {
                last.saturating_record(slot.last_us.load(Ordering::Acquire).max(1));
                median.saturating_record(slot.median_us.load(Ordering::Acquire).max(1));
                if slot.socket_stamped.load(Ordering::Acquire) >= book.recipients {
                    socket.saturating_record(slot.last_socket_us.load(Ordering::Acquire).max(1));
                }
            }
        }
        let mut acks = histogram()?;
        if let Ok(v) = book.ack_us.lock() {
            for &us in v.iter() {
                acks.saturating_record(us);
            }
        }
        let seconds = plan.messages as f64 / plan.rate.max(1e-3);
        let deliveries = book.deliveries.load(Ordering::Acquire);
        let deliveries_per_sec = deliveries as f64 / seconds.max(1e-3);
        Ok(Self {
            report: PhaseReport {
                target: fleet.target,
                phase: plan.kind,
                members: fleet.members,
                offered_msgs_per_sec: plan.rate,
                messages: plan.messages,
                sent: book.sent.load(Ordering::Acquire),
                skipped: book.skipped.load(Ordering::Acquire),
                acked: book.acked.load(Ordering::Acquire),
                errors: book.errors.load(Ordering::Acquire),
                complete: book.complete.load(Ordering::Acquire),
                deliveries,
                deliveries_per_sec,
                receipts: book.receipts.load(Ordering::Acquire),
                send_to_last_member: latency(&last),
                send_to_last_member_socket: (!socket.is_empty()).then(|| latency(&socket)),
                send_to_median_member: latency(&median),
                send_to_ack: latency(&acks),
                cpu,
                target_cpu_us_per_delivery: cpu
                    .target_cores
                    .filter(|_| deliveries_per_sec > 0.0)
                    .map(|c| c * 1e6 / deliveries_per_sec),
            },
            last,
            median,
        })
    }

    /// A ramp step holds: p99 send→last member within the limit and
    /// (nearly) every message reached every member.
    fn held(&self) -> bool {
        let r = &self.report;
        r.send_to_last_member.p99_ms <= P99_LIMIT_MS
            && r.complete as f64 >= KEEP_UP * r.messages as f64
    }
}

fn print_phase(r: &PhaseReport) {
    println!(
        "  {} [{}] {:.1} msgs/s × {} members: {}/{} messages reached every member, {} deliveries ({:.0}/s), {} sent, {} ✓, {} ✓✓, {} errors, {} skipped\n    send→last member   {}\n    send→last socket   {}\n    send→median member {}\n    send→✓             {}\n    {}; target CPU per delivery {}",
        r.phase,
        r.target,
        r.offered_msgs_per_sec,
        r.members,
        r.complete,
        r.messages,
        r.deliveries,
        r.deliveries_per_sec,
        r.sent,
        r.acked,
        r.receipts,
        r.errors,
        r.skipped,
        r.send_to_last_member,
        r.send_to_last_member_socket
            .as_ref()
            .map_or_else(|| "n/a".to_owned(), ToString::to_string),
        r.send_to_median_member,
        r.send_to_ack,
        r.cpu,
        r.target_cpu_us_per_delivery
            .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.2} µs")),
    );
}

/// Where a ramp stopped and every step on the way.
#[derive(Serialize)]
struct RampReport {
    /// The highest offered rate that held (p99 send→last member ≤ 100 ms,
    /// ≥ 95% of messages reached every member); none if the first failed.
    knee_msgs_per_sec: Option<f64>,
    /// The same in member deliveries: messages/s × (members − 1).
    knee_deliveries_per_sec: Option<f64>,
    /// The ramp ran out of steps before failing: the real knee is higher.
    knee_is_lower_bound: bool,
    steps: Vec<PhaseReport>,
}

/// One ramp step at `rate`: whether it held, and its report.
async fn ramp_step(fleet: &mut Fleet, a: &FanoutArgs, rate: f64) -> Result<(bool, PhaseReport)> {
    let messages = (rate * a.step_seconds as f64).round().max(1.0) as u64;
    let m = fleet
        .run(&Plan {
            kind: "ramp",
            rate,
            messages,
            drain: DRAIN,
        })
        .await?;
    if !fleet.quiet {
        print_phase(&m.report);
    }
    Ok((m.held(), m.report))
}

/// Raises the rate ×1.5 per step until a step fails, then bisects.
async fn ramp(fleet: &mut Fleet, a: &FanoutArgs) -> Result<RampReport> {
    let mut report = RampReport {
        knee_msgs_per_sec: None,
        knee_deliveries_per_sec: None,
        knee_is_lower_bound: false,
        steps: Vec::new(),
    };
    let mut rate = a.ramp_from;
    let mut failed = None;
    for i in 0..a.max_steps {
        let (held, r) = ramp_step(fleet, a, rate).await?;
        report.steps.push(r);
        if !held {
            failed = Some(rate);
            break;
        }
        report.knee_msgs_per_sec = Some(rate);
        report.knee_is_lower_bound = i + 1 == a.max_steps;
        rate *= RAMP_STEP;
    }
    if let (Some(mut good), Some(mut bad)) = (report.knee_msgs_per_sec, failed) {
        for _ in 0..a.refine {
            let mid = (good * bad).sqrt();
            fleet.settle().await;
            let (held, r) = ramp_step(fleet, a, mid).await?;
            report.steps.push(r);
            if held {
                good = mid;
            } else {
                bad = mid;
            }
        }
        report.knee_msgs_per_sec = Some(good);
    }
    report.knee_deliveries_per_sec = report
        .knee_msgs_per_sec
        .map(|k| k * (fleet.members - 1) as f64);
    Ok(report)
}

/// The data dir's growth over a fixed number of messages.
#[derive(Serialize)]
struct DiskReport {
    messages: u64,
    deliveries: u64,
    /// Bytes the server process caused to be written to storage
    /// (`write_bytes` of /proc/PID/io) per member delivery: the write
    /// volume, which the data dir's size hides (the log grows in 1 MiB
    /// steps and its segments are recycled). None if the server was not
    /// started by this tool.
    written_bytes_per_delivery: Option<f64>,
    /// Allocated bytes (as `du` counts them) before and after.
    bytes_before: u64,
    bytes_after: u64,
    /// Apparent bytes (file lengths, as `du -b` counts them).
    apparent_bytes_before: u64,
    apparent_bytes_after: u64,
    /// Allocated growth per member delivery.
    bytes_per_delivery: f64,
    /// Apparent growth per member delivery.
    apparent_bytes_per_delivery: f64,
    phase: PhaseReport,
}

/// Bytes a process has caused to be written to storage so far
/// (`write_bytes` in /proc/PID/io); `None` if it cannot be read.
fn storage_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// (allocated, apparent) bytes of the files under `dir`. Files that vanish
/// during the walk (the store compacts) are skipped.
fn dir_bytes(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut allocated, mut apparent) = (0u64, 0u64);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", d.display())),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                allocated += meta.blocks() * 512;
                apparent += meta.len();
            }
        }
    }
    Ok((allocated, apparent))
}

async fn disk_phase(fleet: &mut Fleet, data_dir: &Path, a: &FanoutArgs) -> Result<DiskReport> {
    let (before, apparent_before) = dir_bytes(data_dir)?;
    let written_before = fleet.pid.and_then(storage_write_bytes);
    let m = fleet
        .run(&Plan {
            kind: "disk",
            rate: a.disk_rate,
            messages: a.disk_messages,
            drain: DISK_DRAIN,
        })
        .await?;
    let (after, apparent_after) = dir_bytes(data_dir)?;
    let written_after = fleet.pid.and_then(storage_write_bytes);
    let deliveries = m.report.deliveries;
    let per = |b: u64, a: u64| (a as f64 - b as f64) / (deliveries.max(1) as f64);
    if !fleet.quiet {
        print_phase(&m.report);
    }
    Ok(DiskReport {
        messages: a.disk_messages,
        deliveries,
        written_bytes_per_delivery: written_before.zip(written_after).map(|(b, a)| per(b, a)),
        bytes_before: before,
        bytes_after: after,
        apparent_bytes_before: apparent_before,
        apparent_bytes_after: apparent_after,
        bytes_per_delivery: per(before, after),
        apparent_bytes_per_delivery: per(apparent_before, apparent_after),
        phase: m.report,
    })
}

/// Everything measured on one target.
#[derive(Serialize)]
struct TargetReport {
    target: &'static str,
    members: usize,
    /// Not counted anywhere else (see [`WARMUP_MESSAGES`]).
    warmup: PhaseReport,
    latency: PhaseReport,
    /// The server only.
    disk: Option<DiskReport>,
    ramp: RampReport,
}

/// The latency phase, the data dir (when given one) and the ramp on one
/// fleet.
async fn measure(
    mut fleet: Fleet,
    data_dir: Option<&Path>,
    a: &FanoutArgs,
) -> Result<(TargetReport, Measured)> {
    let warmup = fleet
        .run(&Plan {
            kind: "warm-up (not counted)",
            rate: WARMUP_RATE,
            messages: WARMUP_MESSAGES,
            drain: DRAIN,
        })
        .await?;
    if !fleet.quiet {
        print_phase(&warmup.report);
    }
    let latency = fleet
        .run(&Plan {
            kind: "latency",
            rate: a.rate,
            messages: (a.rate * a.seconds as f64).round().max(1.0) as u64,
            drain: DRAIN,
        })
        .await?;
    if !fleet.quiet {
        print_phase(&latency.report);
    }
    let disk = match data_dir {
        Some(dir) => Some(disk_phase(&mut fleet, dir, a).await?),
        None => None,
    };
    let ramp = ramp(&mut fleet, a).await?;
    let report = TargetReport {
        target: fleet.target,
        members: fleet.members,
        warmup: warmup.report,
        latency: latency.report.clone(),
        disk,
        ramp,
    };
    fleet.stop();
    Ok((report, latency))
}

/// Connects every registered member to the server (authenticated and
/// drained).
async fn server_links(tcp: &str, users: &[switchboard_client::Credentials]) -> Result<Vec<Link>> {
    let mut links = Vec::with_capacity(users.len());
    let bar = progress(users.len() as u64, "connecting");
    for chunk in users.chunks(CONNECT_CONCURRENCY) {
        let mut tasks = Vec::with_capacity(chunk.len());
        for u in chunk {
            let (tcp, u) = (tcp.to_owned(), u.clone());
            tasks.push(tokio::spawn(async move {
                connect_drained_with(&tcp, &u, &member_options()).await
            }));
        }
        for t in tasks {
            links.push(Link::Server(Box::new(
                t.await.context("connect task")?.context("connecting")?,
            )));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(links)
}

/// Connects users 1..=n to the relay.
async fn relay_links(tcp: &str, n: usize) -> Result<Vec<Link>> {
    let mut links = Vec::with_capacity(n);
    for start in (0..n).step_by(CONNECT_CONCURRENCY) {
        let mut tasks = Vec::new();
        for user in start..(start + CONNECT_CONCURRENCY).min(n) {
            let tcp = tcp.to_owned();
            tasks.push(tokio::spawn(async move {
                Plain::connect(&tcp, user as u64 + 1, true).await
            }));
        }
        for t in tasks {
            links.push(Link::Relay(t.await.context("connect task")??));
        }
    }
    Ok(links)
}

fn print_target(r: &TargetReport) {
    let l = &r.latency;
    println!(
        "group-fanout [{}]: {} members, all online, one device each",
        r.target, r.members
    );
    println!(
        "  latency at {:.1} msgs/s: {}/{} messages reached every member; send→last member p50 {:.2} ms, p99 {:.2} ms (target at 1,024 members: p99 ≤ {LATENCY_TARGET_MS} ms); send→median member p50 {:.2} ms, p99 {:.2} ms",
        l.offered_msgs_per_sec,
        l.complete,
        l.messages,
        l.send_to_last_member.p50_ms,
        l.send_to_last_member.p99_ms,
        l.send_to_median_member.p50_ms,
        l.send_to_median_member.p99_ms,
    );
    if let Some(s) = &l.send_to_last_member_socket {
        println!(
            "  delivery (bytes in the last member's socket, kernel receive time) at {:.1} msgs/s: p50 {:.2} ms, p99 {:.2} ms over {} messages (target at 1,024 members: p99 ≤ {LATENCY_TARGET_MS} ms)",
            l.offered_msgs_per_sec, s.p50_ms, s.p99_ms, s.count
        );
    }
    match (r.ramp.knee_msgs_per_sec, r.ramp.knee_deliveries_per_sec) {
        (Some(m), Some(d)) => println!(
            "  sustained fan-out (p99 send→last member ≤ {P99_LIMIT_MS} ms): {m:.1} msgs/s = {d:.0} deliveries/s{}",
            if r.ramp.knee_is_lower_bound {
                " or more"
            } else {
                ""
            }
        ),
        _ => println!(
            "  sustained fan-out (p99 send→last member ≤ {P99_LIMIT_MS} ms): none (the first step, {:.1} msgs/s, failed)",
            r.ramp.steps.first().map_or(0.0, |s| s.offered_msgs_per_sec)
        ),
    }
    if let Some(d) = &r.disk {
        println!(
            "  data dir: {} messages = {} deliveries grew it {} → {} bytes allocated ({} → {} apparent): {:.1} bytes per member delivery ({:.1} apparent); the server wrote {} bytes to storage per member delivery",
            d.messages,
            d.deliveries,
            d.bytes_before,
            d.bytes_after,
            d.apparent_bytes_before,
            d.apparent_bytes_after,
            d.bytes_per_delivery,
            d.apparent_bytes_per_delivery,
            d.written_bytes_per_delivery
                .map_or_else(|| "n/a".to_owned(), |b| format!("{b:.1}"))
        );
    }
}

pub async fn group_fanout(a: FanoutArgs) -> Result<bool> {
    if !(2..=MAX_MEMBERS).contains(&a.members) {
        bail!("--members must be 2 to {MAX_MEMBERS}");
    }
    if a.rate <= 0.0 || a.ramp_from <= 0.0 || a.disk_rate <= 0.0 {
        bail!("rates must be positive");
    }
    let quiet = a.target.json;
    let sut = Sut::start(&a.target, &[]).await?;
    let users = register_users(
        &sut.tcp,
        &sut.data_dir,
        PHONE_PREFIX,
        a.members,
        REGISTER_CONCURRENCY,
    )
    .await
    .context("registering members")?;
    let links = server_links(&sut.tcp, &users).await?;
    let ids: Vec<u64> = users.iter().map(|u| u.user_id.get()).collect();
    let fleet = Fleet::start(
        "switchboard",
        sut.pid(),
        links,
        &ids,
        true,
        Some((sut.tcp.as_str(), &users)),
        &a,
    )
    .await?;
    let (server, server_latency) = measure(fleet, Some(&sut.data_dir), &a).await?;
    sut.stop().await?;
    if !quiet {
        print_target(&server);
    }
    let baseline = if a.no_baseline {
        None
    } else {
        let relay = start_relay(&a.target, a.baseline_receipts).await?;
        let links = relay_links(&relay.tcp, a.members).await?;
        let ids: Vec<u64> = (1..=a.members as u64).collect();
        let target = if a.baseline_receipts {
            "baseline+receipts"
        } else {
            "baseline"
        };
        let fleet = Fleet::start(
            target,
            relay.pid(),
            links,
            &ids,
            a.baseline_receipts,
            None,
            &a,
        )
        .await?;
        let measured = measure(fleet, None, &a).await?;
        relay.stop().await?;
        if !quiet {
            print_target(&measured.0);
        }
        Some(measured)
    };
    let ratio = baseline.as_ref().and_then(|(b, _)| {
        let relay = b.ramp.knee_deliveries_per_sec?;
        Some(server.ramp.knee_deliveries_per_sec.unwrap_or(0.0) / relay)
    });
    if let Some(path) = &a.target.plot {
        let mut series = vec![
            (
                "switchboard send→last member".to_owned(),
                &server_latency.last,
            ),
            (
                "switchboard send→median member".to_owned(),
                &server_latency.median,
            ),
        ];
        if let Some((b, m)) = &baseline {
            series.push((format!("{} send→last member", b.target), &m.last));
            series.push((format!("{} send→median member", b.target), &m.median));
        }
        plot::percentiles(
            path,
            &format!(
                "group-fanout: {} members, {:.1} msgs/s, send→member receipt",
                a.members, a.rate
            ),
            &series,
        )?;
    }
    let ok = server.latency.complete > 0 && server.latency.errors == 0;
    #[derive(Serialize)]
    struct FanoutOutcome {
        scenario: &'static str,
        #[serde(flatten)]
        server: TargetReport,
        baseline: Option<TargetReport>,
        /// The server's sustained deliveries/s over the relay's, measured
        /// in the same run.
        ratio_to_baseline: Option<f64>,
    }
    let out = FanoutOutcome {
        scenario: "group-fanout",
        server,
        baseline: baseline.map(|(b, _)| b),
        ratio_to_baseline: ratio,
    };
    if quiet {
        print_json(&out)?;
    } else if let Some(r) = out.ratio_to_baseline {
        let capped = out.server.ramp.knee_is_lower_bound
            || out
                .baseline
                .as_ref()
                .is_some_and(|b| b.ramp.knee_is_lower_bound);
        println!(
            "ratio to baseline (sustained deliveries/s): {r:.2}{}",
            if capped {
                " (a ramp ran out of steps before failing: raise --max-steps or --ramp-from)"
            } else {
                ""
            }
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_survives_the_payload_and_short_payloads_have_none() {
        let s = Stamp {
            phase: 3,
            index: 70_000,
            sent_us: 123_456_789,
        };
        let p = s.payload(100);
        assert_eq!(p.len(), 100);
        assert_eq!(Stamp::parse(&p), Some(s));
        assert_eq!(s.payload(4).len(), STAMP_BYTES);
        assert_eq!(Stamp::parse(&p[..15]), None);
        assert_eq!(phase_of(&client_msg_id(7, 9)), Some(7));
        assert_eq!(phase_of("x"), None);
    }

    #[test]
    fn a_message_counts_for_the_last_and_the_median_member() {
        let book = Book::new(1, 2, 5);
        assert_eq!(book.median_rank, 3);
        for (i, us) in [40, 10, 30, 20, 50].into_iter().enumerate() {
            book.arrived(0, us, Some(us / 2));
            assert_eq!(book.complete.load(Ordering::Acquire), u64::from(i == 4));
        }
        book.arrived(1, 7, None);
        book.arrived(9, 7, None); // not a message of this phase: ignored
        let slot = &book.slots[0];
        assert_eq!(slot.last_us.load(Ordering::Acquire), 50);
        assert_eq!(slot.median_us.load(Ordering::Acquire), 30);
        assert_eq!(slot.last_socket_us.load(Ordering::Acquire), 25);
        assert_eq!(slot.socket_stamped.load(Ordering::Acquire), 5);
        assert_eq!(book.slots[1].socket_stamped.load(Ordering::Acquire), 0);
        assert_eq!(book.deliveries.load(Ordering::Acquire), 6);
        // One message has not reached everyone and none has its ✓.
        assert!(!book.settled(false));
        book.skipped.store(1, Ordering::Release);
        book.acked(Duration::from_millis(1));
        assert!(book.settled(false));
        assert!(!book.settled(true), "6 deliveries, no receipts yet");
    }
}
