//! The local outbox: sends that have no ✓ yet, in the order they were made.
//!
//! It owns two things: the in-memory `Queue` the client actor sends from
//! (which entry goes next, which are in flight, which wait for a retry), and
//! the optional on-disk copy (`Store`) that lets a send survive the
//! process. Each pending send is one small JSON file named by a monotonically
//! increasing sequence number, written atomically (temp file, fsync, rename,
//! directory fsync) before the send first goes on the wire and removed after
//! its ✓; loading sorts by that number, so resends keep the original order.
//! One file per send keeps the write path a single create and the removal a
//! single unlink, with nothing to compact.
//!
//! Order: entries go out in sequence order and are pipelined. When one must
//! wait (a retryable server error, a recipient lookup), every later entry
//! that has not been written yet waits behind it. Entries already in flight
//! cannot be recalled, so a send refused with a retryable error (e.g.
//! `OVERLOADED`) may be overtaken by a later one that the server accepted.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::warn;

use crate::error::StorageError;

/// Default largest number of pending sends: generous for a person (days of
/// offline chatting), while bounding memory to what the payloads weigh.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Suffix of a stored send.
const FILE_SUFFIX: &str = ".json";

/// Suffix of a send being written; leftovers are deleted on load.
const TEMP_SUFFIX: &str = ".json.tmp";

/// Suffix given to a file that does not parse, so it is kept for inspection
/// but never retried.
const CORRUPT_SUFFIX: &str = ".corrupt";

/// A send waiting for its ✓.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSend {
    /// Position in the outbox: sends go out in this order.
    pub seq: u64,
    /// The client message id, kept across retries and restarts.
    pub client_msg_id: String,
    /// The recipient, when known.
    pub to_user: Option<u64>,
    /// The recipient's phone number, when the send was addressed by phone.
    pub to_phone: Option<String>,
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
pub enum Content {
    /// One payload for every current device of the recipient; the device
    /// list is looked up, and fixed after `DEVICE_MISMATCH`, by the client.
    AllDevices {
        /// The payload.
        #[serde(with = "hex_payload")]
        payload: Bytes,
    },
    /// Explicit payloads per device; `DEVICE_MISMATCH` is the caller's to fix.
    PerDevice(Vec<StoredPayload>),
}

/// One device's payload in [`Content::PerDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPayload {
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

/// Reads the pending sends stored in `dir`, in order, without changing
/// anything (for tools that want to show what is waiting).
///
/// # Errors
///
/// [`StorageError::Io`] when the directory cannot be read. Files that do not
/// parse are skipped.
pub fn pending_sends(dir: &Path) -> Result<Vec<PendingSend>, StorageError> {
    let mut sends = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sends),
        Err(e) => return Err(StorageError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io(dir, e))?;
        let path = entry.path();
        if file_seq(&path).is_some()
            && let Ok(send) = read_send(&path)
        {
            sends.push(send);
        }
    }
    sends.sort_by_key(|s| s.seq);
    Ok(sends)
}

fn file_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(FILE_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads a stored send, whatever its file is named.
fn read_any_send(path: &Path) -> Result<PendingSend, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn read_send(path: &Path) -> Result<PendingSend, String> {
    let send = read_any_send(path)?;
    if Some(send.seq) != file_seq(path) {
        return Err("sequence number does not match the file name".to_owned());
    }
    Ok(send)
}

/// The on-disk outbox. Every method blocks: call it from `spawn_blocking`.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) `dir`, clears interrupted writes, sets aside files
    /// that do not parse, and returns the stored sends in order.
    pub(crate) fn open(dir: PathBuf) -> Result<(Self, Vec<PendingSend>), StorageError> {
        fs::create_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
        let mut sends = Vec::new();
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
            if file_seq(&path).is_none() {
                continue;
            }
            match read_send(&path) {
                Ok(send) => sends.push(send),
                Err(why) => {
                    warn!(path = %path.display(), %why, "outbox file does not parse; setting it aside");
                    let mut aside = path.clone().into_os_string();
                    aside.push(CORRUPT_SUFFIX);
                    fs::rename(&path, &aside).map_err(|e| StorageError::io(&path, e))?;
                }
            }
        }
        sends.sort_by_key(|s| s.seq);
        Ok((Self { dir }, sends))
    }

    fn path(&self, seq: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!("{seq:020}{suffix}"))
    }

    /// Durably stores `sends`: each is complete on disk before this returns.
    pub(crate) fn write(&self, sends: &[PendingSend]) -> Result<(), StorageError> {
        for send in sends {
            let temp = self.path(send.seq, TEMP_SUFFIX);
            let json = serde_json::to_vec(send)
                .map_err(|e| StorageError::io(&temp, std::io::Error::other(e)))?;
            let mut file = File::create(&temp).map_err(|e| StorageError::io(&temp, e))?;
            file.write_all(&json)
                .and_then(|()| file.sync_all())
                .map_err(|e| StorageError::io(&temp, e))?;
            let path = self.path(send.seq, FILE_SUFFIX);
            fs::rename(&temp, &path).map_err(|e| StorageError::io(&path, e))?;
        }
        if !sends.is_empty() {
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

    /// Makes renames in the directory durable.
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
}

/// How long a sent message is kept for a resend.
pub(crate) const RETAIN_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Most sent messages kept for a resend.
pub(crate) const RETAIN_MAX: usize = 1000;

impl Retained {
    /// Opens (creating) `outbox_dir/sent` and drops what is too old or too
    /// many.
    pub(crate) fn open(outbox_dir: &Path) -> Result<Self, StorageError> {
        let dir = outbox_dir.join("sent");
        fs::create_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
        let this = Self { dir };
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
        let send = read_any_send(&path);
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
            never_sent: false,
            resent: false,
            content: Content::AllDevices {
                payload: Bytes::from(text.to_owned()),
            },
        }
    }

    #[test]
    fn store_round_trips_in_order_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let (store, loaded) = Store::open(path.clone()).unwrap();
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
        let (store, loaded) = Store::open(path.clone()).unwrap();
        assert_eq!(
            loaded.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![2, 3, 10]
        );
        assert_eq!(loaded[0], per_device);
        assert_eq!(loaded[2], send(10, "ten"));

        store.remove(&[3, 99]).unwrap();
        assert_eq!(
            pending_sends(&path)
                .unwrap()
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            vec![2, 10]
        );
    }

    #[test]
    fn open_clears_temp_files_and_sets_aside_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path().to_owned()).unwrap();
        store.write(&[send(1, "ok")]).unwrap();
        fs::write(dir.path().join("00000000000000000002.json.tmp"), b"half").unwrap();
        fs::write(dir.path().join("00000000000000000003.json"), b"{not json").unwrap();
        // A file whose name and content disagree is corrupt too.
        let mut wrong = serde_json::to_vec(&send(9, "x")).unwrap();
        wrong.push(b'\n');
        fs::write(dir.path().join("00000000000000000004.json"), wrong).unwrap();
        fs::write(dir.path().join("README"), b"ignored").unwrap();

        let (_, loaded) = Store::open(dir.path().to_owned()).unwrap();
        assert_eq!(loaded, vec![send(1, "ok")]);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "00000000000000000001.json",
                "00000000000000000003.json.corrupt",
                "00000000000000000004.json.corrupt",
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
            r#"{"seq":1,"client_msg_id":"id-1","to_user":7,"to_phone":null,"content":{"all_devices":{"payload":"6869"}}}"#
        );
    }
}
