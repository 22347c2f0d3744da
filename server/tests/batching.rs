//! Group commit: a busy shard paces its synced commits so one fsync covers
//! many messages, and queue seq counters are written once per block of
//! entries rather than once per entry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_server::store::faults::FaultyStore;
use switchboard_server::{Config, RunningServer};

/// Starts a server on `store` with one shard and the given pacing.
async fn start_on(
    dir: &std::path::Path,
    store: &Arc<FaultyStore>,
    interval_us: u64,
) -> RunningServer {
    let cfg = Config {
        shards: 1,
        group_commit_interval_us: interval_us,
        ..test_config(dir)
    };
    switchboard_server::start_with_store(cfg, store.clone())
        .await
        .unwrap()
}

/// A temporary data dir and a store on it that counts commits.
fn open_store() -> (tempfile::TempDir, Arc<FaultyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let inner = switchboard_server::open_store(&test_config(dir.path())).unwrap();
    (dir, Arc::new(FaultyStore::new(inner)))
}

fn send(to: &pb::UserInfo, id: &str) -> pb::ClientFrame {
    pb::ClientFrame {
        id: 7,
        body: Some(In::Send(pb::Send {
            client_msg_id: id.into(),
            to_user: to.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: 1,
                payload: id.as_bytes().to_vec().into(),
            }],
            ..Default::default()
        })),
    }
}

/// Pipelines `n` sends to `to` (ids `{prefix}0`, `{prefix}1`, …) and waits
/// for every ✓.
async fn send_many(a: &mut Raw, to: &pb::UserInfo, prefix: &str, n: u32) {
    for i in 0..n {
        let mut f = send(to, &format!("{prefix}{i}"));
        f.id = 1 + i;
        a.send_frame(&f).await;
    }
    for _ in 0..n {
        let f = a.next().await.expect("a ✓");
        assert!(matches!(f.body, Some(Out::SendOk(_))), "{f:?}");
    }
}

#[tokio::test]
async fn a_busy_shard_commits_many_sends_with_one_sync() {
    let (dir, store) = open_store();
    // Accounts are made without pacing (registration is a chain of
    // commits, each waiting for the one before).
    let server = start_on(dir.path(), &store, 0).await;
    let tcp = server.ready.tcp_addr.to_string();
    let bob = register_at(&tcp, dir.path(), "+15550007000").await;
    let mut senders = Vec::new();
    for i in 1..=10 {
        senders.push(register_at(&tcp, dir.path(), &format!("+155500070{i:02}")).await);
    }
    server.stop().await.unwrap();

    // Now with a long interval: every sync is at least 1 s after the last.
    let server = start_on(dir.path(), &store, 1_000_000).await;
    let tcp = server.ready.tcp_addr.to_string();
    let mut conns = Vec::new();
    for s in &senders {
        let mut c = raw_tcp(&tcp).await;
        assert!(matches!(c.auth(s).await, Out::AuthOk(_)));
        assert!(c.drain().await.is_empty());
        conns.push(c);
    }
    let bob_info = conns[0].lookup(&bob.phone).await;
    // One synced commit starts the interval.
    let out = conns[0].send_text(&bob_info, "warm-up", "0").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    let before = store.synced_commits();
    // Ten sends, 20 ms apart: unpaced, each would be a commit of its own.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send_frame(&send(&bob_info, &format!("m{i}"))).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in &mut conns {
        let f = c.next().await.expect("a ✓");
        assert!(matches!(f.body, Some(Out::SendOk(_))), "{f:?}");
    }
    let syncs = store.synced_commits() - before;
    assert!(
        (1..=2).contains(&syncs),
        "ten sends within one interval took {syncs} synced commits"
    );
    server.stop().await.unwrap();

    // Every one of them is stored, in order.
    let server = start_on(dir.path(), &store, 0).await;
    let mut b = raw_tcp(&server.ready.tcp_addr.to_string()).await;
    assert!(matches!(b.auth(&bob).await, Out::AuthOk(_)));
    let ids: Vec<String> = b
        .drain()
        .await
        .iter()
        .filter_map(|e| match &e.body {
            Some(pb::queue_entry::Body::Message(m)) => Some(m.client_msg_id.clone()),
            _ => None,
        })
        .collect();
    let mut want = vec!["warm-up".to_string()];
    want.extend((0..10).map(|i| format!("m{i}")));
    assert_eq!(ids, want);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_queue_counter_is_written_once_per_block_of_entries() {
    let (dir, store) = open_store();
    let server = start_on(dir.path(), &store, 0).await;
    let tcp = server.ready.tcp_addr.to_string();
    let alice = register_at(&tcp, dir.path(), "+15550007100").await;
    let bob = register_at(&tcp, dir.path(), "+15550007101").await;
    let mut a = raw_tcp(&tcp).await;
    assert!(matches!(a.auth(&alice).await, Out::AuthOk(_)));
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    let before = store.seq_reservations();
    // Bob is offline: 300 messages and no receipts.
    send_many(&mut a, &bob_info, "q", 300).await;
    assert_eq!(
        store.seq_reservations() - before,
        1,
        "300 entries of one queue fit in one reserved block"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_draining_device_does_not_wait_out_the_pacing_per_page() {
    let (dir, store) = open_store();
    let server = start_on(dir.path(), &store, 0).await;
    let tcp = server.ready.tcp_addr.to_string();
    let alice = register_at(&tcp, dir.path(), "+15550007200").await;
    let bob = register_at(&tcp, dir.path(), "+15550007201").await;
    let mut a = raw_tcp(&tcp).await;
    assert!(matches!(a.auth(&alice).await, Out::AuthOk(_)));
    assert!(a.drain().await.is_empty());
    let bob_info = a.lookup(&bob.phone).await;
    // Ten pages for Bob, who is offline.
    send_many(&mut a, &bob_info, "d", 1000).await;
    server.stop().await.unwrap();

    // Each page's ack is a synced commit (it stores Alice's receipts).
    // Paced at 1 s, the nine acks that let the next page go would take
    // seconds (every other one waits out the interval); they commit at
    // once instead.
    let server = start_on(dir.path(), &store, 1_000_000).await;
    let mut b = raw_tcp(&server.ready.tcp_addr.to_string()).await;
    assert!(matches!(b.auth(&bob).await, Out::AuthOk(_)));
    let started = std::time::Instant::now();
    let entries = b.drain().await;
    let took = started.elapsed();
    assert_eq!(entries.len(), 1000);
    assert!(
        took < Duration::from_secs(2),
        "the drain took {took:?}: its pages waited for the pacing"
    );
    server.stop().await.unwrap();
}
