//! The PostgreSQL domains of cluster mode: [`Accounts`], [`Keys`] and
//! [`Groups`] on the tables of [`super::schema`].
//!
//! The domain traits are synchronous and called from shard threads, so a
//! [`PgDomains`] owns a small current-thread runtime and blocks on it for
//! each statement (from several threads at once: each call takes one of a
//! few connections, a free one if there is); it must not be called from
//! inside an async task. One
//! [`PgDomains::apply`] is one transaction: the batch is the atomic unit
//! of these domains.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use prost::Message;
use tokio_postgres::Client;

use super::partition::{self, Ownership};
use super::schema;
use crate::store::{
    AccountOp, Accounts, CodeRecord, DeviceKey, DeviceKeysRecord, GroupId, GroupOp, GroupRecord,
    Groups, KeyOp, Keys, LinkCodeRecord, StoreError, UserId, UserRecord,
};

/// A u64 id in a `bigint` column: the same 64 bits.
fn sql(id: u64) -> i64 {
    id.cast_signed()
}

/// A row of [`PgDomains::rows`]: an id, an optional second key and a record.
type RecordRow = (i64, Option<i32>, Vec<u8>);

/// A `bigint` column back to the u64 id it holds.
fn id(v: i64) -> u64 {
    v.cast_unsigned()
}

fn engine(e: impl std::fmt::Display + 'static) -> StoreError {
    // A server's refusal says why only in its `DbError`.
    let detail = (&e as &dyn std::any::Any)
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
        .map(|db| format!(": {}", db.message()))
        .unwrap_or_default();
    StoreError::Engine(format!("PostgreSQL: {e}{detail}"))
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// A connection to `url`, its I/O driven by the current runtime.
async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(engine)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// One write of these domains.
#[derive(Debug, Clone)]
pub enum PgOp {
    /// Accounts.
    Account(AccountOp),
    /// Keys.
    Key(KeyOp),
    /// Groups.
    Group(GroupOp),
}

impl PgOp {
    /// The partition whose owner writes this op ([`super::partition`]).
    fn partition(&self) -> u32 {
        match self {
            PgOp::Account(AccountOp::PutUser(u)) => partition::of_id(u.user_id),
            PgOp::Account(
                AccountOp::PutPhone { phone: key, .. }
                | AccountOp::PutCode { phone: key, .. }
                | AccountOp::PutLinkCode { code: key, .. }
                | AccountOp::DeleteLinkCode(key),
            ) => partition::of_str(key),
            PgOp::Key(
                KeyOp::PutDeviceKeys { device, .. }
                | KeyOp::PutOneTimeKey { device, .. }
                | KeyOp::DeleteOneTimeKey { device, .. }
                | KeyOp::DropDeviceKeys(device),
            ) => partition::of_id(device.user),
            PgOp::Group(GroupOp::PutGroup(g)) => partition::of_id(g.group_id),
            PgOp::Group(
                GroupOp::ReserveSeqs { group, .. }
                | GroupOp::PutMembership { group, .. }
                | GroupOp::DeleteMembership { group, .. }
                | GroupOp::DropGroup(group),
            ) => partition::of_id(*group),
        }
    }
}

/// Accounts, keys and groups in PostgreSQL.
pub struct PgDomains {
    /// `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
    /// One per shard thread and one more: shards call side by side.
    clients: Box<[Mutex<Client>]>,
    /// Where the next call starts looking for a free connection.
    next: AtomicUsize,
    /// Where to connect again after the connection is lost.
    url: String,
    ownership: Arc<Ownership>,
}

impl std::fmt::Debug for PgDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDomains").finish_non_exhaustive()
    }
}

impl PgDomains {
    /// Connects to `url` and brings its schema to this build's (refusing
    /// a newer one). Blocks; call it outside any async runtime.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when PostgreSQL cannot be reached, refuses, or
    /// has a newer schema.
    pub fn open(url: &str, ownership: Arc<Ownership>) -> Result<Self, StoreError> {
        Self::open_with(url, ownership, 1)
    }

    /// As [`PgDomains::open`], with `connections` (at least one) used side
    /// by side by the threads that call it.
    ///
    /// # Errors
    /// As [`PgDomains::open`].
    pub fn open_with(
        url: &str,
        ownership: Arc<Ownership>,
        connections: usize,
    ) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(engine)?;
        let clients = rt.block_on(async {
            let mut first = connect(url).await?;
            schema::migrate(&mut first).await.map_err(engine)?;
            let mut clients = vec![Mutex::new(first)];
            for _ in 1..connections.max(1) {
                clients.push(Mutex::new(connect(url).await?));
            }
            Ok::<_, StoreError>(clients)
        })?;
        Ok(Self {
            rt: Some(rt),
            clients: clients.into_boxed_slice(),
            next: AtomicUsize::new(0),
            url: url.to_owned(),
            ownership,
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        // Only `drop` takes it.
        #[allow(clippy::expect_used)]
        self.rt.as_ref().expect("runtime present until drop")
    }

    /// A free connection, or the next one once it is free; opened again
    /// first if it was lost (PostgreSQL restarted or the network failed):
    /// the failed statement's batch was refused, and the next one finds a
    /// working connection.
    fn client(&self) -> Result<MutexGuard<'_, Client>, StoreError> {
        let (_, mut client) = super::take(&self.clients, &self.next);
        if client.is_closed() {
            *client = self.rt().block_on(connect(&self.url))?;
            tracing::info!("reconnected to PostgreSQL");
        }
        Ok(client)
    }

    /// The rows of a query that selects an id (`bigint`), an optional
    /// `integer` and a `bytea` record, in that order.
    fn rows(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RecordRow>, StoreError> {
        let client = self.client()?;
        let rows = self
            .rt()
            .block_on(client.query(query, params))
            .map_err(engine)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(engine)
    }

    /// One optional `bytea` value of a single-row query.
    fn bytes(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client()?;
        let row = self
            .rt()
            .block_on(client.query_opt(query, params))
            .map_err(engine)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Applies `ops` in order in one transaction (all or none).
    ///
    /// # Errors
    /// [`StoreError::Engine`] if any statement or the commit fails; then
    /// nothing of the batch is applied.
    pub fn apply(&self, ops: &[PgOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut partitions: Vec<i32> = ops.iter().map(|op| op.partition().cast_signed()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let mut client = self.client()?;
        self.rt().block_on(async {
            let tx = client.transaction().await.map_err(engine)?;
            // Fencing: the rows stay share-locked until the commit, so a
            // takeover (an UPDATE of them) waits for this transaction, and
            // this one fails if a takeover came first.
            let held = tx
                .query(
                    "SELECT partition FROM partition_owners \
                     WHERE partition = ANY($1) AND owner = $2 FOR SHARE",
                    &[&partitions, &self.ownership.token()],
                )
                .await
                .map_err(engine)?;
            if held.len() != partitions.len() {
                return Err(StoreError::Engine(format!(
                    "PostgreSQL: fenced: this node does not own {} of the {} partitions written",
                    partitions.len() - held.len(),
                    partitions.len()
                )));
            }
            for op in ops {
                apply_one(&tx, op).await?;
            }
            tx.commit().await.map_err(engine)
        })
    }
}

impl Drop for PgDomains {
    fn drop(&mut self) {
        // The last handle may go on an async task (the server's sweep
        // task holds one): a runtime dropped there would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Cluster bookkeeping: partition owners and shared secrets.
impl PgDomains {
    /// Records this node as the owner of `claims` (partition, epoch),
    /// each only if its epoch is newer than the one recorded (a claim that
    /// lost a race in Redis and arrives late changes nothing). Waits for
    /// transactions of the previous owner in flight. Says which partitions
    /// are now recorded as this node's.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when PostgreSQL fails.
    pub fn claim(&self, claims: &[(u32, u64)]) -> Result<Vec<u32>, StoreError> {
        let partitions: Vec<i32> = claims.iter().map(|c| c.0.cast_signed()).collect();
        let epochs: Vec<i64> = claims.iter().map(|c| c.1.cast_signed()).collect();
        let client = self.client()?;
        let rows = self
            .rt()
            .block_on(client.query(
                "INSERT INTO partition_owners (partition, owner, epoch) \
                 SELECT p, $2, e FROM UNNEST($1::integer[], $3::bigint[]) AS t(p, e) \
                 ON CONFLICT (partition) DO UPDATE \
                 SET owner = EXCLUDED.owner, epoch = EXCLUDED.epoch \
                 WHERE partition_owners.epoch < EXCLUDED.epoch \
                 RETURNING partition",
                &[&partitions, &self.ownership.token(), &epochs],
            ))
            .map_err(engine)?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i32>(0).cast_unsigned())
            .collect())
    }

    /// The cluster-wide secret `name`: the stored one, or `candidate`
    /// stored now if there was none (the first node to start wins).
    ///
    /// # Errors
    /// [`StoreError::Engine`] when PostgreSQL fails.
    pub fn cluster_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let client = self.client()?;
        self.rt()
            .block_on(client.execute(
                "INSERT INTO cluster_secrets (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &candidate],
            ))
            .map_err(engine)?;
        drop(client);
        self.bytes(
            "SELECT value FROM cluster_secrets WHERE name = $1",
            &[&name],
        )?
        .ok_or_else(|| engine(format!("cluster secret {name} vanished")))
    }
}

async fn apply_one(tx: &tokio_postgres::Transaction<'_>, op: &PgOp) -> Result<(), StoreError> {
    let r = match op {
        PgOp::Account(AccountOp::PutUser(u)) => {
            tx.execute(
                "INSERT INTO users (user_id, record) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET record = EXCLUDED.record",
                &[&sql(u.user_id), &u.encode_to_vec()],
            )
            .await
        }
        PgOp::Account(AccountOp::PutPhone { phone, user }) => {
            tx.execute(
                "INSERT INTO phones (phone, user_id) VALUES ($1, $2) \
                 ON CONFLICT (phone) DO UPDATE SET user_id = EXCLUDED.user_id",
                &[phone, &sql(*user)],
            )
            .await
        }
        PgOp::Account(AccountOp::PutCode { phone, record }) => {
            tx.execute(
                "INSERT INTO codes (phone, record) VALUES ($1, $2) \
                 ON CONFLICT (phone) DO UPDATE SET record = EXCLUDED.record",
                &[phone, &record.encode_to_vec()],
            )
            .await
        }
        PgOp::Account(AccountOp::PutLinkCode { code, record }) => {
            tx.execute(
                "INSERT INTO link_codes (code, expires_ms, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (code) DO UPDATE SET expires_ms = EXCLUDED.expires_ms, \
                 record = EXCLUDED.record",
                &[code, &sql(record.expires_ms), &record.encode_to_vec()],
            )
            .await
        }
        PgOp::Account(AccountOp::DeleteLinkCode(code)) => {
            tx.execute("DELETE FROM link_codes WHERE code = $1", &[code])
                .await
        }
        PgOp::Key(KeyOp::PutDeviceKeys { device, record }) => {
            tx.execute(
                "INSERT INTO device_keys (user_id, device_id, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (user_id, device_id) DO UPDATE SET record = EXCLUDED.record",
                &[
                    &sql(device.user),
                    &device.device.cast_signed(),
                    &record.encode_to_vec(),
                ],
            )
            .await
        }
        PgOp::Key(KeyOp::PutOneTimeKey { device, index, key }) => {
            tx.execute(
                "INSERT INTO one_time_keys (user_id, device_id, key_index, record) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, device_id, key_index) \
                 DO UPDATE SET record = EXCLUDED.record",
                &[
                    &sql(device.user),
                    &device.device.cast_signed(),
                    &sql(*index),
                    &key.to_vec(),
                ],
            )
            .await
        }
        PgOp::Key(KeyOp::DeleteOneTimeKey { device, index }) => {
            tx.execute(
                "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2 \
                 AND key_index = $3",
                &[
                    &sql(device.user),
                    &device.device.cast_signed(),
                    &sql(*index),
                ],
            )
            .await
        }
        PgOp::Key(KeyOp::DropDeviceKeys(device)) => {
            let (u, d) = (sql(device.user), device.device.cast_signed());
            if let Err(e) = tx
                .execute(
                    "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2",
                    &[&u, &d],
                )
                .await
            {
                return Err(engine(e));
            }
            tx.execute(
                "DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2",
                &[&u, &d],
            )
            .await
        }
        PgOp::Group(GroupOp::PutGroup(g)) => {
            tx.execute(
                "INSERT INTO groups (group_id, record) VALUES ($1, $2) \
                 ON CONFLICT (group_id) DO UPDATE SET record = EXCLUDED.record",
                &[&sql(g.group_id), &g.encode_to_vec()],
            )
            .await
        }
        PgOp::Group(GroupOp::ReserveSeqs { group, upto }) => {
            tx.execute(
                "INSERT INTO group_seqs (group_id, reserved_seq) VALUES ($1, $2) \
                 ON CONFLICT (group_id) DO UPDATE SET reserved_seq = EXCLUDED.reserved_seq",
                &[&sql(*group), &sql(*upto)],
            )
            .await
        }
        PgOp::Group(GroupOp::PutMembership { user, group }) => {
            tx.execute(
                "INSERT INTO group_members (user_id, group_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&sql(*user), &sql(*group)],
            )
            .await
        }
        PgOp::Group(GroupOp::DeleteMembership { user, group }) => {
            tx.execute(
                "DELETE FROM group_members WHERE user_id = $1 AND group_id = $2",
                &[&sql(*user), &sql(*group)],
            )
            .await
        }
        PgOp::Group(GroupOp::DropGroup(group)) => {
            if let Err(e) = tx
                .execute(
                    "DELETE FROM group_seqs WHERE group_id = $1",
                    &[&sql(*group)],
                )
                .await
            {
                return Err(engine(e));
            }
            tx.execute("DELETE FROM groups WHERE group_id = $1", &[&sql(*group)])
                .await
        }
    };
    r.map(drop).map_err(engine)
}

impl Accounts for PgDomains {
    fn user(&self, user: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.bytes("SELECT record FROM users WHERE user_id = $1", &[&sql(user)])?
            .map(|b| decode("user", &b))
            .transpose()
    }

    fn users(&self, users: &[UserId]) -> Result<Vec<(UserId, UserRecord)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
        self.rows(
            "SELECT user_id, NULL::integer, record FROM users WHERE user_id = ANY($1)",
            &[&ids],
        )?
        .into_iter()
        .map(|(user, _, record)| Ok((id(user), decode("user", &record)?)))
        .collect()
    }

    fn phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        let client = self.client()?;
        let row = self
            .rt()
            .block_on(client.query_opt("SELECT user_id FROM phones WHERE phone = $1", &[&phone]))
            .map_err(engine)?;
        Ok(row.map(|r| id(r.get(0))))
    }

    fn code(&self, phone: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.bytes("SELECT record FROM codes WHERE phone = $1", &[&phone])?
            .map(|b| decode("code", &b))
            .transpose()
    }

    fn link_code(&self, code: &str) -> Result<Option<LinkCodeRecord>, StoreError> {
        self.bytes("SELECT record FROM link_codes WHERE code = $1", &[&code])?
            .map(|b| decode("link code", &b))
            .transpose()
    }

    fn expired_link_codes(&self, before_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client()?;
        let rows = self
            .rt()
            .block_on(client.query(
                "SELECT code FROM link_codes WHERE expires_ms < $1 ORDER BY expires_ms LIMIT $2",
                &[&sql(before_ms), &limit],
            ))
            .map_err(engine)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }
}

impl Keys for PgDomains {
    fn device_keys(&self, device: DeviceKey) -> Result<Option<DeviceKeysRecord>, StoreError> {
        self.bytes(
            "SELECT record FROM device_keys WHERE user_id = $1 AND device_id = $2",
            &[&sql(device.user), &device.device.cast_signed()],
        )?
        .map(|b| decode("device keys", &b))
        .transpose()
    }

    fn many_device_keys(
        &self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, DeviceKeysRecord)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<i64> = devices.iter().map(|d| sql(d.user)).collect();
        let ids: Vec<i32> = devices.iter().map(|d| d.device.cast_signed()).collect();
        self.rows(
            "SELECT k.user_id, k.device_id, k.record FROM device_keys k \
             JOIN unnest($1::bigint[], $2::integer[]) AS d(user_id, device_id) \
             ON k.user_id = d.user_id AND k.device_id = d.device_id",
            &[&users, &ids],
        )?
        .into_iter()
        .map(|(user, device, record)| {
            let device = DeviceKey {
                user: id(user),
                device: device.unwrap_or_default().cast_unsigned(),
            };
            Ok((device, decode("device keys", &record)?))
        })
        .collect()
    }

    fn first_one_time_key(
        &self,
        device: DeviceKey,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, StoreError> {
        let client = self.client()?;
        let row = self
            .rt()
            .block_on(client.query_opt(
                "SELECT key_index, record FROM one_time_keys \
                 WHERE user_id = $1 AND device_id = $2 AND key_index >= $3 \
                 ORDER BY key_index LIMIT 1",
                &[&sql(device.user), &device.device.cast_signed(), &sql(from)],
            ))
            .map_err(engine)?;
        Ok(row.map(|r| {
            let key: Vec<u8> = r.get(1);
            (id(r.get(0)), Bytes::from(key))
        }))
    }
}

impl Groups for PgDomains {
    fn group(&self, group: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.bytes(
            "SELECT record FROM groups WHERE group_id = $1",
            &[&sql(group)],
        )?
        .map(|b| decode("group", &b))
        .transpose()
    }

    fn group_reserved_seq(&self, group: GroupId) -> Result<u64, StoreError> {
        let client = self.client()?;
        let row = self
            .rt()
            .block_on(client.query_opt(
                "SELECT reserved_seq FROM group_seqs WHERE group_id = $1",
                &[&sql(group)],
            ))
            .map_err(engine)?;
        Ok(row.map_or(0, |r| id(r.get(0))))
    }

    fn user_groups(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        let client = self.client()?;
        let rows = self
            .rt()
            .block_on(client.query(
                "SELECT group_id FROM group_members WHERE user_id = $1",
                &[&sql(user)],
            ))
            .map_err(engine)?;
        let mut groups: Vec<GroupId> = rows.into_iter().map(|r| id(r.get(0))).collect();
        // Ascending by id as u64 (SQL orders the signed values).
        groups.sort_unstable();
        Ok(groups)
    }
}
