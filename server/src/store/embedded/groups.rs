//! The embedded backend's groups domain.

use super::*;

impl Groups for EmbeddedStore {
    fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        let db = self.db()?;
        match db.groups.get(group.to_be_bytes()).map_err(engine)? {
            Some(v) => Ok(Some(decode("group", &v)?)),
            None => Ok(None),
        }
    }

    fn group_reserved_seq(&self, group: GroupId) -> Result<u64, StoreError> {
        let db = self.db()?;
        match db.group_meta.get(group.to_be_bytes()).map_err(engine)? {
            Some(v) => u64_value("group_meta", &v),
            None => Ok(0),
        }
    }

    fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::new();
        for guard in db.memberships.prefix(user.to_be_bytes()) {
            let (k, _) = guard.into_inner().map_err(engine)?;
            let (_, group) = layout::parse_mail(&k).ok_or(StoreError::Corrupt {
                what: "membership key",
                detail: format!("{} bytes", k.len()),
            })?;
            out.push(group);
        }
        Ok(out)
    }
}

/// Logs one write of this domain.
pub(super) fn to_raw(op: GroupOp, raw: &mut Vec<RawOp>) {
    match op {
        GroupOp::PutGroup(g) => raw.push(put(
            T_GROUPS,
            g.group_id.to_be_bytes().to_vec(),
            g.encode_to_vec().into(),
        )),
        GroupOp::ReserveSeqs { group, upto } => raw.push(put(
            T_GROUP_META,
            group.to_be_bytes().to_vec(),
            upto.to_be_bytes().to_vec().into(),
        )),
        GroupOp::PutMembership { user, group } => raw.push(put(
            T_MEMBERSHIPS,
            layout::mail(user, group).to_vec(),
            Bytes::new(),
        )),
        GroupOp::DeleteMembership { user, group } => raw.push(remove(
            T_MEMBERSHIPS,
            Kind::Remove,
            layout::mail(user, group).to_vec(),
        )),
        GroupOp::DropGroup(group) => {
            raw.push(remove(T_GROUPS, Kind::Remove, group.to_be_bytes().to_vec()));
            raw.push(remove(
                T_GROUP_META,
                Kind::Remove,
                group.to_be_bytes().to_vec(),
            ));
        }
    }
}
