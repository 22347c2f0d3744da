//! The SDK's plaintext envelope is exactly `switchboard.v1.Plaintext` of
//! proto/schema/switchboard_e2e.proto (PROTOCOL.md §18.3): bytes from one
//! decode with the other, field for field, both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use prost::Message;
use switchboard_client::crypto::envelope::{KIND_MESSAGE, Plaintext};
use switchboard_proto::pb;

fn identity() -> pb::IdentityKeys {
    pb::IdentityKeys {
        curve25519: Bytes::from(vec![1u8; 32]),
        ed25519: Bytes::from(vec![2u8; 32]),
        signature: Bytes::from(vec![3u8; 64]),
    }
}

#[test]
fn sdk_plaintext_decodes_with_the_schema_type() {
    let sdk = Plaintext {
        kind: KIND_MESSAGE,
        body: Bytes::from_static("héllo".as_bytes()),
        sent_at_ms: 1_700_000_000_123,
        to_user: 42,
        sender_identity: Some(identity()),
        group_id: 77,
    };
    let schema = pb::Plaintext::decode(&sdk.encode()[..]).unwrap();
    assert_eq!(schema.kind, sdk.kind);
    assert_eq!(schema.body, sdk.body);
    assert_eq!(schema.sent_at_ms, sdk.sent_at_ms);
    assert_eq!(schema.to_user, sdk.to_user);
    assert_eq!(schema.sender_identity, sdk.sender_identity);
    assert_eq!(schema.group_id, sdk.group_id);
    // And the same bytes either way.
    assert_eq!(schema.encode_to_vec(), sdk.encode());
}

#[test]
fn schema_plaintext_decodes_with_the_sdk() {
    let schema = pb::Plaintext {
        kind: 1,
        body: Bytes::from_static(b"hi"),
        sent_at_ms: 7,
        to_user: 9,
        sender_identity: None,
        group_id: 5,
    };
    let sdk = Plaintext::decode(&schema.encode_to_vec()).unwrap();
    assert_eq!(sdk.kind, 1);
    assert_eq!(&sdk.body[..], b"hi");
    assert_eq!((sdk.sent_at_ms, sdk.to_user), (7, 9));
    assert!(sdk.sender_identity.is_none());
    assert_eq!(sdk.group_id, 5);
}
