//! The local outbox: sends that have no ✓ yet, in the order they were made.
//!
//! It owns two things: the in-memory `Queue` the client actor sends from
//! (which entry goes next, which are in flight, which wait for a retry), and
//! the optional on-disk copy (`Store`) that lets a send survive the
//! process. Each pending send is one small file named by a monotonically
//! increasing sequence number, written atomically (temp file, fsync, rename,
//! directory fsync) before the send first goes on the wire and removed after
//! its ✓; loading sorts by that number, so resends keep the original order.
//! One file per send keeps the write path a single create and the removal a
//! single unlink, with nothing to compact.
//!
//! A file holds the send as JSON sealed with the state directory's key (see
//! `store.rs`): unsent messages are plaintext until they are encrypted for
//! their recipients, so they must not sit on disk readable. Files are 0600
//! in a 0700 directory; plaintext files of earlier versions (`*.json`) are
//! sealed when the outbox is opened. [`Outbox`] lists and cancels the sends
//! of a stopped client.
//!
//! Order: entries go out in sequence order and are pipelined. When one must
//! wait (a retryable server error, a recipient lookup), every later entry
//! that has not been written yet waits behind it. Entries already in flight
//! cannot be recalled, so a send refused with a retryable error (e.g.
//! `OVERLOADED`) may be overtaken by a later one that the server accepted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::warn;

use crate::error::{Error, StorageError};
use crate::ids::UserId;
use crate::store::{Sealer, StateFile, create_private_dir};

/// Default largest number of pending sends: generous for a person (days of
/// offline chatting), while bounding memory to what the payloads weigh.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Magic bytes opening a stored send.
const MAGIC: &[u8; 4] = b"SBOX";

/// Suffix of a stored send.
const FILE_SUFFIX: &str = ".send";

/// Suffix of a send being written; leftovers are deleted on load.
const TEMP_SUFFIX: &str = ".tmp";

/// Suffix of a plaintext send stored by an earlier version: sealed (and
/// renamed) when the outbox is opened.
const LEGACY_SUFFIX: &str = ".json";

/// Suffix given to a file that does not parse, so it is kept for inspection
/// but never retried.
const CORRUPT_SUFFIX: &str = ".corrupt";

/// A send waiting for its ✓.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingSend {
    /// Position in the outbox: sends go out in this order.
    pub seq: u64,
    /// The client message id, kept across retries and restarts.
    pub client_msg_id: String,
    /// The recipient, when known.
    pub to_user: Option<u64>,
    /// The recipient's phone number, when the send was addressed by phone.
    pub to_phone: Option<String>,
    /// When the send was made (ms since the Unix epoch; 0 for sends stored
    /// by a version that did not record it).
    #[serde(default)]
    pub queued_at_ms: u64,
    /// The client made the id for this send and no frame has carried it
    /// yet, so the server need not look for an earlier copy
    /// (`Send.first_attempt`). Not stored: a send loaded from the outbox
    /// may have gone out before the restart.
    #[serde(skip)]
    pub never_sent: bool,
    /// A resend after the server said the first one was never delivered
    /// (`Undelivered`): not resent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
    /// What to send.
    pub content: Content,
}

/// The payloads of a pending send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Content {
    /// One payload for every current device of the recipient; the device
    /// list is looked up, and fixed after `DEVICE_MISMATCH`, by the client.
    AllDevices {
        /// The payload.
        #[serde(with = "hex_payload")]
        payload: Bytes,
    },
    /// Explicit payloads per device; `DEVICE_MISMATCH` is the caller's to fix.
    PerDevice(Vec<StoredPayload>),
    /// One payload for every member device of a group, sealed with this
    /// device's sender key when it goes out.
    Group {
        /// The group.
        group_id: u64,
        /// The payload.
        #[serde(with = "hex_payload")]
        payload: Bytes,
    },
}

/// One device's payload in [`Content::PerDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredPayload {
    /// The recipient device.
    pub device_id: u32,
    /// The opaque payload.
    #[serde(with = "hex_payload")]
    pub payload: Bytes,
}

mod hex_payload {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A send waiting in an outbox directory, from [`Outbox::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueuedSend {
    /// Its client message id (what [`Outbox::cancel`] takes).
    pub client_msg_id: String,
    /// The recipient, when known.
    pub to_user: Option<UserId>,
    /// The recipient's phone number, when it was addressed by phone.
    pub to_phone: Option<String>,
    /// When it was made (ms since the Unix epoch); 0 when unknown (stored
    /// by an older version).
    pub queued_at_ms: u64,
}

/// The outbox of a device whose client is not running: list the sends
/// still waiting for their ✓ and cancel some, without a connection.
///
/// It holds the state directory's lock, like a running [`crate::Client`],
/// so the two never run at once. Every method blocks on the file system
/// (call it from `spawn_blocking` in async code).
///
/// # Example
///
/// ```no_run
/// # fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::Outbox;
/// let mut outbox = Outbox::open("/var/lib/myapp/sb-state", "/var/lib/myapp/sb-state/outbox")?;
/// for send in outbox.list() {
///     println!("{} to {:?}", send.client_msg_id, send.to_phone);
/// }
/// outbox.cancel("0123456789abcdef0123456789abcdef")?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Outbox {
    store: Store,
    sends: Vec<PendingSend>,
    /// Held for the lock.
    _state: StateFile,
}

impl Outbox {
    /// Opens the outbox in `outbox_dir` of the device whose state is in
    /// `state_dir` (the directories given to the client as
    /// [`crate::ClientConfig::outbox_dir`] and
    /// [`crate::ClientConfig::state_dir`]).
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] with [`crate::UsageError::StateDirInUse`] while a
    /// client (or another `Outbox`) uses `state_dir`; [`Error::Storage`]
    /// when the directories cannot be read.
    pub fn open(
        state_dir: impl Into<PathBuf>,
        outbox_dir: impl Into<PathBuf>,
    ) -> Result<Self, Error> {
        let state = StateFile::open(state_dir.into())?;
        let (store, sends) = Store::open(outbox_dir.into(), state.sealer())?;
        Ok(Self {
            store,
            sends,
            _state: state,
        })
    }

    /// The pending sends, in the order they will go out.
    #[must_use]
    pub fn list(&self) -> Vec<QueuedSend> {
        self.sends
            .iter()
            .map(|s| QueuedSend {
                client_msg_id: s.client_msg_id.clone(),
                to_user: s.to_user.map(UserId),
                to_phone: s.to_phone.clone(),
                queued_at_ms: s.queued_at_ms,
            })
            .collect()
    }

    /// Removes the pending send with this client message id, so it never
    /// goes out; returns false when there is none (it was sent, or
    /// cancelled already).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when its file cannot be removed.
    pub fn cancel(&mut self, client_msg_id: &str) -> Result<bool, Error> {
        let seqs: Vec<u64> = self
            .sends
            .iter()
            .filter(|s| s.client_msg_id == client_msg_id)
            .map(|s| s.seq)
            .collect();
        if seqs.is_empty() {
            return Ok(false);
        }
        self.store.remove(&seqs)?;
        self.store.sync_dir()?;
        self.sends.retain(|s| s.client_msg_id != client_msg_id);
        Ok(true)
    }
}

/// The sequence number of a stored send's file, and whether it is a
/// plaintext file of an earlier version.
fn file_seq(path: &Path) -> Option<(u64, bool)> {
    let name = path.file_name()?.to_str()?;
    let (digits, legacy) = match name.strip_suffix(FILE_SUFFIX) {
        Some(digits) => (digits, false),
        None => (name.strip_suffix(LEGACY_SUFFIX)?, true),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, legacy))
}

/// Opens a stored send's bytes (sealed, or plaintext JSON for `legacy`).
fn open_send(path: &Path, legacy: bool, sealer: &Sealer) -> Result<PendingSend, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let json = if legacy {
        bytes
    } else {
        sealer
            .open(MAGIC, &bytes, path)
            .map_err(|e| e.to_string())?
    };
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

fn read_send(path: &Path, sealer: &Sealer) -> Result<PendingSend, String> {
    let (seq, legacy) = file_seq(path).ok_or("not an outbox file name")?;
    let send = open_send(path, legacy, sealer)?;
    if send.seq != seq {
        return Err("sequence number does not match the file name".to_owned());
    }
    Ok(send)
}

/// The on-disk outbox. Every method blocks: call it from `spawn_blocking`.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    /// The state directory's key.
    sealer: Sealer,
}

impl Store {
    /// Opens (creating) `dir`, clears interrupted writes, sets aside files
    /// that do not parse, seals plaintext files of earlier versions, and
    /// returns the stored sends in order.
    pub(crate) fn open(
        dir: PathBuf,
        sealer: Sealer,
    ) -> Result<(Self, Vec<PendingSend>), StorageError> {
        create_private_dir(&dir)?;
        let mut sends = Vec::new();
        let mut legacy = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StorageError::io(&dir, e))? {
            let path = entry.map_err(|e| StorageError::io(&dir, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(TEMP_SUFFIX) {
                // Never renamed into place, so never sent: safe to drop.
                fs::remove_file(&path).map_err(|e| StorageError::io(&path, e))?;
                continue;
            }
            let Some((_, is_legacy)) = file_seq(&path) else {
                continue;
            };
            match read_send(&path, &sealer) {
                Ok(send) => {
                    if is_legacy {
                        legacy.push(path);
                    }
                    sends.push(send);
                }
                Err(why) => {
                    warn!(path = %path.display(), %why, "outbox file does not parse; setting it aside");
                    let mut aside = path.clone().into_os_string();
                    aside.push(CORRUPT_SUFFIX);
                    fs::rename(&path, &aside).map_err(|e| StorageError::io(&path, e))?;
                }
            }
        }
        sends.sort_by_key(|s| s.seq);
        let store = Self { dir, sealer };
        if !legacy.is_empty() {
            // Sealed copies first, so a crash in between leaves both (the
            // same send under the same seq), never neither.
            store.write(&sends)?;
            for path in legacy {
                fs::remove_file(&path).map_err(|e| StorageError::io(&path, e))?;
            }
        }
        Ok((store, sends))
    }

    fn path(&self, seq: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!("{seq:020}{suffix}"))
    }

    /// Durably stores `sends`, sealed: each is complete on disk before this
    /// returns.
    pub(crate) fn write(&self, sends: &[PendingSend]) -> Result<(), StorageError> {
        for send in sends {
            let path = self.path(send.seq, FILE_SUFFIX);
            let json = serde_json::to_vec(send)
                .map_err(|e| StorageError::io(&path, std::io::Error::other(e)))?;
            let sealed = self.sealer.seal(MAGIC, &json, &path)?;
            let temp = self.path(send.seq, &format!("{FILE_SUFFIX}{TEMP_SUFFIX}"));
            let mut options = OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(&temp)
                .map_err(|e| StorageError::io(&temp, e))?;
            file.write_all(&sealed)
                .and_then(|()| file.sync_all())
                .map_err(|e| StorageError::io(&temp, e))?;
            fs::rename(&temp, &path).map_err(|e| StorageError::io(&path, e))?;
        }
        if !sends.is_empty() {
            // One directory fsync per batch makes every rename durable.
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Removes the sends with these sequence numbers (missing ones are fine).
    pub(crate) fn remove(&self, seqs: &[u64]) -> Result<(), StorageError> {
        for seq in seqs {
            let path = self.path(*seq, FILE_SUFFIX);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(&path, e)),
            }
        }
        // No directory fsync: a removal lost in a crash only causes a
        // resend, which the server answers as a duplicate.
        Ok(())
    }

    /// Makes renames and removals in the directory durable.
    fn sync_dir(&self) -> Result<(), StorageError> {
        #[cfg(unix)]
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(&self.dir, e))?;
        Ok(())
    }
}

/// Sends that got their ✓ and are kept, until their ✓✓ or for at most
/// [`RETAIN_FOR`] (the server's queue lifetime), in case the server reports
/// them undelivered (the recipient's devices were replaced) and they must
/// be encrypted again for the new devices. A directory `sent/` beside the
/// outbox's files, one file per send named by its hex message id, moved
/// there from the outbox by a rename (no sync: losing one in a crash only
/// loses that resend). At most [`RETAIN_MAX`] are kept, the oldest go first.
#[derive(Debug)]
pub(crate) struct Retained {
    dir: PathBuf,
    /// Kept sends are moved here sealed, as in the outbox.
    sealer: Sealer,
}

/// How long a sent message is kept for a resend.
pub(crate) const RETAIN_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Most sent messages kept for a resend.
pub(crate) const RETAIN_MAX: usize = 1000;

impl Retained {
    /// Opens (creating) `outbox_dir/sent` and drops what is too old or too
    /// many.
    pub(crate) fn open(outbox: &Store) -> Result<Self, StorageError> {
        let dir = outbox.dir.join("sent");
        create_private_dir(&dir)?;
        let this = Self {
            dir,
            sealer: outbox.sealer.clone(),
        };
        this.prune()?;
        Ok(this)
    }

    fn path(&self, client_msg_id: &str) -> PathBuf {
        self.dir
            .join(format!("{}{FILE_SUFFIX}", hex::encode(client_msg_id)))
    }

    /// Moves outbox entry `seq` of `outbox` here, as `client_msg_id`.
    pub(crate) fn keep(
        &self,
        outbox: &Store,
        seq: u64,
        client_msg_id: &str,
    ) -> Result<(), StorageError> {
        let from = outbox.path(seq, FILE_SUFFIX);
        let to = self.path(client_msg_id);
        match fs::rename(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(&from, e)),
        }
    }

    /// Takes the kept send `client_msg_id` out, if it is here.
    pub(crate) fn take(&self, client_msg_id: &str) -> Result<Option<PendingSend>, StorageError> {
        let path = self.path(client_msg_id);
        if !path.exists() {
            return Ok(None);
        }
        let send = open_send(&path, false, &self.sealer);
        self.forget(client_msg_id)?;
        match send {
            Ok(send) => Ok(Some(send)),
            Err(why) => {
                warn!(path = %path.display(), %why, "kept send does not parse; dropped");
                Ok(None)
            }
        }
    }

    /// Drops the kept send `client_msg_id` (delivered).
    pub(crate) fn forget(&self, client_msg_id: &str) -> Result<(), StorageError> {
        let path = self.path(client_msg_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(&path, e)),
        }
    }

    /// Drops sends kept longer than [`RETAIN_FOR`], then the oldest past
    /// [`RETAIN_MAX`].
    pub(crate) fn prune(&self) -> Result<(), StorageError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| StorageError::io(&self.dir, e))?;
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            files.push((modified, entry.path()));
        }
        files.sort();
        let now = std::time::SystemTime::now();
        let excess = files.len().saturating_sub(RETAIN_MAX);
        for (i, (modified, path)) in files.iter().enumerate() {
            let old = now
                .duration_since(*modified)
                .is_ok_and(|age| age > RETAIN_FOR);
            if i < excess || old {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }
}

/// Where an entry stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Not on the wire; goes next when its turn comes.
    Ready,
    /// Written; waiting for the server's answer.
    InFlight,
    /// Waiting for a lookup of the recipient's devices or for key bundles.
    Resolving,
    /// Refused with a retryable error; goes again at this time.
    RetryAt(Instant),
}

/// One pending send and its delivery state.
#[derive(Debug)]
pub(crate) struct Entry {
    pub send: PendingSend,
    pub state: State,
    /// For [`Content::AllDevices`]: the device list to address, once known.
    pub devices: Option<Vec<u32>>,
    /// `DEVICE_MISMATCH` answers so far.
    pub mismatches: u32,
    /// Retryable errors so far (for the retry backoff).
    pub retries: u32,
    /// Key bundle fetches on the wire.
    pub fetches: usize,
    /// Fetches so far that listed a device without keys.
    pub key_waits: u32,
    /// The fetches on the wire found a device without keys: wait a little
    /// before trying again.
    pub key_wait: bool,
    /// For [`Content::Group`]: the client message id of its sender-key
    /// requests (the same for every retry).
    pub key_round: Option<String>,
    /// For [`Content::Group`]: `SendGroupKeys` requests on the wire.
    pub key_parts: usize,
    /// For [`Content::Group`]: members this message's key does not go to
    /// (refused for good; they cannot read it).
    pub skip: std::collections::BTreeSet<u64>,
    /// For [`Content::Group`]: the other members when it was sealed (its
    /// receipt tally counts out of them).
    pub group_others: u32,
}

/// What the pump should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send the entry with this sequence number.
    Send(u64),
    /// Nothing may go before this time (a retry at the head of the line),
    /// or, with `None`, before a lookup completes.
    Blocked(Option<Instant>),
    /// Everything is in flight or the outbox is empty.
    Idle,
}

/// The in-memory outbox, ordered by sequence number.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    entries: BTreeMap<u64, Entry>,
    next_seq: u64,
}

impl Queue {
    /// A queue holding `sends` (already stored), ready to go in order.
    pub(crate) fn new(sends: Vec<PendingSend>) -> Self {
        let mut queue = Self {
            entries: BTreeMap::new(),
            next_seq: 1,
        };
        for send in sends {
            queue.insert(send);
        }
        queue
    }

    /// A sequence number for a new send, larger than any before.
    pub(crate) fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    pub(crate) fn insert(&mut self, send: PendingSend) {
        self.next_seq = self.next_seq.max(send.seq + 1);
        self.entries.insert(
            send.seq,
            Entry {
                send,
                state: State::Ready,
                devices: None,
                mismatches: 0,
                retries: 0,
                fetches: 0,
                key_waits: 0,
                key_wait: false,
                key_round: None,
                key_parts: 0,
                skip: std::collections::BTreeSet::new(),
                group_others: 0,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&seq)
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<Entry> {
        self.entries.remove(&seq)
    }

    /// The next entry to write, in order, honouring head-of-line waits.
    pub(crate) fn next(&self, now: Instant) -> Next {
        for (seq, entry) in &self.entries {
            match entry.state {
                State::InFlight => {}
                State::Ready => return Next::Send(*seq),
                State::RetryAt(at) if at <= now => return Next::Send(*seq),
                State::RetryAt(at) => return Next::Blocked(Some(at)),
                State::Resolving => return Next::Blocked(None),
            }
        }
        Next::Idle
    }

    /// The connection dropped: nothing is in flight any more. Pending
    /// retries keep their time.
    pub(crate) fn reset_in_flight(&mut self) {
        for entry in self.entries.values_mut() {
            if matches!(entry.state, State::InFlight | State::Resolving) {
                entry.state = State::Ready;
            }
        }
    }

    /// Sequence numbers of every entry, in order.
    #[cfg(test)]
    pub(crate) fn seqs(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn send(seq: u64, text: &str) -> PendingSend {
        PendingSend {
            seq,
            client_msg_id: format!("id-{seq}"),
            to_user: Some(7),
            to_phone: None,
            queued_at_ms: 1_700_000_000_000 + seq,
            never_sent: false,
            resent: false,
            content: Content::AllDevices {
                payload: Bytes::from(text.to_owned()),
            },
        }
    }

    /// A state directory's key, and the directory (its lock is held).
    fn key(dir: &Path) -> (Sealer, StateFile) {
        let state = StateFile::open(dir.join("state")).unwrap();
        (state.sealer(), state)
    }

    #[test]
    fn store_round_trips_in_order_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let (sealer, state) = key(dir.path());
        let path = dir.path().join("outbox");
        let (store, loaded) = Store::open(path.clone(), sealer.clone()).unwrap();
        assert!(loaded.is_empty());
        // Written out of order, across two batches, with binary payloads.
        let mut per_device = send(2, "");
        per_device.to_user = None;
        per_device.to_phone = Some("+15550001111".into());
        per_device.content = Content::PerDevice(vec![
            StoredPayload {
                device_id: 1,
                payload: Bytes::from_static(&[0, 255, 10]),
            },
            StoredPayload {
                device_id: 3,
                payload: Bytes::new(),
            },
        ]);
        store.write(&[send(10, "ten"), per_device.clone()]).unwrap();
        store.write(&[send(3, "three")]).unwrap();
        let (store, loaded) = Store::open(path.clone(), sealer).unwrap();
        assert_eq!(
            loaded.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![2, 3, 10]
        );
        assert_eq!(loaded[0], per_device);
        assert_eq!(loaded[2], send(10, "ten"));

        store.remove(&[3, 99]).unwrap();
        drop((store, state));
        let outbox = Outbox::open(dir.path().join("state"), &path).unwrap();
        assert_eq!(
            outbox
                .list()
                .iter()
                .map(|s| s.client_msg_id.as_str())
                .collect::<Vec<_>>(),
            vec!["id-2", "id-10"]
        );
    }

    #[test]
    fn files_are_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let (sealer, _state) = key(dir.path());
        let path = dir.path().join("outbox");
        let (store, _) = Store::open(path.clone(), sealer).unwrap();
        store.write(&[send(1, "a secret marker")]).unwrap();
        let file = path.join("00000000000000000001.send");
        let raw = fs::read(&file).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        assert!(!raw.windows(4).any(|w| w == b"id-1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file), 0o600);
            assert_eq!(mode(&path), 0o700);
        }
    }

    #[test]
    fn plaintext_files_of_earlier_versions_are_sealed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (sealer, _state) = key(dir.path());
        let legacy = dir.path().join("00000000000000000005.json");
        let mut old = send(5, "old secret");
        old.queued_at_ms = 0;
        let mut json = serde_json::to_value(&old).unwrap();
        json.as_object_mut().unwrap().remove("queued_at_ms");
        fs::write(&legacy, serde_json::to_vec(&json).unwrap()).unwrap();
        let (_, loaded) = Store::open(dir.path().to_owned(), sealer.clone()).unwrap();
        assert_eq!(loaded, vec![old.clone()]);
        assert!(!legacy.exists());
        let sealed = fs::read(dir.path().join("00000000000000000005.send")).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let (_, loaded) = Store::open(dir.path().to_owned(), sealer).unwrap();
        assert_eq!(loaded, vec![old]);
    }

    #[test]
    fn cancel_removes_one_send_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        {
            let (sealer, _state) = key(dir.path());
            let (store, _) = Store::open(path.clone(), sealer).unwrap();
            store.write(&[send(1, "a"), send(2, "b")]).unwrap();
        }
        let mut outbox = Outbox::open(dir.path().join("state"), &path).unwrap();
        assert!(matches!(
            Outbox::open(dir.path().join("state"), &path),
            Err(Error::Usage(crate::UsageError::StateDirInUse(_)))
        ));
        assert!(outbox.cancel("id-1").unwrap());
        assert!(!outbox.cancel("id-1").unwrap());
        assert_eq!(outbox.list().len(), 1);
        drop(outbox);
        let outbox = Outbox::open(dir.path().join("state"), &path).unwrap();
        let left = outbox.list();
        assert_eq!(left[0].client_msg_id, "id-2");
        assert_eq!(left[0].queued_at_ms, 1_700_000_000_002);
    }

    #[test]
    fn open_clears_temp_files_and_sets_aside_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (sealer, _state) = key(dir.path());
        let out = dir.path().join("outbox");
        let (store, _) = Store::open(out.clone(), sealer.clone()).unwrap();
        store.write(&[send(1, "ok")]).unwrap();
        fs::write(out.join("00000000000000000002.send.tmp"), b"half").unwrap();
        fs::write(out.join("00000000000000000003.json"), b"{not json").unwrap();
        // A file whose name and content disagree is corrupt too.
        let mut wrong = serde_json::to_vec(&send(9, "x")).unwrap();
        wrong.push(b'\n');
        fs::write(out.join("00000000000000000004.json"), wrong).unwrap();
        // As is one sealed under another key.
        fs::write(out.join("00000000000000000006.send"), b"SBOX\x01garbage").unwrap();
        fs::write(out.join("README"), b"ignored").unwrap();

        let (_, loaded) = Store::open(out.clone(), sealer).unwrap();
        assert_eq!(loaded, vec![send(1, "ok")]);
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "00000000000000000001.send",
                "00000000000000000003.json.corrupt",
                "00000000000000000004.json.corrupt",
                "00000000000000000006.send.corrupt",
                "README",
            ]
        );
    }

    #[test]
    fn sequence_numbers_continue_after_loaded_sends() {
        let mut queue = Queue::new(vec![send(5, "a"), send(9, "b")]);
        assert_eq!(queue.alloc_seq(), 10);
        assert_eq!(queue.alloc_seq(), 11);
        let mut empty = Queue::new(Vec::new());
        assert_eq!(empty.alloc_seq(), 1);
    }

    #[test]
    fn next_goes_in_order_and_skips_in_flight() {
        let now = Instant::now();
        let mut queue = Queue::new(vec![send(1, "a"), send(2, "b"), send(3, "c")]);
        assert_eq!(queue.next(now), Next::Send(1));
        queue.get_mut(1).unwrap().state = State::InFlight;
        assert_eq!(queue.next(now), Next::Send(2));
        queue.get_mut(2).unwrap().state = State::InFlight;
        queue.get_mut(3).unwrap().state = State::InFlight;
        assert_eq!(queue.next(now), Next::Idle);
        // Answers may come out of order; the rest stays in order.
        queue.remove(2);
        queue.reset_in_flight();
        assert_eq!(queue.seqs(), vec![1, 3]);
        assert_eq!(queue.next(now), Next::Send(1));
    }

    #[test]
    fn a_waiting_entry_holds_back_later_ones() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut queue = Queue::new(vec![send(1, "a"), send(2, "b"), send(3, "c")]);
        queue.get_mut(1).unwrap().state = State::InFlight;
        queue.get_mut(2).unwrap().state = State::RetryAt(later);
        assert_eq!(queue.next(now), Next::Blocked(Some(later)));
        assert_eq!(queue.next(later), Next::Send(2));
        queue.get_mut(2).unwrap().state = State::Resolving;
        assert_eq!(queue.next(later), Next::Blocked(None));
        // A reconnect keeps the retry time but forgets lookups in flight.
        queue.get_mut(2).unwrap().state = State::RetryAt(later);
        queue.reset_in_flight();
        assert_eq!(queue.next(now), Next::Send(1));
        queue.get_mut(1).unwrap().state = State::InFlight;
        assert_eq!(queue.next(now), Next::Blocked(Some(later)));
    }

    #[test]
    fn content_json_is_readable() {
        let json = serde_json::to_string(&send(1, "hi")).unwrap();
        assert_eq!(
            json,
            r#"{"seq":1,"client_msg_id":"id-1","to_user":7,"to_phone":null,"queued_at_ms":1700000000001,"content":{"all_devices":{"payload":"6869"}}}"#
        );
    }
}
