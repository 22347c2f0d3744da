//! `RequestCode`: a verification code for a phone number, issued by the
//! number's shard and delivered by the code sender. Allowed before
//! authentication; limited per client address here and per number by the
//! shard. The client's locale, checked here, is passed to the sender.

use switchboard_proto::pb::{self, server_frame::Body as Out};

use super::answer;
use crate::accounts::CodeSendError;
use crate::gateway::connection::Conn;
use crate::gateway::link::Link;
use crate::gateway::wire::route_error;
use crate::router::RouteError;

pub(in crate::gateway) fn run<L: Link>(conn: &mut Conn<L>, id: u32, req: pb::RequestCode) {
    if let Err(why) = crate::accounts::check_locale(&req.locale) {
        conn.respond_error(id, route_error(&RouteError::BadRequest(why)));
        return;
    }
    if let Err(refused) = conn.gw.limits.code_request(conn.peer) {
        conn.respond_error(id, route_error(&refused.into()));
        return;
    }
    let gw = conn.gw.clone();
    conn.pending.push(Box::pin(async move {
        let result = async {
            let sent = |e: CodeSendError| match e {
                CodeSendError::Unavailable { retry_after_ms } => {
                    RouteError::CodeSenderUnavailable { retry_after_ms }
                }
                other => RouteError::CodeDelivery(other.to_string()),
            };
            gw.code_sender.check_available().map_err(sent)?;
            let issued = gw.router.request_code(req.phone.clone()).await?;
            let locale = Some(req.locale.as_str()).filter(|l| !l.is_empty());
            gw.code_sender
                .send(&req.phone, &issued.code, locale)
                .await
                .map_err(sent)?;
            Ok::<_, RouteError>(issued.expires_at_ms)
        }
        .await;
        Some(answer(id, result, |expires_at_ms| {
            Out::CodeSent(pb::CodeSent { expires_at_ms })
        }))
    }));
}
