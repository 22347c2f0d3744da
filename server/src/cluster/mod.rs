//! Cluster mode (issue #21): the same binary as a node of a cluster on a
//! Redis Cluster and a PostgreSQL, chosen by setting both `redis_url` and
//! `postgres_url` (neither: the embedded store, the default).
//!
//! - [`schema`]: the PostgreSQL schema, versioned, migrated at start and
//!   by `switchboard migrate`;
//! - [`postgres`]: accounts, keys and groups in PostgreSQL;
//! - [`redis_domains`]: queues, dedup, mail and payloads in Redis Cluster;
//! - [`store`]: both as one `Store`;
//! - [`partition`]: the 4,096 partitions, each written by one node, and
//!   the fencing both engines apply;
//! - [`membership`], [`node`]: leases, takeovers and a node's life;
//! - [`counters`]: the request limits' counts shared by the nodes.
//!
//! In this build one node owns every partition and serves; the others
//! stand by and take over when it dies (docs/ARCHITECTURE.md, "Cluster
//! mode").

pub mod counters;
pub mod membership;
pub mod node;
pub mod partition;
pub mod postgres;
pub mod redis_domains;
pub mod schema;
pub mod store;

use crate::config::Config;

/// Why cluster mode cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Only one of the two engines was given.
    #[error(
        "cluster mode needs both redis_url and postgres_url ({0} is empty); set neither to run embedded"
    )]
    Incomplete(&'static str),
    /// The schema could not be read or migrated.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// An engine could not be reached or refused.
    #[error("cannot open the cluster store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The cluster's server key could not be shared.
    #[error("server key: {0}")]
    Key(String),
}

/// The engines of a cluster node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Seed nodes of the Redis Cluster, comma-separated `redis://` URLs.
    pub redis_url: String,
    /// The PostgreSQL connection string (URL or `key=value` form).
    pub postgres_url: String,
    /// This node's name in the cluster (empty: the host name is used).
    pub node_id: String,
}

impl ClusterSettings {
    /// The cluster settings of `config`: `None` for the embedded store
    /// (neither engine set).
    ///
    /// # Errors
    /// [`ClusterError::Incomplete`] when only one engine is set.
    pub fn from_config(config: &Config) -> Result<Option<Self>, ClusterError> {
        match (config.redis_url.is_empty(), config.postgres_url.is_empty()) {
            (true, true) => Ok(None),
            (true, false) => Err(ClusterError::Incomplete("redis_url")),
            (false, true) => Err(ClusterError::Incomplete("postgres_url")),
            (false, false) => Ok(Some(Self {
                redis_url: config.redis_url.clone(),
                postgres_url: config.postgres_url.clone(),
                node_id: config.node_id.clone(),
            })),
        }
    }
}

/// One of a pool of engine connections for a call from a shard thread: a
/// free one (looking from where `next` points, moved on by each call), or
/// the one there once it is free; with its index in `pool` (not empty).
pub(crate) fn take<'a, T>(
    pool: &'a [std::sync::Mutex<T>],
    next: &std::sync::atomic::AtomicUsize,
) -> (usize, std::sync::MutexGuard<'a, T>) {
    use std::sync::{PoisonError, TryLockError};
    let start = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let n = pool.len().max(1);
    (0..n)
        .find_map(|i| {
            let at = (start + i) % n;
            match pool.get(at)?.try_lock() {
                Ok(guard) => Some((at, guard)),
                Err(TryLockError::Poisoned(e)) => Some((at, e.into_inner())),
                Err(TryLockError::WouldBlock) => None,
            }
        })
        .unwrap_or_else(|| {
            let at = start % n;
            (at, pool[at].lock().unwrap_or_else(PoisonError::into_inner))
        })
}
