//! The embedded backend's keys domain.

use super::*;

impl Db {
    pub(super) fn device_keys(
        &self,
        device: DeviceKey,
    ) -> Result<Option<DeviceKeysRecord>, StoreError> {
        match self
            .device_keys
            .get(layout::device(device))
            .map_err(engine)?
        {
            Some(v) => Ok(Some(decode("device keys", &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError> {
        let start = layout::queue_entry(device, from);
        let end = layout::queue_entry(device, u64::MAX);
        match self.otks.range(start..=end).next() {
            Some(guard) => {
                let (k, v) = guard.into_inner().map_err(engine)?;
                let (_, index) = layout::parse_queue_entry(&k).ok_or(StoreError::Corrupt {
                    what: "one-time key",
                    detail: format!("{} bytes", k.len()),
                })?;
                Ok(Some((index, Bytes::copy_from_slice(&v))))
            }
            None => Ok(None),
        }
    }
}

impl Keys for EmbeddedStore {
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError> {
        self.db()?.device_keys(device)
    }

    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError> {
        self.db()?.first_one_time_key(device, from)
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: KeyOp, raw: &mut Vec<RawOp>) {
    match op {
        KeyOp::PutDeviceKeys { device, record } => raw.push(put(
            T_DEVICE_KEYS,
            layout::device(device).to_vec(),
            record.encode_to_vec().into(),
        )),
        KeyOp::PutOneTimeKey { device, index, key } => raw.push(put(
            T_OTKS,
            layout::queue_entry(device, index).to_vec(),
            key,
        )),
        KeyOp::DeleteOneTimeKey { device, index } => raw.push(remove(
            T_OTKS,
            Kind::Remove,
            layout::queue_entry(device, index).to_vec(),
        )),
        KeyOp::DropDeviceKeys(device) => {
            let d = layout::device(device).to_vec();
            raw.push(remove(T_OTKS, Kind::RemovePrefix, d.clone()));
            raw.push(remove(T_DEVICE_KEYS, Kind::Remove, d));
        }
    }
}
