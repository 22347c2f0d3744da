//! Admission control: connections beyond the accept rate wait their turn
//! (accepted into a bounded queue, handshaken when admitted) and are all
//! served; none is refused or lost while it waits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};

#[tokio::test]
async fn a_burst_beyond_the_accept_rate_is_admitted_in_turn() {
    const RATE_PER_SEC: u32 = 20;
    const CONNECTIONS: usize = 60;
    let server = TestServer::start_with(|c| {
        c.max_accepts_per_sec = RATE_PER_SEC;
        c.max_concurrent_handshakes = 4;
    })
    .await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let tcp = server.tcp();
            tokio::spawn(async move {
                let mut c = raw_tcp(&tcp).await;
                c.request(In::Ping(pb::Ping {})).await
            })
        })
        .collect();
    for t in tasks {
        let out = t.await.unwrap();
        assert!(matches!(out, Out::Pong(_)), "{out:?}");
    }
    // The bucket starts with one second's worth of tokens; the other 40
    // connections need two more seconds of refill, so the burst cannot
    // have been served in much less.
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        elapsed >= 1.5,
        "{CONNECTIONS} connections at {RATE_PER_SEC}/s were admitted in {elapsed:.2} s"
    );
}
