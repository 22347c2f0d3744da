//! The accounts domain: users and their device lists, phone numbers,
//! verification codes and link codes.
//!
//! Atomic unit: the batch (a cluster backend keeps this domain and
//! [`super::Keys`] in one PostgreSQL transaction per batch).

use super::{CodeRecord, LinkCodeRecord, StoreError, UserId, UserRecord};

/// Reads of the accounts domain.
pub trait Accounts {
    /// A user's record.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError>;

    /// The records of those of `users` that exist, in any order: what
    /// [`Accounts::user`] gives for each, read in one go where the engine
    /// can (a shard reads ahead the users a batch of authentications
    /// needs).
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn users(&self, users: &[UserId]) -> Result<Vec<(UserId, UserRecord)>, StoreError> {
        let mut found = Vec::with_capacity(users.len());
        for &user in users {
            if let Some(rec) = self.user(user)? {
                found.push((user, rec));
            }
        }
        Ok(found)
    }

    /// The user a phone number belongs to.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure.
    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError>;

    /// The code state of a phone number.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError>;

    /// A link code.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError>;

    /// Link codes that expired before `before_ms`, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError`] on engine failure or corruption.
    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError>;
}

/// Writes of the accounts domain.
#[derive(Clone, Debug)]
pub enum AccountOp {
    /// Create or replace a user record.
    PutUser(UserRecord),
    /// Map a phone number to a user.
    PutPhone {
        /// E.164 phone number.
        phone: String,
        /// Its user.
        user: UserId,
    },
    /// Create or replace the code state of a phone number.
    PutCode {
        /// E.164 phone number.
        phone: String,
        /// The state.
        record: CodeRecord,
    },
    /// Store a link code.
    PutLinkCode {
        /// The code.
        code: String,
        /// What it links to.
        record: LinkCodeRecord,
    },
    /// Remove a link code (used or expired).
    DeleteLinkCode(String),
}
