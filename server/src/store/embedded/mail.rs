//! The embedded backend's mail domain.

use super::*;

impl Db {
    pub(super) fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.mail.iter() {
            let (k, v) = guard.into_inner().map_err(engine)?;
            let (owner, id) = layout::parse_mail(&k).ok_or(StoreError::Corrupt {
                what: "mail key",
                detail: format!("{} bytes", k.len()),
            })?;
            out.push((owner, id, decode("mail", &v)?));
        }
        Ok(out)
    }
}

impl Mailboxes for EmbeddedStore {
    fn mail(&self) -> Result<Vec<(UserId, u64, MailRecord)>, StoreError> {
        self.db()?.mail()
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: MailOp, raw: &mut Vec<RawOp>) {
    match op {
        MailOp::Put { owner, id, record } => raw.push(put(
            T_MAIL,
            layout::mail(owner, id).to_vec(),
            record.encode_to_vec().into(),
        )),
        MailOp::Delete { owner, id } => {
            raw.push(remove(
                T_MAIL,
                Kind::Remove,
                layout::mail(owner, id).to_vec(),
            ));
        }
    }
}
