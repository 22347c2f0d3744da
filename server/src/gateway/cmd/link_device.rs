//! `LinkDevice`: a link code from the primary device joins a new linked
//! device to its account. Allowed before authentication; wrong codes count
//! towards the connection's failed authentications.

use switchboard_proto::pb::{self, ErrorCode, server_frame::Body as Out};

use super::MAX_AUTH_FAILURES;
use crate::gateway::connection::{Conn, End, alongside_pending};
use crate::gateway::link::Link;
use crate::gateway::wire::{error, route_error};
use crate::router::RouteError;

pub(in crate::gateway) async fn run<L: Link>(
    conn: &mut Conn<L>,
    id: u32,
    req: pb::LinkDevice,
) -> Result<(), End> {
    if conn.authed.is_some() {
        conn.respond_error(
            id,
            error(ErrorCode::AlreadyAuthenticated, "already authenticated"),
        );
        return Ok(());
    }
    let (linked, answers) =
        alongside_pending(&mut conn.pending, conn.gw.router.link_device(&req.code)).await;
    conn.queue_all(answers);
    match linked {
        Ok(r) => conn.respond(
            id,
            Out::Verified(pb::Verified {
                user_id: r.user,
                device_id: r.device,
                credential: r.credential.into(),
            }),
        ),
        Err(e) => {
            conn.respond_error(id, route_error(&e));
            if matches!(e, RouteError::LinkCodeInvalid) {
                conn.auth_failures += 1;
                if conn.auth_failures >= MAX_AUTH_FAILURES {
                    return Err(End::Goodbye(ErrorCode::LinkCodeInvalid));
                }
            }
        }
    }
    Ok(())
}
