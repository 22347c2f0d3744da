//! The gateway: listeners and one task per client connection.
//!
//! It owns the transport side of a connection (handshake, framing, keep-
//! alive, the bounded push queue) and nothing else: every piece of user
//! state lives in the router's shards.

mod cmd;
mod connection;
mod crypto;
mod link;
mod wire;

pub(crate) use connection::MAX_IN_FLIGHT;
pub use link::{Link, TcpLink, WS_MAX_OUT_MESSAGE_BYTES, WsLink};

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use switchboard_proto::noise::Keypair;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::CodeSender;
use crate::limits::{Admission, Limits, RequestLimits};
use crate::router::Router;
use crypto::CryptoPool;

/// Connection tuning, from the server configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest frame accepted from a client.
    pub max_frame_bytes: usize,
    /// Time allowed for the whole handshake (slow-loris guard).
    pub handshake_timeout: Duration,
    /// A connection with no inbound frame for this long is closed.
    pub idle_timeout: Duration,
    /// A frame started must be complete within this time.
    pub frame_timeout: Duration,
    /// Time allowed for one write before the peer counts as a slow reader.
    pub write_timeout: Duration,
    /// Pushes a connection's queue holds before it counts as a slow reader.
    pub outbound_queue_frames: usize,
    /// Entries pushed but not acked a connection may have outstanding.
    pub max_unacked: usize,
    /// Handshakes in progress at once.
    pub max_concurrent_handshakes: usize,
    /// New connections admitted per second.
    pub max_accepts_per_sec: u32,
    /// Open connections at most; more are refused in the handshake.
    pub max_connections: usize,
    /// A connection must authenticate (or link a device) within this time.
    pub unauthenticated_timeout: Duration,
    /// Per-user and per-address request limits.
    pub requests: RequestLimits,
}

/// What every connection task shares.
pub struct Gateway {
    /// The shards.
    pub router: Router,
    /// Tuning.
    pub cfg: GatewayConfig,
    /// Delivers verification codes.
    pub code_sender: Arc<dyn CodeSender>,
    /// The server's static Noise key.
    pub server_key: Keypair,
    /// Per-user and per-address request limits.
    pub limits: Limits,
    /// Low-priority threads for the handshakes' public-key cryptography.
    crypto: CryptoPool,
    conn_ids: AtomicU64,
    pub(crate) admission: Admission,
    /// Set just before the shutdown token is cancelled: busy connections
    /// read it each turn (an atomic load, where the token's check takes
    /// its lock), idle ones are woken by the token.
    stopping: AtomicBool,
    /// Metric handles recorded into for every message.
    pub(crate) metrics: GatewayMetrics,
}

/// Metric handles connections record into for every message, looked up
/// once (a lookup costs a registry search).
pub(crate) struct GatewayMetrics {
    pub(crate) messages_out: metrics::Counter,
    pub(crate) send_ack_seconds: metrics::Histogram,
    pub(crate) delivery_seconds: metrics::Histogram,
}

impl GatewayMetrics {
    fn registered() -> Self {
        Self {
            messages_out: metrics::counter!(crate::telemetry::MESSAGES_OUT),
            send_ack_seconds: metrics::histogram!(crate::telemetry::SEND_ACK_SECONDS),
            delivery_seconds: metrics::histogram!(crate::telemetry::DELIVERY_SECONDS),
        }
    }
}

impl Gateway {
    /// Bundles what connections need.
    ///
    /// # Errors
    /// If the crypto threads cannot be started.
    pub fn new(
        router: Router,
        cfg: GatewayConfig,
        code_sender: Arc<dyn CodeSender>,
        server_key: Keypair,
    ) -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let crypto = CryptoPool::start(threads, cfg.max_concurrent_handshakes)?;
        Ok(Self {
            crypto,
            admission: Admission::new(
                cfg.max_accepts_per_sec,
                cfg.max_concurrent_handshakes,
                cfg.max_connections,
            ),
            limits: Limits::new(&cfg.requests),
            router,
            cfg,
            code_sender,
            server_key,
            // Random high bits: the connections of different nodes of a
            // cluster meet on the serving node's shards (router::forward).
            conn_ids: AtomicU64::new((u64::from(rand::random::<u32>()) << 32) | 1),
            stopping: AtomicBool::new(false),
            metrics: GatewayMetrics::registered(),
        })
    }

    /// Marks the server as shutting down (before the token is cancelled).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Whether [`Gateway::begin_shutdown`] was called.
    #[must_use]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until a new connection may start its handshake; the permit is
    /// held until the handshake is over. `None` once shutting down.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admission.admit().await
    }

    /// Serves one admitted connection over `link` until it ends or
    /// `shutdown` fires.
    pub async fn serve_link<L: Link>(
        self: Arc<Self>,
        link: L,
        peer: IpAddr,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        connection::run(link, peer, self, permit, shutdown).await;
    }
}

/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Connections accepted from the listen backlog but not yet admitted. The
/// kernel's backlog is capped by `net.core.somaxconn` (4,096 on many
/// systems); in a mass reconnect the SYNs beyond it are dropped and clients
/// retry only after 1 s, then 3 s. Taking connections off the backlog at
/// once (cheap: no handshake until admitted) makes room for 8,192 more
/// without a sysctl. Beyond it, connections wait in the backlog as before.
/// Each holds a file descriptor while it waits.
pub const ACCEPT_QUEUE_CONNECTIONS: usize = 8192;

/// Accepts TCP connections until `shutdown` fires; each admitted connection
/// runs on its own task tracked by `tracker`.
pub async fn serve_tcp(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // Accepted connections waiting for admission, oldest first. The accept
    // loop holds the sender; when the queue is full it stops accepting.
    // Dropped (closing what is still queued) at shutdown.
    let (queue, mut waiting) = tokio::sync::mpsc::channel(ACCEPT_QUEUE_CONNECTIONS);
    let accept = async {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over its address's rate: closed at once, before
                        // any handshake work (the client retries later).
                        if gw.limits.connection(peer.ip()).is_err() {
                            drop(stream);
                            continue;
                        }
                        (stream, peer.ip())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                sent = queue.send(stream) => if sent.is_err() { break },
            }
        }
    };
    let admit = async {
        loop {
            let (stream, peer): (tokio::net::TcpStream, IpAddr) = tokio::select! {
                () = shutdown.cancelled() => break,
                next = waiting.recv() => match next {
                    Some(s) => s,
                    None => break,
                },
            };
            // Admission: until it allows, the connection waits here (and
            // the ones after it in the queue or the listen backlog).
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = gw.admit() => match permit {
                    Some(p) => p,
                    None => break,
                },
            };
            let _ = stream.set_nodelay(true);
            tracker.spawn(
                gw.clone()
                    .serve_link(TcpLink(stream), peer, permit, shutdown.clone()),
            );
        }
    };
    tokio::join!(accept, admit);
}
