//! `SetPin`: the primary device sets or (empty) clears the account's
//! two-step PIN, hashed here on the blocking pool.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::router::RouteError;
use crate::store::DeviceKey;

pub(in crate::gateway) fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    device: DeviceKey,
    req: pb::SetPin,
) {
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = async {
            let hash = if req.pin.is_empty() {
                String::new()
            } else {
                crate::accounts::validate_pin(&req.pin)
                    .map_err(|e| RouteError::BadRequest(e.to_string()))?;
                // Argon2 is slow on purpose: off the runtime.
                tokio::task::spawn_blocking(move || crate::accounts::hash_pin(&req.pin))
                    .await
                    .map_err(|_| RouteError::Internal)?
                    .map_err(|e| RouteError::BadRequest(e.to_string()))?
            };
            gw.router.set_pin(device, hash).await
        }
        .await;
        Some(answer(id, result, |enabled| {
            Out::PinSet(pb::PinSet { enabled })
        }))
    }));
}
