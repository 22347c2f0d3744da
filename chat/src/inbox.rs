//! Queue entries that a command acknowledged without showing them, kept for
//! `recv` (and for `chat` with their conversation): `<home>/inbox.jsonl`.
//!
//! Why: the server hands out a device's queue page by page and sends the
//! next page (and, after a reconnect, anything newer) only once every entry
//! of the current one is acknowledged. So `send --wait-delivered` cannot
//! see its ✓✓ behind an unacknowledged older receipt, nor `chat` its peer's
//! messages behind someone else's. Such entries are appended here (synced)
//! before the ack, so acknowledging them loses nothing.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use switchboard_client::{DeviceId, UserId};

use crate::home::Home;

/// One kept entry, as `recv` would have shown it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Kept {
    Message {
        from_user: UserId,
        from_device: DeviceId,
        from_phone: String,
        to_user: UserId,
        from_own_device: bool,
        client_msg_id: String,
        text: String,
        server_ts_ms: u64,
    },
    Receipt {
        read: bool,
        from_user: UserId,
        from_phone: String,
        client_msg_ids: Vec<String>,
        server_ts_ms: u64,
    },
}

impl Kept {
    /// The user at the other end of the conversation it belongs to.
    pub fn peer(&self) -> UserId {
        match self {
            Kept::Message {
                from_own_device: true,
                to_user,
                ..
            } => *to_user,
            Kept::Message { from_user, .. } | Kept::Receipt { from_user, .. } => *from_user,
        }
    }
}

/// The home's inbox file. Only used under the home's lock.
#[derive(Debug)]
pub struct Inbox {
    path: PathBuf,
}

impl Inbox {
    pub fn new(home: &Home) -> Self {
        Self {
            path: home.dir().join("inbox.jsonl"),
        }
    }

    /// Appends `entry` durably (the caller acks it next).
    ///
    /// # Errors
    ///
    /// When the file cannot be written: the caller must not ack then.
    pub fn keep(&self, entry: &Kept) -> Result<()> {
        // Led by a newline too: a line cut short by a crash mid-append
        // then spoils only itself, not the entry written after it.
        let mut line = vec![b'\n'];
        line.extend(serde_json::to_vec(entry)?);
        line.push(b'\n');
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Every kept entry, oldest first. A damaged line (a crash mid-append)
    /// is skipped with a log line.
    ///
    /// # Errors
    ///
    /// When the file exists but cannot be read.
    pub fn load(&self) -> Result<Vec<Kept>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()));
            }
        };
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    tracing::warn!("skipping a damaged inbox line: {e}");
                    None
                }
            })
            .collect())
    }

    /// Replaces the inbox with `rest` (what is still not shown).
    ///
    /// # Errors
    ///
    /// When the file cannot be rewritten or removed.
    pub fn replace(&self, rest: &[Kept]) -> Result<()> {
        if rest.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
            };
        }
        let mut bytes = Vec::new();
        for entry in rest {
            bytes.extend(serde_json::to_vec(entry)?);
            bytes.push(b'\n');
        }
        crate::home::write_private(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from_user: u64, text: &str) -> Kept {
        Kept::Message {
            from_user: UserId(from_user),
            from_device: DeviceId(1),
            from_phone: "+1555".into(),
            to_user: UserId(9),
            from_own_device: false,
            client_msg_id: text.into(),
            text: text.into(),
            server_ts_ms: 5,
        }
    }

    #[test]
    fn keeps_loads_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        let inbox = Inbox::new(&home);
        assert!(inbox.load().unwrap().is_empty());
        let receipt = Kept::Receipt {
            read: true,
            from_user: UserId(4),
            from_phone: "+1444".into(),
            client_msg_ids: vec!["a".into()],
            server_ts_ms: 6,
        };
        inbox.keep(&message(3, "one")).unwrap();
        inbox.keep(&receipt).unwrap();
        // A crash mid-append leaves a partial line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("inbox.jsonl"))
            .unwrap()
            .write_all(b"{\"entry\":\"mess")
            .unwrap();
        inbox.keep(&message(5, "two")).unwrap();
        assert_eq!(
            inbox.load().unwrap(),
            vec![message(3, "one"), receipt.clone(), message(5, "two")]
        );
        assert_eq!(receipt.peer(), UserId(4));
        inbox.replace(std::slice::from_ref(&receipt)).unwrap();
        assert_eq!(inbox.load().unwrap(), vec![receipt]);
        inbox.replace(&[]).unwrap();
        assert!(!dir.path().join("inbox.jsonl").exists());
        inbox.replace(&[]).unwrap();
    }

    #[test]
    fn ids_are_stored_as_bare_numbers() {
        // The line format of inboxes written before ids were typed.
        let line = r#"{"entry":"message","from_user":3,"from_device":1,"from_phone":"+1555","to_user":9,"from_own_device":false,"client_msg_id":"one","text":"one","server_ts_ms":5}"#;
        assert_eq!(serde_json::to_string(&message(3, "one")).unwrap(), line);
        assert_eq!(
            serde_json::from_str::<Kept>(line).unwrap(),
            message(3, "one")
        );
    }
}
