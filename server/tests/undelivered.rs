//! Messages queued for devices that a re-registration replaces: their
//! senders get a durable `Undelivered` notice, on whichever shard they live,
//! and a resend under the same id is stored (PROTOCOL.md §11.8).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_server::router::shard_of_user;

/// Registers a user on another shard than `other` (the test config runs
/// two shards), so the notice crosses shards.
async fn register_elsewhere(server: &TestServer, other: u64, prefix: &str) -> Account {
    for i in 0..40 {
        let acct = register(server, &format!("{prefix}{i:02}")).await;
        if shard_of_user(acct.user_id, 2) != shard_of_user(other, 2) {
            return acct;
        }
    }
    panic!("no user landed on the other shard");
}

#[tokio::test]
async fn senders_are_told_durably_what_a_replaced_device_never_got() {
    let mut server = TestServer::start().await;
    let dave = register(&server, "+15550077001").await;
    let bob = register_elsewhere(&server, dave.user_id, "+155500771").await;
    let mut b = online(&server, &bob).await;
    b.drain().await;
    let to_dave = b.lookup(&dave.phone).await;
    // Dave is offline: both stay in his device's queue. One was sent twice.
    for id in ["m1", "m2", "m2"] {
        assert!(matches!(
            b.send_text(&to_dave, id, "for the old phone").await,
            Out::SendOk(_)
        ));
    }
    drop(b);

    // Dave re-registers while Bob is offline; the server restarts before
    // Bob comes back.
    let dave2 = register(&server, &dave.phone).await;
    assert_eq!(dave2.user_id, dave.user_id);
    server.restart().await;
    let mut b = online(&server, &bob).await;
    let undelivered = |e: pb::QueueEntry| match e.body {
        Some(pb::queue_entry::Body::Undelivered(u)) => Some(u),
        _ => None,
    };
    let mut notices: Vec<pb::Undelivered> = b
        .drain()
        .await
        .into_iter()
        .filter_map(undelivered)
        .collect();
    // The notice may still be on its way from Dave's shard after the
    // restart (mail left in the store is posted again at start, and Bob's
    // drain may finish first): then it comes live.
    while notices.is_empty() {
        let e = tokio::time::timeout(WAIT, b.next_entry())
            .await
            .expect("no Undelivered notice came");
        notices.extend(undelivered(e));
    }
    assert_eq!(notices.len(), 1, "{notices:?}");
    let notice = &notices[0];
    assert_eq!(notice.to_user, dave.user_id);
    assert_eq!(notice.from_device, bob.device_id);
    assert_eq!(notice.client_msg_ids, vec!["m1", "m2"]);
    assert_eq!(
        notice.reason(),
        pb::UndeliveredReason::DevicesReplaced,
        "{notice:?}"
    );

    // The resend under the same id is stored (not answered as a
    // duplicate) and reaches the new device; a retry of it is a duplicate.
    let to_dave = b.lookup(&dave.phone).await;
    assert_eq!(to_dave.devices, vec![dave2.device_id]);
    let resend = |id: &str| {
        let In::Send(mut send) = send_to(&to_dave, id, b"again".to_vec()) else {
            unreachable!()
        };
        send.first_attempt = false;
        In::Send(send)
    };
    match b.request(resend("m1")).await {
        Out::SendOk(ok) => assert!(!ok.duplicate, "the resend was not stored"),
        other => panic!("{other:?}"),
    }
    match b.request(resend("m1")).await {
        Out::SendOk(ok) => assert!(ok.duplicate),
        other => panic!("{other:?}"),
    }
    let mut d = online(&server, &dave2).await;
    let got = d.drain().await;
    assert_eq!(message_ids(&got), vec!["m1"]);
}

#[tokio::test]
async fn nothing_is_reported_when_no_message_waited() {
    let server = TestServer::start().await;
    let dave = register(&server, "+15550077201").await;
    let bob = register(&server, "+15550077202").await;
    let mut b = online(&server, &bob).await;
    b.drain().await;
    let to_dave = b.lookup(&dave.phone).await;
    assert!(matches!(
        b.send_text(&to_dave, "seen", "hi").await,
        Out::SendOk(_)
    ));
    // Dave reads it before re-registering.
    let mut d = online(&server, &dave).await;
    assert_eq!(message_ids(&d.drain().await), vec!["seen"]);
    drop(d);
    let _dave2 = register(&server, &dave.phone).await;
    // Bob's next entry is the receipt, and no notice follows it.
    let entry = b.next_entry().await;
    assert!(matches!(
        entry.body,
        Some(pb::queue_entry::Body::Receipt(_))
    ));
    let mut b2 = online(&server, &bob).await;
    let rest = b2.drain().await;
    assert!(
        rest.iter()
            .all(|e| !matches!(e.body, Some(pb::queue_entry::Body::Undelivered(_)))),
        "{rest:?}"
    );
}
