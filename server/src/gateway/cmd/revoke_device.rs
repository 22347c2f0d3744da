//! `RevokeDevice`: the primary device removes another device of its
//! account.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::RevokeDevice,
) {
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.revoke_device(device, req.device_id).await;
        Some(answer(id, result, |()| {
            Out::DeviceRevoked(pb::DeviceRevoked {})
        }))
    }));
}
