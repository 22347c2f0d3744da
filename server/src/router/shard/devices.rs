//! Linked devices: link codes (created on the user's shard, kept on the
//! code's), linking, listing and revoking devices, and the
//! `DevicesChanged` entries that tell the user's devices.

use switchboard_proto::pb;

use super::{KickReason, Shard, reply_now};
use crate::accounts;
use crate::clock::now_ms;
use crate::limits::{self, Limit, Rate};
use crate::router::{Registered, Reply, RouteError};
use crate::store::{
    AccountOp, DeviceId, DeviceKey, DeviceRecord, KeyOp, LinkCodeRecord, QueueOp, StoreError,
    UserId, UserRecord,
};

/// Link codes a user may create.
const LINK_CODE_RATE: Rate = Rate::per_hour(accounts::MAX_LINK_CODES_PER_HOUR);

impl Shard {
    pub(super) fn create_link_code(&mut self, device: DeviceKey, reply: Reply<(String, u64)>) {
        let now = now_ms();
        let mut rec = match self.primary_user(device) {
            Ok(r) => r,
            Err(e) => return reply_now(reply, Err(e)),
        };
        if rec.devices.len() > accounts::MAX_LINKED_DEVICES {
            return reply_now(reply, Err(RouteError::TooManyDevices));
        }
        if let Err(retry_after_ms) =
            limits::take_from_log(&mut rec.link_codes_created_ms, now, LINK_CODE_RATE)
        {
            return reply_now(reply, Err(Limit::LinkCodes.refuse(retry_after_ms).into()));
        }
        let code = accounts::new_link_code();
        let Some(canonical) = accounts::normalize_link_code(&code) else {
            return reply_now(reply, Err(RouteError::LinkCodeInvalid));
        };
        rec.link_code = canonical;
        self.stage(AccountOp::PutUser(rec.clone()));
        self.users.insert(device.user, rec);
        self.after_commit(reply, Ok((code, now + accounts::LINK_CODE_TTL_MS)));
    }

    pub(super) fn take_link_code(&mut self, code: String, reply: Reply<UserId>) {
        match self.store.link_code(&code) {
            Ok(Some(rec)) if rec.expires_ms > now_ms() => {
                self.stage(AccountOp::DeleteLinkCode(code));
                self.after_commit(reply, Ok(rec.user_id));
            }
            Ok(_) => reply_now(reply, Err(RouteError::LinkCodeInvalid)),
            Err(e) => reply_now(reply, Err(e.into())),
        }
    }

    pub(super) fn add_linked_device(&mut self, user: UserId, code: &str, reply: Reply<Registered>) {
        let now = now_ms();
        let mut rec = match self.user(user) {
            Ok(Some(u)) => u.clone(),
            Ok(None) => return reply_now(reply, Err(RouteError::LinkCodeInvalid)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        // Only the newest code of the account works, and only once.
        if rec.link_code.is_empty() || rec.link_code != code {
            return reply_now(reply, Err(RouteError::LinkCodeInvalid));
        }
        if rec.devices.len() > accounts::MAX_LINKED_DEVICES {
            return reply_now(reply, Err(RouteError::TooManyDevices));
        }
        rec.link_code.clear();
        let device_id = rec.next_device_id.max(1);
        rec.next_device_id = device_id + 1;
        let credential = accounts::new_credential();
        rec.devices.push(DeviceRecord {
            device_id,
            credential_hash: accounts::credential_hash(&credential),
            created_ms: now,
            primary: false,
        });
        rec.devices.sort_by_key(|d| d.device_id);
        if let Err(e) = self.announce_devices(&rec, Some(device_id)) {
            return reply_now(reply, Err(e.into()));
        }
        self.stage(AccountOp::PutUser(rec.clone()));
        self.users.insert(user, rec);
        self.after_commit(
            reply,
            Ok(Registered {
                user,
                device: device_id,
                credential,
            }),
        );
    }

    pub(super) fn list_devices(&mut self, user: UserId, reply: Reply<Vec<pb::DeviceInfo>>) {
        let devices: Vec<(u32, bool, u64)> = match self.user(user) {
            Ok(Some(u)) => u
                .devices
                .iter()
                .map(|d| (d.device_id, d.primary, d.created_ms))
                .collect(),
            Ok(None) => return reply_now(reply, Err(RouteError::UnknownUser)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut out = Vec::with_capacity(devices.len());
        for (device_id, primary, created_ms) in devices {
            let identity = match self.device_keys(DeviceKey {
                user,
                device: device_id,
            }) {
                Ok(k) => k.and_then(|k| k.identity.clone()),
                Err(e) => return reply_now(reply, Err(e.into())),
            };
            out.push(pb::DeviceInfo {
                device_id,
                primary,
                created_ms,
                identity,
            });
        }
        self.after_commit(reply, Ok(out));
    }

    pub(super) fn revoke_device(&mut self, by: DeviceKey, target: DeviceId, reply: Reply<()>) {
        let mut rec = match self.user(by.user) {
            Ok(Some(u)) => u.clone(),
            Ok(None) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if !rec
            .devices
            .iter()
            .any(|d| d.device_id == by.device && d.primary)
        {
            return reply_now(reply, Err(RouteError::NotPrimary));
        }
        if target == by.device {
            return reply_now(
                reply,
                Err(RouteError::BadRequest(
                    "the primary device cannot revoke itself; register the phone number again instead".into(),
                )),
            );
        }
        if !rec.devices.iter().any(|d| d.device_id == target) {
            return reply_now(
                reply,
                Err(RouteError::BadRequest(format!("no device {target}"))),
            );
        }
        rec.devices.retain(|d| d.device_id != target);
        if let Err(e) = self.announce_devices(&rec, None) {
            return reply_now(reply, Err(e.into()));
        }
        self.revoke(by.user, &[target]);
        self.stage(AccountOp::PutUser(rec.clone()));
        self.users.insert(by.user, rec);
        self.after_commit(reply, Ok(()));
    }

    /// Stages the removal of devices: queue, keys, connection.
    pub(super) fn revoke(&mut self, user: UserId, devices: &[DeviceId]) {
        for &d in devices {
            let device = DeviceKey { user, device: d };
            self.stage(QueueOp::DropQueue(device));
            self.queue_usage.remove(&device);
            self.batch_enqueued.remove(&device);
            self.stage(KeyOp::DropDeviceKeys(device));
            self.last_seq.remove(&device);
            self.keys.remove(&device);
            self.kicks.push((device, KickReason::Revoked));
        }
    }

    /// Queues `DevicesChanged` for every device of `rec` except `skip`.
    fn announce_devices(
        &mut self,
        rec: &UserRecord,
        skip: Option<DeviceId>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let ids: Vec<u32> = rec.devices.iter().map(|d| d.device_id).collect();
        let mut seqs = Vec::new();
        for &d in &ids {
            if Some(d) == skip {
                continue;
            }
            let device = DeviceKey {
                user: rec.user_id,
                device: d,
            };
            seqs.push((device, self.next_seq(device)?));
        }
        for (device, seq) in seqs {
            let body = pb::queue_entry::Body::DevicesChanged(pb::DevicesChanged {
                user_id: rec.user_id,
                devices: ids.clone(),
            });
            self.stage_entry(device, seq, now, body);
        }
        Ok(())
    }

    /// Keeps a link code on the shard that owns it (by the code's hash).
    pub(super) fn store_link_code(
        &mut self,
        code: String,
        record: LinkCodeRecord,
        reply: Reply<()>,
    ) {
        self.stage(AccountOp::PutLinkCode { code, record });
        self.after_commit(reply, Ok(()));
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;

    impl crate::router::Router {
        /// A link code for the primary `device`'s account: (code, expiry).
        ///
        /// # Errors
        /// [`RouteError::NotPrimary`], [`RouteError::TooManyDevices`], rate limit.
        pub async fn create_link_code(
            &self,
            device: DeviceKey,
        ) -> Result<(String, u64), RouteError> {
            let (code, expires_ms) = self
                .call(self.user_shard(device.user), |reply| {
                    Command::CreateLinkCode { device, reply }
                })
                .await?;
            let canonical =
                crate::accounts::normalize_link_code(&code).ok_or(RouteError::LinkCodeInvalid)?;
            self.call(self.phone_shard(&canonical), |reply| {
                Command::StoreLinkCode {
                    code: canonical.clone(),
                    record: crate::store::LinkCodeRecord {
                        user_id: device.user,
                        expires_ms,
                    },
                    reply,
                }
            })
            .await?;
            Ok((code, expires_ms))
        }

        /// Joins the account behind `code` as a new linked device.
        ///
        /// # Errors
        /// [`RouteError::LinkCodeInvalid`], [`RouteError::TooManyDevices`].
        pub async fn link_device(&self, code: &str) -> Result<Registered, RouteError> {
            let code =
                crate::accounts::normalize_link_code(code).ok_or(RouteError::LinkCodeInvalid)?;
            let user = self
                .call(self.phone_shard(&code), |reply| Command::TakeLinkCode {
                    code: code.clone(),
                    reply,
                })
                .await?;
            self.call(self.user_shard(user), |reply| Command::AddLinkedDevice {
                user,
                code,
                reply,
            })
            .await
        }

        /// The user's devices with their identity keys.
        ///
        /// # Errors
        /// [`RouteError::UnknownUser`], storage.
        pub async fn list_devices(&self, user: UserId) -> Result<Vec<pb::DeviceInfo>, RouteError> {
            self.call(self.user_shard(user), |reply| Command::ListDevices {
                user,
                reply,
            })
            .await
        }

        /// The primary device `by` revokes another device of its user.
        ///
        /// # Errors
        /// [`RouteError::NotPrimary`], [`RouteError::BadRequest`] for an unknown
        /// device or the primary itself.
        pub async fn revoke_device(
            &self,
            by: DeviceKey,
            target: DeviceId,
        ) -> Result<(), RouteError> {
            self.call(self.user_shard(by.user), |reply| Command::RevokeDevice {
                by,
                target,
                reply,
            })
            .await
        }
    }
}
