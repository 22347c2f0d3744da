//! `sbchat whoami`: the stored account and what waits in the outbox.

use anyhow::Result;
use serde_json::json;

use super::Ctx;

pub fn run(ctx: &Ctx) -> Result<()> {
    let account = ctx.home.require_account()?;
    let pending = switchboard_client::outbox::pending_sends(&ctx.home.outbox_dir())?.len();
    let (server, _) = ctx.server(Some(&account.server))?;
    let c = &account.creds;
    ctx.out.event(
        &format!(
            "{} (user {}, device {}) on {server}; {pending} message(s) waiting in the outbox",
            c.phone, c.user_id, c.device_id
        ),
        &json!({
            "event": "whoami",
            "phone": c.phone,
            "user_id": c.user_id,
            "device_id": c.device_id,
            "server": server,
            "home": ctx.home.dir(),
            "outbox_pending": pending,
        }),
    );
    Ok(())
}
