//! The embedded backend's payloads domain.

use super::*;

impl Payloads for EmbeddedStore {
    fn payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>, StoreError> {
        let db = self.db()?;
        match db
            .payloads
            .get(layout::mail(id.owner, id.seq))
            .map_err(engine)?
        {
            Some(v) => Ok(Some(decode("payload", &v)?)),
            None => Ok(None),
        }
    }

    fn expired_payloads(&self, before_ms: u64, limit: usize) -> Result<Vec<PayloadId>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::new();
        for guard in db.payloads.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = guard.into_inner().map_err(engine)?;
            let record: PayloadRecord = decode("payload", &v)?;
            if record.created_ms < before_ms {
                let (owner, seq) = layout::parse_mail(&k).ok_or(StoreError::Corrupt {
                    what: "payload key",
                    detail: format!("{} bytes", k.len()),
                })?;
                out.push(PayloadId { owner, seq });
            }
        }
        Ok(out)
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: PayloadOp, raw: &mut Vec<RawOp>) {
    match op {
        PayloadOp::Put { id, record } => raw.push(put(
            T_PAYLOADS,
            layout::mail(id.owner, id.seq).to_vec(),
            record.encode_to_vec().into(),
        )),
        PayloadOp::Delete(id) => raw.push(remove(
            T_PAYLOADS,
            Kind::Remove,
            layout::mail(id.owner, id.seq).to_vec(),
        )),
    }
}
