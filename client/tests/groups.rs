//! Groups through the SDK against the real server: one message sealed once
//! with the sender's Megolm key and read by every member device (the
//! sender's other devices included), keys going out pairwise before it,
//! per-member receipts and their tally, and membership changes: a removed
//! member gets nothing after its removal, a new member nothing from before
//! it joined, and the sender's key is replaced when members leave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::Path;

use bytes::Bytes;
use harness::{Peer, TestServer};
use switchboard_client::{
    Error, ErrorCode, Event, GroupChange, GroupChangeKind, GroupId, GroupRole, Seq, UserId,
};

/// A group message as a member saw it.
#[derive(Debug)]
struct Heard {
    seq: Seq,
    group_seq: u64,
    from_user: UserId,
    from_own_device: bool,
    client_msg_id: String,
    text: String,
}

/// The next group message of `group` (acknowledged).
async fn heard(peer: &mut Peer, group: GroupId) -> Heard {
    let h = peer
        .wait_for(|e| match e {
            Event::GroupMessage {
                seq,
                group_id,
                group_seq,
                from_user,
                from_own_device,
                client_msg_id,
                payload,
                ..
            } if group_id == group => Some(Heard {
                seq,
                group_seq,
                from_user,
                from_own_device,
                client_msg_id,
                text: String::from_utf8_lossy(&payload).into_owned(),
            }),
            Event::Undecryptable { reason, .. } => panic!("undecryptable: {reason}"),
            _ => None,
        })
        .await;
    peer.client.ack([h.seq]).await.unwrap();
    h
}

/// The next change of `group`.
async fn changed(peer: &mut Peer, group: GroupId) -> (GroupChangeKind, Vec<UserId>) {
    peer.wait_for(|e| match e {
        Event::GroupChanged {
            group_id,
            kind,
            users,
            ..
        } if group_id == group => Some((kind, users)),
        _ => None,
    })
    .await
}

/// Waits for the tally of `id` to reach `delivered` and `read`.
async fn tally(peer: &mut Peer, id: &str, delivered: u32, read: u32) -> u32 {
    loop {
        let (d, r, members) = peer
            .wait_for(|e| match e {
                Event::GroupReceipts {
                    client_msg_id,
                    delivered,
                    read,
                    members,
                    ..
                } if client_msg_id == id => Some((delivered, read, members)),
                _ => None,
            })
            .await;
        if d >= delivered && r >= read {
            return members;
        }
    }
}

fn contains_in_files(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                return true;
            }
        }
    }
    false
}

async fn send(peer: &Peer, group: GroupId, text: &str) -> (String, u64) {
    let sent = peer
        .client
        .send_to_group(group, Bytes::from(text.to_owned()))
        .await
        .unwrap();
    assert_eq!(sent.group_id, Some(group));
    (sent.client_msg_id, sent.group_seq.unwrap())
}

#[tokio::test]
async fn every_member_device_reads_a_message_sealed_once_and_the_sender_sees_the_tally() {
    let server = TestServer::start().await;
    let alice = server.register("+15557000001").await;
    let bob = server.register("+15557000002").await;
    let carol = server.register("+15557000003").await;
    let mut a1 = Peer::online(&server, alice.clone()).await;
    let laptop = server.link(&a1.client).await;
    let mut a2 = Peer::online(&server, laptop).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let mut c = Peer::online(&server, carol.clone()).await;

    let group = a1
        .client
        .create_group("hikers", &[bob.user_id, carol.user_id])
        .await
        .unwrap();
    let g = group.group_id;
    assert_eq!(group.members.len(), 3);
    assert_eq!(group.members[0].role, GroupRole::Creator);
    for p in [&mut b, &mut c, &mut a2] {
        assert_eq!(changed(p, g).await.0, GroupChangeKind::Created);
    }
    assert_eq!(b.client.list_groups().await.unwrap()[0].group_id, g);

    const MARKER: &str = "okapi-93e1-group-plaintext";
    let (id, seq) = send(&a1, g, &format!("{MARKER} hello")).await;
    for p in [&mut b, &mut c] {
        let h = heard(p, g).await;
        assert_eq!(
            (h.from_user, h.group_seq, h.client_msg_id.as_str()),
            (alice.user_id, seq, id.as_str())
        );
        assert_eq!(h.text, format!("{MARKER} hello"));
        assert!(!h.from_own_device);
    }
    // Alice's laptop reads her own message too.
    let own = heard(&mut a2, g).await;
    assert!(own.from_own_device);
    assert_eq!(own.text, format!("{MARKER} hello"));

    // Both members have it: delivered 2/2; Bob reads it: read 1/2.
    assert_eq!(tally(&mut a1, &id, 2, 0).await, 2);
    b.client
        .send_group_read_receipt(g, alice.user_id, vec![id.clone()])
        .await
        .unwrap();
    tally(&mut a1, &id, 2, 1).await;

    // Bob answers; every other member device reads it.
    let (reply, _) = send(&b, g, "got it").await;
    for p in [&mut a1, &mut a2, &mut c] {
        let h = heard(p, g).await;
        assert_eq!(
            (h.from_user, h.client_msg_id.as_str()),
            (bob.user_id, reply.as_str())
        );
        assert_eq!(h.text, "got it");
    }
    // A second message from Alice reuses the key: still readable.
    let (_, seq2) = send(&a1, g, "second").await;
    assert!(seq2 > seq);
    assert_eq!(heard(&mut c, g).await.text, "second");

    // The server never held the text.
    assert!(!contains_in_files(server.data_dir(), MARKER.as_bytes()));

    // Non-members cannot send to it or read it.
    let dave = server.register("+15557000004").await;
    let d = Peer::online(&server, dave).await;
    let refused = d
        .client
        .send_to_group(g, Bytes::from_static(b"let me in"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Server(e) if e.code == ErrorCode::UnknownGroup),
        "{refused:?}"
    );
}

#[tokio::test]
async fn removed_members_get_nothing_after_and_new_members_nothing_before() {
    let server = TestServer::start().await;
    let alice = server.register("+15557100001").await;
    let bob = server.register("+15557100002").await;
    let carol = server.register("+15557100003").await;
    let dave = server.register("+15557100004").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let mut c = Peer::online(&server, carol.clone()).await;
    let mut d = Peer::online(&server, dave.clone()).await;
    let g = a
        .client
        .create_group("club", &[bob.user_id, carol.user_id])
        .await
        .unwrap()
        .group_id;
    send(&a, g, "before").await;
    assert_eq!(heard(&mut c, g).await.text, "before");
    assert_eq!(heard(&mut b, g).await.text, "before");

    // Carol is removed, Dave added; Alice's client sees both changes (and
    // replaces its key for the removal) before sending again.
    let after = a
        .client
        .change_group(g, GroupChange::Remove(carol.user_id))
        .await
        .unwrap();
    assert!(after.members.iter().all(|m| m.user_id != carol.user_id));
    a.client
        .change_group(g, GroupChange::Add(vec![dave.user_id]))
        .await
        .unwrap();
    assert_eq!(changed(&mut a, g).await.0, GroupChangeKind::Created);
    assert_eq!(
        changed(&mut a, g).await,
        (GroupChangeKind::Removed, vec![carol.user_id])
    );
    assert_eq!(
        changed(&mut a, g).await,
        (GroupChangeKind::Added, vec![dave.user_id])
    );
    send(&a, g, "after").await;

    // Bob and Dave read it; Dave saw nothing from before he joined.
    assert_eq!(heard(&mut b, g).await.text, "after");
    let first_for_dave = heard(&mut d, g).await;
    assert_eq!(first_for_dave.text, "after");
    // Carol learns she was removed and gets nothing more.
    assert_eq!(
        changed(&mut c, g).await,
        (GroupChangeKind::Removed, vec![carol.user_id])
    );
    let (id, _) = send(&b, g, "from bob").await;
    assert_eq!(heard(&mut d, g).await.client_msg_id, id);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !c.drain_ready()
            .iter()
            .any(|e| matches!(e, Event::GroupMessage { .. })),
        "a removed member received a group message"
    );
    // And cannot send to it any more.
    assert!(
        c.client
            .send_to_group(g, Bytes::from_static(b"x"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_members_new_device_reads_what_is_sent_after_it_was_linked() {
    let server = TestServer::start().await;
    let alice = server.register("+15557200001").await;
    let bob = server.register("+15557200002").await;
    let mut a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let g = a
        .client
        .create_group("devices", &[bob.user_id])
        .await
        .unwrap()
        .group_id;
    send(&a, g, "to bob's phone").await;
    assert_eq!(heard(&mut b, g).await.text, "to bob's phone");
    // Bob links a laptop; once it has published its keys, Alice's client
    // hears of it in the group's order and gives it her key.
    let laptop = server.link(&b.client).await;
    let mut l = Peer::online(&server, laptop).await;
    loop {
        let (kind, users) = changed(&mut a, g).await;
        if kind == GroupChangeKind::MemberDevicesChanged {
            assert_eq!(users, vec![bob.user_id]);
            break;
        }
    }
    send(&a, g, "to all of bob's devices").await;
    assert_eq!(heard(&mut l, g).await.text, "to all of bob's devices");
    assert_eq!(heard(&mut b, g).await.text, "to all of bob's devices");
}

#[tokio::test]
async fn the_tally_counts_each_member_once_with_members_online_and_offline() {
    let server = TestServer::start().await;
    let mut creds = Vec::new();
    for i in 0..10 {
        creds.push(server.register(&format!("+155573000{i:02}")).await);
    }
    let mut sender = Peer::online(&server, creds[0].clone()).await;
    // Members 1..=5 online now (member 1 with a second device, so its
    // receipts come twice and must count once); 6..=9 offline.
    let mut online = Vec::new();
    for c in &creds[1..=5] {
        online.push(Peer::online(&server, c.clone()).await);
    }
    let second = server.link(&online[0].client).await;
    online.push(Peer::online(&server, second).await);
    let others: Vec<UserId> = creds[1..].iter().map(|c| c.user_id).collect();
    let g = sender
        .client
        .create_group("ten", &others)
        .await
        .unwrap()
        .group_id;
    let (id, _) = send(&sender, g, "roll call").await;
    for p in &mut online {
        assert_eq!(heard(p, g).await.text, "roll call");
    }
    assert_eq!(tally(&mut sender, &id, 5, 0).await, 9);
    // Two read it (one of them from both devices).
    for p in [&online[0], &online[5], &online[1]] {
        p.client
            .send_group_read_receipt(g, creds[0].user_id, vec![id.clone()])
            .await
            .unwrap();
    }
    tally(&mut sender, &id, 5, 2).await;
    // The offline members come online and receive it: 9 of 9.
    for c in &creds[6..] {
        // Not `online`: its drain waits for the message to be acked.
        let mut p = Peer::start(harness::client_config(server.endpoint()), c.clone()).await;
        assert_eq!(heard(&mut p, g).await.text, "roll call");
    }
    assert_eq!(tally(&mut sender, &id, 9, 2).await, 9);
    // Never more than the members, however many receipts repeat.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for e in sender.drain_ready() {
        if let Event::GroupReceipts {
            delivered,
            read,
            members,
            ..
        } = e
        {
            assert!(
                delivered <= members && read <= delivered,
                "{delivered} {read} {members}"
            );
        }
    }
}

#[tokio::test]
async fn a_member_without_keys_is_left_out_and_does_not_hold_the_message_back() {
    let server = TestServer::start().await;
    let alice = server.register("+15557400001").await;
    let bob = server.register("+15557400002").await;
    // Registered, but its client never published keys.
    let carol = server.register_without_keys("+15557400003").await;
    let a = Peer::online(&server, alice.clone()).await;
    let mut b = Peer::online(&server, bob.clone()).await;
    let g = a
        .client
        .create_group("keyless", &[bob.user_id, carol.user_id])
        .await
        .unwrap()
        .group_id;
    // ✓ after the client gave up waiting for Carol's keys (about 5 s).
    send(&a, g, "for those who can read it").await;
    assert_eq!(heard(&mut b, g).await.text, "for those who can read it");
}
