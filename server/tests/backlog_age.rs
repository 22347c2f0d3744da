//! `oldest_queued_entry_age_seconds{shard}`: the age of the oldest entry
//! waiting in a shard's queues, next to their depth (its own test binary:
//! the metrics registry is per process).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use switchboard_proto::pb::server_frame::Body as Out;

/// The largest age over every shard's series.
fn oldest_age(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("switchboard_oldest_queued_entry_age_seconds{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

#[tokio::test]
async fn the_age_of_the_oldest_waiting_entry_is_exported_per_shard() {
    let server = TestServer::start_with(|c| c.queue_age_interval_secs = 1).await;
    let http = server.http();
    let (_, text) = http_get(&http, "/metrics").await;
    // One series per shard from the start, at 0 with nothing queued.
    let series = text
        .lines()
        .filter(|l| l.starts_with("switchboard_oldest_queued_entry_age_seconds{"))
        .count();
    assert_eq!(series, 2, "{text}");
    assert_eq!(oldest_age(&text), 0.0);

    let bob = register(&server, "+15550078001").await;
    let dave = register(&server, "+15550078002").await;
    let mut b = online(&server, &bob).await;
    b.drain().await;
    let to_dave = b.lookup(&dave.phone).await;
    assert!(matches!(
        b.send_text(&to_dave, "waiting", "for Dave").await,
        Out::SendOk(_)
    ));
    // Dave is offline: the entry ages.
    let aged = tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let age = oldest_age(&http_get(&http, "/metrics").await.1);
            if age >= 2.0 {
                return age;
            }
        }
    })
    .await
    .expect("the oldest entry's age never reached 2 s");
    assert!(aged < 60.0, "{aged}");

    // Delivered and acked: nothing waits any more.
    let mut d = online(&server, &dave).await;
    assert_eq!(message_ids(&d.drain().await), vec!["waiting"]);
    // Bob acks the ✓✓ receipt that took its place in his queue.
    b.await_delivered(1).await;
    tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if oldest_age(&http_get(&http, "/metrics").await.1) == 0.0 {
                return;
            }
        }
    })
    .await
    .expect("the age stayed up after the queue emptied");
}
