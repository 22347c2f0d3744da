//! The `switchboard` binary in cluster mode, on a real PostgreSQL and a
//! real Redis Cluster (3 masters, 3 replicas): a node serves from the
//! engines, a standby takes over when it dies with nothing acknowledged
//! lost, and a node that stalled past its lease is fenced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engines;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use engines::{Postgres, RedisCluster};
use switchboard_proto::pb::{self, server_frame::Body as Out};
use tokio::io::AsyncBufReadExt;

/// A node process whose ready line may not have come yet (a standby).
struct Node {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// Ready-line fields of a serving node.
struct Serving {
    tcp: String,
    server_key: String,
}

impl Node {
    fn spawn(data_dir: &Path, redis: &str, pg: &str, name: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args([
                "serve",
                "--tcp-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--redis-url",
                redis,
                "--postgres-url",
                pg,
                "--node-id",
                name,
                "--cluster-lease-ms",
                "1000",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// Waits up to `limit` for the ready line.
    async fn ready(&mut self, limit: Duration) -> Option<Serving> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .ok()?
            .ok()??;
        assert!(line.starts_with("switchboard ready "), "{line}");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap()
                .to_owned()
        };
        Some(Serving {
            tcp: field("tcp="),
            server_key: field("server_key="),
        })
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

async fn engines() -> (Postgres, RedisCluster) {
    let pg = Postgres::start().await;
    let redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    (pg, redis)
}

async fn authed(tcp: &str, acct: &Account) -> Raw {
    let mut c = raw_tcp(tcp).await;
    let out = c.auth(acct).await;
    assert!(matches!(out, Out::AuthOk(_)), "{out:?}");
    c
}

fn message_id(e: &pb::QueueEntry) -> String {
    match &e.body {
        Some(pb::queue_entry::Body::Message(m)) => m.client_msg_id.clone(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_node_with_nothing_acknowledged_lost() {
    let (pg, redis) = engines().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::spawn(dir_a.path(), &redis.url(), &pg.url(), "node-a");
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let mut b = Node::spawn(dir_b.path(), &redis.url(), &pg.url(), "node-b");
    assert!(
        b.ready(Duration::from_secs(3)).await.is_none(),
        "a second node served while the first holds every partition"
    );

    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000301").await;
    let bob = register_at(&at_a.tcp, dir_a.path(), "+15550000302").await;
    let mut alice_at_a = authed(&at_a.tcp, &alice).await;
    let bob_info = alice_at_a.lookup(&bob.phone).await;
    for i in 0..50 {
        let out = alice_at_a
            .send_text(&bob_info, &format!("m{i}"), "durable")
            .await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    // The instant the last ✓ arrived, kill -9 node A.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let killed = Instant::now();
    drop(alice_at_a);

    let at_b = b.ready(WAIT).await.expect("the standby never took over");
    let took_over = killed.elapsed();
    assert!(
        took_over < Duration::from_secs(10),
        "takeover took {took_over:?}"
    );
    assert_eq!(
        at_b.server_key, at_a.server_key,
        "every node must present the cluster's one server key"
    );
    let mut bob_at_b = authed(&at_b.tcp, &bob).await;
    let got: Vec<String> = bob_at_b.drain().await.iter().map(message_id).collect();
    let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "Bob's queue, drained from the standby");
    // Alice's retry of an acknowledged message is still a duplicate, and a
    // new one reaches Bob live.
    let mut alice_at_b = authed(&at_b.tcp, &alice).await;
    let Out::SendOk(ok) = alice_at_b.send_text(&bob_info, "m49", "durable").await else {
        panic!("retry refused")
    };
    assert!(ok.duplicate);
    let out = alice_at_b.send_text(&bob_info, "m50", "live").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    assert_eq!(message_id(&bob_at_b.next_entry().await), "m50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stalls_past_its_lease_is_fenced_and_stops() {
    let (pg, redis) = engines().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::spawn(dir_a.path(), &redis.url(), &pg.url(), "node-a");
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let mut b = Node::spawn(dir_b.path(), &redis.url(), &pg.url(), "node-b");
    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000311").await;
    let bob = register_at(&at_a.tcp, dir_a.path(), "+15550000312").await;
    let mut alice_at_a = authed(&at_a.tcp, &alice).await;
    let bob_info = alice_at_a.lookup(&bob.phone).await;
    let out = alice_at_a.send_text(&bob_info, "before", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");

    // Node A stalls (SIGSTOP) past its lease: the standby takes over.
    a.signal("-STOP");
    let at_b = b.ready(WAIT).await.expect("the standby never took over");
    // Node A wakes up. Whatever it still tries to write is refused by the
    // engines, so nothing is acknowledged by it any more; it stops.
    a.signal("-CONT");
    let stale = alice_at_a
        .try_request(send_to(&bob_info, "during", b"x".to_vec()))
        .await;
    assert!(
        !matches!(stale, Some(Out::SendOk(_))),
        "a fenced node acknowledged a send: {stale:?}"
    );
    let status = tokio::time::timeout(WAIT, a.child.wait())
        .await
        .expect("the fenced node kept running")
        .unwrap();
    assert!(!status.success(), "a fenced node must exit with an error");

    // The message is sent again through the new node, once.
    let mut alice_at_b = authed(&at_b.tcp, &alice).await;
    let out = alice_at_b.send_text(&bob_info, "during", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    let mut bob_at_b = authed(&at_b.tcp, &bob).await;
    let got: Vec<String> = bob_at_b.drain().await.iter().map(message_id).collect();
    assert_eq!(got, vec!["before".to_string(), "during".to_string()]);
}
