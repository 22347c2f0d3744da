//! End-to-end encryption on the client: the device's Olm account, its
//! pairwise sessions with other devices, the identity keys it has learned,
//! and the de-duplication window that must survive restarts with them.
//!
//! Everything here is synchronous and does no I/O: the client actor owns one
//! `Crypto` and persists its snapshot through the crate's `store` module
//! before any ciphertext made from new state leaves the process (so a crash
//! can never make a message key be used twice).
//!
//! - `envelope`: the wire and plaintext envelopes (internal);
//! - [`safety`]: safety numbers.
//!
//! Trust model: keys come from the server's key directory and are accepted
//! on first use, after checking that each one is signed by the device's
//! Ed25519 identity key. Users compare [`safety`] numbers to detect a
//! lying server; a change of a peer's device keys is reported.

#[doc(hidden)]
pub mod envelope;
pub(crate) mod group;
pub mod safety;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchboard_proto::pb;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::error::CryptoError;
use crate::ids::{DeviceId, UserId};
use crate::recent::Recent;
use envelope::{Plaintext, decode_wire, encode_wire};

/// Label signed with the identity Curve25519 key.
pub const IDENTITY_LABEL: &[u8] = b"switchboard identity v1";

/// Label signed with each one-time and fallback key.
pub const KEY_LABEL: &[u8] = b"switchboard key v1";

/// One-time keys kept in stock on the server: enough for a burst of new
/// contacts between two connections, far below the server's cap of 500.
pub const ONE_TIME_KEY_TARGET: u32 = 50;

/// Refill when the stock falls below this (the server pushes `KeysLow` at
/// the same threshold).
pub const ONE_TIME_KEY_LOW: u32 = 10;

/// The server accepts at most this many one-time keys per upload.
const MAX_KEYS_PER_UPLOAD: usize = 100;

/// Sessions kept per peer device: the newest encrypts; older ones still
/// decrypt messages that were in flight when a new session replaced them.
const MAX_SESSIONS_PER_DEVICE: usize = 3;

/// Message ids remembered for de-duplication across restarts.
pub(crate) const DEDUP_CAPACITY: usize = 10_000;

/// Decrypted messages kept until the application acknowledges them, so a
/// redelivery after a restart (whose Olm key is already used up) can be
/// handed over again. Past this, the oldest are dropped (a redelivery of
/// those is then reported as undecryptable).
const MAX_UNACKED_PLAINTEXTS: usize = 4096;

/// Version of the snapshot layout.
const SNAPSHOT_FORMAT: u32 = 1;

/// A device's public identity keys, as learned and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceIdentity {
    pub curve25519: [u8; 32],
    pub ed25519: [u8; 32],
}

/// A decrypted message waiting for the application's ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Decrypted {
    pub from_user: u64,
    pub from_device: u32,
    pub from_phone: String,
    pub to_user: u64,
    pub client_msg_id: String,
    #[serde(with = "hex_bytes")]
    pub body: Bytes,
    pub sent_at_ms: u64,
    pub server_ts_ms: u64,
    /// The group, for a group message (0: none).
    #[serde(default)]
    pub group_id: u64,
    /// Its place in the group's order.
    #[serde(default)]
    pub group_seq: u64,
}

mod hex_bytes {
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

/// What a batch of key bundles changed.
#[derive(Debug, Default)]
pub(crate) struct BundleOutcome {
    /// Devices listed without keys (not yet published).
    pub keyless: Vec<u32>,
    /// The user's set of device keys changed from a known, non-empty one.
    pub identity_changed: bool,
    /// The user's set of devices changed from a known, non-empty one.
    pub devices_changed: Option<DeviceChange>,
}

/// A peer's device set, changed from the one last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceChange {
    /// The devices now, ascending.
    pub devices: Vec<u32>,
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
}

/// A decrypted payload.
#[derive(Debug)]
pub(crate) struct Opened {
    pub plaintext: Plaintext,
    /// The sender's set of device keys changed (a new device or new keys).
    /// (A change of its device set is reported by the refresh of its
    /// devices that a message from an unknown device starts.)
    pub identity_changed: bool,
}

#[derive(Serialize, Deserialize)]
struct StoredSessions {
    user_id: u64,
    device_id: u32,
    sessions: Vec<SessionPickle>,
}

#[derive(Serialize, Deserialize)]
struct StoredIdentity {
    user_id: u64,
    device_id: u32,
    identity: DeviceIdentity,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    user_id: u64,
    device_id: u32,
    account: AccountPickle,
    sessions: Vec<StoredSessions>,
    identities: Vec<StoredIdentity>,
    own_devices: Option<Vec<u32>>,
    /// (sender, sender's device, client message id, queue seq), oldest first.
    seen: Vec<(u64, u32, String, u64)>,
    unacked: Vec<(u64, Decrypted)>,
    /// Megolm sender keys (absent in snapshots from before groups).
    #[serde(default)]
    groups: group::StoredGroupKeys,
}

/// The device's end-to-end encryption state.
pub(crate) struct Crypto {
    user_id: u64,
    device_id: u32,
    account: Account,
    /// Newest first.
    sessions: HashMap<(u64, u32), Vec<Session>>,
    /// Known identities of current devices, by user then device. For this
    /// account: its other devices.
    identities: BTreeMap<u64, BTreeMap<u32, DeviceIdentity>>,
    /// Each user's device keys when last compared, to report changes.
    baseline: HashMap<u64, BTreeSet<[u8; 32]>>,
    /// Each user's devices when last compared, to report changes.
    device_baseline: HashMap<u64, BTreeSet<u32>>,
    /// This account's other devices, once known.
    own_devices: Option<Vec<u32>>,
    /// (sender, sender's device, client message id) → queue seq of messages
    /// already handled.
    pub(crate) seen: Recent<(u64, u32, String), u64>,
    /// Queue seq → decrypted message, until the application acks it.
    unacked: BTreeMap<u64, Decrypted>,
    /// Megolm sender keys, sent and received.
    groups: group::GroupKeys,
    dirty: bool,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], String> {
    bytes
        .try_into()
        .map_err(|_| format!("{what} is {} bytes, not 32", bytes.len()))
}

/// Checks a device's identity keys and their self-signature.
fn verify_identity(keys: &pb::IdentityKeys) -> Result<DeviceIdentity, String> {
    let curve25519 = key32(&keys.curve25519, "identity Curve25519 key")?;
    let ed25519 = key32(&keys.ed25519, "identity Ed25519 key")?;
    let signer = Ed25519PublicKey::from_slice(&ed25519).map_err(|e| e.to_string())?;
    let signature = Ed25519Signature::from_slice(&keys.signature).map_err(|e| e.to_string())?;
    signer
        .verify(&[IDENTITY_LABEL, &curve25519].concat(), &signature)
        .map_err(|_| "bad identity signature".to_owned())?;
    Ok(DeviceIdentity {
        curve25519,
        ed25519,
    })
}

/// Checks a one-time or fallback key's signature by `identity`.
fn verify_key(
    identity: &DeviceIdentity,
    key: &pb::SignedKey,
) -> Result<Curve25519PublicKey, String> {
    let public = key32(&key.public_key, "key")?;
    let signer = Ed25519PublicKey::from_slice(&identity.ed25519).map_err(|e| e.to_string())?;
    let signature = Ed25519Signature::from_slice(&key.signature).map_err(|e| e.to_string())?;
    signer
        .verify(&[KEY_LABEL, &public].concat(), &signature)
        .map_err(|_| format!("bad signature on key {:?}", key.key_id))?;
    Ok(Curve25519PublicKey::from_bytes(public))
}

impl Crypto {
    /// A new device identity.
    pub(crate) fn new(user_id: u64, device_id: u32) -> Self {
        let mut account = Account::new();
        account.generate_fallback_key();
        Self {
            user_id,
            device_id,
            account,
            sessions: HashMap::new(),
            identities: BTreeMap::new(),
            baseline: HashMap::new(),
            device_baseline: HashMap::new(),
            own_devices: None,
            seen: Recent::new(DEDUP_CAPACITY),
            unacked: BTreeMap::new(),
            groups: group::GroupKeys::default(),
            dirty: true,
        }
    }

    /// Restores a snapshot; `None` when it belongs to another device (the
    /// caller then starts afresh).
    pub(crate) fn restore(
        bytes: &[u8],
        user_id: u64,
        device_id: u32,
    ) -> Result<Option<Self>, CryptoError> {
        let snap: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| CryptoError::State(e.to_string()))?;
        if snap.format != SNAPSHOT_FORMAT {
            return Err(CryptoError::State(format!(
                "unknown snapshot format {}",
                snap.format
            )));
        }
        if (snap.user_id, snap.device_id) != (user_id, device_id) {
            return Ok(None);
        }
        let mut crypto = Self {
            user_id,
            device_id,
            account: Account::from_pickle(snap.account),
            sessions: HashMap::new(),
            identities: BTreeMap::new(),
            baseline: HashMap::new(),
            device_baseline: HashMap::new(),
            own_devices: snap.own_devices,
            seen: Recent::new(DEDUP_CAPACITY),
            unacked: snap.unacked.into_iter().collect(),
            groups: group::GroupKeys::restore(snap.groups),
            dirty: false,
        };
        for s in snap.sessions {
            crypto.sessions.insert(
                (s.user_id, s.device_id),
                s.sessions.into_iter().map(Session::from_pickle).collect(),
            );
        }
        for i in snap.identities {
            crypto
                .identities
                .entry(i.user_id)
                .or_default()
                .insert(i.device_id, i.identity);
        }
        let users: Vec<u64> = crypto.identities.keys().copied().collect();
        for user in users {
            let keys = crypto.key_set(user);
            crypto.baseline.insert(user, keys);
            let devices = crypto.device_set(user);
            crypto.device_baseline.insert(user, devices);
        }
        for (from_user, from_device, id, seq) in snap.seen {
            crypto.seen.insert((from_user, from_device, id), seq);
        }
        Ok(Some(crypto))
    }

    /// The whole state, serialized (secret: store it encrypted).
    pub(crate) fn snapshot(&self) -> Result<Vec<u8>, CryptoError> {
        let mut sessions: Vec<StoredSessions> = self
            .sessions
            .iter()
            .map(|((user_id, device_id), sessions)| StoredSessions {
                user_id: *user_id,
                device_id: *device_id,
                sessions: sessions.iter().map(Session::pickle).collect(),
            })
            .collect();
        sessions.sort_by_key(|s| (s.user_id, s.device_id));
        let snap = Snapshot {
            format: SNAPSHOT_FORMAT,
            user_id: self.user_id,
            device_id: self.device_id,
            account: self.account.pickle(),
            sessions,
            identities: self
                .identities
                .iter()
                .flat_map(|(user_id, devices)| {
                    devices.iter().map(|(device_id, identity)| StoredIdentity {
                        user_id: *user_id,
                        device_id: *device_id,
                        identity: *identity,
                    })
                })
                .collect(),
            own_devices: self.own_devices.clone(),
            seen: self
                .seen
                .iter()
                .map(|((u, d, id), seq)| (*u, *d, id.clone(), *seq))
                .collect(),
            unacked: self
                .unacked
                .iter()
                .map(|(seq, d)| (*seq, d.clone()))
                .collect(),
            groups: self.groups.stored(),
        };
        serde_json::to_vec(&snap).map_err(|e| CryptoError::State(e.to_string()))
    }

    /// True (once) when the state changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// This device's identity keys, signed.
    pub(crate) fn identity(&self) -> pb::IdentityKeys {
        let curve = self.account.curve25519_key().to_bytes();
        pb::IdentityKeys {
            curve25519: curve.to_vec().into(),
            ed25519: self.account.ed25519_key().as_bytes().to_vec().into(),
            signature: self
                .account
                .sign([IDENTITY_LABEL, &curve].concat())
                .to_bytes()
                .to_vec()
                .into(),
        }
    }

    fn signed(&self, key_id: String, public: &Curve25519PublicKey) -> pb::SignedKey {
        let public = public.to_bytes();
        pb::SignedKey {
            key_id,
            public_key: public.to_vec().into(),
            signature: self
                .account
                .sign([KEY_LABEL, &public].concat())
                .to_bytes()
                .to_vec()
                .into(),
        }
    }

    /// Keys to upload when the server holds `stock` one-time keys: enough
    /// new ones to reach [`ONE_TIME_KEY_TARGET`] (plus any generated earlier
    /// and never confirmed), and a fresh fallback key when `new_fallback`.
    /// Mark them published with [`Crypto::published`] once the server
    /// confirms.
    pub(crate) fn upload(&mut self, stock: u32, new_fallback: bool) -> pb::UploadKeys {
        if new_fallback && self.account.fallback_key().is_empty() {
            self.account.generate_fallback_key();
        }
        let want = usize::try_from(ONE_TIME_KEY_TARGET.saturating_sub(stock)).unwrap_or(0);
        let unpublished = self.account.one_time_keys().len();
        if unpublished < want {
            self.account.generate_one_time_keys(want - unpublished);
        }
        self.dirty = true;
        let mut one_time: Vec<(String, Curve25519PublicKey)> = self
            .account
            .one_time_keys()
            .into_iter()
            .map(|(id, key)| (id.to_base64(), key))
            .collect();
        one_time.sort_by(|a, b| a.0.cmp(&b.0));
        one_time.truncate(MAX_KEYS_PER_UPLOAD);
        let fallback_key = self
            .account
            .fallback_key()
            .into_iter()
            .next()
            .map(|(id, key)| self.signed(id.to_base64(), &key));
        pb::UploadKeys {
            identity: Some(self.identity()),
            fallback_key,
            one_time_keys: one_time
                .iter()
                .map(|(id, key)| self.signed(id.clone(), key))
                .collect(),
        }
    }

    /// The server confirmed the last upload.
    pub(crate) fn published(&mut self) {
        self.account.mark_keys_as_published();
        self.dirty = true;
    }

    pub(crate) fn has_session(&self, user_id: u64, device_id: u32) -> bool {
        self.sessions
            .get(&(user_id, device_id))
            .is_some_and(|s| !s.is_empty())
    }

    /// The devices of `user` whose identities are known (for this account:
    /// its other devices).
    pub(crate) fn known_devices(&self, user_id: u64) -> Option<Vec<u32>> {
        if user_id == self.user_id {
            return self.own_devices.clone();
        }
        self.identities
            .get(&user_id)
            .filter(|d| !d.is_empty())
            .map(|d| d.keys().copied().collect())
    }

    fn key_set(&self, user_id: u64) -> BTreeSet<[u8; 32]> {
        self.identities
            .get(&user_id)
            .map(|d| d.values().map(|i| i.ed25519).collect())
            .unwrap_or_default()
    }

    fn device_set(&self, user_id: u64) -> BTreeSet<u32> {
        self.identities
            .get(&user_id)
            .map(|d| d.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Compares `user`'s devices with the last comparison: the change when
    /// a known, non-empty set changed. This account's own are not reported
    /// (the server announces them with `DevicesChanged`).
    pub(crate) fn check_devices(&mut self, user_id: u64) -> Option<DeviceChange> {
        if user_id == self.user_id {
            return None;
        }
        let now = self.device_set(user_id);
        if now.is_empty() {
            return None;
        }
        let before = self.device_baseline.insert(user_id, now.clone())?;
        if before.is_empty() || before == now {
            return None;
        }
        Some(DeviceChange {
            devices: now.iter().copied().collect(),
            added: now.difference(&before).copied().collect(),
            removed: before.difference(&now).copied().collect(),
        })
    }

    /// Compares `user`'s keys with the last comparison; true when a known
    /// set of keys changed. This account's own changes are not reported.
    fn check_change(&mut self, user_id: u64) -> bool {
        let now = self.key_set(user_id);
        if now.is_empty() {
            return false;
        }
        let before = self.baseline.insert(user_id, now.clone());
        user_id != self.user_id && before.is_some_and(|b| !b.is_empty() && b != now)
    }

    /// Records `identity` for a device; a different one replaces the old and
    /// drops the sessions made with it.
    fn learn(&mut self, user_id: u64, device_id: u32, identity: DeviceIdentity) {
        let known = self.identities.entry(user_id).or_default();
        if known
            .insert(device_id, identity)
            .is_some_and(|old| old != identity)
        {
            self.sessions.remove(&(user_id, device_id));
        }
        self.dirty = true;
    }

    /// Forgets devices of `user_id` that are not in `current` (their
    /// identities and sessions).
    fn retain_devices(&mut self, user_id: u64, current: &[u32]) {
        if let Some(known) = self.identities.get_mut(&user_id) {
            known.retain(|d, _| current.contains(d));
        }
        self.sessions
            .retain(|(u, d), _| *u != user_id || current.contains(d));
        self.dirty = true;
    }

    /// The server says `stale` devices of `user_id` are gone.
    pub(crate) fn forget_devices(&mut self, user_id: u64, stale: &[u32]) {
        if let Some(known) = self.identities.get_mut(&user_id) {
            known.retain(|d, _| !stale.contains(d));
        }
        self.sessions
            .retain(|(u, d), _| *u != user_id || !stale.contains(d));
        if user_id == self.user_id
            && let Some(own) = &mut self.own_devices
        {
            own.retain(|d| !stale.contains(d));
        }
        self.dirty = true;
    }

    /// This account's current devices (including this one, which is
    /// skipped).
    pub(crate) fn set_own_devices(&mut self, devices: &[u32]) {
        let others: Vec<u32> = devices
            .iter()
            .copied()
            .filter(|d| *d != self.device_id)
            .collect();
        self.retain_devices(self.user_id, &others);
        self.own_devices = Some(others);
    }

    /// Verifies and records the identities in a device list of this
    /// account; returns the devices that failed verification.
    pub(crate) fn add_own_device_list(&mut self, list: &[pb::DeviceInfo]) -> Vec<u32> {
        let ids: Vec<u32> = list.iter().map(|d| d.device_id).collect();
        self.set_own_devices(&ids);
        let mut bad = Vec::new();
        for device in list {
            if device.device_id == self.device_id {
                continue;
            }
            if let Some(keys) = &device.identity {
                match verify_identity(keys) {
                    Ok(identity) => self.learn(self.user_id, device.device_id, identity),
                    Err(_) => bad.push(device.device_id),
                }
            }
        }
        self.check_change(self.user_id);
        bad
    }

    /// The devices a `Bundles` answer lists are the user's current ones:
    /// forgets the others (identities and sessions).
    fn take_device_list(&mut self, bundles: &pb::Bundles) {
        let user_id = bundles.user_id;
        let current: Vec<u32> = bundles
            .devices
            .iter()
            .map(|d| d.device_id)
            .filter(|d| user_id != self.user_id || *d != self.device_id)
            .collect();
        if user_id == self.user_id {
            self.own_devices = Some(current.clone());
        }
        self.retain_devices(user_id, &current);
    }

    /// Takes a `Bundles` answer: records the user's current devices and
    /// their verified identities, and makes an outbound session for every
    /// device without one (or whose identity changed).
    pub(crate) fn add_bundles(
        &mut self,
        bundles: &pb::Bundles,
    ) -> Result<BundleOutcome, CryptoError> {
        let user_id = bundles.user_id;
        let mut outcome = BundleOutcome::default();
        self.take_device_list(bundles);
        for bundle in &bundles.devices {
            let device_id = bundle.device_id;
            if user_id == self.user_id && device_id == self.device_id {
                continue;
            }
            let bad = |reason: String| CryptoError::BadBundle {
                user_id: UserId(user_id),
                device_id: DeviceId(device_id),
                reason,
            };
            let Some(keys) = &bundle.identity else {
                outcome.keyless.push(device_id);
                continue;
            };
            let identity = verify_identity(keys).map_err(bad)?;
            let key = match &bundle.key {
                Some(
                    pb::device_bundle::Key::OneTimeKey(k) | pb::device_bundle::Key::FallbackKey(k),
                ) => verify_key(&identity, k).map_err(bad)?,
                None => return Err(bad("no one-time or fallback key".to_owned())),
            };
            self.learn(user_id, device_id, identity);
            if self.has_session(user_id, device_id) {
                // The bundle's key is wasted, but a working session is kept:
                // replacing it would strand messages in flight.
                continue;
            }
            let session = self
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    Curve25519PublicKey::from_bytes(identity.curve25519),
                    key,
                )
                .map_err(|e| bad(e.to_string()))?;
            self.push_session(user_id, device_id, session);
        }
        outcome.identity_changed = self.check_change(user_id);
        outcome.devices_changed = self.check_devices(user_id);
        Ok(outcome)
    }

    /// Takes a `Bundles` answer made with `identities_only`: records the
    /// user's current devices and their verified identities (a changed
    /// identity drops the sessions made with the old one); makes no session.
    pub(crate) fn refresh_identities(
        &mut self,
        bundles: &pb::Bundles,
    ) -> Result<BundleOutcome, CryptoError> {
        let user_id = bundles.user_id;
        let mut outcome = BundleOutcome::default();
        self.take_device_list(bundles);
        for bundle in &bundles.devices {
            let device_id = bundle.device_id;
            if user_id == self.user_id && device_id == self.device_id {
                continue;
            }
            let Some(keys) = &bundle.identity else {
                outcome.keyless.push(device_id);
                continue;
            };
            let identity = verify_identity(keys).map_err(|reason| CryptoError::BadBundle {
                user_id: UserId(user_id),
                device_id: DeviceId(device_id),
                reason,
            })?;
            self.learn(user_id, device_id, identity);
        }
        outcome.identity_changed = self.check_change(user_id);
        outcome.devices_changed = self.check_devices(user_id);
        Ok(outcome)
    }

    fn push_session(&mut self, user_id: u64, device_id: u32, session: Session) {
        let list = self.sessions.entry((user_id, device_id)).or_default();
        list.insert(0, session);
        list.truncate(MAX_SESSIONS_PER_DEVICE);
        self.dirty = true;
    }

    /// Drops every session with a device (the next send makes a new one).
    pub(crate) fn forget_sessions(&mut self, user_id: u64, device_id: u32) {
        if self.sessions.remove(&(user_id, device_id)).is_some() {
            self.dirty = true;
        }
    }

    /// Encrypts `plaintext` for one device with its newest session. A
    /// session that has not heard back yet makes pre-key messages, which
    /// carry this device's identity keys inside.
    pub(crate) fn encrypt(
        &mut self,
        user_id: u64,
        device_id: u32,
        plaintext: &Plaintext,
    ) -> Result<Bytes, CryptoError> {
        let identity = self.identity();
        let fail = |reason: String| CryptoError::Encrypt {
            user_id: UserId(user_id),
            device_id: DeviceId(device_id),
            reason,
        };
        let session = self
            .sessions
            .get_mut(&(user_id, device_id))
            .and_then(|s| s.first_mut())
            .ok_or_else(|| fail("no session".to_owned()))?;
        let mut plaintext = plaintext.clone();
        if !session.has_received_message() {
            plaintext.sender_identity = Some(identity);
        }
        let message = session
            .encrypt(plaintext.encode())
            .map_err(|e| fail(e.to_string()))?;
        self.dirty = true;
        Ok(encode_wire(&message))
    }

    /// Decrypts a payload from one device. A pre-key message for a session
    /// we do not have makes a new inbound session, which becomes the one we
    /// encrypt with (the peer lost or replaced the old one).
    ///
    /// With `defer_changes`, a change of the sender's keys is not compared
    /// now (the caller refreshes the sender's devices, which reports it).
    pub(crate) fn decrypt(
        &mut self,
        user_id: u64,
        device_id: u32,
        payload: &[u8],
        defer_changes: bool,
    ) -> Result<Opened, String> {
        let message = decode_wire(payload).map_err(|e| e.to_string())?;
        let mut no_sessions = Vec::new();
        let sessions = self
            .sessions
            .get_mut(&(user_id, device_id))
            .unwrap_or(&mut no_sessions);
        let existing = match &message {
            OlmMessage::PreKey(m) => {
                let id = m.session_id();
                sessions.iter().position(|s| s.session_id() == id)
            }
            OlmMessage::Normal(_) => None,
        };
        let try_order: Vec<usize> = match (&message, existing) {
            (OlmMessage::PreKey(_), Some(i)) => vec![i],
            (OlmMessage::PreKey(_), None) => Vec::new(),
            (OlmMessage::Normal(_), _) => (0..sessions.len()).collect(),
        };
        for i in try_order {
            if let Ok(bytes) = sessions[i].decrypt(&message) {
                // The session that last worked is the one to answer with.
                let session = sessions.remove(i);
                sessions.insert(0, session);
                self.dirty = true;
                let plaintext = Plaintext::decode(&bytes).map_err(|e| e.to_string())?;
                return Ok(Opened {
                    plaintext,
                    identity_changed: false,
                });
            }
        }
        let OlmMessage::PreKey(pre_key) = &message else {
            return Err("no session with the sender can decrypt this message".to_owned());
        };
        let result = self
            .account
            .create_inbound_session(SessionConfig::version_1(), pre_key.identity_key(), pre_key)
            .map_err(|e| format!("cannot create a session: {e}"))?;
        // The one-time key is used up whatever happens next.
        self.dirty = true;
        let plaintext = Plaintext::decode(&result.plaintext).map_err(|e| e.to_string())?;
        let keys = plaintext
            .sender_identity
            .as_ref()
            .ok_or("a pre-key message without the sender's identity keys")?;
        let identity = verify_identity(keys)?;
        if identity.curve25519 != pre_key.identity_key().to_bytes() {
            return Err("the sender's identity keys do not match its session".to_owned());
        }
        self.learn(user_id, device_id, identity);
        self.push_session(user_id, device_id, result.session);
        let identity_changed = !defer_changes && self.check_change(user_id);
        Ok(Opened {
            plaintext,
            identity_changed,
        })
    }

    /// Keeps a decrypted message until the application acks `seq`.
    pub(crate) fn hold(&mut self, seq: u64, message: Decrypted) {
        self.unacked.insert(seq, message);
        while self.unacked.len() > MAX_UNACKED_PLAINTEXTS {
            self.unacked.pop_first();
        }
        self.dirty = true;
    }

    /// A held message, for a redelivery after a restart.
    pub(crate) fn held(&self, seq: u64) -> Option<&Decrypted> {
        self.unacked.get(&seq)
    }

    /// The application acked `seq`.
    pub(crate) fn release(&mut self, seq: u64) {
        if self.unacked.remove(&seq).is_some() {
            self.dirty = true;
        }
    }

    /// The group sender keys, for a change (marks the state dirty).
    pub(crate) fn groups_mut(&mut self) -> &mut group::GroupKeys {
        self.dirty = true;
        &mut self.groups
    }

    /// The group sender keys, to read.
    pub(crate) fn groups(&self) -> &group::GroupKeys {
        &self.groups
    }

    /// The safety number with `peer`, from the identities known now.
    pub(crate) fn safety_number(&self, peer: u64) -> Result<String, CryptoError> {
        let peer_keys: Vec<[u8; 32]> = self.key_set(peer).into_iter().collect();
        if peer_keys.is_empty() && peer != self.user_id {
            return Err(CryptoError::UnknownIdentity(UserId(peer)));
        }
        let mut mine: Vec<[u8; 32]> = self.key_set(self.user_id).into_iter().collect();
        mine.push(*self.account.ed25519_key().as_bytes());
        if peer == self.user_id {
            let me = UserId(self.user_id);
            return Ok(safety::safety_number((me, &mine), (me, &mine)));
        }
        Ok(safety::safety_number(
            (UserId(self.user_id), &mine),
            (UserId(peer), &peer_keys),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes `c`'s keys and hands out one bundle, as the server would.
    fn bundle(c: &mut Crypto) -> pb::Bundles {
        let up = c.upload(0, true);
        c.published();
        pb::Bundles {
            user_id: c.user_id,
            devices: vec![pb::DeviceBundle {
                device_id: c.device_id,
                identity: up.identity,
                key: Some(pb::device_bundle::Key::OneTimeKey(
                    up.one_time_keys[0].clone(),
                )),
            }],
        }
    }

    fn text(body: &'static str, to_user: u64) -> Plaintext {
        Plaintext {
            kind: envelope::KIND_MESSAGE,
            body: Bytes::from_static(body.as_bytes()),
            sent_at_ms: 1,
            to_user,
            sender_identity: None,
            group_id: 0,
        }
    }

    #[test]
    fn sessions_from_bundles_and_pre_keys_talk_both_ways_and_survive_snapshots() {
        let mut alice = Crypto::new(1, 1);
        let mut bob = Crypto::new(2, 1);
        let b = bundle(&mut bob);
        assert!(alice.add_bundles(&b).unwrap().keyless.is_empty());
        let wire = alice.encrypt(2, 1, &text("plaintext-marker", 2)).unwrap();
        assert_eq!(wire[1], envelope::OLM_PRE_KEY);
        // What goes to the server holds no plaintext.
        assert!(!wire.windows(16).any(|w| w == b"plaintext-marker"));
        let opened = bob.decrypt(1, 1, &wire, false).unwrap();
        assert_eq!(opened.plaintext.body, "plaintext-marker");
        assert!(!opened.identity_changed);
        let reply = bob.encrypt(1, 1, &text("yo", 1)).unwrap();
        assert_eq!(reply[1], envelope::OLM_NORMAL);
        assert_eq!(
            alice.decrypt(2, 1, &reply, false).unwrap().plaintext.body,
            "yo"
        );
        assert_eq!(
            alice.safety_number(2).unwrap(),
            bob.safety_number(1).unwrap()
        );

        // Both restart from snapshots and go on.
        let mut alice = Crypto::restore(&alice.snapshot().unwrap(), 1, 1)
            .unwrap()
            .unwrap();
        let mut bob = Crypto::restore(&bob.snapshot().unwrap(), 2, 1)
            .unwrap()
            .unwrap();
        let wire = alice.encrypt(2, 1, &text("again", 2)).unwrap();
        assert_eq!(wire[1], envelope::OLM_NORMAL);
        assert_eq!(
            bob.decrypt(1, 1, &wire, false).unwrap().plaintext.body,
            "again"
        );
        assert!(
            Crypto::restore(&bob.snapshot().unwrap(), 2, 9)
                .unwrap()
                .is_none()
        );
        // Replaying a consumed message fails cleanly.
        assert!(bob.decrypt(1, 1, &wire, false).is_err());
        assert!(bob.decrypt(1, 1, b"\x01\x01junk", false).is_err());
    }

    #[test]
    fn a_peer_that_lost_its_session_recovers_with_a_new_pre_key() {
        let mut alice = Crypto::new(1, 1);
        let mut bob = Crypto::new(2, 1);
        alice.add_bundles(&bundle(&mut bob)).unwrap();
        let wire = alice.encrypt(2, 1, &text("one", 2)).unwrap();
        bob.decrypt(1, 1, &wire, false).unwrap();
        // Bob loses the session; Alice's next normal message fails for him.
        bob.forget_sessions(1, 1);
        let reply = bob.encrypt(1, 1, &text("x", 1));
        assert!(reply.is_err());
        // Bob fetches Alice's bundle and starts a new session; Alice, who
        // still has the old one, switches to the new one.
        bob.add_bundles(&bundle(&mut alice)).unwrap();
        let wire = bob.encrypt(1, 1, &text("fresh", 1)).unwrap();
        assert_eq!(wire[1], envelope::OLM_PRE_KEY);
        assert_eq!(
            alice.decrypt(2, 1, &wire, false).unwrap().plaintext.body,
            "fresh"
        );
        let wire = alice.encrypt(2, 1, &text("answer", 2)).unwrap();
        assert_eq!(
            bob.decrypt(1, 1, &wire, false).unwrap().plaintext.body,
            "answer"
        );
    }

    #[test]
    fn tampered_bundles_are_refused_and_new_identities_reported() {
        let mut alice = Crypto::new(1, 1);
        let mut bob = Crypto::new(2, 1);
        let mut b = bundle(&mut bob);
        if let Some(pb::device_bundle::Key::OneTimeKey(k)) = &mut b.devices[0].key {
            k.public_key = vec![7u8; 32].into();
        }
        assert!(matches!(
            alice.add_bundles(&b),
            Err(CryptoError::BadBundle { .. })
        ));
        let b = bundle(&mut bob);
        assert!(!alice.add_bundles(&b).unwrap().identity_changed);
        // Bob re-registers: a new device with a new identity.
        let mut bob2 = Crypto::new(2, 2);
        let b2 = bundle(&mut bob2);
        assert!(alice.add_bundles(&b2).unwrap().identity_changed);
        assert_eq!(alice.known_devices(2), Some(vec![2]));
        let keyless = pb::Bundles {
            user_id: 2,
            devices: vec![pb::DeviceBundle {
                device_id: 3,
                identity: None,
                key: None,
            }],
        };
        assert_eq!(alice.add_bundles(&keyless).unwrap().keyless, vec![3]);
    }
}
