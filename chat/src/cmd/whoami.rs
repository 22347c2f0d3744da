//! `sbchat whoami`: the stored account and what waits in the outbox.

use anyhow::Result;
use serde_json::json;

use super::Ctx;

pub fn run(ctx: &Ctx) -> Result<()> {
    let account = ctx.home.require_account()?;
    // Unknown (null) while another sbchat holds the device's outbox.
    let pending = switchboard_client::Outbox::open(ctx.home.state_dir(), ctx.home.outbox_dir())
        .ok()
        .map(|outbox| outbox.list().len());
    let (server, _) = ctx.server(Some(&account.server))?;
    let c = &account.creds;
    ctx.out.event(
        &format!(
            "{} (user {}, device {}) on {server}; {} waiting in the outbox",
            c.phone,
            c.user_id,
            c.device_id,
            pending.map_or_else(
                || "an unknown number of messages (in use by another sbchat)".to_owned(),
                |n| format!("{n} message(s)")
            ),
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
