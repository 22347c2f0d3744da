//! A cluster node's life: open the engines, share the server key, wait as
//! a standby until every partition is this node's, serve while keeping the
//! lease, and stop when fenced or told to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use switchboard_proto::noise::{KEY_BYTES, Keypair};

use super::membership::{Membership, Standing};
use super::partition::Ownership;
use super::postgres::PgDomains;
use super::redis_domains::RedisDomains;
use super::store::ClusterStore;
use super::{ClusterError, ClusterSettings};
use crate::config::Config;
use crate::server_key;
use crate::store::{Store, StoreError};

/// Prefix of every Redis key a node writes.
pub const REDIS_PREFIX: &str = "sb:";

/// Name of the server key among the cluster's secrets.
const SERVER_KEY: &str = "server_key";

/// An opened cluster node.
pub struct Node {
    store: Arc<dyn Store>,
    membership: Arc<Membership>,
    /// The membership's own PostgreSQL connection (claims never wait
    /// behind a shard's commit).
    pg: Arc<PgDomains>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("membership", &self.membership)
            .finish_non_exhaustive()
    }
}

/// This process's token: the node id (or host name) and a random suffix,
/// so a restarted node never mistakes its predecessor's lease for its own.
fn token(settings: &ClusterSettings) -> String {
    let name = if settings.node_id.is_empty() {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    } else {
        settings.node_id.clone()
    };
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// Steps tried at once after a contested takeover of a presumed-dead node.
const QUICK_STEPS: u32 = 5;
/// The pause between them.
const QUICK_STEP_PAUSE: Duration = Duration::from_millis(50);

impl Node {
    /// Connects to both engines (migrating the schema), and makes the
    /// data dir's server key the cluster's (the first node's key becomes
    /// everyone's, so clients pin one key for all nodes). Blocks: call it
    /// off the async runtime.
    ///
    /// # Errors
    /// [`ClusterError`] when an engine cannot be reached or the key not
    /// shared.
    pub fn open(
        settings: &ClusterSettings,
        config: &Config,
        link_addr: std::net::SocketAddr,
    ) -> Result<Self, ClusterError> {
        let ownership = Arc::new(Ownership::new(token(settings)));
        let store_pg = PgDomains::open_with(
            &settings.postgres_url,
            ownership.clone(),
            config.shard_count() + 1,
        )?;
        let pg = PgDomains::open(&settings.postgres_url, ownership.clone())?;
        let redis = RedisDomains::open(
            &settings.redis_url,
            REDIS_PREFIX,
            config.redis_min_replicas,
            ownership.clone(),
            config.shard_count() + 1,
        )?;
        let membership = Membership::connect(
            &settings.redis_url,
            REDIS_PREFIX,
            ownership,
            Duration::from_millis(config.cluster_lease_ms),
            link_addr.to_string(),
        )?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| ClusterError::Key(format!("data dir: {e}")))?;
        let local = server_key::load_or_create(&config.data_dir)
            .map_err(|e| ClusterError::Key(e.to_string()))?;
        let candidate = [local.private.as_slice(), local.public.as_slice()].concat();
        let shared = pg.cluster_secret(SERVER_KEY, &candidate)?;
        if shared != candidate {
            if shared.len() != 2 * KEY_BYTES {
                return Err(ClusterError::Key(format!(
                    "the cluster's server key holds {} bytes, expected {}",
                    shared.len(),
                    2 * KEY_BYTES
                )));
            }
            let (private, public) = shared.split_at(KEY_BYTES);
            let kp = Keypair {
                private: private.to_vec(),
                public: public.to_vec(),
            };
            server_key::save(&config.data_dir, &kp)
                .map_err(|e| ClusterError::Key(e.to_string()))?;
            tracing::info!(public_key = %hex::encode(public), "using the cluster's server key");
        }
        Ok(Self {
            store: Arc::new(ClusterStore::new(store_pg, redis)),
            membership: Arc::new(membership),
            pg: Arc::new(pg),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The store to serve from.
    #[must_use]
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// One membership step (blocking).
    ///
    /// # Errors
    /// [`StoreError`] when an engine fails.
    pub fn step(&self) -> Result<Standing, StoreError> {
        self.membership.step(&self.pg)
    }

    /// Blocks until this node owns every partition (logging, as a standby,
    /// who holds them), or `stop` is set. Meanwhile `serving_link` hears,
    /// after every step, the link address of the node serving (`None`:
    /// none known), for this node to forward its clients' requests to.
    /// `presumed_dead` names a serving node's link address that refused a
    /// connection: that node is taken over at once instead of when its
    /// lease expires. Steps run every period, or sooner when the thread is
    /// unparked (the link ended).
    pub fn wait_until_serving(
        &self,
        serving_link: impl Fn(Option<SocketAddr>),
        presumed_dead: impl Fn() -> Option<SocketAddr>,
    ) -> bool {
        let mut said = false;
        // Quick steps left while a presumed-dead node's partitions are
        // contested (a takeover racing that node's own resignation at a
        // clean stop wins only part of them, gives them back, and tries
        // again at once).
        let mut quick = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let dead = presumed_dead().map(|a| a.to_string());
            match &dead {
                Some(addr) => {
                    tracing::info!(%addr, "the serving node's link refuses connections: taking over");
                    quick = quick.saturating_sub(1);
                }
                None => quick = QUICK_STEPS,
            }
            match self.membership.step_presuming(&self.pg, dead.as_deref()) {
                Ok(Standing::Serving) => return true,
                Ok(standing) => {
                    match self.membership.serving_link() {
                        Ok(addr) => serving_link(addr.and_then(|a| a.parse().ok())),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the serving node's address");
                            serving_link(None);
                        }
                    }
                    if !said {
                        let holders = self.membership.owner_counts().unwrap_or_default();
                        tracing::info!(
                            ?standing,
                            ?holders,
                            "standby: another node holds the partitions"
                        );
                        said = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cluster membership step failed"),
            }
            if dead.is_some() && quick > 0 {
                std::thread::park_timeout(QUICK_STEP_PAUSE);
            } else {
                std::thread::park_timeout(self.membership.period());
            }
        }
        false
    }

    /// Keeps the lease on a thread of its own while serving; `on_fenced`
    /// runs once if another node takes a partition over. Stops with
    /// [`Node::stop_waiting`] (unpark the thread to stop it at once); join
    /// it before [`Node::resign`], so no step of it claims again what
    /// resigning gave back.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn keep_lease(
        &self,
        on_fenced: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let membership = self.membership.clone();
        let pg = self.pg.clone();
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("cluster-lease".into())
            .spawn(move || {
                loop {
                    std::thread::park_timeout(membership.period());
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match membership.step(&pg) {
                        Ok(Standing::Serving) => {}
                        Ok(_) if stop.load(Ordering::Relaxed) => return,
                        Ok(standing) => {
                            tracing::error!(
                                ?standing,
                                "this node lost its partitions to another node: stopping"
                            );
                            on_fenced();
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot renew the cluster lease"),
                    }
                }
            })
    }

    /// Stops waiting ([`Node::wait_until_serving`] returns `false`).
    pub fn stop_waiting(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Hands every partition back at once (stop and join the lease thread
    /// first), so a standby takes over without waiting for the lease to
    /// expire.
    pub fn resign(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.membership.resign() {
            tracing::warn!(error = %e, "cannot resign; the lease will expire");
        }
    }
}
