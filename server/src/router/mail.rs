//! Durable mail between shards: an entry one shard must queue for a user
//! another shard owns (today: the `Undelivered` notices of a
//! re-registration, for the senders of the messages it discarded; next:
//! group fan-out).
//!
//! The sending shard stores the mail ([`MailOp::Put`]) in the same batch as
//! the change that owes it, so the two commit or fail together. After the
//! commit it posts the mail to the owning shard's inbox; that shard queues
//! the entry for every device of the user, and after *its* commit posts a
//! `MailDone` back; only then is the mail deleted. A crash anywhere in
//! between leaves the record, which the owner's shard loads at start and
//! posts again. The receiving shard writes a dedup record for each mail it
//! applies (in the same batch as its entries), so mail posted again after a
//! lost confirmation or a restart is confirmed without being applied twice.
//!
//! Shards hold weak handles to each other's inboxes, so an inbox still
//! closes when the router is dropped.
//!
//! Overflow policy: shards never wait on each other (two shards waiting on
//! each other's full inbox would deadlock), so every post is a `try_send`.
//! A post that finds the inbox full, and one unanswered after
//! [`RESEND_AFTER`], is posted again on the next tick (`Router::tick`,
//! every few seconds). The mail waits in the store meanwhile, so a full
//! inbox delays it and never loses it; memory holds one small record per
//! piece of mail not yet delivered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::shard::{Command, Queued};
use crate::store::{MailOp, MailRecord, UserId};

/// Time to wait for `MailDone` before posting mail again.
pub(super) const RESEND_AFTER: Duration = Duration::from_secs(10);

/// One piece of mail: `(owner, id)` is unique.
pub(super) type MailId = (UserId, u64);

#[derive(Debug)]
struct Outgoing {
    record: MailRecord,
    /// When last posted; `None`: not yet (or the inbox was full).
    posted: Option<Instant>,
}

/// A shard's mail: what it sent and awaits confirmation for, and what it
/// received and applied.
#[derive(Debug, Default)]
pub(super) struct Mailroom {
    /// Committed and not yet confirmed.
    pending: BTreeMap<MailId, Outgoing>,
    /// Staged in the current batch.
    staged: Vec<(MailId, MailRecord)>,
    /// Received mail applied in the current batch: confirm after commit.
    applied: Vec<(usize, MailId)>,
    /// Next id for mail from this shard (unique per owner: time-based).
    next_id: u64,
    /// Whether the mail left by an earlier run was loaded.
    loaded: bool,
}

impl Mailroom {
    /// Stages mail to `record.to_user` on behalf of `owner`: returns the
    /// write to add to the batch.
    pub(super) fn stage(&mut self, owner: UserId, record: MailRecord, now_ms: u64) -> MailOp {
        // Millisecond time in the high bits keeps ids rising across
        // restarts; the low bits count within a millisecond.
        let id = (now_ms << 20).max(self.next_id);
        self.next_id = id + 1;
        self.staged.push(((owner, id), record.clone()));
        MailOp::Put {
            owner,
            id,
            record: Box::new(record),
        }
    }

    /// Loads the mail an earlier run left (`owned` says which owners are
    /// this shard's). Done once; an error is retried on the next tick.
    pub(super) fn load(
        &mut self,
        stored: Vec<(UserId, u64, MailRecord)>,
        owned: impl Fn(UserId) -> bool,
    ) {
        for (owner, id, record) in stored {
            if owned(owner) {
                self.next_id = self.next_id.max(id + 1);
                self.pending.insert(
                    (owner, id),
                    Outgoing {
                        record,
                        posted: None,
                    },
                );
            }
        }
        if !self.pending.is_empty() {
            tracing::info!(mail = self.pending.len(), "undelivered shard mail loaded");
        }
        self.loaded = true;
    }

    pub(super) fn loaded(&self) -> bool {
        self.loaded
    }

    /// Received mail from shard `from` was applied in this batch.
    pub(super) fn applied(&mut self, from: usize, id: MailId) {
        self.applied.push((from, id));
    }

    /// Own mail `id` was delivered: returns the deletion to stage, if it
    /// was pending.
    pub(super) fn done(&mut self, id: MailId) -> Option<MailOp> {
        self.pending.remove(&id).map(|_| MailOp::Delete {
            owner: id.0,
            id: id.1,
        })
    }

    /// The batch committed (`ok`) or failed: posts staged mail and
    /// confirmations on success, forgets them on failure.
    pub(super) fn after_commit(
        &mut self,
        ok: bool,
        me: usize,
        peers: &[mpsc::WeakSender<Queued>],
        shard_of: impl Fn(UserId) -> usize,
    ) {
        let staged = std::mem::take(&mut self.staged);
        let applied = std::mem::take(&mut self.applied);
        if !ok {
            return;
        }
        for (id, record) in staged {
            self.pending.insert(
                id,
                Outgoing {
                    record,
                    posted: None,
                },
            );
        }
        for (from, id) in applied {
            confirm(peers, from, id);
        }
        self.post(me, peers, shard_of, Instant::now());
    }

    /// Drops what was staged (the shard restarts from the store).
    pub(super) fn discard_staged(&mut self) {
        self.staged.clear();
        self.applied.clear();
    }

    /// Posts every pending mail not posted yet or unanswered for
    /// [`RESEND_AFTER`].
    pub(super) fn post(
        &mut self,
        me: usize,
        peers: &[mpsc::WeakSender<Queued>],
        shard_of: impl Fn(UserId) -> usize,
        now: Instant,
    ) {
        for (&(owner, id), out) in &mut self.pending {
            if out
                .posted
                .is_some_and(|at| now.duration_since(at) < RESEND_AFTER)
            {
                continue;
            }
            let Some(peer) = peers
                .get(shard_of(out.record.to_user))
                .and_then(mpsc::WeakSender::upgrade)
            else {
                continue;
            };
            let cmd = Command::Mail {
                from: me,
                owner,
                id,
                record: out.record.clone(),
            };
            match peer.try_send(Queued::new(cmd)) {
                Ok(()) => out.posted = Some(now),
                // Full: the next tick tries again. Closed: shutting down.
                Err(_) => return,
            }
        }
    }

    /// Mail sent and not yet confirmed.
    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Tells shard `to` that its mail `id` was applied. Lost if that inbox is
/// full: the mail is then posted again and found applied.
pub(super) fn confirm(peers: &[mpsc::WeakSender<Queued>], to: usize, id: MailId) {
    if let Some(peer) = peers.get(to).and_then(mpsc::WeakSender::upgrade) {
        let _ = peer.try_send(Queued::new(Command::MailDone { id }));
    }
}
