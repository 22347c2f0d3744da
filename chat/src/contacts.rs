//! Phone numbers this home has seen, by user id (`<home>/contacts.json`).
//!
//! The server names a conversation's peer only by user id in the copies
//! another device of this account sends us, and there is no reverse lookup
//! (user id → phone): the protocol only looks users up by phone. So sbchat
//! remembers every (user, phone) pair it meets — lookups for `send` and
//! `chat`, senders of messages, receipts, safety-number warnings — and
//! shows the phone whenever it knows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchboard_client::UserId;

use crate::home::Home;

/// Most users remembered: far more than one person talks to, and small
/// enough (about 40 bytes each) to rewrite the file whenever it changes.
/// Past it, a new user replaces none: they are shown by user id.
const MAX_CONTACTS: usize = 10_000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// User id (as a string: JSON keys are strings) → phone.
    phones: BTreeMap<UserId, String>,
}

/// The remembered phones; changes are written by [`Contacts::save`].
#[derive(Debug)]
pub struct Contacts {
    home: Home,
    stored: Stored,
    dirty: bool,
}

impl Contacts {
    /// Loads the home's contacts. A missing file is an empty list; an
    /// unreadable one too (it is only a display cache), with a log line.
    pub fn load(home: &Home) -> Self {
        let file = match home.read_contacts::<Stored>() {
            Ok(file) => file.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("ignoring the contacts file: {e:#}");
                Stored::default()
            }
        };
        Self {
            home: home.clone(),
            stored: file,
            dirty: false,
        }
    }

    /// The phone of `user`, if seen.
    pub fn phone(&self, user: UserId) -> Option<&str> {
        self.stored.phones.get(&user).map(String::as_str)
    }

    /// Remembers that `user` has `phone` (a number can move to another
    /// user after a re-registration: the latest pairing wins).
    pub fn learn(&mut self, user: UserId, phone: &str) {
        if user.get() == 0 || phone.is_empty() || self.phone(user) == Some(phone) {
            return;
        }
        if !self.stored.phones.contains_key(&user) && self.stored.phones.len() >= MAX_CONTACTS {
            return;
        }
        self.stored.phones.retain(|_, p| p != phone);
        self.stored.phones.insert(user, phone.to_owned());
        self.dirty = true;
    }

    /// Writes the changes, if any. Failing only costs phones shown as user
    /// ids later, so it is logged rather than failing the command.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        match serde_json::to_vec_pretty(&self.stored)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| self.home.save_contacts(&bytes))
        {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!("cannot save the contacts file: {e:#}"),
        }
    }
}

impl Drop for Contacts {
    fn drop(&mut self) {
        self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_phones_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        let mut contacts = Contacts::load(&home);
        assert_eq!(contacts.phone(UserId(7)), None);
        contacts.learn(UserId(7), "+1555");
        contacts.learn(UserId(0), "+1556");
        contacts.learn(UserId(8), "");
        contacts.save();
        drop(contacts);
        // The file keeps the format of bare-integer ids (JSON keys are strings).
        let file = std::fs::read_to_string(dir.path().join("contacts.json")).unwrap();
        let file: serde_json::Value = serde_json::from_str(&file).unwrap();
        assert_eq!(file, serde_json::json!({ "phones": { "7": "+1555" } }));
        let mut contacts = Contacts::load(&home);
        assert_eq!(contacts.phone(UserId(7)), Some("+1555"));
        assert_eq!(contacts.phone(UserId(0)), None);
        assert_eq!(contacts.phone(UserId(8)), None);
        // The number moved to another user.
        contacts.learn(UserId(9), "+1555");
        assert_eq!(contacts.phone(UserId(7)), None);
        assert_eq!(contacts.phone(UserId(9)), Some("+1555"));
    }

    #[test]
    fn a_corrupt_file_is_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("contacts.json"), b"{nope").unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        let mut contacts = Contacts::load(&home);
        assert_eq!(contacts.phone(UserId(7)), None);
        contacts.learn(UserId(7), "+1555");
        contacts.save();
        assert_eq!(Contacts::load(&home).phone(UserId(7)), Some("+1555"));
    }
}
