//! Accounts: phone numbers, one-time codes and device credentials.
//!
//! The rules live here as plain functions; the shard that owns a phone
//! number or a user applies them (see `router::shard`).

mod code_sender;
mod pin;

pub use code_sender::{CodeSendError, CodeSender, DevCodeSender, WebhookCodeSender};
pub use pin::{
    MAX_PIN_BYTES, MAX_WRONG_PIN_ATTEMPTS, MIN_PIN_CHARS, PIN_LOCKOUT_MS, PinError, hash_pin,
    validate_pin, verify_pin,
};

use rand::Rng;
use sha2::{Digest, Sha256};

/// How long a verification code stays valid: long enough to read an SMS,
/// short enough that a leaked code soon becomes useless.
pub const CODE_TTL_MS: u64 = 10 * 60 * 1000;

/// Wrong attempts after which the outstanding code is dead (a new one must be
/// requested): 5 guesses in 10^6 per code.
pub const MAX_WRONG_CODE_ATTEMPTS: u32 = 5;

/// Bytes of a device credential: 256 bits, so a plain SHA-256 at rest is
/// enough (no password stretching needed for random secrets).
pub const CREDENTIAL_BYTES: usize = 32;

/// How long a link code works: long enough to type or scan it on the new
/// device, short enough that a leaked one soon becomes useless.
pub const LINK_CODE_TTL_MS: u64 = 5 * 60 * 1000;

/// Linked (companion) devices per user, besides the primary.
pub const MAX_LINKED_DEVICES: usize = 4;

/// Link codes a user may create per hour.
pub const MAX_LINK_CODES_PER_HOUR: u32 = 10;

/// Alphabet of link codes: no 0/O or 1/I, so they survive being read aloud.
const LINK_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Characters in a link code: 16 × 5 bits = 80 bits of entropy.
const LINK_CODE_CHARS: usize = 16;

/// A fresh link code, shown as `XXXX-XXXX-XXXX-XXXX`.
#[must_use]
pub fn new_link_code() -> String {
    let mut rng = rand::rng();
    let mut s = String::with_capacity(LINK_CODE_CHARS + 3);
    for i in 0..LINK_CODE_CHARS {
        if i > 0 && i % 4 == 0 {
            s.push('-');
        }
        s.push(char::from(
            LINK_ALPHABET[rng.random_range(0..LINK_ALPHABET.len())],
        ));
    }
    s
}

/// The canonical form of a link code as typed: upper case, no dashes or
/// spaces. `None` if it cannot be a link code.
#[must_use]
pub fn normalize_link_code(code: &str) -> Option<String> {
    let s: String = code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (s.len() == LINK_CODE_CHARS && s.bytes().all(|b| LINK_ALPHABET.contains(&b))).then_some(s)
}

/// True for an E.164 number: `+`, a non-zero digit, then 7 to 14 digits.
#[must_use]
pub fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Longest locale tag accepted in `RequestCode` (BCP 47 allows longer,
/// but no SMS gateway words a message by more than language, script and
/// region).
pub const MAX_LOCALE_BYTES: usize = 35;

/// Checks a `RequestCode.locale`: empty, or a BCP 47-shaped tag of ASCII
/// letters, digits and hyphens (`en`, `pt-BR`, `zh-Hant-TW`).
///
/// # Errors
/// A message for the client naming the rule.
pub fn check_locale(locale: &str) -> Result<(), String> {
    let shaped = locale.len() <= MAX_LOCALE_BYTES
        && locale.split('-').all(|part| {
            (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    if locale.is_empty() || shaped {
        Ok(())
    } else {
        Err(format!(
            "locale must be a BCP 47 tag such as \"en-US\" (letters, digits, hyphens; at most {MAX_LOCALE_BYTES} bytes)"
        ))
    }
}

/// A fresh 6-digit code.
#[must_use]
pub fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// What is stored instead of the code.
#[must_use]
pub fn code_hash(phone: &str, code: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"switchboard code\0");
    h.update(phone.as_bytes());
    h.update([0]);
    h.update(code.as_bytes());
    h.finalize().to_vec()
}

/// A fresh random device credential.
#[must_use]
pub fn new_credential() -> Vec<u8> {
    let mut c = vec![0u8; CREDENTIAL_BYTES];
    rand::rng().fill(&mut c[..]);
    c
}

/// What is stored instead of the credential.
#[must_use]
pub fn credential_hash(credential: &[u8]) -> Vec<u8> {
    Sha256::digest(credential).to_vec()
}

/// Compares two hashes in time independent of where they differ.
#[must_use]
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        assert!(is_e164("+14155550123"));
        assert!(is_e164("+4930123456"));
        assert!(!is_e164("14155550123"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
        assert!(!is_e164("+1415555O123"));
        assert!(!is_e164(""));
    }

    #[test]
    fn link_codes() {
        let code = new_link_code();
        assert_eq!(code.len(), 19);
        let norm = normalize_link_code(&code).unwrap();
        assert_eq!(norm.len(), 16);
        assert_eq!(
            normalize_link_code(&code.to_lowercase()),
            Some(norm.clone())
        );
        assert_ne!(new_link_code(), code);
        assert!(normalize_link_code("ABCD-EFGH").is_none());
        assert!(normalize_link_code("0000-0000-0000-0000").is_none());
    }

    #[test]
    fn codes_and_credentials() {
        let c = new_code();
        assert_eq!(c.len(), 6);
        assert!(c.bytes().all(|b| b.is_ascii_digit()));
        assert!(hashes_equal(&code_hash("+1", &c), &code_hash("+1", &c)));
        assert!(!hashes_equal(
            &code_hash("+1", "000000"),
            &code_hash("+2", "000000")
        ));
        let cred = new_credential();
        assert_eq!(cred.len(), CREDENTIAL_BYTES);
        assert_ne!(cred, new_credential());
    }
}
