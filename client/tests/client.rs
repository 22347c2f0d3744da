//! The SDK against the real server, in-process on ephemeral ports: the
//! handshake, registration, the reconnecting client, its outbox, its
//! device-list fix-ups and its de-duplication of redeliveries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::future::{join, join_all};
use harness::{Peer, TestServer, WAIT, client_config, state_dir};
use switchboard_client::pb;
use switchboard_client::{
    Client, CloseReason, ConnectOptions, Connection, DevicePayload, Error, ErrorCode, Event,
    Outbox, ProtocolError, ReceiptKind, UsageError, UserId,
};
use tokio::time::timeout;

#[tokio::test]
async fn connection_handshake_ping_auth_and_key_pinning() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550100001").await;
    let bob = server.register("+15550100002").await;
    let endpoint = server.endpoint();

    let mut conn = Connection::connect(&endpoint, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(conn.protocol_version(), 1);
    assert_eq!(conn.server_public_key(), &server.public_key[..]);
    conn.ping().await.unwrap();
    let err = conn.lookup(&bob.phone).await.unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::Unauthenticated));
    let ok = conn.auth(&alice).await.unwrap();
    assert_eq!(ok.phone, alice.phone);
    // The UpToDate push is kept aside while the lookup waits.
    let info = conn.lookup(&bob.phone).await.unwrap();
    assert_eq!(
        (info.user_id, info.devices),
        (bob.user_id.get(), vec![bob.device_id.get()])
    );
    let up = conn.next_frame().await.unwrap();
    assert!(
        matches!(up.body, Some(pb::server_frame::Body::UpToDate(_))),
        "{up:?}"
    );
    conn.close().await.unwrap();

    let mut pinned = ConnectOptions::default();
    pinned.server_key = Some(server.public_key.clone());
    Connection::connect(&endpoint, &pinned)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let mut wrong = ConnectOptions::default();
    wrong.server_key = Some(vec![7; 32]);
    let err = Connection::connect(&endpoint, &wrong).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol(ProtocolError::ServerKeyMismatch { .. })
        ),
        "{err}"
    );
    let mut old = ConnectOptions::default();
    old.versions = vec![0];
    let err = Connection::connect(&endpoint, &old).await.unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::UnsupportedVersion));

    // The same pinning in the client: the right key connects, a wrong one
    // stops it for good.
    let mut config = client_config(endpoint.clone());
    config.connect = pinned;
    Peer::online_with(config, alice.clone()).await.close().await;
    let mut config = client_config(endpoint);
    config.connect = wrong;
    let mut client = Peer::start(config, alice).await;
    assert_eq!(client.closed().await, CloseReason::ServerKeyMismatch);
    server.stop().await;
}

/// With receive timestamps a connection tells when the server's bytes
/// reached its socket, not when it got round to reading them.
#[tokio::test]
async fn receive_timestamps_tell_when_bytes_arrived_not_when_they_were_read() {
    let mut server = TestServer::start().await;
    let endpoint = server.endpoint();
    let mut plain = Connection::connect(&endpoint, &ConnectOptions::default())
        .await
        .unwrap();
    plain.ping().await.unwrap();
    assert_eq!(plain.received_at(), None, "off by default");

    let mut options = ConnectOptions::default();
    options.receive_timestamps = true;
    let mut conn = Connection::connect(&endpoint, &options).await.unwrap();
    let sent = std::time::SystemTime::now();
    let id = conn.next_request_id();
    conn.send_frame(&pb::ClientFrame {
        id,
        body: Some(pb::client_frame::Body::Ping(pb::Ping {})),
    })
    .await
    .unwrap();
    // The Pong waits in the socket while this reader is busy elsewhere.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let read_from = std::time::SystemTime::now();
    let pong = conn.next_frame().await.unwrap();
    assert!(
        matches!(pong.body, Some(pb::server_frame::Body::Pong(_))),
        "{pong:?}"
    );
    let at = conn.received_at().expect("a receive time");
    assert!(at >= sent, "{at:?} before the ping was sent ({sent:?})");
    assert!(
        at < read_from,
        "{at:?} is the read's time ({read_from:?}), not the arrival's"
    );
    plain.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn send_to_phone_looks_up_and_fixes_device_mismatch() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550200001").await;
    let bob = server.register("+15550200002").await;
    let carol = server.register("+15550200003").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut bob_old = Peer::online(&server, bob.clone()).await;

    let sent = a
        .client
        .send_to_phone(&bob.phone, Bytes::from("hi"))
        .await
        .unwrap();
    assert_eq!(sent.to_user, bob.user_id);
    assert!(!sent.duplicate);
    let got = bob_old.message().await;
    // Acked: otherwise the re-registration below reports it undelivered
    // and Alice's client sends it again to the new device.
    bob_old.client.ack([got.seq]).await.unwrap();
    assert_eq!(
        (
            got.client_msg_id,
            got.payload,
            got.from_user,
            got.from_phone
        ),
        (
            sent.client_msg_id,
            Bytes::from("hi"),
            alice.user_id,
            alice.phone.clone()
        )
    );

    // Bob registers again: a new device replaces the old one, which is
    // revoked, while Alice still holds the old device list.
    let bob_new = server.register(&bob.phone).await;
    assert_eq!(bob_new.user_id, bob.user_id);
    assert_ne!(bob_new.device_id, bob.device_id);
    let reason = bob_old.closed().await;
    assert_eq!(
        Error::Closed(reason).server_code(),
        Some(ErrorCode::DeviceRevoked)
    );
    let mut b = Peer::online(&server, bob_new.clone()).await;
    let again = a
        .client
        .send_to_user(bob.user_id, Bytes::from("again"))
        .await
        .unwrap();
    let got = b.message().await;
    assert_eq!(
        (got.client_msg_id, got.payload),
        (again.client_msg_id, Bytes::from("again"))
    );

    // An explicit per-device send reports the mismatch to the caller.
    let err = a
        .client
        .send(
            bob.user_id,
            vec![DevicePayload {
                device_id: bob.device_id.get(),
                payload: Bytes::from("x"),
            }],
        )
        .await
        .unwrap_err();
    match err {
        Error::Server(e) => {
            assert_eq!(e.code, ErrorCode::DeviceMismatch);
            assert_eq!(e.missing_devices, vec![bob_new.device_id]);
            assert_eq!(e.stale_devices, vec![bob.device_id]);
        }
        other => panic!("{other}"),
    }

    // A user the client knows nothing about (no devices, no phone): the
    // server's answer lists the devices.
    let cold = a
        .client
        .send_to_user(carol.user_id, Bytes::from("cold"))
        .await
        .unwrap();
    let mut c = Peer::start(client_config(server.endpoint()), carol).await;
    assert_eq!(c.message().await.client_msg_id, cold.client_msg_id);

    let err = a
        .client
        .send_to_phone("+15550209999", Bytes::from("x"))
        .await
        .unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::UnknownUser));
    a.client.close().await.unwrap();
    assert_eq!(a.closed().await, CloseReason::ByClient);
    b.close().await;
    c.close().await;
    server.stop().await;
}

#[tokio::test]
async fn pipelined_sends_keep_call_order_and_survive_a_server_restart() {
    const SENDS: usize = 2000;
    let mut server = TestServer::start().await;
    let alice = server.register("+15550300001").await;
    let bob = server.register("+15550300002").await;
    let a = Peer::online(&server, alice).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    a.client.lookup(&bob.phone).await.unwrap();

    // One task per call, so they all wait for their ✓ at once. On this
    // single-threaded runtime tasks first run in spawn order, so the calls
    // reach the client (or the fair queue of its full command channel) in
    // call order. (Polling the calls from one task with `join_all` does not:
    // past Tokio's cooperative budget, later calls get in first.)
    let bob_id = bob.user_id;
    let done = Arc::new(AtomicUsize::new(0));
    let mut sends = Vec::new();
    for i in 0..SENDS {
        let client = a.client.clone();
        let done = Arc::clone(&done);
        sends.push(tokio::spawn(async move {
            // Every other send gets an id the client makes: its first frame
            // says `first_attempt`, and its resends after the restart must
            // not, or the server stores them twice.
            let payload = Bytes::from(i.to_string());
            let sent = if i % 2 == 0 {
                client.send_to_user(bob_id, payload).await
            } else {
                client
                    .send_to_user_with_id(format!("m{i:03}"), bob_id, payload)
                    .await
            };
            done.fetch_add(1, Ordering::Relaxed);
            sent
        }));
    }

    // Drop every link as soon as the first message is through.
    let mut got = vec![b.message().await];
    server.stop().await;
    let done_at_stop = done.load(Ordering::Relaxed);
    assert!(done_at_stop < SENDS, "the link must drop mid-stream");
    server.restart().await;

    let mut expected = Vec::new();
    for (i, sent) in sends.into_iter().enumerate() {
        let sent = timeout(WAIT, sent).await.unwrap().unwrap().unwrap();
        if i % 2 == 1 {
            assert_eq!(sent.client_msg_id, format!("m{i:03}"));
        }
        assert_eq!(sent.to_user, bob.user_id);
        expected.push(sent.client_msg_id);
    }

    // Each exactly once, in call order (the SDK hides the redeliveries of
    // what was unacknowledged when the links dropped).
    b.client.ack([got[0].seq]).await.unwrap();
    while got.len() < SENDS {
        let m = b.message().await;
        b.client.ack([m.seq]).await.unwrap();
        got.push(m);
    }
    let ids: Vec<String> = got.iter().map(|m| m.client_msg_id.clone()).collect();
    assert_eq!(ids, expected);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.payload, Bytes::from(i.to_string()));
    }
    // Nothing else is pending for Bob: a later message is the next event.
    a.client
        .send_to_user_with_id("end", bob.user_id, Bytes::from("end"))
        .await
        .unwrap();
    assert_eq!(b.message().await.client_msg_id, "end");
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn outbox_survives_the_process_and_resends_in_order() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550400001").await;
    let bob = server.register("+15550400002").await;
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let mut config = client_config(server.endpoint());
    config.outbox_dir = Some(outbox.clone());
    let mut a = Peer::start(config.clone(), alice.clone()).await;
    a.disconnected().await;
    let ids = ["first", "second", "third"];
    // The sends enter the client in order, then the close: it returns once
    // the sends are on disk and the client has stopped.
    let sends = join_all(ids.map(|id| {
        a.client
            .send_to_phone_with_id(id, &bob.phone, Bytes::from(id))
    }));
    let (results, closed) = join(sends, a.client.close()).await;
    closed.unwrap();
    for result in results {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Closed(CloseReason::ByClient)), "{err}");
    }
    drop(a);
    let pending = Outbox::open(state_dir(&alice), &outbox).unwrap().list();
    let pending: Vec<(&str, Option<&str>)> = pending
        .iter()
        .map(|s| (s.client_msg_id.as_str(), s.to_phone.as_deref()))
        .collect();
    assert_eq!(pending, ids.map(|id| (id, Some(bob.phone.as_str()))));

    // The "next run": the server is back.
    server.restart().await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let mut a = Peer::start(config, alice.clone()).await;
    let mut sent = Vec::new();
    while sent.len() < ids.len() {
        let s = a
            .wait_for(|e| match e {
                Event::Sent(s) => Some(s),
                _ => None,
            })
            .await;
        assert_eq!(s.to_user, bob.user_id);
        sent.push(s.client_msg_id);
    }
    sent.sort();
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    assert_eq!(sent, sorted);
    for id in ids {
        let m = b.message().await;
        assert_eq!((m.client_msg_id.as_str(), m.payload), (id, Bytes::from(id)));
        b.client.ack([m.seq]).await.unwrap();
    }
    a.close().await;
    assert!(
        Outbox::open(state_dir(&alice), &outbox)
            .unwrap()
            .list()
            .is_empty()
    );
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn deliveries_become_events_acks_flow_and_receipts_reach_the_sender() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550500001").await;
    let bob = server.register("+15550500002").await;
    let mut a = Peer::online(&server, alice.clone()).await;

    // Sent while Bob is offline: drained, in order, before UpToDate.
    let mut ids = Vec::new();
    for text in ["one", "two"] {
        let sent = a
            .client
            .send_to_phone(&bob.phone, Bytes::from(text))
            .await
            .unwrap();
        ids.push(sent.client_msg_id);
    }
    let mut b = Peer::start(client_config(server.endpoint()), bob.clone()).await;
    for (id, text) in ids.iter().zip(["one", "two"]) {
        let m = b.message().await;
        assert_eq!(
            (&m.client_msg_id, m.payload, m.from_user, m.from_device),
            (id, Bytes::from(text), alice.user_id, alice.device_id)
        );
        assert_eq!(m.from_phone, alice.phone);
        // The next page, and then UpToDate, wait for this ack.
        b.client.ack([m.seq]).await.unwrap();
    }
    b.up_to_date().await;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    a.receipts_for(ReceiptKind::Delivered, &ids).await;

    // Live: message, ✓✓, then the blue ticks.
    let sent = a
        .client
        .send_to_user(bob.user_id, Bytes::from("live"))
        .await
        .unwrap();
    let m = b.message().await;
    assert_eq!(m.client_msg_id, sent.client_msg_id);
    b.client.ack([m.seq]).await.unwrap();
    a.receipts_for(ReceiptKind::Delivered, &[&sent.client_msg_id])
        .await;
    b.client
        .send_read_receipt(alice.user_id, vec![sent.client_msg_id.clone()])
        .await
        .unwrap();
    a.receipts_for(ReceiptKind::Read, &[&sent.client_msg_id])
        .await;
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn redeliveries_after_a_reconnect_are_not_emitted_again() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550600001").await;
    let bob = server.register("+15550600002").await;
    let mut a = Peer::online(&server, alice).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let mut messages = Vec::new();
    for text in ["acked while offline", "acked after reconnecting"] {
        let sent = a
            .client
            .send_to_user(bob.user_id, Bytes::from(text))
            .await
            .unwrap();
        let m = b.message().await;
        assert_eq!(m.client_msg_id, sent.client_msg_id);
        messages.push(m);
    }

    // Neither is acknowledged when every link drops.
    server.stop().await;
    let reason = b.disconnected().await;
    assert_eq!(
        reason.server_code(),
        Some(ErrorCode::ShuttingDown),
        "{reason}"
    );
    b.client.ack([messages[0].seq]).await.unwrap();
    server.restart().await;
    b.connected().await;
    b.client.ack([messages[1].seq]).await.unwrap();
    // Both come again on the new link; neither is a new event.
    b.wait_for(|e| match e {
        Event::Message { client_msg_id, .. } => panic!("{client_msg_id} emitted twice"),
        Event::UpToDate => Some(()),
        _ => None,
    })
    .await;
    let ids: Vec<&str> = messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    a.receipts_for(ReceiptKind::Delivered, &ids).await;

    // Both were acked for good: a later message is the next event.
    let sent = a
        .client
        .send_to_user(bob.user_id, Bytes::from("later"))
        .await
        .unwrap();
    assert_eq!(b.message().await.client_msg_id, sent.client_msg_id);
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn bad_credential_and_replaced_close_for_good() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550700001").await;
    let mut bad = alice.clone();
    bad.credential = vec![0; 32];
    let mut p = Peer::start(client_config(server.endpoint()), bad).await;
    let reason = p.closed().await;
    assert!(
        matches!(&reason, CloseReason::Rejected(e) if e.code == ErrorCode::Unauthenticated),
        "{reason}"
    );
    let err = p.client.lookup(&alice.phone).await.unwrap_err();
    assert!(
        matches!(err, Error::Closed(CloseReason::Rejected(_))),
        "{err}"
    );

    // The same device twice needs two copies of its state: one client at a
    // time may use a state directory.
    let copy = tempfile::tempdir().unwrap();
    for name in ["state.key", "state.bin"] {
        std::fs::copy(state_dir(&alice).join(name), copy.path().join(name)).unwrap();
    }
    let mut first = Peer::online(&server, alice.clone()).await;
    let mut config = client_config(server.endpoint());
    config.state_dir = Some(copy.path().to_owned());
    let mut second = Peer::online_with(config, alice.clone()).await;
    let reason = first.closed().await;
    assert!(
        matches!(&reason, CloseReason::Goodbye(e) if e.code == ErrorCode::Replaced),
        "{reason}"
    );
    assert_eq!(first.client.close_reason(), Some(reason));
    // The first stopped for good (no reconnect to replace the second back).
    second.client.lookup(&alice.phone).await.unwrap();
    for event in second.drain_ready() {
        assert!(
            !matches!(event, Event::Disconnected { .. } | Event::Closed { .. }),
            "{event:?}"
        );
    }
    second.close().await;
    server.stop().await;
}

#[tokio::test]
async fn pings_keep_a_quiet_link_open_and_idle_goodbyes_reconnect() {
    let mut server = TestServer::start_with(|c| c.idle_timeout_secs = 1).await;
    let alice = server.register("+15550800001").await;
    let bob = server.register("+15550800002").await;
    let mut config = client_config(server.endpoint());
    config.ping_interval = std::time::Duration::from_millis(100);
    let mut pinging = Peer::online_with(config, alice).await;
    // Default ping interval (25 s): closed as idle after 1 s, then back.
    let mut quiet = Peer::online(&server, bob.clone()).await;
    for _ in 0..2 {
        let reason = quiet.disconnected().await;
        assert_eq!(
            reason.server_code(),
            Some(ErrorCode::IdleTimeout),
            "{reason}"
        );
        quiet.up_to_date().await;
    }
    // Meanwhile, over two idle timeouts, the pinging client kept its link.
    pinging.client.lookup(&bob.phone).await.unwrap();
    for event in pinging.drain_ready() {
        assert!(!matches!(event, Event::Disconnected { .. }), "{event:?}");
    }
    pinging.close().await;
    quiet.close().await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_arguments_are_refused_up_front() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15550900001").await;
    let a = Peer::online(&server, alice.clone()).await;
    let client = &a.client;
    let usage = |r: Result<_, Error>| matches!(r, Err(Error::Usage(_)));
    assert!(usage(
        client
            .send_to_user_with_id("x".repeat(65), alice.user_id, Bytes::new())
            .await
    ));
    assert!(usage(
        client
            .send_to_user(alice.user_id, Bytes::from(vec![0u8; 64 * 1024 + 1]))
            .await
    ));
    assert!(usage(client.send(alice.user_id, vec![]).await));
    assert!(usage(client.send_to_user(UserId(0), Bytes::new()).await));
    assert!(usage(client.send_to_phone(" ", Bytes::new()).await));
    assert!(matches!(
        client.lookup("").await,
        Err(Error::Usage(UsageError::Invalid(_)))
    ));
    assert!(matches!(
        client
            .send_read_receipt(alice.user_id, vec!["id".into(); 1001])
            .await,
        Err(Error::Usage(UsageError::TooManyIds { .. }))
    ));
    let mut bad_key = client_config(server.endpoint());
    bad_key.connect.server_key = Some(vec![1; 31]);
    assert!(matches!(
        Client::start(bad_key, alice.clone()).await,
        Err(Error::Usage(UsageError::BadServerKey(31)))
    ));
    a.close().await;

    // The outbox limit, with nothing listening so sends stay pending.
    let mut unreachable = client_config("127.0.0.1:1".parse().unwrap());
    unreachable.outbox_capacity = 1;
    let (client, _events) = Client::start(unreachable, alice).await.unwrap();
    let first = client.send_to_user(UserId(2), Bytes::from("a"));
    tokio::pin!(first);
    // Polled first, the first send takes the only slot and waits.
    let err = tokio::select! {
        biased;
        _ = &mut first => panic!("a send cannot complete without a server"),
        second = client.send_to_user(UserId(2), Bytes::from("b")) => second.unwrap_err(),
    };
    assert!(matches!(err, Error::OutboxFull { capacity: 1 }), "{err}");
    client.close().await.unwrap();
    assert!(matches!(
        first.await,
        Err(Error::Closed(CloseReason::ByClient))
    ));
    server.stop().await;
}

#[tokio::test]
async fn websocket_transport_carries_the_same_stream() {
    let mut server = TestServer::start().await;
    let alice = server.register("+15551000001").await;
    let bob = server.register("+15551000002").await;
    let mut conn = Connection::connect(&server.ws_endpoint(), &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(conn.server_public_key(), &server.public_key[..]);
    conn.ping().await.unwrap();
    conn.close().await.unwrap();

    // Bob on TCP, Alice on WebSocket.
    let mut b = Peer::online(&server, bob.clone()).await;
    let queued = b
        .client
        .send_to_phone(&alice.phone, Bytes::from("w"))
        .await
        .unwrap();
    let mut a = Peer::start(client_config(server.ws_endpoint()), alice).await;
    let m = a.message().await;
    assert_eq!(
        (m.client_msg_id.as_str(), m.payload),
        (queued.client_msg_id.as_str(), Bytes::from("w"))
    );
    a.client.ack([m.seq]).await.unwrap();
    b.receipts_for(ReceiptKind::Delivered, &[&queued.client_msg_id])
        .await;

    // A full-size payload (encrypted, it fills the protocol's 64 KiB): more
    // than one Noise record.
    let big = Bytes::from(vec![42u8; switchboard_client::MAX_PLAINTEXT_BYTES]);
    let sent = a
        .client
        .send_to_phone(&bob.phone, big.clone())
        .await
        .unwrap();
    let m = b.message().await;
    assert_eq!((m.client_msg_id, m.payload), (sent.client_msg_id, big));
    a.close().await;
    b.close().await;
    server.stop().await;
}
