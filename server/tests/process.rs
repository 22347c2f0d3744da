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
