//! 1:1 messaging over the real protocol: ✓ / ✓✓ / read, offline delivery,
//! restarts, order, dedup, drain paging, over TCP and WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};

fn message(e: &pb::QueueEntry) -> &pb::Message {
    match &e.body {
        Some(pb::queue_entry::Body::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn receipt(e: &pb::QueueEntry) -> &pb::Receipt {
    match &e.body {
        Some(pb::queue_entry::Body::Receipt(r)) => r,
        other => panic!("expected a receipt, got {other:?}"),
    }
}

async fn online_exchange(ws: bool) {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000001").await;
    let bob = register(&server, "+15550000002").await;
    let connect = |acct: Account| {
        let tcp = server.tcp();
        let url = server.ws();
        async move {
            let mut c = if ws {
                raw_ws(&url).await
            } else {
                raw_tcp(&tcp).await
            };
            assert!(matches!(c.auth(&acct).await, Out::AuthOk(_)));
            assert!(c.drain().await.is_empty());
            c
        }
    };
    let mut a = connect(alice.clone()).await;
    let mut b = connect(bob.clone()).await;

    let bob_info = a.lookup(&bob.phone).await;
    assert_eq!(bob_info.user_id, bob.user_id);
    assert_eq!(bob_info.devices, vec![bob.device_id]);

    // ✓ first: the send is durable.
    let ok = a.send_text(&bob_info, "m-1", "hello bob").await;
    let Out::SendOk(ok) = ok else {
        panic!("{ok:?}")
    };
    assert!(!ok.duplicate);
    assert!(ok.server_ts_ms > 0);

    // Bob gets it live and acks it.
    let entry = b.next_entry().await;
    let m = message(&entry);
    assert_eq!(&m.payload[..], b"hello bob");
    assert_eq!(m.from_user, alice.user_id);
    assert_eq!(m.from_phone, alice.phone);
    assert_eq!(m.client_msg_id, "m-1");
    assert_eq!(entry.server_ts_ms, ok.server_ts_ms);

    // ✓✓: the delivery receipt reaches Alice.
    let r = a.next_entry().await;
    let r = receipt(&r);
    assert_eq!(r.kind(), pb::ReceiptKind::Delivered);
    assert_eq!(r.from_user, bob.user_id);
    assert_eq!(r.client_msg_ids, vec!["m-1".to_string()]);

    // Read receipt from Bob's client.
    let out = b
        .request(In::SendReceipt(pb::SendReceipt {
            to_user: alice.user_id,
            kind: pb::ReceiptKind::Read as i32,
            client_msg_ids: vec!["m-1".into()],
            group_id: 0,
        }))
        .await;
    assert!(matches!(out, Out::ReceiptOk(_)), "{out:?}");
    let r = a.next_entry().await;
    let r = receipt(&r);
    assert_eq!(r.kind(), pb::ReceiptKind::Read);
    assert_eq!(r.from_phone, bob.phone);
    assert_eq!(r.client_msg_ids, vec!["m-1".to_string()]);
}

#[tokio::test]
async fn online_exchange_with_receipts_over_tcp() {
    online_exchange(false).await;
}

#[tokio::test]
async fn online_exchange_with_receipts_over_websocket() {
    online_exchange(true).await;
}

#[tokio::test]
async fn offline_recipient_gets_message_and_offline_sender_gets_receipt_later() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000011").await;
    let bob = register(&server, "+15550000012").await;

    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    assert!(matches!(
        a.send_text(&bob_info, "x1", "while you were away").await,
        Out::SendOk(_)
    ));
    drop(a); // Alice goes offline.

    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    assert_eq!(got.len(), 1);
    assert_eq!(&message(&got[0]).payload[..], b"while you were away");
    drop(b);

    // Alice comes back and gets ✓✓: queued while she was away, or (if Bob's
    // ack is still being turned into a receipt) live right after.
    let mut a = online(&server, &alice).await;
    let mut got = a.drain().await;
    if got.is_empty() {
        got.push(a.next_entry().await);
    }
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(receipt(&got[0]).kind(), pb::ReceiptKind::Delivered);
    assert_eq!(receipt(&got[0]).client_msg_ids, vec!["x1".to_string()]);
}

#[tokio::test]
async fn clean_restart_keeps_accounts_and_queues() {
    let mut server = TestServer::start().await;
    let alice = register(&server, "+15550000021").await;
    let bob = register(&server, "+15550000022").await;
    {
        let mut a = online(&server, &alice).await;
        let bob_info = a.lookup(&bob.phone).await;
        for i in 0..50 {
            let out = a
                .send_text(&bob_info, &format!("r{i}"), &format!("msg {i}"))
                .await;
            assert!(matches!(out, Out::SendOk(_)));
        }
    }
    server.restart().await;
    // Seqs handed out after the restart must not reuse any stored before
    // it (that would overwrite queued messages).
    {
        let mut a = online(&server, &alice).await;
        let bob_info = a.lookup(&bob.phone).await;
        let out = a.send_text(&bob_info, "r50", "msg 50").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    let ids: Vec<_> = got
        .iter()
        .map(|e| message(e).client_msg_id.clone())
        .collect();
    let want: Vec<_> = (0..51).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want);
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Alice's credential survived too.
    let mut a = online(&server, &alice).await;
    a.drain().await;
}

#[tokio::test]
async fn a_client_pipelining_requests_of_every_kind_gets_every_answer() {
    // Two shards, so sends to Bob wait for a ticket or a push depending on
    // where he lives, and lookups are router work awaited in the
    // connection. 1,500 pipelined requests are far more than one
    // connection may have in flight; the held frames are taken as work
    // finishes, down to the last one (no more bytes arrive to wake the
    // connection then).
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000043").await;
    let bob = register(&server, "+15550000044").await;
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    const N: u32 = 1500;
    for i in 0..N {
        let body = if i % 3 == 0 {
            In::Send(pb::Send {
                client_msg_id: format!("m{i}"),
                to_user: bob_info.user_id,
                payloads: vec![pb::DevicePayload {
                    device_id: bob.device_id,
                    payload: i.to_be_bytes().to_vec().into(),
                }],
                ..Default::default()
            })
        } else {
            In::LookupUser(pb::LookupUser {
                phone: bob.phone.clone(),
            })
        };
        a.send_frame(&pb::ClientFrame {
            id: 1 + i,
            body: Some(body),
        })
        .await;
    }
    let mut answered = std::collections::HashSet::new();
    while answered.len() < N as usize {
        let f = a.next().await.expect("an answer");
        let i = f.id - 1;
        match f.body {
            Some(Out::SendOk(_)) => assert_eq!(i % 3, 0, "{i}"),
            Some(Out::UserInfo(u)) => {
                assert_ne!(i % 3, 0, "{i}");
                assert_eq!(u.user_id, bob_info.user_id);
            }
            other => panic!("{other:?}"),
        }
        assert!(answered.insert(f.id), "answered twice: {}", f.id);
    }
    let mut b = online(&server, &bob).await;
    assert_eq!(b.drain().await.len(), N.div_ceil(3) as usize);
}

#[tokio::test]
async fn thousand_messages_arrive_in_order_and_retries_are_stored_once() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000031").await;
    let bob = register(&server, "+15550000032").await;
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;

    // Pipeline 1,000 sends without waiting for each ✓.
    a.pipeline_sends(bob_info.user_id, bob.device_id, 1000, "o", 1000)
        .await;
    let mut oks = 0;
    while oks < 1000 {
        let f = a.next().await.unwrap();
        match f.body.unwrap() {
            Out::SendOk(ok) => {
                assert!(!ok.duplicate);
                oks += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // A retry of an accepted id is answered as a duplicate with the same ts.
    let first = a.send_text(&bob_info, "dup-1", "once").await;
    let Out::SendOk(first) = first else { panic!() };
    let again = a.send_text(&bob_info, "dup-1", "once").await;
    let Out::SendOk(again) = again else { panic!() };
    assert!(again.duplicate);
    assert_eq!(again.server_ts_ms, first.server_ts_ms);

    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    assert_eq!(got.len(), 1001, "dedup must store the retry once");
    for (i, e) in got.iter().take(1000).enumerate() {
        let m = message(e);
        assert_eq!(m.client_msg_id, format!("o{i}"));
        assert_eq!(&m.payload[..], &(i as u32).to_be_bytes());
    }
    assert_eq!(message(&got[1000]).client_msg_id, "dup-1");
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn a_first_attempt_skips_the_lookup_and_its_retry_is_still_found() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000033").await;
    let bob = register(&server, "+15550000034").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    let send = |first_attempt: bool| {
        In::Send(pb::Send {
            client_msg_id: "fa-1".into(),
            to_user: bob_info.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: bob.device_id,
                payload: b"hi".to_vec().into(),
            }],
            first_attempt,
            ..Default::default()
        })
    };
    let Out::SendOk(first) = a.request(send(true)).await else {
        panic!("first attempt refused")
    };
    assert!(!first.duplicate);
    // The retry says it is one, and finds the record the first attempt wrote.
    let Out::SendOk(retry) = a.request(send(false)).await else {
        panic!("retry refused")
    };
    assert!(retry.duplicate);
    assert_eq!(retry.server_ts_ms, first.server_ts_ms);
    // A retry wrongly marked as a first attempt is not looked up: stored
    // again (the flag is the sender's promise, PROTOCOL §9.6).
    let Out::SendOk(wrong) = a.request(send(true)).await else {
        panic!("second first attempt refused")
    };
    assert!(!wrong.duplicate);

    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    let ids: Vec<String> = got
        .iter()
        .map(|e| message(e).client_msg_id.clone())
        .collect();
    assert_eq!(ids, vec!["fa-1".to_owned(), "fa-1".to_owned()]);
}

#[tokio::test]
async fn ten_thousand_queued_messages_drain_in_pages_gated_by_acks() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000041").await;
    let bob = register(&server, "+15550000042").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    const N: u32 = 10_000;
    const WINDOW: u32 = 500;
    let mut sent = 0;
    let mut acked = 0;
    while acked < N {
        while sent < N && sent - acked < WINDOW {
            a.send_frame(&pb::ClientFrame {
                id: sent + 1,
                body: Some(In::Send(pb::Send {
                    client_msg_id: format!("q{sent}"),
                    to_user: bob_info.user_id,
                    payloads: vec![pb::DevicePayload {
                        device_id: bob.device_id,
                        payload: vec![b'x'; 100].into(),
                    }],
                    ..Default::default()
                })),
            })
            .await;
            sent += 1;
        }
        match a.next().await.unwrap().body.unwrap() {
            Out::SendOk(_) => acked += 1,
            Out::UpToDate(_) => {}
            other => panic!("{other:?}"),
        }
    }

    let mut b = online(&server, &bob).await;
    let mut total = 0usize;
    let mut pages = 0;
    let mut last_seq = 0;
    loop {
        match b.push().await {
            Out::Deliver(d) => {
                assert!(d.entries.len() <= 100, "page of {}", d.entries.len());
                pages += 1;
                for e in &d.entries {
                    assert!(e.seq > last_seq);
                    last_seq = e.seq;
                    assert_eq!(message(e).client_msg_id, format!("q{total}"));
                    total += 1;
                }
                // The next page must not arrive before this one is acked:
                // nothing else is pending on the wire now.
                assert!(b.pushes.is_empty());
                b.ack(d.entries.iter().map(|e| e.seq).collect()).await;
            }
            Out::UpToDate(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total, N as usize);
    assert!(pages >= 100, "{pages} pages");
    // Everything was acked, so the queue empties: entries whose deletion
    // was still in flight when the connection closed may come once more
    // (at-least-once), but nothing new does, and eventually nothing at all.
    drop(b);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut again = online(&server, &bob).await;
        let left = again.drain().await;
        assert!(left.iter().all(|e| e.seq <= last_seq), "{left:?}");
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "queue never emptied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn new_connection_replaces_old_one() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000051").await;
    let mut first = online(&server, &alice).await;
    first.drain().await;
    let mut second = online(&server, &alice).await;
    second.drain().await;
    let frames = first.until_closed().await;
    let last = frames.last().expect("a goodbye before closing");
    match &last.body {
        Some(Out::Goodbye(g)) => {
            assert_eq!(g.reason.as_ref().unwrap().code(), pb::ErrorCode::Replaced);
        }
        other => panic!("{other:?}"),
    }
    // The new connection works.
    assert!(matches!(
        second.request(In::Ping(pb::Ping {})).await,
        Out::Pong(_)
    ));
}

#[tokio::test]
async fn expired_entries_are_not_delivered() {
    let server = TestServer::start_with(|c| c.queue_ttl_secs = 1).await;
    let alice = register(&server, "+15550000061").await;
    let bob = register(&server, "+15550000062").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    assert!(matches!(
        a.send_text(&bob_info, "old", "stale news").await,
        Out::SendOk(_)
    ));
    // Waiting for the TTL to pass is the point of this test.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(matches!(
        a.send_text(&bob_info, "new", "fresh").await,
        Out::SendOk(_)
    ));
    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    let ids: Vec<_> = got
        .iter()
        .map(|e| message(e).client_msg_id.clone())
        .collect();
    assert_eq!(ids, vec!["new".to_string()]);
}

/// A recipient's ack turns into delivery receipts whether the sender lives
/// on the recipient's shard (receipt and removal in one batch) or on
/// another one (receipt queued there first, then the removal).
#[tokio::test]
async fn receipts_reach_senders_on_the_same_and_on_another_shard() {
    use switchboard_server::router::shard_of_user;
    let server = TestServer::start().await; // two shards
    let bob = register(&server, "+15550000900").await;
    let bob_shard = shard_of_user(bob.user_id, 2);
    let (mut same, mut other) = (None, None);
    for i in 1..40 {
        let acct = register(&server, &format!("+155500009{i:02}")).await;
        let slot = if shard_of_user(acct.user_id, 2) == bob_shard {
            &mut same
        } else {
            &mut other
        };
        if slot.is_none() {
            *slot = Some(acct);
        }
        if same.is_some() && other.is_some() {
            break;
        }
    }
    let senders = [
        same.expect("a sender on Bob's shard"),
        other.expect("a sender on the other shard"),
    ];
    let mut conns = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let mut c = online(&server, s).await;
        let bob_info = c.lookup(&bob.phone).await;
        let out = c.send_text(&bob_info, &format!("m{i}"), "hi").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
        conns.push(c);
    }
    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    assert_eq!(got.len(), 2, "{got:?}");
    for (i, c) in conns.iter_mut().enumerate() {
        let e = c.next_entry().await;
        assert_eq!(receipt(&e).kind(), pb::ReceiptKind::Delivered);
        assert_eq!(receipt(&e).client_msg_ids, vec![format!("m{i}")]);
    }
    // The same-shard message left Bob's queue in the batch that stored its
    // receipt. The other one is removed after its receipt is stored there;
    // if Bob disconnects first it is delivered again (never lost).
    drop(b);
    let mut b = online(&server, &bob).await;
    let again: Vec<String> = b
        .drain()
        .await
        .iter()
        .map(|e| message(e).client_msg_id.clone())
        .collect();
    assert!(again.is_empty() || again == ["m1"], "{again:?}");
}

#[tokio::test]
async fn a_pipelining_sender_gets_every_answer_through_a_small_push_queue() {
    // One shard: every ✓ comes through the sender's push queue, which
    // holds 4 frames beyond the sends that may be in flight. 600 pipelined
    // sends are more than may be in flight: the connection takes the rest
    // as answers come, instead of overflowing its queue and being
    // disconnected as a slow reader.
    let server = TestServer::start_with(|c| {
        c.shards = 1;
        c.outbound_queue_frames = 4;
    })
    .await;
    let alice = register(&server, "+15550000041").await;
    let bob = register(&server, "+15550000042").await;
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    const N: u32 = 600;
    a.pipeline_sends(bob_info.user_id, bob.device_id, 1, "p", N)
        .await;
    // One shard answers in the order it took the sends.
    for i in 0..N {
        let f = a.next().await.expect("an answer");
        assert!(matches!(f.body, Some(Out::SendOk(_))), "{f:?}");
        assert_eq!(f.id, 1 + i);
    }
    let mut b = online(&server, &bob).await;
    let got = b.drain().await;
    assert_eq!(got.len(), N as usize);
}
