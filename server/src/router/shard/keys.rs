//! The key directory of the shard's devices: key uploads, and bundles
//! that use up one-time keys (the fallback key past a device's budget).

use std::time::Instant;

use prost::Message;
use switchboard_proto::pb;

use super::{Notice, Shard, ToConn, reply_now};
use crate::keys;
use crate::limits::Limit;
use crate::router::{Reply, RouteError};
use crate::store::{DeviceKey, DeviceKeysRecord, KeyOp, StoreError, UserId};

impl Shard {
    pub(super) fn device_keys(
        &mut self,
        device: DeviceKey,
    ) -> Result<Option<&DeviceKeysRecord>, StoreError> {
        if !self.keys.contains_key(&device) {
            match self.store.device_keys(device)? {
                Some(rec) => {
                    self.keys.insert(device, rec);
                }
                None => return Ok(None),
            }
        }
        Ok(self.keys.get(&device))
    }

    fn stage_device_keys(&mut self, device: DeviceKey, record: DeviceKeysRecord) {
        self.keys.insert(device, record.clone());
        self.stage(KeyOp::PutDeviceKeys { device, record });
    }

    /// True if `device` is a current device of its user.
    fn is_current(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .user(device.user)?
            .is_some_and(|u| u.devices.iter().any(|d| d.device_id == device.device)))
    }

    pub(super) fn upload_keys(
        &mut self,
        device: DeviceKey,
        up: pb::UploadKeys,
        reply: Reply<(u32, bool)>,
    ) {
        match self.is_current(device) {
            Ok(true) => {}
            Ok(false) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        }
        let mut rec = match self.device_keys(device) {
            Ok(r) => r.cloned().unwrap_or_default(),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let (Some(old), Some(new)) = (&rec.identity, &up.identity)
            && (old.curve25519 != new.curve25519 || old.ed25519 != new.ed25519)
        {
            return reply_now(
                reply,
                Err(RouteError::InvalidKeys(
                    "identity keys differ from the ones this device published; a new identity needs a new device".into(),
                )),
            );
        }
        let room = keys::MAX_STOCK_ONE_TIME_KEYS.saturating_sub(rec.one_time_keys);
        if up.one_time_keys.len() > room as usize {
            return reply_now(
                reply,
                Err(RouteError::InvalidKeys(format!(
                    "the stock is limited to {} one-time keys; {room} more accepted",
                    keys::MAX_STOCK_ONE_TIME_KEYS
                ))),
            );
        }
        let first_identity = rec.identity.is_none() && up.identity.is_some();
        if rec.identity.is_none() {
            rec.identity = up.identity;
        }
        if let Some(fb) = up.fallback_key {
            rec.fallback = Some(fb);
        }
        for key in up.one_time_keys {
            let index = rec.next_index;
            rec.next_index += 1;
            rec.one_time_keys += 1;
            self.stage(KeyOp::PutOneTimeKey {
                device,
                index,
                key: key.encode_to_vec().into(),
            });
        }
        let remaining = rec.one_time_keys;
        self.stage_device_keys(device, rec);
        self.after_commit(reply, Ok((remaining, first_identity)));
    }

    pub(super) fn fetch_bundles(
        &mut self,
        requester: DeviceKey,
        user: UserId,
        identities_only: bool,
        reply: Reply<Vec<pb::DeviceBundle>>,
    ) {
        let devices: Vec<u32> = match self.user(user) {
            Ok(Some(u)) => u
                .devices
                .iter()
                .map(|d| d.device_id)
                .filter(|d| !(user == requester.user && *d == requester.device))
                .collect(),
            Ok(None) => return reply_now(reply, Err(RouteError::UnknownUser)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut bundles = Vec::with_capacity(devices.len());
        for device_id in devices {
            let device = DeviceKey {
                user,
                device: device_id,
            };
            let bundle = if identities_only {
                self.device_keys(device).map(|rec| pb::DeviceBundle {
                    device_id,
                    identity: rec.and_then(|r| r.identity.clone()),
                    key: None,
                })
            } else {
                self.take_bundle(device)
            };
            match bundle {
                Ok(b) => bundles.push(b),
                Err(e) => return reply_now(reply, Err(e.into())),
            }
        }
        self.after_commit(reply, Ok(bundles));
    }

    /// One device's bundle, consuming a one-time key (or falling back).
    fn take_bundle(&mut self, device: DeviceKey) -> Result<pb::DeviceBundle, StoreError> {
        let mut bundle = pb::DeviceBundle {
            device_id: device.device,
            ..Default::default()
        };
        let Some(mut rec) = self.device_keys(device)?.cloned() else {
            return Ok(bundle);
        };
        if rec.identity.is_none() {
            return Ok(bundle);
        }
        bundle.identity = rec.identity.clone();
        // Past the device's hourly budget of one-time keys, fetchers get its
        // fallback key: whoever fetches in a loop (from any number of
        // accounts) cannot drain the stock, and nobody is refused a session.
        let within_budget = self
            .one_time_key_budget
            .take(&device, Instant::now())
            .is_ok();
        if !within_budget {
            Limit::OneTimeKeys.tripped();
        }
        let one_time_key = if within_budget {
            self.store.first_one_time_key(device, rec.consumed_below)?
        } else {
            None
        };
        match one_time_key {
            Some((index, bytes)) => {
                let key = pb::SignedKey::decode(bytes).map_err(|e| StoreError::Corrupt {
                    what: "one-time key",
                    detail: e.to_string(),
                })?;
                bundle.key = Some(pb::device_bundle::Key::OneTimeKey(key));
                self.stage(KeyOp::DeleteOneTimeKey { device, index });
                rec.consumed_below = index + 1;
                rec.one_time_keys = rec.one_time_keys.saturating_sub(1);
                if rec.one_time_keys < keys::LOW_STOCK_ONE_TIME_KEYS {
                    self.pushes
                        .push((device, ToConn::Notice(Notice::KeysLow(rec.one_time_keys))));
                }
                self.stage_device_keys(device, rec);
            }
            None => {
                bundle.key = rec
                    .fallback
                    .clone()
                    .map(pb::device_bundle::Key::FallbackKey);
                if within_budget {
                    self.pushes
                        .push((device, ToConn::Notice(Notice::KeysLow(0))));
                }
            }
        }
        Ok(bundle)
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;

    impl crate::router::Router {
        /// Publishes a device's keys (already signature-checked). Returns the
        /// one-time keys in stock, and whether this upload published the
        /// device's identity (its first).
        ///
        /// # Errors
        /// [`RouteError::InvalidKeys`] for a changed identity or a full stock.
        pub async fn upload_keys(
            &self,
            device: DeviceKey,
            upload: pb::UploadKeys,
        ) -> Result<(u32, bool), RouteError> {
            self.call(self.user_shard(device.user), |reply| Command::UploadKeys {
                device,
                upload,
                reply,
            })
            .await
        }

        /// Key bundles of every current device of `user` (but the requester),
        /// each consuming one one-time key; with `identities_only`, only the
        /// devices' identity keys (nothing used up).
        ///
        /// # Errors
        /// [`RouteError::UnknownUser`], storage.
        pub async fn fetch_bundles(
            &self,
            requester: DeviceKey,
            user: UserId,
            identities_only: bool,
        ) -> Result<Vec<pb::DeviceBundle>, RouteError> {
            self.call(self.user_shard(user), |reply| Command::FetchBundles {
                requester,
                user,
                identities_only,
                reply,
            })
            .await
        }
    }
}
