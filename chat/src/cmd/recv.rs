//! `sbchat recv`: print incoming messages and receipts, acknowledging each
//! after it is printed (so nothing is lost if sbchat dies mid-way). Those
//! kept in the home's inbox by `send` or `chat` come first. A run that ends
//! by `--timeout` without ever reaching the server exits 1.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use switchboard_client::{Client, CloseReason, Event, ReceiptKind};
use tokio::time::{Instant, sleep_until};

use super::{
    Ctx, LinkStatus, Shown, closed_error, print_message, print_receipt, print_security_event,
    print_sent,
};
use crate::contacts::Contacts;
use crate::inbox::{Inbox, Kept};
use crate::output::Output;

pub async fn run(ctx: &Ctx, limit: Option<Duration>, count: Option<u64>, read: bool) -> Result<()> {
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let mut contacts = Contacts::load(&ctx.home);
    let (client, mut events) = ctx.start_client(&account).await?;
    let out = ctx.out;
    let deadline = limit.map(|l| Instant::now() + l);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seen =
        match show_inbox(out, &Inbox::new(&ctx.home), &client, &contacts, count, read).await {
            Ok(seen) => seen,
            Err(e) => {
                let _ = client.close().await;
                return Err(e);
            }
        };
    let mut status = LinkStatus::announcing();
    let result = loop {
        if count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
        tokio::select! {
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                break status.require_reached(&account.server);
            }
            _ = &mut ctrl_c => break Ok(()),
            event = events.recv() => match event {
                None => break Ok(()),
                Some(Event::Message { seq, from_user, from_device, from_phone, to_user, from_own_device, client_msg_id, payload, server_ts_ms, .. }) => {
                    if !from_own_device {
                        contacts.learn(from_user, &from_phone);
                    }
                    print_message(out, &Shown {
                        from_phone: &from_phone,
                        from_user,
                        from_device,
                        own_copy_to: from_own_device.then_some(to_user),
                        to_phone: contacts.phone(to_user),
                        client_msg_id: &client_msg_id,
                        payload: &payload,
                        server_ts_ms,
                        stamped: false,
                    });
                    seen += 1;
                    client.ack([seq]).await?;
                    if read && !from_own_device && let Err(e) = client.send_read_receipt(from_user, vec![client_msg_id]).await {
                        out.note(&format!("cannot send a read receipt to {from_phone}: {e}"));
                    }
                }
                Some(Event::Receipt { seq, kind, from_user, from_phone, client_msg_ids, server_ts_ms, .. }) => {
                    contacts.learn(from_user, &from_phone);
                    print_receipt(out, kind, &from_phone, &client_msg_ids, server_ts_ms);
                    seen += 1;
                    client.ack([seq]).await?;
                }
                Some(event @ Event::GroupMessage { .. }) => {
                    super::group::print_group_message(out, &event, false);
                    if let Event::GroupMessage { seq, group_id, from_user, from_phone, from_own_device, client_msg_id, .. } = event {
                        if !from_own_device {
                            contacts.learn(from_user, &from_phone);
                        }
                        seen += 1;
                        client.ack([seq]).await?;
                        if read && !from_own_device && let Err(e) = client.send_group_read_receipt(group_id, from_user, vec![client_msg_id]).await {
                            out.note(&format!("cannot send a read receipt to {from_phone}: {e}"));
                        }
                    }
                }
                Some(Event::UpToDate) => {
                    out.event("— up to date —", &json!({"event": "up_to_date"}));
                }
                Some(Event::Sent(earlier)) => print_sent(out, &earlier, contacts.phone(earlier.to_user), true),
                Some(Event::SendFailed { client_msg_id, error, .. }) => {
                    out.note(&format!("an earlier queued message ({client_msg_id}) failed: {error}"));
                }
                Some(Event::Connected { phone, .. }) => status.connected(out, &phone),
                Some(Event::Disconnected { reason }) => status.disconnected(out, &reason),
                Some(Event::Closed { reason: CloseReason::ByClient }) => break Ok(()),
                Some(Event::Closed { reason }) => break Err(closed_error(&reason)),
                Some(event) => {
                    if let Event::SafetyNumberChanged { user_id, phone } = &event {
                        contacts.learn(*user_id, phone);
                    }
                    if !super::group::print_group_event(out, &contacts, &event) {
                        print_security_event(out, &event);
                    }
                }
            },
        }
    };
    let _ = client.close().await;
    result
}

/// Prints what `send` and `chat` kept for `recv`, oldest first, at most
/// `count`; returns how many. What is printed leaves the inbox.
async fn show_inbox(
    out: Output,
    inbox: &Inbox,
    client: &Client,
    contacts: &Contacts,
    count: Option<u64>,
    read: bool,
) -> Result<u64> {
    let mut kept = inbox.load()?;
    let shown = kept
        .len()
        .min(count.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)));
    for entry in &kept[..shown] {
        show_kept(out, entry, contacts);
    }
    let rest = kept.split_off(shown);
    inbox.replace(&rest)?;
    if read {
        for entry in &kept {
            if let Kept::Message {
                from_user,
                from_own_device: false,
                client_msg_id,
                from_phone,
                ..
            } = entry
                && let Err(e) = client
                    .send_read_receipt(*from_user, vec![client_msg_id.clone()])
                    .await
            {
                out.note(&format!("cannot send a read receipt to {from_phone}: {e}"));
            }
        }
    }
    Ok(shown as u64)
}

/// Prints one kept entry as `recv` prints a fresh one.
pub fn show_kept(out: Output, entry: &Kept, contacts: &Contacts) {
    match entry {
        Kept::Message {
            from_user,
            from_device,
            from_phone,
            to_user,
            from_own_device,
            client_msg_id,
            text,
            server_ts_ms,
        } => print_message(
            out,
            &Shown {
                from_phone,
                from_user: *from_user,
                from_device: *from_device,
                own_copy_to: from_own_device.then_some(*to_user),
                to_phone: contacts.phone(*to_user),
                client_msg_id,
                payload: text.as_bytes(),
                server_ts_ms: *server_ts_ms,
                stamped: false,
            },
        ),
        Kept::Receipt {
            read,
            from_phone,
            client_msg_ids,
            server_ts_ms,
            ..
        } => {
            let kind = if *read {
                ReceiptKind::Read
            } else {
                ReceiptKind::Delivered
            };
            print_receipt(out, kind, from_phone, client_msg_ids, *server_ts_ms);
        }
    }
}
