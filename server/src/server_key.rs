//! The server's static Noise key: created on first start, kept in the data
//! dir (`server.key`, mode 0600), its public half also written in hex to
//! `server.pub` so clients can pin it.

use std::io::Write;
use std::path::Path;

use switchboard_proto::noise::{self, KEY_BYTES, Keypair};

use crate::ServerError;

const KEY_FILE: &str = "server.key";
const PUB_FILE: &str = "server.pub";

/// The data dir's server key, created on first use.
///
/// # Errors
/// [`ServerError`] when the key file is unreadable or malformed.
pub fn load_or_create(dir: &Path) -> Result<Keypair, ServerError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            if bytes.len() != 2 * KEY_BYTES {
                return Err(ServerError::Key(format!(
                    "{} holds {} bytes, expected {}; restore it from backup or delete it to make a new identity",
                    path.display(),
                    bytes.len(),
                    2 * KEY_BYTES
                )));
            }
            let (private, public) = bytes.split_at(KEY_BYTES);
            Ok(Keypair {
                private: private.to_vec(),
                public: public.to_vec(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = noise::generate_keypair().map_err(|e| ServerError::Key(e.to_string()))?;
            save(dir, &kp)?;
            tracing::info!(public_key = %hex::encode(&kp.public), "created server key");
            Ok(kp)
        }
        Err(source) => Err(ServerError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        }),
    }
}

/// Writes `kp` as the data dir's server key (replacing any), atomically.
///
/// # Errors
/// [`ServerError::Io`] when the files cannot be written.
pub fn save(dir: &Path, kp: &Keypair) -> Result<(), ServerError> {
    let path = dir.join(KEY_FILE);
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| ServerError::Io { what, source }
    };
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut f = open_private(&tmp).map_err(io("cannot create"))?;
    f.write_all(&kp.private).map_err(io("cannot write"))?;
    f.write_all(&kp.public).map_err(io("cannot write"))?;
    f.sync_all().map_err(io("cannot sync"))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot rename"))?;
    std::fs::write(dir.join(PUB_FILE), format!("{}\n", hex::encode(&kp.public)))
        .map_err(io("cannot write public key next to"))?;
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public, b.public);
        assert_eq!(a.private, b.private);
        let pubhex = std::fs::read_to_string(dir.path().join(PUB_FILE)).unwrap();
        assert_eq!(pubhex.trim(), hex::encode(&a.public));
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}
