//! The command line: global flags and one variant per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The default server when neither `--server`, `SBCHAT_SERVER` nor the
/// stored account names one.
pub const DEFAULT_SERVER: &str = "127.0.0.1:5222";

/// A mistake in how sbchat was invoked (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A message that got no ✓ in time but stays queued in the outbox and goes
/// out with a later command (exit code 3): sending it again by hand would
/// deliver it twice.
#[derive(Debug)]
pub struct QueuedError(pub String);

impl std::fmt::Display for QueuedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QueuedError {}

/// The message limit, for `send --help` (a unit test checks it against the
/// SDK's `MAX_PLAINTEXT_BYTES`).
const SEND_HELP: &str = "A message is UTF-8 text of at most 64,512 bytes: 64 KiB per message, \
less 1 KiB for the encryption. Longer ones are refused before anything is sent. Text read \
from standard input or a file loses one trailing newline.";

/// Command-line client for a Switchboard server.
#[derive(Debug, Parser)]
#[command(name = "sbchat", version, about, propagate_version = true)]
pub struct Cli {
    /// State directory (account, pending registration, outbox)
    /// [default: <data dir>/sbchat]
    #[arg(long, global = true, env = "SBCHAT_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Server address: host:port, tcp://host:port or ws://host:port/ws
    /// [default: the registered account's server, else 127.0.0.1:5222]
    #[arg(long, global = true, env = "SBCHAT_SERVER", value_name = "ADDR")]
    pub server: Option<String>,

    /// The server's static public key (64 hex digits, printed by the server
    /// at start as `server_key=…`) to pin. Without it the key the server
    /// shows at registration is pinned (kept with the account), and a later
    /// server presenting another key is refused
    #[arg(long, global = true, env = "SBCHAT_SERVER_KEY", value_name = "HEX",
          value_parser = parse_server_key)]
    pub server_key: Option<ServerKey>,

    /// Print JSON lines instead of text
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds of silence after which the client pings the server (keep it
    /// below the server's idle timeout, 75 s by default)
    #[arg(long, global = true, env = "SBCHAT_PING_INTERVAL", value_name = "S",
          default_value = "25", value_parser = parse_seconds)]
    pub ping_interval: Duration,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for a verification code for PHONE (E.164, e.g. +15550001111)
    Register {
        /// The phone number to register
        phone: String,
        /// Register even though this home already holds an account (which
        /// the new one replaces once verified, dropping its outbox)
        #[arg(long)]
        force: bool,
        /// The language of the code message, a BCP 47 tag such as pt-BR
        /// [default: from LC_ALL, LC_MESSAGES or LANG, e.g. pt_BR.UTF-8]
        #[arg(long, env = "SBCHAT_LOCALE", value_name = "TAG")]
        locale: Option<String>,
    },
    /// Verify the code sent for the pending registration and store the account
    Verify {
        /// The code received (dev servers write it to <data>/dev-codes/<phone>)
        code: String,
        /// The account's two-step verification PIN, if it has one
        #[arg(long, env = "SBCHAT_PIN", value_name = "PIN", hide_env_values = true)]
        pin: Option<String>,
    },
    /// Two-step verification: set or clear the PIN needed to register this
    /// number again (primary device only)
    Pin {
        #[command(subcommand)]
        action: PinAction,
    },
    /// Show the stored account
    Whoami,
    /// Send a message to PHONE (or with --group ID, to a group: `send
    /// --group ID TEXT`); exits 0 once the server stored it (✓), 3 if it got
    /// no ✓ in time and stays queued in the outbox (do not resend it; see
    /// `sbchat outbox`)
    #[command(after_help = SEND_HELP)]
    Send {
        /// Recipient's phone number (with --group: the text)
        #[arg(required_unless_present = "group")]
        phone: Option<String>,
        /// Message text; `-` reads it from standard input, as does leaving
        /// it out when standard input is not a terminal
        #[arg(conflicts_with = "file")]
        text: Option<String>,
        /// Read the message from the file PATH
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Send to this group (its id, from `sbchat group create|list`)
        #[arg(long, value_name = "ID")]
        group: Option<u64>,
        /// Also wait until a device of the recipient received it (✓✓; for
        /// a group, every member); messages and receipts queued ahead of it
        /// are kept for `recv`
        #[arg(long)]
        wait_delivered: bool,
        /// Give up after S seconds
        #[arg(long, value_name = "S", default_value = "30", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Print incoming messages and receipts, acknowledging each
    Recv {
        /// Stop after S seconds: exit 0 if the server was reached, else 1
        /// [default: run until Ctrl-C]
        #[arg(long, value_name = "S", value_parser = parse_seconds)]
        timeout: Option<Duration>,
        /// Stop after N messages and receipts
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Send a read receipt for each message
        #[arg(long)]
        read: bool,
    },
    /// Chat interactively with PHONE: type lines to send; /help lists the
    /// commands, /quit or EOF leaves. Messages from others show as a notice
    /// and wait for `recv` or a chat with them
    Chat {
        /// The peer's phone number
        phone: String,
    },
    /// List the messages queued in the outbox (no ✓ yet; they go out with
    /// the next command that connects), or cancel one
    Outbox {
        #[command(subcommand)]
        action: Option<OutboxAction>,
    },
    /// List this account's devices
    Devices,
    /// Make a code to link a new device to this account (primary device only)
    LinkCode,
    /// Join the account that made CODE as a linked device of it
    Link {
        /// The code shown by `sbchat link-code` on the primary device
        code: String,
    },
    /// Revoke another device of this account (primary device only)
    Revoke {
        /// The device id (see `sbchat devices`)
        device: u32,
    },
    /// Show the safety number with PHONE, to compare with theirs
    Safety {
        /// The peer's phone number
        phone: String,
    },
    /// Create and manage groups (up to 1,024 members)
    Group {
        #[command(subcommand)]
        action: GroupAction,
    },
}

/// `sbchat group …`.
#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// Create a group named NAME with these members; prints its id
    Create {
        /// The group's name
        name: String,
        /// Phone numbers of the other members
        phones: Vec<String>,
        /// A description of the group
        #[arg(long, value_name = "TEXT", default_value = "")]
        description: String,
        /// Only admins may change the name and description
        #[arg(long)]
        admins_edit: bool,
    },
    /// Add members (admins only)
    Add {
        /// The group id
        group: u64,
        /// Phone numbers to add
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Remove a member (admins only)
    Remove {
        /// The group id
        group: u64,
        /// The member's phone number
        phone: String,
    },
    /// Make a member an admin (admins only)
    Promote {
        /// The group id
        group: u64,
        /// The member's phone number
        phone: String,
    },
    /// Make an admin a member again (admins only)
    Demote {
        /// The group id
        group: u64,
        /// The admin's phone number
        phone: String,
    },
    /// Leave a group
    Leave {
        /// The group id
        group: u64,
    },
    /// Show a group and its members
    Info {
        /// The group id
        group: u64,
    },
    /// List this account's groups
    List,
}

/// `sbchat outbox` actions (none: list).
#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// Cancel a queued message so it is never sent
    Cancel {
        /// Its id, as `sbchat outbox` lists it
        id: String,
    },
}

/// `sbchat pin` actions.
#[derive(Debug, Subcommand)]
pub enum PinAction {
    /// Set the PIN (6 to 64 characters); read from standard input if not given
    Set {
        /// The new PIN (visible to other local users in the process list:
        /// prefer standard input)
        pin: Option<String>,
    },
    /// Remove the PIN: a code alone registers the number again
    Clear,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_send_with_flags_anywhere() {
        let cli = Cli::try_parse_from([
            "sbchat",
            "send",
            "+1555",
            "hi there",
            "--wait-delivered",
            "--json",
            "--timeout",
            "2.5",
        ])
        .unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Send {
                phone,
                text,
                file,
                wait_delivered,
                timeout,
                group,
            } => {
                assert_eq!(
                    (phone.as_deref(), text.as_deref()),
                    (Some("+1555"), Some("hi there"))
                );
                assert_eq!(group, None);
                assert_eq!(file, None);
                assert!(wait_delivered);
                assert_eq!(timeout, Duration::from_millis(2500));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn send_help_states_the_sdk_limit() {
        let limit = switchboard_client::MAX_PLAINTEXT_BYTES;
        let shown = format!("{},{:03}", limit / 1000, limit % 1000);
        assert!(SEND_HELP.contains(&shown), "{SEND_HELP}");
        assert_eq!(switchboard_client::MAX_PLAINTEXT_BYTES + 1024, 64 * 1024);
    }

    #[test]
    fn send_takes_text_or_a_file_not_both() {
        let cli = Cli::try_parse_from(["sbchat", "send", "+1555", "--file", "m.txt"]).unwrap();
        match cli.command {
            Command::Send { text, file, .. } => {
                assert_eq!(text, None);
                assert_eq!(file, Some(PathBuf::from("m.txt")));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["sbchat", "send", "+1555", "hi", "--file", "m"]).is_err());
    }

    #[test]
    fn refuses_bad_seconds() {
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_seconds("0").unwrap(), Duration::ZERO);
    }
}

/// A server's static public key (32 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKey(pub Vec<u8>);

/// A server key: 32 bytes as 64 hex digits.
fn parse_server_key(s: &str) -> Result<ServerKey, String> {
    match hex::decode(s.trim()) {
        Ok(key) if key.len() == 32 => Ok(ServerKey(key)),
        _ => Err(
            "expected 64 hex digits (the server prints its key at start as server_key=…)".into(),
        ),
    }
}
