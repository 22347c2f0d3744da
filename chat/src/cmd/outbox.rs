//! `sbchat outbox`: the messages that got no ✓ yet (a `send` that exited 3)
//! and go out with the next command that connects; `outbox cancel ID`
//! removes one so it is never sent. Works offline, through the SDK's
//! [`Outbox`], which holds the device's lock like a running client.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::json;
use switchboard_client::{Outbox, QueuedSend};

use super::{Ctx, state_error};
use crate::cli::OutboxAction;

pub fn run(ctx: &Ctx, action: Option<OutboxAction>) -> Result<()> {
    let _lock = ctx.home.lock()?;
    let mut outbox = Outbox::open(ctx.home.state_dir(), ctx.home.outbox_dir())
        .map_err(state_error)
        .context("cannot open the outbox")?;
    match action {
        None => {
            list(ctx, &outbox.list());
            Ok(())
        }
        Some(OutboxAction::Cancel { id }) => {
            let id = id.trim();
            if !outbox
                .cancel(id)
                .with_context(|| format!("cannot cancel {id}"))?
            {
                bail!("no message {id} in the outbox (already sent, or cancelled)");
            }
            ctx.out.event(
                &format!("cancelled {id}: it will not be sent"),
                &json!({"event": "cancelled", "client_msg_id": id}),
            );
            Ok(())
        }
    }
}

fn list(ctx: &Ctx, sends: &[QueuedSend]) {
    if sends.is_empty() {
        ctx.out.note("the outbox is empty");
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for send in sends {
        let to = match (&send.to_phone, send.to_user) {
            (Some(phone), _) => phone.clone(),
            (None, Some(user)) => format!("user {user}"),
            (None, None) => "?".to_owned(),
        };
        // 0: stored by an older sbchat that did not record the time.
        let age_s =
            (send.queued_at_ms > 0).then(|| now_ms.saturating_sub(send.queued_at_ms) / 1000);
        let age = age_s.map_or_else(
            || "age unknown".to_owned(),
            |s| format!("queued {} ago", human(s)),
        );
        ctx.out.event(
            &format!("{}  to {to}  {age}", send.client_msg_id),
            &json!({
                "event": "queued",
                "client_msg_id": send.client_msg_id,
                "to": send.to_phone,
                "to_user": send.to_user,
                "queued_at_ms": send.queued_at_ms,
                "age_s": age_s,
            }),
        );
    }
}

/// `s` seconds as `42s`, `5m`, `3h` or `2d`.
fn human(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(61), "1m");
        assert_eq!(human(7200), "2h");
        assert_eq!(human(200_000), "2d");
    }
}
