//! The embedded backend's dedup domain.

use super::*;

impl Db {
    pub(super) fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError> {
        let k = layout::dedup(key);
        if let Some((_, v)) = self.lock_held_dedup().get(&k) {
            return Ok(Some(decode("dedup", v)?));
        }
        let frozen = self
            .frozen_dedup
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some((_, v)) = frozen.as_deref().and_then(|f| f.get(&k)) {
            return Ok(Some(decode("dedup", v)?));
        }
        let days = self
            .dedup_days
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Newest first: a retry usually follows its original closely.
        for ks in days.values().rev() {
            if let Some(v) = ks.get(&k).map_err(engine)? {
                return Ok(Some(decode("dedup", &v)?));
            }
        }
        Ok(None)
    }

    /// Drops the day keyspaces whose every record was accepted before
    /// `before_ms`; says how many.
    pub(super) fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        // No checkpoint is ingesting into a day about to go.
        let _no_checkpoint = self.lock_checkpointing();
        // Day d holds accepted_ms < (d + 1) * DEDUP_BUCKET_MS.
        let keep_from = before_ms / DEDUP_BUCKET_MS;
        self.lock_held_dedup()
            .retain(|_, (day, _)| *day >= keep_from);
        let expired: Vec<Keyspace> = {
            let mut days = self
                .dedup_days
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let kept = days.split_off(&keep_from);
            std::mem::replace(&mut *days, kept).into_values().collect()
        };
        let n = expired.len();
        for ks in expired {
            self.db.delete_keyspace(ks).map_err(engine)?;
        }
        Ok(n)
    }
}

impl Dedup for EmbeddedStore {
    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupRecord>, StoreError> {
        self.db()?.dedup(key)
    }

    fn expire_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.db()?.expire_dedup(before_ms)
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: DedupOp, raw: &mut Vec<RawOp>) {
    match op {
        DedupOp::Put { key, record } => raw.push(RawOp {
            target: T_DEDUP,
            day: record.accepted_ms / DEDUP_BUCKET_MS,
            kind: Kind::Put,
            key: layout::dedup(&key),
            value: record.encode_to_vec().into(),
        }),
    }
}
