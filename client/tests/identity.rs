//! Identity and delivery correctness when a contact's devices change
//! (issue #18 §3), through the SDK against the real server: safety numbers
//! after a re-registration, device-set changes as events, and messages
//! queued for a replaced device sent again to the new one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{Peer, TestServer, client_config, hear, say, state_dir};
use switchboard_client::{DeviceId, Error, ErrorCode, Event, ReceiptKind, UserId};

/// The next `ContactDevicesChanged` about `user`: (devices, added, removed).
async fn devices_changed(
    peer: &mut Peer,
    user: UserId,
) -> (Vec<DeviceId>, Vec<DeviceId>, Vec<DeviceId>) {
    peer.wait_for(|e| match e {
        Event::ContactDevicesChanged {
            user_id,
            devices,
            added,
            removed,
            ..
        } if user_id == user => Some((devices, added, removed)),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn safety_numbers_agree_after_a_contact_re_registers() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552600001").await;
    let bob = server.register("+15552600002").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "before").await;
    hear(&mut b, &id, "before").await;
    let before = a.client.safety_number(bob.user_id).await.unwrap();
    assert_eq!(before, b.client.safety_number(alice.user_id).await.unwrap());

    // Bob re-registers, and his new device writes first: Alice learns the
    // new device from its message while still holding the old one's keys.
    let bob_new = server.register(&bob.phone).await;
    let reason = b.closed().await;
    assert_eq!(
        Error::Closed(reason).server_code(),
        Some(ErrorCode::DeviceRevoked)
    );
    let b = Peer::online(&server, bob_new.clone()).await;
    let id = say(&b, alice.user_id, "it's me, new phone").await;
    hear(&mut a, &id, "it's me, new phone").await;
    let (devices, added, removed) = devices_changed(&mut a, bob.user_id).await;
    assert_eq!(devices, vec![bob_new.device_id]);
    assert_eq!(added, vec![bob_new.device_id]);
    assert_eq!(removed, vec![bob.device_id]);

    let after = a.client.safety_number(bob.user_id).await.unwrap();
    assert_ne!(before, after);
    assert_eq!(after, b.client.safety_number(alice.user_id).await.unwrap());
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_contact_linking_or_revoking_a_device_is_an_event() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552610001").await;
    let bob = server.register("+15552610002").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b1 = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "hello").await;
    hear(&mut b1, &id, "hello").await;

    // Bob links a tablet: Alice's next send finds it, and she is told.
    let tablet = server.link(&b1.client).await;
    let mut b2 = Peer::online(&server, tablet.clone()).await;
    let id = say(&a, bob.user_id, "to both").await;
    let (devices, added, removed) = devices_changed(&mut a, bob.user_id).await;
    assert_eq!(devices, vec![bob.device_id, tablet.device_id]);
    assert_eq!(added, vec![tablet.device_id]);
    assert!(removed.is_empty());
    let changed = a
        .wait_for(|e| match e {
            Event::SafetyNumberChanged { user_id, .. } => Some(user_id),
            _ => None,
        })
        .await;
    assert_eq!(changed, bob.user_id);
    hear(&mut b1, &id, "to both").await;
    hear(&mut b2, &id, "to both").await;
    b2.close().await;

    // Bob revokes it: Alice's next send is corrected, and she is told.
    b1.client.revoke_device(tablet.device_id).await.unwrap();
    let id = say(&a, bob.user_id, "just you").await;
    let (devices, added, removed) = devices_changed(&mut a, bob.user_id).await;
    assert_eq!(devices, vec![bob.device_id]);
    assert!(added.is_empty());
    assert_eq!(removed, vec![tablet.device_id]);
    hear(&mut b1, &id, "just you").await;
    a.close().await;
    b1.close().await;
    server.stop().await;
}

/// Bob sends while Dave is offline; Dave re-registers on a new home; the
/// message queued for Dave's old device would be lost. Bob's client is told
/// (durably: it is offline meanwhile), sends it again to Dave's new device
/// after reporting the identity change, and sees ✓✓ and read.
#[tokio::test]
async fn messages_queued_for_a_replaced_device_reach_the_new_one() {
    let mut server = TestServer::start().await;
    let bob = server.register("+15552620001").await;
    let dave = server.register("+15552620002").await;
    let outbox = tempfile::tempdir().unwrap();
    let bob_config = || {
        let mut config = client_config(server.endpoint());
        config.outbox_dir = Some(outbox.path().to_owned());
        config.state_dir = Some(state_dir(&bob));
        config
    };
    let b = Peer::online_with(bob_config(), bob.clone()).await;
    let mut d = Peer::online(&server, dave.clone()).await;
    let id = say(&b, dave.user_id, "hi Dave").await;
    hear(&mut d, &id, "hi Dave").await;
    d.close().await;

    let lost = say(&b, dave.user_id, "while you were away").await;
    b.close().await;

    // Dave re-registers on a new home (a new device, new keys).
    let dave_new = server.register(&dave.phone).await;
    assert_ne!(dave_new.device_id, dave.device_id);
    let mut d = Peer::online(&server, dave_new.clone()).await;

    // Bob comes back: told, warned, and the message goes again.
    let mut b = Peer::start(bob_config(), bob.clone()).await;
    let mut order = Vec::new();
    let resending = b
        .wait_for(|e| match e {
            Event::SafetyNumberChanged { user_id, .. } if user_id == dave.user_id => {
                order.push("safety");
                None
            }
            Event::Undelivered {
                to_user,
                client_msg_ids,
                resending,
                ..
            } if to_user == dave.user_id => {
                order.push("undelivered");
                assert_eq!(client_msg_ids, vec![lost.clone()]);
                Some(resending)
            }
            _ => None,
        })
        .await;
    assert_eq!(resending, vec![lost.clone()]);
    let sent = b
        .wait_for(|e| match e {
            Event::SafetyNumberChanged { user_id, .. } if user_id == dave.user_id => {
                order.push("safety");
                None
            }
            Event::Sent(sent) => Some(sent),
            _ => None,
        })
        .await;
    assert_eq!(sent.client_msg_id, lost);
    assert!(
        !sent.duplicate,
        "the resend must be stored, not deduplicated"
    );
    assert_eq!(
        order,
        vec!["undelivered", "safety"],
        "the identity change is reported before the resend's ✓"
    );

    // Dave reads it; Bob sees ✓✓ and read for the original id.
    let m = d.message().await;
    assert_eq!(
        (m.client_msg_id.as_str(), &m.payload[..]),
        (lost.as_str(), &b"while you were away"[..])
    );
    d.client.ack([m.seq]).await.unwrap();
    d.client
        .send_read_receipt(bob.user_id, vec![lost.clone()])
        .await
        .unwrap();
    b.receipts_for(ReceiptKind::Delivered, &[&lost]).await;
    b.receipts_for(ReceiptKind::Read, &[&lost]).await;

    b.close().await;
    d.close().await;
    server.stop().await;
}

/// The key of the server at `endpoint`, as a handshake shows it.
async fn server_key(endpoint: &switchboard_client::Endpoint) -> Vec<u8> {
    switchboard_client::Connection::connect(endpoint, &Default::default())
        .await
        .unwrap()
        .server_public_key()
        .to_vec()
}

#[tokio::test]
async fn the_server_key_is_pinned_from_registration_or_first_use() {
    let mut server = TestServer::start().await;
    let mut impostor = TestServer::start().await;
    let creds = server.register("+15552630001").await;
    assert_eq!(
        creds.server_key.as_deref(),
        Some(&server_key(&server.endpoint()).await[..])
    );
    let refused = |reason: &switchboard_client::CloseReason| {
        matches!(reason, switchboard_client::CloseReason::ServerKeyMismatch)
    };

    // Registered credentials carry the key: another server is refused
    // before the credential is sent.
    let mut p = Peer::start(client_config(impostor.endpoint()), creds.clone()).await;
    let reason = p.closed().await;
    assert!(refused(&reason), "{reason:?}");

    // Credentials without one (kept by an older client): the first key
    // seen is pinned in the state directory, for later runs too.
    let mut bare = creds.clone();
    bare.server_key = None;
    let mut p = Peer::start(client_config(server.endpoint()), bare.clone()).await;
    p.up_to_date().await;
    p.close().await;
    let mut p = Peer::start(client_config(impostor.endpoint()), bare).await;
    let reason = p.closed().await;
    assert!(refused(&reason), "{reason:?}");
    server.stop().await;
    impostor.stop().await;
}
