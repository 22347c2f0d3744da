//! Phone verification: ask for a one-time code, present it, and keep the
//! [`Credentials`] the server issues for the new device.
//!
//! Each call opens its own short connection; these flows happen once per
//! device, so there is nothing to gain from keeping a link open.
//!
//! Verifying and linking also create the new device's identity in its state
//! directory and publish its keys before returning, so peers can message
//! the device at once, before it ever starts a [`crate::Client`].

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchboard_proto::pb::{self, client_frame, server_frame};
use tracing::{debug, instrument, warn};

use crate::client::load_crypto;
use crate::connection::{ConnectOptions, Connection, unexpected};
use crate::crypto::Crypto;
use crate::endpoint::Endpoint;
use crate::error::{CryptoError, Error, StorageError};
use crate::ids::{DeviceId, UserId};
use crate::store::StateFile;

/// What a device needs to authenticate. Serializes with the credential as
/// hex; `Debug` never shows the credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Credentials {
    /// The account.
    pub user_id: UserId,
    /// This device of the account.
    pub device_id: DeviceId,
    /// The secret bearer credential (shown once by the server).
    #[serde(with = "hex_bytes")]
    pub credential: Vec<u8>,
    /// The account's phone number (E.164).
    pub phone: String,
    /// The server's static public key as it was when the device was
    /// registered or linked: [`crate::Client::start`] pins it, so a server
    /// that presents another key (a man in the middle) is refused with
    /// [`crate::ProtocolError::ServerKeyMismatch`] before the credential is
    /// sent. `None` for credentials stored before it was kept: the client
    /// then pins the key it first sees (kept in its state directory).
    #[serde(default, with = "hex_key", skip_serializing_if = "Option::is_none")]
    pub server_key: Option<Vec<u8>>,
}

impl Credentials {
    /// Credentials kept from an earlier registration (without a pinned
    /// server key: set [`Credentials::server_key`] if one was kept).
    #[must_use]
    pub fn new(user_id: UserId, device_id: DeviceId, credential: Vec<u8>, phone: String) -> Self {
        Self {
            user_id,
            device_id,
            credential,
            phone,
            server_key: None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("phone", &self.phone)
            .finish_non_exhaustive()
    }
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<S: Serializer>(key: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(key) => s.serialize_str(&hex::encode(key)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Asks the server to send a verification code to `phone` (E.164, e.g.
/// `+14155550123`). A dev server writes it to
/// `<data dir>/dev-codes/<phone>`.
///
/// # Errors
///
/// [`Error::Transport`] when the server cannot be reached (or the
/// handshake times out), [`Error::Protocol`] when it misbehaves; [`Error::Server`] with `INVALID_PHONE`, or
/// `RATE_LIMITED` (see [`crate::ServerError::retry_after`]).
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let sent = register::request_code(&endpoint, &Default::default(), "+15550001111").await?;
/// println!("code valid until {}", sent.expires_at_ms);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options))]
pub async fn request_code(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
) -> Result<pb::CodeSent, Error> {
    request_code_in(endpoint, options, phone, "").await
}

/// As [`request_code`], asking for the message in `locale`: a BCP 47 tag
/// such as `pt-BR` that the server passes to its SMS gateway (empty: the
/// gateway's default).
///
/// # Errors
///
/// As [`request_code`]; [`Error::Server`] with `BAD_REQUEST` for a
/// malformed locale.
#[instrument(level = "debug", skip(options))]
pub async fn request_code_in(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
    locale: &str,
) -> Result<pb::CodeSent, Error> {
    let mut conn = Connection::connect(endpoint, options).await?;
    let sent = conn.request_code_in(phone, locale).await?;
    // The answer is in hand; a failed shutdown changes nothing for the caller.
    let _ = conn.close().await;
    Ok(sent)
}

/// Presents the code sent to `phone` and returns the credentials of the new
/// primary device (a previous primary device of the account is revoked).
///
/// The new device's identity is created in `state_dir` (locked meanwhile;
/// give the same directory to [`crate::ClientConfig::state_dir`]) and its
/// keys are published, so it can be messaged at once. Once the code is
/// accepted the credentials are always returned: if publishing fails (the
/// link dropped), the first [`crate::Client::start`] publishes the keys.
///
/// # Errors
///
/// [`Error::Transport`] when the server cannot be reached (or the
/// handshake times out), [`Error::Protocol`] when it misbehaves; [`Error::Server`] with `CODE_INVALID`,
/// `CODE_EXPIRED` or `CODE_LOCKED`; [`Error::Usage`] with
/// [`crate::UsageError::StateDirInUse`] while a client uses `state_dir`, or
/// [`Error::Storage`] when it cannot be created (both before the code is
/// presented, so it stays usable).
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let state_dir = "/var/lib/myapp/sb-state";
/// let creds =
///     register::verify_code(&endpoint, &Default::default(), "+15550001111", "123456", state_dir)
///         .await?;
/// println!("user {} device {}", creds.user_id, creds.device_id);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code, state_dir))]
pub async fn verify_code(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
    code: &str,
    state_dir: impl AsRef<Path>,
) -> Result<Credentials, Error> {
    verify_code_with_pin(endpoint, options, phone, code, "", state_dir).await
}

/// As [`verify_code`], for an account with two-step verification: `pin` is
/// its PIN (empty if it has none). A number with a PIN answers
/// `PIN_REQUIRED` without it; the same code may then be presented again
/// with the PIN.
///
/// # Errors
///
/// As [`verify_code`]; also [`Error::Server`] with `PIN_REQUIRED`,
/// `PIN_INVALID` or `PIN_LOCKED` (too many wrong PINs: wait
/// [`crate::ServerError::retry_after`]; a new code does not help).
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let creds = register::verify_code_with_pin(
///     &endpoint, &Default::default(), "+15550001111", "123456", "246810",
///     "/var/lib/myapp/sb-state",
/// ).await?;
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code, pin, state_dir))]
pub async fn verify_code_with_pin(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
    code: &str,
    pin: &str,
    state_dir: impl AsRef<Path>,
) -> Result<Credentials, Error> {
    // Locked before the code is spent, so a busy directory costs no code.
    let state = lock_state(state_dir.as_ref()).await?;
    let mut conn = Connection::connect(endpoint, options).await?;
    let creds = conn.verify_code_with_pin(phone, code, pin).await?;
    Ok(publish_keys(conn, creds, state).await.0)
}

async fn lock_state(dir: &Path) -> Result<Arc<StateFile>, Error> {
    let dir = dir.to_owned();
    let state = tokio::task::spawn_blocking(move || StateFile::open(dir))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))??;
    Ok(Arc::new(state))
}

/// Publishes the keys of the new device `creds` from `state`, if it can:
/// the credentials are the caller's either way (a device that did not
/// publish does so when its client first connects). The error, if any, is
/// returned beside them.
async fn publish_keys(
    conn: Connection,
    mut creds: Credentials,
    state: Arc<StateFile>,
) -> (Credentials, Option<Error>) {
    let (user_id, device_id) = (creds.user_id, creds.device_id);
    match try_publish_keys(conn, &creds, state).await {
        Ok(phone) => {
            creds.phone = phone;
            (creds, None)
        }
        Err(error) => {
            warn!(%user_id, %device_id, %error, "cannot publish the new device's keys yet; its client will");
            (creds, Some(error))
        }
    }
}

/// Authenticates `conn` as `creds`, creates its identity in `state` and
/// uploads its keys unless the server has them; returns the account's phone
/// number.
async fn try_publish_keys(
    mut conn: Connection,
    creds: &Credentials,
    state: Arc<StateFile>,
) -> Result<String, Error> {
    let (user_id, device_id) = (creds.user_id, creds.device_id);
    let file = Arc::clone(&state);
    let mut crypto = tokio::task::spawn_blocking(move || load_crypto(&file, user_id, device_id))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))??;
    let ok = conn.auth(creds).await?;
    if !ok.has_keys {
        let upload = crypto.upload(ok.one_time_keys_remaining, true);
        // The keys going out are on disk first, so the server never holds
        // keys this device has lost.
        save(&state, &crypto).await?;
        match conn.call(client_frame::Body::UploadKeys(upload)).await {
            Ok(server_frame::Body::KeysUploaded(k)) => {
                debug!(stock = k.one_time_keys_remaining, "keys published");
                crypto.published();
                save(&state, &crypto).await?;
            }
            Err(Error::Server(e)) if e.code == pb::ErrorCode::InvalidKeys => {
                return Err(CryptoError::KeysRejected(e.to_string()).into());
            }
            Err(e) => return Err(e),
            Ok(other) => return Err(unexpected("KeysUploaded", Some(&other))),
        }
    }
    // The keys are in hand; a failed shutdown changes nothing for the caller.
    let _ = conn.close().await;
    Ok(ok.phone)
}

/// Persists `crypto` to `state`, off the async threads.
async fn save(state: &Arc<StateFile>, crypto: &Crypto) -> Result<(), Error> {
    let bytes = crypto.snapshot()?;
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || state.save(&bytes))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))??;
    Ok(())
}

/// Sets (or, with an empty `pin`, clears) the account's two-step
/// verification PIN, as the primary device `creds`. Returns whether a PIN
/// is now set. Opens its own connection: a [`crate::Client`] running as the
/// same device is replaced (it reconnects).
///
/// # Errors
///
/// [`Error::Transport`] when the server cannot be reached (or the
/// handshake times out), [`Error::Protocol`] when it misbehaves; [`Error::Server`] with `NOT_PRIMARY`,
/// `UNAUTHENTICATED` or `BAD_REQUEST` (a PIN has 6 to 64 characters).
///
/// # Example
///
/// ```no_run
/// # async fn demo(creds: switchboard_client::Credentials) -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// assert!(register::set_pin(&endpoint, &Default::default(), &creds, "246810").await?);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, creds, pin))]
pub async fn set_pin(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    creds: &Credentials,
    pin: &str,
) -> Result<bool, Error> {
    let mut conn = Connection::connect(endpoint, options).await?;
    conn.auth(creds).await?;
    let enabled = conn.set_pin(pin).await?;
    let _ = conn.close().await;
    Ok(enabled)
}

/// Joins an existing account as a linked device, with a code made on its
/// primary device ([`crate::Client::create_link_code`]). Returns the new
/// device's credentials, with its identity created in `state_dir` and its
/// keys published, so it gets every message of the account from now on;
/// start a [`crate::Client`] with them and the same `state_dir`.
///
/// # Errors
///
/// [`Error::Transport`] when the server cannot be reached (or the
/// handshake times out), [`Error::Protocol`] when it misbehaves; [`Error::Server`] with `LINK_CODE_INVALID`
/// (unknown, used or expired code) or `TOO_MANY_DEVICES`; as
/// [`verify_code`] for the state directory and keys.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let code = "ABCD-EFGH-JKLM-NPQR";
/// let creds =
///     register::link_device(&endpoint, &Default::default(), code, "/var/lib/myapp/sb-state")
///         .await?;
/// println!("linked as device {} of {}", creds.device_id, creds.phone);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code, state_dir))]
pub async fn link_device(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    code: &str,
    state_dir: impl AsRef<Path>,
) -> Result<Credentials, Error> {
    let state = lock_state(state_dir.as_ref()).await?;
    let mut conn = Connection::connect(endpoint, options).await?;
    let creds = conn.link_device(code).await?;
    // The phone number comes with the first authentication.
    match publish_keys(conn, creds, state).await {
        // Without its phone number the device is not usable yet.
        (creds, Some(error)) if creds.phone.is_empty() => Err(error),
        (creds, _) => Ok(creds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_serde_uses_hex_and_round_trips() {
        let creds = Credentials {
            user_id: UserId(42),
            device_id: DeviceId(1),
            credential: vec![0xde, 0xad, 0xbe, 0xef],
            phone: "+15550001111".into(),
            server_key: None,
        };
        let json = serde_json::to_string(&creds).unwrap();
        assert_eq!(
            json,
            r#"{"user_id":42,"device_id":1,"credential":"deadbeef","phone":"+15550001111"}"#
        );
        assert_eq!(serde_json::from_str::<Credentials>(&json).unwrap(), creds);
        assert!(serde_json::from_str::<Credentials>(&json.replace("deadbeef", "xyz")).is_err());
        let pinned = Credentials {
            server_key: Some(vec![7; 32]),
            ..creds
        };
        let json = serde_json::to_string(&pinned).unwrap();
        assert!(
            json.contains(&format!(r#""server_key":"{}""#, "07".repeat(32))),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Credentials>(&json).unwrap(), pinned);
    }

    #[test]
    fn debug_hides_the_credential() {
        let creds = Credentials {
            user_id: UserId(1),
            device_id: DeviceId(2),
            credential: vec![0xab; 8],
            phone: "+1".into(),
            server_key: None,
        };
        let shown = format!("{creds:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }
}
