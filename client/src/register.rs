//! Phone verification: ask for a one-time code, present it, and keep the
//! [`Credentials`] the server issues for the new device.
//!
//! Each call opens its own short connection; these flows happen once per
//! device, so there is nothing to gain from keeping a link open.

use serde::{Deserialize, Serialize};
use switchboard_proto::pb;
use tracing::instrument;

use crate::connection::{ConnectOptions, Connection};
use crate::endpoint::Endpoint;
use crate::error::Error;

/// What a device needs to authenticate. Serializes with the credential as
/// hex; `Debug` never shows the credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The account.
    pub user_id: u64,
    /// This device of the account.
    pub device_id: u32,
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
/// As [`Connection::connect`]; [`Error::Server`] with `INVALID_PHONE`, or
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
    let mut conn = Connection::connect(endpoint, options).await?;
    let sent = conn.request_code(phone).await?;
    // The answer is in hand; a failed shutdown changes nothing for the caller.
    let _ = conn.close().await;
    Ok(sent)
}

/// Presents the code sent to `phone` and returns the credentials of the new
/// primary device (a previous primary device of the account is revoked).
///
/// # Errors
///
/// As [`Connection::connect`]; [`Error::Server`] with `CODE_INVALID`,
/// `CODE_EXPIRED` or `CODE_LOCKED`.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let creds = register::verify_code(&endpoint, &Default::default(), "+15550001111", "123456").await?;
/// println!("user {} device {}", creds.user_id, creds.device_id);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code))]
pub async fn verify_code(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
    code: &str,
) -> Result<Credentials, Error> {
    verify_code_with_pin(endpoint, options, phone, code, "").await
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
/// ).await?;
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code, pin))]
pub async fn verify_code_with_pin(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    phone: &str,
    code: &str,
    pin: &str,
) -> Result<Credentials, Error> {
    let mut conn = Connection::connect(endpoint, options).await?;
    let creds = conn.verify_code_with_pin(phone, code, pin).await?;
    let _ = conn.close().await;
    Ok(creds)
}

/// Sets (or, with an empty `pin`, clears) the account's two-step
/// verification PIN, as the primary device `creds`. Returns whether a PIN
/// is now set. Opens its own connection: a [`crate::Client`] running as the
/// same device is replaced (it reconnects).
///
/// # Errors
///
/// As [`Connection::connect`]; [`Error::Server`] with `NOT_PRIMARY`,
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
/// device's credentials; start a [`crate::Client`] with them (and its own
/// `state_dir`) to publish its keys, after which it gets every message of
/// the account.
///
/// # Errors
///
/// As [`Connection::connect`]; [`Error::Server`] with `LINK_CODE_INVALID`
/// (unknown, used or expired code) or `TOO_MANY_DEVICES`.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use switchboard_client::register;
/// let endpoint = "127.0.0.1:5222".parse()?;
/// let creds = register::link_device(&endpoint, &Default::default(), "ABCD-EFGH-JKLM-NPQR").await?;
/// println!("linked as device {} of {}", creds.device_id, creds.phone);
/// # Ok(()) }
/// ```
#[instrument(level = "debug", skip(options, code))]
pub async fn link_device(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    code: &str,
) -> Result<Credentials, Error> {
    let mut conn = Connection::connect(endpoint, options).await?;
    let mut creds = conn.link_device(code).await?;
    // The phone number comes with the first authentication.
    let ok = conn.auth(&creds).await?;
    creds.phone = ok.phone;
    let _ = conn.close().await;
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_serde_uses_hex_and_round_trips() {
        let creds = Credentials {
            user_id: 42,
            device_id: 1,
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
            user_id: 1,
            device_id: 2,
            credential: vec![0xab; 8],
            phone: "+1".into(),
            server_key: None,
        };
        let shown = format!("{creds:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }
}
