//! The crate's echo bot example (`examples/echo_bot.rs`) against the real
//! server: an event loop that awaits a send for each message keeps up with
//! a peer that sends more than its events channel holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

// The example's logic, compiled as it ships and run here.
#[path = "../examples/echo_bot.rs"]
#[allow(dead_code)]
mod echo_bot;

use std::collections::BTreeSet;

use bytes::Bytes;
use harness::{Peer, TestServer, WAIT, client_config};

/// Messages sent to the bot: many times its events channel.
const FLOOD: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_bot_awaiting_sends_in_its_event_loop_answers_a_flood() {
    let server = TestServer::start().await;
    let bot_creds = server.register("+15550007001").await;
    let mut alice = Peer::online(&server, server.register("+15550007002").await).await;

    // A tiny events channel: the bot's loop is behind almost all the time.
    let mut config = client_config(server.endpoint());
    config.event_capacity = 1;
    let bot = Peer::start(config, bot_creds.clone()).await;
    let Peer { client, events, .. } = bot;
    let bot_client = client.clone();
    let bot_task = tokio::spawn(async move { echo_bot::echo(&bot_client, events).await });

    let mut expected = BTreeSet::new();
    for i in 0..FLOOD {
        let text = format!("flood {i}");
        alice
            .client
            .send_to_user(bot_creds.user_id, Bytes::from(text.clone()))
            .await
            .unwrap();
        expected.insert(text);
    }
    let mut echoed = BTreeSet::new();
    while echoed.len() < FLOOD {
        let m = alice.message().await;
        assert_eq!(m.from_user, bot_creds.user_id);
        alice.client.ack([m.seq]).await.unwrap();
        echoed.insert(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(echoed, expected);

    client.close().await.unwrap();
    let count = tokio::time::timeout(WAIT, bot_task)
        .await
        .expect("the bot never stopped")
        .unwrap()
        .unwrap();
    assert_eq!(count, FLOOD as u64);
    alice.close().await;
}
