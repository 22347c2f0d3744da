//! The `baseline`: a trivial relay that speaks the same frames as the server
//! but with no Noise, no accounts and no storage. `Auth` names a user id
//! (no credential), `Send` is answered `SendOk` at once and its first payload
//! is forwarded as a one-entry `Deliver` to that user's connection, acks are
//! ignored. With `--receipts` an ack of a forwarded message is also turned
//! into a delivery receipt for its sender (a one-entry `Deliver`, which the
//! sender acks): the server's frame pattern per message (3 writes: ✓, the
//! message, ✓✓; 3 reads: the send and 2 acks) without its crypto and
//! storage, which bounds what any server speaking this protocol can do here. It does what a bare tokio relay does well (one task per
//! connection, a bounded outbound queue, frames coalesced per write), so the
//! server's throughput can be read as a ratio of it, measured in the same
//! run on the same machine.
//!
//! Groups (for `group-fanout`) are kept in memory only: `CreateGroup` is
//! answered `GroupInfo` and pushes a `CREATED` event to the other online
//! members; `SendGroup` is answered `SendOk` with the group's next
//! `group_seq` and pushed as a `GroupMessage` to every other online member.
//! The pushed frame is encoded once per message and shared by every member
//! (one queue seq for all of them, which keeps each connection's seqs
//! increasing): the least work a fan-out can cost. With `--receipts` each
//! member's ack becomes a receipt (with `group_id`) for the sender, as the
//! server sends.
//!
//! It runs as a child process of the load generator (`switchboard-bench
//! relay`), pinned like the server, and prints the same ready line.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_proto::frame::{self, FrameDecoder};
use switchboard_proto::limits::DEFAULT_MAX_FRAME_BYTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Encoded frames waiting for one connection's writer.
const OUTBOUND_FRAMES: usize = 1024;
/// Most bytes gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Most forwarded messages awaiting their ack (with `--receipts`); past it
/// a message is forwarded without a receipt to come.
const MAX_AWAITING_ACK: usize = 1 << 20;

/// Options of the relay process.
#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Turn each ack of a forwarded message into a receipt for its sender.
    #[arg(long)]
    receipts: bool,
}

/// Online users: user id → that connection's outbound queue.
type Peers = Arc<Mutex<HashMap<u64, mpsc::Sender<Bytes>>>>;

/// A forwarded message whose receipts are still owed (with `--receipts`).
struct Owed {
    sender: u64,
    client_msg_id: String,
    /// 0 for a 1:1 message.
    group_id: u64,
    /// Acks (one per recipient connection) still to come.
    acks_left: usize,
}

/// A group, in memory only.
struct Group {
    /// Creator first.
    members: Arc<Vec<u64>>,
    /// The last `group_seq` used.
    last_seq: u64,
}

/// What the connections share.
struct Shared {
    peers: Peers,
    seq: AtomicU64,
    /// With `--receipts`: forwarded seq → what its acks turn into.
    awaiting_ack: Option<Mutex<HashMap<u64, Owed>>>,
    groups: Mutex<HashMap<u64, Group>>,
    last_group_id: AtomicU64,
}

impl Shared {
    /// The connection of `user`, if online.
    fn peer(&self, user: u64) -> Option<mpsc::Sender<Bytes>> {
        self.peers.lock().ok().and_then(|p| p.get(&user).cloned())
    }

    /// The connections of the online `users` other than `me`, under one
    /// lock.
    fn peers_except(&self, users: &[u64], me: u64) -> Vec<mpsc::Sender<Bytes>> {
        let Ok(p) = self.peers.lock() else {
            return Vec::new();
        };
        users
            .iter()
            .filter(|&&u| u != me)
            .filter_map(|u| p.get(u).cloned())
            .collect()
    }

    /// Takes `group`'s next `group_seq` for a message from `me`: the seq
    /// and the members, or `None` if `me` is not a member.
    fn next_group_seq(&self, group: u64, me: u64) -> Option<(u64, Arc<Vec<u64>>)> {
        let mut groups = self.groups.lock().ok()?;
        let g = groups.get_mut(&group)?;
        if !g.members.contains(&me) {
            return None;
        }
        g.last_seq += 1;
        Some((g.last_seq, g.members.clone()))
    }

    /// Remembers that `acks_left` acks of `seq` are owed receipts.
    fn await_acks(&self, seq: u64, owed: Owed) {
        if let Some(awaiting) = &self.awaiting_ack
            && owed.acks_left > 0
            && let Ok(mut a) = awaiting.lock()
            && a.len() < MAX_AWAITING_ACK
        {
            a.insert(seq, owed);
        }
    }
}

/// Serves until killed.
///
/// # Errors
/// If it cannot listen.
pub async fn serve(args: RelayArgs) -> Result<bool> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "relay ready tcp={addr}")?;
        out.flush()?;
    }
    let shared = Arc::new(Shared {
        peers: Arc::default(),
        seq: AtomicU64::new(0),
        awaiting_ack: args.receipts.then(Mutex::default),
        groups: Mutex::default(),
        last_group_id: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, shared).await {
                tracing::debug!(error = %e, "relay connection ended");
            }
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn encode(frame: &pb::ServerFrame) -> Bytes {
    let mut out = BytesMut::new();
    frame::encode(frame, &mut out);
    out.freeze()
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) -> Result<()> {
    let peers = &shared.peers;
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    // This connection's outbound frames: its reader (answers) and every
    // other connection's reader (forwarded messages) hold senders; the
    // writer task holds the receiver. When it is full, senders wait: the
    // relay slows down like a real server's backpressure instead of
    // dropping.
    let (tx, rx) = mpsc::channel::<Bytes>(OUTBOUND_FRAMES);
    tokio::spawn(writer(wr, rx));
    let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut me: Option<u64> = None;
    let result = async {
        loop {
            while let Some(f) = decoder.decode_message::<pb::ClientFrame>(&mut buf)? {
                let reply = |body| pb::ServerFrame {
                    id: f.id,
                    body: Some(body),
                };
                match f.body {
                    Some(In::Auth(a)) => {
                        if let Ok(mut p) = peers.lock() {
                            p.insert(a.user_id, tx.clone());
                        }
                        me = Some(a.user_id);
                        tx.send(encode(&reply(Out::AuthOk(pb::AuthOk {
                            server_time_ms: now_ms(),
                            ..Default::default()
                        }))))
                        .await?;
                        tx.send(encode(&pb::ServerFrame {
                            id: 0,
                            body: Some(Out::UpToDate(pb::UpToDate::default())),
                        }))
                        .await?;
                    }
                    Some(In::Send(s)) => {
                        let ts = now_ms();
                        tx.send(encode(&reply(Out::SendOk(pb::SendOk {
                            server_ts_ms: ts,
                            duplicate: false,
                            group_seq: 0,
                        }))))
                        .await?;
                        if let (Some(target), Some(p)) =
                            (shared.peer(s.to_user), s.payloads.into_iter().next())
                        {
                            let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
                            if let Some(me) = me {
                                shared.await_acks(
                                    seq,
                                    Owed {
                                        sender: me,
                                        client_msg_id: s.client_msg_id.clone(),
                                        group_id: 0,
                                        acks_left: 1,
                                    },
                                );
                            }
                            let message = pb::Message {
                                from_user: me.unwrap_or_default(),
                                from_device: 1,
                                client_msg_id: s.client_msg_id,
                                payload: p.payload,
                                to_user: s.to_user,
                                ..Default::default()
                            };
                            deliver(&target, seq, ts, pb::queue_entry::Body::Message(message))
                                .await;
                        }
                    }
                    Some(In::CreateGroup(c)) => {
                        let Some(me) = me else { continue };
                        let info = create_group(&shared, me, c);
                        tx.send(encode(&reply(Out::GroupInfo(info.clone()))))
                            .await?;
                        let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
                        let members: Vec<u64> = info.members.iter().map(|m| m.user_id).collect();
                        let event = encode(&deliver_frame(
                            seq,
                            now_ms(),
                            pb::queue_entry::Body::GroupEvent(pb::GroupEvent {
                                group_id: info.group_id,
                                group_seq: info.seq,
                                actor: me,
                                kind: pb::GroupEventKind::Created.into(),
                                users: members.clone(),
                                info: Some(pb::GroupInfo {
                                    members: Vec::new(),
                                    ..info
                                }),
                            }),
                        ));
                        for target in shared.peers_except(&members, me) {
                            let _ = target.send(event.clone()).await;
                        }
                    }
                    Some(In::SendGroup(s)) => {
                        let Some(me) = me else { continue };
                        let Some((group_seq, members)) = shared.next_group_seq(s.group_id, me)
                        else {
                            tx.send(encode(&reply(Out::Error(pb::Error {
                                code: pb::ErrorCode::UnknownGroup.into(),
                                message: "not a member".into(),
                                ..Default::default()
                            }))))
                            .await?;
                            continue;
                        };
                        let ts = now_ms();
                        tx.send(encode(&reply(Out::SendOk(pb::SendOk {
                            server_ts_ms: ts,
                            duplicate: false,
                            group_seq,
                        }))))
                        .await?;
                        let targets = shared.peers_except(&members, me);
                        let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
                        shared.await_acks(
                            seq,
                            Owed {
                                sender: me,
                                client_msg_id: s.client_msg_id.clone(),
                                group_id: s.group_id,
                                acks_left: targets.len(),
                            },
                        );
                        let message = encode(&deliver_frame(
                            seq,
                            ts,
                            pb::queue_entry::Body::GroupMessage(pb::GroupMessage {
                                group_id: s.group_id,
                                group_seq,
                                from_user: me,
                                from_device: 1,
                                client_msg_id: s.client_msg_id,
                                payload: s.payload,
                                ..Default::default()
                            }),
                        ));
                        for target in targets {
                            let _ = target.send(message.clone()).await;
                        }
                    }
                    Some(In::Ack(ack)) => {
                        if let (Some(awaiting), Some(me)) = (&shared.awaiting_ack, me) {
                            receipts(&shared, awaiting, me, ack.seqs).await;
                        }
                    }
                    Some(In::Ping(_)) => {
                        tx.send(encode(&reply(Out::Pong(pb::Pong {
                            server_time_ms: now_ms(),
                        }))))
                        .await?;
                    }
                    _ => {}
                }
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok::<_, anyhow::Error>(());
            }
        }
    }
    .await;
    if let (Some(me), Ok(mut p)) = (me, peers.lock())
        && p.get(&me).is_some_and(|t| t.same_channel(&tx))
    {
        p.remove(&me);
    }
    result
}

/// Builds a group from `CreateGroup`, `me` its creator; the answer.
fn create_group(shared: &Shared, me: u64, c: pb::CreateGroup) -> pb::GroupInfo {
    let mut members = vec![me];
    let mut seen: std::collections::HashSet<u64> = members.iter().copied().collect();
    members.extend(c.members.into_iter().filter(|u| seen.insert(*u)));
    let group_id = shared.last_group_id.fetch_add(1, Ordering::Relaxed) + 1;
    let info = pb::GroupInfo {
        group_id,
        name: c.name,
        description: c.description,
        icon_ref: c.icon_ref,
        info_admin_only: c.info_admin_only,
        members: members
            .iter()
            .map(|&user_id| pb::GroupMember {
                user_id,
                role: if user_id == me {
                    pb::GroupRole::Creator
                } else {
                    pb::GroupRole::Member
                }
                .into(),
                joined_seq: 1,
                ..Default::default()
            })
            .collect(),
        seq: 1,
        created_ms: now_ms(),
    };
    if let Ok(mut groups) = shared.groups.lock() {
        groups.insert(
            group_id,
            Group {
                members: Arc::new(members),
                last_seq: 1,
            },
        );
    }
    info
}

/// Sends the sender of each acked message a delivery receipt.
async fn receipts(shared: &Shared, awaiting: &Mutex<HashMap<u64, Owed>>, me: u64, seqs: Vec<u64>) {
    let owed: Vec<(u64, String, u64)> = match awaiting.lock() {
        Ok(mut a) => seqs
            .iter()
            .filter_map(|s| {
                let o = a.get_mut(s)?;
                o.acks_left = o.acks_left.saturating_sub(1);
                let receipt = (o.sender, o.client_msg_id.clone(), o.group_id);
                if o.acks_left == 0 {
                    a.remove(s);
                }
                Some(receipt)
            })
            .collect(),
        Err(_) => return,
    };
    for (sender, id, group_id) in owed {
        let Some(target) = shared.peer(sender) else {
            continue;
        };
        let receipt = pb::Receipt {
            from_user: me,
            from_device: 1,
            kind: pb::ReceiptKind::Delivered.into(),
            client_msg_ids: vec![id],
            group_id,
            ..Default::default()
        };
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
        deliver(
            &target,
            seq,
            now_ms(),
            pb::queue_entry::Body::Receipt(receipt),
        )
        .await;
    }
}

/// A one-entry `Deliver`.
fn deliver_frame(seq: u64, server_ts_ms: u64, body: pb::queue_entry::Body) -> pb::ServerFrame {
    pb::ServerFrame {
        id: 0,
        body: Some(Out::Deliver(pb::Deliver {
            entries: vec![pb::QueueEntry {
                seq,
                server_ts_ms,
                body: Some(body),
            }],
        })),
    }
}

/// Writes a one-entry `Deliver` to a connection. A vanished peer is
/// nobody's problem.
async fn deliver(
    target: &mpsc::Sender<Bytes>,
    seq: u64,
    server_ts_ms: u64,
    body: pb::queue_entry::Body,
) {
    let _ = target
        .send(encode(&deliver_frame(seq, server_ts_ms, body)))
        .await;
}

/// Writes queued frames, as many as are waiting in one write.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut out = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    while let Some(first) = rx.recv().await {
        out.extend_from_slice(&first);
        while out.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(more) => out.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}
