//! Code senders against the real server: the webhook sender against a local
//! HTTP receiver (body, auth header, retries, circuit breaker), the dev
//! sender's log hygiene and its refusal to serve a non-loopback address
//! unless chosen explicitly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_server::CodeSenderKind;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// A local SMS gateway stand-in: answers with the queued statuses (then
/// 200) and hands each request to the test.
struct Receiver {
    url: String,
    requests: mpsc::Receiver<(HeaderMap, serde_json::Value)>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

#[derive(Clone)]
struct ReceiverState {
    seen: mpsc::Sender<(HeaderMap, serde_json::Value)>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

async fn sms(State(st): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let _ = st.seen.try_send((headers, json));
    let status = st.statuses.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

async fn receiver(statuses: &[u16]) -> Receiver {
    let (tx, rx) = mpsc::channel(64);
    let statuses = Arc::new(Mutex::new(statuses.iter().copied().collect()));
    let app = axum::Router::new()
        .route("/sms", axum::routing::post(sms))
        .with_state(ReceiverState {
            seen: tx,
            statuses: statuses.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/sms", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        url,
        requests: rx,
        statuses,
    }
}

impl Receiver {
    async fn next(&mut self) -> (HeaderMap, serde_json::Value) {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("no webhook request arrived")
            .unwrap()
    }
}

async fn webhook_server(
    url: &str,
    tweak: impl FnOnce(&mut switchboard_server::Config),
) -> TestServer {
    let url = url.to_owned();
    TestServer::start_with(move |c| {
        c.code_sender = CodeSenderKind::Webhook;
        c.code_webhook_url = url;
        c.code_webhook_auth_header = "Authorization: Bearer test-secret".into();
        c.code_webhook_backoff_base_ms = 10;
        c.code_webhook_backoff_max_ms = 20;
        tweak(c);
    })
    .await
}

async fn request_code(c: &mut Raw, phone: &str) -> Out {
    c.request(In::RequestCode(pb::RequestCode {
        phone: phone.into(),
        ..Default::default()
    }))
    .await
}

#[tokio::test]
async fn webhook_posts_json_with_the_auth_header_and_the_code_verifies() {
    let mut rx = receiver(&[]).await;
    let server = webhook_server(&rx.url, |_| {}).await;
    let mut c = raw_tcp(&server.tcp()).await;
    let phone = "+15550001001";
    assert!(matches!(
        request_code(&mut c, phone).await,
        Out::CodeSent(_)
    ));
    let (headers, body) = rx.next().await;
    assert_eq!(headers["authorization"], "Bearer test-secret");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["phone"], phone);
    assert!(body["locale"].is_null(), "{body}");
    let code = body["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 6);
    // Nothing went to the dev sender's directory.
    assert!(!server.data_dir().join("dev-codes").exists());
    let out = c
        .request(In::VerifyCode(pb::VerifyCode {
            phone: phone.into(),
            code,
            pin: String::new(),
        }))
        .await;
    assert!(matches!(out, Out::Verified(_)), "{out:?}");
}

#[tokio::test]
async fn the_clients_locale_reaches_the_gateway_and_a_malformed_one_is_refused() {
    let mut rx = receiver(&[]).await;
    let server = webhook_server(&rx.url, |_| {}).await;
    let mut c = raw_tcp(&server.tcp()).await;
    let ask = |phone: &str, locale: &str| {
        In::RequestCode(pb::RequestCode {
            phone: phone.into(),
            locale: locale.into(),
        })
    };
    let out = c.request(ask("+15550001011", "pt-BR")).await;
    assert!(matches!(out, Out::CodeSent(_)), "{out:?}");
    let (_, body) = rx.next().await;
    assert_eq!(body["locale"], "pt-BR", "{body}");
    for bad in ["pt_BR", "en-US; rm -rf", &"x".repeat(36), "-"] {
        let out = c.request(ask("+15550001012", bad)).await;
        let Out::Error(e) = out else {
            panic!("{bad:?}: {out:?}")
        };
        assert_eq!(e.code(), pb::ErrorCode::BadRequest, "{bad:?}");
        assert!(e.message.contains("BCP 47"), "{}", e.message);
    }
}

#[tokio::test]
async fn webhook_retries_on_5xx_until_it_succeeds() {
    let mut rx = receiver(&[500, 503]).await;
    let server = webhook_server(&rx.url, |c| c.code_webhook_attempts = 3).await;
    let mut c = raw_tcp(&server.tcp()).await;
    assert!(matches!(
        request_code(&mut c, "+15550001002").await,
        Out::CodeSent(_)
    ));
    let codes: Vec<_> = [rx.next().await, rx.next().await, rx.next().await]
        .into_iter()
        .map(|(_, b)| b["code"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        codes.iter().all(|c| *c == codes[0]),
        "the same code each try"
    );
    assert!(rx.statuses.lock().unwrap().is_empty());
    assert!(rx.requests.try_recv().is_err(), "no fourth attempt");
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_answers_retryable() {
    let mut rx = receiver(&[500; 64]).await;
    let server = webhook_server(&rx.url, |c| {
        c.code_webhook_attempts = 2;
        c.code_webhook_breaker_failures = 2;
        c.code_webhook_breaker_open_ms = 60_000;
    })
    .await;
    let mut c = raw_tcp(&server.tcp()).await;
    // Both attempts fail: a delivery error, retryable.
    match request_code(&mut c, "+15550001003").await {
        Out::Error(e) => {
            assert_eq!(e.code(), pb::ErrorCode::Internal, "{e:?}");
            assert!(e.retry_after_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    rx.next().await;
    rx.next().await;
    // The circuit is now open: refused at once, retryable, and the gateway
    // is left alone.
    match request_code(&mut c, "+15550001004").await {
        Out::Error(e) => {
            assert_eq!(e.code(), pb::ErrorCode::Overloaded, "{e:?}");
            assert!(e.retry_after_ms > 30_000, "{e:?}");
            assert!(e.message.contains("SMS gateway"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(rx.requests.try_recv().is_err(), "no call while open");
    // Metrics show it.
    let (_, text) = http_get(&server.http(), "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "switchboard_outbound_breaker_open{target=\"code_sender\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

/// The binary with `args`, its log (stderr) going to `log`; waits for the
/// ready line. `None` if it exited first.
async fn spawn_logged(args: &[&str], log: &Path) -> Option<Proc> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "debug,lsm_tree=warn,fjall=warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("server neither ready nor exited")
        .unwrap()?;
    assert!(line.starts_with("switchboard ready "), "{line}");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    Some(Proc {
        tcp: field("tcp="),
        http: field("http="),
        child,
    })
}

#[tokio::test]
async fn the_dev_sender_never_logs_the_code() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let p = spawn_logged(
        &[
            "--tcp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &log,
    )
    .await
    .unwrap();
    let phone = "+15550001005";
    register_at(&p.tcp, &data, phone).await;
    let code = std::fs::read_to_string(data.join("dev-codes").join(phone)).unwrap();
    let code = code.trim();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("verification code written"),
        "the sender says it wrote the file: {text}"
    );
    assert!(
        !text.contains(code),
        "the code {code} is in the log:\n{text}"
    );
}

#[tokio::test]
async fn the_implicit_dev_sender_is_refused_on_a_public_address_unless_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let public = [
        "--tcp-listen",
        "0.0.0.0:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    assert!(spawn_logged(&public, &log).await.is_none(), "started");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("code_sender"), "{text}");
    assert!(text.contains("0.0.0.0"), "{text}");

    let cfg = dir.path().join("dev.toml");
    std::fs::write(&cfg, "code_sender = \"dev\"\n").unwrap();
    let mut args = public.to_vec();
    args.extend(["--config", cfg.to_str().unwrap()]);
    let p = spawn_logged(&args, &log)
        .await
        .expect("explicit dev refused");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN") && text.contains("development code sender"),
        "{text}"
    );
    let port = p.tcp.rsplit(':').next().unwrap();
    register_at(&format!("127.0.0.1:{port}"), &data, "+15550001006").await;
}

#[tokio::test]
async fn a_4xx_from_the_gateway_is_not_retried() {
    let mut rx = receiver(&[401]).await;
    let server = webhook_server(&rx.url, |c| c.code_webhook_attempts = 3).await;
    let mut c = raw_tcp(&server.tcp()).await;
    match request_code(&mut c, "+15550001007").await {
        Out::Error(e) => assert_eq!(e.code(), pb::ErrorCode::Internal, "{e:?}"),
        other => panic!("{other:?}"),
    }
    rx.next().await;
    assert!(
        rx.requests.try_recv().is_err(),
        "a rejected request is not retried"
    );
}
