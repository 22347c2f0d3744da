//! `sbchat pin set|clear`: two-step verification. With a PIN set, whoever
//! registers this number again needs it besides the SMS code.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use switchboard_client::register;
use tokio::io::AsyncBufReadExt;
use tokio::time::timeout;

use super::{Ctx, REQUEST_TIMEOUT};
use crate::cli::PinAction;

pub async fn run(ctx: &Ctx, action: PinAction) -> Result<()> {
    let pin = match action {
        PinAction::Set { pin: Some(pin) } => pin,
        PinAction::Set { pin: None } => read_pin().await?,
        PinAction::Clear => String::new(),
    };
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let (addr, endpoint) = ctx.server(Some(&account.server))?;
    let enabled = timeout(
        REQUEST_TIMEOUT,
        register::set_pin(&endpoint, &ctx.connect_options(), &account.creds, &pin),
    )
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
    .context(if pin.is_empty() {
        "cannot clear the PIN"
    } else {
        "cannot set the PIN"
    })?;
    let text = if enabled {
        "PIN set: registering this number again needs it"
    } else {
        "PIN cleared"
    };
    ctx.out
        .event(text, &json!({"event": "pin", "enabled": enabled}));
    Ok(())
}

/// One line of standard input, without its line ending.
async fn read_pin() -> Result<String> {
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("cannot read the PIN from standard input")?;
    let pin = line.trim_end_matches(['\r', '\n']).to_owned();
    if pin.is_empty() {
        bail!("no PIN given: pass it as an argument or on standard input");
    }
    Ok(pin)
}
