//! `sbchat chat` end to end against a real server, driven through pipes as
//! a script would (standard input is not a terminal, so the line editor
//! falls back to plain lines): local commands, timestamps, oversized lines,
//! and which messages are shown in full; plus how copies sent by another
//! device of the account name the peer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

const ALICE: &str = "+15550006001";
const BOB: &str = "+15550006002";
const CAROL: &str = "+15550006003";

/// "HH:MM " at the start of a line.
fn starts_with_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 6
        && b[..2].iter().all(u8::is_ascii_digit)
        && b[2] == b':'
        && b[3..5].iter().all(u8::is_ascii_digit)
        && b[5] == b' '
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_has_commands_timestamps_and_shows_only_its_conversation() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;
    let carol = env.register("carol", CAROL).await;

    let mut chat = env.chat(&alice, BOB, false);
    chat.stderr_until(|l| l.contains("chatting with")).await;

    // Local commands are handled here and never sent.
    chat.type_line("/help").await;
    let help = chat.stderr_until(|l| l.contains("/quit")).await;
    assert!(help.iter().any(|l| l.contains("/help")), "{help:#?}");
    chat.type_line("/bogus").await;
    let refused = chat.stderr_until(|l| l.contains("/bogus")).await;
    let line = refused.last().unwrap();
    assert!(line.contains("unknown command"), "{line}");
    assert!(line.contains("/help"), "{line}");

    // A line starting with "//" sends it with one slash.
    chat.type_line("//shrug").await;
    let marks = chat.stdout_until(|l| l.contains("✓ /shrug")).await;
    assert!(starts_with_time(marks.last().unwrap()), "{marks:#?}");

    // The peer's messages in full, with the local time.
    let run = env.run(&bob, &["send", ALICE, "hello alice"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let seen = chat.stdout_until(|l| l.contains("hello alice")).await;
    let line = seen.last().unwrap();
    assert!(starts_with_time(line), "{line}");
    assert!(line.ends_with(&format!("{BOB}: hello alice")), "{line}");

    // Someone else's: a one-line notice, the text left for later.
    let run = env.run(&carol, &["send", ALICE, "psst secret"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let seen = chat
        .stdout_until(|l| l.contains(&format!("new message from {CAROL}")))
        .await;
    assert!(seen.iter().all(|l| !l.contains("psst secret")), "{seen:#?}");
    assert!(starts_with_time(seen.last().unwrap()), "{seen:#?}");

    chat.type_line("/quit").await;
    let (code, out, err) = chat.finish().await;
    assert_eq!(code, 0, "{out:#?} {err:#?}");
    assert!(
        out.iter().chain(&err).all(|l| !l.contains("psst secret")),
        "{out:#?} {err:#?}"
    );

    // Bob got only the real message; Carol's waits for Alice's `recv`.
    let run = env.run(&bob, &["recv", "--timeout", "3"], None).await;
    let texts: Vec<&str> = run
        .events("message")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["/shrug"], "{run:?}");
    let run = env.run(&alice, &["recv", "--timeout", "3"], None).await;
    let texts: Vec<&str> = run
        .events("message")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["psst secret"], "{run:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_refuses_an_oversized_line_without_echoing_it() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;

    let mut chat = env.chat(&alice, BOB, false);
    chat.stderr_until(|l| l.contains("chatting with")).await;
    let big = "y".repeat(2 * 1024 * 1024);
    chat.type_line(&big).await;
    let refused = chat.stderr_until(|l| l.contains("not sent")).await;
    let line = refused.last().unwrap();
    assert!(line.len() < 200, "echoed {} bytes", line.len());
    assert!(line.contains("64 KiB"), "{line}");
    // The chat goes on.
    chat.type_line("small one").await;
    chat.stdout_until(|l| l.contains("✓ small one")).await;
    chat.type_line("/quit").await;
    let (code, out, err) = chat.finish().await;
    assert_eq!(code, 0, "{err:#?}");
    assert!(
        out.iter().chain(&err).all(|l| !l.contains("yyyyyyyy")),
        "the text was echoed"
    );

    let run = env.run(&bob, &["recv", "--timeout", "3"], None).await;
    let texts: Vec<&str> = run
        .events("message")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["small one"], "{run:?}");
    env.stop().await;
}

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

    // In a chat with Carol, a copy to Bob is a notice naming Bob.
    let mut chat = env.chat(&laptop, CAROL, false);
    chat.stderr_until(|l| l.contains("chatting with")).await;
    let run = env.run(&alice, &["send", BOB, "elsewhere"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let seen = chat.stdout_until(|l| l.contains(BOB)).await;
    assert!(seen.iter().all(|l| !l.contains("elsewhere")), "{seen:#?}");
    chat.type_line("/quit").await;
    let (code, _, err) = chat.finish().await;
    assert_eq!(code, 0, "{err:#?}");
    drop((bob, carol));
    env.stop().await;
}
