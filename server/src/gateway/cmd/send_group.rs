//! `SendGroup`: one message to every member device of a group, its payload
//! stored once; limited per user and per user→group pair like sends, and
//! kept in order behind a refused one like sends (PROTOCOL.md §11.5.1).

use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::{answer, valid_msg_id};
use crate::gateway::connection::{Conn, End, alongside_pending};
use crate::gateway::link::Link;
use crate::gateway::wire::{HELD_MESSAGE, error, route_error};
use crate::router::{GroupSendRequest, GroupSent, RouteError};
use crate::store::DeviceKey;

/// Groups a connection holds messages for at once (as `cmd::send` does
/// for recipients).
const MAX_HELD_GROUPS: usize = 64;

pub(in crate::gateway) async fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::SendGroup,
) -> Result<(), End> {
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
        return Ok(());
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
        return Ok(());
    }
    // A group message refused here (below) holds this connection's later
    // ones to the same group until it is sent again, so its retry cannot
    // land after them (the group's shard does the same for its refusals).
    if let Some((refused_id, err)) = conn.held_group_sends.get(&req.group_id) {
        if *refused_id != req.client_msg_id {
            let err = pb::Error {
                message: HELD_MESSAGE.into(),
                ..err.clone()
            };
            conn.respond_error(id, err);
            return Ok(());
        }
        conn.held_group_sends.remove(&req.group_id);
    }
    if let Err(refused) = conn.gw.limits.send(device.user, req.group_id) {
        let err = route_error(&refused.into());
        conn.hold_group_sends(req.group_id, req.client_msg_id, &err);
        conn.respond_error(id, err);
        return Ok(());
    }
    let (group, msg_id) = (req.group_id, req.client_msg_id.clone());
    let send = GroupSendRequest {
        from: device,
        from_phone: conn.phone(),
        group_id: req.group_id,
        client_msg_id: req.client_msg_id,
        payload: req.payload,
        first_attempt: req.first_attempt,
    };
    // Into the group shard's inbox in frame order; the ✓ is awaited apart.
    let router = conn.gw.router.clone();
    let (submitted, answers) =
        alongside_pending(&mut conn.pending, router.submit_group_send(send)).await;
    conn.queue_all(answers);
    let reply = match submitted {
        Ok(reply) => reply,
        Err(e) => {
            let err = route_error(&e);
            conn.hold_group_sends(group, msg_id, &err);
            conn.respond_error(id, err);
            return Ok(());
        }
    };
    conn.pending.push(Box::pin(async move {
        let result = reply.await.unwrap_or(Err(RouteError::Internal));
        Some(answer(id, result, |a: GroupSent| {
            Out::SendOk(pb::SendOk {
                server_ts_ms: a.server_ts_ms,
                duplicate: a.duplicate,
                group_seq: a.group_seq,
            })
        }))
    }));
    Ok(())
}

impl<L: Link> Conn<L> {
    /// Holds later group messages to `group` on this connection behind the
    /// message `client_msg_id`, refused with `err` before it reached the
    /// group's shard (retryable refusals only; the first one is held).
    fn hold_group_sends(&mut self, group: u64, client_msg_id: String, err: &pb::Error) {
        if err.retry_after_ms > 0 && self.held_group_sends.len() < MAX_HELD_GROUPS {
            self.held_group_sends
                .entry(group)
                .or_insert_with(|| (client_msg_id, err.clone()));
        }
    }
}
