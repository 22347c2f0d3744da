//! The `sbchat` binary without a server: exit codes, JSON output, state
//! files and the outbox. Flows against a real server live in `server/tests/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail loudly too

use std::path::Path;
use std::process::{Command, Output};

fn sbchat(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbchat"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SBCHAT_SERVER")
        .output()
        .unwrap()
}

fn write_account(home: &Path, server: &str) {
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(
        home.join("account.json"),
        format!(
            r#"{{"server":"{server}","user_id":7,"device_id":1,"credential":"00ff","phone":"+15550007"}}"#
        ),
    )
    .unwrap();
}

/// An address where nothing listens.
fn dead_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn usage_errors_exit_2_and_missing_state_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(sbchat(dir.path(), &["bogus"]).status.code(), Some(2));
    assert_eq!(sbchat(dir.path(), &["send", "+1"]).status.code(), Some(2));
    let bad_server = sbchat(dir.path(), &["--server", "ws//nope::", "register", "+1"]);
    assert_eq!(bad_server.status.code(), Some(2));

    let out = sbchat(dir.path(), &["whoami"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sbchat register"));
    let out = sbchat(dir.path(), &["verify", "123456"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no registration in progress"));
}

#[test]
fn whoami_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    write_account(dir.path(), "127.0.0.1:5222");
    let out = sbchat(dir.path(), &["--json", "whoami"]);
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["event"], "whoami");
    assert_eq!(line["phone"], "+15550007");
    assert_eq!(line["user_id"], 7);
    assert_eq!(line["outbox_pending"], 0);
}

#[test]
fn send_without_a_server_times_out_and_keeps_the_message() {
    let dir = tempfile::tempdir().unwrap();
    write_account(dir.path(), &dead_server());
    let out = sbchat(
        dir.path(),
        &["--json", "send", "+15550008", "hello", "--timeout", "0.5"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "a queued send has its own exit code"
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["event"], "error");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.starts_with("queued") && error.contains("outbox"),
        "{line}"
    );
    let pending: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .collect();
    assert_eq!(pending.len(), 1);

    let out = sbchat(dir.path(), &["--json", "whoami"]);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["outbox_pending"], 1);
}

#[test]
fn recv_that_never_reaches_the_server_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let server = dead_server();
    write_account(dir.path(), &server);
    let out = sbchat(dir.path(), &["--json", "recv", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let error = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["event"] == "error")
        .unwrap_or_else(|| panic!("no error line: {stdout}"));
    let error = error["error"].as_str().unwrap();
    assert!(
        error.contains("could not reach the server") && error.contains(&server),
        "{error}"
    );
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn outbox_lists_and_cancels_a_queued_send_and_the_device_lock_is_explained() {
    const MARKER: &str = "plaintext-marker-c41e";
    let dir = tempfile::tempdir().unwrap();
    write_account(dir.path(), &dead_server());
    let out = sbchat(
        dir.path(),
        &["--json", "send", "+15550008", MARKER, "--timeout", "0.5"],
    );
    assert_eq!(out.status.code(), Some(3));
    // Queued, but not readable on disk.
    for entry in std::fs::read_dir(dir.path().join("outbox")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()));
    }

    let out = sbchat(dir.path(), &["--json", "outbox"]);
    assert!(out.status.success(), "{out:?}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "queued");
    assert_eq!(lines[0]["to"], "+15550008");
    assert!(lines[0]["age_s"].as_u64().unwrap() < 600, "{lines:?}");
    let id = lines[0]["client_msg_id"].as_str().unwrap().to_owned();
    let text = sbchat(dir.path(), &["outbox"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&id));

    // Another program using the device's state (here: this test, through
    // the SDK) stops sbchat with an explanation.
    {
        let _held =
            switchboard_client::Outbox::open(dir.path().join("state"), dir.path().join("outbox"))
                .unwrap();
        for args in [&["outbox"][..], &["recv", "--timeout", "0.5"]] {
            let out = sbchat(dir.path(), args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("another program is using"), "{stderr}");
        }
    }

    let out = sbchat(dir.path(), &["--json", "outbox", "cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_lines(&out)[0]["event"], "cancelled");
    let out = sbchat(dir.path(), &["outbox", "cancel", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message"));
    let out = sbchat(dir.path(), &["--json", "outbox"]);
    assert!(out.status.success());
    assert!(json_lines(&out).is_empty());
    let out = sbchat(dir.path(), &["--json", "whoami"]);
    assert_eq!(json_lines(&out)[0]["outbox_pending"], 0);
}
