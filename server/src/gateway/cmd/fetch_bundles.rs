//! `FetchBundles`: key bundles of a user's devices, each using up one
//! one-time key; limited per requesting user here, per target device by
//! its shard.

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
    req: pb::FetchBundles,
) {
    // Per requesting user; the targets' one-time keys are
    // budgeted per device by their shard.
    if let Err(refused) = conn.gw.limits.bundle_fetch(device.user) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw
            .router
            .fetch_bundles(device, req.user_id, req.identities_only)
            .await;
        Some(answer(id, result, |devices| {
            Out::Bundles(pb::Bundles {
                user_id: req.user_id,
                devices,
            })
        }))
    }));
}
