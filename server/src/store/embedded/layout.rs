//! Key layouts of the embedded store. Integers are big-endian so byte order
//! is numeric order and a device's queue is one contiguous, ordered range.

use crate::store::{DedupKey, DeviceKey, Recipient};

/// `user (8) | device (4)`: the prefix of a device's queue.
pub fn device(d: DeviceKey) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&d.user.to_be_bytes());
    k[8..].copy_from_slice(&d.device.to_be_bytes());
    k
}

/// `user (8) | device (4) | seq (8)`: one queue entry.
pub fn queue_entry(d: DeviceKey, seq: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..12].copy_from_slice(&device(d));
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a queue entry key back into device and seq.
pub fn parse_queue_entry(k: &[u8]) -> Option<(DeviceKey, u64)> {
    let user = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let device = u32::from_be_bytes(k.get(8..12)?.try_into().ok()?);
    let seq = u64::from_be_bytes(k.get(12..20)?.try_into().ok()?);
    Some((DeviceKey { user, device }, seq))
}

/// `owner (8) | id (8)`: one piece of shard-to-shard mail.
pub fn mail(owner: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&owner.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Splits a [`mail`] key back into owner and id.
pub fn parse_mail(k: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(k.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(k.get(8..16)?.try_into().ok()?),
    ))
}

/// `to (8) | from_user (8) | from_device (4) | client_msg_id`, and for a
/// group recipient one more byte, 0xFF: client message ids are UTF-8, which
/// never contains that byte, so no group key equals a user key.
pub fn dedup(k: &DedupKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(21 + k.client_msg_id.len());
    v.extend_from_slice(&k.to.id().to_be_bytes());
    v.extend_from_slice(&k.from.user.to_be_bytes());
    v.extend_from_slice(&k.from.device.to_be_bytes());
    v.extend_from_slice(k.client_msg_id.as_bytes());
    if matches!(k.to, Recipient::Group(_)) {
        v.push(GROUP_DEDUP_MARK);
    }
    v
}

/// Ends the dedup key of a send to a group.
const GROUP_DEDUP_MARK: u8 = 0xFF;

/// Parses [`dedup`] back.
pub fn parse_dedup(k: &[u8]) -> Option<DedupKey> {
    let to = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let (to, id) = match k.get(20..)? {
        [id @ .., GROUP_DEDUP_MARK] => (Recipient::Group(to), id),
        id => (Recipient::User(to), id),
    };
    Some(DedupKey {
        to,
        from: DeviceKey {
            user: u64::from_be_bytes(k.get(8..16)?.try_into().ok()?),
            device: u32::from_be_bytes(k.get(16..20)?.try_into().ok()?),
        },
        client_msg_id: String::from_utf8(id.to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_sort_by_seq_and_roundtrip() {
        let d = DeviceKey { user: 7, device: 2 };
        assert!(queue_entry(d, 255) < queue_entry(d, 256));
        assert_eq!(parse_queue_entry(&queue_entry(d, 99)), Some((d, 99)));
    }

    #[test]
    fn dedup_keys_roundtrip() {
        let k = DedupKey {
            to: Recipient::User(1),
            from: DeviceKey { user: 2, device: 3 },
            client_msg_id: "abc".into(),
        };
        assert_eq!(parse_dedup(&dedup(&k)), Some(k.clone()));
        // The same ids sent to a group make another key.
        let g = DedupKey {
            to: Recipient::Group(1),
            ..k.clone()
        };
        assert_ne!(dedup(&g), dedup(&k));
        assert_eq!(parse_dedup(&dedup(&g)), Some(g));
    }
}
