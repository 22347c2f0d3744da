//! `sbchat register` and `sbchat verify`: phone verification.

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use switchboard_client::register;
use tokio::time::timeout;

use super::{Ctx, REQUEST_TIMEOUT, state_error, validate_phone};
use crate::home::{Account, Pending};

/// The locale of the environment (`pt_BR.UTF-8` → `pt-BR`), if it names a
/// language (not `C` or `POSIX`).
fn env_locale() -> Option<String> {
    let raw = ["LC_ALL", "LC_MESSAGES", "LANG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))?;
    let tag = raw.split(['.', '@']).next()?.replace('_', "-");
    let usable = !matches!(tag.as_str(), "" | "C" | "POSIX")
        && tag
            .split('-')
            .all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()));
    usable.then_some(tag)
}

pub async fn register(ctx: &Ctx, phone: &str, force: bool, locale: Option<String>) -> Result<()> {
    let locale = locale.or_else(env_locale).unwrap_or_default();
    let phone = validate_phone(phone)?;
    let stored = ctx.home.account()?;
    if let Some(old) = &stored
        && !force
    {
        // Verifying would replace this account (and drop its outbox): a
        // new user trying `register` again must not lose it by accident.
        return Err(anyhow!(
            "this home already holds the account {} (user {}); use another --home, \
             or `sbchat register {phone} --force` to replace it",
            old.creds.phone,
            old.creds.user_id
        ));
    }
    let stored = stored.map(|a| a.server);
    let (addr, endpoint) = ctx.server(stored.as_deref())?;
    let sent = timeout(
        REQUEST_TIMEOUT,
        register::request_code_in(&endpoint, &ctx.connect_options(), &phone, &locale),
    )
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
    .with_context(|| format!("cannot request a code from {addr}"))?;
    ctx.home.save_pending(&Pending {
        server: addr,
        phone: phone.clone(),
        expires_at_ms: sent.expires_at_ms,
    })?;
    ctx.out.event(
        &format!("code sent to {phone}; now run `sbchat verify <code>`"),
        &json!({"event": "code_sent", "phone": phone, "expires_at_ms": sent.expires_at_ms}),
    );
    Ok(())
}

pub async fn verify(ctx: &Ctx, code: &str, pin: Option<&str>) -> Result<()> {
    let _lock = ctx.home.lock()?;
    let pending = ctx.home.pending()?.ok_or_else(|| {
        anyhow!("no registration in progress: run `sbchat register <phone>` first")
    })?;
    let (addr, endpoint) = ctx.server(Some(&pending.server))?;
    let creds = timeout(
        REQUEST_TIMEOUT,
        register::verify_code_with_pin(
            &endpoint,
            &ctx.connect_options(),
            &pending.phone,
            code.trim(),
            pin.unwrap_or_default(),
            ctx.home.state_dir(),
        ),
    )
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
    .map_err(state_error)
    .with_context(|| format!("cannot verify {}", pending.phone))?;
    if let Some(old) = ctx.home.account()?
        && old.creds.user_id != creds.user_id
    {
        // Messages queued by another account must not go out as this one.
        ctx.home.clear_outbox()?;
    }
    let (phone, user_id, device_id) = (creds.phone.clone(), creds.user_id, creds.device_id);
    let account = Account {
        server: addr,
        creds,
    };
    // The SDK has published the new identity's keys from the home's state
    // directory: others can message this device before it ever runs `recv`.
    ctx.home.save_account(&account)?;
    ctx.home.remove_pending()?;
    ctx.out.event(
        &format!("verified {phone}: user {user_id}, device {device_id}"),
        &json!({"event": "verified", "phone": phone, "user_id": user_id, "device_id": device_id}),
    );
    Ok(())
}
