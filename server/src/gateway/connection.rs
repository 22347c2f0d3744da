//! One task per connection: handshake, authentication, the frame loop.
//!
//! The task owns the link, the Noise session and the read/write buffers. It
//! reads frames in order and hands each to its request kind's module
//! (`gateway/cmd/`, one per kind), which calls the router; sends reach the
//! router in frame order (so a device's messages keep their order).
//! Answers that need the router are awaited concurrently in `pending`, so a
//! slow ✓ never blocks reading. Pushes from the owning shard arrive on a
//! bounded channel.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use prost::Message;
use switchboard_proto::noise::Handshake;
use switchboard_proto::pb::{self, ErrorCode, client_frame::Body as In, server_frame::Body as Out};
use switchboard_proto::{PREAMBLE, ProtoError, Session, limits, record, version};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Gateway;
use super::cmd;
use super::link::Link;
use super::wire::{error, error_frame, kick_error, shutting_down};
use crate::FastMap;
use crate::clock::now_ms;
use crate::limits::{Limit, Slot};
use crate::router::{ConnRx, Notice, Received, ToConn};
use crate::store::{DeviceKey, UserId};
use crate::telemetry as tm;

/// What a client is told when a frame is not a valid `ClientFrame`.
pub(crate) const UNDECODABLE_FRAME: &str = "undecodable frame: not a valid ClientFrame \
     (malformed protobuf, a wrong field type, or a string field that is not valid UTF-8)";

/// Longest pause of a connection after a RATE_LIMITED answer: long enough
/// that a client ignoring the hint costs little, short enough that a
/// well-behaved one pipelining past a burst barely notices.
const RATE_LIMITED_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// When a client refused at the connection cap should try again (this or
/// another server): long enough for connections to end, and spread by the
/// client's own backoff.
const CONNECTION_CAP_RETRY_AFTER_MS: u64 = 5_000;

/// Most plaintext gathered from ready answers and pushes into one write.
const GATHER_MAX_BYTES: usize = 64 * 1024;

/// Requests one connection may have in flight: sends awaiting their ✓
/// through its push queue, plus router work in `pending` (other answers,
/// and the receipts and deletions of acks). At this many, the connection
/// takes no further frame until one finishes (the client's pipelined
/// frames wait in the socket). So a pipelining client's answers can never
/// fill its own push queue, which has room for this many beyond
/// `outbound_queue_frames`, and its work in the server stays bounded.
pub(crate) const MAX_IN_FLIGHT: usize = 128;

/// How long a closed connection's in-flight router work may take to finish.
const PENDING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest `Deliver` frame the server builds: half the default client frame
/// limit, so every client accepts it. One entry (≤ 64 KiB payload) always fits.
const MAX_DELIVER_FRAME_BYTES: usize = limits::DEFAULT_MAX_FRAME_BYTES / 2;

/// Why a connection ended (for logs).
#[derive(Debug)]
#[allow(dead_code, reason = "fields are read through Debug in logs")]
pub(super) enum End {
    PeerClosed,
    Io(std::io::Error),
    Proto(ProtoError),
    Goodbye(ErrorCode),
    Refused(&'static str),
    Violation(&'static str),
}

/// Who a connection is, once authenticated.
pub(super) struct Authed {
    pub(super) device: DeviceKey,
    pub(super) phone: String,
    /// The user's other devices as this connection last heard (AuthOk, then
    /// DevicesChanged entries), to check `self_payloads` before anything is
    /// stored. The owning shard checks again.
    pub(super) other_devices: BTreeSet<u32>,
}

pub(super) type Pending = FuturesUnordered<BoxFuture<'static, Option<pb::ServerFrame>>>;

/// Awaits `call`, a router call that may wait for room in a shard's inbox,
/// while still driving the connection's pending requests; returns its
/// result and the answers they produced meanwhile.
///
/// tokio hands a freed inbox slot to the first waiter in line, and the
/// slot is used only when that waiter's future is polled again. A pending
/// request of this connection waiting on the same inbox gets the slots
/// first; awaiting `call` alone, the connection would never poll it and
/// would wait for itself. That happened under overload (8-slot inboxes): an
/// inline ack waited behind the connection's own queued deletions.
pub(super) async fn alongside_pending<T>(
    pending: &mut Pending,
    call: impl Future<Output = T>,
) -> (T, Vec<pb::ServerFrame>) {
    let mut answers = Vec::new();
    if pending.is_empty() {
        return (call.await, answers);
    }
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            out = &mut call => return (out, answers),
            Some(answer) = pending.next(), if !pending.is_empty() => {
                answers.extend(answer);
            }
        }
    }
}

/// Runs one connection to completion.
pub async fn run<L: Link>(
    mut link: L,
    peer: IpAddr,
    gw: Arc<Gateway>,
    permit: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let conn_id = gw.next_conn_id();
    let span = tracing::info_span!(
        "conn",
        id = conn_id,
        kind = link.kind(),
        user = tracing::field::Empty
    );
    let served = async move {
        let transport = link.kind();
        metrics::counter!(tm::CONNECTIONS_ACCEPTED, "transport" => transport).increment(1);
        // Decrements the gauge however this task ends (even by panic).
        struct Open(metrics::Gauge);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.decrement(1.0);
            }
        }
        let _open = Open(metrics::gauge!(tm::CONNECTIONS, "transport" => transport));
        _open.0.increment(1.0);
        // Every local alive across an await below is part of every
        // connection's future for its whole life, so the handshake's
        // buffer and outcome are moved, never borrowed or named (a failed
        // outcome is consumed before the close is awaited).
        // `_slot` holds this connection's place under the connection cap
        // until the task ends.
        let (session, rbuf, _slot) = match timeout(
            gw.cfg.handshake_timeout,
            // Boxed: the handshake's state is large and lives only briefly;
            // inline it would be part of every connection's future for good.
            Box::pin(handshake(&mut link, BytesMut::new(), &gw)),
        )
        .await
        {
            Ok(Ok(done)) => done,
            failed => {
                count_handshake_failure(failed);
                link.close().await;
                return;
            }
        };
        // The handshake is done: free its admission slot.
        drop(permit);
        let mut conn = Conn {
            link,
            session,
            rbuf,
            wbuf: BytesMut::new(),
            gw,
            conn_id,
            authed: None,
            push_rx: None,
            auth_failures: 0,
            peer,
            held_sends: FastMap::default(),
            held_group_sends: FastMap::default(),
            pending: FuturesUnordered::new(),
            delivered: FastMap::default(),
            sends_in_flight: 0,
            frames_held: false,
            limited_until: None,
        };
        let end = conn.serve(&shutdown).await;
        tracing::debug!(?end, "connection ended");
        // Finish what the router is already doing for this connection (acks
        // turning into receipts and deletions), so a clean disconnect right
        // after an ack does not cause a redelivery. Answers are dropped.
        let _ = timeout(PENDING_GRACE, async {
            while conn.pending.next().await.is_some() {}
        })
        .await;
        if let Some(a) = &conn.authed {
            metrics::gauge!(tm::AUTHENTICATED).decrement(1.0);
            conn.gw.router.disconnected(a.device, conn_id).await;
        }
        conn.link.close().await;
    }
    .instrument(span);
    // A bug while serving one connection ends that connection only.
    if FutureExt::catch_unwind(std::panic::AssertUnwindSafe(served))
        .await
        .is_err()
    {
        metrics::counter!(tm::PANICS, "where" => "connection").increment(1);
        tracing::error!(
            conn = conn_id,
            "panic while serving a connection; it was closed"
        );
    }
}

async fn read_record<L: Link>(link: &mut L, rbuf: &mut BytesMut) -> Result<BytesMut, End> {
    loop {
        if let Some(rec) = record::decode(rbuf).map_err(End::Proto)? {
            return Ok(rec);
        }
        match link.read_into(rbuf).await {
            Ok(0) => return Err(End::PeerClosed),
            Ok(_) => {}
            Err(e) => return Err(End::Io(e)),
        }
    }
}

/// The server side of the Noise XX handshake with version negotiation.
/// Logs and counts a handshake that did not complete.
fn count_handshake_failure(
    failed: Result<Result<(Session, BytesMut, Slot), End>, tokio::time::error::Elapsed>,
) {
    let reason = match failed {
        Ok(Ok(_)) => return,
        Ok(Err(end)) => {
            tracing::debug!(?end, "handshake failed");
            match end {
                End::PeerClosed => "closed",
                End::Io(_) => "io",
                End::Proto(_) => "protocol",
                End::Refused(_) | End::Violation(_) | End::Goodbye(_) => "refused",
            }
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            "timeout"
        }
    };
    metrics::counter!(tm::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// Runs the server side of the Noise handshake; gives back the session and
/// the bytes already read past it (frames may follow the last message).
async fn handshake<L: Link>(
    link: &mut L,
    mut rbuf: BytesMut,
    gw: &Gateway,
) -> Result<(Session, BytesMut, Slot), End> {
    while rbuf.len() < PREAMBLE.len() {
        match link.read_into(&mut rbuf).await {
            Ok(0) => return Err(End::PeerClosed),
            Ok(_) => {}
            Err(e) => return Err(End::Io(e)),
        }
    }
    if rbuf.get(..PREAMBLE.len()) != Some(&PREAMBLE[..]) {
        // Not our protocol: say nothing, close.
        return Err(End::Refused("bad preamble"));
    }
    let _ = rbuf.split_to(PREAMBLE.len());

    let mut hs = Handshake::responder(&gw.server_key.private).map_err(End::Proto)?;
    let msg1 = read_record(link, &mut rbuf).await?;
    let payload = hs.read_message(&msg1).map_err(End::Proto)?;
    let hello = pb::ClientHello::decode(&payload[..]).map_err(|e| End::Proto(e.into()))?;
    let (result, slot) = match version::negotiate(version::CURRENT, &hello.versions) {
        Ok(v) => match gw.admission.open_slot() {
            Some(slot) => (pb::server_hello::Result::Version(v), Some(slot)),
            None => {
                Limit::Connections.tripped();
                (
                    pb::server_hello::Result::Error(pb::Error {
                        retry_after_ms: CONNECTION_CAP_RETRY_AFTER_MS,
                        ..error(ErrorCode::Overloaded, Limit::Connections.message())
                    }),
                    None,
                )
            }
        },
        Err(msg) => (
            pb::server_hello::Result::Error(error(ErrorCode::UnsupportedVersion, msg)),
            None,
        ),
    };
    let hello_out = pb::ServerHello {
        result: Some(result),
        server_time_ms: now_ms(),
    };
    // Message 2 (three X25519 operations) and message 3 (one) are computed
    // on the low-priority crypto threads (see `gateway::crypto`).
    let hello_bytes = hello_out.encode_to_vec();
    let (hs, out) = gw
        .crypto
        .run(move || {
            let mut out = BytesMut::new();
            let written = hs.write_message(&hello_bytes, &mut out);
            (hs, written.map(|()| out))
        })
        .await
        .ok_or(End::Refused("shutting down"))?;
    let mut hs = hs;
    let out = out.map_err(End::Proto)?;
    link.write_all_bytes(&out).await.map_err(End::Io)?;
    let Some(slot) = slot else {
        return Err(End::Refused(
            "no common protocol version, or at the connection cap",
        ));
    };
    tracing::debug!(user_agent = %hello.user_agent, "client hello");
    let msg3 = read_record(link, &mut rbuf).await?;
    let (hs_back, read) = gw
        .crypto
        .run(move || {
            let read = hs.read_message(&msg3);
            (hs, read)
        })
        .await
        .ok_or(End::Refused("shutting down"))?;
    hs = hs_back;
    read.map_err(End::Proto)?;
    let session = hs
        .into_session(gw.cfg.max_frame_bytes)
        .map_err(End::Proto)?;
    Ok((session, rbuf, slot))
}

/// An entry pushed on this connection and not yet acked.
#[derive(Debug)]
pub(super) struct Delivered {
    /// The receipt it owes its sender once acked, if any.
    pub(super) owed: Option<Owed>,
    /// When the server accepted it.
    pub(super) server_ts_ms: u64,
    /// The group payload it references, `(group, group_seq)`, if any.
    pub(super) group_ref: Option<(u64, u64)>,
}

/// The delivery receipt an entry pushed on this connection owes its
/// sender once acked.
#[derive(Debug)]
pub(super) struct Owed {
    /// The message's sender.
    pub(super) from_user: UserId,
    /// Its client message id.
    pub(super) client_msg_id: String,
    /// Its group (0: a 1:1 message).
    pub(super) group_id: u64,
}

/// A connection's state, owned by its task; the request kinds (`cmd/`)
/// borrow it while they handle a frame.
pub(super) struct Conn<L: Link> {
    link: L,
    session: Session,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub(super) gw: Arc<Gateway>,
    pub(super) conn_id: u64,
    pub(super) authed: Option<Authed>,
    /// Pushes from the owning shard (after authentication).
    pub(super) push_rx: Option<ConnRx>,
    pub(super) auth_failures: u32,
    /// The client's IP address (for the per-address limits).
    pub(super) peer: IpAddr,
    /// Per recipient, a send refused before reaching its shard and the
    /// refusal: later sends to that user wait for it (see `cmd::send`).
    /// At most `cmd::send::MAX_HELD_RECIPIENTS`.
    pub(super) held_sends: FastMap<UserId, (String, pb::Error)>,
    /// The same for group messages, per group (see `cmd::send_group`).
    pub(super) held_group_sends: FastMap<u64, (String, pb::Error)>,
    /// Answers being prepared by the router.
    pub(super) pending: Pending,
    /// Entries pushed and not yet acked: seq → (sender, client id) for
    /// messages from other users (a delivery receipt is owed), `None`
    /// otherwise; with the entry's server timestamp.
    pub(super) delivered: FastMap<u64, Delivered>,
    /// Sends whose ✓ will come through the push queue.
    pub(super) sends_in_flight: usize,
    /// Whole frames may wait in `rbuf`, left there while the connection
    /// had [`MAX_IN_FLIGHT`] requests in flight or was paused.
    frames_held: bool,
    /// Set after a RATE_LIMITED answer: nothing more is read or handled
    /// until then (see `respond_error`).
    limited_until: Option<Instant>,
}

/// Waits on an optional receiver; never resolves when there is none.
async fn recv_push(push: &mut Option<ConnRx>) -> Received {
    match push {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl<L: Link> Conn<L> {
    fn queue(&mut self, frame: pb::ServerFrame) {
        match &frame.body {
            Some(Out::Error(e)) => {
                metrics::counter!(tm::ERRORS, "code" => e.code().as_str_name()).increment(1);
            }
            Some(Out::Goodbye(g)) => {
                let code = g
                    .reason
                    .as_ref()
                    .map_or("UNSPECIFIED", |r| r.code().as_str_name());
                metrics::counter!(tm::GOODBYES, "code" => code).increment(1);
                if code == ErrorCode::SlowReader.as_str_name() {
                    metrics::counter!(tm::SLOW_READER_DISCONNECTS).increment(1);
                }
            }
            _ => {}
        }
        self.session.queue(&frame);
    }

    pub(super) fn queue_all(&mut self, frames: Vec<pb::ServerFrame>) {
        for frame in frames {
            self.queue(frame);
        }
    }

    pub(super) fn respond(&mut self, id: u32, body: Out) {
        self.queue(pb::ServerFrame {
            id,
            body: Some(body),
        });
    }

    pub(super) fn respond_error(&mut self, id: u32, err: pb::Error) {
        if err.code() == ErrorCode::RateLimited {
            // A client past a limit is told when to come back; meanwhile
            // its connection reads and handles nothing more (for at most
            // RATE_LIMITED_PAUSE), so ignoring the hint costs the server
            // one refusal per pause, not one per request.
            let pause =
                std::time::Duration::from_millis(err.retry_after_ms).min(RATE_LIMITED_PAUSE);
            self.limited_until = Some(Instant::now() + pause);
        }
        self.queue(error_frame(id, err));
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.session.pending_bytes() == 0 {
            return Ok(());
        }
        self.session.seal(&mut self.wbuf).map_err(End::Proto)?;
        // Usually the socket takes it all at once. Only a full socket
        // needs the (boxed: it is large and rarely alive) waiting write,
        // which keeps every connection's future small.
        let now = self.link.try_write_now(&self.wbuf);
        let result = match now {
            Ok(n) if n == self.wbuf.len() => Ok(Ok(())),
            Ok(n) => {
                let rest = self.wbuf.get(n..).unwrap_or_default();
                Box::pin(timeout(
                    self.gw.cfg.write_timeout,
                    self.link.write_all_bytes(rest),
                ))
                .await
            }
            Err(e) => Ok(Err(e)),
        };
        // Free the write buffer rather than keep it for an idle connection.
        self.wbuf = BytesMut::new();
        match result {
            Ok(r) => r.map_err(End::Io),
            Err(_) => {
                metrics::counter!(tm::SLOW_READER_DISCONNECTS).increment(1);
                Err(End::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "write timed out: slow reader",
                )))
            }
        }
    }

    /// Sends a goodbye (best effort) and ends the connection.
    async fn goodbye(&mut self, reason: pb::Error) -> End {
        let code = reason.code();
        self.queue(pb::ServerFrame {
            id: 0,
            body: Some(Out::Goodbye(pb::Goodbye {
                reason: Some(reason),
            })),
        });
        let _ = self.flush().await;
        End::Goodbye(code)
    }

    /// Handles the whole frames buffered, then sets the frame clock
    /// (`partial`) for what they leave, moving `timer` earlier if it must
    /// fire sooner.
    async fn take_frames(
        &mut self,
        partial: &mut Option<Instant>,
        timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<(), End> {
        // Boxed: handling a frame can await any request kind; inline, all
        // their states would sit in every idle connection's future.
        let completed = Box::pin(self.process_buffered()).await?;
        *partial = self.frame_clock(completed, *partial);
        if let Some(p) = *partial
            && p < timer.deadline()
        {
            timer.reset(p);
        }
        Ok(())
    }

    /// When the frame now partly received must be complete, after
    /// `completed` frames were handled: the clock runs from when that frame
    /// began, and a completed frame restarts it. None while frames are held
    /// (the server, not the client, is the one not reading them).
    fn frame_clock(&self, completed: usize, current: Option<Instant>) -> Option<Instant> {
        let partial =
            !self.frames_held && (!self.rbuf.is_empty() || self.session.partial_frame_bytes() > 0);
        match (partial, current) {
            (false, _) => None,
            (true, Some(d)) if completed == 0 => Some(d),
            (true, _) => Some(Instant::now() + self.gw.cfg.frame_timeout),
        }
    }

    /// Whether frames wait: until a request in flight finishes, or until
    /// a rate-limited connection's pause is over.
    fn paused(&self) -> bool {
        self.sends_in_flight + self.pending.len() >= MAX_IN_FLIGHT || self.limited_until.is_some()
    }

    /// Handles every whole frame already buffered (while the connection has
    /// [`MAX_IN_FLIGHT`] requests in flight, the rest wait); returns how
    /// many.
    async fn process_buffered(&mut self) -> Result<usize, End> {
        let mut frames = 0;
        self.frames_held = false;
        while !self.paused()
            && let Some(frame) = self
                .session
                .poll_frame::<pb::ClientFrame>(&mut self.rbuf)
                .map_err(End::Proto)?
        {
            self.on_frame(frame).await?;
            frames += 1;
        }
        self.frames_held = self.paused() && !self.rbuf.is_empty();
        if self.rbuf.is_empty() {
            // Idle connections keep no buffers (see Link::read_into).
            self.rbuf = BytesMut::new();
        }
        Ok(frames)
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> End {
        let idle = self.gw.cfg.idle_timeout;
        let mut deadline = Instant::now() + idle;
        // A connection that never authenticates (or links) is closed, however
        // often it pings.
        let auth_deadline = Instant::now() + self.gw.cfg.unauthenticated_timeout;
        // Set while a frame is partly received: it must complete in time.
        let mut partial_deadline: Option<Instant> = None;
        // Made once: a new one per turn of the loop would register with
        // (and leave) the token's waiter list every time.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // One timer for both deadlines, also made once. It is moved only
        // when a deadline comes earlier than it; a deadline pushed later
        // (every read moves the idle one) is looked at when the timer
        // fires. A timer set per turn cost a wheel insert and removal per
        // frame (about 1% of the server's CPU at 7,000 msgs/s).
        let timer = tokio::time::sleep_until(deadline.min(auth_deadline));
        tokio::pin!(timer);
        // Frames may have arrived together with the last handshake message
        // (PROTOCOL.md §5.2); a frame left incomplete there starts the frame
        // clock like any other (§7.2.1).
        if let Err(end) = self
            .take_frames(&mut partial_deadline, timer.as_mut())
            .await
        {
            return self.end_with(end).await;
        }
        if let Err(end) = self.flush().await {
            return end;
        }
        loop {
            if self.gw.is_stopping() {
                return self.goodbye(shutting_down()).await;
            }
            tokio::select! {
                biased;
                Some(answer) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Some(frame) = answer {
                        self.queue(frame);
                    }
                }
                push = recv_push(&mut self.push_rx) => {
                    let push = match push {
                        Received::Item(push) => push,
                        Received::Kicked(reason) => {
                            return self.goodbye(kick_error(reason)).await;
                        }
                        // The shard let go of us (it stopped).
                        Received::Closed => return End::PeerClosed,
                    };
                    if let Err(end) = self.on_push(push) {
                        return self.end_with(end).await;
                    }
                }
                read = self.link.read_into(&mut self.rbuf), if !self.paused() => {
                    match read {
                        Ok(0) => return End::PeerClosed,
                        Ok(_) => {}
                        Err(e) => return End::Io(e),
                    }
                    deadline = Instant::now() + idle;
                    if let Err(end) = self.take_frames(&mut partial_deadline, timer.as_mut()).await {
                        return self.end_with(end).await;
                    }
                }
                () = &mut timer => {
                    let mut due = partial_deadline.map_or(deadline, |p| p.min(deadline));
                    if self.authed.is_none() {
                        due = due.min(auth_deadline);
                    }
                    let mut resumed = false;
                    if let Some(until) = self.limited_until {
                        if until <= Instant::now() {
                            // The pause is over: held frames are taken
                            // below (no `continue`).
                            self.limited_until = None;
                            resumed = true;
                        } else {
                            due = due.min(until);
                        }
                    }
                    if due > Instant::now() {
                        timer.as_mut().reset(due);
                        if !resumed {
                            continue;
                        }
                    } else if self.authed.is_none() && auth_deadline <= Instant::now() {
                        return self.goodbye(error(
                            ErrorCode::IdleTimeout,
                            format!(
                                "not authenticated within {} s",
                                self.gw.cfg.unauthenticated_timeout.as_secs()
                            ),
                        )).await;
                    } else if partial_deadline.is_some_and(|p| p <= Instant::now()) {
                        return self.goodbye(error(ErrorCode::IdleTimeout, "a frame was not completed in time")).await;
                    } else {
                        return self.goodbye(error(ErrorCode::IdleTimeout, "no frame within the keep-alive window")).await;
                    }
                }
                // Last: a busy connection sees `is_stopping` above, so
                // this (lock-taking) poll runs only when nothing else is
                // ready, to wake an idle connection. Only before
                // authentication: the shard ends authenticated ones.
                () = &mut cancelled, if self.push_rx.is_none() => {
                    return self.goodbye(shutting_down()).await;
                }
            }
            // A pause begun this turn (see `respond_error`) ends on the
            // shared timer: no timer of its own per turn.
            if let Some(until) = self.limited_until
                && until < timer.deadline()
            {
                timer.as_mut().reset(until);
            }
            // Answers and pushes that are ready too go into the same write
            // (one syscall and one Noise record for all of them).
            if let Err(end) = self.gather_ready() {
                return self.end_with(end).await;
            }
            if self.frames_held
                && !self.paused()
                && let Err(end) = self
                    .take_frames(&mut partial_deadline, timer.as_mut())
                    .await
            {
                return self.end_with(end).await;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
        }
    }

    /// Queues the answers and pushes that are ready now, without waiting,
    /// up to [`GATHER_MAX_BYTES`] per write so a steady stream of pushes
    /// cannot hold the write (and the peer's acks) back.
    fn gather_ready(&mut self) -> Result<(), End> {
        while self.session.pending_bytes() < GATHER_MAX_BYTES {
            let mut more = false;
            if !self.pending.is_empty()
                && let Some(Some(answer)) = self.pending.next().now_or_never()
            {
                if let Some(frame) = answer {
                    self.queue(frame);
                }
                more = true;
            }
            if let Some(push) = self.push_rx.as_mut().and_then(ConnRx::try_recv) {
                self.on_push(push)?;
                more = true;
            }
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// Ends the connection, telling the peer why when it is worth telling.
    async fn end_with(&mut self, end: End) -> End {
        match &end {
            End::Proto(ProtoError::FrameTooLarge { len, max }) => {
                self.goodbye(error(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the maximum of {max}"),
                ))
                .await
            }
            End::Proto(ProtoError::Decode(e)) => {
                // Our words, not the decoder's (PROTOCOL.md §10.1: no
                // internals in messages); the detail goes to the log.
                tracing::debug!(error = %e, "undecodable frame");
                self.goodbye(error(ErrorCode::ProtocolViolation, UNDECODABLE_FRAME))
                    .await
            }
            End::Proto(ProtoError::BadLength) => {
                self.goodbye(error(ErrorCode::ProtocolViolation, "invalid frame length"))
                    .await
            }
            End::Violation(what) => {
                let what = *what;
                self.goodbye(error(ErrorCode::ProtocolViolation, what))
                    .await
            }
            End::Goodbye(code) => {
                let code = *code;
                self.goodbye(error(code, "closing")).await
            }
            // Decryption failures and I/O errors: the channel is not usable.
            _ => end,
        }
    }

    fn on_push(&mut self, push: ToConn) -> Result<(), End> {
        match push {
            ToConn::Deliver(entries) => {
                for e in &entries {
                    if let (Some(pb::queue_entry::Body::DevicesChanged(dc)), Some(a)) =
                        (&e.body, self.authed.as_mut())
                        && dc.user_id == a.device.user
                    {
                        a.other_devices = dc
                            .devices
                            .iter()
                            .copied()
                            .filter(|d| *d != a.device.device)
                            .collect();
                    }
                    let me = self.authed.as_ref().map(|a| a.device.user);
                    let owed = match &e.body {
                        // A copy from one of our own devices owes no receipt.
                        // A group's sender key owes none either.
                        Some(pb::queue_entry::Body::Message(m))
                            if Some(m.from_user) != me && m.group_id == 0 =>
                        {
                            Some(Owed {
                                from_user: m.from_user,
                                client_msg_id: m.client_msg_id.clone(),
                                group_id: 0,
                            })
                        }
                        Some(pb::queue_entry::Body::GroupMessage(m)) if Some(m.from_user) != me => {
                            Some(Owed {
                                from_user: m.from_user,
                                client_msg_id: m.client_msg_id.clone(),
                                group_id: m.group_id,
                            })
                        }
                        _ => None,
                    };
                    if matches!(
                        e.body,
                        Some(
                            pb::queue_entry::Body::Message(_)
                                | pb::queue_entry::Body::GroupMessage(_)
                        )
                    ) {
                        self.gw.metrics.messages_out.increment(1);
                    }
                    let group_ref = match &e.body {
                        Some(pb::queue_entry::Body::GroupMessage(m)) => {
                            Some((m.group_id, m.group_seq))
                        }
                        _ => None,
                    };
                    self.delivered.insert(
                        e.seq,
                        Delivered {
                            owed,
                            server_ts_ms: e.server_ts_ms,
                            group_ref,
                        },
                    );
                }
                if self.delivered.len() > self.gw.cfg.max_unacked {
                    return Err(End::Goodbye(ErrorCode::SlowReader));
                }
                // Split a page so no frame exceeds what clients accept.
                let mut frame = Vec::with_capacity(entries.len());
                let mut frame_bytes = 0;
                for e in entries {
                    let len = e.encoded_len();
                    if !frame.is_empty() && frame_bytes + len > MAX_DELIVER_FRAME_BYTES {
                        let full = std::mem::take(&mut frame);
                        self.respond(0, Out::Deliver(pb::Deliver { entries: full }));
                        frame_bytes = 0;
                    }
                    frame_bytes += len + 8;
                    frame.push(e);
                }
                if !frame.is_empty() {
                    self.respond(0, Out::Deliver(pb::Deliver { entries: frame }));
                }
            }
            ToConn::SendAnswer { frame, result } => {
                self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                let frame = cmd::answer(frame, result.map_err(|e| *e), cmd::send::send_ok);
                self.queue(frame);
            }
            ToConn::Notice(Notice::UpToDate) => self.respond(0, Out::UpToDate(pb::UpToDate {})),
            ToConn::Notice(Notice::KeysLow(n)) => self.respond(
                0,
                Out::KeysLow(pb::KeysLow {
                    one_time_keys_remaining: n,
                }),
            ),
        }
        Ok(())
    }

    /// One frame, handed to its request kind's module (`gateway/cmd/`).
    /// Kinds other than these five need authentication first.
    async fn on_frame(&mut self, frame: pb::ClientFrame) -> Result<(), End> {
        let id = frame.id;
        let Some(body) = frame.body else {
            return Err(End::Violation("a frame without a body"));
        };
        if id == 0 && !matches!(body, In::Ack(_)) {
            return Err(End::Violation("requests need a nonzero id"));
        }
        match body {
            In::Ping(_) => cmd::ping::run(self, id),
            In::RequestCode(req) => cmd::request_code::run(self, id, req),
            In::VerifyCode(req) => cmd::verify_code::run(self, id, req),
            In::Auth(req) => cmd::auth::run(self, id, req).await?,
            In::LinkDevice(req) => cmd::link_device::run(self, id, req).await?,
            In::Ack(ack) => {
                // Before authentication nothing was delivered, so there is
                // nothing to acknowledge.
                if let Some(a) = &self.authed {
                    cmd::ack::run(self, a.device, ack).await?;
                }
            }
            In::Send(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::send::run(self, id, device, req).await?;
                }
            }
            In::LookupUser(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::lookup_user::run(self, id, device, req);
                }
            }
            In::SendReceipt(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::send_receipt::run(self, id, device, req);
                }
            }
            In::UploadKeys(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::upload_keys::run(self, id, device, req);
                }
            }
            In::FetchBundles(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::fetch_bundles::run(self, id, device, req);
                }
            }
            In::CreateLinkCode(_) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::create_link_code::run(self, id, device);
                }
            }
            In::SetPin(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::set_pin::run(self, id, device, req);
                }
            }
            In::ListDevices(_) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::list_devices::run(self, id, device);
                }
            }
            In::RevokeDevice(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::revoke_device::run(self, id, device, req);
                }
            }
            In::CreateGroup(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::create_group::run(self, id, device, req);
                }
            }
            In::ChangeGroup(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::change_group::run(self, id, device, req);
                }
            }
            In::GetGroup(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::get_group::run(self, id, device, req);
                }
            }
            In::ListGroups(_) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::list_groups::run(self, id, device);
                }
            }
            In::SendGroup(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::send_group::run(self, id, device, req).await?;
                }
            }
            In::SendGroupKeys(req) => {
                if let Some(device) = self.authed_or_refuse(id) {
                    cmd::send_group_keys::run(self, id, device, req);
                }
            }
        }
        Ok(())
    }

    /// The authenticated device; before authentication, answers request
    /// `id` with UNAUTHENTICATED and gives None.
    fn authed_or_refuse(&mut self, id: u32) -> Option<DeviceKey> {
        let device = self.authed.as_ref().map(|a| a.device);
        if device.is_none() {
            self.respond_error(id, error(ErrorCode::Unauthenticated, "authenticate first"));
        }
        device
    }

    /// The authenticated account's phone number (empty before auth).
    pub(super) fn phone(&self) -> String {
        self.authed
            .as_ref()
            .map(|a| a.phone.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A one-slot inbox, already full, and a pending request of the
    /// connection queued for its next free slot.
    async fn full_inbox_with_a_pending_sender() -> (
        tokio::sync::mpsc::Sender<u32>,
        tokio::task::JoinHandle<Vec<u32>>,
        Pending,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        tx.send(0).await.unwrap();
        let mut pending: Pending = FuturesUnordered::new();
        let queued = tx.clone();
        pending.push(Box::pin(async move {
            queued.send(1).await.unwrap();
            None
        }));
        assert!(pending.next().now_or_never().is_none(), "no slot yet");
        // The shard takes what is in the inbox as it comes.
        let shard = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        });
        (tx, shard, pending)
    }

    #[tokio::test]
    async fn an_inline_call_does_not_wait_behind_the_connections_own_pending_requests() {
        // The hazard: the freed slot goes to the pending request, which is
        // not polled while the connection awaits its own call alone.
        let (tx, shard, _pending) = full_inbox_with_a_pending_sender().await;
        let alone = tokio::time::timeout(Duration::from_millis(300), tx.send(2)).await;
        assert!(alone.is_err(), "the call should have waited for ourselves");
        drop(tx);
        shard.abort();

        // Awaited alongside the pending requests, both get through in order.
        let (tx, shard, mut pending) = full_inbox_with_a_pending_sender().await;
        let (sent, answers) = tokio::time::timeout(
            Duration::from_secs(10),
            alongside_pending(&mut pending, tx.send(2)),
        )
        .await
        .expect("the call waited for its own connection");
        assert!(sent.is_ok());
        assert!(answers.is_empty());
        assert!(pending.is_empty());
        drop(tx);
        assert_eq!(shard.await.unwrap(), vec![0, 1, 2]);
    }
}
