//! One module per subcommand, plus what they share: choosing the server,
//! starting the SDK client, and rendering events.

mod chat;
mod devices;
mod group;
mod outbox;
mod pin;
mod recv;
mod register;
mod send;
mod whoami;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use switchboard_client::{
    Client, ClientConfig, CloseReason, ConnectOptions, DeviceId, Endpoint, ErrorCode, Event,
    Events, GroupId, MAX_PLAINTEXT_BYTES, ReceiptKind, Sent, UsageError as SdkUsageError, UserId,
};

use crate::cli::{Cli, Command, DEFAULT_SERVER, UsageError};
use crate::home::{Account, Home};
use crate::output::Output;

/// Limit on one-shot requests (register, verify) including the connect: a
/// dead server must not make a script hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the parsed command line.
pub async fn run(cli: Cli, out: &Output) -> Result<()> {
    let ctx = Ctx {
        home: Home::resolve(cli.home)?,
        server_flag: cli.server,
        server_key: cli.server_key.map(|k| k.0),
        out: *out,
        ping_interval: cli.ping_interval,
    };
    match cli.command {
        Command::Register {
            phone,
            force,
            locale,
        } => register::register(&ctx, &phone, force, locale).await,
        Command::Verify { code, pin } => register::verify(&ctx, &code, pin.as_deref()).await,
        Command::Pin { action } => pin::run(&ctx, action).await,
        Command::Whoami => whoami::run(&ctx),
        Command::Send {
            phone,
            text,
            file,
            group: Some(group),
            wait_delivered,
            timeout,
        } => {
            // With --group, the first positional argument is the text.
            if text.is_some() {
                return Err(anyhow!(UsageError(
                    "with --group, give only the text (no phone number)".into()
                )));
            }
            let source = send::Source::new(phone, file.as_deref())?;
            let group = GroupId::new(group);
            send::run_group(&ctx, group, source, wait_delivered, timeout).await
        }
        Command::Send {
            phone,
            text,
            file,
            group: None,
            wait_delivered,
            timeout,
        } => {
            let phone = phone.unwrap_or_default();
            let source = send::Source::new(text, file.as_deref())?;
            send::run(&ctx, &phone, source, wait_delivered, timeout).await
        }
        Command::Group { action } => group::run(&ctx, action).await,
        Command::Recv {
            timeout,
            count,
            read,
        } => recv::run(&ctx, timeout, count, read).await,
        Command::Chat { phone } => chat::run(&ctx, &phone).await,
        Command::Outbox { action } => outbox::run(&ctx, action),
        Command::Devices => devices::list(&ctx).await,
        Command::LinkCode => devices::link_code(&ctx).await,
        Command::Link { code } => devices::link(&ctx, &code).await,
        Command::Revoke { device } => devices::revoke(&ctx, DeviceId::new(device)).await,
        Command::Safety { phone } => devices::safety(&ctx, &phone).await,
    }
}

/// What every subcommand needs.
pub struct Ctx {
    pub home: Home,
    server_flag: Option<String>,
    /// `--server-key`: pinned instead of the key stored with the account.
    server_key: Option<Vec<u8>>,
    pub out: Output,
    ping_interval: Duration,
}

impl Ctx {
    /// The server to use: `--server`/`SBCHAT_SERVER`, else `stored` (the
    /// account's or pending registration's), else the default.
    fn server(&self, stored: Option<&str>) -> Result<(String, Endpoint)> {
        let addr = self
            .server_flag
            .as_deref()
            .or(stored)
            .unwrap_or(DEFAULT_SERVER)
            .to_owned();
        let endpoint = addr
            .parse::<Endpoint>()
            .map_err(|e| anyhow!(UsageError(format!("--server: {e}"))))?;
        Ok((addr, endpoint))
    }

    /// Starts the SDK client for the stored account, with the home's outbox.
    async fn start_client(&self, account: &Account) -> Result<(Client, Events)> {
        let (_, endpoint) = self.server(Some(&account.server))?;
        let mut config = ClientConfig::new(endpoint);
        config.connect = self.connect_options();
        config.outbox_dir = Some(self.home.outbox_dir());
        config.state_dir = Some(self.home.state_dir());
        config.ping_interval = self.ping_interval;
        Client::start(config, account.creds.clone())
            .await
            .map_err(state_error)
            .context("cannot start the client")
    }
}

/// Explains an SDK error about the home's state directory; others pass
/// through.
fn state_error(error: switchboard_client::Error) -> anyhow::Error {
    match &error {
        switchboard_client::Error::Usage(SdkUsageError::StateDirInUse(dir)) => {
            let advice = format!(
                "another program is using this device's keys and outbox in {}                  (stop it first; use another --home for a second account)",
                dir.display()
            );
            anyhow::Error::new(error).context(advice)
        }
        _ => anyhow::Error::new(error),
    }
}

impl Ctx {
    /// Handshake options: sbchat's user agent and the `--server-key` pin
    /// (the SDK pins the account's stored key when there is none).
    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::default();
        options.user_agent = concat!("sbchat/", env!("CARGO_PKG_VERSION")).to_owned();
        options.server_key.clone_from(&self.server_key);
        options
    }
}

fn validate_phone(phone: &str) -> Result<String> {
    let phone = phone.trim();
    if phone.is_empty() {
        return Err(anyhow!(UsageError("the phone number is empty".into())));
    }
    Ok(phone.to_owned())
}

/// Turns the client's final reason into an error with advice.
fn closed_error(reason: &CloseReason) -> anyhow::Error {
    let advice = match reason {
        CloseReason::Goodbye(e) if e.code == ErrorCode::Replaced => {
            " (this device connected from somewhere else)"
        }
        CloseReason::Rejected(e) if e.code == ErrorCode::Unauthenticated => {
            " (the stored credential is no longer valid: register again)"
        }
        CloseReason::Goodbye(e) if e.code == ErrorCode::DeviceRevoked => {
            " (this device was revoked: register or link again)"
        }
        CloseReason::Rejected(e) if e.code == ErrorCode::UnsupportedVersion => {
            " (upgrade sbchat or the server)"
        }
        CloseReason::ServerKeyMismatch => " (the server's identity changed)",
        _ => "",
    };
    // The SDK error stays in the chain, so `--json` reports its code.
    anyhow::Error::new(switchboard_client::Error::Closed(reason.clone()))
        .context(format!("session ended{advice}"))
}

/// Shows connection trouble once per outage rather than once per attempt.
#[derive(Debug, Default)]
struct LinkStatus {
    /// Also announce the first connection.
    announce: bool,
    connected_once: bool,
    down: bool,
    /// Why the last attempt failed, for commands that must report it.
    last_problem: Option<String>,
}

impl LinkStatus {
    fn announcing() -> Self {
        Self {
            announce: true,
            ..Self::default()
        }
    }

    /// An error if the server was never reached: a command that only
    /// listens must not report success for a run that heard nothing.
    fn require_reached(&self, server: &str) -> anyhow::Result<()> {
        if self.connected_once {
            return Ok(());
        }
        match &self.last_problem {
            Some(problem) => Err(anyhow::anyhow!(
                "could not reach the server {server}: {problem}"
            )),
            None => Err(anyhow::anyhow!("could not reach the server {server}")),
        }
    }

    fn connected(&mut self, out: Output, phone: &str) {
        let was_down = std::mem::take(&mut self.down);
        if !std::mem::replace(&mut self.connected_once, true) {
            if self.announce {
                out.note(&format!("connected as {phone}"));
            }
        } else if was_down {
            out.note(&format!("reconnected as {phone}"));
        }
    }

    fn disconnected(&mut self, out: Output, reason: &switchboard_client::Error) {
        self.last_problem = Some(reason.to_string());
        if !std::mem::replace(&mut self.down, true) {
            out.note(&format!(
                "connection problem: {reason}; retrying in the background"
            ));
        }
    }
}

fn kind_name(kind: ReceiptKind) -> &'static str {
    match kind {
        ReceiptKind::Read => "read",
        ReceiptKind::Delivered | ReceiptKind::Unspecified => "delivered",
    }
}

/// Refuses a message too long to send, locally and without echoing it.
/// `complete` is false when only the first bytes of the input were read.
fn check_message_len(len: usize, complete: bool) -> Result<()> {
    if len > MAX_PLAINTEXT_BYTES {
        let size = if complete {
            format!("{len} bytes")
        } else {
            format!("more than {MAX_PLAINTEXT_BYTES} bytes")
        };
        return Err(anyhow!(UsageError(format!(
            "message too long: {size}, at most {MAX_PLAINTEXT_BYTES} \
             (64 KiB per message, less 1 KiB for the encryption)"
        ))));
    }
    Ok(())
}

/// `ms` since the Unix epoch as the local time of day, `HH:MM`.
fn clock(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(
            || "--:--".to_owned(),
            |t| {
                t.to_zoned_datetime(jiff::tz::TimeZone::system())
                    .strftime("%H:%M")
                    .to_string()
            },
        )
}

/// A decrypted message, as the SDK's `Event::Message` gives it.
pub struct Shown<'a> {
    pub from_phone: &'a str,
    pub from_user: UserId,
    pub from_device: DeviceId,
    /// For a copy sent by another device of this account: the peer.
    pub own_copy_to: Option<UserId>,
    /// The peer's phone for `own_copy_to`, when known.
    pub to_phone: Option<&'a str>,
    pub client_msg_id: &'a str,
    pub payload: &'a [u8],
    pub server_ts_ms: u64,
    /// Prefix the text line with the local time (`chat`).
    pub stamped: bool,
}

fn print_message(out: Output, m: &Shown<'_>) {
    let text = String::from_utf8_lossy(m.payload);
    let shown = match m.own_copy_to {
        Some(to_user) => {
            let to = m
                .to_phone
                .map_or_else(|| format!("user {to_user}"), str::to_owned);
            format!("→ {to}: {text} (from your other device)")
        }
        None => format!("{}: {text}", m.from_phone),
    };
    let shown = if m.stamped {
        format!("{} {shown}", clock(m.server_ts_ms))
    } else {
        shown
    };
    out.event(
        &shown,
        &json!({
            "event": "message",
            "from": m.from_phone,
            "from_user": m.from_user,
            "from_device": m.from_device,
            "from_own_device": m.own_copy_to.is_some(),
            "to_user": m.own_copy_to,
            "to": m.own_copy_to.and(m.to_phone),
            "client_msg_id": m.client_msg_id,
            "text": text,
            "server_ts_ms": m.server_ts_ms,
        }),
    );
}

/// Events about keys and devices that `recv` and `chat` show alike;
/// returns false for other events.
fn print_security_event(out: Output, event: &Event) -> bool {
    match event {
        Event::SafetyNumberChanged { user_id, phone } => {
            let who = if phone.is_empty() {
                format!("user {user_id}")
            } else {
                phone.clone()
            };
            out.event(
                &format!(
                    "⚠ the safety number with {who} changed (new or re-registered device); check it with `sbchat safety {who}`"
                ),
                &json!({"event": "safety_number_changed", "user_id": user_id, "phone": phone}),
            );
        }
        Event::Undecryptable {
            from_phone,
            from_user,
            from_device,
            client_msg_id,
            reason,
            ..
        } => {
            out.event(
                &format!("⚠ a message from {from_phone} (device {from_device}) could not be decrypted: {reason}"),
                &json!({
                    "event": "undecryptable",
                    "from": from_phone,
                    "from_user": from_user,
                    "from_device": from_device,
                    "client_msg_id": client_msg_id,
                    "reason": reason,
                }),
            );
        }
        Event::ContactDevicesChanged {
            user_id,
            phone,
            devices,
            added,
            removed,
        } => {
            let who = if phone.is_empty() {
                format!("user {user_id}")
            } else {
                phone.clone()
            };
            let mut what = Vec::new();
            if !added.is_empty() {
                what.push(format!("new device {}", device_list(added)));
            }
            if !removed.is_empty() {
                what.push(format!("removed device {}", device_list(removed)));
            }
            out.event(
                &format!(
                    "⚠ {who}'s devices changed ({}); now {}",
                    what.join(", "),
                    device_list(devices)
                ),
                &json!({
                    "event": "contact_devices_changed",
                    "user_id": user_id,
                    "phone": phone,
                    "devices": devices,
                    "added": added,
                    "removed": removed,
                }),
            );
        }
        Event::Undelivered {
            to_user,
            phone,
            client_msg_ids,
            resending,
        } => {
            let who = if phone.is_empty() {
                format!("user {to_user}")
            } else {
                phone.clone()
            };
            let then = if resending.is_empty() {
                String::new()
            } else {
                format!("; sending {} again", resending.len())
            };
            out.event(
                &format!(
                    "⚠ {} message(s) to {who} were never delivered (they re-registered){then}: {}",
                    client_msg_ids.len(),
                    client_msg_ids.join(", ")
                ),
                &json!({
                    "event": "undelivered",
                    "to_user": to_user,
                    "to": phone,
                    "client_msg_ids": client_msg_ids,
                    "resending": resending,
                }),
            );
        }
        Event::DevicesChanged { devices } => {
            out.event(
                &format!("this account's devices are now {}", device_list(devices)),
                &json!({"event": "devices_changed", "devices": devices}),
            );
        }
        _ => return false,
    }
    true
}

/// Device ids as sbchat has always shown them: `[1, 2]`.
fn device_list(devices: &[DeviceId]) -> String {
    let ids: Vec<String> = devices.iter().map(ToString::to_string).collect();
    format!("[{}]", ids.join(", "))
}

fn print_receipt(
    out: Output,
    kind: ReceiptKind,
    from_phone: &str,
    client_msg_ids: &[String],
    server_ts_ms: u64,
) {
    let name = kind_name(kind);
    let by = if kind == ReceiptKind::Read {
        "by"
    } else {
        "to"
    };
    out.event(
        &format!("✓✓ {name} {by} {from_phone}: {}", client_msg_ids.join(", ")),
        &json!({
            "event": "receipt",
            "kind": name,
            "from": from_phone,
            "client_msg_ids": client_msg_ids,
            "server_ts_ms": server_ts_ms,
        }),
    );
}

/// ✓ for a send; `to` is the phone when known. `recovered` marks sends
/// left in the outbox by an earlier run.
fn print_sent(out: Output, sent: &Sent, to: Option<&str>, recovered: bool) {
    let whom = to.map_or_else(|| format!("user {}", sent.to_user), str::to_owned);
    let text = if recovered {
        format!("✓ sent earlier message {} to {whom}", sent.client_msg_id)
    } else {
        format!("✓ sent to {whom} ({})", sent.client_msg_id)
    };
    out.event(
        &text,
        &json!({
            "event": "sent",
            "client_msg_id": sent.client_msg_id,
            "server_ts_ms": sent.server_ts_ms,
            "to": to,
            "to_user": sent.to_user,
            "duplicate": sent.duplicate,
            "recovered": recovered,
        }),
    );
}
