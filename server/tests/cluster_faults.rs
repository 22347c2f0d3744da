//! Engine faults under a cluster node: a Redis master killed (its replica
//! takes over) and PostgreSQL restarted while a client keeps sending.
//! Nothing acknowledged is lost or doubled, the client sees retryable
//! errors meanwhile, and everything recovers by itself. Prints how long
//! each fault refused writes (docs/OPERATIONS.md quotes it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engines;

use std::time::{Duration, Instant};

use common::*;
use engines::{Postgres, RedisCluster};
use switchboard_proto::pb::{self, server_frame::Body as Out};
use switchboard_server::cluster::partition;

async fn authed(tcp: &str, acct: &Account) -> Raw {
    let mut c = raw_tcp(tcp).await;
    let out = c.auth(acct).await;
    assert!(matches!(out, Out::AuthOk(_)), "{out:?}");
    c
}

/// Sends `id` until it is acknowledged, reconnecting when the server
/// closes; returns how long it was refused (zero if at once). Panics on a
/// refusal that is not retryable.
async fn send_until_ok(
    c: &mut Raw,
    tcp: &str,
    acct: &Account,
    to: &pb::UserInfo,
    id: &str,
    mut between: impl FnMut(Duration),
) -> Duration {
    let first = Instant::now();
    loop {
        match c.try_request(send_to(to, id, b"x".to_vec())).await {
            Some(Out::SendOk(_)) => return first.elapsed(),
            Some(Out::Error(e)) => {
                let code = pb::ErrorCode::try_from(e.code).unwrap();
                assert!(
                    matches!(
                        code,
                        pb::ErrorCode::StorageUnavailable
                            | pb::ErrorCode::Overloaded
                            | pb::ErrorCode::RateLimited
                    ),
                    "not retryable: {e:?}"
                );
                // Retries count against the send limits like any send.
                tokio::time::sleep(Duration::from_millis(e.retry_after_ms)).await;
            }
            Some(other) => panic!("{other:?}"),
            None => *c = authed(tcp, acct).await,
        }
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "{id} refused for a minute"
        );
        between(first.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_master_failover_and_a_postgres_restart_lose_nothing() {
    let mut pg = Postgres::start().await;
    let mut redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_server(
        dir.path(),
        &[
            "--redis-url",
            &redis.url(),
            "--postgres-url",
            &pg.url(),
            "--node-id",
            "faults",
        ],
    )
    .await;
    let alice = register_at(&node.tcp, dir.path(), "+15550000401").await;
    let bob = register_at(&node.tcp, dir.path(), "+15550000402").await;
    let mut a = authed(&node.tcp, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;

    // The master holding Bob's partition (his queue's slot).
    let bob_partition = partition::of_id(bob.user_id);
    let victim = redis.master_of(&format!("sb:{{p:{bob_partition}}}:owner"));
    let mut outages = Vec::new();
    for i in 0..300 {
        let id = format!("m{i}");
        if i == 100 {
            redis.kill(victim);
            let mut restarted = false;
            // The replica is promoted after the node timeout (2 s); with
            // redis_min_replicas = 1 the promoted master accepts writes
            // durably only once a replica is back: the old master,
            // restarted here after 4 s, rejoins as one.
            let outage = send_until_ok(&mut a, &node.tcp, &alice, &bob_info, &id, |waited| {
                if !restarted && waited > Duration::from_secs(4) {
                    redis.restart(victim);
                    restarted = true;
                }
            })
            .await;
            eprintln!("redis master {victim} killed: writes refused for {outage:?}");
            outages.push(outage);
        } else if i == 200 {
            pg.restart().await;
            // A code request writes PostgreSQL: refused (retryable) until
            // the node has reconnected, which it does by itself.
            let started = Instant::now();
            let mut c = raw_tcp(&node.tcp).await;
            loop {
                let out = c
                    .request(pb::client_frame::Body::RequestCode(pb::RequestCode {
                        phone: "+15550000403".into(),
                        ..Default::default()
                    }))
                    .await;
                match out {
                    Out::CodeSent(_) => break,
                    Out::Error(e) if e.code == pb::ErrorCode::StorageUnavailable as i32 => {
                        assert!(started.elapsed() < Duration::from_secs(30), "{e:?}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => panic!("{other:?}"),
                }
            }
            eprintln!(
                "postgres restarted: writes refused for {:?}",
                started.elapsed()
            );
            send_until_ok(&mut a, &node.tcp, &alice, &bob_info, &id, |_| {}).await;
        } else {
            send_until_ok(&mut a, &node.tcp, &alice, &bob_info, &id, |_| {}).await;
        }
    }
    assert!(redis.healthy(), "the cluster did not recover");

    let mut b = authed(&node.tcp, &bob).await;
    let got: Vec<String> = b
        .drain()
        .await
        .iter()
        .map(|e| match &e.body {
            Some(pb::queue_entry::Body::Message(m)) => m.client_msg_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every acknowledged message once, in order");
}
