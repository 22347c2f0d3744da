//! Half-open connections: a client that vanishes without closing its socket
//! (here: its process is frozen with SIGSTOP) is detected within the
//! keep-alive window and treated as offline; nothing pushed to it counts as
//! delivered, and after it resumes and reconnects it receives every message
//! sent meanwhile, exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);
/// The server's keep-alive window in this test.
const IDLE_TIMEOUT_SECS: u64 = 2;

async fn sbchat(home: &Path, server: &str, args: &[&str]) -> (i32, Vec<Value>) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_sbchat"))
            .arg("--home")
            .arg(home)
            .args(["--server", server, "--json", "--ping-interval", "0.5"])
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("sbchat hung")
    .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

async fn register(server: &str, data: &Path, home: &Path, phone: &str) {
    assert_eq!(sbchat(home, server, &["register", phone]).await.0, 0);
    let code = std::fs::read_to_string(data.join("dev-codes").join(phone)).unwrap();
    assert_eq!(sbchat(home, server, &["verify", code.trim()]).await.0, 0);
}

async fn metric(http: &str, series: &str) -> f64 {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_client_goes_offline_and_gets_everything_once_after_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = switchboard_server::Config {
        data_dir: data.clone(),
        tcp_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        idle_timeout_secs: IDLE_TIMEOUT_SECS,
        ..Default::default()
    };
    let server = switchboard_server::start(cfg).await.unwrap();
    let tcp = server.ready.tcp_addr.to_string();
    let http = server.ready.http_addr.to_string();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&tcp, &data, &alice, "+15550004001").await;
    register(&tcp, &data, &bob, "+15550004002").await;

    // Alice listens, then her process freezes: her socket stays open but
    // nothing is read or sent any more.
    let mut recv = Command::new(env!("CARGO_BIN_EXE_sbchat"))
        .arg("--home")
        .arg(&alice)
        .args(["--server", &tcp, "--json", "--ping-interval", "0.5"])
        .args(["recv", "--count", "5"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(recv.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("sbchat recv exited early");
        if line.contains("up_to_date") {
            break;
        }
    }
    let idle_series = "switchboard_goodbyes_total{code=\"IDLE_TIMEOUT\"}";
    let before = metric(&http, idle_series).await;
    let pid = recv.id().unwrap();
    signal(pid, "-STOP");
    let frozen_at = Instant::now();

    // Bob sends five messages while Alice is frozen; each gets ✓.
    let mut sent = Vec::new();
    for i in 0..5 {
        let (code, out) = sbchat(
            &bob,
            &tcp,
            &["send", "+15550004001", &format!("while frozen {i}")],
        )
        .await;
        assert_eq!(code, 0, "{out:?}");
        sent.push(out[0]["client_msg_id"].as_str().unwrap().to_owned());
    }

    // The server notices within the keep-alive window (plus scheduling slack).
    while metric(&http, idle_series).await <= before {
        assert!(
            frozen_at.elapsed() < Duration::from_secs(IDLE_TIMEOUT_SECS + 3),
            "frozen client not detected within the keep-alive window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detected_after = frozen_at.elapsed();
    assert!(detected_after >= Duration::from_secs(IDLE_TIMEOUT_SECS) - Duration::from_millis(200));

    // Alice resumes: she notices the dead connection, reconnects and gets
    // every message exactly once.
    signal(pid, "-CONT");
    let mut got = Vec::new();
    while got.len() < 5 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("sbchat recv exited before five messages");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "message" {
            got.push(v["client_msg_id"].as_str().unwrap().to_owned());
        }
    }
    let status = tokio::time::timeout(WAIT, recv.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "a message was shown twice: {got:?}");
    let mut want = sent.clone();
    want.sort();
    assert_eq!(sorted, want);

    // Nothing is left queued for her: everything was acked exactly once.
    let (code, out) = sbchat(&alice, &tcp, &["recv", "--timeout", "2"]).await;
    assert_eq!(code, 0);
    assert!(
        out.iter().all(|l| l["event"] != "message"),
        "redelivered after all: {out:?}"
    );
    server.stop().await.unwrap();
}
