//! Server configuration: built-in defaults, overridden by a TOML file,
//! then by environment variables and flags (see `bin/switchboard.rs`).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CodeSenderKind {
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
    /// How codes are delivered: `dev` or `webhook`. Unset means `dev`,
    /// which is refused on a non-loopback listen address: serving the
    /// internet with the dev sender must be asked for explicitly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_sender: Option<CodeSenderKind>,
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
            code_sender: None,
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
            Some(CodeSenderKind::Webhook) => {
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
            Some(CodeSenderKind::Dev) => {}
            None => {
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
        self.code_sender.is_none_or(|k| k == CodeSenderKind::Dev)
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
            },
        }
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
            code_sender: Some(CodeSenderKind::Dev),
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
}
