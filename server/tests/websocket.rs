//! WebSocket links keep no full-size buffers: an idle browser connection
//! must cost about what a TCP one does, not a 128 KiB read buffer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};

/// Opens `n` WebSocket connections that have each completed a request
/// (so the server has read from every one of them).
async fn open(url: &str, n: usize) -> Vec<Raw> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = raw_ws(url).await;
        let out = c.request(In::Ping(pb::Ping {})).await;
        assert!(matches!(out, Out::Pong(_)), "{out:?}");
        conns.push(c);
    }
    conns
}

#[tokio::test]
async fn idle_websocket_connections_hold_no_full_size_buffers() {
    const CONNECTIONS: usize = 300;
    /// A TCP connection holds about 4 KiB idle (docs/BENCHMARKS.md); the
    /// WebSocket codec and the upgraded HTTP connection add about 3 KiB
    /// (7 KiB measured). With tungstenite's default 128 KiB read buffer it
    /// was 130 KiB.
    const BOUND_BYTES_PER_CONNECTION: u64 = 24 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &[]).await;
    let pid = server.child.id().expect("server pid").to_string();
    let url = format!("ws://{}/ws", server.http);
    // Warm up: one-time allocations (runtime, pools) are not per connection.
    let warm = open(&url, 20).await;
    let before = rss_bytes(&pid);
    let conns = open(&url, CONNECTIONS).await;
    let after = rss_bytes(&pid);
    assert!(before > 0 && after > 0, "server RSS unreadable");
    let per_connection = after.saturating_sub(before) / CONNECTIONS as u64;
    println!("{per_connection} bytes of server RSS per idle WebSocket connection");
    assert!(
        per_connection < BOUND_BYTES_PER_CONNECTION,
        "{per_connection} bytes per idle WebSocket connection"
    );
    drop((warm, conns));
}

/// The small read buffer grows for a large message, and a full drain page
/// of the largest entries (100 × 64 KiB, one write of 6.5 MB, more than
/// the codec's write buffer cap) arrives whole over WebSocket.
#[tokio::test]
async fn large_messages_and_drains_cross_websocket_whole() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550007200").await;
    let bob = register(&server, "+15550007201").await;
    let mut a = raw_ws(&server.ws()).await;
    assert!(matches!(a.auth(&alice).await, Out::AuthOk(_)));
    a.drain().await;
    let bob_info = a.lookup(&bob.phone).await;
    let big: Vec<u8> = (0..switchboard_proto::limits::MAX_PAYLOAD_BYTES)
        .map(|i| (i % 251) as u8)
        .collect();
    for i in 0..100 {
        let out = a
            .request(In::Send(pb::Send {
                client_msg_id: format!("big-{i}"),
                to_user: bob_info.user_id,
                payloads: vec![pb::DevicePayload {
                    device_id: bob.device_id,
                    payload: big.clone().into(),
                }],
                ..Default::default()
            }))
            .await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let mut b = raw_ws(&server.ws()).await;
    assert!(matches!(b.auth(&bob).await, Out::AuthOk(_)));
    let got = b.drain().await;
    assert_eq!(got.len(), 100);
    for e in &got {
        let Some(pb::queue_entry::Body::Message(m)) = &e.body else {
            panic!("{e:?}")
        };
        assert_eq!(m.payload[..], big[..]);
    }
}
