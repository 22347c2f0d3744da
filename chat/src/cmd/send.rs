//! `sbchat send`: one message, exit 0 on ✓ (or ✓✓ with `--wait-delivered`).
//!
//! The text comes from the command line, standard input or a file, and is
//! checked against the size limit before anything connects. The message is
//! written to the outbox before it goes out, so if this process dies or
//! times out before ✓, the next sbchat command sends it (with the same id,
//! so the server stores it once). Without `--wait-delivered`, messages and
//! receipts that arrive meanwhile are left on the server for `sbchat recv`;
//! with it, those queued ahead of the ✓✓ are moved to the home's inbox
//! (see `inbox`), since the server hands out nothing newer until they are
//! acknowledged.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use serde_json::json;
use switchboard_client::{
    Client, Event, Events, GroupId, MAX_PLAINTEXT_BYTES, ReceiptKind, new_client_msg_id,
};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::cli::{QueuedError, UsageError};
use crate::contacts::Contacts;
use crate::inbox::{Inbox, Kept};

use super::{
    Ctx, LinkStatus, check_message_len, closed_error, kind_name, print_sent, validate_phone,
};

/// How far the send got, to explain a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sending,
    WaitingForDelivery,
}

/// Where the text comes from.
pub enum Source<'a> {
    Arg(String),
    Stdin,
    File(&'a Path),
}

impl<'a> Source<'a> {
    /// From the command line: `text` (`-` is stdin), else `file`, else
    /// stdin unless it is a terminal (nobody would see a prompt for it).
    pub fn new(text: Option<String>, file: Option<&'a Path>) -> Result<Self> {
        match (text, file) {
            (Some(text), _) if text == "-" => Ok(Self::Stdin),
            (Some(text), _) => Ok(Self::Arg(text)),
            (None, Some(path)) => Ok(Self::File(path)),
            (None, None) if std::io::stdin().is_terminal() => Err(anyhow!(UsageError(
                "no message: give the text, `-` to read standard input, or --file PATH".into()
            ))),
            (None, None) => Ok(Self::Stdin),
        }
    }

    /// The message, checked: UTF-8, not empty, within the limit.
    async fn read(self) -> Result<String> {
        let complete = matches!(self, Self::Arg(_));
        let bytes = match self {
            Self::Arg(text) => text.into_bytes(),
            Self::Stdin => strip_newline(
                read_bounded(tokio::io::stdin())
                    .await
                    .context("cannot read standard input")?,
            ),
            Self::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                strip_newline(
                    read_bounded(file)
                        .await
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
            }
        };
        check_message_len(bytes.len(), complete)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow!(UsageError("the message is not UTF-8 text".into())))?;
        if text.trim().is_empty() {
            return Err(anyhow!(UsageError("the message is empty".into())));
        }
        Ok(text)
    }
}

/// Reads at most a little more than the limit (enough to tell it was
/// exceeded, even after a trailing newline is dropped): a huge input is
/// refused without being held in memory.
async fn read_bounded(reader: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(MAX_PLAINTEXT_BYTES as u64 + 3)
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

/// Drops one trailing line ending, as `$(cat file)` would (all of them).
fn strip_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

pub async fn run(
    ctx: &Ctx,
    phone: &str,
    source: Source<'_>,
    wait_delivered: bool,
    limit: Duration,
) -> Result<()> {
    let phone = validate_phone(phone)?;
    let text = source.read().await?;
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let mut contacts = Contacts::load(&ctx.home);
    let inbox = Inbox::new(&ctx.home);
    let (client, mut events) = ctx.start_client(&account).await?;
    let mut stage = Stage::Sending;
    let outcome = tokio::time::timeout(
        limit,
        drive(
            Drive {
                ctx,
                client: &client,
                contacts: &mut contacts,
                inbox: &inbox,
            },
            &mut events,
            &phone,
            text,
            wait_delivered,
            &mut stage,
        ),
    )
    .await;
    // Graceful: flushes acks and closes the link; an unsent message stays
    // in the outbox directory.
    let _ = client.close().await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(timed_out(stage, limit, "delivered (✓✓)")),
    }
}

/// The error of a send that ran out of time at `stage`; `delivered` says
/// what was waited for after the ✓.
fn timed_out(stage: Stage, limit: Duration, delivered: &str) -> anyhow::Error {
    match stage {
        Stage::Sending => anyhow::Error::new(QueuedError(format!(
            "queued: no ✓ from the server within {limit:?}; the message stays in the outbox \
             and goes out with the next sbchat command (do not send it again)"
        ))),
        Stage::WaitingForDelivery => anyhow!("sent (✓) but not {delivered} within {limit:?}"),
    }
}

/// What `drive` works with.
struct Drive<'a> {
    ctx: &'a Ctx,
    client: &'a Client,
    contacts: &'a mut Contacts,
    inbox: &'a Inbox,
}

async fn drive(
    d: Drive<'_>,
    events: &mut Events,
    phone: &str,
    text: String,
    wait_delivered: bool,
    stage: &mut Stage,
) -> Result<()> {
    let Drive {
        ctx,
        client,
        contacts,
        inbox,
    } = d;
    let out = ctx.out;
    let id = new_client_msg_id();
    let send = client.send_to_phone_with_id(id.clone(), phone, Bytes::from(text));
    tokio::pin!(send);
    let mut sent = false;
    let mut delivered = false;
    let mut status = LinkStatus::default();
    loop {
        if sent && (!wait_delivered || delivered) {
            return Ok(());
        }
        tokio::select! {
            result = &mut send, if !sent => {
                let ok = result.with_context(|| format!("cannot send to {phone}"))?;
                contacts.learn(ok.to_user, phone);
                print_sent(out, &ok, Some(phone), false);
                sent = true;
                *stage = Stage::WaitingForDelivery;
            }
            event = events.recv() => match event {
                None => bail!("the client stopped unexpectedly"),
                Some(Event::Receipt { seq, kind, client_msg_ids, from_user, from_phone, from_device, server_ts_ms, .. })
                    if wait_delivered && client_msg_ids.contains(&id) =>
                {
                    contacts.learn(from_user, &from_phone);
                    if kind == ReceiptKind::Delivered || kind == ReceiptKind::Read {
                        let name = kind_name(kind);
                        out.event(
                            &format!("✓✓ {name} ({from_phone}, device {from_device})"),
                            &json!({
                                "event": name,
                                "client_msg_id": id,
                                "to": from_phone,
                                "from_device": from_device,
                                "server_ts_ms": server_ts_ms,
                            }),
                        );
                        delivered = true;
                    }
                    client.ack([seq]).await?;
                }
                // Queued ahead of our ✓✓: kept for `recv`, then acked so
                // the server hands out what follows.
                Some(Event::Receipt { seq, kind, client_msg_ids, from_user, from_phone, server_ts_ms, .. }) if wait_delivered => {
                    contacts.learn(from_user, &from_phone);
                    inbox.keep(&Kept::Receipt {
                        read: kind == ReceiptKind::Read,
                        from_user,
                        from_phone,
                        client_msg_ids,
                        server_ts_ms,
                    })?;
                    client.ack([seq]).await?;
                }
                Some(Event::Message { seq, from_user, from_device, from_phone, to_user, from_own_device, client_msg_id, payload, server_ts_ms, .. }) if wait_delivered => {
                    if !from_own_device {
                        contacts.learn(from_user, &from_phone);
                    }
                    inbox.keep(&Kept::Message {
                        from_user,
                        from_device,
                        from_phone,
                        to_user,
                        from_own_device,
                        client_msg_id,
                        text: String::from_utf8_lossy(&payload).into_owned(),
                        server_ts_ms,
                    })?;
                    client.ack([seq]).await?;
                }
                Some(Event::Sent(earlier)) => {
                    let to = contacts.phone(earlier.to_user);
                    print_sent(out, &earlier, to, true);
                }
                Some(Event::SendFailed { client_msg_id, error, .. }) => {
                    out.note(&format!("an earlier queued message ({client_msg_id}) failed: {error}"));
                }
                Some(Event::Connected { phone: me, .. }) => status.connected(out, &me),
                Some(Event::Disconnected { reason }) => status.disconnected(out, &reason),
                Some(Event::Closed { reason }) => return Err(closed_error(&reason)),
                // Without --wait-delivered, messages and receipts stay on
                // the server for `sbchat recv`.
                Some(_) => {}
            },
        }
    }
}

/// `sbchat send --group ID`: one message to a group, exit 0 on ✓ (or once
/// every member has it on a device, with `--wait-delivered`). Entries that
/// arrive meanwhile other than this message's receipts stay on the server
/// for `recv`.
pub async fn run_group(
    ctx: &Ctx,
    group: GroupId,
    source: Source<'_>,
    wait_delivered: bool,
    limit: Duration,
) -> Result<()> {
    let text = source.read().await?;
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let contacts = Contacts::load(&ctx.home);
    let (client, mut events) = ctx.start_client(&account).await?;
    let mut stage = Stage::Sending;
    let outcome = tokio::time::timeout(
        limit,
        drive_group(
            ctx,
            &client,
            &contacts,
            &mut events,
            group,
            text,
            wait_delivered,
            &mut stage,
        ),
    )
    .await;
    let _ = client.close().await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(timed_out(stage, limit, "delivered to every member (✓✓)")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive_group(
    ctx: &Ctx,
    client: &Client,
    contacts: &Contacts,
    events: &mut Events,
    group: GroupId,
    text: String,
    wait_delivered: bool,
    stage: &mut Stage,
) -> Result<()> {
    let out = ctx.out;
    let id = new_client_msg_id();
    let send = client.send_to_group_with_id(id.clone(), group, Bytes::from(text));
    tokio::pin!(send);
    let mut sent = false;
    let mut delivered = false;
    let mut status = LinkStatus::default();
    loop {
        if sent && (!wait_delivered || delivered) {
            return Ok(());
        }
        tokio::select! {
            result = &mut send, if !sent => {
                let ok = result.with_context(|| format!("cannot send to group {group}"))?;
                out.event(
                    &format!("✓ sent to group {group} ({}), #{}", ok.client_msg_id, ok.group_seq.unwrap_or_default()),
                    &json!({
                        "event": "sent",
                        "client_msg_id": ok.client_msg_id,
                        "group_id": group,
                        "group_seq": ok.group_seq,
                        "server_ts_ms": ok.server_ts_ms,
                        "duplicate": ok.duplicate,
                    }),
                );
                sent = true;
                *stage = Stage::WaitingForDelivery;
                // Alone in the group: nobody to wait for.
                if client.group(group).await.is_ok_and(|g| g.members.len() <= 1) {
                    delivered = true;
                }
            }
            event = events.recv() => match event {
                None => bail!("the client stopped unexpectedly"),
                Some(Event::Receipt { seq, group_id: Some(g), client_msg_ids, .. })
                    if g == group && client_msg_ids.contains(&id) =>
                {
                    client.ack([seq]).await?;
                }
                Some(event @ Event::GroupReceipts { .. }) => {
                    if let Event::GroupReceipts { client_msg_id, delivered: n, members, .. } = &event
                        && *client_msg_id == id
                    {
                        super::group::print_group_event(out, contacts, &event);
                        delivered = n >= members;
                    }
                }
                Some(Event::Sent(earlier)) => {
                    let to = contacts.phone(earlier.to_user);
                    print_sent(out, &earlier, to, true);
                }
                Some(Event::SendFailed { client_msg_id, error, .. }) => {
                    out.note(&format!("an earlier queued message ({client_msg_id}) failed: {error}"));
                }
                Some(Event::Connected { phone: me, .. }) => status.connected(out, &me),
                Some(Event::Disconnected { reason }) => status.disconnected(out, &reason),
                Some(Event::Closed { reason }) => return Err(closed_error(&reason)),
                // Everything else stays on the server for `sbchat recv`.
                Some(_) => {}
            },
        }
    }
}
