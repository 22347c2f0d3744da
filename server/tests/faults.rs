//! Storage faults and contained panics: no ✓ without durable storage, clear
//! retryable errors, automatic recovery; a bug in one place harms no one else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};
use switchboard_server::store::faults::FaultyStore;

async fn start_faulty() -> (TestServer, Arc<FaultyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
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

#[tokio::test]
async fn failed_writes_give_no_ack_and_recover() {
    let (server, store) = start_faulty().await;
    let alice = register(&server, "+15550000601").await;
    let bob = register(&server, "+15550000602").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    assert!(matches!(
        a.send_text(&bob_info, "before", "1").await,
        Out::SendOk(_)
    ));

    store.set_fail_writes(true);
    for _ in 0..3 {
        let out = a.send_text(&bob_info, "during", "2").await;
        let Out::Error(e) = out else {
            panic!("a ✓ without storage: {out:?}")
        };
        assert_eq!(e.code(), ErrorCode::StorageUnavailable);
        assert!(e.retry_after_ms > 0);
        assert!(
            !e.message.contains("os error"),
            "internals leaked: {}",
            e.message
        );
    }
    assert!(store.failed_commits() >= 3);
    let (_, m) = http_get(&server.http(), "/metrics").await;
    assert!(metric(&m, "switchboard_store_commit_failures_total").unwrap() >= 3.0);
    assert!(metric(&m, "switchboard_errors_total{code=\"STORAGE_UNAVAILABLE\"}").unwrap() >= 3.0);
    // The server stays up and answers what needs no write.
    assert!(matches!(
        a.request(pb::client_frame::Body::Ping(pb::Ping {})).await,
        Out::Pong(_)
    ));

    store.set_fail_writes(false);
    let out = a.send_text(&bob_info, "during", "2").await;
    let Out::SendOk(ok) = out else {
        panic!("{out:?}")
    };
    assert!(!ok.duplicate, "the failed attempts stored nothing");
    let mut b = online(&server, &bob).await;
    assert_eq!(message_ids(&b.drain().await), vec!["before", "during"]);
}

#[tokio::test]
async fn a_panicking_shard_restarts_and_others_are_unaffected() {
    let (server, store) = start_faulty().await;
    let alice = register(&server, "+15550000611").await;
    let bob = register(&server, "+15550000612").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    let (_, before) = http_get(&server.http(), "/metrics").await;

    store.panic_on_next_enqueue();
    let send = |id: &str| {
        pb::client_frame::Body::Send(pb::Send {
            client_msg_id: id.into(),
            to_user: bob_info.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: bob.device_id,
                payload: b"x".to_vec().into(),
            }],
            ..Default::default()
        })
    };
    // The panicking batch is answered with an error, or (if Alice's own
    // device lives on the restarted shard) her connection is told to
    // reconnect; either way nothing was acknowledged.
    match a.try_request(send("boom")).await {
        Some(Out::Error(e)) => assert!(
            matches!(
                e.code(),
                ErrorCode::Internal | ErrorCode::StorageUnavailable
            ),
            "{e:?}"
        ),
        None => {}
        Some(other) => panic!("acknowledged through a panic: {other:?}"),
    }
    // The retry goes through on a fresh connection, and others never noticed.
    let mut a = online(&server, &alice).await;
    let out = a.send_text(&bob_info, "boom", "x").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    let mut b = online(&server, &bob).await;
    assert_eq!(message_ids(&b.drain().await), vec!["boom"]);
    let (_, after) = http_get(&server.http(), "/metrics").await;
    let series = "switchboard_panics_total{where=\"shard\"}";
    assert!(
        metric(&after, series).unwrap() > metric(&before, series).unwrap_or(0.0),
        "{after}"
    );
}

/// A real full disk: the data dir lives on a small tmpfs that is filled up
/// and then freed. Needs root (mount); CI runs as root and must run it.
#[tokio::test]
async fn full_disk_gives_no_ack_and_recovers_when_space_returns() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs for the disk-full test"
        );
        eprintln!("skipping: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let data = mnt.path().join("data");
    let mut cfg = test_config(&data);
    cfg.data_dir = data.clone();
    let server = switchboard_server::start(cfg.clone()).await.unwrap();
    let server = TestServer {
        dir: tempfile::tempdir().unwrap(),
        server: Some(server),
        config: cfg,
    };
    // Registration reads codes from the data dir, which is on the tmpfs.
    let reg = |phone: &'static str| {
        let tcp = server.tcp();
        let data = data.clone();
        async move { register_at(&tcp, &data, phone).await }
    };
    let alice = reg("+15550000621").await;
    let bob = reg("+15550000622").await;
    let mut a = online(&server, &alice).await;
    let bob_info = a.lookup(&bob.phone).await;
    assert!(matches!(
        a.send_text(&bob_info, "ok-0", "fits").await,
        Out::SendOk(_)
    ));

    // Fill the disk.
    let ballast = mnt.path().join("ballast");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", ballast.display()))
        .status();
    // Incompressible, so the journal's compression cannot hide it.
    let payload: String = (0..30_000)
        .map(|i: u32| format!("{:02x}", (i.wrapping_mul(2_654_435_761) >> 13) as u8))
        .collect();
    let mut refused = 0;
    let mut refused_ids = Vec::new();
    let mut acked = vec!["ok-0".to_string()];
    for i in 0..200 {
        let id = format!("full-{i}");
        match a.send_text(&bob_info, &id, &payload).await {
            Out::SendOk(_) => acked.push(id),
            Out::Error(e) => {
                assert_eq!(e.code(), ErrorCode::StorageUnavailable, "{e:?}");
                refused_ids.push(id);
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused >= 3, "the disk never filled up");

    // Free the space: the server recovers by itself. The refused messages
    // go again first, in order (later sends to Bob are held behind the
    // first of them, PROTOCOL.md §11.5.1), then a new one.
    std::fs::remove_file(&ballast).unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        match a.send_text(&bob_info, &refused_ids[0], &payload).await {
            Out::SendOk(_) => {
                recovered = true;
                break;
            }
            Out::Error(e) => {
                assert_eq!(e.code(), ErrorCode::StorageUnavailable);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(recovered, "no recovery after space returned");
    for id in &refused_ids[1..] {
        let out = a.send_text(&bob_info, id, &payload).await;
        assert!(matches!(out, Out::SendOk(_)), "{id}: {out:?}");
    }
    let out = a.send_text(&bob_info, "after-0", "room again").await;
    assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    acked.push("after-0".into());
    // Every acknowledged message is delivered, once, in order. A refused
    // send may still have reached the journal before the failure (the
    // client was told to retry, and a retry would be deduplicated), so it
    // may appear too: an error means "not acknowledged", never "lost".
    let mut b = online(&server, &bob).await;
    let got = message_ids(&b.drain().await);
    let mut want = acked.iter().peekable();
    for id in &got {
        if want.peek() == Some(&id) {
            want.next();
        } else {
            assert!(
                refused_ids.contains(id),
                "{id} delivered but never sent: {got:?}"
            );
        }
    }
    assert!(
        want.peek().is_none(),
        "acknowledged but lost: {want:?} (got {got:?})"
    );
    let unique: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates: {got:?}");
}
