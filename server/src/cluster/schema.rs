//! The PostgreSQL schema of cluster mode and its migrations.
//!
//! Migrations are numbered from 1 and only ever appended; each runs once,
//! in order, in one transaction with its row in `switchboard_schema`. Every
//! node applies the missing ones at start (and `switchboard migrate` does
//! it by hand); an advisory lock makes concurrent starts take turns. A
//! node refuses a database whose schema is newer than the newest migration
//! it knows: it would not know what the newer node writes.
//!
//! What the tables hold follows the storage domains (docs/ARCHITECTURE.md,
//! "Storage by domain"): PostgreSQL keeps accounts, keys and groups; Redis
//! keeps queues, dedup records, mail and shared payloads. Records are the
//! same protobuf encodings the embedded store writes (`store::records`),
//! in `record bytea` columns, with the columns the queries need beside
//! them. Ids are u64 on the wire and stored in `bigint` with the same 64
//! bits (values past `i64::MAX` read back negative in SQL).

use tokio_postgres::{Client, NoTls};

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number: 1, 2, ... in order.
    pub version: i32,
    /// What it does, recorded with it.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// Every migration this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts, keys and groups",
        sql: "
CREATE TABLE users (
    user_id bigint PRIMARY KEY,
    record bytea NOT NULL
);
CREATE TABLE phones (
    phone text PRIMARY KEY,
    user_id bigint NOT NULL
);
CREATE TABLE codes (
    phone text PRIMARY KEY,
    record bytea NOT NULL
);
CREATE TABLE link_codes (
    code text PRIMARY KEY,
    expires_ms bigint NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX link_codes_expiry ON link_codes (expires_ms);
CREATE TABLE device_keys (
    user_id bigint NOT NULL,
    device_id integer NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE one_time_keys (
    user_id bigint NOT NULL,
    device_id integer NOT NULL,
    key_index bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (user_id, device_id, key_index)
);
CREATE TABLE groups (
    group_id bigint PRIMARY KEY,
    record bytea NOT NULL
);
CREATE TABLE group_seqs (
    group_id bigint PRIMARY KEY,
    reserved_seq bigint NOT NULL
);
CREATE TABLE group_members (
    user_id bigint NOT NULL,
    group_id bigint NOT NULL,
    PRIMARY KEY (user_id, group_id)
);
",
    },
    Migration {
        version: 2,
        name: "partition owners and the cluster's server key",
        sql: "
CREATE TABLE partition_owners (
    partition integer PRIMARY KEY,
    owner text NOT NULL,
    epoch bigint NOT NULL
);
CREATE TABLE cluster_secrets (
    name text PRIMARY KEY,
    value bytea NOT NULL
);
",
    },
];

/// The newest schema version this build knows.
#[must_use]
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Key of the advisory lock held while migrating ("sbschema").
const LOCK_KEY: i64 = 0x7362_7363_6865_6d61;

/// Why the schema could not be read or migrated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// PostgreSQL could not be reached or refused a statement.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The database was migrated by a newer build.
    #[error(
        "the database schema is at version {found}, newer than this build knows ({known}): upgrade this node"
    )]
    Newer {
        /// The database's version.
        found: i32,
        /// The newest this build knows.
        known: i32,
    },
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version before (0: a new database).
    pub from: i32,
    /// The version now.
    pub to: i32,
}

/// Connects to PostgreSQL (no TLS: run it on a private network or a local
/// socket); the connection runs on a task of the current runtime.
///
/// # Errors
/// [`SchemaError::Postgres`] when the server cannot be reached or refuses.
pub async fn connect(url: &str) -> Result<Client, SchemaError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// The database's schema version (0: never migrated).
///
/// # Errors
/// [`SchemaError::Postgres`].
pub async fn version(client: &Client) -> Result<i32, SchemaError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = 'switchboard_schema')",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM switchboard_schema", &[])
        .await?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Applies the migrations the database lacks, each with its row, all in
/// one transaction under an advisory lock (so two nodes starting at once
/// take turns and the second finds nothing to do).
///
/// # Errors
/// [`SchemaError::Newer`] when the database is ahead of this build (nothing
/// is changed); [`SchemaError::Postgres`] when a statement fails (nothing
/// is changed either: the transaction is rolled back).
pub async fn migrate(client: &mut Client) -> Result<Migrated, SchemaError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS switchboard_schema (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let from: i32 = tx
        .query_one("SELECT max(version) FROM switchboard_schema", &[])
        .await?
        .get::<_, Option<i32>>(0)
        .unwrap_or(0);
    let known = latest();
    if from > known {
        return Err(SchemaError::Newer { found: from, known });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO switchboard_schema (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        tracing::info!(version = m.version, name = m.name, "schema migrated");
    }
    tx.commit().await?;
    Ok(Migrated { from, to: known })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(m.version).ok(), Some(i + 1), "{}", m.name);
        }
        assert_eq!(latest(), i32::try_from(MIGRATIONS.len()).unwrap_or(0));
    }
}
