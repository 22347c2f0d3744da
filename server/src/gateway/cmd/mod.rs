//! One module per client request kind, named after its `ClientFrame` body
//! (`Send` → `send.rs`): each validates its request, checks its limits and
//! calls the router, then answers at once or leaves a future answering
//! later in the connection's `pending` set.
//!
//! The one dispatch is `Conn::on_frame` in `connection.rs`, a `match` with
//! one arm per kind; it checks authentication for the kinds that need it
//! and passes the authenticated device. The per-connection state stays in
//! `Conn` (`connection.rs`) and a command borrows it. Each `run` is a plain
//! (generic, not boxed, not dynamic) function, so the send and ack paths
//! cost what they did when this code was inline in the frame loop.
//!
//! A new request kind is its message in the schema, a file here and an arm
//! in `on_frame`; if it needs a shard, a `Router` method and a shard command
//! (`router/shard/`).

pub(super) mod ack;
pub(super) mod auth;
pub(super) mod change_group;
pub(super) mod create_group;
pub(super) mod create_link_code;
pub(super) mod fetch_bundles;
pub(super) mod get_group;
pub(super) mod link_device;
pub(super) mod list_devices;
pub(super) mod list_groups;
pub(super) mod lookup_user;
pub(super) mod ping;
pub(super) mod request_code;
pub(super) mod revoke_device;
pub(super) mod send;
pub(super) mod send_group;
pub(super) mod send_group_keys;
pub(super) mod send_receipt;
pub(super) mod set_pin;
pub(super) mod upload_keys;
pub(super) mod verify_code;

use switchboard_proto::limits;
use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::wire::{error_frame, route_error};
use crate::router::RouteError;

/// Failed authentications tolerated on one connection before it is closed,
/// so credentials cannot be guessed at line rate.
const MAX_AUTH_FAILURES: u32 = 3;

fn valid_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= limits::MAX_CLIENT_MSG_ID_BYTES
}

/// A response frame from a router result.
pub(super) fn answer<T>(
    id: u32,
    result: Result<T, RouteError>,
    ok: impl FnOnce(T) -> Out,
) -> pb::ServerFrame {
    match result {
        Ok(v) => pb::ServerFrame {
            id,
            body: Some(ok(v)),
        },
        Err(e) => error_frame(id, route_error(&e)),
    }
}
