//! The key directory, linked devices and multi-device fan-out over the raw
//! protocol.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use switchboard_proto::pb::{self, ErrorCode, client_frame::Body as In, server_frame::Body as Out};

async fn upload(c: &mut Raw, up: pb::UploadKeys) -> Out {
    c.request(In::UploadKeys(up)).await
}

#[tokio::test]
async fn uploads_are_verified_and_identity_is_fixed() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000301").await;
    let keys = TestKeys::new(1);
    let mut a = online(&server, &alice).await;
    match upload(&mut a, keys.upload(0, 20)).await {
        Out::KeysUploaded(k) => assert_eq!(k.one_time_keys_remaining, 20),
        other => panic!("{other:?}"),
    }
    // A tampered key is refused, naming it.
    let mut bad = keys.upload(20, 5);
    bad.one_time_keys[3].public_key = vec![9u8; 32].into();
    let out = upload(&mut a, bad).await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.code(), ErrorCode::InvalidKeys);
    assert!(e.message.contains("otk23"), "{}", e.message);
    // A different identity for the same device is refused.
    let out = upload(&mut a, TestKeys::new(2).upload(0, 1)).await;
    assert_eq!(error_code(&out), ErrorCode::InvalidKeys);
    // More than 100 per upload is refused.
    let out = upload(&mut a, keys.upload(100, 101)).await;
    assert_eq!(error_code(&out), ErrorCode::InvalidKeys);
    // AuthOk reports the stock on the next connection.
    let mut a2 = raw_tcp(&server.tcp()).await;
    match a2.auth(&alice).await {
        Out::AuthOk(ok) => {
            assert!(ok.has_keys);
            assert!(ok.primary);
            assert_eq!(ok.one_time_keys_remaining, 20);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn concurrent_bundle_fetches_never_share_a_one_time_key() {
    let server = TestServer::start().await;
    let bob = register(&server, "+15550000311").await;
    let keys = TestKeys::new(3);
    let mut b = online(&server, &bob).await;
    b.drain().await;
    assert!(matches!(
        upload(&mut b, keys.upload(0, 100)).await,
        Out::KeysUploaded(_)
    ));

    // 20 fetchers × 10 pipelined fetches = 200 concurrent bundle requests.
    let mut fetchers = Vec::new();
    for i in 0..20 {
        let acct = register(&server, &format!("+1555000040{i:02}")).await;
        let tcp = server.tcp();
        let bob_id = bob.user_id;
        fetchers.push(tokio::spawn(async move {
            let mut c = raw_tcp(&tcp).await;
            assert!(matches!(c.auth(&acct).await, Out::AuthOk(_)));
            for n in 0..10u32 {
                c.send_frame(&pb::ClientFrame {
                    id: 100 + n,
                    body: Some(In::FetchBundles(pb::FetchBundles {
                        user_id: bob_id,
                        ..Default::default()
                    })),
                })
                .await;
            }
            let mut got = Vec::new();
            while got.len() < 10 {
                let f = c.next().await.unwrap();
                match f.body.unwrap() {
                    Out::Bundles(b) => got.push(b),
                    Out::Deliver(_) | Out::UpToDate(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            got
        }));
    }
    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for f in fetchers {
        for bundles in f.await.unwrap() {
            assert_eq!(bundles.devices.len(), 1);
            let d = &bundles.devices[0];
            assert_eq!(d.device_id, bob.device_id);
            assert_eq!(
                d.identity.as_ref().unwrap().ed25519,
                keys.identity().ed25519
            );
            match d.key.as_ref().unwrap() {
                pb::device_bundle::Key::OneTimeKey(k) => one_time.push(k.key_id.clone()),
                pb::device_bundle::Key::FallbackKey(k) => {
                    assert_eq!(k.key_id, "fallback");
                    fallbacks += 1;
                }
            }
        }
    }
    let distinct: HashSet<_> = one_time.iter().collect();
    assert_eq!(one_time.len(), 100, "every one-time key handed out once");
    assert_eq!(distinct.len(), 100, "no one-time key handed out twice");
    assert_eq!(fallbacks, 100);

    // Bob was told to refill, and is told again on his next connection.
    let mut lows = Vec::new();
    while let Some(f) = b.pushes.pop_front() {
        if let Some(Out::KeysLow(k)) = f.body {
            lows.push(k.one_time_keys_remaining);
        }
    }
    loop {
        match b.push().await {
            Out::KeysLow(k) => {
                lows.push(k.one_time_keys_remaining);
                if k.one_time_keys_remaining == 0 {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(lows.contains(&9), "{lows:?}");
    let mut b2 = raw_tcp(&server.tcp()).await;
    match b2.auth(&bob).await {
        Out::AuthOk(ok) => assert_eq!(ok.one_time_keys_remaining, 0),
        other => panic!("{other:?}"),
    }
}

async fn link(server: &TestServer, primary: &mut Raw) -> Account {
    let code = match primary
        .request(In::CreateLinkCode(pb::CreateLinkCode {}))
        .await
    {
        Out::LinkCode(c) => c.code,
        other => panic!("{other:?}"),
    };
    let mut c = raw_tcp(&server.tcp()).await;
    match c
        .request(In::LinkDevice(pb::LinkDevice {
            code: code.to_lowercase(),
        }))
        .await
    {
        Out::Verified(v) => Account {
            phone: String::new(),
            user_id: v.user_id,
            device_id: v.device_id,
            credential: v.credential.to_vec(),
        },
        other => panic!("{other:?}"),
    }
}

fn devices_changed(e: &pb::QueueEntry) -> &pb::DevicesChanged {
    match &e.body {
        Some(pb::queue_entry::Body::DevicesChanged(d)) => d,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn linking_listing_and_revoking_devices() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000321").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;

    let laptop = link(&server, &mut a).await;
    assert_eq!(laptop.user_id, alice.user_id);
    assert_ne!(laptop.device_id, alice.device_id);
    // The primary hears about the new device.
    let e = a.next_entry().await;
    assert_eq!(
        devices_changed(&e).devices,
        vec![alice.device_id, laptop.device_id]
    );

    // The linked device works, but may not link or revoke.
    let mut l = online(&server, &laptop).await;
    match l.auth(&laptop).await {
        Out::Error(e) => assert_eq!(e.code(), ErrorCode::AlreadyAuthenticated),
        other => panic!("{other:?}"),
    }
    let out = l.request(In::CreateLinkCode(pb::CreateLinkCode {})).await;
    assert_eq!(error_code(&out), ErrorCode::NotPrimary);
    let out = l
        .request(In::RevokeDevice(pb::RevokeDevice {
            device_id: alice.device_id,
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::NotPrimary);

    // A code works once.
    let code = match a.request(In::CreateLinkCode(pb::CreateLinkCode {})).await {
        Out::LinkCode(c) => c.code,
        other => panic!("{other:?}"),
    };
    let mut c = raw_tcp(&server.tcp()).await;
    assert!(matches!(
        c.request(In::LinkDevice(pb::LinkDevice { code: code.clone() }))
            .await,
        Out::Verified(_)
    ));
    let mut c = raw_tcp(&server.tcp()).await;
    let out = c.request(In::LinkDevice(pb::LinkDevice { code })).await;
    assert_eq!(error_code(&out), ErrorCode::LinkCodeInvalid);
    let out = c
        .request(In::LinkDevice(pb::LinkDevice {
            code: "not a code".into(),
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::LinkCodeInvalid);

    // Up to four linked devices.
    link(&server, &mut a).await;
    link(&server, &mut a).await;
    let out = a.request(In::CreateLinkCode(pb::CreateLinkCode {})).await;
    assert_eq!(error_code(&out), ErrorCode::TooManyDevices);

    let list = match a.request(In::ListDevices(pb::ListDevices {})).await {
        Out::DeviceList(l) => l.devices,
        other => panic!("{other:?}"),
    };
    assert_eq!(list.len(), 5);
    assert_eq!(list.iter().filter(|d| d.primary).count(), 1);

    // Revoking the laptop disconnects it at once and kills its credential.
    assert!(matches!(
        a.request(In::RevokeDevice(pb::RevokeDevice {
            device_id: laptop.device_id
        }))
        .await,
        Out::DeviceRevoked(_)
    ));
    let frames = l.until_closed().await;
    let goodbye = frames
        .iter()
        .find_map(|f| match &f.body {
            Some(Out::Goodbye(g)) => g.reason.clone(),
            _ => None,
        })
        .expect("a goodbye");
    assert_eq!(goodbye.code(), ErrorCode::DeviceRevoked);
    let mut again = raw_tcp(&server.tcp()).await;
    assert_eq!(
        error_code(&again.auth(&laptop).await),
        ErrorCode::Unauthenticated
    );
    let out = a
        .request(In::RevokeDevice(pb::RevokeDevice {
            device_id: alice.device_id,
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::BadRequest);
}

/// With the sender and the recipient on one shard the two parts of a send
/// travel as one command; on two shards, as two. Both must behave alike.
#[tokio::test]
async fn sends_fan_out_to_the_senders_other_devices_on_one_shard() {
    fan_out_to_own_devices(true).await;
}

#[tokio::test]
async fn sends_fan_out_to_the_senders_other_devices_across_shards() {
    fan_out_to_own_devices(false).await;
}

async fn fan_out_to_own_devices(same_shard: bool) {
    use switchboard_server::router::shard_of_user;
    let server = TestServer::start().await; // two shards
    let alice = register(&server, "+15550000331").await;
    let alice_shard = shard_of_user(alice.user_id, 2);
    let mut bob = None;
    for i in 0..40 {
        let acct = register(&server, &format!("+155500004{i:02}")).await;
        if (shard_of_user(acct.user_id, 2) == alice_shard) == same_shard {
            bob = Some(acct);
            break;
        }
    }
    let bob = bob.expect("a recipient on the wanted shard");
    let mut a = online(&server, &alice).await;
    a.drain().await;
    let laptop = link(&server, &mut a).await;
    a.next_entry().await; // DevicesChanged
    let mut l = online(&server, &laptop).await;
    l.drain().await;
    let mut b = online(&server, &bob).await;
    b.drain().await;

    let send = |self_payloads: Vec<u32>, to: Vec<u32>| {
        In::Send(pb::Send {
            client_msg_id: "fan-1".into(),
            to_user: bob.user_id,
            payloads: to
                .into_iter()
                .map(|d| pb::DevicePayload {
                    device_id: d,
                    payload: b"for bob".to_vec().into(),
                })
                .collect(),
            self_payloads: self_payloads
                .into_iter()
                .map(|d| pb::DevicePayload {
                    device_id: d,
                    payload: b"copy for laptop".to_vec().into(),
                })
                .collect(),
            // Sent again after the mismatches below: a retry.
            first_attempt: false,
        })
    };
    // Forgetting one's own other device is a mismatch naming the sender.
    let out = a.request(send(vec![], vec![bob.device_id])).await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.code(), ErrorCode::DeviceMismatch);
    assert_eq!(e.user_id, alice.user_id);
    assert_eq!(e.missing_devices, vec![laptop.device_id]);
    // A stale list for the recipient names the recipient. (The sender's
    // own copies may already be stored then; the retry with the same id
    // below does not store them twice.)
    let out = a
        .request(send(vec![laptop.device_id], vec![bob.device_id + 7]))
        .await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.user_id, bob.user_id);
    assert_eq!(e.stale_devices, vec![bob.device_id + 7]);
    assert_eq!(e.missing_devices, vec![bob.device_id]);

    // The corrected send reaches Bob and Alice's laptop.
    let out = a
        .request(send(vec![laptop.device_id], vec![bob.device_id]))
        .await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    let got = b.next_entry().await;
    let Some(pb::queue_entry::Body::Message(m)) = got.body else {
        panic!()
    };
    assert_eq!(&m.payload[..], b"for bob");
    let copy = l.next_entry().await;
    let Some(pb::queue_entry::Body::Message(m)) = copy.body else {
        panic!()
    };
    assert_eq!(&m.payload[..], b"copy for laptop");
    assert_eq!(m.to_user, bob.user_id);
    assert_eq!(m.from_device, alice.device_id);
    assert_eq!(m.client_msg_id, "fan-1");

    // A note to self addresses the other devices only.
    let out = a
        .request(In::Send(pb::Send {
            client_msg_id: "note-1".into(),
            to_user: alice.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: laptop.device_id,
                payload: b"note".to_vec().into(),
            }],
            self_payloads: vec![],
            first_attempt: false,
        }))
        .await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    // Bob's ✓✓ for fan-1 reaches every device of Alice, the laptop too.
    let receipt = l.next_entry().await;
    let Some(pb::queue_entry::Body::Receipt(r)) = receipt.body else {
        panic!("{receipt:?}")
    };
    assert_eq!(r.kind(), pb::ReceiptKind::Delivered);
    assert_eq!(r.client_msg_ids, vec!["fan-1".to_string()]);
    let note = l.next_entry().await;
    let Some(pb::queue_entry::Body::Message(m)) = note.body else {
        panic!("{note:?}")
    };
    assert_eq!(&m.payload[..], b"note");
}
