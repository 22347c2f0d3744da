//! Overload: with tight limits and a slow disk, flooding senders get
//! OVERLOADED, a stalled reader is disconnected, memory stays bounded, and
//! every ✓ is delivered later.
//!
//! The overload is made certain rather than hoped for: a fault-injecting
//! store makes every commit take longer than the request deadline (a
//! stalled disk), so the shard inboxes fill on any machine, however fast.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchboard_proto::pb::{self, ErrorCode, client_frame::Body as In, server_frame::Body as Out};
use switchboard_server::Config;
use switchboard_server::store::faults::FaultyStore;

/// The stated bound: resident memory of this whole process (server and the
/// test's few clients) under the flood.
const RSS_BOUND_BYTES: u64 = 256 * 1024 * 1024;
/// Longer than the request deadline below: while it is on, no shard can
/// take a command off its inbox in time.
const SLOW_COMMIT: Duration = Duration::from_millis(40);
/// Unacknowledged deliveries a connection may hold before it is cut.
const MAX_UNACKED: usize = 32;

async fn start_tight() -> (TestServer, Arc<FaultyStore>) {
    start_faulty(|cfg| {
        cfg.shard_inbox = 8;
        cfg.request_deadline_ms = 20;
        cfg.outbound_queue_frames = 8;
        cfg.write_timeout_ms = 500;
        cfg.max_unacked = MAX_UNACKED;
        cfg.drain_batch = 16;
        cfg.shards = 2;
    })
    .await
}

/// A server on a store whose commits can be slowed down.
async fn start_faulty(tweak: impl FnOnce(&mut Config)) -> (TestServer, Arc<FaultyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    tweak(&mut cfg);
    let inner = switchboard_server::open_store(&cfg).unwrap();
    let faulty = Arc::new(FaultyStore::new(inner));
    let server = switchboard_server::start_with_store(cfg.clone(), faulty.clone())
        .await
        .unwrap();
    (
        TestServer {
            dir,
            server: Some(server),
            config: cfg,
        },
        faulty,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_is_refused_cleanly_and_nothing_acknowledged_is_lost() {
    let (server, faulty) = start_tight().await;
    let bob = register(&server, "+15550000701").await;
    let carol = register(&server, "+15550000702").await;

    // Carol authenticates and then never reads again: a stalled reader.
    let mut stalled = raw_tcp(&server.tcp()).await;
    assert!(matches!(stalled.auth(&carol).await, Out::AuthOk(_)));

    // 16 flooders, registered and connected first, then released together
    // to pipeline 300 sends each to Bob (offline) and Carol (stalled).
    // Each also has one message to Bob acknowledged before the flood, so
    // the loss check below has ✓s to check however many of the flood's
    // are accepted (on a starved machine even the first may wait past the
    // deadline and be refused).
    let mut ready = Vec::new();
    let mut acked_before = Vec::new();
    for f in 0..16u32 {
        let acct = register(&server, &format!("+155500008{f:02}")).await;
        let mut c = raw_tcp(&server.tcp()).await;
        assert!(matches!(c.auth(&acct).await, Out::AuthOk(_)));
        let bob_info = c.lookup(&bob.phone).await;
        let id = format!("f{f}-before");
        let out = c.send_text(&bob_info, &id, "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
        acked_before.push(id);
        ready.push(c);
    }
    // From here on the disk is slow: every commit outlasts the deadline.
    faulty.set_commit_delay(SLOW_COMMIT);
    let mut flooders = Vec::new();
    for (f, mut c) in ready.into_iter().enumerate() {
        let (bob, carol) = (bob.clone(), carol.clone());
        let n = f;
        flooders.push(tokio::spawn(async move {
            let payload = vec![0x5a_u8; 4 * 1024];
            for i in 0..300u32 {
                let to = if i % 4 == 0 { &carol } else { &bob };
                c.send_frame(&pb::ClientFrame {
                    id: i + 1,
                    body: Some(In::Send(pb::Send {
                        client_msg_id: format!("f{n}-{i}"),
                        to_user: to.user_id,
                        payloads: vec![pb::DevicePayload {
                            device_id: to.device_id,
                            payload: payload.clone().into(),
                        }],
                        ..Default::default()
                    })),
                })
                .await;
            }
            let (mut acked, mut to_carol, mut overloaded) = (Vec::new(), 0u32, 0u32);
            let mut answered = 0;
            while answered < 300 {
                let Some(f) = c.next().await else { break };
                match f.body {
                    Some(Out::SendOk(_)) => {
                        let i = f.id - 1;
                        if i % 4 == 0 {
                            to_carol += 1;
                        } else {
                            acked.push(format!("f{n}-{i}"));
                        }
                        answered += 1;
                    }
                    Some(Out::Error(e)) => {
                        assert_eq!(e.code(), ErrorCode::Overloaded, "{e:?}");
                        assert!(e.retry_after_ms > 0);
                        overloaded += 1;
                        answered += 1;
                    }
                    Some(Out::UpToDate(_) | Out::Deliver(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
            (acked, to_carol, overloaded)
        }));
    }
    let mut peak_rss = 0;
    let mut acked = Vec::new();
    let mut to_carol = 0;
    let mut overloaded = 0;
    for f in flooders {
        while !f.is_finished() {
            peak_rss = peak_rss.max(rss_bytes("self"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (a, c, o) = f.await.unwrap();
        acked.extend(a);
        to_carol += c;
        overloaded += o;
    }
    peak_rss = peak_rss.max(rss_bytes("self"));
    assert!(overloaded > 0, "tight limits must refuse some of the flood");
    // The backlog's age was measured: commands waited in the inboxes past
    // the request deadline (20 ms) while commits took 40 ms. (The depth
    // gauge, set after each commit, is not sampled here: the flood is over
    // within a few commits, since a refused send holds its sender's later
    // ones to the same user, which are refused at once.)
    let (_, m) = http_get(&server.http(), "/metrics").await;
    let waited = metric(&m, "switchboard_shard_inbox_wait_seconds_count").unwrap();
    let in_time = metric(
        &m,
        "switchboard_shard_inbox_wait_seconds_bucket{le=\"0.02\"}",
    )
    .unwrap();
    assert!(
        waited > in_time,
        "no command waited past the deadline: {in_time} of {waited} in time"
    );
    assert!(
        peak_rss > 0 && peak_rss < RSS_BOUND_BYTES,
        "peak RSS {peak_rss} bytes"
    );

    eprintln!(
        "flood over: {} to bob and {to_carol} to carol accepted",
        acked.len()
    );
    acked.extend(acked_before);
    faulty.set_commit_delay(Duration::ZERO);

    // The stalled reader is cut once more messages than `max_unacked` wait
    // unacknowledged on her connection. How many of the flood's were
    // accepted depends on the machine, so a polite sender makes up the
    // difference (and shows sends are accepted again once the disk is).
    let mut polite = online(&server, &register(&server, "+15550000703").await).await;
    let carol_info = polite.lookup(&carol.phone).await;
    for i in to_carol..=MAX_UNACKED as u32 {
        let out = polite.send_text(&carol_info, &format!("p{i}"), "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    eprintln!("waiting for the stalled reader's connection to end");
    stalled.until_closed().await;

    // The server counted the stalled reader's disconnection.
    let (_, metrics_text) = http_get(&server.http(), "/metrics").await;
    let slow = metric(&metrics_text, "switchboard_slow_reader_disconnects_total").unwrap();
    assert!(
        slow >= 1.0,
        "stalled reader was never cut off:\n{metrics_text}"
    );
    let discarded = metric(&metrics_text, "switchboard_discarded_requests_total").unwrap();
    assert!(discarded >= 1.0);

    // Every ✓ is delivered to Bob, exactly once. (This drain once stalled
    // for good: Bob's inline ack waited behind his own connection's queued
    // deletions for the same 8-slot inbox; see `alongside_pending`.)
    eprintln!("draining bob");
    let mut b = raw_tcp(&server.tcp()).await;
    assert!(matches!(b.auth(&bob).await, Out::AuthOk(_)));
    let ids = message_ids(&b.drain().await);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates delivered");
    for id in &acked {
        assert!(unique.contains(id), "acknowledged {id} was lost");
    }
    eprintln!(
        "flood: {} acked to bob, {overloaded} overloaded, peak server RSS {} MiB",
        acked.len(),
        peak_rss / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_held_while_requests_are_in_flight_are_not_a_slow_client() {
    // Every commit outlasts the frame timeout. A client that pipelines more
    // sends than a connection may have in flight has whole frames waiting,
    // unread by the server, for longer than that: they are not a frame
    // the client failed to complete, and every send is answered.
    let (server, faulty) = start_faulty(|cfg| {
        cfg.shards = 1;
        cfg.frame_timeout_secs = 1;
        cfg.request_deadline_ms = 60_000;
    })
    .await;
    let alice = register(&server, "+15550000711").await;
    let bob = register(&server, "+15550000712").await;
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    faulty.set_commit_delay(Duration::from_millis(1500));
    const N: u32 = 300;
    a.pipeline_sends(bob_info.user_id, bob.device_id, 1, "h", N)
        .await;
    let mut oks = 0;
    while oks < N {
        let f = a.next().await.expect("the connection was closed");
        match f.body {
            Some(Out::SendOk(_)) => oks += 1,
            Some(Out::Deliver(_) | Out::UpToDate(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    faulty.set_commit_delay(Duration::ZERO);
}
