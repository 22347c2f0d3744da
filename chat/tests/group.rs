//! `sbchat group …` and `send --group` end to end against a real server:
//! creating a group prints its id, members read its messages with group
//! and sender, the sender sees the "delivered n/m, read n/m" tally,
//! permission refusals are clear errors with their code, and leaving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

const ALICE: &str = "+15550009001";
const BOB: &str = "+15550009002";
const CAROL: &str = "+15550009003";
const DAVE: &str = "+15550009004";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_created_used_and_left_from_the_command_line() {
    let env = Env::start().await;
    let alice = env.register("alice", ALICE).await;
    let bob = env.register("bob", BOB).await;
    let carol = env.register("carol", CAROL).await;
    env.register("dave", DAVE).await;

    let run = env
        .run(
            &alice,
            &[
                "group",
                "create",
                "hikers",
                BOB,
                CAROL,
                "--description",
                "Sundays",
            ],
            None,
        )
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let created = run.events("group_created")[0];
    let id = created["group_id"].as_u64().expect("a group id");
    assert_eq!(created["members"].as_array().unwrap().len(), 3, "{run:?}");
    let gid = id.to_string();
    // Text mode prints the id too.
    let run = env.run_text(&alice, &["group", "info", &gid], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("group {gid}: hikers — Sundays")),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!("{ALICE} (creator)")),
        "{run:?}"
    );

    let run = env
        .run(&alice, &["send", "--group", &gid, "hello hikers"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let sent = run.events("sent")[0];
    let msg = sent["client_msg_id"].as_str().unwrap().to_owned();
    assert_eq!(sent["group_id"], id);

    // Members read it with the group and the sender; Bob marks it read.
    let run = env
        .run(
            &bob,
            &["recv", "--timeout", "15", "--count", "1", "--read"],
            None,
        )
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let m = run.events("group_message")[0];
    assert_eq!(
        (m["group_id"].as_u64(), m["from"].as_str()),
        (Some(id), Some(ALICE))
    );
    assert_eq!(m["text"], "hello hikers");
    assert_eq!(run.events("group_changed")[0]["kind"], "created", "{run:?}");
    let run = env
        .run_text(&carol, &["recv", "--timeout", "15", "--count", "1"], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("[group {gid}] {ALICE}: hello hikers")),
        "{run:?}"
    );

    // The sender sees the tally: both members have it, Bob read it.
    let run = env.run(&alice, &["recv", "--timeout", "4"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let last = run
        .events("group_receipts")
        .into_iter()
        .rfind(|t| t["client_msg_id"] == msg.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no tally: {run:?}"));
    assert_eq!(
        (&last["delivered"], &last["read"], &last["members"]),
        (&2.into(), &1.into(), &2.into()),
        "{run:?}"
    );

    // Carol is a member, not an admin: a clear refusal with its code.
    let run = env.run(&carol, &["group", "add", &gid, DAVE], None).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert_eq!(run.events("error")[0]["code"], "NOT_GROUP_ADMIN", "{run:?}");
    let run = env
        .run_text(&carol, &["group", "add", &gid, DAVE], None)
        .await;
    assert!(run.stderr.contains("only group admins"), "{run:?}");

    // Alice promotes Carol, who can then add Dave.
    let run = env
        .run(&alice, &["group", "promote", &gid, CAROL], None)
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env.run(&carol, &["group", "add", &gid, DAVE], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.events("group_changed")[0]["members"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Carol leaves; her list is empty, Alice's has the group with 3.
    let run = env.run(&carol, &["group", "leave", &gid], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env.run(&carol, &["group", "list"], None).await;
    assert_eq!(
        run.events("groups")[0]["groups"].as_array().unwrap().len(),
        0
    );
    let run = env.run(&alice, &["group", "list"], None).await;
    let groups = run.events("groups")[0]["groups"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        (
            groups[0]["group_id"].as_u64(),
            groups[0]["members"].as_u64()
        ),
        (Some(id), Some(3))
    );

    // A non-member cannot send to it.
    let run = env
        .run(&carol, &["send", "--group", &gid, "still here?"], None)
        .await;
    assert_ne!(run.code, 0, "{run:?}");
    assert_eq!(run.events("error")[0]["code"], "UNKNOWN_GROUP", "{run:?}");
    env.stop().await;
}
