//! `SendGroupKeys`: pairwise payloads about a group (the SDK's sender keys)
//! for many members in one request. Each part is an ordinary send to one
//! member's devices (same shard path, device check, quota, dedup and order
//! holds as `Send`), marked with the group so it owes no receipt. The
//! request counts as one send against the sender's limits; only members of
//! the group can be addressed, so it is no way around the per-pair limit
//! for strangers.

use std::collections::HashSet;

use futures_util::future::join_all;
use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::send::MAX_PAYLOADS_PER_SEND;
use super::valid_msg_id;
use crate::clock::now_ms;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::{error, error_frame, route_error};
use crate::router::{RouteError, Router, SendRequest};
use crate::store::{DeviceKey, UserId};

/// Most parts (users) in one request: 256 users with five devices each and
/// sender-key payloads of about 600 bytes fill most of a 1 MiB frame.
pub(in crate::gateway) const MAX_PARTS: usize = 256;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::SendGroupKeys,
) {
    if let Err(msg) = validate(&req) {
        conn.respond_error(id, error(ErrorCode::BadRequest, msg));
        return;
    }
    if let Some((user, too_big)) = req.parts.iter().find_map(|part| {
        part.payloads
            .iter()
            .find(|p| p.payload.len() > limits::MAX_PAYLOAD_BYTES)
            .map(|p| (part.user_id, p))
    }) {
        conn.respond_error(
            id,
            error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "payload for device {} of user {user} is {} bytes; the maximum is {}",
                    too_big.device_id,
                    too_big.payload.len(),
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
    let gw = conn.gw.clone();
    let phone = conn.phone();
    conn.pending.push(Box::pin(async move {
        Some(match distribute(&gw.router, device, phone, req).await {
            Ok(sent) => pb::ServerFrame {
                id,
                body: Some(Out::GroupKeysSent(sent)),
            },
            Err(e) => error_frame(id, route_error(&e)),
        })
    }));
}

/// Checks the sender's membership, then hands every member's part to its
/// shard (in request order, so each member's parts keep the order of the
/// sender's requests) and gathers the refusals.
async fn distribute(
    router: &Router,
    from: DeviceKey,
    from_phone: String,
    req: pb::SendGroupKeys,
) -> Result<pb::GroupKeysSent, RouteError> {
    let info = router.get_group(from.user, req.group_id).await?;
    let members: HashSet<UserId> = info.members.iter().map(|m| m.user_id).collect();
    let mut refused = Vec::new();
    let mut tickets = Vec::with_capacity(req.parts.len());
    for part in req.parts {
        let user = part.user_id;
        if !members.contains(&user) {
            refused.push(part_error(user, &RouteError::NotGroupMember));
            continue;
        }
        let send = SendRequest {
            from,
            from_phone: from_phone.clone(),
            client_msg_id: req.client_msg_id.clone(),
            to_user: user,
            payloads: part.payloads,
            first_attempt: req.first_attempt,
            group_id: req.group_id,
        };
        match router.submit_part(send).await {
            Ok(ticket) => tickets.push((user, ticket)),
            Err(e) => refused.push(part_error(user, &e)),
        }
    }
    let answers = join_all(
        tickets
            .into_iter()
            .map(|(user, ticket)| async move { (user, ticket.accepted().await) }),
    )
    .await;
    refused.extend(
        answers
            .into_iter()
            .filter_map(|(user, answer)| answer.err().map(|e| part_error(user, &e))),
    );
    Ok(pb::GroupKeysSent {
        refused,
        server_ts_ms: now_ms(),
    })
}

/// The refusal of the part for `user`.
fn part_error(user: UserId, e: &RouteError) -> pb::Error {
    pb::Error {
        user_id: user,
        ..route_error(e)
    }
}

fn validate(req: &pb::SendGroupKeys) -> Result<(), String> {
    if !valid_msg_id(&req.client_msg_id) {
        return Err(format!(
            "client_msg_id must be 1 to {} bytes",
            limits::MAX_CLIENT_MSG_ID_BYTES
        ));
    }
    if req.group_id == 0 {
        return Err("group_id is required".into());
    }
    if req.parts.is_empty() || req.parts.len() > MAX_PARTS {
        return Err(format!("1 to {MAX_PARTS} parts per request"));
    }
    let mut users = HashSet::with_capacity(req.parts.len());
    for part in &req.parts {
        if part.user_id == 0 {
            return Err("a part needs a user_id".into());
        }
        if !users.insert(part.user_id) {
            return Err(format!("user {} addressed twice", part.user_id));
        }
        if part.payloads.is_empty() || part.payloads.len() > MAX_PAYLOADS_PER_SEND {
            return Err(format!(
                "1 to {MAX_PAYLOADS_PER_SEND} payloads per part (user {})",
                part.user_id
            ));
        }
        for (i, p) in part.payloads.iter().enumerate() {
            if part
                .payloads
                .iter()
                .take(i)
                .any(|q| q.device_id == p.device_id)
            {
                return Err(format!(
                    "device {} of user {} addressed twice",
                    p.device_id, part.user_id
                ));
            }
        }
    }
    Ok(())
}
