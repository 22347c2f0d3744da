//! `ListDevices`: the account's devices with their identity keys.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32, device: DeviceKey) {
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.list_devices(device.user).await;
        Some(answer(id, result, |devices| {
            Out::DeviceList(pb::DeviceList { devices })
        }))
    }));
}
