//! How `sbchat recv` names the peer of a copy sent by another device of
//! the account, end to end against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

const ALICE: &str = "+15550006001";
const BOB: &str = "+15550006002";
const CAROL: &str = "+15550006003";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_from_another_device_name_the_peer_by_phone() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;
    let carol = env.register("carol", CAROL).await;
    let laptop = env.link(&alice, "laptop").await;

    // The laptop has heard from Bob once, in an earlier run.
    let run = env.run(&bob, &["send", ALICE, "hi both"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env
        .run(&laptop, &["recv", "--timeout", "10", "--count", "1"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");

    // The phone sends to Bob; the laptop's `recv` names Bob by phone.
    let run = env
        .run(&alice, &["send", BOB, "from the phone"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env
        .run_text(&laptop, &["recv", "--timeout", "10", "--count", "1"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("→ {BOB}: from the phone (from your other device)")),
        "{run:?}"
    );
    let run = env.run(&alice, &["send", BOB, "again"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env
        .run(&laptop, &["recv", "--timeout", "10", "--count", "1"], None)
        .await;
    let msg = run.events("message")[0];
    assert_eq!(msg["to"], BOB, "{run:?}");
    assert_eq!(msg["text"], "again", "{run:?}");

    drop((bob, carol));
    env.stop().await;
}
