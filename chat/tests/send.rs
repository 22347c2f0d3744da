//! `sbchat send` end to end against a real server: how a refusal is
//! reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

const ALICE: &str = "+15550005001";
const BOB: &str = "+15550005002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_send_is_reported_once() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;

    let run = env
        .run_text(&alice, &["send", "+15550005999", "anyone?"], None)
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(
        lines[0].to_lowercase().matches("unknown").count(),
        1,
        "the reason is repeated: {lines:#?}"
    );

    let run = env
        .run(&alice, &["send", "+15550005999", "anyone?"], None)
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json.len(), 1, "{run:?}");
    assert_eq!(run.json[0]["code"], "UNKNOWN_USER");
    let error = run.json[0]["error"].as_str().unwrap();
    assert_eq!(
        error.to_lowercase().matches("unknown").count(),
        1,
        "{error}"
    );

    // A refusal whose reason the SDK also gives as its cause: said once.
    let long = "z".repeat(70_000);
    let run = env.run_text(&alice, &["send", BOB, &long], None).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_eq!(run.stderr.matches("70000").count(), 1, "{}", run.stderr);
    let run = env.run(&alice, &["send", BOB, &long], None).await;
    assert_ne!(run.code, 0, "{run:?}");
    let error = run.json[0]["error"].as_str().unwrap();
    assert_eq!(error.matches("70000").count(), 1, "{error}");
    env.stop().await;
}
