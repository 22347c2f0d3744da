//! `sbchat chat <phone>`: an interactive conversation. Lines typed at the
//! prompt are sent (pipelined, each resolving on ✓); the conversation's
//! messages are printed with the local time and acknowledged, with read
//! receipts for the peer's; our messages' marks (✓, ✓✓, read) are printed
//! as they are earned. Lines starting with `/` are local commands (`/help`,
//! `/quit`); EOF also ends it.
//!
//! Everything is acknowledged (the server hands out nothing newer until it
//! is): what belongs to other conversations is shown as a one-line notice
//! and kept in the home's inbox for `recv` or a chat with them, and this
//! conversation's kept entries are shown when it opens.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::json;
use switchboard_client::{
    Client, CloseReason, Error as SdkError, Event, Events, ReceiptKind, Sent, UserId, UserInfo,
    new_client_msg_id,
};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use super::{
    Ctx, LinkStatus, Shown, check_message_len, clock, closed_error, print_message, print_receipt,
    print_security_event, print_sent, validate_phone,
};
use crate::contacts::Contacts;
use crate::inbox::{Inbox, Kept};
use crate::output::Output;
use crate::prompt::{Input, Prompt};

/// `/help`.
const HELP: &[&str] = &[
    "commands:",
    "  /help    this list",
    "  /quit    leave (Ctrl-D too; Ctrl-C at the prompt)",
    "  //text   send a line that starts with /",
    "messages from others show as a notice; `sbchat recv` or a chat with them shows them",
];

/// How much of a message a one-line note quotes.
const PREVIEW_CHARS: usize = 40;

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
        contacts: Contacts::load(&ctx.home),
        inbox: Inbox::new(&ctx.home),
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
    contacts: Contacts,
    inbox: Inbox,
}

/// What the event loop should do after an event.
enum Flow {
    Continue,
    Stop,
}

impl Session<'_> {
    async fn run(mut self, events: &mut Events) -> Result<()> {
        let peer = self.find_peer(events).await?;
        self.contacts.learn(peer.user_id, self.phone);
        if !self.out.is_json() {
            self.out.note(&format!(
                "chatting with {} — type a message and press Enter; /help for commands, /quit to leave",
                self.phone
            ));
        }
        self.show_kept(&peer)?;
        let mut prompt = Prompt::start(!self.out.is_json())?;
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
                input = prompt.next(), if stdin_open => {
                    match input? {
                        None => {
                            stdin_open = false;
                            grace = Some(Instant::now() + EOF_GRACE);
                        }
                        Some(Input::Interrupt) => break,
                        Some(Input::Line(line)) => {
                            let text = match self.typed(&line) {
                                Typed::Nothing => continue,
                                Typed::Quit => break,
                                Typed::Send(text) => text,
                            };
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
                            self.upgrade(&id, Mark::Sent, sent.server_ts_ms);
                        }
                        Err(e) => {
                            let text = self.marks.remove(&id).map(|(t, _)| t).unwrap_or_default();
                            self.out.note(&format!("✗ not sent: {}: {e}", preview(&text)));
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

    /// What a typed line asks for; local commands are handled here.
    fn typed<'l>(&self, line: &'l str) -> Typed<'l> {
        let text = line.trim_end();
        if text.trim().is_empty() {
            return Typed::Nothing;
        }
        let text = match text.strip_prefix('/') {
            // `//text` sends `/text`.
            Some(rest) if rest.starts_with('/') => rest,
            Some(command) => {
                match command.split_whitespace().next().unwrap_or_default() {
                    "quit" => return Typed::Quit,
                    "help" => HELP.iter().for_each(|l| self.out.note(l)),
                    _ => self.out.note(&format!(
                        "unknown command /{}: not sent; /help lists the commands (start with // to send a line beginning with /)",
                        preview(command)
                    )),
                }
                return Typed::Nothing;
            }
            None => text,
        };
        if let Err(e) = check_message_len(text.len(), true) {
            self.out.note(&format!("✗ not sent: {e}"));
            return Typed::Nothing;
        }
        Typed::Send(text)
    }

    /// Shows what other commands kept for this conversation and takes it
    /// out of the inbox (read receipts go to the peer for its messages).
    fn show_kept(&mut self, peer: &UserInfo) -> Result<()> {
        let kept = self.inbox.load()?;
        let (ours, rest): (Vec<Kept>, Vec<Kept>) = kept
            .into_iter()
            .partition(|k| matches!(k, Kept::Message { .. }) && k.peer() == peer.user_id);
        if ours.is_empty() {
            return Ok(());
        }
        for entry in &ours {
            if let Kept::Message {
                from_user,
                from_device,
                from_phone,
                to_user,
                from_own_device,
                client_msg_id,
                text,
                server_ts_ms,
            } = entry
            {
                print_message(
                    self.out,
                    &Shown {
                        from_phone,
                        from_user: *from_user,
                        from_device: *from_device,
                        own_copy_to: from_own_device.then_some(*to_user),
                        to_phone: Some(self.phone),
                        client_msg_id,
                        payload: text.as_bytes(),
                        server_ts_ms: *server_ts_ms,
                        stamped: true,
                    },
                );
                if !from_own_device {
                    let client = self.client.clone();
                    let (from_user, id) = (*from_user, client_msg_id.clone());
                    self.receipts
                        .spawn(async move { client.send_read_receipt(from_user, vec![id]).await });
                }
            }
        }
        self.inbox.replace(&rest)
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
                if !from_own_device {
                    self.contacts.learn(from_user, &from_phone);
                }
                let peer_user = if from_own_device { to_user } else { from_user };
                if peer.is_none_or(|p| p.user_id != peer_user) {
                    // Another conversation: a notice, the text kept.
                    self.inbox.keep(&Kept::Message {
                        from_user,
                        from_device,
                        from_phone: from_phone.clone(),
                        to_user,
                        from_own_device,
                        client_msg_id: client_msg_id.clone(),
                        text: String::from_utf8_lossy(&payload).into_owned(),
                        server_ts_ms,
                    })?;
                    // Before the peer is found, its messages are kept too,
                    // and shown as soon as it is (`show_kept`).
                    if peer.is_some() || from_own_device || from_phone != self.phone {
                        self.notice(
                            from_own_device,
                            peer_user,
                            &from_phone,
                            &client_msg_id,
                            server_ts_ms,
                        );
                    }
                    self.client.ack([seq]).await?;
                    return Ok(Flow::Continue);
                }
                print_message(
                    out,
                    &Shown {
                        from_phone: &from_phone,
                        from_user,
                        from_device,
                        own_copy_to: from_own_device.then_some(to_user),
                        to_phone: Some(self.phone),
                        client_msg_id: &client_msg_id,
                        payload: &payload,
                        server_ts_ms,
                        stamped: true,
                    },
                );
                self.client.ack([seq]).await?;
                if !from_own_device {
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
                from_user,
                from_phone,
                client_msg_ids,
                server_ts_ms,
                ..
            }) => {
                self.contacts.learn(from_user, &from_phone);
                if client_msg_ids.iter().any(|id| self.marks.contains_key(id)) {
                    if out.is_json() {
                        print_receipt(out, kind, &from_phone, &client_msg_ids, server_ts_ms);
                    }
                    let mark = if kind == ReceiptKind::Read {
                        Mark::Read
                    } else {
                        Mark::Delivered
                    };
                    for id in &client_msg_ids {
                        self.upgrade(id, mark, server_ts_ms);
                    }
                } else {
                    // About messages of earlier runs: for `recv`.
                    self.inbox.keep(&Kept::Receipt {
                        read: kind == ReceiptKind::Read,
                        from_user,
                        from_phone,
                        client_msg_ids,
                        server_ts_ms,
                    })?;
                }
                self.client.ack([seq]).await?;
            }
            Some(event @ Event::GroupMessage { .. }) => {
                super::group::print_group_message(out, &event, true);
                if let Event::GroupMessage {
                    seq,
                    from_user,
                    from_phone,
                    from_own_device,
                    ..
                } = event
                {
                    if !from_own_device {
                        self.contacts.learn(from_user, &from_phone);
                    }
                    self.client.ack([seq]).await?;
                }
            }
            Some(Event::UpToDate) => {
                out.event("— up to date —", &json!({"event": "up_to_date"}));
            }
            Some(Event::Sent(earlier)) => {
                print_sent(out, &earlier, self.contacts.phone(earlier.to_user), true);
            }
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
                if let Event::SafetyNumberChanged { user_id, phone } = &event {
                    self.contacts.learn(*user_id, phone);
                }
                if !super::group::print_group_event(out, &self.contacts, &event) {
                    print_security_event(out, &event);
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// One line for a message of another conversation (kept for later).
    fn notice(&self, own: bool, peer_user: UserId, from_phone: &str, id: &str, server_ts_ms: u64) {
        let peer_phone = if own {
            self.contacts.phone(peer_user)
        } else {
            Some(from_phone)
        };
        let who = peer_phone.map_or_else(|| format!("user {peer_user}"), str::to_owned);
        let how = match peer_phone {
            Some(phone) => format!("`sbchat chat {phone}` or `sbchat recv` shows it"),
            None => "`sbchat recv` shows it".to_owned(),
        };
        let text = if own {
            format!(
                "{} you wrote to {who} from another device ({how})",
                clock(server_ts_ms)
            )
        } else {
            format!("{} new message from {who} ({how})", clock(server_ts_ms))
        };
        self.out.event(
            &text,
            &json!({
                "event": "message_notice",
                "from_own_device": own,
                "peer": peer_phone,
                "peer_user": peer_user,
                "client_msg_id": id,
                "server_ts_ms": server_ts_ms,
            }),
        );
    }

    /// Records progress of one of our messages and, in text mode, shows it
    /// (JSON mode prints the raw `sent` and `receipt` events instead).
    fn upgrade(&mut self, id: &str, mark: Mark, at_ms: u64) {
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
        let at = clock(at_ms);
        let shown = match mark {
            Mark::Pending => return,
            Mark::Sent => format!("{at} ✓ {text}"),
            Mark::Delivered => format!("{at} ✓✓ {text}"),
            Mark::Read => format!("{at} ✓✓ read: {text}"),
        };
        self.out.event(&shown, &json!({}));
    }
}

/// A typed line's meaning.
enum Typed<'l> {
    Nothing,
    Quit,
    Send(&'l str),
}

/// The start of `text`, for one-line notes.
fn preview(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}
