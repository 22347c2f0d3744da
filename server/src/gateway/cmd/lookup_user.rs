//! `LookupUser`: a user's id and devices by phone number; limited per
//! user.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::route_error;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::LookupUser,
) {
    if let Err(refused) = conn.gw.limits.lookup(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.lookup_phone(req.phone).await;
        Some(answer(id, result, |u| {
            Out::UserInfo(pb::UserInfo {
                user_id: u.user,
                phone: u.phone,
                devices: u.devices,
            })
        }))
    }));
}
