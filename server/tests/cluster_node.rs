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
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use tokio::io::AsyncBufReadExt;

/// A node process whose ready line may not have come yet (a standby).
struct Node {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// Ready-line fields of a serving node.
struct Serving {
    tcp: String,
    http: String,
    server_key: String,
}

impl Node {
    fn spawn(data_dir: &Path, redis: &str, pg: &str, name: &str) -> Self {
        Self::spawn_with(data_dir, redis, pg, name, &[])
    }

    /// As [`Node::spawn`], with more command-line settings.
    fn spawn_with(data_dir: &Path, redis: &str, pg: &str, name: &str, extra: &[&str]) -> Self {
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
            ])
            // A short lease unless the test sets its own.
            .args(
                (!extra.contains(&"--cluster-lease-ms"))
                    .then_some(["--cluster-lease-ms", "1000"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
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

    /// Waits up to `limit` for the ready line of a node that serves (a
    /// node prints its forwarding line first: it forwards until it serves).
    async fn ready(&mut self, limit: Duration) -> Option<Serving> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(until, self.lines.next_line())
                .await
                .ok()?
                .ok()??;
            if line.starts_with("switchboard forwarding ") {
                continue;
            }
            assert!(line.starts_with("switchboard ready "), "{line}");
            return Some(fields(&line));
        }
    }

    /// Waits for the line of a node that forwards to the serving node.
    async fn forwarding(&mut self) -> Serving {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("no forwarding line")
            .unwrap()
            .unwrap();
        assert!(line.starts_with("switchboard forwarding "), "{line}");
        fields(&line)
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

fn fields(line: &str) -> Serving {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    Serving {
        tcp: field("tcp="),
        http: field("http="),
        server_key: field("server_key="),
    }
}

/// Registers `phone` through a forwarding node, retrying while it has no
/// link to the serving node yet (STORAGE_UNAVAILABLE, as a client would).
async fn register_via(tcp: &str, data_dir: &Path, phone: &str) -> Account {
    let start = Instant::now();
    loop {
        let mut c = raw_tcp(tcp).await;
        let out = c
            .request(In::RequestCode(pb::RequestCode {
                phone: phone.into(),
                ..Default::default()
            }))
            .await;
        match out {
            Out::CodeSent(_) => break,
            Out::Error(e) if e.code() == pb::ErrorCode::StorageUnavailable => {
                assert!(start.elapsed() < WAIT, "never linked: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("request code failed: {other:?}"),
        }
    }
    register_at(tcp, data_dir, phone).await
}

async fn engines() -> (Postgres, RedisCluster) {
    let pg = Postgres::start().await;
    let redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    (pg, redis)
}

/// The engines, node A serving from a data dir of its own, and node B
/// started beside it on another (not waited for).
struct Pair {
    _pg: Postgres,
    _redis: RedisCluster,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
    a: Node,
    at_a: Serving,
    b: Node,
}

async fn pair() -> Pair {
    let (pg, redis) = engines().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Node::spawn(dir_a.path(), &redis.url(), &pg.url(), "node-a");
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let b = Node::spawn(dir_b.path(), &redis.url(), &pg.url(), "node-b");
    Pair {
        _pg: pg,
        _redis: redis,
        dir_a,
        dir_b,
        a,
        at_a,
        b,
    }
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
    let Pair {
        _pg,
        _redis,
        dir_a,
        dir_b: _dir_b,
        mut a,
        at_a,
        mut b,
    } = pair().await;
    assert!(
        b.ready(Duration::from_secs(3)).await.is_none(),
        "a second node served while the first holds every partition"
    );

    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000301").await;
    let bob = register_at(&at_a.tcp, dir_a.path(), "+15550000302").await;
    let mut alice_at_a = authed(&at_a.tcp, &alice).await;
    let bob_info = alice_at_a.lookup(&bob.phone).await;
    let round_trips = async || {
        let (_, text) = http_get(&at_a.http, "/metrics").await;
        metric(&text, "switchboard_cluster_redis_round_trips_total").unwrap()
    };
    let before = round_trips().await;
    for i in 0..50 {
        let out = alice_at_a
            .send_text(&bob_info, &format!("m{i}"), "durable")
            .await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    // One send at a time, Bob offline: each is its own commit, one script
    // pipeline and one WAIT (issue #21: at most 3 on the send path).
    let per_send = (round_trips().await - before) / 50.0;
    eprintln!("Redis round trips per send: {per_send}");
    assert!(per_send <= 3.0, "{per_send} Redis round trips per send");
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
    let Pair {
        _pg,
        _redis,
        dir_a,
        dir_b: _dir_b,
        mut a,
        at_a,
        mut b,
    } = pair().await;
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

/// The ids of the messages (not receipts) a drain brings.
async fn drained_messages(c: &mut Raw) -> Vec<String> {
    c.drain()
        .await
        .iter()
        .filter(|e| matches!(e.body, Some(pb::queue_entry::Body::Message(_))))
        .map(message_id)
        .collect()
}

fn receipt_of(e: &pb::QueueEntry) -> pb::Receipt {
    match &e.body {
        Some(pb::queue_entry::Body::Receipt(r)) => r.clone(),
        other => panic!("expected a receipt, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_forwarding_node_chat_with_clients_of_the_serving_node() {
    let Pair {
        _pg,
        _redis,
        dir_a,
        dir_b,
        mut a,
        at_a,
        mut b,
    } = pair().await;
    let at_b = b.forwarding().await;
    assert_eq!(at_b.server_key, at_a.server_key, "one key for every node");

    // Bob registers through B (his code is sent by the node he asked).
    let bob = register_via(&at_b.tcp, dir_b.path(), "+15550000321").await;
    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000322").await;
    let mut alice_at_a = authed(&at_a.tcp, &alice).await;
    let mut bob_at_b = authed(&at_b.tcp, &bob).await;
    assert!(bob_at_b.drain().await.is_empty());
    assert!(alice_at_a.drain().await.is_empty());

    // A → B: ✓, delivery, ✓✓ and read.
    let bob_info = alice_at_a.lookup(&bob.phone).await;
    let out = alice_at_a.send_text(&bob_info, "a1", "hello bob").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    assert_eq!(message_id(&bob_at_b.next_entry().await), "a1");
    let r = receipt_of(&alice_at_a.next_entry().await);
    assert_eq!(r.kind(), pb::ReceiptKind::Delivered);
    assert_eq!(r.client_msg_ids, vec!["a1".to_string()]);
    let out = bob_at_b
        .request(In::SendReceipt(pb::SendReceipt {
            to_user: alice.user_id,
            kind: pb::ReceiptKind::Read as i32,
            client_msg_ids: vec!["a1".into()],
            group_id: 0,
        }))
        .await;
    assert!(matches!(out, Out::ReceiptOk(_)), "{out:?}");
    let r = receipt_of(&alice_at_a.next_entry().await);
    assert_eq!(r.kind(), pb::ReceiptKind::Read);

    let (_, text) = http_get(&at_b.http, "/metrics").await;
    let forwarded = metric(&text, "switchboard_cluster_forwarded_total").unwrap();
    assert!(forwarded > 0.0, "B forwarded nothing by its metric");
    assert_eq!(metric(&text, "switchboard_cluster_links"), Some(1.0));

    // B → A, and its ✓✓ back through the link.
    let alice_info = bob_at_b.lookup(&alice.phone).await;
    let out = bob_at_b.send_text(&alice_info, "b1", "hello alice").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    assert_eq!(message_id(&alice_at_a.next_entry().await), "b1");
    let r = receipt_of(&bob_at_b.next_entry().await);
    assert_eq!(r.kind(), pb::ReceiptKind::Delivered);

    // A group of both, across the nodes.
    let Out::GroupInfo(group) = bob_at_b
        .request(In::CreateGroup(pb::CreateGroup {
            name: "across".into(),
            members: vec![alice.user_id],
            ..Default::default()
        }))
        .await
    else {
        panic!("group not created")
    };
    let out = bob_at_b
        .request(In::SendGroup(pb::SendGroup {
            group_id: group.group_id,
            client_msg_id: "g1".into(),
            payload: b"to the group".to_vec().into(),
            first_attempt: false,
        }))
        .await;
    let Out::SendOk(sent) = out else {
        panic!("group send refused: {out:?}")
    };
    let got = loop {
        match alice_at_a.next_entry().await.body {
            Some(pb::queue_entry::Body::GroupMessage(m)) => break m,
            _ => continue,
        }
    };
    assert_eq!(
        (got.client_msg_id.as_str(), got.group_seq),
        ("g1", sent.group_seq)
    );

    // Bob's device moves from B to A and back: his queue drains in order
    // wherever he connects.
    drop(bob_at_b);
    for i in 0..20 {
        let out = alice_at_a.send_text(&bob_info, &format!("m{i}"), "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let mut bob_at_a = authed(&at_a.tcp, &bob).await;
    let got = drained_messages(&mut bob_at_a).await;
    assert_eq!(got, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    drop(bob_at_a);
    for i in 20..30 {
        let out = alice_at_a.send_text(&bob_info, &format!("m{i}"), "x").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let mut bob_at_b = authed(&at_b.tcp, &bob).await;
    let got = drained_messages(&mut bob_at_b).await;
    assert_eq!(got, (20..30).map(|i| format!("m{i}")).collect::<Vec<_>>());

    // The serving node dies: B takes over on the same sockets, and Bob's
    // connection to B stays open: B hands it to its own shards, which
    // drain to it what Alice sent before.
    let out = alice_at_a.send_text(&bob_info, "last", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let now_b = b.ready(WAIT).await.expect("B never took over");
    assert_eq!(now_b.tcp, at_b.tcp, "B serves where it forwarded");
    let got = messages_until(&mut bob_at_b, "last").await;
    // Before "last", at most redeliveries of m20..m29: their acks are
    // posts, and one still on its way when A died was never applied (the
    // client drops what it already has by id).
    let earlier: Vec<String> = (20..30).map(|i| format!("m{i}")).collect();
    assert!(got.iter().all(|m| earlier.contains(m)), "{got:?}");
}

/// The plain messages a connection receives up to `last` (not included),
/// acking them, across however many drains.
async fn messages_until(c: &mut Raw, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let e = c.next_entry().await;
        if !matches!(e.body, Some(pb::queue_entry::Body::Message(_))) {
            continue;
        }
        let id = message_id(&e);
        if id == last {
            return got;
        }
        got.push(id);
    }
}

/// Sends until the send is acknowledged: while a connection waits for the
/// node that takes over, its requests fail as retryable.
async fn send_retrying(c: &mut Raw, to: &pb::UserInfo, id: &str) {
    let start = Instant::now();
    loop {
        match c.send_text(to, id, "x").await {
            Out::SendOk(_) => return,
            Out::Error(e)
                if matches!(
                    e.code(),
                    pb::ErrorCode::StorageUnavailable | pb::ErrorCode::Overloaded
                ) =>
            {
                assert!(start.elapsed() < WAIT, "never acknowledged: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("send {id} failed: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_ends_only_its_own_connections() {
    let (pg, redis) = engines().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let spawn = |i: usize, name: &str| Node::spawn(dirs[i].path(), &redis.url(), &pg.url(), name);
    let mut a = spawn(0, "node-a");
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let mut b = spawn(1, "node-b");
    let at_b = b.forwarding().await;
    let mut c = spawn(2, "node-c");
    let at_c = c.forwarding().await;
    let alice = register_at(&at_a.tcp, dirs[0].path(), "+15550000601").await;
    let carol = register_at(&at_a.tcp, dirs[0].path(), "+15550000602").await;
    let bob = register_at(&at_a.tcp, dirs[0].path(), "+15550000603").await;
    // Alice on B (which will take over), Carol on C (a third node), Bob on
    // A (which will die).
    let mut alice_at_b = authed(&at_b.tcp, &alice).await;
    let mut carol_at_c = authed(&at_c.tcp, &carol).await;
    let mut bob_at_a = authed(&at_a.tcp, &bob).await;
    assert!(alice_at_b.drain().await.is_empty());
    assert!(carol_at_c.drain().await.is_empty());
    assert!(bob_at_a.drain().await.is_empty());
    let carol_info = alice_at_b.lookup(&carol.phone).await;
    let alice_info = carol_at_c.lookup(&alice.phone).await;
    send_retrying(&mut alice_at_b, &carol_info, "before").await;
    assert_eq!(message_id(&carol_at_c.next_entry().await), "before");

    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    // Only A's own connections end.
    let _ = tokio::time::timeout(WAIT, bob_at_a.until_closed())
        .await
        .expect("a connection to the dead node stayed open");
    // B and C both saw A's link refused; whichever claims first serves,
    // on the sockets it forwarded on, and the other forwards to it.
    let (winner, serving) = tokio::select! {
        Some(s) = b.ready(WAIT) => ("B", s),
        Some(s) = c.ready(WAIT) => ("C", s),
        else => panic!("neither B nor C took over"),
    };
    let forwarded_on = if winner == "B" { &at_b.tcp } else { &at_c.tcp };
    assert_eq!(
        &serving.tcp, forwarded_on,
        "{winner} serves where it forwarded"
    );

    // Alice and Carol chat on the connections they had: nothing told them
    // to reconnect. One of them is now served by its own node's shards,
    // the other through its node's new link.
    send_retrying(&mut alice_at_b, &carol_info, "after").await;
    let got = messages_until(&mut carol_at_c, "after").await;
    assert!(got.iter().all(|m| m == "before"), "{got:?}");
    let delivered = async |c: &mut Raw, id: &str| loop {
        let e = c.next_entry().await;
        if let Some(pb::queue_entry::Body::Receipt(r)) = &e.body
            && r.kind() == pb::ReceiptKind::Delivered
            && r.client_msg_ids.iter().any(|m| m == id)
        {
            return;
        }
    };
    tokio::time::timeout(WAIT, delivered(&mut alice_at_b, "after"))
        .await
        .expect("no ✓✓ for Alice's message after the takeover");
    send_retrying(&mut carol_at_c, &alice_info, "reply").await;
    assert!(messages_until(&mut alice_at_b, "reply").await.is_empty());
    tokio::time::timeout(WAIT, delivered(&mut carol_at_c, "reply"))
        .await
        .expect("no ✓✓ for Carol's reply after the takeover");

    for (node, http) in [("B", &at_b.http), ("C", &at_c.http)] {
        let (_, text) = http_get(http, "/metrics").await;
        let reattached = metric(
            &text,
            "switchboard_cluster_reattached_total{outcome=\"reattached\"}",
        );
        assert_eq!(reattached, Some(1.0), "node {node}");
    }
}

/// Lookups by one user, `n` of them: how many were answered (the rest must
/// be refused as RATE_LIMITED).
async fn lookups_answered(c: &mut Raw, phone: &str, n: usize) -> usize {
    let mut answered = 0;
    for _ in 0..n {
        match c
            .request(In::LookupUser(pb::LookupUser {
                phone: phone.into(),
            }))
            .await
        {
            Out::UserInfo(_) => answered += 1,
            Out::Error(e) => assert_eq!(e.code(), pb::ErrorCode::RateLimited, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_limits_hold_across_nodes() {
    let (pg, redis) = engines().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let limit = ["--lookups-per-user-per-hour", "10"];
    let mut a = Node::spawn_with(dir_a.path(), &redis.url(), &pg.url(), "node-a", &limit);
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let mut b = Node::spawn_with(dir_b.path(), &redis.url(), &pg.url(), "node-b", &limit);
    let at_b = b.forwarding().await;
    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000401").await;

    // 6 of Alice's 10 an hour on A, then she moves to B: each node's own
    // bucket would give her 10 more there; the cluster's count leaves 4
    // (one more may pass while B's first report is on its way).
    let mut at_a_conn = authed(&at_a.tcp, &alice).await;
    assert_eq!(lookups_answered(&mut at_a_conn, &alice.phone, 6).await, 6);
    drop(at_a_conn);
    // A reports its counts without waiting for them (they trail by a
    // round trip, longer on a busy machine): the cluster's count reaches 6
    // before Alice moves.
    let (urls, user) = (redis.url(), alice.user_id);
    let reported = tokio::task::spawn_blocking(move || {
        let conn = switchboard_server::cluster::redis_domains::Conn::open(&urls, 1).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            let key = format!("sb:lim:lookups_per_user:{user}:{}", now_ms / 3_600_000);
            let n: Option<u64> = redis::cmd("GET").arg(key).query(&mut *conn.lock()).unwrap();
            if n.unwrap_or(0) >= 6 || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert_eq!(reported, Some(6), "A's lookups counted in Redis");
    let mut at_b_conn = authed(&at_b.tcp, &alice).await;
    let on_b = lookups_answered(&mut at_b_conn, &alice.phone, 10).await;
    assert!(
        (4..=5).contains(&on_b),
        "B answered {on_b} of Alice's lookups"
    );
    let (_, text) = http_get(&at_b.http, "/metrics").await;
    let refused = text
        .lines()
        .find(|l| l.starts_with("switchboard_rate_limited_total") && l.contains("lookups_per_user"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(refused, Some((10 - on_b) as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_that_is_gone_is_taken_over_before_its_lease_ends() {
    let (pg, redis) = engines().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Leases far longer than the test waits: a takeover here can only come
    // from the serving node's link refusing connections.
    let long = ["--cluster-lease-ms", "60000"];
    let spawn = |i: usize, name: &str| {
        Node::spawn_with(dirs[i].path(), &redis.url(), &pg.url(), name, &long)
    };
    let mut a = spawn(0, "node-a");
    let at_a = a.ready(WAIT).await.expect("node A never served");
    let mut b = spawn(1, "node-b");
    let b_tcp = b.forwarding().await.tcp;
    let alice = register_at(&at_a.tcp, dirs[0].path(), "+15550000501").await;
    let bob = register_at(&at_a.tcp, dirs[0].path(), "+15550000502").await;
    let dave = register_at(&at_a.tcp, dirs[0].path(), "+15550000503").await;
    let mut alice_at_a = authed(&at_a.tcp, &alice).await;
    let bob_info = alice_at_a.lookup(&bob.phone).await;
    let dave_info = alice_at_a.lookup(&dave.phone).await;
    let out = alice_at_a.send_text(&bob_info, "m1", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    drop(alice_at_a);
    // Dave is connected to B while A stops.
    let mut dave_at_b = authed(&b_tcp, &dave).await;
    assert!(dave_at_b.drain().await.is_empty());

    // A clean stop: A hands over and exits successfully (not "fenced").
    a.signal("-TERM");
    let status = tokio::time::timeout(WAIT, a.child.wait())
        .await
        .expect("A did not stop")
        .unwrap();
    assert!(status.success(), "a clean stop ended with {status:?}");
    let at_b = b
        .ready(WAIT)
        .await
        .expect("B never took over from a clean stop");
    let mut c = spawn(2, "node-c");
    c.forwarding().await;
    let mut alice_at_b = authed(&at_b.tcp, &alice).await;
    let out = alice_at_b.send_text(&bob_info, "m2", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    // A's clean stop ended Dave's connection through it only for A (its
    // shards said "shutting down"): B kept it and gave it to its shards.
    let out = alice_at_b.send_text(&dave_info, "d1", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    assert_eq!(message_id(&dave_at_b.next_entry().await), "d1");
    drop(alice_at_b);

    // A crash: its link refuses connections at once.
    b.child.start_kill().unwrap();
    b.child.wait().await.unwrap();
    let at_c = c.ready(WAIT).await.expect("C never took over from a crash");
    let mut bob_at_c = authed(&at_c.tcp, &bob).await;
    assert_eq!(drained_messages(&mut bob_at_c).await, vec!["m1", "m2"]);
}

/// The next plain message's id, skipping other entries.
async fn next_message(c: &mut Raw) -> String {
    loop {
        let e = c.next_entry().await;
        if let Some(pb::queue_entry::Body::Message(m)) = e.body {
            return m.client_msg_id;
        }
    }
}

/// The next group message's `(group_seq, client id)`, skipping others.
async fn next_group_message(c: &mut Raw) -> (u64, String) {
    loop {
        let e = c.next_entry().await;
        if let Some(pb::queue_entry::Body::GroupMessage(m)) = e.body {
            return (m.group_seq, m.client_msg_id);
        }
    }
}

/// Waits for delivery receipts for `id` (of `group`, 0 for 1:1) until
/// `from` (user ids) have all sent one.
async fn delivered_from(c: &mut Raw, group: u64, id: &str, mut from: Vec<u64>) {
    while !from.is_empty() {
        let e = tokio::time::timeout(WAIT, c.next_entry())
            .await
            .expect("missing delivery receipts");
        if let Some(pb::queue_entry::Body::Receipt(r)) = e.body
            && r.kind() == pb::ReceiptKind::Delivered
            && r.group_id == group
            && r.client_msg_ids.iter().any(|m| m == id)
        {
            from.retain(|u| *u != r.from_user);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_keys_and_group_receipts_work_across_nodes() {
    let Pair {
        _pg,
        _redis,
        dir_a,
        dir_b,
        a: _a,
        at_a,
        mut b,
    } = pair().await;
    let at_b = b.forwarding().await;
    let alice = register_at(&at_a.tcp, dir_a.path(), "+15550000601").await;
    let bob = register_at(&at_a.tcp, dir_a.path(), "+15550000602").await;
    let carol = register_via(&at_b.tcp, dir_b.path(), "+15550000603").await;

    // Alice's primary is on A; she links a laptop through B.
    let mut alice_a = authed(&at_a.tcp, &alice).await;
    alice_a.drain().await;
    let Out::LinkCode(code) = alice_a
        .request(In::CreateLinkCode(pb::CreateLinkCode {}))
        .await
    else {
        panic!("no link code")
    };
    let mut linking = raw_tcp(&at_b.tcp).await;
    let Out::Verified(v) = linking
        .request(In::LinkDevice(pb::LinkDevice { code: code.code }))
        .await
    else {
        panic!("linking through B failed")
    };
    assert_eq!(v.user_id, alice.user_id);
    let laptop = Account {
        phone: alice.phone.clone(),
        user_id: v.user_id,
        device_id: v.device_id,
        credential: v.credential.to_vec(),
    };
    let mut laptop_b = authed(&at_b.tcp, &laptop).await;
    laptop_b.drain().await;

    // Keys uploaded through B are handed out through A.
    let keys = TestKeys::new(7);
    let out = laptop_b.request(In::UploadKeys(keys.upload(0, 20))).await;
    assert!(matches!(out, Out::KeysUploaded(_)), "{out:?}");
    let mut bob_a = authed(&at_a.tcp, &bob).await;
    bob_a.drain().await;
    let Out::Bundles(bundles) = bob_a
        .request(In::FetchBundles(pb::FetchBundles {
            user_id: alice.user_id,
            ..Default::default()
        }))
        .await
    else {
        panic!("no bundles")
    };
    let d = bundles
        .devices
        .iter()
        .find(|d| d.device_id == laptop.device_id)
        .expect("the laptop's bundle");
    assert_eq!(
        d.identity.as_ref().map(|i| i.ed25519.clone()),
        Some(keys.identity().ed25519)
    );
    assert!(matches!(d.key, Some(pb::device_bundle::Key::OneTimeKey(_))));

    // A message to Alice reaches both her devices, one on each node, and
    // Bob gets her ✓✓.
    let alice_info = bob_a.lookup(&alice.phone).await;
    assert_eq!(alice_info.devices.len(), 2);
    let out = bob_a.send_text(&alice_info, "d1", "to both").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    assert_eq!(next_message(&mut alice_a).await, "d1");
    assert_eq!(next_message(&mut laptop_b).await, "d1");
    delivered_from(&mut bob_a, 0, "d1", vec![alice.user_id]).await;

    // A group of Bob (A), Alice (A and B) and Carol (B): one sequence for
    // every member device, and a delivery receipt from each member.
    let mut carol_b = authed(&at_b.tcp, &carol).await;
    carol_b.drain().await;
    let Out::GroupInfo(group) = bob_a
        .request(In::CreateGroup(pb::CreateGroup {
            name: "three".into(),
            members: vec![alice.user_id, carol.user_id],
            ..Default::default()
        }))
        .await
    else {
        panic!("group not created")
    };
    let mut seqs = Vec::new();
    for i in 0..3 {
        let Out::SendOk(sent) = bob_a
            .request(In::SendGroup(pb::SendGroup {
                group_id: group.group_id,
                client_msg_id: format!("g{i}"),
                payload: b"to the group".to_vec().into(),
                first_attempt: false,
            }))
            .await
        else {
            panic!("group send refused")
        };
        seqs.push((sent.group_seq, format!("g{i}")));
    }
    for member in [&mut alice_a, &mut laptop_b, &mut carol_b] {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(next_group_message(member).await);
        }
        assert_eq!(got, seqs);
    }
    delivered_from(
        &mut bob_a,
        group.group_id,
        "g2",
        vec![alice.user_id, carol.user_id],
    )
    .await;
}
