//! `ListGroups`: the groups the requester is a member of; limited per user
//! with phone-number lookups.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::route_error;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32, device: DeviceKey) {
    if let Err(refused) = conn.gw.limits.lookup(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.list_groups(device.user).await;
        Some(answer(id, result, |groups| {
            Out::GroupList(pb::GroupList { groups })
        }))
    }));
}
