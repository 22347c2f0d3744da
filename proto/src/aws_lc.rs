//! X25519 and ChaCha20-Poly1305 for Noise from `aws-lc-rs`.
//!
//! Every handshake costs each side one key generation and three
//! Diffie-Hellman operations. `aws-lc-rs` does them about twice as fast as
//! `curve25519-dalek` (snow's default) on x86-64 with ADX/BMI2: 20 µs
//! instead of 40 µs per DH on the reference machine (docs/BENCHMARKS.md).
//! That is most of a reconnect storm's CPU.
//!
//! Every transport record is sealed and opened with ChaCha20-Poly1305, which
//! was about 8% of the server's CPU with records of 100-400 bytes. Sealing
//! 256 bytes takes 0.29 µs with `aws-lc-rs`'s assembly instead of 1.55 µs
//! with RustCrypto's `chacha20poly1305` (snow's default, whose cost is
//! mostly per message, not per byte): 7x faster at 64 bytes, 3x at 1 KiB,
//! 1.7x at 16 KiB, even with the aws-lc key built per message (see
//! [`ChaChaPoly`]; the ignored test `chacha_poly_timings` measures it).
//! BLAKE2s and randomness stay with snow's default resolver.
//!
//! Unlike the default, this rejects peer keys of small order (the shared
//! secret would be all zeros): such a handshake fails with a DH error. The
//! cipher's output is byte for byte the default's, so either side may use
//! either implementation.

use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::constant_time;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

use crate::limits::NOISE_TAG_BYTES;
use crate::noise::KEY_BYTES;

/// Length of a ChaCha20-Poly1305 key (snow's `CIPHERKEYLEN`).
const CIPHER_KEY_BYTES: usize = 32;

/// Resolves Curve25519 and ChaChaPoly; everything else falls back to snow's
/// default.
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

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => Some(Box::new(ChaChaPoly::default())),
            _ => None,
        }
    }
}

/// One X25519 key pair held by a handshake.
#[derive(Default)]
struct X25519 {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
    /// `None` until a key is set or generated. Shared with [`LAST_STATIC`]
    /// for a static key.
    key: Option<Arc<PrivateKey>>,
}

/// The last static key given to [`Dh::set`], loaded. snow sets the local
/// static key on every handshake, and a server's is always the same one:
/// loading it again (aws-lc derives the public key on load) cost 7.2 µs per
/// handshake, a third of a DH. Only `set` reads or fills it; generated
/// (ephemeral) keys never enter.
static LAST_STATIC: Mutex<Option<StaticKey>> = Mutex::new(None);

/// A loaded static key.
struct StaticKey {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
    key: Arc<PrivateKey>,
}

impl X25519 {
    fn load(&mut self, private: [u8; KEY_BYTES]) {
        self.private = private;
        self.key = PrivateKey::from_private_key(&agreement::X25519, &private)
            .ok()
            .map(Arc::new);
        let public = self.key.as_ref().and_then(|k| k.compute_public_key().ok());
        match public {
            Some(p) if p.as_ref().len() == KEY_BYTES => self.public.copy_from_slice(p.as_ref()),
            // Unreachable for 32 bytes; a key that cannot be used is
            // dropped, so every DH with it fails rather than using zeros.
            _ => self.key = None,
        }
    }

    /// [`Self::load`] for a static key, with its public half from
    /// [`LAST_STATIC`] when it is the same key as last time.
    fn load_static(&mut self, private: [u8; KEY_BYTES]) {
        let mut last = LAST_STATIC
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = last.as_ref()
            && constant_time::verify_slices_are_equal(&cached.private, &private).is_ok()
        {
            self.private = private;
            self.public = cached.public;
            self.key = Some(Arc::clone(&cached.key));
            return;
        }
        self.load(private);
        if let Some(key) = &self.key {
            *last = Some(StaticKey {
                private,
                public: self.public,
                key: Arc::clone(key),
            });
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
        self.load_static(private);
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

/// ChaCha20-Poly1305 as Noise uses it: the nonce is 4 zero bytes then the
/// 64-bit counter little-endian, the 16-byte tag follows the ciphertext.
///
/// Holds only the key, as snow's default does: a session holds two of these
/// for as long as the connection lives, and a long-lived aws-lc key would
/// add a C-heap `EVP_AEAD_CTX` (about 600 bytes) to each against the 4 KiB
/// per idle connection budget. The aws-lc key is built per message instead:
/// one `malloc`, a 32-byte copy and a `free`, about 30 ns (205 instead of
/// 174 ns to seal 64 bytes, against 1470 ns for the default).
///
/// `rekey` is the trait's default (encrypt zeros under nonce 2^64 - 1), as
/// for snow's own ChaChaPoly.
#[derive(Default)]
struct ChaChaPoly {
    key: [u8; CIPHER_KEY_BYTES],
}

impl ChaChaPoly {
    fn nonce(counter: u64) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&counter.to_le_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    /// `None` only if aws-lc cannot allocate the key context.
    fn key(&self) -> Option<LessSafeKey> {
        UnboundKey::new(&CHACHA20_POLY1305, &self.key)
            .ok()
            .map(LessSafeKey::new)
    }

    /// snow's default ChaChaPoly under the same key.
    fn default_cipher(&self) -> Option<Box<dyn Cipher>> {
        let mut cipher = DefaultResolver.resolve_cipher(&CipherChoice::ChaChaPoly)?;
        cipher.set(&self.key);
        Some(cipher)
    }
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; CIPHER_KEY_BYTES]) {
        self.key = *key;
    }

    /// Writes the ciphertext and tag to the front of `out` and returns their
    /// length.
    ///
    /// It cannot fail in practice, and `encrypt` has no way to report a
    /// failure, so each way it could is handled without a panic:
    /// - `out` too short: snow checks `payload + TAGLEN <= out` before every
    ///   call (handshake and transport), so this is a caller bug. The
    ///   default would panic; this writes nothing and returns 0, which the
    ///   peer refuses as shorter than a tag.
    /// - aws-lc refuses: with a 12-byte nonce, a tag-sized tag buffer and
    ///   non-overlapping buffers its only refusals are a plaintext of 256 GiB
    ///   or more (snow caps messages at 64 KiB) and failing to allocate the
    ///   key context. Then the message is sealed by snow's default, which
    ///   gives the same bytes.
    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len() + NOISE_TAG_BYTES;
        let Some((ciphertext, tag)) = out
            .get_mut(..len)
            .map(|sealed| sealed.split_at_mut(plaintext.len()))
        else {
            return 0;
        };
        let sealed = self.key().is_some_and(|key| {
            key.seal_out_of_place_scatter(
                Self::nonce(nonce),
                Aad::from(authtext),
                plaintext,
                ciphertext,
                &[],
                tag,
            )
            .is_ok()
        });
        if sealed {
            return len;
        }
        match self.default_cipher() {
            Some(cipher) => cipher.encrypt(nonce, authtext, plaintext, out),
            // Unreachable: snow's default features include ChaChaPoly.
            // Reported as for a short `out`.
            None => 0,
        }
    }

    /// Writes the plaintext to the front of `out` and returns its length.
    ///
    /// # Errors
    ///
    /// [`snow::Error::Decrypt`] if the tag does not verify (`out` is then
    /// zeroed), if `ciphertext` is shorter than a tag or `out` too short
    /// (snow checks both first), or if aws-lc cannot allocate the key
    /// context (the connection ends, as it would for any other error).
    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(NOISE_TAG_BYTES)
            .ok_or(snow::Error::Decrypt)?;
        let (body, tag) = ciphertext.split_at(len);
        let plaintext = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        self.key()
            .ok_or(snow::Error::Decrypt)?
            .open_separate_gather(
                Self::nonce(nonce),
                Aad::from(authtext),
                body,
                tag,
                plaintext,
            )
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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

    /// The static key cache: switching between keys (as a process with a
    /// server and clients does) gives each key its own public half and a
    /// working DH, whether it was cached or not.
    #[test]
    fn repeated_static_keys_keep_their_own_public_keys() {
        let reference = || DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let peer_priv = [3u8; KEY_BYTES];
        let mut peer = reference();
        peer.set(&peer_priv);
        for private in [
            [11u8; KEY_BYTES],
            [11; KEY_BYTES],
            [12; KEY_BYTES],
            [11; KEY_BYTES],
        ] {
            let (mut fast, mut slow) = (X25519::default(), reference());
            fast.set(&private);
            slow.set(&private);
            assert_eq!(fast.pubkey(), slow.pubkey());
            assert_eq!(fast.privkey(), &private[..]);
            let (mut a, mut b) = ([0u8; KEY_BYTES], [0u8; KEY_BYTES]);
            fast.dh(peer.pubkey(), &mut a).unwrap();
            peer.dh(slow.pubkey(), &mut b).unwrap();
            assert_eq!(a, b);
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

    fn reference_cipher(key: &[u8; CIPHER_KEY_BYTES]) -> Box<dyn Cipher> {
        let mut c = DefaultResolver
            .resolve_cipher(&CipherChoice::ChaChaPoly)
            .unwrap();
        c.set(key);
        c
    }

    fn fast_cipher(key: &[u8; CIPHER_KEY_BYTES]) -> Box<dyn Cipher> {
        let mut c = Resolver.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
        c.set(key);
        c
    }

    fn seal(c: &dyn Cipher, nonce: u64, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + NOISE_TAG_BYTES];
        assert_eq!(c.encrypt(nonce, ad, plaintext, &mut out), out.len());
        out
    }

    fn open(c: &dyn Cipher, nonce: u64, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, snow::Error> {
        let mut out = vec![0u8; sealed.len()];
        let n = c.decrypt(nonce, ad, sealed, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    const LENGTHS: [usize; 12] = [0, 1, 15, 16, 17, 63, 64, 255, 400, 1024, 1500, 65_519];
    const NONCES: [u64; 6] = [0, 1, 2, 0xdead_beef, u64::MAX - 1, u64::MAX];

    /// Same bytes as snow's default for every length, nonce and associated
    /// data, and each opens what the other sealed: old and new peers
    /// interoperate.
    #[test]
    fn chacha_poly_agrees_with_the_default_both_ways() {
        let key: [u8; CIPHER_KEY_BYTES] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let (fast, slow) = (fast_cipher(&key), reference_cipher(&key));
        assert_eq!(fast.name(), slow.name());
        for len in LENGTHS {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            for nonce in NONCES {
                for ad in [&b""[..], &[0xa5; 32]] {
                    let by_fast = seal(&*fast, nonce, ad, &plaintext);
                    let by_slow = seal(&*slow, nonce, ad, &plaintext);
                    assert_eq!(by_fast, by_slow, "len {len} nonce {nonce}");
                    assert_eq!(open(&*slow, nonce, ad, &by_fast).unwrap(), plaintext);
                    assert_eq!(open(&*fast, nonce, ad, &by_slow).unwrap(), plaintext);
                }
            }
        }
    }

    #[test]
    fn chacha_poly_refuses_tampering() {
        let key = [9u8; CIPHER_KEY_BYTES];
        let fast = fast_cipher(&key);
        for len in [0, 1, 300, 2000] {
            let sealed = seal(&*fast, 5, b"ad", &vec![3u8; len]);
            // Every byte of ciphertext and tag is covered.
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x80;
                assert!(open(&*fast, 5, b"ad", &bad).is_err(), "len {len} byte {i}");
            }
            assert!(open(&*fast, 6, b"ad", &sealed).is_err(), "wrong nonce");
            assert!(open(&*fast, 5, b"AD", &sealed).is_err(), "wrong ad");
            assert!(open(&*fast_cipher(&[8u8; 32]), 5, b"ad", &sealed).is_err());
            assert!(open(&*fast, 5, b"ad", &sealed[1..]).is_err(), "truncated");
            assert!(open(&*fast, 5, b"ad", &[&sealed[..], &[0]].concat()).is_err());
            assert!(open(&*fast, 5, b"ad", &sealed).is_ok());
        }
    }

    /// What snow rules out before calling is refused without a panic.
    #[test]
    fn chacha_poly_refuses_short_buffers() {
        let fast = fast_cipher(&[1u8; CIPHER_KEY_BYTES]);
        let mut out = [0u8; 20];
        assert_eq!(
            fast.encrypt(0, &[], &[7u8; 5], &mut out),
            0,
            "no room for tag"
        );
        assert_eq!(out, [0u8; 20], "nothing written");
        assert_eq!(fast.encrypt(0, &[], &[7u8; 4], &mut out), 20);
        for short in 0..NOISE_TAG_BYTES {
            assert!(fast.decrypt(0, &[], &out[..short], &mut [0u8; 64]).is_err());
        }
        let sealed = out;
        assert!(fast.decrypt(0, &[], &sealed, &mut [0u8; 3]).is_err());
        let mut plain = [0u8; 4];
        assert_eq!(fast.decrypt(0, &[], &sealed, &mut plain).unwrap(), 4);
        assert_eq!(plain, [7u8; 4]);
    }

    #[test]
    fn chacha_poly_rekeys_like_the_default() {
        let key = [42u8; CIPHER_KEY_BYTES];
        let (mut fast, mut slow) = (fast_cipher(&key), reference_cipher(&key));
        fast.rekey();
        slow.rekey();
        assert_eq!(
            seal(&*fast, 3, b"", b"after"),
            seal(&*slow, 3, b"", b"after")
        );
        assert_ne!(
            seal(&*fast, 3, b"", b"after"),
            seal(&*reference_cipher(&key), 3, b"", b"after")
        );
    }

    /// A full XX handshake and transport messages both ways between a peer
    /// on this resolver and one on snow's default, each way round.
    #[test]
    fn noise_interoperates_with_the_default_resolver() {
        fn builder(fast: bool) -> snow::Builder<'static> {
            let params = crate::noise::PATTERN.parse().unwrap();
            let resolver: Box<dyn CryptoResolver + Send> = if fast {
                Box::new(snow::resolvers::FallbackResolver::new(
                    Box::new(Resolver),
                    Box::new(DefaultResolver),
                ))
            } else {
                Box::new(DefaultResolver)
            };
            snow::Builder::with_resolver(params, resolver)
        }
        /// One message from `write` to `read`; returns what `read` got.
        fn deliver(
            write: impl FnOnce(&mut [u8]) -> Result<usize, snow::Error>,
            read: impl FnOnce(&[u8], &mut [u8]) -> Result<usize, snow::Error>,
        ) -> Vec<u8> {
            let (mut msg, mut buf) = (vec![0u8; 65_535], vec![0u8; 65_535]);
            let n = write(&mut msg).unwrap();
            let n = read(&msg[..n], &mut buf).unwrap();
            buf.truncate(n);
            buf
        }
        for (fast_initiator, fast_responder) in [(true, false), (false, true), (true, true)] {
            let i_key = builder(false).generate_keypair().unwrap();
            let r_key = builder(false).generate_keypair().unwrap();
            let mut i = builder(fast_initiator)
                .local_private_key(&i_key.private)
                .unwrap()
                .build_initiator()
                .unwrap();
            let mut r = builder(fast_responder)
                .local_private_key(&r_key.private)
                .unwrap()
                .build_responder()
                .unwrap();
            for (initiator_sends, payload) in [(true, &b"one"[..]), (false, b"two"), (true, b"")] {
                let got = if initiator_sends {
                    deliver(|m| i.write_message(payload, m), |m, b| r.read_message(m, b))
                } else {
                    deliver(|m| r.write_message(payload, m), |m, b| i.read_message(m, b))
                };
                assert_eq!(got, payload);
            }
            assert_eq!(r.get_remote_static().unwrap(), i_key.public);
            let (mut i, mut r) = (
                i.into_transport_mode().unwrap(),
                r.into_transport_mode().unwrap(),
            );
            for len in [0, 100, 400, 5000, 65_519] {
                let payload = vec![len as u8; len];
                let got = deliver(
                    |m| i.write_message(&payload, m),
                    |m, b| r.read_message(m, b),
                );
                assert_eq!(got, payload);
                let got = deliver(
                    |m| r.write_message(&payload, m),
                    |m, b| i.read_message(m, b),
                );
                assert_eq!(got, payload);
            }
        }
    }

    /// Microbenchmark for the choice of ChaChaPoly implementation, run with
    /// `cargo test -p switchboard-proto --release -- --ignored --nocapture
    /// chacha_poly_timings`. Prints ns per message to seal and to open, for
    /// snow's default, this crate's (aws-lc key built per message) and, for
    /// reference, aws-lc with a key kept for the connection's lifetime.
    /// Best of five rounds, to damp noise from other load.
    #[test]
    #[ignore = "timing, not a check; run in release with --nocapture"]
    fn chacha_poly_timings() {
        use std::hint::black_box;
        use std::time::Instant;

        const ROUNDS: usize = 5;
        let key = [5u8; CIPHER_KEY_BYTES];
        let (slow, fast) = (reference_cipher(&key), fast_cipher(&key));
        let kept = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());
        let best = |iters: usize, mut f: Box<dyn FnMut(u64) + '_>| -> f64 {
            (0..ROUNDS)
                .map(|_| {
                    let start = Instant::now();
                    for n in 0..iters {
                        f(n as u64);
                    }
                    start.elapsed().as_nanos() as f64 / iters as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        println!(
            "ns/message     seal: default  aws-lc  aws-lc kept | open: default  aws-lc  aws-lc kept"
        );
        for (len, iters) in [
            (64, 200_000),
            (256, 200_000),
            (1024, 100_000),
            (16_384, 10_000),
        ] {
            let plaintext = vec![0x5au8; len];
            let sealed = seal(&*slow, 0, &[], &plaintext);
            let mut out = vec![0u8; len + NOISE_TAG_BYTES];
            let seal_with = |c: &dyn Cipher, out: &mut [u8]| {
                best(
                    iters,
                    Box::new(|n| {
                        black_box(c.encrypt(n, &[], black_box(&plaintext), out));
                    }),
                )
            };
            let seal_slow = seal_with(&*slow, &mut out);
            let seal_fast = seal_with(&*fast, &mut out);
            let seal_kept = best(
                iters,
                Box::new(|n| {
                    let (ct, tag) = out.split_at_mut(len);
                    kept.seal_out_of_place_scatter(
                        ChaChaPoly::nonce(n),
                        Aad::empty(),
                        black_box(&plaintext),
                        ct,
                        &[],
                        tag,
                    )
                    .unwrap();
                }),
            );
            // Opening always uses nonce 0 so the tag verifies.
            let open_with = |c: &dyn Cipher, out: &mut [u8]| {
                best(
                    iters,
                    Box::new(|_| {
                        black_box(c.decrypt(0, &[], black_box(&sealed), out).unwrap());
                    }),
                )
            };
            let open_slow = open_with(&*slow, &mut out);
            let open_fast = open_with(&*fast, &mut out);
            let open_kept = best(
                iters,
                Box::new(|_| {
                    let (body, tag) = sealed.split_at(len);
                    kept.open_separate_gather(
                        ChaChaPoly::nonce(0),
                        Aad::empty(),
                        black_box(body),
                        tag,
                        &mut out[..len],
                    )
                    .unwrap();
                }),
            );
            println!(
                "{len:>6} bytes        {seal_slow:>8.0} {seal_fast:>7.0} {seal_kept:>12.0} | {open_slow:>13.0} {open_fast:>7.0} {open_kept:>12.0}"
            );
        }
    }
}
