//! Rate limits and quotas, each against the real server over the raw
//! protocol, with small settings so a limit trips in a few requests. Every
//! test here fails without the limit it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use switchboard_proto::pb::{self, ErrorCode, client_frame::Body as In, server_frame::Body as Out};

#[track_caller]
fn refused(out: &Out, code: ErrorCode) -> pb::Error {
    match out {
        Out::Error(e) if e.code() == code => e.clone(),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

async fn metrics(server: &TestServer) -> String {
    http_get(&server.http(), "/metrics").await.1
}

#[tokio::test]
async fn sends_are_limited_per_user_across_connections() {
    let server = TestServer::start_with(|c| c.sends_per_user_per_min = 5).await;
    let alice = register(&server, "+15550009001").await;
    let bob = register(&server, "+15550009002").await;
    let carol = register(&server, "+15550009003").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    let c = a.lookup(&carol.phone).await;
    for i in 0..3 {
        let out = a.send_text(&b, &format!("b{i}"), "hi").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    // A new connection does not reset the user's budget, and another
    // recipient does not either.
    drop(a);
    let mut a = online(&server, &alice).await;
    for i in 0..2 {
        let out = a.send_text(&c, &format!("c{i}"), "hi").await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
    }
    let err = refused(&a.send_text(&c, "c2", "hi").await, ErrorCode::RateLimited);
    assert!(
        err.retry_after_ms > 0 && err.retry_after_ms <= 12_000,
        "{err:?}"
    );
    assert!(err.message.contains("too many messages"), "{err:?}");
    // Bob is not limited by Alice's sends.
    let mut bc = online(&server, &bob).await;
    let a_info = bc.lookup(&alice.phone).await;
    assert!(matches!(
        bc.send_text(&a_info, "x", "hi").await,
        Out::SendOk(_)
    ));
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            "switchboard_rate_limited_total{limit=\"sends_per_user\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn sends_are_limited_per_sender_and_recipient_pair() {
    let server = TestServer::start_with(|c| c.sends_per_pair_per_min = 3).await;
    let alice = register(&server, "+15550009011").await;
    let bob = register(&server, "+15550009012").await;
    let carol = register(&server, "+15550009013").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    let c = a.lookup(&carol.phone).await;
    for i in 0..3 {
        assert!(matches!(
            a.send_text(&b, &format!("b{i}"), "hi").await,
            Out::SendOk(_)
        ));
    }
    let err = refused(&a.send_text(&b, "b3", "hi").await, ErrorCode::RateLimited);
    assert!(err.message.contains("to this user"), "{err:?}");
    assert!(matches!(a.send_text(&c, "c0", "hi").await, Out::SendOk(_)));
}

#[tokio::test]
async fn read_receipts_are_limited_per_user() {
    let server = TestServer::start_with(|c| c.read_receipts_per_user_per_min = 2).await;
    let alice = register(&server, "+15550009021").await;
    let bob = register(&server, "+15550009022").await;
    let mut b = online(&server, &bob).await;
    let read = |i: u32| {
        In::SendReceipt(pb::SendReceipt {
            to_user: alice.user_id,
            kind: pb::ReceiptKind::Read as i32,
            client_msg_ids: vec![format!("m{i}")],
            group_id: 0,
        })
    };
    for i in 0..2 {
        assert!(matches!(b.request(read(i)).await, Out::ReceiptOk(_)));
    }
    drop(b);
    let mut b = online(&server, &bob).await;
    refused(&b.request(read(2)).await, ErrorCode::RateLimited);
}

#[tokio::test]
async fn phone_lookups_are_limited_per_user_so_numbers_cannot_be_enumerated() {
    let server = TestServer::start_with(|c| c.lookups_per_user_per_hour = 5).await;
    let eve = register(&server, "+15550009031").await;
    let mut unknown = 0;
    let mut limited = None;
    for i in 0..30 {
        // Reconnecting every few lookups changes nothing.
        let mut e = online(&server, &eve).await;
        let out = e
            .request(In::LookupUser(pb::LookupUser {
                phone: format!("+1555000{:04}", 9100 + i),
            }))
            .await;
        match out {
            Out::Error(err) if err.code() == ErrorCode::UnknownUser => unknown += 1,
            Out::Error(err) if err.code() == ErrorCode::RateLimited => {
                limited = Some(err);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(unknown, 5);
    let err = limited.expect("30 lookups of unregistered numbers all answered");
    assert!(err.retry_after_ms > 0);
}

#[tokio::test]
async fn bundle_fetches_are_limited_per_requesting_user_across_reconnects() {
    let server = TestServer::start_with(|c| c.bundle_fetches_per_user_per_hour = 3).await;
    let bob = register(&server, "+15550009041").await;
    let eve = register(&server, "+15550009042").await;
    let fetch = In::FetchBundles(pb::FetchBundles {
        user_id: bob.user_id,
        ..Default::default()
    });
    for _ in 0..3 {
        let mut e = online(&server, &eve).await;
        assert!(matches!(e.request(fetch.clone()).await, Out::Bundles(_)));
    }
    let mut e = online(&server, &eve).await;
    let err = refused(&e.request(fetch).await, ErrorCode::RateLimited);
    assert!(err.retry_after_ms > 0);
}

#[tokio::test]
async fn a_devices_one_time_keys_are_budgeted_and_fetchers_past_it_get_the_fallback_key() {
    let server = TestServer::start_with(|c| c.one_time_keys_per_device_per_hour = 3).await;
    let bob = register(&server, "+15550009051").await;
    let keys = TestKeys::new(9);
    let mut b = online(&server, &bob).await;
    assert!(matches!(
        b.request(In::UploadKeys(keys.upload(0, 10))).await,
        Out::KeysUploaded(_)
    ));
    // Many accounts fetching Bob's bundle: only three one-time keys go.
    let mut one_time = 0;
    let mut fallback = 0;
    for i in 0..4 {
        let fetcher = register(&server, &format!("+155500092{i:02}")).await;
        let mut f = online(&server, &fetcher).await;
        for _ in 0..2 {
            let Out::Bundles(got) = f
                .request(In::FetchBundles(pb::FetchBundles {
                    user_id: bob.user_id,
                    ..Default::default()
                }))
                .await
            else {
                panic!("fetch refused")
            };
            match got.devices[0].key {
                Some(pb::device_bundle::Key::OneTimeKey(_)) => one_time += 1,
                Some(pb::device_bundle::Key::FallbackKey(_)) => fallback += 1,
                None => panic!("no key in {got:?}"),
            }
        }
    }
    assert_eq!((one_time, fallback), (3, 5));
    // Bob's stock lost only those three.
    let mut b = online(&server, &bob).await;
    match b.request(In::UploadKeys(keys.upload(10, 0))).await {
        Out::KeysUploaded(k) => assert_eq!(k.one_time_keys_remaining, 7),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_full_device_queue_refuses_sends_with_queue_full_and_loses_nothing() {
    let mut server = TestServer::start_with(|c| c.queue_max_entries_per_device = 5).await;
    let alice = register(&server, "+15550009061").await;
    let bob = register(&server, "+15550009062").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    for i in 0..5 {
        assert!(matches!(
            a.send_text(&b, &format!("m{i}"), "hi").await,
            Out::SendOk(_)
        ));
    }
    let err = refused(&a.send_text(&b, "m5", "hi").await, ErrorCode::QueueFull);
    assert!(err.retry_after_ms > 0, "{err:?}");
    // After a restart the queue is counted from the store.
    drop(a);
    server.restart().await;
    let mut a = online(&server, &alice).await;
    refused(&a.send_text(&b, "m5", "hi").await, ErrorCode::QueueFull);
    // Bob drains exactly what was acknowledged.
    let mut bc = online(&server, &bob).await;
    let ids = message_ids(&bc.drain().await);
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4"]);
    // Their ✓✓ reach Alice once the acked entries are removed (one batch).
    a.await_delivered(5).await;
    drop(bc);
    // The acked entries freed the quota: the refused send goes through on
    // retry, and the queue fills to exactly its quota again.
    for i in 5..10 {
        let out = a.send_text(&b, &format!("m{i}"), "hi").await;
        assert!(matches!(out, Out::SendOk(_)), "{i}: {out:?}");
    }
    refused(&a.send_text(&b, "m10", "hi").await, ErrorCode::QueueFull);
    let text = metrics(&server).await;
    assert!(
        metric(
            &text,
            "switchboard_rate_limited_total{limit=\"queue_quota\"}"
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_device_queue_is_held_to_its_byte_quota() {
    // Room for one largest message and a bit: two 40 KB payloads do not fit.
    let server = TestServer::start_with(|c| {
        c.queue_max_bytes_per_device = 64 * 1024 + 4096;
    })
    .await;
    let alice = register(&server, "+15550009071").await;
    let bob = register(&server, "+15550009072").await;
    let mut a = online(&server, &alice).await;
    let b = a.lookup(&bob.phone).await;
    let big = vec![7u8; 40_000];
    for (id, payload) in [("big0", big.clone()), ("small", vec![1u8; 100])] {
        let out = a.request(send_to(&b, id, payload)).await;
        assert!(matches!(out, Out::SendOk(_)), "{id}: {out:?}");
    }
    // The second big one does not fit in what is left.
    refused(
        &a.request(send_to(&b, "big1", big.clone())).await,
        ErrorCode::QueueFull,
    );
    // Nor does it once more; a small one from someone else still does.
    refused(
        &a.request(send_to(&b, "big1", big)).await,
        ErrorCode::QueueFull,
    );
    let carol = register(&server, "+15550009073").await;
    let mut c = online(&server, &carol).await;
    assert!(matches!(
        c.request(send_to(&b, "c0", vec![1u8; 100])).await,
        Out::SendOk(_)
    ));
}

#[tokio::test]
async fn an_unauthenticated_connection_is_closed_at_its_deadline_however_often_it_pings() {
    let server = TestServer::start_with(|c| c.unauthenticated_timeout_secs = 1).await;
    let mut c = raw_tcp(&server.tcp()).await;
    let started = Instant::now();
    let goodbye = loop {
        match c.try_request(In::Ping(pb::Ping {})).await {
            Some(Out::Pong(_)) => {}
            // The goodbye is a push (id 0): kept aside by `try_request`.
            None => match c.pushes.pop_front().and_then(|f| f.body) {
                Some(Out::Goodbye(g)) => break g.reason.unwrap(),
                other => panic!("closed without a goodbye: {other:?}"),
            },
            Some(other) => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still open after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(goodbye.code(), ErrorCode::IdleTimeout);
    assert!(goodbye.message.contains("not authenticated"), "{goodbye:?}");
    // An authenticated connection outlives the deadline.
    let alice = register(&server, "+15550009081").await;
    let mut a = online(&server, &alice).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(
        a.request(In::Ping(pb::Ping {})).await,
        Out::Pong(_)
    ));
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_in_the_handshake() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let first = raw_tcp(&server.tcp()).await;
    let _second = raw_tcp(&server.tcp()).await;
    let Err(err) = raw_tcp_versions(&server.tcp(), &[switchboard_proto::version::CURRENT]).await
    else {
        panic!("a third connection was accepted")
    };
    assert_eq!(err.code(), ErrorCode::Overloaded);
    assert!(err.retry_after_ms > 0);
    assert!(err.message.contains("connection limit"), "{err:?}");
    // A closed connection frees its place.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        if raw_tcp_versions(&server.tcp(), &[switchboard_proto::version::CURRENT])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn code_requests_are_limited_per_ip_address() {
    let server = TestServer::start_with(|c| c.code_requests_per_ip_per_hour = 3).await;
    let mut c = raw_tcp(&server.tcp()).await;
    for i in 0..3 {
        let out = c
            .request(In::RequestCode(pb::RequestCode {
                phone: format!("+1555000{:04}", 9300 + i),
                ..Default::default()
            }))
            .await;
        assert!(matches!(out, Out::CodeSent(_)), "{out:?}");
    }
    // Another number, another connection, same address.
    let mut c = raw_tcp(&server.tcp()).await;
    let out = c
        .request(In::RequestCode(pb::RequestCode {
            phone: "+15550009399".into(),
            ..Default::default()
        }))
        .await;
    let err = refused(&out, ErrorCode::RateLimited);
    assert!(err.message.contains("from this address"), "{err:?}");
}

#[tokio::test]
async fn wrong_codes_are_capped_per_number_per_day_across_new_codes() {
    let server = TestServer::start_with(|c| c.wrong_codes_per_phone_per_day = 7).await;
    let phone = "+15550009401";
    let mut c = raw_tcp(&server.tcp()).await;
    let request = In::RequestCode(pb::RequestCode {
        phone: phone.into(),
        ..Default::default()
    });
    let verify = |code: &str| {
        In::VerifyCode(pb::VerifyCode {
            phone: phone.into(),
            code: code.into(),
            pin: String::new(),
        })
    };
    assert!(matches!(c.request(request.clone()).await, Out::CodeSent(_)));
    let code = dev_code(&server.data_dir(), phone).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let out = c.request(verify(wrong)).await;
        assert!(
            matches!(
                error_code(&out),
                ErrorCode::CodeInvalid | ErrorCode::CodeLocked
            ),
            "{out:?}"
        );
    }
    // A new code brings two more guesses, not five.
    assert!(matches!(c.request(request).await, Out::CodeSent(_)));
    let code = dev_code_changed(&server, phone, &code).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..2 {
        assert_eq!(
            error_code(&c.request(verify(wrong)).await),
            ErrorCode::CodeInvalid
        );
    }
    // Even the right code is refused now, until the day is over.
    let err = refused(&c.request(verify(&code)).await, ErrorCode::RateLimited);
    assert!(err.retry_after_ms > 3_600_000, "{err:?}");
    assert!(err.message.contains("wrong codes"), "{err:?}");
}

/// The dev code for `phone` once it differs from `old` (a new code was sent).
async fn dev_code_changed(server: &TestServer, phone: &str, old: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let code = dev_code(&server.data_dir(), phone).await;
        if code != old {
            return code;
        }
        assert!(Instant::now() < deadline, "no new code was written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_limit_is_on_metrics_from_the_start() {
    let server = TestServer::start().await;
    let text = metrics(&server).await;
    for limit in [
        "sends_per_user",
        "sends_per_pair",
        "read_receipts_per_user",
        "lookups_per_user",
        "bundle_fetches_per_user",
        "code_requests_per_ip",
        "code_requests_per_phone",
        "wrong_codes_per_phone",
        "link_codes_per_user",
        "one_time_keys_per_device",
        "queue_quota",
        "max_connections",
    ] {
        let series = format!("switchboard_rate_limited_total{{limit=\"{limit}\"}}");
        assert!(
            metric(&text, &series).is_some(),
            "{series} missing:\n{text}"
        );
    }
}
