//! The storage conformance suite (`store::conformance`) against the
//! embedded backend: fresh stores in temporary directories, reopened from
//! the same directory.
#![allow(clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use switchboard_server::store::conformance::{self, Harness};
use switchboard_server::store::faults::FaultyStore;
use switchboard_server::store::{EmbeddedStore, Store, StoreError};

/// Opens each store in a directory of its own under one temporary root.
struct Embedded {
    root: tempfile::TempDir,
    opened: Vec<(PathBuf, std::sync::Weak<dyn Store>)>,
}

impl Harness for Embedded {
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError> {
        let dir = self
            .root
            .path()
            .join(format!("store-{}", self.opened.len()));
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir)?);
        self.opened.push((dir, Arc::downgrade(&store)));
        Ok(store)
    }

    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        let dir = self
            .opened
            .iter()
            .find(|(_, weak)| weak.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &store)))
            .map(|(dir, _)| dir.clone())
            .ok_or_else(|| {
                StoreError::Engine("reopen of a store this harness did not open".into())
            })?;
        // Closed without a flush, as a crash would leave it (the commits
        // were synced).
        drop(store);
        let reopened: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir)?);
        self.opened.push((dir, Arc::downgrade(&reopened)));
        Ok(reopened)
    }
}

#[test]
fn the_embedded_store_passes_the_conformance_suite() {
    let failures = conformance::run(&mut embedded());
    let report: Vec<String> = failures.iter().map(ToString::to_string).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        conformance::CASES.len(),
        report.join("\n")
    );
}

/// A backend that forgets everything at a restart.
struct Amnesiac(Embedded);

impl Harness for Amnesiac {
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError> {
        self.0.fresh()
    }

    fn reopen(&mut self, _store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        self.0.fresh()
    }
}

/// A backend whose every write fails, as on a full disk.
struct Refusing(Embedded);

impl Harness for Refusing {
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError> {
        let faulty = FaultyStore::new(self.0.fresh()?);
        faulty.set_fail_writes(true);
        Ok(Arc::new(faulty))
    }

    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        Ok(store)
    }
}

fn embedded() -> Embedded {
    Embedded {
        root: tempfile::tempdir().expect("temp dir"),
        opened: Vec::new(),
    }
}

#[test]
fn the_suite_catches_a_backend_that_loses_data_or_refuses_writes() {
    let failures = conformance::run(&mut Amnesiac(embedded()));
    let cases: Vec<&str> = failures.iter().map(|f| f.case).collect();
    assert_eq!(
        cases,
        vec!["synced_batches_survive_a_reopen"],
        "{failures:?}"
    );

    let failures = conformance::run(&mut Refusing(embedded()));
    assert_eq!(
        failures.len(),
        conformance::CASES.len(),
        "every case writes, so every case fails: {failures:?}"
    );
    assert!(
        failures.iter().all(|f| f.detail.contains("No space left")),
        "{failures:?}"
    );
}
