//! The state directory: `account.json` (the device's credentials, mode
//! 0600), `pending.json` (a registration waiting for its code), `outbox/`
//! (the SDK's pending sends, sealed with the state key), `state/` (the SDK's
//! encrypted end-to-end encryption keys and sessions, locked by the SDK
//! while a client or outbox uses them), `contacts.json` (phones seen, by
//! user id: see `contacts`), `inbox.jsonl` (entries acknowledged before they
//! were shown) and `lock` (one sbchat per home at a time, for the account
//! files: two would also connect as the same device and replace each other).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use switchboard_client::Credentials;

use crate::cli::UsageError;

/// The registered device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    /// The server it is registered with.
    pub server: String,
    #[serde(flatten)]
    pub creds: Credentials,
}

/// A registration waiting for `sbchat verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub server: String,
    pub phone: String,
    /// When the code stops being valid (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// Held while a command uses the home; released on drop (the OS releases
/// it if the process dies).
#[derive(Debug)]
pub struct HomeLock {
    _file: File,
}

#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `--home`, else `<data dir>/sbchat`.
    pub fn resolve(dir: Option<PathBuf>) -> Result<Self> {
        let dir = match dir {
            Some(dir) => dir,
            None => dirs::data_dir().map(|d| d.join("sbchat")).ok_or_else(|| {
                anyhow!(UsageError(
                    "no data directory on this system; pass --home DIR".into()
                ))
            })?,
        };
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.dir.join("outbox")
    }

    /// The SDK's encrypted crypto store (identity keys, sessions).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    fn pending_path(&self) -> PathBuf {
        self.dir.join("pending.json")
    }

    fn create(&self) -> Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }

    /// Takes the home's lock, failing at once if another sbchat holds it.
    pub fn lock(&self) -> Result<HomeLock> {
        self.create()?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(HomeLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => bail!(
                "another sbchat is using {} (one connection per device; use another --home for a second account)",
                self.dir.display()
            ),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    pub fn account(&self) -> Result<Option<Account>> {
        read_json(&self.account_path())
    }

    pub fn require_account(&self) -> Result<Account> {
        self.account()?.ok_or_else(|| {
            anyhow!(
                "no account in {}: run `sbchat register <phone>` then `sbchat verify <code>`",
                self.dir.display()
            )
        })
    }

    pub fn save_account(&self, account: &Account) -> Result<()> {
        self.create()?;
        write_private(&self.account_path(), &serde_json::to_vec_pretty(account)?)
    }

    pub fn pending(&self) -> Result<Option<Pending>> {
        read_json(&self.pending_path())
    }

    pub fn save_pending(&self, pending: &Pending) -> Result<()> {
        self.create()?;
        write_private(&self.pending_path(), &serde_json::to_vec_pretty(pending)?)
    }

    pub fn remove_pending(&self) -> Result<()> {
        let path = self.pending_path();
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    fn contacts_path(&self) -> PathBuf {
        self.dir.join("contacts.json")
    }

    pub fn read_contacts<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        read_json(&self.contacts_path())
    }

    pub fn save_contacts(&self, bytes: &[u8]) -> Result<()> {
        self.create()?;
        write_private(&self.contacts_path(), bytes)
    }

    /// Deletes pending sends (they belong to a previous account).
    pub fn clear_outbox(&self) -> Result<()> {
        let dir = self.outbox_dir();
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{} is corrupt", path.display()))
}

/// Replaces `path` atomically with `bytes`, readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(".tmp");
    let temp = PathBuf::from(temp_name);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&temp)
        .with_context(|| format!("cannot write {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temp.display()))?;
    fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(parent) = path.parent() {
        // Make the rename durable; failure here only risks the old content.
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_round_trips_privately() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("h"))).unwrap();
        assert!(home.account().unwrap().is_none());
        let account = Account {
            server: "127.0.0.1:5222".into(),
            creds: Credentials::new(
                switchboard_client::UserId(7),
                switchboard_client::DeviceId(1),
                vec![1, 2, 255],
                "+15550001111".into(),
            ),
        };
        home.save_account(&account).unwrap();
        let text = fs::read_to_string(dir.path().join("h/account.json")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["credential"], "0102ff");
        assert_eq!(value["server"], "127.0.0.1:5222");
        assert_eq!(value["user_id"], 7);
        let loaded = home.account().unwrap().unwrap();
        assert_eq!(loaded.creds, account.creds);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("h/account.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn pending_round_trips_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        let pending = Pending {
            server: "ws://h:8080/ws".into(),
            phone: "+1".into(),
            expires_at_ms: 5,
        };
        home.save_pending(&pending).unwrap();
        assert_eq!(home.pending().unwrap(), Some(pending));
        home.remove_pending().unwrap();
        home.remove_pending().unwrap();
        assert_eq!(home.pending().unwrap(), None);
    }

    #[test]
    fn one_sbchat_per_home() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        let lock = home.lock().unwrap();
        assert!(home.lock().is_err());
        drop(lock);
        home.lock().unwrap();
    }
}
