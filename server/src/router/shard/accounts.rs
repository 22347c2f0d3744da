//! Accounts on their shards: verification codes (on the phone number's
//! shard), two-step PINs, registering a primary device, and lookups by
//! phone number and by user.

use super::{Shard, reply_now};
use crate::accounts;
use crate::clock::now_ms;
use crate::limits::{self, Limit};
use crate::router::{CodeChecked, CodeIssued, Registered, Reply, RouteError, UserSummary};
use crate::store::{
    AccountOp, CodeRecord, DeviceKey, DeviceRecord, StoreError, UserId, UserRecord,
};

/// The window of `wrong_codes_per_phone_per_day`.
const WRONG_CODE_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Shard {
    pub(super) fn request_code(&mut self, phone: String, reply: Reply<CodeIssued>) {
        let now = now_ms();
        let mut rec = match self.code_record(&phone) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let Err(retry_after_ms) =
            limits::take_from_log(&mut rec.requested_ms, now, self.cfg.code_requests_per_phone)
        {
            return reply_now(
                reply,
                Err(Limit::CodeRequestsPerPhone.refuse(retry_after_ms).into()),
            );
        }
        let code = accounts::new_code();
        rec.code_hash = accounts::code_hash(&phone, &code);
        rec.expires_ms = now + accounts::CODE_TTL_MS;
        rec.wrong_attempts = 0;
        let expires_at_ms = rec.expires_ms;
        self.stage_code(&phone, rec);
        self.after_commit(
            reply,
            Ok(CodeIssued {
                code,
                expires_at_ms,
            }),
        );
    }

    /// The phone's code record if `code` is right and usable now (and,
    /// with `honour_pin_lock`, the number not locked by wrong PINs); a
    /// wrong code is counted (staged).
    fn right_code(
        &mut self,
        phone: &str,
        code: &str,
        now: u64,
        honour_pin_lock: bool,
    ) -> Result<CodeRecord, RouteError> {
        let mut rec = self.code_record(phone)?.ok_or(RouteError::CodeExpired)?;
        if rec.wrong_attempts >= accounts::MAX_WRONG_CODE_ATTEMPTS {
            return Err(RouteError::CodeLocked);
        }
        // Wrong codes per number per day, whatever codes were requested:
        // without it, each new code (3 an hour) brought 5 new guesses.
        (rec.wrong_window_start_ms, rec.wrong_in_window) = limits::window_count(
            rec.wrong_window_start_ms,
            rec.wrong_in_window,
            now,
            WRONG_CODE_WINDOW,
        );
        if rec.wrong_in_window >= self.cfg.wrong_codes_per_phone_per_day {
            let retry_after_ms = rec
                .wrong_window_start_ms
                .saturating_add(WRONG_CODE_WINDOW.as_millis().try_into().unwrap_or(u64::MAX))
                .saturating_sub(now);
            return Err(Limit::WrongCodes.refuse(retry_after_ms).into());
        }
        if rec.code_hash.is_empty() || now >= rec.expires_ms {
            return Err(RouteError::CodeExpired);
        }
        if honour_pin_lock && rec.pin_locked_until_ms > now {
            return Err(RouteError::PinLocked {
                retry_after_ms: rec.pin_locked_until_ms - now,
            });
        }
        if !accounts::hashes_equal(&accounts::code_hash(phone, code), &rec.code_hash) {
            rec.wrong_attempts += 1;
            rec.wrong_in_window += 1;
            let err = if rec.wrong_attempts >= accounts::MAX_WRONG_CODE_ATTEMPTS {
                RouteError::CodeLocked
            } else {
                RouteError::CodeInvalid
            };
            self.stage_code(phone, rec);
            return Err(err);
        }
        Ok(rec)
    }

    /// Two-step verification, step 1: the code is right (not used up), and
    /// a presented PIN is counted before it is checked, locking the number
    /// once [`accounts::MAX_WRONG_PIN_ATTEMPTS`] have not been followed by a
    /// registration.
    pub(super) fn check_code(
        &mut self,
        phone: String,
        code: &str,
        pin_presented: bool,
        reply: Reply<CodeChecked>,
    ) {
        let now = now_ms();
        let mut rec = match self.right_code(&phone, code, now, true) {
            Ok(r) => r,
            Err(e) => return self.after_commit(reply, Err(e)),
        };
        let user = match self.phone_user(&phone) {
            Ok(u) => u,
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let mut locked_until_ms = None;
        if pin_presented && user.is_some() {
            rec.pin_attempts += 1;
            if rec.pin_attempts >= accounts::MAX_WRONG_PIN_ATTEMPTS {
                // Locked unless this attempt succeeds (verify_code lifts it).
                rec.pin_attempts = 0;
                rec.pin_locked_until_ms = now + accounts::PIN_LOCKOUT_MS;
                locked_until_ms = Some(rec.pin_locked_until_ms);
            }
            self.stage_code(&phone, rec);
        }
        self.after_commit(
            reply,
            Ok(CodeChecked {
                user,
                locked_until_ms,
            }),
        );
    }

    /// The record of `device`'s user, if `device` is its primary device.
    pub(super) fn primary_user(&mut self, device: DeviceKey) -> Result<UserRecord, RouteError> {
        let rec = self
            .user(device.user)?
            .cloned()
            .ok_or(RouteError::Unauthenticated)?;
        if rec
            .devices
            .iter()
            .any(|d| d.device_id == device.device && d.primary)
        {
            Ok(rec)
        } else {
            Err(RouteError::NotPrimary)
        }
    }

    pub(super) fn set_pin(&mut self, device: DeviceKey, pin_hash: String, reply: Reply<bool>) {
        let mut rec = match self.primary_user(device) {
            Ok(r) => r,
            Err(e) => return reply_now(reply, Err(e)),
        };
        let enabled = !pin_hash.is_empty();
        rec.pin_hash = pin_hash;
        self.stage(AccountOp::PutUser(rec.clone()));
        self.users.insert(device.user, rec);
        self.after_commit(reply, Ok(enabled));
    }

    /// Uses up a right code (after the PIN, if any, was checked) and returns
    /// the phone's account, created if new.
    pub(super) fn verify_code(&mut self, phone: String, code: &str, reply: Reply<UserId>) {
        let now = now_ms();
        // Reached only once the PIN, if any, was right: a lock set by that
        // same attempt (the last allowed one) does not apply.
        let mut rec = match self.right_code(&phone, code, now, false) {
            Ok(r) => r,
            Err(e) => return self.after_commit(reply, Err(e)),
        };
        // Right code: consume it (the request history stays for the limit).
        rec.code_hash.clear();
        rec.wrong_attempts = 0;
        rec.pin_attempts = 0;
        rec.pin_locked_until_ms = 0;
        self.stage_code(&phone, rec);
        let user = match self.phone_user(&phone) {
            Ok(Some(u)) => u,
            Ok(None) => match self.allocate_user_id() {
                Ok(u) => {
                    self.staged_phones.insert(phone.clone(), u);
                    self.stage(AccountOp::PutPhone { phone, user: u });
                    u
                }
                Err(e) => return reply_now(reply, Err(e.into())),
            },
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        self.after_commit(reply, Ok(user));
    }

    /// A random, unused, non-zero user id (ids are not sequential, so they
    /// reveal nothing about the number of users).
    fn allocate_user_id(&self) -> Result<UserId, StoreError> {
        loop {
            let id: u64 = rand::random();
            if id != 0 && self.store.user(id)?.is_none() {
                return Ok(id);
            }
        }
    }

    pub(super) fn register_device(
        &mut self,
        user: UserId,
        phone: String,
        reply: Reply<Registered>,
    ) {
        let now = now_ms();
        let mut rec = match self.user(user) {
            Ok(Some(r)) => r.clone(),
            Ok(None) => UserRecord {
                user_id: user,
                phone: phone.clone(),
                devices: Vec::new(),
                next_device_id: 1,
                created_ms: now,
                ..Default::default()
            },
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        rec.phone = phone;
        // Re-registering the phone number starts the account's devices over,
        // as on WhatsApp: every previous device (primary and linked) is
        // revoked, and the new primary brings a new identity.
        let revoked: Vec<u32> = rec.devices.iter().map(|d| d.device_id).collect();
        rec.devices.clear();
        rec.link_code.clear();
        let device_id = rec.next_device_id.max(1);
        rec.next_device_id = device_id + 1;
        let credential = accounts::new_credential();
        rec.devices.push(DeviceRecord {
            device_id,
            credential_hash: accounts::credential_hash(&credential),
            created_ms: now,
            primary: true,
        });
        rec.devices.sort_by_key(|d| d.device_id);
        // The messages waiting for the replaced devices will never reach
        // them: their senders are told, durably, and may resend.
        if let Err(e) = self.undelivered(user, &revoked) {
            return reply_now(reply, Err(e.into()));
        }
        self.revoke(user, &revoked);
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

    /// The account's PIN hash (empty: none).
    pub(super) fn user_pin(&mut self, user: UserId, reply: Reply<String>) {
        let r = self
            .user(user)
            .map(|u| u.map(|u| u.pin_hash.clone()).unwrap_or_default())
            .map_err(RouteError::from);
        self.after_commit(reply, r);
    }

    /// The user with phone number `phone`.
    pub(super) fn lookup_phone(&mut self, phone: &str, reply: Reply<UserId>) {
        let r = self
            .phone_user(phone)
            .map_err(RouteError::from)
            .and_then(|u| u.ok_or(RouteError::UnknownUser));
        self.after_commit(reply, r);
    }

    /// Public facts about `user`.
    pub(super) fn lookup_user(&mut self, user: UserId, reply: Reply<UserSummary>) {
        let r = match self.user(user) {
            Ok(Some(u)) => Ok(UserSummary {
                user,
                phone: u.phone.clone(),
                devices: u.devices.iter().map(|d| d.device_id).collect(),
            }),
            Ok(None) => Err(RouteError::UnknownUser),
            Err(e) => Err(e.into()),
        };
        self.after_commit(reply, r);
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;

    impl crate::router::Router {
        /// Issues a verification code for `phone` (not yet delivered).
        ///
        /// # Errors
        /// [`RouteError::InvalidPhone`], [`RouteError::RateLimited`], storage.
        pub async fn request_code(&self, phone: String) -> Result<CodeIssued, RouteError> {
            if !crate::accounts::is_e164(&phone) {
                return Err(RouteError::InvalidPhone);
            }
            self.call(self.phone_shard(&phone), |reply| Command::RequestCode {
                phone,
                reply,
            })
            .await
        }

        /// Checks a code and, if right, registers a new primary device.
        ///
        /// # Errors
        /// The code errors, storage.
        pub async fn verify_code(
            &self,
            phone: String,
            code: String,
            pin: String,
        ) -> Result<Registered, RouteError> {
            if !crate::accounts::is_e164(&phone) {
                return Err(RouteError::InvalidPhone);
            }
            let checked = self
                .call(self.phone_shard(&phone), |reply| Command::CheckCode {
                    phone: phone.clone(),
                    code: code.clone(),
                    pin_presented: !pin.is_empty(),
                    reply,
                })
                .await?;
            if let Some(user) = checked.user {
                let stored = self
                    .call(self.user_shard(user), |reply| Command::UserPin {
                        user,
                        reply,
                    })
                    .await?;
                if !stored.is_empty() {
                    if pin.is_empty() {
                        return Err(RouteError::PinRequired);
                    }
                    // Argon2 is slow on purpose: off the shard and the runtime.
                    let right = tokio::task::spawn_blocking(move || {
                        crate::accounts::verify_pin(&pin, &stored)
                    })
                    .await
                    .map_err(|_| RouteError::Internal)?
                    .map_err(|e| {
                        tracing::error!(error = %e, user, "stored PIN hash unreadable");
                        RouteError::Internal
                    })?;
                    if !right {
                        return Err(match checked.locked_until_ms {
                            Some(until) => RouteError::PinLocked {
                                retry_after_ms: until.saturating_sub(crate::clock::now_ms()),
                            },
                            None => RouteError::PinInvalid,
                        });
                    }
                }
            }
            let user = self
                .call(self.phone_shard(&phone), |reply| Command::VerifyCode {
                    phone: phone.clone(),
                    code,
                    reply,
                })
                .await?;
            self.call(self.user_shard(user), |reply| Command::RegisterDevice {
                user,
                phone,
                reply,
            })
            .await
        }

        /// Sets the account's PIN hash (empty: clears it); primary device only.
        /// Returns whether a PIN is now set.
        ///
        /// # Errors
        /// [`RouteError::NotPrimary`], storage.
        pub async fn set_pin(
            &self,
            device: DeviceKey,
            pin_hash: String,
        ) -> Result<bool, RouteError> {
            self.call(self.user_shard(device.user), |reply| Command::SetPin {
                device,
                pin_hash,
                reply,
            })
            .await
        }

        /// Looks a user up by phone number.
        ///
        /// # Errors
        /// [`RouteError::UnknownUser`], storage.
        pub async fn lookup_phone(&self, phone: String) -> Result<UserSummary, RouteError> {
            if !crate::accounts::is_e164(&phone) {
                return Err(RouteError::InvalidPhone);
            }
            let user = self
                .call(self.phone_shard(&phone), |reply| Command::LookupPhone {
                    phone,
                    reply,
                })
                .await?;
            self.call(self.user_shard(user), |reply| Command::LookupUser {
                user,
                reply,
            })
            .await
        }
    }
}
