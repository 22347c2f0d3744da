//! What the SDK keeps on disk, against the real server: the outbox sealed
//! and private, one client per state directory, and a device whose keys are
//! published by registration itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use harness::{Peer, TestServer, client_config, new_state_dir};
use switchboard_client::{Client, ConnectOptions, Error, Outbox, UsageError, register};

/// Every file and directory under `dir`, recursively (`dir` included).
fn tree(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut dirs) = (Vec::new(), vec![dir.to_owned()]);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let (f, d) = tree(&path);
            files.extend(f);
            dirs.extend(d);
        } else {
            files.push(path);
        }
    }
    (files, dirs)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn unsent_messages_are_sealed_private_and_one_client_holds_the_state() {
    const MARKER: &str = "plaintext-marker-7f3a9c";
    let mut server = TestServer::start().await;
    let alice = server.register("+15550810001").await;
    let bob = server.register("+15550810002").await;
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let outbox = state.join("outbox");
    let mut config = client_config(server.endpoint());
    config.state_dir = Some(state.clone());
    config.outbox_dir = Some(outbox.clone());
    let mut a = Peer::start(config.clone(), alice.clone()).await;
    a.disconnected().await;

    // A second client on the same state directory is refused, typed.
    let err = Client::start(config.clone(), alice.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Usage(UsageError::StateDirInUse(d)) if *d == state),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let err = Outbox::open(&state, &outbox).unwrap_err();
    assert!(
        matches!(err, Error::Usage(UsageError::StateDirInUse(_))),
        "{err:?}"
    );

    // Queued while the server is down, then the client stops.
    let send = a
        .client
        .send_to_phone_with_id("queued-1", &bob.phone, Bytes::from(MARKER));
    let (sent, closed) = futures_util::future::join(send, a.client.close()).await;
    closed.unwrap();
    assert!(sent.is_err());
    drop(a);

    let (files, dirs) = tree(&state);
    let outbox_files: Vec<_> = files.iter().filter(|f| f.starts_with(&outbox)).collect();
    assert_eq!(outbox_files.len(), 1, "{files:?}");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        assert!(
            !contains(&bytes, MARKER.as_bytes()),
            "{} holds the plaintext",
            file.display()
        );
        #[cfg(unix)]
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    #[cfg(unix)]
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }

    // Closed: the lock is free, and the outbox lists and cancels offline.
    let mut pending = Outbox::open(&state, &outbox).unwrap();
    let listed = pending.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].client_msg_id, "queued-1");
    assert_eq!(listed[0].to_phone.as_deref(), Some(bob.phone.as_str()));
    assert!(listed[0].queued_at_ms > 0);
    assert!(pending.cancel("queued-1").unwrap());
    drop(pending);

    // The next run sends nothing: Bob's queue stays empty.
    server.restart().await;
    let mut a = Peer::start(config, alice).await;
    a.up_to_date().await;
    let mut b = Peer::online(&server, bob).await;
    let probe = a
        .client
        .send_to_user(b.user_id(), Bytes::from_static(b"probe"))
        .await
        .unwrap();
    let m = b.message().await;
    assert_eq!(
        m.client_msg_id, probe.client_msg_id,
        "the cancelled send went out"
    );
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_just_verified_device_can_be_messaged_before_its_client_ever_starts() {
    let server = TestServer::start().await;
    let alice = Peer::online(&server, server.register("+15550820001").await).await;

    let phone = "+15550820002";
    let code = server.code_for(phone).await;
    let dir = new_state_dir();
    let bob = register::verify_code(
        &server.endpoint(),
        &ConnectOptions::default(),
        phone,
        &code,
        &dir,
    )
    .await
    .unwrap();
    // No client has run for Bob; the send needs his published keys.
    let sent = alice
        .client
        .send_to_user(bob.user_id, Bytes::from_static(b"welcome"))
        .await
        .unwrap();

    let mut config = client_config(server.endpoint());
    config.state_dir = Some(dir);
    let mut b = Peer::start(config, bob).await;
    let m = b.message().await;
    assert_eq!(
        (m.client_msg_id.as_str(), &m.payload[..]),
        (sent.client_msg_id.as_str(), &b"welcome"[..])
    );
    b.client.ack([m.seq]).await.unwrap();
    b.close().await;
    alice.close().await;
}
