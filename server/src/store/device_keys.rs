//! The keys domain: the public keys each device publishes (identity and
//! fallback keys, a stock of one-time keys).
//!
//! Atomic unit: the batch, together with [`super::Accounts`] (one
//! PostgreSQL transaction in a cluster backend).

use bytes::Bytes;

use super::{DeviceKey, DeviceKeysRecord, StoreError};

/// Reads of the keys domain.
pub trait Keys {
    /// A device's published keys.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError>;

    /// The published keys of those of `devices` that have any, in any
    /// order: what [`Keys::device_keys`] gives for each, read in one go
    /// where the engine can.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn many_device_keys(
        &self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, DeviceKeysRecord)>, StoreError> {
        let mut found = Vec::with_capacity(devices.len());
        for &device in devices {
            if let Some(rec) = self.device_keys(device)? {
                found.push((device, rec));
            }
        }
        Ok(found)
    }

    /// The device's one-time key with the lowest index `>= from`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError>;
}

/// Writes of the keys domain.
#[derive(Clone, Debug)]
pub enum KeyOp {
    /// Create or replace a device's key record.
    PutDeviceKeys {
        /// The device.
        device: DeviceKey,
        /// Its keys.
        record: DeviceKeysRecord,
    },
    /// Store one one-time key.
    PutOneTimeKey {
        /// The device.
        device: DeviceKey,
        /// Its index (ascending in upload order).
        index: u64,
        /// The key (encoded `pb::SignedKey`).
        key: Bytes,
    },
    /// Remove one one-time key (handed out).
    DeleteOneTimeKey {
        /// The device.
        device: DeviceKey,
        /// Its index.
        index: u64,
    },
    /// Remove every key of a device (revoked).
    DropDeviceKeys(DeviceKey),
}
