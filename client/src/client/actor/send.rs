//! The client task's outbox path: taking entries from the queue onto the
//! link, the lookup and key fetches a 1:1 send needs first, sealing per
//! device, the answers (✓, `DEVICE_MISMATCH`, retryable refusals, failure),
//! and what becomes of an answered entry's outbox file: removed, or kept for
//! one resend should the server report it undelivered.
//!
//! A group entry takes the same path, except that `start_send` hands it to
//! `groups.rs` for what it needs before it goes out.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use switchboard_proto::pb::{self, client_frame, server_frame};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Actor, InFlight, Link, MIN_RETRY_DELAY, now_ms};
use crate::ErrorCode;
use crate::client::{Event, Sent};
use crate::connection::unexpected;
use crate::crypto::envelope::{KIND_MESSAGE, Plaintext};
use crate::error::{CryptoError, Error, ServerError, StorageError, UsageError};
use crate::ids::{self, DeviceId, GroupId, UserId};
use crate::outbox::{Content, Entry, Next, PendingSend, Retained, State};

/// Key bundle fetches that may list a device without keys before a send
/// fails with `CryptoError::NoKeys`: a device that just registered or
/// linked uploads its keys within a round trip or two of connecting.
const MAX_KEY_WAITS: u32 = 20;

/// Wait between those fetches (so about 5 s in all).
const KEY_WAIT_DELAY: Duration = Duration::from_millis(250);

impl Actor {
    /// Moves outbox entries onto the link while it has room and fewer than
    /// `max_in_flight_sends` are in flight; notes when a blocked head may be
    /// retried.
    pub(super) fn pump_sends(&mut self, link: &mut Link) {
        self.retry_at = None;
        let now = Instant::now();
        while link.has_room() && link.sends_in_flight < self.config.max_in_flight_sends {
            match self.queue.next(now) {
                Next::Send(seq) => self.start_send(link, seq),
                Next::Blocked(at) => {
                    self.retry_at = at;
                    break;
                }
                Next::Idle => break,
            }
        }
    }

    fn resolve(link: &mut Link, entry_seq: u64, phone: String) {
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::LookupUser(pb::LookupUser { phone })),
        });
        link.in_flight.insert(id, InFlight::Resolve(entry_seq));
        link.sends_in_flight += 1;
    }

    /// Writes outbox entry `seq` (or the lookup or key fetch it needs
    /// first).
    fn start_send(&mut self, link: &mut Link, seq: u64) {
        let max_frame = self.config.connect.max_frame_bytes;
        let me = self.shared.user_id;
        let my_device = self.shared.device_id;
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        if let Content::Group { group_id, .. } = entry.send.content {
            self.start_group_send(link, seq, group_id);
            return;
        }
        let Some(to_user) = entry.send.to_user else {
            entry.state = State::Resolving;
            let phone = entry.send.to_phone.clone().unwrap_or_default();
            Self::resolve(link, seq, phone);
            return;
        };
        let (payloads, self_payloads) = match &entry.send.content {
            Content::PerDevice(payloads) => (
                payloads
                    .iter()
                    .map(|p| pb::DevicePayload {
                        device_id: p.device_id,
                        payload: p.payload.clone(),
                    })
                    .collect(),
                Vec::new(),
            ),
            Content::Group { .. } => return,
            Content::AllDevices { payload } => {
                let payload = payload.clone();
                let known = entry
                    .devices
                    .clone()
                    .or_else(|| self.devices.get(&to_user).cloned())
                    .or_else(|| self.crypto.known_devices(to_user));
                let mut devices = match known {
                    Some(devices) => devices,
                    None => {
                        let phone = entry
                            .send
                            .to_phone
                            .clone()
                            .or_else(|| self.phones.get(&to_user).cloned());
                        if let Some(phone) = phone {
                            entry.state = State::Resolving;
                            Self::resolve(link, seq, phone);
                            return;
                        }
                        // Unknown devices and no phone to look them up by:
                        // the server's DEVICE_MISMATCH answer lists them.
                        Vec::new()
                    }
                };
                if to_user == me {
                    // A note to self goes to this account's other devices.
                    devices.retain(|d| *d != my_device);
                }
                let own: Vec<u32> = if to_user == me {
                    Vec::new()
                } else {
                    self.crypto.known_devices(me).unwrap_or_default()
                };
                entry.devices = Some(devices.clone());
                // Devices without a session need their key bundles first.
                let mut fetch = Vec::new();
                if devices
                    .iter()
                    .any(|d| !self.crypto.has_session(to_user, *d))
                {
                    fetch.push(to_user);
                }
                if own.iter().any(|d| !self.crypto.has_session(me, *d)) {
                    fetch.push(me);
                }
                if !fetch.is_empty() {
                    fetch_bundles(link, entry, seq, fetch);
                    return;
                }
                let plaintext = Plaintext {
                    kind: KIND_MESSAGE,
                    body: payload,
                    sent_at_ms: now_ms(),
                    to_user,
                    sender_identity: None,
                    group_id: 0,
                };
                let sealed = self
                    .seal(to_user, &devices, &plaintext)
                    .and_then(|payloads| Ok((payloads, self.seal(me, &own, &plaintext)?)));
                match sealed {
                    Ok(sealed) => sealed,
                    Err(e) => {
                        self.fail(seq, e.into());
                        return;
                    }
                }
            }
        };
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        let id = link.next_id();
        let frame = pb::ClientFrame {
            id,
            body: Some(client_frame::Body::Send(pb::Send {
                client_msg_id: entry.send.client_msg_id.clone(),
                to_user,
                payloads,
                self_payloads,
                first_attempt: entry.send.never_sent,
            })),
        };
        let len = frame.encoded_len();
        if len > max_frame {
            self.fail(
                seq,
                UsageError::FrameTooLarge {
                    len,
                    max: max_frame,
                }
                .into(),
            );
            return;
        }
        entry.state = State::InFlight;
        entry.send.never_sent = false;
        link.session.queue(&frame);
        link.in_flight.insert(id, InFlight::Send(seq));
        link.sends_in_flight += 1;
    }

    /// Encrypts `plaintext` once for each of `user`'s `devices`.
    fn seal(
        &mut self,
        user: u64,
        devices: &[u32],
        plaintext: &Plaintext,
    ) -> Result<Vec<pb::DevicePayload>, CryptoError> {
        devices
            .iter()
            .map(|d| {
                Ok(pb::DevicePayload {
                    device_id: *d,
                    payload: self.crypto.encrypt(user, *d, plaintext)?,
                })
            })
            .collect()
    }

    /// Key bundles for outbox entry `seq`: new sessions, then the send goes
    /// again (or waits for devices that have not published keys yet).
    pub(super) fn on_fetch_answer(
        &mut self,
        seq: u64,
        user: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        let error = match body {
            Some(server_frame::Body::Bundles(bundles)) => {
                // Sessions are made even if the send is gone: the bundles'
                // one-time keys are used up either way.
                match self.crypto.add_bundles(&bundles) {
                    Ok(outcome) => {
                        let devices: Vec<u32> =
                            bundles.devices.iter().map(|d| d.device_id).collect();
                        if user != self.shared.user_id {
                            self.devices.insert(user, devices.clone());
                        }
                        self.report_changes(user, &outcome);
                        let Some(entry) = self.queue.get_mut(seq) else {
                            return Ok(());
                        };
                        if entry.send.to_user == Some(user) && user != self.shared.user_id {
                            entry.devices = Some(devices);
                        }
                        entry.fetches = entry.fetches.saturating_sub(1);
                        if let Some(device_id) = outcome.keyless.first() {
                            entry.key_waits += 1;
                            if entry.key_waits > MAX_KEY_WAITS
                                && matches!(entry.send.content, Content::Group { .. })
                            {
                                // One member's device without keys must not
                                // hold the group's message back: that member
                                // is left out of it.
                                warn!(
                                    user,
                                    device_id,
                                    "a member's device has no keys; it cannot read this group message"
                                );
                                entry.skip.insert(user);
                            } else if entry.key_waits > MAX_KEY_WAITS {
                                let error = CryptoError::NoKeys {
                                    user_id: UserId(user),
                                    device_id: DeviceId(*device_id),
                                };
                                self.fail(seq, error.into());
                                return Ok(());
                            } else {
                                entry.key_wait = true;
                            }
                        }
                        if entry.fetches == 0 {
                            entry.state = if std::mem::take(&mut entry.key_wait) {
                                State::RetryAt(Instant::now() + KEY_WAIT_DELAY)
                            } else {
                                State::Ready
                            };
                        }
                        return Ok(());
                    }
                    Err(e) => Error::Crypto(e),
                }
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.is_retryable()
                    && let Some(entry) = self.queue.get_mut(seq)
                {
                    entry.retries = entry.retries.saturating_add(1);
                    entry.fetches = entry.fetches.saturating_sub(1);
                    let delay = error
                        .retry_after
                        .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                        .max(MIN_RETRY_DELAY);
                    if entry.fetches == 0 {
                        entry.state = State::RetryAt(Instant::now() + delay);
                    }
                    return Ok(());
                }
                Error::Server(error)
            }
            other => return Err(unexpected("Bundles", other.as_ref())),
        };
        self.fail(seq, error);
        Ok(())
    }

    pub(super) fn on_send_answer(
        &mut self,
        seq: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        match body {
            Some(server_frame::Body::SendOk(ok)) => {
                self.complete(seq, &ok);
                Ok(())
            }
            Some(server_frame::Body::Error(e)) => {
                self.on_send_error(seq, e.into());
                Ok(())
            }
            other => Err(unexpected("SendOk", other.as_ref())),
        }
    }

    fn on_send_error(&mut self, seq: u64, error: ServerError) {
        let max_device_retries = self.config.max_device_retries;
        let Some(entry) = self.queue.get_mut(seq) else {
            return;
        };
        if error.code == ErrorCode::DeviceMismatch
            && matches!(entry.send.content, Content::AllDevices { .. })
            && entry.mismatches < max_device_retries
        {
            entry.mismatches += 1;
            entry.state = State::Ready;
            let me = self.shared.user_id;
            let to_user = entry.send.to_user.unwrap_or_default();
            let whose = error.user_id.map_or(to_user, UserId::get);
            let stale = ids::device_ints(&error.stale_devices);
            let missing = ids::device_ints(&error.missing_devices);
            let fix = |list: Option<Vec<u32>>| {
                let mut devices = list.unwrap_or_default();
                devices.retain(|d| !stale.contains(d));
                devices.extend_from_slice(&missing);
                devices.sort_unstable();
                devices.dedup();
                devices
            };
            if whose == to_user {
                let devices = fix(entry.devices.take());
                debug!(seq, ?devices, "recipient devices changed; resending");
                if to_user != me {
                    self.devices.insert(to_user, devices.clone());
                }
                entry.devices = Some(devices);
            }
            if whose == me {
                let devices = fix(self.crypto.known_devices(me));
                debug!(seq, ?devices, "this account's devices changed; resending");
                self.crypto.set_own_devices(&devices);
            }
            self.crypto.forget_devices(whose, &stale);
            // A replacement is reported once the new devices' keys are
            // fetched; a removal alone, now.
            if error.missing_devices.is_empty()
                && let Some(change) = self.crypto.check_devices(whose)
            {
                self.contact_devices_changed(whose, change);
            }
            return;
        }
        if error.is_retryable() {
            entry.retries = entry.retries.saturating_add(1);
            let delay = error
                .retry_after
                .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                .max(MIN_RETRY_DELAY);
            debug!(seq, %error, ?delay, "send refused for now; will retry");
            entry.state = State::RetryAt(Instant::now() + delay);
            return;
        }
        self.fail(seq, Error::Server(error));
    }

    pub(super) fn on_resolve_answer(
        &mut self,
        seq: u64,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        match body {
            Some(server_frame::Body::UserInfo(info)) => {
                self.devices.insert(info.user_id, info.devices.clone());
                self.phones.insert(info.user_id, info.phone.clone());
                if let Some(entry) = self.queue.get_mut(seq) {
                    let to_user = *entry.send.to_user.get_or_insert(info.user_id);
                    // A cached phone number now owned by someone else: let
                    // the server's DEVICE_MISMATCH answer give the devices.
                    entry.devices = Some(if to_user == info.user_id {
                        info.devices
                    } else {
                        Vec::new()
                    });
                    entry.state = State::Ready;
                }
                Ok(())
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.is_retryable() {
                    if let Some(entry) = self.queue.get_mut(seq) {
                        entry.retries = entry.retries.saturating_add(1);
                        let delay = error
                            .retry_after
                            .unwrap_or_else(|| self.config.backoff.delay(entry.retries))
                            .max(MIN_RETRY_DELAY);
                        entry.state = State::RetryAt(Instant::now() + delay);
                    }
                } else {
                    self.fail(seq, Error::Server(error));
                }
                Ok(())
            }
            other => Err(unexpected("UserInfo", other.as_ref())),
        }
    }

    /// ✓ for outbox entry `seq`.
    fn complete(&mut self, seq: u64, ok: &pb::SendOk) {
        let Some(entry) = self.queue.remove(seq) else {
            return;
        };
        // Kept until its ✓✓ in case the server reports it undelivered.
        let keep = matches!(entry.send.content, Content::AllDevices { .. })
            && !entry.send.resent
            && entry.send.to_user.is_some_and(|u| u != self.shared.user_id);
        match (&self.store, keep) {
            (Some(_), true) => self
                .retirements
                .push((seq, entry.send.client_msg_id.clone())),
            (Some(_), false) => self.removals.push(seq),
            (None, true) => self
                .retained_mem
                .insert(entry.send.client_msg_id.clone(), entry.send.clone()),
            (None, false) => {}
        }
        let group_id = match entry.send.content {
            Content::Group { group_id, .. } => {
                self.track_group_send(group_id, &entry.send.client_msg_id, entry.group_others);
                Some(GroupId(group_id))
            }
            _ => None,
        };
        let sent = Sent {
            client_msg_id: entry.send.client_msg_id,
            to_user: UserId(entry.send.to_user.unwrap_or_default()),
            server_ts_ms: ok.server_ts_ms,
            duplicate: ok.duplicate,
            group_id,
            group_seq: group_id.map(|_| ok.group_seq),
        };
        debug!(seq, client_msg_id = %sent.client_msg_id, "sent");
        match self.waiters.remove(&seq) {
            Some(waiter) if !waiter.is_closed() => {
                let _ = waiter.send(Ok(sent));
            }
            _ => self.emit(Event::Sent(sent)),
        }
    }

    /// Outbox entry `seq` failed for good.
    pub(super) fn fail(&mut self, seq: u64, error: Error) {
        let Some(entry) = self.queue.remove(seq) else {
            return;
        };
        if self.store.is_some() {
            self.removals.push(seq);
        }
        match self.waiters.remove(&seq) {
            Some(waiter) if !waiter.is_closed() => {
                debug!(seq, client_msg_id = %entry.send.client_msg_id, %error, "send failed");
                let _ = waiter.send(Err(error));
            }
            _ => {
                warn!(seq, client_msg_id = %entry.send.client_msg_id, %error, "send failed; its caller is gone");
                self.emit(Event::SendFailed {
                    client_msg_id: entry.send.client_msg_id,
                    to_user: entry.send.to_user.map(UserId),
                    error,
                });
            }
        }
    }

    pub(super) async fn flush_removals(&mut self) {
        self.flush_retained().await;
        if self.removals.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.removals);
        if let Some(store) = &self.store {
            let store = Arc::clone(store);
            let removed = tokio::task::spawn_blocking(move || store.remove(&seqs))
                .await
                .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
            if let Err(e) = removed {
                // Harmless: the send is resent at the next start and the
                // server answers it as a duplicate.
                warn!(error = %e, "cannot remove acknowledged sends from the outbox");
            }
        }
    }

    /// The kept sends (see `outbox::Retained`): the outbox files of sends
    /// that got their ✓ move there, delivered ones go, and the ones the
    /// server reported undelivered are sent again, once.
    async fn flush_retained(&mut self) {
        if self.retirements.is_empty() && self.forgets.is_empty() && self.undelivered.is_empty() {
            return;
        }
        let retirements = std::mem::take(&mut self.retirements);
        let forgets = std::mem::take(&mut self.forgets);
        let notices = std::mem::take(&mut self.undelivered);
        let ids: Vec<String> = notices
            .iter()
            .flat_map(|n| n.client_msg_ids.iter().cloned())
            .collect();
        let retained = self.retained_store().await;
        let taken: Vec<Option<PendingSend>> = match (self.store.clone(), retained) {
            (Some(store), Some(retained)) => tokio::task::spawn_blocking(move || {
                for (seq, id) in retirements {
                    if let Err(e) = retained.keep(&store, seq, &id) {
                        warn!(error = %e, "cannot keep a sent message for a resend");
                        let _ = store.remove(&[seq]);
                    }
                }
                for id in forgets {
                    let _ = retained.forget(&id);
                }
                ids.iter()
                    .map(|id| retained.take(id).ok().flatten())
                    .collect()
            })
            .await
            .unwrap_or_default(),
            (store, _) => {
                if let Some(store) = store {
                    // Nowhere to keep them: gone like any acknowledged send.
                    let seqs: Vec<u64> = retirements.iter().map(|(seq, _)| *seq).collect();
                    let _ = tokio::task::spawn_blocking(move || store.remove(&seqs)).await;
                }
                for id in &forgets {
                    self.retained_mem.remove(id);
                }
                ids.iter().map(|id| self.retained_mem.remove(id)).collect()
            }
        };
        let mut taken = taken.into_iter();
        for notice in notices {
            let mut resending = Vec::new();
            for id in &notice.client_msg_ids {
                let Some(Some(send)) = taken.next() else {
                    continue;
                };
                if send.resent || send.to_user != Some(notice.to_user) {
                    continue;
                }
                let resend = PendingSend {
                    seq: self.queue.alloc_seq(),
                    never_sent: false,
                    resent: true,
                    ..send
                };
                // Nobody waits for it: its ✓ comes as `Event::Sent`.
                let (reply, _) = oneshot::channel();
                self.admitting.push((resend, reply));
                resending.push(id.clone());
            }
            info!(
                to_user = notice.to_user,
                undelivered = notice.client_msg_ids.len(),
                resending = resending.len(),
                "messages never delivered (the recipient's devices were replaced)"
            );
            let phone = self
                .phones
                .get(&notice.to_user)
                .cloned()
                .unwrap_or_default();
            self.emit(Event::Undelivered {
                to_user: UserId(notice.to_user),
                phone,
                client_msg_ids: notice.client_msg_ids,
                resending,
            });
        }
        self.admit().await;
    }

    /// The on-disk store of kept sends, opened on first use; `None` without
    /// an outbox directory (or if it cannot be opened).
    async fn retained_store(&mut self) -> Option<Arc<Retained>> {
        if self.retained.is_none()
            && let Some(store) = self.store.clone()
        {
            match tokio::task::spawn_blocking(move || Retained::open(&store)).await {
                Ok(Ok(r)) => self.retained = Some(Arc::new(r)),
                Ok(Err(e)) => warn!(error = %e, "cannot open the store of sent messages"),
                Err(e) => warn!(error = %e, "cannot open the store of sent messages"),
            }
        }
        self.retained.clone()
    }
}

/// Holds outbox entry `seq` while the key bundles of `users` are fetched
/// (one `FetchBundles` each, all on the wire at once); it is ready again
/// when the last answer is in.
pub(super) fn fetch_bundles(link: &mut Link, entry: &mut Entry, seq: u64, users: Vec<u64>) {
    entry.state = State::Resolving;
    entry.fetches = users.len();
    entry.key_wait = false;
    for user in users {
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::FetchBundles(pb::FetchBundles {
                user_id: user,
                identities_only: false,
            })),
        });
        link.in_flight.insert(id, InFlight::Fetch { seq, user });
        link.sends_in_flight += 1;
    }
}
