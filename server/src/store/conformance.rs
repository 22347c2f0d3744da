//! The storage conformance suite: what every backend must do, written once
//! against the domain traits. A backend's tests call [`run`] with a
//! [`Harness`] that opens it (`server/tests/store_conformance.rs` runs it on
//! the embedded backend; a cluster backend adds its own harness).
//!
//! Cases report failures as values rather than panicking, so the suite can
//! live in the library (a backend in another crate reuses it) and one run
//! names every failing case.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use switchboard_proto::pb;

use super::{
    AccountOp, CodeRecord, DEDUP_EXPIRY_SLACK_MS, DedupKey, DedupOp, DedupRecord, DeviceKey,
    DeviceKeysRecord, DeviceRecord, GroupOp, GroupRecord, KeyOp, LinkCodeRecord, MailOp,
    MailRecord, MemberRecord, Op, PayloadId, PayloadOp, PayloadRecord, QueueOp, Recipient, Store,
    StoreError, StoredEntry, UserRecord,
};

/// Opens the backend under test.
pub trait Harness {
    /// A new, empty store.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be opened.
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError>;

    /// The same store opened again after `store` (its only handle) is
    /// closed, as after a restart: whatever was committed with sync must be
    /// there.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be reopened.
    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError>;
}

/// One failed case: its name and what went wrong.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The case.
    pub case: &'static str,
    /// What was expected and what happened.
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.case, self.detail)
    }
}

type Outcome = Result<(), String>;
type Case = fn(&mut dyn Harness) -> Outcome;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("accounts_round_trip", accounts_round_trip),
    ("link_codes_expire", link_codes_expire),
    ("keys_and_one_time_keys", keys_and_one_time_keys),
    (
        "queues_keep_order_and_counters",
        queues_keep_order_and_counters,
    ),
    ("queue_drop_is_per_device", queue_drop_is_per_device),
    ("queue_expiry_and_ages", queue_expiry_and_ages),
    ("dedup_records_and_expiry", dedup_records_and_expiry),
    ("mail_round_trip", mail_round_trip),
    ("payloads_round_trip", payloads_round_trip),
    ("groups_and_memberships", groups_and_memberships),
    (
        "a_batch_keeps_each_domains_order",
        a_batch_keeps_each_domains_order,
    ),
    (
        "synced_batches_survive_a_reopen",
        synced_batches_survive_a_reopen,
    ),
];

/// Runs every case against the backend; returns the failures (empty when
/// the backend conforms).
pub fn run(harness: &mut dyn Harness) -> Vec<Failure> {
    CASES
        .iter()
        .filter_map(|(case, f)| f(harness).err().map(|detail| Failure { case, detail }))
        .collect()
}

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

macro_rules! check_eq {
    ($left:expr, $right:expr) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!(
                "{} is {:?}, expected {:?} (line {})",
                stringify!($left),
                l,
                r,
                line!()
            ));
        }
    }};
}

fn fresh(h: &mut dyn Harness) -> Result<Arc<dyn Store>, String> {
    h.fresh().map_err(|e| format!("open: {e}"))
}

fn commit(store: &dyn Store, ops: Vec<Op>) -> Outcome {
    store.commit(ops, true).map_err(|e| format!("commit: {e}"))
}

fn e<T>(r: Result<T, StoreError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

const ALICE: u64 = 0x0a11_ce00_0000_0001;
const BOB: u64 = 0x0b0b_0000_0000_0002;

fn dev(user: u64, device: u32) -> DeviceKey {
    DeviceKey { user, device }
}

fn user_record(user_id: u64, phone: &str, devices: u32) -> UserRecord {
    UserRecord {
        user_id,
        phone: phone.into(),
        devices: (1..=devices)
            .map(|d| DeviceRecord {
                device_id: d,
                credential_hash: vec![d as u8; 32],
                created_ms: 1_000,
                primary: d == 1,
            })
            .collect(),
        next_device_id: devices + 1,
        created_ms: 1_000,
        link_code: String::new(),
        link_codes_created_ms: Vec::new(),
        pin_hash: String::new(),
    }
}

fn entry(seq: u64, server_ts_ms: u64) -> StoredEntry {
    let bytes = pb::QueueEntry {
        seq,
        server_ts_ms,
        body: None,
    }
    .encode_to_vec();
    StoredEntry {
        seq,
        bytes: Bytes::from(bytes),
    }
}

fn enqueue(device: DeviceKey, seq: u64, ts: u64) -> Op {
    QueueOp::Enqueue {
        device,
        entry: entry(seq, ts),
    }
    .into()
}

fn seqs(
    store: &dyn Store,
    device: DeviceKey,
    after: u64,
    limit: usize,
) -> Result<Vec<u64>, String> {
    Ok(e(store.read_queue(device, after, limit))?
        .iter()
        .map(|x| x.seq)
        .collect())
}

fn accounts_round_trip(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    check_eq!(e(s.user(ALICE))?, None);
    check_eq!(e(s.phone("+15550001"))?, None);
    check_eq!(e(s.code("+15550001"))?, None);
    let code = CodeRecord {
        code_hash: vec![7; 32],
        expires_ms: 5_000,
        wrong_attempts: 2,
        requested_ms: vec![1, 2],
        ..CodeRecord::default()
    };
    commit(
        &*s,
        vec![
            AccountOp::PutUser(user_record(ALICE, "+15550001", 1)).into(),
            AccountOp::PutPhone {
                phone: "+15550001".into(),
                user: ALICE,
            }
            .into(),
            AccountOp::PutCode {
                phone: "+15550001".into(),
                record: code.clone(),
            }
            .into(),
        ],
    )?;
    check_eq!(e(s.user(ALICE))?, Some(user_record(ALICE, "+15550001", 1)));
    check_eq!(e(s.phone("+15550001"))?, Some(ALICE));
    check_eq!(e(s.code("+15550001"))?, Some(code));
    // Replacing a record replaces it whole.
    commit(
        &*s,
        vec![AccountOp::PutUser(user_record(ALICE, "+15550001", 3)).into()],
    )?;
    check_eq!(e(s.user(ALICE))?.map(|u| u.devices.len()), Some(3usize));
    check_eq!(e(s.user(BOB))?, None);
    // Read together: what exists, each as read alone, the rest left out.
    commit(
        &*s,
        vec![AccountOp::PutUser(user_record(BOB + 1, "+15550003", 2)).into()],
    )?;
    let mut many = e(s.users(&[BOB, BOB + 1, ALICE]))?;
    many.sort_by_key(|(id, _)| *id);
    let mut alone = Vec::new();
    for id in [ALICE, BOB + 1] {
        if let Some(rec) = e(s.user(id))? {
            alone.push((id, rec));
        }
    }
    alone.sort_by_key(|(id, _)| *id);
    check_eq!(many.len(), 2);
    check_eq!(many, alone);
    check_eq!(e(s.users(&[]))?, Vec::new());
    Ok(())
}

fn link_codes_expire(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let put = |code: &str, expires_ms| -> Op {
        AccountOp::PutLinkCode {
            code: code.into(),
            record: LinkCodeRecord {
                user_id: ALICE,
                expires_ms,
            },
        }
        .into()
    };
    commit(
        &*s,
        vec![put("old-1", 100), put("old-2", 200), put("new", 10_000)],
    )?;
    check_eq!(
        e(s.link_code("new"))?,
        Some(LinkCodeRecord {
            user_id: ALICE,
            expires_ms: 10_000
        })
    );
    let mut expired = e(s.expired_link_codes(1_000, 10))?;
    expired.sort();
    check_eq!(expired, vec!["old-1".to_string(), "old-2".to_string()]);
    check_eq!(e(s.expired_link_codes(1_000, 1))?.len(), 1usize);
    commit(&*s, vec![AccountOp::DeleteLinkCode("old-1".into()).into()])?;
    check_eq!(e(s.link_code("old-1"))?, None);
    check_eq!(
        e(s.expired_link_codes(1_000, 10))?,
        vec!["old-2".to_string()]
    );
    Ok(())
}

fn keys_and_one_time_keys(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let (a1, a2) = (dev(ALICE, 1), dev(ALICE, 2));
    let record = DeviceKeysRecord {
        identity: None,
        fallback: None,
        one_time_keys: 3,
        next_index: 3,
        consumed_below: 0,
    };
    let otk = |device, index: u64| -> Op {
        KeyOp::PutOneTimeKey {
            device,
            index,
            key: Bytes::from(vec![index as u8; 4]),
        }
        .into()
    };
    commit(
        &*s,
        vec![
            KeyOp::PutDeviceKeys {
                device: a1,
                record: record.clone(),
            }
            .into(),
            otk(a1, 0),
            otk(a1, 1),
            otk(a1, 2),
            otk(a2, 0),
        ],
    )?;
    check_eq!(e(s.device_keys(a1))?, Some(record.clone()));
    check_eq!(e(s.device_keys(a2))?, None);
    // Read together: only the devices with keys; a device of another user
    // with the same id is not confused with it.
    check_eq!(
        e(s.many_device_keys(&[a2, dev(BOB, 1), a1]))?,
        vec![(a1, record.clone())]
    );
    check_eq!(e(s.many_device_keys(&[]))?, Vec::new());
    check_eq!(
        e(s.first_one_time_key(a1, 0))?,
        Some((0, Bytes::from(vec![0u8; 4])))
    );
    check_eq!(e(s.first_one_time_key(a1, 2))?.map(|k| k.0), Some(2));
    check_eq!(e(s.first_one_time_key(a1, 3))?, None);
    commit(
        &*s,
        vec![
            KeyOp::DeleteOneTimeKey {
                device: a1,
                index: 0,
            }
            .into(),
        ],
    )?;
    check_eq!(e(s.first_one_time_key(a1, 0))?.map(|k| k.0), Some(1));
    commit(&*s, vec![KeyOp::DropDeviceKeys(a1).into()])?;
    check_eq!(e(s.device_keys(a1))?, None);
    check_eq!(e(s.first_one_time_key(a1, 0))?, None);
    // Another device of the same user keeps its keys.
    check_eq!(e(s.first_one_time_key(a2, 0))?.map(|k| k.0), Some(0));
    Ok(())
}

fn queues_keep_order_and_counters(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let d = dev(ALICE, 1);
    check_eq!(e(s.reserved_seq(d))?, 0);
    check_eq!(e(s.queue_usage(d))?, (0, 0));
    let mut ops = vec![
        QueueOp::ReserveSeqs {
            device: d,
            upto: 64,
        }
        .into(),
    ];
    for seq in 1..=5 {
        ops.push(enqueue(d, seq, 1_000 + seq));
    }
    commit(&*s, ops)?;
    check_eq!(e(s.reserved_seq(d))?, 64);
    check_eq!(seqs(&*s, d, 0, 100)?, vec![1, 2, 3, 4, 5]);
    check_eq!(seqs(&*s, d, 2, 2)?, vec![3, 4]);
    check_eq!(seqs(&*s, d, 5, 10)?, Vec::<u64>::new());
    check_eq!(seqs(&*s, d, u64::MAX, 10)?, Vec::<u64>::new());
    let bytes: u64 = (1..=5)
        .map(|seq| entry(seq, 1_000 + seq).bytes.len() as u64)
        .sum();
    check_eq!(e(s.queue_usage(d))?, (5, bytes));
    check!(
        s.approximate_queue_entries() > 0,
        "approximate_queue_entries is 0 with 5 entries stored"
    );
    // Entries come back byte for byte.
    let read = e(s.read_queue(d, 2, 1))?;
    check_eq!(
        read.first().map(|x| x.bytes.clone()),
        Some(entry(3, 1_003).bytes)
    );
    // Removing from the middle and the front.
    commit(
        &*s,
        vec![
            QueueOp::Dequeue { device: d, seq: 3 }.into(),
            QueueOp::Dequeue { device: d, seq: 1 }.into(),
        ],
    )?;
    check_eq!(seqs(&*s, d, 0, 100)?, vec![2, 4, 5]);
    // Removing what is not there is harmless.
    commit(&*s, vec![QueueOp::Dequeue { device: d, seq: 99 }.into()])?;
    let size = |seq: u64, ts: u64| entry(seq, ts).bytes.len() as u64;
    let (s2, s4, s5) = (size(2, 1_002), size(4, 1_004), size(5, 1_005));
    check_eq!(e(s.queue_usage(d))?, (3, s2 + s4 + s5));
    // A commit sent again (its answer was lost) changes nothing more.
    commit(&*s, vec![enqueue(d, 4, 1_004)])?;
    check_eq!(e(s.queue_usage(d))?, (3, s2 + s4 + s5));
    // An entry put again under its seq replaces the old one.
    commit(&*s, vec![enqueue(d, 4, 10_000_000_000)])?;
    check_eq!(seqs(&*s, d, 0, 100)?, vec![2, 4, 5]);
    let s4_new = size(4, 10_000_000_000);
    check!(s4_new != s4, "the replacing entry has the same size");
    check_eq!(e(s.queue_usage(d))?, (3, s2 + s4_new + s5));
    // One commit that adds to and takes from the same queue, an entry
    // added and removed within it included.
    commit(
        &*s,
        vec![
            enqueue(d, 6, 1_006),
            QueueOp::Dequeue { device: d, seq: 2 }.into(),
            enqueue(d, 7, 1_007),
            QueueOp::Dequeue { device: d, seq: 6 }.into(),
        ],
    )?;
    check_eq!(seqs(&*s, d, 0, 100)?, vec![4, 5, 7]);
    check_eq!(e(s.queue_usage(d))?, (3, s4_new + s5 + size(7, 1_007)));
    // A reservation never goes down by itself.
    check_eq!(e(s.reserved_seq(d))?, 64);
    Ok(())
}

fn queue_drop_is_per_device(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let (a1, a2, b1) = (dev(ALICE, 1), dev(ALICE, 2), dev(BOB, 1));
    let mut ops = Vec::new();
    for d in [a1, a2, b1] {
        ops.push(
            QueueOp::ReserveSeqs {
                device: d,
                upto: 10,
            }
            .into(),
        );
        ops.push(enqueue(d, 1, 1_000));
        ops.push(enqueue(d, 2, 1_001));
    }
    commit(&*s, ops)?;
    commit(&*s, vec![QueueOp::DropQueue(a1).into()])?;
    check_eq!(seqs(&*s, a1, 0, 10)?, Vec::<u64>::new());
    check_eq!(e(s.reserved_seq(a1))?, 0);
    check_eq!(e(s.queue_usage(a1))?, (0, 0));
    // Entries put in the commit that drops the queue go with it; those put
    // after the drop in the same commit stay.
    commit(
        &*s,
        vec![
            enqueue(a1, 3, 1_003),
            QueueOp::DropQueue(a1).into(),
            enqueue(a1, 4, 1_004),
        ],
    )?;
    check_eq!(seqs(&*s, a1, 0, 10)?, vec![4]);
    check_eq!(
        e(s.queue_usage(a1))?,
        (1, entry(4, 1_004).bytes.len() as u64)
    );
    check_eq!(e(s.queue_usage(a2))?.0, 2);
    check_eq!(seqs(&*s, a2, 0, 10)?, vec![1, 2]);
    check_eq!(seqs(&*s, b1, 0, 10)?, vec![1, 2]);
    check_eq!(e(s.reserved_seq(a2))?, 10);
    Ok(())
}

fn queue_expiry_and_ages(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let (a1, b1) = (dev(ALICE, 1), dev(BOB, 1));
    commit(
        &*s,
        vec![
            QueueOp::ReserveSeqs {
                device: a1,
                upto: 10,
            }
            .into(),
            QueueOp::ReserveSeqs {
                device: b1,
                upto: 10,
            }
            .into(),
            enqueue(a1, 1, 100),
            enqueue(a1, 2, 200),
            enqueue(a1, 3, 5_000),
            enqueue(b1, 1, 300),
        ],
    )?;
    let mut expired = e(s.expired_entries(1_000, 100))?;
    expired.sort();
    check_eq!(expired, vec![(a1, 1), (a1, 2), (b1, 1)]);
    check_eq!(e(s.expired_entries(1_000, 2))?.len(), 2usize);
    check_eq!(e(s.expired_entries(50, 100))?, Vec::new());
    // Oldest entry per bucket: Alice in bucket 0, Bob in bucket 1.
    let oldest = e(s.oldest_entries(3, &|user| usize::from(user == BOB)))?;
    check_eq!(oldest, vec![Some(100), Some(300), None]);
    Ok(())
}

fn dedup_records_and_expiry(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let key = |id: &str| DedupKey {
        to: Recipient::User(BOB),
        from: dev(ALICE, 1),
        client_msg_id: id.into(),
    };
    let record = |accepted_ms, voided| DedupRecord {
        server_ts_ms: accepted_ms + 1,
        accepted_ms,
        voided,
        group_seq: 0,
    };
    let day = DEDUP_EXPIRY_SLACK_MS;
    let old = 10 * day;
    let new = 20 * day;
    let put = |id: &str, r: DedupRecord| -> Op {
        DedupOp::Put {
            key: key(id),
            record: r,
        }
        .into()
    };
    commit(
        &*s,
        vec![
            put("old", record(old, false)),
            put("new", record(new, false)),
        ],
    )?;
    check_eq!(e(s.dedup(&key("old")))?, Some(record(old, false)));
    check_eq!(e(s.dedup(&key("new")))?, Some(record(new, false)));
    check_eq!(e(s.dedup(&key("other")))?, None);
    // Another sender's id is another record.
    let mut other = key("new");
    other.from = dev(ALICE, 2);
    check_eq!(e(s.dedup(&other))?, None);
    // Overwritten (voided) in place.
    commit(&*s, vec![put("new", record(new, true))])?;
    check_eq!(e(s.dedup(&key("new")))?.map(|r| r.voided), Some(true));
    // Expiry: records older than the cut by more than the slack go, newer
    // ones stay.
    e(s.expire_dedup(old + 2 * day))?;
    check_eq!(e(s.dedup(&key("old")))?, None);
    check_eq!(e(s.dedup(&key("new")))?.is_some(), true);
    e(s.expire_dedup(new))?;
    check_eq!(e(s.dedup(&key("new")))?.is_some(), true);
    Ok(())
}

fn mail_round_trip(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    check_eq!(e(s.mail())?.len(), 0usize);
    let record = |to_user| MailRecord {
        to_user,
        entry: Some(pb::QueueEntry {
            seq: 0,
            server_ts_ms: 7,
            body: None,
        }),
        group_id: 9,
        group_seq: 3,
        prev_group_seq: 2,
        ..MailRecord::default()
    };
    commit(
        &*s,
        vec![
            MailOp::Put {
                owner: ALICE,
                id: 1,
                record: Box::new(record(BOB)),
            }
            .into(),
            MailOp::Put {
                owner: ALICE,
                id: 2,
                record: Box::new(record(ALICE)),
            }
            .into(),
            MailOp::Put {
                owner: BOB,
                id: 1,
                record: Box::new(record(ALICE)),
            }
            .into(),
        ],
    )?;
    let mut all = e(s.mail())?;
    all.sort_by_key(|(owner, id, _)| (*owner, *id));
    check_eq!(all.len(), 3usize);
    check_eq!(all.first().cloned(), Some((ALICE, 1, record(BOB))));
    commit(
        &*s,
        vec![
            MailOp::Delete {
                owner: ALICE,
                id: 1,
            }
            .into(),
        ],
    )?;
    let mut left: Vec<(u64, u64)> = e(s.mail())?.into_iter().map(|(o, i, _)| (o, i)).collect();
    left.sort();
    check_eq!(left, vec![(ALICE, 2), (BOB, 1)]);
    Ok(())
}

fn payloads_round_trip(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let id = |seq| PayloadId { owner: ALICE, seq };
    let record = |created_ms| PayloadRecord {
        body: Bytes::from(vec![0xab; 1024]),
        created_ms,
    };
    check_eq!(e(s.payload(id(1)))?, None);
    commit(
        &*s,
        vec![
            PayloadOp::Put {
                id: id(1),
                record: record(100),
            }
            .into(),
            PayloadOp::Put {
                id: id(2),
                record: record(5_000),
            }
            .into(),
        ],
    )?;
    check_eq!(e(s.payload(id(1)))?, Some(record(100)));
    check_eq!(e(s.payload(PayloadId { owner: BOB, seq: 1 }))?, None);
    check_eq!(e(s.expired_payloads(1_000, 10))?, vec![id(1)]);
    commit(&*s, vec![PayloadOp::Delete(id(1)).into()])?;
    check_eq!(e(s.payload(id(1)))?, None);
    check_eq!(e(s.payload(id(2)))?.is_some(), true);
    Ok(())
}

fn groups_and_memberships(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    const GROUP: u64 = 0x6000_0000_0000_0007;
    const OTHER: u64 = 0x6000_0000_0000_0003;
    let record = |members: &[u64]| GroupRecord {
        group_id: GROUP,
        name: "hikers".into(),
        description: String::new(),
        icon_ref: String::new(),
        info_admin_only: false,
        created_ms: 1_000,
        members: members
            .iter()
            .enumerate()
            .map(|(i, &user_id)| MemberRecord {
                user_id,
                role: i32::from(i == 0) * 2,
                joined_seq: 1,
                phone: format!("+1555000{i}"),
            })
            .collect(),
    };
    check_eq!(e(s.group(GROUP))?, None);
    check_eq!(e(s.group_reserved_seq(GROUP))?, 0);
    check_eq!(e(s.user_groups(ALICE))?, Vec::<u64>::new());
    commit(
        &*s,
        vec![
            GroupOp::ReserveSeqs {
                group: GROUP,
                upto: 1_024,
            }
            .into(),
            GroupOp::PutGroup(record(&[ALICE, BOB])).into(),
            GroupOp::PutMembership {
                user: ALICE,
                group: GROUP,
            }
            .into(),
            GroupOp::PutMembership {
                user: BOB,
                group: GROUP,
            }
            .into(),
            GroupOp::PutMembership {
                user: ALICE,
                group: OTHER,
            }
            .into(),
        ],
    )?;
    check_eq!(e(s.group(GROUP))?, Some(record(&[ALICE, BOB])));
    check_eq!(e(s.group_reserved_seq(GROUP))?, 1_024);
    check_eq!(e(s.user_groups(ALICE))?, vec![OTHER, GROUP]);
    check_eq!(e(s.user_groups(BOB))?, vec![GROUP]);
    commit(
        &*s,
        vec![
            GroupOp::PutGroup(record(&[ALICE])).into(),
            GroupOp::DeleteMembership {
                user: BOB,
                group: GROUP,
            }
            .into(),
        ],
    )?;
    check_eq!(e(s.user_groups(BOB))?, Vec::<u64>::new());
    check_eq!(e(s.group(GROUP))?.map(|g| g.members.len()), Some(1usize));
    commit(&*s, vec![GroupOp::DropGroup(GROUP).into()])?;
    check_eq!(e(s.group(GROUP))?, None);
    check_eq!(e(s.group_reserved_seq(GROUP))?, 0);
    // The group with the lower id is untouched.
    check_eq!(e(s.user_groups(ALICE))?.contains(&OTHER), true);
    Ok(())
}

fn a_batch_keeps_each_domains_order(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let d = dev(ALICE, 1);
    commit(
        &*s,
        vec![
            QueueOp::ReserveSeqs {
                device: d,
                upto: 10,
            }
            .into(),
            enqueue(d, 1, 1_000),
            enqueue(d, 2, 1_000),
            // Removed in the batch that added it.
            QueueOp::Dequeue { device: d, seq: 1 }.into(),
            AccountOp::PutUser(user_record(ALICE, "+15550001", 1)).into(),
            AccountOp::PutUser(user_record(ALICE, "+15550001", 2)).into(),
        ],
    )?;
    check_eq!(seqs(&*s, d, 0, 10)?, vec![2]);
    check_eq!(e(s.user(ALICE))?.map(|u| u.devices.len()), Some(2usize));
    // A queue dropped and refilled in one batch holds the new entries.
    commit(
        &*s,
        vec![
            QueueOp::DropQueue(d).into(),
            QueueOp::ReserveSeqs {
                device: d,
                upto: 20,
            }
            .into(),
            enqueue(d, 11, 2_000),
        ],
    )?;
    check_eq!(seqs(&*s, d, 0, 10)?, vec![11]);
    check_eq!(e(s.reserved_seq(d))?, 20);
    Ok(())
}

fn synced_batches_survive_a_reopen(h: &mut dyn Harness) -> Outcome {
    let s = fresh(h)?;
    let d = dev(BOB, 3);
    let dedup_key = DedupKey {
        to: Recipient::User(BOB),
        from: dev(ALICE, 1),
        client_msg_id: "m-1".into(),
    };
    let dedup = DedupRecord {
        server_ts_ms: 42,
        accepted_ms: 41,
        voided: false,
        group_seq: 0,
    };
    let payload = PayloadId { owner: BOB, seq: 9 };
    commit(
        &*s,
        vec![
            AccountOp::PutUser(user_record(BOB, "+15550002", 3)).into(),
            AccountOp::PutPhone {
                phone: "+15550002".into(),
                user: BOB,
            }
            .into(),
            KeyOp::PutOneTimeKey {
                device: d,
                index: 5,
                key: Bytes::from_static(b"otk"),
            }
            .into(),
            QueueOp::ReserveSeqs {
                device: d,
                upto: 100,
            }
            .into(),
            enqueue(d, 1, 1_000),
            enqueue(d, 2, 1_001),
            DedupOp::Put {
                key: dedup_key.clone(),
                record: dedup.clone(),
            }
            .into(),
            MailOp::Put {
                owner: BOB,
                id: 3,
                record: Box::new(MailRecord {
                    to_user: ALICE,
                    to_users: vec![ALICE, BOB],
                    ..MailRecord::default()
                }),
            }
            .into(),
            PayloadOp::Put {
                id: payload,
                record: PayloadRecord {
                    body: Bytes::from_static(b"sealed"),
                    created_ms: 1_000,
                },
            }
            .into(),
        ],
    )?;
    commit(&*s, vec![QueueOp::Dequeue { device: d, seq: 1 }.into()])?;
    let s = h.reopen(s).map_err(|e| format!("reopen: {e}"))?;
    check_eq!(e(s.user(BOB))?.map(|u| u.devices.len()), Some(3usize));
    check_eq!(e(s.phone("+15550002"))?, Some(BOB));
    check_eq!(e(s.first_one_time_key(d, 0))?.map(|k| k.0), Some(5));
    check_eq!(e(s.reserved_seq(d))?, 100);
    check_eq!(seqs(&*s, d, 0, 10)?, vec![2]);
    check_eq!(e(s.dedup(&dedup_key))?, Some(dedup));
    check_eq!(e(s.mail())?.len(), 1usize);
    check_eq!(
        e(s.payload(payload))?.map(|p| p.body),
        Some(Bytes::from_static(b"sealed"))
    );
    Ok(())
}
