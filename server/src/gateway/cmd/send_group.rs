//! `SendGroup`: one message to every member device of a group, its payload
//! stored once; limited per user and per user→group pair like sends.

use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::{answer, valid_msg_id};
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::{error, route_error};
use crate::router::{GroupSendRequest, GroupSent};
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::SendGroup,
) {
    if !valid_msg_id(&req.client_msg_id) {
        conn.respond_error(
            id,
            error(
                ErrorCode::BadRequest,
                format!(
                    "client_msg_id must be 1 to {} bytes",
                    limits::MAX_CLIENT_MSG_ID_BYTES
                ),
            ),
        );
        return;
    }
    if req.payload.len() > limits::MAX_PAYLOAD_BYTES {
        conn.respond_error(
            id,
            error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the payload is {} bytes; the maximum is {}",
                    req.payload.len(),
                    limits::MAX_PAYLOAD_BYTES
                ),
            ),
        );
        return;
    }
    if let Err(refused) = conn.gw.limits.send(device.user, req.group_id) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let send = GroupSendRequest {
        from: device,
        from_phone: conn.phone(),
        group_id: req.group_id,
        client_msg_id: req.client_msg_id,
        payload: req.payload,
        first_attempt: req.first_attempt,
    };
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.send_group(send).await;
        Some(answer(id, result, |a: GroupSent| {
            Out::SendOk(pb::SendOk {
                server_ts_ms: a.server_ts_ms,
                duplicate: a.duplicate,
                group_seq: a.group_seq,
            })
        }))
    }));
}
