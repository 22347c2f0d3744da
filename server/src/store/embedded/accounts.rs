//! The embedded backend's accounts domain.

use super::*;

impl Db {
    pub(super) fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError> {
        match self.users.get(user.to_be_bytes()).map_err(engine)? {
            Some(v) => Ok(Some(decode("user", &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        match self.phones.get(phone).map_err(engine)? {
            Some(v) => Ok(Some(u64_value("phone", &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        match self.codes.get(phone).map_err(engine)? {
            Some(v) => Ok(Some(decode("code", &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError> {
        match self.link_codes.get(code).map_err(engine)? {
            Some(v) => Ok(Some(decode("link code", &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn expired_link_codes(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for guard in self.link_codes.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = guard.into_inner().map_err(engine)?;
            let rec: LinkCodeRecord = decode("link code", &v)?;
            if rec.expires_ms < before_ms {
                out.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        Ok(out)
    }
}

impl Accounts for EmbeddedStore {
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.db()?.user(user)
    }

    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        self.db()?.phone(phone)
    }

    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.db()?.code(phone)
    }

    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError> {
        self.db()?.link_code(code)
    }

    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.db()?.expired_link_codes(before_ms, limit)
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: AccountOp, raw: &mut Vec<RawOp>) {
    match op {
        AccountOp::PutUser(u) => raw.push(put(
            T_USERS,
            u.user_id.to_be_bytes().to_vec(),
            u.encode_to_vec().into(),
        )),
        AccountOp::PutPhone { phone, user } => raw.push(put(
            T_PHONES,
            phone.into_bytes(),
            user.to_be_bytes().to_vec().into(),
        )),
        AccountOp::PutCode { phone, record } => raw.push(put(
            T_CODES,
            phone.into_bytes(),
            record.encode_to_vec().into(),
        )),
        AccountOp::PutLinkCode { code, record } => raw.push(put(
            T_LINK_CODES,
            code.into_bytes(),
            record.encode_to_vec().into(),
        )),
        AccountOp::DeleteLinkCode(code) => {
            raw.push(remove(T_LINK_CODES, Kind::Remove, code.into_bytes()));
        }
    }
}
