//! `Auth`: a device's credential binds the connection to it; the owning
//! shard registers the connection for pushes and starts draining its
//! queue. Failed attempts are counted; a few end the connection.

use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::MAX_AUTH_FAILURES;
use crate::clock::now_ms;
use crate::gateway::connection::{Authed, Conn, End, MAX_IN_FLIGHT, alongside_pending};
use crate::gateway::link::Link;
use crate::gateway::wire::{error, route_error};
use crate::router::{ConnLink, RouteError, conn_queue};
use crate::store::DeviceKey;
use crate::telemetry as tm;

pub(in crate::gateway) async fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    req: pb::Auth,
) -> Result<(), End> {
    if conn.authed.is_some() {
        conn.respond_error(
            id,
            error(ErrorCode::AlreadyAuthenticated, "already authenticated"),
        );
        return Ok(());
    }
    let device = DeviceKey {
        user: req.user_id,
        device: req.device_id,
    };
    // The connection's push queue. The shard holds the sender and uses
    // try_send; when it is full the shard kicks us as a slow reader.
    // Room for the answers of the sends that may be in flight, too.
    let (push_tx, push_rx) = conn_queue(conn.gw.cfg.outbound_queue_frames + MAX_IN_FLIGHT);
    let link = ConnLink {
        conn_id: conn.conn_id,
        push: push_tx,
    };
    let (authenticated, answers) = alongside_pending(
        &mut conn.pending,
        conn.gw
            .router
            .authenticate(device, req.credential.to_vec(), link),
    )
    .await;
    conn.queue_all(answers);
    match authenticated {
        Ok(info) => {
            tracing::Span::current().record("user", device.user);
            tracing::debug!(user = device.user, device = device.device, "authenticated");
            conn.respond(
                id,
                Out::AuthOk(pb::AuthOk {
                    phone: info.phone.clone(),
                    server_time_ms: now_ms(),
                    one_time_keys_remaining: info.one_time_keys,
                    has_keys: info.has_keys,
                    primary: info.primary,
                }),
            );
            metrics::gauge!(tm::AUTHENTICATED).increment(1.0);
            conn.authed = Some(Authed {
                device,
                phone: info.phone,
                other_devices: info
                    .devices
                    .into_iter()
                    .filter(|d| *d != device.device)
                    .collect(),
            });
            conn.push_rx = Some(push_rx);
        }
        Err(e) => {
            conn.respond_error(id, route_error(&e));
            if matches!(e, RouteError::Unauthenticated) {
                conn.auth_failures += 1;
                if conn.auth_failures >= MAX_AUTH_FAILURES {
                    return Err(End::Goodbye(ErrorCode::Unauthenticated));
                }
            }
        }
    }
    Ok(())
}
