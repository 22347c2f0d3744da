//! `Ping`: a keep-alive, answered with the server's clock. Allowed before
//! authentication.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use crate::clock::now_ms;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32) {
    conn.respond(
        id,
        Out::Pong(pb::Pong {
            server_time_ms: now_ms(),
        }),
    );
}
