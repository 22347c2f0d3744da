//! The embedded backend's queues domain.

use super::*;

impl Db {
    pub(super) fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError> {
        match self
            .queue_meta
            .get(layout::device(device))
            .map_err(engine)?
        {
            Some(v) => u64_value("queue_meta", &v),
            None => Ok(0),
        }
    }

    pub(super) fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let Some(start_seq) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let start = layout::queue_entry(device, start_seq);
        let end = layout::queue_entry(device, u64::MAX);
        // Entries logged since the last checkpoint are in memory, older
        // ones in fjall; a queue can have both. Merge by seq.
        let hot: Vec<StoredEntry> = self
            .lock_hot()
            .range(&layout::device(device), start_seq, limit)
            .into_iter()
            .map(|(seq, bytes)| StoredEntry { seq, bytes })
            .collect();
        let mut out = Vec::with_capacity(limit.min(128));
        for guard in self.queues.range(start..=end).take(limit) {
            let (k, v) = guard.into_inner().map_err(engine)?;
            let (_, seq) = layout::parse_queue_entry(&k).ok_or(StoreError::Corrupt {
                what: "queue key",
                detail: format!("{} bytes", k.len()),
            })?;
            out.push(StoredEntry {
                seq,
                bytes: Bytes::copy_from_slice(&v),
            });
        }
        if !hot.is_empty() {
            out.extend(hot);
            out.sort_by_key(|e| e.seq);
            out.dedup_by_key(|e| e.seq);
            out.truncate(limit);
        }
        Ok(out)
    }

    pub(super) fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        // The sweep sees fjall only: move what is in memory there first.
        self.checkpoint_keeping_current()?;
        // Each queue is ordered by seq, hence by time: look at the head of
        // each device's queue and skip to the next device at the first entry
        // that has not expired. Cost: one seek per queue, plus the expired.
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        'devices: loop {
            let mut iter = self.queues.range(from.clone()..);
            loop {
                if out.len() >= limit {
                    return Ok(out);
                }
                let Some(guard) = iter.next() else {
                    return Ok(out);
                };
                let (k, v) = guard.into_inner().map_err(engine)?;
                let (device, seq) = layout::parse_queue_entry(&k).ok_or(StoreError::Corrupt {
                    what: "queue key",
                    detail: format!("{} bytes", k.len()),
                })?;
                let entry: pb::QueueEntry = decode("queue entry", &v)?;
                if entry.server_ts_ms < before_ms {
                    out.push((device, seq));
                    continue;
                }
                // Skip the rest of this device's queue.
                from = layout::queue_entry(device, u64::MAX).to_vec();
                from.push(0);
                continue 'devices;
            }
        }
    }

    pub(super) fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let mut oldest: Vec<Option<u64>> = vec![None; buckets];
        let mut note = |user: UserId, bytes: &[u8]| -> Result<(), StoreError> {
            let entry: pb::QueueEntry = decode("queue entry", bytes)?;
            if let Some(slot) = oldest.get_mut(bucket_of(user)) {
                let ts = entry.server_ts_ms;
                *slot = Some(slot.map_or(ts, |t| t.min(ts)));
            }
            Ok(())
        };
        // Entries in memory: the head of each device's queue there.
        for (key, bytes) in self.lock_hot().heads() {
            if let Some((device, _)) = layout::parse_queue_entry(&key) {
                note(device.user, &bytes)?;
            }
        }
        // Entries in fjall: one seek per queue, its head only.
        let mut from: Vec<u8> = Vec::new();
        loop {
            let Some(guard) = self.queues.range(from.clone()..).next() else {
                break;
            };
            let (k, v) = guard.into_inner().map_err(engine)?;
            let (device, _) = layout::parse_queue_entry(&k).ok_or(StoreError::Corrupt {
                what: "queue key",
                detail: format!("{} bytes", k.len()),
            })?;
            note(device.user, &v)?;
            from = layout::queue_entry(device, u64::MAX).to_vec();
            from.push(0);
        }
        Ok(oldest)
    }

    pub(super) fn approximate_queue_entries(&self) -> u64 {
        // No lock: this is read from the async runtime, and the log lock is
        // held across fsyncs.
        self.queues.approximate_len() as u64 + self.hot_len.load(Ordering::Relaxed)
    }
}

impl Queues for EmbeddedStore {
    fn reserved_seq(&self, device: DeviceKey) -> Result<u64, StoreError> {
        self.db()?.reserved_seq(device)
    }

    fn read_queue(
        &self,
        device: DeviceKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.db()?.read_queue(device, after, limit)
    }

    fn expired_entries(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(DeviceKey, u64)>, StoreError> {
        self.db()?.expired_entries(before_ms, limit)
    }

    fn oldest_entries(
        &self,
        buckets: usize,
        bucket_of: &dyn Fn(UserId) -> usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.db()?.oldest_entries(buckets, bucket_of)
    }

    fn approximate_queue_entries(&self) -> u64 {
        self.db().map_or(0, |db| db.approximate_queue_entries())
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: QueueOp, raw: &mut Vec<RawOp>) {
    match op {
        QueueOp::Enqueue { device, entry } => raw.push(put(
            T_QUEUES,
            layout::queue_entry(device, entry.seq).to_vec(),
            entry.bytes,
        )),
        QueueOp::ReserveSeqs { device, upto } => raw.push(put(
            T_QUEUE_META,
            layout::device(device).to_vec(),
            upto.to_be_bytes().to_vec().into(),
        )),
        QueueOp::Dequeue { device, seq } => raw.push(remove(
            T_QUEUES,
            Kind::Remove,
            layout::queue_entry(device, seq).to_vec(),
        )),
        QueueOp::DropQueue(device) => {
            let d = layout::device(device).to_vec();
            raw.push(remove(T_QUEUES, Kind::RemovePrefix, d.clone()));
            raw.push(remove(T_QUEUE_META, Kind::Remove, d));
        }
    }
}
