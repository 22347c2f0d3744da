//! Groups against the real server (PROTOCOL.md §11.24): management and its
//! permission checks, one order for every member, payloads stored once,
//! the member limit under concurrent adds, receipts per member. The test
//! server runs two shards, and members are spread over both, so group mail
//! between shards is exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_server::router::shard_of_user;
use switchboard_server::store::{DeviceKey, EmbeddedStore, PayloadId, Payloads, Queues};

fn create(name: &str, members: &[&Account]) -> In {
    In::CreateGroup(pb::CreateGroup {
        name: name.into(),
        members: members.iter().map(|a| a.user_id).collect(),
        ..Default::default()
    })
}

fn change(group_id: u64, change: pb::change_group::Change) -> In {
    In::ChangeGroup(pb::ChangeGroup {
        group_id,
        change: Some(change),
    })
}

fn post(group_id: u64, id: &str, text: &str) -> In {
    In::SendGroup(pb::SendGroup {
        group_id,
        client_msg_id: id.into(),
        payload: text.as_bytes().to_vec().into(),
        first_attempt: false,
    })
}

fn info(out: Out) -> pb::GroupInfo {
    match out {
        Out::GroupInfo(i) => i,
        other => panic!("expected GroupInfo, got {other:?}"),
    }
}

/// What a member device saw of a group, in order: (group_seq, what).
fn group_view(entries: &[pb::QueueEntry], group: u64) -> Vec<(u64, String)> {
    entries
        .iter()
        .filter_map(|e| match &e.body {
            Some(pb::queue_entry::Body::GroupMessage(m)) if m.group_id == group => Some((
                m.group_seq,
                format!(
                    "msg {} {}",
                    m.client_msg_id,
                    String::from_utf8_lossy(&m.payload)
                ),
            )),
            Some(pb::queue_entry::Body::GroupEvent(ev)) if ev.group_id == group => Some((
                ev.group_seq,
                format!("event {:?} {:?}", ev.kind(), ev.users),
            )),
            _ => None,
        })
        .collect()
}

/// Registers `n` users (n >= 2) whose ids fall on both shards.
async fn users(server: &TestServer, prefix: &str, n: usize) -> Vec<Account> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(register(server, &format!("{prefix}{i:04}")).await);
    }
    let shard = |a: &Account| shard_of_user(a.user_id, 2);
    let mut extra = n;
    while out.iter().all(|a| shard(a) == shard(&out[0])) {
        let other = register(server, &format!("{prefix}{extra:04}")).await;
        extra += 1;
        if shard(&other) != shard(&out[0]) {
            out[n - 1] = other;
        }
    }
    out
}

#[tokio::test]
async fn members_admins_and_outsiders_get_what_their_role_allows() {
    let server = TestServer::start().await;
    let u = users(&server, "+1555100", 5).await;
    let (alice, bob, carol, dave, eve) = (&u[0], &u[1], &u[2], &u[3], &u[4]);
    let mut a = online(&server, alice).await;
    let mut b = online(&server, bob).await;
    let mut d = online(&server, dave).await;
    let mut e = online(&server, eve).await;
    for c in [&mut a, &mut b, &mut d, &mut e] {
        c.drain().await;
    }
    let created = info(
        a.request(In::CreateGroup(pb::CreateGroup {
            name: "hikers".into(),
            members: vec![bob.user_id, carol.user_id, bob.user_id, alice.user_id],
            info_admin_only: true,
            ..Default::default()
        }))
        .await,
    );
    let g = created.group_id;
    assert_eq!(created.seq, 1);
    let roles: Vec<(u64, i32)> = created
        .members
        .iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            (alice.user_id, pb::GroupRole::Creator as i32),
            (bob.user_id, pb::GroupRole::Member as i32),
            (carol.user_id, pb::GroupRole::Member as i32),
        ],
        "creator first, duplicates and the creator among members ignored"
    );
    assert_eq!(created.members[1].phone, bob.phone);
    // Bob hears of the group in its order.
    let ev = b.next_entry().await;
    let Some(pb::queue_entry::Body::GroupEvent(ev)) = ev.body else {
        panic!("expected the creation event, got {ev:?}");
    };
    assert_eq!((ev.group_seq, ev.kind()), (1, pb::GroupEventKind::Created));
    assert_eq!(ev.info.as_ref().map(|i| i.name.as_str()), Some("hikers"));

    use pb::change_group::Change;
    // A member may not manage the group, nor edit admin-only info.
    for refused in [
        Change::Add(pb::GroupUsers {
            users: vec![dave.user_id],
        }),
        Change::Remove(carol.user_id),
        Change::Promote(carol.user_id),
        Change::Demote(alice.user_id),
        Change::Edit(pb::GroupInfoEdit {
            name: Some("mine".into()),
            ..Default::default()
        }),
    ] {
        let out = b.request(change(g, refused.clone())).await;
        assert_eq!(
            error_code(&out),
            pb::ErrorCode::NotGroupAdmin,
            "{refused:?}: {out:?}"
        );
    }
    // An outsider can neither read, post nor change, and cannot tell a
    // group it is not in from one that does not exist.
    for req in [
        In::GetGroup(pb::GetGroup { group_id: g }),
        post(g, "x1", "let me in"),
        change(g, Change::Leave(pb::LeaveGroup {})),
        In::GetGroup(pb::GetGroup { group_id: g ^ 1 }),
    ] {
        let out = d.request(req).await;
        assert_eq!(error_code(&out), pb::ErrorCode::UnknownGroup, "{out:?}");
    }
    // The creator promotes Bob; Bob adds Dave and Eve.
    info(a.request(change(g, Change::Promote(bob.user_id))).await);
    let added = info(
        b.request(change(
            g,
            Change::Add(pb::GroupUsers {
                users: vec![dave.user_id, eve.user_id],
            }),
        ))
        .await,
    );
    assert_eq!(added.members.len(), 5);
    assert_eq!(added.seq, 3);
    assert!(added.members[3..].iter().all(|m| m.joined_seq == 3));
    // Nobody removes or demotes the creator, not even an admin.
    for refused in [Change::Remove(alice.user_id), Change::Demote(alice.user_id)] {
        let out = b.request(change(g, refused)).await;
        assert_eq!(error_code(&out), pb::ErrorCode::NotGroupAdmin);
    }
    // Dave sees the group from its join on: nothing before.
    let ev = d.next_entry().await;
    let Some(pb::queue_entry::Body::GroupEvent(ev)) = ev.body else {
        panic!("expected the add event, got {ev:?}");
    };
    assert_eq!((ev.group_seq, ev.kind()), (3, pb::GroupEventKind::Added));
    match d.request(In::ListGroups(pb::ListGroups {})).await {
        Out::GroupList(l) => {
            assert_eq!(l.groups.len(), 1);
            assert_eq!(l.groups[0].group_id, g);
            assert_eq!(l.groups[0].members, 5);
        }
        other => panic!("{other:?}"),
    }
    // Unregistered users cannot be added; nothing changes.
    let out = b
        .request(change(
            g,
            Change::Add(pb::GroupUsers {
                users: vec![0x1234_5678],
            }),
        ))
        .await;
    assert_eq!(error_code(&out), pb::ErrorCode::BadRequest);
    // Bad names are refused.
    let out = a.request(create("", &[bob])).await;
    assert_eq!(error_code(&out), pb::ErrorCode::BadRequest);
    // The creator leaves: the oldest admin (Bob) becomes creator.
    let left = info(a.request(change(g, Change::Leave(pb::LeaveGroup {}))).await);
    assert!(left.members.is_empty(), "a leave answers without members");
    let now = info(b.request(In::GetGroup(pb::GetGroup { group_id: g })).await);
    let bob_role = now
        .members
        .iter()
        .find(|m| m.user_id == bob.user_id)
        .unwrap()
        .role;
    assert_eq!(bob_role, pb::GroupRole::Creator as i32);
    assert_eq!(now.members.len(), 4);
    let out = a.request(In::GetGroup(pb::GetGroup { group_id: g })).await;
    assert_eq!(error_code(&out), pb::ErrorCode::UnknownGroup);
    match a.request(In::ListGroups(pb::ListGroups {})).await {
        Out::GroupList(l) => assert!(l.groups.is_empty()),
        other => panic!("{other:?}"),
    }
    // Eve removed: she hears of it, and of nothing after.
    info(b.request(change(g, Change::Remove(eve.user_id))).await);
    assert!(matches!(
        b.request(post(g, "after", "not for eve")).await,
        Out::SendOk(_)
    ));
    let seen = group_view(&drain_for(&mut e, 2).await, g);
    assert_eq!(
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![3, 4, 5, 6],
        "{seen:?}"
    );
    assert!(seen.last().unwrap().1.contains("Removed"), "{seen:?}");
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), e.push())
            .await
            .is_err(),
        "a removed member got something after its removal"
    );
}

/// Waits for the answers to `n` pipelined requests (all must be SendOk),
/// keeping pushes aside.
async fn await_answers(c: &mut Raw, n: usize) {
    let mut answered = 0;
    while answered < n {
        let f = c.next().await.expect("closed while awaiting answers");
        if f.id == 0 {
            c.pushes.push_back(f);
            continue;
        }
        assert!(matches!(f.body, Some(Out::SendOk(_))), "{f:?}");
        answered += 1;
    }
}

/// What a member sees of group `g` once entry `seq` has come: its drain,
/// then live entries (a member on another shard than the group's gets its
/// entries by shard mail, applied just after the sender's ✓).
async fn read_until(c: &mut Raw, g: u64, seq: u64) -> Vec<(u64, String)> {
    let mut seen = group_view(&c.drain().await, g);
    while !seen.iter().any(|(s, _)| *s == seq) {
        let e = tokio::time::timeout(WAIT, c.next_entry())
            .await
            .expect("the group entry never came");
        seen.extend(group_view(&[e], g));
    }
    seen
}

/// Collects delivered entries until `quiet` ms pass without one.
async fn drain_for(c: &mut Raw, quiet_ms_x100: u64) -> Vec<pb::QueueEntry> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(100 * quiet_ms_x100),
            c.push(),
        )
        .await
        {
            Ok(Out::Deliver(d)) => {
                let seqs = d.entries.iter().map(|e| e.seq).collect();
                got.extend(d.entries);
                c.ack(seqs).await;
            }
            Ok(Out::UpToDate(_)) => {}
            Ok(other) => panic!("unexpected push {other:?}"),
            Err(_) => return got,
        }
    }
}

#[tokio::test]
async fn every_member_sees_one_order_while_members_post_join_and_leave() {
    let server = TestServer::start().await;
    let u = users(&server, "+1555200", 6).await;
    let mut conns = Vec::new();
    for acct in &u {
        let mut c = online(&server, acct).await;
        c.drain().await;
        conns.push(c);
    }
    // Five members; the sixth joins in the middle, the fifth is removed.
    let g = info(
        conns[0]
            .request(create("order", &[&u[1], &u[2], &u[3], &u[4]]))
            .await,
    )
    .group_id;
    use pb::change_group::Change;
    // Three members post 20 messages each without waiting, while the
    // creator adds one and removes another.
    for (k, c) in conns.iter_mut().enumerate().skip(1).take(3) {
        for i in 0..20u32 {
            c.send_frame(&pb::ClientFrame {
                id: 1000 + i,
                body: Some(post(g, &format!("m{k}-{i}"), &format!("{k}:{i}"))),
            })
            .await;
        }
    }
    info(
        conns[0]
            .request(change(
                g,
                Change::Add(pb::GroupUsers {
                    users: vec![u[5].user_id],
                }),
            ))
            .await,
    );
    info(
        conns[0]
            .request(change(g, Change::Remove(u[4].user_id)))
            .await,
    );
    for c in conns.iter_mut().skip(1).take(3) {
        await_answers(c, 20).await;
    }
    let mut views = Vec::new();
    for c in &mut conns {
        views.push(group_view(&drain_for(c, 5).await, g));
    }
    // The whole order, as the creator (there from start to end, posting
    // nothing) saw it.
    let full = &views[0];
    assert_eq!(full.len(), 1 + 60 + 2, "{full:?}");
    let seqs: Vec<u64> = full.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=63).collect::<Vec<u64>>(), "no gaps, no repeats");
    // Each sender's own messages in the order it sent them.
    for k in 1..4 {
        let mine: Vec<&String> = full
            .iter()
            .map(|(_, w)| w)
            .filter(|w| w.starts_with(&format!("msg m{k}-")))
            .collect();
        let expected: Vec<String> = (0..20).map(|i| format!("msg m{k}-{i} {k}:{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
    // Every member that stayed saw exactly this order; the posters saw
    // everything but their own messages.
    for (k, view) in views.iter().enumerate().take(4) {
        let expected: Vec<&(u64, String)> = full
            .iter()
            .filter(|(_, w)| !w.starts_with(&format!("msg m{k}-")))
            .collect();
        assert_eq!(view.iter().collect::<Vec<_>>(), expected, "member {k}");
    }
    // The removed member saw a prefix ending with its removal; the new one
    // a suffix starting with its addition.
    let removed = &views[4];
    let cut = full
        .iter()
        .position(|(_, w)| w.contains("Removed"))
        .unwrap();
    assert_eq!(removed.as_slice(), &full[..=cut]);
    let joined = &views[5];
    let from = full.iter().position(|(_, w)| w.contains("Added")).unwrap();
    assert_eq!(joined.as_slice(), &full[from..]);
}

#[tokio::test]
async fn a_group_message_is_stored_once_and_referenced_by_every_member_device() {
    let mut server = TestServer::start().await;
    let u = users(&server, "+1555300", 12).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let others: Vec<&Account> = u[1..].iter().collect();
    let g = info(a.request(create("once", &others)).await).group_id;
    let text = "x".repeat(1024);
    let sent = match a.request(post(g, "big", &text)).await {
        Out::SendOk(ok) => ok,
        other => panic!("{other:?}"),
    };
    assert_eq!(sent.group_seq, 2);
    // A retry is answered from the first, with its place in the order.
    match a.request(post(g, "big", &text)).await {
        Out::SendOk(ok) => {
            assert!(ok.duplicate);
            assert_eq!(ok.group_seq, 2);
        }
        other => panic!("{other:?}"),
    }
    // One member reads it whole.
    let mut b = online(&server, &u[1]).await;
    let got = read_until(&mut b, g, sent.group_seq).await;
    assert_eq!(got.last().unwrap(), &(2, format!("msg big {text}")));
    drop(b);
    server.stop().await;
    // In the store: one payload, and in every other member's queue a
    // reference without it.
    let store = Arc::new(EmbeddedStore::open(&server.data_dir().join("db")).unwrap());
    let payload = store
        .payload(PayloadId { owner: g, seq: 2 })
        .unwrap()
        .unwrap();
    assert!(payload.body.len() > 1024);
    let mut references = 0;
    for acct in &u[2..] {
        let entries = store
            .read_queue(
                DeviceKey {
                    user: acct.user_id,
                    device: acct.device_id,
                },
                0,
                100,
            )
            .unwrap();
        for e in entries {
            use prost::Message;
            let entry = pb::QueueEntry::decode(e.bytes.clone()).unwrap();
            if let Some(pb::queue_entry::Body::GroupMessage(m)) = entry.body {
                assert_eq!((m.group_id, m.group_seq), (g, 2));
                assert!(m.payload.is_empty(), "a queue holds a copy of the payload");
                assert!(e.bytes.len() < 64, "{} bytes per reference", e.bytes.len());
                references += 1;
            }
        }
    }
    assert_eq!(references, u.len() - 2);
}

#[tokio::test]
async fn twenty_concurrent_adds_to_a_1020_member_group_fill_it_to_exactly_1024() {
    let server = TestServer::start().await;
    let u = users(&server, "+1555400", 1040).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let initial: Vec<&Account> = u[1..1020].iter().collect();
    let created = info(a.request(create("big", &initial)).await);
    assert_eq!(created.members.len(), 1020);
    // Twenty admins, each adding one user at the same time.
    for acct in &u[1..21] {
        info(
            a.request(change(
                created.group_id,
                pb::change_group::Change::Promote(acct.user_id),
            ))
            .await,
        );
    }
    let mut tasks = Vec::new();
    for (admin, acct) in u[1..21].iter().zip(&u[1020..1040]) {
        let tcp = server.tcp();
        let admin = admin.clone();
        let user = acct.user_id;
        let g = created.group_id;
        tasks.push(tokio::spawn(async move {
            let mut c = raw_tcp(&tcp).await;
            assert!(matches!(c.auth(&admin).await, Out::AuthOk(_)));
            c.request(change(
                g,
                pb::change_group::Change::Add(pb::GroupUsers { users: vec![user] }),
            ))
            .await
        }));
    }
    let mut added = 0;
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            Out::GroupInfo(_) => added += 1,
            other => {
                assert_eq!(error_code(&other), pb::ErrorCode::GroupFull, "{other:?}");
                full += 1;
            }
        }
    }
    assert_eq!((added, full), (4, 16));
    let now = info(
        a.request(In::GetGroup(pb::GetGroup {
            group_id: created.group_id,
        }))
        .await,
    );
    assert_eq!(now.members.len(), 1024);
    // One message reaches every member device: each queue holds it.
    let sent = match a.request(post(created.group_id, "all", "hello 1024")).await {
        Out::SendOk(ok) => ok,
        other => panic!("{other:?}"),
    };
    let members: BTreeMap<u64, bool> = now.members.iter().map(|m| (m.user_id, true)).collect();
    let mut reached = 0;
    for acct in u
        .iter()
        .filter(|a| members.contains_key(&a.user_id))
        .skip(1)
    {
        let mut c = online(&server, acct).await;
        let mut seen = group_view(&c.drain().await, created.group_id);
        // A member of the other shard gets it by shard mail, applied just
        // after the ✓: it may come live, after the drain.
        while !seen.iter().any(|(s, _)| *s == sent.group_seq) {
            let Ok(e) = tokio::time::timeout(WAIT, c.next_entry()).await else {
                break;
            };
            seen.extend(group_view(&[e], created.group_id));
        }
        if seen
            .iter()
            .any(|(s, w)| *s == sent.group_seq && w == "msg all hello 1024")
        {
            reached += 1;
        }
    }
    assert_eq!(reached, 1023);
}

#[tokio::test]
async fn the_sender_gets_a_delivery_receipt_from_each_member() {
    let server = TestServer::start().await;
    let u = users(&server, "+1555500", 4).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let g = info(a.request(create("receipts", &[&u[1], &u[2], &u[3]])).await).group_id;
    let r1 = match a.request(post(g, "r1", "hi")).await {
        Out::SendOk(ok) => ok.group_seq,
        other => panic!("{other:?}"),
    };
    // Two members come online and receive it; the third stays offline.
    for acct in &u[1..3] {
        let mut c = online(&server, acct).await;
        read_until(&mut c, g, r1).await;
    }
    let mut from = Vec::new();
    while from.len() < 2 {
        if let Some(pb::queue_entry::Body::Receipt(r)) = a.next_entry().await.body {
            assert_eq!(r.group_id, g);
            assert_eq!(r.kind(), pb::ReceiptKind::Delivered);
            assert_eq!(r.client_msg_ids, vec!["r1".to_string()]);
            from.push(r.from_user);
        }
    }
    from.sort_unstable();
    let mut expected = vec![u[1].user_id, u[2].user_id];
    expected.sort_unstable();
    assert_eq!(from, expected);
}

#[tokio::test]
async fn a_payload_is_collected_once_its_entries_have_expired() {
    let mut server = TestServer::start_with(|c| {
        c.queue_ttl_secs = 1;
        c.sweep_interval_secs = 1;
    })
    .await;
    let u = users(&server, "+1555600", 3).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let g = info(a.request(create("ttl", &[&u[1], &u[2]])).await).group_id;
    let sent = match a.request(post(g, "old", "stale")).await {
        Out::SendOk(ok) => ok,
        other => panic!("{other:?}"),
    };
    // Waiting for the TTL and a sweep to pass is the point of this test.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    // The members never see it.
    let mut b = online(&server, &u[1]).await;
    assert!(
        group_view(&b.drain().await, g)
            .iter()
            .all(|(_, w)| !w.contains("stale"))
    );
    drop((a, b));
    // The sweep (every second) deletes the payload; on a loaded machine it
    // may take a few: look, and if it is still there, run a while longer.
    let id = PayloadId {
        owner: g,
        seq: sent.group_seq,
    };
    let started = std::time::Instant::now();
    loop {
        server.stop().await;
        let stored = EmbeddedStore::open(&server.data_dir().join("db"))
            .unwrap()
            .payload(id)
            .unwrap();
        if stored.is_none() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the expired payload is still stored"
        );
        server.restart().await;
        tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    }
}

/// kill -9 the real binary right after the ✓ of a message to 1,024
/// members, while its fan-out to the other shard may still be on its way:
/// after a restart every member has it exactly once.
#[tokio::test]
async fn sigkill_in_the_middle_of_a_1024_member_fan_out_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--shards",
        "2",
        "--code-requests-per-ip-per-hour",
        "1000000",
    ];
    let mut p = spawn_server(dir.path(), &flags).await;
    let mut u = Vec::with_capacity(1024);
    for i in 0..1024 {
        u.push(register_at(&p.tcp, dir.path(), &format!("+1555700{i:04}")).await);
    }
    let mut a = raw_tcp(&p.tcp).await;
    assert!(matches!(a.auth(&u[0]).await, Out::AuthOk(_)));
    let others: Vec<&Account> = u[1..].iter().collect();
    let g = info(a.request(create("crash", &others)).await).group_id;
    let sent = match a.request(post(g, "crash-1", "survives")).await {
        Out::SendOk(ok) => ok,
        other => panic!("{other:?}"),
    };
    // The instant the ✓ arrived, kill -9 the server.
    p.child.start_kill().unwrap();
    p.child.wait().await.unwrap();
    drop(a);

    let p2 = spawn_server(dir.path(), &flags).await;
    // The app, unsure, sends again under the same id: a duplicate.
    let mut a = raw_tcp(&p2.tcp).await;
    assert!(matches!(a.auth(&u[0]).await, Out::AuthOk(_)));
    match a.request(post(g, "crash-1", "survives")).await {
        Out::SendOk(ok) => {
            assert!(ok.duplicate);
            assert_eq!(ok.group_seq, sent.group_seq);
        }
        other => panic!("{other:?}"),
    }
    for acct in &u[1..] {
        let mut c = raw_tcp(&p2.tcp).await;
        assert!(matches!(c.auth(acct).await, Out::AuthOk(_)));
        let mut got = group_view(&c.drain().await, g);
        // Mail left in the store at the crash is posted again at start; it
        // may reach this member's shard after the drain.
        while !got.iter().any(|(s, _)| *s == sent.group_seq) {
            let e = tokio::time::timeout(WAIT, c.next_entry())
                .await
                .expect("a member never got the message");
            got.extend(group_view(&[e], g));
        }
        let copies = got.iter().filter(|(s, _)| *s == sent.group_seq).count();
        assert_eq!(copies, 1, "member {}: {got:?}", acct.phone);
        assert_eq!(
            got.iter().find(|(s, _)| *s == sent.group_seq).unwrap().1,
            "msg crash-1 survives"
        );
    }
    // By now any mail posted again has long been handled: nobody got a
    // second copy since.
    for acct in [&u[1], &u[2], &u[1022], &u[1023]] {
        let mut c = raw_tcp(&p2.tcp).await;
        assert!(matches!(c.auth(acct).await, Out::AuthOk(_)));
        let again = group_view(&c.drain().await, g);
        assert!(again.is_empty(), "member {}: {again:?}", acct.phone);
    }
}

#[tokio::test]
async fn a_payload_is_deleted_once_every_member_device_has_acked_it() {
    let mut server = TestServer::start().await;
    let u = users(&server, "+1555800", 5).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let others: Vec<&Account> = u[1..].iter().collect();
    let g = info(a.request(create("gc", &others)).await).group_id;
    let collected = |server: &TestServer| {
        let http = server.http();
        async move {
            let (_, text) = http_get(&http, "/metrics").await;
            metric(
                &text,
                "switchboard_group_payloads_collected_total{reason=\"released\"}",
            )
            .unwrap_or_default()
        }
    };
    let unread = match a.request(post(g, "unread", "one member is away")).await {
        Out::SendOk(ok) => ok.group_seq,
        other => panic!("{other:?}"),
    };
    // Members 1-3 read it; member 4 stays offline.
    for acct in &u[1..4] {
        let mut c = online(&server, acct).await;
        read_until(&mut c, g, unread).await;
    }
    // A message to a group of the members who come online, which all of
    // them read.
    let g2 = info(
        a.request(create("gc2", &u[1..4].iter().collect::<Vec<_>>()))
            .await,
    )
    .group_id;
    let read = match a.request(post(g2, "read", "all read it")).await {
        Out::SendOk(ok) => ok.group_seq,
        other => panic!("{other:?}"),
    };
    for acct in &u[1..4] {
        let mut c = online(&server, acct).await;
        read_until(&mut c, g2, read).await;
    }
    // Each member's ack sends the sender a delivery receipt once it is
    // applied: with all three in, every ack has reached its shard (the
    // metric below is the process's, which other tests here move too).
    let mut receipts = 0;
    while receipts < 3 {
        let e = tokio::time::timeout(WAIT, a.next_entry())
            .await
            .expect("a member's delivery receipt never came");
        if let Some(pb::queue_entry::Body::Receipt(r)) = &e.body
            && r.group_id == g2
            && r.kind() == pb::ReceiptKind::Delivered
            && r.client_msg_ids.iter().any(|m| m == "read")
        {
            receipts += 1;
        }
    }
    // Its payload goes once the last ack's removal commits.
    let started = std::time::Instant::now();
    while collected(&server).await < 1.0 {
        assert!(
            started.elapsed() < WAIT,
            "a payload every member acked was not collected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(a);
    server.stop().await;
    let store = EmbeddedStore::open(&server.data_dir().join("db")).unwrap();
    let stored = |owner, seq| store.payload(PayloadId { owner, seq }).unwrap().is_some();
    assert!(
        !stored(g2, read),
        "the payload every member acked is still stored"
    );
    assert!(
        stored(g, unread),
        "a payload a member has not read was deleted"
    );
}

#[tokio::test]
async fn a_member_at_its_queue_quota_misses_group_entries_and_nobody_else_does() {
    let server = TestServer::start_with(|c| c.queue_max_entries_per_device = 5).await;
    let u = users(&server, "+1555900", 3).await;
    let mut a = online(&server, &u[0]).await;
    a.drain().await;
    let mut b = online(&server, &u[1]).await;
    b.drain().await;
    let g = info(a.request(create("quota", &[&u[1], &u[2]])).await).group_id;
    // Carol is offline; her queue fills at 5 entries (the creation event
    // and four messages). The sender is never refused for it.
    // Bob reads (and acks) as they come, so his queue stays short.
    let mut bob_saw = group_view(&[b.next_entry().await], g);
    for i in 0..8 {
        let out = a.request(post(g, &format!("q{i}"), "x")).await;
        assert!(matches!(out, Out::SendOk(_)), "{out:?}");
        bob_saw.extend(group_view(&[b.next_entry().await], g));
    }
    assert_eq!(bob_saw.len(), 9, "{bob_saw:?}");
    let mut c = online(&server, &u[2]).await;
    let carol_saw = group_view(&drain_for(&mut c, 3).await, g);
    assert_eq!(carol_saw.len(), 5, "{carol_saw:?}");
    assert_eq!(
        carol_saw.as_slice(),
        &bob_saw[..5],
        "the first ones, in order"
    );
    let (_, text) = http_get(&server.http(), "/metrics").await;
    assert_eq!(
        metric(&text, "switchboard_group_entries_dropped_total"),
        Some(4.0)
    );
}

fn keys(group_id: u64, id: &str, parts: &[(&Account, &str)]) -> In {
    In::SendGroupKeys(pb::SendGroupKeys {
        group_id,
        client_msg_id: id.into(),
        parts: parts
            .iter()
            .map(|(acct, text)| pb::UserPayloads {
                user_id: acct.user_id,
                payloads: vec![pb::DevicePayload {
                    device_id: acct.device_id,
                    payload: text.as_bytes().to_vec().into(),
                }],
            })
            .collect(),
        first_attempt: false,
    })
}

#[tokio::test]
async fn group_keys_reach_members_in_one_request_and_owe_no_receipt() {
    let server = TestServer::start().await;
    let u = users(&server, "+1555900", 4).await;
    let (alice, bob, carol, dave) = (&u[0], &u[1], &u[2], &u[3]);
    let mut a = online(&server, alice).await;
    let mut b = online(&server, bob).await;
    let mut c = online(&server, carol).await;
    let mut d = online(&server, dave).await;
    for conn in [&mut a, &mut b, &mut c, &mut d] {
        conn.drain().await;
    }
    let g = info(a.request(create("keys", &[bob, carol])).await).group_id;
    // Bob's and Carol's parts are stored; Dave's is refused (not a member).
    let sent = match a
        .request(keys(
            g,
            "k1",
            &[(bob, "key-b"), (carol, "key-c"), (dave, "key-d")],
        ))
        .await
    {
        Out::GroupKeysSent(s) => s,
        other => panic!("expected GroupKeysSent, got {other:?}"),
    };
    let refused: Vec<(u64, pb::ErrorCode)> =
        sent.refused.iter().map(|e| (e.user_id, e.code())).collect();
    assert_eq!(refused, vec![(dave.user_id, pb::ErrorCode::NotGroupMember)]);
    for (conn, text) in [(&mut b, "key-b"), (&mut c, "key-c")] {
        let m = loop {
            if let Some(pb::queue_entry::Body::Message(m)) = conn.next_entry().await.body {
                break m;
            }
        };
        assert_eq!(m.group_id, g);
        assert_eq!(m.from_user, alice.user_id);
        assert_eq!(m.client_msg_id, "k1");
        assert_eq!(&m.payload[..], text.as_bytes());
    }
    // A retry of the same request stores nothing twice.
    match a.request(keys(g, "k1", &[(bob, "key-b")])).await {
        Out::GroupKeysSent(s) => assert!(s.refused.is_empty(), "{s:?}"),
        other => panic!("{other:?}"),
    }
    // A wrong device list is refused for that part only, with the fix.
    let wrong = In::SendGroupKeys(pb::SendGroupKeys {
        group_id: g,
        client_msg_id: "k2".into(),
        parts: vec![pb::UserPayloads {
            user_id: carol.user_id,
            payloads: vec![pb::DevicePayload {
                device_id: carol.device_id + 7,
                payload: b"x".to_vec().into(),
            }],
        }],
        first_attempt: false,
    });
    match a.request(wrong).await {
        Out::GroupKeysSent(s) => {
            assert_eq!(s.refused.len(), 1);
            let e = &s.refused[0];
            assert_eq!(
                (e.user_id, e.code()),
                (carol.user_id, pb::ErrorCode::DeviceMismatch)
            );
            assert_eq!(e.missing_devices, vec![carol.device_id]);
            assert_eq!(e.stale_devices, vec![carol.device_id + 7]);
        }
        other => panic!("{other:?}"),
    }
    // An outsider cannot use the group to reach its members.
    assert_eq!(
        error_code(&d.request(keys(g, "k3", &[(bob, "spam")])).await),
        pb::ErrorCode::UnknownGroup
    );
    // Malformed: the same user twice.
    assert_eq!(
        error_code(&a.request(keys(g, "k4", &[(bob, "1"), (bob, "2")])).await),
        pb::ErrorCode::BadRequest
    );
    // The keys owed Alice no receipt: the next entry she gets is Bob's
    // message, not a ✓✓ for a key.
    let to_alice = b.lookup(&alice.phone).await;
    assert!(matches!(
        b.send_text(&to_alice, "m1", "hello").await,
        Out::SendOk(_)
    ));
    loop {
        match a.next_entry().await.body {
            Some(pb::queue_entry::Body::GroupEvent(_)) => {}
            Some(pb::queue_entry::Body::Message(m)) => {
                assert_eq!(m.client_msg_id, "m1");
                break;
            }
            other => panic!("expected Bob's message first, got {other:?}"),
        }
    }
}
