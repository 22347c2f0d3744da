//! The Switchboard server as a library: the `switchboard` binary and the
//! integration tests both call [`run`] (or [`start`]) with listeners they
//! bound themselves.
//!
//! Layout: `gateway` (connections), `router` (shards that own all user
//! state), `store` (storage traits and the embedded fjall backend),
//! `accounts` (phone codes, credentials), `api` (HTTP: WebSocket, health),
//! `config`. See docs/ARCHITECTURE.md for how a message flows through them.

pub mod accounts;
pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod keys;
pub mod limits;
pub mod os;
pub mod outbound;
pub mod router;
pub mod store;
pub mod telemetry;

mod server_key;

/// A hash map keyed by what the server assigns (user and device ids, queue
/// seqs): foldhash, where std's SipHash was 7% of the server's instructions
/// per message (docs/BENCHMARKS.md). Maps keyed by what clients choose
/// (message ids, phone numbers) keep SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set counterpart of [`FastMap`].
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Nice value of the thread that measures the oldest queue entry's age.
const QUEUE_AGE_NICE: i32 = 19;

pub use config::{CodeSenderKind, Config, ConfigError, LogFormat};

use accounts::{CodeSender, DevCodeSender, WebhookCodeSender};
use gateway::Gateway;
use router::Router;
use store::{EmbeddedStore, Store, StoreError};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a listener could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The server key is unusable.
    #[error("server key: {0}")]
    Key(String),
    /// The cluster settings are incomplete.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Subdirectory of the data dir holding the database.
const DB_DIR: &str = "db";
/// Subdirectory where the development code sender writes codes.
pub const DEV_CODES_DIR: &str = "dev-codes";

/// Runs the server on already-bound listeners until `shutdown` resolves,
/// then shuts down in order: stop accepting, tell clients to reconnect,
/// drain the shards, flush the store.
///
/// `on_ready` is called once everything is listening.
///
/// # Errors
/// [`ServerError`] if the data directory, key or store cannot be set up.
pub async fn run(
    config: Config,
    tcp: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(&Ready) + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    let store = open_store(&config)?;
    run_with_store(config, store, tcp, http, shutdown, on_ready).await
}

/// The server key in the configured data dir (created if missing).
///
/// # Errors
/// [`ServerError`] if the directory or key file cannot be used.
pub fn load_server_key(config: &Config) -> Result<switchboard_proto::noise::Keypair, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(io_err(format!(
        "cannot create data dir {}",
        config.data_dir.display()
    )))?;
    server_key::load_or_create(&config.data_dir)
}

/// Opens the embedded store in the configured data dir.
///
/// # Errors
/// [`ServerError`] if the directory or the database cannot be opened.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(io_err(format!(
        "cannot create data dir {}",
        config.data_dir.display()
    )))?;
    Ok(Arc::new(EmbeddedStore::open(
        &config.data_dir.join(DB_DIR),
    )?))
}

/// As [`run`], on a store the caller opened (a wrapped or other backend).
///
/// # Errors
/// [`ServerError`] if the configuration, data directory or key is unusable.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    tcp: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(&Ready) + Send,
) -> Result<(), ServerError> {
    run_stack(
        config,
        Backend::Store { store },
        tcp,
        http,
        shutdown,
        on_ready,
    )
    .await
}

/// In cluster mode, the request limits' counts shared by the nodes.
async fn shared_limits(config: &Config) -> Result<Option<limits::shared::Shared>, ServerError> {
    let Some(settings) = cluster::ClusterSettings::from_config(config)? else {
        return Ok(None);
    };
    let counters = tokio::task::spawn_blocking(move || {
        cluster::counters::RedisCounters::open(&settings.redis_url, cluster::node::REDIS_PREFIX)
    })
    .await
    .map_err(|e| ServerError::Io {
        what: "cannot open the limit counters".into(),
        source: std::io::Error::other(e),
    })??;
    let shared = limits::shared::Shared::start(Arc::new(counters), limits::MAX_TRACKED_KEYS)
        .map_err(io_err("cannot start the limit-counts thread"))?;
    Ok(Some(shared))
}

/// How many tasks a worker of the server's runtime runs between two looks
/// at the sockets (tokio's `event_interval`; its default is 61).
///
/// Work already accepted (a shard's pushes: ✓s, deliveries) wakes
/// connection tasks from outside the runtime, socket readiness from inside
/// it; looking at the sockets less often lets accepted work go out before
/// new requests are read, with fewer `epoll` rounds. Measured at 9,000 1:1
/// msgs/s: CPU per message 49.0 → 42.0 µs (median of 3 runs each), p99
/// send→delivered 4.7–7.4 → 4.4–5.2 ms; the sustained 1,024-member group
/// fan-out (57 msgs/s) and the knee (19,920/s) unchanged. 1,024 gained more
/// group latency but cut the saturated group fan-out to 7–38 msgs/s: a
/// worker then ran ~17 ms of tasks between looks (docs/BENCHMARKS.md,
/// sessions 23 and 24).
pub const RUNTIME_EVENT_INTERVAL: u32 = 256;

/// The multi-threaded runtime `switchboard serve` runs on.
///
/// # Errors
/// The runtime could not start (threads, the I/O driver).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(RUNTIME_EVENT_INTERVAL)
        .build()
}

/// What a server runs on.
pub enum Backend {
    /// Shards of its own on `store` (the embedded server).
    Store {
        /// The store.
        store: Arc<dyn Store>,
    },
    /// A cluster node: it forwards every command over `forwarder`'s link
    /// to the node serving the partitions until `promote` resolves `true`
    /// (this node took them over). Then it starts shards of its own on
    /// `store`, hands them its connections (they stay open,
    /// [`Router::serve_locally`]), takes the other nodes' links on `links`
    /// and calls `on_serving`.
    Cluster {
        /// The link to the serving node.
        forwarder: Arc<router::Forwarder>,
        /// The cluster store.
        store: Arc<dyn Store>,
        /// The `cluster_listen` listener.
        links: TcpListener,
        /// Resolves `true` when this node serves (`false`: it never will).
        promote: std::pin::Pin<Box<dyn Future<Output = bool> + Send>>,
        /// Called once it serves.
        on_serving: Box<dyn FnOnce(&Ready) + Send>,
    },
}

/// What [`run_stack`] started from its [`Backend`]: shards of its own, or
/// a forwarding router that starts them if the node takes over.
enum Started {
    Shards(router::ShardThreads, Arc<dyn Store>),
    Forwarding {
        store: Arc<dyn Store>,
        links: TcpListener,
        promote: std::pin::Pin<Box<dyn Future<Output = bool> + Send>>,
        on_serving: Box<dyn FnOnce(&Ready) + Send>,
    },
}

/// What a server holds only once it serves: its shards and what works on
/// them.
struct Serving {
    threads: router::ShardThreads,
    store: Arc<dyn Store>,
    upkeep: tokio::task::JoinHandle<()>,
    links: Option<tokio::task::JoinHandle<()>>,
}

/// Sweeps, upkeep and queue-age gauges of a serving node's shards until
/// `cancel`.
fn spawn_upkeep(
    config: &Config,
    router: Router,
    store: Arc<dyn Store>,
    metrics_handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let sweep_every = Duration::from_secs(config.sweep_interval_secs);
    let shards = config.shard_count();
    let queue_age_every = Duration::from_secs(config.queue_age_interval_secs);
    telemetry::set_oldest_entry_ages(&vec![None; shards], 0);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        let mut upkeep = tokio::time::interval(telemetry::UPKEEP_INTERVAL);
        // The first measurement after one interval (the gauges start at 0).
        let mut ages = tokio::time::interval_at(
            tokio::time::Instant::now() + queue_age_every,
            queue_age_every,
        );
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => router.sweep(),
                _ = upkeep.tick() => {
                    if let Some(h) = &metrics_handle {
                        h.run_upkeep();
                    }
                    metrics::gauge!(telemetry::QUEUED_ENTRIES)
                        .set(store.approximate_queue_entries() as f64);
                    router.tick();
                }
                _ = ages.tick() => {
                    // One seek per stored queue, on a thread of its own at
                    // the lowest priority: measuring must not delay messages.
                    let store = store.clone();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let spawned = std::thread::Builder::new()
                        .name("queue-age".into())
                        .spawn(move || {
                            if let Err(e) = os::lower_own_priority(QUEUE_AGE_NICE) {
                                tracing::debug!(error = %e, "cannot lower the queue-age thread's priority");
                            }
                            let _ = tx.send(store.oldest_entries(shards, &|user| {
                                router::shard_of_user(user, shards)
                            }));
                        });
                    match spawned.map(|_| rx) {
                        Ok(rx) => match rx.await {
                            Ok(Ok(oldest)) => telemetry::set_oldest_entry_ages(&oldest, clock::now_ms()),
                            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the queues' oldest entries"),
                            Err(_) => tracing::warn!("the queue-age thread ended without an answer"),
                        },
                        Err(e) => tracing::warn!(error = %e, "cannot start the queue-age thread"),
                    }
                }
            }
        }
    })
}

/// Runs a server on already-bound listeners with `backend` until
/// `shutdown` resolves (see [`run`]).
///
/// # Errors
/// [`ServerError`] if the configuration, data directory or key is unusable.
pub async fn run_stack(
    config: Config,
    backend: Backend,
    tcp: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(&Ready) + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    // First, so every handle created below records into it.
    let metrics_handle = telemetry::install();
    limits::register_metrics();
    outbound::register_metrics(CODE_SENDER_TARGET);
    std::fs::create_dir_all(&config.data_dir).map_err(io_err(format!(
        "cannot create data dir {}",
        config.data_dir.display()
    )))?;
    let key = server_key::load_or_create(&config.data_dir)?;
    let (router, backend) = match backend {
        Backend::Store { store } => {
            let (router, threads) = Router::start(store.clone(), config.router())
                .map_err(io_err("cannot start shard threads"))?;
            (router, Started::Shards(threads, store))
        }
        Backend::Cluster {
            forwarder,
            store,
            links,
            promote,
            on_serving,
        } => (
            Router::forwarding(forwarder, config.router().request_deadline),
            Started::Forwarding {
                store,
                links,
                promote,
                on_serving,
            },
        ),
    };
    let code_sender = code_sender(&config)?;
    let public_key = key.public.clone();
    let mut gateway_cfg = config.gateway();
    gateway_cfg.max_connections = os::connection_cap(config.max_connections);
    if gateway_cfg.max_connections < config.max_connections {
        tracing::info!(
            max_connections = gateway_cfg.max_connections,
            "connection cap lowered to fit the open-file limit (ulimit -n)"
        );
    }
    let push_capacity = gateway_cfg.outbound_queue_frames + gateway::MAX_IN_FLIGHT;
    let link_key = switchboard_proto::noise::Keypair {
        private: key.private.clone(),
        public: key.public.clone(),
    };
    let mut gateway = Gateway::new(router.clone(), gateway_cfg, code_sender, key)
        .map_err(io_err("cannot start crypto threads"))?;
    if let Some(shared) = shared_limits(&config).await? {
        gateway.limits.share(shared);
    }
    let gw = Arc::new(gateway);

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ready_flag = Arc::new(AtomicBool::new(false));
    let ready = Ready {
        tcp_addr: tcp.local_addr().map_err(io_err("tcp listener"))?,
        http_addr: http.local_addr().map_err(io_err("http listener"))?,
        server_public_key: public_key,
    };

    // Node links outlive the connections: at a clean stop they end only
    // once the shards have applied what the other nodes forwarded, so
    // those nodes see this one gone (its link refused) when it is done.
    let links_cancel = CancellationToken::new();
    // Set when taking the partitions over failed: the node stops.
    let promotion_failed = CancellationToken::new();
    let (serving, promotion) = match backend {
        Started::Shards(threads, store) => {
            let upkeep = spawn_upkeep(
                &config,
                router.clone(),
                store.clone(),
                metrics_handle.clone(),
                cancel.clone(),
            );
            let serving = Serving {
                threads,
                store,
                upkeep,
                links: None,
            };
            (Some(serving), None)
        }
        Started::Forwarding {
            store,
            links,
            promote,
            on_serving,
        } => {
            let (config, router, ready) = (config.clone(), router.clone(), ready.clone());
            let (cancel, links_cancel) = (cancel.clone(), links_cancel.clone());
            let (failed, metrics_handle) = (promotion_failed.clone(), metrics_handle.clone());
            let task = tokio::spawn(async move {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return None,
                    serves = promote => if !serves {
                        return None;
                    },
                }
                let (local, threads) = match Router::start(store.clone(), config.router()) {
                    Ok(started) => started,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start shard threads to serve");
                        failed.cancel();
                        return None;
                    }
                };
                router.serve_locally(&local);
                let links = tokio::spawn(router::serve_links(
                    links,
                    local.clone(),
                    link_key,
                    push_capacity,
                    links_cancel,
                ));
                let upkeep = spawn_upkeep(&config, local, store.clone(), metrics_handle, cancel);
                on_serving(&ready);
                Some(Serving {
                    threads,
                    store,
                    upkeep,
                    links: Some(links),
                })
            });
            (None, Some(task))
        }
    };
    let tcp_task = tokio::spawn(gateway::serve_tcp(
        tcp,
        gw.clone(),
        cancel.clone(),
        tracker.clone(),
    ));
    let app = api::routes(api::ApiState {
        gateway: gw.clone(),
        shutdown: cancel.clone(),
        tracker: tracker.clone(),
        ready: ready_flag.clone(),
        metrics: metrics_handle.clone(),
    });
    let http_cancel = cancel.clone();
    let http_task = tokio::spawn(async move {
        // The peer's address reaches `/ws` for the per-address limits.
        axum::serve(
            http,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { http_cancel.cancelled().await })
        .await
    });

    ready_flag.store(true, Ordering::Relaxed);
    tracing::info!(
        tcp = %ready.tcp_addr,
        http = %ready.http_addr,
        data_dir = %config.data_dir.display(),
        shards = config.shard_count(),
        "switchboard ready"
    );
    on_ready(&ready);

    tokio::select! {
        () = shutdown => {}
        () = promotion_failed.cancelled() => {}
    }
    tracing::info!("shutting down: closing listeners and connections");
    ready_flag.store(false, Ordering::Relaxed);
    gw.begin_shutdown();
    // Wakes the connections still authenticating; the shards end the
    // authenticated ones (which no longer watch the token: a poll of it per
    // wake-up was a lock and a cache miss).
    cancel.cancel();
    // A node still waiting to serve stops waiting (the token); one that
    // has just taken over finishes starting its shards first.
    let mut serving = match promotion {
        Some(task) => task.await.ok().flatten(),
        None => serving,
    };
    router.closing().await;
    let _ = tcp_task.await;
    if let Some(s) = serving.as_mut() {
        let _ = (&mut s.upkeep).await;
    }
    tracker.close();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "connections still open after the grace period; aborting them"
        );
    }
    if tokio::time::timeout(grace, http_task).await.is_err() {
        tracing::warn!("HTTP server did not stop within the grace period");
    }
    drop(gw);
    if let Some(s) = serving {
        router.shutdown(s.threads).await;
        links_cancel.cancel();
        if let Some(task) = s.links {
            let _ = task.await;
        }
        s.store.flush()?;
    }
    if promotion_failed.is_cancelled() {
        return Err(ServerError::Io {
            what: "taking the partitions over".into(),
            source: std::io::Error::other("cannot start shard threads"),
        });
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// The `target` label of the code sender's outbound calls.
const CODE_SENDER_TARGET: &str = "code_sender";

/// The configured code sender (config already validated).
fn code_sender(config: &Config) -> Result<Arc<dyn CodeSender>, ServerError> {
    match config.code_sender {
        CodeSenderKind::Webhook => {
            let caller = outbound::HttpCaller::new(
                CODE_SENDER_TARGET,
                &config.code_webhook_url,
                Some(config.code_webhook_auth_header.as_str()).filter(|h| !h.is_empty()),
                Duration::from_millis(config.code_webhook_timeout_ms),
                outbound::RetryPolicy {
                    max_attempts: config.code_webhook_attempts,
                    base_delay: Duration::from_millis(config.code_webhook_backoff_base_ms),
                    max_delay: Duration::from_millis(config.code_webhook_backoff_max_ms),
                },
                outbound::Breaker::new(
                    config.code_webhook_breaker_failures,
                    Duration::from_millis(config.code_webhook_breaker_open_ms),
                ),
            )
            .map_err(|e| {
                ServerError::Config(ConfigError::Invalid {
                    field: "code_webhook_url",
                    message: e.0,
                })
            })?;
            Ok(Arc::new(WebhookCodeSender::new(caller)))
        }
        CodeSenderKind::Dev | CodeSenderKind::Auto => {
            if config.dev_sender_exposed() {
                tracing::warn!(
                    "the development code sender is serving a non-loopback address: anyone \
                     who can read {}/{DEV_CODES_DIR} can register any number",
                    config.data_dir.display()
                );
            }
            Ok(Arc::new(DevCodeSender::new(
                config.data_dir.join(DEV_CODES_DIR),
            )))
        }
    }
}

/// Where a started server listens.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The Noise/TCP listener.
    pub tcp_addr: SocketAddr,
    /// The HTTP/WebSocket listener.
    pub http_addr: SocketAddr,
    /// The server's static Noise public key (clients may pin it).
    pub server_public_key: Vec<u8>,
}

/// A server running in the background of this process (for tests and
/// embedding).
pub struct RunningServer {
    /// Where it listens.
    pub ready: Ready,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Shuts the server down cleanly and waits for it.
    ///
    /// # Errors
    /// What [`run`] returned.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.stop.cancel();
        self.task.await.unwrap_or_else(|e| {
            Err(ServerError::Io {
                what: "server task".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }
}

/// Binds the configured addresses and starts the server in the background.
///
/// # Errors
/// [`ServerError`] if binding or start-up fails.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    config.validate()?;
    let store = open_store(&config)?;
    start_with_store(config, store).await
}

/// Accept backlog asked of the kernel (which caps it at
/// `net.core.somaxconn`). Tokio's default of 1,024 overflowed when 10,000
/// clients reconnected at once: dropped SYNs are retried by the client only
/// after 1, 3, 7 s, which stretched the herd's tail (docs/BENCHMARKS.md).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`,
/// so a restart does not wait for old connections' TIME_WAIT).
///
/// # Errors
/// If the socket cannot be created, bound or put in listening state.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// As [`start`], on a store the caller opened.
///
/// # Errors
/// [`ServerError`] if binding or start-up fails.
pub async fn start_with_store(
    config: Config,
    store: Arc<dyn Store>,
) -> Result<RunningServer, ServerError> {
    let tcp = listen(config.tcp_listen)
        .map_err(io_err(format!("cannot listen on {}", config.tcp_listen)))?;
    let http = listen(config.http_listen)
        .map_err(io_err(format!("cannot listen on {}", config.http_listen)))?;
    let stop = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let stop_wait = stop.clone();
    let task = tokio::spawn(run_with_store(
        config,
        store,
        tcp,
        http,
        async move { stop_wait.cancelled().await },
        move |r: &Ready| {
            let _ = ready_tx.send(r.clone());
        },
    ));
    match ready_rx.await {
        Ok(ready) => Ok(RunningServer { ready, stop, task }),
        Err(_) => match task.await {
            Ok(Err(e)) => Err(e),
            _ => Err(ServerError::Io {
                what: "server start".into(),
                source: std::io::Error::other("server task ended before it was ready"),
            }),
        },
    }
}
