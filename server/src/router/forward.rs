//! Node links (cluster mode): a node that does not serve the partitions
//! forwards every router command to the node that does, and receives the
//! answers and the pushes for its connections back.
//!
//! A link is one TCP connection from the forwarding node to the serving
//! node's `cluster_listen` address, encrypted and authenticated with Noise
//! (the pattern of the client protocol). Both ends present the cluster's
//! one server key as their static key and each refuses a peer holding any
//! other: only a node that read the key from the cluster's PostgreSQL can
//! link. Inside, frames are [`LinkFrame`]s: a kind, a request id and a body
//! encoded by `router::remote`.
//!
//! - `REQUEST` (id, command): the serving node routes the command to its
//!   shard by the command's key and sends `ANSWER` or `ERROR` with the same
//!   id once the shard answers. `POST`: a command without an answer (acks,
//!   deletions, disconnects).
//! - An `Authenticate` carries the connection's id; the serving node gives
//!   the shard a push queue of its own for it, and one pump per link
//!   (not a task per connection: about 1 KB less per connection) sends
//!   what the shards push back as `PUSH` frames, which the forwarding node
//!   hands to the connection's real queue (a full one is kicked as a slow
//!   reader, as a shard would).
//!
//! Order: one link carries a node's commands in the order they were
//! forwarded, and the serving node queues them into its shards in that
//! order, so a connection's sends keep their order across the link.
//!
//! Failure: when a link ends, the forwarding node fails every request
//! waiting on it (STORAGE_UNAVAILABLE, retryable; nothing acknowledged was
//! only in the link) but keeps the connections served through it, with the
//! device and credential each authenticated with. The next link, to
//! whichever node serves then, first carries an `Authenticate` for each of
//! them, with the connection's own push queue: the new owner drains their
//! queues into them as it would for a client that reconnected (entries the
//! client already had come again; clients drop them by message id). When
//! this node itself takes the partitions over, it hands them to its own
//! shards the same way ([`Forwarder::hand_over`]). A connection kicked with
//! `ShuttingDown` by the serving node (its clean stop) is kept the same
//! way. Connections with no link for longer than the grace (twice the
//! lease and a second) are ended (`Unavailable`), and so is one whose
//! device the new owner refuses. Connection ids are random per node
//! process (`Gateway`), so connections of different nodes never share an
//! id on the serving node.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message;
use switchboard_proto::noise::{Handshake, Keypair};
use switchboard_proto::{ProtoError, Session, record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::remote::{self, AnswerSlot};
use super::shard::{Command, Queued};
use super::{ConnLink, ConnRx, ConnTx, KickReason, Received, RouteError, Router, TrySendError};
use crate::FastMap;
use crate::store::DeviceKey;
use crate::telemetry as tm;

/// Largest frame on a link: a forwarded command carries at most one client
/// frame's worth of data, and a push at most a `Deliver` frame.
const LINK_MAX_FRAME_BYTES: usize = 16 << 20;

/// Frames waiting for a link's writer; past it, forwarding waits (within
/// the request deadline), as it would for a shard's inbox.
const LINK_QUEUE_FRAMES: usize = 4096;

/// Most plaintext gathered into one write.
const GATHER_BYTES: usize = 256 * 1024;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Pause before connecting again after a failed attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Frame kinds.
mod kind {
    pub(super) const REQUEST: u32 = 1;
    pub(super) const POST: u32 = 2;
    pub(super) const ANSWER: u32 = 3;
    pub(super) const ERROR: u32 = 4;
    pub(super) const PUSH: u32 = 5;
}

/// One frame on a link.
#[derive(Clone, PartialEq, Message)]
struct LinkFrame {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(uint64, tag = "2")]
    id: u64,
    #[prost(bytes = "vec", tag = "3")]
    body: Vec<u8>,
}

/// Why a link could not be made or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The socket failed.
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake or a record failed.
    #[error("link protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The peer does not hold the cluster's key.
    #[error("the peer does not hold the cluster's server key")]
    NotCluster,
    /// A frame did not decode.
    #[error("undecodable link frame: {0}")]
    Frame(String),
    /// The peer closed the link.
    #[error("the link was closed")]
    Closed,
    /// Connecting took too long.
    #[error("timed out connecting")]
    Timeout,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads one Noise record from `stream`, with `buf` keeping what came
/// after it.
async fn read_record(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<BytesMut, LinkError> {
    loop {
        if let Some(rec) = record::decode(buf)? {
            return Ok(rec);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

/// The Noise handshake of a link; both ends must hold `key`.
async fn handshake(
    stream: &mut TcpStream,
    key: &Keypair,
    initiator: bool,
) -> Result<(Session, BytesMut), LinkError> {
    let mut hs = if initiator {
        Handshake::initiator(&key.private)?
    } else {
        Handshake::responder(&key.private)?
    };
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    // XX: -> e; <- e, ee, s, es; -> s, se.
    for step in 0..3 {
        let ours = (step % 2 == 0) == initiator;
        if ours {
            out.clear();
            hs.write_message(&[], &mut out)?;
            stream.write_all(&out).await?;
        } else {
            let rec = read_record(stream, &mut buf).await?;
            hs.read_message(&rec)?;
        }
    }
    if hs.remote_static().as_deref() != Some(key.public.as_slice()) {
        return Err(LinkError::NotCluster);
    }
    Ok((hs.into_session(LINK_MAX_FRAME_BYTES)?, buf))
}

/// Writes frames from `rx` to the link until it ends, many per write.
async fn write_frames(
    mut half: tokio::net::tcp::OwnedWriteHalf,
    session: Arc<Mutex<Session>>,
    mut rx: mpsc::Receiver<LinkFrame>,
) -> Result<(), LinkError> {
    let mut out = BytesMut::new();
    while let Some(first) = rx.recv().await {
        out.clear();
        {
            let mut s = lock(&session);
            s.queue(&first);
            while s.pending_bytes() < GATHER_BYTES {
                match rx.try_recv() {
                    Ok(frame) => s.queue(&frame),
                    Err(_) => break,
                }
            }
            s.seal(&mut out)?;
        }
        half.write_all(&out).await?;
    }
    Ok(())
}

/// Reads frames from the link and hands each to `on_frame`, in order.
async fn read_frames<F>(
    mut half: tokio::net::tcp::OwnedReadHalf,
    session: Arc<Mutex<Session>>,
    mut wire: BytesMut,
    mut on_frame: impl FnMut(LinkFrame) -> F,
) -> Result<(), LinkError>
where
    F: Future<Output = ()>,
{
    let mut frames = Vec::new();
    loop {
        {
            let mut s = lock(&session);
            loop {
                while let Some(body) = s.next_frame_bytes()? {
                    frames.push(
                        LinkFrame::decode(body.freeze())
                            .map_err(|e| LinkError::Frame(e.to_string()))?,
                    );
                }
                if !s.read_record(&mut wire)? {
                    break;
                }
            }
        }
        for frame in frames.drain(..) {
            on_frame(frame).await;
        }
        if half.read_buf(&mut wire).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

/// What a forwarding node keeps per link: answers awaited and the
/// connections served through it. `closed` is set under the same lock
/// when the link ends, so nothing is registered after the link failed it.
#[derive(Default)]
struct Waiting {
    closed: bool,
    answers: FastMap<u64, AnswerSlot>,
    conns: FastMap<u64, Attached>,
}

/// A connection served through a link: its push queue, and what it
/// authenticated with, to attach it again over another link.
struct Attached {
    push: ConnTx,
    device: DeviceKey,
    credential: Box<[u8]>,
}

impl Attached {
    /// The command that attaches this connection to a node's shard.
    fn authenticate(
        self,
        conn_id: u64,
    ) -> (
        Command,
        oneshot::Receiver<Result<super::AuthInfo, RouteError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Authenticate {
            device: self.device,
            credential: self.credential.into_vec(),
            link: ConnLink {
                conn_id,
                push: self.push,
            },
            reply,
        };
        (cmd, answer)
    }
}

/// Connections whose link ended, waiting for the next one (or for this
/// node's own shards), each with the time it lost its link.
#[derive(Default)]
struct Orphans {
    conns: FastMap<u64, (Instant, Attached)>,
    /// This node's own shards, once it serves: connections are handed to
    /// them from then on.
    local: Option<Router>,
}

/// Keeps `conns` (their link ended) for the next link, or hands them to
/// this node's shards if it serves. Connections already gone are dropped.
fn orphan(pool: &Mutex<Orphans>, conns: impl IntoIterator<Item = (u64, Attached)>) {
    let mut conns = conns
        .into_iter()
        .filter(|(_, a)| !a.push.is_gone())
        .peekable();
    if conns.peek().is_none() {
        return;
    }
    let mut p = lock(pool);
    if let Some(local) = p.local.clone() {
        drop(p);
        attach_locally(local, conns.collect());
        return;
    }
    let now = Instant::now();
    p.conns.extend(conns.map(|(id, a)| (id, (now, a))));
}

/// Attaches `conns` to this node's own shards (`local`), in the
/// background. A connection its shard refuses (or cannot take) ends: the
/// shard drops its queue.
fn attach_locally(local: Router, conns: Vec<(u64, Attached)>) {
    use futures_util::StreamExt as _;
    /// Authentications in flight at once.
    const AT_ONCE: usize = 1024;
    tokio::spawn(async move {
        futures_util::stream::iter(conns)
            .for_each_concurrent(AT_ONCE, |(conn_id, a)| {
                let local = local.clone();
                async move {
                    let link = ConnLink {
                        conn_id,
                        push: a.push,
                    };
                    let outcome = match local
                        .authenticate(a.device, a.credential.into_vec(), link)
                        .await
                    {
                        Ok(_) => "reattached",
                        Err(_) => "kicked",
                    };
                    metrics::counter!(tm::REATTACHED_CONNECTIONS, "outcome" => outcome)
                        .increment(1);
                }
            })
            .await;
    });
}

/// One link of a forwarding node to the serving node.
struct Peer {
    addr: SocketAddr,
    tx: mpsc::Sender<LinkFrame>,
    waiting: Mutex<Waiting>,
    next_id: AtomicU64,
    ended: CancellationToken,
    /// The forwarder's connections without a link.
    orphans: Arc<Mutex<Orphans>>,
}

impl Peer {
    /// Fails the link's requests and keeps its connections for the next
    /// link.
    fn fail_all(&self) {
        let (answers, conns) = {
            let mut w = lock(&self.waiting);
            w.closed = true;
            (std::mem::take(&mut w.answers), std::mem::take(&mut w.conns))
        };
        for (_, slot) in answers {
            slot(Err(RouteError::NoServingNode));
        }
        orphan(&self.orphans, conns);
        self.ended.cancel();
    }

    /// Ends a connection served through this link.
    fn kick(&self, conn_id: u64, reason: KickReason) {
        let removed = lock(&self.waiting).conns.remove(&conn_id);
        if let Some(a) = removed {
            a.push.kick(reason);
        }
    }

    /// A frame from the serving node.
    fn on_frame(&self, frame: LinkFrame) {
        match frame.kind {
            kind::ANSWER | kind::ERROR => {
                let Some(slot) = lock(&self.waiting).answers.remove(&frame.id) else {
                    return;
                };
                if frame.kind == kind::ANSWER {
                    slot(Ok(&frame.body));
                } else {
                    slot(Err(
                        remote::decode_error(&frame.body).unwrap_or(RouteError::Internal)
                    ));
                }
            }
            kind::PUSH => match remote::decode_push(&frame.body) {
                Ok((conn_id, received)) => self.push(conn_id, received),
                Err(e) => tracing::warn!(error = %e, "undecodable push on a node link"),
            },
            other => tracing::warn!(kind = other, "unexpected frame on a node link"),
        }
    }

    /// Hands a push to the connection it is for.
    fn push(&self, conn_id: u64, received: Received) {
        let mut w = lock(&self.waiting);
        match received {
            Received::Item(item) => {
                let full = match w.conns.get(&conn_id) {
                    Some(conn) => matches!(conn.push.try_send(item), Err(TrySendError::Full)),
                    None => false,
                };
                if full && let Some(conn) = w.conns.remove(&conn_id) {
                    // As a shard does: the connection's entries stay in its
                    // durable queue; the serving node learns of the end
                    // when the connection says it is disconnected.
                    conn.push.kick(KickReason::SlowReader);
                }
            }
            Received::Kicked(KickReason::ShuttingDown) => {
                // The serving node stops, not this one: the connection
                // waits for the node that takes over.
                if let Some(conn) = w.conns.remove(&conn_id) {
                    drop(w);
                    orphan(&self.orphans, [(conn_id, conn)]);
                }
            }
            Received::Kicked(reason) => {
                if let Some(conn) = w.conns.remove(&conn_id) {
                    conn.push.kick(reason);
                }
            }
            Received::Closed => {
                w.conns.remove(&conn_id);
            }
        }
    }
}

/// The forwarding end of node links: keeps one link to the serving node
/// and forwards commands over it.
pub struct Forwarder {
    key: Keypair,
    peer: Mutex<Option<Arc<Peer>>>,
    /// Connections whose link ended, until the next link or the grace.
    orphans: Arc<Mutex<Orphans>>,
    /// How long a connection may wait without a link.
    grace: Duration,
    /// Cancelled when this node's own shards take the connections over
    /// ([`Forwarder::hand_over`]): no more links.
    handed_over: CancellationToken,
    /// The serving node's address when its last connection attempt was
    /// refused (its process is gone), until a link is up again.
    refused: Mutex<Option<SocketAddr>>,
    /// Told when a connection is refused.
    on_refused: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Looked up once: a lookup searches the registry.
    forwarded: metrics::Counter,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("peer", &self.current().map(|p| p.addr))
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder that links with the cluster's server `key`; a
    /// connection whose link ends waits up to `grace` for the next.
    #[must_use]
    pub fn new(key: Keypair, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            key,
            peer: Mutex::new(None),
            orphans: Arc::new(Mutex::new(Orphans::default())),
            grace,
            handed_over: CancellationToken::new(),
            refused: Mutex::new(None),
            on_refused: Mutex::new(None),
            forwarded: metrics::counter!(tm::FORWARDED_COMMANDS),
        })
    }

    fn current(&self) -> Option<Arc<Peer>> {
        lock(&self.peer)
            .as_ref()
            .filter(|p| !p.ended.is_cancelled())
            .cloned()
    }

    /// The serving node's link address if it refused this node's last
    /// attempt to link (nothing listens there: the node is gone).
    #[must_use]
    pub fn refused(&self) -> Option<SocketAddr> {
        *lock(&self.refused)
    }

    /// Calls `f` each time the serving node refuses a link (for the
    /// membership thread to look again at once).
    pub fn on_refused(&self, f: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_refused) = Some(Box::new(f));
    }

    /// The address of the serving node this forwarder is linked to.
    #[must_use]
    pub fn linked_to(&self) -> Option<SocketAddr> {
        self.current().map(|p| p.addr)
    }

    /// Keeps a link to the address `target` holds (`None`: no node serves;
    /// requests fail as unavailable), reconnecting when it changes or the
    /// link ends, until `cancel`.
    pub async fn maintain(
        self: Arc<Self>,
        mut target: watch::Receiver<Option<SocketAddr>>,
        cancel: CancellationToken,
    ) {
        let mut failing = None;
        let mut expiry = tokio::time::interval(RECONNECT_PAUSE);
        loop {
            self.expire_orphans();
            let want = *target.borrow_and_update();
            let current = self.current();
            let ended = match (&current, want) {
                (Some(peer), Some(addr)) if peer.addr == addr => Some(peer.ended.clone()),
                _ => {
                    if let Some(old) = lock(&self.peer).take() {
                        old.fail_all();
                    }
                    metrics::gauge!(tm::NODE_LINKS).set(0.0);
                    match want {
                        Some(addr) => match self.connect(addr).await {
                            Ok(peer) => {
                                failing = None;
                                *lock(&self.refused) = None;
                                tracing::info!(%addr, "linked to the serving node");
                                metrics::gauge!(tm::NODE_LINKS).set(1.0);
                                // Before any other command: the connections
                                // the last link left are attached first.
                                self.attach_orphans(&peer).await;
                                let ended = peer.ended.clone();
                                *lock(&self.peer) = Some(peer);
                                Some(ended)
                            }
                            Err(e) => {
                                if matches!(&e, LinkError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
                                {
                                    *lock(&self.refused) = Some(addr);
                                    if let Some(f) = lock(&self.on_refused).as_ref() {
                                        f();
                                    }
                                }
                                // Once per address: while a dead node's
                                // lease runs, this repeats every pause.
                                if failing != Some(addr) {
                                    tracing::warn!(%addr, error = %e, "cannot link to the serving node; retrying");
                                    failing = Some(addr);
                                }
                                None
                            }
                        },
                        None => None,
                    }
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.handed_over.cancelled() => break,
                changed = target.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = async {
                    match &ended {
                        Some(e) => e.cancelled().await,
                        None => tokio::time::sleep(RECONNECT_PAUSE).await,
                    }
                } => {}
                // Orphans expire while a link is up, too.
                _ = expiry.tick(), if ended.is_some() => {}
            }
        }
        if let Some(old) = lock(&self.peer).take() {
            old.fail_all();
        }
        metrics::gauge!(tm::NODE_LINKS).set(0.0);
    }

    /// Ends the connections that have waited longer than the grace for a
    /// link.
    fn expire_orphans(&self) {
        let expired: Vec<Attached> = {
            let mut p = lock(&self.orphans);
            if p.conns.is_empty() {
                return;
            }
            let grace = self.grace;
            let ids: Vec<u64> = p
                .conns
                .iter()
                .filter(|(_, (since, _))| since.elapsed() >= grace)
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| p.conns.remove(id))
                .map(|(_, a)| a)
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        tracing::info!(
            connections = expired.len(),
            "no serving node within the grace: ending the connections that waited for one"
        );
        metrics::counter!(tm::REATTACHED_CONNECTIONS, "outcome" => "kicked")
            .increment(expired.len() as u64);
        for a in expired {
            a.push.kick(KickReason::Unavailable);
        }
    }

    /// Attaches the connections the last link left to `peer`: one
    /// `Authenticate` each, queued on the link before anything else. One
    /// the new owner refuses is ended.
    async fn attach_orphans(&self, peer: &Arc<Peer>) {
        let orphans: Vec<(u64, Attached)> = {
            let mut p = lock(&self.orphans);
            if p.local.is_some() {
                return;
            }
            p.conns.drain().map(|(id, (_, a))| (id, a)).collect()
        };
        if orphans.is_empty() {
            return;
        }
        tracing::info!(
            connections = orphans.len(),
            addr = %peer.addr,
            "attaching this node's connections to the serving node"
        );
        let mut answers = futures_util::stream::FuturesUnordered::new();
        for (conn_id, a) in orphans {
            if a.push.is_gone() {
                continue;
            }
            let (cmd, answer) = a.authenticate(conn_id);
            if self.forward_on(peer, cmd, CONNECT_TIMEOUT).await.is_err() {
                // The new link failed at once; its connection went with the
                // command (the rest wait for the next link).
                metrics::counter!(tm::REATTACHED_CONNECTIONS, "outcome" => "kicked").increment(1);
                continue;
            }
            answers.push(async move { (conn_id, answer.await) });
        }
        let peer = peer.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            while let Some((conn_id, answer)) = answers.next().await {
                match answer {
                    Ok(Ok(_)) => {
                        metrics::counter!(tm::REATTACHED_CONNECTIONS, "outcome" => "reattached")
                            .increment(1);
                    }
                    // The link ended first: the connection is an orphan again.
                    Ok(Err(_)) | Err(_) if peer.ended.is_cancelled() => {}
                    Ok(Err(e)) => {
                        tracing::debug!(conn_id, error = %e, "the serving node refused a connection attached again");
                        metrics::counter!(tm::REATTACHED_CONNECTIONS, "outcome" => "kicked")
                            .increment(1);
                        peer.kick(conn_id, KickReason::Unavailable);
                    }
                    Err(_) => peer.kick(conn_id, KickReason::Unavailable),
                }
            }
        });
    }

    /// Hands every connection of this node to its own shards (`local`):
    /// the node serves now. Links end; a connection whose link ends later
    /// goes to `local` at once.
    pub fn hand_over(&self, local: Router) {
        lock(&self.orphans).local = Some(local.clone());
        self.handed_over.cancel();
        let mut conns: Vec<(u64, Attached)> = match self.current() {
            Some(peer) => lock(&peer.waiting).conns.drain().collect(),
            None => Vec::new(),
        };
        conns.extend(
            lock(&self.orphans)
                .conns
                .drain()
                .map(|(id, (_, a))| (id, a)),
        );
        conns.retain(|(_, a)| !a.push.is_gone());
        if !conns.is_empty() {
            tracing::info!(
                connections = conns.len(),
                "handing this node's connections to its own shards"
            );
            attach_locally(local, conns);
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Arc<Peer>, LinkError> {
        let (mut stream, session, wire) = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (session, wire) = handshake(&mut stream, &self.key, true).await?;
            Ok::<_, LinkError>((stream, session, wire))
        })
        .await
        .map_err(|_| LinkError::Timeout)??;
        stream.flush().await?;
        let (read, write) = stream.into_split();
        let session = Arc::new(Mutex::new(session));
        let (tx, rx) = mpsc::channel(LINK_QUEUE_FRAMES);
        let peer = Arc::new(Peer {
            addr,
            tx,
            waiting: Mutex::new(Waiting::default()),
            next_id: AtomicU64::new(1),
            ended: CancellationToken::new(),
            orphans: self.orphans.clone(),
        });
        let writer_session = session.clone();
        let writer_peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(write, writer_session, rx).await {
                tracing::debug!(error = %e, "node link writer ended");
            }
            writer_peer.fail_all();
        });
        let reader_peer = peer.clone();
        tokio::spawn(async move {
            let on_frame = |frame| {
                reader_peer.on_frame(frame);
                std::future::ready(())
            };
            let end = tokio::select! {
                r = read_frames(read, session, wire, on_frame) => r,
                () = reader_peer.ended.cancelled() => Ok(()),
            };
            if let Err(e) = end {
                tracing::info!(error = %e, "node link ended");
            }
            reader_peer.fail_all();
        });
        Ok(peer)
    }

    /// Sends `cmd` to the serving node; its answer (if it has one) reaches
    /// the command's reply. Returns once the command is on the link's
    /// queue, so commands forwarded one after another keep their order.
    ///
    /// # Errors
    /// STORAGE_UNAVAILABLE without a link, OVERLOADED when the link's
    /// queue stays full for `deadline`.
    pub(super) async fn forward(&self, cmd: Command, deadline: Duration) -> Result<(), RouteError> {
        let Some(peer) = self.current() else {
            return Err(RouteError::NoServingNode);
        };
        self.forward_on(&peer, cmd, deadline).await
    }

    /// [`Forwarder::forward`] on the link `peer`.
    async fn forward_on(
        &self,
        peer: &Peer,
        cmd: Command,
        deadline: Duration,
    ) -> Result<(), RouteError> {
        // Kept with the connection, to attach it again over another link.
        let auth = match &cmd {
            Command::Authenticate {
                device, credential, ..
            } => Some((*device, credential.clone().into_boxed_slice())),
            _ => None,
        };
        let out = match remote::encode_command(cmd) {
            Ok(out) => out,
            Err(_) => return Err(RouteError::Internal),
        };
        let id = peer.next_id.fetch_add(1, Ordering::Relaxed);
        let frame_kind = if out.answer.is_some() {
            kind::REQUEST
        } else {
            kind::POST
        };
        let conn_id = out.link.as_ref().map(|l| l.conn_id);
        {
            let mut w = lock(&peer.waiting);
            if w.closed {
                return Err(RouteError::NoServingNode);
            }
            if let Some(slot) = out.answer {
                w.answers.insert(id, slot);
            }
            if let (Some(link), Some((device, credential))) = (out.link, auth) {
                w.conns.insert(
                    link.conn_id,
                    Attached {
                        push: link.push,
                        device,
                        credential,
                    },
                );
            }
        }
        let frame = LinkFrame {
            kind: frame_kind,
            id,
            body: out.body,
        };
        self.forwarded.increment(1);
        let sent = match peer.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(RouteError::NoServingNode),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                match peer.tx.send_timeout(frame, deadline).await {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(RouteError::Overloaded {
                        retry_after_ms: super::shard::OVERLOADED_RETRY_AFTER_MS,
                    }),
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(RouteError::NoServingNode),
                }
            }
        };
        if sent.is_err() {
            // Not sent: its answer slot and its connection go (the caller
            // gets the error instead).
            let mut w = lock(&peer.waiting);
            w.answers.remove(&id);
            if let Some(conn_id) = conn_id {
                w.conns.remove(&conn_id);
            }
        }
        sent
    }

    /// Ends every connection served through the link or waiting for one
    /// (at shutdown).
    pub fn close_connections(&self, reason: KickReason) {
        if let Some(peer) = self.current() {
            let conns = std::mem::take(&mut lock(&peer.waiting).conns);
            for (_, conn) in conns {
                conn.push.kick(reason);
            }
        }
        let orphans = std::mem::take(&mut lock(&self.orphans).conns);
        for (_, (_, conn)) in orphans {
            conn.push.kick(reason);
        }
    }
}

/// Serves links from forwarding nodes on `listener` until `cancel`: each
/// command is queued into `router`'s shard for its key, in the order it
/// came, and answered on the link. `key` is the cluster's server key;
/// `push_capacity` the push queue of a connection served this way.
pub async fn serve_links(
    listener: TcpListener,
    router: Router,
    key: Keypair,
    push_capacity: usize,
    cancel: CancellationToken,
) {
    let key = Arc::new(key);
    loop {
        let (stream, from) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a node link");
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        let (router, key, cancel) = (router.clone(), key.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = serve_link(stream, router, &key, push_capacity) => {
                    if let Err(e) = r {
                        tracing::info!(%from, error = %e, "node link ended");
                    }
                }
                () = cancel.cancelled() => {}
            }
        });
    }
}

async fn serve_link(
    mut stream: TcpStream,
    router: Router,
    key: &Keypair,
    push_capacity: usize,
) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let (session, wire) = tokio::time::timeout(CONNECT_TIMEOUT, handshake(&mut stream, key, false))
        .await
        .map_err(|_| LinkError::Timeout)??;
    tracing::info!(peer = ?stream.peer_addr().ok(), "a node linked");
    let links = metrics::gauge!(tm::NODE_LINKS);
    links.increment(1.0);
    // Counted down however the link ends.
    let _up = LinkUp(links);
    let (read, write) = stream.into_split();
    let session = Arc::new(Mutex::new(session));
    let (tx, rx) = mpsc::channel(LINK_QUEUE_FRAMES);
    let done = CancellationToken::new();
    let writer_session = session.clone();
    let writer_done = done.clone();
    tokio::spawn(async move {
        if let Err(e) = write_frames(write, writer_session, rx).await {
            tracing::debug!(error = %e, "node link writer ended");
        }
        writer_done.cancel();
    });
    let (conns_tx, conns_rx) = mpsc::channel(PUMP_QUEUE);
    tokio::spawn(pump(conns_rx, tx.clone()));
    let on_frame = |frame: LinkFrame| {
        let (router, tx, conns) = (router.clone(), tx.clone(), conns_tx.clone());
        async move { take_command(frame, &router, tx, &conns, push_capacity).await }
    };
    let result = tokio::select! {
        r = read_frames(read, session, wire, on_frame) => r,
        () = done.cancelled() => Err(LinkError::Closed),
    };
    // Dropping the senders ends the writer and the pump, which drops the
    // connections' queues, so the shards let those connections go.
    drop(tx);
    drop(conns_tx);
    result
}

/// Queues one forwarded command into its shard and arranges its answer.
async fn take_command(
    frame: LinkFrame,
    router: &Router,
    tx: mpsc::Sender<LinkFrame>,
    conns: &mpsc::Sender<(u64, ConnRx)>,
    push_capacity: usize,
) {
    if frame.kind != kind::REQUEST && frame.kind != kind::POST {
        tracing::warn!(kind = frame.kind, "unexpected frame on a node link");
        return;
    }
    let inbound = match remote::decode_command(&frame.body, push_capacity) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable command on a node link");
            if frame.kind == kind::REQUEST {
                let _ = tx
                    .send(LinkFrame {
                        kind: kind::ERROR,
                        id: frame.id,
                        body: remote::encode_error(&RouteError::BadRequest(
                            "undecodable forwarded command".into(),
                        )),
                    })
                    .await;
            }
            return;
        }
    };
    if let Some(conn) = inbound.conn {
        // Before the command is queued: the pump holds the queue before
        // the shard can push into it. Fails only once the link ends.
        let _ = conns.send(conn).await;
    }
    let Some(shard) = router.key_shard(&inbound.key) else {
        // Only a forwarding router has no shards, and it takes no links.
        if frame.kind == kind::REQUEST {
            let _ = tx
                .send(LinkFrame {
                    kind: kind::ERROR,
                    id: frame.id,
                    body: remote::encode_error(&RouteError::NoServingNode),
                })
                .await;
        }
        return;
    };
    let must_apply = matches!(
        inbound.cmd,
        Command::Ack { .. } | Command::Delete { .. } | Command::Disconnected { .. }
    );
    let queued = if must_apply {
        shard
            .send(Queued::new(inbound.cmd))
            .await
            .map_err(|_| RouteError::ShuttingDown)
    } else {
        router.enqueue(super::Dest::Shard(shard), inbound.cmd).await
    };
    let Some(answer) = inbound.answer else {
        return;
    };
    let id = frame.id;
    match queued {
        Err(e) => {
            let _ = tx
                .send(LinkFrame {
                    kind: kind::ERROR,
                    id,
                    body: remote::encode_error(&e),
                })
                .await;
        }
        Ok(()) => {
            tokio::spawn(async move {
                let frame = match answer.await {
                    Ok(body) => LinkFrame {
                        kind: kind::ANSWER,
                        id,
                        body,
                    },
                    Err(e) => LinkFrame {
                        kind: kind::ERROR,
                        id,
                        body: remote::encode_error(&e),
                    },
                };
                let _ = tx.send(frame).await;
            });
        }
    }
}

/// Connections waiting to be taken by their link's pump.
const PUMP_QUEUE: usize = 1024;

/// One connection's pushes as a stream, ending after its kick or end.
struct ConnPushes {
    conn_id: u64,
    rx: Option<ConnRx>,
}

impl futures_util::Stream for ConnPushes {
    type Item = (u64, Received);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(rx) = self.rx.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let received = std::task::ready!(rx.poll_recv(cx));
        if !matches!(received, Received::Item(_)) {
            // The last one: the queue is let go.
            self.rx = None;
        }
        std::task::Poll::Ready(Some((self.conn_id, received)))
    }
}

/// The link's pump: sends what the shards push to the link's connections
/// as `PUSH` frames, in each connection's order. Only connections with
/// something new are polled (each has its own waker). Ends with the link.
async fn pump(mut added: mpsc::Receiver<(u64, ConnRx)>, tx: mpsc::Sender<LinkFrame>) {
    use futures_util::StreamExt as _;
    let mut conns = futures_util::stream::SelectAll::new();
    loop {
        let (conn_id, received) = tokio::select! {
            new = added.recv() => match new {
                Some((conn_id, rx)) => {
                    conns.push(ConnPushes { conn_id, rx: Some(rx) });
                    continue;
                }
                None => return,
            },
            Some(push) = conns.next(), if !conns.is_empty() => push,
        };
        let frame = LinkFrame {
            kind: kind::PUSH,
            id: 0,
            body: remote::encode_push(conn_id, &received),
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

/// Decrements the serving node's link gauge when dropped.
struct LinkUp(metrics::Gauge);

impl Drop for LinkUp {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use switchboard_proto::noise::generate_keypair;

    /// Runs both ends of a link handshake, the responder with `server`
    /// and the initiator with `client`.
    async fn both_ends(
        server: Keypair,
        client: Keypair,
    ) -> (Result<(), LinkError>, Result<(), LinkError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let responder = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            handshake(&mut stream, &server, false).await.map(|_| ())
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let initiator = handshake(&mut stream, &client, true).await.map(|_| ());
        drop(stream);
        (responder.await.unwrap(), initiator)
    }

    /// A connection's queue ends as an orphan would hold it.
    fn attached(user: u64) -> (Attached, ConnRx) {
        let (push, rx) = super::super::conn_queue(4);
        let a = Attached {
            push,
            device: DeviceKey { user, device: 1 },
            credential: vec![7; 32].into_boxed_slice(),
        };
        (a, rx)
    }

    /// No orphan is left, and `rx`'s connection was ended for `reason`.
    async fn no_orphan_and_ended(f: &Forwarder, rx: &mut ConnRx, reason: KickReason) {
        assert!(lock(&f.orphans).conns.is_empty());
        let got = rx.recv().await;
        assert!(matches!(got, Received::Kicked(r) if r == reason), "{got:?}");
    }

    #[tokio::test]
    async fn connections_without_a_link_wait_out_the_grace_then_end() {
        let grace = Duration::from_millis(150);
        let f = Forwarder::new(generate_keypair().unwrap(), grace);
        let (waiting, mut waiting_rx) = attached(1);
        let (gone, gone_rx) = attached(2);
        drop(gone_rx);
        orphan(&f.orphans, [(1, waiting), (2, gone)]);
        // A connection already gone is not kept.
        assert_eq!(lock(&f.orphans).conns.len(), 1);

        // Within the grace nothing happens to it.
        f.expire_orphans();
        assert_eq!(lock(&f.orphans).conns.len(), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waiting_rx.recv())
                .await
                .is_err(),
            "an orphan was ended within the grace"
        );

        // Past it, it is ended as unavailable: its client reconnects.
        tokio::time::sleep(grace).await;
        f.expire_orphans();
        no_orphan_and_ended(&f, &mut waiting_rx, KickReason::Unavailable).await;
    }

    #[tokio::test]
    async fn a_node_stopping_ends_the_connections_waiting_for_a_link() {
        let f = Forwarder::new(generate_keypair().unwrap(), Duration::from_secs(60));
        let (a, mut rx) = attached(1);
        orphan(&f.orphans, [(1, a)]);
        f.close_connections(KickReason::ShuttingDown);
        no_orphan_and_ended(&f, &mut rx, KickReason::ShuttingDown).await;
    }

    #[tokio::test]
    async fn a_link_needs_the_cluster_key_on_both_ends() {
        let cluster = generate_keypair().unwrap();
        let same = Keypair {
            private: cluster.private.clone(),
            public: cluster.public.clone(),
        };
        let (server, client) = both_ends(cluster, same).await;
        assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");

        // A peer with any other key is refused by the side that sees it.
        let cluster = generate_keypair().unwrap();
        let stranger = generate_keypair().unwrap();
        let (server, client) = both_ends(cluster, stranger).await;
        assert!(
            matches!(server, Err(LinkError::NotCluster)),
            "the serving end took a stranger: {server:?}"
        );
        assert!(
            matches!(client, Err(LinkError::NotCluster)),
            "the forwarding end linked to a stranger: {client:?}"
        );
    }
}
