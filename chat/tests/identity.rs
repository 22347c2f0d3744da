//! `sbchat` and identity (issue #18 §3): the server key pinned at
//! registration (or given with `--server-key`), and a contact's device
//! changes shown by `recv --json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;

/// The server's static key, as a handshake shows it, in hex.
async fn server_key(env: &Env) -> String {
    let conn = switchboard_client::Connection::connect(
        &env.tcp.parse().unwrap(),
        &switchboard_client::ConnectOptions::default(),
    )
    .await
    .unwrap();
    hex::encode(conn.server_public_key())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_key_is_pinned_at_registration_and_a_changed_one_refused() {
    let a = Env::start().await;
    let impostor = Env::start().await;
    let (a_key, impostor_key) = (server_key(&a).await, server_key(&impostor).await);
    let home = a.register("alice", "+15553100001").await;
    let account: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("account.json")).unwrap()).unwrap();
    assert_eq!(account["server_key"], a_key.as_str());

    // The real server is fine; another one (another key, as a man in the
    // middle would have) is refused before the credential is sent.
    let run = a.run(&home, &["recv", "--timeout", "1"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = impostor.run(&home, &["recv", "--timeout", "5"], None).await;
    assert_eq!(run.code, 1, "{run:?}");
    let error = run.events("error");
    assert_eq!(error.len(), 1, "{run:?}");
    let text = error[0]["error"].as_str().unwrap();
    assert!(text.contains("server key"), "{text}");

    // `--server-key` pins one explicitly: a wrong one is refused at once.
    let bob = a.home("bob");
    let args = ["--server-key", &impostor_key, "register", "+15553100002"];
    let run = a.run(&bob, &args, None).await;
    assert_eq!(run.code, 1, "{run:?}");
    let text = run.events("error")[0]["error"].as_str().unwrap().to_owned();
    assert!(text.contains("server key mismatch"), "{text}");
    let run = a.run(&bob, &["--server-key", "abc", "whoami"], None).await;
    assert_eq!(run.code, 2, "{run:?}");
    let args = ["--server-key", &a_key, "register", "+15553100002"];
    let run = a.run(&bob, &args, None).await;
    assert_eq!(run.code, 0, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_shows_a_contacts_device_change_as_an_event() {
    let env = Env::start().await;
    let alice = env.register("alice", "+15553200001").await;
    let bob = env.register("bob", "+15553200002").await;
    let run = env.run(&alice, &["send", "+15553200002", "hi"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env.run(&bob, &["recv", "--count", "1"], None).await;
    assert_eq!(run.code, 0, "{run:?}");

    // Bob moves to a new phone and writes first.
    let bob_new = env.register("bob-new-phone", "+15553200002").await;
    let args = ["send", "+15553200001", "new phone"];
    let run = env.run(&bob_new, &args, None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = env.run(&alice, &["recv", "--timeout", "3"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let changed = run.events("contact_devices_changed");
    assert_eq!(changed.len(), 1, "{run:?}");
    assert_eq!(changed[0]["phone"], "+15553200002");
    assert_eq!(changed[0]["added"], serde_json::json!([2]));
    assert_eq!(changed[0]["removed"], serde_json::json!([1]));
    assert_eq!(run.events("safety_number_changed").len(), 1, "{run:?}");
    assert_eq!(run.events("message")[0]["text"], "new phone");
}
