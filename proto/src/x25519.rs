//! X25519 for the Noise handshake from `aws-lc-rs`.
//!
//! Every handshake costs each side one key generation and three
//! Diffie-Hellman operations. `aws-lc-rs` does them about twice as fast as
//! `curve25519-dalek` (snow's default) on x86-64 with ADX/BMI2: 20 µs
//! instead of 40 µs per DH on the reference machine (docs/BENCHMARKS.md).
//! That is most of a reconnect storm's CPU. The other primitives (ChaChaPoly,
//! BLAKE2s, randomness) stay with snow's default resolver.
//!
//! Unlike the default, this rejects peer keys of small order (the shared
//! secret would be all zeros): such a handshake fails with a DH error.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};

use crate::noise::KEY_BYTES;

/// Resolves only Curve25519; everything else falls back to snow's default.
pub(crate) struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(X25519::default())),
            _ => None,
        }
    }

    fn resolve_hash(&self, _choice: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// One X25519 key pair held by a handshake.
#[derive(Default)]
struct X25519 {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
    /// `None` until a key is set or generated.
    key: Option<PrivateKey>,
}

impl X25519 {
    fn load(&mut self, private: [u8; KEY_BYTES]) {
        self.private = private;
        self.key = PrivateKey::from_private_key(&agreement::X25519, &private).ok();
        let public = self.key.as_ref().and_then(|k| k.compute_public_key().ok());
        match public {
            Some(p) if p.as_ref().len() == KEY_BYTES => self.public.copy_from_slice(p.as_ref()),
            // Unreachable for 32 bytes; a key that cannot be used is
            // dropped, so every DH with it fails rather than using zeros.
            _ => self.key = None,
        }
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_BYTES
    }

    fn priv_len(&self) -> usize {
        KEY_BYTES
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut private = [0u8; KEY_BYTES];
        let n = privkey.len().min(KEY_BYTES);
        private[..n].copy_from_slice(&privkey[..n]);
        self.load(private);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut private = [0u8; KEY_BYTES];
        rng.try_fill_bytes(&mut private)?;
        self.load(private);
        if self.key.is_some() {
            Ok(())
        } else {
            Err(snow::Error::Dh)
        }
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        let peer = pubkey.get(..KEY_BYTES).ok_or(snow::Error::Dh)?;
        let dest = out.get_mut(..KEY_BYTES).ok_or(snow::Error::Dh)?;
        agreement::agree(
            key,
            UnparsedPublicKey::new(&agreement::X25519, peer),
            snow::Error::Dh,
            |secret| {
                if secret.len() == KEY_BYTES {
                    dest.copy_from_slice(secret);
                    Ok(())
                } else {
                    Err(snow::Error::Dh)
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use snow::resolvers::DefaultResolver;

    /// The same private keys give the same public keys and shared secrets
    /// as snow's default (curve25519-dalek): the two are interchangeable on
    /// the wire, so old and new clients and servers interoperate.
    #[test]
    fn agrees_with_the_default_implementation() {
        let reference = || DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        for seed in [1u8, 7, 42, 200, 255] {
            let a_priv = [seed; KEY_BYTES];
            let b_priv: [u8; KEY_BYTES] = std::array::from_fn(|i| seed.wrapping_mul(31) ^ i as u8);
            let (mut fast_a, mut slow_a, mut slow_b) =
                (X25519::default(), reference(), reference());
            fast_a.set(&a_priv);
            slow_a.set(&a_priv);
            slow_b.set(&b_priv);
            assert_eq!(fast_a.pubkey(), slow_a.pubkey());
            let (mut fast, mut slow) = ([0u8; KEY_BYTES], [0u8; KEY_BYTES]);
            fast_a.dh(slow_b.pubkey(), &mut fast).unwrap();
            slow_a.dh(slow_b.pubkey(), &mut slow).unwrap();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn small_order_peer_keys_and_missing_keys_are_refused() {
        let mut k = X25519::default();
        let mut out = [0u8; KEY_BYTES];
        assert!(k.dh(&[9u8; KEY_BYTES], &mut out).is_err(), "no key set yet");
        k.set(&[3u8; KEY_BYTES]);
        // The point of order 1 (u = 0) gives an all-zero secret.
        assert!(k.dh(&[0u8; KEY_BYTES], &mut out).is_err());
        assert!(k.dh(&[9u8; 5], &mut out).is_err(), "short key");
    }
}
