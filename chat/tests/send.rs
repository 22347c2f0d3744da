//! `sbchat send` end to end against a real server: waiting for this
//! message's ✓✓ among older receipts, the text from stdin or a file, the
//! size limit, and how a refusal is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

const ALICE: &str = "+15550005001";
const BOB: &str = "+15550005002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_delivered_waits_for_this_message_among_older_receipts() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;

    // An older message whose ✓✓ is still queued for Alice.
    let run = env.run(&alice, &["send", BOB, "older"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let older = run.events("sent")[0]["client_msg_id"].clone();
    let run = env
        .run(&bob, &["recv", "--timeout", "10", "--count", "1"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");

    // With Bob online, the new send must wait for its own ✓✓.
    let bob_recv = env.run(&bob, &["recv", "--timeout", "20", "--count", "1"], None);
    let send = env.run(
        &alice,
        &["send", BOB, "newer", "--wait-delivered", "--timeout", "20"],
        None,
    );
    let (recv, send) = tokio::join!(bob_recv, send);
    assert_eq!(send.code, 0, "{send:?}");
    let id = send.events("sent")[0]["client_msg_id"].clone();
    let delivered = send.events("delivered");
    assert_eq!(delivered.len(), 1, "{send:?}");
    assert_eq!(delivered[0]["client_msg_id"], id, "{send:?}");
    assert_eq!(recv.code, 0, "{recv:?}");
    assert_eq!(recv.events("message")[0]["text"], "newer", "{recv:?}");

    // The older receipt is not lost: `recv` still shows it.
    let run = env.run(&alice, &["recv", "--timeout", "5"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let receipts = run.events("receipt");
    assert!(
        receipts.iter().any(|r| r["client_msg_ids"][0] == older),
        "{run:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_comes_from_stdin_or_a_file_up_to_the_limit() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;

    // `-` reads standard input (one trailing newline dropped).
    let run = env
        .run(&alice, &["send", BOB, "-"], Some(b"line one\nline two\n"))
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    // No text with a piped standard input reads it too.
    let run = env.run(&alice, &["send", BOB], Some(b"piped")).await;
    assert_eq!(run.code, 0, "{run:?}");
    // --file PATH.
    let file = env.dir.path().join("note.txt");
    std::fs::write(&file, "from a file\n").unwrap();
    let run = env
        .run(
            &alice,
            &["send", BOB, "--file", file.to_str().unwrap()],
            None,
        )
        .await;
    assert_eq!(run.code, 0, "{run:?}");

    let run = env
        .run(&bob, &["recv", "--timeout", "10", "--count", "3"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let texts: Vec<&str> = run
        .events("message")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["line one\nline two", "piped", "from a file"]);

    // Too long, empty, not UTF-8, or two sources: refused locally (usage).
    let big = vec![b'x'; 70 * 1024];
    std::fs::write(&file, &big).unwrap();
    let run = env
        .run_text(
            &alice,
            &["send", BOB, "--file", file.to_str().unwrap()],
            None,
        )
        .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("64 KiB"), "{run:?}");
    assert!(run.stderr.lines().count() == 1, "{run:?}");
    let run = env.run_text(&alice, &["send", BOB, "-"], Some(&big)).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("64 KiB"), "{run:?}");
    let run = env.run_text(&alice, &["send", BOB, "-"], Some(b"")).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("empty"), "{run:?}");
    let run = env
        .run_text(&alice, &["send", BOB, "-"], Some(b"\xff\xfe"))
        .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("UTF-8"), "{run:?}");
    let run = env
        .run_text(
            &alice,
            &["send", BOB, "hi", "--file", file.to_str().unwrap()],
            None,
        )
        .await;
    assert_eq!(run.code, 2, "{run:?}");

    // --help states the limit and the ways to give the text.
    let run = env.run_text(&alice, &["send", "--help"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("64 KiB"), "{}", run.stdout);
    assert!(run.stdout.contains("--file"), "{}", run.stdout);
    assert!(run.stdout.contains("standard input"), "{}", run.stdout);

    // Nothing refused reached Bob.
    let run = env.run(&bob, &["recv", "--timeout", "3"], None).await;
    assert!(run.events("message").is_empty(), "{run:?}");
    env.stop().await;
}

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
