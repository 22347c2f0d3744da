//! The protocol as other clients see it: the corners an independent
//! implementation of docs/PROTOCOL.md hits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use prost::Message;
use switchboard_proto::noise::{Handshake, generate_keypair};
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_proto::{PREAMBLE, limits, record, version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// §10.1: an invalid UTF-8 string is refused in our words, not the
/// decoder's.
#[tokio::test]
async fn invalid_utf8_in_a_string_field_gets_a_clear_message() {
    let server = TestServer::start().await;
    let mut c = raw_tcp(&server.tcp()).await;
    let mut bytes = pb::ClientFrame {
        id: 1,
        body: Some(In::LookupUser(pb::LookupUser {
            phone: "ZZZZ".into(),
        })),
    }
    .encode_to_vec();
    let at = bytes.windows(4).position(|w| w == b"ZZZZ").unwrap();
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc0, 0x80]);
    c.send_plain(&bytes).await.unwrap();
    let frames = c.until_closed().await;
    let Some(Out::Goodbye(g)) = frames.last().and_then(|f| f.body.clone()) else {
        panic!("no goodbye: {frames:?}")
    };
    let reason = g.reason.unwrap();
    assert_eq!(reason.code(), pb::ErrorCode::ProtocolViolation);
    assert!(reason.message.contains("UTF-8"), "{}", reason.message);
    for internal in [
        "Protobuf",
        "ClientFrame.body",
        "LookupUser.phone",
        "DecodeError",
    ] {
        assert!(
            !reason.message.contains(internal),
            "decoder internals in {:?}",
            reason.message
        );
    }
}

/// §5.2 lets transport frames follow handshake message 3 in the same
/// write; one left incomplete there must be closed by the frame timeout
/// (§7.2.1), not the much longer idle timeout.
#[tokio::test]
async fn a_partial_frame_sent_with_handshake_message_3_starts_the_frame_clock() {
    let server = TestServer::start_with(|c| {
        c.frame_timeout_secs = 1;
        c.idle_timeout_secs = 60;
    })
    .await;
    let mut s = TcpStream::connect(server.tcp()).await.unwrap();
    let key = generate_keypair().unwrap();
    let mut hs = Handshake::initiator(&key.private).unwrap();
    let mut out = BytesMut::from(&PREAMBLE[..]);
    let hello = pb::ClientHello {
        versions: vec![version::CURRENT],
        user_agent: "protocol-test".into(),
    };
    hs.write_message(&hello.encode_to_vec(), &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut rbuf = BytesMut::new();
    let msg2 = loop {
        if let Some(r) = record::decode(&mut rbuf).unwrap() {
            break r;
        }
        assert!(
            s.read_buf(&mut rbuf).await.unwrap() > 0,
            "closed in handshake"
        );
    };
    let payload = hs.read_message(&msg2).unwrap();
    let sh = pb::ServerHello::decode(&payload[..]).unwrap();
    assert!(matches!(
        sh.result,
        Some(pb::server_hello::Result::Version(_))
    ));
    // Message 3 and, in the same write, a Ping frame short of its last
    // byte.
    let mut out = BytesMut::new();
    hs.write_message(&[], &mut out).unwrap();
    let mut session = hs.into_session(limits::DEFAULT_MAX_FRAME_BYTES).unwrap();
    session.queue(&pb::ClientFrame {
        id: 1,
        body: Some(In::Ping(pb::Ping {})),
    });
    session.seal(&mut out).unwrap();
    out.truncate(out.len() - 1);
    let started = Instant::now();
    s.write_all(&out).await.unwrap();

    let closed = tokio::time::timeout(WAIT, async {
        let mut frames = Vec::new();
        loop {
            if let Some(f) = session.poll_frame::<pb::ServerFrame>(&mut rbuf).unwrap() {
                frames.push(f);
                continue;
            }
            if s.read_buf(&mut rbuf).await.unwrap_or(0) == 0 {
                return frames;
            }
        }
    })
    .await
    .expect("the server kept the connection past the frame timeout");
    let elapsed = started.elapsed();
    let Some(Out::Goodbye(g)) = closed.last().and_then(|f| f.body.clone()) else {
        panic!("no goodbye: {closed:?}")
    };
    let reason = g.reason.unwrap();
    assert_eq!(
        reason.code(),
        pb::ErrorCode::IdleTimeout,
        "{}",
        reason.message
    );
    assert!(
        reason.message.contains("not completed"),
        "{}",
        reason.message
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
}
