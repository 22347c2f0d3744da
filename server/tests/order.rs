//! Per-recipient order under refusals: a send refused with a retryable
//! error (QUEUE_FULL, STORAGE_UNAVAILABLE, RATE_LIMITED) holds the sender
//! device's later sends to the same user until it is sent again, so the
//! retry never lands after them (PROTOCOL.md §11.5.1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};
use switchboard_server::store::faults::FaultyStore;

#[track_caller]
fn refusal(out: &Out) -> pb::Error {
    match out {
        Out::Error(e) => e.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn held(e: &pb::Error) -> bool {
    e.message.contains("earlier message")
}

/// The message ids a client receives until up to date, in order.
async fn drained_ids(b: &mut Raw) -> Vec<String> {
    message_ids(&b.drain().await)
}

#[tokio::test]
async fn a_send_refused_for_a_full_queue_is_not_overtaken_by_a_later_one() {
    let server = TestServer::start_with(|c| c.queue_max_entries_per_device = 3).await;
    let alice = register(&server, "+15550008001").await;
    let bob = register(&server, "+15550008002").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    for i in 0..3 {
        assert!(matches!(
            a.send_text(&b, &format!("m{i}"), "x").await,
            Out::SendOk(_)
        ));
    }
    let e3 = refusal(&a.send_text(&b, "m3", "x").await);
    assert_eq!(e3.code(), ErrorCode::QueueFull);
    assert!(!held(&e3), "{e3:?}");
    let e4 = refusal(&a.send_text(&b, "m4", "x").await);
    assert_eq!(e4.code(), ErrorCode::QueueFull);
    assert!(held(&e4), "{e4:?}");
    // Bob drains: room again. m4 still waits for m3.
    let mut bc = online(&server, &bob).await;
    assert_eq!(drained_ids(&mut bc).await, ["m0", "m1", "m2"]);
    a.await_delivered(3).await;
    let again = refusal(&a.send_text(&b, "m4", "x").await);
    assert!(held(&again), "m4 overtook the refused m3: {again:?}");
    // m3 comes back, then m4 and m5 follow in order.
    for id in ["m3", "m4", "m5"] {
        let out = a.send_text(&b, id, "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{id}: {out:?}");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        if let Some(pb::queue_entry::Body::Message(m)) = bc.next_entry().await.body {
            got.push(m.client_msg_id);
        }
    }
    assert_eq!(got, ["m3", "m4", "m5"]);
}

/// A server on a store whose writes can be made to fail.
async fn faulty_server() -> (TestServer, Arc<FaultyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let faulty = Arc::new(FaultyStore::new(
        switchboard_server::open_store(&cfg).unwrap(),
    ));
    let running = switchboard_server::start_with_store(cfg.clone(), faulty.clone())
        .await
        .unwrap();
    let server = TestServer {
        dir,
        server: Some(running),
        config: cfg,
    };
    (server, faulty)
}

#[tokio::test]
async fn a_send_refused_by_a_failed_commit_is_not_overtaken_by_a_later_one() {
    let (server, faulty) = faulty_server().await;
    let alice = register(&server, "+15550008011").await;
    let bob = register(&server, "+15550008012").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    faulty.set_fail_writes(true);
    let e0 = refusal(&a.send_text(&b, "m0", "x").await);
    assert_eq!(e0.code(), ErrorCode::StorageUnavailable);
    faulty.set_fail_writes(false);
    // The disk is back, but m1 must not go before m0.
    let e1 = refusal(&a.send_text(&b, "m1", "x").await);
    assert_eq!(e1.code(), ErrorCode::StorageUnavailable);
    assert!(held(&e1), "{e1:?}");
    for id in ["m0", "m1"] {
        let out = a.send_text(&b, id, "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{id}: {out:?}");
    }
    let mut bc = online(&server, &bob).await;
    assert_eq!(drained_ids(&mut bc).await, ["m0", "m1"]);
}

#[tokio::test]
async fn a_rate_limited_send_is_not_overtaken_by_a_later_one() {
    // 120 per minute: a burst of 120, then one every 0.5 s.
    let server = TestServer::start_with(|c| c.sends_per_pair_per_min = 120).await;
    let alice = register(&server, "+15550008021").await;
    let bob = register(&server, "+15550008022").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    // Send until refused: on a slow machine a token may come back during
    // the burst.
    let mut n = 0;
    let e = loop {
        match a.send_text(&b, &format!("m{n}"), "x").await {
            Out::SendOk(_) => n += 1,
            out => break refusal(&out),
        }
        assert!(n <= 240, "the pair limit never refused");
    };
    assert_eq!(e.code(), ErrorCode::RateLimited);
    let refused = format!("m{n}");
    // Once a token is back, a later message still waits for the refused one.
    tokio::time::sleep(Duration::from_millis(e.retry_after_ms + 50)).await;
    let later = refusal(&a.send_text(&b, &format!("m{}", n + 1), "x").await);
    assert_eq!(later.code(), ErrorCode::RateLimited);
    assert!(held(&later), "{later:?}");
    assert!(matches!(
        a.send_text(&b, &refused, "x").await,
        Out::SendOk(_)
    ));
    let mut bc = online(&server, &bob).await;
    let ids = drained_ids(&mut bc).await;
    assert_eq!(ids.len(), n + 1);
    assert_eq!(ids.last(), Some(&refused));
}

fn post(group_id: u64, id: &str) -> pb::client_frame::Body {
    pb::client_frame::Body::SendGroup(pb::SendGroup {
        group_id,
        client_msg_id: id.into(),
        payload: b"x".to_vec().into(),
        first_attempt: false,
    })
}

async fn group_of(a: &mut Raw, members: &[&Account]) -> u64 {
    match a
        .request(pb::client_frame::Body::CreateGroup(pb::CreateGroup {
            name: "order".into(),
            members: members.iter().map(|m| m.user_id).collect(),
            ..Default::default()
        }))
        .await
    {
        Out::GroupInfo(i) => i.group_id,
        other => panic!("{other:?}"),
    }
}

/// The client message ids of the group messages a member drains, in order.
async fn drained_group_ids(b: &mut Raw) -> Vec<String> {
    b.drain()
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            Some(pb::queue_entry::Body::GroupMessage(m)) => Some(m.client_msg_id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_group_message_refused_by_a_failed_commit_is_not_overtaken_by_a_later_one() {
    let (server, faulty) = faulty_server().await;
    let alice = register(&server, "+15550008031").await;
    let bob = register(&server, "+15550008032").await;
    let mut a = online(&server, &alice).await;
    let g = group_of(&mut a, &[&bob]).await;
    faulty.set_fail_writes(true);
    let e0 = refusal(&a.request(post(g, "g0")).await);
    assert_eq!(e0.code(), ErrorCode::StorageUnavailable);
    faulty.set_fail_writes(false);
    let e1 = refusal(&a.request(post(g, "g1")).await);
    assert_eq!(e1.code(), ErrorCode::StorageUnavailable);
    assert!(held(&e1), "{e1:?}");
    for id in ["g0", "g1"] {
        let out = a.request(post(g, id)).await;
        assert!(matches!(out, Out::SendOk(_)), "{id}: {out:?}");
    }
    let mut bc = online(&server, &bob).await;
    assert_eq!(drained_group_ids(&mut bc).await, ["g0", "g1"]);
}

#[tokio::test]
async fn a_rate_limited_group_message_is_not_overtaken_by_a_later_one() {
    let server = TestServer::start_with(|c| c.sends_per_pair_per_min = 120).await;
    let alice = register(&server, "+15550008041").await;
    let bob = register(&server, "+15550008042").await;
    let mut a = online(&server, &alice).await;
    let g = group_of(&mut a, &[&bob]).await;
    let mut n = 0;
    let e = loop {
        match a.request(post(g, &format!("g{n}"))).await {
            Out::SendOk(_) => n += 1,
            out => break refusal(&out),
        }
        assert!(n <= 240, "the pair limit never refused");
    };
    assert_eq!(e.code(), ErrorCode::RateLimited);
    let refused = format!("g{n}");
    tokio::time::sleep(Duration::from_millis(e.retry_after_ms + 50)).await;
    let later = refusal(&a.request(post(g, &format!("g{}", n + 1))).await);
    assert_eq!(later.code(), ErrorCode::RateLimited);
    assert!(held(&later), "{later:?}");
    assert!(matches!(a.request(post(g, &refused)).await, Out::SendOk(_)));
    let mut bc = online(&server, &bob).await;
    let ids = drained_group_ids(&mut bc).await;
    assert_eq!(ids.len(), n + 1);
    assert_eq!(ids.last(), Some(&refused));
}
