//! `CreateLinkCode`: the primary device gets a code for linking a new
//! device.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32, device: DeviceKey) {
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.create_link_code(device).await;
        Some(answer(id, result, |(code, expires_at_ms)| {
            Out::LinkCode(pb::LinkCode {
                code,
                expires_at_ms,
            })
        }))
    }));
}
