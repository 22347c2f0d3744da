//! /metrics, /healthz and /readyz: every golden signal is exported and
//! moves when provoked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn health_and_golden_signals() {
    let server = TestServer::start().await;
    let http = server.http();
    assert_eq!(http_get(&http, "/healthz").await.0, 200);
    assert_eq!(http_get(&http, "/readyz").await.0, 200);
    let (status, body) = http_get(&http, "/no/such/thing").await;
    assert_eq!(status, 404);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "NOT_FOUND");

    let (status, before) = http_get(&http, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "switchboard_messages_in_total",
        "switchboard_messages_out_total",
        "switchboard_store_commit_failures_total",
        "switchboard_discarded_requests_total",
        "switchboard_slow_reader_disconnects_total",
        "switchboard_authenticated_connections",
        "switchboard_queued_entries",
    ] {
        assert!(metric(&before, name).is_some(), "{name} missing:\n{before}");
    }

    // Provoke: a garbage connection, two users chatting, an error, a
    // replaced connection.
    let mut junk = tokio::net::TcpStream::connect(server.tcp()).await.unwrap();
    junk.write_all(b"definitely not switchboard").await.unwrap();
    drop(junk);
    let alice = register(&server, "+15550000501").await;
    let bob = register(&server, "+15550000502").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;
    let mut b = online(&server, &bob).await;
    b.drain().await;
    let bob_info = a.lookup(&bob.phone).await;
    for i in 0..5 {
        assert!(matches!(
            a.send_text(&bob_info, &format!("m{i}"), "hi").await,
            Out::SendOk(_)
        ));
        b.next_entry().await;
    }
    let _ = a
        .request(In::LookupUser(pb::LookupUser {
            phone: "+19999999999".into(),
        }))
        .await;
    let _b2 = online(&server, &bob).await; // replaces b
    // Wait until the receipts for the acks have been made durable.
    for _ in 0..5 {
        a.next_entry().await;
    }

    let (_, after) = http_get(&http, "/metrics").await;
    let grew = |series: &str| {
        let v0 = metric(&before, series).unwrap_or(0.0);
        let v1 = metric(&after, series).unwrap_or_else(|| panic!("{series} missing:\n{after}"));
        assert!(v1 > v0, "{series}: {v0} -> {v1}");
    };
    grew("switchboard_connections_accepted_total{transport=\"tcp\"}");
    grew("switchboard_handshake_failures_total{reason=\"refused\"}");
    grew("switchboard_messages_in_total");
    grew("switchboard_messages_out_total");
    grew("switchboard_send_ack_seconds_count");
    grew("switchboard_delivery_seconds_count");
    grew("switchboard_errors_total{code=\"UNKNOWN_USER\"}");
    grew("switchboard_goodbyes_total{code=\"REPLACED\"}");
    grew("switchboard_shard_inbox_wait_seconds_count");
    grew("switchboard_shard_batch_commands_count");
    grew("switchboard_store_batch_ops_count");
    grew("switchboard_store_commit_seconds_count");
    assert!(metric(&after, "switchboard_authenticated_connections").unwrap() >= 2.0);
    assert!(metric(&after, "switchboard_connections{transport=\"tcp\"}").unwrap() >= 2.0);
    assert!(
        after.contains("switchboard_shard_inbox_depth{shard=\"0\"}"),
        "{after}"
    );

    // The backlog gauge is sampled every few seconds: queue for an offline
    // device and wait for it to move.
    drop(_b2);
    for i in 0..20 {
        let out = a.send_text(&bob_info, &format!("q{i}"), "later").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, m) = http_get(&http, "/metrics").await;
        if metric(&m, "switchboard_queued_entries").unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queued_entries never moved:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
