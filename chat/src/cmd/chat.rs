//! `sbchat chat <phone>`: an interactive conversation. Lines typed on stdin
//! are sent (pipelined, each resolving on ✓); incoming messages are printed
//! and acknowledged, with read receipts for the peer's; our messages' marks
//! (✓, ✓✓, read) are printed as they are earned. `/quit` or EOF ends it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::json;
use switchboard_client::{
    Client, CloseReason, Error as SdkError, Event, Events, ReceiptKind, Sent, UserInfo,
    new_client_msg_id,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use super::{
    Ctx, LinkStatus, Shown, closed_error, print_message, print_receipt, print_security_event,
    print_sent, validate_phone,
};
use crate::output::Output;

/// After stdin ends, how long to wait for the ✓ of the last lines (they stay
/// in the outbox if it passes).
const EOF_GRACE: Duration = Duration::from_secs(10);

/// How far one of our messages got; only upgrades are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    Pending,
    Sent,
    Delivered,
    Read,
}

pub async fn run(ctx: &Ctx, phone: &str) -> Result<()> {
    let phone = validate_phone(phone)?;
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let (client, mut events) = ctx.start_client(&account).await?;
    let result = Session {
        out: ctx.out,
        client: &client,
        phone: &phone,
        marks: HashMap::new(),
        receipts: JoinSet::new(),
        status: LinkStatus::default(),
    }
    .run(&mut events)
    .await;
    let _ = client.close().await;
    result
}

struct Session<'a> {
    out: Output,
    client: &'a Client,
    phone: &'a str,
    /// Our messages this session: id → (text, mark).
    marks: HashMap<String, (String, Mark)>,
    /// Read receipts being sent in the background.
    receipts: JoinSet<Result<(), SdkError>>,
    status: LinkStatus,
}

/// What the event loop should do after an event.
enum Flow {
    Continue,
    Stop,
}

impl Session<'_> {
    async fn run(mut self, events: &mut Events) -> Result<()> {
        let peer = self.find_peer(events).await?;
        if !self.out.is_json() {
            self.out.note(&format!(
                "chatting with {} — type a message and press Enter; /quit to leave",
                self.phone
            ));
        }
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut sends: JoinSet<(String, Result<Sent, SdkError>)> = JoinSet::new();
        let mut stdin_open = true;
        let mut grace: Option<Instant> = None;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            if !stdin_open && sends.is_empty() {
                break;
            }
            tokio::select! {
                line = lines.next_line(), if stdin_open => {
                    match line.context("cannot read stdin")? {
                        None => {
                            stdin_open = false;
                            grace = Some(Instant::now() + EOF_GRACE);
                        }
                        Some(line) => {
                            let text = line.trim_end();
                            if text == "/quit" {
                                break;
                            }
                            if text.is_empty() {
                                continue;
                            }
                            let id = new_client_msg_id();
                            self.marks.insert(id.clone(), (text.to_owned(), Mark::Pending));
                            let client = self.client.clone();
                            let payload = Bytes::from(text.to_owned());
                            let to = peer.user_id;
                            sends.spawn(async move {
                                let sent = client.send_to_user_with_id(id.clone(), to, payload).await;
                                (id, sent)
                            });
                        }
                    }
                }
                Some(joined) = sends.join_next(), if !sends.is_empty() => {
                    let (id, sent) = joined.context("send task failed")?;
                    match sent {
                        Ok(sent) => {
                            if self.out.is_json() {
                                print_sent(self.out, &sent, Some(self.phone), false);
                            }
                            self.upgrade(&id, Mark::Sent);
                        }
                        Err(e) => {
                            let text = self.marks.remove(&id).map(|(t, _)| t).unwrap_or_default();
                            self.out.note(&format!("✗ not sent: {text:?}: {e}"));
                        }
                    }
                }
                Some(_) = self.receipts.join_next(), if !self.receipts.is_empty() => {}
                () = sleep_until(grace.unwrap_or_else(Instant::now)), if grace.is_some() => {
                    bail!(
                        "{} message(s) got no ✓ within {EOF_GRACE:?}; they stay in the outbox",
                        sends.len()
                    );
                }
                _ = &mut ctrl_c => break,
                event = events.recv() => {
                    if let Flow::Stop = self.on_event(event, Some(&peer)).await? {
                        break;
                    }
                }
            }
        }
        if !sends.is_empty() {
            self.out.note(&format!(
                "{} message(s) not yet ✓; they stay in the outbox for the next sbchat command",
                sends.len()
            ));
        }
        Ok(())
    }

    /// Looks the peer up, handling events meanwhile.
    async fn find_peer(&mut self, events: &mut Events) -> Result<UserInfo> {
        let lookup = self.client.lookup(self.phone);
        tokio::pin!(lookup);
        loop {
            tokio::select! {
                found = &mut lookup => {
                    return found.with_context(|| format!("cannot find {}", self.phone));
                }
                event = events.recv() => {
                    if let Flow::Stop = self.on_event(event, None).await? {
                        bail!("the client stopped before {} was found", self.phone);
                    }
                }
            }
        }
    }

    async fn on_event(&mut self, event: Option<Event>, peer: Option<&UserInfo>) -> Result<Flow> {
        let out = self.out;
        match event {
            None => return Ok(Flow::Stop),
            Some(Event::Message {
                seq,
                from_user,
                from_device,
                from_phone,
                to_user,
                from_own_device,
                client_msg_id,
                payload,
                server_ts_ms,
                ..
            }) => {
                let to_peer = peer.is_some_and(|p| p.user_id == to_user);
                print_message(
                    out,
                    &Shown {
                        from_phone: &from_phone,
                        from_user,
                        from_device,
                        own_copy_to: from_own_device.then_some(to_user),
                        to_phone: to_peer.then_some(self.phone),
                        client_msg_id: &client_msg_id,
                        payload: &payload,
                        server_ts_ms,
                    },
                );
                self.client.ack([seq]).await?;
                if !from_own_device && peer.is_some_and(|p| p.user_id == from_user) {
                    let client = self.client.clone();
                    self.receipts.spawn(async move {
                        client
                            .send_read_receipt(from_user, vec![client_msg_id])
                            .await
                    });
                }
            }
            Some(Event::Receipt {
                seq,
                kind,
                from_phone,
                client_msg_ids,
                server_ts_ms,
                ..
            }) => {
                if out.is_json() {
                    print_receipt(out, kind, &from_phone, &client_msg_ids, server_ts_ms);
                }
                let mark = if kind == ReceiptKind::Read {
                    Mark::Read
                } else {
                    Mark::Delivered
                };
                for id in &client_msg_ids {
                    self.upgrade(id, mark);
                }
                self.client.ack([seq]).await?;
            }
            Some(Event::UpToDate) => {
                out.event("— up to date —", &json!({"event": "up_to_date"}));
            }
            Some(Event::Sent(earlier)) => print_sent(out, &earlier, None, true),
            Some(Event::SendFailed {
                client_msg_id,
                error,
                ..
            }) => {
                out.note(&format!(
                    "an earlier queued message ({client_msg_id}) failed: {error}"
                ));
            }
            Some(Event::Connected { phone, .. }) => self.status.connected(out, &phone),
            Some(Event::Disconnected { reason }) => self.status.disconnected(out, &reason),
            Some(Event::Closed {
                reason: CloseReason::ByClient,
            }) => {
                return Ok(Flow::Stop);
            }
            Some(Event::Closed { reason }) => return Err(closed_error(&reason)),
            Some(event) => {
                print_security_event(out, &event);
            }
        }
        Ok(Flow::Continue)
    }

    /// Records progress of one of our messages and, in text mode, shows it
    /// (JSON mode prints the raw `sent` and `receipt` events instead).
    fn upgrade(&mut self, id: &str, mark: Mark) {
        let Some((text, current)) = self.marks.get_mut(id) else {
            return;
        };
        if mark <= *current {
            return;
        }
        *current = mark;
        if self.out.is_json() {
            return;
        }
        let shown = match mark {
            Mark::Pending => return,
            Mark::Sent => format!("  ✓ {text}"),
            Mark::Delivered => format!("  ✓✓ {text}"),
            Mark::Read => format!("  ✓✓ read: {text}"),
        };
        self.out.event(&shown, &json!({}));
    }
}
