//! The cluster's limit counters in Redis (see [`crate::limits::shared`]):
//! one key per limit, key and window, `INCRBY` with a TTL set when it is
//! created, pipelined. Counters are not durable state: a lost one only
//! lets a key start its window over.

use redis::cluster::cluster_pipe;

use super::redis_domains::{Conn, Keys};
use crate::limits::shared::{CountAdd, Counters};
use crate::store::StoreError;

/// Limit counters on a Redis Cluster (their own connection: a report never
/// waits behind a commit).
pub struct RedisCounters {
    conn: Conn,
    keys: Keys,
}

impl std::fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCounters").finish_non_exhaustive()
    }
}

impl RedisCounters {
    /// Connects to the cluster whose seed nodes are `urls`, keeping the
    /// counters under `prefix`.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when no seed node answers as a cluster.
    pub fn open(urls: &str, prefix: &str) -> Result<Self, StoreError> {
        Ok(Self {
            conn: Conn::open(urls, 1)?,
            keys: Keys::new(prefix),
        })
    }
}

impl Counters for RedisCounters {
    fn add(&self, batch: &[CountAdd]) -> Result<Vec<u64>, StoreError> {
        let mut pipe = cluster_pipe();
        for a in batch {
            let key = self.keys.limit(&a.key);
            pipe.cmd("INCRBY").arg(&key).arg(a.n);
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(a.ttl_ms)
                .arg("NX")
                .ignore();
        }
        pipe.query(&mut self.conn.lock())
            .map_err(|e| self.conn.fail(e))
    }
}
