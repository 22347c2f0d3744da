//! `Ack`: the device received entries; the one kind that may carry frame id
//! 0, and that is ignored (nothing was delivered) before authentication.

use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode};

use crate::FastMap;
use crate::clock::now_ms;
use crate::gateway::connection::{Conn, Delivered, End, Owed, alongside_pending};
use crate::gateway::link::Link;
use crate::router::OwedReceipt;
use crate::store::{DeviceKey, UserId};

/// An ack: the drain may go on at once; delivery receipts are made
/// durable for the senders before the entries are deleted, so a crash in
/// between causes a redelivery, never a lost receipt.
pub(in crate::gateway) async fn run<L: Link>(
    conn: &mut Conn<L>,
    device: DeviceKey,
    ack: pb::Ack,
) -> Result<(), End> {
    if ack.seqs.len() > limits::MAX_ACK_SEQS {
        return Err(End::Goodbye(ErrorCode::ProtocolViolation));
    }
    let mut seqs = Vec::with_capacity(ack.seqs.len());
    // Per sender and group (0: none): the acked message ids, their entries
    // and the group payloads they referenced.
    let mut owed: FastMap<(UserId, u64), Receipted> = FastMap::default();
    let mut receipt_seqs = Vec::new();
    let mut released = Vec::new();
    for seq in ack.seqs {
        // Only entries delivered on this connection can be acked here.
        let Some(Delivered {
            owed: entry,
            server_ts_ms,
            group_ref,
        }) = conn.delivered.remove(&seq)
        else {
            continue;
        };
        seqs.push(seq);
        if entry.is_some() {
            let delay_ms = now_ms().saturating_sub(server_ts_ms);
            conn.gw
                .metrics
                .delivery_seconds
                .record(delay_ms as f64 / 1000.0);
        }
        match entry {
            Some(Owed {
                from_user,
                client_msg_id,
                group_id,
            }) => {
                let r = owed.entry((from_user, group_id)).or_default();
                r.ids.push(client_msg_id);
                r.seqs.push(seq);
                r.released.extend(group_ref.map(|g| (seq, g)));
            }
            None => {
                receipt_seqs.push(seq);
                released.extend(group_ref.map(|g| (seq, g)));
            }
        }
    }
    if seqs.is_empty() {
        return Ok(());
    }
    let phone = if owed.is_empty() {
        String::new()
    } else {
        conn.phone()
    };
    let owed: Vec<OwedReceipt> = owed
        .into_iter()
        .map(|((to_user, group_id), r)| OwedReceipt {
            to_user,
            receipt: pb::Receipt {
                from_user: device.user,
                from_device: device.device,
                from_phone: phone.clone(),
                kind: pb::ReceiptKind::Delivered as i32,
                client_msg_ids: r.ids,
                group_id,
            },
            message_seqs: r.seqs,
            released: r.released,
        })
        .collect();
    let router = conn.gw.router.clone();
    let (remote, answers) = alongside_pending(
        &mut conn.pending,
        router.ack(device, conn.conn_id, seqs, receipt_seqs, released, owed),
    )
    .await;
    conn.queue_all(answers);
    if remote.is_empty() {
        return Ok(());
    }
    // Senders on other shards: queue each receipt there first, then
    // remove the messages it covers.
    conn.pending.push(Box::pin(async move {
        for owed in remote {
            match router.enqueue_receipt(owed.to_user, owed.receipt, false).await {
                Ok(()) => {
                    router
                        .delete(device, owed.message_seqs, owed.released)
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "delivery receipt not stored; entries kept for redelivery");
                }
            }
        }
        None
    }));
    Ok(())
}

/// What one sender is owed for the entries of one ack.
#[derive(Default)]
struct Receipted {
    ids: Vec<String>,
    seqs: Vec<u64>,
    released: Vec<(u64, (u64, u64))>,
}
