//! Delivery to connected devices: authentication registers a connection
//! and starts draining its queue page by page; acks advance the drain and
//! turn into receipts; entries committed for a caught-up device are pushed.

use prost::Message;
use switchboard_proto::pb;

use super::{Drain, KickReason, Notice, Online, OwedReceipt, Shard, ToConn, reply_now};
use crate::FastSet;
use crate::accounts;
use crate::clock::now_ms;
use crate::router::{AuthInfo, ConnLink, Reply, RouteError, TrySendError};
use crate::store::DeviceKey;
use crate::telemetry as tm;

impl Shard {
    pub(super) fn authenticate(
        &mut self,
        device: DeviceKey,
        credential: &[u8],
        link: ConnLink,
        reply: Reply<AuthInfo>,
    ) {
        let (phone, primary, devices) = match self.user(device.user) {
            Ok(Some(u)) => {
                let found = u.devices.iter().find(|d| {
                    d.device_id == device.device
                        && accounts::hashes_equal(
                            &accounts::credential_hash(credential),
                            &d.credential_hash,
                        )
                });
                let devices = u.devices.iter().map(|d| d.device_id).collect();
                match found {
                    Some(d) => (u.phone.clone(), d.primary, devices),
                    None => return reply_now(reply, Err(RouteError::Unauthenticated)),
                }
            }
            Ok(None) => return reply_now(reply, Err(RouteError::Unauthenticated)),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        let (has_keys, one_time_keys) = match self.device_keys(device) {
            Ok(Some(k)) => (k.identity.is_some(), k.one_time_keys),
            Ok(None) => (false, 0),
            Err(e) => return reply_now(reply, Err(e.into())),
        };
        if let Some(old) = self.online.remove(&device) {
            old.kick(KickReason::Replaced);
        }
        self.online.insert(
            device,
            Online {
                conn_id: link.conn_id,
                push: link.push,
                drain: Drain::Draining {
                    cursor: 0,
                    inflight: FastSet::default(),
                },
            },
        );
        reply_now(
            reply,
            Ok(AuthInfo {
                phone,
                primary,
                has_keys,
                one_time_keys,
                devices,
            }),
        );
        self.drain_next(device);
    }

    fn acked(&mut self, device: DeviceKey, conn_id: u64, seqs: &[u64]) {
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        if online.conn_id != conn_id {
            return;
        }
        if let Drain::Draining { inflight, .. } = &mut online.drain {
            for s in seqs {
                inflight.remove(s);
            }
            if inflight.is_empty() {
                self.drain_advanced = true;
                self.drain_next(device);
            }
        }
    }

    /// Pushes the next page of a draining device's queue, or `UpToDate`.
    fn drain_next(&mut self, device: DeviceKey) {
        let cursor = match self.online.get(&device) {
            Some(Online {
                drain: Drain::Draining { cursor, inflight },
                ..
            }) if inflight.is_empty() => *cursor,
            _ => return,
        };
        let cutoff = now_ms().saturating_sub(self.cfg.queue_ttl_ms);
        let mut cursor = cursor;
        let mut page = Vec::new();
        // Skip pages that held only expired entries (they are deleted in this
        // batch) until a live entry or the end of the queue: declaring the
        // device up to date early would let newer entries overtake older ones.
        loop {
            let stored = match self.store.read_queue(device, cursor, self.cfg.drain_batch) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, ?device, "queue read failed; closing connection");
                    if let Some(online) = self.online.remove(&device) {
                        online.kick(KickReason::Unavailable);
                    }
                    return;
                }
            };
            let Some(last) = stored.last() else {
                break;
            };
            cursor = last.seq;
            for s in stored {
                let size = s.bytes.len() as u64;
                match pb::QueueEntry::decode(s.bytes) {
                    Ok(mut e) if e.server_ts_ms >= cutoff => {
                        // A group message is stored as a reference to its
                        // payload: send it whole; gone (expired): drop it.
                        if let Some(pb::queue_entry::Body::GroupMessage(reference)) = &e.body {
                            match self.resolve_group_message(reference) {
                                Ok(Some(whole)) => {
                                    e.body = Some(pb::queue_entry::Body::GroupMessage(whole));
                                }
                                Ok(None) => {
                                    self.stage_dequeue(device, s.seq, Some(size));
                                    continue;
                                }
                                Err(err) => {
                                    tracing::error!(error = %err, ?device, "group payload read failed; closing connection");
                                    if let Some(online) = self.online.remove(&device) {
                                        online.kick(KickReason::Unavailable);
                                    }
                                    return;
                                }
                            }
                        }
                        page.push(e);
                    }
                    Ok(_) => self.stage_dequeue(device, s.seq, Some(size)),
                    Err(e) => {
                        tracing::error!(error = %e, ?device, seq = s.seq, "corrupt queue entry dropped");
                        self.stage_dequeue(device, s.seq, Some(size));
                    }
                }
            }
            if !page.is_empty() {
                break;
            }
        }
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        if page.is_empty() {
            online.drain = Drain::Live;
            self.push(device, ToConn::Notice(Notice::UpToDate));
        } else {
            online.drain = Drain::Draining {
                cursor,
                inflight: page.iter().map(|e| e.seq).collect(),
            };
            self.push(device, ToConn::Deliver(page.into_boxed_slice()));
        }
    }

    pub(super) fn push_live(&mut self, device: DeviceKey, entries: Vec<pb::QueueEntry>) {
        if matches!(
            self.online.get(&device),
            Some(Online {
                drain: Drain::Live,
                ..
            })
        ) {
            self.push(device, ToConn::Deliver(entries.into_boxed_slice()));
        }
    }

    pub(super) fn push(&mut self, device: DeviceKey, push: ToConn) {
        let Some(online) = self.online.get_mut(&device) else {
            return;
        };
        match online.push.try_send(push) {
            Ok(()) => {}
            Err(TrySendError::Full) => {
                tracing::info!(?device, "push queue full; disconnecting slow reader");
                metrics::counter!(tm::SLOW_READER_DISCONNECTS).increment(1);
                if let Some(online) = self.online.remove(&device) {
                    online.kick(KickReason::SlowReader);
                }
            }
            Err(TrySendError::Gone) => {
                self.online.remove(&device);
            }
        }
    }

    /// Removes entries from a device's queue (releasing the group payloads
    /// they referenced).
    pub(super) fn delete(
        &mut self,
        device: DeviceKey,
        seqs: Vec<u64>,
        released: Vec<(u64, (crate::store::GroupId, u64))>,
    ) {
        for seq in seqs {
            self.stage_dequeue(device, seq, None);
        }
        self.release_references(device, released);
    }

    /// A device's ack (see `Command::Ack`).
    pub(super) fn ack(
        &mut self,
        device: DeviceKey,
        conn_id: u64,
        seqs: &[u64],
        delete: Vec<u64>,
        released: Vec<(u64, (crate::store::GroupId, u64))>,
        receipts: Vec<OwedReceipt>,
    ) {
        self.acked(device, conn_id, seqs);
        for seq in delete {
            self.stage_dequeue(device, seq, None);
        }
        self.release_references(device, released);
        for owed in receipts {
            match self.stage_receipt(owed.to_user, &owed.receipt, false) {
                Ok(()) => {
                    for seq in owed.message_seqs {
                        self.stage_dequeue(device, seq, None);
                    }
                    self.release_references(device, owed.released);
                }
                // The messages stay queued and are delivered again;
                // their receipt is owed until then.
                Err(e) => tracing::warn!(
                    error = %e,
                    "delivery receipt not stored; entries kept for redelivery"
                ),
            }
        }
    }

    /// Connection `conn_id` of `device` has ended (a newer one may have
    /// replaced it already).
    pub(super) fn disconnected(&mut self, device: DeviceKey, conn_id: u64) {
        if self
            .online
            .get(&device)
            .is_some_and(|o| o.conn_id == conn_id)
        {
            self.online.remove(&device);
        }
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;
    use crate::router::shard_of_user;

    impl crate::router::Router {
        /// Authenticates a connection as `device` and starts draining its queue
        /// into `link`. Returns the user's phone.
        ///
        /// # Errors
        /// [`RouteError::Unauthenticated`], storage.
        pub async fn authenticate(
            &self,
            device: DeviceKey,
            credential: Vec<u8>,
            link: ConnLink,
        ) -> Result<AuthInfo, RouteError> {
            self.call(self.user_shard(device.user), |reply| {
                Command::Authenticate {
                    device,
                    credential,
                    link,
                    reply,
                }
            })
            .await
        }

        /// A device's ack of `seqs` on connection `conn_id`: the receipt
        /// entries among them (`receipt_seqs`) are removed, and each sender in
        /// `owed` gets a delivery receipt, after which the message entries it
        /// covers are removed. For senders on the device's shard (all of them,
        /// with one shard) this is one command and one atomic batch. The
        /// receipts for senders on other shards come back, for the caller to
        /// queue ([`Router::enqueue_receipt`]) and only then [`Router::delete`]
        /// their messages.
        pub async fn ack(
            &self,
            device: DeviceKey,
            conn_id: u64,
            seqs: Vec<u64>,
            receipt_seqs: Vec<u64>,
            released: Vec<(u64, (crate::store::GroupId, u64))>,
            owed: Vec<OwedReceipt>,
        ) -> Vec<OwedReceipt> {
            let (local, remote): (Vec<_>, Vec<_>) = if self.is_forwarding() {
                // The serving node's shard count is not known here: every
                // receipt goes back to the caller, queued as its own request.
                (Vec::new(), owed)
            } else {
                let n = self.local().len();
                let mine = shard_of_user(device.user, n);
                owed.into_iter()
                    .partition(|o| shard_of_user(o.to_user, n) == mine)
            };
            self.post(
                self.user_shard(device.user),
                Command::Ack {
                    device,
                    conn_id,
                    seqs,
                    delete: receipt_seqs,
                    released,
                    receipts: local,
                },
            )
            .await;
            remote
        }

        /// Removes entries from a device's queue; `released` are the group
        /// payloads they referenced.
        pub async fn delete(
            &self,
            device: DeviceKey,
            seqs: Vec<u64>,
            released: Vec<(u64, (crate::store::GroupId, u64))>,
        ) {
            self.post(
                self.user_shard(device.user),
                Command::Delete {
                    device,
                    seqs,
                    released,
                },
            )
            .await;
        }

        /// Connection `conn_id` of `device` has ended.
        pub async fn disconnected(&self, device: DeviceKey, conn_id: u64) {
            self.post(
                self.user_shard(device.user),
                Command::Disconnected { device, conn_id },
            )
            .await;
        }
    }
}
