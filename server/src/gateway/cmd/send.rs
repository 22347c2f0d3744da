//! `Send`: the hot path. Checks sizes, ids and the sender's own devices,
//! keeps a device's sends to one user in order behind a refused one, takes
//! the per-user send limit, and submits the recipient's part and the
//! sender's copies to their shards in frame order. The ✓ usually comes back
//! through the push queue (`Conn::on_push`), else as a pending answer.

use std::collections::BTreeSet;

use switchboard_proto::limits;
use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::{answer, valid_msg_id};
use crate::gateway::connection::{Conn, End, alongside_pending};
use crate::gateway::link::Link;
use crate::gateway::wire::{HELD_MESSAGE, error, route_error};
use crate::router::{AnswerTo, RouteError, SendAccepted, SendRequest};
use crate::store::{DeviceKey, UserId};

/// Most devices one send may address: a user has at most five devices, and
/// 16 full payloads still fit the default frame limit.
pub(super) const MAX_PAYLOADS_PER_SEND: usize = 16;

/// Recipients a connection holds sends for at once: a client refused for
/// more recipients than this at a time (only a flooder is) gets no order
/// guarantee for the rest, and the connection's memory stays bounded.
const MAX_HELD_RECIPIENTS: usize = 64;

pub(in crate::gateway) async fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::Send,
) -> Result<(), End> {
    if let Err(msg) = validate_send(&req) {
        conn.respond_error(id, error(ErrorCode::BadRequest, msg));
        return Ok(());
    }
    if let Some(too_big) = req
        .payloads
        .iter()
        .chain(&req.self_payloads)
        .find(|p| p.payload.len() > limits::MAX_PAYLOAD_BYTES)
    {
        conn.respond_error(
            id,
            error(
                ErrorCode::PayloadTooLarge,
                format!(
                    "payload for device {} is {} bytes; the maximum is {}",
                    too_big.device_id,
                    too_big.payload.len(),
                    limits::MAX_PAYLOAD_BYTES
                ),
            ),
        );
        return Ok(());
    }
    if req.to_user == device.user && !req.self_payloads.is_empty() {
        conn.respond_error(
            id,
            error(
                ErrorCode::BadRequest,
                "a note to self addresses the other devices in payloads; self_payloads must be empty",
            ),
        );
        return Ok(());
    }
    let to_self = req.to_user == device.user;
    if !to_self && let Some(mismatch) = conn.own_devices_mismatch(device, &req) {
        conn.respond_error(id, route_error(&mismatch));
        return Ok(());
    }
    // A send refused here (below) holds later sends to the same
    // user on this connection until it is sent again, so its
    // retry cannot land after them (the shards do the same for
    // their refusals: `router::order`).
    if let Some((refused_id, err)) = conn.held_sends.get(&req.to_user) {
        if *refused_id != req.client_msg_id {
            let err = pb::Error {
                message: HELD_MESSAGE.into(),
                ..err.clone()
            };
            conn.respond_error(id, err);
            return Ok(());
        }
        conn.held_sends.remove(&req.to_user);
    }
    if let Err(refused) = conn.gw.limits.send(device.user, req.to_user) {
        let err = route_error(&refused.into());
        conn.hold_sends(req.to_user, req.client_msg_id, &err);
        conn.respond_error(id, err);
        return Ok(());
    }
    let phone = conn.phone();
    let send = SendRequest {
        from: device,
        from_phone: phone.clone(),
        client_msg_id: req.client_msg_id.clone(),
        to_user: req.to_user,
        payloads: req.payloads,
        first_attempt: req.first_attempt,
        group_id: 0,
    };
    let copies = (!to_self).then(|| SendRequest {
        from: device,
        from_phone: phone,
        client_msg_id: req.client_msg_id,
        to_user: req.to_user,
        payloads: req.self_payloads,
        first_attempt: req.first_attempt,
        group_id: 0,
    });
    // Both parts are enqueued in frame order (so each device's
    // messages keep their order); the ✓ means both parts are
    // durable. It usually comes as a push; across shards it is
    // awaited concurrently.
    let to = AnswerTo {
        conn_id: conn.conn_id,
        frame: id,
    };
    let to_user = req.to_user;
    let msg_id = send.client_msg_id.clone();
    let (submitted, answers) = alongside_pending(
        &mut conn.pending,
        conn.gw.router.submit_send(send, copies, to),
    )
    .await;
    conn.queue_all(answers);
    let ticket = match submitted {
        Ok(Some(t)) => t,
        Ok(None) => {
            conn.sends_in_flight += 1;
            return Ok(());
        }
        Err(e) => {
            let err = route_error(&e);
            conn.hold_sends(to_user, msg_id, &err);
            conn.respond_error(id, err);
            return Ok(());
        }
    };
    let started = std::time::Instant::now();
    let ack_seconds = conn.gw.metrics.send_ack_seconds.clone();
    conn.pending.push(Box::pin(async move {
        let result = ticket.accepted().await;
        if result.is_ok() {
            ack_seconds.record(started.elapsed().as_secs_f64());
        }
        Some(answer(id, result, send_ok))
    }));
    Ok(())
}

impl<L: Link> Conn<L> {
    /// Holds later sends to `to_user` on this connection behind the send
    /// `client_msg_id`, refused with `err` before it reached a shard
    /// (retryable refusals only; the first refused send is the one held).
    fn hold_sends(&mut self, to_user: UserId, client_msg_id: String, err: &pb::Error) {
        if err.retry_after_ms > 0 && self.held_sends.len() < MAX_HELD_RECIPIENTS {
            self.held_sends
                .entry(to_user)
                .or_insert_with(|| (client_msg_id, err.clone()));
        }
    }

    /// Whether a send's `self_payloads` miss or name devices other than the
    /// account's other devices. Device ids in one list are unique
    /// (`validate_send`), so equal lengths and inclusion mean equal sets.
    fn own_devices_mismatch(&self, device: DeviceKey, req: &pb::Send) -> Option<RouteError> {
        let other_devices = &self.authed.as_ref()?.other_devices;
        if req.self_payloads.len() == other_devices.len()
            && req
                .self_payloads
                .iter()
                .all(|p| other_devices.contains(&p.device_id))
        {
            return None;
        }
        let addressed: BTreeSet<u32> = req.self_payloads.iter().map(|p| p.device_id).collect();
        Some(RouteError::DeviceMismatch {
            user: device.user,
            missing: other_devices.difference(&addressed).copied().collect(),
            stale: addressed.difference(other_devices).copied().collect(),
        })
    }
}

/// The ✓ of a send.
pub(in crate::gateway) fn send_ok(a: SendAccepted) -> Out {
    Out::SendOk(pb::SendOk {
        server_ts_ms: a.server_ts_ms,
        duplicate: a.duplicate,
        group_seq: 0,
    })
}

fn validate_send(req: &pb::Send) -> Result<(), String> {
    if !valid_msg_id(&req.client_msg_id) {
        return Err(format!(
            "client_msg_id must be 1 to {} bytes",
            limits::MAX_CLIENT_MSG_ID_BYTES
        ));
    }
    if req.to_user == 0 {
        return Err("to_user is required".into());
    }
    if req.payloads.len() + req.self_payloads.len() > MAX_PAYLOADS_PER_SEND {
        return Err(format!("at most {MAX_PAYLOADS_PER_SEND} payloads per send"));
    }
    // At most 16 payloads: comparing pairs is cheaper than hashing.
    for list in [&req.payloads, &req.self_payloads] {
        for (i, p) in list.iter().enumerate() {
            if list.iter().take(i).any(|q| q.device_id == p.device_id) {
                return Err(format!("device {} addressed twice", p.device_id));
            }
        }
    }
    Ok(())
}
