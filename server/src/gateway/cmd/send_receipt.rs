//! `SendReceipt`: a READ receipt, queued durably for the sender's devices
//! (delivery receipts come from acks, `ack.rs`); limited per user.

use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::{answer, valid_msg_id};
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::{error, route_error};
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::SendReceipt,
) {
    if req.kind() != pb::ReceiptKind::Read {
        conn.respond_error(
            id,
            error(ErrorCode::BadRequest, "clients may only send READ receipts"),
        );
        return;
    }
    if req.client_msg_ids.is_empty()
        || req.client_msg_ids.len() > limits::MAX_RECEIPT_IDS
        || req.client_msg_ids.iter().any(|m| !valid_msg_id(m))
    {
        conn.respond_error(
            id,
            error(
                ErrorCode::BadRequest,
                format!(
                    "a receipt names 1 to {} valid message ids",
                    limits::MAX_RECEIPT_IDS
                ),
            ),
        );
        return;
    }
    if let Err(refused) = conn.gw.limits.read_receipt(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let receipt = pb::Receipt {
        from_user: device.user,
        from_device: device.device,
        from_phone: conn.phone(),
        kind: pb::ReceiptKind::Read as i32,
        client_msg_ids: req.client_msg_ids,
        group_id: req.group_id,
    };
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.enqueue_receipt(req.to_user, receipt, true).await;
        Some(answer(id, result, |()| Out::ReceiptOk(pb::ReceiptOk {})))
    }));
}
