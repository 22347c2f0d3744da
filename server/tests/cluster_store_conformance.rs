//! The storage conformance suite (`store::conformance`) against cluster
//! mode's store (`cluster::store::ClusterStore`) on a real PostgreSQL and a
//! real Redis Cluster (3 masters, 3 replicas). Each fresh store is a new
//! database and a new key prefix; a reopen connects again to both.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod engines;

use std::sync::{Arc, Weak};

use engines::{Postgres, RedisCluster};
use switchboard_server::cluster::membership::{Membership, Standing};
use switchboard_server::cluster::partition::Ownership;
use switchboard_server::cluster::postgres::PgDomains;
use switchboard_server::cluster::redis_domains::{Conn, RedisDomains};
use switchboard_server::cluster::store::ClusterStore;
use switchboard_server::store::conformance::{self, Harness};
use switchboard_server::store::{Store, StoreError};

struct Cluster {
    pg: Postgres,
    redis: RedisCluster,
    rt: tokio::runtime::Runtime,
    /// (database URL, key prefix, the store opened on them, the
    /// membership that took its partitions).
    opened: Vec<Opened>,
}

/// A store the harness opened: its database URL, key prefix, the store
/// and the membership that took its partitions.
type Opened = (String, String, Weak<dyn Store>, Arc<Membership>);

impl Cluster {
    /// A node's membership on this cluster's Redis under `prefix`, with
    /// `lease`, holding `ownership`'s token (its link address is never
    /// dialled here).
    fn member(
        &self,
        prefix: &str,
        ownership: Arc<Ownership>,
        lease: std::time::Duration,
    ) -> Result<Membership, StoreError> {
        Membership::connect(
            &self.redis.url(),
            prefix,
            ownership,
            lease,
            "127.0.0.1:1".into(),
        )
    }

    /// Opens a store as a node of its own that takes over every
    /// partition (the previous node on the same data resigned).
    fn open(
        &self,
        url: &str,
        prefix: &str,
    ) -> Result<(Arc<dyn Store>, Arc<Membership>), StoreError> {
        let token = format!("conformance-{}", self.opened.len());
        let ownership = Arc::new(Ownership::new(token));
        let pg = PgDomains::open(url, ownership.clone())?;
        let membership =
            self.member(prefix, ownership.clone(), std::time::Duration::from_secs(3))?;
        let standing = membership.step(&pg)?;
        if standing != Standing::Serving {
            return Err(StoreError::Engine(format!(
                "took over nothing: {standing:?}"
            )));
        }
        // One replica must confirm every synced commit.
        let redis = RedisDomains::open(&self.redis.url(), prefix, 1, ownership, 2)?;
        Ok((Arc::new(ClusterStore::new(pg, redis)), Arc::new(membership)))
    }
}

impl Cluster {
    /// Creates database `db` on the harness's PostgreSQL; its URL.
    fn database(&self, db: &str) -> Result<String, StoreError> {
        let admin = self.pg.url();
        self.rt
            .block_on(async {
                let c = switchboard_server::cluster::schema::connect(&admin).await?;
                c.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                Ok::<_, switchboard_server::cluster::schema::SchemaError>(())
            })
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        Ok(admin.replace("dbname=postgres", &format!("dbname={db}")))
    }
}

impl Harness for Cluster {
    fn fresh(&mut self) -> Result<Arc<dyn Store>, StoreError> {
        let n = self.opened.len();
        let db = format!("conformance_{n}");
        let url = self.database(&db)?;
        let prefix = format!("c{n}:");
        let (store, membership) = self.open(&url, &prefix)?;
        self.opened
            .push((url, prefix, Arc::downgrade(&store), membership));
        Ok(store)
    }

    fn reopen(&mut self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        let (url, prefix, membership) = self
            .opened
            .iter()
            .find(|(_, _, weak, _)| weak.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &store)))
            .map(|(url, prefix, _, m)| (url.clone(), prefix.clone(), m.clone()))
            .ok_or_else(|| {
                StoreError::Engine("reopen of a store this harness did not open".into())
            })?;
        drop(store);
        membership.resign()?;
        let (reopened, membership) = self.open(&url, &prefix)?;
        self.opened
            .push((url, prefix, Arc::downgrade(&reopened), membership));
        Ok(reopened)
    }
}

/// A node that stalls past its lease is taken over, and then neither
/// engine accepts its writes: fencing, checked by Redis and PostgreSQL
/// themselves.
fn a_node_taken_over_is_fenced_in_both_engines(h: &mut Cluster) {
    use switchboard_server::store::{AccountOp, DeviceKey, Op, QueueOp, Queues};
    let url = h.database(&format!("fencing_{}", h.opened.len())).unwrap();
    let prefix = "fencing:";
    let lease = std::time::Duration::from_millis(600);
    let node = |name: &str| {
        let ownership = Arc::new(Ownership::new(name.to_owned()));
        let pg = PgDomains::open(&url, ownership.clone()).unwrap();
        let membership = h.member(prefix, ownership.clone(), lease).unwrap();
        (pg, membership, ownership)
    };
    let (pg_a, member_a, own_a) = node("node-a");
    assert_eq!(member_a.step(&pg_a).unwrap(), Standing::Serving);
    let (pg_b, member_b, own_b) = node("node-b");
    assert_eq!(member_b.step(&pg_b).unwrap(), Standing::Standby);
    let store_a = ClusterStore::new(
        pg_a,
        RedisDomains::open(&h.redis.url(), prefix, 1, own_a, 2).unwrap(),
    );
    let device = DeviceKey { user: 7, device: 1 };
    let writes = |seq: u64| -> Vec<Op> {
        vec![
            QueueOp::ReserveSeqs { device, upto: seq }.into(),
            AccountOp::PutPhone {
                phone: format!("+1555000{seq}"),
                user: 7,
            }
            .into(),
        ]
    };
    store_a.commit(writes(1), true).unwrap();
    // A stalls: no renewal for longer than its lease; B takes over.
    std::thread::sleep(lease * 2);
    let (pg_b2, member_b2) = (pg_b, member_b);
    assert_eq!(member_b2.step(&pg_b2).unwrap(), Standing::Serving);
    let store_b = ClusterStore::new(
        pg_b2,
        RedisDomains::open(&h.redis.url(), prefix, 1, own_b, 2).unwrap(),
    );
    // A's next writes are refused by Redis (the queue counter) ...
    let redis_refused = store_a.commit(vec![writes(2).remove(0)], true);
    assert!(
        redis_refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("FENCED")),
        "{redis_refused:?}"
    );
    // ... and by PostgreSQL (the phone).
    let pg_refused = store_a.commit(vec![writes(2).remove(1)], true);
    assert!(
        pg_refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("fenced")),
        "{pg_refused:?}"
    );
    // A's own membership step finds it lost the partitions (its PostgreSQL
    // connection is not needed for that).
    let probe = PgDomains::open(&url, Arc::new(Ownership::new("probe".into()))).unwrap();
    assert_eq!(member_a.step(&probe).unwrap(), Standing::Fenced);
    // B writes, and reads what A committed before the takeover.
    assert_eq!(store_b.reserved_seq(device).unwrap(), 1);
    store_b.commit(writes(3), true).unwrap();
    assert_eq!(store_b.reserved_seq(device).unwrap(), 3);
}

/// Commits call `apply.lua` by hash (`EVALSHA`); a master that lost its
/// script cache (restarted, or a replica just promoted) answers NOSCRIPT,
/// and the commit goes through anyway, sending the body once.
fn a_master_without_the_script_still_commits(h: &mut Cluster) {
    use switchboard_server::store::{DeviceKey, Op, QueueOp, Queues};
    let url = h.database(&format!("scripts_{}", h.opened.len())).unwrap();
    let prefix = "scripts:";
    let ownership = Arc::new(Ownership::new("scripts-node".into()));
    let pg = PgDomains::open(&url, ownership.clone()).unwrap();
    let membership = h
        .member(prefix, ownership.clone(), std::time::Duration::from_secs(3))
        .unwrap();
    assert_eq!(membership.step(&pg).unwrap(), Standing::Serving);
    let redis = RedisDomains::open(&h.redis.url(), prefix, 1, ownership, 2).unwrap();
    // Users in many partitions, so every master is written.
    let devices: Vec<DeviceKey> = (1..=40).map(|user| DeviceKey { user, device: 1 }).collect();
    let reserve = |upto: u64| -> Vec<Op> {
        devices
            .iter()
            .map(|&device| QueueOp::ReserveSeqs { device, upto }.into())
            .collect()
    };
    h.redis.flush_scripts();
    redis.apply(&reserve(5), true).unwrap();
    assert_eq!(redis.script_loads(), 1, "NOSCRIPT once, then the body");
    redis.apply(&reserve(6), true).unwrap();
    assert_eq!(redis.script_loads(), 1, "cached now: by hash");
    h.redis.flush_scripts();
    redis.apply(&reserve(7), true).unwrap();
    assert_eq!(redis.script_loads(), 2);
    for &device in &devices {
        assert_eq!(redis.reserved_seq(device).unwrap(), 7, "{device:?}");
    }
}

/// The shard threads of a node call Redis side by side: while one call
/// holds a connection (a commit waiting for its `WAIT`, a sweep), another
/// takes the next connection instead of waiting for it. With one shared
/// connection the second call waits until the first is done, here past
/// the deadline.
fn a_busy_connection_does_not_hold_up_other_calls(h: &Cluster) {
    let conn = Conn::open(&h.redis.url(), 2).unwrap();
    let held = conn.lock();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let pong = redis::cmd("PING").query::<String>(&mut *conn.lock());
            tx.send(pong.map_err(|e| e.to_string())).unwrap();
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(20));
        drop(held);
        assert_eq!(got, Ok(Ok("PONG".to_owned())));
    });
}

/// The same for PostgreSQL: while one shard's transaction waits on a row
/// lock, another shard's read is answered on another connection.
fn a_waiting_transaction_does_not_hold_up_other_calls(h: &mut Cluster) {
    use switchboard_server::cluster::postgres::PgOp;
    use switchboard_server::store::{AccountOp, Accounts};
    let url = h.database(&format!("pool_{}", h.opened.len())).unwrap();
    let ownership = Arc::new(Ownership::new("pool-node".into()));
    let pg = PgDomains::open_with(&url, ownership.clone(), 2).unwrap();
    let membership = h
        .member("pool:", ownership, std::time::Duration::from_secs(3))
        .unwrap();
    assert_eq!(membership.step(&pg).unwrap(), Standing::Serving);
    // Another session holds every partition owner's row: a transaction's
    // owner check (FOR SHARE) waits for it.
    let blocker = h.rt.block_on(async {
        let c = switchboard_server::cluster::schema::connect(&url)
            .await
            .unwrap();
        c.batch_execute("BEGIN; SELECT partition FROM partition_owners FOR UPDATE")
            .await
            .unwrap();
        c
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            pg.apply(&[PgOp::Account(AccountOp::PutPhone {
                phone: "+15550001234".into(),
                user: 9,
            })])
        });
        // The transaction waits for the lock before the read starts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let row =
                h.rt.block_on(blocker.query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                ))
                .unwrap();
            if row.get::<_, i64>(0) > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the transaction never waited"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s.spawn(|| {
            tx.send(pg.user(9).map_err(|e| e.to_string())).unwrap();
        });
        let read = rx.recv_timeout(std::time::Duration::from_secs(20));
        h.rt.block_on(blocker.batch_execute("COMMIT")).unwrap();
        assert!(matches!(read, Ok(Ok(None))), "{read:?}");
        waiting.join().unwrap().unwrap();
    });
    assert_eq!(pg.phone("+15550001234").unwrap(), Some(9));
    membership.resign().unwrap();
}

#[test]
fn the_cluster_store_passes_the_conformance_suite() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(Postgres::start());
    let redis = RedisCluster::start();
    let mut harness = Cluster {
        pg,
        redis,
        rt,
        opened: Vec::new(),
    };
    a_busy_connection_does_not_hold_up_other_calls(&harness);
    a_waiting_transaction_does_not_hold_up_other_calls(&mut harness);
    a_node_taken_over_is_fenced_in_both_engines(&mut harness);
    a_master_without_the_script_still_commits(&mut harness);
    let failures = conformance::run(&mut harness);
    let report: Vec<String> = failures.iter().map(ToString::to_string).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        conformance::CASES.len(),
        report.join("\n")
    );
}
