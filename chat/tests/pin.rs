//! `sbchat pin set|clear` and `sbchat verify --pin` end to end against a
//! real server (in-process, ephemeral ports).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);
const PIN: &str = "246810";

/// Runs sbchat with `stdin` as its input; returns (exit code, JSON lines
/// on stdout, stderr).
async fn sbchat(
    home: &Path,
    server: &str,
    args: &[&str],
    stdin: &str,
) -> (i32, Vec<Value>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sbchat"))
        .arg("--home")
        .arg(home)
        .args(["--server", server, "--json"])
        .args(args)
        .env_remove("SBCHAT_PIN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("sbchat hung")
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dev_code(data_dir: &Path, phone: &str) -> String {
    std::fs::read_to_string(data_dir.join("dev-codes").join(phone))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_set_protects_re_registration_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir: PathBuf = dir.path().join("data");
    let server = switchboard_server::start(switchboard_server::Config {
        data_dir: data_dir.clone(),
        tcp_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let tcp = server.ready.tcp_addr.to_string();
    let phone = "+15550004001";
    let phone_home = dir.path().join("phone");
    let thief = dir.path().join("thief");

    let (code, _, err) = sbchat(&phone_home, &tcp, &["register", phone], "").await;
    assert_eq!(code, 0, "{err}");
    let sms = dev_code(&data_dir, phone);
    let (code, lines, err) = sbchat(&phone_home, &tcp, &["verify", &sms], "").await;
    assert_eq!(code, 0, "{err}");
    let user_id = lines[0]["user_id"].as_u64().unwrap();

    // Too short: refused, nothing set.
    let (code, lines, _) = sbchat(&phone_home, &tcp, &["pin", "set", "12"], "").await;
    assert_eq!(code, 1);
    assert_eq!(lines[0]["code"], "BAD_REQUEST", "{lines:?}");
    assert!(
        lines[0]["error"].as_str().unwrap().contains("PIN"),
        "{lines:?}"
    );
    // The PIN from standard input, so it is not in the process list.
    let (code, lines, err) = sbchat(&phone_home, &tcp, &["pin", "set"], &format!("{PIN}\n")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["event"], "pin");
    assert_eq!(lines[0]["enabled"], true);

    // A code alone no longer registers the number; the pending registration
    // survives, and the same code works with the PIN.
    let (code, _, err) = sbchat(&thief, &tcp, &["register", phone], "").await;
    assert_eq!(code, 0, "{err}");
    let sms = dev_code(&data_dir, phone);
    let (code, lines, _) = sbchat(&thief, &tcp, &["verify", &sms], "").await;
    assert_eq!(code, 1);
    assert_eq!(lines[0]["code"], "PIN_REQUIRED", "{lines:?}");
    let (code, lines, err) = sbchat(&thief, &tcp, &["verify", &sms, "--pin", PIN], "").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["event"], "verified");
    assert_eq!(lines[0]["user_id"].as_u64().unwrap(), user_id);

    let (code, lines, err) = sbchat(&thief, &tcp, &["pin", "clear"], "").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["enabled"], false);
    server.stop().await.unwrap();
}
