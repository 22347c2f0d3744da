//! One task per connection: handshake, authentication, the frame loop.
//!
//! The task owns the link, the Noise session and the read/write buffers. It
//! reads frames in order and hands sends to the router in that order (so a
//! device's messages keep their order); answers that need the router are
//! awaited concurrently in `pending`, so a slow ✓ never blocks reading.
//! Pushes from the owning shard arrive on a bounded channel.

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
use super::link::Link;
use super::wire::{HELD_MESSAGE, error, error_frame, kick_error, route_error, shutting_down};
use crate::FastMap;
use crate::accounts::CodeSendError;
use crate::clock::now_ms;
use crate::limits::{Limit, Slot};
use crate::router::{
    AnswerTo, ConnLink, Notice, OwedReceipt, Push, PushRx, Received, RouteError, SendAccepted,
    SendRequest, push_channel,
};
use crate::store::{DeviceKey, UserId};
use crate::telemetry as tm;

/// What a client is told when a frame is not a valid `ClientFrame`.
pub(crate) const UNDECODABLE_FRAME: &str = "undecodable frame: not a valid ClientFrame \
     (malformed protobuf, a wrong field type, or a string field that is not valid UTF-8)";
/// Failed authentications tolerated on one connection before it is closed,
/// so credentials cannot be guessed at line rate.
const MAX_AUTH_FAILURES: u32 = 3;

/// Longest pause of a connection after a RATE_LIMITED answer: long enough
/// that a client ignoring the hint costs little, short enough that a
/// well-behaved one pipelining past a burst barely notices.
const RATE_LIMITED_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Recipients a connection holds sends for at once: a client refused for
/// more recipients than this at a time (only a flooder is) gets no order
/// guarantee for the rest, and the connection's memory stays bounded.
const MAX_HELD_RECIPIENTS: usize = 64;

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

/// Most devices one send may address: a user has at most five devices, and
/// 16 full payloads still fit the default frame limit.
const MAX_PAYLOADS_PER_SEND: usize = 16;

/// Why a connection ended (for logs).
#[derive(Debug)]
#[allow(dead_code, reason = "fields are read through Debug in logs")]
enum End {
    PeerClosed,
    Io(std::io::Error),
    Proto(ProtoError),
    Goodbye(ErrorCode),
    Refused(&'static str),
    Violation(&'static str),
}

/// Who a connection is, once authenticated.
struct Authed {
    device: DeviceKey,
    phone: String,
    /// The user's other devices as this connection last heard (AuthOk, then
    /// DevicesChanged entries), to check `self_payloads` before anything is
    /// stored. The owning shard checks again.
    other_devices: BTreeSet<u32>,
}

type Pending = FuturesUnordered<BoxFuture<'static, Option<pb::ServerFrame>>>;

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
async fn alongside_pending<T>(
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

struct Conn<L: Link> {
    link: L,
    session: Session,
    rbuf: BytesMut,
    wbuf: BytesMut,
    gw: Arc<Gateway>,
    conn_id: u64,
    authed: Option<Authed>,
    /// Pushes from the owning shard (after authentication).
    push_rx: Option<PushRx>,
    auth_failures: u32,
    /// The client's IP address (for the per-address limits).
    peer: IpAddr,
    /// Per recipient, a send refused before reaching its shard and the
    /// refusal: later sends to that user wait for it (see `on_authed_frame`).
    /// At most [`MAX_HELD_RECIPIENTS`].
    held_sends: FastMap<UserId, (String, pb::Error)>,
    /// Answers being prepared by the router.
    pending: Pending,
    /// Entries pushed and not yet acked: seq → (sender, client id) for
    /// messages from other users (a delivery receipt is owed), `None`
    /// otherwise; with the entry's server timestamp.
    delivered: FastMap<u64, (Option<(UserId, String)>, u64)>,
    /// Sends whose ✓ will come through the push queue.
    sends_in_flight: usize,
    /// Whole frames may wait in `rbuf`, left there while the connection
    /// had [`MAX_IN_FLIGHT`] requests in flight or was paused.
    frames_held: bool,
    /// Set after a RATE_LIMITED answer: nothing more is read or handled
    /// until then (see `respond_error`).
    limited_until: Option<Instant>,
}

/// Waits on an optional receiver; never resolves when there is none.
async fn recv_push(push: &mut Option<PushRx>) -> Received {
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

    fn queue_all(&mut self, frames: Vec<pb::ServerFrame>) {
        for frame in frames {
            self.queue(frame);
        }
    }

    fn respond(&mut self, id: u32, body: Out) {
        self.queue(pb::ServerFrame {
            id,
            body: Some(body),
        });
    }

    fn respond_error(&mut self, id: u32, err: pb::Error) {
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
                        Received::Push(push) => push,
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
            if let Some(push) = self.push_rx.as_mut().and_then(PushRx::try_recv) {
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

    fn on_push(&mut self, push: Push) -> Result<(), End> {
        match push {
            Push::Deliver(entries) => {
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
                        Some(pb::queue_entry::Body::Message(m)) if Some(m.from_user) != me => {
                            Some((m.from_user, m.client_msg_id.clone()))
                        }
                        _ => None,
                    };
                    if matches!(e.body, Some(pb::queue_entry::Body::Message(_))) {
                        self.gw.metrics.messages_out.increment(1);
                    }
                    self.delivered.insert(e.seq, (owed, e.server_ts_ms));
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
            Push::SendAnswer { frame, result } => {
                self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                let frame = answer(frame, result.map_err(|e| *e), send_ok);
                self.queue(frame);
            }
            Push::Notice(Notice::UpToDate) => self.respond(0, Out::UpToDate(pb::UpToDate {})),
            Push::Notice(Notice::KeysLow(n)) => self.respond(
                0,
                Out::KeysLow(pb::KeysLow {
                    one_time_keys_remaining: n,
                }),
            ),
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: pb::ClientFrame) -> Result<(), End> {
        let id = frame.id;
        let Some(body) = frame.body else {
            return Err(End::Violation("a frame without a body"));
        };
        if id == 0 && !matches!(body, In::Ack(_)) {
            return Err(End::Violation("requests need a nonzero id"));
        }
        match body {
            // Before authentication nothing was delivered, so there is
            // nothing to acknowledge.
            In::Ack(_) if self.authed.is_none() => {}
            In::Ping(_) => self.respond(
                id,
                Out::Pong(pb::Pong {
                    server_time_ms: now_ms(),
                }),
            ),
            In::RequestCode(req) => {
                if let Err(why) = crate::accounts::check_locale(&req.locale) {
                    self.respond_error(id, route_error(&RouteError::BadRequest(why)));
                    return Ok(());
                }
                if let Err(refused) = self.gw.limits.code_request(self.peer) {
                    self.respond_error(id, route_error(&refused.into()));
                    return Ok(());
                }
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = async {
                        let sent = |e: CodeSendError| match e {
                            CodeSendError::Unavailable { retry_after_ms } => {
                                RouteError::CodeSenderUnavailable { retry_after_ms }
                            }
                            other => RouteError::CodeDelivery(other.to_string()),
                        };
                        gw.code_sender.check_available().map_err(sent)?;
                        let issued = gw.router.request_code(req.phone.clone()).await?;
                        let locale = Some(req.locale.as_str()).filter(|l| !l.is_empty());
                        gw.code_sender
                            .send(&req.phone, &issued.code, locale)
                            .await
                            .map_err(sent)?;
                        Ok::<_, RouteError>(issued.expires_at_ms)
                    }
                    .await;
                    Some(answer(id, result, |expires_at_ms| {
                        Out::CodeSent(pb::CodeSent { expires_at_ms })
                    }))
                }));
            }
            In::VerifyCode(req) => {
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.verify_code(req.phone, req.code, req.pin).await;
                    Some(answer(id, result, |r| {
                        Out::Verified(pb::Verified {
                            user_id: r.user,
                            device_id: r.device,
                            credential: r.credential.into(),
                        })
                    }))
                }));
            }
            In::Auth(req) => self.on_auth(id, req).await?,
            In::LinkDevice(req) => {
                if self.authed.is_some() {
                    self.respond_error(
                        id,
                        error(ErrorCode::AlreadyAuthenticated, "already authenticated"),
                    );
                    return Ok(());
                }
                let (linked, answers) =
                    alongside_pending(&mut self.pending, self.gw.router.link_device(&req.code))
                        .await;
                self.queue_all(answers);
                match linked {
                    Ok(r) => self.respond(
                        id,
                        Out::Verified(pb::Verified {
                            user_id: r.user,
                            device_id: r.device,
                            credential: r.credential.into(),
                        }),
                    ),
                    Err(e) => {
                        self.respond_error(id, route_error(&e));
                        if matches!(e, RouteError::LinkCodeInvalid) {
                            self.auth_failures += 1;
                            if self.auth_failures >= MAX_AUTH_FAILURES {
                                return Err(End::Goodbye(ErrorCode::LinkCodeInvalid));
                            }
                        }
                    }
                }
            }
            body => {
                if self.authed.is_none() {
                    self.respond_error(id, error(ErrorCode::Unauthenticated, "authenticate first"));
                    return Ok(());
                }
                self.on_authed_frame(id, body).await?;
            }
        }
        Ok(())
    }

    async fn on_auth(&mut self, id: u32, req: pb::Auth) -> Result<(), End> {
        if self.authed.is_some() {
            self.respond_error(
                id,
                error(ErrorCode::AlreadyAuthenticated, "already authenticated"),
            );
            return Ok(());
        }
        let device = DeviceKey {
            user: req.user_id,
            device: req.device_id,
        };
        // The connection's push queue. The shard holds the sender and uses
        // try_send; when it is full the shard kicks us as a slow reader.
        // Room for the answers of the sends that may be in flight, too.
        let (push_tx, push_rx) = push_channel(self.gw.cfg.outbound_queue_frames + MAX_IN_FLIGHT);
        let link = ConnLink {
            conn_id: self.conn_id,
            push: push_tx,
        };
        let (authenticated, answers) = alongside_pending(
            &mut self.pending,
            self.gw
                .router
                .authenticate(device, req.credential.to_vec(), link),
        )
        .await;
        self.queue_all(answers);
        match authenticated {
            Ok(info) => {
                tracing::Span::current().record("user", device.user);
                tracing::debug!(user = device.user, device = device.device, "authenticated");
                self.respond(
                    id,
                    Out::AuthOk(pb::AuthOk {
                        phone: info.phone.clone(),
                        server_time_ms: now_ms(),
                        one_time_keys_remaining: info.one_time_keys,
                        has_keys: info.has_keys,
                        primary: info.primary,
                    }),
                );
                metrics::gauge!(tm::AUTHENTICATED).increment(1.0);
                self.authed = Some(Authed {
                    device,
                    phone: info.phone,
                    other_devices: info
                        .devices
                        .into_iter()
                        .filter(|d| *d != device.device)
                        .collect(),
                });
                self.push_rx = Some(push_rx);
            }
            Err(e) => {
                self.respond_error(id, route_error(&e));
                if matches!(e, RouteError::Unauthenticated) {
                    self.auth_failures += 1;
                    if self.auth_failures >= MAX_AUTH_FAILURES {
                        return Err(End::Goodbye(ErrorCode::Unauthenticated));
                    }
                }
            }
        }
        Ok(())
    }

    /// Holds later sends to `to_user` on this connection behind the send
    /// `client_msg_id`, refused with `err` before it reached a shard
    /// (retryable refusals only; the first refused send is the one held).
    fn hold_sends(&mut self, to_user: UserId, client_msg_id: String, err: &pb::Error) {
        if err.retry_after_ms > 0 && self.held_sends.len() < MAX_HELD_RECIPIENTS {
            self.held_sends
                .entry(to_user)
                .or_insert_with(|| (client_msg_id, err.clone()));
        }
    }

    /// The authenticated account's phone number (empty before auth).
    fn phone(&self) -> String {
        self.authed
            .as_ref()
            .map(|a| a.phone.clone())
            .unwrap_or_default()
    }

    /// Whether a send's `self_payloads` miss or name devices other than the
    /// account's other devices. Device ids in one list are unique
    /// (`validate_send`), so equal lengths and inclusion mean equal sets.
    fn own_devices_mismatch(&self, device: DeviceKey, req: &pb::Send) -> Option<RouteError> {
        let other_devices = &self.authed.as_ref()?.other_devices;
        if req.self_payloads.len() == other_devices.len()
            && req
                .self_payloads
                .iter()
                .all(|p| other_devices.contains(&p.device_id))
        {
            return None;
        }
        let addressed: BTreeSet<u32> = req.self_payloads.iter().map(|p| p.device_id).collect();
        Some(RouteError::DeviceMismatch {
            user: device.user,
            missing: other_devices.difference(&addressed).copied().collect(),
            stale: addressed.difference(other_devices).copied().collect(),
        })
    }

    async fn on_authed_frame(&mut self, id: u32, body: In) -> Result<(), End> {
        let Some(device) = self.authed.as_ref().map(|a| a.device) else {
            return Ok(());
        };
        match body {
            In::LookupUser(req) => {
                if let Err(refused) = self.gw.limits.lookup(device.user) {
                    self.respond_error(id, route_error(&refused.into()));
                    return Ok(());
                }
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.lookup_phone(req.phone).await;
                    Some(answer(id, result, |u| {
                        Out::UserInfo(pb::UserInfo {
                            user_id: u.user,
                            phone: u.phone,
                            devices: u.devices,
                        })
                    }))
                }));
            }
            In::Send(req) => {
                if let Err(msg) = validate_send(&req) {
                    self.respond_error(id, error(ErrorCode::BadRequest, msg));
                    return Ok(());
                }
                if let Some(too_big) = req
                    .payloads
                    .iter()
                    .chain(&req.self_payloads)
                    .find(|p| p.payload.len() > limits::MAX_PAYLOAD_BYTES)
                {
                    self.respond_error(
                        id,
                        error(
                            ErrorCode::PayloadTooLarge,
                            format!(
                                "payload for device {} is {} bytes; the maximum is {}",
                                too_big.device_id,
                                too_big.payload.len(),
                                limits::MAX_PAYLOAD_BYTES
                            ),
                        ),
                    );
                    return Ok(());
                }
                if req.to_user == device.user && !req.self_payloads.is_empty() {
                    self.respond_error(
                        id,
                        error(
                            ErrorCode::BadRequest,
                            "a note to self addresses the other devices in payloads; self_payloads must be empty",
                        ),
                    );
                    return Ok(());
                }
                let to_self = req.to_user == device.user;
                if !to_self && let Some(mismatch) = self.own_devices_mismatch(device, &req) {
                    self.respond_error(id, route_error(&mismatch));
                    return Ok(());
                }
                // A send refused here (below) holds later sends to the same
                // user on this connection until it is sent again, so its
                // retry cannot land after them (the shards do the same for
                // their refusals: `router::order`).
                if let Some((refused_id, err)) = self.held_sends.get(&req.to_user) {
                    if *refused_id != req.client_msg_id {
                        let err = pb::Error {
                            message: HELD_MESSAGE.into(),
                            ..err.clone()
                        };
                        self.respond_error(id, err);
                        return Ok(());
                    }
                    self.held_sends.remove(&req.to_user);
                }
                if let Err(refused) = self.gw.limits.send(device.user, req.to_user) {
                    let err = route_error(&refused.into());
                    self.hold_sends(req.to_user, req.client_msg_id, &err);
                    self.respond_error(id, err);
                    return Ok(());
                }
                let phone = self.phone();
                let send = SendRequest {
                    from: device,
                    from_phone: phone.clone(),
                    client_msg_id: req.client_msg_id.clone(),
                    to_user: req.to_user,
                    payloads: req.payloads,
                    first_attempt: req.first_attempt,
                };
                let copies = (!to_self).then(|| SendRequest {
                    from: device,
                    from_phone: phone,
                    client_msg_id: req.client_msg_id,
                    to_user: req.to_user,
                    payloads: req.self_payloads,
                    first_attempt: req.first_attempt,
                });
                // Both parts are enqueued in frame order (so each device's
                // messages keep their order); the ✓ means both parts are
                // durable. It usually comes as a push; across shards it is
                // awaited concurrently.
                let to = AnswerTo {
                    conn_id: self.conn_id,
                    frame: id,
                };
                let to_user = req.to_user;
                let msg_id = send.client_msg_id.clone();
                let (submitted, answers) = alongside_pending(
                    &mut self.pending,
                    self.gw.router.submit_send(send, copies, to),
                )
                .await;
                self.queue_all(answers);
                let ticket = match submitted {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        self.sends_in_flight += 1;
                        return Ok(());
                    }
                    Err(e) => {
                        let err = route_error(&e);
                        self.hold_sends(to_user, msg_id, &err);
                        self.respond_error(id, err);
                        return Ok(());
                    }
                };
                let started = std::time::Instant::now();
                let ack_seconds = self.gw.metrics.send_ack_seconds.clone();
                self.pending.push(Box::pin(async move {
                    let result = ticket.accepted().await;
                    if result.is_ok() {
                        ack_seconds.record(started.elapsed().as_secs_f64());
                    }
                    Some(answer(id, result, send_ok))
                }));
            }
            In::Ack(ack) => self.on_ack(device, ack).await?,
            In::SendReceipt(req) => {
                if req.kind() != pb::ReceiptKind::Read {
                    self.respond_error(
                        id,
                        error(ErrorCode::BadRequest, "clients may only send READ receipts"),
                    );
                    return Ok(());
                }
                if req.client_msg_ids.is_empty()
                    || req.client_msg_ids.len() > limits::MAX_RECEIPT_IDS
                    || req.client_msg_ids.iter().any(|m| !valid_msg_id(m))
                {
                    self.respond_error(
                        id,
                        error(
                            ErrorCode::BadRequest,
                            format!(
                                "a receipt names 1 to {} valid message ids",
                                limits::MAX_RECEIPT_IDS
                            ),
                        ),
                    );
                    return Ok(());
                }
                if let Err(refused) = self.gw.limits.read_receipt(device.user) {
                    self.respond_error(id, route_error(&refused.into()));
                    return Ok(());
                }
                let receipt = pb::Receipt {
                    from_user: device.user,
                    from_device: device.device,
                    from_phone: self.phone(),
                    kind: pb::ReceiptKind::Read as i32,
                    client_msg_ids: req.client_msg_ids,
                };
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.enqueue_receipt(req.to_user, receipt, true).await;
                    Some(answer(id, result, |()| Out::ReceiptOk(pb::ReceiptOk {})))
                }));
            }
            In::UploadKeys(up) => {
                if let Err(msg) = crate::keys::verify_upload(&up) {
                    self.respond_error(id, error(ErrorCode::InvalidKeys, msg));
                    return Ok(());
                }
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.upload_keys(device, up).await;
                    Some(answer(id, result, |n| {
                        Out::KeysUploaded(pb::KeysUploaded {
                            one_time_keys_remaining: n,
                        })
                    }))
                }));
            }
            In::FetchBundles(req) => {
                // Per requesting user; the targets' one-time keys are
                // budgeted per device by their shard.
                if let Err(refused) = self.gw.limits.bundle_fetch(device.user) {
                    self.respond_error(id, route_error(&refused.into()));
                    return Ok(());
                }
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw
                        .router
                        .fetch_bundles(device, req.user_id, req.identities_only)
                        .await;
                    Some(answer(id, result, |devices| {
                        Out::Bundles(pb::Bundles {
                            user_id: req.user_id,
                            devices,
                        })
                    }))
                }));
            }
            In::CreateLinkCode(_) => {
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.create_link_code(device).await;
                    Some(answer(id, result, |(code, expires_at_ms)| {
                        Out::LinkCode(pb::LinkCode {
                            code,
                            expires_at_ms,
                        })
                    }))
                }));
            }
            In::SetPin(req) => {
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = async {
                        let hash = if req.pin.is_empty() {
                            String::new()
                        } else {
                            crate::accounts::validate_pin(&req.pin)
                                .map_err(|e| RouteError::BadRequest(e.to_string()))?;
                            // Argon2 is slow on purpose: off the runtime.
                            tokio::task::spawn_blocking(move || crate::accounts::hash_pin(&req.pin))
                                .await
                                .map_err(|_| RouteError::Internal)?
                                .map_err(|e| RouteError::BadRequest(e.to_string()))?
                        };
                        gw.router.set_pin(device, hash).await
                    }
                    .await;
                    Some(answer(id, result, |enabled| {
                        Out::PinSet(pb::PinSet { enabled })
                    }))
                }));
            }
            In::ListDevices(_) => {
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.list_devices(device.user).await;
                    Some(answer(id, result, |devices| {
                        Out::DeviceList(pb::DeviceList { devices })
                    }))
                }));
            }
            In::RevokeDevice(req) => {
                let gw = self.gw.clone();
                self.pending.push(Box::pin(async move {
                    let result = gw.router.revoke_device(device, req.device_id).await;
                    Some(answer(id, result, |()| {
                        Out::DeviceRevoked(pb::DeviceRevoked {})
                    }))
                }));
            }
            In::Ping(_)
            | In::RequestCode(_)
            | In::VerifyCode(_)
            | In::Auth(_)
            | In::LinkDevice(_) => {}
        }
        Ok(())
    }

    /// An ack: the drain may go on at once; delivery receipts are made
    /// durable for the senders before the entries are deleted, so a crash in
    /// between causes a redelivery, never a lost receipt.
    async fn on_ack(&mut self, device: DeviceKey, ack: pb::Ack) -> Result<(), End> {
        if ack.seqs.len() > limits::MAX_ACK_SEQS {
            return Err(End::Goodbye(ErrorCode::ProtocolViolation));
        }
        let mut seqs = Vec::with_capacity(ack.seqs.len());
        // Per sender: the acked message ids and their entries.
        let mut owed: FastMap<UserId, (Vec<String>, Vec<u64>)> = FastMap::default();
        let mut receipt_seqs = Vec::new();
        for seq in ack.seqs {
            // Only entries delivered on this connection can be acked here.
            let Some((entry, server_ts_ms)) = self.delivered.remove(&seq) else {
                continue;
            };
            seqs.push(seq);
            if entry.is_some() {
                let delay_ms = now_ms().saturating_sub(server_ts_ms);
                self.gw
                    .metrics
                    .delivery_seconds
                    .record(delay_ms as f64 / 1000.0);
            }
            match entry {
                Some((from_user, msg_id)) => {
                    let (ids, entries) = owed.entry(from_user).or_default();
                    ids.push(msg_id);
                    entries.push(seq);
                }
                None => receipt_seqs.push(seq),
            }
        }
        if seqs.is_empty() {
            return Ok(());
        }
        let phone = if owed.is_empty() {
            String::new()
        } else {
            self.phone()
        };
        let owed: Vec<OwedReceipt> = owed
            .into_iter()
            .map(|(to_user, (ids, message_seqs))| OwedReceipt {
                to_user,
                receipt: pb::Receipt {
                    from_user: device.user,
                    from_device: device.device,
                    from_phone: phone.clone(),
                    kind: pb::ReceiptKind::Delivered as i32,
                    client_msg_ids: ids,
                },
                message_seqs,
            })
            .collect();
        let router = self.gw.router.clone();
        let (remote, answers) = alongside_pending(
            &mut self.pending,
            router.ack(device, self.conn_id, seqs, receipt_seqs, owed),
        )
        .await;
        self.queue_all(answers);
        if remote.is_empty() {
            return Ok(());
        }
        // Senders on other shards: queue each receipt there first, then
        // remove the messages it covers.
        self.pending.push(Box::pin(async move {
            for owed in remote {
                match router.enqueue_receipt(owed.to_user, owed.receipt, false).await {
                    Ok(()) => router.delete(device, owed.message_seqs).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "delivery receipt not stored; entries kept for redelivery");
                    }
                }
            }
            None
        }));
        Ok(())
    }
}

/// The ✓ of a send.
fn send_ok(a: SendAccepted) -> Out {
    Out::SendOk(pb::SendOk {
        server_ts_ms: a.server_ts_ms,
        duplicate: a.duplicate,
    })
}

fn valid_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= limits::MAX_CLIENT_MSG_ID_BYTES
}

fn validate_send(req: &pb::Send) -> Result<(), String> {
    if !valid_msg_id(&req.client_msg_id) {
        return Err(format!(
            "client_msg_id must be 1 to {} bytes",
            limits::MAX_CLIENT_MSG_ID_BYTES
        ));
    }
    if req.to_user == 0 {
        return Err("to_user is required".into());
    }
    if req.payloads.len() + req.self_payloads.len() > MAX_PAYLOADS_PER_SEND {
        return Err(format!("at most {MAX_PAYLOADS_PER_SEND} payloads per send"));
    }
    // At most 16 payloads: comparing pairs is cheaper than hashing.
    for list in [&req.payloads, &req.self_payloads] {
        for (i, p) in list.iter().enumerate() {
            if list.iter().take(i).any(|q| q.device_id == p.device_id) {
                return Err(format!("device {} addressed twice", p.device_id));
            }
        }
    }
    Ok(())
}

/// A response frame from a router result.
fn answer<T>(id: u32, result: Result<T, RouteError>, ok: impl FnOnce(T) -> Out) -> pb::ServerFrame {
    match result {
        Ok(v) => pb::ServerFrame {
            id,
            body: Some(ok(v)),
        },
        Err(e) => error_frame(id, route_error(&e)),
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
