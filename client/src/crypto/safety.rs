//! Safety numbers: a fingerprint of two users' device identity keys that
//! both users compute identically and can compare out of band (read aloud,
//! side by side), in the style of Signal's numeric fingerprints.
//!
//! Per user: the user's device Ed25519 identity keys, sorted and
//! de-duplicated, are hashed with SHA-512 iterated [`ITERATIONS`] times
//! (slow enough to make searching for a colliding key set costly); the
//! first 30 bytes become 6 groups of 5 digits. The number is the two users'
//! 30 digits, the smaller user id's first: 60 digits in 12 groups of 5.

use sha2::{Digest, Sha512};

use crate::ids::UserId;

/// Hash iterations per user, as in Signal's numeric fingerprint.
pub const ITERATIONS: usize = 5200;

/// Format version hashed first, so a later algorithm cannot collide.
const VERSION: u16 = 1;

/// Digits contributed by each user.
const DIGITS_PER_USER: usize = 30;

/// One user's half of a safety number: 30 digits.
#[must_use]
pub fn user_digits(user_id: UserId, ed25519_keys: &[[u8; 32]]) -> String {
    let mut keys = ed25519_keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let input: Vec<u8> = keys.concat();
    let mut hash = Sha512::new()
        .chain_update(VERSION.to_be_bytes())
        .chain_update(&input)
        .chain_update(user_id.get().to_be_bytes())
        .finalize();
    for _ in 1..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(&input)
            .finalize();
    }
    let mut digits = String::with_capacity(DIGITS_PER_USER);
    for chunk in hash[..30].chunks_exact(5) {
        let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        digits.push_str(&format!("{:05}", value % 100_000));
    }
    digits
}

/// The safety number of two users, given each one's device Ed25519 keys:
/// 60 digits in 12 space-separated groups of 5, the same whichever user
/// computes it.
#[must_use]
pub fn safety_number(a: (UserId, &[[u8; 32]]), b: (UserId, &[[u8; 32]])) -> String {
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let digits = user_digits(first.0, first.1) + &user_digits(second.0, second.1);
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_order_independent_and_sensitive_to_every_key() {
        let alice = [[1u8; 32], [2u8; 32]];
        let bob = [[3u8; 32]];
        let n = safety_number((UserId(7), &alice), (UserId(9), &bob));
        assert_eq!(n, safety_number((UserId(9), &bob), (UserId(7), &alice)));
        let alice_reordered = [[2u8; 32], [1u8; 32], [1u8; 32]];
        assert_eq!(
            n,
            safety_number((UserId(7), &alice_reordered), (UserId(9), &bob))
        );
        assert_eq!(n.len(), 60 + 11);
        let groups: Vec<&str> = n.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(
            groups
                .iter()
                .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
        );
        // A new device, a changed key or another user id changes it.
        assert_ne!(
            n,
            safety_number((UserId(7), &alice[..1]), (UserId(9), &bob))
        );
        assert_ne!(
            n,
            safety_number((UserId(7), &alice), (UserId(9), &[[4u8; 32]]))
        );
        assert_ne!(n, safety_number((UserId(7), &alice), (UserId(10), &bob)));
    }

    #[test]
    fn stable_across_builds() {
        // Golden value: changing it breaks comparison with older clients.
        let n = safety_number((UserId(1), &[[0u8; 32]]), (UserId(2), &[[0xffu8; 32]]));
        assert_eq!(n, GOLDEN);
    }

    const GOLDEN: &str = "39767 25157 68842 63457 50343 44335 53722 25869 30970 04008 72403 07865";
}
