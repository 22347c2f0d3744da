//! `sbchat` and identity (issue #18 §3): the server key pinned at
//! registration (or given with `--server-key`), and a contact's device
//! changes shown by `recv --json`.
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
    key: String,
    _server: switchboard_server::RunningServer,
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
    let key = switchboard_client::Connection::connect(
        &server.ready.tcp_addr.to_string().parse().unwrap(),
        &switchboard_client::ConnectOptions::default(),
    )
    .await
    .unwrap()
    .server_public_key()
    .to_vec();
    Env {
        tcp: server.ready.tcp_addr.to_string(),
        key: hex::encode(key),
        data_dir,
        _dir: dir,
        _server: server,
    }
}

/// Runs sbchat to completion: (exit code, JSON lines on stdout).
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

async fn register(env: &Env, home: &Path, phone: &str, extra: &[&str]) {
    let args: Vec<&str> = extra.iter().copied().chain(["register", phone]).collect();
    let (code, lines) = sbchat(home, &env.tcp, &args).await;
    assert_eq!(code, 0, "{lines:?}");
    let code_file = env.data_dir.join("dev-codes").join(phone);
    let dev_code = std::fs::read_to_string(code_file).unwrap();
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["verify", dev_code.trim()])
        .collect();
    let (code, lines) = sbchat(home, &env.tcp, &args).await;
    assert_eq!(code, 0, "{lines:?}");
}

fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_key_is_pinned_at_registration_and_a_changed_one_refused() {
    let a = server().await;
    let impostor = server().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("alice");
    register(&a, &home, "+15553100001", &[]).await;
    let account: Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("account.json")).unwrap()).unwrap();
    assert_eq!(account["server_key"], a.key.as_str());

    // The real server is fine; another one (another key, as a man in the
    // middle would have) is refused before the credential is sent.
    let (code, lines) = sbchat(&home, &a.tcp, &["recv", "--timeout", "1"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let (code, lines) = sbchat(&home, &impostor.tcp, &["recv", "--timeout", "5"]).await;
    assert_eq!(code, 1, "{lines:?}");
    let error = events(&lines, "error");
    assert_eq!(error.len(), 1, "{lines:?}");
    let text = error[0]["error"].as_str().unwrap();
    assert!(text.contains("server key"), "{text}");

    // `--server-key` pins one explicitly: a wrong one is refused at once.
    let bob = dir.path().join("bob");
    let (code, lines) = sbchat(
        &bob,
        &a.tcp,
        &["--server-key", &impostor.key, "register", "+15553100002"],
    )
    .await;
    assert_eq!(code, 1, "{lines:?}");
    assert!(
        events(&lines, "error")[0]["error"]
            .as_str()
            .unwrap()
            .contains("server key mismatch"),
        "{lines:?}"
    );
    let (code, lines) = sbchat(&bob, &a.tcp, &["--server-key", "abc", "whoami"]).await;
    assert_eq!(code, 2, "{lines:?}");
    register(&a, &bob, "+15553100002", &["--server-key", &a.key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_shows_a_contacts_device_change_as_an_event() {
    let env = server().await;
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    let bob_new = dir.path().join("bob-new-phone");
    register(&env, &alice, "+15553200001", &[]).await;
    register(&env, &bob, "+15553200002", &[]).await;
    let (code, lines) = sbchat(&alice, &env.tcp, &["send", "+15553200002", "hi"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let (code, _) = sbchat(&bob, &env.tcp, &["recv", "--count", "1"]).await;
    assert_eq!(code, 0);

    // Bob moves to a new phone and writes first.
    register(&env, &bob_new, "+15553200002", &[]).await;
    let (code, lines) = sbchat(&bob_new, &env.tcp, &["send", "+15553200001", "new phone"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let (code, lines) = sbchat(&alice, &env.tcp, &["recv", "--timeout", "3"]).await;
    assert_eq!(code, 0, "{lines:?}");
    let changed = events(&lines, "contact_devices_changed");
    assert_eq!(changed.len(), 1, "{lines:?}");
    assert_eq!(changed[0]["phone"], "+15553200002");
    assert_eq!(changed[0]["added"], serde_json::json!([2]));
    assert_eq!(changed[0]["removed"], serde_json::json!([1]));
    assert_eq!(
        events(&lines, "safety_number_changed").len(),
        1,
        "{lines:?}"
    );
    assert_eq!(events(&lines, "message")[0]["text"], "new phone");
}
