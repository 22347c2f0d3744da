//! Two-step verification PINs: a secret the account holder chose, needed
//! besides the SMS code to register the number again, so whoever intercepts
//! an SMS cannot take the account.
//!
//! Stored as an Argon2id hash (PHC string, salt included). A PIN is short
//! and chosen by a person, so unlike device credentials it needs a slow,
//! salted hash; hashing takes tens of milliseconds and so is run on the
//! blocking pool, never on a shard thread or the async runtime.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Shortest PIN: six digits, as WhatsApp asks, a million possibilities
/// against [`MAX_WRONG_PIN_ATTEMPTS`] guesses per lockout.
pub const MIN_PIN_CHARS: usize = 6;
/// Longest PIN, so hashing cost per request stays bounded.
pub const MAX_PIN_BYTES: usize = 64;
/// Wrong PINs for one number before re-registration is locked.
pub const MAX_WRONG_PIN_ATTEMPTS: u32 = 5;
/// How long the lock lasts. A new SMS code does not lift it: 5 guesses a day
/// leaves a 6-digit PIN a year's work (0.2%) for an attacker who holds the
/// SMS channel.
pub const PIN_LOCKOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// A PIN that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// Too short, too long or with control characters.
    #[error("a PIN has {MIN_PIN_CHARS} to {MAX_PIN_BYTES} characters, no control characters")]
    Malformed,
    /// The hash could not be computed or the stored one is unreadable.
    #[error("PIN hashing failed: {0}")]
    Hash(String),
}

/// Checks a PIN's shape.
///
/// # Errors
/// [`PinError::Malformed`].
pub fn validate_pin(pin: &str) -> Result<(), PinError> {
    if pin.chars().count() < MIN_PIN_CHARS
        || pin.len() > MAX_PIN_BYTES
        || pin.chars().any(char::is_control)
    {
        return Err(PinError::Malformed);
    }
    Ok(())
}

/// The stored form of `pin`: an Argon2id PHC string with a fresh salt.
/// Slow on purpose: call from the blocking pool.
///
/// # Errors
/// [`PinError`] if malformed or hashing fails.
pub fn hash_pin(pin: &str) -> Result<String, PinError> {
    validate_pin(pin)?;
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
    let salt = SaltString::encode_b64(&salt).map_err(|e| PinError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(pin.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PinError::Hash(e.to_string()))
}

/// Whether `pin` matches `stored` (from [`hash_pin`]). Slow on purpose:
/// call from the blocking pool.
///
/// # Errors
/// [`PinError::Hash`] if `stored` is unreadable.
pub fn verify_pin(pin: &str, stored: &str) -> Result<bool, PinError> {
    let parsed = PasswordHash::new(stored).map_err(|e| PinError::Hash(e.to_string()))?;
    Ok(Argon2::default()
        .verify_password(pin.as_bytes(), &parsed)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_and_verify() {
        let a = hash_pin("123456").unwrap();
        let b = hash_pin("123456").unwrap();
        assert_ne!(a, b, "salted");
        assert!(!a.contains("123456"));
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_pin("123456", &a).unwrap());
        assert!(!verify_pin("123457", &a).unwrap());
        assert!(verify_pin("123456", "garbage").is_err());
    }

    #[test]
    fn shape() {
        assert!(validate_pin("12345").is_err());
        assert!(validate_pin("123456").is_ok());
        assert!(validate_pin(&"x".repeat(65)).is_err());
        assert!(validate_pin("123\n456").is_err());
    }
}
