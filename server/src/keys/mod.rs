//! The key directory's rules: what a valid upload is. The server stores and
//! hands out public keys only; it checks their signatures so a buggy or
//! malicious client cannot publish keys its identity did not sign.
//!
//! Signatures are Ed25519 by the device's identity key over a domain label
//! followed by the 32-byte public key (labels below), so a signature made
//! for one purpose cannot be replayed for another.

use ed25519_dalek::{Signature, VerifyingKey};
use switchboard_proto::pb;

/// Label signed together with the identity Curve25519 key.
pub const IDENTITY_LABEL: &[u8] = b"switchboard identity v1";
/// Label signed together with one-time and fallback keys.
pub const KEY_LABEL: &[u8] = b"switchboard key v1";
/// Most one-time keys in one upload.
pub const MAX_UPLOAD_ONE_TIME_KEYS: usize = 100;
/// Most one-time keys a device may have in stock: enough for a burst of new
/// sessions, small enough that one device cannot fill the store.
pub const MAX_STOCK_ONE_TIME_KEYS: u32 = 500;
/// Below this stock the device is told to upload more.
pub const LOW_STOCK_ONE_TIME_KEYS: u32 = 10;
/// Longest key id.
pub const MAX_KEY_ID_BYTES: usize = 64;

const KEY_BYTES: usize = 32;

fn verifying_key(bytes: &[u8]) -> Result<VerifyingKey, String> {
    let arr: [u8; KEY_BYTES] = bytes
        .try_into()
        .map_err(|_| format!("an Ed25519 key is 32 bytes, got {}", bytes.len()))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| "not a valid Ed25519 key".to_owned())
}

fn check_signature(
    key: &VerifyingKey,
    label: &[u8],
    public: &[u8],
    sig: &[u8],
) -> Result<(), String> {
    let sig = Signature::from_slice(sig)
        .map_err(|_| format!("a signature is 64 bytes, got {}", sig.len()))?;
    let mut msg = Vec::with_capacity(label.len() + public.len());
    msg.extend_from_slice(label);
    msg.extend_from_slice(public);
    key.verify_strict(&msg, &sig)
        .map_err(|_| "signature does not verify".to_owned())
}

/// Checks identity keys: sizes and the Ed25519 self-signature of the
/// Curve25519 key.
///
/// # Errors
/// A human-readable reason.
pub fn verify_identity(id: &pb::IdentityKeys) -> Result<VerifyingKey, String> {
    if id.curve25519.len() != KEY_BYTES {
        return Err(format!(
            "identity curve25519 key is 32 bytes, got {}",
            id.curve25519.len()
        ));
    }
    let ed = verifying_key(&id.ed25519)?;
    check_signature(&ed, IDENTITY_LABEL, &id.curve25519, &id.signature)
        .map_err(|e| format!("identity: {e}"))?;
    Ok(ed)
}

/// Checks one signed key against the identity's Ed25519 key.
///
/// # Errors
/// A human-readable reason.
pub fn verify_key(identity: &VerifyingKey, key: &pb::SignedKey, what: &str) -> Result<(), String> {
    if key.key_id.is_empty() || key.key_id.len() > MAX_KEY_ID_BYTES {
        return Err(format!(
            "{what}: key_id must be 1 to {MAX_KEY_ID_BYTES} bytes"
        ));
    }
    if key.public_key.len() != KEY_BYTES {
        return Err(format!(
            "{what} {}: a curve25519 key is 32 bytes, got {}",
            key.key_id,
            key.public_key.len()
        ));
    }
    check_signature(identity, KEY_LABEL, &key.public_key, &key.signature)
        .map_err(|e| format!("{what} {}: {e}", key.key_id))
}

/// Checks a whole upload; the identity keys are required.
///
/// # Errors
/// A human-readable reason naming the offending key.
pub fn verify_upload(up: &pb::UploadKeys) -> Result<(), String> {
    let id = up
        .identity
        .as_ref()
        .ok_or("identity keys are required in every upload")?;
    let ed = verify_identity(id)?;
    if let Some(fb) = &up.fallback_key {
        verify_key(&ed, fb, "fallback key")?;
    }
    if up.one_time_keys.len() > MAX_UPLOAD_ONE_TIME_KEYS {
        return Err(format!(
            "at most {MAX_UPLOAD_ONE_TIME_KEYS} one-time keys per upload, got {}",
            up.one_time_keys.len()
        ));
    }
    for k in &up.one_time_keys {
        verify_key(&ed, k, "one-time key")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(sk: &SigningKey, label: &[u8], public: &[u8]) -> Vec<u8> {
        let mut msg = label.to_vec();
        msg.extend_from_slice(public);
        sk.sign(&msg).to_bytes().to_vec()
    }

    fn upload(sk: &SigningKey) -> pb::UploadKeys {
        let curve = [7u8; 32];
        pb::UploadKeys {
            identity: Some(pb::IdentityKeys {
                curve25519: curve.to_vec().into(),
                ed25519: sk.verifying_key().to_bytes().to_vec().into(),
                signature: signed(sk, IDENTITY_LABEL, &curve).into(),
            }),
            fallback_key: Some(pb::SignedKey {
                key_id: "fb".into(),
                public_key: vec![1u8; 32].into(),
                signature: signed(sk, KEY_LABEL, &[1u8; 32]).into(),
            }),
            one_time_keys: (0..3u8)
                .map(|i| pb::SignedKey {
                    key_id: format!("k{i}"),
                    public_key: vec![i; 32].into(),
                    signature: signed(sk, KEY_LABEL, &[i; 32]).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn good_upload_verifies() {
        let sk = SigningKey::from_bytes(&[3u8; 32]);
        verify_upload(&upload(&sk)).unwrap();
    }

    #[test]
    fn tampering_is_caught_and_named() {
        let sk = SigningKey::from_bytes(&[3u8; 32]);
        let mut up = upload(&sk);
        up.one_time_keys[1].public_key = vec![9u8; 32].into();
        let err = verify_upload(&up).unwrap_err();
        assert!(err.contains("k1"), "{err}");

        let mut up = upload(&sk);
        up.identity.as_mut().unwrap().curve25519 = vec![8u8; 32].into();
        assert!(verify_upload(&up).unwrap_err().contains("identity"));

        // A key signed under the identity label is not a valid one-time key.
        let mut up = upload(&sk);
        up.one_time_keys[0].signature = signed(&sk, IDENTITY_LABEL, &[0u8; 32]).into();
        assert!(verify_upload(&up).is_err());

        let mut up = upload(&sk);
        up.identity = None;
        assert!(verify_upload(&up).is_err());

        let mut up = upload(&sk);
        up.one_time_keys[0].signature = vec![0u8; 10].into();
        assert!(verify_upload(&up).unwrap_err().contains("64 bytes"));
    }
}
