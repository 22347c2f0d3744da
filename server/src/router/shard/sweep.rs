//! The expiry sweep: expired queue entries, group payloads, dedup days and
//! link codes.

use super::Shard;
use crate::clock::now_ms;
use crate::router::shard_of_phone;
use crate::store::{AccountOp, PayloadOp};

/// Most entries the expiry sweep removes per tick, so one sweep never
/// stalls a shard for long; the next tick continues.
const SWEEP_LIMIT: usize = 10_000;

impl Shard {
    pub(super) fn sweep(&mut self) {
        let now = now_ms();
        // Dedup records expire in whole day keyspaces shared by all
        // shards; one shard drops them.
        if self.id == 0 {
            match self
                .store
                .expire_dedup(now.saturating_sub(self.cfg.dedup_window_ms))
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(buckets = n, "expired dedup records dropped"),
                Err(e) => tracing::warn!(error = %e, "dedup sweep failed"),
            }
        }
        match self
            .store
            .expired_entries(now.saturating_sub(self.cfg.queue_ttl_ms), SWEEP_LIMIT)
        {
            Ok(list) => {
                for (device, seq) in list {
                    if self.owns_user(device.user) {
                        self.stage_dequeue(device, seq, None);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "queue expiry sweep failed"),
        }
        // Group payloads outlive no entry that references them: entries
        // expire after the same TTL.
        match self
            .store
            .expired_payloads(now.saturating_sub(self.cfg.queue_ttl_ms), SWEEP_LIMIT)
        {
            Ok(ids) => {
                for id in ids {
                    if self.owns_user(id.owner) {
                        self.stage(PayloadOp::Delete(id));
                        metrics::counter!(
                            crate::telemetry::GROUP_PAYLOADS_COLLECTED,
                            "reason" => "expired"
                        )
                        .increment(1);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "payload sweep failed"),
        }
        match self.store.expired_link_codes(now, SWEEP_LIMIT) {
            Ok(codes) => {
                for code in codes {
                    if shard_of_phone(&code, self.shards) == self.id {
                        self.stage(AccountOp::DeleteLinkCode(code));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "link code sweep failed"),
        }
    }
}

// ------------------------------------------------------------ the Router side

/// The `Router` methods that hand this concern's commands to the shards.
mod router_side {
    use super::super::{Command, Queued};

    impl crate::router::Router {
        /// Asks every shard to run its expiry sweep (skipped by busy shards).
        pub fn sweep(&self) {
            for shard in self.local() {
                // Overflow policy: a full inbox means the shard is busy; the
                // sweep simply waits for the next tick.
                let _ = shard.try_send(Queued::new(Command::Sweep));
            }
        }
    }
}
