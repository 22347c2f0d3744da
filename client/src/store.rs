//! The local crypto store: one file holding the device's end-to-end
//! encryption state (Olm account, sessions, known identity keys, the
//! de-duplication window), encrypted at rest.
//!
//! Layout of the state directory (mode 0700, every file 0600):
//! - `lock`: held (`flock`) by the one process using the directory, so two
//!   clients never overwrite each other's Olm state or outbox;
//! - `state.key`: 32 random bytes, created on first use;
//! - `state.bin`: `"SBST"`, a format byte (1), a 24-byte nonce, then the
//!   XChaCha20-Poly1305 encryption of the state (JSON) under that key, with
//!   the 5-byte header as associated data.
//!
//! The same key seals the outbox's files (see [`Sealer`]), with their own
//! magic bytes.
//!
//! Writes are atomic (temp file, fsync, rename, directory fsync), so a crash
//! leaves the old or the new state, never a mix. The key sits beside the
//! state: this protects a state file copied alone (backups, sync tools,
//! support bundles), not an attacker who can read the whole directory; an OS
//! keychain can hold the key later without changing the file format.
//!
//! Every function blocks: call them from `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::error::{Error, StorageError, UsageError};

/// File locked by the process using the directory.
pub const LOCK_FILE: &str = "lock";

/// File holding the encryption key.
pub const KEY_FILE: &str = "state.key";

/// File holding the encrypted state.
pub const STATE_FILE: &str = "state.bin";

/// Magic bytes opening the state file.
const MAGIC: &[u8; 4] = b"SBST";

/// Format of the state file.
const FORMAT: u8 = 1;

const HEADER_BYTES: usize = MAGIC.len() + 1;
const NONCE_BYTES: usize = 24;
const KEY_BYTES: usize = 32;

/// Encrypts and decrypts files under the state key: a magic, a format
/// byte, a nonce, then the ciphertext with the header as associated data.
#[derive(Clone)]
pub(crate) struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// `plain` sealed under `magic`; `path` names the file in errors.
    pub(crate) fn seal(
        &self,
        magic: &[u8; 4],
        plain: &[u8],
        path: &Path,
    ) -> Result<Vec<u8>, StorageError> {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let mut header = magic.to_vec();
        header.push(FORMAT);
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &header,
                },
            )
            .map_err(|_| corrupt(path, "encryption failed"))?;
        let mut out = header;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Whether `bytes` start like a file sealed under `magic`.
    pub(crate) fn is_sealed(magic: &[u8; 4], bytes: &[u8]) -> bool {
        bytes.starts_with(magic)
    }

    /// The plaintext of `bytes` sealed under `magic`.
    pub(crate) fn open(
        &self,
        magic: &[u8; 4],
        bytes: &[u8],
        path: &Path,
    ) -> Result<Vec<u8>, StorageError> {
        if bytes.len() < HEADER_BYTES + NONCE_BYTES || !Self::is_sealed(magic, bytes) {
            return Err(corrupt(path, "not a Switchboard state file"));
        }
        if bytes[magic.len()] != FORMAT {
            return Err(corrupt(path, "unknown state file format"));
        }
        let (header, rest) = bytes.split_at(HEADER_BYTES);
        let (nonce, ciphertext) = rest.split_at(NONCE_BYTES);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: header,
                },
            )
            .map_err(|_| corrupt(path, "cannot decrypt (wrong key or damaged file)"))
    }
}

/// An encrypted state file in a directory, and the directory's lock: one
/// `StateFile` per directory at a time, across processes.
pub(crate) struct StateFile {
    dir: PathBuf,
    sealer: Sealer,
    /// Holds the directory's `flock` until dropped (the OS releases it if
    /// the process dies).
    _lock: File,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn corrupt(path: &Path, why: &str) -> StorageError {
    StorageError::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned()),
    )
}

/// Creates `dir` (and missing parents) readable by the owner only, and
/// makes an existing `dir` so.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| StorageError::io(dir, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| StorageError::io(dir, e))?;
    }
    Ok(())
}

/// Takes the exclusive lock of `dir` (created), failing at once with
/// [`UsageError::StateDirInUse`] while another holder has it.
fn lock_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK_FILE);
    let mut options = OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .map_err(|e| StorageError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(UsageError::StateDirInUse(dir.to_owned()).into()),
        Err(fs::TryLockError::Error(e)) => Err(StorageError::io(&path, e).into()),
    }
}

impl StateFile {
    /// Opens (creating) `dir`, takes its lock, and reads (creating) its key.
    ///
    /// # Errors
    ///
    /// [`UsageError::StateDirInUse`] while another `StateFile` (in this or
    /// another process) has `dir`; [`Error::Storage`] when it cannot be
    /// created or read.
    pub(crate) fn open(dir: PathBuf) -> Result<Self, Error> {
        create_private_dir(&dir)?;
        let lock = lock_dir(&dir)?;
        let key_path = dir.join(KEY_FILE);
        let key = match fs::read(&key_path) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; KEY_BYTES] = rand::random();
                write_atomic(&key_path, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(StorageError::io(&key_path, e).into()),
        };
        if key.len() != KEY_BYTES {
            return Err(corrupt(&key_path, "the key file is not 32 bytes").into());
        }
        let cipher = XChaCha20Poly1305::new_from_slice(&key)
            .map_err(|_| corrupt(&key_path, "unusable key"))?;
        Ok(Self {
            dir,
            sealer: Sealer { cipher },
            _lock: lock,
        })
    }

    /// The directory's key, for other files kept beside the state.
    pub(crate) fn sealer(&self) -> Sealer {
        self.sealer.clone()
    }

    /// Path of the state file.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The stored state, or `None` if there is none yet.
    pub(crate) fn load(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io(&path, e)),
        };
        self.sealer.open(MAGIC, &bytes, &path).map(Some)
    }

    /// Durably replaces the stored state with `plain`, encrypted.
    pub(crate) fn save(&self, plain: &[u8]) -> Result<(), StorageError> {
        let path = self.path();
        let out = self.sealer.seal(MAGIC, plain, &path)?;
        write_atomic(&path, &out)
    }
}

/// Replaces `path` with `bytes` atomically and durably, mode 0600.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    // A unique temporary name, so two writers never share a half-written
    // file (the last rename wins, whole).
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let temp = PathBuf::from(temp_name);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&temp)
        .map_err(|e| StorageError::io(&temp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| StorageError::io(&temp, e))?;
    drop(file);
    fs::rename(&temp, path).map_err(|e| StorageError::io(path, e))?;
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(parent, e))?;
    }
    Ok(())
}

/// File holding the server's static key pinned on first use (hex), for
/// credentials that do not carry one.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Keeps the server key pinned on first use.
pub(crate) fn save_server_key(dir: &Path, key: &[u8]) -> Result<(), StorageError> {
    fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
    let path = dir.join(SERVER_KEY_FILE);
    let temp = dir.join(format!("{SERVER_KEY_FILE}.tmp"));
    let mut file = File::create(&temp).map_err(|e| StorageError::io(&temp, e))?;
    file.write_all(hex::encode(key).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| StorageError::io(&temp, e))?;
    fs::rename(&temp, &path).map_err(|e| StorageError::io(&path, e))
}

/// The server key pinned on first use, if one was kept.
pub(crate) fn load_server_key(dir: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let path = dir.join(SERVER_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .map(Some)
            .map_err(|_| corrupt(&path, "not a hex key")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_encrypted_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path().join("s")).unwrap();
        assert_eq!(state.load().unwrap(), None);
        state.save(b"secret state one").unwrap();
        state.save(b"secret state two").unwrap();
        drop(state);
        let reopened = StateFile::open(dir.path().join("s")).unwrap();
        assert_eq!(reopened.load().unwrap().unwrap(), b"secret state two");
        let raw = fs::read(reopened.path()).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let dir_mode = fs::metadata(dir.path().join("s"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o777, 0o700);
            for name in [KEY_FILE, STATE_FILE, LOCK_FILE] {
                let mode = fs::metadata(dir.path().join("s").join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
        }
    }

    #[test]
    fn tampering_or_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path().to_owned()).unwrap();
        state.save(b"x").unwrap();
        let mut raw = fs::read(state.path()).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(state.path(), &raw).unwrap();
        assert!(state.load().is_err());
        state.save(b"y").unwrap();
        fs::write(dir.path().join(KEY_FILE), [9u8; 32]).unwrap();
        drop(state);
        let other = StateFile::open(dir.path().to_owned()).unwrap();
        assert!(other.load().is_err());
        fs::write(other.path(), b"plain text").unwrap();
        assert!(other.load().is_err());
    }

    #[test]
    fn one_holder_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path().to_owned()).unwrap();
        assert!(matches!(
            StateFile::open(dir.path().to_owned()),
            Err(Error::Usage(UsageError::StateDirInUse(_)))
        ));
        drop(state);
        StateFile::open(dir.path().to_owned()).unwrap();
    }
}
