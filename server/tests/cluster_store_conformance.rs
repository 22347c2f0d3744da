//! The storage conformance suite (`store::conformance`) against cluster
//! mode's store (`cluster::store::ClusterStore`) on a real PostgreSQL and a
//! real Redis Cluster (3 masters, 3 replicas). Each fresh store is a new
//! database and a new key prefix; a reopen connects again to both.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod engines;

use std::sync::{Arc, Weak};

use engines::{Postgres, RedisCluster};
use switchboard_server::cluster::postgres::PgDomains;
use switchboard_server::cluster::redis_domains::RedisDomains;
use switchboard_server::cluster::store::ClusterStore;
use switchboard_server::store::conformance::{self, Harness};
use switchboard_server::store::{Store, StoreError};

struct Cluster {
    pg: Postgres,
    redis: RedisCluster,
    rt: tokio::runtime::Runtime,
    /// (database URL, key prefix, the store opened on them).
    opened: Vec<(String, String, Weak<dyn Store>)>,
}

impl Cluster {
    fn open(&self, url: &str, prefix: &str) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(ClusterStore::new(
            PgDomains::open(url)?,
            // One replica must confirm every synced commit.
            RedisDomains::open(&self.redis.url(), prefix, 1)?,
        )))
    }
}

impl Harness for Cluster {
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError> {
        let n = self.opened.len();
        let db = format!("conformance_{n}");
        let admin = self.pg.url();
        self.rt
            .block_on(async {
                let c = switchboard_server::cluster::schema::connect(&admin).await?;
                c.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                Ok::<_, switchboard_server::cluster::schema::SchemaError>(())
            })
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        let url = admin.replace("dbname=postgres", &format!("dbname={db}"));
        let prefix = format!("c{n}:");
        let store = self.open(&url, &prefix)?;
        self.opened.push((url, prefix, Arc::downgrade(&store)));
        Ok(store)
    }

    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        let (url, prefix) = self
            .opened
            .iter()
            .find(|(_, _, weak)| weak.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &store)))
            .map(|(url, prefix, _)| (url.clone(), prefix.clone()))
            .ok_or_else(|| {
                StoreError::Engine("reopen of a store this harness did not open".into())
            })?;
        drop(store);
        let reopened = self.open(&url, &prefix)?;
        self.opened.push((url, prefix, Arc::downgrade(&reopened)));
        Ok(reopened)
    }
}

#[test]
fn the_cluster_store_passes_the_conformance_suite() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(Postgres::start());
    let redis = RedisCluster::start();
    let mut harness = Cluster {
        pg,
        redis,
        rt,
        opened: Vec::new(),
    };
    let failures = conformance::run(&mut harness);
    let report: Vec<String> = failures.iter().map(ToString::to_string).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        conformance::CASES.len(),
        report.join("\n")
    );
}
