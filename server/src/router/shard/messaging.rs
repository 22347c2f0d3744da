//! Messages and receipts into device queues: dedup, the device check,
//! quotas, order holds, staging, and the ✓ (now or after the commit).

use std::collections::BTreeSet;

use switchboard_proto::pb;

use super::{
    Answer, ENTRY_OVERHEAD_BYTES, PendingAnswer, QUEUE_FULL_RETRY_AFTER_MS, Shard, ToConn,
    reply_now,
};
use crate::clock::now_ms;
use crate::router::order::{HeldBy, Part};
use crate::router::{Reply, RouteError, SendAccepted, SendReply, SendRequest};
use crate::store::{DedupKey, DedupOp, DedupRecord, DeviceKey, Recipient, UserId};

/// The hold key of a send part stored for `owner`'s devices: the recipient's
/// part when `owner` is the recipient (or a note to self), else the
/// sender's own part.
fn order_key(req: &SendRequest, owner: UserId) -> (DeviceKey, UserId, Part) {
    let part = if owner == req.to_user {
        Part::Peer
    } else {
        Part::Own
    };
    (req.from, req.to_user, part)
}

/// Checks that `payloads` address exactly the devices `expected` yields
/// (devices of `user`).
fn check_devices<I>(
    user: UserId,
    expected: I,
    payloads: &[pb::DevicePayload],
) -> Result<(), RouteError>
where
    I: Iterator<Item = u32> + Clone,
{
    // The usual case, without building sets (a few devices at most): one
    // payload per expected device, none twice.
    if payloads.len() == expected.clone().count()
        && payloads.iter().enumerate().all(|(i, p)| {
            expected.clone().any(|d| d == p.device_id)
                && payloads.iter().take(i).all(|q| q.device_id != p.device_id)
        })
    {
        return Ok(());
    }
    let expected: BTreeSet<u32> = expected.collect();
    let addressed: BTreeSet<u32> = payloads.iter().map(|p| p.device_id).collect();
    if expected == addressed {
        return Ok(());
    }
    Err(RouteError::DeviceMismatch {
        user,
        missing: expected.difference(&addressed).copied().collect(),
        stale: addressed.difference(&expected).copied().collect(),
    })
}

impl Shard {
    pub(super) fn send(&mut self, req: SendRequest) -> Answer {
        let key = DedupKey {
            to: Recipient::User(req.to_user),
            from: req.from,
            client_msg_id: req.client_msg_id.clone(),
        };
        let order = (req.from, req.to_user, Part::Peer);
        if let Some(duplicate) = self.answer_duplicate(&key, req.first_attempt) {
            // A refused send whose writes reached the store anyway (a
            // cluster backend may keep part of a failed commit) is answered
            // from its record, and that answer ends its hold.
            self.holds.release(order, &req.client_msg_id);
            return duplicate;
        }
        if let Err(e) = self.holds.check(order, &req.client_msg_id, now_ms()) {
            return Answer::now(Err(e));
        }
        // A note to self goes to the sender's other devices.
        let to_self = req.to_user == req.from.user;
        let checked = match self.user(req.to_user) {
            Ok(Some(u)) => check_devices(
                req.to_user,
                u.devices
                    .iter()
                    .map(|d| d.device_id)
                    .filter(|d| !to_self || *d != req.from.device),
                &req.payloads,
            ),
            Ok(None) => Err(RouteError::UnknownUser),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = checked {
            return Answer::now(Err(e));
        }
        self.store_send(&req, req.to_user, key, true)
    }

    /// A send whose sender lives on this shard too: both parts in this
    /// batch, one answer once both are durable.
    pub(super) fn send_with_copies(&mut self, req: SendRequest, copies: SendRequest) -> Answer {
        // The usual case: a sender with one device and nothing for itself.
        // Its part would be answered at once with nothing stored, so the
        // answer is the recipient's part's.
        if copies.payloads.is_empty() && self.sole_device(copies.from) {
            return self.send(req);
        }
        let peer = self.send(req);
        let own = self.send_self(copies);
        Answer {
            result: crate::router::joint_answer(peer.result, Some(own.result)),
            after_commit: peer.after_commit || own.after_commit,
        }
    }

    /// The sender's copies of a send for its other devices; `req.to_user`
    /// is the conversation peer.
    pub(super) fn send_self(&mut self, req: SendRequest) -> Answer {
        let me = req.from.user;
        let (alone, checked) = match self.user(me) {
            Ok(Some(u)) => {
                let mine = u
                    .devices
                    .iter()
                    .map(|d| d.device_id)
                    .filter(|d| *d != req.from.device);
                (
                    mine.clone().next().is_none(),
                    check_devices(me, mine, &req.payloads),
                )
            }
            // The sender's own account vanished (re-registered meanwhile).
            Ok(None) => return Answer::now(Err(RouteError::Unauthenticated)),
            Err(e) => return Answer::now(Err(e.into())),
        };
        if alone && req.payloads.is_empty() {
            // A single-device user: nothing to store, so nothing to
            // deduplicate either (the recipient's part is the record).
            return Answer::now(Ok(SendAccepted {
                server_ts_ms: now_ms(),
                duplicate: false,
            }));
        }
        let key = DedupKey {
            to: Recipient::User(me),
            from: req.from,
            client_msg_id: req.client_msg_id.clone(),
        };
        let order = (req.from, req.to_user, Part::Own);
        if let Some(duplicate) = self.answer_duplicate(&key, req.first_attempt) {
            self.holds.release(order, &req.client_msg_id);
            return duplicate;
        }
        if let Err(e) = self.holds.check(order, &req.client_msg_id, now_ms()) {
            return Answer::now(Err(e));
        }
        if let Err(e) = checked {
            return Answer::now(Err(e));
        }
        self.store_send(&req, me, key, false)
    }

    /// The answer to a retry of an accepted send (after the commit if the
    /// original is in this batch); `None` when the send is new. A
    /// `first_attempt` is looked for in this batch only: the store lookup is
    /// a memtable search, about a tenth of the shard's time per message.
    fn answer_duplicate(&mut self, key: &DedupKey, first_attempt: bool) -> Option<Answer> {
        let (server_ts_ms, staged) = if let Some(ts) = self.staged_dedup.get(key) {
            (*ts, true)
        } else if first_attempt {
            return None;
        } else {
            match self.store.dedup(key) {
                Ok(Some(rec)) if !rec.voided => (rec.server_ts_ms, false),
                Ok(Some(_)) => return None,
                Ok(None) => return None,
                Err(e) => return Some(Answer::now(Err(e.into()))),
            }
        };
        Some(Answer {
            result: Ok(SendAccepted {
                server_ts_ms,
                duplicate: true,
            }),
            after_commit: staged,
        })
    }

    /// Stages a validated send: one entry per payload for the devices of
    /// `owner` and the dedup record; the ✓ once committed.
    fn store_send(
        &mut self,
        req: &SendRequest,
        owner: UserId,
        key: DedupKey,
        count_in: bool,
    ) -> Answer {
        let now = now_ms();
        // Check every queue's quota, then reserve every seq (both
        // fallible), then stage (infallible), so a refusal or a storage
        // error never leaves half a send staged.
        let overhead =
            ENTRY_OVERHEAD_BYTES + (req.from_phone.len() + req.client_msg_id.len()) as u64;
        if let Err(e) = self.check_quota(req.payloads.iter().map(|p| {
            (
                DeviceKey {
                    user: owner,
                    device: p.device_id,
                },
                p.payload.len() as u64 + overhead,
            )
        })) {
            self.holds.hold(
                order_key(req, owner),
                &req.client_msg_id,
                HeldBy::QueueFull,
                QUEUE_FULL_RETRY_AFTER_MS,
                now,
            );
            return Answer::now(Err(e));
        }
        let mut seqs = Vec::with_capacity(req.payloads.len());
        for p in &req.payloads {
            let device = DeviceKey {
                user: owner,
                device: p.device_id,
            };
            match self.next_seq(device) {
                Ok(seq) => seqs.push((device, seq)),
                Err(e) => return Answer::now(Err(e.into())),
            }
        }
        for ((device, seq), p) in seqs.into_iter().zip(&req.payloads) {
            let body = pb::queue_entry::Body::Message(pb::Message {
                from_user: req.from.user,
                from_device: req.from.device,
                from_phone: req.from_phone.clone(),
                client_msg_id: req.client_msg_id.clone(),
                payload: p.payload.clone(),
                to_user: req.to_user,
                group_id: req.group_id,
            });
            self.stage_entry(device, seq, now, body);
        }
        self.batch_sends
            .push((order_key(req, owner), req.client_msg_id.clone()));
        self.staged_dedup.insert(key.clone(), now);
        self.stage(DedupOp::Put {
            key,
            record: DedupRecord {
                server_ts_ms: now,
                accepted_ms: now,
                voided: false,
                group_seq: 0,
            },
        });
        if count_in {
            self.messages_in += 1;
        }
        Answer {
            result: Ok(SendAccepted {
                server_ts_ms: now,
                duplicate: false,
            }),
            after_commit: true,
        }
    }

    /// Gives a send's answer to its connection: now, or once the batch
    /// commits (then a failed commit turns a ✓ into the storage error).
    pub(super) fn answer_send(&mut self, reply: SendReply, from: DeviceKey, answer: Answer) {
        match reply {
            SendReply::Ticket(reply) if answer.after_commit => {
                self.after_commit(reply, answer.result);
            }
            SendReply::Ticket(reply) => reply_now(reply, answer.result),
            SendReply::Queued { to, submitted } => {
                let pending = PendingAnswer {
                    device: from,
                    to,
                    submitted,
                    result: answer.result,
                };
                if answer.after_commit {
                    self.send_answers.push(pending);
                } else {
                    self.push_answer(pending);
                }
            }
        }
    }

    /// Pushes a send's answer to the connection that submitted it, if that
    /// connection is still the device's registered one.
    pub(super) fn push_answer(&mut self, answer: PendingAnswer) {
        if answer.result.is_ok() {
            self.metrics
                .send_ack_seconds
                .record(answer.submitted.elapsed().as_secs_f64());
        }
        if self
            .online
            .get(&answer.device)
            .is_some_and(|o| o.conn_id == answer.to.conn_id)
        {
            self.push(
                answer.device,
                ToConn::SendAnswer {
                    frame: answer.to.frame,
                    result: answer.result.map_err(Box::new),
                },
            );
        }
    }

    pub(super) fn enqueue_receipt(
        &mut self,
        to_user: UserId,
        receipt: pb::Receipt,
        must_exist: bool,
        reply: Reply<()>,
    ) {
        match self.stage_receipt(to_user, &receipt, must_exist) {
            Ok(()) => self.after_commit(reply, Ok(())),
            Err(e) => reply_now(reply, Err(e)),
        }
    }

    /// Stages `receipt` in the queue of every device of `to_user`. An
    /// unknown user is an error with `must_exist`, else nothing to do (the
    /// account is gone).
    pub(super) fn stage_receipt(
        &mut self,
        to_user: UserId,
        receipt: &pb::Receipt,
        must_exist: bool,
    ) -> Result<(), RouteError> {
        let now = now_ms();
        let devices: Vec<u32> = match self.user(to_user)? {
            Some(u) => u.devices.iter().map(|d| d.device_id).collect(),
            None if must_exist => return Err(RouteError::UnknownUser),
            None => return Ok(()),
        };
        // A client's READ receipt is held to the quota of the queues it
        // goes to, like a message. Delivery receipts (made by the server
        // from acks) are never refused: the acked entries go only once
        // their receipt is stored.
        if must_exist {
            let size = ENTRY_OVERHEAD_BYTES
                + receipt
                    .client_msg_ids
                    .iter()
                    .map(|m| m.len() as u64 + 2)
                    .sum::<u64>();
            self.check_quota(devices.iter().map(|&d| {
                (
                    DeviceKey {
                        user: to_user,
                        device: d,
                    },
                    size,
                )
            }))?;
        }
        let mut seqs = Vec::with_capacity(devices.len());
        for d in devices {
            let device = DeviceKey {
                user: to_user,
                device: d,
            };
            seqs.push((device, self.next_seq(device)?));
        }
        for (device, seq) in seqs {
            self.stage_entry(
                device,
                seq,
                now,
                pb::queue_entry::Body::Receipt(receipt.clone()),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(devices: &[u32]) -> Vec<pb::DevicePayload> {
        devices
            .iter()
            .map(|&device_id| pb::DevicePayload {
                device_id,
                ..Default::default()
            })
            .collect()
    }

    fn check(expected: &[u32], addressed: &[u32]) -> Result<(), RouteError> {
        check_devices(7, expected.iter().copied(), &payloads(addressed))
    }

    #[test]
    fn devices_match_in_any_order() {
        assert!(check(&[1], &[1]).is_ok());
        assert!(check(&[1, 2, 3], &[3, 1, 2]).is_ok());
        assert!(check(&[], &[]).is_ok());
    }

    #[test]
    fn a_mismatch_names_the_missing_and_the_stale_devices() {
        let mismatch = |expected: &[u32], addressed: &[u32]| match check(expected, addressed) {
            Err(RouteError::DeviceMismatch {
                user,
                missing,
                stale,
            }) => (user, missing, stale),
            other => panic!("{expected:?} vs {addressed:?}: {other:?}"),
        };
        assert_eq!(mismatch(&[1, 2], &[1]), (7, vec![2], vec![]));
        assert_eq!(mismatch(&[1], &[1, 4]), (7, vec![], vec![4]));
        assert_eq!(mismatch(&[1, 2], &[1, 3]), (7, vec![2], vec![3]));
        // As many payloads as devices, but one device twice.
        assert_eq!(mismatch(&[1, 2], &[1, 1]), (7, vec![2], vec![]));
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::Command;
    use super::*;
    use crate::router::{AnswerTo, SendTicket, shard_of_user};
    use tokio::sync::oneshot;

    impl crate::router::Router {
        /// Hands a send to the recipient's shard and the sender's copies for its
        /// other devices (`copies`, whose `to_user` names the conversation
        /// peer) to the sender's shard. Returns once both are in their inboxes
        /// (so sends from one connection keep their order). When one shard owns
        /// both users (always, with one shard), the ✓ comes once both parts are
        /// durable as a [`ToConn::SendAnswer`] for frame `to.frame` through the
        /// connection's push queue, and this returns `None`; otherwise the
        /// returned [`SendTicket`] yields it.
        ///
        /// When both users live on the same shard the two parts travel as one
        /// command and are stored in one batch.
        ///
        /// # Errors
        /// [`RouteError::Overloaded`] or [`RouteError::ShuttingDown`]. If the
        /// copies could not be queued, the recipient's part may still be
        /// stored; a retry of the send is answered as a duplicate.
        pub async fn submit_send(
            &self,
            req: SendRequest,
            copies: Option<SendRequest>,
            to: AnswerTo,
        ) -> Result<Option<SendTicket>, RouteError> {
            let n = self.local().len();
            let shard = self.user_shard(req.to_user);
            // Forwarded sends always take the two-part path: the serving
            // node's shard count is not known here.
            if !self.is_forwarding()
                && shard_of_user(req.from.user, n) == shard_of_user(req.to_user, n)
            {
                self.enqueue(
                    shard,
                    Command::Send {
                        req,
                        copies,
                        reply: SendReply::Queued {
                            to,
                            submitted: std::time::Instant::now(),
                        },
                    },
                )
                .await?;
                return Ok(None);
            }
            let (tx, peer) = oneshot::channel();
            match copies {
                Some(copies) => {
                    self.enqueue(
                        shard,
                        Command::Send {
                            req,
                            copies: None,
                            reply: SendReply::Ticket(tx),
                        },
                    )
                    .await?;
                    let (own_tx, own) = oneshot::channel();
                    let own_shard = self.user_shard(copies.from.user);
                    self.enqueue(
                        own_shard,
                        Command::SendSelf {
                            req: copies,
                            reply: own_tx,
                        },
                    )
                    .await?;
                    Ok(Some(SendTicket {
                        peer,
                        own: Some(own),
                    }))
                }
                None => {
                    self.enqueue(
                        shard,
                        Command::Send {
                            req,
                            copies: None,
                            reply: SendReply::Ticket(tx),
                        },
                    )
                    .await?;
                    Ok(Some(SendTicket { peer, own: None }))
                }
            }
        }

        /// Hands one part of a `SendGroupKeys` (or any send without copies)
        /// to the recipient's shard; the ticket yields its ✓.
        ///
        /// # Errors
        /// [`RouteError::Overloaded`] or [`RouteError::ShuttingDown`].
        pub async fn submit_part(&self, req: SendRequest) -> Result<SendTicket, RouteError> {
            let (tx, peer) = oneshot::channel();
            self.enqueue(
                self.user_shard(req.to_user),
                Command::Send {
                    req,
                    copies: None,
                    reply: SendReply::Ticket(tx),
                },
            )
            .await?;
            Ok(SendTicket { peer, own: None })
        }

        /// Durably queues a receipt for every device of `to_user`. With
        /// `must_exist`, an unknown user is an error; otherwise the receipt is
        /// dropped (the sender's account is gone).
        ///
        /// # Errors
        /// [`RouteError::UnknownUser`], storage, shutdown.
        pub async fn enqueue_receipt(
            &self,
            to_user: UserId,
            receipt: pb::Receipt,
            must_exist: bool,
        ) -> Result<(), RouteError> {
            self.call(self.user_shard(to_user), |reply| Command::EnqueueReceipt {
                to_user,
                receipt,
                must_exist,
                reply,
            })
            .await
        }
    }
}
