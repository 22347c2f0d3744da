//! The real `switchboard` binary as a child process: crash safety under
//! SIGKILL, clean shutdown on SIGTERM, configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use switchboard_proto::pb::{self, server_frame::Body as Out};
use tokio::process::Command;

async fn spawn(data_dir: &Path) -> Proc {
    spawn_server(data_dir, &[]).await
}

async fn authed(tcp: &str, acct: &Account) -> Raw {
    let mut c = raw_tcp(tcp).await;
    assert!(matches!(c.auth(acct).await, Out::AuthOk(_)));
    c
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_message_or_account() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path()).await;
    let alice = register_at(&p.tcp, dir.path(), "+15550000201").await;
    let bob = register_at(&p.tcp, dir.path(), "+15550000202").await;
    let mut a = authed(&p.tcp, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    for i in 0..200 {
        let out = a.send_text(&bob_info, &format!("k{i}"), "durable").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    // The instant the last ✓ arrived, kill -9 the server.
    p.child.start_kill().unwrap();
    p.child.wait().await.unwrap();
    drop(a);

    let p2 = spawn(dir.path()).await;
    let mut b = authed(&p2.tcp, &bob).await;
    let got = b.drain().await;
    let ids: Vec<String> = got
        .iter()
        .map(|e| match &e.body {
            Some(pb::queue_entry::Body::Message(m)) => m.client_msg_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    assert_eq!(ids, want);
    // Alice's account survived, and her retry of an acknowledged id is
    // still recognised as a duplicate after the crash.
    let mut a = authed(&p2.tcp, &alice).await;
    let out = a.send_text(&bob_info, "k199", "durable").await;
    let Out::SendOk(ok) = out else {
        panic!("{out:?}")
    };
    assert!(ok.duplicate);
}

#[tokio::test]
async fn sigkill_while_idle_keeps_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path()).await;
    let alice = register_at(&p.tcp, dir.path(), "+15550000211").await;
    let bob = register_at(&p.tcp, dir.path(), "+15550000212").await;
    {
        let mut a = authed(&p.tcp, &alice).await;
        let bob_info = a.lookup(&bob.phone).await;
        assert!(matches!(
            a.send_text(&bob_info, "i1", "x").await,
            Out::SendOk(_)
        ));
    }
    // Idle for a moment (no traffic), then SIGKILL.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    p.child.start_kill().unwrap();
    p.child.wait().await.unwrap();
    let p2 = spawn(dir.path()).await;
    let mut b = authed(&p2.tcp, &bob).await;
    assert_eq!(b.drain().await.len(), 1);
}

/// A group payload every member acked is deleted by a commit the shard
/// makes as soon as it is idle, not kept in memory until its next command:
/// a SIGKILL a moment later finds it gone from the store.
#[tokio::test]
async fn a_released_group_payload_is_deleted_while_the_server_is_idle() {
    use pb::client_frame::Body as In;
    use switchboard_server::store::{EmbeddedStore, PayloadId, Payloads};
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path()).await;
    let alice = register_at(&p.tcp, dir.path(), "+15550000231").await;
    let bob = register_at(&p.tcp, dir.path(), "+15550000232").await;
    let mut a = authed(&p.tcp, &alice).await;
    a.drain().await;
    let create = In::CreateGroup(pb::CreateGroup {
        name: "idle".into(),
        members: vec![bob.user_id],
        ..Default::default()
    });
    let g = match a.request(create).await {
        Out::GroupInfo(i) => i.group_id,
        other => panic!("{other:?}"),
    };
    let post = In::SendGroup(pb::SendGroup {
        group_id: g,
        client_msg_id: "idle-1".into(),
        payload: b"read by all".to_vec().into(),
        first_attempt: true,
    });
    let seq = match a.request(post).await {
        Out::SendOk(ok) => ok.group_seq,
        other => panic!("{other:?}"),
    };
    // Bob gets and acks it: the last reference goes.
    let mut b = authed(&p.tcp, &bob).await;
    let got = b.drain().await;
    assert!(
        got.iter().any(|e| matches!(&e.body,
            Some(pb::queue_entry::Body::GroupMessage(m)) if m.group_seq == seq)),
        "{got:?}"
    );
    let started = std::time::Instant::now();
    loop {
        let (_, text) = http_get(&p.http, "/metrics").await;
        let collected = metric(
            &text,
            "switchboard_group_payloads_collected_total{reason=\"released\"}",
        );
        if collected.unwrap_or_default() >= 1.0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the payload was never released");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Nothing else happens; then SIGKILL.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    p.child.start_kill().unwrap();
    p.child.wait().await.unwrap();
    drop((a, b));
    let store = EmbeddedStore::open(&dir.path().join("db")).unwrap();
    assert!(
        store
            .payload(PayloadId { owner: g, seq })
            .unwrap()
            .is_none(),
        "the payload every member acked is still stored"
    );
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path()).await;
    let alice = register_at(&p.tcp, dir.path(), "+15550000221").await;
    let mut a = authed(&p.tcp, &alice).await;
    a.drain().await;
    let pid = p.child.id().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The connected client is told to reconnect.
    let frames = a.until_closed().await;
    match &frames.last().unwrap().body {
        Some(Out::Goodbye(g)) => assert_eq!(
            g.reason.as_ref().unwrap().code(),
            pb::ErrorCode::ShuttingDown
        ),
        other => panic!("{other:?}"),
    }
    let status = tokio::time::timeout(WAIT, p.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // And it starts again on the same data.
    let p2 = spawn(dir.path()).await;
    let _ = authed(&p2.tcp, &alice).await;
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "drain_batch = 5000\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drain_batch"), "{err}");

    std::fs::write(&cfg, "unknown_setting = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_setting"));

    // `config` prints the effective settings, flags over env over file.
    std::fs::write(&cfg, "shards = 3\nqueue_ttl_secs = 60\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["config", "--shards", "5", "--config"])
        .arg(&cfg)
        .env("SWITCHBOARD_QUEUE_TTL_SECS", "120")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shards = 5"), "{text}");
    assert!(text.contains("queue_ttl_secs = 120"), "{text}");
}
