//! End-to-end encryption through the SDK against the real server: several
//! users and devices decrypting everything addressed to them, the server's
//! files never holding plaintext, linking and revoking devices, device
//! lists and identities changing under a running conversation, and the
//! local crypto store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::Path;

use bytes::Bytes;
use harness::{Peer, TestServer, hear, say, state_dir};
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_client::{
    CloseReason, ConnectOptions, Connection, DevicePayload, Error, ErrorCode, Event, Seq, UserId,
};

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn safety_changed(peer: &mut Peer) -> UserId {
    peer.wait_for(|e| match e {
        Event::SafetyNumberChanged { user_id, .. } => Some(user_id),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn three_devices_decrypt_everything_and_the_server_sees_no_plaintext() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552000001").await;
    let bob = server.register("+15552000002").await;
    let mut a1 = Peer::online(&server, alice.clone()).await;
    let laptop = server.link(&a1.client).await;
    let mut a2 = Peer::online(&server, laptop.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    const MARKER: &str = "zebra-7c1f-plaintext-marker";

    // Alice's primary → Bob; her laptop gets the copy.
    let id = say(&a1, bob.user_id, &format!("{MARKER} one")).await;
    let got = hear(&mut b, &id, &format!("{MARKER} one")).await;
    assert_eq!(
        (got.from_user, got.from_device),
        (alice.user_id, alice.device_id)
    );
    assert!(!got.from_own_device);
    let copy = hear(&mut a2, &id, &format!("{MARKER} one")).await;
    assert!(copy.from_own_device);
    assert_eq!(
        (copy.from_device, copy.to_user),
        (alice.device_id, bob.user_id)
    );

    // Bob replies: both of Alice's devices read it.
    let id = say(&b, alice.user_id, &format!("{MARKER} two")).await;
    for a in [&mut a1, &mut a2] {
        let m = hear(a, &id, &format!("{MARKER} two")).await;
        assert_eq!((m.from_user, m.to_user), (bob.user_id, alice.user_id));
        assert!(!m.from_own_device);
    }

    // The laptop talks too; the primary gets the copy.
    let id = say(&a2, bob.user_id, &format!("{MARKER} three")).await;
    hear(&mut b, &id, &format!("{MARKER} three")).await;
    let copy = hear(&mut a1, &id, &format!("{MARKER} three")).await;
    assert!(copy.from_own_device);
    assert_eq!(copy.from_device, laptop.device_id);

    // A note to self reaches the other device only.
    let id = say(&a1, alice.user_id, &format!("{MARKER} note")).await;
    let note = hear(&mut a2, &id, &format!("{MARKER} note")).await;
    assert_eq!(note.to_user, alice.user_id);

    // Everyone agrees on the safety number.
    let n = a1.client.safety_number(bob.user_id).await.unwrap();
    assert_eq!(n, a2.client.safety_number(bob.user_id).await.unwrap());
    assert_eq!(n, b.client.safety_number(alice.user_id).await.unwrap());

    // Nothing the server stored holds the marker.
    for p in [a1, a2, b] {
        p.close().await;
    }
    server.stop().await;
    let all = files(server.data_dir());
    assert!(!all.is_empty());
    for file in all {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, MARKER.as_bytes()),
            "{} holds plaintext",
            file.display()
        );
    }
}

#[tokio::test]
async fn linking_and_revoking_devices() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552100001").await;
    let bob = server.register("+15552100002").await;
    let mut a1 = Peer::online(&server, alice.clone()).await;
    let laptop = server.link(&a1.client).await;
    let devices = a1
        .wait_for(|e| match e {
            Event::DevicesChanged { devices } => Some(devices),
            _ => None,
        })
        .await;
    assert_eq!(devices, vec![alice.device_id, laptop.device_id]);
    let mut a2 = Peer::online(&server, laptop.clone()).await;

    let list = a1.client.list_devices().await.unwrap();
    assert_eq!(list.len(), 2);
    let me = list.iter().find(|d| d.this_device).unwrap();
    assert!(me.primary && me.identity_key.is_some());
    assert_eq!(me.device_id, alice.device_id);
    let other = list.iter().find(|d| !d.this_device).unwrap();
    assert!(!other.primary && other.identity_key.is_some());
    let err = a2.client.create_link_code().await.unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::NotPrimary));

    a1.client.revoke_device(laptop.device_id).await.unwrap();
    let reason = a2.closed().await;
    assert!(
        matches!(&reason, CloseReason::Goodbye(e) if e.code == ErrorCode::DeviceRevoked),
        "{reason}"
    );
    let mut conn = Connection::connect(&server.endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    let err = conn.auth(&laptop).await.unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::Unauthenticated));

    // The primary goes on without the revoked device.
    let mut b = Peer::online(&server, bob.clone()).await;
    let id = say(&a1, bob.user_id, "after revoking").await;
    hear(&mut b, &id, "after revoking").await;
    a1.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_new_device_of_the_peer_is_found_without_user_action() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552200001").await;
    let bob = server.register("+15552200002").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b1 = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "hello").await;
    hear(&mut b1, &id, "hello").await;

    // Alice holds a session and a device list for Bob; Bob links a tablet.
    let tablet = server.link(&b1.client).await;
    let mut b2 = Peer::online(&server, tablet).await;
    let id = say(&a, bob.user_id, "to both").await;
    hear(&mut b1, &id, "to both").await;
    hear(&mut b2, &id, "to both").await;
    // And the tablet's replies reach Alice and Bob's phone.
    let id = say(&b2, alice.user_id, "from the tablet").await;
    hear(&mut a, &id, "from the tablet").await;
    assert!(hear(&mut b1, &id, "from the tablet").await.from_own_device);
    for p in [a, b1, b2] {
        p.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_resend_after_device_mismatch_stores_the_own_copies_once() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552250001").await;
    let bob = server.register("+15552250002").await;
    let a1 = Peer::online(&server, alice.clone()).await;
    let laptop = server.link(&a1.client).await;
    let mut a2 = Peer::online(&server, laptop.clone()).await;
    let mut b1 = Peer::online(&server, bob.clone()).await;
    let id = say(&a1, bob.user_id, "hello").await;
    hear(&mut b1, &id, "hello").await;
    hear(&mut a2, &id, "hello").await;
    // The laptop's client would hide a duplicate; its queue is read raw.
    a2.close().await;

    // Bob links a tablet Alice's client does not know of. The first send
    // gets DEVICE_MISMATCH for Bob's part while the copy for Alice's laptop
    // is stored; the client resends the same id, which must not claim to be
    // a first attempt, so the laptop's copy is found and stored only once.
    let tablet = server.link(&b1.client).await;
    let mut b2 = Peer::online(&server, tablet).await;
    let id = say(&a1, bob.user_id, "to both").await;
    hear(&mut b1, &id, "to both").await;
    hear(&mut b2, &id, "to both").await;

    let mut raw = Connection::connect(&server.endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    raw.auth(&laptop).await.unwrap();
    let mut copies = 0;
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(20), raw.next_frame())
            .await
            .unwrap()
            .unwrap();
        match frame.body {
            Some(Out::Deliver(d)) => {
                let mut seqs = Vec::new();
                for e in d.entries {
                    seqs.push(e.seq);
                    if let Some(pb::queue_entry::Body::Message(m)) = e.body
                        && m.client_msg_id == id
                    {
                        copies += 1;
                    }
                }
                raw.ack(&seqs).await.unwrap();
            }
            Some(Out::UpToDate(_)) => break,
            _ => {}
        }
    }
    assert_eq!(copies, 1, "the laptop's copy was stored {copies} times");
    for p in [a1, b1, b2] {
        p.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_re_registered_peer_changes_the_safety_number_and_messages_flow() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552300001").await;
    let bob = server.register("+15552300002").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "before").await;
    hear(&mut b, &id, "before").await;
    let before = a.client.safety_number(bob.user_id).await.unwrap();
    assert_eq!(before, b.client.safety_number(alice.user_id).await.unwrap());

    // Bob re-registers: a new device with a new identity.
    let bob_new = server.register(&bob.phone).await;
    let reason = b.closed().await;
    assert_eq!(
        Error::Closed(reason).server_code(),
        Some(ErrorCode::DeviceRevoked)
    );
    let mut b = Peer::online(&server, bob_new.clone()).await;
    let id = say(&a, bob.user_id, "after").await;
    assert_eq!(safety_changed(&mut a).await, bob.user_id);
    hear(&mut b, &id, "after").await;
    let id = say(&b, alice.user_id, "reply").await;
    hear(&mut a, &id, "reply").await;
    let after = a.client.safety_number(bob.user_id).await.unwrap();
    assert_ne!(before, after);
    assert_eq!(after, b.client.safety_number(alice.user_id).await.unwrap());
    a.close().await;
    b.close().await;
    server.stop().await;
}

/// The one-time keys `creds`' device has on the server (its client must be
/// stopped: this authenticates as it).
async fn stock(server: &TestServer, creds: &switchboard_client::Credentials) -> u32 {
    let mut conn = Connection::connect(&server.endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    let ok = conn.auth(creds).await.unwrap();
    conn.close().await.unwrap();
    ok.one_time_keys_remaining
}

#[tokio::test]
async fn the_crypto_store_survives_restarts_and_stays_private() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552400001").await;
    let bob = server.register("+15552400002").await;
    let a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "first").await;
    hear(&mut b, &id, "first").await;
    let fingerprint = a.client.list_devices().await.unwrap()[0]
        .identity_key
        .clone()
        .unwrap();
    a.close().await;
    b.close().await;
    let bob_stock = stock(&server, &bob).await;

    // The same state dir: the session is reused, no key bundle is fetched.
    let a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let id = say(&a, bob.user_id, "second").await;
    hear(&mut b, &id, "second").await;
    a.close().await;
    b.close().await;
    assert_eq!(stock(&server, &bob).await, bob_stock);

    // The state file is encrypted and private.
    let dir = state_dir(&alice);
    let raw = std::fs::read(dir.join("state.bin")).unwrap();
    assert!(!contains(&raw, fingerprint.as_bytes()));
    assert!(!contains(&raw, b"signing_key"));
    #[cfg(unix)]
    for name in ["state.bin", "state.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    server.stop().await;
}

#[tokio::test]
async fn undecryptable_messages_are_reported_and_never_block_the_queue() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552500001").await;
    let bob = server.register("+15552500002").await;
    let a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let junk = a
        .client
        .send(
            bob.user_id,
            vec![DevicePayload {
                device_id: bob.device_id.get(),
                payload: Bytes::from_static(b"\x01\x01not olm"),
            }],
        )
        .await
        .unwrap();
    let (seq, id) = b
        .wait_for(|e| match e {
            Event::Undecryptable {
                seq, client_msg_id, ..
            } => Some((seq, client_msg_id)),
            Event::Message { .. } => panic!("junk decrypted"),
            _ => None,
        })
        .await;
    assert_eq!(id, junk.client_msg_id);
    assert!(seq > Seq(0));
    let id = say(&a, bob.user_id, "real").await;
    hear(&mut b, &id, "real").await;
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_low_key_stock_is_refilled() {
    let mut server = TestServer::start().await;
    let bob = server.register("+15552600001").await;
    let eve = server.register("+15552600002").await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let mut conn = Connection::connect(&server.endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    conn.auth(&eve).await.unwrap();
    let mut one_time = 0;
    loop {
        let body = In::FetchBundles(pb::FetchBundles {
            user_id: bob.user_id.get(),
            ..Default::default()
        });
        match conn.call(body).await.unwrap() {
            Out::Bundles(bundles) => match &bundles.devices[0].key {
                Some(pb::device_bundle::Key::OneTimeKey(_)) => one_time += 1,
                _ => break,
            },
            other => panic!("{other:?}"),
        }
        if one_time == 45 {
            break;
        }
    }
    assert_eq!(one_time, 45);
    let refilled = b
        .wait_for(|e| match e {
            Event::KeysPublished {
                one_time_keys_remaining,
            } => Some(one_time_keys_remaining),
            _ => None,
        })
        .await;
    // Topped up to 50 when the stock hit 9, less what was fetched since.
    assert!(refilled > 40, "{refilled}");
    conn.close().await.unwrap();
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn frames_the_server_routes_carry_only_ciphertext() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15552000091").await;
    // Bob has published keys (register does) but listens on a raw
    // connection: it sees exactly the frames the server routes to him.
    let bob = server.register("+15552000092").await;
    let a = Peer::online(&server, alice.clone()).await;
    const MARKER: &str = "okapi-93d2-routed-plaintext-marker";
    let id = say(&a, bob.user_id, &format!("{MARKER} hello")).await;

    let mut raw = Connection::connect(&server.endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    raw.auth(&bob).await.unwrap();
    let mut seen = None;
    while seen.is_none() {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(20), raw.next_frame())
            .await
            .unwrap()
            .unwrap();
        if let Some(Out::Deliver(d)) = frame.body {
            for e in d.entries {
                if let Some(pb::queue_entry::Body::Message(m)) = e.body
                    && m.client_msg_id == id
                {
                    seen = Some(m.payload);
                }
            }
        }
    }
    let payload = seen.unwrap();
    assert!(!payload.is_empty());
    assert!(
        !contains(&payload, MARKER.as_bytes()),
        "the routed payload holds plaintext"
    );
    a.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_device_without_keys_yet_is_a_retryable_error() {
    let server = TestServer::start().await;
    let alice = Peer::online(&server, server.register("+15550004001").await).await;
    let bob = server.register_without_keys("+15550004002").await;
    let err = alice
        .client
        .send_to_user(bob.user_id, Bytes::from_static(b"too early"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Crypto(switchboard_client::CryptoError::NoKeys { .. })
        ),
        "{err:?}"
    );
    // Transient: the device publishes its keys when it first connects.
    assert!(err.is_retryable(), "{err}");
}
