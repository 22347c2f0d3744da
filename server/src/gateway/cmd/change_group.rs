//! `ChangeGroup`: add, remove, promote, demote, edit or leave; limited per
//! user (with `CreateGroup`).

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
    req: pb::ChangeGroup,
) {
    if let Err(refused) = conn.gw.limits.group_change(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.change_group(device, req).await;
        Some(answer(id, result, Out::GroupInfo))
    }));
}
