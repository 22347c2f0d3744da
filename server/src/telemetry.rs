//! Metrics: the names, their descriptions, and the Prometheus recorder.
//!
//! Code records through the `metrics` facade (`counter!`, `gauge!`,
//! `histogram!`); [`install`] puts one Prometheus recorder behind it for the
//! process and `/metrics` renders it. docs/OPERATIONS.md explains each metric
//! and what to do when it rises.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open sockets (handshaking or authenticated), by transport.
pub const CONNECTIONS: &str = "switchboard_connections";
/// Authenticated connections.
pub const AUTHENTICATED: &str = "switchboard_authenticated_connections";
/// Connections accepted, by transport; `rate()` gives connects/s.
pub const CONNECTIONS_ACCEPTED: &str = "switchboard_connections_accepted_total";
/// Handshakes that failed or timed out, by reason.
pub const HANDSHAKE_FAILURES: &str = "switchboard_handshake_failures_total";
/// Sends stored (new, not retries).
pub const MESSAGES_IN: &str = "switchboard_messages_in_total";
/// Message entries pushed to devices.
pub const MESSAGES_OUT: &str = "switchboard_messages_out_total";
/// Time from a Send frame to its ✓ (durable), in seconds.
pub const SEND_ACK_SECONDS: &str = "switchboard_send_ack_seconds";
/// Time from a message's acceptance to the recipient device's ack, seconds.
pub const DELIVERY_SECONDS: &str = "switchboard_delivery_seconds";
/// Errors answered to clients, by wire code.
pub const ERRORS: &str = "switchboard_errors_total";
/// Cluster mode: round trips to Redis on the commit path (a pipeline of
/// scripts counts one, each `WAIT` one).
pub const REDIS_ROUND_TRIPS: &str = "switchboard_cluster_redis_round_trips_total";
/// Cluster mode: script pipelines sent again with `apply.lua`'s body
/// because a Redis master did not have it cached (after its restart or a
/// failover).
pub const REDIS_SCRIPT_LOADS: &str = "switchboard_cluster_redis_script_loads_total";
/// Cluster mode: batches committed to the cluster store.
pub const CLUSTER_COMMITS: &str = "switchboard_cluster_commits_total";
/// Cluster mode: commands a node forwarded to the serving node.
pub const FORWARDED_COMMANDS: &str = "switchboard_cluster_forwarded_total";
/// Cluster mode: connections of this node attached again to the node now
/// serving (or to this node's own shards) after their link ended, by how:
/// `reattached`, or `kicked` (no serving node within the grace, or the new
/// owner refused the device).
pub const REATTACHED_CONNECTIONS: &str = "switchboard_cluster_reattached_total";
/// Cluster mode: node links up (on a forwarding node 0 or 1, its link to
/// the serving node; on the serving node, the links it serves).
pub const NODE_LINKS: &str = "switchboard_cluster_links";
/// Goodbyes sent before closing, by wire code.
pub const GOODBYES: &str = "switchboard_goodbyes_total";
/// Commands waiting in a shard's inbox, by shard.
pub const SHARD_INBOX_DEPTH: &str = "switchboard_shard_inbox_depth";
/// Time a command waited in a shard's inbox (the backlog's age), seconds.
pub const SHARD_INBOX_WAIT_SECONDS: &str = "switchboard_shard_inbox_wait_seconds";
/// Commands applied per storage batch.
pub const SHARD_BATCH_COMMANDS: &str = "switchboard_shard_batch_commands";
/// Writes per storage batch.
pub const STORE_BATCH_OPS: &str = "switchboard_store_batch_ops";
/// Time to commit a batch (including fsync when durable), seconds.
pub const STORE_COMMIT_SECONDS: &str = "switchboard_store_commit_seconds";
/// Batches the store failed to commit.
pub const STORE_COMMIT_FAILURES: &str = "switchboard_store_commit_failures_total";
/// Queue entries stored for offline devices (approximate).
pub const QUEUED_ENTRIES: &str = "switchboard_queued_entries";
/// Age of the oldest queue entry of each shard's devices.
pub const OLDEST_QUEUED_ENTRY_AGE: &str = "switchboard_oldest_queued_entry_age_seconds";
/// Shard mail sent and not yet confirmed (`router/mail.rs`).
pub const SHARD_MAIL_PENDING: &str = "switchboard_shard_mail_pending";
/// Group message payloads deleted, by why: every reference gone
/// (`released`) or past the queue TTL (`expired`).
pub const GROUP_PAYLOADS_COLLECTED: &str = "switchboard_group_payloads_collected_total";
/// Group entries left out of a member device's queue because it was at
/// its quota.
pub const GROUP_ENTRIES_DROPPED: &str = "switchboard_group_entries_dropped_total";
/// Requests dropped unprocessed because their deadline had passed.
pub const DISCARDED_REQUESTS: &str = "switchboard_discarded_requests_total";
/// Connections closed because the client read too slowly.
pub const SLOW_READER_DISCONNECTS: &str = "switchboard_slow_reader_disconnects_total";
/// Panics caught and contained, by where they happened.
pub const PANICS: &str = "switchboard_panics_total";
/// Requests refused (or, for one-time keys, answered with the fallback key)
/// by a rate limit or quota, by limit.
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";

/// Latency buckets (seconds) for the ✓, delivery, wait and commit histograms:
/// fine below 10 ms where a healthy server lives, coarse up to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for batch sizes.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How often the recorder folds histogram samples.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `switchboard_oldest_queued_entry_age_seconds{shard}` from each
/// shard's oldest entry timestamp (`None`: no entry, age 0).
pub fn set_oldest_entry_ages(oldest_ms: &[Option<u64>], now_ms: u64) {
    for (shard, oldest) in oldest_ms.iter().enumerate() {
        let age = oldest.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1e3);
        metrics::gauge!(OLDEST_QUEUED_ENTRY_AGE, "shard" => shard.to_string()).set(age);
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle). `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SHARD_BATCH_COMMANDS.into()),
                        SIZE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_OPS.into()), SIZE_BUCKETS)
                });
            let handle = match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    return None;
                }
            };
            describe();
            // Register the unlabelled series at zero so they are on /metrics
            // from the start, not only after their first event.
            for name in [
                MESSAGES_IN,
                MESSAGES_OUT,
                STORE_COMMIT_FAILURES,
                GROUP_ENTRIES_DROPPED,
                DISCARDED_REQUESTS,
                SLOW_READER_DISCONNECTS,
                REDIS_ROUND_TRIPS,
                REDIS_SCRIPT_LOADS,
                CLUSTER_COMMITS,
                FORWARDED_COMMANDS,
            ] {
                metrics::counter!(name).increment(0);
            }
            register_labelled_at_zero();
            metrics::gauge!(AUTHENTICATED).increment(0.0);
            metrics::gauge!(NODE_LINKS).increment(0.0);
            metrics::gauge!(QUEUED_ENTRIES).set(0.0);
            Some(handle)
        })
        .clone()
}

/// Transports, as connections label them (`Link::kind`).
const TRANSPORTS: &[&str] = &["tcp", "ws"];
/// Handshake failure reasons (`gateway::connection`).
const HANDSHAKE_FAILURE_REASONS: &[&str] = &["timeout", "protocol", "refused", "io", "closed"];
/// Where a panic can be caught.
const PANIC_PLACES: &[&str] = &["shard", "connection"];

/// Puts every labelled series operators alert on at zero, so that
/// `rate(switchboard_panics_total[5m]) > 0` and friends have a series to
/// evaluate before the first event (docs/OPERATIONS.md lists them all).
fn register_labelled_at_zero() {
    for transport in TRANSPORTS {
        metrics::counter!(CONNECTIONS_ACCEPTED, "transport" => *transport).increment(0);
        metrics::gauge!(CONNECTIONS, "transport" => *transport).increment(0.0);
    }
    for reason in HANDSHAKE_FAILURE_REASONS {
        metrics::counter!(HANDSHAKE_FAILURES, "reason" => *reason).increment(0);
    }
    for place in PANIC_PLACES {
        metrics::counter!(PANICS, "where" => *place).increment(0);
    }
    for reason in ["released", "expired"] {
        metrics::counter!(GROUP_PAYLOADS_COLLECTED, "reason" => reason).increment(0);
    }
    for outcome in ["reattached", "kicked"] {
        metrics::counter!(REATTACHED_CONNECTIONS, "outcome" => outcome).increment(0);
    }
    // Every wire error code the schema defines (new codes included).
    for code in
        (1..=u8::MAX).filter_map(|n| switchboard_proto::pb::ErrorCode::try_from(i32::from(n)).ok())
    {
        metrics::counter!(ERRORS, "code" => code.as_str_name()).increment(0);
        metrics::counter!(GOODBYES, "code" => code.as_str_name()).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        crate::outbound::OUTBOUND_ATTEMPTS,
        "Outbound HTTP attempts (code sender webhook), by target and outcome."
    );
    describe_gauge!(
        crate::outbound::OUTBOUND_BREAKER_OPEN,
        "1 while an outbound target's circuit breaker is open or half-open."
    );
    describe_gauge!(CONNECTIONS, "Open client sockets, by transport.");
    describe_gauge!(AUTHENTICATED, "Authenticated client connections.");
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "Client connections accepted, by transport."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        "Failed or timed-out handshakes, by reason."
    );
    describe_counter!(MESSAGES_IN, "Messages stored (retries not counted).");
    describe_counter!(MESSAGES_OUT, "Message entries pushed to devices.");
    describe_histogram!(
        SEND_ACK_SECONDS,
        "Send frame to durable acknowledgement (✓)."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        "Message accepted to recipient device ack (✓✓)."
    );
    describe_counter!(ERRORS, "Errors answered to clients, by code.");
    describe_counter!(GOODBYES, "Connections closed with a Goodbye, by code.");
    describe_counter!(
        REDIS_ROUND_TRIPS,
        "Cluster mode: Redis round trips of commits (pipelines and WAITs)."
    );
    describe_counter!(
        REDIS_SCRIPT_LOADS,
        "Cluster mode: commit pipelines sent again with the script body (a Redis master lacked it)."
    );
    describe_counter!(CLUSTER_COMMITS, "Cluster mode: batches committed.");
    describe_counter!(
        FORWARDED_COMMANDS,
        "Cluster mode: commands forwarded to the serving node."
    );
    describe_gauge!(NODE_LINKS, "Cluster mode: node links up.");
    describe_counter!(
        REATTACHED_CONNECTIONS,
        "Cluster mode: connections whose link ended, by outcome (reattached, kicked)."
    );
    describe_gauge!(SHARD_INBOX_DEPTH, "Commands waiting in a shard inbox.");
    describe_histogram!(
        SHARD_INBOX_WAIT_SECONDS,
        "Time commands waited in a shard inbox."
    );
    describe_histogram!(
        SHARD_BATCH_COMMANDS,
        "Commands per shard batch (group commit)."
    );
    describe_histogram!(STORE_BATCH_OPS, "Writes per storage batch.");
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        "Storage batch commit time, fsync included."
    );
    describe_counter!(
        STORE_COMMIT_FAILURES,
        "Storage batches that failed to commit."
    );
    describe_gauge!(
        QUEUED_ENTRIES,
        "Queue entries stored for devices (approximate)."
    );
    describe_gauge!(
        OLDEST_QUEUED_ENTRY_AGE,
        "Age of the oldest queue entry of a shard's devices, in seconds (0: none)."
    );
    describe_gauge!(
        SHARD_MAIL_PENDING,
        "Mail from a shard to others not yet confirmed (undelivered notices)."
    );
    describe_counter!(
        GROUP_ENTRIES_DROPPED,
        "Group entries left out of a member device's queue at its quota."
    );
    describe_counter!(
        GROUP_PAYLOADS_COLLECTED,
        "Group message payloads deleted: every reference acked (released) or past the queue TTL (expired)."
    );
    describe_counter!(
        DISCARDED_REQUESTS,
        "Requests discarded after their deadline."
    );
    describe_counter!(
        SLOW_READER_DISCONNECTS,
        "Connections dropped as slow readers."
    );
    describe_counter!(PANICS, "Panics caught and contained, by location.");
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a rate limit or quota, by limit."
    );
}
