//! `sbchat group …`: create and manage groups, and how group events are
//! shown by `recv`, `chat` and `send --group`.
//!
//! Members are named by phone number (looked up first); a group by the id
//! `group create` prints.

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use switchboard_client::{
    Client, Event, Group, GroupChange, GroupChangeKind, GroupId, GroupRole, NewGroup, UserId,
};

use super::{Ctx, clock, validate_phone};
use crate::cli::{GroupAction, UsageError};
use crate::contacts::Contacts;
use crate::output::Output;

pub async fn run(ctx: &Ctx, action: GroupAction) -> Result<()> {
    let account = ctx.home.require_account()?;
    let _lock = ctx.home.lock()?;
    let mut contacts = Contacts::load(&ctx.home);
    let (client, _events) = ctx.start_client(&account).await?;
    let result = act(ctx.out, &client, &mut contacts, action).await;
    let _ = client.close().await;
    result
}

async fn act(
    out: Output,
    client: &Client,
    contacts: &mut Contacts,
    action: GroupAction,
) -> Result<()> {
    match action {
        GroupAction::Create {
            name,
            phones,
            description,
            admins_edit,
        } => {
            let members = users(client, contacts, &phones).await?;
            let mut new = NewGroup::new(name, members);
            new.description = description;
            new.info_admin_only = admins_edit;
            let group = client
                .create_group_with(new)
                .await
                .context("cannot create the group")?;
            learn(contacts, &group);
            out.event(
                &format!(
                    "group {} created: {} ({} members)",
                    group.group_id,
                    group.name,
                    group.members.len()
                ),
                &json!({
                    "event": "group_created",
                    "group_id": group.group_id,
                    "name": group.name,
                    "members": group.members,
                }),
            );
        }
        GroupAction::Add { group, phones } => {
            let members = users(client, contacts, &phones).await?;
            change(
                out,
                client,
                contacts,
                group,
                GroupChange::Add(members),
                "added",
            )
            .await?;
        }
        GroupAction::Remove { group, phone } => {
            let user = user(client, contacts, &phone).await?;
            change(
                out,
                client,
                contacts,
                group,
                GroupChange::Remove(user),
                "removed",
            )
            .await?;
        }
        GroupAction::Promote { group, phone } => {
            let user = user(client, contacts, &phone).await?;
            change(
                out,
                client,
                contacts,
                group,
                GroupChange::Promote(user),
                "promoted",
            )
            .await?;
        }
        GroupAction::Demote { group, phone } => {
            let user = user(client, contacts, &phone).await?;
            change(
                out,
                client,
                contacts,
                group,
                GroupChange::Demote(user),
                "demoted",
            )
            .await?;
        }
        GroupAction::Leave { group } => {
            client
                .change_group(GroupId::new(group), GroupChange::Leave)
                .await
                .with_context(|| format!("cannot leave group {group}"))?;
            out.event(
                &format!("left group {group}"),
                &json!({"event": "group_left", "group_id": group}),
            );
        }
        GroupAction::Info { group } => {
            let group = client
                .group(GroupId::new(group))
                .await
                .with_context(|| format!("cannot get group {group}"))?;
            learn(contacts, &group);
            print_info(out, &group);
        }
        GroupAction::List => {
            let groups = client.list_groups().await.context("cannot list groups")?;
            if out.is_json() {
                out.event("", &json!({"event": "groups", "groups": groups}));
            } else if groups.is_empty() {
                out.event("no groups", &json!({}));
            } else {
                for g in &groups {
                    out.event(
                        &format!(
                            "{:>20}  {} ({} members, {})",
                            g.group_id, g.name, g.members, g.role
                        ),
                        &json!({}),
                    );
                }
            }
        }
    }
    Ok(())
}

async fn change(
    out: Output,
    client: &Client,
    contacts: &mut Contacts,
    group: u64,
    change: GroupChange,
    done: &str,
) -> Result<()> {
    let group = client
        .change_group(GroupId::new(group), change)
        .await
        .with_context(|| format!("cannot change group {group}"))?;
    learn(contacts, &group);
    out.event(
        &format!(
            "group {} {done}; {} members now",
            group.group_id,
            group.members.len()
        ),
        &json!({
            "event": "group_changed",
            "change": done,
            "group_id": group.group_id,
            "members": group.members,
        }),
    );
    Ok(())
}

fn print_info(out: Output, group: &Group) {
    if out.is_json() {
        out.event("", &json!({"event": "group", "group": group}));
        return;
    }
    out.event(
        &format!(
            "group {}: {}{}",
            group.group_id,
            group.name,
            if group.description.is_empty() {
                String::new()
            } else {
                format!(" — {}", group.description)
            }
        ),
        &json!({}),
    );
    for m in &group.members {
        let role = match m.role {
            GroupRole::Member => String::new(),
            role => format!(" ({role})"),
        };
        out.event(&format!("  {}{role}", m.phone), &json!({}));
    }
}

fn learn(contacts: &mut Contacts, group: &Group) {
    for m in &group.members {
        contacts.learn(m.user_id, &m.phone);
    }
}

async fn user(client: &Client, contacts: &mut Contacts, phone: &str) -> Result<UserId> {
    let phone = validate_phone(phone)?;
    let info = client
        .lookup(&phone)
        .await
        .with_context(|| format!("cannot find {phone}"))?;
    contacts.learn(info.user_id, &info.phone);
    Ok(info.user_id)
}

async fn users(client: &Client, contacts: &mut Contacts, phones: &[String]) -> Result<Vec<UserId>> {
    if phones.len() >= switchboard_client::MAX_GROUP_MEMBERS {
        return Err(anyhow!(UsageError(format!(
            "a group has at most {} members",
            switchboard_client::MAX_GROUP_MEMBERS
        ))));
    }
    let mut out = Vec::with_capacity(phones.len());
    for phone in phones {
        out.push(user(client, contacts, phone).await?);
    }
    Ok(out)
}

/// A group message as `recv` and `chat` show it (group, sender, text);
/// false for other events.
pub fn print_group_message(out: Output, event: &Event, stamped: bool) -> bool {
    let Event::GroupMessage {
        group_id,
        group_seq,
        from_phone,
        from_own_device,
        client_msg_id,
        payload,
        server_ts_ms,
        ..
    } = event
    else {
        return false;
    };
    let text = String::from_utf8_lossy(payload);
    let who = if *from_own_device {
        "you (other device)"
    } else {
        from_phone.as_str()
    };
    let line = format!("[group {group_id}] {who}: {text}");
    let line = if stamped {
        format!("{} {line}", clock(*server_ts_ms))
    } else {
        line
    };
    out.event(
        &line,
        &json!({
            "event": "group_message",
            "group_id": group_id,
            "group_seq": group_seq,
            "from": from_phone,
            "from_own_device": from_own_device,
            "client_msg_id": client_msg_id,
            "text": text,
            "server_ts_ms": server_ts_ms,
        }),
    );
    true
}

/// Group changes and receipt tallies, shown alike by every command that
/// listens; false for other events.
pub fn print_group_event(out: Output, contacts: &Contacts, event: &Event) -> bool {
    match event {
        Event::GroupChanged {
            group_id,
            group_seq,
            actor,
            kind,
            users,
            info,
        } => {
            let name = |u: &UserId| {
                contacts
                    .phone(*u)
                    .map_or_else(|| format!("user {u}"), str::to_owned)
            };
            let who: Vec<String> = users.iter().map(name).collect();
            let by = name(actor);
            let what = match kind {
                GroupChangeKind::Created => format!(
                    "created by {by}{}",
                    info.as_ref()
                        .map_or(String::new(), |i| format!(" as {:?}", i.name))
                ),
                GroupChangeKind::Added => format!("{by} added {}", who.join(", ")),
                GroupChangeKind::Removed => format!("{by} removed {}", who.join(", ")),
                GroupChangeKind::Left => format!("{} left", who.join(", ")),
                GroupChangeKind::Promoted => format!("{by} made {} admin", who.join(", ")),
                GroupChangeKind::Demoted => format!("{by} made {} a member", who.join(", ")),
                GroupChangeKind::InfoChanged => format!("{by} changed the group's info"),
                GroupChangeKind::CreatorChanged => format!("{} is now the creator", who.join(", ")),
                GroupChangeKind::MemberDevicesChanged => {
                    format!("{} has a new device", who.join(", "))
                }
                _ => "changed".to_owned(),
            };
            out.event(
                &format!("[group {group_id}] {what}"),
                &json!({
                    "event": "group_changed",
                    "group_id": group_id,
                    "group_seq": group_seq,
                    "actor": actor,
                    "kind": kind,
                    "users": users,
                    "name": info.as_ref().map(|i| i.name.clone()),
                }),
            );
            true
        }
        Event::GroupReceipts {
            group_id,
            client_msg_id,
            delivered,
            read,
            members,
        } => {
            out.event(
                &format!(
                    "[group {group_id}] {client_msg_id}: delivered {delivered}/{members}, read {read}/{members}"
                ),
                &json!({
                    "event": "group_receipts",
                    "group_id": group_id,
                    "client_msg_id": client_msg_id,
                    "delivered": delivered,
                    "read": read,
                    "members": members,
                }),
            );
            true
        }
        _ => false,
    }
}
