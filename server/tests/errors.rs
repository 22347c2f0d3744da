//! Bad input gets a clear error: device mismatch, unauthenticated requests,
//! code lockout and rate limits, oversized frames, garbage, old versions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, ErrorCode, client_frame::Body as In, server_frame::Body as Out};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn send_to(user: u64, devices: &[u32]) -> In {
    In::Send(pb::Send {
        client_msg_id: "m".into(),
        to_user: user,
        payloads: devices
            .iter()
            .map(|d| pb::DevicePayload {
                device_id: *d,
                payload: b"x".to_vec().into(),
            })
            .collect(),
        ..Default::default()
    })
}

#[tokio::test]
async fn wrong_device_list_names_missing_and_stale_devices() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000101").await;
    let bob_old = register(&server, "+15550000102").await;
    // Bob re-registers: his first device is revoked, a new one replaces it.
    let bob = register(&server, "+15550000102").await;
    assert_eq!(bob.user_id, bob_old.user_id);
    assert_ne!(bob.device_id, bob_old.device_id);

    let mut a = online(&server, &alice).await;
    let out = a.request(send_to(bob.user_id, &[bob_old.device_id])).await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.code(), ErrorCode::DeviceMismatch);
    assert_eq!(e.missing_devices, vec![bob.device_id]);
    assert_eq!(e.stale_devices, vec![bob_old.device_id]);

    let out = a.request(send_to(bob.user_id, &[])).await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.missing_devices, vec![bob.device_id]);
    assert!(e.stale_devices.is_empty());

    // The revoked device can no longer authenticate.
    let mut old = raw_tcp(&server.tcp()).await;
    assert_eq!(
        error_code(&old.auth(&bob_old).await),
        ErrorCode::Unauthenticated
    );

    // Unknown recipient.
    let out = a.request(send_to(12345, &[1])).await;
    assert_eq!(error_code(&out), ErrorCode::UnknownUser);
    // Duplicate device ids and bad ids are rejected.
    let out = a
        .request(send_to(bob.user_id, &[bob.device_id, bob.device_id]))
        .await;
    assert_eq!(error_code(&out), ErrorCode::BadRequest);
    let out = a
        .request(In::Send(pb::Send {
            client_msg_id: "x".repeat(65),
            to_user: bob.user_id,
            payloads: vec![],
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::BadRequest);
    let out = a
        .request(In::Send(pb::Send {
            client_msg_id: "big".into(),
            to_user: bob.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: bob.device_id,
                payload: vec![0u8; 64 * 1024 + 1].into(),
            }],
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::PayloadTooLarge);
}

#[tokio::test]
async fn unauthenticated_connections_can_only_authenticate() {
    let server = TestServer::start().await;
    let alice = register(&server, "+15550000111").await;
    let mut c = raw_tcp(&server.tcp()).await;
    let out = c.request(send_to(alice.user_id, &[alice.device_id])).await;
    assert_eq!(error_code(&out), ErrorCode::Unauthenticated);
    let out = c
        .request(In::LookupUser(pb::LookupUser {
            phone: alice.phone.clone(),
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::Unauthenticated);
    // A wrong credential is refused; three strikes close the connection.
    let mut wrong = alice.clone();
    wrong.credential = vec![0u8; 32];
    for _ in 0..3 {
        assert_eq!(
            error_code(&c.auth(&wrong).await),
            ErrorCode::Unauthenticated
        );
    }
    let frames = c.until_closed().await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f.body, Some(Out::Goodbye(_))))
    );
    // Nothing was stored for Alice.
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
}

#[tokio::test]
async fn five_wrong_codes_lock_the_code_and_requests_are_rate_limited() {
    let server = TestServer::start().await;
    let phone = "+15550000121";
    let mut c = raw_tcp(&server.tcp()).await;
    let req = || {
        In::RequestCode(pb::RequestCode {
            phone: phone.into(),
            ..Default::default()
        })
    };
    assert!(matches!(c.request(req()).await, Out::CodeSent(_)));
    let code = dev_code(&server.data_dir(), phone).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let verify = |code: &str| {
        In::VerifyCode(pb::VerifyCode {
            phone: phone.into(),
            code: code.into(),
            pin: String::new(),
        })
    };
    for _ in 0..4 {
        assert_eq!(
            error_code(&c.request(verify(wrong)).await),
            ErrorCode::CodeInvalid
        );
    }
    assert_eq!(
        error_code(&c.request(verify(wrong)).await),
        ErrorCode::CodeLocked
    );
    // Even the right code is refused now.
    assert_eq!(
        error_code(&c.request(verify(&code)).await),
        ErrorCode::CodeLocked
    );

    // Two more codes may be requested this hour, then the limit applies.
    assert!(matches!(c.request(req()).await, Out::CodeSent(_)));
    assert!(matches!(c.request(req()).await, Out::CodeSent(_)));
    let out = c.request(req()).await;
    let Out::Error(e) = out else {
        panic!("{out:?}")
    };
    assert_eq!(e.code(), ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 3_600_000);
    // A fresh code works after the lockout.
    let code = dev_code(&server.data_dir(), phone).await;
    assert!(matches!(c.request(verify(&code)).await, Out::Verified(_)));
    // ... once.
    assert_eq!(
        error_code(&c.request(verify(&code)).await),
        ErrorCode::CodeExpired
    );

    let out = c
        .request(In::RequestCode(pb::RequestCode {
            phone: "555-1234".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&out), ErrorCode::InvalidPhone);
}

#[tokio::test]
async fn oversized_frame_is_refused_before_its_body_is_read() {
    let server = TestServer::start().await;
    let mut c = raw_tcp(&server.tcp()).await;
    // Announce a 100 MiB frame and send only its length prefix.
    let mut prefix = Vec::new();
    prost::encode_length_delimiter(100 * 1024 * 1024, &mut prefix).unwrap();
    // A plaintext consisting of only the varint: queue it as raw bytes.
    // queue_raw would add its own length, so seal the prefix by hand.
    c.send_plain_prefix(&prefix).await;
    let frames = c.until_closed().await;
    let last = frames.last().expect("a goodbye");
    match &last.body {
        Some(Out::Goodbye(g)) => {
            let r = g.reason.as_ref().unwrap();
            assert_eq!(r.code(), ErrorCode::FrameTooLarge);
            assert!(r.message.contains("104857600"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn undecodable_frame_is_a_protocol_violation() {
    let server = TestServer::start().await;
    let mut c = raw_tcp(&server.tcp()).await;
    c.send_plain(&[0xff, 0xff, 0xff]).await.unwrap();
    let frames = c.until_closed().await;
    match &frames.last().unwrap().body {
        Some(Out::Goodbye(g)) => {
            assert_eq!(
                g.reason.as_ref().unwrap().code(),
                ErrorCode::ProtocolViolation
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_dropped_and_the_server_carries_on() {
    let server = TestServer::start_with(|c| c.handshake_timeout_ms = 1000).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0u8; 3000][..],
        &b"SWB\x01\xff\xff\xff\xff garbage after a valid preamble"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(server.tcp()).await.unwrap();
        let _ = s.write_all(garbage).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("server must close the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "server must not answer garbage");
    }
    // Still serving.
    let alice = register(&server, "+15550000131").await;
    let mut a = online(&server, &alice).await;
    assert!(a.drain().await.is_empty());
}

#[tokio::test]
async fn silent_handshake_is_timed_out() {
    let server = TestServer::start_with(|c| c.handshake_timeout_ms = 300).await;
    let mut s = tokio::net::TcpStream::connect(server.tcp()).await.unwrap();
    s.write_all(b"SW").await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("server must time the handshake out")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn too_old_protocol_version_is_refused_clearly() {
    let server = TestServer::start().await;
    let err = match raw_tcp_versions(&server.tcp(), &[0]).await {
        Err(e) => e,
        Ok(_) => panic!("version 0 must be refused"),
    };
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    assert!(
        err.message.contains("upgrade the client"),
        "{}",
        err.message
    );
    // A client offering old and current versions gets the current one.
    let c = raw_tcp_versions(&server.tcp(), &[0, switchboard_proto::version::CURRENT]).await;
    assert!(c.is_ok());
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_keepalive_window() {
    let server = TestServer::start_with(|c| c.idle_timeout_secs = 1).await;
    let alice = register(&server, "+15550000141").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;
    let frames = a.until_closed().await;
    match &frames.last().unwrap().body {
        Some(Out::Goodbye(g)) => {
            assert_eq!(g.reason.as_ref().unwrap().code(), ErrorCode::IdleTimeout);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn frames_keep_a_connection_past_the_keepalive_window() {
    let server = TestServer::start_with(|c| c.idle_timeout_secs = 1).await;
    let alice = register(&server, "+15550000142").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;
    // A ping every 400 ms for 3.2 s: each one moves the 1 s window on.
    let started = std::time::Instant::now();
    for i in 0..8u32 {
        let ping = a.seal_frame(&pb::ClientFrame {
            id: 200 + i,
            body: Some(In::Ping(pb::Ping {})),
        });
        a.send_raw_bytes(&ping).await.unwrap();
        match a.next().await.expect("closed while active").body {
            Some(Out::Pong(_)) => {}
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > std::time::Duration::from_secs(3));
    // Then silence: the window closes.
    let frames = a.until_closed().await;
    match &frames.last().unwrap().body {
        Some(Out::Goodbye(g)) => {
            assert_eq!(g.reason.as_ref().unwrap().code(), ErrorCode::IdleTimeout);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_frame_trickled_in_byte_by_byte_is_cut_off() {
    let server = TestServer::start_with(|c| c.frame_timeout_secs = 1).await;
    let alice = register(&server, "+15550000151").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;
    // A sealed Ping frame, delivered one byte every 100 ms: each byte resets
    // the idle timer, but the frame never completes in time.
    let mut wire = a
        .seal_frame(&pb::ClientFrame {
            id: 9,
            body: Some(In::Ping(pb::Ping {})),
        })
        .to_vec();
    wire.truncate(wire.len() - 1);
    let started = std::time::Instant::now();
    for byte in wire {
        if a.send_raw_bytes(&[byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if started.elapsed() > std::time::Duration::from_secs(3) {
            break;
        }
    }
    let frames = a.until_closed().await;
    match &frames.last().expect("a goodbye").body {
        Some(Out::Goodbye(g)) => {
            let r = g.reason.as_ref().unwrap();
            assert_eq!(r.code(), ErrorCode::IdleTimeout);
            assert!(r.message.contains("not completed"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_steady_stream_of_frames_is_not_cut_off_by_the_frame_timeout() {
    let server = TestServer::start_with(|c| c.frame_timeout_secs = 1).await;
    let alice = register(&server, "+15550000161").await;
    let mut a = online(&server, &alice).await;
    a.drain().await;
    // 30 pings, each sealed on its own, sent every 100 ms in slices that
    // each finish one frame and start the next: some frame is always
    // incomplete, for 3 s in all, yet frames keep completing.
    let mut wire = Vec::new();
    let mut one = 0;
    for i in 0..30u32 {
        let sealed = a.seal_frame(&pb::ClientFrame {
            id: 100 + i,
            body: Some(In::Ping(pb::Ping {})),
        });
        one = sealed.len();
        wire.extend_from_slice(&sealed);
    }
    let (head, rest) = wire.split_at(one / 2);
    a.send_raw_bytes(head).await.unwrap();
    for chunk in rest.chunks(one) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        a.send_raw_bytes(chunk).await.unwrap();
    }
    let mut pongs = 0;
    while pongs < 30 {
        match a.next().await.expect("closed by the frame timeout").body {
            Some(Out::Pong(_)) => pongs += 1,
            Some(Out::Goodbye(g)) => panic!("cut off: {g:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_connection_busy_with_frames_hears_shutting_down() {
    let mut server = TestServer::start().await;
    let alice = register(&server, "+15550000131").await;
    let mut a = raw_tcp(&server.tcp()).await;
    a.auth(&alice).await;
    a.drain().await;
    // Pings keep arriving while the server stops, so the connection has a
    // frame to handle on its turns; it must still say goodbye.
    let mut id = 0u32;
    let mut pings = |a: &mut Raw| {
        let mut wire = Vec::new();
        for _ in 0..50 {
            id += 1;
            let ping = pb::ClientFrame {
                id,
                body: Some(In::Ping(pb::Ping {})),
            };
            wire.extend_from_slice(&a.seal_frame(&ping));
        }
        wire
    };
    let first = pings(&mut a);
    a.send_raw_bytes(&first).await.unwrap();
    assert!(matches!(
        a.next().await.and_then(|f| f.body),
        Some(Out::Pong(_))
    ));
    let busy = async {
        for _ in 0..200 {
            let wire = pings(&mut a);
            if a.send_raw_bytes(&wire).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        a.until_closed().await
    };
    let ((), frames) = tokio::join!(server.stop(), busy);
    match frames.last().and_then(|f| f.body.as_ref()) {
        Some(Out::Goodbye(g)) => assert_eq!(
            g.reason.as_ref().map(pb::Error::code),
            Some(ErrorCode::ShuttingDown)
        ),
        other => panic!("the last frame is {other:?}"),
    }
}

#[tokio::test]
async fn idle_connections_hear_shutting_down_before_and_after_authenticating() {
    // Two ways to be woken at shutdown: a connection that has not
    // authenticated watches the server's cancellation; an authenticated one
    // is ended by its shard.
    let mut server = TestServer::start().await;
    let alice = register(&server, "+15550000141").await;
    let mut authed = raw_tcp(&server.tcp()).await;
    authed.auth(&alice).await;
    authed.drain().await;
    let mut anonymous = raw_tcp(&server.tcp()).await;
    let (((), authed_frames), anonymous_frames) = tokio::join!(
        async { tokio::join!(server.stop(), authed.until_closed()) },
        anonymous.until_closed()
    );
    for frames in [authed_frames, anonymous_frames] {
        match frames.last().and_then(|f| f.body.as_ref()) {
            Some(Out::Goodbye(g)) => assert_eq!(
                g.reason.as_ref().map(pb::Error::code),
                Some(ErrorCode::ShuttingDown)
            ),
            other => panic!("the last frame is {other:?}"),
        }
    }
}
