//! `VerifyCode`: the right code (and PIN, if the account has one)
//! registers a new primary device. Allowed before authentication.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32, req: pb::VerifyCode) {
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.verify_code(req.phone, req.code, req.pin).await;
        Some(answer(id, result, |r| {
            Out::Verified(pb::Verified {
                user_id: r.user,
                device_id: r.device,
                credential: r.credential.into(),
            })
        }))
    }));
}
