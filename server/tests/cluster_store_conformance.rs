//! The storage conformance suite (`store::conformance`) against cluster
//! mode's PostgreSQL domains (accounts, keys, groups) on a real
//! PostgreSQL, joined with the embedded store for the domains Redis will
//! hold (`cluster::split::SplitStore`). Each fresh store is a new database
//! and a new directory; a reopen connects again to both.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod engines;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use engines::Postgres;
use switchboard_server::cluster::postgres::PgDomains;
use switchboard_server::cluster::split::SplitStore;
use switchboard_server::store::conformance::{self, Harness};
use switchboard_server::store::{EmbeddedStore, Store, StoreError};

struct Split {
    pg: Postgres,
    rt: tokio::runtime::Runtime,
    root: tempfile::TempDir,
    /// (database URL, directory, the store opened on them).
    opened: Vec<(String, PathBuf, Weak<dyn Store>)>,
}

impl Split {
    fn open(url: &str, dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
        Ok(Arc::new(SplitStore::new(
            PgDomains::open(url)?,
            EmbeddedStore::open(dir)?,
        )))
    }
}

impl Harness for Split {
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
        let dir = self.root.path().join(format!("store-{n}"));
        let store = Self::open(&url, &dir)?;
        self.opened.push((url, dir, Arc::downgrade(&store)));
        Ok(store)
    }

    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        let (url, dir) = self
            .opened
            .iter()
            .find(|(_, _, weak)| weak.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &store)))
            .map(|(url, dir, _)| (url.clone(), dir.clone()))
            .ok_or_else(|| {
                StoreError::Engine("reopen of a store this harness did not open".into())
            })?;
        drop(store);
        let reopened = Self::open(&url, &dir)?;
        self.opened.push((url, dir, Arc::downgrade(&reopened)));
        Ok(reopened)
    }
}

#[test]
fn the_postgres_domains_pass_the_conformance_suite() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(Postgres::start());
    let mut harness = Split {
        pg,
        rt,
        root: tempfile::tempdir().unwrap(),
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
