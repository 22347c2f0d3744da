//! `sbchat` end to end against a real server (started in-process on
//! ephemeral ports): register two homes through the dev code file, send,
//! receive as JSON, delivery and read receipts, over TCP and WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

struct Env {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    tcp: String,
    ws: String,
    server: Option<switchboard_server::RunningServer>,
}

async fn server() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cfg = switchboard_server::Config {
        data_dir: data_dir.clone(),
        tcp_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        ..Default::default()
    };
    let server = switchboard_server::start(cfg).await.unwrap();
    Env {
        tcp: server.ready.tcp_addr.to_string(),
        ws: format!("ws://{}/ws", server.ready.http_addr),
        data_dir,
        _dir: dir,
        server: Some(server),
    }
}

/// Runs sbchat to completion; returns (exit code, JSON lines on stdout).
async fn sbchat(home: &Path, server: &str, args: &[&str]) -> (i32, Vec<Value>) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_sbchat"))
            .arg("--home")
            .arg(home)
            .args(["--server", server, "--json"])
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("sbchat hung")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    if !out.status.success() {
        eprintln!(
            "sbchat {args:?} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.code().unwrap_or(-1), lines)
}

async fn register(env: &Env, home: &Path, phone: &str) {
    let (code, lines) = sbchat(home, &env.tcp, &["register", phone]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "code_sent");
    let code_file = env.data_dir.join("dev-codes").join(phone);
    let dev_code = std::fs::read_to_string(code_file).unwrap();
    let (code, lines) = sbchat(home, &env.tcp, &["verify", dev_code.trim()]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "verified");
}

fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_chat_with_receipts() {
    let mut env = server().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = homes.path().join("alice");
    let bob = homes.path().join("bob");
    register(&env, &alice, "+15550003001").await;
    register(&env, &bob, "+15550003002").await;

    // Alice sends while Bob is offline: exit 0 means ✓ (stored durably).
    let (code, lines) = sbchat(&alice, &env.tcp, &["send", "+15550003002", "hello bob"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let sent = events(&lines, "sent");
    assert_eq!(sent.len(), 1, "{lines:?}");
    let id = sent[0]["client_msg_id"].as_str().unwrap().to_owned();
    assert!(sent[0]["server_ts_ms"].as_u64().unwrap() > 0);

    // Bob receives it as JSON and marks it read.
    let (code, lines) = sbchat(
        &bob,
        &env.tcp,
        &["recv", "--timeout", "10", "--count", "1", "--read"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let msgs = events(&lines, "message");
    assert_eq!(msgs.len(), 1, "{lines:?}");
    assert_eq!(msgs[0]["text"], "hello bob");
    assert_eq!(msgs[0]["from"], "+15550003001");
    assert_eq!(msgs[0]["client_msg_id"], id.as_str());

    // Alice gets ✓✓ then the read receipt.
    let (code, lines) = sbchat(
        &alice,
        &env.tcp,
        &["recv", "--timeout", "10", "--count", "2"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let receipts = events(&lines, "receipt");
    let kinds: Vec<&str> = receipts
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["delivered", "read"], "{lines:?}");
    for r in &receipts {
        assert_eq!(r["client_msg_ids"][0], id.as_str());
        assert_eq!(r["from"], "+15550003002");
    }

    // With Bob online, --wait-delivered returns after ✓✓; over WebSocket.
    let bob_home = bob.clone();
    let ws = env.ws.clone();
    let bob_recv = tokio::spawn(async move {
        sbchat(&bob_home, &ws, &["recv", "--timeout", "20", "--count", "1"]).await
    });
    let (code, lines) = sbchat(
        &alice,
        &env.ws,
        &[
            "send",
            "+15550003002",
            "are you there?",
            "--wait-delivered",
            "--timeout",
            "20",
        ],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(events(&lines, "sent").len(), 1, "{lines:?}");
    assert_eq!(events(&lines, "delivered").len(), 1, "{lines:?}");
    let (code, lines) = bob_recv.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(events(&lines, "message")[0]["text"], "are you there?");

    // Unknown recipients are a clear error with a code.
    let (code, lines) = sbchat(&alice, &env.tcp, &["send", "+15550003999", "anyone?"]).await;
    assert_eq!(code, 1);
    assert_eq!(lines[0]["event"], "error");
    assert_eq!(lines[0]["code"], "UNKNOWN_USER");

    env.server.take().unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_devices_copies_revocation_and_safety_numbers() {
    let mut env = server().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = homes.path().join("alice");
    let laptop = homes.path().join("alice-laptop");
    let bob = homes.path().join("bob");
    register(&env, &alice, "+15550004001").await;
    register(&env, &bob, "+15550004002").await;

    // The primary makes a code; a new home joins the account with it.
    let (code, lines) = sbchat(&alice, &env.tcp, &["link-code"]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "link_code");
    let link_code = lines[0]["code"].as_str().unwrap().to_owned();
    let (code, lines) = sbchat(&laptop, &env.tcp, &["link", &link_code]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "linked");
    assert_eq!(lines[0]["phone"], "+15550004001");
    let laptop_device = lines[0]["device_id"].as_u64().unwrap();

    let (code, lines) = sbchat(&alice, &env.tcp, &["devices"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let devices = lines[0]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{lines:?}");
    let this: Vec<_> = devices
        .iter()
        .filter(|d| d["this_device"] == true)
        .collect();
    assert_eq!(this.len(), 1);
    assert_eq!(this[0]["primary"], true);
    assert!(devices.iter().all(|d| d["identity_key"].is_string()));

    // Bob's message reaches both of Alice's devices.
    let (code, lines) = sbchat(&bob, &env.tcp, &["send", "+15550004001", "hi both"]).await;
    assert_eq!(code, 0, "{lines:?}");
    for home in [&alice, &laptop] {
        let (code, lines) =
            sbchat(home, &env.tcp, &["recv", "--timeout", "10", "--count", "1"]).await;
        assert_eq!(code, 0, "{lines:?}");
        let msgs = events(&lines, "message");
        assert_eq!(msgs[0]["text"], "hi both", "{lines:?}");
        assert_eq!(msgs[0]["from_own_device"], false);
    }

    // What the primary sends shows on the laptop as its own.
    let (code, lines) = sbchat(
        &alice,
        &env.tcp,
        &["send", "+15550004002", "from the phone"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let (code, lines) = sbchat(
        &laptop,
        &env.tcp,
        &["recv", "--timeout", "10", "--count", "1"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    let msgs = events(&lines, "message");
    assert_eq!(msgs[0]["text"], "from the phone", "{lines:?}");
    assert_eq!(msgs[0]["from_own_device"], true);
    // Bob first hears ✓✓ from Alice's devices, then the message.
    let (code, lines) = sbchat(&bob, &env.tcp, &["recv", "--timeout", "5"]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert!(!events(&lines, "receipt").is_empty(), "{lines:?}");
    assert_eq!(events(&lines, "message")[0]["text"], "from the phone");

    // Both sides compute the same safety number.
    let (code, a_lines) = sbchat(&alice, &env.tcp, &["safety", "+15550004002"]).await;
    assert_eq!(code, 0, "{a_lines:?}");
    let (code, b_lines) = sbchat(&bob, &env.tcp, &["safety", "+15550004001"]).await;
    assert_eq!(code, 0, "{b_lines:?}");
    let number = a_lines[0]["number"].as_str().unwrap();
    assert_eq!(number.len(), 71, "{number}");
    assert_eq!(a_lines[0]["event"], "safety_number");
    assert_eq!(b_lines[0]["number"], number, "{b_lines:?}");

    // Revoking the laptop: its credential stops working.
    let dev = laptop_device.to_string();
    let (code, lines) = sbchat(&alice, &env.tcp, &["revoke", &dev]).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "revoked");
    let (code, lines) = sbchat(&laptop, &env.tcp, &["recv", "--timeout", "10"]).await;
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(events(&lines, "error")[0]["code"], "UNAUTHENTICATED");
    let (code, lines) = sbchat(&alice, &env.tcp, &["send", "+15550004002", "still here"]).await;
    assert_eq!(code, 0, "{lines:?}");

    env.server.take().unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_keeps_an_existing_account_unless_forced() {
    let env = server().await;
    let home = tempfile::tempdir().unwrap();
    register(&env, home.path(), "+15550003001").await;
    let before = std::fs::read(home.path().join("account.json")).unwrap();

    let (code, lines) = sbchat(home.path(), &env.tcp, &["register", "+15550003002"]).await;
    assert_eq!(code, 1, "{lines:?}");
    let error = lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains("+15550003001") && error.contains("--force"),
        "{error}"
    );
    assert!(events(&lines, "code_sent").is_empty(), "{lines:?}");
    assert!(!env.data_dir.join("dev-codes/+15550003002").exists());
    assert_eq!(
        std::fs::read(home.path().join("account.json")).unwrap(),
        before
    );

    let (code, lines) = sbchat(
        home.path(),
        &env.tcp,
        &["register", "+15550003002", "--force"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0]["event"], "code_sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_passes_the_locale_to_the_server() {
    let env = server().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    // A malformed tag reaches the server, which refuses it by name.
    let (code, lines) = sbchat(
        &home,
        &env.tcp,
        &["register", "+15553300001", "--locale", "pt_BR"],
    )
    .await;
    assert_eq!(code, 1, "{lines:?}");
    let error = events(&lines, "error");
    assert_eq!(error[0]["code"], "BAD_REQUEST", "{lines:?}");
    assert!(
        error[0]["error"].as_str().unwrap().contains("BCP 47"),
        "{lines:?}"
    );
    let (code, lines) = sbchat(
        &home,
        &env.tcp,
        &["register", "+15553300001", "--locale", "pt-BR"],
    )
    .await;
    assert_eq!(code, 0, "{lines:?}");
}
