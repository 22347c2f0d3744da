//! Server configuration: built-in defaults, overridden by a TOML file,
//! then by environment variables and flags (see `bin/switchboard.rs`).
//! Each setting's env variable and flag derive from its key ([`settings`]).
//!
//! Every limit and timeout is a named field with its unit in the name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gateway::GatewayConfig;
use crate::limits::{Rate, RequestLimits};
use crate::router::RouterConfig;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How verification codes reach phones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CodeSenderKind {
    /// Not chosen: the development sender, refused on a non-loopback
    /// listen address (serving the internet with it must be asked for).
    #[default]
    Auto,
    /// Development: writes each code to `<data_dir>/dev-codes/<phone>`.
    /// Anyone who can read the data dir can register any number.
    Dev,
    /// POSTs each code as JSON to `code_webhook_url` (an SMS gateway).
    Webhook,
}

/// Everything the server can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database, the server key and dev codes live.
    pub data_dir: PathBuf,
    /// Noise-over-TCP listener for native clients.
    pub tcp_listen: SocketAddr,
    /// HTTP listener: WebSocket (`/ws`) and health checks.
    pub http_listen: SocketAddr,
    /// Router shards; 0 means one per four CPU cores (at least one).
    pub shards: usize,
    /// How long undelivered queue entries are kept (default 30 days).
    pub queue_ttl_secs: u64,
    /// How long accepted client message ids are remembered (at least 24 h).
    pub dedup_window_secs: u64,
    /// How often expired entries and dedup records are swept.
    pub sweep_interval_secs: u64,
    /// How often the age of each shard's oldest queue entry is measured
    /// (`oldest_queued_entry_age_seconds`; reads the head of every queue).
    pub queue_age_interval_secs: u64,
    /// Largest frame accepted from a client.
    pub max_frame_bytes: usize,
    /// Time allowed to finish the Noise handshake.
    pub handshake_timeout_ms: u64,
    /// A connection silent this long is closed (clients ping every 25 s).
    pub idle_timeout_secs: u64,
    /// A frame started must be complete within this time, however slowly
    /// its bytes keep coming (slow-loris guard).
    pub frame_timeout_secs: u64,
    /// Time allowed for one socket write before the reader counts as slow.
    pub write_timeout_ms: u64,
    /// Pushes buffered per connection before it is disconnected as slow.
    pub outbound_queue_frames: usize,
    /// Entries a connection may hold pushed-but-unacked.
    pub max_unacked: usize,
    /// Commands buffered per shard before senders wait.
    pub shard_inbox: usize,
    /// Most commands per storage batch (group commit).
    pub max_batch_commands: usize,
    /// Least time between the starts of two synced commits of one shard, in
    /// microseconds. Under load a shard waits out the rest of this interval
    /// and commits everything that arrived meanwhile in one batch: fewer
    /// fsyncs and thread wake-ups per message, for at most this much added
    /// latency. A shard that commits less often than this never waits. 0
    /// commits as soon as the previous commit is done.
    pub group_commit_interval_us: u64,
    /// Entries per page when a device drains its queue (1 to 100).
    pub drain_batch: usize,
    /// User records cached per shard.
    pub max_cached_users: usize,
    /// How long a request may wait for its shard before it is answered
    /// OVERLOADED (and is discarded if still queued).
    pub request_deadline_ms: u64,
    /// Handshakes in progress at once; more connections wait in the
    /// kernel's accept queue, so a reconnect storm cannot starve live users.
    pub max_concurrent_handshakes: usize,
    /// New connections accepted per second (token bucket, burst of one
    /// second's worth).
    pub max_accepts_per_sec: u32,
    /// Time connections get to finish at shutdown before being aborted.
    pub shutdown_grace_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
    // ---- limits (see `limits` and docs/OPERATIONS.md, "Limits")
    /// Messages one user may send per minute, all devices and connections
    /// together (a burst of this many, then this many per minute).
    pub sends_per_user_per_min: u32,
    /// Messages one user may send to one other user per minute.
    pub sends_per_pair_per_min: u32,
    /// READ receipts one user may send per minute.
    pub read_receipts_per_user_per_min: u32,
    /// Phone-number lookups one user may make per hour (number enumeration).
    pub lookups_per_user_per_hour: u32,
    /// Group creations and changes one user may make per hour.
    pub group_changes_per_user_per_hour: u32,
    /// Key-bundle fetches one user may make per hour (starting a
    /// 1,024-member group takes one per member).
    pub bundle_fetches_per_user_per_hour: u32,
    /// One-time keys of one device handed out per hour; further fetches of
    /// that device get its fallback key, so nobody can drain its stock.
    pub one_time_keys_per_device_per_hour: u32,
    /// Verification codes that may be requested from one IP address per hour.
    pub code_requests_per_ip_per_hour: u32,
    /// Verification codes that may be requested for one number per hour.
    pub code_requests_per_phone_per_hour: u32,
    /// Wrong codes one number may get per day, across code re-requests.
    pub wrong_codes_per_phone_per_day: u32,
    /// Entries one device's durable queue may hold; past it, sends to the
    /// device are refused with QUEUE_FULL.
    pub queue_max_entries_per_device: u64,
    /// Bytes one device's durable queue may hold; past it, QUEUE_FULL.
    pub queue_max_bytes_per_device: u64,
    /// New connections accepted from one IP address per minute (a burst of
    /// this many, then this many per minute); more are closed before the
    /// handshake.
    pub connections_per_ip_per_min: u32,
    /// Open connections at most (also capped by the process's file limit).
    pub max_connections: usize,
    /// Seconds a connection may stay without authenticating or linking.
    pub unauthenticated_timeout_secs: u64,
    /// How codes are delivered: `auto` (the default: `dev`, refused on a
    /// non-loopback listen address, where serving the internet with the dev
    /// sender must be asked for explicitly), `dev` or `webhook`.
    pub code_sender: CodeSenderKind,
    /// Webhook sender: the URL to POST `{"phone","code","locale"}` to
    /// (`http://` only; put a TLS relay in front of a remote https gateway).
    pub code_webhook_url: String,
    /// Webhook sender: a header sent with each request, `"Name: value"`
    /// (e.g. `"Authorization: Bearer …"`); empty for none.
    pub code_webhook_auth_header: String,
    /// Webhook sender: time allowed for one attempt (connect to response).
    pub code_webhook_timeout_ms: u64,
    /// Webhook sender: attempts per code, the first included.
    pub code_webhook_attempts: u32,
    /// Webhook sender: ceiling of the first retry's delay; doubles per retry.
    pub code_webhook_backoff_base_ms: u64,
    /// Webhook sender: longest delay between two attempts.
    pub code_webhook_backoff_max_ms: u64,
    /// Webhook sender: failed attempts in a row that open the circuit.
    pub code_webhook_breaker_failures: u32,
    /// Webhook sender: how long an open circuit refuses requests before
    /// one trial is let through.
    pub code_webhook_breaker_open_ms: u64,
    /// Cluster mode: seed nodes of the Redis Cluster, comma-separated
    /// `redis://host:port` (empty: embedded store). Set with
    /// `postgres_url`.
    pub redis_url: String,
    /// Cluster mode: the PostgreSQL connection string (empty: embedded
    /// store). Set with `redis_url`.
    pub postgres_url: String,
    /// Cluster mode: this node's name (empty: the host name).
    pub node_id: String,
    /// Cluster mode: replicas of each Redis master that must hold a write
    /// (`WAIT`) before it is acknowledged (0: the master alone).
    pub redis_min_replicas: u32,
    /// Cluster mode: a node's lease on its partitions, in milliseconds: a
    /// node silent this long is taken over by a standby.
    pub cluster_lease_ms: u64,
    /// Cluster mode: where this node takes links from the other nodes
    /// (forwarded requests). Port 0 picks a free port; the address bound
    /// is what the node advertises, so it must be one the other nodes can
    /// reach (not 0.0.0.0).
    pub cluster_listen: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("switchboard-data"),
            tcp_listen: SocketAddr::from(([127, 0, 0, 1], 5222)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: 0,
            queue_ttl_secs: 30 * 24 * 3600,
            dedup_window_secs: 48 * 3600,
            sweep_interval_secs: 600,
            queue_age_interval_secs: 300,
            max_frame_bytes: switchboard_proto::limits::DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout_ms: 10_000,
            idle_timeout_secs: 75,
            frame_timeout_secs: 30,
            write_timeout_ms: 10_000,
            outbound_queue_frames: 1024,
            max_unacked: 8192,
            shard_inbox: 8192,
            max_batch_commands: 1024,
            group_commit_interval_us: 2_000,
            drain_batch: 100,
            max_cached_users: 200_000,
            request_deadline_ms: 5_000,
            max_concurrent_handshakes: 512,
            max_accepts_per_sec: 5_000,
            shutdown_grace_ms: 5_000,
            log_format: LogFormat::Text,
            sends_per_user_per_min: 1_200,
            sends_per_pair_per_min: 600,
            read_receipts_per_user_per_min: 1_200,
            lookups_per_user_per_hour: 300,
            group_changes_per_user_per_hour: 600,
            bundle_fetches_per_user_per_hour: 3_000,
            one_time_keys_per_device_per_hour: 100,
            code_requests_per_ip_per_hour: 60,
            code_requests_per_phone_per_hour: 3,
            wrong_codes_per_phone_per_day: 10,
            queue_max_entries_per_device: 20_000,
            queue_max_bytes_per_device: 256 * 1024 * 1024,
            connections_per_ip_per_min: 1_200,
            max_connections: 1_000_000,
            unauthenticated_timeout_secs: 120,
            code_sender: CodeSenderKind::Auto,
            code_webhook_url: String::new(),
            code_webhook_auth_header: String::new(),
            // An SMS gateway answers in well under a second; 5 s covers a
            // slow one without holding a registering user much longer.
            code_webhook_timeout_ms: 5_000,
            // 3 attempts with 0.25–2 s between them: a user waits at most
            // about 19 s, and a brief gateway blip is ridden out.
            code_webhook_attempts: 3,
            code_webhook_backoff_base_ms: 500,
            code_webhook_backoff_max_ms: 2_000,
            // Two failed requests (3 attempts each) open the circuit ...
            code_webhook_breaker_failures: 5,
            // ... for 30 s, so a dead gateway is not hammered and users get
            // an immediate retryable answer.
            code_webhook_breaker_open_ms: 30_000,
            redis_url: String::new(),
            postgres_url: String::new(),
            node_id: String::new(),
            redis_min_replicas: 1,
            cluster_lease_ms: 3_000,
            cluster_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message (names the offending key).
        message: String,
    },
    /// An environment variable or flag does not parse for its setting.
    #[error("invalid setting {setting}: {message}")]
    Override {
        /// The setting and where the value came from.
        setting: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {field}: {message}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Smallest frame limit that still fits one full-size payload.
/// Cores per shard when `shards` is 0. A message spends about a quarter of
/// its server CPU in its shard and the rest in connection tasks, and all
/// shards share one log and take turns at its fsync; on 2 cores one shard
/// used 6% less CPU per message than two at 13,000 msgs/s with 10,000
/// users (docs/BENCHMARKS.md).
pub const CORES_PER_SHARD: usize = 4;

const MIN_FRAME_BYTES: usize = switchboard_proto::limits::MAX_PAYLOAD_BYTES + 4096;
/// Largest frame limit we allow; bigger frames would let one client pin
/// too much memory.
const MAX_FRAME_BYTES_CEILING: usize = 16 * 1024 * 1024;
/// Client message ids are remembered at least this long, the promise that
/// makes a retry within a day idempotent.
const MIN_DEDUP_WINDOW_SECS: u64 = 24 * 3600;
/// A device queue must hold at least one largest message with its framing.
const MIN_QUEUE_BYTES: u64 = switchboard_proto::limits::MAX_PAYLOAD_BYTES as u64 + 4096;
/// The bound on drain pages.
const MAX_DRAIN_BATCH: usize = 100;
/// Longest group commit pacing allowed: every ✓ may wait this long, and a
/// second is already far past what a person tolerates.
const MAX_GROUP_COMMIT_INTERVAL_US: u64 = 1_000_000;

impl Config {
    /// Reads a TOML file; absent keys keep their defaults.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: String| Err(ConfigError::Invalid { field, message });
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES_CEILING).contains(&self.max_frame_bytes) {
            return bad(
                "max_frame_bytes",
                format!("must be {MIN_FRAME_BYTES} to {MAX_FRAME_BYTES_CEILING}"),
            );
        }
        if !(300..=60_000).contains(&self.cluster_lease_ms) {
            return bad(
                "cluster_lease_ms",
                "must be 300 to 60000: shorter leases expire under ordinary pauses, \
                 longer ones keep clients of a dead node waiting"
                    .into(),
            );
        }
        if self.cluster_listen.ip().is_unspecified() {
            return bad(
                "cluster_listen",
                "must be an address the other nodes can reach (the node advertises it), \
                 not an unspecified one like 0.0.0.0"
                    .into(),
            );
        }
        if !(1..=MAX_DRAIN_BATCH).contains(&self.drain_batch) {
            return bad("drain_batch", format!("must be 1 to {MAX_DRAIN_BATCH}"));
        }
        if self.max_unacked < self.drain_batch {
            return bad(
                "max_unacked",
                format!(
                    "must be at least drain_batch ({}): a device holding one unacked page \
                     would otherwise be cut off as a slow reader",
                    self.drain_batch
                ),
            );
        }
        if self.group_commit_interval_us > MAX_GROUP_COMMIT_INTERVAL_US {
            return bad(
                "group_commit_interval_us",
                format!(
                    "must be at most {MAX_GROUP_COMMIT_INTERVAL_US} (1 s): every ✓ may wait that long"
                ),
            );
        }
        if self.queue_max_bytes_per_device < MIN_QUEUE_BYTES {
            return bad(
                "queue_max_bytes_per_device",
                format!(
                    "must be at least {MIN_QUEUE_BYTES}: room for one message of the largest size"
                ),
            );
        }
        if self.dedup_window_secs < MIN_DEDUP_WINDOW_SECS {
            return bad(
                "dedup_window_secs",
                format!(
                    "must be at least {MIN_DEDUP_WINDOW_SECS} (24 h): clients retry for that long"
                ),
            );
        }
        for (field, v) in [
            ("queue_ttl_secs", self.queue_ttl_secs),
            ("dedup_window_secs", self.dedup_window_secs),
            ("sweep_interval_secs", self.sweep_interval_secs),
            ("queue_age_interval_secs", self.queue_age_interval_secs),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("frame_timeout_secs", self.frame_timeout_secs),
            ("write_timeout_ms", self.write_timeout_ms),
            ("request_deadline_ms", self.request_deadline_ms),
            ("max_accepts_per_sec", u64::from(self.max_accepts_per_sec)),
            (
                "sends_per_user_per_min",
                u64::from(self.sends_per_user_per_min),
            ),
            (
                "sends_per_pair_per_min",
                u64::from(self.sends_per_pair_per_min),
            ),
            (
                "read_receipts_per_user_per_min",
                u64::from(self.read_receipts_per_user_per_min),
            ),
            (
                "lookups_per_user_per_hour",
                u64::from(self.lookups_per_user_per_hour),
            ),
            (
                "bundle_fetches_per_user_per_hour",
                u64::from(self.bundle_fetches_per_user_per_hour),
            ),
            (
                "group_changes_per_user_per_hour",
                u64::from(self.group_changes_per_user_per_hour),
            ),
            (
                "code_requests_per_ip_per_hour",
                u64::from(self.code_requests_per_ip_per_hour),
            ),
            (
                "code_requests_per_phone_per_hour",
                u64::from(self.code_requests_per_phone_per_hour),
            ),
            (
                "wrong_codes_per_phone_per_day",
                u64::from(self.wrong_codes_per_phone_per_day),
            ),
            (
                "connections_per_ip_per_min",
                u64::from(self.connections_per_ip_per_min),
            ),
            (
                "queue_max_entries_per_device",
                self.queue_max_entries_per_device,
            ),
            (
                "queue_max_bytes_per_device",
                self.queue_max_bytes_per_device,
            ),
            (
                "unauthenticated_timeout_secs",
                self.unauthenticated_timeout_secs,
            ),
        ] {
            if v == 0 {
                return bad(field, "must be greater than 0".into());
            }
        }
        for (field, v) in [
            ("outbound_queue_frames", self.outbound_queue_frames),
            ("max_unacked", self.max_unacked),
            ("shard_inbox", self.shard_inbox),
            ("max_batch_commands", self.max_batch_commands),
            ("max_cached_users", self.max_cached_users),
            ("max_concurrent_handshakes", self.max_concurrent_handshakes),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                return bad(field, "must be greater than 0".into());
            }
        }
        match self.code_sender {
            CodeSenderKind::Webhook => {
                if let Err(e) = crate::outbound::parse_url(&self.code_webhook_url) {
                    return bad("code_webhook_url", e.0);
                }
                if let Err(e) = Some(self.code_webhook_auth_header.as_str())
                    .filter(|h| !h.is_empty())
                    .map_or(Ok(()), |h| crate::outbound::parse_header(h).map(drop))
                {
                    return bad("code_webhook_auth_header", e.0);
                }
                for (field, v) in [
                    ("code_webhook_timeout_ms", self.code_webhook_timeout_ms),
                    (
                        "code_webhook_attempts",
                        u64::from(self.code_webhook_attempts),
                    ),
                    (
                        "code_webhook_breaker_failures",
                        u64::from(self.code_webhook_breaker_failures),
                    ),
                ] {
                    if v == 0 {
                        return bad(field, "must be greater than 0".into());
                    }
                }
                if self.code_webhook_backoff_max_ms < self.code_webhook_backoff_base_ms {
                    return bad(
                        "code_webhook_backoff_max_ms",
                        "must be at least code_webhook_backoff_base_ms".into(),
                    );
                }
            }
            CodeSenderKind::Dev => {}
            CodeSenderKind::Auto => {
                for (what, addr) in [
                    ("tcp_listen", self.tcp_listen),
                    ("http_listen", self.http_listen),
                ] {
                    if !addr.ip().is_loopback() {
                        return bad(
                            "code_sender",
                            format!(
                                "{what} is {addr}, not a loopback address, and no code sender is \
                                 configured: the default development sender writes every code \
                                 to the data dir, so anyone with access to it could register any \
                                 number. Set code_sender = \"webhook\" (with code_webhook_url), \
                                 or code_sender = \"dev\" to accept that explicitly"
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// True when the development sender runs on a non-loopback address
    /// (allowed only when chosen explicitly; worth a warning at start).
    #[must_use]
    pub fn dev_sender_exposed(&self) -> bool {
        self.code_sender != CodeSenderKind::Webhook
            && !(self.tcp_listen.ip().is_loopback() && self.http_listen.ip().is_loopback())
    }

    /// Shard count with 0 resolved to one per [`CORES_PER_SHARD`] cores
    /// (at least one).
    #[must_use]
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            cores.div_ceil(CORES_PER_SHARD)
        }
    }

    pub(crate) fn router(&self) -> RouterConfig {
        RouterConfig {
            shards: self.shard_count(),
            inbox_capacity: self.shard_inbox,
            max_batch_commands: self.max_batch_commands,
            group_commit_interval: Duration::from_micros(self.group_commit_interval_us),
            drain_batch: self.drain_batch,
            queue_ttl_ms: self.queue_ttl_secs.saturating_mul(1000),
            dedup_window_ms: self.dedup_window_secs.saturating_mul(1000),
            max_cached_users: self.max_cached_users,
            request_deadline: Duration::from_millis(self.request_deadline_ms),
            code_requests_per_phone: Rate::per_hour(self.code_requests_per_phone_per_hour),
            wrong_codes_per_phone_per_day: self.wrong_codes_per_phone_per_day,
            one_time_keys_per_device: Rate::per_hour(self.one_time_keys_per_device_per_hour),
            queue_max_entries: self.queue_max_entries_per_device,
            queue_max_bytes: self.queue_max_bytes_per_device,
        }
    }

    pub(crate) fn gateway(&self) -> GatewayConfig {
        GatewayConfig {
            max_frame_bytes: self.max_frame_bytes,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            frame_timeout: Duration::from_secs(self.frame_timeout_secs),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            outbound_queue_frames: self.outbound_queue_frames,
            max_unacked: self.max_unacked,
            max_concurrent_handshakes: self.max_concurrent_handshakes,
            max_accepts_per_sec: self.max_accepts_per_sec,
            max_connections: self.max_connections,
            unauthenticated_timeout: Duration::from_secs(self.unauthenticated_timeout_secs),
            requests: RequestLimits {
                sends_per_user: Rate::per_minute(self.sends_per_user_per_min),
                sends_per_pair: Rate::per_minute(self.sends_per_pair_per_min),
                read_receipts_per_user: Rate::per_minute(self.read_receipts_per_user_per_min),
                lookups_per_user: Rate::per_hour(self.lookups_per_user_per_hour),
                bundle_fetches_per_user: Rate::per_hour(self.bundle_fetches_per_user_per_hour),
                code_requests_per_ip: Rate::per_hour(self.code_requests_per_ip_per_hour),
                connections_per_ip: Rate::per_minute(self.connections_per_ip_per_min),
                group_changes_per_user: Rate::per_hour(self.group_changes_per_user_per_hour),
            },
        }
    }
}

/// One line of help per setting, shown by `switchboard serve --help`.
/// The env variable and flag of each setting come from its key
/// ([`settings`]); a new `Config` field needs only its line here (a unit
/// test fails while one is missing).
const SETTING_HELP: &[(&str, &str)] = &[
    (
        "data_dir",
        "Data directory (database, server key, dev codes).",
    ),
    ("tcp_listen", "Noise/TCP listen address for native clients."),
    (
        "http_listen",
        "HTTP listen address (WebSocket at /ws, /healthz, /readyz, /metrics).",
    ),
    (
        "shards",
        "Router shards (0 = one per four CPU cores, at least one).",
    ),
    (
        "queue_ttl_secs",
        "Seconds an undelivered message is kept (default 30 days).",
    ),
    (
        "dedup_window_secs",
        "Seconds client message ids are remembered (at least 24 h).",
    ),
    ("sweep_interval_secs", "Seconds between expiry sweeps."),
    (
        "queue_age_interval_secs",
        "Seconds between measurements of the oldest queue entry's age.",
    ),
    (
        "max_frame_bytes",
        "Largest frame accepted from a client, in bytes.",
    ),
    (
        "handshake_timeout_ms",
        "Milliseconds allowed for the Noise handshake.",
    ),
    (
        "idle_timeout_secs",
        "Seconds of silence after which a connection is closed.",
    ),
    (
        "frame_timeout_secs",
        "Seconds a started frame has to be complete (slow-loris guard).",
    ),
    (
        "write_timeout_ms",
        "Milliseconds one socket write may take before the reader counts as slow.",
    ),
    (
        "outbound_queue_frames",
        "Pushes buffered per connection before it is dropped as a slow reader.",
    ),
    (
        "max_unacked",
        "Entries a connection may hold pushed but unacked (at least drain_batch).",
    ),
    (
        "shard_inbox",
        "Commands buffered per shard before senders wait.",
    ),
    (
        "max_batch_commands",
        "Most commands per storage batch (group commit).",
    ),
    (
        "group_commit_interval_us",
        "Least microseconds between two synced commits of a shard (0 = none).",
    ),
    (
        "drain_batch",
        "Entries per page when a device drains its queue (1 to 100).",
    ),
    ("max_cached_users", "User records cached per shard."),
    (
        "request_deadline_ms",
        "Milliseconds a request may wait for its shard before OVERLOADED.",
    ),
    (
        "max_concurrent_handshakes",
        "Handshakes in progress at once; more wait in the accept queue.",
    ),
    (
        "max_accepts_per_sec",
        "New connections accepted per second (burst of one second's worth).",
    ),
    (
        "shutdown_grace_ms",
        "Milliseconds connections get to finish at shutdown.",
    ),
    ("log_format", "Log format: text or json."),
    (
        "sends_per_user_per_min",
        "Messages one user may send per minute (burst of as many).",
    ),
    (
        "sends_per_pair_per_min",
        "Messages one user may send to one other user per minute.",
    ),
    (
        "read_receipts_per_user_per_min",
        "READ receipts one user may send per minute.",
    ),
    (
        "lookups_per_user_per_hour",
        "Phone-number lookups one user may make per hour.",
    ),
    (
        "group_changes_per_user_per_hour",
        "Group creations and changes (add, remove, promote, demote, edit, leave) one user may make per hour.",
    ),
    (
        "bundle_fetches_per_user_per_hour",
        "Key-bundle fetches one user may make per hour.",
    ),
    (
        "one_time_keys_per_device_per_hour",
        "One-time keys of a device handed out per hour; then its fallback key.",
    ),
    (
        "code_requests_per_ip_per_hour",
        "Verification codes requested from one IP address per hour.",
    ),
    (
        "code_requests_per_phone_per_hour",
        "Verification codes requested for one number per hour.",
    ),
    (
        "wrong_codes_per_phone_per_day",
        "Wrong codes one number may get per day, across new codes.",
    ),
    (
        "queue_max_entries_per_device",
        "Entries one device's queue may hold; then QUEUE_FULL.",
    ),
    (
        "queue_max_bytes_per_device",
        "Bytes one device's queue may hold; then QUEUE_FULL.",
    ),
    (
        "connections_per_ip_per_min",
        "New connections from one IP address per minute; more are closed.",
    ),
    (
        "max_connections",
        "Open connections at most (lowered to fit the open-file limit).",
    ),
    (
        "unauthenticated_timeout_secs",
        "Seconds a connection may stay without authenticating.",
    ),
    (
        "code_sender",
        "How codes are sent: auto (dev, loopback only), dev or webhook.",
    ),
    (
        "code_webhook_url",
        "Webhook sender: the http:// URL to POST codes to.",
    ),
    (
        "code_webhook_auth_header",
        "Webhook sender: a header sent with each POST, \"Name: value\".",
    ),
    (
        "code_webhook_timeout_ms",
        "Webhook sender: milliseconds allowed for one attempt.",
    ),
    (
        "code_webhook_attempts",
        "Webhook sender: attempts per code, the first included.",
    ),
    (
        "code_webhook_backoff_base_ms",
        "Webhook sender: ceiling of the first retry's delay (doubles per retry).",
    ),
    (
        "code_webhook_backoff_max_ms",
        "Webhook sender: longest delay between two attempts.",
    ),
    (
        "code_webhook_breaker_failures",
        "Webhook sender: failures in a row that open the circuit.",
    ),
    (
        "code_webhook_breaker_open_ms",
        "Webhook sender: how long an open circuit refuses before a trial.",
    ),
    (
        "redis_url",
        "Cluster mode: Redis Cluster seed nodes, comma-separated redis:// URLs (with postgres_url).",
    ),
    (
        "postgres_url",
        "Cluster mode: the PostgreSQL connection string (with redis_url).",
    ),
    (
        "node_id",
        "Cluster mode: this node's name (default: the host name).",
    ),
    (
        "redis_min_replicas",
        "Cluster mode: Redis replicas that must hold a write before its ✓ (WAIT; 0: master only).",
    ),
    (
        "cluster_lease_ms",
        "Cluster mode: a node's lease on its partitions; a node silent this long is taken over.",
    ),
    (
        "cluster_listen",
        "Cluster mode: address for links from the other nodes (advertised as is; port 0: any free port).",
    ),
];

/// Prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// One setting as the command line and the environment see it, derived
/// from a key of [`Config`]'s serialized form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The config file key, e.g. `drain_batch`.
    pub key: String,
    /// The environment variable, e.g. `SWITCHBOARD_DRAIN_BATCH`.
    pub env: String,
    /// The long flag without dashes, e.g. `drain-batch`.
    pub flag: String,
    /// The default value as it would be written in the config file.
    pub default: String,
    /// One line of help ("" if the field has none yet).
    pub help: &'static str,
}

/// Where an override came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

fn default_table() -> toml::Table {
    // A struct of plain fields always serializes to a table; an empty
    // table would only hide settings, never misread one.
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

/// Every setting, in field order: each key `foo_bar` of the serialized
/// default `Config` has env `SWITCHBOARD_FOO_BAR` and flag `--foo-bar`.
#[must_use]
pub fn settings() -> Vec<Setting> {
    default_table()
        .into_iter()
        .map(|(key, value)| Setting {
            env: format!("{ENV_PREFIX}{}", key.to_ascii_uppercase()),
            flag: key.replace('_', "-"),
            default: match &value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            help: SETTING_HELP
                .iter()
                .find(|(k, _)| *k == key)
                .map_or("", |(_, h)| *h),
            key,
        })
        .collect()
}

/// Parses one textual override as the TOML value the key's field takes:
/// text as-is for string fields, a TOML literal for the others.
fn parse_override(
    default: Option<&toml::Value>,
    key: &str,
    text: &str,
) -> Result<toml::Value, String> {
    if let Some(toml::Value::String(_)) = default {
        return Ok(toml::Value::String(text.to_owned()));
    }
    let doc = format!("v = {text}");
    let mut table: toml::Table = toml::from_str(&doc).map_err(|_| match default {
        Some(d) => format!("expected {}, got {text:?}", d.type_str()),
        None => format!("{text:?} is not a TOML value"),
    })?;
    let value = table
        .remove("v")
        .ok_or_else(|| format!("no value given for {key}"))?;
    match default {
        Some(d) if d.type_str() != value.type_str() => {
            Err(format!("expected {}, got {text:?}", d.type_str()))
        }
        _ => Ok(value),
    }
}

impl Config {
    /// Applies textual overrides (`key`, value, where it came from) in
    /// order, later ones winning. Values are parsed per the field's type.
    ///
    /// # Errors
    /// [`ConfigError::Override`] naming the setting and its source.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str, Source)>,
    ) -> Result<Self, ConfigError> {
        let defaults = default_table();
        let mut table = toml::Table::try_from(self).map_err(|e| ConfigError::Override {
            setting: "config".into(),
            message: e.to_string(),
        })?;
        for (key, text, source) in overrides {
            let setting = match source {
                Source::Env => format!("{key} (env {ENV_PREFIX}{})", key.to_ascii_uppercase()),
                Source::Flag => format!("{key} (--{})", key.replace('_', "-")),
            };
            let value = parse_override(defaults.get(key), key, text).map_err(|message| {
                ConfigError::Override {
                    setting: setting.clone(),
                    message,
                }
            })?;
            table.insert(key.to_owned(), value);
            // Deserialize after each one so an error names its setting.
            toml::Value::Table(table.clone())
                .try_into::<Self>()
                .map_err(|e| ConfigError::Override {
                    setting,
                    message: e.to_string().trim().replace('\n', " "),
                })?;
        }
        toml::Value::Table(table)
            .try_into::<Self>()
            .map_err(|e| ConfigError::Override {
                setting: "config".into(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.tcp_listen.port(), 5222);
        assert_eq!(c.http_listen.port(), 8080);
        assert_eq!(c.queue_ttl_secs, 30 * 24 * 3600);
        assert!(c.dedup_window_secs >= 24 * 3600);
    }

    #[test]
    fn zero_shards_means_one_per_four_cores_and_at_least_one() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let c = Config::default();
        assert_eq!(c.shards, 0);
        assert!(c.shard_count() >= 1);
        assert_eq!(c.shard_count(), cores.div_ceil(CORES_PER_SHARD));
        assert!(c.shard_count() * CORES_PER_SHARD >= cores);
        let fixed = Config {
            shards: 3,
            ..Config::default()
        };
        assert_eq!(fixed.shard_count(), 3);
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("tcp_listen = \"127.0.0.1:1\"\nshards = 3\n").unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.http_listen.port(), 8080);
        let err = toml::from_str::<Config>("no_such_key = 1\n").unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn the_implicit_dev_sender_is_refused_off_loopback() {
        let open = Config {
            tcp_listen: SocketAddr::from(([0, 0, 0, 0], 5222)),
            ..Config::default()
        };
        let err = open.validate().unwrap_err().to_string();
        assert!(err.contains("code_sender"), "{err}");
        let explicit = Config {
            code_sender: CodeSenderKind::Dev,
            ..open.clone()
        };
        explicit.validate().unwrap();
        assert!(explicit.dev_sender_exposed());
        assert!(!Config::default().dev_sender_exposed());
        let webhook: Config =
            toml::from_str("code_sender = \"webhook\"\ncode_webhook_url = \"ftp://x\"\n").unwrap();
        let err = webhook.validate().unwrap_err().to_string();
        assert!(err.contains("code_webhook_url"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let c = Config {
            drain_batch: 500,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("drain_batch"), "{err}");
        let c = Config {
            max_unacked: 10,
            drain_batch: 20,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("max_unacked"), "{err}");
        let c = Config {
            group_commit_interval_us: 5_000_000,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("group_commit_interval_us"), "{err}");
    }

    #[test]
    fn every_setting_has_help_and_every_help_a_setting() {
        let all = settings();
        for s in &all {
            assert!(!s.help.is_empty(), "add a SETTING_HELP line for {}", s.key);
        }
        for (k, _) in SETTING_HELP {
            assert!(all.iter().any(|s| s.key == *k), "stale help line {k}");
        }
        let d = all.iter().find(|s| s.key == "drain_batch").unwrap();
        assert_eq!(d.env, "SWITCHBOARD_DRAIN_BATCH");
        assert_eq!(d.flag, "drain-batch");
    }

    #[test]
    fn overrides_parse_per_type_and_errors_name_the_setting() {
        let c = Config::default()
            .with_overrides([
                ("drain_batch", "7", Source::Env),
                ("log_format", "json", Source::Flag),
                ("data_dir", "/x y", Source::Flag),
            ])
            .unwrap();
        assert_eq!(c.drain_batch, 7);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.data_dir, PathBuf::from("/x y"));
        let err = Config::default()
            .with_overrides([("max_unacked", "lots", Source::Env)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SWITCHBOARD_MAX_UNACKED"), "{err}");
        let err = Config::default()
            .with_overrides([("tcp_listen", "nowhere", Source::Flag)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tcp-listen"), "{err}");
        let err = Config::default()
            .with_overrides([("shards", "-1", Source::Flag)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--shards"), "{err}");
    }
}
