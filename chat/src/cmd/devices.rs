//! `sbchat devices`, `link-code`, `link`, `revoke` and `safety`: this
//! account's devices and the keys that protect its conversations.

use std::future::Future;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use switchboard_client::{Client, DeviceId, Event, register};
use tokio::time::timeout;

use super::{Ctx, REQUEST_TIMEOUT, closed_error, state_error, validate_phone};
use crate::home::Account;

/// Runs `work` with a client for the stored account, within
/// `REQUEST_TIMEOUT`, watching for the client stopping for good meanwhile.
async fn with_client<T, F, Fut>(ctx: &Ctx, work: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let (client, mut events) = ctx.start_client(&account).await?;
    let job = work(client.clone());
    tokio::pin!(job);
    let result = timeout(REQUEST_TIMEOUT, async {
        loop {
            tokio::select! {
                done = &mut job => return done,
                event = events.recv() => match event {
                    Some(Event::Closed { reason }) => return Err(closed_error(&reason)),
                    None => bail!("the client stopped unexpectedly"),
                    // Messages wait on the server for `recv`.
                    Some(_) => {}
                },
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no answer within {REQUEST_TIMEOUT:?}"));
    let _ = client.close().await;
    result?
}

pub async fn list(ctx: &Ctx) -> Result<()> {
    let devices = with_client(ctx, |client| async move {
        client.list_devices().await.context("cannot list devices")
    })
    .await?;
    let mut lines = Vec::new();
    for d in &devices {
        let mut marks = Vec::new();
        if d.primary {
            marks.push("primary");
        }
        if d.this_device {
            marks.push("this device");
        }
        if d.identity_key.is_none() {
            marks.push("no keys yet");
        }
        let marks = if marks.is_empty() {
            String::new()
        } else {
            format!(" ({})", marks.join(", "))
        };
        lines.push(format!("device {}{marks}", d.device_id));
    }
    let value: Vec<_> = devices
        .iter()
        .map(|d| {
            json!({
                "device_id": d.device_id,
                "primary": d.primary,
                "this_device": d.this_device,
                "created_ms": d.created_ms,
                "identity_key": d.identity_key,
            })
        })
        .collect();
    ctx.out.event(
        &lines.join("\n"),
        &json!({"event": "devices", "devices": value}),
    );
    Ok(())
}

pub async fn link_code(ctx: &Ctx) -> Result<()> {
    let code = with_client(ctx, |client| async move {
        client
            .create_link_code()
            .await
            .context("cannot make a link code")
    })
    .await?;
    ctx.out.event(
        &format!(
            "link code: {} — on the new device run `sbchat link {}` within 5 minutes",
            code.code, code.code
        ),
        &json!({"event": "link_code", "code": code.code, "expires_at_ms": code.expires_at_ms}),
    );
    Ok(())
}

pub async fn link(ctx: &Ctx, code: &str) -> Result<()> {
    let _lock = ctx.home.lock()?;
    if let Some(existing) = ctx.home.account()? {
        bail!(
            "{} already holds the account {} (device {}); use another --home for a linked device",
            ctx.home.dir().display(),
            existing.creds.phone,
            existing.creds.device_id
        );
    }
    let (addr, endpoint) = ctx.server(None)?;
    let creds = timeout(
        REQUEST_TIMEOUT,
        register::link_device(
            &endpoint,
            &ctx.connect_options(),
            code,
            ctx.home.state_dir(),
        ),
    )
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
    .map_err(state_error)
    .context("cannot link this device")?;
    let (phone, user_id, device_id) = (creds.phone.clone(), creds.user_id, creds.device_id);
    let account = Account {
        server: addr,
        creds,
    };
    // Its keys are published (by the SDK, from the home's state directory).
    ctx.home.save_account(&account)?;
    ctx.out.event(
        &format!("linked to {phone}: user {user_id}, device {device_id}"),
        &json!({"event": "linked", "phone": phone, "user_id": user_id, "device_id": device_id}),
    );
    Ok(())
}

pub async fn revoke(ctx: &Ctx, device: DeviceId) -> Result<()> {
    with_client(ctx, |client| async move {
        client
            .revoke_device(device)
            .await
            .with_context(|| format!("cannot revoke device {device}"))
    })
    .await?;
    ctx.out.event(
        &format!("device {device} revoked"),
        &json!({"event": "revoked", "device_id": device}),
    );
    Ok(())
}

pub async fn safety(ctx: &Ctx, phone: &str) -> Result<()> {
    let phone = validate_phone(phone)?;
    let lookup = phone.clone();
    let (user_id, number) = with_client(ctx, |client| async move {
        let peer = client
            .lookup(&lookup)
            .await
            .with_context(|| format!("cannot find {lookup}"))?;
        let number = client
            .safety_number(peer.user_id)
            .await
            .context("cannot compute the safety number")?;
        Ok((peer.user_id, number))
    })
    .await?;
    ctx.out.event(
        &format!(
            "safety number with {phone}:\n{number}\ncompare it with theirs (in person or on a call)"
        ),
        &json!({"event": "safety_number", "phone": phone, "user_id": user_id, "number": number}),
    );
    Ok(())
}
