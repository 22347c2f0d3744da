//! `UploadKeys`: a device publishes its keys; the signatures are checked
//! here, before the owning shard stores them. A device's first identity
//! is announced to its user's groups (`Router::announce_new_device`).

use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::error;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    up: pb::UploadKeys,
) {
    if let Err(msg) = crate::keys::verify_upload(&up) {
        conn.respond_error(id, error(ErrorCode::InvalidKeys, msg));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = gw.router.upload_keys(device, up).await;
        if let Ok((_, true)) = result {
            // A new device is reachable: its user's groups hear of it, so
            // their senders give it their keys (after this answer).
            let router = gw.router.clone();
            tokio::spawn(async move { router.announce_new_device(device.user).await });
        }
        Some(answer(id, result, |(n, _)| {
            Out::KeysUploaded(pb::KeysUploaded {
                one_time_keys_remaining: n,
            })
        }))
    }));
}
