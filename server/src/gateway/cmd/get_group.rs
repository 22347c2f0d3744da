//! `GetGroup`: a group's info and members, for members only; limited per
//! user with phone-number lookups (it names members' numbers).

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
    req: pb::GetGroup,
) {
    if let Err(refused) = conn.gw.limits.lookup(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.get_group(device.user, req.group_id).await;
        Some(answer(id, result, Out::GroupInfo))
    }));
}
